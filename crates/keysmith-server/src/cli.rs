//! The command line: `keysmith serve | migrate | root-key | keys | policies |
//! scopes | rotations | validate`. Commands other than `serve` work on the
//! database directly (`--database-url`). Human tables by default, `--json`
//! for scripts. Exit codes: 0 ok, 1 refused (with the reason), 2 usage error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use keysmith::{
    ApiKey, CreateKey, CreateScope, Engine, KeyFilter, KeyId, KeyUpdate, Page, Policy, PolicyId,
    PolicySpec, RequestContext, RotateKey, Rotation, Scope, ScopeId, Store, Tenant,
};
use serde::Serialize;

use crate::config::{Config, LogFormat};
use crate::root;

/// Keysmith: API keys for the services that issue them.
#[derive(Debug, Parser)]
#[command(name = "keysmith", version, about)]
pub struct Cli {
    /// Database: a SQLite path (default `keysmith.db`) or `postgres://…`.
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Configuration file (default `keysmith.toml` when present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Manage root keys (the keys of the management API).
    #[command(subcommand)]
    RootKey(RootKeyCommand),
    /// Manage a tenant's API keys.
    Keys(TenantScoped<KeysCommand>),
    /// Manage a tenant's policies.
    Policies(TenantScoped<PoliciesCommand>),
    /// Manage a tenant's scopes.
    Scopes(TenantScoped<ScopesCommand>),
    /// A key's rotation history.
    Rotations(TenantScoped<RotationsCommand>),
    /// A tenant's usage records and per-day / per-month aggregates.
    Usage(TenantScoped<UsageCommand>),
    /// Validate a raw key (prints the key, or the reason it is refused).
    Validate(ValidateArgs),
}

/// `usage …`.
#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Usage records, newest first.
    List {
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
        /// From (RFC 3339, inclusive).
        #[arg(long)]
        after: Option<DateTime<Utc>>,
        /// Until (RFC 3339, exclusive).
        #[arg(long)]
        before: Option<DateTime<Utc>>,
        /// Page size (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Items to skip.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// A key's usage per UTC day or month.
    Aggregate {
        /// Key id.
        key_id: String,
        /// day or month.
        #[arg(long, default_value = "day")]
        period: String,
        /// Periods starting at or after (RFC 3339).
        #[arg(long)]
        after: Option<DateTime<Utc>>,
        /// Periods starting before (RFC 3339).
        #[arg(long)]
        before: Option<DateTime<Utc>>,
    },
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen address (default 127.0.0.1:8080).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Do not create a root key on first start.
    #[arg(long)]
    pub no_bootstrap: bool,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// `root-key …`.
#[derive(Debug, Subcommand)]
pub enum RootKeyCommand {
    /// Create a root key; prints only the raw key on stdout.
    Create {
        /// App the key acts for.
        #[arg(long)]
        app: String,
        /// Tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// Management scopes (default keysmith:*), comma-separated.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
    },
}

/// A command acting on one tenant.
#[derive(Debug, Args)]
pub struct TenantScoped<C: Subcommand> {
    /// App id.
    #[arg(long, global = true, default_value = "default")]
    pub app: String,
    /// Tenant id.
    #[arg(long, global = true, default_value = "default")]
    pub tenant: String,
    /// The command.
    #[command(subcommand)]
    pub command: C,
}

/// `keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints its raw secret once.
    Create {
        /// Name.
        #[arg(long)]
        name: String,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Raw key prefix (default sk).
        #[arg(long)]
        prefix: Option<String>,
        /// Environment (default live).
        #[arg(long)]
        environment: Option<String>,
        /// Scopes (repeat or comma-separate).
        #[arg(long = "scope", value_delimiter = ',')]
        scopes: Vec<String>,
        /// Policy id.
        #[arg(long)]
        policy: Option<String>,
        /// Expiry (RFC 3339).
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
        /// Metadata (a JSON object).
        #[arg(long)]
        metadata: Option<String>,
    },
    /// List keys, newest first.
    List {
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// Only this environment.
        #[arg(long)]
        environment: Option<String>,
        /// Only this policy.
        #[arg(long)]
        policy: Option<String>,
        /// Page size (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Items to skip.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Show a key.
    Get {
        /// Key id.
        id: String,
    },
    /// Change a key.
    Update {
        /// Key id.
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// New metadata (a JSON object).
        #[arg(long)]
        metadata: Option<String>,
        /// New policy id.
        #[arg(long, conflicts_with = "no_policy")]
        policy: Option<String>,
        /// Detach the policy.
        #[arg(long)]
        no_policy: bool,
        /// New expiry (RFC 3339).
        #[arg(long, conflicts_with = "no_expiry")]
        expires_at: Option<DateTime<Utc>>,
        /// Remove the expiry.
        #[arg(long)]
        no_expiry: bool,
    },
    /// Rotate a key; prints the new raw secret once.
    Rotate {
        /// Key id.
        id: String,
        /// scheduled, manual, compromise or policy.
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Grace period such as 24h (default: the policy's, else 24h; compromise: 0).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Revoke a key for good.
    Revoke {
        /// Key id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Suspend a key.
    Suspend {
        /// Key id.
        id: String,
    },
    /// Reactivate a suspended key.
    Reactivate {
        /// Key id.
        id: String,
    },
    /// Delete a key and its history.
    Delete {
        /// Key id.
        id: String,
    },
}

/// `policies …`.
#[derive(Debug, Subcommand)]
pub enum PoliciesCommand {
    /// Create a policy from a JSON spec (inline or `@file.json`).
    Create {
        /// The spec, e.g. '{"name":"std","allowed_ips":["10.0.0.0/8"]}'.
        spec: String,
    },
    /// List policies.
    List {
        /// Page size (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Items to skip.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Show a policy.
    Get {
        /// Policy id.
        id: String,
    },
    /// Replace a policy's rules with a JSON spec (inline or `@file.json`).
    Update {
        /// Policy id.
        id: String,
        /// The spec.
        spec: String,
    },
    /// Delete a policy no key uses.
    Delete {
        /// Policy id.
        id: String,
    },
}

/// `scopes …`.
#[derive(Debug, Subcommand)]
pub enum ScopesCommand {
    /// Create a scope.
    Create {
        /// Name such as read:users.
        name: String,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Parent (an ancestor of the name).
        #[arg(long)]
        parent: Option<String>,
    },
    /// List scopes.
    List {
        /// Only children of this scope.
        #[arg(long)]
        parent: Option<String>,
        /// Page size (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Items to skip.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Delete a scope.
    Delete {
        /// Scope id.
        id: String,
    },
}

/// `rotations …`.
#[derive(Debug, Subcommand)]
pub enum RotationsCommand {
    /// A key's rotations, oldest first.
    List {
        /// Key id.
        key_id: String,
    },
}

/// `validate …`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The raw key.
    pub raw_key: String,
    /// Client IP.
    #[arg(long)]
    pub ip: Option<std::net::IpAddr>,
    /// Origin.
    #[arg(long)]
    pub origin: Option<String>,
    /// HTTP method.
    #[arg(long)]
    pub method: Option<String>,
    /// Request path.
    #[arg(long)]
    pub path: Option<String>,
    /// Required scopes.
    #[arg(long = "scope", value_delimiter = ',')]
    pub scopes: Vec<String>,
}

/// How a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The operation was refused or failed: exit 1.
    #[error("{0}")]
    Refused(String),
    /// The command was used wrongly: exit 2.
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused(_) => 1,
            Self::Usage(_) => 2,
        }
    }
}

impl From<keysmith::Error> for CliError {
    fn from(error: keysmith::Error) -> Self {
        match error {
            keysmith::Error::InvalidInput { .. } => Self::Usage(error.to_string()),
            other => Self::Refused(other.to_string()),
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(error: anyhow::Error) -> Self {
        Self::Refused(format!("{error:#}"))
    }
}

fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}

fn id<T: std::str::FromStr<Err = keysmith::id::IdParseError>>(raw: &str) -> Result<T, CliError> {
    raw.parse()
        .map_err(|e| usage(format!("invalid id `{raw}`: {e}")))
}

fn metadata(raw: Option<&str>) -> Result<Option<keysmith::Metadata>, CliError> {
    raw.map(|raw| {
        serde_json::from_str(raw)
            .map_err(|e| usage(format!("invalid --metadata (a JSON object): {e}")))
    })
    .transpose()
}

fn spec(raw: &str) -> Result<PolicySpec, CliError> {
    let text = match raw.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| usage(format!("cannot read {path}: {e}")))?
        }
        None => raw.to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| usage(format!("invalid policy spec: {e}")))
}

/// Runs a command other than `serve`.
pub async fn run(cli: Cli, config: Config) -> Result<(), CliError> {
    let store: Arc<dyn Store> = crate::store::open(&config).await?;
    let engine = crate::serve::configured_engine(store.clone(), &config, None).await?;
    let out = Output { json: cli.json };
    match cli.command {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Migrate => {
            out.message("migrations applied");
            Ok(())
        }
        Command::RootKey(RootKeyCommand::Create {
            app,
            tenant,
            scopes,
        }) => {
            let tenant = Tenant::new(app, tenant)?;
            let created = root::create(&engine, &tenant, scopes).await?;
            println!("{}", created.raw_key.expose_secret());
            Ok(())
        }
        Command::Keys(scoped) => {
            keys(
                &engine,
                &tenant_of(&scoped.app, &scoped.tenant)?,
                scoped.command,
                out,
            )
            .await
        }
        Command::Policies(scoped) => {
            policies(
                &engine,
                &tenant_of(&scoped.app, &scoped.tenant)?,
                scoped.command,
                out,
            )
            .await
        }
        Command::Scopes(scoped) => {
            scopes(
                &engine,
                &tenant_of(&scoped.app, &scoped.tenant)?,
                scoped.command,
                out,
            )
            .await
        }
        Command::Rotations(scoped) => {
            let RotationsCommand::List { key_id } = scoped.command;
            let tenant = tenant_of(&scoped.app, &scoped.tenant)?;
            let rotations = engine
                .list_rotations(&tenant, &id::<KeyId>(&key_id)?)
                .await?;
            out.rotations(&rotations);
            Ok(())
        }
        Command::Usage(scoped) => {
            let tenant = tenant_of(&scoped.app, &scoped.tenant)?;
            match scoped.command {
                UsageCommand::List {
                    key,
                    after,
                    before,
                    limit,
                    offset,
                } => {
                    let filter = keysmith::UsageFilter {
                        key_id: key.as_deref().map(id::<KeyId>).transpose()?,
                        after,
                        before,
                        page: keysmith::PageRequest::new(limit, offset)?,
                    };
                    out.usage(&engine.list_usage(&tenant, &filter).await?);
                }
                UsageCommand::Aggregate {
                    key_id,
                    period,
                    after,
                    before,
                } => {
                    let period = period.parse()?;
                    let key = id::<KeyId>(&key_id)?;
                    out.aggregates(
                        &engine
                            .usage_aggregates(&tenant, &key, period, after, before)
                            .await?,
                    );
                }
            }
            Ok(())
        }
        Command::Validate(args) => {
            let request = RequestContext {
                ip: args.ip,
                origin: args.origin,
                method: args.method,
                path: args.path,
                required_scopes: args.scopes,
                ..RequestContext::default()
            };
            match engine.validate(&args.raw_key, &request).await {
                Ok(valid) => {
                    if out.json {
                        out.print_json(&serde_json::json!({
                            "valid": true,
                            "key": &*valid.key,
                            "grace_ends": valid.grace_ends,
                            "rate_limit": valid.rate_limit,
                            "quota": valid.quota,
                        }));
                        return Ok(());
                    }
                    out.key(&valid.key);
                    if let Some(ends) = valid.grace_ends {
                        println!("rotated: this secret works until {ends}");
                    }
                    if let Some(rate) = valid.rate_limit {
                        println!(
                            "rate limit: {} of {} left, full again in {}s",
                            rate.remaining, rate.limit, rate.reset_secs
                        );
                    }
                    for q in &valid.quota {
                        println!(
                            "{} quota: {} of {} used, resets {}",
                            q.period.as_str(),
                            q.used,
                            q.limit,
                            q.resets_at
                        );
                    }
                    Ok(())
                }
                Err(error) if error.is_validation_denial() => Err(CliError::Refused(format!(
                    "key refused: {} ({})",
                    error,
                    error.code()
                ))),
                Err(error) => Err(error.into()),
            }
        }
    }
}

fn tenant_of(app: &str, tenant: &str) -> Result<Tenant, CliError> {
    if app == root::RESERVED_APP {
        return Err(usage(format!("app `{app}` is reserved for root keys")));
    }
    Ok(Tenant::new(app, tenant)?)
}

async fn keys(
    engine: &Engine,
    tenant: &Tenant,
    command: KeysCommand,
    out: Output,
) -> Result<(), CliError> {
    match command {
        KeysCommand::Create {
            name,
            description,
            prefix,
            environment,
            scopes,
            policy,
            expires_at,
            metadata: meta,
        } => {
            let request = CreateKey {
                name,
                description,
                prefix,
                environment: environment.as_deref().map(str::parse).transpose()?,
                scopes,
                policy_id: policy.as_deref().map(id::<PolicyId>).transpose()?,
                expires_at,
                metadata: metadata(meta.as_deref())?.unwrap_or_default(),
                created_by: Some("cli".into()),
            };
            let created = engine.create_key(tenant, request).await?;
            out.secret(created.raw_key.expose_secret(), &created.key);
        }
        KeysCommand::List {
            state,
            environment,
            policy,
            limit,
            offset,
        } => {
            let filter = KeyFilter {
                state: state.as_deref().map(str::parse).transpose()?,
                environment: environment.as_deref().map(str::parse).transpose()?,
                policy_id: policy.as_deref().map(id::<PolicyId>).transpose()?,
                created_by: None,
                page: keysmith::PageRequest::new(limit, offset)?,
            };
            out.keys(&engine.list_keys(tenant, &filter).await?);
        }
        KeysCommand::Get { id: key } => {
            out.key(&engine.get_key(tenant, &id::<KeyId>(&key)?).await?)
        }
        KeysCommand::Update {
            id: key,
            name,
            description,
            metadata: meta,
            policy,
            no_policy,
            expires_at,
            no_expiry,
        } => {
            let update = KeyUpdate {
                name,
                description: description.map(Some),
                metadata: metadata(meta.as_deref())?,
                policy_id: match (policy, no_policy) {
                    (Some(p), _) => Some(Some(id::<PolicyId>(&p)?)),
                    (None, true) => Some(None),
                    (None, false) => None,
                },
                expires_at: match (expires_at, no_expiry) {
                    (Some(at), _) => Some(Some(at)),
                    (None, true) => Some(None),
                    (None, false) => None,
                },
            };
            out.key(
                &engine
                    .update_key(tenant, &id::<KeyId>(&key)?, update)
                    .await?,
            );
        }
        KeysCommand::Rotate {
            id: key,
            reason,
            grace,
        } => {
            let request = RotateKey {
                reason: reason.parse()?,
                grace_period: grace
                    .as_deref()
                    .map(|g| keysmith::duration::parse("grace", g))
                    .transpose()?,
                rotated_by: Some("cli".into()),
            };
            let rotated = engine
                .rotate_key(tenant, &id::<KeyId>(&key)?, request)
                .await?;
            out.secret(rotated.raw_key.expose_secret(), &rotated.key);
        }
        KeysCommand::Revoke { id: key, reason } => out.key(
            &engine
                .revoke_key(tenant, &id::<KeyId>(&key)?, reason.as_deref())
                .await?,
        ),
        KeysCommand::Suspend { id: key } => {
            out.key(&engine.suspend_key(tenant, &id::<KeyId>(&key)?).await?)
        }
        KeysCommand::Reactivate { id: key } => {
            out.key(&engine.reactivate_key(tenant, &id::<KeyId>(&key)?).await?)
        }
        KeysCommand::Delete { id: key } => {
            engine.delete_key(tenant, &id::<KeyId>(&key)?).await?;
            out.message("deleted");
        }
    }
    Ok(())
}

async fn policies(
    engine: &Engine,
    tenant: &Tenant,
    command: PoliciesCommand,
    out: Output,
) -> Result<(), CliError> {
    match command {
        PoliciesCommand::Create { spec: raw } => {
            out.policy(&engine.create_policy(tenant, spec(&raw)?).await?)
        }
        PoliciesCommand::List { limit, offset } => out.policies(
            &engine
                .list_policies(tenant, &keysmith::PageRequest::new(limit, offset)?)
                .await?,
        ),
        PoliciesCommand::Get { id: p } => {
            out.policy(&engine.get_policy(tenant, &id::<PolicyId>(&p)?).await?)
        }
        PoliciesCommand::Update { id: p, spec: raw } => out.policy(
            &engine
                .update_policy(tenant, &id::<PolicyId>(&p)?, spec(&raw)?)
                .await?,
        ),
        PoliciesCommand::Delete { id: p } => {
            engine.delete_policy(tenant, &id::<PolicyId>(&p)?).await?;
            out.message("deleted");
        }
    }
    Ok(())
}

async fn scopes(
    engine: &Engine,
    tenant: &Tenant,
    command: ScopesCommand,
    out: Output,
) -> Result<(), CliError> {
    match command {
        ScopesCommand::Create {
            name,
            description,
            parent,
        } => out.scopes(&[engine
            .create_scope(
                tenant,
                CreateScope {
                    name,
                    description,
                    parent,
                },
            )
            .await?]),
        ScopesCommand::List {
            parent,
            limit,
            offset,
        } => {
            let page = engine
                .list_scopes(
                    tenant,
                    parent.as_deref(),
                    &keysmith::PageRequest::new(limit, offset)?,
                )
                .await?;
            out.scopes(&page.items);
        }
        ScopesCommand::Delete { id: s } => {
            engine.delete_scope(tenant, &id::<ScopeId>(&s)?).await?;
            out.message("deleted");
        }
    }
    Ok(())
}

/// Prints tables or JSON.
#[derive(Debug, Clone, Copy)]
struct Output {
    json: bool,
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "-".into())
}

impl Output {
    fn print_json<T: Serialize>(&self, value: &T) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serializable")
        );
    }

    fn message(&self, text: &str) {
        if self.json {
            self.print_json(&serde_json::json!({ "message": text }));
        } else {
            println!("{text}");
        }
    }

    fn key_rows(keys: &[ApiKey]) -> Vec<Vec<String>> {
        keys.iter()
            .map(|k| {
                vec![
                    k.id.to_string(),
                    k.name.clone(),
                    k.state.to_string(),
                    k.environment.to_string(),
                    format!("…{}", k.hint),
                    k.scopes.join(","),
                    when(k.expires_at),
                ]
            })
            .collect()
    }

    fn key(&self, key: &ApiKey) {
        if self.json {
            return self.print_json(key);
        }
        table(
            &["ID", "NAME", "STATE", "ENV", "HINT", "SCOPES", "EXPIRES"],
            Self::key_rows(std::slice::from_ref(key)),
        );
    }

    fn keys(&self, page: &Page<ApiKey>) {
        if self.json {
            return self.print_json(page);
        }
        table(
            &["ID", "NAME", "STATE", "ENV", "HINT", "SCOPES", "EXPIRES"],
            Self::key_rows(&page.items),
        );
        println!("({} of {})", page.items.len(), page.total);
    }

    fn secret(&self, raw: &str, key: &ApiKey) {
        if self.json {
            return self.print_json(&serde_json::json!({ "raw_key": raw, "key": key }));
        }
        println!("raw key (shown once, store it now): {raw}");
        self.key(key);
    }

    fn policy_rows(policies: &[Policy]) -> Vec<Vec<String>> {
        policies
            .iter()
            .map(|p| {
                vec![
                    p.id.to_string(),
                    p.spec.name.clone(),
                    p.spec.allowed_ips.join(","),
                    p.spec.allowed_scopes.join(","),
                    p.spec
                        .max_key_lifetime
                        .map(keysmith::duration::format)
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect()
    }

    fn policy(&self, policy: &Policy) {
        if self.json {
            return self.print_json(policy);
        }
        table(
            &["ID", "NAME", "IPS", "SCOPES", "MAX LIFETIME"],
            Self::policy_rows(std::slice::from_ref(policy)),
        );
    }

    fn policies(&self, page: &Page<Policy>) {
        if self.json {
            return self.print_json(page);
        }
        table(
            &["ID", "NAME", "IPS", "SCOPES", "MAX LIFETIME"],
            Self::policy_rows(&page.items),
        );
        println!("({} of {})", page.items.len(), page.total);
    }

    fn scopes(&self, scopes: &[Scope]) {
        if self.json {
            return self.print_json(&scopes);
        }
        let rows = scopes
            .iter()
            .map(|s| {
                vec![
                    s.id.to_string(),
                    s.name.clone(),
                    s.parent.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(&["ID", "NAME", "PARENT"], rows);
    }

    fn usage(&self, page: &Page<keysmith::UsageRecord>) {
        if self.json {
            return self.print_json(page);
        }
        let rows = page
            .items
            .iter()
            .map(|u| {
                vec![
                    when(Some(u.created_at)),
                    u.key_id.to_string(),
                    u.method.clone(),
                    u.endpoint.clone(),
                    u.status_code.to_string(),
                    format!("{}ms", u.latency_ms),
                ]
            })
            .collect();
        table(
            &["AT", "KEY", "METHOD", "ENDPOINT", "STATUS", "LATENCY"],
            rows,
        );
        println!("({} of {})", page.items.len(), page.total);
    }

    fn aggregates(&self, rows: &[keysmith::UsageAggregate]) {
        if self.json {
            return self.print_json(&rows);
        }
        let rows = rows
            .iter()
            .map(|a| {
                vec![
                    a.period_start.format("%Y-%m-%d").to_string(),
                    a.request_count.to_string(),
                    a.error_count.to_string(),
                    format!("{}ms", a.p50_latency_ms),
                    format!("{}ms", a.p99_latency_ms),
                ]
            })
            .collect();
        table(&["PERIOD", "REQUESTS", "ERRORS", "P50", "P99"], rows);
    }

    fn rotations(&self, rotations: &[Rotation]) {
        if self.json {
            return self.print_json(&rotations);
        }
        let rows = rotations
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    r.reason.as_str().to_owned(),
                    keysmith::duration::format(r.grace_period),
                    when(Some(r.grace_ends)),
                    when(Some(r.created_at)),
                ]
            })
            .collect();
        table(&["ID", "REASON", "GRACE", "GRACE ENDS", "ROTATED"], rows);
    }
}
