//! The validation cache: hot keys served without the store, unknown hashes
//! remembered briefly, every mutation through an engine invalidating at once,
//! and changes carried between engines by a change feed (here an in-process
//! one; `tests/postgres.rs` and the server's two-node test use PostgreSQL's).
//! Time is a `ManualClock`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keysmith::cache::{CacheOptions, ChangeFeed, Invalidation};
use keysmith::{
    ApiKey, Clock, CreateKey, Engine, Error, KeyAction, KeyState, ManualClock, MemoryStore,
    PolicySpec, RawKey, RequestContext, RotateKey, Store, Tenant,
};
use tokio::sync::{broadcast, mpsc, watch};

const TTL: Duration = Duration::from_secs(10);
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
const DEGRADED_TTL: Duration = Duration::from_secs(1);

fn options() -> CacheOptions {
    CacheOptions {
        capacity: 10_000,
        ttl: TTL,
        negative_ttl: NEGATIVE_TTL,
        degraded_ttl: DEGRADED_TTL,
    }
}

fn tenant() -> Tenant {
    Tenant::new("app", "t").unwrap()
}

struct Setup {
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    engine: Engine,
}

fn setup() -> Setup {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new("2030-01-01T00:00:00Z".parse().unwrap()));
    let engine = Engine::builder(store.clone())
        .clock(clock.clone())
        .cache(options())
        .build();
    Setup {
        store,
        clock,
        engine,
    }
}

async fn key(engine: &Engine, scopes: &[&str]) -> (ApiKey, String) {
    let created = engine
        .create_key(
            &tenant(),
            CreateKey {
                name: "k".into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    (created.key, created.raw_key.expose_secret().to_owned())
}

async fn check(engine: &Engine, raw: &str) -> Result<(), String> {
    check_with(engine, raw, &RequestContext::default()).await
}

async fn check_with(engine: &Engine, raw: &str, ctx: &RequestContext) -> Result<(), String> {
    engine
        .validate(raw, ctx)
        .await
        .map(|_| ())
        .map_err(|e| e.code().to_owned())
}

fn advance(clock: &ManualClock, by: Duration) {
    clock.advance(by);
}

#[tokio::test]
async fn hot_keys_come_from_the_cache_until_the_ttl() {
    let s = setup();
    let (k, raw) = key(&s.engine, &[]).await;
    assert_eq!(check(&s.engine, &raw).await, Ok(()));
    assert_eq!(s.engine.cache_len().0, 1);
    // Suspended behind the engine's back: the cached entry still answers...
    s.store
        .transition_key(&tenant(), &k.id, KeyAction::Suspend, s.clock.now())
        .await
        .unwrap();
    advance(&s.clock, TTL - Duration::from_millis(1));
    assert_eq!(check(&s.engine, &raw).await, Ok(()));
    // ...until it is as old as the TTL.
    advance(&s.clock, Duration::from_millis(1));
    assert_eq!(check(&s.engine, &raw).await, Err("suspended".into()));
}

#[tokio::test]
async fn unknown_hashes_are_remembered_for_the_negative_ttl() {
    let s = setup();
    let raw = RawKey::generate("sk", &Default::default()).unwrap();
    assert_eq!(
        check(&s.engine, raw.expose_secret()).await,
        Err("invalid_key".into())
    );
    assert_eq!(s.engine.cache_len(), (0, 1));
    // The key appears behind the engine's back: still unknown for a while.
    let (template, _) = key(&s.engine, &[]).await;
    let planted = ApiKey {
        id: keysmith::KeyId::new(),
        hash: raw.hash(),
        hint: raw.hint(),
        ..template
    };
    s.store.create_key(&planted).await.unwrap();
    assert_eq!(
        check(&s.engine, raw.expose_secret()).await,
        Ok(()),
        "creating a key through the engine dropped every unknown hash"
    );
    // Planted again, with no engine call in between: remembered as unknown
    // until the negative TTL passes.
    let other = RawKey::generate("sk", &Default::default()).unwrap();
    assert!(check(&s.engine, other.expose_secret()).await.is_err());
    let planted = ApiKey {
        id: keysmith::KeyId::new(),
        hash: other.hash(),
        hint: other.hint(),
        ..planted
    };
    s.store.create_key(&planted).await.unwrap();
    advance(&s.clock, NEGATIVE_TTL - Duration::from_millis(1));
    assert!(check(&s.engine, other.expose_secret()).await.is_err());
    advance(&s.clock, Duration::from_millis(1));
    assert_eq!(check(&s.engine, other.expose_secret()).await, Ok(()));
}

#[tokio::test]
async fn every_mutation_through_the_engine_applies_at_once() {
    let s = setup();
    let t = tenant();
    let read = RequestContext {
        required_scopes: vec!["read:users".into()],
        ..Default::default()
    };
    // Revoke, suspend, reactivate.
    let (k, raw) = key(&s.engine, &["read"]).await;
    assert_eq!(check(&s.engine, &raw).await, Ok(()));
    s.engine.suspend_key(&t, &k.id).await.unwrap();
    assert_eq!(check(&s.engine, &raw).await, Err("suspended".into()));
    s.engine.reactivate_key(&t, &k.id).await.unwrap();
    assert_eq!(check(&s.engine, &raw).await, Ok(()));
    // Scopes taken off and given back.
    assert_eq!(check_with(&s.engine, &raw, &read).await, Ok(()));
    s.engine
        .remove_scopes(&t, &k.id, vec!["read".into()])
        .await
        .unwrap();
    assert_eq!(
        check_with(&s.engine, &raw, &read).await,
        Err("insufficient_scope".into())
    );
    s.engine
        .assign_scopes(&t, &k.id, vec!["read".into()])
        .await
        .unwrap();
    assert_eq!(check_with(&s.engine, &raw, &read).await, Ok(()));
    // A deleted scope leaves every key that held it.
    let scopes = s
        .engine
        .list_scopes(&t, None, &Default::default())
        .await
        .unwrap();
    let scope = scopes.items.iter().find(|sc| sc.name == "read").unwrap();
    assert_eq!(check_with(&s.engine, &raw, &read).await, Ok(()));
    s.engine.delete_scope(&t, &scope.id).await.unwrap();
    assert_eq!(
        check_with(&s.engine, &raw, &read).await,
        Err("insufficient_scope".into())
    );
    // An expiry moved into the past.
    let update = keysmith::KeyUpdate {
        expires_at: Some(Some(s.clock.now() + chrono::Duration::seconds(1))),
        ..Default::default()
    };
    s.engine.update_key(&t, &k.id, update).await.unwrap();
    advance(&s.clock, Duration::from_secs(1));
    assert_eq!(check(&s.engine, &raw).await, Err("expired".into()));
    // A policy tightened under a cached key.
    let policy = s
        .engine
        .create_policy(
            &t,
            PolicySpec {
                name: "p".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (k2, raw2) = key(&s.engine, &[]).await;
    let attach = keysmith::KeyUpdate {
        policy_id: Some(Some(policy.id)),
        ..Default::default()
    };
    s.engine.update_key(&t, &k2.id, attach).await.unwrap();
    let from_elsewhere = RequestContext {
        ip: Some("192.0.2.7".parse().unwrap()),
        ..Default::default()
    };
    assert_eq!(check_with(&s.engine, &raw2, &from_elsewhere).await, Ok(()));
    let tight = PolicySpec {
        name: "p".into(),
        allowed_ips: vec!["10.0.0.0/8".into()],
        ..Default::default()
    };
    s.engine.update_policy(&t, &policy.id, tight).await.unwrap();
    assert_eq!(
        check_with(&s.engine, &raw2, &from_elsewhere).await,
        Err("ip_not_allowed".into())
    );
    // Rotation: the old secret turns into a graced one, the new one works;
    // revocation ends both.
    let (k3, raw3) = key(&s.engine, &[]).await;
    assert_eq!(check(&s.engine, &raw3).await, Ok(()));
    let rotated = s
        .engine
        .rotate_key(
            &t,
            &k3.id,
            RotateKey {
                grace_period: Some(Duration::ZERO),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(check(&s.engine, &raw3).await, Err("rotated".into()));
    let new_raw = rotated.raw_key.expose_secret().to_owned();
    assert_eq!(check(&s.engine, &new_raw).await, Ok(()));
    s.engine.revoke_key(&t, &k3.id, None).await.unwrap();
    assert_eq!(check(&s.engine, &new_raw).await, Err("revoked".into()));
    s.engine.delete_key(&t, &k2.id).await.unwrap();
    assert_eq!(check(&s.engine, &raw2).await, Err("invalid_key".into()));
}

#[tokio::test]
async fn the_cache_holds_at_most_its_capacity() {
    let store = Arc::new(MemoryStore::new());
    let engine = Engine::builder(store)
        .cache(CacheOptions {
            capacity: 32,
            ..options()
        })
        .build();
    for _ in 0..200 {
        let (_, raw) = key(&engine, &[]).await;
        assert_eq!(check(&engine, &raw).await, Ok(()));
        let unknown = RawKey::generate("sk", &Default::default()).unwrap();
        assert!(check(&engine, unknown.expose_secret()).await.is_err());
    }
    let (found, unknown) = engine.cache_len();
    assert!(
        found <= 32 && unknown <= 32,
        "{found} found, {unknown} unknown"
    );
    assert!(found > 0);
}

// ------------------------------------------------------------ change feed

/// An in-process change feed: what one engine publishes reaches every
/// listener; `cut` drops the connections, `down` refuses new ones.
#[derive(Debug)]
struct LocalFeed {
    changes: broadcast::Sender<Invalidation>,
    cut: watch::Sender<u64>,
    down: AtomicBool,
}

impl LocalFeed {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            changes: broadcast::channel(1024).0,
            cut: watch::channel(0).0,
            down: AtomicBool::new(false),
        })
    }

    fn listeners(&self) -> usize {
        self.changes.receiver_count()
    }
}

#[async_trait]
impl ChangeFeed for LocalFeed {
    async fn publish(&self, change: Invalidation) -> keysmith::Result<()> {
        let _ = self.changes.send(change);
        Ok(())
    }

    async fn listen(&self) -> keysmith::Result<mpsc::Receiver<Invalidation>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::store(std::io::Error::other("feed down")));
        }
        let mut changes = self.changes.subscribe();
        let mut cut = self.cut.subscribe();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        Ok(change) => if tx.send(change).await.is_err() { return },
                        Err(_) => return,
                    },
                    _ = cut.changed() => return,
                }
            }
        });
        Ok(rx)
    }
}

/// Yields until `done` holds (the feed's tasks run on this runtime), failing
/// after a generous bound.
async fn until(mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..100_000 {
        if done().await {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never held");
}

// Paused tokio time: the listener's reconnection backoff passes virtually.
#[tokio::test(start_paused = true)]
async fn changes_reach_other_engines_through_the_feed() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new("2030-01-01T00:00:00Z".parse().unwrap()));
    let feed = LocalFeed::new();
    let node = || {
        Engine::builder(store.clone())
            .clock(clock.clone())
            .cache(options())
            .change_feed(feed.clone())
            .build()
    };
    let (a, b) = (node(), node());
    until(async || feed.listeners() == 2).await;
    let (k, raw) = key(&a, &[]).await;
    assert_eq!(check(&b, &raw).await, Ok(()));
    assert_eq!(b.cache_len().0, 1);
    a.revoke_key(&tenant(), &k.id, None).await.unwrap();
    until(async || check(&b, &raw).await == Err("revoked".into())).await;

    // The feed is lost: B's entries live at most the degraded TTL.
    let (k2, raw2) = key(&a, &[]).await;
    feed.down.store(true, Ordering::SeqCst);
    feed.cut.send_modify(|n| *n += 1);
    until(async || feed.listeners() == 0).await;
    assert_eq!(check(&b, &raw2).await, Ok(()));
    store
        .transition_key(&tenant(), &k2.id, KeyAction::Suspend, clock.now())
        .await
        .unwrap();
    assert_eq!(check(&b, &raw2).await, Ok(()), "cached");
    advance(&clock, DEGRADED_TTL);
    assert_eq!(check(&b, &raw2).await, Err("suspended".into()));
    // Back: B reconnects by itself (after its backoff, on tokio's paused
    // timer) and forgets what it held.
    store
        .transition_key(&tenant(), &k2.id, KeyAction::Reactivate, clock.now())
        .await
        .unwrap();
    feed.down.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), async {
        while feed.listeners() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("B reconnects within its backoff");
    until(async || b.cache_len() == (0, 0) || check(&b, &raw2).await.is_ok()).await;
    let (k3, raw3) = key(&a, &[]).await;
    assert_eq!(check(&b, &raw3).await, Ok(()));
    a.suspend_key(&tenant(), &k3.id).await.unwrap();
    until(async || check(&b, &raw3).await == Err("suspended".into())).await;
    assert_eq!(
        b.get_key(&tenant(), &k3.id).await.unwrap().state,
        KeyState::Suspended
    );
}

#[tokio::test]
async fn a_cached_key_is_noted_for_last_used_once_per_interval() {
    let s = setup();
    let (k, raw) = key(&s.engine, &[]).await;
    for _ in 0..5 {
        assert_eq!(check(&s.engine, &raw).await, Ok(()));
    }
    assert_eq!(s.engine.flush_last_used().await.unwrap(), 1);
    // Within the (default one-minute) interval: nothing new to write, even
    // though the cached copy predates the write.
    advance(&s.clock, Duration::from_secs(30));
    assert_eq!(check(&s.engine, &raw).await, Ok(()));
    assert_eq!(s.engine.flush_last_used().await.unwrap(), 0);
    advance(&s.clock, Duration::from_secs(31));
    assert_eq!(check(&s.engine, &raw).await, Ok(()));
    assert_eq!(s.engine.flush_last_used().await.unwrap(), 1);
    let stored = s.engine.get_key(&tenant(), &k.id).await.unwrap();
    assert_eq!(stored.last_used_at, Some(s.clock.now()));
}
