//! Properties of the credential parsers: whatever bytes a caller sends as a credential (a
//! JWT, a GCE token, an AWS document and its PKCS#7 signature, an Azure attested document, a
//! join token, a rejoin), the verifier refuses them with an error, never a panic. Inputs are
//! arbitrary bytes and, to get past the first checks, inputs shaped like the real thing
//! (base64url JSON parts, a JSON envelope around arbitrary DER).
//!
//! Cases: proptest's default (256), or `PROPTEST_CASES`. No regression files are written.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use gangplank_api::{NamespacedName, kind, proto};
use gangplank_identity::jwt::{IssuerConfig, JwksSource};
use gangplank_identity::{Challenge, Error, aws, azure, bound, gcp, jwt, token};
use gangplank_registry::IdentityStore;
use gangplank_testkit::oidc::Key;
use proptest::prelude::*;

const ISSUER: &str = "https://idp.example";
const PLANE: &str = "plane-1";

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every verifier, built once: the JWT one trusts an inline key (no fetch), the GCE one a
/// JWKS URL nothing listens on, the AWS one its built-in certificates, the Azure one
/// Microsoft's roots with certificate fetching off; the stores are an empty directory.
struct Verifiers {
    runtime: tokio::runtime::Runtime,
    key: Key,
    jwt: jwt::Verifier,
    gcp: gcp::Verifier,
    aws: aws::Verifier,
    azure: azure::Verifier,
    token: token::Verifier,
    bound: bound::Verifier,
    _dir: tempfile::TempDir,
}

fn verifiers() -> &'static Verifiers {
    static V: OnceLock<Verifiers> = OnceLock::new();
    V.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        let key = Key::generate(jsonwebtoken::Algorithm::RS256, "k1").expect("key");
        let jwks = serde_json::json!({ "keys": [key.jwk()] });
        let jwt = jwt::Verifier::new(
            vec![IssuerConfig {
                issuer: ISSUER.into(),
                jwks: JwksSource::Inline(jwks),
                ca_bundle: None,
            }],
            PLANE.into(),
        )
        .expect("jwt verifier");
        let gcp = gcp::Verifier::new(
            gcp::VerifierConfig {
                jwks_url: "http://127.0.0.1:9/jwks".into(),
                ca_bundle: None,
                max_age: Duration::from_secs(3600),
            },
            PLANE.into(),
        )
        .expect("gcp verifier");
        let dir = tempfile::tempdir().expect("tempdir");
        let registry =
            gangplank_registry::dir::Registry::open(dir.path().join("registry")).expect("registry");
        let store = Arc::new(IdentityStore::new(Arc::new(registry)));
        let aws = aws::Verifier::new(aws::Certificates::builtin(), store.clone());
        let azure = azure::Verifier::new(azure::VerifierConfig {
            issuer_hosts: Some(vec![]),
            ..Default::default()
        })
        .expect("azure verifier");
        Verifiers {
            key,
            jwt,
            gcp,
            aws,
            azure,
            token: token::Verifier::new(store.clone()),
            bound: bound::Verifier::new(store),
            runtime,
            _dir: dir,
        }
    })
}

fn challenge() -> Challenge {
    Challenge {
        plane_id: PLANE.into(),
        nonce: "bm9uY2U".into(),
        ..Default::default()
    }
}

fn group() -> NamespacedName {
    NamespacedName::new("bookinfo", "ratings")
}

/// Verifies `payload` (with `proof` and `public_key`) as a credential of `kind`.
fn verify(kind: &str, payload: Vec<u8>, proof: Vec<u8>, public_key: Vec<u8>) -> Result<(), Error> {
    let v = verifiers();
    let credential = proto::Credential {
        kind: kind.into(),
        payload,
        proof,
        public_key,
    };
    let verifier: &dyn gangplank_identity::Verifier = match kind {
        kind::JWT => &v.jwt,
        kind::GCP_GCE => &v.gcp,
        kind::AWS_EC2 => &v.aws,
        kind::AZURE_VM => &v.azure,
        kind::JOIN_TOKEN => &v.token,
        _ => &v.bound,
    };
    v.runtime
        .block_on(verifier.verify(&credential, &challenge(), &group()))
        .map(drop)
}

/// A refusal: the credential's fault, not an outage and not a panic.
fn refused(result: Result<(), Error>) -> Result<(), TestCaseError> {
    match result {
        Err(Error::Rejected { .. }) => Ok(()),
        other => Err(TestCaseError::fail(format!("expected a refusal, got {other:?}"))),
    }
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,16}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from(ISSUER)),
        Just(serde_json::Value::from(PLANE)),
    ];
    let key = prop::sample::select(vec![
        "alg",
        "kid",
        "typ",
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "nbf",
        "google",
        "compute_engine",
        "x",
    ]);
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| {
                serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

/// Three dot-separated base64url parts: JSON header and claims, arbitrary signature.
fn jwt_shaped() -> impl Strategy<Value = String> {
    (
        json(),
        prop::sample::select(vec!["RS256", "ES256", "HS256", "none", "PS512", "EdDSA", "x"]),
        json(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(header, alg, claims, signature)| {
            let mut header = header;
            if let Some(h) = header.as_object_mut() {
                h.insert("alg".into(), alg.into());
            }
            let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
            format!(
                "{}.{}.{}",
                part(&header),
                part(&claims),
                URL_SAFE_NO_PAD.encode(signature)
            )
        })
}

/// Bytes that start like DER (a SEQUENCE, definite or indefinite length), then anything.
fn der_shaped() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            vec![0x30, 0x80],
            vec![0x30, 0x82, 0x01, 0x00],
            vec![0x30, 0x81, 0x40],
            vec![],
        ]),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(head, tail)| [head, tail].concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_are_refused_by_every_verifier(
        payload in prop::collection::vec(any::<u8>(), 0..512),
        proof in prop::collection::vec(any::<u8>(), 0..80),
        public_key in prop::collection::vec(any::<u8>(), 0..60),
    ) {
        for kind in [kind::JWT, kind::GCP_GCE, kind::AWS_EC2, kind::AZURE_VM, kind::JOIN_TOKEN, kind::BOUND_KEY] {
            refused(verify(kind, payload.clone(), proof.clone(), public_key.clone()))?;
        }
    }

    #[test]
    fn jwt_shaped_strings_are_refused(token in jwt_shaped()) {
        refused(verify(kind::JWT, token.clone().into_bytes(), vec![], vec![]))?;
        refused(verify(kind::GCP_GCE, token.into_bytes(), vec![], vec![]))?;
    }

    #[test]
    fn jwts_signed_by_a_trusted_key_with_arbitrary_claims_do_not_panic(claims in json()) {
        let signed = verifiers().key.sign(&claims);
        // Arbitrary claims may, rarely, be a valid token; what matters is an answer.
        let _ = verify(kind::JWT, signed.into_bytes(), vec![], vec![]);
    }

    #[test]
    fn aws_documents_with_arbitrary_signatures_are_refused(
        document in json(),
        der in der_shaped(),
        raw in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let v = verifiers();
        let text = serde_json::to_string(&document).unwrap();
        for signature in [STANDARD.encode(&der), String::from_utf8_lossy(&raw).into_owned()] {
            refused(v.aws.verify_document(text.as_bytes(), &signature).map(drop))?;
            let envelope = serde_json::json!({ "document": text, "rsa2048": signature });
            refused(verify(kind::AWS_EC2, serde_json::to_vec(&envelope).unwrap(), vec![], vec![]))?;
        }
    }

    #[test]
    fn azure_envelopes_with_arbitrary_signatures_are_refused(der in der_shaped(), encoding in prop::sample::select(vec!["pkcs7", "x", ""])) {
        let envelope = serde_json::json!({ "encoding": encoding, "signature": STANDARD.encode(&der) });
        let bytes = serde_json::to_vec(&envelope).unwrap();
        refused(verifiers().azure.verify_document(&bytes, &challenge()).map(drop))?;
        refused(verify(kind::AZURE_VM, bytes, vec![], vec![]))?;
    }

    #[test]
    fn token_shaped_strings_are_refused(id in "[a-z0-9]{0,12}", secret in "[A-Za-z0-9_-]{0,50}", dots in 1usize..3) {
        refused(verify(kind::JOIN_TOKEN, format!("{id}{}{secret}", ".".repeat(dots)).into_bytes(), vec![], vec![]))?;
        let rejoin = serde_json::json!({ "binding": id, "namespace": "bookinfo" });
        refused(verify(kind::BOUND_KEY, serde_json::to_vec(&rejoin).unwrap(), secret.into_bytes(), vec![0x30; 44]))?;
    }
}
