//! `gangplank-agent`: onboards this host into the mesh and keeps its sidecar running.
//!
//! Exit codes: 0 after a clean shutdown, 1 when the agent failed (e.g. it could not
//! deregister), 2 when a configuration file is invalid (nothing was contacted), 78 when the
//! onboarding configuration is not written yet (missing, or only the packaged comments),
//! 141 without a message when stdout was closed before a command wrote its output.
//! `status` exits 0 while the agent runs and 3 when it does not (as `systemctl status`
//! does); `doctor` exits 0 when every check passed and 1 when one failed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use gangplank_agent::config::{self, DEFAULT_AGENT_PATH, DEFAULT_ONBOARDING_PATH};

/// Onboards this VM into an Istio mesh through a Gangplank onboarding endpoint, writes the
/// sidecar's boot files, starts the sidecar, keeps its token fresh and deregisters on
/// SIGTERM/SIGINT. Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more.
#[derive(Debug, Parser)]
#[command(name = "gangplank-agent", version)]
struct Cli {
    /// The OnboardingConfiguration: which endpoint, which WorkloadGroup.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ONBOARDING_PATH)]
    onboarding_config: PathBuf,
    /// The AgentConfiguration: identity, sidecar launcher, file locations, timings
    /// [default: /etc/gangplank/agent.yaml; defaults apply when that file is absent].
    #[arg(long, value_name = "PATH")]
    agent_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Onboard and keep the sidecar running (the default).
    Run(RunArgs),
    /// Deregister this VM now (its WorkloadEntry is removed) and stop its sidecar, with the
    /// VM's bound key; run while the agent is stopped. The packages run it on removal.
    /// Exits 0 also when there is nothing to leave.
    Leave,
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Show what the running agent is doing (from `<files.stateDir>/status.json`): entry,
    /// endpoint, session, sidecar token expiry, sidecar state and health, last error. Exits
    /// 0 while the agent runs, 3 when it does not.
    Status {
        /// Output format; `json` is the status file plus `"running"`.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Check why this VM can or cannot onboard: configuration, DNS, TCP, TLS, clock skew,
    /// credential, and the endpoint's policy decision (without onboarding). Each failed
    /// check says what to change. Exits 0 when every check passed, 1 when one failed.
    Doctor {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// For a person.
    Text,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, Default, clap::Args)]
struct RunArgs {
    /// What a stop (SIGTERM, SIGINT) does: `leave` deregisters and stops the sidecar;
    /// `stay` keeps the WorkloadEntry and the sidecar, for a restart, reboot or upgrade
    /// (the packaged systemd unit's choice).
    #[arg(long, value_enum, default_value_t)]
    on_stop: gangplank_agent::OnStop,
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Print the effective AgentConfiguration, every default filled in.
    Print,
    /// Validate both configuration files and exit (0 when valid, 2 when not).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();

    let (agent_path, agent_missing_ok) = match &cli.agent_config {
        Some(p) => (p.clone(), false),
        None => (PathBuf::from(DEFAULT_AGENT_PATH), true),
    };

    match cli.command.unwrap_or_else(|| Command::Run(RunArgs::default())) {
        Command::Config {
            action: ConfigAction::Print,
        } => match config::Agent::load(&agent_path, agent_missing_ok) {
            Ok(agent) => output(gangplank_stdout::print(agent.to_yaml())),
            Err(e) => config_error(&e),
        },
        Command::Config {
            action: ConfigAction::Check,
        } => match config::Config::load(&cli.onboarding_config, &agent_path, agent_missing_ok) {
            Ok(_) => output(gangplank_stdout::println("configuration is valid")),
            Err(e) => config_error(&e),
        },
        Command::Status { output } => match config::Agent::load(&agent_path, agent_missing_ok) {
            Ok(agent) => status(&agent.files.state_dir, output),
            Err(e) => config_error(&e),
        },
        Command::Doctor { output } => doctor(
            gangplank_agent::doctor::Paths {
                onboarding: cli.onboarding_config.clone(),
                agent: agent_path,
                agent_missing_ok,
            },
            output,
        ),
        Command::Run(args) => {
            let config = match config::Config::load(&cli.onboarding_config, &agent_path, agent_missing_ok) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            run(config, args.on_stop)
        }
        Command::Leave => {
            let config = match config::Config::load(&cli.onboarding_config, &agent_path, agent_missing_ok) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            leave(config)
        }
    }
}

/// How long `leave` may take: a package removal must not hang on an unreachable endpoint.
const LEAVE_NOW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn leave(config: config::Config) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let agent = match gangplank_agent::Agent::new(&config) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        };
        match agent.leave_now(LEAVE_NOW_TIMEOUT).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("gangplank-agent: cannot start the async runtime: {e}");
            None
        }
    }
}

fn run(config: config::Config, on_stop: gangplank_agent::OnStop) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let agent = match gangplank_agent::Agent::new(&config) {
            Ok(a) => a.with_on_stop(on_stop),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        };
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM/SIGINT: {e}");
                return ExitCode::FAILURE;
            }
        };
        match agent.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Exit code of `status` when the agent is not running (as `systemctl status`).
const EXIT_NOT_RUNNING: u8 = 3;

fn status(state_dir: &std::path::Path, output: Output) -> ExitCode {
    use gangplank_agent::status;
    let path = state_dir.join(status::FILE);
    let report = match status::read(state_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gangplank-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let running = report.as_ref().is_some_and(|r| status::running(r.pid));
    let not_running = match &report {
        None => format!(
            "gangplank-agent is not running (no status file at {})",
            path.display()
        ),
        Some(r) => format!(
            "gangplank-agent is not running (last status from {}, pid {})",
            r.updated_at, r.pid
        ),
    };
    let printed = match output {
        Output::Json => {
            let mut value = report
                .as_ref()
                .and_then(|r| serde_json::to_value(r).ok())
                .unwrap_or_else(|| serde_json::json!({}));
            value["running"] = serde_json::Value::Bool(running);
            if !running {
                eprintln!("{not_running}");
            }
            gangplank_stdout::println(serde_json::to_string_pretty(&value).unwrap_or_default())
        }
        Output::Text => {
            let mut text = String::new();
            if !running {
                text.push_str(&not_running);
                text.push('\n');
            }
            if let Some(r) = &report {
                if !running {
                    text.push('\n');
                }
                text.push_str(&describe(r, running));
            }
            gangplank_stdout::print(text)
        }
    };
    match output_code(printed) {
        Some(code) => code,
        None if running => ExitCode::SUCCESS,
        None => ExitCode::from(EXIT_NOT_RUNNING),
    }
}

/// A status report as `kubectl describe` would show it.
fn describe(r: &gangplank_agent::status::Report, running: bool) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        (
            "Agent",
            format!(
                "{} (pid {}, version {}, started {})",
                if running { "running" } else { "not running" },
                r.pid,
                r.version,
                r.started_at
            ),
        ),
        ("Phase", r.phase.as_str().to_string()),
        ("Endpoint", r.endpoint.clone()),
        ("Workload Group", r.workload_group.clone()),
        (
            "Workload Entry",
            match (&r.entry, &r.address) {
                (Some(e), Some(a)) => format!("{e} (address {a})"),
                (Some(e), None) => e.clone(),
                _ => "<none yet>".into(),
            },
        ),
        (
            "Session",
            match &r.session {
                Some(s) => format!(
                    "connected since {} (stream {}, replica {})",
                    s.connected_since, s.generation, s.replica
                ),
                None => "<not connected>".into(),
            },
        ),
        (
            "Sidecar Token",
            match &r.sidecar_token {
                Some(t) => format!("expires {}{}", t.expires_at, until(&t.expires_at)),
                None => "<none yet>".into(),
            },
        ),
        (
            "Sidecar",
            format!(
                "{} launcher, {}, {} ({})",
                r.sidecar.launcher,
                r.sidecar.state,
                if r.sidecar.healthy {
                    "healthy"
                } else {
                    "not healthy"
                },
                r.sidecar.message
            ),
        ),
        (
            "Last Error",
            match &r.last_error {
                Some(e) => format!("{} (at {})", e.message, e.at),
                None => "<none>".into(),
            },
        ),
        ("Updated", r.updated_at.clone()),
    ];
    let mut out = String::new();
    for (label, value) in lines.drain(..) {
        out.push_str(&format!("{:<16}{value}\n", format!("{label}:")));
    }
    out
}

/// ` (in 59m)` or ` (expired 3m ago)`, when `at` is RFC 3339.
fn until(at: &str) -> String {
    let Ok(at) = humantime::parse_rfc3339(at) else {
        return String::new();
    };
    let now = std::time::SystemTime::now();
    let whole =
        |d: std::time::Duration| humantime::format_duration(std::time::Duration::from_secs(d.as_secs()));
    match at.duration_since(now) {
        Ok(left) => format!(" (in {})", whole(left)),
        Err(e) => format!(" (expired {} ago)", whole(e.duration())),
    }
}

fn doctor(paths: gangplank_agent::doctor::Paths, output: Output) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gangplank-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(gangplank_agent::doctor::run(&paths));
    let printed = match output {
        Output::Text => gangplank_stdout::print(report.text()),
        Output::Json => gangplank_stdout::println(serde_json::to_string_pretty(&report).unwrap_or_default()),
    };
    match output_code(printed) {
        Some(code) => code,
        None if report.ok => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}

/// The exit code of a failed print, `None` when it succeeded.
fn output_code(printed: Result<(), gangplank_stdout::Error>) -> Option<ExitCode> {
    match printed {
        Ok(()) => None,
        failed => Some(output(failed)),
    }
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; leaving the mesh"),
            _ = int.recv() => tracing::info!("SIGINT received; leaving the mesh"),
        }
    })
}

/// The exit code of a command whose work was printing.
fn output(printed: Result<(), gangplank_stdout::Error>) -> ExitCode {
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(gangplank_stdout::Error::Closed) => ExitCode::from(gangplank_stdout::EXIT_CLOSED),
        Err(e) => {
            eprintln!("gangplank-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &config::Error) -> ExitCode {
    match e {
        config::Error::NotConfigured { .. } => eprintln!("gangplank-agent: {e}"),
        _ => eprintln!("gangplank-agent: invalid configuration: {e}"),
    }
    ExitCode::from(e.exit_code())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // GANGPLANK_LOG_FORMAT=json for log pipelines; otherwise text, coloured only on a terminal.
    if std::env::var("GANGPLANK_LOG_FORMAT").as_deref() == Ok("json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
