//! Recording usage without slowing requests: a bounded queue in front of a
//! batch writer.
//!
//! [`UsageWriter::spawn`] starts a task that takes records from a bounded
//! queue and writes them with one batch insert every `flush_interval` or
//! `batch_size` records, whichever comes first. [`UsageSink::record`] never
//! waits: when the queue is full the record is dropped and counted
//! (`keysmith_usage_dropped_total`). [`UsageWriter::shutdown`] (or dropping the
//! writer) writes everything still queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::model::UsageRecord;
use crate::store::Store;

/// How the writer batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageWriterOptions {
    /// Records the queue holds before new ones are dropped.
    pub capacity: usize,
    /// Largest batch written at once.
    pub batch_size: usize,
    /// Longest a record waits before its batch is written.
    pub flush_interval: Duration,
}

impl Default for UsageWriterOptions {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            batch_size: 1000,
            flush_interval: Duration::from_millis(500),
        }
    }
}

/// Where requests report usage; cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct UsageSink {
    queue: mpsc::Sender<UsageRecord>,
    dropped: Arc<AtomicU64>,
}

impl UsageSink {
    /// Queues a record; `false` (and the record dropped and counted) when the
    /// queue is full or the writer has stopped.
    pub fn record(&self, record: UsageRecord) -> bool {
        match self.queue.try_send(record) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keysmith_usage_dropped_total").increment(1);
                false
            }
        }
    }

    /// How many records were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The batch writer task; shut it down (or drop it) to flush what it holds.
#[derive(Debug)]
pub struct UsageWriter {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl UsageWriter {
    /// Starts the writer on the current tokio runtime.
    pub fn spawn(store: Arc<dyn Store>, options: UsageWriterOptions) -> (Self, UsageSink) {
        let (queue, rx) = mpsc::channel(options.capacity.max(1));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(store, rx, stopped, options));
        let sink = UsageSink {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (
            Self {
                stop,
                task: Some(task),
            },
            sink,
        )
    }

    /// Stops taking new batches, writes everything queued, and waits for it.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for UsageWriter {
    fn drop(&mut self) {
        // The task drains and writes the queue by itself.
        let _ = self.stop.send(true);
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<UsageRecord>,
    mut stopped: watch::Receiver<bool>,
    options: UsageWriterOptions,
) {
    let batch_size = options.batch_size.max(1);
    let mut batch: Vec<UsageRecord> = Vec::with_capacity(batch_size);
    let mut ticker = tokio::time::interval(options.flush_interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = rx.recv() => match received {
                Some(record) => {
                    batch.push(record);
                    if batch.len() >= batch_size {
                        write(&*store, &mut batch).await;
                    }
                }
                None => break,
            },
            _ = ticker.tick() => write(&*store, &mut batch).await,
            _ = stopped.changed() => break,
        }
    }
    // Shutting down: everything still queued is written.
    while let Ok(record) = rx.try_recv() {
        batch.push(record);
        if batch.len() >= batch_size {
            write(&*store, &mut batch).await;
        }
    }
    write(&*store, &mut batch).await;
}

async fn write(store: &dyn Store, batch: &mut Vec<UsageRecord>) {
    if batch.is_empty() {
        return;
    }
    let count = batch.len() as u64;
    match store.insert_usage(batch).await {
        Ok(()) => metrics::counter!("keysmith_usage_written_total").increment(count),
        Err(error) => {
            tracing::warn!(%error, records = count, "usage batch lost: the store refused it");
            metrics::counter!("keysmith_usage_dropped_total").increment(count);
        }
    }
    batch.clear();
}
