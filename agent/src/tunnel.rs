//! The agent's data plane: the QUIC tunnel to the relay, or, when UDP is blocked, the
//! TCP fallback link ([`common::mux`]); either way every stream the relay opens is
//! connected to the camera.
//!
//! A session first tries QUIC for [`QUIC_FIRST_TRY`]. If that fails it carries the
//! streams over the fallback and re-probes QUIC with backoff; once QUIC works, new
//! streams take it and the fallback closes when its last stream ends. A data plane that
//! is lost while the session lives ([`Ended::Lost`]) is dialed again the same way.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use common::{
    backoff::Backoff,
    mux::{self, AgentEnd, WsBytes},
    protocol::{
        read_frame, tunnel_close, write_frame, DataHello, HelloReply, StreamOpen, StreamStatus,
        SERVICE_RTSP,
    },
    splice::splice,
    stream::{RecvHalf, SendHalf},
    tls,
};
use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::watch};
use tokio_tungstenite::{tungstenite::protocol::WebSocketConfig, MaybeTlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    config::AgentConfig,
    control::{self, Registration},
    stats::Stats,
    AgentState, DataLink, SessionError,
};

/// How long a session's first QUIC attempt may take before the agent falls back to
/// TCP: where UDP is blocked, Watchers must not wait out a whole connection timeout.
/// (Later probes get `network.connection_timeout`.)
const QUIC_FIRST_TRY: Duration = Duration::from_secs(3);

/// Longest wait for the TCP fallback link to close politely.
const LINK_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// First wait before QUIC is probed again from the fallback; it doubles up to
/// `network.reconnect_interval`.
const PROBE_BASE: Duration = Duration::from_secs(2);

/// First wait before a data plane lost mid-session is dialed again; it doubles up to
/// `network.reconnect_interval`.
const REDIAL_BASE: Duration = Duration::from_millis(500);

/// A data plane that lasted this long before it was lost counts as having worked: the
/// next redial starts again from [`REDIAL_BASE`].
const STABLE_DATA_PLANE: Duration = Duration::from_secs(30);

/// Time the relay has to send a stream's header after opening it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A live tunnel to the relay; closed when dropped.
#[derive(Debug)]
pub(crate) struct Tunnel {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// Dials the relay's QUIC endpoint named in `registered` and proves the registration,
/// all within `timeout`.
async fn dial(
    config: &AgentConfig,
    registered: &Registration,
    timeout: Duration,
) -> Result<Tunnel, SessionError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| SessionError::Tunnel(format!("{what}: {e}"));
    let Registration {
        registered,
        reached,
    } = registered;
    // The address that answered the control link, not any other the name has.
    let relay = SocketAddr::new(reached.addr.ip(), registered.quic_port);
    // A fresh UDP socket per session: after a network change the old port may be dead.
    let local: SocketAddr = match relay {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint =
        quinn::Endpoint::client(local).map_err(|e| fail("cannot open a UDP socket", &e))?;
    let client = tls::quic_client_config(
        registered.cert_sha256,
        config.security.identity.as_deref(),
        config.max_streams,
        config.quic_keepalive,
    )
    .map_err(|e| fail("TLS setup", &e))?;
    endpoint.set_default_client_config(client);

    let handshake = async {
        let conn = endpoint
            .connect(relay, &reached.relay.host)
            .map_err(|e| fail(&format!("cannot dial {relay}"), &e))?
            .await
            .map_err(|e| fail(&format!("QUIC handshake with {relay} failed"), &e))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| fail("cannot open the hello stream", &e))?;
        let hello = DataHello {
            agent_id: config.agent_id.clone(),
            session_key: registered.session_key,
        };
        write_frame(&mut send, &hello)
            .await
            .map_err(|e| fail("hello", &e))?;
        let _ = send.finish();
        match read_frame(&mut recv)
            .await
            .map_err(|e| fail("hello reply", &e))?
        {
            HelloReply::Accepted => Ok(conn),
            HelloReply::Refused(why) => Err(SessionError::Tunnel(format!(
                "the relay refused the tunnel: {why}"
            ))),
        }
    };
    let conn = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            SessionError::Tunnel(format!(
                "no QUIC tunnel to {relay} within {timeout:?}; is UDP port {} reachable?",
                registered.quic_port
            ))
        })??;
    Ok(Tunnel { endpoint, conn })
}

/// How a data plane ended.
#[derive(Debug)]
enum Ended {
    /// Its link failed or was restarted: if the session's control link still stands,
    /// the session goes on and dials a data plane again.
    Lost(SessionError),
    /// The session is over: the relay ended it (its reason follows on the control
    /// link), or the agent did.
    Over(SessionError),
}

impl Tunnel {
    /// Serves the relay's streams until the tunnel ends; returns how it ended.
    async fn serve(
        &self,
        config: &Arc<AgentConfig>,
        stats: &Arc<Stats>,
        tracker: &TaskTracker,
    ) -> Ended {
        loop {
            let (send, recv) = match self.conn.accept_bi().await {
                Ok(stream) => stream,
                Err(e) => {
                    let why = SessionError::Lost(format!("tunnel closed: {e}"));
                    return match e {
                        quinn::ConnectionError::ApplicationClosed(close)
                            if !tunnel_close::session_goes_on(close.error_code.into_inner()) =>
                        {
                            Ended::Over(why)
                        }
                        quinn::ConnectionError::LocallyClosed => Ended::Over(why),
                        // Timed out (the path died, or UDP is blocked now), reset, or
                        // restarted by an operator.
                        _ => Ended::Lost(why),
                    };
                }
            };
            let span = tracing::info_span!("stream", id = %send.id(), conn = tracing::field::Empty);
            let (send, recv) = (SendHalf::Quic(send), RecvHalf::Quic(recv));
            spawn_stream(tracker, span, send, recv, config, stats);
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.conn
            .close(quinn::VarInt::from_u32(0), b"agent closing");
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"agent closing");
    }
}

/// The TCP fallback link, hello done.
#[derive(Debug)]
pub(crate) struct Fallback {
    end: AgentEnd<MaybeTlsStream<TcpStream>>,
}

/// Opens the TCP fallback link (a WebSocket to the control URL plus `/data`) and
/// proves the registration on it, all within `network.connection_timeout`.
async fn dial_fallback(
    config: &AgentConfig,
    registered: &Registration,
) -> Result<Fallback, SessionError> {
    let reached = &registered.reached;
    let url = reached.relay.fallback_url();
    let fail = |e: &dyn std::fmt::Display| {
        SessionError::Tunnel(format!("TCP fallback link to {url}: {e}"))
    };
    let attempt = async {
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(mux::MAX_MESSAGE))
            .max_frame_size(Some(mux::MAX_MESSAGE))
            .read_buffer_size(mux::READ_BUFFER);
        let socket = control::open(config, reached, &url, ws_config)
            .await
            .map_err(|e| fail(&e))?;
        let mut link = WsBytes::new(socket);
        let hello = DataHello {
            agent_id: config.agent_id.clone(),
            session_key: registered.registered.session_key,
        };
        write_frame(&mut link, &hello).await.map_err(|e| fail(&e))?;
        link.flush().await.map_err(|e| fail(&e))?;
        match read_frame(&mut link).await.map_err(|e| fail(&e))? {
            HelloReply::Accepted => Ok(Fallback {
                end: AgentEnd::new(link),
            }),
            HelloReply::Refused(why) => Err(fail(&format!("the relay refused it: {why}"))),
        }
    };
    tokio::time::timeout(config.connection_timeout, attempt)
        .await
        .map_err(|_| fail(&format!("no answer within {:?}", config.connection_timeout)))?
}

impl Fallback {
    /// Serves the relay's streams until the link ends, or `stop`, or (once `drain` is
    /// cancelled) its last stream ends; returns how it ended.
    async fn serve(
        mut self,
        config: Arc<AgentConfig>,
        stats: Arc<Stats>,
        drain: CancellationToken,
        stop: CancellationToken,
    ) -> Ended {
        let streams = TaskTracker::new();
        let drained = async {
            drain.cancelled().await;
            streams.close();
            streams.wait().await;
        };
        tokio::pin!(drained);
        let ended = loop {
            tokio::select! {
                next = self.end.accept() => match next {
                    Some(Ok((send, recv))) => {
                        let span = tracing::info_span!("stream", link = "tcp", conn = tracing::field::Empty);
                        spawn_stream(&streams, span, send, recv, &config, &stats);
                    }
                    Some(Err(e)) => break Ended::Lost(SessionError::Lost(format!("TCP fallback link failed: {e}"))),
                    // The relay closes it when the session ends.
                    None => break Ended::Over(SessionError::Lost("the relay closed the TCP fallback link".into())),
                },
                _ = &mut drained => {
                    tracing::info!("TCP fallback link closed: its last stream ended and QUIC carries new ones");
                    break Ended::Over(SessionError::Lost("TCP fallback link drained".into()));
                }
                _ = stop.cancelled() => break Ended::Over(SessionError::Lost("session ended".into())),
            }
        };
        // Bounded: on a link that died silently the close could wait on TCP for minutes.
        let _ = tokio::time::timeout(LINK_CLOSE_WAIT, self.end.close()).await;
        ended
    }
}

/// Which link carries the session's new streams, for the agent's state and commands.
#[derive(Debug)]
pub(crate) struct Published<'a> {
    pub(crate) state: &'a watch::Sender<AgentState>,
    pub(crate) port: u16,
    /// The QUIC connection while it carries new streams, for its round-trip time.
    pub(crate) quic: &'a Mutex<Option<quinn::Connection>>,
}

impl Published<'_> {
    fn link(&self, link: DataLink, quic: Option<&quinn::Connection>) {
        *self.quic.lock().unwrap_or_else(|e| e.into_inner()) = quic.cloned();
        self.state.send_replace(AgentState::Online {
            port: self.port,
            link,
        });
    }
}

/// The session's data plane, connected.
#[derive(Debug)]
enum Plane {
    Quic(Tunnel),
    /// Boxed: a yamux connection is large, and moved around once.
    Fallback(Box<Fallback>),
}

/// Connects the data plane: QUIC if it comes up within [`QUIC_FIRST_TRY`], else the
/// TCP fallback.
async fn connect(config: &AgentConfig, registered: &Registration) -> Result<Plane, SessionError> {
    let quic = match dial(
        config,
        registered,
        QUIC_FIRST_TRY.min(config.connection_timeout),
    )
    .await
    {
        Ok(tunnel) => return Ok(Plane::Quic(tunnel)),
        Err(e) => e,
    };
    match dial_fallback(config, registered).await {
        Ok(fallback) => {
            tracing::warn!(
                "{quic}; carrying the camera's streams over the TCP link instead, and trying \
                 QUIC again from time to time"
            );
            Ok(Plane::Fallback(Box::new(fallback)))
        }
        Err(tcp) => Err(SessionError::Tunnel(format!("{quic}; {tcp}"))),
    }
}

impl Plane {
    /// Serves the relay's streams until the data plane ends; returns how. On the
    /// fallback, QUIC is re-probed with backoff and takes over new streams once it
    /// works.
    async fn serve(
        self,
        config: &Arc<AgentConfig>,
        registered: &Registration,
        stats: &Arc<Stats>,
        tracker: &TaskTracker,
        published: &Published<'_>,
    ) -> Ended {
        let fallback = match self {
            Plane::Quic(tunnel) => {
                published.link(DataLink::Quic, Some(&tunnel.conn));
                return tunnel.serve(config, stats, tracker).await;
            }
            Plane::Fallback(fallback) => fallback,
        };
        published.link(DataLink::Tcp, None);
        // The fallback closes with the session, whichever way this returns.
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let drain = CancellationToken::new();
        let mut link = tracker.spawn((*fallback).serve(
            config.clone(),
            stats.clone(),
            drain.clone(),
            stop.clone(),
        ));
        let mut backoff = Backoff::new(PROBE_BASE, config.reconnect_interval);
        let tunnel = loop {
            let wait = backoff.next_delay();
            let probe = async {
                tokio::time::sleep(wait).await;
                dial(config, registered, config.connection_timeout).await
            };
            tokio::select! {
                ended = &mut link => {
                    return ended.unwrap_or_else(|e| {
                        Ended::Lost(SessionError::Lost(format!("TCP fallback link failed: {e}")))
                    });
                }
                probed = probe => match probed {
                    Ok(tunnel) => break tunnel,
                    Err(e) => tracing::debug!("QUIC still unreachable: {e}"),
                },
            }
        };
        tracing::info!(
            rtt_ms = tunnel.conn.rtt().as_millis() as u64,
            "QUIC reaches the relay again: new streams take it; the TCP fallback closes once its streams end"
        );
        drain.cancel();
        published.link(DataLink::Quic, Some(&tunnel.conn));
        tunnel.serve(config, stats, tracker).await
    }
}

/// Runs a session's data plane: connects it, serves it, and, whenever it is lost while
/// the session lives (UDP blocked mid-session, a tunnel restarted by an operator),
/// dials it again within the session, so the camera keeps its registration and its
/// port while the relay holds new Watchers until a link is back. Calls `online` once
/// the first data plane is up; returns why the session ended.
pub(crate) async fn run(
    config: &Arc<AgentConfig>,
    registered: &Registration,
    stats: &Arc<Stats>,
    tracker: &TaskTracker,
    published: &Published<'_>,
    online: impl FnOnce(),
) -> SessionError {
    let mut plane = match connect(config, registered).await {
        Ok(plane) => plane,
        Err(e) => return e,
    };
    online();
    let port = published.port;
    tracing::info!(
        port,
        target = %config.rtsp_target,
        "online: the relay serves this camera on port {port}"
    );
    let mut backoff = Backoff::new(REDIAL_BASE, config.reconnect_interval);
    loop {
        let up = Instant::now();
        let why = match plane
            .serve(config, registered, stats, tracker, published)
            .await
        {
            Ended::Over(why) => return why,
            Ended::Lost(why) => why,
        };
        if up.elapsed() >= STABLE_DATA_PLANE {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(
            "{why}; the control link stands, so the session goes on: dialing its data plane \
             again in {:.1} s",
            delay.as_secs_f64()
        );
        tokio::time::sleep(delay).await;
        plane = match connect(config, registered).await {
            Ok(plane) => plane,
            Err(e) => return e,
        };
        stats.redials.fetch_add(1, Ordering::Relaxed);
        tracing::info!(port, "data plane up again; same session, same port");
    }
}

/// Serves one stream the relay opened, in a task of `tracker`, in `span`.
fn spawn_stream(
    tracker: &TaskTracker,
    span: tracing::Span,
    send: SendHalf,
    recv: RecvHalf,
    config: &Arc<AgentConfig>,
    stats: &Arc<Stats>,
) {
    let (config, stats) = (config.clone(), stats.clone());
    tracker.spawn(async move { stream(send, recv, &config, &stats).await }.instrument(span));
}

/// One stream: read the header, connect to the camera, answer, splice.
async fn stream(mut send: SendHalf, mut recv: RecvHalf, config: &AgentConfig, stats: &Stats) {
    let open: StreamOpen = match tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => return tracing::warn!("bad stream header from the relay: {e}"),
        Err(_) => {
            return tracing::warn!("no stream header from the relay within {HEADER_TIMEOUT:?}")
        }
    };
    tracing::Span::current().record("conn", open.connection_id);
    let target = match target_of(&open, config) {
        Ok(target) => target,
        Err(status) => {
            tracing::warn!("stream refused: {status}");
            return answer_and_finish(send, &status).await;
        }
    };
    let tcp = match tokio::time::timeout(config.connection_timeout, TcpStream::connect(target))
        .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let status = match e.kind() {
                    io::ErrorKind::ConnectionRefused => {
                        StreamStatus::Refused(format!(
                    "nothing listens on {target} ({e}); is the camera's RTSP server up, and streaming.rtsp_port right?"
                ))
                    }
                    _ => StreamStatus::Failed(format!("connecting to {target}: {e}")),
                };
            tracing::warn!("camera connection failed: {status}");
            return answer_and_finish(send, &status).await;
        }
        Err(_) => {
            let status = StreamStatus::TimedOut(format!(
                "{target} did not accept within {:?}",
                config.connection_timeout
            ));
            tracing::warn!("camera connection failed: {status}");
            return answer_and_finish(send, &status).await;
        }
    };
    // Camera traffic is paced small writes; Nagle would hold them back.
    let _ = tcp.set_nodelay(true);
    if let Err(e) = write_frame(&mut send, &StreamStatus::Connected).await {
        return tracing::debug!("relay went away before the stream started: {e}");
    }
    stats.active_streams.fetch_add(1, Ordering::Relaxed);
    let result = splice(tcp, recv, send, &stats.bytes).await;
    stats.active_streams.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(t) => tracing::debug!(
            to_camera = t.to_tcp,
            from_camera = t.from_tcp,
            "stream done"
        ),
        Err(e) => tracing::debug!("stream ended: {e}"),
    }
}

/// Where a stream goes: only to targets this agent's own config names. The relay names
/// a service, never an address, so a compromised relay cannot use the agent to reach
/// anything else on the camera's network.
fn target_of(open: &StreamOpen, config: &AgentConfig) -> Result<SocketAddr, StreamStatus> {
    if open.service == SERVICE_RTSP {
        Ok(config.rtsp_target)
    } else {
        Err(StreamStatus::NotAllowed(format!(
            "this agent offers only {SERVICE_RTSP:?} ({}), not {:?}",
            config.rtsp_target, open.service
        )))
    }
}

async fn answer_and_finish(mut send: SendHalf, status: &StreamStatus) {
    if write_frame(&mut send, status).await.is_ok() {
        // Let the status reach the relay before the stream is dropped.
        send.finish(Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_go_only_to_the_configured_camera() {
        let config = AgentConfig::parse(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "streaming": {"rtsp_port": 8554}}"#,
            "x",
        )
        .unwrap();
        let open = |service: &str| StreamOpen {
            service: service.into(),
            connection_id: 1,
        };
        assert_eq!(
            target_of(&open(SERVICE_RTSP), &config),
            Ok("127.0.0.1:8554".parse().unwrap())
        );
        for service in ["ssh", "192.168.1.1:80", ""] {
            let refusal = target_of(&open(service), &config).unwrap_err();
            assert!(
                matches!(&refusal, StreamStatus::NotAllowed(why) if why.contains("only")),
                "{refusal:?}"
            );
        }
    }
}
