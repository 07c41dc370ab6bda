//! A camera that updates its firmware keeps its tunnel: the earlier agent's config files
//! (`deploy/agent/earlier/`: the documents' own configs verbatim, and one with every
//! setting the earlier agent had) start the real agent binary unchanged, bring the camera
//! online against the real relay, and a Watcher decodes video through it. The camera sits
//! behind NAT; the relay runs as the tunnel document starts it (`--port 8080
//! --tunnel-port 8554`) and the camera finds it under the documents' names
//! (`your-server.com`, `YOUR-TUNNEL-SERVER`) in its hosts file. A typo is still refused,
//! and a relay URL answered 404 says what to do and backs off.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{path::PathBuf, time::Duration};

use agent::{AgentConfig, AgentState};
use e2e::{
    agent_config_json, ffprobe_with, free_ports,
    netns::{camera_ip, RELAY_IP},
    relay_config, rtsp_url, AgentHandle, AgentProcess, CameraSim, Lab, Place, RelayHandle,
    RelayProcess, MAIN_STREAM,
};

/// The documents' token.
const TOKEN: &str = "your-secret-token";

fn earlier(file: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/agent/earlier")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_earlier_agents_configs_bring_a_camera_online_unchanged() {
    let lab = Lab::new(1).unwrap();
    let camera_lan = lab.camera(0);
    lab.camera_hosts(
        0,
        &[&format!("{RELAY_IP} your-server.com YOUR-TUNNEL-SERVER")],
    )
    .unwrap();
    let relay = RelayProcess::start_in(&lab.relay(), RELAY_IP, 8080, 8554, TOKEN, &[])
        .await
        .unwrap();
    // The camera's RTSP server on 554 of its loopback (where the documents' configs
    // look), and a second one, with another picture size, only on its LAN address
    // (where every-field.json's camera.ip points): the Watcher's picture tells which
    // one the agent reached.
    let lan_ip = camera_ip(0);
    let lan_args = ["--host", &lan_ip, "--port", "554", "--main-size", "352x288"];
    let (on_loopback, on_lan) = tokio::join!(
        CameraSim::start_in(&camera_lan, &["--port", "554"]),
        CameraSim::start_in(&camera_lan, &lan_args)
    );
    let (_on_loopback, _on_lan) = (on_loopback.unwrap(), on_lan.unwrap());

    for (file, port, height) in [
        ("camera-agent-firmware.json", 8554, 360),
        ("tunnel-architecture.json", 8554, 360),
        ("every-field.json", 8555, 288),
    ] {
        let (_, text) = earlier(file);
        let mut agent = AgentProcess::spawn_text_in(&camera_lan, file, &text).unwrap();
        agent.online(1).await.unwrap();
        let probe = ffprobe_with(
            &lab.relay(),
            rtsp_url(port, MAIN_STREAM),
            10,
            &["-rtsp_transport", "tcp"],
        )
        .await
        .unwrap();
        assert_eq!(probe.codec, "hevc", "{file}: {probe:?}");
        assert!(probe.frames >= 10, "{file}: {probe:?}");
        assert_eq!(probe.height, height, "{file}: the wrong camera server");
        let log = agent.process.output().join("\n");
        match file {
            "camera-agent-firmware.json" => {
                assert!(
                    log.contains("dialing ws://your-server.com:8080/agent/dahua-2449s-il-001"),
                    "{log}"
                );
                assert!(
                    log.contains("this one does not use: streaming.buffer_size, streaming.quality"),
                    "{log}"
                );
            }
            "every-field.json" => {
                assert!(
                    log.contains("and tunnel.reconnect_interval (5.0) are both set; using network.reconnect_interval"),
                    "{log}"
                );
                assert!(log.contains("camera.password"), "{log}");
                assert!(!log.contains("\"admin\""), "{log}");
            }
            _ => {}
        }
        // SIGTERM: the agent unregisters, so the next one takes the id at once.
        let status = agent.process.terminate().await.unwrap();
        assert!(status.success(), "{file}: {status:?}");
    }
    drop(relay);
}

#[tokio::test]
async fn a_misspelled_setting_is_still_refused_naming_file_field_and_reason() {
    let (_, text) = earlier("every-field.json");
    let typo = text.replacen("\"rtsp_port\": 554,", "\"rtsp_prot\": 554,", 1);
    assert_ne!(typo, text);
    let mut agent = AgentProcess::spawn_text_in(&Place::host(), "typo", &typo).unwrap();
    let status = agent.process.wait().await.unwrap();
    assert_eq!(status.code(), Some(2));
    let said = agent.process.output().join("\n");
    let config = agent.dir.path().join("config.json");
    assert!(
        said.contains(&format!(
            "{}: field `camera.rtsp_prot`: unknown field `rtsp_prot`",
            config.display()
        )),
        "{said}"
    );

    // The camera part of the firmware document alone: what is missing, and what it is.
    let (_, fragment) = earlier("camera-dahua-2449s-il.json");
    let mut agent = AgentProcess::spawn_text_in(&Place::host(), "fragment", &fragment).unwrap();
    assert_eq!(agent.process.wait().await.unwrap().code(), Some(2));
    let said = agent.process.output().join("\n");
    assert!(
        said.contains("field `agent`: missing") && said.contains("camera"),
        "{said}"
    );
}

#[tokio::test]
async fn a_relay_url_answered_404_says_what_to_do_and_backs_off() {
    let ports = free_ports(1);
    let relay = RelayHandle::start(relay_config("t", &ports)).await.unwrap();
    let url = format!("ws://{}/camera-agent", relay.control);
    let json = agent_config_json("cam-404", &url, "t", ports[0], 554);
    let config = AgentConfig::parse(&json.to_string(), "config.json").unwrap();
    let mut agent = AgentHandle::start(config);
    let state = agent
        .wait_for("told 404", |s| matches!(s, AgentState::Retrying { .. }))
        .await
        .unwrap();
    let AgentState::Retrying { reason, .. } = state else {
        unreachable!()
    };
    assert!(
        reason.contains(&url)
            && reason.contains("HTTP 404 Not Found")
            && reason.contains("/tunnel and /agent/<agent_id>"),
        "{reason}"
    );
    assert_eq!(reason.lines().count(), 1, "{reason}");

    // It backs off, never sooner than the floor (half the 0.5 s base): in a window of
    // 2 s at most 2 / 0.25 attempts, plus one begun before the window and seen in it.
    // (Load can only make it fewer; a retry loop without backoff makes hundreds.)
    let window = Duration::from_secs(2);
    let end = tokio::time::Instant::now() + window;
    let mut attempts = 0;
    while let Ok(Ok(())) = tokio::time::timeout_at(end, agent.state.changed()).await {
        if matches!(*agent.state.borrow_and_update(), AgentState::Connecting) {
            attempts += 1;
        }
    }
    assert!(attempts <= 9, "{attempts} attempts in {window:?}");
    // And it keeps trying.
    agent
        .wait_for("dialing again", |s| matches!(s, AgentState::Connecting))
        .await
        .unwrap();
    agent.stop().await;
    relay.stop().await.unwrap();
}
