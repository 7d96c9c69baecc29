//! The metrics hook: counters through the `metrics` crate, for whatever
//! recorder the application installed (Prometheus in the server).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use metrics::counter;

use super::{Failure, Hook, HookResult};
use crate::id::PolicyId;
use crate::model::{ApiKey, Rotation, Tenant};
use crate::policy::Policy;

/// Counts lifecycle events:
/// `keysmith_keys_created_total`, `keysmith_key_create_failures_total`,
/// `keysmith_validations_total{outcome}` (`valid` or an error code),
/// `keysmith_keys_rotated_total{reason}`, `keysmith_rotation_due_total`,
/// `keysmith_key_state_changes_total{to}`,
/// `keysmith_policy_changes_total{action}`.
#[derive(Debug, Default, Clone, Copy)]
pub struct MetricsHook;

#[async_trait]
impl Hook for MetricsHook {
    fn name(&self) -> &str {
        "metrics"
    }
    async fn key_created(&self, _key: &ApiKey) -> HookResult {
        counter!("keysmith_keys_created_total").increment(1);
        Ok(())
    }
    async fn key_create_failed(&self, failure: Failure<'_>) -> HookResult {
        counter!("keysmith_key_create_failures_total", "code" => failure.error.code()).increment(1);
        Ok(())
    }
    async fn key_validated(&self, _key: &ApiKey) -> HookResult {
        counter!("keysmith_validations_total", "outcome" => "valid").increment(1);
        Ok(())
    }
    async fn validation_failed(&self, failure: Failure<'_>) -> HookResult {
        counter!("keysmith_validations_total", "outcome" => failure.error.code()).increment(1);
        Ok(())
    }
    async fn key_rotated(&self, _key: &ApiKey, rotation: &Rotation) -> HookResult {
        counter!("keysmith_keys_rotated_total", "reason" => rotation.reason.as_str()).increment(1);
        Ok(())
    }
    async fn rotation_due(&self, _key: &ApiKey, _due_at: DateTime<Utc>) -> HookResult {
        counter!("keysmith_rotation_due_total").increment(1);
        Ok(())
    }
    async fn key_revoked(&self, _key: &ApiKey, _reason: Option<&str>) -> HookResult {
        counter!("keysmith_key_state_changes_total", "to" => "revoked").increment(1);
        Ok(())
    }
    async fn key_suspended(&self, _key: &ApiKey) -> HookResult {
        counter!("keysmith_key_state_changes_total", "to" => "suspended").increment(1);
        Ok(())
    }
    async fn key_reactivated(&self, _key: &ApiKey) -> HookResult {
        counter!("keysmith_key_state_changes_total", "to" => "active").increment(1);
        Ok(())
    }
    async fn key_expired(&self, _key: &ApiKey) -> HookResult {
        counter!("keysmith_key_state_changes_total", "to" => "expired").increment(1);
        Ok(())
    }
    async fn rate_limited(&self, _key: &ApiKey) -> HookResult {
        counter!("keysmith_validations_total", "outcome" => "rate_limited").increment(1);
        Ok(())
    }
    async fn quota_exceeded(&self, _key: &ApiKey) -> HookResult {
        counter!("keysmith_validations_total", "outcome" => "quota_exceeded").increment(1);
        Ok(())
    }
    async fn policy_created(&self, _policy: &Policy) -> HookResult {
        counter!("keysmith_policy_changes_total", "action" => "created").increment(1);
        Ok(())
    }
    async fn policy_updated(&self, _policy: &Policy) -> HookResult {
        counter!("keysmith_policy_changes_total", "action" => "updated").increment(1);
        Ok(())
    }
    async fn policy_deleted(&self, _tenant: &Tenant, _id: &PolicyId) -> HookResult {
        counter!("keysmith_policy_changes_total", "action" => "deleted").increment(1);
        Ok(())
    }
}
