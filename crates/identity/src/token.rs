//! Join tokens: a short-lived, counted credential an admin creates for one WorkloadGroup.
//!
//! The admin hands out `<id>.<secret>`; the registry stores only the SHA-256 of the secret
//! (in a [`JoinToken`] named `<id>` in the group's namespace). The agent half
//! ([`Provider`]) reads the token from a file; the endpoint half ([`Verifier`]) checks it
//! without writing anything, and [`Verifier::commit`](crate::Verifier::commit) takes one use
//! atomically once policy allowed the onboarding.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gangplank_api::meta::{ObjectMeta, Resource};
use gangplank_api::proto;
use gangplank_api::token::{JoinToken, JoinTokenSpec, JoinTokenStatus};
use gangplank_api::{NamespacedName, kind};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{Challenge, Error, Identity, Result};

/// Length of a token id.
pub const ID_LEN: usize = 10;
/// Random bytes in a token secret.
pub const SECRET_BYTES: usize = 32;
const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// Base64url (no padding) length of [`SECRET_BYTES`].
const SECRET_LEN: usize = 43;
const CREATE_HINT: &str = "create a new one with `gangplank token create`";

/// Verified facts of a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The token id (`metadata.name` of the stored token).
    pub id: String,
    /// The namespace the token lives in (the group's).
    pub namespace: String,
    /// The WorkloadGroup it was created for.
    pub workload_group: String,
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

/// A token split into its parts; only the id may be shown.
struct Parsed<'a> {
    id: &'a str,
    secret: &'a str,
}

/// Splits `<id>.<secret>`. The error never contains the token.
fn parse(token: &str) -> Result<Parsed<'_>> {
    let malformed = |what: &str| {
        Error::Rejected(format!(
            "join token is malformed ({what}): expected <id>.<secret> as printed by `gangplank token create`"
        ))
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

/// Creates a join token for `group`, valid for `ttl` from `now` and `uses` onboardings.
/// Returns the object to store and the token to hand out (shown once, never stored).
pub fn create(group: &NamespacedName, ttl: Duration, uses: u32, now: OffsetDateTime) -> (JoinToken, Secret) {
    let mut rng = rand::rng();
    let id: String = (0..ID_LEN)
        .map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())]))
        .collect();
    let mut bytes = [0u8; SECRET_BYTES];
    rng.fill(&mut bytes);
    let secret = URL_SAFE_NO_PAD.encode(bytes);
    let expires = now + ttl;
    let token = JoinToken {
        api_version: JoinToken::API_VERSION.into(),
        kind: JoinToken::KIND.into(),
        metadata: ObjectMeta {
            name: Some(id.clone()),
            namespace: Some(group.namespace.clone()),
            ..Default::default()
        },
        spec: JoinTokenSpec {
            workload_group: group.name.clone(),
            secret_sha256: secret_sha256(&secret),
            expires_at: rfc3339(expires),
            uses,
        },
        status: JoinTokenStatus { used: 0 },
    };
    (token, Secret(format!("{id}.{secret}")))
}

fn rfc3339(t: OffsetDateTime) -> String {
    // Whole seconds keep the stored value short; formatting a valid UTC time cannot fail.
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
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

/// The endpoint half: checks join tokens against the registry.
pub struct Verifier {
    registry: Arc<dyn gangplank_registry::Registry>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier over the registry that stores the tokens.
    pub fn new(registry: Arc<dyn gangplank_registry::Registry>) -> Self {
        Self { registry }
    }

    /// Checks `credential` for `group` at `now`, without writing.
    pub async fn verify_at(
        &self,
        credential: &proto::Credential,
        group: &NamespacedName,
        now: OffsetDateTime,
    ) -> Result<Identity> {
        let token = payload(credential)?;
        let parsed = parse(token)?;
        let key = NamespacedName::new(&group.namespace, parsed.id);
        let rejected = |why: String| Error::Rejected(format!("join token {}: {why}", parsed.id));
        let stored = self.registry.join_token(&key).await?.ok_or_else(|| {
            rejected(format!(
                "not found in namespace {}: check the WorkloadGroup's namespace, or {CREATE_HINT}",
                group.namespace
            ))
        })?;
        // The secret first, so a caller without it learns nothing about the token.
        let presented = secret_sha256(parsed.secret);
        let matches: bool = presented
            .as_bytes()
            .ct_eq(stored.spec.secret_sha256.to_ascii_lowercase().as_bytes())
            .into();
        if !matches {
            return Err(rejected(format!(
                "secret does not match: copy the whole token, or {CREATE_HINT}"
            )));
        }
        if stored.spec.workload_group != group.name {
            return Err(Error::Rejected(format!(
                "join token {} was created for WorkloadGroup {}, not {}: use a token created for {group}",
                parsed.id, stored.spec.workload_group, group.name
            )));
        }
        let expires = OffsetDateTime::parse(&stored.spec.expires_at, &Rfc3339).map_err(|_| {
            rejected(format!(
                "stored expiresAt {:?} is not RFC 3339: {CREATE_HINT}",
                stored.spec.expires_at
            ))
        })?;
        if now >= expires {
            return Err(rejected(format!(
                "expired at {}; {CREATE_HINT}",
                stored.spec.expires_at
            )));
        }
        if stored.status.used >= stored.spec.uses {
            return Err(rejected(format!(
                "all {} uses are spent; {CREATE_HINT}",
                stored.spec.uses
            )));
        }
        Ok(Identity {
            facts: crate::Facts::JoinToken(Facts {
                id: parsed.id.to_string(),
                namespace: group.namespace.clone(),
                workload_group: stored.spec.workload_group,
            }),
            address: None,
        })
    }

    /// Takes one use of the token at `now` (atomically, in the registry).
    pub async fn commit_at(
        &self,
        identity: &Identity,
        credential: &proto::Credential,
        now: OffsetDateTime,
    ) -> Result<()> {
        let crate::Facts::JoinToken(facts) = &identity.facts else {
            return Err(Error::Rejected(format!(
                "{identity} is not a join token: the join-token verifier cannot commit it"
            )));
        };
        let parsed = parse(payload(credential)?)?;
        if parsed.id != facts.id {
            return Err(Error::Rejected(format!(
                "join token {}: the credential does not belong to the verified identity",
                parsed.id
            )));
        }
        let key = NamespacedName::new(&facts.namespace, &facts.id);
        match self
            .registry
            .consume_join_token(&key, &secret_sha256(parsed.secret), now)
            .await
        {
            Ok(_) => Ok(()),
            Err(gangplank_registry::Error::TokenUnusable { id, reason, .. }) => {
                Err(Error::Rejected(format!("join token {id}: {reason}")))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn payload(credential: &proto::Credential) -> Result<&str> {
    if credential.kind != kind::JOIN_TOKEN {
        return Err(Error::UnsupportedKind(credential.kind.clone()));
    }
    std::str::from_utf8(&credential.payload).map_err(|_| {
        Error::Rejected(
            "join token is malformed (not UTF-8): expected <id>.<secret> as printed by `gangplank token create`"
                .into(),
        )
    })
}

#[async_trait]
impl crate::Verifier for Verifier {
    fn kind(&self) -> &'static str {
        kind::JOIN_TOKEN
    }

    async fn verify(
        &self,
        credential: &proto::Credential,
        _challenge: &Challenge,
        group: &NamespacedName,
    ) -> Result<Identity> {
        self.verify_at(credential, group, OffsetDateTime::now_utc()).await
    }

    async fn commit(&self, identity: &Identity, credential: &proto::Credential) -> Result<()> {
        self.commit_at(identity, credential, OffsetDateTime::now_utc())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_tokens_parse_and_hash() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let (stored, secret) = create(
            &NamespacedName::new("bookinfo", "ratings"),
            Duration::from_secs(3600),
            2,
            now,
        );
        let p = parse(secret.expose()).expect("created token parses");
        assert_eq!(Some(p.id), stored.metadata.name.as_deref());
        assert_eq!(stored.spec.secret_sha256, secret_sha256(p.secret));
        assert_eq!(stored.spec.expires_at, "1970-01-01T01:00:00Z");
        assert_eq!(stored.spec.uses, 2);
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
    }

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
