//! The conformance suite: what every [`Store`] must do, as plain async
//! functions. Each backend's tests run all of them through
//! [`conformance_tests!`](crate::conformance_tests), each on a fresh store:
//!
//! ```text
//! keysmith::conformance_tests!(async {
//!     std::sync::Arc::new(keysmith::MemoryStore::new()) as std::sync::Arc<dyn keysmith::Store>
//! });
//! ```
//!
//! The functions check values and error variants, pagination and ordering,
//! compare-and-set, atomicity under concurrency, and tenant isolation. Engine
//! functions (`engine_*`) check the behaviour built on top, on any store.

#![allow(missing_docs)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::clock::ManualClock;
use crate::engine::{CreateKey, CreateScope, Engine, NewUsage, RotateKey};
use crate::error::{Error, ResourceKind};
use crate::hooks::{AuditHook, Failure, Hook, HookResult, MemoryAuditSink};
use crate::id::{KeyId, PolicyId, RotationId, ScopeId, UsageId};
use crate::model::{
    ApiKey, KeyAction, KeyFilter, KeyState, Metadata, PageRequest, Rotation, RotationReason, Scope,
    Tenant, UsageAggregate, UsageFilter, UsagePeriod, UsageRecord,
};
use crate::policy::{Policy, PolicySpec, RequestContext};
use crate::ratelimit::QuotaSpec;
use crate::secret::{Environment, RawKey};
use crate::store::{KeyUpdate, NewRotation, Store};

/// Runs every conformance function as its own `#[tokio::test]`, each on a
/// fresh store made by `$make` (an async expression giving `Arc<dyn Store>`).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@store $make;
            create_and_get_key, create_key_refuses_clashes, list_keys_filters_pages_and_orders,
            update_key_fields, delete_key_removes_history, transitions_are_compare_and_set,
            rotation_writes_its_record_atomically, lookup_finds_current_and_rotated_secrets,
            expire_keys_once_each, end_grace_periods_once_each, key_scopes_add_and_remove,
            policies_crud, scopes_crud, rotations_listed_oldest_first, tenant_isolation,
            usage_records_insert_and_list, usage_aggregates_upsert_and_list,
            quotas_count_exactly_and_refuse_whole, usage_retention_purges_oldest_first,
            usage_reads_merge_batches_in_time_order,
            rotation_due_filter_at_the_boundary, claim_rotation_due_once_per_period,
            list_keys_search_name_or_hint);
        $crate::conformance_tests!(@shared $make;
            concurrent_rotations_form_a_chain, concurrent_policy_creates_one_wins,
            engine_full_lifecycle, engine_validation_outcomes, engine_policy_rules_at_creation,
            engine_rotation_grace_sources, engine_revocation_kills_grace_secrets,
            engine_hooks_run_in_order_and_never_fail_the_operation, engine_expiry_sweep_fires_once,
            engine_input_is_checked, engine_concurrent_rotations_lose_no_secret,
            engine_usage_is_checked_and_recorded, engine_usage_aggregates_match_brute_force,
            engine_rate_limits_and_quotas, engine_last_used_is_written_behind_and_coalesced,
            engine_quota_is_exact_under_concurrency, engine_rotation_due_fires_once_per_period,
            engine_rotated_secrets_share_one_bucket,
            concurrent_rotation_due_claims_are_disjoint,
            engine_local_quota_counts_are_exact_and_written_behind,
            engine_cached_limits_records_outlive_their_entries);
    };
    (@store $make:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let store: ::std::sync::Arc<dyn $crate::Store> = $make.await;
            $crate::store::conformance::$name(&*store).await;
        }
    )*};
    (@shared $make:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let store: ::std::sync::Arc<dyn $crate::Store> = $make.await;
            $crate::store::conformance::$name(store).await;
        }
    )*};
}

// ------------------------------------------------------------------ helpers

fn t0() -> DateTime<Utc> {
    "2030-01-01T00:00:00Z".parse().expect("valid time")
}

fn at(days: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::days(days)
}

fn tenant() -> Tenant {
    Tenant::new("app", format!("t-{}", uuid::Uuid::now_v7().simple())).expect("valid tenant")
}

fn meta(pairs: &[(&str, serde_json::Value)]) -> Metadata {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn new_key(tenant: &Tenant, name: &str) -> (RawKey, ApiKey) {
    let raw = RawKey::generate("sk", &Environment::Live).expect("generate");
    let key = ApiKey {
        id: KeyId::new(),
        app_id: tenant.app_id.clone(),
        tenant_id: tenant.tenant_id.clone(),
        name: name.to_owned(),
        description: Some("a key".into()),
        prefix: "sk".into(),
        hint: raw.hint(),
        hash: raw.hash(),
        environment: Environment::Live,
        state: KeyState::Active,
        policy_id: None,
        scopes: vec![],
        metadata: meta(&[("team", "core".into()), ("n", 1.into())]),
        created_by: Some("tester".into()),
        expires_at: None,
        last_used_at: None,
        rotated_at: None,
        revoked_at: None,
        created_at: t0(),
        updated_at: t0(),
    };
    (raw, key)
}

async fn stored_key(store: &dyn Store, tenant: &Tenant, name: &str) -> (RawKey, ApiKey) {
    let (raw, key) = new_key(tenant, name);
    store.create_key(&key).await.expect("create key");
    (raw, key)
}

fn policy_spec(name: &str) -> PolicySpec {
    PolicySpec {
        name: name.to_owned(),
        ..Default::default()
    }
}

async fn stored_policy(store: &dyn Store, tenant: &Tenant, spec: PolicySpec) -> Policy {
    let policy = Policy::new(PolicyId::new(), tenant, spec, t0(), t0()).expect("valid policy");
    store.create_policy(&policy).await.expect("create policy");
    policy
}

fn new_rotation(grace: Duration) -> (RawKey, NewRotation) {
    let raw = RawKey::generate("sk", &Environment::Live).expect("generate");
    let rotation = NewRotation {
        id: RotationId::new(),
        new_hash: raw.hash(),
        new_hint: raw.hint(),
        reason: RotationReason::Manual,
        grace_period: grace,
        rotated_by: Some("tester".into()),
    };
    (raw, rotation)
}

fn page(limit: u32, offset: u64) -> PageRequest {
    PageRequest::new(limit, offset).expect("valid page")
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(result: crate::Result<T>, kind: ResourceKind) {
    match result {
        Err(Error::NotFound(k)) if k == kind => {}
        other => panic!("expected NotFound({kind:?}), got {other:?}"),
    }
}

#[track_caller]
fn assert_exists<T: std::fmt::Debug>(result: crate::Result<T>, kind: ResourceKind, field: &str) {
    match result {
        Err(Error::AlreadyExists { kind: k, field: f }) if k == kind && f == field => {}
        other => panic!("expected AlreadyExists({kind:?}, {field}), got {other:?}"),
    }
}

#[track_caller]
fn assert_transition<T: std::fmt::Debug>(
    result: crate::Result<T>,
    from: KeyState,
    action: KeyAction,
) {
    match result {
        Err(Error::InvalidStateTransition { from: f, action: a }) if f == from && a == action => {}
        other => panic!("expected InvalidStateTransition({from} → {action}), got {other:?}"),
    }
}

// ------------------------------------------------------------- store level

pub async fn create_and_get_key(store: &dyn Store) {
    let tenant = tenant();
    let (_, mut key) = new_key(&tenant, "primary");
    key.scopes = vec!["write".into(), "read:users".into(), "read".into()];
    key.expires_at = Some(at(3650));
    store.create_key(&key).await.expect("create");
    let got = store.get_key(&tenant, &key.id).await.expect("get");
    key.scopes.sort();
    assert_eq!(
        got, key,
        "a key reads back exactly as written, scopes sorted"
    );
    // Unknown scope names were created for the tenant, with their parents.
    let scopes = store
        .list_scopes(&tenant, None, &page(100, 0))
        .await
        .unwrap();
    let names: Vec<_> = scopes.items.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["read", "read:users", "write"]);
    let child = scopes
        .items
        .iter()
        .find(|s| s.name == "read:users")
        .unwrap();
    assert_eq!(child.parent.as_deref(), Some("read"));
    // A second key with an existing scope reuses it.
    let (_, mut second) = new_key(&tenant, "second");
    second.scopes = vec!["read".into()];
    store.create_key(&second).await.unwrap();
    assert_eq!(
        store
            .list_scopes(&tenant, None, &page(100, 0))
            .await
            .unwrap()
            .total,
        3
    );
    assert_not_found(
        store.get_key(&tenant, &KeyId::new()).await,
        ResourceKind::Key,
    );
}

pub async fn create_key_refuses_clashes(store: &dyn Store) {
    let tenant = tenant();
    let (_, key) = stored_key(store, &tenant, "k").await;
    let (_, mut same_id) = new_key(&tenant, "k2");
    same_id.id = key.id;
    assert_exists(store.create_key(&same_id).await, ResourceKind::Key, "id");
    let (_, mut same_hash) = new_key(&tenant, "k3");
    same_hash.hash = key.hash;
    assert_exists(
        store.create_key(&same_hash).await,
        ResourceKind::Key,
        "hash",
    );
    // A policy must exist in the key's own tenant.
    let other = tenant_other(&tenant);
    let foreign = stored_policy(store, &other, policy_spec("theirs")).await;
    let (_, mut with_foreign) = new_key(&tenant, "k4");
    with_foreign.policy_id = Some(foreign.id);
    with_foreign.scopes = vec!["never:created".into()];
    assert_not_found(store.create_key(&with_foreign).await, ResourceKind::Policy);
    // Nothing of the failed create was kept.
    assert_not_found(
        store.get_key(&tenant, &with_foreign.id).await,
        ResourceKind::Key,
    );
    let scopes = store
        .list_scopes(&tenant, None, &page(100, 0))
        .await
        .unwrap();
    assert!(
        scopes.items.iter().all(|s| s.name != "never:created"),
        "create is atomic"
    );
}

fn tenant_other(tenant: &Tenant) -> Tenant {
    Tenant::new(tenant.app_id.clone(), format!("{}-other", tenant.tenant_id)).unwrap()
}

pub async fn list_keys_filters_pages_and_orders(store: &dyn Store) {
    let tenant = tenant();
    let policy = stored_policy(store, &tenant, policy_spec("p")).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let (_, mut key) = new_key(&tenant, &format!("key-{i}"));
        if i % 2 == 0 {
            key.environment = Environment::Test;
        }
        if i < 3 {
            key.policy_id = Some(policy.id);
        }
        if i == 6 {
            key.created_by = Some("someone-else".into());
        }
        store.create_key(&key).await.unwrap();
        ids.push(key.id);
    }
    store
        .transition_key(&tenant, &ids[1], KeyAction::Suspend, at(1))
        .await
        .unwrap();
    store
        .transition_key(&tenant, &ids[2], KeyAction::Revoke, at(1))
        .await
        .unwrap();
    // Another tenant's keys never show.
    stored_key(store, &tenant_other(&tenant), "noise").await;

    let all = store
        .list_keys(&tenant, &KeyFilter::default())
        .await
        .unwrap();
    assert_eq!(all.total, 7);
    let newest_first: Vec<KeyId> = ids.iter().rev().copied().collect();
    assert_eq!(
        all.items.iter().map(|k| k.id).collect::<Vec<_>>(),
        newest_first
    );

    let paged = store
        .list_keys(
            &tenant,
            &KeyFilter {
                page: page(3, 2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(paged.total, 7, "total counts every match, not the page");
    assert_eq!(
        paged.items.iter().map(|k| k.id).collect::<Vec<_>>(),
        newest_first[2..5]
    );
    let past_end = store
        .list_keys(
            &tenant,
            &KeyFilter {
                page: page(3, 50),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(past_end.items.is_empty());
    assert_eq!(past_end.total, 7);

    let count = |filter: KeyFilter| {
        let tenant = tenant.clone();
        async move {
            let page = store.list_keys(&tenant, &filter).await.unwrap();
            let mut names: Vec<String> = page.items.into_iter().map(|k| k.name).collect();
            names.sort();
            (page.total, names)
        }
    };
    let (n, names) = count(KeyFilter {
        state: Some(KeyState::Suspended),
        ..Default::default()
    })
    .await;
    assert_eq!((n, names), (1, vec!["key-1".to_owned()]));
    let (n, _) = count(KeyFilter {
        state: Some(KeyState::Active),
        ..Default::default()
    })
    .await;
    assert_eq!(n, 5);
    let (n, names) = count(KeyFilter {
        environment: Some(Environment::Test),
        ..Default::default()
    })
    .await;
    assert_eq!(
        (n, names),
        (
            4,
            vec![
                "key-0".into(),
                "key-2".into(),
                "key-4".into(),
                "key-6".into()
            ]
        )
    );
    let (n, _) = count(KeyFilter {
        policy_id: Some(policy.id),
        ..Default::default()
    })
    .await;
    assert_eq!(n, 3);
    let (n, names) = count(KeyFilter {
        created_by: Some("someone-else".into()),
        ..Default::default()
    })
    .await;
    assert_eq!((n, names), (1, vec!["key-6".to_owned()]));
    let (n, names) = count(KeyFilter {
        state: Some(KeyState::Active),
        environment: Some(Environment::Test),
        policy_id: Some(policy.id),
        ..Default::default()
    })
    .await;
    assert_eq!((n, names), (1, vec!["key-0".to_owned()]));
}

pub async fn update_key_fields(store: &dyn Store) {
    let tenant = tenant();
    let (_, key) = stored_key(store, &tenant, "before").await;
    let policy = stored_policy(store, &tenant, policy_spec("p")).await;
    let update = KeyUpdate {
        name: Some("after".into()),
        description: Some(None),
        metadata: Some(meta(&[("x", serde_json::json!({"nested": [1, 2]}))])),
        policy_id: Some(Some(policy.id)),
        expires_at: Some(Some(at(400))),
    };
    let updated = store
        .update_key(&tenant, &key.id, &update, at(2))
        .await
        .unwrap();
    assert_eq!(updated.name, "after");
    assert_eq!(updated.description, None);
    assert_eq!(
        updated.metadata,
        meta(&[("x", serde_json::json!({"nested": [1, 2]}))])
    );
    assert_eq!(updated.policy_id, Some(policy.id));
    assert_eq!(updated.expires_at, Some(at(400)));
    assert_eq!(updated.updated_at, at(2));
    assert_eq!(updated.created_at, key.created_at);
    assert_eq!(updated.hash, key.hash, "an update never touches the secret");
    assert_eq!(store.get_key(&tenant, &key.id).await.unwrap(), updated);
    // An empty update changes nothing but updated_at.
    let same = store
        .update_key(&tenant, &key.id, &KeyUpdate::default(), at(3))
        .await
        .unwrap();
    assert_eq!(same.name, "after");
    assert_eq!(same.policy_id, Some(policy.id));
    // Clearing nullable fields.
    let cleared = KeyUpdate {
        policy_id: Some(None),
        expires_at: Some(None),
        ..Default::default()
    };
    let cleared = store
        .update_key(&tenant, &key.id, &cleared, at(4))
        .await
        .unwrap();
    assert_eq!((cleared.policy_id, cleared.expires_at), (None, None));
    // A policy that does not exist (or is another tenant's) is refused.
    let missing = KeyUpdate {
        policy_id: Some(Some(PolicyId::new())),
        ..Default::default()
    };
    assert_not_found(
        store.update_key(&tenant, &key.id, &missing, at(5)).await,
        ResourceKind::Policy,
    );
    assert_not_found(
        store
            .update_key(&tenant, &KeyId::new(), &KeyUpdate::default(), at(5))
            .await,
        ResourceKind::Key,
    );
}

pub async fn delete_key_removes_history(store: &dyn Store) {
    let tenant = tenant();
    let (old, mut key) = new_key(&tenant, "doomed");
    key.scopes = vec!["read".into()];
    store.create_key(&key).await.unwrap();
    let (new, rotation) = new_rotation(Duration::from_secs(3600));
    store
        .rotate_key(&tenant, &key.id, &rotation, at(1))
        .await
        .unwrap();
    store.delete_key(&tenant, &key.id).await.unwrap();
    assert_not_found(store.get_key(&tenant, &key.id).await, ResourceKind::Key);
    assert!(store.lookup(&old.hash()).await.unwrap().is_none());
    assert!(store.lookup(&new.hash()).await.unwrap().is_none());
    assert_not_found(
        store.list_rotations(&tenant, &key.id).await,
        ResourceKind::Key,
    );
    assert_not_found(store.delete_key(&tenant, &key.id).await, ResourceKind::Key);
    // The scope itself stays: it belongs to the tenant, not the key.
    assert_eq!(
        store
            .list_scopes(&tenant, None, &page(10, 0))
            .await
            .unwrap()
            .total,
        1
    );
}

pub async fn transitions_are_compare_and_set(store: &dyn Store) {
    use KeyAction::*;
    use KeyState::*;
    let tenant = tenant();
    let (_, key) = stored_key(store, &tenant, "k").await;
    let id = key.id;
    assert_transition(
        store.transition_key(&tenant, &id, Reactivate, at(1)).await,
        Active,
        Reactivate,
    );
    let suspended = store
        .transition_key(&tenant, &id, Suspend, at(1))
        .await
        .unwrap();
    assert_eq!((suspended.state, suspended.updated_at), (Suspended, at(1)));
    assert_transition(
        store.transition_key(&tenant, &id, Suspend, at(2)).await,
        Suspended,
        Suspend,
    );
    assert_transition(
        store.transition_key(&tenant, &id, Expire, at(2)).await,
        Suspended,
        Expire,
    );
    let active = store
        .transition_key(&tenant, &id, Reactivate, at(2))
        .await
        .unwrap();
    assert_eq!(active.state, Active);
    let revoked = store
        .transition_key(&tenant, &id, Revoke, at(3))
        .await
        .unwrap();
    assert_eq!((revoked.state, revoked.revoked_at), (Revoked, Some(at(3))));
    for action in [Suspend, Reactivate, Revoke, Expire] {
        assert_transition(
            store.transition_key(&tenant, &id, action, at(4)).await,
            Revoked,
            action,
        );
    }
    let (_, rotation) = new_rotation(Duration::ZERO);
    assert_transition(
        store.rotate_key(&tenant, &id, &rotation, at(4)).await,
        Revoked,
        Rotate,
    );
    assert_eq!(
        store.get_key(&tenant, &id).await.unwrap().state,
        Revoked,
        "revoked is forever"
    );
    // A suspended key can be revoked; an expired one is terminal too.
    let (_, k2) = stored_key(store, &tenant, "k2").await;
    store
        .transition_key(&tenant, &k2.id, Suspend, at(1))
        .await
        .unwrap();
    assert_eq!(
        store
            .transition_key(&tenant, &k2.id, Revoke, at(1))
            .await
            .unwrap()
            .state,
        Revoked
    );
    let (_, k3) = stored_key(store, &tenant, "k3").await;
    store
        .transition_key(&tenant, &k3.id, Expire, at(1))
        .await
        .unwrap();
    for action in [Suspend, Reactivate, Revoke, Rotate] {
        let result = if action == Rotate {
            let (_, r) = new_rotation(Duration::ZERO);
            store
                .rotate_key(&tenant, &k3.id, &r, at(2))
                .await
                .map(|(k, _)| k)
        } else {
            store.transition_key(&tenant, &k3.id, action, at(2)).await
        };
        assert_transition(result, Expired, action);
    }
    assert_not_found(
        store
            .transition_key(&tenant, &KeyId::new(), Suspend, at(1))
            .await,
        ResourceKind::Key,
    );
}

pub async fn rotation_writes_its_record_atomically(store: &dyn Store) {
    let tenant = tenant();
    let (first, key) = stored_key(store, &tenant, "k").await;
    let (second, r1) = new_rotation(Duration::from_secs(48 * 3600));
    let (rotated, record) = store
        .rotate_key(&tenant, &key.id, &r1, at(1))
        .await
        .unwrap();
    assert_eq!(rotated.id, key.id, "the key id stays");
    assert_eq!(rotated.hash, second.hash());
    assert_eq!(rotated.hint, second.hint());
    assert_eq!(rotated.rotated_at, Some(at(1)));
    assert_eq!(rotated.updated_at, at(1));
    assert_eq!(record.id, r1.id);
    assert_eq!(record.key_id, key.id);
    assert_eq!(
        (record.old_hash, record.new_hash),
        (first.hash(), second.hash())
    );
    assert_eq!(record.grace_ends, at(3));
    assert_eq!(record.grace_period, Duration::from_secs(48 * 3600));
    assert_eq!(record.rotated_by.as_deref(), Some("tester"));
    assert!(!record.grace_ended);
    // A later rotation with a shorter grace brings earlier grace ends forward.
    let (third, mut r2) = new_rotation(Duration::from_secs(3600));
    r2.reason = RotationReason::Compromise;
    let (_, record2) = store
        .rotate_key(&tenant, &key.id, &r2, at(2))
        .await
        .unwrap();
    assert_eq!(
        record2.old_hash,
        second.hash(),
        "each record's old hash is the previous new hash"
    );
    assert_eq!(record2.new_hash, third.hash());
    assert_eq!(record2.reason, RotationReason::Compromise);
    let history = store.list_rotations(&tenant, &key.id).await.unwrap();
    let cut = at(2) + chrono::Duration::hours(1);
    assert_eq!(
        history.iter().map(|r| r.grace_ends).collect::<Vec<_>>(),
        [cut, cut]
    );
    // A longer grace never extends an earlier one.
    let (_, r3) = new_rotation(Duration::from_secs(30 * 86_400));
    store
        .rotate_key(&tenant, &key.id, &r3, at(2))
        .await
        .unwrap();
    let history = store.list_rotations(&tenant, &key.id).await.unwrap();
    assert_eq!(history[0].grace_ends, cut);
    assert_eq!(history[2].grace_ends, at(32));
    // A new hash that clashes with any known secret is refused, changing nothing.
    let (_, mut clash) = new_rotation(Duration::ZERO);
    clash.new_hash = first.hash();
    assert_exists(
        store.rotate_key(&tenant, &key.id, &clash, at(3)).await,
        ResourceKind::Key,
        "hash",
    );
    assert_eq!(
        store.list_rotations(&tenant, &key.id).await.unwrap().len(),
        3
    );
    assert_not_found(
        store.rotate_key(&tenant, &KeyId::new(), &r3, at(3)).await,
        ResourceKind::Key,
    );
}

pub async fn lookup_finds_current_and_rotated_secrets(store: &dyn Store) {
    let tenant = tenant();
    let policy = stored_policy(store, &tenant, policy_spec("p")).await;
    let (old, mut key) = new_key(&tenant, "k");
    key.policy_id = Some(policy.id);
    key.scopes = vec!["read".into()];
    store.create_key(&key).await.unwrap();
    let found = store
        .lookup(&old.hash())
        .await
        .unwrap()
        .expect("current secret found");
    assert_eq!(found.key.id, key.id);
    assert_eq!(found.key.scopes, ["read"]);
    assert_eq!(found.policy.as_ref().map(|p| p.id), Some(policy.id));
    assert!(found.rotated.is_none());
    let (new, rotation) = new_rotation(Duration::from_secs(60));
    store
        .rotate_key(&tenant, &key.id, &rotation, at(1))
        .await
        .unwrap();
    let via_old = store
        .lookup(&old.hash())
        .await
        .unwrap()
        .expect("old secret found");
    assert_eq!(via_old.key.id, key.id);
    assert_eq!(
        via_old.key.hash,
        new.hash(),
        "the key is returned as it is now"
    );
    let record = via_old.rotated.expect("found through its rotation");
    assert_eq!(record.old_hash, old.hash());
    assert_eq!(record.rotation_id, rotation.id);
    assert_eq!(record.grace_ends, at(1) + chrono::Duration::seconds(60));
    assert_eq!(via_old.policy.map(|p| p.id), Some(policy.id));
    let via_new = store.lookup(&new.hash()).await.unwrap().unwrap();
    assert!(via_new.rotated.is_none());
    let unknown = RawKey::generate("sk", &Environment::Live).unwrap();
    assert!(store.lookup(&unknown.hash()).await.unwrap().is_none());
}

pub async fn expire_keys_once_each(store: &dyn Store) {
    let tenant = tenant();
    let mut due = HashSet::new();
    for i in 0..5 {
        let (_, mut key) = new_key(&tenant, &format!("due-{i}"));
        key.expires_at = Some(at(i));
        store.create_key(&key).await.unwrap();
        due.insert(key.id);
    }
    let (_, mut later) = new_key(&tenant, "later");
    later.expires_at = Some(at(100));
    store.create_key(&later).await.unwrap();
    stored_key(store, &tenant, "never").await;
    let (_, mut suspended) = new_key(&tenant, "suspended");
    suspended.expires_at = Some(at(0));
    store.create_key(&suspended).await.unwrap();
    store
        .transition_key(&tenant, &suspended.id, KeyAction::Suspend, at(0))
        .await
        .unwrap();

    let first = store.expire_keys(at(10), 3).await.unwrap();
    assert_eq!(first.len(), 3, "the limit caps a batch");
    let second = store.expire_keys(at(10), 3).await.unwrap();
    assert_eq!(second.len(), 2);
    assert!(
        store.expire_keys(at(10), 3).await.unwrap().is_empty(),
        "each key once"
    );
    let returned: HashSet<KeyId> = first.iter().chain(&second).map(|k| k.id).collect();
    assert_eq!(returned, due);
    for key in first.iter().chain(&second) {
        assert_eq!((key.state, key.updated_at), (KeyState::Expired, at(10)));
        assert_eq!(
            store.get_key(&tenant, &key.id).await.unwrap().state,
            KeyState::Expired
        );
    }
    assert_eq!(
        store.get_key(&tenant, &later.id).await.unwrap().state,
        KeyState::Active
    );
    assert_eq!(
        store.get_key(&tenant, &suspended.id).await.unwrap().state,
        KeyState::Suspended
    );
}

pub async fn end_grace_periods_once_each(store: &dyn Store) {
    let tenant = tenant();
    let (_, key) = stored_key(store, &tenant, "k").await;
    let (_, short) = new_rotation(Duration::from_secs(3600));
    store
        .rotate_key(&tenant, &key.id, &short, at(0))
        .await
        .unwrap();
    let (_, long) = new_rotation(Duration::from_secs(10 * 86_400));
    store
        .rotate_key(&tenant, &key.id, &long, at(0))
        .await
        .unwrap();
    assert!(store.end_grace_periods(t0(), 10).await.unwrap().is_empty());
    let ended = store.end_grace_periods(at(1), 10).await.unwrap();
    assert_eq!(ended.iter().map(|r| r.id).collect::<Vec<_>>(), [short.id]);
    assert!(ended[0].grace_ended);
    assert!(store.end_grace_periods(at(1), 10).await.unwrap().is_empty());
    let ended = store.end_grace_periods(at(11), 10).await.unwrap();
    assert_eq!(ended.iter().map(|r| r.id).collect::<Vec<_>>(), [long.id]);
    let history = store.list_rotations(&tenant, &key.id).await.unwrap();
    assert!(history.iter().all(|r| r.grace_ended));
}

pub async fn key_scopes_add_and_remove(store: &dyn Store) {
    let tenant = tenant();
    let (_, key) = stored_key(store, &tenant, "k").await;
    let added = store
        .add_key_scopes(&tenant, &key.id, &["write".into(), "read".into()], at(1))
        .await
        .unwrap();
    assert_eq!(added.scopes, ["read", "write"]);
    assert_eq!(added.updated_at, at(1));
    let again = store
        .add_key_scopes(
            &tenant,
            &key.id,
            &["read".into(), "admin:all".into()],
            at(2),
        )
        .await
        .unwrap();
    assert_eq!(
        again.scopes,
        ["admin:all", "read", "write"],
        "no duplicates, sorted"
    );
    let removed = store
        .remove_key_scopes(&tenant, &key.id, &["read".into(), "not-held".into()], at(3))
        .await
        .unwrap();
    assert_eq!(removed.scopes, ["admin:all", "write"]);
    assert_eq!(
        store.get_key(&tenant, &key.id).await.unwrap().scopes,
        ["admin:all", "write"]
    );
    let names: Vec<String> = store
        .list_scopes(&tenant, None, &page(10, 0))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["admin:all", "read", "write"]);
    assert_not_found(
        store
            .add_key_scopes(&tenant, &KeyId::new(), &["x".into()], at(1))
            .await,
        ResourceKind::Key,
    );
}

pub async fn policies_crud(store: &dyn Store) {
    let tenant = tenant();
    let spec = PolicySpec {
        name: "strict".into(),
        description: Some("d".into()),
        rate_limit: Some(100),
        rate_limit_window: Some(Duration::from_secs(60)),
        burst_limit: Some(20),
        allowed_scopes: vec!["read".into()],
        allowed_ips: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
        allowed_origins: vec!["https://*.example.com".into()],
        allowed_methods: vec!["GET".into()],
        allowed_paths: vec!["/v1".into()],
        max_key_lifetime: Some(Duration::from_secs(90 * 86_400)),
        rotation_period: Some(Duration::from_secs(30 * 86_400)),
        grace_period: Some(Duration::from_secs(3600)),
        daily_quota: Some(1000),
        monthly_quota: Some(20_000),
        metadata: meta(&[("tier", "gold".into())]),
    };
    let policy = stored_policy(store, &tenant, spec.clone()).await;
    let got = store.get_policy(&tenant, &policy.id).await.unwrap();
    assert_eq!(got, policy, "every field reads back");
    assert_exists(
        store
            .create_policy(
                &Policy::new(PolicyId::new(), &tenant, spec.clone(), t0(), t0()).unwrap(),
            )
            .await,
        ResourceKind::Policy,
        "name",
    );
    // The same name in another tenant is fine.
    stored_policy(store, &tenant_other(&tenant), spec.clone()).await;
    let second = stored_policy(store, &tenant, policy_spec("lenient")).await;
    let list = store.list_policies(&tenant, &page(10, 0)).await.unwrap();
    assert_eq!(list.total, 2);
    assert_eq!(
        list.items.iter().map(|p| p.id).collect::<Vec<_>>(),
        [second.id, policy.id]
    );
    let one = store.list_policies(&tenant, &page(1, 1)).await.unwrap();
    assert_eq!((one.total, one.items[0].id), (2, policy.id));
    // Replace the rules.
    let mut changed = spec.clone();
    changed.daily_quota = None;
    changed.allowed_ips = vec![];
    let updated = Policy::new(policy.id, &tenant, changed, policy.created_at, at(1)).unwrap();
    store.update_policy(&updated).await.unwrap();
    assert_eq!(
        store.get_policy(&tenant, &policy.id).await.unwrap(),
        updated
    );
    // Renaming onto another policy's name is refused.
    let clash = Policy::new(second.id, &tenant, spec.clone(), t0(), at(1)).unwrap();
    assert_exists(
        store.update_policy(&clash).await,
        ResourceKind::Policy,
        "name",
    );
    let ghost = Policy::new(PolicyId::new(), &tenant, policy_spec("ghost"), t0(), t0()).unwrap();
    assert_not_found(store.update_policy(&ghost).await, ResourceKind::Policy);
    // In use: refused until no key uses it.
    let (_, mut key) = new_key(&tenant, "k");
    key.policy_id = Some(policy.id);
    store.create_key(&key).await.unwrap();
    match store.delete_policy(&tenant, &policy.id).await {
        Err(Error::PolicyInUse { keys: 1 }) => {}
        other => panic!("expected PolicyInUse, got {other:?}"),
    }
    let detach = KeyUpdate {
        policy_id: Some(None),
        ..Default::default()
    };
    store
        .update_key(&tenant, &key.id, &detach, at(2))
        .await
        .unwrap();
    store.delete_policy(&tenant, &policy.id).await.unwrap();
    assert_not_found(
        store.get_policy(&tenant, &policy.id).await,
        ResourceKind::Policy,
    );
    assert_not_found(
        store.delete_policy(&tenant, &policy.id).await,
        ResourceKind::Policy,
    );
}

pub async fn scopes_crud(store: &dyn Store) {
    let tenant = tenant();
    let scope = |name: &str, parent: Option<&str>| Scope {
        id: ScopeId::new(),
        app_id: tenant.app_id.clone(),
        tenant_id: tenant.tenant_id.clone(),
        name: name.to_owned(),
        description: Some(format!("about {name}")),
        parent: parent.map(str::to_owned),
        created_at: t0(),
    };
    let read = scope("read", None);
    store.create_scope(&read).await.unwrap();
    store
        .create_scope(&scope("read:users", Some("read")))
        .await
        .unwrap();
    store
        .create_scope(&scope("read:billing", Some("read")))
        .await
        .unwrap();
    store.create_scope(&scope("write", None)).await.unwrap();
    assert_exists(
        store.create_scope(&scope("read", None)).await,
        ResourceKind::Scope,
        "name",
    );
    let other = Tenant::new(tenant.app_id.clone(), format!("{}-b", tenant.tenant_id)).unwrap();
    let mut theirs = scope("read", None);
    theirs.app_id = other.app_id.clone();
    theirs.tenant_id = other.tenant_id.clone();
    store.create_scope(&theirs).await.unwrap();

    let all = store
        .list_scopes(&tenant, None, &page(10, 0))
        .await
        .unwrap();
    assert_eq!(all.total, 4);
    assert_eq!(
        all.items
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["read", "read:billing", "read:users", "write"]
    );
    assert_eq!(all.items[0], read);
    let children = store
        .list_scopes(&tenant, Some("read"), &page(10, 0))
        .await
        .unwrap();
    assert_eq!(
        children
            .items
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["read:billing", "read:users"]
    );
    let paged = store.list_scopes(&tenant, None, &page(2, 1)).await.unwrap();
    assert_eq!(
        (paged.total, paged.items.len(), paged.items[0].name.as_str()),
        (4, 2, "read:billing")
    );

    let (_, mut key) = new_key(&tenant, "holder");
    key.scopes = vec!["read".into(), "write".into()];
    store.create_key(&key).await.unwrap();
    store.delete_scope(&tenant, &read.id).await.unwrap();
    assert_eq!(
        store.get_key(&tenant, &key.id).await.unwrap().scopes,
        ["write"],
        "taken off keys"
    );
    assert_not_found(
        store.delete_scope(&tenant, &read.id).await,
        ResourceKind::Scope,
    );
    assert_not_found(
        store.delete_scope(&tenant, &theirs.id).await,
        ResourceKind::Scope,
    );
    assert_eq!(
        store
            .list_scopes(&other, None, &page(10, 0))
            .await
            .unwrap()
            .total,
        1
    );
}

pub async fn rotations_listed_oldest_first(store: &dyn Store) {
    let tenant = tenant();
    let (_, key) = stored_key(store, &tenant, "k").await;
    assert!(
        store
            .list_rotations(&tenant, &key.id)
            .await
            .unwrap()
            .is_empty()
    );
    let mut ids = Vec::new();
    for day in 1..=4 {
        let (_, rotation) = new_rotation(Duration::from_secs(60));
        ids.push(rotation.id);
        store
            .rotate_key(&tenant, &key.id, &rotation, at(day))
            .await
            .unwrap();
    }
    let history = store.list_rotations(&tenant, &key.id).await.unwrap();
    assert_eq!(history.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    for pair in history.windows(2) {
        assert_eq!(pair[0].new_hash, pair[1].old_hash, "a gap-free chain");
    }
    assert_eq!(
        history.last().unwrap().new_hash,
        store.get_key(&tenant, &key.id).await.unwrap().hash
    );
}

pub async fn tenant_isolation(store: &dyn Store) {
    let a = tenant();
    let b = tenant();
    let policy = stored_policy(store, &a, policy_spec("a-policy")).await;
    let (_, mut key) = new_key(&a, "a-key");
    key.policy_id = Some(policy.id);
    key.scopes = vec!["a-scope".into()];
    store.create_key(&key).await.unwrap();
    let (_, rotation) = new_rotation(Duration::from_secs(60));
    store
        .rotate_key(&a, &key.id, &rotation, at(1))
        .await
        .unwrap();
    let scope_id = store
        .list_scopes(&a, None, &page(10, 0))
        .await
        .unwrap()
        .items[0]
        .id;

    use ResourceKind::*;
    assert_not_found(store.get_key(&b, &key.id).await, Key);
    assert_not_found(
        store
            .update_key(&b, &key.id, &KeyUpdate::default(), at(2))
            .await,
        Key,
    );
    assert_not_found(store.delete_key(&b, &key.id).await, Key);
    for action in [KeyAction::Suspend, KeyAction::Revoke] {
        assert_not_found(store.transition_key(&b, &key.id, action, at(2)).await, Key);
    }
    let (_, rotation) = new_rotation(Duration::ZERO);
    assert_not_found(store.rotate_key(&b, &key.id, &rotation, at(2)).await, Key);
    assert_not_found(
        store
            .add_key_scopes(&b, &key.id, &["x".into()], at(2))
            .await,
        Key,
    );
    assert_not_found(
        store
            .remove_key_scopes(&b, &key.id, &["a-scope".into()], at(2))
            .await,
        Key,
    );
    assert_not_found(store.list_rotations(&b, &key.id).await, Key);
    assert_not_found(store.get_policy(&b, &policy.id).await, Policy);
    let theirs =
        crate::policy::Policy::new(policy.id, &b, policy_spec("hijack"), t0(), t0()).unwrap();
    assert_not_found(store.update_policy(&theirs).await, Policy);
    assert_not_found(store.delete_policy(&b, &policy.id).await, Policy);
    assert_not_found(store.delete_scope(&b, &scope_id).await, Scope);
    // B cannot attach A's policy either.
    let (_, mut b_key) = new_key(&b, "b-key");
    b_key.policy_id = Some(policy.id);
    assert_not_found(store.create_key(&b_key).await, Policy);
    assert_eq!(
        store
            .list_keys(&b, &KeyFilter::default())
            .await
            .unwrap()
            .total,
        0
    );
    assert_eq!(
        store.list_policies(&b, &page(10, 0)).await.unwrap().total,
        0
    );
    assert_eq!(
        store
            .list_scopes(&b, None, &page(10, 0))
            .await
            .unwrap()
            .total,
        0
    );
    // Same app id, other tenant; and same tenant id, other app.
    let other_app = Tenant::new(format!("{}-x", a.app_id), a.tenant_id.clone()).unwrap();
    assert_not_found(store.get_key(&other_app, &key.id).await, Key);
    assert_eq!(
        store
            .list_keys(&other_app, &KeyFilter::default())
            .await
            .unwrap()
            .total,
        0
    );
    // And A still sees everything, untouched.
    let still = store.get_key(&a, &key.id).await.unwrap();
    assert_eq!(
        (still.state, still.name.as_str(), still.policy_id),
        (KeyState::Active, "a-key", Some(policy.id))
    );
    assert_eq!(store.list_rotations(&a, &key.id).await.unwrap().len(), 1);
}

fn usage(tenant: &Tenant, key: KeyId, minutes: i64, status: u16, latency: u64) -> UsageRecord {
    UsageRecord {
        id: UsageId::new(),
        key_id: key,
        app_id: tenant.app_id.clone(),
        tenant_id: tenant.tenant_id.clone(),
        endpoint: "/v1/things".into(),
        method: "GET".into(),
        status_code: status,
        ip: Some("10.0.0.1".into()),
        user_agent: Some("curl/8".into()),
        latency_ms: latency,
        metadata: meta(&[("region", "eu".into())]),
        created_at: t0() + chrono::Duration::minutes(minutes),
    }
}

pub async fn usage_records_insert_and_list(store: &dyn Store) {
    let tenant = tenant();
    let (_, a) = stored_key(store, &tenant, "a").await;
    let (_, b) = stored_key(store, &tenant, "b").await;
    let records: Vec<UsageRecord> = (0..5)
        .map(|i| {
            usage(
                &tenant,
                if i < 3 { a.id } else { b.id },
                i,
                200 + i as u16,
                10 * i as u64,
            )
        })
        .collect();
    store.insert_usage(&records).await.unwrap();
    let other = tenant_other(&tenant);
    store
        .insert_usage(&[usage(&other, KeyId::new(), 1, 200, 1)])
        .await
        .unwrap();

    let all = store
        .list_usage(&tenant, &UsageFilter::default())
        .await
        .unwrap();
    assert_eq!(all.total, 5);
    let newest_first: Vec<UsageId> = records.iter().rev().map(|r| r.id).collect();
    assert_eq!(
        all.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        newest_first
    );
    assert_eq!(
        all.items[4], records[0],
        "a record reads back exactly as written"
    );
    let of_a = UsageFilter {
        key_id: Some(a.id),
        ..Default::default()
    };
    assert_eq!(store.list_usage(&tenant, &of_a).await.unwrap().total, 3);
    let window = UsageFilter {
        after: Some(t0() + chrono::Duration::minutes(1)),
        before: Some(t0() + chrono::Duration::minutes(3)),
        ..Default::default()
    };
    let in_window = store.list_usage(&tenant, &window).await.unwrap();
    assert_eq!(
        in_window.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        [records[2].id, records[1].id]
    );
    let paged = UsageFilter {
        page: page(2, 1),
        ..Default::default()
    };
    let paged = store.list_usage(&tenant, &paged).await.unwrap();
    assert_eq!(
        (paged.total, paged.items.len(), paged.items[0].id),
        (5, 2, records[3].id)
    );
    // A batch with a bad record is refused whole.
    let mut bad = usage(&tenant, a.id, 9, 500, 1);
    bad.latency_ms = u64::MAX;
    let batch = [usage(&tenant, a.id, 8, 200, 1), bad];
    assert!(matches!(
        store.insert_usage(&batch).await,
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(
        store
            .list_usage(&tenant, &UsageFilter::default())
            .await
            .unwrap()
            .total,
        5
    );
    store
        .insert_usage(&[])
        .await
        .expect("an empty batch is fine");
    assert_eq!(
        store
            .list_usage(&other, &UsageFilter::default())
            .await
            .unwrap()
            .total,
        1
    );
}

pub async fn usage_aggregates_upsert_and_list(store: &dyn Store) {
    let tenant = tenant();
    let (_, key) = stored_key(store, &tenant, "k").await;
    let row = |period: UsagePeriod, start: DateTime<Utc>, requests: u64| UsageAggregate {
        key_id: key.id,
        app_id: tenant.app_id.clone(),
        tenant_id: tenant.tenant_id.clone(),
        period,
        period_start: start,
        request_count: requests,
        error_count: requests / 10,
        total_latency_ms: requests * 7,
        p50_latency_ms: 5,
        p99_latency_ms: 90,
    };
    let days = [
        row(UsagePeriod::Day, at(0), 10),
        row(UsagePeriod::Day, at(1), 20),
        row(UsagePeriod::Day, at(2), 30),
    ];
    store.upsert_usage_aggregates(&days).await.unwrap();
    store
        .upsert_usage_aggregates(&[row(UsagePeriod::Month, at(0), 60)])
        .await
        .unwrap();
    let listed = store
        .list_usage_aggregates(&tenant, &key.id, UsagePeriod::Day, None, None)
        .await
        .unwrap();
    assert_eq!(listed, days, "oldest first, every field");
    let window = store
        .list_usage_aggregates(&tenant, &key.id, UsagePeriod::Day, Some(at(1)), Some(at(2)))
        .await
        .unwrap();
    assert_eq!(window, [days[1].clone()]);
    // Recomputing replaces, never duplicates.
    let again = row(UsagePeriod::Day, at(1), 25);
    store
        .upsert_usage_aggregates(std::slice::from_ref(&again))
        .await
        .unwrap();
    let listed = store
        .list_usage_aggregates(&tenant, &key.id, UsagePeriod::Day, None, None)
        .await
        .unwrap();
    assert_eq!(listed, [days[0].clone(), again, days[2].clone()]);
    let months = store
        .list_usage_aggregates(&tenant, &key.id, UsagePeriod::Month, None, None)
        .await
        .unwrap();
    assert_eq!(months.len(), 1);
    let other = tenant_other(&tenant);
    assert!(
        store
            .list_usage_aggregates(&other, &key.id, UsagePeriod::Day, None, None)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn quotas_count_exactly_and_refuse_whole(store: &dyn Store) {
    use crate::ratelimit::QuotaWindow;
    let key = KeyId::new();
    let windows = |now: DateTime<Utc>| {
        [
            QuotaWindow::containing(UsagePeriod::Day, now, 3),
            QuotaWindow::containing(UsagePeriod::Month, now, 5),
        ]
    };
    let used =
        |d: &crate::ratelimit::QuotaDecision| d.windows.iter().map(|w| w.used).collect::<Vec<_>>();
    let day1 = windows(at(0));
    for expected in 1..=3 {
        let d = store.consume_quota(&key, &day1, 1).await.unwrap();
        assert!(d.allowed);
        assert_eq!(used(&d), [expected, expected]);
    }
    let refused = store.consume_quota(&key, &day1, 1).await.unwrap();
    assert!(!refused.allowed, "the daily quota is used up");
    assert_eq!(used(&refused), [3, 3], "a refusal counts nothing");
    assert_eq!(refused.windows[0].remaining, 0);
    assert_eq!(refused.resets_at(), Some(at(1)));
    // The next day: a fresh day, the same month.
    let day2 = windows(at(1));
    let d = store.consume_quota(&key, &day2, 2).await.unwrap();
    assert!(d.allowed);
    assert_eq!(used(&d), [2, 5]);
    let refused = store.consume_quota(&key, &day2, 1).await.unwrap();
    assert!(!refused.allowed, "the monthly quota is used up");
    assert_eq!(used(&refused), [2, 5], "the day was not counted either");
    assert_eq!(
        refused.resets_at(),
        Some("2030-02-01T00:00:00Z".parse().unwrap())
    );
    // A cost larger than what is left is refused whole.
    let other = KeyId::new();
    assert!(!store.consume_quota(&other, &day1, 4).await.unwrap().allowed);
    assert_eq!(
        used(&store.consume_quota(&other, &day1, 3).await.unwrap()),
        [3, 3]
    );
    // No windows, nothing to count.
    assert!(store.consume_quota(&key, &[], 1).await.unwrap().allowed);
    // A request from just before midnight that arrives after the next day
    // began counts in its own day; the new day keeps its count.
    let late = KeyId::new();
    let roomy = |now: DateTime<Utc>| [QuotaWindow::containing(UsagePeriod::Day, now, 10)];
    store.consume_quota(&late, &roomy(at(0)), 1).await.unwrap();
    store.consume_quota(&late, &roomy(at(1)), 4).await.unwrap();
    let d = store.consume_quota(&late, &roomy(at(0)), 1).await.unwrap();
    assert_eq!(used(&d), [2]);
    let d = store.consume_quota(&late, &roomy(at(1)), 1).await.unwrap();
    assert_eq!(used(&d), [5]);
    // A cost of zero reads the counts.
    assert_eq!(
        used(&store.consume_quota(&late, &roomy(at(1)), 0).await.unwrap()),
        [5]
    );
}

/// Records written in batches whose times interleave (as batches from
/// several writers, or records posted late, do), some at the very same
/// instant: every read orders them across batches exactly as one sorted
/// list would, pages included, and counts ranges that cut through batches.
pub async fn usage_reads_merge_batches_in_time_order(store: &dyn Store) {
    let tenant = tenant();
    let (a, b) = (KeyId::new(), KeyId::new());
    // Three batches of 40: batch j holds minutes j, j + 3, j + 6, ...; every
    // fifth record of each batch is at minute 0.
    let mut all: Vec<UsageRecord> = Vec::new();
    for j in 0..3 {
        let batch: Vec<UsageRecord> = (0..40)
            .map(|i| {
                let minutes = if i % 5 == 0 { 0 } else { j + 3 * i };
                usage(&tenant, if i % 2 == 0 { a } else { b }, minutes, 200, 1)
            })
            .collect();
        store.insert_usage(&batch).await.unwrap();
        all.extend(batch);
    }
    let other = tenant_other(&tenant);
    store
        .insert_usage(&[usage(&other, KeyId::new(), 7, 200, 1)])
        .await
        .unwrap();
    all.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
    let ids = |records: &[UsageRecord]| records.iter().map(|r| r.id).collect::<Vec<_>>();

    // Newest first, page by page.
    let mut paged = Vec::new();
    for offset in (0..all.len() as u64).step_by(7) {
        let filter = UsageFilter {
            page: page(7, offset),
            ..Default::default()
        };
        let page = store.list_usage(&tenant, &filter).await.unwrap();
        assert_eq!(page.total, 120);
        paged.extend(page.items);
    }
    assert_eq!(ids(&paged), ids(&all));
    let past_the_end = UsageFilter {
        page: page(7, 120),
        ..Default::default()
    };
    let past_the_end = store.list_usage(&tenant, &past_the_end).await.unwrap();
    assert_eq!((past_the_end.total, past_the_end.items.len()), (120, 0));
    // A range cutting through every batch, one key.
    let after = t0() + chrono::Duration::minutes(10);
    let before = t0() + chrono::Duration::minutes(50);
    let expected: Vec<UsageRecord> = all
        .iter()
        .filter(|r| r.key_id == a && r.created_at >= after && r.created_at < before)
        .cloned()
        .collect();
    let filter = UsageFilter {
        key_id: Some(a),
        after: Some(after),
        before: Some(before),
        page: page(5, 3),
    };
    let window = store.list_usage(&tenant, &filter).await.unwrap();
    assert_eq!(window.total, expected.len() as u64);
    assert_eq!(ids(&window.items), ids(&expected[3..8]));

    // Oldest first for the aggregation, each page after the last one's end,
    // over every tenant.
    let mut oldest: Vec<UsageRecord> = all.iter().rev().cloned().collect();
    let mut from = None;
    let mut read = Vec::new();
    loop {
        let page = store.usage_between(t0(), at(1), from, 9).await.unwrap();
        let Some(last) = page.last() else { break };
        from = Some((last.created_at, last.id));
        read.extend(page.into_iter().filter(|r| r.tenant_id == tenant.tenant_id));
    }
    assert_eq!(ids(&read), ids(&oldest));

    // Purging takes the oldest first, whichever batch holds them.
    let cutoff = t0() + chrono::Duration::minutes(30);
    let before_cutoff = oldest.iter().filter(|r| r.created_at < cutoff).count() as u64;
    assert_eq!(store.purge_usage(cutoff, 11).await.unwrap(), 11);
    oldest.drain(..11);
    let left = store
        .list_usage(
            &tenant,
            &UsageFilter {
                page: page(500, 0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut expected: Vec<UsageRecord> = oldest.clone();
    expected.reverse();
    assert_eq!(ids(&left.items), ids(&expected));
    assert_eq!(
        store.purge_usage(cutoff, 1000).await.unwrap(),
        before_cutoff - 11 + 1,
        "the rest before the cutoff: this tenant's, the other tenant's one, no later record"
    );
}

pub async fn usage_retention_purges_oldest_first(store: &dyn Store) {
    let tenant = tenant();
    let key = KeyId::new();
    let records: Vec<UsageRecord> = (0..6)
        .map(|day| usage(&tenant, key, day * 24 * 60, 200, 1))
        .collect();
    store.insert_usage(&records).await.unwrap();
    // Older than day 4: days 0-3 go, in capped batches, oldest first.
    assert_eq!(store.purge_usage(at(4), 3).await.unwrap(), 3);
    let left = store
        .list_usage(&tenant, &UsageFilter::default())
        .await
        .unwrap();
    assert_eq!(left.total, 3);
    assert!(
        left.items.iter().all(|r| r.created_at >= at(3)),
        "the oldest went first"
    );
    assert_eq!(store.purge_usage(at(4), 3).await.unwrap(), 1);
    assert_eq!(store.purge_usage(at(4), 3).await.unwrap(), 0);
    let left = store
        .list_usage(&tenant, &UsageFilter::default())
        .await
        .unwrap();
    assert_eq!(
        left.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        [records[5].id, records[4].id]
    );
}

// ------------------------------------------------------- concurrency, engine

pub async fn concurrent_rotations_form_a_chain(store: Arc<dyn Store>) {
    let tenant = tenant();
    let (first, key) = stored_key(&*store, &tenant, "hot").await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let store = store.clone();
        let tenant = tenant.clone();
        tasks.spawn(async move {
            let (raw, rotation) = new_rotation(Duration::from_secs(3600));
            store
                .rotate_key(&tenant, &key.id, &rotation, at(1))
                .await
                .map(|_| raw.hash())
        });
    }
    let mut issued = HashSet::new();
    while let Some(result) = tasks.join_next().await {
        issued.insert(result.expect("task").expect("every rotation succeeds"));
    }
    assert_eq!(issued.len(), 50);
    let history = store.list_rotations(&tenant, &key.id).await.unwrap();
    assert_eq!(history.len(), 50);
    assert_eq!(history[0].old_hash, first.hash());
    for pair in history.windows(2) {
        assert_eq!(pair[0].new_hash, pair[1].old_hash, "gap-free chain");
    }
    let current = store.get_key(&tenant, &key.id).await.unwrap().hash;
    assert_eq!(
        history[49].new_hash, current,
        "one current secret, the chain's end"
    );
    let chain: HashSet<_> = history.iter().map(|r| r.new_hash).collect();
    assert_eq!(chain, issued, "every issued secret is in the chain");
}

pub async fn concurrent_policy_creates_one_wins(store: Arc<dyn Store>) {
    let tenant = tenant();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let store = store.clone();
        let tenant = tenant.clone();
        tasks.spawn(async move {
            let policy = Policy::new(PolicyId::new(), &tenant, policy_spec("same"), t0(), t0())?;
            store.create_policy(&policy).await
        });
    }
    let (mut ok, mut exists) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            Ok(()) => ok += 1,
            Err(Error::AlreadyExists {
                kind: ResourceKind::Policy,
                field: "name",
            }) => exists += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, exists), (1, 49));
    assert_eq!(
        store
            .list_policies(&tenant, &page(10, 0))
            .await
            .unwrap()
            .total,
        1
    );
}

fn engine_on(store: Arc<dyn Store>) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(t0()));
    (Engine::builder(store).clock(clock.clone()).build(), clock)
}

#[track_caller]
fn assert_denied<T: std::fmt::Debug>(result: crate::Result<T>, code: &str) {
    match result {
        Err(e) if e.code() == code => {}
        other => panic!("expected {code}, got {other:?}"),
    }
}

fn key_request(name: &str, scopes: &[&str]) -> CreateKey {
    CreateKey {
        name: name.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// The whole story of the README's quickstart.
pub async fn engine_full_lifecycle(store: Arc<dyn Store>) {
    let (engine, clock) = engine_on(store);
    let tenant = tenant();
    let policy = engine
        .create_policy(
            &tenant,
            PolicySpec {
                allowed_scopes: vec!["read".into(), "write".into()],
                ..policy_spec("standard")
            },
        )
        .await
        .unwrap();
    let created = engine
        .create_key(
            &tenant,
            CreateKey {
                policy_id: Some(policy.id),
                ..key_request("svc", &["read", "write:orders"])
            },
        )
        .await
        .unwrap();
    let old = created.raw_key;
    let ctx = RequestContext {
        required_scopes: vec!["read:users".into()],
        ..Default::default()
    };
    let valid = engine.validate(old.expose_secret(), &ctx).await.unwrap();
    assert_eq!(valid.key.id, created.key.id);
    assert_eq!(valid.policy.as_ref().map(|p| p.id), Some(policy.id));
    assert_eq!(valid.grace_ends, None);

    let rotated = engine
        .rotate_key(
            &tenant,
            &created.key.id,
            RotateKey {
                grace_period: Some(Duration::from_secs(3600)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let new = rotated.raw_key;
    assert_ne!(new.expose_secret(), old.expose_secret());
    assert_eq!(rotated.key.id, created.key.id);
    let via_old = engine.validate(old.expose_secret(), &ctx).await.unwrap();
    assert_eq!(
        via_old.grace_ends,
        Some(t0() + chrono::Duration::hours(1)),
        "old secret says it is in grace"
    );
    assert_eq!(
        engine
            .validate(new.expose_secret(), &ctx)
            .await
            .unwrap()
            .grace_ends,
        None
    );

    clock.advance(Duration::from_secs(3601));
    assert_denied(engine.validate(old.expose_secret(), &ctx).await, "rotated");
    engine.validate(new.expose_secret(), &ctx).await.unwrap();

    engine
        .revoke_key(&tenant, &created.key.id, Some("done"))
        .await
        .unwrap();
    assert_denied(engine.validate(new.expose_secret(), &ctx).await, "revoked");
    assert_denied(engine.validate(old.expose_secret(), &ctx).await, "revoked");
    assert!(matches!(
        engine.suspend_key(&tenant, &created.key.id).await,
        Err(Error::InvalidStateTransition { .. })
    ));
    assert!(matches!(
        engine.reactivate_key(&tenant, &created.key.id).await,
        Err(Error::InvalidStateTransition { .. })
    ));
    assert!(matches!(
        engine
            .rotate_key(&tenant, &created.key.id, RotateKey::default())
            .await,
        Err(Error::InvalidStateTransition {
            from: KeyState::Revoked,
            action: KeyAction::Rotate
        })
    ));
}

pub async fn engine_validation_outcomes(store: Arc<dyn Store>) {
    let (engine, clock) = engine_on(store);
    let tenant = tenant();
    let none = RequestContext::default();
    // Malformed, bad checksum, unknown.
    assert_denied(engine.validate("", &none).await, "invalid_key");
    assert_denied(
        engine.validate("sk_live_nothex", &none).await,
        "invalid_key",
    );
    let created = engine
        .create_key(&tenant, key_request("k", &["read"]))
        .await
        .unwrap();
    let raw = created.raw_key.expose_secret().to_owned();
    let mut flipped = raw.clone();
    let last = flipped.pop().unwrap();
    flipped.push(if last == '0' { '1' } else { '0' });
    assert_denied(engine.validate(&flipped, &none).await, "invalid_key");
    let stranger = RawKey::generate("sk", &Environment::Live).unwrap();
    assert_denied(
        engine.validate(stranger.expose_secret(), &none).await,
        "invalid_key",
    );
    // Expected tenant.
    let right = RequestContext {
        expected_tenant: Some(tenant.clone()),
        ..Default::default()
    };
    engine.validate(&raw, &right).await.unwrap();
    let wrong = RequestContext {
        expected_tenant: Some(tenant_other(&tenant)),
        ..Default::default()
    };
    assert_denied(engine.validate(&raw, &wrong).await, "invalid_key");
    // Scopes, hierarchical.
    let needs = |s: &str| RequestContext {
        required_scopes: vec![s.into()],
        ..Default::default()
    };
    engine
        .validate(&raw, &needs("read:users:email"))
        .await
        .unwrap();
    assert_denied(
        engine.validate(&raw, &needs("reader")).await,
        "insufficient_scope",
    );
    assert_denied(
        engine.validate(&raw, &needs("write")).await,
        "insufficient_scope",
    );
    // Suspended, reactivated.
    engine.suspend_key(&tenant, &created.key.id).await.unwrap();
    assert_denied(engine.validate(&raw, &none).await, "suspended");
    engine
        .reactivate_key(&tenant, &created.key.id)
        .await
        .unwrap();
    engine.validate(&raw, &none).await.unwrap();
    // Expiry by time, before any sweep.
    let expiring = engine
        .create_key(
            &tenant,
            CreateKey {
                expires_at: Some(at(1)),
                ..key_request("e", &[])
            },
        )
        .await
        .unwrap();
    engine
        .validate(expiring.raw_key.expose_secret(), &none)
        .await
        .unwrap();
    clock.set(at(1));
    assert_denied(
        engine
            .validate(expiring.raw_key.expose_secret(), &none)
            .await,
        "expired",
    );
    // Policy denials, in order.
    let policy = engine
        .create_policy(
            &tenant,
            PolicySpec {
                allowed_ips: vec!["10.0.0.0/8".into()],
                allowed_origins: vec!["https://app.example.com".into()],
                allowed_methods: vec!["GET".into()],
                allowed_paths: vec!["/api".into()],
                ..policy_spec("fence")
            },
        )
        .await
        .unwrap();
    let fenced = engine
        .create_key(
            &tenant,
            CreateKey {
                policy_id: Some(policy.id),
                ..key_request("f", &[])
            },
        )
        .await
        .unwrap();
    let fenced = fenced.raw_key.expose_secret().to_owned();
    let mut ctx = RequestContext::default();
    assert_denied(engine.validate(&fenced, &ctx).await, "ip_not_allowed");
    ctx.ip = Some("10.1.1.1".parse().unwrap());
    assert_denied(engine.validate(&fenced, &ctx).await, "origin_not_allowed");
    ctx.origin = Some("https://app.example.com".into());
    assert_denied(engine.validate(&fenced, &ctx).await, "method_not_allowed");
    ctx.method = Some("get".into());
    assert_denied(engine.validate(&fenced, &ctx).await, "path_not_allowed");
    ctx.path = Some("/api/things".into());
    engine.validate(&fenced, &ctx).await.unwrap();
    // A policy change applies at the next validation.
    engine
        .update_policy(
            &tenant,
            &policy.id,
            PolicySpec {
                allowed_ips: vec!["192.168.0.0/16".into()],
                ..policy_spec("fence")
            },
        )
        .await
        .unwrap();
    assert_denied(engine.validate(&fenced, &ctx).await, "ip_not_allowed");
}

pub async fn engine_policy_rules_at_creation(store: Arc<dyn Store>) {
    let (engine, _clock) = engine_on(store);
    let tenant = tenant();
    let policy = engine
        .create_policy(
            &tenant,
            PolicySpec {
                max_key_lifetime: Some(Duration::from_secs(30 * 86_400)),
                allowed_scopes: vec!["read".into()],
                ..policy_spec("capped")
            },
        )
        .await
        .unwrap();
    let under = |expires_at, scopes: &[&str]| CreateKey {
        policy_id: Some(policy.id),
        expires_at,
        ..key_request("k", scopes)
    };
    let k = engine
        .create_key(&tenant, under(None, &["read:users"]))
        .await
        .unwrap();
    assert_eq!(
        k.key.expires_at,
        Some(at(30)),
        "no expiry given: the lifetime cap"
    );
    let k = engine
        .create_key(&tenant, under(Some(at(365)), &[]))
        .await
        .unwrap();
    assert_eq!(k.key.expires_at, Some(at(30)), "a later expiry is capped");
    let k = engine
        .create_key(&tenant, under(Some(at(7)), &[]))
        .await
        .unwrap();
    assert_eq!(k.key.expires_at, Some(at(7)), "an earlier expiry is kept");
    match engine
        .create_key(&tenant, under(None, &["read", "write"]))
        .await
    {
        Err(Error::ScopeNotAllowed { scope }) => assert_eq!(scope, "write"),
        other => panic!("expected ScopeNotAllowed, got {other:?}"),
    }
    assert!(matches!(
        engine
            .assign_scopes(&tenant, &k.key.id, vec!["admin".into()])
            .await,
        Err(Error::ScopeNotAllowed { .. })
    ));
    let assigned = engine
        .assign_scopes(&tenant, &k.key.id, vec!["read:x".into()])
        .await
        .unwrap();
    assert_eq!(assigned.scopes, ["read:x"]);
    // Moving a key with a `write` scope under the policy is refused.
    let free = engine
        .create_key(&tenant, key_request("free", &["write"]))
        .await
        .unwrap();
    let attach = KeyUpdate {
        policy_id: Some(Some(policy.id)),
        ..Default::default()
    };
    assert!(matches!(
        engine.update_key(&tenant, &free.key.id, attach).await,
        Err(Error::ScopeNotAllowed { .. })
    ));
    // Attaching a policy caps an existing expiry from the key's creation.
    let plain = engine
        .create_key(&tenant, key_request("plain", &["read"]))
        .await
        .unwrap();
    let attach = KeyUpdate {
        policy_id: Some(Some(policy.id)),
        ..Default::default()
    };
    let attached = engine
        .update_key(&tenant, &plain.key.id, attach)
        .await
        .unwrap();
    assert_eq!(attached.expires_at, Some(at(30)));
    // Policies in use cannot be deleted.
    assert!(matches!(
        engine.delete_policy(&tenant, &policy.id).await,
        Err(Error::PolicyInUse { .. })
    ));
    // Unknown policy.
    let ghost = CreateKey {
        policy_id: Some(PolicyId::new()),
        ..key_request("g", &[])
    };
    assert_not_found(
        engine.create_key(&tenant, ghost).await,
        ResourceKind::Policy,
    );
}

pub async fn engine_rotation_grace_sources(store: Arc<dyn Store>) {
    let (engine, _clock) = engine_on(store);
    let tenant = tenant();
    let policy = engine
        .create_policy(
            &tenant,
            PolicySpec {
                grace_period: Some(Duration::from_secs(600)),
                ..policy_spec("g")
            },
        )
        .await
        .unwrap();
    let plain = engine
        .create_key(&tenant, key_request("plain", &[]))
        .await
        .unwrap();
    let governed = engine
        .create_key(
            &tenant,
            CreateKey {
                policy_id: Some(policy.id),
                ..key_request("gov", &[])
            },
        )
        .await
        .unwrap();
    let grace_of = |key: KeyId, request: RotateKey| {
        let engine = engine.clone();
        let tenant = tenant.clone();
        async move {
            engine
                .rotate_key(&tenant, &key, request)
                .await
                .unwrap()
                .rotation
                .grace_period
        }
    };
    let hours = |h: u64| Duration::from_secs(h * 3600);
    assert_eq!(
        grace_of(plain.key.id, RotateKey::default()).await,
        hours(24),
        "default 24h"
    );
    assert_eq!(
        grace_of(governed.key.id, RotateKey::default()).await,
        Duration::from_secs(600),
        "policy"
    );
    let explicit = RotateKey {
        grace_period: Some(hours(2)),
        ..Default::default()
    };
    assert_eq!(
        grace_of(governed.key.id, explicit).await,
        hours(2),
        "the call wins"
    );
    let compromise = RotateKey {
        reason: RotationReason::Compromise,
        ..Default::default()
    };
    assert_eq!(
        grace_of(governed.key.id, compromise).await,
        Duration::ZERO,
        "compromise: none"
    );
    let compromise_with = RotateKey {
        reason: RotationReason::Compromise,
        grace_period: Some(hours(1)),
        ..Default::default()
    };
    assert_eq!(grace_of(plain.key.id, compromise_with).await, hours(1));
    // A compromise rotation with no grace kills the old secret at once.
    let victim = engine
        .create_key(&tenant, key_request("victim", &[]))
        .await
        .unwrap();
    let compromise = RotateKey {
        reason: RotationReason::Compromise,
        ..Default::default()
    };
    let replaced = engine
        .rotate_key(&tenant, &victim.key.id, compromise)
        .await
        .unwrap();
    assert_denied(
        engine
            .validate(victim.raw_key.expose_secret(), &RequestContext::default())
            .await,
        "rotated",
    );
    engine
        .validate(replaced.raw_key.expose_secret(), &RequestContext::default())
        .await
        .unwrap();
    // A suspended key can be rotated; it stays suspended.
    engine.suspend_key(&tenant, &plain.key.id).await.unwrap();
    let r = engine
        .rotate_key(&tenant, &plain.key.id, RotateKey::default())
        .await
        .unwrap();
    assert_eq!(r.key.state, KeyState::Suspended);
    assert_denied(
        engine
            .validate(r.raw_key.expose_secret(), &RequestContext::default())
            .await,
        "suspended",
    );
}

pub async fn engine_revocation_kills_grace_secrets(store: Arc<dyn Store>) {
    let (engine, _clock) = engine_on(store);
    let tenant = tenant();
    let created = engine
        .create_key(&tenant, key_request("k", &[]))
        .await
        .unwrap();
    let first = engine
        .rotate_key(&tenant, &created.key.id, RotateKey::default())
        .await
        .unwrap();
    let second = engine
        .rotate_key(&tenant, &created.key.id, RotateKey::default())
        .await
        .unwrap();
    let ctx = RequestContext::default();
    for raw in [&created.raw_key, &first.raw_key, &second.raw_key] {
        engine.validate(raw.expose_secret(), &ctx).await.unwrap();
    }
    engine
        .revoke_key(&tenant, &created.key.id, Some("leaked"))
        .await
        .unwrap();
    for raw in [&created.raw_key, &first.raw_key, &second.raw_key] {
        assert_denied(engine.validate(raw.expose_secret(), &ctx).await, "revoked");
    }
}

#[derive(Debug, Default)]
struct Recorder {
    label: &'static str,
    fail: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn note(&self, event: &str) -> HookResult {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:{event}", self.label));
        if self.fail {
            Err("hook failure".into())
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Hook for Recorder {
    async fn key_created(&self, _key: &ApiKey) -> HookResult {
        self.note("created")
    }
    async fn key_create_failed(&self, failure: Failure<'_>) -> HookResult {
        self.note(&format!("create_failed({})", failure.error.code()))
    }
    async fn rate_limited(&self, _key: &ApiKey) -> HookResult {
        self.note("rate_limited")
    }
    async fn quota_exceeded(&self, _key: &ApiKey) -> HookResult {
        self.note("quota_exceeded")
    }
    async fn key_validated(&self, _key: &ApiKey) -> HookResult {
        self.note("validated")
    }
    async fn validation_failed(&self, failure: Failure<'_>) -> HookResult {
        self.note(&format!("validation_failed({})", failure.error.code()))
    }
    async fn key_rotated(&self, _key: &ApiKey, rotation: &Rotation) -> HookResult {
        self.note(&format!("rotated({})", rotation.reason.as_str()))
    }
    async fn key_revoked(&self, _key: &ApiKey, reason: Option<&str>) -> HookResult {
        self.note(&format!("revoked({})", reason.unwrap_or("-")))
    }
    async fn key_suspended(&self, _key: &ApiKey) -> HookResult {
        self.note("suspended")
    }
    async fn key_reactivated(&self, _key: &ApiKey) -> HookResult {
        self.note("reactivated")
    }
    async fn key_expired(&self, key: &ApiKey) -> HookResult {
        self.note(&format!("expired({})", key.name))
    }
    async fn rotation_due(&self, key: &ApiKey, due_at: DateTime<Utc>) -> HookResult {
        self.note(&format!(
            "rotation_due({}@{})",
            key.name,
            due_at.to_rfc3339()
        ))
    }
    async fn policy_created(&self, _policy: &Policy) -> HookResult {
        self.note("policy_created")
    }
    async fn policy_updated(&self, _policy: &Policy) -> HookResult {
        self.note("policy_updated")
    }
    async fn policy_deleted(&self, _tenant: &Tenant, _id: &PolicyId) -> HookResult {
        self.note("policy_deleted")
    }
    async fn shutdown(&self) -> HookResult {
        self.note("shutdown")
    }
}

/// An engine on a manual clock whose hooks are, in order: a recorder that
/// fails (`a`), one that does not (`b`), and an audit hook into a memory sink.
type Recorded = (
    Engine,
    Arc<Mutex<Vec<String>>>,
    Arc<MemoryAuditSink>,
    Arc<ManualClock>,
);

fn recorded_engine(store: Arc<dyn Store>) -> Recorded {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::new(MemoryAuditSink::default());
    let clock = Arc::new(ManualClock::new(t0()));
    let engine = Engine::builder(store)
        .clock(clock.clone())
        .hook(Arc::new(Recorder {
            label: "a",
            fail: true,
            log: log.clone(),
        }))
        .hook(Arc::new(Recorder {
            label: "b",
            fail: false,
            log: log.clone(),
        }))
        .hook(Arc::new(
            AuditHook::new(sink.clone()).with_clock(clock.clone()),
        ))
        .build();
    (engine, log, sink, clock)
}

pub async fn engine_hooks_run_in_order_and_never_fail_the_operation(store: Arc<dyn Store>) {
    let (engine, log, sink, _clock) = recorded_engine(store);
    let tenant = tenant();
    let policy = engine
        .create_policy(&tenant, policy_spec("p"))
        .await
        .unwrap();
    engine
        .update_policy(&tenant, &policy.id, policy_spec("p2"))
        .await
        .unwrap();
    engine.delete_policy(&tenant, &policy.id).await.unwrap();
    let created = engine
        .create_key(&tenant, key_request("k", &[]))
        .await
        .expect("a failing hook fails nothing");
    assert!(
        engine
            .create_key(&tenant, key_request("", &[]))
            .await
            .is_err()
    );
    let raw = created.raw_key.expose_secret().to_owned();
    engine
        .validate(&raw, &RequestContext::default())
        .await
        .unwrap();
    let needs = RequestContext {
        required_scopes: vec!["admin".into()],
        ..Default::default()
    };
    assert!(engine.validate(&raw, &needs).await.is_err());
    let rotated = engine
        .rotate_key(&tenant, &created.key.id, RotateKey::default())
        .await
        .unwrap();
    engine.suspend_key(&tenant, &created.key.id).await.unwrap();
    engine
        .reactivate_key(&tenant, &created.key.id)
        .await
        .unwrap();
    engine
        .revoke_key(&tenant, &created.key.id, Some("why"))
        .await
        .unwrap();
    engine.shutdown().await;

    let expected_events = [
        "policy_created",
        "policy_updated",
        "policy_deleted",
        "created",
        "create_failed(invalid_input)",
        "validated",
        "validation_failed(insufficient_scope)",
        "rotated(manual)",
        "suspended",
        "reactivated",
        "revoked(why)",
        "shutdown",
    ];
    let expected: Vec<String> = expected_events
        .iter()
        .flat_map(|e| [format!("a:{e}"), format!("b:{e}")])
        .collect();
    assert_eq!(
        *log.lock().unwrap(),
        expected,
        "every hook, in registration order, after a failing one"
    );

    let events = sink.events();
    let actions: Vec<&str> = events.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            "keysmith.policy.created",
            "keysmith.policy.updated",
            "keysmith.policy.deleted",
            "keysmith.key.created",
            "keysmith.key.create_failed",
            "keysmith.key.validated",
            "keysmith.key.validation_failed",
            "keysmith.key.rotated",
            "keysmith.key.suspended",
            "keysmith.key.reactivated",
            "keysmith.key.revoked",
        ]
    );
    let revoked = events.last().unwrap();
    assert_eq!(
        revoked.resource_id.as_deref(),
        Some(created.key.id.to_string().as_str())
    );
    assert_eq!(
        revoked.tenant_id.as_deref(),
        Some(tenant.tenant_id.as_str())
    );
    assert_eq!(revoked.reason.as_deref(), Some("why"));
    assert_eq!(revoked.severity, crate::hooks::Severity::Critical);
    assert_eq!(revoked.occurred_at, t0());
    let everything = format!("{events:?} {}", serde_json::to_string(&events).unwrap());
    for secret in [&raw, rotated.raw_key.expose_secret()] {
        assert!(
            !everything.contains(&secret[8..]),
            "no raw key reaches a hook"
        );
    }
}

pub async fn engine_expiry_sweep_fires_once(store: Arc<dyn Store>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let clock = Arc::new(ManualClock::new(t0()));
    let engine = Engine::builder(store)
        .clock(clock.clone())
        .hook(Arc::new(Recorder {
            label: "h",
            fail: false,
            log: log.clone(),
        }))
        .build();
    let tenant = tenant();
    for (name, days) in [("a", 1), ("b", 2), ("c", 40)] {
        engine
            .create_key(
                &tenant,
                CreateKey {
                    expires_at: Some(at(days)),
                    ..key_request(name, &[])
                },
            )
            .await
            .unwrap();
    }
    log.lock().unwrap().clear();
    assert_eq!(engine.expire_keys(100).await.unwrap(), 0);
    clock.set(at(3));
    assert_eq!(engine.expire_keys(1).await.unwrap(), 1);
    assert_eq!(engine.expire_keys(100).await.unwrap(), 1);
    assert_eq!(engine.expire_keys(100).await.unwrap(), 0);
    let mut fired = log.lock().unwrap().clone();
    fired.sort();
    assert_eq!(fired, ["h:expired(a)", "h:expired(b)"]);
    let expired = engine
        .list_keys(
            &tenant,
            &KeyFilter {
                state: Some(KeyState::Expired),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(expired.total, 2);
    // Grace sweep through the engine.
    let live = engine
        .list_keys(
            &tenant,
            &KeyFilter {
                state: Some(KeyState::Active),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let grace = RotateKey {
        grace_period: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    engine
        .rotate_key(&tenant, &live.items[0].id, grace)
        .await
        .unwrap();
    assert_eq!(engine.end_grace_periods(10).await.unwrap(), 0);
    clock.advance(Duration::from_secs(61));
    assert_eq!(engine.end_grace_periods(10).await.unwrap(), 1);
    assert_eq!(engine.end_grace_periods(10).await.unwrap(), 0);
}

pub async fn engine_input_is_checked(store: Arc<dyn Store>) {
    let (engine, _clock) = engine_on(store);
    let tenant = tenant();
    let field_of = |result: crate::Result<crate::engine::CreatedKey>| match result {
        Err(Error::InvalidInput { field, .. }) => field,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    let cases: Vec<(CreateKey, &str)> = vec![
        (key_request("", &[]), "name"),
        (key_request(&"n".repeat(256), &[]), "name"),
        (
            CreateKey {
                prefix: Some("SK".into()),
                ..key_request("k", &[])
            },
            "prefix",
        ),
        (
            CreateKey {
                prefix: Some("a_b".into()),
                ..key_request("k", &[])
            },
            "prefix",
        ),
        (key_request("k", &["ok", "bad scope"]), "scopes[1]"),
        (
            CreateKey {
                expires_at: Some(at(-1)),
                ..key_request("k", &[])
            },
            "expires_at",
        ),
        (
            CreateKey {
                metadata: meta(&[("big", "x".repeat(20_000).into())]),
                ..key_request("k", &[])
            },
            "metadata",
        ),
        (
            CreateKey {
                description: Some("d".repeat(2000)),
                ..key_request("k", &[])
            },
            "description",
        ),
        (
            CreateKey {
                description: Some("nul\0".into()),
                ..key_request("k", &[])
            },
            "description",
        ),
        (
            CreateKey {
                metadata: meta(&[("k", "nul\0".into())]),
                ..key_request("k", &[])
            },
            "metadata",
        ),
        (
            CreateKey {
                created_by: Some("a\0b".into()),
                ..key_request("k", &[])
            },
            "created_by",
        ),
    ];
    for (request, field) in cases {
        assert_eq!(field_of(engine.create_key(&tenant, request).await), field);
    }
    let too_many: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
    let request = CreateKey {
        scopes: too_many,
        ..key_request("k", &[])
    };
    assert_eq!(
        field_of(engine.create_key(&tenant, request).await),
        "scopes"
    );
    let bad_tenant = Tenant {
        app_id: String::new(),
        tenant_id: "t".into(),
    };
    assert_eq!(
        field_of(engine.create_key(&bad_tenant, key_request("k", &[])).await),
        "app_id"
    );
    // Custom prefix and environment make it into the raw key.
    let custom = CreateKey {
        prefix: Some("acme".into()),
        environment: Some("staging".parse().unwrap()),
        ..key_request("k", &[])
    };
    let created = engine.create_key(&tenant, custom).await.unwrap();
    assert!(created.raw_key.expose_secret().starts_with("acme_staging_"));
    assert_eq!(
        created.key.hint,
        created.raw_key.expose_secret()[created.raw_key.expose_secret().len() - 4..]
    );
    // Scope creation rules.
    let scope = |name: &str, parent: Option<&str>| CreateScope {
        name: name.into(),
        description: None,
        parent: parent.map(str::to_owned),
    };
    let s = engine
        .create_scope(&tenant, scope("read:users", None))
        .await
        .unwrap();
    assert_eq!(s.parent.as_deref(), Some("read"));
    assert!(
        engine
            .create_scope(&tenant, scope("read:users:x", Some("read")))
            .await
            .is_ok()
    );
    assert!(matches!(
        engine
            .create_scope(&tenant, scope("read:x", Some("write")))
            .await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        engine
            .create_scope(&tenant, scope("read:users", None))
            .await,
        Err(Error::AlreadyExists { .. })
    ));
    // Pages are bounded.
    let huge = KeyFilter {
        page: PageRequest {
            limit: 1001,
            offset: 0,
        },
        ..Default::default()
    };
    assert!(matches!(
        engine.list_keys(&tenant, &huge).await,
        Err(Error::InvalidInput { .. })
    ));
    let zero = KeyFilter {
        page: PageRequest {
            limit: 0,
            offset: 0,
        },
        ..Default::default()
    };
    assert!(matches!(
        engine.list_keys(&tenant, &zero).await,
        Err(Error::InvalidInput { .. })
    ));
}

pub async fn engine_concurrent_rotations_lose_no_secret(store: Arc<dyn Store>) {
    let (engine, _clock) = engine_on(store);
    let tenant = tenant();
    let created = engine
        .create_key(&tenant, key_request("hot", &[]))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let engine = engine.clone();
        let tenant = tenant.clone();
        let id = created.key.id;
        tasks.spawn(async move { engine.rotate_key(&tenant, &id, RotateKey::default()).await });
    }
    let mut secrets = vec![created.raw_key];
    while let Some(result) = tasks.join_next().await {
        secrets.push(result.expect("task").expect("rotation").raw_key);
    }
    let ctx = RequestContext::default();
    let mut current = 0;
    for raw in &secrets {
        let valid = engine
            .validate(raw.expose_secret(), &ctx)
            .await
            .expect("current or in grace");
        if valid.grace_ends.is_none() {
            current += 1;
        }
    }
    assert_eq!(current, 1, "exactly one current secret");
    assert_eq!(
        engine
            .list_rotations(&tenant, &created.key.id)
            .await
            .unwrap()
            .len(),
        50
    );
}

pub async fn engine_usage_is_checked_and_recorded(store: Arc<dyn Store>) {
    let (engine, _clock) = engine_on(store);
    let tenant = tenant();
    let key = engine
        .create_key(&tenant, key_request("k", &[]))
        .await
        .unwrap()
        .key;
    let theirs = engine
        .create_key(&tenant_other(&tenant), key_request("t", &[]))
        .await
        .unwrap()
        .key;
    let report = |key_id: KeyId, status: u16| NewUsage {
        key_id,
        endpoint: "/v1/orders".into(),
        method: "post".into(),
        status_code: status,
        ip: Some("::ffff:10.0.0.1".into()),
        user_agent: Some("sdk/1.0".into()),
        latency_ms: 12,
        metadata: Metadata::new(),
        created_at: None,
    };
    let n = engine
        .record_usage(&tenant, vec![report(key.id, 200), report(key.id, 503)])
        .await
        .unwrap();
    assert_eq!(n, 2);
    let listed = engine
        .list_usage(&tenant, &UsageFilter::default())
        .await
        .unwrap();
    assert_eq!(listed.total, 2);
    let first = &listed.items[0];
    assert_eq!((first.method.as_str(), first.created_at), ("POST", t0()));
    assert_eq!(first.ip.as_deref(), Some("::ffff:10.0.0.1"));
    // Listing deeper than the usage list goes is refused, naming the offset.
    let too_deep = UsageFilter {
        page: page(10, crate::engine::MAX_USAGE_OFFSET + 1),
        ..Default::default()
    };
    match engine.list_usage(&tenant, &too_deep).await {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "offset"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    // Another tenant's key, a bad status, too big a batch: refused, nothing kept.
    assert_not_found(
        engine
            .record_usage(&tenant, vec![report(theirs.id, 200)])
            .await,
        ResourceKind::Key,
    );
    let field_of = |result: crate::Result<usize>| match result {
        Err(Error::InvalidInput { field, .. }) => field,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    assert_eq!(
        field_of(
            engine
                .record_usage(&tenant, vec![report(key.id, 200), report(key.id, 42)])
                .await
        ),
        "records[1].status_code"
    );
    let mut bad_ip = report(key.id, 200);
    bad_ip.ip = Some("nope".into());
    assert_eq!(
        field_of(engine.record_usage(&tenant, vec![bad_ip]).await),
        "records[0].ip"
    );
    let many = (0..1001).map(|_| report(key.id, 200)).collect();
    assert_eq!(
        field_of(engine.record_usage(&tenant, many).await),
        "records"
    );
    assert_eq!(
        engine
            .list_usage(&tenant, &UsageFilter::default())
            .await
            .unwrap()
            .total,
        2
    );
    // Aggregates of another tenant's key do not exist for this one.
    assert_not_found(
        engine
            .usage_aggregates(&tenant, &theirs.id, UsagePeriod::Day, None, None)
            .await,
        ResourceKind::Key,
    );
    assert!(
        engine
            .usage_aggregates(&tenant, &key.id, UsagePeriod::Day, None, None)
            .await
            .unwrap()
            .is_empty()
    );
    let backwards = UsageFilter {
        after: Some(at(2)),
        before: Some(at(1)),
        ..Default::default()
    };
    assert!(matches!(
        engine.list_usage(&tenant, &backwards).await,
        Err(Error::InvalidInput { .. })
    ));
}

/// Rate limits and quotas, as a service runs them (the validation cache,
/// counts in process) and without either (counts in the store).
pub async fn engine_rate_limits_and_quotas(store: Arc<dyn Store>) {
    for cached in [false, true] {
        rate_limits_and_quotas(store.clone(), cached).await;
    }
}

async fn rate_limits_and_quotas(store: Arc<dyn Store>, cached: bool) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let clock = Arc::new(ManualClock::new(t0() + chrono::Duration::hours(23)));
    let mut builder = Engine::builder(store)
        .clock(clock.clone())
        .hook(Arc::new(Recorder {
            label: "h",
            fail: false,
            log: log.clone(),
        }));
    if cached {
        builder = builder
            .cache(crate::cache::CacheOptions::default())
            .local_quota_counts();
    }
    let engine = builder.build();
    let tenant = tenant();
    let limited = engine
        .create_policy(
            &tenant,
            PolicySpec {
                rate_limit: Some(2),
                rate_limit_window: Some(Duration::from_secs(3600)),
                ..policy_spec("rl")
            },
        )
        .await
        .unwrap();
    let quota = engine
        .create_policy(
            &tenant,
            PolicySpec {
                daily_quota: Some(3),
                monthly_quota: Some(100),
                ..policy_spec("q")
            },
        )
        .await
        .unwrap();
    let ctx = RequestContext::default();
    let rl_key = engine
        .create_key(
            &tenant,
            CreateKey {
                policy_id: Some(limited.id),
                ..key_request("rl", &[])
            },
        )
        .await
        .unwrap();
    let raw = rl_key.raw_key.expose_secret();
    let first = engine.validate(raw, &ctx).await.unwrap();
    let state = first.rate_limit.expect("rate limit state is reported");
    assert_eq!((state.limit, state.remaining), (2, 1));
    engine.validate(raw, &ctx).await.unwrap();
    match engine.validate(raw, &ctx).await {
        Err(Error::RateLimited { retry_after, state }) => {
            assert!(retry_after >= Duration::from_secs(1));
            assert_eq!((state.allowed, state.remaining), (false, 0));
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }

    let q_key = engine
        .create_key(
            &tenant,
            CreateKey {
                policy_id: Some(quota.id),
                ..key_request("q", &[])
            },
        )
        .await
        .unwrap();
    let raw = q_key.raw_key.expose_secret();
    for used in 1..=3 {
        let valid = engine.validate(raw, &ctx).await.unwrap();
        assert_eq!(valid.quota[0].used, used);
        assert_eq!(valid.quota[0].remaining, 3 - used);
        assert_eq!(valid.quota[1].used, used, "the month counts too");
    }
    match engine.validate(raw, &ctx).await {
        Err(Error::QuotaExceeded { resets_at }) => {
            assert_eq!(resets_at, at(1), "resets at UTC midnight")
        }
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    // Past midnight a new day starts; the month keeps counting.
    clock.set(at(1));
    let valid = engine.validate(raw, &ctx).await.unwrap();
    assert_eq!((valid.quota[0].used, valid.quota[1].used), (1, 4));
    // A cost is charged as a whole.
    let costly = RequestContext {
        cost: 3,
        ..Default::default()
    };
    assert!(matches!(
        engine.validate(raw, &costly).await,
        Err(Error::QuotaExceeded { .. })
    ));
    let two = RequestContext {
        cost: 2,
        ..Default::default()
    };
    assert_eq!(engine.validate(raw, &two).await.unwrap().quota[0].used, 3);
    let fired = log.lock().unwrap().clone();
    assert_eq!(
        fired
            .iter()
            .filter(|e| *e == "h:validation_failed(rate_limited)")
            .count(),
        0
    );
    let count = |event: &str| fired.iter().filter(|e| *e == event).count();
    assert_eq!(
        (count("h:rate_limited"), count("h:quota_exceeded")),
        (1, 2),
        "each refusal by a limit fires its hook once (cached: {cached})"
    );
    assert!(fired.iter().any(|e| e.starts_with("h:validated")));
}

/// During a rotation's grace period the old and the new secret are one key:
/// they draw from one rate-limit bucket and one quota. Checked with the
/// validation cache and quotas counted in process, and with neither.
pub async fn engine_rotated_secrets_share_one_bucket(store: Arc<dyn Store>) {
    let tenant = tenant();
    for cached in [true, false] {
        let clock = Arc::new(ManualClock::new(t0() + chrono::Duration::hours(1)));
        let mut builder = Engine::builder(store.clone()).clock(clock.clone());
        if cached {
            builder = builder
                .cache(crate::cache::CacheOptions::default())
                .local_quota_counts();
        }
        let engine = builder.build();
        let policy = engine
            .create_policy(
                &tenant,
                PolicySpec {
                    // 4 per hour (a request's worth back every 15 minutes),
                    // bursts of 4; 5 a day.
                    rate_limit: Some(4),
                    rate_limit_window: Some(Duration::from_secs(3600)),
                    daily_quota: Some(5),
                    ..policy_spec(&format!("shared-{cached}"))
                },
            )
            .await
            .unwrap();
        let created = engine
            .create_key(
                &tenant,
                CreateKey {
                    policy_id: Some(policy.id),
                    ..key_request("rotated", &[])
                },
            )
            .await
            .unwrap();
        let old = created.raw_key.expose_secret().to_owned();
        let ctx = RequestContext::default();
        let used = |v: &crate::engine::Validation| {
            let rate = v.rate_limit.expect("rate limit state");
            (rate.remaining, v.quota[0].used)
        };
        assert_eq!(used(&engine.validate(&old, &ctx).await.unwrap()), (3, 1));
        assert_eq!(used(&engine.validate(&old, &ctx).await.unwrap()), (2, 2));
        let rotated = engine
            .rotate_key(
                &tenant,
                &created.key.id,
                RotateKey {
                    grace_period: Some(Duration::from_secs(3600)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let new = rotated.raw_key.expose_secret().to_owned();
        let context = format!("cached: {cached}");
        assert_eq!(
            used(&engine.validate(&new, &ctx).await.unwrap()),
            (1, 3),
            "{context}"
        );
        assert_eq!(
            used(&engine.validate(&old, &ctx).await.unwrap()),
            (0, 4),
            "the old secret, in grace, draws from the same bucket: {context}"
        );
        assert!(
            matches!(
                engine.validate(&new, &ctx).await,
                Err(Error::RateLimited { .. })
            ),
            "4 taken through both secrets: {context}"
        );
        clock.advance(Duration::from_secs(15 * 60));
        assert_eq!(
            used(&engine.validate(&old, &ctx).await.unwrap()),
            (0, 5),
            "{context}"
        );
        clock.advance(Duration::from_secs(15 * 60));
        assert!(
            matches!(
                engine.validate(&new, &ctx).await,
                Err(Error::QuotaExceeded { .. })
            ),
            "5 counted through both secrets: {context}"
        );
    }
}

pub async fn engine_quota_is_exact_under_concurrency(store: Arc<dyn Store>) {
    let (engine, _clock) = engine_on(store);
    let tenant = tenant();
    let policy = engine
        .create_policy(
            &tenant,
            PolicySpec {
                daily_quota: Some(100),
                ..policy_spec("q")
            },
        )
        .await
        .unwrap();
    let created = engine
        .create_key(
            &tenant,
            CreateKey {
                policy_id: Some(policy.id),
                ..key_request("hot", &[])
            },
        )
        .await
        .unwrap();
    let raw: Arc<str> = created.raw_key.expose_secret().into();
    let outcome = validate_concurrently(&engine, &raw, 500).await;
    assert_eq!(outcome, (100, 400), "exactly the quota");
}

/// Validates `raw` `n` times at once: (allowed, refused by a quota); any
/// other outcome fails the test.
async fn validate_concurrently(engine: &Engine, raw: &Arc<str>, n: usize) -> (usize, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let engine = engine.clone();
        let raw = raw.clone();
        tasks.spawn(async move { engine.validate(&raw, &RequestContext::default()).await });
    }
    let (mut allowed, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            Ok(_) => allowed += 1,
            Err(Error::QuotaExceeded { .. }) => refused += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    (allowed, refused)
}

/// Quotas counted in process (`EngineBuilder::local_quota_counts`): exact
/// under concurrency, next to a rate limit or alone; written to the store only
/// by a flush; loaded from it by a new engine (a restart); a crash loses what
/// was counted since the last flush and nothing before; days roll over.
pub async fn engine_local_quota_counts_are_exact_and_written_behind(store: Arc<dyn Store>) {
    // Without the validation cache, and with it (each key's record then
    // held by its cache entry).
    for cached in [false, true] {
        local_quota_counts_on(store.clone(), cached).await;
    }
}

async fn local_quota_counts_on(store: Arc<dyn Store>, cached: bool) {
    let clock = Arc::new(ManualClock::new(t0() + chrono::Duration::hours(23)));
    let node = || {
        let builder = Engine::builder(store.clone())
            .clock(clock.clone())
            .local_quota_counts();
        if cached {
            builder.cache(crate::cache::CacheOptions::default())
        } else {
            builder
        }
        .build()
    };
    let engine = node();
    let tenant = tenant();
    let mut policies = Vec::new();
    for (name, rate_limit) in [("rate-and-quotas", Some(1_000_000)), ("quotas", None)] {
        let spec = PolicySpec {
            rate_limit,
            daily_quota: Some(100),
            monthly_quota: Some(1000),
            ..policy_spec(name)
        };
        policies.push(engine.create_policy(&tenant, spec).await.unwrap());
    }
    let stored = |key: KeyId, days: i64| {
        let store = store.clone();
        async move {
            let windows = QuotaSpec {
                daily: Some(u64::MAX),
                monthly: Some(u64::MAX),
            }
            .windows(at(days));
            let counts = store.consume_quota(&key, &windows, 0).await.unwrap();
            (counts.windows[0].used, counts.windows[1].used)
        }
    };
    let mut keys = Vec::new();
    for policy in &policies {
        let created = engine
            .create_key(
                &tenant,
                CreateKey {
                    policy_id: Some(policy.id),
                    ..key_request(&policy.spec.name, &[])
                },
            )
            .await
            .unwrap();
        let raw: Arc<str> = created.raw_key.expose_secret().into();
        assert_eq!(
            validate_concurrently(&engine, &raw, 500).await,
            (100, 400),
            "{}: exactly the quota (cached: {cached})",
            policy.spec.name
        );
        assert_eq!(stored(created.key.id, 0).await, (0, 0), "not written yet");
        keys.push((created.key.id, raw));
    }
    assert_eq!(
        engine.flush_quota_counts().await.unwrap(),
        4,
        "two windows per key"
    );
    assert_eq!(engine.flush_quota_counts().await.unwrap(), 0, "nothing new");
    for (key, _) in &keys {
        assert_eq!(stored(*key, 0).await, (100, 100));
    }
    let ctx = RequestContext::default();
    // A restart: a new engine loads the counts.
    let (key, raw) = keys[0].clone();
    let restarted = node();
    assert_denied(restarted.validate(&raw, &ctx).await, "quota_exceeded");
    // Past midnight a new day starts; the month keeps counting.
    clock.set(at(1));
    let valid = restarted.validate(&raw, &ctx).await.unwrap();
    assert_eq!((valid.quota[0].used, valid.quota[1].used), (1, 101));
    restarted.flush_quota_counts().await.unwrap();
    assert_eq!(
        stored(key, 0).await,
        (100, 101),
        "yesterday kept, month counted"
    );
    assert_eq!(stored(key, 1).await, (1, 101));
    // A crash loses what was counted since the last flush, nothing before.
    for _ in 0..3 {
        restarted.validate(&raw, &ctx).await.unwrap();
    }
    drop(restarted);
    let after_crash = node();
    let valid = after_crash.validate(&raw, &ctx).await.unwrap();
    assert_eq!((valid.quota[0].used, valid.quota[1].used), (2, 102));
    // Shutting down flushes.
    after_crash.shutdown().await;
    assert_eq!(stored(key, 1).await, (2, 102));
}

/// With the validation cache, a key's limits record is held by its cache
/// entry: it outlives the entry (dropped by a change to the key, or to make
/// room), and a flush writes what it counted.
pub async fn engine_cached_limits_records_outlive_their_entries(store: Arc<dyn Store>) {
    let clock = Arc::new(ManualClock::new(t0() + chrono::Duration::hours(1)));
    let engine = Engine::builder(store.clone())
        .clock(clock.clone())
        // One entry per shard: other keys push this one out.
        .cache(crate::cache::CacheOptions {
            capacity: 16,
            ..Default::default()
        })
        .local_quota_counts()
        .build();
    let tenant = tenant();
    let policy = engine
        .create_policy(
            &tenant,
            PolicySpec {
                // 3 per hour (one back every 20 minutes), 5 a day.
                rate_limit: Some(3),
                rate_limit_window: Some(Duration::from_secs(3600)),
                daily_quota: Some(5),
                ..policy_spec("held")
            },
        )
        .await
        .unwrap();
    let request = |name: &str| CreateKey {
        policy_id: Some(policy.id),
        ..key_request(name, &[])
    };
    let created = engine.create_key(&tenant, request("held")).await.unwrap();
    let raw = created.raw_key.expose_secret().to_owned();
    let ctx = RequestContext::default();
    let state = |v: crate::engine::Validation| (v.rate_limit.unwrap().remaining, v.quota[0].used);
    assert_eq!(state(engine.validate(&raw, &ctx).await.unwrap()), (2, 1));
    assert_eq!(state(engine.validate(&raw, &ctx).await.unwrap()), (1, 2));
    // A change to the key drops its entry.
    engine
        .update_key(
            &tenant,
            &created.key.id,
            KeyUpdate {
                name: Some("renamed".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        state(engine.validate(&raw, &ctx).await.unwrap()),
        (0, 3),
        "the bucket and the count outlive an invalidated entry"
    );
    // Other keys' entries push this one out.
    for i in 0..64 {
        let other = engine
            .create_key(&tenant, request(&format!("other-{i}")))
            .await
            .unwrap();
        engine
            .validate(other.raw_key.expose_secret(), &ctx)
            .await
            .unwrap();
    }
    assert_denied(engine.validate(&raw, &ctx).await, "rate_limited");
    clock.advance(Duration::from_secs(20 * 60));
    assert_eq!(
        state(engine.validate(&raw, &ctx).await.unwrap()),
        (0, 4),
        "the bucket and the count outlive an evicted entry"
    );
    engine.flush_quota_counts().await.unwrap();
    let windows = QuotaSpec {
        daily: Some(u64::MAX),
        monthly: None,
    }
    .windows(crate::clock::Clock::now(&*clock));
    let stored = store
        .consume_quota(&created.key.id, &windows, 0)
        .await
        .unwrap();
    assert_eq!(
        stored.windows[0].used, 4,
        "a flush writes what entries held"
    );
}

pub async fn engine_usage_aggregates_match_brute_force(store: Arc<dyn Store>) {
    let (engine, _clock) = engine_on(store.clone());
    let tenant = tenant();
    let a = engine
        .create_key(&tenant, key_request("a", &[]))
        .await
        .unwrap()
        .key;
    let b = engine
        .create_key(&tenant, key_request("b", &[]))
        .await
        .unwrap()
        .key;
    // Deterministic pseudo-random latencies and statuses over two days.
    let mut seed = 42u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    let mut records = Vec::new();
    for i in 0..2500 {
        let key = if i % 3 == 0 { b.id } else { a.id };
        let status = if next() % 10 == 0 { 500 } else { 200 };
        let minutes = (next() % (2 * 24 * 60)) as i64;
        records.push(usage(&tenant, key, minutes, status, next() % 1000));
    }
    for chunk in records.chunks(1000) {
        store.insert_usage(chunk).await.unwrap();
    }
    let brute = |key: KeyId, from: DateTime<Utc>, to: DateTime<Utc>| {
        let mut latencies: Vec<u64> = records
            .iter()
            .filter(|r| r.key_id == key && r.created_at >= from && r.created_at < to)
            .map(|r| r.latency_ms)
            .collect();
        latencies.sort();
        let n = latencies.len();
        let rank = |p: usize| latencies[((p * n).div_ceil(100)).max(1) - 1];
        let errors = records
            .iter()
            .filter(|r| {
                r.key_id == key && r.created_at >= from && r.created_at < to && r.status_code >= 400
            })
            .count() as u64;
        (
            n as u64,
            errors,
            latencies.iter().sum::<u64>(),
            rank(50),
            rank(99),
        )
    };
    for _ in 0..2 {
        assert_eq!(
            engine
                .aggregate_usage(UsagePeriod::Day, at(0))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            engine
                .aggregate_usage(UsagePeriod::Day, at(1))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            engine
                .aggregate_usage(UsagePeriod::Month, at(1))
                .await
                .unwrap(),
            2
        );
    }
    for key in [a.id, b.id] {
        let days = engine
            .usage_aggregates(&tenant, &key, UsagePeriod::Day, None, None)
            .await
            .unwrap();
        assert_eq!(days.len(), 2, "recomputing never duplicates");
        for (day, row) in days.iter().enumerate() {
            assert_eq!(row.period_start, at(day as i64));
            let expected = brute(key, at(day as i64), at(day as i64 + 1));
            let got = (
                row.request_count,
                row.error_count,
                row.total_latency_ms,
                row.p50_latency_ms,
                row.p99_latency_ms,
            );
            assert_eq!(got, expected, "day {day}");
        }
        let month = engine
            .usage_aggregates(&tenant, &key, UsagePeriod::Month, None, None)
            .await
            .unwrap();
        let expected = brute(key, t0(), "2030-02-01T00:00:00Z".parse().unwrap());
        let row = &month[0];
        assert_eq!(
            (
                row.request_count,
                row.error_count,
                row.total_latency_ms,
                row.p50_latency_ms,
                row.p99_latency_ms
            ),
            expected
        );
    }
}

pub async fn engine_last_used_is_written_behind_and_coalesced(store: Arc<dyn Store>) {
    let (engine, clock) = engine_on(store.clone());
    let tenant = tenant();
    let created = engine
        .create_key(&tenant, key_request("k", &[]))
        .await
        .unwrap();
    let other = engine
        .create_key(&tenant, key_request("o", &[]))
        .await
        .unwrap();
    let raw = created.raw_key.expose_secret();
    for _ in 0..50 {
        clock.advance(Duration::from_secs(1));
        engine
            .validate(raw, &RequestContext::default())
            .await
            .unwrap();
    }
    let key = engine.get_key(&tenant, &created.key.id).await.unwrap();
    assert_eq!(key.last_used_at, None, "no store write on the request path");
    assert_eq!(
        engine.flush_last_used().await.unwrap(),
        1,
        "one write for fifty uses"
    );
    let key = engine.get_key(&tenant, &created.key.id).await.unwrap();
    assert_eq!(key.last_used_at, Some(t0() + chrono::Duration::seconds(50)));
    assert_eq!(
        engine
            .get_key(&tenant, &other.key.id)
            .await
            .unwrap()
            .last_used_at,
        None
    );
    assert_eq!(engine.flush_last_used().await.unwrap(), 0);
    // Within the interval a used key is not noted again; after it, it is.
    clock.advance(Duration::from_secs(30));
    engine
        .validate(raw, &RequestContext::default())
        .await
        .unwrap();
    assert_eq!(
        engine.flush_last_used().await.unwrap(),
        0,
        "at most one write per minute"
    );
    clock.advance(Duration::from_secs(31));
    engine
        .validate(raw, &RequestContext::default())
        .await
        .unwrap();
    assert_eq!(engine.flush_last_used().await.unwrap(), 1);
    let latest = t0() + chrono::Duration::seconds(111);
    assert_eq!(
        engine
            .get_key(&tenant, &created.key.id)
            .await
            .unwrap()
            .last_used_at,
        Some(latest)
    );
    // Never backwards.
    store
        .touch_last_used(&[(created.key.id, t0())])
        .await
        .unwrap();
    assert_eq!(
        engine
            .get_key(&tenant, &created.key.id)
            .await
            .unwrap()
            .last_used_at,
        Some(latest)
    );
    // A deleted key is skipped.
    engine
        .validate(other.raw_key.expose_secret(), &RequestContext::default())
        .await
        .unwrap();
    engine.delete_key(&tenant, &other.key.id).await.unwrap();
    engine
        .flush_last_used()
        .await
        .expect("a deleted key does not fail the flush");
}

// ---------------------------------------------------- rotation due, search

fn micros(n: i64) -> chrono::Duration {
    chrono::Duration::microseconds(n)
}

fn rotation_policy(name: &str, days: u64) -> PolicySpec {
    PolicySpec {
        rotation_period: Some(Duration::from_secs(days * 86_400)),
        ..policy_spec(name)
    }
}

/// The names of the tenant's keys due for rotation at `now`, sorted, and the
/// total the list reported.
async fn due_names(store: &dyn Store, tenant: &Tenant, now: DateTime<Utc>) -> (u64, Vec<String>) {
    let filter = KeyFilter {
        rotation_due: true,
        now: Some(now),
        ..Default::default()
    };
    let page = store.list_keys(tenant, &filter).await.unwrap();
    let mut names: Vec<String> = page.items.into_iter().map(|k| k.name).collect();
    names.sort();
    (page.total, names)
}

fn claimed(due: &[crate::model::RotationDue]) -> Vec<(String, DateTime<Utc>)> {
    due.iter().map(|d| (d.key.name.clone(), d.due_at)).collect()
}

pub async fn rotation_due_filter_at_the_boundary(store: &dyn Store) {
    let tenant = tenant();
    let monthly = stored_policy(store, &tenant, rotation_policy("monthly", 30)).await;
    let plain = stored_policy(store, &tenant, policy_spec("no-rotation")).await;
    let under = |name: &str, policy: Option<PolicyId>| {
        let (_, mut key) = new_key(&tenant, name);
        key.policy_id = policy;
        key
    };
    let due = under("due", Some(monthly.id));
    let rotated = under("rotated", Some(monthly.id));
    let mut expiring = under("expiring", Some(monthly.id));
    expiring.expires_at = Some(at(30));
    let suspended = under("suspended", Some(monthly.id));
    let revoked = under("revoked", Some(monthly.id));
    for key in [
        &due,
        &rotated,
        &expiring,
        &suspended,
        &revoked,
        &under("no-rotation-period", Some(plain.id)),
        &under("no-policy", None),
    ] {
        store.create_key(key).await.unwrap();
    }
    store
        .transition_key(&tenant, &suspended.id, KeyAction::Suspend, at(1))
        .await
        .unwrap();
    store
        .transition_key(&tenant, &revoked.id, KeyAction::Revoke, at(1))
        .await
        .unwrap();
    let other = tenant_other(&tenant);
    let other_policy = stored_policy(store, &other, rotation_policy("monthly", 30)).await;
    let (_, mut foreign) = new_key(&other, "foreign");
    foreign.policy_id = Some(other_policy.id);
    store.create_key(&foreign).await.unwrap();

    assert_eq!(
        due_names(store, &tenant, at(30) - micros(1)).await,
        (0, vec![]),
        "one microsecond before the period ends, nothing is due"
    );
    assert_eq!(
        due_names(store, &tenant, at(30)).await,
        (2, vec!["due".to_owned(), "rotated".to_owned()]),
        "due at the instant the period ends; never suspended, revoked, expired, \
         policy-less, period-less or another tenant's keys"
    );
    assert_eq!(due_names(store, &other, at(30)).await.1, ["foreign"]);

    // A rotation starts a new period.
    let (_, rotation) = new_rotation(Duration::ZERO);
    store
        .rotate_key(&tenant, &rotated.id, &rotation, at(31))
        .await
        .unwrap();
    assert_eq!(due_names(store, &tenant, at(31)).await.1, ["due"]);
    assert_eq!(
        due_names(store, &tenant, at(61) - micros(1)).await.1,
        ["due"]
    );
    assert_eq!(
        due_names(store, &tenant, at(61)).await.1,
        ["due", "rotated"]
    );
    // Reactivated, the suspended key is due again; other filters combine.
    store
        .transition_key(&tenant, &suspended.id, KeyAction::Reactivate, at(2))
        .await
        .unwrap();
    assert_eq!(
        due_names(store, &tenant, at(61)).await.1,
        ["due", "rotated", "suspended"]
    );
    let combined = store
        .list_keys(
            &tenant,
            &KeyFilter {
                rotation_due: true,
                now: Some(at(61)),
                search: Some("ROT".into()),
                page: page(1, 0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(combined.total, 1);
    assert_eq!(combined.items[0].id, rotated.id);

    // The store judges at the instant it is given, never its own clock.
    let unset = KeyFilter {
        rotation_due: true,
        ..Default::default()
    };
    match store.list_keys(&tenant, &unset).await {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "now"),
        other => panic!("expected InvalidInput(now), got {other:?}"),
    }
}

pub async fn claim_rotation_due_once_per_period(store: &dyn Store) {
    let tenant = tenant();
    let monthly = stored_policy(store, &tenant, rotation_policy("monthly", 30)).await;
    let mut keys = Vec::new();
    for (name, created) in [("a", 0), ("b", 1), ("c", 2)] {
        let (_, mut key) = new_key(&tenant, name);
        key.policy_id = Some(monthly.id);
        key.created_at = at(created);
        key.updated_at = at(created);
        store.create_key(&key).await.unwrap();
        keys.push(key);
    }
    let (_, plain) = stored_key(store, &tenant, "no-policy").await;
    // Another tenant's key is swept too: the sweep serves every tenant.
    let other = tenant_other(&tenant);
    let other_policy = stored_policy(store, &other, rotation_policy("weekly", 7)).await;
    let (_, mut foreign) = new_key(&other, "foreign");
    foreign.policy_id = Some(other_policy.id);
    store.create_key(&foreign).await.unwrap();

    assert!(
        store
            .claim_rotation_due(at(7) - micros(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        claimed(&store.claim_rotation_due(at(7), 10).await.unwrap()),
        [("foreign".to_owned(), at(7))]
    );
    assert!(
        store
            .claim_rotation_due(at(13), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // (Gone, it would otherwise have a notice every further week.)
    store.delete_key(&other, &foreign.id).await.unwrap();

    // The cap, earliest due first, and each key once in its period.
    let first = store.claim_rotation_due(at(32), 2).await.unwrap();
    assert_eq!(
        claimed(&first),
        [("a".to_owned(), at(30)), ("b".to_owned(), at(31))]
    );
    assert_eq!(first[0].key.id, keys[0].id);
    assert_eq!(first[0].key.policy_id, Some(monthly.id));
    assert_eq!(
        claimed(&store.claim_rotation_due(at(32), 2).await.unwrap()),
        [("c".to_owned(), at(32))]
    );
    assert!(
        store
            .claim_rotation_due(at(32), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .claim_rotation_due(at(59) + micros(999_999), 10)
            .await
            .unwrap()
            .is_empty(),
        "claimed for this period, until the next one starts"
    );
    // Still listed as due: the claim only records the notice.
    assert_eq!(due_names(store, &tenant, at(40)).await.0, 3);

    // Rotating restarts the period and clears the claim.
    let (_, rotation) = new_rotation(Duration::ZERO);
    store
        .rotate_key(&tenant, &keys[1].id, &rotation, at(45))
        .await
        .unwrap();
    // Left unrotated, a key gets one notice per further period.
    assert_eq!(
        claimed(&store.claim_rotation_due(at(60), 10).await.unwrap()),
        [("a".to_owned(), at(60))]
    );
    assert!(
        store
            .claim_rotation_due(at(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let next = store.claim_rotation_due(at(75), 10).await.unwrap();
    assert_eq!(
        claimed(&next),
        [("c".to_owned(), at(62)), ("b".to_owned(), at(75))],
        "the rotated key is due one period after its rotation"
    );
    assert_eq!(next[1].key.rotated_at, Some(at(45)));
    // A suspended key is not claimed; reactivated, it is.
    store
        .transition_key(&tenant, &keys[0].id, KeyAction::Suspend, at(80))
        .await
        .unwrap();
    assert!(
        !claimed(&store.claim_rotation_due(at(95), 10).await.unwrap())
            .iter()
            .any(|(name, _)| name == "a")
    );
    store
        .transition_key(&tenant, &keys[0].id, KeyAction::Reactivate, at(96))
        .await
        .unwrap();
    assert_eq!(
        claimed(&store.claim_rotation_due(at(96), 10).await.unwrap()),
        [("a".to_owned(), at(90))]
    );
    // Deleting a key deletes its claim with it; nothing else was touched.
    store.delete_key(&tenant, &keys[0].id).await.unwrap();
    assert_eq!(
        store.get_key(&tenant, &plain.id).await.unwrap().state,
        KeyState::Active
    );
}

pub async fn list_keys_search_name_or_hint(store: &dyn Store) {
    let tenant = tenant();
    let names = [
        "Billing-Service",
        "billing_api",
        "100%-done",
        "under_score",
        "back\\slash",
        "plain",
    ];
    for (i, name) in names.iter().enumerate() {
        let (_, mut key) = new_key(&tenant, name);
        key.hint = format!("zzq{i}");
        if *name == "plain" {
            key.hint = "f00d".into();
        }
        store.create_key(&key).await.unwrap();
    }
    let (_, mut foreign) = new_key(&tenant_other(&tenant), "billing-elsewhere");
    foreign.hint = "f00d".into();
    store.create_key(&foreign).await.unwrap();

    let search = |text: &str| {
        let tenant = tenant.clone();
        let filter = KeyFilter {
            search: Some(text.to_owned()),
            ..Default::default()
        };
        async move {
            let page = store.list_keys(&tenant, &filter).await.unwrap();
            let mut found: Vec<String> = page.items.into_iter().map(|k| k.name).collect();
            found.sort();
            assert_eq!(page.total, found.len() as u64);
            found
        }
    };
    assert_eq!(
        search("BILLING").await,
        ["Billing-Service", "billing_api"],
        "case is ignored; another tenant's keys never show"
    );
    assert_eq!(
        search("_").await,
        ["billing_api", "under_score"],
        "_ is literal"
    );
    assert_eq!(search("%").await, ["100%-done"], "% is literal");
    assert_eq!(search("\\").await, ["back\\slash"], "\\ is literal");
    assert_eq!(search("l_a").await, Vec::<String>::new());
    assert_eq!(search("F00D").await, ["plain"], "the hint matches");
    assert_eq!(search("00").await, ["100%-done", "plain"], "name or hint");
    assert_eq!(search("ZZQ").await.len(), 5);
    assert_eq!(search("").await.len(), 6, "empty text matches every key");
    assert!(search("nothing-like-it").await.is_empty());
    let active_billing = store
        .list_keys(
            &tenant,
            &KeyFilter {
                search: Some("billing".into()),
                state: Some(KeyState::Active),
                page: page(1, 1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((active_billing.total, active_billing.items.len()), (2, 1));
}

pub async fn engine_rotation_due_fires_once_per_period(store: Arc<dyn Store>) {
    let (engine, log, sink, clock) = recorded_engine(store);
    let tenant = tenant();
    let policy = engine
        .create_policy(&tenant, rotation_policy("monthly", 30))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for name in ["k1", "k2"] {
        let request = CreateKey {
            policy_id: Some(policy.id),
            ..key_request(name, &[])
        };
        ids.push(engine.create_key(&tenant, request).await.unwrap().key.id);
    }
    engine
        .create_key(&tenant, key_request("no-policy", &[]))
        .await
        .unwrap();
    log.lock().unwrap().clear();
    let due_now = |engine: Engine| {
        let tenant = tenant.clone();
        async move {
            let filter = KeyFilter {
                rotation_due: true,
                ..Default::default()
            };
            let page = engine.list_keys(&tenant, &filter).await.unwrap();
            let mut names: Vec<String> = page.items.into_iter().map(|k| k.name).collect();
            names.sort();
            names
        }
    };
    let fired = |log: &Mutex<Vec<String>>| {
        let mut fired = std::mem::take(&mut *log.lock().unwrap());
        fired.sort();
        fired
    };

    clock.set(at(30) - micros(1));
    assert_eq!(engine.notify_rotation_due(100).await.unwrap(), 0);
    assert!(due_now(engine.clone()).await.is_empty());
    clock.set(at(30));
    assert_eq!(due_now(engine.clone()).await, ["k1", "k2"]);
    assert_eq!(engine.notify_rotation_due(1).await.unwrap(), 1, "the cap");
    assert_eq!(engine.notify_rotation_due(100).await.unwrap(), 1);
    assert_eq!(engine.notify_rotation_due(100).await.unwrap(), 0);
    let due = at(30).to_rfc3339();
    assert_eq!(
        fired(&log),
        [
            format!("a:rotation_due(k1@{due})"),
            format!("a:rotation_due(k2@{due})"),
            format!("b:rotation_due(k1@{due})"),
            format!("b:rotation_due(k2@{due})"),
        ],
        "every key and every hook, though hook `a` fails each time"
    );

    clock.set(at(40));
    engine
        .rotate_key(&tenant, &ids[0], RotateKey::default())
        .await
        .unwrap();
    log.lock().unwrap().clear();
    assert_eq!(due_now(engine.clone()).await, ["k2"]);
    clock.set(at(60));
    assert_eq!(engine.notify_rotation_due(100).await.unwrap(), 1);
    let due = at(60).to_rfc3339();
    assert_eq!(
        fired(&log),
        [
            format!("a:rotation_due(k2@{due})"),
            format!("b:rotation_due(k2@{due})")
        ]
    );
    clock.set(at(70));
    assert_eq!(engine.notify_rotation_due(100).await.unwrap(), 1);
    assert_eq!(engine.notify_rotation_due(100).await.unwrap(), 0);
    let due = at(70).to_rfc3339();
    assert_eq!(
        fired(&log),
        [
            format!("a:rotation_due(k1@{due})"),
            format!("b:rotation_due(k1@{due})")
        ],
        "the rotated key fires again one period after its rotation"
    );
    let notices: Vec<_> = sink
        .events()
        .into_iter()
        .filter(|e| e.action == "keysmith.key.rotation_due")
        .collect();
    assert_eq!(notices.len(), 4);
    assert_eq!(notices[3].resource_id, Some(ids[0].to_string()));
    assert_eq!(
        notices[3].tenant_id.as_deref(),
        Some(tenant.tenant_id.as_str())
    );
    assert_eq!(notices[3].occurred_at, at(70));

    // Searches are checked before any store access.
    for (text, field) in [("x".repeat(101), "search"), ("a\0b".into(), "search")] {
        let filter = KeyFilter {
            search: Some(text),
            ..Default::default()
        };
        match engine.list_keys(&tenant, &filter).await {
            Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidInput({field}), got {other:?}"),
        }
    }
    let longest = KeyFilter {
        search: Some("é".repeat(100)),
        ..Default::default()
    };
    assert_eq!(engine.list_keys(&tenant, &longest).await.unwrap().total, 0);
}

/// Several sweepers (nodes) claiming at once: every due key is claimed by
/// exactly one of them.
pub async fn concurrent_rotation_due_claims_are_disjoint(store: Arc<dyn Store>) {
    let tenant = tenant();
    let policy = stored_policy(&*store, &tenant, rotation_policy("monthly", 30)).await;
    let mut due = HashSet::new();
    for i in 0..40 {
        let (_, mut key) = new_key(&tenant, &format!("k{i}"));
        key.policy_id = Some(policy.id);
        store.create_key(&key).await.unwrap();
        due.insert(key.id);
    }
    let sweepers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = store.claim_rotation_due(at(30), 3).await.unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch.into_iter().map(|d| d.key.id));
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for sweeper in sweepers {
        claimed.extend(sweeper.await.unwrap());
    }
    let unique: HashSet<KeyId> = claimed.iter().copied().collect();
    assert_eq!(unique.len(), claimed.len(), "no key claimed twice");
    assert_eq!(unique, due, "every due key claimed");
}
