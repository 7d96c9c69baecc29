//! The tower layer in front of an axum service: 401 / 403 / 429 / 503, scopes
//! per route, trusted proxies and spoofed `X-Forwarded-For`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::routing::get;
use http::{Request, StatusCode};
use keysmith::middleware::{Authenticated, KeysmithLayer, RequireScopesLayer};
use keysmith::{CreateKey, Engine, MemoryStore, PolicySpec, Store, Tenant};
use tower::ServiceExt;

async fn whoami(auth: Authenticated) -> String {
    auth.0.key.name.clone()
}

fn app(engine: Engine, peer: &str) -> Router {
    let peer: SocketAddr = format!("{peer}:4000").parse().unwrap();
    Router::new()
        .route(
            "/admin",
            get(whoami).layer(RequireScopesLayer::new(["admin"])),
        )
        .route("/hello", get(whoami))
        .layer(KeysmithLayer::new(engine).trusted_proxies(["10.0.0.0/8".parse().unwrap()]))
        .layer(MockConnectInfo(peer))
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn get_with(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::empty()).unwrap()
}

async fn key(engine: &Engine, name: &str, scopes: &[&str], policy: Option<PolicySpec>) -> String {
    let tenant = Tenant::new("app", "t").unwrap();
    let policy_id = match policy {
        Some(spec) => Some(engine.create_policy(&tenant, spec).await.unwrap().id),
        None => None,
    };
    let request = CreateKey {
        name: name.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        policy_id,
        ..Default::default()
    };
    engine
        .create_key(&tenant, request)
        .await
        .unwrap()
        .raw_key
        .expose_secret()
        .to_owned()
}

#[tokio::test]
async fn keys_scopes_and_uniform_refusals() {
    let engine = Engine::builder(Arc::new(MemoryStore::new())).build();
    let app = app(engine.clone(), "192.0.2.1");
    let raw = key(&engine, "svc", &["read"], None).await;
    let admin = key(&engine, "boss", &["admin"], None).await;
    let bearer = format!("Bearer {raw}");

    let (status, _, body) = send(&app, get_with("/hello", &[("authorization", &bearer)])).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "svc"));
    let (status, _, body) = send(&app, get_with("/hello", &[("x-api-key", &admin)])).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "boss"));

    // Every key failure looks the same: nobody learns whether a key exists.
    let revoked = key(&engine, "gone", &[], None).await;
    let tenant = Tenant::new("app", "t").unwrap();
    let gone = engine
        .validate(&revoked, &Default::default())
        .await
        .unwrap()
        .key
        .id;
    engine.revoke_key(&tenant, &gone, None).await.unwrap();
    let unknown = keysmith::RawKey::generate("sk", &keysmith::Environment::Live).unwrap();
    let mut bodies = Vec::new();
    for headers in [
        vec![],
        vec![("authorization", "Bearer nonsense")],
        vec![(
            "authorization",
            format!("Bearer {}", unknown.expose_secret()).leak() as &str,
        )],
        vec![("x-api-key", revoked.as_str())],
        vec![("authorization", raw.as_str())], // not Bearer
    ] {
        let (status, _, body) = send(&app, get_with("/hello", &headers)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    // Keys in URLs are refused, even valid ones.
    let (status, _, _) = send(&app, get_with(&format!("/hello?api_key={raw}"), &[])).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = send(
        &app,
        get_with(&format!("/hello?x={raw}"), &[("authorization", &bearer)]),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Scopes per route.
    let (status, _, body) = send(&app, get_with("/admin", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("insufficient_scope"), "{body}");
    let (status, _, _) = send(&app, get_with("/admin", &[("x-api-key", &admin)])).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn client_ip_comes_from_trusted_proxies_only() {
    let engine = Engine::builder(Arc::new(MemoryStore::new())).build();
    let fenced = PolicySpec {
        name: "office".into(),
        allowed_ips: vec!["203.0.113.0/24".into()],
        ..Default::default()
    };
    let raw = key(&engine, "office", &[], Some(fenced)).await;
    let auth = format!("Bearer {raw}");
    let direct = app(engine.clone(), "198.51.100.7");
    let via_proxy = app(engine.clone(), "10.0.0.1");
    let inside = app(engine.clone(), "203.0.113.20");

    assert_eq!(
        send(&inside, get_with("/hello", &[("authorization", &auth)]))
            .await
            .0,
        StatusCode::OK
    );
    // A spoofed header from an untrusted peer is ignored.
    let spoofed = get_with(
        "/hello",
        &[("authorization", &auth), ("x-forwarded-for", "203.0.113.5")],
    );
    let (status, _, body) = send(&direct, spoofed).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("ip_not_allowed"), "{body}");
    // From a trusted proxy, the nearest untrusted hop is the client.
    for forwarded in [
        "203.0.113.5",
        "198.51.100.1, 203.0.113.5",
        "203.0.113.5, 10.0.0.2",
    ] {
        let request = get_with(
            "/hello",
            &[("authorization", &auth), ("x-forwarded-for", forwarded)],
        );
        assert_eq!(
            send(&via_proxy, request).await.0,
            StatusCode::OK,
            "{forwarded}"
        );
    }
    // A forged client-side hop does not help: the nearest untrusted hop decides.
    let forged = get_with(
        "/hello",
        &[
            ("authorization", &auth),
            ("x-forwarded-for", "203.0.113.5, 198.51.100.9"),
        ],
    );
    assert_eq!(send(&via_proxy, forged).await.0, StatusCode::FORBIDDEN);
    let standard = get_with(
        "/hello",
        &[
            ("authorization", &auth),
            ("forwarded", "for=\"203.0.113.9\";proto=https"),
        ],
    );
    assert_eq!(send(&via_proxy, standard).await.0, StatusCode::OK);
    // A trusted proxy that forwards nothing: the proxy itself is the client.
    assert_eq!(
        send(&via_proxy, get_with("/hello", &[("authorization", &auth)]))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn rate_limits_answer_429_with_headers_and_a_dead_store_503() {
    let engine = Engine::builder(Arc::new(MemoryStore::new())).build();
    let limited = PolicySpec {
        name: "rl".into(),
        rate_limit: Some(1),
        rate_limit_window: Some(std::time::Duration::from_secs(3600)),
        ..Default::default()
    };
    let raw = key(&engine, "rl", &[], Some(limited)).await;
    let app = app(engine.clone(), "192.0.2.1");
    let auth = format!("Bearer {raw}");
    assert_eq!(
        send(&app, get_with("/hello", &[("authorization", &auth)]))
            .await
            .0,
        StatusCode::OK
    );
    let (status, headers, _) = send(&app, get_with("/hello", &[("authorization", &auth)])).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    for name in [
        "retry-after",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
    ] {
        assert!(headers.contains_key(name), "{name} missing");
    }
    assert_eq!(headers["ratelimit-remaining"], "0");

    let quota = PolicySpec {
        name: "q".into(),
        daily_quota: Some(1),
        ..Default::default()
    };
    let raw = key(&engine, "q", &[], Some(quota)).await;
    let auth = format!("Bearer {raw}");
    assert_eq!(
        send(&app, get_with("/hello", &[("authorization", &auth)]))
            .await
            .0,
        StatusCode::OK
    );
    let (status, headers, body) = send(&app, get_with("/hello", &[("authorization", &auth)])).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(body.contains("quota_exceeded") && headers.contains_key("retry-after"));

    // The store cannot answer: 503, never a pass.
    let store = keysmith::SqliteStore::open(":memory:").await.unwrap();
    store.migrate().await.unwrap();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let engine = Engine::builder(shared).build();
    let raw = key(&engine, "k", &[], None).await;
    let app = self::app(engine, "192.0.2.1");
    store.close().await;
    let (status, _, _) = send(
        &app,
        get_with("/hello", &[("authorization", &format!("Bearer {raw}"))]),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn usage_is_recorded_after_responses_and_flushed_at_shutdown() {
    use keysmith::usage::{UsageWriter, UsageWriterOptions};
    use keysmith::{UsageFilter, model::PageRequest};

    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine = Engine::builder(store.clone()).build();
    let raw = key(&engine, "svc", &["read"], None).await;
    // A long interval: only the batch size or the shutdown writes.
    let options = UsageWriterOptions {
        capacity: 1000,
        batch_size: 1000,
        flush_interval: std::time::Duration::from_secs(3600),
    };
    let (writer, sink) = UsageWriter::spawn(store.clone(), options);
    let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let app = Router::new()
        .route(
            "/admin",
            get(whoami).layer(RequireScopesLayer::new(["admin"])),
        )
        .route("/hello", get(whoami))
        .layer(KeysmithLayer::new(engine.clone()).usage(sink.clone()))
        .layer(MockConnectInfo(peer));
    let auth = format!("Bearer {raw}");
    for _ in 0..7 {
        let request = get_with(
            "/hello",
            &[("authorization", &auth), ("user-agent", "sdk/1")],
        );
        assert_eq!(send(&app, request).await.0, StatusCode::OK);
    }
    assert_eq!(
        send(&app, get_with("/admin", &[("authorization", &auth)]))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // Refused keys are not usage of any key.
    assert_eq!(
        send(&app, get_with("/hello", &[])).await.0,
        StatusCode::UNAUTHORIZED
    );
    writer.shutdown().await;

    let tenant = Tenant::new("app", "t").unwrap();
    let filter = UsageFilter {
        page: PageRequest::new(100, 0).unwrap(),
        ..Default::default()
    };
    let rows = store.list_usage(&tenant, &filter).await.unwrap();
    assert_eq!(
        rows.total, 8,
        "every answered request of a valid key, flushed at shutdown"
    );
    let statuses: Vec<u16> = rows.items.iter().map(|r| r.status_code).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 7);
    assert_eq!(statuses.iter().filter(|s| **s == 403).count(), 1);
    let hello = rows.items.iter().find(|r| r.endpoint == "/hello").unwrap();
    assert_eq!(
        (
            hello.method.as_str(),
            hello.ip.as_deref(),
            hello.user_agent.as_deref()
        ),
        ("GET", Some("192.0.2.1"), Some("sdk/1"))
    );
    assert_eq!(sink.dropped(), 0);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    use keysmith::usage::{UsageWriter, UsageWriterOptions};

    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine = Engine::builder(store.clone()).build();
    let raw = key(&engine, "svc", &[], None).await;
    let options = UsageWriterOptions {
        capacity: 2,
        batch_size: 1000,
        flush_interval: std::time::Duration::from_secs(3600),
    };
    // A current-thread test runtime: the writer task cannot drain the queue
    // while the requests run, so the queue fills.
    let (writer, sink) = UsageWriter::spawn(store.clone(), options);
    let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let app = Router::new()
        .route("/hello", get(whoami))
        .layer(KeysmithLayer::new(engine).usage(sink.clone()))
        .layer(MockConnectInfo(peer));
    let auth = format!("Bearer {raw}");
    for _ in 0..10 {
        assert_eq!(
            send(&app, get_with("/hello", &[("authorization", &auth)]))
                .await
                .0,
            StatusCode::OK
        );
    }
    assert_eq!(sink.dropped(), 8, "two fit, eight were dropped and counted");
    writer.shutdown().await;
    let tenant = Tenant::new("app", "t").unwrap();
    assert_eq!(
        store
            .list_usage(&tenant, &Default::default())
            .await
            .unwrap()
            .total,
        2
    );
}
