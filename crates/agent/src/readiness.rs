//! The sidecar's readiness, as a Kubernetes readiness probe sees a pod's: an HTTP GET on
//! the proxy's readiness endpoint (`http://127.0.0.1:15021/healthz/ready` for Istio's
//! package and container, which answers 200 only once Envoy is ready and has its
//! configuration from istiod).
//!
//! The agent reports the combination to the endpoint: a sidecar that runs but is not ready
//! is unhealthy, so a health-checked WorkloadEntry gets traffic only when the proxy can take
//! it.

use std::fmt;
use std::time::Duration;

use crate::health::Health;

/// How long one probe may take.
const TIMEOUT: Duration = Duration::from_secs(1);

/// A URL a probe can use: `http://` or `https://` with a host. Parsed once, with the
/// configuration (`sidecar.readinessUrl`); it keeps the text as written, for
/// `config print`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    written: String,
    parsed: reqwest::Url,
}

impl Url {
    /// Checks `url`.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let err = |reason: String| Error::Url {
            url: url.to_owned(),
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| err(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(err("use e.g. http://127.0.0.1:15021/healthz/ready".into()));
        }
        Ok(Url {
            written: url.to_owned(),
            parsed,
        })
    }

    /// The URL as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.written
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

/// A readiness probe on one URL.
#[derive(Debug, Clone)]
pub struct Readiness {
    url: reqwest::Url,
    client: reqwest::Client,
}

/// Why a probe cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not one the probe can use.
    #[error("{url:?} is not an http:// or https:// URL: {reason}")]
    Url {
        /// The URL as written.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The probe's HTTP client cannot be built.
    #[error("cannot set up the readiness probe of {url}: {source}")]
    Client {
        /// The URL.
        url: String,
        /// What reqwest said.
        source: reqwest::Error,
    },
}

impl Readiness {
    /// A probe on `url`.
    pub fn new(url: &Url) -> Result<Self, Error> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|source| Error::Client {
                url: url.written.clone(),
                source,
            })?;
        Ok(Self {
            url: url.parsed.clone(),
            client,
        })
    }

    /// The URL probed.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The sidecar's health given what the launcher says: a running sidecar is healthy only
    /// if the probe answers 2xx. The messages stay the same while the cause does, so the
    /// agent reports transitions, not every probe.
    pub async fn check(&self, launcher: Health) -> Health {
        if !launcher.is_healthy() {
            return launcher;
        }
        match self.client.get(self.url.clone()).send().await {
            Ok(r) if r.status().is_success() => Health::Running,
            Ok(r) => Health::Failed(format!(
                "sidecar not ready: GET {} answered {}",
                self.url,
                r.status().as_u16()
            )),
            Err(_) => Health::Failed(format!(
                "sidecar not ready: GET {} got no answer within {TIMEOUT:?}",
                self.url
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use gangplank_testkit::probe::Probe;

    use super::*;

    #[tokio::test]
    async fn a_running_sidecar_is_healthy_only_when_its_readiness_endpoint_says_so() {
        let endpoint = Probe::start(503).await.unwrap();
        let url = endpoint.url();
        let probe = Readiness::new(&Url::parse(&url).unwrap()).unwrap();

        let h = probe.check(Health::Running).await;
        assert_eq!(
            h,
            Health::Failed(format!("sidecar not ready: GET {url} answered 503"))
        );
        assert!(!h.is_healthy());
        // The same cause gives the same message: one transition, not one report per probe.
        assert_eq!(probe.check(Health::Running).await, h);

        endpoint.set_status(200);
        assert_eq!(probe.check(Health::Running).await, Health::Running);
        assert_eq!(endpoint.hits(), 3);

        // A sidecar the launcher knows is down is not probed.
        let down = Health::Failed("sidecar exited (exit status: 7)".into());
        assert_eq!(probe.check(down.clone()).await, down);
        assert_eq!(probe.check(Health::Stopped).await, Health::Stopped);
        assert_eq!(endpoint.hits(), 3);
    }

    #[tokio::test]
    async fn nobody_listening_is_not_ready() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz/ready", l.local_addr().unwrap());
        drop(l);
        let h = Readiness::new(&Url::parse(&url).unwrap())
            .unwrap()
            .check(Health::Running)
            .await;
        assert!(
            matches!(&h, Health::Failed(m) if m.contains("got no answer")),
            "{h:?}"
        );
    }

    #[test]
    fn only_http_urls_are_probes() {
        for bad in ["", "127.0.0.1:15021", "file:///etc/passwd", "unix:/run/x"] {
            let e = Url::parse(bad).unwrap_err().to_string();
            assert!(e.contains("is not an http:// or https:// URL"), "{bad}: {e}");
        }
        assert_eq!(
            Readiness::new(&Url::parse("http://127.0.0.1:15021/healthz/ready").unwrap())
                .unwrap()
                .url(),
            "http://127.0.0.1:15021/healthz/ready"
        );
    }
}
