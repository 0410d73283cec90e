-- meta-chat schema, PostgreSQL dialect. Tables are created in the first schema of search_path.

CREATE TABLE tenants (
    id           TEXT        NOT NULL,
    name         TEXT        NOT NULL,
    api_key_hash TEXT        NOT NULL,
    settings     JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    CONSTRAINT tenants_pkey PRIMARY KEY (id),
    CONSTRAINT tenants_api_key_hash_key UNIQUE (api_key_hash)
);

CREATE INDEX tenants_updated_at_idx ON tenants (updated_at);

-- Small key/value table for instance-wide state (the admin key hash, ...).
CREATE TABLE system (
    key        TEXT        NOT NULL PRIMARY KEY,
    value      TEXT        NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- One row per request that reached a provider. No foreign key to tenants on purpose: a batch of
-- records must never fail because one tenant was deleted meanwhile, and history outlives tenants.
CREATE TABLE usage_records (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        TEXT        NOT NULL,
    conversation_id  TEXT,
    request_id       TEXT        NOT NULL,
    endpoint         TEXT        NOT NULL,
    provider         TEXT        NOT NULL,
    model            TEXT        NOT NULL,
    input_tokens     BIGINT      NOT NULL DEFAULT 0,
    output_tokens    BIGINT      NOT NULL DEFAULT 0,
    embedding_tokens BIGINT      NOT NULL DEFAULT 0,
    cost_nano_usd    BIGINT      NOT NULL DEFAULT 0,
    latency_ms       BIGINT      NOT NULL,
    ttft_ms          BIGINT,
    status           TEXT        NOT NULL,
    error_kind       TEXT,
    cache_hit        BOOLEAN     NOT NULL DEFAULT FALSE,
    fallback_from    TEXT,
    tokens_estimated BOOLEAN     NOT NULL DEFAULT FALSE,
    created_at       TIMESTAMPTZ NOT NULL
);

CREATE INDEX usage_records_tenant_created_idx ON usage_records (tenant_id, created_at);
CREATE INDEX usage_records_created_idx ON usage_records (created_at);
