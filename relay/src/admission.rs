//! The pace at which the relay admits registrations (`limits.registrations_per_sec`).
//!
//! After a relay restart every camera of the fleet dials at once. Each registration
//! costs a TLS handshake, maybe an argon2 verification, a port and a QUIC handshake;
//! taken all at once they starve each other into timeouts, and the timeouts into
//! retries. So the relay admits at most `rate` a second (with a burst of one second's
//! worth) and gives every camera beyond that a *slot*: "retry in N s", where N grows with
//! the queue, so the fleet comes back spread out instead of storming again. A camera
//! that returns at its slot is admitted without queueing a second time.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Slots kept at most (one per waiting camera); beyond that the oldest are dropped.
const CAPACITY: usize = 100_000;
/// A slot is honoured this long after its time; later, the camera queues again.
const GRACE: Duration = Duration::from_secs(60);

/// The admission schedule.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Time between admissions.
    interval: Duration,
    /// How far the schedule may run ahead of now and still admit at once (the burst).
    burst: Duration,
    /// When the next admission is due, if the schedule is busy.
    next: Option<Instant>,
    /// Cameras told to come back, and when.
    slots: HashMap<String, Instant>,
}

/// The answer for one registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go ahead.
    Admit,
    /// Come back after this long.
    Later(Duration),
}

impl Admission {
    /// At most `per_sec` registrations a second, `per_sec` at once.
    pub(crate) fn new(per_sec: u32) -> Self {
        let interval = Duration::from_secs(1) / per_sec.max(1);
        Admission {
            interval,
            burst: Duration::from_secs(1),
            next: None,
            slots: HashMap::new(),
        }
    }

    /// Whether `agent_id` may register now.
    pub(crate) fn check(&mut self, agent_id: &str, now: Instant) -> Verdict {
        if let Some(slot) = self.slots.get(agent_id).copied() {
            if now + self.interval >= slot && now <= slot + GRACE {
                // Its place in the schedule was taken when it was told to wait.
                self.slots.remove(agent_id);
                return Verdict::Admit;
            }
            if now < slot {
                // Back early: the same slot again, not a new one at the end.
                return Verdict::Later(slot - now);
            }
            self.slots.remove(agent_id);
        }
        let next = self.next.map_or(now, |n| n.max(now));
        self.next = Some(next + self.interval);
        if next <= now + self.burst {
            return Verdict::Admit;
        }
        if self.slots.len() >= CAPACITY {
            self.forget_stale(now);
        }
        self.slots.insert(agent_id.to_string(), next);
        Verdict::Later(next - now)
    }

    fn forget_stale(&mut self, now: Instant) {
        self.slots.retain(|_, slot| now <= *slot + GRACE);
        if self.slots.len() >= CAPACITY {
            if let Some(oldest) = self
                .slots
                .iter()
                .min_by_key(|(_, s)| **s)
                .map(|(k, _)| k.clone())
            {
                self.slots.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cam-{i}")).collect()
    }

    /// An admission at `per_sec` whose first second went to `burst` cameras at `t0`,
    /// and the wait camera `id`, arriving then too, is told.
    fn queued(per_sec: u32, burst: usize, id: &str) -> (Admission, Instant, Duration) {
        let mut a = Admission::new(per_sec);
        let t0 = Instant::now();
        for other in ids(burst) {
            a.check(&other, t0);
        }
        let Verdict::Later(wait) = a.check(id, t0) else {
            panic!("{id} admitted past the burst")
        };
        (a, t0, wait)
    }

    #[test]
    fn a_burst_of_one_second_is_admitted_and_the_rest_get_spread_slots() {
        let mut a = Admission::new(10);
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = ids(40).iter().map(|id| a.check(id, t0)).collect();
        let admitted = verdicts.iter().filter(|v| **v == Verdict::Admit).count();
        assert_eq!(admitted, 11, "one second's worth, plus the one due now");
        let waits: Vec<Duration> = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Later(d) => Some(*d),
                Verdict::Admit => None,
            })
            .collect();
        // Each later camera a tenth of a second after the one before: spread, not a
        // second storm.
        for pair in waits.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(100));
        }
        assert!(waits.last().unwrap() <= &Duration::from_secs(4));
    }

    #[test]
    fn a_camera_returning_at_its_slot_is_admitted_even_while_others_queue() {
        let (mut a, t0, wait) = queued(10, 20, "late");
        // Others keep arriving meanwhile.
        for id in (100..150).map(|i| format!("cam-{i}")) {
            a.check(&id, t0 + wait / 2);
        }
        assert_eq!(a.check("late", t0 + wait), Verdict::Admit);
        // Its slot is used up: a second registration queues again.
        assert!(matches!(a.check("late", t0 + wait), Verdict::Later(_)));
    }

    #[test]
    fn back_early_keeps_its_slot_and_too_late_queues_anew() {
        let (mut a, t0, wait) = queued(1, 5, "cam-9");
        assert_eq!(
            a.check("cam-9", t0 + Duration::from_secs(1)),
            Verdict::Later(wait - Duration::from_secs(1))
        );
        let much_later = t0 + wait + GRACE + Duration::from_secs(1);
        // Long after, the schedule is idle again: admitted as a newcomer.
        assert_eq!(a.check("cam-9", much_later), Verdict::Admit);
    }

    #[test]
    fn a_quiet_relay_admits_everyone_at_once() {
        let mut a = Admission::new(5);
        let t0 = Instant::now();
        for (i, id) in ids(50).iter().enumerate() {
            let at = t0 + Duration::from_millis(250 * i as u64);
            assert_eq!(a.check(id, at), Verdict::Admit, "{id}");
        }
    }
}
