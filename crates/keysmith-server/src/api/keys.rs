//! `/v1/keys`: create, list, read, change, rotate, revoke, suspend,
//! reactivate, delete, scopes, rotations, and validation for non-Rust callers.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use keysmith::ratelimit::{QuotaState, RateLimitState};
use keysmith::{
    ApiKey, CreateKey, Engine, KeyFilter, KeyId, KeyUpdate, Page, Policy, RequestContext,
    RotateKey, Rotation,
};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiJson, ApiQuery, Auth, OptionalJson, PageQuery, parse_id};
use crate::root::scopes::{KEYS_READ, KEYS_VALIDATE, KEYS_WRITE};

/// A key with its raw secret, returned once by create and rotate.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyWithSecret {
    /// The raw key: shown this once, never again.
    pub raw_key: String,
    /// The key.
    pub key: ApiKey,
}

/// Filters and paging for `GET /v1/keys`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListKeysQuery {
    /// `active`, `suspended`, `expired` or `revoked`.
    pub state: Option<String>,
    /// Environment name.
    pub environment: Option<String>,
    /// Policy id.
    pub policy_id: Option<String>,
    /// Creator.
    pub created_by: Option<String>,
    /// `true`: only keys due for rotation now (active, under a policy whose
    /// `rotation_period` has passed since the key's last rotation, else its
    /// creation).
    pub rotation_due: Option<bool>,
    /// Only keys whose name or hint contains this text, ignoring case
    /// (`%` and `_` match themselves; at most 100 characters).
    pub search: Option<String>,
    /// Items per page, 1–1000 (default 50).
    pub limit: Option<u32>,
    /// Items to skip.
    pub offset: Option<u64>,
}

/// Body of `POST /v1/keys/{id}/revoke`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// Why (kept in the audit trail).
    pub reason: Option<String>,
}

/// Body of `POST|DELETE /v1/keys/{id}/scopes`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScopesBody {
    /// Scope names.
    pub scopes: Vec<String>,
}

/// Body of `POST /v1/keys/validate`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateBody {
    /// The raw key presented by the caller's client.
    pub raw_key: String,
    /// Client IP.
    pub ip: Option<String>,
    /// `Origin` header.
    pub origin: Option<String>,
    /// HTTP method.
    pub method: Option<String>,
    /// Request path.
    pub path: Option<String>,
    /// Scopes the request requires.
    pub scopes: Option<Vec<String>>,
    /// Quota units this request consumes (default 1).
    pub cost: Option<u64>,
}

/// Answer of `POST /v1/keys/validate`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ValidateResponse {
    /// Whether the key is accepted.
    pub valid: bool,
    /// Why not, when not: `invalid_key`, `revoked`, `suspended`, `expired`,
    /// `rotated`, `ip_not_allowed`, `origin_not_allowed`, `method_not_allowed`,
    /// `path_not_allowed`, `insufficient_scope`, `rate_limited`, `quota_exceeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// The key, when valid.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "shared")]
    #[schema(value_type = Option<ApiKey>)]
    pub key: Option<Arc<ApiKey>>,
    /// Its scopes, when valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Its policy, when valid and it has one.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "shared")]
    #[schema(value_type = Option<Policy>)]
    pub policy: Option<Arc<Policy>>,
    /// Set when the presented secret was rotated out and is in its grace period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_ends: Option<DateTime<Utc>>,
    /// The rate limit's state, when the key's policy sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitState>,
    /// Seconds to wait, when refused by the rate limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Each quota window's state, when the key's policy sets quotas.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quota: Vec<QuotaState>,
    /// When the exhausted quota resets, when refused by a quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<DateTime<Utc>>,
}

/// Serializes what an `Arc` shares (the validation's own key and policy, not
/// copies of them).
fn shared<T: Serialize, S: serde::Serializer>(
    value: &Option<Arc<T>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    value.as_deref().serialize(serializer)
}

impl ValidateResponse {
    fn denied(code: &'static str) -> Self {
        Self {
            valid: false,
            code: Some(code),
            key: None,
            scopes: None,
            policy: None,
            grace_ends: None,
            rate_limit: None,
            retry_after: None,
            quota: Vec::new(),
            resets_at: None,
        }
    }
}

/// Create a key; its raw secret is in the answer, once.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, body = KeyWithSecret), (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody),
        (status = 404, description = "policy not found", body = super::error::ErrorBody),
        (status = 503, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn create(
    State(engine): State<Engine>,
    auth: Auth,
    ApiJson(mut request): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<KeyWithSecret>), ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    request
        .created_by
        .get_or_insert_with(|| principal.key_id.to_string());
    let created = engine.create_key(&principal.tenant, request).await?;
    let raw_key = created.raw_key.expose_secret().to_owned();
    Ok((
        StatusCode::CREATED,
        Json(KeyWithSecret {
            raw_key,
            key: created.key,
        }),
    ))
}

/// List the tenant's keys, newest first, with the total.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(ListKeysQuery),
    responses((status = 200, body = Page<ApiKey>), (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn list(
    State(engine): State<Engine>,
    auth: Auth,
    ApiQuery(query): ApiQuery<ListKeysQuery>,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    let principal = auth.require(KEYS_READ)?;
    let filter = KeyFilter {
        state: query.state.as_deref().map(str::parse).transpose()?,
        environment: query.environment.as_deref().map(str::parse).transpose()?,
        policy_id: query.policy_id.as_deref().map(parse_id).transpose()?,
        created_by: query.created_by,
        rotation_due: query.rotation_due.unwrap_or(false),
        now: None,
        search: query.search,
        page: PageQuery {
            limit: query.limit,
            offset: query.offset,
        }
        .page()?,
    };
    Ok(Json(engine.list_keys(&principal.tenant, &filter).await?))
}

/// One key.
#[utoipa::path(get, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = ApiKey), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn get(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let principal = auth.require(KEYS_READ)?;
    let id: KeyId = parse_id(&id)?;
    Ok(Json(engine.get_key(&principal.tenant, &id).await?))
}

/// Change name, description, metadata, policy or expiry (`null` clears).
#[utoipa::path(patch, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path)),
    request_body = KeyUpdate,
    responses((status = 200, body = ApiKey), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn update(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(update): ApiJson<KeyUpdate>,
) -> Result<Json<ApiKey>, ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    let id: KeyId = parse_id(&id)?;
    Ok(Json(
        engine.update_key(&principal.tenant, &id, update).await?,
    ))
}

/// Delete a key and its history.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn delete(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    let id: KeyId = parse_id(&id)?;
    engine.delete_key(&principal.tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rotate: a new secret (returned once); the old one works until grace ends.
#[utoipa::path(post, path = "/v1/keys/{id}/rotate", tag = "keys", params(("id" = String, Path)),
    request_body = RotateKey,
    responses((status = 200, body = KeyWithSecret), (status = 404, body = super::error::ErrorBody),
        (status = 409, description = "revoked or expired", body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn rotate(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
    OptionalJson(mut request): OptionalJson<RotateKey>,
) -> Result<Json<KeyWithSecret>, ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    let id: KeyId = parse_id(&id)?;
    request
        .rotated_by
        .get_or_insert_with(|| principal.key_id.to_string());
    let rotated = engine.rotate_key(&principal.tenant, &id, request).await?;
    let raw_key = rotated.raw_key.expose_secret().to_owned();
    Ok(Json(KeyWithSecret {
        raw_key,
        key: rotated.key,
    }))
}

/// Revoke for good: current and in-grace secrets stop at once.
#[utoipa::path(post, path = "/v1/keys/{id}/revoke", tag = "keys", params(("id" = String, Path)),
    request_body = RevokeBody,
    responses((status = 200, body = ApiKey), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn revoke(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<RevokeBody>,
) -> Result<Json<ApiKey>, ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    let id: KeyId = parse_id(&id)?;
    Ok(Json(
        engine
            .revoke_key(&principal.tenant, &id, body.reason.as_deref())
            .await?,
    ))
}

/// Suspend an active key.
#[utoipa::path(post, path = "/v1/keys/{id}/suspend", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = ApiKey), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn suspend(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    let id: KeyId = parse_id(&id)?;
    Ok(Json(engine.suspend_key(&principal.tenant, &id).await?))
}

/// Reactivate a suspended key.
#[utoipa::path(post, path = "/v1/keys/{id}/reactivate", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = ApiKey), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn reactivate(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    let id: KeyId = parse_id(&id)?;
    Ok(Json(engine.reactivate_key(&principal.tenant, &id).await?))
}

/// Grant scopes (unknown names are created for the tenant).
#[utoipa::path(post, path = "/v1/keys/{id}/scopes", tag = "keys", params(("id" = String, Path)),
    request_body = ScopesBody,
    responses((status = 200, body = ApiKey), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn add_scopes(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ScopesBody>,
) -> Result<Json<ApiKey>, ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    let id: KeyId = parse_id(&id)?;
    Ok(Json(
        engine
            .assign_scopes(&principal.tenant, &id, body.scopes)
            .await?,
    ))
}

/// Take scopes off a key.
#[utoipa::path(delete, path = "/v1/keys/{id}/scopes", tag = "keys", params(("id" = String, Path)),
    request_body = ScopesBody,
    responses((status = 200, body = ApiKey), (status = 404, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn remove_scopes(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ScopesBody>,
) -> Result<Json<ApiKey>, ApiError> {
    let principal = auth.require(KEYS_WRITE)?;
    let id: KeyId = parse_id(&id)?;
    Ok(Json(
        engine
            .remove_scopes(&principal.tenant, &id, body.scopes)
            .await?,
    ))
}

/// The key's rotation history, oldest first.
#[utoipa::path(get, path = "/v1/keys/{id}/rotations", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Rotation>), (status = 404, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn rotations(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Vec<Rotation>>, ApiError> {
    let principal = auth.require(KEYS_READ)?;
    let id: KeyId = parse_id(&id)?;
    Ok(Json(engine.list_rotations(&principal.tenant, &id).await?))
}

/// Validate one of the tenant's keys for a service not written in Rust.
/// Always 200 with `valid` true or false (and the reason); 503 when the store
/// cannot answer, never a false "valid".
#[utoipa::path(post, path = "/v1/keys/validate", tag = "keys", request_body = ValidateBody,
    responses((status = 200, body = ValidateResponse), (status = 400, body = super::error::ErrorBody),
        (status = 503, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn validate(
    State(engine): State<Engine>,
    auth: Auth,
    ApiJson(body): ApiJson<ValidateBody>,
) -> Result<Json<ValidateResponse>, ApiError> {
    let principal = auth.require(KEYS_VALIDATE)?;
    let ip = body
        .ip
        .as_deref()
        .map(|ip| {
            ip.parse()
                .map_err(|_| keysmith::Error::invalid_input("ip", "not an IP address"))
        })
        .transpose()?;
    if body.cost == Some(0) {
        return Err(keysmith::Error::invalid_input("cost", "must be at least 1").into());
    }
    let request = RequestContext {
        ip,
        origin: body.origin,
        method: body.method,
        path: body.path,
        required_scopes: body.scopes.unwrap_or_default(),
        expected_tenant: Some(principal.tenant.clone()),
        cost: body.cost.unwrap_or(1),
    };
    let started = Instant::now();
    let outcome = engine.validate(&body.raw_key, &request).await;
    metrics::histogram!("keysmith_validation_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    match outcome {
        Ok(valid) => Ok(Json(ValidateResponse {
            valid: true,
            code: None,
            scopes: Some(valid.key.scopes.clone()),
            key: Some(valid.key.clone()),
            policy: valid.policy.clone(),
            grace_ends: valid.grace_ends,
            rate_limit: valid.rate_limit,
            retry_after: None,
            quota: valid.quota.to_vec(),
            resets_at: None,
        })),
        Err(keysmith::Error::RateLimited { retry_after, state }) => Ok(Json(ValidateResponse {
            rate_limit: Some(state),
            retry_after: Some(retry_after.as_secs().max(1)),
            ..ValidateResponse::denied("rate_limited")
        })),
        Err(keysmith::Error::QuotaExceeded { resets_at }) => Ok(Json(ValidateResponse {
            resets_at: Some(resets_at),
            ..ValidateResponse::denied("quota_exceeded")
        })),
        Err(error) if error.is_validation_denial() => {
            Ok(Json(ValidateResponse::denied(error.code())))
        }
        Err(error) => Err(error.into()),
    }
}
