//! The Watcher listeners: every TCP connection a Watcher makes to a camera's own port,
//! or to the shared port naming the camera as `/<agent-id>/…`, rides a fresh
//! bidirectional stream on that camera's QUIC tunnel (or, while UDP is blocked, on its
//! TCP fallback link). In a cluster, a Watcher for a camera another relay holds rides a
//! stream of the link to that relay ([`crate::peer::link`]), which carries it on as if
//! the Watcher had connected there: its RTSP awareness applies once, at the relay that
//! holds the camera.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::Ordering::{self, Relaxed},
        Arc,
    },
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use common::{
    protocol::{
        check_agent_id, decode_frame_prefix, read_frame, write_frame, PeerOpen, StreamOpen,
        StreamStatus, SERVICE_RTSP,
    },
    splice::{splice, ByteCounters},
    stream::{RecvHalf, SendHalf},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    config::Limits,
    events::{round_ms, EventKind, MediaSummary, WatcherScope},
    peer::link::PeerLinks,
    registry::{fleet::Presence, AgentSession, WatcherSession},
    rtsp::{self, Front, Watcher},
    shard::Shard,
    MediaStats, Registry,
};

/// Pause after an accept error (e.g. out of file descriptors) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a refused Watcher on the shared port gets to read the relay's answer and
/// hang up before the relay closes the connection itself.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Serves the camera's own port on its data-plane shard, beside its tunnel, until the
/// session ends; the task's handle lets a takeover wait for the port to be free.
pub(crate) fn open_camera_port(
    shard: &Shard,
    listener: TcpListener,
    session: Arc<AgentSession>,
    registry: Arc<Registry>,
    limits: Limits,
    tracker: TaskTracker,
) -> io::Result<tokio::task::JoinHandle<()>> {
    // Bound on the main runtime; re-registered with the shard's, where it is served.
    let listener = listener.into_std()?;
    let track = tracker.clone();
    let serve = async move {
        match TcpListener::from_std(listener) {
            Ok(listener) => serve_camera(listener, session, registry, limits, tracker).await,
            Err(e) => tracing::error!("cannot serve the camera's port: {e}"),
        }
    };
    Ok(shard
        .handle
        .spawn(track.track_future(serve.in_current_span())))
}

/// Accepts Watchers on a camera's own port until the session ends.
async fn serve_camera(
    listener: TcpListener,
    session: Arc<AgentSession>,
    registry: Arc<Registry>,
    limits: Limits,
    tracker: TaskTracker,
) {
    tracing::info!(port = session.port, "camera port open");
    accept_watchers(
        &listener,
        session.cancelled(),
        &registry,
        &tracker,
        |tcp, id| {
            let (session, limits) = (session.clone(), limits.clone());
            let watcher = Watcher {
                front: Front::Tcp(tcp),
                preread: Vec::new(),
                prefix: String::new(),
                started: Instant::now(),
            };
            let registry = registry.clone();
            async move { carry(watcher, id, &session, &registry, &limits).await }
        },
    )
    .await;
    tracing::info!(port = session.port, "camera port closed");
}

/// Serves the port of a camera another relay holds, until `stop`: each Watcher rides
/// the link to that relay.
pub(crate) fn open_remote_port(
    listener: TcpListener,
    presence: &Presence,
    peers: Arc<PeerLinks>,
    registry: Arc<Registry>,
    limits: Limits,
    tracker: TaskTracker,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (camera, relay) = (presence.agent_id.clone(), presence.relay.clone());
    let track = tracker.clone();
    let serve = async move {
        tracing::debug!(%relay, "port of the camera on another relay open");
        accept_watchers(
            &listener,
            stop.cancelled(),
            &registry,
            &tracker,
            |tcp, id| {
                let watcher = Elsewhere {
                    tcp,
                    preread: Vec::new(),
                    head: None,
                    camera: camera.clone(),
                    relay: relay.clone(),
                };
                let (peers, registry, limits) = (peers.clone(), registry.clone(), limits.clone());
                async move { carry_to_peer(watcher, id, &peers, &registry, &limits).await }
            },
        )
        .await;
    };
    let span =
        tracing::info_span!("remote_port", camera = %presence.agent_id, port = presence.port);
    track.spawn(serve.instrument(span))
}

/// Accepts Watchers on the shared port until `shutdown`; the first request of each
/// names the camera.
pub(crate) async fn serve_shared(
    listener: TcpListener,
    registry: Arc<Registry>,
    crossing: Crossings,
    limits: Limits,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    accept_watchers(
        &listener,
        shutdown.cancelled(),
        &registry,
        &tracker,
        |tcp, id| {
            let (registry, limits, shutdown) = (registry.clone(), limits.clone(), shutdown.clone());
            let crossing = crossing.clone();
            async move {
                let routed = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    routed = route(tcp, &registry, &limits) => routed?,
                };
                match routed {
                    Routed::Here(watcher, session) => {
                        carry_on_shard(watcher, id, session, registry, limits).await
                    }
                    Routed::Elsewhere(elsewhere) => {
                        cross(elsewhere, id, &crossing, &registry, &limits).await
                    }
                    Routed::Answered => Ok(()),
                }
            }
        },
    )
    .await;
}

/// Where a shared-port Watcher goes.
enum Routed {
    /// To the camera, held by this relay.
    Here(Watcher, Arc<AgentSession>),
    /// To the relay of the cluster that holds the camera.
    Elsewhere(Elsewhere),
    /// Nowhere: the relay answered it.
    Answered,
}

/// A Watcher for a camera another relay holds.
struct Elsewhere {
    tcp: TcpStream,
    /// What was read of it so far.
    preread: Vec<u8>,
    /// Its first request's head on the shared port (to answer it if the other relay
    /// cannot be reached); `None` on the camera's own port, where nothing is read.
    head: Option<Vec<u8>>,
    camera: String,
    relay: String,
}

/// Accepts connections on `listener` until `stop`, each served by `serve` (given the
/// connection and its relay-wide id) in a task of its own, in a `watcher` span. Accept
/// errors (out of file descriptors, say) are logged and retried after a pause.
async fn accept_watchers<F, Fut>(
    listener: &TcpListener,
    stop: impl Future<Output = ()>,
    registry: &Arc<Registry>,
    tracker: &TaskTracker,
    mut serve: F,
) where
    F: FnMut(TcpStream, u64) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accepting a Watcher failed: {e}; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let connection_id = registry.next_connection_id();
        let span = tracing::info_span!(
            "watcher",
            %peer,
            conn = connection_id,
            camera = tracing::field::Empty
        );
        let work = serve(tcp, connection_id);
        let registry = registry.clone();
        tracker.spawn(
            async move {
                if let Err(e) = work.await {
                    report(&registry, &e);
                }
            }
            .instrument(span),
        );
    }
}

/// Reads a shared-port Watcher's first request and finds the camera it names. A camera
/// that is unknown or offline is answered here, with a reason phrase naming it.
async fn route(mut tcp: TcpStream, registry: &Registry, limits: &Limits) -> anyhow::Result<Routed> {
    let started = Instant::now();
    let (preread, head) =
        tokio::time::timeout(limits.first_request_timeout, rtsp::first_request(&mut tcp))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no RTSP request within {:?} on the shared port (limits.first_request_secs)",
                    limits.first_request_timeout
                )
            })??;
    let Some(camera) = rtsp::camera_of(&head).map(str::to_string) else {
        let answer = rtsp::response(
            &head,
            404,
            "No Camera In URL; use rtsp://relay:port/agent-id/...",
        );
        refuse(tcp, &answer).await;
        tracing::warn!(
            "shared port: the request names no camera (expected /<agent-id>/… in its URL)"
        );
        return Ok(Routed::Answered);
    };
    let elsewhere = registry
        .store()
        .cluster()
        .and_then(|store| store.camera(&camera))
        .filter(|presence| Some(presence.relay.as_str()) != registry.relay_id());
    if let (None, Some(presence)) = (registry.get(&camera), elsewhere) {
        tracing::Span::current().record("camera", camera.as_str());
        return Ok(Routed::Elsewhere(Elsewhere {
            tcp,
            preread,
            head: Some(head),
            camera,
            relay: presence.relay,
        }));
    }
    let Some(session) = registry.get(&camera) else {
        let (code, reason) = match check_agent_id(&camera) {
            Err(_) => (404, "Unknown Camera".to_string()),
            Ok(()) if registry.knows(&camera) => (503, format!("Camera {camera} Offline")),
            Ok(()) => (404, format!("Unknown Camera {camera}")),
        };
        refuse(tcp, &rtsp::response(&head, code, &reason)).await;
        tracing::warn!(camera = %camera.escape_debug(), "shared port: answered {code} {reason}");
        return Ok(Routed::Answered);
    };
    tracing::Span::current().record("camera", camera.as_str());
    let watcher = Watcher {
        front: Front::Tcp(tcp),
        preread,
        prefix: format!("/{camera}"),
        started,
    };
    Ok(Routed::Here(watcher, session))
}

/// How this relay's Watchers reach cameras other relays hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Crossings {
    /// The links to the other relays, if this relay has them.
    pub(crate) peers: Option<Arc<PeerLinks>>,
    /// Redirect Watchers to the holding relay where possible.
    pub(crate) redirect: bool,
}

/// Sends a Watcher for a camera another relay holds on its way: redirected there if so
/// configured, else (or if it cannot be) carried over the link; without a link, told
/// where the camera is.
async fn cross(
    watcher: Elsewhere,
    connection_id: u64,
    crossing: &Crossings,
    registry: &Registry,
    limits: &Limits,
) -> anyhow::Result<()> {
    let watcher = match crossing.redirect {
        true => match redirect(watcher, registry, limits).await? {
            Some(watcher) => watcher,
            None => return Ok(()),
        },
        false => watcher,
    };
    if let Some(peers) = &crossing.peers {
        return carry_to_peer(watcher, connection_id, peers, registry, limits).await;
    }
    let reason = format!("Camera {} Is On Relay {}", watcher.camera, watcher.relay);
    let head = watcher.head.unwrap_or_default();
    refuse(watcher.tcp, &rtsp::response(&head, 503, &reason)).await;
    tracing::warn!(
        "shared port: answered 503 {reason}; set [cluster] peer_listen (and its \
         certificates) on the relays to carry Watchers between them, or watchers = \
         \"redirect\" to send them there"
    );
    Ok(())
}

/// Sends a Watcher to the relay holding its camera with an RTSP redirect: OPTIONS is
/// answered here, DESCRIBE with `302 Moved Temporarily` to the same URL on the holding
/// relay's shared port (as it announces it, `rtsp_advertise`). What cannot be
/// redirected comes back, to be carried: a relay that announces no RTSP address, a
/// first request other than these two, pipelined requests.
async fn redirect(
    mut watcher: Elsewhere,
    registry: &Registry,
    limits: &Limits,
) -> anyhow::Result<Option<Elsewhere>> {
    let Some(target) = registry
        .store()
        .cluster()
        .and_then(|store| store.relays().get(&watcher.relay)?.rtsp.clone())
    else {
        return Ok(Some(watcher));
    };
    loop {
        let Some(head) = watcher.head.as_deref() else {
            return Ok(Some(watcher));
        };
        if watcher.preread.len() != head.len() {
            return Ok(Some(watcher));
        }
        let location = match rtsp::method_of(head) {
            Some("DESCRIBE") => rtsp::redirected_uri(head, &target),
            Some("OPTIONS") => {
                let answer = rtsp::response_with(head, 200, "OK", &[("Public", PUBLIC)]);
                watcher.tcp.write_all(&answer).await?;
                let next = rtsp::first_request(&mut watcher.tcp);
                let (preread, head) = tokio::time::timeout(limits.first_request_timeout, next)
                    .await
                    .map_err(|_| anyhow::anyhow!("no request after OPTIONS in time"))??;
                if rtsp::camera_of(&head) != Some(watcher.camera.as_str()) {
                    anyhow::bail!("the Watcher asked for another camera after OPTIONS");
                }
                (watcher.preread, watcher.head) = (preread, Some(head));
                continue;
            }
            _ => None,
        };
        let Some(location) = location else {
            return Ok(Some(watcher));
        };
        let answer =
            rtsp::response_with(head, 302, "Moved Temporarily", &[("Location", &location)]);
        refuse(watcher.tcp, &answer).await;
        registry
            .metrics()
            .peer_stream(&watcher.relay, "out", "redirected");
        tracing::info!(relay = %watcher.relay, %location, "Watcher redirected to the relay holding the camera");
        return Ok(None);
    }
}

/// The methods a relay answering OPTIONS for a camera it redirects names.
const PUBLIC: &str = "OPTIONS, DESCRIBE, SETUP, PLAY, PAUSE, TEARDOWN, GET_PARAMETER";

/// Carries a Watcher to the relay holding its camera, over the link to it: the
/// connection as it came, bytes already read first. The other relay's answer to the
/// stream comes first; a refusal resets the Watcher's connection.
async fn carry_to_peer(
    watcher: Elsewhere,
    connection_id: u64,
    peers: &Arc<PeerLinks>,
    registry: &Registry,
    limits: &Limits,
) -> anyhow::Result<()> {
    let Elsewhere {
        tcp,
        preread,
        head,
        camera,
        relay,
    } = watcher;
    let counted = |result: &str| registry.metrics().peer_stream(&relay, "out", result);
    let opened = tokio::time::timeout(limits.tunnel_wait, peers.open(&relay)).await;
    let failed = match opened {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("relay {relay} holds the camera: {e}")),
        Err(_) => Err(format!(
            "relay {relay} holds the camera, and no stream to it opened within {:?}",
            limits.tunnel_wait
        )),
    };
    let (send, recv) = match failed {
        Ok(stream) => stream,
        Err(why) => {
            counted("unreachable");
            match &head {
                Some(head) => {
                    let answer = rtsp::response(head, 503, &format!("Relay {relay} Unreachable"));
                    refuse(tcp, &answer).await;
                }
                None => common::splice::reset_tcp(&tcp),
            }
            anyhow::bail!(why);
        }
    };
    counted("ok");
    tcp.set_nodelay(true)?;
    let mut send = SendHalf::Quic(send);
    let header = PeerOpen {
        camera,
        shared: head.is_some(),
        watcher: tcp.peer_addr()?.to_string(),
        connection_id,
    };
    write_frame(&mut send, &header).await?;
    send.write_all(&preread).await?;
    tracing::debug!(%relay, "Watcher carried to the relay holding the camera");
    let gate = StatusGate::new(recv, limits.stream_answer_timeout);
    let transfer = splice(tcp, gate, send, &ByteCounters::default()).await?;
    tracing::debug!(
        from_watcher = transfer.from_tcp,
        to_watcher = transfer.to_tcp,
        %relay,
        "Watcher connection done"
    );
    Ok(())
}

/// Serves a stream another relay of the cluster opened: a Watcher that connected there
/// for a camera this relay holds, carried here as if it had connected to this relay.
pub(crate) async fn carry_from_peer(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    relay: String,
    connection_id: u64,
    registry: Arc<Registry>,
    limits: Limits,
) {
    let mut send = SendHalf::Quic(send);
    let counted = |result: &str| registry.metrics().peer_stream(&relay, "in", result);
    let header = tokio::time::timeout(
        limits.first_request_timeout,
        read_frame::<_, PeerOpen>(&mut recv),
    )
    .await;
    let checked = match header {
        Err(_) => Err("no stream header in time".to_string()),
        Ok(Err(e)) => Err(format!("a bad stream header: {e}")),
        Ok(Ok(open)) => match (check_agent_id(&open.camera), open.watcher.parse()) {
            (Err(why), _) => Err(format!("a bad camera id: {why}")),
            (_, Err(_)) => Err(format!("a bad Watcher address {:?}", open.watcher)),
            (Ok(()), Ok(addr)) => Ok((open, addr)),
        },
    };
    let (open, watcher_addr) = match checked {
        Ok(checked) => checked,
        Err(why) => {
            counted("bad_header");
            tracing::warn!("relay {relay} opened a stream with {why}; reset");
            return send.reset();
        }
    };
    tracing::Span::current().record("camera", open.camera.as_str());
    let Some(session) = registry.get(&open.camera) else {
        counted("not_here");
        let why = format!(
            "camera {} is not on relay {}",
            open.camera,
            registry.relay_id().unwrap_or("?")
        );
        tracing::info!("relay {relay} sent a Watcher for a camera not here: {why}");
        if write_frame(&mut send, &StreamStatus::Failed(why))
            .await
            .is_ok()
        {
            send.finish(REFUSAL_LINGER).await;
        }
        return;
    };
    counted("ok");
    tracing::debug!(
        watcher = %watcher_addr,
        their_conn = open.connection_id,
        "Watcher carried here by relay {relay}"
    );
    if write_frame(&mut send, &StreamStatus::Connected)
        .await
        .is_err()
    {
        return;
    }
    let watcher = Watcher {
        front: Front::Peer {
            recv: RecvHalf::Quic(recv),
            send,
            watcher: watcher_addr,
        },
        preread: Vec::new(),
        prefix: match open.shared {
            true => format!("/{}", open.camera),
            false => String::new(),
        },
        started: Instant::now(),
    };
    if let Err(e) = carry_on_shard(watcher, connection_id, session, registry.clone(), limits).await
    {
        report(&registry, &e);
    }
}

/// Answers a request with the relay's own error and hangs up once the Watcher has read
/// it (or after [`REFUSAL_LINGER`]).
async fn refuse(mut tcp: TcpStream, answer: &[u8]) {
    if tcp.write_all(answer).await.is_err() {
        return;
    }
    let _ = tcp.shutdown().await;
    // Closing with unread input would reset the connection and could destroy the
    // answer before the Watcher read it; read until it hangs up.
    let mut sink = [0; 1024];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Carries a shared-port Watcher on its camera's data-plane shard, beside the camera's
/// tunnel (the shared port's accept loop runs on the main runtime).
async fn carry_on_shard(
    watcher: Watcher,
    connection_id: u64,
    session: Arc<AgentSession>,
    registry: Arc<Registry>,
    limits: Limits,
) -> anyhow::Result<()> {
    let Some(shard) = session.shard().cloned() else {
        return carry(watcher, connection_id, &session, &registry, &limits).await;
    };
    // A socket is detached from the main runtime here, attached to the shard's there
    // (a stream from another relay is not tied to a runtime).
    let Watcher {
        front,
        preread,
        prefix,
        started,
    } = watcher;
    let front = match front {
        Front::Tcp(tcp) => Movable::Socket(tcp.into_std()?),
        peer @ Front::Peer { .. } => Movable::Stream(peer),
    };
    let carried = async move {
        let front = match front {
            Movable::Socket(tcp) => Front::Tcp(TcpStream::from_std(tcp)?),
            Movable::Stream(peer) => peer,
        };
        let watcher = Watcher {
            front,
            preread,
            prefix,
            started,
        };
        carry(watcher, connection_id, &session, &registry, &limits).await
    };
    shard.handle.spawn(carried.in_current_span()).await?
}

/// A Watcher's side on its way to a shard.
enum Movable {
    Socket(std::net::TcpStream),
    Stream(Front),
}

/// Carries one Watcher connection through the camera's tunnel; its start and end are
/// events.
async fn carry(
    watcher: Watcher,
    connection_id: u64,
    session: &AgentSession,
    registry: &Registry,
    limits: &Limits,
) -> anyhow::Result<()> {
    let peer = watcher.front.watcher_addr()?;
    let events = registry.events();
    events.emit(
        &session.id,
        EventKind::WatcherStarted {
            connection_id,
            watcher: peer.to_string(),
        },
    );
    let entry = registry.open_watcher(connection_id, &session.id, peer, watcher.started);
    let scope = WatcherScope::new(events, &session.id, connection_id);
    let started = watcher.started;
    let (media, result) =
        carry_open(watcher, &entry.session, scope, session, registry, limits).await;
    let (method, path) = entry.session.request.get().cloned().unzip();
    events.emit(
        &session.id,
        EventKind::WatcherEnded {
            connection_id,
            watcher: peer.to_string(),
            duration_secs: round_ms(started.elapsed()),
            method,
            path,
            bytes_to_watcher: entry.session.bytes.to_tcp.load(Relaxed),
            bytes_from_watcher: entry.session.bytes.from_tcp.load(Relaxed),
            media: media.as_ref().and_then(MediaSummary::of),
            error: result
                .as_ref()
                .err()
                .filter(|e| !is_expected_end(e))
                .map(|e| format!("{e:#}")),
        },
    );
    result
}

/// [`carry`], once the connection is listed: its media (if it got as far as the
/// camera) and how it ended.
async fn carry_open(
    watcher: Watcher,
    listed: &WatcherSession,
    scope: WatcherScope<'_>,
    session: &AgentSession,
    registry: &Registry,
    limits: &Limits,
) -> (Option<MediaStats>, anyhow::Result<()>) {
    if let Front::Tcp(tcp) = &watcher.front {
        // Camera traffic is paced small writes; Nagle would hold them back (~45 ms at
        // p99).
        if let Err(e) = tcp.set_nodelay(true) {
            return (None, Err(e.into()));
        }
    }
    let active = ActiveStream::enter(session);
    if active.count > limits.max_streams_per_camera {
        watcher.front.reset();
        return (
            None,
            Err(Unreached::StreamLimit(limits.max_streams_per_camera).into()),
        );
    }
    tracing::debug!(camera = %session.id, "Watcher connected");
    let opened = async {
        let link = session
            .link(limits.tunnel_wait)
            .await
            .ok_or(Unreached::NoTunnel(limits.tunnel_wait))?;
        let (mut send, recv) = tokio::time::timeout(limits.tunnel_wait, link.open())
            .await
            .map_err(|_| Unreached::NoStream)??;
        registry
            .metrics()
            .streams_opened_total
            .with_label_values(&[link.transport()])
            .inc();
        let header = StreamOpen {
            service: SERVICE_RTSP.to_string(),
            connection_id: listed.id,
        };
        write_frame(&mut send, &header).await?;
        anyhow::Ok((send, recv))
    };
    let (send, recv) = match opened.await {
        Ok(opened) => opened,
        Err(e) => return (None, Err(e)),
    };

    // Watcher bytes go out right behind the header, before the agent's answer: the
    // first request reaches the camera one round trip after connect, not two. The
    // proxy understands RTSP; any other protocol passes through byte for byte.
    let gate = StatusGate::new(recv, limits.stream_answer_timeout);
    let observed = rtsp::Observed {
        bytes: &listed.bytes,
        request: &listed.request,
        metrics: &session.metrics,
        events: scope,
        media: &listed.media,
    };
    let outcome = tokio::select! {
        outcome = rtsp::proxy(watcher, (gate, send), observed, limits.stall_after) => outcome,
        _ = session.cancelled() => return (None, Err(anyhow::anyhow!("the camera's session ended"))),
    };
    log_media(&outcome.media);
    session.record_media(outcome.media.clone());
    let result = outcome.result.map(|transfer| {
        tracing::debug!(
            from_watcher = transfer.from_tcp,
            to_watcher = transfer.to_tcp,
            "Watcher connection done"
        );
    });
    (Some(outcome.media), result.map_err(Into::into))
}

fn log_media(media: &MediaStats) {
    if media.packets == 0 {
        return;
    }
    let kbps = media.bitrate.map_or(0.0, |b| b / 1000.0);
    tracing::info!(
        packets = media.packets,
        frames = media.frames,
        lost = media.lost,
        fps = media.fps.map(|f| (f * 10.0).round() / 10.0),
        kbit_s = kbps.round(),
        jitter_ms = (media.jitter_ms * 100.0).round() / 100.0,
        keyframes = media.keyframes,
        keyframe_interval_ms = media.keyframe_interval.map(|d| d.as_millis() as u64),
        first_keyframe_ms = media.first_keyframe_after.map(|d| d.as_millis() as u64),
        stalls = media.stalls,
        "media of the Watcher session"
    );
}

/// Counts and logs why a Watcher connection failed.
fn report(registry: &Registry, e: &anyhow::Error) {
    if let Some(reason) = failure_reason(e) {
        registry
            .metrics()
            .stream_open_failures_total
            .with_label_values(&[reason])
            .inc();
    }
    log_watcher_error(e);
}

fn log_watcher_error(e: &anyhow::Error) {
    let refused = e
        .downcast_ref::<io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<StreamRefused>());
    match refused {
        Some(refused) => tracing::warn!("Watcher connection closed: {refused}"),
        None if is_expected_end(e) => tracing::debug!("Watcher connection ended: {e:#}"),
        None => tracing::warn!("Watcher connection failed: {e:#}"),
    }
}

/// Why a Watcher connection never reached the camera, as a metric label; `None` for
/// the ends of connections that did.
fn failure_reason(e: &anyhow::Error) -> Option<&'static str> {
    if let Some(unreached) = e.downcast_ref::<Unreached>() {
        return Some(match unreached {
            Unreached::StreamLimit(_) => "stream_limit",
            Unreached::NoTunnel(_) | Unreached::NoStream => "no_tunnel",
        });
    }
    let inner = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref())?;
    if inner.is::<AgentSilent>() {
        return Some("agent_timeout");
    }
    let refused = inner.downcast_ref::<StreamRefused>()?;
    Some(match refused.0 {
        StreamStatus::Refused(_) => "camera_refused",
        StreamStatus::TimedOut(_) => "camera_timeout",
        StreamStatus::NotAllowed(_) => "not_allowed",
        StreamStatus::Failed(_) | StreamStatus::Connected => "agent_failed",
    })
}

/// Peers going away is the normal end of a stream, not an error worth a warning.
fn is_expected_end(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>().is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        )
    })
}

/// Counts a Watcher connection as active while alive.
struct ActiveStream<'a> {
    session: &'a AgentSession,
    count: u32,
}

impl<'a> ActiveStream<'a> {
    fn enter(session: &'a AgentSession) -> Self {
        let count = session.active_streams.fetch_add(1, Ordering::Relaxed) + 1;
        session.metrics.sessions.inc();
        session.metrics.sessions_total.inc();
        ActiveStream { session, count }
    }
}

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.session.active_streams.fetch_sub(1, Ordering::Relaxed);
        self.session.metrics.sessions.dec();
    }
}

/// Why a Watcher connection never reached the camera, on the relay's side.
#[derive(Debug, thiserror::Error)]
enum Unreached {
    #[error("refused: camera already has {0} Watcher connections (limits.max_streams_per_camera)")]
    StreamLimit(u32),
    #[error("the camera's tunnel did not come up within {0:?}")]
    NoTunnel(Duration),
    #[error("no stream could be opened on the tunnel in time")]
    NoStream,
}

/// The agent did not answer a stream's header in time.
#[derive(Debug, thiserror::Error)]
#[error("the agent did not say in time whether it reached the camera (limits.stream_answer_timeout_secs)")]
struct AgentSilent;

/// The agent said no to a stream.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StreamRefused(StreamStatus);

/// Reads the agent's [`StreamStatus`] off the front of a stream, then passes the payload
/// through untouched. A refusal surfaces as a `ConnectionRefused` read error, which
/// makes the splice reset the Watcher's connection at once.
struct StatusGate<R> {
    inner: R,
    /// The status frame read so far; `None` once it was read and was `Connected`.
    pending: Option<Vec<u8>>,
    /// When the agent must have answered by; a stuck agent must not hold the Watcher.
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<R> StatusGate<R> {
    fn new(inner: R, wait: Duration) -> Self {
        StatusGate {
            inner,
            pending: Some(Vec::with_capacity(16)),
            deadline: Box::pin(tokio::time::sleep(wait)),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for StatusGate<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while let Some(pending) = &mut this.pending {
            match decode_frame_prefix::<StreamStatus>(pending) {
                Err(e) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
                Ok(Some((StreamStatus::Connected, _))) => this.pending = None,
                Ok(Some((status, _))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        StreamRefused(status),
                    )))
                }
                Ok(None) => {
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            AgentSilent,
                        )));
                    }
                    // Read only up to the end of the frame, so no payload byte is taken.
                    let want = match pending.get(..2) {
                        Some(len) => 2 + usize::from(u16::from_be_bytes([len[0], len[1]])),
                        None => 2,
                    };
                    let mut chunk = [0u8; 256];
                    let take = (want - pending.len()).min(chunk.len());
                    let mut chunk_buf = ReadBuf::new(&mut chunk[..take]);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf))?;
                    if chunk_buf.filled().is_empty() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the agent closed the stream before answering",
                        )));
                    }
                    pending.extend_from_slice(chunk_buf.filled());
                }
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::protocol::write_frame;
    use tokio::io::AsyncReadExt;

    async fn gate(status: StreamStatus, payload: &[u8]) -> io::Result<Vec<u8>> {
        let mut wire = Vec::new();
        write_frame(&mut wire, &status).await.unwrap();
        wire.extend_from_slice(payload);
        // One byte at a time: the gate must cope with any split.
        let (mut tx, rx) = tokio::io::duplex(1);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = tx.write_all(&wire).await;
        });
        let mut out = Vec::new();
        StatusGate::new(rx, Duration::from_secs(60))
            .read_to_end(&mut out)
            .await?;
        Ok(out)
    }

    #[tokio::test]
    async fn passes_payload_after_connected() {
        assert_eq!(
            gate(StreamStatus::Connected, b"RTSP/1.0 200 OK")
                .await
                .unwrap(),
            b"RTSP/1.0 200 OK"
        );
        assert_eq!(gate(StreamStatus::Connected, b"").await.unwrap(), b"");
    }

    #[tokio::test]
    async fn refusals_are_errors_that_say_why() {
        let e = gate(
            StreamStatus::Refused("connection refused (127.0.0.1:554)".into()),
            b"",
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("127.0.0.1:554"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_never_answers_times_out() {
        let (_tx, rx) = tokio::io::duplex(8);
        let e = StatusGate::new(rx, Duration::from_secs(10))
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            e.to_string().contains("limits.stream_answer_timeout_secs"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_stream_closed_before_the_status_is_an_error() {
        let (tx, rx) = tokio::io::duplex(8);
        drop(tx);
        let e = StatusGate::new(rx, Duration::from_secs(60))
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
