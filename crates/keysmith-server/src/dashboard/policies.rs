//! Policies: list, detail (with the keys under it), create, edit, delete.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use keysmith::{KeyFilter, PageRequest, Policy, PolicyId, PolicySpec};
use maud::html;

use super::session::Form;
use super::views::{self, Errors, Nav};
use super::{
    DashState, PageError, Session, metadata_field, metadata_text, optional, parse_id, submit,
};
use crate::root::scopes::{KEYS_READ, POLICIES_READ, POLICIES_WRITE};

const LISTS: &[(&str, &str, &str)] = &[
    (
        "allowed_scopes",
        "Allowed scopes",
        "scopes keys under it may hold, e.g. read, write:builds",
    ),
    (
        "allowed_ips",
        "Allowed IPs",
        "IPs or CIDR ranges, e.g. 10.0.0.0/8, 2001:db8::/32",
    ),
    (
        "allowed_origins",
        "Allowed origins",
        "e.g. https://app.example.com, https://*.example.com",
    ),
    ("allowed_methods", "Allowed methods", "e.g. GET, POST"),
    (
        "allowed_paths",
        "Allowed paths",
        "prefixes or globs, e.g. /v1/users, /v1/*/items",
    ),
];
const DURATIONS: &[(&str, &str, &str)] = &[
    (
        "rate_limit_window",
        "Rate limit window",
        "e.g. 1s, 1m (default 1s)",
    ),
    ("max_key_lifetime", "Maximum key lifetime", "e.g. 90d"),
    (
        "rotation_period",
        "Rotation period",
        "keys are due for rotation after this, e.g. 30d",
    ),
    (
        "grace_period",
        "Grace period",
        "for rotations that give none, e.g. 24h",
    ),
];
const NUMBERS: &[(&str, &str, &str)] = &[
    ("rate_limit", "Rate limit", "requests per window"),
    ("burst_limit", "Burst", "extra requests allowed in a burst"),
    (
        "daily_quota",
        "Daily quota",
        "successful validations per UTC day",
    ),
    (
        "monthly_quota",
        "Monthly quota",
        "successful validations per UTC month",
    ),
];
const FIELDS: &[&str] = &[
    "name",
    "description",
    "allowed_scopes",
    "allowed_ips",
    "allowed_origins",
    "allowed_methods",
    "allowed_paths",
    "rate_limit_window",
    "max_key_lifetime",
    "rotation_period",
    "grace_period",
    "rate_limit",
    "burst_limit",
    "daily_quota",
    "monthly_quota",
    "metadata",
];

/// The form's values by field name, as typed.
type Values = Vec<(&'static str, String)>;

fn value<'a>(values: &'a Values, name: &str) -> &'a str {
    values
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn values_of(spec: &PolicySpec) -> Values {
    let opt_num = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
    let opt_dur = |d: Option<std::time::Duration>| d.map(views::duration).unwrap_or_default();
    vec![
        ("name", spec.name.clone()),
        ("description", spec.description.clone().unwrap_or_default()),
        ("allowed_scopes", spec.allowed_scopes.join("\n")),
        ("allowed_ips", spec.allowed_ips.join("\n")),
        ("allowed_origins", spec.allowed_origins.join("\n")),
        ("allowed_methods", spec.allowed_methods.join("\n")),
        ("allowed_paths", spec.allowed_paths.join("\n")),
        ("rate_limit_window", opt_dur(spec.rate_limit_window)),
        ("max_key_lifetime", opt_dur(spec.max_key_lifetime)),
        ("rotation_period", opt_dur(spec.rotation_period)),
        ("grace_period", opt_dur(spec.grace_period)),
        ("rate_limit", opt_num(spec.rate_limit)),
        ("burst_limit", opt_num(spec.burst_limit)),
        ("daily_quota", opt_num(spec.daily_quota)),
        ("monthly_quota", opt_num(spec.monthly_quota)),
        ("metadata", metadata_text(&spec.metadata)),
    ]
}

fn list_entries(text: &str) -> Vec<String> {
    text.split([',', '\n', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Reads the form into a spec; what does not parse is an error next to its
/// field (the engine checks the rest: CIDRs, origins, paths).
fn spec_of(form: &Form, errors: &mut Errors) -> (Values, PolicySpec) {
    let values: Values = FIELDS
        .iter()
        .map(|f| (*f, form.get(f).to_owned()))
        .collect();
    let mut spec = PolicySpec {
        name: value(&values, "name").to_owned(),
        ..PolicySpec::default()
    };
    if spec.name.is_empty() {
        errors.insert("name", "Give the policy a name.".into());
    }
    let description = value(&values, "description");
    spec.description = (!description.is_empty()).then(|| description.to_owned());
    spec.allowed_scopes = list_entries(value(&values, "allowed_scopes"));
    spec.allowed_ips = list_entries(value(&values, "allowed_ips"));
    spec.allowed_origins = list_entries(value(&values, "allowed_origins"));
    spec.allowed_methods = list_entries(value(&values, "allowed_methods"));
    spec.allowed_paths = list_entries(value(&values, "allowed_paths"));
    let duration = |name: &'static str, errors: &mut Errors| {
        optional(
            errors,
            name,
            value(&values, name),
            "Use a duration like 90s, 15m, 24h or 90d.",
            |text| keysmith::duration::parse(name, text).ok(),
        )
    };
    spec.rate_limit_window = duration("rate_limit_window", errors);
    spec.max_key_lifetime = duration("max_key_lifetime", errors);
    spec.rotation_period = duration("rotation_period", errors);
    spec.grace_period = duration("grace_period", errors);
    let number = |name: &'static str, errors: &mut Errors| {
        optional(
            errors,
            name,
            value(&values, name),
            "Use a whole number (0 or more).",
            |text| text.parse::<u64>().ok(),
        )
    };
    spec.rate_limit = number("rate_limit", errors);
    spec.burst_limit = number("burst_limit", errors);
    spec.daily_quota = number("daily_quota", errors);
    spec.monthly_quota = number("monthly_quota", errors);
    spec.metadata = metadata_field(errors, value(&values, "metadata"), "Must be a JSON object.");
    (values, spec)
}

/// The create form, or with `editing` the edit form of that policy: the
/// title, where it posts and where Cancel leads follow from which it is, so
/// the GET and the POST that shows it again cannot drift apart.
fn policy_form(
    session: &Session,
    editing: Option<&Policy>,
    values: &Values,
    errors: &Errors,
) -> Html<String> {
    let (title, action, cancel) = match editing {
        Some(policy) => (
            format!("Edit {}", policy.spec.name),
            format!("/dashboard/policies/{}/edit", policy.id),
            format!("/dashboard/policies/{}", policy.id),
        ),
        None => (
            "Create a policy".to_owned(),
            "/dashboard/policies/new".to_owned(),
            "/dashboard/policies".to_owned(),
        ),
    };
    let inputs = html! {
        (views::field("name", "Name", "text", value(values, "name"), "", errors))
        (views::field("description", "Description", "text", value(values, "description"), "optional", errors))
        fieldset {
            legend { "Allowlists (empty: no restriction; one per line or comma-separated)" }
            @for (name, label, hint) in LISTS {
                (views::textarea(name, label, value(values, name), hint, errors))
            }
        }
        fieldset {
            legend { "Limits" }
            div.grid {
                @for (name, label, hint) in NUMBERS {
                    (views::field(name, label, "text", value(values, name), hint, errors))
                }
                @for (name, label, hint) in DURATIONS {
                    (views::field(name, label, "text", value(values, name), hint, errors))
                }
            }
        }
        (views::textarea("metadata", "Metadata (JSON object)", value(values, "metadata"), "optional", errors))
    };
    let submit = html! { button type="submit" { "Save policy" } };
    let body = views::form_card(session, &action, errors, inputs, submit, Some(&cancel));
    views::page(session, Nav::Policies, &title, body)
}

/// `GET /dashboard/policies`.
pub async fn list(
    State(state): State<DashState>,
    session: Session,
) -> Result<Html<String>, PageError> {
    session.require(POLICIES_READ)?;
    let policies = state
        .engine
        .list_policies(&session.tenant, &PageRequest::new(1000, 0)?)
        .await?;
    let body = html! {
        @if session.may(POLICIES_WRITE) {
            div.actions { a.button href="/dashboard/policies/new" { "Create a policy" } }
        }
        @if policies.items.is_empty() {
            p.empty { "No policies yet." }
        } @else {
            (views::table(&["Name", "Rate limit", "Quotas", "Allowlists", "Lifetime", "Rotation"], html! {
                @for p in &policies.items {
                    tr {
                        td { a href={ "/dashboard/policies/" (p.id) } { (p.spec.name) } }
                        td { (rate(p)) }
                        td { (quotas(p)) }
                        td { (allowlists(p)) }
                        td { (p.spec.max_key_lifetime.map(views::duration).unwrap_or_else(|| "—".into())) }
                        td { (p.spec.rotation_period.map(views::duration).unwrap_or_else(|| "—".into())) }
                    }
                }
            }))
        }
    };
    Ok(views::page(&session, Nav::Policies, "Policies", body))
}

fn rate(p: &Policy) -> String {
    match p.spec.rate_limit {
        Some(n) => format!(
            "{n} / {}{}",
            views::duration(
                p.spec
                    .rate_limit_window
                    .unwrap_or(std::time::Duration::from_secs(1))
            ),
            p.spec
                .burst_limit
                .map(|b| format!(" (+{b} burst)"))
                .unwrap_or_default()
        ),
        None => "—".into(),
    }
}

fn quotas(p: &Policy) -> String {
    match (p.spec.daily_quota, p.spec.monthly_quota) {
        (None, None) => "—".into(),
        (d, m) => [
            d.map(|d| format!("{d}/day")),
            m.map(|m| format!("{m}/month")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
    }
}

fn allowlists(p: &Policy) -> String {
    let s = &p.spec;
    let parts: Vec<String> = [
        ("scopes", s.allowed_scopes.len()),
        ("IPs", s.allowed_ips.len()),
        ("origins", s.allowed_origins.len()),
        ("methods", s.allowed_methods.len()),
        ("paths", s.allowed_paths.len()),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!("{n} {what}"))
    .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Loads the policy at a path id for a root key that carries `scope`. The
/// scope is checked before the id is looked up, so a root key without it
/// learns nothing about which policies exist.
async fn load(
    state: &DashState,
    session: &Session,
    id: &str,
    scope: &str,
) -> Result<Policy, PageError> {
    session.require(scope)?;
    let id: PolicyId = parse_id(id)?;
    Ok(state.engine.get_policy(&session.tenant, &id).await?)
}

async fn detail_page(
    state: &DashState,
    session: &Session,
    policy: &Policy,
    error: Option<&str>,
) -> Result<Html<String>, PageError> {
    let keys = if session.may(KEYS_READ) {
        Some(
            state
                .engine
                .list_keys(
                    &session.tenant,
                    &KeyFilter {
                        policy_id: Some(policy.id),
                        page: PageRequest::new(100, 0)?,
                        ..KeyFilter::default()
                    },
                )
                .await?,
        )
    } else {
        None
    };
    let s = &policy.spec;
    let list = |items: &[String]| {
        if items.is_empty() {
            "any".to_owned()
        } else {
            items.join(", ")
        }
    };
    let path = format!("/dashboard/policies/{}", policy.id);
    let body = html! {
        @if let Some(error) = error {
            p.banner.bad role="alert" { (error) }
        }
        @if session.may(POLICIES_WRITE) {
            div.actions {
                a.button href={ (path) "/edit" } { "Edit" }
                form method="post" action={ (path) "/delete" } {
                    (views::csrf(session))
                    button.danger type="submit" { "Delete" }
                }
            }
        }
        dl.meta {
            dt { "Id" } dd { code { (policy.id) } }
            dt { "Description" } dd { (s.description.as_deref().unwrap_or("—")) }
            dt { "Rate limit" } dd { (rate(policy)) }
            dt { "Quotas" } dd { (quotas(policy)) }
            dt { "Allowed scopes" } dd { (list(&s.allowed_scopes)) }
            dt { "Allowed IPs" } dd { (list(&s.allowed_ips)) }
            dt { "Allowed origins" } dd { (list(&s.allowed_origins)) }
            dt { "Allowed methods" } dd { (list(&s.allowed_methods)) }
            dt { "Allowed paths" } dd { (list(&s.allowed_paths)) }
            dt { "Maximum key lifetime" } dd { (s.max_key_lifetime.map(views::duration).unwrap_or_else(|| "—".into())) }
            dt { "Rotation period" } dd { (s.rotation_period.map(views::duration).unwrap_or_else(|| "—".into())) }
            dt { "Grace period" } dd { (s.grace_period.map(views::duration).unwrap_or_else(|| "24h (default)".into())) }
            dt { "Updated" } dd { (views::when(policy.updated_at)) }
        }
        section {
            h2 { "Keys using it" }
            @match &keys {
                None => p.muted { "Listing keys needs the keysmith:keys:read scope." },
                Some(page) if page.items.is_empty() => p.empty { "No key uses this policy." },
                Some(page) => {
                    (views::table(&["Name", "State", "Environment"], html! {
                        @for k in &page.items {
                            tr {
                                td { a href={ "/dashboard/keys/" (k.id) } { (k.name) } }
                                td { (views::state_badge(k.state)) }
                                td { (k.environment.as_str()) }
                            }
                        }
                    }))
                    @if page.total > page.items.len() as u64 {
                        p { a href={ "/dashboard/keys?policy=" (policy.id) } { "All " (page.total) " keys" } }
                    }
                }
            }
        }
    };
    Ok(views::page(session, Nav::Policies, &s.name, body))
}

/// `GET /dashboard/policies/{id}`.
pub async fn detail(
    State(state): State<DashState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Html<String>, PageError> {
    let policy = load(&state, &session, &id, POLICIES_READ).await?;
    detail_page(&state, &session, &policy, None).await
}

/// `GET /dashboard/policies/new`.
pub async fn new_form(session: Session) -> Result<Html<String>, PageError> {
    session.require(POLICIES_WRITE)?;
    Ok(policy_form(
        &session,
        None,
        &values_of(&PolicySpec::default()),
        &Errors::new(),
    ))
}

/// `POST /dashboard/policies/new`.
pub async fn create(State(state): State<DashState>, form: Form) -> Result<Response, PageError> {
    let session = &form.session;
    session.require(POLICIES_WRITE)?;
    let mut errors = Errors::new();
    let (values, spec) = spec_of(&form, &mut errors);
    let created = state.engine.create_policy(&session.tenant, spec);
    match submit(errors, FIELDS, created).await? {
        Ok(p) => Ok(Redirect::to(&format!("/dashboard/policies/{}", p.id)).into_response()),
        Err(errors) => {
            let page = policy_form(session, None, &values, &errors);
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
    }
}

/// `GET /dashboard/policies/{id}/edit`.
pub async fn edit_form(
    State(state): State<DashState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Html<String>, PageError> {
    let policy = load(&state, &session, &id, POLICIES_WRITE).await?;
    Ok(policy_form(
        &session,
        Some(&policy),
        &values_of(&policy.spec),
        &Errors::new(),
    ))
}

/// `POST /dashboard/policies/{id}/edit`.
pub async fn edit(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    let session = &form.session;
    let policy = load(&state, session, &id, POLICIES_WRITE).await?;
    let mut errors = Errors::new();
    let (values, spec) = spec_of(&form, &mut errors);
    let updated = state
        .engine
        .update_policy(&session.tenant, &policy.id, spec);
    match submit(errors, FIELDS, updated).await? {
        Ok(_) => Ok(Redirect::to(&format!("/dashboard/policies/{}", policy.id)).into_response()),
        Err(errors) => {
            let page = policy_form(session, Some(&policy), &values, &errors);
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
    }
}

/// `POST /dashboard/policies/{id}/delete`: refused while keys use it, with
/// the reason on the policy's page.
pub async fn delete(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    let session = &form.session;
    let policy = load(&state, session, &id, POLICIES_WRITE).await?;
    match state
        .engine
        .delete_policy(&session.tenant, &policy.id)
        .await
    {
        Ok(()) => Ok(Redirect::to("/dashboard/policies").into_response()),
        Err(keysmith::Error::PolicyInUse { keys }) => {
            let message = format!(
                "This policy cannot be deleted: {keys} key(s) use it. Move them to another policy or revoke and delete them first."
            );
            let page = detail_page(&state, session, &policy, Some(&message)).await?;
            Ok((StatusCode::CONFLICT, page).into_response())
        }
        Err(error) => Err(error.into()),
    }
}
