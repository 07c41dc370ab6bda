//! The agent's control link: connect the WebSocket, register, then heartbeats and
//! commands until the link ends.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::tls;

use common::protocol::{
    decode_control, encode_control, AgentMessage, CameraInfo, Command, Redirect, Register,
    Registered, Rejection, RelayMessage, ServiceRequest, CONTROL_READ_BUFFER, FALLBACK_PATH_SUFFIX,
    FEATURE_LABEL_PREFIX, FEATURE_REDIRECT, FEATURE_TARGET_PREFIX, FEATURE_UPDATE,
    MAX_CONTROL_MESSAGE, PROTOCOL_VERSION, SERVICE_RTSP,
};
use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpStream, sync::mpsc, time::Instant};
use tokio_tungstenite::{
    tungstenite::{http, protocol::WebSocketConfig, Message},
    Connector, MaybeTlsStream, WebSocketStream,
};

use crate::{
    config::{AgentConfig, RelayUrl},
    resolve::resolve,
    stats::Stats,
    update::{Chunks, Outgoing, Updater},
    Handled, SessionError,
};

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

/// A relay the agent reached: the URL it is configured as, and the address that
/// answered. The session's data plane goes to that same address, not to whichever
/// address the name resolves to first.
#[derive(Debug, Clone)]
pub(crate) struct Reached {
    pub(crate) relay: RelayUrl,
    pub(crate) addr: SocketAddr,
}

/// A session's registration, and the relay that granted it.
#[derive(Debug)]
pub(crate) struct Registration {
    pub(crate) registered: Registered,
    pub(crate) reached: Reached,
}

/// Registers with one of the configured relays: every address of every relay in turn,
/// each given `network.connection_timeout`, starting where [`first_candidate`] says
/// (`previous`: the candidate the last session reached), or with the relay a
/// `redirect` names. Returns the link, the registration and which configured candidate
/// was reached (`None`: the redirect's). A relay that cannot be reached, or asks to be
/// tried later, hands the attempt to the next; any other answer ends it.
pub(crate) async fn connect(
    config: &AgentConfig,
    previous: Option<usize>,
    redirect: Option<&Redirect>,
) -> Result<(ControlLink, Registration, Option<usize>), SessionError> {
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
    let mut failures = Vec::new();
    let mut turned_away = None;
    if let Some(redirect) = redirect {
        match RelayUrl::parse(&redirect.url, &config.agent_id) {
            Ok(relay) => {
                let (sent_to, unresolved) = candidates(config, &[relay]).await;
                failures.extend(unresolved);
                if let Some((link, registration, _)) =
                    first_to_register(config, &sent_to, 0, &mut failures, &mut turned_away).await?
                {
                    return Ok((link, registration, None));
                }
            }
            Err(why) => failures.push(format!(
                "relay {} sent this camera to {:?}, which is not a relay URL: {why}",
                redirect.relay, redirect.url
            )),
        }
    }
    let (configured, unresolved) = candidates(config, &config.relays).await;
    failures.extend(unresolved);
    let start = first_candidate(&config.agent_id, previous, configured.len());
    if let Some((link, registration, index)) =
        first_to_register(config, &configured, start, &mut failures, &mut turned_away).await?
    {
        return Ok((link, registration, Some(index)));
    }
    Err(match turned_away {
        Some(rejection) => SessionError::Rejected(rejection),
        None => SessionError::Connect(failures.join("; ")),
    })
}

/// Tries `candidates` in turn from `start` (wrapping): the first that registers this
/// agent, and its index. Unreachable ones add to `failures`, those asking to be tried
/// later leave their answer in `turned_away`; any other answer is the error.
async fn first_to_register(
    config: &AgentConfig,
    candidates: &[Reached],
    start: usize,
    failures: &mut Vec<String>,
    turned_away: &mut Option<Rejection>,
) -> Result<Option<(ControlLink, Registration, usize)>, SessionError> {
    let count = candidates.len();
    for i in 0..count {
        let index = (start + i) % count;
        let reached = &candidates[index];
        let why = match register(config, reached).await {
            Ok((link, registered)) => {
                let registration = Registration {
                    registered,
                    reached: reached.clone(),
                };
                return Ok(Some((link, registration, index)));
            }
            Err(SessionError::Connect(why)) => why,
            Err(SessionError::Rejected(later @ Rejection::RetryLater { .. })) => {
                let why = format!(
                    "{} ({}) asks to be tried later: {later}",
                    reached.relay.url, reached.addr
                );
                *turned_away = Some(later);
                why
            }
            Err(answered) => return Err(answered),
        };
        if count > 1 || config.relays.len() > 1 {
            tracing::info!("{why}; trying the next relay address");
        }
        failures.push(why);
    }
    Ok(None)
}

/// Where a session starts among `count` relay addresses. The first session starts at
/// one picked by the agent id, so a fleet given the same list spreads over it. A later
/// one starts past the relay the last session had (it may be the one that died), at
/// an offset picked by the agent id too, so the cameras of a dead relay spread over the
/// others instead of all landing on its neighbour.
fn first_candidate(agent_id: &str, previous: Option<usize>, count: usize) -> usize {
    if count < 2 {
        return 0;
    }
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let spread = agent_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) as usize;
    match previous {
        None => spread % count,
        Some(last) => (last + 1 + spread % (count - 1)) % count,
    }
}

/// Every address of each of `relays`, in order (and each name's
/// addresses in the resolver's order), and why the relays that have none have none.
async fn candidates(config: &AgentConfig, relays: &[RelayUrl]) -> (Vec<Reached>, Vec<String>) {
    let mut candidates = Vec::new();
    let mut failures = Vec::new();
    for relay in relays {
        match resolve(&relay.host, relay.port, &config.fallback_nameservers).await {
            Ok(addrs) => candidates.extend(addrs.into_iter().map(|addr| Reached {
                relay: relay.clone(),
                addr,
            })),
            Err(e) => failures.push(format!("cannot reach {}: {e}", relay.url)),
        }
    }
    (candidates, failures)
}

/// Opens the control link to `reached` and registers, within
/// `network.connection_timeout`.
async fn register(
    config: &AgentConfig,
    reached: &Reached,
) -> Result<(ControlLink, Registered), SessionError> {
    let url = &reached.relay.url;
    let attempt = async {
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(MAX_CONTROL_MESSAGE))
            .max_frame_size(Some(MAX_CONTROL_MESSAGE))
            .read_buffer_size(CONTROL_READ_BUFFER)
            .write_buffer_size(0);
        let mut socket = open(config, reached, url, ws_config).await.map_err(|e| {
            SessionError::Connect(format!(
                "cannot open the control link to {url} ({}): {e}",
                reached.addr
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
            services: [
                ServiceRequest {
                    name: SERVICE_RTSP.into(),
                    port: config.tunnel_port,
                },
                ServiceRequest {
                    name: FEATURE_REDIRECT.into(),
                    port: 0,
                },
                ServiceRequest {
                    name: FEATURE_UPDATE.into(),
                    port: 0,
                },
                ServiceRequest {
                    name: format!("{FEATURE_TARGET_PREFIX}{}", crate::TARGET),
                    port: 0,
                },
            ]
            .into_iter()
            .chain(config.labels.iter().map(|label| ServiceRequest {
                name: format!("{FEATURE_LABEL_PREFIX}{label}"),
                port: 0,
            }))
            .collect(),
            heartbeat_interval_secs: config
                .heartbeat_interval
                .as_secs()
                .clamp(1, u64::from(u32::MAX)) as u32,
            agent_version: crate::VERSION.into(),
        });
        send(&mut socket, &register).await?;
        match next_message(&mut socket).await? {
            RelayMessage::Registered(registered) => Ok((ControlLink { socket }, registered)),
            RelayMessage::Rejected(rejection) => Err(SessionError::Rejected(rejection)),
            RelayMessage::Redirect(to) => Err(SessionError::Redirected(to)),
            other => Err(SessionError::Protocol(format!(
                "expected Registered, got {other:?}"
            ))),
        }
    };
    tokio::time::timeout(config.connection_timeout, attempt)
        .await
        .map_err(|_| {
            SessionError::Connect(format!(
                "no registration answer from {url} ({}) within {:?} (network.connection_timeout)",
                reached.addr, config.connection_timeout
            ))
        })?
}

/// A WebSocket to `url` on the relay's control port at `reached`, over TLS unless it
/// is `ws://`. The error says why in words an operator can act on.
pub(crate) async fn open(
    config: &AgentConfig,
    reached: &Reached,
    url: &str,
    ws_config: WebSocketConfig,
) -> Result<Socket, String> {
    let security = &config.security;
    let tls = tls::client_config(&security.relay_trust, security.identity.as_deref(), b"")
        .map_err(|e| format!("TLS setup: {e}"))?;
    let tcp = TcpStream::connect(reached.addr)
        .await
        .map_err(|e| format!("cannot connect to the relay's control port: {e}"))?;
    // Control messages are small and latency matters more than packing.
    let _ = tcp.set_nodelay(true);
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

impl ControlLink {
    /// Sends heartbeats, answers commands (with `handle`) and takes updates (with
    /// `updates`, if the relay serves them) until the link ends; returns why it ended.
    pub(crate) async fn run(
        mut self,
        interval: Duration,
        stats: &Stats,
        handle: &(dyn Fn(Command) -> Handled + Sync),
        updates: Option<&Updater>,
    ) -> SessionError {
        let silence_limit = interval * 3;
        let mut last_heard = Instant::now();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The download under way in this session: its offer id and where its chunks go.
        let mut download: Option<(u64, Chunks)> = None;
        let (outbox_tx, mut outbox) = mpsc::channel::<Outgoing>(8);
        if let Some(updater) = updates {
            if let Err(e) = self.send_reports(updater).await {
                return e;
            }
        }
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
                Some(outgoing) = outbox.recv() => {
                    match outgoing {
                        Outgoing::Send(message) => if let Err(e) = send(&mut self.socket, &message).await {
                            return e;
                        },
                        Outgoing::Restart => {
                            self.close_politely().await;
                            return SessionError::Restart;
                        }
                    }
                    continue;
                }
                () = report_queued(updates) => {
                    if let Some(updater) = updates {
                        if let Err(e) = self.send_reports(updater).await {
                            return e;
                        }
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
                Ok(RelayMessage::Redirect(to)) => return SessionError::Redirected(to),
                Ok(RelayMessage::Command { id, command }) => {
                    tracing::info!(id, ?command, "command from the relay");
                    (id, handle(command))
                }
                Ok(RelayMessage::UpdateOffer(offer)) => {
                    let Some(updater) = updates else {
                        return SessionError::Protocol(
                            "an update offered, though the relay did not grant updates".into(),
                        );
                    };
                    tracing::info!(id = offer.id, release = %offer.release.describe(), force = offer.force, "update offered");
                    let id = offer.id;
                    download = Some((id, updater.start(offer, outbox_tx.clone())));
                    continue;
                }
                Ok(RelayMessage::UpdateChunk { id, offset, data }) => {
                    match &download {
                        Some((current, chunks)) if *current == id => {
                            // A download that gave up has dropped its end: nothing to do.
                            let _ = chunks.send((offset, data)).await;
                        }
                        _ => tracing::debug!(id, "update data for no download under way"),
                    }
                    continue;
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
                self.close_politely().await;
                return end;
            }
        }
    }

    /// Sends the update reports waiting.
    async fn send_reports(&mut self, updater: &Updater) -> Result<(), SessionError> {
        for (id, progress) in updater.take_reports() {
            send(
                &mut self.socket,
                &AgentMessage::UpdateReport { id, progress },
            )
            .await?;
        }
        Ok(())
    }

    /// Closes the link and waits for the relay's end of the close: it reads in order,
    /// so by then it has everything sent before. Dropping the link at once let the
    /// next session's registration overtake it, and the takeover ended this session
    /// with the last answer still unread ("went offline before answering").
    async fn close_politely(&mut self) {
        let _ = tokio::time::timeout(POLITE_CLOSE, async {
            let _ = self.socket.close(None).await;
            while let Some(Ok(_)) = self.socket.next().await {}
        })
        .await;
    }
}

/// Resolves when `updates` has a report to send; never without updates.
async fn report_queued(updates: Option<&Updater>) {
    match updates {
        Some(updater) => updater.report_queued().await,
        None => std::future::pending().await,
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
    if let tokio_tungstenite::tungstenite::Error::Http(response) = e {
        return explain_http_answer(response);
    }
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

/// An HTTP answer where a WebSocket upgrade was expected: what the server answered and
/// what to do about it.
fn explain_http_answer(response: &http::Response<Option<Vec<u8>>>) -> String {
    let status = response.status();
    let what_to_do = match status.as_u16() {
        404 => format!(
            "the relay serves agents at /tunnel and /agent/<agent_id> (the TCP fallback at \
             those plus {FALLBACK_PATH_SUFFIX}); set agent.tunnel_server_url to \
             ws[s]://<relay>:<port>/tunnel, and check that a proxy in front of the relay \
             forwards that path"
        ),
        401 | 403 => "the relay checks a camera's token or certificate after the WebSocket \
                      opens, never with an HTTP refusal, so a proxy or another server in \
                      front of it refused: check its access rules, or the URL"
            .into(),
        500..=599 => "the relay, or a proxy in front of it, failed; from a proxy this \
                      usually means the relay behind it is not running"
            .into(),
        _ => "is this the relay's control port? The relay answers agents with a \
              WebSocket upgrade"
            .into(),
    };
    // A short text body may say more (a proxy's reason); an HTML page would not fit a
    // log line.
    let said = response
        .body()
        .as_deref()
        .and_then(|body| std::str::from_utf8(body).ok())
        .map(|body| body.trim())
        .filter(|body| !body.is_empty() && !body.starts_with('<') && body.len() <= 200)
        .map(|body| format!(" ({body:?})"))
        .unwrap_or_default();
    format!(
        "the relay answered HTTP {} {}{said} instead of a WebSocket; {what_to_do}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: Option<&str>) -> String {
        let response = http::Response::builder()
            .status(status)
            .body(body.map(|b| b.as_bytes().to_vec()))
            .expect("a valid response");
        explain_connect_error(
            &tokio_tungstenite::tungstenite::Error::Http(Box::new(response)),
            "ca.crt",
        )
    }

    #[test]
    fn http_answers_say_what_came_back_and_what_to_do() {
        let e = answer(404, None);
        assert!(
            e.contains("HTTP 404 Not Found")
                && e.contains("/tunnel and /agent/<agent_id>")
                && e.contains("agent.tunnel_server_url"),
            "{e}"
        );
        for status in [401, 403] {
            let e = answer(status, Some("<html>denied</html>"));
            assert!(
                e.contains(&format!("HTTP {status}")) && e.contains("proxy"),
                "{e}"
            );
            assert!(
                !e.contains("html"),
                "an HTML page does not fit a log line: {e}"
            );
        }
        let e = answer(502, Some("upstream connect error"));
        assert!(
            e.contains("HTTP 502 Bad Gateway (\"upstream connect error\")")
                && e.contains("not running"),
            "{e}"
        );
        let e = answer(400, None);
        assert!(e.contains("HTTP 400") && e.contains("control port"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn sessions_spread_over_relays_and_move_past_a_lost_one() {
        // One relay: nothing to choose.
        assert_eq!(first_candidate("cam", None, 1), 0);
        assert_eq!(first_candidate("cam", Some(0), 1), 0);
        // A fleet spreads over three relays, by id.
        let mut first = [0; 3];
        let mut after_loss = [0; 3];
        for i in 0..300 {
            let id = format!("cam-{i}");
            first[first_candidate(&id, None, 3)] += 1;
            let next = first_candidate(&id, Some(1), 3);
            // Never straight back to the relay just lost.
            assert_ne!(next, 1, "{id}");
            after_loss[next] += 1;
        }
        assert!(first.iter().all(|&n| n > 60), "{first:?}");
        // The cameras of a lost relay spread over both others, not onto its neighbour.
        assert!(after_loss[0] > 100 && after_loss[2] > 100, "{after_loss:?}");
    }
}
