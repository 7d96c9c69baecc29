//! Uncached validation through the SQL stores against the same driver's plain
//! `SELECT … FROM keysmith_keys WHERE hash = ?` on the same database.
//!
//! `cargo bench -p keysmith --features sqlite,postgres --bench stores`.
//! SQLite always runs (a temporary file); PostgreSQL runs when
//! `KEYSMITH_BENCH_POSTGRES_URL` names a database it may fill (scripts/bench
//! starts a throwaway server). `KEYSMITH_BENCH_KEYS` sets the key count
//! (default 100 000).

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keysmith::{CreateKey, Engine, RequestContext, SecretHash, Store, Tenant};

fn key_count() -> usize {
    std::env::var("KEYSMITH_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Fills a store with keys through the engine; returns their raw secrets.
async fn fill(store: Arc<dyn Store>) -> (Engine, Vec<String>) {
    let engine = Engine::builder(store).build();
    let tenant = Tenant::new("bench", "t").unwrap();
    let mut raws = Vec::with_capacity(key_count());
    for i in 0..key_count() {
        let request = CreateKey {
            name: format!("k{i}"),
            scopes: vec!["read".into()],
            ..Default::default()
        };
        let created = engine.create_key(&tenant, request).await.unwrap();
        raws.push(created.raw_key.expose_secret().to_owned());
    }
    (engine, raws)
}

fn bench_sqlite(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let dir = std::env::temp_dir().join(format!("keysmith-bench-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.db");
    let store = rt.block_on(async {
        let store = keysmith::SqliteStore::open(path.to_str().unwrap())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    });
    let pool = store.pool().clone();
    let (engine, raws) = rt.block_on(fill(Arc::new(store)));
    let mut group = c.benchmark_group("sqlite");
    let mut i = 0;
    group.bench_function("baseline_select_by_hash", |b| {
        b.iter(|| {
            i = (i + 7919) % raws.len();
            let hash = SecretHash::of(&raws[i]).to_hex();
            rt.block_on(
                sqlx::query("SELECT * FROM keysmith_keys WHERE hash = ?")
                    .bind(hash)
                    .fetch_optional(&pool),
            )
            .unwrap()
            .expect("found")
        })
    });
    let ctx = RequestContext::default();
    let mut i = 0;
    group.bench_function("engine_validate", |b| {
        b.iter(|| {
            i = (i + 7919) % raws.len();
            rt.block_on(engine.validate(black_box(&raws[i]), &ctx))
                .unwrap()
        })
    });
    group.finish();
    std::fs::remove_dir_all(&dir).ok();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    bench_sqlite(c, &rt);
}

criterion_group!(benches, bench);
criterion_main!(benches);
