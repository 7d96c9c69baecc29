-- Keysmith schema, PostgreSQL dialect. Timestamps are TIMESTAMPTZ, durations
-- BIGINT milliseconds, JSON is JSONB. Queries order text with COLLATE "C".

CREATE TABLE keysmith_policies (
    id                   TEXT PRIMARY KEY,
    app_id               TEXT NOT NULL,
    tenant_id            TEXT NOT NULL,
    name                 TEXT NOT NULL,
    description          TEXT,
    rate_limit           BIGINT,
    rate_limit_window_ms BIGINT,
    burst_limit          BIGINT,
    allowed_scopes       JSONB NOT NULL DEFAULT '[]',
    allowed_ips          JSONB NOT NULL DEFAULT '[]',
    allowed_origins      JSONB NOT NULL DEFAULT '[]',
    allowed_methods      JSONB NOT NULL DEFAULT '[]',
    allowed_paths        JSONB NOT NULL DEFAULT '[]',
    max_key_lifetime_ms  BIGINT,
    rotation_period_ms   BIGINT,
    grace_period_ms      BIGINT,
    daily_quota          BIGINT,
    monthly_quota        BIGINT,
    metadata             JSONB NOT NULL DEFAULT '{}',
    created_at           TIMESTAMPTZ NOT NULL,
    updated_at           TIMESTAMPTZ NOT NULL,
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
    expires_at   TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    description  TEXT,
    hint         TEXT NOT NULL,
    metadata     JSONB NOT NULL DEFAULT '{}',
    created_by   TEXT,
    rotated_at   TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ
);

CREATE INDEX idx_keys_hash ON keysmith_keys (hash);
CREATE INDEX idx_keys_tenant ON keysmith_keys (app_id, tenant_id);
CREATE INDEX idx_keys_state ON keysmith_keys (state);
-- Lists page newest first by id in byte order (ORDER BY id COLLATE "C" DESC).
CREATE INDEX idx_keys_tenant_order ON keysmith_keys (app_id, tenant_id, id COLLATE "C");
CREATE INDEX idx_keys_policy ON keysmith_keys (policy_id) WHERE policy_id IS NOT NULL;
CREATE INDEX idx_keys_expiry ON keysmith_keys (expires_at) WHERE state = 'active' AND expires_at IS NOT NULL;

CREATE TABLE keysmith_scopes (
    id          TEXT PRIMARY KEY,
    app_id      TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    name        TEXT NOT NULL,
    description TEXT,
    parent      TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
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
    grace_period_ms BIGINT NOT NULL,
    grace_ends      TIMESTAMPTZ NOT NULL,
    grace_ended     BOOLEAN NOT NULL DEFAULT FALSE,
    rotated_by      TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    -- Insertion order. Rotations of one key are serialized by a lock on the
    -- key, so this is the order they were applied in: the chain's order, even
    -- when several share a created_at or clocks disagree.
    seq             BIGINT GENERATED ALWAYS AS IDENTITY
);

CREATE INDEX idx_rotations_key ON keysmith_rotations (key_id, seq);
CREATE INDEX idx_rotations_grace ON keysmith_rotations (grace_ends) WHERE NOT grace_ended;

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
    latency_ms  BIGINT NOT NULL,
    metadata    JSONB NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE INDEX idx_usage_key_time ON keysmith_usage (key_id, created_at);
CREATE INDEX idx_usage_tenant_time ON keysmith_usage (app_id, tenant_id, created_at);
CREATE INDEX idx_usage_time ON keysmith_usage (created_at);

CREATE TABLE keysmith_usage_agg (
    key_id           TEXT NOT NULL,
    app_id           TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    period           TEXT NOT NULL CHECK (period IN ('day', 'month')),
    period_start     TIMESTAMPTZ NOT NULL,
    request_count    BIGINT NOT NULL,
    error_count      BIGINT NOT NULL,
    total_latency_ms BIGINT NOT NULL,
    p50_latency_ms   BIGINT NOT NULL,
    p99_latency_ms   BIGINT NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key_id, period, period_start)
);

CREATE INDEX idx_usage_agg_tenant ON keysmith_usage_agg (app_id, tenant_id, period, period_start);
