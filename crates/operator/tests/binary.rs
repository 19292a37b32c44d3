//! The `gangplank-operator` binary: `run` finds the cluster through the kubeconfig,
//! reconciles, and stops cleanly on SIGTERM; `crd` prints the CRD.

use std::process::Command;
use std::time::Duration;

use gangplank_testkit::kube_api::Server;
use gangplank_testkit::process::Proc;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reconciles_and_stops_on_sigterm() {
    let server = Server::start().await.expect("stand-in");
    server
        .install_crd(&serde_json::to_value(gangplank_operator::crd()).expect("crd"))
        .expect("installing the CRD");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path()).expect("kubeconfig");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gangplank-operator"));
    cmd.args(["run", "--namespace", "gangplank-system"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("GANGPLANK_OPERATOR_NAMESPACE");
    let mut operator = tokio::task::spawn_blocking(move || {
        let mut p = Proc::spawn("gangplank-operator", cmd);
        p.wait_for("gangplank-operator running", Duration::from_secs(10));
        p
    })
    .await
    .expect("started");

    let client =
        kube::Client::try_from(kube::Config::new(server.url().parse().expect("url"))).expect("client");
    let planes: Api<gangplank_operator::OnboardingPlane> =
        Api::namespaced(client.clone(), "gangplank-system");
    planes
        .patch(
            "mesh",
            &PatchParams::apply("test"),
            &Patch::Apply(json!({
                "apiVersion": "onboarding.gangplank.dev/v1alpha1", "kind": "OnboardingPlane",
                "metadata": {"name": "mesh", "namespace": "gangplank-system"},
                "spec": {"hosts": ["onboarding.example.com"], "identities": {"joinTokens": true},
                         "tls": {"secretName": "mesh-tls"}},
            })),
        )
        .await
        .expect("applying a plane");
    let deployments: Api<Deployment> = Api::namespaced(client, "gangplank-system");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while deployments.get_opt("mesh-endpoint").await.expect("get").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Deployment; operator:\n{}",
            operator.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    operator.signal("TERM");
    let (status, output) = tokio::task::spawn_blocking(move || {
        let status = operator.wait_exit(Duration::from_secs(10));
        (status, operator.output())
    })
    .await
    .expect("stopped");
    assert!(status.success(), "exit {status:?}:\n{output}");
    assert!(output.contains("shutting down"), "{output}");
}

#[test]
fn crd_prints_the_generated_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_gangplank-operator"))
        .arg("crd")
        .output()
        .expect("gangplank-operator crd");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).expect("UTF-8"),
        gangplank_operator::crd_yaml().expect("yaml")
    );
}
