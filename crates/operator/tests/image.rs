//! The operator's container image (`packaging/operator-image`), on the machine's Docker
//! Engine: its configuration (non-root, entrypoint, OCI labels, size, nothing but the binary),
//! and the image itself running the operator against the API stand-in, read-only, with no
//! capabilities: it installs the CRDs, serves `/readyz` and `/metrics`, leads, reconciles a
//! plane, and stops at once on `docker stop`.
//!
//! Run by `.ci/run` after the image is built:
//! `cargo nextest run -p gangplank-operator --test image --run-ignored only`
//! (`GANGPLANK_TEST_OPERATOR_IMAGE` names another tag).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use gangplank_testkit::docker::{docker, docker_ok};
use gangplank_testkit::kube_api::Server;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

fn image() -> String {
    std::env::var("GANGPLANK_TEST_OPERATOR_IMAGE")
        .unwrap_or_else(|_| format!("gangplank-operator:{}", env!("CARGO_PKG_VERSION")))
}

/// `GET path` on 127.0.0.1:`port`: (status, body), or `None` when nothing answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
}

#[test]
#[ignore = "needs the image: bash packaging/operator-image (CI runs it)"]
fn the_image_is_non_root_static_labelled_and_small() {
    let config: Value = serde_json::from_str(&docker_ok(&["image", "inspect", &image()])).expect("inspect");
    let c = &config[0]["Config"];
    assert_eq!(c["User"], "65532:65532");
    assert_eq!(c["Entrypoint"], json!(["/usr/bin/gangplank-operator"]));
    assert_eq!(c["Cmd"], json!(["run"]));
    let labels = &c["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], "gangplank-operator");
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    for l in ["revision", "created", "source", "description"] {
        assert!(
            labels[format!("org.opencontainers.image.{l}")].is_string(),
            "label {l}"
        );
    }
    let size = config[0]["Size"].as_u64().expect("size");
    assert!(size < 40_000_000, "the image is {size} bytes");
    // Nothing but the binary, CA certificates, passwd/group and an empty /tmp.
    let id = docker_ok(&["create", &image()]).trim().to_owned();
    let tar = Command::new("docker")
        .args(["export", &id])
        .output()
        .expect("export");
    docker_ok(&["rm", &id]);
    let list = Command::new("tar")
        .args(["-t"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut t| {
            t.stdin.take().expect("stdin").write_all(&tar.stdout)?;
            t.wait_with_output()
        })
        .expect("tar -t");
    let mut files: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(str::to_owned)
        .collect();
    files.sort();
    // Docker adds its own mount points for these.
    files.retain(|f| {
        !matches!(
            f.as_str(),
            ".dockerenv" | "dev/console" | "etc/mtab" | "etc/hostname" | "etc/hosts" | "etc/resolv.conf"
        )
    });
    assert_eq!(
        files,
        [
            "etc/group",
            "etc/passwd",
            "etc/ssl/certs/ca-certificates.crt",
            "usr/bin/gangplank-operator"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image: bash packaging/operator-image (CI runs it)"]
async fn the_image_runs_the_operator_read_only_as_non_root() {
    let server = Server::start().await.expect("stand-in");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path()).expect("kubeconfig");
    // Readable by the image's user.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&kubeconfig, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("addr").port()
    };
    let name = format!("gangplank-operator-test-{}", std::process::id());
    let mount = format!("{}:/kubeconfig:ro", kubeconfig.display());
    let listen = format!("127.0.0.1:{port}");
    // Host network: the stand-in listens on the host's loopback.
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        &mount,
        "-e",
        "KUBECONFIG=/kubeconfig",
        "-e",
        "POD_NAMESPACE=gangplank-system",
        "-e",
        "POD_NAME=operator-0",
        &image(),
        "run",
        "--monitoring-listen",
        &listen,
        "--lease-duration",
        "3s",
    ]);
    let logs = || {
        let o = docker(&["logs", &name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, "/readyz").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never ready:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let user = docker_ok(&["inspect", "--format", "{{.Config.User}}", &name]);
    assert_eq!(user.trim(), "65532:65532");

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
                "spec": {"hosts": ["onboarding.example.com"], "identities": {"joinTokens": true}},
            })),
        )
        .await
        .expect("applying a plane (the operator installed the CRD)");
    let deployments: Api<Deployment> = Api::namespaced(client, "gangplank-system");
    while deployments.get_opt("mesh-endpoint").await.expect("get").is_none() {
        assert!(Instant::now() < deadline, "no Deployment:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Counted once the reconcile (and its status write) is done.
    loop {
        let (status, metrics) = get(port, "/metrics").expect("/metrics");
        assert_eq!(status, 200);
        if metrics.contains("gangplank_operator_leader 1")
            && metrics.contains("gangplank_operator_reconciles_total{result=\"ok\"}")
        {
            break;
        }
        assert!(Instant::now() < deadline, "metrics:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stopped = Instant::now();
    docker_ok(&["stop", "--time", "10", &name]);
    let took = stopped.elapsed();
    let code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
    let out = logs();
    docker(&["rm", "-f", &name]);
    assert_eq!(code.trim(), "0", "{out}");
    assert!(took < Duration::from_secs(5), "docker stop took {took:?}:\n{out}");
    assert!(out.contains("leader Lease released"), "{out}");
}
