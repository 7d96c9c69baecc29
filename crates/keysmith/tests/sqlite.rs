//! The conformance suite on SQLite, in a file and in `:memory:`.
#![cfg(feature = "sqlite")]

use std::sync::Arc;

use keysmith::{SqliteStore, Store};

async fn memory_store() -> Arc<dyn Store> {
    let store = SqliteStore::open(":memory:").await.expect("open :memory:");
    store.migrate().await.expect("migrate");
    Arc::new(store)
}

async fn file_store() -> Arc<dyn Store> {
    let dir = std::env::temp_dir().join(format!("keysmith-sqlite-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = SqliteStore::open(dir.join("keys.db").to_str().unwrap())
        .await
        .expect("open file");
    store.migrate().await.expect("migrate");
    Arc::new(store)
}

mod memory {
    keysmith::conformance_tests!(super::memory_store());
}

mod file {
    keysmith::conformance_tests!(super::file_store());
}

mod schema {
    use keysmith::{Engine, Error, SqliteStore, Store};
    use std::sync::Arc;

    fn temp_path(name: &str) -> String {
        let dir = std::env::temp_dir().join(format!("keysmith-sqlite-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name).to_str().unwrap().to_owned()
    }

    async fn names(store: &SqliteStore, kind: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = ? ORDER BY name")
            .bind(kind)
            .fetch_all(store.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn migrations_create_the_seed_tables_and_are_idempotent() {
        let path = temp_path("new/keys.db");
        std::fs::remove_dir_all(std::path::Path::new(&path).parent().unwrap()).ok();
        std::fs::create_dir_all(std::path::Path::new(&path).parent().unwrap()).unwrap();
        let store = SqliteStore::open(&path)
            .await
            .expect("a missing file is created");
        assert!(std::path::Path::new(&path).exists());
        store.migrate().await.unwrap();
        store.migrate().await.expect("migrating again is a no-op");
        let tables = names(&store, "table").await;
        for table in [
            "keysmith_keys",
            "keysmith_policies",
            "keysmith_scopes",
            "keysmith_key_scopes",
            "keysmith_usage_blocks",
            "keysmith_usage_agg",
            "keysmith_rotations",
        ] {
            assert!(tables.contains(&table.to_owned()), "{table} in {tables:?}");
        }
        // Raw usage is kept in blocks; its records read as the seed's table.
        assert_eq!(names(&store, "view").await, ["keysmith_usage"]);
        let indexes = names(&store, "index").await;
        for index in [
            "idx_keys_hash",
            "idx_keys_tenant",
            "idx_keys_state",
            "idx_keys_expiry",
        ] {
            assert!(
                indexes.contains(&index.to_owned()),
                "{index} in {indexes:?}"
            );
        }
        let pragma = |p: &'static str| {
            let pool = store.pool().clone();
            async move {
                sqlx::query_scalar::<_, String>(p)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(pragma("PRAGMA journal_mode").await, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(fk, 1);
        store.ping().await.unwrap();
        store.close().await;
    }

    /// Usage rows written before usage was kept in blocks move into blocks,
    /// and read back exactly, through the store and through the view.
    #[tokio::test]
    async fn usage_rows_of_earlier_versions_move_into_blocks() {
        let path = temp_path("keys.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let mut before_blocks = sqlx::migrate!("./migrations/sqlite");
        before_blocks.migrations = before_blocks
            .migrations
            .iter()
            .filter(|m| m.version < 4)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        before_blocks.run(store.pool()).await.unwrap();
        let tenant = keysmith::Tenant::new("app", "t").unwrap();
        let key = keysmith::KeyId::new();
        let t0: chrono::DateTime<chrono::Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        // Three records in the first hour, one in the second: two blocks.
        let records: Vec<keysmith::UsageRecord> = [0, 10, 59, 61]
            .into_iter()
            .map(|minutes| keysmith::UsageRecord {
                id: keysmith::UsageId::new(),
                key_id: key,
                app_id: tenant.app_id.clone(),
                tenant_id: tenant.tenant_id.clone(),
                endpoint: format!("/v1/{minutes}"),
                method: "POST".into(),
                status_code: if minutes == 10 { 503 } else { 200 },
                ip: (minutes != 59).then(|| "10.0.0.1".to_owned()),
                user_agent: (minutes == 0).then(|| "curl/8 \"quoted\"".to_owned()),
                latency_ms: minutes as u64,
                metadata: if minutes == 61 {
                    serde_json::json!({"region": "eu", "n": 1})
                        .as_object()
                        .unwrap()
                        .clone()
                } else {
                    Default::default()
                },
                created_at: t0 + chrono::Duration::minutes(minutes),
            })
            .collect();
        for r in &records {
            sqlx::query(
                "INSERT INTO keysmith_usage (id, key_id, app_id, tenant_id, endpoint, method, \
                 status_code, ip, user_agent, latency_ms, metadata, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(r.id.to_string())
            .bind(r.key_id.to_string())
            .bind(&r.app_id)
            .bind(&r.tenant_id)
            .bind(&r.endpoint)
            .bind(&r.method)
            .bind(i64::from(r.status_code))
            .bind(&r.ip)
            .bind(&r.user_agent)
            .bind(r.latency_ms as i64)
            .bind(serde_json::to_string(&r.metadata).unwrap())
            .bind(r.created_at.timestamp_micros())
            .execute(store.pool())
            .await
            .unwrap();
        }
        store.migrate().await.unwrap();
        let blocks: i64 = sqlx::query_scalar("SELECT count(*) FROM keysmith_usage_blocks")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(blocks, 2);
        let listed = store
            .list_usage(&tenant, &Default::default())
            .await
            .unwrap();
        let mut newest_first = records.clone();
        newest_first.reverse();
        assert_eq!(listed.total, 4);
        assert_eq!(listed.items, newest_first);
        let (status, ua, metadata): (i64, Option<String>, String) = sqlx::query_as(
            "SELECT status_code, user_agent, metadata FROM keysmith_usage \
             ORDER BY created_at LIMIT 1 OFFSET 1",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!((status, ua, metadata.as_str()), (503, None, "{}"));
    }

    #[tokio::test]
    async fn data_survives_reopening_a_file_but_not_memory() {
        let path = temp_path("keys.db");
        let tenant = keysmith::Tenant::new("app", "t").unwrap();
        let store = SqliteStore::open(&path).await.unwrap();
        store.migrate().await.unwrap();
        let engine = Engine::builder(Arc::new(store.clone())).build();
        let request = keysmith::CreateKey {
            name: "kept".into(),
            ..Default::default()
        };
        let created = engine.create_key(&tenant, request).await.unwrap();
        store.close().await;
        let reopened = SqliteStore::open(&path).await.unwrap();
        reopened.migrate().await.unwrap();
        let engine = Engine::builder(Arc::new(reopened)).build();
        let ctx = keysmith::RequestContext::default();
        let valid = engine
            .validate(created.raw_key.expose_secret(), &ctx)
            .await
            .unwrap();
        assert_eq!(valid.key.id, created.key.id);

        let memory = SqliteStore::open(":memory:").await.unwrap();
        memory.migrate().await.unwrap();
        let listed = memory
            .list_keys(&tenant, &Default::default())
            .await
            .unwrap();
        assert_eq!(listed.total, 0);
    }

    #[tokio::test]
    async fn a_rotation_due_notice_is_not_repeated_after_a_restart() {
        let path = temp_path("keys.db");
        let tenant = keysmith::Tenant::new("app", "t").unwrap();
        let clock = Arc::new(keysmith::ManualClock::new(
            "2030-01-01T00:00:00Z".parse().unwrap(),
        ));
        let open = |path: String| async move {
            let store = SqliteStore::open(&path).await.unwrap();
            store.migrate().await.unwrap();
            store
        };
        let store = open(path.clone()).await;
        let engine = Engine::builder(Arc::new(store.clone()))
            .clock(clock.clone())
            .build();
        let policy = keysmith::PolicySpec {
            name: "monthly".into(),
            rotation_period: Some(std::time::Duration::from_secs(30 * 86_400)),
            ..Default::default()
        };
        let policy = engine.create_policy(&tenant, policy).await.unwrap();
        let request = keysmith::CreateKey {
            name: "k".into(),
            policy_id: Some(policy.id),
            ..Default::default()
        };
        engine.create_key(&tenant, request).await.unwrap();
        clock.advance(std::time::Duration::from_secs(30 * 86_400));
        assert_eq!(engine.notify_rotation_due(10).await.unwrap(), 1);
        store.close().await;

        let reopened = open(path).await;
        let engine = Engine::builder(Arc::new(reopened))
            .clock(clock.clone())
            .build();
        assert_eq!(
            engine.notify_rotation_due(10).await.unwrap(),
            0,
            "the claim is in the database, not in the process"
        );
        clock.advance(std::time::Duration::from_secs(30 * 86_400));
        assert_eq!(engine.notify_rotation_due(10).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_database_from_a_newer_keysmith_is_refused() {
        let path = temp_path("keys.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store.migrate().await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99990101000000, 'from the future', 1, x'00', 0)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        match store.migrate().await {
            Err(Error::Store(e)) => {
                assert!(e.to_string().contains("newer Keysmith"), "{e}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn from_pool_uses_the_applications_pool() {
        let path = temp_path("keys.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let store = SqliteStore::from_pool(pool);
        store.migrate().await.unwrap();
        store.ping().await.unwrap();
        let tenant = keysmith::Tenant::new("app", "t").unwrap();
        assert_eq!(
            store
                .list_keys(&tenant, &Default::default())
                .await
                .unwrap()
                .total,
            0
        );
    }

    fn usage_record(tenant: &keysmith::Tenant, minute: i64) -> keysmith::model::UsageRecord {
        keysmith::model::UsageRecord {
            id: keysmith::UsageId::new(),
            key_id: keysmith::KeyId::new(),
            app_id: tenant.app_id.clone(),
            tenant_id: tenant.tenant_id.clone(),
            endpoint: "/v1/things".into(),
            method: "GET".into(),
            status_code: 200,
            ip: None,
            user_agent: None,
            latency_ms: 1,
            metadata: Default::default(),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000 + minute * 60, 0).unwrap(),
        }
    }

    /// Large batches are cut into several INSERTs (512 blocks, then powers of
    /// two; a block per key): all of a batch is written, and a failure of its
    /// last INSERT still refuses all of it, leaving the usage connection
    /// usable.
    #[tokio::test]
    async fn large_usage_batches_are_written_and_refused_whole() {
        let path = temp_path("keys.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store.migrate().await.unwrap();
        let tenant = keysmith::Tenant::new("app", "t").unwrap();
        let total = |store: SqliteStore| {
            let tenant = tenant.clone();
            async move {
                store
                    .list_usage(&tenant, &Default::default())
                    .await
                    .unwrap()
                    .total
            }
        };
        // 1029 keys: 512 + 512 + 4 + 1 blocks.
        let first: Vec<_> = (0..1029).map(|i| usage_record(&tenant, i)).collect();
        store.insert_usage(&first).await.unwrap();
        assert_eq!(total(store.clone()).await, 1029);

        // 700 keys (512 + 128 + 32 + 16 + 8 + 4), the last one refused by
        // the database.
        let refused: Vec<_> = (0..700).map(|i| usage_record(&tenant, i)).collect();
        sqlx::raw_sql(&format!(
            "CREATE TRIGGER refuse_last BEFORE INSERT ON keysmith_usage_blocks \
             WHEN NEW.key_id = '{}' BEGIN SELECT RAISE(FAIL, 'refused'); END",
            refused[699].key_id
        ))
        .execute(store.pool())
        .await
        .unwrap();
        match store.insert_usage(&refused).await {
            Err(Error::Store(_)) => {}
            other => panic!("expected a store error, got {other:?}"),
        }
        assert_eq!(total(store.clone()).await, 1029, "nothing of it is kept");
        sqlx::raw_sql("DROP TRIGGER refuse_last")
            .execute(store.pool())
            .await
            .unwrap();

        let mut with_metadata = usage_record(&tenant, 5);
        with_metadata
            .metadata
            .insert("region".into(), serde_json::json!("eu"));
        let plain = usage_record(&tenant, 6);
        store
            .insert_usage(&[with_metadata.clone(), plain.clone()])
            .await
            .expect("the next batch goes through");
        assert_eq!(total(store.clone()).await, 1031);
        let window = keysmith::model::UsageFilter {
            after: Some(with_metadata.created_at),
            before: Some(plain.created_at + chrono::Duration::seconds(1)),
            ..Default::default()
        };
        let listed = store.list_usage(&tenant, &window).await.unwrap().items;
        assert!(listed.contains(&with_metadata) && listed.contains(&plain));
        store.close().await;
    }

    #[tokio::test]
    async fn an_empty_path_is_refused() {
        match SqliteStore::open("").await {
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "database_url"),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
}
