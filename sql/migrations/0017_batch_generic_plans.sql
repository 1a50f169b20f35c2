-- The batch functions keep one plan per statement for the session (a generic plan) instead of
-- planning their statements anew on every call.
--
-- PL/pgSQL hands its statements' parameters to the plan cache, which plans the first five
-- calls with the values in (custom plans) and then keeps a generic plan only if it looks no
-- dearer than those; with sequential scans, hash and merge joins off (migration 0016) the
-- generic plan never looked cheaper, so every call planned the big statements of take_holds and
-- resolve_holds again. Measured (one connection, 1,000 accounts): a batch of 1 to 8 holds 0.82
-- to 1.09 ms -> 0.68 to 0.97 ms, of resolutions 1.26 to 1.94 ms -> 1.05 to 1.83 ms; the same rows.
-- The plans stay probes by key: every statement finds its rows by the account (and hold) ids,
-- whatever the values. The functions and triggers these call are planned by the setting in force
-- when their statements are first planned in a session (PL/pgSQL keeps one plan per statement);
-- they all look rows up by key too, so their plans are the same either way.
ALTER FUNCTION credits.take_holds(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION credits.resolve_holds(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION credits.lock_accounts(text[]) SET plan_cache_mode = force_generic_plan;
