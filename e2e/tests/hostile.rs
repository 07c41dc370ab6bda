//! Hostile input against the real relay process while a real camera streams through
//! it: every attack is refused with a clear log line, and the live stream keeps
//! decoding throughout.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::{net::SocketAddr, time::Duration};

use common::{
    protocol::{read_frame, write_frame, DataHello, HelloReply, RelayMessage, PROTOCOL_VERSION},
    tls,
};
use e2e::{ffprobe, rtsp_url, AgentProcess, ControlClient, ProcessRig, SUB_STREAM};
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};
use tokio_tungstenite::tungstenite::Message;

/// Frames the live Watcher decodes while the attacks run (20 fps: about 10 s).
const LIVE_FRAMES: u32 = 200;

/// A QUIC connection to the relay, offering `alpn`, trusting any certificate with
/// `pin` (the handshake fails before the pin matters when the ALPN is wrong).
async fn quic(relay: SocketAddr, alpn: &[u8], pin: [u8; 32]) -> anyhow::Result<quinn::Connection> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let mut crypto = tls::client_config(&tls::RelayTrust::Pin(vec![pin]), None, alpn)?;
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    Ok(endpoint.connect(relay, "camera-relay")?.await?)
}

async fn attacks(rig: &mut ProcessRig) {
    let control = format!("127.0.0.1:{}", rig.relay_port);
    let url = rig.relay.url();
    let mut rng = StdRng::seed_from_u64(7);

    // Garbage, then an oversized frame, on the WebSocket: each connection is dropped.
    let mut garbage = vec![0u8; 1000];
    rng.fill_bytes(&mut garbage);
    let mut ws = ControlClient::connect(&url).await.unwrap();
    ws.send_bytes(garbage).await.unwrap();
    assert!(ws.next().await.unwrap().is_none(), "garbage: not closed");
    let mut ws = ControlClient::connect(&url).await.unwrap();
    let _ = ws.send(Message::Binary(vec![0u8; 1 << 20].into())).await;
    assert!(ws.next().await.unwrap().is_none(), "oversized: not closed");

    // Random datagrams on the QUIC port: dropped without a reply worth anything.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..2000 {
        let mut datagram = vec![0u8; rng.random_range(1..1400)];
        rng.fill_bytes(&mut datagram);
        udp.send_to(&datagram, &control).await.unwrap();
    }

    // A wrong ALPN: the QUIC handshake fails.
    let relay_addr: SocketAddr = control.parse().unwrap();
    assert!(quic(relay_addr, b"h3", [0; 32]).await.is_err());

    // A replayed registration proof: the session key of a registration that has ended.
    let mut client = ControlClient::connect(&url).await.unwrap();
    client
        .register("replayed", ProcessRig::TOKEN, PROTOCOL_VERSION, 0, 30)
        .await
        .unwrap();
    let Some(RelayMessage::Registered(registered)) = client.next().await.unwrap() else {
        panic!("no registration to replay");
    };
    drop(client);
    // Its port closes once the relay has forgotten the registration.
    rig.relay
        .process
        .wait_for_line("camera port closed")
        .await
        .unwrap();
    let conn = quic(relay_addr, common::protocol::ALPN, registered.cert_sha256)
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = DataHello {
        agent_id: "replayed".into(),
        session_key: registered.session_key,
    };
    write_frame(&mut send, &hello).await.unwrap();
    // The refusal comes as the reply or, if the relay's close overtakes it, as the
    // connection's close reason.
    let why = match read_frame::<_, HelloReply>(&mut recv).await {
        Ok(HelloReply::Refused(why)) => why,
        Ok(HelloReply::Accepted) => panic!("a replayed session key was accepted"),
        Err(e) => format!("{e}: {:?}", conn.closed().await),
    };
    assert!(why.contains("no live registration"), "{why}");

    // The live camera's id claimed with a wrong token: refused, the camera stays.
    let mut thief = ControlClient::connect(&url).await.unwrap();
    thief
        .register("live", "not-the-token", PROTOCOL_VERSION, 0, 30)
        .await
        .unwrap();
    assert!(matches!(
        thief.next().await.unwrap(),
        Some(RelayMessage::Rejected(
            common::protocol::Rejection::BadToken
        ))
    ));

    // Slowloris: request headers one byte at a time never complete in time; the relay
    // hangs up (limits.registration_timeout_secs, 10 s in the quick start).
    let mut slow = TcpStream::connect(&control).await.unwrap();
    slow.write_all(b"GET /tunnel HTTP/1.1\r\nHost: relay\r\n")
        .await
        .unwrap();
    let dripping = async {
        loop {
            if slow.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(e2e::READY_TIMEOUT, dripping)
        .await
        .expect("the relay kept a slowloris connection open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_are_refused_while_a_live_stream_keeps_decoding() {
    let mut rig = ProcessRig::start(&[], "live").await.unwrap();
    let _agent = AgentProcess::start("agent", &rig.config).await.unwrap();

    let (live, ()) = tokio::join!(
        ffprobe(rtsp_url(rig.camera_port, SUB_STREAM), LIVE_FRAMES),
        attacks(&mut rig)
    );
    let live = live.unwrap();
    assert!(live.frames >= LIVE_FRAMES, "{live:?}");

    // Each refusal left a clear line in the relay's log.
    for line in [
        "undecodable first message",
        "control connection dropped before registering",
        "tunnel refused: QUIC handshake failed",
        "tunnel refused: no live registration of agent \"replayed\"",
        "registration refused: the relay refused the token",
        "no complete request headers within",
    ] {
        rig.relay.process.wait_for_line(line).await.unwrap();
    }
}
