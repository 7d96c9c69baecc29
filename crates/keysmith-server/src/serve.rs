//! `keysmith serve`: the HTTP server, its background sweeps, bootstrap and
//! graceful shutdown.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use keysmith::hooks::{AuditEvent, AuditHook, AuditSink, HookResult, MetricsHook};
use keysmith::usage::{UsageSink, UsageWriter};
use keysmith::{Engine, Store, Tenant, UsagePeriod};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::api::{self, AppState, Limits};
use crate::config::{Config, LimitsBackend, QuotaCounts};
use crate::root;
use crate::store::Opened;

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0,
                ])
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The audit action of an accepted validation.
const VALIDATED: &str = "keysmith.key.validated";

/// Audit events into the log, as structured fields.
#[derive(Debug, Default)]
pub struct LogAuditSink;

#[async_trait]
impl AuditSink for LogAuditSink {
    async fn record(&self, event: AuditEvent) -> HookResult {
        macro_rules! audit {
            ($level:ident) => {
                tracing::$level!(
                    target: "keysmith::audit",
                    action = event.action,
                    outcome = ?event.outcome,
                    severity = ?event.severity,
                    resource = event.resource_type,
                    resource_id = event.resource_id.as_deref().unwrap_or("-"),
                    app_id = event.app_id.as_deref().unwrap_or("-"),
                    tenant_id = event.tenant_id.as_deref().unwrap_or("-"),
                    reason = event.reason.as_deref().unwrap_or("-"),
                    "audit"
                )
            };
        }
        // An accepted validation is the hot path's every request: it is
        // counted in `keysmith_validations_total` and logged only at debug
        // level. Changes and refusals are logged at info.
        if event.action == VALIDATED {
            audit!(debug);
        } else {
            audit!(info);
        }
        Ok(())
    }
}

/// The server's engine with the local limits backend (what tests embed);
/// `configured_engine` honours the configuration.
pub fn engine(store: Arc<dyn Store>) -> Engine {
    hooked(store).build()
}

/// A builder with the server's hooks: metrics, and audit events into the log
/// (tests add a clock to it).
pub fn hooked(store: Arc<dyn Store>) -> keysmith::EngineBuilder {
    Engine::builder(store)
        .hook(Arc::new(MetricsHook))
        .hook(Arc::new(AuditHook::new(Arc::new(LogAuditSink))))
}

/// The engine for `config`: rate limits and quotas in Redis when configured;
/// reported usage queued into `usage` when given; changes published on the
/// store's feed. Servers (those given a usage sink) also cache validations.
pub async fn configured_engine(
    opened: &Opened,
    config: &Config,
    usage: Option<UsageSink>,
) -> anyhow::Result<Engine> {
    use keysmith::ratelimit::StoreQuotaCounter;
    use keysmith::ratelimit::redis::{RedisOptions, RedisQuotaCounter, RedisRateLimiter};

    let store = opened.store.clone();
    let serving = usage.is_some();
    let mut builder = hooked(store.clone());
    if let Some(feed) = &opened.feed {
        builder = builder.change_feed(feed.clone());
    }
    if let Some(sink) = usage {
        builder = builder.usage_sink(sink);
        if let Some(cache) = config.cache() {
            builder = builder.cache(cache);
        }
    }
    let builder = match config.limits_backend {
        // Counts kept in process are for the long-running server only: a CLI
        // command counts in the database.
        LimitsBackend::Local if serving && config.quota_counts == QuotaCounts::Process => {
            builder.local_quota_counts()
        }
        LimitsBackend::Local => builder,
        LimitsBackend::Redis => {
            let url = config.redis_url.as_deref().ok_or_else(|| {
                anyhow::anyhow!("configuration: limits_backend = \"redis\" needs redis_url")
            })?;
            let options = RedisOptions {
                timeout: config.redis_timeout.0,
                on_failure: config.redis_on_failure,
                ..RedisOptions::default()
            };
            let limiter = RedisRateLimiter::connect(url, options.clone()).await?;
            let fallback = Arc::new(StoreQuotaCounter::new(store));
            let counter = RedisQuotaCounter::connect(url, options, fallback).await?;
            builder
                .rate_limiter(Arc::new(limiter))
                .quota_counter(Arc::new(counter))
        }
    };
    Ok(builder.build())
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let opened = crate::store::open(&config).await?;
    let store = opened.store.clone();
    let (usage_writer, usage_sink) = UsageWriter::spawn(store.clone(), config.usage_writer());
    let engine = configured_engine(&opened, &config, Some(usage_sink)).await?;
    if config.bootstrap && !root::any_exist(&engine).await? {
        let tenant = Tenant::new("default", "default")?;
        let created = root::create(&engine, &tenant, Vec::new()).await?;
        eprintln!(
            "Created the first root key (keysmith:*, app `default`, tenant `default`).\n\
             It is shown once; keep it safe:\n\n    {}\n",
            created.raw_key.expose_secret()
        );
    }
    let state = AppState {
        engine: engine.clone(),
        store: store.clone(),
        metrics: metrics_handle(),
    };
    let limits = Limits {
        body_limit: config.body_limit,
        request_timeout: config.request_timeout.0,
    };
    let app = api::router(state, limits);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let address = listener.local_addr()?;
    eprintln!("keysmith listening on http://{address}");
    tracing::info!(%address, database = %redact_url(&config.database_url), "listening");

    let (stop, stopped) = watch::channel(false);
    let sweeper = tokio::spawn(sweep(
        engine.clone(),
        config.sweep_interval.0,
        config.usage_retention.0,
        stopped.clone(),
    ));
    let quota_flusher = (config.limits_backend == LimitsBackend::Local
        && config.quota_counts == QuotaCounts::Process)
        .then(|| tokio::spawn(flush_quota_counts(engine.clone(), stopped.clone())));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("shutting down: in-flight requests finished");
    let _ = stop.send(true);
    let _ = sweeper.await;
    if let Some(flusher) = quota_flusher {
        let _ = flusher.await;
    }
    // Reported usage still queued is written before the process exits.
    usage_writer.shutdown().await;
    if let Err(error) = engine.flush_last_used().await {
        tracing::warn!(%error, "last_used_at flush at shutdown failed");
    }
    engine.shutdown().await;
    Ok(())
}

/// Writes the quota counts kept in process to the database every second
/// (`quota_counts = "process"`), until told to stop; the engine's shutdown
/// writes the last ones.
async fn flush_quota_counts(engine: Engine, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(error) = engine.flush_quota_counts().await {
            metrics::counter!("keysmith_quota_flush_failures_total").increment(1);
            tracing::warn!(%error, "quota counts flush failed; kept for the next one");
        }
    }
}

/// Expiry, grace and rotation-due sweeps (with usage aggregation, the
/// `last_used_at` flush and usage retention) on a schedule, in capped
/// batches, until told to stop.
async fn sweep(
    engine: Engine,
    every: Duration,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        // Drain in batches of 1000; a failure is logged and retried next tick.
        loop {
            match engine.expire_keys(1000).await {
                Ok(1000) => continue,
                Ok(n) if n > 0 => tracing::info!(expired = n, "expiry sweep"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "expiry sweep failed"),
            }
            break;
        }
        if let Err(error) = engine.end_grace_periods(1000).await {
            tracing::warn!(%error, "grace sweep failed");
        }
        notify_rotation_due(&engine).await;
        // Usage aggregates of the current day and month, and of the previous
        // ones right after they end (the instant one interval ago).
        let now = chrono::Utc::now();
        let before = now - chrono::Duration::from_std(every).unwrap_or_default();
        for period in [UsagePeriod::Day, UsagePeriod::Month] {
            for at in [before, now] {
                if let Err(error) = engine.aggregate_usage(period, at).await {
                    tracing::warn!(%error, "usage aggregation failed");
                }
            }
        }
        if let Err(error) = engine.flush_last_used().await {
            tracing::warn!(%error, "last_used_at flush failed");
        }
        match engine.purge_usage(retention, 10_000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "usage retention"),
            Err(error) => tracing::warn!(%error, "usage retention failed"),
        }
    }
}

/// Rotation-due notices, in batches of 1000 until none is left (at most 100
/// batches a sweep, the rest waiting for the next one); a failure is logged
/// and retried next sweep.
async fn notify_rotation_due(engine: &Engine) {
    let mut notified = 0;
    for _ in 0..100 {
        match engine.notify_rotation_due(1000).await {
            Ok(n) => {
                notified += n;
                if n < 1000 {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "rotation-due sweep failed");
                break;
            }
        }
    }
    if notified > 0 {
        tracing::info!(notified, "rotation-due sweep");
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// A database URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}
