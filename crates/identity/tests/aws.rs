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
use gangplank_identity::aws::sigv4::Credentials;
use gangplank_identity::aws::{self, Certificates, Provider, Verifier, role};
use gangplank_identity::{Challenge, Facts, Identity, Provider as _, Verifier as _};
use gangplank_registry::dir::Registry;
use gangplank_registry::{IdentityStore, Registry as _};
use gangplank_testkit::cloud::aws::{Imds, Instance, SigningKeys, Sts};

struct Setup {
    imds: Imds,
    sts: Sts,
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
    let sts = Sts::start(imds.iam(), "us-east-1").await.expect("sts");
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::open(dir.path().join("registry")).expect("registry");
    let verifier = Verifier::new(certs, Arc::new(IdentityStore::new(Arc::new(registry.clone()))))
        .with_sts(role::Sts::new(&sts.url(), Duration::from_secs(5)).expect("sts client"));
    Setup {
        imds,
        sts,
        registry,
        verifier,
        dir,
    }
}

impl Setup {
    fn provider(&self, key_name: &str) -> Provider {
        Provider::new(Some(self.imds.url()), self.dir.path().join(key_name)).expect("provider")
    }

    /// A challenge from an endpoint that verifies IAM roles with the STS emulator.
    fn role_challenge(&self, nonce: &str) -> Challenge {
        Challenge {
            aws_sts_url: self.sts.url(),
            ..challenge(nonce)
        }
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
        ..Default::default()
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

    let released = aws::release(
        &IdentityStore::new(Arc::new(s.registry.clone())),
        "i-0abc1234def567890",
    )
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
    Verifier::new(certs, Arc::new(IdentityStore::new(Arc::new(s.registry.clone()))))
        .with_first_join_window(window)
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

/// The role proof in an aws credential's payload (JSON).
fn role_proof(credential: &proto::Credential) -> serde_json::Value {
    let payload: serde_json::Value = serde_json::from_slice(&credential.payload).expect("payload json");
    payload["iamRole"].clone()
}

/// `credential` with its role proof replaced.
fn with_role_proof(mut credential: proto::Credential, proof: serde_json::Value) -> proto::Credential {
    let mut payload: serde_json::Value = serde_json::from_slice(&credential.payload).expect("payload json");
    payload["iamRole"] = proof;
    credential.payload = serde_json::to_vec(&payload).expect("json");
    credential
}

#[tokio::test]
async fn the_instance_profile_role_is_verified_through_sts() {
    let s = setup().await;
    let c = s.role_challenge("n1");
    let credential = s.provider("a.key").credential(&c).await.expect("credential");

    // The agent sends a signed request, never the secret key.
    let session = s
        .imds
        .iam()
        .sessions()
        .pop()
        .expect("IMDS issued role credentials");
    let payload = String::from_utf8(credential.payload.clone()).expect("utf-8");
    assert!(
        !payload.contains(&session.secret_access_key),
        "the secret key stays on the VM"
    );
    let proof = role_proof(&credential);
    assert_eq!(proof["body"], role::GET_CALLER_IDENTITY);
    assert_eq!(proof["headers"][role::NONCE_HEADER], "n1");

    let before = s.snapshot();
    let identity = s
        .verifier
        .verify(&credential, &c, &ratings())
        .await
        .expect("verified");
    assert_eq!(s.snapshot(), before, "verify writes nothing");
    assert_eq!(s.sts.requests(), 1, "one STS call");
    let f = aws_facts(&identity);
    assert_eq!(f.iam_role.as_deref(), Some("ratings"));
    assert_eq!(
        identity.labels()["onboarding.gangplank.dev/aws-iam-role"],
        "ratings"
    );
    assert!(
        identity.annotations()[aws::FACTS_ANNOTATION].contains("\"iamRole\":\"ratings\""),
        "{:?}",
        identity.annotations()
    );
    assert!(identity.to_string().ends_with("iam role ratings)"), "{identity}");
}

#[tokio::test]
async fn without_an_instance_profile_the_instance_onboards_without_a_role() {
    let s = setup().await;
    s.imds
        .set_instance(Instance::example().without_instance_profile());
    let c = s.role_challenge("n1");
    let credential = s.provider("a.key").credential(&c).await.expect("credential");
    assert!(role_proof(&credential).is_null(), "no role proof without a role");
    let identity = s
        .verifier
        .verify(&credential, &c, &ratings())
        .await
        .expect("verified");
    assert_eq!(aws_facts(&identity).iam_role, None);
    assert!(
        !identity
            .labels()
            .contains_key("onboarding.gangplank.dev/aws-iam-role")
    );
    assert_eq!(s.sts.requests(), 0);
}

#[tokio::test]
async fn an_endpoint_that_asks_for_no_role_gets_no_role_proof() {
    let s = setup().await;
    let c = challenge("n1");
    let credential = s.provider("a.key").credential(&c).await.expect("credential");
    assert!(role_proof(&credential).is_null());
    let identity = s
        .verifier
        .verify(&credential, &c, &ratings())
        .await
        .expect("verified");
    assert_eq!(aws_facts(&identity).iam_role, None);
    assert_eq!(s.sts.requests(), 0);
}

/// Verifies `credential` against `c`, expecting a refusal containing `want` and nothing
/// written; returns how many requests reached STS.
async fn refused(s: &Setup, credential: &proto::Credential, c: &Challenge, want: &str) -> usize {
    let before = s.snapshot();
    let calls = s.sts.requests();
    let err = s
        .verifier
        .verify(credential, c, &ratings())
        .await
        .expect_err(want);
    assert!(err.to_string().contains(want), "want {want:?}, got: {err}");
    assert_eq!(s.snapshot(), before, "{want}: nothing written");
    s.sts.requests() - calls
}

#[tokio::test]
async fn a_role_proof_signed_with_a_wrong_secret_is_refused_by_sts() {
    let s = setup().await;
    let c = s.role_challenge("n1");
    let genuine = s.provider("a.key").credential(&c).await.expect("credential");
    let session = s.imds.iam().sessions().pop().expect("session");
    let forged = role::sign(
        &Credentials {
            access_key_id: session.access_key_id.clone(),
            secret_access_key: "not-the-secret-IMDS-handed-out".into(),
            session_token: Some(session.token.clone()),
        },
        &reqwest::Url::parse(&s.sts.url()).expect("url"),
        "us-east-1",
        "n1",
        time::OffsetDateTime::now_utc(),
    );
    let credential = with_role_proof(genuine.clone(), serde_json::to_value(&forged).expect("json"));
    let calls = refused(&s, &credential, &c, "SignatureDoesNotMatch").await;
    assert_eq!(calls, 1, "STS decided");

    // The genuine proof with a signed header altered after signing: STS refuses it too.
    let mut altered = role_proof(&genuine);
    altered["headers"]["x-amz-date"] = serde_json::json!(aws::sigv4::amz_date(
        time::OffsetDateTime::now_utc() - time::Duration::minutes(1)
    ));
    let credential = with_role_proof(genuine, altered);
    refused(&s, &credential, &c, "SignatureDoesNotMatch").await;
}

#[tokio::test]
async fn a_role_proof_for_another_nonce_is_refused_without_calling_sts() {
    let s = setup().await;
    let provider = s.provider("a.key");
    let first = provider
        .credential(&s.role_challenge("n1"))
        .await
        .expect("credential");
    let c2 = s.role_challenge("n2");
    let second = provider.credential(&c2).await.expect("credential");
    // A fresh agent-key proof for n2, carrying the role proof made for n1 (a replay).
    let replayed = with_role_proof(second, role_proof(&first));
    let calls = refused(&s, &replayed, &c2, "bound to another challenge").await;
    assert_eq!(calls, 0, "refused before STS");
}

#[tokio::test]
async fn a_role_proof_that_is_not_get_caller_identity_is_refused_without_calling_sts() {
    let s = setup().await;
    let c = s.role_challenge("n1");
    let genuine = s.provider("a.key").credential(&c).await.expect("credential");
    let cases = [
        (
            "body",
            serde_json::json!("Action=AssumeRole&Version=2011-06-15&RoleArn=x"),
            "not an STS GetCallerIdentity request",
        ),
        (
            "headers",
            serde_json::json!({"host": "x"}),
            "has no authorization header",
        ),
    ];
    for (field, value, want) in cases {
        let mut proof = role_proof(&genuine);
        proof[field] = value;
        let calls = refused(&s, &with_role_proof(genuine.clone(), proof), &c, want).await;
        assert_eq!(calls, 0, "{field}: refused before STS");
    }
    // Unsigned nonce, and an extra header the endpoint would not forward.
    let mut proof = role_proof(&genuine);
    let auth = proof["headers"]["authorization"]
        .as_str()
        .expect("auth")
        .replace(";x-gangplank-nonce", "");
    proof["headers"]["authorization"] = serde_json::json!(auth);
    refused(
        &s,
        &with_role_proof(genuine.clone(), proof),
        &c,
        "does not sign the x-gangplank-nonce header",
    )
    .await;
    let mut proof = role_proof(&genuine);
    proof["headers"]["content-type"] = serde_json::json!("text/plain\r\nx-forwarded-for: 10.0.0.1");
    refused(
        &s,
        &with_role_proof(genuine.clone(), proof),
        &c,
        "not a printable ASCII value",
    )
    .await;
    let mut proof = role_proof(&genuine);
    proof["headers"]["x-forwarded-for"] = serde_json::json!("10.0.0.1");
    refused(&s, &with_role_proof(genuine, proof), &c, "not forwarded to STS").await;
    assert_eq!(s.sts.requests(), 0);
}

#[tokio::test]
async fn credentials_of_another_instance_are_refused() {
    let s = setup().await;
    s.imds
        .hand_out_credentials_of("123456789012", "i-0fffffffffffffff0");
    let c = s.role_challenge("n1");
    let credential = s.provider("a.key").credential(&c).await.expect("credential");
    let calls = refused(&s, &credential, &c, "belong to another machine").await;
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn credentials_of_another_account_are_refused() {
    let s = setup().await;
    s.imds
        .hand_out_credentials_of("999999999999", "i-0abc1234def567890");
    let c = s.role_challenge("n1");
    let credential = s.provider("a.key").credential(&c).await.expect("credential");
    refused(
        &s,
        &credential,
        &c,
        "credentials from another account are refused",
    )
    .await;
}

#[tokio::test]
async fn expired_role_credentials_are_refused_by_sts() {
    let s = setup().await;
    let c = s.role_challenge("n1");
    let credential = s.provider("a.key").credential(&c).await.expect("credential");
    s.imds.iam().expire_all();
    refused(&s, &credential, &c, "ExpiredToken").await;
}

#[tokio::test]
async fn an_unreachable_sts_leaves_the_role_unverified() {
    let s = setup().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed = format!("http://{}/", listener.local_addr().expect("addr"));
    drop(listener);
    let verifier = setup_window(&s, Duration::from_secs(900))
        .with_sts(role::Sts::new(&closed, Duration::from_secs(2)).expect("sts client"));
    let c = Challenge {
        aws_sts_url: closed,
        ..challenge("n1")
    };
    let credential = s.provider("a.key").credential(&c).await.expect("credential");
    let identity = verifier
        .verify(&credential, &c, &ratings())
        .await
        .expect("still verified");
    assert_eq!(aws_facts(&identity).iam_role, None, "no role without STS's word");
}

#[tokio::test]
async fn imds_serves_role_credentials_only_with_a_session_token() {
    let s = setup().await;
    let client = reqwest::Client::new();
    let url = format!("{}/latest/meta-data/iam/security-credentials/", s.imds.url());
    assert_eq!(client.get(&url).send().await.expect("get").status(), 401);
    assert_eq!(
        client
            .get(format!("{url}ratings"))
            .send()
            .await
            .expect("get")
            .status(),
        401
    );
}

#[tokio::test]
async fn a_broken_instance_profile_costs_the_role_not_the_onboarding() {
    let s = setup().await;
    let mut instance = Instance::example();
    instance.iam_role = Some("not a role name!".into());
    s.imds.set_instance(instance);
    let c = s.role_challenge("n1");
    let credential = s.provider("a.key").credential(&c).await.expect("credential");
    assert!(role_proof(&credential).is_null(), "no role proof");
    let identity = s
        .verifier
        .verify(&credential, &c, &ratings())
        .await
        .expect("verified");
    assert_eq!(aws_facts(&identity).iam_role, None);
}
