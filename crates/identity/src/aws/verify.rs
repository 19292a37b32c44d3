//! The endpoint half of AWS EC2: verifying the signed document, the agent key's proof over
//! the challenge, the one-registration-per-instance and first-join rules, and (through
//! [`role::Sts`]) the instance profile's IAM role.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gangplank_api::names::{annotation, entry_name, label};
use gangplank_api::{NamespacedName, kind, proto};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{
    AGENT_PUBLIC_KEY_ANNOTATION, Certificates, ConfigError, Facts, Payload, partition, proof_message, role,
};
use crate::store::Entries;
use crate::{Challenge, Error, Identity, Result, pkcs7};

/// How long after `pendingTime` a first join is accepted, unless configured.
pub const DEFAULT_FIRST_JOIN_WINDOW: Duration = Duration::from_secs(15 * 60);
const MAX_PAYLOAD: usize = 64 * 1024;

/// The endpoint's `identities.awsEc2` settings.
///
/// ```yaml
/// awsEc2:
///   firstJoinWindow: 15m                         # after pendingTime
///   certificates: {eu-north-1: /etc/gangplank/aws/eu-north-1.pem}   # add or replace regions
///   sts:                                         # verifying instance profile IAM roles
///     url: https://sts.{region}.amazonaws.com/   # {region}: the instance's region
///     timeout: 10s
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// PEM certificate files by region, added to (or replacing) the built-in ones.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub certificates: BTreeMap<String, PathBuf>,
    /// How long after `pendingTime` a first join is accepted (default 15m).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub first_join_window: Option<Duration>,
    /// How instance profile IAM roles are verified.
    #[serde(default, skip_serializing_if = "StsSettings::is_default")]
    pub sts: StsSettings,
}

/// `identities.awsEc2.sts`: the STS the endpoint verifies IAM role proofs with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StsSettings {
    /// Verify IAM roles (default true). When false, agents send no role proof and no
    /// identity has the `iamRole` fact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The STS URL; `{region}` is replaced by the instance's region (default
    /// `https://sts.{region}.amazonaws.com/`, `…amazonaws.com.cn/` for China's regions; set
    /// it for a FIPS or VPC endpoint, or an emulator in tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How long to wait for STS (default 10s).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

impl StsSettings {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The URL template agents sign for (Discover's `aws_sts_url`), or `None` when role
    /// verification is off.
    pub fn url_template(&self) -> Option<&str> {
        self.enabled
            .unwrap_or(true)
            .then(|| self.url.as_deref().unwrap_or(role::DEFAULT_STS_URL))
    }

    /// The STS client these settings describe, or `None` when role verification is off.
    pub fn sts(&self) -> std::result::Result<Option<role::Sts>, ConfigError> {
        self.url_template()
            .map(|url| role::Sts::new(url, self.timeout.unwrap_or(role::DEFAULT_STS_TIMEOUT)))
            .transpose()
    }
}

impl Settings {
    /// The verifier these settings describe, reading registrations from `store`.
    pub fn verifier(&self, store: Arc<dyn Entries>) -> std::result::Result<Verifier, ConfigError> {
        let mut certificates = Certificates::builtin();
        for (region, path) in &self.certificates {
            let pem = std::fs::read(path).map_err(|e| ConfigError::Certificate {
                region: region.clone(),
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            certificates = certificates.with(region, &pem)?;
        }
        let mut verifier = Verifier::new(certificates, store)
            .with_first_join_window(self.first_join_window.unwrap_or(DEFAULT_FIRST_JOIN_WINDOW));
        if let Some(sts) = self.sts.sts()? {
            verifier = verifier.with_sts(sts);
        }
        Ok(verifier)
    }
}

/// The fields of an instance identity document Gangplank uses.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    account_id: String,
    availability_zone: String,
    #[serde(default)]
    image_id: String,
    instance_id: String,
    #[serde(default)]
    instance_type: String,
    pending_time: String,
    private_ip: String,
    region: String,
}

/// The endpoint half.
pub struct Verifier {
    certificates: Certificates,
    store: Arc<dyn Entries>,
    first_join_window: Duration,
    sts: Option<role::Sts>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("regions", &self.certificates)
            .field("first_join_window", &self.first_join_window)
            .field("sts", &self.sts)
            .finish_non_exhaustive()
    }
}

fn reject(why: impl fmt::Display) -> Error {
    Error::rejected(crate::Refused::AwsDocument, why.to_string())
}

impl Verifier {
    /// A verifier trusting `certificates`, reading registrations from `store`.
    pub fn new(certificates: Certificates, store: Arc<dyn Entries>) -> Self {
        Self {
            certificates,
            store,
            first_join_window: DEFAULT_FIRST_JOIN_WINDOW,
            sts: None,
        }
    }

    /// Verifies IAM role proofs with `sts` (without it, role proofs are ignored and no
    /// identity has a role).
    pub fn with_sts(mut self, sts: role::Sts) -> Self {
        self.sts = Some(sts);
        self
    }

    /// Changes how long after `pendingTime` a first join is accepted.
    pub fn with_first_join_window(mut self, window: Duration) -> Self {
        self.first_join_window = window;
        self
    }

    /// Checks the document's signature and content only (no replay defence); returns
    /// the facts without an agent key.
    pub fn verify_document(&self, document: &[u8], rsa2048: &str) -> Result<Facts> {
        #[derive(Deserialize)]
        struct Region {
            region: String,
        }
        let claimed: Region = serde_json::from_slice(document)
            .map_err(|e| reject(format!("is not the JSON IMDS serves: {e}")))?;
        let cert = self.certificates.get(&claimed.region).ok_or_else(|| {
            reject(format!(
                "names region {}, for which no AWS certificate is built in or configured: add awsEc2.certificates.{} (the RSA-2048 certificate AWS publishes for it) to the endpoint config",
                crate::text::shown(&claimed.region),
                crate::text::shown(&claimed.region)
            ))
        })?;
        let compact: String = rsa2048.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| reject("signature (rsa2048) is not base64"))?;
        let p7 = pkcs7::parse(&der).map_err(|m| reject(format!("signature (rsa2048) {m}")))?;
        let content = pkcs7::verify_signed_by(&p7, cert).map_err(|_| {
            reject(format!(
                "signature was not made by AWS's certificate for region {}: the document is forged, altered or from another region",
                claimed.region
            ))
        })?;
        if content != document {
            return Err(reject(
                "differs from the content AWS signed: send the document exactly as IMDS serves it",
            ));
        }
        let doc: Document = serde_json::from_slice(&content)
            .map_err(|e| reject(format!("signed content lacks a field Gangplank needs: {e}")))?;
        if doc.account_id.len() != 12 || !doc.account_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(reject("has an accountId that is not 12 digits"));
        }
        if !doc.availability_zone.starts_with(&doc.region) {
            return Err(reject("has an availabilityZone outside its region"));
        }
        let private_ip = doc
            .private_ip
            .parse()
            .map_err(|_| reject("has a privateIp that is not an IP address"))?;
        Ok(Facts {
            partition: partition(&doc.region).to_string(),
            account: doc.account_id,
            region: doc.region,
            zone: doc.availability_zone,
            instance_id: doc.instance_id,
            image_id: doc.image_id,
            instance_type: doc.instance_type,
            private_ip,
            pending_time: doc.pending_time,
            agent_public_key: String::new(),
            iam_role: None,
        })
    }

    /// The registrations this instance holds now (entries whose identity annotation is this
    /// instance's).
    async fn registrations(&self, facts: &Facts) -> Result<Vec<gangplank_api::istio::WorkloadEntry>> {
        let wanted = facts.annotation();
        Ok(self
            .store
            .managed_entries()
            .await?
            .into_iter()
            .filter(|e| {
                e.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(annotation::IDENTITY))
                    .is_some_and(|v| *v == wanted)
            })
            .collect())
    }
}

/// Verifies `proof` over the challenge with `public_key` (SPKI DER, Ed25519), as every
/// agent key proof is checked ([`crate::bound`]).
fn check_proof(public_key: &[u8], proof: &[u8], challenge: &Challenge) -> Result<()> {
    use crate::bound::verify::{ed25519, signed};
    if public_key.is_empty() || proof.is_empty() {
        return Err(Error::rejected(
            crate::Refused::AwsKeyProof,
            "has no agent key proof: upgrade gangplank-agent (it signs the endpoint's nonce with its instance key)",
        ));
    }
    if ed25519(public_key).is_none() {
        return Err(Error::rejected(
            crate::Refused::AwsKeyProof,
            "carries an agent public key that is not an Ed25519 key",
        ));
    }
    if !signed(public_key, &proof_message(challenge), proof) {
        return Err(Error::rejected(
            crate::Refused::AwsKeyProof,
            "proof is not a signature of this challenge by the agent's key",
        ));
    }
    Ok(())
}

#[async_trait]
impl crate::Verifier for Verifier {
    fn kind(&self) -> &'static str {
        kind::AWS_EC2
    }

    async fn verify(
        &self,
        credential: &proto::Credential,
        challenge: &Challenge,
        group: &NamespacedName,
    ) -> Result<Identity> {
        if credential.kind != kind::AWS_EC2 {
            return Err(Error::UnsupportedKind(credential.kind.clone()));
        }
        if credential.payload.len() > MAX_PAYLOAD {
            return Err(reject(format!("credential is larger than {MAX_PAYLOAD} bytes")));
        }
        let payload: Payload = serde_json::from_slice(&credential.payload)
            .map_err(|_| reject("credential is malformed: expected {document, rsa2048}"))?;
        let mut facts = self.verify_document(payload.document.as_bytes(), &payload.rsa2048)?;
        check_proof(&credential.public_key, &credential.proof, challenge)?;
        let presented = STANDARD.encode(&credential.public_key);

        let expected = entry_name(
            &group.name,
            "aws",
            &facts.name_parts().iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let registrations = self.registrations(&facts).await?;
        if registrations.is_empty() {
            let pending = OffsetDateTime::parse(&facts.pending_time, &Rfc3339)
                .map_err(|_| reject("has a pendingTime that is not RFC 3339"))?;
            let age = OffsetDateTime::now_utc() - pending;
            if age > self.first_join_window || age < -time::Duration::minutes(5) {
                return Err(reject(format!(
                    "is a first join of instance {} outside the first-join window: the instance entered pending at {}, and a first join is accepted only within {} of that (stop and start the instance for a new pendingTime, or raise awsEc2.firstJoinWindow)",
                    facts.instance_id,
                    facts.pending_time,
                    humanize(self.first_join_window)
                )));
            }
        }
        for entry in &registrations {
            let ns = entry.metadata.namespace.as_deref().unwrap_or_default();
            let name = entry.metadata.name.as_deref().unwrap_or_default();
            if ns != group.namespace || name != expected {
                let other_group = entry
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(label::WORKLOAD_GROUP))
                    .cloned()
                    .unwrap_or_default();
                return Err(reject(format!(
                    "is for instance {} which is already registered as WorkloadEntry {ns}/{name} (WorkloadGroup {other_group}); an instance holds one registration at a time: run `gangplank instance release {}` first",
                    facts.instance_id, facts.instance_id
                )));
            }
            let recorded = entry
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(AGENT_PUBLIC_KEY_ANNOTATION));
            if recorded != Some(&presented) {
                return Err(reject(format!(
                    "is for instance {} whose registration {ns}/{name} belongs to a different agent key: a copied document is refused; if the VM was re-imaged, run `gangplank instance release {}`",
                    facts.instance_id, facts.instance_id
                )));
            }
        }
        // Last, after every local check: the one network call. An STS the endpoint cannot
        // reach leaves the role unverified (policies listing iamRoles then refuse) rather
        // than refusing instances that no role policy needs; STS refusing the proof refuses.
        if let (Some(sts), Some(proof)) = (&self.sts, &payload.iam_role) {
            match sts.verify(proof, challenge, &facts).await {
                Ok(role) => facts.iam_role = Some(role),
                Err(Error::Unavailable(why)) => {
                    tracing::warn!(instance = %facts.instance_id, "iam role not verified: {why}");
                }
                Err(e) => return Err(e),
            }
        }
        facts.agent_public_key = presented;
        Ok(Identity {
            address: Some(facts.private_ip),
            facts: crate::Facts::Aws(facts),
        })
    }
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Ends every registration of `instance_id` (for a re-imaged VM): deletes the WorkloadEntries
/// in `store` whose identity is that instance. Returns the deleted entries.
pub async fn release(store: &dyn Entries, instance_id: &str) -> Result<Vec<NamespacedName>> {
    let suffix = format!("/{instance_id}");
    let mut released = Vec::new();
    for entry in store.managed_entries().await? {
        let identity = entry
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation::IDENTITY));
        if identity.is_some_and(|v| v.starts_with("aws:") && v.ends_with(&suffix)) {
            let key = NamespacedName::new(
                entry.metadata.namespace.clone().unwrap_or_default(),
                entry.metadata.name.clone().unwrap_or_default(),
            );
            if store.delete_entry(&key).await? {
                released.push(key);
            }
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::pkey::{Id, PKey};

    /// A real document and RSA-2048 signature from an EC2 instance in ap-southeast-2 (see
    /// data/README.md), verified with the built-in certificate AWS publishes for that region.
    #[test]
    fn a_real_aws_document_verifies_with_the_builtin_certificate() {
        let document = include_bytes!("../../data/aws/samples/ap-southeast-2.document.json");
        let signature = include_str!("../../data/aws/samples/ap-southeast-2.rsa2048");
        let store: Arc<dyn Entries> = Arc::new(NoStore);
        let verifier = Verifier::new(Certificates::builtin(), store);
        let facts = verifier
            .verify_document(document, signature)
            .expect("real AWS signature verifies");
        assert_eq!(facts.account, "189292791360");
        assert_eq!(facts.region, "ap-southeast-2");
        assert_eq!(facts.zone, "ap-southeast-2a");
        assert_eq!(facts.instance_id, "i-0c5541936caf78c12");
        assert_eq!(facts.private_ip.to_string(), "10.0.1.242");
        assert_eq!(facts.partition, "aws");

        // One changed byte in the document, or another region's certificate, is refused.
        let mut altered = document.to_vec();
        let at = altered
            .windows(3)
            .position(|w| w == b"242")
            .expect("ip in sample");
        altered[at] = b'3';
        let err = verifier
            .verify_document(&altered, signature)
            .expect_err("altered document");
        assert!(
            err.to_string().contains("differs from the content AWS signed"),
            "{err}"
        );
        let other = Certificates::empty()
            .with(
                "ap-southeast-2",
                include_bytes!("../../data/aws/rsa2048/us-east-1.pem"),
            )
            .expect("pem");
        let err = Verifier::new(other, Arc::new(NoStore))
            .verify_document(document, signature)
            .expect_err("wrong region certificate");
        assert!(
            err.to_string()
                .contains("not made by AWS's certificate for region ap-southeast-2"),
            "{err}"
        );
    }

    /// A store that must not be reached by document-only checks.
    struct NoStore;

    #[async_trait]
    impl Entries for NoStore {
        async fn managed_entries(
            &self,
        ) -> std::result::Result<Vec<gangplank_api::istio::WorkloadEntry>, crate::store::Error> {
            unreachable!("document checks read no store")
        }
        async fn delete_entry(&self, _: &NamespacedName) -> std::result::Result<bool, crate::store::Error> {
            unreachable!("document checks write nothing")
        }
    }

    /// The agent makes its key with aws-lc-rs; the endpoint reads keys with OpenSSL. A key an
    /// earlier agent wrote with OpenSSL still loads, the file the agent writes is byte for byte
    /// what OpenSSL writes for that key (mode 0600), and its proofs verify for their challenge
    /// only.
    #[test]
    fn agent_keys_and_proofs_are_the_ones_openssl_writes_and_reads() {
        use std::os::unix::fs::PermissionsExt;

        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair;

        let dir = tempfile::tempdir().expect("tempdir");
        let spki = |key: &aws_lc_rs::signature::Ed25519KeyPair| {
            key.public_key().as_der().expect("spki").as_ref().to_vec()
        };

        let earlier = PKey::generate_ed25519().expect("openssl key");
        let path = dir.path().join("earlier.key");
        std::fs::write(&path, earlier.private_key_to_pem_pkcs8().expect("pem")).expect("write");
        let loaded = super::super::load_or_create_key(&path).expect("an OpenSSL key loads");
        assert_eq!(spki(&loaded), earlier.public_key_to_der().expect("der"));

        let path = dir.path().join("keys/agent.key");
        let made = super::super::load_or_create_key(&path).expect("created");
        let pem = std::fs::read(&path).expect("read");
        let read = PKey::private_key_from_pem(&pem).expect("OpenSSL reads the agent's key");
        assert_eq!(read.id(), Id::ED25519);
        assert_eq!(read.private_key_to_pem_pkcs8().expect("pem"), pem);
        assert_eq!(read.public_key_to_der().expect("der"), spki(&made));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = super::super::load_or_create_key(&path).expect("loads");
        assert_eq!(spki(&again), spki(&made));

        let challenge = Challenge {
            plane_id: "plane-1".into(),
            nonce: "n1".into(),
            ..Default::default()
        };
        let proof = made.sign(&proof_message(&challenge));
        check_proof(&spki(&made), proof.as_ref(), &challenge).expect("the agent's proof verifies");
        let other = Challenge {
            nonce: "n2".into(),
            ..challenge.clone()
        };
        let err = check_proof(&spki(&made), proof.as_ref(), &other).expect_err("another challenge");
        assert!(
            err.to_string().contains("not a signature of this challenge"),
            "{err}"
        );
        let err = check_proof(&spki(&loaded), proof.as_ref(), &challenge).expect_err("another key");
        assert!(
            err.to_string().contains("not a signature of this challenge"),
            "{err}"
        );

        std::fs::write(
            &path,
            b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let err = super::super::load_or_create_key(&path).expect_err("not a key");
        assert!(
            err.to_string().contains("is not an Ed25519 private key in PEM"),
            "{err}"
        );
    }

    #[test]
    fn sts_settings_default_on_and_are_checked() {
        let parse = |yaml: &str| serde_saphyr::from_str::<Settings>(yaml);
        let defaults = parse("{}").expect("empty");
        assert_eq!(defaults.sts.url_template(), Some(role::DEFAULT_STS_URL));
        let china =
            parse("sts: {url: \"https://sts.{region}.amazonaws.com.cn/\", timeout: 3s}").expect("china");
        assert_eq!(
            china.sts.url_template(),
            Some("https://sts.{region}.amazonaws.com.cn/")
        );
        assert_eq!(china.sts.timeout, Some(Duration::from_secs(3)));
        assert_eq!(
            parse("sts: {enabled: false}").expect("off").sts.url_template(),
            None
        );
        assert!(parse("sts: {endpoint: x}").is_err(), "unknown fields are errors");

        let bad = parse("sts: {url: \"ftp://sts.example/\"}").expect("parses");
        let err = bad.verifier(Arc::new(NoStore)).expect_err("not http(s)");
        assert!(err.to_string().starts_with("awsEc2.sts: url"), "{err}");
    }
}
