//! The in-process rate limiter: GCRA per key with `governor`.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Governor};

use super::{RateLimitState, RateLimiter, RateSpec};
use crate::error::{Error, Result};
use crate::id::KeyId;

type Limiter<C> = Governor<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

struct Bucket<C: Clock> {
    spec: RateSpec,
    limiter: Limiter<C>,
    last_used: C::Instant,
}

/// GCRA per key, in process. Buckets of keys idle long enough to be full
/// again are dropped when the map grows past its bound, so memory for idle
/// keys is reclaimed without forgetting anything that matters.
pub struct LocalRateLimiter<C: Clock + Clone = DefaultClock> {
    clock: C,
    max_keys: usize,
    buckets: Mutex<HashMap<KeyId, Bucket<C>, RandomState>>,
}

impl<C: Clock + Clone> fmt::Debug for LocalRateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRateLimiter")
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl Default for LocalRateLimiter {
    fn default() -> Self {
        Self::new(DefaultClock::default(), 100_000)
    }
}

impl<C: Clock + Clone> LocalRateLimiter<C> {
    /// A limiter reading time from `clock` (a `governor` clock:
    /// `FakeRelativeClock` in tests), keeping at most about `max_keys` buckets.
    pub fn new(clock: C, max_keys: usize) -> Self {
        Self {
            clock,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::default()),
        }
    }

    /// How many keys have a bucket now.
    pub fn tracked_keys(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, Bucket<C>, RandomState>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `check` on the key's bucket (made for `spec` when the key has
    /// none, or one for another spec), under the map's lock.
    fn with_limiter<T>(
        &self,
        key: &KeyId,
        spec: &RateSpec,
        check: impl FnOnce(&Limiter<C>) -> T,
    ) -> Result<T> {
        let now = self.clock.now();
        let mut buckets = self.lock();
        if let Some(bucket) = buckets.get_mut(key).filter(|b| b.spec == *spec) {
            bucket.last_used = now;
            return Ok(check(&bucket.limiter));
        }
        if buckets.len() >= self.max_keys {
            // A bucket unused for its whole refill time is full: dropping it
            // changes no decision.
            buckets.retain(|_, b| {
                let idle: Duration = now.duration_since(b.last_used).into();
                idle < refill_time(&b.spec)
            });
            if buckets.len() >= self.max_keys {
                // Every bucket is busy: forget the oldest half rather than grow.
                let mut ages: Vec<_> = buckets.iter().map(|(k, b)| (b.last_used, *k)).collect();
                ages.sort_by_key(|a| a.0);
                for (_, key) in ages.into_iter().take(self.max_keys / 2 + 1) {
                    buckets.remove(&key);
                }
            }
        }
        let burst = NonZeroU32::new(u32::try_from(spec.burst).unwrap_or(u32::MAX))
            .ok_or_else(|| Error::invalid_input("burst_limit", "must be at least 1"))?;
        let quota = Quota::with_period(spec.emission_interval())
            .ok_or_else(|| Error::invalid_input("rate_limit", "too high for its window"))?
            .allow_burst(burst);
        let limiter = Governor::direct_with_clock(quota, self.clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        let answer = check(&limiter);
        buckets.insert(
            *key,
            Bucket {
                spec: *spec,
                limiter,
                last_used: now,
            },
        );
        Ok(answer)
    }

    /// [`RateLimiter::check`] without the future: the local limiter never
    /// waits, so the engine calls this directly.
    pub fn check_now(&self, key: &KeyId, spec: &RateSpec, cost: u64) -> Result<RateLimitState> {
        let n =
            NonZeroU32::new(u32::try_from(cost.max(1)).unwrap_or(u32::MAX)).expect("at least 1");
        let decision = self.with_limiter(key, spec, |limiter| limiter.check_n(n))?;
        let interval = spec.emission_interval();
        match decision {
            Ok(Ok(snapshot)) => {
                let remaining = u64::from(snapshot.remaining_burst_capacity());
                let missing =
                    u32::try_from(spec.burst.saturating_sub(remaining)).unwrap_or(u32::MAX);
                Ok(RateLimitState {
                    allowed: true,
                    limit: spec.limit,
                    remaining,
                    reset_secs: secs_ceil(interval.saturating_mul(missing)),
                    retry_after_secs: None,
                })
            }
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Ok(RateLimitState {
                    allowed: false,
                    limit: spec.limit,
                    remaining: 0,
                    reset_secs: secs_ceil(refill_time(spec)),
                    retry_after_secs: Some(secs_ceil(wait).max(1)),
                })
            }
            // More than the whole burst at once can never pass.
            Err(_) => Ok(RateLimitState {
                allowed: false,
                limit: spec.limit,
                remaining: 0,
                reset_secs: secs_ceil(refill_time(spec)),
                retry_after_secs: Some(secs_ceil(spec.window).max(1)),
            }),
        }
    }
}

fn refill_time(spec: &RateSpec) -> Duration {
    spec.emission_interval()
        .saturating_mul(u32::try_from(spec.burst).unwrap_or(u32::MAX))
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
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
}
