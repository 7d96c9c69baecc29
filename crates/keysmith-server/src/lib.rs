//! The `keysmith` server and CLI: a thin adapter over the `keysmith` library.
//!
//! - [`config`]: defaults < `keysmith.toml` < `KEYSMITH_*` < flags.
//! - [`api`]: the REST API under `/v1`, authenticated with root keys.
//! - [`dashboard`]: the admin dashboard at `/dashboard`, signed in with a root key.
//! - [`root`]: root keys, kept apart from every tenant's keys.
//! - [`serve`]: the HTTP server, its workers and graceful shutdown.
//! - [`cli`]: the command line.

pub mod api;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod root;
pub mod serve;
pub mod store;
