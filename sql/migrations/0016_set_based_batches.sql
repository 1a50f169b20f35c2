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
-- - holds: an account paying for itself (not a team member), active, no credit due to expire,
--   every item a freshly minted id, and the sum of its items fitting every limit of the account
--   (then each item, taken in order, fits too: the amounts are never negative). One update of
--   its row with that sum, one insert of its holds.
-- - resolutions: an account none of whose holds in the batch a team member made, and no hold twice
--   in the batch. One update of its holds, one of its row with what they charge and release, one
--   burn of its first grant in burn order when that grant covers them all (else each ledger row
--   goes through the grant triggers on its own, in order, as before); its ledger rows and usage
--   events in one insert each. The ledger rows' balance_after follow the items' order.
-- The results are the single-item functions' results, row for row.
--
-- Every row a batch touches is found by its key: the functions run with sequential scans, hash
-- and merge joins off, so the plans stay probes by key whatever the tables' size when planned.
--
-- The daily usage rollup becomes statement-level (transition tables): one upsert per account and
-- day per statement, instead of a function call and an upsert per usage event.

CREATE TYPE credits.batch_hold AS (
    idx integer, outcome text, payer_id text, tier text, amount bigint, debits boolean,
    expires_at timestamptz, request_hash bytea, room bigint, quoted bigint, seen jsonb
);

-- A hold ended by a batch, with what it moves (spent: what the account pays; release: what it
-- held that it gives back).
CREATE TYPE credits.batch_ended AS (
    idx integer, subject text, hold uuid, charge bigint, spent bigint, release bigint,
    debits boolean, power_level text, usage_status text, service text, model text, provider text,
    prompt bigint, completion bigint, cached bigint, reasoning bigint, cost bigint,
    latency integer, metadata jsonb
);

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
    v_taken text[];                 -- the accounts whose holds were taken as a set
    v_rows  credits.batch_hold[];   -- their answers
    r       record;
BEGIN
    PERFORM credits.lock_accounts(ARRAY(SELECT DISTINCT x->>'subject' FROM jsonb_array_elements(p_items) x));

    WITH item AS (
        -- each item with its account's quote (take_hold's choice: the account's tier, if quoted,
        -- else the default tier)
        SELECT (e.o - 1)::integer AS i, q.subject, q.hold, q.ttl, q.model, q.power_level,
               q.request_hash, q.fresh, a.tier, q.amounts[t.n] AS amount, q.debits[t.n] AS debits
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o)
        CROSS JOIN LATERAL jsonb_to_record(e.item) AS q(
            subject text, hold uuid, tiers text[], amounts bigint[], debits boolean[],
            default_tier text, ttl integer, model text, power_level text, request_hash bytea,
            fresh boolean)
        CROSS JOIN LATERAL (SELECT a.tier FROM credits.credit_accounts a WHERE a.subject_id = q.subject) a
        CROSS JOIN LATERAL (
            SELECT array_position(q.tiers, CASE WHEN a.tier = ANY (q.tiers) THEN a.tier ELSE q.default_tier END)
        ) AS t(n)
    ), account AS (
        SELECT item.subject, coalesce(sum(item.amount) FILTER (WHERE item.debits), 0) AS total,
               max(item.amount) FILTER (WHERE item.debits) AS biggest
        FROM item
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
    SELECT (SELECT array_agg(taken.subject_id) FROM taken),
           (SELECT array_agg(ROW(item.i, 'held', item.subject, item.tier, item.amount, item.debits,
                                 held.expires_at, item.request_hash, NULL, item.amount, NULL)::credits.batch_hold)
            FROM item JOIN held ON held.subject_id = item.subject AND held.id = item.hold)
    INTO v_taken, v_rows;
    RETURN QUERY SELECT * FROM unnest(v_rows);

    -- the rest, one by one in arrival order (an account's items all here or all above)
    FOR r IN
        SELECT (e.o - 1)::integer AS i, q.*
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o),
             jsonb_to_record(e.item) AS q(
                 subject text, hold uuid, tiers text[], amounts bigint[], minimums bigint[],
                 debits boolean[], default_tier text, ttl integer, model text, power_level text,
                 request_hash bytea, fresh boolean)
        WHERE v_taken IS NULL OR NOT q.subject = ANY (v_taken)
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
    v_teams    text[];  -- payers of a member's hold in the batch
    v_sets     text[];  -- the accounts resolved as a set
    v_ended    credits.batch_ended[];
    v_balances jsonb;   -- {account: its balance after the batch}
    v_grants   jsonb;   -- {account: the grant that paid all its charges}
    v_tx       jsonb;   -- {hold: its ledger row}
    v_id       bigint;
    r          record;
BEGIN
    -- the holds' rows first, in (subject, id) order, each found by its key; then the payers and
    -- the members whose holds they are (see migration 0014)
    SELECT array_agg(DISTINCT s.id),
           coalesce(array_agg(DISTINCT l.member_id) FILTER (WHERE l.member_id IS NOT NULL), '{}'),
           coalesce(array_agg(DISTINCT l.subject_id) FILTER (WHERE l.member_id IS NOT NULL), '{}')
    INTO v_accounts, v_members, v_teams
    FROM (SELECT h.subject_id, h.member_id
          FROM (SELECT DISTINCT x->>'subject' AS subject, (x->>'hold')::uuid AS hold
                FROM jsonb_array_elements(p_items) x) q
          JOIN credits.holds h ON h.subject_id = q.subject AND h.id = q.hold
          ORDER BY h.subject_id COLLATE "C", h.id
          FOR NO KEY UPDATE OF h) l
    CROSS JOIN LATERAL (VALUES (l.subject_id), (l.member_id)) AS s(id)
    WHERE s.id IS NOT NULL;
    IF v_accounts IS NULL THEN
        RETURN;  -- no hold of the batch exists: nothing to resolve
    END IF;
    PERFORM 1 FROM credits.credit_accounts a
    WHERE a.subject_id = ANY (v_accounts)
    ORDER BY a.parent_id IS NULL AND NOT a.subject_id = ANY (v_members), a.subject_id COLLATE "C"
    FOR NO KEY UPDATE;

    SELECT array_agg(s.subject) INTO v_sets
    FROM (SELECT x.subject
          FROM (SELECT x->>'subject' AS subject, x->>'hold' AS hold FROM jsonb_array_elements(p_items) x) x
          WHERE NOT x.subject = ANY (v_teams)
          GROUP BY x.subject
          HAVING count(*) = count(DISTINCT x.hold)) s;

    IF v_sets IS NOT NULL THEN
        -- their holds end: an open one, or an expired one settled late (see resolve_hold)
        WITH item AS (
            SELECT (e.o - 1)::integer AS i, q.*
            FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o)
            CROSS JOIN LATERAL jsonb_to_record(e.item) AS q(
                subject text, hold uuid, charge bigint, status text, usage_status text,
                service text, model text, provider text, prompt bigint, completion bigint,
                cached bigint, reasoning bigint, cost bigint, latency integer, metadata jsonb)
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
        )
        SELECT array_agg(ROW(
                   e.i, e.subject, e.hold, c.charge,
                   CASE WHEN e.hold_debits THEN c.charge ELSE 0 END,
                   CASE WHEN e.hold_debits AND e.was = 'open' THEN e.held_amount ELSE 0 END,
                   e.hold_debits, e.hold_power, e.usage_status, e.service, e.model, e.provider,
                   e.prompt, e.completion, e.cached, e.reasoning, e.cost, e.latency, e.metadata
               )::credits.batch_ended ORDER BY e.i)
        INTO v_ended
        FROM ended e CROSS JOIN LATERAL (SELECT coalesce(e.charge, e.held_amount)) AS c(charge);
    END IF;

    IF v_ended IS NOT NULL THEN
        -- each account once, with the sum of its items; its first grant in burn order pays
        -- them all when it covers them all (see credits.burn_first_grant)
        WITH account AS (
            SELECT d.subject, sum(d.spent) AS spent, sum(d.release) AS release
            FROM unnest(v_ended) d
            GROUP BY d.subject
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
        SELECT (SELECT jsonb_object_agg(moved.subject_id, moved.balance) FROM moved),
               (SELECT coalesce(jsonb_object_agg(burnt.subject_id, burnt.id), '{}') FROM burnt)
        INTO v_balances, v_grants;

        -- the ledger rows: balance_after is the account's balance after the batch plus what its
        -- later items charged
        WITH row_ AS (
            SELECT d.*, (v_balances ->> d.subject)::bigint
                        + coalesce(sum(d.spent) OVER (PARTITION BY d.subject ORDER BY d.idx
                                                      ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0)::bigint
                        AS balance_after,
                   (v_grants ->> d.subject)::bigint AS grant_id
            FROM unnest(v_ended) d
            WHERE d.spent > 0
        ), written AS (
            INSERT INTO credits.credit_transactions AS t
                (subject_id, amount, balance_after, type, idempotency_key, hold_id, model, provider,
                 power_level, prompt_tokens, completion_tokens, metadata, grant_id)
            SELECT w.subject, -w.spent, w.balance_after, 'usage', 'hold:' || w.hold::text, w.hold,
                   w.model, w.provider, w.power_level, w.prompt, w.completion, w.metadata, w.grant_id
            FROM row_ w
            WHERE w.grant_id IS NOT NULL
            ORDER BY w.idx
            RETURNING t.hold_id, t.id
        )
        SELECT coalesce(jsonb_object_agg(written.hold_id, written.id), '{}') INTO v_tx FROM written;

        -- an account whose first grant does not cover its items: each row on its own, in order,
        -- through the grant triggers (they burn across grants, then the overrun)
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
            v_tx := v_tx || jsonb_build_object(r.hold::text, v_id);
        END LOOP;

        INSERT INTO credits.usage_events AS e
            (subject_id, request_id, service, model, provider, power_level, prompt_tokens,
             completion_tokens, cached_tokens, reasoning_tokens, cost, charged, latency_ms, status,
             transaction_id, metadata)
        SELECT d.subject, d.hold::text, d.service, d.model, d.provider, d.power_level, d.prompt,
               d.completion, d.cached, d.reasoning, coalesce(d.cost, d.charge), d.spent, d.latency,
               d.usage_status, (v_tx ->> d.hold::text)::bigint, d.metadata
        FROM unnest(v_ended) d
        ORDER BY d.idx
        ON CONFLICT (subject_id, request_id) DO UPDATE SET
            status = EXCLUDED.status, model = EXCLUDED.model, provider = EXCLUDED.provider,
            prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
            cached_tokens = EXCLUDED.cached_tokens, reasoning_tokens = EXCLUDED.reasoning_tokens,
            cost = EXCLUDED.cost, charged = EXCLUDED.charged, latency_ms = EXCLUDED.latency_ms,
            transaction_id = EXCLUDED.transaction_id, metadata = e.metadata || EXCLUDED.metadata;

        RETURN QUERY
        SELECT d.idx,
               (v_balances ->> d.subject)::bigint
                   + coalesce(sum(d.spent) OVER (PARTITION BY d.subject ORDER BY d.idx
                                                 ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0)::bigint,
               d.charge, d.debits, (v_tx ->> d.hold::text)::bigint, NULL::text
        FROM unnest(v_ended) d;
    END IF;

    -- the rest, one by one in arrival order
    FOR r IN
        SELECT (e.o - 1)::integer AS i, q.*
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o),
             jsonb_to_record(e.item) AS q(
                 subject text, hold uuid, charge bigint, status text, usage_status text,
                 service text, model text, provider text, prompt bigint, completion bigint,
                 cached bigint, reasoning bigint, cost bigint, latency integer, metadata jsonb)
        WHERE v_sets IS NULL OR NOT q.subject = ANY (v_sets)
        ORDER BY e.o
    LOOP
        RETURN QUERY SELECT r.i, t.* FROM credits.resolve_hold(
            r.subject, r.hold, r.charge, r.status, r.usage_status, r.service, r.model, r.provider,
            r.prompt, r.completion, r.cached, r.reasoning, r.cost, r.latency, r.metadata) t;
    END LOOP;
END
$$;

-- The daily rollup of inserted events, per statement: the rows a statement inserted, summed per
-- account and day, in one upsert (in key order: concurrent statements lock the rollup's rows in one
-- order). Updates and deletes (a late settlement's upsert of its event) keep the row trigger.
CREATE FUNCTION credits.usage_daily_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO credits.usage_daily AS d
        (subject_id, day, requests, succeeded, failed, prompt_tokens, completion_tokens, cost, charged)
    SELECT e.subject_id, (e.created_at AT TIME ZONE 'UTC')::date, count(*),
           count(*) FILTER (WHERE e.status = 'success'), count(*) FILTER (WHERE e.status <> 'success'),
           sum(e.prompt_tokens), sum(e.completion_tokens), sum(e.cost), sum(e.charged)
    FROM inserted e
    GROUP BY e.subject_id, 2
    ORDER BY e.subject_id COLLATE "C", 2
    ON CONFLICT (subject_id, day) DO UPDATE SET
        requests          = d.requests + EXCLUDED.requests,
        succeeded         = d.succeeded + EXCLUDED.succeeded,
        failed            = d.failed + EXCLUDED.failed,
        prompt_tokens     = d.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
        cost              = d.cost + EXCLUDED.cost,
        charged           = d.charged + EXCLUDED.charged;
    RETURN NULL;
END
$$;
DROP TRIGGER usage_events_daily ON credits.usage_events;
CREATE TRIGGER usage_events_daily_insert AFTER INSERT ON credits.usage_events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION credits.usage_daily_add();
CREATE TRIGGER usage_events_daily AFTER UPDATE OR DELETE ON credits.usage_events
    FOR EACH ROW EXECUTE FUNCTION credits.usage_daily_track();
