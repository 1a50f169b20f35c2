-- Team pools, caps per day and per request, and holds that fit what is left.
--
-- A member account spends from its team (parent_id): the team's balance pays, the request must
-- fit every limit of the member and of the team, and the hold, the ledger row and the money are
-- the team's (keyed by the team's subject_id, like every money row), with member_id naming who
-- made the request. The member's own row keeps its caps and what it holds and spent of them.
-- Two levels only: a team is never a member, a member never has members (a trigger, below).
--
-- The hold and the settlement become functions (credits.take_hold, credits.resolve_hold): one
-- statement each from the client, as before, with their rules in one readable place. They, and
-- the trigger below, rely on READ COMMITTED (PostgreSQL's default): each statement sees what
-- committed before it, and a conditional UPDATE re-checks the newest version of a row it waited
-- for. Do not run them under REPEATABLE READ or SERIALIZABLE.

-- (Constraints on existing tables are added NOT VALID: they hold for every new row, and adding
-- them does not scan a large table under its lock; the new columns are NULL in every old row.)
ALTER TABLE credits.credit_accounts
    ADD COLUMN parent_id   text,
    ADD COLUMN daily_cap   bigint CHECK (daily_cap IS NULL OR daily_cap >= 0),
    ADD COLUMN request_cap bigint CHECK (request_cap IS NULL OR request_cap >= 0),
    -- what the account paid (a team: its members' requests too) or, for a member, spent of its
    -- team's credits, on the UTC day day_start; rolled forward lazily like month_spend
    ADD COLUMN day_spend   bigint NOT NULL DEFAULT 0 CHECK (day_spend >= 0),
    ADD COLUMN day_start   date   NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')::date,
    ADD CONSTRAINT credit_accounts_parent FOREIGN KEY (parent_id)
        REFERENCES credits.credit_accounts (subject_id) NOT VALID,
    ADD CONSTRAINT credit_accounts_not_own_parent CHECK (parent_id <> subject_id) NOT VALID;
CREATE INDEX credit_accounts_members ON credits.credit_accounts (parent_id, subject_id)
    WHERE parent_id IS NOT NULL;

-- updated_at is when an account's balance or settings last changed, not its holds: the trigger
-- no longer runs on every hold and settlement's update of held and spend (a function call each,
-- and a team member's request makes two).
DROP TRIGGER credit_accounts_updated_at ON credits.credit_accounts;
CREATE TRIGGER credit_accounts_updated_at
    BEFORE UPDATE OF balance, tier, monthly_cap, daily_cap, request_cap, status, display_name,
        parent_id, metadata
    ON credits.credit_accounts
    FOR EACH ROW EXECUTE FUNCTION credits.touch_updated_at();

-- SQLSTATE CR002: a team hierarchy deeper than two levels (mapped by code in Python).
CREATE FUNCTION credits.check_team_levels() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    grandparent text;
BEGIN
    -- the lock orders this against a concurrent move of the team itself (each statement here
    -- sees what committed before it, so one of two racing moves always sees the other)
    SELECT parent_id INTO grandparent FROM credits.credit_accounts
    WHERE subject_id = NEW.parent_id FOR NO KEY UPDATE;
    IF grandparent IS NOT NULL THEN
        RAISE EXCEPTION 'credits: % is itself a member of %; teams have two levels', NEW.parent_id,
            grandparent USING ERRCODE = 'CR002';
    END IF;
    IF EXISTS (SELECT 1 FROM credits.credit_accounts WHERE parent_id = NEW.subject_id) THEN
        RAISE EXCEPTION 'credits: % has members and cannot join a team', NEW.subject_id
            USING ERRCODE = 'CR002';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER credit_accounts_team_levels
    BEFORE INSERT OR UPDATE OF parent_id ON credits.credit_accounts
    FOR EACH ROW WHEN (NEW.parent_id IS NOT NULL) EXECUTE FUNCTION credits.check_team_levels();

-- who made a team's request (NULL when the account paid for its own)
ALTER TABLE credits.holds ADD COLUMN member_id text,
    ADD CONSTRAINT holds_member FOREIGN KEY (member_id)
        REFERENCES credits.credit_accounts (subject_id) NOT VALID;
CREATE INDEX holds_by_member ON credits.holds (member_id, id) WHERE member_id IS NOT NULL;
ALTER TABLE credits.credit_transactions ADD COLUMN member_id text,
    ADD CONSTRAINT credit_transactions_member FOREIGN KEY (member_id)
        REFERENCES credits.credit_accounts (subject_id) NOT VALID;
CREATE INDEX credit_transactions_by_member ON credits.credit_transactions (subject_id, member_id, created_at)
    WHERE member_id IS NOT NULL;
-- usage is recorded under the account that made the request; payer_id names its team
ALTER TABLE credits.usage_events ADD COLUMN payer_id text;
CREATE INDEX usage_events_by_payer ON credits.usage_events (payer_id, created_at)
    WHERE payer_id IS NOT NULL;

-- a key's own choice of what a request that does not fit does (NULL: its tier decides)
ALTER TABLE credits.api_keys ADD COLUMN when_short text CHECK (when_short IN ('refuse', 'clamp'));

-- How much of `amount` a request may hold when `room` is left under its tightest limit (NULL:
-- no limit): all of it, else the room itself when that is at least `minimum` (a clamped hold;
-- NULL minimum: never clamp), else NULL (refused). A zero amount always fits.
CREATE FUNCTION credits.fit(amount bigint, minimum bigint, room bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN amount = 0 OR room IS NULL OR room >= amount THEN amount
        WHEN minimum IS NOT NULL AND room >= minimum THEN room
    END
$$;

-- An account's limits as a refused hold saw them, under its lock: what the 402 reports (a read
-- after the statement could already see another request's hold released).
CREATE FUNCTION credits.limits_seen(a credits.credit_accounts, p_month date, p_day date) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'balance', a.balance, 'held', a.held, 'monthly_cap', a.monthly_cap,
        'month_spend', CASE WHEN a.month_start < p_month THEN 0 ELSE a.month_spend END,
        'daily_cap', a.daily_cap,
        'day_spend', CASE WHEN a.day_start < p_day THEN 0 ELSE a.day_spend END,
        'request_cap', a.request_cap)
$$;

-- Takes a hold. The amount depends on the paying account's tier (its markup, or no debit on an
-- unlimited tier), so the caller quotes every tier: p_tiers, p_amounts, p_minimums (the least a
-- clamped hold may take; NULL: refuse what does not fit), p_debits; p_default_tier for a tier
-- not quoted.
--
-- p_fresh: the caller has just minted the id (a random UUID, first attempt): no hold can have it,
-- so it is not looked for (a retry, or an id derived from a key, is never fresh).
--
-- Returns one row. outcome 'held' or 'replayed' (a hold with this id exists: returned as it is,
-- before any balance, cap or status is looked at, so a retry is never refused for the credits
-- its first attempt took), with payer_id, tier, amount (what was held: less than quoted when
-- clamped), debits, expires_at, request_hash. Otherwise the refusal: 'no_account', 'disabled',
-- 'team_disabled', or the first limit the request does not fit ('balance', 'monthly', 'daily',
-- 'request', and 'team_' ones for a member's team), with room (the least any limit leaves: what
-- the request could have held), quoted, and seen: the request's account and the account that
-- pays, as the refusal saw them (credits.limits_seen).
CREATE FUNCTION credits.take_hold(
    p_subject text, p_hold uuid, p_tiers text[], p_amounts bigint[], p_minimums bigint[],
    p_debits boolean[], p_default_tier text, p_ttl integer, p_model text, p_power_level text,
    p_request_hash bytea, p_fresh boolean
) RETURNS TABLE (
    outcome text, payer_id text, tier text, amount bigint, debits boolean,
    expires_at timestamptz, request_hash bytea, room bigint, quoted bigint, seen jsonb
)
LANGUAGE plpgsql AS $$
DECLARE
    v_month   date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    v_day     date := (now() AT TIME ZONE 'UTC')::date;
    m         credits.credit_accounts;  -- the account the request is for
    p         credits.credit_accounts;  -- the account that pays: m, or its team
    v_team    boolean;
    v_caps    bigint;  -- what a member's own caps leave it (NULL: no cap)
    v_i       integer;
    v_tier    text;
    v_quote   bigint;
    v_min     bigint;
    v_debits  boolean;
    v_amount  bigint;
    v_room    bigint;
    v_limit   text;
    v_expires timestamptz;
    v_found   record;
    v_member  boolean := false;  -- a hold with this id made by this account as a team's member
BEGIN
    -- No statement below tests p_fresh itself: a parameter that folds away in a custom plan
    -- keeps PostgreSQL planning every call afresh (0.1 ms a hold); plpgsql's IF decides instead.
    IF NOT p_fresh THEN
        -- a hold this account made as a team's member (it left the team since) is that hold:
        -- the locked path below answers with it (a probe of a partial index: members' holds)
        v_member := EXISTS (SELECT 1 FROM credits.holds x WHERE x.member_id = p_subject AND x.id = p_hold);
    END IF;

    -- The common case in one conditional update: an account paying for itself, the whole
    -- quote fitting every limit.
    IF NOT v_member THEN
        UPDATE credits.credit_accounts a SET
            held        = a.held + CASE WHEN q.debits THEN q.amount ELSE 0 END,
            month_spend = CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END,
            month_start = greatest(a.month_start, v_month),
            day_spend   = CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END,
            day_start   = greatest(a.day_start, v_day)
        FROM unnest(p_tiers, p_amounts, p_debits) AS q(tier, amount, debits)
        WHERE a.subject_id = p_subject
          AND a.parent_id IS NULL
          AND a.status = 'active'
          AND q.tier = CASE WHEN a.tier = ANY (p_tiers) THEN a.tier ELSE p_default_tier END
          AND (NOT q.debits OR q.amount = 0 OR (
                   a.balance - a.held >= q.amount
               AND (a.monthly_cap IS NULL OR a.monthly_cap
                    - CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END - a.held >= q.amount)
               AND (a.daily_cap IS NULL OR a.daily_cap
                    - CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END - a.held >= q.amount)
               AND (a.request_cap IS NULL OR a.request_cap >= q.amount)))
        RETURNING a.tier, q.amount, q.debits INTO v_tier, v_amount, v_debits;
        IF FOUND THEN
            INSERT INTO credits.holds AS h
                (id, subject_id, amount, debits, expires_at, model, power_level, request_hash)
            VALUES (p_hold, p_subject, v_amount, v_debits, now() + p_ttl * interval '1 second', p_model,
                    p_power_level, p_request_hash)
            ON CONFLICT (subject_id, id) DO NOTHING
            RETURNING h.expires_at INTO v_expires;
            IF FOUND THEN
                RETURN QUERY SELECT 'held', p_subject, v_tier, v_amount, v_debits, v_expires,
                                    p_request_hash, NULL::bigint, v_amount, NULL::jsonb;
                RETURN;
            END IF;
            -- the id was taken before (a retry after a lost reply, or a twin attempt that committed
            -- first): give back what this attempt held, and answer with that hold below
            UPDATE credits.credit_accounts a
            SET held = a.held - CASE WHEN v_debits THEN v_amount ELSE 0 END
            WHERE a.subject_id = p_subject;
        END IF;
    END IF;

    -- Everything else with the account locked; a member's row before its team's (the order
    -- every statement that changes both follows, so none can deadlock on them). NO KEY UPDATE,
    -- the lock an UPDATE takes: rows that refer to the account (holds, ledger rows) can still be
    -- written meanwhile. The same statement looks for a hold with this id that the account made:
    -- on its own, or as a member of a team (its team now, or one it left since).
    IF p_fresh THEN
        SELECT a AS acct, NULL::text AS payer, NULL::bigint AS amount, NULL::boolean AS debits,
               NULL::timestamptz AS expires_at, NULL::bytea AS request_hash
        INTO v_found
        FROM credits.credit_accounts a
        WHERE a.subject_id = p_subject
        FOR NO KEY UPDATE OF a;
    ELSE
        SELECT a AS acct, x.subject_id AS payer, x.amount, x.debits, x.expires_at, x.request_hash
        INTO v_found
        FROM credits.credit_accounts a
        LEFT JOIN LATERAL (
            SELECT y.subject_id, y.amount, y.debits, y.expires_at, y.request_hash
            FROM credits.holds y
            WHERE y.id = p_hold
              AND ((y.subject_id = p_subject AND y.member_id IS NULL) OR y.member_id = p_subject)
            LIMIT 1
        ) x ON true
        WHERE a.subject_id = p_subject
        FOR NO KEY UPDATE OF a;
    END IF;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_account', NULL::text, NULL::text, NULL::bigint, NULL::boolean,
                            NULL::timestamptz, NULL::bytea, NULL::bigint, NULL::bigint, NULL::jsonb;
        RETURN;
    END IF;
    m := v_found.acct;
    v_team := m.parent_id IS NOT NULL;
    IF v_found.payer IS NOT NULL THEN  -- that hold, as it is
        RETURN QUERY SELECT 'replayed', v_found.payer, t.tier, v_found.amount, v_found.debits,
                            v_found.expires_at, v_found.request_hash, NULL::bigint, v_found.amount,
                            NULL::jsonb
                     FROM credits.credit_accounts t WHERE t.subject_id = v_found.payer;
        RETURN;
    END IF;
    IF m.status <> 'active' THEN
        RETURN QUERY SELECT 'disabled', NULL::text, m.tier, NULL::bigint, NULL::boolean,
                            NULL::timestamptz, NULL::bytea, NULL::bigint, NULL::bigint, NULL::jsonb;
        RETURN;
    END IF;

    IF v_team THEN
        -- a member: its own caps (its row is locked: they cannot change under us) ...
        v_caps := LEAST(
            m.monthly_cap - CASE WHEN m.month_start < v_month THEN 0 ELSE m.month_spend END - m.held,
            m.daily_cap - CASE WHEN m.day_start < v_day THEN 0 ELSE m.day_spend END - m.held,
            m.request_cap);
        -- ... then, in the common case, one conditional update of its team's row, as above
        UPDATE credits.credit_accounts a SET
            held        = a.held + CASE WHEN q.debits THEN q.amount ELSE 0 END,
            month_spend = CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END,
            month_start = greatest(a.month_start, v_month),
            day_spend   = CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END,
            day_start   = greatest(a.day_start, v_day)
        FROM unnest(p_tiers, p_amounts, p_debits) AS q(tier, amount, debits)
        WHERE a.subject_id = m.parent_id
          AND a.status = 'active'
          AND q.tier = CASE WHEN a.tier = ANY (p_tiers) THEN a.tier ELSE p_default_tier END
          AND (NOT q.debits OR q.amount = 0 OR (
                   a.balance - a.held >= q.amount
               AND (a.monthly_cap IS NULL OR a.monthly_cap
                    - CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END - a.held >= q.amount)
               AND (a.daily_cap IS NULL OR a.daily_cap
                    - CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END - a.held >= q.amount)
               AND (a.request_cap IS NULL OR a.request_cap >= q.amount)
               AND (v_caps IS NULL OR v_caps >= q.amount)))
        RETURNING a.tier, q.amount, q.debits INTO v_tier, v_amount, v_debits;
        IF FOUND THEN
            IF v_debits THEN
                UPDATE credits.credit_accounts a SET
                    held        = a.held + v_amount,
                    month_spend = CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END,
                    month_start = greatest(a.month_start, v_month),
                    day_spend   = CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END,
                    day_start   = greatest(a.day_start, v_day)
                WHERE a.subject_id = p_subject;
            END IF;
            INSERT INTO credits.holds AS h
                (id, subject_id, member_id, amount, debits, expires_at, model, power_level, request_hash)
            VALUES (p_hold, m.parent_id, p_subject, v_amount, v_debits,
                    now() + p_ttl * interval '1 second', p_model, p_power_level, p_request_hash)
            RETURNING h.expires_at INTO v_expires;
            RETURN QUERY SELECT 'held', m.parent_id, v_tier, v_amount, v_debits, v_expires,
                                p_request_hash, NULL::bigint, v_amount, NULL::jsonb;
            RETURN;
        END IF;
        SELECT * INTO p FROM credits.credit_accounts a WHERE a.subject_id = m.parent_id FOR NO KEY UPDATE;
        IF p.status <> 'active' THEN
            RETURN QUERY SELECT 'team_disabled', p.subject_id, p.tier, NULL::bigint, NULL::boolean,
                                NULL::timestamptz, NULL::bytea, NULL::bigint, NULL::bigint, NULL::jsonb;
            RETURN;
        END IF;
    ELSE
        p := m;
    END IF;

    -- What does not fit whole: clamped to the least any limit leaves, or refused.
    v_tier := CASE WHEN p.tier = ANY (p_tiers) THEN p.tier ELSE p_default_tier END;
    v_i := array_position(p_tiers, v_tier);
    v_quote := p_amounts[v_i];
    v_min := p_minimums[v_i];
    v_debits := p_debits[v_i];
    IF NOT v_debits OR v_quote = 0 THEN
        v_amount := v_quote;
    ELSE
        v_room := LEAST(
            p.balance - p.held,
            p.monthly_cap - CASE WHEN p.month_start < v_month THEN 0 ELSE p.month_spend END - p.held,
            p.daily_cap - CASE WHEN p.day_start < v_day THEN 0 ELSE p.day_spend END - p.held,
            p.request_cap,
            v_caps);
        v_amount := credits.fit(v_quote, v_min, v_room);
        IF v_amount IS NULL THEN
            -- named: the first limit that leaves less than the request needs, the member's own
            -- caps before its team's (or the account's own, outside a team)
            SELECT l INTO v_limit
            FROM unnest(
                ARRAY['monthly', 'daily', 'request',
                      'team_balance', 'team_monthly', 'team_daily', 'team_request'],
                ARRAY[
                    CASE WHEN v_team THEN m.monthly_cap
                        - CASE WHEN m.month_start < v_month THEN 0 ELSE m.month_spend END - m.held END,
                    CASE WHEN v_team THEN m.daily_cap
                        - CASE WHEN m.day_start < v_day THEN 0 ELSE m.day_spend END - m.held END,
                    CASE WHEN v_team THEN m.request_cap END,
                    p.balance - p.held,
                    p.monthly_cap - CASE WHEN p.month_start < v_month THEN 0 ELSE p.month_spend END - p.held,
                    p.daily_cap - CASE WHEN p.day_start < v_day THEN 0 ELSE p.day_spend END - p.held,
                    p.request_cap]) WITH ORDINALITY AS x(l, r, i)
            WHERE r < coalesce(v_min, v_quote)
            ORDER BY i LIMIT 1;
            IF NOT v_team THEN  -- the account's own limits are named without "team_"
                v_limit := replace(v_limit, 'team_', '');
            END IF;
            RETURN QUERY SELECT v_limit, p.subject_id, p.tier, NULL::bigint, v_debits,
                                NULL::timestamptz, NULL::bytea, v_room, v_quote,
                                jsonb_build_object('account', credits.limits_seen(m, v_month, v_day),
                                                   'payer', credits.limits_seen(p, v_month, v_day));
            RETURN;
        END IF;
    END IF;

    UPDATE credits.credit_accounts a SET
        held        = a.held + CASE WHEN v_debits THEN v_amount ELSE 0 END,
        month_spend = CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END,
        month_start = greatest(a.month_start, v_month),
        day_spend   = CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END,
        day_start   = greatest(a.day_start, v_day)
    WHERE a.subject_id IN (m.subject_id, p.subject_id);
    INSERT INTO credits.holds AS h
        (id, subject_id, member_id, amount, debits, expires_at, model, power_level, request_hash)
    VALUES (p_hold, p.subject_id, CASE WHEN v_team THEN m.subject_id END, v_amount, v_debits,
            now() + p_ttl * interval '1 second', p_model, p_power_level, p_request_hash)
    RETURNING h.expires_at INTO v_expires;
    RETURN QUERY SELECT 'held', p.subject_id, p.tier, v_amount, v_debits, v_expires, p_request_hash,
                        NULL::bigint, v_quote, NULL::jsonb;
END
$$;

-- Ends an open hold (or settles an expired one late), exactly once. p_charge is the charge
-- (NULL: the hold's own amount, a capture; 0: a void). The money moves on the hold's account
-- (p_subject: the payer); a member's own row gives back what it held and counts what it spent.
-- The usage event is the requester's (the member's, or the payer's own), with payer_id for a
-- team's. Returns the payer's balance, the charge, whether it debits, the ledger row and the member
-- (whose cached figures changed too); nothing when the hold had already ended (or does not exist).
CREATE FUNCTION credits.resolve_hold(
    p_subject text, p_hold uuid, p_charge bigint, p_status text, p_usage_status text,
    p_service text, p_model text, p_provider text, p_prompt bigint, p_completion bigint,
    p_cached bigint, p_reasoning bigint, p_cost bigint, p_latency integer, p_metadata jsonb
) RETURNS TABLE (balance bigint, charge bigint, debits boolean, transaction_id bigint, member_id text)
LANGUAGE plpgsql AS $$
DECLARE
    v_month   date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    v_day     date := (now() AT TIME ZONE 'UTC')::date;
    h         credits.holds;
    v_was     text;    -- the hold's status before: open, or expired (a late settlement)
    v_charge  bigint;
    v_spent   bigint;  -- what the accounts' spend counters gain
    v_release bigint;  -- what their held amount gives back
    v_balance bigint;
    v_tx      bigint;
BEGIN
    -- an open hold ends once; a hold the sweeper released (expired) may still be settled by the
    -- usage that arrives late, since the upstream did serve it
    UPDATE credits.holds x SET
        status = p_status, resolved_at = now(), settled_amount = coalesce(p_charge, x.amount)
    FROM (SELECT y.status FROM credits.holds y WHERE y.subject_id = p_subject AND y.id = p_hold
          FOR NO KEY UPDATE) prior
    WHERE x.subject_id = p_subject AND x.id = p_hold
      AND (prior.status = 'open' OR (p_status = 'settled' AND prior.status = 'expired'))
    RETURNING prior.status, x.amount, x.debits, x.member_id, x.power_level
    INTO v_was, h.amount, h.debits, h.member_id, h.power_level;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_charge := coalesce(p_charge, h.amount);
    v_spent := CASE WHEN h.debits THEN v_charge ELSE 0 END;
    v_release := CASE WHEN h.debits AND v_was = 'open' THEN h.amount ELSE 0 END;

    IF h.member_id IS NOT NULL THEN  -- the member's row first (see take_hold)
        UPDATE credits.credit_accounts a SET
            held        = a.held - v_release,
            month_spend = CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END + v_spent,
            month_start = greatest(a.month_start, v_month),
            day_spend   = CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END + v_spent,
            day_start   = greatest(a.day_start, v_day)
        WHERE a.subject_id = h.member_id;
    END IF;
    UPDATE credits.credit_accounts a SET
        balance     = a.balance - v_spent,
        held        = a.held - v_release,
        month_spend = CASE WHEN a.month_start < v_month THEN 0 ELSE a.month_spend END + v_spent,
        month_start = greatest(a.month_start, v_month),
        day_spend   = CASE WHEN a.day_start < v_day THEN 0 ELSE a.day_spend END + v_spent,
        day_start   = greatest(a.day_start, v_day)
    WHERE a.subject_id = p_subject
    RETURNING a.balance INTO v_balance;

    IF v_spent > 0 THEN
        INSERT INTO credits.credit_transactions
            (subject_id, amount, balance_after, type, idempotency_key, hold_id, model, provider,
             power_level, prompt_tokens, completion_tokens, metadata, member_id)
        VALUES (p_subject, -v_spent, v_balance, 'usage', 'hold:' || p_hold::text, p_hold, p_model,
                p_provider, h.power_level, p_prompt, p_completion, p_metadata, h.member_id)
        RETURNING id INTO v_tx;
    END IF;
    INSERT INTO credits.usage_events AS e
        (subject_id, request_id, service, model, provider, power_level, prompt_tokens,
         completion_tokens, cached_tokens, reasoning_tokens, cost, charged, latency_ms, status,
         transaction_id, metadata, payer_id)
    VALUES (coalesce(h.member_id, p_subject), p_hold::text, p_service, p_model, p_provider,
            h.power_level, p_prompt, p_completion, p_cached, p_reasoning, coalesce(p_cost, v_charge),
            v_spent, p_latency, p_usage_status, v_tx, p_metadata,
            CASE WHEN h.member_id IS NOT NULL THEN p_subject END)
    ON CONFLICT (subject_id, request_id) DO UPDATE SET
        status = EXCLUDED.status, model = EXCLUDED.model, provider = EXCLUDED.provider,
        prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
        cached_tokens = EXCLUDED.cached_tokens, reasoning_tokens = EXCLUDED.reasoning_tokens,
        cost = EXCLUDED.cost, charged = EXCLUDED.charged, latency_ms = EXCLUDED.latency_ms,
        transaction_id = EXCLUDED.transaction_id, metadata = e.metadata || EXCLUDED.metadata;
    RETURN QUERY SELECT v_balance, v_charge, h.debits, v_tx, h.member_id;
END
$$;

-- Audit: an account's held amount is what its open holds hold, as the payer or as the member
-- who made them.
CREATE OR REPLACE VIEW credits.v_ledger_discrepancies AS
SELECT a.subject_id, a.balance, coalesce(t.total, 0) AS ledger_total, a.held,
       coalesce(h.open, 0) + coalesce(mh.open, 0) AS open_holds
FROM credits.credit_accounts a
LEFT JOIN (SELECT subject_id, sum(amount) AS total FROM credits.credit_transactions GROUP BY 1) t
       ON t.subject_id = a.subject_id
LEFT JOIN (SELECT subject_id, sum(amount) AS open FROM credits.holds
           WHERE status = 'open' AND debits GROUP BY 1) h
       ON h.subject_id = a.subject_id
LEFT JOIN (SELECT member_id, sum(amount) AS open FROM credits.holds
           WHERE status = 'open' AND debits AND member_id IS NOT NULL GROUP BY 1) mh
       ON mh.member_id = a.subject_id
WHERE a.balance <> coalesce(t.total, 0) OR a.held <> coalesce(h.open, 0) + coalesce(mh.open, 0);
