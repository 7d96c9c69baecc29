//! A small axum service protected by Keysmith: every route needs a valid API
//! key, and `/admin` also needs the `admin` scope.
//!
//! `cargo run -p keysmith --features axum --example axum_service`, then
//! `curl -H "Authorization: Bearer <printed key>" localhost:3000/hello`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use keysmith::middleware::{Authenticated, KeysmithLayer, RequireScopesLayer};
use keysmith::{CreateKey, Engine, MemoryStore, Tenant};

async fn hello(auth: Authenticated) -> String {
    format!(
        "hello, {} (scopes: {:?})\n",
        auth.0.key.name, auth.0.key.scopes
    )
}

async fn admin(auth: Authenticated) -> String {
    format!("welcome to the admin area, {}\n", auth.0.key.name)
}

/// The service's routes behind the layer.
fn app(engine: Engine) -> Router {
    Router::new()
        .route(
            "/admin",
            get(admin).layer(RequireScopesLayer::new(["admin"])),
        )
        .route("/hello", get(hello))
        .layer(KeysmithLayer::new(engine))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::builder(Arc::new(MemoryStore::new())).build();
    let tenant = Tenant::new("demo", "demo")?;
    for (name, scopes) in [
        ("reader", vec!["read".to_owned()]),
        ("boss", vec!["admin".to_owned()]),
    ] {
        let request = CreateKey {
            name: name.into(),
            scopes,
            ..Default::default()
        };
        let created = engine.create_key(&tenant, request).await?;
        println!("{name}: {}", created.raw_key.expose_secret());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    let service = app(engine).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service).await?;
    Ok(())
}
