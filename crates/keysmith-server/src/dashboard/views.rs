//! The page frame and the small pieces every page uses. maud escapes every
//! interpolated value.

use std::collections::HashMap;

use axum::http::StatusCode;
use axum::response::Html;
use chrono::{DateTime, Utc};
use keysmith::KeyState;
use maud::{DOCTYPE, Markup, html};

use super::Session;

/// Which section of the navigation is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Keys,
    Policies,
    Scopes,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Keysmith" }
            link rel="stylesheet" href="/dashboard/static/app.css";
            script src="/dashboard/static/app.js" defer {}
        }
    }
}

/// A signed-in page.
pub fn page(session: &Session, nav: Nav, title: &str, body: Markup) -> Html<String> {
    let link = |to: Nav, href: &str, label: &str| {
        html! {
            a href=(href) aria-current=[(to == nav).then_some("page")] { (label) }
        }
    };
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body {
                    a.skip href="#main" { "Skip to content" }
                    header.top {
                        a.brand href="/dashboard" { "Keysmith" }
                        nav aria-label="Sections" {
                            (link(Nav::Overview, "/dashboard", "Overview"))
                            (link(Nav::Keys, "/dashboard/keys", "Keys"))
                            (link(Nav::Policies, "/dashboard/policies", "Policies"))
                            (link(Nav::Scopes, "/dashboard/scopes", "Scopes"))
                        }
                        div.who {
                            span.tenant title="app / tenant" {
                                (session.tenant.app_id) " / " (session.tenant.tenant_id)
                            }
                            form method="post" action="/dashboard/logout" {
                                (csrf(session))
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                    main #main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

/// A page outside a session (sign-in, errors).
pub fn bare(title: &str, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body {
                    header.top { a.brand href="/dashboard" { "Keysmith" } }
                    main #main.narrow {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

/// An error page.
pub fn error_page(status: StatusCode, title: &str, message: &str) -> Html<String> {
    bare(
        title,
        html! {
            p.error-text { (message) }
            p.muted { "HTTP " (status.as_u16()) }
            p { a href="/dashboard" { "Back to the dashboard" } }
        },
    )
}

/// The session's CSRF token as a hidden field.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// Field errors of a form, by field name.
pub type Errors = HashMap<&'static str, String>;

/// The frame every form control shares: the label, the error under it (tied
/// to the control by `aria-describedby`, so screen readers read it with the
/// control) and the hint. `control` draws the control itself from its id and
/// the two ARIA attributes it must carry.
fn labelled(
    name: &'static str,
    label: &str,
    hint: &str,
    errors: &Errors,
    control: impl FnOnce(&str, Option<&str>, Option<&str>) -> Markup,
) -> Markup {
    let error = errors.get(name);
    let id = format!("f-{name}");
    let err_id = format!("e-{name}");
    let invalid = error.map(|_| "true");
    let described_by = error.map(|_| err_id.as_str());
    html! {
        div.field.invalid[error.is_some()] {
            label for=(id) { (label) }
            (control(&id, invalid, described_by))
            @if let Some(error) = error {
                p.field-error #(err_id) role="alert" { (error) }
            }
            @if !hint.is_empty() { p.hint { (hint) } }
        }
    }
}

/// One labelled input with its error under it.
pub fn field(
    name: &'static str,
    label: &str,
    kind: &str,
    value: &str,
    hint: &str,
    errors: &Errors,
) -> Markup {
    labelled(name, label, hint, errors, |id, invalid, described_by| {
        html! {
            input #(id) type=(kind) name=(name) value=(value)
                aria-invalid=[invalid] aria-describedby=[described_by];
        }
    })
}

/// A labelled textarea with its error under it.
pub fn textarea(
    name: &'static str,
    label: &str,
    value: &str,
    hint: &str,
    errors: &Errors,
) -> Markup {
    labelled(name, label, hint, errors, |id, invalid, described_by| {
        html! {
            textarea #(id) name=(name) rows="3"
                aria-invalid=[invalid] aria-describedby=[described_by] { (value) }
        }
    })
}

/// A labelled select with its error under it.
pub fn select(
    name: &'static str,
    label: &str,
    options: &[(String, String)],
    selected: &str,
    errors: &Errors,
) -> Markup {
    labelled(name, label, "", errors, |id, invalid, described_by| {
        html! {
            select #(id) name=(name) aria-invalid=[invalid] aria-describedby=[described_by] {
                @for (value, text) in options {
                    option value=(value) selected[value == selected] { (text) }
                }
            }
        }
    })
}

/// A form card that posts to `action`: the CSRF token and the form-wide
/// error come first on every form, then `fields`, then the `submit` button
/// and, where there is somewhere to go back to, a Cancel link.
pub fn form_card(
    session: &Session,
    action: &str,
    errors: &Errors,
    fields: Markup,
    submit: Markup,
    cancel: Option<&str>,
) -> Markup {
    html! {
        form.card method="post" action=(action) novalidate {
            (csrf(session))
            (form_error(errors))
            (fields)
            div.actions {
                (submit)
                @if let Some(cancel) = cancel {
                    a.button.secondary href=(cancel) { "Cancel" }
                }
            }
        }
    }
}

/// A form-wide error (not tied to one field).
pub fn form_error(errors: &Errors) -> Markup {
    html! {
        @if let Some(error) = errors.get("_form") {
            p.banner.bad role="alert" { (error) }
        }
    }
}

/// A key's state as a coloured badge.
pub fn state_badge(state: KeyState) -> Markup {
    html! { span class={ "badge " (state.as_str()) } { (state.as_str()) } }
}

/// A time as `2030-01-02 15:04 UTC`.
pub fn when(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// An optional time, or a dash.
pub fn when_opt(at: Option<DateTime<Utc>>) -> String {
    at.map(when).unwrap_or_else(|| "—".into())
}

/// "in 3 days" / "5 hours ago", relative to `now`.
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let delta = at - now;
    let (future, d) = if delta >= chrono::Duration::zero() {
        (true, delta)
    } else {
        (false, -delta)
    };
    let text = if d.num_days() >= 1 {
        format!("{} day{}", d.num_days(), plural(d.num_days()))
    } else if d.num_hours() >= 1 {
        format!("{} hour{}", d.num_hours(), plural(d.num_hours()))
    } else {
        format!("{} min", d.num_minutes().max(1))
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

fn plural(n: i64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A duration as the API writes it (`90d`, `24h`, `15m`, `30s`, `250ms`).
pub fn duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    const S: u128 = 1000;
    for (unit, size) in [("d", 86_400 * S), ("h", 3600 * S), ("m", 60 * S), ("s", S)] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// A table that scrolls sideways on narrow screens.
pub fn table(head: &[&str], rows: Markup) -> Markup {
    html! {
        div.table-wrap {
            table {
                thead { tr { @for h in head { th scope="col" { (h) } } } }
                tbody { (rows) }
            }
        }
    }
}

/// "Previous / Next" links for a list with `total` items.
pub fn pager(base: &str, page: u64, per_page: u64, total: u64) -> Markup {
    let pages = total.div_ceil(per_page).max(1);
    let sep = if base.contains('?') { '&' } else { '?' };
    html! {
        nav.pager aria-label="Pages" {
            @if page > 1 {
                a href={ (base) (sep) "page=" (page - 1) } rel="prev" { "← Previous" }
            }
            span { "Page " (page) " of " (pages) " · " (total) " in all" }
            @if page < pages {
                a href={ (base) (sep) "page=" (page + 1) } rel="next" { "Next →" }
            }
        }
    }
}
