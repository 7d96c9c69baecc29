//! The PostgreSQL store: a connection pool, for production and several nodes.
//!
//! Every write is one transaction. Compare-and-set operations lock the key (or
//! policy) row with `SELECT ... FOR UPDATE`, so concurrent rotations of a key
//! serialize and form a chain. A transaction that fails on a serialization
//! failure or a deadlock is retried as a whole, a few times. Sweeps claim rows
//! with `FOR UPDATE SKIP LOCKED`, so each row is returned by exactly one call
//! even when several nodes sweep at once.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, Postgres};

use super::sql::{
    self, KeyRow, MAX_BATCH, PolicyColumns, PolicyRow, RotationRow, ScopeRow, corrupt, db_error,
    millis, to_i64,
};
use super::{KeyUpdate, Lookup, NewRotation, RotatedSecret, Store};
use crate::error::{Error, ResourceKind, Result};
use crate::id::{KeyId, PolicyId, ScopeId, UsageId};
use crate::model::{
    ApiKey, KeyAction, KeyFilter, KeyState, Page, PageRequest, Rotation, RotationDue, Scope,
    Tenant, UsageAggregate, UsageFilter, UsagePeriod, UsageRecord,
};
use crate::policy::Policy;
use crate::ratelimit::{QuotaDecision, QuotaWindow};
use crate::scope::parent_of;
use crate::secret::SecretHash;

/// The embedded schema migrations.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How often a transaction is tried when it fails on a serialization failure
/// or a deadlock.
const MAX_ATTEMPTS: u32 = 5;

/// Most rows one multi-row INSERT of usage records or aggregates carries
/// (12 binds a row stays well under PostgreSQL's 65535 parameters).
const USAGE_CHUNK: usize = 1000;

/// Settings of a [`PostgresStore`]'s connection pool. Start from the
/// defaults: `PostgresOptions { max_connections: 20, ..Default::default() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Most connections the pool opens (default 10).
    pub max_connections: u32,
    /// How long an operation waits for a connection, including opening a new
    /// one, before it fails with a store error (default 3 s). This is also the
    /// connect timeout: with the server down, operations fail after this long.
    pub acquire_timeout: Duration,
    /// Server-side limit on each statement, lock waits included (default
    /// 5 s); `None` keeps the server's setting.
    pub statement_timeout: Option<Duration>,
    /// Client-side limit on one whole store call, retries included (default
    /// 10 s); `None` for no limit. It bounds calls even when the server stops
    /// answering without closing connections.
    pub operation_timeout: Option<Duration>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Some(Duration::from_secs(5)),
            operation_timeout: Some(Duration::from_secs(10)),
        }
    }
}

/// A [`Store`] in PostgreSQL. Cheap to clone: clones share the pool.
///
/// ```no_run
/// # async fn run() -> keysmith::Result<()> {
/// let store = keysmith::PostgresStore::connect("postgres://keysmith@localhost/keysmith").await?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    operation_timeout: Option<Duration>,
}

impl PostgresStore {
    /// Connects with the default [`PostgresOptions`].
    pub async fn connect(database_url: &str) -> Result<Self> {
        Self::connect_with(database_url, PostgresOptions::default()).await
    }

    /// Connects to the database at `database_url` (`postgres://user@host/db`).
    /// A URL that does not parse is `InvalidInput` (field `database_url`); a
    /// server that cannot be reached within the acquire timeout, or refuses
    /// the login, is a store error.
    pub async fn connect_with(database_url: &str, options: PostgresOptions) -> Result<Self> {
        let scheme = database_url.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("postgres" | "postgresql")) {
            return Err(Error::invalid_input(
                "database_url",
                "must be a postgres:// or postgresql:// URL",
            ));
        }
        let mut connect = PgConnectOptions::from_str(database_url).map_err(|e| {
            Error::invalid_input(
                "database_url",
                format!("is not a valid PostgreSQL URL: {e}"),
            )
        })?;
        if let Some(timeout) = options.statement_timeout {
            connect = connect.options([("statement_timeout", format!("{}ms", millis(timeout)))]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(Error::store)?;
        Ok(Self {
            pool,
            operation_timeout: options.operation_timeout,
        })
    }

    /// Uses an application's existing pool, as it is configured. Store calls
    /// get the default operation timeout.
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            operation_timeout: PostgresOptions::default().operation_timeout,
        }
    }

    /// Brings the schema up to date. Safe on every start and when several
    /// nodes start at once (the migrator holds a PostgreSQL advisory lock). A
    /// database migrated by a newer Keysmith is refused.
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(Error::store)?;
        // The connection leaves the pool afterwards: it may hold the advisory
        // lock after a failure, and migrations run without a statement timeout.
        conn.close_on_drop();
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await
            .map_err(Error::store)?;
        let result = MIGRATOR.run_direct(&mut *conn).await;
        // Closing ends the session, which releases the lock whatever happened.
        let _ = conn.close().await;
        result.map_err(sql::migrate_error)
    }

    /// Closes the pool: waits for connections in use to come back and closes
    /// them all. Later calls fail with a store error.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs one store call under the operation timeout.
    /// Deletes the row `id` of `table` if the tenant owns it (`NotFound` otherwise).
    async fn delete_owned(
        &self,
        table: &'static str,
        kind: ResourceKind,
        tenant: &Tenant,
        id: &str,
    ) -> Result<()> {
        let sql = format!("DELETE FROM {table} WHERE id = $1 AND app_id = $2 AND tenant_id = $3");
        self.bounded(async {
            let done = sqlx::query(&sql)
                .bind(id)
                .bind(&tenant.app_id)
                .bind(&tenant.tenant_id)
                .execute(&self.pool)
                .await
                .map_err(Error::store)?;
            if done.rows_affected() == 0 {
                return Err(Error::NotFound(kind));
            }
            Ok(())
        })
        .await
    }

    async fn bounded<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        match self.operation_timeout {
            None => call.await,
            Some(limit) => tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
                Err(Error::store(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("PostgreSQL did not complete the operation within {limit:?}"),
                )))
            }),
        }
    }
}

/// Whether a failed transaction may succeed if run again: a serialization
/// failure (40001) or a deadlock (40P01).
fn retryable(error: &Error) -> bool {
    let Error::Store(source) = error else {
        return false;
    };
    match source.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => matches!(db.code().as_deref(), Some("40001" | "40P01")),
        _ => false,
    }
}

/// Runs `$body` in a transaction bound to `$tx` and commits it; the whole
/// transaction is run again on a serialization failure or a deadlock. `?` in
/// the body rolls back (the dropped transaction is rolled back).
macro_rules! transaction {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut attempt = 1;
        loop {
            let result: Result<_> = async {
                let mut $tx = $store.pool.begin().await.map_err(Error::store)?;
                let value = $body;
                $tx.commit().await.map_err(Error::store)?;
                Ok(value)
            }
            .await;
            match result {
                Err(error) if attempt < MAX_ATTEMPTS && retryable(&error) => {
                    tracing::debug!(%error, attempt, "retrying PostgreSQL transaction");
                    tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                    attempt += 1;
                }
                other => break other,
            }
        }
    }};
}

// ------------------------------------------------------------------ columns
//
// Column lists as literal macros, so queries are `&'static str` built with
// `concat!`. The decoders below read the columns in exactly this order.

/// The columns of a key aliased `k`, its scope names included (21 columns).
macro_rules! key_columns {
    () => {
        "k.id, k.app_id, k.tenant_id, k.name, k.description, k.prefix, k.hint, k.hash, \
         k.environment, k.state, k.policy_id, \
         ARRAY(SELECT s.name FROM keysmith_key_scopes ks \
               JOIN keysmith_scopes s ON s.id = ks.scope_id WHERE ks.key_id = k.id), \
         k.metadata, k.created_by, k.expires_at, k.last_used_at, k.rotated_at, k.revoked_at, \
         k.created_at, k.updated_at"
    };
}

/// The columns of a policy aliased `p` (21 columns).
macro_rules! policy_columns {
    () => {
        "p.id, p.app_id, p.tenant_id, p.name, p.description, p.rate_limit, \
         p.rate_limit_window_ms, p.burst_limit, p.allowed_scopes, p.allowed_ips, \
         p.allowed_origins, p.allowed_methods, p.allowed_paths, p.max_key_lifetime_ms, \
         p.rotation_period_ms, p.grace_period_ms, p.daily_quota, p.monthly_quota, p.metadata, \
         p.created_at, p.updated_at"
    };
}

/// The columns of a rotation record aliased `r` (12 columns).
macro_rules! rotation_columns {
    () => {
        "r.id, r.key_id, r.app_id, r.tenant_id, r.old_hash, r.new_hash, r.reason, \
         r.grace_period_ms, r.grace_ends, r.grace_ended, r.rotated_by, r.created_at"
    };
}

/// The columns of a scope aliased `s` (7 columns).
macro_rules! scope_columns {
    () => {
        "s.id, s.app_id, s.tenant_id, s.name, s.description, s.parent, s.created_at"
    };
}

/// The columns of a usage record aliased `u` (12 columns).
macro_rules! usage_columns {
    () => {
        "u.id, u.key_id, u.app_id, u.tenant_id, u.endpoint, u.method, u.status_code, u.ip, \
         u.user_agent, u.latency_ms, u.metadata, u.created_at"
    };
}

/// The columns of a usage aggregate aliased `a` (10 columns).
macro_rules! aggregate_columns {
    () => {
        "a.key_id, a.app_id, a.tenant_id, a.period, a.period_start, a.request_count, \
         a.error_count, a.total_latency_ms, a.p50_latency_ms, a.p99_latency_ms"
    };
}

/// Reads a row's columns in order.
struct Cols<'r> {
    row: &'r PgRow,
    next: usize,
}

impl<'r> Cols<'r> {
    fn new(row: &'r PgRow) -> Self {
        Self { row, next: 0 }
    }

    fn get<T>(&mut self) -> Result<T>
    where
        T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
    {
        let index = self.next;
        self.next += 1;
        self.row
            .try_get(index)
            .map_err(|e| corrupt(&format!("column {index}"), e))
    }

    /// Whether the next column is NULL, without consuming it.
    fn next_is_null(&self) -> Result<bool> {
        let value: Option<String> = self
            .row
            .try_get(self.next)
            .map_err(|e| corrupt(&format!("column {}", self.next), e))?;
        Ok(value.is_none())
    }

    fn skip(&mut self, columns: usize) {
        self.next += columns;
    }

    fn key(&mut self) -> Result<ApiKey> {
        KeyRow {
            id: self.get()?,
            app_id: self.get()?,
            tenant_id: self.get()?,
            name: self.get()?,
            description: self.get()?,
            prefix: self.get()?,
            hint: self.get()?,
            hash: self.get()?,
            environment: self.get()?,
            state: self.get()?,
            policy_id: self.get()?,
            scopes: self.get()?,
            metadata: self.get()?,
            created_by: self.get()?,
            expires_at: self.get()?,
            last_used_at: self.get()?,
            rotated_at: self.get()?,
            revoked_at: self.get()?,
            created_at: self.get()?,
            updated_at: self.get()?,
        }
        .into_key()
    }

    fn policy(&mut self) -> Result<Policy> {
        PolicyRow {
            id: self.get()?,
            app_id: self.get()?,
            tenant_id: self.get()?,
            name: self.get()?,
            description: self.get()?,
            rate_limit: self.get()?,
            rate_limit_window_ms: self.get()?,
            burst_limit: self.get()?,
            allowed_scopes: self.get()?,
            allowed_ips: self.get()?,
            allowed_origins: self.get()?,
            allowed_methods: self.get()?,
            allowed_paths: self.get()?,
            max_key_lifetime_ms: self.get()?,
            rotation_period_ms: self.get()?,
            grace_period_ms: self.get()?,
            daily_quota: self.get()?,
            monthly_quota: self.get()?,
            metadata: self.get()?,
            created_at: self.get()?,
            updated_at: self.get()?,
        }
        .into_policy()
    }

    fn rotation(&mut self) -> Result<Rotation> {
        RotationRow {
            id: self.get()?,
            key_id: self.get()?,
            app_id: self.get()?,
            tenant_id: self.get()?,
            old_hash: self.get()?,
            new_hash: self.get()?,
            reason: self.get()?,
            grace_period_ms: self.get()?,
            grace_ends: self.get()?,
            grace_ended: self.get()?,
            rotated_by: self.get()?,
            created_at: self.get()?,
        }
        .into_rotation()
    }

    fn scope(&mut self) -> Result<Scope> {
        ScopeRow {
            id: self.get()?,
            app_id: self.get()?,
            tenant_id: self.get()?,
            name: self.get()?,
            description: self.get()?,
            parent: self.get()?,
            created_at: self.get()?,
        }
        .into_scope()
    }

    fn usage(&mut self) -> Result<UsageRecord> {
        let id: String = self.get()?;
        let key_id: String = self.get()?;
        Ok(UsageRecord {
            id: sql::parse("usage id", &id)?,
            key_id: sql::parse("key id", &key_id)?,
            app_id: self.get()?,
            tenant_id: self.get()?,
            endpoint: self.get()?,
            method: self.get()?,
            status_code: {
                let status: i32 = self.get()?;
                u16::try_from(status).map_err(|e| corrupt("usage status code", e))?
            },
            ip: self.get()?,
            user_agent: self.get()?,
            latency_ms: sql::from_i64("usage latency", self.get()?)?,
            metadata: sql::metadata(self.get()?)?,
            created_at: self.get()?,
        })
    }

    fn aggregate(&mut self) -> Result<UsageAggregate> {
        let key_id: String = self.get()?;
        let app_id = self.get()?;
        let tenant_id = self.get()?;
        let period: String = self.get()?;
        Ok(UsageAggregate {
            key_id: sql::parse("key id", &key_id)?,
            app_id,
            tenant_id,
            period: sql::parse("usage period", &period)?,
            period_start: self.get()?,
            request_count: sql::from_i64("request count", self.get()?)?,
            error_count: sql::from_i64("error count", self.get()?)?,
            total_latency_ms: sql::from_i64("total latency", self.get()?)?,
            p50_latency_ms: sql::from_i64("p50 latency", self.get()?)?,
            p99_latency_ms: sql::from_i64("p99 latency", self.get()?)?,
        })
    }
}

const POLICY_COLUMN_COUNT: usize = 21;

fn key_of(row: &PgRow) -> Result<ApiKey> {
    Cols::new(row).key()
}

/// Decodes a page whose rows end with a `count(*) OVER ()` column: the items
/// and the total (0 when the page is empty; the caller counts then).
fn page_rows<T>(
    rows: &[PgRow],
    item: impl Fn(&mut Cols<'_>) -> Result<T>,
) -> Result<(Vec<T>, i64)> {
    let mut items = Vec::with_capacity(rows.len());
    let mut count = 0;
    for row in rows {
        let mut cols = Cols::new(row);
        items.push(item(&mut cols)?);
        count = cols.get()?;
    }
    Ok((items, count))
}

fn total(what: &str, n: i64) -> Result<u64> {
    sql::from_i64(what, n)
}

fn limit_and_offset(page: &PageRequest) -> Result<(i64, i64)> {
    Ok((i64::from(page.limit), to_i64("offset", page.offset)?))
}

// ------------------------------------------------------------------ queries

const SELECT_KEY: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keysmith_keys k WHERE k.id = $1 AND k.app_id = $2 AND k.tenant_id = $3"
);

/// Locks a key of the tenant for the rest of the transaction; its hash and state.
async fn lock_key(
    conn: &mut PgConnection,
    tenant: &Tenant,
    id: &KeyId,
) -> Result<(SecretHash, KeyState)> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT hash, state FROM keysmith_keys \
         WHERE id = $1 AND app_id = $2 AND tenant_id = $3 FOR UPDATE",
    )
    .bind(id.to_string())
    .bind(&tenant.app_id)
    .bind(&tenant.tenant_id)
    .fetch_optional(conn)
    .await
    .map_err(Error::store)?;
    let (hash, state) = row.ok_or(Error::NotFound(ResourceKind::Key))?;
    let hash = SecretHash::from_hex(&hash).map_err(|e| corrupt("key hash", e))?;
    Ok((hash, sql::parse("state", &state)?))
}

/// Checks that a policy exists in the tenant and keeps it from being deleted
/// until the transaction ends.
async fn check_policy(conn: &mut PgConnection, tenant: &Tenant, id: &PolicyId) -> Result<()> {
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM keysmith_policies \
         WHERE id = $1 AND app_id = $2 AND tenant_id = $3 FOR SHARE",
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

/// Whether a hash is a key's current secret or an old secret of a rotation.
async fn hash_known(conn: &mut PgConnection, hash: &str) -> Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM keysmith_keys WHERE hash = $1) \
             OR EXISTS (SELECT 1 FROM keysmith_rotations WHERE old_hash = $1)",
    )
    .bind(hash)
    .fetch_one(conn)
    .await
    .map_err(Error::store)
}

/// Gives a key the named scopes, creating the names the tenant lacks.
async fn add_scopes(
    conn: &mut PgConnection,
    tenant: &Tenant,
    key_id: &KeyId,
    names: &[String],
    now: DateTime<Utc>,
) -> Result<()> {
    // Sorted and distinct: concurrent writers insert in the same order, and a
    // name appears once per statement.
    let mut names = names.to_vec();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = names.iter().map(|_| ScopeId::new().to_string()).collect();
    let parents: Vec<Option<String>> = names
        .iter()
        .map(|n| parent_of(n).map(str::to_owned))
        .collect();
    sqlx::query(
        "INSERT INTO keysmith_scopes (id, app_id, tenant_id, name, parent, created_at) \
         SELECT u.id, $1, $2, u.name, u.parent, $3 \
         FROM unnest($4::text[], $5::text[], $6::text[]) AS u (id, name, parent) \
         ON CONFLICT (app_id, tenant_id, name) DO NOTHING",
    )
    .bind(&tenant.app_id)
    .bind(&tenant.tenant_id)
    .bind(now)
    .bind(&ids)
    .bind(&names)
    .bind(&parents)
    .execute(&mut *conn)
    .await
    .map_err(db_error(ResourceKind::Scope))?;
    sqlx::query(
        "INSERT INTO keysmith_key_scopes (key_id, scope_id) \
         SELECT $1, s.id FROM keysmith_scopes s \
         WHERE s.app_id = $2 AND s.tenant_id = $3 AND s.name = ANY($4) \
         ON CONFLICT DO NOTHING",
    )
    .bind(key_id.to_string())
    .bind(&tenant.app_id)
    .bind(&tenant.tenant_id)
    .bind(&names)
    .execute(conn)
    .await
    .map_err(Error::store)?;
    Ok(())
}

/// Stamps `updated_at` on a key and reads it back.
async fn touch_key(conn: &mut PgConnection, id: &KeyId, now: DateTime<Utc>) -> Result<ApiKey> {
    let row = sqlx::query(concat!(
        "UPDATE keysmith_keys AS k SET updated_at = $2 WHERE k.id = $1 RETURNING ",
        key_columns!()
    ))
    .bind(id.to_string())
    .bind(now)
    .fetch_one(conn)
    .await
    .map_err(Error::store)?;
    key_of(&row)
}

// Rotation due, over `keysmith_keys k JOIN keysmith_policies p`, with the
// instant judged at written `$now`: the key's period anchor, its first due
// instant, whether it is due, and the start of its current period (the anchor
// plus whole periods, in integer microseconds; NULLIF guards a zero period).
macro_rules! rotation_anchor {
    () => {
        "COALESCE(k.rotated_at, k.created_at)"
    };
}
macro_rules! rotation_first_due {
    () => {
        concat!(
            rotation_anchor!(),
            " + p.rotation_period_ms * interval '1 millisecond'"
        )
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
            rotation_first_due!()
        )
    };
}
macro_rules! rotation_due_at {
    ($now:literal) => {
        concat!(
            rotation_anchor!(),
            " + ((extract(epoch FROM ",
            $now,
            " - ",
            rotation_anchor!(),
            ") * 1000000)::bigint / (NULLIF(p.rotation_period_ms, 0) * 1000) \
             * p.rotation_period_ms) * interval '1 millisecond'"
        )
    };
}

macro_rules! key_filter {
    () => {
        concat!(
            "k.app_id = $1 AND k.tenant_id = $2 \
             AND ($3::text IS NULL OR k.state = $3) \
             AND ($4::text IS NULL OR k.environment = $4) \
             AND ($5::text IS NULL OR k.policy_id = $5) \
             AND ($6::text IS NULL OR k.created_by = $6) \
             AND ($7::timestamptz IS NULL OR EXISTS (SELECT 1 FROM keysmith_policies p \
                  WHERE p.id = k.policy_id AND ",
            rotation_due!("$7"),
            ")) AND ($8::text IS NULL OR k.name ILIKE $8 ESCAPE '\\' \
                  OR k.hint ILIKE $8 ESCAPE '\\')"
        )
    };
}

const LIST_KEYS: &str = concat!(
    "SELECT ",
    key_columns!(),
    ", page.total FROM (SELECT k.id, count(*) OVER () AS total FROM keysmith_keys k WHERE ",
    key_filter!(),
    " ORDER BY k.id COLLATE \"C\" DESC LIMIT $9 OFFSET $10) AS page \
     JOIN keysmith_keys k ON k.id = page.id ORDER BY k.id COLLATE \"C\" DESC"
);

/// Claims keys due for rotation (`$1` now, `$2` limit) not yet claimed in
/// their current period; returns each key, its current period's start and its
/// first due instant.
const CLAIM_ROTATION_DUE: &str = concat!(
    "WITH due AS MATERIALIZED (SELECT k.id, ",
    rotation_due_at!("$1"),
    " AS due_at, ",
    rotation_first_due!(),
    " AS first_due FROM keysmith_keys k JOIN keysmith_policies p ON p.id = k.policy_id WHERE ",
    rotation_due!("$1"),
    " AND (k.rotation_due_notified_at IS NULL OR k.rotation_due_notified_at < ",
    rotation_due_at!("$1"),
    ") ORDER BY first_due, k.id COLLATE \"C\" LIMIT $2 FOR UPDATE OF k SKIP LOCKED) \
     UPDATE keysmith_keys AS k SET rotation_due_notified_at = $1 FROM due WHERE k.id = due.id \
     AND (k.rotation_due_notified_at IS NULL OR k.rotation_due_notified_at < due.due_at) \
     RETURNING ",
    key_columns!(),
    ", due.due_at, due.first_due"
);

const COUNT_KEYS: &str = concat!("SELECT count(*) FROM keysmith_keys k WHERE ", key_filter!());

/// The hot path: a key by its current hash, with its policy, in one index
/// probe (plus the scopes).
const LOOKUP_CURRENT: &str = concat!(
    "SELECT NULL::text AS rotation_id, NULL::timestamptz AS grace_ends, ",
    key_columns!(),
    ", ",
    policy_columns!(),
    " FROM keysmith_keys k LEFT JOIN keysmith_policies p ON p.id = k.policy_id \
     WHERE k.hash = $1"
);

/// On a miss: a key through a rotation that replaced the presented secret.
const LOOKUP_ROTATED: &str = concat!(
    "SELECT r.id, r.grace_ends, ",
    key_columns!(),
    ", ",
    policy_columns!(),
    " FROM keysmith_rotations r JOIN keysmith_keys k ON k.id = r.key_id \
     LEFT JOIN keysmith_policies p ON p.id = k.policy_id WHERE r.old_hash = $1"
);

const INSERT_POLICY: &str = "INSERT INTO keysmith_policies (id, app_id, tenant_id, name, \
     description, rate_limit, rate_limit_window_ms, burst_limit, allowed_scopes, allowed_ips, \
     allowed_origins, allowed_methods, allowed_paths, max_key_lifetime_ms, rotation_period_ms, \
     grace_period_ms, daily_quota, monthly_quota, metadata, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
     $19, $20, $21)";

const UPDATE_POLICY: &str = "UPDATE keysmith_policies SET name = $4, description = $5, \
     rate_limit = $6, rate_limit_window_ms = $7, burst_limit = $8, allowed_scopes = $9, \
     allowed_ips = $10, allowed_origins = $11, allowed_methods = $12, allowed_paths = $13, \
     max_key_lifetime_ms = $14, rotation_period_ms = $15, grace_period_ms = $16, \
     daily_quota = $17, monthly_quota = $18, metadata = $19, updated_at = $20 \
     WHERE id = $1 AND app_id = $2 AND tenant_id = $3";

/// A policy query with the policy's id, tenant and spec bound as `$1`–`$19`
/// (the column order of [`INSERT_POLICY`]).
fn bind_policy<'q>(
    sql: &'q str,
    policy: &'q Policy,
    c: PolicyColumns<'q>,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(policy.id.to_string())
        .bind(&policy.app_id)
        .bind(&policy.tenant_id)
        .bind(&c.spec.name)
        .bind(&c.spec.description)
        .bind(c.rate_limit)
        .bind(c.rate_limit_window_ms)
        .bind(c.burst_limit)
        .bind(c.allowed_scopes)
        .bind(c.allowed_ips)
        .bind(c.allowed_origins)
        .bind(c.allowed_methods)
        .bind(c.allowed_paths)
        .bind(c.max_key_lifetime_ms)
        .bind(c.rotation_period_ms)
        .bind(c.grace_period_ms)
        .bind(c.daily_quota)
        .bind(c.monthly_quota)
        .bind(c.metadata)
}

macro_rules! usage_filter {
    () => {
        "u.app_id = $1 AND u.tenant_id = $2 \
         AND ($3::text IS NULL OR u.key_id = $3) \
         AND ($4::timestamptz IS NULL OR u.created_at >= $4) \
         AND ($5::timestamptz IS NULL OR u.created_at < $5)"
    };
}

const LIST_USAGE: &str = concat!(
    "SELECT ",
    usage_columns!(),
    ", count(*) OVER () FROM keysmith_usage u WHERE ",
    usage_filter!(),
    " ORDER BY u.created_at DESC, u.id COLLATE \"C\" DESC LIMIT $6 OFFSET $7"
);

const USAGE_BETWEEN: &str = concat!(
    "SELECT ",
    usage_columns!(),
    " FROM keysmith_usage u WHERE u.created_at >= $1 AND u.created_at < $2 \
     AND ($4::text IS NULL OR (u.created_at, u.id COLLATE \"C\") > ($3, $4::text COLLATE \"C\")) \
     ORDER BY u.created_at, u.id COLLATE \"C\" LIMIT $5"
);

const COUNT_USAGE: &str = concat!(
    "SELECT count(*) FROM keysmith_usage u WHERE ",
    usage_filter!()
);

const LIST_USAGE_AGGREGATES: &str = concat!(
    "SELECT ",
    aggregate_columns!(),
    " FROM keysmith_usage_agg a \
     WHERE a.key_id = $1 AND a.app_id = $2 AND a.tenant_id = $3 AND a.period = $4 \
     AND ($5::timestamptz IS NULL OR a.period_start >= $5) \
     AND ($6::timestamptz IS NULL OR a.period_start < $6) \
     ORDER BY a.period_start"
);

/// A usage record's values as `keysmith_usage` holds them.
struct UsageBinds<'a> {
    record: &'a UsageRecord,
    id: String,
    key_id: String,
    status_code: i32,
    latency_ms: i64,
    metadata: serde_json::Value,
}

impl<'a> UsageBinds<'a> {
    fn of(record: &'a UsageRecord) -> Result<Self> {
        Ok(Self {
            record,
            id: record.id.to_string(),
            key_id: record.key_id.to_string(),
            status_code: i32::from(record.status_code),
            latency_ms: to_i64("latency_ms", record.latency_ms)?,
            metadata: serde_json::Value::Object(record.metadata.clone()),
        })
    }
}

/// A usage aggregate's values as `keysmith_usage_agg` holds them.
struct AggregateBinds<'a> {
    row: &'a UsageAggregate,
    key_id: String,
    request_count: i64,
    error_count: i64,
    total_latency_ms: i64,
    p50_latency_ms: i64,
    p99_latency_ms: i64,
}

impl<'a> AggregateBinds<'a> {
    fn of(row: &'a UsageAggregate) -> Result<Self> {
        Ok(Self {
            row,
            key_id: row.key_id.to_string(),
            request_count: to_i64("request_count", row.request_count)?,
            error_count: to_i64("error_count", row.error_count)?,
            total_latency_ms: to_i64("total_latency_ms", row.total_latency_ms)?,
            p50_latency_ms: to_i64("p50_latency_ms", row.p50_latency_ms)?,
            p99_latency_ms: to_i64("p99_latency_ms", row.p99_latency_ms)?,
        })
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<()> {
        self.bounded(async {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(Error::store)?;
            Ok(())
        })
        .await
    }

    // ---- keys ----

    async fn create_key(&self, key: &ApiKey) -> Result<()> {
        let tenant = key.tenant();
        let id = key.id.to_string();
        let hash = key.hash.to_hex();
        self.bounded(async {
            transaction!(self, |tx| {
                let id_taken: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM keysmith_keys WHERE id = $1)")
                        .bind(&id)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(Error::store)?;
                if id_taken {
                    return Err(Error::AlreadyExists {
                        kind: ResourceKind::Key,
                        field: "id",
                    });
                }
                if hash_known(&mut tx, &hash).await? {
                    return Err(Error::AlreadyExists {
                        kind: ResourceKind::Key,
                        field: "hash",
                    });
                }
                if let Some(policy_id) = &key.policy_id {
                    check_policy(&mut tx, &tenant, policy_id).await?;
                }
                sqlx::query(
                    "INSERT INTO keysmith_keys (id, app_id, tenant_id, name, description, \
                     prefix, hint, hash, environment, state, policy_id, metadata, created_by, \
                     expires_at, last_used_at, rotated_at, revoked_at, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                     $16, $17, $18, $19)",
                )
                .bind(&id)
                .bind(&key.app_id)
                .bind(&key.tenant_id)
                .bind(&key.name)
                .bind(&key.description)
                .bind(&key.prefix)
                .bind(&key.hint)
                .bind(&hash)
                .bind(key.environment.as_str())
                .bind(key.state.as_str())
                .bind(key.policy_id.map(|p| p.to_string()))
                .bind(serde_json::Value::Object(key.metadata.clone()))
                .bind(&key.created_by)
                .bind(key.expires_at)
                .bind(key.last_used_at)
                .bind(key.rotated_at)
                .bind(key.revoked_at)
                .bind(key.created_at)
                .bind(key.updated_at)
                .execute(&mut *tx)
                .await
                .map_err(db_error(ResourceKind::Key))?;
                add_scopes(&mut tx, &tenant, &key.id, &key.scopes, key.created_at).await?;
            })
        })
        .await
    }

    async fn get_key(&self, tenant: &Tenant, id: &KeyId) -> Result<ApiKey> {
        self.bounded(async {
            let row = sqlx::query(SELECT_KEY)
                .bind(id.to_string())
                .bind(&tenant.app_id)
                .bind(&tenant.tenant_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(Error::store)?
                .ok_or(Error::NotFound(ResourceKind::Key))?;
            key_of(&row)
        })
        .await
    }

    async fn list_keys(&self, tenant: &Tenant, filter: &KeyFilter) -> Result<Page<ApiKey>> {
        let (limit, offset) = limit_and_offset(&filter.page)?;
        let due_now = filter.rotation_due_now()?;
        let search = filter.search_pattern();
        let state = filter.state.map(KeyState::as_str);
        let environment = filter.environment.as_ref().map(|e| e.as_str());
        let policy_id = filter.policy_id.map(|p| p.to_string());
        self.bounded(async {
            let rows = sqlx::query(LIST_KEYS)
                .bind(&tenant.app_id)
                .bind(&tenant.tenant_id)
                .bind(state)
                .bind(environment)
                .bind(&policy_id)
                .bind(&filter.created_by)
                .bind(due_now)
                .bind(&search)
                .bind(limit)
                .bind(offset)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::store)?;
            let (items, mut count) = page_rows(&rows, |cols| cols.key())?;
            if rows.is_empty() && (offset > 0 || limit == 0) {
                // Past the end: the page holds no row to carry the total.
                count = sqlx::query_scalar(COUNT_KEYS)
                    .bind(&tenant.app_id)
                    .bind(&tenant.tenant_id)
                    .bind(state)
                    .bind(environment)
                    .bind(&policy_id)
                    .bind(&filter.created_by)
                    .bind(due_now)
                    .bind(&search)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(Error::store)?;
            }
            Ok(Page {
                items,
                total: total("key count", count)?,
            })
        })
        .await
    }

    async fn update_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        update: &KeyUpdate,
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let metadata = update.metadata.clone().map(serde_json::Value::Object);
        self.bounded(async {
            transaction!(self, |tx| {
                lock_key(&mut tx, tenant, id).await?;
                if let Some(Some(policy_id)) = &update.policy_id {
                    check_policy(&mut tx, tenant, policy_id).await?;
                }
                let row = sqlx::query(concat!(
                    "UPDATE keysmith_keys AS k SET \
                     name = COALESCE($2, k.name), \
                     description = CASE WHEN $3 THEN $4 ELSE k.description END, \
                     metadata = COALESCE($5, k.metadata), \
                     policy_id = CASE WHEN $6 THEN $7 ELSE k.policy_id END, \
                     expires_at = CASE WHEN $8 THEN $9 ELSE k.expires_at END, \
                     updated_at = $10 \
                     WHERE k.id = $1 RETURNING ",
                    key_columns!()
                ))
                .bind(id.to_string())
                .bind(&update.name)
                .bind(update.description.is_some())
                .bind(update.description.clone().flatten())
                .bind(&metadata)
                .bind(update.policy_id.is_some())
                .bind(update.policy_id.flatten().map(|p| p.to_string()))
                .bind(update.expires_at.is_some())
                .bind(update.expires_at.flatten())
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error(ResourceKind::Key))?;
                key_of(&row)?
            })
        })
        .await
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
        self.bounded(async {
            transaction!(self, |tx| {
                let (_, state) = lock_key(&mut tx, tenant, id).await?;
                action.check(state)?;
                let target = action.target().unwrap_or(state);
                let row = sqlx::query(concat!(
                    "UPDATE keysmith_keys AS k SET state = $2, \
                     revoked_at = CASE WHEN $3 THEN $4 ELSE k.revoked_at END, updated_at = $4 \
                     WHERE k.id = $1 RETURNING ",
                    key_columns!()
                ))
                .bind(id.to_string())
                .bind(target.as_str())
                .bind(action == KeyAction::Revoke)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::store)?;
                key_of(&row)?
            })
        })
        .await
    }

    async fn rotate_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        rotation: &NewRotation,
        now: DateTime<Utc>,
    ) -> Result<(ApiKey, Rotation)> {
        let grace_ends = rotation.grace_ends(now)?;
        let new_hash = rotation.new_hash.to_hex();
        self.bounded(async {
            transaction!(self, |tx| {
                let (old_hash, state) = lock_key(&mut tx, tenant, id).await?;
                KeyAction::Rotate.check(state)?;
                if hash_known(&mut tx, &new_hash).await? {
                    return Err(Error::AlreadyExists {
                        kind: ResourceKind::Key,
                        field: "hash",
                    });
                }
                let record = rotation.record(tenant, *id, old_hash, now)?;
                // No old secret outlives this rotation's grace.
                sqlx::query(
                    "UPDATE keysmith_rotations SET grace_ends = $2 \
                     WHERE key_id = $1 AND grace_ends > $2",
                )
                .bind(id.to_string())
                .bind(grace_ends)
                .execute(&mut *tx)
                .await
                .map_err(Error::store)?;
                sqlx::query(
                    "INSERT INTO keysmith_rotations (id, key_id, app_id, tenant_id, old_hash, \
                     new_hash, reason, grace_period_ms, grace_ends, grace_ended, rotated_by, \
                     created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, FALSE, $10, $11)",
                )
                .bind(record.id.to_string())
                .bind(id.to_string())
                .bind(&record.app_id)
                .bind(&record.tenant_id)
                .bind(old_hash.to_hex())
                .bind(&new_hash)
                .bind(record.reason.as_str())
                .bind(millis(record.grace_period))
                .bind(grace_ends)
                .bind(&record.rotated_by)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_error(ResourceKind::Rotation))?;
                let row = sqlx::query(concat!(
                    "UPDATE keysmith_keys AS k SET hash = $2, hint = $3, rotated_at = $4, \
                     updated_at = $4, rotation_due_notified_at = NULL WHERE k.id = $1 RETURNING ",
                    key_columns!()
                ))
                .bind(id.to_string())
                .bind(&new_hash)
                .bind(&rotation.new_hint)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error(ResourceKind::Key))?;
                (key_of(&row)?, record)
            })
        })
        .await
    }

    async fn lookup(&self, hash: &SecretHash) -> Result<Option<Lookup>> {
        self.bounded(async {
            let hex = hash.to_hex();
            let mut row = sqlx::query(LOOKUP_CURRENT)
                .bind(&hex)
                .fetch_optional(&self.pool)
                .await
                .map_err(Error::store)?;
            if row.is_none() {
                row = sqlx::query(LOOKUP_ROTATED)
                    .bind(&hex)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Error::store)?;
            }
            let Some(row) = row else {
                return Ok(None);
            };
            let mut cols = Cols::new(&row);
            let rotation_id: Option<String> = cols.get()?;
            let grace_ends: Option<DateTime<Utc>> = cols.get()?;
            let key = cols.key()?;
            let policy = if cols.next_is_null()? {
                cols.skip(POLICY_COLUMN_COUNT);
                None
            } else {
                Some(std::sync::Arc::new(cols.policy()?))
            };
            let rotated = match (rotation_id, grace_ends) {
                (Some(id), Some(grace_ends)) => Some(RotatedSecret {
                    rotation_id: sql::parse("rotation id", &id)?,
                    old_hash: *hash,
                    grace_ends,
                }),
                (None, None) => None,
                _ => return Err(corrupt("rotation", "grace end missing")),
            };
            Ok(Some(Lookup {
                key: std::sync::Arc::new(key),
                policy,
                rotated,
            }))
        })
        .await
    }

    async fn expire_keys(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<ApiKey>> {
        let limit = i64::from(limit.min(MAX_BATCH));
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "WITH due AS MATERIALIZED (SELECT id FROM keysmith_keys \
                     WHERE state = 'active' AND expires_at IS NOT NULL AND expires_at <= $1 \
                     ORDER BY expires_at, id COLLATE \"C\" LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 UPDATE keysmith_keys AS k SET state = 'expired', updated_at = $1 FROM due \
                 WHERE k.id = due.id AND k.state = 'active' RETURNING ",
                key_columns!()
            ))
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store)?;
            let mut keys = rows.iter().map(key_of).collect::<Result<Vec<_>>>()?;
            keys.sort_by_key(|k| (k.expires_at, k.id));
            Ok(keys)
        })
        .await
    }

    async fn end_grace_periods(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Rotation>> {
        let limit = i64::from(limit.min(MAX_BATCH));
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "WITH due AS MATERIALIZED (SELECT id FROM keysmith_rotations \
                     WHERE NOT grace_ended AND grace_ends <= $1 \
                     ORDER BY grace_ends, id COLLATE \"C\" LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 UPDATE keysmith_rotations AS r SET grace_ended = TRUE FROM due \
                 WHERE r.id = due.id AND NOT r.grace_ended RETURNING ",
                rotation_columns!()
            ))
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store)?;
            let mut ended = rows
                .iter()
                .map(|row| Cols::new(row).rotation())
                .collect::<Result<Vec<_>>>()?;
            ended.sort_by_key(|r| (r.grace_ends, r.id));
            Ok(ended)
        })
        .await
    }

    async fn claim_rotation_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<RotationDue>> {
        let limit = i64::from(limit.min(MAX_BATCH));
        self.bounded(async {
            let rows = sqlx::query(CLAIM_ROTATION_DUE)
                .bind(now)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::store)?;
            let mut claimed = Vec::with_capacity(rows.len());
            for row in &rows {
                let mut cols = Cols::new(row);
                let key = cols.key()?;
                let due_at: DateTime<Utc> = cols.get()?;
                let first_due: DateTime<Utc> = cols.get()?;
                claimed.push((first_due, RotationDue { key, due_at }));
            }
            claimed.sort_by_key(|(first_due, due)| (*first_due, due.key.id));
            Ok(claimed.into_iter().map(|(_, due)| due).collect())
        })
        .await
    }

    // ---- scopes of a key ----

    async fn add_key_scopes(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        self.bounded(async {
            transaction!(self, |tx| {
                lock_key(&mut tx, tenant, id).await?;
                add_scopes(&mut tx, tenant, id, scopes, now).await?;
                touch_key(&mut tx, id, now).await?
            })
        })
        .await
    }

    async fn remove_key_scopes(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        self.bounded(async {
            transaction!(self, |tx| {
                lock_key(&mut tx, tenant, id).await?;
                sqlx::query(
                    "DELETE FROM keysmith_key_scopes AS ks USING keysmith_scopes AS s \
                     WHERE ks.key_id = $1 AND s.id = ks.scope_id AND s.name = ANY($2)",
                )
                .bind(id.to_string())
                .bind(scopes)
                .execute(&mut *tx)
                .await
                .map_err(Error::store)?;
                touch_key(&mut tx, id, now).await?
            })
        })
        .await
    }

    // ---- policies ----

    async fn create_policy(&self, policy: &Policy) -> Result<()> {
        let columns = PolicyColumns::of(policy)?;
        self.bounded(async {
            bind_policy(INSERT_POLICY, policy, columns)
                .bind(policy.created_at)
                .bind(policy.updated_at)
                .execute(&self.pool)
                .await
                .map_err(db_error(ResourceKind::Policy))?;
            Ok(())
        })
        .await
    }

    async fn get_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<Policy> {
        self.bounded(async {
            let row = sqlx::query(concat!(
                "SELECT ",
                policy_columns!(),
                " FROM keysmith_policies p WHERE p.id = $1 AND p.app_id = $2 AND p.tenant_id = $3"
            ))
            .bind(id.to_string())
            .bind(&tenant.app_id)
            .bind(&tenant.tenant_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store)?
            .ok_or(Error::NotFound(ResourceKind::Policy))?;
            Cols::new(&row).policy()
        })
        .await
    }

    async fn list_policies(&self, tenant: &Tenant, page: &PageRequest) -> Result<Page<Policy>> {
        let (limit, offset) = limit_and_offset(page)?;
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                policy_columns!(),
                ", count(*) OVER () FROM keysmith_policies p \
                 WHERE p.app_id = $1 AND p.tenant_id = $2 \
                 ORDER BY p.id COLLATE \"C\" DESC LIMIT $3 OFFSET $4"
            ))
            .bind(&tenant.app_id)
            .bind(&tenant.tenant_id)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store)?;
            let (items, mut count) = page_rows(&rows, |cols| cols.policy())?;
            if rows.is_empty() && (offset > 0 || limit == 0) {
                count = sqlx::query_scalar(
                    "SELECT count(*) FROM keysmith_policies WHERE app_id = $1 AND tenant_id = $2",
                )
                .bind(&tenant.app_id)
                .bind(&tenant.tenant_id)
                .fetch_one(&self.pool)
                .await
                .map_err(Error::store)?;
            }
            Ok(Page {
                items,
                total: total("policy count", count)?,
            })
        })
        .await
    }

    async fn update_policy(&self, policy: &Policy) -> Result<()> {
        let columns = PolicyColumns::of(policy)?;
        self.bounded(async {
            // The spec and updated_at; a policy's creation time never changes.
            let done = bind_policy(UPDATE_POLICY, policy, columns)
                .bind(policy.updated_at)
                .execute(&self.pool)
                .await
                .map_err(db_error(ResourceKind::Policy))?;
            if done.rows_affected() == 0 {
                return Err(Error::NotFound(ResourceKind::Policy));
            }
            Ok(())
        })
        .await
    }

    async fn delete_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<()> {
        let id = id.to_string();
        self.bounded(async {
            transaction!(self, |tx| {
                let found: Option<i32> = sqlx::query_scalar(
                    "SELECT 1 FROM keysmith_policies \
                     WHERE id = $1 AND app_id = $2 AND tenant_id = $3 FOR UPDATE",
                )
                .bind(&id)
                .bind(&tenant.app_id)
                .bind(&tenant.tenant_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::store)?;
                if found.is_none() {
                    return Err(Error::NotFound(ResourceKind::Policy));
                }
                let users: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM keysmith_keys WHERE policy_id = $1")
                        .bind(&id)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(Error::store)?;
                if users > 0 {
                    return Err(Error::PolicyInUse {
                        keys: total("key count", users)?,
                    });
                }
                sqlx::query("DELETE FROM keysmith_policies WHERE id = $1")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::store)?;
            })
        })
        .await
    }

    // ---- scopes ----

    async fn create_scope(&self, scope: &Scope) -> Result<()> {
        self.bounded(async {
            sqlx::query(
                "INSERT INTO keysmith_scopes \
                 (id, app_id, tenant_id, name, description, parent, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(scope.id.to_string())
            .bind(&scope.app_id)
            .bind(&scope.tenant_id)
            .bind(&scope.name)
            .bind(&scope.description)
            .bind(&scope.parent)
            .bind(scope.created_at)
            .execute(&self.pool)
            .await
            .map_err(db_error(ResourceKind::Scope))?;
            Ok(())
        })
        .await
    }

    async fn list_scopes(
        &self,
        tenant: &Tenant,
        parent: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<Scope>> {
        let (limit, offset) = limit_and_offset(page)?;
        self.bounded(async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                scope_columns!(),
                ", count(*) OVER () FROM keysmith_scopes s \
                 WHERE s.app_id = $1 AND s.tenant_id = $2 AND ($3::text IS NULL OR s.parent = $3) \
                 ORDER BY s.name COLLATE \"C\" LIMIT $4 OFFSET $5"
            ))
            .bind(&tenant.app_id)
            .bind(&tenant.tenant_id)
            .bind(parent)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store)?;
            let (items, mut count) = page_rows(&rows, |cols| cols.scope())?;
            if rows.is_empty() && (offset > 0 || limit == 0) {
                count = sqlx::query_scalar(
                    "SELECT count(*) FROM keysmith_scopes \
                     WHERE app_id = $1 AND tenant_id = $2 AND ($3::text IS NULL OR parent = $3)",
                )
                .bind(&tenant.app_id)
                .bind(&tenant.tenant_id)
                .bind(parent)
                .fetch_one(&self.pool)
                .await
                .map_err(Error::store)?;
            }
            Ok(Page {
                items,
                total: total("scope count", count)?,
            })
        })
        .await
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

    // ---- rotations ----

    async fn list_rotations(&self, tenant: &Tenant, key_id: &KeyId) -> Result<Vec<Rotation>> {
        self.bounded(async {
            // One round trip: the key (to tell "no such key" from "no
            // rotations") joined with its records in the order they were made.
            let rows = sqlx::query(concat!(
                "SELECT ",
                rotation_columns!(),
                " FROM keysmith_keys k LEFT JOIN keysmith_rotations r ON r.key_id = k.id \
                 WHERE k.id = $1 AND k.app_id = $2 AND k.tenant_id = $3 ORDER BY r.seq"
            ))
            .bind(key_id.to_string())
            .bind(&tenant.app_id)
            .bind(&tenant.tenant_id)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store)?;
            if rows.is_empty() {
                return Err(Error::NotFound(ResourceKind::Key));
            }
            let mut history = Vec::with_capacity(rows.len());
            for row in &rows {
                let mut cols = Cols::new(row);
                if !cols.next_is_null()? {
                    history.push(cols.rotation()?);
                }
            }
            Ok(history)
        })
        .await
    }

    // ---- quotas ----

    async fn consume_quota(
        &self,
        key_id: &KeyId,
        windows: &[QuotaWindow],
        cost: u64,
    ) -> Result<QuotaDecision> {
        if windows.is_empty() {
            return Ok(QuotaDecision::from_counts(windows, &[], true));
        }
        let cost_i64 = to_i64("cost", cost)?;
        let key = key_id.to_string();
        // The distinct counters in locking order: period name (as the "C"
        // collation sorts it), then start. Every call locks its rows in this
        // order, so two calls on the same key never wait on each other in a
        // cycle.
        let mut slots: Vec<(&'static str, DateTime<Utc>)> = windows
            .iter()
            .map(|w| (w.period.as_str(), w.start))
            .collect();
        slots.sort_unstable();
        slots.dedup();
        let periods: Vec<&str> = slots.iter().map(|&(period, _)| period).collect();
        let starts: Vec<DateTime<Utc>> = slots.iter().map(|&(_, start)| start).collect();
        self.bounded(async {
            transaction!(self, |tx| {
                // A row for every window, so there is always a row to lock. A
                // row another transaction is inserting is waited for.
                sqlx::query(
                    "INSERT INTO keysmith_quota_counters (key_id, period, period_start, used) \
                     SELECT $1, u.period, u.period_start, 0 \
                     FROM unnest($2::text[], $3::timestamptz[]) WITH ORDINALITY \
                     AS u (period, period_start, n) ORDER BY u.n \
                     ON CONFLICT (key_id, period, period_start) DO NOTHING",
                )
                .bind(&key)
                .bind(&periods)
                .bind(&starts)
                .execute(&mut *tx)
                .await
                .map_err(Error::store)?;
                // Rows are locked after the sort, so in `slots` order. A row
                // another transaction updated is read as it committed it.
                let rows: Vec<(String, DateTime<Utc>, i64)> = sqlx::query_as(
                    "SELECT period, period_start, used FROM keysmith_quota_counters \
                     WHERE key_id = $1 AND (period, period_start) IN \
                     (SELECT * FROM unnest($2::text[], $3::timestamptz[])) \
                     ORDER BY period COLLATE \"C\", period_start FOR UPDATE",
                )
                .bind(&key)
                .bind(&periods)
                .bind(&starts)
                .fetch_all(&mut *tx)
                .await
                .map_err(Error::store)?;
                let mut counts = std::collections::HashMap::with_capacity(rows.len());
                for (period, start, used) in rows {
                    let period: UsagePeriod = sql::parse("quota period", &period)?;
                    counts.insert((period, start), sql::from_i64("quota count", used)?);
                }
                let mut used = Vec::with_capacity(windows.len());
                let mut fits = true;
                for w in windows {
                    let Some(&count) = counts.get(&(w.period, w.start)) else {
                        return Err(Error::store(std::io::Error::other(format!(
                            "the {} quota counter of key {key_id} vanished while it was locked",
                            w.period.as_str()
                        ))));
                    };
                    // A count past i64::MAX could not be stored: it does not fit.
                    fits &= count
                        .checked_add(cost)
                        .is_some_and(|after| after <= w.limit && i64::try_from(after).is_ok());
                    used.push(count);
                }
                if !fits {
                    // Nothing is counted, and the rows inserted above go too.
                    tx.rollback().await.map_err(Error::store)?;
                    return Ok(QuotaDecision::from_counts(windows, &used, false));
                }
                let updated = sqlx::query(
                    "UPDATE keysmith_quota_counters SET used = used + $4 \
                     WHERE key_id = $1 AND (period, period_start) IN \
                     (SELECT * FROM unnest($2::text[], $3::timestamptz[]))",
                )
                .bind(&key)
                .bind(&periods)
                .bind(&starts)
                .bind(cost_i64)
                .execute(&mut *tx)
                .await
                .map_err(Error::store)?
                .rows_affected();
                if updated != slots.len() as u64 {
                    return Err(Error::store(std::io::Error::other(format!(
                        "updated {updated} of {} quota counters of key {key_id}",
                        slots.len()
                    ))));
                }
                let after: Vec<u64> = used.iter().map(|u| u + cost).collect();
                QuotaDecision::from_counts(windows, &after, true)
            })
        })
        .await
    }

    // ---- usage ----

    async fn insert_usage(&self, records: &[UsageRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let rows = records
            .iter()
            .map(UsageBinds::of)
            .collect::<Result<Vec<_>>>()?;
        // One statement for the whole batch, whatever its size: each column
        // travels as one array and UNNEST turns them back into rows. The text
        // never changes, so the server prepares it once per connection (a
        // multi-row VALUES list is a new statement for every batch size, and
        // costs a bind per value).
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let key_ids: Vec<&str> = rows.iter().map(|r| r.key_id.as_str()).collect();
        let app_ids: Vec<&str> = rows.iter().map(|r| r.record.app_id.as_str()).collect();
        let tenant_ids: Vec<&str> = rows.iter().map(|r| r.record.tenant_id.as_str()).collect();
        let endpoints: Vec<&str> = rows.iter().map(|r| r.record.endpoint.as_str()).collect();
        let methods: Vec<&str> = rows.iter().map(|r| r.record.method.as_str()).collect();
        let statuses: Vec<i32> = rows.iter().map(|r| r.status_code).collect();
        let ips: Vec<Option<&str>> = rows.iter().map(|r| r.record.ip.as_deref()).collect();
        let agents: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.record.user_agent.as_deref())
            .collect();
        let latencies: Vec<i64> = rows.iter().map(|r| r.latency_ms).collect();
        let metadata: Vec<&serde_json::Value> = rows.iter().map(|r| &r.metadata).collect();
        let created: Vec<DateTime<Utc>> = rows.iter().map(|r| r.record.created_at).collect();
        self.bounded(async {
            transaction!(self, |tx| {
                // A clash on id, within the batch or with a stored record,
                // fails the statement and rolls the whole batch back.
                sqlx::query(
                    "INSERT INTO keysmith_usage (id, key_id, app_id, tenant_id, endpoint, \
                     method, status_code, ip, user_agent, latency_ms, metadata, created_at) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], \
                     $5::text[], $6::text[], $7::int4[], $8::text[], $9::text[], $10::int8[], \
                     $11::jsonb[], $12::timestamptz[])",
                )
                .bind(&ids)
                .bind(&key_ids)
                .bind(&app_ids)
                .bind(&tenant_ids)
                .bind(&endpoints)
                .bind(&methods)
                .bind(&statuses)
                .bind(&ips)
                .bind(&agents)
                .bind(&latencies)
                .bind(&metadata)
                .bind(&created)
                .execute(&mut *tx)
                .await
                .map_err(db_error(ResourceKind::Usage))?;
            })
        })
        .await
    }

    async fn purge_usage(&self, cutoff: DateTime<Utc>, limit: u32) -> Result<u64> {
        let limit = i64::from(limit.min(MAX_BATCH));
        self.bounded(async {
            let done = sqlx::query(
                "DELETE FROM keysmith_usage WHERE id IN (SELECT id FROM keysmith_usage \
                 WHERE created_at < $1 ORDER BY created_at, id COLLATE \"C\" LIMIT $2 \
                 FOR UPDATE SKIP LOCKED)",
            )
            .bind(cutoff)
            .bind(limit)
            .execute(&self.pool)
            .await
            .map_err(Error::store)?;
            Ok(done.rows_affected())
        })
        .await
    }

    async fn touch_last_used(&self, uses: &[(KeyId, DateTime<Utc>)]) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = uses.iter().map(|(id, _)| id.to_string()).collect();
        let ats: Vec<DateTime<Utc>> = uses.iter().map(|(_, at)| *at).collect();
        self.bounded(async {
            // One statement for the whole batch; a key never goes back in time.
            sqlx::query(
                "UPDATE keysmith_keys k SET last_used_at = u.at \
                 FROM (SELECT id, max(at) AS at FROM unnest($1::text[], $2::timestamptz[]) \
                       AS t (id, at) GROUP BY id) AS u \
                 WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
            )
            .bind(&ids)
            .bind(&ats)
            .execute(&self.pool)
            .await
            .map_err(Error::store)?;
            Ok(())
        })
        .await
    }

    async fn usage_between(
        &self,
        after: DateTime<Utc>,
        before: DateTime<Utc>,
        from: Option<(DateTime<Utc>, UsageId)>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>> {
        self.bounded(async {
            let rows = sqlx::query(USAGE_BETWEEN)
                .bind(after)
                .bind(before)
                .bind(from.map(|(at, _)| at))
                .bind(from.map(|(_, id)| id.to_string()))
                .bind(i64::from(limit.min(super::MAX_PAGE)))
                .fetch_all(&self.pool)
                .await
                .map_err(Error::store)?;
            rows.iter().map(|row| Cols::new(row).usage()).collect()
        })
        .await
    }

    async fn list_usage(&self, tenant: &Tenant, filter: &UsageFilter) -> Result<Page<UsageRecord>> {
        let (limit, offset) = limit_and_offset(&filter.page)?;
        let key_id = filter.key_id.map(|k| k.to_string());
        self.bounded(async {
            let rows = sqlx::query(LIST_USAGE)
                .bind(&tenant.app_id)
                .bind(&tenant.tenant_id)
                .bind(&key_id)
                .bind(filter.after)
                .bind(filter.before)
                .bind(limit)
                .bind(offset)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::store)?;
            let (items, mut count) = page_rows(&rows, |cols| cols.usage())?;
            if rows.is_empty() && (offset > 0 || limit == 0) {
                // Past the end: the page holds no row to carry the total.
                count = sqlx::query_scalar(COUNT_USAGE)
                    .bind(&tenant.app_id)
                    .bind(&tenant.tenant_id)
                    .bind(&key_id)
                    .bind(filter.after)
                    .bind(filter.before)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(Error::store)?;
            }
            Ok(Page {
                items,
                total: total("usage count", count)?,
            })
        })
        .await
    }

    async fn upsert_usage_aggregates(&self, rows: &[UsageAggregate]) -> Result<()> {
        // One row per (key, period, start), the last given winning (one
        // statement may not update a row twice), in a fixed order so that
        // concurrent upserts lock rows alike.
        let mut distinct = std::collections::BTreeMap::new();
        for row in rows {
            let binds = AggregateBinds::of(row)?;
            distinct.insert((binds.key_id.clone(), row.period, row.period_start), binds);
        }
        if distinct.is_empty() {
            return Ok(());
        }
        let rows: Vec<AggregateBinds<'_>> = distinct.into_values().collect();
        self.bounded(async {
            transaction!(self, |tx| {
                for chunk in rows.chunks(USAGE_CHUNK) {
                    let mut upsert = sqlx::QueryBuilder::<Postgres>::new(
                        "INSERT INTO keysmith_usage_agg (key_id, app_id, tenant_id, period, \
                         period_start, request_count, error_count, total_latency_ms, \
                         p50_latency_ms, p99_latency_ms, updated_at) ",
                    );
                    upsert.push_values(chunk, |mut b, row| {
                        b.push_bind(&row.key_id)
                            .push_bind(&row.row.app_id)
                            .push_bind(&row.row.tenant_id)
                            .push_bind(row.row.period.as_str())
                            .push_bind(row.row.period_start)
                            .push_bind(row.request_count)
                            .push_bind(row.error_count)
                            .push_bind(row.total_latency_ms)
                            .push_bind(row.p50_latency_ms)
                            .push_bind(row.p99_latency_ms)
                            .push("now()");
                    });
                    upsert.push(
                        " ON CONFLICT (key_id, period, period_start) DO UPDATE SET \
                         app_id = EXCLUDED.app_id, tenant_id = EXCLUDED.tenant_id, \
                         request_count = EXCLUDED.request_count, \
                         error_count = EXCLUDED.error_count, \
                         total_latency_ms = EXCLUDED.total_latency_ms, \
                         p50_latency_ms = EXCLUDED.p50_latency_ms, \
                         p99_latency_ms = EXCLUDED.p99_latency_ms, \
                         updated_at = EXCLUDED.updated_at",
                    );
                    upsert
                        .build()
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::store)?;
                }
            })
        })
        .await
    }

    async fn list_usage_aggregates(
        &self,
        tenant: &Tenant,
        key_id: &KeyId,
        period: UsagePeriod,
        after: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageAggregate>> {
        self.bounded(async {
            let rows = sqlx::query(LIST_USAGE_AGGREGATES)
                .bind(key_id.to_string())
                .bind(&tenant.app_id)
                .bind(&tenant.tenant_id)
                .bind(period.as_str())
                .bind(after)
                .bind(before)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::store)?;
            rows.iter().map(|row| Cols::new(row).aggregate()).collect()
        })
        .await
    }
}
