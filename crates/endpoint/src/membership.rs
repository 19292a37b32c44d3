//! Live membership across replicas on Kubernetes, with Leases in the endpoint's namespace.
//!
//! - Every replica keeps its own Lease `gangplank-replica-<replica>` renewed (label
//!   `app.kubernetes.io/managed-by=gangplank`), so the others can tell it is alive;
//! - one replica at a time holds the Lease `gangplank-endpoint-sweeper` (taken when absent or
//!   expired, with a `resourceVersion`-conditional update, so two replicas never both win);
//! - the holder marks the entries claimed by a replica whose Lease is gone or expired as
//!   disconnected (`disconnected-at`, one write per entry, once); the sweep
//!   ([`crate::sweep`], run by every replica) then deletes them after the grace period unless
//!   their agent reconnected to a live replica meanwhile;
//! - the holder also deletes the replica Leases of dead pods, once they have been expired for
//!   [`STALE_AFTER`] of their own durations (a replica that was only slow renews its Lease
//!   meanwhile, and a delete conditional on the `resourceVersion` listed never removes a Lease
//!   renewed since), so Leases do not pile up with every rollout;
//! - a replica that shuts down cleanly leaves: it releases the sweeper Lease if it holds it
//!   ([`Membership::release_sweeper`]) and, once its agent streams recorded their disconnects,
//!   deletes its own Lease ([`Membership::leave`]), so another replica sweeps at its next
//!   round and counts it gone at once, instead of waiting for the Leases to expire.
//!
//! Steady-state heartbeats of agents write nothing: only the replica Leases are renewed, once
//! per renewal interval per replica, whatever the number of agents.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gangplank_api::Resource;
use gangplank_api::names::{annotation, label};
use gangplank_lease::{LeaseLock, expiry, expiry_after, holder};
use gangplank_registry::kube::ApiCall;
use gangplank_registry::{AnnotationPatch, Registry};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::config::Source;
use crate::plane::Plane;

/// The Lease the sweeping replica holds.
pub const LEADER_LEASE: &str = "gangplank-endpoint-sweeper";
/// The prefix of every replica's own Lease.
pub const REPLICA_LEASE_PREFIX: &str = "gangplank-replica-";
/// How many of its own durations a replica Lease stays expired before the sweeper deletes it.
pub const STALE_AFTER: i64 = 4;
/// How long one step of leaving (releasing the sweeper Lease, deleting the replica Lease) may
/// take; past it the step is given up and the Lease expires on its own, as after a crash. It
/// bounds the shutdown when the API server is unreachable.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Every call [`Membership`] makes, in the endpoint's namespace.
pub const API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: "get",
        names: &[],
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: "list",
        names: &[],
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: "create",
        names: &[],
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: "update",
        names: &[],
    },
    // A replica's own Lease when it leaves; stale Leases of dead pods (the sweeper).
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verb: "delete",
        names: &[],
    },
];

/// What can go wrong keeping membership.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Lease call failed.
    #[error(
        "Lease {name} in namespace {namespace}: {source}: check that the endpoint's Role allows get, list, create, update and delete on leases there"
    )]
    Lease {
        /// The namespace.
        namespace: String,
        /// The Lease.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The registry failed.
    #[error("marking entries of vanished replicas: {0}")]
    Registry(#[from] gangplank_registry::Error),
}

/// Membership settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// The endpoint's namespace (where the Leases live).
    pub namespace: String,
    /// This replica's name.
    pub replica: String,
    /// How long a Lease stays valid without renewal; renewed every third of it.
    pub lease_duration: Duration,
}

/// One replica's membership.
#[derive(Clone)]
pub struct Membership {
    lock: LeaseLock,
    options: Options,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn is_replica_lease(lease: &Lease) -> bool {
    lease
        .metadata
        .name
        .as_deref()
        .is_some_and(|n| n.starts_with(REPLICA_LEASE_PREFIX))
}

/// The replicas whose own Lease, among `leases`, is valid at `now`.
fn live_among(leases: &[Lease], now: OffsetDateTime) -> Vec<String> {
    leases
        .iter()
        .filter(|l| is_replica_lease(l) && expiry(l).is_some_and(|t| t > now))
        .filter_map(|l| holder(l).map(str::to_owned))
        .collect()
}

impl Membership {
    /// Membership of `options.replica` through `client`.
    pub fn new(client: kube::Client, options: Options) -> Self {
        let labels = BTreeMap::from([(label::MANAGED_BY.to_owned(), label::MANAGED_BY_VALUE.to_owned())]);
        Self {
            lock: LeaseLock::new(
                client,
                &options.namespace,
                &options.replica,
                options.lease_duration,
                labels,
            ),
            options,
        }
    }

    fn err(&self, name: &str) -> impl FnOnce(kube::Error) -> Error {
        let namespace = self.options.namespace.clone();
        let name = name.to_owned();
        move |source| Error::Lease {
            namespace,
            name,
            source,
        }
    }

    async fn hold(&self, name: &str, now: OffsetDateTime) -> Result<bool, Error> {
        self.lock.hold(name, now).await.map_err(self.err(name))
    }

    /// Renews this replica's own Lease.
    pub async fn renew(&self, now: OffsetDateTime) -> Result<(), Error> {
        let name = format!("{REPLICA_LEASE_PREFIX}{}", self.options.replica);
        self.hold(&name, now).await.map(drop)
    }

    /// Takes or keeps the sweeper Lease; whether this replica is the sweeper now.
    pub async fn lead(&self, now: OffsetDateTime) -> Result<bool, Error> {
        self.hold(LEADER_LEASE, now).await
    }

    /// Releases the sweeper Lease if this replica holds it, as client-go's leader election
    /// does with `ReleaseOnCancel`: the holder is cleared and the Lease lasts one second, so
    /// any other replica takes it at its next round instead of waiting for it to expire.
    /// Cleared rather than deleted, as client-go does: the Lease keeps its
    /// `leaseTransitions` (the history `kubectl describe lease` shows), any elector reads an
    /// empty holder as free, and it is the same conditional update that takes a Lease.
    /// Conditional on the version read: a Lease another replica took meanwhile is left
    /// alone. Whether it was released.
    pub async fn release_sweeper(&self, now: OffsetDateTime) -> Result<bool, Error> {
        self.lock
            .release(LEADER_LEASE, now)
            .await
            .map_err(self.err(LEADER_LEASE))
    }

    /// Deletes this replica's own Lease, if it is still this replica's and unchanged since
    /// read, so the other replicas count it gone at once. Whether it was deleted.
    pub async fn leave(&self) -> Result<bool, Error> {
        let name = format!("{REPLICA_LEASE_PREFIX}{}", self.options.replica);
        let Some(lease) = self.lock.api().get_opt(&name).await.map_err(self.err(&name))? else {
            return Ok(false);
        };
        if !self.lock.ours(&lease) {
            return Ok(false);
        }
        self.delete_unchanged(&lease).await
    }

    /// Deletes `lease` if its `resourceVersion` (and uid) are still the ones read; `Ok(false)`
    /// when it changed (renewed meanwhile) or is already gone.
    async fn delete_unchanged(&self, lease: &Lease) -> Result<bool, Error> {
        let name = lease.metadata.name.clone().unwrap_or_default();
        self.lock.delete_unchanged(lease).await.map_err(self.err(&name))
    }

    /// Every Gangplank replica Lease in the namespace (labelled `managed-by=gangplank`).
    pub async fn replica_leases(&self) -> Result<Vec<Lease>, Error> {
        let selector = format!("{}={}", label::MANAGED_BY, label::MANAGED_BY_VALUE);
        let list = self
            .lock
            .api()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(self.err("*"))?;
        Ok(list.items.into_iter().filter(is_replica_lease).collect())
    }

    /// The replicas whose own Lease is valid at `now`.
    pub async fn live_replicas(&self, now: OffsetDateTime) -> Result<Vec<String>, Error> {
        Ok(live_among(&self.replica_leases().await?, now))
    }

    /// Deletes, among `leases` (as listed by [`Membership::replica_leases`]), the replica
    /// Leases expired for [`STALE_AFTER`] of their durations at `now`, each only if unchanged
    /// since listed; returns how many. Only the sweeper calls this.
    pub async fn delete_stale(&self, leases: &[Lease], now: OffsetDateTime) -> Result<usize, Error> {
        let mut deleted = 0;
        for lease in leases.iter().filter(|l| is_replica_lease(l)) {
            // Without a renew time or duration its age is unknown: left alone.
            if expiry_after(lease, 1 + STALE_AFTER).is_none_or(|t| t > now) {
                continue;
            }
            if self.delete_unchanged(lease).await? {
                deleted += 1;
                tracing::info!(lease = ?lease.metadata.name, "replica Lease of a dead pod deleted");
            }
        }
        Ok(deleted)
    }

    /// Marks as disconnected (at `now`) every connected entry whose replica is not live;
    /// returns how many. Only the sweeper calls this.
    pub async fn mark_orphans(&self, registry: &dyn Registry, now: OffsetDateTime) -> Result<usize, Error> {
        let live = self.live_replicas(now).await?;
        self.mark_orphans_of(registry, &live, now).await
    }

    async fn mark_orphans_of(
        &self,
        registry: &dyn Registry,
        live: &[String],
        now: OffsetDateTime,
    ) -> Result<usize, Error> {
        let mut marked = 0;
        for entry in registry.managed_entries().await? {
            let annotations = entry.metadata.annotations.clone().unwrap_or_default();
            if annotations.contains_key(annotation::DISCONNECTED_AT) {
                continue;
            }
            let Some(replica) = annotations.get(annotation::ENDPOINT_REPLICA) else {
                continue;
            };
            if live.contains(replica) {
                continue;
            }
            let patch = AnnotationPatch {
                set: BTreeMap::from([(
                    annotation::DISCONNECTED_AT.to_owned(),
                    now.format(&Rfc3339).unwrap_or_default(),
                )]),
                remove: vec![annotation::CONNECTED_AT.to_owned()],
            };
            match registry.annotate_entry(&entry.key(), &patch).await {
                Ok(()) => {
                    marked += 1;
                    tracing::info!(entry = %entry.key(), %replica, "replica is gone: entry marked disconnected");
                }
                Err(gangplank_registry::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(marked)
    }

    /// One round: renew our Lease, take or keep the sweeper Lease, and if we hold it mark the
    /// orphans (returns how many) and delete stale replica Leases.
    pub async fn round(&self, registry: &dyn Registry) -> Result<usize, Error> {
        let now = OffsetDateTime::now_utc();
        self.renew(now).await?;
        if !self.lead(now).await? {
            return Ok(0);
        }
        let leases = self.replica_leases().await?;
        let marked = self
            .mark_orphans_of(registry, &live_among(&leases, now), now)
            .await?;
        self.delete_stale(&leases, now).await?;
        Ok(marked)
    }

    /// Runs rounds every third of the Lease duration until `stopping` is cancelled (a round
    /// under way finishes first), then releases the sweeper Lease if held. The replica's own
    /// Lease stays until [`Membership::leave`], so that the others keep counting this replica
    /// live while its agent streams record their disconnects.
    pub async fn run(self, registry: Arc<dyn Registry>, stopping: CancellationToken) {
        let every = (self.options.lease_duration / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopping.cancelled() => break,
            }
            if let Err(err) = self.round(registry.as_ref()).await {
                tracing::warn!(%err, "membership round failed; retrying");
            }
        }
        let released =
            tokio::time::timeout(LEAVE_TIMEOUT, self.release_sweeper(OffsetDateTime::now_utc())).await;
        match released {
            Ok(Ok(true)) => tracing::info!("sweeper Lease released"),
            Ok(Ok(false)) => {}
            Ok(Err(err)) => {
                tracing::warn!(%err, "releasing the sweeper Lease failed; another replica takes it once it expires");
            }
            Err(_) => {
                tracing::warn!(timeout = ?LEAVE_TIMEOUT, "releasing the sweeper Lease timed out; another replica takes it once it expires");
            }
        }
    }

    /// [`Membership::leave`], bounded by [`LEAVE_TIMEOUT`], failures logged: for shutdown.
    pub async fn leave_on_shutdown(&self) {
        match tokio::time::timeout(LEAVE_TIMEOUT, self.leave()).await {
            Ok(Ok(true)) => tracing::info!(replica = %self.options.replica, "replica Lease deleted"),
            Ok(Ok(false)) => {}
            Ok(Err(err)) => {
                tracing::warn!(%err, "deleting this replica's Lease failed; it expires, and the sweeper deletes it later");
            }
            Err(_) => {
                tracing::warn!(timeout = ?LEAVE_TIMEOUT, "deleting this replica's Lease timed out; it expires, and the sweeper deletes it later");
            }
        }
    }
}

/// Starts this replica's membership (replica Lease, sweeper election, marking entries of
/// vanished replicas) on the plane's tasks, when the plane uses `registry.kubernetes`; returns
/// it, for [`Membership::leave_on_shutdown`] once the plane's tasks are drained.
pub fn start(plane: &Plane) -> Option<Membership> {
    let (Source::Kubernetes(k8s), Some(client)) = (&plane.config.registry, &plane.kube) else {
        return None;
    };
    let m = Membership::new(
        client.clone(),
        Options {
            namespace: k8s.namespace.clone().unwrap_or_else(own_namespace),
            replica: plane.config.replica.clone(),
            lease_duration: k8s.lease_duration,
        },
    );
    plane
        .tasks
        .spawn(m.clone().run(plane.registry.clone(), plane.stopping.clone()));
    Some(m)
}

/// The pod's namespace: `POD_NAMESPACE`, else the service account's, else `gangplank-system`.
fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .or_else(|| std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "gangplank-system".to_owned())
}
