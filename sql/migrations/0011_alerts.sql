-- Balance alerts, written to a durable outbox in the same transaction as the change that
-- crosses a threshold, and delivered by signed webhook (Standard Webhooks) with retries.
--
-- Thresholds: an account's own (alert_balances: balance.low below each amount;
-- alert_cap_percents: monthly_cap.reached at each percentage of its monthly cap), else its tier's
-- defaults (credits.alert_defaults, written from credits.yaml at start-up; tier '' for the rest).
-- An alert fires when a write crosses its threshold (the row's old and new values, under its
-- lock): once per crossing, and armed again by whatever lifts the balance back above it (or a new
-- month, for the cap). balance.depleted fires when the balance falls to zero or below.

ALTER TABLE credits.credit_accounts
    ADD COLUMN alert_balances     bigint[],
    ADD COLUMN alert_cap_percents integer[],
    -- the highest balance.low threshold in force (own or the tier's): below it, or at zero, a
    -- falling balance is looked at; above it the trigger does not even run (every settlement
    -- lowers a balance)
    ADD COLUMN alert_ceiling      bigint;

CREATE TABLE credits.alert_defaults (
    tier         text     NOT NULL PRIMARY KEY CHECK (length(tier) <= 64),
    balances     bigint[] NOT NULL DEFAULT '{}',
    cap_percents integer[] NOT NULL DEFAULT '{80,100}'
);
INSERT INTO credits.alert_defaults (tier) VALUES ('');

CREATE FUNCTION credits.alert_ceiling(p_tier text, p_balances bigint[]) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT max(x) FROM unnest(coalesce(p_balances, (
        SELECT balances FROM credits.alert_defaults WHERE tier IN (p_tier, '')
        ORDER BY tier = p_tier DESC LIMIT 1))) AS x
$$;
CREATE FUNCTION credits.set_alert_ceiling() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.alert_ceiling := credits.alert_ceiling(NEW.tier, NEW.alert_balances);
    RETURN NEW;
END
$$;
CREATE TRIGGER credit_accounts_alert_ceiling
    BEFORE INSERT OR UPDATE OF tier, alert_balances ON credits.credit_accounts
    FOR EACH ROW EXECUTE FUNCTION credits.set_alert_ceiling();

-- Every event, once; webhook-id is its event_id, the same on every attempt and replay.
CREATE TABLE credits.outbox (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   text        NOT NULL UNIQUE
                           DEFAULT ('evt_' || replace(gen_random_uuid()::text, '-', '')),
    type       text        NOT NULL CHECK (type IN
                   ('balance.low', 'balance.depleted', 'monthly_cap.reached', 'grant.expiring',
                    'grant.expired', 'topup.succeeded', 'topup.failed')),
    subject_id text,
    data       jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- copied into a delivery for every endpoint that takes its type (by the dispatcher)
    fanned_out boolean     NOT NULL DEFAULT false
);
CREATE INDEX outbox_pending ON credits.outbox (id) WHERE NOT fanned_out;
CREATE INDEX outbox_by_subject ON credits.outbox (subject_id, id);

CREATE TABLE credits.webhook_endpoints (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url             text        NOT NULL CHECK (length(url) BETWEEN 1 AND 2000),
    events          text[],     -- NULL: every type
    format          text        NOT NULL DEFAULT 'standard' CHECK (format IN ('standard', 'slack')),
    description     text        CHECK (length(description) <= 500),
    -- the signing secret, encrypted (crypto.SecretBox); after a rotation the previous one signs
    -- too until previous_until, so receivers can switch without losing an event
    secret          bytea       NOT NULL,
    previous_secret bytea,
    previous_until  timestamptz,
    active          boolean     NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE credits.webhook_deliveries (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id       bigint      NOT NULL REFERENCES credits.outbox (id),
    endpoint_id     bigint      NOT NULL REFERENCES credits.webhook_endpoints (id),
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- a claimed delivery's next attempt is pushed past the claim's lease: a dispatcher that
    -- dies mid-attempt leaves it to be tried again
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- retries go on until this much after it (re)started, then it is dead
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text        CHECK (length(last_error) <= 1000),
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (outbox_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON credits.webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON credits.webhook_deliveries (endpoint_id, id DESC);

-- an amount in micro-credits as the API writes it ("12.500000")
CREATE FUNCTION credits.credits_text(amount bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(round(amount::numeric / 1000000, 6), 'FM999999999999990.000000')
$$;

CREATE FUNCTION credits.watch_thresholds() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    d          credits.alert_defaults;
    v_balances bigint[];
    v_percents integer[];
    t          bigint;
    p          integer;
    v_spent    bigint;  -- the month's spend before this write
BEGIN
    IF NEW.alert_balances IS NULL OR NEW.alert_cap_percents IS NULL THEN
        SELECT * INTO d FROM credits.alert_defaults WHERE tier IN (NEW.tier, '')
        ORDER BY tier = NEW.tier DESC LIMIT 1;
    END IF;
    v_balances := coalesce(NEW.alert_balances, d.balances, '{}');
    v_percents := coalesce(NEW.alert_cap_percents, d.cap_percents, '{}');
    IF NEW.balance < OLD.balance THEN
        IF OLD.balance > 0 AND NEW.balance <= 0 THEN
            INSERT INTO credits.outbox (type, subject_id, data)
            VALUES ('balance.depleted', NEW.subject_id,
                    jsonb_build_object('user_id', NEW.subject_id,
                                       'balance', credits.credits_text(NEW.balance)));
        END IF;
        FOREACH t IN ARRAY v_balances LOOP
            IF OLD.balance >= t AND NEW.balance < t THEN
                INSERT INTO credits.outbox (type, subject_id, data)
                VALUES ('balance.low', NEW.subject_id,
                        jsonb_build_object('user_id', NEW.subject_id,
                                           'balance', credits.credits_text(NEW.balance),
                                           'threshold', credits.credits_text(t)));
            END IF;
        END LOOP;
    END IF;
    v_spent := CASE WHEN OLD.month_start < NEW.month_start THEN 0 ELSE OLD.month_spend END;
    IF NEW.monthly_cap > 0 AND NEW.month_spend > v_spent THEN
        FOREACH p IN ARRAY v_percents LOOP
            -- (in numeric: a cap near bigint's limit times a percentage would overflow)
            IF v_spent::numeric * 100 < NEW.monthly_cap::numeric * p
               AND NEW.month_spend::numeric * 100 >= NEW.monthly_cap::numeric * p THEN
                INSERT INTO credits.outbox (type, subject_id, data)
                VALUES ('monthly_cap.reached', NEW.subject_id,
                        jsonb_build_object('user_id', NEW.subject_id, 'percent', p,
                                           'monthly_cap', credits.credits_text(NEW.monthly_cap),
                                           'month_spend', credits.credits_text(NEW.month_spend)));
            END IF;
        END LOOP;
    END IF;
    RETURN NULL;
END
$$;
-- (the condition keeps the function off the common settlement: a balance well above its
-- thresholds, no monthly cap)
CREATE TRIGGER credit_accounts_thresholds
    AFTER UPDATE OF balance, month_spend ON credits.credit_accounts
    FOR EACH ROW WHEN (
        (NEW.balance < OLD.balance AND NEW.balance < greatest(NEW.alert_ceiling, 1))
        OR (NEW.monthly_cap IS NOT NULL
            AND (NEW.month_spend > OLD.month_spend OR NEW.month_start > OLD.month_start)))
    EXECUTE FUNCTION credits.watch_thresholds();

-- grant.expired: with the expiry row, in its transaction
CREATE FUNCTION credits.announce_expiry() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO credits.outbox (type, subject_id, data)
    VALUES ('grant.expired', NEW.subject_id,
            jsonb_build_object('user_id', NEW.subject_id, 'grant_id', (NEW.metadata ->> 'grant_id')::bigint,
                               'amount', credits.credits_text(-NEW.amount),
                               'balance', credits.credits_text(NEW.balance_after)));
    RETURN NULL;
END
$$;
CREATE TRIGGER credit_transactions_expiry_alert AFTER INSERT ON credits.credit_transactions
    FOR EACH ROW WHEN (NEW.type = 'expiry') EXECUTE FUNCTION credits.announce_expiry();

-- grant.expiring: a grant's expiry announced once, some days ahead (the dispatcher's sweep)
ALTER TABLE credits.grants ADD COLUMN expiring_announced boolean NOT NULL DEFAULT false;
