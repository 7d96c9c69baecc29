-- Quota counts per key and UTC day or month: one row a window, incremented
-- under a row lock in the transaction that checks it, so counts are exact
-- across every node sharing the database.
CREATE TABLE keysmith_quota_counters (
    key_id       TEXT NOT NULL,
    period       TEXT NOT NULL CHECK (period IN ('day', 'month')),
    period_start TIMESTAMPTZ NOT NULL,
    used         BIGINT NOT NULL,
    PRIMARY KEY (key_id, period, period_start)
);

CREATE INDEX idx_quota_counters_start ON keysmith_quota_counters (period_start);
