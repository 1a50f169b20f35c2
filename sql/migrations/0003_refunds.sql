-- A refund names the usage it gives back; the sum of an entry's refunds never exceeds its charge
-- (checked under the account's row lock by the ledger).
ALTER TABLE credits.credit_transactions ADD COLUMN refund_of bigint;
ALTER TABLE credits.credit_transactions
    ADD CONSTRAINT credit_transactions_refund_of
    FOREIGN KEY (subject_id, refund_of) REFERENCES credits.credit_transactions (subject_id, id);
ALTER TABLE credits.credit_transactions
    ADD CONSTRAINT credit_transactions_refund_link CHECK ((type = 'refund') = (refund_of IS NOT NULL));
CREATE INDEX credit_transactions_refunds ON credits.credit_transactions (subject_id, refund_of)
    WHERE refund_of IS NOT NULL;
-- accounts are searched by id and display name
CREATE INDEX credit_accounts_created ON credits.credit_accounts (created_at);
