//! The CRDs the operator installs and upgrades at start-up: Gangplank's own
//! (`OnboardingPolicy`, `JoinToken`, `WorkloadBinding`, which the endpoints it runs read) and
//! `OnboardingPlane`, all generated from the Rust types.
//!
//! Each is server-side applied with the operator's field manager (forced: the operator owns
//! them), then waited for until the API server reports it `Established`.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::controller::MANAGER;

/// Why the CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CRD could not be rendered (a bug).
    #[error("rendering Gangplank's CRDs: {0}")]
    Render(String),
    /// The API server refused a CRD.
    #[error(
        "applying CustomResourceDefinition {name}: {source}: the operator's ClusterRole must allow get, create and patch on customresourcedefinitions (deploy/operator.yaml has it), or install them yourself with `gangplank install crds | kubectl apply -f -` and run with --install-crds=false"
    )]
    Apply {
        /// The CRD.
        name: String,
        /// The API's error.
        #[source]
        source: kube::Error,
    },
    /// A CRD did not become established in time.
    #[error(
        "CustomResourceDefinition {name} is not Established after {waited:?}: check the API server's log"
    )]
    NotEstablished {
        /// The CRD.
        name: String,
        /// How long it was waited for.
        waited: Duration,
    },
}

/// The annotation recording which operator version wrote a CRD.
pub const VERSION_ANNOTATION: &str = "onboarding.gangplank.dev/operator-version";

/// Every CRD the operator installs, annotated with its version.
pub fn all() -> Result<Vec<CustomResourceDefinition>, Error> {
    let mut crds = gangplank_api::crds::all().map_err(|e| Error::Render(e.to_string()))?;
    crds.push(crate::crd());
    for crd in &mut crds {
        crd.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(VERSION_ANNOTATION.into(), env!("CARGO_PKG_VERSION").into());
    }
    Ok(crds)
}

/// `major.minor.patch` as numbers (anything else: zeros).
fn version(v: &str) -> (u64, u64, u64) {
    let mut n = v.split(['.', '-', '+']).map(|p| p.parse().unwrap_or(0));
    (
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
    )
}

/// Whether `installed` was written by a newer operator than this one (then it is left
/// alone: an old replica restarting during a rolling upgrade must not downgrade the schema).
fn newer(installed: &CustomResourceDefinition) -> bool {
    installed
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VERSION_ANNOTATION))
        .is_some_and(|v| version(v) > version(env!("CARGO_PKG_VERSION")))
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
}

/// Applies every CRD of [`all`] and waits (at most `wait`) until each is established.
pub async fn install(client: &Client, wait: Duration) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply(MANAGER).force();
    let crds = all()?;
    for crd in &crds {
        let name = crd.name_any();
        let installed = api.get_opt(&name).await.map_err(|source| Error::Apply {
            name: name.clone(),
            source,
        })?;
        if installed.as_ref().is_some_and(newer) {
            tracing::info!(crd = %name, "installed by a newer operator: left as it is");
            continue;
        }
        api.patch(&name, &pp, &Patch::Apply(crd))
            .await
            .map_err(|source| Error::Apply {
                name: name.clone(),
                source,
            })?;
    }
    let started = Instant::now();
    for crd in &crds {
        let name = crd.name_any();
        loop {
            let got = api.get_opt(&name).await.map_err(|source| Error::Apply {
                name: name.clone(),
                source,
            })?;
            if got.as_ref().is_some_and(established) {
                break;
            }
            if started.elapsed() >= wait {
                return Err(Error::NotEstablished {
                    name,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tracing::info!(crds = crds.len(), "CRDs installed and established");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crd_of_a_newer_operator_is_newer_and_ours_or_an_older_one_is_not() {
        let crd = |v: Option<&str>| {
            let mut c = crate::crd();
            if let Some(v) = v {
                c.metadata.annotations = Some([(VERSION_ANNOTATION.to_owned(), v.to_owned())].into());
            }
            c
        };
        assert!(newer(&crd(Some("99.0.0"))));
        assert!(newer(&crd(Some("0.99.1-rc.1"))));
        assert!(!newer(&crd(Some(env!("CARGO_PKG_VERSION")))));
        assert!(!newer(&crd(Some("0.0.1"))));
        assert!(!newer(&crd(None)));
        assert!(all().expect("crds").iter().all(|c| !newer(c)));
    }
}
