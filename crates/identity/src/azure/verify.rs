//! The endpoint half of Azure: the attested document's PKCS#7 signature and chain to
//! Microsoft's roots (fetching the signer's issuing CA from allowed hosts), its signer name,
//! nonce and age.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gangplank_api::{NamespacedName, kind, proto};
use openssl::nid::Nid;
use openssl::x509::store::X509Store;
use openssl::x509::{X509, X509Ref};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{Facts, imds_nonce};
use crate::{Challenge, Error, Identity, Result, pkcs7};

/// Signer names of Azure's public and sovereign clouds.
pub const SIGNER_NAMES: &[&str] = &[
    "metadata.azure.com",
    "metadata.azure.us",
    "metadata.azure.cn",
    "metadata.microsoftazure.de",
];
/// How old (by `timeStamp.createdOn`) a document may be, unless configured.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(10 * 60);
/// Hosts the signer's issuing CA is fetched from (its AIA URL), unless configured.
pub const DEFAULT_ISSUER_HOSTS: &[&str] = &["www.microsoft.com"];
/// Largest issuing-CA certificate fetched.
const MAX_ISSUER: usize = 64 * 1024;
const ISSUER_TIMEOUT: Duration = Duration::from_secs(5);
/// Microsoft's roots built in.
const BUILTIN_ROOTS: &str = include_str!("../../data/azure/roots.pem");
const LEEWAY_SECS: i64 = 60;
const MAX_PAYLOAD: usize = 64 * 1024;

/// What is wrong with the endpoint's Azure configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configured certificate bundle is unusable.
    #[error("azureVm.{field}: {message}")]
    Certificates {
        /// `roots` or `intermediates`.
        field: &'static str,
        /// What is wrong and what to change.
        message: String,
    },
}

/// The endpoint's Azure settings.
#[derive(Clone, Default)]
pub struct VerifierConfig {
    /// Trusted roots (PEM); `None` uses Microsoft's built-in roots.
    pub roots_pem: Option<Vec<u8>>,
    /// Extra intermediate certificates (PEM) to build chains with; untrusted.
    pub intermediates_pem: Option<Vec<u8>>,
    /// Accepted signer names; empty uses [`SIGNER_NAMES`].
    pub signer_names: Vec<String>,
    /// How old a document may be; `None` uses [`DEFAULT_MAX_AGE`].
    pub max_age: Option<Duration>,
    /// Hosts (`name` or `name:port`) whose AIA URLs may be fetched; `None` uses
    /// [`DEFAULT_ISSUER_HOSTS`], empty turns fetching off.
    pub issuer_hosts: Option<Vec<String>>,
}

impl fmt::Debug for VerifierConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifierConfig")
            .field("custom_roots", &self.roots_pem.is_some())
            .field("signer_names", &self.signer_names)
            .field("max_age", &self.max_age)
            .field("issuer_hosts", &self.issuer_hosts)
            .finish_non_exhaustive()
    }
}

/// The endpoint's `identities.azureVm` settings (all optional).
///
/// ```yaml
/// azureVm:
///   intermediates: /etc/gangplank/azure-intermediates.pem   # Azure's issuing CAs
///   roots: /etc/gangplank/azure-roots.pem                   # instead of Microsoft's built in
///   signerNames: [metadata.azure.com]
///   maxAge: 10m
///   issuerHosts: [www.microsoft.com]   # where the issuing CA may be fetched from; [] = never
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// PEM roots replacing Microsoft's built-in ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots: Option<std::path::PathBuf>,
    /// PEM intermediates to build the signer's chain with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediates: Option<std::path::PathBuf>,
    /// Accepted signer names (default: the public and sovereign clouds').
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signer_names: Vec<String>,
    /// How old a document may be (default 10m).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// Hosts the signer's issuing CA may be fetched from through its AIA URL (default
    /// `www.microsoft.com`; `[]` never fetches, so `intermediates` must hold it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_hosts: Option<Vec<String>>,
}

impl Settings {
    /// The verifier these settings describe.
    pub fn verifier(&self) -> std::result::Result<Verifier, ConfigError> {
        let read = |field: &'static str,
                    path: &Option<std::path::PathBuf>|
         -> std::result::Result<Option<Vec<u8>>, ConfigError> {
            path.as_ref()
                .map(|p| {
                    std::fs::read(p).map_err(|e| ConfigError::Certificates {
                        field,
                        message: format!("cannot read {}: {e}", p.display()),
                    })
                })
                .transpose()
        };
        Verifier::new(VerifierConfig {
            roots_pem: read("roots", &self.roots)?,
            intermediates_pem: read("intermediates", &self.intermediates)?,
            signer_names: self.signer_names.clone(),
            max_age: self.max_age,
            issuer_hosts: self.issuer_hosts.clone(),
        })
    }
}

/// The endpoint half.
pub struct Verifier {
    store: X509Store,
    /// Roots and configured intermediates, to build a store with fetched issuers.
    anchors: Vec<X509>,
    intermediates: Vec<X509>,
    signer_names: Vec<String>,
    max_age: Duration,
    issuers: Issuers,
}

/// Issuing CAs fetched through AIA URLs, by URL.
struct Issuers {
    hosts: Vec<String>,
    client: reqwest::Client,
    cache: std::sync::Mutex<std::collections::HashMap<String, X509>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("signer_names", &self.signer_names)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

fn reject(why: impl fmt::Display) -> Error {
    Error::rejected(crate::Refused::AzureDocument, why.to_string())
}

#[derive(Deserialize)]
struct Envelope {
    encoding: String,
    signature: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Attested {
    nonce: String,
    subscription_id: String,
    vm_id: String,
    #[serde(default)]
    sku: String,
    time_stamp: TimeStamp,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeStamp {
    created_on: String,
    expires_on: String,
}

/// Parses IMDS's `MM/DD/YY HH:MM:SS -0000` timestamps.
fn parse_timestamp(s: &str) -> Option<OffsetDateTime> {
    let (date, rest) = s.trim().split_once(' ')?;
    let (clock, offset) = rest.split_once(' ')?;
    let d: Vec<u32> = date.split('/').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let c: Vec<u8> = clock.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let (&[month, day, year], &[h, m, sec]) = (&d[..], &c[..]) else {
        return None;
    };
    if offset.trim_start_matches(['-', '+']) != "0000" {
        return None;
    }
    let date = time::Date::from_calendar_date(
        2000 + i32::try_from(year).ok()?,
        time::Month::try_from(u8::try_from(month).ok()?).ok()?,
        u8::try_from(day).ok()?,
    )
    .ok()?;
    Some(date.with_hms(h, m, sec).ok()?.assume_utc())
}

impl Verifier {
    /// A verifier with `config`.
    pub fn new(config: VerifierConfig) -> std::result::Result<Self, ConfigError> {
        let roots = pkcs7::certs_from_pem(config.roots_pem.as_deref().unwrap_or(BUILTIN_ROOTS.as_bytes()))
            .map_err(|m| ConfigError::Certificates {
                field: "roots",
                message: format!("the bundle {m}"),
            })?;
        let intermediates = match &config.intermediates_pem {
            Some(pem) => pkcs7::certs_from_pem(pem).map_err(|m| ConfigError::Certificates {
                field: "intermediates",
                message: format!("the bundle {m}"),
            })?,
            None => Vec::new(),
        };
        // OpenSSL builds the signer's chain from the store (and the certificates inside the
        // PKCS#7), so intermediates go into the store too; without PARTIAL_CHAIN a chain
        // must still end at one of the self-signed roots.
        let mut anchors = roots;
        anchors.extend(intermediates.iter().cloned());
        let store = pkcs7::store(&anchors).map_err(|message| ConfigError::Certificates {
            field: "roots",
            message,
        })?;
        let client = reqwest::Client::builder()
            .timeout(ISSUER_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::Certificates {
                field: "issuerHosts",
                message: format!("building the HTTP client: {e}"),
            })?;
        let issuers = Issuers {
            hosts: config
                .issuer_hosts
                .unwrap_or_else(|| DEFAULT_ISSUER_HOSTS.iter().map(|h| h.to_string()).collect())
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            client,
            cache: Default::default(),
        };
        let signer_names = if config.signer_names.is_empty() {
            SIGNER_NAMES.iter().map(|s| s.to_string()).collect()
        } else {
            config.signer_names
        };
        Ok(Self {
            store,
            anchors,
            intermediates,
            signer_names,
            max_age: config.max_age.unwrap_or(DEFAULT_MAX_AGE),
            issuers,
        })
    }

    /// Verifies an IMDS attested-document response for `challenge` with the configured
    /// certificates only (nothing is fetched).
    pub fn verify_document(&self, response: &[u8], challenge: &Challenge) -> Result<Facts> {
        self.verify_with(response, challenge, &self.store)
    }

    /// Verifies like [`Verifier::verify_document`], first fetching the signer's issuing CA
    /// through its AIA URL when no configured certificate issued it.
    pub async fn verify_fetching(&self, response: &[u8], challenge: &Challenge) -> Result<Facts> {
        let Some((url, issuer)) = self.missing_issuer(response).await? else {
            return self.verify_document(response, challenge);
        };
        let mut anchors = self.anchors.clone();
        anchors.push(issuer.clone());
        let store =
            pkcs7::store(&anchors).map_err(|m| Error::Unavailable(format!("building a trust store: {m}")))?;
        let facts = self.verify_with(response, challenge, &store)?;
        // Cached only once it proved to chain to a root, so a bad answer is not kept.
        self.issuers
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url, issuer);
        Ok(facts)
    }

    /// The issuing CA of the document's signer and its URL, fetched (or from the cache), when none of the
    /// configured certificates issued it and fetching is allowed; `None` otherwise (the
    /// verification then says what is missing).
    async fn missing_issuer(&self, response: &[u8]) -> Result<Option<(String, X509)>> {
        let Some(signer) = embedded_signer(response) else {
            return Ok(None);
        };
        let issued_by = |c: &X509| {
            c.subject_name()
                .try_cmp(signer.issuer_name())
                .is_ok_and(|o| o.is_eq())
        };
        if self.issuers.hosts.is_empty() || self.anchors.iter().any(issued_by) {
            return Ok(None);
        }
        let urls: Vec<String> = signer
            .authority_info()
            .into_iter()
            .flatten()
            .filter(|ad| ad.method().nid() == Nid::AD_CA_ISSUERS)
            .filter_map(|ad| ad.location().uri().map(str::to_owned))
            .collect();
        let Some(url) = urls.first() else {
            return Ok(None);
        };
        let parsed = reqwest::Url::parse(url)
            .map_err(|_| reject(format!("signer names its issuer at {url:?}, which is not a URL")))?;
        let host = match (parsed.host_str(), parsed.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => String::new(),
        };
        let host_allowed = self.issuers.hosts.contains(&host);
        if !matches!(parsed.scheme(), "http" | "https") || !host_allowed {
            return Err(reject(format!(
                "was signed by a certificate whose issuer is published at {url}, a host not in \
                 azureVm.issuerHosts ({}): add the host if it is Microsoft's, or put the issuing CA \
                 in azureVm.intermediates",
                self.issuers.hosts.join(", ")
            )));
        }
        if let Some(c) = self
            .issuers
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
        {
            return Ok(Some((url.clone(), c.clone())));
        }
        let fetched = fetch_certificate(&self.issuers.client, url).await?;
        if !issued_by(&fetched) {
            return Err(reject(format!(
                "names {url} as its issuer, but the certificate there is {}, not the signer's issuer",
                subject_name(&fetched)
            )));
        }
        tracing::info!(%url, issuer = %subject_name(&fetched), "fetched Azure's issuing CA");
        Ok(Some((url.clone(), fetched)))
    }

    fn verify_with(&self, response: &[u8], challenge: &Challenge, store: &X509Store) -> Result<Facts> {
        if response.len() > MAX_PAYLOAD {
            return Err(reject(format!("is larger than {MAX_PAYLOAD} bytes")));
        }
        let envelope: Envelope = serde_json::from_slice(response)
            .map_err(|_| reject("is not IMDS's {\"encoding\",\"signature\"} response"))?;
        if envelope.encoding != "pkcs7" {
            return Err(reject(format!(
                "has encoding {}, expected pkcs7",
                crate::text::shown(&envelope.encoding)
            )));
        }
        let compact: String = envelope
            .signature
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| reject("signature is not base64"))?;
        let p7 = pkcs7::parse(&der).map_err(|m| reject(format!("signature {m}")))?;
        let (content, signer) = pkcs7::verify_chain(&p7, store, &self.intermediates).map_err(|m| {
            reject(format!(
                "{m}: it was not signed by Azure (or azureVm.roots/intermediates lack its chain)"
            ))
        })?;
        if !self.signer_allowed(&signer) {
            return Err(reject(format!(
                "was signed by {}, not by one of {}",
                subject_name(&signer),
                self.signer_names.join(", ")
            )));
        }
        let doc: Attested = serde_json::from_slice(&content)
            .map_err(|e| reject(format!("signed content lacks a field Gangplank needs: {e}")))?;
        let expected = imds_nonce(challenge);
        if doc.nonce != expected {
            return Err(reject(
                "carries a different nonce than this onboarding's challenge: it is a replay or was requested for another challenge; request it with the nonce from Discover",
            ));
        }
        let created = parse_timestamp(&doc.time_stamp.created_on)
            .ok_or_else(|| reject("has a malformed timeStamp.createdOn"))?;
        let expires = parse_timestamp(&doc.time_stamp.expires_on)
            .ok_or_else(|| reject("has a malformed timeStamp.expiresOn"))?;
        let now = OffsetDateTime::now_utc();
        if now > expires + time::Duration::seconds(LEEWAY_SECS) {
            return Err(reject(format!("expired at {}", doc.time_stamp.expires_on)));
        }
        if created > now + time::Duration::seconds(LEEWAY_SECS) {
            return Err(reject(
                "was created in the future: check the VM's and the endpoint's clocks",
            ));
        }
        let age = now - created;
        if age > time::Duration::try_from(self.max_age).unwrap_or(time::Duration::MAX) {
            return Err(reject(format!(
                "is stale: created at {} ({}s ago, more than the {}s accepted); request a fresh one",
                doc.time_stamp.created_on,
                age.whole_seconds(),
                self.max_age.as_secs()
            )));
        }
        if doc.subscription_id.is_empty() || doc.vm_id.is_empty() {
            return Err(reject("has an empty subscriptionId or vmId"));
        }
        Ok(Facts {
            subscription_id: doc.subscription_id,
            vm_id: doc.vm_id,
            sku: doc.sku,
        })
    }

    fn signer_allowed(&self, cert: &X509Ref) -> bool {
        let fits = |name: &str| {
            let name = name.to_ascii_lowercase();
            self.signer_names
                .iter()
                .any(|n| name == *n || name.strip_suffix(n.as_str()).is_some_and(|p| p.ends_with('.')))
        };
        let sans = cert
            .subject_alt_names()
            .map(|names| names.iter().filter_map(|n| n.dnsname().map(fits)).any(|ok| ok))
            .unwrap_or(false);
        sans || cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .filter_map(|e| e.data().to_string().ok())
            .any(|cn| fits(&cn))
    }
}

/// The signer certificate embedded in an IMDS response, if it has one (checked later).
fn embedded_signer(response: &[u8]) -> Option<X509> {
    let envelope: Envelope = serde_json::from_slice(response).ok()?;
    let compact: String = envelope
        .signature
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = STANDARD.decode(compact.as_bytes()).ok()?;
    let p7 = pkcs7::parse(&der).ok()?;
    let none = openssl::stack::Stack::new().ok()?;
    let signers = p7.signers(&none, openssl::pkcs7::Pkcs7Flags::empty()).ok()?;
    signers.iter().next().map(|c| c.to_owned())
}

/// GETs a certificate (DER, as AIA URLs serve it, or PEM), at most [`MAX_ISSUER`] bytes.
async fn fetch_certificate(client: &reqwest::Client, url: &str) -> Result<X509> {
    let unavailable =
        |why: String| Error::Unavailable(format!("fetching Azure's issuing CA from {url}: {why}"));
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|e| unavailable(e.without_url().to_string()))?;
    if !response.status().is_success() {
        return Err(unavailable(format!("HTTP {}", response.status().as_u16())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| unavailable(e.without_url().to_string()))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ISSUER {
            return Err(unavailable(format!("larger than {MAX_ISSUER} bytes")));
        }
    }
    X509::from_der(&body)
        .or_else(|_| X509::from_pem(&body))
        .map_err(|_| unavailable("not a DER or PEM certificate".into()))
}

fn subject_name(cert: &X509Ref) -> String {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .filter_map(|e| e.data().to_string().ok())
        .map(|cn| format!("CN={cn}"))
        .next()
        .unwrap_or_else(|| "a certificate without a common name".into())
}

#[async_trait]
impl crate::Verifier for Verifier {
    fn kind(&self) -> &'static str {
        kind::AZURE_VM
    }

    async fn verify(
        &self,
        credential: &proto::Credential,
        challenge: &Challenge,
        _group: &NamespacedName,
    ) -> Result<Identity> {
        if credential.kind != kind::AZURE_VM {
            return Err(Error::UnsupportedKind(credential.kind.clone()));
        }
        let facts = self.verify_fetching(&credential.payload, challenge).await?;
        Ok(Identity {
            facts: crate::Facts::Azure(facts),
            address: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse() {
        let t = parse_timestamp("11/30/20 21:19:19 -0000").map(|t| t.unix_timestamp());
        assert_eq!(t, Some(1_606_771_159));
        assert!(parse_timestamp("2020-11-30").is_none());
    }

    #[test]
    fn builtin_roots_load() {
        assert!(Verifier::new(VerifierConfig::default()).is_ok());
    }
}
