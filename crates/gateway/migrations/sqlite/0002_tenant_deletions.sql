-- Tombstones of deleted tenants, so every replica's tenant cache drops a deleted tenant within
-- a poll. Rows older than a day are pruned on the next deletion.
CREATE TABLE tenant_deletions (
    tenant_id  TEXT NOT NULL PRIMARY KEY,
    deleted_at TEXT NOT NULL
);

CREATE INDEX tenant_deletions_deleted_at_idx ON tenant_deletions (deleted_at);
