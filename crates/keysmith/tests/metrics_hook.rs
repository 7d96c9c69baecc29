//! The metrics hook counts lifecycle events through the `metrics` facade.

use std::sync::Arc;

use keysmith::hooks::MetricsHook;
use keysmith::{CreateKey, Engine, MemoryStore, RequestContext, RotateKey, Tenant};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// A counter's name, labels and value.
type Counter = (String, Vec<(String, String)>, u64);

#[test]
fn counters_follow_events() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let engine = Engine::builder(Arc::new(MemoryStore::new()))
                .hook(Arc::new(MetricsHook))
                .build();
            let tenant = Tenant::new("app", "t").unwrap();
            let request = CreateKey {
                name: "k".into(),
                ..Default::default()
            };
            let created = engine.create_key(&tenant, request).await.unwrap();
            let ctx = RequestContext::default();
            engine
                .validate(created.raw_key.expose_secret(), &ctx)
                .await
                .unwrap();
            engine
                .validate(created.raw_key.expose_secret(), &ctx)
                .await
                .unwrap();
            let _ = engine.validate("sk_live_nope", &ctx).await;
            engine
                .rotate_key(&tenant, &created.key.id, RotateKey::default())
                .await
                .unwrap();
            engine
                .revoke_key(&tenant, &created.key.id, None)
                .await
                .unwrap();
        });
    });
    let counters: Vec<Counter> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) => {
                let labels = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                Some((key.key().name().to_owned(), labels, n))
            }
            _ => None,
        })
        .collect();
    let get = |name: &str, label: (&str, &str)| {
        counters
            .iter()
            .find(|(n, labels, _)| {
                n == name && labels.iter().any(|(k, v)| k == label.0 && v == label.1)
            })
            .map(|(_, _, v)| *v)
    };
    assert_eq!(
        counters
            .iter()
            .find(|c| c.0 == "keysmith_keys_created_total")
            .map(|c| c.2),
        Some(1)
    );
    assert_eq!(
        get("keysmith_validations_total", ("outcome", "valid")),
        Some(2)
    );
    assert_eq!(
        get("keysmith_validations_total", ("outcome", "invalid_key")),
        Some(1)
    );
    assert_eq!(
        get("keysmith_keys_rotated_total", ("reason", "manual")),
        Some(1)
    );
    assert_eq!(
        get("keysmith_key_state_changes_total", ("to", "revoked")),
        Some(1)
    );
}
