//! Root keys: the keys that authenticate calls to the management API.
//!
//! A root key is an ordinary Keysmith key (prefix `ksr`) kept in a reserved
//! tenant that no API call can name, bound to one app and tenant through its
//! metadata, and carrying management scopes such as `keysmith:keys:write` or
//! `keysmith:*`. It never appears in a tenant's lists and cannot be changed
//! through a tenant's API.

use keysmith::{CreateKey, CreatedKey, Engine, Error, KeyFilter, RequestContext, Tenant};

/// The reserved app that holds every root key.
pub const RESERVED_APP: &str = "_keysmith";

/// Every management scope, the one bootstrap grants.
pub const ALL: &str = "keysmith:*";

/// Management scopes a root key may carry.
pub mod scopes {
    /// Read keys, their rotations and usage summaries.
    pub const KEYS_READ: &str = "keysmith:keys:read";
    /// Create, change, rotate, revoke and delete keys.
    pub const KEYS_WRITE: &str = "keysmith:keys:write";
    /// Validate keys through `POST /v1/keys/validate`.
    pub const KEYS_VALIDATE: &str = "keysmith:keys:validate";
    /// Read policies.
    pub const POLICIES_READ: &str = "keysmith:policies:read";
    /// Create, replace and delete policies.
    pub const POLICIES_WRITE: &str = "keysmith:policies:write";
    /// Read scopes.
    pub const SCOPES_READ: &str = "keysmith:scopes:read";
    /// Create and delete scopes.
    pub const SCOPES_WRITE: &str = "keysmith:scopes:write";
    /// Read usage.
    pub const USAGE_READ: &str = "keysmith:usage:read";
    /// Report usage (`POST /v1/usage`).
    pub const USAGE_WRITE: &str = "keysmith:usage:write";
}

/// The tenant that holds root keys.
pub fn root_tenant() -> Tenant {
    Tenant {
        app_id: RESERVED_APP.into(),
        tenant_id: "root".into(),
    }
}

/// An authenticated caller: the tenant it acts for and what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The root key's id (recorded as `created_by` / `rotated_by`).
    pub key_id: keysmith::KeyId,
    /// The tenant every call acts on.
    pub tenant: Tenant,
    /// Management scopes.
    pub scopes: Vec<String>,
}

impl Principal {
    /// Whether the root key carries `scope` (hierarchically).
    pub fn may(&self, scope: &str) -> bool {
        keysmith::scope::any_grants(&self.scopes, scope)
    }
}

/// Creates a root key for `tenant` with `scopes` (default `keysmith:*`).
pub async fn create(
    engine: &Engine,
    tenant: &Tenant,
    scopes: Vec<String>,
) -> Result<CreatedKey, Error> {
    if tenant.app_id == RESERVED_APP {
        return Err(Error::invalid_input(
            "app",
            format!("`{RESERVED_APP}` is reserved"),
        ));
    }
    Tenant::new(tenant.app_id.as_str(), tenant.tenant_id.as_str())?;
    let scopes = if scopes.is_empty() {
        vec![ALL.to_owned()]
    } else {
        scopes
    };
    for scope in &scopes {
        if !(scope == "*" || scope.starts_with("keysmith:")) {
            return Err(Error::invalid_input(
                "scopes",
                format!("`{scope}` is not a keysmith:… management scope"),
            ));
        }
    }
    let mut metadata = keysmith::Metadata::new();
    metadata.insert("app_id".into(), tenant.app_id.clone().into());
    metadata.insert("tenant_id".into(), tenant.tenant_id.clone().into());
    let request = CreateKey {
        name: format!("root key for {}/{}", tenant.app_id, tenant.tenant_id),
        prefix: Some("ksr".into()),
        scopes,
        metadata,
        created_by: Some("keysmith".into()),
        ..CreateKey::default()
    };
    engine.create_key(&root_tenant(), request).await
}

/// Whether any root key exists (bootstrap creates one when none does).
pub async fn any_exist(engine: &Engine) -> Result<bool, Error> {
    let filter = KeyFilter {
        page: keysmith::PageRequest::new(1, 0)?,
        ..KeyFilter::default()
    };
    Ok(engine.list_keys(&root_tenant(), &filter).await?.total > 0)
}

/// Authenticates a raw root key. Any refusal (unknown, revoked, a tenant's
/// key rather than a root key) is `InvalidKey`-like; a store failure is a
/// store error.
pub async fn authenticate(engine: &Engine, raw: &str) -> Result<Principal, Error> {
    let request = RequestContext {
        expected_tenant: Some(root_tenant()),
        ..RequestContext::default()
    };
    let valid = engine.validate(raw, &request).await?;
    let bound = |field: &str| {
        valid
            .key
            .metadata
            .get(field)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let (Some(app_id), Some(tenant_id)) = (bound("app_id"), bound("tenant_id")) else {
        return Err(Error::InvalidKey);
    };
    Ok(Principal {
        key_id: valid.key.id,
        tenant: Tenant { app_id, tenant_id },
        scopes: valid.key.scopes.clone(),
    })
}
