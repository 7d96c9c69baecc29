//! The REST API, in process: every route, its errors, authentication and
//! scopes, tenant isolation, and the bad-input table.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{app, assert_error};
use serde_json::{Value, json};

#[tokio::test]
async fn key_lifecycle_over_http() {
    let app = app().await;
    let root = app.root_key("acme", "prod", &[]).await;

    let (status, policy) = app
        .post(
            "/v1/policies",
            &root,
            json!({
                "name": "standard", "allowed_scopes": ["read", "write"], "grace_period": "1h",
                "max_key_lifetime": "90d", "allowed_ips": ["10.0.0.0/8"]
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{policy}");
    assert_eq!(policy["grace_period"], "1h");
    let policy_id = policy["id"].as_str().unwrap().to_owned();
    assert!(policy_id.starts_with("kpol_"));

    let (status, created) = app
        .post(
            "/v1/keys",
            &root,
            json!({
                "name": "billing", "scopes": ["read"], "policy_id": policy_id,
                "metadata": {"team": "payments"}, "environment": "test"
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let raw = created["raw_key"].as_str().unwrap().to_owned();
    assert!(raw.starts_with("sk_test_"));
    let key_id = created["key"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["key"]["state"], "active");
    assert!(
        created["key"].get("hash").is_none(),
        "hashes are not exposed"
    );
    assert!(
        created["key"]["expires_at"].is_string(),
        "max_key_lifetime applied"
    );

    let validate =
        |raw: &str, ip: &str| json!({ "raw_key": raw, "ip": ip, "scopes": ["read:users"] });
    let (status, valid) = app
        .post("/v1/keys/validate", &root, validate(&raw, "10.1.2.3"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(valid["valid"], true, "{valid}");
    assert_eq!(valid["key"]["id"], key_id.as_str());
    assert_eq!(valid["scopes"], json!(["read"]));
    assert_eq!(valid["policy"]["id"], policy_id.as_str());
    let (_, denied) = app
        .post("/v1/keys/validate", &root, validate(&raw, "192.168.0.1"))
        .await;
    assert_eq!(denied, json!({ "valid": false, "code": "ip_not_allowed" }));

    let (status, rotated) = app
        .post(
            &format!("/v1/keys/{key_id}/rotate"),
            &root,
            json!({ "grace_period": "2h" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_raw = rotated["raw_key"].as_str().unwrap().to_owned();
    assert_ne!(new_raw, raw);
    let (_, old) = app
        .post("/v1/keys/validate", &root, validate(&raw, "10.1.2.3"))
        .await;
    assert_eq!(old["valid"], true);
    assert!(
        old["grace_ends"].is_string(),
        "the old secret says it is in grace: {old}"
    );
    let (_, rotations) = app
        .get(&format!("/v1/keys/{key_id}/rotations"), &root)
        .await;
    assert_eq!(rotations.as_array().unwrap().len(), 1);
    assert_eq!(rotations[0]["grace_period"], 7_200_000);

    let (status, suspended) = app
        .post(&format!("/v1/keys/{key_id}/suspend"), &root, json!({}))
        .await;
    assert_eq!(
        (status, suspended["state"].as_str()),
        (StatusCode::OK, Some("suspended"))
    );
    let (_, v) = app
        .post("/v1/keys/validate", &root, validate(&new_raw, "10.1.2.3"))
        .await;
    assert_eq!(v["code"], "suspended");
    let (status, _) = app
        .post(&format!("/v1/keys/{key_id}/reactivate"), &root, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let (status, revoked) = app
        .post(
            &format!("/v1/keys/{key_id}/revoke"),
            &root,
            json!({ "reason": "retired" }),
        )
        .await;
    assert_eq!(
        (status, revoked["state"].as_str()),
        (StatusCode::OK, Some("revoked"))
    );
    for secret in [&raw, &new_raw] {
        let (_, v) = app
            .post("/v1/keys/validate", &root, validate(secret, "10.1.2.3"))
            .await;
        assert_eq!(v["code"], "revoked");
    }
    for action in ["suspend", "reactivate", "rotate", "revoke"] {
        let result = app
            .post(&format!("/v1/keys/{key_id}/{action}"), &root, json!({}))
            .await;
        assert_error(&result, StatusCode::CONFLICT, "invalid_state_transition");
    }
    let in_use = app
        .call(
            Method::DELETE,
            &format!("/v1/policies/{policy_id}"),
            Some(&root),
            None,
        )
        .await;
    assert_error(&in_use, StatusCode::CONFLICT, "policy_in_use");
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/keys/{key_id}"),
            Some(&root),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/policies/{policy_id}"),
            Some(&root),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_error(
        &app.get(&format!("/v1/keys/{key_id}"), &root).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn keys_are_listed_filtered_and_changed() {
    let app = app().await;
    let root = app.root_key("acme", "prod", &[]).await;
    let mut ids = Vec::new();
    for (name, env) in [("a", "live"), ("b", "test"), ("c", "live")] {
        let (_, created) = app
            .post(
                "/v1/keys",
                &root,
                json!({ "name": name, "environment": env }),
            )
            .await;
        ids.push(created["key"]["id"].as_str().unwrap().to_owned());
    }
    let (status, page) = app.get("/v1/keys?limit=2", &root).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 3);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["items"][0]["id"], ids[2].as_str(), "newest first");
    let (_, live) = app.get("/v1/keys?environment=live", &root).await;
    assert_eq!(live["total"], 2);
    let (_, none) = app.get("/v1/keys?state=revoked", &root).await;
    assert_eq!(none["total"], 0);

    let path = format!("/v1/keys/{}", ids[0]);
    let (status, updated) = app
        .call(
            Method::PATCH,
            &path,
            Some(&root),
            Some(json!({ "name": "renamed", "metadata": {"x": 1} })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(
        (updated["name"].as_str(), &updated["metadata"]),
        (Some("renamed"), &json!({"x": 1}))
    );
    let (_, cleared) = app
        .call(
            Method::PATCH,
            &path,
            Some(&root),
            Some(json!({ "description": null })),
        )
        .await;
    assert_eq!(cleared["description"], Value::Null);

    let scopes_path = format!("/v1/keys/{}/scopes", ids[0]);
    let (_, with) = app
        .post(
            &scopes_path,
            &root,
            json!({ "scopes": ["read", "write:x"] }),
        )
        .await;
    assert_eq!(with["scopes"], json!(["read", "write:x"]));
    let (_, without) = app
        .call(
            Method::DELETE,
            &scopes_path,
            Some(&root),
            Some(json!({ "scopes": ["read"] })),
        )
        .await;
    assert_eq!(without["scopes"], json!(["write:x"]));

    let (status, scope) = app
        .post(
            "/v1/scopes",
            &root,
            json!({ "name": "admin:users", "description": "d" }),
        )
        .await;
    assert_eq!(
        (status, scope["parent"].as_str()),
        (StatusCode::CREATED, Some("admin"))
    );
    let (_, scopes) = app.get("/v1/scopes", &root).await;
    assert_eq!(scopes["total"], 3, "{scopes}");
    let (_, children) = app.get("/v1/scopes?parent=admin", &root).await;
    assert_eq!(children["total"], 1);
    let scope_path = format!("/v1/scopes/{}", scope["id"].as_str().unwrap());
    assert_eq!(
        app.call(Method::DELETE, &scope_path, Some(&root), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );

    let (_, policies) = app.get("/v1/policies", &root).await;
    assert_eq!(policies["total"], 0);
    let (_, p) = app
        .post(
            "/v1/policies",
            &root,
            json!({ "name": "p", "daily_quota": 10 }),
        )
        .await;
    let ppath = format!("/v1/policies/{}", p["id"].as_str().unwrap());
    let (status, replaced) = app
        .call(
            Method::PUT,
            &ppath,
            Some(&root),
            Some(json!({ "name": "p2", "rate_limit": 5, "rate_limit_window": "1m" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(
        (replaced["name"].as_str(), &replaced["daily_quota"]),
        (Some("p2"), &Value::Null)
    );
    assert_eq!(app.get(&ppath, &root).await.1["rate_limit_window"], "1m");
    let dup = app
        .post("/v1/policies", &root, json!({ "name": "p2" }))
        .await;
    assert_error(&dup, StatusCode::CONFLICT, "already_exists");
}

#[tokio::test]
async fn authentication_and_management_scopes() {
    let app = app().await;
    let root = app.root_key("acme", "prod", &[]).await;
    let reader = app.root_key("acme", "prod", &["keysmith:keys:read"]).await;
    assert_error(
        &app.call(Method::GET, "/v1/keys", None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let bogus = "ksr_live_0000000000000000000000000000000000000000000000000000000000000000";
    assert_error(
        &app.get("/v1/keys", bogus).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let basic = Request::get("/v1/keys")
        .header("authorization", "Basic abc")
        .body(Body::empty())
        .unwrap();
    assert_error(
        &app.send(basic).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    // A tenant's own key is not a root key.
    let (_, created) = app
        .post("/v1/keys", &root, json!({ "name": "tenant-key" }))
        .await;
    let tenant_raw = created["raw_key"].as_str().unwrap();
    assert_error(
        &app.get("/v1/keys", tenant_raw).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    // Scopes.
    assert_eq!(app.get("/v1/keys", &reader).await.0, StatusCode::OK);
    assert_error(
        &app.post("/v1/keys", &reader, json!({ "name": "x" })).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &app.post(
            "/v1/keys/validate",
            &reader,
            json!({ "raw_key": tenant_raw }),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &app.get("/v1/policies", &reader).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // Root keys never appear in a tenant's lists.
    let (_, page) = app.get("/v1/keys", &root).await;
    assert_eq!(page["total"], 1);
    // A revoked root key stops working.
    let root_tenant = keysmith_server::root::root_tenant();
    let principal = keysmith_server::root::authenticate(&app.engine, &reader)
        .await
        .unwrap();
    app.engine
        .revoke_key(&root_tenant, &principal.key_id, None)
        .await
        .unwrap();
    assert_error(
        &app.get("/v1/keys", &reader).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let app = app().await;
    let a = app.root_key("acme", "a", &[]).await;
    let b = app.root_key("acme", "b", &[]).await;
    let (_, b_policy) = app.post("/v1/policies", &b, json!({ "name": "bp" })).await;
    let (_, b_key) = app
        .post(
            "/v1/keys",
            &b,
            json!({ "name": "bk", "scopes": ["b-scope"] }),
        )
        .await;
    let (_, b_scopes) = app.get("/v1/scopes", &b).await;
    let key = b_key["key"]["id"].as_str().unwrap();
    let policy = b_policy["id"].as_str().unwrap();
    let scope = b_scopes["items"][0]["id"].as_str().unwrap();
    app.post(&format!("/v1/keys/{key}/rotate"), &b, json!({}))
        .await;
    app.post("/v1/keys", &a, json!({ "name": "ak" })).await;

    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/v1/keys/{key}"), None),
        (
            Method::PATCH,
            format!("/v1/keys/{key}"),
            Some(json!({ "name": "x" })),
        ),
        (Method::DELETE, format!("/v1/keys/{key}"), None),
        (
            Method::POST,
            format!("/v1/keys/{key}/rotate"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/v1/keys/{key}/revoke"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/v1/keys/{key}/suspend"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/v1/keys/{key}/reactivate"),
            Some(json!({})),
        ),
        (
            Method::POST,
            format!("/v1/keys/{key}/scopes"),
            Some(json!({ "scopes": ["x"] })),
        ),
        (
            Method::DELETE,
            format!("/v1/keys/{key}/scopes"),
            Some(json!({ "scopes": ["b-scope"] })),
        ),
        (Method::GET, format!("/v1/keys/{key}/rotations"), None),
        (Method::GET, format!("/v1/policies/{policy}"), None),
        (
            Method::PUT,
            format!("/v1/policies/{policy}"),
            Some(json!({ "name": "hijack" })),
        ),
        (Method::DELETE, format!("/v1/policies/{policy}"), None),
        (Method::DELETE, format!("/v1/scopes/{scope}"), None),
    ];
    for (method, path, body) in calls {
        let result = app.call(method.clone(), &path, Some(&a), body).await;
        assert_error(&result, StatusCode::NOT_FOUND, "not_found");
    }
    let (_, keys) = app.get("/v1/keys", &a).await;
    assert_eq!(keys["total"], 1);
    assert_eq!(keys["items"][0]["name"], "ak");
    assert_eq!(app.get("/v1/policies", &a).await.1["total"], 0);
    assert_eq!(app.get("/v1/scopes", &a).await.1["total"], 0);
    // B's key does not validate for A.
    let raw = b_key["raw_key"].as_str().unwrap();
    let (_, v) = app
        .post("/v1/keys/validate", &a, json!({ "raw_key": raw }))
        .await;
    assert_eq!(v, json!({ "valid": false, "code": "invalid_key" }));
    // And B's things are untouched.
    let (_, still) = app.get(&format!("/v1/keys/{key}"), &b).await;
    assert_eq!(
        (still["name"].as_str(), still["state"].as_str()),
        (Some("bk"), Some("active"))
    );
}

#[tokio::test]
async fn bad_input_is_a_clear_400() {
    let app = app().await;
    let root = app.root_key("acme", "prod", &[]).await;
    let (_, key) = app.post("/v1/keys", &root, json!({ "name": "k" })).await;
    let key_id = key["key"]["id"].as_str().unwrap().to_owned();
    let policy_id = app
        .post("/v1/policies", &root, json!({ "name": "p" }))
        .await
        .1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // (method, path, body, text that the message must contain)
    let table: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/v1/policies".into(),
            json!({ "name": "x", "grace_period": "soon" }),
            "grace_period",
        ),
        (
            Method::POST,
            "/v1/policies".into(),
            json!({ "name": "x", "allowed_ips": ["10.0.0.0/33"] }),
            "allowed_ips[0]",
        ),
        (
            Method::POST,
            "/v1/policies".into(),
            json!({ "name": "x", "allowed_ips": ["garbage"] }),
            "allowed_ips[0]",
        ),
        (
            Method::POST,
            "/v1/policies".into(),
            json!({ "name": "x", "daily_quota": -1 }),
            "daily_quota",
        ),
        (
            Method::POST,
            "/v1/policies".into(),
            json!({ "name": "x", "monthly_quota": 1.5 }),
            "monthly_quota",
        ),
        (
            Method::POST,
            "/v1/policies".into(),
            json!({ "name": "x", "allowed_origins": ["null"] }),
            "allowed_origins[0]",
        ),
        (
            Method::POST,
            "/v1/policies".into(),
            json!({ "name": "x", "surprise": 1 }),
            "surprise",
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            json!({ "name": "x", "environment": "Prod!" }),
            "environment",
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            json!({ "name": "x", "scopes": ["bad scope"] }),
            "scopes[0]",
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            json!({ "name": "" }),
            "name",
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            json!({ "name": "x", "policy_id": key_id }),
            "kpol",
        ),
        (
            Method::POST,
            "/v1/keys".into(),
            json!({ "name": "x", "expires_at": "tomorrow" }),
            "expires_at",
        ),
        (
            Method::POST,
            format!("/v1/keys/{key_id}/rotate"),
            json!({ "grace_period": "forever" }),
            "grace_period",
        ),
        (
            Method::POST,
            format!("/v1/keys/{key_id}/rotate"),
            json!({ "reason": "boredom" }),
            "reason",
        ),
        (
            Method::POST,
            "/v1/keys/validate".into(),
            json!({ "raw_key": "x", "ip": "not-an-ip" }),
            "ip",
        ),
    ];
    for (method, path, body, mention) in table {
        let result = app
            .call(method, &path, Some(&root), Some(body.clone()))
            .await;
        assert_error(&result, StatusCode::BAD_REQUEST, "invalid_input");
        let message = result.1["error"]["message"].as_str().unwrap();
        assert!(message.contains(mention), "{body} → {message}");
    }
    for path in [
        "/v1/keys?limit=1001".to_owned(),
        "/v1/keys?limit=0".into(),
        "/v1/keys?limit=abc".into(),
        "/v1/keys?state=zombie".into(),
        "/v1/keys?bogus=1".into(),
        "/v1/keys/not-an-id".into(),
        format!("/v1/keys/{policy_id}"),
        format!("/v1/policies/{key_id}"),
    ] {
        assert_error(
            &app.get(&path, &root).await,
            StatusCode::BAD_REQUEST,
            "invalid_input",
        );
    }
    let scope_path = "/v1/scopes/akey_01h2xcejqtf2nbrexx3vqjhp41";
    let wrong_kind = app
        .call(Method::DELETE, scope_path, Some(&root), None)
        .await;
    assert_error(&wrong_kind, StatusCode::BAD_REQUEST, "invalid_input");
    let wrong_method = app.call(Method::PUT, "/v1/keys", Some(&root), None).await;
    assert_error(
        &wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    // Syntax, type, size.
    let raw_body = |body: &'static str, content_type: Option<&str>| {
        let mut r = Request::post("/v1/keys").header("authorization", format!("Bearer {root}"));
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        r.body(Body::from(body)).unwrap()
    };
    assert_error(
        &app.send(raw_body("{not json", Some("application/json")))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        &app.send(raw_body("{\"name\":\"x\"}", Some("text/plain")))
            .await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert_error(
        &app.send(raw_body("{\"name\":\"x\"}", None)).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let huge = json!({ "name": "x", "metadata": { "blob": "x".repeat(100 * 1024) } });
    assert_error(
        &app.post("/v1/keys", &root, huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let big_meta = json!({ "name": "x", "metadata": { "blob": "x".repeat(20 * 1024) } });
    assert_error(
        &app.post("/v1/keys", &root, big_meta).await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    let too_many: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
    assert_error(
        &app.post(
            "/v1/keys",
            &root,
            json!({ "name": "x", "scopes": too_many }),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        &app.get("/v1/nothing-here", &root).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn validate_reports_every_denial_code() {
    let app = app().await;
    let root = app.root_key("acme", "prod", &[]).await;
    let (_, p) = app
        .post(
            "/v1/policies",
            &root,
            json!({
                "name": "fence", "allowed_origins": ["https://app.example.com"],
                "allowed_methods": ["GET"], "allowed_paths": ["/api"]
            }),
        )
        .await;
    let (_, k) = app
        .post(
            "/v1/keys",
            &root,
            json!({ "name": "k", "policy_id": p["id"], "scopes": ["read"] }),
        )
        .await;
    let raw = k["raw_key"].as_str().unwrap();
    let check = |body: Value, code: &'static str| {
        let app = &app;
        let root = root.clone();
        async move {
            let (status, v) = app.post("/v1/keys/validate", &root, body).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(v["valid"], false, "{v}");
            assert_eq!(v["code"], code);
        }
    };
    check(json!({ "raw_key": "sk_live_short" }), "invalid_key").await;
    check(json!({ "raw_key": raw }), "origin_not_allowed").await;
    check(
        json!({ "raw_key": raw, "origin": "https://app.example.com" }),
        "method_not_allowed",
    )
    .await;
    check(
        json!({ "raw_key": raw, "origin": "https://app.example.com", "method": "GET" }),
        "path_not_allowed",
    )
    .await;
    let ok = json!({ "raw_key": raw, "origin": "https://app.example.com", "method": "get", "path": "/api/x" });
    assert_eq!(
        app.post("/v1/keys/validate", &root, ok.clone()).await.1["valid"],
        true
    );
    let mut needs = ok.clone();
    needs["scopes"] = json!(["write"]);
    check(needs, "insufficient_scope").await;
    let id = k["key"]["id"].as_str().unwrap();
    app.post(
        &format!("/v1/keys/{id}/rotate"),
        &root,
        json!({ "reason": "compromise" }),
    )
    .await;
    check(ok, "rotated").await;
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi() {
    let app = app().await;
    let root = app.root_key("acme", "prod", &[]).await;
    let (status, health) = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    assert_eq!(
        app.call(Method::GET, "/readyz", None, None).await.0,
        StatusCode::OK
    );
    let (_, k) = app.post("/v1/keys", &root, json!({ "name": "k" })).await;
    app.post(
        "/v1/keys/validate",
        &root,
        json!({ "raw_key": k["raw_key"] }),
    )
    .await;
    let (status, metrics) = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let text = metrics.as_str().unwrap();
    for name in [
        "keysmith_http_requests_total",
        "keysmith_validations_total",
        "keysmith_validation_duration_seconds",
        "keysmith_keys_created_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let (status, doc) = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/keys/{id}/rotate",
        "/v1/keys/{id}/revoke",
        "/v1/keys/{id}/suspend",
        "/v1/keys/{id}/reactivate",
        "/v1/keys/{id}/scopes",
        "/v1/keys/{id}/rotations",
        "/v1/keys/validate",
        "/v1/policies",
        "/v1/policies/{id}",
        "/v1/scopes",
        "/v1/scopes/{id}",
        "/v1/usage",
        "/v1/keys/{id}/usage",
        "/v1/keys/{id}/usage/aggregate",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["ApiKey"].is_object());
    assert!(doc["components"]["securitySchemes"]["root_key"].is_object());
    let (status, page) = app.call(Method::GET, "/docs", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.as_str().unwrap().contains("/openapi.json"));
    // Store down: readiness and management calls answer 503, never 500.
    app.store.close().await;
    assert_error(
        &app.call(Method::GET, "/readyz", None, None).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    );
    assert_error(
        &app.get("/v1/keys", &root).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    );
}

#[tokio::test]
async fn usage_is_recorded_listed_and_aggregated() {
    let app = app().await;
    let root = app.root_key("acme", "prod", &[]).await;
    let other = app.root_key("acme", "other", &[]).await;
    let (_, k) = app.post("/v1/keys", &root, json!({ "name": "k" })).await;
    let id = k["key"]["id"].as_str().unwrap().to_owned();
    let record = |status: u16, at: &str| {
        json!({
            "key_id": id, "endpoint": "/orders", "method": "GET", "status_code": status,
            "latency_ms": 7, "ip": "10.0.0.1", "created_at": at
        })
    };
    let batch = json!({ "records": [record(200, "2030-01-01T10:00:00Z"), record(500, "2030-01-02T10:00:00Z")] });
    let (status, accepted) = app.post("/v1/usage", &root, batch).await;
    assert_eq!(
        (status, accepted["accepted"].as_u64()),
        (StatusCode::ACCEPTED, Some(2))
    );
    // Queued for the usage writer, stored once it flushes.
    app.usage.flush().await;
    let (_, all) = app.get("/v1/usage", &root).await;
    assert_eq!(all["total"], 2);
    assert_eq!(all["items"][0]["status_code"], 500, "newest first");
    let (_, window) = app
        .get(
            &format!("/v1/keys/{id}/usage?after=2030-01-02T00:00:00Z"),
            &root,
        )
        .await;
    assert_eq!(window["total"], 1);
    let (status, rows) = app
        .get(&format!("/v1/keys/{id}/usage/aggregate?period=day"), &root)
        .await;
    assert_eq!(
        (status, rows.as_array().map(Vec::len)),
        (StatusCode::OK, Some(0)),
        "{rows}"
    );
    // The aggregation worker's pass fills them.
    let day = "2030-01-02T12:00:00Z".parse().unwrap();
    app.engine
        .aggregate_usage(keysmith::UsagePeriod::Day, day)
        .await
        .unwrap();
    let (_, rows) = app
        .get(&format!("/v1/keys/{id}/usage/aggregate?period=day"), &root)
        .await;
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert_eq!(
        (
            rows[0]["request_count"].as_u64(),
            rows[0]["error_count"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_error(
        &app.get(&format!("/v1/keys/{id}/usage/aggregate?period=week"), &root)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    // Another tenant neither sees nor reports this key's usage.
    assert_eq!(app.get("/v1/usage", &other).await.1["total"], 0);
    assert_error(
        &app.get(&format!("/v1/keys/{id}/usage"), &other).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let theirs = json!({ "records": [record(200, "2030-01-01T10:00:00Z")] });
    assert_error(
        &app.post("/v1/usage", &other, theirs).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let bad = json!({ "records": [record(200, "2030-01-01T10:00:00Z"), record(999, "2030-01-01T10:00:00Z")] });
    let result = app.post("/v1/usage", &root, bad).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "invalid_input");
    assert!(
        result.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("records[1].status_code")
    );
    let reader = app.root_key("acme", "prod", &["keysmith:keys:read"]).await;
    assert_error(
        &app.get("/v1/usage", &reader).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
}

#[tokio::test]
async fn reported_usage_goes_through_the_writer_whole_batches_or_nothing() {
    use keysmith::usage::UsageWriterOptions;
    // Room for 3 records, and a writer that only flushes when asked.
    let options = UsageWriterOptions {
        capacity: 3,
        batch_size: 1000,
        flush_interval: std::time::Duration::from_secs(3600),
    };
    let mut app = common::app_with_usage(options).await;
    let root = app.root_key("acme", "prod", &[]).await;
    let (_, k) = app.post("/v1/keys", &root, json!({ "name": "k" })).await;
    let record = json!({
        "key_id": k["key"]["id"], "endpoint": "/orders", "method": "GET",
        "status_code": 200, "latency_ms": 3
    });
    let batch = |n: usize| json!({ "records": vec![record.clone(); n] });
    // A batch larger than the queue is refused whole, with a clear code.
    assert_error(
        &app.post("/v1/usage", &root, batch(4)).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "queue_full",
    );
    let (status, _) = app.post("/v1/usage", &root, batch(2)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Shutting the writer down writes what it holds: 2 rows, none of the
    // refused batch.
    app.usage_writer.take().unwrap().shutdown().await;
    let (_, all) = app.get("/v1/usage", &root).await;
    assert_eq!(all["total"], 2, "{all}");
}

#[tokio::test]
async fn validate_reports_rate_limit_and_quota_state() {
    let app = app().await;
    let root = app.root_key("acme", "prod", &[]).await;
    let (_, limited) = app
        .post(
            "/v1/policies",
            &root,
            json!({ "name": "rl", "rate_limit": 2, "rate_limit_window": "1h" }),
        )
        .await;
    let (_, k) = app
        .post(
            "/v1/keys",
            &root,
            json!({ "name": "k", "policy_id": limited["id"] }),
        )
        .await;
    let body = json!({ "raw_key": k["raw_key"] });
    let (_, first) = app.post("/v1/keys/validate", &root, body.clone()).await;
    assert_eq!(first["valid"], true);
    assert_eq!(first["rate_limit"]["limit"], 2);
    assert_eq!(first["rate_limit"]["remaining"], 1);
    app.post("/v1/keys/validate", &root, body.clone()).await;
    let (status, refused) = app.post("/v1/keys/validate", &root, body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(refused["retry_after"].as_u64().unwrap() >= 1);
    assert_eq!(refused["rate_limit"]["remaining"], 0);

    let (_, quota) = app
        .post(
            "/v1/policies",
            &root,
            json!({ "name": "q", "daily_quota": 1 }),
        )
        .await;
    let (_, q) = app
        .post(
            "/v1/keys",
            &root,
            json!({ "name": "q", "policy_id": quota["id"] }),
        )
        .await;
    let body = json!({ "raw_key": q["raw_key"] });
    let (_, ok) = app.post("/v1/keys/validate", &root, body.clone()).await;
    assert_eq!(ok["quota"][0]["used"], 1);
    assert_eq!(ok["quota"][0]["period"], "day");
    let (_, over) = app.post("/v1/keys/validate", &root, body).await;
    assert_eq!(over["code"], "quota_exceeded");
    assert!(over["resets_at"].is_string());
    let zero = app
        .post(
            "/v1/keys/validate",
            &root,
            json!({ "raw_key": q["raw_key"], "cost": 0 }),
        )
        .await;
    assert_error(&zero, StatusCode::BAD_REQUEST, "invalid_input");
}
