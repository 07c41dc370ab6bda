//! The relay's RTSP handling under load, in process: the relay's own answers go between
//! the camera's messages, never inside an interleaved frame, and no frame is altered.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic

use e2e::Tunnel;
use rand::{rngs::StdRng, RngCore, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

const FRAMES: usize = 400;

/// What the fake camera sends: its answer to PLAY, then the frames; and the offset, in
/// the middle of a frame's payload, where it stops until told to go on.
fn camera_wire() -> (Vec<u8>, usize) {
    let mut wire = b"RTSP/1.0 200 OK\r\nCSeq: 6\r\nSession: 1\r\n\r\n".to_vec();
    let mut pause_at = 0;
    for (i, payload) in frames().iter().enumerate() {
        if i == FRAMES / 3 {
            pause_at = wire.len() + 4 + payload.len() / 2;
        }
        wire.extend_from_slice(&[b'$', 0]);
        wire.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        wire.extend_from_slice(payload);
    }
    (wire, pause_at)
}

/// The frames the fake camera sends: `$`, channel 0, length, seeded payload.
fn frames() -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(11);
    (0..FRAMES)
        .map(|i| {
            let mut payload = vec![0; 1 + (i * 7919) % 60_000];
            rng.fill_bytes(&mut payload);
            payload
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_the_relay_goes_between_frames_while_media_flows() {
    // A camera that streams interleaved media in writes of odd sizes, so frames straddle
    // reads, and records what it receives.
    let camera = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let camera_port = camera.local_addr().unwrap().port();
    let (received_tx, received_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = camera.accept().await.unwrap();
        let (wire, pause_at) = camera_wire();
        let (first, rest) = wire.split_at(pause_at);
        tcp.write_all(first).await.unwrap();
        // Go on only once the Watcher's GET_PARAMETER, sent right after its UDP SETUP,
        // has arrived: the relay handles requests in order, so by then its answer to the
        // SETUP is waiting for the end of the frame in flight.
        let mut received = Vec::new();
        while !received.ends_with(b"CSeq: 8\r\n\r\n") {
            let mut buf = [0u8; 1024];
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the Watcher's requests never came");
            received.extend_from_slice(&buf[..n]);
        }
        for chunk in rest.chunks(4093) {
            tcp.write_all(chunk).await.unwrap();
        }
        tcp.shutdown().await.unwrap();
        tcp.read_to_end(&mut received).await.unwrap();
        received_tx.send(received).unwrap();
    });

    let tunnel = Tunnel::start("busy", camera_port, |_| {}).await.unwrap();
    let port = tunnel.port;

    let mut watcher = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let play = format!("PLAY rtsp://127.0.0.1:{port}/cam/realmonitor/ RTSP/1.0\r\nCSeq: 6\r\n\r\n");
    watcher.write_all(play.as_bytes()).await.unwrap();
    // Take everything up to the cut frame, then ask for UDP: the relay is in the middle
    // of that frame and its answer has to wait for the frame's end.
    let mut first = vec![0u8; camera_wire().1];
    watcher.read_exact(&mut first).await.unwrap();
    let setup = format!(
        "SETUP rtsp://127.0.0.1:{port}/cam/realmonitor/stream=1 RTSP/1.0\r\nCSeq: 7\r\n\
         Transport: RTP/AVP;unicast;client_port=6000-6001\r\n\r\n"
    );
    let keepalive = format!(
        "GET_PARAMETER rtsp://127.0.0.1:{port}/cam/realmonitor/ RTSP/1.0\r\nCSeq: 8\r\n\r\n"
    );
    watcher.write_all(setup.as_bytes()).await.unwrap();
    watcher.write_all(keepalive.as_bytes()).await.unwrap();
    let mut stream = first;
    watcher.read_to_end(&mut stream).await.unwrap();
    watcher.shutdown().await.unwrap();

    // Parse what the Watcher got: the camera's answer to PLAY, frames, and exactly one
    // response of the relay's own, each response with the number of frames before it.
    let expected = frames();
    let (mut at, mut frame, mut answers) = (0, 0, Vec::new());
    while at < stream.len() {
        if stream[at] == b'$' {
            let len = usize::from(u16::from_be_bytes([stream[at + 2], stream[at + 3]]));
            assert!(
                stream[at + 4..at + 4 + len] == expected[frame][..],
                "frame {frame} altered"
            );
            at += 4 + len;
            frame += 1;
        } else {
            let end = at
                + stream[at..]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("a whole head")
                + 4;
            answers.push((frame, String::from_utf8(stream[at..end].to_vec()).unwrap()));
            at = end;
        }
    }
    assert_eq!(frame, FRAMES, "every frame arrived");
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(
        answers[0].1.starts_with("RTSP/1.0 200 OK\r\nCSeq: 6"),
        "{answers:?}"
    );
    let (after_frames, answer) = &answers[1];
    assert!(
        answer.starts_with("RTSP/1.0 461 Unsupported Transport\r\nCSeq: 7\r\n"),
        "{answers:?}"
    );
    // In the middle of the media: right after the frame that was cut in two, not at the end.
    assert_eq!(*after_frames, FRAMES / 3 + 1, "{answers:?}");

    // The camera got the PLAY and the GET_PARAMETER, never the UDP SETUP.
    let received = String::from_utf8(received_rx.await.unwrap()).unwrap();
    assert_eq!(received, format!("{play}{keepalive}"));

    tunnel.stop().await.unwrap();
}

/// A camera that sends 10 RTP packets, goes silent for `silence`, sends 10 more and
/// closes; the Watcher sends `request` (if any) once the first packets have arrived.
/// Returns the stalls the relay counted.
async fn stalls_seen(silence: std::time::Duration, request: Option<&str>) -> u64 {
    let camera = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let camera_port = camera.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut tcp, _) = camera.accept().await.unwrap();
        let packets = |from: u16| -> Vec<u8> {
            let mut wire = Vec::new();
            for seq in from..from + 10 {
                let mut rtp = vec![0x80, 96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0x41, 0, 0];
                rtp[2..4].copy_from_slice(&seq.to_be_bytes());
                rtp[4..8].copy_from_slice(&(u32::from(seq) * 3600).to_be_bytes());
                wire.extend_from_slice(&[b'$', 0]);
                wire.extend_from_slice(&(rtp.len() as u16).to_be_bytes());
                wire.extend_from_slice(&rtp);
            }
            wire
        };
        tcp.write_all(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nSession: 1\r\n\r\n")
            .await
            .unwrap();
        tcp.write_all(&packets(0)).await.unwrap();
        // The stimulus of this test, not a wait for readiness: the camera goes silent.
        tokio::time::sleep(silence).await;
        tcp.write_all(&packets(10)).await.unwrap();
        tcp.shutdown().await.unwrap();
        let _ = tcp.read_to_end(&mut Vec::new()).await;
    });

    let tunnel = Tunnel::start("stally", camera_port, |c| {
        c.limits.stall_after = std::time::Duration::from_millis(400)
    })
    .await
    .unwrap();
    let port = tunnel.port;

    let mut watcher = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let play = format!("PLAY rtsp://127.0.0.1:{port}/x RTSP/1.0\r\nCSeq: 1\r\n\r\n");
    watcher.write_all(play.as_bytes()).await.unwrap();
    let mut first = [0u8; 40 + 19 * 10];
    watcher.read_exact(&mut first).await.unwrap();
    if let Some(request) = request {
        let request = format!("{request} rtsp://127.0.0.1:{port}/x RTSP/1.0\r\nCSeq: 2\r\n\r\n");
        watcher.write_all(request.as_bytes()).await.unwrap();
    }
    watcher.read_to_end(&mut Vec::new()).await.unwrap();
    drop(watcher);

    let session = tunnel.relay.registry.get("stally").unwrap();
    let mut media = session.media();
    let stats = tokio::time::timeout(e2e::READY_TIMEOUT, media.wait_for(|m| m.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(stats.packets, 20, "{stats:?}");
    tunnel.stop().await.unwrap();
    stats.stalls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_that_goes_silent_while_playing_is_a_stall_but_not_after_pause() {
    let silence = std::time::Duration::from_millis(1500);
    assert_eq!(stalls_seen(silence, None).await, 1, "silent while playing");
    assert_eq!(
        stalls_seen(silence, Some("PAUSE")).await,
        0,
        "silent after PAUSE"
    );
}
