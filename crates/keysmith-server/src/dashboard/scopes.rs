//! Scopes: the tenant's scopes as a tree by parent, create, delete.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use keysmith::{CreateScope, PageRequest, Scope, ScopeId};
use maud::{Markup, html};

use super::session::Form;
use super::views::{self, Errors, Nav};
use super::{DashState, PageError, Session, parse_id, submit};
use crate::root::scopes::{SCOPES_READ, SCOPES_WRITE};

/// Most scopes shown.
const MAX_SCOPES: u32 = 1000;

fn tree(session: &Session, scopes: &[Scope]) -> Markup {
    let names: std::collections::HashSet<&str> = scopes.iter().map(|s| s.name.as_str()).collect();
    let mut children: BTreeMap<Option<&str>, Vec<&Scope>> = BTreeMap::new();
    for scope in scopes {
        // A scope whose parent is not listed is shown at the top.
        let parent = scope
            .parent
            .as_deref()
            .filter(|p| names.contains(p) && *p != scope.name);
        children.entry(parent).or_default().push(scope);
    }
    for list in children.values_mut() {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }
    fn level(
        session: &Session,
        children: &BTreeMap<Option<&str>, Vec<&Scope>>,
        parent: Option<&str>,
        depth: usize,
    ) -> Markup {
        let Some(list) = children.get(&parent) else {
            return html! {};
        };
        html! {
            ul.tree {
                @for scope in list {
                    li {
                        div.node {
                            code { (scope.name) }
                            @if let Some(d) = &scope.description { span.muted { " — " (d) } }
                            @if session.may(SCOPES_WRITE) {
                                form method="post" action={ "/dashboard/scopes/" (scope.id) "/delete" } {
                                    (views::csrf(session))
                                    button.chip-x type="submit" aria-label={ "Delete " (scope.name) } title={ "Delete " (scope.name) " (and take it off every key)" } { "×" }
                                }
                            }
                        }
                        @if depth < 32 { (level(session, children, Some(scope.name.as_str()), depth + 1)) }
                    }
                }
            }
        }
    }
    level(session, &children, None, 0)
}

async fn page(
    state: &DashState,
    session: &Session,
    values: (&str, &str, &str),
    errors: &Errors,
) -> Result<Html<String>, PageError> {
    let scopes = state
        .engine
        .list_scopes(&session.tenant, None, &PageRequest::new(MAX_SCOPES, 0)?)
        .await?;
    let inputs = html! {
        (views::field("name", "Name", "text", values.0, "e.g. read:users:email", errors))
        (views::field("description", "Description", "text", values.1, "optional", errors))
        (views::field("parent", "Parent", "text", values.2, "optional; default: the name up to its last colon", errors))
    };
    let submit = html! { button type="submit" { "Create scope" } };
    let body = html! {
        p.muted { "A scope grants its children: " code { "read" } " grants " code { "read:users" } ". Deleting a scope takes it off every key." }
        @if scopes.items.is_empty() {
            p.empty { "No scopes yet. Assigning a scope to a key creates it." }
        } @else {
            (tree(session, &scopes.items))
            @if scopes.total > scopes.items.len() as u64 {
                p.muted { "Showing " (scopes.items.len()) " of " (scopes.total) "." }
            }
        }
        @if session.may(SCOPES_WRITE) {
            section {
                h2 { "Create a scope" }
                (views::form_card(session, "/dashboard/scopes", errors, inputs, submit, None))
            }
        }
    };
    Ok(views::page(session, Nav::Scopes, "Scopes", body))
}

/// `GET /dashboard/scopes`.
pub async fn list(
    State(state): State<DashState>,
    session: Session,
) -> Result<Html<String>, PageError> {
    session.require(SCOPES_READ)?;
    page(&state, &session, ("", "", ""), &Errors::new()).await
}

/// `POST /dashboard/scopes`.
pub async fn create(State(state): State<DashState>, form: Form) -> Result<Response, PageError> {
    let session = &form.session;
    session.require(SCOPES_WRITE)?;
    let (name, description, parent) = (
        form.get("name"),
        form.get("description"),
        form.get("parent"),
    );
    let mut errors = Errors::new();
    if name.is_empty() {
        errors.insert("name", "Give the scope a name.".into());
    }
    let request = CreateScope {
        name: name.to_owned(),
        description: (!description.is_empty()).then(|| description.to_owned()),
        parent: (!parent.is_empty()).then(|| parent.to_owned()),
    };
    let created = state.engine.create_scope(&session.tenant, request);
    match submit(errors, &["name", "description", "parent"], created).await? {
        Ok(_) => Ok(Redirect::to("/dashboard/scopes").into_response()),
        Err(errors) => {
            let html = page(&state, session, (name, description, parent), &errors).await?;
            Ok((StatusCode::BAD_REQUEST, html).into_response())
        }
    }
}

/// `POST /dashboard/scopes/{id}/delete`.
pub async fn delete(
    State(state): State<DashState>,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, PageError> {
    let session = &form.session;
    session.require(SCOPES_WRITE)?;
    let id: ScopeId = parse_id(&id)?;
    state.engine.delete_scope(&session.tenant, &id).await?;
    Ok(Redirect::to("/dashboard/scopes").into_response())
}
