//! Configuration: defaults < `keysmith.toml` < `KEYSMITH_*` environment <
//! command-line flags. Unknown keys in the file or the environment are an
//! error naming the key (`KEYSMITH_LOG` is the log filter; `KEYSMITH_TEST_*`
//! and `KEYSMITH_BENCH_*` are left to the test and benchmark tooling).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as `90s`, `15m`, `24h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&keysmith::duration::format(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        keysmith::duration::parse("duration", &s)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every setting of the server and CLI. See the README for each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// `postgres://…` or a SQLite path (`keysmith.db`, `:memory:`).
    pub database_url: String,
    /// Connections in the store's pool.
    pub pool_size: u32,
    /// How long a store operation waits for a connection before failing.
    pub store_timeout: HumanDuration,
    /// Longest time one HTTP request may take.
    pub request_timeout: HumanDuration,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Peers whose `X-Forwarded-For` / `Forwarded` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Create and print a root key on first start with an empty database.
    pub bootstrap: bool,
    /// How often the expiry, grace, rotation-due, aggregation and retention
    /// sweeps run.
    pub sweep_interval: HumanDuration,
    /// How long raw usage records are kept (aggregates stay).
    pub usage_retention: HumanDuration,
    /// Reported usage waits at most this long in the queue before its batch
    /// is written.
    pub usage_flush_interval: HumanDuration,
    /// Usage records written in one batch insert, at most.
    pub usage_batch_size: usize,
    /// Usage records the queue holds; beyond that `POST /v1/usage` answers
    /// 503 `queue_full`.
    pub usage_queue_capacity: usize,
    /// Cache validations in the server (hot keys skip the database; unknown
    /// hashes are remembered for `cache_negative_ttl`).
    pub cache: bool,
    /// Keys the validation cache holds (and as many unknown hashes).
    pub cache_capacity: usize,
    /// Longest a cached key is served without asking the database. Changes
    /// made through this server apply at once; on PostgreSQL, changes made on
    /// other nodes arrive through `LISTEN/NOTIFY`; this bounds the rest
    /// (a CLI writing the same SQLite file, a lost notification connection).
    pub cache_ttl: HumanDuration,
    /// Longest an unknown hash is remembered.
    pub cache_negative_ttl: HumanDuration,
    /// On PostgreSQL, longest a cached entry is served while the
    /// notification connection is down.
    pub cache_degraded_ttl: HumanDuration,
    /// Where rate limits and quotas are kept: `local` (rate limits in
    /// process, quotas in the database) or `redis` (both in Redis, shared by
    /// every node).
    pub limits_backend: LimitsBackend,
    /// `redis://host:6379/` when `limits_backend = "redis"`.
    pub redis_url: Option<String>,
    /// Longest a Redis call may take before the failure mode applies.
    pub redis_timeout: HumanDuration,
    /// What to do when Redis cannot answer: `local` (fall back to the
    /// in-process limiter and the database's quota counts), `fail_open`
    /// (allow) or `fail_closed` (refuse with 503).
    pub redis_on_failure: keysmith::ratelimit::redis::FailureMode,
    /// Where quotas are counted with `limits_backend = "local"`: `database`
    /// (at every validation, in the database: exact across every node that
    /// shares it) or `process` (in this process, next to the rate limiter,
    /// and written to the database every second: for one node per database,
    /// such as the SQLite default; a crash loses at most the last second's
    /// counts).
    pub quota_counts: QuotaCounts,
}

/// Where quotas are counted with the local limits backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaCounts {
    /// In the database, at every validation.
    Database,
    /// In process, written to the database every second.
    Process,
}

/// Where rate limits and quotas are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    /// In process (rate limits) and in the database (quotas).
    Local,
    /// In Redis.
    Redis,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            database_url: "keysmith.db".into(),
            pool_size: 10,
            store_timeout: HumanDuration(Duration::from_secs(3)),
            request_timeout: HumanDuration(Duration::from_secs(30)),
            body_limit: 1024 * 1024,
            log_format: LogFormat::Text,
            trusted_proxies: Vec::new(),
            bootstrap: true,
            sweep_interval: HumanDuration(Duration::from_secs(60)),
            usage_retention: HumanDuration(Duration::from_secs(90 * 86_400)),
            usage_flush_interval: HumanDuration(Duration::from_millis(500)),
            usage_batch_size: 5000,
            usage_queue_capacity: 100_000,
            cache: true,
            cache_capacity: 100_000,
            cache_ttl: HumanDuration(Duration::from_secs(10)),
            cache_negative_ttl: HumanDuration(Duration::from_secs(2)),
            cache_degraded_ttl: HumanDuration(Duration::from_secs(1)),
            limits_backend: LimitsBackend::Local,
            redis_url: None,
            redis_timeout: HumanDuration(Duration::from_millis(250)),
            redis_on_failure: keysmith::ratelimit::redis::FailureMode::Local,
            quota_counts: QuotaCounts::Database,
        }
    }
}

/// The environment variables Keysmith reads (`KEYSMITH_` + the upper-cased key).
const KNOWN: &[&str] = &[
    "listen",
    "database_url",
    "pool_size",
    "store_timeout",
    "request_timeout",
    "body_limit",
    "log_format",
    "trusted_proxies",
    "bootstrap",
    "sweep_interval",
    "usage_retention",
    "usage_flush_interval",
    "usage_batch_size",
    "usage_queue_capacity",
    "cache",
    "cache_capacity",
    "cache_ttl",
    "cache_negative_ttl",
    "cache_degraded_ttl",
    "limits_backend",
    "redis_url",
    "redis_timeout",
    "redis_on_failure",
    "quota_counts",
];

/// Loads the configuration from `file` (default `keysmith.toml`, optional), the
/// environment, and `overrides` (the flags that were given).
pub fn load(
    file: Option<&Path>,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<Config> {
    for (name, _) in std::env::vars() {
        let Some(key) = name.strip_prefix("KEYSMITH_") else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        // KEYSMITH_LOG is the log filter (read by the logger, not a setting).
        let tooling = key == "log" || key.starts_with("test_") || key.starts_with("bench_");
        if !KNOWN.contains(&key.as_str()) && !tooling {
            anyhow::bail!("unknown configuration variable {name}");
        }
    }
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    match file {
        Some(path) => {
            anyhow::ensure!(
                path.exists(),
                "config file {} does not exist",
                path.display()
            );
            figment = figment.merge(Toml::file(path));
        }
        None => figment = figment.merge(Toml::file("keysmith.toml")),
    }
    let env = Env::prefixed("KEYSMITH_").only(KNOWN);
    figment = figment
        .merge(env)
        .merge(Serialized::globals(overrides.clone()));
    let config: Config = figment
        .extract()
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    config.check()?;
    Ok(config)
}

impl Config {
    /// Values that parse but cannot work.
    fn check(&self) -> anyhow::Result<()> {
        let positive = [
            ("usage_batch_size", self.usage_batch_size),
            ("usage_queue_capacity", self.usage_queue_capacity),
            ("cache_capacity", self.cache_capacity),
        ];
        for (name, value) in positive {
            anyhow::ensure!(value > 0, "configuration: {name} must be at least 1");
        }
        anyhow::ensure!(
            !self.usage_flush_interval.0.is_zero(),
            "configuration: usage_flush_interval must be longer than 0s"
        );
        Ok(())
    }

    /// The validation cache's settings, when it is on.
    pub fn cache(&self) -> Option<keysmith::cache::CacheOptions> {
        self.cache.then_some(keysmith::cache::CacheOptions {
            capacity: self.cache_capacity,
            ttl: self.cache_ttl.0,
            negative_ttl: self.cache_negative_ttl.0,
            degraded_ttl: self.cache_degraded_ttl.0,
        })
    }

    /// The usage writer's batching.
    pub fn usage_writer(&self) -> keysmith::usage::UsageWriterOptions {
        keysmith::usage::UsageWriterOptions {
            capacity: self.usage_queue_capacity,
            batch_size: self.usage_batch_size,
            flush_interval: self.usage_flush_interval.0,
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_unknown_keys_fail() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "keysmith.toml",
                "pool_size = 4\nlisten = \"127.0.0.1:9000\"\nbody_limit = 10",
            )?;
            jail.set_env("KEYSMITH_POOL_SIZE", "6");
            let mut flags = serde_json::Map::new();
            flags.insert("body_limit".into(), 20.into());
            let config = load(None, &flags).expect("loads");
            assert_eq!(config.listen.port(), 9000, "file beats default");
            assert_eq!(config.pool_size, 6, "env beats file");
            assert_eq!(config.body_limit, 20, "flags beat env");
            assert_eq!(
                config.store_timeout.0,
                Duration::from_secs(3),
                "default kept"
            );

            jail.create_file("bad.toml", "pool_sise = 4")?;
            let err = load(Some(Path::new("bad.toml")), &serde_json::Map::new()).unwrap_err();
            assert!(err.to_string().contains("pool_sise"), "{err}");

            jail.set_env("KEYSMITH_LISTN", "x");
            let err = load(None, &serde_json::Map::new()).unwrap_err();
            assert!(err.to_string().contains("KEYSMITH_LISTN"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("keysmith.toml", "store_timeout = \"soon\"")?;
            let err = load(None, &serde_json::Map::new()).unwrap_err();
            assert!(err.to_string().contains("store_timeout"), "{err}");
            jail.create_file("keysmith.toml", "usage_batch_size = 0")?;
            let err = load(None, &serde_json::Map::new()).unwrap_err();
            assert!(err.to_string().contains("usage_batch_size"), "{err}");
            jail.create_file("keysmith.toml", "usage_flush_interval = \"0s\"")?;
            let err = load(None, &serde_json::Map::new()).unwrap_err();
            assert!(err.to_string().contains("usage_flush_interval"), "{err}");
            Ok(())
        });
    }
}
