//! Leader election: of the operator's replicas only the holder of the Lease [`LEASE`] runs the
//! controller, so two replicas never fight over a plane's children.
//!
//! The Lease is taken and renewed with [`gangplank_lease::LeaseLock`], the conditional updates
//! the endpoint's sweeper election uses (client-go's Lease lock), here with expiry judged by
//! this replica's own monotonic clock ([`gangplank_lease::LeaseLock::observing`]), so clock
//! skew between nodes cannot make a standby take a Lease its holder still renews. A leader
//! renews every [`RETRY`]; every call is bounded by the time left before its renewal deadline
//! (two thirds of the Lease duration after the last renewal *started*), and a leader that
//! misses the deadline stops its controller (aborting reconciles still running) before the
//! Lease it held can expire for the others. If the controller ends on its own (a bug), the
//! Lease is released and [`run`] returns an error, so the process exits and is restarted. On
//! shutdown the leader keeps renewing while its reconciles drain (at most the renewal
//! deadline), then releases the Lease, so a standby takes over at its next try.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gangplank_lease::LeaseLock;
use time::OffsetDateTime;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The operator's leader Lease.
pub const LEASE: &str = "gangplank-operator-leader";
/// How often a candidate tries, and a leader renews (client-go's retry period).
pub const RETRY: Duration = Duration::from_secs(2);
/// The shortest Lease duration accepted.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

/// Why the election stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
#[error("the controller stopped while leading: exiting so the replica is restarted")]
pub struct ControllerEnded;

fn warn_failed(err: &kube::Error, lock: &LeaseLock, doing: &str) {
    if matches!(err, kube::Error::Api(s) if s.code == 403) {
        tracing::warn!(%err, lease = LEASE, namespace = lock.namespace(),
            "{doing}: forbidden: the operator's Role (gangplank-operator-leader in deploy/operator.yaml) must allow get, create and update on leases in this namespace");
    } else {
        tracing::warn!(%err, lease = LEASE, namespace = lock.namespace(), "{doing} failed; retrying");
    }
}

/// Runs `lead` whenever this replica holds [`LEASE`], until `stopping` is cancelled; `lead`
/// gets a token cancelled when leadership is lost (or on shutdown) and should return soon
/// after (it is aborted at the renewal deadline).
pub async fn run<F, Fut>(
    lock: LeaseLock,
    metrics: Arc<Metrics>,
    stopping: CancellationToken,
    mut lead: F,
) -> Result<(), ControllerEnded>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let every = RETRY.min(lock.duration() / 3).max(Duration::from_millis(100));
    let deadline = lock.duration() * 2 / 3;
    loop {
        // A candidate.
        let mut tick = tokio::time::interval(every);
        // When the call that took it started.
        let mut renewed = loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stopping.cancelled() => return Ok(()),
            }
            let started = Instant::now();
            match timeout(deadline, lock.hold(LEASE, OffsetDateTime::now_utc())).await {
                Ok(Ok(true)) => break started,
                Ok(Ok(false)) => {}
                Ok(Err(err)) => warn_failed(&err, &lock, "taking the leader Lease"),
                Err(_) => tracing::warn!(lease = LEASE, "taking the leader Lease timed out; retrying"),
            }
        };
        tracing::info!(
            identity = lock.holder(),
            lease = LEASE,
            namespace = lock.namespace(),
            "leading: controller started"
        );
        metrics.set_leader(true);
        let leading = stopping.child_token();
        let mut work = tokio::spawn(lead(leading.clone()));
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        let mut shutting_down = false;
        let mut ended = false;
        // Reconciles drain for at most a renewal deadline after shutdown begins.
        let mut drain_by = Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let due = renewed + deadline;
            tokio::select! {
                _ = tick.tick() => {}
                () = stopping.cancelled(), if !shutting_down => {
                    // Drain while still renewing; the controller stops taking work.
                    shutting_down = true;
                    drain_by = Instant::now() + deadline;
                    leading.cancel();
                    continue;
                }
                () = tokio::time::sleep_until(drain_by), if shutting_down => {
                    tracing::warn!(after = ?deadline, "reconciles still running at shutdown: aborted");
                    break;
                }
                r = &mut work => {
                    if let Err(err) = r {
                        tracing::error!(%err, "the controller task failed");
                    }
                    ended = true;
                    break;
                }
                () = tokio::time::sleep_until(due) => {
                    tracing::warn!(deadline = ?deadline, lease = LEASE, "leadership lost: the Lease was not renewed in time");
                    break;
                }
            }
            let started = Instant::now();
            match timeout_at(due, lock.hold(LEASE, OffsetDateTime::now_utc())).await {
                Ok(Ok(true)) => renewed = started,
                Ok(Ok(false)) => {
                    tracing::warn!(lease = LEASE, "leadership lost: another replica holds the Lease");
                    break;
                }
                Ok(Err(err)) => warn_failed(&err, &lock, "renewing the leader Lease"),
                Err(_) => {
                    tracing::warn!(deadline = ?deadline, lease = LEASE, "leadership lost: renewing the Lease timed out");
                    break;
                }
            }
        }
        leading.cancel();
        if !work.is_finished() && !ended {
            // Past the deadline (or lost): no reconcile may outlive this replica's Lease.
            work.abort();
            let _ = (&mut work).await;
        }
        metrics.set_leader(false);
        if shutting_down || ended {
            match timeout(
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
            if ended && !stopping.is_cancelled() {
                return Err(ControllerEnded);
            }
            return Ok(());
        }
        tracing::info!("controller stopped; waiting to lead again");
    }
}
