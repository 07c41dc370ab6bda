//! Backoff for addresses whose registrations keep failing. After
//! `limits.failed_registrations` failures in a row (wrong token, unknown id, missing or
//! wrong certificate), an address must wait 1 s, then 2 s, 4 s… up to
//! `limits.max_registration_backoff_secs` before the relay looks at its next
//! registration, and so before it spends an argon2 verification on it. A success
//! clears the address.
//!
//! Keyed by IP address: cameras behind one NAT share a key, so one misconfigured camera
//! slows the others' *re*-registrations only after it has failed many times, and only
//! for as long as it keeps failing (docs/security.md).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Addresses tracked at most; beyond that, stale ones are forgotten first.
const CAPACITY: usize = 65_536;

/// Failed registrations per address.
#[derive(Debug)]
pub(crate) struct Throttle {
    records: Mutex<HashMap<IpAddr, Record>>,
    threshold: u32,
    max_wait: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    blocked_until: Option<Instant>,
    last: Instant,
}

impl Throttle {
    pub(crate) fn new(threshold: u32, max_wait: Duration) -> Self {
        Throttle {
            records: Mutex::new(HashMap::new()),
            threshold,
            max_wait,
        }
    }

    /// `Err(wait)` if `ip` must wait before the relay considers its registration.
    pub(crate) fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.lock().get(&ip).and_then(|r| r.blocked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Counts a failure; returns the wait it imposes, if any.
    pub(crate) fn failed(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut records = self.lock();
        if records.len() >= CAPACITY && !records.contains_key(&ip) {
            let horizon = self.max_wait * 2;
            records.retain(|_, r| now.saturating_duration_since(r.last) < horizon);
            if records.len() >= CAPACITY {
                return None;
            }
        }
        let record = records.entry(ip).or_insert(Record {
            failures: 0,
            blocked_until: None,
            last: now,
        });
        record.failures = record.failures.saturating_add(1);
        record.last = now;
        let over = record.failures.checked_sub(self.threshold)?;
        let wait = Duration::from_secs(1u64 << over.min(20)).min(self.max_wait);
        record.blocked_until = Some(now + wait);
        Some(wait)
    }

    /// Clears `ip` after a successful registration.
    pub(crate) fn succeeded(&self, ip: IpAddr) {
        self.lock().remove(&ip);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Record>> {
        // Each operation leaves the map consistent; poisoning carries no meaning.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_waits_after_repeated_failures_and_is_cleared_by_success() {
        let throttle = Throttle::new(3, Duration::from_secs(10));
        let (ip, other): (IpAddr, IpAddr) = (
            "203.0.113.9".parse().unwrap(),
            "203.0.113.10".parse().unwrap(),
        );
        let t0 = Instant::now();
        assert_eq!(throttle.failed(ip, t0), None);
        assert_eq!(throttle.failed(ip, t0), None);
        assert_eq!(throttle.failed(ip, t0), Some(Duration::from_secs(1)));
        assert_eq!(throttle.check(ip, t0), Err(Duration::from_secs(1)));
        assert_eq!(
            throttle.check(other, t0),
            Ok(()),
            "other addresses are not affected"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(throttle.check(ip, t1), Ok(()), "the wait ends");
        assert_eq!(throttle.failed(ip, t1), Some(Duration::from_secs(2)));
        for _ in 0..10 {
            throttle.failed(ip, t1);
        }
        assert_eq!(
            throttle.check(ip, t1),
            Err(Duration::from_secs(10)),
            "capped at the maximum"
        );
        throttle.succeeded(ip);
        assert_eq!(throttle.check(ip, t1), Ok(()));
        assert_eq!(throttle.failed(ip, t1), None, "counting starts over");
    }
}
