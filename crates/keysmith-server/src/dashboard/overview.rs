//! The overview: keys by state and environment, usage over the last 24 hours
//! and 30 days, keys close to expiry, keys due for rotation, recently used keys.

use std::collections::HashMap;

use axum::extract::State;
use axum::response::Html;
use chrono::{DateTime, Duration, DurationRound, Utc};
use keysmith::{
    ApiKey, Engine, Environment, KeyFilter, KeyState, PageRequest, Tenant, UsageFilter,
};
use maud::{Markup, html};

use super::charts::{self, Counts};
use super::views::{self, Nav};
use super::{DashState, PageError, Session};
use crate::root::scopes::{KEYS_READ, POLICIES_READ, USAGE_READ};

/// Keys within this of their expiry are "close to expiry".
const EXPIRY_WINDOW_DAYS: i64 = 7;
/// Most keys read to find those close to expiry, due or recently used.
const KEY_SCAN: u64 = 5000;
/// Most usage records read for the charts.
const USAGE_SCAN: u64 = 20_000;
/// Rows in each short list.
const SHORT_LIST: usize = 8;

const STATES: [KeyState; 4] = [
    KeyState::Active,
    KeyState::Suspended,
    KeyState::Expired,
    KeyState::Revoked,
];
const ENVIRONMENTS: [Environment; 3] = [Environment::Live, Environment::Test, Environment::Staging];

async fn count(engine: &Engine, tenant: &Tenant, filter: KeyFilter) -> Result<u64, PageError> {
    let filter = KeyFilter {
        page: PageRequest::new(1, 0)?,
        ..filter
    };
    Ok(engine.list_keys(tenant, &filter).await?.total)
}

/// Keys in `state`, newest first, up to [`KEY_SCAN`].
pub async fn scan_keys(
    engine: &Engine,
    tenant: &Tenant,
    filter: KeyFilter,
) -> Result<(Vec<ApiKey>, bool), PageError> {
    let mut keys = Vec::new();
    let mut offset = 0;
    loop {
        let page = engine
            .list_keys(
                tenant,
                &KeyFilter {
                    page: PageRequest::new(1000, offset)?,
                    ..filter.clone()
                },
            )
            .await?;
        let got = page.items.len() as u64;
        keys.extend(page.items);
        offset += got;
        if got < 1000 || offset >= page.total {
            return Ok((keys, false));
        }
        if offset >= KEY_SCAN {
            return Ok((keys, true));
        }
    }
}

/// When each key under a policy with a rotation period is due: the later of
/// its creation and last rotation, plus the period.
pub async fn rotation_due_at(
    engine: &Engine,
    tenant: &Tenant,
    keys: &[ApiKey],
) -> Result<Vec<(ApiKey, DateTime<Utc>)>, PageError> {
    let policies = engine
        .list_policies(tenant, &PageRequest::new(1000, 0)?)
        .await?;
    let periods: HashMap<_, _> = policies
        .items
        .iter()
        .filter_map(|p| Some((p.id, p.spec.rotation_period?)))
        .collect();
    Ok(keys
        .iter()
        .filter_map(|k| {
            let period = periods.get(k.policy_id.as_ref()?)?;
            let from = k.rotated_at.unwrap_or(k.created_at);
            Some((k.clone(), from + Duration::from_std(*period).ok()?))
        })
        .collect())
}

struct Usage {
    day: Vec<Counts>,
    month: Vec<Counts>,
    truncated: bool,
}

async fn usage(engine: &Engine, tenant: &Tenant, now: DateTime<Utc>) -> Result<Usage, PageError> {
    let hour = now.duration_trunc(Duration::hours(1)).unwrap_or(now);
    let day = now.duration_trunc(Duration::days(1)).unwrap_or(now);
    let first_hour = hour - Duration::hours(23);
    let first_day = day - Duration::days(29);
    let mut hours: Vec<Counts> = (0..24)
        .map(|i| Counts {
            label: (first_hour + Duration::hours(i))
                .format("%H:00")
                .to_string(),
            total: 0,
            errors: 0,
        })
        .collect();
    let mut days: Vec<Counts> = (0..30)
        .map(|i| Counts {
            label: (first_day + Duration::days(i)).format("%m-%d").to_string(),
            total: 0,
            errors: 0,
        })
        .collect();
    let mut offset = 0;
    let mut truncated = false;
    loop {
        let page = engine
            .list_usage(
                tenant,
                &UsageFilter {
                    key_id: None,
                    after: Some(first_day),
                    before: None,
                    page: PageRequest::new(1000, offset)?,
                },
            )
            .await?;
        let got = page.items.len() as u64;
        for record in &page.items {
            let error = u64::from(record.status_code >= 400);
            let d = (record.created_at - first_day).num_days();
            if let Some(slot) = usize::try_from(d).ok().and_then(|d| days.get_mut(d)) {
                slot.total += 1;
                slot.errors += error;
            }
            let h = (record.created_at - first_hour).num_hours();
            if record.created_at >= first_hour {
                if let Some(slot) = usize::try_from(h).ok().and_then(|h| hours.get_mut(h)) {
                    slot.total += 1;
                    slot.errors += error;
                }
            }
        }
        offset += got;
        if got < 1000 || offset >= page.total {
            break;
        }
        if offset >= USAGE_SCAN {
            truncated = true;
            break;
        }
    }
    Ok(Usage {
        day: hours,
        month: days,
        truncated,
    })
}

/// `GET /dashboard`.
pub async fn page(
    State(state): State<DashState>,
    session: Session,
) -> Result<Html<String>, PageError> {
    session.require(KEYS_READ)?;
    let engine = &state.engine;
    let tenant = &session.tenant;
    let now = engine.clock().now();

    // Keys by state × environment.
    let mut grid = Vec::new();
    for s in STATES {
        let all = count(
            engine,
            tenant,
            KeyFilter {
                state: Some(s),
                ..KeyFilter::default()
            },
        )
        .await?;
        let mut row = Vec::new();
        for env in ENVIRONMENTS {
            row.push(
                count(
                    engine,
                    tenant,
                    KeyFilter {
                        state: Some(s),
                        environment: Some(env),
                        ..KeyFilter::default()
                    },
                )
                .await?,
            );
        }
        let other = all.saturating_sub(row.iter().sum());
        grid.push((s, row, other, all));
    }

    let (active, scan_truncated) = scan_keys(
        engine,
        tenant,
        KeyFilter {
            state: Some(KeyState::Active),
            ..KeyFilter::default()
        },
    )
    .await?;
    let horizon = now + Duration::days(EXPIRY_WINDOW_DAYS);
    let mut expiring: Vec<&ApiKey> = active
        .iter()
        .filter(|k| k.expires_at.is_some_and(|at| at <= horizon))
        .collect();
    expiring.sort_by_key(|k| k.expires_at);
    let mut due = if session.may(POLICIES_READ) {
        // The store finds the due keys (the engine passes its clock's now);
        // their due instants are worked out for display.
        let due_keys = engine
            .list_keys(
                tenant,
                &KeyFilter {
                    rotation_due: true,
                    page: PageRequest::new(SHORT_LIST as u32, 0)?,
                    ..KeyFilter::default()
                },
            )
            .await?;
        rotation_due_at(engine, tenant, &due_keys.items).await?
    } else {
        Vec::new()
    };
    due.sort_by_key(|(_, at)| *at);
    let mut recent: Vec<&ApiKey> = active.iter().filter(|k| k.last_used_at.is_some()).collect();
    recent.sort_by_key(|k| std::cmp::Reverse(k.last_used_at));

    let usage = if session.may(USAGE_READ) {
        Some(usage(engine, tenant, now).await?)
    } else {
        None
    };

    let key_link = |k: &ApiKey| {
        html! { a href={ "/dashboard/keys/" (k.id) } { (k.name) } " " span.muted { "…" (k.hint) } }
    };
    let body = html! {
        section.cards {
            @for (s, _, _, all) in &grid {
                a.stat href={ "/dashboard/keys?state=" (s.as_str()) } {
                    span.num { (all) }
                    span { (views::state_badge(*s)) }
                }
            }
        }
        section {
            h2 { "Keys by state and environment" }
            (views::table(&["State", "live", "test", "staging", "other", "all"], html! {
                @for (s, row, other, all) in &grid {
                    tr {
                        th scope="row" { (views::state_badge(*s)) }
                        @for (env, n) in ENVIRONMENTS.iter().zip(row) {
                            td.num { a href={ "/dashboard/keys?state=" (s.as_str()) "&environment=" (env.as_str()) } { (n) } }
                        }
                        td.num { (other) }
                        td.num { strong { (all) } }
                    }
                }
            }))
        }
        section {
            h2 { "Usage" }
            @match &usage {
                Some(u) => {
                    div.charts {
                        (charts::counts("Last 24 hours, per hour", &u.day))
                        (charts::counts("Last 30 days, per day", &u.month))
                    }
                    @if u.truncated {
                        p.muted { "Only the latest " (USAGE_SCAN) " requests are counted." }
                    }
                }
                None => p.muted { "Usage needs the keysmith:usage:read scope." }
            }
        }
        div.columns {
            section {
                h2 { "Close to expiry" }
                p.muted { "Active keys expiring within " (EXPIRY_WINDOW_DAYS) " days." }
                (short_list(&expiring.iter().map(|k| (key_link(k), k.expires_at.map(|at| views::relative(at, now)).unwrap_or_default())).collect::<Vec<_>>()))
            }
            section {
                h2 { "Due for rotation" }
                p.muted { "Active keys past their policy's rotation period." }
                (short_list(&due.iter().map(|(k, at)| (key_link(k), format!("due {}", views::relative(*at, now)))).collect::<Vec<_>>()))
            }
            section {
                h2 { "Recently used" }
                p.muted { "Latest successful validations." }
                (short_list(&recent.iter().map(|k| (key_link(k), k.last_used_at.map(|at| views::relative(at, now)).unwrap_or_default())).collect::<Vec<_>>()))
            }
        }
        @if scan_truncated {
            p.muted { "Lists consider the newest " (KEY_SCAN) " active keys." }
        }
    };
    Ok(views::page(&session, Nav::Overview, "Overview", body))
}

fn short_list(rows: &[(Markup, String)]) -> Markup {
    html! {
        @if rows.is_empty() {
            p.empty { "None." }
        } @else {
            ul.short {
                @for (link, note) in rows.iter().take(SHORT_LIST) {
                    li { (link) span.note { (note) } }
                }
            }
            @if rows.len() > SHORT_LIST { p.muted { "and " (rows.len() - SHORT_LIST) " more" } }
        }
    }
}
