-- Two more rollups kept by the usage writer in the same transaction as the records, so the
-- analytics over long ranges and across tenants read a few rows per day instead of every request.

-- Per tenant, UTC day and conversation ('' for requests that named none): the conversation
-- breakdown reads whole days from here and only the partial days at the edges from the records.
CREATE TABLE usage_conversation_daily (
    tenant_id        TEXT    NOT NULL,
    day              TEXT    NOT NULL,
    conversation_id  TEXT    NOT NULL,
    requests         INTEGER  NOT NULL DEFAULT 0,
    errors           INTEGER  NOT NULL DEFAULT 0,
    cache_hits       INTEGER  NOT NULL DEFAULT 0,
    input_tokens     INTEGER  NOT NULL DEFAULT 0,
    output_tokens    INTEGER  NOT NULL DEFAULT 0,
    embedding_tokens INTEGER  NOT NULL DEFAULT 0,
    cost_nano_usd    INTEGER  NOT NULL DEFAULT 0,
    first_at         TEXT    NOT NULL,
    last_at          TEXT    NOT NULL,
    PRIMARY KEY (tenant_id, day, conversation_id)
);

CREATE INDEX usage_conversation_daily_day_idx ON usage_conversation_daily (day);

INSERT INTO usage_conversation_daily (tenant_id, day, conversation_id, requests, errors,
    cache_hits, input_tokens, output_tokens, embedding_tokens, cost_nano_usd, first_at, last_at)
SELECT tenant_id, substr(created_at, 1, 10), COALESCE(conversation_id, ''), COUNT(*),
       SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END),
       SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END),
       SUM(input_tokens), SUM(output_tokens), SUM(embedding_tokens), SUM(cost_nano_usd),
       MIN(created_at), MAX(created_at)
FROM usage_records
GROUP BY 1, 2, 3;

-- The conversation breakdown no longer groups the records themselves.
DROP INDEX usage_records_tenant_conversation_idx;

-- A latency histogram per UTC day and provider across tenants, of the requests that were not
-- cache hits: `bucket_ms` is the largest latency of the bucket. Latencies under 64 ms have a
-- bucket each; above, every power of two is split into 32 buckets, so a bucket's largest value
-- is at most 3.2 % above its smallest (the writer's `latency_bucket`).
CREATE TABLE usage_latency_daily (
    day       TEXT    NOT NULL,
    provider  TEXT    NOT NULL,
    bucket_ms INTEGER  NOT NULL,
    requests  INTEGER  NOT NULL DEFAULT 0,
    PRIMARY KEY (day, provider, bucket_ms)
);

INSERT INTO usage_latency_daily (day, provider, bucket_ms, requests)
SELECT substr(created_at, 1, 10), provider,
       CASE WHEN latency_ms < 64 THEN MAX(latency_ms, 0)
     WHEN latency_ms < 128 THEN ((latency_ms >> 1) << 1) + 1
     WHEN latency_ms < 256 THEN ((latency_ms >> 2) << 2) + 3
     WHEN latency_ms < 512 THEN ((latency_ms >> 3) << 3) + 7
     WHEN latency_ms < 1024 THEN ((latency_ms >> 4) << 4) + 15
     WHEN latency_ms < 2048 THEN ((latency_ms >> 5) << 5) + 31
     WHEN latency_ms < 4096 THEN ((latency_ms >> 6) << 6) + 63
     WHEN latency_ms < 8192 THEN ((latency_ms >> 7) << 7) + 127
     WHEN latency_ms < 16384 THEN ((latency_ms >> 8) << 8) + 255
     WHEN latency_ms < 32768 THEN ((latency_ms >> 9) << 9) + 511
     WHEN latency_ms < 65536 THEN ((latency_ms >> 10) << 10) + 1023
     WHEN latency_ms < 131072 THEN ((latency_ms >> 11) << 11) + 2047
     WHEN latency_ms < 262144 THEN ((latency_ms >> 12) << 12) + 4095
     WHEN latency_ms < 524288 THEN ((latency_ms >> 13) << 13) + 8191
     WHEN latency_ms < 1048576 THEN ((latency_ms >> 14) << 14) + 16383
     WHEN latency_ms < 2097152 THEN ((latency_ms >> 15) << 15) + 32767
     WHEN latency_ms < 4194304 THEN ((latency_ms >> 16) << 16) + 65535
     WHEN latency_ms < 8388608 THEN ((latency_ms >> 17) << 17) + 131071
     WHEN latency_ms < 16777216 THEN ((latency_ms >> 18) << 18) + 262143
     WHEN latency_ms < 33554432 THEN ((latency_ms >> 19) << 19) + 524287
     WHEN latency_ms < 67108864 THEN ((latency_ms >> 20) << 20) + 1048575
     WHEN latency_ms < 134217728 THEN ((latency_ms >> 21) << 21) + 2097151
     WHEN latency_ms < 268435456 THEN ((latency_ms >> 22) << 22) + 4194303
     WHEN latency_ms < 536870912 THEN ((latency_ms >> 23) << 23) + 8388607
     WHEN latency_ms < 1073741824 THEN ((latency_ms >> 24) << 24) + 16777215
     WHEN latency_ms < 2147483648 THEN ((latency_ms >> 25) << 25) + 33554431
     ELSE latency_ms END,
       COUNT(*)
FROM usage_records
WHERE NOT cache_hit
GROUP BY 1, 2, 3;
