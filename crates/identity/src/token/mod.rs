//! Join tokens: a short-lived, counted credential an admin creates for one WorkloadGroup.
//!
//! The admin hands out `<id>.<secret>`; the registry stores only the SHA-256 of the secret
//! (in a `JoinToken` named `<id>` in the group's namespace). The agent half ([`Provider`])
//! reads the token from a file. With the `verify` feature (`verify.rs`), `create` makes a
//! token and the endpoint half (`Verifier`) checks it against a `store::JoinTokens`
//! without writing anything; its [`commit`](crate::Verifier::commit) takes one use
//! atomically once policy allowed the onboarding.

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gangplank_api::{kind, proto};
use sha2::{Digest, Sha256};

use crate::{Challenge, Error, Result};

#[cfg(feature = "verify")]
mod verify;

#[cfg(feature = "verify")]
pub use verify::{Verifier, create};

/// Length of a token id.
pub const ID_LEN: usize = 10;
/// Random bytes in a token secret.
pub const SECRET_BYTES: usize = 32;
const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// Base64url (no padding) length of [`SECRET_BYTES`].
const SECRET_LEN: usize = 43;

/// Verified facts of a join token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// The token id (`metadata.name` of the stored token).
    pub id: String,
    /// The namespace the token lives in (the group's).
    pub namespace: String,
    /// The WorkloadGroup it was created for.
    pub workload_group: String,
    /// The fingerprint of the agent key the token was presented with
    /// ([`crate::bound::fingerprint`]); empty for an agent without one. It names the VM's
    /// entry, so each VM a multi-use token admits gets its own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
}

/// A whole join token as handed to an admin (`<id>.<secret>`). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token value (e.g. read from a file).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The token itself, to print once or send to the endpoint. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A token split into its parts; only the id may be shown. The agent only checks the shape;
/// the verifier reads the parts.
#[cfg_attr(not(feature = "verify"), allow(dead_code))]
struct Parsed<'a> {
    id: &'a str,
    secret: &'a str,
}

/// Splits `<id>.<secret>`. The error never contains the token.
fn parse(token: &str) -> Result<Parsed<'_>> {
    let malformed = |what: &str| {
        Error::rejected(
            crate::Refused::JoinToken,
            format!("is malformed ({what}): expected <id>.<secret> as printed by `gangplank token create`"),
        )
    };
    let (id, secret) = token
        .split_once('.')
        .ok_or_else(|| malformed("no '.' separating id and secret"))?;
    if id.len() != ID_LEN || !id.bytes().all(|b| ID_ALPHABET.contains(&b)) {
        return Err(malformed("the id is not 10 characters of [a-z0-9]"));
    }
    let secret_ok = secret.len() == SECRET_LEN
        && URL_SAFE_NO_PAD
            .decode(secret)
            .is_ok_and(|b| b.len() == SECRET_BYTES);
    if !secret_ok {
        return Err(malformed("the secret is not 32 bytes of base64url"));
    }
    Ok(Parsed { id, secret })
}

/// Lower-case hex SHA-256 of a token's secret part, as stored in `spec.secretSha256`.
pub fn secret_sha256(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The agent half: presents a join token read from a file or given directly.
pub struct Provider {
    token: Secret,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider").finish_non_exhaustive()
    }
}

impl Provider {
    /// Reads the token from `path` (surrounding whitespace trimmed). Warns when the file can
    /// be read by others than its owner (mode looser than 0600).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Unavailable(format!(
                "cannot read the join token file {}: {e}; check joinToken.file in the agent config",
                path.display()
            ))
        })?;
        warn_if_loose(path);
        let token = text.trim();
        parse(token).map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?;
        Ok(Self {
            token: Secret(token.to_string()),
        })
    }

    /// Uses `token` as is (it is checked for shape only).
    pub fn from_value(token: Secret) -> Result<Self> {
        let trimmed = token.expose().trim().to_string();
        parse(&trimmed).map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(Self {
            token: Secret(trimmed),
        })
    }

    /// The token id (not secret), for log lines.
    pub fn id(&self) -> &str {
        self.token.0.split('.').next().unwrap_or_default()
    }
}

fn warn_if_loose(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:04o}"),
                "the join token file is readable by other users: chmod 0600 it"
            );
        }
    }
}

#[async_trait]
impl crate::Provider for Provider {
    fn kind(&self) -> &'static str {
        kind::JOIN_TOKEN
    }

    async fn credential(&self, _challenge: &Challenge) -> Result<proto::Credential> {
        Ok(proto::Credential {
            kind: kind::JOIN_TOKEN.into(),
            payload: self.token.0.as_bytes().to_vec(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_tokens_are_rejected_without_echo() {
        for bad in [
            "",
            "nodot",
            "short.abc",
            "ABCDEFGHIJ.xxxx",
            "abcdefghij.not-32-bytes",
        ] {
            let err = parse(bad).err().expect("rejected").to_string();
            assert!(err.contains("malformed"), "{err}");
            if !bad.is_empty() {
                assert!(!err.contains(bad), "{err} echoes {bad}");
            }
        }
    }
}
