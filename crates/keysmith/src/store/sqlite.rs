//! The SQLite store: the embedded default. One file (or `:memory:`), WAL
//! journaling, foreign keys on, a busy timeout, and `BEGIN IMMEDIATE` for every
//! write transaction so writers queue instead of failing half-way.
//!
//! Timestamps are INTEGER microseconds since the epoch (they sort and compare
//! correctly), durations INTEGER milliseconds, JSON TEXT. Raw usage is kept
//! in blocks, one row per key and written batch ([`blocks`]).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;

mod blocks;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::sql::{
    KeyRow, MAX_BATCH, PolicyColumns, PolicyRow, RotationRow, ScopeRow, corrupt, db_error,
    migrate_error, millis,
};
use super::{KeyUpdate, Lookup, NewRotation, RotatedSecret, Store};
use crate::error::{Error, ResourceKind, Result};
use crate::id::{KeyId, PolicyId, ScopeId, UsageId};
use crate::model::{
    ApiKey, KeyAction, KeyFilter, Page, PageRequest, Rotation, RotationDue, Scope, Tenant,
    UsageAggregate, UsageFilter, UsagePeriod, UsageRecord,
};
use crate::policy::Policy;
use crate::ratelimit::{QuotaDecision, QuotaWindow};
use crate::scope::parent_of;
use crate::secret::SecretHash;

/// How to open a SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Connections in the pool (one for `:memory:`, whatever is set).
    pub max_connections: u32,
    /// How long a statement waits for a lock held by another writer.
    pub busy_timeout: Duration,
    /// How long an operation waits for a free connection.
    pub acquire_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            busy_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Page cache of the usage writer's connection, in KiB (SQLite's default
/// is 2000): a batch's dirty pages and the B-tree paths to them stay cached
/// between batches instead of being read back from the OS each time.
const USAGE_CACHE_KIB: i64 = 16 * 1024;

/// A [`Store`] in a SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Where usage batches are written: one connection of its own for a file
    /// database (the main pool for `:memory:` and [`SqliteStore::from_pool`]).
    /// SQLite drops a connection's page cache whenever another connection
    /// wrote since its last transaction, and the pool hands its connections
    /// out in turn, so through the pool nearly every batch started cold;
    /// through its own connection the pages a batch appends to (the ends of
    /// the table and of each index) are still cached for the next one.
    usage: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path`, or a private
    /// in-process database for `:memory:` (nothing persisted).
    pub async fn open(path: &str) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// [`SqliteStore::open`] with options.
    pub async fn open_with(path: &str, options: SqliteOptions) -> Result<Self> {
        let memory = path == ":memory:";
        let connect = if memory {
            SqliteConnectOptions::from_str("sqlite::memory:").map_err(Error::store)?
        } else {
            let path = path.strip_prefix("sqlite://").unwrap_or(path);
            if path.is_empty() {
                return Err(Error::invalid_input(
                    "database_url",
                    "the SQLite path is empty",
                ));
            }
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
        }
        .foreign_keys(true)
        .busy_timeout(options.busy_timeout);
        let mut pool = SqlitePoolOptions::new().acquire_timeout(options.acquire_timeout);
        pool = if memory {
            // One connection that never closes: the database lives in it.
            pool.max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            pool.max_connections(options.max_connections.max(1))
        };
        let usage_connect = connect
            .clone()
            .pragma("cache_size", format!("-{USAGE_CACHE_KIB}"));
        let pool = pool.connect_with(connect).await.map_err(Error::store)?;
        let usage = if memory {
            pool.clone()
        } else {
            // Opened on the first batch. Writers still take turns: SQLite
            // has one write lock, which this connection waits for like any.
            SqlitePoolOptions::new()
                .acquire_timeout(options.acquire_timeout)
                .max_connections(1)
                .connect_lazy_with(usage_connect)
        };
        Ok(Self { pool, usage })
    }

    /// Wraps a pool the application already owns. It should have foreign keys
    /// on; migrate before use.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            usage: pool.clone(),
            pool,
        }
    }

    /// Applies the embedded migrations; a no-op when the schema is current.
    /// A database migrated by a newer Keysmith is refused.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(migrate_error)
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.usage.close().await;
        self.pool.close().await;
    }

    /// The pool behind the store.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Deletes the row `id` of `table` if the tenant owns it (`NotFound` otherwise).
    async fn delete_owned(
        &self,
        table: &'static str,
        kind: ResourceKind,
        tenant: &Tenant,
        id: &str,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        let deleted = sqlx::query(&format!(
            "DELETE FROM {table} WHERE id = ? AND app_id = ? AND tenant_id = ?"
        ))
        .bind(id)
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .execute(&mut *tx)
        .await
        .map_err(Error::store)?;
        if deleted.rows_affected() == 0 {
            return Err(Error::NotFound(kind));
        }
        tx.commit().await.map_err(Error::store)
    }

    async fn write(&self) -> Result<sqlx::Transaction<'static, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(Error::store)
    }
}

// ----------------------------------------------------------------- encoding

fn ts(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_ts(what: &str, micros: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| corrupt(what, micros))
}

fn opt_from_ts(what: &str, micros: Option<i64>) -> Result<Option<DateTime<Utc>>> {
    micros.map(|m| from_ts(what, m)).transpose()
}

fn json(what: &str, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| corrupt(what, e))
}

fn get<'r, T>(row: &'r SqliteRow, column: &str) -> Result<T>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(column).map_err(Error::store)
}

const KEY_COLUMNS: &str = "k.id, k.app_id, k.tenant_id, k.name, k.description, k.prefix, k.hint, \
    k.hash, k.environment, k.state, k.policy_id, k.metadata, k.created_by, k.expires_at, \
    k.last_used_at, k.rotated_at, k.revoked_at, k.created_at, k.updated_at, \
    (SELECT json_group_array(s.name) FROM keysmith_key_scopes ks \
     JOIN keysmith_scopes s ON s.id = ks.scope_id WHERE ks.key_id = k.id) AS scopes";

const POLICY_COLUMNS: &str = "id, app_id, tenant_id, name, description, rate_limit, \
    rate_limit_window_ms, burst_limit, allowed_scopes, allowed_ips, allowed_origins, \
    allowed_methods, allowed_paths, max_key_lifetime_ms, rotation_period_ms, grace_period_ms, \
    daily_quota, monthly_quota, metadata, created_at, updated_at";

const ROTATION_COLUMNS: &str = "id, key_id, app_id, tenant_id, old_hash, new_hash, reason, \
    grace_period_ms, grace_ends, grace_ended, rotated_by, created_at";

const SCOPE_COLUMNS: &str = "id, app_id, tenant_id, name, description, parent, created_at";

fn key_from(row: &SqliteRow) -> Result<ApiKey> {
    let scopes: String = get(row, "scopes")?;
    KeyRow {
        id: get(row, "id")?,
        app_id: get(row, "app_id")?,
        tenant_id: get(row, "tenant_id")?,
        name: get(row, "name")?,
        description: get(row, "description")?,
        prefix: get(row, "prefix")?,
        hint: get(row, "hint")?,
        hash: get(row, "hash")?,
        environment: get(row, "environment")?,
        state: get(row, "state")?,
        policy_id: get(row, "policy_id")?,
        scopes: serde_json::from_str(&scopes).map_err(|e| corrupt("scopes", e))?,
        metadata: json("metadata", &get::<String>(row, "metadata")?)?,
        created_by: get(row, "created_by")?,
        expires_at: opt_from_ts("expires_at", get(row, "expires_at")?)?,
        last_used_at: opt_from_ts("last_used_at", get(row, "last_used_at")?)?,
        rotated_at: opt_from_ts("rotated_at", get(row, "rotated_at")?)?,
        revoked_at: opt_from_ts("revoked_at", get(row, "revoked_at")?)?,
        created_at: from_ts("created_at", get(row, "created_at")?)?,
        updated_at: from_ts("updated_at", get(row, "updated_at")?)?,
    }
    .into_key()
}

/// Reads a policy from columns named `{prefix}{column}`.
fn policy_from(row: &SqliteRow, prefix: &str) -> Result<Policy> {
    let c = |name: &str| format!("{prefix}{name}");
    let text =
        |name: &str| -> Result<serde_json::Value> { json(name, &get::<String>(row, &c(name))?) };
    PolicyRow {
        id: get(row, &c("id"))?,
        app_id: get(row, &c("app_id"))?,
        tenant_id: get(row, &c("tenant_id"))?,
        name: get(row, &c("name"))?,
        description: get(row, &c("description"))?,
        rate_limit: get(row, &c("rate_limit"))?,
        rate_limit_window_ms: get(row, &c("rate_limit_window_ms"))?,
        burst_limit: get(row, &c("burst_limit"))?,
        allowed_scopes: text("allowed_scopes")?,
        allowed_ips: text("allowed_ips")?,
        allowed_origins: text("allowed_origins")?,
        allowed_methods: text("allowed_methods")?,
        allowed_paths: text("allowed_paths")?,
        max_key_lifetime_ms: get(row, &c("max_key_lifetime_ms"))?,
        rotation_period_ms: get(row, &c("rotation_period_ms"))?,
        grace_period_ms: get(row, &c("grace_period_ms"))?,
        daily_quota: get(row, &c("daily_quota"))?,
        monthly_quota: get(row, &c("monthly_quota"))?,
        metadata: text("metadata")?,
        created_at: from_ts("created_at", get(row, &c("created_at"))?)?,
        updated_at: from_ts("updated_at", get(row, &c("updated_at"))?)?,
    }
    .into_policy()
}

fn rotation_from(row: &SqliteRow) -> Result<Rotation> {
    RotationRow {
        id: get(row, "id")?,
        key_id: get(row, "key_id")?,
        app_id: get(row, "app_id")?,
        tenant_id: get(row, "tenant_id")?,
        old_hash: get(row, "old_hash")?,
        new_hash: get(row, "new_hash")?,
        reason: get(row, "reason")?,
        grace_period_ms: get(row, "grace_period_ms")?,
        grace_ends: from_ts("grace_ends", get(row, "grace_ends")?)?,
        grace_ended: get(row, "grace_ended")?,
        rotated_by: get(row, "rotated_by")?,
        created_at: from_ts("created_at", get(row, "created_at")?)?,
    }
    .into_rotation()
}

fn scope_from(row: &SqliteRow) -> Result<Scope> {
    ScopeRow {
        id: get(row, "id")?,
        app_id: get(row, "app_id")?,
        tenant_id: get(row, "tenant_id")?,
        name: get(row, "name")?,
        description: get(row, "description")?,
        parent: get(row, "parent")?,
        created_at: from_ts("created_at", get(row, "created_at")?)?,
    }
    .into_scope()
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds a policy's rule columns, `name` to `metadata`, in their table order
/// (shared by insert and update).
fn bind_spec<'q>(query: SqliteQuery<'q>, c: &'q PolicyColumns<'q>) -> SqliteQuery<'q> {
    query
        .bind(&c.spec.name)
        .bind(&c.spec.description)
        .bind(c.rate_limit)
        .bind(c.rate_limit_window_ms)
        .bind(c.burst_limit)
        .bind(c.allowed_scopes.to_string())
        .bind(c.allowed_ips.to_string())
        .bind(c.allowed_origins.to_string())
        .bind(c.allowed_methods.to_string())
        .bind(c.allowed_paths.to_string())
        .bind(c.max_key_lifetime_ms)
        .bind(c.rotation_period_ms)
        .bind(c.grace_period_ms)
        .bind(c.daily_quota)
        .bind(c.monthly_quota)
        .bind(c.metadata.to_string())
}

const AGGREGATE_COLUMNS: &str = "key_id, app_id, tenant_id, period, period_start, request_count, \
    error_count, total_latency_ms, p50_latency_ms, p99_latency_ms";

/// Usage blocks per INSERT: 7 parameters each, well under SQLite's 32766.
const BLOCK_CHUNK: usize = 512;

/// How `n` usage blocks are cut into INSERTs: full chunks, then the rest by
/// powers of two, so that only a few distinct statements exist (each one
/// prepared once per connection and cached) whatever the sizes of the
/// batches.
fn block_chunks(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let rows = if n >= BLOCK_CHUNK {
            BLOCK_CHUNK
        } else if n > 0 {
            1 << n.ilog2()
        } else {
            return None;
        };
        n -= rows;
        Some(rows)
    })
}

/// The INSERT of `rows` usage blocks (a size [`block_chunks`] yields), built
/// once.
///
/// `OR FAIL`, not the default `ABORT`: a multi-row INSERT that may abort
/// half-way makes SQLite keep a statement journal (the original of every
/// page the statement changes, spilled to a temporary file past 64 KiB).
/// With `FAIL` no journal is kept, and an error drops the transaction, which
/// rolls it all back: the batch is still refused whole.
fn insert_blocks_sql(rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=BLOCK_CHUNK.ilog2())
            .map(|bits| {
                let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; 1 << bits].join(", ");
                format!(
                    "INSERT OR FAIL INTO keysmith_usage_blocks \
                     (key_id, app_id, tenant_id, first_at, last_at, records, data) VALUES {values}"
                )
            })
            .collect()
    });
    debug_assert!(rows.is_power_of_two() && rows <= BLOCK_CHUNK);
    &all[rows.ilog2() as usize]
}

fn aggregate_from(row: &SqliteRow) -> Result<UsageAggregate> {
    let count = |column: &str| -> Result<u64> { super::sql::from_i64(column, get(row, column)?) };
    Ok(UsageAggregate {
        key_id: super::sql::parse("key id", &get::<String>(row, "key_id")?)?,
        app_id: get(row, "app_id")?,
        tenant_id: get(row, "tenant_id")?,
        period: super::sql::parse("period", &get::<String>(row, "period")?)?,
        period_start: from_ts("period_start", get(row, "period_start")?)?,
        request_count: count("request_count")?,
        error_count: count("error_count")?,
        total_latency_ms: count("total_latency_ms")?,
        p50_latency_ms: count("p50_latency_ms")?,
        p99_latency_ms: count("p99_latency_ms")?,
    })
}

fn limit_offset(page: &PageRequest) -> (i64, i64) {
    (
        i64::from(page.limit.min(MAX_BATCH)),
        i64::try_from(page.offset).unwrap_or(i64::MAX),
    )
}

// ------------------------------------------------- statements in a transaction

async fn fetch_key(conn: &mut SqliteConnection, tenant: &Tenant, id: &KeyId) -> Result<ApiKey> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM keysmith_keys k WHERE k.id = ? AND k.app_id = ? AND k.tenant_id = ?"
    );
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .fetch_optional(conn)
        .await
        .map_err(Error::store)?;
    key_from(&row.ok_or(Error::NotFound(ResourceKind::Key))?)
}

async fn check_policy(conn: &mut SqliteConnection, tenant: &Tenant, id: &PolicyId) -> Result<()> {
    let found = sqlx::query(
        "SELECT 1 FROM keysmith_policies WHERE id = ? AND app_id = ? AND tenant_id = ?",
    )
    .bind(id.to_string())
    .bind(&tenant.app_id)
    .bind(&tenant.tenant_id)
    .fetch_optional(conn)
    .await
    .map_err(Error::store)?;
    found
        .map(|_| ())
        .ok_or(Error::NotFound(ResourceKind::Policy))
}

/// Refuses a hash that is any key's current or former secret.
async fn check_hash_unused(conn: &mut SqliteConnection, hash: &SecretHash) -> Result<()> {
    let hex = hash.to_hex();
    let used = sqlx::query(
        "SELECT 1 FROM keysmith_keys WHERE hash = ?1 \
         UNION ALL SELECT 1 FROM keysmith_rotations WHERE old_hash = ?1 LIMIT 1",
    )
    .bind(&hex)
    .fetch_optional(conn)
    .await
    .map_err(Error::store)?;
    match used {
        Some(_) => Err(Error::AlreadyExists {
            kind: ResourceKind::Key,
            field: "hash",
        }),
        None => Ok(()),
    }
}

/// Links scope names to a key, creating the names the tenant lacks.
async fn link_scopes(
    conn: &mut SqliteConnection,
    tenant: &Tenant,
    key_id: &KeyId,
    names: &[String],
    now: DateTime<Utc>,
) -> Result<()> {
    for name in names {
        sqlx::query(
            "INSERT INTO keysmith_scopes (id, app_id, tenant_id, name, parent, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (app_id, tenant_id, name) DO NOTHING",
        )
        .bind(ScopeId::new().to_string())
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .bind(name)
        .bind(parent_of(name))
        .bind(ts(now))
        .execute(&mut *conn)
        .await
        .map_err(Error::store)?;
        sqlx::query(
            "INSERT INTO keysmith_key_scopes (key_id, scope_id) SELECT ?, id FROM keysmith_scopes \
             WHERE app_id = ? AND tenant_id = ? AND name = ? ON CONFLICT DO NOTHING",
        )
        .bind(key_id.to_string())
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .bind(name)
        .execute(&mut *conn)
        .await
        .map_err(Error::store)?;
    }
    Ok(())
}

async fn touch_key(conn: &mut SqliteConnection, id: &KeyId, now: DateTime<Utc>) -> Result<()> {
    sqlx::query("UPDATE keysmith_keys SET updated_at = ? WHERE id = ?")
        .bind(ts(now))
        .bind(id.to_string())
        .execute(conn)
        .await
        .map_err(Error::store)?;
    Ok(())
}

async fn policy_exists(conn: &mut SqliteConnection, tenant: &Tenant, id: &PolicyId) -> Result<()> {
    check_policy(conn, tenant, id).await
}

// Rotation due, over `keysmith_keys k JOIN keysmith_policies p`, with the
// instant judged at written `{now}`: the key's period anchor, the period in
// microseconds, whether the key is due, and the start of its current period.
macro_rules! rotation_anchor {
    () => {
        "COALESCE(k.rotated_at, k.created_at)"
    };
}
macro_rules! rotation_period_us {
    () => {
        "(p.rotation_period_ms * 1000)"
    };
}
macro_rules! rotation_due {
    ($now:literal) => {
        concat!(
            "k.state = 'active' AND p.rotation_period_ms > 0 \
             AND (k.expires_at IS NULL OR k.expires_at > ",
            $now,
            ") AND ",
            $now,
            " >= ",
            rotation_anchor!(),
            " + ",
            rotation_period_us!()
        )
    };
}
macro_rules! rotation_due_at {
    ($now:literal) => {
        concat!(
            rotation_anchor!(),
            " + (",
            $now,
            " - ",
            rotation_anchor!(),
            ") / ",
            rotation_period_us!(),
            " * ",
            rotation_period_us!()
        )
    };
}

fn push_key_filter(
    q: &mut QueryBuilder<'_, Sqlite>,
    tenant: &Tenant,
    filter: &KeyFilter,
    due_now: Option<DateTime<Utc>>,
) {
    q.push(" WHERE k.app_id = ")
        .push_bind(tenant.app_id.clone());
    q.push(" AND k.tenant_id = ")
        .push_bind(tenant.tenant_id.clone());
    if let Some(state) = filter.state {
        q.push(" AND k.state = ").push_bind(state.as_str());
    }
    if let Some(environment) = &filter.environment {
        q.push(" AND k.environment = ")
            .push_bind(environment.as_str().to_owned());
    }
    if let Some(policy_id) = &filter.policy_id {
        q.push(" AND k.policy_id = ")
            .push_bind(policy_id.to_string());
    }
    if let Some(created_by) = &filter.created_by {
        q.push(" AND k.created_by = ").push_bind(created_by.clone());
    }
    if let Some(now) = due_now {
        // The condition names the instant at each `?`: bind it at each.
        let mut parts = rotation_due!("?").split('?');
        q.push(" AND EXISTS (SELECT 1 FROM keysmith_policies p WHERE p.id = k.policy_id AND ");
        q.push(parts.next().unwrap_or_default());
        for part in parts {
            q.push_bind(ts(now)).push(part);
        }
        q.push(")");
    }
    if let Some(pattern) = filter.search_pattern() {
        q.push(" AND (k.name LIKE ")
            .push_bind(pattern.clone())
            .push(" ESCAPE '\\' OR k.hint LIKE ")
            .push_bind(pattern)
            .push(" ESCAPE '\\')");
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(Error::store)?;
        Ok(())
    }

    async fn create_key(&self, key: &ApiKey) -> Result<()> {
        let tenant = key.tenant();
        let mut tx = self.write().await?;
        if let Some(policy_id) = &key.policy_id {
            check_policy(&mut tx, &tenant, policy_id).await?;
        }
        check_hash_unused(&mut tx, &key.hash).await?;
        sqlx::query(
            "INSERT INTO keysmith_keys (id, name, hash, prefix, environment, state, app_id, \
             tenant_id, policy_id, expires_at, last_used_at, created_at, updated_at, description, \
             hint, metadata, created_by, rotated_at, revoked_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(key.id.to_string())
        .bind(&key.name)
        .bind(key.hash.to_hex())
        .bind(&key.prefix)
        .bind(key.environment.as_str())
        .bind(key.state.as_str())
        .bind(&key.app_id)
        .bind(&key.tenant_id)
        .bind(key.policy_id.map(|p| p.to_string()))
        .bind(key.expires_at.map(ts))
        .bind(key.last_used_at.map(ts))
        .bind(ts(key.created_at))
        .bind(ts(key.updated_at))
        .bind(&key.description)
        .bind(&key.hint)
        .bind(serde_json::Value::Object(key.metadata.clone()).to_string())
        .bind(&key.created_by)
        .bind(key.rotated_at.map(ts))
        .bind(key.revoked_at.map(ts))
        .execute(&mut *tx)
        .await
        .map_err(db_error(ResourceKind::Key))?;
        link_scopes(&mut tx, &tenant, &key.id, &key.scopes, key.created_at).await?;
        tx.commit().await.map_err(Error::store)
    }

    async fn get_key(&self, tenant: &Tenant, id: &KeyId) -> Result<ApiKey> {
        let mut conn = self.pool.acquire().await.map_err(Error::store)?;
        fetch_key(&mut conn, tenant, id).await
    }

    async fn list_keys(&self, tenant: &Tenant, filter: &KeyFilter) -> Result<Page<ApiKey>> {
        let due_now = filter.rotation_due_now()?;
        let mut tx = self.pool.begin().await.map_err(Error::store)?;
        let mut count = QueryBuilder::new("SELECT count(*) FROM keysmith_keys k");
        push_key_filter(&mut count, tenant, filter, due_now);
        let total: i64 = count
            .build_query_scalar()
            .fetch_one(&mut *tx)
            .await
            .map_err(Error::store)?;
        let (limit, offset) = limit_offset(&filter.page);
        let mut list = QueryBuilder::new(format!("SELECT {KEY_COLUMNS} FROM keysmith_keys k"));
        push_key_filter(&mut list, tenant, filter, due_now);
        list.push(" ORDER BY k.id DESC LIMIT ").push_bind(limit);
        list.push(" OFFSET ").push_bind(offset);
        let rows = list
            .build()
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::store)?;
        tx.commit().await.map_err(Error::store)?;
        let items = rows.iter().map(key_from).collect::<Result<_>>()?;
        Ok(Page {
            items,
            total: total as u64,
        })
    }

    async fn update_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        update: &KeyUpdate,
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let mut tx = self.write().await?;
        let mut key = fetch_key(&mut tx, tenant, id).await?;
        if let Some(Some(policy_id)) = &update.policy_id {
            check_policy(&mut tx, tenant, policy_id).await?;
        }
        update.apply(&mut key, now);
        sqlx::query(
            "UPDATE keysmith_keys SET name = ?, description = ?, metadata = ?, policy_id = ?, \
             expires_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&key.name)
        .bind(&key.description)
        .bind(serde_json::Value::Object(key.metadata.clone()).to_string())
        .bind(key.policy_id.map(|p| p.to_string()))
        .bind(key.expires_at.map(ts))
        .bind(ts(now))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(Error::store)?;
        tx.commit().await.map_err(Error::store)?;
        Ok(key)
    }

    async fn delete_key(&self, tenant: &Tenant, id: &KeyId) -> Result<()> {
        // Scope links and rotation records go with it (ON DELETE CASCADE).
        self.delete_owned("keysmith_keys", ResourceKind::Key, tenant, &id.to_string())
            .await
    }

    async fn transition_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        action: KeyAction,
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let mut tx = self.write().await?;
        let mut key = fetch_key(&mut tx, tenant, id).await?;
        action.check(key.state)?;
        if let Some(target) = action.target() {
            key.state = target;
        }
        if action == KeyAction::Revoke {
            key.revoked_at = Some(now);
        }
        key.updated_at = now;
        sqlx::query(
            "UPDATE keysmith_keys SET state = ?, revoked_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(key.state.as_str())
        .bind(key.revoked_at.map(ts))
        .bind(ts(now))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(Error::store)?;
        tx.commit().await.map_err(Error::store)?;
        Ok(key)
    }

    async fn rotate_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        rotation: &NewRotation,
        now: DateTime<Utc>,
    ) -> Result<(ApiKey, Rotation)> {
        let mut tx = self.write().await?;
        let mut key = fetch_key(&mut tx, tenant, id).await?;
        KeyAction::Rotate.check(key.state)?;
        check_hash_unused(&mut tx, &rotation.new_hash).await?;
        let record = rotation.record(tenant, key.id, key.hash, now)?;
        // No older secret outlives this rotation's grace period.
        sqlx::query(
            "UPDATE keysmith_rotations SET grace_ends = ?1 WHERE key_id = ?2 AND grace_ends > ?1",
        )
        .bind(ts(record.grace_ends))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(Error::store)?;
        sqlx::query(&format!(
            "INSERT INTO keysmith_rotations ({ROTATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(record.id.to_string())
        .bind(record.key_id.to_string())
        .bind(&record.app_id)
        .bind(&record.tenant_id)
        .bind(record.old_hash.to_hex())
        .bind(record.new_hash.to_hex())
        .bind(record.reason.as_str())
        .bind(millis(record.grace_period))
        .bind(ts(record.grace_ends))
        .bind(record.grace_ended)
        .bind(&record.rotated_by)
        .bind(ts(now))
        .execute(&mut *tx)
        .await
        .map_err(db_error(ResourceKind::Rotation))?;
        sqlx::query(
            "UPDATE keysmith_keys SET hash = ?, hint = ?, rotated_at = ?, updated_at = ?, \
             rotation_due_notified_at = NULL WHERE id = ?",
        )
        .bind(rotation.new_hash.to_hex())
        .bind(&rotation.new_hint)
        .bind(ts(now))
        .bind(ts(now))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_error(ResourceKind::Key))?;
        tx.commit().await.map_err(Error::store)?;
        key.hash = rotation.new_hash;
        key.hint = rotation.new_hint.clone();
        key.rotated_at = Some(now);
        key.updated_at = now;
        Ok((key, record))
    }

    async fn lookup(&self, hash: &SecretHash) -> Result<Option<Lookup>> {
        let policy_columns: String = POLICY_COLUMNS
            .split(", ")
            .map(|c| format!("p.{c} AS p_{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        // One round trip: the current secret, else a replaced one.
        let sql = format!(
            "SELECT {KEY_COLUMNS}, {policy_columns}, NULL AS r_id, NULL AS r_old_hash, \
             NULL AS r_grace_ends FROM keysmith_keys k \
             LEFT JOIN keysmith_policies p ON p.id = k.policy_id WHERE k.hash = ?1 \
             UNION ALL \
             SELECT {KEY_COLUMNS}, {policy_columns}, r.id, r.old_hash, r.grace_ends \
             FROM keysmith_rotations r JOIN keysmith_keys k ON k.id = r.key_id \
             LEFT JOIN keysmith_policies p ON p.id = k.policy_id WHERE r.old_hash = ?1 \
             LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(hash.to_hex())
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let key = key_from(&row)?;
        let policy = match get::<Option<String>>(&row, "p_id")? {
            Some(_) => Some(std::sync::Arc::new(policy_from(&row, "p_")?)),
            None => None,
        };
        let rotated = match get::<Option<String>>(&row, "r_id")? {
            Some(rotation_id) => Some(RotatedSecret {
                rotation_id: super::sql::parse("rotation id", &rotation_id)?,
                old_hash: SecretHash::from_hex(&get::<String>(&row, "r_old_hash")?)
                    .map_err(|e| corrupt("hash", e))?,
                grace_ends: from_ts("grace_ends", get(&row, "r_grace_ends")?)?,
            }),
            None => None,
        };
        Ok(Some(Lookup {
            key: std::sync::Arc::new(key),
            policy,
            rotated,
        }))
    }

    async fn expire_keys(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<ApiKey>> {
        let mut tx = self.write().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE keysmith_keys SET state = 'expired', updated_at = ?1 WHERE id IN \
             (SELECT id FROM keysmith_keys WHERE state = 'active' AND expires_at IS NOT NULL \
              AND expires_at <= ?1 ORDER BY expires_at, id LIMIT ?2) RETURNING id",
        )
        .bind(ts(now))
        .bind(i64::from(limit.min(MAX_BATCH)))
        .fetch_all(&mut *tx)
        .await
        .map_err(Error::store)?;
        let mut expired = Vec::with_capacity(ids.len());
        for id in ids {
            let sql = format!("SELECT {KEY_COLUMNS} FROM keysmith_keys k WHERE k.id = ?");
            let row = sqlx::query(&sql)
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::store)?;
            expired.push(key_from(&row)?);
        }
        tx.commit().await.map_err(Error::store)?;
        Ok(expired)
    }

    async fn end_grace_periods(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Rotation>> {
        let mut tx = self.write().await?;
        let rows = sqlx::query(&format!(
            "UPDATE keysmith_rotations SET grace_ended = 1 WHERE id IN \
             (SELECT id FROM keysmith_rotations WHERE grace_ended = 0 AND grace_ends <= ?1 \
              ORDER BY grace_ends, id LIMIT ?2) RETURNING {ROTATION_COLUMNS}"
        ))
        .bind(ts(now))
        .bind(i64::from(limit.min(MAX_BATCH)))
        .fetch_all(&mut *tx)
        .await
        .map_err(Error::store)?;
        tx.commit().await.map_err(Error::store)?;
        rows.iter().map(rotation_from).collect()
    }

    async fn claim_rotation_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<RotationDue>> {
        let mut tx = self.write().await?;
        let ids: Vec<String> = sqlx::query_scalar(concat!(
            "UPDATE keysmith_keys SET rotation_due_notified_at = ?1 WHERE id IN \
             (SELECT k.id FROM keysmith_keys k JOIN keysmith_policies p ON p.id = k.policy_id \
              WHERE ",
            rotation_due!("?1"),
            " AND (k.rotation_due_notified_at IS NULL OR k.rotation_due_notified_at < ",
            rotation_due_at!("?1"),
            ") ORDER BY ",
            rotation_anchor!(),
            " + ",
            rotation_period_us!(),
            ", k.id LIMIT ?2) RETURNING id"
        ))
        .bind(ts(now))
        .bind(i64::from(limit.min(MAX_BATCH)))
        .fetch_all(&mut *tx)
        .await
        .map_err(Error::store)?;
        let sql = format!(
            "SELECT {KEY_COLUMNS}, {} AS due_at, {} + {} AS first_due FROM keysmith_keys k \
             JOIN keysmith_policies p ON p.id = k.policy_id WHERE k.id = ?2",
            rotation_due_at!("?1"),
            rotation_anchor!(),
            rotation_period_us!(),
        );
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(&sql)
                .bind(ts(now))
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::store)?;
            let first_due: i64 = get(&row, "first_due")?;
            let due = RotationDue {
                key: key_from(&row)?,
                due_at: from_ts("due_at", get(&row, "due_at")?)?,
            };
            claimed.push((first_due, due));
        }
        tx.commit().await.map_err(Error::store)?;
        claimed.sort_by_key(|(first_due, due)| (*first_due, due.key.id));
        Ok(claimed.into_iter().map(|(_, due)| due).collect())
    }

    async fn add_key_scopes(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let mut tx = self.write().await?;
        fetch_key(&mut tx, tenant, id).await?;
        link_scopes(&mut tx, tenant, id, scopes, now).await?;
        touch_key(&mut tx, id, now).await?;
        let key = fetch_key(&mut tx, tenant, id).await?;
        tx.commit().await.map_err(Error::store)?;
        Ok(key)
    }

    async fn remove_key_scopes(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let mut tx = self.write().await?;
        fetch_key(&mut tx, tenant, id).await?;
        for name in scopes {
            sqlx::query(
                "DELETE FROM keysmith_key_scopes WHERE key_id = ? AND scope_id IN \
                 (SELECT id FROM keysmith_scopes WHERE app_id = ? AND tenant_id = ? AND name = ?)",
            )
            .bind(id.to_string())
            .bind(&tenant.app_id)
            .bind(&tenant.tenant_id)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(Error::store)?;
        }
        touch_key(&mut tx, id, now).await?;
        let key = fetch_key(&mut tx, tenant, id).await?;
        tx.commit().await.map_err(Error::store)?;
        Ok(key)
    }

    async fn create_policy(&self, policy: &Policy) -> Result<()> {
        let c = PolicyColumns::of(policy)?;
        let sql = format!(
            "INSERT INTO keysmith_policies ({POLICY_COLUMNS}) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        );
        let insert = sqlx::query(&sql)
            .bind(policy.id.to_string())
            .bind(&policy.app_id)
            .bind(&policy.tenant_id);
        bind_spec(insert, &c)
            .bind(ts(policy.created_at))
            .bind(ts(policy.updated_at))
            .execute(&self.pool)
            .await
            .map_err(db_error(ResourceKind::Policy))?;
        Ok(())
    }

    async fn get_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<Policy> {
        let row = sqlx::query(&format!(
            "SELECT {POLICY_COLUMNS} FROM keysmith_policies WHERE id = ? AND app_id = ? AND tenant_id = ?"
        ))
        .bind(id.to_string())
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store)?;
        policy_from(&row.ok_or(Error::NotFound(ResourceKind::Policy))?, "")
    }

    async fn list_policies(&self, tenant: &Tenant, page: &PageRequest) -> Result<Page<Policy>> {
        let mut tx = self.pool.begin().await.map_err(Error::store)?;
        let total: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM keysmith_policies WHERE app_id = ? AND tenant_id = ?",
        )
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(Error::store)?;
        let (limit, offset) = limit_offset(page);
        let rows = sqlx::query(&format!(
            "SELECT {POLICY_COLUMNS} FROM keysmith_policies WHERE app_id = ? AND tenant_id = ? \
             ORDER BY id DESC LIMIT ? OFFSET ?"
        ))
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *tx)
        .await
        .map_err(Error::store)?;
        tx.commit().await.map_err(Error::store)?;
        let items = rows
            .iter()
            .map(|r| policy_from(r, ""))
            .collect::<Result<_>>()?;
        Ok(Page {
            items,
            total: total as u64,
        })
    }

    async fn update_policy(&self, policy: &Policy) -> Result<()> {
        let c = PolicyColumns::of(policy)?;
        let update = sqlx::query(
            "UPDATE keysmith_policies SET name = ?, description = ?, rate_limit = ?, \
             rate_limit_window_ms = ?, burst_limit = ?, allowed_scopes = ?, allowed_ips = ?, \
             allowed_origins = ?, allowed_methods = ?, allowed_paths = ?, max_key_lifetime_ms = ?, \
             rotation_period_ms = ?, grace_period_ms = ?, daily_quota = ?, monthly_quota = ?, \
             metadata = ?, updated_at = ? WHERE id = ? AND app_id = ? AND tenant_id = ?",
        );
        let updated = bind_spec(update, &c)
            .bind(ts(policy.updated_at))
            .bind(policy.id.to_string())
            .bind(&policy.app_id)
            .bind(&policy.tenant_id)
            .execute(&self.pool)
            .await
            .map_err(db_error(ResourceKind::Policy))?;
        if updated.rows_affected() == 0 {
            return Err(Error::NotFound(ResourceKind::Policy));
        }
        Ok(())
    }

    async fn delete_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<()> {
        let mut tx = self.write().await?;
        policy_exists(&mut tx, tenant, id).await?;
        let users: i64 =
            sqlx::query_scalar("SELECT count(*) FROM keysmith_keys WHERE policy_id = ?")
                .bind(id.to_string())
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::store)?;
        if users > 0 {
            return Err(Error::PolicyInUse { keys: users as u64 });
        }
        sqlx::query("DELETE FROM keysmith_policies WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(Error::store)?;
        tx.commit().await.map_err(Error::store)
    }

    async fn create_scope(&self, scope: &Scope) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO keysmith_scopes ({SCOPE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(scope.id.to_string())
        .bind(&scope.app_id)
        .bind(&scope.tenant_id)
        .bind(&scope.name)
        .bind(&scope.description)
        .bind(&scope.parent)
        .bind(ts(scope.created_at))
        .execute(&self.pool)
        .await
        .map_err(db_error(ResourceKind::Scope))?;
        Ok(())
    }

    async fn list_scopes(
        &self,
        tenant: &Tenant,
        parent: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<Scope>> {
        let filter = |q: &mut QueryBuilder<'_, Sqlite>| {
            q.push(" WHERE app_id = ").push_bind(tenant.app_id.clone());
            q.push(" AND tenant_id = ")
                .push_bind(tenant.tenant_id.clone());
            if let Some(parent) = parent {
                q.push(" AND parent = ").push_bind(parent.to_owned());
            }
        };
        let mut tx = self.pool.begin().await.map_err(Error::store)?;
        let mut count = QueryBuilder::new("SELECT count(*) FROM keysmith_scopes");
        filter(&mut count);
        let total: i64 = count
            .build_query_scalar()
            .fetch_one(&mut *tx)
            .await
            .map_err(Error::store)?;
        let (limit, offset) = limit_offset(page);
        let mut list = QueryBuilder::new(format!("SELECT {SCOPE_COLUMNS} FROM keysmith_scopes"));
        filter(&mut list);
        list.push(" ORDER BY name LIMIT ").push_bind(limit);
        list.push(" OFFSET ").push_bind(offset);
        let rows = list
            .build()
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::store)?;
        tx.commit().await.map_err(Error::store)?;
        let items = rows.iter().map(scope_from).collect::<Result<_>>()?;
        Ok(Page {
            items,
            total: total as u64,
        })
    }

    async fn delete_scope(&self, tenant: &Tenant, id: &ScopeId) -> Result<()> {
        // Keys lose the scope with it (ON DELETE CASCADE on the links).
        self.delete_owned(
            "keysmith_scopes",
            ResourceKind::Scope,
            tenant,
            &id.to_string(),
        )
        .await
    }

    async fn list_rotations(&self, tenant: &Tenant, key_id: &KeyId) -> Result<Vec<Rotation>> {
        let mut tx = self.pool.begin().await.map_err(Error::store)?;
        let exists = sqlx::query(
            "SELECT 1 FROM keysmith_keys WHERE id = ? AND app_id = ? AND tenant_id = ?",
        )
        .bind(key_id.to_string())
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(Error::store)?;
        if exists.is_none() {
            return Err(Error::NotFound(ResourceKind::Key));
        }
        // rowid follows insertion, which is the chain's order even when
        // several rotations share a timestamp.
        let rows = sqlx::query(&format!(
            "SELECT {ROTATION_COLUMNS} FROM keysmith_rotations WHERE key_id = ? ORDER BY rowid"
        ))
        .bind(key_id.to_string())
        .fetch_all(&mut *tx)
        .await
        .map_err(Error::store)?;
        tx.commit().await.map_err(Error::store)?;
        rows.iter().map(rotation_from).collect()
    }

    async fn insert_usage(&self, records: &[UsageRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        // Checked before the transaction: a bad record refuses the batch
        // without taking the write lock.
        for r in records {
            super::sql::to_i64("latency_ms", r.latency_ms)?;
        }
        let packed = blocks::pack_batch(records)?;
        let mut tx = self
            .usage
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(Error::store)?;
        let mut done = 0;
        for rows in block_chunks(packed.len()) {
            let mut insert = sqlx::query(insert_blocks_sql(rows));
            for block in &packed[done..done + rows] {
                insert = insert
                    .bind(block.key_id.as_str())
                    .bind(block.app_id)
                    .bind(block.tenant_id)
                    .bind(block.first_at)
                    .bind(block.last_at)
                    .bind(block.records)
                    .bind(block.data.as_str());
            }
            insert
                .execute(&mut *tx)
                .await
                .map_err(db_error(ResourceKind::Usage))?;
            done += rows;
        }
        tx.commit().await.map_err(Error::store)
    }

    async fn list_usage(&self, tenant: &Tenant, filter: &UsageFilter) -> Result<Page<UsageRecord>> {
        // One read transaction: the total and the page see the same blocks.
        let mut tx = self.pool.begin().await.map_err(Error::store)?;
        let (total, items) = blocks::list(&mut tx, tenant, filter).await?;
        tx.commit().await.map_err(Error::store)?;
        Ok(Page { items, total })
    }

    async fn upsert_usage_aggregates(&self, rows: &[UsageAggregate]) -> Result<()> {
        let to_i64 = super::sql::to_i64;
        let mut tx = self.write().await?;
        for row in rows {
            sqlx::query(&format!(
                "INSERT INTO keysmith_usage_agg ({AGGREGATE_COLUMNS}, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (key_id, period, period_start) DO UPDATE SET \
                 request_count = excluded.request_count, error_count = excluded.error_count, \
                 total_latency_ms = excluded.total_latency_ms, \
                 p50_latency_ms = excluded.p50_latency_ms, p99_latency_ms = excluded.p99_latency_ms, \
                 updated_at = excluded.updated_at"
            ))
            .bind(row.key_id.to_string())
            .bind(&row.app_id)
            .bind(&row.tenant_id)
            .bind(row.period.as_str())
            .bind(ts(row.period_start))
            .bind(to_i64("request_count", row.request_count)?)
            .bind(to_i64("error_count", row.error_count)?)
            .bind(to_i64("total_latency_ms", row.total_latency_ms)?)
            .bind(to_i64("p50_latency_ms", row.p50_latency_ms)?)
            .bind(to_i64("p99_latency_ms", row.p99_latency_ms)?)
            .bind(ts(Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(Error::store)?;
        }
        tx.commit().await.map_err(Error::store)
    }

    async fn list_usage_aggregates(
        &self,
        tenant: &Tenant,
        key_id: &KeyId,
        period: UsagePeriod,
        after: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageAggregate>> {
        let rows = sqlx::query(&format!(
            "SELECT {AGGREGATE_COLUMNS} FROM keysmith_usage_agg WHERE key_id = ? AND period = ? \
             AND app_id = ? AND tenant_id = ? AND period_start >= ? AND period_start < ? \
             ORDER BY period_start"
        ))
        .bind(key_id.to_string())
        .bind(period.as_str())
        .bind(&tenant.app_id)
        .bind(&tenant.tenant_id)
        .bind(after.map_or(i64::MIN, ts))
        .bind(before.map_or(i64::MAX, ts))
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store)?;
        rows.iter().map(aggregate_from).collect()
    }

    async fn consume_quota(
        &self,
        key_id: &KeyId,
        windows: &[QuotaWindow],
        cost: u64,
    ) -> Result<QuotaDecision> {
        let cost_i64 = super::sql::to_i64("cost", cost)?;
        // BEGIN IMMEDIATE: the read and the increment happen under the write
        // lock, so no other writer can slip in between.
        let mut tx = self.write().await?;
        let mut used = Vec::with_capacity(windows.len());
        for w in windows {
            let count: Option<i64> = sqlx::query_scalar(
                "SELECT used FROM keysmith_quota_counters \
                 WHERE key_id = ? AND period = ? AND period_start = ?",
            )
            .bind(key_id.to_string())
            .bind(w.period.as_str())
            .bind(ts(w.start))
            .fetch_optional(&mut *tx)
            .await
            .map_err(Error::store)?;
            used.push(super::sql::from_i64("quota count", count.unwrap_or(0))?);
        }
        let fits = windows
            .iter()
            .zip(&used)
            .all(|(w, &u)| u.saturating_add(cost) <= w.limit);
        if !fits {
            tx.rollback().await.map_err(Error::store)?;
            return Ok(QuotaDecision::from_counts(windows, &used, false));
        }
        for w in windows {
            sqlx::query(
                "INSERT INTO keysmith_quota_counters (key_id, period, period_start, used) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (key_id, period, period_start) \
                 DO UPDATE SET used = used + excluded.used",
            )
            .bind(key_id.to_string())
            .bind(w.period.as_str())
            .bind(ts(w.start))
            .bind(cost_i64)
            .execute(&mut *tx)
            .await
            .map_err(Error::store)?;
        }
        tx.commit().await.map_err(Error::store)?;
        let after: Vec<u64> = used.iter().map(|u| u + cost).collect();
        Ok(QuotaDecision::from_counts(windows, &after, true))
    }

    async fn usage_between(
        &self,
        after: DateTime<Utc>,
        before: DateTime<Utc>,
        from: Option<(DateTime<Utc>, UsageId)>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>> {
        let mut conn = self.pool.acquire().await.map_err(Error::store)?;
        let limit = limit.min(super::MAX_PAGE) as usize;
        blocks::between(&mut conn, after, before, from, limit).await
    }

    async fn purge_usage(&self, cutoff: DateTime<Utc>, limit: u32) -> Result<u64> {
        let mut tx = self.write().await?;
        let purged = blocks::purge(&mut tx, cutoff, limit.min(MAX_BATCH) as usize).await?;
        tx.commit().await.map_err(Error::store)?;
        Ok(purged)
    }

    async fn touch_last_used(&self, uses: &[(KeyId, DateTime<Utc>)]) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        for (id, at) in uses {
            sqlx::query(
                "UPDATE keysmith_keys SET last_used_at = ?1 \
                 WHERE id = ?2 AND (last_used_at IS NULL OR last_used_at < ?1)",
            )
            .bind(ts(*at))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(Error::store)?;
        }
        tx.commit().await.map_err(Error::store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_blocks_are_cut_into_few_distinct_inserts() {
        for n in [0, 1, 2, 3, 511, 512, 513, 1029, 5000, 10_000] {
            let sizes: Vec<usize> = block_chunks(n).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n, "{n}: {sizes:?}");
            assert!(
                sizes
                    .iter()
                    .all(|&s| s.is_power_of_two() && s <= BLOCK_CHUNK),
                "{n}: {sizes:?}"
            );
            assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{n}: {sizes:?}");
        }
        assert_eq!(block_chunks(1029).collect::<Vec<_>>(), [512, 512, 4, 1]);
        // Every size has its statement, with its number of parameters.
        for bits in 0..=BLOCK_CHUNK.ilog2() {
            let rows = 1 << bits;
            assert_eq!(insert_blocks_sql(rows).matches('?').count(), rows * 7);
        }
    }
}
