//! The process launcher's pid file: which sidecar this agent started, so that the agent
//! started after one that was killed (SIGKILL, OOM, a crash) stops the sidecar its
//! predecessor left behind instead of starting a second one beside it.
//!
//! The file holds `<pid> <start time> <boot id>`. The pid alone could name an unrelated
//! process once the sidecar is gone and its number reused; the start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot) tells the two apart within a boot, and the
//! boot id (`/proc/sys/kernel/random/boot_id`) across reboots.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// How long a sidecar that got SIGKILL may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often a leftover sidecar is looked at while it stops.
const POLL: Duration = Duration::from_millis(50);

/// The pid file at one path.
#[derive(Debug, Clone)]
pub(super) struct PidFile {
    path: PathBuf,
}

/// What the file says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    pid: i32,
    start: u64,
    boot: String,
}

/// The fields of `/proc/<pid>/stat` we use.
#[derive(Debug, Clone, Copy)]
struct Stat {
    /// `R`, `S`, `Z`, ...
    state: char,
    /// The process group.
    pgrp: i32,
    /// Clock ticks after boot when the process started.
    start: u64,
}

impl Stat {
    fn of(pid: i32) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name, in parentheses, may hold spaces and parentheses itself.
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(Stat {
            state: fields.first()?.chars().next()?,
            pgrp: fields.get(2)?.parse().ok()?,
            start: fields.get(19)?.parse().ok()?,
        })
    }

    /// Running, sleeping or stopped: not a zombie waiting to be reaped.
    fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

impl PidFile {
    /// The pid file at `path` (its folder is created when a pid is recorded).
    pub(super) fn new(path: PathBuf) -> Self {
        PidFile { path }
    }

    /// Records `pid`, a sidecar just started, as the running sidecar. A failure is logged:
    /// the sidecar runs all the same, only a next agent could not stop it if it outlived us.
    pub(super) fn record(&self, pid: u32) {
        let Some(stat) = i32::try_from(pid).ok().and_then(Stat::of) else {
            // It exited already: nothing to record.
            return;
        };
        let text = format!("{pid} {} {}\n", stat.start, boot_id());
        let written = match self.path.parent() {
            Some(dir) => std::fs::create_dir_all(dir).map_err(|e| e.to_string()),
            None => Ok(()),
        }
        .and_then(|()| gangplank_fs::write(&self.path, text.as_bytes(), 0o644).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::warn!(
                "cannot record the sidecar's pid in {}: {e}; if this agent is killed, the next one \
                 cannot stop the sidecar it leaves: make the folder writable or set sidecar.process.pidFile",
                self.path.display()
            );
        }
    }

    /// Forgets the sidecar: it was stopped.
    pub(super) fn clear(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "cannot remove the sidecar's pid file {}: {e}",
                self.path.display()
            ),
        }
    }

    fn read(&self) -> Option<Record> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(
                    "cannot read the sidecar's pid file {}: {e}; a sidecar left by an earlier agent, if any, keeps running",
                    self.path.display()
                );
                return None;
            }
        };
        let mut fields = text.split_whitespace();
        let record = (|| {
            Some(Record {
                pid: fields.next()?.parse().ok().filter(|p| *p > 0)?,
                start: fields.next()?.parse().ok()?,
                boot: fields.next()?.to_owned(),
            })
        })();
        if record.is_none() {
            tracing::warn!(
                "{} is not a sidecar pid file (`<pid> <start time> <boot id>`); ignoring it",
                self.path.display()
            );
        }
        record
    }

    /// Stops the sidecar an earlier agent started and left running, if the file names one:
    /// SIGTERM to its process group, SIGKILL after `timeout`. A process that merely has
    /// the same pid now is left alone. Then the file is removed.
    pub(super) async fn stop_leftover(&self, timeout: Duration) {
        let Some(record) = self.read() else {
            self.clear();
            return;
        };
        let pid = record.pid;
        let ours =
            record.boot == boot_id() && Stat::of(pid).is_some_and(|s| s.is_live() && s.start == record.start);
        if !ours {
            tracing::debug!(pid, "the sidecar an earlier agent recorded is gone");
            self.clear();
            return;
        }
        // The launcher starts the sidecar as the leader of its own process group; the group
        // takes what the sidecar started (Envoy) along with it.
        let group = Stat::of(pid).is_some_and(|s| s.pgrp == pid);
        tracing::warn!(
            pid,
            pid_file = %self.path.display(),
            "a sidecar started by an earlier agent is still running; stopping it before starting a new one"
        );
        signal(pid, group, Signal::SIGTERM);
        if !gone_within(pid, group, record.start, timeout).await {
            tracing::warn!(
                pid,
                ?timeout,
                "the earlier agent's sidecar ignored SIGTERM; killing it"
            );
            signal(pid, group, Signal::SIGKILL);
            if !gone_within(pid, group, record.start, KILL_WAIT).await {
                tracing::error!(
                    pid,
                    "the earlier agent's sidecar is still there {KILL_WAIT:?} after SIGKILL; starting a new one anyway"
                );
            }
        }
        tracing::info!(pid, "the earlier agent's sidecar stopped");
        self.clear();
    }
}

fn signal(pid: i32, group: bool, signal: Signal) {
    let pid = Pid::from_raw(pid);
    let sent = if group {
        killpg(pid, signal)
    } else {
        kill(pid, signal)
    };
    if let Err(e) = sent {
        tracing::debug!(%pid, %signal, error = %e, "cannot signal the earlier agent's sidecar");
    }
}

/// Waits until neither the sidecar nor (with `group`) any live member of its process group
/// is left. While a member is alive the group's id cannot be given to a new process, so
/// every member is the sidecar's.
async fn gone_within(pid: i32, group: bool, start: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let leader = Stat::of(pid).is_some_and(|s| s.is_live() && s.start == start);
        let members = leader || (group && group_has_members(pid));
        if !members {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn group_has_members(pgrp: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter_map(Stat::of)
        .any(|s| s.pgrp == pgrp && s.is_live())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt as _;
    use std::process::{Child, Command, Stdio};

    use std::path::Path;

    use super::*;

    /// A process in its own group running `script`, and a pid file naming it.
    fn leftover(dir: &Path, script: &str) -> (Child, PidFile) {
        let child = Command::new("/bin/sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn");
        let file = PidFile::new(dir.join("run/sidecar.pid"));
        file.record(child.id());
        (child, file)
    }

    fn running(child: &mut Child) -> bool {
        matches!(child.try_wait(), Ok(None))
    }

    #[tokio::test]
    async fn a_leftover_sidecar_is_stopped_and_the_file_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut child, file) = leftover(dir.path(), "exec sleep 1000");
        assert!(file.path.exists());
        file.stop_leftover(Duration::from_secs(10)).await;
        let status = child.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(15),
            "stopped by SIGTERM"
        );
        assert!(!file.path.exists());
    }

    #[tokio::test]
    async fn a_leftover_that_ignores_sigterm_is_killed_with_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let grandchild = dir.path().join("grandchild");
        // The shell starts a second process in its group, as pilot-agent starts Envoy.
        let script = format!(
            "trap '' TERM; sleep 1000 & echo $! > {g}.tmp; mv {g}.tmp {g}; wait",
            g = grandchild.display()
        );
        let (mut child, file) = leftover(dir.path(), &script);
        let grandchild: i32 = gangplank_testkit::process::until(Duration::from_secs(10), || {
            std::fs::read_to_string(&grandchild).ok()
        })
        .expect("the script starts its child")
        .trim()
        .parse()
        .expect("a pid");
        let started = std::time::Instant::now();
        file.stop_leftover(Duration::from_millis(300)).await;
        assert!(started.elapsed() >= Duration::from_millis(300), "SIGTERM first");
        let status = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        assert!(
            !Stat::of(grandchild).is_some_and(|s| s.is_live()),
            "the sidecar's own child is gone too"
        );
    }

    #[tokio::test]
    async fn a_process_that_reused_the_pid_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut child, file) = leftover(dir.path(), "exec sleep 1000");
        // The same pid, started at another time: another process.
        let text = std::fs::read_to_string(&file.path).expect("read");
        let mut fields: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
        fields[1] = (fields[1].parse::<u64>().expect("start") + 1).to_string();
        std::fs::write(&file.path, fields.join(" ")).expect("write");
        file.stop_leftover(Duration::from_secs(1)).await;
        assert!(running(&mut child), "not ours: left alone");
        assert!(!file.path.exists(), "the stale file is removed");

        // Same for a record from another boot.
        file.record(child.id());
        let text = std::fs::read_to_string(&file.path).expect("read");
        let (rest, _) = text.trim().rsplit_once(' ').expect("three fields");
        std::fs::write(&file.path, format!("{rest} another-boot\n")).expect("write");
        file.stop_leftover(Duration::from_secs(1)).await;
        assert!(running(&mut child), "not ours: left alone");
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    #[tokio::test]
    async fn a_missing_or_malformed_file_stops_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = PidFile::new(dir.path().join("sidecar.pid"));
        file.stop_leftover(Duration::from_secs(1)).await;
        std::fs::write(&file.path, "not a pid\n").expect("write");
        file.stop_leftover(Duration::from_secs(1)).await;
        assert!(!file.path.exists());
    }
}
