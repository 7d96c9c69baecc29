//! The cost of rate limits and quotas: validation under a policy with a rate
//! limit and both quotas against the same policy without them, on the memory
//! store with the local backend; and, when `KEYSMITH_BENCH_REDIS_URL` is set
//! (scripts/bench sets it), with the Redis backend.
//! `cargo bench -p keysmith --features redis --bench limits`.

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keysmith::{CreateKey, Engine, MemoryStore, PolicySpec, RequestContext, Store, Tenant};

const KEYS: usize = 10_000;

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
    let mut raws = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
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
    let engine = Engine::builder(store.clone()).build();
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
    let mut group = c.benchmark_group("limits");
    for (name, raws) in [
        ("policy_without_limits", &plain),
        ("local_rate_limit_and_quotas", &with_limits),
        ("local_rate_limit_only", &rate_only),
        ("quotas_only", &quota_only),
    ] {
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 7919) % raws.len();
                rt.block_on(engine.validate(black_box(&raws[i]), &ctx))
                    .unwrap()
            })
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
        let mut i = 0;
        group.bench_function("redis_rate_limit_and_quotas", |b| {
            b.iter(|| {
                i = (i + 7919) % with_limits.len();
                rt.block_on(redis.validate(black_box(&with_limits[i]), &ctx))
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
