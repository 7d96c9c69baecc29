//! Uncached validation through the SQL stores against the same driver's plain
//! `SELECT * FROM keysmith_keys WHERE hash = ?` on the same database.
//!
//! `cargo bench -p keysmith --features sqlite,postgres --bench stores`.
//! SQLite always runs (a temporary file); PostgreSQL runs when
//! `KEYSMITH_BENCH_POSTGRES_URL` names a server where it may `CREATE DATABASE`
//! (it creates `ks_bench_<random>`, fills it and drops it; scripts/bench starts
//! a throwaway server). `KEYSMITH_BENCH_KEYS` sets the key count (default
//! 100 000), or several, comma-separated (`10000,1000000`: the scale
//! comparison); each count gets its own database, filled, measured and
//! dropped in turn, and its figures are named after it
//! (`sqlite/engine_validate/10000`).
//!
//! Filling: one key is created through the engine (the reference); the others
//! are bulk-inserted, 1000 rows per `INSERT`, in one transaction, as copies
//! of the reference row with their own id, name, hash and hint (each secret
//! generated and hashed as the engine does), and linked to the reference's
//! scopes. Keys are generated chunk by chunk, so only the raw secrets stay in
//! memory (a million keys fill in well under a minute per store). Before measuring, the engine validates a sample of the bulk keys
//! and must read back exactly the reference with those four fields changed.
//! Both sides of each pair run on one current-thread runtime with
//! `rt.block_on`, against the same pool, the same rows, the same key order.

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keysmith::{
    ApiKey, CreateKey, Engine, Environment, KeyId, RawKey, RequestContext, SecretHash, Store,
    Tenant,
};
use tokio::runtime::Runtime;

/// Rows per multi-row `INSERT`.
const CHUNK: usize = 1000;

/// The key counts to measure, in order.
fn key_counts() -> Vec<usize> {
    let counts: Vec<usize> = std::env::var("KEYSMITH_BENCH_KEYS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|v| v.trim().replace('_', "").parse().ok())
        .map(|n: usize| n.max(2))
        .collect();
    if counts.is_empty() {
        vec![100_000]
    } else {
        counts
    }
}

/// What a filled store holds.
struct Filled {
    engine: Engine,
    /// The raw secrets of every key, the reference's first.
    raws: Vec<String>,
    /// The reference key as the engine reads it back.
    reference: ApiKey,
    /// How many keys the store holds once filled.
    count: usize,
    /// Some bulk keys as inserted, by index, for `check_fill`.
    samples: Vec<(usize, ApiKey)>,
}

/// Creates the reference key through the engine over `store`.
async fn reference(store: Arc<dyn Store>, count: usize) -> Filled {
    let engine = Engine::builder(store).build();
    let tenant = Tenant::new("bench", "t").unwrap();
    let request = CreateKey {
        name: "k0".into(),
        scopes: vec!["read".into()],
        ..Default::default()
    };
    let created = engine.create_key(&tenant, request).await.unwrap();
    let raw = created.raw_key.expose_secret().to_owned();
    // As stored (timestamps at the store's precision), not as created.
    let reference = (*engine
        .validate(&raw, &RequestContext::default())
        .await
        .unwrap()
        .key)
        .clone();
    let mut raws = Vec::with_capacity(count);
    raws.push(raw);
    Filled {
        engine,
        raws,
        reference,
        count,
        samples: Vec::new(),
    }
}

/// The keys `start..end` to bulk-insert: copies of the reference with their
/// own id, name and secret (hash and hint). Their raw secrets are appended to
/// `raws`; the samples `check_fill` reads back are kept in `samples`.
fn bulk_keys(filled: &mut Filled, start: usize, end: usize) -> Vec<ApiKey> {
    let mut keys = Vec::with_capacity(end - start);
    for i in start..end {
        let raw = RawKey::generate("sk", &Environment::Live).unwrap();
        let key = ApiKey {
            id: KeyId::new(),
            name: format!("k{i}"),
            hash: SecretHash::of(raw.expose_secret()),
            hint: raw.hint(),
            ..filled.reference.clone()
        };
        if sample_indexes(filled.count).contains(&i) {
            filled.samples.push((i, key.clone()));
        }
        keys.push(key);
        filled.raws.push(raw.expose_secret().to_owned());
    }
    keys
}

/// The bulk keys `check_fill` reads back: first, middle, last.
fn sample_indexes(count: usize) -> [usize; 3] {
    [1, count / 2, count - 1]
}

/// Checks that the engine reads bulk-inserted keys back as the reference with
/// their own id, name, hash and hint: the rows are what the engine writes.
async fn check_fill(filled: &Filled) {
    let ctx = RequestContext::default();
    assert_eq!(filled.raws.len(), filled.count, "every key was filled");
    for (i, key) in &filled.samples {
        let valid = filled
            .engine
            .validate(&filled.raws[*i], &ctx)
            .await
            .unwrap();
        assert_eq!(*valid.key, *key, "bulk key {i} reads back differently");
    }
}

/// The pair: the driver's plain select by hash, then the engine's validation.
fn bench_pair<F, T>(c: &mut Criterion, rt: &Runtime, group: &str, filled: &Filled, baseline: F)
where
    F: Fn(String) -> T,
    T: std::future::Future,
{
    let raws = &filled.raws;
    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function(
        BenchmarkId::new("baseline_select_by_hash", filled.count),
        |b| {
            b.iter(|| {
                i = (i + 7919) % raws.len();
                let hash = SecretHash::of(black_box(&raws[i])).to_hex();
                rt.block_on(baseline(hash))
            })
        },
    );
    let ctx = RequestContext::default();
    let mut i = 0;
    group.bench_function(BenchmarkId::new("engine_validate", filled.count), |b| {
        b.iter(|| {
            i = (i + 7919) % raws.len();
            rt.block_on(filled.engine.validate(black_box(&raws[i]), &ctx))
                .unwrap()
        })
    });
    group.finish();
}

// ------------------------------------------------------------------ SQLite

async fn fill_sqlite(store: keysmith::SqliteStore, count: usize) -> Filled {
    use sqlx::{QueryBuilder, Sqlite};

    let pool = store.pool().clone();
    let mut filled = reference(Arc::new(store), count).await;
    let ts = |t: chrono::DateTime<chrono::Utc>| t.timestamp_micros();
    let mut tx = pool.begin().await.unwrap();
    for start in (1..count).step_by(CHUNK) {
        let chunk = bulk_keys(&mut filled, start, (start + CHUNK).min(count));
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO keysmith_keys (id, name, hash, prefix, environment, state, app_id, \
             tenant_id, policy_id, expires_at, last_used_at, created_at, updated_at, \
             description, hint, metadata, created_by, rotated_at, revoked_at) ",
        );
        insert.push_values(&chunk, |mut row, key| {
            row.push_bind(key.id.to_string())
                .push_bind(key.name.clone())
                .push_bind(key.hash.to_hex())
                .push_bind(key.prefix.clone())
                .push_bind(key.environment.as_str().to_owned())
                .push_bind(key.state.as_str())
                .push_bind(key.app_id.clone())
                .push_bind(key.tenant_id.clone())
                .push_bind(key.policy_id.map(|p| p.to_string()))
                .push_bind(key.expires_at.map(ts))
                .push_bind(key.last_used_at.map(ts))
                .push_bind(ts(key.created_at))
                .push_bind(ts(key.updated_at))
                .push_bind(key.description.clone())
                .push_bind(key.hint.clone())
                .push_bind(serde_json::Value::Object(key.metadata.clone()).to_string())
                .push_bind(key.created_by.clone())
                .push_bind(key.rotated_at.map(ts))
                .push_bind(key.revoked_at.map(ts));
        });
        insert.build().execute(&mut *tx).await.unwrap();
    }
    // Every bulk key gets the reference's scopes.
    sqlx::query(
        "INSERT INTO keysmith_key_scopes (key_id, scope_id) \
         SELECT k.id, ks.scope_id FROM keysmith_keys k, keysmith_key_scopes ks \
         WHERE ks.key_id = ?1 AND k.id <> ?1",
    )
    .bind(filled.reference.id.to_string())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // The bulk load went through the WAL; fold it into the database file, as
    // the checkpoints during one-key-at-a-time creation would have. No
    // ANALYZE: the store never runs it, and with the bundled SQLite's STAT4
    // its statistics make the lookup statement re-prepare on every call (the
    // planner picks the non-unique idx_keys_hash, whose estimate depends on
    // the bound hash), which would measure a database no engine produces.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&pool)
        .await
        .unwrap();
    check_fill(&filled).await;
    filled
}

fn bench_sqlite(c: &mut Criterion, rt: &Runtime, count: usize) {
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
    let started = std::time::Instant::now();
    let filled = rt.block_on(fill_sqlite(store, count));
    eprintln!("sqlite: {count} keys filled in {:.1?}", started.elapsed());
    bench_pair(c, rt, "sqlite", &filled, |hash| {
        let pool = &pool;
        async move {
            sqlx::query("SELECT * FROM keysmith_keys WHERE hash = ?")
                .bind(hash)
                .fetch_optional(pool)
                .await
                .unwrap()
                .expect("found")
        }
    });
    drop(filled);
    rt.block_on(pool.close());
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------------ PostgreSQL

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

#[cfg(feature = "postgres")]
async fn fill_postgres(store: keysmith::PostgresStore, count: usize) -> Filled {
    use sqlx::{Postgres, QueryBuilder};

    let pool = store.pool().clone();
    let mut filled = reference(Arc::new(store), count).await;
    let mut tx = pool.begin().await.unwrap();
    // The store's connections carry a statement timeout meant for requests;
    // linking a million keys to their scopes is one longer statement.
    sqlx::raw_sql("SET LOCAL statement_timeout = 0")
        .execute(&mut *tx)
        .await
        .unwrap();
    for start in (1..count).step_by(CHUNK) {
        let chunk = bulk_keys(&mut filled, start, (start + CHUNK).min(count));
        let mut insert = QueryBuilder::<Postgres>::new(
            "INSERT INTO keysmith_keys (id, app_id, tenant_id, name, description, prefix, hint, \
             hash, environment, state, policy_id, metadata, created_by, expires_at, \
             last_used_at, rotated_at, revoked_at, created_at, updated_at) ",
        );
        insert.push_values(&chunk, |mut row, key| {
            row.push_bind(key.id.to_string())
                .push_bind(key.app_id.clone())
                .push_bind(key.tenant_id.clone())
                .push_bind(key.name.clone())
                .push_bind(key.description.clone())
                .push_bind(key.prefix.clone())
                .push_bind(key.hint.clone())
                .push_bind(key.hash.to_hex())
                .push_bind(key.environment.as_str().to_owned())
                .push_bind(key.state.as_str())
                .push_bind(key.policy_id.map(|p| p.to_string()))
                .push_bind(serde_json::Value::Object(key.metadata.clone()))
                .push_bind(key.created_by.clone())
                .push_bind(key.expires_at)
                .push_bind(key.last_used_at)
                .push_bind(key.rotated_at)
                .push_bind(key.revoked_at)
                .push_bind(key.created_at)
                .push_bind(key.updated_at);
        });
        insert.build().execute(&mut *tx).await.unwrap();
    }
    // Every bulk key gets the reference's scopes.
    sqlx::query(
        "INSERT INTO keysmith_key_scopes (key_id, scope_id) \
         SELECT k.id, ks.scope_id FROM keysmith_keys k, keysmith_key_scopes ks \
         WHERE ks.key_id = $1 AND k.id <> $1",
    )
    .bind(filled.reference.id.to_string())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // What autovacuum does shortly after a bulk load anyway, done before the
    // measurements instead of during them.
    // Without the requests' statement timeout (a million rows take longer).
    let mut conn = pool.acquire().await.unwrap();
    for sql in [
        "SET statement_timeout = 0",
        "VACUUM ANALYZE",
        "RESET statement_timeout",
    ] {
        sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap();
    }
    drop(conn);
    check_fill(&filled).await;
    filled
}

#[cfg(feature = "postgres")]
fn bench_postgres(c: &mut Criterion, rt: &Runtime, count: usize) {
    use sqlx::Connection;

    let Ok(url) = std::env::var("KEYSMITH_BENCH_POSTGRES_URL") else {
        eprintln!("postgres: KEYSMITH_BENCH_POSTGRES_URL is not set; skipped");
        return;
    };
    let database = format!("ks_bench_{}", uuid::Uuid::now_v7().simple());
    rt.block_on(async {
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(&format!("CREATE DATABASE \"{database}\""))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
    });
    let store = rt.block_on(async {
        let store = keysmith::PostgresStore::connect(&with_database(&url, &database))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    });
    let pool = store.pool().clone();
    let started = std::time::Instant::now();
    let filled = rt.block_on(fill_postgres(store, count));
    eprintln!("postgres: {count} keys filled in {:.1?}", started.elapsed());
    bench_pair(c, rt, "postgres", &filled, |hash| {
        let pool = &pool;
        async move {
            sqlx::query("SELECT * FROM keysmith_keys WHERE hash = $1")
                .bind(hash)
                .fetch_optional(pool)
                .await
                .unwrap()
                .expect("found")
        }
    });
    drop(filled);
    rt.block_on(async {
        pool.close().await;
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
    });
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for count in key_counts() {
        bench_sqlite(c, &rt, count);
        #[cfg(feature = "postgres")]
        bench_postgres(c, &rt, count);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
