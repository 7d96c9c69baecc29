//! The dashboard, in process: sign-in and its failures, sessions (expiry by
//! an injected clock, revoked root keys), CSRF, tenant isolation, scopes of
//! the root key, and every page and action.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use keysmith::clock::Clock;
use keysmith::{
    CreateKey, Engine, KeyState, ManualClock, NewUsage, PolicySpec, SqliteStore, Store, Tenant,
};
use keysmith_server::api::{self, AppState, Limits};
use tower::ServiceExt;

struct App {
    router: Router,
    engine: Engine,
    clock: Arc<ManualClock>,
}

async fn app() -> App {
    let store = SqliteStore::open(":memory:").await.unwrap();
    store.migrate().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let clock = Arc::new(ManualClock::new("2030-01-10T12:00:00Z".parse().unwrap()));
    let engine = Engine::builder(store.clone()).clock(clock.clone()).build();
    let state = AppState {
        engine: engine.clone(),
        store,
        metrics: keysmith_server::serve::metrics_handle(),
    };
    let limits = Limits {
        body_limit: 64 * 1024,
        request_timeout: Duration::from_secs(30),
    };
    App {
        router: api::router(state, limits),
        engine,
        clock,
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[track_caller]
    fn assert(&self, status: StatusCode) -> &Self {
        assert_eq!(self.status, status, "{}", self.body);
        self
    }

    #[track_caller]
    fn assert_redirect(&self, to: &str) {
        assert_eq!(self.status, StatusCode::SEE_OTHER, "{}", self.body);
        assert_eq!(self.location(), to);
    }

    #[track_caller]
    fn field_error(&self, field: &str) -> String {
        let marker = format!("id=\"e-{field}\"");
        let at = self
            .body
            .find(&marker)
            .unwrap_or_else(|| panic!("no error next to {field}: {}", self.body));
        let rest = &self.body[at..];
        let start = rest.find('>').unwrap() + 1;
        let end = rest.find("</p>").unwrap();
        rest[start..end].to_owned()
    }
}

fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let at = html.find(&marker)? + marker.len();
    Some(html[at..].split('"').next()?.to_owned())
}

fn set_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn raw_key_in(html: &str) -> Option<String> {
    let at = html.find("sk_live_")?;
    Some(
        html[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect(),
    )
}

/// A browser of one session: its cookie and CSRF token.
struct Client<'a> {
    app: &'a App,
    cookie: String,
    csrf: String,
    headers: Vec<(String, String)>,
}

impl App {
    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn root(&self, app_id: &str, tenant: &str, scopes: &[&str]) -> String {
        let tenant = Tenant::new(app_id, tenant).unwrap();
        let scopes = scopes.iter().map(|s| s.to_string()).collect();
        keysmith_server::root::create(&self.engine, &tenant, scopes)
            .await
            .unwrap()
            .raw_key
            .expose_secret()
            .to_owned()
    }

    /// Submits the sign-in form as a browser would.
    async fn try_sign_in(&self, raw: &str) -> Answer {
        let form = self
            .send(
                Request::get("/dashboard/login")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        form.assert(StatusCode::OK);
        let cookie = set_cookie(&form.headers, "keysmith_login_csrf").unwrap();
        let cookie = cookie.split(';').next().unwrap().to_owned();
        let token = hidden(&form.body, "csrf").unwrap();
        let body =
            serde_urlencoded::to_string([("csrf", token.as_str()), ("root_key", raw)]).unwrap();
        self.send(
            Request::post("/dashboard/login")
                .header(header::COOKIE, cookie)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }

    async fn sign_in(&self, raw: &str) -> Client<'_> {
        let answer = self.try_sign_in(raw).await;
        answer.assert_redirect("/dashboard");
        let cookie = set_cookie(&answer.headers, "keysmith_session").unwrap();
        let cookie = cookie.split(';').next().unwrap().to_owned();
        let mut client = Client {
            app: self,
            cookie,
            csrf: String::new(),
            headers: Vec::new(),
        };
        let page = client.get("/dashboard/keys").await;
        client.csrf = hidden(&page.body, "csrf").expect("a CSRF token on the page");
        client
    }

    async fn tenant_key(&self, app_id: &str, tenant: &str, name: &str) -> keysmith::ApiKey {
        let tenant = Tenant::new(app_id, tenant).unwrap();
        self.engine
            .create_key(
                &tenant,
                CreateKey {
                    name: name.into(),
                    ..CreateKey::default()
                },
            )
            .await
            .unwrap()
            .key
    }
}

impl Client<'_> {
    async fn get(&self, path: &str) -> Answer {
        let mut request = Request::get(path).header(header::COOKIE, &self.cookie);
        for (k, v) in &self.headers {
            request = request.header(k, v);
        }
        self.app.send(request.body(Body::empty()).unwrap()).await
    }

    /// Posts a form with this session's CSRF token.
    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let mut all = vec![("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        self.post_raw(path, &serde_urlencoded::to_string(&all).unwrap())
            .await
    }

    async fn post_raw(&self, path: &str, body: &str) -> Answer {
        let mut request = Request::post(path)
            .header(header::COOKIE, &self.cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        for (k, v) in &self.headers {
            request = request.header(k, v);
        }
        self.app
            .send(request.body(Body::from(body.to_owned())).unwrap())
            .await
    }
}

#[tokio::test]
async fn sign_in_starts_a_strict_session_and_shows_the_tenant() {
    let app = app().await;
    let root = app.root("acme", "prod", &[]).await;
    let answer = app.try_sign_in(&root).await;
    answer.assert_redirect("/dashboard");
    let cookie = set_cookie(&answer.headers, "keysmith_session").unwrap();
    for part in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/dashboard",
        "Max-Age=28800",
    ] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let value = cookie.split(';').next().unwrap().split('=').nth(1).unwrap();
    assert_eq!(value.len(), 64, "32 random bytes in hex");
    assert!(!cookie.contains(&root));

    let client = app.sign_in(&root).await;
    let overview = client.get("/dashboard").await;
    overview.assert(StatusCode::OK);
    assert!(overview.body.contains("acme / prod"));
    assert!(
        !overview.body.contains(&root),
        "the root key is never shown"
    );
    let csp = overview.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("script-src 'self'"));
    assert_eq!(overview.headers[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(overview.headers[header::REFERRER_POLICY], "no-referrer");

    // Behind a TLS proxy the cookies are Secure.
    let form = app
        .send(
            Request::get("/dashboard/login")
                .header("x-forwarded-proto", "https")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert!(
        set_cookie(&form.headers, "keysmith_login_csrf")
            .unwrap()
            .contains("; Secure")
    );

    // Sign out ends the session for good.
    let out = client.post("/dashboard/logout", &[]).await;
    out.assert_redirect("/dashboard/login");
    assert!(
        set_cookie(&out.headers, "keysmith_session")
            .unwrap()
            .contains("Max-Age=0")
    );
    client
        .get("/dashboard")
        .await
        .assert_redirect("/dashboard/login");
}

#[tokio::test]
async fn sign_in_failures_show_an_error_next_to_the_field() {
    let app = app().await;
    let wrong = format!("ksr_live_{}", "0".repeat(64));
    for raw in ["", "not a key", wrong.as_str()] {
        let answer = app.try_sign_in(raw).await;
        answer.assert(StatusCode::UNAUTHORIZED);
        assert!(!answer.field_error("root_key").is_empty());
        assert!(set_cookie(&answer.headers, "keysmith_session").is_none());
    }
    // A tenant's key is not a root key.
    let tenant = Tenant::new("acme", "prod").unwrap();
    let tenant_key = app
        .engine
        .create_key(
            &tenant,
            CreateKey {
                name: "svc".into(),
                ..CreateKey::default()
            },
        )
        .await
        .unwrap();
    app.try_sign_in(tenant_key.raw_key.expose_secret())
        .await
        .assert(StatusCode::UNAUTHORIZED);
    // A revoked root key.
    let root = app.root("acme", "prod", &[]).await;
    let id = app
        .engine
        .list_keys(&keysmith_server::root::root_tenant(), &Default::default())
        .await
        .unwrap()
        .items[0]
        .id;
    app.engine
        .revoke_key(&keysmith_server::root::root_tenant(), &id, None)
        .await
        .unwrap();
    app.try_sign_in(&root)
        .await
        .assert(StatusCode::UNAUTHORIZED);

    // Without the sign-in form's CSRF cookie: refused.
    let root = app.root("acme", "prod", &[]).await;
    let body = serde_urlencoded::to_string([("csrf", "x"), ("root_key", root.as_str())]).unwrap();
    let answer = app
        .send(
            Request::post("/dashboard/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    answer.assert(StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn pages_need_a_session() {
    let app = app().await;
    for path in [
        "/dashboard",
        "/dashboard/keys",
        "/dashboard/keys/new",
        "/dashboard/policies",
        "/dashboard/policies/new",
        "/dashboard/scopes",
    ] {
        let answer = app
            .send(Request::get(path).body(Body::empty()).unwrap())
            .await;
        answer.assert_redirect("/dashboard/login");
        let with_junk = app
            .send(
                Request::get(path)
                    .header(header::COOKIE, "keysmith_session=deadbeef")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        with_junk.assert_redirect("/dashboard/login");
    }
    // A trailing slash finds the dashboard too.
    let slash = app
        .send(Request::get("/dashboard/").body(Body::empty()).unwrap())
        .await;
    assert_eq!(slash.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(slash.location(), "/dashboard");
    let post = app
        .send(
            Request::post("/dashboard/keys/new")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from("name=x"))
                .unwrap(),
        )
        .await;
    post.assert_redirect("/dashboard/login");
    // The stylesheet and script are served from the binary.
    let css = app
        .send(
            Request::get("/dashboard/static/app.css")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    css.assert(StatusCode::OK);
    assert!(
        css.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    let js = app
        .send(
            Request::get("/dashboard/static/app.js")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert!(js.body.contains("data-copy"));
}

#[tokio::test]
async fn forms_without_the_csrf_token_or_from_another_origin_are_refused() {
    let app = app().await;
    let root = app.root("acme", "prod", &[]).await;
    let mut client = app.sign_in(&root).await;
    client
        .post_raw("/dashboard/keys/new", "name=sneaky")
        .await
        .assert(StatusCode::FORBIDDEN);
    client
        .post_raw("/dashboard/keys/new", "name=sneaky&csrf=0000")
        .await
        .assert(StatusCode::FORBIDDEN);
    client.headers = vec![
        ("origin".into(), "https://evil.example".into()),
        ("host".into(), "127.0.0.1:8080".into()),
    ];
    client
        .post("/dashboard/keys/new", &[("name", "sneaky")])
        .await
        .assert(StatusCode::FORBIDDEN);
    client.headers = vec![("sec-fetch-site".into(), "cross-site".into())];
    client
        .post("/dashboard/keys/new", &[("name", "sneaky")])
        .await
        .assert(StatusCode::FORBIDDEN);
    client.headers = vec![("origin".into(), "null".into())];
    client
        .post("/dashboard/keys/new", &[("name", "sneaky")])
        .await
        .assert(StatusCode::FORBIDDEN);
    // The same origin passes.
    client.headers = vec![
        ("origin".into(), "http://127.0.0.1:8080".into()),
        ("host".into(), "127.0.0.1:8080".into()),
    ];
    client
        .post("/dashboard/keys/new", &[("name", "fine")])
        .await
        .assert(StatusCode::OK);
    let tenant = Tenant::new("acme", "prod").unwrap();
    let keys = app
        .engine
        .list_keys(&tenant, &Default::default())
        .await
        .unwrap();
    assert_eq!(keys.total, 1, "only the same-origin form created a key");
    assert_eq!(keys.items[0].name, "fine");
    // A signed-out POST with another session's token is refused as well.
    let other = app.sign_in(&app.root("acme", "prod", &[]).await).await;
    let mut mixed = app.sign_in(&root).await;
    mixed.csrf = other.csrf.clone();
    mixed
        .post("/dashboard/keys/new", &[("name", "x")])
        .await
        .assert(StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_session_expires_by_the_clock_and_with_its_root_key() {
    let app = app().await;
    let root = app.root("acme", "prod", &[]).await;
    let client = app.sign_in(&root).await;
    client.get("/dashboard").await.assert(StatusCode::OK);
    // Idle for more than two hours.
    app.clock.advance(Duration::from_secs(2 * 3600 + 1));
    client
        .get("/dashboard")
        .await
        .assert_redirect("/dashboard/login");
    client
        .post("/dashboard/scopes", &[("name", "read")])
        .await
        .assert_redirect("/dashboard/login");

    // Active all along, but past eight hours since sign-in.
    let client = app.sign_in(&root).await;
    for _ in 0..7 {
        app.clock.advance(Duration::from_secs(3600));
        client.get("/dashboard/keys").await.assert(StatusCode::OK);
    }
    app.clock.advance(Duration::from_secs(3599));
    client.get("/dashboard/keys").await.assert(StatusCode::OK);
    app.clock.advance(Duration::from_secs(2));
    client
        .get("/dashboard/keys")
        .await
        .assert_redirect("/dashboard/login");

    // Revoking the root key ends its sessions at once.
    let client = app.sign_in(&root).await;
    let root_tenant = keysmith_server::root::root_tenant();
    let id = app
        .engine
        .list_keys(&root_tenant, &Default::default())
        .await
        .unwrap()
        .items[0]
        .id;
    app.engine
        .revoke_key(&root_tenant, &id, None)
        .await
        .unwrap();
    client
        .get("/dashboard")
        .await
        .assert_redirect("/dashboard/login");
}

#[tokio::test]
async fn the_root_keys_scopes_limit_pages_and_actions() {
    let app = app().await;
    let reader = app.root("acme", "prod", &["keysmith:keys:read"]).await;
    let client = app.sign_in(&reader).await;
    client.get("/dashboard").await.assert(StatusCode::OK);
    let keys = client.get("/dashboard/keys").await;
    keys.assert(StatusCode::OK);
    assert!(!keys.body.contains("Create a key"));
    client
        .get("/dashboard/keys/new")
        .await
        .assert(StatusCode::FORBIDDEN);
    client
        .post("/dashboard/keys/new", &[("name", "x")])
        .await
        .assert(StatusCode::FORBIDDEN);
    client
        .get("/dashboard/policies")
        .await
        .assert(StatusCode::FORBIDDEN);
    client
        .get("/dashboard/scopes")
        .await
        .assert(StatusCode::FORBIDDEN);
    let key = app.tenant_key("acme", "prod", "svc").await;
    client
        .post(&format!("/dashboard/keys/{}/suspend", key.id), &[])
        .await
        .assert(StatusCode::FORBIDDEN);
    let detail = client.get(&format!("/dashboard/keys/{}", key.id)).await;
    detail.assert(StatusCode::OK);
    assert!(!detail.body.contains("Revoke"), "no buttons it may not use");
}

#[tokio::test]
async fn another_tenants_ids_are_not_found() {
    let app = app().await;
    let client = app.sign_in(&app.root("acme", "prod", &[]).await).await;
    let theirs = app.tenant_key("acme", "staging", "theirs").await;
    let other = Tenant::new("acme", "staging").unwrap();
    let policy = app
        .engine
        .create_policy(
            &other,
            PolicySpec {
                name: "p".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let scope = app
        .engine
        .create_scope(
            &other,
            keysmith::CreateScope {
                name: "read".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let k = format!("/dashboard/keys/{}", theirs.id);
    let p = format!("/dashboard/policies/{}", policy.id);
    for path in [
        k.clone(),
        format!("{k}/edit"),
        format!("{k}/rotate"),
        format!("{k}/revoke"),
        p.clone(),
        format!("{p}/edit"),
        "/dashboard/keys/akey_nonsense".into(),
        "/dashboard/keys/kpol_01h455vb4pex5vsknk084sn02q".into(),
        "/dashboard/nowhere".into(),
    ] {
        client.get(&path).await.assert(StatusCode::NOT_FOUND);
    }
    for (path, fields) in [
        (format!("{k}/suspend"), vec![]),
        (format!("{k}/reactivate"), vec![]),
        (
            format!("{k}/revoke"),
            vec![("reason", "x"), ("confirm", "yes")],
        ),
        (format!("{k}/rotate"), vec![]),
        (format!("{k}/edit"), vec![("name", "mine")]),
        (format!("{k}/scopes/add"), vec![("scopes", "read")]),
        (format!("{k}/scopes/remove"), vec![("scope", "read")]),
        (format!("{p}/edit"), vec![("name", "mine")]),
        (format!("{p}/delete"), vec![]),
        (format!("/dashboard/scopes/{}/delete", scope.id), vec![]),
    ] {
        client
            .post(&path, &fields)
            .await
            .assert(StatusCode::NOT_FOUND);
    }
    let after = app.engine.get_key(&other, &theirs.id).await.unwrap();
    assert_eq!(after.state, KeyState::Active);
    assert_eq!(after.name, "theirs");
    // Their keys are not listed.
    let list = client.get("/dashboard/keys").await;
    assert!(!list.body.contains("theirs"));
}

#[tokio::test]
async fn keys_create_reveal_once_rotate_suspend_edit_scopes_revoke() {
    let app = app().await;
    let root = app.root("acme", "prod", &[]).await;
    let client = app.sign_in(&root).await;
    client
        .get("/dashboard/keys/new")
        .await
        .assert(StatusCode::OK);

    // Field errors, and no key.
    let bad = client
        .post(
            "/dashboard/keys/new",
            &[
                ("name", ""),
                ("environment", "PROD!"),
                ("expires_at", "tomorrow"),
                ("metadata", "[1]"),
                ("policy_id", "kpol_nonsense"),
            ],
        )
        .await;
    bad.assert(StatusCode::BAD_REQUEST);
    for field in ["name", "environment", "expires_at", "metadata", "policy_id"] {
        assert!(!bad.field_error(field).is_empty());
    }
    assert!(raw_key_in(&bad.body).is_none());
    let past = client
        .post(
            "/dashboard/keys/new",
            &[("name", "x"), ("expires_at", "2020-01-01")],
        )
        .await;
    assert!(past.field_error("expires_at").contains("future"));

    // Create: the raw key is shown once, not cached.
    let created = client
        .post(
            "/dashboard/keys/new",
            &[
                ("name", "billing-service"),
                ("scopes", "read, write:builds"),
                ("expires_at", "2030-01-12 12:00"),
                ("metadata", r#"{"team":"payments"}"#),
            ],
        )
        .await;
    created.assert(StatusCode::OK);
    assert_eq!(created.headers[header::CACHE_CONTROL], "no-store");
    assert!(created.body.contains("shown once"));
    assert!(created.body.contains("data-copy=\"raw-key\""));
    let raw = raw_key_in(&created.body).unwrap();
    let tenant = Tenant::new("acme", "prod").unwrap();
    let key = app
        .engine
        .list_keys(&tenant, &Default::default())
        .await
        .unwrap()
        .items[0]
        .clone();
    assert_eq!(key.scopes, vec!["read", "write:builds"]);
    let valid = app
        .engine
        .validate(&raw, &Default::default())
        .await
        .unwrap();
    assert_eq!(valid.key.id, key.id);

    let path = format!("/dashboard/keys/{}", key.id);
    let detail = client.get(&path).await;
    detail.assert(StatusCode::OK);
    assert!(
        !detail.body.contains(&raw),
        "no page shows the raw key again"
    );
    assert!(detail.body.contains("billing-service") && detail.body.contains("write:builds"));
    assert!(detail.body.contains("<svg"), "usage charts");
    let list = client.get("/dashboard/keys").await;
    assert!(list.body.contains("billing-service") && !list.body.contains(&raw));

    // Rotate: bad grace is a field error; a good one reveals the new secret.
    let bad = client
        .post(&format!("{path}/rotate"), &[("grace_period", "soon")])
        .await;
    bad.assert(StatusCode::BAD_REQUEST);
    assert!(!bad.field_error("grace_period").is_empty());
    client
        .get(&format!("{path}/rotate"))
        .await
        .assert(StatusCode::OK);
    let rotated = client
        .post(
            &format!("{path}/rotate"),
            &[("grace_period", "1h"), ("reason", "scheduled")],
        )
        .await;
    rotated.assert(StatusCode::OK);
    let new_raw = raw_key_in(&rotated.body).unwrap();
    assert_ne!(new_raw, raw);
    assert!(
        rotated.body.contains("2030-01-10 13:00 UTC"),
        "grace end shown"
    );
    assert!(
        app.engine.validate(&raw, &Default::default()).await.is_ok(),
        "in grace"
    );
    let detail = client.get(&path).await;
    assert!(detail.body.contains("scheduled") && detail.body.contains("in grace"));

    // Suspend, reactivate, and a refused transition shown on the page.
    client
        .post(&format!("{path}/suspend"), &[])
        .await
        .assert_redirect(&path);
    assert_eq!(
        app.engine.get_key(&tenant, &key.id).await.unwrap().state,
        KeyState::Suspended
    );
    let again = client.post(&format!("{path}/suspend"), &[]).await;
    again.assert(StatusCode::CONFLICT);
    assert!(again.body.contains("cannot suspend"));
    client
        .post(&format!("{path}/reactivate"), &[])
        .await
        .assert_redirect(&path);

    // Edit.
    client
        .get(&format!("{path}/edit"))
        .await
        .assert(StatusCode::OK);
    let bad = client.post(&format!("{path}/edit"), &[("name", "")]).await;
    assert!(!bad.field_error("name").is_empty());
    client
        .post(
            &format!("{path}/edit"),
            &[("name", "billing-v2"), ("description", "the billing one")],
        )
        .await
        .assert_redirect(&path);
    let edited = app.engine.get_key(&tenant, &key.id).await.unwrap();
    assert_eq!(edited.name, "billing-v2");
    assert_eq!(edited.description.as_deref(), Some("the billing one"));
    assert_eq!(edited.expires_at, None, "an empty expiry clears it");

    // Scopes.
    client
        .post(
            &format!("{path}/scopes/add"),
            &[("scopes", "admin, read:users")],
        )
        .await
        .assert_redirect(&path);
    let bad = client
        .post(&format!("{path}/scopes/add"), &[("scopes", "Bad Scope!")])
        .await;
    bad.assert(StatusCode::BAD_REQUEST);
    assert!(!bad.field_error("scopes").is_empty());
    client
        .post(&format!("{path}/scopes/remove"), &[("scope", "admin")])
        .await
        .assert_redirect(&path);
    let scopes = app.engine.get_key(&tenant, &key.id).await.unwrap().scopes;
    assert_eq!(scopes, vec!["read", "read:users", "write:builds"]);

    // Revoke needs a reason and the confirmation.
    client
        .get(&format!("{path}/revoke"))
        .await
        .assert(StatusCode::OK);
    let bad = client
        .post(&format!("{path}/revoke"), &[("reason", "")])
        .await;
    bad.assert(StatusCode::BAD_REQUEST);
    assert!(!bad.field_error("reason").is_empty());
    assert!(bad.body.contains("Tick the box"));
    client
        .post(
            &format!("{path}/revoke"),
            &[("reason", "leaked"), ("confirm", "yes")],
        )
        .await
        .assert_redirect(&path);
    let detail = client.get(&path).await;
    assert!(detail.body.contains("badge revoked"));
    assert!(matches!(
        app.engine.validate(&new_raw, &Default::default()).await,
        Err(keysmith::Error::KeyRevoked)
    ));
    client
        .post(&format!("{path}/rotate"), &[])
        .await
        .assert(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_key_list_filters_searches_and_pages() {
    let app = app().await;
    let client = app.sign_in(&app.root("acme", "prod", &[]).await).await;
    let tenant = Tenant::new("acme", "prod").unwrap();
    let mut hint = String::new();
    for i in 0..30 {
        let created = app
            .engine
            .create_key(
                &tenant,
                CreateKey {
                    name: format!("svc-{i:02}"),
                    environment: Some(if i % 3 == 0 { "test" } else { "live" }.parse().unwrap()),
                    ..CreateKey::default()
                },
            )
            .await
            .unwrap();
        if i == 7 {
            hint = created.key.hint.clone();
            app.engine
                .suspend_key(&tenant, &created.key.id)
                .await
                .unwrap();
        }
    }
    let first = client.get("/dashboard/keys").await;
    assert!(first.body.contains("Page 1 of 2") && first.body.contains("30 in all"));
    let second = client.get("/dashboard/keys?page=2").await;
    assert!(second.body.contains("svc-00") && !second.body.contains("svc-29"));
    let test = client.get("/dashboard/keys?environment=test").await;
    assert!(test.body.contains("10 in all"));
    let suspended = client.get("/dashboard/keys?state=suspended").await;
    assert!(suspended.body.contains("svc-07") && suspended.body.contains("1 in all"));
    let by_name = client.get("/dashboard/keys?q=SVC-1").await;
    assert!(
        by_name.body.contains("10 in all"),
        "case-insensitive name search"
    );
    let by_hint = client.get(&format!("/dashboard/keys?q={hint}")).await;
    assert!(by_hint.body.contains("svc-07"));
    let bad = client
        .get("/dashboard/keys?state=sleepy&environment=NOPE&policy=x&page=zz")
        .await;
    bad.assert(StatusCode::BAD_REQUEST);
    for field in ["state", "environment", "policy"] {
        assert!(!bad.field_error(field).is_empty());
    }
    client
        .get("/dashboard/keys?page=99999999999999999999")
        .await
        .assert(StatusCode::OK);
}

#[tokio::test]
async fn policies_create_edit_delete_and_field_errors() {
    let app = app().await;
    let client = app.sign_in(&app.root("acme", "prod", &[]).await).await;
    client
        .get("/dashboard/policies")
        .await
        .assert(StatusCode::OK);
    client
        .get("/dashboard/policies/new")
        .await
        .assert(StatusCode::OK);
    let bad = client
        .post(
            "/dashboard/policies/new",
            &[
                ("name", "office"),
                ("allowed_ips", "10.0.0.0/8\n10.0.0.0/99"),
                ("rate_limit", "-3"),
                ("grace_period", "a while"),
            ],
        )
        .await;
    bad.assert(StatusCode::BAD_REQUEST);
    assert!(bad.field_error("rate_limit").contains("whole number"));
    assert!(!bad.field_error("grace_period").is_empty());
    let bad = client
        .post(
            "/dashboard/policies/new",
            &[
                ("name", "office"),
                ("allowed_ips", "10.0.0.0/8\n10.0.0.0/99"),
            ],
        )
        .await;
    bad.assert(StatusCode::BAD_REQUEST);
    assert!(
        bad.field_error("allowed_ips").contains("allowed_ips[1]"),
        "{}",
        bad.field_error("allowed_ips")
    );
    assert!(bad.body.contains("10.0.0.0/99"), "the typed value is kept");

    let created = client
        .post(
            "/dashboard/policies/new",
            &[
                ("name", "office"),
                ("allowed_ips", "10.0.0.0/8, 192.168.0.0/16"),
                ("rate_limit", "100"),
                ("rate_limit_window", "1m"),
                ("rotation_period", "30d"),
            ],
        )
        .await;
    assert_eq!(created.status, StatusCode::SEE_OTHER);
    let path = created.location().to_owned();
    let dup = client
        .post("/dashboard/policies/new", &[("name", "office")])
        .await;
    assert!(dup.field_error("name").contains("exists"));

    let tenant = Tenant::new("acme", "prod").unwrap();
    let policy = app
        .engine
        .list_policies(&tenant, &Default::default())
        .await
        .unwrap()
        .items[0]
        .clone();
    assert_eq!(
        policy.spec.allowed_ips,
        vec!["10.0.0.0/8", "192.168.0.0/16"]
    );
    let detail = client.get(&path).await;
    detail.assert(StatusCode::OK);
    assert!(detail.body.contains("100 / 1m") && detail.body.contains("No key uses"));
    let list = client.get("/dashboard/policies").await;
    assert!(list.body.contains("office") && list.body.contains("2 IPs"));

    client
        .get(&format!("{path}/edit"))
        .await
        .assert(StatusCode::OK);
    client
        .post(
            &format!("{path}/edit"),
            &[("name", "office-v2"), ("daily_quota", "1000")],
        )
        .await
        .assert_redirect(&path);
    let policy = app.engine.get_policy(&tenant, &policy.id).await.unwrap();
    assert_eq!(
        (policy.spec.name.as_str(), policy.spec.daily_quota),
        ("office-v2", Some(1000))
    );
    assert!(
        policy.spec.allowed_ips.is_empty(),
        "the form replaces the policy"
    );

    // In use: refused, with the reason.
    let key = app
        .engine
        .create_key(
            &tenant,
            CreateKey {
                name: "office-key".into(),
                policy_id: Some(policy.id),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let detail = client.get(&path).await;
    assert!(detail.body.contains("office-key"));
    let refused = client.post(&format!("{path}/delete"), &[]).await;
    refused.assert(StatusCode::CONFLICT);
    assert!(refused.body.contains("cannot be deleted: 1 key(s) use it"));
    app.engine.delete_key(&tenant, &key.key.id).await.unwrap();
    client
        .post(&format!("{path}/delete"), &[])
        .await
        .assert_redirect("/dashboard/policies");
    client.get(&path).await.assert(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn scopes_as_a_tree_create_delete() {
    let app = app().await;
    let client = app.sign_in(&app.root("acme", "prod", &[]).await).await;
    for name in ["read", "read:users", "read:users:email", "write"] {
        client
            .post("/dashboard/scopes", &[("name", name)])
            .await
            .assert_redirect("/dashboard/scopes");
    }
    let bad = client
        .post("/dashboard/scopes", &[("name", "Not Valid")])
        .await;
    bad.assert(StatusCode::BAD_REQUEST);
    assert!(!bad.field_error("name").is_empty());
    let bad = client
        .post("/dashboard/scopes", &[("name", "a:b"), ("parent", "c")])
        .await;
    assert!(!bad.field_error("parent").is_empty());
    let dup = client.post("/dashboard/scopes", &[("name", "read")]).await;
    assert!(dup.field_error("name").contains("exists"));

    let page = client.get("/dashboard/scopes").await;
    page.assert(StatusCode::OK);
    // read:users:email is nested two lists deep under read.
    let tree = page.body.find("<ul class=\"tree\">").unwrap();
    let read = tree + page.body[tree..].find("<code>read</code>").unwrap();
    let email = page.body.find("<code>read:users:email</code>").unwrap();
    let write = page.body.find("<code>write</code>").unwrap();
    assert!(read < email && email < write);
    assert_eq!(
        page.body[read..email]
            .matches("<ul class=\"tree\">")
            .count(),
        2
    );

    let tenant = Tenant::new("acme", "prod").unwrap();
    let scopes = app
        .engine
        .list_scopes(&tenant, None, &Default::default())
        .await
        .unwrap();
    let write_id = scopes.items.iter().find(|s| s.name == "write").unwrap().id;
    client
        .post(&format!("/dashboard/scopes/{write_id}/delete"), &[])
        .await
        .assert_redirect("/dashboard/scopes");
    assert!(
        !client
            .get("/dashboard/scopes")
            .await
            .body
            .contains("<code>write</code>")
    );
}

#[tokio::test]
async fn the_overview_counts_keys_and_lists_expiry_rotation_and_use() {
    let app = app().await;
    let root = app.root("acme", "prod", &[]).await;
    let tenant = Tenant::new("acme", "prod").unwrap();
    let now = app.clock.now();
    let policy = app
        .engine
        .create_policy(
            &tenant,
            PolicySpec {
                name: "monthly".into(),
                rotation_period: Some(Duration::from_secs(86_400)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let due = app
        .engine
        .create_key(
            &tenant,
            CreateKey {
                name: "due-key".into(),
                policy_id: Some(policy.id),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let soon = app
        .engine
        .create_key(
            &tenant,
            CreateKey {
                name: "soon-key".into(),
                expires_at: Some(now + chrono::Duration::days(5)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let used = app
        .engine
        .create_key(
            &tenant,
            CreateKey {
                name: "used-key".into(),
                environment: Some("test".parse().unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    app.engine.suspend_key(&tenant, &soon.key.id).await.unwrap();
    app.engine
        .reactivate_key(&tenant, &soon.key.id)
        .await
        .unwrap();
    app.clock.advance(Duration::from_secs(2 * 86_400));
    app.engine
        .validate(used.raw_key.expose_secret(), &Default::default())
        .await
        .unwrap();
    app.engine.flush_last_used().await.unwrap();
    let usage = |status: u16, hours_ago: i64| NewUsage {
        key_id: used.key.id,
        endpoint: "/v1/things".into(),
        method: "GET".into(),
        status_code: status,
        ip: None,
        user_agent: None,
        latency_ms: 12,
        metadata: Default::default(),
        created_at: Some(app.clock.now() - chrono::Duration::hours(hours_ago)),
    };
    app.engine
        .record_usage(&tenant, vec![usage(200, 1), usage(500, 1), usage(200, 100)])
        .await
        .unwrap();

    let client = app.sign_in(&root).await;
    let page = client.get("/dashboard").await;
    page.assert(StatusCode::OK);
    let body = &page.body;
    assert!(
        body.contains("Last 24 hours, per hour — 2 requests, 1 errors"),
        "{body}"
    );
    assert!(body.contains("Last 30 days, per day — 3 requests, 1 errors"));
    let section = |title: &str| {
        let at = body.find(title).unwrap();
        body[at..].split("</section>").next().unwrap().to_owned()
    };
    assert!(section("Close to expiry").contains("soon-key"));
    assert!(section("Due for rotation").contains("due-key"));
    assert!(!section("Due for rotation").contains("soon-key"));
    assert!(section("Recently used").contains("used-key"));
    assert!(section("Keys by state and environment").contains("environment=test\">1</a>"));
    let _ = due;
}

#[tokio::test]
async fn bad_input_never_breaks_a_page() {
    let app = app().await;
    let client = app.sign_in(&app.root("acme", "prod", &[]).await).await;
    let key = app.tenant_key("acme", "prod", "k").await;
    let path = format!("/dashboard/keys/{}", key.id);
    for body in ["%ZZ", "csrf", "&&&===", "\u{0}"] {
        let answer = client.post_raw(&format!("{path}/edit"), body).await;
        assert!(answer.status.is_client_error(), "{body}: {}", answer.status);
    }
    let long = "x".repeat(10_000);
    let answer = client
        .post(
            "/dashboard/keys/new",
            &[("name", &long), ("description", &long)],
        )
        .await;
    answer.assert(StatusCode::BAD_REQUEST);
    assert!(!answer.field_error("name").is_empty());
    let answer = client.get(&format!("/dashboard/keys?q={long}")).await;
    answer.assert(StatusCode::BAD_REQUEST);
    let answer = client
        .post(
            "/dashboard/policies/new",
            &[
                ("name", "p"),
                ("allowed_origins", "ftp:/nope"),
                ("allowed_paths", "no-slash"),
            ],
        )
        .await;
    answer.assert(StatusCode::BAD_REQUEST);
    client
        .post(&format!("{path}/scopes/remove"), &[])
        .await
        .assert(StatusCode::BAD_REQUEST);
    let escaped = client
        .post(
            "/dashboard/keys/new",
            &[("name", "<script>alert(1)</script>")],
        )
        .await;
    escaped.assert(StatusCode::OK);
    assert!(!escaped.body.contains("<script>alert"), "names are escaped");
    let list = client.get("/dashboard/keys").await;
    assert!(list.body.contains("&lt;script&gt;"));
    let _ = Method::GET;
}
