//! Time, injected: the engine never reads the system clock directly, so tests
//! move time forward instead of sleeping.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;

    /// The current time in microseconds since the Unix epoch: what
    /// validation reads on its hot path, where building a calendar date
    /// would cost more than the rest of a cached validation. It must agree
    /// with [`now`](Self::now).
    fn now_micros(&self) -> i64 {
        self.now().timestamp_micros()
    }
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn now_micros(&self) -> i64 {
        // The same clock as `Utc::now`, without the calendar arithmetic.
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_micros()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
        }
    }
}

/// A clock that only moves when told to: for tests and simulations.
///
/// ```
/// use keysmith::clock::{Clock, ManualClock};
/// let clock = ManualClock::new("2030-01-01T00:00:00Z".parse().unwrap());
/// clock.advance(std::time::Duration::from_secs(3600));
/// assert_eq!(clock.now().to_rfc3339(), "2030-01-01T01:00:00+00:00");
/// ```
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Mutex::new(start),
        }
    }

    /// Move the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).expect("duration fits in chrono");
        *self.lock() += by;
    }

    /// Set the clock to an instant (which may be in the past).
    pub fn set(&self, to: DateTime<Utc>) {
        *self.lock() = to;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.lock()
    }
}

/// Timestamps are kept to microseconds, the precision every store (PostgreSQL's
/// TIMESTAMPTZ included) keeps, so a value reads back exactly as written.
pub(crate) fn store_precision(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_agree_with_now() {
        let before = Utc::now().timestamp_micros();
        let micros = SystemClock.now_micros();
        let after = Utc::now().timestamp_micros();
        assert!(
            before <= micros && micros <= after,
            "{before} {micros} {after}"
        );

        let at: DateTime<Utc> = "2028-02-29T23:59:59.123456Z".parse().unwrap();
        let manual = ManualClock::new(at);
        assert_eq!(manual.now_micros(), at.timestamp_micros());
        let before_epoch: DateTime<Utc> = "1969-12-31T23:59:59.5Z".parse().unwrap();
        manual.set(before_epoch);
        assert_eq!(manual.now_micros(), -500_000);
    }
}
