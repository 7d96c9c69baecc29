//! The middleware benchmark's service (scripts/bench runs it under `wrk`): one
//! hello-world handler served twice by the same process, unprotected at
//! `/plain` and behind [`KeysmithLayer`] at `/protected`, with usage recorded
//! through a [`UsageWriter`] into a SQLite file store (`KEYSMITH_BENCH_USAGE=0`:
//! no usage recorded; `KEYSMITH_BENCH_CACHE=0`: no validation cache).
//!
//! `cargo run --release -p keysmith --features axum,sqlite --example
//! bench_service -- <database path>`
//!
//! It listens on 127.0.0.1 (a free port), prints `port=<port>` and
//! `key=<raw key>` on stdout, and on SIGTERM or SIGINT finishes in-flight
//! requests, writes the queued usage and prints `usage_recorded=`,
//! `usage_dropped=` and `usage_stored=` lines before exiting.
//!
//! This is a benchmark-only tool: it prints its test key (a key with no
//! policy in a throwaway database) so that the load generator can send it.
//! Never print keys like this in a real service.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use keysmith::cache::CacheOptions;
use keysmith::middleware::KeysmithLayer;
use keysmith::usage::{UsageWriter, UsageWriterOptions};
use keysmith::{CreateKey, Engine, SqliteStore, Store, Tenant};

/// The same trivial handler on both routes.
async fn hello() -> &'static str {
    "hello, world\n"
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: bench_service <database path>")?;
    let store = SqliteStore::open(&path).await?;
    store.migrate().await?;
    let store: Arc<dyn Store> = Arc::new(store);
    // The validation cache is on, as a service would run it;
    // KEYSMITH_BENCH_CACHE=0 turns it off to measure the store round trip.
    let mut builder = Engine::builder(store.clone());
    if std::env::var("KEYSMITH_BENCH_CACHE").map_or(true, |v| v != "0") {
        builder = builder.cache(CacheOptions::default());
    }
    let engine = builder.build();
    let tenant = Tenant::new("bench", "bench")?;
    let created = engine
        .create_key(
            &tenant,
            CreateKey {
                name: "bench".into(),
                ..Default::default()
            },
        )
        .await?;

    let (writer, sink) = UsageWriter::spawn(store.clone(), UsageWriterOptions::default());
    // Usage is recorded for every protected request; KEYSMITH_BENCH_USAGE=0
    // measures the layer alone (validation, answers, extensions).
    let mut layer = KeysmithLayer::new(engine.clone());
    if std::env::var("KEYSMITH_BENCH_USAGE").map_or(true, |v| v != "0") {
        layer = layer.usage(sink.clone());
    }
    let protected = Router::new().route("/protected", get(hello)).layer(layer);
    let app = Router::new().route("/plain", get(hello)).merge(protected);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("port={}", listener.local_addr()?.port());
    println!("key={}", created.raw_key.expose_secret());
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(stop_signal())
        .await?;

    writer.shutdown().await;
    engine.flush_last_used().await?;
    engine.shutdown().await;
    let stored = store
        .list_usage(&tenant, &Default::default())
        .await
        .map(|page| page.total)?;
    println!("usage_dropped={}", sink.dropped());
    println!("usage_stored={stored}");
    Ok(())
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
