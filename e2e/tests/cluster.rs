//! Relays sharing one view of the fleet through a real 3-member etcd: cameras on
//! several relays, ports unique and stable cluster-wide, one live session per camera
//! cluster-wide, a relay's cameras gone from the view within its lease's TTL after a
//! SIGKILL, and etcd misbehaving (a member killed; the whole store down and back) under
//! live streams.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::time::Duration;

use e2e::{
    agent_config_json, ffprobe, free_port_run, free_ports, AgentProcess, CameraSim, EtcdCluster,
    RelayProcess, MAIN_STREAM,
};

const TOKEN: &str = "cluster-token";
const PREFIX: &str = "/camera-relay/";
/// The relays' lease TTL: short, so a dead relay's cameras leave the view quickly.
const TTL_SECS: u64 = 4;

/// A relay of the cluster, with its config in its own directory.
struct ClusterRelay {
    process: RelayProcess,
    /// Address its camera ports and its shared port listen on (each relay its own
    /// loopback address, as each would be its own host).
    camera_host: String,
    /// Its shared RTSP port (`/<agent-id>/…`).
    shared: u16,
    /// Holds its config file.
    dir: tempfile::TempDir,
}

impl ClusterRelay {
    /// Starts relay `id` with cameras on `camera_host`, ports `first` to `first + 3`.
    async fn start(id: &str, camera_host: &str, first: u16, etcd: &EtcdCluster) -> Self {
        Self::start_with(id, camera_host, first..=first + 3, etcd).await
    }

    async fn start_with(
        id: &str,
        camera_host: &str,
        camera_ports: std::ops::RangeInclusive<u16>,
        etcd: &EtcdCluster,
    ) -> Self {
        Self::start_configured(id, camera_host, camera_ports, etcd, "").await
    }

    /// [`ClusterRelay::start_with`] with `extra` lines in `[cluster]`.
    async fn start_configured(
        id: &str,
        camera_host: &str,
        camera_ports: std::ops::RangeInclusive<u16>,
        etcd: &EtcdCluster,
        extra: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let [port, shared] = free_ports(2)[..] else {
            unreachable!()
        };
        let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("{e:?}")).collect();
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\n\
             camera_bind = \"{camera_host}\"\n\
             shared_listen = \"{camera_host}:{shared}\"\n\
             camera_ports = \"{}-{}\"\n\
             shared_token = \"{TOKEN}\"\n\
             [cluster]\n\
             etcd_endpoints = [{}]\n\
             relay_id = \"{id}\"\n\
             advertise = \"http://127.0.0.1:{port}\"\n\
             rtsp_advertise = \"{camera_host}:{shared}\"\n\
             lease_ttl_secs = {TTL_SECS}\n",
            camera_ports.start(),
            camera_ports.end(),
            endpoints.join(", ")
        );
        let config = match etcd.tls() {
            Some(tls) => format!(
                "{config}etcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}\n",
                tls.ca, tls.client.0, tls.client.1
            ),
            None => config,
        };
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, format!("{config}{extra}")).unwrap();
        let process =
            RelayProcess::start_from_file_in(&e2e::Place::host(), &path, "127.0.0.1", port)
                .await
                .unwrap();
        ClusterRelay {
            process,
            camera_host: camera_host.to_string(),
            shared,
            dir,
        }
    }

    fn url(&self) -> String {
        self.process.url()
    }

    /// Stops the relay (SIGTERM) and starts it again on the same config and ports.
    async fn restart(&mut self) {
        let status = self.process.process.terminate().await.unwrap();
        assert!(status.success(), "{status:?}");
        let path = self.dir.path().join("relay.toml");
        self.process = RelayProcess::start_from_file_in(
            &e2e::Place::host(),
            &path,
            "127.0.0.1",
            self.process.port,
        )
        .await
        .unwrap();
    }

    /// Waits until the relay logs a line containing `words`.
    async fn said(&mut self, words: &str) {
        self.process.process.wait_for_line(words).await.unwrap();
    }

    fn rtsp(&self, port: u16) -> String {
        format!(
            "rtsp://admin:admin@{}:{port}{MAIN_STREAM}",
            self.camera_host
        )
    }

    /// Camera `agent` on the relay's shared port.
    fn shared_rtsp(&self, agent: &str) -> String {
        format!(
            "rtsp://admin:admin@{}:{}/{agent}{MAIN_STREAM}",
            self.camera_host, self.shared
        )
    }
}

/// Waits until something accepts TCP connections on `host:port`.
async fn until_accepting(host: &str, port: u16) {
    let deadline = tokio::time::Instant::now() + e2e::READY_TIMEOUT;
    while tokio::net::TcpStream::connect((host, port)).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {host}:{port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON record of `kind/name` in etcd, if present.
async fn record(etcd: &EtcdCluster, kind: &str, name: &str) -> Option<String> {
    let key = format!("{PREFIX}{kind}/{name}");
    etcd.get_prefix(&key)
        .await
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Which relay holds `agent` in etcd, and on which port.
async fn holder(etcd: &EtcdCluster, agent: &str) -> Option<(String, u16)> {
    let value = record(etcd, "cameras", agent).await?;
    let json: serde_json::Value = serde_json::from_str(&value).unwrap();
    Some((
        json["relay"].as_str().unwrap().to_string(),
        json["port"].as_u64().unwrap() as u16,
    ))
}

/// Polls etcd until `agent`'s holder is `want`, for at most `within`.
async fn until_holder(etcd: &EtcdCluster, agent: &str, want: Option<&str>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = holder(etcd, agent).await;
        if now.as_ref().map(|(relay, _)| relay.as_str()) == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{agent} is held by {now:?}, not {want:?}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The relay's API answer (from loopback: no token needed).
async fn api(relay: &ClusterRelay, method: &str, path: &str, body: Option<&str>) -> e2e::HttpReply {
    let url = format!("http://127.0.0.1:{}{path}", relay.process.port);
    e2e::http(&e2e::Place::host(), method, &url, None, body)
        .await
        .unwrap()
}

/// Polls `relay`'s `/agents` until it lists `agent` online on `holder`.
async fn until_listed(relay: &ClusterRelay, agent: &str, holder: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let agents = api(relay, "GET", "/agents", None).await.json().unwrap();
        let listed = agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == agent)
            .cloned();
        if listed
            .as_ref()
            .is_some_and(|a| a["online"] == true && a["relay"] == holder)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{agent} not listed on {holder}: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn agent_json(id: &str, relay: &ClusterRelay, camera: &CameraSim) -> serde_json::Value {
    agent_config_json(id, &relay.url(), TOKEN, 0, camera.port)
}

/// The port in the agent's "online: … on port N" line.
fn port_on(line: &str) -> u16 {
    let after = line.split_once("on port ").unwrap().1;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

async fn online_port(agent: &mut AgentProcess) -> u16 {
    let line = agent
        .process
        .wait_for_line("online: the relay serves this camera")
        .await
        .unwrap();
    port_on(&line)
}

#[tokio::test]
async fn cameras_on_two_relays_share_ports_and_one_session_cluster_wide() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let first = free_port_run(4);
    let mut a = ClusterRelay::start("relay-a", "127.0.0.1", first, &etcd).await;
    let mut b = ClusterRelay::start("relay-b", "127.0.0.2", first, &etcd).await;
    let camera = CameraSim::start(&[]).await.unwrap();

    // Both relays hand out the same range: etcd keeps the two cameras apart.
    let mut on_a = AgentProcess::spawn("cam-1@a", &agent_json("cam-1", &a, &camera)).unwrap();
    let port_1 = online_port(&mut on_a).await;
    let mut cam_2 = AgentProcess::spawn("cam-2@b", &agent_json("cam-2", &b, &camera)).unwrap();
    let port_2 = online_port(&mut cam_2).await;
    assert_ne!(port_1, port_2, "two relays gave two cameras one port");
    assert_eq!(
        holder(&etcd, "cam-1").await,
        Some(("relay-a".into(), port_1))
    );
    assert_eq!(
        holder(&etcd, "cam-2").await,
        Some(("relay-b".into(), port_2))
    );
    assert_eq!(
        record(&etcd, "ports", &port_1.to_string()).await.as_deref(),
        Some("cam-1")
    );
    assert_eq!(
        record(&etcd, "ports", &port_2.to_string()).await.as_deref(),
        Some("cam-2")
    );
    for relay in ["relay-a", "relay-b"] {
        let announced = record(&etcd, "relays", relay).await.unwrap();
        assert!(
            announced.contains("\"advertise\":\"http://127.0.0.1:"),
            "{announced}"
        );
    }

    // The operator sees the whole fleet from either relay, and reaches a camera
    // through the relay that does not hold it.
    for relay in [&a, &b] {
        until_listed(relay, "cam-1", "relay-a").await;
        until_listed(relay, "cam-2", "relay-b").await;
    }
    let ping = api(
        &a,
        "POST",
        "/agents/cam-2/control",
        Some(r#"{"command": "ping"}"#),
    )
    .await;
    assert_eq!(ping.status, 200, "{}", ping.body);
    let ping = ping.json().unwrap();
    assert!(
        ping["result"]["agent_clock_unix_ms"].as_f64().is_some(),
        "{ping}"
    );
    let health = api(&a, "GET", "/health", None).await.json().unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["cluster"]["relay"], "relay-a", "{health}");
    assert_eq!(health["cluster"]["store"]["reachable"], true, "{health}");
    let metrics = api(&a, "GET", "/metrics", None).await.body;
    assert_eq!(
        e2e::metric(&metrics, "camera_relay_cluster_cameras"),
        Some(2.0)
    );
    assert_eq!(
        e2e::metric(&metrics, "camera_relay_cluster_store_up"),
        Some(1.0)
    );
    // What a cluster relay answers is what docs/api.yaml says.
    let mut samples = Vec::new();
    for (method, path, template, body) in [
        ("GET", "/health", "/health", None),
        ("GET", "/agents", "/agents", None),
        ("GET", "/agents/cam-1", "/agents/{id}", None),
        ("GET", "/agents/cam-2", "/agents/{id}", None),
        ("GET", "/tunnels", "/tunnels", None),
        ("GET", "/tunnels/cam-2", "/tunnels/{id}", None),
        (
            "POST",
            "/agents/cam-2/control",
            "/agents/{id}/control",
            Some(r#"{"command": "stats"}"#),
        ),
    ] {
        let reply = api(&a, method, path, body).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        samples.push(serde_json::json!({
            "method": method, "path": template, "status": reply.status, "body": reply.body,
        }));
    }
    e2e::check_openapi_some(&samples).await.unwrap();

    // The same camera registers on relay B (it moved networks; A still holds it): B
    // takes the claim, A ends its session and tells the agent where it went, and the
    // camera keeps its port on B.
    let mut on_b = AgentProcess::spawn("cam-1@b", &agent_json("cam-1", &b, &camera)).unwrap();
    let moved_port = online_port(&mut on_b).await;
    assert_eq!(
        moved_port, port_1,
        "the camera's port changed with its relay"
    );
    on_a.process
        .wait_for_line("on relay relay-b")
        .await
        .unwrap();
    a.said("the camera registered on relay relay-b").await;
    on_a.process.kill().await.unwrap();
    until_holder(&etcd, "cam-1", Some("relay-b"), Duration::from_secs(5)).await;
    let probe = ffprobe(b.rtsp(moved_port), 5).await.unwrap();
    assert!(probe.frames >= 5, "{probe:?}");

    // Relay B dies without a word: its cameras leave the cluster's view within the
    // lease's TTL, with nobody cleaning up; their ports stay theirs.
    b.process.process.kill().await.unwrap();
    let within = Duration::from_secs(TTL_SECS + 5);
    until_holder(&etcd, "cam-1", None, within).await;
    until_holder(&etcd, "cam-2", None, within).await;
    assert_eq!(
        record(&etcd, "ports", &port_1.to_string()).await.as_deref(),
        Some("cam-1")
    );
    assert_eq!(record(&etcd, "relays", "relay-b").await, None);

    // cam-2 comes back on relay A and gets its port back there.
    cam_2.process.kill().await.unwrap();
    let mut cam_2 = AgentProcess::spawn("cam-2@a", &agent_json("cam-2", &a, &camera)).unwrap();
    assert_eq!(online_port(&mut cam_2).await, port_2);
    until_holder(&etcd, "cam-2", Some("relay-a"), Duration::from_secs(5)).await;
    drop(on_b);
}

#[tokio::test]
async fn the_store_failing_leaves_streams_alone_and_heals_by_itself() {
    let mut etcd = EtcdCluster::start(3).await.unwrap();
    let first = free_port_run(4);
    let mut a = ClusterRelay::start("relay-a", "127.0.0.1", first, &etcd).await;
    let camera = CameraSim::start(&[]).await.unwrap();
    let mut cam_1 = AgentProcess::spawn("cam-1", &agent_json("cam-1", &a, &camera)).unwrap();
    let port_1 = online_port(&mut cam_1).await;

    // One member killed: nothing noticeable.
    etcd.kill(0).await.unwrap();
    let mut cam_2 = AgentProcess::spawn("cam-2", &agent_json("cam-2", &a, &camera)).unwrap();
    online_port(&mut cam_2).await;
    until_holder(&etcd, "cam-2", Some("relay-a"), Duration::from_secs(5)).await;
    etcd.restart(0).await.unwrap();

    // The whole store down: the camera online keeps streaming, the relay says once
    // that it is degraded, and a new camera is refused with a reason it can act on.
    etcd.kill_all().await.unwrap();
    a.said("the cluster store (etcd at").await;
    let probe = ffprobe(a.rtsp(port_1), 5).await.unwrap();
    assert!(probe.frames >= 5, "{probe:?}");
    let mut cam_3 = AgentProcess::spawn("cam-3", &agent_json("cam-3", &a, &camera)).unwrap();
    cam_3
        .process
        .wait_for_line("cannot reach its cluster store")
        .await
        .unwrap();
    assert_eq!(
        a.process.process.count_lines("is unreachable"),
        1,
        "one line per state change"
    );
    let health = api(&a, "GET", "/health", None).await;
    let sample = serde_json::json!([{
        "method": "GET", "path": "/health", "status": health.status, "body": health.body,
    }]);
    let health = health.json().unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["cluster"]["store"]["reachable"], false, "{health}");
    e2e::check_openapi_some(sample.as_array().unwrap())
        .await
        .unwrap();
    let metrics = api(&a, "GET", "/metrics", None).await.body;
    assert_eq!(
        e2e::metric(&metrics, "camera_relay_cluster_store_up"),
        Some(0.0)
    );

    // etcd back: the relay heals, the waiting camera comes online, and every camera is
    // in the view once, held by this relay.
    etcd.restart_all().await.unwrap();
    a.said("is reachable again").await;
    online_port(&mut cam_3).await;
    for agent in ["cam-1", "cam-2", "cam-3"] {
        until_holder(&etcd, agent, Some("relay-a"), Duration::from_secs(10)).await;
    }
    let probe = ffprobe(a.rtsp(port_1), 5).await.unwrap();
    assert!(probe.frames >= 5, "{probe:?}");

    // Stopped politely, the relay gives its lease back: its cameras leave the view at
    // once, not a TTL later.
    let status = a.process.process.terminate().await.unwrap();
    assert!(status.success(), "{status:?}");
    for agent in ["cam-1", "cam-2", "cam-3"] {
        assert_eq!(
            holder(&etcd, agent).await,
            None,
            "{agent} outlived its relay"
        );
    }
    drop((cam_1, cam_2, cam_3));
}

#[tokio::test]
async fn a_relay_that_cannot_reach_etcd_says_so_and_exits() {
    let dead = free_ports(1)[0];
    let said = failed_start(&[format!("http://127.0.0.1:{dead}")], "relay-a", "").await;
    let errors: Vec<&str> = said.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one line: {said}");
    assert!(
        errors[0].contains(&format!(
            "cannot reach the cluster store (etcd at http://127.0.0.1:{dead})"
        )),
        "{}",
        errors[0]
    );
}

#[tokio::test]
async fn garbage_in_etcd_is_skipped_and_a_quiet_fleet_writes_nothing() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    // Keys an older version or a person might have left, before and after the start.
    etcd.put(&format!("{PREFIX}cameras/junk"), "not json")
        .await
        .unwrap();
    etcd.put(&format!("{PREFIX}ports/not-a-port"), "cam-9")
        .await
        .unwrap();
    let first = free_port_run(24);
    let mut a = ClusterRelay::start_with("relay-a", "127.0.0.1", first..=first + 23, &etcd).await;
    etcd.put(&format!("{PREFIX}relays/broken"), "{\"advertise\": 1}")
        .await
        .unwrap();
    a.said("skipping etcd key").await;

    // A fleet registers and settles; then, while nothing changes, the cluster writes
    // nothing to etcd (the lease's keep-alives are not writes): each camera costs two
    // keys and a handful of writes when it comes, moves or goes, none while it stays.
    let camera = CameraSim::start(&[]).await.unwrap();
    let configs = (0..20)
        .map(|i| {
            let json = agent_config_json(&format!("cam-{i}"), &a.url(), TOKEN, 0, camera.port);
            agent::AgentConfig::parse(&json.to_string(), "test").unwrap()
        })
        .collect();
    let joined = etcd.revision().await.unwrap();
    let fleet = e2e::Fleet::start(configs);
    fleet
        .online_times(tokio::time::Instant::now(), e2e::READY_TIMEOUT)
        .await
        .unwrap();
    for i in 0..20 {
        until_link(&etcd, &format!("cam-{i}"), "quic").await;
    }
    let keys = etcd.get_prefix(PREFIX).await.unwrap();
    let cameras = keys
        .iter()
        .filter(|(k, _)| k.contains("/cameras/cam-"))
        .count();
    let ports = keys
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(&format!("{PREFIX}ports/")))
        .filter(|port| port.parse::<u16>().is_ok())
        .count();
    assert_eq!((cameras, ports), (20, 20), "{keys:#?}");
    let before = etcd.revision().await.unwrap();
    // Coming online: its port (once ever), its claim, its data link.
    let per_camera = (before - joined) as f64 / 20.0;
    eprintln!("etcd writes per camera coming online: {per_camera}");
    // (A fourth if its first data link was the TCP fallback.)
    assert!(
        per_camera <= 4.0,
        "{per_camera} writes per camera coming online"
    );
    // Two lease TTLs: every relay renews its lease several times meanwhile.
    tokio::time::sleep(Duration::from_secs(2 * TTL_SECS)).await;
    let after = etcd.revision().await.unwrap();
    assert_eq!(after, before, "a quiet fleet wrote to etcd");
    assert!(a.process.process.count_lines("panicked") == 0);
    fleet.stop().await;

    // A second relay under the same id (a copied config) is refused at its start: it
    // would take relay-a's cameras for its own.
    let said = failed_start(&etcd.endpoints(), "relay-a", "").await;
    assert!(
        said.contains("relay id \"relay-a\" is in use by a live relay"),
        "{said}"
    );
}

/// Starts a relay `id` on etcd at `endpoints` (with `extra` lines in `[cluster]`) that
/// must exit at once; what it said.
async fn failed_start(endpoints: &[String], id: &str, extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_ports(1)[0];
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let config = format!(
        "listen = \"127.0.0.1:{listen}\"\nshared_token = \"{TOKEN}\"\n[cluster]\n\
         etcd_endpoints = [{}]\nrelay_id = \"{id}\"\nadvertise = \"http://127.0.0.1:{listen}\"\n{extra}",
        endpoints.join(", ")
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = tokio::process::Command::new(e2e::bin("relay").unwrap());
    cmd.arg("--config").arg(&path);
    let mut relay = e2e::Child::spawn(id, cmd).unwrap();
    let status = relay.wait().await.unwrap();
    assert!(!status.success(), "relay {id} started");
    relay.output().join("\n")
}

/// Polls etcd until `agent`'s record shows its data link as `link`.
async fn until_link(etcd: &EtcdCluster, agent: &str, link: &str) {
    let deadline = tokio::time::Instant::now() + e2e::READY_TIMEOUT;
    loop {
        let value = record(etcd, "cameras", agent).await.unwrap_or_default();
        if value.contains(&format!("\"link\":\"{link}\"")) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{agent}'s record never showed link {link}: {value}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn relays_reach_etcd_over_tls_and_a_restarted_relay_keeps_its_cameras_ports() {
    let etcd = EtcdCluster::start_tls(1).await.unwrap();
    let first = free_port_run(4);
    let mut a = ClusterRelay::start("relay-a", "127.0.0.1", first, &etcd).await;
    let camera = CameraSim::start(&[]).await.unwrap();
    let mut cam_1 = AgentProcess::spawn("cam-1", &agent_json("cam-1", &a, &camera)).unwrap();
    let port = online_port(&mut cam_1).await;
    until_holder(&etcd, "cam-1", Some("relay-a"), Duration::from_secs(5)).await;
    assert_eq!(holder(&etcd, "cam-1").await, Some(("relay-a".into(), port)));

    // The relay restarts (it keeps no state of its own in a cluster) while the camera
    // is away: a new camera registering first does not get its port, and the camera
    // gets it back.
    cam_1.process.kill().await.unwrap();
    a.restart().await;
    let mut newcomer = AgentProcess::spawn("cam-new", &agent_json("cam-new", &a, &camera)).unwrap();
    assert_ne!(
        online_port(&mut newcomer).await,
        port,
        "the camera's port was given away"
    );
    let mut cam_1 = AgentProcess::spawn("cam-1", &agent_json("cam-1", &a, &camera)).unwrap();
    assert_eq!(online_port(&mut cam_1).await, port);
    until_holder(&etcd, "cam-1", Some("relay-a"), Duration::from_secs(5)).await;

    // Without its client certificate a relay is turned away by etcd, and says so.
    let ca = format!("etcd_ca = {:?}\n", etcd.tls().unwrap().ca);
    let said = failed_start(&etcd.endpoints(), "relay-b", &ca).await;
    assert!(said.contains("cannot reach the cluster store"), "{said}");
}

#[tokio::test]
async fn relays_sign_in_to_etcd_and_again_after_it_restarts() {
    let mut etcd = EtcdCluster::start(1).await.unwrap();
    etcd.enable_auth("camera-relay", "s3cret", PREFIX)
        .await
        .unwrap();
    let first = free_port_run(4);
    let credentials = "etcd_user = \"camera-relay\"\netcd_password = \"s3cret\"\n";
    let mut a = ClusterRelay::start_configured(
        "relay-a",
        "127.0.0.1",
        first..=first + 3,
        &etcd,
        credentials,
    )
    .await;
    let camera = CameraSim::start(&[]).await.unwrap();
    let mut cam_1 = AgentProcess::spawn("cam-1", &agent_json("cam-1", &a, &camera)).unwrap();
    online_port(&mut cam_1).await;
    until_holder(&etcd, "cam-1", Some("relay-a"), Duration::from_secs(5)).await;

    // etcd restarts: it forgets every auth token it gave out. The relay signs in again
    // by itself, and a new camera registers.
    etcd.kill_all().await.unwrap();
    a.said("is unreachable").await;
    etcd.restart_all().await.unwrap();
    a.said("is reachable again").await;
    let mut cam_2 = AgentProcess::spawn("cam-2", &agent_json("cam-2", &a, &camera)).unwrap();
    online_port(&mut cam_2).await;
    until_holder(&etcd, "cam-2", Some("relay-a"), Duration::from_secs(10)).await;
    until_holder(&etcd, "cam-1", Some("relay-a"), Duration::from_secs(10)).await;
}

/// The cluster's CA and the relays' peer certificates, issued by the `certs` tool.
struct ClusterCa {
    dir: tempfile::TempDir,
}

impl ClusterCa {
    async fn issue(relays: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_str().unwrap();
        e2e::certs(&["ca", "--name", "cluster CA", "--out", out])
            .await
            .unwrap();
        for id in relays {
            e2e::certs(&["peer", "--id", id, "--ca", out, "--out", out])
                .await
                .unwrap();
        }
        ClusterCa { dir }
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    /// `[cluster]` lines giving relay `id` a relay-to-relay endpoint.
    fn peer_lines(&self, id: &str) -> String {
        self.peer_lines_on(id, &format!("127.0.0.1:{}", free_ports(1)[0]))
    }

    /// [`ClusterCa::peer_lines`] with the endpoint on `listen`.
    fn peer_lines_on(&self, id: &str, listen: &str) -> String {
        format!(
            "peer_listen = \"{listen}\"\npeer_cert = {:?}\npeer_key = {:?}\npeer_ca = {:?}\n",
            self.path(&format!("peer-{id}.crt")),
            self.path(&format!("peer-{id}.key")),
            self.path("ca.crt"),
        )
    }
}

/// The value of the `camera_relay_peer_streams_total` sample with these labels.
fn peer_streams(metrics: &str, relay: &str, direction: &str, result: &str) -> f64 {
    let labels = [
        format!("relay=\"{relay}\""),
        format!("direction=\"{direction}\""),
        format!("result=\"{result}\""),
    ];
    metrics
        .lines()
        .filter(|l| l.starts_with("camera_relay_peer_streams_total{"))
        .find(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A relay of the cluster with a relay-to-relay endpoint.
async fn linked_relay(
    id: &str,
    camera_host: &str,
    first: u16,
    etcd: &EtcdCluster,
    ca: &ClusterCa,
) -> ClusterRelay {
    ClusterRelay::start_configured(id, camera_host, first..=first + 3, etcd, &ca.peer_lines(id))
        .await
}

#[tokio::test]
async fn a_watcher_at_any_relay_decodes_any_camera() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let ca = ClusterCa::issue(&["relay-a", "relay-b"]).await;
    let first = free_port_run(4);
    let a = linked_relay("relay-a", "127.0.0.1", first, &etcd, &ca).await;
    let b = linked_relay("relay-b", "127.0.0.2", first, &etcd, &ca).await;
    let camera = CameraSim::start(&[]).await.unwrap();
    let mut cam_1 = AgentProcess::spawn("cam-1@a", &agent_json("cam-1", &a, &camera)).unwrap();
    online_port(&mut cam_1).await;
    let mut cam_2 = AgentProcess::spawn("cam-2@b", &agent_json("cam-2", &b, &camera)).unwrap();
    online_port(&mut cam_2).await;
    for relay in [&a, &b] {
        until_listed(relay, "cam-1", "relay-a").await;
        until_listed(relay, "cam-2", "relay-b").await;
    }

    // Every camera through every relay's shared port: ffprobe, and GStreamer's rtspsrc.
    for relay in [&a, &b] {
        for agent in ["cam-1", "cam-2"] {
            let url = relay.shared_rtsp(agent);
            let probe = ffprobe(&url, 5).await.unwrap();
            assert!(probe.frames >= 5, "{url}: {probe:?}");
        }
    }
    e2e::gst_decode(
        &e2e::Place::host(),
        &a.shared_rtsp("cam-2"),
        &["protocols=tcp"],
        10,
    )
    .await
    .unwrap();

    // Each crossing counted on both relays; the holder did the RTSP work (its
    // camera's series count the media), the other only carried bytes.
    let on_a = api(&a, "GET", "/metrics", None).await.body;
    let on_b = api(&b, "GET", "/metrics", None).await.body;
    assert_eq!(peer_streams(&on_a, "relay-b", "out", "ok"), 2.0, "{on_a}");
    assert_eq!(peer_streams(&on_b, "relay-a", "in", "ok"), 2.0, "{on_b}");
    assert_eq!(peer_streams(&on_b, "relay-a", "out", "ok"), 1.0, "{on_b}");
    assert!(
        e2e::metric(&on_b, "camera_relay_video_frames_total{camera=\"cam-2\"}")
            .is_some_and(|f| f >= 25.0),
        "{on_b}"
    );
    assert_eq!(
        e2e::metric(&on_a, "camera_relay_video_frames_total{camera=\"cam-2\"}"),
        None,
        "relay A applied RTSP awareness to a camera it does not hold"
    );
}

/// The test's own end of a relay-to-relay link: presents `cert` of `ca_dir` (files
/// `<cert>.crt` and `<cert>.key`), trusts the cluster's CA, dials `relay` at `addr`.
async fn dial_peer(
    ca: &ClusterCa,
    cert_dir: &std::path::Path,
    cert: &str,
    relay: &str,
    addr: std::net::SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let identity = common::tls::Identity::from_pem_files(
        &cert_dir.join(format!("{cert}.crt")),
        &cert_dir.join(format!("{cert}.key")),
    )
    .unwrap();
    let roots = common::tls::load_roots(&ca.path("ca.crt")).unwrap();
    let (_, client) = common::tls::peer_quic_configs(&identity, &roots).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.connect_with(client, addr, relay).unwrap().await
}

/// Why the relay closed `conn`, in its words.
async fn closed_because(conn: quinn::Connection) -> String {
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("closed by something else than the relay's refusal: {other}"),
    }
}

/// A relay-to-relay stream header, framed as on the wire.
async fn frame(open: &common::protocol::PeerOpen) -> Vec<u8> {
    let mut bytes = Vec::new();
    common::protocol::write_frame(&mut bytes, open)
        .await
        .unwrap();
    bytes
}

/// Opens a stream, writes `bytes`, finishes; what comes back, or the stream's error.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_relay_to_relay_port_serves_only_the_clusters_relays() {
    use common::protocol::{PeerOpen, StreamStatus};

    let etcd = EtcdCluster::start(1).await.unwrap();
    let ca = ClusterCa::issue(&["relay-a", "relay-c", "relay-x"]).await;
    let ca_dir = ca.dir.path().to_str().unwrap().to_string();
    e2e::certs(&[
        "agent", "--id", "relay-z", "--ca", &ca_dir, "--out", &ca_dir,
    ])
    .await
    .unwrap();
    let rogue = tempfile::tempdir().unwrap();
    let rogue_dir = rogue.path().to_str().unwrap();
    e2e::certs(&["ca", "--out", rogue_dir]).await.unwrap();
    e2e::certs(&[
        "peer", "--id", "relay-c", "--ca", rogue_dir, "--out", rogue_dir,
    ])
    .await
    .unwrap();

    let mut a = linked_relay("relay-a", "127.0.0.1", free_port_run(4), &etcd, &ca).await;
    let camera = CameraSim::start(&[]).await.unwrap();
    let mut cam_1 = AgentProcess::spawn("cam-1", &agent_json("cam-1", &a, &camera)).unwrap();
    let port = online_port(&mut cam_1).await;
    let announced: serde_json::Value =
        serde_json::from_str(&record(&etcd, "relays", "relay-a").await.unwrap()).unwrap();
    let addr: std::net::SocketAddr = announced["peer"].as_str().unwrap().parse().unwrap();

    // A certificate from another CA does not get through the handshake (in TLS 1.3 the
    // client may think it is done before the relay checks its certificate: then the
    // connection closes with a TLS alert).
    let e = match dial_peer(&ca, rogue.path(), "peer-relay-c", "relay-a", addr).await {
        Err(e) => e,
        Ok(conn) => conn.closed().await,
    };
    assert!(
        matches!(e, quinn::ConnectionError::ConnectionClosed(_)),
        "{e}"
    );
    a.said("relay-to-relay handshake failed").await;
    // The cluster's CA, but no relay: an agent's certificate, a relay the store does
    // not announce, this relay's own id.
    for (cert, why) in [
        ("relay-z", "names no relay id"),
        ("peer-relay-x", "announces no relay of that id"),
        ("peer-relay-a", "this relay's own id"),
    ] {
        let conn = dial_peer(&ca, ca.dir.path(), cert, "relay-a", addr)
            .await
            .unwrap();
        let reason = closed_because(conn).await;
        assert!(reason.contains(why), "{cert}: {reason}");
    }

    // relay-c, once announced, gets in; garbage on its streams resets those streams
    // and nothing else.
    etcd.put(
        &format!("{PREFIX}relays/relay-c"),
        r#"{"advertise":"http://127.0.0.1:9","version":"test","since":0}"#,
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = api(&a, "GET", "/metrics", None).await.body;
        if e2e::metric(&metrics, "camera_relay_cluster_relays") == Some(2.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = dial_peer(&ca, ca.dir.path(), "peer-relay-c", "relay-a", addr)
        .await
        .unwrap();
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 151 % 251) as u8).collect();
    for bad in [
        garbage.clone(),
        vec![0xff, 0xff, 1, 2, 3],
        frame(&PeerOpen {
            camera: "../etc".into(),
            shared: false,
            watcher: "192.0.2.7:5555".into(),
            connection_id: 1,
        })
        .await,
        frame(&PeerOpen {
            camera: "cam-1".into(),
            shared: false,
            watcher: "not an address".into(),
            connection_id: 1,
        })
        .await,
    ] {
        let answer = exchange(&conn, &bad).await;
        assert!(answer.is_err(), "{bad:?} answered {answer:?}");
    }
    // A camera this relay does not hold: a refusal that says so.
    let nope = frame(&PeerOpen {
        camera: "nope".into(),
        shared: false,
        watcher: "192.0.2.7:5555".into(),
        connection_id: 2,
    })
    .await;
    let answer = exchange(&conn, &nope).await.unwrap();
    let (status, _) = common::protocol::decode_frame_prefix::<StreamStatus>(&answer)
        .unwrap()
        .unwrap();
    assert_eq!(
        status,
        StreamStatus::Failed("camera nope is not on relay relay-a".into())
    );
    // A camera it holds: the Watcher's bytes reach the camera and its answer comes back.
    let mut open = frame(&PeerOpen {
        camera: "cam-1".into(),
        shared: false,
        watcher: "192.0.2.7:5555".into(),
        connection_id: 3,
    })
    .await;
    open.extend_from_slice(
        format!("OPTIONS rtsp://127.0.0.1:{port}{MAIN_STREAM} RTSP/1.0\r\nCSeq: 1\r\n\r\n")
            .as_bytes(),
    );
    let answer = exchange(&conn, &open).await.unwrap();
    let (status, used) = common::protocol::decode_frame_prefix::<StreamStatus>(&answer)
        .unwrap()
        .unwrap();
    assert_eq!(status, StreamStatus::Connected);
    let reply = String::from_utf8_lossy(&answer[used..]);
    assert!(reply.starts_with("RTSP/1.0 200"), "{reply}");

    // The relay serves on as before.
    let probe = ffprobe(a.rtsp(port), 5).await.unwrap();
    assert!(probe.frames >= 5, "{probe:?}");
    let metrics = api(&a, "GET", "/metrics", None).await.body;
    assert_eq!(peer_streams(&metrics, "relay-c", "in", "bad_header"), 4.0);
    assert_eq!(peer_streams(&metrics, "relay-c", "in", "not_here"), 1.0);
    assert_eq!(peer_streams(&metrics, "relay-c", "in", "ok"), 1.0);
}

#[tokio::test]
async fn cameras_of_a_killed_relay_come_back_on_the_other_at_the_same_urls() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let ca = ClusterCa::issue(&["relay-a", "relay-b"]).await;
    let first = free_port_run(4);
    // Each relay serves every camera's own port too, wherever the camera is.
    let remote = |id: &str| format!("{}remote_camera_ports = true\n", ca.peer_lines(id));
    let range = first..=first + 3;
    let mut relays = [
        ClusterRelay::start_configured(
            "relay-a",
            "127.0.0.1",
            range.clone(),
            &etcd,
            &remote("relay-a"),
        )
        .await,
        ClusterRelay::start_configured("relay-b", "127.0.0.2", range, &etcd, &remote("relay-b"))
            .await,
    ];
    let camera = CameraSim::start(&[]).await.unwrap();
    // Every camera knows both relays, and picks its first by its id.
    let ids = ["cam-1", "cam-2", "cam-3", "cam-4"];
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for id in ids {
        let mut json = agent_json(id, &relays[0], &camera);
        json["agent"]["tunnel_server_url"] = serde_json::json!([relays[0].url(), relays[1].url()]);
        let mut agent = AgentProcess::spawn(id, &json).unwrap();
        ports.push(online_port(&mut agent).await);
        agents.push(agent);
    }
    let mut held = Vec::new();
    for id in ids {
        held.push(holder(&etcd, id).await.unwrap().0);
    }
    let on_a = held.iter().filter(|r| *r == "relay-a").count();
    assert!(
        on_a > 0 && on_a < ids.len(),
        "the fleet did not spread over both relays: {held:?}"
    );
    // The victim holds at least one camera; the survivor's URLs reach every camera,
    // on its shared port and on each camera's own port.
    let (victim, survivor) = (0, 1);
    for (i, id) in ids.iter().enumerate() {
        until_listed(&relays[survivor], id, &held[i]).await;
        until_accepting(&relays[survivor].camera_host, ports[i]).await;
        for url in [
            relays[survivor].shared_rtsp(id),
            relays[survivor].rtsp(ports[i]),
        ] {
            let probe = ffprobe(&url, 3).await.unwrap();
            assert!(probe.frames >= 3, "{url}: {probe:?}");
        }
    }

    relays[victim].process.process.kill().await.unwrap();
    let killed = std::time::Instant::now();
    let moved: Vec<usize> = (0..ids.len()).filter(|&i| held[i] == "relay-a").collect();
    for &i in &moved {
        // Back online on the survivor, on the port it had.
        let line = agents[i]
            .process
            .wait_for_nth_line("online: the relay serves this camera", 2)
            .await
            .unwrap();
        assert_eq!(port_on(&line), ports[i], "{} changed ports", ids[i]);
    }
    for &i in &moved {
        let probe = ffprobe(relays[survivor].shared_rtsp(ids[i]), 3)
            .await
            .unwrap();
        assert!(probe.frames >= 3, "{}: {probe:?}", ids[i]);
    }
    println!(
        "from SIGKILL of relay-a to its {} cameras decoding on relay-b: {:.2} s",
        moved.len(),
        killed.elapsed().as_secs_f64()
    );
    // Every camera decodes through the same URLs on the survivor as before.
    for (i, id) in ids.iter().enumerate() {
        until_holder(&etcd, id, Some("relay-b"), e2e::READY_TIMEOUT).await;
        for url in [
            relays[survivor].shared_rtsp(id),
            relays[survivor].rtsp(ports[i]),
        ] {
            let probe = ffprobe(&url, 3).await.unwrap();
            assert!(probe.frames >= 3, "{url}: {probe:?}");
        }
    }
}

#[tokio::test]
async fn a_relay_redirects_watchers_to_the_relay_holding_the_camera() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let first = free_port_run(4);
    let a = ClusterRelay::start_configured(
        "relay-a",
        "127.0.0.1",
        first..=first + 3,
        &etcd,
        "watchers = \"redirect\"\n",
    )
    .await;
    // Relay B neither redirects nor has a link: it says where the camera is.
    let b = ClusterRelay::start("relay-b", "127.0.0.2", first, &etcd).await;
    let camera = CameraSim::start(&[]).await.unwrap();
    let mut cam_1 = AgentProcess::spawn("cam-1@a", &agent_json("cam-1", &a, &camera)).unwrap();
    online_port(&mut cam_1).await;
    let mut cam_2 = AgentProcess::spawn("cam-2@b", &agent_json("cam-2", &b, &camera)).unwrap();
    online_port(&mut cam_2).await;
    until_listed(&a, "cam-2", "relay-b").await;
    until_listed(&b, "cam-1", "relay-a").await;

    // ffmpeg and GStreamer follow the redirect to relay B and decode there. (rtspsrc
    // does not carry credentials written into its URL over a redirect, and the relay
    // never sees them to put them into the new one: they go in its properties.)
    let probe = ffprobe(a.shared_rtsp("cam-2"), 5).await.unwrap();
    assert!(probe.frames >= 5, "{probe:?}");
    e2e::gst_decode(
        &e2e::Place::host(),
        &a.shared_rtsp("cam-2").replace("admin:admin@", ""),
        &["protocols=tcp", "user-id=admin", "user-pw=admin"],
        10,
    )
    .await
    .unwrap();
    let on_a = api(&a, "GET", "/metrics", None).await.body;
    assert_eq!(
        peer_streams(&on_a, "relay-b", "out", "redirected"),
        2.0,
        "{on_a}"
    );
    let on_b = api(&b, "GET", "/metrics", None).await.body;
    assert!(
        e2e::metric(
            &on_b,
            "camera_relay_watcher_sessions_total{camera=\"cam-2\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{on_b}"
    );
    // A camera held here is served here, redirect or not.
    let probe = ffprobe(a.shared_rtsp("cam-1"), 3).await.unwrap();
    assert!(probe.frames >= 3, "{probe:?}");

    let e = ffprobe(b.shared_rtsp("cam-1"), 3).await.unwrap_err();
    assert!(e.to_string().contains("503"), "{e}");
}

/// An agent for camera `id` that knows `relays`, in that order.
fn agent_of(id: &str, relays: &[&ClusterRelay], camera: &CameraSim) -> AgentProcess {
    let mut json = agent_json(id, relays[0], camera);
    let urls: Vec<String> = relays.iter().map(|r| r.url()).collect();
    json["agent"]["tunnel_server_url"] = serde_json::json!(urls);
    AgentProcess::spawn(id, &json).unwrap()
}

/// The relay holding each of `ids`, by etcd.
async fn holders(etcd: &EtcdCluster, ids: &[&str]) -> Vec<String> {
    let mut held = Vec::new();
    for id in ids {
        held.push(holder(etcd, id).await.map(|(r, _)| r).unwrap_or_default());
    }
    held
}

/// Waits until `relay` sees `n` relays in the cluster.
async fn until_relays(relay: &ClusterRelay, n: usize) {
    let deadline = tokio::time::Instant::now() + e2e::READY_TIMEOUT;
    loop {
        let health = api(relay, "GET", "/health", None).await.json().unwrap();
        if health["cluster"]["relays"].as_array().map(Vec::len) == Some(n) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_relay_above_its_share_sends_registering_cameras_to_another() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let first = free_port_run(8);
    let a = ClusterRelay::start_configured(
        "relay-a",
        "127.0.0.1",
        first..=first + 7,
        &etcd,
        "balance = 1.0\n",
    )
    .await;
    let b = ClusterRelay::start_with("relay-b", "127.0.0.2", first..=first + 7, &etcd).await;
    until_relays(&a, 2).await;
    let camera = CameraSim::start(&[]).await.unwrap();
    // Every camera knows relay A only: A keeps its share and sends the rest to B.
    let ids = ["cam-1", "cam-2", "cam-3", "cam-4"];
    let mut agents = Vec::new();
    for id in ids {
        let mut agent = agent_of(id, &[&a], &camera);
        online_port(&mut agent).await;
        // The next camera is counted with this one.
        let (relay, _) = holder(&etcd, id).await.unwrap();
        until_listed(&a, id, &relay).await;
        agents.push(agent);
    }
    let held = holders(&etcd, &ids).await;
    assert_eq!(held, ["relay-a", "relay-b", "relay-a", "relay-b"]);
    for ((agent, relay), id) in agents.iter_mut().zip(&held).zip(ids) {
        if relay == "relay-b" {
            let line = agent
                .process
                .wait_for_line("sends this camera to relay relay-b")
                .await
                .unwrap();
            assert!(line.contains("above its share"), "{line}");
            let probe = ffprobe(b.shared_rtsp(id), 3).await.unwrap();
            assert!(probe.frames >= 3, "{probe:?}");
        }
    }
    let metrics = api(&a, "GET", "/metrics", None).await.body;
    assert_eq!(
        e2e::metric(
            &metrics,
            "camera_relay_registrations_total{result=\"redirected\"}"
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_rolling_restart_of_every_relay_drops_no_camera_longer_than_one_reconnect() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let first = free_port_run(8);
    let mut relays = Vec::new();
    for (id, host) in [
        ("relay-a", "127.0.0.1"),
        ("relay-b", "127.0.0.2"),
        ("relay-c", "127.0.0.3"),
    ] {
        relays.push(ClusterRelay::start_with(id, host, first..=first + 7, &etcd).await);
    }
    until_relays(&relays[0], 3).await;
    let camera = CameraSim::start(&[]).await.unwrap();
    let ids = ["cam-1", "cam-2", "cam-3", "cam-4", "cam-5", "cam-6"];
    let mut agents = Vec::new();
    for id in ids {
        let known: Vec<&ClusterRelay> = relays.iter().collect();
        let mut agent = agent_of(id, &known, &camera);
        online_port(&mut agent).await;
        agents.push(agent);
    }

    for r in 0..relays.len() {
        let id = ["relay-a", "relay-b", "relay-c"][r];
        let before = holders(&etcd, &ids).await;
        let online: Vec<usize> = agents
            .iter()
            .map(|a| {
                a.process
                    .count_lines("online: the relay serves this camera")
            })
            .collect();
        let drain = api(&relays[r], "POST", "/relay/drain", None).await;
        assert_eq!(drain.status, 200, "{}", drain.body);
        // Drained: every camera it held is online elsewhere.
        for (i, held) in before.iter().enumerate() {
            if held == id {
                agents[i]
                    .process
                    .wait_for_nth_line("online: the relay serves this camera", online[i] + 1)
                    .await
                    .unwrap();
            }
        }
        let deadline = tokio::time::Instant::now() + e2e::READY_TIMEOUT;
        loop {
            let state = api(&relays[r], "GET", "/relay/drain", None)
                .await
                .json()
                .unwrap();
            if state["cameras_left"] == 0 && state["draining"] == true {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{state}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = holders(&etcd, &ids).await;
        assert!(after.iter().all(|h| h != id && !h.is_empty()), "{after:?}");
        if r == 0 {
            // What the drain API answers is what docs/api.yaml says.
            let mut samples = Vec::new();
            for (method, path) in [
                ("GET", "/relay/drain"),
                ("GET", "/health"),
                ("DELETE", "/relay/drain"),
            ] {
                let reply = api(&relays[r], method, path, None).await;
                samples.push(serde_json::json!({
                    "method": method, "path": path, "status": reply.status, "body": reply.body,
                }));
            }
            e2e::check_openapi_some(&samples).await.unwrap();
        }
        // Maintenance done: the relay comes back and takes cameras again.
        relays[r].restart().await;
        until_relays(&relays[(r + 1) % 3], 3).await;
    }

    // Each camera was moved at once each time, never waiting out a backoff.
    for (agent, id) in agents.iter().zip(ids) {
        for line in agent.process.output() {
            if line.contains("retrying in") {
                assert!(line.contains("retrying in 0.0 s"), "{id}: {line}");
            }
        }
    }
    // And every camera decodes where it is now.
    for id in ids {
        let (relay, _) = holder(&etcd, id).await.unwrap();
        let at = ["relay-a", "relay-b", "relay-c"]
            .iter()
            .position(|r| *r == relay)
            .unwrap();
        let probe = ffprobe(relays[at].shared_rtsp(id), 3).await.unwrap();
        assert!(probe.frames >= 3, "{id}: {probe:?}");
    }
}

#[tokio::test]
async fn cameras_behind_nat_fail_over_to_another_relay_at_the_same_urls() {
    use e2e::netns::RELAY_IP;
    const RELAY_B_IP: &str = "203.0.113.6";

    // Two cameras, each behind the NAT router; two relays on the public side, each its
    // own address; etcd beside them.
    let lab = e2e::Lab::new(2).unwrap();
    let public = lab.relay();
    e2e::netns::run(
        &public,
        "ip",
        &["addr", "add", &format!("{RELAY_B_IP}/24"), "dev", "eth0"],
    )
    .unwrap();
    let etcd = EtcdCluster::start_in(&public, 1).await.unwrap();
    let ca = ClusterCa::issue(&["relay-a", "relay-b"]).await;
    let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("{e:?}")).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut relays = Vec::new();
    for (id, ip) in [("relay-a", RELAY_IP), ("relay-b", RELAY_B_IP)] {
        let config = format!(
            "listen = \"{ip}:8080\"\ncamera_bind = \"{ip}\"\ncamera_ports = \"8554-8557\"\n\
             shared_listen = \"{ip}:8553\"\nshared_token = \"{TOKEN}\"\nadmin_token = \"ops\"\n[cluster]\n\
             etcd_endpoints = [{}]\nrelay_id = \"{id}\"\nadvertise = \"http://{ip}:8080\"\n\
             lease_ttl_secs = {TTL_SECS}\n{}",
            endpoints.join(", "),
            ca.peer_lines_on(id, &format!("{ip}:8445")),
        );
        let path = dir.path().join(format!("{id}.toml"));
        std::fs::write(&path, config).unwrap();
        relays.push(
            RelayProcess::start_from_file_in(&public, &path, ip, 8080)
                .await
                .unwrap(),
        );
    }
    let urls: Vec<String> = relays.iter().map(RelayProcess::url).collect();
    let shared = |ip: &str, id: &str| format!("rtsp://admin:admin@{ip}:8553/{id}{MAIN_STREAM}");
    let decodes = |url: String| {
        let public = public.clone();
        async move {
            let probe = e2e::ffprobe_with(&public, &url, 3, &["-rtsp_transport", "tcp"])
                .await
                .unwrap();
            assert!(probe.frames >= 3, "{url}: {probe:?}");
        }
    };

    let mut cameras = Vec::new();
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for i in 0..2 {
        let id = format!("cam-{i}");
        let camera = CameraSim::start_in(&lab.camera(i), &[]).await.unwrap();
        let mut json = agent_config_json(&id, &urls[0], TOKEN, 0, camera.port);
        json["agent"]["tunnel_server_url"] = serde_json::json!(urls);
        let mut agent = AgentProcess::spawn_in(&lab.camera(i), &id, &json).unwrap();
        ports.push(online_port(&mut agent).await);
        cameras.push(camera);
        agents.push(agent);
    }
    // A Watcher at either relay decodes either camera, once both relays list both.
    for ip in [RELAY_IP, RELAY_B_IP] {
        let deadline = tokio::time::Instant::now() + e2e::READY_TIMEOUT;
        loop {
            let url = format!("http://{ip}:8080/agents");
            let agents = e2e::http(&public, "GET", &url, Some("ops"), None)
                .await
                .unwrap();
            let online = agents.json().unwrap()["agents"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["online"] == true)
                .count();
            if online == 2 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{}", agents.body);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for ip in [RELAY_IP, RELAY_B_IP] {
        for id in ["cam-0", "cam-1"] {
            decodes(shared(ip, id)).await;
        }
    }

    // The relay holding cam-0 dies: cam-0 comes back on the other, same port, and the
    // other's URLs for it decode again.
    let (held_by, _) = holder(&etcd, "cam-0").await.unwrap();
    let (victim, survivor_ip) = match held_by.as_str() {
        "relay-a" => (0, RELAY_B_IP),
        _ => (1, RELAY_IP),
    };
    relays[victim].process.kill().await.unwrap();
    let line = agents[0]
        .process
        .wait_for_nth_line("online: the relay serves this camera", 2)
        .await
        .unwrap();
    assert_eq!(port_on(&line), ports[0], "cam-0 changed ports");
    decodes(shared(survivor_ip, "cam-0")).await;
    decodes(format!(
        "rtsp://admin:admin@{survivor_ip}:{}{MAIN_STREAM}",
        ports[0]
    ))
    .await;
    decodes(shared(survivor_ip, "cam-1")).await;
}
