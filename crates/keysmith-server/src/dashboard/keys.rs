//! Keys: the filtered list, the detail page, create (with the one-time
//! reveal), rotate, revoke, suspend, reactivate, edit, scopes.

use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Duration, DurationRound, NaiveDate, NaiveDateTime, Utc};
use keysmith::{
    ApiKey, CreateKey, Environment, KeyFilter, KeyId, KeyState, KeyUpdate, Metadata, PageRequest,
    PolicyId, RotateKey, RotationReason, UsagePeriod,
};
use maud::{Markup, html};

use super::charts::{self, Counts, Latency};
use super::session::{Form, field_value};
use super::views::{self, Errors, Nav};
use super::{
    DashState, PageError, Session, metadata_field, metadata_text, optional, parse_id, submit,
};
use crate::root::scopes::{KEYS_READ, KEYS_WRITE, POLICIES_READ, USAGE_READ};

/// Keys per page of the list.
pub const PER_PAGE: u64 = 25;

fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default()
}

/// The tenant's policies as select options (empty when the root key may not
/// read policies).
async fn policy_options(
    state: &DashState,
    session: &Session,
    none_label: &str,
) -> Result<Vec<(String, String)>, PageError> {
    let mut options = vec![(String::new(), none_label.to_owned())];
    if session.may(POLICIES_READ) {
        let policies = state
            .engine
            .list_policies(&session.tenant, &PageRequest::new(1000, 0)?)
            .await?;
        options.extend(
            policies
                .items
                .into_iter()
                .map(|p| (p.id.to_string(), p.spec.name)),
        );
    }
    Ok(options)
}

fn options(values: &[&str], any: &str) -> Vec<(String, String)> {
    std::iter::once((String::new(), any.to_owned()))
        .chain(values.iter().map(|v| (v.to_string(), v.to_string())))
        .collect()
}

/// `GET /dashboard/keys?state=&environment=&policy=&q=&page=`.
pub async fn list(
    State(state): State<DashState>,
    session: Session,
    RawQuery(query): RawQuery,
) -> Result<Response, PageError> {
    session.require(KEYS_READ)?;
    let pairs = query_pairs(query.as_deref());
    let (state_q, env_q, policy_q, search) = (
        field_value(&pairs, "state"),
        field_value(&pairs, "environment"),
        field_value(&pairs, "policy"),
        field_value(&pairs, "q"),
    );
    let page_no: u64 = field_value(&pairs, "page")
        .parse()
        .unwrap_or(1)
        .clamp(1, 1_000_000);
    let mut errors = Errors::new();
    let mut filter = KeyFilter::default();
    if !state_q.is_empty() {
        match state_q.parse::<KeyState>() {
            Ok(s) => filter.state = Some(s),
            Err(_) => {
                errors.insert("state", "Unknown state.".into());
            }
        }
    }
    if !env_q.is_empty() {
        match env_q.parse::<Environment>() {
            Ok(e) => filter.environment = Some(e),
            Err(_) => {
                errors.insert("environment", "Unknown environment.".into());
            }
        }
    }
    if !policy_q.is_empty() {
        match policy_q.parse::<PolicyId>() {
            Ok(p) => filter.policy_id = Some(p),
            Err(_) => {
                errors.insert("policy", "Unknown policy.".into());
            }
        }
    }
    if search.chars().count() > 100 {
        errors.insert("q", "At most 100 characters.".into());
    } else if search.chars().any(char::is_control) {
        errors.insert("q", "No control characters.".into());
    }
    let (keys, total) = if errors.is_empty() {
        find_keys(&state, &session, filter, search, page_no).await?
    } else {
        (Vec::new(), 0)
    };
    let policies = policy_options(&state, &session, "any policy").await?;
    let policy_name = |id: &Option<PolicyId>| -> String {
        id.as_ref()
            .map(|id| {
                let id = id.to_string();
                policies
                    .iter()
                    .find(|(v, _)| *v == id)
                    .map(|(_, n)| n.clone())
                    .unwrap_or(id)
            })
            .unwrap_or_else(|| "—".into())
    };
    let mut base = String::from("/dashboard/keys");
    let kept: Vec<(&str, &str)> = [
        ("state", state_q),
        ("environment", env_q),
        ("policy", policy_q),
        ("q", search),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .collect();
    if !kept.is_empty() {
        base.push('?');
        base.push_str(&serde_urlencoded::to_string(&kept).unwrap_or_default());
    }
    let now = state.engine.clock().now();
    let body = html! {
        div.actions {
            @if session.may(KEYS_WRITE) {
                a.button href="/dashboard/keys/new" { "Create a key" }
            }
        }
        form.filters method="get" action="/dashboard/keys" role="search" {
            (views::field("q", "Search", "search", search, "name or last 4 characters", &errors))
            (views::select("state", "State", &options(&["active", "suspended", "expired", "revoked"], "any state"), state_q, &errors))
            (views::select("environment", "Environment", &options(&["live", "test", "staging"], "any environment"), env_q, &errors))
            (views::select("policy", "Policy", &policies, policy_q, &errors))
            div.field { button type="submit" { "Filter" } }
        }
        @if keys.is_empty() {
            p.empty { "No keys match." }
        } @else {
            (views::table(&["Name", "Key", "Env", "State", "Policy", "Scopes", "Expires", "Last used"], html! {
                @for k in &keys {
                    tr {
                        td { a href={ "/dashboard/keys/" (k.id) } { (k.name) } }
                        td { code { (k.prefix) "_…" (k.hint) } }
                        td { (k.environment.as_str()) }
                        td { (views::state_badge(k.state)) }
                        td { (policy_name(&k.policy_id)) }
                        td { (k.scopes.join(", ")) }
                        td { (k.expires_at.map(|at| views::relative(at, now)).unwrap_or_else(|| "never".into())) }
                        td { (k.last_used_at.map(|at| views::relative(at, now)).unwrap_or_else(|| "never".into())) }
                    }
                }
            }))
        }
        (views::pager(&base, page_no, PER_PAGE, total))
    };
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok((status, views::page(&session, Nav::Keys, "Keys", body)).into_response())
}

/// One page of keys matching the filter and the search (name or hint,
/// case-insensitive, done by the store).
async fn find_keys(
    state: &DashState,
    session: &Session,
    filter: KeyFilter,
    search: &str,
    page_no: u64,
) -> Result<(Vec<ApiKey>, u64), PageError> {
    let offset = (page_no - 1) * PER_PAGE;
    let page = state
        .engine
        .list_keys(
            &session.tenant,
            &KeyFilter {
                search: (!search.is_empty()).then(|| search.to_owned()),
                page: PageRequest::new(PER_PAGE as u32, offset)?,
                ..filter
            },
        )
        .await?;
    Ok((page.items, page.total))
}

/// Loads the key at a path id for a root key that carries `scope`. The scope
/// is checked before the id is looked up, so a root key without it learns
/// nothing about which keys exist.
async fn load_key(
    state: &DashState,
    session: &Session,
    id: &str,
    scope: &str,
) -> Result<ApiKey, PageError> {
    session.require(scope)?;
    let id: KeyId = parse_id(id)?;
    Ok(state.engine.get_key(&session.tenant, &id).await?)
}

/// Back to the key's page, where a change that worked shows.
fn to_key(id: &KeyId) -> Response {
    Redirect::to(&format!("/dashboard/keys/{id}")).into_response()
}

/// The end of an action taken from a key's page (a state change, scopes):
/// back to the page when it worked, else the page again under `status` with
/// why not, and what was typed into the add-scopes field kept.
async fn back_to_key<T>(
    state: &DashState,
    session: &Session,
    key: ApiKey,
    outcome: Result<T, Errors>,
    scopes_value: &str,
    status: StatusCode,
) -> Result<Response, PageError> {
    match outcome {
        Ok(_) => Ok(to_key(&key.id)),
        Err(errors) => {
            let page = detail_page(state, session, key, &errors, scopes_value).await?;
            Ok((status, page).into_response())
        }
    }
}

/// `GET /dashboard/keys/{id}`.
pub async fn detail(
    State(state): State<DashState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let key = load_key(&state, &session, &id, KEYS_READ).await?;
    Ok(detail_page(&state, &session, key, &Errors::new(), "")
        .await?
        .into_response())
}

async fn detail_page(
    state: &DashState,
    session: &Session,
    key: ApiKey,
    errors: &Errors,
    scopes_value: &str,
) -> Result<Html<String>, PageError> {
    let engine = &state.engine;
    let now = engine.clock().now();
    let policy = match (&key.policy_id, session.may(POLICIES_READ)) {
        (Some(id), true) => match engine.get_policy(&session.tenant, id).await {
            Ok(p) => Some(p),
            Err(keysmith::Error::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        },
        _ => None,
    };
    let rotations = engine.list_rotations(&session.tenant, &key.id).await?;
    let usage = if session.may(USAGE_READ) {
        let today = now.duration_trunc(Duration::days(1)).unwrap_or(now);
        let first = today - Duration::days(29);
        let rows = engine
            .usage_aggregates(
                &session.tenant,
                &key.id,
                UsagePeriod::Day,
                Some(first),
                None,
            )
            .await?;
        let mut counts = Vec::new();
        let mut latency = Vec::new();
        for i in 0..30 {
            let day = first + Duration::days(i);
            let label = day.format("%m-%d").to_string();
            let row = rows.iter().find(|r| r.period_start == day);
            counts.push(Counts {
                label: label.clone(),
                total: row.map_or(0, |r| r.request_count),
                errors: row.map_or(0, |r| r.error_count),
            });
            latency.push(Latency {
                label,
                p50: row.map_or(0, |r| r.p50_latency_ms),
                p99: row.map_or(0, |r| r.p99_latency_ms),
            });
        }
        Some((counts, latency))
    } else {
        None
    };
    let write = session.may(KEYS_WRITE);
    let live = !key.state.is_terminal();
    let path = format!("/dashboard/keys/{}", key.id);
    let body = html! {
        p.lead {
            (views::state_badge(key.state)) " "
            code { (key.prefix) "_" (key.environment.as_str()) "_…" (key.hint) }
        }
        @if write {
            div.actions {
                @if live {
                    a.button href={ (path) "/rotate" } { "Rotate" }
                    a.button href={ (path) "/edit" } { "Edit" }
                }
                @if key.state == KeyState::Active {
                    form method="post" action={ (path) "/suspend" } {
                        (views::csrf(session))
                        button.secondary type="submit" { "Suspend" }
                    }
                }
                @if key.state == KeyState::Suspended {
                    form method="post" action={ (path) "/reactivate" } {
                        (views::csrf(session))
                        button.secondary type="submit" { "Reactivate" }
                    }
                }
                @if live {
                    a.button.danger href={ (path) "/revoke" } { "Revoke…" }
                }
            }
        }
        (views::form_error(errors))
        section {
            h2 { "Details" }
            dl.meta {
                dt { "Id" } dd { code { (key.id) } }
                dt { "Description" } dd { (key.description.as_deref().unwrap_or("—")) }
                dt { "Environment" } dd { (key.environment.as_str()) }
                dt { "Policy" } dd {
                    @match (&policy, &key.policy_id) {
                        (Some(p), _) => a href={ "/dashboard/policies/" (p.id) } { (p.spec.name) },
                        (None, Some(id)) => code { (id) },
                        (None, None) => "none",
                    }
                }
                dt { "Expires" } dd {
                    @match key.expires_at {
                        Some(at) => { (views::when(at)) " (" (views::relative(at, now)) ")" }
                        None => "never",
                    }
                }
                dt { "Last used" } dd { (views::when_opt(key.last_used_at)) }
                dt { "Created" } dd { (views::when(key.created_at)) " by " (key.created_by.as_deref().unwrap_or("—")) }
                dt { "Rotated" } dd { (views::when_opt(key.rotated_at)) }
                @if let Some(at) = key.revoked_at { dt { "Revoked" } dd { (views::when(at)) } }
                dt { "Metadata" } dd { code { (serde_json::Value::Object(key.metadata.clone())) } }
            }
        }
        section {
            h2 { "Scopes" }
            @if key.scopes.is_empty() { p.empty { "No scopes." } }
            ul.chips {
                @for scope in &key.scopes {
                    li {
                        code { (scope) }
                        @if write && live {
                            form method="post" action={ (path) "/scopes/remove" } {
                                (views::csrf(session))
                                input type="hidden" name="scope" value=(scope);
                                button.chip-x type="submit" aria-label={ "Remove " (scope) } title={ "Remove " (scope) } { "×" }
                            }
                        }
                    }
                }
            }
            @if write && live {
                form.inline method="post" action={ (path) "/scopes/add" } {
                    (views::csrf(session))
                    (views::field("scopes", "Add scopes", "text", scopes_value, "comma-separated, e.g. read:users, write", errors))
                    div.field { button type="submit" { "Add" } }
                }
            }
        }
        section {
            h2 { "Usage" }
            @match &usage {
                Some((counts, latency)) => div.charts {
                    (charts::counts("Requests per day, last 30 days", counts))
                    (charts::latency("Latency per day (p50, p99)", latency))
                },
                None => p.muted { "Usage needs the keysmith:usage:read scope." },
            }
        }
        section {
            h2 { "Rotation history" }
            @if rotations.is_empty() {
                p.empty { "Never rotated." }
            } @else {
                (views::table(&["When", "Reason", "Grace", "Old secret until", "By"], html! {
                    @for r in rotations.iter().rev() {
                        tr {
                            td { (views::when(r.created_at)) }
                            td { (r.reason.as_str()) }
                            td { (views::duration(r.grace_period)) }
                            td {
                                (views::when(r.grace_ends))
                                @if r.grace_ends > now { " " span.badge.active { "in grace" } }
                            }
                            td { (r.rotated_by.as_deref().unwrap_or("—")) }
                        }
                    }
                }))
            }
        }
    };
    Ok(views::page(session, Nav::Keys, &key.name, body))
}

/// Values of the create and edit forms.
#[derive(Debug, Default)]
struct KeyFields {
    name: String,
    description: String,
    environment: String,
    scopes: String,
    policy_id: String,
    expires_at: String,
    metadata: String,
}

impl KeyFields {
    fn from_form(form: &Form) -> Self {
        Self {
            name: form.get("name").to_owned(),
            description: form.get("description").to_owned(),
            environment: form.get("environment").to_owned(),
            scopes: form.get("scopes").to_owned(),
            policy_id: form.get("policy_id").to_owned(),
            expires_at: form.get("expires_at").to_owned(),
            metadata: form.get("metadata").to_owned(),
        }
    }
}

const KEY_FIELDS: &[&str] = &[
    "name",
    "description",
    "environment",
    "scopes",
    "policy_id",
    "expires_at",
    "metadata",
];

fn split_list(text: &str) -> Vec<String> {
    text.split([',', '\n', ' ', '\t', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Reads `2030-01-02`, `2030-01-02T15:04`, `2030-01-02 15:04[:05]` (UTC) or
/// RFC 3339.
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The parts every key form shares, checked; errors next to their fields.
struct Checked {
    environment: Option<Environment>,
    policy_id: Option<PolicyId>,
    expires_at: Option<DateTime<Utc>>,
    metadata: Metadata,
}

fn check_fields(fields: &KeyFields, now: DateTime<Utc>, errors: &mut Errors) -> Checked {
    if fields.name.is_empty() {
        errors.insert("name", "Give the key a name.".into());
    }
    let environment = optional(
        errors,
        "environment",
        &fields.environment,
        "live, test, staging or 1–16 characters of a–z and 0–9.",
        |e| e.parse().ok(),
    );
    let policy_id = optional(
        errors,
        "policy_id",
        &fields.policy_id,
        "No such policy.",
        |p| p.parse().ok(),
    );
    let expires_at = match fields.expires_at.as_str() {
        "" => None,
        t => match parse_time(t) {
            Some(t) if t <= now => {
                errors.insert("expires_at", "Must be in the future.".into());
                None
            }
            Some(t) => Some(t),
            None => {
                errors.insert(
                    "expires_at",
                    "Use a date and time like 2030-01-31 18:00 (UTC).".into(),
                );
                None
            }
        },
    };
    let metadata = metadata_field(
        errors,
        &fields.metadata,
        "Must be a JSON object, like {\"team\": \"billing\"}.",
    );
    Checked {
        environment,
        policy_id,
        expires_at,
        metadata,
    }
}

/// The create form, or with `editing` the edit form of that key: the title,
/// where it posts and where Cancel leads follow from which it is, so the GET
/// and the POST that shows it again cannot drift apart.
async fn key_form(
    state: &DashState,
    session: &Session,
    editing: Option<&ApiKey>,
    fields: &KeyFields,
    errors: &Errors,
) -> Result<Html<String>, PageError> {
    let (title, action, cancel) = match editing {
        Some(key) => (
            format!("Edit {}", key.name),
            format!("/dashboard/keys/{}/edit", key.id),
            format!("/dashboard/keys/{}", key.id),
        ),
        None => (
            "Create a key".to_owned(),
            "/dashboard/keys/new".to_owned(),
            "/dashboard/keys".to_owned(),
        ),
    };
    let policies = policy_options(state, session, "no policy").await?;
    let inputs = html! {
        (views::field("name", "Name", "text", &fields.name, "", errors))
        (views::field("description", "Description", "text", &fields.description, "optional", errors))
        @if editing.is_none() {
            (views::field("environment", "Environment", "text", &fields.environment, "live (default), test, staging or a custom name", errors))
            (views::field("scopes", "Scopes", "text", &fields.scopes, "comma-separated, e.g. read, write:builds", errors))
        }
        (views::select("policy_id", "Policy", &policies, &fields.policy_id, errors))
        (views::field("expires_at", "Expires at (UTC)", "text", &fields.expires_at, "optional, e.g. 2030-01-31 18:00; capped by the policy's maximum lifetime", errors))
        (views::textarea("metadata", "Metadata (JSON object)", &fields.metadata, "optional", errors))
    };
    let submit = html! {
        button type="submit" { @if editing.is_some() { "Save" } @else { "Create key" } }
    };
    let body = views::form_card(session, &action, errors, inputs, submit, Some(&cancel));
    Ok(views::page(session, Nav::Keys, &title, body))
}

/// `GET /dashboard/keys/new`.
pub async fn new_form(
    State(state): State<DashState>,
    session: Session,
) -> Result<Html<String>, PageError> {
    session.require(KEYS_WRITE)?;
    let fields = KeyFields {
        environment: "live".into(),
        ..KeyFields::default()
    };
    key_form(&state, &session, None, &fields, &Errors::new()).await
}

/// The one page that shows a raw key: right after create or rotate, never
/// cached.
fn reveal(session: &Session, key: &ApiKey, raw: &str, note: Markup) -> Response {
    let body = html! {
        div.banner.warn role="alert" {
            strong { "Copy this key now. " }
            "It is shown once and cannot be shown again: Keysmith keeps only its hash."
        }
        div.reveal {
            label for="raw-key" { "Raw key for " (key.name) }
            div.copy-row {
                input #raw-key type="text" readonly value=(raw) spellcheck="false" autocomplete="off";
                button type="button" data-copy="raw-key" { "Copy" }
            }
            p.hint #copy-status aria-live="polite" {}
        }
        (note)
        p { a.button href={ "/dashboard/keys/" (key.id) } { "I have copied it — go to the key" } }
    };
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        views::page(session, Nav::Keys, "Your new key", body),
    )
        .into_response()
}

/// `POST /dashboard/keys/new`.
pub async fn create(State(state): State<DashState>, form: Form) -> Result<Response, PageError> {
    let session = &form.session;
    session.require(KEYS_WRITE)?;
    let fields = KeyFields::from_form(&form);
    let now = state.engine.clock().now();
    let mut errors = Errors::new();
    let checked = check_fields(&fields, now, &mut errors);
    let request = CreateKey {
        name: fields.name.clone(),
        description: (!fields.description.is_empty()).then(|| fields.description.clone()),
        environment: checked.environment,
        scopes: split_list(&fields.scopes),
        policy_id: checked.policy_id,
        expires_at: checked.expires_at,
        metadata: checked.metadata,
        created_by: Some(session.key_id.to_string()),
        ..CreateKey::default()
    };
    let created = state.engine.create_key(&session.tenant, request);
    match submit(errors, KEY_FIELDS, created).await? {
        Ok(created) => Ok(reveal(
            session,
            &created.key,
            created.raw_key.expose_secret(),
            html! {},
        )),
        Err(errors) => {
            let page = key_form(&state, session, None, &fields, &errors).await?;
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
    }
}

fn edit_fields(key: &ApiKey) -> KeyFields {
    KeyFields {
        name: key.name.clone(),
        description: key.description.clone().unwrap_or_default(),
        policy_id: key
            .policy_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        expires_at: key
            .expires_at
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default(),
        metadata: metadata_text(&key.metadata),
        ..KeyFields::default()
    }
}

/// `GET /dashboard/keys/{id}/edit`.
pub async fn edit_form(
    State(state): State<DashState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Html<String>, PageError> {
    let key = load_key(&state, &session, &id, KEYS_WRITE).await?;
    key_form(
        &state,
        &session,
        Some(&key),
        &edit_fields(&key),
        &Errors::new(),
    )
    .await
}

/// `POST /dashboard/keys/{id}/edit`.
pub async fn edit(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    let session = &form.session;
    let key = load_key(&state, session, &id, KEYS_WRITE).await?;
    let fields = KeyFields::from_form(&form);
    let now = state.engine.clock().now();
    let mut errors = Errors::new();
    let checked = check_fields(&fields, now, &mut errors);
    let update = KeyUpdate {
        name: Some(fields.name.clone()),
        description: Some((!fields.description.is_empty()).then(|| fields.description.clone())),
        metadata: Some(checked.metadata),
        policy_id: Some(checked.policy_id),
        expires_at: Some(checked.expires_at),
    };
    let updated = state.engine.update_key(&session.tenant, &key.id, update);
    match submit(errors, KEY_FIELDS, updated).await? {
        Ok(updated) => Ok(to_key(&updated.id)),
        Err(errors) => {
            let page = key_form(&state, session, Some(&key), &fields, &errors).await?;
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
    }
}

fn rotate_page(
    session: &Session,
    key: &ApiKey,
    grace: &str,
    reason: &str,
    errors: &Errors,
) -> Html<String> {
    let reasons: Vec<(String, String)> = ["manual", "scheduled", "compromise", "policy"]
        .iter()
        .map(|r| (r.to_string(), r.to_string()))
        .collect();
    let inputs = html! {
        (views::select("reason", "Reason", &reasons, reason, errors))
        (views::field("grace_period", "Grace period", "text", grace, "e.g. 1h, 24h, 7d, or 0 to stop the old secret now; empty: the policy's, else 24h (a compromise: none)", errors))
    };
    let body = html! {
        p { "A new secret replaces the current one. The old secret keeps working during the grace period, so clients can switch over." }
        (views::form_card(
            session,
            &format!("/dashboard/keys/{}/rotate", key.id),
            errors,
            inputs,
            html! { button type="submit" { "Rotate" } },
            Some(&format!("/dashboard/keys/{}", key.id)),
        ))
    };
    views::page(session, Nav::Keys, &format!("Rotate {}", key.name), body)
}

/// `GET /dashboard/keys/{id}/rotate`.
pub async fn rotate_form(
    State(state): State<DashState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Html<String>, PageError> {
    let key = load_key(&state, &session, &id, KEYS_WRITE).await?;
    Ok(rotate_page(&session, &key, "", "manual", &Errors::new()))
}

/// `POST /dashboard/keys/{id}/rotate`: the reveal page with the new secret.
pub async fn rotate(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    let session = &form.session;
    let key = load_key(&state, session, &id, KEYS_WRITE).await?;
    let (grace, reason) = (form.get("grace_period"), form.get("reason"));
    let mut errors = Errors::new();
    let reason_parsed = match reason {
        "" => RotationReason::Manual,
        r => r.parse().unwrap_or_else(|_| {
            errors.insert("reason", "Choose a reason from the list.".into());
            RotationReason::Manual
        }),
    };
    let grace_period = optional(
        &mut errors,
        "grace_period",
        grace,
        "Use a duration like 90s, 15m, 24h or 7d.",
        |g| keysmith::duration::parse("grace_period", g).ok(),
    );
    let request = RotateKey {
        reason: reason_parsed,
        grace_period,
        rotated_by: Some(session.key_id.to_string()),
    };
    let rotated = state.engine.rotate_key(&session.tenant, &key.id, request);
    match submit(errors, &["reason", "grace_period"], rotated).await? {
        Ok(rotated) => {
            let note = html! {
                p {
                    "The previous secret keeps working until "
                    strong { (views::when(rotated.rotation.grace_ends)) } "."
                }
            };
            Ok(reveal(
                session,
                &rotated.key,
                rotated.raw_key.expose_secret(),
                note,
            ))
        }
        Err(errors) => Ok((
            StatusCode::BAD_REQUEST,
            rotate_page(session, &key, grace, reason, &errors),
        )
            .into_response()),
    }
}

fn revoke_page(session: &Session, key: &ApiKey, reason: &str, errors: &Errors) -> Html<String> {
    let inputs = html! {
        (views::field("reason", "Reason", "text", reason, "kept in the audit trail, e.g. leaked, retired", errors))
        div.field.check.invalid[errors.contains_key("confirm")] {
            label {
                input type="checkbox" name="confirm" value="yes";
                " Yes, revoke " strong { (key.name) } " for good"
            }
            @if let Some(e) = errors.get("confirm") { p.field-error role="alert" { (e) } }
        }
    };
    let body = html! {
        div.banner.bad {
            strong { "Revoking is final. " }
            "The key and any secret still in its grace period stop working at once, and it cannot be reactivated."
        }
        (views::form_card(
            session,
            &format!("/dashboard/keys/{}/revoke", key.id),
            errors,
            inputs,
            html! { button.danger type="submit" { "Revoke" } },
            Some(&format!("/dashboard/keys/{}", key.id)),
        ))
    };
    views::page(session, Nav::Keys, &format!("Revoke {}", key.name), body)
}

/// `GET /dashboard/keys/{id}/revoke`: the confirmation.
pub async fn revoke_form(
    State(state): State<DashState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Html<String>, PageError> {
    let key = load_key(&state, &session, &id, KEYS_WRITE).await?;
    Ok(revoke_page(&session, &key, "", &Errors::new()))
}

/// `POST /dashboard/keys/{id}/revoke`.
pub async fn revoke(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    let session = &form.session;
    let key = load_key(&state, session, &id, KEYS_WRITE).await?;
    let reason = form.get("reason");
    let mut errors = Errors::new();
    if reason.is_empty() {
        errors.insert("reason", "Say why (it is kept in the audit trail).".into());
    } else if reason.chars().count() > 500 {
        errors.insert("reason", "At most 500 characters.".into());
    }
    if form.get("confirm") != "yes" {
        errors.insert("confirm", "Tick the box to confirm.".into());
    }
    let revoked = state
        .engine
        .revoke_key(&session.tenant, &key.id, Some(reason));
    match submit(errors, &["reason"], revoked).await? {
        Ok(_) => Ok(to_key(&key.id)),
        Err(errors) => Ok((
            StatusCode::BAD_REQUEST,
            revoke_page(session, &key, reason, &errors),
        )
            .into_response()),
    }
}

async fn state_change(
    state: &DashState,
    form: &Form,
    id: &str,
    suspend: bool,
) -> Result<Response, PageError> {
    let session = &form.session;
    let key = load_key(state, session, id, KEYS_WRITE).await?;
    let change = async {
        if suspend {
            state.engine.suspend_key(&session.tenant, &key.id).await
        } else {
            state.engine.reactivate_key(&session.tenant, &key.id).await
        }
    };
    let outcome = submit(Errors::new(), &[], change).await?;
    back_to_key(state, session, key, outcome, "", StatusCode::CONFLICT).await
}

/// `POST /dashboard/keys/{id}/suspend`.
pub async fn suspend(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    state_change(&state, &form, &id, true).await
}

/// `POST /dashboard/keys/{id}/reactivate`.
pub async fn reactivate(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    state_change(&state, &form, &id, false).await
}

/// `POST /dashboard/keys/{id}/scopes/add`.
pub async fn add_scopes(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    let session = &form.session;
    let key = load_key(&state, session, &id, KEYS_WRITE).await?;
    let text = form.get("scopes");
    let scopes = split_list(text);
    let errors = if scopes.is_empty() {
        Errors::from([("scopes", "Name at least one scope.".to_owned())])
    } else {
        Errors::new()
    };
    let assigned = state.engine.assign_scopes(&session.tenant, &key.id, scopes);
    let outcome = submit(errors, &["scopes"], assigned).await?;
    back_to_key(&state, session, key, outcome, text, StatusCode::BAD_REQUEST).await
}

/// `POST /dashboard/keys/{id}/scopes/remove`.
pub async fn remove_scope(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    let session = &form.session;
    let key = load_key(&state, session, &id, KEYS_WRITE).await?;
    let scope = form.get("scope");
    if scope.is_empty() {
        return Err(PageError::BadRequest("No scope named.".into()));
    }
    let removed = state
        .engine
        .remove_scopes(&session.tenant, &key.id, vec![scope.to_owned()]);
    let outcome = submit(Errors::new(), &["scopes"], removed).await?;
    back_to_key(&state, session, key, outcome, "", StatusCode::BAD_REQUEST).await
}
