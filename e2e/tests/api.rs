//! The operator API against an in-process relay with a real agent connected and a
//! Watcher session open, through curl: every endpoint, every error code, and what each
//! command does to the agent.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use agent::{AgentConfig, Exit};
use e2e::{
    agent_config_json, free_port_run, http, AgentHandle, HttpReply, Place, RelayHandle,
    READY_TIMEOUT,
};
use relay::RelayConfig;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const ADMIN: &str = "adm1n-t0ken";

struct Api {
    relay: RelayHandle,
}

impl Api {
    async fn start(first: u16, command_timeout: f64) -> Self {
        let text = format!(
            r#"
            listen = "127.0.0.1:0"
            camera_ports = "{first}-{last}"
            shared_token = "api-token"
            admin_token = "{ADMIN}"

            [[agents]]
            id = "cam-off"
            token = "off-token"

            [limits]
            command_timeout_secs = {command_timeout}
            "#,
            last = first + 3
        );
        let relay = RelayHandle::start(RelayConfig::from_toml(&text, "api relay.toml").unwrap())
            .await
            .unwrap();
        Api { relay }
    }

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> HttpReply {
        let url = format!("http://{}{path}", self.relay.control);
        http(&Place::host(), method, &url, Some(ADMIN), body)
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        let reply = self.call("GET", path, None).await;
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
        reply.json().unwrap()
    }

    async fn command(&self, id: &str, command: &str) -> HttpReply {
        let body = format!(r#"{{"command": "{command}"}}"#);
        self.call("POST", &format!("/agents/{id}/control"), Some(&body))
            .await
    }

    /// Polls `path` until `pred` holds (the API is the readiness signal here).
    async fn until(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let value = self.get(path).await;
            if pred(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "GET {path} never satisfied: {value}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Waits until one of the agent's counters has reached `n`.
async fn counted(counter: &AtomicU64, n: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while counter.load(Relaxed) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never reached {n}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until the agent has come back online after `n` sessions in all ended (its
/// state alone can flip back to online too fast to be seen in between).
async fn reconnected(agent: &mut AgentHandle, n: u64) -> u16 {
    counted(&agent.stats.reconnections, n, "the agent's reconnections").await;
    agent.online().await.unwrap()
}

/// Waits until the agent has dialed its data plane again within its session `n` times.
async fn redialed(agent: &AgentHandle, n: u64) {
    counted(&agent.stats.redials, n, "the agent's data plane redials").await;
}

/// A registered agent "mute" that never answers a command.
async fn mute_agent(api: &Api) -> e2e::ControlClient {
    let mut mute = e2e::ControlClient::connect(&api.relay.url()).await.unwrap();
    mute.register(
        "mute",
        "api-token",
        common::protocol::PROTOCOL_VERSION,
        0,
        30,
    )
    .await
    .unwrap();
    assert!(matches!(
        mute.next().await.unwrap(),
        Some(common::protocol::RelayMessage::Registered(_))
    ));
    mute
}

/// An echo server standing in for the camera; returns its port.
async fn echo() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    port
}

/// An agent loaded from a config file (so `reload_config` has a file to re-read).
fn agent_from_file(dir: &std::path::Path, json: &Value) -> AgentHandle {
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(json).unwrap()).unwrap();
    AgentHandle::start(AgentConfig::load(&path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_need_the_admin_token() {
    let api = Api::start(free_port_run(4), 10.0).await;
    let url = |path: &str| format!("http://{}{path}", api.relay.control);
    for path in [
        "/agents", "/streams", "/traffic", "/tunnels", "/metrics", "/events",
    ] {
        for token in [None, Some("wrong")] {
            let reply = http(&Place::host(), "GET", &url(path), token, None)
                .await
                .unwrap();
            assert_eq!(reply.status, 401, "{path} with {token:?}");
            assert!(reply.json().unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("Bearer"));
        }
    }
    let health = http(&Place::host(), "GET", &url("/health"), None, None)
        .await
        .unwrap();
    assert_eq!(health.status, 200, "/health stays open");
    let health = health.json().unwrap();
    assert_eq!(health["status"], "ok");
    assert!(health["uptime_secs"].is_u64() && health["agents_online"] == 0);
    assert_eq!(api.get("/agents").await["agents"][0]["id"], "cam-off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_streams_and_tunnels_describe_live_sessions() {
    let first = free_port_run(4);
    let api = Api::start(first, 10.0).await;
    let dir = tempfile::tempdir().unwrap();
    let target = echo().await;
    let mut agent = agent_from_file(
        dir.path(),
        &agent_config_json("cam-1", &api.relay.url(), "api-token", first, target),
    );
    let port = agent.online().await.unwrap();

    // A Watcher session, its first request line seen by the relay.
    let mut watcher = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!(
        "OPTIONS rtsp://127.0.0.1:{port}/cam/realmonitor?channel=1&subtype=0 RTSP/1.0\r\nCSeq: 1\r\n\r\n"
    );
    watcher.write_all(request.as_bytes()).await.unwrap();
    let mut echoed = vec![0; request.len()];
    watcher.read_exact(&mut echoed).await.unwrap();

    let streams = api.get("/streams").await;
    let stream = &streams["streams"][0];
    assert_eq!(stream["camera"], "cam-1");
    assert_eq!(stream["method"], "OPTIONS");
    assert_eq!(stream["path"], "/cam/realmonitor?channel=1&subtype=0");
    assert_eq!(stream["bytes_from_watcher"], request.len());
    assert!(stream["watcher"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));

    // The agent's own stats arrive with its heartbeats (every second here).
    let one = api
        .until("/agents/cam-1", |a| a["stats"]["active_sessions"] == 1)
        .await;
    assert_eq!(one["online"], true);
    assert_eq!(one["ports"][0], port);
    assert_eq!(one["camera"]["rtsp_port"], target);
    assert!(one["quic_rtt_ms"].is_f64() && one["last_heartbeat_secs_ago"].is_f64());
    let all = api.get("/agents").await;
    let ids: Vec<&str> = all["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cam-1", "cam-off"]);
    assert_eq!(all["agents"][1]["online"], false);

    let tunnel = api.get("/tunnels/cam-1").await;
    assert_eq!(tunnel["status"], "online");
    assert_eq!(tunnel["local_port"], port);
    assert_eq!(tunnel["remote_port"], target);
    assert_eq!(tunnel["connections"], 1);
    assert_eq!(tunnel["bytes_transferred"], 2 * request.len());
    assert_eq!(
        api.get("/tunnels").await["tunnels"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(api.get("/tunnels/cam-off").await["status"], "offline");

    // The metrics of this live relay pass promtool's checks and carry every family.
    let exposition = api.call("GET", "/metrics", None).await;
    assert_eq!(exposition.status, 200);
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; make test installs it)");
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(exposition.body.as_bytes()).await.unwrap();
    drop(stdin);
    let checked = promtool.wait_with_output().await.unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}"
    );
    for family in [
        "camera_relay_agents_online 1",
        "camera_relay_registrations_total{result=\"accepted\"} 1",
        "camera_relay_control_messages_total{type=\"heartbeat\"}",
        "camera_relay_watcher_sessions{camera=\"cam-1\"} 1",
        "camera_relay_session_setup_seconds_count 1",
        "camera_relay_heartbeat_age_seconds{agent=\"cam-1\"}",
        "camera_relay_quic_rtt_seconds{agent=\"cam-1\"}",
        "camera_relay_quic_congestion_window_bytes{agent=\"cam-1\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(
            exposition.body.contains(family),
            "{family} missing:\n{}",
            exposition.body
        );
    }

    // Unknown ids are 404 everywhere, as JSON.
    for path in ["/agents/nobody", "/tunnels/nobody"] {
        let reply = api.call("GET", path, None).await;
        assert_eq!(reply.status, 404, "{path}");
        assert!(reply.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("nobody"));
    }

    // Restarting the tunnel ends the Watcher session; the agent dials its tunnel again
    // within the same session, and a new Watcher gets through it.
    let restarted = api.call("POST", "/tunnels/cam-1/restart", None).await;
    assert_eq!(restarted.status, 200, "{}", restarted.body);
    assert_eq!(restarted.json().unwrap()["closed_sessions"], 1);
    let mut rest = Vec::new();
    let _ = watcher.read_to_end(&mut rest).await;
    redialed(&agent, 1).await;
    let mut watcher = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    watcher.write_all(request.as_bytes()).await.unwrap();
    watcher.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, request.as_bytes());
    assert_eq!(agent.stats.reconnections.load(Relaxed), 0, "one session");
    assert_eq!(
        api.call("POST", "/tunnels/cam-off/restart", None)
            .await
            .status,
        409
    );

    agent.stop().await;
    api.relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_agent_and_act_on_it() {
    let first = free_port_run(4);
    let api = Api::start(first, 1.0).await;
    let dir = tempfile::tempdir().unwrap();
    let mut json = agent_config_json("cam-1", &api.relay.url(), "api-token", first, 1);
    let mut agent = agent_from_file(dir.path(), &json);
    agent.online().await.unwrap();

    let pong = api.command("cam-1", "ping").await;
    assert_eq!(pong.status, 200, "{}", pong.body);
    let pong = pong.json().unwrap();
    assert!(pong["result"]["agent_clock_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(pong["result"]["quic_rtt_ms"].is_f64() && pong["round_trip_ms"].is_f64());
    let stats = api.command("cam-1", "stats").await.json().unwrap();
    assert!(stats["result"]["uptime_secs"].is_u64(), "{stats}");

    // Errors: a bad command names the valid ones; unknown 404; offline 409.
    let bad = api.command("cam-1", "explode").await;
    assert_eq!(bad.status, 400);
    let why = bad.json().unwrap()["error"].as_str().unwrap().to_string();
    assert!(
        why.contains("explode") && why.contains("reload_config"),
        "{why}"
    );
    let not_json = api.call("POST", "/agents/cam-1/control", Some("{")).await;
    assert_eq!(not_json.status, 400);
    assert_eq!(api.command("nobody", "ping").await.status, 404);
    assert_eq!(api.command("cam-off", "ping").await.status, 409);

    // reconnect: both links drop and come back at once.
    let reconnect = api.command("cam-1", "reconnect").await;
    assert_eq!(reconnect.json().unwrap()["result"]["reconnecting"], true);
    reconnected(&mut agent, 1).await;

    // reload_config: a changed file is applied (with a new session) and reported; a
    // broken one changes nothing and says why.
    json["streaming"]["stream_paths"] = serde_json::json!(["/only/this"]);
    json["agent"]["log_level"] = "ERROR".into();
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    let reloaded = api.command("cam-1", "reload_config").await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    let reloaded = reloaded.json().unwrap();
    assert_eq!(
        reloaded["result"]["applied"],
        serde_json::json!(["streaming.stream_paths"])
    );
    assert_eq!(
        reloaded["result"]["need_restart"],
        serde_json::json!(["agent.log_level"])
    );
    let paths = api
        .until("/agents/cam-1", |a| {
            a["camera"]["stream_paths"] == serde_json::json!(["/only/this"])
        })
        .await;
    assert_eq!(paths["online"], true);
    std::fs::write(dir.path().join("config.json"), "{ broken").unwrap();
    let broken = api.command("cam-1", "reload_config").await;
    assert_eq!(broken.status, 502);
    let why = broken.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("not valid JSON") && why.contains("running config is kept"),
        "{why}"
    );

    // restart: the agent answers, then its run ends asking for a restart.
    let restart = api.command("cam-1", "restart").await.json().unwrap();
    assert!(restart["result"]["restarting"]
        .as_str()
        .unwrap()
        .contains("re-executing"));
    assert_eq!(agent.join().await, Some(Exit::Restart));

    // An agent that never answers: 504 after limits.command_timeout_secs.
    let _mute = mute_agent(&api).await;
    let silent = api.command("mute", "ping").await;
    assert_eq!(silent.status, 504, "{}", silent.body);
    api.relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_match_the_openapi_document() {
    let first = free_port_run(4);
    let api = Api::start(first, 1.0).await;
    let dir = tempfile::tempdir().unwrap();
    let mut json = agent_config_json("cam-1", &api.relay.url(), "api-token", first, echo().await);
    let mut agent = agent_from_file(dir.path(), &json);
    let port = agent.online().await.unwrap();
    let mut watcher = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    watcher
        .write_all(b"DESCRIBE rtsp://127.0.0.1/cam/realmonitor RTSP/1.0\r\nCSeq: 2\r\n\r\n")
        .await
        .unwrap();
    api.until("/agents/cam-1", |a| a["stats"]["active_sessions"] == 1)
        .await;

    let mut samples = Vec::new();
    let mut record = |method: &str, template: &str, reply: HttpReply| {
        samples.push(serde_json::json!({
            "method": method, "path": template, "status": reply.status, "body": reply.body,
        }));
    };
    let url = |path: &str| format!("http://{}{path}", api.relay.control);
    record(
        "GET",
        "/health",
        http(&Place::host(), "GET", &url("/health"), None, None)
            .await
            .unwrap(),
    );
    record(
        "GET",
        "/agents",
        http(&Place::host(), "GET", &url("/agents"), None, None)
            .await
            .unwrap(),
    );
    for (path, template) in [
        ("/agents", "/agents"),
        ("/agents/cam-1", "/agents/{id}"),
        ("/agents/cam-off", "/agents/{id}"),
        ("/agents/nobody", "/agents/{id}"),
        ("/streams", "/streams"),
        ("/traffic", "/traffic"),
        ("/tunnels", "/tunnels"),
        ("/tunnels/cam-1", "/tunnels/{id}"),
        ("/tunnels/cam-off", "/tunnels/{id}"),
        ("/tunnels/nobody", "/tunnels/{id}"),
        ("/metrics", "/metrics"),
    ] {
        record("GET", template, api.call("GET", path, None).await);
    }
    // Releases and updates. This agent trusts no release key: it refuses every update
    // (it runs inside this test binary, which must not be replaced).
    record("GET", "/releases", api.call("GET", "/releases", None).await);
    let keys = dir.path().join("keys");
    e2e::certs(&["release-key", "--out", keys.to_str().unwrap()])
        .await
        .unwrap();
    let binary = dir.path().join("camera-agent");
    std::fs::write(&binary, b"\x7fELF a pretend agent").unwrap();
    let sign = |version: &'static str, target: &'static str| {
        let (keys, binary) = (keys.clone(), binary.clone());
        async move {
            let sig = binary.with_extension(format!("{version}.sig"));
            e2e::certs(&[
                "sign",
                binary.to_str().unwrap(),
                "--key",
                keys.join("release.key").to_str().unwrap(),
                "--target",
                target,
                "--version",
                version,
                "--out",
                sig.to_str().unwrap(),
            ])
            .await
            .unwrap();
            serde_json::from_slice::<Value>(&std::fs::read(sig).unwrap())
                .unwrap()
                .to_string()
        }
    };
    let host = agent::TARGET;
    let release = sign("9.0.0", host).await;
    record("POST", "/releases", upload(&api, &binary, None).await);
    let kept = upload(&api, &binary, Some(&release)).await;
    assert_eq!(kept.status, 201, "{}", kept.body);
    record("POST", "/releases", kept);
    let other_cpu = sign("9.0.1", "mips-unknown-linux-musl").await;
    record(
        "POST",
        "/releases",
        upload(&api, &binary, Some(&other_cpu)).await,
    );
    std::fs::write(&binary, b"\x7fELF another pretend agent").unwrap();
    let replaced = upload(&api, &binary, Some(&release)).await;
    assert_eq!(
        replaced.status, 422,
        "not the binary signed: {}",
        replaced.body
    );
    record("POST", "/releases", replaced);
    record("GET", "/releases", api.call("GET", "/releases", None).await);
    let update = "/agents/{id}/update";
    let release_id = format!("9.0.0-{host}");
    let body = |release: &str| format!(r#"{{"release": "{release}"}}"#);
    for (id, release) in [
        ("cam-1", "9.0.1-mips-unknown-linux-musl"),
        ("cam-1", "no-such-release"),
        ("nobody", release_id.as_str()),
        ("cam-1", release_id.as_str()),
    ] {
        let path = format!("/agents/{id}/update");
        record(
            "POST",
            update,
            api.call("POST", &path, Some(&body(release))).await,
        );
    }
    record(
        "POST",
        update,
        api.call("POST", "/agents/cam-1/update", Some("{}")).await,
    );
    let refused = api
        .until("/agents/cam-1/update", |j| j["state"] == "refused")
        .await;
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("trusts no release key"),
        "{refused}"
    );
    record(
        "GET",
        update,
        api.call("GET", "/agents/cam-1/update", None).await,
    );
    record(
        "GET",
        update,
        api.call("GET", "/agents/cam-off/update", None).await,
    );
    let rollout = format!(r#"{{"release": "{release_id}", "agents": ["cam-*"], "batch": 2}}"#);
    let started = api.call("POST", "/updates", Some(&rollout)).await;
    assert_eq!(started.status, 201, "{}", started.body);
    let rollout_id = started.json().unwrap()["id"].as_u64().unwrap();
    record("POST", "/updates", started);
    let nobody = format!(r#"{{"release": "{release_id}", "agents": ["zzz-*"]}}"#);
    record(
        "POST",
        "/updates",
        api.call("POST", "/updates", Some(&nobody)).await,
    );
    record("GET", "/updates", api.call("GET", "/updates", None).await);
    let one = format!("/updates/{rollout_id}");
    record("GET", "/updates/{id}", api.call("GET", &one, None).await);
    record(
        "GET",
        "/updates/{id}",
        api.call("GET", "/updates/999", None).await,
    );
    record(
        "DELETE",
        "/updates/{id}",
        api.call("DELETE", &one, None).await,
    );
    record(
        "DELETE",
        "/updates/{id}",
        api.call("DELETE", "/updates/999", None).await,
    );

    let control = "/agents/{id}/control";
    for (id, command) in [
        ("cam-1", "ping"),
        ("cam-1", "stats"),
        ("cam-1", "explode"),
        ("nobody", "ping"),
        ("cam-off", "ping"),
    ] {
        record("POST", control, api.command(id, command).await);
    }
    std::fs::write(dir.path().join("config.json"), "{ broken").unwrap();
    record("POST", control, api.command("cam-1", "reload_config").await);
    json["streaming"]["stream_paths"] = serde_json::json!(["/x"]);
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    record("POST", control, api.command("cam-1", "reload_config").await);
    reconnected(&mut agent, 1).await;
    record(
        "POST",
        "/tunnels/{id}/restart",
        api.call("POST", "/tunnels/cam-off/restart", None).await,
    );
    record(
        "POST",
        "/tunnels/{id}/restart",
        api.call("POST", "/tunnels/cam-1/restart", None).await,
    );
    redialed(&agent, 1).await;
    record("POST", control, api.command("cam-1", "reconnect").await);
    reconnected(&mut agent, 2).await;
    record("POST", control, api.command("cam-1", "restart").await);
    assert_eq!(agent.join().await, Some(Exit::Restart));
    let _mute = mute_agent(&api).await;
    record("POST", control, api.command("mute", "ping").await);
    // A relay alone has nowhere to drain to (the cluster tests drain for real).
    for method in ["GET", "POST", "DELETE"] {
        let reply = api.call(method, "/relay/drain", None).await;
        assert_eq!(reply.status, 409, "{}", reply.body);
        record(method, "/relay/drain", reply);
    }

    record(
        "GET",
        "/events",
        api.call("GET", "/events?types=camera.up", None).await,
    );
    let stream = events_stream_head(api.relay.control).await;
    assert!(stream.body.contains("text/event-stream"), "{}", stream.body);
    record("GET", "/events", stream);

    e2e::check_openapi(&samples).await.unwrap();
    api.relay.stop().await.unwrap();
}

/// `POST /releases` of `binary` with `signature` in its header, through curl.
async fn upload(api: &Api, binary: &std::path::Path, signature: Option<&str>) -> HttpReply {
    const STATUS: &str = "\n--status ";
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["--silent", "--oauth2-bearer", ADMIN])
        .args(["--write-out", &format!("{STATUS}%{{http_code}}")])
        .args(["-H", "Content-Type: application/octet-stream"])
        .arg("--data-binary")
        .arg(format!("@{}", binary.display()));
    if let Some(signature) = signature {
        cmd.args(["-H", &format!("X-Release-Signature: {signature}")]);
    }
    let output = cmd
        .arg(format!("http://{}/releases", api.relay.control))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let (body, status) = text.rsplit_once(STATUS).unwrap();
    HttpReply {
        status: status.trim().parse().unwrap(),
        body: body.to_string(),
    }
}

/// The status and head of `GET /events`, which streams on (e2e/tests/events.rs reads
/// streams): what a client gets before the first event.
async fn events_stream_head(relay: std::net::SocketAddr) -> HttpReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(relay).await.unwrap();
    let request =
        format!("GET /events HTTP/1.1\r\nHost: {relay}\r\nAuthorization: Bearer {ADMIN}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), tcp.read(&mut byte))
            .await
            .expect("response head within 30 s")
            .unwrap();
        assert_eq!(n, 1, "connection closed in the head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    HttpReply { status, body: head }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_re_executes_the_real_agent_or_exits_for_its_supervisor() {
    let rig = e2e::ProcessRig::start(&[], "cam-restart").await.unwrap();
    let url = format!(
        "http://127.0.0.1:{}/agents/cam-restart/control",
        rig.relay_port
    );
    // No admin token on this relay: operators on this host are let in.
    let restart = || async {
        let body = r#"{"command": "restart"}"#;
        let reply = http(&Place::host(), "POST", &url, None, Some(body))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    };
    let mut agent = e2e::AgentProcess::start("agent", &rig.config)
        .await
        .unwrap();
    restart().await;
    // Same process id (exec keeps it), a fresh start, online again.
    let pid = agent.process.pid();
    agent
        .process
        .wait_for_line("restarting: exec")
        .await
        .unwrap();
    agent.online(2).await.unwrap();
    assert_eq!(agent.process.pid(), pid);
    assert_eq!(agent.process.count_lines("camera-agent starting"), 2);
    drop(agent);

    let mut config = rig.config.clone();
    config["agent"]["restart"] = "exit".into();
    let mut supervised = e2e::AgentProcess::start("supervised", &config)
        .await
        .unwrap();
    restart().await;
    let status = supervised.process.wait().await.unwrap();
    assert_eq!(status.code(), Some(75), "EX_TEMPFAIL for the supervisor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_only_local_clients_are_operators() {
    // A relay with no admin token on a real (namespaced) network: a client from another
    // address is refused with 403; /health stays open.
    let lab = e2e::Lab::new(1).unwrap();
    let relay_side = lab.relay();
    let relay = e2e::RelayProcess::start_in(
        &relay_side,
        e2e::netns::RELAY_IP,
        8080,
        8554,
        "lab-token",
        &[],
    )
    .await
    .unwrap();
    let url = |path: &str| format!("http://{}:8080{path}", e2e::netns::RELAY_IP);
    let refused = http(&relay_side, "GET", &url("/agents"), None, None)
        .await
        .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("admin_token"));
    let health = http(&relay_side, "GET", &url("/health"), None, None)
        .await
        .unwrap();
    assert_eq!(health.status, 200);
    drop(relay);
}
