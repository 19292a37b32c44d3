//! The JWT verifier against a stand-in OIDC issuer over HTTPS: the real fetch and
//! verification code; only the trust root (a dev CA) differs from production.

use gangplank_api::{NamespacedName, kind, proto};
use gangplank_identity::jwt::{IssuerConfig, JwksSource, Provider, Verifier};
use gangplank_identity::{Challenge, Error, Facts, Provider as _, Verifier as _};
use gangplank_testkit::oidc::{Issuer, Key, now};
use jsonwebtoken::Algorithm;
use serde_json::json;

const PLANE: &str = "plane-1";

struct Setup {
    issuer: Issuer,
    verifier: Verifier,
    _dir: tempfile::TempDir,
}

async fn setup_with(issuer: Issuer, source: fn(&Issuer) -> JwksSource) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = issuer.write_ca(dir.path()).expect("write ca");
    let config = IssuerConfig {
        issuer: issuer.url().to_string(),
        jwks: source(&issuer),
        ca_bundle: Some(ca),
    };
    let verifier = Verifier::new(vec![config], PLANE.into()).expect("valid config");
    Setup {
        issuer,
        verifier,
        _dir: dir,
    }
}

async fn setup() -> Setup {
    let issuer = Issuer::start().await.expect("issuer starts");
    setup_with(issuer, |_| JwksSource::Discovery).await
}

fn rejected(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(e @ Error::Rejected { .. }) => e.to_string(),
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[tokio::test]
async fn good_token_gives_facts_via_discovery() {
    let s = setup().await;
    let mut claims = s.issuer.claims("vm-7", PLANE);
    claims["groups"] = json!(["db"]);
    let token = s.issuer.sign(&claims);
    let facts = s.verifier.verify_token(&token).await.expect("valid token");
    assert_eq!(facts.issuer, s.issuer.url());
    assert_eq!(facts.subject, "vm-7");
    assert_eq!(facts.claims["groups"], json!(["db"]));
    assert_eq!(s.issuer.discovery_requests(), 1);
    assert_eq!(s.issuer.jwks_requests(), 1);

    // Cached: a second token does not fetch again.
    s.verifier.verify_token(&token).await.expect("still valid");
    assert_eq!(s.issuer.jwks_requests(), 1);
}

#[tokio::test]
async fn verifier_trait_returns_a_jwt_identity() {
    let s = setup().await;
    let token = s.issuer.sign(&s.issuer.claims("vm-7", PLANE));
    let credential = proto::Credential {
        kind: kind::JWT.into(),
        payload: token.into_bytes(),
        ..Default::default()
    };
    let challenge = Challenge {
        plane_id: PLANE.into(),
        nonce: "n".into(),
        ..Default::default()
    };
    let group = NamespacedName::new("bookinfo", "ratings");
    let identity = s
        .verifier
        .verify(&credential, &challenge, &group)
        .await
        .expect("verified");
    let Facts::Jwt(facts) = &identity.facts else {
        panic!("expected jwt facts");
    };
    assert_eq!(facts.subject, "vm-7");
    assert_eq!(
        identity.to_string(),
        format!("jwt subject \"vm-7\" (issuer {})", s.issuer.url())
    );
}

#[tokio::test]
async fn jwks_uri_source_works() {
    let issuer = Issuer::start().await.expect("issuer");
    let s = setup_with(issuer, |i| JwksSource::Uri(i.jwks_uri())).await;
    let token = s.issuer.sign(&s.issuer.claims("vm-1", PLANE));
    s.verifier.verify_token(&token).await.expect("valid");
    assert_eq!(s.issuer.discovery_requests(), 0);
    assert_eq!(s.issuer.jwks_requests(), 1);
}

#[tokio::test]
async fn inline_source_works_without_fetching() {
    let issuer = Issuer::start().await.expect("issuer");
    let s = setup_with(issuer, |i| JwksSource::Inline(i.jwks())).await;
    let token = s.issuer.sign(&s.issuer.claims("vm-1", PLANE));
    s.verifier.verify_token(&token).await.expect("valid");
    assert_eq!(s.issuer.jwks_requests() + s.issuer.discovery_requests(), 0);
}

#[tokio::test]
async fn rsa_keys_work() {
    let key = Key::generate(Algorithm::RS256, "rsa-1").expect("rsa key");
    let issuer = Issuer::start_with(key).await.expect("issuer");
    let s = setup_with(issuer, |_| JwksSource::Discovery).await;
    let token = s.issuer.sign(&s.issuer.claims("vm-1", PLANE));
    let facts = s.verifier.verify_token(&token).await.expect("valid");
    assert_eq!(facts.subject, "vm-1");
}

#[tokio::test]
async fn each_forgery_is_rejected_with_the_failed_check() {
    let s = setup().await;
    let t = now();
    let good = s.issuer.claims("vm-7", PLANE);
    let with = |patch: serde_json::Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "foreign key, same kid",
            s.issuer.sign_with_foreign_key(&good).expect("sign"),
            "bad signature",
        ),
        (
            "wrong audience",
            s.issuer.sign(&with(json!({"aud": "other-plane"}))),
            "wrong audience \"other-plane\" (expected the plane id \"plane-1\"): request the token with audience \"plane-1\"",
        ),
        (
            "expired",
            s.issuer.sign(&with(json!({"exp": t - 3600, "iat": t - 7200}))),
            "expired at ",
        ),
        (
            "not yet valid",
            s.issuer.sign(&with(json!({"nbf": t + 3600}))),
            "is not valid before ",
        ),
        (
            "issued in the future",
            s.issuer.sign(&with(json!({"iat": t + 3600}))),
            "was issued in the future",
        ),
        (
            "unknown issuer",
            s.issuer.sign(&with(json!({"iss": "https://evil.example"}))),
            "issuer \"https://evil.example\" is not configured on this endpoint: add it to jwt.issuers in the endpoint config",
        ),
        ("alg none", s.issuer.unsigned(&good), "unsigned (alg none)"),
        (
            "HS256 with the public key as secret",
            s.issuer.sign_hs256_with_public_key(&good),
            "symmetric algorithm \"HS256\"",
        ),
        (
            "no exp",
            s.issuer.sign(&with(json!({"exp": null}))),
            "has no exp claim",
        ),
        (
            "no sub",
            s.issuer.sign(&with(json!({"sub": null}))),
            "has no sub claim",
        ),
        (
            "no aud",
            s.issuer.sign(&with(json!({"aud": null}))),
            "has no aud claim",
        ),
        ("garbage", "not-a-jwt".to_string(), "is malformed"),
        ("garbage parts", "a.b.c".to_string(), "is malformed"),
        (
            "tampered payload",
            {
                let token = s.issuer.sign(&good);
                let other = s.issuer.sign(&with(json!({"sub": "vm-admin"})));
                let p: Vec<&str> = token.split('.').collect();
                let o: Vec<&str> = other.split('.').collect();
                format!("{}.{}.{}", p[0], o[1], p[2])
            },
            "bad signature",
        ),
    ];
    for (name, token, want) in cases {
        let msg = rejected(s.verifier.verify_token(&token).await);
        assert!(msg.contains(want), "{name}: {msg:?} does not contain {want:?}");
        assert!(!msg.contains(&token), "{name}: message echoes the token");
        if token.len() > 20 {
            let sig = token.rsplit('.').next().unwrap_or_default();
            assert!(sig.is_empty() || !msg.contains(sig), "{name}: echoes signature");
        }
    }
}

#[tokio::test]
async fn key_rotation_refetches_once_and_is_rate_limited() {
    let s = setup().await;
    let old = s.issuer.sign(&s.issuer.claims("vm-1", PLANE));
    s.verifier.verify_token(&old).await.expect("old key valid");
    assert_eq!(s.issuer.jwks_requests(), 1);

    s.issuer.rotate("key-2").expect("rotate");
    let new = s.issuer.sign(&s.issuer.claims("vm-1", PLANE));
    s.verifier
        .verify_token(&new)
        .await
        .expect("new key found after refetch");
    assert_eq!(s.issuer.jwks_requests(), 2, "unknown kid refetches once");
    s.verifier
        .verify_token(&old)
        .await
        .expect("old key still published");

    // A made-up kid right after: no new fetch (rate-limited), rejected.
    let key = s.issuer.key();
    let forged = key.sign_as(Some("made-up"), &s.issuer.claims("vm-1", PLANE));
    let msg = rejected(s.verifier.verify_token(&forged).await);
    assert!(msg.contains("key id \"made-up\" is not in the JWKS"), "{msg}");
    assert_eq!(s.issuer.jwks_requests(), 2);
}

#[tokio::test]
async fn unknown_kid_with_inline_keys_is_rejected() {
    let issuer = Issuer::start().await.expect("issuer");
    let s = setup_with(issuer, |i| JwksSource::Inline(i.jwks())).await;
    s.issuer.rotate("key-2").expect("rotate");
    let token = s.issuer.sign(&s.issuer.claims("vm-1", PLANE));
    let msg = rejected(s.verifier.verify_token(&token).await);
    assert!(msg.contains("key id \"key-2\" is not in the JWKS"), "{msg}");
    assert_eq!(s.issuer.jwks_requests(), 0);
}

#[tokio::test]
async fn untrusted_issuer_certificate_is_unavailable_not_accepted() {
    let issuer = Issuer::start().await.expect("issuer");
    // No caBundle: the system roots do not trust the dev CA.
    let config = IssuerConfig {
        issuer: issuer.url().to_string(),
        jwks: JwksSource::Discovery,
        ca_bundle: None,
    };
    let verifier = Verifier::new(vec![config], PLANE.into()).expect("config");
    let token = issuer.sign(&issuer.claims("vm-1", PLANE));
    match verifier.verify_token(&token).await {
        Err(Error::Unavailable(msg)) => {
            assert!(msg.contains("cannot fetch"), "{msg}");
            assert!(!msg.contains(&token));
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn issuer_config_parses_and_validates() {
    let ok: Vec<IssuerConfig> = serde_saphyr::from_str(
        "- {issuer: https://idp.example, discovery: true}\n\
         - {issuer: https://idp2.example, jwksUri: https://idp2.example/keys, caBundle: /etc/ca.pem}\n\
         - {issuer: http://127.0.0.1:8080, jwks: {keys: [{kty: EC, crv: P-256, kid: a, x: WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis, y: y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE}]}}\n",
    )
    .expect("valid issuers");
    assert_eq!(ok[0].jwks, JwksSource::Discovery);
    assert_eq!(ok[1].jwks, JwksSource::Uri("https://idp2.example/keys".into()));
    assert!(matches!(ok[2].jwks, JwksSource::Inline(_)));

    for (yaml, want) in [
        (
            "{issuer: http://idp.example, discovery: true}",
            "uses http: use https",
        ),
        ("{issuer: https://idp.example}", "set exactly one of jwksUri"),
        (
            "{issuer: https://idp.example, discovery: true, jwksUri: https://x}",
            "set exactly one of jwksUri",
        ),
        (
            "{issuer: https://idp.example, discovery: true, bogus: 1}",
            "unknown field",
        ),
        (
            "{issuer: https://idp.example, jwksUri: http://keys.example/jwks}",
            "jwksUri \"http://keys.example/jwks\" uses http",
        ),
        (
            "{issuer: https://idp.example, jwks: {keys: [{kty: oct, k: c2VjcmV0}]}}",
            "no usable signing key",
        ),
    ] {
        let err = serde_saphyr::from_str::<IssuerConfig>(yaml)
            .err()
            .unwrap_or_else(|| panic!("{yaml} should fail"))
            .to_string();
        assert!(err.contains(want), "{yaml}: {err}");
    }
}

#[test]
fn unreadable_ca_bundle_fails_at_startup() {
    let config = IssuerConfig {
        issuer: "https://idp.example".into(),
        jwks: JwksSource::Discovery,
        ca_bundle: Some("/nonexistent/ca.pem".into()),
    };
    let err = Verifier::new(vec![config], PLANE.into())
        .expect_err("fails")
        .to_string();
    assert!(err.contains("cannot read caBundle /nonexistent/ca.pem"), "{err}");
}

fn challenge() -> Challenge {
    Challenge {
        plane_id: PLANE.into(),
        nonce: "n".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn provider_reads_the_file_each_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    std::fs::write(&path, "first\n").expect("write");
    let provider = Provider::from_file(&path).expect("provider");
    let c = provider.credential(&challenge()).await.expect("credential");
    assert_eq!(c.kind, kind::JWT);
    assert_eq!(c.payload, b"first");
    std::fs::write(&path, "second").expect("write");
    let c = provider.credential(&challenge()).await.expect("credential");
    assert_eq!(c.payload, b"second");

    std::fs::remove_file(&path).expect("rm");
    match provider.credential(&challenge()).await {
        Err(Error::Unavailable(msg)) => assert!(msg.contains("cannot read the jwt file"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn provider_runs_the_command_with_the_plane_id() {
    let argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        "echo \"tok-for-$GANGPLANK_PLANE_ID\"".to_string(),
    ];
    let provider = Provider::from_command(argv).expect("provider");
    let c = provider.credential(&challenge()).await.expect("credential");
    assert_eq!(c.payload, b"tok-for-plane-1");
}

#[tokio::test]
async fn failing_command_reports_its_last_stderr_line() {
    let argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        "echo partial-output; echo 'first line' >&2; echo 'login required: run idp-login' >&2; exit 3"
            .to_string(),
    ];
    let provider = Provider::from_command(argv).expect("provider");
    match provider.credential(&challenge()).await {
        Err(Error::Unavailable(msg)) => {
            assert!(msg.ends_with(": login required: run idp-login"), "{msg}");
            assert!(msg.contains("exit status: 3"), "{msg}");
            assert!(!msg.contains("partial-output"), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(Provider::from_command(vec![]).is_err());
}
