//! `GANGPLANK_LOG_FORMAT=json`: one JSON object per log line, for log pipelines.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn json_logs_are_one_object_per_line_with_fields() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::create_dir(root.join("registry")).unwrap();
    let config = root.join("endpoint.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: logs
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
tls: {{dev: true}}
registry: {{directory: {d}/registry}}
stateDir: {d}/state
mesh: {{rootCertFile: {d}/root-cert.pem}}
identities: {{joinTokens: true}}
",
            d = root.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gangplank-endpoint"))
        .arg("--config")
        .arg(&config)
        .env("GANGPLANK_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut listening = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if value["fields"]["message"] == "endpoint listening" {
            listening = Some(value);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let listening = listening.expect("the endpoint logged that it listens");
    assert_eq!(listening["level"], "INFO");
    assert!(
        listening["fields"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(listening["fields"]["plane"], "logs");
}
