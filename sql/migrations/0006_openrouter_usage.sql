-- What OpenRouter last reported for each account's key (read by sync): its usage, the credit it
-- has left under its limit, and whether its OpenRouter account is on the free tier (no credits
-- bought: free models only, with OpenRouter's daily free-request allowance). Exact USD.
ALTER TABLE credits.openrouter_accounts
    ADD COLUMN provider_usage_usd numeric(24, 12) CHECK (provider_usage_usd >= 0),
    ADD COLUMN provider_limit_remaining_usd numeric(24, 12),
    ADD COLUMN is_free_tier boolean;
