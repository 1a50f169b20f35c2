-- Paid top-ups through Stripe Checkout: a top-up is credited once, as a paid grant (a `topup`
-- ledger row), when Stripe says it was paid; a refund or a dispute takes the credits back as an
-- adjustment (the balance may go below zero: the next hold sees it).

CREATE TABLE credits.topups (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject_id          text        NOT NULL REFERENCES credits.credit_accounts (subject_id),
    amount              bigint      NOT NULL CHECK (amount > 0),       -- micro-credits it buys
    currency            text        NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    unit_amount         bigint      NOT NULL CHECK (unit_amount > 0),  -- what it costs, minor units
    checkout_session_id text        UNIQUE,
    payment_intent_id   text,
    status              text        NOT NULL DEFAULT 'open'
                                    CHECK (status IN ('open', 'paid', 'failed', 'expired')),
    transaction_id      bigint,
    -- micro-credits taken back by refunds and disputes
    reversed            bigint      NOT NULL DEFAULT 0 CHECK (reversed >= 0 AND reversed <= amount),
    disputed            boolean     NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX topups_by_subject ON credits.topups (subject_id, id DESC);
CREATE INDEX topups_by_payment_intent ON credits.topups (payment_intent_id) WHERE payment_intent_id IS NOT NULL;

-- Stripe's events, once each: a delivery seen before is answered and changes nothing
CREATE TABLE credits.stripe_events (
    event_id    text        NOT NULL PRIMARY KEY CHECK (length(event_id) <= 255),
    type        text        NOT NULL,
    outcome     text,
    received_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE credits.outbox DROP CONSTRAINT outbox_type_check,
    ADD CONSTRAINT outbox_type_check CHECK (type IN
        ('balance.low', 'balance.depleted', 'monthly_cap.reached', 'grant.expiring',
         'grant.expired', 'topup.succeeded', 'topup.failed', 'topup.reversed'));
