//! gangplank-operator: reconciles `OnboardingPlane` custom resources into running
//! `gangplank-endpoint` Deployments, with their RBAC, configuration, serving certificate,
//! Service and disruption budget.
//!
//! [`run`] is the whole operator: it serves its health checks and metrics, installs its CRDs,
//! and runs the controller while it holds the leader Lease ([`election`]).

pub mod controller;
pub mod crds;
pub mod election;
pub mod manifest;
pub mod metrics;
pub mod plane;
pub mod render;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::CustomResourceExt;
use tokio_util::sync::CancellationToken;

pub use plane::{OnboardingPlane, PlaneSpec, PlaneStatus};

/// The `OnboardingPlane` CustomResourceDefinition, generated from the Rust types.
pub fn crd() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    OnboardingPlane::crd()
}

/// [`crd`] as YAML, as `gangplank-operator crd` prints it and `deploy/crds/operator.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(&crd())
}

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Watch planes in this namespace only; `None`: every namespace.
    pub namespace: Option<String>,
    /// Install and upgrade the CRDs at start-up.
    pub install_crds: bool,
    /// Run the controller only while holding the leader Lease (off: always, for one replica).
    pub leader_elect: bool,
    /// Where the leader Lease lives.
    pub lease_namespace: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    /// How long the leader Lease lasts without renewal.
    pub lease_duration: Duration,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRDs could not be installed.
    #[error(transparent)]
    Crds(#[from] crds::Error),
    /// The controller ended while leading.
    #[error(transparent)]
    Election(#[from] election::ControllerEnded),
}

/// Runs the operator on `client` until `stopping` is cancelled: CRDs first (when
/// `options.install_crds`; then `metrics` reports ready), then the controller, while this
/// replica leads (when `options.leader_elect`).
pub async fn run(
    client: kube::Client,
    options: Options,
    metrics: Arc<metrics::Metrics>,
    stopping: CancellationToken,
) -> Result<(), Error> {
    if options.install_crds {
        tokio::select! {
            r = crds::install(&client, Duration::from_secs(60)) => r?,
            () = stopping.cancelled() => return Ok(()),
        }
    }
    metrics.set_ready();
    let controller = |token: CancellationToken, client: kube::Client, metrics, namespace: Option<String>| async move {
        controller::run(client, namespace.as_deref(), metrics, async move {
            token.cancelled().await
        })
        .await;
    };
    if !options.leader_elect {
        metrics.set_leader(true);
        controller(stopping, client, metrics, options.namespace).await;
        return Ok(());
    }
    let labels = BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_owned(),
        render::MANAGED_BY.to_owned(),
    )]);
    let lock = gangplank_lease::LeaseLock::new(
        client.clone(),
        &options.lease_namespace,
        &options.identity,
        options.lease_duration,
        labels,
    )
    .observing();
    let m = metrics.clone();
    election::run(lock, metrics, stopping, move |token| {
        controller(token, client.clone(), m.clone(), options.namespace.clone())
    })
    .await?;
    Ok(())
}
