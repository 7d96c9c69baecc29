//! Keysmith: API keys for the services that issue them.
//!
//! Generate keys (`sk_live_<64 hex>`, shown once, stored as SHA-256), validate
//! them on every request, rotate them with a grace period, revoke, suspend,
//! reactivate and expire them, hold them to scopes and policies, and react to
//! their life cycle with hooks. Storage is behind one [`Store`] trait: memory
//! here, SQLite and PostgreSQL behind features.
//!
//! Start with [`Engine::builder`].

pub mod cache;
pub mod clock;
pub mod duration;
mod engine;
pub mod error;
pub mod hooks;
pub mod id;
#[cfg(feature = "axum")]
pub mod middleware;
pub mod model;
pub mod policy;
pub mod ratelimit;
pub mod scope;
pub mod secret;
pub mod store;
pub mod usage;

pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{
    CreateKey, CreateScope, CreatedKey, DEFAULT_GRACE_PERIOD, Engine, EngineBuilder,
    MAX_USAGE_BATCH, NewUsage, RotateKey, RotatedKey, Validation,
};
pub use error::{Error, ResourceKind, Result};
pub use id::{KeyId, PolicyId, RotationId, ScopeId, UsageId};
pub use model::{
    ApiKey, KeyAction, KeyFilter, KeyState, Metadata, Page, PageRequest, Rotation, RotationDue,
    RotationReason, Scope, Tenant, UsageAggregate, UsageFilter, UsagePeriod, UsageRecord,
};
pub use policy::{Policy, PolicySpec, RequestContext};
pub use secret::{Environment, RawKey, SecretHash};
pub use store::{KeyUpdate, MemoryStore, Store};
#[cfg(feature = "postgres")]
pub use store::{PostgresOptions, PostgresStore};
#[cfg(feature = "sqlite")]
pub use store::{SqliteOptions, SqliteStore};
