-- litellm-credits core schema: accounts, the append-only ledger, holds, usage events, keys.
--
-- Amounts are bigint micro-credits (1 credit = 1,000,000). Every table is keyed by the credit
-- subject first, so the schema can be distributed by subject (e.g. Citus) and nothing on the
-- hot path needs a cross-subject transaction.

CREATE SCHEMA IF NOT EXISTS credits;

-- Raised by the append-only guard; SQLSTATE CR001 is mapped by code in Python.
CREATE FUNCTION credits.forbid_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credits.% is append-only', TG_TABLE_NAME USING ERRCODE = 'CR001';
END
$$;

CREATE FUNCTION credits.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TABLE credits.credit_accounts (
    subject_id   text        NOT NULL PRIMARY KEY
                             CHECK (length(subject_id) BETWEEN 1 AND 256),
    subject_type text        NOT NULL DEFAULT 'user'
                             CHECK (subject_type IN ('user', 'team', 'end_user', 'key')),
    tier         text        NOT NULL DEFAULT 'free' CHECK (length(tier) BETWEEN 1 AND 64),
    -- may go below zero only by a settled overrun (actual cost above the hold)
    balance      bigint      NOT NULL DEFAULT 0,
    held         bigint      NOT NULL DEFAULT 0 CHECK (held >= 0),
    monthly_cap  bigint      CHECK (monthly_cap IS NULL OR monthly_cap >= 0),
    month_spend  bigint      NOT NULL DEFAULT 0 CHECK (month_spend >= 0),
    -- first day (UTC) of the month month_spend counts; rolled forward lazily by every write
    month_start  date        NOT NULL DEFAULT date_trunc('month', now() AT TIME ZONE 'UTC')::date,
    status       text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    display_name text        CHECK (length(display_name) <= 256),
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_accounts_tier ON credits.credit_accounts (tier);
CREATE TRIGGER credit_accounts_updated_at BEFORE UPDATE ON credits.credit_accounts
    FOR EACH ROW EXECUTE FUNCTION credits.touch_updated_at();

CREATE TABLE credits.credit_transactions (
    id                bigint      GENERATED ALWAYS AS IDENTITY,
    subject_id        text        NOT NULL REFERENCES credits.credit_accounts (subject_id),
    amount            bigint      NOT NULL CHECK (amount <> 0),
    balance_after     bigint      NOT NULL,
    type              text        NOT NULL CHECK (type IN
                          ('allocation', 'bonus', 'refund', 'usage', 'coupon', 'adjustment')),
    idempotency_key   text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    hold_id           uuid,
    model             text,
    provider          text,
    power_level       text        CHECK (power_level IN ('eco', 'balanced', 'precision')),
    prompt_tokens     bigint      CHECK (prompt_tokens >= 0),
    completion_tokens bigint      CHECK (completion_tokens >= 0),
    description       text        CHECK (length(description) <= 1000),
    metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_id, id),
    UNIQUE (subject_id, idempotency_key),
    -- credits come in as positive rows, usage goes out as negative ones
    CHECK (type NOT IN ('allocation', 'bonus', 'refund', 'coupon') OR amount > 0),
    CHECK (type <> 'usage' OR amount < 0)
);
CREATE INDEX credit_transactions_history
    ON credits.credit_transactions (subject_id, created_at DESC, id DESC);
CREATE INDEX credit_transactions_created ON credits.credit_transactions (created_at);
CREATE INDEX credit_transactions_metadata ON credits.credit_transactions USING gin (metadata);
CREATE TRIGGER credit_transactions_append_only
    BEFORE UPDATE OR DELETE ON credits.credit_transactions
    FOR EACH ROW EXECUTE FUNCTION credits.forbid_change();
CREATE TRIGGER credit_transactions_no_truncate
    BEFORE TRUNCATE ON credits.credit_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION credits.forbid_change();

-- A hold is a pending transfer: it counts against the available balance until it ends,
-- exactly once, as settled, voided, expired (released) or captured (charged its estimate).
CREATE TABLE credits.holds (
    id             uuid        NOT NULL,
    subject_id     text        NOT NULL REFERENCES credits.credit_accounts (subject_id),
    amount         bigint      NOT NULL CHECK (amount >= 0),
    -- false for unlimited tiers: usage is recorded but never debited
    debits         boolean     NOT NULL DEFAULT true,
    status         text        NOT NULL DEFAULT 'open'
                               CHECK (status IN ('open', 'settled', 'voided', 'expired', 'captured')),
    model          text,
    power_level    text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    resolved_at    timestamptz,
    settled_amount bigint      CHECK (settled_amount >= 0),
    PRIMARY KEY (subject_id, id),
    CHECK ((status = 'open') = (resolved_at IS NULL)),
    CHECK (expires_at > created_at)
);
CREATE INDEX holds_open_by_expiry ON credits.holds (expires_at) WHERE status = 'open';

CREATE TABLE credits.usage_events (
    id                bigint      GENERATED ALWAYS AS IDENTITY,
    subject_id        text        NOT NULL REFERENCES credits.credit_accounts (subject_id),
    request_id        text        NOT NULL CHECK (length(request_id) BETWEEN 1 AND 200),
    service           text        NOT NULL DEFAULT 'chat' CHECK (service IN
                          ('chat', 'embedding', 'image', 'audio_speech', 'audio_transcription',
                           'search', 'other')),
    model             text,
    provider          text,
    power_level       text,
    prompt_tokens     bigint      NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint      NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cached_tokens     bigint      NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    reasoning_tokens  bigint      NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    -- full price of the request, and what was actually debited (0 on unlimited tiers)
    cost              bigint      NOT NULL DEFAULT 0 CHECK (cost >= 0),
    charged           bigint      NOT NULL DEFAULT 0 CHECK (charged >= 0),
    latency_ms        integer     CHECK (latency_ms >= 0),
    status            text        NOT NULL CHECK (status IN ('success', 'failed', 'expired')),
    transaction_id    bigint,
    metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_id, id),
    UNIQUE (subject_id, request_id)
);
CREATE INDEX usage_events_by_subject_time ON credits.usage_events (subject_id, created_at DESC);
CREATE INDEX usage_events_by_time ON credits.usage_events USING brin (created_at);

-- Keys this plugin issued (for proxies without LiteLLM's own key database).
CREATE TABLE credits.api_keys (
    key_hash   bytea       NOT NULL PRIMARY KEY CHECK (length(key_hash) = 32),
    subject_id text        NOT NULL REFERENCES credits.credit_accounts (subject_id),
    key_prefix text        NOT NULL,
    role       text        NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'service', 'admin')),
    name       text        CHECK (length(name) <= 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_by_subject ON credits.api_keys (subject_id);

CREATE TABLE credits.coupon_codes (
    code        text        NOT NULL PRIMARY KEY CHECK (code ~ '^[A-Za-z0-9_-]{3,64}$'),
    type        text        NOT NULL CHECK (type IN ('fixed', 'percent')),
    value       numeric(20, 6) NOT NULL CHECK (value > 0),
    max_uses    integer     CHECK (max_uses > 0),
    uses        integer     NOT NULL DEFAULT 0 CHECK (uses >= 0),
    expires_at  timestamptz,
    tiers       text[],
    active      boolean     NOT NULL DEFAULT true,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (max_uses IS NULL OR uses <= max_uses),
    CHECK (type <> 'percent' OR value <= 1000)
);
CREATE TRIGGER coupon_codes_updated_at BEFORE UPDATE ON credits.coupon_codes
    FOR EACH ROW EXECUTE FUNCTION credits.touch_updated_at();

CREATE TABLE credits.openrouter_accounts (
    subject_id      text        NOT NULL PRIMARY KEY
                                REFERENCES credits.credit_accounts (subject_id),
    key_hash        bytea       NOT NULL,
    encrypted_key   bytea       NOT NULL,
    key_tail        text        NOT NULL,
    provider_key_id text,
    byok            boolean     NOT NULL DEFAULT false,
    credit_limit    bigint      CHECK (credit_limit >= 0),
    last_synced_at  timestamptz,
    status          text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER openrouter_accounts_updated_at BEFORE UPDATE ON credits.openrouter_accounts
    FOR EACH ROW EXECUTE FUNCTION credits.touch_updated_at();

-- Read interface for operators. Amounts in credits (numeric, exact).
CREATE VIEW credits.v_credit_balance_by_tier AS
SELECT tier,
       count(*)                                   AS accounts,
       count(*) FILTER (WHERE status = 'active')   AS active_accounts,
       sum(balance)::numeric / 1000000            AS total_balance,
       round(avg(balance)::numeric / 1000000, 6)  AS avg_balance,
       sum(held)::numeric / 1000000               AS total_held
FROM credits.credit_accounts
GROUP BY tier;

CREATE VIEW credits.v_daily_usage_summary AS
SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
       subject_id,
       service,
       model,
       count(*)                                    AS requests,
       count(*) FILTER (WHERE status = 'success')  AS succeeded,
       sum(prompt_tokens)                          AS prompt_tokens,
       sum(completion_tokens)                      AS completion_tokens,
       sum(cost)::numeric / 1000000                AS cost,
       sum(charged)::numeric / 1000000             AS charged
FROM credits.usage_events
GROUP BY 1, 2, 3, 4;

CREATE VIEW credits.v_top_spenders_30d AS
SELECT subject_id,
       sum(charged)::numeric / 1000000 AS spent,
       count(*)                        AS requests,
       rank() OVER (ORDER BY sum(charged) DESC) AS rank
FROM credits.usage_events
WHERE created_at >= now() - interval '30 days'
GROUP BY subject_id
ORDER BY sum(charged) DESC
LIMIT 100;

-- Audit: rows here mean the denormalised columns disagree with the ledger or the holds.
CREATE VIEW credits.v_ledger_discrepancies AS
SELECT a.subject_id, a.balance, coalesce(t.total, 0) AS ledger_total, a.held, coalesce(h.open, 0) AS open_holds
FROM credits.credit_accounts a
LEFT JOIN (SELECT subject_id, sum(amount) AS total FROM credits.credit_transactions GROUP BY 1) t
       ON t.subject_id = a.subject_id
LEFT JOIN (SELECT subject_id, sum(amount) AS open FROM credits.holds
           WHERE status = 'open' AND debits GROUP BY 1) h
       ON h.subject_id = a.subject_id
WHERE a.balance <> coalesce(t.total, 0) OR a.held <> coalesce(h.open, 0);
