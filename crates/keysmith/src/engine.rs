//! The engine: the one place business rules live. Stores keep records, the
//! server and middleware translate HTTP; every decision is made here.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::cache::{CacheOptions, ChangeFeed, Entry, Found, Invalidation, ValidationCache};
use crate::clock::{Clock, SystemClock, store_precision};
use crate::duration;
use crate::error::{Error, Result};
use crate::hooks::{Failure, Hook, Hooks, run_hooks};
use crate::id::{KeyId, PolicyId, RotationId, ScopeId, UsageId};
use crate::model::{
    ApiKey, KeyAction, KeyFilter, KeyState, MAX_SCOPES_PER_KEY, Metadata, Page, PageRequest,
    Rotation, RotationReason, Scope, Tenant, UsageAggregate, UsageFilter, UsagePeriod, UsageRecord,
};
use crate::policy::{self, Policy, PolicySpec, RequestContext};
use crate::ratelimit::local::{self, EngineClock};
use crate::ratelimit::{
    LocalRateLimiter, QuotaCounter, QuotaDecision, QuotaStates, QuotaWindow, RateLimitState,
    RateLimiter,
};
use crate::scope::{self, parent_of, validate_scope_name};
use crate::secret::{DEFAULT_PREFIX, Environment, ParsedKey, RawKey, SecretHash, validate_prefix};
use crate::store::{KeyUpdate, NewRotation, Store};
use crate::usage::UsageSink;

/// Grace period of a rotation when neither the call nor the policy sets one.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// What to create a key with.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Human name.
    pub name: String,
    /// Optional description.
    #[serde(default)]
    pub description: Option<String>,
    /// Prefix of the raw key (default `sk`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Environment (default `live`).
    #[serde(default)]
    pub environment: Option<Environment>,
    /// Scopes to grant; unknown names are created for the tenant.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Policy to hold the key to.
    #[serde(default)]
    pub policy_id: Option<PolicyId>,
    /// Expiry; capped by the policy's `max_key_lifetime`.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Free-form metadata.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: Metadata,
    /// Who is creating it.
    #[serde(default)]
    pub created_by: Option<String>,
}

/// A new key and its raw secret, which is never available again.
#[derive(Debug)]
pub struct CreatedKey {
    /// The secret, to hand to the key's owner once.
    pub raw_key: RawKey,
    /// The stored key.
    pub key: ApiKey,
}

/// How to rotate a key.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// Why (default `manual`).
    #[serde(default)]
    pub reason: RotationReason,
    /// How long the old secret keeps working: else the policy's grace period,
    /// else 24 hours; a `compromise` rotation defaults to none.
    #[serde(default, with = "duration::serde_human::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "24h"))]
    pub grace_period: Option<Duration>,
    /// Who is rotating it.
    #[serde(default)]
    pub rotated_by: Option<String>,
}

/// A rotated key: its new secret (shown once) and the rotation record.
#[derive(Debug)]
pub struct RotatedKey {
    /// The new secret.
    pub raw_key: RawKey,
    /// The key after rotation.
    pub key: ApiKey,
    /// The record of the rotation.
    pub rotation: Rotation,
}

/// What to create a scope with.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScope {
    /// Name (`read:users`).
    pub name: String,
    /// Optional description.
    #[serde(default)]
    pub description: Option<String>,
    /// Parent name; must be an ancestor of the name (default: the name up to
    /// its last `:`).
    #[serde(default)]
    pub parent: Option<String>,
}

/// Most usage records one call may record.
pub const MAX_USAGE_BATCH: usize = 1000;

/// A request to record, as a gateway or middleware reports it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUsage {
    /// The key used (of the caller's tenant).
    pub key_id: KeyId,
    /// Endpoint (route or path, 1-1024 characters).
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Response status (100-599).
    pub status_code: u16,
    /// Client IP.
    #[serde(default)]
    pub ip: Option<String>,
    /// Client user agent (at most 512 characters).
    #[serde(default)]
    pub user_agent: Option<String>,
    /// Time to answer, in milliseconds.
    pub latency_ms: u64,
    /// Free-form metadata.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: Metadata,
    /// When the request was made (default: now).
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
}

/// An accepted key.
#[derive(Debug, Clone)]
pub struct Validation {
    /// The key.
    pub key: Arc<ApiKey>,
    /// Its policy.
    pub policy: Option<Arc<Policy>>,
    /// Set when the presented secret was replaced by a rotation and is still
    /// within its grace period: when that ends.
    pub grace_ends: Option<DateTime<Utc>>,
    /// The rate limit's state, when the policy sets one.
    pub rate_limit: Option<RateLimitState>,
    /// Each quota window's state (this request counted), when the policy sets quotas.
    pub quota: QuotaStates,
}

/// The deepest offset [`Engine::list_usage`] pages to: a page that deep
/// reads every newer record of the range first.
pub const MAX_USAGE_OFFSET: u64 = 100_000;

/// Builds an [`Engine`].
#[derive(Debug)]
pub struct EngineBuilder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    hooks: Hooks,
    rate_limiter: Option<Arc<dyn RateLimiter>>,
    quota_counter: Option<Arc<dyn QuotaCounter>>,
    local_quota_counts: bool,
    last_used_interval: chrono::Duration,
    usage_sink: Option<UsageSink>,
    cache: Option<CacheOptions>,
    change_feed: Option<Arc<dyn ChangeFeed>>,
}

impl EngineBuilder {
    /// Uses `clock` instead of the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Uses `limiter` for policies' rate limits (default: [`LocalRateLimiter`]).
    pub fn rate_limiter(mut self, limiter: Arc<dyn RateLimiter>) -> Self {
        self.rate_limiter = Some(limiter);
        self
    }

    /// Uses `counter` for policies' quotas (default: [`StoreQuotaCounter`](crate::ratelimit::StoreQuotaCounter) on
    /// the engine's store).
    pub fn quota_counter(mut self, counter: Arc<dyn QuotaCounter>) -> Self {
        self.quota_counter = Some(counter);
        self.local_quota_counts = false;
        self
    }

    /// Counts quotas in this process, exactly, next to the in-process rate
    /// limiter (one record per key), and writes the counts to the store
    /// behind, at every [`Engine::flush_quota_counts`] (and
    /// [`Engine::shutdown`]). A key's counts are loaded from the store when
    /// this process first needs them, so they survive a restart; what a
    /// crash loses is what was counted since the last flush. For one node
    /// per store only: several nodes sharing a database must count in it
    /// (the default) or in Redis.
    pub fn local_quota_counts(mut self) -> Self {
        self.local_quota_counts = true;
        self.quota_counter = None;
        self
    }

    /// How fresh `last_used_at` is kept (default one minute): a key is written
    /// at most once per interval (with the flushes that run this often).
    pub fn last_used_interval(mut self, interval: Duration) -> Self {
        self.last_used_interval =
            chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
        self
    }

    /// Queues usage reported through [`Engine::record_usage`] into `sink` (a
    /// [`UsageWriter`](crate::usage::UsageWriter)'s) instead of writing each
    /// batch before answering.
    pub fn usage_sink(mut self, sink: UsageSink) -> Self {
        self.usage_sink = Some(sink);
        self
    }

    /// Caches what validation looks up (see [`crate::cache`]): hot keys are
    /// validated without a store round trip, and unknown hashes are
    /// remembered briefly. Every mutation through this engine invalidates it.
    pub fn cache(mut self, options: CacheOptions) -> Self {
        self.cache = Some(options);
        self
    }

    /// Publishes this engine's changes on `feed` and, with a
    /// [cache](Self::cache), applies the changes other nodes publish. The
    /// listener runs on the tokio runtime `build` is called in, reconnecting
    /// by itself; until it is connected, cache entries live at most
    /// `degraded_ttl`.
    pub fn change_feed(mut self, feed: Arc<dyn ChangeFeed>) -> Self {
        self.change_feed = Some(feed);
        self
    }

    /// Adds a hook; hooks run in the order they were added.
    pub fn hook(mut self, hook: Arc<dyn Hook>) -> Self {
        self.hooks.push(hook);
        self
    }

    /// The engine.
    pub fn build(self) -> Engine {
        // The defaults are called directly, without a boxed future each.
        let rate_limiter = match self.rate_limiter {
            Some(limiter) => Rates::Custom(limiter),
            None => Rates::Local,
        };
        let quota_counter = match self.quota_counter {
            Some(counter) => Quotas::Custom(counter),
            None if self.local_quota_counts => Quotas::Local,
            None => Quotas::Store,
        };
        let local = Arc::new(LocalRateLimiter::new(
            EngineClock(self.clock.clone()),
            100_000,
        ));
        let cache = self.cache.map(|o| Arc::new(ValidationCache::new(o)));
        if let Some(cache) = &cache {
            // A dropped entry's limits record goes back to the limiter.
            let limiter = local.clone();
            cache.set_spill(Box::new(move |key, record| limiter.put_back(key, record)));
        }
        let mut follower = None;
        if let (Some(cache), Some(feed)) = (&cache, &self.change_feed) {
            // Not fresh until the feed is connected.
            cache.set_fresh(false);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let task =
                        runtime.spawn(crate::cache::follow(Arc::downgrade(cache), feed.clone()));
                    follower = Some(task.abort_handle());
                }
                Err(_) => tracing::warn!(
                    "engine built outside a tokio runtime: the change feed is not followed, \
                     cache entries live at most degraded_ttl"
                ),
            }
        }
        Engine {
            inner: Arc::new(Inner {
                store: self.store,
                clock: self.clock,
                hooks: self.hooks,
                rate_limiter,
                quota_counter,
                local,
                last_used: LastUsed::default(),
                last_used_interval_us: self
                    .last_used_interval
                    .num_microseconds()
                    .unwrap_or(i64::MAX),
                usage_sink: self.usage_sink,
                cache,
                change_feed: self.change_feed,
                follower,
            }),
        }
    }
}

/// The Keysmith engine. Cheap to clone; share one per process.
///
/// ```
/// # tokio_test_block(async {
/// use std::sync::Arc;
/// use keysmith::{CreateKey, Engine, MemoryStore, RequestContext, Tenant};
///
/// let engine = Engine::builder(Arc::new(MemoryStore::new())).build();
/// let tenant = Tenant::new("my-app", "acme")?;
/// let created = engine
///     .create_key(&tenant, CreateKey { name: "ci".into(), scopes: vec!["read".into()], ..Default::default() })
///     .await?;
/// let ctx = RequestContext { required_scopes: vec!["read:users".into()], ..Default::default() };
/// let valid = engine.validate(created.raw_key.expose_secret(), &ctx).await?;
/// assert_eq!(valid.key.id, created.key.id);
/// # Ok::<(), keysmith::Error>(()) });
/// # fn tokio_test_block<F: std::future::Future<Output = Result<(), keysmith::Error>>>(f: F) {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f).unwrap()
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    hooks: Hooks,
    rate_limiter: Rates,
    quota_counter: Quotas,
    /// In-process rate limits, and quota counts when they are kept here
    /// (each key's record here, or in its validation cache entry).
    local: Arc<LocalRateLimiter<EngineClock>>,
    /// Keys used since the last flush, with when: written behind, one store
    /// write per key per flush, never one per request.
    last_used: LastUsed,
    /// A key whose `last_used_at` is younger than this (in microseconds) is
    /// not noted again.
    last_used_interval_us: i64,
    /// Where reported usage is queued, when it is not written at once.
    usage_sink: Option<UsageSink>,
    /// What validation looked up recently.
    cache: Option<Arc<ValidationCache>>,
    /// Where changes are published for other nodes.
    change_feed: Option<Arc<dyn ChangeFeed>>,
    /// The task applying other nodes' changes to the cache.
    follower: Option<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(follower) = &self.follower {
            follower.abort();
        }
    }
}

/// A validation's outcome: the valid key with its `last_used_at` (Unix
/// microseconds), or the refusal with the key when there is one.
type Outcome = std::result::Result<(Validation, i64), (Error, Option<Arc<ApiKey>>)>;

/// What a validation found in the cache's entry (see `Engine::check_cached`).
enum Cached {
    /// Checked, and limited when the policy limits.
    Done(Outcome),
    /// Refused by a rate limit or quota, its hook still to fire.
    Limited(Validation, Error),
    /// Checked; its limits still to count, the long way.
    Pending(Validation, i64),
}

/// The refusal of a request over its rate limit.
fn rate_limited(state: RateLimitState) -> Error {
    let retry_after = Duration::from_secs(state.retry_after_secs.unwrap_or(1));
    Error::RateLimited { retry_after, state }
}

/// The refusal of a request over a quota (`now_us`: when no window says
/// when it resets).
fn quota_exceeded(decision: &QuotaDecision, now_us: i64) -> Error {
    let resets_at = decision
        .resets_at()
        .unwrap_or_else(|| DateTime::from_timestamp_micros(now_us).unwrap_or_default());
    Error::QuotaExceeded { resets_at }
}

/// A placeholder for the quota windows' buffer.
const UNUSED_WINDOW: QuotaWindow = QuotaWindow {
    period: crate::model::UsagePeriod::Day,
    start: DateTime::UNIX_EPOCH,
    end: DateTime::UNIX_EPOCH,
    limit: 0,
};

/// The engine's rate limiter: the in-process default (the engine's
/// `local`), or one it was given.
#[derive(Debug)]
enum Rates {
    Local,
    Custom(Arc<dyn RateLimiter>),
}

/// The engine's quota counter: the store's counts (the default), counts in
/// process written behind (the engine's `local`), or one it was given.
#[derive(Debug)]
enum Quotas {
    Store,
    Local,
    Custom(Arc<dyn QuotaCounter>),
}

type LastUsed =
    std::sync::Mutex<std::collections::HashMap<KeyId, DateTime<Utc>, foldhash::fast::RandomState>>;

impl Engine {
    /// Starts building an engine over `store`.
    pub fn builder(store: Arc<dyn Store>) -> EngineBuilder {
        EngineBuilder {
            store,
            clock: Arc::new(SystemClock),
            hooks: Hooks::default(),
            rate_limiter: None,
            quota_counter: None,
            local_quota_counts: false,
            last_used_interval: chrono::Duration::seconds(60),
            usage_sink: None,
            cache: None,
            change_feed: None,
        }
    }

    /// The store behind the engine.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The engine's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    fn now(&self) -> DateTime<Utc> {
        store_precision(self.inner.clock.now())
    }

    fn hooks(&self) -> &Hooks {
        &self.inner.hooks
    }

    // ------------------------------------------------------------------ keys

    /// Creates a key and returns its raw secret, once.
    pub async fn create_key(&self, tenant: &Tenant, request: CreateKey) -> Result<CreatedKey> {
        let result = self.create_key_inner(tenant, request).await;
        match &result {
            Ok(created) => run_hooks!(self.hooks(), "key_created", |h| h.key_created(&created.key)),
            Err(error) => {
                let failure = Failure {
                    tenant: Some(tenant),
                    key: None,
                    error,
                };
                run_hooks!(self.hooks(), "key_create_failed", |h| h
                    .key_create_failed(failure));
            }
        }
        result
    }

    async fn create_key_inner(&self, tenant: &Tenant, request: CreateKey) -> Result<CreatedKey> {
        check_tenant(tenant)?;
        policy::check_name("name", &request.name)?;
        policy::check_description(request.description.as_deref())?;
        policy::check_metadata(&request.metadata)?;
        check_created_by(request.created_by.as_deref())?;
        let prefix = request.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        validate_prefix(&prefix)?;
        let environment = request.environment.unwrap_or_default();
        let scopes = normalize_scopes("scopes", request.scopes)?;
        let now = self.now();
        let policy = match &request.policy_id {
            Some(id) => Some(self.inner.store.get_policy(tenant, id).await?),
            None => None,
        };
        if let Some(policy) = &policy {
            policy.check_scopes_allowed(&scopes)?;
        }
        let expires_at = effective_expiry(request.expires_at, now, policy.as_ref(), now)?;
        let raw_key = RawKey::generate(&prefix, &environment)?;
        let key = ApiKey {
            id: KeyId::new(),
            app_id: tenant.app_id.clone(),
            tenant_id: tenant.tenant_id.clone(),
            name: request.name,
            description: request.description,
            prefix,
            hint: raw_key.hint(),
            hash: raw_key.hash(),
            environment,
            state: KeyState::Active,
            policy_id: request.policy_id,
            scopes,
            metadata: request.metadata,
            created_by: request.created_by,
            expires_at,
            last_used_at: None,
            rotated_at: None,
            revoked_at: None,
            created_at: now,
            updated_at: now,
        };
        let created = self.inner.store.create_key(&key).await;
        self.changed(Invalidation::KeyCreated).await;
        created?;
        Ok(CreatedKey { raw_key, key })
    }

    /// One key of the tenant.
    pub async fn get_key(&self, tenant: &Tenant, id: &KeyId) -> Result<ApiKey> {
        self.inner.store.get_key(tenant, id).await
    }

    /// The tenant's keys, newest first. `rotation_due` is judged at the
    /// engine clock's now unless the filter sets `now`.
    pub async fn list_keys(&self, tenant: &Tenant, filter: &KeyFilter) -> Result<Page<ApiKey>> {
        filter.check()?;
        if filter.rotation_due && filter.now.is_none() {
            let filter = KeyFilter {
                now: Some(self.now()),
                ..filter.clone()
            };
            return self.inner.store.list_keys(tenant, &filter).await;
        }
        self.inner.store.list_keys(tenant, filter).await
    }

    /// Changes a key's name, description, metadata, policy or expiry. The
    /// policy's rules apply: its scope cap to the key's scopes, its maximum
    /// lifetime (from the key's creation) to the expiry.
    pub async fn update_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        mut update: KeyUpdate,
    ) -> Result<ApiKey> {
        if let Some(name) = &update.name {
            policy::check_name("name", name)?;
        }
        if let Some(description) = &update.description {
            policy::check_description(description.as_deref())?;
        }
        if let Some(metadata) = &update.metadata {
            policy::check_metadata(metadata)?;
        }
        let now = self.now();
        if update.policy_id.is_some() || update.expires_at.is_some() {
            let key = self.inner.store.get_key(tenant, id).await?;
            let policy_id = update.policy_id.unwrap_or(key.policy_id);
            let policy = match &policy_id {
                Some(pid) => Some(self.inner.store.get_policy(tenant, pid).await?),
                None => None,
            };
            if let Some(policy) = &policy {
                policy.check_scopes_allowed(&key.scopes)?;
            }
            let requested = update.expires_at.unwrap_or(key.expires_at);
            let expiry = effective_expiry(requested, key.created_at, policy.as_ref(), now)?;
            if expiry != key.expires_at {
                update.expires_at = Some(expiry);
            }
        }
        let updated = self.inner.store.update_key(tenant, id, &update, now).await;
        self.changed(Invalidation::Key(*id)).await;
        updated
    }

    /// Deletes a key and its history.
    pub async fn delete_key(&self, tenant: &Tenant, id: &KeyId) -> Result<()> {
        let deleted = self.inner.store.delete_key(tenant, id).await;
        self.changed(Invalidation::Key(*id)).await;
        deleted
    }

    /// Issues a new secret for the key. The old secret keeps validating until
    /// the grace period ends.
    pub async fn rotate_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        request: RotateKey,
    ) -> Result<RotatedKey> {
        check_created_by(request.rotated_by.as_deref())?;
        let key = self.inner.store.get_key(tenant, id).await?;
        let policy_grace = match &key.policy_id {
            Some(pid) => {
                self.inner
                    .store
                    .get_policy(tenant, pid)
                    .await?
                    .spec
                    .grace_period
            }
            None => None,
        };
        let grace_period = match (request.grace_period, request.reason) {
            (Some(grace), _) => grace,
            (None, RotationReason::Compromise) => Duration::ZERO,
            (None, _) => policy_grace.unwrap_or(DEFAULT_GRACE_PERIOD),
        };
        if grace_period > duration::MAX {
            return Err(Error::invalid_input(
                "grace_period",
                "must be at most 100 years",
            ));
        }
        let raw_key = RawKey::generate(&key.prefix, &key.environment)?;
        let rotation = NewRotation {
            id: RotationId::new(),
            new_hash: raw_key.hash(),
            new_hint: raw_key.hint(),
            reason: request.reason,
            grace_period,
            rotated_by: request.rotated_by,
        };
        let now = self.now();
        let rotated = self
            .inner
            .store
            .rotate_key(tenant, id, &rotation, now)
            .await;
        self.changed(Invalidation::Key(*id)).await;
        let (key, rotation) = rotated?;
        run_hooks!(self.hooks(), "key_rotated", |h| h
            .key_rotated(&key, &rotation));
        Ok(RotatedKey {
            raw_key,
            key,
            rotation,
        })
    }

    /// Revokes a key for good: its current secret and any secret still in a
    /// rotation grace period stop working at once.
    pub async fn revoke_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        reason: Option<&str>,
    ) -> Result<ApiKey> {
        if reason.is_some_and(|r| r.len() > 1024) {
            return Err(Error::invalid_input(
                "reason",
                "must be at most 1024 characters",
            ));
        }
        let key = self.transition(tenant, id, KeyAction::Revoke).await?;
        run_hooks!(self.hooks(), "key_revoked", |h| h.key_revoked(&key, reason));
        Ok(key)
    }

    /// Suspends an active key.
    pub async fn suspend_key(&self, tenant: &Tenant, id: &KeyId) -> Result<ApiKey> {
        let key = self.transition(tenant, id, KeyAction::Suspend).await?;
        run_hooks!(self.hooks(), "key_suspended", |h| h.key_suspended(&key));
        Ok(key)
    }

    /// Reactivates a suspended key.
    pub async fn reactivate_key(&self, tenant: &Tenant, id: &KeyId) -> Result<ApiKey> {
        let key = self.transition(tenant, id, KeyAction::Reactivate).await?;
        run_hooks!(self.hooks(), "key_reactivated", |h| h.key_reactivated(&key));
        Ok(key)
    }

    async fn transition(&self, tenant: &Tenant, id: &KeyId, action: KeyAction) -> Result<ApiKey> {
        let moved = self
            .inner
            .store
            .transition_key(tenant, id, action, self.now())
            .await;
        self.changed(Invalidation::Key(*id)).await;
        moved
    }

    /// Drops what `change` made stale from this engine's cache and tells the
    /// other nodes. Called after every mutation, whatever its outcome (a
    /// failed commit may still have happened). A publish failure is logged:
    /// the other nodes then see the change within their cache TTL.
    async fn changed(&self, change: Invalidation) {
        if let Some(cache) = &self.inner.cache {
            cache.invalidate(change);
        }
        if let Some(feed) = &self.inner.change_feed {
            if let Err(error) = feed.publish(change).await {
                metrics::counter!("keysmith_cache_publish_failures_total").increment(1);
                tracing::warn!(%error, ?change, "could not publish a change to other nodes");
            }
        }
    }

    /// What validation finds for `hash` (checked: see [`Found::checked`])
    /// when the cache holds no found entry for it (validation read that
    /// side first): nothing when the cache remembers it as unknown, else
    /// from the store (and then cached). `now` in Unix microseconds.
    async fn lookup(&self, hash: &SecretHash, now: i64) -> Result<Option<Found>> {
        let cache = self.inner.cache.as_deref();
        if cache.is_some_and(|c| c.known_unknown(hash, now)) {
            return Ok(None);
        }
        let generation = cache.map(ValidationCache::generation);
        let found = self.inner.store.lookup(hash).await?;
        let found = found.and_then(|f| Found::checked(f, hash));
        if let (Some(cache), Some(generation)) = (cache, generation) {
            cache.insert(*hash, found.clone(), now, generation);
        }
        Ok(found)
    }

    /// Entries in the validation cache: (found keys, unknown hashes); zeros
    /// without a cache.
    pub fn cache_len(&self) -> (usize, usize) {
        self.inner.cache.as_ref().map_or((0, 0), |c| c.len())
    }

    /// The key's rotation records, oldest first.
    pub async fn list_rotations(&self, tenant: &Tenant, key_id: &KeyId) -> Result<Vec<Rotation>> {
        self.inner.store.list_rotations(tenant, key_id).await
    }

    // ------------------------------------------------------------ validation

    /// Validates a raw key against a request (DESIGN §3): format and checksum,
    /// lookup by hash (current or rotated secret), tenant, state, expiry and
    /// grace, then the policy's allowlists and the required scopes.
    ///
    /// A store failure is an `Error::Store`, never a valid result.
    pub async fn validate(&self, raw_key: &str, request: &RequestContext) -> Result<Validation> {
        // 1. Format and checksum: no I/O for anything that is not a key.
        let Some(_) = ParsedKey::parse(raw_key) else {
            return self.refused(Error::InvalidKey, None).await;
        };
        // The clock is read once per validation.
        let now = self.inner.clock.now_micros();
        // 2. Hash, then the cache or the store (current secret, else a
        // rotated one).
        let hash = SecretHash::of(raw_key);
        // A key the cache holds is checked, and its limits counted in
        // process, in one visit of its entry under its shard's read lock.
        let cached =
            self.inner.cache.as_deref().and_then(|cache| {
                cache.read_found(&hash, now, |e| self.check_cached(e, request, now))
            });
        let outcome = match cached {
            Some(Cached::Done(outcome)) => outcome,
            Some(Cached::Limited(valid, refusal)) => {
                self.limits_refused(&valid.key, &refusal).await;
                Err((refusal, Some(valid.key)))
            }
            Some(Cached::Pending(mut valid, last_used)) => {
                match self.enforce_limits(&mut valid, &hash, request, now).await? {
                    None => Ok((valid, last_used)),
                    Some(refusal) => Err((refusal, Some(valid.key))),
                }
            }
            None => {
                let found = self.lookup(&hash, now).await?;
                match self.check(found, request, now) {
                    // 6. Rate limit and 7. quota, for keys that passed
                    // everything else.
                    Ok((mut valid, last_used))
                        if valid.policy.as_ref().is_some_and(|p| p.limits().any()) =>
                    {
                        match self.enforce_limits(&mut valid, &hash, request, now).await? {
                            None => Ok((valid, last_used)),
                            Some(refusal) => Err((refusal, Some(valid.key))),
                        }
                    }
                    other => other,
                }
            }
        };
        match outcome {
            Ok((valid, last_used)) => {
                self.note_use(&valid.key, last_used, &hash, now);
                run_hooks!(self.hooks(), "key_validated", |h| h
                    .key_validated(&valid.key));
                Ok(valid)
            }
            Err((error, key)) => self.refused(error, key).await,
        }
    }

    /// A refused validation: the hooks hear of it, the caller gets `error`.
    async fn refused(&self, error: Error, key: Option<Arc<ApiKey>>) -> Result<Validation> {
        // Rate limits and quotas fired their own hooks.
        let limited = matches!(
            error,
            Error::RateLimited { .. } | Error::QuotaExceeded { .. }
        );
        if !self.hooks().is_empty() && !limited {
            let failure = Failure {
                tenant: None,
                key: key.as_deref(),
                error: &error,
            };
            run_hooks!(self.hooks(), "validation_failed", |h| h
                .validation_failed(failure));
        }
        Err(error)
    }

    /// Steps 3 to 5 of validation, on what the lookup found (the stored hash
    /// already compared in constant time), with the key's `last_used_at`
    /// (Unix microseconds) for the write-behind. A denial carries the key,
    /// when there is one, for the hooks.
    fn check(&self, found: Option<Found>, request: &RequestContext, now: i64) -> Outcome {
        let Some(found) = found else {
            return Err((Error::InvalidKey, None));
        };
        let grace_ends = found.grace_ends();
        let key = found.key;
        let deny = |error: Error| (error, Some(key.clone()));
        // 3. A key of another tenant than expected does not exist for the caller.
        if let Some(expected) = &request.expected_tenant {
            if !key.belongs_to(expected) {
                return Err((Error::InvalidKey, None));
            }
        }
        // 4. State, expiry, grace: from the fields kept inline.
        match found.state {
            KeyState::Active => {}
            KeyState::Revoked => return Err(deny(Error::KeyRevoked)),
            KeyState::Suspended => return Err(deny(Error::KeySuspended)),
            KeyState::Expired => return Err(deny(Error::KeyExpired)),
        }
        if found.expires_us <= now {
            return Err(deny(Error::KeyExpired));
        }
        if found.grace_us <= now {
            return Err(deny(Error::KeyRotated));
        }
        // 5. Policy: ip, origin, method, path, then required scopes.
        match &found.policy {
            Some(policy) => policy.evaluate(request, &key.scopes).map_err(deny)?,
            None => {
                if let Some(missing) = request
                    .required_scopes
                    .iter()
                    .find(|r| !scope::any_grants(&key.scopes, r))
                {
                    return Err(deny(Error::InsufficientScope {
                        missing: missing.clone(),
                    }));
                }
            }
        }
        // 6 and 7 (rate limit, quota) follow in `enforce_limits`.
        let valid = Validation {
            key,
            policy: found.policy,
            grace_ends,
            rate_limit: None,
            quota: QuotaStates::EMPTY,
        };
        Ok((valid, found.last_used_us))
    }

    /// Steps 3 to 5 on a cache entry, then 6 and 7 when they can be done in
    /// process on the record the entry holds; under the entry's shard read
    /// lock, so nothing here waits (hooks fire after).
    fn check_cached(&self, entry: &Entry, request: &RequestContext, now: i64) -> Cached {
        match self.check(Some(entry.found().clone()), request, now) {
            Ok((mut valid, last_used))
                if valid.policy.as_ref().is_some_and(|p| p.limits().any()) =>
            {
                let id = valid.key.id;
                let limiter = &self.inner.local;
                let step = entry.with_record(
                    &id,
                    || limiter.take_record(&id),
                    |record| {
                        record.and_then(|r| self.limits_in_process(&mut valid, r, request, now))
                    },
                );
                match step {
                    Some(None) => Cached::Done(Ok((valid, last_used))),
                    Some(Some(refusal)) => Cached::Limited(valid, refusal),
                    None => Cached::Pending(valid, last_used),
                }
            }
            other => Cached::Done(other),
        }
    }

    /// Steps 6 and 7 wholly in process, on the key's limits `record`: when
    /// the rate limiter and the quota counts the policy needs are both the
    /// engine's own in process, and the record holds the quota windows'
    /// counts. `None`, with nothing counted, otherwise
    /// ([`enforce_limits`](Self::enforce_limits) goes the long way);
    /// `Some(Some(refusal))` when refused (its hook not fired yet).
    fn limits_in_process(
        &self,
        valid: &mut Validation,
        record: &mut local::Record,
        request: &RequestContext,
        now_us: i64,
    ) -> Option<Option<Error>> {
        let Validation {
            policy: Some(policy),
            rate_limit,
            quota,
            ..
        } = valid
        else {
            return Some(None);
        };
        let limits = policy.limits();
        let in_process = (limits.rate.is_none() || matches!(self.inner.rate_limiter, Rates::Local))
            && (limits.quota.is_none() || matches!(self.inner.quota_counter, Quotas::Local));
        if !in_process {
            return None;
        }
        let mut buf = [UNUSED_WINDOW; 2];
        let windows = limits.quota.map(|q| q.windows_at(now_us, &mut buf));
        if windows.is_some_and(|w| !local::holds(record, w)) {
            return None;
        }
        let cost = request.cost.max(1);
        let local_now = self.inner.local.elapsed(EngineClock::instant(now_us));
        let decision = match &limits.rate {
            Some((_, plan)) => {
                let (state, decision) = local::check_in(record, plan, windows, cost, local_now);
                *rate_limit = Some(state);
                if !state.allowed {
                    return Some(Some(rate_limited(state)));
                }
                decision
            }
            None => windows.and_then(|w| local::count_now_in(record, w, cost, local_now)),
        };
        if let Some(decision) = decision {
            if !decision.allowed {
                return Some(Some(quota_exceeded(&decision, now_us)));
            }
            *quota = decision.windows;
        }
        Some(None)
    }

    /// The hooks of a refusal by a rate limit or quota.
    async fn limits_refused(&self, key: &ApiKey, refusal: &Error) {
        match refusal {
            Error::RateLimited { .. } => {
                run_hooks!(self.hooks(), "rate_limited", |h| h.rate_limited(key));
            }
            Error::QuotaExceeded { .. } => {
                run_hooks!(self.hooks(), "quota_exceeded", |h| h.quota_exceeded(key));
            }
            _ => {}
        }
    }

    /// Steps 6 (rate limit) and 7 (quota) on an accepted validation: its
    /// limits' states are filled in, or the refusal returned (its hook
    /// fired). A refused request consumes no quota; a limiter or counter
    /// failure is an error, never a pass.
    async fn enforce_limits(
        &self,
        valid: &mut Validation,
        hash: &SecretHash,
        request: &RequestContext,
        now_us: i64,
    ) -> Result<Option<Error>> {
        let local_now = self.inner.local.elapsed(EngineClock::instant(now_us));
        let id = valid.key.id;
        // Wholly in process, in one step on the key's record, when it can be.
        let in_process = self.on_limits_record(hash, &id, local_now, |record| {
            self.limits_in_process(valid, record, request, now_us)
        });
        let refusal = match in_process {
            Some(done) => done,
            None => {
                self.limits_the_long_way(valid, hash, request, now_us, local_now)
                    .await?
            }
        };
        if let Some(refusal) = &refusal {
            self.limits_refused(&valid.key, refusal).await;
        }
        Ok(refusal)
    }

    /// Steps 6 and 7 when [`limits_in_process`](Self::limits_in_process)
    /// cannot do them: the rate limit through the configured limiter (or in
    /// process), then the quotas through the store, the configured counter,
    /// or in process after loading the windows' counts.
    async fn limits_the_long_way(
        &self,
        valid: &mut Validation,
        hash: &SecretHash,
        request: &RequestContext,
        now_us: i64,
        local_now: u64,
    ) -> Result<Option<Error>> {
        // Disjoint borrows: the policy is read while the states are written.
        let Validation {
            key,
            policy: Some(policy),
            rate_limit,
            quota,
            ..
        } = valid
        else {
            return Ok(None);
        };
        let limits = policy.limits();
        let now = || DateTime::from_timestamp_micros(now_us).unwrap_or_default();
        let cost = request.cost.max(1);
        if let Some((spec, plan)) = &limits.rate {
            let state = match &self.inner.rate_limiter {
                Rates::Local => self.on_limits_record(hash, &key.id, local_now, |r| {
                    local::check_in(r, plan, None, cost, local_now).0
                }),
                Rates::Custom(limiter) => limiter.check(&key.id, spec, cost).await?,
            };
            *rate_limit = Some(state);
            if !state.allowed {
                return Ok(Some(rate_limited(state)));
            }
        }
        let mut buf = [UNUSED_WINDOW; 2];
        if let (Some(spec), Some(windows)) = (
            &limits.quota,
            limits.quota.map(|q| q.windows_at(now_us, &mut buf)),
        ) {
            let id = &key.id;
            let decision = match &self.inner.quota_counter {
                Quotas::Store => self.inner.store.consume_quota(id, windows, cost).await?,
                Quotas::Local => {
                    self.count_locally(hash, id, windows, cost, local_now)
                        .await?
                }
                Quotas::Custom(counter) => counter.consume(id, spec, cost, now()).await?,
            };
            if !decision.allowed {
                return Ok(Some(quota_exceeded(&decision, now_us)));
            }
            *quota = decision.windows;
        }
        // 8. Accepted. `last_used_at` is written behind by the usage pipeline.
        Ok(None)
    }

    /// Counts in process ([`EngineBuilder::local_quota_counts`]), loading the
    /// windows' counts from the store first when this process does not hold
    /// them.
    async fn count_locally(
        &self,
        hash: &SecretHash,
        id: &KeyId,
        windows: &[QuotaWindow],
        cost: u64,
        now: u64,
    ) -> Result<QuotaDecision> {
        let local = &self.inner.local;
        for _ in 0..3 {
            let counted = self.on_limits_record(hash, id, now, |record| {
                local::count_now_in(record, windows, cost, now)
            });
            if let Some(decision) = counted {
                return Ok(decision);
            }
            // Reads the counts (a zero cost counts nothing).
            let stored = self.inner.store.consume_quota(id, windows, 0).await?;
            let used: Vec<u64> = stored.windows.iter().map(|w| w.used).collect();
            self.on_limits_record(hash, id, now, |record| {
                local.seed_in(id, record, windows, &used)
            });
        }
        // Evicted between loading and counting three times over (a map far
        // too small for the traffic): count in the store itself, exactly.
        self.inner.store.consume_quota(id, windows, cost).await
    }

    /// Runs `f` on the key's in-process limits record: the one its
    /// validation cache entry holds (moved there at first use; see
    /// `ValidationCache::with_limits` for which entries do), else the
    /// limiter's.
    fn on_limits_record<R>(
        &self,
        hash: &SecretHash,
        id: &KeyId,
        now: u64,
        f: impl FnOnce(&mut local::Record) -> R,
    ) -> R {
        let limiter = &self.inner.local;
        match self.inner.cache.as_deref() {
            Some(cache) => cache.with_limits(
                hash,
                id,
                || limiter.take_record(id),
                |held| match held {
                    Some(record) => f(record),
                    None => limiter.with_record(id, now, f),
                },
            ),
            None => limiter.with_record(id, now, f),
        }
    }

    /// Writes the quota units counted in process since the last flush to the
    /// store ([`EngineBuilder::local_quota_counts`]); run it on a short
    /// interval (the server does, every second): what a crash loses is what
    /// was counted since. Returns how many windows were written. Units that
    /// could not be written are kept for the next flush.
    pub async fn flush_quota_counts(&self) -> Result<usize> {
        let mut units = self.inner.local.take_unflushed();
        if let Some(cache) = &self.inner.cache {
            cache.for_each_held(|key, record| {
                LocalRateLimiter::<EngineClock>::take_units_of(key, record, &mut units)
            });
        }
        if units.is_empty() {
            return Ok(0);
        }
        // One write per key and window.
        units.sort_by_key(|u| (u.0, u.1, u.2));
        units.dedup_by(|later, first| {
            let same = (later.0, later.1, later.2) == (first.0, first.1, first.2);
            if same {
                first.3 += later.3;
            }
            same
        });
        let total = units.len();
        while let Some(&(key, period, start, n)) = units.last() {
            let window = QuotaWindow {
                period,
                start,
                end: start,
                limit: u64::MAX,
            };
            if let Err(error) = self.inner.store.consume_quota(&key, &[window], n).await {
                self.inner.local.restore_unflushed(units);
                return Err(error);
            }
            units.pop();
        }
        Ok(total)
    }

    // -------------------------------------------------------------- policies

    /// Creates a policy; bad allowlist entries are refused naming the field.
    pub async fn create_policy(&self, tenant: &Tenant, spec: PolicySpec) -> Result<Policy> {
        check_tenant(tenant)?;
        let now = self.now();
        let policy = Policy::new(PolicyId::new(), tenant, spec, now, now)?;
        self.inner.store.create_policy(&policy).await?;
        run_hooks!(self.hooks(), "policy_created", |h| h
            .policy_created(&policy));
        Ok(policy)
    }

    /// One policy of the tenant.
    pub async fn get_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<Policy> {
        self.inner.store.get_policy(tenant, id).await
    }

    /// The tenant's policies, newest first.
    pub async fn list_policies(&self, tenant: &Tenant, page: &PageRequest) -> Result<Page<Policy>> {
        page.check()?;
        self.inner.store.list_policies(tenant, page).await
    }

    /// Replaces a policy's rules. Keys under it are held to the new rules from
    /// their next validation.
    pub async fn update_policy(
        &self,
        tenant: &Tenant,
        id: &PolicyId,
        spec: PolicySpec,
    ) -> Result<Policy> {
        let existing = self.inner.store.get_policy(tenant, id).await?;
        let policy = Policy::new(*id, tenant, spec, existing.created_at, self.now())?;
        let updated = self.inner.store.update_policy(&policy).await;
        self.changed(Invalidation::Policy(*id)).await;
        updated?;
        run_hooks!(self.hooks(), "policy_updated", |h| h
            .policy_updated(&policy));
        Ok(policy)
    }

    /// Deletes a policy that no key uses (`PolicyInUse` otherwise).
    pub async fn delete_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<()> {
        let deleted = self.inner.store.delete_policy(tenant, id).await;
        self.changed(Invalidation::Policy(*id)).await;
        deleted?;
        run_hooks!(self.hooks(), "policy_deleted", |h| h
            .policy_deleted(tenant, id));
        Ok(())
    }

    // ---------------------------------------------------------------- scopes

    /// Creates a scope.
    pub async fn create_scope(&self, tenant: &Tenant, request: CreateScope) -> Result<Scope> {
        check_tenant(tenant)?;
        validate_scope_name("name", &request.name)?;
        policy::check_description(request.description.as_deref())?;
        let parent = match request.parent {
            Some(parent) => {
                validate_scope_name("parent", &parent)?;
                if !request
                    .name
                    .strip_prefix(parent.as_str())
                    .is_some_and(|r| r.starts_with(':'))
                {
                    return Err(Error::invalid_input(
                        "parent",
                        format!("`{parent}` is not an ancestor of `{}`", request.name),
                    ));
                }
                Some(parent)
            }
            None => parent_of(&request.name).map(str::to_owned),
        };
        let scope = Scope {
            id: ScopeId::new(),
            app_id: tenant.app_id.clone(),
            tenant_id: tenant.tenant_id.clone(),
            name: request.name,
            description: request.description,
            parent,
            created_at: self.now(),
        };
        self.inner.store.create_scope(&scope).await?;
        Ok(scope)
    }

    /// The tenant's scopes by name, optionally only the children of `parent`.
    pub async fn list_scopes(
        &self,
        tenant: &Tenant,
        parent: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<Scope>> {
        page.check()?;
        self.inner.store.list_scopes(tenant, parent, page).await
    }

    /// Deletes a scope, taking it off every key.
    pub async fn delete_scope(&self, tenant: &Tenant, id: &ScopeId) -> Result<()> {
        let deleted = self.inner.store.delete_scope(tenant, id).await;
        // Every key that held the scope changed; which ones is not known here.
        self.changed(Invalidation::All).await;
        deleted
    }

    /// Grants scopes to a key, within its policy's cap and the per-key limit.
    pub async fn assign_scopes(
        &self,
        tenant: &Tenant,
        key_id: &KeyId,
        scopes: Vec<String>,
    ) -> Result<ApiKey> {
        let scopes = normalize_scopes("scopes", scopes)?;
        let key = self.inner.store.get_key(tenant, key_id).await?;
        if let Some(pid) = &key.policy_id {
            self.inner
                .store
                .get_policy(tenant, pid)
                .await?
                .check_scopes_allowed(&scopes)?;
        }
        let new = scopes.iter().filter(|s| !key.scopes.contains(s)).count();
        if key.scopes.len() + new > MAX_SCOPES_PER_KEY {
            return Err(Error::invalid_input(
                "scopes",
                "a key holds at most 100 scopes",
            ));
        }
        let assigned = self
            .inner
            .store
            .add_key_scopes(tenant, key_id, &scopes, self.now())
            .await;
        self.changed(Invalidation::Key(*key_id)).await;
        assigned
    }

    /// Takes scopes off a key.
    pub async fn remove_scopes(
        &self,
        tenant: &Tenant,
        key_id: &KeyId,
        scopes: Vec<String>,
    ) -> Result<ApiKey> {
        let scopes = normalize_scopes("scopes", scopes)?;
        let removed = self
            .inner
            .store
            .remove_key_scopes(tenant, key_id, &scopes, self.now())
            .await;
        self.changed(Invalidation::Key(*key_id)).await;
        removed
    }

    // ----------------------------------------------------------------- usage

    /// Records a batch of requests made with the tenant's keys (at most
    /// [`MAX_USAGE_BATCH`]); every record is checked, and a key of another
    /// tenant is `NotFound`. Returns how many were accepted.
    ///
    /// With a [usage sink](EngineBuilder::usage_sink) the batch is queued, all
    /// or nothing (`Error::QueueFull` when there is no room), and written by
    /// the usage writer; otherwise it is written before this returns.
    pub async fn record_usage(&self, tenant: &Tenant, batch: Vec<NewUsage>) -> Result<usize> {
        check_tenant(tenant)?;
        if batch.len() > MAX_USAGE_BATCH {
            return Err(Error::invalid_input(
                "records",
                "at most 1000 records per call",
            ));
        }
        let now = self.now();
        let mut keys = std::collections::HashSet::new();
        let mut records = Vec::with_capacity(batch.len());
        for (i, usage) in batch.into_iter().enumerate() {
            let field = |name: &str| format!("records[{i}].{name}");
            let text_ok = |s: &str, max: usize| {
                !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
            };
            if !text_ok(&usage.endpoint, 1024) {
                return Err(Error::invalid_input(
                    field("endpoint"),
                    "must be 1-1024 characters",
                ));
            }
            if usage.method.is_empty()
                || usage.method.len() > 16
                || !usage.method.bytes().all(|b| b.is_ascii_alphabetic())
            {
                return Err(Error::invalid_input(field("method"), "not an HTTP method"));
            }
            if !(100..=599).contains(&usage.status_code) {
                return Err(Error::invalid_input(
                    field("status_code"),
                    "must be 100-599",
                ));
            }
            let ip = match usage.ip.as_deref() {
                Some(ip) => Some(
                    ip.parse::<std::net::IpAddr>()
                        .map_err(|_| Error::invalid_input(field("ip"), "not an IP address"))?
                        .to_string(),
                ),
                None => None,
            };
            if usage
                .user_agent
                .as_deref()
                .is_some_and(|ua| !text_ok(ua, 512))
            {
                return Err(Error::invalid_input(
                    field("user_agent"),
                    "must be 1-512 characters",
                ));
            }
            if usage.latency_ms > 86_400_000 {
                return Err(Error::invalid_input(
                    field("latency_ms"),
                    "must be at most a day",
                ));
            }
            policy::check_metadata(&usage.metadata)
                .map_err(|_| Error::invalid_input(field("metadata"), "at most 16 KiB, no NUL"))?;
            keys.insert(usage.key_id);
            records.push(UsageRecord {
                id: UsageId::new(),
                key_id: usage.key_id,
                app_id: tenant.app_id.clone(),
                tenant_id: tenant.tenant_id.clone(),
                endpoint: usage.endpoint,
                method: usage.method.to_ascii_uppercase(),
                status_code: usage.status_code,
                ip,
                user_agent: usage.user_agent,
                latency_ms: usage.latency_ms,
                metadata: usage.metadata,
                created_at: usage.created_at.map_or(now, store_precision),
            });
        }
        for key in &keys {
            self.inner.store.get_key(tenant, key).await?;
        }
        let count = records.len();
        match &self.inner.usage_sink {
            Some(sink) => sink
                .record_all(records)
                .map_err(|_| Error::QueueFull("usage"))?,
            None => self.inner.store.insert_usage(&records).await?,
        }
        Ok(count)
    }

    /// The tenant's usage records, newest first, at most
    /// [`MAX_USAGE_OFFSET`] records deep (narrow the range with `after` and
    /// `before` to read older ones).
    pub async fn list_usage(
        &self,
        tenant: &Tenant,
        filter: &UsageFilter,
    ) -> Result<Page<UsageRecord>> {
        filter.page.check()?;
        if filter.page.offset > MAX_USAGE_OFFSET {
            return Err(Error::invalid_input(
                "offset",
                format!(
                    "usage is listed at most {MAX_USAGE_OFFSET} records deep; \
                     narrow the range with after and before"
                ),
            ));
        }
        check_range(filter.after, filter.before)?;
        if let Some(key) = &filter.key_id {
            self.inner.store.get_key(tenant, key).await?;
        }
        self.inner.store.list_usage(tenant, filter).await
    }

    /// A key's usage per UTC day or month, oldest first.
    pub async fn usage_aggregates(
        &self,
        tenant: &Tenant,
        key_id: &KeyId,
        period: UsagePeriod,
        after: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageAggregate>> {
        check_range(after, before)?;
        self.inner.store.get_key(tenant, key_id).await?;
        self.inner
            .store
            .list_usage_aggregates(tenant, key_id, period, after, before)
            .await
    }

    /// Recomputes, from the raw records, every key's aggregate for the UTC day
    /// or month containing `at`: request and error counts (status ≥ 400),
    /// total, p50 and p99 latency (nearest rank). Idempotent: running it again
    /// writes the same rows. Reads the records in pages of 1000, each one
    /// starting after the last record of the one before. Returns how
    /// many aggregate rows were written.
    pub async fn aggregate_usage(&self, period: UsagePeriod, at: DateTime<Utc>) -> Result<usize> {
        struct Acc {
            app_id: String,
            tenant_id: String,
            latencies: Vec<u64>,
            errors: u64,
            total: u64,
        }
        let (start, end) = crate::ratelimit::period_bounds(period, at);
        let mut per_key: std::collections::BTreeMap<KeyId, Acc> = Default::default();
        let mut from = None;
        loop {
            let records = self
                .inner
                .store
                .usage_between(start, end, from, 1000)
                .await?;
            for r in &records {
                let acc = per_key.entry(r.key_id).or_insert_with(|| Acc {
                    app_id: r.app_id.clone(),
                    tenant_id: r.tenant_id.clone(),
                    latencies: Vec::new(),
                    errors: 0,
                    total: 0,
                });
                acc.latencies.push(r.latency_ms);
                acc.errors += u64::from(r.status_code >= 400);
                acc.total = acc.total.saturating_add(r.latency_ms);
            }
            match records.last() {
                Some(last) if records.len() == 1000 => from = Some((last.created_at, last.id)),
                _ => break,
            }
        }
        let rows: Vec<UsageAggregate> = per_key
            .into_iter()
            .map(|(key_id, mut acc)| {
                acc.latencies.sort_unstable();
                UsageAggregate {
                    key_id,
                    app_id: acc.app_id,
                    tenant_id: acc.tenant_id,
                    period,
                    period_start: start,
                    request_count: acc.latencies.len() as u64,
                    error_count: acc.errors,
                    total_latency_ms: acc.total,
                    p50_latency_ms: percentile(&acc.latencies, 50),
                    p99_latency_ms: percentile(&acc.latencies, 99),
                }
            })
            .collect();
        for chunk in rows.chunks(1000) {
            self.inner.store.upsert_usage_aggregates(chunk).await?;
        }
        Ok(rows.len())
    }

    /// Deletes raw usage records older than `retention`, in batches of
    /// `batch` until none is left. Returns how many went.
    pub async fn purge_usage(&self, retention: Duration, batch: u32) -> Result<u64> {
        let retention = chrono::Duration::from_std(retention)
            .map_err(|_| Error::invalid_input("retention", "is too long"))?;
        let cutoff = self.now() - retention;
        let batch = batch.max(1);
        let mut purged = 0;
        loop {
            let n = self.inner.store.purge_usage(cutoff, batch).await?;
            purged += n;
            if n < u64::from(batch) {
                return Ok(purged);
            }
        }
    }

    // --------------------------------------------------------- last used at

    /// Notes a use for the write-behind, unless the key's `last_used_at` is
    /// already within the coalescing interval (so hot keys cost a comparison,
    /// not a map insert). A cached key is given the new time too, so that it
    /// is noted once per interval, not at every validation.
    fn note_use(&self, key: &ApiKey, last_used: i64, hash: &SecretHash, now: i64) {
        let interval = self.inner.last_used_interval_us;
        if now.saturating_sub(last_used) < interval {
            return;
        }
        let Some(at) = DateTime::from_timestamp_micros(now) else {
            return;
        };
        self.inner
            .last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.id, at);
        if let Some(cache) = &self.inner.cache {
            cache.note_used(hash, at);
        }
    }

    /// Writes the `last_used_at` of every key validated since the last flush,
    /// once per key, in one batch. Run it on an interval (the server does, at
    /// every sweep); the interval is how stale `last_used_at` may be. Returns
    /// how many keys were written.
    pub async fn flush_last_used(&self) -> Result<usize> {
        let pending = std::mem::take(
            &mut *self
                .inner
                .last_used
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let uses: Vec<(KeyId, DateTime<Utc>)> = pending
            .into_iter()
            .map(|(k, at)| (k, store_precision(at)))
            .collect();
        for chunk in uses.chunks(1000) {
            self.inner.store.touch_last_used(chunk).await?;
        }
        Ok(uses.len())
    }

    // ---------------------------------------------------------------- sweeps

    /// Marks up to `limit` keys past their expiry as expired, firing the
    /// `key_expired` hook once per key. Returns how many were expired.
    pub async fn expire_keys(&self, limit: u32) -> Result<usize> {
        let expired = self.inner.store.expire_keys(self.now(), limit).await?;
        for key in &expired {
            run_hooks!(self.hooks(), "key_expired", |h| h.key_expired(key));
        }
        Ok(expired.len())
    }

    /// Closes up to `limit` rotation grace periods that have ended. Returns how
    /// many were closed. (Validation never depends on this: an old secret is
    /// refused from the instant its grace ends.)
    pub async fn end_grace_periods(&self, limit: u32) -> Result<usize> {
        Ok(self
            .inner
            .store
            .end_grace_periods(self.now(), limit)
            .await?
            .len())
    }

    /// Claims up to `limit` keys due for rotation now (active, under a policy
    /// whose `rotation_period` has passed since the key's last rotation, else
    /// its creation) and fires the `rotation_due` hook once for each. The
    /// claim is recorded in the store before the hooks run, so each key gets
    /// one notice per period across restarts and nodes (at most once: a
    /// failing hook is logged and not retried, and never stops the other
    /// keys' notices). Suspended keys are not due until reactivated. Returns
    /// how many keys were notified.
    pub async fn notify_rotation_due(&self, limit: u32) -> Result<usize> {
        let due = self
            .inner
            .store
            .claim_rotation_due(self.now(), limit)
            .await?;
        for notice in &due {
            run_hooks!(self.hooks(), "rotation_due", |h| h
                .rotation_due(&notice.key, notice.due_at));
        }
        Ok(due.len())
    }

    /// Writes the quota counts kept in process, then tells the hooks the
    /// engine is stopping.
    pub async fn shutdown(&self) {
        if let Err(error) = self.flush_quota_counts().await {
            tracing::warn!(%error, "quota counts could not be written at shutdown");
        }
        run_hooks!(self.hooks(), "shutdown", |h| h.shutdown());
    }
}

fn check_tenant(tenant: &Tenant) -> Result<()> {
    Tenant::new(tenant.app_id.as_str(), tenant.tenant_id.as_str()).map(|_| ())
}

fn check_created_by(who: Option<&str>) -> Result<()> {
    if who.is_some_and(|w| w.len() > 255 || w.chars().any(char::is_control)) {
        return Err(Error::invalid_input(
            "created_by",
            "must be at most 255 characters without control characters",
        ));
    }
    Ok(())
}

/// The nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[u64], p: u32) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (u64::from(p) * sorted.len() as u64).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn check_range(after: Option<DateTime<Utc>>, before: Option<DateTime<Utc>>) -> Result<()> {
    match (after, before) {
        (Some(a), Some(b)) if a >= b => {
            Err(Error::invalid_input("after", "must be before `before`"))
        }
        _ => Ok(()),
    }
}

/// Checks, sorts and de-duplicates scope names.
fn normalize_scopes(field: &str, mut scopes: Vec<String>) -> Result<Vec<String>> {
    if scopes.len() > MAX_SCOPES_PER_KEY {
        return Err(Error::invalid_input(
            field,
            "a key holds at most 100 scopes",
        ));
    }
    for (i, s) in scopes.iter().enumerate() {
        validate_scope_name(&format!("{field}[{i}]"), s)?;
    }
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

/// The expiry a key gets: the requested one (which must be in the future),
/// capped at `created_at + max_key_lifetime` when the policy sets one.
fn effective_expiry(
    requested: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    policy: Option<&Policy>,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>> {
    let requested = requested.map(store_precision);
    if requested.is_some_and(|at| at <= now) {
        return Err(Error::invalid_input("expires_at", "must be in the future"));
    }
    let cap = policy
        .and_then(|p| p.spec.max_key_lifetime)
        .map(|max| created_at + chrono::Duration::from_std(max).unwrap_or(chrono::Duration::MAX));
    Ok(match (requested, cap) {
        (Some(at), Some(cap)) => Some(at.min(cap)),
        (at, cap) => at.or(cap),
    })
}
