-- Auto-recharge: below a threshold, an account buys a configured amount off-session with its saved
-- payment method. The credits come only when Stripe reports the payment succeeded (its webhook);
-- at most one recharge is in flight per account (the index below), and a month's recharges are
-- capped in number and in credits.

CREATE TABLE credits.auto_recharge (
    subject_id           text        NOT NULL PRIMARY KEY REFERENCES credits.credit_accounts (subject_id),
    threshold            bigint      NOT NULL CHECK (threshold >= 0),   -- recharge below this balance
    amount               bigint      NOT NULL CHECK (amount > 0),       -- micro-credits bought each time
    customer_id          text        NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 255),
    payment_method_id    text        NOT NULL CHECK (length(payment_method_id) BETWEEN 1 AND 255),
    max_per_month        integer     NOT NULL DEFAULT 5 CHECK (max_per_month > 0),
    max_amount_per_month bigint      CHECK (max_amount_per_month > 0),
    enabled              boolean     NOT NULL DEFAULT true,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE credits.topups
    ADD COLUMN kind text NOT NULL DEFAULT 'checkout' CHECK (kind IN ('checkout', 'recharge'));
CREATE UNIQUE INDEX topups_one_recharge_in_flight ON credits.topups (subject_id)
    WHERE kind = 'recharge' AND status = 'open';
