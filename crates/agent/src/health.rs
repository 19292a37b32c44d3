//! The sidecar's health, as the launcher and the readiness probe see it and as the agent
//! reports it to the endpoint.

/// The sidecar's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not started, or stopped.
    Stopped,
    /// Running (process launcher) or last command succeeded (others).
    Running,
    /// The sidecar exited or a command failed; the message says how.
    Failed(String),
}

impl Health {
    /// Whether this counts as healthy.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Running)
    }

    /// A one-line description for the endpoint.
    pub fn message(&self) -> String {
        match self {
            Health::Stopped => "sidecar stopped".to_owned(),
            Health::Running => "sidecar running".to_owned(),
            Health::Failed(m) => m.clone(),
        }
    }
}
