//! `/v1/scopes`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keysmith::{CreateScope, Engine, Page, Scope, ScopeId};
use serde::Deserialize;

use super::{ApiError, ApiJson, ApiQuery, Auth, PageQuery, parse_id};
use crate::root::scopes::{SCOPES_READ, SCOPES_WRITE};

/// Filters and paging for `GET /v1/scopes`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListScopesQuery {
    /// Only the children of this scope name.
    pub parent: Option<String>,
    /// Items per page, 1–1000 (default 50).
    pub limit: Option<u32>,
    /// Items to skip.
    pub offset: Option<u64>,
}

/// Create a scope.
#[utoipa::path(post, path = "/v1/scopes", tag = "scopes", request_body = CreateScope,
    responses((status = 201, body = Scope), (status = 400, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn create(
    State(engine): State<Engine>,
    auth: Auth,
    ApiJson(request): ApiJson<CreateScope>,
) -> Result<(StatusCode, Json<Scope>), ApiError> {
    let principal = auth.require(SCOPES_WRITE)?;
    Ok((
        StatusCode::CREATED,
        Json(engine.create_scope(&principal.tenant, request).await?),
    ))
}

/// The tenant's scopes by name.
#[utoipa::path(get, path = "/v1/scopes", tag = "scopes", params(ListScopesQuery),
    responses((status = 200, body = Page<Scope>), (status = 400, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn list(
    State(engine): State<Engine>,
    auth: Auth,
    ApiQuery(query): ApiQuery<ListScopesQuery>,
) -> Result<Json<Page<Scope>>, ApiError> {
    let principal = auth.require(SCOPES_READ)?;
    let page = PageQuery {
        limit: query.limit,
        offset: query.offset,
    }
    .page()?;
    Ok(Json(
        engine
            .list_scopes(&principal.tenant, query.parent.as_deref(), &page)
            .await?,
    ))
}

/// Delete a scope, taking it off every key.
#[utoipa::path(delete, path = "/v1/scopes/{id}", tag = "scopes", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn delete(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let principal = auth.require(SCOPES_WRITE)?;
    let id: ScopeId = parse_id(&id)?;
    engine.delete_scope(&principal.tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
