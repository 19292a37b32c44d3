//! Live membership across replicas on Kubernetes, with Leases in the endpoint's namespace.
//!
//! - Every replica keeps its own Lease `gangplank-replica-<replica>` renewed (label
//!   `app.kubernetes.io/managed-by=gangplank`), so the others can tell it is alive;
//! - one replica at a time holds the Lease `gangplank-endpoint-sweeper` (taken when absent or
//!   expired, with a `resourceVersion`-conditional update, so two replicas never both win);
//! - the holder marks the entries claimed by a replica whose Lease is gone or expired as
//!   disconnected (`disconnected-at`, one write per entry, once); the sweep
//!   ([`crate::sweep`], run by every replica) then deletes them after the grace period unless
//!   their agent reconnected to a live replica meanwhile.
//!
//! Steady-state heartbeats of agents write nothing: only the replica Leases are renewed, once
//! per renewal interval per replica, whatever the number of agents.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gangplank_api::Resource;
use gangplank_api::names::{annotation, label};
use gangplank_registry::kube::ApiCall;
use gangplank_registry::{AnnotationPatch, Registry};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::config::Source;
use crate::plane::Plane;

/// The Lease the sweeping replica holds.
pub const LEADER_LEASE: &str = "gangplank-endpoint-sweeper";
/// The prefix of every replica's own Lease.
pub const REPLICA_LEASE_PREFIX: &str = "gangplank-replica-";

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
];

/// What can go wrong keeping membership.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Lease call failed.
    #[error(
        "Lease {name} in namespace {namespace}: {source}: check that the endpoint's Role allows get, list, create and update on leases there"
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
    leases: Api<Lease>,
    options: Options,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn micro(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// When `lease` expires, from its renew time and duration; `None` if it has neither.
fn expiry(lease: &Lease) -> Option<OffsetDateTime> {
    let v = serde_json::to_value(lease).ok()?;
    let renewed = OffsetDateTime::parse(v["spec"]["renewTime"].as_str()?, &Rfc3339).ok()?;
    let seconds = v["spec"]["leaseDurationSeconds"].as_i64()?;
    Some(renewed + time::Duration::seconds(seconds))
}

impl Membership {
    /// Membership of `options.replica` through `client`.
    pub fn new(client: kube::Client, options: Options) -> Self {
        Self {
            leases: Api::namespaced(client, &options.namespace),
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

    fn lease_body(&self, name: &str, now: OffsetDateTime, old: Option<&Lease>) -> Result<Lease, Error> {
        let seconds = i64::try_from(self.options.lease_duration.as_secs())
            .unwrap_or(i64::MAX)
            .max(1);
        let mut v = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": self.options.namespace,
                "labels": {label::MANAGED_BY: label::MANAGED_BY_VALUE}},
            "spec": {"holderIdentity": self.options.replica, "leaseDurationSeconds": seconds, "renewTime": micro(now)},
        });
        if let Some(old) = old {
            let held_by_us = old.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                == Some(self.options.replica.as_str());
            let old_v = serde_json::to_value(old).unwrap_or(Value::Null);
            v["metadata"]["resourceVersion"] = old_v["metadata"]["resourceVersion"].clone();
            let transitions = old_v["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
            if held_by_us {
                v["spec"]["acquireTime"] = old_v["spec"]["acquireTime"].clone();
                v["spec"]["leaseTransitions"] = json!(transitions);
            } else {
                v["spec"]["acquireTime"] = json!(micro(now));
                v["spec"]["leaseTransitions"] = json!(transitions + 1);
            }
        } else {
            v["spec"]["acquireTime"] = json!(micro(now));
            v["spec"]["leaseTransitions"] = json!(0);
        }
        serde_json::from_value(v).map_err(|e| Error::Lease {
            namespace: self.options.namespace.clone(),
            name: name.to_owned(),
            source: kube::Error::SerdeError(e),
        })
    }

    /// Takes or renews the Lease `name` if it is free, expired or already ours; `Ok(false)`
    /// when another replica holds it (or won a race for it).
    async fn hold(&self, name: &str, now: OffsetDateTime) -> Result<bool, Error> {
        let old = self.leases.get_opt(name).await.map_err(self.err(name))?;
        let pp = PostParams::default();
        match old {
            None => match self.leases.create(&pp, &self.lease_body(name, now, None)?).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.err(name)(e)),
            },
            Some(old) => {
                let ours = old.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                    == Some(self.options.replica.as_str());
                let expired = expiry(&old).is_none_or(|t| t <= now);
                if !ours && !expired {
                    return Ok(false);
                }
                match self
                    .leases
                    .replace(name, &pp, &self.lease_body(name, now, Some(&old))?)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(self.err(name)(e)),
                }
            }
        }
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

    /// The replicas whose own Lease is valid at `now`.
    pub async fn live_replicas(&self, now: OffsetDateTime) -> Result<Vec<String>, Error> {
        let selector = format!("{}={}", label::MANAGED_BY, label::MANAGED_BY_VALUE);
        let list = self
            .leases
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(self.err("*"))?;
        Ok(list
            .items
            .iter()
            .filter(|l| {
                l.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(REPLICA_LEASE_PREFIX))
            })
            .filter(|l| expiry(l).is_some_and(|t| t > now))
            .filter_map(|l| l.spec.as_ref().and_then(|s| s.holder_identity.clone()))
            .collect())
    }

    /// Marks as disconnected (at `now`) every connected entry whose replica is not live;
    /// returns how many. Only the sweeper calls this.
    pub async fn mark_orphans(&self, registry: &dyn Registry, now: OffsetDateTime) -> Result<usize, Error> {
        let live = self.live_replicas(now).await?;
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
    /// orphans.
    pub async fn round(&self, registry: &dyn Registry) -> Result<usize, Error> {
        let now = OffsetDateTime::now_utc();
        self.renew(now).await?;
        if self.lead(now).await? {
            return self.mark_orphans(registry, now).await;
        }
        Ok(0)
    }

    /// Runs rounds every third of the Lease duration until `stopping` is cancelled; a round
    /// under way finishes first.
    pub async fn run(self, registry: Arc<dyn Registry>, stopping: CancellationToken) {
        let every = (self.options.lease_duration / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopping.cancelled() => return,
            }
            if let Err(err) = self.round(registry.as_ref()).await {
                tracing::warn!(%err, "membership round failed; retrying");
            }
        }
    }
}

/// Starts this replica's membership (replica Lease, sweeper election, marking entries of
/// vanished replicas) on the plane's tasks, when the plane uses `registry.kubernetes`.
pub fn start(plane: &Plane) {
    let (Source::Kubernetes(k8s), Some(client)) = (&plane.config.registry, &plane.kube) else {
        return;
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
        .spawn(m.run(plane.registry.clone(), plane.stopping.clone()));
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
