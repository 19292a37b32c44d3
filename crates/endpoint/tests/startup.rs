//! Configurations the endpoint must refuse at start-up, before it serves or creates anything:
//! each exits 2 with a message naming the setting and what to change.

use std::path::Path;
use std::process::Command;

fn config(root: &Path, registry: &str, lifetime: &str) -> std::path::PathBuf {
    std::fs::write(
        root.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let path = root.join("endpoint.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: startup
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
tls: {{dev: true}}
registry: {registry}
stateDir: {d}/state
mesh: {{rootCertFile: {d}/root-cert.pem}}
sidecarToken: {{lifetime: {lifetime}}}
identities: {{joinTokens: true}}
",
            d = root.display()
        ),
    )
    .unwrap();
    path
}

fn run(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gangplank-endpoint"))
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A mistyped registry folder used to be created, and an empty registry served.
#[test]
fn a_missing_registry_directory_is_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let missing = root.join("regsitry");
    let config = config(root, &format!("{{directory: {}}}", missing.display()), "1h");
    let (code, stderr) = run(&config);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("registry.directory"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(!missing.exists(), "the endpoint created the mistyped folder");
    assert!(
        !root.join("state").exists(),
        "the endpoint wrote its state before refusing"
    );
}

/// A real TokenRequest refuses less than 10 minutes, so every onboarding used to fail.
#[test]
fn a_sidecar_token_lifetime_below_ten_minutes_is_refused_with_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The kubeconfig is never read: the configuration is refused before anything is contacted.
    let kubeconfig = root.join("no-such-kubeconfig");
    let config = config(
        root,
        &format!("{{kubernetes: {{kubeconfig: {}}}}}", kubeconfig.display()),
        "5m",
    );
    let (code, stderr) = run(&config);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("sidecarToken.lifetime: 5m is shorter than 10m"),
        "{stderr}"
    );
    assert!(stderr.contains("set at least 10m"), "{stderr}");
    assert!(!root.join("state").exists());

    // Ten minutes passes validation (and then fails only on the missing kubeconfig).
    let config = config_with(root, &kubeconfig, "10m");
    let (code, stderr) = run(&config);
    assert!(!stderr.contains("sidecarToken.lifetime"), "{stderr}");
    assert!(stderr.contains("registry.kubernetes.kubeconfig"), "{stderr}");
    assert_ne!(code, Some(0));
}

fn config_with(root: &Path, kubeconfig: &Path, lifetime: &str) -> std::path::PathBuf {
    config(
        root,
        &format!("{{kubernetes: {{kubeconfig: {}}}}}", kubeconfig.display()),
        lifetime,
    )
}
