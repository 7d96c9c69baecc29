//! Lifecycle hooks: code that runs after an operation has committed.
//!
//! Hooks run in registration order. A hook's error is logged and never fails
//! the operation or stops the hooks after it. Hooks see records, never a raw
//! key: [`ApiKey`] carries only the hash and the last four characters.

mod audit;
mod metrics;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use audit::{AuditEvent, AuditHook, AuditSink, MemoryAuditSink, Outcome, Severity};
pub use metrics::MetricsHook;

use crate::error::Error;
use crate::id::PolicyId;
use crate::model::{ApiKey, Rotation, Tenant};
use crate::policy::Policy;

/// The error a hook may return; it is logged, nothing more.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;
/// What hook methods return.
pub type HookResult = Result<(), HookError>;

/// A key event that failed, with what is known of it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The tenant, when known.
    pub tenant: Option<&'a Tenant>,
    /// The key, when it was found.
    pub key: Option<&'a ApiKey>,
    /// What went wrong.
    pub error: &'a Error,
}

/// Reacts to lifecycle events. Every method defaults to doing nothing.
#[async_trait]
#[allow(unused_variables)]
pub trait Hook: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs.
    fn name(&self) -> &str {
        "hook"
    }
    /// A key was created.
    async fn key_created(&self, key: &ApiKey) -> HookResult {
        Ok(())
    }
    /// Creating a key failed.
    async fn key_create_failed(&self, failure: Failure<'_>) -> HookResult {
        Ok(())
    }
    /// A key was presented and accepted.
    async fn key_validated(&self, key: &ApiKey) -> HookResult {
        Ok(())
    }
    /// A key was presented and refused (not for rate limits and quotas, which
    /// have their own events).
    async fn validation_failed(&self, failure: Failure<'_>) -> HookResult {
        Ok(())
    }
    /// A key was rotated.
    async fn key_rotated(&self, key: &ApiKey, rotation: &Rotation) -> HookResult {
        Ok(())
    }
    /// A key was revoked.
    async fn key_revoked(&self, key: &ApiKey, reason: Option<&str>) -> HookResult {
        Ok(())
    }
    /// A key was suspended.
    async fn key_suspended(&self, key: &ApiKey) -> HookResult {
        Ok(())
    }
    /// A suspended key was reactivated.
    async fn key_reactivated(&self, key: &ApiKey) -> HookResult {
        Ok(())
    }
    /// A key passed its expiry and was marked expired.
    async fn key_expired(&self, key: &ApiKey) -> HookResult {
        Ok(())
    }
    /// A key's policy rotation period has passed since its last rotation (or
    /// its creation): fired once per period by the rotation-due sweep
    /// ([`Engine::notify_rotation_due`](crate::Engine::notify_rotation_due)),
    /// `due_at` being when this period's notice became due.
    async fn rotation_due(&self, key: &ApiKey, due_at: DateTime<Utc>) -> HookResult {
        Ok(())
    }
    /// A key was refused by its rate limit.
    async fn rate_limited(&self, key: &ApiKey) -> HookResult {
        Ok(())
    }
    /// A key was refused by its quota.
    async fn quota_exceeded(&self, key: &ApiKey) -> HookResult {
        Ok(())
    }
    /// A policy was created.
    async fn policy_created(&self, policy: &Policy) -> HookResult {
        Ok(())
    }
    /// A policy was changed.
    async fn policy_updated(&self, policy: &Policy) -> HookResult {
        Ok(())
    }
    /// A policy was deleted.
    async fn policy_deleted(&self, tenant: &Tenant, id: &PolicyId) -> HookResult {
        Ok(())
    }
    /// The engine is shutting down.
    async fn shutdown(&self) -> HookResult {
        Ok(())
    }
}

/// The ordered list of hooks an engine runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks(Vec<Arc<dyn Hook>>);

impl Hooks {
    pub(crate) fn push(&mut self, hook: Arc<dyn Hook>) {
        self.0.push(hook);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &dyn Hook> {
        self.0.iter().map(|h| h.as_ref())
    }
}

/// Runs one hook method on every hook in order, logging (never returning)
/// errors: `run_hooks!(self.hooks, "key_created", |h| h.key_created(&key))`.
macro_rules! run_hooks {
    ($hooks:expr, $event:literal, |$h:ident| $call:expr) => {
        for $h in $hooks.iter() {
            if let Err(error) = $call.await {
                tracing::warn!(hook = $h.name(), event = $event, %error, "hook failed; operation unaffected");
            }
        }
    };
}
pub(crate) use run_hooks;
