//! Azure end to end against the IMDS emulator: the agent's real IMDS client, the endpoint's
//! real PKCS#7 chain verification (trusting the emulator's test root and intermediate), and
//! stale, foreign-nonce, altered, untrusted and wrongly-named documents refused.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gangplank_api::{NamespacedName, kind, proto};
use gangplank_identity::azure::{Provider, Verifier, VerifierConfig, imds_nonce};
use gangplank_identity::{Challenge, Facts, Provider as _, Verifier as _};
use gangplank_testkit::cloud::azure::{Chain, Imds, Vm};

fn challenge(nonce: &str) -> Challenge {
    Challenge {
        plane_id: "plane-1".into(),
        nonce: nonce.into(),
        ..Default::default()
    }
}

fn group() -> NamespacedName {
    NamespacedName::new("bookinfo", "ratings")
}

fn verifier_for(chain: &Chain) -> Verifier {
    Verifier::new(VerifierConfig {
        roots_pem: Some(chain.root_pem()),
        intermediates_pem: Some(chain.intermediate_pem()),
        ..Default::default()
    })
    .expect("verifier")
}

#[tokio::test]
async fn an_attested_document_bound_to_the_challenge_verifies() {
    let imds = Imds::start(Vm::example()).await.expect("imds");
    let provider = Provider::new(Some(imds.url())).expect("provider");
    let c = challenge("n1");
    let credential = provider.credential(&c).await.expect("attested document");
    assert_eq!(credential.kind, kind::AZURE_VM);
    let identity = verifier_for(imds.chain())
        .verify(&credential, &c, &group())
        .await
        .expect("verified");
    let Facts::Azure(f) = &identity.facts else {
        panic!("expected azure facts: {:?}", identity.facts);
    };
    assert_eq!(f.subscription_id, "8d10da13-8125-4ba9-a717-bf7490507b3d");
    assert_eq!(f.vm_id, "02aab8a4-74ef-476e-8182-f6d2ba4166a6");
    assert_eq!(f.sku, "22_04-lts-gen2");
    assert_eq!(
        identity.annotation(),
        "azure:8d10da13-8125-4ba9-a717-bf7490507b3d/02aab8a4-74ef-476e-8182-f6d2ba4166a6"
    );
}

fn alter_nonce(credential: &proto::Credential, nonce: &str) -> proto::Credential {
    let envelope: serde_json::Value = serde_json::from_slice(&credential.payload).expect("json");
    let mut der = STANDARD
        .decode(envelope["signature"].as_str().expect("signature"))
        .expect("base64");
    let at = der
        .windows(nonce.len())
        .position(|w| w == nonce.as_bytes())
        .expect("nonce inside the signed content");
    der[at] = if der[at] == b'9' { b'0' } else { der[at] + 1 };
    let payload = serde_json::json!({"encoding": "pkcs7", "signature": STANDARD.encode(der)});
    proto::Credential {
        payload: payload.to_string().into_bytes(),
        ..credential.clone()
    }
}

#[tokio::test]
async fn forged_or_replayed_documents_are_refused() {
    let imds = Imds::start(Vm::example()).await.expect("imds");
    let provider = Provider::new(Some(imds.url())).expect("provider");
    let v = verifier_for(imds.chain());
    let c = challenge("n1");
    let genuine = provider.credential(&c).await.expect("document");

    let other = Imds::start(Vm::example()).await.expect("second imds");
    let untrusted = Provider::new(Some(other.url()))
        .expect("provider")
        .credential(&c)
        .await
        .expect("document");

    imds.set_document_age(3600);
    let stale = provider.credential(&c).await.expect("document");
    imds.set_document_age(0);

    let evil = Chain::generate("evil.example.com").expect("chain");
    let wrong_signer = proto::Credential {
        payload: evil
            .response(&imds.vm().attested(&imds_nonce(&c), 0))
            .expect("signed")
            .into_bytes(),
        ..genuine.clone()
    };

    let cases: Vec<(&str, Verifier, proto::Credential, Challenge, &str)> = vec![
        (
            "a different nonce (document from another challenge)",
            verifier_for(imds.chain()),
            genuine.clone(),
            challenge("n2"),
            "different nonce",
        ),
        (
            "a stale document",
            verifier_for(imds.chain()),
            stale,
            c.clone(),
            "is stale",
        ),
        (
            "signed by an untrusted chain",
            verifier_for(imds.chain()),
            untrusted,
            c.clone(),
            "does not verify",
        ),
        (
            "content altered after signing",
            verifier_for(imds.chain()),
            alter_nonce(&genuine, &imds_nonce(&c)),
            c.clone(),
            "does not verify",
        ),
        (
            "signed by a trusted chain under another name",
            verifier_for(&evil),
            wrong_signer,
            c.clone(),
            "was signed by CN=evil.example.com",
        ),
    ];
    for (what, verifier, credential, challenge, want) in cases {
        let err = verifier
            .verify(&credential, &challenge, &group())
            .await
            .expect_err(what);
        assert!(err.to_string().contains(want), "{what}: {err}");
        assert!(
            err.to_string().starts_with("azure attested document"),
            "{what}: {err}"
        );
    }
    // The genuine one still verifies with the same verifier.
    v.verify(&genuine, &c, &group()).await.expect("genuine");
}

#[tokio::test]
async fn the_builtin_microsoft_roots_do_not_trust_a_test_chain() {
    let imds = Imds::start(Vm::example()).await.expect("imds");
    let c = challenge("n1");
    let credential = Provider::new(Some(imds.url()))
        .expect("provider")
        .credential(&c)
        .await
        .expect("document");
    let builtin = Verifier::new(VerifierConfig {
        intermediates_pem: Some(imds.chain().intermediate_pem()),
        ..Default::default()
    })
    .expect("verifier");
    let err = builtin
        .verify(&credential, &c, &group())
        .await
        .expect_err("untrusted");
    assert!(err.to_string().contains("not signed by Azure"), "{err}");
}

#[tokio::test]
async fn imds_requires_the_metadata_header() {
    let imds = Imds::start(Vm::example()).await.expect("imds");
    let url = format!("{}/metadata/attested/document?api-version=2020-09-01", imds.url());
    let resp = reqwest::Client::new().get(&url).send().await.expect("get");
    assert_eq!(resp.status(), 400);
}
