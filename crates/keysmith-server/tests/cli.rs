//! The command line: output for scripts, tables for people, exit codes
//! 0 (ok), 1 (refused, with the reason) and 2 (usage error).

use std::process::{Command, Output};

use serde_json::Value;

struct Cli {
    db: String,
}

impl Cli {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("keysmith-cli-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            db: dir.join("k.db").to_str().unwrap().to_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_keysmith"))
            .args(["--database-url", &self.db])
            .args(args)
            .output()
            .expect("run keysmith")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

#[test]
fn commands_outputs_and_exit_codes() {
    let cli = Cli::new();
    assert_eq!(code(&cli.run(&["migrate"])), 0);

    // root-key create prints only the raw key, for `ROOT=$(keysmith root-key create …)`.
    let out = cli.run(&["root-key", "create", "--app", "acme", "--tenant", "prod"]);
    assert_eq!(code(&out), 0);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    assert!(stdout.starts_with("ksr_live_") && stdout.trim().len() == "ksr_live_".len() + 64);
    let reserved = cli.run(&["root-key", "create", "--app", "_keysmith", "--tenant", "x"]);
    assert_eq!(code(&reserved), 2);

    let created = cli.json(&[
        "keys",
        "--app",
        "acme",
        "--tenant",
        "prod",
        "create",
        "--name",
        "ci",
        "--scope",
        "read,write:builds",
    ]);
    let raw = created["raw_key"].as_str().unwrap().to_owned();
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created["key"]["scopes"],
        serde_json::json!(["read", "write:builds"])
    );
    let listed = cli.json(&["keys", "--app", "acme", "--tenant", "prod", "list"]);
    assert_eq!(listed["total"], 1);
    let list = |extra: &[&str]| {
        let mut args = vec!["keys", "--app", "acme", "--tenant", "prod", "list"];
        args.extend_from_slice(extra);
        cli.json(&args)["total"].clone()
    };
    assert_eq!(list(&["--search", "CI"]), 1);
    assert_eq!(list(&["--search", "c_"]), 0, "_ matches only itself");
    assert_eq!(list(&["--rotation-due"]), 0, "no policy, no rotation due");
    assert_eq!(
        cli.json(&["keys", "list"])["total"],
        0,
        "another tenant sees nothing"
    );

    // Tables for people.
    let table = cli.run(&["keys", "--app", "acme", "--tenant", "prod", "list"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.starts_with("ID") && text.contains(&id) && text.contains("(1 of 1)"),
        "{text}"
    );
    assert!(!text.contains(&raw[9..]), "lists never show a secret");

    let valid = cli.run(&["validate", &raw, "--scope", "read:x"]);
    assert_eq!(
        code(&valid),
        0,
        "{}",
        String::from_utf8_lossy(&valid.stderr)
    );
    let rotated = cli.json(&[
        "keys", "--app", "acme", "--tenant", "prod", "rotate", &id, "--grace", "1h",
    ]);
    assert_ne!(rotated["raw_key"].as_str().unwrap(), raw);
    assert_eq!(
        cli.json(&[
            "rotations",
            "--app",
            "acme",
            "--tenant",
            "prod",
            "list",
            &id
        ])
        .as_array()
        .unwrap()
        .len(),
        1
    );
    let revoke = cli.run(&[
        "keys", "--app", "acme", "--tenant", "prod", "revoke", &id, "--reason", "done",
    ]);
    assert_eq!(code(&revoke), 0);

    // Refused: exit 1 with the reason.
    let again = cli.run(&["keys", "--app", "acme", "--tenant", "prod", "revoke", &id]);
    assert_eq!(code(&again), 1);
    assert!(String::from_utf8_lossy(&again.stderr).contains("revoke"));
    let refused = cli.run(&["validate", &raw]);
    assert_eq!(code(&refused), 1);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("revoked"));
    let missing = cli.run(&[
        "keys",
        "--app",
        "acme",
        "--tenant",
        "prod",
        "get",
        "akey_01h2xcejqtf2nbrexx3vqjhp41",
    ]);
    assert_eq!(code(&missing), 1);

    // Usage errors: exit 2.
    let long_search = "x".repeat(101);
    for args in [
        vec!["keys", "get", "not-an-id"],
        vec!["keys", "get", "kpol_01h2xcejqtf2nbrexx3vqjhp41"],
        vec!["policies", "create", "{not json"],
        vec![
            "policies",
            "create",
            r#"{"name":"p","allowed_ips":["10.0.0.0/33"]}"#,
        ],
        vec!["keys", "create", "--name", "x", "--scope", "bad scope"],
        vec!["keys", "rotate", &id, "--grace", "soon"],
        vec!["no-such-command"],
        vec!["keys", "list", "--limit", "5000"],
        vec!["keys", "list", "--search", &long_search],
    ] {
        let out = cli.run(&args);
        assert_eq!(
            code(&out),
            2,
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Policies and scopes round trip.
    let policy = cli.json(&[
        "policies",
        "create",
        r#"{"name":"office","allowed_ips":["10.0.0.0/8"]}"#,
    ]);
    let pid = policy["id"].as_str().unwrap();
    assert_eq!(
        cli.json(&["policies", "get", pid])["allowed_ips"],
        serde_json::json!(["10.0.0.0/8"])
    );
    let scope = cli.json(&["scopes", "create", "admin:users"]);
    assert_eq!(scope[0]["parent"], "admin");
    assert_eq!(code(&cli.run(&["policies", "delete", pid])), 0);
}

#[test]
fn unknown_configuration_is_a_usage_error() {
    let cli = Cli::new();
    let out = Command::new(env!("CARGO_BIN_EXE_keysmith"))
        .args(["--database-url", &cli.db, "keys", "list"])
        .env("KEYSMITH_POOL_SIZ", "3")
        .output()
        .unwrap();
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYSMITH_POOL_SIZ"));
}
