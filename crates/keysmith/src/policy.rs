//! Policies: the rules a key is held to, and their evaluation against a request.
//!
//! A policy's lists are parsed once, when the policy is built (a bad CIDR, origin
//! or path is refused at creation, naming the field), so evaluating a request is
//! a handful of comparisons with no allocation.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::duration;
use crate::error::{Error, Result};
use crate::id::PolicyId;
use crate::model::{MAX_DESCRIPTION_LEN, MAX_METADATA_BYTES, MAX_NAME_LEN, Metadata, Tenant};
use crate::ratelimit::local::Gcra;
use crate::ratelimit::{QuotaSpec, RateSpec};
use crate::scope;

/// Most entries in one allowlist of a policy.
pub const MAX_LIST_LEN: usize = 1000;

/// What a policy says, as written by its owner: the input for creating or
/// replacing a policy, and the stored form.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Name, unique per tenant.
    pub name: String,
    /// Optional description.
    #[serde(default)]
    pub description: Option<String>,
    /// Requests allowed per `rate_limit_window`.
    #[serde(default)]
    pub rate_limit: Option<u64>,
    /// Window of the rate limit (default one second).
    #[serde(default, with = "duration::serde_human::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "24h"))]
    pub rate_limit_window: Option<Duration>,
    /// Requests allowed in a burst above the steady rate.
    #[serde(default)]
    pub burst_limit: Option<u64>,
    /// Scopes keys under this policy may hold (empty: any).
    #[serde(default)]
    pub allowed_scopes: Vec<String>,
    /// Client IPs or CIDR ranges (empty: any).
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Origins, `scheme://host[:port]` or `https://*.example.com` (empty: any).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// HTTP methods (empty: any).
    #[serde(default)]
    pub allowed_methods: Vec<String>,
    /// Path prefixes (`/v1/users`) or globs (`/v1/*/items`) (empty: any).
    #[serde(default)]
    pub allowed_paths: Vec<String>,
    /// Longest lifetime a key under this policy may have.
    #[serde(default, with = "duration::serde_human::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "24h"))]
    pub max_key_lifetime: Option<Duration>,
    /// How often keys under this policy should be rotated.
    #[serde(default, with = "duration::serde_human::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "24h"))]
    pub rotation_period: Option<Duration>,
    /// Grace period for rotations that do not give one.
    #[serde(default, with = "duration::serde_human::option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "24h"))]
    pub grace_period: Option<Duration>,
    /// Successful validations allowed per UTC day.
    #[serde(default)]
    pub daily_quota: Option<u64>,
    /// Successful validations allowed per UTC month.
    #[serde(default)]
    pub monthly_quota: Option<u64>,
    /// Free-form metadata.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: Metadata,
}

/// A stored policy.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    /// Id.
    pub id: PolicyId,
    /// Owning application.
    pub app_id: String,
    /// Owning tenant.
    pub tenant_id: String,
    /// The rules as written.
    #[serde(flatten)]
    pub spec: PolicySpec,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    rules: Arc<Rules>,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.app_id == other.app_id
            && self.tenant_id == other.tenant_id
            && self.spec == other.spec
            && self.created_at == other.created_at
            && self.updated_at == other.updated_at
    }
}

impl Policy {
    /// Builds a policy from its parts, checking and compiling the spec.
    pub fn new(
        id: PolicyId,
        tenant: &Tenant,
        spec: PolicySpec,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    ) -> Result<Self> {
        let rules = Arc::new(Rules::compile(&spec)?);
        Ok(Self {
            id,
            app_id: tenant.app_id.clone(),
            tenant_id: tenant.tenant_id.clone(),
            spec,
            created_at,
            updated_at,
            rules,
        })
    }

    /// Its rate limit and quotas, worked out for validation.
    pub(crate) fn limits(&self) -> &Limits {
        &self.rules.limits
    }

    /// Whether the policy belongs to `tenant`.
    pub fn belongs_to(&self, tenant: &Tenant) -> bool {
        self.app_id == tenant.app_id && self.tenant_id == tenant.tenant_id
    }

    /// Checks a request against the policy's allowlists, in the order ip,
    /// origin, method, path, scopes; the first failure is returned. A policy
    /// that restricts an attribute refuses a request that does not carry it.
    pub fn evaluate(&self, request: &RequestContext, granted_scopes: &[String]) -> Result<()> {
        let rules = &*self.rules;
        if !rules.ips.is_empty() {
            let ip = request.ip.map(|ip| ip.to_canonical());
            if !ip.is_some_and(|ip| rules.ips.iter().any(|net| net.contains(&ip))) {
                return Err(Error::IpNotAllowed);
            }
        }
        if !rules.origins.is_empty() {
            let origin = request.origin.as_deref().and_then(Origin::parse);
            if !origin.is_some_and(|o| rules.origins.iter().any(|p| p.matches(&o))) {
                return Err(Error::OriginNotAllowed);
            }
        }
        if !rules.methods.is_empty() {
            let method = request.method.as_deref();
            if !method.is_some_and(|m| rules.methods.iter().any(|a| a.eq_ignore_ascii_case(m))) {
                return Err(Error::MethodNotAllowed);
            }
        }
        if !rules.paths.is_empty() {
            let path = request.path.as_deref().and_then(clean_path);
            if !path.is_some_and(|p| rules.paths.iter().any(|pat| pat.matches(p))) {
                return Err(Error::PathNotAllowed);
            }
        }
        for required in &request.required_scopes {
            let held = scope::any_grants(granted_scopes, required);
            let allowed = self.spec.allowed_scopes.is_empty()
                || scope::any_grants(&self.spec.allowed_scopes, required);
            if !(held && allowed) {
                return Err(Error::InsufficientScope {
                    missing: required.clone(),
                });
            }
        }
        Ok(())
    }

    /// Refuses scopes the policy does not allow a key to hold.
    pub fn check_scopes_allowed<S: AsRef<str>>(&self, scopes: &[S]) -> Result<()> {
        if self.spec.allowed_scopes.is_empty() {
            return Ok(());
        }
        for s in scopes {
            let s = s.as_ref();
            if !scope::any_grants(&self.spec.allowed_scopes, s) {
                return Err(Error::ScopeNotAllowed {
                    scope: s.to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// The request a key is presented with. Every field is optional; an absent
/// field fails any policy that restricts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// Client IP.
    pub ip: Option<IpAddr>,
    /// `Origin` header.
    pub origin: Option<String>,
    /// HTTP method.
    pub method: Option<String>,
    /// Request path (a query string is ignored).
    pub path: Option<String>,
    /// Scopes the caller requires the key to hold.
    pub required_scopes: Vec<String>,
    /// The tenant the key must belong to; another tenant's key is `InvalidKey`.
    pub expected_tenant: Option<Tenant>,
    /// Units of quota this request consumes (default 1).
    pub cost: u64,
}

impl Default for RequestContext {
    fn default() -> Self {
        Self {
            ip: None,
            origin: None,
            method: None,
            path: None,
            required_scopes: Vec::new(),
            expected_tenant: None,
            cost: 1,
        }
    }
}

/// The compiled allowlists of a policy.
#[derive(Debug, Default)]
struct Rules {
    ips: Vec<IpNet>,
    origins: Vec<OriginPattern>,
    methods: Vec<String>,
    paths: Vec<PathPattern>,
    limits: Limits,
}

/// What validation's steps 6 (rate limit) and 7 (quota) need of a policy,
/// worked out once when the policy is built rather than at every validation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Limits {
    /// The rate limit, as written and as GCRA counts it.
    pub(crate) rate: Option<(RateSpec, Gcra)>,
    /// The quotas.
    pub(crate) quota: Option<QuotaSpec>,
}

impl Limits {
    fn of(spec: &PolicySpec) -> Result<Self> {
        let rate = match RateSpec::of(spec) {
            Some(rate) => Some((rate, Gcra::of(&rate)?)),
            None => None,
        };
        Ok(Self {
            rate,
            quota: QuotaSpec::of(spec),
        })
    }

    /// Whether the policy sets a rate limit or a quota.
    pub(crate) fn any(&self) -> bool {
        self.rate.is_some() || self.quota.is_some()
    }
}

impl Rules {
    fn compile(spec: &PolicySpec) -> Result<Self> {
        check_spec(spec)?;
        Ok(Self {
            ips: compile_list("allowed_ips", &spec.allowed_ips, parse_ip_range)?,
            origins: compile_list(
                "allowed_origins",
                &spec.allowed_origins,
                OriginPattern::parse,
            )?,
            methods: compile_list("allowed_methods", &spec.allowed_methods, parse_method)?,
            paths: compile_list("allowed_paths", &spec.allowed_paths, PathPattern::parse)?,
            limits: Limits::of(spec)?,
        })
    }
}

fn compile_list<T>(
    field: &str,
    items: &[String],
    parse: impl Fn(&str) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    if items.len() > MAX_LIST_LEN {
        return Err(Error::invalid_input(
            field,
            format!("at most {MAX_LIST_LEN} entries"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            parse(item.trim()).map_err(|reason| {
                Error::invalid_input(format!("{field}[{i}]"), format!("`{item}`: {reason}"))
            })
        })
        .collect()
}

fn check_spec(spec: &PolicySpec) -> Result<()> {
    check_name("name", &spec.name)?;
    check_description(spec.description.as_deref())?;
    check_metadata(&spec.metadata)?;
    if spec.rate_limit == Some(0) {
        return Err(Error::invalid_input("rate_limit", "must be at least 1"));
    }
    if spec.rate_limit_window.is_some_and(|w| w.is_zero()) {
        return Err(Error::invalid_input(
            "rate_limit_window",
            "must be longer than 0",
        ));
    }
    if spec.rate_limit.is_none() && (spec.rate_limit_window.is_some() || spec.burst_limit.is_some())
    {
        return Err(Error::invalid_input(
            "rate_limit",
            "is required when rate_limit_window or burst_limit is set",
        ));
    }
    if spec.burst_limit == Some(0) {
        return Err(Error::invalid_input("burst_limit", "must be at least 1"));
    }
    for (field, value) in [
        ("max_key_lifetime", spec.max_key_lifetime),
        ("rotation_period", spec.rotation_period),
    ] {
        if value.is_some_and(|d| d.is_zero()) {
            return Err(Error::invalid_input(field, "must be longer than 0"));
        }
    }
    for (field, value) in [
        ("rate_limit_window", spec.rate_limit_window),
        ("max_key_lifetime", spec.max_key_lifetime),
        ("rotation_period", spec.rotation_period),
        ("grace_period", spec.grace_period),
    ] {
        if value.is_some_and(|d| d > duration::MAX) {
            return Err(Error::invalid_input(field, "must be at most 100 years"));
        }
    }
    for (field, value) in [
        ("daily_quota", spec.daily_quota),
        ("monthly_quota", spec.monthly_quota),
    ] {
        if value.is_some_and(|q| q > i64::MAX as u64) {
            return Err(Error::invalid_input(field, "is too large"));
        }
    }
    if spec.allowed_scopes.len() > MAX_LIST_LEN {
        return Err(Error::invalid_input(
            "allowed_scopes",
            "at most 1000 entries",
        ));
    }
    for (i, s) in spec.allowed_scopes.iter().enumerate() {
        scope::validate_scope_name(&format!("allowed_scopes[{i}]"), s)?;
    }
    Ok(())
}

/// Checks a record name (key, policy).
pub(crate) fn check_name(field: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::invalid_input(
            field,
            "must be 1-255 characters without control characters",
        ));
    }
    Ok(())
}

/// Checks a description.
pub(crate) fn check_description(description: Option<&str>) -> Result<()> {
    if description.is_some_and(|d| d.len() > MAX_DESCRIPTION_LEN) {
        return Err(Error::invalid_input(
            "description",
            "must be at most 1024 characters",
        ));
    }
    if description.is_some_and(|d| d.contains('\0')) {
        return Err(Error::invalid_input(
            "description",
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

/// Checks the size of a metadata object.
pub(crate) fn check_metadata(metadata: &Metadata) -> Result<()> {
    let json = serde_json::to_string(metadata).unwrap_or_default();
    if json.len() > MAX_METADATA_BYTES {
        return Err(Error::invalid_input(
            "metadata",
            "must be at most 16 KiB as JSON",
        ));
    }
    // No database keeps NUL in text: refuse it here, the same on every store.
    if json.contains("\\u0000") {
        return Err(Error::invalid_input(
            "metadata",
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

fn parse_ip_range(s: &str) -> std::result::Result<IpNet, String> {
    if s.contains('/') {
        let net: IpNet = s.parse().map_err(|_| "not a valid CIDR range".to_owned())?;
        // An IPv4-mapped IPv6 range is kept as the IPv4 range it means, since
        // request IPs are canonicalised the same way.
        Ok(match net {
            IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 => {
                let v4 = v6.addr().to_ipv4_mapped().expect("checked above");
                IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).expect("prefix in range")
            }
            other => other,
        })
    } else {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| "not a valid IP address or CIDR".to_owned())?;
        Ok(IpNet::from(ip.to_canonical()))
    }
}

fn parse_method(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err("not an HTTP method".into());
    }
    Ok(s.to_ascii_uppercase())
}

/// A request origin, borrowed from the header.
#[derive(Debug, Clone, Copy)]
struct Origin<'a> {
    scheme: &'a str,
    host: &'a str,
    port: Option<u16>,
}

impl<'a> Origin<'a> {
    /// Parses `scheme://host[:port]`. `null` and anything with a path, query or
    /// user info is not an origin.
    fn parse(s: &'a str) -> Option<Self> {
        let colon = s.bytes().position(|b| b == b':')?;
        let (scheme, rest) = (&s[..colon], s[colon + 1..].strip_prefix("//")?);
        if scheme.is_empty()
            || !scheme.bytes().next()?.is_ascii_alphabetic()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            return None;
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6.split_once(']')?;
            addr.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (&rest[..addr.len() + 2], port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && (host.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.')));
        if !host_ok {
            return None;
        }
        let explicit = match port {
            Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
                Some(p.parse::<u16>().ok()?)
            }
            Some(_) => return None,
            None => None,
        };
        let port = explicit.or_else(|| default_port(scheme));
        Some(Self { scheme, host, port })
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
        Some(443)
    } else if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws") {
        Some(80)
    } else {
        None
    }
}

/// An allowed origin: exact, or any subdomain of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginPattern {
    scheme: String,
    /// Lowercase host, or for a wildcard the suffix including its leading dot.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl OriginPattern {
    fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.strip_suffix('/').unwrap_or(s);
        if s.eq_ignore_ascii_case("null") {
            return Err("`null` is never an allowed origin".into());
        }
        let (wildcard, probe) = match s.split_once("://*.") {
            Some((scheme, rest)) => (true, format!("{scheme}://x.{rest}")),
            None => (false, s.to_owned()),
        };
        let origin = Origin::parse(&probe).ok_or("expected scheme://host[:port]")?;
        let host = origin.host.to_ascii_lowercase();
        let host = if wildcard {
            let suffix = host
                .strip_prefix('x')
                .expect("probe starts with x")
                .to_owned();
            if suffix.len() < 2 || suffix.starts_with("..") || host.starts_with("x.[") {
                return Err("a wildcard needs a domain after `*.`".into());
            }
            suffix
        } else {
            host
        };
        Ok(Self {
            scheme: origin.scheme.to_ascii_lowercase(),
            host,
            wildcard,
            port: origin.port,
        })
    }

    fn matches(&self, origin: &Origin<'_>) -> bool {
        if !origin.scheme.eq_ignore_ascii_case(&self.scheme) || origin.port != self.port {
            return false;
        }
        if self.wildcard {
            let host = origin.host.as_bytes();
            let suffix = self.host.as_bytes();
            host.len() > suffix.len()
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && host[0] != b'.'
        } else {
            origin.host.eq_ignore_ascii_case(&self.host)
        }
    }
}

/// An allowed path: a prefix on segment boundaries, or a glob.
#[derive(Debug, Clone)]
enum PathPattern {
    Prefix(String),
    Glob(glob::Pattern),
}

const GLOB_OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl PathPattern {
    fn parse(s: &str) -> std::result::Result<Self, String> {
        if !s.starts_with('/') {
            return Err("must start with `/`".into());
        }
        if s.len() > 1024 {
            return Err("must be at most 1024 characters".into());
        }
        if s.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        if s.contains(['*', '?', '[']) {
            let pattern = glob::Pattern::new(s).map_err(|e| format!("bad glob: {}", e.msg))?;
            Ok(Self::Glob(pattern))
        } else {
            Ok(Self::Prefix(s.to_owned()))
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Prefix(prefix) => {
                path.starts_with(prefix.as_str())
                    && (path.len() == prefix.len()
                        || prefix.ends_with('/')
                        || path.as_bytes()[prefix.len()] == b'/')
            }
            Self::Glob(pattern) => pattern.matches_with(path, GLOB_OPTIONS),
        }
    }
}

/// Strips the query string and refuses paths with dot segments, which could
/// otherwise walk out of an allowed prefix (`/public/../admin`).
fn clean_path(path: &str) -> Option<&str> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    if !path.starts_with('/') || path.split('/').any(|seg| seg == ".." || seg == ".") {
        return None;
    }
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: PolicySpec) -> Result<Policy> {
        let now = Utc::now();
        Policy::new(
            PolicyId::new(),
            &Tenant::new("app", "t").unwrap(),
            spec,
            now,
            now,
        )
    }

    fn named(f: impl FnOnce(&mut PolicySpec)) -> PolicySpec {
        let mut spec = PolicySpec {
            name: "p".into(),
            ..Default::default()
        };
        f(&mut spec);
        spec
    }

    fn ctx(f: impl FnOnce(&mut RequestContext)) -> RequestContext {
        let mut c = RequestContext::default();
        f(&mut c);
        c
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidInput { field, .. } => field,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn cidr_table() {
        let p = policy(named(|s| {
            s.allowed_ips = vec![
                "10.0.0.0/8".into(),
                "192.168.1.7".into(),
                "2001:db8::/32".into(),
                "::ffff:172.16.0.0/108".into(),
            ]
        }))
        .unwrap();
        let table = [
            ("10.1.2.3", true),
            ("11.0.0.1", false),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("2001:db8::1", true),
            ("2001:db9::1", false),
            ("::ffff:10.9.9.9", true), // IPv4-mapped IPv6 against a v4 range
            ("::ffff:11.0.0.1", false),
            ("172.16.5.5", true), // v4 against a mapped-v6 range
            ("172.32.0.1", false),
        ];
        for (ip, ok) in table {
            let c = ctx(|c| c.ip = Some(ip.parse().unwrap()));
            assert_eq!(p.evaluate(&c, &[]).is_ok(), ok, "{ip}");
            if !ok {
                assert!(matches!(p.evaluate(&c, &[]), Err(Error::IpNotAllowed)));
            }
        }
        assert!(matches!(
            p.evaluate(&RequestContext::default(), &[]),
            Err(Error::IpNotAllowed)
        ));
    }

    #[test]
    fn bad_cidrs_are_refused_naming_the_entry() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "garbage",
            "10.0.0",
            "",
            "1.2.3.4/-1",
        ] {
            let err = policy(named(|s| {
                s.allowed_ips = vec!["10.0.0.0/8".into(), bad.into()]
            }))
            .unwrap_err();
            assert_eq!(field_of(err), "allowed_ips[1]", "{bad}");
        }
    }

    #[test]
    fn origin_table() {
        let p = policy(named(|s| {
            s.allowed_origins = vec![
                "https://app.example.com".into(),
                "https://*.example.com".into(),
                "http://localhost:3000".into(),
                "HTTPS://Upper.Example.ORG:443/".into(),
            ]
        }))
        .unwrap();
        let table = [
            ("https://app.example.com", true),
            ("https://APP.example.com:443", true),
            ("https://a.example.com", true),
            ("https://a.b.example.com", true),
            ("https://example.com", false),
            ("https://evil-example.com", false),
            ("https://example.com.evil.com", false),
            ("http://a.example.com", false),
            ("https://a.example.com:8443", false),
            ("http://localhost:3000", true),
            ("http://localhost", false),
            ("https://upper.example.org", true),
            ("null", false),
            ("", false),
            ("https://a.example.com/path", false),
            ("https://user@a.example.com", false),
            ("https://.example.com", false),
        ];
        for (origin, ok) in table {
            let c = ctx(|c| c.origin = Some(origin.into()));
            let result = p.evaluate(&c, &[]);
            assert_eq!(result.is_ok(), ok, "{origin}");
            if !ok {
                assert!(matches!(result, Err(Error::OriginNotAllowed)), "{origin}");
            }
        }
        for bad in [
            "null",
            "example.com",
            "https://",
            "https://*.",
            "https://a b.com",
            "*",
        ] {
            let err = policy(named(|s| s.allowed_origins = vec![bad.into()])).unwrap_err();
            assert_eq!(field_of(err), "allowed_origins[0]", "{bad}");
        }
    }

    #[test]
    fn methods_are_case_insensitive() {
        let p = policy(named(|s| {
            s.allowed_methods = vec!["get".into(), "POST".into()]
        }))
        .unwrap();
        for (method, ok) in [
            ("GET", true),
            ("get", true),
            ("Post", true),
            ("DELETE", false),
        ] {
            let c = ctx(|c| c.method = Some(method.into()));
            assert_eq!(p.evaluate(&c, &[]).is_ok(), ok, "{method}");
        }
        assert!(matches!(
            p.evaluate(&ctx(|_| {}), &[]),
            Err(Error::MethodNotAllowed)
        ));
        let err = policy(named(|s| s.allowed_methods = vec!["GE T".into()])).unwrap_err();
        assert_eq!(field_of(err), "allowed_methods[0]");
    }

    #[test]
    fn path_table() {
        let p = policy(named(|s| {
            s.allowed_paths = vec![
                "/v1/users".into(),
                "/static/".into(),
                "/v2/*/items".into(),
                "/files/**/*.png".into(),
            ]
        }))
        .unwrap();
        let table = [
            ("/v1/users", true),
            ("/v1/users/42", true),
            ("/v1/users?x=1", true),
            ("/v1/usersx", false),
            ("/v1/user", false),
            ("/static/app.js", true),
            ("/v2/abc/items", true),
            ("/v2/a/b/items", false),
            ("/files/a/b/c.png", true),
            ("/v1/users/../admin", false),
            ("/admin", false),
            ("v1/users", false),
        ];
        for (path, ok) in table {
            let c = ctx(|c| c.path = Some(path.into()));
            let result = p.evaluate(&c, &[]);
            assert_eq!(result.is_ok(), ok, "{path}");
            if !ok {
                assert!(matches!(result, Err(Error::PathNotAllowed)));
            }
        }
        for bad in ["users", "/a/[", ""] {
            let err = policy(named(|s| s.allowed_paths = vec![bad.into()])).unwrap_err();
            assert_eq!(field_of(err), "allowed_paths[0]", "{bad}");
        }
    }

    #[test]
    fn evaluation_order_is_ip_origin_method_path_scopes() {
        let p = policy(named(|s| {
            s.allowed_ips = vec!["10.0.0.0/8".into()];
            s.allowed_origins = vec!["https://a.com".into()];
            s.allowed_methods = vec!["GET".into()];
            s.allowed_paths = vec!["/ok".into()];
        }))
        .unwrap();
        let mut c = RequestContext {
            required_scopes: vec!["admin".into()],
            ..Default::default()
        };
        assert!(matches!(p.evaluate(&c, &[]), Err(Error::IpNotAllowed)));
        c.ip = Some("10.0.0.1".parse().unwrap());
        assert!(matches!(p.evaluate(&c, &[]), Err(Error::OriginNotAllowed)));
        c.origin = Some("https://a.com".into());
        assert!(matches!(p.evaluate(&c, &[]), Err(Error::MethodNotAllowed)));
        c.method = Some("GET".into());
        assert!(matches!(p.evaluate(&c, &[]), Err(Error::PathNotAllowed)));
        c.path = Some("/ok".into());
        assert!(
            matches!(p.evaluate(&c, &[]), Err(Error::InsufficientScope { ref missing }) if missing == "admin")
        );
        assert!(p.evaluate(&c, &["admin".into()]).is_ok());
    }

    #[test]
    fn allowed_scopes_cap_what_keys_hold_and_use() {
        let p = policy(named(|s| s.allowed_scopes = vec!["read".into()])).unwrap();
        p.check_scopes_allowed(&["read", "read:users"]).unwrap();
        assert!(matches!(
            p.check_scopes_allowed(&["read", "write"]),
            Err(Error::ScopeNotAllowed { scope }) if scope == "write"
        ));
        // A key that somehow holds `write` still cannot use it under this policy.
        let c = RequestContext {
            required_scopes: vec!["write".into()],
            ..Default::default()
        };
        assert!(p.evaluate(&c, &["write".into()]).is_err());
    }

    #[test]
    fn spec_values_are_checked() {
        let cases: Vec<(PolicySpec, &str)> = vec![
            (named(|s| s.name = " ".into()), "name"),
            (named(|s| s.rate_limit = Some(0)), "rate_limit"),
            (named(|s| s.burst_limit = Some(5)), "rate_limit"),
            (
                named(|s| {
                    s.rate_limit = Some(5);
                    s.rate_limit_window = Some(Duration::ZERO)
                }),
                "rate_limit_window",
            ),
            (
                named(|s| s.max_key_lifetime = Some(Duration::ZERO)),
                "max_key_lifetime",
            ),
            (
                named(|s| s.allowed_scopes = vec!["bad scope".into()]),
                "allowed_scopes[0]",
            ),
            (
                named(|s| {
                    s.metadata.insert("k".into(), "x".repeat(17 * 1024).into());
                }),
                "metadata",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(field_of(policy(spec).unwrap_err()), field);
        }
    }

    #[test]
    fn spec_json_uses_duration_strings_and_refuses_unknown_fields() {
        let spec: PolicySpec = serde_json::from_str(
            r#"{"name":"p","rate_limit":10,"rate_limit_window":"1m","max_key_lifetime":"90d"}"#,
        )
        .unwrap();
        assert_eq!(spec.rate_limit_window, Some(Duration::from_secs(60)));
        assert_eq!(
            spec.max_key_lifetime,
            Some(Duration::from_secs(90 * 86_400))
        );
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["max_key_lifetime"], "90d");
        assert!(serde_json::from_str::<PolicySpec>(r#"{"name":"p","nope":1}"#).is_err());
        assert!(
            serde_json::from_str::<PolicySpec>(r#"{"name":"p","grace_period":"soon"}"#).is_err()
        );
        assert!(serde_json::from_str::<PolicySpec>(r#"{"name":"p","daily_quota":-1}"#).is_err());
    }
}
