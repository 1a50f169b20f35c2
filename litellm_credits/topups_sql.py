"""The SQL of paid top-ups and auto-recharge (topups.py)."""

SQL_ACCOUNT = "SELECT parent_id FROM credits.credit_accounts WHERE subject_id = $1"
SQL_NEW = """
INSERT INTO credits.topups (subject_id, amount, currency, unit_amount) VALUES ($1, $2, $3, $4)
RETURNING id
"""
SQL_SESSION = "UPDATE credits.topups SET checkout_session_id = $2, updated_at = now() WHERE id = $1"
SQL_EVENT = """
INSERT INTO credits.stripe_events (event_id, type) VALUES ($1, $2)
ON CONFLICT (event_id) DO NOTHING RETURNING event_id
"""
SQL_OUTCOME = "UPDATE credits.stripe_events SET outcome = $2 WHERE event_id = $1"
SQL_BY_SESSION = "SELECT * FROM credits.topups WHERE checkout_session_id = $1 FOR UPDATE"
SQL_BY_INTENT = "SELECT * FROM credits.topups WHERE payment_intent_id = $1 FOR UPDATE"
# the account $1 (locked), or the team it spends from: the account a paid top-up credits
SQL_PAYER_LOCKED = """
SELECT coalesce(parent_id, subject_id) FROM credits.credit_accounts WHERE subject_id = $1 FOR NO KEY UPDATE
"""
# the account whose ledger row $1 credited top-up $2 (its own, or its team's if it had joined one):
# found by the top-up's id in the row's metadata, the GIN index (no index on a row's id alone)
SQL_CREDITED_TO = """
SELECT subject_id FROM credits.credit_transactions
WHERE metadata @> jsonb_build_object('topup_id', $2::bigint) AND id = $1
"""
SQL_PAID = """
UPDATE credits.topups SET status = 'paid', payment_intent_id = coalesce($2, payment_intent_id),
    transaction_id = $3, updated_at = now()
WHERE id = $1
"""
SQL_STATUS = "UPDATE credits.topups SET status = $2, updated_at = now() WHERE id = $1 AND status = 'open'"
SQL_REVERSED = (
    "UPDATE credits.topups SET reversed = $2, disputed = disputed OR $3, updated_at = now() WHERE id = $1"
)
SQL_ALERT = "INSERT INTO credits.outbox (type, subject_id, data) VALUES ($1, $2, $3)"
SQL_RECHARGE_TERMS = """
SELECT r.amount FROM credits.auto_recharge r JOIN credits.credit_accounts a ON a.subject_id = r.subject_id
WHERE r.subject_id = $1 AND r.enabled AND a.balance < r.threshold AND a.parent_id IS NULL
"""
# a recharge of account $1, claimed only while none is in flight (the unique index) and the month's
# recharges (open or paid) stay under both caps
SQL_RECHARGE_CLAIM = """
WITH month AS (
    SELECT count(*) AS n, coalesce(sum(t.amount), 0) AS total FROM credits.topups t
    WHERE t.subject_id = $1 AND t.kind = 'recharge' AND t.status IN ('open', 'paid', 'failed')
      AND t.created_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
)
INSERT INTO credits.topups (subject_id, amount, currency, unit_amount, kind)
SELECT r.subject_id, r.amount, $2, $3, 'recharge'
FROM credits.auto_recharge r JOIN credits.credit_accounts a ON a.subject_id = r.subject_id, month
WHERE r.subject_id = $1 AND r.enabled AND r.amount = $4 AND a.balance < r.threshold
  AND month.n < r.max_per_month
  AND (r.max_amount_per_month IS NULL OR month.total + r.amount <= r.max_amount_per_month)
ON CONFLICT (subject_id) WHERE kind = 'recharge' AND status = 'open' DO NOTHING
RETURNING id
"""
SQL_RECHARGE_METHOD = "SELECT customer_id, payment_method_id FROM credits.auto_recharge WHERE subject_id = $1"
SQL_INTENT = "UPDATE credits.topups SET payment_intent_id = $2, updated_at = now() WHERE id = $1"
SQL_FAILED = """
UPDATE credits.topups SET status = 'failed', updated_at = now() WHERE id = $1 AND status = 'open' RETURNING *
"""
SQL_BY_ID = "SELECT * FROM credits.topups WHERE id = $1 FOR UPDATE"
UNANSWERED_RECHARGE = 120  # seconds
STALE_RECHARGE = 23 * 3600
SQL_UNANSWERED_RECHARGES = """
SELECT id, subject_id, unit_amount FROM credits.topups
WHERE kind = 'recharge' AND status = 'open' AND payment_intent_id IS NULL
  AND updated_at < now() - make_interval(secs => $1) AND created_at > now() - make_interval(secs => $2)
ORDER BY id LIMIT 100
"""
SQL_STALE_RECHARGES = """
UPDATE credits.topups SET status = 'failed', updated_at = now()
WHERE kind = 'recharge' AND status = 'open' AND payment_intent_id IS NULL
  AND created_at < now() - make_interval(secs => $1)
RETURNING *
"""
SQL_DUE_RECHARGES = """
SELECT r.subject_id FROM credits.auto_recharge r JOIN credits.credit_accounts a ON a.subject_id = r.subject_id
WHERE r.enabled AND a.balance < r.threshold AND a.parent_id IS NULL
  AND NOT EXISTS (SELECT 1 FROM credits.topups t
                  WHERE t.subject_id = r.subject_id AND t.kind = 'recharge' AND t.status = 'open')
ORDER BY r.subject_id LIMIT $1
"""
SQL_SET_RECHARGE = """
INSERT INTO credits.auto_recharge
    (subject_id, threshold, amount, customer_id, payment_method_id, max_per_month, max_amount_per_month)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (subject_id) DO UPDATE SET threshold = EXCLUDED.threshold, amount = EXCLUDED.amount,
    customer_id = EXCLUDED.customer_id, payment_method_id = EXCLUDED.payment_method_id,
    max_per_month = EXCLUDED.max_per_month, max_amount_per_month = EXCLUDED.max_amount_per_month,
    enabled = true, updated_at = now()
RETURNING *
"""
SQL_GET_RECHARGE = "SELECT * FROM credits.auto_recharge WHERE subject_id = $1"
SQL_DISABLE_RECHARGE = (
    "UPDATE credits.auto_recharge SET enabled = false, updated_at = now() WHERE subject_id = $1 RETURNING *"
)
# what a reversal takes from the top-up's own grant (the ledger row that credited it): up to what
# is left of it, burnt here (the debit below names the grant, so no trigger burns it again)
SQL_TAKE_FROM_GRANT = """
WITH g AS (
    SELECT id, least(remaining, $3) AS taken FROM credits.grants
    WHERE subject_id = $1 AND transaction_id = $2 AND status = 'live' AND remaining > 0
)
UPDATE credits.grants x SET remaining = x.remaining - g.taken,
    status = CASE WHEN x.remaining = g.taken THEN 'used' ELSE 'live' END
FROM g WHERE x.subject_id = $1 AND x.id = g.id
RETURNING x.id, g.taken
"""
SQL_DEBIT_GRANT = """
WITH a AS (
    UPDATE credits.credit_accounts SET balance = balance + $2 WHERE subject_id = $1 RETURNING balance
)
INSERT INTO credits.credit_transactions
    (subject_id, amount, balance_after, type, idempotency_key, description, metadata, grant_id, member_id)
SELECT $1, $2, a.balance, 'adjustment', $3, $4, $5, $6, $7 FROM a
RETURNING id, balance_after
"""
SQL_LIST = """
SELECT id, amount, currency, unit_amount, status, reversed, disputed, transaction_id, created_at
FROM credits.topups WHERE subject_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3
"""

__all__ = [
    "SQL_ACCOUNT",
    "SQL_ALERT",
    "SQL_BY_ID",
    "SQL_BY_INTENT",
    "SQL_BY_SESSION",
    "SQL_CREDITED_TO",
    "SQL_DEBIT_GRANT",
    "SQL_DISABLE_RECHARGE",
    "SQL_DUE_RECHARGES",
    "SQL_EVENT",
    "SQL_FAILED",
    "SQL_GET_RECHARGE",
    "SQL_INTENT",
    "SQL_LIST",
    "SQL_NEW",
    "SQL_OUTCOME",
    "SQL_PAID",
    "SQL_PAYER_LOCKED",
    "SQL_RECHARGE_CLAIM",
    "SQL_RECHARGE_METHOD",
    "SQL_RECHARGE_TERMS",
    "SQL_REVERSED",
    "SQL_SESSION",
    "SQL_SET_RECHARGE",
    "SQL_STALE_RECHARGES",
    "SQL_STATUS",
    "SQL_TAKE_FROM_GRANT",
    "SQL_UNANSWERED_RECHARGES",
    "STALE_RECHARGE",
    "UNANSWERED_RECHARGE",
]
