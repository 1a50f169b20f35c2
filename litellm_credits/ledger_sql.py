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
_TODAY = "(now() AT TIME ZONE 'UTC')::date"
_DAY_SPEND = f"(CASE WHEN a.day_start < {_TODAY} THEN 0 ELSE a.day_spend END)"

ACCOUNT_COLUMNS = f"""
    a.subject_id, a.subject_type, a.tier, a.balance, a.held, a.monthly_cap,
    {_MONTH_SPEND} AS month_spend, a.status, a.display_name, a.created_at, a.updated_at,
    {_NEXT_MONTH_AT} AS resets_at, a.parent_id, a.daily_cap, a.request_cap,
    {_DAY_SPEND} AS day_spend
"""

SQL_GET_ACCOUNT = f"SELECT {ACCOUNT_COLUMNS} FROM credits.credit_accounts a WHERE a.subject_id = $1"

SQL_CREATE_ACCOUNT = f"""
INSERT INTO credits.credit_accounts AS a
    (subject_id, subject_type, tier, monthly_cap, display_name, parent_id, daily_cap, request_cap)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (subject_id) DO NOTHING
RETURNING {ACCOUNT_COLUMNS}
"""

# A member's credits are its team's: only refunds (of what it spent before it joined) and
# adjustments reach its own balance; no row is written for anything else. $8-$10 are the terms of
# the grant the credit opens (category, priority, expiry; NULL: its type's defaults): the trigger
# credits.apply_to_grants (migration 0010) opens it, or burns grants for a negative adjustment.
# $11: the member a team's credit came from (a top-up a member paid for), else NULL.
SQL_CREDIT = """
WITH a AS (
    UPDATE credits.credit_accounts SET balance = balance + $2
    WHERE subject_id = $1 AND (parent_id IS NULL OR $3 IN ('refund', 'adjustment'))
    RETURNING balance
)
INSERT INTO credits.credit_transactions
    (subject_id, amount, balance_after, type, idempotency_key, description, metadata, refund_of,
     grant_category, grant_priority, grant_expires_at, member_id)
SELECT $1, $2, a.balance, $3, $4, $5, $6, $7, $8, $9, $10, $11 FROM a
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
    SELECT r.code, div($2 * r.value, 100)::bigint AS bonus, c.credit_priority,
           now() + c.credit_valid_days * interval '1 day' AS expires_at
    FROM r JOIN credits.coupon_codes c ON c.code = r.code
), a AS (
    UPDATE credits.credit_accounts SET balance = balance + b.bonus
    FROM b
    WHERE subject_id = $1 AND b.bonus > 0
    RETURNING balance, b.bonus, b.code, b.credit_priority, b.expires_at
), t AS (
    INSERT INTO credits.credit_transactions
        (subject_id, amount, balance_after, type, idempotency_key, description, metadata,
         grant_category, grant_priority, grant_expires_at)
    SELECT $1, a.bonus, a.balance, 'coupon', 'coupon-bonus:' || a.code,
           'coupon ' || a.code || ': bonus on an allocation',
           jsonb_build_object('coupon', a.code, 'allocation_id', $3::bigint),
           'promotional', a.credit_priority, a.expires_at
    FROM a
    RETURNING id
)
UPDATE credits.coupon_redemptions SET applied_at = now(), transaction_id = (SELECT id FROM t)
WHERE subject_id = $1 AND code = (SELECT code FROM a)
RETURNING (SELECT bonus FROM a)
"""
SQL_PARENT = "SELECT parent_id FROM credits.credit_accounts WHERE subject_id = $1"
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
SELECT type, amount, refund_of, metadata, grant_category, grant_priority, grant_expires_at
FROM credits.credit_transactions
WHERE subject_id = $1 AND idempotency_key = $2
"""

SQL_TX_BY_KEY = """
SELECT id, subject_id, amount, balance_after, type, idempotency_key, description, created_at
FROM credits.credit_transactions WHERE subject_id = $1 AND idempotency_key = $2
"""

# Takes a hold in one statement: credits.take_hold (migration 0009) has the rules. The amount
# depends on the paying account's tier (its markup, or no debit on an unlimited tier), so the
# caller quotes every tier and the function picks the payer's: $3 tiers, $4 amounts, $5 minimums
# (the least a clamped hold may take; NULL: refuse what does not fit), $6 debits (parallel
# arrays), $7 the tier for unknown ones. $1 subject, $2 hold id (its idempotency key: a hold that
# exists is returned as it is, before any balance, cap or status is looked at), $8 ttl seconds,
# $9 model, $10 power level, $11 request hash (or NULL), $12 whether the caller just minted the id
# (a random one, first attempt: not looked for).
SQL_HOLD = "SELECT * FROM credits.take_hold($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"

# Ends an open hold (or settles an expired one late): credits.resolve_hold. $3 is the charge
# (NULL = the hold's own amount, i.e. capture; 0 = void). $1 payer, $2 hold id, $4 hold status,
# $5 usage status, $6 service, $7 model, $8 provider, $9 prompt, $10 completion, $11 cached,
# $12 reasoning, $13 cost, $14 latency ms, $15 metadata
SQL_RESOLVE = (
    "SELECT * FROM credits.resolve_hold($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
)

# Group commit (migration 0014): a batch of holds, or of resolutions, in one statement and one
# commit. $1 is a jsonb array of items, each with the single-item function's parameters by name
# (ledger_batch.HoldItem.json, ResolveItem.json); one row per item with its index (idx, from 0),
# none for a resolution whose hold had already ended. Every account the batch touches is locked
# first, in one order (members, then the rest, each sorted by id), then the items run in order.
# (the items as JSON text: ledger_batch.batch_json)
SQL_TAKE_BATCH = "SELECT * FROM credits.take_holds($1::text::jsonb)"
SQL_RESOLVE_BATCH = "SELECT * FROM credits.resolve_holds($1::text::jsonb)"

# How a hold ended, and the settlement it made: what a resolution retried after a lost reply
# answers, when the hold ended exactly as it asked ($1 subject, $2 hold id); settlement_id: the
# id the resolution that ended it gave itself (its usage event's metadata, the event being the
# member's for a member's hold), if it gave one
SQL_RESOLVED = """
SELECT h.status, h.amount, h.settled_amount, h.debits, h.member_id, t.id AS transaction_id,
       coalesce(t.balance_after, a.balance) AS balance, e.metadata ->> 'settlement_id' AS settlement_id
FROM credits.holds h
JOIN credits.credit_accounts a ON a.subject_id = h.subject_id
LEFT JOIN credits.credit_transactions t
       ON t.subject_id = h.subject_id AND t.idempotency_key = 'hold:' || h.id::text
LEFT JOIN credits.usage_events e
       ON e.subject_id = coalesce(h.member_id, h.subject_id) AND e.request_id = h.id::text
WHERE h.subject_id = $1 AND h.id = $2
"""

# A hold read back by its id, in take_hold's shape: for the account that made it ($1, the payer
# or the member) and the id ($2)
SQL_HOLD_AGAIN = """
SELECT 'replayed' AS outcome, h.subject_id AS payer_id, a.tier, h.amount, h.debits, h.expires_at,
       h.request_hash, NULL::bigint AS room, h.amount AS quoted
FROM credits.holds h JOIN credits.credit_accounts a ON a.subject_id = h.subject_id
WHERE h.id = $2 AND (h.subject_id = $1 OR h.member_id = $1)
"""

# holds past their expiry, with the labels a captured one's charge counts under
SQL_EXPIRED_HOLDS = """
SELECT h.subject_id, h.id, h.model, a.tier
FROM credits.holds h JOIN credits.credit_accounts a ON a.subject_id = h.subject_id
WHERE h.status = 'open' AND h.expires_at < now() ORDER BY h.expires_at LIMIT $1
"""

SQL_SET_CAP = f"""
UPDATE credits.credit_accounts a SET monthly_cap = $2 WHERE a.subject_id = $1
RETURNING {ACCOUNT_COLUMNS}
"""

SQL_DISCREPANCIES = "SELECT * FROM credits.v_ledger_discrepancies"

# SQLSTATE raised by credits.check_team_levels (migration 0009): a team deeper than two levels
TEAM_LEVELS = "CR002"


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
    "SQL_PARENT",
    "SQL_REFUNDABLE",
    "SQL_RESOLVE",
    "SQL_RESOLVED",
    "SQL_RESOLVE_BATCH",
    "SQL_SET_CAP",
    "SQL_TAKE_BATCH",
    "SQL_TX_BY_KEY",
    "SQL_TX_REQUEST",
    "TEAM_LEVELS",
]
