//! What the CLI's integration tests share: running the `gangplank` binary, and a small mesh
//! for end-to-end tests: a directory registry with a WorkloadGroup, a real
//! `gangplank-endpoint` process with a dev certificate, and real `gangplank-agent`
//! processes whose sidecar is a stand-in shell script that records its environment.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use gangplank_api::istio::{
    GroupMetadata, WorkloadEntry, WorkloadEntrySpec, WorkloadGroup, WorkloadGroupSpec,
};
use gangplank_api::meta::{LabelSelector, ObjectMeta};
use gangplank_api::policy::{
    AllowRule, JoinTokenMatcher, JwtMatcher, OnboardTo, OnboardingPolicy, OnboardingPolicySpec,
    WorkloadMatcher,
};
use gangplank_api::{NamespacedName, Resource};
use gangplank_registry::dir;
use gangplank_testkit::process::{Proc, bin};

pub const PLANE_ID: &str = "plane-e2e-0001";
pub const WAIT: Duration = Duration::from_secs(30);

/// The WorkloadGroup `bookinfo/ratings` (label `app: ratings`, service account `ratings`;
/// loopback addresses allowed).
pub const RATINGS_GROUP: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  name: ratings
  namespace: bookinfo
  labels: {app: ratings}
  # The test VMs run on this machine and may register at loopback addresses.
  annotations: {onboarding.gangplank.dev/allowed-addresses: loopback}
spec:
  template: {serviceAccount: ratings}
"#;

/// The `gangplank` binary under test with `args`, without `GANGPLANK_REGISTRY` from the
/// caller's environment.
pub fn gangplank_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gangplank"));
    cmd.args(args).env_remove("GANGPLANK_REGISTRY");
    cmd
}

/// Runs `gangplank args…` to completion.
pub fn gangplank(args: &[&str]) -> Output {
    gangplank_command(args).output().expect("gangplank runs")
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The claims of a JWT, read without checking its signature.
pub fn claims_of(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A directory registry at `<dir>/registry` holding [`RATINGS_GROUP`] and the
/// OnboardingPolicy `policy` (YAML); returns it with its root folder as text.
pub async fn registry_with_policy(dir: &Path, policy: &str) -> (dir::Registry, String) {
    let root = dir.join("registry");
    let registry = dir::Registry::open(&root).expect("registry");
    let group: WorkloadGroup = serde_saphyr::from_str(RATINGS_GROUP).expect("group");
    registry.put(&group).await.expect("put group");
    let policy: OnboardingPolicy = serde_saphyr::from_str(policy).expect("policy");
    registry.put(&policy).await.expect("put policy");
    (registry, root.to_str().expect("utf-8").to_string())
}

/// Starts `gangplank-endpoint --config <config>` (process name `name`) and waits until it
/// listens; returns the process and its address.
pub fn run_endpoint(name: &str, config: &Path) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(bin("gangplank-endpoint"));
    cmd.arg("--config").arg(config).env("RUST_LOG", "info");
    let mut endpoint = Proc::spawn(name, cmd);
    let addr = endpoint
        .wait_for(r"endpoint listening addr=(\S+)", WAIT)
        .parse()
        .unwrap();
    (endpoint, addr)
}

/// Waits until the VM's sidecar started, then returns the mesh's only WorkloadEntry.
pub async fn wait_onboarded(mesh: &Mesh, vm: &mut Vm) -> WorkloadEntry {
    let found = gangplank_testkit::process::until(WAIT, || vm.read("sidecar.env"));
    assert!(
        found.is_some(),
        "the sidecar never started; agent output:\n{}\nendpoint:\n{}",
        vm.agent.output(),
        mesh.endpoint.output()
    );
    let entries = mesh.entries().await;
    assert_eq!(entries.len(), 1, "{entries:#?}");
    entries.into_iter().next().expect("one entry")
}

/// Endpoint settings for a test.
#[derive(Clone)]
pub struct Options {
    pub grace: &'static str,
    pub heartbeat: &'static str,
    pub token_lifetime: &'static str,
    pub propagation_delay: &'static str,
    /// A trusted JWT issuer (`issuer url`, `jwks uri`, `ca bundle path`).
    pub jwt: Option<(String, String, PathBuf)>,
    /// More `identities:` lines, indented two spaces (e.g. `  awsEc2: {...}\n`).
    pub identities: String,
    /// `workloads.bindingRetention`.
    pub binding_retention: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            grace: "5m",
            heartbeat: "1s",
            token_lifetime: "1h",
            propagation_delay: "1s",
            jwt: None,
            identities: String::new(),
            binding_retention: "24h",
        }
    }
}

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub registry: dir::Registry,
    pub ca_bundle: PathBuf,
    pub endpoint: Proc,
    pub addr: SocketAddr,
    config: PathBuf,
}

/// The WorkloadGroup `namespace/name` with `labels` (its entries' too), port `http: 9080`,
/// service account `<name>-sa`, an HTTP probe, and loopback addresses allowed: the test VMs
/// run on this machine.
pub fn group(namespace: &str, name: &str, labels: &[(&str, &str)]) -> WorkloadGroup {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    WorkloadGroup {
        api_version: WorkloadGroup::API_VERSION.into(),
        kind: WorkloadGroup::KIND.into(),
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels.clone()),
            annotations: Some(
                [(
                    gangplank_api::names::annotation::ALLOWED_ADDRESSES.to_string(),
                    "loopback".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: WorkloadGroupSpec {
            metadata: Some(GroupMetadata {
                labels,
                annotations: Default::default(),
            }),
            template: Some(WorkloadEntrySpec {
                ports: [("http".to_string(), 9080)].into(),
                service_account: format!("{name}-sa"),
                ..Default::default()
            }),
            probe: Some(serde_json::json!({"httpGet": {"port": 9080}})),
        },
    }
}

pub fn policy(
    namespace: &str,
    name: &str,
    workloads: Vec<WorkloadMatcher>,
    selector: &[(&str, &str)],
) -> OnboardingPolicy {
    let match_labels: BTreeMap<String, String> = selector
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    OnboardingPolicy {
        api_version: OnboardingPolicy::API_VERSION.into(),
        kind: OnboardingPolicy::KIND.into(),
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: OnboardingPolicySpec {
            allow: vec![AllowRule {
                workloads,
                onboard_to: vec![OnboardTo {
                    workload_group_selector: LabelSelector {
                        match_labels: Some(match_labels),
                        ..Default::default()
                    },
                }],
            }],
        },
    }
}

pub fn join_tokens() -> WorkloadMatcher {
    WorkloadMatcher {
        join_token: Some(JoinTokenMatcher::default()),
        ..Default::default()
    }
}

pub fn jwt_subjects(issuer: &str, subjects: &[&str]) -> WorkloadMatcher {
    WorkloadMatcher {
        jwt: Some(JwtMatcher {
            issuer: issuer.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            claims: vec![],
        }),
        ..Default::default()
    }
}

impl Mesh {
    /// A registry with `bookinfo/ratings` (labels app=ratings) and an endpoint serving it.
    pub async fn start(options: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let registry = dir::Registry::open(root.join("registry")).unwrap();
        registry
            .put(&group(
                "bookinfo",
                "ratings",
                &[("app", "ratings"), ("version", "v1")],
            ))
            .await
            .unwrap();

        let ca_bundle = write_dev_tls(root, &["localhost", "onboarding-endpoint.your-company.corp"]);
        write(
            &root.join("mesh/root-cert.pem"),
            "-----BEGIN CERTIFICATE-----\nZmFrZS1tZXNoLXJvb3Q=\n-----END CERTIFICATE-----\n",
        );
        write(
            &root.join("mesh/mesh.yaml"),
            "trustDomain: cluster.local\ndefaultConfig:\n  proxyMetadata:\n    FROM_MESH: \"yes\"\n",
        );

        let jwt = match &options.jwt {
            Some((issuer, jwks, ca)) => format!(
                "  jwt:\n    issuers:\n    - issuer: {issuer}\n      jwksUri: {jwks}\n      caBundle: {}\n",
                ca.display()
            ),
            None => String::new(),
        };
        let config = root.join("endpoint.yaml");
        write(
            &config,
            &format!(
                "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: {PLANE_ID}
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
replica: endpoint-0
tls:
  certFile: {root}/tls/tls.crt
  keyFile: {root}/tls/tls.key
registry:
  directory: {root}/registry
stateDir: {root}/state
mesh:
  meshConfigFile: {root}/mesh/mesh.yaml
  rootCertFile: {root}/mesh/root-cert.pem
  istiodIp: 10.10.10.11
sidecarToken:
  lifetime: {lifetime}
identities:
  joinTokens: true
{jwt}{more}workloads:
  gracePeriod: {grace}
  heartbeat: {heartbeat}
  propagationDelay: {delay}
{retention}",
                root = root.display(),
                // Only when set, so the file also suits endpoints older than the setting.
                retention = match options.binding_retention {
                    "24h" => String::new(),
                    r => format!("  bindingRetention: {r}\n"),
                },
                lifetime = options.token_lifetime,
                grace = options.grace,
                heartbeat = options.heartbeat,
                delay = options.propagation_delay,
                more = options.identities,
            ),
        );
        let (endpoint, addr) = run_endpoint("endpoint", &config);
        Self {
            dir,
            registry,
            ca_bundle,
            endpoint,
            addr,
            config,
        }
    }

    /// Stops the endpoint process and starts it again on the same port.
    pub fn restart_endpoint(&mut self) {
        self.endpoint.signal("TERM");
        self.endpoint.wait_exit(WAIT);
        let text = std::fs::read_to_string(&self.config)
            .unwrap()
            .replace("listen: 127.0.0.1:0\n", &format!("listen: {}\n", self.addr));
        std::fs::write(&self.config, text).unwrap();
        let (endpoint, addr) = run_endpoint("endpoint", &self.config);
        assert_eq!(addr, self.addr);
        self.endpoint = endpoint;
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a join token for `bookinfo/<group>` with `uses` and returns it.
    pub async fn join_token(&self, group: &str, uses: u32, ttl: Duration) -> String {
        let key = NamespacedName::new("bookinfo", group);
        let (token, secret) =
            gangplank_identity::token::create(&key, ttl, uses, time::OffsetDateTime::now_utc());
        self.registry.put(&token).await.unwrap();
        secret.expose().to_string()
    }

    /// Every file under the registry with its bytes (the lock file aside), sorted: equal
    /// snapshots mean nothing was written.
    pub fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        walk(&self.root().join("registry"), &mut files);
        let mut out: Vec<_> = files
            .into_iter()
            .filter(|p| !p.ends_with(".lock"))
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        out.sort();
        out
    }

    pub async fn entries(&self) -> Vec<WorkloadEntry> {
        self.registry.list::<WorkloadEntry>(None).await.unwrap()
    }

    /// Files under the registry that are WorkloadEntries (what istiod would read).
    /// The registry's WorkloadEntry files (not the hidden temp files of a write in flight,
    /// which the registry ignores).
    pub fn entry_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.root().join("registry"), &mut out);
        out.retain(|p| {
            p.to_string_lossy().contains("/workloadentries/")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        });
        out
    }

    /// Every WorkloadEntry file with its bytes, to show that nothing was written.
    pub fn entry_contents(&self) -> Vec<(PathBuf, Vec<u8>)> {
        self.entry_files()
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap_or_default();
                (p, bytes)
            })
            .collect()
    }

    pub async fn client(
        &self,
    ) -> gangplank_api::proto::onboarding_client::OnboardingClient<tonic::transport::Channel> {
        let options = gangplank_tls::ClientOptions {
            ca_bundle: Some(self.ca_bundle.clone()),
            ..Default::default()
        };
        let channel = gangplank_tls::channel("127.0.0.1", self.addr.port(), &options).unwrap();
        gangplank_api::proto::onboarding_client::OnboardingClient::new(channel)
    }
}

/// A dev CA and an endpoint certificate for `names` and 127.0.0.1 in `<root>/tls/`
/// (`tls.crt`, `tls.key`, `ca.pem`); returns the CA bundle's path.
pub fn write_dev_tls(root: &Path, names: &[&str]) -> PathBuf {
    let ca = gangplank_tls::dev::Ca::generate("e2e").unwrap();
    let leaf = ca.issue(names, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]).unwrap();
    write(&root.join("tls/tls.crt"), &leaf.cert_pem);
    write(&root.join("tls/tls.key"), &leaf.key_pem);
    let ca_bundle = root.join("tls/ca.pem");
    write(&ca_bundle, ca.cert_pem());
    ca_bundle
}

/// Every file below `dir`, depth first.
pub fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// How a test agent proves itself.
pub enum Credential {
    JoinToken(String),
    JwtFile(String),
    /// `identity:` lines for a cloud platform, indented two spaces (`  platform: {...}\n`).
    Platform(String),
}

/// The stand-in sidecar: records its environment and pid (in its working directory,
/// `files.root`), then waits to be stopped.
pub const STANDIN_SIDECAR: &str =
    "env > sidecar.env.tmp && mv sidecar.env.tmp sidecar.env; echo $$ > sidecar.pid; exec sleep 3600";

/// A `gangplank-agent` process for one VM.
/// How a test VM runs: its sidecar's readiness URL, the sidecar script, the group's namespace.
struct How<'a> {
    readiness_url: Option<&'a str>,
    sidecar: &'a str,
    namespace: &'a str,
}

pub struct Vm {
    pub root: PathBuf,
    pub agent: Proc,
    name: String,
    onboarding: PathBuf,
    agent_config: PathBuf,
    starts: u32,
    /// The agent's command line after the config flags (`run` and its flags; by default
    /// nothing: `run` with `--on-stop=leave`).
    run_args: Vec<String>,
}

impl Vm {
    /// Writes the seed's OnboardingConfiguration (host 127.0.0.1, plus the CA bundle) and an
    /// AgentConfiguration whose sidecar is a stand-in, then starts the agent.
    pub fn start(mesh: &Mesh, name: &str, credential: Credential) -> Self {
        Self::start_at(mesh.root(), name, mesh.addr, &mesh.ca_bundle, credential)
    }

    /// Like [`Vm::start`], for an endpoint at `addr` trusted through `ca_bundle`; the VM's
    /// files live under `<dir>/vm-<name>`.
    pub fn start_at(
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        ca_bundle: &Path,
        credential: Credential,
    ) -> Self {
        Self::start_probed(dir, name, addr, ca_bundle, credential, None)
    }

    /// Like [`Vm::start_at`], with the agent probing the sidecar's readiness at
    /// `readiness_url` (the stand-in sidecar serves none: the test does).
    pub fn start_probed(
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        ca_bundle: &Path,
        credential: Credential,
        readiness_url: Option<&str>,
    ) -> Self {
        Self::start_full(
            dir,
            name,
            addr,
            ca_bundle,
            credential,
            How {
                readiness_url,
                sidecar: STANDIN_SIDECAR,
                namespace: "bookinfo",
            },
        )
    }

    /// Like [`Vm::start_probed`], joining WorkloadGroup `ratings` of `namespace`.
    pub fn start_in(
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        ca_bundle: &Path,
        credential: Credential,
        namespace: &str,
    ) -> Self {
        Self::start_full(
            dir,
            name,
            addr,
            ca_bundle,
            credential,
            How {
                readiness_url: None,
                sidecar: STANDIN_SIDECAR,
                namespace,
            },
        )
    }

    /// Like [`Vm::start`], with `sidecar` (a shell script run in `files.root`) as the
    /// sidecar. Every VM's sidecar gets SIGKILL 500ms after a SIGTERM it ignores.
    pub fn start_sidecar(mesh: &Mesh, name: &str, credential: Credential, sidecar: &str) -> Self {
        Self::start_full(
            mesh.root(),
            name,
            mesh.addr,
            &mesh.ca_bundle,
            credential,
            How {
                readiness_url: None,
                sidecar,
                namespace: "bookinfo",
            },
        )
    }

    /// Writes the configuration [`Vm::start`] writes, for an agent not started yet (e.g.
    /// for `gangplank-agent doctor`); [`VmConfig::start`] starts it.
    pub fn configure(mesh: &Mesh, name: &str, credential: Credential) -> VmConfig {
        Self::write_config(
            mesh.root(),
            name,
            mesh.addr,
            &mesh.ca_bundle,
            credential,
            &How {
                readiness_url: None,
                sidecar: STANDIN_SIDECAR,
                namespace: "bookinfo",
            },
        )
    }

    fn start_full(
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        ca_bundle: &Path,
        credential: Credential,
        how: How<'_>,
    ) -> Self {
        Self::write_config(dir, name, addr, ca_bundle, credential, &how).start()
    }

    fn write_config(
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        ca_bundle: &Path,
        credential: Credential,
        how: &How<'_>,
    ) -> VmConfig {
        let &How {
            readiness_url,
            sidecar,
            namespace,
        } = how;
        let root = dir.join(format!("vm-{name}"));
        let onboarding = root.join("etc/onboarding.yaml");
        write(
            &onboarding,
            &format!(
                "apiVersion: config.agent.onboarding.tetrate.io/v1alpha1
kind: OnboardingConfiguration
onboardingEndpoint:                            # connect to
  host: 127.0.0.1
  port: {port}
  transportSecurity:
    tls:
      caBundle: {ca}
workloadGroup:                                 # join to
  namespace: {namespace}
  name: ratings
",
                port = addr.port(),
                ca = ca_bundle.display()
            ),
        );
        let identity = match credential {
            Credential::JoinToken(t) => {
                write(&root.join("etc/join-token"), &t);
                format!("  joinToken:\n    file: {}/etc/join-token\n", root.display())
            }
            Credential::JwtFile(t) => {
                write(&root.join("etc/jwt"), &t);
                format!("  jwt:\n    file: {}/etc/jwt\n", root.display())
            }
            Credential::Platform(lines) => lines,
        };
        let agent_config = root.join("etc/agent.yaml");
        write(
            &agent_config,
            &format!(
                "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: AgentConfiguration
identity:
{identity}sidecar:
  launcher: process
  readinessUrl: {readiness:?}
  process:
    command: [sh, -c, {sidecar:?}]
    stopTimeout: 500ms
files:
  root: {root}/fs
settings:
  retry:
    initial: 100ms
    max: 1s
",
                root = root.display(),
                readiness = readiness_url.unwrap_or_default(),
            ),
        );
        VmConfig {
            root,
            name: name.to_string(),
            onboarding,
            agent_config,
        }
    }

    /// Runs `gangplank-agent <args>` with this VM's configuration flags, to completion.
    pub fn agent_cli(&self, args: &[&str]) -> Output {
        agent_cli(&self.onboarding, &self.agent_config, args)
    }

    fn spawn_agent(name: &str, onboarding: &Path, agent_config: &Path, args: &[String]) -> Proc {
        let mut cmd = Command::new(bin("gangplank-agent"));
        cmd.arg("--onboarding-config")
            .arg(onboarding)
            .arg("--agent-config")
            .arg(agent_config)
            .args(args)
            .env("RUST_LOG", "info");
        Proc::spawn(name, cmd)
    }

    /// Starts a new agent process with the same configuration (after the last one exited,
    /// or was killed); returns the old one.
    pub fn restart_agent(&mut self) -> Proc {
        self.starts += 1;
        let name = format!("agent-{}-{}", self.name, self.starts);
        let agent = Self::spawn_agent(&name, &self.onboarding, &self.agent_config, &self.run_args);
        std::mem::replace(&mut self.agent, agent)
    }

    /// The command line after the config flags for the next [`Vm::restart_agent`]s, e.g.
    /// `["run", "--on-stop=stay"]` (the packaged unit's).
    pub fn set_run_args(&mut self, args: &[&str]) {
        self.run_args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Kills the agent with SIGKILL (a crash: no Leave) and waits for it to be gone.
    pub fn kill_agent(&mut self) {
        self.agent.signal("KILL");
        self.agent.wait_exit(Duration::from_secs(10));
    }

    /// The VM's state dir (`files.stateDir` under `files.root`).
    pub fn state_dir(&self) -> PathBuf {
        self.path("/var/lib/gangplank")
    }

    /// The WorkloadEntry name the agent saved as its registration, if any.
    pub fn registered_entry(&self) -> Option<String> {
        let text = std::fs::read(self.state_dir().join("registration.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        v["entry"].as_str().map(str::to_owned)
    }

    /// A path on the VM's file system (`files.root`).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join("fs").join(rel.trim_start_matches('/'))
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }
}

/// A VM's configuration files (see [`Vm::configure`]).
pub struct VmConfig {
    pub root: PathBuf,
    name: String,
    pub onboarding: PathBuf,
    pub agent_config: PathBuf,
}

impl VmConfig {
    /// Starts the VM's agent.
    pub fn start(self) -> Vm {
        let agent = Vm::spawn_agent(
            &format!("agent-{}", self.name),
            &self.onboarding,
            &self.agent_config,
            &[],
        );
        Vm {
            root: self.root,
            agent,
            name: self.name,
            onboarding: self.onboarding,
            agent_config: self.agent_config,
            starts: 1,
            run_args: Vec::new(),
        }
    }

    /// Runs `gangplank-agent <args>` with this configuration's flags, to completion.
    pub fn agent_cli(&self, args: &[&str]) -> Output {
        agent_cli(&self.onboarding, &self.agent_config, args)
    }

    /// A path on the VM's file system (`files.root`).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join("fs").join(rel.trim_start_matches('/'))
    }
}

/// Runs `gangplank-agent --onboarding-config <onboarding> --agent-config <agent> <args>`.
pub fn agent_cli(onboarding: &Path, agent: &Path, args: &[&str]) -> Output {
    Command::new(bin("gangplank-agent"))
        .arg("--onboarding-config")
        .arg(onboarding)
        .arg("--agent-config")
        .arg(agent)
        .args(args)
        .output()
        .expect("gangplank-agent runs")
}

/// A first join over the protocol with `key`: a Discover, then an Onboard into
/// `bookinfo/ratings` with join token `token` and the key's proof over the nonce.
pub async fn first_join(
    client: &mut gangplank_api::proto::onboarding_client::OnboardingClient<tonic::transport::Channel>,
    token: &str,
    key: &gangplank_identity::bound::Key,
) -> gangplank_api::proto::OnboardResponse {
    use gangplank_api::proto;
    let discovered = client
        .discover(proto::DiscoverRequest {})
        .await
        .unwrap()
        .into_inner();
    let challenge = gangplank_identity::Challenge {
        plane_id: discovered.plane_id,
        nonce: discovered.nonce.clone(),
        ..Default::default()
    };
    let mut credential = proto::Credential {
        kind: "join-token".into(),
        payload: token.as_bytes().to_vec(),
        ..Default::default()
    };
    key.attach(&mut credential, &challenge);
    client
        .onboard(onboard_request("ratings", credential, discovered.nonce))
        .await
        .expect("first join")
        .into_inner()
}

/// An Onboard into `bookinfo/<group>` with `credential` and `nonce`, from a host `vm` at
/// 10.0.0.7.
pub fn onboard_request(
    group: &str,
    credential: gangplank_api::proto::Credential,
    nonce: String,
) -> gangplank_api::proto::OnboardRequest {
    use gangplank_api::proto;
    proto::OnboardRequest {
        workload_group: Some(proto::WorkloadGroupRef {
            namespace: "bookinfo".into(),
            name: group.into(),
        }),
        credential: Some(credential),
        nonce,
        host: Some(proto::HostFacts {
            hostname: "vm".into(),
            addresses: vec!["10.0.0.7".into()],
            ..Default::default()
        }),
    }
}
