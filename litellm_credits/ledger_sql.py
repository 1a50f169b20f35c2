"""The ledger's SQL: every statement that changes a balance, as named constants.

Amounts are bigint micro-credits. Each statement is one implicit transaction unless
``ledger.py`` runs it inside an explicit one (refunds, bulk grants, allocations).
"""

from __future__ import annotations

# The month the spend counts, from the database clock; a write that sees an older month_start
# starts the month from zero.
_THIS_MONTH = "date_trunc('month', now() AT TIME ZONE 'UTC')::date"
_NEXT_MONTH_AT = f"(({_THIS_MONTH} + interval '1 month') AT TIME ZONE 'UTC')"
_MONTH_SPEND = f"(CASE WHEN a.month_start < {_THIS_MONTH} THEN 0 ELSE a.month_spend END)"

ACCOUNT_COLUMNS = f"""
    a.subject_id, a.subject_type, a.tier, a.balance, a.held, a.monthly_cap,
    {_MONTH_SPEND} AS month_spend, a.status, a.display_name, a.created_at, a.updated_at,
    {_NEXT_MONTH_AT} AS resets_at
"""

SQL_GET_ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM credits.credit_accounts a WHERE a.subject_id = $1"

SQL_CREATE_ACCOUNT = f"""
INSERT INTO credits.credit_accounts AS a (subject_id, subject_type, tier, monthly_cap, display_name)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (subject_id) DO NOTHING
RETURNING {ACCOUNT_COLUMNS}
"""

SQL_CREDIT = """
WITH a AS (
    UPDATE credits.credit_accounts SET balance = balance + $2
    WHERE subject_id = $1
    RETURNING balance
)
INSERT INTO credits.credit_transactions
    (subject_id, amount, balance_after, type, idempotency_key, description, metadata, refund_of)
SELECT $1, $2, a.balance, $3, $4, $5, $6, $7 FROM a
RETURNING id, subject_id, amount, balance_after, type, idempotency_key, description, created_at
"""
# After an allocation of $2 (transaction $3): the oldest pending percent coupon of account $1
# becomes a bonus of that percentage (rounded down to the micro-credit), once.
SQL_APPLY_BONUS = """
WITH r AS (
    SELECT code, value FROM credits.coupon_redemptions
    WHERE subject_id = $1 AND type = 'percent' AND applied_at IS NULL
    ORDER BY created_at, code
    LIMIT 1
    FOR UPDATE
), b AS (
    -- div() is the exact integer quotient; "/" would round a long quotient to 6 places before
    -- floor() saw it (a bonus one micro-credit too large on allocations of millions)
    SELECT r.code, div($2 * r.value, 100)::bigint AS bonus FROM r
), a AS (
    UPDATE credits.credit_accounts SET balance = balance + b.bonus
    FROM b
    WHERE subject_id = $1 AND b.bonus > 0
    RETURNING balance, b.bonus, b.code
), t AS (
    INSERT INTO credits.credit_transactions
        (subject_id, amount, balance_after, type, idempotency_key, description, metadata)
    SELECT $1, a.bonus, a.balance, 'coupon', 'coupon-bonus:' || a.code,
           'coupon ' || a.code || ': bonus on an allocation',
           jsonb_build_object('coupon', a.code, 'allocation_id', $3::bigint)
    FROM a
    RETURNING id
)
UPDATE credits.coupon_redemptions SET applied_at = now(), transaction_id = (SELECT id FROM t)
WHERE subject_id = $1 AND code = (SELECT code FROM a)
"""
SQL_LOCK_ACCOUNT = "SELECT balance FROM credits.credit_accounts WHERE subject_id = $1 FOR UPDATE"
SQL_REFUNDABLE = """
SELECT t.type,
       -t.amount - coalesce((SELECT sum(r.amount) FROM credits.credit_transactions r
                             WHERE r.subject_id = t.subject_id AND r.refund_of = t.id), 0) AS refundable
FROM credits.credit_transactions t WHERE t.subject_id = $1 AND t.id = $2
"""

# A bulk grant's idempotency key, with what it asked for: recorded in the grant's transaction, so
# that a replay for other accounts (whose own rows know nothing of it) is told apart too
SQL_BULK_CLAIM = """
INSERT INTO credits.bulk_grants (idempotency_key, request_hash, subjects)
VALUES ($1, $2, $3)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING created_at
"""
SQL_BULK_REQUEST = "SELECT request_hash, subjects FROM credits.bulk_grants WHERE idempotency_key = $1"

# what the request behind an idempotency key asked for (compared on a replay)
SQL_TX_REQUEST = """
SELECT type, amount, refund_of, metadata FROM credits.credit_transactions
WHERE subject_id = $1 AND idempotency_key = $2
"""

SQL_TX_BY_KEY = """
SELECT id, subject_id, amount, balance_after, type, idempotency_key, description, created_at
FROM credits.credit_transactions WHERE subject_id = $1 AND idempotency_key = $2
"""

# Takes a hold in one statement. The amount depends on the account's tier (its markup, or no
# debit at all on an unlimited tier), so the caller quotes every tier and the statement picks the
# account's: $3 tiers, $4 amounts, $5 debits (parallel arrays), $6 the tier for unknown ones.
# $1 subject, $2 hold id, $7 ttl seconds, $8 model, $9 power level, $10 request hash (or NULL)
#
# The hold's id is its idempotency key, and it is looked up first: a hold that exists (a retry
# after a commit whose reply was lost, a replayed charge) is returned as it is, with
# ``replayed``, before the balance, the cap or the account's status are looked at. Two attempts
# in flight at once both miss it; the second then fails on the primary key and its UPDATE is
# rolled back with it (the caller reads the hold back).
SQL_HOLD = f"""
WITH prior AS (
    SELECT h.expires_at, h.amount, h.debits, h.request_hash
    FROM credits.holds h WHERE h.subject_id = $1 AND h.id = $2
), a AS (
    UPDATE credits.credit_accounts a SET
        held        = a.held + CASE WHEN q.debits THEN q.amount ELSE 0 END,
        month_spend = {_MONTH_SPEND},
        month_start = greatest(a.month_start, {_THIS_MONTH})
    FROM unnest($3::text[], $4::bigint[], $5::boolean[]) AS q(tier, amount, debits)
    WHERE a.subject_id = $1
      AND NOT EXISTS (SELECT 1 FROM prior)
      AND q.tier = CASE WHEN a.tier = ANY($3::text[]) THEN a.tier ELSE $6 END
      AND a.status = 'active'
      AND (NOT q.debits OR q.amount = 0 OR (
               a.balance - a.held >= q.amount
           AND (a.monthly_cap IS NULL OR {_MONTH_SPEND} + a.held + q.amount <= a.monthly_cap)))
    RETURNING a.subject_id, a.tier, q.amount, q.debits
), h AS (
    INSERT INTO credits.holds
        (id, subject_id, amount, debits, expires_at, model, power_level, request_hash)
    SELECT $2, a.subject_id, a.amount, a.debits, now() + $7::integer * interval '1 second', $8, $9,
           $10::bytea
    FROM a
    RETURNING expires_at
)
SELECT h.expires_at, a.tier, a.amount, a.debits, $10::bytea AS request_hash, false AS replayed
FROM h, a
UNION ALL
SELECT p.expires_at, (SELECT tier FROM credits.credit_accounts WHERE subject_id = $1), p.amount,
       p.debits, p.request_hash, true
FROM prior p
"""

# Ends an open hold (or settles an expired one late). $3 is the charge (NULL = the hold's own
# amount, i.e. capture; 0 = void).
# $1 subject, $2 hold id, $3 charge, $4 hold status, $5 usage status, $6 service, $7 model,
# $8 provider, $9 prompt, $10 completion, $11 cached, $12 reasoning, $13 cost, $14 latency ms,
# $15 metadata
SQL_RESOLVE = f"""
WITH prior AS (
    SELECT status FROM credits.holds WHERE subject_id = $1 AND id = $2 FOR UPDATE
), h AS (
    UPDATE credits.holds SET
        status = $4,
        resolved_at = now(),
        settled_amount = coalesce($3, amount)
    FROM prior
    WHERE subject_id = $1 AND id = $2
      -- an open hold ends once; a hold the sweeper released (expired) may still be settled by
      -- the usage that arrives late, since the upstream did serve it
      AND (prior.status = 'open' OR ($4 = 'settled' AND prior.status = 'expired'))
    RETURNING amount, debits, power_level, coalesce($3, amount) AS charge,
              prior.status = 'open' AS was_open
), a AS (
    UPDATE credits.credit_accounts a SET
        balance     = a.balance - CASE WHEN h.debits THEN h.charge ELSE 0 END,
        held        = a.held - CASE WHEN h.debits AND h.was_open THEN h.amount ELSE 0 END,
        month_spend = {_MONTH_SPEND} + CASE WHEN h.debits THEN h.charge ELSE 0 END,
        month_start = greatest(a.month_start, {_THIS_MONTH})
    FROM h
    WHERE a.subject_id = $1
    RETURNING a.balance, h.debits, h.charge, h.power_level
), t AS (
    INSERT INTO credits.credit_transactions
        (subject_id, amount, balance_after, type, idempotency_key, hold_id, model, provider,
         power_level, prompt_tokens, completion_tokens, metadata)
    SELECT $1, -a.charge, a.balance, 'usage', 'hold:' || $2::text, $2, $7, $8,
           a.power_level, $9, $10, $15
    FROM a WHERE a.debits AND a.charge > 0
    RETURNING id
), u AS (
    INSERT INTO credits.usage_events
        (subject_id, request_id, service, model, provider, power_level, prompt_tokens,
         completion_tokens, cached_tokens, reasoning_tokens, cost, charged, latency_ms, status,
         transaction_id, metadata)
    SELECT $1, $2::text, $6, $7, $8, a.power_level, $9, $10, $11, $12,
           coalesce($13, a.charge), CASE WHEN a.debits THEN a.charge ELSE 0 END, $14, $5,
           (SELECT id FROM t), $15
    FROM a
    ON CONFLICT (subject_id, request_id) DO UPDATE SET
        status = EXCLUDED.status, model = EXCLUDED.model, provider = EXCLUDED.provider,
        prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
        cached_tokens = EXCLUDED.cached_tokens, reasoning_tokens = EXCLUDED.reasoning_tokens,
        cost = EXCLUDED.cost, charged = EXCLUDED.charged, latency_ms = EXCLUDED.latency_ms,
        transaction_id = EXCLUDED.transaction_id,
        metadata = credits.usage_events.metadata || EXCLUDED.metadata
    RETURNING id
)
SELECT a.balance, a.charge, a.debits, (SELECT id FROM t) AS transaction_id FROM a
"""

# How a hold ended, and the settlement it made: what a resolution retried after a lost reply
# answers, when the hold ended exactly as it asked ($1 subject, $2 hold id)
SQL_RESOLVED = """
SELECT h.status, h.amount, h.settled_amount, h.debits, t.id AS transaction_id,
       coalesce(t.balance_after, a.balance) AS balance
FROM credits.holds h
JOIN credits.credit_accounts a ON a.subject_id = h.subject_id
LEFT JOIN credits.credit_transactions t
       ON t.subject_id = h.subject_id AND t.idempotency_key = 'hold:' || h.id::text
WHERE h.subject_id = $1 AND h.id = $2
"""

SQL_HOLD_AGAIN = """
SELECT h.expires_at, a.tier, h.amount, h.debits, h.request_hash, true AS replayed
FROM credits.holds h JOIN credits.credit_accounts a USING (subject_id)
WHERE h.subject_id = $1 AND h.id = $2
"""

SQL_EXPIRED_HOLDS = """
SELECT subject_id, id FROM credits.holds
WHERE status = 'open' AND expires_at < now()
ORDER BY expires_at
LIMIT $1
"""

SQL_SET_CAP = f"""
UPDATE credits.credit_accounts a SET monthly_cap = $2 WHERE a.subject_id = $1
RETURNING {ACCOUNT_COLUMNS}
"""

SQL_DISCREPANCIES = "SELECT * FROM credits.v_ledger_discrepancies"


__all__ = [
    "ACCOUNT_COLUMNS",
    "SQL_APPLY_BONUS",
    "SQL_BULK_CLAIM",
    "SQL_BULK_REQUEST",
    "SQL_CREATE_ACCOUNT",
    "SQL_CREDIT",
    "SQL_DISCREPANCIES",
    "SQL_EXPIRED_HOLDS",
    "SQL_GET_ACCOUNT",
    "SQL_HOLD",
    "SQL_HOLD_AGAIN",
    "SQL_LOCK_ACCOUNT",
    "SQL_REFUNDABLE",
    "SQL_RESOLVE",
    "SQL_RESOLVED",
    "SQL_SET_CAP",
    "SQL_TX_BY_KEY",
    "SQL_TX_REQUEST",
]
