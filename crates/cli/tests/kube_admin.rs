//! The admin commands on a Kubernetes cluster (`--kubernetes`, kubeconfig like kubectl)
//! against the Kubernetes API stand-in: `token create` and `instance release`.

mod support;

use std::process::Output;

use gangplank_identity::token::secret_sha256;
use gangplank_testkit::kube_api::Server;
use serde_json::json;
use support::{gangplank_command, text};

/// A stand-in with Istio's and Gangplank's CRDs and the WorkloadGroup bookinfo/ratings.
async fn cluster() -> Server {
    let server = Server::start().await.expect("stand-in");
    server.install_istio_crds(&["v1"]).expect("istio crds");
    for crd in gangplank_registry::crds::all().expect("crds") {
        server
            .install_crd(&serde_json::to_value(crd).expect("crd"))
            .expect("install crd");
    }
    server
        .seed(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": "ratings", "namespace": "bookinfo"},
            "spec": {"template": {"serviceAccount": "ratings"}}}),
        )
        .expect("group");
    server
}

/// Runs `gangplank args…` with the stand-in's kubeconfig (off the runtime's threads).
async fn gangplank(server: &Server, dir: &std::path::Path, args: &[&str]) -> Output {
    let kubeconfig = server.write_kubeconfig(dir).expect("kubeconfig");
    let mut cmd = gangplank_command(args);
    cmd.env("KUBECONFIG", kubeconfig);
    tokio::task::spawn_blocking(move || cmd.output().expect("gangplank runs"))
        .await
        .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_stores_a_join_token_object_with_only_the_hash() {
    let server = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = gangplank(
        &server,
        dir.path(),
        &[
            "token",
            "create",
            "--workload-group",
            "bookinfo/ratings",
            "--kubernetes",
            "--uses",
            "3",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    let (id, secret) = token.split_once('.').expect("<id>.<secret>");

    let writes = server.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(
        (writes[0].verb, writes[0].resource.as_str()),
        ("create", "jointokens")
    );
    let stored = server
        .object("onboarding.gangplank.dev", "jointokens", "bookinfo", id)
        .expect("the JoinToken object");
    assert_eq!(stored["spec"]["secretSha256"], secret_sha256(secret));
    assert_eq!(stored["spec"]["uses"], 3);
    assert!(!stored.to_string().contains(secret), "the secret is never stored");

    // A group the cluster does not have: a clear error, nothing written.
    server.reset_writes();
    let out = gangplank(
        &server,
        dir.path(),
        &[
            "token",
            "create",
            "--workload-group",
            "bookinfo/nope",
            "--kubernetes",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("WorkloadGroup bookinfo/nope not found in the Kubernetes cluster"),
        "{}",
        text(&out.stderr)
    );
    assert!(server.writes().is_empty(), "{:?}", server.writes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_release_deletes_only_that_instances_entry_in_the_cluster() {
    let server = cluster().await;
    for (name, instance) in [("ratings-aws-i-0abc", "i-0abc"), ("ratings-aws-i-0def", "i-0def")] {
        server
            .seed(json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": name, "namespace": "bookinfo",
                    "labels": {"app.kubernetes.io/managed-by": "gangplank"},
                    "annotations": {"onboarding.gangplank.dev/identity": format!("aws:123456789012/us-east-1/{instance}")}},
                "spec": {"address": "10.0.0.1"}}))
            .expect("entry");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = gangplank(
        &server,
        dir.path(),
        &["instance", "release", "i-0abc", "--kubernetes"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deleted WorkloadEntry bookinfo/ratings-aws-i-0abc"),
        "{}",
        text(&out.stdout)
    );
    let writes: Vec<_> = server.writes().into_iter().map(|w| (w.verb, w.name)).collect();
    assert_eq!(writes, [("delete", "ratings-aws-i-0abc".to_string())]);
    assert!(
        server
            .object(
                "networking.istio.io",
                "workloadentries",
                "bookinfo",
                "ratings-aws-i-0abc"
            )
            .is_none()
    );
    assert!(
        server
            .object(
                "networking.istio.io",
                "workloadentries",
                "bookinfo",
                "ratings-aws-i-0def"
            )
            .is_some()
    );

    let again = gangplank(
        &server,
        dir.path(),
        &["instance", "release", "i-0abc", "--kubernetes"],
    )
    .await;
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stdout).contains("instance i-0abc holds no registration in the Kubernetes cluster"),
        "{}",
        text(&again.stdout)
    );
}

#[test]
fn a_registry_must_be_named() {
    let out = support::gangplank(&["instance", "release", "i-0abc"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the following required arguments were not provided")
            && stderr.contains("--registry <DIR>|--kubernetes"),
        "{stderr}"
    );
}
