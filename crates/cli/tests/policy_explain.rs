//! `gangplank policy explain`: the endpoint's policy evaluation, offline.

mod support;

use std::path::Path;

use support::{RATINGS_GROUP, gangplank, registry_with_policy, text};

const POLICY: &str = r#"
apiVersion: onboarding.gangplank.dev/v1alpha1
kind: OnboardingPolicy
metadata: {name: allow-prod, namespace: bookinfo}
spec:
  allow:
  - workloads:
    - jwt:
        issuer: https://idp.example
        subjects: [vm-1, vm-2]
    onboardTo:
    - workloadGroupSelector: {matchLabels: {app: ratings}}
"#;

fn write(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write");
    path.to_str().expect("utf-8").to_string()
}

#[tokio::test]
async fn allowed_jwt_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_registry, root) = registry_with_policy(dir.path(), POLICY).await;
    let claims = write(
        dir.path(),
        "claims.json",
        r#"{"iss": "https://idp.example", "sub": "vm-1", "aud": "plane-1"}"#,
    );
    let out = gangplank(&[
        "policy",
        "explain",
        "--credential-claims",
        &claims,
        "--workload-group",
        "bookinfo/ratings",
        "--registry",
        &root,
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("policy bookinfo/allow-prod:\n  rule 1: matched"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ALLOWED: allowed by OnboardingPolicy allow-prod rule 1"),
        "{stdout}"
    );
}

#[tokio::test]
async fn denied_jwt_exits_one_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_registry, root) = registry_with_policy(dir.path(), POLICY).await;
    let claims = write(dir.path(), "claims.yaml", "iss: https://idp.example\nsub: vm-7\n");
    let out = gangplank(&[
        "policy",
        "explain",
        "--credential-claims",
        &claims,
        "--workload-group",
        "bookinfo/ratings",
        "--registry",
        &root,
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("rule 1: no match: subject \"vm-7\" not in [vm-1, vm-2]"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "DENIED: no OnboardingPolicy in namespace bookinfo allows jwt subject \"vm-7\" (issuer https://idp.example) to join WorkloadGroup ratings"
        ),
        "{stdout}"
    );
}

#[test]
fn files_without_a_registry_and_cross_namespace_policies_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = write(dir.path(), "group.yaml", RATINGS_GROUP);
    let foreign = write(
        dir.path(),
        "foreign.yaml",
        "metadata: {name: allow-all, namespace: other}\nspec:\n  allow:\n  - workloads: [{joinToken: {}}]\n    onboardTo: [{workloadGroupSelector: {}}]\n",
    );
    let local = write(
        dir.path(),
        "local.yaml",
        "metadata: {name: tokens, namespace: bookinfo}\nspec:\n  allow:\n  - workloads: [{joinToken: {ids: [abcdefghij]}}]\n    onboardTo: [{workloadGroupSelector: {}}]\n",
    );
    let claims = write(dir.path(), "token.yaml", "joinToken: {id: zzzzzzzzzz}\n");
    let base = [
        "policy",
        "explain",
        "--credential-claims",
        &claims,
        "--workload-group",
        "bookinfo/ratings",
        "--group-file",
        &group,
    ];
    let out = gangplank(&[&base[..], &["--policy", &foreign]].concat());
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(
            "policy other/allow-all: ignored: policy in namespace other cannot authorise groups in bookinfo"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("there is no OnboardingPolicy in namespace bookinfo"),
        "{stdout}"
    );

    let out = gangplank(&[&base[..], &["--policy", &foreign, "--policy", &local]].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("join token \"zzzzzzzzzz\" not in [abcdefghij]"));

    let listed = write(dir.path(), "listed.yaml", "joinToken: {id: abcdefghij}\n");
    let mut args = base.to_vec();
    args[3] = &listed;
    let out = gangplank(&[&args[..], &["--policy", &local]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[tokio::test]
async fn bad_input_exits_two() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_registry, root) = registry_with_policy(dir.path(), POLICY).await;
    let good = write(dir.path(), "claims.yaml", "iss: https://idp.example\nsub: vm-1\n");
    let no_sub = write(dir.path(), "nosub.yaml", "iss: https://idp.example\n");
    let list = write(dir.path(), "list.yaml", "[1, 2]\n");
    let bad_policy = write(
        dir.path(),
        "bad.yaml",
        "metadata: {name: x, namespace: bookinfo}\nspec: {allowed: []}\n",
    );
    let no_ns = write(
        dir.path(),
        "nons.yaml",
        "metadata: {name: x}\nspec: {allow: []}\n",
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--credential-claims",
                &no_sub,
                "--workload-group",
                "bookinfo/ratings",
                "--registry",
                &root,
            ],
            "expected JWT claims",
        ),
        (
            vec![
                "--credential-claims",
                &list,
                "--workload-group",
                "bookinfo/ratings",
                "--registry",
                &root,
            ],
            "expected JWT claims",
        ),
        (
            vec![
                "--credential-claims",
                "/nonexistent",
                "--workload-group",
                "bookinfo/ratings",
                "--registry",
                &root,
            ],
            "cannot read /nonexistent",
        ),
        (
            vec![
                "--credential-claims",
                &good,
                "--workload-group",
                "bookinfo/nope",
                "--registry",
                &root,
            ],
            "WorkloadGroup bookinfo/nope not found",
        ),
        (
            vec![
                "--credential-claims",
                &good,
                "--workload-group",
                "bookinfo/ratings",
                "--registry",
                &root,
                "--policy",
                &bad_policy,
            ],
            "is not a valid OnboardingPolicy",
        ),
        (
            vec![
                "--credential-claims",
                &good,
                "--workload-group",
                "bookinfo/ratings",
                "--registry",
                &root,
                "--policy",
                &no_ns,
            ],
            "metadata.namespace is missing",
        ),
        (
            vec![
                "--credential-claims",
                &good,
                "--workload-group",
                "bookinfo/ratings",
            ],
            "pass --registry DIR",
        ),
    ];
    for (args, want) in cases {
        let out = gangplank(&[&["policy", "explain"][..], &args[..]].concat());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}
