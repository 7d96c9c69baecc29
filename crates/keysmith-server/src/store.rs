//! Opening the store a database URL names.

use std::sync::Arc;

use keysmith::cache::ChangeFeed;
use keysmith::cache::postgres::PostgresChangeFeed;
use keysmith::{PostgresOptions, PostgresStore, SqliteOptions, SqliteStore, Store};

use crate::config::Config;

/// An open store, with the change feed its nodes share when it has one.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// PostgreSQL `LISTEN/NOTIFY` between the nodes on the same database;
    /// `None` for SQLite.
    pub feed: Option<Arc<dyn ChangeFeed>>,
}

/// Opens and migrates the store named by `config.database_url`:
/// `postgres://…` (or `postgresql://…`) for PostgreSQL, anything else a SQLite
/// file path (`sqlite://` prefix optional) or `:memory:`.
pub async fn open(config: &Config) -> Result<Opened, keysmith::Error> {
    let url = config.database_url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = PostgresOptions {
            max_connections: config.pool_size,
            acquire_timeout: config.store_timeout.0,
            ..PostgresOptions::default()
        };
        let store = PostgresStore::connect_with(url, options).await?;
        store.migrate().await?;
        let feed = PostgresChangeFeed::new(store.pool().clone());
        Ok(Opened {
            store: Arc::new(store),
            feed: Some(Arc::new(feed)),
        })
    } else {
        let options = SqliteOptions {
            max_connections: config.pool_size,
            acquire_timeout: config.store_timeout.0,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open_with(url, options).await?;
        store.migrate().await?;
        Ok(Opened {
            store: Arc::new(store),
            feed: None,
        })
    }
}
