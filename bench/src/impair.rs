//! A bad camera link in userspace: packets the NAT router forwards are queued to this
//! process (iptables NFQUEUE), held for a fixed delay and dropped at random, the way
//! `tc netem delay 25ms loss 2%` would — this machine's kernel has no `sch_netem`.
//!
//! Packets are released in arrival order (the delay is the same for all), so nothing
//! is reordered. The queue is polled every half millisecond, so a packet waits between
//! `delay` and `delay` + 0.5 ms. Without this process running the router drops
//! everything (no `--queue-bypass`): a broken impairment fails loudly instead of
//! measuring a clean link.
//!
//! [`Impairment`] puts either this or the kernel's `tc netem` on the lab's router.

use std::{
    collections::VecDeque,
    io::ErrorKind,
    path::Path,
    time::{Duration, Instant},
};

use e2e::Child;

use anyhow::Context as _;
use nfq::{Queue, Verdict};

/// Longest sleep between polls of the queue.
const POLL: Duration = Duration::from_micros(500);

/// Holds every packet of NFQUEUE `queue_num` for `delay`, dropping a `loss` fraction;
/// runs until killed. Prints `READY impair` once bound.
pub fn run(queue_num: u16, delay: Duration, loss: f64) -> anyhow::Result<()> {
    let mut queue = Queue::open().context("cannot open an NFQUEUE socket (needs root)")?;
    queue
        .bind(queue_num)
        .with_context(|| format!("cannot bind NFQUEUE {queue_num}"))?;
    queue.set_queue_max_len(queue_num, 65_536)?;
    queue.set_nonblocking(true);
    println!("READY impair delay={delay:?} loss={loss}");
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
    loop {
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    if random.next_f64() < loss {
                        msg.set_verdict(Verdict::Drop);
                        queue.verdict(msg)?;
                    } else {
                        msg.set_verdict(Verdict::Accept);
                        held.push_back((Instant::now() + delay, msg));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("NFQUEUE receive failed"),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, msg)) = held.pop_front() {
                queue.verdict(msg)?;
            }
        }
        let wait = held.front().map_or(POLL, |(due, _)| {
            due.saturating_duration_since(now).min(POLL)
        });
        std::thread::sleep(wait);
    }
}

/// A small, seeded generator: runs are repeatable and need no entropy.
struct XorShift(u64);

impl XorShift {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_rate_is_what_was_asked() {
        let mut r = XorShift(0x9e37_79b9_7f4a_7c15);
        let lost = (0..100_000).filter(|_| r.next_f64() < 0.02).count();
        assert!((1_800..2_200).contains(&lost), "{lost}");
    }
}

/// Delay and loss on the camera's router, both ways.
#[derive(Debug)]
pub enum Impairment {
    /// The kernel's netem qdisc on the router's interfaces (named).
    Netem(Vec<String>),
    /// `bench impair` on NFQUEUE 0, where the kernel has no `sch_netem`.
    Nfqueue(Box<Child>),
}

/// The iptables rule sending forwarded packets to `bench impair`.
const TO_QUEUE: [&str; 5] = ["FORWARD", "-j", "NFQUEUE", "--queue-num", "0"];

impl Impairment {
    /// `tc netem` where the kernel has it, else NFQUEUE through `bench impair` (`exe`),
    /// on the links between the relay and the lab's first `cameras` cameras.
    pub async fn start(
        lab: &e2e::Lab,
        exe: &Path,
        cameras: usize,
        delay: Duration,
        loss: f64,
    ) -> anyhow::Result<Self> {
        let router = lab.nat();
        let links = router_links(cameras);
        let netem = |link: &str| {
            let delay = format!("{}ms", delay.as_millis());
            let loss = format!("{}%", loss * 100.0);
            e2e::netns::run(
                &router,
                "tc",
                &[
                    "qdisc", "replace", "dev", link, "root", "netem", "delay", &delay, "loss",
                    &loss,
                ],
            )
        };
        if links.iter().all(|link| netem(link).is_ok()) {
            return Ok(Impairment::Netem(links));
        }
        for link in &links {
            let _ = e2e::netns::run(&router, "tc", &["qdisc", "del", "dev", link, "root"]);
        }
        e2e::netns::run(&router, "iptables", &[&["-A"][..], &TO_QUEUE].concat())?;
        let mut cmd = router.command(exe);
        cmd.args(["impair", "--delay-ms", &delay.as_millis().to_string()])
            .args(["--loss", &loss.to_string()]);
        let mut impair = Child::spawn("impair", cmd)?;
        impair.wait_for_line("READY impair").await?;
        Ok(Impairment::Nfqueue(Box::new(impair)))
    }

    /// How the link is impaired, in words.
    pub fn how(&self) -> &'static str {
        match self {
            Impairment::Netem(_) => "tc netem",
            Impairment::Nfqueue(_) => "NFQUEUE (bench impair): this kernel has no sch_netem",
        }
    }

    /// Takes the impairment off, so the next one starts from a clean link.
    pub async fn stop(self, lab: &e2e::Lab) -> anyhow::Result<()> {
        let router = lab.nat();
        match self {
            Impairment::Netem(links) => {
                for link in &links {
                    e2e::netns::run(&router, "tc", &["qdisc", "del", "dev", link, "root"])?;
                }
            }
            Impairment::Nfqueue(mut impair) => {
                // The rule first: with it and no reader, every packet would be dropped.
                e2e::netns::run(&router, "iptables", &[&["-D"][..], &TO_QUEUE].concat())?;
                impair.kill().await?;
            }
        }
        Ok(())
    }
}

/// The router's interfaces: towards the relay, and towards each camera (netem delays
/// what leaves an interface, so both ends of every path are needed).
fn router_links(cameras: usize) -> Vec<String> {
    std::iter::once("wan".to_string())
        .chain((0..cameras).map(|i| format!("lan{i}")))
        .collect()
}
