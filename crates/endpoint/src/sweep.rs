//! Removes the entries of agents that vanished.
//!
//! An entry goes after the grace period when
//! - its agent's stream was lost (`disconnected-at` older than the grace period), or
//! - it claims to be served by this replica, but no stream here has held it for the whole
//!   grace period (the agent never opened its stream, or this replica restarted and the agent
//!   never came back).
//!
//! Entries claimed by other replicas are left to them (the Kubernetes registry elects one
//! sweeper for replicas that die).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gangplank_api::names::annotation;
use gangplank_api::{NamespacedName, Resource};
use tokio::time::Instant;

use crate::plane::Plane;

/// How often the sweep runs for a grace period: a tenth of it, between 1 s and 30 s.
pub fn interval(grace: Duration) -> Duration {
    (grace / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Runs the sweep until the plane stops; a pass under way finishes first.
pub async fn run(plane: Arc<Plane>) {
    let grace = plane.config.file.workloads.grace_period;
    let mut tick = tokio::time::interval(interval(grace));
    let mut orphans: HashMap<NamespacedName, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = plane.stopping.cancelled() => return,
        }
        if let Err(err) = once(&plane, &mut orphans).await {
            tracing::warn!(%err, "sweep failed; retrying at the next tick");
        }
    }
}

fn parse(ts: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()
}

/// One pass: deletes what is due; `orphans` remembers since when entries of this replica
/// have had no stream here.
pub async fn once(
    plane: &Plane,
    orphans: &mut HashMap<NamespacedName, Instant>,
) -> Result<usize, gangplank_registry::Error> {
    let grace = plane.config.file.workloads.grace_period;
    let now = time::OffsetDateTime::now_utc();
    // Bindings before entries: an onboarding writes its entry before its binding, so every
    // binding listed here whose entry is missing from the later listing really lost it.
    // (Listed the other way round, a binding made between the two listings looked
    // entry-less, was stamped, and was unstamped by the next sweep: two needless writes.)
    let bindings = plane.registry.bindings().await?;
    let entries = plane.registry.managed_entries().await?;
    let live: std::collections::HashSet<NamespacedName> = plane
        .live
        .lock()
        .map(|l| l.keys().cloned().collect())
        .unwrap_or_default();
    let mut deleted = 0;
    let mut seen = Vec::new();
    let mut remaining = std::collections::HashSet::new();
    for entry in entries {
        let key = entry.key();
        remaining.insert(key.clone());
        let annotations = entry.metadata.annotations.clone().unwrap_or_default();
        let gone_since = annotations
            .get(annotation::DISCONNECTED_AT)
            .and_then(|t| parse(t));
        let replica = annotations.get(annotation::ENDPOINT_REPLICA);
        let due = if let Some(since) = gone_since {
            now - since > grace
        } else if replica == Some(&plane.config.replica) && !live.contains(&key) {
            seen.push(key.clone());
            let since = *orphans.entry(key.clone()).or_insert_with(Instant::now);
            since.elapsed() > grace
        } else {
            false
        };
        if due {
            match plane.registry.delete_entry(&key).await {
                Ok(_) => {
                    remaining.remove(&key);
                    deleted += 1;
                    plane.metrics.deleted("grace-period");
                    tracing::info!(entry = %key, "removed the entry of an agent gone longer than the grace period");
                }
                Err(err) => tracing::warn!(entry = %key, %err, "could not remove a stale entry"),
            }
        }
    }
    orphans.retain(|k, _| seen.contains(k));
    expire_bindings(plane, bindings, &remaining, now).await?;
    Ok(deleted)
}

/// Ends the bindings of VMs gone for too long: a binding with no entry is stamped with
/// when that was first seen, and deleted `workloads.bindingRetention` after it (so a VM can
/// rejoin with its bound key for the grace period plus the retention after it vanished). A
/// binding whose entry is back loses its stamp.
async fn expire_bindings(
    plane: &Plane,
    bindings: Vec<gangplank_api::binding::WorkloadBinding>,
    entries: &std::collections::HashSet<gangplank_api::NamespacedName>,
    now: time::OffsetDateTime,
) -> Result<(), gangplank_registry::Error> {
    let retention = plane.config.file.workloads.binding_retention;
    for mut binding in bindings {
        let key = binding.key();
        let stamped = parse(&binding.status.entry_gone_since);
        let has_entry = entries.contains(&key);
        let acts = match (has_entry, stamped) {
            (true, None) => false,
            (false, Some(since)) => now - since > retention,
            _ => true,
        };
        // The listings are older than this decision (a whole entry pass ran since): a VM
        // that rejoined meanwhile wrote a new binding and entry, which must not be stamped,
        // unstamped back to an old key, or deleted. Act only on the binding as listed, and
        // only while its entry is still as listed.
        if acts && !still_as_listed(plane, &binding, has_entry).await? {
            continue;
        }
        let write = match (has_entry, stamped) {
            (true, None) => false,
            (false, Some(since)) if now - since <= retention => false,
            (true, Some(_)) => {
                binding.status.entry_gone_since.clear();
                true
            }
            (false, None) => {
                binding.status.entry_gone_since = crate::plane::now_rfc3339();
                true
            }
            (false, Some(_)) => {
                match plane.registry.delete_binding(&key).await {
                    Ok(_) => {
                        plane.metrics.deleted("binding-expired");
                        tracing::info!(binding = %key, "removed the binding of a VM gone longer than the grace period and workloads.bindingRetention; it must present a first-join credential again");
                    }
                    Err(err) => tracing::warn!(binding = %key, %err, "could not remove an expired binding"),
                }
                false
            }
        };
        if write && let Err(err) = plane.registry.apply_binding(&binding).await {
            tracing::warn!(binding = %key, %err, "could not record the binding's entry state");
        }
    }
    Ok(())
}

/// Whether `listed` is still the stored binding (same resourceVersion) and its entry still
/// exists exactly when `had_entry`.
async fn still_as_listed(
    plane: &Plane,
    listed: &gangplank_api::binding::WorkloadBinding,
    had_entry: bool,
) -> Result<bool, gangplank_registry::Error> {
    let key = listed.key();
    let stored = plane.registry.binding(&key).await?;
    if stored.map(|b| b.metadata.resource_version) != Some(listed.metadata.resource_version.clone()) {
        return Ok(false);
    }
    Ok(plane.registry.entry(&key).await?.is_some() == had_entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_a_tenth_of_the_grace_period_within_bounds() {
        assert_eq!(interval(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(interval(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(interval(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(interval(Duration::from_secs(3600)), Duration::from_secs(30));
    }
}
