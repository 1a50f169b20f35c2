-- What a keyed hold was asked for (a SHA-256 of the request), so that a replay of its key is
-- told apart from a different request under the same key whatever the balance, the tier or the
-- prices are by then. NULL on holds the proxy mints an id for (never replayed by a client) and
-- on holds made before this migration (compared by amount instead).
ALTER TABLE credits.holds
    ADD COLUMN request_hash bytea CHECK (length(request_hash) = 32);
