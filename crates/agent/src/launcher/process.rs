//! The sidecar as a supervised child process, for containers and development.
//!
//! No sidecar outlives its agent: on Linux the kernel sends the sidecar SIGTERM when the
//! agent dies, however it dies (`PR_SET_PDEATHSIG`), and the sidecar's pid is kept in a
//! pid file (`sidecar.process.pidFile`) so that the next agent stops a sidecar that ignored
//! that signal before it starts its own.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{Error, Launcher, Result, read_env};
use crate::backoff::{Backoff, Retry};
use crate::health::Health;

mod pid_file;

use pid_file::PidFile;

/// The sidecar as a supervised child process: restarted with capped backoff when it exits;
/// stopped with SIGTERM, then SIGKILL after a timeout; killed if the launcher is dropped;
/// sent SIGTERM by the kernel if the agent dies; its pid recorded in a pid file, and a
/// sidecar left by an earlier agent stopped before the first start.
#[derive(Debug)]
pub struct Process {
    command: Vec<String>,
    cluster_env: PathBuf,
    workdir: PathBuf,
    pid_file: PidFile,
    stop_timeout: Duration,
    retry: Retry,
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
    pid_file: PidFile,
}

impl Child {
    fn spawn(&self) -> Result<tokio::process::Child> {
        let env = read_env(&self.cluster_env)?;
        let (program, args) = self.command.split_first().ok_or_else(|| Error::Spawn {
            program: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty sidecar command"),
        })?;
        let mut command = Command::new(program);
        die_with_agent(&mut command);
        let child = command
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
        if let Some(pid) = child.id() {
            self.pid_file.record(pid);
        }
        Ok(child)
    }
}

/// Has the kernel send the sidecar SIGTERM when the agent dies, even by SIGKILL: the
/// sidecar stops as on a normal stop (pilot-agent drains and stops Envoy, its own child),
/// where SIGKILL would leave Envoy behind. A sidecar that ignores it is stopped by the next
/// agent, through the pid file.
///
/// The kernel sends it when the *thread* that forked the child ends: the sidecar is
/// spawned from async code, on one of the runtime's worker threads, which live as long as
/// the runtime (never from `spawn_blocking`, whose threads come and go).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_agent(command: &mut Command) {
    let agent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe work is allowed: two system calls (prctl, getppid), and errors made
    // from an errno, which allocate nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            // The agent died between fork and prctl: the signal will never come.
            if nix::unistd::getppid() != agent {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_agent(_: &mut Command) {}

impl Process {
    /// Runs `command` in `workdir` with the variables of `cluster_env` added to its
    /// environment, recording its pid in `pid_file`.
    pub fn new(
        command: Vec<String>,
        cluster_env: PathBuf,
        workdir: PathBuf,
        pid_file: PathBuf,
        stop_timeout: Duration,
        retry: Retry,
    ) -> Self {
        Process {
            command,
            cluster_env,
            workdir,
            pid_file: PidFile::new(pid_file),
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
    retry: Retry,
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
                            spec.pid_file.clear();
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
                spec.pid_file.clear();
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
            tracing::warn!(
                ?timeout,
                "sidecar ignored SIGTERM; killing it and its process group"
            );
            // Not reaped yet, so the group is still the sidecar's: what it started goes too.
            if let Err(e) = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL) {
                tracing::debug!(error = %e, "SIGKILL to the sidecar's process group failed");
            }
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
        // Nothing of ours runs now: a sidecar the pid file names was left by an earlier agent.
        self.pid_file.stop_leftover(self.stop_timeout).await;
        let spec = Child {
            command: self.command.clone(),
            cluster_env: self.cluster_env.clone(),
            workdir: self.workdir.clone(),
            pid_file: self.pid_file.clone(),
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
    use std::os::unix::process::CommandExt as _;
    use std::path::Path;

    use super::*;

    fn process(dir: &Path, script: &str, stop_timeout: Duration) -> Process {
        let env = dir.join("cluster.env");
        if !env.exists() {
            std::fs::write(&env, "GREETING='hello world'\nQUOTED='it'\"'\"'s'\n").expect("env");
        }
        Process::new(
            vec!["/bin/sh".into(), "-c".into(), script.into()],
            env,
            dir.to_path_buf(),
            dir.join("run/sidecar.pid"),
            stop_timeout,
            Retry {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
        )
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let (timeout, every) = (Duration::from_secs(10), Duration::from_millis(10));
        gangplank_testkit::process::eventually(what, timeout, every, || std::future::ready(cond())).await;
    }

    /// A started launcher whose child runs `sleep` after `prelude` (e.g. a trap), and the
    /// child's pid once it has written it.
    async fn sleeper(dir: &Path, prelude: &str, stop_timeout: Duration) -> (Process, nix::unistd::Pid) {
        let pidfile = dir.join("pid");
        let script = format!(
            "{prelude}echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000",
            p = pidfile.display()
        );
        let mut l = process(dir, &script, stop_timeout);
        l.start().await.expect("start");
        wait_for("the pid file", || pidfile.exists()).await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid number");
        (l, nix::unistd::Pid::from_raw(pid))
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
        let (mut l, pid) = sleeper(dir.path(), "trap '' TERM; ", Duration::from_millis(200)).await;
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
        // An absence has no event to wait for: a deliberate window longer than the
        // supervisor's restart delay, in which no run may be added.
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
            dir.path().join("run/sidecar.pid"),
            Duration::from_secs(1),
            Retry {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
        );
        let e = l.start().await.unwrap_err();
        assert!(e.to_string().contains("missing.env"), "{e}");
        assert!(!l.health().is_healthy());
    }

    #[tokio::test]
    async fn start_stops_the_sidecar_an_earlier_agent_left_and_records_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        // What a killed agent leaves: a sidecar that ignored SIGTERM, named by the pid file.
        let mut leftover = std::process::Command::new("/bin/sh")
            .args(["-c", "trap '' TERM; exec sleep 1000"])
            .process_group(0)
            .spawn()
            .expect("spawn");
        let pid_file = dir.path().join("run/sidecar.pid");
        PidFile::new(pid_file.clone()).record(leftover.id());

        let (mut l, pid) = sleeper(dir.path(), "", Duration::from_millis(200)).await;
        let status = leftover.try_wait().expect("try_wait");
        assert!(
            status.is_some(),
            "the leftover was stopped before the new sidecar started"
        );
        let recorded = std::fs::read_to_string(&pid_file).expect("pid file");
        assert!(recorded.starts_with(&format!("{pid} ")), "{recorded}");
        l.stop().await.expect("stop");
        assert!(!pid_file.exists(), "a stopped sidecar is forgotten");
    }

    #[tokio::test]
    async fn dropping_the_process_launcher_kills_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (l, pid) = sleeper(dir.path(), "", Duration::from_secs(1)).await;
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
