//! Real processes for end-to-end tests: find the workspace's binaries, run them with their
//! stderr captured, wait for what they print, signal them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The path of a workspace binary (`gangplank-agent`, `gangplank-endpoint`, `gangplank`),
/// found next to the running test's target directory. `cargo nextest run --workspace` and
/// `cargo build --workspace` build them all.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo nextest run --workspace` (or `cargo build --workspace` first)",
        path.display()
    );
    path
}

/// A running process whose stderr (and stdout) lines are collected.
pub struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `command` with stdout and stderr captured.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for stream in [Box::new(out) as Box<dyn std::io::Read + Send>, Box::new(err)] {
            let lines = lines.clone();
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("GANGPLANK_TEST_ECHO").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Self {
            name: name.to_string(),
            child,
            lines,
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a printed line matches `pattern`; returns the first capture group (or the
    /// whole match). Panics with everything printed if it doesn't come within `timeout`.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> String {
        let re = regex::Regex::new(pattern).expect("pattern");
        let found = until(timeout, || {
            let lines = self.lines.lock().unwrap();
            lines
                .iter()
                .find_map(|l| re.captures(l))
                .map(|c| c.get(1).or(c.get(0)).unwrap().as_str().to_string())
        });
        match found {
            Some(s) => s,
            None => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "{}: no line matching {pattern:?} within {timeout:?} (exit: {status:?}); output:\n{}",
                    self.name,
                    self.output()
                )
            }
        }
    }

    /// Sends a signal (e.g. `"TERM"`, `"KILL"`, `"INT"`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        match until(timeout, || child.try_wait().ok().flatten()) {
            Some(status) => status,
            None => panic!(
                "{} did not exit within {timeout:?}; output:\n{}",
                self.name,
                self.output()
            ),
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it yields a value or `timeout` passes. For waiting on other
/// processes, which no in-process event can signal.
pub fn until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::park_timeout(Duration::from_millis(25));
    }
}

/// Polls the async `check` every `every` until it holds; panics naming `what` after
/// `timeout`. Uses tokio's clock, so under a paused clock the polls advance virtual time
/// instead of waiting. For state that changes asynchronously with no event to await (a
/// watch cache, a garbage collector, a child process).
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, every: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Whether a process with this pid exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}
