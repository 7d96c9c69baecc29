//! Health, readiness, metrics, the OpenAPI document and its docs page.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use utoipa::OpenApi;

use super::{ApiError, AppState};

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, description = "alive")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "system",
    responses((status = 200, description = "the store answers"),
        (status = 503, body = super::error::ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.store.ping().await?;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

/// Prometheus text format: validations by outcome, validation latency,
/// keys created, HTTP requests.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// The OpenAPI document.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi::ApiDoc::openapi())
}

/// A small, self-contained page that renders `/openapi.json` (no network).
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}

/// 405 for a known path with another method, in the API's error format.
pub async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: "this route does not accept that method".into(),
    }
}

/// 404 for every unknown path, in the API's error format.
pub async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such route".into(),
    }
}
