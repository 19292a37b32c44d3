//! The endpoint's signing keys and what it signs with them.
//!
//! Two keys, kept in the state dir (so restarts and replicas sharing the dir agree):
//! - one ES256 key signs **sidecar tokens** (`istio-token`): a Kubernetes-style
//!   service-account token with audience `istio-ca`, which istiod is told to trust through
//!   its JWKS (served at `/.well-known/openid-configuration` and `/openid/v1/jwks`);
//! - the nonce key (and a MAC key derived from it) MACs **nonces** and **sessions** (HS256
//!   JWTs: the bearer an agent presents on `Session` and `Leave`, checked by the replicas
//!   alone).
//!
//! Nonces are random bytes, an expiry and the issuing process's id, MAC'd with a key from
//! the state dir; the issuing process remembers the ones presented, so each is accepted once
//! (another replica, or the same one after a restart, refuses it and the agent calls Discover
//! again).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The audience of sidecar tokens, as istiod expects.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";
const SESSION_AUDIENCE: &str = "gangplank-agent-session";
/// How long a Discover nonce stays valid.
pub const NONCE_TTL: Duration = Duration::from_secs(300);

/// Why keys could not be loaded or a token not minted/verified.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state dir could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key is malformed.
    #[error("{0}")]
    Key(String),
    /// A token is not valid.
    #[error("{0}")]
    Invalid(String),
}

/// The endpoint's keys.
pub struct Keys {
    encoding: EncodingKey,
    kid: String,
    x: String,
    y: String,
    nonce_key: hmac::Key,
    issuer: std::sync::RwLock<String>,
    /// Names this process: a nonce is accepted only by the process that issued it, which
    /// remembers the ones presented, so each is accepted once across every replica and
    /// restart.
    instance: [u8; 8],
    /// Nonces already presented.
    used_nonces: std::sync::Mutex<UsedNonces>,
    /// Signs and checks session tokens (HS256): only the endpoint's replicas, which share
    /// the nonce key, ever check a session, so a MAC does what a signature would at a
    /// fiftieth of the cost (an ES256 signature and two verifications were a third of an
    /// onboarding's cryptography).
    session_encoding: EncodingKey,
    session_decoding: DecodingKey,
    /// Sessions issued before they were HS256 (ES256, with the signing key) are still
    /// accepted, so an upgrade does not send every agent back through a rejoin. They name no
    /// connection, so using one always takes the bound key's proof.
    legacy_session_decoding: DecodingKey,
}

/// Nonces already presented, with their expiry; the expired ones are dropped at most once a
/// second, not at every check (with thousands in flight that scan was per onboarding).
#[derive(Default)]
struct UsedNonces {
    seen: std::collections::HashMap<Vec<u8>, i64>,
    pruned_at: i64,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// A minted sidecar token.
#[derive(Clone)]
pub struct SidecarToken {
    /// The JWT (secret).
    pub jwt: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
}

impl fmt::Debug for SidecarToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SidecarToken")
            .field("jwt", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What a session token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// `<namespace>/<entry name>`.
    pub sub: String,
    /// Unique per onboarding; recorded on the entry, so an older session of the same VM is refused.
    pub jti: String,
    /// Audience.
    pub aud: String,
    /// Issued at.
    pub iat: i64,
    /// Expiry.
    pub exp: i64,
    /// The TLS connection the session was issued on ([`crate::server::Connection`]): the
    /// session works on it alone, or elsewhere with a proof by the VM's bound key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cnx: String,
}

#[derive(Serialize)]
struct SidecarClaims<'a> {
    iss: &'a str,
    sub: String,
    aud: [&'a str; 1],
    iat: i64,
    nbf: i64,
    exp: i64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: serde_json::Value,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    b
}

/// Writes a secret file atomically with mode 0600.
pub(crate) fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    gangplank_fs::write(path, bytes, 0o600).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e.source,
    })
}

fn load_or_create(path: &Path, create: impl FnOnce() -> Result<Vec<u8>, Error>) -> Result<Vec<u8>, Error> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = create()?;
            write_secret(path, &bytes)?;
            Ok(bytes)
        }
        Err(source) => Err(Error::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

impl Keys {
    /// Loads the keys from `state_dir`, creating them on first start.
    pub fn load(state_dir: &Path, issuer: &str) -> Result<Self, Error> {
        std::fs::create_dir_all(state_dir).map_err(|source| Error::Io {
            path: state_dir.display().to_string(),
            source,
        })?;
        let pem = load_or_create(&state_dir.join("signing-key.pem"), || {
            let key = rcgen::KeyPair::generate().map_err(|e| Error::Key(e.to_string()))?;
            Ok(key.serialize_pem().into_bytes())
        })?;
        let pem = String::from_utf8(pem).map_err(|_| Error::Key("signing-key.pem is not PEM text".into()))?;
        let pair = rcgen::KeyPair::from_pem(&pem).map_err(|e| Error::Key(format!("signing-key.pem: {e}")))?;
        let raw = pair.public_key_raw();
        if raw.len() != 65 || raw[0] != 4 {
            return Err(Error::Key("signing-key.pem: expected an ECDSA P-256 key".into()));
        }
        let (x, y) = (B64.encode(&raw[1..33]), B64.encode(&raw[33..65]));
        let kid = B64.encode(&Sha256::digest(raw)[..12]);
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| Error::Key(e.to_string()))?;
        let legacy_session_decoding =
            DecodingKey::from_ec_components(&x, &y).map_err(|e| Error::Key(e.to_string()))?;
        let nonce_secret = load_or_create(&state_dir.join("nonce-key"), || Ok(random(32)))?;
        let nonce_key = hmac::Key::new(hmac::HMAC_SHA256, &nonce_secret);
        let session_secret = Sha256::new()
            .chain_update(b"gangplank session key v1\0")
            .chain_update(&nonce_secret)
            .finalize();
        Ok(Self {
            encoding,
            kid,
            x,
            y,
            nonce_key,
            issuer: std::sync::RwLock::new(issuer.to_string()),
            instance: random(8)
                .try_into()
                .map_err(|_| Error::Key("random instance id".into()))?,
            used_nonces: Default::default(),
            session_encoding: EncodingKey::from_secret(&session_secret),
            session_decoding: DecodingKey::from_secret(&session_secret),
            legacy_session_decoding,
        })
    }

    fn header(&self) -> Header {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        h
    }

    /// The `iss` of sidecar tokens.
    pub fn issuer(&self) -> String {
        self.issuer.read().map(|i| i.clone()).unwrap_or_default()
    }

    /// Sets the `iss` of sidecar tokens (once the endpoint knows the port it listens on).
    pub fn set_issuer(&self, issuer: String) {
        if let Ok(mut i) = self.issuer.write() {
            *i = issuer;
        }
    }

    /// Mints an `istio-token` for `namespace/service_account`.
    pub fn sidecar_token(
        &self,
        namespace: &str,
        service_account: &str,
        lifetime: Duration,
    ) -> Result<SidecarToken, Error> {
        let iat = now();
        let exp = iat + lifetime.as_secs() as i64;
        let issuer = self.issuer();
        let claims = SidecarClaims {
            iss: &issuer,
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
            aud: [ISTIO_CA_AUDIENCE],
            iat,
            nbf: iat,
            exp,
            kubernetes: serde_json::json!({
                "namespace": namespace,
                "serviceaccount": { "name": service_account },
            }),
        };
        let jwt = jsonwebtoken::encode(&self.header(), &claims, &self.encoding)
            .map_err(|e| Error::Key(e.to_string()))?;
        Ok(SidecarToken {
            jwt,
            issued_at: iat,
            expires_at: exp,
        })
    }

    /// The JWKS document of the sidecar-token issuer.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
            "kid": self.kid, "x": self.x, "y": self.y,
        }]})
    }

    /// The OIDC discovery document of the sidecar-token issuer.
    pub fn openid_configuration(&self) -> serde_json::Value {
        let issuer = self.issuer();
        serde_json::json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    /// A session token for the entry `sub` (`namespace/name`), identified by `jti`, issued on
    /// `connection`.
    pub fn session(
        &self,
        sub: &str,
        jti: &str,
        connection: &str,
        lifetime: Duration,
    ) -> Result<String, Error> {
        let iat = now();
        let claims = Session {
            sub: sub.into(),
            jti: jti.into(),
            aud: SESSION_AUDIENCE.into(),
            iat,
            exp: iat + lifetime.as_secs() as i64,
            cnx: connection.into(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.session_encoding)
            .map_err(|e| Error::Key(e.to_string()))
    }

    /// Verifies a session token.
    pub fn verify_session(&self, token: &str) -> Result<Session, Error> {
        let legacy = jsonwebtoken::decode_header(token).is_ok_and(|h| h.alg == Algorithm::ES256);
        let (algorithm, key) = if legacy {
            (Algorithm::ES256, &self.legacy_session_decoding)
        } else {
            (Algorithm::HS256, &self.session_decoding)
        };
        let mut v = Validation::new(algorithm);
        v.set_audience(&[SESSION_AUDIENCE]);
        v.set_required_spec_claims(&["exp", "aud", "sub"]);
        v.leeway = 30;
        jsonwebtoken::decode::<Session>(token, key, &v)
            .map(|d| d.claims)
            .map_err(|e| Error::Invalid(format!("session token is not valid ({e}): onboard again")))
    }

    /// A fresh nonce, valid for [`NONCE_TTL`], for this process only: random (16 bytes),
    /// expiry (8), this process's instance id (8), then a truncated HMAC (16).
    pub fn nonce(&self) -> String {
        let expires = (now() + NONCE_TTL.as_secs() as i64).to_be_bytes();
        let mut body = random(16);
        body.extend_from_slice(&expires);
        body.extend_from_slice(&self.instance);
        let tag = hmac::sign(&self.nonce_key, &body);
        body.extend_from_slice(&tag.as_ref()[..16]);
        B64.encode(body)
    }

    /// Checks that `nonce` was issued by this process, has not expired and was not presented
    /// before, and marks it used. (An agent whose Onboard reaches another replica than its
    /// Discover, or a restarted one, is told to call Discover again.)
    pub fn check_nonce(&self, nonce: &str) -> Result<(), Error> {
        let malformed = || Error::Invalid("nonce is malformed: call Discover for a new one".into());
        let bytes = B64.decode(nonce).map_err(|_| malformed())?;
        if bytes.len() != 48 {
            return Err(malformed());
        }
        let (body, tag) = bytes.split_at(32);
        let expected = hmac::sign(&self.nonce_key, body);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected.as_ref()[..16], tag)) {
            return Err(Error::Invalid(
                "nonce was not issued by this onboarding plane: call Discover again".into(),
            ));
        }
        if body[24..32] != self.instance {
            return Err(Error::Invalid(
                "nonce was issued by another endpoint replica, or before this one restarted: \
                 call Discover again (on the same connection as Onboard)"
                    .into(),
            ));
        }
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&body[16..24]);
        let expires = i64::from_be_bytes(exp);
        let now = now();
        if expires < now {
            return Err(Error::Invalid(
                "nonce has expired: call Discover for a new one".into(),
            ));
        }
        let mut used = self.used_nonces.lock().unwrap_or_else(|p| p.into_inner());
        if used.pruned_at != now {
            used.seen.retain(|_, exp| *exp >= now);
            used.pruned_at = now;
        }
        if used.seen.insert(body[..16].to_vec(), expires).is_some() {
            return Err(Error::Invalid(
                "nonce was already used: call Discover for a new one for every onboarding".into(),
            ));
        }
        Ok(())
    }

    /// A random identifier (session ids).
    pub fn random_id() -> String {
        B64.encode(random(12))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (tempfile::TempDir, Keys) {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::load(dir.path(), "https://endpoint.test:15443").unwrap();
        (dir, keys)
    }

    #[test]
    fn sidecar_tokens_verify_against_the_published_jwks() {
        let (_dir, keys) = keys();
        let token = keys
            .sidecar_token("bookinfo", "ratings-sa", Duration::from_secs(600))
            .unwrap();
        let jwk: jsonwebtoken::jwk::JwkSet = serde_json::from_value(keys.jwks()).unwrap();
        let key = DecodingKey::from_jwk(&jwk.keys[0]).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["istio-ca"]);
        v.set_issuer(&["https://endpoint.test:15443"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(&token.jwt, &key, &v)
            .unwrap()
            .claims;
        assert_eq!(claims["sub"], "system:serviceaccount:bookinfo:ratings-sa");
        assert_eq!(token.expires_at - token.issued_at, 600);
        // A sidecar token is not a session.
        assert!(keys.verify_session(&token.jwt).is_err());
    }

    #[test]
    fn keys_survive_a_restart() {
        let (dir, keys) = keys();
        let session = keys
            .session("bookinfo/x", "j1", "c1", Duration::from_secs(60))
            .unwrap();
        let nonce = keys.nonce();
        let again = Keys::load(dir.path(), "https://endpoint.test:15443").unwrap();
        assert_eq!(again.verify_session(&session).unwrap().sub, "bookinfo/x");
        // A nonce is for the process that issued it: not another replica sharing the keys,
        // not the same one after a restart (which forgot the nonces it saw).
        let elsewhere = again.check_nonce(&nonce).unwrap_err().to_string();
        assert!(
            elsewhere.contains("issued by another endpoint replica"),
            "{elsewhere}"
        );
        keys.check_nonce(&nonce).unwrap();
        let replay = keys.check_nonce(&nonce).unwrap_err().to_string();
        assert!(replay.contains("already used"), "{replay}");
        let mode = std::fs::metadata(dir.path().join("signing-key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }

    #[test]
    fn forged_nonces_and_sessions_are_refused() {
        let (_dir, keys) = keys();
        let (_other_dir, other) = keys_other();
        assert!(
            keys.check_nonce(&other.nonce())
                .unwrap_err()
                .to_string()
                .contains("not issued by this")
        );
        assert!(keys.check_nonce("garbage").is_err());
        let forged = other
            .session("bookinfo/x", "j1", "c1", Duration::from_secs(60))
            .unwrap();
        assert!(keys.verify_session(&forged).is_err());
        let expired = keys.session("bookinfo/x", "j1", "c1", Duration::ZERO).unwrap();
        // Expired beyond the leeway: re-sign with a past expiry.
        let past = Session {
            sub: "bookinfo/x".into(),
            jti: "j".into(),
            aud: SESSION_AUDIENCE.into(),
            iat: 0,
            exp: 1,
            cnx: "c1".into(),
        };
        let old =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &past, &keys.session_encoding).unwrap();
        let err = keys.verify_session(&old).unwrap_err().to_string();
        assert!(err.contains("xpired"), "{err}");
        assert!(keys.verify_session(&expired).is_ok(), "within leeway");
    }

    #[test]
    fn a_session_issued_before_sessions_were_hs256_still_verifies_and_names_no_connection() {
        let (_dir, keys) = keys();
        let (_other_dir, other) = keys_other();
        let claims = serde_json::json!({"sub": "bookinfo/x", "jti": "j1", "aud": SESSION_AUDIENCE,
            "iat": now(), "exp": now() + 60});
        let legacy = jsonwebtoken::encode(&keys.header(), &claims, &keys.encoding).unwrap();
        let session = keys
            .verify_session(&legacy)
            .expect("an ES256 session of this plane");
        assert_eq!((session.jti.as_str(), session.cnx.as_str()), ("j1", ""));
        let foreign = jsonwebtoken::encode(&other.header(), &claims, &other.encoding).unwrap();
        assert!(
            keys.verify_session(&foreign).is_err(),
            "another plane's ES256 session"
        );
    }

    fn keys_other() -> (tempfile::TempDir, Keys) {
        keys()
    }
}
