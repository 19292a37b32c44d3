//! `gangplank token create` against a temporary directory registry.

mod support;

use std::process::{Command, Output};
use std::sync::Arc;

use gangplank_api::istio::WorkloadGroup;
use gangplank_api::token::JoinToken;
use gangplank_api::{NamespacedName, kind, proto};
use gangplank_identity::token::{Verifier, secret_sha256};
use gangplank_registry::IdentityStore;
use gangplank_registry::dir::Registry;
use support::{gangplank_command, text};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

async fn registry_with_group() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::open(dir.path()).expect("registry");
    let mut group = WorkloadGroup::default();
    group.metadata.namespace = Some("bookinfo".into());
    group.metadata.name = Some("ratings".into());
    registry.put(&group).await.expect("put group");
    (dir, registry)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("gangplank runs")
}

#[tokio::test]
async fn prints_only_the_token_and_stores_only_its_hash() {
    let (dir, registry) = registry_with_group().await;
    let root = dir.path().to_str().expect("utf-8 path");
    let out = run(&mut gangplank_command(&[
        "token",
        "create",
        "--workload-group",
        "bookinfo/ratings",
        "--registry",
        root,
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let token = stdout.trim_end_matches('\n');
    assert_eq!(stdout.lines().count(), 1, "stdout is the token alone: {stdout:?}");
    let (id, secret) = token.split_once('.').expect("<id>.<secret>");
    assert_eq!(id.len(), 10);

    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "created join token {id} for WorkloadGroup bookinfo/ratings: expires "
        )),
        "{stderr}"
    );
    assert!(stderr.contains("1 use"), "{stderr}");
    assert!(!stderr.contains(secret), "stderr must not show the secret");

    let key = NamespacedName::new("bookinfo", id);
    let stored: JoinToken = registry.get(&key).await.expect("read").expect("token stored");
    assert_eq!(stored.spec.workload_group, "ratings");
    assert_eq!(stored.spec.secret_sha256, secret_sha256(secret));
    assert_eq!(stored.spec.uses, 1);
    let file = std::fs::read_to_string(registry.path_of::<JoinToken>(&key).expect("path")).expect("file");
    assert!(!file.contains(secret), "the secret is never stored");

    // The printed token is accepted by the endpoint's verifier.
    let verifier = Verifier::new(Arc::new(IdentityStore::new(Arc::new(registry.clone()))));
    let credential = proto::Credential {
        kind: kind::JOIN_TOKEN.into(),
        payload: token.as_bytes().to_vec(),
        ..Default::default()
    };
    verifier
        .verify_at(
            &credential,
            &NamespacedName::new("bookinfo", "ratings"),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("token verifies");
}

#[tokio::test]
async fn json_output_with_ttl_and_uses_from_env_registry() {
    let (dir, _registry) = registry_with_group().await;
    let out = run(gangplank_command(&[
        "token",
        "create",
        "--workload-group",
        "bookinfo/ratings",
        "--ttl",
        "2h",
        "--uses",
        "3",
        "-o",
        "json",
    ])
    .env("GANGPLANK_REGISTRY", dir.path()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["workloadGroup"], "bookinfo/ratings");
    assert_eq!(v["uses"], 3);
    let token = v["token"].as_str().expect("token");
    assert!(token.starts_with(&format!("{}.", v["id"].as_str().expect("id"))));
    let expires =
        OffsetDateTime::parse(v["expiresAt"].as_str().expect("expiresAt"), &Rfc3339).expect("rfc3339");
    let in_secs = (expires - OffsetDateTime::now_utc()).whole_seconds();
    assert!((7100..=7200).contains(&in_secs), "expires in {in_secs}s");
    assert!(text(&out.stderr).contains("3 uses"));
}

#[tokio::test]
async fn missing_group_is_an_error_and_writes_nothing() {
    let (dir, registry) = registry_with_group().await;
    let out = run(&mut gangplank_command(&[
        "token",
        "create",
        "--workload-group",
        "bookinfo/nope",
        "--registry",
        dir.path().to_str().expect("utf-8"),
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("WorkloadGroup bookinfo/nope not found in registry"),
        "{stderr}"
    );
    let tokens: Vec<JoinToken> = registry.list(None).await.expect("list");
    assert!(tokens.is_empty());
}

#[test]
fn missing_registry_folder_is_not_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("typo");
    let out = run(&mut gangplank_command(&[
        "token",
        "create",
        "--workload-group",
        "bookinfo/ratings",
        "--registry",
        missing.to_str().expect("utf-8"),
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("does not exist: pass --registry DIR or set GANGPLANK_REGISTRY"));
    assert!(!missing.exists());
}

#[test]
fn bad_arguments_are_refused() {
    for args in [
        &[
            "token",
            "create",
            "--workload-group",
            "ratings",
            "--registry",
            "/tmp",
        ][..],
        &[
            "token",
            "create",
            "--workload-group",
            "a/b",
            "--uses",
            "0",
            "--registry",
            "/tmp",
        ],
        &[
            "token",
            "create",
            "--workload-group",
            "a/b",
            "--ttl",
            "soon",
            "--registry",
            "/tmp",
        ],
        &["token", "create", "--workload-group", "a/b"],
    ] {
        let out = run(&mut gangplank_command(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
    }
}
