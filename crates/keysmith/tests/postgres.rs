//! The PostgreSQL store: the conformance suite, migrations, and behaviour with
//! the server down. Each test gets a fresh database on the server named by
//! `KEYSMITH_TEST_POSTGRES_URL` (set by `scripts/test`); the fault test runs a
//! private server of its own so it can stop it.
#![cfg(feature = "postgres")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use keysmith::{
    ApiKey, Environment, Error, KeyAction, KeyFilter, KeyId, KeyState, PageRequest,
    PostgresOptions, PostgresStore, RawKey, ResourceKind, Store, Tenant,
};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPoolOptions};

// ------------------------------------------------------------------ helpers

fn admin_url() -> String {
    std::env::var("KEYSMITH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "KEYSMITH_TEST_POSTGRES_URL is not set. Run the tests with `scripts/test`, which \
             starts a throwaway PostgreSQL server and sets it (the PostgreSQL tests are never \
             skipped), or point it at a server where the user may CREATE DATABASE, e.g. \
             postgres://postgres@127.0.0.1:5432/postgres"
        )
    })
}

fn pg_bin() -> PathBuf {
    std::env::var_os("KEYSMITH_TEST_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "KEYSMITH_TEST_PG_BIN is not set. Run the tests with `scripts/test`, which sets \
                 it to the directory holding initdb, postgres and pg_ctl"
            )
        })
}

/// The URL with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

/// Creates an empty database and returns its URL.
async fn fresh_database() -> String {
    let admin = admin_url();
    let name = format!("ks_{}", uuid::Uuid::now_v7().simple());
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to KEYSMITH_TEST_POSTGRES_URL: {e}"));
    let create = format!("CREATE DATABASE {name}");
    sqlx::raw_sql(&create)
        .execute(&mut conn)
        .await
        .expect("create database");
    let _ = conn.close().await;
    with_database(&admin, &name)
}

/// A store on a fresh, migrated database.
async fn fresh_store() -> Arc<dyn Store> {
    let store = PostgresStore::connect(&fresh_database().await)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    Arc::new(store)
}

keysmith::conformance_tests!(async { fresh_store().await });

fn t0() -> DateTime<Utc> {
    "2030-01-01T00:00:00Z".parse().expect("valid time")
}

fn tenant() -> Tenant {
    Tenant::new("app", format!("t-{}", uuid::Uuid::now_v7().simple())).expect("tenant")
}

fn new_key(tenant: &Tenant, name: &str) -> (RawKey, ApiKey) {
    let raw = RawKey::generate("sk", &Environment::Live).expect("generate");
    let key = ApiKey {
        id: KeyId::new(),
        app_id: tenant.app_id.clone(),
        tenant_id: tenant.tenant_id.clone(),
        name: name.to_owned(),
        description: None,
        prefix: "sk".into(),
        hint: raw.hint(),
        hash: raw.hash(),
        environment: Environment::Live,
        state: KeyState::Active,
        policy_id: None,
        scopes: vec!["read".into()],
        metadata: Default::default(),
        created_by: None,
        expires_at: None,
        last_used_at: None,
        rotated_at: None,
        revoked_at: None,
        created_at: t0(),
        updated_at: t0(),
    };
    (raw, key)
}

/// Tables, indexes and applied migrations, to compare before and after.
async fn schema_of(store: &PostgresStore) -> (Vec<String>, Vec<String>, Vec<(i64, Vec<u8>)>) {
    let tables = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(store.pool())
    .await
    .expect("tables");
    let indexes = sqlx::query_scalar(
        "SELECT indexname::text || ' ' || indexdef FROM pg_indexes \
         WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(store.pool())
    .await
    .expect("indexes");
    let migrations =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await
            .expect("migrations");
    (tables, indexes, migrations)
}

const TABLES: [&str; 7] = [
    "keysmith_key_scopes",
    "keysmith_keys",
    "keysmith_policies",
    "keysmith_rotations",
    "keysmith_scopes",
    "keysmith_usage",
    "keysmith_usage_agg",
];

// --------------------------------------------------------------- migrations

#[tokio::test]
async fn migrate_twice_is_a_no_op() {
    let url = fresh_database().await;
    let store = PostgresStore::connect(&url).await.expect("connect");
    store.migrate().await.expect("first migrate");
    let before = schema_of(&store).await;
    store.migrate().await.expect("second migrate");
    assert_eq!(schema_of(&store).await, before, "nothing changed");
    // A new store (a restarted node) migrating again is fine too.
    let again = PostgresStore::connect(&url).await.expect("connect");
    again.migrate().await.expect("migrate on restart");
    assert_eq!(schema_of(&again).await, before);
    assert!(!before.2.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_all_succeed() {
    let url = fresh_database().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(PostgresStore::connect(&url).await.expect("connect"));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for store in stores.clone() {
        tasks.spawn(async move { store.migrate().await });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("task").expect("every migrator succeeds");
    }
    let (tables, _, migrations) = schema_of(&stores[0]).await;
    for table in TABLES {
        assert!(tables.iter().any(|t| t == table), "{table} exists");
    }
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(stores[0].pool())
            .await
            .unwrap();
    assert_eq!(
        applied.len(),
        migrations.len(),
        "each migration applied once"
    );
    assert!(applied.iter().all(|(_, ok)| *ok));
    // And the store works.
    let tenant = tenant();
    let (_, key) = new_key(&tenant, "k");
    stores[1].create_key(&key).await.unwrap();
    assert_eq!(stores[2].get_key(&tenant, &key.id).await.unwrap(), key);
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_keysmith_is_refused() {
    let url = fresh_database().await;
    let store = PostgresStore::connect(&url).await.expect("connect");
    store.migrate().await.expect("migrate");
    sqlx::query(
        "INSERT INTO _sqlx_migrations \
         (version, description, installed_on, success, checksum, execution_time) \
         SELECT version + 1000000, 'from a newer keysmith', now(), TRUE, checksum, execution_time \
         FROM _sqlx_migrations ORDER BY version DESC LIMIT 1",
    )
    .execute(store.pool())
    .await
    .expect("pretend a newer release migrated");
    for attempt in 0..2 {
        // Bounded: a refused run must not leave the migration lock held.
        let result = tokio::time::timeout(Duration::from_secs(10), store.migrate())
            .await
            .expect("a refusal is prompt");
        match result {
            Err(Error::Store(e)) => assert!(
                e.to_string().contains("newer Keysmith"),
                "attempt {attempt}: unclear message: {e}"
            ),
            other => panic!("attempt {attempt}: expected a refusal, got {other:?}"),
        }
    }
    let other_node = PostgresStore::connect(&url).await.expect("connect");
    let refused = tokio::time::timeout(Duration::from_secs(10), other_node.migrate())
        .await
        .expect("a refusal is prompt");
    assert!(
        matches!(&refused, Err(Error::Store(e)) if e.to_string().contains("newer Keysmith")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn schema_has_the_seed_tables_and_indexes() {
    let url = fresh_database().await;
    let store = PostgresStore::connect(&url).await.expect("connect");
    store.migrate().await.expect("migrate");
    let (tables, indexes, _) = schema_of(&store).await;
    for table in TABLES {
        assert!(tables.iter().any(|t| t == table), "{table} exists");
    }
    for index in ["idx_keys_hash", "idx_keys_tenant", "idx_keys_state"] {
        assert!(
            indexes.iter().any(|i| i.starts_with(&format!("{index} "))),
            "{index} exists"
        );
    }
    let key_columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_name = 'keysmith_keys' ORDER BY 1",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert!(key_columns.iter().any(|c| c == "hash"));
    assert!(!key_columns.iter().any(|c| c == "key_hash"));
}

// ------------------------------------------------------------- connections

#[tokio::test]
async fn ping_and_options() {
    let url = fresh_database().await;
    let store = PostgresStore::connect(&url).await.expect("connect");
    store.ping().await.expect("ping");
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(timeout, "5s", "the default statement timeout is applied");
    let options = PostgresOptions {
        statement_timeout: None,
        ..Default::default()
    };
    let store = PostgresStore::connect_with(&url, options)
        .await
        .expect("connect");
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(timeout, "0", "the server's setting is kept");
    store.close().await;
    assert!(matches!(store.ping().await, Err(Error::Store(_))));
}

#[tokio::test]
async fn from_pool_uses_the_applications_pool() {
    let url = fresh_database().await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("pool");
    let store = PostgresStore::from_pool(pool.clone());
    store.migrate().await.expect("migrate");
    store.ping().await.expect("ping");
    let tenant = tenant();
    let (raw, key) = new_key(&tenant, "k");
    store.create_key(&key).await.unwrap();
    let found = store.lookup(&raw.hash()).await.unwrap().expect("found");
    assert_eq!(*found.key, key);
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM keysmith_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(keys, 1, "the application's pool sees the store's writes");
    store.close().await;
    assert!(pool.is_closed(), "the store holds the same pool");
}

#[tokio::test]
async fn bad_urls_fail_clearly() {
    for url in [
        "not a url",
        "mysql://localhost/db",
        "postgres://host:notaport/db",
    ] {
        match PostgresStore::connect(url).await {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "database_url"),
            other => panic!("{url}: expected InvalidInput, got {other:?}"),
        }
    }
    // Nothing listens there: a store error, within the acquire timeout.
    let port = free_port();
    let options = PostgresOptions {
        acquire_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        PostgresStore::connect_with(&format!("postgres://postgres@127.0.0.1:{port}/x"), options),
    )
    .await
    .expect("bounded");
    assert!(matches!(result, Err(Error::Store(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

// ------------------------------------------------------------ store details

/// Keys created at once with overlapping new scope names share the scopes:
/// each name is created once, every key holds all of its names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_share_new_scopes() {
    let store = fresh_store().await;
    let tenant = tenant();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        let tenant = tenant.clone();
        tasks.spawn(async move {
            let (_, mut key) = new_key(&tenant, &format!("k{i}"));
            key.scopes = if i % 2 == 0 {
                vec!["a:x".into(), "b".into(), "c".into()]
            } else {
                vec!["c".into(), "b".into(), "a:x".into(), "d".into()]
            };
            store.create_key(&key).await.map(|()| key)
        });
    }
    while let Some(result) = tasks.join_next().await {
        let key = result.expect("task").expect("every create succeeds");
        let got = store.get_key(&tenant, &key.id).await.unwrap();
        let mut scopes = key.scopes.clone();
        scopes.sort();
        assert_eq!(got.scopes, scopes);
    }
    let page = PageRequest::new(100, 0).unwrap();
    let scopes = store.list_scopes(&tenant, None, &page).await.unwrap();
    let names: Vec<_> = scopes.items.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a:x", "b", "c", "d"]);
    assert_eq!(scopes.items[0].parent.as_deref(), Some("a"));
}

/// A page of zero items still carries the total.
#[tokio::test]
async fn empty_pages_carry_the_total() {
    let store = fresh_store().await;
    let tenant = tenant();
    for i in 0..3 {
        let (_, key) = new_key(&tenant, &format!("k{i}"));
        store.create_key(&key).await.unwrap();
    }
    let filter = KeyFilter {
        page: PageRequest {
            limit: 0,
            offset: 0,
        },
        ..Default::default()
    };
    let page = store.list_keys(&tenant, &filter).await.unwrap();
    assert_eq!((page.items.len(), page.total), (0, 3));
}

/// PostgreSQL cannot store NUL characters in text or JSONB: such a write is
/// refused with an error (never a panic) and leaves nothing behind.
#[tokio::test]
async fn nul_characters_are_refused_cleanly() {
    let store = fresh_store().await;
    let tenant = tenant();
    let (_, mut key) = new_key(&tenant, "k");
    key.description = Some("a\0b".into());
    assert!(matches!(store.create_key(&key).await, Err(Error::Store(_))));
    let (_, mut key) = new_key(&tenant, "k");
    key.metadata.insert("x".into(), "a\0b".into());
    assert!(matches!(store.create_key(&key).await, Err(Error::Store(_))));
    assert_eq!(
        store
            .list_keys(&tenant, &KeyFilter::default())
            .await
            .unwrap()
            .total,
        0
    );
}

// ------------------------------------------------------------------- faults

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs a command as the `postgres` OS user, in `dir`.
fn as_postgres(dir: &Path, program: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .current_dir(dir);
    command
}

/// A PostgreSQL server of this test alone, in a temporary directory. Dropping
/// it stops the server and removes the directory, also when the test panics.
struct PrivateServer {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateServer {
    fn init() -> Self {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(format!("ks-fault-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir(&dir).expect("temp dir");
        // The postgres user must reach its data directory.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        let data = dir.join("data");
        std::fs::create_dir(&data).expect("data dir");
        let server = Self {
            bin,
            dir,
            data,
            port: free_port(),
            child: None,
        };
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&server.data)
            .status()
            .expect("chown (the tests run as root, as scripts/test does)");
        assert!(status.success(), "chown the data directory to postgres");
        std::fs::set_permissions(&server.data, std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let data = server.data_str();
        let output = as_postgres(
            &server.dir,
            &server.bin.join("initdb"),
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )
        .output()
        .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        server
    }

    fn data_str(&self) -> String {
        self.data.to_string_lossy().into_owned()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits (bounded) until it accepts connections.
    async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("log file");
        let data = self.data_str();
        let port = self.port.to_string();
        let child = as_postgres(
            &self.dir,
            &self.bin.join("postgres"),
            &[
                "-D",
                &data,
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-k",
                &data,
                "-c",
                "fsync=off",
            ],
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start postgres");
        self.child = Some(child);
        for _ in 0..150 {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!("postgres exited with {status}: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("postgres did not become ready: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Stops the server (`mode`: fast or immediate) and reaps it.
    fn stop(&mut self, mode: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let data = self.data_str();
        let _ = as_postgres(
            &self.dir,
            &self.bin.join("pg_ctl"),
            &["stop", "-D", &data, "-m", mode, "-w", "-t", "30"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
        for _ in 0..100 {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// With PostgreSQL stopped, every operation fails within a bounded,
/// configurable time with the Store error (never a panic or a false success);
/// once it is back, the store recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_outage_fails_fast_and_recovers() {
    let mut server = PrivateServer::init();
    server.start().await;
    let acquire_timeout = Duration::from_secs(1);
    let options = PostgresOptions {
        acquire_timeout,
        ..Default::default()
    };
    let store = PostgresStore::connect_with(&server.url(), options)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let tenant = tenant();
    let (raw, key) = new_key(&tenant, "survivor");
    store
        .create_key(&key)
        .await
        .expect("create before the outage");

    server.stop("fast");

    let bound = acquire_timeout * 3;
    let (_, during) = new_key(&tenant, "during");
    let page = KeyFilter::default();
    macro_rules! fails_fast {
        ($what:literal, $op:expr) => {{
            let started = Instant::now();
            let result = tokio::time::timeout(bound, $op)
                .await
                .unwrap_or_else(|_| panic!("{} did not fail within {bound:?}", $what));
            match result {
                Err(Error::Store(e)) => {
                    eprintln!("{}: store error after {:?}: {e}", $what, started.elapsed())
                }
                other => panic!("{}: expected a store error, got {other:?}", $what),
            }
        }};
    }
    fails_fast!("ping", store.ping());
    fails_fast!("get_key", store.get_key(&tenant, &key.id));
    fails_fast!("create_key", store.create_key(&during));
    fails_fast!("lookup", store.lookup(&raw.hash()));
    fails_fast!("list_keys", store.list_keys(&tenant, &page));
    fails_fast!(
        "transition_key",
        store.transition_key(&tenant, &key.id, KeyAction::Suspend, t0())
    );
    fails_fast!(
        "list_policies",
        store.list_policies(&tenant, &PageRequest::default())
    );
    fails_fast!("expire_keys", store.expire_keys(t0(), 10));

    server.start().await;

    // The pool reconnects on its own; allow the server a moment to settle.
    let mut recovered = false;
    for _ in 0..50 {
        if store.ping().await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the store recovers with no manual action");
    let got = store
        .get_key(&tenant, &key.id)
        .await
        .expect("get after restart");
    assert_eq!(got, key, "the earlier key is still there, unchanged");
    let found = store.lookup(&raw.hash()).await.unwrap().expect("found");
    assert_eq!(found.key.id, key.id);
    match store.get_key(&tenant, &during.id).await {
        Err(Error::NotFound(ResourceKind::Key)) => {}
        other => panic!("the create during the outage must not have happened: {other:?}"),
    }
    store
        .create_key(&during)
        .await
        .expect("create after restart");
    let listed = store.list_keys(&tenant, &page).await.unwrap();
    assert_eq!(listed.total, 2);
    store.close().await;
    server.stop("fast");
}

// ------------------------------------------------------------------ quotas

/// Two nodes (two stores, two pools) on one database share a key's quota
/// exactly: 250 calls each against a daily limit of 100 allow 100 in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_is_exact_across_nodes() {
    use keysmith::UsagePeriod;
    use keysmith::ratelimit::QuotaWindow;
    let url = fresh_database().await;
    let nodes = [
        PostgresStore::connect(&url).await.expect("connect node a"),
        PostgresStore::connect(&url).await.expect("connect node b"),
    ];
    nodes[0].migrate().await.expect("migrate");
    let key = KeyId::new();
    // Both windows, so every call locks two rows (in one order on both nodes).
    let windows = [
        QuotaWindow::containing(UsagePeriod::Month, t0(), 150),
        QuotaWindow::containing(UsagePeriod::Day, t0(), 100),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..250 {
        for node in &nodes {
            let node = node.clone();
            tasks.spawn(async move { node.consume_quota(&key, &windows, 1).await });
        }
    }
    let (mut allowed, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let decision = result.expect("task").expect("every call answers");
        if decision.allowed {
            allowed += 1;
        } else {
            refused += 1;
        }
    }
    assert_eq!((allowed, refused), (100, 400), "exactly the quota");
    let last = nodes[1].consume_quota(&key, &windows, 1).await.unwrap();
    assert!(!last.allowed);
    let used: Vec<u64> = last.windows.iter().map(|w| w.used).collect();
    assert_eq!(
        used,
        [100, 100],
        "each window counted every allowed call once"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM keysmith_quota_counters")
        .fetch_one(nodes[0].pool())
        .await
        .unwrap();
    assert_eq!(rows, 2, "one row a window");
    for node in &nodes {
        node.close().await;
    }
}

// ------------------------------------------------------------- change feed

/// Two engines on one database, each with its own pool, cache and
/// `PostgresChangeFeed`: a revocation on A reaches B's cache through
/// LISTEN/NOTIFY; when B's listening connection is killed, B serves entries
/// at most `degraded_ttl` and reconnects by itself.
#[tokio::test]
async fn changes_travel_between_engines_by_listen_notify() {
    use keysmith::cache::postgres::PostgresChangeFeed;
    use keysmith::cache::{CacheOptions, ChangeFeed};
    use keysmith::{CreateKey, Engine, RequestContext};

    let url = fresh_database().await;
    let node = async || {
        let store = PostgresStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let feed: Arc<dyn ChangeFeed> = Arc::new(PostgresChangeFeed::new(store.pool().clone()));
        let engine = Engine::builder(Arc::new(store.clone()))
            .cache(CacheOptions::default())
            .change_feed(feed)
            .build();
        (engine, store)
    };
    let (a, _) = node().await;
    let (b, b_store) = node().await;
    let listeners = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(b_store.pool())
        .await
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while listeners().await < 2 {
        assert!(Instant::now() < deadline, "both engines listen");
        tokio::task::yield_now().await;
    }
    let tenant = tenant();
    let created = a
        .create_key(
            &tenant,
            CreateKey {
                name: "k".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let raw = created.raw_key.expose_secret().to_owned();
    let ctx = RequestContext::default();
    // B caches the key (once its listener has settled in).
    while b.cache_len().0 == 0 {
        assert!(b.validate(&raw, &ctx).await.is_ok());
        assert!(Instant::now() < deadline, "B caches the key");
        tokio::task::yield_now().await;
    }
    a.revoke_key(&tenant, &created.key.id, None).await.unwrap();
    let revoked = Instant::now();
    loop {
        match b.validate(&raw, &ctx).await {
            Err(Error::KeyRevoked) => break,
            Ok(_) => assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "B lags a second"
            ),
            Err(other) => panic!("{other}"),
        }
        tokio::task::yield_now().await;
    }

    // Kill the listening connections: the engines reconnect by themselves,
    // and the changes flow again.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .execute(b_store.pool())
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let second = a
            .create_key(
                &tenant,
                CreateKey {
                    name: "k2".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let raw2 = second.raw_key.expose_secret().to_owned();
        assert!(b.validate(&raw2, &ctx).await.is_ok());
        a.suspend_key(&tenant, &second.key.id).await.unwrap();
        let suspended = Instant::now();
        // Once reconnected, B sees the suspension well within a second
        // (before that, within degraded_ttl of caching it).
        let seen = loop {
            if matches!(b.validate(&raw2, &ctx).await, Err(Error::KeySuspended)) {
                break suspended.elapsed();
            }
            assert!(
                suspended.elapsed() < Duration::from_secs(2),
                "degraded TTL bounds it"
            );
            tokio::task::yield_now().await;
        };
        if listeners().await == 2 && seen < Duration::from_millis(500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the engines never listened again"
        );
    }
}
