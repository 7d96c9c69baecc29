//! `/v1/policies`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keysmith::{Engine, Page, Policy, PolicyId, PolicySpec};

use super::{ApiError, ApiJson, ApiQuery, Auth, PageQuery, parse_id};
use crate::root::scopes::{POLICIES_READ, POLICIES_WRITE};

/// Create a policy; a bad CIDR, origin, path or duration is a 400 naming the field.
#[utoipa::path(post, path = "/v1/policies", tag = "policies", request_body = PolicySpec,
    responses((status = 201, body = Policy), (status = 400, body = super::error::ErrorBody),
        (status = 409, description = "name taken", body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn create(
    State(engine): State<Engine>,
    auth: Auth,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<(StatusCode, Json<Policy>), ApiError> {
    let principal = auth.require(POLICIES_WRITE)?;
    Ok((
        StatusCode::CREATED,
        Json(engine.create_policy(&principal.tenant, spec).await?),
    ))
}

/// The tenant's policies, newest first.
#[utoipa::path(get, path = "/v1/policies", tag = "policies", params(PageQuery),
    responses((status = 200, body = Page<Policy>), (status = 400, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn list(
    State(engine): State<Engine>,
    auth: Auth,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<Page<Policy>>, ApiError> {
    let principal = auth.require(POLICIES_READ)?;
    Ok(Json(
        engine
            .list_policies(&principal.tenant, &query.page()?)
            .await?,
    ))
}

/// One policy.
#[utoipa::path(get, path = "/v1/policies/{id}", tag = "policies", params(("id" = String, Path)),
    responses((status = 200, body = Policy), (status = 404, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn get(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Policy>, ApiError> {
    let principal = auth.require(POLICIES_READ)?;
    let id: PolicyId = parse_id(&id)?;
    Ok(Json(engine.get_policy(&principal.tenant, &id).await?))
}

/// Replace a policy's rules.
#[utoipa::path(put, path = "/v1/policies/{id}", tag = "policies", params(("id" = String, Path)),
    request_body = PolicySpec,
    responses((status = 200, body = Policy), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn update(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Json<Policy>, ApiError> {
    let principal = auth.require(POLICIES_WRITE)?;
    let id: PolicyId = parse_id(&id)?;
    Ok(Json(
        engine.update_policy(&principal.tenant, &id, spec).await?,
    ))
}

/// Delete a policy no key uses (409 `policy_in_use` otherwise).
#[utoipa::path(delete, path = "/v1/policies/{id}", tag = "policies", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn delete(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let principal = auth.require(POLICIES_WRITE)?;
    let id: PolicyId = parse_id(&id)?;
    engine.delete_policy(&principal.tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
