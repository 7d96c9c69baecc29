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
//!
//! The queue is cut into shards, one per recording thread (by a thread-local
//! index), each a short-held mutex over a vector: two request workers never
//! touch the same lock or the same cache lines, and the writer takes a
//! shard's whole vector at once by swapping it with an empty one. One shared
//! counter bounds the total. Requests that pass the middleware queue only
//! what they know ([`RequestUsage`]: the key they validated, the endpoint,
//! the address...); the writer turns those into [`UsageRecord`]s in slots it
//! reuses from batch to batch, so the recording path allocates nothing for
//! the tenant, the id or the address, and the writer allocates nothing once
//! its slots have grown.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

use crate::id::UsageId;
use crate::model::{ApiKey, UsageRecord};
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

/// What a request that passed the middleware leaves for the writer: the
/// fields it knows, without the copies a [`UsageRecord`] needs (the writer
/// makes those, in slots it reuses).
#[derive(Debug)]
pub(crate) struct RequestUsage {
    pub key: Arc<ApiKey>,
    pub endpoint: String,
    pub method: String,
    pub status_code: u16,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub latency_ms: u64,
    pub created_at: DateTime<Utc>,
}

/// What the queue holds: a request's usage, or a record made by the caller
/// (boxed: rare, and three times a request's size).
#[derive(Debug)]
enum Item {
    // Made only by the middleware (feature `axum`).
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    Request(RequestUsage),
    Record(Box<UsageRecord>),
}

impl Item {
    fn created_at(&self) -> DateTime<Utc> {
        match self {
            Item::Request(request) => request.created_at,
            Item::Record(record) => record.created_at,
        }
    }
}

/// One shard of the queue, with its share of the capacity.
#[derive(Debug, Default)]
struct Queue {
    items: Vec<Item>,
    capacity: usize,
    /// The writer has stopped: nothing pushed now would be written.
    closed: bool,
}

impl Queue {
    fn room(&self) -> usize {
        self.capacity.saturating_sub(self.items.len())
    }
}

/// A shard on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<Queue>);

/// Flush requests, answered once everything queued before them is written.
#[derive(Debug, Default)]
struct Flushes {
    waiting: Vec<oneshot::Sender<()>>,
    /// The writer has stopped: nothing will answer a new request.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    /// The capacity split evenly; a thread whose shard is full queues into
    /// the next one with room, so the queue as a whole holds `capacity`.
    shards: Box<[Shard]>,
    batch_size: usize,
    dropped: AtomicU64,
    /// Wakes the writer. It is not woken per record (a wake-up per request
    /// costs more than the record): only once a shard holds a batch or is
    /// full, and on a flush; else its timer wakes it.
    wake: Notify,
    flushes: Mutex<Flushes>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A queue stays consistent if a holder panicked (it only pushes and
    // swaps), so a poisoned lock is used as is.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// This thread's shard (assigned round-robin at its first record).
fn shard_of_this_thread(shards: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i) % shards
}

impl Shared {
    fn new(options: &UsageWriterOptions) -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        let count = threads * 2;
        let capacity = options.capacity.max(1);
        let shards = (0..count)
            .map(|i| {
                Shard(Mutex::new(Queue {
                    items: Vec::new(),
                    capacity: capacity / count + usize::from(i < capacity % count),
                    closed: false,
                }))
            })
            .collect();
        Self {
            shards,
            batch_size: options.batch_size.max(1),
            dropped: AtomicU64::new(0),
            wake: Notify::new(),
            flushes: Mutex::new(Flushes::default()),
        }
    }

    /// Queues `item` in this thread's shard, or the next one with room;
    /// drops and counts it when the queue is full or the writer has stopped.
    fn queue(&self, item: Item) -> bool {
        let count = self.shards.len();
        let first = shard_of_this_thread(count);
        for i in 0..count {
            let mut queue = lock(&self.shards[(first + i) % count].0);
            if queue.closed {
                break;
            }
            if queue.room() > 0 {
                queue.items.push(item);
                let batch_waits = queue.items.len() == self.batch_size;
                drop(queue);
                if batch_waits || i > 0 {
                    self.wake.notify_one();
                }
                return true;
            }
        }
        self.wake.notify_one();
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keysmith_usage_dropped_total").increment(1);
        false
    }
}

/// Where requests report usage; cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct UsageSink {
    shared: Arc<Shared>,
}

impl UsageSink {
    /// Queues a record; `false` (and the record dropped and counted) when the
    /// queue is full or the writer has stopped.
    pub fn record(&self, record: UsageRecord) -> bool {
        self.shared.queue(Item::Record(Box::new(record)))
    }

    /// Queues the usage of a request that passed the middleware; like
    /// [`record`](Self::record), the writer makes the record.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn record_request(&self, request: RequestUsage) -> bool {
        self.shared.queue(Item::Request(request))
    }

    /// Queues every record of `records`, or none: when the queue has no room
    /// for all of them (or the writer has stopped) they are handed back, and
    /// the caller may retry. Never waits.
    pub fn record_all(&self, records: Vec<UsageRecord>) -> Result<(), Vec<UsageRecord>> {
        if records.is_empty() {
            return Ok(());
        }
        // Every shard, locked in order (the only place that holds two), so
        // that the room counted is the room filled.
        let mut queues: Vec<_> = self.shared.shards.iter().map(|s| lock(&s.0)).collect();
        let room: usize = queues.iter().map(|q| q.room()).sum();
        if queues[0].closed || room < records.len() {
            drop(queues);
            self.shared.wake.notify_one();
            return Err(records);
        }
        let mut records = records.into_iter();
        for queue in &mut queues {
            let room = queue.room();
            queue.items.extend(
                records
                    .by_ref()
                    .take(room)
                    .map(|r| Item::Record(Box::new(r))),
            );
        }
        let queued: usize = queues.iter().map(|q| q.items.len()).sum();
        drop(queues);
        if queued >= self.shared.batch_size {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Waits until every record queued before this call is written (or was
    /// refused by the store and counted as dropped). Returns at once when the
    /// writer has stopped, since it wrote everything before stopping.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        {
            let mut flushes = lock(&self.shared.flushes);
            if flushes.closed {
                return;
            }
            flushes.waiting.push(done);
        }
        self.shared.wake.notify_one();
        let _ = written.await;
    }

    /// How many records were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
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
        let shared = Arc::new(Shared::new(&options));
        let (stop, stopped) = watch::channel(false);
        let every = options.flush_interval.max(Duration::from_millis(1));
        let task = tokio::spawn(run(store, shared.clone(), stopped, every));
        (
            Self {
                stop,
                task: Some(task),
            },
            UsageSink { shared },
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
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
    every: Duration,
) {
    let mut batch = Batch {
        slots: Vec::new(),
        filled: 0,
        size: shared.batch_size,
        runs: (0..shared.shards.len()).map(|_| Vec::new()).collect(),
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            () = shared.wake.notified() => false,
            _ = stopped.changed() => true,
        };
        // Every sink gone: nothing more can come.
        let orphaned = Arc::strong_count(&shared) == 1;
        if stopping || orphaned {
            break;
        }
        // Answered (their senders dropped) once what was queued before them
        // is written.
        let flushes = std::mem::take(&mut lock(&shared.flushes).waiting);
        batch.drain(&*store, &shared, false).await;
        drop(flushes);
    }
    // Stopping: the last drain closes each shard as it takes it, so nothing
    // queued is left behind; the flushes waiting before it and during it are
    // answered after it, and later ones return at once.
    let before = std::mem::take(&mut lock(&shared.flushes).waiting);
    batch.drain(&*store, &shared, true).await;
    let during = {
        let mut flushes = lock(&shared.flushes);
        flushes.closed = true;
        std::mem::take(&mut flushes.waiting)
    };
    drop((before, during));
}

/// The writer's reusable state: the slots records are made in, and one run
/// per shard (the vector swapped with the shard's).
struct Batch {
    slots: Vec<UsageRecord>,
    filled: usize,
    size: usize,
    runs: Vec<Vec<Item>>,
}

impl Batch {
    /// Writes everything queued now, in batches of at most `size`, oldest
    /// first across the shards (each shard is in the order it was queued),
    /// so that the store's time indexes are appended to. `close`: the
    /// shards take nothing more.
    async fn drain(&mut self, store: &dyn Store, shared: &Shared, close: bool) {
        for (shard, run) in shared.shards.iter().zip(&mut self.runs) {
            let mut queue = lock(&shard.0);
            queue.closed |= close;
            std::mem::swap(&mut queue.items, run);
        }
        let mut runs = std::mem::take(&mut self.runs);
        {
            let mut items: Vec<_> = runs
                .iter_mut()
                .filter(|run| !run.is_empty())
                .map(|run| run.drain(..).peekable())
                .collect();
            while let Some(item) = take_oldest(&mut items) {
                let slot = self.next_slot();
                match item {
                    Item::Request(request) => fill(slot, &request),
                    Item::Record(record) => *slot = *record,
                }
                if self.filled == self.size {
                    self.write(store, shared).await;
                }
            }
        }
        self.runs = runs;
        self.write(store, shared).await;
    }

    /// The next slot to fill: a reused record, or a new one.
    fn next_slot(&mut self) -> &mut UsageRecord {
        if self.filled == self.slots.len() {
            self.slots.push(empty_record());
        }
        self.filled += 1;
        &mut self.slots[self.filled - 1]
    }

    async fn write(&mut self, store: &dyn Store, shared: &Shared) {
        let batch = &self.slots[..self.filled];
        self.filled = 0;
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        match store.insert_usage(batch).await {
            Ok(()) => metrics::counter!("keysmith_usage_written_total").increment(count),
            Err(error) => {
                tracing::warn!(%error, records = count, "usage batch lost: the store refused it");
                shared.dropped.fetch_add(count, Ordering::Relaxed);
                metrics::counter!("keysmith_usage_dropped_total").increment(count);
            }
        }
    }
}

/// The oldest of the runs' next items (each run is in the order it was
/// queued, so this merges them oldest first).
fn take_oldest<I: Iterator<Item = Item>>(runs: &mut [std::iter::Peekable<I>]) -> Option<Item> {
    let (oldest, _) = runs
        .iter_mut()
        .enumerate()
        .filter_map(|(i, run)| Some((i, run.peek()?.created_at())))
        .min_by_key(|&(_, at)| at)?;
    runs[oldest].next()
}

fn empty_record() -> UsageRecord {
    UsageRecord {
        id: UsageId::new(),
        key_id: crate::id::KeyId::new(),
        app_id: String::new(),
        tenant_id: String::new(),
        endpoint: String::new(),
        method: String::new(),
        status_code: 0,
        ip: None,
        user_agent: None,
        latency_ms: 0,
        metadata: Default::default(),
        created_at: DateTime::<Utc>::UNIX_EPOCH,
    }
}

/// Makes `slot` the record of `request`, reusing the slot's strings.
fn fill(slot: &mut UsageRecord, request: &RequestUsage) {
    fn set(to: &mut String, from: &str) {
        to.clear();
        to.push_str(from);
    }
    fn set_some(to: &mut Option<String>, from: Option<impl std::fmt::Display>) {
        match from {
            Some(value) => {
                let to = to.get_or_insert_with(String::new);
                to.clear();
                let _ = write!(to, "{value}");
            }
            None => *to = None,
        }
    }
    slot.id = UsageId::new();
    slot.key_id = request.key.id;
    set(&mut slot.app_id, &request.key.app_id);
    set(&mut slot.tenant_id, &request.key.tenant_id);
    set(&mut slot.endpoint, &request.endpoint);
    set(&mut slot.method, &request.method);
    slot.status_code = request.status_code;
    set_some(&mut slot.ip, request.ip);
    set_some(&mut slot.user_agent, request.user_agent.as_deref());
    slot.latency_ms = request.latency_ms;
    slot.metadata.clear();
    slot.created_at = request.created_at;
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

    #[test]
    fn runs_are_merged_oldest_first() {
        let tenant = Tenant::new("app", "t").unwrap();
        let at = |ms: i64| {
            let mut r = record(&tenant);
            r.created_at = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::milliseconds(ms);
            Item::Record(Box::new(r))
        };
        let mut runs: Vec<_> = [vec![at(1), at(4), at(5)], vec![], vec![at(2), at(3), at(9)]]
            .into_iter()
            .map(|run| run.into_iter().peekable())
            .collect();
        let mut order = Vec::new();
        while let Some(item) = take_oldest(&mut runs) {
            order.push(item.created_at().timestamp_millis());
        }
        assert_eq!(order, [1, 2, 3, 4, 5, 9]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn threads_share_the_capacity_and_nothing_taken_is_lost_at_shutdown() {
        let store = Arc::new(MemoryStore::new());
        let tenant = Tenant::new("app", "t").unwrap();
        let options = UsageWriterOptions {
            capacity: 100,
            batch_size: 1000,
            flush_interval: Duration::from_secs(3600),
        };
        // Six threads (more than shards on a small machine, fewer on a large
        // one) offer 50 records each to a queue no writer drains: exactly the
        // capacity is taken, whichever shards the threads use.
        let queue = Shared::new(&options);
        let taken: usize = std::thread::scope(|s| {
            let threads: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        (0..50)
                            .filter(|_| queue.queue(Item::Record(Box::new(record(&tenant)))))
                            .count()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(taken, 100);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 200);

        let (writer, sink) = UsageWriter::spawn(store.clone(), options);
        for _ in 0..100 {
            assert!(sink.record(record(&tenant)));
        }
        sink.flush().await;
        assert_eq!(stored(&*store, &tenant).await, 100);

        // Threads that keep recording while the writer shuts down: every
        // record taken is written, every other one counted as dropped.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let taken = std::thread::scope(|s| {
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let mut taken = 0;
                        while !stop.load(Ordering::Relaxed) {
                            taken += usize::from(sink.record(record(&tenant)));
                            std::thread::yield_now();
                        }
                        taken
                    })
                })
                .collect();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    while stored(&*store, &tenant).await < 150 {
                        sink.flush().await;
                    }
                    writer.shutdown().await;
                })
            });
            stop.store(true, Ordering::Relaxed);
            threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum::<usize>()
        });
        assert_eq!(
            stored(&*store, &tenant).await,
            100 + taken as u64,
            "a record taken is a record written"
        );
        assert!(
            !sink.record(record(&tenant)),
            "a stopped writer takes nothing"
        );
        sink.flush().await;
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
