-- Who redeemed which coupon. The primary key makes "once per account" a database rule; a percent
-- coupon waits here (applied_at NULL) until the account's next allocation.
CREATE TABLE credits.coupon_redemptions (
    subject_id     text          NOT NULL REFERENCES credits.credit_accounts (subject_id),
    code           text          NOT NULL REFERENCES credits.coupon_codes (code),
    type           text          NOT NULL CHECK (type IN ('fixed', 'percent')),
    value          numeric(20, 6) NOT NULL CHECK (value > 0),
    transaction_id bigint,
    applied_at     timestamptz,
    created_at     timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_id, code),
    CHECK (type = 'percent' OR applied_at IS NOT NULL)
);
CREATE INDEX coupon_redemptions_pending ON credits.coupon_redemptions (subject_id, created_at)
    WHERE applied_at IS NULL;
