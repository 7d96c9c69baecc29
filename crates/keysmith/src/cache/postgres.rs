//! Invalidations between nodes through PostgreSQL `LISTEN/NOTIFY`.

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use super::{ChangeFeed, Invalidation};
use crate::error::{Error, Result};

/// The channel Keysmith's nodes notify and listen on.
pub const CHANNEL: &str = "keysmith_invalidations";

/// A [`ChangeFeed`] over the PostgreSQL database the nodes share: `publish`
/// is a `pg_notify`, `listen` a dedicated connection that `LISTEN`s.
#[derive(Debug, Clone)]
pub struct PostgresChangeFeed {
    pool: PgPool,
}

impl PostgresChangeFeed {
    /// A feed on the pool's database (the listener opens its own connection
    /// with the pool's options).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl ChangeFeed for PostgresChangeFeed {
    async fn publish(&self, change: Invalidation) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(change.encode())
            .execute(&self.pool)
            .await
            .map_err(Error::store)?;
        Ok(())
    }

    async fn listen(&self) -> Result<mpsc::Receiver<Invalidation>> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(Error::store)?;
        // A lost connection must end the stream (so the cache shortens its
        // TTL and forgets what it may have missed), not be mended silently.
        listener.eager_reconnect(false);
        listener.listen(CHANNEL).await.map_err(Error::store)?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    received = listener.try_recv() => match received {
                        Ok(Some(notification)) => {
                            let change = Invalidation::decode(notification.payload());
                            if tx.send(change).await.is_err() {
                                return;
                            }
                        }
                        // The connection was lost (None) or failed (Err).
                        Ok(None) | Err(_) => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }
}
