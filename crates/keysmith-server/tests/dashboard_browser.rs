//! The dashboard in a real browser: headless Chromium driven through
//! chromedriver (WebDriver). Runs with the `browser-tests` feature (so with
//! `--all-features`, as `scripts/test` does) and fails, never skips, when
//! Chromium or chromedriver is missing.
//!
//! Screenshots of the main pages go to `$KEYSMITH_TEST_SCREENSHOTS`, else to
//! `target/dashboard-screenshots/` of the workspace.
#![cfg(feature = "browser-tests")]
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use fantoccini::{Client, ClientBuilder, Locator};
use keysmith::{CreateKey, NewUsage, PolicySpec, SqliteStore, Store, Tenant, UsagePeriod};
use keysmith_server::api::{self, AppState, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn tool(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.exists(),
        "the browser tests need {} (install Debian's `chromium` and `chromium-driver`: \
         `apt-get install chromium chromium-driver`, as scripts/test does, or set {var}); \
         run without `--features browser-tests` to leave them out",
        path.display()
    );
    path
}

fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("KEYSMITH_TEST_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/dashboard-screenshots")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver, stopped (by its own handle) when dropped.
struct Driver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_driver() -> Driver {
    let chromedriver = tool("KEYSMITH_TEST_CHROMEDRIVER", CHROMEDRIVER);
    let port = free_port();
    let profile =
        std::env::temp_dir().join(format!("keysmith-chromium-{}-{port}", std::process::id()));
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver {
        child,
        port,
        profile,
    };
    // Wait (bounded) for chromedriver to listen.
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return driver;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chromedriver did not start listening on port {port}");
}

async fn browser(driver: &Driver) -> Client {
    let chromium = tool("KEYSMITH_TEST_CHROMIUM", CHROMIUM);
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", driver.profile.display())])
    .collect::<Vec<_>>();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "binary": chromium, "args": args }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("open a Chromium session through chromedriver")
}

/// `POST /v1/keys/validate` over a plain socket: the status and JSON body.
async fn validate(addr: std::net::SocketAddr, root: &str, raw: &str) -> serde_json::Value {
    let body = serde_json::json!({ "raw_key": raw }).to_string();
    let request = format!(
        "POST /v1/keys/validate HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {root}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let json = response.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str(json).unwrap()
}

async fn shot(client: &Client, dir: &Path, name: &str) {
    let png = client.screenshot().await.unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

async fn text_of(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Clicks and waits (bounded) for what the next page must show.
async fn click_then(
    client: &Client,
    target: Locator<'_>,
    expect: &str,
) -> Result<(), fantoccini::error::CmdError> {
    client.find(target).await?.click().await?;
    client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(expect))
        .await?;
    Ok(())
}

async fn fill(client: &Client, css: &str, value: &str) {
    let field = client.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(value).await.unwrap();
}

/// Some keys, a policy and a month of usage, so the pages have something to show.
async fn seed(engine: &keysmith::Engine, tenant: &Tenant) {
    let policy = engine
        .create_policy(
            tenant,
            PolicySpec {
                name: "standard".into(),
                allowed_ips: vec!["10.0.0.0/8".into()],
                rate_limit: Some(100),
                rotation_period: Some(Duration::from_secs(30 * 86_400)),
                max_key_lifetime: Some(Duration::from_secs(365 * 86_400)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let now = Utc::now();
    let mut first = None;
    for (i, (name, env)) in [
        ("checkout-web", "live"),
        ("billing-worker", "live"),
        ("ci-pipeline", "test"),
        ("analytics-export", "live"),
        ("staging-smoke", "staging"),
    ]
    .into_iter()
    .enumerate()
    {
        let created = engine
            .create_key(
                tenant,
                CreateKey {
                    name: name.into(),
                    environment: Some(env.parse().unwrap()),
                    scopes: vec!["read".into(), "write:orders".into()],
                    policy_id: (i % 2 == 0).then_some(policy.id),
                    expires_at: (i == 3).then(|| now + chrono::Duration::days(4)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        if i == 4 {
            engine.suspend_key(tenant, &created.key.id).await.unwrap();
        } else {
            let request = keysmith::RequestContext {
                ip: Some("10.1.2.3".parse().unwrap()),
                ..Default::default()
            };
            engine
                .validate(created.raw_key.expose_secret(), &request)
                .await
                .unwrap();
        }
        first.get_or_insert(created.key.id);
    }
    engine.flush_last_used().await.unwrap();
    let key_id = first.unwrap();
    let mut batch = Vec::new();
    for day in 0..30i64 {
        for n in 0..(5 + (day * 7) % 23) {
            batch.push(NewUsage {
                key_id,
                endpoint: "/v1/orders".into(),
                method: "GET".into(),
                status_code: if n % 9 == 0 { 500 } else { 200 },
                ip: None,
                user_agent: None,
                latency_ms: 8 + ((n * 13 + day * 5) % 40) as u64,
                metadata: Default::default(),
                created_at: Some(now - chrono::Duration::hours(day * 24 + n % 20)),
            });
        }
    }
    for chunk in batch.chunks(1000) {
        engine.record_usage(tenant, chunk.to_vec()).await.unwrap();
    }
    for day in 0..31 {
        engine
            .aggregate_usage(UsagePeriod::Day, now - chrono::Duration::days(day))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    let driver = start_driver().await;
    let dir = screenshot_dir();

    let store = SqliteStore::open(":memory:").await.unwrap();
    store.migrate().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let engine = keysmith_server::serve::engine(store.clone());
    let tenant = Tenant::new("acme", "prod").unwrap();
    let root = keysmith_server::root::create(&engine, &tenant, Vec::new())
        .await
        .unwrap()
        .raw_key
        .expose_secret()
        .to_owned();
    seed(&engine, &tenant).await;
    let app = api::router(
        AppState {
            engine: engine.clone(),
            store,
            metrics: keysmith_server::serve::metrics_handle(),
        },
        Limits {
            body_limit: 1 << 20,
            request_timeout: Duration::from_secs(30),
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}/dashboard");

    let client = browser(&driver).await;
    let outcome = scenario(&client, &base, addr, &root, &dir).await;
    let _ = client.close().await;
    server.abort();
    outcome.unwrap();
}

async fn scenario(
    client: &Client,
    base: &str,
    addr: std::net::SocketAddr,
    root: &str,
    dir: &Path,
) -> Result<(), fantoccini::error::CmdError> {
    // Sign in: a wrong key first.
    client.goto(&format!("{base}/login")).await?;
    fill(client, "#f-root_key", "ksr_live_nope").await;
    click_then(client, Locator::Css("form.card button"), "#e-root_key").await?;
    assert!(
        text_of(client, "#e-root_key")
            .await
            .contains("not a valid root key")
    );
    fill(client, "#f-root_key", root).await;
    click_then(
        client,
        Locator::Css("form.card button"),
        "nav[aria-label=Sections]",
    )
    .await?;
    assert_eq!(client.current_url().await?.path(), "/dashboard");
    assert_eq!(text_of(client, "h1").await, "Overview");
    let overview = text_of(client, "body").await;
    assert!(
        overview.contains("analytics-export"),
        "close to expiry: {overview}"
    );
    assert!(
        overview.contains("checkout-web"),
        "recently used: {overview}"
    );
    shot(client, dir, "overview.png").await;

    // Create a key and read its one-time raw key.
    client.goto(&format!("{base}/keys/new")).await?;
    fill(client, "#f-name", "browser-made").await;
    fill(client, "#f-scopes", "read").await;
    click_then(
        client,
        Locator::Css("form.card button[type=submit]"),
        "#raw-key",
    )
    .await?;
    assert!(text_of(client, ".banner.warn").await.contains("shown once"));
    let raw = client
        .find(Locator::Css("#raw-key"))
        .await?
        .prop("value")
        .await?
        .unwrap();
    assert!(raw.starts_with("sk_live_"), "{raw}");
    client
        .find(Locator::Css("button[data-copy]"))
        .await?
        .click()
        .await?;
    // The embedded script ran under the CSP: it reports the copy either way.
    let mut status = String::new();
    for _ in 0..50 {
        status = text_of(client, "#copy-status").await;
        if !status.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!status.is_empty(), "the copy button answered");
    shot(client, dir, "create-reveal.png").await;

    // Validate it through the API.
    let valid = validate(addr, root, &raw).await;
    assert_eq!(valid["valid"], true, "{valid}");

    // The keys list, then the key's page; no raw key there.
    client.goto(&format!("{base}/keys")).await?;
    assert!(text_of(client, "table").await.contains("browser-made"));
    shot(client, dir, "keys-list.png").await;
    click_then(client, Locator::LinkText("checkout-web"), "p.lead").await?;
    assert!(text_of(client, "h1").await.contains("checkout-web"));
    shot(client, dir, "key-detail.png").await;

    client.goto(&format!("{base}/keys?q=browser")).await?;
    click_then(client, Locator::LinkText("browser-made"), "p.lead").await?;
    assert!(!client.source().await?.contains(&raw));

    // Revoke it in the dashboard and see the state change.
    click_then(client, Locator::LinkText("Revoke…"), "#f-reason").await?;
    fill(client, "#f-reason", "browser test").await;
    client
        .find(Locator::Css("input[name=confirm]"))
        .await?
        .click()
        .await?;
    click_then(
        client,
        Locator::Css("form.card button[type=submit]"),
        "p.lead .badge.revoked",
    )
    .await?;
    assert_eq!(text_of(client, "p.lead .badge").await, "revoked");
    let refused = validate(addr, root, &raw).await;
    assert_eq!(refused["code"], "revoked", "{refused}");

    // A policy with a bad CIDR shows the error next to the field.
    client.goto(&format!("{base}/policies/new")).await?;
    fill(client, "#f-name", "office").await;
    fill(client, "#f-allowed_ips", "10.0.0.0/99").await;
    click_then(
        client,
        Locator::Css("form.card button[type=submit]"),
        "#e-allowed_ips",
    )
    .await?;
    assert!(
        text_of(client, "#e-allowed_ips")
            .await
            .contains("allowed_ips[0]")
    );
    client
        .execute(
            "document.getElementById('f-allowed_ips').scrollIntoView({block: 'center'})",
            vec![],
        )
        .await?;
    shot(client, dir, "policy-form-error.png").await;

    // Phone width: the overview still reads.
    client.set_window_size(390, 1400).await?;
    client.goto(base).await?;
    shot(client, dir, "overview-phone.png").await;

    // Sign out.
    click_then(client, Locator::Css("button.link"), "#f-root_key").await?;
    assert_eq!(client.current_url().await?.path(), "/dashboard/login");
    Ok(())
}
