//! The one retry delay of the project: doubling from a first delay up to a
//! cap, jittered in its upper half ("equal jitter"), so that many clients
//! that failed together do not retry in step, and none retries at once.

use std::time::Duration;

use rand::Rng as _;

/// Delays between retries after consecutive failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the delay after the first failure.
    pub initial: Duration,
    /// Upper bound of every delay.
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max }
    }

    /// Upper bound of the delay after `failures` consecutive failures (1 is
    /// the first; 0 counts as 1): `initial` doubled per earlier failure,
    /// at most `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }

    /// A random delay in the upper half of [`Backoff::ceiling`].
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        let half = ceiling / 2;
        let jitter_ms = u64::try_from((ceiling - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_stays_in_the_upper_half() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(1), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(2), Duration::from_millis(200));
        assert_eq!(backoff.ceiling(4), Duration::from_millis(800));
        assert_eq!(backoff.ceiling(5), Duration::from_secs(1));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(1));
        for failures in [1, 3, 9, u32::MAX] {
            let ceiling = backoff.ceiling(failures);
            for _ in 0..200 {
                let delay = backoff.delay(failures);
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{delay:?} vs {ceiling:?}"
                );
            }
        }
    }

    #[test]
    fn delays_are_spread() {
        let backoff = Backoff::new(Duration::from_secs(8), Duration::from_secs(8));
        let delays: std::collections::BTreeSet<Duration> =
            (0..50).map(|_| backoff.delay(1)).collect();
        assert!(delays.len() > 10, "jitter spreads retries: {delays:?}");
    }
}
