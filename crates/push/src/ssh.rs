//! Executing a [`Plan`] over SSH with the system OpenSSH client (the `openssh` crate,
//! process multiplexing): one ControlMaster per host, so the user's `~/.ssh/config`
//! (ProxyJump, IdentityFile, User), ssh-agent and `known_hosts` apply as they do for `ssh`.
//! `BatchMode=yes` always (never prompt); host keys are checked strictly unless the user
//! asks otherwise in plain words (`--ignore-host-keys`).

use std::path::PathBuf;
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::AsyncWriteExt;

use crate::plan::{HOSTS_BEGIN, HOSTS_END, Plan, Step, Tense, close_line, connect_line};

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
    /// Limit for reaching a host: TCP connection, SSH banner, key exchange and login
    /// (also given to ssh as `ConnectTimeout`). `None` leaves it to the ssh config.
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
    /// No SSH session within the connect timeout (a dead host, or one that accepts TCP but
    /// never speaks SSH).
    #[error(
        "cannot connect to {destination}: no SSH session within {after} (the host does not answer, or does not speak SSH): check that sshd runs there and the ssh-host and ssh-port annotations, or raise --connect-timeout"
    )]
    ConnectTimeout {
        /// `[user@]host[:port]`.
        destination: String,
        /// The limit, human-readable (`10s`).
        after: String,
    },
    /// Connected, but the steps did not finish in time.
    #[error(
        "the steps on {destination} did not finish within {after}: check what hangs there (docker, systemctl), or raise --timeout"
    )]
    StepsTimeout {
        /// `[user@]host[:port]`.
        destination: String,
        /// The limit, human-readable (`60s`).
        after: String,
    },
    /// The local temporary directory for the control socket could not be used.
    #[error("cannot create the SSH control socket directory: {0}")]
    ControlDir(std::io::Error),
}

/// Runs `plan` on its host, calling `progress` with each step's line (present tense) and
/// any output of commands. Connecting is limited by [`Options::connect_timeout`], the steps
/// once connected by `step_timeout`.
pub async fn execute(
    plan: &Plan,
    options: &Options,
    step_timeout: Duration,
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
        // ssh's own limit (TCP connection and banner) ends an ssh left behind when the limit
        // below gives up on it; a second later, so that the limit below, which also covers
        // key exchange and login, is the one that reports.
        let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0) + 1;
        builder.connect_timeout(Duration::from_secs(secs));
    }
    let connect = builder.connect(&target.host);
    let connected = match options.connect_timeout {
        // The whole way to a session (key exchange and login too): a host that accepts TCP
        // and then stalls fails here, not at the per-host --timeout.
        Some(limit) => tokio::time::timeout(limit, connect)
            .await
            .map_err(|_| Error::ConnectTimeout {
                destination: destination.clone(),
                after: humantime::format_duration(limit).to_string(),
            })?,
        None => connect.await,
    };
    let session = connected.map_err(|e| connect_error(&destination, e))?;

    let result = tokio::time::timeout(step_timeout, run_steps(&session, plan, &destination, progress))
        .await
        .unwrap_or_else(|_| {
            Err(Error::StepsTimeout {
                destination: destination.clone(),
                after: humantime::format_duration(step_timeout).to_string(),
            })
        });
    progress(close_line(Tense::Present));
    // Closing can only fail in cleanup; the steps' result is what matters.
    let _ = session.close().await;
    result
}

/// Marks the start of step N in the script's output.
const MARK: &str = "@@gangplank-step ";

/// The whole plan as one POSIX shell script, fed to `sh -s` on stdin, so a host costs one
/// SSH round trip and one login shell whatever the number of steps; secrets travel on stdin,
/// never in a command line. Each step prints a marker first, so progress and failures are
/// attributed to the step. Files are written atomically: decoded (base64, any bytes) into a
/// temporary file in the target's directory under umask 077, chmod (and chown), then
/// renamed. Paths are plain (checked when the plan was made) and need no quoting.
pub fn script(plan: &Plan) -> String {
    let mut script = Script::new();
    for (i, step) in plan.steps.iter().enumerate() {
        script.step(i, step, None);
    }
    script.finish()
}

/// A script being written (see [`script`]).
struct Script(String);

impl Script {
    fn new() -> Self {
        Self(String::from("set -e\numask 077\nt=\ntrap 'rm -f \"$t\"' EXIT\n"))
    }

    /// Step `i`; a copy whose content is already on the VM at `uploaded` (by scp) is only
    /// put in place.
    fn step(&mut self, i: usize, step: &Step, uploaded: Option<&str>) {
        use base64::Engine;
        let out = &mut self.0;
        out.push_str(&format!("echo '{MARK}{i}'\n"));
        match step {
            Step::Exec {
                command,
                ignore_failure,
            } => {
                if *ignore_failure {
                    out.push_str(&format!("{command} || true\n"));
                } else {
                    out.push_str(&format!("{command}\n"));
                }
            }
            Step::Copy {
                path,
                content,
                mode,
                owner,
                ..
            } => {
                match uploaded {
                    Some(tmp) => out.push_str(&format!("t={tmp}\n")),
                    None => {
                        let (dir, name) = split_path(path);
                        let b64 = base64::engine::general_purpose::STANDARD.encode(content);
                        out.push_str(&format!(
                            "t=$(mktemp {dir}/.{name}.XXXXXX)\nbase64 -d > \"$t\" <<'GANGPLANK_EOF'\n"
                        ));
                        push_base64(out, &b64);
                        out.push_str("GANGPLANK_EOF\n");
                    }
                }
                out.push_str(&format!("chmod {mode:04o} \"$t\"\n"));
                if let Some(user) = owner {
                    out.push_str(&format!(
                        "if o=$(id -u {user} 2>/dev/null):$(id -g {user} 2>/dev/null); then chown \"$o\" \"$t\"; fi\n"
                    ));
                }
                out.push_str(&format!("mv -f \"$t\" {path}\nt=\n"));
            }
            Step::Hosts { path, entries } => {
                // Rewritten in place, not renamed: /etc/hosts may be a mount point, and
                // keeps its owner and mode; not written at all when nothing changes.
                let b64 = base64::engine::general_purpose::STANDARD.encode(entries);
                out.push_str(&format!(
                    "[ -e {path} ] || {{ : > {path}; chmod 0644 {path}; }}\n\
                     t=$(mktemp)\n\
                     {{ awk -v b='{HOSTS_BEGIN}' -v e='{HOSTS_END}' '$0==b{{s=1;next}} $0==e{{s=0;next}} !s' {path}\n\
                     echo '{HOSTS_BEGIN}'\nbase64 -d <<'GANGPLANK_EOF'\n"
                ));
                push_base64(out, &b64);
                out.push_str(&format!(
                    "GANGPLANK_EOF\necho '{HOSTS_END}'\n}} > \"$t\"\n\
                     cmp -s \"$t\" {path} || cat \"$t\" > {path}\nrm -f \"$t\"\nt=\n"
                ));
            }
        }
    }

    fn finish(mut self) -> String {
        self.0.push_str(&format!("echo '{MARK}done'\n"));
        self.0
    }
}

fn push_base64(out: &mut String, b64: &str) {
    for chunk in b64.as_bytes().chunks(76) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
}

/// `/a/b/c` as (`/a/b`, `c`); a file at the root as (`/`, `c`).
fn split_path(path: &str) -> (&str, &str) {
    let (dir, name) = path.rsplit_once('/').unwrap_or((".", path));
    (if dir.is_empty() { "/" } else { dir }, name)
}

/// Runs the plan: as one script, or, when the target names an scp binary, each file copied
/// with it (to a temporary name) between scripts that run the other steps and put the files
/// in place, in the plan's order.
async fn run_steps(
    session: &Session,
    plan: &Plan,
    destination: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), Error> {
    let Some(scp) = &plan.target.scp_path else {
        return run_script(session, script(plan), plan, destination, &[], progress).await;
    };
    let mut pending = Script::new();
    // Whether `pending` has a step other than putting copied files in place.
    let mut commands = false;
    let mut announced = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let Step::Copy {
            path, content, mode, ..
        } = step
        else {
            pending.step(i, step, None);
            commands = true;
            continue;
        };
        // The folder may be made by an earlier step: run what came before first.
        if commands {
            let text = std::mem::replace(&mut pending, Script::new()).finish();
            run_script(session, text, plan, destination, &announced, progress).await?;
            commands = false;
        }
        progress(step.headline(Tense::Present));
        announced.push(i);
        let (dir, name) = split_path(path);
        let tmp_name = format!(".{name}.gangplank-{}", unique());
        scp_upload(session, scp, dir, &tmp_name, content, *mode)
            .await
            .map_err(|detail| Error::Copy {
                destination: destination.to_string(),
                path: path.clone(),
                detail: format!("{scp}: {detail}"),
            })?;
        pending.step(
            i,
            step,
            Some(&format!("{}/{tmp_name}", dir.trim_end_matches('/'))),
        );
    }
    run_script(session, pending.finish(), plan, destination, &announced, progress).await
}

/// A name part no other push running now uses (process id and clock).
fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// Copies `content` into `dir/name` on the VM with the remote `scp -t` (the SCP protocol's
/// receiving side: a `C<mode> <size> <name>` line, the bytes, a zero byte, each answered by
/// a zero byte, or 1/2 and a message).
async fn scp_upload(
    session: &Session,
    scp: &str,
    dir: &str,
    name: &str,
    content: &[u8],
    mode: u32,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut child = session
        .raw_command(format!("{scp} -qt {dir}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .await
        .map_err(|e| chain(&e))?;
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin().take(), child.stdout().take()) else {
        return Err("no pipes to scp".into());
    };
    let talk = async {
        async fn ack(stdout: &mut (impl AsyncReadExt + Unpin)) -> Result<(), String> {
            let mut byte = [0u8; 1];
            stdout
                .read_exact(&mut byte)
                .await
                .map_err(|e| format!("no answer ({e})"))?;
            if byte[0] == 0 {
                return Ok(());
            }
            let mut message = Vec::new();
            let mut c = [0u8; 1];
            while message.len() < 1024 && stdout.read_exact(&mut c).await.is_ok() && c[0] != b'\n' {
                message.push(c[0]);
            }
            Err(String::from_utf8_lossy(&message).trim().to_string())
        }
        let io = |e: std::io::Error| e.to_string();
        ack(&mut stdout).await?;
        stdin
            .write_all(format!("C{mode:04o} {} {name}\n", content.len()).as_bytes())
            .await
            .map_err(io)?;
        ack(&mut stdout).await?;
        stdin.write_all(content).await.map_err(io)?;
        stdin.write_all(&[0]).await.map_err(io)?;
        ack(&mut stdout).await?;
        stdin.shutdown().await.map_err(io)?;
        Ok::<(), String>(())
    };
    let talked = talk.await;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(|e| chain(&e))?;
    match talked {
        Ok(()) if out.status.success() => Ok(()),
        Ok(()) => Err(status_detail(&out)),
        Err(e) if e.is_empty() || e.starts_with("no answer") => Err(format!("{e} {}", status_detail(&out))),
        Err(e) => Err(e),
    }
}

async fn run_script(
    session: &Session,
    text: String,
    plan: &Plan,
    destination: &str,
    announced: &[usize],
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), Error> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let spawn_err = |detail: String| Error::Command {
        destination: destination.to_string(),
        command: "sh -s".into(),
        detail,
    };
    let mut child = session
        .raw_command("sh -s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .await
        .map_err(|e| spawn_err(chain(&e)))?;
    let stdin = child.stdin().take();
    let stdout = child.stdout().take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            stdin.write_all(text.as_bytes()).await?;
            stdin.shutdown().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let mut current: Option<usize> = None;
    let mut finished = false;
    let read = async {
        if let Some(stdout) = stdout {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(line) = lines.next_line().await? {
                match line.strip_prefix(MARK) {
                    Some("done") => finished = true,
                    Some(n) => {
                        current = n.parse().ok();
                        // A copied file's step was announced when its upload began.
                        if let Some(i) = current.filter(|i| !announced.contains(i))
                            && let Some(step) = plan.steps.get(i)
                        {
                            progress(step.headline(Tense::Present));
                        }
                    }
                    None => progress(line),
                }
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let (fed, read) = tokio::join!(feed, read);
    let out = child.wait_with_output().await.map_err(|e| spawn_err(chain(&e)))?;
    if finished && out.status.success() {
        return Ok(());
    }
    let detail = match (fed.err().or(read.err()), out.status.success()) {
        (Some(e), true) => e.to_string(),
        _ => status_detail(&out),
    };
    Err(match current.and_then(|i| plan.steps.get(i)) {
        Some(Step::Copy { path, .. } | Step::Hosts { path, .. }) => Error::Copy {
            destination: destination.to_string(),
            path: path.clone(),
            detail,
        },
        Some(Step::Exec { command, .. }) => Error::Command {
            destination: destination.to_string(),
            command: command.clone(),
            detail,
        },
        None => spawn_err(detail),
    })
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
    let full = chain(&e);
    let lower = full.to_lowercase();
    // ssh's log can hold a many-line banner; keep the line that says what happened.
    let lines: Vec<&str> = full
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('@'))
        .collect();
    let detail = if lower.contains("remote host identification has changed") {
        "the host key differs from the one in known_hosts (Host key verification failed)".to_string()
    } else {
        lines
            .iter()
            .rev()
            .find(|l| !l.starts_with("Warning: Permanently added"))
            .map_or(full.clone(), |l| l.to_string())
    };
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
    use crate::target::Target;
    use gangplank_api::NamespacedName;

    #[test]
    fn one_script_with_markers_and_atomic_private_copies() {
        let plan = Plan {
            target: Target {
                entry: NamespacedName::new("ns", "vm"),
                host: "h".into(),
                user: None,
                port: None,
                config_dir: "/etc/istio-proxy".into(),
                image_hub: None,
                image: None,
                container: "istio-proxy".into(),
                scp_path: None,
                instance_ip: None,
            },
            steps: vec![
                Step::Exec {
                    command: "mkdir -p /etc/istio-proxy".into(),
                    ignore_failure: false,
                },
                Step::Copy {
                    path: "/etc/istio-proxy/istio-token".into(),
                    content: b"secret".to_vec(),
                    mode: 0o600,
                    secret: true,
                    owner: None,
                },
                Step::Exec {
                    command: "docker rm --force istio-proxy".into(),
                    ignore_failure: true,
                },
            ],
        };
        assert_eq!(
            script(&plan),
            "set -e\numask 077\nt=\ntrap 'rm -f \"$t\"' EXIT\n\
             echo '@@gangplank-step 0'\nmkdir -p /etc/istio-proxy\n\
             echo '@@gangplank-step 1'\n\
             t=$(mktemp /etc/istio-proxy/.istio-token.XXXXXX)\n\
             base64 -d > \"$t\" <<'GANGPLANK_EOF'\nc2VjcmV0\nGANGPLANK_EOF\n\
             chmod 0600 \"$t\"\nmv -f \"$t\" /etc/istio-proxy/istio-token\nt=\n\
             echo '@@gangplank-step 2'\ndocker rm --force istio-proxy || true\n\
             echo '@@gangplank-step done'\n"
        );
    }
}
