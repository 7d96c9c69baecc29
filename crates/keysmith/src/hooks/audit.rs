//! The audit hook: one structured event per lifecycle change, to a sink of the
//! application's choosing (a table, a log pipeline, a SIEM).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Failure, Hook, HookResult};
use crate::clock::{Clock, SystemClock};
use crate::id::PolicyId;
use crate::model::{ApiKey, Rotation, Tenant};
use crate::policy::Policy;

/// Whether the audited action succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It did.
    Success,
    /// It was refused or failed.
    Failure,
}

/// How much attention an event deserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Routine.
    Info,
    /// Worth a look.
    Warning,
    /// Someone should act (a revocation, a compromise rotation).
    Critical,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    /// Dotted action name, such as `keysmith.key.created`.
    pub action: &'static str,
    /// Success or failure.
    pub outcome: Outcome,
    /// Severity.
    pub severity: Severity,
    /// `key` or `policy`.
    pub resource_type: &'static str,
    /// The record's id, when known.
    pub resource_id: Option<String>,
    /// Owning application, when known.
    pub app_id: Option<String>,
    /// Owning tenant, when known.
    pub tenant_id: Option<String>,
    /// Why (a revocation reason, an error code).
    pub reason: Option<String>,
    /// When the hook saw it.
    pub occurred_at: DateTime<Utc>,
}

/// Where audit events go.
#[async_trait]
pub trait AuditSink: Send + Sync + std::fmt::Debug + 'static {
    /// Records one event.
    async fn record(&self, event: AuditEvent) -> HookResult;
}

/// A sink that keeps events in memory (tests, small tools).
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    events: Mutex<Vec<AuditEvent>>,
}

impl MemoryAuditSink {
    /// A copy of the events recorded so far.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl AuditSink for MemoryAuditSink {
    async fn record(&self, event: AuditEvent) -> HookResult {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
        Ok(())
    }
}

/// Turns lifecycle events into [`AuditEvent`]s for a sink.
#[derive(Debug)]
pub struct AuditHook {
    sink: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
}

impl AuditHook {
    /// An audit hook writing to `sink`, stamping events with the system clock.
    pub fn new(sink: Arc<dyn AuditSink>) -> Self {
        Self {
            sink,
            clock: Arc::new(SystemClock),
        }
    }

    /// Stamps events with `clock` instead.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn event(
        &self,
        action: &'static str,
        outcome: Outcome,
        severity: Severity,
        (resource_type, resource_id): (&'static str, Option<String>),
        tenant: Option<(&str, &str)>,
        reason: Option<String>,
    ) -> AuditEvent {
        AuditEvent {
            action,
            outcome,
            severity,
            resource_type,
            resource_id,
            app_id: tenant.map(|t| t.0.to_owned()),
            tenant_id: tenant.map(|t| t.1.to_owned()),
            reason,
            occurred_at: self.clock.now(),
        }
    }

    async fn key_event(
        &self,
        action: &'static str,
        severity: Severity,
        key: &ApiKey,
        reason: Option<String>,
    ) -> HookResult {
        let tenant = Some((key.app_id.as_str(), key.tenant_id.as_str()));
        let event = self.event(
            action,
            Outcome::Success,
            severity,
            ("key", Some(key.id.to_string())),
            tenant,
            reason,
        );
        self.sink.record(event).await
    }

    async fn failure_event(&self, action: &'static str, failure: Failure<'_>) -> HookResult {
        let tenant = match (failure.key, failure.tenant) {
            (Some(key), _) => Some((key.app_id.as_str(), key.tenant_id.as_str())),
            (None, Some(t)) => Some((t.app_id.as_str(), t.tenant_id.as_str())),
            (None, None) => None,
        };
        let event = self.event(
            action,
            Outcome::Failure,
            Severity::Warning,
            ("key", failure.key.map(|k| k.id.to_string())),
            tenant,
            Some(failure.error.code().to_owned()),
        );
        self.sink.record(event).await
    }

    async fn policy_event(&self, action: &'static str, policy: &Policy) -> HookResult {
        let tenant = Some((policy.app_id.as_str(), policy.tenant_id.as_str()));
        let event = self.event(
            action,
            Outcome::Success,
            Severity::Info,
            ("policy", Some(policy.id.to_string())),
            tenant,
            None,
        );
        self.sink.record(event).await
    }
}

#[async_trait]
impl Hook for AuditHook {
    fn name(&self) -> &str {
        "audit"
    }
    async fn key_created(&self, key: &ApiKey) -> HookResult {
        self.key_event("keysmith.key.created", Severity::Info, key, None)
            .await
    }
    async fn key_create_failed(&self, failure: Failure<'_>) -> HookResult {
        self.failure_event("keysmith.key.create_failed", failure)
            .await
    }
    async fn key_validated(&self, key: &ApiKey) -> HookResult {
        self.key_event("keysmith.key.validated", Severity::Info, key, None)
            .await
    }
    async fn validation_failed(&self, failure: Failure<'_>) -> HookResult {
        self.failure_event("keysmith.key.validation_failed", failure)
            .await
    }
    async fn key_rotated(&self, key: &ApiKey, rotation: &Rotation) -> HookResult {
        let severity = match rotation.reason {
            crate::model::RotationReason::Compromise => Severity::Critical,
            _ => Severity::Info,
        };
        let reason = Some(rotation.reason.as_str().to_owned());
        self.key_event("keysmith.key.rotated", severity, key, reason)
            .await
    }
    async fn key_revoked(&self, key: &ApiKey, reason: Option<&str>) -> HookResult {
        let reason = reason.map(str::to_owned);
        self.key_event("keysmith.key.revoked", Severity::Critical, key, reason)
            .await
    }
    async fn key_suspended(&self, key: &ApiKey) -> HookResult {
        self.key_event("keysmith.key.suspended", Severity::Warning, key, None)
            .await
    }
    async fn key_reactivated(&self, key: &ApiKey) -> HookResult {
        self.key_event("keysmith.key.reactivated", Severity::Info, key, None)
            .await
    }
    async fn key_expired(&self, key: &ApiKey) -> HookResult {
        self.key_event("keysmith.key.expired", Severity::Info, key, None)
            .await
    }
    async fn rotation_due(&self, key: &ApiKey, due_at: DateTime<Utc>) -> HookResult {
        let reason = Some(format!("due_at={}", due_at.to_rfc3339()));
        self.key_event("keysmith.key.rotation_due", Severity::Warning, key, reason)
            .await
    }
    async fn rate_limited(&self, key: &ApiKey) -> HookResult {
        let reason = Some("rate_limited".to_owned());
        self.key_event("keysmith.key.rate_limited", Severity::Warning, key, reason)
            .await
    }
    async fn quota_exceeded(&self, key: &ApiKey) -> HookResult {
        let reason = Some("quota_exceeded".to_owned());
        self.key_event(
            "keysmith.key.quota_exceeded",
            Severity::Warning,
            key,
            reason,
        )
        .await
    }
    async fn policy_created(&self, policy: &Policy) -> HookResult {
        self.policy_event("keysmith.policy.created", policy).await
    }
    async fn policy_updated(&self, policy: &Policy) -> HookResult {
        self.policy_event("keysmith.policy.updated", policy).await
    }
    async fn policy_deleted(&self, tenant: &Tenant, id: &PolicyId) -> HookResult {
        let event = self.event(
            "keysmith.policy.deleted",
            Outcome::Success,
            Severity::Warning,
            ("policy", Some(id.to_string())),
            Some((&tenant.app_id, &tenant.tenant_id)),
            None,
        );
        self.sink.record(event).await
    }
}
