//! Protecting an axum (tower) service with Keysmith in one line:
//!
//! ```text
//! let app = Router::new()
//!     .route("/orders", get(list_orders))
//!     .layer(RequireScopesLayer::new(["read:orders"]))
//!     .layer(KeysmithLayer::new(engine));
//! ```
//!
//! [`KeysmithLayer`] takes the key from `Authorization: Bearer …` or
//! `X-API-Key` (configurable), builds the request context (client IP from the
//! socket, or from `X-Forwarded-For` / `Forwarded` only when the peer is a
//! trusted proxy; `Origin`; method; path), validates, and puts the result in
//! the request's extensions for the [`Authenticated`] extractor. Answers: one
//! uniform 401 for every key failure (nobody learns whether a key exists), 403
//! for policy denials, 429 with `Retry-After` and `RateLimit-*` headers, 503
//! when the store cannot answer (never a pass). A key in the query string is
//! refused.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use ipnet::IpNet;
use tower::{Layer, Service};

use crate::engine::{Engine, Validation};
use crate::error::Error;
use crate::model::Tenant;
use crate::policy::RequestContext;
use crate::usage::{RequestUsage, UsageSink};

/// Longest header value read as a key (a raw key is under 100 bytes).
const MAX_KEY_HEADER: usize = 256;

#[derive(Debug)]
struct Settings {
    engine: Engine,
    headers: Vec<HeaderName>,
    trusted_proxies: Vec<IpNet>,
    tenant: Option<Tenant>,
    usage: Option<UsageSink>,
}

/// The layer that validates every request's API key.
#[derive(Debug, Clone)]
pub struct KeysmithLayer {
    settings: Arc<Settings>,
}

impl KeysmithLayer {
    /// Validates with `engine`, reading `Authorization: Bearer` and `X-API-Key`.
    pub fn new(engine: Engine) -> Self {
        let settings = Settings {
            engine,
            headers: vec![
                http::header::AUTHORIZATION,
                HeaderName::from_static("x-api-key"),
            ],
            trusted_proxies: Vec::new(),
            tenant: None,
            usage: None,
        };
        Self {
            settings: Arc::new(settings),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = Settings {
            engine: self.settings.engine.clone(),
            headers: self.settings.headers.clone(),
            trusted_proxies: self.settings.trusted_proxies.clone(),
            tenant: self.settings.tenant.clone(),
            usage: self.settings.usage.clone(),
        };
        change(&mut settings);
        self.settings = Arc::new(settings);
        self
    }

    /// Reads the key from these headers, in order (`Authorization` is read as
    /// `Bearer <key>`, any other header as the bare key).
    pub fn headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names = names.into_iter().collect();
        self.with(|s| s.headers = names)
    }

    /// Believes `X-Forwarded-For` / `Forwarded` only from peers in these ranges.
    pub fn trusted_proxies(self, ranges: impl IntoIterator<Item = IpNet>) -> Self {
        let ranges = ranges.into_iter().collect();
        self.with(|s| s.trusted_proxies = ranges)
    }

    /// Records every request that passes into `sink` after its response
    /// (status, latency, endpoint, method, IP, user agent), without waiting.
    pub fn usage(self, sink: UsageSink) -> Self {
        self.with(|s| s.usage = Some(sink))
    }

    /// Accepts only keys of this tenant (others are refused like unknown keys).
    pub fn tenant(self, tenant: Tenant) -> Self {
        self.with(|s| s.tenant = Some(tenant))
    }
}

impl<S> Layer<S> for KeysmithLayer {
    type Service = KeysmithService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeysmithService {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// The service [`KeysmithLayer`] wraps around yours.
#[derive(Debug, Clone)]
pub struct KeysmithService<S> {
    inner: S,
    settings: Arc<Settings>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<Request<B>> for KeysmithService<S>
where
    S: Service<Request<B>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The clone that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let settings = self.settings.clone();
        Box::pin(async move {
            // Latency is the whole request's: validation included.
            let started = tokio::time::Instant::now();
            if key_in_query(request.uri().query()) {
                return Ok(deny(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "API keys are not accepted in URLs; send them in a header",
                ));
            }
            let Some(raw) = key_from(request.headers(), &settings.headers) else {
                return Ok(unauthorized());
            };
            let context = RequestContext {
                ip: client_ip(&request, &settings.trusted_proxies),
                origin: header_str(request.headers(), http::header::ORIGIN).map(str::to_owned),
                method: Some(request.method().as_str().to_owned()),
                path: Some(request.uri().path().to_owned()),
                expected_tenant: settings.tenant.clone(),
                ..RequestContext::default()
            };
            match settings.engine.validate(&raw, &context).await {
                Ok(valid) => {
                    // What usage needs of the request, taken before the
                    // handler owns it (nothing when usage is not recorded).
                    // The endpoint is the route's pattern (`/users/{id}`)
                    // when axum matched one, so usage groups by endpoint;
                    // else the path.
                    let noted = settings.usage.as_ref().map(|_| {
                        let endpoint = request
                            .extensions()
                            .get::<axum::extract::MatchedPath>()
                            .map_or_else(|| request.uri().path(), |m| m.as_str());
                        let user_agent = header_str(request.headers(), http::header::USER_AGENT)
                            .map(|ua| at_most_chars(ua, 512));
                        (valid.key.clone(), at_most_chars(endpoint, 1024), user_agent)
                    });
                    request
                        .extensions_mut()
                        .insert(Authenticated(Arc::new(valid)));
                    let response = inner.call(request).await;
                    if let (Some(sink), Some((key, endpoint, user_agent)), Ok(response)) =
                        (&settings.usage, noted, &response)
                    {
                        sink.record_request(RequestUsage {
                            key,
                            endpoint,
                            method: context.method.unwrap_or_default(),
                            status_code: response.status().as_u16(),
                            ip: context.ip,
                            user_agent,
                            latency_ms: u64::try_from(started.elapsed().as_millis())
                                .unwrap_or(u64::MAX),
                            created_at: crate::clock::store_precision(
                                settings.engine.clock().now(),
                            ),
                        });
                    }
                    response
                }
                Err(error) => Ok(refusal(&error)),
            }
        })
    }
}

/// The first `max` characters of `text`, copied. Text of at most `max`
/// bytes (nearly always) is copied whole without walking its characters.
fn at_most_chars(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let end = text.char_indices().nth(max).map_or(text.len(), |(i, _)| i);
    text[..end].to_owned()
}

/// The validated key of a request, for handlers.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Arc<Validation>);

impl Authenticated {
    /// Whether the key (within its policy) holds `scope`, hierarchically.
    pub fn has_scope(&self, scope: &str) -> bool {
        let key_holds = crate::scope::any_grants(&self.0.key.scopes, scope);
        let policy_allows = self.0.policy.as_ref().is_none_or(|p| {
            p.spec.allowed_scopes.is_empty()
                || crate::scope::any_grants(&p.spec.allowed_scopes, scope)
        });
        key_holds && policy_allows
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        parts
            .extensions
            .get::<Authenticated>()
            .cloned()
            .ok_or_else(unauthorized)
    }
}

/// Requires scopes on the routes it wraps (inside a [`KeysmithLayer`]):
/// 403 `insufficient_scope` otherwise.
#[derive(Debug, Clone)]
pub struct RequireScopesLayer {
    scopes: Arc<[String]>,
}

impl RequireScopesLayer {
    /// Requires every one of `scopes`.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(scopes: I) -> Self {
        Self {
            scopes: scopes.into_iter().map(Into::into).collect(),
        }
    }
}

impl<S> Layer<S> for RequireScopesLayer {
    type Service = RequireScopes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireScopes {
            inner,
            scopes: self.scopes.clone(),
        }
    }
}

/// The service of [`RequireScopesLayer`].
#[derive(Debug, Clone)]
pub struct RequireScopes<S> {
    inner: S,
    scopes: Arc<[String]>,
}

impl<S, B> Service<Request<B>> for RequireScopes<S>
where
    S: Service<Request<B>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let scopes = self.scopes.clone();
        Box::pin(async move {
            let Some(auth) = request.extensions().get::<Authenticated>() else {
                return Ok(unauthorized());
            };
            if let Some(missing) = scopes.iter().find(|s| !auth.has_scope(s)) {
                let message = format!("the API key lacks the `{missing}` scope");
                return Ok(deny(StatusCode::FORBIDDEN, "insufficient_scope", &message));
            }
            inner.call(request).await
        })
    }
}

fn header_str(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The raw key from the first configured header that carries one.
fn key_from(headers: &HeaderMap, names: &[HeaderName]) -> Option<String> {
    names.iter().find_map(|name| {
        let value = headers.get(name)?.to_str().ok()?.trim();
        if value.len() > MAX_KEY_HEADER {
            return None;
        }
        let key = if *name == http::header::AUTHORIZATION {
            value.strip_prefix("Bearer ")?.trim()
        } else {
            value
        };
        (!key.is_empty()).then(|| key.to_owned())
    })
}

/// Whether the query string carries something that looks like a key.
fn key_in_query(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            matches!(
                name.to_ascii_lowercase().as_str(),
                "api_key" | "apikey" | "access_token"
            ) || crate::secret::ParsedKey::parse(value).is_some()
        })
    })
}

/// The client's address: the socket peer, or, when the peer is a trusted
/// proxy, the nearest untrusted address in `X-Forwarded-For` / `Forwarded`.
fn client_ip<B>(request: &Request<B>, trusted: &[IpNet]) -> Option<IpAddr> {
    // The socket peer, as axum's `into_make_service_with_connect_info` (or
    // `MockConnectInfo` in tests) provides it.
    let extensions = request.extensions();
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .or_else(|| {
            extensions
                .get::<MockConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip())
        })?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&ip.to_canonical()));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let headers = request.headers();
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("forwarded") {
        let Ok(value) = value.to_str() else {
            return Some(peer);
        };
        for element in value.split(',') {
            for pair in element.split(';') {
                if let Some(node) = pair
                    .trim()
                    .strip_prefix("for=")
                    .or_else(|| pair.trim().strip_prefix("For="))
                {
                    let node = node.trim_matches('"');
                    let node = node
                        .strip_prefix('[')
                        .map_or(node, |v6| v6.split(']').next().unwrap_or(v6));
                    let node = if node.matches(':').count() == 1 {
                        node.split(':').next().unwrap_or(node)
                    } else {
                        node
                    };
                    match node.parse() {
                        Ok(ip) => hops.push(ip),
                        Err(_) => return Some(peer),
                    }
                }
            }
        }
    }
    if hops.is_empty() {
        for value in headers.get_all("x-forwarded-for") {
            let Ok(value) = value.to_str() else {
                return Some(peer);
            };
            for hop in value.split(',') {
                match hop.trim().parse() {
                    Ok(ip) => hops.push(ip),
                    Err(_) => return Some(peer),
                }
            }
        }
    }
    // Walk back from the nearest hop; the first address we do not trust is
    // the client (anything further left could be forged by it).
    Some(
        hops.into_iter()
            .rev()
            .find(|ip| !is_trusted(ip))
            .unwrap_or(peer),
    )
}

fn deny(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// The one answer for every key failure.
fn unauthorized() -> Response {
    deny(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or invalid API key",
    )
}

fn refusal(error: &Error) -> Response {
    match error {
        Error::InvalidKey
        | Error::KeyRevoked
        | Error::KeySuspended
        | Error::KeyExpired
        | Error::KeyRotated => unauthorized(),
        Error::IpNotAllowed
        | Error::OriginNotAllowed
        | Error::MethodNotAllowed
        | Error::PathNotAllowed
        | Error::InsufficientScope { .. } => {
            deny(StatusCode::FORBIDDEN, error.code(), &error.to_string())
        }
        Error::RateLimited { state, .. } => {
            let mut response = deny(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "rate limit exceeded",
            );
            for (name, value) in state.headers() {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response
                        .headers_mut()
                        .insert(HeaderName::from_static(lower(name)), value);
                }
            }
            response
        }
        Error::QuotaExceeded { resets_at } => {
            let mut response = deny(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                &error.to_string(),
            );
            let wait = (*resets_at - chrono::Utc::now()).num_seconds().max(1);
            if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, value);
            }
            response
        }
        other => {
            tracing::error!(error = %other, "key validation failed: store unavailable");
            deny(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the key store is unavailable; retry later",
            )
        }
    }
}

fn lower(name: &'static str) -> &'static str {
    match name {
        "RateLimit-Limit" => "ratelimit-limit",
        "RateLimit-Remaining" => "ratelimit-remaining",
        "RateLimit-Reset" => "ratelimit-reset",
        _ => "retry-after",
    }
}

#[cfg(test)]
mod tests {
    use super::at_most_chars;

    #[test]
    fn text_is_cut_at_a_number_of_characters_never_inside_one() {
        assert_eq!(at_most_chars("/users/{id}", 1024), "/users/{id}");
        assert_eq!(at_most_chars("abcdef", 4), "abcd");
        // 4 characters of 2 bytes each: 8 bytes, more than 4, cut after 4
        // characters (not 4 bytes).
        assert_eq!(at_most_chars("éééé", 4), "éééé");
        assert_eq!(at_most_chars("ééééé", 4), "éééé");
        assert_eq!(at_most_chars("aé€😀b", 4), "aé€😀");
        assert_eq!(at_most_chars("", 4), "");
    }
}
