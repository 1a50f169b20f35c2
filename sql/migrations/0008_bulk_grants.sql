-- The idempotency keys of bulk allocations, with a hash of what each asked for. Each grant's own
-- ledger row carries "<key>:<account>", which a replay for other accounts would never meet: this
-- row makes any reuse of the key for another request a conflict. Not on the hot path, and not
-- keyed by account (a bulk grant spans accounts by nature).
CREATE TABLE credits.bulk_grants (
    idempotency_key text        NOT NULL PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_hash    text        NOT NULL CHECK (length(request_hash) = 64),
    subjects        text[]      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
