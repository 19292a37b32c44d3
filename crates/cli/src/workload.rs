//! `gangplank workload` (being built).

use std::process::ExitCode;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the command.
pub async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("gangplank workload is not built yet")
}
