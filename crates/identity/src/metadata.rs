//! The cloud metadata services as the providers and platform detection talk to them: a base
//! URL and an HTTP client, and short text reads. A leaf: it uses nothing else in the crate
//! but its [`Error`](crate::Error).

use std::time::Duration;

use crate::{Error, Result};

/// Longest metadata response read.
const MAX_RESPONSE: usize = 64 * 1024;

/// A platform's metadata service as a provider talks to it: the base URL (no trailing `/`)
/// and an HTTP client with the platform's timeouts, no proxy and no redirects.
#[derive(Debug, Clone)]
pub(crate) struct Metadata {
    /// Base URL, e.g. `http://169.254.169.254`.
    pub(crate) base: String,
    /// The client.
    pub(crate) client: reqwest::Client,
}

impl Metadata {
    /// The service at `base`, or at `default` when none is configured.
    pub(crate) fn new(base: Option<String>, default: &str, timeout: Duration) -> Result<Self> {
        let base = base
            .unwrap_or_else(|| default.into())
            .trim_end_matches('/')
            .to_string();
        Ok(Self {
            base,
            client: client(timeout)?,
        })
    }
}

/// An HTTP client for link-local metadata services: no proxy, no redirects, `timeout`.
pub(crate) fn client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Unavailable(format!("cannot build the metadata HTTP client: {e}")))
}

/// Sends `req` and reads a short text body; the error names `what` and the URL.
pub(crate) async fn read_text(req: reqwest::RequestBuilder, url: &str, what: &str) -> Result<String> {
    read_text_or_none(req, url, what)
        .await?
        .ok_or_else(|| Error::Unavailable(format!("{what} at {url}: HTTP 404 Not Found")))
}

/// [`read_text`], with `None` for a 404 (a metadata path that does not apply here).
pub(crate) async fn read_text_or_none(
    req: reqwest::RequestBuilder,
    url: &str,
    what: &str,
) -> Result<Option<String>> {
    let fail = |why: String| Error::Unavailable(format!("{what} at {url}: {why}"));
    let mut resp = req.send().await.map_err(|e| {
        fail(format!(
            "unreachable ({e}); is the agent running on this platform?"
        ))
    })?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_RESPONSE {
            return Err(fail(format!("response larger than {MAX_RESPONSE} bytes")));
        }
    }
    String::from_utf8(body)
        .map(Some)
        .map_err(|_| fail("response is not UTF-8".into()))
}
