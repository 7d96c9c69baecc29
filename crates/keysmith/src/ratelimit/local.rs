//! The in-process rate limiter (GCRA per key), which also keeps quota counts
//! in process when the engine counts them there
//! ([`EngineBuilder::local_quota_counts`](crate::EngineBuilder::local_quota_counts)).
//!
//! One record of 64 bytes per key holds both: the GCRA's theoretical arrival
//! time and each quota window's count. A validation under a rate limit and
//! quotas reads that one record, in one shard's map, under one lock. The
//! GCRA is written here rather than taken from `governor` (whose clocks it
//! still uses) because a `governor` limiter per key is a struct of about a
//! hundred bytes with its own clock, and a separate record for the quota
//! counts would be a second memory access per validation: at tens of
//! thousands of keys, each such access is a cache miss that costs more than
//! the rest of the rate limit. For the same reason an engine with a
//! validation cache moves a key's record into the key's cache entry
//! (`ValidationCache::with_limits`): the limiter's map then holds the records
//! of keys not in the cache, and of keys that were rotated.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use foldhash::fast::RandomState;
use governor::clock::{Clock, DefaultClock, Reference};

use super::{QuotaDecision, QuotaWindow, RateLimitState, RateLimiter, RateSpec};
use crate::error::{Error, Result};
use crate::id::KeyId;
use crate::model::UsagePeriod;

/// A quota window's count, kept in process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Count {
    /// The window, by its first day (a window starts at midnight UTC).
    window: NaiveDate,
    /// The window's count: the store's when it was loaded, plus every unit
    /// counted here since.
    used: u64,
    /// Units counted here and not yet written to the store.
    unflushed: u64,
}

/// What this process keeps of one key: 64 bytes, 80 with its id in the map.
/// It lives in the limiter's map, or, while the engine's validation cache
/// holds the key, in the cache's entry for it (where validation reads
/// anyway): one copy, moved between the two.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    /// GCRA: the theoretical arrival time of the next request, in
    /// nanoseconds since the limiter's start (at most `now` + the burst's
    /// worth of time). Zero when the key was never rate limited.
    tat: u64,
    /// Last use, in seconds since the limiter's start (for dropping the
    /// least recently used records of a shard full of busy keys).
    last_used: u32,
    /// Which rate limit `tat` was counted under ([`fingerprint`]): a policy
    /// change starts a fresh bucket, as in Redis. Zero: none yet.
    spec: u32,
    /// The daily and the monthly window's counts (`window` = `i32::MIN`:
    /// none held).
    counts: [Count; 2],
}

const NO_COUNT: Count = Count {
    window: NaiveDate::MIN,
    used: 0,
    unflushed: 0,
};

impl Record {
    /// A key never seen: a full bucket, no counts held.
    pub(crate) const EMPTY: Self = Self {
        tat: 0,
        last_used: 0,
        spec: 0,
        counts: [NO_COUNT; 2],
    };
}

/// Units counted in process that the store has not been told of yet: (key,
/// period, window start, units).
pub(crate) type Unflushed = Vec<(KeyId, UsagePeriod, DateTime<Utc>, u64)>;

/// The periods of [`Record::counts`], in slot order.
const PERIODS: [UsagePeriod; 2] = [UsagePeriod::Day, UsagePeriod::Month];

/// Moves `count`'s unflushed units (of `key`'s `period`) into `into`.
fn take_units(key: &KeyId, period: UsagePeriod, count: &mut Count, into: &mut Unflushed) {
    if count.unflushed > 0 {
        let start = count.window.and_time(NaiveTime::MIN).and_utc();
        into.push((*key, period, start, count.unflushed));
        count.unflushed = 0;
    }
}

fn slot(period: UsagePeriod) -> usize {
    match period {
        UsagePeriod::Day => 0,
        UsagePeriod::Month => 1,
    }
}

/// A window's first day (see [`Count::window`]): read, not computed.
fn window_of(w: &QuotaWindow) -> NaiveDate {
    w.start.naive_utc().date()
}

type Shard = Mutex<HashMap<KeyId, Record, RandomState>>;

/// The engine's clock as the limiter's: time since the Unix epoch. The
/// engine hands the limiter the instant it read for the whole validation, so
/// a validation reads the clock once, and a `ManualClock` drives rate limits
/// like everything else.
#[derive(Debug, Clone)]
pub(crate) struct EngineClock(pub(crate) std::sync::Arc<dyn crate::clock::Clock>);

impl EngineClock {
    /// `micros` since the Unix epoch as this clock's instant (zero before it).
    pub(crate) fn instant(micros: i64) -> Duration {
        Duration::from_micros(u64::try_from(micros).unwrap_or(0))
    }
}

impl Clock for EngineClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Self::instant(self.0.now_micros())
    }
}

/// GCRA per key, in process, with bursts; and quota counts when the engine
/// keeps them here. Records of keys idle long enough for their bucket to be
/// full again are dropped when a shard grows past its share of the bound
/// (their unflushed counts kept for the next flush), so memory for idle keys
/// is reclaimed without forgetting anything that matters.
pub struct LocalRateLimiter<C: Clock + Clone = DefaultClock> {
    clock: C,
    start: C::Instant,
    /// Records held at most per shard.
    per_shard: usize,
    shards: Box<[Shard]>,
    /// Unflushed counts of records dropped or windows rolled over, until the
    /// next flush.
    pending: Mutex<Unflushed>,
}

impl<C: Clock + Clone> fmt::Debug for LocalRateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRateLimiter")
            .field("max_keys", &(self.per_shard * self.shards.len()))
            .finish_non_exhaustive()
    }
}

impl Default for LocalRateLimiter {
    fn default() -> Self {
        Self::new(DefaultClock::default(), 100_000)
    }
}

/// The result of taking capacity from a bucket.
struct Taken {
    state: RateLimitState,
    /// The new theoretical arrival time, when allowed.
    tat: Option<u64>,
}

/// A rate limit's fingerprint, never zero.
fn fingerprint(spec: &RateSpec) -> u32 {
    let mixed = spec.limit.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ nanos(spec.window)
            .rotate_left(23)
            .wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ spec.burst.wrapping_mul(0x1656_67B1_9E37_79F9);
    (mixed >> 32) as u32 | 1
}

fn seconds(ns: u64) -> u32 {
    u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn secs_ceil_ns(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// A rate limit as GCRA counts it, in nanoseconds: worked out once per
/// policy ([`Policy`](crate::policy::Policy) keeps it), not at every
/// validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    limit: u64,
    burst: u64,
    window: u64,
    /// The emission interval: one request's worth of time (window / limit).
    t: u64,
    /// The bucket's size in time: `t` × `burst`.
    tau: u64,
    /// Which rate limit this is ([`fingerprint`]).
    fingerprint: u32,
}

impl Gcra {
    /// The plan of `spec`; `burst_limit` must be at least 1.
    pub(crate) fn of(spec: &RateSpec) -> Result<Self> {
        if spec.burst == 0 {
            return Err(Error::invalid_input("burst_limit", "must be at least 1"));
        }
        let t = nanos(spec.emission_interval()).max(1);
        Ok(Self {
            limit: spec.limit,
            burst: spec.burst,
            window: nanos(spec.window),
            t,
            tau: t.saturating_mul(spec.burst),
            fingerprint: fingerprint(spec),
        })
    }
}

/// GCRA: `cost` requests at `now` against a bucket whose theoretical arrival
/// time is `tat`. Each request takes one emission interval `t` (window /
/// limit); the bucket holds `burst` of them (`tau` = `t` × `burst`).
fn gcra(g: &Gcra, tat: u64, now: u64, cost: u64) -> Taken {
    let refused = |retry_after_ns: u64| Taken {
        state: RateLimitState {
            allowed: false,
            limit: g.limit,
            remaining: 0,
            // Refused: the bucket's whole refill time, as Redis reports it.
            reset_secs: secs_ceil_ns(g.tau),
            retry_after_secs: Some(secs_ceil_ns(retry_after_ns).max(1)),
        },
        tat: None,
    };
    if cost > g.burst {
        // Never fits: the whole window is the honest wait.
        return refused(g.window);
    }
    let new_tat = tat.max(now).saturating_add(g.t.saturating_mul(cost));
    let limit_at = now.saturating_add(g.tau);
    if new_tat > limit_at {
        return refused(new_tat - limit_at);
    }
    Taken {
        state: RateLimitState {
            allowed: true,
            limit: g.limit,
            remaining: (limit_at - new_tat) / g.t,
            reset_secs: secs_ceil_ns(new_tat - now),
            retry_after_secs: None,
        },
        tat: Some(new_tat),
    }
}

impl<C: Clock + Clone> LocalRateLimiter<C> {
    /// A limiter reading time from `clock` (a `governor` clock:
    /// `FakeRelativeClock` in tests), keeping at most about `max_keys` keys.
    pub fn new(clock: C, max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        // Shards spread the lock over the workers; a small bound keeps one
        // shard so that it is exact.
        let shards = if max_keys >= 16 * 1024 { 16 } else { 1 };
        Self {
            start: clock.now(),
            clock,
            per_shard: max_keys / shards,
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// How many keys have a rate-limit bucket now.
    pub fn tracked_keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).values().filter(|r| r.tat > 0).count())
            .sum()
    }

    fn now(&self) -> u64 {
        self.elapsed(self.clock.now())
    }

    /// `at` as this limiter counts time: nanoseconds since it started.
    pub(crate) fn elapsed(&self, at: C::Instant) -> u64 {
        at.duration_since(self.start).as_u64()
    }

    fn shard(&self, key: &KeyId) -> &Shard {
        // UUIDv7: the last bytes are random.
        let byte = key.uuid().as_bytes()[15];
        &self.shards[usize::from(byte) % self.shards.len()]
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Unflushed> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key's record in its shard, made when it has none. When the shard
    /// is full, records idle for long enough are dropped first (their
    /// unflushed counts kept for the next flush).
    fn record<'a>(
        &self,
        shard: &'a mut HashMap<KeyId, Record, RandomState>,
        key: &KeyId,
        now: u64,
    ) -> &'a mut Record {
        if shard.len() >= self.per_shard && !shard.contains_key(key) {
            self.make_room(shard, now);
        }
        let record = shard.entry(*key).or_insert(Record::EMPTY);
        record.last_used = seconds(now);
        record
    }

    /// Runs `f` on the key's record in the map, made when it has none.
    pub(crate) fn with_record<R>(
        &self,
        key: &KeyId,
        now: u64,
        f: impl FnOnce(&mut Record) -> R,
    ) -> R {
        let mut shard = lock(self.shard(key));
        f(self.record(&mut shard, key, now))
    }

    /// Takes the key's record out of the map (an empty one when it has none),
    /// for the validation cache to hold.
    pub(crate) fn take_record(&self, key: &KeyId) -> Record {
        lock(self.shard(key)).remove(key).unwrap_or(Record::EMPTY)
    }

    /// Puts back a record the validation cache held. Should the map hold one
    /// for the key too (a rotation seen late on this node), the later bucket
    /// wins and both records' unflushed units are kept for the next flush.
    pub(crate) fn put_back(&self, key: &KeyId, mut record: Record) {
        let mut shard = lock(self.shard(key));
        if let Some(held) = shard.get_mut(key) {
            Self::take_units_of(key, held, &mut self.pending());
            if held.spec == record.spec {
                record.tat = record.tat.max(held.tat);
            }
            *held = record;
            return;
        }
        if shard.len() >= self.per_shard {
            self.make_room(&mut shard, self.now());
        }
        shard.insert(*key, record);
    }

    /// Moves `record`'s unflushed units (of `key`) into `into`.
    pub(crate) fn take_units_of(key: &KeyId, record: &mut Record, into: &mut Unflushed) {
        for (period, count) in PERIODS.into_iter().zip(record.counts.iter_mut()) {
            take_units(key, period, count, into);
        }
    }

    fn make_room(&self, shard: &mut HashMap<KeyId, Record, RandomState>, now: u64) {
        let mut dropped = Vec::new();
        // A bucket whose theoretical arrival time has passed is full:
        // dropping it changes no decision; counts are reloaded from the store.
        shard.retain(|key, r| {
            let keep = r.tat > now;
            if !keep {
                dropped.push((*key, r.counts));
            }
            keep
        });
        if shard.len() >= self.per_shard {
            // Still full of busy keys: the least recently used half goes.
            let mut ages: Vec<_> = shard.iter().map(|(k, r)| (r.last_used, *k)).collect();
            ages.sort_unstable();
            for (_, key) in ages.into_iter().take(self.per_shard / 2 + 1) {
                if let Some(r) = shard.remove(&key) {
                    dropped.push((key, r.counts));
                }
            }
        }
        let mut pending = self.pending();
        for (key, mut counts) in dropped {
            for (period, count) in PERIODS.into_iter().zip(counts.iter_mut()) {
                take_units(&key, period, count, &mut pending);
            }
        }
    }

    /// Takes `cost` requests' worth of capacity from the key's bucket, or
    /// refuses without taking any; never waits.
    pub fn check_now(&self, key: &KeyId, spec: &RateSpec, cost: u64) -> Result<RateLimitState> {
        let plan = Gcra::of(spec)?;
        let now = self.now();
        Ok(self.with_record(key, now, |record| {
            check_in(record, &plan, None, cost, now).0
        }))
    }

    /// [`count_now_in`] on the key's record in the map; `None` when it has
    /// none.
    #[cfg(test)]
    pub(crate) fn count_now(
        &self,
        key: &KeyId,
        windows: &[QuotaWindow],
        cost: u64,
        now: u64,
    ) -> Option<QuotaDecision> {
        let mut shard = lock(self.shard(key));
        count_now_in(shard.get_mut(key)?, windows, cost, now)
    }

    /// [`seed_in`](Self::seed_in) on the key's record in the map.
    #[cfg(test)]
    pub(crate) fn seed_counts(&self, key: &KeyId, windows: &[QuotaWindow], used: &[u64], now: u64) {
        self.with_record(key, now, |record| self.seed_in(key, record, windows, used));
    }

    /// Holds the counts the store has for `windows` (`used`, in the same
    /// order) in `key`'s record, unless it already holds those windows. A
    /// window replacing an older one of its period keeps the older one's
    /// unflushed units for the next flush.
    pub(crate) fn seed_in(
        &self,
        key: &KeyId,
        record: &mut Record,
        windows: &[QuotaWindow],
        used: &[u64],
    ) {
        let mut pending = self.pending();
        for (w, &used) in windows.iter().zip(used) {
            let window = window_of(w);
            let held = &mut record.counts[slot(w.period)];
            if held.window == window {
                continue;
            }
            take_units(key, w.period, held, &mut pending);
            // Units of this window dropped with an evicted record and not
            // flushed yet are not in the store's count: add them.
            let waiting: u64 = pending
                .iter()
                .filter(|p| p.0 == *key && p.1 == w.period && p.2 == w.start)
                .map(|p| p.3)
                .sum();
            *held = Count {
                window,
                used: used.saturating_add(waiting),
                unflushed: 0,
            };
        }
    }

    /// Takes every unit counted here and not yet written to the store.
    pub(crate) fn take_unflushed(&self) -> Unflushed {
        let mut taken = std::mem::take(&mut *self.pending());
        for shard in &*self.shards {
            for (key, record) in lock(shard).iter_mut() {
                Self::take_units_of(key, record, &mut taken);
            }
        }
        taken
    }

    /// Gives back units a flush could not write, for the next one.
    pub(crate) fn restore_unflushed(&self, units: Unflushed) {
        self.pending().extend(units);
    }
}

fn lock(shard: &Shard) -> std::sync::MutexGuard<'_, HashMap<KeyId, Record, RandomState>> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes `cost` from `record`'s bucket for `plan`, then, if the request is
/// allowed and `windows` are given, counts it in them as [`count_now_in`]
/// does: one record, under whatever lock holds it, for both. The quota
/// decision is `None` when the request was refused by the rate limit
/// (nothing counted) or when a window's count must first be loaded
/// ([`LocalRateLimiter::seed_in`]).
pub(crate) fn check_in(
    record: &mut Record,
    plan: &Gcra,
    windows: Option<&[QuotaWindow]>,
    cost: u64,
    now: u64,
) -> (RateLimitState, Option<QuotaDecision>) {
    let cost = cost.max(1);
    record.last_used = seconds(now);
    if record.spec != plan.fingerprint {
        (record.spec, record.tat) = (plan.fingerprint, 0);
    }
    let taken = gcra(plan, record.tat, now, cost);
    if let Some(tat) = taken.tat {
        record.tat = tat;
    }
    let counted = match windows {
        Some(windows) if taken.state.allowed => count_in(record, windows, cost),
        _ => None,
    };
    (taken.state, counted)
}

/// Counts `cost` in every window of `record` if each stays within its limit,
/// else counts nothing and refuses; exact under the lock that holds the
/// record. `None` when a window's count is not held yet: load it from the
/// store and [`LocalRateLimiter::seed_in`].
pub(crate) fn count_now_in(
    record: &mut Record,
    windows: &[QuotaWindow],
    cost: u64,
    now: u64,
) -> Option<QuotaDecision> {
    record.last_used = seconds(now);
    count_in(record, windows, cost)
}

/// Whether `record` holds the counts of every window (else they are loaded
/// from the store first).
pub(crate) fn holds(record: &Record, windows: &[QuotaWindow]) -> bool {
    windows
        .iter()
        .all(|w| record.counts[slot(w.period)].window == window_of(w))
}

/// Counts `cost` in every window of `record` if all fit (`None` when one is
/// not held).
fn count_in(record: &mut Record, windows: &[QuotaWindow], cost: u64) -> Option<QuotaDecision> {
    let mut used = [0u64; 2];
    for (w, used) in windows.iter().zip(used.iter_mut()) {
        let count = &record.counts[slot(w.period)];
        if count.window != window_of(w) {
            return None;
        }
        *used = count.used;
    }
    let used = &mut used[..windows.len()];
    let fits = super::fits_all(windows, used, cost);
    if fits && cost > 0 {
        for (w, used) in windows.iter().zip(used.iter_mut()) {
            let count = &mut record.counts[slot(w.period)];
            count.used += cost;
            count.unflushed += cost;
            *used = count.used;
        }
    }
    Some(QuotaDecision::from_counts(windows, used, fits))
}

#[async_trait]
impl<C> RateLimiter for LocalRateLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    async fn check(&self, key: &KeyId, spec: &RateSpec, cost: u64) -> Result<RateLimitState> {
        self.check_now(key, spec, cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn spec(limit: u64, window_ms: u64, burst: u64) -> RateSpec {
        RateSpec {
            limit,
            window: Duration::from_millis(window_ms),
            burst,
        }
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn allowed_never_exceeds_burst_plus_rate_times_elapsed() {
        block(async {
            let clock = FakeRelativeClock::default();
            let limiter = LocalRateLimiter::new(clock.clone(), 10);
            let key = KeyId::new();
            let s = spec(10, 1000, 5); // 10/s, bursts of 5
            let mut allowed = 0u64;
            // A greedy client hammering every 10 ms for 3 s.
            for step in 0..=300u64 {
                for _ in 0..3 {
                    if limiter.check(&key, &s, 1).await.unwrap().allowed {
                        allowed += 1;
                    }
                }
                let elapsed_ms = step * 10;
                assert!(
                    allowed <= 5 + 10 * elapsed_ms / 1000 + 1,
                    "{allowed} by {elapsed_ms} ms"
                );
                clock.advance(Duration::from_millis(10));
            }
            assert!(
                allowed >= 5 + 30 - 1,
                "the rate is actually granted: {allowed}"
            );
        });
    }

    #[test]
    fn a_steady_client_at_the_rate_is_never_refused() {
        block(async {
            let clock = FakeRelativeClock::default();
            let limiter = LocalRateLimiter::new(clock.clone(), 10);
            let key = KeyId::new();
            let s = spec(5, 1000, 1); // 5/s, no burst beyond one
            for _ in 0..500 {
                let state = limiter.check(&key, &s, 1).await.unwrap();
                assert!(state.allowed);
                clock.advance(Duration::from_millis(200));
            }
        });
    }

    #[test]
    fn refusals_carry_retry_after_and_headers() {
        block(async {
            let clock = FakeRelativeClock::default();
            let limiter = LocalRateLimiter::new(clock.clone(), 10);
            let key = KeyId::new();
            let s = spec(2, 10_000, 2); // 2 per 10 s
            let first = limiter.check(&key, &s, 1).await.unwrap();
            assert_eq!((first.allowed, first.limit, first.remaining), (true, 2, 1));
            assert!(limiter.check(&key, &s, 1).await.unwrap().allowed);
            let refused = limiter.check(&key, &s, 1).await.unwrap();
            assert_eq!((refused.allowed, refused.remaining), (false, 0));
            assert_eq!(refused.retry_after_secs, Some(5));
            clock.advance(Duration::from_secs(5));
            assert!(limiter.check(&key, &s, 1).await.unwrap().allowed);
            // A cost larger than the burst never passes.
            assert!(!limiter.check(&key, &s, 3).await.unwrap().allowed);
            // Another key has its own bucket.
            assert!(limiter.check(&KeyId::new(), &s, 2).await.unwrap().allowed);
            // A refusal reports the bucket's whole refill time as its reset.
            assert!(!limiter.check(&key, &s, 1).await.unwrap().allowed);
            let refused = limiter.check(&key, &s, 1).await.unwrap();
            assert_eq!(refused.reset_secs, 10);
            // A policy change starts a fresh bucket.
            let changed = spec(4, 10_000, 4);
            let fresh = limiter.check(&key, &changed, 1).await.unwrap();
            assert_eq!((fresh.allowed, fresh.remaining), (true, 3));
        });
    }

    #[test]
    fn idle_buckets_are_reclaimed() {
        block(async {
            let clock = FakeRelativeClock::default();
            let limiter = LocalRateLimiter::new(clock.clone(), 100);
            let s = spec(10, 1000, 10);
            for _ in 0..100 {
                limiter.check(&KeyId::new(), &s, 1).await.unwrap();
            }
            assert_eq!(limiter.tracked_keys(), 100);
            clock.advance(Duration::from_secs(2)); // all full again
            limiter.check(&KeyId::new(), &s, 1).await.unwrap();
            assert_eq!(
                limiter.tracked_keys(),
                1,
                "idle buckets dropped, the bound holds"
            );
            // Busy buckets are bounded too.
            for _ in 0..250 {
                limiter.check(&KeyId::new(), &s, 1).await.unwrap();
            }
            assert!(limiter.tracked_keys() <= 100);
        });
    }

    #[test]
    fn counts_of_dropped_records_are_flushed_once_and_seen_when_reloaded() {
        let limiter = LocalRateLimiter::new(FakeRelativeClock::default(), 2);
        let now: DateTime<Utc> = "2030-05-06T07:08:09Z".parse().unwrap();
        let day = [QuotaWindow::containing(UsagePeriod::Day, now, 10)];
        let keys: Vec<KeyId> = (0..3).map(|_| KeyId::new()).collect();
        for key in &keys {
            assert!(
                limiter.count_now(key, &day, 1, 0).is_none(),
                "not loaded yet"
            );
            limiter.seed_counts(key, &day, &[5], 0);
            let counted = limiter.count_now(key, &day, 1, 0).expect("loaded");
            assert_eq!((counted.allowed, counted.windows[0].used), (true, 6));
        }
        // The third key made room: the others' records went, their units
        // kept. Reloaded from a store not flushed yet, a key still counts them.
        let dropped = keys[0];
        assert!(limiter.count_now(&dropped, &day, 0, 0).is_none());
        limiter.seed_counts(&dropped, &day, &[5], 0);
        assert_eq!(
            limiter.count_now(&dropped, &day, 0, 0).unwrap().windows[0].used,
            6
        );
        // A refusal counts nothing.
        let refused = limiter.count_now(&dropped, &day, 5, 0).unwrap();
        assert_eq!((refused.allowed, refused.windows[0].used), (false, 6));
        // Every unit is flushed exactly once; a failed flush gives them back.
        let units = limiter.take_unflushed();
        let mut per_key: Vec<(KeyId, u64)> = units.iter().map(|u| (u.0, u.3)).collect();
        per_key.sort();
        let mut expected: Vec<(KeyId, u64)> = keys.iter().map(|k| (*k, 1)).collect();
        expected.sort();
        assert_eq!(per_key, expected);
        assert!(limiter.take_unflushed().is_empty());
        limiter.restore_unflushed(units.clone());
        assert_eq!(limiter.take_unflushed(), units);
    }
}
