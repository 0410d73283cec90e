-- meta-chat schema, SQLite dialect.
-- Timestamps are TEXT in RFC 3339 UTC with exactly six fractional digits
-- ("2025-01-31T12:34:56.123456Z"), so text order is time order.

CREATE TABLE tenants (
    id           TEXT NOT NULL PRIMARY KEY,
    name         TEXT NOT NULL,
    api_key_hash TEXT NOT NULL UNIQUE,
    settings     TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(settings)),
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);

CREATE INDEX tenants_updated_at_idx ON tenants (updated_at);

-- Small key/value table for instance-wide state (the admin key hash, ...).
CREATE TABLE system (
    key        TEXT NOT NULL PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- One row per request that reached a provider. No foreign key to tenants on purpose: a batch of
-- records must never fail because one tenant was deleted meanwhile, and history outlives tenants.
CREATE TABLE usage_records (
    id               INTEGER PRIMARY KEY,
    tenant_id        TEXT    NOT NULL,
    conversation_id  TEXT,
    request_id       TEXT    NOT NULL,
    endpoint         TEXT    NOT NULL,
    provider         TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    input_tokens     INTEGER NOT NULL DEFAULT 0,
    output_tokens    INTEGER NOT NULL DEFAULT 0,
    embedding_tokens INTEGER NOT NULL DEFAULT 0,
    cost_nano_usd    INTEGER NOT NULL DEFAULT 0,
    latency_ms       INTEGER NOT NULL,
    ttft_ms          INTEGER,
    status           TEXT    NOT NULL,
    error_kind       TEXT,
    cache_hit        BOOLEAN NOT NULL DEFAULT 0,
    fallback_from    TEXT,
    tokens_estimated BOOLEAN NOT NULL DEFAULT 0,
    created_at       TEXT    NOT NULL
);

CREATE INDEX usage_records_tenant_created_idx ON usage_records (tenant_id, created_at);
CREATE INDEX usage_records_created_idx ON usage_records (created_at);
