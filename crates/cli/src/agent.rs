//! `gangplank agent install-script` and `gangplank agent user-data`: what a VM without
//! internet runs to get the agent from its onboarding endpoint (`/install/`, served from
//! the endpoint's `install.directory`), configure it and start it. `install-script` prints
//! a POSIX `sh` script (`agent/install.sh` with this command's settings filled in);
//! `user-data` prints a cloud-init document that writes that same script and runs it, for
//! an autoscaling group's launch template.
//!
//! Every flag is checked before anything is printed: a bad one exits 2, stdout empty.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use gangplank_agent::config::defaults;
use gangplank_api::NamespacedName;
use gangplank_identity::token::Secret;

/// Arguments of `gangplank agent`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a POSIX sh script that installs the agent from the onboarding endpoint,
    /// configures it and starts it (run it as root on the VM; `--download-only DIR` only
    /// downloads and verifies the package).
    InstallScript(ScriptArgs),
    /// Print a cloud-init #cloud-config document that writes the install script to
    /// /var/lib/gangplank/install.sh and runs it (for a launch template's user data).
    UserData(ScriptArgs),
}

#[derive(Debug, clap::Args)]
struct ScriptArgs {
    /// The onboarding endpoint as the VM reaches it: a DNS name or IP address, and the port
    /// when it is not 15443.
    #[arg(long, value_name = "HOST[:PORT]")]
    endpoint: String,
    /// The WorkloadGroup the VM joins, as NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME")]
    workload_group: NamespacedName,
    /// The PEM CA bundle the endpoint's certificate chains to: embedded, used to download
    /// the package, and written to /etc/gangplank/ca.pem for the agent.
    #[arg(long, value_name = "FILE")]
    ca_bundle: PathBuf,
    /// The name the endpoint's certificate is checked against, when it is not HOST.
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// A join token file (`gangplank token create`) to embed: the script writes it to
    /// /etc/gangplank/join-token (mode 0600). The script is then as secret as the token.
    #[arg(long, value_name = "FILE", conflicts_with = "identity")]
    join_token_file: Option<PathBuf>,
    /// Let the VM prove itself with its cloud platform's identity instead (written to
    /// /etc/gangplank/agent.yaml). Without this or --join-token-file, a join token must be
    /// put in /etc/gangplank/join-token later.
    #[arg(long, value_enum, value_name = "PLATFORM")]
    identity: Option<Platform>,
    /// The package format; default: chosen on the VM (deb if dpkg is installed, else rpm).
    #[arg(long, value_enum)]
    format: Option<Format>,
}

/// `--identity`: the agent's `identity.platform.host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Platform {
    /// Detect the platform at the first onboarding.
    Auto,
    /// AWS EC2 (instance identity document).
    AwsEc2,
    /// Google Compute Engine (instance identity token).
    GcpGce,
    /// Azure VM (attested document).
    AzureVm,
}

impl Platform {
    fn as_str(self) -> &'static str {
        match self {
            Platform::Auto => "auto",
            Platform::AwsEc2 => "aws-ec2",
            Platform::GcpGce => "gcp-gce",
            Platform::AzureVm => "azure-vm",
        }
    }
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Debian and Ubuntu (`dpkg -i`).
    Deb,
    /// RHEL, Amazon Linux, Fedora, SUSE (`rpm -U`).
    Rpm,
}

/// Where the script writes what it embeds; the agent's default paths.
const CA_PATH: &str = "/etc/gangplank/ca.pem";
/// Where `user-data` puts the script.
pub const USER_DATA_SCRIPT: &str = "/var/lib/gangplank/install.sh";
/// Ends every embedded here-document; nothing embedded has such a line (all of it is
/// checked or generated: PEM, YAML from checked names, a join token's `<id>.<secret>`).
const HEREDOC_END: &str = "GANGPLANK_EOF";
const TEMPLATE: &str = include_str!("agent/install.sh");

/// Why the flags cannot make a script: names the flag and what to change.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("--endpoint {given:?}: {problem}")]
    Endpoint { given: String, problem: String },
    #[error("--workload-group {group}: {problem}")]
    WorkloadGroup { group: String, problem: String },
    #[error("--ca-bundle {}: {problem}", path.display())]
    CaBundle { path: PathBuf, problem: String },
    #[error("--sni {given:?}: is not a DNS name: give the name the endpoint's certificate is issued for")]
    Sni { given: String },
    #[error("--join-token-file {}: {problem}", path.display())]
    JoinToken { path: PathBuf, problem: String },
    /// A safety net behind the checks above: the agent's own parser refused what would be
    /// written.
    #[error("the agent would refuse the configuration these flags make ({0}): fix the flag it names")]
    Refused(String),
}

/// How the VM proves itself.
enum Credential {
    /// Nothing embedded: the agent's default, a join token file placed later.
    None,
    /// An embedded join token.
    JoinToken(Secret),
    /// The cloud platform's identity.
    Platform(Platform),
}

/// A checked set of flags: everything the script embeds.
struct Script {
    host: String,
    port: u16,
    sni: Option<String>,
    group: NamespacedName,
    /// The bundle's certificates, PEM-encoded again (nothing else of the file is kept).
    ca_pem: String,
    credential: Credential,
    format: Option<Format>,
}

/// Runs `gangplank agent`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (args, cloud_init) = match args.command {
        Command::InstallScript(args) => (args, false),
        Command::UserData(args) => (args, true),
    };
    let script = match Script::from_args(&args) {
        Ok(script) => script,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(ExitCode::from(2));
        }
    };
    let text = script.render();
    gangplank_stdout::print(if cloud_init { user_data(&text) } else { text })?;
    Ok(ExitCode::SUCCESS)
}

impl Script {
    fn from_args(args: &ScriptArgs) -> Result<Self, Error> {
        let (host, port) = endpoint(&args.endpoint)?;
        let group = &args.workload_group;
        let group_error = |problem: &str| Error::WorkloadGroup {
            group: group.to_string(),
            problem: problem.to_owned(),
        };
        if !gangplank_api::meta::is_dns1123_label(&group.namespace) {
            return Err(group_error(
                "the namespace is not a namespace name (lowercase letters, digits and '-', at most 63)",
            ));
        }
        if !gangplank_api::meta::is_dns1123_subdomain(&group.name) {
            return Err(group_error(
                "the name is not a WorkloadGroup name (lowercase letters, digits, '-' and '.')",
            ));
        }
        let sni = match &args.sni {
            Some(sni) if is_dns_name(sni) => Some(sni.clone()),
            Some(sni) => return Err(Error::Sni { given: sni.clone() }),
            None => None,
        };
        let credential = match (&args.join_token_file, args.identity) {
            (Some(path), _) => Credential::JoinToken(join_token(path)?),
            (None, Some(platform)) => Credential::Platform(platform),
            (None, None) => Credential::None,
        };
        let script = Self {
            host,
            port,
            sni,
            group: group.clone(),
            ca_pem: ca_bundle(&args.ca_bundle)?,
            credential,
            format: args.format,
        };
        let path = |p: &str| PathBuf::from(p);
        gangplank_agent::config::Onboarding::parse(
            &path(gangplank_agent::config::DEFAULT_ONBOARDING_PATH),
            &script.onboarding_yaml(),
        )
        .map_err(|e| Error::Refused(e.to_string()))?;
        if let Some(agent) = script.agent_yaml() {
            gangplank_agent::config::Agent::parse(&path(gangplank_agent::config::DEFAULT_AGENT_PATH), &agent)
                .map_err(|e| Error::Refused(e.to_string()))?;
        }
        Ok(script)
    }

    /// The seed's `OnboardingConfiguration` (`/etc/gangplank/onboarding.yaml`). Strings are
    /// quoted, so no name is read as another YAML type (`null`, `yes`, `1e3`).
    fn onboarding_yaml(&self) -> String {
        let mut yaml = String::from(
            "apiVersion: config.agent.onboarding.tetrate.io/v1alpha1\nkind: OnboardingConfiguration\nonboardingEndpoint:\n",
        );
        let _ = writeln!(yaml, "  host: \"{}\"", self.host);
        if self.port != defaults::PORT {
            let _ = writeln!(yaml, "  port: {}", self.port);
        }
        let _ = writeln!(
            yaml,
            "  transportSecurity:\n    tls:\n      caBundle: \"{CA_PATH}\""
        );
        if let Some(sni) = &self.sni {
            let _ = writeln!(yaml, "      sni: \"{sni}\"");
        }
        let _ = writeln!(
            yaml,
            "workloadGroup:\n  namespace: \"{}\"\n  name: \"{}\"",
            self.group.namespace, self.group.name
        );
        yaml
    }

    /// The `AgentConfiguration` naming the credential (`/etc/gangplank/agent.yaml`), unless
    /// none is embedded (then the package's file, or the admin's, is left as it is).
    fn agent_yaml(&self) -> Option<String> {
        let identity = match &self.credential {
            Credential::None => return None,
            Credential::JoinToken(_) => {
                format!("  joinToken:\n    file: \"{}\"\n", defaults::JOIN_TOKEN_FILE)
            }
            Credential::Platform(p) => format!("  platform:\n    host: \"{}\"\n", p.as_str()),
        };
        Some(format!(
            "apiVersion: {}\nkind: AgentConfiguration\nidentity:\n{identity}",
            gangplank_agent::config::AGENT_API_VERSION
        ))
    }

    /// What the script's header says about the credential.
    fn credential_comment(&self) -> String {
        let text = match &self.credential {
            Credential::None => format!(
                "Credential: none is embedded. The agent's default is a join token in {} (mode 0600, from \
                 `gangplank token create`): put one there, or set identity in /etc/gangplank/agent.yaml; \
                 the agent retries until it can onboard.",
                defaults::JOIN_TOKEN_FILE
            ),
            Credential::JoinToken(_) => format!(
                "Credential: a join token, embedded below and written to {} (mode 0600), which \
                 /etc/gangplank/agent.yaml names. Keep this script as secret as the token; it is never printed.",
                defaults::JOIN_TOKEN_FILE
            ),
            Credential::Platform(p) => format!(
                "Credential: the VM's cloud identity (identity.platform.host: {} in \
                 /etc/gangplank/agent.yaml); nothing secret is embedded.",
                p.as_str()
            ),
        };
        comment(&text)
    }

    /// The settings block: the values the script's body reads, and the here-documents.
    fn settings(&self) -> String {
        let bracket = |host: &str| match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{host}]"),
            _ => host.to_owned(),
        };
        let address = format!("{}:{}", bracket(&self.host), self.port);
        let (authority, connect_to) = match &self.sni {
            None => (address, String::new()),
            Some(sni) => {
                let authority = format!("{sni}:{}", self.port);
                (authority.clone(), format!("{authority}:{address}"))
            }
        };
        let format = match self.format {
            None => "",
            Some(Format::Deb) => "deb",
            Some(Format::Rpm) => "rpm",
        };
        let yes = |b: bool| if b { "yes" } else { "no" };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# The endpoint's packages (checked against the CA bundle below)."
        );
        let _ = writeln!(s, "base_url='https://{authority}/install'");
        let _ = writeln!(
            s,
            "# With --sni: curl connects to the endpoint's address but checks the certificate for that name."
        );
        let _ = writeln!(s, "connect_to='{connect_to}'");
        let _ = writeln!(s, "# deb, rpm, or empty: deb if dpkg is installed, else rpm.");
        let _ = writeln!(s, "package_format='{format}'");
        let _ = writeln!(
            s,
            "writes_token={}",
            yes(matches!(self.credential, Credential::JoinToken(_)))
        );
        let _ = writeln!(s, "writes_agent_config={}", yes(self.agent_yaml().is_some()));
        s.push('\n');
        s.push_str(&heredoc(
            "ca_bundle",
            &format!("The CA bundle the endpoint's certificate chains to ({CA_PATH})."),
            &self.ca_pem,
        ));
        s.push('\n');
        s.push_str(&heredoc(
            "onboarding_config",
            "The OnboardingConfiguration (/etc/gangplank/onboarding.yaml).",
            &self.onboarding_yaml(),
        ));
        if let Credential::JoinToken(token) = &self.credential {
            s.push('\n');
            s.push_str(&heredoc(
                "join_token",
                &format!("The join token ({}).", defaults::JOIN_TOKEN_FILE),
                &format!("{}\n", token.expose()),
            ));
        }
        if let Some(agent) = self.agent_yaml() {
            s.push('\n');
            s.push_str(&heredoc(
                "agent_config",
                "The AgentConfiguration (/etc/gangplank/agent.yaml).",
                &agent,
            ));
        }
        s.trim_end().to_owned()
    }

    /// The install script.
    fn render(&self) -> String {
        let endpoint = match &self.sni {
            None => format!("{}:{}", self.host, self.port),
            Some(sni) => format!("{}:{} (certificate checked as {sni})", self.host, self.port),
        };
        TEMPLATE
            .replace("@@VERSION@@", env!("CARGO_PKG_VERSION"))
            .replace("@@ENDPOINT@@", &endpoint)
            .replace("@@GROUP@@", &self.group.to_string())
            .replace("@@CREDENTIAL@@", self.credential_comment().trim_end())
            .replace("@@SETTINGS@@", &self.settings())
    }
}

/// `# `-prefixed lines of at most ~90 characters.
fn comment(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 90 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// A shell function printing `content` from a quoted here-document (nothing expanded).
fn heredoc(name: &str, about: &str, content: &str) -> String {
    assert!(
        content.ends_with('\n') && !content.lines().any(|l| l == HEREDOC_END),
        "{name}: embedded content must end its last line and never hold the here-document's end"
    );
    format!("# {about}\n{name}() {{\n\tcat <<'{HEREDOC_END}'\n{content}{HEREDOC_END}\n}}\n")
}

/// A cloud-init document writing `script` to [`USER_DATA_SCRIPT`] (root, 0700) and running
/// it once, at the instance's first boot. The script is a literal block: byte for byte.
fn user_data(script: &str) -> String {
    let mut out = String::from(
        "#cloud-config\n\
         # Installs, configures and starts the Gangplank agent from its onboarding endpoint\n\
         # (generated by `gangplank agent user-data`).\n\
         write_files:\n",
    );
    let _ = writeln!(out, "- path: {USER_DATA_SCRIPT}");
    out.push_str("  owner: root:root\n  permissions: '0700'\n  content: |\n");
    for line in script.lines() {
        if !line.is_empty() {
            out.push_str("    ");
            out.push_str(line);
        }
        out.push('\n');
    }
    let _ = writeln!(out, "runcmd:\n- [sh, {USER_DATA_SCRIPT}]");
    out
}

/// `HOST[:PORT]`, `[IPv6]:PORT` or a bare IPv6 address.
fn endpoint(given: &str) -> Result<(String, u16), Error> {
    let problem = |problem: &str| Error::Endpoint {
        given: given.to_owned(),
        problem: problem.to_owned(),
    };
    if given.contains("://") || given.contains('/') {
        return Err(problem(
            "give HOST[:PORT] only, without https:// or a path (e.g. onboarding.example.com or 10.0.0.5:15443)",
        ));
    }
    let (host, port) = if let Some(rest) = given.strip_prefix('[') {
        match rest.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(problem("write [IPv6]:PORT, e.g. [fd00::5]:15443")),
            },
            None => return Err(problem("write [IPv6]:PORT, e.g. [fd00::5]:15443")),
        }
    } else if given.matches(':').count() > 1 {
        (given, None)
    } else {
        match given.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (given, None),
        }
    };
    let port = match port {
        None => defaults::PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| problem(&format!("{p:?} is not a port (1-65535; 15443 when left out)")))?,
    };
    let ip = host.parse::<IpAddr>();
    if given.starts_with('[') && !matches!(ip, Ok(IpAddr::V6(_))) {
        return Err(problem("only an IPv6 address goes in brackets"));
    }
    if ip.is_err() && !is_dns_name(host) {
        return Err(problem(
            "the host is not a DNS name or IP address: give the name or address the VM reaches the endpoint at",
        ));
    }
    Ok((host.to_owned(), port))
}

/// Whether `name` is a DNS name as the agent accepts it (letters in either case, digits and
/// '-', dot-separated labels of at most 63, a final dot allowed).
fn is_dns_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let trimmed = lower.strip_suffix('.').unwrap_or(&lower);
    !trimmed.is_empty()
        && trimmed.len() <= 253
        && trimmed.split('.').all(|label| label.len() <= 63)
        && gangplank_api::meta::is_dns1123_subdomain(trimmed)
}

/// The bundle's certificates as PEM, checked as the agent checks its `caBundle` (each must
/// be a certificate rustls accepts as a trust anchor).
fn ca_bundle(path: &Path) -> Result<String, Error> {
    let problem = |problem: String| Error::CaBundle {
        path: path.to_owned(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| problem(format!("cannot read it: {e}")))?;
    let what = path.display().to_string();
    let certs = gangplank_tls::certs_from_pem(&pem, &what).map_err(|e| {
        problem(format!(
            "{}: give the PEM file of the CA the endpoint's certificate chains to",
            e.to_string().trim_start_matches(&format!("{what}: "))
        ))
    })?;
    let options = gangplank_tls::ClientOptions {
        ca_bundle: Some(path.to_owned()),
        ..Default::default()
    };
    gangplank_tls::client_config(&options).map_err(|e| {
        problem(format!(
            "holds something that is not a usable CA certificate ({e}): give the PEM file of the CA the endpoint's certificate chains to"
        ))
    })?;
    let mut out = String::new();
    for cert in certs {
        let base64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in base64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(out)
}

/// The token in `path`, checked for shape (`<id>.<secret>`); never shown in an error.
fn join_token(path: &Path) -> Result<Secret, Error> {
    let problem = |problem: String| Error::JoinToken {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(format!("cannot read it: {e}")))?;
    let token = Secret::new(text.trim());
    gangplank_identity::token::Provider::from_value(token.clone()).map_err(|_| {
        problem(
            "does not hold a join token (<id>.<secret>, as `gangplank token create` prints it): give the file you saved its output in"
                .into(),
        )
    })?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dev CA's bundle in `dir`; returns its path and the CA's PEM.
    fn ca(dir: &Path) -> (PathBuf, String) {
        let ca = gangplank_tls::dev::Ca::generate("install-script test").unwrap();
        let path = dir.join("ca.pem");
        // Extra text around the certificate, as bundles often have: not embedded.
        std::fs::write(&path, format!("# our CA\n{}\n", ca.cert_pem())).unwrap();
        (path, ca.cert_pem().to_owned())
    }

    fn args(ca: &Path) -> ScriptArgs {
        ScriptArgs {
            endpoint: "onboarding.example.corp".into(),
            workload_group: "bookinfo/ratings".parse().unwrap(),
            ca_bundle: ca.to_owned(),
            sni: None,
            join_token_file: None,
            identity: None,
            format: None,
        }
    }

    /// The here-document `name` of the script, as the shell reads it.
    fn embedded(script: &str, name: &str) -> Option<String> {
        let start = format!("{name}() {{\n\tcat <<'{HEREDOC_END}'\n");
        let from = script.find(&start)? + start.len();
        let len = script[from..].find(&format!("\n{HEREDOC_END}\n"))?;
        Some(format!("{}\n", &script[from..from + len]))
    }

    #[test]
    fn the_embedded_onboarding_configuration_is_what_the_agent_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (bundle, ca_pem) = ca(dir.path());
        let path = Path::new(gangplank_agent::config::DEFAULT_ONBOARDING_PATH);

        let script = Script::from_args(&args(&bundle)).unwrap().render();
        let yaml = embedded(&script, "onboarding_config").expect("an onboarding_config here-document");
        let parsed = gangplank_agent::config::Onboarding::parse(path, &yaml).unwrap();
        assert_eq!(parsed.endpoint.host, "onboarding.example.corp");
        assert_eq!(parsed.endpoint.port, 15443);
        assert!(!yaml.contains("port:"), "the default port is left out:\n{yaml}");
        assert_eq!(parsed.endpoint.ca_bundle.as_deref(), Some(Path::new(CA_PATH)));
        assert_eq!(parsed.endpoint.sni, None);
        assert!(!parsed.endpoint.insecure_skip_verify);
        assert_eq!(parsed.workload_group, NamespacedName::new("bookinfo", "ratings"));
        assert!(yaml.starts_with(
            "apiVersion: config.agent.onboarding.tetrate.io/v1alpha1\nkind: OnboardingConfiguration\n"
        ));

        // The CA the agent is pointed at is the bundle's certificate, and only that.
        assert_eq!(embedded(&script, "ca_bundle").unwrap(), ca_pem);

        // Another port, an SNI, names YAML would read as other types.
        let mut other = args(&bundle);
        other.endpoint = "[fd00::5]:8443".into();
        other.sni = Some("onboarding.example.corp".into());
        other.workload_group = "null/yes".parse().unwrap();
        let script = Script::from_args(&other).unwrap().render();
        let yaml = embedded(&script, "onboarding_config").unwrap();
        let parsed = gangplank_agent::config::Onboarding::parse(path, &yaml).unwrap();
        assert_eq!(
            (parsed.endpoint.host.as_str(), parsed.endpoint.port),
            ("fd00::5", 8443)
        );
        assert_eq!(parsed.endpoint.sni.as_deref(), Some("onboarding.example.corp"));
        assert_eq!(parsed.workload_group, NamespacedName::new("null", "yes"));
        assert!(
            script.contains("base_url='https://onboarding.example.corp:8443/install'\n"),
            "{script}"
        );
        assert!(
            script.contains("connect_to='onboarding.example.corp:8443:[fd00::5]:8443'\n"),
            "{script}"
        );
    }

    #[test]
    fn the_embedded_agent_configuration_names_the_credential_and_none_is_written_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let (bundle, _) = ca(dir.path());
        let path = Path::new(gangplank_agent::config::DEFAULT_AGENT_PATH);
        use gangplank_agent::config::{Agent, Identity};
        use gangplank_identity::detect::{Host, Platform as P};

        let mut with_platform = args(&bundle);
        with_platform.identity = Some(Platform::AwsEc2);
        let script = Script::from_args(&with_platform).unwrap().render();
        let agent = Agent::parse(path, &embedded(&script, "agent_config").unwrap()).unwrap();
        assert!(
            matches!(
                agent.identity,
                Identity::Platform {
                    host: Host::Fixed(P::Aws),
                    ..
                }
            ),
            "{:?}",
            agent.identity
        );
        assert!(script.contains("\nwrites_agent_config=yes\n") && script.contains("\nwrites_token=no\n"));
        assert!(embedded(&script, "join_token").is_none());

        let token_file = dir.path().join("token");
        let token = "abcdefghij.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let mut with_token = args(&bundle);
        with_token.join_token_file = Some(token_file);
        let script = Script::from_args(&with_token).unwrap().render();
        let agent = Agent::parse(path, &embedded(&script, "agent_config").unwrap()).unwrap();
        assert_eq!(
            agent.identity,
            Identity::JoinToken {
                file: PathBuf::from(defaults::JOIN_TOKEN_FILE)
            }
        );
        assert_eq!(embedded(&script, "join_token").unwrap(), format!("{token}\n"));
        assert!(script.contains("\nwrites_token=yes\n"));

        let script = Script::from_args(&args(&bundle)).unwrap().render();
        assert!(embedded(&script, "agent_config").is_none() && embedded(&script, "join_token").is_none());
        assert!(script.contains("\nwrites_agent_config=no\n") && script.contains("\nwrites_token=no\n"));
        assert!(
            script.contains("# Credential: none is embedded. The agent's default is a join token in\n# /etc/gangplank/join-token"),
            "{script}"
        );
    }

    #[derive(Debug, serde::Deserialize)]
    struct CloudConfig {
        write_files: Vec<WriteFile>,
        runcmd: Vec<Vec<String>>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct WriteFile {
        path: String,
        owner: String,
        permissions: String,
        content: String,
    }

    #[test]
    fn user_data_writes_the_install_script_byte_for_byte_and_runs_it() {
        let dir = tempfile::tempdir().unwrap();
        let (bundle, _) = ca(dir.path());
        let mut with_platform = args(&bundle);
        with_platform.identity = Some(Platform::Auto);
        for args in [args(&bundle), with_platform] {
            let script = Script::from_args(&args).unwrap().render();
            let document = user_data(&script);
            assert!(document.starts_with("#cloud-config\n"), "{document}");
            let parsed: CloudConfig = serde_saphyr::from_str(&document).unwrap();
            let [file] = &parsed.write_files[..] else {
                panic!("{parsed:?}")
            };
            assert_eq!(file.path, USER_DATA_SCRIPT);
            assert_eq!(
                (file.owner.as_str(), file.permissions.as_str()),
                ("root:root", "0700")
            );
            assert!(
                file.content == script,
                "the script in user-data differs from install-script's"
            );
            assert_eq!(parsed.runcmd, [["sh", USER_DATA_SCRIPT]]);
        }
    }

    #[test]
    fn endpoints_are_host_and_port_with_the_default_port_when_left_out() {
        for (given, host, port) in [
            ("onboarding.example.corp", "onboarding.example.corp", 15443),
            ("Onboarding.Example.corp.:443", "Onboarding.Example.corp.", 443),
            ("10.0.0.5:15444", "10.0.0.5", 15444),
            ("fd00::5", "fd00::5", 15443),
            ("[fd00::5]", "fd00::5", 15443),
            ("[fd00::5]:8443", "fd00::5", 8443),
        ] {
            assert_eq!(endpoint(given).unwrap(), (host.to_owned(), port), "{given}");
        }
        for given in [
            "https://onboarding.example.corp",
            "onboarding.example.corp/install",
            "onboarding.example.corp:0",
            "onboarding.example.corp:https",
            "[onboarding.example.corp]:15443",
            "[fd00::5]15443",
            "under_score.example",
            "",
            "a'b",
        ] {
            let err = endpoint(given).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--endpoint {given:?}: ")), "{err}");
        }
    }
}
