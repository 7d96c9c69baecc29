//! A small axum service protected by Keysmith: every route needs a valid API
//! key, `/admin` also needs the `admin` scope, and the `limited` key may make
//! two requests a minute. Every request that passes the layer is recorded as
//! usage (status, latency, endpoint, method, IP, user agent) into SQLite by a
//! batch writer, after the response.
//!
//! `cargo run -p keysmith --features axum,sqlite --example axum_service`, then
//! `curl -H "Authorization: Bearer <printed key>" localhost:3000/hello`.
//!
//! `tests/axum_service.rs` runs this same service over HTTP.
#![allow(dead_code)] // the end-to-end test uses some items, `main` the others

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use keysmith::middleware::{Authenticated, KeysmithLayer, RequireScopesLayer};
use keysmith::usage::{UsageSink, UsageWriter, UsageWriterOptions};
use keysmith::{CreateKey, Engine, PolicySpec, RawKey, SqliteStore, Store, Tenant};

/// The tenant the demo keys belong to.
pub fn tenant() -> Tenant {
    Tenant::new("demo", "demo").expect("a valid tenant")
}

async fn hello(auth: Authenticated) -> String {
    format!(
        "hello, {} (scopes: {:?})\n",
        auth.0.key.name, auth.0.key.scopes
    )
}

async fn admin(auth: Authenticated) -> String {
    format!("welcome to the admin area, {}\n", auth.0.key.name)
}

/// Stands for real work: answers after `SLOW` (latency shows in usage).
async fn report(_: Authenticated) -> &'static str {
    tokio::time::sleep(SLOW).await;
    "report ready\n"
}

/// How long `/report` takes.
pub const SLOW: Duration = Duration::from_millis(250);

/// The service's routes behind the layer, recording usage into `usage`.
pub fn app(engine: Engine, usage: UsageSink) -> Router {
    Router::new()
        .route(
            "/admin",
            get(admin).layer(RequireScopesLayer::new(["admin"])),
        )
        .route("/hello", get(hello))
        .route("/report", get(report))
        .layer(KeysmithLayer::new(engine).usage(usage))
}

/// The demo keys: `reader` (scope `read`), `boss` (scope `admin`) and
/// `limited` (scope `read`, at most 2 requests a minute).
pub async fn demo_keys(engine: &Engine) -> keysmith::Result<Vec<(&'static str, RawKey)>> {
    let tenant = tenant();
    let slow_lane = PolicySpec {
        name: "two-a-minute".into(),
        rate_limit: Some(2),
        rate_limit_window: Some(Duration::from_secs(60)),
        burst_limit: Some(2),
        ..Default::default()
    };
    let slow_lane = engine.create_policy(&tenant, slow_lane).await?;
    let mut keys = Vec::new();
    for (name, scope, policy) in [
        ("reader", "read", None),
        ("boss", "admin", None),
        ("limited", "read", Some(slow_lane.id)),
    ] {
        let request = CreateKey {
            name: name.into(),
            scopes: vec![scope.into()],
            policy_id: policy,
            ..Default::default()
        };
        keys.push((name, engine.create_key(&tenant, request).await?.raw_key));
    }
    Ok(keys)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sqlite = SqliteStore::open("axum_service.db").await?;
    sqlite.migrate().await?;
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let engine = Engine::builder(store.clone()).build();
    for (name, raw) in demo_keys(&engine).await? {
        println!("{name}: {}", raw.expose_secret());
    }
    let (writer, usage) = UsageWriter::spawn(store, UsageWriterOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    let service = app(engine.clone(), usage).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Usage still queued and `last_used_at` are written before exiting.
    writer.shutdown().await;
    engine.flush_last_used().await?;
    Ok(())
}
