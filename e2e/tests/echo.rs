//! Byte-exact transfer through the tunnel: seeded random payloads from 1 byte to 64 MiB,
//! both directions at once, half-close, 8 connections in parallel.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::net::SocketAddr;

use e2e::Tunnel;
use rand::{rngs::StdRng, RngCore, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// An echo server with half-close: echoes until the client's FIN, then sends its own.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                tokio::io::copy(&mut rd, &mut wr).await.unwrap();
                wr.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// Sends `payload`, half-closes, and reads the echo until the server's FIN.
async fn round_trip(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut rd, mut wr) = tcp.split();
    let send = async {
        wr.write_all(payload).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut echoed = Vec::with_capacity(payload.len());
    let receive = rd.read_to_end(&mut echoed);
    let ((), received) = tokio::join!(send, receive);
    received.unwrap();
    echoed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_cross_byte_exact_in_both_directions_with_half_close() {
    let target = echo_server().await;
    let tunnel = Tunnel::start("echo-cam", target.port(), |_| {})
        .await
        .unwrap();
    let port = tunnel.port;
    assert_eq!(port, tunnel.requested);

    const MIB: usize = 1 << 20;
    let sizes = [1, 2, 1000, 65_537, MIB + 3, 4 * MIB, 16 * MIB, 64 * MIB];
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| {
            let mut p = vec![0; n];
            rng.fill_bytes(&mut p);
            p
        })
        .collect();

    let transfers = payloads.iter().map(|p| round_trip(port, p));
    let echoed = futures_util::future::join_all(transfers).await;
    for (sent, got) in payloads.iter().zip(&echoed) {
        assert_eq!(
            got.len(),
            sent.len(),
            "length of a {} byte payload",
            sent.len()
        );
        assert!(
            got == sent,
            "a {} byte payload came back altered",
            sent.len()
        );
    }

    let total: u64 = sizes.iter().map(|&n| n as u64).sum();
    let session = tunnel.relay.registry.get("echo-cam").unwrap();
    let through = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        session.metrics.to_camera.get(),
        total,
        "relay counted Watcher bytes"
    );
    assert_eq!(
        session.metrics.to_watcher.get(),
        total,
        "relay counted camera bytes"
    );
    assert_eq!(
        through(&tunnel.agent.stats.bytes.from_tcp),
        total,
        "agent counted camera bytes"
    );

    tunnel.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_speaks_first_and_closes_reaches_the_watcher_whole() {
    // The camera side sends and closes without reading: FIN must travel the other way.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let mut greeting = vec![0; 3 * 1024 * 1024 + 17];
    StdRng::seed_from_u64(7).fill_bytes(&mut greeting);
    let expected = greeting.clone();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(&greeting).await.unwrap();
        tcp.shutdown().await.unwrap();
        // Keep reading so the Watcher's later bytes are accepted, until its FIN.
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
    });

    let tunnel = Tunnel::start("speaker", target.port(), |_| {})
        .await
        .unwrap();
    let port = tunnel.port;

    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut got = Vec::new();
    tcp.read_to_end(&mut got).await.unwrap();
    assert!(
        got == expected,
        "greeting altered ({} of {} bytes)",
        got.len(),
        expected.len()
    );
    // Our direction is still open after the camera's FIN.
    tcp.write_all(b"bye").await.unwrap();
    tcp.shutdown().await.unwrap();

    tunnel.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_shaped_and_line_protocol_streams_pass_byte_exact() {
    // The relay reads RTSP on Watcher connections; whatever it does not need to change
    // must come through exactly, split however TCP likes.
    let target = echo_server().await;
    let tunnel = Tunnel::start("shapes", target.port(), |_| {})
        .await
        .unwrap();
    let port = tunnel.port;

    let mut frames = vec![0u8; 3 * 65_535];
    StdRng::seed_from_u64(3).fill_bytes(&mut frames);
    let mut rtsp = b"DESCRIBE rtsp://127.0.0.1/cam/realmonitor?channel=1&subtype=0 RTSP/1.0\r\nCSeq: 2\r\n\r\n\
        SET_PARAMETER rtsp://127.0.0.1/ RTSP/1.0\r\nCSeq: 3\r\nContent-Length: 10\r\n\r\n\r\n\r\n\r\n\r\n\r\n\
        SETUP rtsp://127.0.0.1/cam/realmonitor/trackID=0 RTSP/1.0\r\nCSeq: 4\r\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n\r\n"
        .to_vec();
    for chunk in frames.chunks(65_535) {
        rtsp.extend_from_slice(&[b'$', 0]);
        rtsp.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        rtsp.extend_from_slice(chunk);
    }
    rtsp.extend_from_slice(b"TEARDOWN rtsp://127.0.0.1/ RTSP/1.0\r\nCSeq: 5\r\n\r\n");

    let mut line_protocol = b"PING\r\n".to_vec();
    line_protocol.extend_from_slice(&frames[..1000]);

    for (what, payload) in [
        ("rtsp", &rtsp),
        ("line protocol", &line_protocol),
        ("partial head", &b"OPTIONS * RT".to_vec()),
    ] {
        let echoed = round_trip(port, payload).await;
        assert!(
            echoed == *payload,
            "{what}: {} bytes sent, {} came back altered",
            payload.len(),
            echoed.len()
        );
    }
    tunnel.stop().await.unwrap();
}

/// With two data-plane shards, two cameras are seated on different ones (each its own
/// thread and QUIC port) and both carry bytes exactly, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cameras_on_different_data_shards_each_carry_bytes_exactly() {
    const TOKEN: &str = "shard-token";
    let target = echo_server().await;
    let first = e2e::free_port_run(2);
    let mut config = e2e::relay_config(TOKEN, &[first, first + 1]);
    config.data_shards = 2;
    let relay = e2e::RelayHandle::start(config).await.unwrap();
    let mut agents = Vec::new();
    for (i, id) in ["shard-a", "shard-b"].into_iter().enumerate() {
        let config = e2e::agent_config(id, &relay.url(), TOKEN, first + i as u16, target.port());
        let mut agent = e2e::AgentHandle::start(config);
        agent.online().await.unwrap();
        agents.push(agent);
    }
    let shard = |id: &str| relay.registry.get(id).and_then(|s| s.data_shard());
    let (a, b) = (shard("shard-a"), shard("shard-b"));
    assert!(a.is_some() && b.is_some() && a != b, "{a:?} {b:?}");

    let mut payload = vec![0; 4 << 20];
    StdRng::seed_from_u64(7).fill_bytes(&mut payload);
    let (echo_a, echo_b) =
        tokio::join!(round_trip(first, &payload), round_trip(first + 1, &payload));
    assert!(
        echo_a == payload && echo_b == payload,
        "a payload came back altered"
    );
    for agent in agents {
        agent.stop().await;
    }
    relay.stop().await.unwrap();
}
