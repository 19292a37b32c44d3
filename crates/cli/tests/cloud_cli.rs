//! `gangplank policy explain` with AWS, GCP and Azure facts, and `gangplank instance release`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use gangplank_api::istio::{WorkloadEntry, WorkloadEntrySpec};
use gangplank_api::meta::ObjectMeta;
use gangplank_api::names::{annotation, label};
use gangplank_registry::Registry as _;
use support::{gangplank, registry_with_policy, text};

const POLICY: &str = r#"
apiVersion: onboarding.gangplank.dev/v1alpha1
kind: OnboardingPolicy
metadata: {name: clouds, namespace: bookinfo}
spec:
  allow:
  - workloads:
    - aws: {accounts: ["123456789012"], regions: [us-east-1]}
    - gcp: {projects: [bookinfo-prod], serviceAccounts: [ratings@bookinfo-prod.iam.gserviceaccount.com]}
    - azure: {subscriptions: [8d10da13-8125-4ba9-a717-bf7490507b3d]}
    onboardTo:
    - workloadGroupSelector: {matchLabels: {app: ratings}}
"#;

fn explain(dir: &Path, root: &str, facts: &str) -> (Option<i32>, String) {
    let path = dir.join("facts.yaml");
    std::fs::write(&path, facts).expect("write");
    let out = gangplank(&[
        "policy",
        "explain",
        "--credential-claims",
        path.to_str().expect("utf-8"),
        "--workload-group",
        "bookinfo/ratings",
        "--registry",
        root,
    ]);
    (
        out.status.code(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

const ROLE_POLICY: &str = r#"
apiVersion: onboarding.gangplank.dev/v1alpha1
kind: OnboardingPolicy
metadata: {name: ratings-role, namespace: bookinfo}
spec:
  allow:
  - workloads:
    - aws: {accounts: ["123456789012"], iamRoles: [ratings]}
    onboardTo:
    - workloadGroupSelector: {}
"#;

#[tokio::test]
async fn explain_takes_the_aws_iam_role_fact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_registry, root) = registry_with_policy(dir.path(), ROLE_POLICY).await;
    let root = root.as_str();
    let instance = "account: \"123456789012\", region: us-east-1, zone: us-east-1a, instanceId: i-0abc";

    let (code, out) = explain(
        dir.path(),
        root,
        &format!("aws: {{{instance}, iamRole: ratings}}\n"),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("iam role ratings)"), "{out}");
    assert!(out.contains("iamRole=ratings"), "{out}");

    let (code, out) = explain(
        dir.path(),
        root,
        &format!("aws: {{{instance}, iamRole: reviews}}\n"),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("aws iam role reviews not in [ratings]"), "{out}");

    // Without the fact (no instance profile), a role policy does not match.
    let (code, out) = explain(dir.path(), root, &format!("aws: {{{instance}}}\n"));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("aws iam role (none verified) not in [ratings]"),
        "{out}"
    );
}

#[tokio::test]
async fn explain_works_with_each_platform_s_facts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_registry, root) = registry_with_policy(dir.path(), POLICY).await;

    let (code, out) = explain(
        dir.path(),
        &root,
        "aws: {account: \"123456789012\", region: us-east-1, zone: us-east-1a, instanceId: i-0abc}\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "identity: aws instance i-0abc (account 123456789012, region us-east-1, zone us-east-1a)"
        ),
        "{out}"
    );
    assert!(
        out.contains("facts: partition=aws account=123456789012 region=us-east-1"),
        "{out}"
    );
    assert!(
        out.contains("ALLOWED: allowed by OnboardingPolicy clouds rule 1"),
        "{out}"
    );

    let (code, out) = explain(
        dir.path(),
        &root,
        "aws: {account: \"111122223333\", region: eu-west-1, zone: eu-west-1b, instanceId: i-0def}\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("WorkloadGroup ratings"), "{out}");
    assert!(
        out.contains(
            "aws account 111122223333 not in [123456789012] and aws region eu-west-1 not in [us-east-1]"
        ),
        "{out}"
    );

    let (code, out) = explain(
        dir.path(),
        &root,
        "gcp: {projectId: bookinfo-prod, zone: us-central1-a, instanceName: ratings-vm-1, serviceAccount: other@bookinfo-prod.iam.gserviceaccount.com}\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("gcp service account other@bookinfo-prod.iam.gserviceaccount.com not in [ratings@bookinfo-prod.iam.gserviceaccount.com]"),
        "{out}"
    );

    let (code, out) = explain(
        dir.path(),
        &root,
        "azure: {subscriptionId: 8d10da13-8125-4ba9-a717-bf7490507b3d, vmId: 02aab8a4-74ef-476e-8182-f6d2ba4166a6}\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("facts: subscription=8d10da13-8125-4ba9-a717-bf7490507b3d"),
        "{out}"
    );

    let (code, out) = explain(dir.path(), &root, "aws: {region: us-east-1}\n");
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("aws facts need account, region, zone and instanceId"),
        "{out}"
    );
}

#[tokio::test]
async fn instance_release_deletes_only_that_instance_s_registration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, root) = registry_with_policy(dir.path(), POLICY).await;
    for (name, identity) in [
        (
            "ratings-aws-123456789012-us-east-1a-i-0abc",
            "aws:123456789012/us-east-1/i-0abc",
        ),
        (
            "ratings-aws-123456789012-us-east-1a-i-0def",
            "aws:123456789012/us-east-1/i-0def",
        ),
    ] {
        let entry = WorkloadEntry::new(
            ObjectMeta {
                name: Some(name.into()),
                namespace: Some("bookinfo".into()),
                labels: Some(BTreeMap::from([(
                    label::MANAGED_BY.to_string(),
                    label::MANAGED_BY_VALUE.to_string(),
                )])),
                annotations: Some(BTreeMap::from([(
                    annotation::IDENTITY.to_string(),
                    identity.to_string(),
                )])),
                ..Default::default()
            },
            WorkloadEntrySpec {
                address: "10.0.0.1".into(),
                ..Default::default()
            },
        );
        registry.apply_entry(&entry).await.expect("entry");
    }

    let out = gangplank(&["instance", "release", "i-0abc", "--registry", &root]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .contains("deleted WorkloadEntry bookinfo/ratings-aws-123456789012-us-east-1a-i-0abc"),
        "{}",
        text(&out.stdout)
    );
    let left: Vec<String> = registry
        .managed_entries()
        .await
        .expect("list")
        .into_iter()
        .filter_map(|e| e.metadata.name)
        .collect();
    assert_eq!(
        left,
        vec!["ratings-aws-123456789012-us-east-1a-i-0def".to_string()]
    );

    let again = gangplank(&["instance", "release", "i-0abc", "--registry", &root]);
    assert_eq!(again.status.code(), Some(1));
    let bad = gangplank(&["instance", "release", "vm-7", "--registry", &root]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("is neither NAMESPACE/NAME of a WorkloadEntry"),
        "{}",
        text(&bad.stderr)
    );
}
