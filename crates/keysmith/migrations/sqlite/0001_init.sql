-- Keysmith schema, SQLite dialect. Timestamps are INTEGER microseconds since
-- the Unix epoch (UTC), so they sort and compare correctly; durations are
-- INTEGER milliseconds; JSON is TEXT.

CREATE TABLE keysmith_policies (
    id                   TEXT PRIMARY KEY,
    app_id               TEXT NOT NULL,
    tenant_id            TEXT NOT NULL,
    name                 TEXT NOT NULL,
    description          TEXT,
    rate_limit           INTEGER,
    rate_limit_window_ms INTEGER,
    burst_limit          INTEGER,
    allowed_scopes       TEXT NOT NULL DEFAULT '[]',
    allowed_ips          TEXT NOT NULL DEFAULT '[]',
    allowed_origins      TEXT NOT NULL DEFAULT '[]',
    allowed_methods      TEXT NOT NULL DEFAULT '[]',
    allowed_paths        TEXT NOT NULL DEFAULT '[]',
    max_key_lifetime_ms  INTEGER,
    rotation_period_ms   INTEGER,
    grace_period_ms      INTEGER,
    daily_quota          INTEGER,
    monthly_quota        INTEGER,
    metadata             TEXT NOT NULL DEFAULT '{}',
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    UNIQUE (app_id, tenant_id, name)
);

CREATE TABLE keysmith_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    environment  TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'active',
    app_id       TEXT NOT NULL,
    tenant_id    TEXT NOT NULL,
    policy_id    TEXT REFERENCES keysmith_policies (id),
    expires_at   INTEGER,
    last_used_at INTEGER,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    description  TEXT,
    hint         TEXT NOT NULL,
    metadata     TEXT NOT NULL DEFAULT '{}',
    created_by   TEXT,
    rotated_at   INTEGER,
    revoked_at   INTEGER
);

CREATE INDEX idx_keys_hash ON keysmith_keys (hash);
CREATE INDEX idx_keys_tenant ON keysmith_keys (app_id, tenant_id);
CREATE INDEX idx_keys_state ON keysmith_keys (state);
CREATE INDEX idx_keys_tenant_order ON keysmith_keys (app_id, tenant_id, id);
CREATE INDEX idx_keys_policy ON keysmith_keys (policy_id) WHERE policy_id IS NOT NULL;
CREATE INDEX idx_keys_expiry ON keysmith_keys (expires_at) WHERE state = 'active' AND expires_at IS NOT NULL;

CREATE TABLE keysmith_scopes (
    id          TEXT PRIMARY KEY,
    app_id      TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    name        TEXT NOT NULL,
    description TEXT,
    parent      TEXT,
    created_at  INTEGER NOT NULL,
    UNIQUE (app_id, tenant_id, name)
);

CREATE INDEX idx_scopes_parent ON keysmith_scopes (app_id, tenant_id, parent);

CREATE TABLE keysmith_key_scopes (
    key_id   TEXT NOT NULL REFERENCES keysmith_keys (id) ON DELETE CASCADE,
    scope_id TEXT NOT NULL REFERENCES keysmith_scopes (id) ON DELETE CASCADE,
    PRIMARY KEY (key_id, scope_id)
);

CREATE INDEX idx_key_scopes_scope ON keysmith_key_scopes (scope_id);

CREATE TABLE keysmith_rotations (
    id              TEXT PRIMARY KEY,
    key_id          TEXT NOT NULL REFERENCES keysmith_keys (id) ON DELETE CASCADE,
    app_id          TEXT NOT NULL,
    tenant_id       TEXT NOT NULL,
    old_hash        TEXT NOT NULL UNIQUE,
    new_hash        TEXT NOT NULL,
    reason          TEXT NOT NULL,
    grace_period_ms INTEGER NOT NULL,
    grace_ends      INTEGER NOT NULL,
    grace_ended     INTEGER NOT NULL DEFAULT 0,
    rotated_by      TEXT,
    created_at      INTEGER NOT NULL
);

CREATE INDEX idx_rotations_key ON keysmith_rotations (key_id, created_at, id);
CREATE INDEX idx_rotations_grace ON keysmith_rotations (grace_ends) WHERE grace_ended = 0;

CREATE TABLE keysmith_usage (
    id          TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    app_id      TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    method      TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    ip          TEXT,
    user_agent  TEXT,
    latency_ms  INTEGER NOT NULL,
    metadata    TEXT NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL
);

CREATE INDEX idx_usage_key_time ON keysmith_usage (key_id, created_at);
CREATE INDEX idx_usage_tenant_time ON keysmith_usage (app_id, tenant_id, created_at);
CREATE INDEX idx_usage_time ON keysmith_usage (created_at);

CREATE TABLE keysmith_usage_agg (
    key_id           TEXT NOT NULL,
    app_id           TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    period           TEXT NOT NULL CHECK (period IN ('day', 'month')),
    period_start     INTEGER NOT NULL,
    request_count    INTEGER NOT NULL,
    error_count      INTEGER NOT NULL,
    total_latency_ms INTEGER NOT NULL,
    p50_latency_ms   INTEGER NOT NULL,
    p99_latency_ms   INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (key_id, period, period_start)
);

CREATE INDEX idx_usage_agg_tenant ON keysmith_usage_agg (app_id, tenant_id, period, period_start);
