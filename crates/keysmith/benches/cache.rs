//! Cached validation against its floor (SHA-256 of the raw key plus one
//! hash-map lookup), with SQLite behind the cache, and the memory each cached
//! key costs. Two floors: a map to small `Arc<String>` values (the target's
//! baseline), and a map to the very `Arc<ApiKey>` records the cache holds
//! (what a lookup that yields the key costs with the key records' memory
//! footprint). Keys are read from a [`Tape`] (see there why). Run with
//! `cargo bench -p keysmith --features sqlite --bench cache`.

#![allow(missing_docs)]

mod support;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keysmith::cache::CacheOptions;
use keysmith::{CreateKey, Engine, RequestContext, SecretHash, SqliteStore, Tenant};
use support::{Tape, key_count, now};

/// Resident memory of this process, in bytes (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = key_count();
    let (engine, raws) = rt.block_on(async {
        let store = SqliteStore::open(":memory:").await.unwrap();
        store.migrate().await.unwrap();
        let engine = Engine::builder(Arc::new(store))
            .cache(CacheOptions {
                capacity: keys * 2,
                ttl: Duration::from_secs(3600),
                ..CacheOptions::default()
            })
            .build();
        let tenant = Tenant::new("bench", "t").unwrap();
        let mut raws = Vec::with_capacity(keys);
        for i in 0..keys {
            let request = CreateKey {
                name: format!("k{i}"),
                scopes: vec!["read".into()],
                ..Default::default()
            };
            let created = engine.create_key(&tenant, request).await.unwrap();
            raws.push(created.raw_key.expose_secret().to_owned());
        }
        (engine, raws)
    });
    // Every key validated once: into the cache (and its last_used_at written).
    let before = resident_bytes();
    rt.block_on(async {
        for raw in &raws {
            engine
                .validate(raw, &RequestContext::default())
                .await
                .unwrap();
        }
        engine.flush_last_used().await.unwrap();
    });
    let after = resident_bytes();
    assert_eq!(engine.cache_len().0, keys, "every key is cached");
    if let (Some(before), Some(after)) = (before, after) {
        let per_key = after.saturating_sub(before) / keys as u64;
        println!("cache: {keys} keys cached, {per_key} bytes of resident memory per cached key");
        // scripts/bench collects it for its summary.
        if let Ok(dir) = std::env::var("KEYSMITH_BENCH_RESULTS") {
            let line = format!("{per_key} (RSS growth over {keys} cached keys, SQLite behind)");
            std::fs::write(std::path::Path::new(&dir).join("cache_memory.txt"), line).unwrap();
        }
    }

    let map: HashMap<SecretHash, Arc<String>, foldhash::fast::RandomState> = raws
        .iter()
        .map(|raw| (SecretHash::of(raw), Arc::new(raw.clone())))
        .collect();
    // The same floor over the very keys the cache holds (the `Arc<ApiKey>`
    // each validation hands back): a lookup that yields the key, and clones
    // its handle, with the key records' memory footprint.
    let keys: HashMap<SecretHash, Arc<keysmith::ApiKey>, foldhash::fast::RandomState> = rt
        .block_on(async {
            let mut keys = HashMap::default();
            for raw in &raws {
                let valid = engine.validate(raw, &RequestContext::default()).await;
                keys.insert(SecretHash::of(raw), valid.unwrap().key);
            }
            keys
        });
    let mut group = c.benchmark_group("cache");
    let mut tape = Tape::new(&raws);
    group.bench_function("floor_sha256_plus_hashmap_of_keys", |b| {
        b.iter(|| {
            let hash = SecretHash::of(black_box(tape.next()));
            black_box(keys.get(&hash).cloned())
        })
    });
    let mut tape = Tape::new(&raws);
    group.bench_function("floor_sha256_plus_hashmap", |b| {
        b.iter(|| {
            let hash = SecretHash::of(black_box(tape.next()));
            black_box(map.get(&hash).cloned())
        })
    });
    let none = RequestContext::default();
    let mut tape = Tape::new(&raws);
    group.bench_function("engine_cached_sqlite", |b| {
        b.iter(|| now(engine.validate(black_box(tape.next()), &none)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
