//! What the SQL stores share: neutral row structs that each dialect fills from
//! its own column types, their conversion into domain records, and the mapping
//! of database errors onto [`Error`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{Error, ResourceKind, Result};
use crate::model::{ApiKey, Metadata, Rotation, Scope, Tenant};
use crate::policy::{Policy, PolicySpec};
use crate::secret::SecretHash;

/// Rows a sweep or list may return at most per call, whatever is asked.
pub(crate) const MAX_BATCH: u32 = 10_000;

/// A stored value that does not decode: the database holds something Keysmith
/// never wrote. Reported as a store error, never as a panic.
pub(crate) fn corrupt(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::store(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("stored {what} is invalid: {detail}"),
    ))
}

/// Maps a driver error: unique violations become `AlreadyExists` naming the
/// clashing field, everything else a `Store` error that keeps its source.
pub(crate) fn db_error(kind: ResourceKind) -> impl Fn(sqlx::Error) -> Error {
    move |error| match unique_field(&error) {
        Some(field) => Error::AlreadyExists { kind, field },
        None => Error::store(error),
    }
}

/// Which unique field a unique violation is about (`hash`, `name` or `id`).
pub(crate) fn unique_field(error: &sqlx::Error) -> Option<&'static str> {
    let db = error.as_database_error()?;
    if db.kind() != sqlx::error::ErrorKind::UniqueViolation {
        return None;
    }
    let text = format!("{} {}", db.constraint().unwrap_or_default(), db.message());
    Some(if text.contains("hash") {
        "hash"
    } else if text.contains("name") {
        "name"
    } else {
        "id"
    })
}

/// Maps a migration failure. A database that holds a migration this build
/// does not know was migrated by a newer Keysmith: refuse it, clearly.
pub(crate) fn migrate_error(error: sqlx::migrate::MigrateError) -> Error {
    use sqlx::migrate::MigrateError;
    match error {
        MigrateError::VersionMissing(version) => Error::store(std::io::Error::other(format!(
            "the database was migrated by a newer Keysmith (it has schema migration {version}, \
             which this build does not know); upgrade Keysmith instead of using this build"
        ))),
        other => Error::store(other),
    }
}

pub(crate) fn parse<T: std::str::FromStr>(what: &str, value: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| corrupt(what, e))
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn from_millis(what: &str, ms: i64) -> Result<Duration> {
    u64::try_from(ms)
        .map(Duration::from_millis)
        .map_err(|e| corrupt(what, e))
}

pub(crate) fn to_i64(what: &str, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::invalid_input(what, "is too large"))
}

pub(crate) fn from_i64(what: &str, n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|e| corrupt(what, e))
}

/// A key as read from `keysmith_keys`, with its scope names.
#[derive(Debug)]
pub(crate) struct KeyRow {
    pub id: String,
    pub app_id: String,
    pub tenant_id: String,
    pub name: String,
    pub description: Option<String>,
    pub prefix: String,
    pub hint: String,
    pub hash: String,
    pub environment: String,
    pub state: String,
    pub policy_id: Option<String>,
    pub scopes: Vec<String>,
    pub metadata: serde_json::Value,
    pub created_by: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub(crate) fn metadata(value: serde_json::Value) -> Result<Metadata> {
    match value {
        serde_json::Value::Object(map) => Ok(map),
        other => Err(corrupt("metadata", format!("not an object: {other}"))),
    }
}

impl KeyRow {
    pub(crate) fn into_key(self) -> Result<ApiKey> {
        let mut scopes = self.scopes;
        scopes.sort();
        Ok(ApiKey {
            id: parse("key id", &self.id)?,
            app_id: self.app_id,
            tenant_id: self.tenant_id,
            name: self.name,
            description: self.description,
            prefix: self.prefix,
            hint: self.hint,
            hash: SecretHash::from_hex(&self.hash).map_err(|e| corrupt("key hash", e))?,
            environment: parse("environment", &self.environment)?,
            state: parse("state", &self.state)?,
            policy_id: self
                .policy_id
                .as_deref()
                .map(|p| parse("policy id", p))
                .transpose()?,
            scopes,
            metadata: metadata(self.metadata)?,
            created_by: self.created_by,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            rotated_at: self.rotated_at,
            revoked_at: self.revoked_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// A policy as read from `keysmith_policies`.
#[derive(Debug)]
pub(crate) struct PolicyRow {
    pub id: String,
    pub app_id: String,
    pub tenant_id: String,
    pub name: String,
    pub description: Option<String>,
    pub rate_limit: Option<i64>,
    pub rate_limit_window_ms: Option<i64>,
    pub burst_limit: Option<i64>,
    pub allowed_scopes: serde_json::Value,
    pub allowed_ips: serde_json::Value,
    pub allowed_origins: serde_json::Value,
    pub allowed_methods: serde_json::Value,
    pub allowed_paths: serde_json::Value,
    pub max_key_lifetime_ms: Option<i64>,
    pub rotation_period_ms: Option<i64>,
    pub grace_period_ms: Option<i64>,
    pub daily_quota: Option<i64>,
    pub monthly_quota: Option<i64>,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn string_list(what: &str, value: serde_json::Value) -> Result<Vec<String>> {
    serde_json::from_value(value).map_err(|e| corrupt(what, e))
}

fn opt_u64(what: &str, n: Option<i64>) -> Result<Option<u64>> {
    n.map(|n| from_i64(what, n)).transpose()
}

fn opt_duration(what: &str, ms: Option<i64>) -> Result<Option<Duration>> {
    ms.map(|ms| from_millis(what, ms)).transpose()
}

impl PolicyRow {
    pub(crate) fn into_policy(self) -> Result<Policy> {
        let spec = PolicySpec {
            name: self.name,
            description: self.description,
            rate_limit: opt_u64("rate_limit", self.rate_limit)?,
            rate_limit_window: opt_duration("rate_limit_window", self.rate_limit_window_ms)?,
            burst_limit: opt_u64("burst_limit", self.burst_limit)?,
            allowed_scopes: string_list("allowed_scopes", self.allowed_scopes)?,
            allowed_ips: string_list("allowed_ips", self.allowed_ips)?,
            allowed_origins: string_list("allowed_origins", self.allowed_origins)?,
            allowed_methods: string_list("allowed_methods", self.allowed_methods)?,
            allowed_paths: string_list("allowed_paths", self.allowed_paths)?,
            max_key_lifetime: opt_duration("max_key_lifetime", self.max_key_lifetime_ms)?,
            rotation_period: opt_duration("rotation_period", self.rotation_period_ms)?,
            grace_period: opt_duration("grace_period", self.grace_period_ms)?,
            daily_quota: opt_u64("daily_quota", self.daily_quota)?,
            monthly_quota: opt_u64("monthly_quota", self.monthly_quota)?,
            metadata: metadata(self.metadata)?,
        };
        let tenant = Tenant {
            app_id: self.app_id,
            tenant_id: self.tenant_id,
        };
        Policy::new(
            parse("policy id", &self.id)?,
            &tenant,
            spec,
            self.created_at,
            self.updated_at,
        )
        .map_err(|e| corrupt("policy", e))
    }
}

/// The columns of a policy as the SQL stores write them.
pub(crate) struct PolicyColumns<'a> {
    pub spec: &'a PolicySpec,
    pub rate_limit: Option<i64>,
    pub rate_limit_window_ms: Option<i64>,
    pub burst_limit: Option<i64>,
    pub allowed_scopes: serde_json::Value,
    pub allowed_ips: serde_json::Value,
    pub allowed_origins: serde_json::Value,
    pub allowed_methods: serde_json::Value,
    pub allowed_paths: serde_json::Value,
    pub max_key_lifetime_ms: Option<i64>,
    pub rotation_period_ms: Option<i64>,
    pub grace_period_ms: Option<i64>,
    pub daily_quota: Option<i64>,
    pub monthly_quota: Option<i64>,
    pub metadata: serde_json::Value,
}

impl<'a> PolicyColumns<'a> {
    pub(crate) fn of(policy: &'a Policy) -> Result<Self> {
        let spec = &policy.spec;
        let opt = |what: &str, n: Option<u64>| n.map(|n| to_i64(what, n)).transpose();
        let list = |v: &Vec<String>| serde_json::Value::from(v.clone());
        Ok(Self {
            spec,
            rate_limit: opt("rate_limit", spec.rate_limit)?,
            rate_limit_window_ms: spec.rate_limit_window.map(millis),
            burst_limit: opt("burst_limit", spec.burst_limit)?,
            allowed_scopes: list(&spec.allowed_scopes),
            allowed_ips: list(&spec.allowed_ips),
            allowed_origins: list(&spec.allowed_origins),
            allowed_methods: list(&spec.allowed_methods),
            allowed_paths: list(&spec.allowed_paths),
            max_key_lifetime_ms: spec.max_key_lifetime.map(millis),
            rotation_period_ms: spec.rotation_period.map(millis),
            grace_period_ms: spec.grace_period.map(millis),
            daily_quota: opt("daily_quota", spec.daily_quota)?,
            monthly_quota: opt("monthly_quota", spec.monthly_quota)?,
            metadata: serde_json::Value::Object(spec.metadata.clone()),
        })
    }
}

/// A rotation record as read from `keysmith_rotations`.
#[derive(Debug)]
pub(crate) struct RotationRow {
    pub id: String,
    pub key_id: String,
    pub app_id: String,
    pub tenant_id: String,
    pub old_hash: String,
    pub new_hash: String,
    pub reason: String,
    pub grace_period_ms: i64,
    pub grace_ends: DateTime<Utc>,
    pub grace_ended: bool,
    pub rotated_by: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl RotationRow {
    pub(crate) fn into_rotation(self) -> Result<Rotation> {
        Ok(Rotation {
            id: parse("rotation id", &self.id)?,
            key_id: parse("key id", &self.key_id)?,
            app_id: self.app_id,
            tenant_id: self.tenant_id,
            old_hash: SecretHash::from_hex(&self.old_hash).map_err(|e| corrupt("hash", e))?,
            new_hash: SecretHash::from_hex(&self.new_hash).map_err(|e| corrupt("hash", e))?,
            reason: parse("rotation reason", &self.reason)?,
            grace_period: from_millis("grace period", self.grace_period_ms)?,
            grace_ends: self.grace_ends,
            grace_ended: self.grace_ended,
            rotated_by: self.rotated_by,
            created_at: self.created_at,
        })
    }
}

/// A scope as read from `keysmith_scopes`.
#[derive(Debug)]
pub(crate) struct ScopeRow {
    pub id: String,
    pub app_id: String,
    pub tenant_id: String,
    pub name: String,
    pub description: Option<String>,
    pub parent: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl ScopeRow {
    pub(crate) fn into_scope(self) -> Result<Scope> {
        Ok(Scope {
            id: parse("scope id", &self.id)?,
            app_id: self.app_id,
            tenant_id: self.tenant_id,
            name: self.name,
            description: self.description,
            parent: self.parent,
            created_at: self.created_at,
        })
    }
}
