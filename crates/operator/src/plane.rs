//! The `OnboardingPlane` custom resource (`onboarding.gangplank.dev/v1alpha1`): what a platform
//! engineer writes to get a running `gangplank-endpoint`, and the status the operator reports.
//!
//! The schema refuses what it can at `kubectl apply` time (no hosts, zero replicas, a duration
//! that is not one); [`PlaneSpec::validate`] checks the rest (how values relate, what the
//! endpoint itself would refuse) before the reconciler creates anything.

use std::time::Duration;

use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the plane (and of the endpoint's configuration).
pub const GROUP: &str = "onboarding.gangplank.dev";

/// A duration as the endpoint's configuration writes it: `90s`, `10m`, `1h30m`.
const DURATION: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// A DNS name as the endpoint's certificate carries it: lowercase RFC 1123 labels.
const DNS_NAME: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The shortest sidecar token Kubernetes' TokenRequest issues (the endpoint refuses less).
const TOKEN_REQUEST_MINIMUM: Duration = Duration::from_secs(600);

/// The desired onboarding plane: one `gangplank-endpoint` Deployment and what it needs.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "onboarding.gangplank.dev",
    version = "v1alpha1",
    kind = "OnboardingPlane",
    namespaced,
    status = "PlaneStatus",
    shortname = "plane",
    doc = "An onboarding plane: the gangplank-endpoint Deployment VMs join the mesh through, reconciled by gangplank-operator.",
    // Raw JSON columns: the `printcolumn(type_ = ...)` form repeats `type_`, which clippy's
    // duplicated_attributes misreads.
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"}"#,
    printcolumn = r#"{"name": "Address", "type": "string", "jsonPath": ".status.address"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PlaneSpec {
    /// DNS names agents reach the endpoint at (its certificate's SANs); the first is the
    /// issuer of the sidecar tokens it mints.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 253), regex(pattern = DNS_NAME)))]
    pub hosts: Vec<String>,
    /// Endpoint replicas.
    #[serde(default = "defaults::replicas")]
    #[schemars(range(min = 1, max = 50))]
    pub replicas: i32,
    /// The endpoint's image; default `gangplank-endpoint:<the operator's version>`, so an
    /// operator upgrade rolls the planes that do not pin one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The plane's ID, which agents bind their credentials to (JWT audience); default: the
    /// plane's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub plane_id: Option<String>,
    /// The endpoint container's resources; default: requests 100m CPU and 64Mi, limit 256Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Which credentials the endpoint accepts.
    #[serde(default)]
    pub identities: Identities,
    /// The `istio-token` the endpoint mints for sidecars.
    #[serde(default)]
    pub sidecar_token: SidecarToken,
    /// Registration lifecycle.
    #[serde(default)]
    pub workloads: Workloads,
    /// The Istio control plane.
    #[serde(default)]
    pub mesh: Mesh,
    /// The serving certificate (default: issued by the operator).
    #[serde(default)]
    pub tls: Tls,
}

/// `resources`: quantities as Kubernetes writes them (`100m`, `64Mi`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Requests by resource name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub requests: std::collections::BTreeMap<String, String>,
    /// Limits by resource name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub limits: std::collections::BTreeMap<String, String>,
}

/// `identities`, as the endpoint's configuration names them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Identities {
    /// Accept join tokens (`gangplank token create`).
    #[serde(default)]
    pub join_tokens: bool,
    /// Accept OIDC JWTs from these issuers.
    #[serde(default)]
    pub jwt: Jwt,
    /// Accept AWS EC2 instance identity documents (present, even `{}`: on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_ec2: Option<AwsEc2>,
    /// Accept GCP GCE instance identity tokens (present, even `{}`: on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp_gce: Option<GcpGce>,
    /// Accept Azure VM attested documents (present, even `{}`: on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_vm: Option<AzureVm>,
}

/// `identities.awsEc2`, as the endpoint's configuration has it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsEc2 {
    /// How long after the instance's `pendingTime` a first join is accepted (default 15m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub first_join_window: Option<String>,
    /// How instance profile IAM roles are verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts: Option<Sts>,
}

/// `identities.awsEc2.sts`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sts {
    /// Verify IAM roles (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The STS URL; `{region}` is replaced by the instance's region (default
    /// `https://sts.{region}.amazonaws.com/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https://"))]
    pub url: Option<String>,
    /// How long to wait for STS (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub timeout: Option<String>,
}

/// `identities.gcpGce`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcpGce {
    /// Google's JWKS URL, overridden (air-gapped mirrors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https://"))]
    pub jwks_url: Option<String>,
    /// How old a token may be (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub max_age: Option<String>,
}

/// `identities.azureVm`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureVm {
    /// Accepted signer names (default: the public and sovereign clouds').
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signer_names: Vec<String>,
    /// How old a document may be (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub max_age: Option<String>,
    /// Hosts the signer's issuing CA may be fetched from (default `www.microsoft.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_hosts: Option<Vec<String>>,
}

/// `identities.jwt`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Jwt {
    /// Trusted issuers.
    #[serde(default)]
    pub issuers: Vec<Issuer>,
}

/// One trusted OIDC issuer: its keys from `jwksUri`, or from its discovery document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Issuer {
    /// The issuer, exactly as in the tokens' `iss`.
    #[schemars(length(min = 1))]
    pub issuer: String,
    /// Where its JWKS is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Find the JWKS through `<issuer>/.well-known/openid-configuration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<bool>,
}

/// `sidecarToken`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarToken {
    /// Lifetime of each `istio-token` (at least 10m: Kubernetes' TokenRequest refuses less).
    #[serde(default = "defaults::token_lifetime")]
    #[schemars(regex(pattern = DURATION))]
    pub lifetime: String,
}

impl Default for SidecarToken {
    fn default() -> Self {
        Self {
            lifetime: defaults::token_lifetime(),
        }
    }
}

/// `workloads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workloads {
    /// How long an agent may stay disconnected before its entry is removed.
    #[serde(default = "defaults::grace_period")]
    #[schemars(regex(pattern = DURATION))]
    pub grace_period: String,
    /// How long a leaving agent waits before stopping its sidecar (traffic drains).
    #[serde(default = "defaults::propagation_delay")]
    #[schemars(regex(pattern = DURATION))]
    pub propagation_delay: String,
    /// Whether istiod sends a VM traffic only while its sidecar is healthy.
    #[serde(default = "defaults::health_checks")]
    pub health_checks: bool,
}

impl Default for Workloads {
    fn default() -> Self {
        Self {
            grace_period: defaults::grace_period(),
            propagation_delay: defaults::propagation_delay(),
            health_checks: defaults::health_checks(),
        }
    }
}

/// `mesh`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mesh {
    /// Istio's namespace.
    #[serde(default = "defaults::istio_namespace")]
    #[schemars(length(min = 1))]
    pub istio_namespace: String,
    /// istiod's revision ("" for the default).
    #[serde(default)]
    pub revision: String,
}

impl Default for Mesh {
    fn default() -> Self {
        Self {
            istio_namespace: defaults::istio_namespace(),
            revision: String::new(),
        }
    }
}

/// `tls`: where the serving certificate comes from: a Secret you name, a cert-manager
/// Certificate, or (neither set, the default) a certificate the operator issues and renews
/// from a CA it keeps in a Secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.secretName) && has(self.certManager)) && !(has(self.secretName) && has(self.issued)) && !(has(self.certManager) && has(self.issued))").message("spec.tls: set at most one of secretName, certManager and issued"))]
pub struct Tls {
    /// A `kubernetes.io/tls` Secret in the plane's namespace (`tls.crt`, `tls.key`), kept
    /// by you; a new certificate in it rolls the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Have cert-manager issue it: the operator writes a Certificate for the hosts
    /// (cert-manager's CRDs must be installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_manager: Option<CertManager>,
    /// Have the operator issue it (the default): from a CA kept in Secret
    /// `<plane>-endpoint-ca`, published for agents in ConfigMap `<plane>-endpoint-ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<Issued>,
}

/// `tls.certManager`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertManager {
    /// The cert-manager issuer.
    pub issuer_ref: IssuerRef,
}

/// A cert-manager issuer reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// The issuer's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// `Issuer` (in the plane's namespace) or `ClusterIssuer`.
    #[serde(default = "defaults::issuer_kind")]
    #[schemars(regex(pattern = r"^(Issuer|ClusterIssuer)$"))]
    pub kind: String,
    /// The issuer's API group.
    #[serde(default = "defaults::issuer_group")]
    pub group: String,
}

/// `tls.issued`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    /// How long each serving certificate is valid.
    #[serde(default = "defaults::validity")]
    #[schemars(regex(pattern = DURATION))]
    pub validity: String,
    /// How long before it expires it is renewed (at most two thirds of `validity`).
    #[serde(default = "defaults::renew_before")]
    #[schemars(regex(pattern = DURATION))]
    pub renew_before: String,
}

impl Default for Issued {
    fn default() -> Self {
        Self {
            validity: defaults::validity(),
            renew_before: defaults::renew_before(),
        }
    }
}

/// Where a valid spec's serving certificate comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TlsSource {
    /// The user's Secret.
    Secret(String),
    /// A cert-manager Certificate writing `<plane>-endpoint-tls`.
    CertManager(IssuerRef),
    /// Issued by the operator into `<plane>-endpoint-tls`.
    Issued {
        /// Each certificate's validity.
        validity: Duration,
        /// Renewed this long before it expires.
        renew_before: Duration,
    },
}

/// What the operator observed, in the plane's status subresource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlaneStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Where agents reach the endpoint inside the cluster: `<service>.<namespace>.svc:15443`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Endpoint pods ready, from the Deployment's status.
    #[serde(default)]
    pub ready_replicas: i32,
    /// The Secret the endpoint serves its certificate from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// The ConfigMap (key `ca.crt`) with the CA agents trust the endpoint by (their
    /// `caBundle`), when the operator or cert-manager issues the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map: Option<String>,
}

/// A condition, as `metav1.Condition` has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Why, in one PascalCase word.
    pub reason: String,
    /// What is wrong and what to change.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Every default of the spec, in one place.
pub mod defaults {
    /// Two, so a disruption leaves one serving.
    pub fn replicas() -> i32 {
        2
    }
    /// `gangplank-endpoint:<this crate's version>`.
    pub fn image() -> String {
        format!("gangplank-endpoint:{}", env!("CARGO_PKG_VERSION"))
    }
    /// One hour, as the endpoint's default.
    pub fn token_lifetime() -> String {
        "1h".into()
    }
    /// Five minutes, as the endpoint's default.
    pub fn grace_period() -> String {
        "5m".into()
    }
    /// Ten seconds, as the endpoint's default.
    pub fn propagation_delay() -> String {
        "10s".into()
    }
    /// On: the endpoint registers through the Kubernetes API, whose status istiod reads.
    pub fn health_checks() -> bool {
        true
    }
    /// `istio-system`.
    pub fn istio_namespace() -> String {
        "istio-system".into()
    }
    /// A namespaced cert-manager `Issuer`.
    pub fn issuer_kind() -> String {
        "Issuer".into()
    }
    /// cert-manager's group.
    pub fn issuer_group() -> String {
        "cert-manager.io".into()
    }
    /// 90 days, as cert-manager's default.
    pub fn validity() -> String {
        "2160h".into()
    }
    /// 30 days, as cert-manager's default (a third of the validity).
    pub fn renew_before() -> String {
        "720h".into()
    }
}

/// Why a plane's spec cannot be reconciled, and what to change (shown in `Degraded`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// No hosts.
    #[error("spec.hosts: list at least one DNS name agents reach the endpoint at")]
    NoHosts,
    /// A host that is not a DNS name.
    #[error("spec.hosts: {0:?} is not a DNS name: use lowercase letters, digits, '-' and '.'")]
    Host(String),
    /// Fewer than one replica.
    #[error("spec.replicas: {0} is below 1: set at least 1 (2 keeps the plane up through a disruption)")]
    Replicas(i32),
    /// A duration that does not parse.
    #[error("{field}: {value:?} is not a duration: write it as 90s, 10m or 1h30m")]
    Duration {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// A sidecar token lifetime TokenRequest refuses.
    #[error(
        "spec.sidecarToken.lifetime: {0} is shorter than 10m, which Kubernetes' TokenRequest refuses: set at least 10m"
    )]
    TokenLifetime(String),
    /// A zero grace period.
    #[error(
        "spec.workloads.gracePeriod: must be longer than the endpoint's 10s heartbeat (5m is the default)"
    )]
    GracePeriod,
    /// No credential kind.
    #[error(
        "spec.identities: no credential kind is enabled: set joinTokens: true, add jwt.issuers, or add awsEc2: {{}}, gcpGce: {{}} or azureVm: {{}}"
    )]
    NoIdentities,
    /// An issuer with no (or two) key sources.
    #[error("spec.identities.jwt.issuers[{0}]: set exactly one of jwksUri: URL or discovery: true")]
    IssuerKeys(usize),
    /// A plane name its children's names cannot be made from.
    #[error(
        "metadata.name: {0:?} makes child names Kubernetes refuses: use at most 54 lowercase letters, digits and '-', starting with a letter (the Service is <name>-endpoint)"
    )]
    Name(String),
    /// No TLS Secret.
    #[error("spec.tls.secretName: name a kubernetes.io/tls Secret in the plane's namespace")]
    TlsSecret,
    /// More than one certificate source.
    #[error("spec.tls: set at most one of secretName, certManager and issued")]
    TlsSources,
    /// A renewal window not shorter than the validity.
    #[error(
        "spec.tls.issued: renewBefore ({renew_before}) must be at most two thirds of validity ({validity}), and validity at least 1h (defaults: 2160h and 720h)"
    )]
    Renewal {
        /// The validity.
        validity: String,
        /// The renewal window.
        renew_before: String,
    },
    /// An issuer kind cert-manager does not have.
    #[error("spec.tls.certManager.issuerRef.kind: {0:?} is not Issuer or ClusterIssuer")]
    IssuerKind(String),
}

/// A spec checked by [`PlaneSpec::validate`]: what the children are rendered from.
#[derive(Debug, Clone, PartialEq)]
pub struct Valid {
    /// The spec, as written.
    pub spec: PlaneSpec,
    /// The image, defaulted.
    pub image: String,
    /// Where the serving certificate comes from.
    pub tls: TlsSource,
}

fn duration(field: &'static str, value: &str) -> Result<Duration, Invalid> {
    let invalid = || Invalid::Duration {
        field,
        value: value.to_owned(),
    };
    if !regex::Regex::new(DURATION).is_ok_and(|r| r.is_match(value)) {
        return Err(invalid());
    }
    humantime::parse_duration(value).map_err(|_| invalid())
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Checks that `<name>-endpoint` is a DNS-1035 label (the Service's name rule, the strictest
/// of the children's).
pub fn validate_name(name: &str) -> Result<(), Invalid> {
    let ok = name.len() <= 54
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Invalid::Name(name.to_owned()))
    }
}

impl PlaneSpec {
    /// Checks what the schema cannot (or what a stale CRD let through), first problem first.
    pub fn validate(&self) -> Result<Valid, Invalid> {
        if self.hosts.is_empty() {
            return Err(Invalid::NoHosts);
        }
        if let Some(h) = self.hosts.iter().find(|h| !is_dns_name(h)) {
            return Err(Invalid::Host(h.clone()));
        }
        if self.replicas < 1 {
            return Err(Invalid::Replicas(self.replicas));
        }
        let lifetime = duration("spec.sidecarToken.lifetime", &self.sidecar_token.lifetime)?;
        if lifetime < TOKEN_REQUEST_MINIMUM {
            return Err(Invalid::TokenLifetime(self.sidecar_token.lifetime.clone()));
        }
        let grace = duration("spec.workloads.gracePeriod", &self.workloads.grace_period)?;
        if grace <= Duration::from_secs(10) {
            return Err(Invalid::GracePeriod);
        }
        duration(
            "spec.workloads.propagationDelay",
            &self.workloads.propagation_delay,
        )?;
        let ids = &self.identities;
        if !ids.join_tokens
            && ids.jwt.issuers.is_empty()
            && ids.aws_ec2.is_none()
            && ids.gcp_gce.is_none()
            && ids.azure_vm.is_none()
        {
            return Err(Invalid::NoIdentities);
        }
        for (i, issuer) in ids.jwt.issuers.iter().enumerate() {
            if issuer.jwks_uri.is_some() == issuer.discovery.unwrap_or(false) {
                return Err(Invalid::IssuerKeys(i));
            }
        }
        if let Some(aws) = &ids.aws_ec2 {
            if let Some(w) = &aws.first_join_window {
                duration("spec.identities.awsEc2.firstJoinWindow", w)?;
            }
            if let Some(t) = aws.sts.as_ref().and_then(|s| s.timeout.as_ref()) {
                duration("spec.identities.awsEc2.sts.timeout", t)?;
            }
        }
        if let Some(a) = ids.gcp_gce.as_ref().and_then(|g| g.max_age.as_ref()) {
            duration("spec.identities.gcpGce.maxAge", a)?;
        }
        if let Some(a) = ids.azure_vm.as_ref().and_then(|z| z.max_age.as_ref()) {
            duration("spec.identities.azureVm.maxAge", a)?;
        }
        let tls = match (&self.tls.secret_name, &self.tls.cert_manager, &self.tls.issued) {
            (Some(name), None, None) if name.is_empty() => return Err(Invalid::TlsSecret),
            (Some(name), None, None) => TlsSource::Secret(name.clone()),
            (None, Some(cm), None) => {
                if !matches!(cm.issuer_ref.kind.as_str(), "Issuer" | "ClusterIssuer") {
                    return Err(Invalid::IssuerKind(cm.issuer_ref.kind.clone()));
                }
                TlsSource::CertManager(cm.issuer_ref.clone())
            }
            (None, None, issued) => {
                let issued = issued.clone().unwrap_or_default();
                let validity = duration("spec.tls.issued.validity", &issued.validity)?;
                let renew_before = duration("spec.tls.issued.renewBefore", &issued.renew_before)?;
                if renew_before.as_secs_f64() > validity.as_secs_f64() * 2.0 / 3.0
                    || validity < Duration::from_secs(3600)
                {
                    return Err(Invalid::Renewal {
                        validity: issued.validity,
                        renew_before: issued.renew_before,
                    });
                }
                TlsSource::Issued {
                    validity,
                    renew_before,
                }
            }
            _ => return Err(Invalid::TlsSources),
        };
        Ok(Valid {
            spec: self.clone(),
            image: self.image.clone().unwrap_or_else(defaults::image),
            tls,
        })
    }
}
