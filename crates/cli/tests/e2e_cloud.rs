//! End to end on the cloud platforms: `gangplank-agent` and `gangplank-endpoint` as real
//! processes, each metadata service emulated on loopback, the endpoint's production
//! verifiers configured to trust the emulators' test roots.

mod support;

use std::path::Path;

use gangplank_api::istio::WorkloadEntry;
use gangplank_api::names::annotation;
use gangplank_api::policy::{AwsMatcher, AzureMatcher, GcpMatcher, WorkloadMatcher};
use gangplank_testkit::cloud::{aws, azure, gcp};
use support::*;

/// A loopback URL where nothing listens (a metadata service that is not there).
fn closed() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

fn platform(host: &str, key_file: &Path, aws: &str, gcp: &str, azure: &str) -> Credential {
    Credential::Platform(format!(
        "  platform:\n    host: {host}\n    keyFile: {}\n    metadataUrls: {{aws: \"{aws}\", gcp: \"{gcp}\", azure: \"{azure}\"}}\n",
        key_file.display()
    ))
}

fn annotation_of<'a>(entry: &'a WorkloadEntry, key: &str) -> Option<&'a str> {
    entry
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_onboards_and_a_copied_document_from_a_second_agent_is_refused() {
    let keys = aws::SigningKeys::generate(&["us-east-1"]).expect("keys");
    let certs = tempfile::tempdir().expect("tempdir");
    let cert = certs.path().join("us-east-1.pem");
    write(&cert, &keys.certificate_pem("us-east-1").expect("pem"));
    // No instance profile: the instance onboards without the iamRole fact.
    let imds = aws::Imds::start(aws::Instance::example().without_instance_profile(), keys)
        .await
        .expect("imds");
    let mut mesh = Mesh::start(Options {
        identities: format!(
            "  awsEc2:\n    certificates:\n      us-east-1: {}\n",
            cert.display()
        ),
        ..Options::default()
    })
    .await;
    let matcher = WorkloadMatcher {
        aws: Some(AwsMatcher {
            accounts: vec!["123456789012".into()],
            regions: vec!["us-east-1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    mesh.registry
        .put(&policy(
            "bookinfo",
            "allow-aws",
            vec![matcher],
            &[("app", "ratings")],
        ))
        .await
        .expect("policy");

    let key_a = mesh.root().join("vm-a-key.pem");
    let mut vm = Vm::start(
        &mesh,
        "a",
        platform("aws-ec2", &key_a, &imds.url(), &closed(), &closed()),
    );
    let entry = wait_onboarded(&mesh, &mut vm).await;
    assert_eq!(
        entry.metadata.name.as_deref(),
        Some("ratings-aws-123456789012-us-east-1a-i-0abc1234def567890")
    );
    assert_eq!(entry.spec.address, "10.0.1.7", "the verified private IP");
    assert_eq!(
        annotation_of(&entry, annotation::IDENTITY),
        Some("aws:123456789012/us-east-1/i-0abc1234def567890")
    );
    assert!(
        annotation_of(&entry, "onboarding.gangplank.dev/agent-public-key").is_some_and(|k| !k.is_empty())
    );
    assert_eq!(
        entry
            .spec
            .labels
            .get("onboarding.gangplank.dev/aws-account")
            .map(String::as_str),
        Some("123456789012")
    );
    assert!(key_a.exists(), "the agent keeps its instance key");
    assert!(
        !entry
            .spec
            .labels
            .contains_key("onboarding.gangplank.dev/aws-iam-role"),
        "no instance profile, no role"
    );

    // A second machine presenting the same (copied) document, with its own key. (The first
    // agent's health report is its last write; once it is in, the registry stays still.)
    let reported = gangplank_testkit::process::until(WAIT, || {
        let files = mesh.entry_contents();
        files
            .iter()
            .any(|(_, b)| String::from_utf8_lossy(b).contains("Healthy"))
            .then_some(())
    });
    assert!(reported.is_some(), "the first agent never reported its health");
    let before = mesh.entry_contents();
    let key_b = mesh.root().join("vm-b-key.pem");
    let mut copy = Vm::start(
        &mesh,
        "b",
        platform("aws-ec2", &key_b, &imds.url(), &closed(), &closed()),
    );
    // The copy is told the class of the refusal; why is only in the endpoint's log.
    copy.agent
        .wait_for(r"aws instance credential not accepted: .*\(reference ", WAIT);
    mesh.endpoint.wait_for(
        r"credential refused: .*belongs to (a different agent key).*reference=",
        WAIT,
    );
    assert!(
        copy.read("sidecar.env").is_none(),
        "the copy never starts a sidecar"
    );
    assert!(mesh.entry_contents() == before, "nothing written");
    let entries = mesh.entries().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        annotation_of(&entries[0], "onboarding.gangplank.dev/agent-public-key"),
        annotation_of(&entry, "onboarding.gangplank.dev/agent-public-key"),
        "the first agent's key is still the recorded one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_iam_roles_are_verified_through_sts_and_matched_by_policy() {
    let keys = aws::SigningKeys::generate(&["us-east-1"]).expect("keys");
    let certs = tempfile::tempdir().expect("tempdir");
    let cert = certs.path().join("us-east-1.pem");
    write(&cert, &keys.certificate_pem("us-east-1").expect("pem"));
    let imds = aws::Imds::start(aws::Instance::example(), keys)
        .await
        .expect("imds");
    let sts = aws::Sts::start(imds.iam(), "us-east-1").await.expect("sts");
    let mut mesh = Mesh::start(Options {
        identities: format!(
            "  awsEc2:\n    certificates:\n      us-east-1: {}\n    sts:\n      url: {}\n      timeout: 5s\n",
            cert.display(),
            sts.url()
        ),
        ..Options::default()
    })
    .await;
    let role_matcher = |role: &str| WorkloadMatcher {
        aws: Some(AwsMatcher {
            accounts: vec!["123456789012".into()],
            iam_roles: vec![role.into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    mesh.registry
        .put(&policy(
            "bookinfo",
            "reviews-role",
            vec![role_matcher("reviews")],
            &[],
        ))
        .await
        .expect("policy");

    let key = mesh.root().join("vm-r-key.pem");
    let mut vm = Vm::start(
        &mesh,
        "r",
        platform("aws-ec2", &key, &imds.url(), &closed(), &closed()),
    );
    // The refusal names the verified role and the unmatched fact, in both logs.
    let pattern = r"(allows aws instance i-0abc1234def567890 \(account 123456789012, region us-east-1, zone us-east-1a, iam role ratings\) to join WorkloadGroup ratings.*aws iam role ratings not in \[reviews\])";
    vm.agent.wait_for(pattern, WAIT);
    mesh.endpoint.wait_for(pattern, WAIT);
    assert!(mesh.entries().await.is_empty(), "nothing written");
    assert!(sts.requests() >= 1, "the endpoint asked STS");

    mesh.registry
        .put(&policy(
            "bookinfo",
            "ratings-role",
            vec![role_matcher("ratings")],
            &[("app", "ratings")],
        ))
        .await
        .expect("policy");
    let entry = wait_onboarded(&mesh, &mut vm).await;
    assert_eq!(
        entry.metadata.name.as_deref(),
        Some("ratings-aws-123456789012-us-east-1a-i-0abc1234def567890")
    );
    assert_eq!(
        entry
            .spec
            .labels
            .get("onboarding.gangplank.dev/aws-iam-role")
            .map(String::as_str),
        Some("ratings"),
        "the entry records the verified role"
    );
    assert!(
        annotation_of(&entry, "onboarding.gangplank.dev/aws-instance")
            .is_some_and(|facts| facts.contains("\"iamRole\":\"ratings\"")),
        "{:?}",
        entry.metadata.annotations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_onboards_with_host_auto() {
    let server = gcp::MetadataServer::start(gcp::Instance::example())
        .await
        .expect("metadata");
    let mesh = Mesh::start(Options {
        identities: format!("  gcpGce:\n    jwksUrl: {}\n", server.jwks_url()),
        ..Options::default()
    })
    .await;
    let matcher = WorkloadMatcher {
        gcp: Some(GcpMatcher {
            projects: vec!["bookinfo-prod".into()],
            service_accounts: vec!["ratings@bookinfo-prod.iam.gserviceaccount.com".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    mesh.registry
        .put(&policy(
            "bookinfo",
            "allow-gcp",
            vec![matcher],
            &[("app", "ratings")],
        ))
        .await
        .expect("policy");
    let key = mesh.root().join("unused-key.pem");
    let mut vm = Vm::start(
        &mesh,
        "g",
        platform("auto", &key, &closed(), &server.url(), &closed()),
    );
    let entry = wait_onboarded(&mesh, &mut vm).await;
    assert_eq!(
        entry.metadata.name.as_deref(),
        Some("ratings-gcp-bookinfo-prod-us-central1-a-ratings-vm-1")
    );
    assert_eq!(
        annotation_of(&entry, annotation::IDENTITY),
        Some("gcp:bookinfo-prod/us-central1-a/4732895401234567890")
    );
    assert_eq!(
        entry
            .spec
            .labels
            .get("onboarding.gangplank.dev/gcp-project")
            .map(String::as_str),
        Some("bookinfo-prod")
    );
    // The VM's bound key, which lets it rejoin without a new identity token.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key)
        .expect("the bound key exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the bound key is private");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_is_refused_until_a_policy_allows_its_subscription_then_onboards() {
    let imds = azure::Imds::start(azure::Vm::example()).await.expect("imds");
    let pems = tempfile::tempdir().expect("tempdir");
    let roots = pems.path().join("roots.pem");
    std::fs::write(&roots, imds.chain().root_pem()).expect("write");
    // Only the root is configured: the endpoint fetches the issuing CA from the URL in the
    // signer's certificate, as it does from www.microsoft.com for Azure's.
    let mut mesh = Mesh::start(Options {
        identities: format!(
            "  azureVm:\n    roots: {}\n    issuerHosts: [\"{}\"]\n",
            roots.display(),
            imds.issuer_host()
        ),
        ..Options::default()
    })
    .await;
    let other = WorkloadMatcher {
        azure: Some(AzureMatcher {
            subscriptions: vec!["00000000-0000-0000-0000-000000000000".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    mesh.registry
        .put(&policy("bookinfo", "other-subscription", vec![other], &[]))
        .await
        .expect("policy");

    let key = mesh.root().join("unused-key.pem");
    let mut vm = Vm::start(
        &mesh,
        "z",
        platform("azure-vm", &key, &closed(), &closed(), &imds.url()),
    );
    // The refusal names the group and the unmatched identity facts, in both logs.
    let pattern = r"(no OnboardingPolicy in namespace bookinfo allows azure vm 02aab8a4-74ef-476e-8182-f6d2ba4166a6 \(subscription 8d10da13-8125-4ba9-a717-bf7490507b3d, sku 22_04-lts-gen2\) to join WorkloadGroup ratings.*azure subscription 8d10da13-8125-4ba9-a717-bf7490507b3d not in \[00000000-0000-0000-0000-000000000000\])";
    vm.agent.wait_for(pattern, WAIT);
    mesh.endpoint.wait_for(pattern, WAIT);
    assert!(mesh.entries().await.is_empty(), "nothing written");

    let allow = WorkloadMatcher {
        azure: Some(AzureMatcher {
            subscriptions: vec!["8d10da13-8125-4ba9-a717-bf7490507b3d".into()],
            vm_ids: vec!["02aab8a4-74ef-476e-8182-f6d2ba4166a6".into()],
        }),
        ..Default::default()
    };
    mesh.registry
        .put(&policy(
            "bookinfo",
            "allow-azure",
            vec![allow],
            &[("app", "ratings")],
        ))
        .await
        .expect("policy");
    let entry = wait_onboarded(&mesh, &mut vm).await;
    assert_eq!(
        entry.metadata.name.as_deref(),
        Some("ratings-azure-8d10da13-8125-4ba9-a717-bf7490507b3d-02aab8a4-74ef-476e-8182-f6d2ba4166a6")
    );
    assert_eq!(
        annotation_of(&entry, annotation::IDENTITY),
        Some("azure:8d10da13-8125-4ba9-a717-bf7490507b3d/02aab8a4-74ef-476e-8182-f6d2ba4166a6")
    );
    // The issuing CA was fetched once, then served from the endpoint's cache.
    assert_eq!(imds.issuer_fetches(), 1);
}
