-- Group commit: a batch of holds, or of resolutions (settle, void, expire, capture), in one
-- statement and one commit. Each function takes the batch as a jsonb array (a JSON number is an
-- exact numeric in jsonb, read into bigint through its text: never a float), locks every account
-- the batch touches in one global order, then runs the single-item function (take_hold,
-- resolve_hold: the rules stay there) for each item in the order it arrived, so several holds on
-- one account are decided one after the other inside the statement. One row per item, with its
-- index (from 0); a resolution that found its hold already ended returns no row.
--
-- The lock order is the one the single-item functions follow: members' rows before the rows of
-- accounts outside a team (teams, and accounts paying for themselves), each group sorted by id
-- in byte order (COLLATE "C": the order of code points, which Python's sorted() follows too, as
-- bulk grants lock; the database's own collation may sort otherwise, en-US puts "a" before "B").
-- A batch from any process or host therefore waits for another, never in a cycle; a single-item
-- statement (a batch of one) locks a member before its team, which fits the same order.
--
-- There is no EXCEPTION block (a subtransaction per item): a refusal is a row, not an error,
-- and an error fails the whole batch (nothing of it is written); the client then runs the
-- batch's items one by one, so one item's error never fails another.

-- Locks the accounts p_subjects and their teams (NO KEY UPDATE, the lock an UPDATE takes: rows
-- that refer to them can still be inserted meanwhile). A parent read before the lock is read
-- again after it: an account that joined a team meanwhile has its new team locked too (out of
-- the order, once, and only then).
CREATE FUNCTION credits.lock_accounts(p_subjects text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_locked text[] := '{}';
    v_want   text[];
BEGIN
    LOOP
        SELECT coalesce(array_agg(DISTINCT s.id), '{}') INTO v_want
        FROM credits.credit_accounts a
        CROSS JOIN LATERAL (VALUES (a.subject_id), (a.parent_id)) AS s(id)
        WHERE a.subject_id = ANY (p_subjects) AND s.id IS NOT NULL AND NOT s.id = ANY (v_locked);
        EXIT WHEN cardinality(v_want) = 0;
        PERFORM 1 FROM credits.credit_accounts a
        WHERE a.subject_id = ANY (v_want)
        ORDER BY a.parent_id IS NULL, a.subject_id COLLATE "C"
        FOR NO KEY UPDATE;
        v_locked := v_locked || v_want;
    END LOOP;
END
$$;

-- Takes a batch of holds. Each item is an object with take_hold's parameters: subject, hold
-- (uuid), tiers, amounts, minimums, debits (arrays), default_tier, ttl, model, power_level,
-- request_hash (bytea text, '\x…', or null), fresh. Returns take_hold's row for each, with idx.
CREATE FUNCTION credits.take_holds(p_items jsonb) RETURNS TABLE (
    idx integer, outcome text, payer_id text, tier text, amount bigint, debits boolean,
    expires_at timestamptz, request_hash bytea, room bigint, quoted bigint, seen jsonb
)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    PERFORM credits.lock_accounts(ARRAY(SELECT DISTINCT x->>'subject' FROM jsonb_array_elements(p_items) x));
    FOR r IN
        SELECT (e.o - 1)::integer AS i, q.*
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o),
             jsonb_to_record(e.item) AS q(
                 subject text, hold uuid, tiers text[], amounts bigint[], minimums bigint[],
                 debits boolean[], default_tier text, ttl integer, model text, power_level text,
                 request_hash bytea, fresh boolean)
        ORDER BY e.o
    LOOP
        RETURN QUERY SELECT r.i, t.* FROM credits.take_hold(
            r.subject, r.hold, r.tiers, r.amounts, r.minimums, r.debits, r.default_tier, r.ttl,
            r.model, r.power_level, r.request_hash, r.fresh) t;
    END LOOP;
END
$$;

-- Resolves a batch of holds. Each item is an object with resolve_hold's parameters: subject (the
-- payer), hold, charge (null: capture), status, usage_status, service, model, provider, prompt,
-- completion, cached, reasoning, cost, latency, metadata. The holds' rows are locked first, in
-- (subject, id) order, as a single resolve_hold locks its hold before the accounts; then the
-- payers and the members whose holds they are. A hold's member counts as a member in the lock
-- order even if it has left its team since (resolve_hold locks it before the payer all the same).
CREATE FUNCTION credits.resolve_holds(p_items jsonb) RETURNS TABLE (
    idx integer, balance bigint, charge bigint, debits boolean, transaction_id bigint, member_id text
)
LANGUAGE plpgsql AS $$
DECLARE
    r          record;
    v_accounts text[];
    v_members  text[];
BEGIN
    SELECT array_agg(DISTINCT s.id), coalesce(array_agg(DISTINCT l.member_id) FILTER (WHERE l.member_id IS NOT NULL), '{}')
    INTO v_accounts, v_members
    FROM (SELECT h.subject_id, h.member_id
          FROM credits.holds h
          JOIN (SELECT x->>'subject' AS subject, (x->>'hold')::uuid AS hold
                FROM jsonb_array_elements(p_items) x) q
            ON h.subject_id = q.subject AND h.id = q.hold
          ORDER BY h.subject_id COLLATE "C", h.id
          FOR NO KEY UPDATE OF h) l
    CROSS JOIN LATERAL (VALUES (l.subject_id), (l.member_id)) AS s(id)
    WHERE s.id IS NOT NULL;
    IF v_accounts IS NOT NULL THEN
        PERFORM 1 FROM credits.credit_accounts a
        WHERE a.subject_id = ANY (v_accounts)
        ORDER BY a.parent_id IS NULL AND NOT a.subject_id = ANY (v_members), a.subject_id COLLATE "C"
        FOR NO KEY UPDATE;
    END IF;
    FOR r IN
        SELECT (e.o - 1)::integer AS i, q.*
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(item, o),
             jsonb_to_record(e.item) AS q(
                 subject text, hold uuid, charge bigint, status text, usage_status text,
                 service text, model text, provider text, prompt bigint, completion bigint,
                 cached bigint, reasoning bigint, cost bigint, latency integer, metadata jsonb)
        ORDER BY e.o
    LOOP
        RETURN QUERY SELECT r.i, t.* FROM credits.resolve_hold(
            r.subject, r.hold, r.charge, r.status, r.usage_status, r.service, r.model, r.provider,
            r.prompt, r.completion, r.cached, r.reasoning, r.cost, r.latency, r.metadata) t;
    END LOOP;
END
$$;
