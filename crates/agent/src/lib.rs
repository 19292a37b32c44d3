//! gangplank-agent: onboards a VM into the mesh, writes the sidecar's boot files, starts
//! and supervises the sidecar, renews its token and deregisters on shutdown.
//!
//! - [`config`]: the `OnboardingConfiguration` and `AgentConfiguration` files;
//! - [`files`]: atomic boot-file writing and the hosts-file block;
//! - [`launcher`]: starting the sidecar (systemd, docker or a supervised process);
//! - [`readiness`]: probing the sidecar's readiness endpoint;
//! - [`health`]: the sidecar's health, as the launcher and the probe see it;
//! - [`host`]: the facts the agent reports about its host;
//! - [`backoff`]: retry delays;
//! - [`state`]: what the agent keeps across restarts (the VM's registration);
//! - [`status`]: the status file the running agent keeps, for `gangplank-agent status`;
//! - [`run`]: the onboarding loop;
//! - [`doctor`]: `gangplank-agent doctor`, the checks that say why a VM cannot onboard.
//!
//! The modules depend on each other in one direction: `health` and `backoff` use no other
//! module; `readiness` uses `health`; `config` uses `backoff` and `readiness`; `files` and
//! `host` use `config`; `status` uses `config`, `files` and `health`; `launcher` uses
//! `config`, `health` and `backoff`; `run` uses them all; `doctor` uses `config`, `state`
//! and `run`.
//!
//! Embedding the agent (tests, `gangplank quickstart`):
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use std::path::Path;
//! let config = gangplank_agent::Config::load(
//!     Path::new("/etc/gangplank/onboarding.yaml"),
//!     Path::new("/etc/gangplank/agent.yaml"),
//!     true,
//! )?;
//! let agent = gangplank_agent::Agent::new(&config)?;
//! let mut status = agent.status();
//! let run = tokio::spawn(agent.run(async { let _ = tokio::signal::ctrl_c().await; }));
//! status.wait_for(|s| matches!(s, gangplank_agent::Status::Registered { connected: true, .. })).await?;
//! run.await??;
//! # Ok(())
//! # }
//! ```

pub mod backoff;
pub mod config;
pub mod doctor;
pub mod files;
pub mod health;
pub mod host;
pub mod launcher;
pub mod readiness;
pub mod run;
pub mod state;
pub mod status;

pub use config::Config;
pub use run::{Agent, OnStop, Status, run};
