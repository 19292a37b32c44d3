//! `gangplank instance release`: ends a VM's registration and its binding.
//!
//! A VM keeps its place through restarts by its bound key (a `WorkloadBinding`): releasing
//! deletes the binding first (so the VM cannot rejoin with its key), then its WorkloadEntry
//! (a connected agent is told at once, tries to rejoin, is refused, and stops its sidecar).
//! The VM can only join again with a new first-join credential (a new join token, a valid
//! JWT, a fresh cloud document).
//!
//! An EC2 instance holds one registration at a time, and later onboardings must be signed
//! with the agent key recorded at its first join; a re-imaged VM has lost that key. Releasing
//! deletes the instance's WorkloadEntries. Its next onboarding is a first join again, so it
//! must happen within the endpoint's `firstJoinWindow` after the instance's `pendingTime`
//! (stop and start the instance to renew it).

use std::process::ExitCode;

use gangplank_api::meta::{is_dns1123_label, is_dns1123_subdomain};
use gangplank_api::{NamespacedName, Resource};

/// Arguments of `gangplank instance`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Release a VM: its binding and WorkloadEntry (exit 0 released, 1 nothing to release).
    Release(ReleaseArgs),
}

#[derive(Debug, clap::Args)]
struct ReleaseArgs {
    /// The VM's WorkloadEntry, as NAMESPACE/NAME (or NAME with -n), or an EC2 instance id
    /// (i-0abc1234def567890: every registration of that instance).
    instance_id: String,
    /// The namespace of a WorkloadEntry given by NAME alone.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
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
    let is_instance = id
        .strip_prefix("i-")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    let named = if is_instance {
        None
    } else {
        let key = match (id.split_once('/'), &args.namespace) {
            (Some((ns, name)), None) => NamespacedName::new(ns, name),
            (None, Some(ns)) => NamespacedName::new(ns, id),
            (Some(_), Some(_)) => {
                anyhow::bail!("give the WorkloadEntry as NAMESPACE/NAME or as NAME with -n, not both")
            }
            (None, None) => anyhow::bail!(
                "{id:?} is neither NAMESPACE/NAME of a WorkloadEntry (or NAME with -n NAMESPACE) nor an EC2 instance id (i-0abc1234def567890)"
            ),
        };
        if !is_dns1123_label(&key.namespace) || !is_dns1123_subdomain(&key.name) {
            anyhow::bail!("{key} is not a valid namespace/name: both are lower-case DNS names");
        }
        Some(key)
    };
    let crate::registry::Opened { registry, place } = args.registry.open().await?;
    // Bindings first: a VM whose entry goes must not rejoin with its key.
    let bindings: Vec<NamespacedName> = match &named {
        Some(key) => vec![key.clone()],
        None => {
            let suffix = format!("/{id}");
            registry
                .bindings()
                .await?
                .into_iter()
                .filter(|b| b.spec.identity.starts_with("aws:") && b.spec.identity.ends_with(&suffix))
                .map(|b| b.key())
                .collect()
        }
    };
    let mut released_bindings = Vec::new();
    for key in bindings {
        if registry.delete_binding(&key).await? {
            released_bindings.push(key);
        }
    }
    let entries = match &named {
        Some(key) => {
            if registry.delete_entry(key).await? {
                vec![key.clone()]
            } else {
                vec![]
            }
        }
        None => {
            let store = gangplank_registry::IdentityStore::new(registry.clone());
            gangplank_identity::aws::release(&store, id).await?
        }
    };
    let what = if is_instance {
        format!("instance {id}")
    } else {
        id.to_owned()
    };
    if entries.is_empty() && released_bindings.is_empty() {
        gangplank_stdout::println(format_args!("{what} holds no registration in {place}"))?;
        return Ok(ExitCode::from(1));
    }
    for key in &released_bindings {
        gangplank_stdout::println(format_args!(
            "released {what}: deleted WorkloadBinding {key} (it cannot rejoin with its key)"
        ))?;
    }
    for key in &entries {
        gangplank_stdout::println(format_args!("released {what}: deleted WorkloadEntry {key}"))?;
    }
    Ok(ExitCode::SUCCESS)
}
