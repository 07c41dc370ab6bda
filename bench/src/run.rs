//! One bench run: every scenario through every path, in the same run, so each figure
//! stands next to direct TCP and the peers measured on the same machine at the same
//! time.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::Context as _;
use e2e::Child;
use serde::Serialize;

use crate::{
    impair::Impairment,
    paths::{self, Net, PathKind, Role},
    peers::Tools,
    procstat::{Meter, Usage},
    traffic::{Percentiles, StreamReport, Throughput},
};

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Which scenarios.
    pub part: Part,
    /// Paths to compare.
    pub paths: Vec<PathKind>,
    /// Round trips per latency measurement.
    pub round_trips: u64,
    /// Sessions per setup measurement.
    pub sessions: u64,
    /// Bytes per throughput measurement.
    pub bytes: u64,
    /// Concurrent paced streams.
    pub streams: usize,
    /// Bit rate of each paced stream.
    pub stream_bits_per_sec: u64,
    /// How long the paced streams run.
    pub stream_time: Duration,
    /// Sessions per setup measurement over the delayed link.
    pub delayed_sessions: u64,
    /// How long the paced streams run over the lossy link.
    pub loss_time: Duration,
    /// Idle cameras connected to one relay in the scale scenario.
    pub fleet: usize,
    /// How long the idle fleet is watched (at least one heartbeat period).
    pub idle_time: Duration,
    /// Fleets whose failover from a killed relay is measured (cluster part).
    pub failover_fleets: Vec<usize>,
}

impl Plan {
    /// The default run: short enough for `make bench` on 2 cores.
    pub fn quick(part: Part, paths: Vec<PathKind>) -> Self {
        Plan {
            part,
            paths,
            round_trips: 5_000,
            sessions: 200,
            bytes: 256 << 20,
            streams: 8,
            stream_bits_per_sec: 4_000_000,
            stream_time: Duration::from_secs(15),
            delayed_sessions: 30,
            loss_time: Duration::from_secs(30),
            fleet: 1_000,
            idle_time: Duration::from_secs(35),
            failover_fleets: vec![100, 1_000],
        }
    }

    /// `--long`: more samples, more data, more streams.
    pub fn long(part: Part, paths: Vec<PathKind>) -> Self {
        Plan {
            part,
            paths,
            round_trips: 50_000,
            sessions: 1_000,
            bytes: 2 << 30,
            streams: 32,
            stream_bits_per_sec: 4_000_000,
            stream_time: Duration::from_secs(60),
            delayed_sessions: 200,
            loss_time: Duration::from_secs(180),
            fleet: 5_000,
            idle_time: Duration::from_secs(120),
            failover_fleets: vec![100, 1_000, 5_000],
        }
    }
}

/// One path's figures in one scenario (or why there are none).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The path.
    pub path: PathKind,
    /// Named figures.
    pub figures: BTreeMap<String, f64>,
    /// Why the path has no figures (not installed, failed).
    pub error: Option<String>,
}

/// One scenario's rows.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Short id (file names).
    pub id: String,
    /// Title.
    pub title: String,
    /// What was done.
    pub method: String,
    /// Columns of the table: (figure name, heading).
    pub columns: Vec<(String, String)>,
    /// The figure charted.
    pub chart: String,
    /// One row per path.
    pub rows: Vec<Row>,
}

/// Runs the plan; a path that fails in a scenario is reported in its row.
pub async fn run(plan: &Plan, tools: &Tools) -> anyhow::Result<Vec<Scenario>> {
    let mut scenarios = Vec::new();
    if matches!(plan.part, Part::All | Part::Loopback) {
        scenarios.extend(loopback(plan, tools).await?);
    }
    if matches!(plan.part, Part::All | Part::Scale) && plan.paths.contains(&PathKind::Ours) {
        scenarios.push(scale(plan).await);
    }
    if matches!(plan.part, Part::All | Part::Impaired) {
        scenarios.extend(impaired(plan, tools).await?);
    }
    if matches!(plan.part, Part::All | Part::Cluster) && plan.paths.contains(&PathKind::Ours) {
        scenarios.extend(crate::cluster::run(plan, &std::env::current_exe()?).await?);
    }
    Ok(scenarios)
}

/// Which scenarios run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Every scenario.
    All,
    /// Only those on loopback (latency, setup, throughput, streams).
    Loopback,
    /// Only the idle fleet on one relay (ours).
    Scale,
    /// Only those over the impaired camera link (delayed setup, loss).
    Impaired,
    /// Only the relay cluster's (the relay-to-relay hop, failover), ours only.
    Cluster,
}

/// Starts `bench target` on the camera's side, listening on `ip`.
pub(crate) async fn start_target(
    net: &Net,
    exe: &Path,
    ip: &str,
) -> anyhow::Result<(Child, SocketAddr)> {
    let mut target = net.camera.command(exe);
    target.args(["target", "--listen", &format!("{ip}:0")]);
    let mut target = Child::spawn("target", target)?;
    let ready = target.wait_for_line("READY ").await?;
    let addr = ready
        .trim_start_matches("READY ")
        .trim()
        .parse()
        .with_context(|| format!("bad READY line {ready:?}"))?;
    Ok((target, addr))
}

/// The scenarios on this host's loopback: the tunnels' own costs, nothing else in the way.
async fn loopback(plan: &Plan, tools: &Tools) -> anyhow::Result<Vec<Scenario>> {
    let net = Net::loopback();
    let exe = std::env::current_exe()?;
    let (target, target_addr) = start_target(&net, &exe, "127.0.0.1").await?;

    let mut latency = scenario(
        "latency",
        "Latency: 64-byte request/response",
        &format!(
            "{} round trips of 64 bytes, one at a time, on one session (after 500 unrecorded), loopback.",
            plan.round_trips
        ),
        &[
            ("p50_us", "p50 µs"),
            ("p90_us", "p90 µs"),
            ("p99_us", "p99 µs"),
            ("p999_us", "p99.9 µs"),
            ("added_p50_us", "added p50 µs"),
        ],
        "p50_us",
    );
    let mut setup = scenario(
        "setup",
        "Session setup: TCP connect → first byte from the target",
        &format!(
            "{} sessions one after another, loopback; the target speaks first.",
            plan.sessions
        ),
        &[
            ("p50_us", "p50 µs"),
            ("p99_us", "p99 µs"),
            ("max_us", "max µs"),
        ],
        "p50_us",
    );
    let mut throughput = scenario(
        "throughput",
        "Throughput: one session",
        &format!(
            "{} MiB through one session, each direction, loopback; CPU seconds of the relay and agent sides per GB moved.",
            plan.bytes >> 20
        ),
        &[
            ("down_mbit_s", "camera→Watcher Mbit/s"),
            ("up_mbit_s", "Watcher→camera Mbit/s"),
            ("relay_cpu_s_per_gb", "relay CPU s/GB"),
            ("agent_cpu_s_per_gb", "agent CPU s/GB"),
        ],
        "down_mbit_s",
    );
    let mut throughput_many = scenario(
        "throughput-many-cameras",
        "Throughput: many cameras at once",
        &format!(
            "{} cameras (one agent each, one relay), one session each moving {} MiB camera→Watcher, all at once, loopback; total Mbit/s is all bytes over the slowest session's time; CPU seconds of the relay side and of all agents per GB moved.",
            plan.streams,
            many_camera_bytes(plan) >> 20
        ),
        &[
            ("down_mbit_s", "camera→Watcher Mbit/s, total"),
            ("relay_cpu_s_per_gb", "relay CPU s/GB"),
            ("agent_cpu_s_per_gb", "agents' CPU s/GB"),
        ],
        "down_mbit_s",
    );
    let streams_title = |cameras: &str| {
        format!(
            "{} paced streams of {} Mbit/s ({} fps frames) for {} s {cameras}, loopback. A stream keeps pace when it receives ≥ 95 % of its frames; a stall is a gap over 200 ms between frames.",
            plan.streams,
            plan.stream_bits_per_sec / 1_000_000,
            crate::traffic::FPS,
            plan.stream_time.as_secs()
        )
    };
    let stream_columns = [
        ("kept_pace", "streams keeping pace"),
        ("delay_p99_ms", "frame delay p99 ms"),
        ("gap_max_ms", "longest gap ms"),
        ("stalls", "stalls"),
        ("relay_cpu_s", "relay CPU s"),
        ("agent_cpu_s", "agent CPU s"),
        ("relay_rss_mib", "relay RSS MiB"),
        ("agent_rss_mib", "agent RSS MiB"),
    ];
    let mut one_camera = scenario(
        "streams-one-camera",
        "Many streams through one camera",
        &streams_title("through one camera (one agent)"),
        &stream_columns,
        "delay_p99_ms",
    );
    let mut many_cameras = scenario(
        "streams-many-cameras",
        "Many streams through many cameras",
        &streams_title("through as many cameras (one agent each)"),
        &stream_columns,
        "delay_p99_ms",
    );

    for &kind in &plan.paths {
        eprintln!("bench: {}", kind.name());
        match one_path(kind, plan, tools, &net, target_addr, &exe).await {
            Ok(figures) => {
                for (scenario, figures) in [
                    (&mut latency, figures.latency),
                    (&mut setup, figures.setup),
                    (&mut throughput, figures.throughput),
                    (&mut one_camera, figures.one_camera),
                    (&mut many_cameras, figures.many_cameras),
                    (&mut throughput_many, figures.throughput_many),
                ] {
                    scenario.rows.push(row(kind, figures));
                }
            }
            Err(e) => {
                eprintln!("bench: {}: {e:#}", kind.name());
                for scenario in [
                    &mut latency,
                    &mut setup,
                    &mut throughput,
                    &mut one_camera,
                    &mut many_cameras,
                    &mut throughput_many,
                ] {
                    scenario.rows.push(Row {
                        path: kind,
                        figures: BTreeMap::new(),
                        error: Some(format!("{e:#}")),
                    });
                }
            }
        }
    }
    added_over_direct(&mut latency, "p50_us", "added_p50_us");
    drop(target);
    Ok(vec![
        latency,
        setup,
        throughput,
        throughput_many,
        one_camera,
        many_cameras,
    ])
}

/// The scale scenario: one relay, a fleet of idle cameras (real agents, many per
/// process), over TLS on both links as deployed. What an idle camera costs the relay.
async fn scale(plan: &Plan) -> Scenario {
    let mut scenario = scenario(
        "scale",
        "Scale: idle cameras on one relay",
        &format!(
            "{} agents (the agent crate's own session loop, many in one process) register with one relay over wss:// and QUIC, pinning its certificate, then idle for {} s with the default 30 s heartbeat, loopback. The relay's admission pace is raised to the whole fleet per second, so \"all online\" measures what it can take, not its default pacing (100 a second). Memory per camera is the relay's growth from its empty state divided by the cameras.",
            plan.fleet,
            plan.idle_time.as_secs()
        ),
        &[
            ("cameras", "cameras online"),
            ("online_s", "all online after s"),
            ("relay_rss_mib", "relay RSS MiB"),
            ("relay_kib_per_camera", "relay KiB per camera"),
            ("relay_idle_cpu_pct", "relay idle CPU %"),
            ("agent_kib_per_camera", "agent KiB per camera"),
        ],
        "relay_kib_per_camera",
    );
    eprintln!("bench: {} idle cameras", plan.fleet);
    let figures = fleet(plan).await;
    scenario.rows.push(row(PathKind::Ours, figures));
    scenario
}

async fn fleet(plan: &Plan) -> Figures {
    let dir = tempfile::tempdir()?;
    let certs = e2e::bin("certs")?;
    let made = tokio::process::Command::new(&certs)
        .args(["relay", "--ip", "127.0.0.1", "--out"])
        .arg(dir.path())
        .output()
        .await?;
    anyhow::ensure!(
        made.status.success(),
        "certs relay failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let printed = tokio::process::Command::new(&certs)
        .arg("fingerprint")
        .arg(dir.path().join("relay.crt"))
        .output()
        .await?;
    let fingerprint = String::from_utf8_lossy(&printed.stdout).trim().to_string();
    let control = e2e::free_ports(1)[0];
    let first = e2e::free_port_run(u16::try_from(plan.fleet)?);
    let config = format!(
        "listen = \"127.0.0.1:{control}\"\n\
         camera_ports = \"{first}-{last}\"\n\
         shared_token = \"{token}\"\n\
         [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [limits]\nmax_agents = {max}\nregistrations_per_sec = {max}\n",
        last = first as usize + plan.fleet - 1,
        cert = dir.path().join("relay.crt").display(),
        key = dir.path().join("relay.key").display(),
        max = plan.fleet,
        token = paths::TOKEN,
    );
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, config)?;
    let mut relay = tokio::process::Command::new(e2e::bin("relay")?);
    relay
        .arg("--config")
        .arg(&file)
        .env("RELAY_LOG", "warn,relay=info");
    let mut relay = Child::spawn("relay", relay)?;
    relay.wait_for_line("relay ready").await?;
    let relay_pid = relay.pid().context("relay exited")?;
    let empty = crate::procstat::rss_kib(relay_pid).context("relay exited")?;

    let mut fleet = tokio::process::Command::new(std::env::current_exe()?);
    fleet
        .arg("fleet")
        .args(["--relay", &format!("wss://127.0.0.1:{control}/tunnel")])
        .args(["--token", paths::TOKEN, "--fingerprint", &fingerprint])
        .args(["--count", &plan.fleet.to_string()]);
    let mut fleet = Child::spawn("fleet", fleet)?;
    let ready = fleet
        .wait_for_line_within("READY ", Duration::from_secs(150))
        .await?;
    let online = crate::fleet::parse_ready(&ready)?;
    let fleet_pid = fleet.pid().context("fleet exited")?;

    let meter = Meter::start(vec![relay_pid]);
    tokio::time::sleep(plan.idle_time).await;
    let idle = meter.stop();
    let fleet_rss = crate::procstat::rss_kib(fleet_pid).context("fleet exited")?;
    let cameras = plan.fleet as f64;
    Ok(BTreeMap::from([
        ("cameras".into(), cameras),
        ("online_s".into(), online.as_secs_f64()),
        ("relay_rss_mib".into(), idle.rss_kib as f64 / 1024.0),
        (
            "relay_kib_per_camera".into(),
            idle.rss_kib.saturating_sub(empty) as f64 / cameras,
        ),
        (
            "relay_idle_cpu_pct".into(),
            100.0 * idle.cpu_seconds / plan.idle_time.as_secs_f64(),
        ),
        ("agent_kib_per_camera".into(), fleet_rss as f64 / cameras),
    ]))
}

/// Link delay each way on the impaired camera link.
const DELAY: Duration = Duration::from_millis(25);
/// Packet loss on the lossy camera link.
const LOSS: f64 = 0.02;

/// The scenarios over a bad camera link: the camera behind a NAT router in network
/// namespaces, the router delaying (and dropping) packets in userspace.
async fn impaired(plan: &Plan, tools: &Tools) -> anyhow::Result<Vec<Scenario>> {
    let exe = std::env::current_exe()?;
    let lab = e2e::Lab::new(1)?;
    let net = Net {
        relay: lab.relay(),
        relay_ip: e2e::netns::RELAY_IP.into(),
        camera: lab.camera(0),
        router: Some((lab.nat(), e2e::netns::NAT_PUBLIC_IP.into())),
    };
    let (_target, target) = start_target(&net, &exe, &e2e::netns::camera_ip(0)).await?;
    let rtt_ms = 2.0 * DELAY.as_secs_f64() * 1000.0;

    let mut setup = scenario(
        "setup-delayed",
        "Session setup over a camera link with 25 ms each way",
        &format!(
            "{} sessions one after another from the relay's side; the camera behind NAT, its link delayed {} ms each way (round trip {rtt_ms} ms) in userspace (NFQUEUE). Direct TCP goes through a port forward on the camera's router. In round trips of that link, the physical minimum is 1.",
            plan.delayed_sessions,
            DELAY.as_millis()
        ),
        &[
            ("p50_ms", "p50 ms"),
            ("p50_rtts", "p50 round trips"),
            ("p99_rtts", "p99 round trips"),
        ],
        "p50_rtts",
    );
    let impair = Impairment::start(&lab, &exe, 1, DELAY, 0.0).await?;
    eprintln!("bench: the camera link is impaired with {}", impair.how());
    for &kind in &plan.paths {
        eprintln!("bench: {} over the delayed link", kind.name());
        let figures = async {
            let path = paths::start(kind, &[target], tools, &net).await?;
            let p =
                percentiles(&net, &exe, "setup", path.entries[0], plan.delayed_sessions).await?;
            Ok(BTreeMap::from([
                ("p50_ms".into(), p.p50 / 1000.0),
                ("p50_rtts".into(), p.p50 / 1000.0 / rtt_ms),
                ("p99_rtts".into(), p.p99 / 1000.0 / rtt_ms),
            ]))
        }
        .await;
        setup.rows.push(row(kind, figures));
    }
    impair.stop(&lab).await?;

    let mut lossy = scenario(
        "loss",
        "Streams over a lossy camera link: 2 % loss, 25 ms each way",
        &format!(
            "{} paced streams of {} Mbit/s for {} s through one camera whose link drops 2 % of packets and delays the rest {} ms each way (NFQUEUE). A stall is a gap over 200 ms between frames; with one TCP connection carrying every stream, one lost packet holds up all of them.",
            plan.streams,
            plan.stream_bits_per_sec / 1_000_000,
            plan.loss_time.as_secs(),
            DELAY.as_millis()
        ),
        &[
            ("kept_pace", "streams keeping pace"),
            ("stalls", "stalls"),
            ("gap_p99_ms", "gap p99 ms (worst stream)"),
            ("gap_max_ms", "longest gap ms"),
            ("delay_p99_ms", "frame delay p99 ms"),
        ],
        "gap_p99_ms",
    );
    let impair = Impairment::start(&lab, &exe, 1, DELAY, LOSS).await?;
    let lossy_plan = Plan {
        stream_time: plan.loss_time,
        ..plan.clone()
    };
    for &kind in &plan.paths {
        eprintln!("bench: {} over the lossy link", kind.name());
        let figures = async {
            let path = paths::start(kind, &[target], tools, &net).await?;
            let entries = vec![path.entries[0]; plan.streams];
            paced(&net, &exe, &lossy_plan, &path, &entries).await
        }
        .await;
        lossy.rows.push(row(kind, figures));
    }
    impair.stop(&lab).await?;
    Ok(vec![setup, lossy])
}

fn scenario(
    id: &str,
    title: &str,
    method: &str,
    columns: &[(&str, &str)],
    chart: &str,
) -> Scenario {
    Scenario {
        id: id.into(),
        title: title.into(),
        method: method.into(),
        columns: columns
            .iter()
            .map(|(k, h)| (k.to_string(), h.to_string()))
            .collect(),
        chart: chart.into(),
        rows: Vec::new(),
    }
}

pub(crate) fn row(path: PathKind, figures: anyhow::Result<BTreeMap<String, f64>>) -> Row {
    match figures {
        Ok(figures) => Row {
            path,
            figures,
            error: None,
        },
        Err(e) => Row {
            path,
            figures: BTreeMap::new(),
            error: Some(format!("{e:#}")),
        },
    }
}

fn added_over_direct(scenario: &mut Scenario, figure: &str, added: &str) {
    let direct = scenario
        .rows
        .iter()
        .find(|r| r.path == PathKind::Direct)
        .and_then(|r| r.figures.get(figure).copied());
    if let Some(direct) = direct {
        for row in &mut scenario.rows {
            if let Some(&value) = row.figures.get(figure) {
                row.figures.insert(added.into(), value - direct);
            }
        }
    }
}

type Figures = anyhow::Result<BTreeMap<String, f64>>;

struct PathFigures {
    latency: Figures,
    setup: Figures,
    throughput: Figures,
    one_camera: Figures,
    many_cameras: Figures,
    throughput_many: Figures,
}

/// Bytes each camera's session moves in the many-cameras throughput scenario.
fn many_camera_bytes(plan: &Plan) -> u64 {
    plan.bytes / 4
}

async fn one_path(
    kind: PathKind,
    plan: &Plan,
    tools: &Tools,
    net: &Net,
    target: SocketAddr,
    exe: &Path,
) -> anyhow::Result<PathFigures> {
    let path = paths::start(kind, &[target], tools, net).await?;
    let entry = path.entries[0];
    let latency = async {
        let p = percentiles(net, exe, "latency", entry, plan.round_trips).await?;
        Ok(BTreeMap::from([
            ("p50_us".into(), p.p50),
            ("p90_us".into(), p.p90),
            ("p99_us".into(), p.p99),
            ("p999_us".into(), p.p999),
        ]))
    }
    .await;
    let setup = async {
        let p = percentiles(net, exe, "setup", entry, plan.sessions).await?;
        Ok(BTreeMap::from([
            ("p50_us".into(), p.p50),
            ("p99_us".into(), p.p99),
            ("max_us".into(), p.max),
        ]))
    }
    .await;
    let throughput = async {
        let meters =
            [Role::Relay, Role::Agent].map(|role| Meter::start(pids(&path.processes, role)));
        let bytes = plan.bytes.to_string();
        let down: Throughput = client(
            net,
            exe,
            &["throughput", &entry.to_string(), "--bytes", &bytes],
        )
        .await?;
        let up: Throughput = client(
            net,
            exe,
            &["throughput", &entry.to_string(), "--bytes", &bytes, "--up"],
        )
        .await?;
        let [relay, agent] = meters.map(|m| m.stop());
        let gb = 2.0 * plan.bytes as f64 / 1e9;
        let mut figures = BTreeMap::from([
            ("down_mbit_s".into(), down.bits_per_sec / 1e6),
            ("up_mbit_s".into(), up.bits_per_sec / 1e6),
        ]);
        cpu_per_gb(kind, &mut figures, [relay, agent], gb);
        Ok(figures)
    }
    .await;
    let one_camera = paced(net, exe, plan, &path, &vec![entry; plan.streams]).await;
    drop(path);

    let (many_cameras, throughput_many) =
        match paths::start(kind, &vec![target; plan.streams], tools, net).await {
            Ok(path) => {
                let entries = path.entries.clone();
                let paced = paced(net, exe, plan, &path, &entries).await;
                let bulk = bulk(kind, net, exe, plan, &path).await;
                (paced, bulk)
            }
            Err(e) => (Err(anyhow::anyhow!("{e:#}")), Err(e)),
        };
    Ok(PathFigures {
        latency,
        setup,
        throughput,
        one_camera,
        many_cameras,
        throughput_many,
    })
}

/// One bulk session per camera of `path`, all at once, camera→Watcher.
async fn bulk(
    kind: PathKind,
    net: &Net,
    exe: &Path,
    plan: &Plan,
    path: &paths::Running,
) -> Figures {
    let meters = [Role::Relay, Role::Agent].map(|role| Meter::start(pids(&path.processes, role)));
    let bytes = many_camera_bytes(plan).to_string();
    let sessions =
        path.entries.iter().map(|entry| {
            let entry = entry.to_string();
            let bytes = bytes.clone();
            async move {
                client::<Throughput>(net, exe, &["throughput", &entry, "--bytes", &bytes]).await
            }
        });
    let results = futures_util::future::join_all(sessions)
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let [relay, agent] = meters.map(|m| m.stop());
    let moved: u64 = results.iter().map(|r| r.bytes).sum();
    let slowest = results.iter().map(|r| r.seconds).fold(0.0, f64::max);
    let gb = moved as f64 / 1e9;
    let mut figures = BTreeMap::from([("down_mbit_s".into(), moved as f64 * 8.0 / slowest / 1e6)]);
    cpu_per_gb(kind, &mut figures, [relay, agent], gb);
    Ok(figures)
}

/// The relay's and the agents' CPU seconds per GB moved (direct TCP has no tunnel).
fn cpu_per_gb(
    kind: PathKind,
    figures: &mut BTreeMap<String, f64>,
    [relay, agent]: [Usage; 2],
    gb: f64,
) {
    if kind != PathKind::Direct {
        figures.insert("relay_cpu_s_per_gb".into(), relay.cpu_seconds / gb);
        figures.insert("agent_cpu_s_per_gb".into(), agent.cpu_seconds / gb);
    }
}

async fn paced(
    net: &Net,
    exe: &Path,
    plan: &Plan,
    path: &paths::Running,
    entries: &[SocketAddr],
) -> Figures {
    let meters = [Role::Relay, Role::Agent].map(|role| Meter::start(pids(&path.processes, role)));
    let mut args = vec![
        "streams".to_string(),
        "--bits-per-sec".into(),
        plan.stream_bits_per_sec.to_string(),
        "--seconds".into(),
        plan.stream_time.as_secs().to_string(),
    ];
    args.extend(entries.iter().map(ToString::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let reports: Vec<StreamReport> = client(net, exe, &args).await?;
    let [relay, agent]: [Usage; 2] = meters.map(|m| m.stop());
    let kept = reports
        .iter()
        .filter(|r| r.frames * 100 >= r.frames_expected * 95)
        .count();
    let worst = |f: fn(&StreamReport) -> f64| reports.iter().map(f).fold(0.0, f64::max);
    let mut figures = BTreeMap::from([
        ("kept_pace".into(), kept as f64),
        ("delay_p99_ms".into(), worst(|r| r.delay.p99) / 1000.0),
        ("gap_max_ms".into(), worst(|r| r.gaps.max) / 1000.0),
        ("gap_p99_ms".into(), worst(|r| r.gaps.p99) / 1000.0),
        (
            "stalls".into(),
            reports.iter().map(|r| r.stalls).sum::<u64>() as f64,
        ),
    ]);
    // Direct TCP has no tunnel processes to measure.
    if !path.processes.is_empty() {
        figures.extend([
            ("relay_cpu_s".into(), relay.cpu_seconds),
            ("agent_cpu_s".into(), agent.cpu_seconds),
            ("relay_rss_mib".into(), relay.rss_kib as f64 / 1024.0),
            ("agent_rss_mib".into(), agent.rss_kib as f64 / 1024.0),
        ]);
    }
    Ok(figures)
}

fn pids(processes: &[(Role, Child)], role: Role) -> Vec<u32> {
    processes
        .iter()
        .filter(|(r, _)| *r == role)
        .filter_map(|(_, c)| c.pid())
        .collect()
}

/// `bench client <measure> <entry> --count <count>`: a latency or setup distribution.
async fn percentiles(
    net: &Net,
    exe: &Path,
    measure: &str,
    entry: SocketAddr,
    count: u64,
) -> anyhow::Result<Percentiles> {
    let (entry, count) = (entry.to_string(), count.to_string());
    client(net, exe, &[measure, &entry, "--count", &count]).await
}

/// Runs `bench client <args>` on the Watchers' side and parses its result line.
pub(crate) async fn client<T: serde::de::DeserializeOwned>(
    net: &Net,
    exe: &Path,
    args: &[&str],
) -> anyhow::Result<T> {
    let out = net
        .relay
        .command(exe)
        .arg("client")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| {
            format!(
                "bench client {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    Ok(serde_json::from_str(result)?)
}
