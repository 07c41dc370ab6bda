//! Bad input gets a clear refusal and harms nothing else: wrong token, wrong protocol
//! version, a taken port, garbage and oversized control frames, a silent client, and a
//! camera that refuses connections.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use agent::AgentState;
use common::protocol::{
    encode_control, AgentMessage, AgentStats, CloseReason, Rejection, RelayMessage,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use e2e::{
    agent_config, agent_config_json, free_port_run, free_ports, relay_config, AgentHandle,
    AgentProcess, ControlClient, RelayHandle, RelayProcess, READY_TIMEOUT,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::Message;

/// A relay with one healthy agent in front of an echo server.
async fn relay_with_healthy_agent(token: &str) -> (RelayHandle, AgentHandle, u16, u16) {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    let first = free_port_run(4);
    let relay = RelayHandle::start(relay_config(token, &[first, first + 3]))
        .await
        .unwrap();
    let mut agent = AgentHandle::start(agent_config(
        "healthy",
        &relay.url(),
        token,
        first,
        echo_port,
    ));
    let port = agent.online().await.unwrap();
    (relay, agent, port, first)
}

async fn echo_works(port: u16) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(b"still alive").await.unwrap();
    let mut buf = [0; 11];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still alive");
}

#[tokio::test]
async fn a_wrong_token_is_refused_in_plain_words() {
    let ports = free_ports(1);
    let relay = RelayHandle::start(relay_config("right", &ports))
        .await
        .unwrap();
    let mut agent = AgentHandle::start(agent_config("cam", &relay.url(), "wrong", ports[0], 1));
    let (reason, rejection) = agent.refused().await.unwrap();
    assert_eq!(rejection, Rejection::BadToken);
    assert!(
        reason.contains("check agent.tunnel_server_token"),
        "{reason}"
    );
    assert!(relay.registry.get("cam").is_none());
    agent.stop().await;
}

#[tokio::test]
async fn another_protocol_version_is_told_which_versions_work() {
    let ports = free_ports(1);
    let relay = RelayHandle::start(relay_config("t", &ports)).await.unwrap();

    let mut ws = ControlClient::connect(&relay.url()).await.unwrap();
    ws.register("cam", "t", 99, ports[0], 1).await.unwrap();
    let expected = Rejection::UnsupportedVersion {
        agent: 99,
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };
    assert_eq!(
        ws.next().await.unwrap(),
        Some(RelayMessage::Rejected(expected.clone()))
    );
    assert!(expected.to_string().contains(&format!(
        "supported by this relay (it speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})"
    )));
    assert_eq!(ws.next().await.unwrap(), None, "closed after the refusal");

    // A future agent whose Register no longer decodes here still gets a useful answer.
    let mut ws = ControlClient::connect(&relay.url()).await.unwrap();
    ws.send_bytes(vec![0, 7, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(matches!(
        ws.next().await.unwrap(),
        Some(RelayMessage::Rejected(Rejection::UnsupportedVersion {
            agent: 7,
            ..
        }))
    ));
}

#[tokio::test]
async fn a_port_held_by_another_program_is_refused() {
    let ports = free_ports(1);
    let _squatter = TcpListener::bind(("127.0.0.1", ports[0])).await.unwrap();
    let relay = RelayHandle::start(relay_config("t", &ports)).await.unwrap();
    let mut agent = AgentHandle::start(agent_config("cam", &relay.url(), "t", ports[0], 1));
    let (reason, rejection) = agent.refused().await.unwrap();
    assert!(
        matches!(rejection, Rejection::PortTaken { port, .. } if port == ports[0]),
        "{rejection:?}"
    );
    assert!(reason.contains("already taken"), "{reason}");
    agent.stop().await;
}

#[tokio::test]
async fn garbage_and_oversized_frames_drop_only_their_own_connection() {
    let (relay, agent, healthy_port, first) = relay_with_healthy_agent("t").await;

    let attacks: Vec<(&str, Message)> = vec![
        (
            "garbage",
            Message::Binary(vec![0xde, 0xad, 0xbe, 0xef, 0x99].into()),
        ),
        ("oversized", Message::Binary(vec![0; 200 * 1024].into())),
        ("text", Message::Text("hello".into())),
        (
            "heartbeat before register",
            Message::Binary(
                encode_control(&AgentMessage::Heartbeat(AgentStats::default()))
                    .unwrap()
                    .into(),
            ),
        ),
    ];
    for (what, attack) in attacks {
        let mut ws = ControlClient::connect(&relay.url()).await.unwrap();
        let _ = ws.send(attack).await;
        match ws.next().await.unwrap() {
            None | Some(RelayMessage::Rejected(_)) => {}
            other => panic!("{what}: relay answered {other:?}"),
        }
        assert_eq!(
            ws.next().await.unwrap(),
            None,
            "{what}: connection not closed"
        );
    }

    // Registered, then garbage: dropped, and its port released.
    let mut ws = ControlClient::connect(&relay.url()).await.unwrap();
    ws.register("intruder", "t", PROTOCOL_VERSION, first + 1, 30)
        .await
        .unwrap();
    assert!(matches!(
        ws.next().await.unwrap(),
        Some(RelayMessage::Registered(_))
    ));
    ws.send_bytes(vec![0xff; 64]).await.unwrap();
    assert_eq!(ws.next().await.unwrap(), None);
    // The relay closes the connection only after the session is gone and its port free.
    assert!(relay.registry.get("intruder").is_none());
    assert!(
        TcpStream::connect(("127.0.0.1", first + 1)).await.is_err(),
        "port released"
    );

    // The healthy agent never noticed.
    echo_works(healthy_port).await;
    assert_eq!(agent.stats.snapshot().reconnections, 0);
    assert!(matches!(*agent.state.borrow(), AgentState::Online { .. }));
    agent.stop().await;
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_registered_client_that_goes_quiet_is_closed_after_three_missed_heartbeats() {
    let ports = free_ports(1);
    let relay = RelayHandle::start(relay_config("t", &ports)).await.unwrap();
    let mut ws = ControlClient::connect(&relay.url()).await.unwrap();
    ws.register("quiet", "t", PROTOCOL_VERSION, ports[0], 1)
        .await
        .unwrap();
    assert!(matches!(
        ws.next().await.unwrap(),
        Some(RelayMessage::Registered(_))
    ));
    assert_eq!(
        ws.next().await.unwrap(),
        Some(RelayMessage::Closing(CloseReason::HeartbeatTimeout(3)))
    );
    assert_eq!(ws.next().await.unwrap(), None);
    assert!(
        TcpStream::connect(("127.0.0.1", ports[0])).await.is_err(),
        "camera port closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_that_refuses_closes_the_watcher_promptly_and_is_logged_once_per_side() {
    let ports = free_ports(3);
    let closed_camera_port = ports[2];
    let mut relay = RelayProcess::start(ports[0], ports[1], "t").await.unwrap();
    let mut agent = AgentProcess::start(
        "agent",
        &agent_config_json("cam", &relay.url(), "t", ports[1], closed_camera_port),
    )
    .await
    .unwrap();

    let mut watcher = TcpStream::connect(("127.0.0.1", ports[1])).await.unwrap();
    let _ = watcher
        .write_all(b"OPTIONS rtsp://127.0.0.1/cam/realmonitor RTSP/1.0\r\nCSeq: 1\r\n\r\n")
        .await;
    let mut buf = [0; 64];
    let read = tokio::time::timeout(READY_TIMEOUT, watcher.read(&mut buf))
        .await
        .expect("the Watcher's connection was left hanging");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "got bytes from a camera that is not there: {read:?}"
    );

    agent
        .process
        .wait_for_line("camera connection failed")
        .await
        .unwrap();
    relay
        .process
        .wait_for_line("the camera refused the connection")
        .await
        .unwrap();
    assert_eq!(agent.process.count_lines("camera connection failed"), 1);
    assert_eq!(
        relay
            .process
            .count_lines("the camera refused the connection"),
        1
    );
    assert_eq!(relay.process.count_lines("ERROR"), 0);
}

/// The relay's answer to one registration of `id` with `token`, from a fresh connection.
async fn register_once(relay: &RelayHandle, id: &str, token: &str) -> Option<RelayMessage> {
    let mut client = ControlClient::connect(&relay.url()).await.unwrap();
    client
        .register(id, token, PROTOCOL_VERSION, 0, 30)
        .await
        .unwrap();
    client.next().await.unwrap()
}

#[tokio::test]
async fn repeated_failures_make_an_address_wait_and_a_full_relay_says_when_to_return() {
    let first = free_port_run(4);
    let mut config = relay_config("right", &[first, first + 3]);
    config.limits.failed_registrations = 2;
    config.limits.max_agents = 1;
    let relay = RelayHandle::start(config).await.unwrap();

    let mut agent = AgentHandle::start(agent_config("first", &relay.url(), "right", 0, 1));
    agent.online().await.unwrap();

    // The relay is full: a second camera is told to come back later, not refused.
    match register_once(&relay, "second", "right").await {
        Some(RelayMessage::Rejected(Rejection::RetryLater { secs, why })) => {
            assert!(secs > 0 && why.contains("limits.max_agents"), "{why}");
        }
        other => panic!("expected RetryLater, got {other:?}"),
    }

    // Two wrong tokens from this address, and even a right one must wait.
    for _ in 0..2 {
        assert_eq!(
            register_once(&relay, "first", "wrong").await,
            Some(RelayMessage::Rejected(Rejection::BadToken))
        );
    }
    match register_once(&relay, "first", "right").await {
        Some(RelayMessage::Rejected(Rejection::RetryLater { secs, why })) => {
            assert!(
                secs >= 1 && why.contains("limits.failed_registrations"),
                "{why}"
            );
        }
        other => panic!("expected RetryLater, got {other:?}"),
    }
    // The camera that was online stays online through all of it.
    assert!(matches!(*agent.state.borrow(), AgentState::Online { .. }));
    agent.stop().await;
    relay.stop().await.unwrap();
}
