//! Executing a [`Plan`] over SSH with the system OpenSSH client (the `openssh` crate,
//! process multiplexing): one ControlMaster per host, so the user's `~/.ssh/config`
//! (ProxyJump, IdentityFile, User), ssh-agent and `known_hosts` apply as they do for `ssh`.
//! `BatchMode=yes` always (never prompt); host keys are checked strictly unless the user
//! asks otherwise in plain words (`--ignore-host-keys`).

use std::path::PathBuf;
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::AsyncWriteExt;

use crate::plan::{Plan, Step, Tense, close_line, connect_line};

/// How to talk SSH.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `-i KEY` (with `IdentitiesOnly=yes`); `None` uses ssh-agent and the ssh config.
    pub key: Option<PathBuf>,
    /// `-F FILE` instead of `~/.ssh/config`.
    pub config_file: Option<PathBuf>,
    /// Accept any host key and remember none (`StrictHostKeyChecking=no`,
    /// `UserKnownHostsFile=/dev/null`).
    pub ignore_host_keys: bool,
    /// `ConnectTimeout`.
    pub connect_timeout: Option<Duration>,
}

/// Why a step on a host failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The SSH connection could not be made.
    #[error("cannot connect to {destination}: {detail}{hint}")]
    Connect {
        /// `[user@]host[:port]`.
        destination: String,
        /// What ssh said.
        detail: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// A command could not be run or exited non-zero.
    #[error("command `{command}` failed on {destination}: {detail}")]
    Command {
        /// `[user@]host[:port]`.
        destination: String,
        /// The command.
        command: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// A file could not be written.
    #[error("writing {path} on {destination} failed: {detail}")]
    Copy {
        /// `[user@]host[:port]`.
        destination: String,
        /// The remote path.
        path: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// The local temporary directory for the control socket could not be used.
    #[error("cannot create the SSH control socket directory: {0}")]
    ControlDir(std::io::Error),
}

/// Runs `plan` on its host, calling `progress` with each step's line (present tense) and
/// any output of commands.
pub async fn execute(
    plan: &Plan,
    options: &Options,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), Error> {
    let target = &plan.target;
    let destination = target.destination();
    progress(connect_line(target, Tense::Present));
    let mut builder = SessionBuilder::default();
    builder
        .control_directory(std::env::temp_dir())
        // A master orphaned by a timeout goes away by itself.
        .control_persist(ControlPersist::IdleFor(
            std::num::NonZeroUsize::new(30).unwrap_or(std::num::NonZeroUsize::MIN),
        ))
        .known_hosts_check(if options.ignore_host_keys {
            KnownHosts::Accept
        } else {
            KnownHosts::Strict
        });
    if options.ignore_host_keys {
        builder.user_known_hosts_file("/dev/null");
    }
    if let Some(user) = &target.user {
        builder.user(user.clone());
    }
    if let Some(port) = target.port {
        builder.port(port);
    }
    if let Some(key) = &options.key {
        builder.keyfile(key);
    }
    if let Some(config) = &options.config_file {
        builder.config_file(config);
    }
    if let Some(t) = options.connect_timeout {
        builder.connect_timeout(t.max(Duration::from_secs(1)));
    }
    let session = builder
        .connect(&target.host)
        .await
        .map_err(|e| connect_error(&destination, e))?;

    let result = run_steps(&session, plan, &destination, progress).await;
    progress(close_line(Tense::Present));
    // Closing can only fail in cleanup; the steps' result is what matters.
    let _ = session.close().await;
    result
}

async fn run_steps(
    session: &Session,
    plan: &Plan,
    destination: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), Error> {
    for step in &plan.steps {
        progress(step.headline(Tense::Present));
        match step {
            Step::Exec {
                command,
                ignore_failure,
            } => {
                let out = session
                    .raw_command(command)
                    .stdin(Stdio::null())
                    .output()
                    .await
                    .map_err(|e| Error::Command {
                        destination: destination.to_string(),
                        command: command.clone(),
                        detail: chain(&e),
                    })?;
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    progress(line.to_string());
                }
                if !out.status.success() && !ignore_failure {
                    return Err(Error::Command {
                        destination: destination.to_string(),
                        command: command.clone(),
                        detail: status_detail(&out),
                    });
                }
            }
            Step::Copy {
                path,
                content,
                mode,
                ..
            } => copy(session, destination, path, content, *mode).await?,
        }
    }
    Ok(())
}

/// The remote side of an atomic copy: content on stdin goes to a temporary file in the
/// target's directory, gets its mode, then is renamed over the target. Paths are plain
/// (checked when the plan was made), so they need no quoting.
pub fn copy_command(path: &str, mode: u32) -> String {
    let (dir, name) = path.rsplit_once('/').unwrap_or((".", path));
    let dir = if dir.is_empty() { "/" } else { dir };
    format!(
        "umask 077 && t=$(mktemp {dir}/.{name}.XXXXXX) && \
         {{ cat > \"$t\" && chmod {mode:04o} \"$t\" && mv -f \"$t\" {path}; }} \
         || {{ rm -f \"$t\"; exit 1; }}"
    )
}

async fn copy(
    session: &Session,
    destination: &str,
    path: &str,
    content: &[u8],
    mode: u32,
) -> Result<(), Error> {
    let err = |detail: String| Error::Copy {
        destination: destination.to_string(),
        path: path.to_string(),
        detail,
    };
    let mut child = session
        .raw_command(copy_command(path, mode))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .await
        .map_err(|e| err(chain(&e)))?;
    if let Some(mut stdin) = child.stdin().take() {
        stdin
            .write_all(content)
            .await
            .map_err(|e| err(e.to_string()))?;
        stdin.shutdown().await.map_err(|e| err(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| err(chain(&e)))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(status_detail(&out)))
    }
}

fn status_detail(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    match (out.status.code(), stderr.is_empty()) {
        (Some(c), true) => format!("exit status {c}"),
        (Some(c), false) => format!("exit status {c}: {stderr}"),
        (None, _) => format!("killed by a signal {stderr}"),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(inner.to_string().trim());
        src = inner.source();
    }
    s
}

fn connect_error(destination: &str, e: openssh::Error) -> Error {
    let detail = chain(&e);
    let lower = detail.to_lowercase();
    let hint = if lower.contains("host key verification failed")
        || lower.contains("remote host identification has changed")
        || lower.contains("no matching host key")
    {
        " (the host key is unknown or does not match known_hosts: check the host's key and add it, e.g. with ssh-keyscan, or pass --ignore-host-keys if you accept the risk)"
    } else if lower.contains("permission denied") {
        " (the key was refused: check --ssh-key / IdentityFile, ssh-agent and the ssh-user annotation)"
    } else if lower.contains("connection refused")
        || lower.contains("timed out")
        || lower.contains("no route to host")
        || lower.contains("could not resolve")
    {
        " (the host is unreachable: check the ssh-host and ssh-port annotations, or --ssh-port)"
    } else {
        ""
    };
    Error::Connect {
        destination: destination.to_string(),
        detail,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_is_atomic_and_private_until_renamed() {
        assert_eq!(
            copy_command("/etc/istio-proxy/istio-token", 0o600),
            "umask 077 && t=$(mktemp /etc/istio-proxy/.istio-token.XXXXXX) && \
             { cat > \"$t\" && chmod 0600 \"$t\" && mv -f \"$t\" /etc/istio-proxy/istio-token; } \
             || { rm -f \"$t\"; exit 1; }"
        );
    }
}
