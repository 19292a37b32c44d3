//! The status file: what the running agent is doing, kept in `<files.stateDir>/status.json`
//! for `gangplank-agent status` (and anyone else on the VM who wants to know).
//!
//! The agent's loop only updates a [`Report`] in memory (a `watch` channel); [`keep`] writes
//! it, off the loop, when it changed and at most once per [`WRITE_INTERVAL`], and once more
//! with the final state when the agent stops. Nothing secret reaches the file: no token,
//! key, session or identity document, only the sidecar token's expiry.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

/// The status file's name in the state dir.
pub const FILE: &str = "status.json";
/// The file's `apiVersion`.
pub const API_VERSION: &str = "onboarding.gangplank.dev/v1alpha1";
/// The file's `kind`.
pub const KIND: &str = "AgentStatus";
/// The file is written at most once per this.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// The agent's process name, as `/proc/<pid>/comm` shows it.
pub const PROCESS_NAME: &str = "gangplank-agent";

/// What the agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Started; no onboarding attempt has finished yet.
    Starting,
    /// Not registered: the last onboarding attempt failed (see `lastError`), or the endpoint
    /// forgot the session or removed the entry and the agent onboards again.
    Onboarding,
    /// Registered as a WorkloadEntry; the Session stream is not open yet.
    Registered,
    /// Registered, and the Session stream is open (the endpoint welcomed it).
    Connected,
    /// Registered, the Session stream was lost; the agent reopens it.
    Reconnecting,
    /// Shutting down: deregistering and stopping the sidecar.
    Leaving,
    /// The agent stopped.
    Stopped,
}

impl Phase {
    /// The spelling in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Onboarding => "onboarding",
            Phase::Registered => "registered",
            Phase::Connected => "connected",
            Phase::Reconnecting => "reconnecting",
            Phase::Leaving => "leaving",
            Phase::Stopped => "stopped",
        }
    }
}

/// The open Session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// When the endpoint welcomed the stream (RFC 3339).
    pub connected_since: String,
    /// Which of this agent's Session streams it is (1 for the first; each reconnect adds one).
    pub generation: u64,
    /// The endpoint replica holding it.
    pub replica: String,
}

/// The sidecar token (`istio-token`): only when it expires, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    /// The token's `exp`, RFC 3339.
    pub expires_at: String,
}

/// The sidecar, as the launcher and the readiness probe see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    /// The launcher (`systemd`, `docker`, `process`).
    pub launcher: String,
    /// `stopped`, `running` or `failed`.
    pub state: String,
    /// Whether it counts as healthy (running, and answering its readiness probe if any).
    pub healthy: bool,
    /// One line about it (e.g. how it failed).
    pub message: String,
}

/// The last thing that went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// What happened and what to change.
    pub message: String,
    /// When (RFC 3339).
    pub at: String,
}

/// The status file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// [`API_VERSION`].
    pub api_version: String,
    /// [`KIND`].
    pub kind: String,
    /// The agent's process id.
    pub pid: u32,
    /// The agent's version.
    pub version: String,
    /// When the agent started (RFC 3339).
    pub started_at: String,
    /// When the file was last written (RFC 3339).
    #[serde(default)]
    pub updated_at: String,
    /// The onboarding endpoint (`host:port`).
    pub endpoint: String,
    /// The WorkloadGroup (`namespace/name`).
    pub workload_group: String,
    /// The WorkloadEntry (`namespace/name`), once the agent was registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// The address the entry was registered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// What the agent is doing.
    pub phase: Phase,
    /// The open Session stream, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    /// The sidecar token's expiry, once the endpoint sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_token: Option<Token>,
    /// The sidecar.
    pub sidecar: Sidecar,
    /// The last error, if any happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
}

impl Report {
    /// The report of an agent starting now for `config`.
    pub fn starting(config: &crate::config::Config) -> Self {
        Report {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            pid: std::process::id(),
            version: gangplank_api::VERSION.into(),
            started_at: rfc3339(SystemTime::now()),
            updated_at: String::new(),
            endpoint: config.onboarding.endpoint.to_string(),
            workload_group: config.onboarding.workload_group.to_string(),
            entry: None,
            address: None,
            phase: Phase::Starting,
            session: None,
            sidecar_token: None,
            sidecar: Sidecar {
                launcher: config.agent.sidecar.launcher.as_str().into(),
                state: "stopped".into(),
                healthy: false,
                message: "not started".into(),
            },
            last_error: None,
        }
    }

    /// Records `message` as the last error, now.
    pub fn error(&mut self, message: impl Into<String>) {
        self.last_error = Some(LastError {
            message: message.into(),
            at: rfc3339(SystemTime::now()),
        });
    }

    /// Records the sidecar's health.
    pub fn health(&mut self, health: &crate::health::Health) {
        use crate::health::Health;
        self.sidecar.state = match health {
            Health::Stopped => "stopped",
            Health::Running => "running",
            Health::Failed(_) => "failed",
        }
        .into();
        self.sidecar.healthy = health.is_healthy();
        self.sidecar.message = health.message();
    }

    /// Records the expiry of the sidecar token among `files`, if one is there and it is a JWT
    /// with an `exp`; `fallback` (Unix seconds, the endpoint's word) otherwise, if positive.
    pub fn token(&mut self, files: &[gangplank_api::proto::BootFile], fallback: i64) {
        let token = files
            .iter()
            .find(|f| crate::files::Name::parse(&f.name) == Some(crate::files::Name::Token));
        let Some(token) = token else { return };
        let exp = jwt_expiry(&token.content).or((fallback > 0).then_some(fallback));
        self.sidecar_token = exp.and_then(|s| u64::try_from(s).ok()).map(|s| Token {
            expires_at: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        });
    }

    /// The report as the file holds it (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// A time as RFC 3339, whole seconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The `exp` claim of a JWT, read without checking its signature (only to say when it
/// expires; the token itself goes nowhere).
pub fn jwt_expiry(jwt: &[u8]) -> Option<i64> {
    use base64::Engine;
    let text = std::str::from_utf8(jwt).ok()?.trim();
    let payload = text.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_i64()
}

/// Keeps `<dir>/status.json` in step with `report` until its sender is gone: written when it
/// changed, at most once per [`WRITE_INTERVAL`] (the latest state of a burst of changes), and
/// a last time with the final state. Disk I/O runs on the blocking pool; a failing write is
/// logged once (and its recovery), never retried in a loop.
pub async fn keep(dir: PathBuf, mut report: watch::Receiver<Report>) {
    report.mark_changed();
    let mut written: Option<Report> = None;
    let mut last_write: Option<Instant> = None;
    let mut failing = false;
    loop {
        let open = report.changed().await.is_ok();
        if open && let Some(at) = last_write {
            tokio::time::sleep_until(at + WRITE_INTERVAL).await;
        }
        let latest = report.borrow_and_update().clone();
        if written.as_ref() != Some(&latest) {
            let mut stamped = latest.clone();
            stamped.updated_at = rfc3339(SystemTime::now());
            let target = dir.clone();
            let outcome = tokio::task::spawn_blocking(move || write(&target, &stamped))
                .await
                .unwrap_or_else(|e| Err(format!("writing the status file panicked: {e}")));
            last_write = Some(Instant::now());
            match outcome {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!(path = %dir.join(FILE).display(), "the status file is written again");
                    }
                    written = Some(latest);
                }
                Err(why) if !failing => {
                    failing = true;
                    tracing::warn!(
                        "cannot keep the status file: {why}; `gangplank-agent status` will not see this agent"
                    );
                }
                Err(_) => {}
            }
        }
        if !open {
            return;
        }
    }
}

/// Writes `report` to `<dir>/status.json` atomically, mode 0644 (the folder, if missing,
/// is made 0700 like the key's: it also holds the VM's key and registration).
pub fn write(dir: &Path, report: &Report) -> Result<(), String> {
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut bytes = report.to_json().into_bytes();
    bytes.push(b'\n');
    let path = dir.join(FILE);
    gangplank_fs::write(&path, &bytes, 0o644).map_err(|e| e.to_string())
}

/// The status file in `dir`: `Ok(None)` when there is none.
pub fn read(dir: &Path) -> Result<Option<Report>, String> {
    let path = dir.join(FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| format!("{} is not an agent status file: {e}", path.display()))
}

/// Whether `pid` is a running gangplank-agent (its `/proc` entry exists and its process
/// name or executable is `gangplank-agent`; a reused pid of another program is not).
pub fn running(pid: u32) -> bool {
    running_in(Path::new("/proc"), pid)
}

fn running_in(proc: &Path, pid: u32) -> bool {
    if pid == 0 || pid == std::process::id() {
        return false;
    }
    let dir = proc.join(pid.to_string());
    let comm = std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == PROCESS_NAME);
    // The executable of a process another user runs may be unreadable; its name is not.
    let exe = std::fs::read_link(dir.join("exe")).is_ok_and(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            // An upgraded binary shows as `gangplank-agent (deleted)`.
            .is_some_and(|n| n == PROCESS_NAME || n.starts_with(&format!("{PROCESS_NAME} ")))
    });
    comm || exe
}

#[cfg(test)]
mod tests {
    use super::*;
    use gangplank_api::proto::BootFile;

    fn jwt(claims: &str) -> Vec<u8> {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", b64(r#"{"alg":"ES256"}"#), b64(claims)).into_bytes()
    }

    fn config() -> crate::config::Config {
        crate::config::Config {
            onboarding: crate::config::Onboarding::parse(
                Path::new("onboarding.yaml"),
                "apiVersion: onboarding.gangplank.dev/v1alpha1\nkind: OnboardingConfiguration\nonboardingEndpoint: {host: ep.example}\nworkloadGroup: {namespace: bookinfo, name: ratings}\n",
            )
            .expect("onboarding"),
            agent: crate::config::Agent::parse(Path::new("agent.yaml"), "").expect("agent"),
        }
    }

    #[test]
    fn the_token_expiry_is_read_from_the_jwt_and_the_token_never_reaches_the_report() {
        let mut r = Report::starting(&config());
        let token = jwt(r#"{"sub":"system:serviceaccount:bookinfo:ratings","exp":2000000000}"#);
        let files = vec![BootFile {
            name: "istio-token".into(),
            content: token.clone(),
            mode: 0o600,
        }];
        r.token(&files, 1);
        assert_eq!(
            r.sidecar_token.as_ref().map(|t| t.expires_at.as_str()),
            Some("2033-05-18T03:33:20Z")
        );
        let json = r.to_json();
        assert!(!json.contains(std::str::from_utf8(&token).unwrap()), "{json}");
        assert!(!json.contains("serviceaccount"), "{json}");
        // Not a JWT: the endpoint's word.
        let opaque = vec![BootFile {
            name: "istio-token".into(),
            content: b"token-1".to_vec(),
            mode: 0o600,
        }];
        r.token(&opaque, 1_000_000_000);
        assert_eq!(
            r.sidecar_token.map(|t| t.expires_at),
            Some("2001-09-09T01:46:40Z".to_string())
        );
        // No token among the files: unchanged.
        let mut r = Report::starting(&config());
        r.token(&[], 5);
        assert_eq!(r.sidecar_token, None);
    }

    #[test]
    fn the_file_round_trips_in_camel_case_with_mode_0644() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("var/lib/gangplank");
        assert_eq!(read(&state), Ok(None));
        let mut r = Report::starting(&config());
        r.entry = Some("bookinfo/ratings-x".into());
        r.error("it broke");
        write(&state, &r).expect("written");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&state.join(FILE)), 0o644);
        assert_eq!(mode(&state), 0o700);
        let text = std::fs::read_to_string(state.join(FILE)).expect("read");
        for field in [
            "\"apiVersion\"",
            "\"workloadGroup\"",
            "\"startedAt\"",
            "\"lastError\"",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        assert_eq!(read(&state), Ok(Some(r)));
        std::fs::write(state.join(FILE), "{").expect("write");
        assert!(read(&state).is_err());
    }

    #[test]
    fn only_a_live_gangplank_agent_counts_as_running() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc = dir.path();
        let fake = |pid: u32, comm: &str| {
            std::fs::create_dir_all(proc.join(pid.to_string())).expect("mkdir");
            std::fs::write(proc.join(format!("{pid}/comm")), format!("{comm}\n")).expect("comm");
        };
        fake(100, "gangplank-agent");
        fake(101, "bash");
        assert!(running_in(proc, 100));
        assert!(!running_in(proc, 101), "a reused pid");
        assert!(!running_in(proc, 102), "no such process");
        assert!(!running_in(proc, 0));
        // This very process (the `status` command itself) is never the agent it looks for.
        assert!(!running(std::process::id()));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_coalesced_to_one_write_per_interval_and_the_last_state_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().to_path_buf();
        let (tx, rx) = watch::channel(Report::starting(&config()));
        let keeper = tokio::spawn(keep(state.clone(), rx));
        let phase = || read(&state).ok().flatten().map(|r| r.phase);
        // The initial state is written at once.
        while phase().is_none() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(phase(), Some(Phase::Starting));
        let started = Instant::now();
        tx.send_modify(|r| r.phase = Phase::Onboarding);
        tx.send_modify(|r| r.phase = Phase::Registered);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(phase(), Some(Phase::Starting), "not within the interval");
        while phase() != Some(Phase::Registered) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(phase(), Some(Phase::Registered), "the latest of the burst");
        tx.send_modify(|r| r.phase = Phase::Stopped);
        drop(tx);
        keeper.await.expect("keeper");
        assert_eq!(phase(), Some(Phase::Stopped), "the final state is written");
    }
}
