-- What a keyed hold was asked for (a SHA-256 of the request), so that a replay of its key is
-- told apart from a different request under the same key whatever the balance, the tier or the
-- prices are by then. NULL on holds the proxy mints an id for (never replayed by a client) and
-- on holds made before this migration (compared by amount instead). The CHECK is NOT VALID: it
-- holds for every new row, and adding it does not scan a large holds table under its lock.
ALTER TABLE credits.holds ADD COLUMN request_hash bytea;
ALTER TABLE credits.holds ADD CONSTRAINT holds_request_hash_length
    CHECK (length(request_hash) = 32) NOT VALID;
