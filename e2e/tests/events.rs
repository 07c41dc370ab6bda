//! Events: the real relay binary with webhooks in its relay.toml, a camera simulator,
//! a real agent, ffmpeg and ffprobe as Watchers, curl as the server-sent-events
//! client, and HTTP receivers in this test (axum) that check each event's signature.
//! Receivers that are down, slow or answer 500 hold up nothing else and get their
//! events once they take them; a subscriber that reconnects with `Last-Event-ID` gets
//! what it missed, no gap.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
    Router,
};
use e2e::{
    agent_config_json, ffprobe, free_ports, http, metric, netns::Place, rtsp_url, AgentProcess,
    CameraSim, Child, RelayProcess,
};
use serde_json::Value;
use tokio::{net::TcpListener, process::Command};

const TOKEN: &str = "events-token";
const ADMIN: &str = "events-admin";
const PATH: &str = "/cam/realmonitor?channel=1&subtype=1";

/// What a receiver does with a request.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Take,
    /// Answers 500 to this many requests first.
    FailFirst(u32),
    /// Takes each after this long.
    Slow(Duration),
}

/// An HTTP server that receives one webhook's events.
#[derive(Debug)]
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct ReceiverState {
    secret: &'static str,
    behaviour: Behaviour,
    requests: AtomicU32,
    /// Events taken, in order of arrival.
    events: Mutex<Vec<Value>>,
    /// Requests whose signature did not match.
    forged: AtomicU32,
}

impl Receiver {
    async fn start(secret: &'static str, behaviour: Behaviour) -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap(), secret, behaviour).await
    }

    async fn start_on(addr: SocketAddr, secret: &'static str, behaviour: Behaviour) -> Receiver {
        let listener = TcpListener::bind(addr).await.expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ReceiverState {
            secret,
            behaviour,
            requests: AtomicU32::new(0),
            events: Mutex::new(Vec::new()),
            forged: AtomicU32::new(0),
        });
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver");
        });
        Receiver { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook?key=in-the-url", self.addr)
    }

    fn events(&self) -> Vec<Value> {
        self.state.events.lock().unwrap().clone()
    }

    fn types(&self) -> Vec<String> {
        types(&self.events())
    }

    /// Waits until it has an event of type `kind`.
    async fn wait_for(&self, kind: &str) {
        wait_until(&format!("{kind} at the receiver"), || {
            self.types().iter().any(|t| t == kind)
        })
        .await;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    match state.behaviour {
        Behaviour::FailFirst(k) if n <= k => return StatusCode::INTERNAL_SERVER_ERROR,
        Behaviour::Slow(wait) => tokio::time::sleep(wait).await,
        _ => {}
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, state.secret.as_bytes());
    let signed = headers
        .get("x-camera-relay-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(decode_hex)
        .is_some_and(|tag| ring::hmac::verify(&key, &body, &tag).is_ok());
    if !signed {
        state.forged.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    let event: Value = serde_json::from_slice(&body).expect("event JSON");
    assert_eq!(
        headers["x-camera-relay-event"].to_str().unwrap(),
        event["type"].as_str().unwrap()
    );
    assert_eq!(
        headers["x-camera-relay-event-id"].to_str().unwrap(),
        event["id"].to_string()
    );
    state.events.lock().unwrap().push(event);
    StatusCode::NO_CONTENT
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn ids(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["id"].as_u64()).collect()
}

/// Polls `ready` every 50 ms for up to 60 s.
async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `curl -N` on `/events`, resuming after `after` if given.
fn sse_client(relay: &RelayProcess, after: Option<u64>) -> Child {
    let mut cmd = Command::new("curl");
    // --include: the status line shows when the stream is open.
    cmd.args([
        "--silent",
        "--no-buffer",
        "--include",
        "--oauth2-bearer",
        ADMIN,
    ]);
    if let Some(id) = after {
        cmd.args(["-H", &format!("Last-Event-ID: {id}")]);
    }
    cmd.arg(format!("http://{}:{}/events", relay.host, relay.port));
    Child::spawn("sse", cmd).expect("curl")
}

/// The events an SSE client printed: each `data:` JSON, with the `id:` before it.
fn sse_events(client: &Child) -> Vec<(Option<u64>, Value)> {
    let mut id = None;
    let mut out = Vec::new();
    for line in client.output() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(data) = line.strip_prefix("data:") {
            out.push((
                id.take(),
                serde_json::from_str(data.trim()).expect("SSE JSON"),
            ));
        }
    }
    out
}

async fn relay_metrics(relay: &RelayProcess) -> String {
    let url = format!("http://{}:{}/metrics", relay.host, relay.port);
    http(&Place::host(), "GET", &url, Some(ADMIN), None)
        .await
        .unwrap()
        .body
}

/// The relay from a relay.toml in `dir`: one camera port, the tokens, and `rest`.
async fn relay_with(
    dir: &tempfile::TempDir,
    relay_port: u16,
    camera_port: u16,
    rest: &str,
) -> RelayProcess {
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:{relay_port}"
camera_ports = "{camera_port}-{camera_port}"
shared_token = "{TOKEN}"
admin_token = "{ADMIN}"
{rest}"#
        ),
    )
    .unwrap();
    RelayProcess::start_from_file_in(&Place::host(), &config, "127.0.0.1", relay_port)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_the_event_stream_tell_what_happens_in_order() {
    let camera = CameraSim::start(&[]).await.unwrap();
    let ok = Receiver::start("ok-secret", Behaviour::Take).await;
    let flaky = Receiver::start("flaky-secret", Behaviour::FailFirst(3)).await;
    let slow = Receiver::start("slow-secret", Behaviour::Slow(Duration::from_millis(700))).await;
    // Down until the camera has come and gone; its port is kept for it.
    let ports = free_ports(4);
    let (relay_port, camera_port, down_port, tiny_port) = (ports[0], ports[1], ports[2], ports[3]);
    let down_addr: SocketAddr = format!("127.0.0.1:{down_port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hooks = format!(
        r#"
[limits]
stall_secs = 1

[[webhooks]]
name = "ok"
url = "{ok}"
secret = "ok-secret"

[[webhooks]]
name = "flaky"
url = "{flaky}"
secret = "flaky-secret"
events = ["camera.*"]
retry_max_secs = 0.5

[[webhooks]]
name = "slow"
url = "{slow}"
secret = "slow-secret"
events = ["camera.online", "camera.offline"]

[[webhooks]]
name = "down"
url = "http://{down_addr}/hook"
secret = "down-secret"
retry_max_secs = 0.5

[[webhooks]]
name = "tiny"
url = "http://127.0.0.1:{tiny_port}/hook"
secret = "tiny-secret"
queue = 1
retry_max_secs = 0.5
"#,
        ok = ok.url(),
        flaky = flaky.url(),
        slow = slow.url(),
    );
    let mut relay = relay_with(&dir, relay_port, camera_port, &hooks).await;
    let mut sse = sse_client(&relay, None);
    sse.wait_for_line("HTTP/1.1 200").await.unwrap();

    // A camera comes online and a Watcher decodes it.
    let agent_json = agent_config_json("cam-ev", &relay.url(), TOKEN, camera_port, camera.port);
    let mut agent = AgentProcess::start("agent", &agent_json).await.unwrap();
    ok.wait_for("camera.link").await;
    let probe = ffprobe(rtsp_url(camera_port, PATH), 10).await.unwrap();
    assert!(probe.frames >= 10);
    ok.wait_for("watcher.ended").await;

    // A Watcher plays while the camera goes silent for longer than stall_secs.
    let mut ffmpeg = e2e::ffmpeg_playing(&rtsp_url(camera_port, PATH), 30).unwrap();
    ffmpeg.wait_for_line("frame=").await.unwrap();
    camera.process.signal("-STOP").await.unwrap();
    ok.wait_for("watcher.stalled").await;
    camera.process.signal("-CONT").await.unwrap();
    ok.wait_for("watcher.resumed").await;
    ffmpeg.kill().await.unwrap();
    wait_until("the second watcher.ended", || {
        ok.types().iter().filter(|t| *t == "watcher.ended").count() == 2
    })
    .await;

    // The agent dies; the relay notices when its control connection drops.
    agent.process.kill().await.unwrap();
    ok.wait_for("camera.offline").await;

    let got = ok.events();
    let kinds = types(&got);
    let expected_order = [
        "camera.port_assigned",
        "camera.online",
        "camera.link",
        "watcher.started",
        "watcher.ended",
        "watcher.started",
        "watcher.stalled",
        "watcher.resumed",
        "watcher.ended",
        "camera.offline",
    ];
    let mut at = 0;
    for kind in &kinds {
        if expected_order.get(at) == Some(&kind.as_str()) {
            at += 1;
        }
    }
    assert_eq!(at, expected_order.len(), "events out of order: {kinds:?}");
    let by_id = ids(&got);
    assert!(
        by_id.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {by_id:?}"
    );
    for event in &got {
        assert_eq!(event["camera"], "cam-ev", "{event}");
        assert!(
            event["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{event}"
        );
    }
    let find = |kind: &str| got.iter().find(|e| e["type"] == kind).unwrap().clone();
    assert_eq!(find("camera.online")["data"]["port"], camera_port);
    assert_eq!(find("camera.link")["data"]["link"], "quic");
    let ended = find("watcher.ended");
    assert!(
        ended["data"]["media"]["frames"].as_u64().unwrap() > 0,
        "{ended}"
    );
    assert!(
        ended["data"]["bytes_to_watcher"].as_u64().unwrap() > 10_000,
        "{ended}"
    );
    assert_eq!(ended["data"]["error"], Value::Null, "{ended}");
    assert_eq!(ended["data"]["method"], "OPTIONS");
    assert_eq!(find("camera.offline")["data"]["reason"], "lost");

    // The receivers that are slow or failing got theirs, in order, and held up nothing:
    // "ok" had every event while "down" was still down.
    flaky.wait_for("camera.offline").await;
    slow.wait_for("camera.offline").await;
    let camera_events: Vec<Value> = got
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("camera."))
        .cloned()
        .collect();
    assert_eq!(ids(&flaky.events()), ids(&camera_events));
    assert!(flaky.state.requests.load(Ordering::SeqCst) >= 3 + camera_events.len() as u32);
    assert_eq!(slow.types(), ["camera.online", "camera.offline"]);

    // "down" comes up: everything arrives, in order.
    let down = Receiver::start_on(down_addr, "down-secret", Behaviour::Take).await;
    down.wait_for("camera.offline").await;
    assert_eq!(ids(&down.events()), by_id);
    for receiver in [&ok, &flaky, &slow, &down] {
        assert_eq!(receiver.state.forged.load(Ordering::SeqCst), 0);
    }

    // "tiny" never came up and holds one event: the rest were dropped, counted, logged.
    let metrics = relay_metrics(&relay).await;
    let dropped = metric(
        &metrics,
        r#"camera_relay_webhook_events_total{result="dropped",webhook="tiny"}"#,
    )
    .unwrap_or(0.0);
    assert!(
        dropped >= (by_id.len() - 2) as f64,
        "dropped {dropped}:\n{metrics}"
    );
    relay
        .process
        .wait_for_line("webhook queue full")
        .await
        .unwrap();
    assert_eq!(
        metric(
            &metrics,
            r#"camera_relay_events_total{type="camera.online"}"#
        ),
        Some(1.0)
    );
    let delivered = metric(
        &metrics,
        r#"camera_relay_webhook_events_total{result="delivered",webhook="ok"}"#,
    );
    // Counted once the receiver's answer is in, a moment after it recorded the event.
    assert!(delivered >= Some(by_id.len() as f64 - 1.0), "{delivered:?}");

    // The stream: the same events, in order.
    wait_until("the SSE client to see camera.offline", || {
        sse_events(&sse)
            .iter()
            .any(|(_, e)| e["type"] == "camera.offline")
    })
    .await;
    let streamed = sse_events(&sse);
    let streamed_ids: Vec<u64> = streamed.iter().filter_map(|(id, _)| *id).collect();
    assert_eq!(streamed_ids, by_id);
    assert!(streamed.iter().all(|(id, e)| *id == e["id"].as_u64()));

    // The client drops; while it is away the camera comes back and goes again; it
    // reconnects with the last id it had and misses nothing.
    let last = *streamed_ids.last().unwrap();
    sse.kill().await.unwrap();
    let mut agent = AgentProcess::start("agent", &agent_json).await.unwrap();
    let before = ok.events().len();
    agent.process.kill().await.unwrap();
    wait_until("the second camera.offline", || {
        ok.types().iter().filter(|t| *t == "camera.offline").count() == 2
    })
    .await;
    let resumed = sse_client(&relay, Some(last));
    let all = ok.events();
    assert!(all.len() > before);
    let missed: Vec<u64> = ids(&all).into_iter().filter(|id| *id > last).collect();
    wait_until("the resumed stream to catch up", || {
        sse_events(&resumed).len() >= missed.len()
    })
    .await;
    let again: Vec<u64> = sse_events(&resumed)
        .iter()
        .filter_map(|(id, _)| *id)
        .collect();
    assert_eq!(
        again, missed,
        "a resumed stream must continue where it stopped"
    );
    // Consecutive ids: nothing in between was lost.
    assert!(ids(&all).windows(2).all(|w| w[1] == w[0] + 1));

    relay.process.terminate().await.unwrap();
}

/// A stand-in for Flussonic Watcher's camera API: records each camera created, after
/// answering 503 to the first request (Watcher restarting).
async fn watcher_api() -> (
    SocketAddr,
    Arc<Mutex<Vec<Value>>>,
    tokio::task::JoinHandle<()>,
) {
    let created = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new().route(
        "/api/cameras",
        post({
            let created = created.clone();
            move |body: axum::Json<Value>| async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                created.lock().unwrap().push(body.0);
                StatusCode::CREATED
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("watcher api");
    });
    (addr, created, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_receiver_adds_a_camera_to_watcher_when_it_first_comes_online() {
    let camera = CameraSim::start(&[]).await.unwrap();
    let (watcher, created, watcher_task) = watcher_api().await;
    let ports = free_ports(3);
    let (relay_port, camera_port, hook_port) = (ports[0], ports[1], ports[2]);
    let dir = tempfile::tempdir().unwrap();

    // The receiver from deploy/webhooks, as docs/events.md runs it.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/webhooks/watcher-add-camera.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script)
        .args(["--listen", &format!("127.0.0.1:{hook_port}")])
        .args(["--watcher-api", &format!("http://{watcher}/api/cameras")])
        .arg("--state")
        .arg(dir.path().join("added.json"))
        .env("WEBHOOK_SECRET", "hook-secret");
    let mut receiver = Child::spawn("receiver", cmd).unwrap();
    receiver
        .wait_for_line("receiving camera-relay events")
        .await
        .unwrap();

    let hooks = format!(
        r#"
[[webhooks]]
name = "watcher"
url = "http://127.0.0.1:{hook_port}/events"
secret = "hook-secret"
events = ["camera.online"]
retry_max_secs = 0.5
"#
    );
    let mut relay = relay_with(&dir, relay_port, camera_port, &hooks).await;
    let agent_json = agent_config_json(
        "dahua-2449s-il-001",
        &relay.url(),
        TOKEN,
        camera_port,
        camera.port,
    );
    let mut agent = AgentProcess::start("agent", &agent_json).await.unwrap();
    // Watcher was away at the first attempt; the relay tried again.
    receiver.wait_for_line("the relay retries").await.unwrap();
    receiver
        .wait_for_line("added dahua-2449s-il-001 to Watcher")
        .await
        .unwrap();
    let camera_entry = created.lock().unwrap()[0].clone();
    let url = format!("rtsp://127.0.0.1:{camera_port}/cam/realmonitor?channel=1&subtype=0");
    assert_eq!(
        camera_entry,
        serde_json::json!({
            "name": "dahua-2449s-il-001",
            "url": url,
            "username": "admin",
            "password": "admin",
        })
    );
    // What Watcher was given plays.
    let with_credentials = url.replace("rtsp://", "rtsp://admin:admin@");
    assert!(ffprobe(&with_credentials, 5).await.unwrap().frames >= 5);

    // The camera reconnects: online again, not added again.
    agent.process.kill().await.unwrap();
    let mut agent = AgentProcess::start("agent", &agent_json).await.unwrap();
    let online = r#"camera_relay_webhook_events_total{result="delivered",webhook="watcher"}"#;
    let mut delivered = 0.0;
    for _ in 0..600 {
        delivered = metric(&relay_metrics(&relay).await, online).unwrap_or(0.0);
        if delivered >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(delivered, 2.0, "both camera.online events delivered");
    assert_eq!(created.lock().unwrap().len(), 1, "added once");

    agent.process.kill().await.unwrap();
    relay.process.terminate().await.unwrap();
    watcher_task.abort();
}
