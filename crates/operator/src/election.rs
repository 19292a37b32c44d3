//! Leader election: of the operator's replicas only the holder of the Lease [`LEASE`] runs the
//! controller, so two replicas never fight over a plane's children.
//!
//! The Lease is taken and renewed with [`gangplank_lease::LeaseLock`], the conditional updates
//! the endpoint's sweeper election uses (client-go's Lease lock). A leader renews every third
//! of the Lease duration; one that cannot renew for two thirds of it (the API server is
//! unreachable, or another replica holds the Lease) stops its controller and becomes a
//! candidate again, before the Lease it held expires and another replica may take it. On
//! shutdown the leader stops its controller first and then releases the Lease, so a standby
//! takes over at its next try.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gangplank_lease::LeaseLock;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The operator's leader Lease.
pub const LEASE: &str = "gangplank-operator-leader";

/// Runs `lead` whenever this replica holds [`LEASE`], until `stopping` is cancelled; `lead`
/// gets a token cancelled when leadership is lost (or on shutdown) and must return soon after.
pub async fn run<F, Fut>(lock: LeaseLock, metrics: Arc<Metrics>, stopping: CancellationToken, mut lead: F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let every = (lock.duration() / 3).max(Duration::from_millis(100));
    let deadline = lock.duration() * 2 / 3;
    loop {
        // A candidate: try every third of the Lease duration.
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stopping.cancelled() => return,
            }
            match lock.hold(LEASE, OffsetDateTime::now_utc()).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(%err, lease = LEASE, namespace = lock.namespace(), "leader election: reading the Lease failed; retrying")
                }
            }
        }
        tracing::info!(
            identity = lock.holder(),
            lease = LEASE,
            namespace = lock.namespace(),
            "leading: controller started"
        );
        metrics.set_leader(true);
        let leading = stopping.child_token();
        let work = tokio::spawn(lead(leading.clone()));
        let mut renewed = Instant::now();
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        let lost = loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stopping.cancelled() => break false,
            }
            match lock.hold(LEASE, OffsetDateTime::now_utc()).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    tracing::warn!(lease = LEASE, "leadership lost: another replica holds the Lease");
                    break true;
                }
                Err(err) => tracing::warn!(%err, lease = LEASE, "renewing the leader Lease failed; retrying"),
            }
            if renewed.elapsed() >= deadline {
                tracing::warn!(deadline = ?deadline, lease = LEASE, "leadership lost: the Lease was not renewed in time");
                break true;
            }
        };
        leading.cancel();
        if let Err(err) = work.await {
            tracing::error!(%err, "the controller task failed");
        }
        metrics.set_leader(false);
        if !lost {
            match tokio::time::timeout(
                Duration::from_secs(3),
                lock.release(LEASE, OffsetDateTime::now_utc()),
            )
            .await
            {
                Ok(Ok(true)) => tracing::info!(lease = LEASE, "leader Lease released"),
                Ok(Ok(false)) => {}
                Ok(Err(err)) => {
                    tracing::warn!(%err, "releasing the leader Lease failed; a standby takes it once it expires")
                }
                Err(_) => {
                    tracing::warn!("releasing the leader Lease timed out; a standby takes it once it expires")
                }
            }
            return;
        }
        tracing::info!("controller stopped; waiting to lead again");
    }
}
