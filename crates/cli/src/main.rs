//! `gangplank`: the admin CLI.
//!
//! `quickstart` runs the whole pull flow locally; `workload entry configure` renders the
//! sidecar's boot files like `istioctl x workload entry configure`; `token create` makes
//! join tokens; `policy explain` answers "would this identity be allowed?" offline;
//! `agent install-script` / `agent user-data` install the agent on a VM from the endpoint.
//!
//! Exit codes: 0 on success, 1 on failure (`policy explain`: denied), 2 for input refused
//! before anything was done, 141 without a message when stdout was closed before the output
//! was written (`gangplank install crds | head -1`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod install;
mod instance;
mod policy;
mod quickstart;
mod registry;
mod sidecar_bootstrap;
mod token;
mod workload;

/// Bring VMs and bare-metal servers into an Istio service mesh.
#[derive(Debug, Parser)]
#[command(name = "gangplank", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole onboarding flow locally: endpoint, agent and a stand-in sidecar.
    Quickstart(quickstart::Args),
    /// WorkloadEntry and WorkloadGroup tools (istioctl-compatible).
    Workload(workload::Args),
    /// Join tokens.
    Token(token::Args),
    /// OnboardingPolicy tools.
    Policy(policy::Args),
    /// Cloud instance registrations (`release` a re-imaged EC2 instance).
    Instance(instance::Args),
    /// Install Gangplank into a cluster: `gangplank install crds | kubectl apply -f -`.
    Install(install::Args),
    /// Install the agent on VMs from the onboarding endpoint: a shell script, or cloud-init
    /// user data for a launch template.
    Agent(agent::Args),
    /// Push the sidecar's bootstrap to VMs over SSH, from annotated WorkloadEntries.
    // The variant's attributes win over the Args struct's: the long text must be set here.
    #[command(
        long_about = sidecar_bootstrap::LONG_ABOUT,
        after_long_help = sidecar_bootstrap::after_long_help()
    )]
    SidecarBootstrap(sidecar_bootstrap::Args),
    /// The quickstart's stand-in sidecar (started by the quickstart's agent).
    #[command(hide = true)]
    QuickstartSidecar,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quickstart(args) => quickstart::run(args).await,
        Command::Workload(args) => workload::run(args).await,
        Command::Token(args) => token::run(args).await,
        Command::Policy(args) => policy::run(args).await,
        Command::Instance(args) => instance::run(args).await,
        Command::Install(args) => install::run(args).await,
        Command::Agent(args) => agent::run(args).await,
        Command::SidecarBootstrap(args) => sidecar_bootstrap::run(args).await,
        Command::QuickstartSidecar => quickstart::standin().await,
    };
    match result {
        Ok(code) => code,
        // The reader went away: nothing to say, and nobody to say it to.
        Err(err) if gangplank_stdout::closed(err.as_ref()) => ExitCode::from(gangplank_stdout::EXIT_CLOSED),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
