//! The cost of rate limits and quotas: validation under a policy with a rate
//! limit and both quotas against the same policy without them, on the memory
//! store behind the validation cache (as `keysmith serve` runs) with the
//! local backend (the in-process rate limiter, quotas counted
//! in process and written behind: `EngineBuilder::local_quota_counts`), and
//! with quotas counted in the store at every validation (the default, for
//! nodes sharing a database); and, when `KEYSMITH_BENCH_REDIS_URL` is set
//! (scripts/bench sets it), with the Redis backend. Keys are validated once
//! and their `last_used_at` and counts flushed before measuring, so each
//! figure is a steady state.
//! `cargo bench -p keysmith --features redis --bench limits`.

#![allow(missing_docs)]

mod support;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keysmith::cache::CacheOptions;
use keysmith::{CreateKey, Engine, MemoryStore, PolicySpec, RequestContext, Store, Tenant};
use support::{Tape, now};

/// Keys per variant (`KEYSMITH_BENCH_LIMITS_KEYS`, default 10 000): at 10 000
/// (four variants, 40 000 keys) the key records and the limiter's records do
/// not stay in the CPU's caches; at 1 000 they do.
fn keys_per_variant() -> usize {
    std::env::var("KEYSMITH_BENCH_LIMITS_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// A policy that limits but never refuses in a benchmark's lifetime.
fn limited(name: &str) -> PolicySpec {
    PolicySpec {
        name: name.into(),
        rate_limit: Some(1_000_000_000),
        rate_limit_window: Some(std::time::Duration::from_secs(1)),
        burst_limit: Some(1_000_000_000),
        daily_quota: Some(1_000_000_000_000),
        monthly_quota: Some(1_000_000_000_000),
        ..Default::default()
    }
}

async fn keys(engine: &Engine, spec: PolicySpec) -> Vec<String> {
    let tenant = Tenant::new("bench", "t").unwrap();
    let policy = engine.create_policy(&tenant, spec).await.unwrap();
    let keys = keys_per_variant();
    let mut raws = Vec::with_capacity(keys);
    for i in 0..keys {
        let request = CreateKey {
            name: format!("k{i}"),
            policy_id: Some(policy.id),
            ..Default::default()
        };
        raws.push(
            engine
                .create_key(&tenant, request)
                .await
                .unwrap()
                .raw_key
                .expose_secret()
                .to_owned(),
        );
    }
    raws
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    // With the validation cache, as `keysmith serve` runs (entries kept for
    // the whole run: the steady state of hot keys).
    let cache = CacheOptions {
        ttl: std::time::Duration::from_secs(3600),
        ..CacheOptions::default()
    };
    let engine = Engine::builder(store.clone())
        .cache(cache)
        .local_quota_counts()
        .build();
    let counted_in_store = Engine::builder(store.clone()).cache(cache).build();
    let (plain, with_limits) = rt.block_on(async {
        let plain = keys(
            &engine,
            PolicySpec {
                name: "none".into(),
                ..Default::default()
            },
        )
        .await;
        (plain, keys(&engine, limited("limits")).await)
    });
    let (rate_only, quota_only) = rt.block_on(async {
        let rate = PolicySpec {
            daily_quota: None,
            monthly_quota: None,
            ..limited("rate")
        };
        let quota = PolicySpec {
            rate_limit: None,
            rate_limit_window: None,
            burst_limit: None,
            ..limited("quota")
        };
        (keys(&engine, rate).await, keys(&engine, quota).await)
    });
    let ctx = RequestContext::default();
    // The steady state: every key used once, its last use and counts written.
    rt.block_on(async {
        for raws in [&plain, &with_limits, &rate_only, &quota_only] {
            for raw in raws {
                engine.validate(raw, &ctx).await.unwrap();
                counted_in_store.validate(raw, &ctx).await.unwrap();
            }
        }
        engine.flush_last_used().await.unwrap();
        engine.flush_quota_counts().await.unwrap();
        counted_in_store.flush_last_used().await.unwrap();
    });
    let variants = [
        ("policy_without_limits", &engine, &plain),
        ("local_rate_limit_and_quotas", &engine, &with_limits),
        ("local_rate_limit_only", &engine, &rate_only),
        ("local_quotas_only", &engine, &quota_only),
        (
            "local_rate_limit_and_quotas_counted_in_store",
            &counted_in_store,
            &with_limits,
        ),
    ];
    paired(&variants, &ctx);
    let mut group = c.benchmark_group("limits");
    for (name, engine, raws) in variants {
        let mut tape = Tape::new(raws);
        group.bench_function(name, |b| {
            b.iter(|| now(engine.validate(black_box(tape.next()), &ctx)).unwrap())
        });
    }
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("KEYSMITH_BENCH_REDIS_URL") {
        use keysmith::ratelimit::StoreQuotaCounter;
        use keysmith::ratelimit::redis::{RedisOptions, RedisQuotaCounter, RedisRateLimiter};
        let options = RedisOptions {
            key_prefix: format!("bench-{}", uuid::Uuid::now_v7().simple()),
            ..RedisOptions::default()
        };
        let redis = rt.block_on(async {
            let limiter = RedisRateLimiter::connect(&url, options.clone())
                .await
                .unwrap();
            let fallback = Arc::new(StoreQuotaCounter::new(store.clone()));
            let counter = RedisQuotaCounter::connect(&url, options, fallback)
                .await
                .unwrap();
            Engine::builder(store.clone())
                .rate_limiter(Arc::new(limiter))
                .quota_counter(Arc::new(counter))
                .build()
        });
        let mut tape = Tape::new(&with_limits);
        group.bench_function("redis_rate_limit_and_quotas", |b| {
            b.iter(|| {
                rt.block_on(redis.validate(black_box(tape.next()), &ctx))
                    .unwrap()
            })
        });
    }
    group.finish();
}

/// With `KEYSMITH_BENCH_PAIRED=<rounds>`: each variant against the first,
/// in alternating slices of 10 000 validations, and the median of the
/// rounds' ratios, which bursts of load from other processes on this shared
/// machine move much less than criterion's one-after-the-other figures.
fn paired(variants: &[(&str, &Engine, &Vec<String>)], ctx: &RequestContext) {
    let Some(rounds) = std::env::var("KEYSMITH_BENCH_PAIRED")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return;
    };
    let (_, base_engine, base_raws) = variants[0];
    let mut base_tape = Tape::new(base_raws);
    let mut lines = String::new();
    for (name, engine, raws) in &variants[1..] {
        let mut tape = Tape::new(raws);
        let time = |engine: &Engine, tape: &mut Tape| {
            let started = std::time::Instant::now();
            for _ in 0..10_000 {
                black_box(now(engine.validate(black_box(tape.next()), ctx)).unwrap());
            }
            started.elapsed().as_nanos() as f64 / 10_000.0
        };
        let mut ratios: Vec<(f64, f64, f64)> = (0..rounds)
            .map(|_| {
                let base = time(base_engine, &mut base_tape);
                let subject = time(engine, &mut tape);
                (subject / base, base, subject)
            })
            .collect();
        ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (ratio, base, subject) = ratios[rounds / 2];
        println!(
            "paired: {name}: {subject:.0} ns vs {base:.0} ns without limits: {:+.1}% (median of {rounds})",
            (ratio - 1.0) * 100.0
        );
        lines.push_str(&format!("{name} {subject:.0} {base:.0} {ratio:.4}\n"));
    }
    // scripts/bench collects them for its summary.
    if let Ok(dir) = std::env::var("KEYSMITH_BENCH_RESULTS") {
        std::fs::write(std::path::Path::new(&dir).join("limits_paired.txt"), lines).unwrap();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
