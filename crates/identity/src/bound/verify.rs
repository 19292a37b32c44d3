//! The endpoint half of bound keys: checking a first join's key proof, and verifying a
//! rejoin against the stored `WorkloadBinding`.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gangplank_api::meta::is_dns1123_subdomain;
use gangplank_api::{NamespacedName, kind, proto};

use super::{Payload, first_join_message, rejoin_message, session_message};
use crate::store::Bindings;
use crate::{Challenge, Error, Facts, Identity, Refused, Result};

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The raw Ed25519 key inside `spki`, if it is one.
pub(crate) fn ed25519(spki: &[u8]) -> Option<&[u8]> {
    spki.strip_prefix(&ED25519_SPKI_PREFIX[..])
        .filter(|k| k.len() == 32)
}

/// Whether `proof` is `spki`'s (Ed25519) signature of `message`.
pub(crate) fn signed(spki: &[u8], message: &[u8], proof: &[u8]) -> bool {
    ed25519(spki).is_some_and(|raw| {
        UnparsedPublicKey::new(&ED25519, raw)
            .verify(message, proof)
            .is_ok()
    })
}

/// Checks the agent key a first-join `credential` carries: `Ok(None)` when it carries none
/// (an agent older than bound keys: it gets no binding), `Ok(Some(public key, base64))` when
/// its proof over `challenge` verifies, and a refusal otherwise.
pub fn check_first_join_proof(
    credential: &proto::Credential,
    challenge: &Challenge,
) -> Result<Option<String>> {
    if credential.public_key.is_empty() && credential.proof.is_empty() {
        return Ok(None);
    }
    if ed25519(&credential.public_key).is_none() {
        return Err(Error::rejected(
            Refused::BoundKey,
            "carries an agent public key that is not an Ed25519 SubjectPublicKeyInfo",
        ));
    }
    if !signed(
        &credential.public_key,
        &first_join_message(challenge),
        &credential.proof,
    ) {
        return Err(Error::rejected(
            Refused::BoundKey,
            "proof is not a signature of this challenge by the agent's key",
        ));
    }
    Ok(Some(STANDARD.encode(&credential.public_key)))
}

/// Whether `proof` (base64) is the bound key `public_key` (base64 SubjectPublicKeyInfo, as a
/// binding stores it) signing `session` over `challenge`.
pub fn check_session_proof(public_key: &str, challenge: &Challenge, session: &str, proof: &str) -> bool {
    match (STANDARD.decode(public_key), STANDARD.decode(proof)) {
        (Ok(spki), Ok(proof)) => signed(&spki, &session_message(challenge, session), &proof),
        _ => false,
    }
}

/// Verifies rejoins against the bindings in a store.
pub struct Verifier {
    store: Arc<dyn Bindings>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier over the store that keeps the bindings.
    pub fn new(store: Arc<dyn Bindings>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl crate::Verifier for Verifier {
    fn kind(&self) -> &'static str {
        kind::BOUND_KEY
    }

    /// The binding named in the payload must exist in the group's namespace, be for this
    /// group and hold the presented key, and the proof must be that key's signature over
    /// this challenge, group and binding. The identity is the one the first join proved.
    async fn verify(
        &self,
        credential: &proto::Credential,
        challenge: &Challenge,
        group: &NamespacedName,
    ) -> Result<Identity> {
        if credential.kind != kind::BOUND_KEY {
            return Err(Error::UnsupportedKind(credential.kind.clone()));
        }
        let refuse = |why: String| Error::rejected(Refused::BoundKey, why);
        let payload: Payload = serde_json::from_slice(&credential.payload)
            .map_err(|_| refuse("is malformed: expected {\"binding\": NAME}".into()))?;
        if !is_dns1123_subdomain(&payload.binding) {
            return Err(refuse(format!(
                "names binding {:?}, which is not a valid name",
                payload.binding
            )));
        }
        let key = NamespacedName::new(&group.namespace, &payload.binding);
        let binding = self
            .store
            .binding(&key)
            .await?
            .ok_or_else(|| refuse(format!("{key}: no such binding (released, expired, or never made): onboard with the first-join credential")))?;
        if binding.spec.workload_group != group.name {
            return Err(refuse(format!(
                "{key} is bound to WorkloadGroup {}, not {}",
                binding.spec.workload_group, group.name
            )));
        }
        if STANDARD.encode(&credential.public_key) != binding.spec.public_key {
            return Err(refuse(format!("{key} is bound to a different key")));
        }
        if !signed(
            &credential.public_key,
            &rejoin_message(challenge, group, &payload.binding),
            &credential.proof,
        ) {
            return Err(refuse(format!(
                "{key}: the proof is not the bound key's signature of this challenge"
            )));
        }
        let mut facts: Facts = serde_json::from_value(binding.spec.facts.clone()).map_err(|e| {
            refuse(format!(
                "{key}: the stored facts cannot be read ({e}): release the VM and onboard it again"
            ))
        })?;
        if let Facts::Aws(aws) = &mut facts {
            // The instance key is the bound key: the entry keeps recording it.
            aws.agent_public_key = binding.spec.public_key.clone();
        }
        let address = if binding.spec.address.is_empty() {
            None
        } else {
            Some(binding.spec.address.parse().map_err(|_| {
                refuse(format!(
                    "{key}: the stored address {:?} is not an IP",
                    binding.spec.address
                ))
            })?)
        };
        Ok(Identity { facts, address })
    }
}
