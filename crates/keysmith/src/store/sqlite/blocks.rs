//! Raw usage in blocks (migration `0004_usage_blocks.sql`): a written batch
//! keeps each key's records in one row of `keysmith_usage_blocks`, a JSON
//! array, with the key, the tenant, the record count and the block's time
//! bounds (`first_at`, `last_at`) as indexed columns.
//!
//! Writing costs one row per key and batch instead of one per request.
//! Reading decodes blocks: the readers walk them in the order of a time
//! bound, a few at a time, and stop as soon as no further block can hold a
//! record of the answer (a list's page, the aggregation's next page, the
//! oldest records to purge), so a read costs what it returns plus the
//! blocks across its bounds, not the whole table. Counting a range needs no
//! decoding except for the blocks that reach across its bounds.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::{from_ts, get, ts};
use crate::error::{Error, ResourceKind, Result};
use crate::id::{KeyId, UsageId};
use crate::model::{Metadata, Tenant, UsageFilter, UsageRecord};
use crate::store::sql::{MAX_BATCH, corrupt, db_error};

/// Blocks read per statement while walking them.
const BLOCKS_PER_READ: i64 = 32;

/// A record as its block keeps it (the block has its key and tenant).
type Packed = (
    UsageId,
    String,
    String,
    u16,
    Option<String>,
    Option<String>,
    u64,
    Metadata,
    i64,
);

/// [`Packed`], borrowed from a record.
type PackedRef<'a> = (
    UsageId,
    &'a str,
    &'a str,
    u16,
    Option<&'a str>,
    Option<&'a str>,
    u64,
    &'a Metadata,
    i64,
);

/// One key's records, encoded for a block row.
#[derive(Debug)]
pub(super) struct Packing<'a> {
    pub key_id: String,
    pub app_id: &'a str,
    pub tenant_id: &'a str,
    pub first_at: i64,
    pub last_at: i64,
    pub records: i64,
    pub data: String,
}

/// Encodes records that share a key and tenant (`records` is not empty).
fn pack<'a>(records: &[&'a UsageRecord]) -> Result<Packing<'a>> {
    let first = records[0];
    let packed: Vec<PackedRef<'_>> = records
        .iter()
        .map(|r| {
            (
                r.id,
                r.endpoint.as_str(),
                r.method.as_str(),
                r.status_code,
                r.ip.as_deref(),
                r.user_agent.as_deref(),
                r.latency_ms,
                &r.metadata,
                ts(r.created_at),
            )
        })
        .collect();
    let times = packed.iter().map(|p| p.8);
    Ok(Packing {
        key_id: first.key_id.to_string(),
        app_id: &first.app_id,
        tenant_id: &first.tenant_id,
        first_at: times.clone().min().unwrap_or_default(),
        last_at: times.max().unwrap_or_default(),
        records: packed.len() as i64,
        data: serde_json::to_string(&packed).map_err(Error::store)?,
    })
}

/// A batch cut into one block per key and tenant, in the order each key
/// first appears.
pub(super) fn pack_batch(records: &[UsageRecord]) -> Result<Vec<Packing<'_>>> {
    let mut index: HashMap<(KeyId, &str, &str), usize> = HashMap::new();
    let mut groups: Vec<Vec<&UsageRecord>> = Vec::new();
    for r in records {
        let group = *index
            .entry((r.key_id, r.app_id.as_str(), r.tenant_id.as_str()))
            .or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
        groups[group].push(r);
    }
    groups.iter().map(|group| pack(group)).collect()
}

/// A stored block, decoded.
#[derive(Debug)]
struct Block {
    id: i64,
    first_at: i64,
    last_at: i64,
    records: Vec<UsageRecord>,
}

fn block_from(row: &SqliteRow) -> Result<Block> {
    let key_id: KeyId = crate::store::sql::parse("key id", &get::<String>(row, "key_id")?)?;
    let app_id: String = get(row, "app_id")?;
    let tenant_id: String = get(row, "tenant_id")?;
    let data: &str = get(row, "data")?;
    let packed: Vec<Packed> = serde_json::from_str(data).map_err(|e| corrupt("usage block", e))?;
    let records = packed
        .into_iter()
        .map(
            |(id, endpoint, method, status_code, ip, user_agent, latency_ms, metadata, at)| {
                Ok(UsageRecord {
                    id,
                    key_id,
                    app_id: app_id.clone(),
                    tenant_id: tenant_id.clone(),
                    endpoint,
                    method,
                    status_code,
                    ip,
                    user_agent,
                    latency_ms,
                    metadata,
                    created_at: from_ts("created_at", at)?,
                })
            },
        )
        .collect::<Result<_>>()?;
    Ok(Block {
        id: get(row, "id")?,
        first_at: get(row, "first_at")?,
        last_at: get(row, "last_at")?,
        records,
    })
}

/// The order blocks are walked in.
#[derive(Debug, Clone, Copy)]
enum Walk {
    /// Newest first, by `last_at`: no later block holds a record newer than
    /// the current block's `last_at`.
    NewestFirst,
    /// Oldest first, by `first_at`: no later block holds a record older than
    /// the current block's `first_at`.
    OldestFirst,
}

/// Conditions on blocks, `AND`ed after a `WHERE`.
#[derive(Debug, Default, Clone)]
struct Blocks {
    app_id: Option<String>,
    tenant_id: Option<String>,
    key_id: Option<String>,
    /// `last_at >= .`: the block reaches this time or later.
    reaches: Option<i64>,
    /// `first_at < .`: the block starts before this time.
    starts_before: Option<i64>,
    /// Only blocks not wholly within `[reaches, starts_before)` (the ones
    /// whose records must be looked at to count a range).
    across_bounds: bool,
    /// Only blocks wholly within `[.0, .1)`.
    within: Option<(Option<i64>, Option<i64>)>,
}

impl Blocks {
    fn push(&self, q: &mut QueryBuilder<'_, Sqlite>) {
        q.push(" WHERE 1 = 1");
        if let Some(app_id) = &self.app_id {
            q.push(" AND app_id = ").push_bind(app_id.clone());
        }
        if let Some(tenant_id) = &self.tenant_id {
            q.push(" AND tenant_id = ").push_bind(tenant_id.clone());
        }
        if let Some(key_id) = &self.key_id {
            q.push(" AND key_id = ").push_bind(key_id.clone());
        }
        if let Some(at) = self.reaches {
            q.push(" AND last_at >= ").push_bind(at);
        }
        if let Some(at) = self.starts_before {
            q.push(" AND first_at < ").push_bind(at);
        }
        if self.across_bounds {
            q.push(" AND (0");
            if let Some(at) = self.reaches {
                q.push(" OR first_at < ").push_bind(at);
            }
            if let Some(at) = self.starts_before {
                q.push(" OR last_at >= ").push_bind(at);
            }
            q.push(")");
        }
        if let Some((from, until)) = self.within {
            if let Some(at) = from {
                q.push(" AND first_at >= ").push_bind(at);
            }
            if let Some(at) = until {
                q.push(" AND last_at < ").push_bind(at);
            }
        }
    }

    /// Visits the blocks in `walk` order, a few at a time, until `visit`
    /// returns `false`.
    async fn walk(
        &self,
        conn: &mut SqliteConnection,
        walk: Walk,
        mut visit: impl FnMut(Block) -> Result<bool>,
    ) -> Result<()> {
        let mut after: Option<(i64, i64)> = None;
        loop {
            let mut q = QueryBuilder::new(
                "SELECT id, key_id, app_id, tenant_id, first_at, last_at, data \
                 FROM keysmith_usage_blocks",
            );
            self.push(&mut q);
            match (walk, after) {
                (Walk::NewestFirst, Some((at, id))) => {
                    q.push(" AND (last_at, id) < (").push_bind(at);
                    q.push(", ").push_bind(id).push(")");
                }
                (Walk::OldestFirst, Some((at, id))) => {
                    q.push(" AND (first_at, id) > (").push_bind(at);
                    q.push(", ").push_bind(id).push(")");
                }
                (_, None) => {}
            }
            q.push(match walk {
                Walk::NewestFirst => " ORDER BY last_at DESC, id DESC LIMIT ",
                Walk::OldestFirst => " ORDER BY first_at, id LIMIT ",
            });
            q.push_bind(BLOCKS_PER_READ);
            let rows = q
                .build()
                .fetch_all(&mut *conn)
                .await
                .map_err(Error::store)?;
            for row in &rows {
                let block = block_from(row)?;
                after = Some(match walk {
                    Walk::NewestFirst => (block.last_at, block.id),
                    Walk::OldestFirst => (block.first_at, block.id),
                });
                if !visit(block)? {
                    return Ok(());
                }
            }
            if (rows.len() as i64) < BLOCKS_PER_READ {
                return Ok(());
            }
        }
    }

    /// The first `n` items, in `walk` order of their `(created_at, id)`
    /// (`key`), of those `take` draws from each block: blocks are walked
    /// until no later one can hold an item that comes before the `n`th kept.
    async fn first_n<T>(
        &self,
        conn: &mut SqliteConnection,
        walk: Walk,
        n: usize,
        key: impl Fn(&T) -> (DateTime<Utc>, UsageId),
        mut take: impl FnMut(Block, &mut Vec<T>),
    ) -> Result<Vec<T>> {
        let mut kept: Vec<T> = Vec::new();
        if n == 0 {
            return Ok(kept);
        }
        let order = |a: &T, b: &T| match walk {
            Walk::NewestFirst => key(b).cmp(&key(a)),
            Walk::OldestFirst => key(a).cmp(&key(b)),
        };
        self.walk(conn, walk, |block| {
            if let Some(nth) = kept.get(n - 1) {
                let bound = ts(key(nth).0);
                let beyond = match walk {
                    Walk::NewestFirst => block.last_at < bound,
                    Walk::OldestFirst => block.first_at > bound,
                };
                if beyond {
                    return Ok(false);
                }
            }
            take(block, &mut kept);
            if kept.len() >= n {
                kept.sort_unstable_by(order);
                kept.truncate(n);
            }
            Ok(true)
        })
        .await?;
        kept.sort_unstable_by(order);
        Ok(kept)
    }
}

/// Newest first: `created_at`, then id, both descending.
fn newest_first(a: &UsageRecord, b: &UsageRecord) -> std::cmp::Ordering {
    (b.created_at, b.id).cmp(&(a.created_at, a.id))
}

/// The tenant's records that `filter` selects: the total, and its page,
/// newest first.
pub(super) async fn list(
    conn: &mut SqliteConnection,
    tenant: &Tenant,
    filter: &UsageFilter,
) -> Result<(u64, Vec<UsageRecord>)> {
    let limit = filter.page.limit.min(MAX_BATCH) as usize;
    let offset = usize::try_from(filter.page.offset).unwrap_or(usize::MAX);
    let (after, before) = (filter.after.map(ts), filter.before.map(ts));
    let in_range = |r: &UsageRecord| {
        let at = ts(r.created_at);
        after.is_none_or(|a| at >= a) && before.is_none_or(|b| at < b)
    };
    let blocks = Blocks {
        app_id: Some(tenant.app_id.clone()),
        tenant_id: Some(tenant.tenant_id.clone()),
        key_id: filter.key_id.map(|k| k.to_string()),
        reaches: after,
        starts_before: before,
        ..Blocks::default()
    };
    // The total: blocks wholly in the range by their count, the others by
    // their records.
    let mut q = QueryBuilder::new("SELECT coalesce(sum(records), 0) FROM keysmith_usage_blocks");
    Blocks {
        within: Some((after, before)),
        ..blocks.clone()
    }
    .push(&mut q);
    let whole: i64 = q
        .build_query_scalar()
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::store)?;
    let mut total = u64::try_from(whole).map_err(|e| corrupt("usage block count", e))?;
    if after.is_some() || before.is_some() {
        Blocks {
            across_bounds: true,
            ..blocks.clone()
        }
        .walk(conn, Walk::OldestFirst, |block| {
            total += block.records.iter().filter(|r| in_range(r)).count() as u64;
            Ok(true)
        })
        .await?;
    }
    if limit == 0 || offset as u64 >= total {
        return Ok((total, Vec::new()));
    }
    // The page's bounds: the (time, id) of the `offset + limit` newest
    // records (only those, not the records), from the newest blocks until no
    // block left can hold a newer record than the last of them.
    let want = offset.saturating_add(limit);
    let newest = blocks
        .first_n(
            conn,
            Walk::NewestFirst,
            want,
            |k| *k,
            |block, kept| {
                kept.extend(
                    block
                        .records
                        .iter()
                        .filter(|r| in_range(r))
                        .map(|r| (r.created_at, r.id)),
                );
            },
        )
        .await?;
    let (Some(&first), Some(&last)) = (newest.get(offset), newest.get(want - 1).or(newest.last()))
    else {
        return Ok((total, Vec::new()));
    };
    // The page itself: the records between those bounds.
    let mut page: Vec<UsageRecord> = Vec::with_capacity(limit);
    Blocks {
        reaches: Some(ts(last.0)),
        starts_before: Some(ts(first.0).saturating_add(1)),
        ..blocks
    }
    .walk(conn, Walk::NewestFirst, |block| {
        page.extend(block.records.into_iter().filter(|r| {
            let at = (r.created_at, r.id);
            in_range(r) && last <= at && at <= first
        }));
        Ok(true)
    })
    .await?;
    page.sort_unstable_by(newest_first);
    Ok((total, page))
}

/// Every tenant's records in `[after, before)` that come after `from`,
/// oldest first, at most `limit`.
pub(super) async fn between(
    conn: &mut SqliteConnection,
    after: DateTime<Utc>,
    before: DateTime<Utc>,
    from: Option<(DateTime<Utc>, UsageId)>,
    limit: usize,
) -> Result<Vec<UsageRecord>> {
    let start = from.map_or(after, |(at, _)| at.max(after));
    let wanted = |r: &UsageRecord| {
        r.created_at >= after
            && r.created_at < before
            && from.is_none_or(|from| (r.created_at, r.id) > from)
    };
    let blocks = Blocks {
        reaches: Some(ts(start)),
        starts_before: Some(ts(before)),
        ..Blocks::default()
    };
    blocks
        .first_n(
            conn,
            Walk::OldestFirst,
            limit,
            |r: &UsageRecord| (r.created_at, r.id),
            |block, kept| kept.extend(block.records.into_iter().filter(|r| wanted(r))),
        )
        .await
}

/// Deletes the `limit` oldest records created before `cutoff`: blocks left
/// empty go, the others are rewritten without them. Returns how many went.
pub(super) async fn purge(
    conn: &mut SqliteConnection,
    cutoff: DateTime<Utc>,
    limit: usize,
) -> Result<u64> {
    let blocks = Blocks {
        starts_before: Some(ts(cutoff)),
        ..Blocks::default()
    };
    // The candidates, oldest first, with their block.
    let mut touched: HashMap<i64, Block> = HashMap::new();
    let doomed = blocks
        .first_n(
            conn,
            Walk::OldestFirst,
            limit,
            |d: &(DateTime<Utc>, UsageId, i64)| (d.0, d.1),
            |block, kept| {
                kept.extend(
                    block
                        .records
                        .iter()
                        .filter(|r| r.created_at < cutoff)
                        .map(|r| (r.created_at, r.id, block.id)),
                );
                touched.insert(block.id, block);
            },
        )
        .await?;
    let mut per_block: HashMap<i64, std::collections::HashSet<UsageId>> = HashMap::new();
    for (_, id, block) in &doomed {
        per_block.entry(*block).or_default().insert(*id);
    }
    for (block_id, ids) in per_block {
        let Some(block) = touched.get(&block_id) else {
            continue;
        };
        let kept: Vec<&UsageRecord> = block
            .records
            .iter()
            .filter(|r| !ids.contains(&r.id))
            .collect();
        if kept.is_empty() {
            sqlx::query("DELETE FROM keysmith_usage_blocks WHERE id = ?")
                .bind(block_id)
                .execute(&mut *conn)
                .await
                .map_err(Error::store)?;
        } else {
            let packing = pack(&kept)?;
            sqlx::query(
                "UPDATE keysmith_usage_blocks SET first_at = ?, last_at = ?, records = ?, \
                 data = ? WHERE id = ?",
            )
            .bind(packing.first_at)
            .bind(packing.last_at)
            .bind(packing.records)
            .bind(packing.data)
            .bind(block_id)
            .execute(&mut *conn)
            .await
            .map_err(db_error(ResourceKind::Usage))?;
        }
    }
    Ok(doomed.len() as u64)
}
