-- Batches done as sets: a batch of holds or resolutions costs a few statements, not a few per item.
--
-- Measured on migration 0014's batch functions (perf, 1,000 accounts, 64 callers): a quarter of
-- the server's time went to starting statements (PostgreSQL parses every CHECK constraint of a
-- table anew for each statement that writes it) and the per-item function calls around them, and
-- another sixth to a sequential scan of every hold per batch of resolutions (the planner guesses
-- a hundred items in a JSON array, and a hash join over all holds looked cheaper than a hundred
-- probes by key).
--
-- Now each batch function takes the common case of a whole account in one step for every such
-- account at once, and leaves the rest to the single-item functions (credits.take_hold,
-- credits.resolve_hold), one item after another in arrival order, exactly as before:
-- - holds: an account paying for itself (not a team member, nor a team with a member's item in
--   the batch), active, no credit due to expire, every item a freshly minted id, and the sum of
--   its items fitting every limit of the account (then each item, taken in order, fits too: the
--   amounts are never negative). One update of its row with that sum, one insert of its holds.
-- - resolutions: an account none of whose holds in the batch a team member made, that is not the
--   member of such a hold, with no hold twice in the batch, and that the batch cannot take across
--   an alert threshold (no monthly cap; its balance less the most its items can charge stays at
--   or above its highest balance.low threshold and above zero: an alert reports the figures at
--   its own crossing). One update of its holds, one of its row with what they charge and
--   release, one burn of its first grant in burn order when that grant covers them all (else
--   each ledger row goes through the grant triggers on its own, in order, as before); its ledger
--   rows and usage events in one insert each. The ledger rows' balance_after follow the items'
--   order.
-- The results are the single-item functions' results, row for row (tests/test_batch_sets.py and
-- tests/test_batch_differential.py compare them, the latter against migration 0014's functions).
--
-- Every row a batch touches is found by its key: the functions run with sequential scans, hash
-- and merge joins off, so the plans stay probes by key whatever the tables' size when planned
-- (the setting reaches the functions and triggers they call too, whose statements all look rows
-- up by account).
--
-- The daily usage rollup becomes statement-level (transition tables): one upsert per account and
-- day per statement, instead of a function call and an upsert per usage event.

-- A batch's items as the client sends them (ledger_batch.HoldItem.json, ResolveItem.json): the
-- parameters of take_hold and resolve_hold, by name.
CREATE TYPE credits.hold_item AS (
    subject text, hold uuid, tiers text[], amounts bigint[], minimums bigint[], debits boolean[],
    default_tier text, ttl integer, model text, power_level text, request_hash bytea, fresh boolean
);
CREATE TYPE credits.resolve_item AS (
    subject text, hold uuid, charge bigint, status text, usage_status text, service text, model text,
    provider text, prompt bigint, completion bigint, cached bigint, reasoning bigint, cost bigint,
    latency integer, metadata jsonb
);

-- A hold ended by a batch, with what it moves (spent: what the account pays; release: what it
-- held that it gives back).
CREATE TYPE credits.batch_ended AS (
    idx integer, subject text, hold uuid, charge bigint, spent bigint, release bigint,
    debits boolean, power_level text, usage_status text, service text, model text, provider text,
    prompt bigint, completion bigint, cached bigint, reasoning bigint, cost bigint,
    latency integer, metadata jsonb
);

-- Locks the accounts p_subjects and their teams (replaces migration 0014's, same order and rules):
-- the accounts and teams as last committed, locked in the order; under its lock a row is as it
-- is now, and a team that an account joined since the read is locked next (out of the order,
-- once, and only then). Two statements where 0014's took three.
CREATE OR REPLACE FUNCTION credits.lock_accounts(p_subjects text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_locked text[] := '{}';
    v_want   text[];
    v_joined text[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT s.id), '{}') INTO v_want
    FROM credits.credit_accounts a
    CROSS JOIN LATERAL (VALUES (a.subject_id), (a.parent_id)) AS s(id)
    WHERE a.subject_id = ANY (p_subjects) AND s.id IS NOT NULL;
    WHILE cardinality(v_want) > 0 LOOP
        -- (a FILTER, not a WHERE: PostgreSQL pushes an outer WHERE down into a FOR UPDATE
        -- subquery, and the rows it filters out would not be locked)
        SELECT coalesce(array_agg(DISTINCT l.parent_id) FILTER (
                   WHERE l.parent_id IS NOT NULL AND NOT l.parent_id = ANY (v_locked || v_want)), '{}')
        INTO v_joined
        FROM (SELECT a.parent_id FROM credits.credit_accounts a
              WHERE a.subject_id = ANY (v_want)
              ORDER BY a.parent_id IS NULL, a.subject_id COLLATE "C"
              FOR NO KEY UPDATE) l;
        v_locked := v_locked || v_want;
        v_want := v_joined;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION credits.take_holds(p_items jsonb) RETURNS TABLE (
    idx integer, outcome text, payer_id text, tier text, amount bigint, debits boolean,
    expires_at timestamptz, request_hash bytea, room bigint, quoted bigint, seen jsonb
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    v_day   date := (now() AT TIME ZONE 'UTC')::date;
    v_taken integer;  -- items taken as a set
    v_rest  text[];   -- the accounts whose items were not
    r       record;
BEGIN
    PERFORM credits.lock_accounts(ARRAY(SELECT DISTINCT x->>'subject' FROM jsonb_array_elements(p_items) x));

    RETURN QUERY
    WITH item AS (
        -- each item with its account's quote (take_hold's choice: the account's tier, if quoted,
        -- else the default tier)
        SELECT (e.o - 1)::integer AS i, q.subject, q.hold, q.ttl, q.model, q.power_level,
               q.request_hash, q.fresh, a.tier, a.parent_id, q.amounts[t.n] AS amount,
               q.debits[t.n] AS debits
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o)
        CROSS JOIN LATERAL jsonb_populate_record(NULL::credits.hold_item, e.item) AS q
        CROSS JOIN LATERAL (
            SELECT a.tier, a.parent_id FROM credits.credit_accounts a WHERE a.subject_id = q.subject
        ) a
        CROSS JOIN LATERAL (
            SELECT array_position(q.tiers, CASE WHEN a.tier = ANY (q.tiers) THEN a.tier ELSE q.default_tier END)
        ) AS t(n)
    ), team AS (
        SELECT DISTINCT item.parent_id AS subject FROM item WHERE item.parent_id IS NOT NULL
    ), account AS (
        -- (not a team whose member has an item in the batch too: a member's hold takes the
        -- team's credit, so their items are decided together, one by one in arrival order)
        SELECT item.subject, coalesce(sum(item.amount) FILTER (WHERE item.debits), 0) AS total,
               max(item.amount) FILTER (WHERE item.debits) AS biggest
        FROM item
        WHERE NOT EXISTS (SELECT 1 FROM team WHERE team.subject = item.subject)
        GROUP BY item.subject
        HAVING bool_and(item.fresh AND item.amount IS NOT NULL)
    ), taken AS (
        UPDATE credits.credit_accounts a SET
            held        = a.held + s.total,
            month_spend = CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END,
            month_start = greatest(a.month_start, v_month),
            day_spend   = CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END,
            day_start   = greatest(a.day_start, v_day)
        FROM account s
        WHERE a.subject_id = s.subject
          AND a.parent_id IS NULL
          AND a.status = 'active'
          AND (a.grants_due_at IS NULL OR a.grants_due_at > now())
          AND (s.total = 0 OR (
                   a.balance - a.held >= s.total
               AND (a.monthly_cap IS NULL OR a.monthly_cap
                    - CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END - a.held >= s.total)
               AND (a.daily_cap IS NULL OR a.daily_cap
                    - CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END - a.held >= s.total)
               AND (a.request_cap IS NULL OR a.request_cap >= s.biggest)))
        RETURNING a.subject_id
    ), held AS (
        INSERT INTO credits.holds AS h
            (id, subject_id, amount, debits, expires_at, model, power_level, request_hash)
        SELECT item.hold, item.subject, item.amount, item.debits, now() + item.ttl * interval '1 second',
               item.model, item.power_level, item.request_hash
        FROM item JOIN taken ON taken.subject_id = item.subject
        ORDER BY item.i
        RETURNING h.subject_id, h.id, h.expires_at
    )
    SELECT item.i, 'held'::text, item.subject, item.tier, item.amount, item.debits, held.expires_at,
           item.request_hash, NULL::bigint, item.amount, NULL::jsonb
    FROM item JOIN held ON held.subject_id = item.subject AND held.id = item.hold;
    GET DIAGNOSTICS v_taken = ROW_COUNT;
    IF v_taken = jsonb_array_length(p_items) THEN
        RETURN;
    END IF;

    -- The rest, one by one in arrival order: the accounts not taken above (all of an account's
    -- items were, or none; a fresh id has a hold now only if it was taken above).
    SELECT array_agg(s.subject) INTO v_rest
    FROM (SELECT q.subject
          FROM jsonb_populate_recordset(NULL::credits.hold_item, p_items) AS q
          LEFT JOIN credits.holds h ON h.subject_id = q.subject AND h.id = q.hold
          GROUP BY q.subject
          HAVING NOT bool_and(q.fresh AND h.id IS NOT NULL)) s;
    FOR r IN
        SELECT (e.o - 1)::integer AS i, q.*
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o)
        CROSS JOIN LATERAL jsonb_populate_record(NULL::credits.hold_item, e.item) AS q
        WHERE q.subject = ANY (v_rest)
        ORDER BY e.o
    LOOP
        RETURN QUERY SELECT r.i, t.* FROM credits.take_hold(
            r.subject, r.hold, r.tiers, r.amounts, r.minimums, r.debits, r.default_tier, r.ttl,
            r.model, r.power_level, r.request_hash, r.fresh) t;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION credits.resolve_holds(p_items jsonb) RETURNS TABLE (
    idx integer, balance bigint, charge bigint, debits boolean, transaction_id bigint, member_id text
)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    v_month    date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    v_day      date := (now() AT TIME ZONE 'UTC')::date;
    v_accounts text[];
    v_members  text[];
    v_sets     text[];   -- the accounts resolved as a set
    v_subjects integer;  -- the batch's accounts
    v_ended    credits.batch_ended[];
    v_balances jsonb;    -- {account: its balance after the batch}
    v_grants   jsonb;    -- {account: the grant that paid all its charges}
    v_unpaid   integer;  -- accounts with charges their first grant does not cover
    v_tx       jsonb := '{}';  -- {"account hold": ledger row} for those
    v_id       bigint;
    r          record;
BEGIN
    -- The holds' rows first, in (subject, id) order, each found by its key; then the payers and
    -- the members whose holds they are (see migration 0014). The accounts that may be resolved as
    -- a set: none of their holds in the batch a member's, none twice, and not themselves the
    -- member of a hold in the batch (a hold it made in a team, or that its member made, changes
    -- its row on the one-by-one path: arrival order would be lost). (MATERIALIZED: the lock is
    -- taken on every hold whatever the statement reads of it.)
    WITH locked AS MATERIALIZED (
        SELECT h.subject_id, h.member_id
        FROM (SELECT DISTINCT x->>'subject' AS subject, (x->>'hold')::uuid AS hold
              FROM jsonb_array_elements(p_items) x) q
        JOIN credits.holds h ON h.subject_id = q.subject AND h.id = q.hold
        ORDER BY h.subject_id COLLATE "C", h.id
        FOR NO KEY UPDATE OF h
    ), account AS (
        SELECT x->>'subject' AS subject, count(*) = count(DISTINCT (x->>'hold')::uuid) AS once
        FROM jsonb_array_elements(p_items) x
        GROUP BY 1
    )
    SELECT (SELECT array_agg(DISTINCT s.id) FROM locked l
            CROSS JOIN LATERAL (VALUES (l.subject_id), (l.member_id)) AS s(id) WHERE s.id IS NOT NULL),
           (SELECT coalesce(array_agg(DISTINCT l.member_id) FILTER (WHERE l.member_id IS NOT NULL), '{}')
            FROM locked l),
           array_agg(a.subject) FILTER (WHERE a.once AND NOT EXISTS (
               SELECT 1 FROM locked l
               WHERE l.member_id IS NOT NULL AND a.subject IN (l.subject_id, l.member_id))),
           count(*)
    INTO v_accounts, v_members, v_sets, v_subjects
    FROM account a;
    IF v_accounts IS NULL THEN
        RETURN;  -- no hold of the batch exists: nothing to resolve
    END IF;
    PERFORM 1 FROM credits.credit_accounts a
    WHERE a.subject_id = ANY (v_accounts)
    ORDER BY a.parent_id IS NULL AND NOT a.subject_id = ANY (v_members), a.subject_id COLLATE "C"
    FOR NO KEY UPDATE;

    -- Nor an account this batch could take across an alert threshold: an alert reports the
    -- balance or the month's spend at its crossing, which one by one is each item's. So the set
    -- path is for an account without a monthly cap whose balance, less the most its items can
    -- charge, stays above zero and at or above its highest balance.low threshold (the alert
    -- trigger then does not even run).
    IF v_sets IS NOT NULL THEN
        SELECT array_agg(a.subject_id) INTO v_sets
        FROM credits.credit_accounts a
        JOIN (SELECT q.subject, sum(coalesce(q.charge, h.amount)) AS most
              FROM jsonb_populate_recordset(NULL::credits.resolve_item, p_items) q
              JOIN credits.holds h ON h.subject_id = q.subject AND h.id = q.hold
              WHERE q.subject = ANY (v_sets)
              GROUP BY q.subject) c ON c.subject = a.subject_id
        WHERE a.monthly_cap IS NULL AND a.balance - c.most >= greatest(a.alert_ceiling, 1);
    END IF;

    IF v_sets IS NOT NULL THEN
        -- Their holds end (an open one, or an expired one settled late: see resolve_hold); each
        -- account's balance and counters move once by the sum of its items; its first grant in
        -- burn order pays all its charges when it covers them (see credits.burn_first_grant).
        WITH item AS (
            SELECT (e.o - 1)::integer AS i, q.*
            FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o)
            CROSS JOIN LATERAL jsonb_populate_record(NULL::credits.resolve_item, e.item) AS q
            WHERE q.subject = ANY (v_sets)
        ), prior AS (
            SELECT item.*, y.status AS was, y.amount AS held_amount, y.debits AS hold_debits,
                   y.power_level AS hold_power
            FROM item JOIN credits.holds y ON y.subject_id = item.subject AND y.id = item.hold
            WHERE y.status = 'open' OR (item.status = 'settled' AND y.status = 'expired')
        ), ended AS (
            UPDATE credits.holds x SET
                status = p.status, resolved_at = now(), settled_amount = coalesce(p.charge, x.amount)
            FROM prior p
            WHERE x.subject_id = p.subject AND x.id = p.hold
            RETURNING p.*
        ), e AS (
            SELECT ROW(
                       n.i, n.subject, n.hold, c.charge,
                       CASE WHEN n.hold_debits THEN c.charge ELSE 0 END,
                       CASE WHEN n.hold_debits AND n.was = 'open' THEN n.held_amount ELSE 0 END,
                       n.hold_debits, n.hold_power, n.usage_status, n.service, n.model, n.provider,
                       n.prompt, n.completion, n.cached, n.reasoning, n.cost, n.latency, n.metadata
                   )::credits.batch_ended AS d
            FROM ended n CROSS JOIN LATERAL (SELECT coalesce(n.charge, n.held_amount)) AS c(charge)
        ), account AS (
            SELECT (e.d).subject, sum((e.d).spent) AS spent, sum((e.d).release) AS release
            FROM e
            GROUP BY 1
        ), moved AS (
            UPDATE credits.credit_accounts a SET
                balance     = a.balance - s.spent,
                held        = a.held - s.release,
                month_spend = CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END + s.spent,
                month_start = greatest(a.month_start, v_month),
                day_spend   = CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END + s.spent,
                day_start   = greatest(a.day_start, v_day)
            FROM account s
            WHERE a.subject_id = s.subject
            RETURNING a.subject_id, a.balance
        ), burnt AS (
            UPDATE credits.grants g SET
                remaining = g.remaining - s.spent,
                status    = CASE WHEN g.remaining = s.spent THEN 'used' ELSE 'live' END
            FROM account s
            CROSS JOIN LATERAL (
                SELECT f.id FROM credits.grants f
                WHERE f.subject_id = s.subject AND f.status = 'live'
                ORDER BY coalesce(f.expires_at <= now(), false) DESC, f.priority, f.expires_at NULLS LAST, f.id
                LIMIT 1) first
            WHERE s.spent > 0 AND g.subject_id = s.subject AND g.id = first.id AND g.remaining >= s.spent
            RETURNING g.subject_id, g.id
        )
        SELECT (SELECT array_agg(e.d ORDER BY (e.d).idx) FROM e),
               (SELECT jsonb_object_agg(moved.subject_id, moved.balance) FROM moved),
               (SELECT coalesce(jsonb_object_agg(burnt.subject_id, burnt.id), '{}') FROM burnt),
               (SELECT count(*) FROM account WHERE account.spent > 0) - (SELECT count(*) FROM burnt)
        INTO v_ended, v_balances, v_grants, v_unpaid;
    END IF;

    IF v_ended IS NOT NULL THEN
        -- An account whose first grant does not cover its charges: each ledger row on its own, in
        -- order, through the grant triggers (they burn across grants, then the overrun).
        IF v_unpaid > 0 THEN
            FOR r IN
                SELECT d.*, (v_balances ->> d.subject)::bigint
                            + coalesce(sum(d.spent) OVER (PARTITION BY d.subject ORDER BY d.idx
                                       ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0)::bigint
                            AS balance_after
                FROM unnest(v_ended) d
                WHERE d.spent > 0 AND NOT v_grants ? d.subject
                ORDER BY d.idx
            LOOP
                INSERT INTO credits.credit_transactions
                    (subject_id, amount, balance_after, type, idempotency_key, hold_id, model, provider,
                     power_level, prompt_tokens, completion_tokens, metadata)
                VALUES (r.subject, -r.spent, r.balance_after, 'usage', 'hold:' || r.hold::text, r.hold,
                        r.model, r.provider, r.power_level, r.prompt, r.completion, r.metadata)
                RETURNING id INTO v_id;
                v_tx := v_tx || jsonb_build_object(r.subject || ' ' || r.hold::text, v_id);
            END LOOP;
        END IF;

        -- The other ledger rows and every usage event, and the answers: an item's balance is its
        -- account's after the batch plus what the account's later items charged (so is a ledger
        -- row's balance_after).
        RETURN QUERY
        WITH d AS (
            SELECT x.*, (v_balances ->> x.subject)::bigint
                        + coalesce(sum(x.spent) OVER (PARTITION BY x.subject ORDER BY x.idx
                                   ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0)::bigint
                        AS balance_after
            FROM unnest(v_ended) x
        ), written AS (
            INSERT INTO credits.credit_transactions AS t
                (subject_id, amount, balance_after, type, idempotency_key, hold_id, model, provider,
                 power_level, prompt_tokens, completion_tokens, metadata, grant_id)
            SELECT d.subject, -d.spent, d.balance_after, 'usage', 'hold:' || d.hold::text, d.hold,
                   d.model, d.provider, d.power_level, d.prompt, d.completion, d.metadata,
                   (v_grants ->> d.subject)::bigint
            FROM d
            WHERE d.spent > 0 AND v_grants ? d.subject
            ORDER BY d.idx
            RETURNING t.subject_id, t.hold_id, t.id
        ), tx AS (
            SELECT d.idx, coalesce(w.id, (v_tx ->> (d.subject || ' ' || d.hold::text))::bigint) AS id
            FROM d LEFT JOIN written w ON w.subject_id = d.subject AND w.hold_id = d.hold
        ), events AS (
            INSERT INTO credits.usage_events AS e
                (subject_id, request_id, service, model, provider, power_level, prompt_tokens,
                 completion_tokens, cached_tokens, reasoning_tokens, cost, charged, latency_ms, status,
                 transaction_id, metadata)
            SELECT d.subject, d.hold::text, d.service, d.model, d.provider, d.power_level, d.prompt,
                   d.completion, d.cached, d.reasoning, coalesce(d.cost, d.charge), d.spent, d.latency,
                   d.usage_status, tx.id, d.metadata
            FROM d JOIN tx ON tx.idx = d.idx
            ORDER BY d.idx
            ON CONFLICT (subject_id, request_id) DO UPDATE SET
                status = EXCLUDED.status, model = EXCLUDED.model, provider = EXCLUDED.provider,
                prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
                cached_tokens = EXCLUDED.cached_tokens, reasoning_tokens = EXCLUDED.reasoning_tokens,
                cost = EXCLUDED.cost, charged = EXCLUDED.charged, latency_ms = EXCLUDED.latency_ms,
                transaction_id = EXCLUDED.transaction_id, metadata = e.metadata || EXCLUDED.metadata
        )
        SELECT d.idx, d.balance_after, d.charge, d.debits, tx.id, NULL::text
        FROM d JOIN tx ON tx.idx = d.idx;
    END IF;
    IF cardinality(v_sets) = v_subjects THEN
        RETURN;  -- every item's account was resolved as a set
    END IF;

    -- the rest, one by one in arrival order
    FOR r IN
        SELECT (e.o - 1)::integer AS i, q.*
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o)
        CROSS JOIN LATERAL jsonb_populate_record(NULL::credits.resolve_item, e.item) AS q
        WHERE v_sets IS NULL OR NOT q.subject = ANY (v_sets)
        ORDER BY e.o
    LOOP
        RETURN QUERY SELECT r.i, t.* FROM credits.resolve_hold(
            r.subject, r.hold, r.charge, r.status, r.usage_status, r.service, r.model, r.provider,
            r.prompt, r.completion, r.cached, r.reasoning, r.cost, r.latency, r.metadata) t;
    END LOOP;
END
$$;

-- The rollup's upsert, in one place: rows of amounts to add (one per account and day), in key
-- order (concurrent statements lock the rollup's rows in one order).
CREATE FUNCTION credits.usage_daily_add_rows(p_rows credits.usage_daily[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO credits.usage_daily AS d
        (subject_id, day, requests, succeeded, failed, prompt_tokens, completion_tokens, cost, charged)
    SELECT r.* FROM unnest(p_rows) r
    ORDER BY r.subject_id COLLATE "C", r.day
    ON CONFLICT (subject_id, day) DO UPDATE SET
        requests          = d.requests + EXCLUDED.requests,
        succeeded         = d.succeeded + EXCLUDED.succeeded,
        failed            = d.failed + EXCLUDED.failed,
        prompt_tokens     = d.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
        cost              = d.cost + EXCLUDED.cost,
        charged           = d.charged + EXCLUDED.charged;
END
$$;

-- One event in (sign 1) or out (-1) of the rollup: the row trigger's, for updates and deletes.
CREATE OR REPLACE FUNCTION credits.usage_daily_apply(e credits.usage_events, sign integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM credits.usage_daily_add_rows(ARRAY[ROW(
        e.subject_id, (e.created_at AT TIME ZONE 'UTC')::date, sign,
        CASE WHEN e.status = 'success' THEN sign ELSE 0 END,
        CASE WHEN e.status = 'success' THEN 0 ELSE sign END,
        sign * e.prompt_tokens, sign * e.completion_tokens, sign * e.cost, sign * e.charged
    )::credits.usage_daily]);
END
$$;

-- The daily rollup of inserted events, per statement: the rows a statement inserted, summed per
-- account and day, in one upsert. Updates and deletes (a late settlement's upsert of its event)
-- keep the row trigger.
CREATE FUNCTION credits.usage_daily_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM credits.usage_daily_add_rows(ARRAY(
        SELECT ROW(e.subject_id, (e.created_at AT TIME ZONE 'UTC')::date, count(*),
                   count(*) FILTER (WHERE e.status = 'success'),
                   count(*) FILTER (WHERE e.status <> 'success'),
                   sum(e.prompt_tokens), sum(e.completion_tokens), sum(e.cost), sum(e.charged)
               )::credits.usage_daily
        FROM inserted e
        GROUP BY e.subject_id, (e.created_at AT TIME ZONE 'UTC')::date));
    RETURN NULL;
END
$$;
DROP TRIGGER usage_events_daily ON credits.usage_events;
CREATE TRIGGER usage_events_daily_insert AFTER INSERT ON credits.usage_events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION credits.usage_daily_add();
CREATE TRIGGER usage_events_daily AFTER UPDATE OR DELETE ON credits.usage_events
    FOR EACH ROW EXECUTE FUNCTION credits.usage_daily_track();
