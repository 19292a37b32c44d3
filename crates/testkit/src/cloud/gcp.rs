//! A GCE metadata server emulator: identity tokens, plus the JWKS that signs them.
//!
//! Wire format as on GCE: every request needs `Metadata-Flavor: Google` (403 without) and
//! every response carries it; `GET /computeMetadata/v1/instance/service-accounts/default/identity`
//! takes `audience` (400 without) and `format=full` (adds the `google.compute_engine` claims)
//! and returns an RS256 JWT from `https://accounts.google.com`. The JWKS is served at
//! `/oauth2/v3/certs`, standing in for Google's, for the verifier's `jwksUrl` override.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::JwkSet;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::oidc::Key;

/// The instance the emulator describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Project id.
    pub project_id: String,
    /// Project number.
    pub project_number: u64,
    /// Zone.
    pub zone: String,
    /// Instance id (numeric, as a string).
    pub instance_id: String,
    /// Instance name.
    pub instance_name: String,
    /// Default service account email.
    pub service_account: String,
}

impl Instance {
    /// `ratings-vm-1` in `bookinfo-prod`, us-central1-a.
    pub fn example() -> Self {
        Self {
            project_id: "bookinfo-prod".into(),
            project_number: 123_456_789_012,
            zone: "us-central1-a".into(),
            instance_id: "4732895401234567890".into(),
            instance_name: "ratings-vm-1".into(),
            service_account: "ratings@bookinfo-prod.iam.gserviceaccount.com".into(),
        }
    }
}

struct Shared {
    instance: Instance,
    key: Key,
}

/// A running metadata server. Stops when dropped.
pub struct MetadataServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl fmt::Debug for MetadataServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The issuer of GCE identity tokens.
pub const ISSUER: &str = "https://accounts.google.com";

impl MetadataServer {
    /// Serves `instance` with a fresh RS256 key.
    pub async fn start(instance: Instance) -> anyhow::Result<Self> {
        let key = Key::generate(Algorithm::RS256, "gce-test-key-1")?;
        let shared = Arc::new(Shared { instance, key });
        let router = axum::Router::new()
            .route("/computeMetadata/v1/", get(root))
            .route(
                "/computeMetadata/v1/instance/service-accounts/default/identity",
                get(identity),
            )
            .route("/oauth2/v3/certs", get(jwks))
            .with_state(shared.clone());
        let (addr, task) = super::serve(router).await?;
        Ok(Self { shared, addr, task })
    }

    /// The base URL (`http://127.0.0.1:PORT`), the agent's `metadataUrl`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The JWKS URL, for the verifier's `jwksUrl`.
    pub fn jwks_url(&self) -> String {
        format!("http://{}/oauth2/v3/certs", self.addr)
    }

    /// The signing key.
    pub fn key(&self) -> &Key {
        &self.shared.key
    }

    /// Claims as the metadata server issues them for `audience`, issued `age` seconds ago.
    pub fn claims(&self, audience: &str, age: i64) -> Value {
        claims(&self.shared.instance, audience, true, super::now() - age)
    }

    /// A token over `claims` signed by the published key.
    pub fn sign(&self, claims: &Value) -> String {
        self.shared.key.sign(claims)
    }
}

fn claims(i: &Instance, audience: &str, full: bool, iat: i64) -> Value {
    let mut c = json!({
        "iss": ISSUER,
        "aud": audience,
        "azp": "104176025330667568672",
        "sub": "104176025330667568672",
        "email": i.service_account,
        "email_verified": true,
        "iat": iat,
        "exp": iat + 3600,
    });
    if full {
        c["google"] = json!({"compute_engine": {
            "project_id": i.project_id,
            "project_number": i.project_number,
            "zone": i.zone,
            "instance_id": i.instance_id,
            "instance_name": i.instance_name,
            "instance_creation_timestamp": iat - 600,
        }});
    }
    c
}

fn flavored(status: StatusCode, body: String) -> Response {
    (status, [("Metadata-Flavor", "Google")], body).into_response()
}

fn rejection_checked(headers: &HeaderMap) -> Option<Response> {
    match headers.get("Metadata-Flavor").and_then(|v| v.to_str().ok()) {
        Some("Google") => None,
        _ => Some(flavored(
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.".into(),
        )),
    }
}

async fn root(headers: HeaderMap) -> Response {
    if let Some(r) = rejection_checked(&headers) {
        return r;
    }
    flavored(StatusCode::OK, "instance/\nproject/\n".into())
}

async fn identity(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = rejection_checked(&headers) {
        return r;
    }
    let Some(audience) = q.get("audience").filter(|a| !a.is_empty()) else {
        return flavored(
            StatusCode::BAD_REQUEST,
            "non-empty audience parameter required".into(),
        );
    };
    let full = q.get("format").is_some_and(|f| f == "full");
    let token = shared
        .key
        .sign(&claims(&shared.instance, audience, full, super::now()));
    flavored(StatusCode::OK, token)
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Response {
    let set = JwkSet {
        keys: vec![shared.key.jwk().clone()],
    };
    axum::Json(serde_json::to_value(set).unwrap_or_default()).into_response()
}
