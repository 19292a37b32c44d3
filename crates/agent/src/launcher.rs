//! Starting the Istio sidecar: one [`Launcher`] trait, three ways.
//!
//! - [`Systemd`]: the `istio` unit of Istio's sidecar package (`systemctl start|restart|stop`);
//! - [`Docker`]: the `istio-proxy` container on the host network;
//! - [`Process`]: a supervised child process, for containers and development.
//!
//! Health: a [`Process`] is healthy while its child runs; the others are healthy when their
//! last command succeeded (systemd and docker restart the sidecar themselves).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::config;

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

/// The sidecar's state as the launcher sees it.
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
    let s = &agent.sidecar;
    match s.launcher {
        config::LauncherKind::Systemd => Box::new(Systemd::new(&s.systemd.command, &s.systemd.unit)),
        config::LauncherKind::Docker => Box::new(Docker::new(&s.docker, &agent.files)),
        config::LauncherKind::Process => Box::new(Process::new(
            s.process.command.clone(),
            agent.files.cluster_env.clone(),
            agent.files.root.clone(),
            s.process.stop_timeout,
            agent.settings.retry,
        )),
    }
}

// ---------------------------------------------------------------------------------------
// cluster.env
// ---------------------------------------------------------------------------------------

/// Environment variables, in order.
pub type Env = Vec<(String, String)>;

/// Reads `cluster.env` as the sidecar package's `istio-start.sh` does (`set -a; . file`).
pub fn read_env(path: &Path) -> Result<Env> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadEnv {
        path: path.to_owned(),
        source,
    })?;
    parse_env(&text).map_err(|(line, message)| Error::EnvSyntax {
        path: path.to_owned(),
        line,
        message,
    })
}

/// Parses shell `KEY=VALUE` assignments: single-quoted values (with `'"'"'` for a quote),
/// double-quoted values (`\"`, `\\`, `\$`, `` \` `` escapes), bare values, `export `
/// prefixes, blank lines and `#` comments. No expansion is done. Errors carry the line.
pub fn parse_env(text: &str) -> std::result::Result<Vec<(String, String)>, (usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let n = chars.len();
    while i < n {
        // Skip blank space and comments between assignments.
        match chars[i] {
            '\n' => {
                line += 1;
                i += 1;
                continue;
            }
            ' ' | '\t' | '\r' | ';' => {
                i += 1;
                continue;
            }
            '#' => {
                while i < n && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        let start_line = line;
        let mut key = String::new();
        while i < n && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            key.push(chars[i]);
            i += 1;
        }
        if key == "export" && i < n && (chars[i] == ' ' || chars[i] == '\t') {
            continue;
        }
        if key.is_empty() || key.starts_with(|c: char| c.is_ascii_digit()) {
            return Err((
                start_line,
                "expected KEY=VALUE with KEY made of letters, digits and '_'".into(),
            ));
        }
        if i >= n || chars[i] != '=' {
            return Err((start_line, format!("expected '=' after {key}")));
        }
        i += 1;
        let mut value = String::new();
        while i < n {
            match chars[i] {
                ' ' | '\t' | '\r' | '\n' | ';' => break,
                '\'' => {
                    i += 1;
                    loop {
                        if i >= n {
                            return Err((start_line, format!("{key}: unterminated single quote")));
                        }
                        if chars[i] == '\'' {
                            i += 1;
                            break;
                        }
                        if chars[i] == '\n' {
                            line += 1;
                        }
                        value.push(chars[i]);
                        i += 1;
                    }
                }
                '"' => {
                    i += 1;
                    loop {
                        if i >= n {
                            return Err((start_line, format!("{key}: unterminated double quote")));
                        }
                        match chars[i] {
                            '"' => {
                                i += 1;
                                break;
                            }
                            '\\' if i + 1 < n && matches!(chars[i + 1], '"' | '\\' | '$' | '`') => {
                                value.push(chars[i + 1]);
                                i += 2;
                            }
                            '\\' if i + 1 < n && chars[i + 1] == '\n' => {
                                line += 1;
                                i += 2;
                            }
                            '$' | '`' => {
                                return Err((
                                    start_line,
                                    format!(
                                        "{key}: expansions ($, `) are not supported; quote the value with '…'"
                                    ),
                                ));
                            }
                            c => {
                                if c == '\n' {
                                    line += 1;
                                }
                                value.push(c);
                                i += 1;
                            }
                        }
                    }
                }
                '\\' => {
                    if i + 1 < n && chars[i + 1] == '\n' {
                        line += 1;
                    } else if i + 1 < n {
                        value.push(chars[i + 1]);
                    }
                    i += 2;
                }
                '$' | '`' => {
                    return Err((
                        start_line,
                        format!("{key}: expansions ($, `) are not supported; quote the value with '…'"),
                    ));
                }
                c => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        // Later assignments win, as in the shell.
        vars.retain(|(k, _)| *k != key);
        vars.push((key, value));
        // Anything after whitespace on the same line must be a comment or another assignment.
        while i < n && (chars[i] == ' ' || chars[i] == '\t' || chars[i] == '\r') {
            i += 1;
        }
    }
    Ok(vars)
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

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// docker
// ---------------------------------------------------------------------------------------

/// Where the container sees the root certificate (the proxy's default CA root path).
pub const CONTAINER_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
/// Where the container sees the token's directory.
pub const CONTAINER_TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// Where the container sees the mesh config.
pub const CONTAINER_MESH: &str = "/etc/istio/config/mesh";

/// The sidecar as a docker container on the host network.
#[derive(Debug)]
pub struct Docker {
    command: String,
    image: String,
    name: String,
    cluster_env: PathBuf,
    root_cert: PathBuf,
    token: PathBuf,
    mesh: PathBuf,
    health: Health,
}

impl Docker {
    /// A container named `docker.name` from `docker.image`, with the boot files in `files`.
    pub fn new(docker: &config::Docker, files: &config::Files) -> Self {
        Docker {
            command: docker.command.clone(),
            image: docker.image.clone().unwrap_or_default(),
            name: docker.name.clone(),
            cluster_env: files.cluster_env.clone(),
            root_cert: files.root_cert.clone(),
            token: files.token.clone(),
            mesh: files.mesh.clone(),
            health: Health::Stopped,
        }
    }

    /// The `docker run` arguments and the environment the docker client needs.
    ///
    /// The variables of `cluster.env` are passed as `--env KEY` with the values in the
    /// docker client's own environment: `--env-file` would keep the shell quotes
    /// `cluster.env` uses, and values on the command line would show in `ps`. The token's
    /// directory (not the file) is mounted, so a renewed token — replaced by rename — is
    /// seen by the running container.
    pub fn run_args(&self) -> Result<(Vec<String>, Env)> {
        let env = read_env(&self.cluster_env)?;
        if let Some((key, _)) = env.iter().find(|(k, _)| k.starts_with("DOCKER_")) {
            return Err(Error::DockerVariable {
                path: self.cluster_env.clone(),
                key: key.clone(),
            });
        }
        let token_dir = self.token.parent().unwrap_or(Path::new("/"));
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &self.name,
            "--restart",
            "unless-stopped",
            "--network",
            "host",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for (host, container) in [
            (self.root_cert.as_path(), CONTAINER_ROOT_CERT),
            (token_dir, CONTAINER_TOKEN_DIR),
            (self.mesh.as_path(), CONTAINER_MESH),
        ] {
            args.push("-v".to_owned());
            args.push(format!("{}:{container}:ro", host.display()));
        }
        for (key, _) in &env {
            args.push("--env".to_owned());
            args.push(key.clone());
        }
        args.extend([self.image.clone(), "proxy".to_owned(), "sidecar".to_owned()]);
        Ok((args, env))
    }

    async fn remove(&self) -> Result<()> {
        run_command(
            &self.command,
            &["rm".to_owned(), "--force".to_owned(), self.name.clone()],
            &[],
        )
        .await
    }

    async fn replace(&mut self) -> Result<()> {
        let result = async {
            let (args, env) = self.run_args()?;
            // The container may not exist yet; only a missing docker is worth reporting.
            match self.remove().await {
                Err(e @ (Error::Spawn { .. } | Error::Timeout(_))) => return Err(e),
                Err(e) => tracing::debug!(error = %e, "no container to remove"),
                Ok(()) => {}
            }
            run_command(&self.command, &args, &env).await
        }
        .await;
        record(&mut self.health, &result, Health::Running);
        result
    }
}

#[async_trait]
impl Launcher for Docker {
    async fn start(&mut self) -> Result<()> {
        self.replace().await
    }

    async fn restart(&mut self) -> Result<()> {
        self.replace().await
    }

    async fn stop(&mut self) -> Result<()> {
        let result = self.remove().await;
        record(&mut self.health, &result, Health::Stopped);
        result
    }

    fn health(&self) -> Health {
        self.health.clone()
    }
}

// ---------------------------------------------------------------------------------------
// process
// ---------------------------------------------------------------------------------------

/// The sidecar as a supervised child process: restarted with capped backoff when it exits;
/// stopped with SIGTERM, then SIGKILL after a timeout; killed if the launcher is dropped.
#[derive(Debug)]
pub struct Process {
    command: Vec<String>,
    cluster_env: PathBuf,
    workdir: PathBuf,
    stop_timeout: Duration,
    retry: config::Retry,
    health: Arc<Mutex<Health>>,
    supervisor: Option<Supervisor>,
}

#[derive(Debug)]
struct Supervisor {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

struct Child {
    command: Vec<String>,
    cluster_env: PathBuf,
    workdir: PathBuf,
}

impl Child {
    fn spawn(&self) -> Result<tokio::process::Child> {
        let env = read_env(&self.cluster_env)?;
        let (program, args) = self.command.split_first().ok_or_else(|| Error::Spawn {
            program: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty sidecar command"),
        })?;
        let child = Command::new(program)
            .args(args)
            .envs(env)
            .current_dir(&self.workdir)
            .stdin(std::process::Stdio::null())
            // Its own process group: a terminal's Ctrl-C reaches the agent, which then leaves
            // the mesh and stops the sidecar in order, instead of killing the sidecar first.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                program: program.clone(),
                source,
            })?;
        tracing::info!(program = %program, pid = child.id(), "sidecar process started");
        Ok(child)
    }
}

impl Process {
    /// Runs `command` in `workdir` with the variables of `cluster_env` added to its
    /// environment.
    pub fn new(
        command: Vec<String>,
        cluster_env: PathBuf,
        workdir: PathBuf,
        stop_timeout: Duration,
        retry: config::Retry,
    ) -> Self {
        Process {
            command,
            cluster_env,
            workdir,
            stop_timeout,
            retry,
            health: Arc::new(Mutex::new(Health::Stopped)),
            supervisor: None,
        }
    }

    fn set(health: &Mutex<Health>, value: Health) {
        if let Ok(mut h) = health.lock() {
            *h = value;
        }
    }
}

async fn supervise(
    spec: Child,
    mut child: tokio::process::Child,
    mut stop: oneshot::Receiver<()>,
    health: Arc<Mutex<Health>>,
    stop_timeout: Duration,
    retry: config::Retry,
) {
    let mut backoff = Backoff::new(retry);
    let mut started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            status = child.wait() => {
                let message = match status {
                    Ok(s) => format!("sidecar exited ({s})"),
                    Err(e) => format!("cannot wait for the sidecar: {e}"),
                };
                tracing::warn!("{message}; restarting it");
                Process::set(&health, Health::Failed(message));
                // A sidecar that ran for a while before exiting starts again quickly.
                if started.elapsed() > retry.max {
                    backoff.reset();
                }
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_cap()) => {}
                        _ = &mut stop => {
                            Process::set(&health, Health::Stopped);
                            return;
                        }
                    }
                    match spec.spawn() {
                        Ok(c) => {
                            child = c;
                            started = tokio::time::Instant::now();
                            Process::set(&health, Health::Running);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot restart the sidecar");
                            Process::set(&health, Health::Failed(e.to_string()));
                        }
                    }
                }
            }
            _ = &mut stop => {
                terminate(&mut child, stop_timeout).await;
                Process::set(&health, Health::Stopped);
                return;
            }
        }
    }
}

async fn terminate(child: &mut tokio::process::Child, timeout: Duration) {
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        // Already reaped.
        return;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        tracing::debug!(error = %e, "SIGTERM to the sidecar failed");
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => tracing::info!(%status, "sidecar stopped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot wait for the sidecar"),
        Err(_) => {
            tracing::warn!(?timeout, "sidecar ignored SIGTERM; killing it");
            if let Err(e) = child.kill().await {
                tracing::warn!(error = %e, "cannot kill the sidecar");
            }
        }
    }
}

#[async_trait]
impl Launcher for Process {
    async fn start(&mut self) -> Result<()> {
        if let Some(s) = &self.supervisor
            && !s.task.is_finished()
        {
            return Ok(());
        }
        let spec = Child {
            command: self.command.clone(),
            cluster_env: self.cluster_env.clone(),
            workdir: self.workdir.clone(),
        };
        let child = match spec.spawn() {
            Ok(c) => c,
            Err(e) => {
                Process::set(&self.health, Health::Failed(e.to_string()));
                return Err(e);
            }
        };
        Process::set(&self.health, Health::Running);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(supervise(
            spec,
            child,
            stop_rx,
            self.health.clone(),
            self.stop_timeout,
            self.retry,
        ));
        self.supervisor = Some(Supervisor { stop, task });
        Ok(())
    }

    async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.start().await
    }

    async fn stop(&mut self) -> Result<()> {
        if let Some(s) = self.supervisor.take() {
            let _ = s.stop.send(());
            if let Err(e) = s.task.await
                && e.is_panic()
            {
                tracing::error!("the sidecar supervisor panicked");
            }
        }
        Process::set(&self.health, Health::Stopped);
        Ok(())
    }

    fn health(&self) -> Health {
        self.health
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| Health::Failed("sidecar state unavailable".to_owned()))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Dropping the task drops the child, whose kill_on_drop ends the sidecar.
        if let Some(s) = self.supervisor.take() {
            s.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_istioctl_cluster_env() {
        let text = "CANONICAL_REVISION='latest'
ISTIO_INBOUND_PORTS='*'
ISTIO_METAJSON_LABELS='{\"service.istio.io/canonical-name\":\"foo\"}'
ISTIO_META_MESH_ID=''
ISTIO_SVC_IP=10.10.10.10
QUOTE='it'\"'\"'s'
export EXPORTED=yes
# a comment
DOUBLE=\"a \\\"b\\\" c\"  # trailing comment
MULTI='line one
line two'
ISTIO_INBOUND_PORTS='8080'
";
        let vars = parse_env(text).expect("parse");
        let get = |k: &str| vars.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CANONICAL_REVISION"), Some("latest"));
        assert_eq!(
            get("ISTIO_METAJSON_LABELS"),
            Some("{\"service.istio.io/canonical-name\":\"foo\"}")
        );
        assert_eq!(get("ISTIO_META_MESH_ID"), Some(""));
        assert_eq!(get("ISTIO_SVC_IP"), Some("10.10.10.10"));
        assert_eq!(get("QUOTE"), Some("it's"));
        assert_eq!(get("EXPORTED"), Some("yes"));
        assert_eq!(get("DOUBLE"), Some("a \"b\" c"));
        assert_eq!(get("MULTI"), Some("line one\nline two"));
        assert_eq!(get("ISTIO_INBOUND_PORTS"), Some("8080"), "later assignment wins");
        assert_eq!(vars.len(), 9);
    }

    #[test]
    fn refuses_malformed_env() {
        assert_eq!(parse_env("A=1\nB='open\n").unwrap_err().0, 2);
        assert!(parse_env("A=1\n=x\n").unwrap_err().1.contains("KEY=VALUE"));
        assert!(parse_env("1A=x\n").is_err());
        assert!(parse_env("NOEQ\n").unwrap_err().1.contains("'='"));
        assert!(parse_env("A=$HOME\n").unwrap_err().1.contains("expansions"));
        let e = read_env(Path::new("/nonexistent/cluster.env")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cluster.env"), "{e}");
    }

    /// A stand-in program that records its argv (one per line) and the listed variables.
    fn recorder(dir: &Path, name: &str, exit: i32, vars: &[&str]) -> (PathBuf, PathBuf) {
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

    fn calls(log: &Path) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.split("---\n")
            .filter(|c| !c.is_empty())
            .map(|c| c.lines().map(str::to_owned).collect())
            .collect()
    }

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

    fn files_in(root: &Path) -> config::Files {
        let text = format!("files:\n  root: {}\n", root.display());
        config::Agent::parse(Path::new("agent.yaml"), &text)
            .expect("agent config")
            .files
    }

    #[tokio::test]
    async fn docker_replaces_the_container_with_mounts_and_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (script, log) = recorder(dir.path(), "docker", 0, &["ISTIO_META_NETWORK", "PROXY_CONFIG"]);
        let files = files_in(&dir.path().join("vm"));
        std::fs::create_dir_all(files.cluster_env.parent().expect("parent")).expect("mkdir");
        std::fs::write(
            &files.cluster_env,
            "ISTIO_META_NETWORK='net 1'\nPROXY_CONFIG='{\"a\":\"it'\"'\"'s\"}'\n",
        )
        .expect("env");
        let docker = config::Docker {
            command: script.display().to_string(),
            image: Some("docker.io/istio/proxyv2:1.27.1".into()),
            name: "istio-proxy".into(),
        };
        let mut l = Docker::new(&docker, &files);
        l.start().await.expect("start");
        assert_eq!(l.health(), Health::Running);
        l.stop().await.expect("stop");
        assert_eq!(l.health(), Health::Stopped);

        let root = dir.path().join("vm");
        let c = calls(&log);
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(c[0][..3], ["rm", "--force", "istio-proxy"]);
        let run: Vec<String> = c[1].iter().filter(|l| !l.contains('=')).cloned().collect();
        let expected: Vec<String> = [
            "run".to_owned(),
            "-d".into(),
            "--name".into(),
            "istio-proxy".into(),
            "--restart".into(),
            "unless-stopped".into(),
            "--network".into(),
            "host".into(),
            "-v".into(),
            format!(
                "{}/etc/certs/root-cert.pem:/var/run/secrets/istio/root-cert.pem:ro",
                root.display()
            ),
            "-v".into(),
            format!(
                "{}/var/run/secrets/tokens:/var/run/secrets/tokens:ro",
                root.display()
            ),
            "-v".into(),
            format!(
                "{}/etc/istio/config/mesh:/etc/istio/config/mesh:ro",
                root.display()
            ),
            "--env".into(),
            "ISTIO_META_NETWORK".into(),
            "--env".into(),
            "PROXY_CONFIG".into(),
            "docker.io/istio/proxyv2:1.27.1".into(),
            "proxy".into(),
            "sidecar".into(),
        ]
        .to_vec();
        assert_eq!(run, expected);
        // The values reach the docker client unquoted.
        assert!(c[1].contains(&"ISTIO_META_NETWORK=net 1".to_owned()), "{c:?}");
        assert!(
            c[1].contains(&"PROXY_CONFIG={\"a\":\"it's\"}".to_owned()),
            "{c:?}"
        );
        assert_eq!(c[2][..3], ["rm", "--force", "istio-proxy"]);
    }

    #[tokio::test]
    async fn docker_refuses_variables_that_configure_the_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (script, log) = recorder(dir.path(), "docker", 0, &[]);
        let files = files_in(&dir.path().join("vm"));
        std::fs::create_dir_all(files.cluster_env.parent().expect("parent")).expect("mkdir");
        std::fs::write(&files.cluster_env, "DOCKER_HOST=tcp://evil:2375\n").expect("env");
        let docker = config::Docker {
            command: script.display().to_string(),
            image: Some("img".into()),
            name: "istio-proxy".into(),
        };
        let mut l = Docker::new(&docker, &files);
        let e = l.start().await.unwrap_err();
        assert!(matches!(e, Error::DockerVariable { .. }), "{e}");
        assert!(calls(&log).is_empty(), "docker must not run at all");
    }

    fn process(dir: &Path, script: &str, stop_timeout: Duration) -> Process {
        let env = dir.join("cluster.env");
        if !env.exists() {
            std::fs::write(&env, "GREETING='hello world'\nQUOTED='it'\"'\"'s'\n").expect("env");
        }
        Process::new(
            vec!["/bin/sh".into(), "-c".into(), script.into()],
            env,
            dir.to_path_buf(),
            stop_timeout,
            config::Retry {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
        )
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let (timeout, every) = (Duration::from_secs(10), Duration::from_millis(10));
        gangplank_testkit::process::eventually(what, timeout, every, || std::future::ready(cond())).await;
    }

    #[tokio::test]
    async fn process_gets_cluster_env_and_root_as_workdir_and_stops_on_sigterm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let script = format!(
            "trap 'echo term >> {o}; exit 0' TERM; printf '%s|%s|%s\\n' \"$GREETING\" \"$QUOTED\" \"$(pwd)\" > {o}.tmp; mv {o}.tmp {o}; while :; do sleep 0.05; done",
            o = out.display()
        );
        let mut l = process(dir.path(), &script, Duration::from_secs(5));
        l.start().await.expect("start");
        assert_eq!(l.health(), Health::Running);
        wait_for("the child to write its environment", || out.exists()).await;
        let line = std::fs::read_to_string(&out).expect("out");
        let workdir = dir.path().canonicalize().expect("canonical");
        assert_eq!(line, format!("hello world|it's|{}\n", workdir.display()));

        // A second start while running is a no-op.
        l.start().await.expect("start again");
        l.stop().await.expect("stop");
        assert_eq!(l.health(), Health::Stopped);
        let text = std::fs::read_to_string(&out).expect("out");
        assert!(text.ends_with("term\n"), "the child got SIGTERM: {text}");
    }

    #[tokio::test]
    async fn process_that_ignores_sigterm_is_killed_after_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!(
            "trap '' TERM; echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000",
            p = pidfile.display()
        );
        let mut l = process(dir.path(), &script, Duration::from_millis(200));
        l.start().await.expect("start");
        wait_for("the pid file", || pidfile.exists()).await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid number");
        let pid = nix::unistd::Pid::from_raw(pid);
        assert!(nix::sys::signal::kill(pid, None).is_ok(), "child is running");
        let started = std::time::Instant::now();
        l.stop().await.expect("stop");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "waited for SIGTERM first"
        );
        assert_eq!(
            nix::sys::signal::kill(pid, None),
            Err(nix::errno::Errno::ESRCH),
            "child is gone"
        );
    }

    #[tokio::test]
    async fn process_is_restarted_when_it_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runs = dir.path().join("runs");
        let script = format!("echo run >> {}; exit 3", runs.display());
        let mut l = process(dir.path(), &script, Duration::from_secs(1));
        l.start().await.expect("start");
        let count = || {
            std::fs::read_to_string(&runs)
                .map(|t| t.lines().count())
                .unwrap_or(0)
        };
        wait_for("three runs", || count() >= 3).await;
        l.stop().await.expect("stop");
        let after_stop = count();
        assert_eq!(l.health(), Health::Stopped);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(count(), after_stop, "no restarts after stop");
    }

    #[tokio::test]
    async fn process_reports_failure_and_missing_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut l = process(dir.path(), "exit 7", Duration::from_secs(1));
        l.start().await.expect("start");
        wait_for(
            "the failure to show",
            || matches!(l.health(), Health::Failed(m) if m.contains('7')),
        )
        .await;
        l.stop().await.expect("stop");

        let mut l = Process::new(
            vec!["/bin/true".into()],
            dir.path().join("missing.env"),
            dir.path().to_path_buf(),
            Duration::from_secs(1),
            config::Retry {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
        );
        let e = l.start().await.unwrap_err();
        assert!(e.to_string().contains("missing.env"), "{e}");
        assert!(!l.health().is_healthy());
    }

    #[tokio::test]
    async fn dropping_the_process_launcher_kills_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000",
            p = pidfile.display()
        );
        let mut l = process(dir.path(), &script, Duration::from_secs(1));
        l.start().await.expect("start");
        wait_for("the pid file", || pidfile.exists()).await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid number");
        let pid = nix::unistd::Pid::from_raw(pid);
        drop(l);
        wait_for("the child to die", || {
            // Reaped by tokio's orphan handling, or at least a zombie no longer running sleep.
            nix::sys::signal::kill(pid, None).is_err()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
        })
        .await;
    }
}
