//! The Redis rate limiter and quota counter, against a real Redis.
//!
//! `scripts/test` starts a throwaway Redis and exports
//! `KEYSMITH_TEST_REDIS_URL`; the failure-mode test starts (and kills) a
//! private `redis-server` of its own.

#![cfg(feature = "redis")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use keysmith::ratelimit::redis::{FailureMode, RedisOptions, RedisQuotaCounter, RedisRateLimiter};
use keysmith::ratelimit::{
    LocalRateLimiter, QuotaCounter, QuotaSpec, RateLimiter, RateSpec, StoreQuotaCounter,
};
use keysmith::{
    Clock, CreateKey, Engine, Error, KeyId, ManualClock, MemoryStore, PolicySpec, RequestContext,
    Store, Tenant, UsagePeriod,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

// ------------------------------------------------------------------ helpers

fn redis_url() -> String {
    std::env::var("KEYSMITH_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "KEYSMITH_TEST_REDIS_URL is not set: run the Redis tests through `scripts/test`, \
             which starts a throwaway Redis (or start one and export the variable)"
        )
    })
}

/// Options with a key prefix of its own, so tests sharing the server never
/// see each other's keys.
fn options(test: &str, on_failure: FailureMode, timeout: Duration) -> RedisOptions {
    RedisOptions {
        timeout,
        on_failure,
        key_prefix: format!("keysmith-test:{test}:{}", uuid::Uuid::now_v7()),
    }
}

fn spec(limit: u64, window: Duration, burst: u64) -> RateSpec {
    RateSpec {
        limit,
        window,
        burst,
    }
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn get(url: &str, key: &str) -> Option<i64> {
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut raw(url).await)
        .await
        .unwrap()
}

async fn pttl(url: &str, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut raw(url).await)
        .await
        .unwrap()
}

fn bucket_key(prefix: &str, key: &KeyId, s: &RateSpec) -> String {
    format!(
        "{prefix}:rate:{key}:{}:{}:{}",
        s.limit,
        s.window.as_nanos(),
        s.burst
    )
}

fn quota_key(prefix: &str, key: &KeyId, period: UsagePeriod, start: DateTime<Utc>) -> String {
    format!(
        "{prefix}:quota:{key}:{}:{}",
        period.as_str(),
        start.timestamp()
    )
}

/// An engine whose quotas are counted by `counter`, and a key under a policy
/// with `policy`'s limits.
async fn engine_with_key(
    store: Arc<dyn Store>,
    counter: Arc<dyn QuotaCounter>,
    clock: Option<Arc<ManualClock>>,
    policy: PolicySpec,
) -> (Engine, String, KeyId) {
    let mut builder = Engine::builder(store).quota_counter(counter);
    if let Some(clock) = clock {
        builder = builder.clock(clock);
    }
    let engine = builder.build();
    let tenant = Tenant::new("app", "tenant").unwrap();
    let policy = engine.create_policy(&tenant, policy).await.unwrap();
    let created = engine
        .create_key(
            &tenant,
            CreateKey {
                name: "k".into(),
                policy_id: Some(policy.id),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    (
        engine,
        created.raw_key.expose_secret().to_owned(),
        created.key.id,
    )
}

fn quota_policy(daily: Option<u64>, monthly: Option<u64>) -> PolicySpec {
    PolicySpec {
        name: format!("quota-{}", uuid::Uuid::now_v7()),
        daily_quota: daily,
        monthly_quota: monthly,
        ..Default::default()
    }
}

// ---------------------------------------------------------- options, parsing

#[test]
fn failure_modes_parse_and_serialize() {
    for (mode, name) in [
        (FailureMode::FailOpen, "fail_open"),
        (FailureMode::FailClosed, "fail_closed"),
        (FailureMode::Local, "local"),
    ] {
        assert_eq!(name.parse::<FailureMode>().unwrap(), mode);
        assert_eq!(mode.to_string(), name);
        assert_eq!(serde_json::to_string(&mode).unwrap(), format!("\"{name}\""));
        assert_eq!(
            serde_json::from_str::<FailureMode>(&format!("\"{name}\"")).unwrap(),
            mode
        );
    }
    match "open".parse::<FailureMode>() {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "on_failure"),
        other => panic!("{other:?}"),
    }
    assert!(serde_json::from_str::<FailureMode>("\"FailOpen\"").is_err());
    assert_eq!(FailureMode::default(), FailureMode::Local);
    let defaults = RedisOptions::default();
    assert_eq!(defaults.timeout, Duration::from_millis(250));
    assert_eq!(defaults.on_failure, FailureMode::Local);
    assert_eq!(defaults.key_prefix, "keysmith");
}

#[tokio::test]
async fn a_malformed_url_is_refused_but_a_down_redis_is_not() {
    let fallback: Arc<dyn QuotaCounter> =
        Arc::new(StoreQuotaCounter::new(Arc::new(MemoryStore::new())));
    for url in ["not a url", "http://127.0.0.1:6379/", "redis://"] {
        match RedisRateLimiter::connect(url, RedisOptions::default()).await {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "redis_url", "{url}"),
            other => panic!("{url}: {other:?}"),
        }
        match RedisQuotaCounter::connect(url, RedisOptions::default(), fallback.clone()).await {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "redis_url", "{url}"),
            other => panic!("{url}: {other:?}"),
        }
    }
    // Nothing listens there: still constructed; calls apply the failure mode.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let opts = options("down", FailureMode::FailClosed, Duration::from_millis(250));
    let limiter = RedisRateLimiter::connect(&url, opts.clone()).await.unwrap();
    let counter = RedisQuotaCounter::connect(&url, opts, fallback)
        .await
        .unwrap();
    let started = Instant::now();
    let s = spec(3, Duration::from_secs(10), 3);
    assert!(matches!(
        limiter.check(&KeyId::new(), &s, 1).await,
        Err(Error::Store(_))
    ));
    let quota = QuotaSpec {
        daily: Some(1),
        monthly: None,
    };
    assert!(matches!(
        counter.consume(&KeyId::new(), &quota, 1, Utc::now()).await,
        Err(Error::Store(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

// --------------------------------------------------------------------- GCRA

#[tokio::test]
async fn gcra_on_the_server_matches_the_local_limiter() {
    let url = redis_url();
    let opts = options("gcra", FailureMode::FailClosed, Duration::from_secs(5));
    let prefix = opts.key_prefix.clone();
    let limiter = RedisRateLimiter::connect(&url, opts).await.unwrap();
    let local = LocalRateLimiter::default();
    let key = KeyId::new();
    let s = spec(3, Duration::from_secs(10), 3); // 3 per 10 s, bursts of 3

    // A burst of 3: the same answers as the in-process limiter.
    for expected_remaining in [2, 1, 0] {
        let state = limiter.check(&key, &s, 1).await.unwrap();
        assert_eq!(state, local.check(&key, &s, 1).await.unwrap());
        assert!(state.allowed);
        assert_eq!((state.limit, state.remaining), (3, expected_remaining));
    }
    // The state lives in Redis and expires by itself once the bucket is full.
    let ttl = pttl(&url, &bucket_key(&prefix, &key, &s)).await;
    assert!(ttl > 0 && ttl <= 10_000, "pttl {ttl}");

    // The 4th immediate call is refused, with Retry-After.
    let refused = limiter.check(&key, &s, 1).await.unwrap();
    let local_refused = local.check(&key, &s, 1).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    let retry = refused.retry_after_secs.unwrap();
    assert!((1..=4).contains(&retry), "retry after {retry}");
    assert_eq!(refused.reset_secs, local_refused.reset_secs);
    assert_eq!(
        (refused.limit, refused.remaining),
        (local_refused.limit, local_refused.remaining)
    );

    // A cost larger than the burst never passes, even on a full bucket.
    let other = KeyId::new();
    let too_big = limiter.check(&other, &s, 4).await.unwrap();
    assert!(!too_big.allowed);
    assert_eq!(too_big, local.check(&other, &s, 4).await.unwrap());
    // Other keys have their own buckets: a full burst at once.
    let state = limiter.check(&other, &s, 3).await.unwrap();
    assert!(state.allowed);
    assert_eq!(state.remaining, 0);
    assert!(!limiter.check(&other, &s, 1).await.unwrap().allowed);
    // A policy change starts a fresh bucket.
    let changed = spec(4, Duration::from_secs(10), 4);
    assert!(limiter.check(&key, &changed, 1).await.unwrap().allowed);
}

#[tokio::test]
async fn allowed_never_exceeds_burst_plus_rate_times_elapsed() {
    let url = redis_url();
    let opts = options("rate", FailureMode::FailClosed, Duration::from_secs(5));
    let limiter = RedisRateLimiter::connect(&url, opts).await.unwrap();
    let key = KeyId::new();
    let s = spec(20, Duration::from_secs(1), 5); // 20/s, bursts of 5
    let started = Instant::now();
    let mut allowed = 0u64;
    let mut refused = 0u64;
    while started.elapsed() < Duration::from_millis(1500) {
        for _ in 0..3 {
            if limiter.check(&key, &s, 1).await.unwrap().allowed {
                allowed += 1;
            } else {
                refused += 1;
            }
        }
        // Every server-side instant so far lies within `elapsed` of the first.
        let elapsed = started.elapsed().as_secs_f64();
        let bound = 5.0 + 20.0 * elapsed + 1.0;
        assert!(
            (allowed as f64) <= bound,
            "{allowed} allowed in {elapsed:.3} s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(refused > 0, "the greedy client was refused sometimes");
    assert!(
        (allowed as f64) >= 5.0 + 20.0 * (elapsed - 0.1) - 2.0,
        "the rate is actually granted: {allowed} in {elapsed:.3} s"
    );
}

// ------------------------------------------------------------------- quotas

async fn hammer(engines: &[Engine], raw_key: &str, calls: usize) -> (usize, usize) {
    let mut tasks = Vec::with_capacity(calls);
    for i in 0..calls {
        let engine = engines[i % engines.len()].clone();
        let raw_key = raw_key.to_owned();
        tasks.push(tokio::spawn(async move {
            engine.validate(&raw_key, &RequestContext::default()).await
        }));
    }
    let (mut allowed, mut exceeded) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(valid) => {
                allowed += 1;
                assert_eq!(valid.quota.len(), 1);
                assert!(valid.quota[0].used <= 100);
            }
            Err(Error::QuotaExceeded { .. }) => exceeded += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    (allowed, exceeded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_daily_quota_is_exact_under_concurrency() {
    let url = redis_url();
    let opts = options("quota-one", FailureMode::FailClosed, Duration::from_secs(5));
    let prefix = opts.key_prefix.clone();
    let fallback = Arc::new(StoreQuotaCounter::new(Arc::new(MemoryStore::new())));
    let counter = RedisQuotaCounter::connect(&url, opts, fallback)
        .await
        .unwrap();
    let (engine, raw_key, key_id) = engine_with_key(
        Arc::new(MemoryStore::new()),
        Arc::new(counter),
        None,
        quota_policy(Some(100), None),
    )
    .await;
    let (allowed, exceeded) = hammer(std::slice::from_ref(&engine), &raw_key, 500).await;
    assert_eq!((allowed, exceeded), (100, 400));
    // The refused 400 counted nothing.
    let start = keysmith::ratelimit::period_bounds(UsagePeriod::Day, engine.clock().now()).0;
    assert_eq!(
        get(&url, &quota_key(&prefix, &key_id, UsagePeriod::Day, start)).await,
        Some(100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_nodes_share_one_quota() {
    let url = redis_url();
    let opts = options("quota-two", FailureMode::FailClosed, Duration::from_secs(5));
    let prefix = opts.key_prefix.clone();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fallback: Arc<dyn QuotaCounter> = Arc::new(StoreQuotaCounter::new(store.clone()));
    // Two counters, two connections: like two nodes.
    let node_a = RedisQuotaCounter::connect(&url, opts.clone(), fallback.clone())
        .await
        .unwrap();
    let node_b = RedisQuotaCounter::connect(&url, opts, fallback)
        .await
        .unwrap();
    let (engine_a, raw_key, key_id) = engine_with_key(
        store.clone(),
        Arc::new(node_a),
        None,
        quota_policy(Some(100), None),
    )
    .await;
    let engine_b = Engine::builder(store)
        .quota_counter(Arc::new(node_b))
        .build();
    let (allowed, exceeded) = hammer(&[engine_a.clone(), engine_b], &raw_key, 500).await;
    assert_eq!((allowed, exceeded), (100, 400));
    let start = keysmith::ratelimit::period_bounds(UsagePeriod::Day, engine_a.clock().now()).0;
    assert_eq!(
        get(&url, &quota_key(&prefix, &key_id, UsagePeriod::Day, start)).await,
        Some(100)
    );
}

#[tokio::test]
async fn denials_consume_nothing_and_days_roll_over() {
    let url = redis_url();
    let opts = options("rollover", FailureMode::FailClosed, Duration::from_secs(5));
    let prefix = opts.key_prefix.clone();
    let fallback = Arc::new(StoreQuotaCounter::new(Arc::new(MemoryStore::new())));
    let counter = Arc::new(
        RedisQuotaCounter::connect(&url, opts, fallback)
            .await
            .unwrap(),
    );
    let clock = Arc::new(ManualClock::new(t("2030-03-04T23:59:00Z")));
    let (engine, raw_key, key_id) = engine_with_key(
        Arc::new(MemoryStore::new()),
        counter.clone(),
        Some(clock.clone()),
        quota_policy(Some(3), Some(5)),
    )
    .await;
    let ctx = RequestContext::default();

    for used in 1..=3 {
        let valid = engine.validate(&raw_key, &ctx).await.unwrap();
        assert_eq!(valid.quota[0].period, UsagePeriod::Day);
        assert_eq!(
            (valid.quota[0].used, valid.quota[0].remaining),
            (used, 3 - used)
        );
        assert_eq!(valid.quota[1].used, used);
    }
    match engine.validate(&raw_key, &ctx).await {
        Err(Error::QuotaExceeded { resets_at }) => assert_eq!(resets_at, t("2030-03-05T00:00:00Z")),
        other => panic!("{other:?}"),
    }
    // A request too expensive for the day is refused and counts nowhere.
    let expensive = RequestContext {
        cost: 2,
        ..Default::default()
    };
    assert!(matches!(
        engine.validate(&raw_key, &expensive).await,
        Err(Error::QuotaExceeded { .. })
    ));
    let day = quota_key(
        &prefix,
        &key_id,
        UsagePeriod::Day,
        t("2030-03-04T00:00:00Z"),
    );
    let month = quota_key(
        &prefix,
        &key_id,
        UsagePeriod::Month,
        t("2030-03-01T00:00:00Z"),
    );
    assert_eq!(get(&url, &day).await, Some(3));
    assert_eq!(
        get(&url, &month).await,
        Some(3),
        "refused requests did not count in the month"
    );
    // Counters go a day after their window ends.
    let ttl = pttl(&url, &day).await;
    let until = (t("2030-03-06T00:00:00Z") - Utc::now()).num_milliseconds();
    assert!(
        ttl > 0 && (ttl - until).abs() < 60_000,
        "pttl {ttl}, expected about {until}"
    );

    // Midnight UTC: a new day, the same month.
    clock.set(t("2030-03-05T00:00:00Z"));
    for used in 4..=5 {
        let valid = engine.validate(&raw_key, &ctx).await.unwrap();
        assert_eq!((valid.quota[0].used, valid.quota[1].used), (used - 3, used));
    }
    match engine.validate(&raw_key, &ctx).await {
        Err(Error::QuotaExceeded { resets_at }) => assert_eq!(resets_at, t("2030-04-01T00:00:00Z")),
        other => panic!("{other:?}"),
    }
    // The counter itself: a refusal reports the counts and changes nothing.
    let quota = QuotaSpec {
        daily: Some(3),
        monthly: Some(5),
    };
    let decision = counter
        .consume(&key_id, &quota, 1, clock.now())
        .await
        .unwrap();
    assert!(!decision.allowed);
    assert_eq!(
        decision.windows.iter().map(|w| w.used).collect::<Vec<_>>(),
        [2, 5]
    );
    assert_eq!(decision.resets_at(), Some(t("2030-04-01T00:00:00Z")));
    clock.set(t("2030-04-01T00:00:00Z"));
    assert!(engine.validate(&raw_key, &ctx).await.is_ok(), "a new month");
}

// ------------------------------------------------------------ failure modes

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// A `redis-server` of this test's own, killed when dropped.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server (again) on its port and waits until it answers.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills the server, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A stopped process still dies of SIGKILL; CONT is for tidiness.
            let _ = Command::new("kill")
                .args([
                    "-CONT",
                    &self.child.as_ref().map_or(0, Child::id).to_string(),
                ])
                .status();
        }
        self.kill();
    }
}

/// Retries `f` while Redis boots: a bounded loop, never an unbounded wait.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = keysmith::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(value) => return value,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{what}: Redis never came back: {e:?}"),
        }
    }
}

/// Asserts `f` fails with `Error::Store`, quickly.
async fn fails_closed<T: std::fmt::Debug>(
    what: &str,
    f: impl std::future::Future<Output = keysmith::Result<T>>,
) {
    let started = Instant::now();
    let result = f.await;
    let took = started.elapsed();
    assert!(matches!(result, Err(Error::Store(_))), "{what}: {result:?}");
    assert!(took < Duration::from_secs(2), "{what} took {took:?}");
}

#[test]
fn failure_modes_when_redis_stops_and_recovery_when_it_returns() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(failure_story()));

    let mut failures = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "keysmith_redis_failures_total" {
            continue;
        }
        let label = |name: &str| {
            key.key()
                .labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap()
        };
        if let DebugValue::Counter(n) = value {
            failures.insert((label("component"), label("mode")), n);
        }
    }
    for component in ["rate_limit", "quota"] {
        for mode in ["fail_open", "fail_closed", "local"] {
            let n = failures
                .get(&(component.to_owned(), mode.to_owned()))
                .copied()
                .unwrap_or(0);
            assert!(
                n >= 1,
                "failures of {component} in {mode} counted: {failures:?}"
            );
        }
    }
}

async fn failure_story() {
    let mut server = PrivateRedis::start();
    let url = server.url();
    let timeout = Duration::from_millis(250);
    let mode = |m| options("failure", m, timeout);
    let shared = mode(FailureMode::FailClosed).key_prefix;
    // All share one prefix: they are nodes of one deployment.
    let with_prefix = |m| RedisOptions {
        key_prefix: shared.clone(),
        ..mode(m)
    };

    let open = RedisRateLimiter::connect(&url, with_prefix(FailureMode::FailOpen))
        .await
        .unwrap();
    let closed = RedisRateLimiter::connect(&url, with_prefix(FailureMode::FailClosed))
        .await
        .unwrap();
    let local = RedisRateLimiter::connect(&url, with_prefix(FailureMode::Local))
        .await
        .unwrap();
    let fallback = Arc::new(StoreQuotaCounter::new(Arc::new(MemoryStore::new())));
    let counter = |m| {
        let fallback: Arc<dyn QuotaCounter> = fallback.clone();
        let options = with_prefix(m);
        let url = url.clone();
        async move {
            RedisQuotaCounter::connect(&url, options, fallback)
                .await
                .unwrap()
        }
    };
    let q_open = counter(FailureMode::FailOpen).await;
    let q_closed = counter(FailureMode::FailClosed).await;
    let q_local = counter(FailureMode::Local).await;

    // Connected and answering from Redis.
    let s = spec(3, Duration::from_secs(10), 3);
    let quota = QuotaSpec {
        daily: Some(2),
        monthly: None,
    };
    let now = Utc::now();
    for limiter in [&open, &closed, &local] {
        assert!(limiter.check(&KeyId::new(), &s, 1).await.unwrap().allowed);
    }
    for counter in [&q_open, &q_closed, &q_local] {
        assert!(
            counter
                .consume(&KeyId::new(), &quota, 1, now)
                .await
                .unwrap()
                .allowed
        );
    }

    server.kill();

    // FailOpen: allowed, the bucket reported full; quotas count nothing.
    let key = KeyId::new();
    for _ in 0..5 {
        let state = open.check(&key, &s, 1).await.unwrap();
        assert!(state.allowed);
        assert_eq!(
            (state.limit, state.remaining, state.retry_after_secs),
            (3, 3, None)
        );
        let decision = q_open.consume(&key, &quota, 1, now).await.unwrap();
        assert!(decision.allowed);
        assert_eq!(
            (decision.windows[0].used, decision.windows[0].remaining),
            (0, 2)
        );
    }
    // FailClosed: a store error, quickly, never a pass.
    for _ in 0..3 {
        fails_closed("rate limit", closed.check(&key, &s, 1)).await;
        fails_closed("quota", q_closed.consume(&key, &quota, 1, now)).await;
    }
    // A node started while Redis is down is no error at construction.
    let late = RedisRateLimiter::connect(&url, with_prefix(FailureMode::FailClosed))
        .await
        .unwrap();
    fails_closed("late limiter", late.check(&key, &s, 1)).await;
    // Local: the in-process limiter still enforces the limit...
    let started = Instant::now();
    for remaining in [2, 1, 0] {
        let state = local.check(&key, &s, 1).await.unwrap();
        assert!(state.allowed);
        assert_eq!(state.remaining, remaining);
    }
    let refused = local.check(&key, &s, 1).await.unwrap();
    assert!(!refused.allowed);
    assert!(refused.retry_after_secs.unwrap() >= 1);
    // ...and quotas are counted by the fallback counter.
    assert!(q_local.consume(&key, &quota, 1, now).await.unwrap().allowed);
    assert!(q_local.consume(&key, &quota, 1, now).await.unwrap().allowed);
    let over = q_local.consume(&key, &quota, 1, now).await.unwrap();
    assert!(!over.allowed);
    assert_eq!(over.windows[0].used, 2);
    assert!(
        !fallback
            .consume(&key, &quota, 1, now)
            .await
            .unwrap()
            .allowed,
        "in the fallback"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // Redis comes back on the same port: every node uses it again, unaided.
    server.restart();
    let key = KeyId::new();
    let first = eventually("closed limiter", || closed.check(&key, &s, 1)).await;
    assert_eq!((first.allowed, first.remaining), (true, 2));
    // The other nodes read the same bucket from Redis (the local limiter
    // would have granted a full burst of 3).
    let state = local.check(&key, &s, 1).await.unwrap();
    assert_eq!((state.allowed, state.remaining), (true, 1));
    let state = eventually("late limiter", || late.check(&key, &s, 1)).await;
    assert_eq!((state.allowed, state.remaining), (true, 0));
    assert!(
        !open.check(&key, &s, 1).await.unwrap().allowed,
        "fail-open reads Redis again"
    );
    assert!(!local.check(&key, &s, 1).await.unwrap().allowed);

    let first = eventually("closed counter", || q_closed.consume(&key, &quota, 1, now)).await;
    assert_eq!((first.allowed, first.windows[0].used), (true, 1));
    let second = q_local.consume(&key, &quota, 1, now).await.unwrap();
    assert_eq!((second.allowed, second.windows[0].used), (true, 2));
    let third = q_open.consume(&key, &quota, 1, now).await.unwrap();
    assert_eq!((third.allowed, third.windows[0].used), (false, 2));
    // The fallback was not used for this key.
    assert!(
        fallback
            .consume(&key, &quota, 2, now)
            .await
            .unwrap()
            .allowed
    );
    assert_eq!(
        get(
            &url,
            &quota_key(&shared, &key, UsagePeriod::Day, quota.windows(now)[0].start)
        )
        .await,
        Some(2)
    );
}

#[tokio::test]
async fn a_hung_redis_is_bounded_by_the_timeout() {
    let server = PrivateRedis::start();
    let url = server.url();
    let timeout = Duration::from_millis(250);
    let prefix = options("hung", FailureMode::FailClosed, timeout).key_prefix;
    let with = |on_failure| RedisOptions {
        timeout,
        on_failure,
        key_prefix: prefix.clone(),
    };
    let closed = RedisRateLimiter::connect(&url, with(FailureMode::FailClosed))
        .await
        .unwrap();
    let local = RedisRateLimiter::connect(&url, with(FailureMode::Local))
        .await
        .unwrap();
    let fallback: Arc<dyn QuotaCounter> =
        Arc::new(StoreQuotaCounter::new(Arc::new(MemoryStore::new())));
    let q_closed = RedisQuotaCounter::connect(&url, with(FailureMode::FailClosed), fallback)
        .await
        .unwrap();
    let s = spec(3, Duration::from_secs(10), 3);
    let quota = QuotaSpec {
        daily: Some(5),
        monthly: Some(10),
    };
    let now = Utc::now();
    assert!(closed.check(&KeyId::new(), &s, 1).await.unwrap().allowed);
    assert!(
        q_closed
            .consume(&KeyId::new(), &quota, 1, now)
            .await
            .unwrap()
            .allowed
    );

    // The server stops answering, its sockets still open: only the timeout
    // ends the wait.
    server.signal("STOP");
    let key = KeyId::new();
    for _ in 0..3 {
        let started = Instant::now();
        fails_closed("rate limit", closed.check(&key, &s, 1)).await;
        fails_closed("quota", q_closed.consume(&key, &quota, 1, now)).await;
        assert!(started.elapsed() >= timeout, "it did wait for the timeout");
    }
    let started = Instant::now();
    let state = local.check(&key, &s, 1).await.unwrap();
    assert_eq!(
        (state.allowed, state.remaining),
        (true, 2),
        "the local limiter answered"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    server.signal("CONT");
    // Calls that timed out may still be applied once Redis wakes up (they
    // were sent): that over-counts, never under-counts. A fresh key shows
    // the state is Redis' again.
    let key = KeyId::new();
    let first = eventually("after CONT", || closed.check(&key, &s, 1)).await;
    assert_eq!(
        (first.allowed, first.remaining),
        (true, 2),
        "Redis' own bucket"
    );
    let counted = eventually("quota after CONT", || {
        q_closed.consume(&key, &quota, 1, now)
    })
    .await;
    assert_eq!(
        counted.windows.iter().map(|w| w.used).collect::<Vec<_>>(),
        [1, 1]
    );
}
