//! The records Keysmith keeps: keys, rotations, scopes, and the tenant that
//! owns them. Policies live in [`crate::policy`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{KeyId, PolicyId, RotationId, ScopeId, UsageId};
use crate::secret::{Environment, SecretHash};

/// Free-form JSON object attached to keys and policies.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// Largest metadata object, serialized.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Most scopes one key may hold.
pub const MAX_SCOPES_PER_KEY: usize = 100;
/// Longest name (key, policy).
pub const MAX_NAME_LEN: usize = 255;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Largest page a list returns.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Page size when none is asked for.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// The owner of every record: an application and a tenant within it. Every
/// management call names one, and every query filters by both parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tenant {
    /// The application.
    pub app_id: String,
    /// The tenant within the application.
    pub tenant_id: String,
}

impl Tenant {
    /// Builds a tenant, checking both parts (1–128 chars of `[A-Za-z0-9_.:-]`).
    pub fn new(app_id: impl Into<String>, tenant_id: impl Into<String>) -> Result<Self> {
        let tenant = Self {
            app_id: app_id.into(),
            tenant_id: tenant_id.into(),
        };
        check_tenant_part("app_id", &tenant.app_id)?;
        check_tenant_part("tenant_id", &tenant.tenant_id)?;
        Ok(tenant)
    }
}

fn check_tenant_part(field: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_input(
            field,
            "must be 1-128 characters of [A-Za-z0-9_.:-]",
        ))
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app_id, self.tenant_id)
    }
}

/// The life-cycle state of a key.
///
/// Allowed moves: active → suspended → active, active|suspended → revoked,
/// active → expired (by time). Revoked and expired are terminal.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Usable.
    Active,
    /// Temporarily refused; can be reactivated.
    Suspended,
    /// Past its expiry; terminal.
    Expired,
    /// Revoked; terminal.
    Revoked,
}

impl KeyState {
    /// The name used in storage and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }

    /// Whether the key can never be used again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Expired | Self::Revoked)
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "active" => Self::Active,
            "suspended" => Self::Suspended,
            "expired" => Self::Expired,
            "revoked" => Self::Revoked,
            _ => {
                return Err(Error::invalid_input(
                    "state",
                    "must be active, suspended, expired or revoked",
                ));
            }
        })
    }
}

/// A change to a key's life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAction {
    /// active → suspended.
    Suspend,
    /// suspended → active.
    Reactivate,
    /// active | suspended → revoked.
    Revoke,
    /// active → expired (by time).
    Expire,
    /// A new secret for an active or suspended key (the state is kept).
    Rotate,
}

impl KeyAction {
    /// The states the action is allowed from.
    pub fn allowed_from(self) -> &'static [KeyState] {
        use KeyState::*;
        match self {
            Self::Suspend | Self::Expire => &[Active],
            Self::Reactivate => &[Suspended],
            Self::Revoke | Self::Rotate => &[Active, Suspended],
        }
    }

    /// The state the key ends in (`None`: unchanged).
    pub fn target(self) -> Option<KeyState> {
        match self {
            Self::Suspend => Some(KeyState::Suspended),
            Self::Reactivate => Some(KeyState::Active),
            Self::Revoke => Some(KeyState::Revoked),
            Self::Expire => Some(KeyState::Expired),
            Self::Rotate => None,
        }
    }

    /// Checks the action against the key's current state.
    pub fn check(self, from: KeyState) -> Result<()> {
        if self.allowed_from().contains(&from) {
            Ok(())
        } else {
            Err(Error::InvalidStateTransition { from, action: self })
        }
    }
}

impl fmt::Display for KeyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Suspend => "suspend",
            Self::Reactivate => "reactivate",
            Self::Revoke => "revoke",
            Self::Expire => "expire",
            Self::Rotate => "rotate",
        })
    }
}

/// An API key as stored: everything but the secret.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKey {
    /// Stable id (unchanged by rotation).
    pub id: KeyId,
    /// Owning application.
    pub app_id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Human name.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// The raw key's prefix (`sk`).
    pub prefix: String,
    /// Last four characters of the current secret.
    pub hint: String,
    /// SHA-256 of the current secret.
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub hash: SecretHash,
    /// Environment (`live`, `test`, …).
    pub environment: Environment,
    /// Life-cycle state.
    pub state: KeyState,
    /// Attached policy.
    pub policy_id: Option<PolicyId>,
    /// Granted scope names, sorted.
    pub scopes: Vec<String>,
    /// Free-form metadata.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: Metadata,
    /// Who created it (free text: a user id, a root key id).
    pub created_by: Option<String>,
    /// When it stops working.
    pub expires_at: Option<DateTime<Utc>>,
    /// Last successful validation (written behind, coalesced).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Last rotation.
    pub rotated_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl ApiKey {
    /// The tenant that owns the key.
    pub fn tenant(&self) -> Tenant {
        Tenant {
            app_id: self.app_id.clone(),
            tenant_id: self.tenant_id.clone(),
        }
    }

    /// Whether the key belongs to `tenant`.
    pub fn belongs_to(&self, tenant: &Tenant) -> bool {
        self.app_id == tenant.app_id && self.tenant_id == tenant.tenant_id
    }
}

/// Why a key was rotated.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationReason {
    /// Routine rotation on a schedule.
    Scheduled,
    /// Asked for by a person.
    #[default]
    Manual,
    /// The old secret leaked: no grace period unless one is given.
    Compromise,
    /// Required by the policy's rotation period.
    Policy,
}

impl RotationReason {
    /// The name used in storage and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Manual => "manual",
            Self::Compromise => "compromise",
            Self::Policy => "policy",
        }
    }
}

impl FromStr for RotationReason {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "scheduled" => Self::Scheduled,
            "manual" => Self::Manual,
            "compromise" => Self::Compromise,
            "policy" => Self::Policy,
            _ => {
                return Err(Error::invalid_input(
                    "reason",
                    "must be scheduled, manual, compromise or policy",
                ));
            }
        })
    }
}

/// A record of one rotation: which secret replaced which, and until when the
/// old one keeps working.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rotation {
    /// Record id.
    pub id: RotationId,
    /// The key rotated.
    pub key_id: KeyId,
    /// Owning application.
    pub app_id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Hash of the secret that was replaced.
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub old_hash: SecretHash,
    /// Hash of the secret that replaced it.
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub new_hash: SecretHash,
    /// Why.
    pub reason: RotationReason,
    /// Grace period granted to the old secret.
    #[serde(with = "crate::duration::serde_millis")]
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub grace_period: Duration,
    /// When the old secret stops working. A later rotation may bring this
    /// forward (never back): no old secret outlives a newer rotation's grace.
    pub grace_ends: DateTime<Utc>,
    /// Set by the grace sweep once `grace_ends` has passed.
    pub grace_ended: bool,
    /// Who rotated it.
    pub rotated_by: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A named scope of a tenant.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scope {
    /// Id.
    pub id: ScopeId,
    /// Owning application.
    pub app_id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Name (`read:users`), unique per tenant.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// Parent scope name (`read` for `read:users`).
    pub parent: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Paging: at most `limit` items after skipping `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    /// Items per page, 1–1000.
    pub limit: u32,
    /// Items to skip.
    pub offset: u64,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            limit: DEFAULT_PAGE_SIZE,
            offset: 0,
        }
    }
}

impl PageRequest {
    /// A page request, checked.
    pub fn new(limit: u32, offset: u64) -> Result<Self> {
        let page = Self { limit, offset };
        page.check()?;
        Ok(page)
    }

    /// Checks the bounds.
    pub fn check(&self) -> Result<()> {
        if self.limit == 0 || self.limit > MAX_PAGE_SIZE {
            return Err(Error::invalid_input("limit", "must be between 1 and 1000"));
        }
        if self.offset > i64::MAX as u64 {
            return Err(Error::invalid_input("offset", "is too large"));
        }
        Ok(())
    }
}

/// One page of a list, with the total number of matching items.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    /// The items, newest first.
    pub items: Vec<T>,
    /// How many items match in all.
    pub total: u64,
}

/// Longest [`KeyFilter::search`] text, in characters.
pub const MAX_SEARCH_LEN: usize = 100;

/// Filters for listing keys. Unset fields do not filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyFilter {
    /// Only keys in this state.
    pub state: Option<KeyState>,
    /// Only keys of this environment.
    pub environment: Option<Environment>,
    /// Only keys under this policy.
    pub policy_id: Option<PolicyId>,
    /// Only keys created by this principal.
    pub created_by: Option<String>,
    /// Only keys due for rotation at [`KeyFilter::now`]: active, not past
    /// their expiry, under a policy with a `rotation_period` that has passed
    /// since the key's last rotation (else its creation). See
    /// [`rotation_due_at`].
    pub rotation_due: bool,
    /// The instant `rotation_due` is judged at. The engine sets its clock's
    /// now when this is unset; a store asked for `rotation_due` without it
    /// refuses (`InvalidInput` naming `now`).
    pub now: Option<DateTime<Utc>>,
    /// Only keys whose name or hint contains this text, ignoring case (on
    /// SQLite, ASCII letters only). `%`, `_` and `\` match themselves. At most
    /// [`MAX_SEARCH_LEN`] characters, no control characters.
    pub search: Option<String>,
    /// Paging.
    pub page: PageRequest,
}

impl KeyFilter {
    /// Checks paging and the search text.
    pub fn check(&self) -> Result<()> {
        self.page.check()?;
        if let Some(search) = &self.search {
            if search.chars().count() > MAX_SEARCH_LEN {
                return Err(Error::invalid_input(
                    "search",
                    "must be at most 100 characters",
                ));
            }
            if search.chars().any(char::is_control) {
                return Err(Error::invalid_input(
                    "search",
                    "must not contain control characters",
                ));
            }
        }
        Ok(())
    }

    /// The instant to judge `rotation_due` at, when it is asked for.
    pub(crate) fn rotation_due_now(&self) -> Result<Option<DateTime<Utc>>> {
        match (self.rotation_due, self.now) {
            (false, _) => Ok(None),
            (true, Some(now)) => Ok(Some(now)),
            (true, None) => Err(Error::invalid_input(
                "now",
                "is needed to filter keys due for rotation",
            )),
        }
    }

    /// Whether `key` matches `search` (name or hint, ignoring case): what
    /// the SQL stores do with an escaped `LIKE`.
    pub(crate) fn search_matches(&self, key: &ApiKey) -> bool {
        let Some(search) = &self.search else {
            return true;
        };
        let needle = search.to_lowercase();
        key.name.to_lowercase().contains(&needle) || key.hint.to_lowercase().contains(&needle)
    }

    /// `search` as a `LIKE` pattern (`%text%`, escaped with `\`).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn search_pattern(&self) -> Option<String> {
        self.search
            .as_deref()
            .map(|s| format!("%{}%", escape_like(s)))
    }
}

/// Escapes `LIKE` wildcards (`%`, `_`) and the escape character `\` itself.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn escape_like(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A key whose policy's rotation period has passed, claimed for one notice.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationDue {
    /// The key.
    pub key: ApiKey,
    /// The instant this notice became due: the key's last rotation (else its
    /// creation) plus `n × rotation_period` for the latest `n ≥ 1` that has
    /// passed. `n > 1` when the key was left unrotated through whole periods:
    /// each period brings one notice, so the pair (key id, `due_at`) is unique.
    pub due_at: DateTime<Utc>,
}

/// When a key became due for rotation in the current period, if it is due at
/// `now`: `None` when the key is not active, is past its expiry, has no
/// rotation period, or `(rotated_at or created_at) + period` is after `now`.
/// Otherwise the latest `anchor + n × period` (n ≥ 1) at or before `now`.
pub fn rotation_due_at(
    key: &ApiKey,
    rotation_period: Option<Duration>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if key.state != KeyState::Active || key.expires_at.is_some_and(|e| e <= now) {
        return None;
    }
    let period = i64::try_from(rotation_period?.as_millis())
        .ok()?
        .checked_mul(1000)?;
    if period <= 0 {
        return None;
    }
    let anchor = key.rotated_at.unwrap_or(key.created_at);
    let elapsed = (now - anchor).num_microseconds()?;
    if elapsed < period {
        return None;
    }
    let due = elapsed / period * period;
    Some(anchor + chrono::Duration::microseconds(due))
}

/// One request made with a key, as recorded by the usage pipeline.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRecord {
    /// Record id.
    pub id: UsageId,
    /// The key used.
    pub key_id: KeyId,
    /// Owning application.
    pub app_id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Endpoint (route or path).
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Response status.
    pub status_code: u16,
    /// Client IP.
    pub ip: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Time to answer, in milliseconds.
    pub latency_ms: u64,
    /// Free-form metadata.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: Metadata,
    /// When the request was made.
    pub created_at: DateTime<Utc>,
}

/// The span an aggregate covers (UTC).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsagePeriod {
    /// A UTC day.
    Day,
    /// A UTC month.
    Month,
}

impl UsagePeriod {
    /// The name used in storage and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }
}

impl FromStr for UsagePeriod {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "day" => Ok(Self::Day),
            "month" => Ok(Self::Month),
            _ => Err(Error::invalid_input("period", "must be day or month")),
        }
    }
}

/// Usage of one key over one UTC day or month.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageAggregate {
    /// The key.
    pub key_id: KeyId,
    /// Owning application.
    pub app_id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// Day or month.
    pub period: UsagePeriod,
    /// First instant of the period.
    pub period_start: DateTime<Utc>,
    /// Requests.
    pub request_count: u64,
    /// Requests answered with a status of 400 or more.
    pub error_count: u64,
    /// Sum of latencies, in milliseconds.
    pub total_latency_ms: u64,
    /// Median latency, in milliseconds.
    pub p50_latency_ms: u64,
    /// 99th percentile latency, in milliseconds.
    pub p99_latency_ms: u64,
}

/// Filters for listing usage records. Unset fields do not filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageFilter {
    /// Only this key's records.
    pub key_id: Option<KeyId>,
    /// Only records created at or after this instant.
    pub after: Option<DateTime<Utc>>,
    /// Only records created before this instant.
    pub before: Option<DateTime<Utc>>,
    /// Paging.
    pub page: PageRequest,
}
