//! Storage: one object-safe trait of atomic domain operations.
//!
//! Each method is one atomic operation on the backend (a key with its scopes, a
//! rotation with its record, a compare-and-set state change), so the engine
//! never stitches loose reads and writes together. Every management method
//! takes the tenant and filters by it: another tenant's record is `NotFound`.
//! [`conformance`] checks that a backend behaves as documented here.

pub mod conformance;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteOptions, SqliteStore};

use crate::error::Result;
use crate::id::{KeyId, PolicyId, RotationId, ScopeId, UsageId};
use crate::model::{
    ApiKey, KeyAction, KeyFilter, Metadata, Page, PageRequest, Rotation, RotationDue,
    RotationReason, Scope, Tenant, UsageAggregate, UsageFilter, UsagePeriod, UsageRecord,
};
use crate::policy::Policy;
use crate::ratelimit::{QuotaDecision, QuotaWindow};
use crate::secret::SecretHash;

/// What a lookup by hash found: the key, its policy, and, when the hash was a
/// secret replaced by a rotation, what validation needs of that rotation.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The key.
    pub key: Arc<ApiKey>,
    /// Its policy, if it has one.
    pub policy: Option<Arc<Policy>>,
    /// Set when the hash was an old secret of the key.
    pub rotated: Option<RotatedSecret>,
}

/// An old secret of a key, known through the rotation that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotatedSecret {
    /// The rotation record.
    pub rotation_id: RotationId,
    /// The old secret's hash.
    pub old_hash: SecretHash,
    /// When the old secret stops working.
    pub grace_ends: DateTime<Utc>,
}

impl From<&Rotation> for RotatedSecret {
    fn from(r: &Rotation) -> Self {
        Self {
            rotation_id: r.id,
            old_hash: r.old_hash,
            grace_ends: r.grace_ends,
        }
    }
}

/// A change to a key's editable fields. `None` leaves a field as it is; for
/// nullable fields `Some(None)` clears it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyUpdate {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New description, or `Some(None)` to clear.
    #[serde(default, deserialize_with = "nullable")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub description: Option<Option<String>>,
    /// New metadata (replaces the object).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<Metadata>,
    /// New policy, or `Some(None)` to detach.
    #[serde(default, deserialize_with = "nullable")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub policy_id: Option<Option<PolicyId>>,
    /// New expiry, or `Some(None)` for none.
    #[serde(default, deserialize_with = "nullable")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

impl KeyUpdate {
    /// Applies the update to a key read inside the store's transaction.
    pub(crate) fn apply(&self, key: &mut ApiKey, now: DateTime<Utc>) {
        if let Some(name) = &self.name {
            key.name = name.clone();
        }
        if let Some(description) = &self.description {
            key.description = description.clone();
        }
        if let Some(metadata) = &self.metadata {
            key.metadata = metadata.clone();
        }
        if let Some(policy_id) = self.policy_id {
            key.policy_id = policy_id;
        }
        if let Some(expires_at) = self.expires_at {
            key.expires_at = expires_at;
        }
        key.updated_at = now;
    }
}

/// Tells a JSON `null` (clear the field) from an absent field (keep it).
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A rotation to apply: the new secret's hash and hint and the terms for the
/// old one. The store fills in the old hash from the key as it is inside the
/// same transaction, so concurrent rotations form a chain.
#[derive(Debug, Clone)]
pub struct NewRotation {
    /// Id for the rotation record.
    pub id: RotationId,
    /// Hash of the new secret.
    pub new_hash: SecretHash,
    /// Last four characters of the new secret.
    pub new_hint: String,
    /// Why.
    pub reason: RotationReason,
    /// How long the old secret keeps working.
    pub grace_period: Duration,
    /// Who asked.
    pub rotated_by: Option<String>,
}

impl NewRotation {
    /// When the old secret stops working if the rotation happens at `now`.
    pub fn grace_ends(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
        chrono::Duration::from_std(self.grace_period)
            .ok()
            .and_then(|grace| now.checked_add_signed(grace))
            .ok_or_else(|| crate::Error::invalid_input("grace_period", "is too long"))
    }

    /// The record of this rotation, replacing `old_hash` of the key `key_id`
    /// of `tenant` at `now`.
    pub fn record(
        &self,
        tenant: &Tenant,
        key_id: KeyId,
        old_hash: SecretHash,
        now: DateTime<Utc>,
    ) -> Result<Rotation> {
        Ok(Rotation {
            id: self.id,
            key_id,
            app_id: tenant.app_id.clone(),
            tenant_id: tenant.tenant_id.clone(),
            old_hash,
            new_hash: self.new_hash,
            reason: self.reason,
            grace_period: self.grace_period,
            grace_ends: self.grace_ends(now)?,
            grace_ended: false,
            rotated_by: self.rotated_by.clone(),
            created_at: now,
        })
    }
}

/// The most records [`Store::usage_between`] returns at once.
pub const MAX_PAGE: u32 = 10_000;

/// The storage backend.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Checks the backend is reachable (the health check behind `/readyz`).
    async fn ping(&self) -> Result<()>;

    // ---- keys ----

    /// Inserts a key with its scopes, creating scope names the tenant does not
    /// have yet. Its policy must exist in its tenant (`NotFound(Policy)`); a
    /// clash on id or hash is `AlreadyExists`.
    async fn create_key(&self, key: &ApiKey) -> Result<()>;

    /// One key of the tenant.
    async fn get_key(&self, tenant: &Tenant, id: &KeyId) -> Result<ApiKey>;

    /// The tenant's keys matching the filter, newest first, with the total.
    /// `rotation_due` needs `filter.now` (`InvalidInput` otherwise).
    async fn list_keys(&self, tenant: &Tenant, filter: &KeyFilter) -> Result<Page<ApiKey>>;

    /// Applies an update; a new policy must exist in the tenant.
    async fn update_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        update: &KeyUpdate,
        now: DateTime<Utc>,
    ) -> Result<ApiKey>;

    /// Deletes a key with its scope links and rotation records.
    async fn delete_key(&self, tenant: &Tenant, id: &KeyId) -> Result<()>;

    /// Compare-and-set state change: applies `action` only if the key's state
    /// allows it (`InvalidStateTransition` otherwise), stamping `revoked_at`
    /// for a revocation.
    async fn transition_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        action: KeyAction,
        now: DateTime<Utc>,
    ) -> Result<ApiKey>;

    /// Replaces the key's secret and writes the rotation record, atomically.
    /// The record's old hash is the key's hash inside the transaction; grace
    /// periods of earlier rotations of the key that would outlast this one's
    /// are cut to end with it. Revoked or expired keys are refused.
    async fn rotate_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        rotation: &NewRotation,
        now: DateTime<Utc>,
    ) -> Result<(ApiKey, Rotation)>;

    /// Finds a key by the hash of a presented secret: its current secret, or
    /// an old one replaced by a rotation. Not tenant-scoped: the key says whose
    /// it is.
    async fn lookup(&self, hash: &SecretHash) -> Result<Option<Lookup>>;

    /// Records when keys were last used: each `(key, at)` moves the key's
    /// `last_used_at` forward to `at` (never back). Keys that no longer exist
    /// are skipped.
    async fn touch_last_used(&self, uses: &[(KeyId, DateTime<Utc>)]) -> Result<()>;

    /// Marks up to `limit` active keys whose expiry is at or before `now` as
    /// expired, returning them (each key is returned by exactly one call).
    async fn expire_keys(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<ApiKey>>;

    /// Closes up to `limit` rotation grace periods that ended at or before
    /// `now`, returning the records closed (each once).
    async fn end_grace_periods(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Rotation>>;

    /// Claims up to `limit` keys due for rotation at `now` (see
    /// [`rotation_due_at`](crate::model::rotation_due_at)) that have not been
    /// claimed yet in their current period, marking them claimed at `now` in
    /// the same atomic step, and returns them with the instant each became
    /// due, earliest first. Each key is returned once per period, whatever
    /// the number of callers or nodes; rotating a key clears its claim (a new
    /// period starts).
    async fn claim_rotation_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<RotationDue>>;

    // ---- scopes of a key ----

    /// Adds scopes to a key, creating unknown names for the tenant.
    async fn add_key_scopes(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> Result<ApiKey>;

    /// Removes scopes from a key (names it does not hold are ignored).
    async fn remove_key_scopes(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> Result<ApiKey>;

    // ---- policies ----

    /// Inserts a policy; its name must be new in the tenant.
    async fn create_policy(&self, policy: &Policy) -> Result<()>;

    /// One policy of the tenant.
    async fn get_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<Policy>;

    /// The tenant's policies, newest first.
    async fn list_policies(&self, tenant: &Tenant, page: &PageRequest) -> Result<Page<Policy>>;

    /// Replaces a policy's spec (and `updated_at`); the name stays unique.
    async fn update_policy(&self, policy: &Policy) -> Result<()>;

    /// Deletes a policy no key uses (`PolicyInUse` otherwise).
    async fn delete_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<()>;

    // ---- scopes ----

    /// Inserts a scope; its name must be new in the tenant.
    async fn create_scope(&self, scope: &Scope) -> Result<()>;

    /// The tenant's scopes by name, optionally only the children of `parent`.
    async fn list_scopes(
        &self,
        tenant: &Tenant,
        parent: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<Scope>>;

    /// Deletes a scope and takes it off every key that held it.
    async fn delete_scope(&self, tenant: &Tenant, id: &ScopeId) -> Result<()>;

    // ---- rotations ----

    /// The key's rotation records, oldest first.
    async fn list_rotations(&self, tenant: &Tenant, key_id: &KeyId) -> Result<Vec<Rotation>>;

    // ---- quotas ----

    /// Adds `cost` to the key's count in every window if each stays within
    /// its limit, atomically (exact under concurrency, across every node on
    /// the same database); otherwise changes nothing and refuses. The counts
    /// returned are each window's after the call.
    async fn consume_quota(
        &self,
        key_id: &KeyId,
        windows: &[QuotaWindow],
        cost: u64,
    ) -> Result<QuotaDecision>;

    // ---- usage ----

    /// Inserts a batch of usage records in one transaction, or none of them
    /// (records carry their tenant). Record ids are drawn by Keysmith
    /// (UUIDv7) and unique by construction: a store need not look them up
    /// (the SQLite store keeps records in blocks and does not).
    async fn insert_usage(&self, records: &[UsageRecord]) -> Result<()>;

    /// The tenant's usage records, newest first (`created_at`, then id), with
    /// the total.
    async fn list_usage(&self, tenant: &Tenant, filter: &UsageFilter) -> Result<Page<UsageRecord>>;

    /// Every tenant's usage records created in `[after, before)`, oldest first
    /// (`created_at`, then id), at most `limit` (capped at [`MAX_PAGE`]) at a time:
    /// those that come after `from` (the `created_at` and id of the last
    /// record of the previous page; `None` for the first page). The
    /// aggregation worker's input; each page costs the same however deep it
    /// is.
    async fn usage_between(
        &self,
        after: DateTime<Utc>,
        before: DateTime<Utc>,
        from: Option<(DateTime<Utc>, UsageId)>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>>;

    /// Deletes up to `limit` of the oldest usage records created before
    /// `cutoff` (every tenant's), returning how many went.
    async fn purge_usage(&self, cutoff: DateTime<Utc>, limit: u32) -> Result<u64>;

    /// Writes aggregate rows, each replacing the row with the same key, period
    /// and period start (so recomputing is idempotent).
    async fn upsert_usage_aggregates(&self, rows: &[UsageAggregate]) -> Result<()>;

    /// A key's aggregate rows of one period kind whose period starts within
    /// `[after, before)`, oldest first. Another tenant's key has none.
    async fn list_usage_aggregates(
        &self,
        tenant: &Tenant,
        key_id: &KeyId,
        period: UsagePeriod,
        after: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageAggregate>>;
}
