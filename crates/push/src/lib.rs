//! `gangplank sidecar-bootstrap`: push the Istio sidecar's boot files to VMs over SSH,
//! driven by annotated WorkloadEntries (Tetrate's `tctl x sidecar-bootstrap`, for a fleet).
//!
//! The pieces, in the order they are used:
//! - [`source`]: which WorkloadEntries (YAML files/folders) and the selection;
//! - [`cluster`]: the same, plus token, root certificate and mesh config, from Kubernetes;
//! - [`target`]: where each VM is (the `sidecar-bootstrap.istio.io/*` annotations);
//! - [`plan`]: what to do there (files rendered by `gangplank-bootstrap`, commands);
//! - [`ssh`]: doing it with the system OpenSSH client;
//! - [`fleet`]: many hosts in parallel, one outcome each.

pub mod cluster;
pub mod fleet;
pub mod plan;
pub mod source;
pub mod ssh;
pub mod target;

use gangplank_api::istio::WorkloadEntry;

use crate::plan::{Material, Plan, Token};
use crate::target::{Overrides, Target};

/// Makes one [`fleet::Job`] per entry; entries whose target or plan cannot be made become
/// failed jobs that say why (they are never contacted). `token_for` gives the token for a
/// service account.
pub fn jobs(
    entries: &[WorkloadEntry],
    overrides: &Overrides,
    material: &Material,
    token_for: &dyn Fn(&WorkloadEntry) -> Result<Token, String>,
) -> Vec<fleet::Job> {
    entries
        .iter()
        .map(|entry| {
            let id = format!(
                "{}/{}",
                entry.metadata.namespace.as_deref().unwrap_or(""),
                entry.metadata.name.as_deref().unwrap_or("")
            );
            let target = Target::resolve(entry, overrides);
            let host = match &target {
                Ok(t) => t.destination(),
                Err(_) => entry.spec.address.clone(),
            };
            let plan = target.map_err(|e| e.to_string()).and_then(|t| {
                let token = token_for(entry)?;
                Plan::build(entry, t, material, &token).map_err(|e| e.to_string())
            });
            fleet::Job {
                entry: id,
                host,
                plan,
            }
        })
        .collect()
}
