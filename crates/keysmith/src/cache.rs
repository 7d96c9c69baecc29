//! The validation cache: what a lookup by hash found (key, policy, rotated
//! secret), kept in process so that a hot key is validated without a store
//! round trip, and hashes that were not found, kept briefly so that a flood of
//! well-formed unknown keys does not reach the database.
//!
//! Freshness:
//! - every mutation made through an [`Engine`](crate::Engine) invalidates its
//!   own cache before the call returns;
//! - a [`ChangeFeed`] (PostgreSQL `LISTEN/NOTIFY`:
//!   [`PostgresChangeFeed`](postgres::PostgresChangeFeed)) carries those
//!   invalidations to every other node sharing the database;
//! - entries live at most [`CacheOptions::ttl`] (`negative_ttl` for unknown
//!   hashes), and at most [`CacheOptions::degraded_ttl`] while an engine that
//!   has a feed is not connected to it. When the feed reconnects the cache is
//!   emptied, since invalidations may have been missed meanwhile.
//!
//! Time-dependent refusals (expiry, end of grace) are decided at validation
//! with the engine's clock from the cached dates, so they need no invalidation.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::id::{KeyId, PolicyId};
use crate::model::ApiKey;
use crate::model::KeyState;
use crate::policy::Policy;
use crate::ratelimit::local::Record;
use crate::secret::SecretHash;
use crate::store::Lookup;

#[cfg(feature = "postgres")]
pub mod postgres;

/// Sizes and lifetimes of the validation cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// Hashes held at most (found and not found together).
    pub capacity: usize,
    /// Longest a found key is served from the cache.
    pub ttl: Duration,
    /// Longest a hash that was not found is remembered.
    pub negative_ttl: Duration,
    /// Longest any entry is served while the engine's change feed is
    /// disconnected (bounds how late a change made on another node is seen).
    pub degraded_ttl: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            ttl: Duration::from_secs(10),
            negative_ttl: Duration::from_secs(2),
            degraded_ttl: Duration::from_secs(1),
        }
    }
}

/// What changed, as far as cached validations are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// A key changed (state, expiry, scopes, policy, rotation, deletion).
    Key(KeyId),
    /// A policy changed or was deleted.
    Policy(PolicyId),
    /// A key was created: hashes remembered as unknown may exist now.
    KeyCreated,
    /// Anything may have changed (a scope was deleted, a feed reconnected).
    All,
}

impl Invalidation {
    /// The compact text form carried by change feeds (`key:<id>`,
    /// `policy:<id>`, `created`, `all`).
    pub fn encode(&self) -> String {
        match self {
            Self::Key(id) => format!("key:{id}"),
            Self::Policy(id) => format!("policy:{id}"),
            Self::KeyCreated => "created".into(),
            Self::All => "all".into(),
        }
    }

    /// Reads [`encode`](Self::encode)'s form; anything unreadable is `All`,
    /// the safe reading.
    pub fn decode(text: &str) -> Self {
        match text.split_once(':') {
            Some(("key", id)) => id.parse().map_or(Self::All, Self::Key),
            Some(("policy", id)) => id.parse().map_or(Self::All, Self::Policy),
            _ if text == "created" => Self::KeyCreated,
            _ => Self::All,
        }
    }
}

/// Carries invalidations between the nodes that share one database.
#[async_trait]
pub trait ChangeFeed: fmt::Debug + Send + Sync + 'static {
    /// Tells every listening node (this one included) about a change.
    async fn publish(&self, change: Invalidation) -> Result<()>;

    /// Connects a listener. Changes arrive on the receiver for as long as the
    /// connection holds; the receiver closes when it is lost.
    async fn listen(&self) -> Result<mpsc::Receiver<Invalidation>>;
}

const SHARDS: usize = 16;

/// One shard: each hash with its value and when it was stored (Unix
/// microseconds).
type Shard<V> = RwLock<HashMap<SecretHash, (V, i64), foldhash::fast::RandomState>>;

/// What validation needs of a lookup by hash, checked (the stored hash
/// compared in constant time) and with the fields validation tests kept
/// inline: a cached validation reads this entry and the key's reference
/// count, not the key's fields scattered over other cache lines. This is
/// what the cache keeps, and what the store path hands to validation too.
#[derive(Clone)]
pub(crate) struct Found {
    /// When the key expires (Unix microseconds), `i64::MAX` if never.
    pub(crate) expires_us: i64,
    /// When the presented secret stops working because a rotation replaced
    /// it (Unix microseconds), `i64::MAX` for the key's current secret.
    pub(crate) grace_us: i64,
    /// The key's `last_used_at` (Unix microseconds), `i64::MIN` if never.
    pub(crate) last_used_us: i64,
    /// The key.
    pub(crate) key: Arc<ApiKey>,
    /// Its policy.
    pub(crate) policy: Option<Arc<Policy>>,
    /// The key's state.
    pub(crate) state: KeyState,
}

impl Found {
    /// What validation needs of `found`, the store's answer for `hash`;
    /// `None` unless the stored hash (the current secret's, or the rotated
    /// one's) equals `hash`, compared in constant time.
    pub(crate) fn checked(found: Lookup, hash: &SecretHash) -> Option<Self> {
        let stored = found
            .rotated
            .as_ref()
            .map_or(found.key.hash, |r| r.old_hash);
        if !stored.ct_eq(hash) {
            return None;
        }
        let us = |at: Option<DateTime<Utc>>, none: i64| at.map_or(none, |at| at.timestamp_micros());
        Some(Self {
            expires_us: us(found.key.expires_at, i64::MAX),
            grace_us: us(found.rotated.map(|r| r.grace_ends), i64::MAX),
            last_used_us: us(found.key.last_used_at, i64::MIN),
            state: found.key.state,
            key: found.key,
            policy: found.policy,
        })
    }

    /// When the presented secret stops working, if a rotation replaced it.
    pub(crate) fn grace_ends(&self) -> Option<DateTime<Utc>> {
        (self.grace_us != i64::MAX)
            .then(|| DateTime::from_timestamp_micros(self.grace_us))
            .flatten()
    }
}

/// A found key's entry: what validation reads, and the key's limits record
/// while this entry holds it. The engine moves a key's record here from the
/// in-process limiter at its first limited validation through this entry, so
/// that a validation under a rate limit or quota reads the record next to
/// what it has just read, instead of missing the cache once more in the
/// limiter's map; the record goes back to the limiter when the entry goes.
pub(crate) struct Entry {
    found: Found,
    host: Mutex<Hosted>,
}

/// The limits record an entry holds (`held`: it is the key's one record).
struct Hosted {
    held: bool,
    record: Record,
}

impl Entry {
    fn new(found: Found) -> Self {
        Self {
            found,
            host: Mutex::new(Hosted {
                held: false,
                record: Record::EMPTY,
            }),
        }
    }

    /// Whether this entry may hold `key`'s limits record: it is the entry of
    /// the only secret `key` ever had.
    fn may_hold_limits(&self, key: &KeyId) -> bool {
        let found = &self.found;
        found.key.id == *key && found.key.rotated_at.is_none() && found.grace_us == i64::MAX
    }

    fn host(&self) -> std::sync::MutexGuard<'_, Hosted> {
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What validation reads.
    pub(crate) fn found(&self) -> &Found {
        &self.found
    }

    /// Runs `f` on `key`'s limits record held by this entry (moved here with
    /// `take` at first use) when this entry may hold it; else on `None`, and
    /// the caller uses the limiter's own record. Call it under the shard's
    /// read lock (see [`ValidationCache::with_limits`]).
    pub(crate) fn with_record<R>(
        &self,
        key: &KeyId,
        take: impl FnOnce() -> Record,
        f: impl FnOnce(Option<&mut Record>) -> R,
    ) -> R {
        if !self.may_hold_limits(key) {
            return f(None);
        }
        let mut host = self.host();
        if !host.held {
            host.record = take();
            host.held = true;
        }
        f(Some(&mut host.record))
    }
}

/// Where an entry's limits record goes when the entry is dropped.
type Spill = Box<dyn Fn(&KeyId, Record) + Send + Sync>;

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// One side of the cache (found keys, or unknown hashes), in shards.
struct Side<V> {
    shards: Box<[Shard<V>]>,
    per_shard: usize,
}

impl<V> Side<V> {
    fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            per_shard: (capacity / SHARDS).max(1),
        }
    }

    fn shard(&self, hash: &SecretHash) -> &Shard<V> {
        // SHA-256 output is uniform: its first byte picks the shard.
        &self.shards[usize::from(hash.as_bytes()[0]) % SHARDS]
    }

    fn get<T>(
        &self,
        hash: &SecretHash,
        now: i64,
        ttl: i64,
        read: impl FnOnce(&V) -> T,
    ) -> Option<T> {
        let shard = self.shard(hash).read().unwrap_or_else(|p| p.into_inner());
        let (value, stored_at) = shard.get(hash)?;
        (now.saturating_sub(*stored_at) < ttl).then(|| read(value))
    }

    /// Inserts under the shard's lock, if `still_valid` (checked under it).
    /// Every value this drops (an older one for `hash`, or others to make
    /// room) goes through `removed` first.
    fn insert(
        &self,
        hash: SecretHash,
        value: V,
        now: i64,
        ttl: i64,
        still_valid: impl FnOnce() -> bool,
        removed: &mut dyn FnMut(&mut V),
    ) {
        let mut shard = self.shard(&hash).write().unwrap_or_else(|p| p.into_inner());
        if !still_valid() {
            return;
        }
        if shard.len() >= self.per_shard && !shard.contains_key(&hash) {
            // Full: drop what has outlived its TTL, else an arbitrary
            // sixteenth (hash order is unrelated to use), so that inserts stay
            // cheap on average.
            shard.retain(|_, (v, at)| {
                let keep = now.saturating_sub(*at) < ttl;
                if !keep {
                    removed(v);
                }
                keep
            });
            if shard.len() >= self.per_shard {
                let doomed: Vec<SecretHash> = shard
                    .keys()
                    .take((self.per_shard / 16).max(1))
                    .copied()
                    .collect();
                for h in doomed {
                    if let Some((mut v, _)) = shard.remove(&h) {
                        removed(&mut v);
                    }
                }
            }
        }
        if let Some((mut old, _)) = shard.insert(hash, (value, now)) {
            removed(&mut old);
        }
    }

    /// Changes the value held for `hash`, if any (its age stays).
    fn update(&self, hash: &SecretHash, change: impl FnOnce(&mut V)) {
        let mut shard = self.shard(hash).write().unwrap_or_else(|p| p.into_inner());
        if let Some((value, _)) = shard.get_mut(hash) {
            change(value);
        }
    }

    /// Keeps the values `keep` says to; the others go through `removed`.
    fn retain(&self, keep: impl Fn(&V) -> bool, removed: &mut dyn FnMut(&mut V)) {
        for shard in &*self.shards {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, (v, _)| {
                let kept = keep(v);
                if !kept {
                    removed(v);
                }
                kept
            });
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// Where the cache's invalidations stood when a store lookup started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Generation {
    changed: u64,
    created: u64,
}

/// The cache itself, shared by an engine and its change-feed listener.
pub(crate) struct ValidationCache {
    options: CacheOptions,
    /// The lifetimes in microseconds: (found, unknown) when fresh, and when
    /// disconnected from the change feed.
    lifetimes: [(i64, i64); 2],
    /// Hashes that were found, with what was found.
    found: Side<Entry>,
    /// Hashes that were not found.
    unknown: Side<()>,
    /// Bumped by every invalidation of found keys: a lookup that raced one
    /// is not cached.
    generation: AtomicU64,
    /// Bumped when keys are created: an unknown hash that raced a creation
    /// is not remembered.
    created: AtomicU64,
    /// Whether entries may live their full TTL (no feed, or a connected one).
    fresh: AtomicBool,
    /// Where the limits records of dropped entries go (the engine's
    /// in-process limiter), once the engine has set it.
    spill: OnceLock<Spill>,
}

impl fmt::Debug for ValidationCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidationCache")
            .field("options", &self.options)
            .field("found", &self.found.len())
            .field("unknown", &self.unknown.len())
            .finish()
    }
}

impl ValidationCache {
    pub(crate) fn new(options: CacheOptions) -> Self {
        let degraded = |ttl: Duration| micros(ttl.min(options.degraded_ttl));
        Self {
            options,
            lifetimes: [
                (micros(options.ttl), micros(options.negative_ttl)),
                (degraded(options.ttl), degraded(options.negative_ttl)),
            ],
            found: Side::new(options.capacity),
            unknown: Side::new(options.capacity),
            generation: AtomicU64::new(0),
            created: AtomicU64::new(0),
            fresh: AtomicBool::new(true),
            spill: OnceLock::new(),
        }
    }

    /// Sets where the limits records of dropped entries go.
    pub(crate) fn set_spill(&self, spill: Spill) {
        let _ = self.spill.set(spill);
    }

    /// Hands a dropped entry's limits record, if it held one, back.
    fn spill(&self, entry: &mut Entry) {
        let host = entry.host.get_mut().unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut host.held) {
            if let Some(spill) = self.spill.get() {
                spill(&entry.found.key.id, host.record);
            }
        }
    }

    /// Runs `f` on the limits record of `key`, held by the entry of `hash`
    /// (moved there with `take` at first use) when that entry may hold it;
    /// else on `None`, and the caller uses the limiter's own record. Either
    /// way under the shard's read lock: entries are made and dropped (their
    /// records handed back) only under its write lock, so a caller given
    /// `None` and an entry never both hold the key's record.
    ///
    /// Only an entry for the current secret of a key never rotated holds its
    /// record: the key has one secret, so one entry, and every validation of
    /// it goes through that entry or, when there is none, the limiter. A
    /// rotated key's old and new secrets have an entry each, and share the
    /// limiter's record. (A rotation drops the key's entries, records handed
    /// back, before the new secret is handed out; a node that hears of it
    /// later through the change feed may count that key's first new-secret
    /// requests in a second record until then, and keeps both records'
    /// unflushed quota units.)
    pub(crate) fn with_limits<R>(
        &self,
        hash: &SecretHash,
        key: &KeyId,
        take: impl FnOnce() -> Record,
        f: impl FnOnce(Option<&mut Record>) -> R,
    ) -> R {
        let shard = self
            .found
            .shard(hash)
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match shard.get(hash) {
            Some((entry, _)) => entry.with_record(key, take, f),
            None => f(None),
        }
    }

    /// Runs `read` on the live entry of a found key for `hash`, under its
    /// shard's read lock: validation checks the key and counts its limits in
    /// one visit. `None` when the cache holds no live found entry for it.
    pub(crate) fn read_found<T>(
        &self,
        hash: &SecretHash,
        now: i64,
        read: impl FnOnce(&Entry) -> T,
    ) -> Option<T> {
        self.found.get(hash, now, self.ttl(true), read)
    }

    /// Runs `f` on every limits record the cache's entries hold.
    pub(crate) fn for_each_held(&self, mut f: impl FnMut(&KeyId, &mut Record)) {
        for shard in &*self.found.shards {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            for (entry, _) in shard.values() {
                let mut host = entry.host();
                if host.held {
                    f(&entry.found.key.id, &mut host.record);
                }
            }
        }
    }

    fn ttl(&self, found: bool) -> i64 {
        let (found_ttl, unknown_ttl) =
            self.lifetimes[usize::from(!self.fresh.load(Ordering::Relaxed))];
        if found { found_ttl } else { unknown_ttl }
    }

    /// Whether `hash` is remembered as not existing (a live entry on the
    /// unknown side; the found side is read by [`read_found`](Self::read_found));
    /// `now` in Unix microseconds.
    pub(crate) fn known_unknown(&self, hash: &SecretHash, now: i64) -> bool {
        self.unknown
            .get(hash, now, self.ttl(false), |()| ())
            .is_some()
    }

    /// The generation to hand back to [`insert`](Self::insert) after the
    /// store lookup.
    pub(crate) fn generation(&self) -> Generation {
        Generation {
            changed: self.generation.load(Ordering::Acquire),
            created: self.created.load(Ordering::Acquire),
        }
    }

    /// Keeps what a store lookup found, unless an invalidation happened since
    /// `generation` was read (the lookup may have seen the old state).
    pub(crate) fn insert(
        &self,
        hash: SecretHash,
        found: Option<Found>,
        now: i64,
        generation: Generation,
    ) {
        let unchanged = || self.generation.load(Ordering::Acquire) == generation.changed;
        match found {
            Some(found) => self.found.insert(
                hash,
                Entry::new(found),
                now,
                micros(self.options.ttl),
                unchanged,
                &mut |entry| self.spill(entry),
            ),
            None => self.unknown.insert(
                hash,
                (),
                now,
                micros(self.options.negative_ttl),
                || unchanged() && self.created.load(Ordering::Acquire) == generation.created,
                &mut |()| {},
            ),
        }
    }

    /// Records that the cached key behind `hash` was used at `now` (noted
    /// for the `last_used_at` write-behind), so that the engine does not note
    /// it again at every validation within the coalescing interval.
    pub(crate) fn note_used(&self, hash: &SecretHash, now: DateTime<Utc>) {
        let now_us = now.timestamp_micros();
        self.found.update(hash, |entry| {
            let found = &mut entry.found;
            if found.last_used_us < now_us {
                found.last_used_us = now_us;
                let mut key = (*found.key).clone();
                key.last_used_at = Some(now);
                found.key = Arc::new(key);
            }
        });
    }

    /// Applies a change: the entries it may have made stale are dropped.
    pub(crate) fn invalidate(&self, change: Invalidation) {
        // Bumped before and after: a lookup that started before the end of
        // this call does not insert what it read.
        let counter = match change {
            Invalidation::KeyCreated => &self.created,
            _ => &self.generation,
        };
        counter.fetch_add(1, Ordering::AcqRel);
        let spill = &mut |entry: &mut Entry| self.spill(entry);
        match change {
            Invalidation::Key(id) => self.found.retain(|e| e.found.key.id != id, spill),
            Invalidation::Policy(id) => self
                .found
                .retain(|e| e.found.key.policy_id != Some(id), spill),
            Invalidation::KeyCreated => self.unknown.retain(|()| false, &mut |()| {}),
            Invalidation::All => {
                self.found.retain(|_| false, spill);
                self.unknown.retain(|()| false, &mut |()| {});
            }
        }
        counter.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether entries may live their full TTL; a reconnect empties the cache.
    pub(crate) fn set_fresh(&self, fresh: bool) {
        let was = self.fresh.swap(fresh, Ordering::AcqRel);
        if fresh && !was {
            self.invalidate(Invalidation::All);
        }
    }

    /// Entries held: (found keys, unknown hashes).
    pub(crate) fn len(&self) -> (usize, usize) {
        (self.found.len(), self.unknown.len())
    }
}

/// Listens to `feed` for as long as the cache lives, reconnecting by itself;
/// while disconnected, entries live at most the degraded TTL.
pub(crate) async fn follow(
    cache: std::sync::Weak<ValidationCache>,
    feed: std::sync::Arc<dyn ChangeFeed>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match feed.listen().await {
            Ok(mut changes) => {
                let Some(live) = cache.upgrade() else { return };
                // Anything missed while disconnected is forgotten.
                live.set_fresh(true);
                drop(live);
                backoff = Duration::from_millis(100);
                tracing::info!("validation cache: change feed connected");
                while let Some(change) = changes.recv().await {
                    let Some(live) = cache.upgrade() else { return };
                    live.invalidate(change);
                }
                tracing::warn!("validation cache: change feed lost; short TTL until it is back");
            }
            Err(error) => {
                tracing::warn!(%error, "validation cache: change feed unavailable");
            }
        }
        metrics::counter!("keysmith_cache_feed_disconnects_total").increment(1);
        match cache.upgrade() {
            Some(live) => live.set_fresh(false),
            None => return,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_that_raced_an_invalidation_is_not_kept() {
        let cache = ValidationCache::new(CacheOptions::default());
        let now = Utc::now().timestamp_micros();
        let hash = SecretHash::of("sk_live_x");
        let before = cache.generation();
        cache.invalidate(Invalidation::KeyCreated);
        cache.insert(hash, None, now, before);
        assert!(!cache.known_unknown(&hash, now), "raced a creation");
        let before = cache.generation();
        cache.invalidate(Invalidation::All);
        cache.insert(hash, None, now, before);
        assert!(!cache.known_unknown(&hash, now), "raced a change");
        cache.insert(hash, None, now, cache.generation());
        assert!(cache.known_unknown(&hash, now));
        // Disconnected from its feed, entries live at most the degraded TTL.
        cache.set_fresh(false);
        let later = now + 1_000_000;
        assert!(!cache.known_unknown(&hash, later));
    }

    #[test]
    fn invalidations_round_trip_through_text_and_garbage_means_all() {
        for change in [
            Invalidation::Key(KeyId::new()),
            Invalidation::Policy(PolicyId::new()),
            Invalidation::KeyCreated,
            Invalidation::All,
        ] {
            assert_eq!(Invalidation::decode(&change.encode()), change);
        }
        for garbage in ["", "key:", "key:nope", "policy:key_123", "sideways"] {
            assert_eq!(
                Invalidation::decode(garbage),
                Invalidation::All,
                "{garbage}"
            );
        }
    }
}
