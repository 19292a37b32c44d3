//! gangplank-endpoint: verifies VM credentials, authorises them against OnboardingPolicy,
//! registers WorkloadEntries and serves the sidecar's boot files.
//!
//! - [`alloc`]: the allocation-counting allocator of the `gangplank-endpoint` binary;
//! - [`cluster`]: boot inputs from a Kubernetes cluster (TokenRequest, Istio's ConfigMaps);
//! - [`config`]: the configuration file (parse, then validate into typed choices);
//! - [`error`]: why the endpoint cannot start;
//! - [`facts`]: the checks an agent's host facts pass before they reach an entry;
//! - [`install`]: the agent's packages, served at `/install/` to VMs without internet;
//! - [`keys`]: what the endpoint signs (sidecar tokens, sessions, nonces);
//! - [`membership`]: replica Leases and the Lease-elected sweeper (Kubernetes);
//! - [`mesh`]: where the sidecar's token, root certificate and mesh config come from;
//! - [`plane`]: the shared state of the onboarding plane, built once from the configuration;
//! - [`service`]: the gRPC `Onboarding` service;
//! - [`sweep`]: removal of entries whose agents vanished;
//! - [`server`]: listeners, TLS and a drained shutdown;
//! - [`metrics`]: Prometheus metrics.

pub mod alloc;
pub mod cluster;
pub mod config;
pub mod error;
pub mod facts;
pub mod install;
pub mod keys;
pub mod membership;
pub mod mesh;
pub mod metrics;
pub mod plane;
pub mod server;
pub mod service;
pub mod sweep;

pub use config::Config;
pub use error::{Error, Result};
pub use plane::build;
pub use server::{Endpoint, start};
