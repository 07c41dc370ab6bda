//! Reconnection with the real binaries: the relay dies and returns, an agent dies
//! loudly (SIGKILL) or silently (SIGSTOP), and an agent with the same id takes over.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::time::Duration;

use e2e::{ffprobe, rtsp_url, AgentProcess, ProcessRig, RelayProcess, MAIN_STREAM, READY_TIMEOUT};
use tokio::net::TcpStream;

/// Waits until nothing accepts connections on `port` any more.
async fn wait_port_closed(port: u16) {
    let closed = async {
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(READY_TIMEOUT, closed)
        .await
        .unwrap_or_else(|_| {
            panic!("port {port} still accepts connections after {READY_TIMEOUT:?}")
        });
}

async fn rig() -> ProcessRig {
    ProcessRig::start(&[], "cam").await.unwrap()
}

/// ffprobe decodes the camera's main stream through the relay's `port`.
async fn video_flows(port: u16) {
    let probe = ffprobe(rtsp_url(port, MAIN_STREAM), 5).await.unwrap();
    assert_eq!(probe.codec, "hevc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_comes_back_on_the_same_port_when_the_relay_returns() {
    let mut rig = rig().await;
    let mut agent = AgentProcess::start("agent", &rig.config).await.unwrap();
    video_flows(rig.camera_port).await;

    rig.relay.process.kill().await.unwrap();
    agent.process.wait_for_line("retrying in").await.unwrap();
    wait_port_closed(rig.camera_port).await;

    let _relay = RelayProcess::start(rig.relay_port, rig.camera_port, ProcessRig::TOKEN)
        .await
        .unwrap();
    agent.online(2).await.unwrap();
    video_flows(rig.camera_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agent_frees_its_port_and_a_new_agent_with_its_id_takes_it() {
    let mut rig = rig().await;

    // Silently dead: the TCP connection stays up, heartbeats stop (interval 1 s).
    let mut first = AgentProcess::start("agent-1", &rig.config).await.unwrap();
    first.process.signal("-STOP").await.unwrap();
    rig.relay
        .process
        .wait_for_line("the relay heard no heartbeat in 3 s")
        .await
        .unwrap();
    wait_port_closed(rig.camera_port).await;
    first.process.kill().await.unwrap();

    // A new process with the same id gets the same port and carries video.
    let mut second = AgentProcess::start("agent-2", &rig.config).await.unwrap();
    video_flows(rig.camera_port).await;

    // Loudly dead: the relay sees the connection close and frees the port at once.
    second.process.kill().await.unwrap();
    rig.relay
        .process
        .wait_for_line("agent offline")
        .await
        .unwrap();
    wait_port_closed(rig.camera_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_id_takes_over_and_the_first_is_told_why() {
    let mut rig = rig().await;
    let mut old = AgentProcess::start("agent-old", &rig.config).await.unwrap();

    let _new = AgentProcess::start("agent-new", &rig.config).await.unwrap();
    old.process
        .wait_for_line("replaced this one; do two cameras share an agent_id?")
        .await
        .unwrap();
    rig.relay
        .process
        .wait_for_line("closing its older session")
        .await
        .unwrap();
    // Stop the old one before it comes back (it waits the full reconnect interval).
    old.process.kill().await.unwrap();
    video_flows(rig.camera_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_relay_and_agent_cleanly_and_the_relay_tells_its_agents() {
    let mut rig = rig().await;
    let mut agent = AgentProcess::start("agent", &rig.config).await.unwrap();
    // A Watcher in the middle of a long stream when the relay is told to stop.
    let url = rtsp_url(rig.camera_port, MAIN_STREAM);
    let watcher = tokio::spawn(async move { ffprobe(url, 100_000).await });
    rig.camera.process.wait_for_line("SETUP").await.unwrap();

    let status = rig.relay.process.terminate().await.unwrap();
    assert!(status.success(), "relay exited with {status}");
    // Its session was closed, not left hanging: ffprobe ends long before its
    // 100,000 frames (at 20 fps, over an hour).
    let ended = tokio::time::timeout(Duration::from_secs(30), watcher).await;
    assert!(ended.is_ok(), "the Watcher's session outlived the relay");
    agent
        .process
        .wait_for_line("the relay closed the session: the relay is shutting down")
        .await
        .unwrap();

    let status = agent.process.terminate().await.unwrap();
    assert!(status.success(), "agent exited with {status}");
    assert_eq!(agent.process.count_lines("agent stopped"), 1);
}
