//! Opening the store a database URL names.

use std::sync::Arc;

use keysmith::{PostgresOptions, PostgresStore, SqliteOptions, SqliteStore, Store};

use crate::config::Config;

/// Opens and migrates the store named by `config.database_url`:
/// `postgres://…` (or `postgresql://…`) for PostgreSQL, anything else a SQLite
/// file path (`sqlite://` prefix optional) or `:memory:`.
pub async fn open(config: &Config) -> Result<Arc<dyn Store>, keysmith::Error> {
    let url = config.database_url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = PostgresOptions {
            max_connections: config.pool_size,
            acquire_timeout: config.store_timeout.0,
            ..PostgresOptions::default()
        };
        let store = PostgresStore::connect_with(url, options).await?;
        store.migrate().await?;
        Ok(Arc::new(store))
    } else {
        let options = SqliteOptions {
            max_connections: config.pool_size,
            acquire_timeout: config.store_timeout.0,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open_with(url, options).await?;
        store.migrate().await?;
        Ok(Arc::new(store))
    }
}
