//! Retry delays: exponential growth capped at a maximum, with full jitter.
//!
//! backon supplies the capped exponential sequence; its own jitter only ever adds to a
//! delay (up to doubling it, past the cap), so the "full jitter" draw — uniform between
//! zero and the capped delay, which spreads a fleet of agents reconnecting after an
//! endpoint restart — is applied here.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Exponential backoff with full jitter between these bounds (`settings.retry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

/// A sequence of retry delays; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    retry: Retry,
    steps: ExponentialBackoff,
}

impl Backoff {
    /// Delays growing from `retry.initial`, doubling, capped at `retry.max`.
    pub fn new(retry: Retry) -> Self {
        Backoff {
            retry,
            steps: steps(retry),
        }
    }

    /// The next delay: uniform in `[0, capped exponential step]`.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.next_cap();
        full_jitter(cap, rand::random::<f64>())
    }

    /// The next capped exponential step, without jitter.
    pub fn next_cap(&mut self) -> Duration {
        // The builder has no attempt limit, so the sequence never ends; fall back to the
        // cap rather than panic if that ever changes.
        self.steps.next().unwrap_or(self.retry.max).min(self.retry.max)
    }

    /// Starts over from `retry.initial`.
    pub fn reset(&mut self) {
        self.steps = steps(self.retry);
    }
}

fn steps(retry: Retry) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(retry.initial)
        .with_max_delay(retry.max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// Full jitter: `cap` scaled by `unit` (clamped to `[0, 1]`).
pub fn full_jitter(cap: Duration, unit: f64) -> Duration {
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(initial_ms: u64, max_ms: u64) -> Retry {
        Retry {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn caps_grow_exponentially_up_to_max() {
        let mut b = Backoff::new(retry(1000, 30_000));
        let caps: Vec<u64> = (0..8).map(|_| b.next_cap().as_millis() as u64).collect();
        assert_eq!(caps, vec![1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]);
        b.reset();
        assert_eq!(b.next_cap(), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_between_zero_and_the_cap() {
        let cap = Duration::from_secs(8);
        assert_eq!(full_jitter(cap, 0.0), Duration::ZERO);
        assert_eq!(full_jitter(cap, 1.0), cap);
        assert_eq!(full_jitter(cap, 0.25), Duration::from_secs(2));
        assert_eq!(full_jitter(cap, 7.0), cap);
        assert_eq!(full_jitter(cap, -1.0), Duration::ZERO);

        let mut b = Backoff::new(retry(100, 400));
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        // Full jitter really spreads: not every delay sits at the cap.
        assert!(delays.iter().skip(2).any(|d| *d < Duration::from_millis(390)));
    }
}
