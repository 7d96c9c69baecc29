-- Quota counts per key and UTC day or month: one row a window, incremented in
-- the same transaction that checks it, so counts are exact across connections.
CREATE TABLE keysmith_quota_counters (
    key_id       TEXT NOT NULL,
    period       TEXT NOT NULL CHECK (period IN ('day', 'month')),
    period_start INTEGER NOT NULL,
    used         INTEGER NOT NULL,
    PRIMARY KEY (key_id, period, period_start)
);

CREATE INDEX idx_quota_counters_start ON keysmith_quota_counters (period_start);
