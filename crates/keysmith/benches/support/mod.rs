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
