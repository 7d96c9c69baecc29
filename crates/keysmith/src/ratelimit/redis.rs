//! Rate limits and quotas kept in Redis, shared by every node.
//!
//! - [`RedisRateLimiter`]: GCRA in one Lua script per check, on the Redis
//!   server's clock, with the same semantics (and the same
//!   [`RateLimitState`]) as [`LocalRateLimiter`].
//! - [`RedisQuotaCounter`]: exact day and month counts, checked and counted in
//!   one Lua script per request: counted in every window or in none.
//!
//! Every call is bounded by [`RedisOptions::timeout`]. When Redis cannot
//! answer (down, slow, or an error), a warning is logged, the failure is
//! counted in `keysmith_redis_failures_total{component, mode}`, and
//! [`RedisOptions::on_failure`] decides: allow, refuse with
//! [`Error::Store`], or fall back to a local limiter / another counter.
//! Connections are made lazily and remade after a failure, so a Redis that
//! comes back is used again with no manual action.
//!
//! A call that timed out has an unknown outcome: its script may still run
//! once a stalled Redis catches up. That can only over-count (a bucket
//! drained, a quota unit used, by a request that was answered by the failure
//! mode), never let more through than the limits allow.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError, Script, ScriptInvocation};
use serde::{Deserialize, Serialize};

use super::{
    LocalRateLimiter, QuotaCounter, QuotaDecision, QuotaSpec, QuotaWindow, RateLimitState,
    RateLimiter, RateSpec,
};
use crate::error::{Error, Result};
use crate::id::KeyId;

/// What a limiter or counter does when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Allow the request (rate: full bucket; quota: nothing counted).
    FailOpen,
    /// Refuse with [`Error::Store`] (a 503 for the caller), never a pass.
    FailClosed,
    /// Fall back: the rate limiter to an in-process [`LocalRateLimiter`], the
    /// quota counter to the counter it was given.
    #[default]
    Local,
}

impl FailureMode {
    /// The name used in configuration and metrics (`fail_open`,
    /// `fail_closed`, `local`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
            Self::Local => "local",
        }
    }
}

impl fmt::Display for FailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fail_open" => Ok(Self::FailOpen),
            "fail_closed" => Ok(Self::FailClosed),
            "local" => Ok(Self::Local),
            _ => Err(Error::invalid_input(
                "on_failure",
                format!("`{s}` is not one of fail_open, fail_closed, local"),
            )),
        }
    }
}

/// How to use Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// The longest any call waits for Redis, connecting included (default
    /// 250 ms); past it, [`on_failure`](Self::on_failure) applies.
    pub timeout: Duration,
    /// What to do when Redis cannot answer (default [`FailureMode::Local`]).
    pub on_failure: FailureMode,
    /// Prefix of every Redis key (default `keysmith`).
    pub key_prefix: String,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(250),
            on_failure: FailureMode::Local,
            key_prefix: "keysmith".to_owned(),
        }
    }
}

// ------------------------------------------------------------------ scripts

/// GCRA, in microseconds of the server's clock (fractions kept, so an
/// interval such as 10 s / 3 is exact to well under a microsecond). KEYS[1]:
/// the bucket (its theoretical arrival time). ARGV: emission interval (µs,
/// with three decimals), burst, cost.
/// Returns {allowed, remaining, reset µs, retry-after µs}.
const RATE_SCRIPT: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tau = interval * (burst - 1)
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = tonumber(stored) or now
end
local earliest = tat + interval * (cost - 1) - tau
if now < earliest then
  return {0, 0, math.ceil(interval * burst), math.ceil(earliest - now)}
end
local nxt = math.max(tat, now) + interval * cost
redis.call('SET', KEYS[1], string.format('%.3f', nxt))
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((nxt - now) / 1000)))
local remaining = math.floor((now + tau + interval - nxt) / interval)
if remaining < 0 then remaining = 0 end
return {1, remaining, math.ceil(interval * (burst - remaining)), 0}
"#;

/// Quota windows. KEYS: one counter per window. ARGV[1]: cost; ARGV[1 + i]:
/// window i's limit; ARGV[1 + n + i]: when its counter may go (unix ms).
/// Counts in every window or in none. Returns {allowed, used_1, ..., used_n}.
const QUOTA_SCRIPT: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local n = #KEYS
local cost = tonumber(ARGV[1])
local used = {}
local fits = 1
for i = 1, n do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if used[i] + cost > tonumber(ARGV[1 + i]) then fits = 0 end
end
if fits == 1 then
  local clock = redis.call('TIME')
  local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  for i = 1, n do
    used[i] = redis.call('INCRBY', KEYS[i], ARGV[1])
    local at = tonumber(ARGV[1 + n + i])
    if at > now_ms then
      redis.call('PEXPIREAT', KEYS[i], ARGV[1 + n + i])
    else
      -- The caller's clock is behind the server's: keep the count a day.
      redis.call('PEXPIRE', KEYS[i], 86400000)
    end
  end
end
local reply = {fits}
for i = 1, n do reply[i + 1] = used[i] end
return reply
"#;

// --------------------------------------------------------------- connection

/// Why a Redis call did not give an answer.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("unexpected reply from redis: {0}")]
    BadReply(String),
}

/// A lazily made, self-healing connection: made on first use (or in the
/// background at construction), dropped after a connection-level failure and
/// made again by the next call.
struct Connection {
    client: redis::Client,
    timeout: Duration,
    current: Mutex<Option<(u64, ConnectionManager)>>,
    generation: AtomicU64,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
}

impl Connection {
    fn open(url: &str, timeout: Duration) -> Result<Arc<Self>> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid_input("redis_url", format!("not a Redis URL: {e}")))?;
        if timeout.is_zero() {
            return Err(Error::invalid_input("timeout", "must be more than zero"));
        }
        let connection = Arc::new(Self {
            client,
            timeout,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
        });
        // Connect in the background: Redis being down now is no error; calls
        // apply the failure mode and retry the connection.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let warm = connection.clone();
            runtime.spawn(async move {
                if let Ok(Err(e)) = tokio::time::timeout(warm.timeout, warm.manager()).await {
                    tracing::warn!(error = %e, "redis: not reachable yet; will retry on use");
                }
            });
        }
        Ok(connection)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(u64, ConnectionManager)>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn manager(&self) -> std::result::Result<(u64, ConnectionManager), RedisError> {
        if let Some(current) = self.slot().clone() {
            return Ok(current);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(current) = self.slot().clone() {
            return Ok(current);
        }
        // No retries inside the manager: a failed attempt is retried by the
        // next call rather than leaving calls queued behind a backoff.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let manager = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        *self.slot() = Some((generation, manager.clone()));
        Ok((generation, manager))
    }

    /// Forgets the connection `generation` (if still current), so the next
    /// call connects afresh.
    fn discard(&self, generation: u64) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    /// Runs a script, bounded by the timeout.
    async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> std::result::Result<T, Failure> {
        let mut used = None;
        let attempt = async {
            let (generation, mut manager) = self.manager().await?;
            used = Some(generation);
            invocation.invoke_async::<T>(&mut manager).await
        };
        let outcome = tokio::time::timeout(self.timeout, attempt).await;
        let broken = match &outcome {
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
            }
            Err(_) => true,
        };
        if broken {
            if let Some(generation) = used {
                self.discard(generation);
            }
        }
        match outcome {
            Ok(result) => Ok(result?),
            Err(_) => Err(Failure::Timeout(self.timeout)),
        }
    }
}

/// Failure bookkeeping for one limiter or counter: the metric on every
/// failure, a warning on the first and then at most every few seconds.
struct Health {
    component: &'static str,
    mode: FailureMode,
    failing: AtomicBool,
    last_warning: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

const WARN_EVERY: Duration = Duration::from_secs(5);

impl Health {
    fn new(component: &'static str, mode: FailureMode) -> Self {
        Self {
            component,
            mode,
            failing: AtomicBool::new(false),
            last_warning: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    fn failed(&self, failure: &Failure) {
        metrics::counter!(
            "keysmith_redis_failures_total",
            "component" => self.component,
            "mode" => self.mode.as_str(),
        )
        .increment(1);
        self.failing.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            component = self.component,
            mode = self.mode.as_str(),
            error = %failure,
            similar_failures_not_logged = suppressed,
            "redis unavailable; applying the failure mode"
        );
    }

    fn succeeded(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(component = self.component, "redis answering again");
        }
    }
}

fn unavailable(component: &str, failure: Failure) -> Error {
    Error::Store(format!("redis {component} unavailable: {failure}").into())
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn refill_time(spec: &RateSpec) -> Duration {
    spec.emission_interval()
        .saturating_mul(u32::try_from(spec.burst).unwrap_or(u32::MAX))
}

fn reply_u64(value: i64, what: &str) -> std::result::Result<u64, Failure> {
    u64::try_from(value).map_err(|_| Failure::BadReply(format!("negative {what}: {value}")))
}

// ------------------------------------------------------------- rate limiter

/// GCRA per key in Redis: one atomic script call per check, on the Redis
/// server's clock, so every node shares each key's bucket.
///
/// The bucket of a key is `{prefix}:rate:{key_id}:{limit}:{window_ns}:{burst}`
/// (a policy change starts a fresh bucket); it expires by itself once full
/// again.
pub struct RedisRateLimiter {
    connection: Arc<Connection>,
    options: RedisOptions,
    script: Script,
    local: LocalRateLimiter,
    health: Health,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedisRateLimiter {
    /// A limiter on the Redis at `url` (`redis://host:6379/`). A malformed
    /// URL is [`Error::InvalidInput`] (`redis_url`); Redis being unreachable
    /// is not an error here: the connection is made in the background and
    /// retried by later calls, which apply the failure mode meanwhile.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self> {
        let connection = Connection::open(url, options.timeout)?;
        let health = Health::new("rate_limit", options.on_failure);
        Ok(Self {
            connection,
            options,
            script: Script::new(RATE_SCRIPT),
            local: LocalRateLimiter::default(),
            health,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    fn bucket(&self, key: &KeyId, spec: &RateSpec) -> String {
        format!(
            "{}:rate:{}:{}:{}:{}",
            self.options.key_prefix,
            key,
            spec.limit,
            spec.window.as_nanos(),
            spec.burst
        )
    }

    async fn remote(
        &self,
        key: &KeyId,
        spec: &RateSpec,
        cost: u64,
        interval_us: &str,
    ) -> std::result::Result<RateLimitState, Failure> {
        let mut invocation = self.script.key(self.bucket(key, spec));
        invocation.arg(interval_us).arg(spec.burst).arg(cost);
        let reply: Vec<i64> = self.connection.run(&invocation).await?;
        let [allowed, remaining, reset_us, retry_us] = reply[..] else {
            return Err(Failure::BadReply(format!("rate script returned {reply:?}")));
        };
        let remaining = reply_u64(remaining, "remaining")?;
        let reset = Duration::from_micros(reply_u64(reset_us, "reset")?);
        let retry = Duration::from_micros(reply_u64(retry_us, "retry-after")?);
        Ok(match allowed {
            1 => RateLimitState {
                allowed: true,
                limit: spec.limit,
                remaining,
                reset_secs: secs_ceil(reset),
                retry_after_secs: None,
            },
            0 => RateLimitState {
                allowed: false,
                limit: spec.limit,
                remaining: 0,
                reset_secs: secs_ceil(reset),
                retry_after_secs: Some(secs_ceil(retry).max(1)),
            },
            other => return Err(Failure::BadReply(format!("rate script allowed = {other}"))),
        })
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(&self, key: &KeyId, spec: &RateSpec, cost: u64) -> Result<RateLimitState> {
        // The same refusals of bad specs as the local limiter.
        if spec.burst == 0 {
            return Err(Error::invalid_input("burst_limit", "must be at least 1"));
        }
        let interval = spec.emission_interval();
        if interval.is_zero() {
            return Err(Error::invalid_input(
                "rate_limit",
                "too high for its window",
            ));
        }
        let cost = cost.clamp(1, u64::from(u32::MAX));
        // More than the whole burst at once can never pass: no round trip.
        if cost > spec.burst {
            return Ok(RateLimitState {
                allowed: false,
                limit: spec.limit,
                remaining: 0,
                reset_secs: secs_ceil(refill_time(spec)),
                retry_after_secs: Some(secs_ceil(spec.window).max(1)),
            });
        }
        let nanos = interval.as_nanos();
        let interval_us = format!("{}.{:03}", nanos / 1000, nanos % 1000);
        match self.remote(key, spec, cost, &interval_us).await {
            Ok(state) => {
                self.health.succeeded();
                Ok(state)
            }
            Err(failure) => {
                self.health.failed(&failure);
                match self.options.on_failure {
                    FailureMode::FailOpen => Ok(RateLimitState {
                        allowed: true,
                        limit: spec.limit,
                        remaining: spec.limit,
                        reset_secs: 0,
                        retry_after_secs: None,
                    }),
                    FailureMode::FailClosed => Err(unavailable("rate limiter", failure)),
                    FailureMode::Local => self.local.check(key, spec, cost).await,
                }
            }
        }
    }
}

// ------------------------------------------------------------ quota counter

/// Lua counts in doubles: integers up to 2^53 are exact.
const MAX_EXACT: u64 = 1 << 53;

/// Exact quota counts in Redis: one atomic script call per request checks
/// every window (`{prefix}:quota:{key_id}:{day|month}:{start_unix}`) and
/// counts in all of them or in none. Counters expire a day after their
/// window ends.
pub struct RedisQuotaCounter {
    connection: Arc<Connection>,
    options: RedisOptions,
    script: Script,
    fallback: Arc<dyn QuotaCounter>,
    health: Health,
}

impl fmt::Debug for RedisQuotaCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQuotaCounter")
            .field("options", &self.options)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl RedisQuotaCounter {
    /// A counter on the Redis at `url`, falling back to `fallback` when Redis
    /// cannot answer and the mode is [`FailureMode::Local`]. A malformed URL
    /// is [`Error::InvalidInput`] (`redis_url`); Redis being unreachable is
    /// not an error here.
    pub async fn connect(
        url: &str,
        options: RedisOptions,
        fallback: Arc<dyn QuotaCounter>,
    ) -> Result<Self> {
        let connection = Connection::open(url, options.timeout)?;
        let health = Health::new("quota", options.on_failure);
        Ok(Self {
            connection,
            options,
            script: Script::new(QUOTA_SCRIPT),
            fallback,
            health,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    async fn remote(
        &self,
        key: &KeyId,
        windows: &[QuotaWindow],
        cost: u64,
    ) -> std::result::Result<QuotaDecision, Failure> {
        let mut invocation = self.script.prepare_invoke();
        for w in windows {
            invocation.key(format!(
                "{}:quota:{}:{}:{}",
                self.options.key_prefix,
                key,
                w.period.as_str(),
                w.start.timestamp()
            ));
        }
        invocation.arg(cost);
        for w in windows {
            // Past 2^53 a limit is unreachable anyway.
            invocation.arg(w.limit.min(MAX_EXACT));
        }
        for w in windows {
            let keep_until = w.end + chrono::Duration::days(1);
            invocation.arg(keep_until.timestamp_millis());
        }
        let reply: Vec<i64> = self.connection.run(&invocation).await?;
        let Some((&allowed, used)) = reply
            .split_first()
            .filter(|(_, u)| u.len() == windows.len())
        else {
            return Err(Failure::BadReply(format!(
                "quota script returned {reply:?}"
            )));
        };
        let used = used
            .iter()
            .map(|&u| reply_u64(u, "count"))
            .collect::<Result<Vec<_>, _>>()?;
        let allowed = match allowed {
            1 => true,
            0 => false,
            other => return Err(Failure::BadReply(format!("quota script allowed = {other}"))),
        };
        Ok(QuotaDecision::from_counts(windows, &used, allowed))
    }
}

#[async_trait]
impl QuotaCounter for RedisQuotaCounter {
    async fn consume(
        &self,
        key: &KeyId,
        spec: &QuotaSpec,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<QuotaDecision> {
        let windows = spec.windows(now);
        if windows.is_empty() {
            return Ok(QuotaDecision {
                allowed: true,
                windows: super::QuotaStates::EMPTY,
            });
        }
        if cost > MAX_EXACT {
            return Err(Error::invalid_input("cost", "too large to count in Redis"));
        }
        match self.remote(key, &windows, cost).await {
            Ok(decision) => {
                self.health.succeeded();
                Ok(decision)
            }
            Err(failure) => {
                self.health.failed(&failure);
                match self.options.on_failure {
                    FailureMode::FailOpen => Ok(QuotaDecision::from_counts(
                        &windows,
                        &vec![0; windows.len()],
                        true,
                    )),
                    FailureMode::FailClosed => Err(unavailable("quota counter", failure)),
                    FailureMode::Local => self.fallback.consume(key, spec, cost, now).await,
                }
            }
        }
    }
}
