-- Issued keys get a stable id, so an admin can list, rotate and revoke them without the key.
ALTER TABLE credits.api_keys ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY;
CREATE UNIQUE INDEX api_keys_id ON credits.api_keys (id);
