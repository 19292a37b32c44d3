//! `gangplank-agent doctor`: why this VM can or cannot onboard, one check at a time.
//!
//! The checks run in order, each on what the earlier ones established: the configuration
//! loads, the endpoint's name resolves, its port accepts a TCP connection, the TLS handshake
//! verifies (with the agent's own client configuration: CA bundle, SNI), the clocks agree,
//! the credential the agent would send can be obtained, and the endpoint's `Check` call says
//! what Onboard would decide, without onboarding. A failed check says what to change; the
//! checks after it are skipped. Every step has a time limit.
//!
//! Doctor changes nothing: it creates no key (a VM without one is checked with a key held
//! in memory), writes no file, and Check spends no join-token use and registers nothing.
//! The one exception is the AWS provider, which keeps its instance key in its key file and
//! creates it there (as the agent's first join would).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use gangplank_api::proto::{self, onboarding_client::OnboardingClient};
use gangplank_identity::Challenge;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::config::{self, Config};

/// How long name resolution may take.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP connection may take.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the TLS handshake may take.
pub const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each call to the endpoint may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long obtaining the credential may take (a JWT command, a metadata service).
pub const CREDENTIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// How far the clocks may be apart before the clock check fails.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// How many resolved addresses are tried.
const MAX_ADDRESSES: usize = 8;

/// The checks, in the order they run.
pub const CHECKS: [&str; 7] = ["config", "dns", "tcp", "tls", "clock", "credential", "policy"];

/// Where the configuration files are, as the agent is given them.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The OnboardingConfiguration.
    pub onboarding: PathBuf,
    /// The AgentConfiguration.
    pub agent: PathBuf,
    /// Whether a missing agent file means defaults.
    pub agent_missing_ok: bool,
}

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Passed.
    Ok,
    /// Failed; the hint says what to change.
    Fail,
    /// Not run: an earlier check failed, or there is nothing to check.
    Skipped,
}

/// What the endpoint said about this VM (the policy check).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// Whether an OnboardingPolicy allows this VM into its WorkloadGroup.
    pub allowed: bool,
    /// The endpoint's explanation.
    pub explanation: String,
    /// The allowing policy and rule, when allowed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub policy: String,
    /// Its 1-based rule.
    #[serde(skip_serializing_if = "is_zero")]
    pub rule: u32,
    /// The WorkloadEntry this VM would get (`namespace/name`), when allowed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub entry: String,
    /// The verified identity, as the endpoint reads it.
    pub identity: String,
    /// Which credential was checked (`bound-key`, `join-token`, ...).
    pub credential: String,
    /// The endpoint's clock when it answered (RFC 3339).
    pub server_time: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// Its name (one of [`CHECKS`]).
    pub name: &'static str,
    /// Its result.
    pub result: Outcome,
    /// What was found.
    pub message: String,
    /// What to change, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The endpoint's decision (the policy check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

/// Every check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `onboarding.gangplank.dev/v1alpha1`.
    pub api_version: &'static str,
    /// `DoctorReport`.
    pub kind: &'static str,
    /// Whether no check failed.
    pub ok: bool,
    /// The checks, in order.
    pub checks: Vec<Check>,
}

impl Report {
    fn new() -> Self {
        Report {
            api_version: crate::status::API_VERSION,
            kind: "DoctorReport",
            ok: true,
            checks: Vec::new(),
        }
    }

    fn ok(&mut self, name: &'static str, message: impl Into<String>) {
        self.push(name, Outcome::Ok, message.into(), None);
    }

    fn not_applicable(&mut self, name: &'static str, message: impl Into<String>) {
        self.push(name, Outcome::Skipped, message.into(), None);
    }

    /// Records a failure and skips every check after it.
    fn fail(mut self, name: &'static str, failure: Failure) -> Self {
        self.ok = false;
        self.push(name, Outcome::Fail, failure.message, Some(failure.hint));
        let after = CHECKS.iter().skip_while(|c| **c != name).skip(1);
        for later in after {
            self.push(
                later,
                Outcome::Skipped,
                format!("skipped: the {name} check failed"),
                None,
            );
        }
        self
    }

    fn push(&mut self, name: &'static str, result: Outcome, message: String, hint: Option<String>) {
        self.checks.push(Check {
            name,
            result,
            message,
            hint,
            decision: None,
        });
    }

    /// The report for a person: one line per check, its hint below a failure.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let result = match c.result {
                Outcome::Ok => "ok",
                Outcome::Fail => "FAIL",
                Outcome::Skipped => "skip",
            };
            out.push_str(&format!("{result:<5} {:<11} {}\n", c.name, c.message));
            if let Some(hint) = &c.hint {
                out.push_str(&format!("{:<17} fix: {hint}\n", ""));
            }
        }
        out.push_str(if self.ok {
            "\nevery check passed: this VM can onboard\n"
        } else {
            "\na check failed: fix it and run `gangplank-agent doctor` again\n"
        });
        out
    }
}

/// A failed check: what was found and what to change.
#[derive(Debug)]
struct Failure {
    message: String,
    hint: String,
}

fn failure(message: impl Into<String>, hint: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        hint: hint.into(),
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs every check for the configuration at `paths`.
pub async fn run(paths: &Paths) -> Report {
    let mut report = Report::new();

    // (a) config
    let config = match Config::load(&paths.onboarding, &paths.agent, paths.agent_missing_ok) {
        Ok(c) => c,
        Err(e) => {
            return report.fail(
                "config",
                failure(
                    e.to_string(),
                    "fix the file and field named here (`gangplank-agent config check` checks again)",
                ),
            );
        }
    };
    let ep = &config.onboarding.endpoint;
    report.ok(
        "config",
        format!(
            "{} and {} load: endpoint {ep}, WorkloadGroup {}, identity {}",
            paths.onboarding.display(),
            if paths.agent_missing_ok && !paths.agent.exists() {
                "the agent defaults".to_string()
            } else {
                paths.agent.display().to_string()
            },
            config.onboarding.workload_group,
            identity_kind(&config.agent.identity),
        ),
    );
    let onboarding_file = paths.onboarding.display().to_string();

    // (b) dns
    let host = ep.host.trim_matches(['[', ']']);
    let addresses = match host.parse::<IpAddr>() {
        Ok(ip) => {
            report.not_applicable("dns", format!("{host} is an IP address: nothing to resolve"));
            vec![SocketAddr::new(ip, ep.port)]
        }
        Err(_) => match resolve(host, ep.port).await {
            Ok(found) => {
                let shown: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                report.ok("dns", format!("{host} resolves to {}", shown.join(", ")));
                found
            }
            Err(why) => {
                return report.fail(
                    "dns",
                    failure(
                        why,
                        format!(
                            "set onboardingEndpoint.host in {onboarding_file} to the endpoint's name, or fix this VM's resolver (/etc/resolv.conf, /etc/hosts)"
                        ),
                    ),
                );
            }
        },
    };

    // (c) tcp
    let tcp = match connect(&addresses).await {
        Ok((addr, tcp, took)) => {
            report.ok("tcp", format!("connected to {addr} in {} ms", took.as_millis()));
            tcp
        }
        Err(why) => {
            return report.fail(
                "tcp",
                failure(
                    why,
                    format!(
                        "nothing accepts connections at {ep}: check that the onboarding endpoint runs and listens there, onboardingEndpoint.port in {onboarding_file}, and firewalls or security groups between this VM and the endpoint"
                    ),
                ),
            );
        }
    };

    // (d) tls
    let options = crate::run::tls_options(ep);
    if let Err(f) = tls(tcp, host, &options, &onboarding_file)
        .await
        .map(|m| report.ok("tls", m))
    {
        return report.fail("tls", f);
    }

    // (e) clock, with the channel the agent itself would use
    let channel = match gangplank_tls::channel(&ep.host, ep.port, &options) {
        Ok(c) => c,
        Err(e) => {
            return report.fail(
                "clock",
                failure(
                    format!("cannot set up the agent's channel to {ep}: {e}"),
                    format!("check onboardingEndpoint.transportSecurity in {onboarding_file}"),
                ),
            );
        }
    };
    let mut client = OnboardingClient::new(channel);
    let discovered = match discover(&mut client, ep).await {
        Ok(d) => d,
        Err(f) => return report.fail("clock", f),
    };
    match discovered.skew {
        Some(skew) if skew.abs() > MAX_SKEW.as_secs_f64() => {
            return report.fail(
                "clock",
                failure(
                    format!("this VM's clock is {} the endpoint's", describe_skew(skew)),
                    "fix this VM's time synchronisation (chrony or systemd-timesyncd; `timedatectl` shows its state): expiry checks of credentials and tokens fail with a wrong clock",
                ),
            );
        }
        Some(skew) => report.ok(
            "clock",
            format!("this VM's clock is {} the endpoint's", describe_skew(skew)),
        ),
        None => report.not_applicable(
            "clock",
            "the endpoint's answer carried no date: the clocks were not compared",
        ),
    }

    // (f) credential
    let group = &config.onboarding.workload_group;
    let plan = match credential(&config, &discovered).await {
        Ok(plan) => plan,
        Err(f) => return report.fail("credential", f),
    };
    report.ok("credential", plan.describe());

    // (g) policy
    match policy(&config, &client, &discovered, plan, group).await {
        Ok((message, decision)) => {
            report.ok("policy", message);
            if let Some(last) = report.checks.last_mut() {
                last.decision = Some(decision);
            }
            report
        }
        Err((f, decision)) => {
            let mut report = report.fail("policy", f);
            if let Some(check) = report.checks.iter_mut().find(|c| c.name == "policy") {
                check.decision = decision;
            }
            report
        }
    }
}

fn identity_kind(identity: &config::Identity) -> String {
    match identity {
        config::Identity::JoinToken { file } => format!("join token ({})", file.display()),
        config::Identity::JwtFile { file } => format!("jwt ({})", file.display()),
        config::Identity::JwtCommand { command } => {
            format!(
                "jwt (from `{}`)",
                command.first().map(String::as_str).unwrap_or_default()
            )
        }
        config::Identity::Platform { host, .. } => format!("cloud platform ({host})"),
    }
}

/// Where to fix the first-join credential.
fn identity_hint(identity: &config::Identity) -> String {
    match identity {
        config::Identity::JoinToken { file } => format!(
            "put a join token from `gangplank token create --workload-group <namespace/name>` in {} (or fix identity.joinToken.file in the agent configuration)",
            file.display()
        ),
        config::Identity::JwtFile { file } => format!(
            "put this VM's JWT in {} (or fix identity.jwt.file in the agent configuration)",
            file.display()
        ),
        config::Identity::JwtCommand { .. } => {
            "fix identity.jwt.command in the agent configuration: it must print this VM's JWT and exit 0".into()
        }
        config::Identity::Platform { .. } => {
            "check identity.platform in the agent configuration (host, metadata URLs) and that this VM's metadata service answers".into()
        }
    }
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Err(_) => Err(format!("{host} did not resolve within {DNS_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("{host} does not resolve: {e}")),
        Ok(Ok(found)) => {
            let mut out: Vec<SocketAddr> = Vec::new();
            for a in found {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
            if out.is_empty() {
                Err(format!("{host} resolves to no address"))
            } else {
                Ok(out)
            }
        }
    }
}

/// Connects to every address at once (each within [`TCP_TIMEOUT`]); the first to answer wins.
async fn connect(addresses: &[SocketAddr]) -> Result<(SocketAddr, TcpStream, Duration), String> {
    let mut attempts = tokio::task::JoinSet::new();
    for &addr in addresses.iter().take(MAX_ADDRESSES) {
        attempts.spawn(async move {
            let started = Instant::now();
            let result = match tokio::time::timeout(TCP_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => Ok(tcp),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {TCP_TIMEOUT:?}")),
            };
            (addr, result, started.elapsed())
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = attempts.join_next().await {
        match joined {
            Ok((addr, Ok(tcp), took)) => return Ok((addr, tcp, took)),
            Ok((addr, Err(why), _)) => failures.push(format!("{addr}: {why}")),
            Err(e) => failures.push(format!("a connection attempt failed: {e}")),
        }
    }
    failures.sort();
    Err(format!("cannot connect: {}", failures.join("; ")))
}

async fn tls(
    tcp: TcpStream,
    host: &str,
    options: &gangplank_tls::ClientOptions,
    onboarding_file: &str,
) -> Result<String, Failure> {
    use gangplank_tls::Refusal;
    let trusted = match &options.ca_bundle {
        Some(path) => format!("the CA bundle {}", path.display()),
        None => "the system's trusted CAs".to_string(),
    };
    let name = options.sni.as_deref().unwrap_or(host);
    let handshake = match tokio::time::timeout(TLS_TIMEOUT, gangplank_tls::handshake(tcp, host, options))
        .await
    {
        Err(_) => {
            return Err(failure(
                format!("no TLS handshake within {TLS_TIMEOUT:?}"),
                "check that the port is the onboarding endpoint's TLS port (15443), not another service's",
            ));
        }
        Ok(Err(e)) => {
            return Err(failure(
                format!("cannot set up TLS: {e}"),
                format!(
                    "fix onboardingEndpoint.transportSecurity.tls in {onboarding_file} (caBundle must be a readable PEM file of CA certificates; sni a DNS name)"
                ),
            ));
        }
        Ok(Ok(h)) => h,
    };
    match handshake {
        Ok(h) if options.insecure_skip_verify => Ok(format!(
            "handshake done ({}), but the certificate was NOT verified (insecureSkipVerify)",
            h.protocol
        )),
        Ok(h) => Ok(format!(
            "handshake verified against {trusted} for {name:?} ({}{})",
            h.protocol,
            h.alpn.map(|a| format!(", {a}")).unwrap_or_default()
        )),
        Err(Refusal::Untrusted(m)) => Err(failure(
            format!("{m}: it is not trusted by {trusted}"),
            format!(
                "set onboardingEndpoint.transportSecurity.tls.caBundle in {onboarding_file} to the CA certificate that issued the endpoint's certificate"
            ),
        )),
        Err(Refusal::NameMismatch(m)) => Err(failure(
            m,
            format!(
                "set onboardingEndpoint.transportSecurity.tls.sni in {onboarding_file} to a name the certificate holds, or onboardingEndpoint.host to such a name (or reissue the endpoint's certificate for {name:?})"
            ),
        )),
        Err(Refusal::Expired(m)) => Err(failure(
            m,
            "renew the endpoint's certificate; if it should still be valid, check this VM's clock",
        )),
        Err(Refusal::Other(m)) => Err(failure(
            format!("TLS handshake failed: {m}"),
            "check that the port is the onboarding endpoint's TLS port and that nothing between this VM and the endpoint terminates TLS",
        )),
    }
}

/// What Discover told doctor.
struct Discovered {
    challenge: Challenge,
    kinds: Vec<String>,
    /// This VM's clock minus the endpoint's, in seconds, when the answer carried a date.
    skew: Option<f64>,
}

async fn discover(
    client: &mut OnboardingClient<tonic::transport::Channel>,
    ep: &config::Endpoint,
) -> Result<Discovered, Failure> {
    let sent = SystemTime::now();
    let answer = match tokio::time::timeout(CALL_TIMEOUT, client.discover(proto::DiscoverRequest {})).await {
        Err(_) => {
            return Err(failure(
                format!("the endpoint {ep} did not answer Discover within {CALL_TIMEOUT:?}"),
                "check the endpoint's health (`/readyz` on its monitoring port) and its log",
            ));
        }
        Ok(Err(status)) => {
            return Err(failure(
                format!(
                    "the endpoint {ep} refused Discover: {:?}: {}",
                    status.code(),
                    status.message()
                ),
                "check that onboardingEndpoint points at a Gangplank onboarding endpoint, and the endpoint's log",
            ));
        }
        Ok(Ok(a)) => a,
    };
    let received = SystemTime::now();
    let date = answer
        .metadata()
        .get("date")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let d = answer.into_inner();
    Ok(Discovered {
        skew: date.map(|server| skew(sent, received, server)),
        challenge: Challenge {
            plane_id: d.plane_id,
            nonce: d.nonce,
            aws_sts_url: d.aws_sts_url,
        },
        kinds: d.credential_kinds,
    })
}

/// This host's clock minus the endpoint's, in seconds: the server's whole-second `date`
/// stands for the middle of its second, compared with the middle of the round trip.
pub fn skew(sent: SystemTime, received: SystemTime, server: SystemTime) -> f64 {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let local = (secs(sent) + secs(received)) / 2.0;
    local - (secs(server) + 0.5)
}

fn describe_skew(skew: f64) -> String {
    if skew.abs() < 1.0 {
        "within a second of".into()
    } else if skew > 0.0 {
        format!("{skew:.0} s ahead of")
    } else {
        format!("{:.0} s behind", -skew)
    }
}

/// The credential doctor checks with: the one the agent would send.
enum Plan {
    /// A saved registration and the VM's key: the agent rejoins with the bound key. Its
    /// first-join credential, if one can be obtained, is the fallback the agent would use.
    Rejoin {
        key: gangplank_identity::bound::Key,
        entry: String,
        key_path: PathBuf,
        fallback: Option<String>,
    },
    /// The first-join credential.
    FirstJoin {
        credential: proto::Credential,
        /// The VM has no key yet: one held in memory signs instead, so the entry name of a
        /// multi-use token (which holds the key's fingerprint) is not the one the agent gets.
        new_key: bool,
    },
}

impl Plan {
    fn describe(&self) -> String {
        match self {
            Plan::Rejoin {
                entry,
                key_path,
                fallback,
                ..
            } => format!(
                "bound key {} for WorkloadEntry {entry} (saved registration): the agent rejoins with it{}",
                key_path.display(),
                match fallback {
                    Some(kind) => format!("; its first-join credential ({kind}) can be obtained too"),
                    None => "; the first-join credential is not needed".into(),
                }
            ),
            Plan::FirstJoin { credential, new_key } => format!(
                "a {} credential was obtained{}",
                credential.kind,
                if *new_key {
                    " (this VM has no key yet: the agent creates it at its first join)"
                } else {
                    ""
                }
            ),
        }
    }
}

/// The first-join credential the configuration names, bound to `challenge` and signed by
/// the VM's key (or one held in memory when there is none).
async fn first_join(config: &Config, challenge: &Challenge) -> Result<(proto::Credential, bool), Failure> {
    let identity = &config.agent.identity;
    let provider = crate::run::provider(identity).map_err(|e| {
        failure(
            format!("cannot set up the credential provider: {e}"),
            identity_hint(identity),
        )
    })?;
    let mut credential = match tokio::time::timeout(CREDENTIAL_TIMEOUT, provider.credential(challenge)).await
    {
        Err(_) => {
            return Err(failure(
                format!("no credential within {CREDENTIAL_TIMEOUT:?}"),
                identity_hint(identity),
            ));
        }
        Ok(Err(e)) => {
            return Err(failure(
                format!("cannot obtain this VM's credential: {e}"),
                identity_hint(identity),
            ));
        }
        Ok(Ok(c)) => c,
    };
    let key_path = crate::state::key_path(&config.agent);
    let (key, new_key) = match gangplank_identity::bound::Key::load(&key_path) {
        Ok(Some(key)) => (key, false),
        Ok(None) => (
            gangplank_identity::bound::Key::generate()
                .map_err(|e| failure(e.to_string(), "this is a bug"))?,
            true,
        ),
        Err(e) => return Err(key_failure(&e, &key_path)),
    };
    key.attach(&mut credential, challenge);
    Ok((credential, new_key))
}

fn key_failure(e: &gangplank_identity::Error, path: &Path) -> Failure {
    failure(
        format!("cannot load this VM's key: {e}"),
        format!(
            "run doctor as the user the agent runs as (root), so it can read {}",
            path.display()
        ),
    )
}

async fn credential(config: &Config, discovered: &Discovered) -> Result<Plan, Failure> {
    let group = &config.onboarding.workload_group;
    let state_dir = &config.agent.files.state_dir;
    let key_path = crate::state::key_path(&config.agent);
    let registration = crate::state::Registration::load(state_dir).filter(|r| r.is_for(group));
    if let Some(registration) = registration {
        match gangplank_identity::bound::Key::load(&key_path) {
            Ok(Some(key)) => {
                let fallback = match first_join(config, &discovered.challenge).await {
                    Ok((c, _)) => Some(c.kind),
                    Err(_) => None,
                };
                return Ok(Plan::Rejoin {
                    key,
                    entry: registration.entry,
                    key_path,
                    fallback,
                });
            }
            Ok(None) => {}
            Err(e) => return Err(key_failure(&e, &key_path)),
        }
    }
    let (credential, new_key) = first_join(config, &discovered.challenge).await?;
    if !discovered.kinds.is_empty() && !discovered.kinds.contains(&credential.kind) {
        return Err(failure(
            format!(
                "the endpoint does not accept {} credentials (it accepts {})",
                credential.kind,
                discovered.kinds.join(", ")
            ),
            "change identity in the agent configuration to a kind the endpoint accepts, or enable this kind under identities in the endpoint's configuration",
        ));
    }
    Ok(Plan::FirstJoin { credential, new_key })
}

type PolicyResult = Result<(String, Decision), (Failure, Option<Decision>)>;

async fn policy(
    config: &Config,
    client: &OnboardingClient<tonic::transport::Channel>,
    discovered: &Discovered,
    plan: Plan,
    group: &gangplank_api::NamespacedName,
) -> PolicyResult {
    let facts = match tokio::time::timeout(CALL_TIMEOUT, crate::host::facts(&config.onboarding)).await {
        Ok(f) => f,
        Err(_) => {
            return Err((
                failure(
                    format!("this VM's addresses could not be listed within {CALL_TIMEOUT:?}"),
                    "check this VM's network interfaces",
                ),
                None,
            ));
        }
    };
    let ask = |credential: proto::Credential, nonce: String| {
        let mut client = client.clone();
        let request = proto::OnboardRequest {
            workload_group: Some(proto::WorkloadGroupRef {
                namespace: group.namespace.clone(),
                name: group.name.clone(),
            }),
            credential: Some(credential),
            nonce,
            host: Some(facts.clone()),
        };
        async move {
            match tokio::time::timeout(CALL_TIMEOUT, client.check(request)).await {
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                ))),
                Ok(r) => r.map(tonic::Response::into_inner),
            }
        }
    };
    // What the entry name depends on, and why the credential checked is not the first one.
    let mut name_note = String::new();
    let (kind, answer, note) = match plan {
        Plan::FirstJoin { credential, new_key } => {
            let kind = credential.kind.clone();
            let answer = ask(credential, discovered.challenge.nonce.clone()).await;
            if new_key && kind == gangplank_api::kind::JOIN_TOKEN {
                name_note = " (its last part is the fingerprint of the key the agent creates at its first join; doctor signed with a throw-away one)".into();
            }
            (kind, answer, None)
        }
        Plan::Rejoin { key, entry, .. } => {
            let credential = key
                .rejoin(&discovered.challenge, group, &entry)
                .map_err(|e| (failure(e.to_string(), "this is a bug"), None))?;
            match ask(credential, discovered.challenge.nonce.clone()).await {
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    // The agent falls back to its first-join credential: so does doctor.
                    let refused = status.message().to_string();
                    let challenge = match tokio::time::timeout(
                        CALL_TIMEOUT,
                        client.clone().discover(proto::DiscoverRequest {}),
                    )
                    .await
                    {
                        Ok(Ok(d)) => {
                            let d = d.into_inner();
                            Challenge {
                                plane_id: d.plane_id,
                                nonce: d.nonce,
                                aws_sts_url: d.aws_sts_url,
                            }
                        }
                        _ => {
                            return Err((
                                failure(
                                    format!(
                                        "the bound key was refused ({refused}), and no new nonce came for the first-join credential"
                                    ),
                                    "check the endpoint's health and log",
                                ),
                                None,
                            ));
                        }
                    };
                    let (credential, _) = first_join(config, &challenge).await.map_err(|f| {
                        (
                            failure(
                                format!("the bound key was refused ({refused}), and the first-join credential cannot be obtained: {}", f.message),
                                f.hint,
                            ),
                            None,
                        )
                    })?;
                    let kind = credential.kind.clone();
                    let answer = ask(credential, challenge.nonce).await;
                    let note = Some(format!(
                        "; the bound key was refused, and the agent falls back to this first-join credential (the endpoint said: {refused})"
                    ));
                    (kind, answer, note)
                }
                other => ("bound-key".to_string(), other, None),
            }
        }
    };
    let note = note.unwrap_or_default();
    let answer = match answer {
        Ok(a) => a,
        Err(status) => return Err((refusal(&status, config, &kind, &note), None)),
    };
    let decision = Decision {
        allowed: answer.allowed,
        explanation: answer.explanation.clone(),
        policy: answer.policy.clone(),
        rule: answer.rule,
        entry: if answer.entry_name.is_empty() {
            String::new()
        } else {
            format!("{}/{}", answer.entry_namespace, answer.entry_name)
        },
        identity: answer.identity.clone(),
        credential: kind,
        server_time: u64::try_from(answer.server_time_unix_ms)
            .map(|ms| crate::status::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)))
            .unwrap_or_default(),
    };
    if answer.allowed {
        Ok((
            format!(
                "{} for {}: this VM would be WorkloadEntry {}{name_note}{note}",
                answer.explanation, answer.identity, decision.entry
            ),
            decision,
        ))
    } else {
        Err((
            failure(
                format!("{}{note}", answer.explanation),
                format!(
                    "create or change an OnboardingPolicy in namespace {} with a rule that matches {} and selects WorkloadGroup {} (`gangplank policy explain` shows each rule's reason)",
                    group.namespace, answer.identity, group.name
                ),
            ),
            Some(decision),
        ))
    }
}

/// A refused Check: what the endpoint said, and where to act.
fn refusal(status: &tonic::Status, config: &Config, kind: &str, note: &str) -> Failure {
    use tonic::Code;
    let message = format!(
        "the endpoint refused the {kind} credential: {:?}: {}{note}",
        status.code(),
        status.message()
    );
    let hint = match status.code() {
        Code::Unauthenticated => identity_hint(&config.agent.identity),
        Code::NotFound => format!(
            "create WorkloadGroup {}, or fix workloadGroup in the onboarding configuration",
            config.onboarding.workload_group
        ),
        Code::Unimplemented => {
            "the endpoint is older than this agent and cannot answer Check: upgrade it to see its decision".into()
        }
        Code::InvalidArgument => "fix what the endpoint names (the onboarding configuration, workload labels or this VM's addresses)".into(),
        Code::Unavailable => "the endpoint, or something it depends on, is unavailable: nothing to change on this VM; tell the endpoint's operator".into(),
        _ => "see the endpoint's message and log".into(),
    };
    failure(message, hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_compares_the_middles_of_the_round_trip_and_the_servers_second() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        // Sent at 1000.2 s, answered at 1000.4 s; the server said 1000 (so 1000.5): 0.2 s behind.
        let s = skew(at(1_000_200), at(1_000_400), at(1_000_000));
        assert!((s + 0.2).abs() < 1e-6, "{s}");
        // The server is a minute behind this host.
        let s = skew(at(1_060_000), at(1_060_000), at(1_000_000));
        assert!((s - 59.5).abs() < 1e-6, "{s}");
        assert_eq!(describe_skew(59.5), "60 s ahead of");
        assert_eq!(describe_skew(-45.0), "45 s behind");
        assert_eq!(describe_skew(0.3), "within a second of");
    }

    #[test]
    fn a_failure_skips_every_later_check_and_nothing_before() {
        let mut r = Report::new();
        r.ok("config", "fine");
        r.not_applicable("dns", "an IP");
        r.ok("tcp", "connected");
        let r = r.fail("tls", failure("untrusted", "set caBundle"));
        let names: Vec<_> = r.checks.iter().map(|c| (c.name, c.result)).collect();
        assert_eq!(
            names,
            vec![
                ("config", Outcome::Ok),
                ("dns", Outcome::Skipped),
                ("tcp", Outcome::Ok),
                ("tls", Outcome::Fail),
                ("clock", Outcome::Skipped),
                ("credential", Outcome::Skipped),
                ("policy", Outcome::Skipped),
            ]
        );
        assert!(!r.ok);
        let text = r.text();
        assert!(
            text.contains("FAIL  tls") && text.contains("fix: set caBundle"),
            "{text}"
        );
        assert!(text.contains("skipped: the tls check failed"), "{text}");
    }
}
