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

/// A verifier trusting only the emulator's root, fetching issuers from `hosts`.
fn fetching_verifier(imds: &Imds, hosts: Option<Vec<String>>) -> Verifier {
    Verifier::new(VerifierConfig {
        roots_pem: Some(imds.chain().root_pem()),
        issuer_hosts: hosts,
        ..Default::default()
    })
    .expect("verifier")
}

async fn document(imds: &Imds, nonce: &str) -> (proto::Credential, Challenge) {
    let c = challenge(nonce);
    let credential = Provider::new(Some(imds.url()))
        .expect("provider")
        .credential(&c)
        .await
        .expect("document");
    (credential, c)
}

#[tokio::test]
async fn the_issuing_ca_is_fetched_from_the_signers_aia_url_once_and_cached() {
    let imds = Imds::start(Vm::example()).await.expect("imds");
    let v = fetching_verifier(&imds, Some(vec![imds.issuer_host()]));
    for nonce in ["n1", "n2", "n3"] {
        let (credential, c) = document(&imds, nonce).await;
        let identity = v.verify(&credential, &c, &group()).await.expect("verified");
        assert!(matches!(identity.facts, Facts::Azure(_)));
    }
    assert_eq!(imds.issuer_fetches(), 1);
}

#[tokio::test]
async fn issuer_urls_outside_issuer_hosts_are_never_fetched() {
    let imds = Imds::start(Vm::example()).await.expect("imds");
    let (credential, c) = document(&imds, "n1").await;

    // Default hosts (www.microsoft.com): the emulator's URL is not one of them.
    let err = fetching_verifier(&imds, None)
        .verify(&credential, &c, &group())
        .await
        .expect_err("host not allowed");
    let msg = err.to_string();
    assert!(
        msg.contains("not in azureVm.issuerHosts (www.microsoft.com)"),
        "{msg}"
    );
    assert!(msg.contains(&imds.issuer_host()), "{msg}");

    // Fetching off: the chain is incomplete, so the document is refused.
    let err = fetching_verifier(&imds, Some(vec![]))
        .verify(&credential, &c, &group())
        .await
        .expect_err("no issuer");
    assert!(err.to_string().contains("not signed by Azure"), "{err}");
    assert_eq!(imds.issuer_fetches(), 0);
}

#[tokio::test]
async fn a_fetched_certificate_cannot_make_an_untrusted_chain_trusted() {
    let imds = Imds::start(Vm::example()).await.expect("imds");
    let verifier = fetching_verifier(&imds, Some(vec![imds.issuer_host()]));
    let v = || &verifier;
    let (credential, c) = document(&imds, "n1").await;

    // Another chain's issuing CA, with the very same name but another key: the signer's
    // signature does not verify under it.
    let impostor = Chain::generate("metadata.azure.com").expect("chain");
    imds.serve_issuer(impostor.intermediate_der());
    let err = v()
        .verify(&credential, &c, &group())
        .await
        .expect_err("impostor issuer");
    assert!(err.to_string().contains("not signed by Azure"), "{err}");

    // A certificate of another name is not the issuer at all.
    imds.serve_issuer(imds.chain().intermediate_der()[..0].to_vec());
    let err = v()
        .verify(&credential, &c, &group())
        .await
        .expect_err("not a certificate");
    assert!(err.to_string().contains("not a DER or PEM certificate"), "{err}");
    let root_der = openssl::x509::X509::from_pem(&imds.chain().root_pem())
        .expect("root")
        .to_der()
        .expect("der");
    imds.serve_issuer(root_der);
    let err = v()
        .verify(&credential, &c, &group())
        .await
        .expect_err("wrong certificate");
    assert!(err.to_string().contains("not the signer's issuer"), "{err}");

    // Nothing bad was kept: the genuine one, once served, verifies, and is then cached.
    imds.serve_issuer(imds.chain().intermediate_der());
    v().verify(&credential, &c, &group()).await.expect("genuine");
    let fetches = imds.issuer_fetches();
    assert_eq!(fetches, 4);
    v().verify(&credential, &c, &group()).await.expect("cached");
    assert_eq!(imds.issuer_fetches(), fetches);
}
