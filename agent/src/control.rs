//! The agent's control link: connect the WebSocket, register, then heartbeats and
//! commands until the link ends.

use std::{sync::Arc, time::Duration};

use common::tls;

use common::protocol::{
    decode_control, encode_control, AgentMessage, CameraInfo, Command, Register, Registered,
    RelayMessage, ServiceRequest, CONTROL_READ_BUFFER, MAX_CONTROL_MESSAGE, PROTOCOL_VERSION,
    SERVICE_RTSP,
};
use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::{
    tungstenite::{protocol::WebSocketConfig, Message},
    Connector, MaybeTlsStream, WebSocketStream,
};

use crate::{config::AgentConfig, resolve::resolve, stats::Stats, Handled, SessionError};

/// Longest wait for the relay to close its end after the agent closed the control link
/// to end a session by command.
pub(crate) const POLITE_CLOSE: Duration = Duration::from_secs(2);

/// A WebSocket to the relay.
pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A registered control connection.
#[derive(Debug)]
pub(crate) struct ControlLink {
    socket: Socket,
}

/// Connects to the relay and registers; all within `network.connection_timeout`.
pub(crate) async fn connect(
    config: &AgentConfig,
) -> Result<(ControlLink, Registered), SessionError> {
    let security = &config.security;
    // Accepted by the config only with a plain ws:// URL.
    if !security.ssl_verify {
        tracing::warn!(
            "security.ssl_verify is false: development mode. The control link is plain \
             ws://, so anyone on the path can read the token and impersonate the relay; \
             the video's QUIC link pins the certificate the relay names at registration, \
             which is only as trustworthy as this link"
        );
    }
    let attempt = async {
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(MAX_CONTROL_MESSAGE))
            .max_frame_size(Some(MAX_CONTROL_MESSAGE))
            .read_buffer_size(CONTROL_READ_BUFFER)
            .write_buffer_size(0);
        let mut socket = open(config, &config.relay.url, ws_config)
            .await
            .map_err(|e| {
                SessionError::Connect(format!(
                    "cannot open the control link to {}: {e}",
                    config.relay.url
                ))
            })?;
        let register = AgentMessage::Register(Register {
            version: PROTOCOL_VERSION,
            agent_id: config.agent_id.clone(),
            token: config.token.clone(),
            camera: CameraInfo {
                model: config.camera_model.clone(),
                stream_paths: config.stream_paths.clone(),
                rtsp_port: config.rtsp_target.port(),
            },
            services: vec![ServiceRequest {
                name: SERVICE_RTSP.into(),
                port: config.tunnel_port,
            }],
            heartbeat_interval_secs: config
                .heartbeat_interval
                .as_secs()
                .clamp(1, u64::from(u32::MAX)) as u32,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        });
        send(&mut socket, &register).await?;
        match next_message(&mut socket).await? {
            RelayMessage::Registered(registered) => Ok((ControlLink { socket }, registered)),
            RelayMessage::Rejected(rejection) => Err(SessionError::Rejected(rejection)),
            other => Err(SessionError::Protocol(format!(
                "expected Registered, got {other:?}"
            ))),
        }
    };
    tokio::time::timeout(config.connection_timeout, attempt)
        .await
        .map_err(|_| {
            SessionError::Connect(format!(
                "no registration answer from {} within {:?} (network.connection_timeout)",
                config.relay.url, config.connection_timeout
            ))
        })?
}

/// A WebSocket to `url` on the relay's control port, over TLS unless it is `ws://`. The
/// error says why in words an operator can act on.
pub(crate) async fn open(
    config: &AgentConfig,
    url: &str,
    ws_config: WebSocketConfig,
) -> Result<Socket, String> {
    let security = &config.security;
    let tls = tls::client_config(&security.relay_trust, security.identity.as_deref(), b"")
        .map_err(|e| format!("TLS setup: {e}"))?;
    let tcp = dial(config).await?;
    let (socket, _response) = tokio_tungstenite::client_async_tls_with_config(
        url,
        tcp,
        Some(ws_config),
        Some(Connector::Rustls(Arc::new(tls))),
    )
    .await
    .map_err(|e| explain_connect_error(&e, &security.trust_source))?;
    Ok(socket)
}

/// A TCP connection to the relay's control port: each of its addresses in turn.
async fn dial(config: &AgentConfig) -> Result<TcpStream, String> {
    let relay = &config.relay;
    let addrs = resolve(&relay.host, relay.port, &config.fallback_nameservers).await?;
    let mut failures = Vec::new();
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                // Control messages are small and latency matters more than packing.
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    Err(format!(
        "cannot connect to the relay's control port: {}",
        failures.join("; ")
    ))
}

impl ControlLink {
    /// Sends heartbeats and answers commands (with `handle`) until the link ends;
    /// returns why it ended.
    pub(crate) async fn run(
        mut self,
        interval: Duration,
        stats: &Stats,
        handle: &(dyn Fn(Command) -> Handled + Sync),
    ) -> SessionError {
        let silence_limit = interval * 3;
        let mut last_heard = Instant::now();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                _ = ticker.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return SessionError::Lost(format!("the relay did not answer for {silence_limit:?}"));
                    }
                    if let Err(e) = send(&mut self.socket, &AgentMessage::Heartbeat(stats.snapshot())).await {
                        return e;
                    }
                    continue;
                }
                message = next_message(&mut self.socket) => message,
            };
            last_heard = Instant::now();
            let (id, handled) = match message {
                Err(e) => return e,
                Ok(RelayMessage::HeartbeatAck) => continue,
                Ok(RelayMessage::Closing(reason)) => return SessionError::Closed(reason),
                Ok(RelayMessage::Command { id, command }) => {
                    tracing::info!(id, ?command, "command from the relay");
                    (id, handle(command))
                }
                Ok(other) => return SessionError::Protocol(format!("unexpected {other:?}")),
            };
            let reply = AgentMessage::CommandResult {
                id,
                result: handled.result,
            };
            if let Err(e) = send(&mut self.socket, &reply).await {
                return e;
            }
            if let Some(end) = handled.then {
                // Close politely and wait for the relay's end of the close: it reads in
                // order, so by then it has the answer. Dropping the link at once let the
                // next session's registration overtake it, and the takeover ended this
                // session with the answer still unread ("went offline before answering").
                let _ = tokio::time::timeout(POLITE_CLOSE, async {
                    let _ = self.socket.close(None).await;
                    while let Some(Ok(_)) = self.socket.next().await {}
                })
                .await;
                return end;
            }
        }
    }
}

async fn send(socket: &mut Socket, msg: &AgentMessage) -> Result<(), SessionError> {
    let bytes = encode_control(msg).map_err(|e| SessionError::Protocol(e.to_string()))?;
    socket
        .send(Message::Binary(bytes.into()))
        .await
        .map_err(|e| SessionError::Lost(format!("control link send failed: {e}")))
}

async fn next_message(socket: &mut Socket) -> Result<RelayMessage, SessionError> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Binary(bytes))) => {
                return decode_control(&bytes).map_err(|e| {
                    SessionError::Protocol(format!("undecodable message from the relay: {e}"))
                })
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                return Err(SessionError::Protocol("text message from the relay".into()))
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(SessionError::Lost(
                    "the relay closed the control link".into(),
                ))
            }
            Some(Err(e)) => return Err(SessionError::Lost(format!("control link failed: {e}"))),
        }
    }
}

/// A connect error in words an operator can act on: certificate problems name what the
/// agent trusted, and a certificate "not valid yet" points at the camera's clock.
fn explain_connect_error(e: &tokio_tungstenite::tungstenite::Error, trust: &str) -> String {
    let text = e.to_string();
    if text.contains("NotValidYet") || text.contains("not valid yet") {
        format!("{text}: the relay's certificate is not valid yet by this camera's clock; is the camera's time set (NTP)?")
    } else if [
        "UnknownCA",
        "BadCertificate",
        "CertificateExpired",
        "CertificateRequired",
    ]
    .iter()
    .any(|alert| text.contains(&format!("alert: {alert}")))
    {
        format!("{text}: the relay did not accept this camera's client certificate (security.client_cert); is it issued by the relay's tls.client_ca?")
    } else if text.contains("certificate expired") || text.contains("Expired") {
        format!("{text}: the relay's certificate has expired (or this camera's clock is far ahead)")
    } else if text.contains("certificate")
        || text.contains("Certificate")
        || text.contains("pinned")
    {
        format!("{text} (the relay was checked against {trust})")
    } else {
        text
    }
}
