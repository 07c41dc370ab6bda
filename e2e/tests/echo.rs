//! Byte-exact transfer through the tunnel: seeded random payloads from 1 byte to 64 MiB,
//! both directions at once, half-close, 8 connections in parallel.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use std::net::SocketAddr;

use e2e::{agent_config, free_ports, relay_config, AgentHandle, RelayHandle};
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
    let ports = free_ports(1);
    let relay = RelayHandle::start(relay_config("echo-token", &ports))
        .await
        .unwrap();
    let mut agent = AgentHandle::start(agent_config(
        "echo-cam",
        &relay.url(),
        "echo-token",
        ports[0],
        target.port(),
    ));
    let port = agent.online().await.unwrap();
    assert_eq!(port, ports[0]);

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
    let session = relay.registry.get("echo-cam").unwrap();
    let through = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        through(&session.counters.from_tcp),
        total,
        "relay counted Watcher bytes"
    );
    assert_eq!(
        through(&session.counters.to_tcp),
        total,
        "relay counted camera bytes"
    );
    assert_eq!(
        through(&agent.stats.bytes.from_tcp),
        total,
        "agent counted camera bytes"
    );

    agent.stop().await;
    relay.stop().await.unwrap();
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

    let ports = free_ports(1);
    let relay = RelayHandle::start(relay_config("t", &ports)).await.unwrap();
    let mut agent = AgentHandle::start(agent_config(
        "speaker",
        &relay.url(),
        "t",
        ports[0],
        target.port(),
    ));
    let port = agent.online().await.unwrap();

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

    agent.stop().await;
    relay.stop().await.unwrap();
}
