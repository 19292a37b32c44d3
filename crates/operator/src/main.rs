//! `gangplank-operator`: `run` reconciles OnboardingPlanes; `crd` prints their CRD;
//! `manifest` prints `deploy/operator.yaml`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Reconciles OnboardingPlanes into gangplank-endpoint Deployments.
#[derive(Debug, Parser)]
#[command(name = "gangplank-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the operator (kubeconfig, or in-cluster config inside a pod): install the CRDs,
    /// then reconcile planes while holding the leader Lease.
    Run(Run),
    /// Print the OnboardingPlane CRD as YAML (pipe into `kubectl apply -f -`).
    Crd,
    /// Print the operator's install manifest (deploy/operator.yaml).
    Manifest {
        /// The operator's image.
        #[arg(long, default_value_t = gangplank_operator::manifest::default_image())]
        image: String,
        /// The operator's namespace.
        #[arg(short = 'n', long, default_value = "gangplank-system")]
        namespace: String,
    },
}

#[derive(Debug, clap::Args)]
struct Run {
    /// Watch planes in this namespace only (default: every namespace).
    #[arg(long, env = "GANGPLANK_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Install and upgrade Gangplank's CRDs at start-up.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    install_crds: bool,
    /// Reconcile only while holding the leader Lease (false: a single replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    leader_elect: bool,
    /// Namespace of the leader Lease (in a pod: the pod's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "gangplank-system")]
    lease_namespace: String,
    /// This replica's name in the Lease (in a pod: the pod's; else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long the leader Lease lasts without renewal (renewed every third of it).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], gangplank_operator::manifest::MONITORING_PORT)))]
    monitoring_listen: SocketAddr,
}

fn print(text: String) -> ExitCode {
    match gangplank_stdout::print(text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    // GANGPLANK_LOG_FORMAT=json for log pipelines; otherwise text, coloured only on a terminal.
    if std::env::var("GANGPLANK_LOG_FORMAT").as_deref() == Ok("json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match cli.command {
        Command::Crd => match gangplank_operator::crd_yaml() {
            Ok(yaml) => print(yaml),
            Err(e) => {
                eprintln!("error: rendering the OnboardingPlane CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Manifest { image, namespace } => {
            let settings = gangplank_operator::manifest::Settings {
                image,
                namespace,
                ..Default::default()
            };
            match gangplank_operator::manifest::yaml(&settings) {
                Ok(yaml) => print(yaml),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(run_args) => match run(run_args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run(args: Run) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let listener = tokio::net::TcpListener::bind(args.monitoring_listen)
        .await
        .with_context(|| format!("listening on {} (--monitoring-listen)", args.monitoring_listen))?;
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration: run in a pod, or set KUBECONFIG / ~/.kube/config")?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    if args.lease_duration < gangplank_operator::election::MIN_LEASE
        || args.lease_duration.subsec_nanos() != 0
    {
        anyhow::bail!(
            "--lease-duration {}: use whole seconds, at least {}s (15s is the default)",
            humantime::format_duration(args.lease_duration),
            gangplank_operator::election::MIN_LEASE.as_secs()
        );
    }
    // Unique even when two replicas share a host name (host network) and a pid (1).
    let identity = args.identity.unwrap_or_else(|| {
        use rand::RngCore;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{:08x}", host.trim(), rand::rng().next_u32())
    });
    tracing::info!(
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        %identity,
        monitoring = %args.monitoring_listen,
        "gangplank-operator running"
    );
    let stopping = CancellationToken::new();
    let metrics = Arc::new(gangplank_operator::metrics::Metrics::default());
    let monitoring = tokio::spawn(gangplank_operator::metrics::serve(
        listener,
        metrics.clone(),
        stopping.clone(),
    ));
    let stop = stopping.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: waiting for running reconciles");
        stop.cancel();
    });
    let options = gangplank_operator::Options {
        namespace: args.namespace,
        install_crds: args.install_crds,
        leader_elect: args.leader_elect,
        lease_namespace: args.lease_namespace,
        identity,
        lease_duration: args.lease_duration,
    };
    let result = gangplank_operator::run(client, options, metrics, stopping.clone()).await;
    stopping.cancel();
    let _ = monitoring.await;
    result.map_err(Into::into)
}
