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
    let entries = plane.registry.managed_entries().await?;
    let live: Vec<NamespacedName> = plane
        .live
        .lock()
        .map(|l| l.keys().cloned().collect())
        .unwrap_or_default();
    let mut deleted = 0;
    let mut seen = Vec::new();
    for entry in entries {
        let key = entry.key();
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
                    deleted += 1;
                    plane.metrics.deleted("grace-period");
                    tracing::info!(entry = %key, "removed the entry of an agent gone longer than the grace period");
                }
                Err(err) => tracing::warn!(entry = %key, %err, "could not remove a stale entry"),
            }
        }
    }
    orphans.retain(|k, _| seen.contains(k));
    Ok(deleted)
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
