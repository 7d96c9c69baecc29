//! The Keysmith story in one file: a policy, a key with scopes, validation,
//! rotation with a grace period, and revocation.
//!
//! Run it with `cargo run --example quickstart`. Time is simulated with a
//! manual clock, so the one-hour grace period passes instantly.

use std::sync::Arc;
use std::time::Duration;

use keysmith::{
    CreateKey, Engine, Error, ManualClock, MemoryStore, PolicySpec, RequestContext, RotateKey,
    Tenant,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    run(true).await
}

/// Runs the story; `tests/quickstart.rs` runs it too, silently.
pub async fn run(verbose: bool) -> Result<(), Error> {
    let say = |line: String| {
        if verbose {
            println!("{line}");
        }
    };
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let engine = Engine::builder(Arc::new(MemoryStore::new()))
        .clock(clock.clone())
        .build();
    let tenant = Tenant::new("my-app", "acme")?;

    // 1. A policy: which scopes keys may hold, how long they live.
    let policy = engine
        .create_policy(
            &tenant,
            PolicySpec {
                name: "standard".into(),
                allowed_scopes: vec!["read".into(), "write".into()],
                max_key_lifetime: Some(Duration::from_secs(90 * 86_400)),
                ..Default::default()
            },
        )
        .await?;
    say(format!("policy {} ({})", policy.id, policy.spec.name));

    // 2. A key under it. The raw key is shown once; only its hash is stored.
    let created = engine
        .create_key(
            &tenant,
            CreateKey {
                name: "billing-service".into(),
                scopes: vec!["read".into(), "write:invoices".into()],
                policy_id: Some(policy.id),
                ..Default::default()
            },
        )
        .await?;
    let old = created.raw_key;
    say(format!(
        "key {} (…{}), expires {:?}",
        created.key.id, created.key.hint, created.key.expires_at
    ));

    // 3. Validate: `read` grants `read:users`.
    let request = RequestContext {
        required_scopes: vec!["read:users".into()],
        ..Default::default()
    };
    let valid = engine.validate(old.expose_secret(), &request).await?;
    say(format!(
        "valid: {} with scopes {:?}",
        valid.key.name, valid.key.scopes
    ));

    // 4. Rotate with a one-hour grace period: both secrets work meanwhile.
    let rotated = engine
        .rotate_key(
            &tenant,
            &created.key.id,
            RotateKey {
                grace_period: Some(Duration::from_secs(3600)),
                ..Default::default()
            },
        )
        .await?;
    let new = rotated.raw_key;
    let in_grace = engine.validate(old.expose_secret(), &request).await?;
    engine.validate(new.expose_secret(), &request).await?;
    say(format!(
        "rotated; old secret still valid until {:?}",
        in_grace.grace_ends
    ));

    // 5. After the grace period only the new secret works.
    clock.advance(Duration::from_secs(3601));
    let old_result = engine.validate(old.expose_secret(), &request).await;
    assert!(
        matches!(old_result, Err(Error::KeyRotated)),
        "{old_result:?}"
    );
    engine.validate(new.expose_secret(), &request).await?;
    say("grace over: old secret refused (rotated), new secret valid".into());

    // 6. Revoke: every secret of the key stops working, for good.
    engine
        .revoke_key(&tenant, &created.key.id, Some("service retired"))
        .await?;
    for raw in [&old, &new] {
        let result = engine.validate(raw.expose_secret(), &request).await;
        assert!(matches!(result, Err(Error::KeyRevoked)), "{result:?}");
    }
    for refused in [
        engine.suspend_key(&tenant, &created.key.id).await.err(),
        engine.reactivate_key(&tenant, &created.key.id).await.err(),
        engine
            .rotate_key(&tenant, &created.key.id, RotateKey::default())
            .await
            .err(),
    ] {
        assert!(
            matches!(refused, Some(Error::InvalidStateTransition { .. })),
            "{refused:?}"
        );
    }
    say(
        "revoked: both secrets refused; the key cannot be suspended, reactivated or rotated".into(),
    );
    Ok(())
}
