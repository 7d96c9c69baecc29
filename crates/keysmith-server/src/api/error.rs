//! One error shape for the whole API: `{ "error": { "code", "message" } }`.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keysmith::Error;
use serde::Serialize;

/// An API error: a status, a stable code and a message safe to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: &'static str,
    /// Human-readable message (never a secret).
    pub message: String,
}

/// The JSON body of an error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside [`ErrorBody`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable code such as `invalid_input`, `not_found`, `conflict`.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: message.into(),
        }
    }

    /// 403 for a missing management scope.
    pub fn forbidden(scope: &str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: format!("the root key lacks the `{scope}` scope"),
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let (status, code) = match &error {
            Error::InvalidInput { .. } => (StatusCode::BAD_REQUEST, "invalid_input"),
            Error::ScopeNotAllowed { .. } => (StatusCode::BAD_REQUEST, "scope_not_allowed"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::AlreadyExists { .. } => (StatusCode::CONFLICT, "already_exists"),
            Error::PolicyInUse { .. } => (StatusCode::CONFLICT, "policy_in_use"),
            Error::InvalidStateTransition { .. } => {
                (StatusCode::CONFLICT, "invalid_state_transition")
            }
            Error::Store(source) => {
                tracing::error!(error = %source, "store unavailable");
                return Self {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "store_unavailable",
                    message: "the key store is unavailable; retry later".into(),
                };
            }
            Error::QueueFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            Error::RateLimited { .. } | Error::QuotaExceeded { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, error.code())
            }
            _ if error.is_validation_denial() => (StatusCode::UNAUTHORIZED, "unauthorized"),
            _ => (StatusCode::BAD_REQUEST, "invalid_input"),
        };
        Self {
            status,
            code,
            message: error.to_string(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "invalid_input",
        };
        // A body that parses but does not fit the schema is bad input too.
        let status = match status {
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE => status,
            _ => StatusCode::BAD_REQUEST,
        };
        Self {
            status,
            code,
            message: rejection.body_text(),
        }
    }
}
