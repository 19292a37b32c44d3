//! The sidecar as the `istio` systemd unit of Istio's sidecar package.

use async_trait::async_trait;

use super::{Launcher, Result, record, run_command};
use crate::health::Health;

/// The sidecar as a systemd unit (`istio`, from Istio's sidecar package).
#[derive(Debug)]
pub struct Systemd {
    command: String,
    unit: String,
    health: Health,
}

impl Systemd {
    /// Drives `unit` with `command` (normally `systemctl`).
    pub fn new(command: &str, unit: &str) -> Self {
        Systemd {
            command: command.to_owned(),
            unit: unit.to_owned(),
            health: Health::Stopped,
        }
    }

    async fn systemctl(&mut self, verb: &str, ok: Health) -> Result<()> {
        let result = run_command(&self.command, &[verb.to_owned(), self.unit.clone()], &[]).await;
        record(&mut self.health, &result, ok);
        result
    }
}

#[async_trait]
impl Launcher for Systemd {
    async fn start(&mut self) -> Result<()> {
        self.systemctl("start", Health::Running).await
    }

    async fn restart(&mut self) -> Result<()> {
        self.systemctl("restart", Health::Running).await
    }

    async fn stop(&mut self) -> Result<()> {
        self.systemctl("stop", Health::Stopped).await
    }

    fn health(&self) -> Health {
        self.health.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::Error;
    use crate::launcher::tests::{calls, recorder};

    #[tokio::test]
    async fn systemd_runs_systemctl_with_the_unit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (script, log) = recorder(dir.path(), "systemctl", 0, &[]);
        let mut l = Systemd::new(&script.display().to_string(), "istio");
        assert_eq!(l.health(), Health::Stopped);
        l.start().await.expect("start");
        assert_eq!(l.health(), Health::Running);
        l.restart().await.expect("restart");
        l.stop().await.expect("stop");
        assert_eq!(l.health(), Health::Stopped);
        assert_eq!(
            calls(&log),
            vec![
                vec!["start", "istio"],
                vec!["restart", "istio"],
                vec!["stop", "istio"]
            ]
        );
    }

    #[tokio::test]
    async fn systemd_failure_is_reported_with_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (script, _) = recorder(dir.path(), "systemctl", 5, &[]);
        let mut l = Systemd::new(&script.display().to_string(), "istio");
        let e = l.restart().await.unwrap_err().to_string();
        assert!(
            e.contains("restart istio") && e.contains("Unit istio.service not found."),
            "{e}"
        );
        assert!(matches!(l.health(), Health::Failed(m) if m.contains("not found")));

        let mut missing = Systemd::new("/nonexistent/systemctl", "istio");
        let e = missing.start().await.unwrap_err();
        assert!(matches!(e, Error::Spawn { .. }), "{e}");
    }
}
