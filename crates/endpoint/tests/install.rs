//! `install.directory`: a real endpoint process serves the agent's packages at `/install/`
//! over real TLS (its dev CA), to HTTP/1.1 clients (curl, wget) and HTTP/2 clients alike;
//! only the files of its index, each with a checksum `sha256sum -c` reads; and a folder it
//! cannot serve stops it at start (exit 2) with what to change.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gangplank_testkit::process::Proc;
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(20);

/// The fake packages: names as `cargo deb` and `cargo generate-rpm` write them, and bytes
/// that differ per file (large enough to take many HTTP/2 DATA frames).
const PACKAGES: [(&str, &str, &str); 4] = [
    ("deb", "x86_64", "gangplank-agent_0.1.0-1_amd64.deb"),
    ("deb", "aarch64", "gangplank-agent_0.1.0-1_arm64.deb"),
    ("rpm", "x86_64", "gangplank-agent-0.1.0-1.x86_64.rpm"),
    ("rpm", "aarch64", "gangplank-agent-0.1.0-1.aarch64.rpm"),
];

fn bytes_of(file: &str) -> Vec<u8> {
    let seed = Sha256::digest(file.as_bytes());
    (0..300_000u32)
        .map(|i| seed[(i % 32) as usize].wrapping_add((i / 32) as u8))
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// An endpoint configuration under `root` (dev TLS, an empty directory registry), with
/// `install` appended when given.
fn config(root: &Path, install: Option<&Path>) -> PathBuf {
    std::fs::write(
        root.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("registry")).unwrap();
    let install = match install {
        Some(dir) => format!("install: {{directory: {}}}\n", dir.display()),
        None => String::new(),
    };
    let path = root.join("endpoint.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: install
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
tls: {{dev: true}}
registry: {{directory: {d}/registry}}
stateDir: {d}/state
mesh: {{rootCertFile: {d}/root-cert.pem}}
identities: {{joinTokens: true}}
{install}",
            d = root.display()
        ),
    )
    .unwrap();
    path
}

/// A folder holding the four packages and a README.
fn packages(root: &Path) -> PathBuf {
    let dir = root.join("packages");
    std::fs::create_dir_all(&dir).unwrap();
    for (_, _, file) in PACKAGES {
        std::fs::write(dir.join(file), bytes_of(file)).unwrap();
    }
    std::fs::write(dir.join("README"), "built by CI\n").unwrap();
    dir
}

struct Running {
    _process: Proc,
    base: String,
    monitoring: String,
    ca: PathBuf,
}

fn start(root: &Path, config: &Path) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gangplank-endpoint"));
    cmd.arg("--config").arg(config).env("RUST_LOG", "info");
    let mut process = Proc::spawn("endpoint", cmd);
    let addr: std::net::SocketAddr = process
        .wait_for(r"endpoint listening addr=(\S+)", WAIT)
        .parse()
        .unwrap();
    let monitoring = process.wait_for(r"monitoring_addr=(\S+)", WAIT);
    Running {
        _process: process,
        base: format!("https://localhost:{}", addr.port()),
        monitoring: format!("http://{monitoring}"),
        ca: root.join("state/dev-tls/ca.crt"),
    }
}

/// A client trusting the endpoint's dev CA, speaking only `version`.
fn client(ca: &Path, version: reqwest::Version) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let builder = reqwest::Client::builder().add_root_certificate(ca);
    match version {
        reqwest::Version::HTTP_11 => builder.http1_only(),
        // Chosen by ALPN, as curl does by default.
        _ => builder,
    }
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_their_checksums_and_the_index_are_served_over_http1_and_h2() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let install = packages(root);
    let endpoint = start(root, &config(root, Some(&install)));

    for version in [reqwest::Version::HTTP_11, reqwest::Version::HTTP_2] {
        let http = client(&endpoint.ca, version);
        for path in ["/install/", "/install/index.json"] {
            let response = http.get(format!("{}{path}", endpoint.base)).send().await.unwrap();
            assert_eq!(response.version(), version, "{path}");
            assert_eq!(response.status(), 200, "{path}");
            let index: serde_json::Value = response.json().await.unwrap();
            let listed = index["packages"].as_array().unwrap();
            assert_eq!(listed.len(), PACKAGES.len(), "{index:#}");
            for (entry, (format, arch, file)) in listed.iter().zip(PACKAGES) {
                let bytes = bytes_of(file);
                assert_eq!(
                    entry,
                    &serde_json::json!({
                        "format": format,
                        "arch": arch,
                        "file": file,
                        "version": "0.1.0-1",
                        "size": bytes.len(),
                        "sha256": sha256(&bytes),
                        "url": format!("/install/{format}/{arch}/{file}"),
                    })
                );
            }
        }

        for (format, arch, file) in PACKAGES {
            let bytes = bytes_of(file);
            let folder = format!("{}/install/{format}/{arch}", endpoint.base);
            let response = http.get(format!("{folder}/{file}")).send().await.unwrap();
            assert_eq!(response.status(), 200, "{file}");
            assert_eq!(response.version(), version);
            let content_type = match format {
                "deb" => "application/vnd.debian.binary-package",
                _ => "application/x-rpm",
            };
            assert_eq!(response.headers()["content-type"], content_type);
            assert_eq!(
                response.headers()["content-length"],
                bytes.len().to_string().as_str()
            );
            let body = response.bytes().await.unwrap();
            assert!(
                body[..] == bytes[..],
                "{file}: the bytes served differ from the file's"
            );

            let line = format!("{}  {file}\n", sha256(&bytes));
            for name in [format!("{file}.sha256"), "SHA256SUMS".to_string()] {
                let response = http.get(format!("{folder}/{name}")).send().await.unwrap();
                assert_eq!(response.status(), 200, "{name}");
                assert_eq!(response.text().await.unwrap(), line, "{name}");
            }

            // HEAD: the size without the bytes, and no download counted.
            let head = http.head(format!("{folder}/{file}")).send().await.unwrap();
            assert_eq!(head.status(), 200);
            assert_eq!(head.headers()["content-length"], bytes.len().to_string().as_str());
            assert!(head.bytes().await.unwrap().is_empty());
        }
    }

    let metrics = reqwest::get(format!("{}/metrics", endpoint.monitoring))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (format, arch, _) in PACKAGES {
        let line =
            format!("gangplank_endpoint_install_downloads_total{{format=\"{format}\",arch=\"{arch}\"}} 2");
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_files_of_the_index_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let install = packages(root);
    let endpoint = start(root, &config(root, Some(&install)));
    let http = client(&endpoint.ca, reqwest::Version::HTTP_11);

    for path in [
        // Escapes from the folder, encoded so no client or proxy normalises them away.
        "/install/deb/x86_64/..%2f..%2fendpoint.yaml",
        "/install/deb/x86_64/..%2F..%2Fpackages%2FREADME",
        "/install/deb/x86_64/README",
        "/install/README",
        // Architectures and formats not served, or a package in another's folder.
        "/install/deb/amd64/gangplank-agent_0.1.0-1_amd64.deb",
        "/install/deb/i386/SHA256SUMS",
        "/install/zip/x86_64/SHA256SUMS",
        "/install/rpm/x86_64/gangplank-agent_0.1.0-1_amd64.deb",
        "/install/deb/aarch64/gangplank-agent_0.1.0-1_amd64.deb.sha256",
        "/install/deb/x86_64/gangplank-agent_0.2.0-1_amd64.deb",
        "/install/deb/x86_64/nothing.sha256",
        "/install/deb/x86_64/",
        "/install/deb/x86_64/SHA256SUMS/extra",
        "/install/deb",
        "/install/%ff/x86_64/SHA256SUMS",
    ] {
        let response = http.get(format!("{}{path}", endpoint.base)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.headers()["content-type"], "text/plain; charset=utf-8");
        let body = response.text().await.unwrap();
        assert!(body.starts_with("no such package"), "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_without_install_says_how_to_serve_packages() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let endpoint = start(root, &config(root, None));
    let http = client(&endpoint.ca, reqwest::Version::HTTP_11);
    for path in [
        "/install/",
        "/install/index.json",
        "/install/deb/x86_64/SHA256SUMS",
        "/install/deb/x86_64/gangplank-agent_0.1.0-1_amd64.deb",
        "/install/anything",
    ] {
        let response = http.get(format!("{}{path}", endpoint.base)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(
            response.text().await.unwrap(),
            "this endpoint serves no packages: set install.directory in its config\n",
            "{path}"
        );
    }
}

/// Runs the endpoint to its exit; returns the exit code and stderr.
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

#[test]
fn two_packages_of_one_format_and_architecture_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let install = packages(root);
    std::fs::write(install.join("gangplank-agent-0.2.0-1.x86_64.rpm"), b"newer").unwrap();
    let (code, stderr) = run(&config(root, Some(&install)));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "install.directory: gangplank-agent-0.1.0-1.x86_64.rpm and gangplank-agent-0.2.0-1.x86_64.rpm \
             are both rpm packages for x86_64: keep one of them"
        ),
        "{stderr}"
    );
    assert!(
        !root.join("state").exists(),
        "the endpoint wrote its state before refusing"
    );
}

#[test]
fn a_folder_the_endpoint_cannot_serve_is_refused_at_start_with_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let missing = root.join("pakages");
    let (code, stderr) = run(&config(root, Some(&missing)));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "install.directory: cannot read the folder {}",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("fix the path"), "{stderr}");

    let install = packages(root);
    std::fs::write(install.join("gangplank-agent_0.1.0-1_armhf.deb"), b"arm").unwrap();
    let (code, stderr) = run(&config(root, Some(&install)));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "install.directory: gangplank-agent_0.1.0-1_armhf.deb: architecture \"armhf\" is not served (only amd64 or arm64"
        ),
        "{stderr}"
    );
    assert!(!root.join("state").exists());
}
