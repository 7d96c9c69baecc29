//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::Modify;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::{error, keys, policies, scopes, system, usage};

/// The whole API.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    info(title = "Keysmith", description = "API keys for the services that issue them. \
        Every /v1 call needs `Authorization: Bearer <root key>` and acts on that key's tenant."),
    paths(
        keys::create, keys::list, keys::get, keys::update, keys::delete, keys::rotate,
        keys::revoke, keys::suspend, keys::reactivate, keys::add_scopes, keys::remove_scopes,
        keys::rotations, keys::validate,
        policies::create, policies::list, policies::get, policies::update, policies::delete,
        scopes::create, scopes::list, scopes::delete,
                usage::record, usage::list, usage::of_key, usage::aggregate,
        system::healthz, system::readyz, system::metrics,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&RootKeyAuth),
    tags((name = "keys"), (name = "policies"), (name = "scopes"), (name = "usage"), (name = "system")),
)]
pub struct ApiDoc;

struct RootKeyAuth;

impl Modify for RootKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "root_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
