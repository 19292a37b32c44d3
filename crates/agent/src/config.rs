//! The agent's two configuration files, parsed in two stages: raw YAML values (unknown
//! fields refused), then validated typed values the rest of the agent trusts.
//!
//! - [`Onboarding`] (`OnboardingConfiguration`, usually `/etc/gangplank/onboarding.yaml`):
//!   where to onboard to and into which WorkloadGroup.
//! - [`Agent`] (`AgentConfiguration`, usually `/etc/gangplank/agent.yaml`): how this host
//!   proves its identity, how the sidecar is started, where its files go, timings. Every
//!   field is optional; the defaults live in [`defaults`] and `gangplank-agent config print`
//!   shows them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::Retry;
use crate::readiness;

/// `apiVersion`s accepted for `OnboardingConfiguration` (TSB's, for drop-in use, and ours).
pub const ONBOARDING_API_VERSIONS: [&str; 2] = [
    "config.agent.onboarding.tetrate.io/v1alpha1",
    "onboarding.gangplank.dev/v1alpha1",
];
/// `apiVersion` of `AgentConfiguration`.
pub const AGENT_API_VERSION: &str = "onboarding.gangplank.dev/v1alpha1";
/// Default path of the onboarding configuration.
pub const DEFAULT_ONBOARDING_PATH: &str = "/etc/gangplank/onboarding.yaml";
/// Default path of the agent configuration.
pub const DEFAULT_AGENT_PATH: &str = "/etc/gangplank/agent.yaml";

/// Every default of both files, in one place (the boot files' paths are Istio's package
/// layout, [`gangplank_bootstrap::layout`]).
pub mod defaults {
    use gangplank_bootstrap::{docker, layout};

    /// `onboardingEndpoint.port`.
    pub const PORT: u16 = 15443;
    /// `identity.joinToken.file` when no identity is configured.
    pub const JOIN_TOKEN_FILE: &str = "/etc/gangplank/join-token";
    /// `identity.platform.keyFile`: the agent's AWS instance key.
    pub const INSTANCE_KEY_FILE: &str = "/var/lib/gangplank/instance-key.pem";
    /// `sidecar.launcher`.
    pub const LAUNCHER: &str = "systemd";
    /// `sidecar.systemd.command`.
    pub const SYSTEMCTL: &str = "systemctl";
    /// `sidecar.systemd.unit`: the unit of Istio's sidecar package.
    pub const UNIT: &str = "istio";
    /// `sidecar.process.command`.
    pub const PROCESS_COMMAND: [&str; 3] = ["/usr/local/bin/pilot-agent", "proxy", "sidecar"];
    /// `sidecar.process.stopTimeout`.
    pub const STOP_TIMEOUT: &str = "10s";
    /// `sidecar.process.pidFile` (under `files.root`): which sidecar an agent started, so
    /// the next agent can stop it if it outlived its agent.
    pub const PID_FILE: &str = "/var/run/gangplank/sidecar.pid";
    /// `sidecar.docker.command`.
    pub const DOCKER: &str = "docker";
    /// `sidecar.docker.name`.
    pub const CONTAINER_NAME: &str = docker::CONTAINER;
    /// `sidecar.proxyUser`.
    pub const PROXY_USER: &str = "istio-proxy";
    /// Istio's proxy readiness endpoint (Envoy's `:15021`, answered by pilot-agent).
    pub const READINESS_URL: &str = "http://127.0.0.1:15021/healthz/ready";
    /// `files.root`.
    pub const ROOT: &str = "/";
    /// `files.clusterEnv`.
    pub const CLUSTER_ENV: &str = layout::CLUSTER_ENV;
    /// `files.mesh`.
    pub const MESH: &str = layout::MESH;
    /// `files.rootCert`.
    pub const ROOT_CERT: &str = layout::ROOT_CERT;
    /// `files.token`.
    pub const TOKEN: &str = layout::TOKEN;
    /// `files.hosts`.
    pub const HOSTS: &str = layout::HOSTS;
    /// `files.stateDir`: what the agent keeps across restarts (its bound key and
    /// registration, the sidecar's pid file).
    pub const STATE_DIR: &str = "/var/lib/gangplank";
    /// `settings.retry.initial`.
    pub const RETRY_INITIAL: &str = "1s";
    /// `settings.retry.max`.
    pub const RETRY_MAX: &str = "30s";
    /// `settings.tokenRenewal`: renew the token after this fraction of its lifetime.
    pub const TOKEN_RENEWAL: f64 = 0.7;
}

/// Why a configuration file was refused. Every message names the file, the field path and
/// what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{file}: cannot read the configuration: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown field or a value of the wrong type.
    #[error("{file}:{line}:{column}: {field}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line, 0 when unknown.
        line: u64,
        /// 1-based column, 0 when unknown.
        column: u64,
        /// The field path, e.g. `onboardingEndpoint.port` (`.` for the whole document).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{file}: {field}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The field path.
        field: String,
        /// What is wrong and what to change.
        message: String,
    },
    /// The onboarding configuration is missing or holds nothing but comments: this VM has
    /// not been told where to onboard yet (the packaged file is a commented example).
    #[error(
        "{file}: not configured yet: write the OnboardingConfiguration there (onboardingEndpoint.host and workloadGroup; the packaged file's comments show one), then start the agent again"
    )]
    NotConfigured {
        /// The file.
        file: PathBuf,
    },
}

impl Error {
    /// The exit code for this error: [`EXIT_NOT_CONFIGURED`] when the onboarding file is not
    /// written yet, else 2 (an invalid file).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NotConfigured { .. } => EXIT_NOT_CONFIGURED,
            _ => 2,
        }
    }
}

/// The exit code when the onboarding file is not written yet (sysexits' `EX_CONFIG`): the
/// packaged unit neither restarts on it nor counts it as a failure.
pub const EXIT_NOT_CONFIGURED: u8 = 78;

/// Whether `text` holds anything but blank lines and comments. The packages' maintainer
/// scripts apply the same rule (a line whose first non-blank character is not `#`).
pub fn has_content(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim_start();
        !line.is_empty() && !line.starts_with('#')
    })
}

/// A result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------
// Typed configuration: what the rest of the agent uses.
// ---------------------------------------------------------------------------------------

/// Both configuration files, validated: everything [`crate::run`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The `OnboardingConfiguration`.
    pub onboarding: Onboarding,
    /// The `AgentConfiguration` (defaults when there is no file).
    pub agent: Agent,
}

impl Config {
    /// Loads both files. A missing agent file means defaults only when `agent_missing_ok`.
    pub fn load(onboarding: &Path, agent: &Path, agent_missing_ok: bool) -> Result<Self> {
        Ok(Config {
            onboarding: Onboarding::load(onboarding)?,
            agent: Agent::load(agent, agent_missing_ok)?,
        })
    }
}

/// A validated `OnboardingConfiguration`.
#[derive(Debug, Clone, PartialEq)]
pub struct Onboarding {
    /// The onboarding endpoint to connect to.
    pub endpoint: Endpoint,
    /// The WorkloadGroup to join.
    pub workload_group: gangplank_api::NamespacedName,
    /// Extra labels for the WorkloadEntry (may add to the group's, never override).
    pub labels: BTreeMap<String, String>,
    /// Which address the endpoint should register.
    pub connected_over: ConnectedOver,
}

/// Where the onboarding endpoint is and how its certificate is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// CA bundle (PEM) to verify the endpoint with; system roots when `None`.
    pub ca_bundle: Option<PathBuf>,
    /// Name to verify the certificate against when it differs from `host`.
    pub sni: Option<String>,
    /// Skip certificate verification (only when the config says literally `true`).
    pub insecure_skip_verify: bool,
}

/// `settings.connectedOver`: which of the host's addresses the mesh should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectedOver {
    /// The private address (default).
    #[default]
    Vpc,
    /// The public address.
    Internet,
}

impl ConnectedOver {
    /// The protocol spelling (`VPC`, `INTERNET`).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectedOver::Vpc => gangplank_api::connected_over::VPC,
            ConnectedOver::Internet => gangplank_api::connected_over::INTERNET,
        }
    }
}

/// A validated `AgentConfiguration`, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    /// How the host proves its identity.
    pub identity: Identity,
    /// How the sidecar is started.
    pub sidecar: Sidecar,
    /// Where the sidecar's boot files go.
    pub files: Files,
    /// Timings.
    pub settings: Settings,
}

/// Where the agent obtains its platform credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A join token read from a file.
    JoinToken {
        /// The file holding the token.
        file: PathBuf,
    },
    /// An OIDC JWT read from a file.
    JwtFile {
        /// The file holding the JWT.
        file: PathBuf,
    },
    /// An OIDC JWT printed by a command.
    JwtCommand {
        /// Program and arguments.
        command: Vec<String>,
    },
    /// The cloud platform's own credential (AWS EC2, GCP GCE, Azure), fixed or detected.
    Platform {
        /// `auto` or the platform.
        host: gangplank_identity::detect::Host,
        /// Metadata service base URLs (defaults: the platforms' link-local services).
        urls: gangplank_identity::detect::MetadataUrls,
        /// Where the AWS instance key is kept.
        key_file: PathBuf,
    },
}

/// How the sidecar is started.
#[derive(Debug, Clone, PartialEq)]
pub struct Sidecar {
    /// Which launcher, with its settings.
    pub launcher: Launcher,
    /// The user the sidecar runs as; the token is given to it when the agent runs as root.
    /// A name or a numeric uid.
    pub proxy_user: String,
    /// The proxy's readiness endpoint (`sidecar.readinessUrl`); `None` (`""`) when only the
    /// launcher's view counts. Default: Istio's `http://127.0.0.1:15021/healthz/ready` with
    /// the systemd and docker launchers, none with `process`.
    pub readiness_url: Option<readiness::Url>,
}

/// `sidecar.launcher` and the settings of that launcher (`sidecar.systemd`,
/// `sidecar.docker` or `sidecar.process`).
#[derive(Debug, Clone, PartialEq)]
pub enum Launcher {
    /// The `istio` unit of Istio's sidecar package.
    Systemd(Systemd),
    /// The `istio-proxy` container, host network.
    Docker(Docker),
    /// A supervised child process.
    Process(Process),
}

impl Launcher {
    /// The config spelling (`systemd`, `docker`, `process`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Launcher::Systemd(_) => "systemd",
            Launcher::Docker(_) => "docker",
            Launcher::Process(_) => "process",
        }
    }
}

/// `sidecar.systemd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Systemd {
    /// The `systemctl` program.
    pub command: String,
    /// The sidecar's unit.
    pub unit: String,
}

/// `sidecar.process`.
#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    /// Program and arguments of the sidecar.
    pub command: Vec<String>,
    /// How long to wait after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// Where the running sidecar's pid is kept (joined onto `files.root`).
    pub pid_file: PathBuf,
}

/// `sidecar.docker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Docker {
    /// The `docker` program.
    pub command: String,
    /// The proxy image (`istio/proxyv2:<your mesh's version>`).
    pub image: String,
    /// The container's name.
    pub name: String,
}

/// `files`: where each boot file goes. Paths are already joined onto `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// Every other path is inside this directory; also the sidecar's working directory.
    pub root: PathBuf,
    /// `cluster.env`.
    pub cluster_env: PathBuf,
    /// `mesh.yaml`.
    pub mesh: PathBuf,
    /// `root-cert.pem`.
    pub root_cert: PathBuf,
    /// `istio-token`.
    pub token: PathBuf,
    /// The hosts file the agent keeps its block in.
    pub hosts: PathBuf,
    /// What the agent keeps across restarts, reboots and upgrades: the VM's bound key and
    /// its registration (`files.stateDir`). Never on a tmpfs.
    pub state_dir: PathBuf,
}

/// `settings`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Retry backoff (`settings.retry`).
    pub retry: Retry,
    /// Renew the token after this fraction of its lifetime, in (0, 1).
    pub token_renewal: f64,
    /// Heartbeat interval overriding the endpoint's.
    pub heartbeat: Option<Duration>,
}

// ---------------------------------------------------------------------------------------
// Raw configuration: exactly what the YAML says.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOnboarding {
    api_version: Option<String>,
    kind: Option<String>,
    onboarding_endpoint: Option<RawEndpoint>,
    workload_group: Option<RawGroup>,
    workload: Option<RawWorkload>,
    settings: Option<RawOnboardingSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawEndpoint {
    host: Option<String>,
    port: Option<i64>,
    transport_security: Option<RawTransportSecurity>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTransportSecurity {
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTls {
    ca_bundle: Option<String>,
    sni: Option<String>,
    // A string, so that YAML 1.1 spellings (`yes`, `on`, `True`) are seen and refused.
    insecure_skip_verify: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawGroup {
    namespace: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkload {
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOnboardingSettings {
    connected_over: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAgent {
    #[serde(skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<RawIdentity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sidecar: Option<RawSidecar>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<RawFiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settings: Option<RawSettings>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawIdentity {
    #[serde(skip_serializing_if = "Option::is_none")]
    join_token: Option<RawFileSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt: Option<RawJwt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<RawPlatform>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPlatform {
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata_urls: Option<RawMetadataUrls>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMetadataUrls {
    #[serde(skip_serializing_if = "Option::is_none")]
    aws: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gcp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    azure: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFileSource {
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawJwt {
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSidecar {
    #[serde(skip_serializing_if = "Option::is_none")]
    launcher: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    systemd: Option<RawSystemd>,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<RawProcess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    docker: Option<RawDocker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    readiness_url: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSystemd {
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProcess {
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid_file: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDocker {
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFiles {
    #[serde(skip_serializing_if = "Option::is_none")]
    root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hosts: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    retry: Option<RawRetry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_renewal: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRetry {
    #[serde(skip_serializing_if = "Option::is_none")]
    initial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------------------

impl Onboarding {
    /// Reads and validates an `OnboardingConfiguration` file.
    pub fn load(file: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotConfigured {
                    file: file.to_owned(),
                });
            }
            Err(source) => {
                return Err(Error::Read {
                    file: file.to_owned(),
                    source,
                });
            }
        };
        if !has_content(&text) {
            return Err(Error::NotConfigured {
                file: file.to_owned(),
            });
        }
        Self::parse(file, &text)
    }

    /// Validates an `OnboardingConfiguration`; `file` only names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let raw: RawOnboarding = parse_yaml(file, text)?;
        let v = Validator { file };
        v.api_version(
            raw.api_version.as_deref(),
            &ONBOARDING_API_VERSIONS,
            raw.kind.as_deref(),
            "OnboardingConfiguration",
        )?;

        let ep = raw.onboarding_endpoint.ok_or_else(|| {
            v.invalid(
                "onboardingEndpoint",
                "is required: set onboardingEndpoint.host to the onboarding endpoint's host name",
            )
        })?;
        let host = v.host("onboardingEndpoint.host", ep.host.as_deref())?;
        let port = match ep.port {
            None => defaults::PORT,
            Some(p) => u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                v.invalid("onboardingEndpoint.port", format!("{p} is not a port (1-65535)"))
            })?,
        };
        let tls = ep.transport_security.and_then(|t| t.tls);
        let (ca_bundle, sni, insecure_skip_verify) = match tls {
            None => (None, None, false),
            Some(tls) => {
                let ca_bundle = match tls.ca_bundle {
                    None => None,
                    Some(p) if p.trim().is_empty() => {
                        return Err(v.invalid(
                            "onboardingEndpoint.transportSecurity.tls.caBundle",
                            "is empty: give the path of a PEM CA bundle, or remove the field to use the system roots",
                        ));
                    }
                    Some(p) => Some(PathBuf::from(p)),
                };
                let sni = match tls.sni {
                    None => None,
                    Some(s) => Some(v.dns_name("onboardingEndpoint.transportSecurity.tls.sni", &s)?),
                };
                let insecure = match tls.insecure_skip_verify.as_deref() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(other) => {
                        return Err(v.invalid(
                            "onboardingEndpoint.transportSecurity.tls.insecureSkipVerify",
                            format!(
                                "{other:?} is not allowed: write exactly true to turn certificate verification off (never in production), or false"
                            ),
                        ));
                    }
                };
                (ca_bundle, sni, insecure)
            }
        };

        let group = raw.workload_group.ok_or_else(|| {
            v.invalid(
                "workloadGroup",
                "is required: set workloadGroup.namespace and workloadGroup.name to the WorkloadGroup this VM joins",
            )
        })?;
        let namespace = group.namespace.ok_or_else(|| {
            v.invalid(
                "workloadGroup.namespace",
                "is required: set it to the WorkloadGroup's namespace",
            )
        })?;
        if !gangplank_api::meta::is_dns1123_label(&namespace) {
            return Err(v.invalid(
                "workloadGroup.namespace",
                format!(
                    "{namespace:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
                ),
            ));
        }
        let name = group.name.ok_or_else(|| {
            v.invalid(
                "workloadGroup.name",
                "is required: set it to the WorkloadGroup's name",
            )
        })?;
        if !gangplank_api::meta::is_dns1123_subdomain(&name) || name.is_empty() {
            return Err(v.invalid(
                "workloadGroup.name",
                format!("{name:?} is not a WorkloadGroup name (lowercase letters, digits, '-' and '.')"),
            ));
        }

        let labels = raw.workload.and_then(|w| w.labels).unwrap_or_default();
        for (key, value) in &labels {
            if let Some(problem) = gangplank_api::meta::label_key_problem(key) {
                return Err(v.invalid(
                    &format!("workload.labels.{key}"),
                    format!("{key:?} is not a label key: {problem}"),
                ));
            }
            if let Some((prefix, owner)) = gangplank_api::names::reserved_label(key) {
                return Err(v.invalid(
                    &format!("workload.labels.{key}"),
                    format!(
                        "the prefix {prefix}/ is reserved for {owner}: the endpoint refuses it from a VM; remove it (the WorkloadGroup's template may set such labels)"
                    ),
                ));
            }
            if let Some(problem) = gangplank_api::meta::label_value_problem(value) {
                return Err(v.invalid(
                    &format!("workload.labels.{key}"),
                    format!("{value:?} is not a label value: {problem}"),
                ));
            }
        }

        let connected_over = match raw.settings.and_then(|s| s.connected_over).as_deref() {
            None | Some("VPC") => ConnectedOver::Vpc,
            Some("INTERNET") => ConnectedOver::Internet,
            Some(other) => {
                return Err(v.invalid(
                    "settings.connectedOver",
                    format!("{other:?} is not VPC or INTERNET"),
                ));
            }
        };

        Ok(Onboarding {
            endpoint: Endpoint {
                host,
                port,
                ca_bundle,
                sni,
                insecure_skip_verify,
            },
            workload_group: gangplank_api::NamespacedName::new(namespace, name),
            labels,
            connected_over,
        })
    }
}

impl Agent {
    /// Reads and validates an `AgentConfiguration` file. A missing file means defaults
    /// only when `missing_ok` (the default path); a path the user named must exist.
    pub fn load(file: &Path, missing_ok: bool) -> Result<Self> {
        match std::fs::read_to_string(file) {
            Ok(text) => Self::parse(file, &text),
            Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(file = %file.display(), "no agent configuration file, using defaults");
                Self::parse(file, "")
            }
            Err(source) => Err(Error::Read {
                file: file.to_owned(),
                source,
            }),
        }
    }

    /// Validates an `AgentConfiguration` (text without content, e.g. only the packaged
    /// comments, = all defaults); `file` only names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let raw: RawAgent = if !has_content(text) {
            RawAgent::default()
        } else {
            parse_yaml(file, text)?
        };
        let v = Validator { file };
        if raw.api_version.is_some() || raw.kind.is_some() {
            v.api_version(
                raw.api_version.as_deref(),
                &[AGENT_API_VERSION],
                raw.kind.as_deref(),
                "AgentConfiguration",
            )?;
        }

        let identity = v.identity(raw.identity)?;

        let files = raw.files.unwrap_or_default();
        let root = PathBuf::from(v.non_empty("files.root", files.root, defaults::ROOT)?);
        let sidecar = v.sidecar(raw.sidecar.unwrap_or_default(), &root)?;
        let files = Files {
            cluster_env: v.file_path(
                &root,
                "files.clusterEnv",
                files.cluster_env,
                defaults::CLUSTER_ENV,
            )?,
            mesh: v.file_path(&root, "files.mesh", files.mesh, defaults::MESH)?,
            root_cert: v.file_path(&root, "files.rootCert", files.root_cert, defaults::ROOT_CERT)?,
            token: v.file_path(&root, "files.token", files.token, defaults::TOKEN)?,
            hosts: v.file_path(&root, "files.hosts", files.hosts, defaults::HOSTS)?,
            state_dir: v.file_path(&root, "files.stateDir", files.state_dir, defaults::STATE_DIR)?,
            root,
        };

        let settings = raw.settings.unwrap_or_default();
        let retry = settings.retry.unwrap_or_default();
        let initial = v.duration(
            "settings.retry.initial",
            retry.initial.as_deref(),
            defaults::RETRY_INITIAL,
        )?;
        let max = v.duration("settings.retry.max", retry.max.as_deref(), defaults::RETRY_MAX)?;
        if initial.is_zero() || max < initial {
            return Err(v.invalid(
                "settings.retry",
                format!(
                    "initial {} and max {} must satisfy 0 < initial <= max",
                    humantime::format_duration(initial),
                    humantime::format_duration(max)
                ),
            ));
        }
        let token_renewal = settings.token_renewal.unwrap_or(defaults::TOKEN_RENEWAL);
        if !(token_renewal > 0.0 && token_renewal < 1.0) {
            return Err(v.invalid(
                "settings.tokenRenewal",
                format!(
                    "{token_renewal} is not a fraction between 0 and 1 (exclusive): e.g. 0.7 renews after 70% of the token's lifetime"
                ),
            ));
        }
        let heartbeat = match settings.heartbeat.as_deref() {
            None => None,
            Some(text) => {
                let d = v.duration("settings.heartbeat", Some(text), "")?;
                if d.is_zero() {
                    return Err(v.invalid(
                        "settings.heartbeat",
                        "must be longer than 0s; remove it to use the endpoint's interval",
                    ));
                }
                Some(d)
            }
        };

        Ok(Agent {
            identity,
            sidecar,
            files,
            settings: Settings {
                retry: Retry { initial, max },
                token_renewal,
                heartbeat,
            },
        })
    }

    /// The effective configuration as an `AgentConfiguration` document (defaults filled
    /// in), for `gangplank-agent config print`. `files` paths are shown as configured
    /// relative to `files.root`.
    pub fn to_yaml(&self) -> String {
        let unroot = |p: &Path| -> String {
            match p.strip_prefix(&self.files.root) {
                Ok(rel) => Path::new("/").join(rel).display().to_string(),
                Err(_) => p.display().to_string(),
            }
        };
        let identity = match &self.identity {
            Identity::JoinToken { file } => RawIdentity {
                join_token: Some(RawFileSource {
                    file: Some(file.display().to_string()),
                }),
                ..Default::default()
            },
            Identity::JwtFile { file } => RawIdentity {
                jwt: Some(RawJwt {
                    file: Some(file.display().to_string()),
                    command: None,
                }),
                ..Default::default()
            },
            Identity::JwtCommand { command } => RawIdentity {
                jwt: Some(RawJwt {
                    file: None,
                    command: Some(command.clone()),
                }),
                ..Default::default()
            },
            Identity::Platform { host, urls, key_file } => RawIdentity {
                platform: Some(RawPlatform {
                    host: Some(host.to_string()),
                    key_file: Some(key_file.display().to_string()),
                    metadata_urls: Some(RawMetadataUrls {
                        aws: Some(urls.aws.clone()),
                        gcp: Some(urls.gcp.clone()),
                        azure: Some(urls.azure.clone()),
                    }),
                }),
                ..Default::default()
            },
        };
        let raw = RawAgent {
            api_version: Some(AGENT_API_VERSION.to_owned()),
            kind: Some("AgentConfiguration".to_owned()),
            identity: Some(identity),
            sidecar: Some(self.sidecar.to_raw(&unroot)),
            files: Some(RawFiles {
                root: Some(self.files.root.display().to_string()),
                cluster_env: Some(unroot(&self.files.cluster_env)),
                mesh: Some(unroot(&self.files.mesh)),
                root_cert: Some(unroot(&self.files.root_cert)),
                token: Some(unroot(&self.files.token)),
                hosts: Some(unroot(&self.files.hosts)),
                state_dir: Some(unroot(&self.files.state_dir)),
            }),
            settings: Some(RawSettings {
                retry: Some(RawRetry {
                    initial: Some(humantime::format_duration(self.settings.retry.initial).to_string()),
                    max: Some(humantime::format_duration(self.settings.retry.max).to_string()),
                }),
                token_renewal: Some(self.settings.token_renewal),
                heartbeat: self
                    .settings
                    .heartbeat
                    .map(|d| humantime::format_duration(d).to_string()),
            }),
        };
        match serde_saphyr::to_string(&raw) {
            Ok(s) => s,
            // Serialising plain strings, lists and numbers cannot fail; keep a readable
            // fallback rather than a panic.
            Err(e) => format!("# cannot render the configuration: {e}\n"),
        }
    }
}

impl Sidecar {
    /// `sidecar` as `config print` shows it: every launcher's section, the chosen one's
    /// settings and the defaults of the others.
    fn to_raw(&self, unroot: &dyn Fn(&Path) -> String) -> RawSidecar {
        let mut systemd = RawSystemd {
            command: Some(defaults::SYSTEMCTL.to_owned()),
            unit: Some(defaults::UNIT.to_owned()),
        };
        let mut process = RawProcess {
            command: Some(defaults::PROCESS_COMMAND.map(str::to_owned).to_vec()),
            stop_timeout: Some(defaults::STOP_TIMEOUT.to_owned()),
            pid_file: Some(defaults::PID_FILE.to_owned()),
        };
        let mut docker = RawDocker {
            command: Some(defaults::DOCKER.to_owned()),
            image: None,
            name: Some(defaults::CONTAINER_NAME.to_owned()),
        };
        match &self.launcher {
            Launcher::Systemd(s) => {
                systemd = RawSystemd {
                    command: Some(s.command.clone()),
                    unit: Some(s.unit.clone()),
                };
            }
            Launcher::Process(p) => {
                process = RawProcess {
                    command: Some(p.command.clone()),
                    stop_timeout: Some(humantime::format_duration(p.stop_timeout).to_string()),
                    pid_file: Some(unroot(&p.pid_file)),
                };
            }
            Launcher::Docker(d) => {
                docker = RawDocker {
                    command: Some(d.command.clone()),
                    image: Some(d.image.clone()),
                    name: Some(d.name.clone()),
                };
            }
        }
        RawSidecar {
            launcher: Some(self.launcher.as_str().to_owned()),
            systemd: Some(systemd),
            process: Some(process),
            docker: Some(docker),
            proxy_user: Some(self.proxy_user.clone()),
            readiness_url: Some(
                self.readiness_url
                    .as_ref()
                    .map(|u| u.as_str().to_owned())
                    .unwrap_or_default(),
            ),
        }
    }
}

impl Default for Agent {
    fn default() -> Self {
        match Agent::parse(Path::new("<defaults>"), "") {
            Ok(a) => a,
            // The defaults are constants validated by the tests.
            Err(e) => unreachable!("built-in defaults are invalid: {e}"),
        }
    }
}

fn parse_yaml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T> {
    gangplank_api::yaml::parse(text).map_err(|e| Error::Syntax {
        file: file.to_owned(),
        line: e.line,
        column: e.column,
        field: e.field,
        message: e.message,
    })
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Invalid {
            file: self.file.to_owned(),
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn api_version(
        &self,
        api_version: Option<&str>,
        accepted: &[&str],
        kind: Option<&str>,
        want_kind: &str,
    ) -> Result<()> {
        match api_version {
            Some(a) if accepted.contains(&a) => {}
            Some(a) => {
                return Err(self.invalid(
                    "apiVersion",
                    format!("{a:?} is not supported: use {}", accepted.join(" or ")),
                ));
            }
            None => {
                return Err(self.invalid(
                    "apiVersion",
                    format!("is required: use {}", accepted.join(" or ")),
                ));
            }
        }
        match kind {
            Some(k) if k == want_kind => Ok(()),
            Some(k) => Err(self.invalid(
                "kind",
                format!("{k:?} is not {want_kind}: this file must hold a {want_kind}"),
            )),
            None => Err(self.invalid("kind", format!("is required: use {want_kind}"))),
        }
    }

    fn host(&self, field: &str, host: Option<&str>) -> Result<String> {
        let host = host.map(str::trim).unwrap_or_default();
        if host.is_empty() {
            return Err(self.invalid(
                field,
                "is required: set it to the onboarding endpoint's host name or IP address",
            ));
        }
        if host.contains("://") || host.contains('/') {
            return Err(self.invalid(
                field,
                format!(
                    "{host:?} is not a host: write only the host name (no scheme or path); the port goes in onboardingEndpoint.port"
                ),
            ));
        }
        if host.parse::<std::net::IpAddr>().is_ok() {
            return Ok(host.to_owned());
        }
        self.dns_name(field, host)
    }

    fn dns_name(&self, field: &str, name: &str) -> Result<String> {
        let lower = name.to_ascii_lowercase();
        let ok = !lower.is_empty()
            && lower.len() <= 253
            && lower.trim_end_matches('.').split('.').all(|p| {
                !p.is_empty()
                    && p.len() <= 63
                    && p.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !p.starts_with('-')
                    && !p.ends_with('-')
            });
        if ok {
            Ok(name.to_owned())
        } else if name.contains(':') {
            Err(self.invalid(
                field,
                format!("{name:?} is not a host name: the port goes in onboardingEndpoint.port"),
            ))
        } else {
            Err(self.invalid(field, format!("{name:?} is not a DNS name or IP address")))
        }
    }

    fn identity(&self, raw: Option<RawIdentity>) -> Result<Identity> {
        let Some(raw) = raw else {
            return Ok(Identity::JoinToken {
                file: PathBuf::from(defaults::JOIN_TOKEN_FILE),
            });
        };
        if let Some(p) = raw.platform {
            if raw.join_token.is_some() || raw.jwt.is_some() {
                return Err(self.invalid(
                    "identity",
                    "sets platform together with joinToken or jwt: keep exactly one",
                ));
            }
            return self.platform(p);
        }
        match (raw.join_token, raw.jwt) {
            (Some(_), Some(_)) => {
                Err(self.invalid("identity", "sets both joinToken and jwt: keep exactly one"))
            }
            (None, None) => Err(self.invalid(
                "identity",
                "is empty: set identity.joinToken.file, identity.jwt.file / identity.jwt.command or identity.platform.host",
            )),
            (Some(t), None) => {
                let file = t.file.filter(|f| !f.trim().is_empty()).ok_or_else(|| {
                    self.invalid(
                        "identity.joinToken.file",
                        "is required: the file holding the join token from `gangplank token create`",
                    )
                })?;
                Ok(Identity::JoinToken {
                    file: PathBuf::from(file),
                })
            }
            (None, Some(j)) => match (j.file, j.command) {
                (Some(_), Some(_)) => {
                    Err(self.invalid("identity.jwt", "sets both file and command: keep exactly one"))
                }
                (None, None) => Err(self.invalid(
                    "identity.jwt",
                    "needs file (a path holding the JWT) or command (argv printing it)",
                )),
                (Some(f), None) if f.trim().is_empty() => Err(self.invalid(
                    "identity.jwt.file",
                    "is empty: give the path of the file holding the JWT",
                )),
                (Some(f), None) => Ok(Identity::JwtFile {
                    file: PathBuf::from(f),
                }),
                (None, Some(c)) => Ok(Identity::JwtCommand {
                    command: self.argv("identity.jwt.command", Some(c), &[])?,
                }),
            },
        }
    }

    /// Every launcher's section is checked, whichever launcher is chosen; the chosen one's
    /// settings go into [`Launcher`].
    fn sidecar(&self, raw: RawSidecar, root: &Path) -> Result<Sidecar> {
        enum Kind {
            Systemd,
            Docker,
            Process,
        }
        let kind = match raw.launcher.as_deref().unwrap_or(defaults::LAUNCHER) {
            "systemd" => Kind::Systemd,
            "docker" => Kind::Docker,
            "process" => Kind::Process,
            other => {
                return Err(self.invalid(
                    "sidecar.launcher",
                    format!("{other:?} is not a launcher: use systemd, docker or process"),
                ));
            }
        };
        let systemd = raw.systemd.unwrap_or_default();
        let systemd = Systemd {
            command: self.non_empty("sidecar.systemd.command", systemd.command, defaults::SYSTEMCTL)?,
            unit: self.non_empty("sidecar.systemd.unit", systemd.unit, defaults::UNIT)?,
        };
        let process = raw.process.unwrap_or_default();
        let process = Process {
            command: self.argv(
                "sidecar.process.command",
                process.command,
                &defaults::PROCESS_COMMAND,
            )?,
            stop_timeout: self.duration(
                "sidecar.process.stopTimeout",
                process.stop_timeout.as_deref(),
                defaults::STOP_TIMEOUT,
            )?,
            pid_file: self.file_path(
                root,
                "sidecar.process.pidFile",
                process.pid_file,
                defaults::PID_FILE,
            )?,
        };
        let docker = raw.docker.unwrap_or_default();
        let docker_command = self.non_empty("sidecar.docker.command", docker.command, defaults::DOCKER)?;
        let docker_image = match docker.image {
            Some(i) if i.trim().is_empty() => {
                return Err(self.invalid(
                    "sidecar.docker.image",
                    "is empty: set it to your mesh's proxy image, e.g. docker.io/istio/proxyv2:<istio version>",
                ));
            }
            i => i,
        };
        let docker_name = self.non_empty("sidecar.docker.name", docker.name, defaults::CONTAINER_NAME)?;
        let launcher = match kind {
            Kind::Systemd => Launcher::Systemd(systemd),
            Kind::Process => Launcher::Process(process),
            Kind::Docker => Launcher::Docker(Docker {
                command: docker_command,
                image: docker_image.ok_or_else(|| {
                    self.invalid(
                        "sidecar.docker.image",
                        "is required when sidecar.launcher is docker: set it to the proxy image of your mesh's Istio version, e.g. docker.io/istio/proxyv2:1.27.1",
                    )
                })?,
                name: docker_name,
            }),
        };
        let proxy_user = self.non_empty("sidecar.proxyUser", raw.proxy_user, defaults::PROXY_USER)?;
        let readiness_url = match raw.readiness_url {
            Some(u) if u.trim().is_empty() => None,
            Some(u) => Some(self.readiness_url(&u)?),
            None => match launcher {
                Launcher::Systemd(_) | Launcher::Docker(_) => {
                    Some(self.readiness_url(defaults::READINESS_URL)?)
                }
                Launcher::Process(_) => None,
            },
        };
        Ok(Sidecar {
            launcher,
            proxy_user,
            readiness_url,
        })
    }

    fn readiness_url(&self, url: &str) -> Result<readiness::Url> {
        readiness::Url::parse(url).map_err(|e| {
            self.invalid(
                "sidecar.readinessUrl",
                format!("{e}; or \"\" to turn the probe off"),
            )
        })
    }

    fn platform(&self, raw: RawPlatform) -> Result<Identity> {
        let host = raw
            .host
            .as_deref()
            .unwrap_or("auto")
            .parse()
            .map_err(|e: String| self.invalid("identity.platform.host", e))?;
        let key_file = self.non_empty(
            "identity.platform.keyFile",
            raw.key_file,
            defaults::INSTANCE_KEY_FILE,
        )?;
        let mut urls = gangplank_identity::detect::MetadataUrls::default();
        if let Some(u) = raw.metadata_urls {
            for (field, value, slot) in [
                ("aws", u.aws, &mut urls.aws),
                ("gcp", u.gcp, &mut urls.gcp),
                ("azure", u.azure, &mut urls.azure),
            ] {
                if let Some(v) = value {
                    if !(v.starts_with("http://") || v.starts_with("https://")) {
                        return Err(self.invalid(
                            &format!("identity.platform.metadataUrls.{field}"),
                            format!("{v:?} is not an http(s) URL"),
                        ));
                    }
                    *slot = v;
                }
            }
        }
        Ok(Identity::Platform {
            host,
            urls,
            key_file: PathBuf::from(key_file),
        })
    }

    fn non_empty(&self, field: &str, value: Option<String>, default: &str) -> Result<String> {
        match value {
            None => Ok(default.to_owned()),
            Some(v) if v.trim().is_empty() => Err(self.invalid(
                field,
                format!("is empty: remove it to use the default {default:?}, or set a value"),
            )),
            Some(v) => Ok(v),
        }
    }

    fn argv(&self, field: &str, value: Option<Vec<String>>, default: &[&str]) -> Result<Vec<String>> {
        match value {
            None => Ok(default.iter().map(|s| (*s).to_owned()).collect()),
            Some(argv) if argv.first().is_none_or(|p| p.trim().is_empty()) => Err(self.invalid(
                field,
                "needs a program: write a list like [\"/usr/local/bin/program\", \"arg\"]",
            )),
            Some(argv) => Ok(argv),
        }
    }

    fn duration(&self, field: &str, value: Option<&str>, default: &str) -> Result<Duration> {
        let text = value.unwrap_or(default);
        humantime::parse_duration(text).map_err(|e| {
            self.invalid(
                field,
                format!("{text:?} is not a duration ({e}): write e.g. 500ms, 10s or 1m"),
            )
        })
    }

    fn file_path(&self, root: &Path, field: &str, value: Option<String>, default: &str) -> Result<PathBuf> {
        let value = self.non_empty(field, value, default)?;
        let path = Path::new(&value);
        if !path.is_absolute() {
            return Err(self.invalid(
                field,
                format!(
                    "{value:?} is not absolute: write the path the file has on the host, e.g. {default}; files.root is prepended"
                ),
            ));
        }
        let mut joined = root.to_path_buf();
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => joined.push(part),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(self.invalid(
                        field,
                        format!("{value:?} must not contain '..': files stay inside files.root"),
                    ));
                }
            }
        }
        Ok(joined)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/gangplank/onboarding.yaml";

    fn onboarding(text: &str) -> Result<Onboarding> {
        Onboarding::parse(Path::new(FILE), text)
    }

    fn err(text: &str) -> String {
        match onboarding(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    const SEED: &str = "apiVersion: config.agent.onboarding.tetrate.io/v1alpha1
kind: OnboardingConfiguration
onboardingEndpoint:                            # connect to
  host: onboarding-endpoint.your-company.corp
workloadGroup:                                 # join to
  namespace: bookinfo
  name: ratings
";

    #[test]
    fn seed_config_parses_verbatim_with_defaults() {
        let c = onboarding(SEED).expect("seed config");
        assert_eq!(c.endpoint.host, "onboarding-endpoint.your-company.corp");
        assert_eq!(c.endpoint.port, 15443);
        assert_eq!(c.endpoint.ca_bundle, None);
        assert_eq!(c.endpoint.sni, None);
        assert!(!c.endpoint.insecure_skip_verify);
        assert_eq!(
            c.workload_group,
            gangplank_api::NamespacedName::new("bookinfo", "ratings")
        );
        assert!(c.labels.is_empty());
        assert_eq!(c.connected_over, ConnectedOver::Vpc);
        assert_eq!(
            c.endpoint.to_string(),
            "onboarding-endpoint.your-company.corp:15443"
        );
    }

    #[test]
    fn our_api_version_is_accepted_too() {
        let text = SEED.replace(
            "config.agent.onboarding.tetrate.io/v1alpha1",
            "onboarding.gangplank.dev/v1alpha1",
        );
        assert!(onboarding(&text).is_ok());
        let e = err(&SEED.replace("tetrate.io/v1alpha1", "tetrate.io/v1"));
        assert!(e.contains(FILE) && e.contains("apiVersion"), "{e}");
    }

    #[test]
    fn every_field_parses() {
        let c = onboarding(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: OnboardingConfiguration
onboardingEndpoint:
  host: 10.0.0.7
  port: 8443
  transportSecurity:
    tls:
      caBundle: /etc/gangplank/ca.pem
      sni: endpoint.example.com
      insecureSkipVerify: false
workloadGroup:
  namespace: bookinfo
  name: ratings
workload:
  labels:
    version: v2
    example.com/tier: backend
settings:
  connectedOver: INTERNET
",
        )
        .expect("full config");
        assert_eq!(c.endpoint.host, "10.0.0.7");
        assert_eq!(c.endpoint.port, 8443);
        assert_eq!(c.endpoint.ca_bundle, Some(PathBuf::from("/etc/gangplank/ca.pem")));
        assert_eq!(c.endpoint.sni.as_deref(), Some("endpoint.example.com"));
        assert!(!c.endpoint.insecure_skip_verify);
        assert_eq!(c.labels.get("version").map(String::as_str), Some("v2"));
        assert_eq!(
            c.labels.get("example.com/tier").map(String::as_str),
            Some("backend")
        );
        assert_eq!(c.connected_over, ConnectedOver::Internet);
    }

    #[test]
    fn insecure_only_when_literally_true() {
        let with = |v: &str| {
            SEED.replace(
                "  host: onboarding-endpoint.your-company.corp\n",
                &format!("  host: h\n  transportSecurity:\n    tls:\n      insecureSkipVerify: {v}\n"),
            )
        };
        let c = onboarding(&with("true")).expect("true");
        assert!(c.endpoint.insecure_skip_verify);
        for bad in ["yes", "True", "on", "1", "\"y\""] {
            let e = err(&with(bad));
            assert!(
                e.starts_with(FILE)
                    && e.contains("onboardingEndpoint.transportSecurity.tls.insecureSkipVerify")
                    && e.contains("write exactly true"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn bad_yaml_names_the_file_and_line() {
        let e = err("apiVersion: onboarding.gangplank.dev/v1alpha1\nkind: [OnboardingConfiguration\n");
        assert!(e.starts_with(&format!("{FILE}:")), "{e}");
        assert!(e.contains(":2:"), "line number missing: {e}");
    }

    #[test]
    fn unknown_field_is_refused_with_its_path() {
        let e = err(&SEED.replace("  host:", "  prot: 1\n  host:"));
        assert!(e.starts_with(FILE), "{e}");
        assert!(e.contains("onboardingEndpoint.prot"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        let e = err(&format!("{SEED}extra: 1\n"));
        assert!(e.contains("extra") && e.contains("unknown field"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = err(&SEED.replace(
            "  host: onboarding-endpoint.your-company.corp",
            "  host: h\n  port: abc",
        ));
        assert!(
            e.starts_with(FILE) && e.contains("onboardingEndpoint.port"),
            "{e}"
        );
    }

    #[test]
    fn missing_workload_group_is_refused() {
        let text: String = SEED.lines().take(4).map(|l| format!("{l}\n")).collect();
        let e = err(&text);
        assert!(
            e.starts_with(FILE) && e.contains("workloadGroup") && e.contains("required"),
            "{e}"
        );
        let e = err(&SEED.replace("  name: ratings\n", ""));
        assert!(e.contains("workloadGroup.name") && e.contains("required"), "{e}");
        let e = err(&SEED.replace("namespace: bookinfo", "namespace: Book_Info"));
        assert!(
            e.contains("workloadGroup.namespace") && e.contains("Book_Info"),
            "{e}"
        );
    }

    #[test]
    fn bad_port_is_refused() {
        for port in ["70000", "0", "-1"] {
            let e = err(&SEED.replace(
                "  host: onboarding-endpoint.your-company.corp",
                &format!("  host: h\n  port: {port}"),
            ));
            assert_eq!(
                e,
                format!("{FILE}: onboardingEndpoint.port: {port} is not a port (1-65535)")
            );
        }
    }

    #[test]
    fn bad_host_is_refused() {
        for host in ["https://h.example", "h.example:15443", "\"\""] {
            let e = err(&SEED.replace("onboarding-endpoint.your-company.corp", host));
            assert!(e.contains("onboardingEndpoint.host"), "{host}: {e}");
        }
    }

    #[test]
    fn bad_connected_over_is_refused() {
        let e = err(&format!("{SEED}settings:\n  connectedOver: vpc\n"));
        assert_eq!(
            e,
            format!("{FILE}: settings.connectedOver: \"vpc\" is not VPC or INTERNET")
        );
    }

    #[test]
    fn reserved_labels_are_refused_before_the_endpoint_would() {
        let e = err(&format!(
            "{SEED}workload:\n  labels:\n    security.istio.io/tlsMode: disabled\n"
        ));
        assert!(
            e.contains("workload.labels.security.istio.io/tlsMode") && e.contains("reserved for Istio"),
            "{e}"
        );
    }

    #[test]
    fn bad_labels_are_refused() {
        let e = err(&format!("{SEED}workload:\n  labels:\n    \"-bad\": x\n"));
        assert!(
            e.contains("workload.labels.-bad") && e.contains("label key"),
            "{e}"
        );
        let e = err(&format!("{SEED}workload:\n  labels:\n    ok: \"has space\"\n"));
        assert!(
            e.contains("workload.labels.ok") && e.contains("label value"),
            "{e}"
        );
    }

    #[test]
    fn wrong_kind_is_refused() {
        let e = err(&SEED.replace("kind: OnboardingConfiguration", "kind: AgentConfiguration"));
        assert!(e.contains("kind") && e.contains(FILE), "{e}");
    }

    #[test]
    fn unreadable_file_names_the_file() {
        let e = Onboarding::load(Path::new("/nonexistent/onboarding.yaml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/onboarding.yaml"), "{e}");
    }

    const AGENT_FILE: &str = "/etc/gangplank/agent.yaml";

    fn agent(text: &str) -> Result<Agent> {
        Agent::parse(Path::new(AGENT_FILE), text)
    }

    fn agent_err(text: &str) -> String {
        match agent(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn platform_identity_parses_validates_and_prints() {
        use gangplank_identity::detect::{Host, MetadataUrls, Platform};
        let a = agent("identity:\n  platform: {host: auto}\n").expect("auto");
        assert_eq!(
            a.identity,
            Identity::Platform {
                host: Host::Auto,
                urls: MetadataUrls::default(),
                key_file: PathBuf::from(defaults::INSTANCE_KEY_FILE),
            }
        );
        let a = agent(
            "identity:\n  platform:\n    host: aws-ec2\n    keyFile: /var/lib/k.pem\n    metadataUrls: {aws: \"http://127.0.0.1:9\"}\n",
        )
        .expect("aws");
        let Identity::Platform { host, urls, key_file } = &a.identity else {
            panic!("{:?}", a.identity);
        };
        assert_eq!(*host, Host::Fixed(Platform::Aws));
        assert_eq!(urls.aws, "http://127.0.0.1:9");
        assert_eq!(key_file, &PathBuf::from("/var/lib/k.pem"));
        assert_eq!(agent(&a.to_yaml()).expect("round trip").identity, a.identity);

        let e = agent_err("identity:\n  platform: {host: cloud}\n");
        assert!(
            e.contains("identity.platform.host") && e.contains("auto, aws-ec2, gcp-gce or azure-vm"),
            "{e}"
        );
        let e = agent_err("identity:\n  platform: {host: auto}\n  jwt: {file: /x}\n");
        assert!(e.contains("keep exactly one"), "{e}");
        let e = agent_err("identity:\n  platform: {metadataUrls: {gcp: metadata.internal}}\n");
        assert!(e.contains("identity.platform.metadataUrls.gcp"), "{e}");
    }

    #[test]
    fn agent_defaults() {
        let a = agent("").expect("defaults");
        assert_eq!(
            a.identity,
            Identity::JoinToken {
                file: PathBuf::from("/etc/gangplank/join-token")
            }
        );
        assert_eq!(
            a.sidecar.launcher,
            Launcher::Systemd(Systemd {
                command: "systemctl".into(),
                unit: "istio".into()
            })
        );
        assert_eq!(a.sidecar.proxy_user, "istio-proxy");
        let docker = agent("sidecar:\n  launcher: docker\n  docker: {image: img}\n").expect("docker");
        let Launcher::Docker(docker) = docker.sidecar.launcher else {
            panic!("{:?}", docker.sidecar.launcher);
        };
        assert_eq!(docker.name, "istio-proxy");
        assert_eq!(docker.command, "docker");
        assert_eq!(docker.image, "img");
        assert_eq!(
            a.sidecar.readiness_url.as_ref().map(readiness::Url::as_str),
            Some("http://127.0.0.1:15021/healthz/ready")
        );
        assert_eq!(a.files.root, PathBuf::from("/"));
        assert_eq!(
            a.files.cluster_env,
            PathBuf::from("/var/lib/istio/envoy/cluster.env")
        );
        assert_eq!(a.files.mesh, PathBuf::from("/etc/istio/config/mesh"));
        assert_eq!(a.files.root_cert, PathBuf::from("/etc/certs/root-cert.pem"));
        assert_eq!(
            a.files.token,
            PathBuf::from("/var/run/secrets/tokens/istio-token")
        );
        assert_eq!(a.files.hosts, PathBuf::from("/etc/hosts"));
        assert_eq!(a.settings.retry.initial, Duration::from_secs(1));
        assert_eq!(a.settings.retry.max, Duration::from_secs(30));
        assert_eq!(a.settings.token_renewal, 0.7);
        assert_eq!(a.settings.heartbeat, None);
        assert_eq!(a, Agent::default());
    }

    #[test]
    fn agent_full_config_and_root() {
        let a = agent(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: AgentConfiguration
identity:
  jwt:
    command: [/usr/local/bin/get-jwt, --audience, plane]
sidecar:
  launcher: process
  process:
    command: [/bin/sleep, \"1000\"]
    stopTimeout: 2s
  proxyUser: \"1337\"
files:
  root: /tmp/vm
  token: /tok/istio-token
settings:
  retry: {initial: 200ms, max: 5s}
  tokenRenewal: 0.5
  heartbeat: 3s
",
        )
        .expect("agent config");
        assert_eq!(
            a.identity,
            Identity::JwtCommand {
                command: vec![
                    "/usr/local/bin/get-jwt".into(),
                    "--audience".into(),
                    "plane".into()
                ]
            }
        );
        let Launcher::Process(process) = &a.sidecar.launcher else {
            panic!("{:?}", a.sidecar.launcher);
        };
        assert_eq!(process.command, vec!["/bin/sleep", "1000"]);
        assert_eq!(process.stop_timeout, Duration::from_secs(2));
        assert_eq!(
            process.pid_file,
            PathBuf::from("/tmp/vm/var/run/gangplank/sidecar.pid")
        );
        assert_eq!(a.sidecar.readiness_url, None);
        assert_eq!(a.sidecar.proxy_user, "1337");
        assert_eq!(a.files.token, PathBuf::from("/tmp/vm/tok/istio-token"));
        assert_eq!(a.files.hosts, PathBuf::from("/tmp/vm/etc/hosts"));
        assert_eq!(a.settings.retry.initial, Duration::from_millis(200));
        assert_eq!(a.settings.token_renewal, 0.5);
        assert_eq!(a.settings.heartbeat, Some(Duration::from_secs(3)));
    }

    #[test]
    fn config_print_round_trips() {
        let a = agent(
            "identity:\n  jwt:\n    file: /etc/jwt\nfiles:\n  root: /tmp/vm\nsettings:\n  heartbeat: 5s\n",
        )
        .expect("agent config");
        let printed = a.to_yaml();
        assert!(printed.contains("tokenRenewal: 0.7"), "{printed}");
        assert!(printed.contains("/var/lib/istio/envoy/cluster.env"), "{printed}");
        let again = agent(&printed).expect("printed config parses");
        assert_eq!(again, a);
        let defaults = Agent::default().to_yaml();
        assert_eq!(
            agent(&defaults).expect("printed defaults parse"),
            Agent::default()
        );
    }

    #[test]
    fn agent_malformed_cases_name_field_and_file() {
        let cases: &[(&str, &str)] = &[
            ("sidecar:\n  launcher: podman\n", "sidecar.launcher"),
            ("sidecar:\n  lanucher: process\n", "sidecar.lanucher"),
            ("sidecar:\n  launcher: docker\n", "sidecar.docker.image"),
            ("settings:\n  tokenRenewal: 1.5\n", "settings.tokenRenewal"),
            ("settings:\n  tokenRenewal: 0\n", "settings.tokenRenewal"),
            (
                "settings:\n  retry:\n    initial: soon\n",
                "settings.retry.initial",
            ),
            (
                "settings:\n  retry:\n    initial: 1m\n    max: 1s\n",
                "settings.retry",
            ),
            (
                "identity:\n  joinToken: {file: a}\n  jwt: {file: b}\n",
                "identity",
            ),
            ("identity:\n  jwt: {}\n", "identity.jwt"),
            ("identity:\n  jwt:\n    command: []\n", "identity.jwt.command"),
            ("identity:\n  aws: {}\n", "identity.aws"),
            ("files:\n  token: relative/token\n", "files.token"),
            ("files:\n  mesh: /etc/../../escape\n", "files.mesh"),
            (
                "sidecar:\n  process: {pidFile: sidecar.pid}\n",
                "sidecar.process.pidFile",
            ),
            ("apiVersion: v1\nkind: AgentConfiguration\n", "apiVersion"),
            (
                "kind: OnboardingConfiguration\napiVersion: onboarding.gangplank.dev/v1alpha1\n",
                "kind",
            ),
        ];
        for (text, field) in cases {
            let e = agent_err(text);
            assert!(e.starts_with(AGENT_FILE), "{text}: {e}");
            assert!(e.contains(field), "{text}: expected {field} in {e}");
        }
    }

    #[test]
    fn missing_agent_file_is_defaults_only_when_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.yaml");
        assert_eq!(Agent::load(&path, true).expect("defaults"), Agent::default());
        let e = Agent::load(&path, false).unwrap_err().to_string();
        assert!(e.contains("agent.yaml"), "{e}");
    }

    /// The files the packages ship are commented examples: the onboarding one means "not
    /// configured yet" (exit 78, which the unit neither restarts on nor counts as failed),
    /// the agent one means every default. An example uncommented is a valid configuration.
    #[test]
    fn the_packaged_examples_mean_not_configured_and_defaults_and_parse_when_uncommented() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packaged = |name: &str| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../packaging")
                .join(name);
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let onboarding_example = packaged("onboarding.yaml");
        let path = dir.path().join("onboarding.yaml");
        for text in [onboarding_example.as_str(), "", "\n  \n# only a comment\n"] {
            std::fs::write(&path, text).expect("write");
            let e = Onboarding::load(&path).unwrap_err();
            assert!(matches!(e, Error::NotConfigured { .. }), "{text:?}: {e}");
            assert_eq!(e.exit_code(), EXIT_NOT_CONFIGURED);
            assert!(e.to_string().contains("not configured yet"), "{e}");
        }
        let missing = Onboarding::load(&dir.path().join("absent.yaml")).unwrap_err();
        assert_eq!(missing.exit_code(), EXIT_NOT_CONFIGURED, "{missing}");
        // Anything else in the file is parsed, and its errors are exit 2.
        std::fs::write(&path, "kind: OnboardingConfiguration\n").expect("write");
        assert_eq!(Onboarding::load(&path).unwrap_err().exit_code(), 2);

        // The examples: a prose header, a line `#`, then the example, each line commented.
        let uncomment = |text: &str| {
            text.lines()
                .skip_while(|l| *l != "#")
                .skip(1)
                .map(|l| l.strip_prefix("# ").unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let uncommented = uncomment(&onboarding_example);
        let parsed = Onboarding::parse(&path, &uncommented)
            .unwrap_or_else(|e| panic!("the example, uncommented:\n{uncommented}\n{e}"));
        assert_eq!(parsed.workload_group.to_string(), "bookinfo/ratings");

        let agent_example = packaged("agent.yaml");
        assert_eq!(
            Agent::parse(&path, &agent_example).expect("defaults"),
            Agent::default()
        );
        let uncommented = uncomment(&agent_example);
        Agent::parse(&path, &uncommented)
            .unwrap_or_else(|e| panic!("the example, uncommented:\n{uncommented}\n{e}"));
    }
}
