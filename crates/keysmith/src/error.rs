//! The one public error type.
//!
//! Each variant is an outcome a caller may act on. Validation outcomes carry no
//! secret: no variant ever holds a raw key.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::model::{KeyAction, KeyState};

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of record an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResourceKind {
    /// An API key.
    Key,
    /// A policy.
    Policy,
    /// A scope.
    Scope,
    /// A rotation record.
    Rotation,
    /// A usage record.
    Usage,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Key => "key",
            Self::Policy => "policy",
            Self::Scope => "scope",
            Self::Rotation => "rotation",
            Self::Usage => "usage record",
        })
    }
}

/// Everything that can go wrong in Keysmith.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The raw key is malformed, fails its checksum, is unknown, or belongs to
    /// another tenant than the one expected.
    #[error("invalid API key")]
    InvalidKey,
    /// The key was revoked.
    #[error("API key has been revoked")]
    KeyRevoked,
    /// The key is suspended.
    #[error("API key is suspended")]
    KeySuspended,
    /// The key is past its expiry.
    #[error("API key has expired")]
    KeyExpired,
    /// The secret was replaced by a rotation and its grace period is over.
    #[error("API key was rotated and its grace period has ended")]
    KeyRotated,
    /// The client IP is not in the policy's allowed ranges.
    #[error("client IP is not allowed by the key's policy")]
    IpNotAllowed,
    /// The request origin is not allowed by the policy.
    #[error("request origin is not allowed by the key's policy")]
    OriginNotAllowed,
    /// The HTTP method is not allowed by the policy.
    #[error("HTTP method is not allowed by the key's policy")]
    MethodNotAllowed,
    /// The request path is not allowed by the policy.
    #[error("request path is not allowed by the key's policy")]
    PathNotAllowed,
    /// The key lacks a required scope.
    #[error("API key lacks the required scope `{missing}`")]
    InsufficientScope {
        /// The first required scope that no granted scope satisfies.
        missing: String,
    },
    /// The key's rate limit is exhausted.
    #[error("rate limit exceeded; retry after {retry_after:?}")]
    RateLimited {
        /// How long until a request would be allowed.
        retry_after: Duration,
        /// The limit's state, for `RateLimit-*` headers.
        state: crate::ratelimit::RateLimitState,
    },
    /// The key's daily or monthly quota is used up.
    #[error("quota exceeded; resets at {resets_at}")]
    QuotaExceeded {
        /// When the quota that was hit starts again.
        resets_at: DateTime<Utc>,
    },
    /// No such record in the caller's tenant.
    #[error("{0} not found")]
    NotFound(ResourceKind),
    /// A record with the same unique value already exists.
    #[error("{kind} with this {field} already exists")]
    AlreadyExists {
        /// The kind of record.
        kind: ResourceKind,
        /// The unique field that clashed (`name`, `id`, `hash`).
        field: &'static str,
    },
    /// The key's state does not allow the requested change.
    #[error("cannot {action} a key that is {from}")]
    InvalidStateTransition {
        /// The key's current state.
        from: KeyState,
        /// What was asked.
        action: KeyAction,
    },
    /// The policy is still attached to keys.
    #[error("policy is in use by {keys} key(s)")]
    PolicyInUse {
        /// How many keys use it.
        keys: u64,
    },
    /// The key's policy does not allow this scope.
    #[error("scope `{scope}` is not allowed by the key's policy")]
    ScopeNotAllowed {
        /// The scope that was refused.
        scope: String,
    },
    /// Bad input, naming the field.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The field (`name`, `allowed_ips[2]`, …).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bounded queue had no room: nothing was taken; retry later.
    #[error("the {0} queue is full; retry later")]
    QueueFull(&'static str),
    /// The storage backend failed; the operation did not happen (or, for a
    /// commit whose outcome is unknown, may have).
    #[error("store error: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid_input(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Wraps a backend error.
    pub fn store(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Store(Box::new(source))
    }

    /// A stable snake_case code for APIs, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidKey => "invalid_key",
            Self::KeyRevoked => "revoked",
            Self::KeySuspended => "suspended",
            Self::KeyExpired => "expired",
            Self::KeyRotated => "rotated",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PathNotAllowed => "path_not_allowed",
            Self::InsufficientScope { .. } => "insufficient_scope",
            Self::RateLimited { .. } => "rate_limited",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::NotFound(_) => "not_found",
            Self::AlreadyExists { .. } => "already_exists",
            Self::InvalidStateTransition { .. } => "invalid_state_transition",
            Self::PolicyInUse { .. } => "policy_in_use",
            Self::ScopeNotAllowed { .. } => "scope_not_allowed",
            Self::InvalidInput { .. } => "invalid_input",
            Self::QueueFull(_) => "queue_full",
            Self::Store(_) => "store_unavailable",
        }
    }

    /// Whether this error is a refusal of a key at validation (as opposed to a
    /// management error or a store failure).
    pub fn is_validation_denial(&self) -> bool {
        matches!(
            self,
            Self::InvalidKey
                | Self::KeyRevoked
                | Self::KeySuspended
                | Self::KeyExpired
                | Self::KeyRotated
                | Self::IpNotAllowed
                | Self::OriginNotAllowed
                | Self::MethodNotAllowed
                | Self::PathNotAllowed
                | Self::InsufficientScope { .. }
                | Self::RateLimited { .. }
                | Self::QuotaExceeded { .. }
        )
    }
}
