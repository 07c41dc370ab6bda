//! One Watcher connection through the tunnel, RTSP-aware: Watcher → camera requests are
//! checked and camera → Watcher responses have the camera's own URLs renamed (see
//! [`super::message`]); answers of the relay's own go back to the Watcher between the
//! camera's messages; every other byte passes through as it arrives.
//!
//! Same contract as `common::splice::splice`: each direction runs to its own end
//! (half-close: Watcher FIN → stream finish, stream finish → Watcher FIN); if either
//! fails, the QUIC stream and the Watcher's TCP connection are both reset.

use std::{
    io,
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use common::{
    splice::{reset_tcp, ByteCounters, Transfer},
    stream::SendHalf,
};
use prometheus::IntCounter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{tcp::OwnedWriteHalf, TcpStream},
    sync::mpsc,
};

use crate::metrics::CameraMetrics;

use super::{
    media::{MediaMeter, MediaStats, PEEK},
    message::{
        has_sdp_body, on_request, request_authority, request_line, rewrite_response, Decision,
        WatcherView,
    },
    scanner::{Event, Scanner},
};

/// Read buffer of each direction, as in the plain splice.
const BUFFER: usize = 64 * 1024;

/// Responses of the relay's own waiting for a boundary in the camera's stream. A client
/// waits for each answer before it asks again, so a handful is plenty.
const PENDING_ANSWERS: usize = 8;

/// How often a session's media is added to the camera's metrics while it flows.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// How a Watcher connection went: its bytes (or why it failed) and its media.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Bytes each way, or the error that ended the connection.
    pub(crate) result: io::Result<Transfer>,
    /// What the camera's media looked like, read from the RTP headers.
    pub(crate) media: MediaStats,
}

/// Where the proxy reports what it sees, live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observed<'a> {
    /// The connection's bytes (`from_tcp`: Watcher → camera).
    pub(crate) bytes: &'a ByteCounters,
    /// Method and path of the first request line.
    pub(crate) request: &'a OnceLock<(String, String)>,
    /// The camera's series.
    pub(crate) metrics: &'a CameraMetrics,
}

/// A Watcher connection as the proxy takes it.
#[derive(Debug)]
pub(crate) struct Watcher {
    pub(crate) tcp: TcpStream,
    /// Bytes already read from `tcp` (the shared port reads the first request to learn
    /// which camera is wanted); they go first.
    pub(crate) preread: Vec<u8>,
    /// `/<agent-id>` on the shared port, empty on a camera's own port.
    pub(crate) prefix: String,
    /// When the Watcher connected.
    pub(crate) started: Instant,
}

/// Carries one Watcher connection through a QUIC stream until both directions end.
/// Media that stops for `stall_after` while playing is a stall.
pub(crate) async fn proxy<R>(
    watcher: Watcher,
    mut camera_recv: R,
    mut camera_send: SendHalf,
    observed: Observed<'_>,
    stall_after: Duration,
) -> Outcome
where
    R: AsyncRead + Unpin,
{
    let Watcher {
        tcp,
        preread,
        prefix,
        started,
    } = watcher;
    let (watcher_rd, mut watcher_wr) = tcp.into_split();
    let mut watcher_rd = io::Cursor::new(preread).chain(watcher_rd);
    let (answers_tx, answers_rx) = mpsc::channel(PENDING_ANSWERS);
    let authority = OnceLock::new();
    let naming = Naming {
        authority: &authority,
        prefix: &prefix,
    };
    // False after the Watcher asked to PAUSE or TEARDOWN: silence is then expected.
    let playing = AtomicBool::new(true);
    let Observed {
        bytes: counters,
        request,
        metrics,
    } = observed;
    let mut media = Media::new(started, metrics);
    let up = upstream(
        &mut watcher_rd,
        &mut camera_send,
        answers_tx,
        naming,
        &playing,
        Tally(&counters.from_tcp, &metrics.to_camera),
        request,
    );
    let watch = Stalls {
        after: stall_after,
        playing: &playing,
    };
    let down = downstream(
        &mut camera_recv,
        &mut watcher_wr,
        answers_rx,
        naming,
        &mut media,
        watch,
        Tally(&counters.to_tcp, &metrics.to_watcher),
    );
    let result = match tokio::try_join!(up, down) {
        Ok((from_tcp, to_tcp)) => Ok(Transfer { from_tcp, to_tcp }),
        Err(e) => {
            camera_send.reset();
            reset_tcp(watcher_wr.as_ref());
            Err(e)
        }
    };
    Outcome {
        result,
        media: media.finish(),
    }
}

/// Reads until the first complete request head: everything read so far (to be passed
/// on as [`Watcher::preread`]) and that head. An error if the stream ends first or is
/// not RTSP.
pub(crate) async fn first_request<R>(watcher: &mut R) -> io::Result<(Vec<u8>, Vec<u8>)>
where
    R: AsyncRead + Unpin,
{
    let mut preread = Vec::new();
    let mut buf = vec![0; 4096];
    let mut scanner = Scanner::new();
    loop {
        let n = watcher.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the Watcher hung up before sending a whole request",
            ));
        }
        preread.extend_from_slice(&buf[..n]);
        for event in scanner.feed(&buf[..n]) {
            match event {
                Event::Head(head) => return Ok((preread, head)),
                Event::NotRtsp(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "not RTSP: the shared port carries RTSP only (other protocols \
                         reach a camera on its own port)",
                    ))
                }
                _ => {}
            }
        }
    }
}

/// Watcher → camera: requests are checked (and on the shared port lose the camera's
/// `prefix`), everything else passes.
async fn upstream<R>(
    watcher: &mut R,
    camera: &mut SendHalf,
    answers: mpsc::Sender<Vec<u8>>,
    naming: Naming<'_>,
    playing: &AtomicBool,
    tally: Tally<'_>,
    first_request: &OnceLock<(String, String)>,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0; BUFFER];
    let mut out = Out::default();
    let mut scanner = Scanner::new();
    let mut total = 0;
    loop {
        let n = watcher.read(&mut buf).await?;
        if n == 0 {
            if let Some(partial) = scanner.finish() {
                camera.write_all(&partial).await?;
            }
            camera.shutdown().await?;
            return Ok(total);
        }
        total += n as u64;
        tally.add(n);
        let read = &buf[..n];
        for event in scanner.feed(read) {
            match event {
                Event::Pass(bytes) => out.pass(read, bytes),
                Event::NotRtsp(bytes) => out.own(bytes),
                Event::End | Event::Frame { .. } => {}
                Event::Head(head) => {
                    if head.starts_with(b"PLAY ") {
                        playing.store(true, Ordering::Relaxed);
                    } else if head.starts_with(b"PAUSE ") || head.starts_with(b"TEARDOWN ") {
                        playing.store(false, Ordering::Relaxed);
                    }
                    if first_request.get().is_none() {
                        if let Some(line) = request_line(&head) {
                            let _ = first_request.set(line);
                        }
                    }
                    if naming.authority.get().is_none() {
                        if let Some(found) = request_authority(&head) {
                            let _ = naming.authority.set(found);
                        }
                    }
                    match on_request(&head, naming.prefix) {
                        Decision::Forward => out.own(head),
                        Decision::Rewrite(rewritten) => out.own(rewritten),
                        Decision::Answer(response) => {
                            log_answer(&response);
                            // The downstream half only goes away with the connection.
                            let _ = answers.send(response).await;
                        }
                    }
                }
            }
        }
        out.write(read, camera).await?;
    }
}

fn log_answer(response: &[u8]) {
    let status = response.split(|&b| b == b'\r').next().unwrap_or_default();
    let status = String::from_utf8_lossy(status);
    if status.contains(" 461 ") {
        tracing::info!(
            "SETUP asked for RTP over UDP, which the tunnel cannot carry; \
             answered 461 so the client retries over TCP"
        );
    } else {
        tracing::warn!("answered {status:?} in the camera's place");
    }
}

/// Bytes of one direction, counted for the session and the camera's metrics.
#[derive(Clone, Copy)]
struct Tally<'a>(&'a AtomicU64, &'a IntCounter);

impl Tally<'_> {
    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        self.1.inc_by(n as u64);
    }
}

/// The session's media meter, reported to the camera's metrics every
/// [`REPORT_EVERY`] while packets flow, at every stall, and at the end.
struct Media<'a> {
    meter: MediaMeter,
    started: Instant,
    metrics: &'a CameraMetrics,
    reported: MediaStats,
    next_report: Instant,
}

impl<'a> Media<'a> {
    fn new(started: Instant, metrics: &'a CameraMetrics) -> Self {
        Media {
            meter: MediaMeter::new(started),
            started,
            metrics,
            reported: MediaStats::default(),
            next_report: started + REPORT_EVERY,
        }
    }

    fn on_packet(&mut self, channel: u8, peek: &[u8], len: usize, now: Instant) {
        self.meter.on_packet(channel, peek, len, now);
        if now >= self.next_report {
            self.report();
            self.next_report = now + REPORT_EVERY;
        }
    }

    /// The camera's first byte goes to the Watcher: the session is set up.
    fn first_byte(&self) {
        self.metrics
            .session_setup
            .observe(self.started.elapsed().as_secs_f64());
    }

    fn on_stall(&mut self) {
        self.meter.on_stall();
        self.report();
    }

    fn report(&mut self) {
        let now = self.meter.summary();
        self.metrics.report(&self.reported, &now);
        self.reported = now;
    }

    /// Reports the rest; the session's media.
    fn finish(mut self) -> MediaStats {
        self.report();
        self.reported
    }
}

/// How the Watcher names the camera, shared by both directions.
#[derive(Clone, Copy)]
struct Naming<'a> {
    /// The host:port the Watcher dialled, learnt from its first absolute request URI
    /// (before the camera can answer anything).
    authority: &'a OnceLock<String>,
    /// `/<agent-id>` on the shared port, empty on the camera's own port.
    prefix: &'a str,
}

impl<'a> Naming<'a> {
    /// What the camera's URLs are renamed to, once known.
    fn view(&self) -> Option<WatcherView<'a>> {
        Some(WatcherView {
            authority: self.authority.get()?,
            prefix: self.prefix,
        })
    }
}

/// When media counts as stalled.
struct Stalls<'a> {
    /// Silence longer than this, while playing, is a stall.
    after: Duration,
    /// Set by the upstream half from the Watcher's requests.
    playing: &'a AtomicBool,
}

/// Camera → Watcher: renames the camera's URLs, passes everything else, and puts the
/// relay's answers in between the camera's messages, never inside one.
async fn downstream<R>(
    camera: &mut R,
    watcher: &mut OwnedWriteHalf,
    mut answers: mpsc::Receiver<Vec<u8>>,
    naming: Naming<'_>,
    media: &mut Media<'_>,
    stalls: Stalls<'_>,
    tally: Tally<'_>,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
{
    // Re-armed at every media packet; fires when the camera goes silent.
    let mut stall_timer = pin!(tokio::time::sleep(stalls.after));
    let mut last_packet: Option<Instant> = None;
    let mut stalled = false;
    let mut buf = vec![0; BUFFER];
    let mut out = Out::default();
    let mut scanner = Scanner::new();
    // The interleaved packet being passed: its channel, length and first bytes, which
    // are all the media meter reads.
    let mut packet: Option<(u8, usize, Vec<u8>)> = None;
    // An SDP response held back until its body is complete, to rename URLs in both.
    let mut held: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut answers_open = true;
    let mut total = 0;
    loop {
        // How much of `buf` this turn read: what `out`'s stretches are in.
        let mut read_len = 0;
        let mut ended = false;
        tokio::select! {
            _ = &mut stall_timer, if last_packet.is_some() && !stalled => {
                // The timer is re-armed lazily and may fire a little early: measure.
                let silent_since = last_packet.unwrap_or_else(Instant::now);
                if silent_since.elapsed() < stalls.after {
                    stall_timer.as_mut().reset((silent_since + stalls.after).into());
                } else {
                    // Disarmed until the next packet either way; counted only while
                    // playing (the Watcher may have paused since this wait began).
                    stalled = true;
                    if stalls.playing.load(Ordering::Relaxed) {
                        media.on_stall();
                        tracing::warn!("media stalled: no packet from the camera for {:?} while playing", stalls.after);
                    }
                }
            }
            // Idle between messages: an answer can go out at once.
            answer = answers.recv(), if answers_open && scanner.at_boundary() => match answer {
                Some(answer) => out.own(answer),
                None => answers_open = false,
            },
            read = camera.read(&mut buf) => {
                let n = read?;
                read_len = n;
                if n == 0 {
                    ended = true;
                    if let Some((head, body)) = held.take() {
                        out.own(head);
                        out.own(body);
                    }
                    if let Some(partial) = scanner.finish() {
                        out.own(partial);
                    }
                    while let Ok(answer) = answers.try_recv() {
                        out.own(answer);
                    }
                }
                let read = &buf[..n];
                for event in scanner.feed(read) {
                    match (event, &mut held) {
                        (Event::Pass(bytes), Some((_, body))) => body.extend_from_slice(bytes),
                        (Event::Pass(bytes), None) => {
                            if let Some((_, _, peek)) = &mut packet {
                                let room = PEEK.saturating_sub(peek.len());
                                peek.extend_from_slice(&bytes[..room.min(bytes.len())]);
                            }
                            out.pass(read, bytes);
                        }
                        (Event::NotRtsp(bytes), _) => out.own(bytes),
                        (Event::Frame { channel, len }, _) => packet = Some((channel, len, Vec::with_capacity(PEEK))),
                        (Event::Head(head), _) if has_sdp_body(&head) => held = Some((head, Vec::new())),
                        (Event::Head(head), _) => match naming.view() {
                            Some(view) => out.own(rewrite_response(&head, &[], view).0),
                            None => out.own(head),
                        },
                        (Event::End, _) => {
                            if let Some((channel, len, peek)) = packet.take() {
                                let now = Instant::now();
                                media.on_packet(channel, &peek, len, now);
                                if stalled && stalls.playing.load(Ordering::Relaxed) {
                                    let gap = last_packet.map(|at| now.duration_since(at)).unwrap_or_default();
                                    tracing::info!("media resumed after {:.1} s", gap.as_secs_f64());
                                }
                                stalled = false;
                                last_packet = Some(now);
                                // Re-arming costs a timer update; 100 ms of slack is plenty.
                                let deadline = tokio::time::Instant::from(now + stalls.after);
                                if deadline > stall_timer.deadline() + Duration::from_millis(100) {
                                    stall_timer.as_mut().reset(deadline);
                                }
                            }
                            if let Some((head, body)) = held.take() {
                                media.meter.on_sdp(&body);
                                let (head, body) = match naming.view() {
                                    Some(view) => rewrite_response(&head, &body, view),
                                    None => (head, body),
                                };
                                out.own(head);
                                out.own(body);
                            }
                            while let Ok(answer) = answers.try_recv() {
                                out.own(answer);
                            }
                        }
                    }
                }
            }
        }
        let len = out.len();
        if len > 0 {
            if total == 0 {
                media.first_byte();
            }
            out.write(&buf[..read_len], watcher).await?;
            total += len as u64;
            tally.add(len);
        }
        if ended {
            watcher.shutdown().await?;
            return Ok(total);
        }
    }
}

/// What one read becomes, in order: stretches of the read buffer passed on as they are
/// (media, bodies, a stream that is not RTSP) and bytes of the relay's own (heads,
/// renamed or not, and its answers) between them. Written with vectored writes, so the
/// passed bytes are never copied: a read of pure media is one stretch and one write.
#[derive(Debug, Default)]
struct Out {
    segments: Vec<Segment>,
}

#[derive(Debug)]
enum Segment {
    /// A stretch of the read buffer.
    Read(std::ops::Range<usize>),
    /// Bytes of the relay's own.
    Own(Vec<u8>),
}

impl Out {
    /// Passes `part` of `read` (the scanner's passes borrow the bytes it was fed).
    fn pass(&mut self, read: &[u8], part: &[u8]) {
        if part.is_empty() {
            return;
        }
        let start = (part.as_ptr() as usize).wrapping_sub(read.as_ptr() as usize);
        debug_assert!(start + part.len() <= read.len(), "not a part of the read");
        let range = start..start + part.len();
        match self.segments.last_mut() {
            // A frame's header and its payload, or back-to-back frames: one stretch.
            Some(Segment::Read(last)) if last.end == range.start => last.end = range.end,
            _ => self.segments.push(Segment::Read(range)),
        }
    }

    /// Adds bytes of the relay's own.
    fn own(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.segments.push(Segment::Own(bytes));
        }
    }

    /// How many bytes are to be written.
    fn len(&self) -> usize {
        self.segments
            .iter()
            .map(|segment| match segment {
                Segment::Read(range) => range.len(),
                Segment::Own(bytes) => bytes.len(),
            })
            .sum()
    }

    /// Writes everything, in order, with `read` the buffer the stretches are in; then
    /// starts empty again.
    async fn write<W: AsyncWrite + Unpin>(&mut self, read: &[u8], to: &mut W) -> io::Result<()> {
        let mut slices: Vec<io::IoSlice<'_>> = self
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Read(range) => io::IoSlice::new(&read[range.clone()]),
                Segment::Own(bytes) => io::IoSlice::new(bytes),
            })
            .collect();
        let mut left = &mut slices[..];
        while !left.is_empty() {
            let n = to.write_vectored(left).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            io::IoSlice::advance_slices(&mut left, n);
        }
        drop(slices);
        self.segments.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn out_passes_stretches_of_the_read_uncopied_between_bytes_of_its_own() {
        let read = b"$\x00\x00\x03abc$\x01\x00\x02deRTSP/1.0 200 OK\r\n\r\n";
        let mut out = Out::default();
        // A frame header and its payload, and the next frame: one stretch.
        out.pass(read, &read[..4]);
        out.pass(read, &read[4..7]);
        out.pass(read, &read[7..13]);
        out.own(b"renamed head".to_vec());
        out.pass(read, &read[13..13]); // nothing
        out.own(Vec::new()); // nothing
        out.pass(read, &read[13..17]);
        assert_eq!(out.segments.len(), 3, "{:?}", out.segments);
        assert!(matches!(&out.segments[0], Segment::Read(r) if *r == (0..13)));
        assert_eq!(out.len(), 13 + 12 + 4);

        // A peer that takes a few bytes at a time still gets everything in order.
        let (mut tx, mut rx) = tokio::io::duplex(5);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        });
        out.write(read, &mut tx).await.unwrap();
        assert!(out.segments.is_empty());
        drop(tx);
        let got = reader.await.unwrap();
        assert_eq!(got, [&read[..13], b"renamed head", &read[13..17]].concat());
    }
}
