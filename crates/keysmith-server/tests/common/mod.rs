//! Shared helpers for the server's tests.
#![allow(dead_code, missing_docs, missing_debug_implementations)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use keysmith::usage::{UsageSink, UsageWriter, UsageWriterOptions};
use keysmith::{SqliteStore, Store, Tenant};
use keysmith_server::api::{self, AppState, Limits};
use serde_json::Value;
use tower::ServiceExt;

/// An in-process server on a fresh in-memory SQLite store, with reported
/// usage going through a usage writer as in `keysmith serve`.
pub struct TestApp {
    pub router: Router,
    pub engine: keysmith::Engine,
    pub store: SqliteStore,
    pub usage: UsageSink,
    /// Taken by tests that shut the writer down.
    pub usage_writer: Option<UsageWriter>,
}

pub async fn app() -> TestApp {
    app_with(
        UsageWriterOptions::default(),
        Arc::new(keysmith::SystemClock),
    )
    .await
}

/// [`app`] with the usage writer batching as `options` says.
pub async fn app_with_usage(options: UsageWriterOptions) -> TestApp {
    app_with(options, Arc::new(keysmith::SystemClock)).await
}

/// [`app`] with the engine on `clock` (a `ManualClock` lets time pass).
pub async fn app_with_clock(clock: Arc<dyn keysmith::Clock>) -> TestApp {
    app_with(UsageWriterOptions::default(), clock).await
}

async fn app_with(options: UsageWriterOptions, clock: Arc<dyn keysmith::Clock>) -> TestApp {
    let store = SqliteStore::open(":memory:").await.unwrap();
    store.migrate().await.unwrap();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let (usage_writer, usage) = UsageWriter::spawn(shared.clone(), options);
    let engine = keysmith_server::serve::hooked(shared.clone())
        .usage_sink(usage.clone())
        .clock(clock)
        .build();
    let state = AppState {
        engine: engine.clone(),
        store: shared,
        metrics: keysmith_server::serve::metrics_handle(),
    };
    let limits = Limits {
        body_limit: 64 * 1024,
        request_timeout: std::time::Duration::from_secs(30),
    };
    TestApp {
        router: api::router(state, limits),
        engine,
        store,
        usage,
        usage_writer: Some(usage_writer),
    }
}

impl TestApp {
    /// A root key for app/tenant with the given scopes (default keysmith:*).
    pub async fn root_key(&self, app: &str, tenant: &str, scopes: &[&str]) -> String {
        let tenant = Tenant::new(app, tenant).unwrap();
        let scopes = scopes.iter().map(|s| s.to_string()).collect();
        let created = keysmith_server::root::create(&self.engine, &tenant, scopes)
            .await
            .unwrap();
        created.raw_key.expose_secret().to_owned()
    }

    /// Sends a request; returns the status and the JSON body (Null when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        root: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(root) = root {
            request = request.header("authorization", format!("Bearer {root}"));
        }
        let request = match body {
            Some(body) => request
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
            None => request.body(Body::empty()).unwrap(),
        };
        self.send(request).await
    }

    pub async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str, root: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(root), None).await
    }

    pub async fn post(&self, path: &str, root: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(root), Some(body)).await
    }
}

/// Asserts an error response's status and code.
#[track_caller]
pub fn assert_error(result: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(result.0, status, "{}", result.1);
    assert_eq!(result.1["error"]["code"], code, "{}", result.1);
    assert!(
        result.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}
