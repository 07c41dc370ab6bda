//! The traffic of every scenario: a target server standing in for the camera, and the
//! measuring clients standing in for the Watcher. Both run as `bench` subcommands, so
//! the orchestrator can place them on the host or in a network namespace.
//!
//! The target speaks first (one hello byte, so "first byte from the target" is
//! measurable through any tunnel), then reads a request: a mode byte and two u64
//! parameters.
//!
//! | mode | parameters | the target |
//! |---|---|---|
//! | `E` | — | echoes everything back |
//! | `U` | — | reads to EOF, then answers the byte count (u64) |
//! | `D` | bytes | sends that many bytes, then closes |
//! | `P` | bit/s, milliseconds | sends camera-like frames at that rate for that long |
//!
//! A paced frame is `[u32 length][u64 send time, ns since the Unix epoch][payload]`,
//! 25 per second, so a receiver on the same machine (any namespace) can tell each
//! frame's one-way delay and the gaps between arrivals.

use std::{
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const HELLO: u8 = 0x01;
/// Frames per second of a paced stream (a camera's usual 25).
pub const FPS: u64 = 25;
const FRAME_HEADER: usize = 12;
const CHUNK: usize = 64 * 1024;

/// Serves the target protocol on `listener` forever.
pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            // A client going away mid-test is not the target's business.
            let _ = handle(stream).await;
        });
    }
}

async fn handle(mut stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(&[HELLO]).await?;
    let mut request = [0u8; 17];
    stream.read_exact(&mut request).await?;
    let a = u64::from_be_bytes(request[1..9].try_into()?);
    let b = u64::from_be_bytes(request[9..17].try_into()?);
    match request[0] {
        b'E' => {
            let (mut rd, mut wr) = stream.split();
            tokio::io::copy(&mut rd, &mut wr).await?;
        }
        b'U' => {
            let mut total = 0u64;
            let mut buf = vec![0; CHUNK];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_be_bytes()).await?;
        }
        b'D' => {
            let buf = vec![0x5a; CHUNK];
            let mut left = a;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                stream.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
        }
        b'P' => paced(&mut stream, a, Duration::from_millis(b)).await?,
        other => bail!("unknown mode {other}"),
    }
    stream.shutdown().await?;
    Ok(())
}

/// Sends `bits_per_sec` as 25 frames a second for `duration`.
async fn paced(
    stream: &mut TcpStream,
    bits_per_sec: u64,
    duration: Duration,
) -> anyhow::Result<()> {
    let frame_len = (bits_per_sec / 8 / FPS).max(FRAME_HEADER as u64) as usize;
    let mut frame = vec![0x47; frame_len];
    frame[..4].copy_from_slice(&(frame_len as u32).to_be_bytes());
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / FPS));
    // A stalled link must not be followed by a burst of catch-up frames: a camera
    // drops frames it could not send, it does not send them faster later.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = Instant::now() + duration;
    while Instant::now() < end {
        ticker.tick().await;
        frame[4..12].copy_from_slice(&unix_nanos().to_be_bytes());
        stream.write_all(&frame).await?;
    }
    Ok(())
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Connects to a target through `addr` and reads its hello; returns the stream and
/// the time from starting the connect to the hello.
async fn open(addr: SocketAddr) -> anyhow::Result<(TcpStream, Duration)> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut hello = [0u8; 1];
    stream
        .read_exact(&mut hello)
        .await
        .with_context(|| format!("no hello through {addr}"))?;
    anyhow::ensure!(
        hello[0] == HELLO,
        "wrong hello {:#x} through {addr}",
        hello[0]
    );
    Ok((stream, start.elapsed()))
}

async fn request(stream: &mut TcpStream, mode: u8, a: u64, b: u64) -> anyhow::Result<()> {
    let mut req = [0u8; 17];
    req[0] = mode;
    req[1..9].copy_from_slice(&a.to_be_bytes());
    req[9..17].copy_from_slice(&b.to_be_bytes());
    stream.write_all(&req).await?;
    Ok(())
}

/// Percentiles of a distribution, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5) as f64,
            p90: h.value_at_quantile(0.9) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            p999: h.value_at_quantile(0.999) as f64,
            max: h.max() as f64,
        }
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Round trips of `size`-byte messages, one at a time, after `warmup` unrecorded ones.
pub async fn latency(
    addr: SocketAddr,
    size: usize,
    count: u64,
    warmup: u64,
) -> anyhow::Result<Percentiles> {
    let (mut stream, _) = open(addr).await?;
    request(&mut stream, b'E', 0, 0).await?;
    let message = vec![0xa5u8; size];
    let mut back = vec![0u8; size];
    let mut h = histogram();
    for i in 0..warmup + count {
        let start = Instant::now();
        stream.write_all(&message).await?;
        stream.read_exact(&mut back).await?;
        if i >= warmup {
            h.record(micros(start.elapsed()))?;
        }
    }
    Ok(Percentiles::of(&h))
}

/// Time from starting a TCP connect to the target's first byte, `count` sessions one
/// after another.
pub async fn setup(addr: SocketAddr, count: u64) -> anyhow::Result<Percentiles> {
    let mut h = histogram();
    for _ in 0..count {
        let (stream, took) = open(addr).await?;
        h.record(micros(took))?;
        drop(stream);
    }
    Ok(Percentiles::of(&h))
}

/// Throughput of one session, in one direction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Throughput {
    /// Bytes moved.
    pub bytes: u64,
    /// Seconds from the first byte sent to the last byte (or the count) received.
    pub seconds: f64,
    /// Bits per second.
    pub bits_per_sec: f64,
}

/// Sends `bytes` to the target (`up`) or has it send them (`!up`).
pub async fn throughput(addr: SocketAddr, bytes: u64, up: bool) -> anyhow::Result<Throughput> {
    let (mut stream, _) = open(addr).await?;
    let start = Instant::now();
    let moved = if up {
        request(&mut stream, b'U', 0, 0).await?;
        let buf = vec![0x5au8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            stream.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        stream.shutdown().await?;
        let mut count = [0u8; 8];
        stream.read_exact(&mut count).await?;
        u64::from_be_bytes(count)
    } else {
        request(&mut stream, b'D', bytes, 0).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    };
    let seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(moved == bytes, "moved {moved} of {bytes} bytes");
    Ok(Throughput {
        bytes,
        seconds,
        bits_per_sec: bytes as f64 * 8.0 / seconds,
    })
}

/// What one paced stream delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamReport {
    /// Frames the target would send in the time.
    pub frames_expected: u64,
    /// Frames received whole.
    pub frames: u64,
    /// One-way frame delay (send to last byte received), µs.
    pub delay: Percentiles,
    /// Gaps between successive frame arrivals, µs (a camera's 40 ms when all is well).
    pub gaps: Percentiles,
    /// Gaps longer than 200 ms: what a viewer sees as a stall.
    pub stalls: u64,
}

/// Opens one paced stream per address at once, `bits_per_sec` each for `duration`.
pub async fn streams(
    addrs: &[SocketAddr],
    bits_per_sec: u64,
    duration: Duration,
) -> anyhow::Result<Vec<StreamReport>> {
    let tasks: Vec<_> = addrs
        .iter()
        .map(|&addr| tokio::spawn(one_stream(addr, bits_per_sec, duration)))
        .collect();
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await??);
    }
    Ok(reports)
}

async fn one_stream(
    addr: SocketAddr,
    bits_per_sec: u64,
    duration: Duration,
) -> anyhow::Result<StreamReport> {
    let (mut stream, _) = open(addr).await?;
    request(&mut stream, b'P', bits_per_sec, duration.as_millis() as u64).await?;
    let (mut delay, mut gaps) = (histogram(), histogram());
    let (mut frames, mut stalls) = (0u64, 0u64);
    let mut last: Option<Instant> = None;
    let mut header = [0u8; FRAME_HEADER];
    let mut body = Vec::new();
    loop {
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(header[..4].try_into()?) as usize;
        let sent = u64::from_be_bytes(header[4..12].try_into()?);
        anyhow::ensure!(len >= FRAME_HEADER, "bad frame length {len}");
        body.resize(len - FRAME_HEADER, 0);
        stream.read_exact(&mut body).await?;
        let now = Instant::now();
        frames += 1;
        delay.record(unix_nanos().saturating_sub(sent) / 1000 + 1)?;
        if let Some(previous) = last {
            let gap = now - previous;
            gaps.record(micros(gap))?;
            if gap > Duration::from_millis(200) {
                stalls += 1;
            }
        }
        last = Some(now);
    }
    Ok(StreamReport {
        frames_expected: duration.as_millis() as u64 * FPS / 1000,
        frames,
        delay: Percentiles::of(&delay),
        gaps: Percentiles::of(&gaps),
        stalls,
    })
}
