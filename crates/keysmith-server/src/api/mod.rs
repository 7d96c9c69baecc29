//! The REST API: JSON under `/v1`, every call authenticated with a root key
//! (`Authorization: Bearer ksr_…`) and acting on that key's tenant.

mod error;
mod keys;
pub mod openapi;
mod policies;
mod scopes;
mod system;
mod usage;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{
    DefaultBodyLimit, FromRef, FromRequest, FromRequestParts, MatchedPath, Request,
};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use keysmith::{Engine, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::root::{self, Principal};

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// The store (for health checks).
    pub store: Arc<dyn Store>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl FromRef<AppState> for Engine {
    fn from_ref(state: &AppState) -> Self {
        state.engine.clone()
    }
}

/// Limits the router applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Longest request.
    pub request_timeout: std::time::Duration,
}

/// The whole HTTP surface.
pub fn router(state: AppState, limits: Limits) -> Router {
    let v1 = Router::new()
        .route("/keys", post(keys::create).get(keys::list))
        .route("/keys/validate", post(keys::validate))
        .route(
            "/keys/{id}",
            get(keys::get).patch(keys::update).delete(keys::delete),
        )
        .route("/keys/{id}/rotate", post(keys::rotate))
        .route("/keys/{id}/revoke", post(keys::revoke))
        .route("/keys/{id}/suspend", post(keys::suspend))
        .route("/keys/{id}/reactivate", post(keys::reactivate))
        .route(
            "/keys/{id}/scopes",
            post(keys::add_scopes).delete(keys::remove_scopes),
        )
        .route("/keys/{id}/rotations", get(keys::rotations))
        .route("/keys/{id}/usage", get(usage::of_key))
        .route("/keys/{id}/usage/aggregate", get(usage::aggregate))
        .route("/usage", post(usage::record).get(usage::list))
        .route("/policies", post(policies::create).get(policies::list))
        .route(
            "/policies/{id}",
            get(policies::get)
                .put(policies::update)
                .delete(policies::delete),
        )
        .route("/scopes", post(scopes::create).get(scopes::list))
        .route("/scopes/{id}", axum::routing::delete(scopes::delete));
    let request_id = axum::http::HeaderName::from_static("x-request-id");
    Router::new()
        .nest("/v1", v1)
        .nest("/dashboard", crate::dashboard::router(state.engine.clone()))
        // `/dashboard/` as typed or bookmarked: the same page.
        .route(
            "/dashboard/",
            get(|| async { axum::response::Redirect::permanent("/dashboard") }),
        )
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route("/openapi.json", get(system::openapi))
        .route("/docs", get(system::docs))
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.body_limit))
        .layer(middleware::from_fn(count_requests))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            // The path only: a key never travels in a URL, but query strings
            // are not logged either.
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// Counts requests by route, method and status, with their latency.
async fn count_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("keysmith_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("keysmith_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The authenticated caller of a `/v1` route.
#[derive(Debug, Clone)]
pub struct Auth(pub Principal);

impl Auth {
    /// Refuses with 403 unless the root key carries `scope`.
    pub fn require(&self, scope: &str) -> Result<&Principal, ApiError> {
        if self.0.may(scope) {
            Ok(&self.0)
        } else {
            Err(ApiError::forbidden(scope))
        }
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <root key>"))?;
        let raw = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <root key>"))?;
        match root::authenticate(&state.engine, raw).await {
            Ok(principal) => Ok(Self(principal)),
            Err(keysmith::Error::Store(source)) => {
                Err(ApiError::from(keysmith::Error::Store(source)))
            }
            Err(_) => Err(ApiError::unauthorized("invalid root key")),
        }
    }
}

/// A JSON body whose rejections become our error format: 400 naming the
/// field, 413 over the limit, 415 without `Content-Type: application/json`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(value)| Self(value))
            .map_err(ApiError::from)
    }
}

/// Like [`ApiJson`], but an empty body means `T::default()` (for actions
/// whose every field is optional, like rotate and revoke).
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let empty = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
            || (req
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .is_none()
                && req
                    .headers()
                    .get(axum::http::header::CONTENT_LENGTH)
                    .is_none());
        if empty {
            return Ok(Self(T::default()));
        }
        ApiJson::<T>::from_request(req, state)
            .await
            .map(|ApiJson(v)| Self(v))
    }
}

/// Query strings, with our error format.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|e| ApiError::bad_request("invalid_input", e.body_text()))
    }
}

/// Parses a path id of the expected kind: 400 otherwise (a malformed id or an
/// id of another kind is not a lookup).
pub fn parse_id<T: std::str::FromStr<Err = keysmith::id::IdParseError>>(
    raw: &str,
) -> Result<T, ApiError> {
    raw.parse().map_err(|e: keysmith::id::IdParseError| {
        ApiError::bad_request("invalid_input", format!("invalid id: {e}"))
    })
}

/// Paging query parameters shared by the lists.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Items per page, 1–1000 (default 50).
    pub limit: Option<u32>,
    /// Items to skip.
    pub offset: Option<u64>,
}

impl PageQuery {
    /// The checked page.
    pub fn page(&self) -> Result<keysmith::PageRequest, ApiError> {
        Ok(keysmith::PageRequest::new(
            self.limit.unwrap_or(keysmith::model::DEFAULT_PAGE_SIZE),
            self.offset.unwrap_or(0),
        )?)
    }
}
