//! The stored half of join tokens: making one to store, and the endpoint's verifier that
//! checks a presented token against the store and takes its use.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gangplank_api::meta::{ObjectMeta, Resource};
use gangplank_api::token::{JoinToken, JoinTokenSpec, JoinTokenStatus};
use gangplank_api::{NamespacedName, kind, proto};
use rand::Rng;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Facts, ID_ALPHABET, ID_LEN, SECRET_BYTES, Secret, parse, secret_sha256};
use crate::store::{self, JoinTokens};
use crate::{Challenge, Error, Identity, Refused, Result};

const CREATE_HINT: &str = "create a new one with `gangplank token create`";

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

/// The endpoint half: checks join tokens against the store that keeps them.
pub struct Verifier {
    store: Arc<dyn JoinTokens>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier over the store that keeps the tokens.
    pub fn new(store: Arc<dyn JoinTokens>) -> Self {
        Self { store }
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
        let rejected = |why: String| Error::rejected(Refused::JoinToken, format!("{}: {why}", parsed.id));
        let stored = self.store.join_token(&key).await?.ok_or_else(|| {
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
            return Err(Error::rejected(
                Refused::JoinToken,
                format!(
                    "{} was created for WorkloadGroup {}, not {}: use a token created for {group}",
                    parsed.id, stored.spec.workload_group, group.name
                ),
            ));
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
                key: if credential.public_key.is_empty() {
                    String::new()
                } else {
                    crate::bound::fingerprint(&credential.public_key)
                },
            }),
            address: None,
        })
    }

    /// Takes one use of the token at `now` (atomically, in the store).
    pub async fn commit_at(
        &self,
        identity: &Identity,
        credential: &proto::Credential,
        now: OffsetDateTime,
    ) -> Result<()> {
        let crate::Facts::JoinToken(facts) = &identity.facts else {
            return Err(Error::rejected(
                Refused::JoinToken,
                format!("verifier cannot commit {identity}: it is not a join token"),
            ));
        };
        let parsed = parse(payload(credential)?)?;
        if parsed.id != facts.id {
            return Err(Error::rejected(
                Refused::JoinToken,
                format!(
                    "{}: the credential does not belong to the verified identity",
                    parsed.id
                ),
            ));
        }
        let key = NamespacedName::new(&facts.namespace, &facts.id);
        match self
            .store
            .consume_join_token(&key, &secret_sha256(parsed.secret), now)
            .await
        {
            Ok(_) => Ok(()),
            Err(store::Error::TokenUnusable { id, reason, .. }) => {
                Err(Error::rejected(Refused::JoinToken, format!("{id}: {reason}")))
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
        Error::rejected(
            Refused::JoinToken,
            "is malformed (not UTF-8): expected <id>.<secret> as printed by `gangplank token create`",
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
}
