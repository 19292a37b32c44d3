//! Platform detection for `host: auto`: which cloud's metadata service answers here.
//!
//! Each metadata service is probed at once with a short timeout, in the way only the real
//! service answers (IMDSv2 token `PUT`; GCP's `Metadata-Flavor: Google` response header;
//! Azure's `Metadata: true` request header). A fixed `host` in the agent config skips this.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use gangplank_api::proto;

use crate::{Challenge, Error, Provider, Result};

/// How long each probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A cloud platform with a metadata service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// AWS EC2.
    Aws,
    /// Google Compute Engine.
    Gcp,
    /// Azure virtual machines.
    Azure,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Platform::Aws => "aws-ec2",
            Platform::Gcp => "gcp-gce",
            Platform::Azure => "azure-vm",
        })
    }
}

impl Platform {
    /// The credential kind this platform's provider produces.
    pub fn kind(self) -> &'static str {
        match self {
            Platform::Aws => gangplank_api::kind::AWS_EC2,
            Platform::Gcp => gangplank_api::kind::GCP_GCE,
            Platform::Azure => gangplank_api::kind::AZURE_VM,
        }
    }
}

/// The agent's `host` setting: a fixed platform, or `auto` to detect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Probe the metadata services at the first onboarding.
    Auto,
    /// This platform; no probing.
    Fixed(Platform),
}

impl FromStr for Host {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Host::Auto),
            "aws-ec2" => Ok(Host::Fixed(Platform::Aws)),
            "gcp-gce" => Ok(Host::Fixed(Platform::Gcp)),
            "azure-vm" => Ok(Host::Fixed(Platform::Azure)),
            other => Err(format!(
                "{other:?} is not a host: use auto, aws-ec2, gcp-gce or azure-vm"
            )),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Auto => f.write_str("auto"),
            Host::Fixed(p) => p.fmt(f),
        }
    }
}

/// The agent half for cloud platforms: the provider of the configured (or detected)
/// platform. Detection runs once, at the first credential.
pub struct PlatformProvider {
    host: Host,
    urls: MetadataUrls,
    aws_key_file: PathBuf,
    timeout: Duration,
    chosen: tokio::sync::OnceCell<(Platform, Box<dyn Provider>)>,
}

impl fmt::Debug for PlatformProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlatformProvider")
            .field("host", &self.host)
            .field("urls", &self.urls)
            .field("aws_key_file", &self.aws_key_file)
            .finish_non_exhaustive()
    }
}

impl PlatformProvider {
    /// A provider for `host`, with metadata services at `urls`; on AWS the agent's instance
    /// key is kept at `aws_key_file`.
    pub fn new(host: Host, urls: MetadataUrls, aws_key_file: PathBuf) -> Self {
        Self {
            host,
            urls,
            aws_key_file,
            timeout: PROBE_TIMEOUT,
            chosen: tokio::sync::OnceCell::new(),
        }
    }

    async fn chosen(&self) -> Result<&(Platform, Box<dyn Provider>)> {
        self.chosen
            .get_or_try_init(|| async {
                let platform = match self.host {
                    Host::Fixed(p) => p,
                    Host::Auto => {
                        let p = detect(&self.urls, self.timeout).await?;
                        tracing::info!(platform = %p, "host: auto detected the platform");
                        p
                    }
                };
                let provider: Box<dyn Provider> = match platform {
                    Platform::Aws => Box::new(crate::aws::Provider::new(
                        Some(self.urls.aws.clone()),
                        self.aws_key_file.clone(),
                    )?),
                    Platform::Gcp => Box::new(crate::gcp::Provider::new(Some(self.urls.gcp.clone()))?),
                    Platform::Azure => Box::new(crate::azure::Provider::new(Some(self.urls.azure.clone()))?),
                };
                Ok((platform, provider))
            })
            .await
    }
}

#[async_trait]
impl Provider for PlatformProvider {
    /// The platform's kind once known; `auto` before detection ran.
    fn kind(&self) -> &'static str {
        match (self.host, self.chosen.get()) {
            (_, Some((p, _))) => p.kind(),
            (Host::Fixed(p), None) => p.kind(),
            (Host::Auto, None) => "auto",
        }
    }

    async fn credential(&self, challenge: &Challenge) -> Result<proto::Credential> {
        self.chosen().await?.1.credential(challenge).await
    }
}

/// Base URLs of the metadata services (configurable, so tests use local emulators).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataUrls {
    /// AWS IMDS, default [`crate::aws::DEFAULT_IMDS_URL`].
    pub aws: String,
    /// GCP metadata server, default [`crate::gcp::DEFAULT_METADATA_URL`].
    pub gcp: String,
    /// Azure IMDS, default [`crate::azure::DEFAULT_IMDS_URL`].
    pub azure: String,
}

impl Default for MetadataUrls {
    fn default() -> Self {
        Self {
            aws: crate::aws::DEFAULT_IMDS_URL.into(),
            gcp: crate::gcp::DEFAULT_METADATA_URL.into(),
            azure: crate::azure::DEFAULT_IMDS_URL.into(),
        }
    }
}

/// Probes every metadata service at once; the first platform whose service answers
/// genuinely, or an error naming what was tried.
pub async fn detect(urls: &MetadataUrls, timeout: Duration) -> Result<Platform> {
    let client = crate::metadata::client(timeout)?;
    let aws = async {
        let url = format!("{}/latest/api/token", urls.aws.trim_end_matches('/'));
        let resp = client
            .put(&url)
            .header("X-aws-ec2-metadata-token-ttl-seconds", "10")
            .send()
            .await
            .ok()?;
        resp.status().is_success().then_some(Platform::Aws)
    };
    let gcp = async {
        let url = format!("{}/computeMetadata/v1/", urls.gcp.trim_end_matches('/'));
        let resp = client
            .get(&url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .ok()?;
        let flavor = resp.headers().get("Metadata-Flavor")?.to_str().ok()?;
        (resp.status().is_success() && flavor == "Google").then_some(Platform::Gcp)
    };
    let azure = async {
        let url = format!(
            "{}/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
            urls.azure.trim_end_matches('/')
        );
        let resp = client.get(&url).header("Metadata", "true").send().await.ok()?;
        resp.status().is_success().then_some(Platform::Azure)
    };
    let (a, g, z) = tokio::join!(aws, gcp, azure);
    a.or(g).or(z).ok_or_else(|| {
        Error::Unavailable(format!(
            "host: auto found no cloud metadata service (tried AWS {}, GCP {}, Azure {} for {}ms each): set host to the platform, or use a join token or jwt identity",
            urls.aws,
            urls.gcp,
            urls.azure,
            timeout.as_millis()
        ))
    })
}
