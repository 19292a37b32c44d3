//! `gangplank install crds`: prints Gangplank's CustomResourceDefinitions (OnboardingPolicy,
//! JoinToken, WorkloadBinding, and the operator's OnboardingPlane) as YAML, for
//! `gangplank install crds | kubectl apply -f -`.
//!
//! The same text is shipped as `deploy/crds/gangplank.yaml` and `deploy/crds/onboardingplane.yaml`.

use std::process::ExitCode;

use anyhow::Context;

/// Arguments of `gangplank install`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print Gangplank's CRDs as YAML (pipe into `kubectl apply -f -`).
    Crds,
}

/// Runs `gangplank install`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Crds => {
            let mut yaml = gangplank_registry::crds::yaml().context("rendering Gangplank's CRDs")?;
            let plane = gangplank_operator::crd_yaml().context("rendering the OnboardingPlane CRD")?;
            yaml.push_str("---\n");
            yaml.push_str(&plane);
            gangplank_stdout::print(yaml)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
