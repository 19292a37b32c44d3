//! OIDC JWTs: on-prem VMs prove who they are with a token from the company's identity
//! provider.
//!
//! The agent half ([`Provider`]) reads a JWT from a file or runs a command that prints one.
//! The endpoint half (`Verifier`, in `verify.rs`, with the `verify` feature) checks it
//! against the JWKS of a configured issuer (`IssuerConfig`): signature, algorithm, audience
//! (the plane id), expiry and subject.
//!
//! Issuers must be `https://` URLs. Plain `http://` is accepted only for loopback hosts
//! (`localhost`, `127.0.0.0/8`, `[::1]`), for development and tests: nothing leaves the host.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use gangplank_api::{kind, proto};

use crate::{Challenge, Error, Result};

#[cfg(feature = "verify")]
mod verify;

#[cfg(feature = "verify")]
pub use verify::{
    ConfigError, IssuerConfig, JWKS_TTL, JwksSource, LEEWAY, MAX_TOKEN_LEN, REFETCH_INTERVAL, Verifier,
};

/// How long [`Provider::from_command`] waits for its command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Verified facts of a JWT.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// Every claim of the token.
    pub claims: serde_json::Value,
}

/// Where the agent gets its JWT from.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Command(Vec<String>),
}

/// The agent half: reads a JWT from a file, or runs a command that prints one, each time
/// a credential is needed (so a token refreshed on disk or by the IdP is picked up).
#[derive(Debug, Clone)]
pub struct Provider {
    source: Source,
}

impl Provider {
    /// Reads the token from `path` whenever a credential is needed.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if path.as_os_str().is_empty() {
            return Err(Error::Unavailable(
                "jwt.file is empty: set it to the path of the token file".into(),
            ));
        }
        Ok(Self {
            source: Source::File(path),
        })
    }

    /// Runs `argv` whenever a credential is needed; its trimmed stdout is the token. The
    /// command gets the plane id (the audience to request) in `GANGPLANK_PLANE_ID`.
    pub fn from_command(argv: Vec<String>) -> Result<Self> {
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(Error::Unavailable(
                "jwt.command is empty: set it to the command that prints a token".into(),
            ));
        }
        Ok(Self {
            source: Source::Command(argv),
        })
    }

    async fn token(&self, challenge: &Challenge) -> Result<String> {
        let token = match &self.source {
            Source::File(path) => tokio::fs::read_to_string(path).await.map_err(|e| {
                Error::Unavailable(format!(
                    "cannot read the jwt file {}: {e}; check jwt.file in the agent config",
                    path.display()
                ))
            })?,
            Source::Command(argv) => run_command(argv, &challenge.plane_id).await?,
        };
        let token = token.trim();
        if token.is_empty() {
            let from = match &self.source {
                Source::File(p) => p.display().to_string(),
                Source::Command(argv) => format!("command {}", argv[0]),
            };
            return Err(Error::Unavailable(format!("{from} gave an empty jwt")));
        }
        Ok(token.to_string())
    }
}

async fn run_command(argv: &[String], plane_id: &str) -> Result<String> {
    let program = &argv[0];
    let child = tokio::process::Command::new(program)
        .args(&argv[1..])
        .env("GANGPLANK_PLANE_ID", plane_id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot run the jwt command {program}: {e}; check jwt.command in the agent config"
            ))
        })?;
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            Error::Unavailable(format!(
                "the jwt command {program} did not finish within {}s",
                COMMAND_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| Error::Unavailable(format!("the jwt command {program} failed: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(no output on stderr)");
        return Err(Error::Unavailable(format!(
            "the jwt command {program} {}: {}",
            output.status,
            last.trim()
        )));
    }
    String::from_utf8(output.stdout)
        .map_err(|_| Error::Unavailable(format!("the jwt command {program} printed non-UTF-8 output")))
}

#[async_trait]
impl crate::Provider for Provider {
    fn kind(&self) -> &'static str {
        kind::JWT
    }

    async fn credential(&self, challenge: &Challenge) -> Result<proto::Credential> {
        Ok(proto::Credential {
            kind: kind::JWT.into(),
            payload: self.token(challenge).await?.into_bytes(),
            ..Default::default()
        })
    }
}
