//! gangplank-operator: reconciles `OnboardingPlane` custom resources into running
//! `gangplank-endpoint` Deployments, with their RBAC, configuration, Service and disruption
//! budget.

pub mod controller;
pub mod plane;
pub mod render;

use kube::CustomResourceExt;

pub use plane::{OnboardingPlane, PlaneSpec, PlaneStatus};

/// The `OnboardingPlane` CustomResourceDefinition, generated from the Rust types.
pub fn crd() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    OnboardingPlane::crd()
}

/// [`crd`] as YAML, as `gangplank-operator crd` prints it and `deploy/crds/operator.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(&crd())
}
