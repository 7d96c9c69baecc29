//! The in-memory store: for tests, examples and embedding without a database.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use foldhash::fast::RandomState;

use super::{KeyUpdate, Lookup, NewRotation, RotatedSecret, Store};
use crate::error::{Error, ResourceKind, Result};
use crate::id::{KeyId, PolicyId, ScopeId, UsageId};
use crate::model::{
    ApiKey, KeyAction, KeyFilter, KeyState, Page, PageRequest, Rotation, RotationDue, Scope,
    Tenant, UsageAggregate, UsageFilter, UsagePeriod, UsageRecord, rotation_due_at,
};
use crate::policy::Policy;
use crate::ratelimit::{QuotaDecision, QuotaWindow};
use crate::scope::parent_of;
use crate::secret::SecretHash;

type Map<K, V> = HashMap<K, V, RandomState>;

/// A [`Store`] in process memory. Every operation takes one lock, so each is
/// atomic; nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    keys: Map<KeyId, Arc<ApiKey>>,
    by_hash: Map<SecretHash, Arc<ApiKey>>,
    /// Rotation records per key, oldest first.
    rotations: Map<KeyId, Vec<Rotation>>,
    /// Old secret hash → the key it belonged to.
    old_hashes: Map<SecretHash, KeyId>,
    policies: Map<PolicyId, Arc<Policy>>,
    scopes: Map<ScopeId, Scope>,
    usage: Vec<UsageRecord>,
    usage_ids: std::collections::HashSet<UsageId, RandomState>,
    aggregates: std::collections::BTreeMap<(KeyId, UsagePeriod, DateTime<Utc>), UsageAggregate>,
    /// Per key: (period, window start, count), the two latest windows of
    /// each period (a request from just before a boundary may arrive late).
    quota_counts: Map<KeyId, Vec<(UsagePeriod, DateTime<Utc>, u64)>>,
    /// When each key was last claimed by the rotation-due sweep (cleared by a
    /// rotation).
    rotation_claims: Map<KeyId, DateTime<Utc>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn page<T>(mut items: Vec<T>, page: &PageRequest) -> Page<T> {
    let total = items.len() as u64;
    let start = usize::try_from(page.offset)
        .unwrap_or(usize::MAX)
        .min(items.len());
    let end = start.saturating_add(page.limit as usize).min(items.len());
    let items = items.drain(start..end).collect();
    Page { items, total }
}

impl State {
    fn key(&self, tenant: &Tenant, id: &KeyId) -> Result<&Arc<ApiKey>> {
        self.keys
            .get(id)
            .filter(|k| k.belongs_to(tenant))
            .ok_or(Error::NotFound(ResourceKind::Key))
    }

    fn put_key(&mut self, key: ApiKey) -> ApiKey {
        let arc = Arc::new(key);
        if let Some(old) = self.keys.insert(arc.id, arc.clone()) {
            if old.hash != arc.hash {
                self.by_hash.remove(&old.hash);
            }
        }
        self.by_hash.insert(arc.hash, arc.clone());
        ApiKey::clone(&arc)
    }

    fn check_policy(&self, tenant: &Tenant, id: Option<&PolicyId>) -> Result<()> {
        match id {
            Some(id) if !self.policies.get(id).is_some_and(|p| p.belongs_to(tenant)) => {
                Err(Error::NotFound(ResourceKind::Policy))
            }
            _ => Ok(()),
        }
    }

    /// Creates the scopes of `names` the tenant lacks.
    fn ensure_scopes(&mut self, tenant: &Tenant, names: &[String], now: DateTime<Utc>) {
        for name in names {
            if !self.scope_name_taken(tenant, name) {
                let scope = Scope {
                    id: ScopeId::new(),
                    app_id: tenant.app_id.clone(),
                    tenant_id: tenant.tenant_id.clone(),
                    name: name.clone(),
                    description: None,
                    parent: parent_of(name).map(str::to_owned),
                    created_at: now,
                };
                self.scopes.insert(scope.id, scope);
            }
        }
    }

    /// The rotation period of the key's policy.
    fn rotation_period(&self, key: &ApiKey) -> Option<std::time::Duration> {
        key.policy_id
            .and_then(|id| self.policies.get(&id))
            .and_then(|p| p.spec.rotation_period)
    }

    /// When `key` became due for rotation in its current period, if it is
    /// due at `now` (under its policy as stored).
    fn rotation_due_at(&self, key: &ApiKey, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        rotation_due_at(key, self.rotation_period(key), now)
    }

    fn scope_name_taken(&self, tenant: &Tenant, name: &str) -> bool {
        self.scopes
            .values()
            .any(|s| s.name == name && s.app_id == tenant.app_id && s.tenant_id == tenant.tenant_id)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn create_key(&self, key: &ApiKey) -> Result<()> {
        let tenant = key.tenant();
        let mut state = self.write();
        if state.keys.contains_key(&key.id) {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Key,
                field: "id",
            });
        }
        if state.by_hash.contains_key(&key.hash) || state.old_hashes.contains_key(&key.hash) {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Key,
                field: "hash",
            });
        }
        state.check_policy(&tenant, key.policy_id.as_ref())?;
        state.ensure_scopes(&tenant, &key.scopes, key.created_at);
        let mut key = key.clone();
        key.scopes.sort();
        key.scopes.dedup();
        state.put_key(key);
        Ok(())
    }

    async fn get_key(&self, tenant: &Tenant, id: &KeyId) -> Result<ApiKey> {
        self.read().key(tenant, id).map(|k| ApiKey::clone(k))
    }

    async fn list_keys(&self, tenant: &Tenant, filter: &KeyFilter) -> Result<Page<ApiKey>> {
        let due_now = filter.rotation_due_now()?;
        let state = self.read();
        let mut keys: Vec<ApiKey> = state
            .keys
            .values()
            .filter(|k| k.belongs_to(tenant))
            .filter(|k| filter.state.is_none_or(|s| k.state == s))
            .filter(|k| {
                filter
                    .environment
                    .as_ref()
                    .is_none_or(|e| k.environment == *e)
            })
            .filter(|k| filter.policy_id.is_none_or(|p| k.policy_id == Some(p)))
            .filter(|k| {
                filter
                    .created_by
                    .as_ref()
                    .is_none_or(|c| k.created_by.as_ref() == Some(c))
            })
            .filter(|k| due_now.is_none_or(|now| state.rotation_due_at(k, now).is_some()))
            .filter(|k| filter.search_matches(k))
            .map(|k| ApiKey::clone(k))
            .collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.id));
        Ok(page(keys, &filter.page))
    }

    async fn update_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        update: &KeyUpdate,
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let mut state = self.write();
        let mut key = ApiKey::clone(state.key(tenant, id)?);
        if let Some(policy_id) = &update.policy_id {
            state.check_policy(tenant, policy_id.as_ref())?;
        }
        update.apply(&mut key, now);
        Ok(state.put_key(key))
    }

    async fn delete_key(&self, tenant: &Tenant, id: &KeyId) -> Result<()> {
        let mut state = self.write();
        let hash = state.key(tenant, id)?.hash;
        state.keys.remove(id);
        state.by_hash.remove(&hash);
        for rotation in state.rotations.remove(id).unwrap_or_default() {
            state.old_hashes.remove(&rotation.old_hash);
        }
        state.rotation_claims.remove(id);
        Ok(())
    }

    async fn transition_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        action: KeyAction,
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let mut state = self.write();
        let mut key = ApiKey::clone(state.key(tenant, id)?);
        action.check(key.state)?;
        if let Some(target) = action.target() {
            key.state = target;
        }
        if action == KeyAction::Revoke {
            key.revoked_at = Some(now);
        }
        key.updated_at = now;
        Ok(state.put_key(key))
    }

    async fn rotate_key(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        rotation: &NewRotation,
        now: DateTime<Utc>,
    ) -> Result<(ApiKey, Rotation)> {
        let mut state = self.write();
        let mut key = ApiKey::clone(state.key(tenant, id)?);
        KeyAction::Rotate.check(key.state)?;
        if state.by_hash.contains_key(&rotation.new_hash)
            || state.old_hashes.contains_key(&rotation.new_hash)
        {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Key,
                field: "hash",
            });
        }
        let record = rotation.record(tenant, key.id, key.hash, now)?;
        let history = state.rotations.entry(key.id).or_default();
        for earlier in history.iter_mut() {
            if earlier.grace_ends > record.grace_ends {
                earlier.grace_ends = record.grace_ends;
            }
        }
        history.push(record.clone());
        state.old_hashes.insert(record.old_hash, key.id);
        key.hash = rotation.new_hash;
        key.hint = rotation.new_hint.clone();
        key.rotated_at = Some(now);
        key.updated_at = now;
        state.rotation_claims.remove(&key.id);
        Ok((state.put_key(key), record))
    }

    async fn lookup(&self, hash: &SecretHash) -> Result<Option<Lookup>> {
        let state = self.read();
        let (key, rotated) = match state.by_hash.get(hash) {
            Some(key) => (key.clone(), None),
            None => {
                let Some(key_id) = state.old_hashes.get(hash) else {
                    return Ok(None);
                };
                let key = state.keys[key_id].clone();
                let rotated = state.rotations[key_id]
                    .iter()
                    .find(|r| r.old_hash == *hash)
                    .map(RotatedSecret::from);
                (key, rotated)
            }
        };
        let policy = key
            .policy_id
            .and_then(|id| state.policies.get(&id).cloned());
        Ok(Some(Lookup {
            key,
            policy,
            rotated,
        }))
    }

    async fn expire_keys(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<ApiKey>> {
        let mut state = self.write();
        let mut due: Vec<Arc<ApiKey>> = state
            .keys
            .values()
            .filter(|k| k.state == KeyState::Active && k.expires_at.is_some_and(|e| e <= now))
            .cloned()
            .collect();
        due.sort_by_key(|k| (k.expires_at, k.id));
        due.truncate(limit as usize);
        Ok(due
            .into_iter()
            .map(|k| {
                let mut key = ApiKey::clone(&k);
                key.state = KeyState::Expired;
                key.updated_at = now;
                state.put_key(key)
            })
            .collect())
    }

    async fn end_grace_periods(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Rotation>> {
        let mut state = self.write();
        let mut ended = Vec::new();
        for history in state.rotations.values_mut() {
            for rotation in history.iter_mut() {
                if ended.len() < limit as usize
                    && !rotation.grace_ended
                    && rotation.grace_ends <= now
                {
                    rotation.grace_ended = true;
                    ended.push(rotation.clone());
                }
            }
        }
        Ok(ended)
    }

    async fn claim_rotation_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<RotationDue>> {
        let mut state = self.write();
        let mut due: Vec<(DateTime<Utc>, RotationDue)> = state
            .keys
            .values()
            .filter_map(|k| {
                let due_at = state.rotation_due_at(k, now)?;
                let claimed = state.rotation_claims.get(&k.id);
                if claimed.is_some_and(|at| *at >= due_at) {
                    return None;
                }
                // Earliest first: by when the key first became due.
                let period = chrono::Duration::from_std(state.rotation_period(k)?).ok()?;
                let first_due = k.rotated_at.unwrap_or(k.created_at) + period;
                let key = ApiKey::clone(k);
                Some((first_due, RotationDue { key, due_at }))
            })
            .collect();
        due.sort_by_key(|(first, d)| (*first, d.key.id));
        due.truncate(limit as usize);
        Ok(due
            .into_iter()
            .map(|(_, d)| {
                state.rotation_claims.insert(d.key.id, now);
                d
            })
            .collect())
    }

    async fn add_key_scopes(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let mut state = self.write();
        let mut key = ApiKey::clone(state.key(tenant, id)?);
        state.ensure_scopes(tenant, scopes, now);
        key.scopes.extend(scopes.iter().cloned());
        key.scopes.sort();
        key.scopes.dedup();
        key.updated_at = now;
        Ok(state.put_key(key))
    }

    async fn remove_key_scopes(
        &self,
        tenant: &Tenant,
        id: &KeyId,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> Result<ApiKey> {
        let mut state = self.write();
        let mut key = ApiKey::clone(state.key(tenant, id)?);
        key.scopes.retain(|s| !scopes.contains(s));
        key.updated_at = now;
        Ok(state.put_key(key))
    }

    async fn create_policy(&self, policy: &Policy) -> Result<()> {
        let mut state = self.write();
        if state.policies.contains_key(&policy.id) {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Policy,
                field: "id",
            });
        }
        let clash = state.policies.values().any(|p| {
            p.app_id == policy.app_id
                && p.tenant_id == policy.tenant_id
                && p.spec.name == policy.spec.name
        });
        if clash {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Policy,
                field: "name",
            });
        }
        state.policies.insert(policy.id, Arc::new(policy.clone()));
        Ok(())
    }

    async fn get_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<Policy> {
        self.read()
            .policies
            .get(id)
            .filter(|p| p.belongs_to(tenant))
            .map(|p| Policy::clone(p))
            .ok_or(Error::NotFound(ResourceKind::Policy))
    }

    async fn list_policies(&self, tenant: &Tenant, page_req: &PageRequest) -> Result<Page<Policy>> {
        let state = self.read();
        let mut policies: Vec<Policy> = state
            .policies
            .values()
            .filter(|p| p.belongs_to(tenant))
            .map(|p| Policy::clone(p))
            .collect();
        policies.sort_by_key(|p| std::cmp::Reverse(p.id));
        Ok(page(policies, page_req))
    }

    async fn update_policy(&self, policy: &Policy) -> Result<()> {
        let tenant = Tenant {
            app_id: policy.app_id.clone(),
            tenant_id: policy.tenant_id.clone(),
        };
        let mut state = self.write();
        if !state
            .policies
            .get(&policy.id)
            .is_some_and(|p| p.belongs_to(&tenant))
        {
            return Err(Error::NotFound(ResourceKind::Policy));
        }
        let clash = state
            .policies
            .values()
            .any(|p| p.id != policy.id && p.belongs_to(&tenant) && p.spec.name == policy.spec.name);
        if clash {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Policy,
                field: "name",
            });
        }
        state.policies.insert(policy.id, Arc::new(policy.clone()));
        // Keys hold no copy of the policy; lookups read the new one at once.
        Ok(())
    }

    async fn delete_policy(&self, tenant: &Tenant, id: &PolicyId) -> Result<()> {
        let mut state = self.write();
        if !state.policies.get(id).is_some_and(|p| p.belongs_to(tenant)) {
            return Err(Error::NotFound(ResourceKind::Policy));
        }
        let users = state
            .keys
            .values()
            .filter(|k| k.policy_id == Some(*id))
            .count() as u64;
        if users > 0 {
            return Err(Error::PolicyInUse { keys: users });
        }
        state.policies.remove(id);
        Ok(())
    }

    async fn create_scope(&self, scope: &Scope) -> Result<()> {
        let tenant = Tenant {
            app_id: scope.app_id.clone(),
            tenant_id: scope.tenant_id.clone(),
        };
        let mut state = self.write();
        if state.scopes.contains_key(&scope.id) {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Scope,
                field: "id",
            });
        }
        if state.scope_name_taken(&tenant, &scope.name) {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Scope,
                field: "name",
            });
        }
        state.scopes.insert(scope.id, scope.clone());
        Ok(())
    }

    async fn list_scopes(
        &self,
        tenant: &Tenant,
        parent: Option<&str>,
        page_req: &PageRequest,
    ) -> Result<Page<Scope>> {
        let state = self.read();
        let mut scopes: Vec<Scope> = state
            .scopes
            .values()
            .filter(|s| s.app_id == tenant.app_id && s.tenant_id == tenant.tenant_id)
            .filter(|s| parent.is_none_or(|p| s.parent.as_deref() == Some(p)))
            .cloned()
            .collect();
        scopes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(page(scopes, page_req))
    }

    async fn delete_scope(&self, tenant: &Tenant, id: &ScopeId) -> Result<()> {
        let mut state = self.write();
        let scope = state
            .scopes
            .get(id)
            .filter(|s| s.app_id == tenant.app_id && s.tenant_id == tenant.tenant_id)
            .ok_or(Error::NotFound(ResourceKind::Scope))?
            .clone();
        state.scopes.remove(id);
        let holders: Vec<ApiKey> = state
            .keys
            .values()
            .filter(|k| k.belongs_to(tenant) && k.scopes.contains(&scope.name))
            .map(|k| ApiKey::clone(k))
            .collect();
        for mut key in holders {
            key.scopes.retain(|s| *s != scope.name);
            state.put_key(key);
        }
        Ok(())
    }

    async fn list_rotations(&self, tenant: &Tenant, key_id: &KeyId) -> Result<Vec<Rotation>> {
        let state = self.read();
        state.key(tenant, key_id)?;
        Ok(state.rotations.get(key_id).cloned().unwrap_or_default())
    }

    async fn insert_usage(&self, records: &[UsageRecord]) -> Result<()> {
        // The bound of the SQL stores' BIGINT, so that every store takes the
        // same records.
        if records.iter().any(|r| i64::try_from(r.latency_ms).is_err()) {
            return Err(Error::invalid_input("latency_ms", "is too large"));
        }
        let mut state = self.write();
        let mut ids = std::collections::HashSet::new();
        if records
            .iter()
            .any(|r| state.usage_ids.contains(&r.id) || !ids.insert(r.id))
        {
            return Err(Error::AlreadyExists {
                kind: ResourceKind::Usage,
                field: "id",
            });
        }
        state.usage_ids.extend(ids);
        state.usage.extend(records.iter().cloned());
        Ok(())
    }

    async fn list_usage(&self, tenant: &Tenant, filter: &UsageFilter) -> Result<Page<UsageRecord>> {
        let state = self.read();
        let mut records: Vec<UsageRecord> = state
            .usage
            .iter()
            .filter(|r| r.app_id == tenant.app_id && r.tenant_id == tenant.tenant_id)
            .filter(|r| filter.key_id.is_none_or(|k| r.key_id == k))
            .filter(|r| filter.after.is_none_or(|a| r.created_at >= a))
            .filter(|r| filter.before.is_none_or(|b| r.created_at < b))
            .cloned()
            .collect();
        records.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
        Ok(page(records, &filter.page))
    }

    async fn upsert_usage_aggregates(&self, rows: &[UsageAggregate]) -> Result<()> {
        let mut state = self.write();
        for row in rows {
            state
                .aggregates
                .insert((row.key_id, row.period, row.period_start), row.clone());
        }
        Ok(())
    }

    async fn list_usage_aggregates(
        &self,
        tenant: &Tenant,
        key_id: &KeyId,
        period: UsagePeriod,
        after: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageAggregate>> {
        let state = self.read();
        Ok(state
            .aggregates
            .values()
            .filter(|a| a.key_id == *key_id && a.period == period)
            .filter(|a| a.app_id == tenant.app_id && a.tenant_id == tenant.tenant_id)
            .filter(|a| after.is_none_or(|t| a.period_start >= t))
            .filter(|a| before.is_none_or(|t| a.period_start < t))
            .cloned()
            .collect())
    }

    async fn consume_quota(
        &self,
        key_id: &KeyId,
        windows: &[QuotaWindow],
        cost: u64,
    ) -> Result<QuotaDecision> {
        let mut state = self.write();
        let slots = state.quota_counts.entry(*key_id).or_default();
        let find = |slots: &[(UsagePeriod, DateTime<Utc>, u64)], w: &QuotaWindow| {
            slots.iter().position(|s| s.0 == w.period && s.1 == w.start)
        };
        // Policies set at most a daily and a monthly quota: no allocation.
        let mut small = [0u64; 4];
        let mut large = Vec::new();
        let counts: &mut [u64] = if windows.len() <= small.len() {
            &mut small[..windows.len()]
        } else {
            large.resize(windows.len(), 0);
            &mut large
        };
        for (w, count) in windows.iter().zip(counts.iter_mut()) {
            *count = find(slots, w).map_or(0, |i| slots[i].2);
        }
        let fits = crate::ratelimit::fits_all(windows, counts, cost);
        if fits && cost > 0 {
            for (w, count) in windows.iter().zip(counts.iter_mut()) {
                *count += cost;
                match find(slots, w) {
                    Some(i) => slots[i].2 = *count,
                    None => {
                        slots.push((w.period, w.start, *count));
                        // Keep the two latest windows of the period.
                        while slots.iter().filter(|s| s.0 == w.period).count() > 2 {
                            let oldest = slots
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.0 == w.period)
                                .min_by_key(|(_, s)| s.1)
                                .map(|(i, _)| i)
                                .expect("a slot of the period");
                            slots.swap_remove(oldest);
                        }
                    }
                }
            }
        }
        Ok(QuotaDecision::from_counts(windows, counts, fits))
    }

    async fn usage_between(
        &self,
        after: DateTime<Utc>,
        before: DateTime<Utc>,
        from: Option<(DateTime<Utc>, UsageId)>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>> {
        let state = self.read();
        let mut records: Vec<UsageRecord> = state
            .usage
            .iter()
            .filter(|r| r.created_at >= after && r.created_at < before)
            .filter(|r| from.is_none_or(|from| (r.created_at, r.id) > from))
            .cloned()
            .collect();
        records.sort_by_key(|r| (r.created_at, r.id));
        records.truncate(limit.min(super::MAX_PAGE) as usize);
        Ok(records)
    }

    async fn purge_usage(&self, cutoff: DateTime<Utc>, limit: u32) -> Result<u64> {
        let mut state = self.write();
        let mut old: Vec<(DateTime<Utc>, UsageId)> = state
            .usage
            .iter()
            .filter(|r| r.created_at < cutoff)
            .map(|r| (r.created_at, r.id))
            .collect();
        old.sort();
        old.truncate(limit as usize);
        let doomed: std::collections::HashSet<UsageId> =
            old.into_iter().map(|(_, id)| id).collect();
        state.usage.retain(|r| !doomed.contains(&r.id));
        for id in &doomed {
            state.usage_ids.remove(id);
        }
        Ok(doomed.len() as u64)
    }

    async fn touch_last_used(&self, uses: &[(KeyId, DateTime<Utc>)]) -> Result<()> {
        let mut state = self.write();
        for (id, at) in uses {
            let Some(key) = state.keys.get(id) else {
                continue;
            };
            if key.last_used_at.is_some_and(|last| last >= *at) {
                continue;
            }
            let mut key = ApiKey::clone(key);
            key.last_used_at = Some(*at);
            state.put_key(key);
        }
        Ok(())
    }
}
