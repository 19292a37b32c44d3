//! `gangplank token create`: makes a join token for a WorkloadGroup.
//!
//! The token is printed alone on stdout (so `TOKEN=$(gangplank token create …)` works) and
//! shown only this once: the registry keeps its SHA-256 only. A human line goes to stderr.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use gangplank_api::NamespacedName;
use gangplank_identity::token;
use time::OffsetDateTime;

/// Arguments of `gangplank token`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a join token for a WorkloadGroup; prints the token on stdout.
    Create(CreateArgs),
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// The WorkloadGroup the token lets a VM join, as NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME")]
    workload_group: NamespacedName,
    /// How long the token is valid (e.g. 30m, 1h, 2d).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
    /// How many VMs may join with the token.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    uses: u32,
    /// Where the WorkloadGroup is and the token goes.
    #[command(flatten)]
    registry: crate::registry::Args,
    /// Output format: the token alone (default) or `json` with its details.
    #[arg(short = 'o', long, value_enum)]
    output: Option<Output>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Output {
    /// `{"token": …, "id": …, "workloadGroup": …, "expiresAt": …, "uses": …}`.
    Json,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 30m, 1h, 2d)"))?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    if d > Duration::from_secs(366 * 24 * 3600) {
        return Err("must be at most a year: join tokens are meant to be short-lived".into());
    }
    Ok(d)
}

/// Runs `gangplank token`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Create(args) => create(args).await,
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let crate::registry::Opened { registry, place } = args.registry.open().await?;
    let group = &args.workload_group;
    if registry.workload_group(group).await?.is_none() {
        bail!("WorkloadGroup {group} not found in {place}: create it first, or fix --workload-group");
    }
    let (stored, secret) = token::create(group, args.ttl, args.uses, OffsetDateTime::now_utc());
    registry
        .create_join_token(&stored)
        .await
        .context("storing the join token")?;
    let id = stored.metadata.name.as_deref().unwrap_or_default();
    let uses = match args.uses {
        1 => "1 use".to_string(),
        n => format!("{n} uses"),
    };
    eprintln!(
        "created join token {id} for WorkloadGroup {group}: expires {}, {uses}; it is shown only once",
        stored.spec.expires_at
    );
    match args.output {
        None => gangplank_stdout::println(secret.expose())?,
        Some(Output::Json) => {
            let out = serde_json::json!({
                "token": secret.expose(),
                "id": id,
                "workloadGroup": group.to_string(),
                "expiresAt": stored.spec.expires_at,
                "uses": args.uses,
            });
            gangplank_stdout::println(serde_json::to_string_pretty(&out)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
