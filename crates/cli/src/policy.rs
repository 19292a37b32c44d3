//! `gangplank policy explain`: would this identity be allowed to join this WorkloadGroup?
//!
//! Answers offline, with the same evaluation the endpoint runs, from the identity's facts
//! (JWT claims, or a join token id), the group and the policies (from a directory registry
//! and/or files). Exit status: 0 allowed, 1 denied, 2 bad input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use gangplank_api::NamespacedName;
use gangplank_api::istio::WorkloadGroup;
use gangplank_api::meta::Resource;
use gangplank_api::policy::OnboardingPolicy;
use gangplank_identity::{Facts, Identity, jwt, token};
use gangplank_registry::Registry as _;
use serde_json::Value;

/// Arguments of `gangplank policy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Explain whether an identity may join a WorkloadGroup (exit 0 allowed, 1 denied, 2 bad input).
    Explain(ExplainArgs),
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// The identity's facts, YAML or JSON: JWT claims (`iss`, `sub`, …) or
    /// `{joinToken: {id: …}}`.
    #[arg(long, value_name = "FILE")]
    credential_claims: PathBuf,
    /// The WorkloadGroup to join, as NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME")]
    workload_group: NamespacedName,
    /// A directory registry to read the group and the namespace's policies from.
    #[arg(long, env = "GANGPLANK_REGISTRY", value_name = "DIR")]
    registry: Option<PathBuf>,
    /// An OnboardingPolicy file (YAML); repeat for several. Added to the registry's.
    #[arg(long = "policy", value_name = "FILE")]
    policies: Vec<PathBuf>,
    /// A WorkloadGroup file (YAML), instead of reading the group from the registry.
    #[arg(long, value_name = "FILE")]
    group_file: Option<PathBuf>,
}

/// Runs `gangplank policy`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Explain(args) => explain(args).await,
    }
}

async fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let (policies, group, identity) = match load(&args).await {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("error: {err:#}");
            return Ok(ExitCode::from(2));
        }
    };
    gangplank_stdout::print(gangplank_policy::explain(&policies, &group, &identity))?;
    let decision = gangplank_policy::evaluate(&policies, &group, &identity);
    Ok(if decision.is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn load(args: &ExplainArgs) -> anyhow::Result<(Vec<OnboardingPolicy>, WorkloadGroup, Identity)> {
    let key = &args.workload_group;
    let registry = match &args.registry {
        Some(dir) => Some(crate::registry::open_dir(dir)?),
        None => None,
    };
    let group = match (&args.group_file, &registry) {
        (Some(file), _) => {
            let group: WorkloadGroup = read_yaml(file, "WorkloadGroup")?;
            let found = group.key();
            if &found != key {
                bail!(
                    "{} holds WorkloadGroup {found}, not {key}: fix --workload-group or the file's metadata",
                    file.display()
                );
            }
            group
        }
        (None, Some(registry)) => registry.workload_group(key).await?.ok_or_else(|| {
            anyhow!(
                "WorkloadGroup {key} not found in registry {}: create it, or pass --group-file",
                registry.root().display()
            )
        })?,
        (None, None) => bail!("pass --registry DIR (or set GANGPLANK_REGISTRY) or --group-file FILE"),
    };
    let mut policies = match &registry {
        Some(registry) => registry.policies(&key.namespace).await?,
        None => Vec::new(),
    };
    for file in &args.policies {
        let policy: OnboardingPolicy = read_yaml(file, "OnboardingPolicy")?;
        if policy
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default()
            .is_empty()
        {
            bail!(
                "{}: metadata.namespace is missing: policies are namespaced, set it",
                file.display()
            );
        }
        policies.push(policy);
    }
    let identity = identity(&args.credential_claims, key)?;
    Ok((policies, group, identity))
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| anyhow!("{} is not a valid {what}: {e}", path.display()))
}

/// The identity described by a claims file.
fn identity(path: &Path, group: &NamespacedName) -> anyhow::Result<Identity> {
    let claims: Value = read_yaml(path, "claims file")?;
    let shape = || {
        anyhow!(
            "{}: expected JWT claims (with string iss and sub), {{joinToken: {{id: …}}}}, \
             {{aws: {{account, region, zone, instanceId, iamRole}}}}, {{gcp: {{projectId, zone, instanceName}}}} \
             or {{azure: {{subscriptionId, vmId}}}}",
            path.display()
        )
    };
    let Value::Object(map) = &claims else {
        return Err(shape());
    };
    if let Some(facts) = cloud_facts(map).transpose() {
        let facts = facts.map_err(|e| anyhow!("{}: {e}", path.display()))?;
        return Ok(Identity { facts, address: None });
    }
    if let Some(jt) = map.get("joinToken") {
        let id = jt.get("id").and_then(Value::as_str).ok_or_else(shape)?;
        // The verifier only accepts a token for the group it was created for.
        let workload_group = jt
            .get("workloadGroup")
            .and_then(Value::as_str)
            .unwrap_or(&group.name)
            .to_string();
        return Ok(Identity {
            facts: Facts::JoinToken(token::Facts {
                id: id.to_string(),
                namespace: group.namespace.clone(),
                workload_group,
                key: String::new(),
            }),
            address: None,
        });
    }
    let issuer = map.get("iss").and_then(Value::as_str).ok_or_else(shape)?;
    let subject = map.get("sub").and_then(Value::as_str).ok_or_else(shape)?;
    Ok(Identity {
        facts: Facts::Jwt(jwt::Facts {
            issuer: issuer.to_string(),
            subject: subject.to_string(),
            claims: claims.clone(),
        }),
        address: None,
    })
}

/// Cloud platform facts, as a person writes them: `{aws: {account, region, zone,
/// instanceId, iamRole, …}}`, `{gcp: {projectId, zone, instanceName, serviceAccount, …}}` or
/// `{azure: {subscriptionId, vmId, sku}}` (camelCase, as recorded on WorkloadEntries).
fn cloud_facts(map: &serde_json::Map<String, Value>) -> Result<Option<Facts>, String> {
    if let Some(v) = map.get("aws") {
        return gangplank_identity::aws::Facts::from_value(v).map(|f| Some(Facts::Aws(f)));
    }
    if let Some(v) = map.get("gcp") {
        return serde_json::from_value(v.clone())
            .map(|f| Some(Facts::Gcp(f)))
            .map_err(|e| format!("gcp facts need projectId, zone and instanceName ({e})"));
    }
    if let Some(v) = map.get("azure") {
        return serde_json::from_value(v.clone())
            .map(|f| Some(Facts::Azure(f)))
            .map_err(|e| format!("azure facts need subscriptionId and vmId ({e})"));
    }
    Ok(None)
}
