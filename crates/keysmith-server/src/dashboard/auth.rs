//! Sign in with a root key, sign out.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;

use super::session::{self, Form, LOGIN_COOKIE};
use super::views::{self, Errors};
use super::{DashState, PageError};
use crate::root;

fn login_page(token: &str, error: Option<&str>) -> axum::response::Html<String> {
    let mut errors = Errors::new();
    if let Some(error) = error {
        errors.insert("root_key", error.to_owned());
    }
    views::bare(
        "Sign in",
        html! {
            p { "Sign in with a root key (" code { "ksr_…" } "). The dashboard shows and changes only that key's tenant." }
            form.card method="post" action="/dashboard/login" autocomplete="off" {
                input type="hidden" name="csrf" value=(token);
                (views::field("root_key", "Root key", "password", "", "", &errors))
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// The sign-in form, with a fresh pre-session CSRF token in a cookie.
pub async fn form(headers: HeaderMap) -> Response {
    let token = session::random_token();
    let cookie = session::set_cookie(
        LOGIN_COOKIE,
        &token,
        std::time::Duration::from_secs(3600),
        session::over_tls(&headers),
    );
    ([(header::SET_COOKIE, cookie)], login_page(&token, None)).into_response()
}

/// Checks the root key exactly like the API does and starts a session.
pub async fn sign_in(State(state): State<DashState>, request: Request) -> Response {
    let headers = request.headers().clone();
    if let Err(e) = session::check_origin(&headers) {
        return e.into_response();
    }
    let fields = match session::read_fields(request, &state).await {
        Ok(fields) => fields,
        Err(e) => return e.into_response(),
    };
    let get = |name: &str| session::field_value(&fields, name);
    let expected = session::cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !session::tokens_match(get("csrf"), expected) {
        return PageError::Csrf.into_response();
    }
    let secure = session::over_tls(&headers);
    let refuse = |message: &str| {
        let token = session::random_token();
        let cookie = session::set_cookie(
            LOGIN_COOKIE,
            &token,
            std::time::Duration::from_secs(3600),
            secure,
        );
        (
            StatusCode::UNAUTHORIZED,
            [(header::SET_COOKIE, cookie)],
            login_page(&token, Some(message)),
        )
            .into_response()
    };
    let raw = get("root_key");
    if raw.is_empty() {
        return refuse("Enter a root key.");
    }
    let principal = match root::authenticate(&state.engine, raw).await {
        Ok(principal) => principal,
        Err(keysmith::Error::Store(source)) => {
            return PageError::from(keysmith::Error::Store(source)).into_response();
        }
        Err(_) => return refuse("This is not a valid root key."),
    };
    let started = state.sessions.start(principal, state.engine.clock().now());
    let mut response = Redirect::to("/dashboard").into_response();
    let headers = response.headers_mut();
    for cookie in [
        session::set_cookie(
            session::COOKIE,
            &started.id,
            session::ABSOLUTE_TIMEOUT,
            secure,
        ),
        session::clear_cookie(LOGIN_COOKIE, secure),
    ] {
        if let Ok(value) = cookie.parse() {
            headers.append(header::SET_COOKIE, value);
        }
    }
    response
}

/// Ends the session and clears its cookie.
pub async fn sign_out(State(state): State<DashState>, headers: HeaderMap, form: Form) -> Response {
    state.sessions.end(&form.session.id);
    let cookie = session::clear_cookie(session::COOKIE, session::over_tls(&headers));
    (
        [(header::SET_COOKIE, cookie)],
        Redirect::to("/dashboard/login"),
    )
        .into_response()
}
