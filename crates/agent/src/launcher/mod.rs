//! Starting the Istio sidecar: one [`Launcher`] trait, three ways.
//!
//! - [`Systemd`]: the `istio` unit of Istio's sidecar package (`systemctl start|restart|stop`);
//! - [`Docker`]: the `istio-proxy` container on the host network;
//! - [`Process`]: a supervised child process, for containers and development.
//!
//! Health: a [`Process`] is healthy while its child runs; the others are healthy when their
//! last command succeeded (systemd and docker restart the sidecar themselves).
//!
//! This module holds what the three share (the trait, the errors, `cluster.env` reading and
//! running an external command); each launcher's own file uses it, and it names them only
//! to pick the one the configuration asks for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use crate::config;
use crate::health::Health;

mod docker;
mod process;
mod systemd;

pub use docker::Docker;
pub use process::Process;
pub use systemd::Systemd;

/// How long an external command (`systemctl`, `docker`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the sidecar could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `cluster.env` could not be read.
    #[error("{path}: cannot read the sidecar environment: {source}")]
    ReadEnv {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// `cluster.env` is not a shell-style `KEY=VALUE` file.
    #[error("{path}:{line}: {message}")]
    EnvSyntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A program could not be started.
    #[error(
        "cannot run {program}: {source}; check that it is installed, or set its path in the agent config"
    )]
    Spawn {
        /// The program.
        program: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{command}` failed ({status}){}", stderr_suffix(.stderr))]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// A command did not finish in time.
    #[error("`{0}` did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout(String),
    /// A `cluster.env` variable would change how the docker client itself behaves.
    #[error(
        "{path}: variable {key} would configure the docker client itself: remove it from the WorkloadGroup's proxy metadata"
    )]
    DockerVariable {
        /// The file.
        path: PathBuf,
        /// The variable.
        key: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// A result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Starts, restarts and stops the sidecar.
#[async_trait]
pub trait Launcher: Send + Sync {
    /// Starts the sidecar if it is not running.
    async fn start(&mut self) -> Result<()>;
    /// (Re)starts the sidecar so it reads its boot files again.
    async fn restart(&mut self) -> Result<()>;
    /// Stops the sidecar.
    async fn stop(&mut self) -> Result<()>;
    /// The sidecar's health.
    fn health(&self) -> Health;
}

/// The launcher the agent configuration asks for.
pub fn from_config(agent: &config::Agent) -> Box<dyn Launcher> {
    match &agent.sidecar.launcher {
        config::Launcher::Systemd(s) => Box::new(Systemd::new(&s.command, &s.unit)),
        config::Launcher::Docker(d) => Box::new(Docker::new(d, &agent.files)),
        config::Launcher::Process(p) => Box::new(Process::new(
            p.command.clone(),
            agent.files.cluster_env.clone(),
            agent.files.root.clone(),
            p.pid_file.clone(),
            p.stop_timeout,
            agent.settings.retry,
        )),
    }
}

/// Environment variables, in order.
pub type Env = Vec<(String, String)>;

/// Reads `cluster.env` as the sidecar package's `istio-start.sh` does (`set -a; . file`),
/// with [`gangplank_bootstrap::cluster_env::parse`].
pub fn read_env(path: &Path) -> Result<Env> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadEnv {
        path: path.to_owned(),
        source,
    })?;
    gangplank_bootstrap::cluster_env::parse(&text).map_err(|e| Error::EnvSyntax {
        path: path.to_owned(),
        line: e.line,
        message: e.message,
    })
}

// ---------------------------------------------------------------------------------------
// External commands
// ---------------------------------------------------------------------------------------

async fn run_command(program: &str, args: &[String], env: &[(String, String)]) -> Result<()> {
    let command_line = std::iter::once(program.to_owned())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(command = %command_line, "running");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Err(_) => return Err(Error::Timeout(command_line)),
        Ok(Err(source)) => {
            return Err(Error::Spawn {
                program: program.to_owned(),
                source,
            });
        }
        Ok(Ok(o)) => o,
    };
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    // Keep the end, where the reason usually is, and keep log lines short.
    let tail: String = if stderr.chars().count() > 400 {
        let skip = stderr.chars().count() - 400;
        format!("…{}", stderr.chars().skip(skip).collect::<String>())
    } else {
        stderr.to_owned()
    };
    Err(Error::Failed {
        command: command_line,
        status: output.status.to_string(),
        stderr: tail,
    })
}

fn record(health: &mut Health, result: &Result<()>, ok: Health) {
    *health = match result {
        Ok(()) => ok,
        Err(e) => Health::Failed(e.to_string()),
    };
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_missing_cluster_env_is_named() {
        let e = read_env(Path::new("/nonexistent/cluster.env")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cluster.env"), "{e}");
    }

    #[test]
    fn a_malformed_cluster_env_names_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.env");
        std::fs::write(&path, "A=1\nB='open\n").expect("write");
        let e = read_env(&path).unwrap_err().to_string();
        assert_eq!(e, format!("{}:2: B: unterminated single quote", path.display()));
    }

    /// A stand-in program that records its argv (one per line) and the listed variables.
    pub(crate) fn recorder(dir: &Path, name: &str, exit: i32, vars: &[&str]) -> (PathBuf, PathBuf) {
        let log = dir.join(format!("{name}.log"));
        let script = dir.join(name);
        let mut body = format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> '{log}'; done\n",
            log = log.display()
        );
        for v in vars {
            body.push_str(&format!(
                "printf '%s=%s\\n' {v} \"${v}\" >> '{}'\n",
                log.display()
            ));
        }
        body.push_str(&format!("echo --- >> '{}'\n", log.display()));
        if exit != 0 {
            body.push_str(&format!(
                "echo 'Unit istio.service not found.' >&2\nexit {exit}\n"
            ));
        }
        std::fs::write(&script, body).expect("write script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        (script, log)
    }

    pub(crate) fn calls(log: &Path) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.split("---\n")
            .filter(|c| !c.is_empty())
            .map(|c| c.lines().map(str::to_owned).collect())
            .collect()
    }
}
