//! `examples/axum_service.rs` end to end over real HTTP: the 401, 403, 429
//! and 200 paths, the usage rows the requests leave (status, endpoint,
//! latency), and the aggregates computed from them.
//!
//! `/report` stands for a handler that works for 250 ms; its recorded latency
//! must cover that.

#[path = "../examples/axum_service.rs"]
mod example;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keysmith::usage::{UsageWriter, UsageWriterOptions};
use keysmith::{Engine, SqliteStore, Store, UsageFilter, UsagePeriod, model::PageRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One HTTP/1.1 GET over a fresh connection.
async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: demo\r\nuser-agent: e2e/1\r\n{auth}connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Nearest-rank percentile, computed the obvious way.
fn brute_percentile(values: &[u64], p: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank - 1]
}

#[tokio::test]
async fn the_example_service_over_http() {
    let sqlite = SqliteStore::open(":memory:").await.unwrap();
    sqlite.migrate().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(sqlite);
    let engine = Engine::builder(store.clone()).build();
    let keys: HashMap<_, _> = example::demo_keys(&engine)
        .await
        .unwrap()
        .into_iter()
        .map(|(name, raw)| (name, raw.expose_secret().to_owned()))
        .collect();
    let options = UsageWriterOptions {
        flush_interval: Duration::from_secs(3600),
        ..UsageWriterOptions::default()
    };
    let (writer, usage) = UsageWriter::spawn(store.clone(), options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = example::app(engine.clone(), usage.clone())
        .into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, service).await });

    // 401: no key, a malformed key and a well-formed unknown key look alike.
    let missing = get(addr, "/hello", None).await;
    let unknown = keysmith::RawKey::generate("sk", &keysmith::Environment::Live).unwrap();
    let wrong = get(addr, "/hello", Some(unknown.expose_secret())).await;
    let garbage = get(addr, "/hello", Some("sk_live_nope")).await;
    for answer in [&missing, &wrong, &garbage] {
        assert_eq!(answer.status, 401);
        assert_eq!(answer.body, missing.body, "one uniform refusal");
    }
    // 200 and 403: the reader reads, but is not an admin; the boss is.
    let reader = &keys["reader"];
    let hello = get(addr, "/hello", Some(reader)).await;
    assert_eq!(
        (hello.status, hello.body.contains("hello, reader")),
        (200, true)
    );
    assert_eq!(get(addr, "/admin", Some(reader)).await.status, 403);
    assert_eq!(get(addr, "/admin", Some(&keys["boss"])).await.status, 200);
    // A slow endpoint: its latency is recorded.
    assert_eq!(get(addr, "/report", Some(reader)).await.status, 200);
    // 429: the limited key's third request within the minute.
    let limited = &keys["limited"];
    for _ in 0..2 {
        assert_eq!(get(addr, "/hello", Some(limited)).await.status, 200);
    }
    let refused = get(addr, "/hello", Some(limited)).await;
    assert_eq!(refused.status, 429);
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(refused.headers["ratelimit-limit"], "2");
    assert_eq!(refused.headers["ratelimit-remaining"], "0");

    // Usage: every request that passed the layer, once the writer flushed.
    writer.shutdown().await;
    server.abort();
    let tenant = example::tenant();
    let filter = UsageFilter {
        page: PageRequest::new(100, 0).unwrap(),
        ..Default::default()
    };
    let rows = store.list_usage(&tenant, &filter).await.unwrap().items;
    let mut seen: Vec<(String, u16)> = rows
        .iter()
        .map(|r| (r.endpoint.clone(), r.status_code))
        .collect();
    seen.sort();
    let expected = [
        ("/admin", 200),
        ("/admin", 403),
        ("/hello", 200),
        ("/hello", 200),
        ("/hello", 200),
        ("/report", 200),
    ];
    let expected: Vec<(String, u16)> = expected.iter().map(|(e, s)| (e.to_string(), *s)).collect();
    assert_eq!(seen, expected, "refused keys and 429s are not usage");
    assert!(
        rows.iter()
            .all(|r| r.method == "GET" && r.user_agent.as_deref() == Some("e2e/1"))
    );
    assert!(rows.iter().all(|r| r.ip.as_deref() == Some("127.0.0.1")));
    let report = rows.iter().find(|r| r.endpoint == "/report").unwrap();
    let slow = u64::try_from(example::SLOW.as_millis()).unwrap();
    assert!(
        report.latency_ms >= slow,
        "the report took {} ms",
        report.latency_ms
    );

    // Aggregates of the reader's day match the rows.
    let now = engine.clock().now();
    engine.aggregate_usage(UsagePeriod::Day, now).await.unwrap();
    let reader_id = rows
        .iter()
        .find(|r| r.endpoint == "/report")
        .map(|r| r.key_id)
        .unwrap();
    let days = engine
        .usage_aggregates(&tenant, &reader_id, UsagePeriod::Day, None, None)
        .await
        .unwrap();
    assert_eq!(days.len(), 1);
    let mine: Vec<_> = rows.iter().filter(|r| r.key_id == reader_id).collect();
    let latencies: Vec<u64> = mine.iter().map(|r| r.latency_ms).collect();
    let day = &days[0];
    assert_eq!(
        (
            day.request_count,
            day.error_count,
            day.total_latency_ms,
            day.p50_latency_ms,
            day.p99_latency_ms
        ),
        (
            mine.len() as u64,
            mine.iter().filter(|r| r.status_code >= 400).count() as u64,
            latencies.iter().sum(),
            brute_percentile(&latencies, 50.0),
            brute_percentile(&latencies, 99.0)
        )
    );
    assert_eq!((day.request_count, day.error_count), (3, 1));
}
