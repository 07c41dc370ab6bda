//! One Watcher connection through the tunnel, RTSP-aware: Watcher → camera requests are
//! checked and camera → Watcher responses have the camera's own URLs renamed (see
//! [`super::message`]); answers of the relay's own go back to the Watcher between the
//! camera's messages; every other byte passes through as it arrives.
//!
//! The bytes move on the product's one splice (`common::splice`), with its contract
//! (half-close, reset on error, counters); each direction here is a layer on it:
//! [`Requests`] one way, [`Responses`] the other.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, OnceLock,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use common::{
    splice::{reset_tcp, splice_with, ByteCounters, Layer, Meter, Out, StreamSend, Tcp, Transfer},
    stream::{RecvHalf, SendHalf},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpStream,
    sync::mpsc::{self, error::TrySendError},
    time::Sleep,
};

use crate::{events::WatcherScope, metrics::CameraMetrics};

use super::{
    media::{MediaMeter, MediaStats, PEEK},
    message::{
        has_sdp_body, on_request, request_authority, request_line, rewrite_response, Decision,
        WatcherView,
    },
    scanner::{Event, Scanner},
};

/// Responses of the relay's own waiting for a boundary in the camera's stream. A client
/// waits for each answer before it asks again, so a handful is plenty; a Watcher that
/// has more outstanding is not reading, and its connection is reset.
const PENDING_ANSWERS: usize = 8;

/// How often a session's media is added to the camera's metrics while it flows.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// A stall timer re-armed less than this early is left as it is: re-arming at every
/// packet would cost a timer update each.
const STALL_SLACK: Duration = Duration::from_millis(100);

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
    /// Where its stalls are told.
    pub(crate) events: WatcherScope<'a>,
    /// Its media so far, as of the last report (for `/streams`).
    pub(crate) media: &'a Mutex<MediaStats>,
}

/// A Watcher connection as the proxy takes it.
#[derive(Debug)]
pub(crate) struct Watcher {
    pub(crate) front: Front,
    /// Bytes already read from `front` (the shared port reads the first request to
    /// learn which camera is wanted); they go first.
    pub(crate) preread: Vec<u8>,
    /// `/<agent-id>` on the shared port, empty on a camera's own port.
    pub(crate) prefix: String,
    /// When the Watcher connected.
    pub(crate) started: Instant,
}

/// Where a Watcher's bytes come from.
#[derive(Debug)]
pub(crate) enum Front {
    /// The Watcher's own TCP connection to this relay.
    Tcp(TcpStream),
    /// A stream from another relay of the cluster, which the Watcher connected to; it
    /// passes the connection on as it is (the RTSP awareness is this relay's).
    Peer {
        recv: RecvHalf,
        send: SendHalf,
        /// The Watcher's address, as the other relay saw it.
        watcher: SocketAddr,
    },
}

impl Front {
    /// The Watcher's address.
    pub(crate) fn watcher_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Front::Tcp(tcp) => tcp.peer_addr(),
            Front::Peer { watcher, .. } => Ok(*watcher),
        }
    }

    /// Ends the connection at once: a TCP reset, or a stream reset.
    pub(crate) fn reset(self) {
        match self {
            Front::Tcp(tcp) => {
                reset_tcp(&tcp);
                drop(tcp);
            }
            Front::Peer { send, .. } => send.reset(),
        }
    }
}

/// Carries one Watcher connection through a QUIC stream until both directions end.
/// Media that stops for `stall_after` while playing is a stall.
pub(crate) async fn proxy<R>(
    watcher: Watcher,
    camera: (R, SendHalf),
    observed: Observed<'_>,
    stall_after: Duration,
) -> Outcome
where
    R: AsyncRead + Unpin,
{
    let Watcher {
        front,
        preread,
        prefix,
        started,
    } = watcher;
    match front {
        Front::Tcp(tcp) => {
            let (read, write) = tcp.into_split();
            let front = Tcp {
                read: io::Cursor::new(preread).chain(read),
                write,
            };
            proxy_from(front, camera, observed, stall_after, &prefix, started).await
        }
        Front::Peer { recv, send, .. } => {
            let front = Tcp {
                read: io::Cursor::new(preread).chain(recv),
                write: send,
            };
            proxy_from(front, camera, observed, stall_after, &prefix, started).await
        }
    }
}

/// [`proxy`], once the Watcher's side is split into its halves.
async fn proxy_from<T, W, R>(
    front: Tcp<T, W>,
    (camera_recv, camera_send): (R, SendHalf),
    observed: Observed<'_>,
    stall_after: Duration,
    prefix: &str,
    started: Instant,
) -> Outcome
where
    T: AsyncRead + Unpin,
    W: StreamSend,
    R: AsyncRead + Unpin,
{
    let (answers_tx, answers_rx) = mpsc::channel(PENDING_ANSWERS);
    let authority = OnceLock::new();
    let naming = Naming {
        authority: &authority,
        prefix,
    };
    // False after the Watcher asked to PAUSE or TEARDOWN: silence is then expected.
    let playing = AtomicBool::new(true);
    let requests = Requests {
        scanner: Scanner::new(),
        answers: answers_tx,
        naming,
        playing: &playing,
        first_request: observed.request,
    };
    let mut responses = Responses {
        scanner: Scanner::new(),
        answers: Some(answers_rx),
        naming,
        media: Media::new(started, observed.metrics, observed.media),
        stalls: Stalls::new(stall_after, &playing, observed.events),
        packet: None,
        held: None,
        first_byte_sent: false,
    };
    let layers = (requests, &mut responses);
    let result = splice_with(front, camera_recv, camera_send, layers, &observed).await;
    Outcome {
        result,
        media: responses.media.finish(),
    }
}

/// The proxy's bytes count for the connection and for the camera's series.
impl Meter for Observed<'_> {
    fn on_tcp_read(&self, n: usize) {
        self.bytes.on_tcp_read(n);
        self.metrics.to_camera.inc_by(n as u64);
    }

    fn on_tcp_written(&self, n: usize) {
        self.bytes.on_tcp_written(n);
        self.metrics.to_watcher.inc_by(n as u64);
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
struct Requests<'a> {
    scanner: Scanner,
    /// Where the relay's own answers go, for the other direction to put between the
    /// camera's messages.
    answers: mpsc::Sender<Vec<u8>>,
    naming: Naming<'a>,
    playing: &'a AtomicBool,
    first_request: &'a OnceLock<(String, String)>,
}

impl Layer for Requests<'_> {
    fn on_read(&mut self, read: &[u8], out: &mut Out) -> io::Result<()> {
        for event in self.scanner.feed(read) {
            let head = match event {
                Event::Pass(bytes) => {
                    out.pass(read, bytes);
                    continue;
                }
                Event::NotRtsp(bytes) => {
                    out.own(bytes);
                    continue;
                }
                Event::End | Event::Frame { .. } => continue,
                Event::Head(head) => head,
            };
            if head.starts_with(b"PLAY ") {
                self.playing.store(true, Ordering::Relaxed);
            } else if head.starts_with(b"PAUSE ") || head.starts_with(b"TEARDOWN ") {
                self.playing.store(false, Ordering::Relaxed);
            }
            if self.first_request.get().is_none() {
                if let Some(line) = request_line(&head) {
                    let _ = self.first_request.set(line);
                }
            }
            if self.naming.authority.get().is_none() {
                if let Some(found) = request_authority(&head) {
                    let _ = self.naming.authority.set(found);
                }
            }
            match on_request(&head, self.naming.prefix) {
                Decision::Forward => out.own(head),
                Decision::Rewrite(rewritten) => out.own(rewritten),
                Decision::Answer(response) => {
                    log_answer(&response);
                    match self.answers.try_send(response) {
                        // Closed: the other direction is over, and the connection with it.
                        Ok(()) | Err(TrySendError::Closed(_)) => {}
                        Err(TrySendError::Full(_)) => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!(
                                    "the Watcher sent more than {PENDING_ANSWERS} requests \
                                     that the relay answers itself without reading the answers"
                                ),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn on_end(&mut self, out: &mut Out) {
        // A request cut short still reaches the camera, which decides what it means.
        if let Some(partial) = self.scanner.finish() {
            out.own(partial);
        }
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

/// The session's media meter, reported to the camera's metrics every
/// [`REPORT_EVERY`] while packets flow, at every stall, and at the end.
struct Media<'a> {
    meter: MediaMeter,
    started: Instant,
    metrics: &'a CameraMetrics,
    live: &'a Mutex<MediaStats>,
    reported: MediaStats,
    next_report: Instant,
}

impl<'a> Media<'a> {
    fn new(started: Instant, metrics: &'a CameraMetrics, live: &'a Mutex<MediaStats>) -> Self {
        Media {
            meter: MediaMeter::new(started),
            started,
            metrics,
            live,
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
        if let Ok(mut live) = self.live.lock() {
            live.clone_from(&now);
        }
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

/// Camera → Watcher: renames the camera's URLs, passes everything else, puts the relay's
/// answers in between the camera's messages (never inside one), and measures the media.
struct Responses<'a> {
    scanner: Scanner,
    /// The relay's answers from the other direction; `None` once that half is gone.
    answers: Option<mpsc::Receiver<Vec<u8>>>,
    naming: Naming<'a>,
    media: Media<'a>,
    stalls: Stalls<'a>,
    /// The interleaved packet being passed.
    packet: Option<Packet>,
    /// An SDP response held back until its body is complete, to rename URLs in both.
    held: Option<(Vec<u8>, Vec<u8>)>,
    /// True once the Watcher got its first byte: the session was set up.
    first_byte_sent: bool,
}

/// An interleaved packet on its way: its channel, length and first bytes, which are all
/// the media meter reads.
struct Packet {
    channel: u8,
    len: usize,
    peek: [u8; PEEK],
    peeked: usize,
}

impl Responses<'_> {
    /// Marks the session set up at the first byte that goes to the Watcher.
    fn note_first_byte(&mut self, out: &Out) {
        if !self.first_byte_sent && !out.is_empty() {
            self.first_byte_sent = true;
            self.media.first_byte();
        }
    }
}

impl Layer for Responses<'_> {
    fn on_read(&mut self, read: &[u8], out: &mut Out) -> io::Result<()> {
        for event in self.scanner.feed(read) {
            match (event, &mut self.held) {
                (Event::Pass(bytes), Some((_, body))) => body.extend_from_slice(bytes),
                (Event::Pass(bytes), None) => {
                    if let Some(packet) = &mut self.packet {
                        let take = (PEEK - packet.peeked).min(bytes.len());
                        packet.peek[packet.peeked..][..take].copy_from_slice(&bytes[..take]);
                        packet.peeked += take;
                    }
                    out.pass(read, bytes);
                }
                (Event::NotRtsp(bytes), _) => out.own(bytes),
                (Event::Frame { channel, len }, _) => {
                    self.packet = Some(Packet {
                        channel,
                        len,
                        peek: [0; PEEK],
                        peeked: 0,
                    })
                }
                (Event::Head(head), _) if has_sdp_body(&head) => {
                    self.held = Some((head, Vec::new()))
                }
                (Event::Head(head), _) => match self.naming.view() {
                    Some(view) => out.own(rewrite_response(&head, &[], view).0),
                    None => out.own(head),
                },
                (Event::End, _) => {
                    if let Some(packet) = self.packet.take() {
                        let now = Instant::now();
                        let peek = &packet.peek[..packet.peeked];
                        self.media.on_packet(packet.channel, peek, packet.len, now);
                        self.stalls.on_packet(now);
                    }
                    if let Some((head, body)) = self.held.take() {
                        self.media.meter.on_sdp(&body);
                        let (head, body) = match self.naming.view() {
                            Some(view) => rewrite_response(&head, &body, view),
                            None => (head, body),
                        };
                        out.own(head);
                        out.own(body);
                    }
                    take_answers(&mut self.answers, out);
                }
            }
        }
        self.note_first_byte(out);
        Ok(())
    }

    fn on_end(&mut self, out: &mut Out) {
        if let Some((head, body)) = self.held.take() {
            out.own(head);
            out.own(body);
        }
        if let Some(partial) = self.scanner.finish() {
            out.own(partial);
        }
        take_answers(&mut self.answers, out);
        self.note_first_byte(out);
    }

    fn poll_between(&mut self, cx: &mut Context<'_>, out: &mut Out) -> Poll<()> {
        if self.stalls.poll_stall(cx).is_ready() {
            self.media.on_stall();
        }
        // Idle between messages: an answer can go out at once.
        if let (Some(answers), true) = (&mut self.answers, self.scanner.at_boundary()) {
            match answers.poll_recv(cx) {
                Poll::Ready(Some(answer)) => out.own(answer),
                Poll::Ready(None) => self.answers = None,
                Poll::Pending => {}
            }
        }
        self.note_first_byte(out);
        if out.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// Adds the answers waiting (at a boundary in the camera's stream).
fn take_answers(answers: &mut Option<mpsc::Receiver<Vec<u8>>>, out: &mut Out) {
    if let Some(answers) = answers {
        while let Ok(answer) = answers.try_recv() {
            out.own(answer);
        }
    }
}

/// When media counts as stalled: silence longer than `after` while playing.
struct Stalls<'a> {
    after: Duration,
    events: WatcherScope<'a>,
    /// Set by the other direction from the Watcher's requests.
    playing: &'a AtomicBool,
    /// Armed at the first media packet, pushed on by the next ones; fires when the
    /// camera goes silent.
    timer: Pin<Box<Sleep>>,
    last_packet: Option<Instant>,
    /// True from a stall until the next packet.
    stalled: bool,
}

impl<'a> Stalls<'a> {
    fn new(after: Duration, playing: &'a AtomicBool, events: WatcherScope<'a>) -> Self {
        Stalls {
            after,
            events,
            playing,
            timer: Box::pin(tokio::time::sleep(after)),
            last_packet: None,
            stalled: false,
        }
    }

    /// A media packet arrived at `now`.
    fn on_packet(&mut self, now: Instant) {
        if self.stalled && self.playing.load(Ordering::Relaxed) {
            let gap = self.last_packet.map(|at| now.duration_since(at));
            let gap = gap.unwrap_or_default();
            tracing::info!("media resumed after {:.1} s", gap.as_secs_f64());
            self.events.resumed(gap);
        }
        self.stalled = false;
        self.last_packet = Some(now);
        let deadline = tokio::time::Instant::from(now + self.after);
        if deadline > self.timer.deadline() + STALL_SLACK {
            self.timer.as_mut().reset(deadline);
        }
    }

    /// Ready once per silence that counts as a stall.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(last_packet) = self.last_packet.filter(|_| !self.stalled) else {
                // Disarmed until a packet comes (it comes through a read, which wakes).
                return Poll::Pending;
            };
            std::task::ready!(self.timer.as_mut().poll(cx));
            // The timer is pushed on lazily and may fire a little early: measure.
            if last_packet.elapsed() < self.after {
                self.timer.as_mut().reset((last_packet + self.after).into());
                continue;
            }
            // Disarmed until the next packet either way; counted only while playing
            // (the Watcher may have paused since this wait began).
            self.stalled = true;
            if !self.playing.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            tracing::warn!(
                "media stalled: no packet from the camera for {:?} while playing",
                self.after
            );
            self.events.stalled(last_packet.elapsed());
            return Poll::Ready(());
        }
    }
}
