//! End to end: the real `keysmith` binary, on SQLite and on PostgreSQL, driven
//! over HTTP through the whole key life cycle, then stopped with SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

struct Server {
    child: Child,
    address: String,
    root_key: String,
    /// Everything the server wrote to stderr after starting.
    log: Arc<Mutex<String>>,
    /// The thread that fills `log`; it ends when the server's stderr closes.
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// A handle for calling a server another thread owns.
    fn remote(address: String, root_key: String) -> RemoteServer {
        RemoteServer { address, root_key }
    }
}

/// What `call` needs of a server.
trait Node {
    fn address(&self) -> &str;
    fn root_key(&self) -> &str;
}

impl Node for Server {
    fn address(&self) -> &str {
        &self.address
    }
    fn root_key(&self) -> &str {
        &self.root_key
    }
}

struct RemoteServer {
    address: String,
    root_key: String,
}

impl Node for RemoteServer {
    fn address(&self) -> &str {
        &self.address
    }
    fn root_key(&self) -> &str {
        &self.root_key
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `keysmith serve` on a free port and reads the bootstrap root key
/// and the address from its stderr.
fn start(database_url: &str) -> Server {
    start_node(database_url, None)
}

/// Starts `keysmith serve`; a node joining a database that already has a root
/// key prints none and uses `root_key`.
fn start_node(database_url: &str, root_key: Option<&str>) -> Server {
    start_with(database_url, root_key, &[])
}

/// [`start_node`] with extra environment (configuration) variables.
fn start_with(database_url: &str, root_key: Option<&str>, env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keysmith"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
        ])
        .env("KEYSMITH_LOG", "debug")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keysmith serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut root_key, mut address) = (root_key.map(str::to_owned), None);
    while address.is_none() {
        let line = lines.next().expect("server output").expect("utf-8");
        let line = line.trim();
        if line.starts_with("ksr_") {
            root_key = Some(line.to_owned());
        }
        if let Some(a) = line.strip_prefix("keysmith listening on http://") {
            address = Some(a.to_owned());
        }
    }
    // Keep draining stderr (so the server never blocks on a full pipe) and
    // keep it, to check no raw key is ever logged.
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let drain = std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    Server {
        child,
        address: address.unwrap(),
        root_key: root_key.expect("the first start prints a root key"),
        log,
        drain: Some(drain),
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
fn call(server: &impl Node, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut stream = TcpStream::connect(server.address()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.address(),
        server.root_key(),
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// Drives the life cycle; returns every tenant raw key it was handed.
fn lifecycle(server: &Server) -> Vec<String> {
    let (status, policy) = call(
        server,
        "POST",
        "/v1/policies",
        Some(json!({ "name": "std", "allowed_scopes": ["read"] })),
    );
    assert_eq!(status, 201, "{policy}");
    let (status, created) = call(
        server,
        "POST",
        "/v1/keys",
        Some(json!({ "name": "svc", "scopes": ["read"], "policy_id": policy["id"] })),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    let raw = created["raw_key"].as_str().unwrap().to_owned();
    let validate = |raw: &str| {
        call(
            server,
            "POST",
            "/v1/keys/validate",
            Some(json!({ "raw_key": raw, "scopes": ["read:x"] })),
        )
        .1
    };
    assert_eq!(validate(&raw)["valid"], true);
    let (status, rotated) = call(
        server,
        "POST",
        &format!("/v1/keys/{id}/rotate"),
        Some(json!({ "grace_period": "1h" })),
    );
    assert_eq!(status, 200, "{rotated}");
    let new_raw = rotated["raw_key"].as_str().unwrap().to_owned();
    let old = validate(&raw);
    assert_eq!(old["valid"], true);
    assert!(old["grace_ends"].is_string());
    assert_eq!(validate(&new_raw)["valid"], true);
    assert_eq!(
        call(server, "POST", &format!("/v1/keys/{id}/suspend"), None).0,
        200
    );
    assert_eq!(validate(&new_raw)["code"], "suspended");
    assert_eq!(
        call(server, "POST", &format!("/v1/keys/{id}/reactivate"), None).0,
        200
    );
    assert_eq!(validate(&new_raw)["valid"], true);
    assert_eq!(
        call(
            server,
            "POST",
            &format!("/v1/keys/{id}/revoke"),
            Some(json!({ "reason": "done" }))
        )
        .0,
        200
    );
    assert_eq!(validate(&raw)["code"], "revoked");
    assert_eq!(validate(&new_raw)["code"], "revoked");
    assert_eq!(
        call(server, "POST", &format!("/v1/keys/{id}/reactivate"), None).0,
        409
    );
    let (status, _) = call(server, "GET", "/readyz", None);
    assert_eq!(status, 200);
    vec![raw, new_raw]
}

/// Stops the server with SIGTERM (it must exit 0) and checks that none of
/// `secrets` (nor the root key, after its one bootstrap print) was logged.
fn stop(mut server: Server, secrets: &[String]) {
    let pid = server.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");
    // The server has exited, but its last lines may still be in the pipe:
    // read them all before looking.
    if let Some(drain) = server.drain.take() {
        drain
            .join()
            .expect("the log drain ends with the server's stderr");
    }
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("shutting down"), "the log was captured: {log}");
    for secret in secrets.iter().chain([&server.root_key]) {
        assert!(
            !log.contains(&secret[secret.len() - 56..]),
            "a raw key reached the log"
        );
    }
}

/// `quota_counts = "process"`: counted in the server, exact, and written to
/// the database by the shutdown, so a restarted server goes on counting.
#[test]
fn quota_counts_kept_in_process_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("keysmith-e2e-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("keysmith.db");
    let env = [("KEYSMITH_QUOTA_COUNTS", "process")];
    let server = start_with(db.to_str().unwrap(), None, &env);
    let (status, policy) = call(
        &server,
        "POST",
        "/v1/policies",
        Some(json!({ "name": "q", "daily_quota": 3, "rate_limit": 1000 })),
    );
    assert_eq!(status, 201, "{policy}");
    let (status, created) = call(
        &server,
        "POST",
        "/v1/keys",
        Some(json!({ "name": "q", "policy_id": policy["id"] })),
    );
    assert_eq!(status, 201, "{created}");
    let raw = created["raw_key"].as_str().unwrap().to_owned();
    let validate = |server: &Server| {
        call(
            server,
            "POST",
            "/v1/keys/validate",
            Some(json!({ "raw_key": raw })),
        )
        .1
    };
    for used in 1..=2 {
        assert_eq!(validate(&server)["quota"][0]["used"], used);
    }
    let root_key = server.root_key.clone();
    stop(server, std::slice::from_ref(&raw));
    let server = start_with(db.to_str().unwrap(), Some(&root_key), &env);
    assert_eq!(
        validate(&server)["quota"][0]["used"],
        3,
        "counted before the restart"
    );
    assert_eq!(validate(&server)["code"], "quota_exceeded");
    stop(server, std::slice::from_ref(&raw));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sqlite_end_to_end() {
    let dir = std::env::temp_dir().join(format!("keysmith-e2e-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("keysmith.db");
    let server = start(db.to_str().unwrap());
    let secrets = lifecycle(&server);
    stop(server, &secrets);
    // The CLI works on the same file; a second start prints no new root key.
    let out = Command::new(env!("CARGO_BIN_EXE_keysmith"))
        .args([
            "--database-url",
            db.to_str().unwrap(),
            "--json",
            "keys",
            "list",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The bootstrap root key acts for app `default`, tenant `default`: the
    // CLI's defaults, so the key made over HTTP is listed, revoked.
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["items"][0]["state"], "revoked");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn postgres_end_to_end() {
    let server = start(&fresh_postgres_database());
    let secrets = lifecycle(&server);
    stop(server, &secrets);
}

/// A database of our own on the shared test server; its URL.
fn fresh_postgres_database() -> String {
    let url = std::env::var("KEYSMITH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("KEYSMITH_TEST_POSTGRES_URL is not set: run the tests with scripts/test")
    });
    let name = format!("ks_e2e_{}", uuid::Uuid::now_v7().simple());
    psql(&url, &format!("CREATE DATABASE {name}"));
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

fn psql(url: &str, sql: &str) {
    let status = Command::new("psql")
        .args([url, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .status()
        .expect("psql");
    assert!(status.success(), "psql: {sql}");
}

/// Two servers on one PostgreSQL, each with its validation cache: a key
/// revoked on node A is refused by node B within a second, while B is
/// validating it under load (the invalidation travels by LISTEN/NOTIFY).
#[test]
fn two_nodes_honour_a_revocation_within_a_second() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    let database = fresh_postgres_database();
    let a = start(&database);
    let b = start_node(&database, Some(&a.root_key));
    let (status, created) = call(&a, "POST", "/v1/keys", Some(json!({ "name": "shared" })));
    assert_eq!(status, 201, "{created}");
    let raw = created["raw_key"].as_str().unwrap().to_owned();
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    let validate = |node: &Server| {
        call(
            node,
            "POST",
            "/v1/keys/validate",
            Some(json!({ "raw_key": raw })),
        )
        .1
    };
    assert_eq!(validate(&b)["valid"], true, "B sees the key A made");
    // B now serves the key from its cache: a change made behind Keysmith's
    // back (no notification) is not seen by B...
    psql(
        &database,
        &format!("UPDATE keysmith_keys SET state = 'suspended' WHERE id = '{id}'"),
    );
    assert_eq!(validate(&b)["valid"], true, "B answers from its cache");
    psql(
        &database,
        &format!("UPDATE keysmith_keys SET state = 'active' WHERE id = '{id}'"),
    );

    // ...while a revocation through A is, within a second, under load on B.
    let stop_load = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (address, root, raw) = (b.address.clone(), b.root_key.clone(), raw.clone());
            let (stop_load, served) = (stop_load.clone(), served.clone());
            std::thread::spawn(move || {
                let node = Server::remote(address, root);
                while !stop_load.load(Ordering::Relaxed) {
                    let body = json!({ "raw_key": raw });
                    let (status, _) = call(&node, "POST", "/v1/keys/validate", Some(body));
                    assert_eq!(status, 200);
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    while served.load(Ordering::Relaxed) < 50 {
        std::thread::yield_now();
    }
    let (status, _) = call(&a, "POST", &format!("/v1/keys/{id}/revoke"), None);
    assert_eq!(status, 200);
    let revoked_at = Instant::now();
    let refused_after = loop {
        let answer = validate(&b);
        if answer["code"] == "revoked" {
            break revoked_at.elapsed();
        }
        assert_eq!(answer["valid"], true, "{answer}");
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "B still accepts the key 5 s after its revocation on A"
        );
    };
    stop_load.store(true, Ordering::Relaxed);
    for thread in load {
        thread.join().unwrap();
    }
    assert!(
        refused_after < Duration::from_secs(1),
        "B refused the key {refused_after:?} after its revocation on A"
    );
    eprintln!(
        "B refused the revoked key after {refused_after:?}, having served {} validations",
        served.load(Ordering::Relaxed)
    );
    stop(b, std::slice::from_ref(&raw));
    stop(a, &[raw]);
}
