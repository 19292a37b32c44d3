//! Join tokens end to end against the directory registry: create, verify without writing,
//! commit takes exactly one use, and forged or stale tokens change nothing.

use std::sync::Arc;
use std::time::Duration;

use gangplank_api::token::JoinToken;
use gangplank_api::{NamespacedName, kind, proto};
use gangplank_identity::token::{self, Provider, Secret, Verifier};
use gangplank_identity::{Challenge, Error, Facts, Provider as _};
use gangplank_registry::dir::Registry;
use gangplank_registry::{IdentityStore, Registry as _};
use time::OffsetDateTime;

struct Setup {
    registry: Registry,
    verifier: Verifier,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::open(dir.path()).expect("registry");
    let verifier = Verifier::new(Arc::new(IdentityStore::new(Arc::new(registry.clone()))));
    Setup {
        registry,
        verifier,
        _dir: dir,
    }
}

fn ratings() -> NamespacedName {
    NamespacedName::new("bookinfo", "ratings")
}

fn credential(token: &str) -> proto::Credential {
    proto::Credential {
        kind: kind::JOIN_TOKEN.into(),
        payload: token.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn stored(s: &Setup, id: &str) -> JoinToken {
    s.registry
        .join_token(&NamespacedName::new("bookinfo", id))
        .await
        .expect("read")
        .expect("token exists")
}

async fn make(s: &Setup, group: &NamespacedName, ttl_secs: i64, uses: u32) -> (String, Secret) {
    // A negative ttl makes a token that expired already.
    let now = OffsetDateTime::now_utc() + time::Duration::seconds(ttl_secs.min(0) * 2);
    let ttl = Duration::from_secs(ttl_secs.unsigned_abs());
    let (object, secret) = token::create(group, ttl, uses, now);
    s.registry.create_join_token(&object).await.expect("stored");
    (object.metadata.name.expect("id"), secret)
}

fn rejected<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(e @ Error::Rejected { .. }) => e.to_string(),
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[tokio::test]
async fn verify_does_not_write_and_commit_takes_one_use() {
    let s = setup();
    let (id, secret) = make(&s, &ratings(), 3600, 1).await;
    let cred = credential(secret.expose());
    let before = stored(&s, &id).await;

    let identity = s
        .verifier
        .verify_at(&cred, &ratings(), OffsetDateTime::now_utc())
        .await
        .expect("valid token");
    assert_eq!(
        identity.facts,
        Facts::JoinToken(token::Facts {
            id: id.clone(),
            namespace: "bookinfo".into(),
            workload_group: "ratings".into(),
            key: String::new(),
        })
    );
    // Verifying twice is fine and writes nothing.
    s.verifier
        .verify_at(&cred, &ratings(), OffsetDateTime::now_utc())
        .await
        .expect("still valid");
    assert_eq!(stored(&s, &id).await, before);

    s.verifier
        .commit_at(&identity, &cred, OffsetDateTime::now_utc())
        .await
        .expect("commit");
    assert_eq!(stored(&s, &id).await.status.used, 1);

    // Spent: both verify and commit refuse, and nothing changes.
    let spent = stored(&s, &id).await;
    let msg = rejected(
        s.verifier
            .verify_at(&cred, &ratings(), OffsetDateTime::now_utc())
            .await,
    );
    assert!(msg.contains("all 1 uses are spent"), "{msg}");
    assert!(msg.contains("gangplank token create"), "{msg}");
    let msg = rejected(
        s.verifier
            .commit_at(&identity, &cred, OffsetDateTime::now_utc())
            .await,
    );
    assert!(msg.contains(&id), "{msg}");
    assert_eq!(stored(&s, &id).await, spent);
}

#[tokio::test]
async fn forged_and_stale_tokens_are_rejected_and_nothing_is_written() {
    let s = setup();
    let (id, secret) = make(&s, &ratings(), 3600, 5).await;
    let (expired_id, expired) = make(&s, &ratings(), -60, 5).await;
    let legacy = NamespacedName::new("bookinfo", "legacy");
    let (_, for_legacy) = make(&s, &legacy, 3600, 5).await;

    // Same id, a different (well-formed) secret.
    let (_, other) = token::create(&ratings(), Duration::from_secs(60), 1, OffsetDateTime::now_utc());
    let other_secret = other.expose().split_once('.').expect("dot").1;
    let forged = format!("{id}.{other_secret}");

    let cases: Vec<(&str, String, NamespacedName, &str)> = vec![
        ("wrong secret", forged, ratings(), "secret does not match"),
        ("expired", expired.expose().to_string(), ratings(), "expired at "),
        (
            "other group's token",
            for_legacy.expose().to_string(),
            ratings(),
            "was created for WorkloadGroup legacy, not ratings",
        ),
        (
            "other namespace",
            secret.expose().to_string(),
            NamespacedName::new("other", "ratings"),
            "not found in namespace other",
        ),
        ("malformed", "abc".into(), ratings(), "join token is malformed"),
        (
            "unknown id",
            format!("zzzzzzzzzz.{other_secret}"),
            ratings(),
            "join token zzzzzzzzzz: not found",
        ),
    ];
    let snapshot = |s: &Setup| {
        let s = s.registry.clone();
        async move { s.list::<JoinToken>(None).await.expect("list") }
    };
    let before = snapshot(&s).await;
    for (name, tok, group, want) in cases {
        let msg = rejected(
            s.verifier
                .verify_at(&credential(&tok), &group, OffsetDateTime::now_utc())
                .await,
        );
        assert!(msg.contains(want), "{name}: {msg}");
        let secret_part = tok.split_once('.').map_or(tok.as_str(), |(_, s)| s);
        assert!(
            !msg.contains(secret_part),
            "{name}: message echoes the secret: {msg}"
        );
    }
    assert_eq!(snapshot(&s).await, before, "rejections must not write");
    assert_eq!(stored(&s, &expired_id).await.status.used, 0);
}

#[tokio::test]
async fn commit_of_a_forged_credential_is_refused_without_a_write() {
    let s = setup();
    let (id, secret) = make(&s, &ratings(), 3600, 1).await;
    let identity = s
        .verifier
        .verify_at(
            &credential(secret.expose()),
            &ratings(),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("valid");
    let (_, other) = token::create(&ratings(), Duration::from_secs(60), 1, OffsetDateTime::now_utc());
    let forged = format!("{id}.{}", other.expose().split_once('.').expect("dot").1);
    let err = s
        .verifier
        .commit_at(&identity, &credential(&forged), OffsetDateTime::now_utc())
        .await;
    assert!(rejected(err).contains("does not match"));
    assert_eq!(stored(&s, &id).await.status.used, 0);
}

#[tokio::test]
async fn provider_reads_and_trims_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, secret) = token::create(&ratings(), Duration::from_secs(60), 1, OffsetDateTime::now_utc());
    let path = dir.path().join("join-token");
    std::fs::write(&path, format!("  {}\n", secret.expose())).expect("write");
    let provider = Provider::from_file(&path).expect("provider");
    let challenge = Challenge {
        plane_id: "p".into(),
        nonce: "n".into(),
        ..Default::default()
    };
    let c = provider.credential(&challenge).await.expect("credential");
    assert_eq!(c.kind, kind::JOIN_TOKEN);
    assert_eq!(c.payload, secret.expose().as_bytes());
    assert!(!format!("{provider:?}").contains(secret.expose()));

    std::fs::write(&path, "garbage").expect("write");
    match Provider::from_file(&path) {
        Err(Error::Unavailable(msg)) => {
            assert!(msg.contains("malformed"), "{msg}");
            assert!(!msg.contains("garbage"), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(Provider::from_file(dir.path().join("missing")).is_err());
}
