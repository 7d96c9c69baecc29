-- Raw usage in blocks. A written batch keeps each key's records in one row:
-- `data` is a JSON array of records, each an array
--   [id, endpoint, method, status_code, ip, user_agent, latency_ms, metadata, created_at]
-- (created_at in microseconds, like every time here), with the key, the
-- tenant, the block's record count and its time bounds as indexed columns.
-- One row per key and batch instead of one per request: SQLite's per-row
-- work (the table, the primary key's index and three time indexes) was most
-- of the cost of recording usage. Record ids are drawn by Keysmith
-- (UUIDv7), unique by construction, and not indexed.
CREATE TABLE keysmith_usage_blocks (
    id        INTEGER PRIMARY KEY,
    key_id    TEXT NOT NULL,
    app_id    TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    first_at  INTEGER NOT NULL,
    last_at   INTEGER NOT NULL,
    records   INTEGER NOT NULL CHECK (records > 0),
    data      TEXT NOT NULL
);

CREATE INDEX idx_usage_blocks_tenant ON keysmith_usage_blocks (app_id, tenant_id, last_at);
CREATE INDEX idx_usage_blocks_key ON keysmith_usage_blocks (key_id, last_at);
CREATE INDEX idx_usage_blocks_time ON keysmith_usage_blocks (first_at);

-- Rows written by earlier versions move into blocks of one key's hour.
INSERT INTO keysmith_usage_blocks (key_id, app_id, tenant_id, first_at, last_at, records, data)
SELECT key_id, app_id, tenant_id, min(created_at), max(created_at), count(*),
       json_group_array(json_array(id, endpoint, method, status_code, ip, user_agent,
                                   latency_ms, json(metadata), created_at))
FROM (SELECT * FROM keysmith_usage ORDER BY created_at, id)
GROUP BY key_id, app_id, tenant_id, created_at / 3600000000;

DROP TABLE keysmith_usage;

-- The records, one row each, for reading with SQL.
CREATE VIEW keysmith_usage (id, key_id, app_id, tenant_id, endpoint, method, status_code, ip,
                            user_agent, latency_ms, metadata, created_at) AS
SELECT r.value ->> 0, b.key_id, b.app_id, b.tenant_id, r.value ->> 1, r.value ->> 2,
       r.value ->> 3, r.value ->> 4, r.value ->> 5, r.value ->> 6, r.value -> 7, r.value ->> 8
FROM keysmith_usage_blocks AS b, json_each(b.data) AS r;
