//! `gangplank sidecar-bootstrap`: push the sidecar's boot files to VMs over SSH, driven by
//! annotated WorkloadEntries (from the cluster or from `-f` files), many hosts in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use gangplank_api::istio::WorkloadEntry;
use gangplank_bootstrap::MeshConfig;
use gangplank_push::cluster::Cluster;
use gangplank_push::fleet::{self, Observer, Outcome};
use gangplank_push::plan::{Material, Runtime, Tense, Token};
use gangplank_push::source::{self, Selection, Selector};
use gangplank_push::target::Overrides;
use gangplank_push::{jobs, ssh};
use indicatif::{ProgressBar, ProgressStyle};

/// What `sidecar-bootstrap --help` says before the options (`-h` shows the first line only).
pub const LONG_ABOUT: &str = "\
Push the Istio sidecar's bootstrap (token, CA certificate, sidecar config) to VMs over SSH.

VMs are described by WorkloadEntries with sidecar-bootstrap.istio.io/* annotations (listed
below); flags override annotations.

Entries come from the cluster (kubeconfig, like kubectl: a token per service account by
TokenRequest, the root certificate from ConfigMap istio-ca-root-cert, the mesh config from
ConfigMap istio[-<revision>]), or, with -f FILE_OR_DIR, from YAML files: then no cluster is
needed and the token, root certificate and mesh config come from --token, --root-cert and
--mesh-config.

SSH goes through the system OpenSSH client: ~/.ssh/config, ssh-agent and known_hosts apply;
host keys are verified; it never prompts. A host costs one SSH connection (the steps run as
one script). Up to --concurrency hosts at once; a host not reached within --connect-timeout,
or whose steps take longer than --timeout, fails alone.

Runtimes (--proxy-runtime):
  docker   into proxy-config-dir: sidecar.env and istio-ca.pem (0644), istio-token (0600);
           --start-istio-proxy: docker rm --force <container>, docker run <container>
  systemd  Istio's .deb/.rpm layout under --remote-root: cluster.env, mesh, root-cert.pem
           (0644), istio-token (0600), owned by istio-proxy when that user exists;
           --ingress-ip: the istiod entry in /etc/hosts (one marked block, replaced on each
           push); --start-istio-proxy: systemctl restart istio

Exit status: 0 every host succeeded; 1 a host failed, or an input (entries, token, cluster)
could not be used; 2 a flag is unknown or its value invalid.";

/// What `sidecar-bootstrap --help` says after the options: every annotation with its
/// default, and examples.
pub fn after_long_help() -> String {
    let mut out = String::from("Annotations (on the WorkloadEntry unless said otherwise):\n");
    for a in gangplank_push::target::annotation::ALL {
        out.push_str(&format!(
            "  {}\n      {}\n      default: {}\n",
            a.name, a.meaning, a.default
        ));
    }
    out.push_str(
        "\nExamples:
  # Print every step, file and mode per VM, token redacted; touches no host
  gangplank sidecar-bootstrap --all -n bookinfo --start-istio-proxy --proxy-tag 1.27.1 --dry-run

  # One VM from the cluster, JSON summary
  gangplank sidecar-bootstrap ratings-vm.bookinfo --start-istio-proxy --proxy-tag 1.27.1 -o json

  # A fleet from a directory of entries, no cluster; Istio's package on the VMs
  gangplank sidecar-bootstrap --all -f entries/ --token token --root-cert root-cert.pem \\
    --proxy-runtime systemd --ingress-ip 203.0.113.10 --start-istio-proxy

  # Only the VMs labelled tier=db, 200 at once, fail fast on dead hosts
  gangplank sidecar-bootstrap -l tier=db -n shop --concurrency 200 --connect-timeout 5s",
    );
    out
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The WorkloadEntry, as NAME or NAME.NAMESPACE.
    name: Option<String>,
    /// Namespace of the WorkloadEntries (default: the kubeconfig's; with -f: all).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Every WorkloadEntry (in the namespace, if given).
    #[arg(short = 'a', long, conflicts_with = "name")]
    all: bool,
    /// WorkloadEntries whose labels match (k=v, k!=v, k, !k; comma-separated).
    #[arg(short = 'l', long, conflicts_with = "name")]
    selector: Option<String>,
    /// Read WorkloadEntries from this YAML file or folder instead of the cluster.
    #[arg(short = 'f', long = "filename", value_name = "FILE_OR_DIR")]
    file: Option<PathBuf>,
    /// With -f: the service-account token (audience istio-ca) to push.
    #[arg(long, value_name = "FILE", requires = "file")]
    token: Option<PathBuf>,
    /// With -f: the mesh root certificate(s), PEM.
    #[arg(long, value_name = "FILE", requires = "file")]
    root_cert: Option<PathBuf>,
    /// With -f: the mesh config YAML (the `mesh` key of ConfigMap istio); default empty.
    #[arg(long, value_name = "FILE", requires = "file")]
    mesh_config: Option<PathBuf>,
    /// Namespace istiod runs in.
    #[arg(short = 'i', long, default_value = "istio-system")]
    istio_namespace: String,
    /// Control plane revision.
    #[arg(long, default_value = "")]
    revision: String,
    /// ISTIO_META_CLUSTER_ID (default: Kubernetes).
    #[arg(long, default_value = "")]
    cluster_id: String,
    /// Lifetime of the requested tokens (cluster mode).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    duration: humantime::Duration,
    /// Also (re)start the sidecar: `docker run` istio-proxy, or `systemctl restart istio`.
    #[arg(long)]
    start_istio_proxy: bool,
    /// Print every step, file and command per host instead of doing it; touches no host.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: print the token instead of redacting it.
    #[arg(long)]
    show_secrets: bool,
    /// SSH private key (default: ssh-agent and the ssh config's IdentityFile).
    #[arg(short = 'k', long, value_name = "PATH")]
    ssh_key: Option<PathBuf>,
    /// SSH config file to use instead of ~/.ssh/config (ssh -F).
    #[arg(long, value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// SSH user (overrides the ssh-user annotation).
    #[arg(short = 'u', long)]
    ssh_user: Option<String>,
    /// SSH port (overrides the ssh-port annotation).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    ssh_port: Option<u16>,
    /// Remote directory of the docker bundle (overrides proxy-config-dir).
    #[arg(long)]
    proxy_config_dir: Option<String>,
    /// Registry of the proxyv2 image (overrides proxy-image-hub).
    #[arg(long)]
    proxy_image_hub: Option<String>,
    /// Tag of the proxyv2 image (the mesh's Istio version); needed to start a container.
    #[arg(long)]
    proxy_tag: Option<String>,
    /// How the sidecar runs on the VMs.
    #[arg(long, value_enum, default_value_t = RuntimeArg::Docker)]
    proxy_runtime: RuntimeArg,
    /// systemd runtime: prefix of Istio's native file layout on the VMs.
    #[arg(long, default_value = "/")]
    remote_root: String,
    /// systemd runtime: the gateway IP the VMs reach istiod through; its entry
    /// (`IP istiod.<istio-namespace>.svc`) goes into the VMs' /etc/hosts.
    #[arg(long, value_name = "IP")]
    ingress_ip: Option<std::net::IpAddr>,
    /// Time limit for the steps on one host, once connected.
    #[arg(long, value_name = "DURATION", default_value_t = fleet::DEFAULT_TIMEOUT.into(), value_parser = parse_duration)]
    timeout: humantime::Duration,
    /// Time limit for reaching one host: TCP connection, SSH banner, key exchange and login.
    #[arg(long, value_name = "DURATION", default_value_t = fleet::DEFAULT_CONNECT_TIMEOUT.into(), value_parser = parse_duration)]
    connect_timeout: humantime::Duration,
    /// Hosts in parallel (1-4096).
    #[arg(long, value_name = "N", default_value_t = fleet::DEFAULT_CONCURRENCY, value_parser = parse_concurrency)]
    concurrency: usize,
    /// Accept any host key (StrictHostKeyChecking=no, UserKnownHostsFile=/dev/null). Unsafe.
    #[arg(long)]
    ignore_host_keys: bool,
    /// Output format of the summary.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RuntimeArg {
    Docker,
    Systemd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<humantime::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 30s, 5m, 24h)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d.into())
}

fn parse_concurrency(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=4096) => Ok(n),
        _ => Err("must be a number of hosts from 1 to 4096".into()),
    }
}

/// Runs the command. The exit code is 0 only if every host succeeded.
pub async fn run(args: Args) -> Result<ExitCode> {
    let selector = args.selector.as_deref().map(Selector::parse).transpose()?;
    let mut selection = Selection {
        name: args.name.clone(),
        namespace: args.namespace.clone(),
        all: args.all,
        selector,
    };
    if selection.name.is_none() && !selection.all && selection.selector.is_none() {
        bail!(source::Error::NoSelection);
    }
    if args.ingress_ip.is_some() && matches!(args.proxy_runtime, RuntimeArg::Docker) {
        bail!(
            "--ingress-ip is for --proxy-runtime systemd (the hosts file of Istio's package); the docker runtime does not use it"
        );
    }

    let (entries, mesh_config, root_cert, tokens) = if let Some(path) = &args.file {
        let entries = selection.choose(source::read_entries(path)?)?;
        let token_path = args
            .token
            .as_ref()
            .context("with -f, pass --token FILE (the service-account token to push)")?;
        let token =
            std::fs::read(token_path).with_context(|| format!("reading --token {}", token_path.display()))?;
        let root_path = args
            .root_cert
            .as_ref()
            .context("with -f, pass --root-cert FILE (the mesh root certificate, PEM)")?;
        let root_cert = std::fs::read(root_path)
            .with_context(|| format!("reading --root-cert {}", root_path.display()))?;
        let mesh_config = match &args.mesh_config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading --mesh-config {}", p.display()))?;
                MeshConfig::from_yaml(&text).with_context(|| format!("--mesh-config {}", p.display()))?
            }
            None => MeshConfig::default(),
        };
        let token = Token::new(token.trim_ascii_end().to_vec());
        let tokens: BTreeMap<(String, String), Result<Token, String>> =
            entries.iter().map(|e| (sa_key(e), Ok(token.clone()))).collect();
        (entries, mesh_config, root_cert, tokens)
    } else {
        let cluster = Cluster::connect(&args.istio_namespace).await?;
        // Like kubectl: NAME.NAMESPACE, else -n, else the kubeconfig context's namespace.
        let namespace = selection
            .name_and_namespace()
            .and_then(|(_, ns)| ns)
            .or_else(|| selection.namespace.clone())
            .unwrap_or_else(|| cluster.default_namespace().to_string());
        selection.namespace = Some(namespace.clone());
        let entries = selection.choose(cluster.entries(&namespace).await?)?;
        let mesh_config = cluster
            .expanded_mesh_config(cluster.mesh_config(&args.revision).await?)
            .await?;
        let root_cert = cluster.root_cert().await?;
        let mut tokens = BTreeMap::new();
        let accounts: BTreeSet<(String, String)> = entries.iter().map(sa_key).collect();
        for (ns, sa) in accounts {
            let token = cluster
                .token(&ns, &sa, *args.duration)
                .await
                .map_err(|e| e.to_string());
            tokens.insert((ns, sa), token);
        }
        (entries, mesh_config, root_cert, tokens)
    };

    let material = Material {
        mesh_config,
        root_cert,
        cluster_id: args.cluster_id.clone(),
        istio_namespace: args.istio_namespace.clone(),
        revision: args.revision.clone(),
        proxy_tag: args.proxy_tag.clone(),
        remote_root: args.remote_root.clone(),
        runtime: match args.proxy_runtime {
            RuntimeArg::Docker => Runtime::Docker,
            RuntimeArg::Systemd => Runtime::Systemd,
        },
        start: args.start_istio_proxy,
        ingress_ip: args.ingress_ip,
    };
    let overrides = Overrides {
        ssh_user: args.ssh_user.clone(),
        ssh_port: args.ssh_port,
        proxy_config_dir: args.proxy_config_dir.clone(),
        proxy_image_hub: args.proxy_image_hub.clone(),
    };
    let token_for = |entry: &WorkloadEntry| {
        tokens
            .get(&sa_key(entry))
            .cloned()
            .unwrap_or_else(|| Err("no token was obtained for this entry".to_string()))
    };
    let jobs = jobs(&entries, &overrides, &material, &token_for);

    if args.dry_run {
        return dry_run(jobs, args.show_secrets, args.output);
    }

    let options = fleet::Options {
        concurrency: args.concurrency,
        timeout: *args.timeout,
        ssh: ssh::Options {
            key: args.ssh_key.clone(),
            config_file: args.ssh_config.clone(),
            ignore_host_keys: args.ignore_host_keys,
            connect_timeout: Some(*args.connect_timeout),
        },
    };
    let observer: Arc<dyn Observer> = if std::io::stderr().is_terminal() && args.output == Format::Text {
        Arc::new(Bar::new(jobs.len()))
    } else {
        Arc::new(Lines {
            to_stderr: args.output == Format::Json,
            closed: AtomicBool::new(false),
        })
    };
    let outcomes = fleet::run(jobs, &options, Arc::clone(&observer)).await;
    drop(observer);
    report(&outcomes, args.output)?;
    Ok(exit_code(&outcomes))
}

fn sa_key(e: &WorkloadEntry) -> (String, String) {
    let sa = match e.spec.service_account.as_str() {
        "" => "default",
        sa => sa,
    };
    (e.metadata.namespace.clone().unwrap_or_default(), sa.to_string())
}

fn dry_run(jobs: Vec<fleet::Job>, show_secrets: bool, format: Format) -> Result<ExitCode> {
    let mut outcomes = Vec::new();
    for job in jobs {
        let (ok, error) = match &job.plan {
            Ok(plan) => {
                if format == Format::Text {
                    gangplank_stdout::print(format_args!(
                        "# workload entry {}\n{}\n",
                        job.entry,
                        plan.describe(Tense::Future, show_secrets)
                    ))?;
                }
                (true, None)
            }
            Err(e) => {
                if format == Format::Text {
                    gangplank_stdout::println(format_args!("# workload entry {}\nerror: {e}\n", job.entry))?;
                }
                (false, Some(e.clone()))
            }
        };
        outcomes.push((job, ok, error));
    }
    if format == Format::Json {
        let items: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|(job, ok, error)| {
                serde_json::json!({
                    "entry": job.entry,
                    "host": job.host,
                    "ok": ok,
                    "error": error,
                    "plan": job.plan.as_ref().ok().map(|p| p.describe(Tense::Future, show_secrets)),
                })
            })
            .collect();
        gangplank_stdout::println(serde_json::Value::Array(items))?;
    }
    Ok(if outcomes.iter().all(|(_, ok, _)| *ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn report(outcomes: &[Outcome], format: Format) -> Result<()> {
    match format {
        Format::Text => gangplank_stdout::print(format_args!("\n{}", fleet::summary_table(outcomes)))?,
        Format::Json => gangplank_stdout::println(serde_json::to_string_pretty(&serde_json::json!({
            "hosts": outcomes,
            "succeeded": outcomes.iter().filter(|o| o.ok).count(),
            "failed": outcomes.iter().filter(|o| !o.ok).count(),
        }))?)?,
    }
    Ok(())
}

fn exit_code(outcomes: &[Outcome]) -> ExitCode {
    if outcomes.iter().all(|o| o.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Plain lines, one per step, prefixed with the entry (for pipes and CI logs).
struct Lines {
    to_stderr: bool,
    /// stdout went away: the push goes on, unreported, and the summary's print fails.
    closed: AtomicBool,
}

impl Observer for Lines {
    fn line(&self, entry: &str, line: &str) {
        if self.to_stderr {
            eprintln!("{entry}: {line}");
        } else if !self.closed.load(Ordering::Relaxed)
            && gangplank_stdout::println(format_args!("{entry}: {line}")).is_err()
        {
            self.closed.store(true, Ordering::Relaxed);
        }
    }

    fn finished(&self, outcome: &Outcome) {
        let result = match &outcome.error {
            None => "done".to_string(),
            Some(e) => format!("FAILED: {e}"),
        };
        self.line(&outcome.entry, &result);
    }
}

/// A progress bar on a terminal; failures are printed above it as they happen.
struct Bar(ProgressBar);

impl Bar {
    fn new(n: usize) -> Self {
        let bar = ProgressBar::new(u64::try_from(n).unwrap_or(u64::MAX));
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} hosts {msg}")
        {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Self(bar)
    }
}

impl Observer for Bar {
    fn line(&self, entry: &str, line: &str) {
        self.0.set_message(format!("{entry}: {line}"));
    }

    fn finished(&self, outcome: &Outcome) {
        if let Some(e) = &outcome.error {
            self.0.println(format!("{}: FAILED: {e}", outcome.entry));
        }
        self.0.inc(1);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
