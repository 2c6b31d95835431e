-- capgate's ledger in PostgreSQL: one row per request (the request id is the key), written by
-- `capgate exporter` with the PostgreSQL sink. A late settlement after a reap replaces the
-- reaper's row (the newer ledger entry wins).
CREATE TABLE IF NOT EXISTS usage_events (
    request_id        text PRIMARY KEY,
    user_id           text NOT NULL,
    team_id           text,
    tier              text NOT NULL,
    model             text NOT NULL,
    prompt_tokens     bigint NOT NULL,
    cached_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    value_nano        bigint NOT NULL,   -- what the request is worth, in 1e-9 of the policy's currency
    finish_reason     text NOT NULL,
    ttft_ms           double precision,  -- null when no token came
    duration_ms       double precision NOT NULL,
    settled_at        timestamptz NOT NULL,
    ledger_ms         bigint NOT NULL,   -- the Redis ledger entry this row was exported from
    ledger_seq        bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_events_user_time ON usage_events (user_id, settled_at);

-- Usage per user, tier, model and day (UTC): what an invoice line is built from.
CREATE OR REPLACE VIEW usage_daily AS
SELECT user_id,
       tier,
       model,
       (settled_at AT TIME ZONE 'UTC')::date AS day,
       count(*)               AS requests,
       sum(prompt_tokens)     AS prompt_tokens,
       sum(cached_tokens)     AS cached_tokens,
       sum(completion_tokens) AS completion_tokens,
       sum(value_nano)        AS value_nano,
       sum(value_nano) / 1e9  AS value
FROM usage_events
GROUP BY user_id, tier, model, (settled_at AT TIME ZONE 'UTC')::date;

-- Threshold notifications (a tier's `caps.notify_at`): one row per threshold crossed per window
-- period, for the user's windows (`scope` user) and their team's (`scope` team).
CREATE TABLE IF NOT EXISTS threshold_notifications (
    id            text PRIMARY KEY,      -- e.g. user:alice:month:tokens:800:24311
    user_id       text NOT NULL,         -- the user whose request crossed it
    team_id       text,
    scope         text NOT NULL,         -- user or team
    window_name   text NOT NULL,
    unit          text NOT NULL,         -- tokens, or spend (cap and used in nano-units)
    share         double precision NOT NULL,
    cap           bigint NOT NULL,
    used          bigint NOT NULL,       -- committed usage once the request was settled
    period        bigint NOT NULL,       -- the window's period (or rolling bucket) index
    request_id    text NOT NULL,
    notified_at   timestamptz NOT NULL
);
