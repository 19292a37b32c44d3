//! The endpoint's configuration: parsed from YAML, then validated into [`Config`], which the
//! rest of the endpoint trusts. Defaults live here and nowhere else (`gangplank-endpoint config print`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gangplank_identity::jwt::IssuerConfig;
use serde::{Deserialize, Serialize};

/// The endpoint configuration file, as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct File {
    /// `onboarding.gangplank.dev/v1alpha1`.
    pub api_version: String,
    /// `EndpointConfiguration`.
    pub kind: String,
    /// Identifies this onboarding plane; credentials must be bound to it (JWT audience).
    pub plane_id: String,
    /// gRPC + HTTPS listen address.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Health and Prometheus metrics listen address (plain HTTP).
    #[serde(default = "defaults::monitoring")]
    pub monitoring_listen: SocketAddr,
    /// The serving certificate.
    pub tls: Tls,
    /// Where resources live.
    pub registry: Registry,
    /// Where the endpoint keeps its signing key (sidecar tokens, sessions, nonces).
    pub state_dir: PathBuf,
    /// This replica's name, recorded on the entries whose agents it serves.
    #[serde(default)]
    pub replica: Option<String>,
    /// Istio control plane facts used to render the sidecar's boot files.
    #[serde(default)]
    pub mesh: Mesh,
    /// The `istio-token` the endpoint mints for sidecars.
    #[serde(default)]
    pub sidecar_token: SidecarToken,
    /// Which credentials the endpoint accepts.
    #[serde(default)]
    pub identities: Identities,
    /// Registration lifecycle.
    #[serde(default)]
    pub workloads: Workloads,
    /// Limits on the TLS connections agents and other clients hold.
    #[serde(default)]
    pub connections: Connections,
    /// The agent's packages, served at `/install/` for VMs with no other way to get them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<Install>,
}

/// `install`: a folder of the agent's packages (`.deb` and `.rpm`, x86_64 and aarch64, as
/// `cargo deb` and `cargo generate-rpm` name them), loaded at start and served on the TLS
/// port at `/install/` without a credential (packages hold no secret, and a VM fetching one
/// has none yet).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Install {
    /// The folder; read once at start (restart the endpoint to serve new packages).
    pub directory: PathBuf,
}

/// `connections`: what one replica holds at most, and for how long a connection may do
/// nothing. Sized for 10,000+ VMs per replica (each agent holds one connection); the
/// process's descriptor limit must be above `max` (the endpoint warns at start when not).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Connections {
    /// Connections held at once (handshaking or open); one accepted past it is closed at once.
    #[serde(default = "defaults::max_connections")]
    pub max: usize,
    /// TLS handshakes under way at once; a connection accepted past it waits for a slot
    /// (within `handshakeTimeout`, counted from its accept) and is closed if none comes, so a
    /// burst of reconnecting VMs is served in turn and a slow-handshake flood cannot starve
    /// the connections already open.
    #[serde(default = "defaults::max_handshakes")]
    pub max_handshakes: usize,
    /// How long a client may take to finish its TLS handshake.
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a connection may stay open with no call in flight. Agents keep their
    /// Session stream open, so they are never idle.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            max: defaults::max_connections(),
            max_handshakes: defaults::max_handshakes(),
            handshake_timeout: defaults::handshake_timeout(),
            idle_timeout: defaults::idle_timeout(),
        }
    }
}

/// `tls`: certificate files (reloaded on change), or a dev certificate generated at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Generate a self-signed dev CA and certificate into the state dir. Never for production.
    #[serde(default)]
    pub dev: bool,
    /// Names the dev certificate is valid for (besides `localhost` and 127.0.0.1).
    #[serde(default)]
    pub dev_names: Vec<String>,
}

/// `registry`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registry {
    /// A folder of Kubernetes-style YAML files (readable by istiod as `fs://`).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub directory: PathBuf,
    /// The Kubernetes API (`gangplank_registry::kube`); boot inputs then come from the cluster
    /// too (TokenRequest, `istio-ca-root-cert`, `istio[-<rev>]`). Exclusive with `directory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Kubernetes>,
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// `registry.kubernetes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Kubernetes {
    /// A kubeconfig file; absent: in-cluster config, else `$KUBECONFIG` / `~/.kube/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// How long start-up waits for the first listing of groups, policies and join tokens.
    #[serde(default = "defaults::cache_timeout", with = "humantime_serde")]
    pub cache_timeout: Duration,
    /// The endpoint's own namespace, where replica and sweeper Leases live; default: the
    /// pod's namespace (`POD_NAMESPACE`, else the service account's), else `gangplank-system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// How long a replica's Lease lasts without renewal (renewed every third of it).
    #[serde(default = "defaults::lease_duration", with = "humantime_serde")]
    pub lease_duration: Duration,
}

/// `mesh`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mesh {
    /// Istio's namespace.
    #[serde(default = "defaults::istio_namespace")]
    pub istio_namespace: String,
    /// istiod's revision ("" for the default).
    #[serde(default)]
    pub revision: String,
    /// The cluster ID istiod runs as (`ISTIO_META_CLUSTER_ID`). When unset: with
    /// `registry.kubernetes`, read as `istioctl x workload entry configure` reads it
    /// (`global.multiCluster.clusterName` in ConfigMap `istio-sidecar-injector[-<rev>]`);
    /// otherwise `Kubernetes`, istiod's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// A MeshConfig YAML (the `mesh` key of the `istio` ConfigMap); empty when absent.
    #[serde(default)]
    pub mesh_config_file: Option<PathBuf>,
    /// The mesh's root certificate (`istio-ca-root-cert`), PEM.
    #[serde(default)]
    pub root_cert_file: Option<PathBuf>,
    /// The address VMs reach istiod at (east-west gateway), written to `hosts`.
    #[serde(default)]
    pub istiod_ip: Option<IpAddr>,
}

impl Default for Mesh {
    fn default() -> Self {
        Self {
            istio_namespace: defaults::istio_namespace(),
            revision: String::new(),
            cluster_id: None,
            mesh_config_file: None,
            root_cert_file: None,
            istiod_ip: None,
        }
    }
}

/// `sidecarToken`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarToken {
    /// Lifetime of each `istio-token`.
    #[serde(default = "defaults::token_lifetime", with = "humantime_serde")]
    pub lifetime: Duration,
    /// The `iss` of minted tokens; istiod is told to trust it (JWT_RULE). Defaults to
    /// `https://<first dev name or localhost>:<the port the endpoint listens on>`.
    #[serde(default)]
    pub issuer: Option<String>,
}

impl Default for SidecarToken {
    fn default() -> Self {
        Self {
            lifetime: defaults::token_lifetime(),
            issuer: None,
        }
    }
}

/// `identities`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identities {
    /// Accept join tokens (`gangplank token create`).
    #[serde(default)]
    pub join_tokens: bool,
    /// Accept OIDC JWTs from these issuers.
    #[serde(default)]
    pub jwt: Jwt,
    /// Accept AWS EC2 instance identity documents (`awsEc2: {}` for the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_ec2: Option<gangplank_identity::aws::Settings>,
    /// Accept GCE instance identity tokens (`gcpGce: {}` for the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp_gce: Option<gangplank_identity::gcp::Settings>,
    /// Accept Azure attested documents (`azureVm: {}` for the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_vm: Option<gangplank_identity::azure::Settings>,
}

/// `identities.jwt`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Jwt {
    /// Trusted issuers.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
}

/// `workloads`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workloads {
    /// How long an agent may stay disconnected before its entry is removed.
    #[serde(default = "defaults::grace_period", with = "humantime_serde")]
    pub grace_period: Duration,
    /// How long a leaving agent waits before stopping its sidecar (traffic drains).
    #[serde(default = "defaults::propagation_delay", with = "humantime_serde")]
    pub propagation_delay: Duration,
    /// How often agents send a heartbeat.
    #[serde(default = "defaults::heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long an agent's stream may stay silent (no heartbeat, no message) before it is
    /// ended and the entry marked disconnected, as a closed stream is (then `gracePeriod`
    /// runs). Default: three heartbeats. An agent whose `settings.heartbeat` overrides the
    /// endpoint's must send more often than this.
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_deadline: Option<Duration>,
    /// How often at most a sidecar's health is written to its entry: the first change after a
    /// quiet interval is written at once; changes within the interval are counted and the
    /// latest is written at its end, so a flapping sidecar costs one write per interval.
    #[serde(default = "defaults::health_write_interval", with = "humantime_serde")]
    pub health_write_interval: Duration,
    /// Whether entries carry `proxy.istio.io/health-checks-enabled: "true"`, so istiod sends
    /// them traffic only while the sidecar's health (reported by the agent, recorded as the
    /// `Healthy` condition) is good. Default: on with `registry.kubernetes`, off with a
    /// directory (istiod's `fs://` source does not read status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_checks: Option<bool>,
    /// How long a VM's binding (its bound key, which lets it rejoin without a new
    /// credential) outlives its entry: a VM gone for the grace period loses its entry, and
    /// one gone for the grace period plus this long must present a first-join credential
    /// again. `gangplank instance release` ends a binding at once.
    #[serde(default = "defaults::binding_retention", with = "humantime_serde")]
    pub binding_retention: Duration,
}

impl Default for Workloads {
    fn default() -> Self {
        Self {
            grace_period: defaults::grace_period(),
            propagation_delay: defaults::propagation_delay(),
            heartbeat: defaults::heartbeat(),
            heartbeat_deadline: None,
            health_write_interval: defaults::health_write_interval(),
            health_checks: None,
            binding_retention: defaults::binding_retention(),
        }
    }
}

/// Every default, in one place.
pub mod defaults {
    use super::*;

    /// `0.0.0.0:15443`.
    pub fn listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15443))
    }
    /// `0.0.0.0:15014`.
    pub fn monitoring() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15014))
    }
    /// `istio-system`.
    pub fn istio_namespace() -> String {
        "istio-system".into()
    }
    /// `Kubernetes`, istiod's default cluster ID.
    pub fn cluster_id() -> String {
        "Kubernetes".into()
    }
    /// One hour, like `istioctl x workload entry configure`.
    pub fn token_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    /// Five minutes.
    pub fn grace_period() -> Duration {
        Duration::from_secs(300)
    }
    /// A day.
    pub fn binding_retention() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    /// Ten seconds.
    pub fn propagation_delay() -> Duration {
        Duration::from_secs(10)
    }
    /// Ten seconds.
    pub fn heartbeat() -> Duration {
        Duration::from_secs(10)
    }
    /// Ten seconds.
    pub fn health_write_interval() -> Duration {
        Duration::from_secs(10)
    }
    /// Three heartbeats: one lost or late heartbeat never ends a stream.
    pub fn heartbeat_deadline(heartbeat: Duration) -> Duration {
        heartbeat * 3
    }
    /// 20,000: two connections per VM for 10,000 VMs (a reconnecting agent's old connection
    /// may linger until its keepalive fails).
    pub fn max_connections() -> usize {
        20_000
    }
    /// 512: a TLS handshake costs about a millisecond of CPU, so this many in flight is a
    /// burst of reconnects, not a queue; more would only delay the connections already open.
    pub fn max_handshakes() -> usize {
        512
    }
    /// Ten seconds.
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    /// A minute.
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    /// Thirty seconds.
    pub fn cache_timeout() -> Duration {
        Duration::from_secs(30)
    }
    /// Fifteen seconds.
    pub fn lease_duration() -> Duration {
        Duration::from_secs(15)
    }
}

/// Why the configuration cannot be used. Names the file, the field and what to change.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct Error {
    /// The configuration file.
    pub file: String,
    /// What is wrong.
    pub problem: Problem,
}

/// What is wrong with a configuration, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The file cannot be read.
    #[error("cannot read: {0}")]
    Read(#[source] std::io::Error),
    /// The YAML is malformed, has an unknown field or a value of the wrong type.
    #[error("{0}")]
    Syntax(#[from] gangplank_api::yaml::Error),
    /// `apiVersion` is not ours.
    #[error("apiVersion: {0:?} is not supported, use {API_VERSION}")]
    ApiVersion(String),
    /// `kind` is not ours.
    #[error("kind: {0:?} is not supported, use {KIND}")]
    Kind(String),
    /// `planeId` is empty.
    #[error("planeId: must not be empty (agents bind their credentials to it)")]
    PlaneId,
    /// Both certificate files and `dev: true`.
    #[error("tls: set either certFile+keyFile or dev: true, not both")]
    TlsBoth,
    /// Neither a complete pair of certificate files nor `dev: true`.
    #[error("tls: set certFile and keyFile (PEM), or dev: true for a generated dev certificate")]
    TlsMissing,
    /// Both registry sources.
    #[error("registry: set either directory or kubernetes, not both")]
    RegistryBoth,
    /// No registry source.
    #[error("registry: set directory (a folder istiod reads as fs://) or kubernetes: {{}}")]
    RegistryMissing,
    /// No credential kind enabled.
    #[error(
        "identities: no credential kind is enabled: set joinTokens: true, add jwt.issuers, or enable awsEc2, gcpGce or azureVm"
    )]
    NoIdentities,
    /// A zero grace period or heartbeat.
    #[error("workloads: gracePeriod and heartbeat must be longer than 0s")]
    ZeroInterval,
    /// A heartbeat that does not fit in the grace period.
    #[error(
        "workloads.heartbeat ({}) must be shorter than workloads.gracePeriod ({})",
        humantime::format_duration(*heartbeat),
        humantime::format_duration(*grace_period)
    )]
    HeartbeatTooLong {
        /// The heartbeat.
        heartbeat: Duration,
        /// The grace period.
        grace_period: Duration,
    },
    /// A heartbeat deadline agents cannot meet.
    #[error(
        "workloads.heartbeatDeadline ({}) must be longer than workloads.heartbeat ({}; agents are told at least 1s): \
         set at least three heartbeats, or leave it unset for the default",
        humantime::format_duration(*deadline),
        humantime::format_duration(*heartbeat)
    )]
    HeartbeatDeadline {
        /// The deadline.
        deadline: Duration,
        /// The heartbeat (at least a second, as agents are told it).
        heartbeat: Duration,
    },
    /// A zero health write interval.
    #[error("workloads.healthWriteInterval must be longer than 0s (10s is the default)")]
    HealthWriteInterval,
    /// A zero connection limit or timeout, or more handshakes than connections.
    #[error("connections.{0}")]
    Connections(&'static str),
    /// `install` without a folder.
    #[error(
        "install.directory: must name the folder holding the agent's .deb and .rpm packages (or remove install to serve none)"
    )]
    InstallDirectory,
    /// A sidecar token lifetime too short to renew.
    #[error("sidecarToken.lifetime: must be at least 10s (istioctl's default is 1h)")]
    TokenLifetime,
    /// A sidecar token lifetime Kubernetes' TokenRequest refuses.
    #[error(
        "sidecarToken.lifetime: {} is shorter than 10m, which Kubernetes' TokenRequest refuses \
         (\"may not specify a duration less than 10 minutes\"): set at least 10m with registry.kubernetes",
        humantime::format_duration(*.0)
    )]
    TokenLifetimeKubernetes(Duration),
}

/// The shortest token Kubernetes' TokenRequest issues.
pub const TOKEN_REQUEST_MINIMUM: Duration = Duration::from_secs(600);

/// The `apiVersion` of the endpoint's configuration.
pub const API_VERSION: &str = "onboarding.gangplank.dev/v1alpha1";
/// The `kind` of the endpoint's configuration.
pub const KIND: &str = "EndpointConfiguration";

/// Where resources live: exactly one source, decided once by [`Config::validate`].
#[derive(Debug, Clone)]
pub enum Source {
    /// A folder of Kubernetes-style YAML files (`registry.directory`).
    Directory(PathBuf),
    /// The Kubernetes API (`registry.kubernetes`).
    Kubernetes(Kubernetes),
}

/// How the serving certificate comes: decided once by [`Config::validate`].
#[derive(Debug, Clone)]
pub enum Serving {
    /// PEM files, reloaded when they change (`tls.certFile`, `tls.keyFile`).
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// A dev CA and certificate generated once into the state dir (`tls.dev: true`).
    Dev {
        /// Names besides `localhost` and the loopback addresses (`tls.devNames`).
        names: Vec<String>,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file as written, with every default applied.
    pub file: File,
    /// Where resources live.
    pub registry: Source,
    /// How the serving certificate comes.
    pub serving: Serving,
    /// This replica's name.
    pub replica: String,
    /// The `iss` of minted sidecar tokens (until the bound port is known, when defaulted).
    pub token_issuer: String,
    /// Whether `token_issuer` was defaulted (so it follows the port actually bound).
    pub token_issuer_defaulted: bool,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let err = |problem: Problem| Error {
            file: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(Problem::Read(e)))?;
        let file: File = gangplank_api::yaml::parse(&text).map_err(|e| err(e.into()))?;
        Self::validate(file).map_err(err)
    }

    /// Validates a parsed file.
    pub fn validate(file: File) -> Result<Self, Problem> {
        if file.api_version != API_VERSION {
            return Err(Problem::ApiVersion(file.api_version));
        }
        if file.kind != KIND {
            return Err(Problem::Kind(file.kind));
        }
        if file.plane_id.trim().is_empty() {
            return Err(Problem::PlaneId);
        }
        let tls = &file.tls;
        let serving = match (&tls.cert_file, &tls.key_file, tls.dev) {
            (Some(cert), Some(key), false) => Serving::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None, true) => Serving::Dev {
                names: tls.dev_names.clone(),
            },
            (Some(_), Some(_), true) => return Err(Problem::TlsBoth),
            _ => return Err(Problem::TlsMissing),
        };
        let registry = match (
            file.registry.directory.as_os_str().is_empty(),
            &file.registry.kubernetes,
        ) {
            (false, None) => Source::Directory(file.registry.directory.clone()),
            (true, Some(k8s)) => Source::Kubernetes(k8s.clone()),
            (false, Some(_)) => return Err(Problem::RegistryBoth),
            (true, None) => return Err(Problem::RegistryMissing),
        };
        let ids = &file.identities;
        if !ids.join_tokens
            && ids.jwt.issuers.is_empty()
            && ids.aws_ec2.is_none()
            && ids.gcp_gce.is_none()
            && ids.azure_vm.is_none()
        {
            return Err(Problem::NoIdentities);
        }
        let w = &file.workloads;
        if w.grace_period.is_zero() || w.heartbeat.is_zero() {
            return Err(Problem::ZeroInterval);
        }
        if w.heartbeat >= w.grace_period {
            return Err(Problem::HeartbeatTooLong {
                heartbeat: w.heartbeat,
                grace_period: w.grace_period,
            });
        }
        // Agents are told the heartbeat in whole seconds, at least one
        // (`Welcome.heartbeat_seconds`).
        let told = w.heartbeat.max(Duration::from_secs(1));
        let deadline = w
            .heartbeat_deadline
            .unwrap_or_else(|| defaults::heartbeat_deadline(told));
        if deadline <= told {
            return Err(Problem::HeartbeatDeadline {
                deadline,
                heartbeat: told,
            });
        }
        if w.health_write_interval.is_zero() {
            return Err(Problem::HealthWriteInterval);
        }
        let c = &file.connections;
        if c.max == 0 {
            return Err(Problem::Connections(
                "max must be at least 1 (20000 is the default)",
            ));
        }
        if c.max_handshakes == 0 || c.max_handshakes > c.max {
            return Err(Problem::Connections(
                "maxHandshakes must be between 1 and max (a handshake holds a connection; 512 is the default)",
            ));
        }
        if c.handshake_timeout.is_zero() || c.idle_timeout.is_zero() {
            return Err(Problem::Connections(
                "handshakeTimeout and idleTimeout must be longer than 0s (defaults: 10s and 1m)",
            ));
        }
        if file
            .install
            .as_ref()
            .is_some_and(|i| i.directory.as_os_str().is_empty())
        {
            return Err(Problem::InstallDirectory);
        }
        if file.sidecar_token.lifetime < Duration::from_secs(10) {
            return Err(Problem::TokenLifetime);
        }
        if matches!(registry, Source::Kubernetes(_)) && file.sidecar_token.lifetime < TOKEN_REQUEST_MINIMUM {
            return Err(Problem::TokenLifetimeKubernetes(file.sidecar_token.lifetime));
        }
        let mut file = file;
        // Filled in, so `config-print` shows the deadline in force.
        file.workloads.heartbeat_deadline = Some(deadline);
        let replica = match &file.replica {
            Some(r) if !r.is_empty() => r.clone(),
            _ => hostname(),
        };
        let token_issuer_defaulted = file.sidecar_token.issuer.is_none();
        let token_issuer = file
            .sidecar_token
            .issuer
            .clone()
            .unwrap_or_else(|| default_issuer(&file, file.listen.port()));
        Ok(Self {
            file,
            registry,
            serving,
            replica,
            token_issuer,
            token_issuer_defaulted,
        })
    }

    /// How long an agent's stream may stay silent (see [`Workloads::heartbeat_deadline`]).
    pub fn heartbeat_deadline(&self) -> Duration {
        let w = &self.file.workloads;
        w.heartbeat_deadline
            .unwrap_or_else(|| defaults::heartbeat_deadline(w.heartbeat.max(Duration::from_secs(1))))
    }

    /// Whether registered entries are health-checked (see [`Workloads::health_checks`]).
    pub fn health_checks(&self) -> bool {
        self.file
            .workloads
            .health_checks
            .unwrap_or(matches!(self.registry, Source::Kubernetes(_)))
    }
}

/// `https://<first dev name or localhost>:<port>`.
pub fn default_issuer(file: &File, port: u16) -> String {
    let host = file.tls.dev_names.first().map_or("localhost", String::as_str);
    format!("https://{host}:{port}")
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gangplank-endpoint".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<Config, Problem> {
        let text = format!(
            "apiVersion: {API_VERSION}
kind: {KIND}
planeId: p
tls: {{dev: true}}
registry: {{directory: /var/lib/gangplank/registry}}
stateDir: /var/lib/gangplank
identities: {{joinTokens: true}}
{extra}"
        );
        Config::validate(gangplank_api::yaml::parse(&text).map_err(Problem::Syntax)?)
    }

    #[test]
    fn connection_limits_and_heartbeat_deadline_have_defaults_that_config_print_shows() {
        let config = parse("").unwrap();
        let c = &config.file.connections;
        assert_eq!((c.max, c.max_handshakes), (20_000, 512));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.heartbeat_deadline(), Duration::from_secs(30));
        assert_eq!(
            config.file.workloads.health_write_interval,
            Duration::from_secs(10)
        );
        let printed = serde_saphyr::to_string(&config.file).unwrap();
        for line in [
            "heartbeatDeadline: 30s",
            "healthWriteInterval: 10s",
            "maxHandshakes: 512",
            "idleTimeout: 1m",
        ] {
            assert!(printed.contains(line), "{line} missing from:\n{printed}");
        }
        let config = parse("workloads: {heartbeat: 2s, heartbeatDeadline: 5s}\n").unwrap();
        assert_eq!(config.heartbeat_deadline(), Duration::from_secs(5));
    }

    #[test]
    fn limits_agents_cannot_meet_are_refused_with_what_to_change() {
        let err = parse("workloads: {heartbeat: 10s, heartbeatDeadline: 10s}\n").unwrap_err();
        assert!(
            err.to_string().starts_with(
                "workloads.heartbeatDeadline (10s) must be longer than workloads.heartbeat (10s"
            ),
            "{err}"
        );
        // Agents are told at least a second.
        assert!(parse("workloads: {heartbeat: 200ms, heartbeatDeadline: 1s}\n").is_err());
        let err = parse("connections: {max: 10, maxHandshakes: 11}\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("maxHandshakes must be between 1 and max"),
            "{err}"
        );
        assert!(parse("connections: {idleTimeout: 0s}\n").is_err());
        assert!(parse("workloads: {healthWriteInterval: 0s}\n").is_err());
        assert!(
            parse("connections: {maxConections: 10}\n").is_err(),
            "unknown fields are errors"
        );
    }

    #[test]
    fn install_is_optional_names_a_folder_and_config_print_shows_it() {
        let config = parse("").unwrap();
        assert!(config.file.install.is_none());
        let printed = serde_saphyr::to_string(&config.file).unwrap();
        assert!(!printed.contains("install"), "{printed}");

        let config = parse("install: {directory: /srv/gangplank/packages}\n").unwrap();
        let printed = serde_saphyr::to_string(&config.file).unwrap();
        assert!(
            printed.contains("install:\n  directory: /srv/gangplank/packages\n"),
            "{printed}"
        );

        let err = parse("install: {directory: ''}\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("install.directory: must name the folder"),
            "{err}"
        );
        let err = parse("install: {dir: /srv}\n").unwrap_err();
        let Problem::Syntax(syntax) = &err else {
            panic!("{err}")
        };
        assert_eq!(syntax.line, 8, "{err}");
        assert!(syntax.field.starts_with("install"), "{err}");
        assert!(err.to_string().contains("dir"), "{err}");
    }
}
