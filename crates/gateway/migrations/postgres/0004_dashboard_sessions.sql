-- Dashboard sign-ins. The cookie holds a random token; only its SHA-256 is stored. A session
-- is valid until it expires or is revoked (sign-out, or its tenant deleted).
CREATE TABLE dashboard_sessions (
    id_hash    TEXT        NOT NULL PRIMARY KEY,
    tenant_id  TEXT,
    csrf_token TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ
);

CREATE INDEX dashboard_sessions_expires_idx ON dashboard_sessions (expires_at);
