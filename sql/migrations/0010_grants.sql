-- Credit grants: every credit that enters an account is a grant, and usage burns grants in order.
--
-- A grant has a category (paid or promotional), a priority (lower burns first), when it took
-- effect, an optional expiry, its amount and what is left of it, and where it came from (the
-- ledger row that credited it: an allocation, a coupon, a bonus, an adjustment, a top-up; or this
-- migration, for a balance that was there before). Usage burns the live grants of the account
-- that pays: by priority, then the earliest expiry (none last), then the oldest. What no grant
-- covers (a settled overrun, a negative adjustment) is the account's overrun, which the next
-- credit pays off first. So, for every account, at all times:
--
--     balance = sum(ledger rows)                                 (as before)
--     balance = sum(remaining of live grants) - overrun          (new; `verify` checks both)
--
-- The ledger stays the only writer of money: grants follow the rows of credits.credit_transactions
-- by a trigger, in the same transaction, under the account's row lock that every writer of a
-- balance takes first (the hold and settlement functions, credits, refunds, the expiry below).
--
-- Expiry: credits.expire_grants(account) writes one `expiry` row for what is left of each grant
-- past its expiry (database clock), under the account's lock, so two sweepers racing expire a
-- grant once. What the account's open holds need beyond the credit that stays is kept until they
-- end (a request held before the expiry is paid as it was held; those kept credits burn first,
-- and what they leave expires at the next sweep or hold). A hold expires what is due on its
-- account first (credits.take_hold is wrapped below), so no request is ever held on expired credit,
-- whenever the sweeper last ran.
--
-- Refunds: a refund gives credit back to the grants its charge burnt, the last burnt first. A
-- grant that has expired since is not revived: its share is written back and expired at once (a
-- `refund` row, then an `expiry` row, so the history shows both). The share the charge took as
-- overrun lowers the overrun; what is left (a charge made before grants existed) becomes a paid
-- grant without expiry, like the balances this migration converts.

ALTER TABLE credits.credit_transactions
    DROP CONSTRAINT credit_transactions_type_check,
    ADD CONSTRAINT credit_transactions_type_check CHECK (type IN
        ('allocation', 'bonus', 'refund', 'usage', 'coupon', 'adjustment', 'expiry', 'topup')) NOT VALID,
    ADD CONSTRAINT credit_transactions_signs CHECK (
        (type <> 'topup' OR amount > 0) AND (type <> 'expiry' OR amount < 0)) NOT VALID,
    -- the terms of the grant a credit opens (NULL: the defaults of its type, below)
    ADD COLUMN grant_category   text CHECK (grant_category IN ('paid', 'promotional')),
    ADD COLUMN grant_priority   integer CHECK (grant_priority BETWEEN 0 AND 1000),
    ADD COLUMN grant_expires_at timestamptz,
    -- a debit that one grant covered: that grant (no grant_burns row is written for it)
    ADD COLUMN grant_id         bigint;

ALTER TABLE credits.credit_accounts
    -- usage no grant covered, paid off first by the next credit
    ADD COLUMN overrun       bigint NOT NULL DEFAULT 0 CHECK (overrun >= 0),
    -- no earlier than the first expiry of a live grant with credit left (NULL: none): a hold on
    -- or after it expires what is due first (it may lag behind, never run ahead)
    ADD COLUMN grants_due_at timestamptz;

-- A coupon's credits are promotional; these make them expire some days after the redemption and
-- burn at a priority of their own.
ALTER TABLE credits.coupon_codes
    ADD COLUMN credit_valid_days integer CHECK (credit_valid_days BETWEEN 1 AND 3650),
    ADD COLUMN credit_priority   integer CHECK (credit_priority BETWEEN 0 AND 1000);

CREATE TABLE credits.grants (
    id             bigint      GENERATED ALWAYS AS IDENTITY,
    subject_id     text        NOT NULL REFERENCES credits.credit_accounts (subject_id),
    category       text        NOT NULL CHECK (category IN ('paid', 'promotional')),
    priority       integer     NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 1000),
    source         text        NOT NULL CHECK (source IN
                       ('allocation', 'bonus', 'coupon', 'refund', 'adjustment', 'topup', 'migration')),
    amount         bigint      NOT NULL CHECK (amount > 0),
    remaining      bigint      NOT NULL CHECK (remaining BETWEEN 0 AND amount),
    -- what expired of it (one `expiry` row each time)
    expired        bigint      NOT NULL DEFAULT 0 CHECK (expired BETWEEN 0 AND amount),
    effective_at   timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    -- live: may have credit left; used: none left (a refund may bring it back while unexpired);
    -- expired: past its expiry with nothing left, for good
    status         text        NOT NULL DEFAULT 'live' CHECK (status IN ('live', 'used', 'expired')),
    transaction_id bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_id, id),
    FOREIGN KEY (subject_id, transaction_id) REFERENCES credits.credit_transactions (subject_id, id),
    CHECK (expires_at IS NULL OR expires_at > effective_at),
    CHECK (status = 'live' OR remaining = 0)
);
CREATE INDEX grants_live ON credits.grants (subject_id) WHERE status = 'live';
CREATE INDEX grants_due ON credits.grants (expires_at) WHERE status = 'live' AND expires_at IS NOT NULL;
CREATE INDEX grants_by_subject ON credits.grants (subject_id, created_at DESC, id DESC);

-- Which grants paid for a ledger row (amount > 0: burnt by it), or got credit back from a refund
-- (amount < 0); grant_id NULL is the share taken as (or given back to) the overrun. A debit that one
-- grant covered (the common settlement) names it in its own row instead (credit_transactions.grant_id).
CREATE TABLE credits.grant_burns (
    subject_id     text   NOT NULL,
    transaction_id bigint NOT NULL,
    grant_id       bigint,
    amount         bigint NOT NULL CHECK (amount <> 0),
    FOREIGN KEY (subject_id, transaction_id) REFERENCES credits.credit_transactions (subject_id, id),
    FOREIGN KEY (subject_id, grant_id) REFERENCES credits.grants (subject_id, id)
);
CREATE INDEX grant_burns_by_transaction ON credits.grant_burns (subject_id, transaction_id);
CREATE TRIGGER grant_burns_append_only BEFORE UPDATE OR DELETE ON credits.grant_burns
    FOR EACH ROW EXECUTE FUNCTION credits.forbid_change();

-- Balances that were there: one paid grant without expiry each; a negative one is overrun.
INSERT INTO credits.grants (subject_id, category, source, amount, remaining, effective_at, created_at)
SELECT subject_id, 'paid', 'migration', balance, balance, now(), now()
FROM credits.credit_accounts WHERE balance > 0;
UPDATE credits.credit_accounts SET overrun = -balance WHERE balance < 0;

-- Burns a debit of p_need on the account's live grants in order (the caller holds the account's
-- row lock); returns what the grants covered. Grants past their expiry that open holds kept come
-- first (they are what those holds were taken on).
CREATE FUNCTION credits.burn_grants(p_subject text, p_transaction bigint, p_need bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_taken bigint;
BEGIN
    WITH c AS (
        SELECT g.id, g.remaining,
               sum(g.remaining) OVER (ORDER BY coalesce(g.expires_at <= now(), false) DESC, g.priority,
                                               g.expires_at NULLS LAST, g.id) - g.remaining AS before
        FROM credits.grants g
        WHERE g.subject_id = p_subject AND g.status = 'live' AND g.remaining > 0
    ), u AS (
        UPDATE credits.grants g SET
            remaining = g.remaining - least(c.remaining, p_need - c.before),
            status    = CASE WHEN c.remaining <= p_need - c.before THEN 'used' ELSE 'live' END
        FROM c
        WHERE g.subject_id = p_subject AND g.id = c.id AND c.before < p_need
        RETURNING g.id, least(c.remaining, p_need - c.before) AS take
    ), b AS (
        INSERT INTO credits.grant_burns (subject_id, transaction_id, grant_id, amount)
        SELECT p_subject, p_transaction, u.id, u.take FROM u
        RETURNING amount
    )
    SELECT coalesce(sum(amount), 0) INTO v_taken FROM b;
    IF v_taken < p_need THEN
        UPDATE credits.credit_accounts SET overrun = overrun + (p_need - v_taken) WHERE subject_id = p_subject;
        INSERT INTO credits.grant_burns (subject_id, transaction_id, grant_id, amount)
        VALUES (p_subject, p_transaction, NULL, p_need - v_taken);
    END IF;
    RETURN v_taken;
END
$$;

-- Writes p_amount off the account's balance as an `expiry` row for grant p_grant (the caller
-- holds the account's row lock and updates the grant).
CREATE FUNCTION credits.write_expiry(p_subject text, p_grant bigint, p_amount bigint, p_key text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_balance bigint;
    v_tx      bigint;
BEGIN
    UPDATE credits.credit_accounts SET balance = balance - p_amount WHERE subject_id = p_subject
    RETURNING balance INTO v_balance;
    INSERT INTO credits.credit_transactions
        (subject_id, amount, balance_after, type, idempotency_key, description, metadata)
    VALUES (p_subject, -p_amount, v_balance, 'expiry', p_key, 'grant ' || p_grant || ' expired',
            jsonb_build_object('grant_id', p_grant))
    RETURNING id INTO v_tx;
    RETURN v_tx;
END
$$;

-- Keeps grants in step with every ledger row but expiries (written with their grant's update).
CREATE FUNCTION credits.apply_to_grants() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_left    bigint;
    v_give    bigint;
    v_over    bigint;
    v_pay     bigint;
    r         record;
BEGIN
    IF NEW.amount < 0 THEN  -- usage, a negative adjustment
        PERFORM credits.burn_grants(NEW.subject_id, NEW.id, -NEW.amount);
        RETURN NULL;
    END IF;

    IF NEW.type = 'refund' THEN
        -- what each grant gave the refunded charge, less what its earlier refunds gave back;
        -- the last burnt first (the overrun share was taken last of all)
        v_left := NEW.amount;
        FOR r IN
            SELECT b.grant_id, sum(b.amount) AS share, g.status, g.expires_at
            FROM (
                SELECT x.grant_id, x.amount FROM credits.grant_burns x
                WHERE x.subject_id = NEW.subject_id
                  AND x.transaction_id IN (
                      SELECT NEW.refund_of
                      UNION ALL
                      SELECT t.id FROM credits.credit_transactions t
                      WHERE t.subject_id = NEW.subject_id AND t.refund_of = NEW.refund_of AND t.id <> NEW.id)
                UNION ALL  -- the grant the charge's own row names
                SELECT t.grant_id, -t.amount FROM credits.credit_transactions t
                WHERE t.subject_id = NEW.subject_id AND t.id = NEW.refund_of AND t.grant_id IS NOT NULL
            ) b
            LEFT JOIN credits.grants g ON g.subject_id = NEW.subject_id AND g.id = b.grant_id
            GROUP BY b.grant_id, g.status, g.expires_at, g.priority
            HAVING sum(b.amount) > 0
            ORDER BY b.grant_id IS NULL DESC, g.priority DESC, g.expires_at DESC NULLS FIRST,
                     b.grant_id DESC
        LOOP
            EXIT WHEN v_left = 0;
            v_give := least(r.share, v_left);
            v_left := v_left - v_give;
            INSERT INTO credits.grant_burns (subject_id, transaction_id, grant_id, amount)
            VALUES (NEW.subject_id, NEW.id, r.grant_id, -v_give);
            IF r.grant_id IS NULL THEN
                -- the overrun share: what of it is still owed is forgiven; the rest (paid off
                -- by a credit since) comes back as a paid grant
                SELECT overrun INTO v_over FROM credits.credit_accounts WHERE subject_id = NEW.subject_id;
                v_pay := least(v_over, v_give);
                UPDATE credits.credit_accounts SET overrun = overrun - v_pay WHERE subject_id = NEW.subject_id;
                IF v_give > v_pay THEN
                    INSERT INTO credits.grants (subject_id, category, source, amount, remaining, transaction_id)
                    VALUES (NEW.subject_id, 'paid', 'refund', v_give - v_pay, v_give - v_pay, NEW.id);
                END IF;
            ELSIF r.status <> 'expired' AND (r.expires_at IS NULL OR r.expires_at > now()) THEN
                UPDATE credits.grants SET remaining = remaining + v_give, status = 'live'
                WHERE subject_id = NEW.subject_id AND id = r.grant_id;
                -- (a hold expires it in time again, whatever expired on the account since)
                UPDATE credits.credit_accounts SET grants_due_at = least(grants_due_at, r.expires_at)
                WHERE subject_id = NEW.subject_id AND r.expires_at IS NOT NULL;
            ELSE
                -- not revived: given back and expired at once
                PERFORM credits.write_expiry(NEW.subject_id, r.grant_id, v_give,
                                             'expiry:refund:' || NEW.id || ':' || r.grant_id);
                UPDATE credits.grants SET expired = expired + v_give
                WHERE subject_id = NEW.subject_id AND id = r.grant_id;
            END IF;
        END LOOP;
        IF v_left > 0 THEN  -- a charge from before grants: a paid grant without expiry
            INSERT INTO credits.grants (subject_id, category, source, amount, remaining, transaction_id)
            VALUES (NEW.subject_id, 'paid', 'refund', v_left, v_left, NEW.id);
        END IF;
        RETURN NULL;
    END IF;

    -- a credit: a new grant, which pays off any overrun first
    SELECT overrun INTO v_over FROM credits.credit_accounts WHERE subject_id = NEW.subject_id;
    v_pay := least(v_over, NEW.amount);
    UPDATE credits.credit_accounts a SET
        overrun = a.overrun - v_pay,
        grants_due_at = CASE WHEN NEW.amount > v_pay THEN least(a.grants_due_at, NEW.grant_expires_at)
                             ELSE a.grants_due_at END
    WHERE a.subject_id = NEW.subject_id AND (v_pay > 0 OR NEW.grant_expires_at IS NOT NULL);
    INSERT INTO credits.grants
        (subject_id, category, priority, source, amount, remaining, expires_at, status, transaction_id)
    VALUES (NEW.subject_id,
            coalesce(NEW.grant_category,
                     CASE WHEN NEW.type IN ('coupon', 'bonus') THEN 'promotional' ELSE 'paid' END),
            coalesce(NEW.grant_priority, 0), NEW.type, NEW.amount, NEW.amount - v_pay,
            NEW.grant_expires_at, CASE WHEN NEW.amount > v_pay THEN 'live' ELSE 'used' END, NEW.id);
    RETURN NULL;
END
$$;
-- The common debit first, before its row is written: the first grant in burn order covers it
-- whole, and the row names that grant (a third of the grants' cost on a settlement: no
-- grant_burns row, no second function); else (NULL) the trigger below burns across grants.
CREATE FUNCTION credits.burn_first_grant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE credits.grants g SET
        remaining = g.remaining + NEW.amount,
        status    = CASE WHEN g.remaining + NEW.amount = 0 THEN 'used' ELSE 'live' END
    FROM (SELECT f.id FROM credits.grants f
          WHERE f.subject_id = NEW.subject_id AND f.status = 'live'
          ORDER BY coalesce(f.expires_at <= now(), false) DESC, f.priority, f.expires_at NULLS LAST, f.id
          LIMIT 1) first
    WHERE g.subject_id = NEW.subject_id AND g.id = first.id AND g.remaining >= -NEW.amount
    RETURNING g.id INTO NEW.grant_id;
    RETURN NEW;
END
$$;
-- (a debit whose writer names its grant has burnt it already: a top-up's reversal)
CREATE TRIGGER credit_transactions_burn_first BEFORE INSERT ON credits.credit_transactions
    FOR EACH ROW WHEN (NEW.amount < 0 AND NEW.type <> 'expiry' AND NEW.grant_id IS NULL)
    EXECUTE FUNCTION credits.burn_first_grant();
CREATE TRIGGER credit_transactions_grants AFTER INSERT ON credits.credit_transactions
    FOR EACH ROW WHEN (NEW.type <> 'expiry' AND NEW.grant_id IS NULL) EXECUTE FUNCTION credits.apply_to_grants();

-- Expires what is left of the account's grants past their expiry, once: returns how much. What
-- the account's open holds need beyond the credit that stays is kept (the first to burn) until
-- they end. Locks the account's row (the caller locks a member's row before its team's).
CREATE FUNCTION credits.expire_grants(p_subject text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    a       credits.credit_accounts;
    v_due   bigint;
    v_keep  bigint;
    v_kept  bigint;
    v_total bigint := 0;
    g       record;
BEGIN
    SELECT * INTO a FROM credits.credit_accounts WHERE subject_id = p_subject FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT coalesce(sum(remaining), 0) INTO v_due FROM credits.grants
    WHERE subject_id = p_subject AND status = 'live' AND expires_at <= now();
    -- the credit that stays is balance - v_due; what the account's holds need beyond it is kept
    -- (a member's held amount is its team's money: none of it was taken on the member's grants)
    v_keep := CASE WHEN a.parent_id IS NULL THEN least(v_due, greatest(0, a.held - (a.balance - v_due)))
                   ELSE 0 END;
    FOR g IN
        SELECT id, remaining FROM credits.grants
        WHERE subject_id = p_subject AND status = 'live' AND expires_at <= now()
        ORDER BY priority, expires_at, id
    LOOP
        v_kept := least(g.remaining, v_keep);
        v_keep := v_keep - v_kept;
        IF g.remaining > v_kept THEN
            PERFORM credits.write_expiry(p_subject, g.id, g.remaining - v_kept,
                                         'expiry:' || g.id || ':' || g.remaining);
            v_total := v_total + g.remaining - v_kept;
        END IF;
        UPDATE credits.grants SET
            remaining = v_kept,
            expired   = expired + (g.remaining - v_kept),
            status    = CASE WHEN v_kept = 0 THEN 'expired' ELSE 'live' END
        WHERE subject_id = p_subject AND id = g.id;
    END LOOP;
    UPDATE credits.credit_accounts SET grants_due_at = (
        SELECT min(expires_at) FROM credits.grants
        WHERE subject_id = p_subject AND status = 'live' AND remaining > 0)
    WHERE subject_id = p_subject;
    RETURN v_total;
END
$$;

-- The hold expires what is due on the account (and a member's team) before it looks at their
-- balance: one primary-key read more per hold while nothing is due.
ALTER FUNCTION credits.take_hold(text, uuid, text[], bigint[], bigint[], boolean[], text, integer, text,
                                 text, bytea, boolean)
    RENAME TO take_hold_pools;
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
    v_parent text;
    v_due    timestamptz;
BEGIN
    SELECT a.parent_id, least(a.grants_due_at, t.grants_due_at) INTO v_parent, v_due
    FROM credits.credit_accounts a
    LEFT JOIN credits.credit_accounts t ON t.subject_id = a.parent_id
    WHERE a.subject_id = p_subject;
    IF v_due <= now() THEN
        IF v_parent IS NOT NULL THEN  -- the member's row before its team's, as everywhere
            PERFORM 1 FROM credits.credit_accounts WHERE subject_id = p_subject FOR NO KEY UPDATE;
            PERFORM credits.expire_grants(v_parent);
        END IF;
        PERFORM credits.expire_grants(p_subject);
    END IF;
    RETURN QUERY SELECT * FROM credits.take_hold_pools(
        p_subject, p_hold, p_tiers, p_amounts, p_minimums, p_debits, p_default_tier, p_ttl, p_model,
        p_power_level, p_request_hash, p_fresh);
END
$$;

-- Audit: both identities, for every account.
DROP VIEW credits.v_ledger_discrepancies;
CREATE VIEW credits.v_ledger_discrepancies AS
SELECT a.subject_id, a.balance, coalesce(t.total, 0) AS ledger_total, a.held,
       coalesce(h.open, 0) + coalesce(mh.open, 0) AS open_holds,
       coalesce(g.remaining, 0) AS grants_remaining, a.overrun
FROM credits.credit_accounts a
LEFT JOIN (SELECT subject_id, sum(amount) AS total FROM credits.credit_transactions GROUP BY 1) t
       ON t.subject_id = a.subject_id
LEFT JOIN (SELECT subject_id, sum(amount) AS open FROM credits.holds
           WHERE status = 'open' AND debits GROUP BY 1) h
       ON h.subject_id = a.subject_id
LEFT JOIN (SELECT member_id, sum(amount) AS open FROM credits.holds
           WHERE status = 'open' AND debits AND member_id IS NOT NULL GROUP BY 1) mh
       ON mh.member_id = a.subject_id
LEFT JOIN (SELECT subject_id, sum(remaining) AS remaining FROM credits.grants
           WHERE status = 'live' GROUP BY 1) g
       ON g.subject_id = a.subject_id
WHERE a.balance <> coalesce(t.total, 0)
   OR a.held <> coalesce(h.open, 0) + coalesce(mh.open, 0)
   OR a.balance <> coalesce(g.remaining, 0) - a.overrun;
