//! GCP GCE end to end against the metadata server emulator: the agent's real metadata
//! client, the endpoint's real RS256 verifier fetching the emulator's JWKS (standing in for
//! Google's), and expired, wrong-audience, stale and forged tokens refused.

use std::time::Duration;

use gangplank_api::{NamespacedName, kind, proto};
use gangplank_identity::gcp::{Provider, Verifier, VerifierConfig};
use gangplank_identity::{Challenge, Facts, Provider as _, Verifier as _};
use gangplank_testkit::cloud::gcp::{Instance, MetadataServer};
use gangplank_testkit::oidc::Key;
use jsonwebtoken::Algorithm;

fn challenge(plane: &str) -> Challenge {
    Challenge {
        plane_id: plane.into(),
        nonce: "n1".into(),
        ..Default::default()
    }
}

fn group() -> NamespacedName {
    NamespacedName::new("bookinfo", "ratings")
}

fn verifier(server: &MetadataServer, max_age: Duration) -> Verifier {
    Verifier::new(
        VerifierConfig {
            jwks_url: server.jwks_url(),
            ca_bundle: None,
            max_age,
        },
        "plane-1".into(),
    )
    .expect("verifier")
}

fn token(t: &str) -> proto::Credential {
    proto::Credential {
        kind: kind::GCP_GCE.into(),
        payload: t.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_instance_token_from_the_metadata_server_verifies() {
    let server = MetadataServer::start(Instance::example()).await.expect("server");
    let provider = Provider::new(Some(server.url())).expect("provider");
    let c = challenge("plane-1");
    let credential = provider
        .credential(&c)
        .await
        .expect("token from the metadata server");
    assert_eq!(credential.kind, kind::GCP_GCE);
    let identity = verifier(&server, Duration::from_secs(3600))
        .verify(&credential, &c, &group())
        .await
        .expect("verified");
    let Facts::Gcp(f) = &identity.facts else {
        panic!("expected gcp facts: {:?}", identity.facts);
    };
    assert_eq!(f.project_id, "bookinfo-prod");
    assert_eq!(f.project_number, "123456789012");
    assert_eq!(f.zone, "us-central1-a");
    assert_eq!(f.instance_name, "ratings-vm-1");
    assert_eq!(f.instance_id, "4732895401234567890");
    assert_eq!(f.service_account, "ratings@bookinfo-prod.iam.gserviceaccount.com");
    assert_eq!(
        identity.annotation(),
        "gcp:bookinfo-prod/us-central1-a/4732895401234567890"
    );
    assert_eq!(
        identity.labels()["onboarding.gangplank.dev/gcp-instance-name"],
        "ratings-vm-1"
    );
    assert_eq!(identity.address, None);
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let server = MetadataServer::start(Instance::example()).await.expect("server");
    let v = verifier(&server, Duration::from_secs(15 * 60));
    let provider = Provider::new(Some(server.url())).expect("provider");
    let other_plane = provider.credential(&challenge("plane-2")).await.expect("token");
    let foreign = Key::generate(Algorithm::RS256, server.key().kid()).expect("key");
    let mut no_compute = server.claims("plane-1", 0);
    no_compute.as_object_mut().expect("object").remove("google");
    let mut expired = server.claims("plane-1", 7200);
    expired["exp"] = serde_json::json!(gangplank_testkit::oidc::now() - 3600);
    let es256 = Key::generate(Algorithm::ES256, "es").expect("key");

    let cases = [
        ("wrong audience", other_plane, "wrong audience"),
        ("expired", token(&server.sign(&expired)), "expired"),
        (
            "issued too long ago",
            token(&server.sign(&server.claims("plane-1", 30 * 60))),
            "more than the 900s accepted",
        ),
        (
            "signed by an untrusted key",
            token(&foreign.sign(&server.claims("plane-1", 0))),
            "bad signature",
        ),
        (
            "without format=full",
            token(&server.sign(&no_compute)),
            "no google.compute_engine claims",
        ),
        (
            "not RS256",
            token(&es256.sign(&server.claims("plane-1", 0))),
            "not signed with RS256",
        ),
    ];
    for (what, credential, want) in cases {
        let err = v
            .verify(&credential, &challenge("plane-1"), &group())
            .await
            .expect_err(what);
        assert!(err.to_string().contains(want), "{what}: {err}");
        assert!(err.to_string().starts_with("gcp identity token"), "{what}: {err}");
    }
}

#[tokio::test]
async fn the_metadata_server_requires_its_flavor_header() {
    let server = MetadataServer::start(Instance::example()).await.expect("server");
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/identity?audience=x",
        server.url()
    );
    let resp = reqwest::Client::new().get(&url).send().await.expect("get");
    assert_eq!(resp.status(), 403);
}
