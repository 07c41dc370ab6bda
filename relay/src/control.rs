//! The control link: agents connect with a WebSocket (`/tunnel`, or `/agent/{id}` as
//! the older server had it), register, and send heartbeats.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::{
        ws::{Message, WebSocket, WebSocketUpgrade},
        ConnectInfo, Path, State,
    },
    response::{IntoResponse, Response},
    routing::get,
    Extension, Router,
};
use common::protocol::{
    decode_control, encode_control, peek_register_version, AgentMessage, CloseReason,
    CommandOutput, GrantedService, Register, Registered, Rejection, RelayMessage,
    CONTROL_READ_BUFFER, FALLBACK_PATH_SUFFIX, FEATURE_REDIRECT, FEATURE_UPDATE,
    MAX_CONTROL_MESSAGE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SERVICE_RTSP,
};
use tokio::{sync::oneshot, time::Instant};
use tracing::Instrument;

use crate::{
    admission::Verdict, api, data, events::EventKind, forward, http::ClientCertificate,
    registry::AgentSession, Shared,
};

/// Longest wait for one control message to be written to a slow agent.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Routes of the relay's TCP listener: the agents' control link, `/health`, `/metrics`
/// (open if `public_metrics`, else for operators) and the operator API.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let open = Router::new()
        .route("/tunnel", get(upgrade))
        .route("/agent/{id}", get(upgrade_as))
        .route(
            &format!("/tunnel{FALLBACK_PATH_SUFFIX}"),
            get(data::fallback),
        )
        .route(
            &format!("/agent/{{id}}{FALLBACK_PATH_SUFFIX}"),
            get(data::fallback),
        )
        .route("/health", get(api::health))
        .merge(crate::console::router());
    let metrics = Router::new().route("/metrics", get(api::metrics));
    let app = if shared.api.public_metrics {
        open.merge(metrics).merge(api::router(shared.clone()))
    } else {
        let guarded = metrics.route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            api::require_operator,
        ));
        open.merge(guarded).merge(api::router(shared.clone()))
    };
    app.with_state(shared)
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(cert): Extension<ClientCertificate>,
    State(shared): State<Arc<Shared>>,
) -> Response {
    accept(ws, Caller { peer, cert }, shared, None)
}

async fn upgrade_as(
    ws: WebSocketUpgrade,
    Path(id): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(cert): Extension<ClientCertificate>,
    State(shared): State<Arc<Shared>>,
) -> Response {
    accept(ws, Caller { peer, cert }, shared, Some(id))
}

/// Who is on the other end of a control connection.
#[derive(Debug, Clone)]
struct Caller {
    peer: SocketAddr,
    /// Its verified client certificate's common name, if it presented one.
    cert: ClientCertificate,
}

fn accept(
    ws: WebSocketUpgrade,
    caller: Caller,
    shared: Arc<Shared>,
    path_id: Option<String>,
) -> Response {
    let peer = caller.peer;
    let span = tracing::info_span!("agent", %peer, id = tracing::field::Empty);
    let tracker = shared.tracker.clone();
    ws.max_message_size(MAX_CONTROL_MESSAGE)
        .max_frame_size(MAX_CONTROL_MESSAGE)
        .read_buffer_size(CONTROL_READ_BUFFER)
        // Every message is flushed at once anyway.
        .write_buffer_size(0)
        .on_upgrade(move |socket| {
            tracker.track_future(serve(socket, caller, shared, path_id).instrument(span))
        })
        .into_response()
}

/// One control connection, from `Register` to its end.
async fn serve(
    mut socket: WebSocket,
    caller: Caller,
    shared: Arc<Shared>,
    path_id: Option<String>,
) {
    let Caller { peer, cert } = caller;
    let limits = &shared.limits;
    let first =
        match tokio::time::timeout(limits.registration_timeout, next_binary(&mut socket)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(why)) => {
                tracing::warn!("control connection dropped before registering: {why}");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    "no Register within {:?} (limits.registration_timeout_secs); closing",
                    limits.registration_timeout
                );
                return;
            }
        };
    let register = match decode_control::<AgentMessage>(&first) {
        Ok(AgentMessage::Register(register)) => register,
        Ok(_) => {
            let rejection = Rejection::Invalid("the first message must be Register".into());
            return refuse_counted(&shared, &mut socket, rejection).await;
        }
        Err(e) => match peek_register_version(&first) {
            Some(agent) if agent != PROTOCOL_VERSION => {
                let rejection = Rejection::UnsupportedVersion {
                    agent,
                    min: MIN_PROTOCOL_VERSION,
                    max: PROTOCOL_VERSION,
                };
                return refuse_counted(&shared, &mut socket, rejection).await;
            }
            _ => {
                tracing::warn!("dropping control connection: undecodable first message: {e}");
                return;
            }
        },
    };
    shared
        .registry
        .metrics()
        .control_messages_total
        .with_label_values(&["register"])
        .inc();
    tracing::Span::current().record("id", register.agent_id.as_str());
    if let Some(path_id) = path_id.filter(|id| *id != register.agent_id) {
        let why = format!(
            "the control URL names agent {path_id:?} but agent.agent_id is {:?}; end \
             agent.tunnel_server_url in /tunnel, or in /agent (the agent adds its own id)",
            register.agent_id
        );
        return refuse_counted(&shared, &mut socket, Rejection::Invalid(why)).await;
    }

    if let Err(wait) = shared.throttle.check(peer.ip(), std::time::Instant::now()) {
        let rejection = Rejection::RetryLater {
            secs: wait.as_secs_f64().ceil() as u32,
            why: "too many failed registrations from this address (limits.failed_registrations)"
                .into(),
        };
        return refuse_counted(&shared, &mut socket, rejection).await;
    }
    let verdict = shared
        .admission
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .check(&register.agent_id, std::time::Instant::now());
    if let Verdict::Later(wait) = verdict {
        let rejection = Rejection::RetryLater {
            secs: wait.as_secs_f64().ceil() as u32,
            why: format!(
                "the relay admits {} registrations a second (limits.registrations_per_sec) and \
                 keeps this camera a place",
                limits.registrations_per_sec
            ),
        };
        return refuse_counted(&shared, &mut socket, rejection).await;
    }
    if let Some(balance) = &shared.balance {
        if let Some(to) = balance.redirect_for(&register.agent_id) {
            if let Err(rejection) = shared
                .registry
                .check_credentials(&register, cert.0.as_deref())
                .await
            {
                return refuse_counted(&shared, &mut socket, rejection).await;
            }
            if register.services.iter().any(|s| s.name == FEATURE_REDIRECT) {
                count_registration(&shared, "redirected");
                tracing::info!(relay = %to.relay, url = %to.url, "registration sent to another relay: {}", to.reason);
                let _ = send(&mut socket, &RelayMessage::Redirect(to)).await;
                let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(None))).await;
                return;
            }
            if balance.state(&shared.registry).draining {
                // An agent that cannot follow a redirect tries again by itself.
                let rejection = Rejection::RetryLater {
                    secs: 30,
                    why: format!(
                        "the relay is draining for maintenance; relay {} takes cameras",
                        to.relay
                    ),
                };
                return refuse_counted(&shared, &mut socket, rejection).await;
            }
        }
    }
    let admitted = shared
        .registry
        .admit(&register, cert.0.as_deref(), peer, limits, &shared.shutdown)
        .await;
    let (session, listener) = match admitted {
        Ok(admitted) => {
            shared.throttle.succeeded(peer.ip());
            count_registration(&shared, "accepted");
            admitted
        }
        Err(rejection) => {
            let credentials = matches!(
                rejection,
                Rejection::BadToken
                    | Rejection::UnknownAgent(_)
                    | Rejection::CertificateRequired
                    | Rejection::CertificateMismatch(_)
            );
            if credentials {
                if let Some(wait) = shared.throttle.failed(peer.ip(), std::time::Instant::now()) {
                    tracing::warn!(
                        "{} failed registrations in a row from {}: it must wait {wait:?} before the next (limits.failed_registrations)",
                        limits.failed_registrations,
                        peer.ip()
                    );
                }
            }
            return refuse_counted(&shared, &mut socket, rejection).await;
        }
    };
    let shard = session.seat(shared.shards.seat());
    let listener_task = match forward::open_camera_port(
        shard,
        listener,
        session.clone(),
        shared.registry.clone(),
        limits.clone(),
        shared.tracker.clone(),
    ) {
        Ok(task) => task,
        Err(e) => {
            tracing::error!("cannot hand the camera's port to its data-plane thread: {e}");
            shared.registry.remove(&session).await;
            return;
        }
    };
    session.set_listener(listener_task);

    let end = match send(&mut socket, &registered(&shared, &session, shard.port)).await {
        Ok(()) => {
            log_registered(&register, &session);
            shared.registry.events().emit(
                &session.id,
                EventKind::Online {
                    port: session.port,
                    remote: peer.to_string(),
                    agent_version: register.agent_version.clone(),
                    model: register.camera.model.clone(),
                    stream_paths: register.camera.stream_paths.clone(),
                },
            );
            shared.updates.online();
            run_session(&mut socket, &session, &shared).await
        }
        Err(why) => End::Lost(why),
    };
    match &end {
        End::Closed(reason) => match session.moved_to() {
            Some(to) => {
                tracing::info!(relay = %to.relay, url = %to.url, "sending the agent to another relay: {}", to.reason);
                let _ = send(&mut socket, &RelayMessage::Redirect(to)).await;
            }
            None => {
                tracing::info!("closing the agent's session: {reason}");
                let _ = send(&mut socket, &RelayMessage::Closing(reason.clone())).await;
            }
        },
        End::Lost(why) => tracing::info!("agent offline: {why}"),
        End::Violation(why) => tracing::warn!("dropping agent connection: {why}"),
    }
    let (reason, detail) = end.describe(&session);
    shared.registry.events().emit(
        &session.id,
        EventKind::Offline {
            reason,
            detail,
            online_secs: session.registered_at.elapsed().map_or(0, |d| d.as_secs()),
        },
    );
    shared.updates.offline(&session);
    shared.registry.remove(&session).await;
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(None))).await;
}

/// The answer to a registration; `quic_port` is the camera's data-plane shard's.
fn registered(shared: &Shared, session: &AgentSession, quic_port: u16) -> RelayMessage {
    let mut granted = vec![GrantedService {
        name: SERVICE_RTSP.into(),
        port: session.port,
    }];
    if session.takes_updates {
        // After the camera port: earlier agents read the first entry only.
        granted.push(GrantedService {
            name: FEATURE_UPDATE.into(),
            port: 0,
        });
    }
    RelayMessage::Registered(Registered {
        session_key: session.session_key(),
        quic_port,
        cert_sha256: shared.cert_sha256,
        granted,
    })
}

fn log_registered(register: &Register, session: &AgentSession) {
    tracing::info!(
        port = session.port,
        shard = session.shard().map(|s| s.index),
        model = %register.camera.model,
        agent_version = %register.agent_version,
        heartbeat_secs = session.heartbeat_interval.as_secs_f64(),
        "agent registered"
    );
}

/// How a registered session ended.
enum End {
    /// The relay ended it (takeover, missed heartbeats, shutdown): tell the agent.
    Closed(CloseReason),
    /// The agent went away.
    Lost(String),
    /// The agent broke the protocol.
    Violation(String),
}

impl End {
    /// The `camera.offline` reason (a stable word) and its words.
    fn describe(&self, session: &AgentSession) -> (&'static str, String) {
        match self {
            End::Closed(_) if session.moved_to().is_some() => {
                let to = session.moved_to().map(|to| to.relay).unwrap_or_default();
                ("moved", format!("sent to relay {to}"))
            }
            End::Closed(reason) => {
                let word = match reason {
                    CloseReason::Replaced(_) => "replaced",
                    CloseReason::HeartbeatTimeout(_) => "heartbeat_timeout",
                    CloseReason::Shutdown => "shutdown",
                };
                (word, reason.to_string())
            }
            End::Lost(why) => ("lost", why.clone()),
            End::Violation(why) => ("protocol_error", why.clone()),
        }
    }
}

async fn run_session(socket: &mut WebSocket, session: &AgentSession, shared: &Shared) -> End {
    let metrics = shared.registry.metrics();
    let timeout = session.heartbeat_interval * shared.limits.missed_heartbeats;
    let mut offers = session.offers();
    // Update chunks asked for and not sent yet, paced by updates.max_rate.
    let mut fetches: VecDeque<(u64, u64, u32)> = VecDeque::new();
    let mut pace = Pace::new(shared.updates.max_rate());
    let mut deadline = Instant::now() + timeout;
    let Some(mut inbox) = session.take_command_inbox() else {
        return End::Violation("the session's control loop ran twice".into());
    };
    // Commands sent and not answered yet; a dropped sender means the asker gave up.
    let mut pending: HashMap<u64, oneshot::Sender<Result<CommandOutput, String>>> = HashMap::new();
    let mut next_id: u64 = 1;
    loop {
        let message = tokio::select! {
            _ = session.cancelled() => {
                // Cancelled with no reason recorded: the relay's root token, i.e. shutdown.
                return End::Closed(session.close_reason().unwrap_or(CloseReason::Shutdown));
            }
            _ = tokio::time::sleep_until(deadline) => {
                return End::Closed(CloseReason::HeartbeatTimeout(timeout.as_secs()));
            }
            () = pace.ready(), if !fetches.is_empty() => {
                let Some((id, offset, len)) = fetches.pop_front() else { continue };
                // Nothing (an empty chunk) for an update no longer offered: the agent
                // stops and resumes when it is offered again.
                let data = shared.updates.fetch(&session.id, id, offset, len).unwrap_or_default();
                pace.sent(data.len());
                if let Err(why) = send(socket, &RelayMessage::UpdateChunk { id, offset, data }).await {
                    return End::Lost(why);
                }
                continue;
            }
            Ok(()) = offers.changed() => {
                let offer = offers.borrow_and_update().clone();
                if let Some(offer) = offer {
                    tracing::info!(id = offer.id, release = %offer.release.describe(), "update offered to the agent");
                    if let Err(why) = send(socket, &RelayMessage::UpdateOffer(offer)).await {
                        return End::Lost(why);
                    }
                }
                continue;
            }
            Some(request) = inbox.recv() => {
                let id = next_id;
                next_id += 1;
                pending.retain(|_, reply| !reply.is_closed());
                pending.insert(id, request.reply);
                tracing::info!(id, command = ?request.command, "command sent to the agent");
                if let Err(why) = send(socket, &RelayMessage::Command { id, command: request.command }).await {
                    return End::Lost(why);
                }
                continue;
            }
            message = next_binary(socket) => message,
        };
        let bytes = match message {
            Ok(bytes) => bytes,
            Err(Disconnect::Closed(why)) => return End::Lost(why),
            Err(Disconnect::Garbage(why)) => return End::Violation(why),
        };
        let decoded = decode_control::<AgentMessage>(&bytes);
        let kind = match &decoded {
            Ok(AgentMessage::Heartbeat(_)) => "heartbeat",
            Ok(AgentMessage::CommandResult { .. }) => "command_result",
            Ok(AgentMessage::Register(_)) => "register",
            Ok(AgentMessage::UpdateFetch { .. }) => "update_fetch",
            Ok(AgentMessage::UpdateReport { .. }) => "update_report",
            Err(_) => "undecodable",
        };
        metrics
            .control_messages_total
            .with_label_values(&[kind])
            .inc();
        match decoded {
            Ok(AgentMessage::Heartbeat(stats)) => {
                session.heartbeat(stats);
                deadline = Instant::now() + timeout;
                if let Err(why) = send(socket, &RelayMessage::HeartbeatAck).await {
                    return End::Lost(why);
                }
            }
            Ok(AgentMessage::CommandResult { id, result }) => match pending.remove(&id) {
                Some(reply) => {
                    tracing::info!(id, ok = result.is_ok(), "command answered");
                    let _ = reply.send(result);
                }
                None => tracing::debug!(id, "result for a command nobody waits for"),
            },
            Ok(AgentMessage::UpdateFetch { id, offset, len }) => {
                if fetches.len() >= MAX_QUEUED_FETCHES {
                    return End::Violation(format!(
                        "more than {MAX_QUEUED_FETCHES} update chunks asked for at once"
                    ));
                }
                fetches.push_back((id, offset, len));
            }
            Ok(AgentMessage::UpdateReport { id, progress }) => {
                tracing::info!(id, ?progress, "update report");
                shared.updates.report(&session.id, id, progress);
            }
            Ok(AgentMessage::Register(_)) => return End::Violation("Register sent twice".into()),
            Err(e) => return End::Violation(format!("undecodable control message: {e}")),
        }
    }
}

/// Update chunks an agent may ask for before it has the earlier ones (it keeps 4).
const MAX_QUEUED_FETCHES: usize = 16;

/// Paces one agent's update chunks to `updates.max_rate_kbps`, if set.
struct Pace {
    /// Bytes a second; `None`: as fast as asked.
    rate: Option<u64>,
    next: Instant,
}

impl Pace {
    fn new(rate: Option<u64>) -> Pace {
        Pace {
            rate,
            next: Instant::now(),
        }
    }

    /// Resolves when the next chunk may go.
    async fn ready(&self) {
        tokio::time::sleep_until(self.next).await;
    }

    /// `bytes` went out.
    fn sent(&mut self, bytes: usize) {
        if let Some(rate) = self.rate {
            let now = Instant::now();
            self.next = self.next.max(now) + Duration::from_secs_f64(bytes as f64 / rate as f64);
        }
    }
}

/// Why no message could be read.
enum Disconnect {
    /// The connection ended.
    Closed(String),
    /// The peer sent something that is not our protocol.
    Garbage(String),
}

impl std::fmt::Display for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disconnect::Closed(why) | Disconnect::Garbage(why) => f.write_str(why),
        }
    }
}

/// The next binary message; pings are answered by the WebSocket layer itself.
async fn next_binary(socket: &mut WebSocket) -> Result<axum::body::Bytes, Disconnect> {
    loop {
        match socket.recv().await {
            Some(Ok(Message::Binary(bytes))) => return Ok(bytes),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                return Err(Disconnect::Garbage(
                    "text message on the control link".into(),
                ))
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(Disconnect::Closed("connection closed".into()))
            }
            Some(Err(e)) => return Err(classify(e)),
        }
    }
}

/// A peer that vanished is an ordinary end; oversized frames and broken framing are not.
fn classify(e: axum::Error) -> Disconnect {
    use tokio_tungstenite::tungstenite::{error::ProtocolError, Error};
    let inner = e.into_inner();
    match inner.downcast_ref::<Error>() {
        Some(Error::ConnectionClosed | Error::AlreadyClosed | Error::Io(_))
        | Some(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
            Disconnect::Closed(format!("connection lost: {inner}"))
        }
        _ => Disconnect::Garbage(format!("WebSocket error: {inner}")),
    }
}

async fn send(socket: &mut WebSocket, msg: &RelayMessage) -> Result<(), String> {
    let bytes = encode_control(msg).map_err(|e| e.to_string())?;
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Binary(bytes.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("send failed: {e}")),
        Err(_) => Err(format!("send blocked for {SEND_TIMEOUT:?}")),
    }
}

async fn refuse_counted(shared: &Shared, socket: &mut WebSocket, rejection: Rejection) {
    count_registration(shared, rejection_label(&rejection));
    refuse(socket, rejection).await;
}

/// Counts a registration's result (a bounded set of labels).
fn count_registration(shared: &Shared, result: &str) {
    shared
        .registry
        .metrics()
        .registrations_total
        .with_label_values(&[result])
        .inc();
}

/// The metric label of a refusal.
fn rejection_label(rejection: &Rejection) -> &'static str {
    match rejection {
        Rejection::BadToken => "bad_token",
        Rejection::UnknownAgent(_) => "unknown_agent",
        Rejection::UnsupportedVersion { .. } => "unsupported_version",
        Rejection::PortTaken { .. }
        | Rejection::PortNotAllowed { .. }
        | Rejection::NoFreePort { .. } => "port",
        Rejection::Invalid(_) => "invalid",
        Rejection::CertificateRequired | Rejection::CertificateMismatch(_) => "certificate",
        Rejection::RetryLater { .. } => "retry_later",
    }
}

async fn refuse(socket: &mut WebSocket, rejection: Rejection) {
    match &rejection {
        // The wait itself was logged when it was imposed; an agent honouring it comes
        // back rarely, one that does not must not flood the log.
        Rejection::RetryLater { .. } => tracing::debug!("registration refused: {rejection}"),
        _ => tracing::warn!("registration refused: {rejection}"),
    }
    let _ = send(socket, &RelayMessage::Rejected(rejection)).await;
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(None))).await;
}
