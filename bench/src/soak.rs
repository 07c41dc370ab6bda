//! The soak (`make soak`, and a one-minute version in `make test`): several cameras'
//! Watcher sessions, one after another for the whole run, through the NAT lab's
//! impaired camera link (delay, loss) while the camera's NAT rebinds its UDP ports once
//! a minute; meanwhile the relay's and the agents' memory, file descriptors and
//! sockets are sampled. It fails on any byte lost or changed, any reconnect, file
//! descriptors or CLOSE_WAIT sockets left over once the sessions are done, or memory
//! that keeps growing.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use e2e::{agent_config_json, bin, netns::Place, AgentProcess, Child, Lab, RelayProcess};
use serde::Serialize;

use crate::{impair::Impairment, procstat::rss_kib};

/// The relay's shared token in the soak's lab.
const TOKEN: &str = "soak-token";
/// The relay's control and QUIC port.
const RELAY_PORT: u16 = 8080;
/// Camera `i`'s port on the relay is this plus `i`.
const FIRST_CAMERA_PORT: u16 = 8554;
/// Growth of a process's memory over the measured window (its slope times the window)
/// that fails the soak: 0.8 MiB a minute over 10 minutes, gross leaks only over one.
const RSS_GROWTH_LIMIT_KIB: f64 = 8.0 * 1024.0;
/// How long, after the last session, the processes get to close what they opened.
const SETTLE: Duration = Duration::from_secs(30);

/// What the soak does.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// How long the sessions run (in whole sessions, see [`Plan::rounds`]).
    pub duration: Duration,
    /// Cameras, each behind its own agent.
    pub cameras: usize,
    /// Length of one Watcher session; each camera's sessions follow one another.
    pub session: Duration,
    /// Rate of each session, each way (an echo: the camera sends back what it gets).
    pub bits_per_sec: u64,
    /// Delay each way on the camera link.
    pub delay: Duration,
    /// Fraction of packets lost on the camera link.
    pub loss: f64,
    /// Time between NAT rebindings.
    pub rebind_every: Duration,
    /// Time between samples of memory, descriptors and sockets.
    pub sample_every: Duration,
}

impl Plan {
    /// Four cameras at 2 Mbit/s in 20 s sessions over 25 ms each way and 1 % loss,
    /// rebinding once a minute (or halfway through a shorter run).
    pub fn new(duration: Duration) -> Self {
        Plan {
            duration,
            cameras: 4,
            session: Duration::from_secs(20),
            bits_per_sec: 2_000_000,
            delay: Duration::from_millis(25),
            loss: 0.01,
            rebind_every: Duration::from_secs(60).min(duration / 2),
            sample_every: Duration::from_secs(2),
        }
    }

    /// Sessions each camera runs, back to back, to fill the duration.
    pub fn rounds(&self) -> u32 {
        (self.duration.as_secs_f64() / self.session.as_secs_f64())
            .round()
            .max(1.0) as u32
    }
}

/// What one process did over the soak.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    /// `relay` or `agent-<i>`.
    pub name: String,
    /// Resident memory when the sessions began and when they ended, KiB.
    pub rss_start_kib: u64,
    /// See `rss_start_kib`.
    pub rss_end_kib: u64,
    /// Least-squares slope of resident memory after the warm-up (the first fifth).
    pub rss_slope_kib_per_min: f64,
    /// Open file descriptors before the first session, at most during the soak, and
    /// once the last session was over and the process had settled.
    pub fds_before: usize,
    /// See `fds_before`.
    pub fds_max: usize,
    /// See `fds_before`.
    pub fds_after: usize,
}

/// The soak's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was run.
    pub plan: Plan,
    /// How the link was impaired.
    pub impairment: String,
    /// Watcher sessions run to their end.
    pub sessions: u64,
    /// Bytes sent by Watchers and echoed back, each way, in all.
    pub bytes: u64,
    /// Sessions whose bytes did not come back exactly, with what happened.
    pub byte_errors: Vec<String>,
    /// NAT rebindings done.
    pub rebindings: u16,
    /// Times an agent had to connect again.
    pub reconnects: usize,
    /// The relay and every agent.
    pub processes: Vec<ProcessReport>,
    /// TCP sockets in CLOSE_WAIT on either side of the link: most at any sample, and
    /// once settled.
    pub close_wait_max: usize,
    /// See `close_wait_max`.
    pub close_wait_after: usize,
    /// Length of the measured window (after the warm-up), minutes.
    pub window_minutes: f64,
}

impl Report {
    /// What the soak found wrong; empty if nothing.
    pub fn failures(&self) -> Vec<String> {
        let mut failures: Vec<String> = self.byte_errors.clone();
        if self.sessions == 0 {
            failures.push("no Watcher session ran to its end".into());
        }
        if self.reconnects > 0 {
            failures.push(format!(
                "agents reconnected {} times; sessions should ride out loss and rebinding",
                self.reconnects
            ));
        }
        if self.close_wait_after > 0 {
            failures.push(format!(
                "{} sockets left in CLOSE_WAIT after the sessions ended",
                self.close_wait_after
            ));
        }
        for p in &self.processes {
            if p.fds_after > p.fds_before {
                failures.push(format!(
                    "{} holds {} file descriptors after the sessions, {} before",
                    p.name, p.fds_after, p.fds_before
                ));
            }
            let growth = p.rss_slope_kib_per_min * self.window_minutes;
            if growth > RSS_GROWTH_LIMIT_KIB {
                failures.push(format!(
                    "{}'s memory grows {:.0} KiB a minute ({:.1} MiB over the window)",
                    p.name,
                    p.rss_slope_kib_per_min,
                    growth / 1024.0
                ));
            }
        }
        failures
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let plan = &self.plan;
        let mut md = format!(
            "# Soak\n\n{} cameras, {:.0} s of Watcher sessions ({} s each, {} Mbit/s each way, \
             echoed byte for byte) over {} ms each way and {} % loss ({}), NAT rebound {} times.\n\n\
             - sessions: {}, all bytes exact: {}\n- bytes each way: {:.1} MiB\n- agent reconnects: {}\n\
             - CLOSE_WAIT sockets: at most {}, after settling {}\n\n\
             | process | RSS start KiB | RSS end KiB | RSS slope KiB/min (after warm-up) | fds before | fds max | fds after |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
            plan.cameras,
            plan.duration.as_secs_f64(),
            plan.session.as_secs(),
            plan.bits_per_sec as f64 / 1e6,
            plan.delay.as_millis(),
            plan.loss * 100.0,
            self.impairment,
            self.rebindings,
            self.sessions,
            if self.byte_errors.is_empty() { "yes" } else { "NO" },
            self.bytes as f64 / f64::from(1 << 20),
            self.reconnects,
            self.close_wait_max,
            self.close_wait_after,
        );
        for p in &self.processes {
            md.push_str(&format!(
                "| {} | {} | {} | {:.1} | {} | {} | {} |\n",
                p.name,
                p.rss_start_kib,
                p.rss_end_kib,
                p.rss_slope_kib_per_min,
                p.fds_before,
                p.fds_max,
                p.fds_after
            ));
        }
        let failures = self.failures();
        if failures.is_empty() {
            md.push_str("\nNo failures.\n");
        } else {
            md.push_str("\nFailures:\n");
            for f in failures {
                md.push_str(&format!("- {f}\n"));
            }
        }
        md
    }
}

/// One sampled process.
struct Watched {
    name: String,
    pid: u32,
    fds_before: usize,
    fds_max: usize,
    /// (minutes since the sessions began, RSS KiB)
    rss: Vec<(f64, u64)>,
}

impl Watched {
    fn new(name: String, child: &Child) -> anyhow::Result<Self> {
        let pid = child.pid().with_context(|| format!("{name} has exited"))?;
        let fds_before = open_fds(pid).with_context(|| format!("{name} has exited"))?;
        Ok(Watched {
            name,
            pid,
            fds_before,
            fds_max: fds_before,
            rss: Vec::new(),
        })
    }

    fn sample(&mut self, minutes: f64) -> anyhow::Result<()> {
        let gone = || format!("{} exited during the soak", self.name);
        let rss = rss_kib(self.pid).with_context(gone)?;
        let fds = open_fds(self.pid).with_context(gone)?;
        self.rss.push((minutes, rss));
        self.fds_max = self.fds_max.max(fds);
        Ok(())
    }

    fn report(&self, warm_up_minutes: f64, fds_after: usize) -> ProcessReport {
        let measured: Vec<(f64, u64)> = self
            .rss
            .iter()
            .copied()
            .filter(|(t, _)| *t >= warm_up_minutes)
            .collect();
        ProcessReport {
            name: self.name.clone(),
            rss_start_kib: self.rss.first().map_or(0, |s| s.1),
            rss_end_kib: self.rss.last().map_or(0, |s| s.1),
            rss_slope_kib_per_min: slope(&measured),
            fds_before: self.fds_before,
            fds_max: self.fds_max,
            fds_after,
        }
    }
}

/// Open file descriptors of `pid`, or None if it is gone.
fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Least-squares slope of `points` (x, y); 0 with fewer than two distinct x.
pub fn slope(points: &[(f64, u64)]) -> f64 {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for &(x, y) in points {
        sxy += (x - mean_x) * (y as f64 - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    if sxx > 0.0 {
        sxy / sxx
    } else {
        0.0
    }
}

/// TCP sockets in CLOSE_WAIT at `place`.
async fn close_waits(place: &Place) -> anyhow::Result<usize> {
    let out = place
        .command("ss")
        .args(["-tanH", "state", "close-wait"])
        .output()
        .await
        .context("cannot run ss")?;
    anyhow::ensure!(out.status.success(), "ss failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// One camera's sessions, back to back: (sessions, bytes, errors).
async fn sessions(
    watchers: Place,
    port: u16,
    plan: Plan,
) -> anyhow::Result<(u64, u64, Vec<String>)> {
    let tool = bin("e2e-bytes")?;
    let bytes = plan.bits_per_sec / 8 * plan.session.as_secs();
    let (mut done, mut moved, mut errors) = (0, 0, Vec::new());
    for _ in 0..plan.rounds() {
        let mut send = watchers.command(&tool);
        send.args(["send", "--to", &format!("127.0.0.1:{port}")])
            .args(["--bytes", &bytes.to_string()])
            .args(["--seconds", &plan.session.as_secs().to_string()]);
        let mut send = Child::spawn(&format!("send-{port}"), send)?;
        let result = send.wait_for_line_within("RESULT ", plan.session * 3).await;
        let status = send.wait().await?;
        let expected = format!("sent={bytes} received={bytes} first_difference=none");
        match result {
            Ok(line) if line.ends_with(&expected) && status.success() => {
                done += 1;
                moved += bytes;
            }
            Ok(line) => errors.push(format!("camera port {port}: {line} ({status})")),
            Err(e) => errors.push(format!("camera port {port}: {e:#}")),
        }
    }
    Ok((done, moved, errors))
}

/// Runs the soak; `exe` is the `bench` binary (for `bench impair`).
pub async fn run(plan: &Plan, exe: &Path) -> anyhow::Result<Report> {
    let lab = Lab::new(plan.cameras)?;
    let relay_ip = e2e::netns::RELAY_IP;
    let relay = RelayProcess::start_in(
        &lab.relay(),
        relay_ip,
        RELAY_PORT,
        FIRST_CAMERA_PORT,
        TOKEN,
        &[],
    )
    .await?;
    let mut echoes = Vec::new();
    let mut agents = Vec::new();
    for i in 0..plan.cameras {
        let camera = lab.camera(i);
        let mut echo = camera.command(bin("e2e-bytes")?);
        echo.args(["echo", "--listen", "127.0.0.1:0"]);
        let mut echo = Child::spawn(&format!("echo-{i}"), echo)?;
        let line = echo.wait_for_line("READY ").await?;
        let echo_port: u16 = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("no port in {line:?}"))?;
        echoes.push(echo);
        let port = FIRST_CAMERA_PORT + u16::try_from(i)?;
        let mut config =
            agent_config_json(&format!("soak-{i}"), &relay.url(), TOKEN, port, echo_port);
        // A camera's heartbeat, not the tests' hurried one; and quieter logs.
        config["network"]["heartbeat_interval"] = 5.into();
        config["agent"]["log_level"] = "INFO".into();
        agents.push(AgentProcess::start_in(&camera, &format!("agent-{i}"), &config).await?);
    }
    let impairment = Impairment::start(&lab, exe, plan.cameras, plan.delay, plan.loss).await?;
    let how = impairment.how().to_string();
    eprintln!(
        "soak: {} cameras online, link impaired with {how}",
        plan.cameras
    );

    let mut watched = vec![Watched::new("relay".into(), &relay.process)?];
    for (i, agent) in agents.iter().enumerate() {
        watched.push(Watched::new(format!("agent-{i}"), &agent.process)?);
    }
    let places: Vec<Place> = std::iter::once(lab.relay())
        .chain((0..plan.cameras).map(|i| lab.camera(i)))
        .collect();

    let started = Instant::now();
    let traffic: Vec<_> = (0..plan.cameras)
        .map(|i| {
            let port = FIRST_CAMERA_PORT + i as u16;
            tokio::spawn(sessions(lab.relay(), port, plan.clone()))
        })
        .collect();
    let mut next_rebind = started + plan.rebind_every;
    let mut rebindings = 0;
    let mut close_wait_max = 0;
    while traffic.iter().any(|t| !t.is_finished()) {
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        for w in &mut watched {
            w.sample(minutes)?;
        }
        for place in &places {
            close_wait_max = close_wait_max.max(close_waits(place).await?);
        }
        if Instant::now() >= next_rebind {
            rebindings += 1;
            lab.rebind_udp(rebindings)?;
            eprintln!(
                "soak: NAT rebinding {rebindings} at {:.0} s",
                started.elapsed().as_secs_f64()
            );
            next_rebind += plan.rebind_every;
        }
        tokio::time::sleep(plan.sample_every).await;
    }
    let (mut sessions_done, mut bytes, mut byte_errors) = (0, 0, Vec::new());
    for t in traffic {
        let (done, moved, errors) = t.await??;
        sessions_done += done;
        bytes += moved;
        byte_errors.extend(errors);
    }
    let end_minutes = started.elapsed().as_secs_f64() / 60.0;
    for w in &mut watched {
        w.sample(end_minutes)?;
    }
    impairment.stop(&lab).await?;

    // Settled: every process back to its descriptors of before, no CLOSE_WAIT left
    // (or the time is up, and the report says what is left).
    let settle_until = Instant::now() + SETTLE;
    let (fds_after, close_wait_after) = loop {
        let fds: Vec<usize> = watched
            .iter()
            .map(|w| open_fds(w.pid).unwrap_or(usize::MAX))
            .collect();
        let mut close_wait = 0;
        for place in &places {
            close_wait += close_waits(place).await?;
        }
        let settled = close_wait == 0 && fds.iter().zip(&watched).all(|(f, w)| *f <= w.fds_before);
        if settled || Instant::now() >= settle_until {
            break (fds, close_wait);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let warm_up = end_minutes / 5.0;
    let processes = watched
        .iter()
        .zip(fds_after)
        .map(|(w, fds)| w.report(warm_up, fds))
        .collect();
    let reconnects = agents
        .iter()
        .map(|a| a.process.count_lines("retrying in"))
        .sum();
    drop(echoes);
    Ok(Report {
        plan: plan.clone(),
        impairment: how,
        sessions: sessions_done,
        bytes,
        byte_errors,
        rebindings,
        reconnects,
        processes,
        close_wait_max,
        close_wait_after,
        window_minutes: end_minutes - warm_up,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_growth_per_unit() {
        assert_eq!(slope(&[(0.0, 100), (1.0, 110), (2.0, 120)]), 10.0);
        assert_eq!(slope(&[(0.0, 100), (1.0, 100)]), 0.0);
        assert_eq!(slope(&[(1.0, 100)]), 0.0);
        // Noise around a flat line stays near zero.
        let noisy: Vec<(f64, u64)> = (0..100u32)
            .map(|i| (f64::from(i), 1000 + u64::from(i % 2) * 8))
            .collect();
        assert!(slope(&noisy).abs() < 0.1, "{}", slope(&noisy));
    }
}
