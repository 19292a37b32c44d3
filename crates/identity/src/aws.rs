//! AWS EC2: the instance identity document, signed by AWS, plus an agent key.
//!
//! Agent half ([`Provider`]): IMDSv2 — a session token via `PUT /latest/api/token`, then the
//! instance identity document and its PKCS#7 RSA-2048 signature
//! (`/latest/dynamic/instance-identity/{document,rsa2048}`). It also holds an Ed25519 key
//! pair, generated on first join and kept on the VM, and signs the endpoint's challenge
//! with it.
//!
//! Endpoint half ([`Verifier`]): verifies the PKCS#7 signature with AWS's published
//! certificate for the document's region only (built in, see `data/README.md`; overridable),
//! requires the signed content to equal the document, and defends against replay of the
//! (static, long-lived) document:
//! - a first join is accepted only within a window after the document's `pendingTime`;
//! - the first join records the agent's public key on the WorkloadEntry; every later
//!   onboarding of that instance must be signed with that key over the endpoint's nonce;
//! - an instance holds one registration at a time (`gangplank instance release` ends it).
//!
//! The IAM role of the instance profile is not in the signed document; it is proven
//! separately, through STS `GetCallerIdentity` signed with the instance profile's
//! credentials and bound to the challenge (see [`role`]). An instance without an instance
//! profile still onboards, without the `iamRole` fact.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gangplank_api::names::{annotation, entry_name, label};
use gangplank_api::{NamespacedName, kind, proto};
use gangplank_registry::Registry;
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::x509::X509;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{Challenge, Error, Identity, Result, pkcs7};

pub mod role;
pub mod sigv4;

/// Where IMDS answers on every EC2 instance.
pub const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";
/// How long after `pendingTime` a first join is accepted, unless configured.
pub const DEFAULT_FIRST_JOIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Annotation holding the agent's public key (base64 SubjectPublicKeyInfo DER).
pub const AGENT_PUBLIC_KEY_ANNOTATION: &str = "onboarding.gangplank.dev/agent-public-key";
/// Annotation holding the verified document's facts (JSON).
pub const FACTS_ANNOTATION: &str = "onboarding.gangplank.dev/aws-instance";
/// Seconds an IMDSv2 session token is requested for.
const IMDS_TOKEN_TTL: u32 = 60;
const IMDS_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PAYLOAD: usize = 64 * 1024;
const PROOF_CONTEXT: &[u8] = b"gangplank aws-ec2 onboarding proof v1";

/// The certificates built in: AWS's published RSA-2048 certificates, by region.
const BUILTIN: &[(&str, &str)] = &[
    ("af-south-1", include_str!("../data/aws/rsa2048/af-south-1.pem")),
    ("ap-east-1", include_str!("../data/aws/rsa2048/ap-east-1.pem")),
    ("ap-east-2", include_str!("../data/aws/rsa2048/ap-east-2.pem")),
    (
        "ap-northeast-1",
        include_str!("../data/aws/rsa2048/ap-northeast-1.pem"),
    ),
    (
        "ap-northeast-2",
        include_str!("../data/aws/rsa2048/ap-northeast-2.pem"),
    ),
    (
        "ap-northeast-3",
        include_str!("../data/aws/rsa2048/ap-northeast-3.pem"),
    ),
    ("ap-south-1", include_str!("../data/aws/rsa2048/ap-south-1.pem")),
    ("ap-south-2", include_str!("../data/aws/rsa2048/ap-south-2.pem")),
    (
        "ap-southeast-1",
        include_str!("../data/aws/rsa2048/ap-southeast-1.pem"),
    ),
    (
        "ap-southeast-2",
        include_str!("../data/aws/rsa2048/ap-southeast-2.pem"),
    ),
    (
        "ap-southeast-3",
        include_str!("../data/aws/rsa2048/ap-southeast-3.pem"),
    ),
    (
        "ap-southeast-4",
        include_str!("../data/aws/rsa2048/ap-southeast-4.pem"),
    ),
    (
        "ap-southeast-5",
        include_str!("../data/aws/rsa2048/ap-southeast-5.pem"),
    ),
    (
        "ap-southeast-6",
        include_str!("../data/aws/rsa2048/ap-southeast-6.pem"),
    ),
    (
        "ap-southeast-7",
        include_str!("../data/aws/rsa2048/ap-southeast-7.pem"),
    ),
    (
        "ca-central-1",
        include_str!("../data/aws/rsa2048/ca-central-1.pem"),
    ),
    ("ca-west-1", include_str!("../data/aws/rsa2048/ca-west-1.pem")),
    ("cn-north-1", include_str!("../data/aws/rsa2048/cn-north-1.pem")),
    (
        "cn-northwest-1",
        include_str!("../data/aws/rsa2048/cn-northwest-1.pem"),
    ),
    (
        "eu-central-1",
        include_str!("../data/aws/rsa2048/eu-central-1.pem"),
    ),
    (
        "eu-central-2",
        include_str!("../data/aws/rsa2048/eu-central-2.pem"),
    ),
    ("eu-north-1", include_str!("../data/aws/rsa2048/eu-north-1.pem")),
    ("eu-south-1", include_str!("../data/aws/rsa2048/eu-south-1.pem")),
    ("eu-south-2", include_str!("../data/aws/rsa2048/eu-south-2.pem")),
    ("eu-west-1", include_str!("../data/aws/rsa2048/eu-west-1.pem")),
    ("eu-west-2", include_str!("../data/aws/rsa2048/eu-west-2.pem")),
    ("eu-west-3", include_str!("../data/aws/rsa2048/eu-west-3.pem")),
    (
        "eusc-de-east-1",
        include_str!("../data/aws/rsa2048/eusc-de-east-1.pem"),
    ),
    (
        "il-central-1",
        include_str!("../data/aws/rsa2048/il-central-1.pem"),
    ),
    (
        "me-central-1",
        include_str!("../data/aws/rsa2048/me-central-1.pem"),
    ),
    ("me-south-1", include_str!("../data/aws/rsa2048/me-south-1.pem")),
    (
        "mx-central-1",
        include_str!("../data/aws/rsa2048/mx-central-1.pem"),
    ),
    ("sa-east-1", include_str!("../data/aws/rsa2048/sa-east-1.pem")),
    ("us-east-1", include_str!("../data/aws/rsa2048/us-east-1.pem")),
    ("us-east-2", include_str!("../data/aws/rsa2048/us-east-2.pem")),
    (
        "us-gov-east-1",
        include_str!("../data/aws/rsa2048/us-gov-east-1.pem"),
    ),
    (
        "us-gov-west-1",
        include_str!("../data/aws/rsa2048/us-gov-west-1.pem"),
    ),
    ("us-west-1", include_str!("../data/aws/rsa2048/us-west-1.pem")),
    ("us-west-2", include_str!("../data/aws/rsa2048/us-west-2.pem")),
];

/// Verified facts of an EC2 instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// `aws`, `aws-cn` or `aws-us-gov`, from the region (derived when empty).
    #[serde(default)]
    pub partition: String,
    /// The 12-digit account id.
    pub account: String,
    /// The region, e.g. `us-east-1`.
    pub region: String,
    /// The availability zone, e.g. `us-east-1a`.
    pub zone: String,
    /// The instance id, e.g. `i-0abc…`.
    pub instance_id: String,
    /// The AMI id.
    #[serde(default)]
    pub image_id: String,
    /// The instance type, e.g. `t3.micro`.
    #[serde(default)]
    pub instance_type: String,
    /// The primary private IP (`0.0.0.0` when unknown, e.g. in `policy explain`).
    #[serde(default = "unspecified")]
    pub private_ip: IpAddr,
    /// When the instance last entered `pending` (RFC 3339).
    #[serde(default)]
    pub pending_time: String,
    /// The agent's public key (base64 SubjectPublicKeyInfo DER); empty in `policy explain`.
    #[serde(default, skip_serializing)]
    pub agent_public_key: String,
    /// The instance profile's IAM role name, verified through STS; `None` when the instance
    /// has no instance profile or the endpoint verifies no roles. The role's path is not
    /// known (it is not in the assumed-role ARN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_role: Option<String>,
}

fn unspecified() -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
}

impl Facts {
    /// Facts as written by a person (`policy explain`): camelCase fields, `partition`
    /// derived from `region` when absent.
    pub fn from_value(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let mut facts: Facts = serde_json::from_value(value.clone())
            .map_err(|e| format!("aws facts need account, region, zone and instanceId ({e})"))?;
        if facts.partition.is_empty() {
            facts.partition = partition(&facts.region).to_string();
        }
        Ok(facts)
    }

    /// The `identity` annotation value, unique per instance: `aws:<account>/<region>/<instance>`.
    pub fn annotation(&self) -> String {
        format!("aws:{}/{}/{}", self.account, self.region, self.instance_id)
    }

    /// Parts of the WorkloadEntry name: account, zone, instance id.
    pub fn name_parts(&self) -> Vec<String> {
        vec![self.account.clone(), self.zone.clone(), self.instance_id.clone()]
    }

    /// Label-safe facts.
    pub fn labels(&self) -> BTreeMap<String, String> {
        crate::detect::short_labels([
            ("aws-account", &self.account),
            ("aws-region", &self.region),
            ("aws-zone", &self.zone),
            ("aws-instance-id", &self.instance_id),
            ("aws-iam-role", self.iam_role.as_ref().unwrap_or(&String::new())),
        ])
    }

    /// Annotations recording the facts and the agent's key.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Ok(json) = serde_json::to_string(self) {
            out.insert(FACTS_ANNOTATION.to_string(), json);
        }
        if !self.agent_public_key.is_empty() {
            out.insert(
                AGENT_PUBLIC_KEY_ANNOTATION.to_string(),
                self.agent_public_key.clone(),
            );
        }
        out
    }
}

/// The partition a region belongs to.
pub fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else if region.starts_with("us-iso") {
        "aws-iso"
    } else if region.starts_with("eusc-") {
        "aws-eusc"
    } else {
        "aws"
    }
}

/// What is wrong with the endpoint's AWS configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configured certificate is unusable.
    #[error("awsEc2.certificates.{region}: {message}")]
    Certificate {
        /// The region it was configured for.
        region: String,
        /// What is wrong and what to change.
        message: String,
    },
    /// The STS settings are unusable.
    #[error("awsEc2.sts: {message}")]
    Sts {
        /// What is wrong and what to change.
        message: String,
    },
}

/// AWS's signing certificates by region.
#[derive(Clone)]
pub struct Certificates {
    by_region: BTreeMap<String, X509>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_region.keys()).finish()
    }
}

impl Certificates {
    /// AWS's published RSA-2048 certificates built into Gangplank.
    pub fn builtin() -> Self {
        let by_region = BUILTIN
            .iter()
            .filter_map(|(region, pem)| {
                X509::from_pem(pem.as_bytes())
                    .ok()
                    .map(|c| (region.to_string(), c))
            })
            .collect();
        Self { by_region }
    }

    /// No certificates (for tests and air-gapped setups that list every region).
    pub fn empty() -> Self {
        Self {
            by_region: BTreeMap::new(),
        }
    }

    /// Adds or replaces the certificate for `region` (PEM).
    pub fn with(mut self, region: &str, pem: &[u8]) -> std::result::Result<Self, ConfigError> {
        let cert = X509::from_pem(pem).map_err(|e| ConfigError::Certificate {
            region: region.to_string(),
            message: format!("not a PEM certificate: {e}"),
        })?;
        self.by_region.insert(region.to_string(), cert);
        Ok(self)
    }

    /// Regions with a certificate.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.by_region.keys().map(String::as_str)
    }

    fn get(&self, region: &str) -> Option<&X509> {
        self.by_region.get(region)
    }
}

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
    /// The verifier these settings describe, reading registrations from `registry`.
    pub fn verifier(&self, registry: Arc<dyn Registry>) -> std::result::Result<Verifier, ConfigError> {
        let mut certificates = Certificates::builtin();
        for (region, path) in &self.certificates {
            let pem = std::fs::read(path).map_err(|e| ConfigError::Certificate {
                region: region.clone(),
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            certificates = certificates.with(region, &pem)?;
        }
        let mut verifier = Verifier::new(certificates, registry)
            .with_first_join_window(self.first_join_window.unwrap_or(DEFAULT_FIRST_JOIN_WINDOW));
        if let Some(sts) = self.sts.sts()? {
            verifier = verifier.with_sts(sts);
        }
        Ok(verifier)
    }
}

/// The credential payload: the document exactly as IMDS served it, its signature and,
/// when the instance has an instance profile and the endpoint asked for it, the IAM role
/// proof.
#[derive(Serialize, Deserialize)]
struct Payload {
    document: String,
    rsa2048: String,
    #[serde(default, rename = "iamRole", skip_serializing_if = "Option::is_none")]
    iam_role: Option<role::Proof>,
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

/// The bytes an agent signs: a fixed context, the plane id and the nonce.
pub fn proof_message(challenge: &Challenge) -> Vec<u8> {
    let mut m = PROOF_CONTEXT.to_vec();
    for part in [&challenge.plane_id, &challenge.nonce] {
        m.push(0);
        m.extend_from_slice(part.as_bytes());
    }
    m
}

/// The endpoint half.
pub struct Verifier {
    certificates: Certificates,
    registry: Arc<dyn Registry>,
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
    Error::Rejected(format!("aws instance identity document {why}"))
}

impl Verifier {
    /// A verifier trusting `certificates`, reading registrations from `registry`.
    pub fn new(certificates: Certificates, registry: Arc<dyn Registry>) -> Self {
        Self {
            certificates,
            registry,
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
                crate::detect::shown(&claimed.region),
                crate::detect::shown(&claimed.region)
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
            .registry
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

/// Verifies `proof` over the challenge with `public_key` (SPKI DER, Ed25519).
fn check_proof(public_key: &[u8], proof: &[u8], challenge: &Challenge) -> Result<PKey<Public>> {
    if public_key.is_empty() || proof.is_empty() {
        return Err(Error::Rejected(
            "aws credential has no agent key proof: upgrade gangplank-agent (it signs the endpoint's nonce with its instance key)".into(),
        ));
    }
    let key = PKey::public_key_from_der(public_key)
        .ok()
        .filter(|k| k.id() == Id::ED25519)
        .ok_or_else(|| Error::Rejected("aws credential's agent public key is not an Ed25519 key".into()))?;
    let ok = openssl::sign::Verifier::new_without_digest(&key)
        .and_then(|mut v| v.verify_oneshot(proof, &proof_message(challenge)))
        .unwrap_or(false);
    if !ok {
        return Err(Error::Rejected(
            "aws credential's proof is not a signature of this challenge by the agent's key".into(),
        ));
    }
    Ok(key)
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
/// whose identity is that instance. Returns the deleted entries.
pub async fn release(registry: &dyn Registry, instance_id: &str) -> Result<Vec<NamespacedName>> {
    let suffix = format!("/{instance_id}");
    let mut released = Vec::new();
    for entry in registry.managed_entries().await? {
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
            if registry.delete_entry(&key).await? {
                released.push(key);
            }
        }
    }
    Ok(released)
}

/// The agent half: IMDSv2 client and the instance key.
pub struct Provider {
    metadata: crate::detect::Metadata,
    key_path: PathBuf,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("base", &self.metadata.base)
            .field("key_path", &self.key_path)
            .finish()
    }
}

impl Provider {
    /// Talks to IMDS at `base` (default [`DEFAULT_IMDS_URL`]) and keeps the instance key at
    /// `key_path` (created on first use, mode 0600).
    pub fn new(base: Option<String>, key_path: impl Into<PathBuf>) -> Result<Self> {
        let key_path = key_path.into();
        if key_path.as_os_str().is_empty() {
            return Err(Error::Unavailable(
                "awsEc2.keyFile is empty: set it to where the agent keeps its instance key".into(),
            ));
        }
        Ok(Self {
            metadata: crate::detect::Metadata::new(base, DEFAULT_IMDS_URL, IMDS_TIMEOUT)?,
            key_path,
        })
    }

    async fn imds(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> Result<String> {
        let url = format!("{}{path}", self.metadata.base);
        let mut req = self.metadata.client.request(method, &url);
        req = match token {
            Some(t) => req.header("X-aws-ec2-metadata-token", t),
            None => req.header("X-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL.to_string()),
        };
        crate::detect::read_text(req, &url, "EC2 instance metadata (IMDSv2)").await
    }

    /// The document and its signature as IMDS serves them and, when `challenge` asks for
    /// one and the instance has an instance profile, the IAM role proof.
    async fn payload(&self, challenge: &Challenge) -> Result<Payload> {
        let token = self.imds(reqwest::Method::PUT, "/latest/api/token", None).await?;
        let document = self
            .imds(
                reqwest::Method::GET,
                "/latest/dynamic/instance-identity/document",
                Some(&token),
            )
            .await?;
        let rsa2048 = self
            .imds(
                reqwest::Method::GET,
                "/latest/dynamic/instance-identity/rsa2048",
                Some(&token),
            )
            .await?;
        // A broken instance profile costs the role fact, not the onboarding: policies that
        // list iamRoles refuse the instance, the others still admit it.
        let iam_role = if challenge.aws_sts_url.is_empty() {
            None
        } else {
            self.role_proof(&token, &document, challenge)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!("sending no IAM role proof: {e}");
                    None
                })
        };
        Ok(Payload {
            document,
            rsa2048,
            iam_role,
        })
    }

    /// A `GetCallerIdentity` request for the endpoint's STS URL, signed with the instance
    /// profile's credentials; `None` without an instance profile.
    async fn role_proof(
        &self,
        token: &str,
        document: &str,
        challenge: &Challenge,
    ) -> Result<Option<role::Proof>> {
        const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
        let fail = |why: String| Error::Unavailable(format!("instance profile credentials: {why}"));
        let url = format!("{}{CREDENTIALS}", self.metadata.base);
        let req = self
            .metadata
            .client
            .get(&url)
            .header("X-aws-ec2-metadata-token", token);
        let Some(roles) =
            crate::detect::read_text_or_none(req, &url, "EC2 instance metadata (IMDSv2)").await?
        else {
            return Ok(None);
        };
        let Some(role) = roles.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Ok(None);
        };
        if !role::is_role_name(role) {
            return Err(fail(format!(
                "IMDS names role {}, which is not an IAM role name",
                crate::detect::shown(role)
            )));
        }
        let json = self
            .imds(reqwest::Method::GET, &format!("{CREDENTIALS}{role}"), Some(token))
            .await?;
        let credentials = serde_json::from_str::<role::ImdsCredentials>(&json)
            .map_err(|e| fail(format!("IMDS answered with unexpected JSON ({e})")))?
            .into_credentials()
            .map_err(fail)?;
        #[derive(Deserialize)]
        struct Region {
            region: String,
        }
        let region = serde_json::from_str::<Region>(document)
            .map_err(|e| fail(format!("the instance identity document has no region ({e})")))?
            .region;
        let url = role::sts_url(&challenge.aws_sts_url, &region)
            .map_err(|e| fail(format!("the endpoint's STS URL {e}")))?;
        Ok(Some(role::sign(
            &credentials,
            &url,
            &region,
            &challenge.nonce,
            OffsetDateTime::now_utc(),
        )))
    }
}

/// Loads the instance key from `path`, creating it (Ed25519, PKCS#8 PEM, mode 0600) if absent.
pub fn load_or_create_key(path: &Path) -> Result<PKey<Private>> {
    let fail = |what: String| Error::Unavailable(format!("instance key {}: {what}", path.display()));
    match std::fs::read(path) {
        Ok(pem) => {
            return PKey::private_key_from_pem(&pem)
                .ok()
                .filter(|k| k.id() == Id::ED25519)
                .ok_or_else(|| {
                    fail(
                        "is not an Ed25519 private key in PEM: remove it only if this VM was re-imaged"
                            .into(),
                    )
                });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("cannot be read: {e}"))),
    }
    let key = PKey::generate_ed25519().map_err(|e| fail(format!("cannot be generated: {e}")))?;
    let pem = key
        .private_key_to_pem_pkcs8()
        .map_err(|e| fail(format!("cannot be encoded: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| fail(format!("cannot be written: {e}")))?;
        file.write_all(&pem)
            .and_then(|()| file.sync_all())
            .map_err(|e| fail(format!("cannot be written: {e}")))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| fail(format!("cannot be written: {e}")))?;
    Ok(key)
}

#[async_trait]
impl crate::Provider for Provider {
    fn kind(&self) -> &'static str {
        kind::AWS_EC2
    }

    async fn credential(&self, challenge: &Challenge) -> Result<proto::Credential> {
        let payload = self.payload(challenge).await?;
        let key = load_or_create_key(&self.key_path)?;
        let proof = openssl::sign::Signer::new_without_digest(&key)
            .and_then(|mut s| s.sign_oneshot_to_vec(&proof_message(challenge)))
            .map_err(|e| Error::Unavailable(format!("signing the challenge with the instance key: {e}")))?;
        let public_key = key
            .public_key_to_der()
            .map_err(|e| Error::Unavailable(format!("encoding the instance public key: {e}")))?;
        Ok(proto::Credential {
            kind: kind::AWS_EC2.into(),
            payload: serde_json::to_vec(&payload).map_err(|e| Error::Unavailable(e.to_string()))?,
            proof,
            public_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_certificate_parses() {
        let certs = Certificates::builtin();
        assert_eq!(certs.regions().count(), BUILTIN.len());
    }

    /// Each built-in certificate is AWS's self-signed RSA-2048 one, and is the very one the
    /// provenance table in data/README.md records (region and DER SHA-256), so the table and
    /// the files cannot drift apart.
    #[test]
    fn builtin_certificates_are_the_ones_data_readme_records() {
        let readme = include_str!("../data/README.md");
        let recorded: BTreeMap<&str, &str> = readme
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells.len() == 6 && cells[3].len() == 64).then(|| (cells[1], cells[3]))
            })
            .collect();
        assert_eq!(recorded.len(), BUILTIN.len(), "{recorded:?}");
        for (region, pem) in BUILTIN {
            let cert = X509::from_pem(pem.as_bytes()).expect(region);
            let subject: Vec<String> = cert
                .subject_name()
                .entries()
                .map(|e| e.data().to_string().unwrap_or_default())
                .collect();
            assert_eq!(
                subject,
                ["US", "Washington State", "Seattle", "Amazon Web Services LLC"],
                "{region}"
            );
            let key = cert.public_key().expect(region);
            assert_eq!((key.id(), key.bits()), (Id::RSA, 2048), "{region}");
            assert!(cert.verify(&key).expect(region), "{region} is not self-signed");
            let digest = cert.digest(openssl::hash::MessageDigest::sha256()).expect(region);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(recorded.get(region), Some(&hex.as_str()), "{region}");
            assert_eq!(
                recorded.get(region).map(|_| partition(region)),
                readme
                    .lines()
                    .find(|l| l.starts_with(&format!("| {region} |")))
                    .and_then(|l| l.split('|').nth(2))
                    .map(str::trim),
                "{region}"
            );
        }
    }

    /// A real document and RSA-2048 signature from an EC2 instance in ap-southeast-2 (see
    /// data/README.md), verified with the built-in certificate AWS publishes for that region.
    #[test]
    fn a_real_aws_document_verifies_with_the_builtin_certificate() {
        let document = include_bytes!("../data/aws/samples/ap-southeast-2.document.json");
        let signature = include_str!("../data/aws/samples/ap-southeast-2.rsa2048");
        let registry: Arc<dyn Registry> = Arc::new(NoRegistry);
        let verifier = Verifier::new(Certificates::builtin(), registry);
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
                include_bytes!("../data/aws/rsa2048/us-east-1.pem"),
            )
            .expect("pem");
        let err = Verifier::new(other, Arc::new(NoRegistry))
            .verify_document(document, signature)
            .expect_err("wrong region certificate");
        assert!(
            err.to_string()
                .contains("not made by AWS's certificate for region ap-southeast-2"),
            "{err}"
        );
    }

    /// A registry that must not be reached by document-only checks.
    struct NoRegistry;

    #[async_trait]
    impl Registry for NoRegistry {
        async fn workload_group(
            &self,
            _: &NamespacedName,
        ) -> gangplank_registry::Result<Option<gangplank_api::istio::WorkloadGroup>> {
            unreachable!("document checks read no registry")
        }
        async fn policies(
            &self,
            _: &str,
        ) -> gangplank_registry::Result<Vec<gangplank_api::policy::OnboardingPolicy>> {
            unreachable!("document checks read no registry")
        }
        async fn entry(
            &self,
            _: &NamespacedName,
        ) -> gangplank_registry::Result<Option<gangplank_api::istio::WorkloadEntry>> {
            unreachable!("document checks read no registry")
        }
        async fn managed_entries(
            &self,
        ) -> gangplank_registry::Result<Vec<gangplank_api::istio::WorkloadEntry>> {
            unreachable!("document checks read no registry")
        }
        async fn apply_entry(
            &self,
            _: &gangplank_api::istio::WorkloadEntry,
        ) -> gangplank_registry::Result<gangplank_api::istio::WorkloadEntry> {
            unreachable!("document checks write nothing")
        }
        async fn annotate_entry(
            &self,
            _: &NamespacedName,
            _: &gangplank_registry::AnnotationPatch,
        ) -> gangplank_registry::Result<()> {
            unreachable!("document checks write nothing")
        }
        async fn set_entry_status(
            &self,
            _: &NamespacedName,
            _: &serde_json::Value,
        ) -> gangplank_registry::Result<()> {
            unreachable!("document checks write nothing")
        }
        async fn delete_entry(&self, _: &NamespacedName) -> gangplank_registry::Result<bool> {
            unreachable!("document checks write nothing")
        }
        async fn create_join_token(
            &self,
            _: &gangplank_api::token::JoinToken,
        ) -> gangplank_registry::Result<()> {
            unreachable!("document checks write nothing")
        }
        async fn join_token(
            &self,
            _: &NamespacedName,
        ) -> gangplank_registry::Result<Option<gangplank_api::token::JoinToken>> {
            unreachable!("document checks read no registry")
        }
        async fn consume_join_token(
            &self,
            _: &NamespacedName,
            _: &str,
            _: time::OffsetDateTime,
        ) -> gangplank_registry::Result<gangplank_api::token::JoinToken> {
            unreachable!("document checks write nothing")
        }
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
        let err = bad.verifier(Arc::new(NoRegistry)).expect_err("not http(s)");
        assert!(err.to_string().starts_with("awsEc2.sts: url"), "{err}");
    }

    #[test]
    fn partitions_follow_regions() {
        assert_eq!(partition("us-east-1"), "aws");
        assert_eq!(partition("cn-north-1"), "aws-cn");
        assert_eq!(partition("us-gov-west-1"), "aws-us-gov");
        assert_eq!(partition("eusc-de-east-1"), "aws-eusc");
    }
}
