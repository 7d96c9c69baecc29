//! In-process validation against its floor: SHA-256 of the raw key plus one
//! hash-map lookup. Run with `cargo bench -p keysmith --bench validate`.

#![allow(missing_docs)]

mod support;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keysmith::{CreateKey, Engine, MemoryStore, PolicySpec, RequestContext, SecretHash, Tenant};
use support::{Tape, key_count, now};

fn setup(rt: &tokio::runtime::Runtime) -> (Engine, Vec<String>, Vec<String>) {
    rt.block_on(async {
        let engine = Engine::builder(Arc::new(MemoryStore::new())).build();
        let tenant = Tenant::new("bench", "t").unwrap();
        let policy = engine
            .create_policy(
                &tenant,
                PolicySpec {
                    name: "fenced".into(),
                    allowed_ips: (0..10).map(|i| format!("10.{i}.0.0/16")).collect(),
                    allowed_origins: (0..10)
                        .map(|i| format!("https://app{i}.example.com"))
                        .collect(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let keys = key_count();
        let mut plain = Vec::with_capacity(keys);
        let mut fenced = Vec::with_capacity(keys / 2);
        for i in 0..keys {
            let policy_id = (i % 2 == 0).then_some(policy.id);
            let request = CreateKey {
                name: format!("k{i}"),
                policy_id,
                ..Default::default()
            };
            let created = engine.create_key(&tenant, request).await.unwrap();
            let raw = created.raw_key.expose_secret().to_owned();
            if policy_id.is_some() {
                fenced.push(raw)
            } else {
                plain.push(raw)
            }
        }
        // Like a server that has been running: every key was used once and
        // its last_used_at written, so validation is in its steady state.
        for raw in plain.iter().chain(&fenced) {
            let ctx = RequestContext {
                ip: Some("10.9.1.2".parse().unwrap()),
                origin: Some("https://app9.example.com".into()),
                ..Default::default()
            };
            engine.validate(raw, &ctx).await.unwrap();
        }
        engine.flush_last_used().await.unwrap();
        (engine, plain, fenced)
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (engine, plain, fenced) = setup(&rt);

    // The floor: what any validation must do at the least.
    let map: HashMap<SecretHash, Arc<String>, foldhash::fast::RandomState> = plain
        .iter()
        .chain(&fenced)
        .map(|raw| (SecretHash::of(raw), Arc::new(raw.clone())))
        .collect();
    let mut group = c.benchmark_group("validate");
    let mut tape = Tape::new(&plain);
    group.bench_function("floor_sha256_plus_hashmap", |b| {
        b.iter(|| {
            let hash = SecretHash::of(black_box(tape.next()));
            black_box(map.get(&hash).cloned())
        })
    });

    let mut tape = Tape::new(&plain);
    group.bench_function("parse_and_checksum", |b| {
        b.iter(|| black_box(keysmith::secret::ParsedKey::parse(black_box(tape.next())).is_some()))
    });
    let none = RequestContext::default();
    let mut tape = Tape::new(&plain);
    group.bench_function("engine_no_policy", |b| {
        b.iter(|| now(engine.validate(black_box(tape.next()), &none)).unwrap())
    });

    // Matches the last CIDR and the last origin: the worst case of the lists.
    let fenced_ctx = RequestContext {
        ip: Some("10.9.1.2".parse().unwrap()),
        origin: Some("https://app9.example.com".into()),
        ..Default::default()
    };
    let mut tape = Tape::new(&fenced);
    group.bench_function("engine_policy_10_cidrs_10_origins", |b| {
        b.iter(|| now(engine.validate(black_box(tape.next()), &fenced_ctx)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
