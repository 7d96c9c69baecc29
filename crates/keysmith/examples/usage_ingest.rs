//! CPU cost of usage ingest into SQLite: three rounds, each inserting
//! `KEYSMITH_INGEST_ROWS` (default 300 000) middleware-like usage records
//! over 100 keys, in batches of 5000 (the writer's default), through
//! `Store::insert_usage` into a fresh temporary file store. Each round prints
//! rows/s (wall) and the process's CPU time per row (user and system, from
//! `/proc/self/stat`; Linux only). Records are built before the clock
//! starts, so only the store's work is counted. The machine is shared: take
//! the best round, and compare variants run one after the other.
//!
//! `cargo run --release -p keysmith --features sqlite --example usage_ingest`
//!
//! `KEYSMITH_INGEST_PREFILL` rows (default 1 000 000) are written first,
//! untimed, so that the measured inserts go into a table of a realistic
//! size, with indexes deeper than a few pages.

#[path = "../benches/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use keysmith::model::UsageRecord;
use keysmith::{KeyId, SqliteStore, Store};
use support::usage_records;

const BATCH: usize = 5000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Process CPU time so far (user, system), in seconds.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks
    // (100 per second on Linux).
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0
    };
    (tick(11), tick(12))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = env_usize("KEYSMITH_INGEST_ROWS", 300_000);
    let prefill = env_usize("KEYSMITH_INGEST_PREFILL", 1_000_000);
    let dir = std::env::temp_dir().join(format!("keysmith-ingest-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("usage.db");
    let store = SqliteStore::open(path.to_str().ok_or("temp path is not UTF-8")?).await?;
    store.migrate().await?;
    let store: Arc<dyn Store> = Arc::new(store);
    let keys: Vec<KeyId> = (0..100).map(|_| KeyId::new()).collect();

    for batch in usage_records(&keys, prefill).chunks(BATCH) {
        store.insert_usage(batch).await?;
    }
    // Three rounds: the machine is shared, the best round is the figure.
    for round in 1..=3 {
        let batches: Vec<Vec<UsageRecord>> = (0..rows.div_ceil(BATCH))
            .map(|_| usage_records(&keys, BATCH))
            .collect();
        let total = batches.len() * BATCH;
        let (user0, sys0) = cpu_seconds();
        let started = Instant::now();
        for batch in &batches {
            store.insert_usage(batch).await?;
        }
        let wall = started.elapsed().as_secs_f64();
        let (user1, sys1) = cpu_seconds();
        let (user, sys) = (user1 - user0, sys1 - sys0);
        let per_row = |s: f64| s * 1e6 / total as f64;
        println!(
            "round={round} rows={total} wall={wall:.2}s rows_per_s={:.0} \
             cpu_per_row_us={:.2} (user {:.2}, sys {:.2})",
            total as f64 / wall,
            per_row(user + sys),
            per_row(user),
            per_row(sys),
        );
    }
    let total = prefill + 3 * rows.div_ceil(BATCH) * BATCH;
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(dir.join("usage.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!("file_bytes_per_row={:.0}", size as f64 / total as f64);
    drop(store);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
