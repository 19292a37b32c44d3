//! Test kit: CRD schema validation, fixtures and helpers shared by Gangplank's tests.

pub mod cloud;
pub mod crd;
pub mod docker;
pub mod kube_api;
pub mod oidc;
pub mod probe;
pub mod process;
pub mod service;
pub mod sshd;
