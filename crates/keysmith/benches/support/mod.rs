//! What the in-process benchmarks share.
#![allow(dead_code)]

/// Keys to set up (`KEYSMITH_BENCH_KEYS`, default 100 000).
pub fn key_count() -> usize {
    std::env::var("KEYSMITH_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Polls a future that never waits (the memory store, a cache hit) to its
/// end, so the figures are validation's cost and not an executor's.
pub fn now<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("this future was expected never to wait"),
    }
}

/// The raw keys a benchmark validates, read one after another from one
/// contiguous buffer, in an order shuffled once against the order they were
/// created (and cached) in.
///
/// A server validates the key of the request it has just read: the key's
/// bytes are in cache, only the lookup is not. Reading each key from its own
/// heap allocation at a random place (a `Vec<String>` indexed at random)
/// would add two memory misses per call that are the harness's, not
/// validation's, and that a short baseline loop hides by overlapping them
/// with the previous iteration while a longer one cannot. The lookups stay
/// random across all the keys: their hashes are, and the shuffle keeps the
/// records they reach out of allocation order.
pub struct Tape {
    buf: String,
    ends: Vec<usize>,
    next: usize,
}

impl Tape {
    pub fn new(keys: &[String]) -> Self {
        let mut order: Vec<usize> = (0..keys.len()).collect();
        // Fisher–Yates with a fixed xorshift: the same order every run.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut buf = String::with_capacity(keys.iter().map(String::len).sum());
        let mut ends = Vec::with_capacity(keys.len());
        for &i in &order {
            buf.push_str(&keys[i]);
            ends.push(buf.len());
        }
        Self { buf, ends, next: 0 }
    }

    /// The next key, round and round.
    pub fn next(&mut self) -> &str {
        let i = self.next;
        self.next = if i + 1 == self.ends.len() { 0 } else { i + 1 };
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }
}

/// `n` usage records like the middleware's, spread over `keys`, created a
/// microsecond apart from now (at the stores' precision).
pub fn usage_records(keys: &[keysmith::KeyId], n: usize) -> Vec<keysmith::model::UsageRecord> {
    let now =
        chrono::DateTime::from_timestamp_micros(chrono::Utc::now().timestamp_micros()).unwrap();
    (0..n)
        .map(|i| keysmith::model::UsageRecord {
            id: keysmith::UsageId::new(),
            key_id: keys[i % keys.len()],
            app_id: "bench".into(),
            tenant_id: "bench".into(),
            endpoint: "/v1/orders".into(),
            method: "GET".into(),
            status_code: 200,
            ip: Some("127.0.0.1".into()),
            user_agent: Some("wrk/4.1".into()),
            latency_ms: (i % 7) as u64,
            metadata: keysmith::model::Metadata::new(),
            created_at: now + chrono::Duration::microseconds(i as i64),
        })
        .collect()
}
