//! The paths a Watcher's connection can take to the camera, each started the way its
//! users start it: direct TCP, our relay and agent, rathole (TCP and Noise transports),
//! bore, and rusnel. A path carries one or more cameras (targets); each camera gets
//! its own client process (agent), as each real camera runs its own.

use std::{net::SocketAddr, path::Path};

use anyhow::{bail, Context as _};
use e2e::{bin, free_port_run, free_ports, Child, Place};
use serde::Serialize;

use crate::peers::Tools;

/// A way through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// The Watcher connects to the target itself: the floor every tunnel is measured
    /// against.
    Direct,
    /// TCP over quinn with nothing else (`bench::floor`), with our data plane's
    /// transport config: the QUIC stack's own cost, the floor for ours.
    Floor,
    /// Our relay and agent: WebSocket control link, one QUIC stream per connection.
    Ours,
    /// Ours in a cluster, the Watcher at a relay that does not hold the camera: one more
    /// hop, relay to relay over QUIC (the cluster part only).
    OursViaPeer,
    /// rathole over plain TCP (one control connection, a new data connection per
    /// visitor, pre-opened in a pool).
    RatholeTcp,
    /// rathole with its Noise transport (encrypted, like ours).
    RatholeNoise,
    /// bore (a new TCP connection from client to server per visitor).
    Bore,
    /// rusnel: quinn-based QUIC tunnel with reverse remotes, the closest QUIC peer.
    Rusnel,
}

impl PathKind {
    /// Every path, in report order.
    pub const ALL: [PathKind; 7] = [
        PathKind::Direct,
        PathKind::Floor,
        PathKind::Ours,
        PathKind::RatholeTcp,
        PathKind::RatholeNoise,
        PathKind::Bore,
        PathKind::Rusnel,
    ];

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct TCP",
            PathKind::Floor => "quinn, no tunnel (floor)",
            PathKind::Ours => "ours (QUIC)",
            PathKind::OursViaPeer => "ours, through another relay",
            PathKind::RatholeTcp => "rathole (TCP)",
            PathKind::RatholeNoise => "rathole (Noise)",
            PathKind::Bore => "bore",
            PathKind::Rusnel => "rusnel (QUIC)",
        }
    }
}

/// Which side of the tunnel a process runs on, for CPU and memory figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The relay (server) side.
    Relay,
    /// The camera (client) side.
    Agent,
}

/// A started path.
#[derive(Debug)]
pub struct Running {
    /// Where the Watcher connects for camera `i`.
    pub entries: Vec<SocketAddr>,
    /// The tunnel's processes (none for direct).
    pub processes: Vec<(Role, Child)>,
    /// Config files and keys, removed when the path stops.
    _dir: tempfile::TempDir,
}

/// Where the pieces run (loopback today; network namespaces for the impaired link).
#[derive(Debug, Clone)]
pub struct Net {
    /// The relay's side: relay servers and Watchers.
    pub relay: Place,
    /// The address the relay side listens on and agents dial.
    pub relay_ip: String,
    /// The camera's side: agents and targets.
    pub camera: Place,
    /// The camera's NAT router and its public address, where direct TCP goes through
    /// a port forward (None on loopback, where the Watcher reaches the target itself).
    pub router: Option<(Place, String)>,
}

impl Net {
    /// Everything on this host's loopback.
    pub fn loopback() -> Self {
        Net {
            relay: Place::host(),
            relay_ip: "127.0.0.1".into(),
            camera: Place::host(),
            router: None,
        }
    }
}

/// The registration token every tunnel of the bench uses.
pub(crate) const TOKEN: &str = "bench-token-0123456789abcdef";

/// Starts `kind` for cameras at `targets`.
pub async fn start(
    kind: PathKind,
    targets: &[SocketAddr],
    tools: &Tools,
    net: &Net,
) -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let mut processes = Vec::new();
    let relay_ip = &net.relay_ip;
    let entries: Vec<SocketAddr> = match kind {
        PathKind::Direct => match &net.router {
            None => targets.to_vec(),
            Some((router, public_ip)) => {
                // A port forward on the camera's router, as for direct access today.
                for target in targets {
                    let port = target.port().to_string();
                    e2e::netns::run(
                        router,
                        "iptables",
                        &[
                            "-t",
                            "nat",
                            "-A",
                            "PREROUTING",
                            "-d",
                            public_ip,
                            "-p",
                            "tcp",
                            "--dport",
                            &port,
                            "-j",
                            "DNAT",
                            "--to-destination",
                            &target.to_string(),
                        ],
                    )?;
                }
                targets
                    .iter()
                    .map(|t| Ok(SocketAddr::new(public_ip.parse()?, t.port())))
                    .collect::<anyhow::Result<_>>()?
            }
        },
        PathKind::Ours => {
            let control = free_ports(1)[0];
            // The relay's camera ports are a run starting at --tunnel-port.
            let first_camera = free_port_run(targets.len() as u16);
            let mut relay = net.relay.command(bin("relay")?);
            relay
                .args(["--bind", relay_ip, "--port", &control.to_string()])
                .args(["--tunnel-port", &first_camera.to_string()])
                // One data-plane shard per core, as a relay carrying many cameras runs.
                .args(["--data-shards", "auto"])
                .env("RELAY_TOKEN", TOKEN)
                .env("RELAY_LOG", "warn,relay=info");
            let mut relay = Child::spawn("relay", relay)?;
            relay.wait_for_line("relay ready").await?;
            processes.push((Role::Relay, relay));
            let mut entries = Vec::new();
            for (i, target) in targets.iter().enumerate() {
                let port = first_camera + i as u16;
                let config = serde_json::json!({
                    "agent": {
                        "agent_id": format!("bench-{i}"),
                        "tunnel_server_url": format!("ws://{relay_ip}:{control}/tunnel"),
                        "tunnel_server_token": TOKEN,
                        "log_level": "WARNING",
                    },
                    "tunnel": { "tunnel_port": port, "max_streams": 1024 },
                    "streaming": { "rtsp_host": target.ip(), "rtsp_port": target.port() },
                });
                let file = dir.path().join(format!("agent-{i}.json"));
                std::fs::write(&file, config.to_string())?;
                let mut agent = net.camera.command(bin("camera-agent")?);
                agent
                    .arg("--config")
                    .arg(&file)
                    .env("AGENT_LOG", "warn,agent=info");
                let mut agent = Child::spawn(&format!("agent-{i}"), agent)?;
                agent
                    .wait_for_line("online: the relay serves this camera")
                    .await?;
                processes.push((Role::Agent, agent));
                // The relay serves cameras on its own host's loopback, as for a VMS
                // next to it.
                entries.push(SocketAddr::from(([127, 0, 0, 1], port)));
            }
            entries
        }
        PathKind::Floor => floor(targets, net, &mut processes).await?,
        PathKind::OursViaPeer => {
            bail!("a path through another relay needs a cluster: `bench run --part cluster`")
        }
        PathKind::RatholeTcp | PathKind::RatholeNoise => {
            rathole(kind, targets, tools, net, dir.path(), &mut processes).await?
        }
        PathKind::Bore => {
            let exe = tools.path("bore")?;
            // bore's control port is fixed (7835); one bore server at a time.
            let mut server = net.relay.command(&exe);
            server.args(["server", "--min-port", "1024", "--max-port", "65535"]);
            server.args(["--bind-addr", relay_ip]);
            server.env("RUST_LOG", "info");
            let mut server = Child::spawn("bore-server", server)?;
            server.wait_for_line("server listening").await?;
            processes.push((Role::Relay, server));
            let ports = free_ports(targets.len());
            let mut entries = Vec::new();
            for (i, target) in targets.iter().enumerate() {
                let mut client = net.camera.command(&exe);
                client
                    .args(["local", &target.port().to_string()])
                    .args(["--local-host", &target.ip().to_string()])
                    .args(["--to", relay_ip, "--port", &ports[i].to_string()])
                    .env("RUST_LOG", "info");
                let mut client = Child::spawn(&format!("bore-{i}"), client)?;
                client.wait_for_line("listening at").await?;
                processes.push((Role::Agent, client));
                entries.push(SocketAddr::new(relay_ip.parse()?, ports[i]));
            }
            entries
        }
        PathKind::Rusnel => {
            let exe = tools.path("rusnel")?;
            let ports = free_ports(1 + targets.len());
            let control = format!("{relay_ip}:{}", ports[0]);
            // Its own advice: BBR where the link has delay or loss.
            let congestion = if net.router.is_some() { "bbr" } else { "cubic" };
            let mut server = net.relay.command(&exe);
            server
                .args(["server", "--host", relay_ip])
                .args(["--port", &ports[0].to_string()])
                .args([
                    "--allow-reverse",
                    "--no-admin-socket",
                    "--congestion",
                    congestion,
                ])
                // A self-signed identity the clients pin, as ours pins its relay.
                .args(["--tls-self-signed", "--tls-state-dir"])
                .arg(dir.path().join("rusnel"));
            let mut server = Child::spawn("rusnel-server", server)?;
            let line = server.wait_for_line("server cert fingerprint").await?;
            let fingerprint = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("fingerprint="))
                .with_context(|| format!("no fingerprint in rusnel's line {line:?}"))?
                .to_string();
            server.wait_for_line("server listening").await?;
            processes.push((Role::Relay, server));
            let mut entries = Vec::new();
            for (i, target) in targets.iter().enumerate() {
                let remote = format!("R:{relay_ip}:{}:{target}", ports[1 + i]);
                let mut client = net.camera.command(&exe);
                client
                    .args(["client", "--tls-fingerprint", &fingerprint])
                    .args(["--congestion", congestion, &control, &remote]);
                let mut client = Child::spawn(&format!("rusnel-{i}"), client)?;
                client.wait_for_line("tunnel registered").await?;
                processes.push((Role::Agent, client));
                let entry = SocketAddr::new(relay_ip.parse()?, ports[1 + i]);
                wait_listening(net, entry).await?;
                entries.push(entry);
            }
            entries
        }
    };
    Ok(Running {
        entries,
        processes,
        _dir: dir,
    })
}

/// The floor path ([`crate::floor`]): its relay side, and a camera side per target.
async fn floor(
    targets: &[SocketAddr],
    net: &Net,
    processes: &mut Vec<(Role, Child)>,
) -> anyhow::Result<Vec<SocketAddr>> {
    let exe = std::env::current_exe()?;
    let relay_ip = &net.relay_ip;
    let mut relay = net.relay.command(&exe);
    relay
        .arg("floor-relay")
        .args(["--quic", &format!("{relay_ip}:0"), "--tcp-ip", relay_ip])
        .args(["--cameras", &targets.len().to_string()]);
    let mut relay = Child::spawn("floor-relay", relay)?;
    let ready = relay.wait_for_line("READY ").await?;
    let field = |name: &str| {
        ready
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
            .with_context(|| format!("no {name} in {ready:?}"))
    };
    let (quic, sha256, entries) = (field("quic=")?, field("sha256=")?, field("entries=")?);
    let entries = entries
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    processes.push((Role::Relay, relay));
    for (i, target) in targets.iter().enumerate() {
        let mut camera = net.camera.command(&exe);
        camera
            .arg("floor-camera")
            .args(["--relay", &quic, "--sha256", &sha256])
            .args(["--index", &i.to_string(), "--target", &target.to_string()]);
        let mut camera = Child::spawn(&format!("floor-{i}"), camera)?;
        camera.wait_for_line("READY").await?;
        processes.push((Role::Agent, camera));
    }
    Ok(entries)
}

async fn rathole(
    kind: PathKind,
    targets: &[SocketAddr],
    tools: &Tools,
    net: &Net,
    dir: &Path,
    processes: &mut Vec<(Role, Child)>,
) -> anyhow::Result<Vec<SocketAddr>> {
    let exe = tools.path("rathole")?;
    let relay_ip = &net.relay_ip;
    let ports = free_ports(1 + targets.len());
    let (server_transport, client_transport) = if kind == PathKind::RatholeNoise {
        let (private, public) = rathole_keys(&exe).await?;
        (
            format!("[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"),
            format!("[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"),
        )
    } else {
        (String::new(), String::new())
    };
    let mut server = format!(
        "[server]\nbind_addr = \"{relay_ip}:{}\"\n{server_transport}",
        ports[0]
    );
    let mut entries = Vec::new();
    for (i, _) in targets.iter().enumerate() {
        server += &format!(
            "[server.services.cam{i}]\ntoken = \"{TOKEN}\"\nbind_addr = \"{relay_ip}:{}\"\n",
            ports[1 + i]
        );
        entries.push(SocketAddr::new(relay_ip.parse()?, ports[1 + i]));
    }
    let server_file = dir.join("rathole-server.toml");
    std::fs::write(&server_file, server)?;
    let mut cmd = net.relay.command(&exe);
    cmd.arg("--server")
        .arg(&server_file)
        .env("RUST_LOG", "info");
    let mut server = Child::spawn("rathole-server", cmd)?;
    server.wait_for_line("Listening at").await?;
    processes.push((Role::Relay, server));
    for (i, target) in targets.iter().enumerate() {
        let client = format!(
            "[client]\nremote_addr = \"{relay_ip}:{}\"\n{client_transport}\
             [client.services.cam{i}]\ntoken = \"{TOKEN}\"\nlocal_addr = \"{target}\"\n",
            ports[0]
        );
        let file = dir.join(format!("rathole-client-{i}.toml"));
        std::fs::write(&file, client)?;
        let mut cmd = net.camera.command(&exe);
        cmd.arg("--client").arg(&file).env("RUST_LOG", "info");
        let mut client = Child::spawn(&format!("rathole-{i}"), cmd)?;
        client.wait_for_line("Control channel established").await?;
        processes.push((Role::Agent, client));
    }
    for &entry in &entries {
        wait_listening(net, entry).await?;
    }
    Ok(entries)
}

/// A fresh Noise key pair from `rathole --genkey`.
async fn rathole_keys(exe: &Path) -> anyhow::Result<(String, String)> {
    let out = tokio::process::Command::new(exe)
        .arg("--genkey")
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let mut key_after = |label: &str| -> anyhow::Result<String> {
        for line in lines.by_ref() {
            if line.contains(label) {
                return lines
                    .next()
                    .map(|k| k.trim().to_string())
                    .with_context(|| format!("no key after {label:?} in {text}"));
            }
        }
        bail!("rathole --genkey printed no {label:?}: {text}")
    };
    let private = key_after("Private Key")?;
    let public = key_after("Public Key")?;
    Ok((private, public))
}

/// Waits until something accepts TCP connections at `addr` (from the relay's side).
async fn wait_listening(net: &Net, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = net
            .relay
            .command("bash")
            .arg("-c")
            .arg(format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()))
            .status()
            .await?;
        if status.success() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nothing listens at {addr} after 30 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
