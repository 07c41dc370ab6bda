//! The cluster part (`bench run --part cluster`): relays sharing a real etcd, as
//! deployed (wss:// and QUIC with a pinned certificate, relay-to-relay links with
//! certificates of the cluster's CA).
//!
//! - What the relay-to-relay hop costs: one camera, held by relay B, reached directly
//!   at B and at relay A (its own port served there too, `remote_camera_ports`), in
//!   one run: latency, throughput, and each relay's CPU per GB.
//! - Failover: a fleet whose cameras list both relays spreads over them; relay A is
//!   SIGKILLed, and every camera it held is probed at its port on relay B until the
//!   camera's own RTSP server (the bench target, which speaks first) answers through
//!   its new tunnel.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    ops::RangeInclusive,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use e2e::{Child, EtcdCluster};

use crate::{
    paths::{Net, PathKind, TOKEN},
    procstat::Meter,
    run::{client, row, start_target, Plan, Row, Scenario},
    traffic::{Percentiles, Throughput},
};

/// The etcd lease of the bench's relays.
const LEASE_TTL_SECS: u64 = 5;

/// Longest a camera of a killed relay may take to answer on the other.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(120);

/// Pause between probes of a camera that does not answer yet.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// Runs the cluster scenarios.
pub(crate) async fn run(plan: &Plan, exe: &Path) -> anyhow::Result<Vec<Scenario>> {
    let mut scenarios = vec![hop(plan, exe).await];
    for &cameras in &plan.failover_fleets {
        scenarios.push(failover(cameras, exe).await);
    }
    Ok(scenarios)
}

/// An etcd, the relays' TLS files, and the cluster's CA with a peer certificate for
/// each relay.
struct Lab {
    etcd: EtcdCluster,
    dir: tempfile::TempDir,
    fingerprint: String,
}

impl Lab {
    async fn new(relays: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().to_str().context("temporary directory")?;
        e2e::certs(&["relay", "--ip", "127.0.0.1", "--out", out]).await?;
        e2e::certs(&["ca", "--out", out]).await?;
        for id in relays {
            e2e::certs(&["peer", "--id", id, "--ca", out, "--out", out]).await?;
        }
        let printed = tokio::process::Command::new(e2e::bin("certs")?)
            .arg("fingerprint")
            .arg(dir.path().join("relay.crt"))
            .output()
            .await?;
        let fingerprint = String::from_utf8_lossy(&printed.stdout).trim().to_string();
        Ok(Lab {
            etcd: EtcdCluster::start(1).await?,
            dir,
            fingerprint,
        })
    }

    /// Starts relay `id` with camera ports `ports` on `camera_ip`, for up to `cameras`
    /// cameras (all admitted at once: the fleet's arrival is what is measured), with
    /// `extra` lines in `[cluster]`; returns it and its control URL.
    async fn relay(
        &self,
        id: &str,
        camera_ip: &str,
        ports: &RangeInclusive<u16>,
        cameras: usize,
        extra: &str,
    ) -> anyhow::Result<(Child, String)> {
        let control = e2e::free_ports(1)[0];
        let file = |name: &str| self.dir.path().join(name).display().to_string();
        let endpoints: Vec<String> = self
            .etcd
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        let config = format!(
            "listen = \"127.0.0.1:{control}\"\n\
             camera_bind = \"{camera_ip}\"\n\
             camera_ports = \"{}-{}\"\n\
             shared_token = \"{TOKEN}\"\n\
             [tls]\ncert = {:?}\nkey = {:?}\n\
             [limits]\nmax_agents = {cameras}\nregistrations_per_sec = {cameras}\n\
             [cluster]\netcd_endpoints = [{}]\nrelay_id = \"{id}\"\n\
             advertise = \"https://127.0.0.1:{control}\"\nlease_ttl_secs = {LEASE_TTL_SECS}\n{extra}",
            ports.start(),
            ports.end(),
            file("relay.crt"),
            file("relay.key"),
            endpoints.join(", "),
        );
        let path = self.dir.path().join(format!("{id}.toml"));
        std::fs::write(&path, config)?;
        let mut relay = tokio::process::Command::new(e2e::bin("relay")?);
        relay
            .arg("--config")
            .arg(&path)
            .env("RELAY_LOG", "warn,relay=info");
        let mut relay = Child::spawn(id, relay)?;
        relay.wait_for_line("relay ready").await?;
        Ok((relay, format!("wss://127.0.0.1:{control}/tunnel")))
    }

    /// `[cluster]` lines of relay `id`'s relay-to-relay link.
    fn peer_lines(&self, id: &str) -> String {
        let file = |name: &str| self.dir.path().join(name).display().to_string();
        format!(
            "peer_listen = \"127.0.0.1:{}\"\npeer_cert = {:?}\npeer_key = {:?}\npeer_ca = {:?}\n",
            e2e::free_ports(1)[0],
            file(&format!("peer-{id}.crt")),
            file(&format!("peer-{id}.key")),
            file("ca.crt"),
        )
    }
}

/// The hop scenario: direct to the holding relay, and through another, one run.
async fn hop(plan: &Plan, exe: &Path) -> Scenario {
    let mut scenario = Scenario {
        id: "cluster-hop".into(),
        title: "Cluster: the relay-to-relay hop".into(),
        method: format!(
            "Two relays sharing an etcd; one camera (agent) on relay B. The Watcher reaches it at B (direct to the holding relay) and at relay A, which carries it to B over their QUIC link (mutual TLS). {} round trips of 64 bytes; {} MiB each direction through one session; CPU seconds per GB moved of the holding relay, of the relay in between, and of the agent. Loopback.",
            plan.round_trips,
            plan.bytes >> 20
        ),
        columns: [
            ("p50_us", "p50 µs"),
            ("p99_us", "p99 µs"),
            ("added_p50_us", "added p50 µs"),
            ("down_mbit_s", "camera→Watcher Mbit/s"),
            ("up_mbit_s", "Watcher→camera Mbit/s"),
            ("relay_cpu_s_per_gb", "holding relay CPU s/GB"),
            ("hop_cpu_s_per_gb", "relay in between CPU s/GB"),
            ("agent_cpu_s_per_gb", "agent CPU s/GB"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .to_vec(),
        chart: "p50_us".into(),
        rows: Vec::new(),
    };
    eprintln!("bench: cluster hop");
    match hop_figures(plan, exe).await {
        Ok(rows) => scenario.rows = rows,
        Err(e) => {
            eprintln!("bench: cluster hop: {e:#}");
            for path in [PathKind::Ours, PathKind::OursViaPeer] {
                scenario.rows.push(row(path, Err(anyhow::anyhow!("{e:#}"))));
            }
        }
    }
    scenario
}

async fn hop_figures(plan: &Plan, exe: &Path) -> anyhow::Result<Vec<Row>> {
    let net = Net::loopback();
    let lab = Lab::new(&["relay-a", "relay-b"]).await?;
    let (mut target, target_addr) = start_target(&Net::loopback(), exe, "127.0.0.1").await?;
    let first = e2e::free_port_run(1);
    let ports = first..=first;
    let (holder, holder_url) = lab
        .relay(
            "relay-b",
            "127.0.0.1",
            &ports,
            1,
            &lab.peer_lines("relay-b"),
        )
        .await?;
    let extra = format!("{}remote_camera_ports = true\n", lab.peer_lines("relay-a"));
    let (between, _) = lab.relay("relay-a", "127.0.0.2", &ports, 1, &extra).await?;
    let config = serde_json::json!({
        "agent": {
            "agent_id": "bench-0",
            "tunnel_server_url": holder_url,
            "tunnel_server_token": TOKEN,
            "log_level": "WARNING",
        },
        "security": { "relay_fingerprint": lab.fingerprint },
        "tunnel": { "tunnel_port": first, "max_streams": 1024 },
        "streaming": { "rtsp_host": target_addr.ip(), "rtsp_port": target_addr.port() },
    });
    let file = lab.dir.path().join("agent.json");
    std::fs::write(&file, config.to_string())?;
    let mut agent = tokio::process::Command::new(e2e::bin("camera-agent")?);
    agent
        .arg("--config")
        .arg(&file)
        .env("AGENT_LOG", "warn,agent=info");
    let mut agent = Child::spawn("agent", agent)?;
    agent
        .wait_for_line("online: the relay serves this camera")
        .await?;
    let direct = SocketAddr::from(([127, 0, 0, 1], first));
    let via = SocketAddr::from(([127, 0, 0, 2], first));
    // Relay A opens the camera's port once its view has the camera.
    first_byte(via, e2e::READY_TIMEOUT).await?;

    let pid = |child: &Child| child.pid().context("a bench process exited");
    let pids = [pid(&holder)?, pid(&between)?, pid(&agent)?];
    let mut rows = Vec::new();
    let mut direct_p50 = None;
    for (path, entry) in [(PathKind::Ours, direct), (PathKind::OursViaPeer, via)] {
        let figures = async {
            let latency: Percentiles = client(
                &net,
                exe,
                &[
                    "latency",
                    &entry.to_string(),
                    "--count",
                    &plan.round_trips.to_string(),
                ],
            )
            .await?;
            let meters = pids.map(|p| Meter::start(vec![p]));
            let bytes = plan.bytes.to_string();
            let mut bits = Vec::new();
            for up in [false, true] {
                let mut args = vec!["throughput", &*entry.to_string(), "--bytes", &bytes]
                    .into_iter()
                    .map(str::to_string)
                    .collect::<Vec<_>>();
                if up {
                    args.push("--up".into());
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let moved: Throughput = client(&net, exe, &args).await?;
                bits.push(moved.bits_per_sec / 1e6);
            }
            let [holder, between, agent] = meters.map(|m| m.stop().cpu_seconds);
            let gb = 2.0 * plan.bytes as f64 / 1e9;
            let mut figures = BTreeMap::from([
                ("p50_us".to_string(), latency.p50),
                ("p99_us".to_string(), latency.p99),
                ("down_mbit_s".to_string(), bits[0]),
                ("up_mbit_s".to_string(), bits[1]),
                ("relay_cpu_s_per_gb".to_string(), holder / gb),
                ("agent_cpu_s_per_gb".to_string(), agent / gb),
            ]);
            match direct_p50 {
                None => direct_p50 = Some(latency.p50),
                Some(direct) => {
                    figures.insert("added_p50_us".into(), latency.p50 - direct);
                    figures.insert("hop_cpu_s_per_gb".into(), between / gb);
                }
            }
            anyhow::Ok(figures)
        }
        .await;
        rows.push(row(path, figures));
    }
    target.kill().await?;
    Ok(rows)
}

/// The failover scenario with `cameras` cameras.
async fn failover(cameras: usize, exe: &Path) -> Scenario {
    let mut scenario = Scenario {
        id: format!("failover-{cameras}"),
        title: format!("Cluster: failover of {cameras} cameras"),
        method: format!(
            "{cameras} cameras (real agents, in one process), each listing both relays of a two-relay cluster, spread over them by their ids. Relay A is SIGKILLed; each camera it held is probed at its port on relay B every {} ms until the camera's own server answers through the camera's new tunnel. The relays admit the whole fleet at once (limits.registrations_per_sec), so this is what they can take, not the default pace of 100 a second. Loopback.",
            PROBE_EVERY.as_millis()
        ),
        columns: [
            ("cameras", "cameras"),
            ("moved", "cameras on the killed relay"),
            ("back_p50_s", "back p50 s"),
            ("back_p99_s", "back p99 s"),
            ("back_all_s", "all back s"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .to_vec(),
        chart: "back_all_s".into(),
        rows: Vec::new(),
    };
    eprintln!("bench: cluster failover, {cameras} cameras");
    let figures = failover_figures(cameras, exe).await;
    if let Err(e) = &figures {
        eprintln!("bench: cluster failover: {e:#}");
    }
    scenario.rows.push(row(PathKind::Ours, figures));
    scenario
}

async fn failover_figures(cameras: usize, exe: &Path) -> anyhow::Result<BTreeMap<String, f64>> {
    let lab = Lab::new(&[]).await?;
    let (mut target, target_addr) = start_target(&Net::loopback(), exe, "127.0.0.1").await?;
    let first = e2e::free_port_run(u16::try_from(cameras)?);
    let ports = first..=first + u16::try_from(cameras - 1)?;
    let (mut doomed, doomed_url) = lab
        .relay("relay-a", "127.0.0.1", &ports, cameras, "")
        .await?;
    let (_survivor, survivor_url) = lab
        .relay("relay-b", "127.0.0.1", &ports, cameras, "")
        .await?;
    let mut fleet = tokio::process::Command::new(exe);
    fleet
        .arg("fleet")
        .args(["--relay", &format!("{doomed_url},{survivor_url}")])
        .args(["--target", &target_addr.to_string()])
        .args(["--token", TOKEN, "--fingerprint", &lab.fingerprint])
        .args(["--count", &cameras.to_string()]);
    let mut fleet = Child::spawn("fleet", fleet)?;
    fleet
        .wait_for_line_within("READY ", Duration::from_secs(150))
        .await?;

    // Where each camera is, as the cluster knows it.
    let mut moving = Vec::new();
    for (_, value) in lab.etcd.get_prefix("/camera-relay/cameras/").await? {
        let record: serde_json::Value = serde_json::from_str(&value)?;
        if record["relay"] == "relay-a" {
            let port = record["port"]
                .as_u64()
                .context("a camera record without port")?;
            moving.push(SocketAddr::from(([127, 0, 0, 1], u16::try_from(port)?)));
        }
    }
    anyhow::ensure!(!moving.is_empty(), "no camera chose relay A");

    doomed.kill().await?;
    let killed = Instant::now();
    let probes = moving.iter().map(|&addr| async move {
        first_byte(addr, FAILOVER_DEADLINE).await?;
        anyhow::Ok(killed.elapsed().as_secs_f64())
    });
    let mut back: Vec<f64> = futures_util::future::join_all(probes)
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    back.sort_by(f64::total_cmp);
    let at = |q: f64| back[((back.len() - 1) as f64 * q).round() as usize];
    let figures = BTreeMap::from([
        ("cameras".to_string(), cameras as f64),
        ("moved".to_string(), back.len() as f64),
        ("back_p50_s".to_string(), at(0.5)),
        ("back_p99_s".to_string(), at(0.99)),
        ("back_all_s".to_string(), at(1.0)),
    ]);
    fleet.kill().await?;
    target.kill().await?;
    Ok(figures)
}

/// Connects to `addr` until the target's hello comes through, for at most `within`.
async fn first_byte(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let attempt = async {
            let mut tcp = tokio::net::TcpStream::connect(addr).await?;
            let mut hello = [0u8; 1];
            tcp.read_exact(&mut hello).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            _ if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("nothing answered through {addr} within {within:?}")
            }
            _ => tokio::time::sleep(PROBE_EVERY).await,
        }
    }
}
