//! The wire protocol between agent and relay: every message, its encoding and its
//! size limits. No other module knows how bytes on the wire look.
//!
//! # Control link (WebSocket)
//! One WebSocket binary message carries one postcard-encoded [`AgentMessage`] or
//! [`RelayMessage`]. The agent's first message is [`AgentMessage::Register`]; the relay
//! answers [`RelayMessage::Registered`] or [`RelayMessage::Rejected`].
//!
//! # Data plane (QUIC, ALPN [`ALPN`])
//! The agent opens one bidirectional stream and writes a framed [`DataHello`] that
//! proves it owns a registration; the relay answers with a framed [`HelloReply`].
//! Then, for every Watcher connection, the relay opens a bidirectional stream and
//! writes a framed [`StreamOpen`]; the agent answers with a framed [`StreamStatus`] and
//! raw bytes follow in both directions.
//!
//! A *frame* on a QUIC stream is a big-endian `u16` length followed by that many bytes
//! of postcard, at most [`MAX_STREAM_FRAME`].
//!
//! # Data plane over TCP (the fallback when UDP is blocked)
//! The agent opens a second WebSocket, to its control URL with [`FALLBACK_PATH_SUFFIX`]
//! appended, and treats the payloads of its binary messages as one byte stream. On it,
//! the agent writes a framed [`DataHello`] and the relay answers a framed
//! [`HelloReply`], exactly as on QUIC; then the byte stream carries a yamux session
//! (relay as client, agent as server, [`crate::mux`]) whose streams carry what QUIC
//! streams do: a framed [`StreamOpen`], a framed [`StreamStatus`], raw bytes.
//!
//! # Between relays of a cluster (QUIC, ALPN [`PEER_ALPN`])
//! A relay that a Watcher reached, but that does not hold the camera, opens a
//! bidirectional stream on its connection to the relay that does (both sides present
//! certificates of the cluster's CA) and writes a framed [`PeerOpen`]; the holding
//! relay answers with a framed [`StreamStatus`], and raw bytes follow both ways: the
//! Watcher's connection, as it came, which the holding relay carries to the camera as
//! if the Watcher had connected to it.

use std::fmt;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::secret::Secret;

/// The protocol version this build speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 2;

/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 2;

/// ALPN of the QUIC data plane; names the protocol and its version.
pub const ALPN: &[u8] = b"camtunnel/1";

/// ALPN of the relay-to-relay QUIC connections.
pub const PEER_ALPN: &[u8] = b"camtunnel-peer/1";

/// Appended to the control URL's path for the data plane's TCP fallback
/// (`/tunnel` → `/tunnel/data`).
pub const FALLBACK_PATH_SUFFIX: &str = "/data";

/// Application close codes of a QUIC tunnel, set by the relay. They tell the agent
/// whether its session goes on (dial the data plane again) or is over.
pub mod tunnel_close {
    /// The tunnel's hello was refused.
    pub const REFUSED: u32 = 1;
    /// The agent's session ended (its reason follows on the control link).
    pub const SESSION_ENDED: u32 = 2;
    /// An operator restarted the tunnel; the session goes on.
    pub const RESTARTED: u32 = 3;
    /// A newer link of the same session took the tunnel's place.
    pub const SUPERSEDED: u32 = 4;

    /// Whether a tunnel the relay closed with `code` leaves the agent's session alive.
    pub fn session_goes_on(code: u64) -> bool {
        code == u64::from(RESTARTED) || code == u64::from(SUPERSEDED)
    }
}

/// Largest control message either side accepts, in bytes.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// Read buffer of a control link's WebSocket. Control messages are small and few;
/// tungstenite's default of 128 KiB per connection was most of what an idle camera
/// cost the relay (bench scale scenario). Larger messages still arrive, in more reads.
pub const CONTROL_READ_BUFFER: usize = 4 * 1024;

/// Largest frame on a QUIC stream (hello, stream header, status), in bytes.
pub const MAX_STREAM_FRAME: usize = 4 * 1024;

/// Length of the session key handed out in [`Registered`].
pub const SESSION_KEY_LEN: usize = 32;

/// Messages the agent sends on the control link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message of every control connection. Must stay variant 0 with `version`
    /// as its first field: [`peek_register_version`] relies on that layout to tell an
    /// agent of another version what this relay supports.
    Register(Register),
    /// Sent every `heartbeat_interval`; the relay answers [`RelayMessage::HeartbeatAck`].
    Heartbeat(AgentStats),
    /// The answer to a [`RelayMessage::Command`].
    CommandResult {
        /// The `id` of the command this answers.
        id: u64,
        /// What the agent did, or why it could not.
        result: Result<CommandOutput, String>,
    },
    /// Asks for `len` bytes at `offset` of the release offered as `id`; answered by
    /// [`RelayMessage::UpdateChunk`]. Sent only to relays that granted
    /// [`FEATURE_UPDATE`].
    UpdateFetch {
        /// The offer's id.
        id: u64,
        /// Where in the binary.
        offset: u64,
        /// How many bytes, at most [`UPDATE_CHUNK`].
        len: u32,
    },
    /// How an update goes on this camera. Sent only to relays that granted
    /// [`FEATURE_UPDATE`].
    UpdateReport {
        /// The offer's id.
        id: u64,
        /// Where it stands.
        progress: UpdateProgress,
    },
}

/// Where an update stands on the camera.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateProgress {
    /// The camera will not take the release; nothing changed on it.
    Refused(String),
    /// Downloading; `have` bytes are on the camera (more than 0 when resuming).
    Downloading {
        /// Bytes on the camera.
        have: u64,
    },
    /// The download failed its check; it was deleted and nothing changed.
    Failed(String),
    /// Verified and installed beside the running agent; restarting into it now.
    Installing,
    /// The new agent runs and is online: the update is done.
    Updated {
        /// The version before.
        from: String,
        /// The version now.
        to: String,
    },
    /// The new agent did not come up healthy; the previous one is back.
    RolledBack {
        /// The version tried.
        from: String,
        /// The version running again.
        to: String,
        /// What went wrong.
        why: String,
    },
}

/// Largest [`AgentMessage::UpdateFetch`]: well inside [`MAX_CONTROL_MESSAGE`] with the
/// chunk's framing.
pub const UPDATE_CHUNK: u32 = 48 * 1024;

/// The agent introduces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub version: u16,
    /// Unique id of this camera, e.g. `dahua-2449s-il-001`.
    pub agent_id: String,
    /// Shared secret proving the agent may register.
    pub token: Secret,
    /// What the camera is, for operators.
    pub camera: CameraInfo,
    /// The services the agent wants reachable through the relay.
    pub services: Vec<ServiceRequest>,
    /// How often the agent sends heartbeats, in seconds. The relay declares the agent
    /// offline after three missed ones.
    pub heartbeat_interval_secs: u32,
    /// Version string of the agent software, for operators.
    pub agent_version: String,
}

/// Description of the camera an agent runs on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CameraInfo {
    /// Camera model, e.g. `dahua-2449s-il`.
    pub model: String,
    /// RTSP paths the camera serves, e.g. `/cam/realmonitor?channel=1&subtype=0`.
    pub stream_paths: Vec<String>,
    /// The camera's RTSP port, as the agent reaches it.
    pub rtsp_port: u16,
}

/// A service the agent asks the relay to expose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRequest {
    /// Service name, e.g. [`SERVICE_RTSP`]; repeated in every [`StreamOpen`].
    pub name: String,
    /// The relay port the agent would like; the relay's policy has the last word.
    pub port: u16,
}

/// Name of the camera's RTSP service.
pub const SERVICE_RTSP: &str = "rtsp";

/// Entries of [`Register::services`] whose name starts with `+` are not services but
/// features the agent understands (their port is 0). Earlier relays pass over names
/// they do not know, so an agent says what it understands without a new protocol
/// version, which an earlier relay would refuse.
pub const FEATURE_PREFIX: &str = "+";

/// The agent follows [`RelayMessage::Redirect`].
pub const FEATURE_REDIRECT: &str = "+redirect";

/// The agent takes over-the-air updates ([`RelayMessage::UpdateOffer`]); a relay that
/// serves them grants it back (a [`GrantedService`] of that name), and only then does
/// the agent send update messages.
pub const FEATURE_UPDATE: &str = "+update";

/// Prefix of the service entry naming the agent's target triple
/// (`+target:armv7-unknown-linux-gnueabihf`), so that the relay offers only releases
/// the camera can run.
pub const FEATURE_TARGET_PREFIX: &str = "+target:";

/// Prefix of a service entry carrying one of the agent's labels (`agent.labels`):
/// `+label:site-a`.
pub const FEATURE_LABEL_PREFIX: &str = "+label:";

/// Counters the agent reports with every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Bytes the agent sent towards the relay on data streams, since it started.
    pub bytes_sent: u64,
    /// Bytes the agent received from the relay on data streams, since it started.
    pub bytes_received: u64,
    /// How many times the agent had to connect again after losing the relay.
    pub reconnections: u64,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// Data streams open right now.
    pub active_sessions: u32,
}

/// Messages the relay sends on the control link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RelayMessage {
    /// The registration was accepted.
    Registered(Registered),
    /// The registration was refused; the relay closes the connection after this.
    Rejected(Rejection),
    /// Answer to every heartbeat, so the agent can tell a dead relay from a quiet one.
    HeartbeatAck,
    /// An operator's command for the agent.
    Command {
        /// Echoed back in [`AgentMessage::CommandResult`].
        id: u64,
        /// What to do.
        command: Command,
    },
    /// The relay ends this control connection; the agent should connect again later.
    Closing(CloseReason),
    /// Register with another relay of the cluster instead, now: the answer to a
    /// Register (this relay is over its share of cameras, or draining), or the end of a
    /// session (this relay is draining). Sent only to agents that list
    /// [`FEATURE_REDIRECT`]; an earlier agent could not decode it.
    Redirect(Redirect),
    /// Offers the agent a signed release to update to. Sent only to agents that list
    /// [`FEATURE_UPDATE`].
    UpdateOffer(UpdateOffer),
    /// Bytes of an offered release, answering [`AgentMessage::UpdateFetch`]; fewer than
    /// asked only at the end of the binary.
    UpdateChunk {
        /// The offer's id.
        id: u64,
        /// Where in the binary they start.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
}

/// A release offered to one camera.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOffer {
    /// Names this offer in the messages about it; the same for the same release to the
    /// same camera, so that a download resumes after a dropped link.
    pub id: u64,
    /// The release and its signature.
    pub release: crate::release::Release,
    /// Install even if it is not newer than the running agent.
    pub force: bool,
}

/// Where a relay sends an agent instead of serving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// The relay to register with (its id in the cluster).
    pub relay: String,
    /// Its control URL, as agents dial it.
    pub url: String,
    /// Why, in words, for the agent's log.
    pub reason: String,
}

/// The relay's acceptance of a registration.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// Proves, on the QUIC connection, that it belongs to this registration.
    pub session_key: [u8; SESSION_KEY_LEN],
    /// UDP port of the relay's QUIC endpoint (on the host of the control URL).
    pub quic_port: u16,
    /// SHA-256 of the relay's QUIC certificate (DER); the agent accepts no other.
    pub cert_sha256: [u8; 32],
    /// The relay ports granted to the requested services.
    pub granted: Vec<GrantedService>,
}

impl fmt::Debug for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registered")
            .field("session_key", &"***")
            .field("quic_port", &self.quic_port)
            .field("cert_sha256", &hex(&self.cert_sha256))
            .field("granted", &self.granted)
            .finish()
    }
}

/// A service exposed by the relay on a port of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedService {
    /// Service name as requested.
    pub name: String,
    /// The relay port a Watcher connects to.
    pub port: u16,
}

/// Why the relay refused a registration. Its `Display` is meant for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// The token does not match what the relay expects for this agent id.
    #[error("the relay refused the token for this agent id; check agent.tunnel_server_token")]
    BadToken,
    /// The relay does not know this agent id and admits only configured ones.
    #[error("agent id {0:?} is not allowed on this relay; ask the operator to add it")]
    UnknownAgent(String),
    /// The agent speaks a protocol version the relay does not.
    #[error(
        "protocol version {agent} is not supported by this relay (it speaks {min}..={max}); \
         upgrade the older side"
    )]
    UnsupportedVersion {
        /// The agent's version.
        agent: u16,
        /// Oldest version the relay supports.
        min: u16,
        /// Newest version the relay supports.
        max: u16,
    },
    /// The relay port for the camera is used by another camera or program.
    #[error("relay port {port} is already taken ({holder}); give this camera another tunnel.tunnel_port")]
    PortTaken {
        /// The port.
        port: u16,
        /// Who has it, in words.
        holder: String,
    },
    /// The requested port lies outside the relay's allowed range.
    #[error("relay port {port} is not allowed; this relay hands out ports {first}..={last}")]
    PortNotAllowed {
        /// The requested port.
        port: u16,
        /// First port of the allowed range.
        first: u16,
        /// Last port of the allowed range.
        last: u16,
    },
    /// Every port of the relay's range is assigned to some camera.
    #[error("no free relay port: every port in {first}..={last} is assigned to a camera")]
    NoFreePort {
        /// First port of the range.
        first: u16,
        /// Last port of the range.
        last: u16,
    },
    /// The registration itself was malformed.
    #[error("invalid registration: {0}")]
    Invalid(String),
    /// This agent id must prove itself with a client certificate, and none came.
    #[error("this relay requires a client certificate for this agent id; set security.client_cert and security.client_key (`certs agent --id <id>` makes them)")]
    CertificateRequired,
    /// The client certificate names another agent.
    #[error("the client certificate is for agent {0:?}, not this agent id; install this camera's own certificate")]
    CertificateMismatch(String),
    /// The relay will not consider a registration now; try again after `secs`.
    #[error("the relay asks to retry in {secs} s: {why}")]
    RetryLater {
        /// Seconds to wait before the next attempt.
        secs: u32,
        /// Why, naming the relay's limit.
        why: String,
    },
}

/// Why the relay closes a control connection it had accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CloseReason {
    /// Another connection registered with the same agent id and took over.
    #[error("another connection registered as this agent id (from {0}) and replaced this one; do two cameras share an agent_id?")]
    Replaced(String),
    /// No heartbeat arrived in time.
    #[error("the relay heard no heartbeat in {0} s")]
    HeartbeatTimeout(u64),
    /// The relay shuts down.
    #[error("the relay is shutting down")]
    Shutdown,
}

/// Commands an operator can send to an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Answer with the agent's clock.
    Ping,
    /// Answer with the agent's counters.
    Stats,
    /// Drop both links and dial the relay again at once.
    Reconnect,
    /// Re-read the config file; apply what can change without a restart.
    ReloadConfig,
    /// Restart the agent process (re-execute it, or exit for its supervisor).
    Restart,
}

impl Command {
    /// Every command with its API name.
    pub const ALL: [(Command, &'static str); 5] = [
        (Command::Restart, "restart"),
        (Command::Reconnect, "reconnect"),
        (Command::Ping, "ping"),
        (Command::ReloadConfig, "reload_config"),
        (Command::Stats, "stats"),
    ];

    /// The command named `name` in the API.
    pub fn from_name(name: &str) -> Option<Command> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
    }
}

/// What an agent answers to a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandOutput {
    /// Answer to [`Command::Ping`]: the agent's clock, milliseconds since the Unix epoch.
    Pong {
        /// Agent's wall clock.
        unix_millis: u64,
        /// The agent's latest QUIC round-trip time to the relay, in microseconds.
        quic_rtt_micros: Option<u64>,
    },
    /// Answer to [`Command::Stats`].
    Stats(AgentStats),
    /// Answer to [`Command::Reconnect`]: the agent drops both links after sending this.
    Reconnecting,
    /// Answer to [`Command::ReloadConfig`].
    Reloaded {
        /// Settings that changed and apply from the next session (the agent reconnects
        /// at once if any did).
        applied: Vec<String>,
        /// Settings that changed but take a restart of the agent.
        need_restart: Vec<String>,
    },
    /// Answer to [`Command::Restart`]: how the agent restarts, in words.
    Restarting(String),
}

/// First frame on the agent's first QUIC stream: which registration this connection
/// belongs to.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct DataHello {
    /// The registered agent id.
    pub agent_id: String,
    /// The key from [`Registered::session_key`].
    pub session_key: [u8; SESSION_KEY_LEN],
}

impl fmt::Debug for DataHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataHello")
            .field("agent_id", &self.agent_id)
            .field("session_key", &"***")
            .finish()
    }
}

/// The relay's answer to a [`DataHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The connection now carries this agent's streams.
    Accepted,
    /// The hello was refused, in words.
    Refused(String),
}

/// Header the relay writes first on every data stream it opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// Which service to connect to, e.g. [`SERVICE_RTSP`].
    pub service: String,
    /// Relay-wide id of the Watcher connection, for matching logs on both sides.
    pub connection_id: u64,
}

/// Header a relay writes first on a stream to the relay holding a camera: which
/// Watcher connection follows, and for which camera.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerOpen {
    /// The camera's agent id.
    pub camera: String,
    /// The Watcher named the camera in its URLs (`/<agent-id>/…`, the shared port),
    /// rather than dialing the camera's own port.
    pub shared: bool,
    /// The Watcher's address, as the first relay saw it.
    pub watcher: String,
    /// The first relay's id of the connection, for matching logs on both relays.
    pub connection_id: u64,
}

/// The agent's answer to a [`StreamOpen`] (and the holding relay's to a
/// [`PeerOpen`]), before any payload byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamStatus {
    /// The agent is connected to the service; payload follows.
    Connected,
    /// The service refused the connection (nothing listens on its port).
    Refused(String),
    /// The service did not answer in time.
    TimedOut(String),
    /// The agent does not offer this service.
    NotAllowed(String),
    /// Any other failure, in words.
    Failed(String),
}

impl fmt::Display for StreamStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamStatus::Connected => f.write_str("connected"),
            StreamStatus::Refused(why) => write!(f, "the camera refused the connection: {why}"),
            StreamStatus::TimedOut(why) => write!(f, "the camera did not answer: {why}"),
            StreamStatus::NotAllowed(why) => write!(f, "not allowed by the agent: {why}"),
            StreamStatus::Failed(why) => write!(f, "the agent could not connect: {why}"),
        }
    }
}

/// A message that could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The message is larger than the limit for its place.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    /// Reading or writing the frame failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes a control message, refusing anything over [`MAX_CONTROL_MESSAGE`].
pub fn encode_control<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let bytes = postcard::to_stdvec(msg)?;
    check_size(bytes.len(), MAX_CONTROL_MESSAGE)?;
    Ok(bytes)
}

/// Decodes a control message, refusing anything over [`MAX_CONTROL_MESSAGE`] and any
/// trailing bytes.
pub fn decode_control<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    check_size(bytes.len(), MAX_CONTROL_MESSAGE)?;
    decode_exact(bytes)
}

/// Reads the protocol version out of an encoded [`AgentMessage::Register`] without
/// decoding the rest, so a relay can tell an agent of another version what it speaks
/// even when the rest of the layout changed.
pub fn peek_register_version(bytes: &[u8]) -> Option<u16> {
    // Postcard: the enum tag (varint, 0 = Register), then `version` as a varint.
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0 {
        return None;
    }
    let mut value: u32 = 0;
    for (i, &b) in rest.iter().take(3).enumerate() {
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u16::try_from(value).ok();
        }
    }
    None
}

/// Writes one length-prefixed frame on a QUIC stream.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), ProtocolError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = postcard::to_stdvec(msg)?;
    check_size(body.len(), MAX_STREAM_FRAME)?;
    let mut buf = Vec::with_capacity(2 + body.len());
    // Cannot truncate: check_size bounded the body to MAX_STREAM_FRAME < u16::MAX.
    buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one length-prefixed frame from a QUIC stream.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, ProtocolError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let len = usize::from(r.read_u16().await?);
    check_size(len, MAX_STREAM_FRAME)?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    decode_exact(&body)
}

/// Decodes one frame from the front of `buf` if it is complete: `Ok(None)` means more
/// bytes are needed, `Ok(Some((msg, used)))` says how many bytes the frame took.
pub fn decode_frame_prefix<T: DeserializeOwned>(
    buf: &[u8],
) -> Result<Option<(T, usize)>, ProtocolError> {
    let Some(len_bytes) = buf.get(..2) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
    check_size(len, MAX_STREAM_FRAME)?;
    let Some(body) = buf.get(2..2 + len) else {
        return Ok(None);
    };
    Ok(Some((decode_exact(body)?, 2 + len)))
}

fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let (msg, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(msg)
}

fn check_size(size: usize, limit: usize) -> Result<(), ProtocolError> {
    if size > limit {
        return Err(ProtocolError::TooLarge { size, limit });
    }
    Ok(())
}

/// Checks an agent id: 1 to 64 of `A-Z a-z 0-9 . _ -`, so it is safe in URLs, file
/// names, logs and metric labels. The error says what is wrong, for people.
pub fn check_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("{id:?} must be 1 to 64 characters long"));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "{id:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        )),
        None => Ok(()),
    }
}

/// Lower-case hex of `bytes`, for fingerprints in logs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A SHA-256 written as [`hex`] writes it (or as `certs fingerprint` prints it: colons
/// and upper case are accepted too); `None` if it is not 32 bytes of hex.
pub fn sha256_from_hex(text: &str) -> Option<[u8; 32]> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    let bytes: Option<Vec<u8>> = (0..digits.len())
        .step_by(2)
        .map(|i| {
            digits
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    bytes.and_then(|b| <[u8; 32]>::try_from(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(version: u16) -> AgentMessage {
        AgentMessage::Register(Register {
            version,
            agent_id: "cam-1".into(),
            token: Secret::new("s3cret"),
            camera: CameraInfo {
                model: "dahua-2449s-il".into(),
                stream_paths: vec!["/cam/realmonitor?channel=1&subtype=0".into()],
                rtsp_port: 554,
            },
            services: vec![ServiceRequest {
                name: SERVICE_RTSP.into(),
                port: 8554,
            }],
            heartbeat_interval_secs: 30,
            agent_version: "0.1.0".into(),
        })
    }

    #[test]
    fn control_messages_round_trip() {
        let msg = register(PROTOCOL_VERSION);
        let bytes = encode_control(&msg).unwrap();
        assert_eq!(decode_control::<AgentMessage>(&bytes).unwrap(), msg);
    }

    #[test]
    fn version_is_readable_from_any_register() {
        for version in [0, 1, 2, 127, 128, 300, u16::MAX] {
            let bytes = encode_control(&register(version)).unwrap();
            assert_eq!(peek_register_version(&bytes), Some(version));
        }
        let heartbeat = encode_control(&AgentMessage::Heartbeat(AgentStats::default())).unwrap();
        assert_eq!(peek_register_version(&heartbeat), None);
        assert_eq!(peek_register_version(&[]), None);
    }

    #[test]
    fn oversized_and_garbage_control_messages_are_refused() {
        let big = vec![0u8; MAX_CONTROL_MESSAGE + 1];
        assert!(matches!(
            decode_control::<AgentMessage>(&big),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_control::<AgentMessage>(&[0xff, 0xff, 0xff, 0x01]),
            Err(ProtocolError::Malformed(_))
        ));
        // A valid message followed by junk is not a valid message.
        let mut bytes = encode_control(&AgentMessage::Heartbeat(AgentStats::default())).unwrap();
        bytes.push(0);
        assert!(decode_control::<AgentMessage>(&bytes).is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_prefix_decoding_waits_for_whole_frames() {
        let open = StreamOpen {
            service: SERVICE_RTSP.into(),
            connection_id: 42,
        };
        let mut wire = Vec::new();
        write_frame(&mut wire, &open).await.unwrap();
        wire.extend_from_slice(b"payload");

        for cut in 0..wire.len() - 7 {
            assert!(decode_frame_prefix::<StreamOpen>(&wire[..cut])
                .unwrap()
                .is_none());
        }
        let (decoded, used) = decode_frame_prefix::<StreamOpen>(&wire).unwrap().unwrap();
        assert_eq!(decoded, open);
        assert_eq!(&wire[used..], b"payload");

        let mut reader = &wire[..];
        assert_eq!(
            read_frame::<_, StreamOpen>(&mut reader).await.unwrap(),
            open
        );
        assert_eq!(reader, b"payload");
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading_the_body() {
        let mut wire = ((MAX_STREAM_FRAME + 1) as u16).to_be_bytes().to_vec();
        wire.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_frame::<_, StreamOpen>(&mut &wire[..]).await,
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(decode_frame_prefix::<StreamStatus>(&wire).is_err());
    }

    #[test]
    fn random_bytes_never_panic_any_decoder() {
        use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0xbad);
        let valid = encode_control(&register(1)).unwrap();
        for i in 0..20_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                let mut b = vec![0; rng.random_range(0..256)];
                rng.fill_bytes(&mut b);
                b
            } else {
                // A valid message with a few bytes flipped reaches deeper into the decoder.
                let mut b = valid.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..b.len());
                    b[at] = rng.random();
                }
                b
            };
            let _ = decode_control::<AgentMessage>(&bytes);
            let _ = decode_control::<RelayMessage>(&bytes);
            let _ = peek_register_version(&bytes);
            let _ = decode_frame_prefix::<StreamOpen>(&bytes);
            let _ = decode_frame_prefix::<StreamStatus>(&bytes);
            let _ = decode_frame_prefix::<DataHello>(&bytes);
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let text = format!("{:?}", register(1));
        assert!(!text.contains("s3cret"), "{text}");
        let registered = Registered {
            session_key: [7; SESSION_KEY_LEN],
            quic_port: 1,
            cert_sha256: [0; 32],
            granted: vec![],
        };
        assert!(!format!("{registered:?}").contains("7, 7"));
    }
}
