//! Real RTSP software end to end: the camera simulator (gst-rtsp-server, Digest auth,
//! H.265 main and H.264 sub stream) behind the real `camera-agent`, the real `relay`,
//! and ffprobe as the Watcher. A stream counts as delivered when frames decode.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use e2e::{
    agent_config_json, ffprobe, ffprobe_with, free_port_run, free_ports, gst_decode, rtsp_url,
    AgentProcess, CameraSim, ProcessRig, RelayProcess, MAIN_STREAM, SUB_STREAM,
};

const FRAMES: u32 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_streams_of_a_camera_decode_at_once_with_digest_auth() {
    let rig = ProcessRig::start(&[], "cam-a").await.unwrap();
    let _agent = AgentProcess::start("agent", &rig.config).await.unwrap();

    let (main, sub) = tokio::join!(
        ffprobe(rtsp_url(rig.camera_port, MAIN_STREAM), FRAMES),
        ffprobe(rtsp_url(rig.camera_port, SUB_STREAM), FRAMES),
    );
    let (main, sub) = (main.unwrap(), sub.unwrap());
    assert_eq!(
        (main.codec.as_str(), main.width, main.height),
        ("hevc", 640, 360)
    );
    assert_eq!(
        (sub.codec.as_str(), sub.width, sub.height),
        ("h264", 320, 240)
    );
    assert!(
        main.frames >= FRAMES && sub.frames >= FRAMES,
        "{main:?} {sub:?}"
    );

    // Digest auth is the camera's, end to end: a wrong password is refused by it.
    let wrong = format!(
        "rtsp://admin:wrong@127.0.0.1:{}{MAIN_STREAM}",
        rig.camera_port
    );
    let e = ffprobe(wrong, 1).await.unwrap_err().to_string();
    assert!(e.contains("401"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cameras_through_one_relay_decode_at_once() {
    let (cam1, cam2) = tokio::join!(
        CameraSim::start(&[]),
        CameraSim::start(&["--main-size", "480x272"])
    );
    let (cam1, cam2) = (cam1.unwrap(), cam2.unwrap());
    let first = free_port_run(2);
    let ports = [free_ports(1)[0], first, first + 1];
    let relay = RelayProcess::start(ports[0], first, "fleet").await.unwrap();
    let _a1 = AgentProcess::start(
        "agent-1",
        &agent_config_json("cam-1", &relay.url(), "fleet", ports[1], cam1.port),
    )
    .await
    .unwrap();
    let _a2 = AgentProcess::start(
        "agent-2",
        &agent_config_json("cam-2", &relay.url(), "fleet", ports[2], cam2.port),
    )
    .await
    .unwrap();

    let (p1, p2) = tokio::join!(
        ffprobe(rtsp_url(ports[1], MAIN_STREAM), FRAMES),
        ffprobe(rtsp_url(ports[2], MAIN_STREAM), FRAMES),
    );
    let (p1, p2) = (p1.unwrap(), p2.unwrap());
    assert_eq!(
        (p1.codec.as_str(), p1.width, p1.height),
        ("hevc", 640, 360),
        "camera 1 on its own port"
    );
    assert_eq!(
        (p2.codec.as_str(), p2.width, p2.height),
        ("hevc", 480, 272),
        "camera 2 on its own port"
    );
    assert!(p1.frames >= FRAMES && p2.frames >= FRAMES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffprobe_with_default_settings_is_switched_from_udp_to_tcp_and_decodes() {
    // The simulator accepts UDP like a real camera, and logs every SETUP's transport.
    let mut rig = ProcessRig::start(&[], "cam-udp").await.unwrap();
    let _agent = AgentProcess::start("agent", &rig.config).await.unwrap();

    let probe = ffprobe_with(rtsp_url(rig.camera_port, SUB_STREAM), FRAMES, &[])
        .await
        .unwrap();
    assert_eq!(
        (probe.codec.as_str(), probe.width, probe.height),
        ("h264", 320, 240)
    );
    assert!(probe.frames >= FRAMES, "{probe:?}");

    rig.relay
        .process
        .wait_for_line("answered 461")
        .await
        .unwrap();
    let setups: Vec<String> = rig
        .camera
        .process
        .output()
        .into_iter()
        .filter(|l| l.starts_with("SETUP transport="))
        .collect();
    assert!(!setups.is_empty(), "the camera saw no SETUP");
    assert!(
        setups.iter().all(|l| l.contains("RTP/AVP/TCP")),
        "a UDP SETUP reached the camera: {setups:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gstreamer_rtspsrc_with_default_settings_decodes_through_the_tunnel() {
    let mut rig = ProcessRig::start(&[], "cam-gst").await.unwrap();
    let _agent = AgentProcess::start("agent", &rig.config).await.unwrap();

    gst_decode(&rtsp_url(rig.camera_port, MAIN_STREAM), FRAMES)
        .await
        .unwrap();
    rig.relay
        .process
        .wait_for_line("answered 461")
        .await
        .unwrap();
    let udp_setups = rig
        .camera
        .process
        .output()
        .into_iter()
        .filter(|l| l.starts_with("SETUP transport=") && !l.contains("/TCP"))
        .count();
    assert_eq!(udp_setups, 0, "a UDP SETUP reached the camera");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_that_names_its_lan_address_is_followed_back_into_the_tunnel() {
    // Like a real Dahua, the camera answers with Content-Base and SDP a=control URLs
    // naming its LAN address, which a client outside that LAN cannot reach.
    let camera = CameraSim::start(&["--advertise", "192.168.1.108:554"])
        .await
        .unwrap();
    let requests = |camera: &CameraSim, verb: &str| -> Vec<String> {
        let prefix = format!("REQUEST {verb} ");
        camera
            .process
            .output()
            .into_iter()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    };

    // Control: a client that reaches the camera directly follows the LAN address.
    ffprobe(rtsp_url(camera.port, SUB_STREAM), 2).await.unwrap();
    let direct = requests(&camera, "SETUP");
    assert!(
        direct
            .iter()
            .all(|l| l.contains("rtsp://192.168.1.108:554/")),
        "{direct:?}"
    );

    let ports = free_ports(2);
    let relay = RelayProcess::start(ports[0], ports[1], "t").await.unwrap();
    let config = agent_config_json("cam-lan", &relay.url(), "t", ports[1], camera.port);
    let _agent = AgentProcess::start("agent", &config).await.unwrap();

    // Through the relay the client is sent back to the relay's own address, and Digest
    // authentication (on in the simulator) still passes.
    let probe = ffprobe(rtsp_url(ports[1], MAIN_STREAM), FRAMES)
        .await
        .unwrap();
    assert_eq!(probe.codec, "hevc");
    let relay_address = format!("rtsp://127.0.0.1:{}/", ports[1]);
    let tunnelled: Vec<String> = requests(&camera, "SETUP")
        .into_iter()
        .skip(direct.len())
        .collect();
    assert!(!tunnelled.is_empty());
    assert!(
        tunnelled.iter().all(|l| l.contains(&relay_address)),
        "{tunnelled:?}"
    );
    drop(relay);
}
