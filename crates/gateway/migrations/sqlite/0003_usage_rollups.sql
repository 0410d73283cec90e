-- Day-level rollups of usage_records, maintained by the usage writer in the same transaction
-- as the records, so reports over long ranges read a few rows per day instead of every request.
-- `day` is the UTC date of the records' created_at, as 'YYYY-MM-DD'.
CREATE TABLE usage_daily (
    tenant_id        TEXT    NOT NULL,
    day              TEXT    NOT NULL,
    provider         TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    requests         INTEGER NOT NULL DEFAULT 0,
    errors           INTEGER NOT NULL DEFAULT 0,
    cache_hits       INTEGER NOT NULL DEFAULT 0,
    input_tokens     INTEGER NOT NULL DEFAULT 0,
    output_tokens    INTEGER NOT NULL DEFAULT 0,
    embedding_tokens INTEGER NOT NULL DEFAULT 0,
    cost_nano_usd    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day, provider, model)
);

CREATE INDEX usage_daily_day_idx ON usage_daily (day);

INSERT INTO usage_daily (tenant_id, day, provider, model, requests, errors, cache_hits,
                         input_tokens, output_tokens, embedding_tokens, cost_nano_usd)
SELECT tenant_id, substr(created_at, 1, 10), provider, model, COUNT(*),
       SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END),
       SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END),
       SUM(input_tokens), SUM(output_tokens), SUM(embedding_tokens), SUM(cost_nano_usd)
FROM usage_records
GROUP BY tenant_id, substr(created_at, 1, 10), provider, model;

-- Conversation reports group a tenant's records by conversation.
CREATE INDEX usage_records_tenant_conversation_idx
    ON usage_records (tenant_id, conversation_id, created_at);

-- One row per tenant and UTC day whose cost alert has fired: the primary key makes the alert
-- fire once per tenant per day across restarts and replicas.
CREATE TABLE cost_alerts (
    tenant_id      TEXT    NOT NULL,
    day            TEXT    NOT NULL,
    threshold_nano INTEGER NOT NULL,
    spent_nano     INTEGER NOT NULL,
    fired_at       TEXT    NOT NULL,
    PRIMARY KEY (tenant_id, day)
);
