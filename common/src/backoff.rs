//! Exponential backoff with jitter: each wait is uniform in `[ceiling / 2, ceiling]`,
//! the ceiling `min(cap, base * 2^attempt)` ("equal jitter", AWS architecture blog,
//! "Exponential Backoff and Jitter"). The jitter keeps a fleet of cameras that lost the
//! same relay from coming back in lockstep; the floor (half the ceiling, never below
//! `base / 2`) keeps an agent that a relay refuses at once (a wrong URL answered 404, a
//! proxy's 502) from retrying in a tight loop, which full jitter's `[0, ceiling]`
//! allows on any attempt.

use std::time::Duration;

use rand::Rng;

/// Backoff state for one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Waits start around `base` and never exceed `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base: base.min(cap),
            cap,
            attempt: 0,
        }
    }

    /// The next wait, drawn at random from the upper half of the window; each call
    /// doubles the window until it hits the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        rand::rng().random_range(ceiling / 2..=ceiling)
    }

    /// The shortest wait [`Backoff::next_delay`] ever gives: half of `base`.
    pub fn floor(&self) -> Duration {
        self.base / 2
    }

    /// The upper bound of the next wait.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A wait drawn uniformly from `[0, cap]`, whatever the attempt: for events a whole
    /// fleet sees at once (a relay restart), so its members come back spread out.
    pub fn spread(&self) -> Duration {
        rand::rng().random_range(Duration::ZERO..=self.cap)
    }

    /// Starts again from `base`, after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_millis());
            let wait = b.next_delay();
            assert!(wait <= ceiling && wait >= ceiling / 2, "{wait:?}");
            assert!(wait >= b.floor());
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn a_fleet_told_at_once_spreads_over_the_whole_cap() {
        // Even on a first attempt (whose ceiling is the base), a relay's shutdown sends
        // each camera back at a point anywhere up to the cap: 1,000 draws fill it.
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut buckets = [0u32; 10];
        for _ in 0..1000 {
            let wait = b.spread();
            assert!(wait <= Duration::from_secs(10), "{wait:?}");
            buckets[(wait.as_secs() as usize).min(9)] += 1;
        }
        // Uniform: about 100 a second; far from every bucket empty or holding all.
        assert!(
            buckets.iter().all(|&n| (40..=200).contains(&n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(10));
    }
}
