//! End-to-end harness shared by the tests and `make demo`: start a relay and agents
//! (in-process or as the real binaries), the camera simulator (gst-rtsp-server), and
//! real RTSP clients (ffprobe); wait on readiness, never on fixed sleeps; clean up
//! every process on drop.

#![forbid(unsafe_code)]

pub mod arm;
pub mod browser;
mod etcd;
mod fleet;
pub mod netns;

pub use etcd::{EtcdCluster, EtcdTls};
pub use fleet::Fleet;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use agent::{Agent, AgentConfig, AgentState};
use anyhow::{bail, Context as _};
use common::{protocol::Rejection, Secret};
use relay::{Registry, Relay, RelayConfig};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    sync::{watch, Notify},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub use netns::{Lab, Place};

/// Longest wait for anything to become ready. Generous: tests must not be flaky on a
/// loaded 2-core machine, and a ready thing is seen at once anyway.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The main stream of a Dahua camera.
pub const MAIN_STREAM: &str = "/cam/realmonitor?channel=1&subtype=0";
/// The sub stream of a Dahua camera.
pub const SUB_STREAM: &str = "/cam/realmonitor?channel=1&subtype=1";

/// `n` TCP ports free on 127.0.0.1 right now (held together while picking, so distinct).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// The first of `n` consecutive TCP ports free on 127.0.0.1 right now, for a relay's
/// camera port range. Taken below Linux's ephemeral range (32768 up), as a relay's
/// camera ports should be: there, the outgoing connections of a run (a thousand
/// agents dialing the relay) cannot take one before the relay binds it.
pub fn free_port_run(n: u16) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    const LOW: u16 = 10_000;
    const EPHEMERAL: u16 = 32_768;
    assert!(n < EPHEMERAL - LOW, "{n} ports do not fit below 32768");
    for _ in 0..1000 {
        // A random start, so parallel tests do not race for the same run.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let base = LOW + (random % u64::from(EPHEMERAL - LOW - n)) as u16;
        let held: Vec<_> = (base..base + n)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return base;
        }
    }
    panic!("no run of {n} free ports on 127.0.0.1");
}

/// The relay's quick-start config on loopback, cameras on `camera_ports`.
pub fn relay_config(token: &str, camera_ports: &[u16]) -> RelayConfig {
    let first = camera_ports.iter().min().copied().unwrap_or(0);
    let mut config = RelayConfig::quick(
        "127.0.0.1:0".parse().expect("addr"),
        first,
        Secret::new(token),
    )
    .expect("quick config");
    let last = camera_ports.iter().max().copied().unwrap_or(first);
    config.camera_ports = first..=last;
    config
}

/// An agent config as an operator would write it (parsed by the real parser).
pub fn agent_config(
    id: &str,
    relay_url: &str,
    token: &str,
    tunnel_port: u16,
    rtsp_port: u16,
) -> AgentConfig {
    let json = agent_config_json(id, relay_url, token, tunnel_port, rtsp_port);
    AgentConfig::parse(&json.to_string(), "test config").expect("valid agent config")
}

/// The JSON of [`agent_config`], for the real binary. Short intervals keep tests quick.
pub fn agent_config_json(
    id: &str,
    relay_url: &str,
    token: &str,
    tunnel_port: u16,
    rtsp_port: u16,
) -> serde_json::Value {
    serde_json::json!({
        "agent": {
            "agent_id": id,
            "tunnel_server_url": relay_url,
            "tunnel_server_token": token,
            "log_level": "DEBUG",
        },
        "tunnel": { "tunnel_port": tunnel_port },
        "streaming": { "rtsp_port": rtsp_port },
        "network": {
            "connection_timeout": 10,
            "reconnect_interval": 1,
            "heartbeat_interval": 1,
        },
    })
}

/// A relay running in this process.
#[derive(Debug)]
pub struct RelayHandle {
    /// Its control link address.
    pub control: SocketAddr,
    /// Its live agents.
    pub registry: Arc<Registry>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RelayHandle {
    /// Binds and starts a relay.
    pub async fn start(config: RelayConfig) -> anyhow::Result<Self> {
        let relay = Relay::bind(config).await?;
        let control = relay.control_addr();
        let registry = relay.registry();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Ok(RelayHandle {
            control,
            registry,
            shutdown,
            task,
        })
    }

    /// The URL agents dial.
    pub fn url(&self) -> String {
        format!("ws://{}/tunnel", self.control)
    }

    /// Shuts the relay down and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// An agent running in this process.
#[derive(Debug)]
pub struct AgentHandle {
    /// The agent's state as it changes.
    pub state: watch::Receiver<AgentState>,
    /// The agent's counters.
    pub stats: Arc<agent::Stats>,
    shutdown: CancellationToken,
    task: JoinHandle<agent::Exit>,
}

impl AgentHandle {
    /// Starts an agent.
    pub fn start(config: AgentConfig) -> Self {
        let agent = Agent::new(config);
        let state = agent.subscribe();
        let stats = agent.stats();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { agent.run(token).await });
        AgentHandle {
            state,
            stats,
            shutdown,
            task,
        }
    }

    /// Waits until the agent's state satisfies `pred`; returns that state.
    pub async fn wait_for(
        &mut self,
        what: &str,
        pred: impl FnMut(&AgentState) -> bool,
    ) -> anyhow::Result<AgentState> {
        let waited = tokio::time::timeout(READY_TIMEOUT, self.state.wait_for(pred))
            .await
            .map(|r| r.map(|state| state.clone()));
        match waited {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(_)) => bail!("agent task ended while waiting for it to be {what}"),
            Err(_) => bail!(
                "agent not {what} within {READY_TIMEOUT:?}; last state {:?}",
                *self.state.borrow()
            ),
        }
    }

    /// Waits until the agent is online; returns its camera port on the relay.
    pub async fn online(&mut self) -> anyhow::Result<u16> {
        match self
            .wait_for("online", |s| matches!(s, AgentState::Online { .. }))
            .await?
        {
            AgentState::Online { port, .. } => Ok(port),
            other => bail!("unexpected state {other:?}"),
        }
    }

    /// Waits until the relay refuses the agent; returns the agent's words and the
    /// relay's typed reason.
    pub async fn refused(&mut self) -> anyhow::Result<(String, Rejection)> {
        let refused = |s: &AgentState| {
            matches!(
                s,
                AgentState::Retrying {
                    rejection: Some(_),
                    ..
                }
            )
        };
        match self.wait_for("refused", refused).await? {
            AgentState::Retrying {
                reason,
                rejection: Some(rejection),
            } => Ok((reason, rejection)),
            other => bail!("unexpected state {other:?}"),
        }
    }

    /// Waits (up to [`READY_TIMEOUT`]) for the agent's run to end by itself; why it
    /// ended, or `None` if it did not.
    pub async fn join(self) -> Option<agent::Exit> {
        tokio::time::timeout(READY_TIMEOUT, self.task)
            .await
            .ok()?
            .ok()
    }

    /// Stops the agent and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// An in-process relay (quick start on loopback, one camera port) with one agent in
/// front of a target, online.
#[derive(Debug)]
pub struct Tunnel {
    /// The relay.
    pub relay: RelayHandle,
    /// The agent.
    pub agent: AgentHandle,
    /// The relay port the agent asked for.
    pub requested: u16,
    /// The camera's port on the relay, as granted.
    pub port: u16,
}

impl Tunnel {
    /// Starts a relay (its config first passed to `tune`) and an agent with id
    /// `agent_id` in front of `127.0.0.1:target_port`; waits until the agent is online.
    pub async fn start(
        agent_id: &str,
        target_port: u16,
        tune: impl FnOnce(&mut RelayConfig),
    ) -> anyhow::Result<Self> {
        const TOKEN: &str = "tunnel-token";
        let requested = free_ports(1)[0];
        let mut config = relay_config(TOKEN, &[requested]);
        tune(&mut config);
        let relay = RelayHandle::start(config).await?;
        let mut agent = AgentHandle::start(agent_config(
            agent_id,
            &relay.url(),
            TOKEN,
            requested,
            target_port,
        ));
        let port = agent.online().await?;
        Ok(Tunnel {
            relay,
            agent,
            requested,
            port,
        })
    }

    /// Stops agent and relay.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.agent.stop().await;
        self.relay.stop().await
    }
}

/// Path of a binary of this workspace, built next to the running test or demo
/// (`cargo build --bins` first; `make test` and `make demo` do).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/test-hash, or target/<profile>/demo
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "binary {name:?} not found next to {}; run `cargo build --bins` first (make test does)",
        exe.display()
    )
}

/// Whether children's output is copied to stderr (tests: yes, so a failure shows it).
static ECHO: AtomicBool = AtomicBool::new(true);

/// Turns the copying of children's output to stderr on or off (the demo turns it off).
pub fn set_echo(on: bool) {
    ECHO.store(on, Ordering::Relaxed);
}

/// A child process whose output is captured line by line (and echoed to stderr, tagged),
/// killed when dropped.
#[derive(Debug)]
pub struct Child {
    name: String,
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Arc<Notify>,
    /// Output pipes not yet at their end: a process that exited may still have lines
    /// in them.
    open_pipes: Arc<AtomicUsize>,
}

impl Child {
    /// Spawns `cmd` with stdout and stderr captured (and echoed, see [`set_echo`]).
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        let open_pipes = Arc::new(AtomicUsize::new(2));
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        for pipe in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(stderr),
        ] {
            let (lines, new_line, name) = (lines.clone(), new_line.clone(), name.to_string());
            let open_pipes = open_pipes.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if ECHO.load(Ordering::Relaxed) {
                        eprintln!("[{name}] {line}");
                    }
                    lock(&lines).push(line);
                    new_line.notify_waiters();
                }
                open_pipes.fetch_sub(1, Ordering::SeqCst);
                new_line.notify_waiters();
            });
        }
        Ok(Child {
            name: name.to_string(),
            child,
            lines,
            new_line,
            open_pipes,
        })
    }

    /// True once the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for an output line containing `needle`; returns it.
    pub async fn wait_for_line(&mut self, needle: &str) -> anyhow::Result<String> {
        self.wait_for_nth_line(needle, 1).await
    }

    /// Waits until `n` output lines contain `needle`; returns the last.
    pub async fn wait_for_nth_line(&mut self, needle: &str, n: usize) -> anyhow::Result<String> {
        self.wait_for_nth_line_within(needle, n, READY_TIMEOUT)
            .await
    }

    /// [`Child::wait_for_line`] for something slower than [`READY_TIMEOUT`].
    pub async fn wait_for_line_within(
        &mut self,
        needle: &str,
        within: Duration,
    ) -> anyhow::Result<String> {
        self.wait_for_nth_line_within(needle, 1, within).await
    }

    async fn wait_for_nth_line_within(
        &mut self,
        needle: &str,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.new_line.notified();
            // Whether it is over is settled before its lines are searched, so a last
            // line read in between is still found. Over means exited, and everything
            // it wrote read.
            let ended = match self.child.try_wait() {
                Ok(Some(status)) if self.open_pipes.load(Ordering::SeqCst) == 0 => Some(status),
                _ => None,
            };
            if let Some(line) = lock(&self.lines)
                .iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
            {
                return Ok(line.clone());
            }
            if let Some(status) = ended {
                let output = lock(&self.lines);
                let last = output[output.len().saturating_sub(5)..].join("\n");
                bail!(
                    "{} exited ({status}) before printing {needle:?}; its last words:\n{last}",
                    self.name
                );
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("{} did not print {needle:?} within {within:?}", self.name);
            }
        }
    }

    /// How many output lines so far contain `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        lock(&self.lines)
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// All output so far.
    pub fn output(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits (up to [`READY_TIMEOUT`]) for the process to exit by itself, and for
    /// everything it wrote to be read, so [`Child::output`] has its last words.
    pub async fn wait(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = tokio::time::timeout(READY_TIMEOUT, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit", self.name))??;
        self.drained().await?;
        Ok(status)
    }

    /// Waits until both output pipes are at their end (after the process exited; a
    /// child it left behind holding them would make this time out).
    async fn drained(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let notified = self.new_line.notified();
            if self.open_pipes.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("{}'s output did not end after it exited", self.name);
            }
        }
    }

    /// Sends SIGKILL and waits for the process to go.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Sends signal `name` (`-STOP`, `-CONT`…) with kill(1).
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("the process has exited")?.to_string();
        let status = Command::new("kill").args([name, &pid]).status().await?;
        anyhow::ensure!(status.success(), "kill {name} {pid} failed");
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await?;
        }
        let status = tokio::time::timeout(READY_TIMEOUT, self.child.wait()).await??;
        self.drained().await?;
        Ok(status)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Path of the camera simulator script.
pub fn camera_sim_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("camera-sim/camera_sim.py")
}

/// A running camera simulator (gst-rtsp-server with Dahua's URLs and Digest auth).
#[derive(Debug)]
pub struct CameraSim {
    /// Its RTSP port on 127.0.0.1.
    pub port: u16,
    /// The process.
    pub process: Child,
}

impl CameraSim {
    /// Starts the simulator on a free port with `extra` arguments.
    pub async fn start(extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(&Place::host(), extra).await
    }

    /// Starts the simulator at `place`, on a free port of its loopback.
    pub async fn start_in(place: &Place, extra: &[&str]) -> anyhow::Result<Self> {
        // Debian's python3-gi belongs to the system interpreter, not to any other python3.
        let mut cmd = place.command("/usr/bin/python3");
        cmd.arg(camera_sim_script())
            .args(["--port", "0"])
            .args(extra);
        let mut process = Child::spawn("camera", cmd)?;
        let ready = process.wait_for_line("READY port=").await?;
        let port = ready
            .rsplit('=')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("bad READY line {ready:?}"))?;
        Ok(CameraSim { port, process })
    }
}

/// What ffprobe decoded from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Codec name as ffprobe says it (`hevc`, `h264`).
    pub codec: String,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Frames decoded.
    pub frames: u32,
}

/// Runs the project's `certs` tool with `args`; its error output if it fails.
pub async fn certs(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(bin("certs")?).args(args).output().await?;
    anyhow::ensure!(
        output.status.success(),
        "certs {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Decodes `frames` video frames from `url` with ffprobe over RTSP/TCP.
pub async fn ffprobe(url: impl AsRef<str>, frames: u32) -> anyhow::Result<Probe> {
    ffprobe_with(&Place::host(), url, frames, &["-rtsp_transport", "tcp"]).await
}

/// Decodes `frames` video frames from `url` with ffprobe at `place` and extra `options`
/// (none: the defaults a user gets, RTP over UDP first).
pub async fn ffprobe_with(
    place: &Place,
    url: impl AsRef<str>,
    frames: u32,
    options: &[&str],
) -> anyhow::Result<Probe> {
    let url = url.as_ref();
    let mut cmd = place.command("ffprobe");
    cmd.args(["-v", "error"])
        .args(options)
        .args(["-count_frames", "-select_streams", "v:0"])
        .args(["-read_intervals", &format!("%+#{frames}")])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
            "-of",
            "json",
        ])
        .arg(url);
    let output = run_watcher(cmd, "ffprobe", url).await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("ffprobe {url} failed ({}): {stderr}", output.status);
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("ffprobe printed no JSON; stderr: {stderr}"))?;
    let stream = json["streams"]
        .get(0)
        .with_context(|| format!("ffprobe found no video stream in {url}; stderr: {stderr}"))?;
    let number = |key: &str| -> anyhow::Result<u32> {
        let v = &stream[key];
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("ffprobe gave no {key} in {stream}"))
    };
    Ok(Probe {
        codec: stream["codec_name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        width: number("width")?,
        height: number("height")?,
        frames: number("nb_read_frames")?,
    })
}

/// Runs an RTSP client to completion, killed if it takes longer than [`READY_TIMEOUT`].
async fn run_watcher(
    mut cmd: Command,
    name: &str,
    url: &str,
) -> anyhow::Result<std::process::Output> {
    cmd.kill_on_drop(true);
    tokio::time::timeout(READY_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("{name} {url} did not finish within {READY_TIMEOUT:?}"))?
        .with_context(|| format!("cannot run {name}"))
}

/// Decodes `buffers` video frames from `url` with GStreamer's `rtspsrc` at `place`, with
/// `options` for rtspsrc (none: its defaults, RTP over UDP first, then TCP), as
/// `gst-launch-1.0` runs it.
pub async fn gst_decode(
    place: &Place,
    url: &str,
    options: &[&str],
    buffers: u32,
) -> anyhow::Result<()> {
    let mut cmd = place.command("gst-launch-1.0");
    cmd.arg("rtspsrc")
        .arg(format!("location={url}"))
        .args(options)
        .args(["!", "decodebin", "!", "video/x-raw", "!", "fakesink"])
        .arg(format!("num-buffers={buffers}"));
    let output = run_watcher(cmd, "gst-launch-1.0", url).await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // EOS reaches the pipeline only after the sink has taken `buffers` decoded frames:
    // that is the decode. The exit status is not: rtspsrc's own shutdown races its PAUSE
    // against closing the connection, and about one run in ten it closes first (the
    // relay sees the Watcher's FIN before any PAUSE), then reports "Could not send
    // message (Received end-of-file)" for the PAUSE and exits 1, frames decoded. An
    // error before EOS ends gst-launch without the EOS line.
    if !stdout.contains("Got EOS from element") {
        bail!(
            "gst-launch {url} decoded no video ({}): {stdout} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// ffmpeg playing `url` over RTSP/TCP for up to `secs`, reporting its progress
/// (`frame=N` lines; see [`frames_decoded`]).
pub fn ffmpeg_playing(url: &str, secs: u32) -> anyhow::Result<Child> {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-nostats", "-progress", "pipe:1"])
        .args(["-rtsp_transport", "tcp", "-i", url])
        .args(["-t", &secs.to_string(), "-f", "null", "-"]);
    Child::spawn("ffmpeg", cmd)
}

/// The last frame count an [`ffmpeg_playing`] reported.
pub fn frames_decoded(ffmpeg: &Child) -> u64 {
    ffmpeg
        .output()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("frame=").and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

/// An HTTP response, as curl got it.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: String,
}

impl HttpReply {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("not JSON ({}): {}", self.status, self.body))
    }
}

/// One HTTP request with curl (a real client) at `place`: `method` `url`, with a bearer
/// token and a JSON body if given.
pub async fn http(
    place: &Place,
    method: &str,
    url: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> anyhow::Result<HttpReply> {
    const STATUS: &str = "\n--status ";
    let mut cmd = place.command("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "30", "-X", method])
        .args(["--write-out", &format!("{STATUS}%{{http_code}}")]);
    if let Some(token) = bearer {
        cmd.arg("--oauth2-bearer").arg(token);
    }
    if let Some(body) = json {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    cmd.arg(url);
    let output = run_watcher(cmd, "curl", url).await?;
    let text = String::from_utf8(output.stdout)?;
    let (body, status) = text.rsplit_once(STATUS).with_context(|| {
        format!(
            "curl {url}: no status; stderr {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok(HttpReply {
        status: status.trim().parse()?,
        body: body.to_string(),
    })
}

/// Checks recorded API exchanges (`{"method", "path" (the template), "status", "body"}`)
/// against docs/api.yaml with jsonschema, and that they exercise every documented
/// operation; the error is the checker's report.
pub async fn check_openapi(samples: &[serde_json::Value]) -> anyhow::Result<()> {
    openapi_check(samples, &[]).await
}

/// [`check_openapi`] for samples of some operations only.
pub async fn check_openapi_some(samples: &[serde_json::Value]) -> anyhow::Result<()> {
    openapi_check(samples, &["--some"]).await
}

async fn openapi_check(samples: &[serde_json::Value], flags: &[&str]) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("samples.json");
    std::fs::write(&file, serde_json::to_vec(samples)?)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let checked = Command::new("/usr/bin/python3")
        .arg(root.join("openapi_check.py"))
        .arg(root.join("../docs/api.yaml"))
        .arg(&file)
        .args(flags)
        .output()
        .await?;
    anyhow::ensure!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    Ok(())
}

/// The value of the sample `series` (name and labels, exactly as exposed, e.g.
/// `camera_relay_rtp_packets_total{camera="cam-1"}`) in a Prometheus text exposition.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// The `key=value` fields of a log line after `message` (tracing's format), with
/// any ANSI colouring removed.
pub fn log_fields(line: &str, message: &str) -> std::collections::HashMap<String, String> {
    let plain: String = {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // ESC [ … letter
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    plain
        .split_once(message)
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|field| field.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `rtsp://admin:admin@127.0.0.1:{port}{path}`.
pub fn rtsp_url(port: u16, path: &str) -> String {
    format!("rtsp://admin:admin@127.0.0.1:{port}{path}")
}

/// The real `relay` binary, quick-start form.
#[derive(Debug)]
pub struct RelayProcess {
    /// The process.
    pub process: Child,
    /// The address agents dial.
    pub host: String,
    /// Its control port (TCP) and QUIC port (UDP).
    pub port: u16,
}

impl RelayProcess {
    /// Starts `relay --bind 127.0.0.1 --port PORT --tunnel-port FIRST` with `token` and
    /// waits until ready.
    pub async fn start(port: u16, first_camera_port: u16, token: &str) -> anyhow::Result<Self> {
        Self::start_in(
            &Place::host(),
            "127.0.0.1",
            port,
            first_camera_port,
            token,
            &[],
        )
        .await
    }

    /// Starts the relay at `place`, agents dialling `bind:port`, with `extra` flags.
    pub async fn start_in(
        place: &Place,
        bind: &str,
        port: u16,
        first_camera_port: u16,
        token: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = place.command(bin("relay")?);
        cmd.args(["--bind", bind, "--port", &port.to_string()])
            .args(["--tunnel-port", &first_camera_port.to_string()])
            .args(extra)
            .env("RELAY_TOKEN", token);
        Self::ready(cmd, bind, port).await
    }

    /// Starts the relay at `place` with `--config config`, whose `listen` is
    /// `host:port`, and waits until ready.
    pub async fn start_from_file_in(
        place: &Place,
        config: &Path,
        host: &str,
        port: u16,
    ) -> anyhow::Result<Self> {
        let mut cmd = place.command(bin("relay")?);
        cmd.arg("--config").arg(config);
        Self::ready(cmd, host, port).await
    }

    async fn ready(mut cmd: Command, host: &str, port: u16) -> anyhow::Result<Self> {
        cmd.env("RELAY_LOG", "relay=debug,info");
        let mut process = Child::spawn("relay", cmd)?;
        process.wait_for_line("relay ready").await?;
        Ok(RelayProcess {
            process,
            host: host.to_string(),
            port,
        })
    }

    /// The URL agents dial.
    pub fn url(&self) -> String {
        format!("ws://{}:{}/tunnel", self.host, self.port)
    }
}

/// A camera simulator and a relay process on loopback, and the config of an agent for
/// both: the setup of every end-to-end test with the real binaries.
#[derive(Debug)]
pub struct ProcessRig {
    /// The camera simulator.
    pub camera: CameraSim,
    /// The relay (quick start, token [`ProcessRig::TOKEN`]).
    pub relay: RelayProcess,
    /// An agent config for `agent_id`, pointing at the relay and the camera.
    pub config: serde_json::Value,
    /// The relay's control port.
    pub relay_port: u16,
    /// The camera's port on the relay.
    pub camera_port: u16,
}

impl ProcessRig {
    /// The relay's shared token.
    pub const TOKEN: &'static str = "rig-token";

    /// Starts the simulator with `camera_args` and a relay, ready for an agent `agent_id`.
    pub async fn start(camera_args: &[&str], agent_id: &str) -> anyhow::Result<Self> {
        let camera = CameraSim::start(camera_args).await?;
        let ports = free_ports(2);
        let relay = RelayProcess::start(ports[0], ports[1], Self::TOKEN).await?;
        let config = agent_config_json(agent_id, &relay.url(), Self::TOKEN, ports[1], camera.port);
        Ok(ProcessRig {
            camera,
            relay,
            config,
            relay_port: ports[0],
            camera_port: ports[1],
        })
    }
}

/// Cameras (simulator and agent) each on a private LAN behind NAT, and the relay (quick
/// start plus the shared port) with its Watchers on the public side: see [`netns`]. The
/// setup of the tests that must see what a real deployment sees.
#[derive(Debug)]
pub struct NatRig {
    /// The relay.
    pub relay: RelayProcess,
    /// The camera simulators; camera `i` is on LAN `i`.
    pub cameras: Vec<CameraSim>,
    /// Camera `i`'s agent, with id [`NatRig::agent_id`]`(i)`.
    pub agents: Vec<AgentProcess>,
    /// The namespaces. Declared last, so the processes in them go first.
    pub lab: Lab,
}

impl NatRig {
    /// The relay's shared token.
    pub const TOKEN: &'static str = "nat-token";
    /// The relay's admin token (operator API and /metrics).
    pub const ADMIN_TOKEN: &'static str = "nat-admin";
    /// The relay's control (TCP) and QUIC (UDP) port on its public address.
    pub const RELAY_PORT: u16 = 8080;
    /// Camera `i`'s port on the relay is this plus `i`.
    pub const FIRST_CAMERA_PORT: u16 = 8554;
    /// The relay's shared RTSP port.
    pub const SHARED_PORT: u16 = 8553;

    /// Starts one camera per entry of `cameras` (simulator arguments), a relay, and every
    /// camera's agent; returns once all agents are online.
    pub async fn start(cameras: &[&[&str]]) -> anyhow::Result<Self> {
        Self::start_prepared(cameras, |_| Ok(())).await
    }

    /// [`NatRig::start`], with `prepare` done to the lab before anything starts in it
    /// (blocking UDP, say).
    pub async fn start_prepared(
        cameras: &[&[&str]],
        prepare: impl FnOnce(&Lab) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let lab = Lab::new(cameras.len())?;
        prepare(&lab)?;
        let shared = Self::SHARED_PORT.to_string();
        let relay_side = lab.relay();
        // Two data-plane shards: a second camera lands on the other thread and QUIC
        // port (8081), so the lab's multi-camera tests cross shards as deployments do.
        let extra = [
            "--shared-port",
            shared.as_str(),
            "--admin-token",
            Self::ADMIN_TOKEN,
            "--data-shards",
            "2",
        ];
        let (relay, sims) = tokio::join!(
            RelayProcess::start_in(
                &relay_side,
                netns::RELAY_IP,
                Self::RELAY_PORT,
                Self::FIRST_CAMERA_PORT,
                Self::TOKEN,
                &extra,
            ),
            futures_util::future::join_all(cameras.iter().enumerate().map(|(i, args)| {
                let lan = lab.camera(i);
                async move { CameraSim::start_in(&lan, args).await }
            }))
        );
        let relay = relay?;
        let cameras = sims.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        let configs: Vec<_> = cameras
            .iter()
            .enumerate()
            .map(|(i, sim)| {
                agent_config_json(
                    &Self::agent_id(i),
                    &relay.url(),
                    Self::TOKEN,
                    Self::camera_port(i),
                    sim.port,
                )
            })
            .collect();
        let agents =
            futures_util::future::join_all(configs.iter().enumerate().map(|(i, config)| {
                let lan = lab.camera(i);
                async move { AgentProcess::start_in(&lan, &format!("agent-{i}"), config).await }
            }))
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(NatRig {
            relay,
            cameras,
            agents,
            lab,
        })
    }

    /// Camera `i`'s agent id.
    pub fn agent_id(i: usize) -> String {
        format!("cam-{}", i + 1)
    }

    /// Camera `i`'s port on the relay.
    pub fn camera_port(i: usize) -> u16 {
        Self::FIRST_CAMERA_PORT + u16::try_from(i).unwrap_or(u16::MAX)
    }

    /// Where Watchers run: the relay's side, where the camera ports are on 127.0.0.1.
    pub fn watchers(&self) -> Place {
        self.lab.relay()
    }

    /// `path` of camera `i` on its own relay port, with the simulator's credentials.
    pub fn camera_url(&self, i: usize, path: &str) -> String {
        rtsp_url(Self::camera_port(i), path)
    }

    /// GETs `path` from the relay's control listener (its API) with the admin token,
    /// as a client on the relay's side does; fails on any status but 200.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("http://{}:{}{path}", netns::RELAY_IP, Self::RELAY_PORT);
        let reply = http(&self.watchers(), "GET", &url, Some(Self::ADMIN_TOKEN), None).await?;
        if reply.status != 200 {
            bail!("GET {url}: {} {}", reply.status, reply.body);
        }
        Ok(reply.body)
    }

    /// `path` of the camera of `agent_id` on the relay's shared port.
    pub fn shared_url(&self, agent_id: &str, path: &str) -> String {
        rtsp_url(Self::SHARED_PORT, &format!("/{agent_id}{path}"))
    }
}

/// The real `camera-agent` binary with a config file of its own.
#[derive(Debug)]
pub struct AgentProcess {
    /// The process.
    pub process: Child,
    /// Holds the config file.
    pub dir: tempfile::TempDir,
}

impl AgentProcess {
    /// Writes `config` to a fresh directory and starts the agent on it (not waiting).
    pub fn spawn(name: &str, config: &serde_json::Value) -> anyhow::Result<Self> {
        Self::spawn_in(&Place::host(), name, config)
    }

    /// [`AgentProcess::spawn`] at `place`.
    pub fn spawn_in(place: &Place, name: &str, config: &serde_json::Value) -> anyhow::Result<Self> {
        Self::spawn_text_in(place, name, &serde_json::to_string_pretty(config)?)
    }

    /// Starts the agent at `place` on a config file holding `text` as it is (not
    /// waiting).
    pub fn spawn_text_in(place: &Place, name: &str, text: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.json");
        std::fs::write(&path, text)?;
        let mut cmd = place.command(bin("camera-agent")?);
        cmd.arg("--config").arg(&path);
        Ok(AgentProcess {
            process: Child::spawn(name, cmd)?,
            dir,
        })
    }

    /// Starts the agent and waits until it is online.
    pub async fn start(name: &str, config: &serde_json::Value) -> anyhow::Result<Self> {
        Self::start_in(&Place::host(), name, config).await
    }

    /// [`AgentProcess::start`] at `place`.
    pub async fn start_in(
        place: &Place,
        name: &str,
        config: &serde_json::Value,
    ) -> anyhow::Result<Self> {
        let mut agent = Self::spawn_in(place, name, config)?;
        agent.online(1).await?;
        Ok(agent)
    }

    /// Waits until the agent has come online `n` times in all.
    pub async fn online(&mut self, n: usize) -> anyhow::Result<()> {
        self.process
            .wait_for_nth_line("online: the relay serves this camera", n)
            .await?;
        Ok(())
    }
}

/// A hand-driven control-link client, for sending what a real agent never would.
#[derive(Debug)]
pub struct ControlClient {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl ControlClient {
    /// Opens a WebSocket to `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(ControlClient { ws })
    }

    /// Sends one WebSocket message as it is.
    pub async fn send(
        &mut self,
        msg: tokio_tungstenite::tungstenite::Message,
    ) -> anyhow::Result<()> {
        use futures_util::SinkExt;
        self.ws.send(msg).await?;
        Ok(())
    }

    /// Sends bytes as one binary message.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.send(tokio_tungstenite::tungstenite::Message::Binary(
            bytes.into(),
        ))
        .await
    }

    /// Sends a `Register` for the `rtsp` service on `port`.
    pub async fn register(
        &mut self,
        id: &str,
        token: &str,
        version: u16,
        port: u16,
        heartbeat_secs: u32,
    ) -> anyhow::Result<()> {
        use common::protocol::{
            encode_control, AgentMessage, CameraInfo, Register, ServiceRequest, SERVICE_RTSP,
        };
        let register = AgentMessage::Register(Register {
            version,
            agent_id: id.into(),
            token: Secret::new(token),
            camera: CameraInfo::default(),
            services: vec![ServiceRequest {
                name: SERVICE_RTSP.into(),
                port,
            }],
            heartbeat_interval_secs: heartbeat_secs,
            agent_version: "test".into(),
        });
        self.send_bytes(encode_control(&register)?).await
    }

    /// The relay's next message, or `None` once it has closed the connection.
    pub async fn next(&mut self) -> anyhow::Result<Option<common::protocol::RelayMessage>> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(READY_TIMEOUT, self.ws.next())
                .await
                .context("the relay neither answered nor closed")?;
            match msg {
                Some(Ok(Message::Binary(b))) => {
                    return Ok(Some(common::protocol::decode_control(&b)?))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(None),
                Some(Ok(_)) => continue,
            }
        }
    }
}
