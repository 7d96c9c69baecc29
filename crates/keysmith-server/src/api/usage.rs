//! Usage: `POST|GET /v1/usage`, `GET /v1/keys/{id}/usage` and
//! `GET /v1/keys/{id}/usage/aggregate`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use keysmith::{Engine, KeyId, NewUsage, Page, UsageAggregate, UsageFilter, UsageRecord};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiJson, ApiQuery, Auth, PageQuery, parse_id};
use crate::root::scopes::{USAGE_READ, USAGE_WRITE};

/// Body of `POST /v1/usage`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    /// At most 1000 records.
    pub records: Vec<NewUsage>,
}

/// Answer of `POST /v1/usage`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    /// How many records were accepted; the usage writer stores them within
    /// its flush interval.
    pub accepted: usize,
}

/// Time window and paging for usage lists.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Only this key (tenant-wide list only).
    pub key_id: Option<String>,
    /// From this instant (RFC 3339, inclusive).
    pub after: Option<DateTime<Utc>>,
    /// Until this instant (RFC 3339, exclusive).
    pub before: Option<DateTime<Utc>>,
    /// Items per page, 1–1000 (default 50).
    pub limit: Option<u32>,
    /// Items to skip, at most 100 000 (narrow `after` and `before` to read
    /// older records).
    pub offset: Option<u64>,
}

/// Window for aggregates.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AggregateQuery {
    /// `day` or `month`.
    pub period: String,
    /// Periods starting at or after this instant.
    pub after: Option<DateTime<Utc>>,
    /// Periods starting before this instant.
    pub before: Option<DateTime<Utc>>,
}

/// Record a batch of requests (for gateways that report usage). The batch is
/// checked, then queued for the usage writer, all or nothing.
#[utoipa::path(post, path = "/v1/usage", tag = "usage", request_body = UsageBatch,
    responses((status = 202, body = Accepted), (status = 400, body = super::error::ErrorBody),
        (status = 404, description = "a key of another tenant", body = super::error::ErrorBody),
        (status = 503, description = "the usage queue is full (`queue_full`): retry later",
            body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn record(
    State(engine): State<Engine>,
    auth: Auth,
    ApiJson(batch): ApiJson<UsageBatch>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let principal = auth.require(USAGE_WRITE)?;
    let accepted = engine
        .record_usage(&principal.tenant, batch.records)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted })))
}

async fn list_for(
    engine: &Engine,
    auth: &Auth,
    key_id: Option<KeyId>,
    query: UsageQuery,
) -> Result<Json<Page<UsageRecord>>, ApiError> {
    let principal = auth.require(USAGE_READ)?;
    let filter = UsageFilter {
        key_id,
        after: query.after,
        before: query.before,
        page: PageQuery {
            limit: query.limit,
            offset: query.offset,
        }
        .page()?,
    };
    Ok(Json(engine.list_usage(&principal.tenant, &filter).await?))
}

/// The tenant's usage records, newest first.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, body = Page<UsageRecord>), (status = 400, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn list(
    State(engine): State<Engine>,
    auth: Auth,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Json<Page<UsageRecord>>, ApiError> {
    let key_id = query.key_id.as_deref().map(parse_id).transpose()?;
    list_for(&engine, &auth, key_id, query).await
}

/// One key's usage records, newest first.
#[utoipa::path(get, path = "/v1/keys/{id}/usage", tag = "usage", params(("id" = String, Path), UsageQuery),
    responses((status = 200, body = Page<UsageRecord>), (status = 404, body = super::error::ErrorBody)),
    security(("root_key" = [])))]
pub async fn of_key(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Json<Page<UsageRecord>>, ApiError> {
    let key_id: KeyId = parse_id(&id)?;
    if query.key_id.is_some() {
        return Err(ApiError::bad_request(
            "invalid_input",
            "invalid key_id: the key is in the path",
        ));
    }
    list_for(&engine, &auth, Some(key_id), query).await
}

/// One key's usage per UTC day or month (request and error counts, total,
/// p50 and p99 latency), oldest first.
#[utoipa::path(get, path = "/v1/keys/{id}/usage/aggregate", tag = "usage",
    params(("id" = String, Path), AggregateQuery),
    responses((status = 200, body = Vec<UsageAggregate>), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody)), security(("root_key" = [])))]
pub async fn aggregate(
    State(engine): State<Engine>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<AggregateQuery>,
) -> Result<Json<Vec<UsageAggregate>>, ApiError> {
    let principal = auth.require(USAGE_READ)?;
    let key_id: KeyId = parse_id(&id)?;
    let period = query.period.parse()?;
    let rows = engine
        .usage_aggregates(
            &principal.tenant,
            &key_id,
            period,
            query.after,
            query.before,
        )
        .await?;
    Ok(Json(rows))
}
