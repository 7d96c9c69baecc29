//! The admin dashboard at `/dashboard`: server-rendered HTML (maud) over the
//! engine, for the tenant of the root key that signed in, within its
//! management scopes.
//!
//! Everything it serves is in the binary: the stylesheet, the few lines of
//! script behind the copy button, and the charts (inline SVG drawn on the
//! server). Pages that only show data work without JavaScript.

mod auth;
mod charts;
mod keys;
mod overview;
mod policies;
mod scopes;
pub mod session;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use keysmith::Engine;

pub use session::{Session, Sessions};

/// What the dashboard's handlers share.
#[derive(Debug, Clone)]
pub struct DashState {
    /// The engine (its clock also times sessions).
    pub engine: Engine,
    /// Signed-in sessions.
    pub sessions: Arc<Sessions>,
}

/// The dashboard's routes, to nest at `/dashboard`.
pub fn router<S: Clone + Send + Sync + 'static>(engine: Engine) -> Router<S> {
    let state = DashState {
        engine,
        sessions: Arc::new(Sessions::default()),
    };
    Router::new()
        .route("/", get(overview::page))
        .route("/login", get(auth::form).post(auth::sign_in))
        .route("/logout", post(auth::sign_out))
        .route("/keys", get(keys::list))
        .route("/keys/new", get(keys::new_form).post(keys::create))
        .route("/keys/{id}", get(keys::detail))
        .route("/keys/{id}/edit", get(keys::edit_form).post(keys::edit))
        .route(
            "/keys/{id}/rotate",
            get(keys::rotate_form).post(keys::rotate),
        )
        .route(
            "/keys/{id}/revoke",
            get(keys::revoke_form).post(keys::revoke),
        )
        .route("/keys/{id}/suspend", post(keys::suspend))
        .route("/keys/{id}/reactivate", post(keys::reactivate))
        .route("/keys/{id}/scopes/add", post(keys::add_scopes))
        .route("/keys/{id}/scopes/remove", post(keys::remove_scope))
        .route("/policies", get(policies::list))
        .route(
            "/policies/new",
            get(policies::new_form).post(policies::create),
        )
        .route("/policies/{id}", get(policies::detail))
        .route(
            "/policies/{id}/edit",
            get(policies::edit_form).post(policies::edit),
        )
        .route("/policies/{id}/delete", post(policies::delete))
        .route("/scopes", get(scopes::list).post(scopes::create))
        .route("/scopes/{id}/delete", post(scopes::delete))
        .route("/static/app.css", get(stylesheet))
        .route("/static/app.js", get(script))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/app.js");

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        JS,
    )
        .into_response()
}

async fn not_found() -> PageError {
    PageError::NotFound
}

/// Headers on every dashboard answer: a strict CSP (nothing inline, nothing
/// from elsewhere), no framing, no referrer, and no caching of pages.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Why a page could not be shown, as a page.
#[derive(Debug)]
pub enum PageError {
    /// No live session: to the sign-in form.
    SignIn,
    /// The root key lacks this management scope.
    Forbidden(String),
    /// A missing or bad CSRF token, or a cross-origin form.
    Csrf,
    /// Nothing here (also another tenant's ids).
    NotFound,
    /// Bad input outside a form (a malformed id, an unreadable form).
    BadRequest(String),
    /// The change is not allowed now (state transitions, policy in use).
    Conflict(String),
    /// The store did not answer.
    Unavailable,
}

impl From<keysmith::Error> for PageError {
    fn from(error: keysmith::Error) -> Self {
        use keysmith::Error as E;
        match error {
            E::NotFound(_) => Self::NotFound,
            E::Store(source) => {
                tracing::warn!(error = %source, "dashboard: store unavailable");
                Self::Unavailable
            }
            E::InvalidInput { .. } => Self::BadRequest(error.to_string()),
            other => Self::Conflict(other.to_string()),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, title, message) = match self {
            Self::SignIn => return Redirect::to("/dashboard/login").into_response(),
            Self::Forbidden(scope) => (
                StatusCode::FORBIDDEN,
                "Not allowed",
                format!("This root key lacks the management scope `{scope}`."),
            ),
            Self::Csrf => (
                StatusCode::FORBIDDEN,
                "Form refused",
                "The form was stale or came from another site. Reload the page and try again."
                    .to_owned(),
            ),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                "Not found",
                "There is nothing here for this tenant.".to_owned(),
            ),
            Self::BadRequest(message) => (StatusCode::BAD_REQUEST, "Bad request", message),
            Self::Conflict(message) => (StatusCode::CONFLICT, "Not possible", message),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "The store did not answer; try again shortly.".to_owned(),
            ),
        };
        (status, views::error_page(status, title, &message)).into_response()
    }
}

/// Parses a path id of the expected kind: a malformed one is a 404 page (no
/// such thing here).
pub fn parse_id<T: std::str::FromStr>(raw: &str) -> Result<T, PageError> {
    raw.parse().map_err(|_| PageError::NotFound)
}

/// Turns an engine refusal of a form into errors next to its fields (the
/// engine names the field: `name`, `allowed_ips[2]`, …); what belongs to no
/// field goes to `_form`. A missing record or a store failure stays a page
/// error.
pub fn form_errors(
    error: keysmith::Error,
    fields: &[&'static str],
) -> Result<views::Errors, PageError> {
    use keysmith::{Error as E, ResourceKind};
    let mut errors = views::Errors::new();
    let mut put = |field: &str, message: String| {
        let root = field.split(['[', '.']).next().unwrap_or(field);
        let key = fields
            .iter()
            .find(|f| **f == root)
            .copied()
            .unwrap_or("_form");
        errors.insert(key, message);
    };
    match error {
        E::InvalidInput { field, reason } => {
            let message = if field.contains('[') {
                format!("{field}: {reason}")
            } else {
                reason
            };
            put(&field, message);
        }
        E::ScopeNotAllowed { scope } => {
            put(
                "scopes",
                format!("`{scope}` is not allowed by the key's policy"),
            );
        }
        E::NotFound(ResourceKind::Policy) => put("policy_id", "No such policy.".into()),
        E::AlreadyExists { field, kind } => {
            put(field, format!("A {kind} with this {field} exists already."))
        }
        E::Store(source) => return Err(PageError::from(E::Store(source))),
        E::NotFound(_) => return Err(PageError::NotFound),
        other => put("_form", other.to_string()),
    }
    Ok(errors)
}

/// Runs a form's engine call, but only once the form's own checks found
/// nothing, and turns the engine's refusal into errors next to `fields` (see
/// [`form_errors`]). Every form handler then only says where success leads
/// and which page shows the errors: `Ok(Err(errors))` is the form again.
///
/// `action` is a future, so it does nothing unless it is run here.
pub async fn submit<T>(
    errors: views::Errors,
    fields: &[&'static str],
    action: impl Future<Output = Result<T, keysmith::Error>>,
) -> Result<Result<T, views::Errors>, PageError> {
    if !errors.is_empty() {
        return Ok(Err(errors));
    }
    match action.await {
        Ok(done) => Ok(Ok(done)),
        Err(error) => form_errors(error, fields).map(Err),
    }
}

/// Reads an optional form value: empty is `None`, and so is a value `parse`
/// refuses, with `message` next to `field`, so that one submission reports
/// every bad field rather than the first.
pub fn optional<T>(
    errors: &mut views::Errors,
    field: &'static str,
    text: &str,
    message: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Option<T> {
    if text.is_empty() {
        return None;
    }
    let parsed = parse(text);
    if parsed.is_none() {
        errors.insert(field, message.to_owned());
    }
    parsed
}

/// Reads a metadata field: empty is no metadata; anything but a JSON object
/// is `message` next to the `metadata` field.
pub fn metadata_field(errors: &mut views::Errors, text: &str, message: &str) -> keysmith::Metadata {
    optional(
        errors,
        "metadata",
        text,
        message,
        |text| match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(map)) => Some(map),
            _ => None,
        },
    )
    .unwrap_or_default()
}

/// Metadata as its form field shows it: empty rather than `{}`, so that an
/// untouched field reads as "no metadata".
pub fn metadata_text(metadata: &keysmith::Metadata) -> String {
    if metadata.is_empty() {
        String::new()
    } else {
        serde_json::Value::Object(metadata.clone()).to_string()
    }
}
