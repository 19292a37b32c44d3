//! `gangplank-operator`: `run` reconciles OnboardingPlanes; `crd` prints their CRD.

use std::process::ExitCode;

use clap::Parser;

/// Reconciles OnboardingPlanes into gangplank-endpoint Deployments.
#[derive(Debug, Parser)]
#[command(name = "gangplank-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the controller (kubeconfig, or in-cluster config inside a pod).
    Run {
        /// Watch planes in this namespace only (default: every namespace).
        #[arg(long, env = "GANGPLANK_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
    },
    /// Print the OnboardingPlane CRD as YAML (pipe into `kubectl apply -f -`).
    Crd,
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
            Ok(yaml) => match gangplank_stdout::print(yaml) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("error: rendering the OnboardingPlane CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { namespace } => match run(namespace).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run(namespace: Option<String>) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration: run in a pod, or set KUBECONFIG / ~/.kube/config")?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        "gangplank-operator running"
    );
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: waiting for running reconciles");
    };
    gangplank_operator::controller::run(client, namespace.as_deref(), shutdown).await;
    Ok(())
}
