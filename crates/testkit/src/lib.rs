//! Test kit: CRD schema validation, fixtures and helpers shared by Gangplank's tests.

pub mod cloud;
pub mod crd;
pub mod oidc;
pub mod sshd;
pub mod process;
