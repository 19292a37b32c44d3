//! A sidecar readiness endpoint stand-in: `GET /healthz/ready` on loopback answers the
//! status the test sets (as Envoy's `:15021` answers 503 until the proxy is ready), and
//! counts the requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::task::JoinHandle;

/// A running readiness endpoint. Stops when dropped.
#[derive(Debug)]
pub struct Probe {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    status: AtomicU16,
    hits: AtomicUsize,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Probe {
    /// Starts an endpoint answering `status`.
    pub async fn start(status: u16) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            status: AtomicU16::new(status),
            hits: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/healthz/ready", get(ready))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// `http://<addr>/healthz/ready`.
    pub fn url(&self) -> String {
        format!("http://{}/healthz/ready", self.addr)
    }

    /// Answers `status` from now on.
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// How many probes arrived.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    StatusCode::from_u16(shared.status.load(Ordering::SeqCst)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
