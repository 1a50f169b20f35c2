-- A rollup of usage_events per account and UTC day, kept exact by a trigger, so system-wide
-- analytics over a month read (accounts x days) rows instead of every request. Keyed by subject
-- first, like every table.
CREATE TABLE credits.usage_daily (
    subject_id        text   NOT NULL,
    day               date   NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    succeeded         bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost              bigint NOT NULL DEFAULT 0,
    charged           bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (subject_id, day)
);
CREATE INDEX usage_daily_by_day ON credits.usage_daily (day);

CREATE FUNCTION credits.usage_daily_apply(e credits.usage_events, sign integer) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO credits.usage_daily AS d
        (subject_id, day, requests, succeeded, failed, prompt_tokens, completion_tokens, cost, charged)
    VALUES (e.subject_id, (e.created_at AT TIME ZONE 'UTC')::date, sign,
            CASE WHEN e.status = 'success' THEN sign ELSE 0 END,
            CASE WHEN e.status = 'success' THEN 0 ELSE sign END,
            sign * e.prompt_tokens, sign * e.completion_tokens, sign * e.cost, sign * e.charged)
    ON CONFLICT (subject_id, day) DO UPDATE SET
        requests          = d.requests + EXCLUDED.requests,
        succeeded         = d.succeeded + EXCLUDED.succeeded,
        failed            = d.failed + EXCLUDED.failed,
        prompt_tokens     = d.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
        cost              = d.cost + EXCLUDED.cost,
        charged           = d.charged + EXCLUDED.charged;
$$;

CREATE FUNCTION credits.usage_daily_track() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM credits.usage_daily_apply(OLD, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM credits.usage_daily_apply(NEW, 1);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER usage_events_daily AFTER INSERT OR UPDATE OR DELETE ON credits.usage_events
    FOR EACH ROW EXECUTE FUNCTION credits.usage_daily_track();

INSERT INTO credits.usage_daily
    (subject_id, day, requests, succeeded, failed, prompt_tokens, completion_tokens, cost, charged)
SELECT subject_id, (created_at AT TIME ZONE 'UTC')::date, count(*),
       count(*) FILTER (WHERE status = 'success'), count(*) FILTER (WHERE status <> 'success'),
       sum(prompt_tokens), sum(completion_tokens), sum(cost), sum(charged)
FROM credits.usage_events
GROUP BY 1, 2;

-- credits added in a period (allocations, bonuses, refunds, coupons) without reading usage rows
CREATE INDEX credit_transactions_credits_by_time ON credits.credit_transactions (created_at)
    WHERE type <> 'usage';
