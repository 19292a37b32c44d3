//! AWS EC2 end to end against the IMDSv2 emulator and the directory registry: the agent's
//! real IMDS client and key, the endpoint's real PKCS#7 verifier (trusting the emulator's
//! per-region test certificates), and every replay and forgery refused with nothing written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gangplank_api::istio::{WorkloadEntry, WorkloadEntrySpec};
use gangplank_api::meta::ObjectMeta;
use gangplank_api::names::{annotation, entry_name, label};
use gangplank_api::{NamespacedName, kind, proto};
use gangplank_identity::aws::{self, Certificates, Provider, Verifier};
use gangplank_identity::{Challenge, Facts, Identity, Provider as _, Verifier as _};
use gangplank_registry::Registry as _;
use gangplank_registry::dir::Registry;
use gangplank_testkit::cloud::aws::{Imds, Instance, SigningKeys};

struct Setup {
    imds: Imds,
    registry: Registry,
    verifier: Verifier,
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let keys = SigningKeys::generate(&["us-east-1", "us-west-2"]).expect("keys");
    let certs = Certificates::empty()
        .with(
            "us-east-1",
            keys.certificate_pem("us-east-1").expect("pem").as_bytes(),
        )
        .and_then(|c| {
            c.with(
                "us-west-2",
                keys.certificate_pem("us-west-2").expect("pem").as_bytes(),
            )
        })
        .expect("certificates");
    let imds = Imds::start(Instance::example(), keys).await.expect("imds");
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::open(dir.path().join("registry")).expect("registry");
    let verifier = Verifier::new(certs, Arc::new(registry.clone()));
    Setup {
        imds,
        registry,
        verifier,
        dir,
    }
}

impl Setup {
    fn provider(&self, key_name: &str) -> Provider {
        Provider::new(Some(self.imds.url()), self.dir.path().join(key_name)).expect("provider")
    }

    /// Every file under the registry with its content: to show nothing was written.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.dir.path().join("registry"), &mut out);
        out
    }

    /// Writes the WorkloadEntry the endpoint writes for `identity` in `group`.
    async fn register(&self, identity: &Identity, group: &NamespacedName) -> NamespacedName {
        let parts = identity.name_parts();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let name = entry_name(&group.name, identity.name_kind(), &parts);
        let mut annotations = identity.annotations();
        annotations.insert(annotation::IDENTITY.into(), identity.annotation());
        let labels = BTreeMap::from([
            (label::MANAGED_BY.to_string(), label::MANAGED_BY_VALUE.to_string()),
            (label::WORKLOAD_GROUP.to_string(), group.name.clone()),
        ]);
        let entry = WorkloadEntry::new(
            ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(group.namespace.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                ..Default::default()
            },
            WorkloadEntrySpec {
                address: identity.address.map(|a| a.to_string()).unwrap_or_default(),
                ..Default::default()
            },
        );
        self.registry.apply_entry(&entry).await.expect("entry written");
        NamespacedName::new(group.namespace.clone(), name)
    }
}

fn challenge(nonce: &str) -> Challenge {
    Challenge {
        plane_id: "plane-1".into(),
        nonce: nonce.into(),
    }
}

fn ratings() -> NamespacedName {
    NamespacedName::new("bookinfo", "ratings")
}

fn aws_facts(identity: &Identity) -> &aws::Facts {
    match &identity.facts {
        Facts::Aws(f) => f,
        other => panic!("expected aws facts, got {other:?}"),
    }
}

#[tokio::test]
async fn first_join_verifies_the_document_and_records_the_agent_key() {
    let s = setup().await;
    let provider = s.provider("agent.key");
    let c = challenge("n1");
    let credential = provider.credential(&c).await.expect("credential from IMDS");
    assert_eq!(credential.kind, kind::AWS_EC2);
    let before = s.snapshot();
    let identity = s
        .verifier
        .verify(&credential, &c, &ratings())
        .await
        .expect("verified");
    assert_eq!(s.snapshot(), before, "verify writes nothing");

    let f = aws_facts(&identity);
    assert_eq!(f.account, "123456789012");
    assert_eq!(f.partition, "aws");
    assert_eq!((f.region.as_str(), f.zone.as_str()), ("us-east-1", "us-east-1a"));
    assert_eq!(f.instance_id, "i-0abc1234def567890");
    assert_eq!(
        identity.address.map(|a| a.to_string()).as_deref(),
        Some("10.0.1.7")
    );
    let parts = identity.name_parts();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    assert_eq!(
        entry_name("ratings", identity.name_kind(), &parts),
        "ratings-aws-123456789012-us-east-1a-i-0abc1234def567890"
    );
    let labels = identity.labels();
    assert_eq!(labels["onboarding.gangplank.dev/aws-account"], "123456789012");
    assert_eq!(labels["onboarding.gangplank.dev/aws-zone"], "us-east-1a");
    let annotations = identity.annotations();
    assert!(!annotations[aws::AGENT_PUBLIC_KEY_ANNOTATION].is_empty());
    assert!(annotations[aws::FACTS_ANNOTATION].contains("\"instanceId\":\"i-0abc1234def567890\""));

    // The agent key was generated on first use, private to the agent.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.dir.path().join("agent.key"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn a_registered_instance_rejoins_with_its_key_even_long_after_pending() {
    let s = setup().await;
    let provider = s.provider("agent.key");
    let c = challenge("n1");
    let first = s
        .verifier
        .verify(
            &provider.credential(&c).await.expect("credential"),
            &c,
            &ratings(),
        )
        .await
        .expect("first join");
    s.register(&first, &ratings()).await;

    // Two days later (the document's pendingTime is old now), same agent key, fresh nonce.
    s.imds
        .set_instance(Instance::example().pending_since(2 * 24 * 3600));
    let c2 = challenge("n2");
    let again = s
        .verifier
        .verify(
            &provider.credential(&c2).await.expect("credential"),
            &c2,
            &ratings(),
        )
        .await
        .expect("re-onboarding with the recorded key");
    assert_eq!(aws_facts(&again).instance_id, aws_facts(&first).instance_id);
}

#[tokio::test]
async fn a_document_replayed_by_a_second_agent_is_refused_and_nothing_written() {
    let s = setup().await;
    let c = challenge("n1");
    let first = s
        .verifier
        .verify(
            &s.provider("a.key").credential(&c).await.expect("credential"),
            &c,
            &ratings(),
        )
        .await
        .expect("first join");
    s.register(&first, &ratings()).await;

    // Another machine with a copy of the document (same IMDS answers) but its own key.
    let c2 = challenge("n2");
    let copied = s.provider("b.key").credential(&c2).await.expect("credential");
    let before = s.snapshot();
    let err = s
        .verifier
        .verify(&copied, &c2, &ratings())
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("belongs to a different agent key"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("gangplank instance release i-0abc1234def567890"),
        "{err}"
    );
    assert_eq!(s.snapshot(), before, "nothing written");
}

#[tokio::test]
async fn an_instance_holds_one_registration_at_a_time() {
    let s = setup().await;
    let provider = s.provider("a.key");
    let c = challenge("n1");
    let first = s
        .verifier
        .verify(
            &provider.credential(&c).await.expect("credential"),
            &c,
            &ratings(),
        )
        .await
        .expect("first join");
    s.register(&first, &ratings()).await;

    let reviews = NamespacedName::new("bookinfo", "reviews");
    let c2 = challenge("n2");
    let before = s.snapshot();
    let err = s
        .verifier
        .verify(
            &provider.credential(&c2).await.expect("credential"),
            &c2,
            &reviews,
        )
        .await
        .expect_err("second registration refused");
    assert!(err.to_string().contains("one registration at a time"), "{err}");
    assert!(
        err.to_string().contains("WorkloadEntry bookinfo/ratings-aws-"),
        "{err}"
    );
    assert_eq!(s.snapshot(), before, "nothing written");
}

#[tokio::test]
async fn release_ends_the_registration_so_a_reimaged_vm_can_join_again() {
    let s = setup().await;
    let c = challenge("n1");
    let first = s
        .verifier
        .verify(
            &s.provider("old.key").credential(&c).await.expect("credential"),
            &c,
            &ratings(),
        )
        .await
        .expect("first join");
    let key = s.register(&first, &ratings()).await;

    let released = aws::release(&s.registry, "i-0abc1234def567890")
        .await
        .expect("release");
    assert_eq!(released, vec![key.clone()]);
    assert!(s.registry.entry(&key).await.expect("read").is_none());

    // The re-imaged VM (new key, restarted so pendingTime is fresh) joins again.
    s.imds.set_instance(Instance::example());
    let c2 = challenge("n2");
    s.verifier
        .verify(
            &s.provider("new.key").credential(&c2).await.expect("credential"),
            &c2,
            &ratings(),
        )
        .await
        .expect("joins after release");
}

#[tokio::test]
async fn a_first_join_outside_the_pending_time_window_is_refused() {
    let s = setup().await;
    s.imds.set_instance(Instance::example().pending_since(3600));
    let c = challenge("n1");
    let credential = s.provider("a.key").credential(&c).await.expect("credential");
    let before = s.snapshot();
    let verifier = setup_window(&s, Duration::from_secs(15 * 60));
    let err = verifier
        .verify(&credential, &c, &ratings())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("outside the first-join window"), "{err}");
    assert!(err.to_string().contains("within 15m"), "{err}");
    assert_eq!(s.snapshot(), before, "nothing written");

    // A wider window accepts the same document.
    setup_window(&s, Duration::from_secs(2 * 3600))
        .verify(&credential, &c, &ratings())
        .await
        .expect("within a 2h window");
}

fn setup_window(s: &Setup, window: Duration) -> Verifier {
    let keys = s.imds.keys();
    let certs = Certificates::empty()
        .with(
            "us-east-1",
            keys.certificate_pem("us-east-1").expect("pem").as_bytes(),
        )
        .expect("certificates");
    Verifier::new(certs, Arc::new(s.registry.clone())).with_first_join_window(window)
}

/// A credential with `document` and `rsa2048` swapped in, keeping the agent's proof.
fn with_payload(mut credential: proto::Credential, document: &str, rsa2048: &str) -> proto::Credential {
    credential.payload =
        serde_json::to_vec(&serde_json::json!({"document": document, "rsa2048": rsa2048})).expect("json");
    credential
}

#[tokio::test]
async fn forged_documents_are_refused_and_nothing_written() {
    let s = setup().await;
    let c = challenge("n1");
    let genuine = s.provider("a.key").credential(&c).await.expect("credential");
    let instance = Instance::example();
    let document = instance.document();
    let keys = s.imds.keys();
    let untrusted = SigningKeys::generate(&["us-east-1"]).expect("keys");

    let mut altered = instance.clone();
    altered.account_id = "999999999999".into();
    let cases = [
        (
            "signed by an untrusted key",
            with_payload(
                genuine.clone(),
                &document,
                &untrusted.sign("us-east-1", document.as_bytes()).expect("sign"),
            ),
            "not made by AWS's certificate for region us-east-1",
        ),
        (
            "content altered after signing",
            with_payload(
                genuine.clone(),
                &altered.document(),
                &keys.sign("us-east-1", document.as_bytes()).expect("sign"),
            ),
            "differs from the content AWS signed",
        ),
        (
            "signed with another region's certificate",
            with_payload(
                genuine.clone(),
                &document,
                &keys.sign("us-west-2", document.as_bytes()).expect("sign"),
            ),
            "not made by AWS's certificate for region us-east-1",
        ),
        (
            "region without a certificate",
            {
                let mut other = instance.clone();
                other.region = "eu-north-1".into();
                other.availability_zone = "eu-north-1a".into();
                let d = other.document();
                with_payload(
                    genuine.clone(),
                    &d,
                    &keys.sign("us-east-1", d.as_bytes()).expect("sign"),
                )
            },
            "add awsEc2.certificates.",
        ),
        (
            "signature that is not PKCS#7",
            with_payload(genuine.clone(), &document, "bm90IGEgc2lnbmF0dXJl"),
            "is not a PKCS#7 structure",
        ),
        (
            "no agent key proof",
            proto::Credential {
                proof: vec![],
                public_key: vec![],
                ..genuine.clone()
            },
            "no agent key proof",
        ),
    ];
    for (what, credential, want) in cases {
        let before = s.snapshot();
        let err = s
            .verifier
            .verify(&credential, &c, &ratings())
            .await
            .expect_err(what);
        assert!(err.to_string().contains(want), "{what}: {err}");
        assert_eq!(s.snapshot(), before, "{what}: nothing written");
    }
}

#[tokio::test]
async fn a_proof_for_another_challenge_is_refused() {
    let s = setup().await;
    let credential = s
        .provider("a.key")
        .credential(&challenge("n1"))
        .await
        .expect("credential");
    let err = s
        .verifier
        .verify(&credential, &challenge("n2"), &ratings())
        .await
        .expect_err("replayed proof");
    assert!(
        err.to_string().contains("not a signature of this challenge"),
        "{err}"
    );
}

#[tokio::test]
async fn imds_requires_a_session_token() {
    let s = setup().await;
    let client = reqwest::Client::new();
    let url = format!("{}/latest/dynamic/instance-identity/document", s.imds.url());
    assert_eq!(client.get(&url).send().await.expect("get").status(), 401);
    let token_url = format!("{}/latest/api/token", s.imds.url());
    assert_eq!(client.put(&token_url).send().await.expect("put").status(), 400);
    let token = client
        .put(&token_url)
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send()
        .await
        .expect("put")
        .text()
        .await
        .expect("token");
    let resp = client
        .get(&url)
        .header("X-aws-ec2-metadata-token", token)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), s.imds.instance().document());
}
