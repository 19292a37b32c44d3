//! The endpoint's serving certificate, from whichever source the plane names
//! ([`crate::plane::TlsSource`]):
//!
//! - **a Secret you keep**: read, checked for `tls.crt` and `tls.key`;
//! - **cert-manager**: a `Certificate` (`cert-manager.io/v1`) for the hosts, owned by the plane,
//!   writing `<plane>-endpoint-tls`; when cert-manager's CRDs are absent the plane is
//!   `Degraded` (`CertManagerMissing`) and nothing is written for it;
//! - **issued by the operator** (the default): a CA created once in Secret
//!   `<plane>-endpoint-ca` (ECDSA P-256, ten years, never rewritten), a serving certificate
//!   signed by it in `<plane>-endpoint-tls`, renewed `renewBefore` its expiry, when the hosts
//!   change, or when the Secret no longer holds what the operator wrote (its annotations
//!   record the hosts, the expiry, the CA's and the certificate's digests).
//!
//! Agents trust the endpoint by the CA published in ConfigMap `<plane>-endpoint-ca`
//! (`ca.crt`), for the operator's CA and for cert-manager issuers that fill `ca.crt`. Every
//! source reports the digest of the certificate served, which is part of the pod template's
//! hash: a new certificate rolls the endpoint.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::controller::{Error, MANAGER, is_not_found, kube_err};
use crate::plane::{IssuerRef, OnboardingPlane, TlsSource, Valid};
use crate::render;

/// Annotation on an issued serving Secret: the hosts it is for (comma-separated).
pub const ISSUED_HOSTS: &str = "onboarding.gangplank.dev/issued-hosts";
/// Annotation: when the certificate expires (RFC 3339).
pub const ISSUED_NOT_AFTER: &str = "onboarding.gangplank.dev/issued-not-after";
/// Annotation: SHA-256 of the CA certificate that signed it.
pub const ISSUED_CA: &str = "onboarding.gangplank.dev/issued-ca-sha256";
/// Annotation: SHA-256 of `tls.crt` as written.
pub const ISSUED_CERT: &str = "onboarding.gangplank.dev/issued-cert-sha256";
/// cert-manager's Certificate CRD.
pub const CERT_MANAGER_CRD: &str = "certificates.cert-manager.io";

/// What the reconciler needs to know about the serving certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    /// The Secret the endpoint mounts.
    pub secret_name: String,
    /// The ConfigMap with `ca.crt`, when one is published.
    pub ca_config_map: Option<String>,
    /// SHA-256 of the served `tls.crt`, when the Secret holds one.
    pub cert_digest: Option<String>,
    /// Why the plane is degraded: (reason, message).
    pub problem: Option<(&'static str, String)>,
    /// When to look again (an issued certificate's renewal).
    pub recheck: Option<Duration>,
}

/// The names of a plane's certificate objects.
pub fn names(plane: &str) -> (String, String) {
    (format!("{plane}-endpoint-tls"), format!("{plane}-endpoint-ca"))
}

/// The Secret a plane's endpoint serves from, as its spec names it (valid or not).
pub fn served_from(plane: &OnboardingPlane) -> String {
    plane
        .spec
        .tls
        .secret_name
        .clone()
        .unwrap_or_else(|| names(&plane.name_any()).0)
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|b| format!("{b:02x}")).collect()
}

fn data<'a>(s: &'a Secret, key: &str) -> Option<&'a [u8]> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| v.0.as_slice())
        .filter(|v| !v.is_empty())
}

/// Makes sure the plane's serving certificate exists (issuing or requesting it as the spec
/// says) and reports on it.
pub async fn ensure(plane: &OnboardingPlane, valid: &Valid, client: &Client) -> Result<Serving, Error> {
    let ns = plane.namespace().unwrap_or_default();
    let name = plane.name_any();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = served_from(plane);
    let read = |n: String| {
        let secrets = secrets.clone();
        let ns = ns.clone();
        async move {
            secrets
                .get_opt(&n)
                .await
                .map_err(kube_err(format!("reading Secret {ns}/{n}")))
        }
    };
    let mut serving = Serving {
        secret_name: secret_name.clone(),
        ca_config_map: None,
        cert_digest: None,
        problem: None,
        recheck: None,
    };
    if !matches!(valid.tls, TlsSource::CertManager(_)) {
        remove_certificate(plane, client).await?;
    }
    match &valid.tls {
        TlsSource::Secret(_) => {
            check_secret(
                &ns,
                read(secret_name.clone()).await?.as_ref(),
                &mut serving,
                "create it (kubernetes.io/tls, with tls.crt and tls.key), or fix spec.tls.secretName",
            );
        }
        TlsSource::CertManager(issuer) => {
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            let installed = crds
                .get_opt(CERT_MANAGER_CRD)
                .await
                .map_err(kube_err(format!(
                    "reading CustomResourceDefinition {CERT_MANAGER_CRD}"
                )))?
                .is_some();
            if !installed {
                serving.problem = Some((
                    "CertManagerMissing",
                    format!(
                        "spec.tls.certManager: cert-manager is not installed (no CRD {CERT_MANAGER_CRD}): install cert-manager, name a Secret in spec.tls.secretName, or drop spec.tls to have the operator issue the certificate"
                    ),
                ));
                return Ok(serving);
            }
            apply_certificate(plane, valid, issuer, &secret_name, client).await?;
            let secret = read(secret_name.clone()).await?;
            check_secret(
                &ns,
                secret.as_ref(),
                &mut serving,
                "cert-manager has not issued it yet: see `kubectl describe certificate` for why",
            );
            if let Some(ca) = secret.as_ref().and_then(|s| data(s, "ca.crt")) {
                serving.ca_config_map = Some(publish_ca(plane, ca, client).await?);
            }
        }
        TlsSource::Issued {
            validity,
            renew_before,
        } => {
            let (ca_cert, ca_key) = ensure_ca(plane, client).await?;
            let now = OffsetDateTime::now_utc();
            let current = read(secret_name.clone()).await?;
            let renew_at = current
                .as_ref()
                .and_then(|s| still_good(s, &valid.spec.hosts, &ca_cert))
                .map(|not_after| not_after - *renew_before);
            let (renew_at, secret) = match renew_at {
                Some(at) if at > now => (at, current),
                _ => {
                    let (not_after, written) =
                        issue(plane, valid, &secret_name, &ca_cert, &ca_key, *validity, client).await?;
                    tracing::info!(plane = %name, namespace = %ns, secret = %secret_name, %not_after, "serving certificate issued");
                    (not_after - *renew_before, Some(written))
                }
            };
            let wait = (renew_at - now).max(time::Duration::ZERO);
            serving.recheck = Some(Duration::try_from(wait).unwrap_or(Duration::from_secs(300)));
            check_secret(
                &ns,
                secret.as_ref(),
                &mut serving,
                "the operator writes it: see its log",
            );
            serving.ca_config_map = Some(publish_ca(plane, ca_cert.as_bytes(), client).await?);
        }
    }
    Ok(serving)
}

/// Records the Secret's certificate digest, or why it cannot be served.
fn check_secret(ns: &str, secret: Option<&Secret>, serving: &mut Serving, fix: &str) {
    let name = &serving.secret_name;
    match secret {
        None => {
            serving.problem = Some((
                "TLSSecretMissing",
                format!("Secret {ns}/{name} does not exist: {fix}"),
            ));
        }
        Some(s) => match (data(s, "tls.crt"), data(s, "tls.key")) {
            (Some(crt), Some(_)) => serving.cert_digest = Some(sha256(crt)),
            _ => {
                serving.problem = Some((
                    "TLSSecretInvalid",
                    format!(
                        "Secret {ns}/{name} has no tls.crt and tls.key: make it a kubernetes.io/tls Secret"
                    ),
                ));
            }
        },
    }
}

/// When an issued Secret's certificate expires, if it is still what the operator wrote for
/// these hosts and this CA; `None` when it must be issued again.
fn still_good(secret: &Secret, hosts: &[String], ca_cert: &str) -> Option<OffsetDateTime> {
    let a = secret.metadata.annotations.as_ref()?;
    let crt = data(secret, "tls.crt")?;
    data(secret, "tls.key")?;
    (a.get(ISSUED_HOSTS)? == &hosts.join(",")
        && a.get(ISSUED_CA)? == &sha256(ca_cert.as_bytes())
        && a.get(ISSUED_CERT)? == &sha256(crt))
        .then_some(())?;
    OffsetDateTime::parse(a.get(ISSUED_NOT_AFTER)?, &Rfc3339).ok()
}

/// The CA's parameters, the same every time for a plane: issuing needs only its name and key.
fn ca_params(ns: &str, plane: &str) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("gangplank-endpoint CA {ns}/{plane}"));
    dn.push(DnType::OrganizationName, "gangplank-operator");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn cert_err(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

/// The plane's CA (certificate PEM, key PEM): read, or created once.
async fn ensure_ca(plane: &OnboardingPlane, client: &Client) -> Result<(String, String), Error> {
    let ns = plane.namespace().unwrap_or_default();
    let name = plane.name_any();
    let ca_name = names(&name).1;
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pem = |s: &Secret| -> Option<(String, String)> {
        let c = String::from_utf8(data(s, "tls.crt")?.to_vec()).ok()?;
        let k = String::from_utf8(data(s, "tls.key")?.to_vec()).ok()?;
        Some((c, k))
    };
    if let Some(s) = api
        .get_opt(&ca_name)
        .await
        .map_err(kube_err(format!("reading Secret {ns}/{ca_name}")))?
    {
        return pem(&s).ok_or_else(|| {
            Error::Certificate(format!(
                "Secret {ns}/{ca_name} (the plane's CA) has no tls.crt and tls.key: delete it to have a new CA made (agents must then trust the new ca.crt)"
            ))
        });
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut params = ca_params(&ns, &name)?;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key).map_err(cert_err)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": ca_name, "namespace": ns, "labels": render::labels(&ns, &name),
                     "ownerReferences": [render::owner(plane)]},
        "stringData": {"tls.crt": cert_pem, "tls.key": key_pem},
    }))
    .map_err(|e| Error::Certificate(e.to_string()))?;
    let pp = PostParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, &secret).await {
        Ok(_) => {
            tracing::info!(plane = %name, namespace = %ns, secret = %ca_name, "plane CA created");
            Ok((cert_pem, key_pem))
        }
        // Created meanwhile: use that one.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = api
                .get(&ca_name)
                .await
                .map_err(kube_err(format!("reading Secret {ns}/{ca_name}")))?;
            pem(&s).ok_or_else(|| {
                Error::Certificate(format!("Secret {ns}/{ca_name} has no tls.crt and tls.key"))
            })
        }
        Err(e) => Err(kube_err(format!("creating Secret {ns}/{ca_name}"))(e)),
    }
}

/// Issues a serving certificate for the hosts into `secret_name`; returns when it expires,
/// and the Secret as written.
async fn issue(
    plane: &OnboardingPlane,
    valid: &Valid,
    secret_name: &str,
    ca_cert: &str,
    ca_key: &str,
    validity: Duration,
    client: &Client,
) -> Result<(OffsetDateTime, Secret), Error> {
    let ns = plane.namespace().unwrap_or_default();
    let name = plane.name_any();
    let hosts = &valid.spec.hosts;
    let issuer = Issuer::new(
        ca_params(&ns, &name)?,
        KeyPair::from_pem(ca_key).map_err(cert_err)?,
    );
    let mut params = CertificateParams::new(hosts.clone()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    if let Some(cn) = common_name(&hosts[0]) {
        dn.push(DnType::CommonName, cn);
    }
    params.distinguished_name = dn;
    // Names the signing key, so verifiers find the CA by key as well as by name.
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    let not_after = (now + validity).replace_nanosecond(0).unwrap_or(now + validity);
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = not_after;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
    let crt = cert.pem();
    let annotations = BTreeMap::from([
        (ISSUED_HOSTS, hosts.join(",")),
        (ISSUED_NOT_AFTER, not_after.format(&Rfc3339).unwrap_or_default()),
        (ISSUED_CA, sha256(ca_cert.as_bytes())),
        (ISSUED_CERT, sha256(crt.as_bytes())),
    ]);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": secret_name, "namespace": ns, "labels": render::labels(&ns, &name),
                     "annotations": annotations, "ownerReferences": [render::owner(plane)]},
        "data": {"tls.crt": ByteString(crt.into_bytes()), "tls.key": ByteString(key.serialize_pem().into_bytes()),
                 "ca.crt": ByteString(ca_cert.as_bytes().to_vec())},
    }))
    .map_err(|e| Error::Certificate(e.to_string()))?;
    let written = Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            secret_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(kube_err(format!("applying Secret {ns}/{secret_name}")))?;
    Ok((not_after, written))
}

/// Publishes `ca` (PEM) in ConfigMap `<plane>-endpoint-ca` under `ca.crt`; returns its name.
async fn publish_ca(plane: &OnboardingPlane, ca: &[u8], client: &Client) -> Result<String, Error> {
    let ns = plane.namespace().unwrap_or_default();
    let name = plane.name_any();
    let cm_name = names(&name).1;
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": cm_name, "namespace": ns, "labels": render::labels(&ns, &name),
                     "ownerReferences": [render::owner(plane)]},
        "data": {"ca.crt": String::from_utf8_lossy(ca)},
    }))
    .map_err(|e| Error::Certificate(e.to_string()))?;
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(&cm_name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&cm))
        .await
        .map_err(kube_err(format!("applying ConfigMap {ns}/{cm_name}")))?;
    Ok(cm_name)
}

/// Deletes the plane's cert-manager Certificate, if any: after a switch to another source it
/// would keep writing `<plane>-endpoint-tls` against the operator. Gone already, or no
/// cert-manager at all, is fine.
async fn remove_certificate(plane: &OnboardingPlane, client: &Client) -> Result<(), Error> {
    let ns = plane.namespace().unwrap_or_default();
    let name = format!("{}-endpoint", plane.name_any());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &certificate_resource());
    match api.delete(&name, &kube::api::DeleteParams::background()).await {
        Ok(_) => {
            tracing::info!(plane = %plane.name_any(), namespace = %ns, "cert-manager Certificate of a former spec.tls removed");
            Ok(())
        }
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err(format!("deleting Certificate {ns}/{name}"))(e)),
    }
}

/// A common name, when the host fits RFC 5280's 64 characters (cert-manager refuses longer);
/// the SANs carry the names either way.
fn common_name(host: &str) -> Option<&str> {
    (host.len() <= 64).then_some(host)
}

/// The cert-manager `Certificate` kind.
pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

/// The plane's cert-manager Certificate.
pub fn certificate(
    plane: &OnboardingPlane,
    valid: &Valid,
    issuer: &IssuerRef,
    secret_name: &str,
) -> DynamicObject {
    let ns = plane.namespace().unwrap_or_default();
    let name = plane.name_any();
    let mut obj = DynamicObject::new(&format!("{name}-endpoint"), &certificate_resource()).within(&ns);
    obj.metadata.labels = serde_json::from_value(render::labels(&ns, &name)).ok();
    obj.metadata.owner_references = Some(vec![render::owner(plane)]);
    obj.data = json!({"spec": {
        "secretName": secret_name,
        "dnsNames": valid.spec.hosts,
        "issuerRef": {"name": issuer.name, "kind": issuer.kind, "group": issuer.group},
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        "usages": ["server auth", "digital signature"],
        "secretTemplate": {"labels": render::labels(&ns, &name)},
    }});
    if let Some(cn) = common_name(&valid.spec.hosts[0]) {
        obj.data["spec"]["commonName"] = json!(cn);
    }
    obj
}

async fn apply_certificate(
    plane: &OnboardingPlane,
    valid: &Valid,
    issuer: &IssuerRef,
    secret_name: &str,
    client: &Client,
) -> Result<(), Error> {
    let ns = plane.namespace().unwrap_or_default();
    let obj = certificate(plane, valid, issuer, secret_name);
    let name = obj.name_any();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &certificate_resource());
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj))
        .await
        .map_err(kube_err(format!("applying Certificate {ns}/{name}")))?;
    Ok(())
}
