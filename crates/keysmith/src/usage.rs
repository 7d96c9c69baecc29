//! Recording usage without slowing requests: a bounded queue in front of a
//! batch writer.
//!
//! [`UsageWriter::spawn`] starts a task that takes records from a bounded
//! queue and writes them with one batch insert every `flush_interval` or
//! `batch_size` records, whichever comes first. [`UsageSink::record`] never
//! waits: when the queue is full the record is dropped and counted
//! (`keysmith_usage_dropped_total`). [`UsageSink::record_all`] queues a whole
//! batch or none of it, for callers that can retry. [`UsageSink::flush`] waits
//! until everything queued before it is written. [`UsageWriter::shutdown`] (or
//! dropping the writer) writes everything still queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
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
            batch_size: 5000,
            flush_interval: Duration::from_millis(500),
        }
    }
}

/// What the queue carries: records, and flush requests that are answered
/// once every record queued before them is written.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // nearly every message is a record: boxing would allocate each
enum Message {
    Record(UsageRecord),
    Flush(oneshot::Sender<()>),
}

/// Where requests report usage; cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct UsageSink {
    queue: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
    /// Wakes the writer. It is not woken per record (a wake-up per request
    /// costs more than the record): only once a batch is waiting, on a
    /// flush, or when the queue is full; else its timer wakes it.
    wake: Arc<Notify>,
    batch_size: usize,
}

impl UsageSink {
    /// Queues a record; `false` (and the record dropped and counted) when the
    /// queue is full or the writer has stopped.
    pub fn record(&self, record: UsageRecord) -> bool {
        match self.queue.try_send(Message::Record(record)) {
            Ok(()) => {
                self.wake_if_a_batch_waits();
                true
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keysmith_usage_dropped_total").increment(1);
                self.wake.notify_one();
                false
            }
        }
    }

    fn wake_if_a_batch_waits(&self) {
        let queued = self.queue.max_capacity() - self.queue.capacity();
        if queued >= self.batch_size {
            self.wake.notify_one();
        }
    }

    /// Queues every record of `records`, or none: when the queue has no room
    /// for all of them (or the writer has stopped) they are handed back, and
    /// the caller may retry. Never waits.
    pub fn record_all(&self, records: Vec<UsageRecord>) -> Result<(), Vec<UsageRecord>> {
        if records.is_empty() {
            return Ok(());
        }
        match self.queue.try_reserve_many(records.len()) {
            Ok(permits) => {
                for (permit, record) in permits.zip(records) {
                    permit.send(Message::Record(record));
                }
                self.wake_if_a_batch_waits();
                Ok(())
            }
            Err(_) => {
                self.wake.notify_one();
                Err(records)
            }
        }
    }

    /// Waits until every record queued before this call is written (or was
    /// refused by the store and counted as dropped). Returns at once when the
    /// writer has stopped, since it wrote everything before stopping.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        self.wake.notify_one();
        if self.queue.send(Message::Flush(done)).await.is_ok() {
            self.wake.notify_one();
            let _ = written.await;
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
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(run(store, rx, stopped, wake.clone(), options));
        let sink = UsageSink {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
            wake,
            batch_size: options.batch_size.max(1),
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
    mut rx: mpsc::Receiver<Message>,
    mut stopped: watch::Receiver<bool>,
    wake: Arc<Notify>,
    options: UsageWriterOptions,
) {
    let batch_size = options.batch_size.max(1);
    let mut batch: Vec<UsageRecord> = Vec::with_capacity(batch_size);
    let every = options.flush_interval.max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            () = wake.notified() => false,
            _ = stopped.changed() => true,
        };
        let open = drain(&*store, &mut rx, &mut batch, batch_size).await;
        if stopping || !open {
            break;
        }
    }
    // Shutting down: everything still queued is written (drain did), and
    // flushes that arrive while the task ends are answered by their sender
    // being dropped.
}

/// Writes everything queued now, in batches of at most `batch_size`, and
/// answers the flush requests met on the way. `false` once every sink is gone.
async fn drain(
    store: &dyn Store,
    rx: &mut mpsc::Receiver<Message>,
    batch: &mut Vec<UsageRecord>,
    batch_size: usize,
) -> bool {
    let open = loop {
        match rx.try_recv() {
            Ok(Message::Record(record)) => {
                batch.push(record);
                if batch.len() >= batch_size {
                    write(store, batch).await;
                }
            }
            Ok(Message::Flush(done)) => {
                write(store, batch).await;
                let _ = done.send(());
            }
            Err(mpsc::error::TryRecvError::Empty) => break true,
            Err(mpsc::error::TryRecvError::Disconnected) => break false,
        }
    };
    write(store, batch).await;
    open
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{KeyId, UsageId};
    use crate::model::{Tenant, UsageFilter};
    use crate::store::MemoryStore;

    fn record(tenant: &Tenant) -> UsageRecord {
        UsageRecord {
            id: UsageId::new(),
            key_id: KeyId::new(),
            app_id: tenant.app_id.clone(),
            tenant_id: tenant.tenant_id.clone(),
            endpoint: "/x".into(),
            method: "GET".into(),
            status_code: 200,
            ip: None,
            user_agent: None,
            latency_ms: 1,
            metadata: Default::default(),
            created_at: chrono::Utc::now(),
        }
    }

    async fn stored(store: &dyn Store, tenant: &Tenant) -> u64 {
        let filter = UsageFilter::default();
        store.list_usage(tenant, &filter).await.unwrap().total
    }

    #[tokio::test]
    async fn a_full_batch_is_written_without_waiting_for_the_timer() {
        let store = Arc::new(MemoryStore::new());
        let tenant = Tenant::new("app", "t").unwrap();
        let options = UsageWriterOptions {
            capacity: 100,
            batch_size: 3,
            flush_interval: Duration::from_secs(3600),
        };
        let (writer, sink) = UsageWriter::spawn(store.clone(), options);
        for _ in 0..2 {
            assert!(sink.record(record(&tenant)));
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(stored(&*store, &tenant).await, 0, "not a batch yet");
        assert!(sink.record(record(&tenant)));
        let mut written = 0;
        for _ in 0..10_000 {
            written = stored(&*store, &tenant).await;
            if written == 3 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            written, 3,
            "the third record completes a batch and wakes the writer"
        );
        writer.shutdown().await;
    }

    #[tokio::test]
    async fn record_all_takes_whole_batches_and_flush_waits_for_the_write() {
        let store = Arc::new(MemoryStore::new());
        let tenant = Tenant::new("app", "t").unwrap();
        let options = UsageWriterOptions {
            capacity: 4,
            batch_size: 1000,
            // Only an explicit flush or shutdown writes in this test.
            flush_interval: Duration::from_secs(3600),
        };
        let (writer, sink) = UsageWriter::spawn(store.clone(), options);
        let too_many: Vec<_> = (0..5).map(|_| record(&tenant)).collect();
        let handed_back = sink.record_all(too_many).unwrap_err();
        assert_eq!(handed_back.len(), 5, "nothing of a refused batch is taken");
        sink.record_all((0..3).map(|_| record(&tenant)).collect())
            .unwrap();
        sink.flush().await;
        assert_eq!(stored(&*store, &tenant).await, 3);
        assert!(sink.record(record(&tenant)));
        writer.shutdown().await;
        assert_eq!(
            stored(&*store, &tenant).await,
            4,
            "shutdown writes the rest"
        );
        // A stopped writer takes nothing, and flush does not hang.
        assert!(sink.record_all(vec![record(&tenant)]).is_err());
        sink.flush().await;
        assert_eq!(sink.dropped(), 0);
    }
}
