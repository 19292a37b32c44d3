//! Kubernetes Lease locks, as client-go's leader election keeps them: a Lease is held by the
//! identity in `holderIdentity` until `renewTime + leaseDurationSeconds`; it is taken when
//! absent, released (empty holder) or expired, with a `resourceVersion`-conditional update, so
//! two candidates never both win; and released on a clean shutdown, so another takes it at
//! once instead of waiting for it to expire.
//!
//! The endpoint uses it for its replica Leases and its sweeper election
//! (`gangplank_endpoint::membership`), the operator for its leader election.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A `MicroTime` as the API server writes it (RFC 3339, microseconds).
pub fn micro(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// When `lease` expires, from its renew time and duration; `None` if it has neither.
pub fn expiry(lease: &Lease) -> Option<OffsetDateTime> {
    expiry_after(lease, 1)
}

/// `durations` of its own durations after `lease` was renewed; `None` without either.
pub fn expiry_after(lease: &Lease, durations: i64) -> Option<OffsetDateTime> {
    let v = serde_json::to_value(lease).ok()?;
    let renewed = OffsetDateTime::parse(v["spec"]["renewTime"].as_str()?, &Rfc3339).ok()?;
    let seconds = v["spec"]["leaseDurationSeconds"].as_i64()?;
    Some(renewed + time::Duration::seconds(seconds.saturating_mul(durations)))
}

/// Who holds `lease`; `None` when nobody does (no holder, or an empty one: released).
pub fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// Lease locks of one holder in one namespace.
#[derive(Clone)]
pub struct LeaseLock {
    leases: Api<Lease>,
    namespace: String,
    holder: String,
    duration: Duration,
    labels: BTreeMap<String, String>,
    /// With [`LeaseLock::observing`]: the version of another holder's Lease last seen, and
    /// since when (this process's monotonic clock).
    observed: Option<Arc<Mutex<Option<Seen>>>>,
}

/// Another holder's Lease version, and since when this process has seen it unchanged.
type Seen = (String, Instant);

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("namespace", &self.namespace)
            .field("holder", &self.holder)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl LeaseLock {
    /// Locks held as `holder` for `duration` (renew them every third of it), on Leases in
    /// `namespace` that carry `labels`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        holder: &str,
        duration: Duration,
        labels: BTreeMap<String, String>,
    ) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            holder: holder.to_owned(),
            duration,
            labels,
            observed: None,
        }
    }

    /// Judges another holder's Lease expired only once it has stayed unchanged (same
    /// `resourceVersion`) for its duration on this process's monotonic clock, as client-go's
    /// leader election does, instead of from its `renewTime`: clock skew between the holder's
    /// node and this one cannot then end a Lease its holder still renews. A new candidate waits
    /// one Lease duration before taking a Lease it finds abandoned.
    #[must_use]
    pub fn observing(mut self) -> Self {
        self.observed = Some(Arc::default());
        self
    }

    /// Whether another holder's `lease` has expired at `now`.
    fn expired(&self, lease: &Lease, now: OffsetDateTime) -> bool {
        let Some(observed) = &self.observed else {
            return expiry(lease).is_none_or(|t| t <= now);
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seconds = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(self.duration.as_secs());
        let mut seen = observed.lock().unwrap_or_else(PoisonError::into_inner);
        let since = match &*seen {
            Some((v, since)) if *v == version => *since,
            _ => {
                let t = Instant::now();
                *seen = Some((version, t));
                t
            }
        };
        since.elapsed() >= Duration::from_secs(seconds)
    }

    /// The Leases of the namespace.
    pub fn api(&self) -> &Api<Lease> {
        &self.leases
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The holder identity.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// How long a Lease stays valid without renewal.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Whether `lease` is held by this holder.
    pub fn ours(&self, lease: &Lease) -> bool {
        holder(lease) == Some(self.holder.as_str())
    }

    /// The Lease `name` held by us from `now`, continuing `old` (its version, its history).
    fn body(&self, name: &str, now: OffsetDateTime, old: Option<&Lease>) -> Result<Lease, kube::Error> {
        let seconds = i64::try_from(self.duration.as_secs()).unwrap_or(i64::MAX).max(1);
        let mut v = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": self.namespace, "labels": self.labels},
            "spec": {"holderIdentity": self.holder, "leaseDurationSeconds": seconds, "renewTime": micro(now)},
        });
        if let Some(old) = old {
            let old_v = serde_json::to_value(old).unwrap_or(Value::Null);
            v["metadata"]["resourceVersion"] = old_v["metadata"]["resourceVersion"].clone();
            let transitions = old_v["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
            if self.ours(old) {
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
        serde_json::from_value(v).map_err(kube::Error::SerdeError)
    }

    /// Takes or renews the Lease `name` if it is free (absent, released or expired) or
    /// already ours; `Ok(false)` when another holder has it (or won a race for it).
    pub async fn hold(&self, name: &str, now: OffsetDateTime) -> Result<bool, kube::Error> {
        let old = self.leases.get_opt(name).await?;
        let pp = PostParams::default();
        match old {
            None => match self.leases.create(&pp, &self.body(name, now, None)?).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            },
            Some(old) => {
                let free = holder(&old).is_none() || self.expired(&old, now);
                if !self.ours(&old) && !free {
                    return Ok(false);
                }
                match self
                    .leases
                    .replace(name, &pp, &self.body(name, now, Some(&old))?)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Releases the Lease `name` if we hold it, as client-go's leader election does with
    /// `ReleaseOnCancel`: the holder is cleared and the Lease lasts one second, so any other
    /// candidate takes it at its next try instead of waiting for it to expire. Cleared rather
    /// than deleted, as client-go does: the Lease keeps its `leaseTransitions` (the history
    /// `kubectl describe lease` shows), any elector reads an empty holder as free, and it is
    /// the same conditional update that takes a Lease. Conditional on the version read: a
    /// Lease another holder took meanwhile is left alone. Whether it was released.
    pub async fn release(&self, name: &str, now: OffsetDateTime) -> Result<bool, kube::Error> {
        let Some(old) = self.leases.get_opt(name).await? else {
            return Ok(false);
        };
        if !self.ours(&old) {
            return Ok(false);
        }
        let mut released = self.body(name, now, Some(&old))?;
        if let Some(spec) = released.spec.as_mut() {
            spec.holder_identity = Some(String::new());
            spec.lease_duration_seconds = Some(1);
            spec.acquire_time = spec.renew_time.clone();
        }
        match self.leases.replace(name, &PostParams::default(), &released).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes `lease` if its `resourceVersion` (and uid) are still the ones read; `Ok(false)`
    /// when it changed (renewed meanwhile) or is already gone.
    pub async fn delete_unchanged(&self, lease: &Lease) -> Result<bool, kube::Error> {
        let name = lease.metadata.name.clone().unwrap_or_default();
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..Default::default()
        };
        match self.leases.delete(&name, &dp).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
