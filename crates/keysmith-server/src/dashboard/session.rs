//! Dashboard sessions and CSRF protection.
//!
//! A session is a random 32-byte id in an HttpOnly, SameSite=Strict cookie
//! (`Secure` when the request came over TLS, that is with
//! `X-Forwarded-Proto: https` from the proxy in front). The server keeps, in
//! memory, the tenant, the root key's id and its management scopes, never the
//! raw key. Every request re-reads the root key, so revoking it ends its
//! sessions at once. Every POST carries the session's CSRF token in a hidden
//! field (compared in constant time) and, when the browser sends an `Origin`,
//! must come from this host.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use keysmith::{Engine, KeyId, KeyState, Tenant};
use subtle::ConstantTimeEq;

use super::{DashState, PageError};
use crate::root;

/// The session cookie's name.
pub const COOKIE: &str = "keysmith_session";
/// The cookie holding the sign-in form's CSRF token (before any session).
pub const LOGIN_COOKIE: &str = "keysmith_login_csrf";
/// A session ends this long after sign-in, whatever happens.
pub const ABSOLUTE_TIMEOUT: Duration = Duration::from_secs(8 * 3600);
/// A session ends after this long without a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// Most sessions kept at once; the oldest go first beyond it.
pub const MAX_SESSIONS: usize = 10_000;

/// A signed-in root key, as the server remembers it.
#[derive(Debug, Clone)]
pub struct Session {
    /// The session id (hex), the cookie's value.
    pub id: String,
    /// The root key's id (never the raw key).
    pub key_id: KeyId,
    /// The tenant the dashboard shows and changes.
    pub tenant: Tenant,
    /// The root key's management scopes.
    pub scopes: Vec<String>,
    /// The token every form of this session must carry.
    pub csrf: String,
    created_at: DateTime<Utc>,
    last_seen: DateTime<Utc>,
}

impl Session {
    /// Whether the root key carries `scope`.
    pub fn may(&self, scope: &str) -> bool {
        keysmith::scope::any_grants(&self.scopes, scope)
    }

    /// Refuses with a 403 page unless the root key carries `scope`.
    pub fn require(&self, scope: &str) -> Result<(), PageError> {
        if self.may(scope) {
            Ok(())
        } else {
            Err(PageError::Forbidden(scope.to_owned()))
        }
    }
}

/// The server's sessions, in memory, bounded.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for an authenticated root key.
    pub fn start(&self, principal: root::Principal, now: DateTime<Utc>) -> Session {
        let session = Session {
            id: random_token(),
            key_id: principal.key_id,
            tenant: principal.tenant,
            scopes: principal.scopes,
            csrf: random_token(),
            created_at: now,
            last_seen: now,
        };
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| alive(s, now));
        }
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map
                .values()
                .min_by_key(|s| s.last_seen)
                .map(|s| s.id.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(session.id.clone(), session.clone());
        session
    }

    /// The live session with this id, touched; an expired one is dropped.
    fn touch(&self, id: &str, now: DateTime<Utc>) -> Option<Session> {
        let mut map = self.lock();
        let session = map.get_mut(id)?;
        if !alive(session, now) {
            map.remove(id);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// Ends a session.
    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    /// How many sessions are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn alive(session: &Session, now: DateTime<Utc>) -> bool {
    let absolute = chrono::Duration::from_std(ABSOLUTE_TIMEOUT).unwrap_or_default();
    let idle = chrono::Duration::from_std(IDLE_TIMEOUT).unwrap_or_default();
    now < session.created_at + absolute && now < session.last_seen + idle
}

/// 32 random bytes from the OS, in hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    hex::encode(bytes)
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the request reached the proxy in front of us over TLS. The server
/// itself speaks plain HTTP; a TLS-terminating proxy says `X-Forwarded-Proto:
/// https`. Believing a forged header only makes the cookie stricter.
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value for the dashboard's path.
pub fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/dashboard; Max-Age={}; HttpOnly; SameSite=Strict{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// A `Set-Cookie` value that deletes the cookie.
pub fn clear_cookie(name: &str, secure: bool) -> String {
    set_cookie(name, "", Duration::ZERO, secure)
}

/// Equal in constant time (for tokens).
pub fn tokens_match(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Refuses a cross-site POST. Browsers say where a request comes from in
/// `Sec-Fetch-Site`; with our `Referrer-Policy: no-referrer` their `Origin`
/// on a form post is `null`, so the fetch metadata comes first. Without it, an
/// `Origin` must name the `Host` the request was sent to. (The CSRF token is
/// checked as well, whatever these say.)
pub fn check_origin(headers: &HeaderMap) -> Result<(), PageError> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        return if site.eq_ignore_ascii_case("same-origin") {
            Ok(())
        } else {
            Err(PageError::Csrf)
        };
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    match (origin_host, text(header::HOST)) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(PageError::Csrf),
    }
}

async fn current(parts: &Parts, state: &DashState) -> Result<Session, PageError> {
    let id = cookie(&parts.headers, COOKIE).ok_or(PageError::SignIn)?;
    let now = state.engine.clock().now();
    let session = state.sessions.touch(id, now).ok_or(PageError::SignIn)?;
    // The root key must still be usable: revoking or suspending it ends its
    // sessions on their next request.
    match root_key_scopes(&state.engine, &session.key_id, now).await {
        Ok(Some(scopes)) => Ok(Session { scopes, ..session }),
        Ok(None) => {
            state.sessions.end(&session.id);
            Err(PageError::SignIn)
        }
        Err(error) => Err(PageError::from(error)),
    }
}

/// The root key's scopes while it is active and unexpired; `None` otherwise.
async fn root_key_scopes(
    engine: &Engine,
    id: &KeyId,
    now: DateTime<Utc>,
) -> Result<Option<Vec<String>>, keysmith::Error> {
    match engine.get_key(&root::root_tenant(), id).await {
        Ok(key) if key.state == KeyState::Active && key.expires_at.is_none_or(|at| at > now) => {
            Ok(Some(key.scopes))
        }
        Ok(_) | Err(keysmith::Error::NotFound(_)) => Ok(None),
        Err(error) => Err(error),
    }
}

impl FromRequestParts<DashState> for Session {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &DashState) -> Result<Self, PageError> {
        current(parts, state).await
    }
}

/// A submitted form of a signed-in session whose CSRF token and origin were
/// checked: the fields in order, as strings.
#[derive(Debug)]
pub struct Form {
    /// The session that sent it.
    pub session: Session,
    fields: Vec<(String, String)>,
}

impl Form {
    /// A field's value, trimmed; empty when absent.
    pub fn get(&self, name: &str) -> &str {
        field_value(&self.fields, name)
    }

    /// Every value of a repeated field, trimmed, empty ones skipped.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.fields
            .iter()
            .filter(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

/// The first value of `name` among urlencoded pairs (a form, a query),
/// trimmed; empty when absent, which every form treats as "not given".
pub fn field_value<'a>(pairs: &'a [(String, String)], name: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .unwrap_or("")
}

/// Reads an urlencoded body (within the server's body limit).
pub async fn read_fields(
    req: Request,
    state: &DashState,
) -> Result<Vec<(String, String)>, PageError> {
    let bytes = axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|e| PageError::BadRequest(e.body_text()))?;
    serde_urlencoded::from_bytes(&bytes)
        .map_err(|_| PageError::BadRequest("the form could not be read".into()))
}

impl FromRequest<DashState> for Form {
    type Rejection = Response;

    async fn from_request(req: Request, state: &DashState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        check_origin(&parts.headers).map_err(IntoResponse::into_response)?;
        let session = match Session::from_request_parts(&mut parts, state).await {
            Ok(session) => session,
            Err(PageError::SignIn) => return Err(Redirect::to("/dashboard/login").into_response()),
            Err(other) => return Err(other.into_response()),
        };
        let fields = read_fields(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        let token = fields
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if !tokens_match(token, &session.csrf) {
            return Err(PageError::Csrf.into_response());
        }
        Ok(Self { session, fields })
    }
}
