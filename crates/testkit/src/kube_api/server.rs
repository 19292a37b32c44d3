//! The [`Server`] handle: start, kubeconfig, test setup (CRDs, seeded objects) and what it recorded.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::Error;
use super::kinds::split_api_version;
use super::record::{Read, Write};
use super::routing::handle;
use super::status::ApiError;
use super::store::{Shared, Store, Target};
use crate::oidc::Key;

/// A running stand-in API server. Stops when dropped.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Starts a stand-in with only the built-in kinds.
    pub async fn start() -> Result<Self, Error> {
        let key = Key::generate(Algorithm::ES256, "sa-key-1").map_err(|e| Error::Key(e.to_string()))?;
        let schemas = tempfile::tempdir().map_err(|source| Error::Io {
            context: "creating a folder for CRD schemas".into(),
            source,
        })?;
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(Store::new()),
            events,
            key,
            schemas,
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
        });
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| Error::Io {
                context: "binding 127.0.0.1:0".into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            context: "reading the listener's address".into(),
            source,
        })?;
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            // The server runs until the task is aborted; a failing accept loop ends it.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The server's URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) whose current context points at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
             users:\n- name: stand-in\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    \
             cluster: stand-in\n    user: stand-in\n    namespace: default\ncurrent-context: stand-in\n",
            self.url()
        )
    }

    /// Writes [`Server::kubeconfig`] to `<dir>/kubeconfig` and returns the path.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf, Error> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig()).map_err(|source| Error::Io {
            context: format!("writing {}", path.display()),
            source,
        })?;
        Ok(path)
    }

    /// Installs a CustomResourceDefinition (as `kubectl apply` would; not recorded as a write).
    pub fn install_crd(&self, crd: &Value) -> Result<(), Error> {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        self.seed(crd.clone()).map(drop).map_err(|e| Error::Refused {
            what: format!("CustomResourceDefinition {name}"),
            message: e.message,
        })
    }

    /// Installs Istio's WorkloadEntry and WorkloadGroup CRDs from [`crate::crd::istio_crds_path`],
    /// serving only `versions` (e.g. `["v1beta1"]` for a cluster without `v1`).
    pub fn install_istio_crds(&self, versions: &[&str]) -> Result<(), Error> {
        let path = crate::crd::istio_crds_path();
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        for doc in text.split("\n---") {
            if !(doc.contains("kind: WorkloadEntry") || doc.contains("kind: WorkloadGroup")) {
                continue;
            }
            let mut crd: Value = serde_saphyr::from_str(doc).map_err(|e| Error::Refused {
                what: path.display().to_string(),
                message: e.to_string(),
            })?;
            if crd["kind"] != "CustomResourceDefinition" {
                continue;
            }
            if let Some(vs) = crd["spec"]["versions"].as_array_mut() {
                vs.retain(|v| v["name"].as_str().is_some_and(|n| versions.contains(&n)));
                for v in vs.iter_mut() {
                    v["storage"] = json!(false);
                }
                if let Some(first) = vs.first_mut() {
                    first["storage"] = json!(true);
                }
            }
            self.install_crd(&crd)?;
        }
        Ok(())
    }

    /// Creates or replaces an object directly (test setup; not recorded as a write). The kind
    /// must be served; `apiVersion`, `kind` and `metadata.name` are required.
    pub fn seed(&self, object: Value) -> Result<Value, ApiError> {
        let (group, version) = split_api_version(object["apiVersion"].as_str().unwrap_or_default());
        let kind_name = object["kind"].as_str().unwrap_or_default().to_owned();
        let mut st = self.shared.lock();
        let kind = st
            .kinds
            .values()
            .find(|k| k.group == group && k.kind == kind_name && k.served(&version))
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!("kind {kind_name} in {group}/{version} is not served"))
            })?;
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let target = Target {
            kind,
            version,
            namespace,
            name: Some(name.clone()),
            sub: None,
        };
        let existing = st.get(&target, &name).cloned();
        let mut body = object;
        if let Some(old) = &existing {
            body["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        }
        let out = st.write(&self.shared, &target, body, existing.as_ref(), false)?;
        Ok(out)
    }

    /// An object as stored (served in `version`), without going through HTTP.
    pub fn object(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        st.objects
            .get(&(group.to_owned(), plural.to_owned()))
            .and_then(|m| m.get(&(namespace.to_owned(), name.to_owned())))
            .cloned()
    }

    /// Every successful write request so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.lock().writes.clone()
    }

    /// How many successful write requests touched `resource` (a plural, any subresource).
    pub fn write_count(&self, resource: &str) -> usize {
        self.shared
            .lock()
            .writes
            .iter()
            .filter(|w| w.resource == resource)
            .count()
    }

    /// Every read request so far (answered or not), in order.
    pub fn reads(&self) -> Vec<Read> {
        self.shared.lock().reads.clone()
    }

    /// Forgets the recorded writes.
    pub fn reset_writes(&self) {
        self.shared.lock().writes.clear();
    }

    /// The key that signs ServiceAccount tokens (its JWK verifies them).
    pub fn token_key(&self) -> &Key {
        &self.shared.key
    }

    /// How many events the watch history keeps (default 4096); a watch resuming from an older
    /// resource version gets 410 `Expired`.
    pub fn set_watch_history(&self, events: usize) {
        self.shared.lock().history_len = events.max(1);
    }

    /// How often a watch that allows bookmarks gets one (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = every;
    }
}
