//! Crash safety of the SQLite store: a child process creating keys is killed
//! with SIGKILL 20 times at random moments; after each kill the database must
//! pass `PRAGMA integrity_check` and hold every key whose creation the child
//! had reported as successful.
//!
//! A plain `main` (no libtest harness): the same binary is the child when
//! `KEYSMITH_CRASH_CHILD_DB` is set.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use keysmith::{CreateKey, Engine, KeyId, SqliteStore, Store, Tenant};

const ROUNDS: usize = 20;
const CHILD_ENV: &str = "KEYSMITH_CRASH_CHILD_DB";

fn tenant() -> Tenant {
    Tenant::new("crash", "t").expect("tenant")
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Ok(path) = std::env::var(CHILD_ENV) {
        runtime.block_on(child(&path));
        return;
    }
    println!("\nrunning 1 test");
    runtime.block_on(parent());
    println!("test sqlite_store_survives_sigkill ... ok\n");
    println!("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n");
}

/// Creates keys (each with scopes: a multi-table transaction) forever,
/// printing each id once its creation has returned success.
async fn child(path: &str) {
    let store = SqliteStore::open(path)
        .await
        .expect("child opens the database");
    let engine = Engine::builder(Arc::new(store)).build();
    let tenant = tenant();
    for i in 0u64.. {
        let request = CreateKey {
            name: format!("key-{i}"),
            scopes: vec![format!("scope:{}", i % 7), "read".into(), format!("n{i}")],
            ..Default::default()
        };
        let created = engine.create_key(&tenant, request).await.expect("create");
        println!("{}", created.key.id);
    }
}

async fn parent() {
    let dir = std::env::temp_dir().join(format!("keysmith-crash-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.db").to_str().unwrap().to_owned();
    let store = SqliteStore::open(&path).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;

    let mut confirmed: Vec<KeyId> = Vec::new();
    for round in 0..ROUNDS {
        // Kill after a random number of confirmed creates: the child is
        // always in the middle of its next transaction by then.
        let kill_after = 1 + (uuid::Uuid::now_v7().as_u128() % 150) as usize;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < kill_after {
            match lines.next() {
                Some(Ok(line)) => {
                    confirmed.push(line.parse().expect("child prints key ids"));
                    seen += 1;
                }
                _ => panic!("round {round}: child stopped before being killed"),
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        // Whatever the child confirmed before dying counts too.
        for line in lines.map_while(Result::ok) {
            confirmed.push(line.parse().expect("child prints key ids"));
        }

        let store = SqliteStore::open(&path)
            .await
            .expect("reopen after a crash");
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(check, "ok", "round {round}: integrity_check");
        let fk: Vec<(String,)> = sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert!(fk.is_empty(), "round {round}: dangling references {fk:?}");
        for id in &confirmed {
            let key = store.get_key(&tenant(), id).await.unwrap_or_else(|e| {
                panic!("round {round}: confirmed key {id} lost after SIGKILL: {e}")
            });
            assert_eq!(
                key.scopes.len(),
                3,
                "round {round}: key {id} lost its scopes"
            );
        }
        store.close().await;
    }
    assert!(confirmed.len() >= ROUNDS);
    std::fs::remove_dir_all(&dir).ok();
}
