//! Rate limits and quotas: steps 6 and 7 of validation.
//!
//! - A [`RateLimiter`] answers "may this key make a request now?" with GCRA
//!   (a steady rate per window plus a burst). [`LocalRateLimiter`] keeps its
//!   state in process; the `redis` feature adds a limiter shared by every node.
//! - A [`QuotaCounter`] counts successful validations per UTC day and month,
//!   exactly, and refuses (consuming nothing) once a quota is used up.
//!   [`StoreQuotaCounter`] keeps the counts in the store (they survive a
//!   restart and are shared by nodes on one PostgreSQL); the `redis` feature
//!   adds a Redis-backed counter.

pub(crate) mod local;
#[cfg(feature = "redis")]
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::Serialize;

pub use local::LocalRateLimiter;

use crate::error::Result;
use crate::id::KeyId;
use crate::model::UsagePeriod;
use crate::policy::PolicySpec;
use crate::store::Store;

/// A key's rate limit: `limit` requests per `window`, with bursts of up to
/// `burst` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateSpec {
    /// Requests per window.
    pub limit: u64,
    /// The window.
    pub window: Duration,
    /// Largest burst (the bucket's size).
    pub burst: u64,
}

impl RateSpec {
    /// The rate limit a policy sets, if any (window default one second, burst
    /// default the limit).
    pub fn of(spec: &PolicySpec) -> Option<Self> {
        let limit = spec.rate_limit?;
        Some(Self {
            limit,
            window: spec.rate_limit_window.unwrap_or(Duration::from_secs(1)),
            burst: spec.burst_limit.unwrap_or(limit),
        })
    }

    /// The time one request's worth of capacity takes to come back.
    pub fn emission_interval(&self) -> Duration {
        self.window / u32::try_from(self.limit.max(1)).unwrap_or(u32::MAX)
    }
}

/// A rate limiter's answer.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimitState {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The policy's limit per window (`RateLimit-Limit`).
    pub limit: u64,
    /// Requests that could still be made at once (`RateLimit-Remaining`).
    pub remaining: u64,
    /// Seconds until the bucket is full again (`RateLimit-Reset`).
    pub reset_secs: u64,
    /// Seconds to wait before retrying, when refused (`Retry-After`).
    pub retry_after_secs: Option<u64>,
}

impl RateLimitState {
    /// The HTTP headers of this state: `RateLimit-Limit`, `RateLimit-Remaining`,
    /// `RateLimit-Reset` (seconds), and `Retry-After` when refused.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("RateLimit-Limit", self.limit.to_string()),
            ("RateLimit-Remaining", self.remaining.to_string()),
            ("RateLimit-Reset", self.reset_secs.to_string()),
        ];
        if let Some(retry) = self.retry_after_secs {
            headers.push(("Retry-After", retry.to_string()));
        }
        headers
    }
}

/// Decides whether a key may make a request now.
#[async_trait]
pub trait RateLimiter: Send + Sync + fmt::Debug + 'static {
    /// Takes `cost` requests' worth of capacity from the key's bucket, or
    /// refuses without taking any.
    async fn check(&self, key: &KeyId, spec: &RateSpec, cost: u64) -> Result<RateLimitState>;
}

/// A key's quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaSpec {
    /// Successful validations per UTC day.
    pub daily: Option<u64>,
    /// Successful validations per UTC month.
    pub monthly: Option<u64>,
}

impl QuotaSpec {
    /// The quotas a policy sets (`None` when it sets none).
    pub fn of(spec: &PolicySpec) -> Option<Self> {
        let quota = Self {
            daily: spec.daily_quota,
            monthly: spec.monthly_quota,
        };
        (quota.daily.is_some() || quota.monthly.is_some()).then_some(quota)
    }

    /// The counting windows at `now`, written into `buf` without allocating:
    /// the daily window first, then the monthly one.
    pub fn windows_in<'a>(
        &self,
        now: DateTime<Utc>,
        buf: &'a mut [QuotaWindow; 2],
    ) -> &'a [QuotaWindow] {
        let mut n = 0;
        for (period, limit) in [
            (UsagePeriod::Day, self.daily),
            (UsagePeriod::Month, self.monthly),
        ] {
            if let Some(limit) = limit {
                buf[n] = QuotaWindow::containing(period, now, limit);
                n += 1;
            }
        }
        &buf[..n]
    }

    /// [`windows_in`](Self::windows_in) at `now_us` (Unix microseconds), for
    /// validation's hot path: each period's bounds are worked out once per
    /// UTC day per thread, not at every call.
    pub(crate) fn windows_at<'a>(
        &self,
        now_us: i64,
        buf: &'a mut [QuotaWindow; 2],
    ) -> &'a [QuotaWindow] {
        thread_local! {
            static CALENDAR: std::cell::RefCell<Calendar> = const {
                std::cell::RefCell::new(Calendar::NONE)
            };
        }
        // Read in place (a copy of the whole calendar cost a stalled load).
        let n = CALENDAR.with_borrow_mut(|calendar| {
            // The day held is checked by its bounds: two comparisons, no
            // division.
            if !(calendar.day_us.0 <= now_us && now_us < calendar.day_us.1) {
                let Some(now) = DateTime::from_timestamp_micros(now_us) else {
                    return 0;
                };
                let day = period_bounds(UsagePeriod::Day, now);
                *calendar = Calendar {
                    day_us: (day.0.timestamp_micros(), day.1.timestamp_micros()),
                    bounds: [day, period_bounds(UsagePeriod::Month, now)],
                };
            }
            let mut n = 0;
            let mut add = |period, (start, end), limit| {
                buf[n] = QuotaWindow {
                    period,
                    start,
                    end,
                    limit,
                };
                n += 1;
            };
            if let Some(limit) = self.daily {
                add(UsagePeriod::Day, calendar.bounds[0], limit);
            }
            if let Some(limit) = self.monthly {
                add(UsagePeriod::Month, calendar.bounds[1], limit);
            }
            n
        });
        &buf[..n]
    }

    /// The counting windows at `now`: each period's start, end and limit.
    pub fn windows(&self, now: DateTime<Utc>) -> Vec<QuotaWindow> {
        let mut windows = Vec::with_capacity(2);
        if let Some(limit) = self.daily {
            windows.push(QuotaWindow::containing(UsagePeriod::Day, now, limit));
        }
        if let Some(limit) = self.monthly {
            windows.push(QuotaWindow::containing(UsagePeriod::Month, now, limit));
        }
        windows
    }
}

/// The day and month bounds of one UTC day.
#[derive(Debug, Clone, Copy)]
struct Calendar {
    /// The day's [start, end) in Unix microseconds.
    day_us: (i64, i64),
    /// The day's and the month's (start, end).
    bounds: [(DateTime<Utc>, DateTime<Utc>); 2],
}

impl Calendar {
    /// No day held (an empty range).
    const NONE: Self = Self {
        day_us: (0, 0),
        bounds: [(DateTime::UNIX_EPOCH, DateTime::UNIX_EPOCH); 2],
    };
}

/// One counting window of a quota: a UTC day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWindow {
    /// Day or month.
    pub period: UsagePeriod,
    /// First instant of the window.
    pub start: DateTime<Utc>,
    /// First instant after it (when the quota resets).
    pub end: DateTime<Utc>,
    /// Units allowed in the window.
    pub limit: u64,
}

impl QuotaWindow {
    /// The window of `period` that contains `now`.
    pub fn containing(period: UsagePeriod, now: DateTime<Utc>, limit: u64) -> Self {
        let (start, end) = period_bounds(period, now);
        Self {
            period,
            start,
            end,
            limit,
        }
    }
}

/// The UTC day or month containing `now`: its first instant and the next
/// period's first instant.
pub fn period_bounds(period: UsagePeriod, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let midnight =
        |d: chrono::NaiveDate| Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN));
    match period {
        // UTC days are 86 400 seconds of Unix time: no calendar needed.
        UsagePeriod::Day => {
            let start = now.timestamp().div_euclid(86_400) * 86_400;
            let at = |secs: i64| DateTime::from_timestamp(secs, 0).unwrap_or(now);
            (at(start), at(start + 86_400))
        }
        UsagePeriod::Month => {
            let first = now.date_naive().with_day(1).expect("day 1 exists");
            let next = if first.month() == 12 {
                chrono::NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
            } else {
                chrono::NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
            }
            .unwrap_or(chrono::NaiveDate::MAX);
            (midnight(first), midnight(next))
        }
    }
}

/// A quota window's state after a request.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaState {
    /// Day or month.
    pub period: UsagePeriod,
    /// Units allowed.
    pub limit: u64,
    /// Units used, this request included when it was allowed.
    pub used: u64,
    /// Units left.
    pub remaining: u64,
    /// When the window starts again.
    pub resets_at: DateTime<Utc>,
}

/// The states of a key's quota windows: the daily one, then the monthly
/// one, each when the policy sets it. At most two, so they are kept inline
/// (a validation allocates nothing for them); read them as a slice. States
/// past the second are not kept.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct QuotaStates {
    len: u8,
    states: [QuotaState; 2],
}

impl QuotaStates {
    /// No windows.
    pub const EMPTY: Self = Self {
        len: 0,
        states: [QuotaState {
            period: UsagePeriod::Day,
            limit: 0,
            used: 0,
            remaining: 0,
            resets_at: DateTime::UNIX_EPOCH,
        }; 2],
    };
}

impl Default for QuotaStates {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl std::ops::Deref for QuotaStates {
    type Target = [QuotaState];

    fn deref(&self) -> &[QuotaState] {
        &self.states[..usize::from(self.len)]
    }
}

impl fmt::Debug for QuotaStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl FromIterator<QuotaState> for QuotaStates {
    fn from_iter<I: IntoIterator<Item = QuotaState>>(iter: I) -> Self {
        let mut states = Self::EMPTY;
        for (slot, state) in states.states.iter_mut().zip(iter) {
            *slot = state;
            states.len += 1;
        }
        states
    }
}

impl<'a> IntoIterator for &'a QuotaStates {
    type Item = &'a QuotaState;
    type IntoIter = std::slice::Iter<'a, QuotaState>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Serialize for QuotaStates {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// Whether `cost` more units fit in every window, each having used `used`
/// (in the same order): a request is counted in all of them or in none.
pub(crate) fn fits_all(windows: &[QuotaWindow], used: &[u64], cost: u64) -> bool {
    windows
        .iter()
        .zip(used)
        .all(|(w, &u)| u.saturating_add(cost) <= w.limit)
}

/// A quota counter's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaDecision {
    /// Whether the request fits every window (and was counted).
    pub allowed: bool,
    /// Every window's state.
    pub windows: QuotaStates,
}

impl QuotaDecision {
    /// When the first exhausted window resets (for `QuotaExceeded`).
    pub fn resets_at(&self) -> Option<DateTime<Utc>> {
        self.windows
            .iter()
            .filter(|w| w.used >= w.limit)
            .map(|w| w.resets_at)
            .max()
    }

    /// Builds the decision from the counts each window holds after the call.
    pub fn from_counts(windows: &[QuotaWindow], used: &[u64], allowed: bool) -> Self {
        let windows = windows
            .iter()
            .zip(used)
            .map(|(w, &used)| QuotaState {
                period: w.period,
                limit: w.limit,
                used,
                remaining: w.limit.saturating_sub(used),
                resets_at: w.end,
            })
            .collect();
        Self { allowed, windows }
    }
}

/// Counts quota units, exactly: a request is counted in every window or in
/// none.
#[async_trait]
pub trait QuotaCounter: Send + Sync + fmt::Debug + 'static {
    /// Adds `cost` to every window of `spec` at `now` if each stays within its
    /// limit; otherwise changes nothing and refuses.
    async fn consume(
        &self,
        key: &KeyId,
        spec: &QuotaSpec,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<QuotaDecision>;
}

/// [`StoreQuotaCounter::consume`], for callers that hold the store.
pub(crate) async fn consume_in_store(
    store: &dyn Store,
    key: &KeyId,
    spec: &QuotaSpec,
    cost: u64,
    now: DateTime<Utc>,
) -> Result<QuotaDecision> {
    let unused = QuotaWindow {
        period: UsagePeriod::Day,
        start: now,
        end: now,
        limit: 0,
    };
    let mut buf = [unused; 2];
    let windows = spec.windows_in(now, &mut buf);
    store.consume_quota(key, windows, cost).await
}

/// Quota counts kept in the store: exact across nodes sharing one database,
/// and a count that was acknowledged is never lost (it is committed before
/// the validation answers).
#[derive(Debug, Clone)]
pub struct StoreQuotaCounter {
    store: Arc<dyn Store>,
}

impl StoreQuotaCounter {
    /// Counts in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl QuotaCounter for StoreQuotaCounter {
    async fn consume(
        &self,
        key: &KeyId,
        spec: &QuotaSpec,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<QuotaDecision> {
        consume_in_store(&*self.store, key, spec, cost, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_states_are_a_slice_of_at_most_two_and_serialize_as_a_list() {
        let state = |used| QuotaState {
            period: UsagePeriod::Day,
            limit: 10,
            used,
            remaining: 10 - used,
            resets_at: DateTime::UNIX_EPOCH,
        };
        assert!(QuotaStates::EMPTY.is_empty());
        let two: QuotaStates = [state(1), state(2)].into_iter().collect();
        assert_eq!(two.iter().map(|s| s.used).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(two[1].remaining, 8);
        let three: QuotaStates = [state(1), state(2), state(3)].into_iter().collect();
        assert_eq!(three.len(), 2, "a third state is not kept");
        let json = serde_json::to_value(two).unwrap();
        assert_eq!(json.as_array().map(Vec::len), Some(2));
        assert_eq!(json[0]["used"], 1);
        assert_eq!(serde_json::to_string(&QuotaStates::EMPTY).unwrap(), "[]");
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn periods_roll_over_at_utc_boundaries() {
        let cases = [
            (
                UsagePeriod::Day,
                "2030-03-04T23:59:59.999Z",
                "2030-03-04T00:00:00Z",
                "2030-03-05T00:00:00Z",
            ),
            (
                UsagePeriod::Day,
                "2030-03-05T00:00:00Z",
                "2030-03-05T00:00:00Z",
                "2030-03-06T00:00:00Z",
            ),
            (
                UsagePeriod::Day,
                "2028-02-28T12:00:00Z",
                "2028-02-28T00:00:00Z",
                "2028-02-29T00:00:00Z",
            ),
            (
                UsagePeriod::Day,
                "2028-02-29T12:00:00Z",
                "2028-02-29T00:00:00Z",
                "2028-03-01T00:00:00Z",
            ),
            (
                UsagePeriod::Day,
                "2030-12-31T23:00:00Z",
                "2030-12-31T00:00:00Z",
                "2031-01-01T00:00:00Z",
            ),
            (
                UsagePeriod::Month,
                "2028-02-29T23:59:59Z",
                "2028-02-01T00:00:00Z",
                "2028-03-01T00:00:00Z",
            ),
            (
                UsagePeriod::Month,
                "2030-01-31T23:59:59Z",
                "2030-01-01T00:00:00Z",
                "2030-02-01T00:00:00Z",
            ),
            (
                UsagePeriod::Month,
                "2030-12-15T00:00:00Z",
                "2030-12-01T00:00:00Z",
                "2031-01-01T00:00:00Z",
            ),
            (
                UsagePeriod::Month,
                "2030-04-30T23:59:59Z",
                "2030-04-01T00:00:00Z",
                "2030-05-01T00:00:00Z",
            ),
        ];
        let both = QuotaSpec {
            daily: Some(7),
            monthly: Some(9),
        };
        for (period, now, start, end) in cases {
            assert_eq!(
                period_bounds(period, t(now)),
                (t(start), t(end)),
                "{period:?} {now}"
            );
            // The per-thread calendar of the hot path agrees, day after day
            // and back again.
            let mut a = [QuotaWindow::containing(UsagePeriod::Day, t(now), 0); 2];
            let mut b = a;
            assert_eq!(
                both.windows_at(t(now).timestamp_micros(), &mut a),
                both.windows_in(t(now), &mut b),
                "{now}"
            );
        }
        // Not UTC-local: an instant given with an offset is counted in its UTC day.
        let offset: DateTime<Utc> =
            chrono::DateTime::parse_from_rfc3339("2030-03-05T01:00:00+02:00")
                .unwrap()
                .into();
        assert_eq!(
            period_bounds(UsagePeriod::Day, offset).0,
            t("2030-03-04T00:00:00Z")
        );
    }

    #[test]
    fn headers_follow_the_state() {
        let refused = RateLimitState {
            allowed: false,
            limit: 10,
            remaining: 0,
            reset_secs: 6,
            retry_after_secs: Some(2),
        };
        let names: Vec<(&str, String)> = refused.headers();
        assert_eq!(
            names,
            [
                ("RateLimit-Limit", "10".to_owned()),
                ("RateLimit-Remaining", "0".to_owned()),
                ("RateLimit-Reset", "6".to_owned()),
                ("Retry-After", "2".to_owned()),
            ]
        );
        let allowed = RateLimitState {
            allowed: true,
            retry_after_secs: None,
            ..refused
        };
        assert_eq!(allowed.headers().len(), 3);
    }

    #[test]
    fn specs_come_from_policies() {
        let mut policy = PolicySpec {
            name: "p".into(),
            ..Default::default()
        };
        assert_eq!(RateSpec::of(&policy), None);
        assert_eq!(QuotaSpec::of(&policy), None);
        policy.rate_limit = Some(10);
        let rate = RateSpec::of(&policy).unwrap();
        assert_eq!(
            (rate.limit, rate.window, rate.burst),
            (10, Duration::from_secs(1), 10)
        );
        assert_eq!(rate.emission_interval(), Duration::from_millis(100));
        policy.daily_quota = Some(5);
        let quota = QuotaSpec::of(&policy).unwrap();
        let windows = quota.windows(t("2030-03-04T10:00:00Z"));
        assert_eq!(windows.len(), 1);
        assert_eq!((windows[0].period, windows[0].limit), (UsagePeriod::Day, 5));
        let decision = QuotaDecision::from_counts(&windows, &[5], true);
        assert_eq!(decision.windows[0].remaining, 0);
        assert_eq!(decision.resets_at(), Some(t("2030-03-05T00:00:00Z")));
    }
}
