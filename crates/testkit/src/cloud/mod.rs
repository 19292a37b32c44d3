//! Local emulators of the cloud metadata services, serving their real wire format on
//! `127.0.0.1:0` (plain HTTP, like the real link-local services), signing with test keys.
//!
//! - [`aws::Imds`]: EC2 IMDSv2 (session tokens, instance identity document, RSA-2048 PKCS#7,
//!   instance profile role credentials), and [`aws::Sts`]: STS `GetCallerIdentity`,
//!   authenticating SigV4 with the credentials IMDS handed out;
//! - [`gcp::MetadataServer`]: the GCE metadata server's identity tokens and a JWKS;
//! - [`azure::Imds`]: Azure IMDS attested data (PKCS#7 by a `metadata.azure.com` test chain).
//!
//! The endpoint's production verifiers are configured to trust the emulators' test roots;
//! nothing else differs.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509, X509NameBuilder};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub mod aws;
pub mod azure;
pub mod gcp;

/// Serves `router` on `127.0.0.1:0`; returns the address and the server task.
pub(crate) async fn serve(router: axum::Router) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, task))
}

/// A fresh RSA-2048 key.
pub(crate) fn rsa_key() -> anyhow::Result<PKey<Private>> {
    let rsa = Rsa::generate(2048).context("generating an RSA test key")?;
    Ok(PKey::from_rsa(rsa)?)
}

/// A test certificate for `key`: self-signed when `issuer` is `None`.
pub(crate) fn certificate(
    subject: &[(&str, &str)],
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    ca: bool,
    dns_name: Option<&str>,
) -> anyhow::Result<X509> {
    certificate_with_issuer_url(subject, key, issuer, ca, dns_name, None)
}

/// Like [`certificate`], naming where its issuer's certificate is published (the
/// Authority Information Access `caIssuers` URL), as public CAs do.
pub(crate) fn certificate_with_issuer_url(
    subject: &[(&str, &str)],
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    ca: bool,
    dns_name: Option<&str>,
    issuer_url: Option<&str>,
) -> anyhow::Result<X509> {
    let mut name = X509NameBuilder::new()?;
    for (field, value) in subject {
        name.append_entry_by_text(field, value)?;
    }
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(64, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(issuer.map_or(&name, |(c, _)| c.subject_name()))?;
    b.set_pubkey(key)?;
    let not_before = Asn1Time::days_from_now(0)?;
    let not_after = Asn1Time::days_from_now(365)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build()?)?;
    } else {
        b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
    }
    if let Some(dns) = dns_name {
        let san = SubjectAlternativeName::new()
            .dns(dns)
            .build(&b.x509v3_context(issuer.map(|(c, _)| c.as_ref()), None))?;
        b.append_extension(san)?;
    }
    if let Some(url) = issuer_url {
        // openssl's crate has no typed builder for this extension; the config string is
        // OpenSSL's own syntax (`man x509v3_config`).
        #[allow(deprecated)]
        let aia = openssl::x509::X509Extension::new_nid(
            None,
            None,
            openssl::nid::Nid::INFO_ACCESS,
            &format!("caIssuers;URI:{url}"),
        )?;
        b.append_extension(aia)?;
    }
    b.sign(issuer.map_or(key, |(_, k)| k), MessageDigest::sha256())?;
    Ok(b.build())
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> i64 {
    crate::oidc::now()
}
