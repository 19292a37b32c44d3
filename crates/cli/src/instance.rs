//! `gangplank instance release`: ends an AWS EC2 instance's registration, so the instance
//! (e.g. re-imaged, with a new agent key) can onboard again.
//!
//! An EC2 instance holds one registration at a time, and later onboardings must be signed
//! with the agent key recorded at its first join; a re-imaged VM has lost that key. Releasing
//! deletes the instance's WorkloadEntries. Its next onboarding is a first join again, so it
//! must happen within the endpoint's `firstJoinWindow` after the instance's `pendingTime`
//! (stop and start the instance to renew it).

use std::process::ExitCode;

/// Arguments of `gangplank instance`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Release an EC2 instance's registration (exit 0 released, 1 nothing to release).
    Release(ReleaseArgs),
}

#[derive(Debug, clap::Args)]
struct ReleaseArgs {
    /// The EC2 instance id, e.g. i-0abc1234def567890.
    instance_id: String,
    /// Where the instance's registration is.
    #[command(flatten)]
    registry: crate::registry::Args,
}

/// Runs `gangplank instance`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Release(args) => release(args).await,
    }
}

async fn release(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let id = args.instance_id.trim();
    let valid = id
        .strip_prefix("i-")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid {
        anyhow::bail!("{id:?} is not an EC2 instance id: it looks like i-0abc1234def567890");
    }
    let crate::registry::Opened { registry, place } = args.registry.open().await?;
    let store = gangplank_registry::IdentityStore::new(registry);
    let released = gangplank_identity::aws::release(&store, id).await?;
    if released.is_empty() {
        gangplank_stdout::println(format_args!("instance {id} holds no registration in {place}"))?;
        return Ok(ExitCode::from(1));
    }
    for key in &released {
        gangplank_stdout::println(format_args!(
            "released instance {id}: deleted WorkloadEntry {key}"
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
