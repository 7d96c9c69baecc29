//! Usage ingest: records per second written into SQLite and PostgreSQL,
//! two ways:
//!
//! - `insert_usage/<n>`: straight `Store::insert_usage` of n-record batches
//!   one after the other: 1000 and 5000 (the writer's default batch size);
//! - `usage_writer_100k`: 100 000 records queued through a fresh
//!   [`UsageSink`] (default [`UsageWriterOptions`]: capacity 100 000, batches
//!   of 5000) and the writer shut down, which returns once all are written —
//!   end to end, what a service's usage recording sustains. A dropped record
//!   fails the benchmark.
//!
//! `cargo bench -p keysmith --features sqlite,postgres --bench usage`.
//! SQLite always runs (a temporary file, as `SqliteStore::open` configures
//! it: WAL, `synchronous = NORMAL`); PostgreSQL runs when
//! `KEYSMITH_BENCH_POSTGRES_URL` names a server where it may `CREATE
//! DATABASE` (scripts/bench starts a throwaway one, `fsync` off). Throughput
//! is in records (criterion's elements). The table is emptied, outside the
//! timed part, whenever it passes a million rows, so that every measurement
//! writes into a table of a realistic, bounded size with its three indexes.

#![allow(missing_docs)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keysmith::usage::{UsageWriter, UsageWriterOptions};
use keysmith::{KeyId, Store};
use support::usage_records;
use tokio::runtime::Runtime;

/// Batch sizes of the straight inserts: the writer's default, and larger.
const BATCHES: [usize; 2] = [1000, 5000];
const WRITER_RECORDS: usize = 100_000;
/// Rows after which the table is emptied (untimed).
const MAX_ROWS: usize = 1_000_000;

/// Runs both benchmarks of one store; `clear` empties the usage table.
fn bench_store<C, F>(c: &mut Criterion, rt: &Runtime, name: &str, store: Arc<dyn Store>, clear: C)
where
    C: Fn() -> F,
    F: std::future::Future<Output = ()>,
{
    let keys: Vec<KeyId> = (0..100).map(|_| KeyId::new()).collect();
    let mut rows = 0usize;
    let mut group = c.benchmark_group(name);
    group.sample_size(10);

    for batch_size in BATCHES {
        group.throughput(Throughput::Elements(batch_size as u64));
        let id = BenchmarkId::new("insert_usage", batch_size);
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    if rows >= MAX_ROWS {
                        rt.block_on(clear());
                        rows = 0;
                    }
                    let batch = usage_records(&keys, batch_size);
                    let started = Instant::now();
                    rt.block_on(store.insert_usage(&batch)).unwrap();
                    spent += started.elapsed();
                    rows += batch_size;
                }
                spent
            })
        });
    }

    group.throughput(Throughput::Elements(WRITER_RECORDS as u64));
    group.bench_function("usage_writer_100k", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                if rows >= MAX_ROWS {
                    rt.block_on(clear());
                    rows = 0;
                }
                let batch = usage_records(&keys, WRITER_RECORDS);
                let store = store.clone();
                spent += rt.block_on(async move {
                    let started = Instant::now();
                    let (writer, sink) = UsageWriter::spawn(store, UsageWriterOptions::default());
                    for record in batch {
                        sink.record(record);
                    }
                    writer.shutdown().await;
                    let spent = started.elapsed();
                    assert_eq!(sink.dropped(), 0, "the writer dropped records");
                    spent
                });
                rows += WRITER_RECORDS;
            }
            spent
        })
    });
    group.finish();
}

fn bench_sqlite(c: &mut Criterion, rt: &Runtime) {
    let dir = std::env::temp_dir().join(format!("keysmith-bench-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("usage.db");
    let store = rt.block_on(async {
        let store = keysmith::SqliteStore::open(path.to_str().unwrap())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    });
    let pool = store.pool().clone();
    bench_store(c, rt, "usage_sqlite", Arc::new(store), || {
        let pool = pool.clone();
        async move {
            sqlx::query("DELETE FROM keysmith_usage_blocks")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&pool)
                .await
                .unwrap();
        }
    });
    rt.block_on(pool.close());
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(feature = "postgres")]
fn bench_postgres(c: &mut Criterion, rt: &Runtime) {
    use sqlx::Connection;

    let Ok(url) = std::env::var("KEYSMITH_BENCH_POSTGRES_URL") else {
        eprintln!("postgres: KEYSMITH_BENCH_POSTGRES_URL is not set; skipped");
        return;
    };
    let database = format!("ks_bench_{}", uuid::Uuid::now_v7().simple());
    let admin = |sql: String| {
        let url = url.clone();
        async move {
            let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(&sql).execute(&mut admin).await.unwrap();
            admin.close().await.unwrap();
        }
    };
    rt.block_on(admin(format!("CREATE DATABASE \"{database}\"")));
    let store = rt.block_on(async {
        let url = with_database(&url, &database);
        let store = keysmith::PostgresStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        store
    });
    let pool = store.pool().clone();
    bench_store(c, rt, "usage_postgres", Arc::new(store), || {
        let pool = pool.clone();
        async move {
            sqlx::raw_sql("TRUNCATE keysmith_usage")
                .execute(&pool)
                .await
                .unwrap();
        }
    });
    rt.block_on(async {
        pool.close().await;
        admin(format!("DROP DATABASE \"{database}\" WITH (FORCE)")).await;
    });
}

/// `url` with its database replaced by `database`.
#[cfg(feature = "postgres")]
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

fn bench(c: &mut Criterion) {
    // Two workers, like a small service: the writer task runs beside the
    // code that queues.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    bench_sqlite(c, &rt);
    #[cfg(feature = "postgres")]
    bench_postgres(c, &rt);
}

criterion_group!(benches, bench);
criterion_main!(benches);
