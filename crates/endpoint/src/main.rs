//! `gangplank-endpoint`: the onboarding endpoint VMs connect to on :15443.
//!
//! Exit codes: 0 after a clean shutdown, 1 when serving failed, 2 for a bad configuration
//! or input, 141 without a message when stdout was closed before `config-print` wrote to it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: gangplank_endpoint::alloc::Counting = gangplank_endpoint::alloc::Counting;

/// The Gangplank onboarding endpoint.
#[derive(Debug, Parser)]
#[command(name = "gangplank-endpoint", version, about)]
struct Cli {
    /// The EndpointConfiguration file.
    #[arg(
        long,
        short = 'c',
        env = "GANGPLANK_ENDPOINT_CONFIG",
        default_value = "/etc/gangplank/endpoint.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Print the configuration with every default filled in, then exit.
    ConfigPrint,
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
    let config = match gangplank_endpoint::Config::load(&cli.config) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::ConfigPrint) = cli.command {
        match serde_saphyr::to_string(&config.file) {
            Ok(text) => {
                return match gangplank_stdout::print(text) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(gangplank_stdout::Error::Closed) => ExitCode::from(gangplank_stdout::EXIT_CLOSED),
                    Err(err) => {
                        eprintln!("error: {err}");
                        ExitCode::FAILURE
                    }
                };
            }
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            if err.is_bad_input() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn serve(config: gangplank_endpoint::Config) -> gangplank_endpoint::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(gangplank_endpoint::Error::Signals)?;
    let plane = gangplank_endpoint::build(config).await?;
    let endpoint = gangplank_endpoint::start(plane).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    endpoint.shutdown().await;
    Ok(())
}
