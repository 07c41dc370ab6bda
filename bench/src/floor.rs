//! The floor: TCP carried over quinn with nothing else, so every run shows the QUIC
//! stack's own cost beside ours. Two processes, as a tunnel has: the relay side accepts
//! Watchers on one TCP port per camera and opens a bidirectional stream per connection
//! on that camera's QUIC connection (one marker byte makes it visible, as our
//! `StreamOpen` does); the camera side connects each stream to the target and splices.
//! The data plane's own transport and TLS configuration (`common::tls`), one
//! current-thread runtime per process, `tokio::io::copy_bidirectional` on both sides: no
//! registration, no RTSP, no counters, no hand-offs between threads.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use common::tls;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// The byte that opens a stream (a QUIC stream is invisible to the peer until data
/// crosses it).
const OPEN: u8 = 1;

/// The relay side: a QUIC endpoint on `quic`, and `cameras` TCP listeners on `tcp_ip`.
/// Prints `READY quic=<addr> sha256=<hex> entries=<addr>,<addr>…`, then serves until
/// killed.
pub async fn relay_side(
    quic: SocketAddr,
    tcp_ip: std::net::IpAddr,
    cameras: usize,
) -> anyhow::Result<()> {
    let identity = tls::Identity::self_signed(&["floor"])?;
    let endpoint = quinn::Endpoint::server(tls::quic_server_config(&identity, None)?, quic)?;
    let mut slots = Vec::new();
    let mut entries = Vec::new();
    for _ in 0..cameras {
        let listener = TcpListener::bind((tcp_ip, 0)).await?;
        entries.push(listener.local_addr()?.to_string());
        let (tx, rx) = watch::channel(None::<quinn::Connection>);
        slots.push(tx);
        tokio::spawn(accept_watchers(listener, rx));
    }
    println!(
        "READY quic={} sha256={} entries={}",
        endpoint.local_addr()?,
        common::protocol::hex(&identity.leaf_sha256()),
        entries.join(",")
    );
    let slots = Arc::new(slots);
    while let Some(incoming) = endpoint.accept().await {
        let slots = slots.clone();
        tokio::spawn(async move {
            let connection = incoming.await?;
            // The camera says which one it is on a stream of its own (the data plane's
            // config lets an agent open bidirectional streams only, as ours does for its
            // hello).
            let (mut answer, mut hello) = connection.accept_bi().await?;
            let index = hello.read_u32().await? as usize;
            answer.finish()?;
            slots
                .get(index)
                .context("no such camera")?
                .send_replace(Some(connection));
            anyhow::Ok(())
        });
    }
    Ok(())
}

/// Accepts Watchers on `listener`, each carried by a fresh stream of the camera's
/// connection once it is there.
async fn accept_watchers(
    listener: TcpListener,
    mut camera: watch::Receiver<Option<quinn::Connection>>,
) -> anyhow::Result<()> {
    loop {
        let (mut tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let connection = camera.wait_for(Option::is_some).await?.clone();
        let Some(connection) = connection else {
            continue;
        };
        tokio::spawn(async move {
            let (mut send, recv) = connection.open_bi().await?;
            send.write_all(&[OPEN]).await?;
            let mut stream = tokio::io::join(recv, send);
            tokio::io::copy_bidirectional(&mut tcp, &mut stream).await?;
            anyhow::Ok(())
        });
    }
}

/// The camera side, camera `index`: dials the relay side's QUIC endpoint at `relay`,
/// pinning `sha256`, and connects every stream to `target`. Prints `READY` once
/// connected, then serves until the connection ends.
pub async fn camera_side(
    relay: SocketAddr,
    sha256: &str,
    index: u32,
    target: SocketAddr,
) -> anyhow::Result<()> {
    let pin = common::protocol::sha256_from_hex(sha256)
        .with_context(|| format!("not a SHA-256: {sha256}"))?;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    endpoint.set_default_client_config(tls::quic_client_config(
        pin,
        None,
        1024,
        tls::QUIC_KEEP_ALIVE,
    )?);
    let connection = endpoint.connect(relay, "floor")?.await?;
    let (mut hello, _answer) = connection.open_bi().await?;
    hello.write_u32(index).await?;
    hello.finish()?;
    println!("READY");
    loop {
        let (send, mut recv) = connection.accept_bi().await?;
        tokio::spawn(async move {
            let mut open = [0];
            recv.read_exact(&mut open).await?;
            let mut tcp = TcpStream::connect(target).await?;
            tcp.set_nodelay(true)?;
            let mut stream = tokio::io::join(recv, send);
            tokio::io::copy_bidirectional(&mut tcp, &mut stream).await?;
            anyhow::Ok(())
        });
    }
}
