//! Sessions that survive the network, in the NAT lab (network namespaces, a real
//! iptables NAT): the camera's NAT rebinding its UDP port mid-stream, UDP blocked (from
//! the start, mid-session, over wss:// with client certificates), black-holed links, a
//! camera's RTSP server restarting.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::time::Duration;

use common::tls::QUIC_IDLE_TIMEOUT;
use e2e::{
    agent_config_json, bin, ffprobe_with, metric, netns, rtsp_url, AgentProcess, CameraSim, Child,
    Lab, NatRig, RelayProcess, MAIN_STREAM,
};

const TCP: &[&str] = &["-rtsp_transport", "tcp"];

/// Where the relay sees agent `id`'s QUIC datagrams come from now.
async fn quic_remote(rig: &NatRig, id: &str) -> String {
    let body = rig.http_get(&format!("/agents/{id}")).await.unwrap();
    let agent: serde_json::Value = serde_json::from_str(&body).unwrap();
    agent["quic_remote_addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no quic_remote_addr in {agent}"))
        .to_string()
}

/// The link the relay opens agent `id`'s new streams on (`quic`, `tcp`), if any.
async fn data_link(rig: &NatRig, id: &str) -> Option<String> {
    let body = rig.http_get(&format!("/agents/{id}")).await.unwrap();
    let agent: serde_json::Value = serde_json::from_str(&body).unwrap();
    agent["data_link"].as_str().map(str::to_string)
}

/// Polls until the relay opens agent `id`'s new streams on `link`, for at most `within`.
async fn until_data_link(rig: &NatRig, id: &str, link: &str, within: Duration, when: &str) {
    let deadline = tokio::time::Instant::now() + within;
    while data_link(rig, id).await.as_deref() != Some(link) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never moved its streams to {link} {when}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().trim().parse().unwrap()
}

/// Polls the relay's /metrics until `series` (0 while absent) satisfies `done`.
async fn wait_metric(rig: &NatRig, series: &str, what: &str, done: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + e2e::READY_TIMEOUT;
    loop {
        let exposition = rig.http_get("/metrics").await.unwrap();
        let value = metric(&exposition, series).unwrap_or(0.0);
        if done(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never {what} (still {value})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rebinds the camera's NAT and waits until the relay follows the camera to its new
/// public port (QUIC connection migration), which must be from the new range.
async fn rebind_and_follow(rig: &NatRig, id: &str, generation: u16) {
    let before = quic_remote(rig, id).await;
    let range = rig.lab.rebind_udp(generation).unwrap();
    let deadline = tokio::time::Instant::now() + e2e::READY_TIMEOUT;
    loop {
        let now = quic_remote(rig, id).await;
        if now != before {
            assert!(
                range.contains(&port_of(&now)),
                "the camera's new mapping {now} is not from the rebound range {range:?} (was {before})"
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never saw the camera's new port (still {before})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nat_rebinding_mid_stream_migrates_and_the_watcher_keeps_decoding() {
    let rig = NatRig::start(&[&[]]).await.unwrap();
    let camera = NatRig::agent_id(0);

    // 300 frames at 20 fps: about 15 s of video, rebound in the middle.
    let (watchers, url) = (rig.watchers(), rig.camera_url(0, MAIN_STREAM));
    let probe = tokio::spawn(async move { ffprobe_with(&watchers, url, 300, TCP).await });
    let frames = format!("camera_relay_video_frames_total{{camera=\"{camera}\"}}");
    wait_metric(&rig, &frames, "reached 20", |v| v >= 20.0).await;
    rebind_and_follow(&rig, &camera, 1).await;
    // Media still arrives at the relay after the move.
    let exposition = rig.http_get("/metrics").await.unwrap();
    let moved_at = metric(&exposition, &frames).unwrap();
    wait_metric(&rig, &frames, "grew by 40", |v| v >= moved_at + 40.0).await;

    let probe = probe.await.unwrap().unwrap();
    assert!(probe.frames >= 300, "{probe:?}");
    // One session all along: no reconnect of the agent, one Watcher session.
    let exposition = rig.http_get("/metrics").await.unwrap();
    let sessions = format!("camera_relay_watcher_sessions_total{{camera=\"{camera}\"}}");
    assert_eq!(metric(&exposition, &sessions), Some(1.0));
    assert_eq!(
        rig.agents[0]
            .process
            .count_lines("online: the relay serves"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_two_rebindings_exactly() {
    let mut rig = NatRig::start(&[&[]]).await.unwrap();
    let tool = bin("e2e-bytes").unwrap();

    // An echo server on the camera, behind an agent of its own.
    let camera = rig.lab.camera(0);
    let mut echo = camera.command(&tool);
    echo.args(["echo", "--listen", "127.0.0.1:0"]);
    let mut echo = Child::spawn("echo", echo).unwrap();
    let echo_port = port_of(&echo.wait_for_line("READY ").await.unwrap());
    let id = "echo-1";
    let relay_port = NatRig::camera_port(50);
    let config = agent_config_json(id, &rig.relay.url(), NatRig::TOKEN, relay_port, echo_port);
    let _agent = AgentProcess::start_in(&camera, "echo-agent", &config)
        .await
        .unwrap();
    // The lab's relay runs two data-plane shards and cam-1 holds the first: this
    // camera's tunnel is on the second shard, its own thread and QUIC port.
    let registered = rig
        .relay
        .process
        .wait_for_line(&format!("id=\"{id}\"}}: relay::control: agent registered"))
        .await
        .unwrap();
    assert!(registered.contains("shard=1"), "{registered}");

    // 24 MiB each way over about 12 s, the camera's NAT rebound twice meanwhile.
    let mut send = rig.watchers().command(&tool);
    send.args(["send", "--to", &format!("127.0.0.1:{relay_port}")])
        .args(["--bytes", &(24 << 20).to_string(), "--seconds", "12"]);
    let mut send = Child::spawn("send", send).unwrap();
    let echoed =
        format!("camera_relay_watcher_bytes_total{{camera=\"{id}\",direction=\"to_watcher\"}}");
    wait_metric(&rig, &echoed, "reached 1 MiB", |v| v >= f64::from(1 << 20)).await;
    rebind_and_follow(&rig, id, 1).await;
    wait_metric(&rig, &echoed, "reached 8 MiB", |v| v >= f64::from(8 << 20)).await;
    rebind_and_follow(&rig, id, 2).await;

    let result = send.wait_for_line("RESULT ").await.unwrap();
    let expected = format!("sent={0} received={0} first_difference=none", 24 << 20);
    assert!(result.ends_with(&expected), "{result}");
    assert_eq!(send.wait().await.unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_link_is_found_on_both_sides_and_healed_when_it_returns() {
    let mut rig = NatRig::start(&[&[]]).await.unwrap();
    let watchers = rig.watchers();
    ffprobe_with(&watchers, rig.camera_url(0, MAIN_STREAM), 10, TCP)
        .await
        .unwrap();

    // Every packet through the camera's router vanishes, both ways, without a reset:
    // the link is dead and nobody says so. (The rig's agents send heartbeats every
    // second; the relay allows 3 missed.)
    let router = rig.lab.nat();
    let black_hole = ["FORWARD", "-j", "DROP"];
    e2e::netns::run(&router, "iptables", &[&["-I"][..], &black_hole].concat()).unwrap();
    let cut = tokio::time::Instant::now();
    rig.agents[0]
        .process
        .wait_for_line("the relay did not answer for")
        .await
        .unwrap();
    let agent_noticed = cut.elapsed();
    rig.relay
        .process
        .wait_for_line("heard no heartbeat")
        .await
        .unwrap();
    let relay_noticed = cut.elapsed();
    // The relay freed the camera: offline, its port closed.
    wait_metric(&rig, "camera_relay_agents_online", "fell to 0", |v| v < 1.0).await;
    let refused = ffprobe_with(&watchers, rig.camera_url(0, MAIN_STREAM), 1, TCP).await;
    assert!(refused.is_err(), "the port of an offline camera answered");
    eprintln!("dead link noticed by the agent after {agent_noticed:?}, by the relay after {relay_noticed:?}");
    // Three 1 s heartbeat intervals, and one more for the check's own tick.
    for noticed in [agent_noticed, relay_noticed] {
        assert!(
            noticed <= Duration::from_secs(4) + Duration::from_secs(10),
            "{noticed:?}"
        );
    }

    // The link returns: the agent dials again, and Watchers get video again.
    e2e::netns::run(&router, "iptables", &[&["-D"][..], &black_hole].concat()).unwrap();
    rig.agents[0].online(2).await.unwrap();
    let probe = ffprobe_with(&watchers, rig.camera_url(0, MAIN_STREAM), 10, TCP)
        .await
        .unwrap();
    assert!(probe.frames >= 10, "{probe:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_that_restarts_its_rtsp_server_is_served_again_on_the_same_link() {
    let mut rig = NatRig::start(&[&[]]).await.unwrap();
    let watchers = rig.watchers();
    let url = rig.camera_url(0, MAIN_STREAM);
    ffprobe_with(&watchers, &url, 10, TCP).await.unwrap();

    // The camera's RTSP server goes away (a firmware watchdog restarting it): Watchers
    // are refused promptly, and the agent's link to the relay stays up.
    let port = rig.cameras[0].port;
    rig.cameras[0].process.kill().await.unwrap();
    let refused = ffprobe_with(&watchers, &url, 1, TCP).await;
    assert!(refused.is_err(), "a stream from a camera that is down");

    // Back on the same port: the next Watcher decodes, through the same agent session.
    let port_arg = port.to_string();
    rig.cameras[0] = e2e::CameraSim::start_in(&rig.lab.camera(0), &["--port", &port_arg])
        .await
        .unwrap();
    assert_eq!(rig.cameras[0].port, port);
    let probe = ffprobe_with(&watchers, &url, 10, TCP).await.unwrap();
    assert!(probe.frames >= 10, "{probe:?}");
    assert_eq!(
        rig.agents[0]
            .process
            .count_lines("online: the relay serves"),
        1
    );
    assert_eq!(rig.agents[0].process.count_lines("retrying in"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_blocked_streams_ride_the_tcp_link_and_move_to_quic_once_it_works() {
    // The camera's network lets no UDP out: QUIC cannot reach the relay.
    let mut rig = NatRig::start_prepared(&[&[]], |lab| lab.block_udp(true))
        .await
        .unwrap();
    let camera = NatRig::agent_id(0);
    let (watchers, url) = (rig.watchers(), rig.camera_url(0, MAIN_STREAM));
    assert_eq!(data_link(&rig, &camera).await.as_deref(), Some("tcp"));

    // The Watcher sees no difference.
    let probe = ffprobe_with(&watchers, &url, 10, TCP).await.unwrap();
    assert!(probe.frames >= 10, "{probe:?}");
    let over = |link: &str| format!("camera_relay_streams_opened_total{{link=\"{link}\"}}");
    let exposition = rig.http_get("/metrics").await.unwrap();
    assert_eq!(metric(&exposition, &over("tcp")), Some(1.0));
    assert_eq!(metric(&exposition, &over("quic")), None);

    // A long session on the fallback (600 frames at 20 fps: 30 s); UDP comes back
    // while it plays.
    let long = {
        let (watchers, url) = (watchers.clone(), url.clone());
        tokio::spawn(async move { ffprobe_with(&watchers, url, 600, TCP).await })
    };
    wait_metric(&rig, &over("tcp"), "reached 2", |v| v >= 2.0).await;
    rig.lab.block_udp(false).unwrap();
    until_data_link(
        &rig,
        &camera,
        "quic",
        e2e::READY_TIMEOUT,
        "after UDP came back",
    )
    .await;
    assert!(
        !long.is_finished(),
        "the fallback's session ended before the move to QUIC; nothing was shown"
    );

    // New Watchers take QUIC; the session on the fallback goes on to its end, and then
    // the fallback closes. One agent session all along.
    let probe = ffprobe_with(&watchers, &url, 10, TCP).await.unwrap();
    assert!(probe.frames >= 10, "{probe:?}");
    let exposition = rig.http_get("/metrics").await.unwrap();
    assert_eq!(metric(&exposition, &over("quic")), Some(1.0));
    let long = long.await.unwrap().unwrap();
    assert!(long.frames >= 600, "{long:?}");
    rig.agents[0]
        .process
        .wait_for_line("TCP fallback link closed")
        .await
        .unwrap();
    assert_eq!(
        rig.agents[0]
            .process
            .count_lines("online: the relay serves"),
        1
    );
    assert_eq!(rig.agents[0].process.count_lines("retrying in"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blocked_mid_session_moves_the_camera_to_the_tcp_link_in_the_same_session() {
    let mut rig = NatRig::start(&[&[]]).await.unwrap();
    let camera = NatRig::agent_id(0);
    let (watchers, url) = (rig.watchers(), rig.camera_url(0, MAIN_STREAM));
    assert_eq!(data_link(&rig, &camera).await.as_deref(), Some("quic"));

    // UDP stops getting through. Neither end can tell a blocked path from a quiet one
    // before QUIC's idle timeout; then the agent, whose control link stands, finds QUIC
    // unreachable and brings up the TCP fallback within the same session.
    rig.lab.block_udp(true).unwrap();
    let within = QUIC_IDLE_TIMEOUT + e2e::READY_TIMEOUT;
    until_data_link(&rig, &camera, "tcp", within, "after UDP was blocked").await;
    let agent = &mut rig.agents[0].process;
    agent.wait_for_line("data plane up again").await.unwrap();

    // Watchers get video again; the camera kept its session and its port.
    let probe = ffprobe_with(&watchers, &url, 10, TCP).await.unwrap();
    assert!(probe.frames >= 10, "{probe:?}");
    assert_eq!(agent.count_lines("online: the relay serves"), 1);
    assert_eq!(agent.count_lines("retrying in"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_link_crosses_wss_with_the_cameras_client_certificate() {
    // A deployment as the docs advise: wss://, the relay's certificate from a private
    // CA, a camera that proves itself with its client certificate alone. Its network
    // lets no UDP out.
    let lab = Lab::new(1).unwrap();
    lab.block_udp(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let days = |n| certs::Validity::days(n).unwrap();
    let ca = certs::ca_certificate("lab CA", days(certs::CA_DAYS)).unwrap();
    let (ca_cert, ca_key) = certs::write_pair(dir.path(), "ca", &ca, false).unwrap();
    let ca = certs::Ca::load(&ca_cert, &ca_key).unwrap();
    let relay_ip = netns::RELAY_IP.parse().unwrap();
    let pair = certs::relay_certificate(&[], &[relay_ip], days(certs::RELAY_DAYS), Some(&ca));
    let (relay_cert, relay_key) =
        certs::write_pair(dir.path(), "relay", &pair.unwrap(), false).unwrap();
    let camera = NatRig::agent_id(0);
    let pair = certs::agent_certificate(&camera, days(certs::AGENT_DAYS), &ca).unwrap();
    let (agent_cert, agent_key) = certs::write_pair(dir.path(), &camera, &pair, false).unwrap();
    let (port, camera_port) = (NatRig::RELAY_PORT, NatRig::camera_port(0));
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            listen = "{relay_ip}:{port}"
            camera_ports = "{camera_port}-{camera_port}"

            [tls]
            cert = {relay_cert:?}
            key = {relay_key:?}
            client_ca = {ca_cert:?}

            [[agents]]
            id = "{camera}"
            "#
        ),
    )
    .unwrap();
    let mut relay = RelayProcess::start_from_file_in(&lab.relay(), &config, netns::RELAY_IP, port)
        .await
        .unwrap();
    let sim = CameraSim::start_in(&lab.camera(0), &[]).await.unwrap();
    let mut json = agent_config_json(
        &camera,
        &format!("wss://{relay_ip}:{port}/tunnel"),
        "",
        camera_port,
        sim.port,
    );
    json["security"] = serde_json::json!({
        "ca_file": ca_cert,
        "client_cert": agent_cert,
        "client_key": agent_key,
    });
    let mut agent = AgentProcess::start_in(&lab.camera(0), "agent", &json)
        .await
        .unwrap();

    // The fallback crossed the same TLS, and the relay took the certificate as the
    // camera's proof on it too; Watchers get video.
    agent
        .process
        .wait_for_line("carrying the camera's streams over the TCP link")
        .await
        .unwrap();
    relay
        .process
        .wait_for_line("fallback link up")
        .await
        .unwrap();
    let url = rtsp_url(camera_port, MAIN_STREAM);
    let probe = ffprobe_with(&lab.relay(), &url, 10, TCP).await.unwrap();
    assert!(probe.frames >= 10, "{probe:?}");
}
