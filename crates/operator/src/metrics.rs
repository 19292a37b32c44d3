//! The operator's metrics and health checks, served on its monitoring port (`/metrics`,
//! `/healthz`, `/readyz`), as the endpoint serves its own.
//!
//! `/readyz` answers 200 once the operator's CRDs are installed and established (leader or
//! standby: a standby is ready to take over); `/healthz` answers 200 while the process serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: String,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    reconciles: Family<Outcome, Counter>,
    duration: Histogram,
    leader: Gauge,
    transitions: Counter,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            // 1 ms .. ~16 s.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            leader: Gauge::default(),
            transitions: Counter::default(),
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Counts a reconcile by result (`ok`, `error`) and records how long it took.
    pub fn reconciled(&self, ok: bool, seconds: f64) {
        self.reconciles
            .get_or_create(&Outcome {
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
        self.duration.observe(seconds);
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        if leading {
            self.transitions.inc();
        }
        self.leader.set(i64::from(leading));
    }

    /// Whether this replica leads.
    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// Reconciles counted so far (both results).
    pub fn reconciles(&self) -> u64 {
        ["ok", "error"]
            .iter()
            .map(|r| {
                self.reconciles
                    .get_or_create(&Outcome { result: (*r).into() })
                    .get()
            })
            .sum()
    }

    /// Whether the operator is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks the operator ready (its CRDs are established).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "gangplank_operator_reconciles",
            "Reconciles of OnboardingPlanes, by result",
            self.reconciles.clone(),
        );
        registry.register(
            "gangplank_operator_reconcile_duration_seconds",
            "How long reconciles took",
            self.duration.clone(),
        );
        registry.register(
            "gangplank_operator_leader",
            "1 while this replica holds the leader Lease and runs the controller",
            self.leader.clone(),
        );
        registry.register(
            "gangplank_operator_leader_acquisitions",
            "Times this replica took the leader Lease",
            self.transitions.clone(),
        );
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stopping` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stopping: CancellationToken) {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let ready = metrics.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.ready.load(Ordering::Acquire);
                async move {
                    if ready {
                        (http::StatusCode::OK, "ok\n")
                    } else {
                        (http::StatusCode::SERVICE_UNAVAILABLE, "installing the CRDs\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let mut out = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        out,
                    )
                }
            }),
        );
    let shutdown = async move { stopping.cancelled().await };
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(%err, "monitoring server failed");
    }
}
