//! A VM's bound key: how a VM rejoins without a new credential.
//!
//! At its first onboarding the agent creates an Ed25519 key pair in its state dir (private
//! key mode 0600, never sent) and signs the endpoint's nonce with it next to its platform
//! credential; the endpoint binds the public key to the VM's registration (a
//! `WorkloadBinding`). Every later onboarding — after an agent restart, a reboot, an upgrade
//! or an endpoint failover — is a `bound-key` credential: the binding's name and a signature
//! by that key over the plane id, a fresh nonce, the WorkloadGroup and the binding. A copied
//! session, document or binding name is useless without the key.
//!
//! This half is the agent's (and the message both sides sign and check); the endpoint's
//! verifier is in `verify.rs`, behind the `verify` feature.

use std::path::Path;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gangplank_api::{NamespacedName, kind, proto};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Challenge, Error, Result};

#[cfg(feature = "verify")]
pub(crate) mod verify;
#[cfg(feature = "verify")]
pub use verify::{Verifier, check_first_join_proof, check_session_proof};

/// The key's file name in the agent's state dir.
pub const KEY_FILE: &str = "instance-key.pem";
const FIRST_JOIN_CONTEXT: &[u8] = b"gangplank agent key proof v1";
const REJOIN_CONTEXT: &[u8] = b"gangplank bound-key rejoin v1";
const SESSION_CONTEXT: &[u8] = b"gangplank session on a new connection v1";
/// The gRPC metadata carrying the nonce a session proof signs.
pub const SESSION_NONCE_HEADER: &str = "x-gangplank-nonce";
/// The gRPC metadata carrying a session proof (base64).
pub const SESSION_PROOF_HEADER: &str = "x-gangplank-session-proof";
/// The PEM label of a PKCS#8 private key.
const PKCS8_LABEL: &str = "PRIVATE KEY";

/// A `bound-key` credential's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// The binding's name (the VM's WorkloadEntry's), in the group's namespace.
    pub binding: String,
}

fn message(context: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut m = context.to_vec();
    for part in parts {
        m.push(0);
        m.extend_from_slice(part.as_bytes());
    }
    m
}

/// What a first join signs: the plane id and the nonce.
pub fn first_join_message(challenge: &Challenge) -> Vec<u8> {
    message(FIRST_JOIN_CONTEXT, &[&challenge.plane_id, &challenge.nonce])
}

/// What a rejoin signs: the plane id, the nonce, the WorkloadGroup and the binding, so a
/// proof is good for one onboarding of one VM into one group at one plane.
pub fn rejoin_message(challenge: &Challenge, group: &NamespacedName, binding: &str) -> Vec<u8> {
    message(
        REJOIN_CONTEXT,
        &[
            &challenge.plane_id,
            &challenge.nonce,
            &group.namespace,
            &group.name,
            binding,
        ],
    )
}

/// What a session used on a connection other than the one it was issued on signs: the plane
/// id, a fresh nonce and the session token's SHA-256, so a proof is good for one session at
/// one plane, once.
pub fn session_message(challenge: &Challenge, session: &str) -> Vec<u8> {
    let digest: String = Sha256::digest(session.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    message(SESSION_CONTEXT, &[&challenge.plane_id, &challenge.nonce, &digest])
}

/// A short, stable, name-safe fingerprint of a public key (SubjectPublicKeyInfo DER): the
/// first 10 hex digits of its SHA-256.
pub fn fingerprint(spki: &[u8]) -> String {
    Sha256::digest(spki)
        .iter()
        .take(5)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The stored form of a public key: base64 of its SubjectPublicKeyInfo DER.
pub fn encode_public_key(spki: &[u8]) -> String {
    STANDARD.encode(spki)
}

/// The VM's key, loaded from or created in a file.
pub struct Key {
    pair: Ed25519KeyPair,
    spki: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("fingerprint", &fingerprint(&self.spki))
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Loads the key from `path`, creating it (Ed25519, PKCS#8 v1 PEM, mode 0600, its
    /// folder created) if absent. The format is the one OpenSSL writes, so a key survives an
    /// agent upgrade or downgrade.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        Self::from_pair(load_or_create_pair(path)?, &path.display().to_string())
    }

    /// Loads the key from `path` without creating one: `Ok(None)` when there is none yet
    /// (for `gangplank-agent doctor`, which changes nothing on the VM).
    pub fn load(path: &Path) -> Result<Option<Self>> {
        match read_pair(path)? {
            Some(pair) => Self::from_pair(pair, &path.display().to_string()).map(Some),
            None => Ok(None),
        }
    }

    /// A new key held in memory only, for simulated VMs (the benchmark's agents).
    pub fn generate() -> Result<Self> {
        let pair = Ed25519KeyPair::generate()
            .map_err(|e| Error::Unavailable(format!("generating an Ed25519 key: {e}")))?;
        Self::from_pair(pair, "a generated key")
    }

    fn from_pair(pair: Ed25519KeyPair, what: &str) -> Result<Self> {
        let spki = pair
            .public_key()
            .as_der()
            .map_err(|e| Error::Unavailable(format!("encoding the public key of {what}: {e}")))?
            .as_ref()
            .to_vec();
        Ok(Self { pair, spki })
    }

    /// The public key, SubjectPublicKeyInfo DER.
    pub fn public_key(&self) -> &[u8] {
        &self.spki
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// Adds this key and its proof over `challenge` to a first-join `credential` that carries
    /// none (the AWS provider signs its own).
    pub fn attach(&self, credential: &mut proto::Credential, challenge: &Challenge) {
        if credential.public_key.is_empty() {
            credential.public_key = self.spki.clone();
            credential.proof = self.sign(&first_join_message(challenge));
        }
    }

    /// The proof that lets `session` be used on a new connection (after a reconnect), over
    /// `challenge` (a nonce from Discover on that connection), base64.
    pub fn prove_session(&self, challenge: &Challenge, session: &str) -> String {
        STANDARD.encode(self.sign(&session_message(challenge, session)))
    }

    /// A rejoin credential for `binding` in `group`.
    pub fn rejoin(
        &self,
        challenge: &Challenge,
        group: &NamespacedName,
        binding: &str,
    ) -> Result<proto::Credential> {
        let payload = serde_json::to_vec(&Payload {
            binding: binding.to_owned(),
        })
        .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(proto::Credential {
            kind: kind::BOUND_KEY.into(),
            payload,
            proof: self.sign(&rejoin_message(challenge, group, binding)),
            public_key: self.spki.clone(),
        })
    }
}

/// Loads the Ed25519 key pair at `path`, creating it if absent.
pub(crate) fn load_or_create_pair(path: &Path) -> Result<Ed25519KeyPair> {
    if let Some(pair) = read_pair(path)? {
        return Ok(pair);
    }
    let fail = |what: String| Error::Unavailable(format!("instance key {}: {what}", path.display()));
    let key = Ed25519KeyPair::generate().map_err(|e| fail(format!("cannot be generated: {e}")))?;
    let der = key
        .to_pkcs8v1()
        .map_err(|e| fail(format!("cannot be encoded: {e}")))?;
    write_private(path, pem(PKCS8_LABEL, der.as_ref()).as_bytes()).map_err(fail)?;
    Ok(key)
}

/// The Ed25519 key pair at `path`, `None` when there is no file.
fn read_pair(path: &Path) -> Result<Option<Ed25519KeyPair>> {
    let fail = |what: String| Error::Unavailable(format!("instance key {}: {what}", path.display()));
    match std::fs::read(path) {
        Ok(pem) => PrivatePkcs8KeyDer::from_pem_slice(&pem)
            .ok()
            .and_then(|der| Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der()).ok())
            .map(Some)
            .ok_or_else(|| {
                fail("is not an Ed25519 private key in PEM: remove it only if this VM was re-imaged".into())
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(fail(format!("cannot be read: {e}"))),
    }
}

/// `der` as PEM, as OpenSSL writes it: base64 in lines of 64.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for (i, c) in b64.chars().enumerate() {
        if i > 0 && i % 64 == 0 {
            out.push('\n');
        }
        out.push(c);
    }
    out.push_str(&format!("\n-----END {label}-----\n"));
    out
}

/// Writes `bytes` to `path` with mode 0600, creating its folder (0700); the error says what failed.
fn write_private(path: &Path, bytes: &[u8]) -> std::result::Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    gangplank_fs::write(path, bytes, 0o600).map_err(|e| format!("cannot be written: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/instance-key.pem");
        assert!(Key::load(&path).expect("nothing to load").is_none());
        assert!(!path.exists(), "loading creates nothing");
        let made = Key::load_or_create(&path).expect("created");
        let again = Key::load_or_create(&path).expect("loaded");
        assert_eq!(made.public_key(), again.public_key());
        let loaded = Key::load(&path).expect("loaded").expect("present");
        assert_eq!(loaded.public_key(), made.public_key());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fingerprint(made.public_key()).len(), 10);
    }

    #[test]
    fn proofs_are_bound_to_plane_nonce_group_and_binding() {
        let c = Challenge {
            plane_id: "p".into(),
            nonce: "n".into(),
            ..Default::default()
        };
        let g = NamespacedName::new("ns", "g");
        let m = rejoin_message(&c, &g, "b");
        assert_ne!(m, rejoin_message(&c, &g, "c"));
        assert_ne!(m, rejoin_message(&c, &NamespacedName::new("ns", "h"), "b"));
        let other = Challenge {
            nonce: "m".into(),
            ..c.clone()
        };
        assert_ne!(m, rejoin_message(&other, &g, "b"));
        assert_ne!(first_join_message(&c), m);
    }
}
