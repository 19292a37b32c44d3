//! The plane under test: a `gangplank-endpoint` process on a fresh registry (a directory,
//! or the Kubernetes API stand-in), with a WorkloadGroup, an OnboardingPolicy and the
//! credentials the simulated agents present.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gangplank_api::istio::{GroupMetadata, WorkloadEntrySpec, WorkloadGroup, WorkloadGroupSpec};
use gangplank_api::meta::{LabelSelector, ObjectMeta};
use gangplank_api::policy::{
    AllowRule, JoinTokenMatcher, JwtMatcher, OnboardTo, OnboardingPolicy, OnboardingPolicySpec,
    WorkloadMatcher,
};
use gangplank_api::{NamespacedName, Resource, proto};
use gangplank_testkit::kube_api::Server;
use gangplank_testkit::oidc::Issuer;
use serde_json::{Value, json};

/// The plane's id (the audience of the agents' JWTs).
pub const PLANE_ID: &str = "bench-plane";
const NAMESPACE: &str = "bookinfo";
const GROUP: &str = "ratings";

/// Which registry the endpoint keeps WorkloadEntries in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegistryKind {
    /// A directory (what `istiod` reads with `fs://`).
    Dir,
    /// The Kubernetes API stand-in, in this process.
    Kube,
}

/// Which first-join credential the agents present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// One single-use join token per agent.
    JoinToken,
    /// One OIDC JWT per agent, from an issuer running in this process.
    Jwt,
}

/// A running plane.
pub struct Plane {
    _dir: tempfile::TempDir,
    root: PathBuf,
    child: Child,
    /// The endpoint's gRPC/TLS address.
    pub addr: SocketAddr,
    /// Its health and metrics address.
    pub monitoring: SocketAddr,
    /// The CA bundle agents trust.
    pub ca_bundle: PathBuf,
    registry: Option<gangplank_registry::dir::Registry>,
    kube: Option<Server>,
    issuer: Option<Issuer>,
    writes: Option<crate::probe::Writes>,
}

impl Drop for Plane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // GANGPLANK_BENCH_KEEP_LOG=FILE keeps the endpoint's log of the last run.
        if let Some(keep) = std::env::var_os("GANGPLANK_BENCH_KEEP_LOG") {
            let _ = std::fs::copy(self.root.join("endpoint.log"), keep);
        }
    }
}

impl Plane {
    /// Starts `endpoint_bin` on a new `kind` registry trusting `credential`.
    /// `heartbeat` is the endpoint's `workloads.heartbeat` (its default when `None`).
    pub async fn start(
        endpoint_bin: &Path,
        kind: RegistryKind,
        credential: CredentialKind,
        heartbeat: Option<Duration>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().to_owned();
        let ca_bundle = dev_tls(&root)?;
        let issuer = match credential {
            CredentialKind::Jwt => Some(Issuer::start().await?),
            CredentialKind::JoinToken => None,
        };
        let jwt = match &issuer {
            Some(i) => format!(
                "  jwt:\n    issuers:\n    - issuer: {}\n      jwksUri: {}\n      caBundle: {}\n",
                i.url(),
                i.jwks_uri(),
                i.write_ca(&root)?.display()
            ),
            None => String::new(),
        };
        let policy = policy(credential, issuer.as_ref().map(Issuer::url));
        let (registry, kube, registry_config) = match kind {
            RegistryKind::Dir => {
                let path = root.join("registry");
                let registry = gangplank_registry::dir::Registry::open(&path)?;
                registry.put(&group()).await?;
                registry.put(&policy).await?;
                // The folders the endpoint writes into, so inotify can watch them.
                for kind in ["workloadentries", "workloadbindings", "jointokens"] {
                    std::fs::create_dir_all(path.join(NAMESPACE).join(kind))?;
                }
                std::fs::create_dir_all(root.join("mesh"))?;
                std::fs::write(root.join("mesh/mesh.yaml"), "trustDomain: cluster.local\n")?;
                std::fs::write(
                    root.join("mesh/root-cert.pem"),
                    "-----BEGIN CERTIFICATE-----\nYmVuY2gtcm9vdA==\n-----END CERTIFICATE-----\n",
                )?;
                let config = format!(
                    "registry:\n  directory: {path}\nmesh:\n  meshConfigFile: {root}/mesh/mesh.yaml\n  rootCertFile: {root}/mesh/root-cert.pem\n  istiodIp: 10.10.10.11\n",
                    path = path.display(),
                    root = root.display()
                );
                (Some(registry), None, config)
            }
            RegistryKind::Kube => {
                let server = Server::start().await?;
                seed_cluster(&server, &policy)?;
                let kubeconfig = server.write_kubeconfig(&root)?;
                let config = format!(
                    "registry:\n  kubernetes:\n    kubeconfig: {}\n    namespace: gangplank-system\nmesh:\n  istiodIp: 10.10.10.11\n  clusterId: bench-cluster\n",
                    kubeconfig.display()
                );
                (None, Some(server), config)
            }
        };
        let config = root.join("endpoint.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: onboarding.gangplank.dev/v1alpha1\nkind: EndpointConfiguration\nplaneId: {PLANE_ID}\n\
                 listen: 127.0.0.1:0\nmonitoringListen: 127.0.0.1:0\nreplica: endpoint-0\n\
                 tls:\n  certFile: {root}/tls/tls.crt\n  keyFile: {root}/tls/tls.key\n\
                 stateDir: {root}/state\n{registry_config}identities:\n  joinTokens: true\n{jwt}{workloads}",
                root = root.display(),
                workloads = match heartbeat {
                    Some(every) =>
                        format!("workloads:\n  heartbeat: {}\n", humantime::format_duration(every)),
                    None => String::new(),
                },
            ),
        )?;
        let log = root.join("endpoint.log");
        let child = Command::new(endpoint_bin)
            .arg("--config")
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("GANGPLANK_BENCH_ENDPOINT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", endpoint_bin.display()))?;
        let (addr, monitoring) = listening(&log, Duration::from_secs(60))?;
        let writes = match &registry {
            Some(_) => Some(crate::probe::Writes::watch(&root.join("registry"))?),
            None => None,
        };
        Ok(Self {
            _dir: dir,
            root,
            child,
            addr,
            monitoring,
            ca_bundle,
            registry,
            kube,
            issuer,
            writes,
        })
    }

    /// The endpoint's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The endpoint's log, for a failed run.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.root.join("endpoint.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Registry writes so far (files placed or removed; or the stand-in's write requests).
    pub fn writes(&self) -> u64 {
        match (&self.writes, &self.kube) {
            (Some(w), _) => w.count(),
            (None, Some(server)) => server.writes().len() as u64,
            _ => 0,
        }
    }

    /// What the last `count` registry writes were, for a look at the steady state (the API
    /// stand-in records each; a directory registry's are printed as they happen with
    /// `GANGPLANK_BENCH_DEBUG_WRITES`).
    pub fn last_writes(&self, count: usize) -> Vec<String> {
        let Some(server) = &self.kube else {
            return Vec::new();
        };
        let writes = server.writes();
        writes[writes.len().saturating_sub(count)..]
            .iter()
            .map(|w| format!("{} {} {}/{}", w.verb, w.resource, w.namespace, w.name))
            .collect()
    }

    /// One first-join credential for each of `count` agents.
    pub async fn credentials(&self, count: usize) -> Result<Vec<proto::Credential>> {
        let key = NamespacedName::new(NAMESPACE, GROUP);
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let credential = match &self.issuer {
                Some(issuer) => proto::Credential {
                    kind: gangplank_api::kind::JWT.into(),
                    payload: issuer
                        .sign(&issuer.claims(&format!("vm-{i:05}"), PLANE_ID))
                        .into_bytes(),
                    ..Default::default()
                },
                None => {
                    let (token, secret) = gangplank_identity::token::create(
                        &key,
                        Duration::from_secs(3600),
                        1,
                        time::OffsetDateTime::now_utc(),
                    );
                    match (&self.registry, &self.kube) {
                        (Some(registry), _) => {
                            registry.put(&token).await?;
                        }
                        (None, Some(server)) => {
                            let mut v = serde_json::to_value(&token)?;
                            v["apiVersion"] = json!("onboarding.gangplank.dev/v1alpha1");
                            v["kind"] = json!("JoinToken");
                            server
                                .seed(v)
                                .map_err(|e| anyhow::anyhow!("seeding a JoinToken: {e:?}"))?;
                        }
                        _ => bail!("no registry"),
                    }
                    proto::Credential {
                        kind: gangplank_api::kind::JOIN_TOKEN.into(),
                        payload: secret.expose().as_bytes().to_vec(),
                        ..Default::default()
                    }
                }
            };
            out.push(credential);
        }
        Ok(out)
    }
}

/// The group the agents join.
pub fn group_ref() -> proto::WorkloadGroupRef {
    proto::WorkloadGroupRef {
        namespace: NAMESPACE.into(),
        name: GROUP.into(),
    }
}

fn group() -> WorkloadGroup {
    let labels: std::collections::BTreeMap<String, String> =
        [("app".to_string(), "ratings".to_string())].into();
    WorkloadGroup {
        api_version: WorkloadGroup::API_VERSION.into(),
        kind: WorkloadGroup::KIND.into(),
        metadata: ObjectMeta {
            name: Some(GROUP.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(labels.clone()),
            uid: Some("00000000-0000-4000-8000-00000000beef".into()),
            ..Default::default()
        },
        spec: WorkloadGroupSpec {
            metadata: Some(GroupMetadata {
                labels,
                annotations: Default::default(),
            }),
            template: Some(WorkloadEntrySpec {
                ports: [("http".to_string(), 9080)].into(),
                service_account: "ratings".into(),
                ..Default::default()
            }),
            probe: None,
        },
    }
}

fn policy(credential: CredentialKind, issuer: Option<&str>) -> OnboardingPolicy {
    let workload = match credential {
        CredentialKind::JoinToken => WorkloadMatcher {
            join_token: Some(JoinTokenMatcher::default()),
            ..Default::default()
        },
        CredentialKind::Jwt => WorkloadMatcher {
            jwt: Some(JwtMatcher {
                issuer: issuer.unwrap_or_default().into(),
                subjects: vec![],
                claims: vec![],
            }),
            ..Default::default()
        },
    };
    OnboardingPolicy {
        api_version: OnboardingPolicy::API_VERSION.into(),
        kind: OnboardingPolicy::KIND.into(),
        metadata: ObjectMeta {
            name: Some("allow-bench".into()),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        },
        spec: OnboardingPolicySpec {
            allow: vec![AllowRule {
                workloads: vec![workload],
                onboard_to: vec![OnboardTo {
                    workload_group_selector: LabelSelector {
                        match_labels: Some([("app".to_string(), "ratings".to_string())].into()),
                        ..Default::default()
                    },
                }],
            }],
        },
    }
}

/// What the endpoint needs on the API stand-in: the CRDs, the group and policy, the
/// group's ServiceAccount, Istio's root certificate and mesh config.
fn seed_cluster(server: &Server, policy: &OnboardingPolicy) -> Result<()> {
    server.install_istio_crds(&["v1", "v1beta1"])?;
    for crd in gangplank_registry::crds::all()? {
        server.install_crd(&serde_json::to_value(crd)?)?;
    }
    let seed = |v: Value| {
        server
            .seed(v)
            .map(drop)
            .map_err(|e| anyhow::anyhow!("seeding: {e:?}"))
    };
    let mut g = serde_json::to_value(group())?;
    g["apiVersion"] = json!("networking.istio.io/v1");
    g["kind"] = json!("WorkloadGroup");
    g["metadata"].as_object_mut().map(|m| m.remove("uid"));
    seed(g)?;
    let mut p = serde_json::to_value(policy)?;
    p["apiVersion"] = json!("onboarding.gangplank.dev/v1alpha1");
    p["kind"] = json!("OnboardingPolicy");
    seed(p)?;
    seed(
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ratings", "namespace": NAMESPACE}}),
    )?;
    seed(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio-ca-root-cert", "namespace": NAMESPACE},
        "data": {"root-cert.pem": "-----BEGIN CERTIFICATE-----\nYmVuY2gtcm9vdA==\n-----END CERTIFICATE-----\n"}}),
    )?;
    seed(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": "trustDomain: cluster.local\n"}}),
    )?;
    Ok(())
}

/// A dev CA and a certificate for localhost and 127.0.0.1 in `<root>/tls`; the CA's path.
fn dev_tls(root: &Path) -> Result<PathBuf> {
    let ca = gangplank_tls::dev::Ca::generate("gangplank-bench")?;
    let leaf = ca.issue(
        &["localhost"],
        &[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
    )?;
    std::fs::create_dir_all(root.join("tls"))?;
    std::fs::write(root.join("tls/tls.crt"), &leaf.cert_pem)?;
    std::fs::write(root.join("tls/tls.key"), &leaf.key_pem)?;
    let bundle = root.join("tls/ca.pem");
    std::fs::write(&bundle, ca.cert_pem())?;
    Ok(bundle)
}

/// Waits for the endpoint's "endpoint listening" line; returns its two addresses.
fn listening(log: &Path, timeout: Duration) -> Result<(SocketAddr, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let field = |line: &str, name: &str| -> Option<SocketAddr> {
        let start = line.find(name)? + name.len();
        line[start..].split_whitespace().next()?.parse().ok()
    };
    while Instant::now() < deadline {
        if let Ok(file) = std::fs::File::open(log) {
            for line in BufReader::new(file).lines().map_while(Result::ok) {
                let plain = strip_ansi(&line);
                if plain.contains("endpoint listening")
                    && let (Some(a), Some(m)) = (field(&plain, "addr="), field(&plain, "monitoring_addr="))
                {
                    return Ok((a, m));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the endpoint did not start listening within {timeout:?}; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
