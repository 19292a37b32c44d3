//! Prometheus metrics, served on the monitoring port with the health checks.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Result {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Package {
    format: String,
    arch: String,
}

/// The endpoint's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    onboardings: Family<Result, Counter>,
    deletions: Family<Reason, Counter>,
    /// Agent streams held by this replica.
    pub sessions: Gauge,
    /// Sidecar tokens renewed.
    pub renewals: Counter,
    /// Heap allocations of the process (read from [`crate::alloc`] at each scrape).
    heap_allocations: Counter,
    /// Sidecar health written to entries (coalesced: see `workloads.healthWriteInterval`).
    pub health_writes: Counter,
    /// TLS connections held (handshaking or open).
    pub connections: Gauge,
    refused: Family<Reason, Counter>,
    install_downloads: Family<Package, Counter>,
}

impl Metrics {
    /// Counts an onboarding by result (`allowed`, `denied`, `refused`).
    pub fn onboard(&self, result: &str) {
        self.onboardings
            .get_or_create(&Result {
                result: result.into(),
            })
            .inc();
    }

    /// Counts a removed entry by reason (`leave`, `grace-period`).
    pub fn deleted(&self, reason: &str) {
        self.deletions
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    /// Brings the metrics read from elsewhere up to date (before a scrape).
    pub fn refresh(&self) {
        self.heap_allocations
            .inner()
            .store(crate::alloc::allocations(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a connection the endpoint closed itself, by reason (`max_connections`,
    /// `max_handshakes`: no handshake slot within the handshake timeout; `handshake_timeout`; `idle`).
    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a package served from `/install/` (a GET of the package itself, not of its
    /// checksum), by format (`deb`, `rpm`) and architecture (`x86_64`, `aarch64`).
    pub fn install_download(&self, format: &str, arch: &str) {
        self.install_downloads
            .get_or_create(&Package {
                format: format.into(),
                arch: arch.into(),
            })
            .inc();
    }

    /// Registers every metric under `gangplank_endpoint_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("gangplank_endpoint");
        r.register(
            "onboardings",
            "Onboarding requests by result",
            self.onboardings.clone(),
        );
        r.register(
            "entry_deletions",
            "WorkloadEntries removed, by reason",
            self.deletions.clone(),
        );
        r.register(
            "sessions",
            "Agent streams held by this replica",
            self.sessions.clone(),
        );
        r.register("token_renewals", "Sidecar tokens renewed", self.renewals.clone());
        r.register(
            "heap_allocations",
            "Heap allocations since start (0 unless the binary counts them)",
            self.heap_allocations.clone(),
        );
        r.register(
            "health_writes",
            "Sidecar health written to WorkloadEntries (at most one per healthWriteInterval and entry)",
            self.health_writes.clone(),
        );
        r.register(
            "connections",
            "TLS connections held by this replica (handshaking or open)",
            self.connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections the endpoint closed itself, by reason: max_connections (closed as accepted), \
             max_handshakes (no handshake slot within the handshake timeout), handshake_timeout, idle",
            self.refused.clone(),
        );
        r.register(
            "install_downloads",
            "Agent packages served from /install/, by format and architecture",
            self.install_downloads.clone(),
        );
    }
}
