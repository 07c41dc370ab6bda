//! Relay configuration: the TOML file (`relay --config relay.toml`) or the seed-style
//! quick start (`relay --port 8080 --tunnel-port 8554 --token <secret>`), both parsed
//! into one [`RelayConfig`] that needs no further checks.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{protocol::check_agent_id, release::PublicKey, OneOrMany, Secret};
use serde::Deserialize;

use crate::{
    events::{TypeFilter, DEFAULT_HISTORY},
    outbound::Target,
};

/// Default TCP port of the control link, and UDP port of the QUIC endpoint.
pub const DEFAULT_PORT: u16 = 8080;
/// First camera port of the default range.
pub const DEFAULT_CAMERA_PORT: u16 = 8554;
/// Width of the camera port range in the quick start.
pub const DEFAULT_CAMERA_PORTS: u16 = 100;

/// Everything the relay needs to run.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// TCP address of the control link (WebSocket) and, later, the API.
    pub listen: SocketAddr,
    /// UDP address of the QUIC endpoint (of the first data-plane shard).
    pub quic_listen: SocketAddr,
    /// Data-plane shards: threads with a QUIC endpoint each, on the QUIC port and the
    /// ones after it; each camera's work stays on one (`relay/src/shard.rs`).
    pub data_shards: usize,
    /// Address the per-camera listeners bind to.
    pub camera_bind: IpAddr,
    /// Camera ports the relay may hand out.
    pub camera_ports: RangeInclusive<u16>,
    /// The shared RTSP port, if any: `rtsp://<it>/<agent-id>/…` reaches that camera.
    pub shared_listen: Option<SocketAddr>,
    /// Where port assignments are remembered across restarts; `None` keeps them in memory.
    pub state_dir: Option<PathBuf>,
    /// Which agents may register.
    pub auth: AgentAuth,
    /// The relay's TLS: its certificate, and the CA of agents' client certificates.
    pub tls: TlsConfig,
    /// Timeouts and bounds.
    pub limits: Limits,
    /// Who may use the operator API.
    pub api: ApiConfig,
    /// Several relays sharing one view of the fleet (`[cluster]`); `None`: this relay
    /// alone, as always.
    pub cluster: Option<ClusterConfig>,
    /// Events kept for `GET /events` to resume from (`[events] history`).
    pub event_history: usize,
    /// Where events are POSTed (`[[webhooks]]`).
    pub webhooks: Vec<WebhookConfig>,
    /// Over-the-air agent updates (`[updates]`).
    pub updates: UpdatesConfig,
}

/// `[updates]`: handing agent releases to cameras (docs/updates.md).
#[derive(Debug, Clone)]
pub struct UpdatesConfig {
    /// Cameras fetching a release at once; more wait their turn.
    pub max_transfers: usize,
    /// Bytes a second one camera may fetch at most (`max_rate_kbps`, kilobits); `None`:
    /// as fast as the link goes.
    pub max_rate: Option<u64>,
    /// Longest a camera may stay silent in the middle of an update before it counts
    /// as failed.
    pub camera_timeout: Duration,
    /// If any, uploaded releases must be signed by one of these keys (the cameras
    /// check their own keys anyway).
    pub release_keys: Vec<PublicKey>,
}

impl Default for UpdatesConfig {
    fn default() -> Self {
        UpdatesConfig {
            max_transfers: 8,
            max_rate: None,
            camera_timeout: Duration::from_secs(600),
            release_keys: Vec::new(),
        }
    }
}

/// `[[webhooks]]`: a receiver of events (docs/events.md).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Its name in logs and metrics: `name`, or the URL's scheme, host and port.
    pub name: String,
    /// Where events go.
    pub(crate) target: Target,
    /// The event types it gets (all if empty).
    pub types: TypeFilter,
    /// The HMAC-SHA256 key of the signature header.
    pub secret: Secret,
    /// Events waiting for it at most; more are dropped (and counted).
    pub queue: usize,
    /// Longest one delivery attempt may take.
    pub timeout: Duration,
    /// Longest wait between attempts at an event the receiver did not take.
    pub retry_max: Duration,
}

/// Default room in a webhook's queue.
pub const DEFAULT_WEBHOOK_QUEUE: usize = 10_000;
/// Default time a webhook delivery attempt may take.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest wait between attempts at one event.
pub const DEFAULT_WEBHOOK_RETRY_MAX: Duration = Duration::from_secs(30);

/// `[cluster]`: relays that share the fleet's state through etcd (docs/cluster.md).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://` or `https://`), any member of the cluster.
    pub endpoints: Vec<String>,
    /// This relay's name in the cluster; unique among its relays.
    pub relay_id: String,
    /// Where other relays and operators reach this relay's control port
    /// (`http://host:port` or `https://host:port`).
    pub advertise: String,
    /// How long the relay's cameras outlive it in the cluster's view when it dies or is
    /// cut off from etcd.
    pub lease_ttl: Duration,
    /// Prefix of every key the relays write.
    pub key_prefix: String,
    /// TLS to etcd: the CA that signed its members' certificates.
    pub ca: Option<PathBuf>,
    /// TLS to etcd: this relay's client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// etcd user and password, if etcd has authentication on.
    pub user: Option<(String, Secret)>,
    /// What this relay does with a shared-port Watcher for a camera another relay
    /// holds.
    pub crossing: Crossing,
    /// The control URL agents dial to register here (announced, for other relays'
    /// redirects).
    pub agent_url: String,
    /// Send registering cameras elsewhere above this multiple of the cluster's average
    /// cameras per relay; `None`: take every camera.
    pub balance: Option<f64>,
    /// Cameras a draining relay moves away a second.
    pub drain_rate: u32,
    /// Serve the own port of every camera other relays hold too (one listener per
    /// camera of the cluster), carrying its Watchers over the link.
    pub remote_camera_ports: bool,
    /// `host:port` where Watchers reach this relay's shared port (announced, for other
    /// relays' redirects).
    pub rtsp_advertise: Option<String>,
    /// The relay-to-relay links that carry Watchers to the relay holding their camera;
    /// `None`: this relay answers for cameras held elsewhere that they are elsewhere.
    pub peer: Option<PeerConfig>,
}

/// What a relay does with a Watcher for a camera another relay holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing {
    /// Carries it there over the relay-to-relay link (or says where the camera is, if
    /// there is no link).
    Forward,
    /// Answers its DESCRIBE with a redirect to the holding relay's shared port
    /// (`rtsp_advertise`), for clients that follow one; forwards what it cannot
    /// redirect.
    Redirect,
}

/// A cluster relay's relay-to-relay endpoint (QUIC, mutual TLS).
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// UDP address the endpoint binds.
    pub listen: SocketAddr,
    /// `host:port` other relays dial (announced in etcd).
    pub advertise: String,
    /// This relay's certificate and key from `certs peer --id <relay_id>`.
    pub identity: (PathBuf, PathBuf),
    /// The cluster's CA, which issued every relay's peer certificate.
    pub ca: PathBuf,
}

/// Default of `cluster.drain_rate`: cameras a draining relay moves a second.
pub const DEFAULT_DRAIN_RATE: u32 = 20;

/// Default TTL of a relay's etcd lease.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// Access to the operator API (`/agents`, `/streams`, `/tunnels`…).
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// `Authorization: Bearer` token for operator endpoints; without one they answer
    /// only to loopback clients.
    pub admin_token: Option<Secret>,
    /// `/metrics` answers anyone (like `/health`), not only operators.
    pub public_metrics: bool,
}

/// The relay's TLS files.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// PEM certificate and key for the control link (WSS) and QUIC; `None` makes a
    /// self-signed one for QUIC at start and leaves the control link plain `ws://`.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Serve the control link as plain `ws://` even with a certificate (behind a
    /// reverse proxy that terminates TLS).
    pub plain_control: bool,
    /// CA whose client certificates agents may present (mutual TLS on both links).
    pub client_ca: Option<PathBuf>,
}

/// Which agents may register, and with what.
#[derive(Debug, Clone, Default)]
pub struct AgentAuth {
    /// Agents named in the config, each with its own credential and maybe a pinned port.
    pub agents: HashMap<String, AgentEntry>,
    /// A token any agent id may use (the quick start's `--token`).
    pub shared_token: Option<Secret>,
    /// Any agent id may register with a client certificate from the client CA whose
    /// common name is that id.
    pub any_certified_agent: bool,
    /// Every agent must (also) present a client certificate naming its id.
    pub require_certificates: bool,
}

/// One configured agent.
#[derive(Debug, Clone)]
pub struct AgentEntry {
    /// What it proves itself with besides (or instead of) a certificate.
    pub token: Option<Token>,
    /// Its camera port, whatever it asks for.
    pub port: Option<u16>,
}

/// A configured token: in the clear (warned about at start), or as an argon2 hash
/// (`certs token` makes both).
#[derive(Debug, Clone)]
pub enum Token {
    /// The token itself.
    Plain(Secret),
    /// PHC-format argon2 hashes; any of them opens the account (two while a token is
    /// being rotated).
    Hash(Vec<Secret>),
}

/// Timeouts and bounds of the relay.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time for a new control connection to send `Register`.
    pub registration_timeout: Duration,
    /// Time for a QUIC handshake plus the agent's hello.
    pub handshake_timeout: Duration,
    /// Longest wait, for a Watcher connection, for the camera's QUIC tunnel to come up.
    pub tunnel_wait: Duration,
    /// Longest wait for the agent to say whether it reached the camera; above the
    /// agent's own connection timeout (30 s by default), which always produces an answer.
    pub stream_answer_timeout: Duration,
    /// Heartbeats missed before an agent is declared offline.
    pub missed_heartbeats: u32,
    /// Largest heartbeat interval an agent may ask for.
    pub max_heartbeat_interval: Duration,
    /// Watcher connections one camera may have open at once.
    pub max_streams_per_camera: u32,
    /// A playing stream with no media packet for this long is logged and counted as a stall.
    pub stall_after: Duration,
    /// Time a Watcher on the shared port has to send its first request, which names
    /// the camera.
    pub first_request_timeout: Duration,
    /// Handshakes in progress at once, on the control listener (TLS) and on QUIC
    /// (handshake and hello) each; more connections are refused at once.
    pub max_pending_handshakes: usize,
    /// Agents registered at once.
    pub max_agents: usize,
    /// How long `POST /agents/{id}/control` waits for the agent's answer.
    pub command_timeout: Duration,
    /// Failed registrations in a row from one address before it must wait.
    pub failed_registrations: u32,
    /// Longest wait imposed on an address after failed registrations; the wait starts
    /// at 1 s and doubles with each further failure.
    pub max_registration_backoff: Duration,
    /// Registrations admitted a second (a second's worth at once); cameras beyond that
    /// are told when to come back, each a later slot, so a fleet returning after a
    /// restart arrives spread out.
    pub registrations_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            registration_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            tunnel_wait: Duration::from_secs(10),
            stream_answer_timeout: Duration::from_secs(40),
            missed_heartbeats: 3,
            max_heartbeat_interval: Duration::from_secs(300),
            max_streams_per_camera: 64,
            stall_after: Duration::from_secs(5),
            first_request_timeout: Duration::from_secs(10),
            max_pending_handshakes: 256,
            max_agents: 10_000,
            command_timeout: Duration::from_secs(10),
            failed_registrations: 10,
            max_registration_backoff: Duration::from_secs(300),
            registrations_per_sec: 100,
        }
    }
}

/// A configuration error, saying where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the relay config: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said, with line and field.
        message: String,
    },
    /// A value is out of place.
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        /// The file, or `command line`.
        path: String,
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    quic_listen: Option<SocketAddr>,
    data_shards: Option<DataShards>,
    #[serde(default = "default_camera_bind")]
    camera_bind: IpAddr,
    #[serde(default = "default_camera_ports")]
    camera_ports: String,
    shared_listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    shared_token: Option<Secret>,
    admin_token: Option<Secret>,
    #[serde(default)]
    public_metrics: bool,
    #[serde(default)]
    any_certified_agent: bool,
    #[serde(default)]
    require_certificates: bool,
    #[serde(default)]
    agents: Vec<FileAgent>,
    tls: Option<FileTls>,
    #[serde(default)]
    limits: FileLimits,
    cluster: Option<FileCluster>,
    #[serde(default)]
    events: FileEvents,
    #[serde(default)]
    webhooks: Vec<FileWebhook>,
    #[serde(default)]
    updates: FileUpdates,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileUpdates {
    max_transfers: Option<usize>,
    max_rate_kbps: Option<u64>,
    camera_timeout_secs: Option<f64>,
    #[serde(default)]
    release_keys: Vec<PathBuf>,
}

impl FileUpdates {
    fn resolve(self, origin: &str) -> Result<UpdatesConfig, ConfigError> {
        let defaults = UpdatesConfig::default();
        let max_transfers = match self.max_transfers {
            Some(0) => {
                return Err(invalid(
                    origin,
                    "updates.max_transfers",
                    "must be at least 1",
                ))
            }
            Some(n) => n,
            None => defaults.max_transfers,
        };
        let camera_timeout = match self.camera_timeout_secs {
            None => defaults.camera_timeout,
            Some(s) if s.is_finite() && s > 0.0 && s < 1e6 => Duration::from_secs_f64(s),
            Some(s) => {
                return Err(invalid(
                    origin,
                    "updates.camera_timeout_secs",
                    &format!("{s} is not a positive number of seconds"),
                ))
            }
        };
        let mut release_keys = Vec::new();
        for (i, path) in self.release_keys.iter().enumerate() {
            let field = format!("updates.release_keys[{i}]");
            let text = std::fs::read(path)
                .map_err(|e| invalid(origin, &field, &format!("{}: {e}", path.display())))?;
            release_keys.push(
                PublicKey::from_pem(&text).map_err(|why| {
                    invalid(origin, &field, &format!("{}: {why}", path.display()))
                })?,
            );
        }
        let max_rate = match self.max_rate_kbps {
            Some(0) => {
                return Err(invalid(
                    origin,
                    "updates.max_rate_kbps",
                    "must be at least 1 (leave it out for no limit)",
                ))
            }
            Some(kbps) => Some(kbps * 1000 / 8),
            None => None,
        };
        Ok(UpdatesConfig {
            max_transfers,
            max_rate,
            camera_timeout,
            release_keys,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileEvents {
    history: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWebhook {
    name: Option<String>,
    url: String,
    secret: Option<Secret>,
    #[serde(default)]
    events: Vec<String>,
    queue: Option<usize>,
    timeout_secs: Option<f64>,
    retry_max_secs: Option<f64>,
    /// CA of the receiver's certificate, when it is not in the public web PKI.
    ca: Option<PathBuf>,
}

impl FileWebhook {
    fn resolve(self, origin: &str, i: usize) -> Result<WebhookConfig, ConfigError> {
        let field = |name: &str| format!("webhooks[{i}].{name}");
        let trust = match &self.ca {
            Some(path) => common::tls::RelayTrust::Ca(
                common::tls::load_roots(path)
                    .map_err(|e| invalid(origin, &field("ca"), &e.to_string()))?,
            ),
            None => common::tls::RelayTrust::WebPki,
        };
        let tls =
            || common::tls::client_config(&trust, None, b"http/1.1").map_err(|e| e.to_string());
        let target =
            Target::parse(&self.url, tls).map_err(|why| invalid(origin, &field("url"), &why))?;
        let secret = self.secret.filter(|s| !s.is_empty()).ok_or_else(|| {
            invalid(
                origin,
                &field("secret"),
                "every webhook needs a secret, the key of its events' HMAC-SHA256 signature \
                 (any long random string, e.g. from `openssl rand -hex 32`)",
            )
        })?;
        let types =
            TypeFilter::new(self.events).map_err(|why| invalid(origin, &field("events"), &why))?;
        let queue = match self.queue {
            Some(0) => return Err(invalid(origin, &field("queue"), "must be at least 1")),
            Some(n) => n,
            None => DEFAULT_WEBHOOK_QUEUE,
        };
        let secs = |value: Option<f64>, name: &str, default: Duration| match value {
            None => Ok(default),
            Some(s) if s.is_finite() && s > 0.0 && s < 1e6 => Ok(Duration::from_secs_f64(s)),
            Some(s) => Err(invalid(
                origin,
                &field(name),
                &format!("{s} is not a positive number of seconds"),
            )),
        };
        let timeout = secs(self.timeout_secs, "timeout_secs", DEFAULT_WEBHOOK_TIMEOUT)?;
        let retry_max = secs(
            self.retry_max_secs,
            "retry_max_secs",
            DEFAULT_WEBHOOK_RETRY_MAX,
        )?;
        Ok(WebhookConfig {
            name: self.name.unwrap_or_else(|| target.origin()),
            target,
            types,
            secret,
            queue,
            timeout,
            retry_max,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    etcd_endpoints: OneOrMany<String>,
    relay_id: String,
    advertise: String,
    lease_ttl_secs: Option<u64>,
    key_prefix: Option<String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password: Option<Secret>,
    peer_listen: Option<SocketAddr>,
    peer_advertise: Option<String>,
    peer_cert: Option<PathBuf>,
    peer_key: Option<PathBuf>,
    peer_ca: Option<PathBuf>,
    watchers: Option<String>,
    rtsp_advertise: Option<String>,
    remote_camera_ports: Option<bool>,
    agent_url: Option<String>,
    balance: Option<f64>,
    drain_rate: Option<u32>,
}

/// `host:port`, with a port from 1 up.
fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// The host of an `http(s)://host:port/…` URL (brackets kept around IPv6).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => host,
        _ => authority,
    }
}

impl FileCluster {
    fn resolve(
        self,
        origin: &str,
        shared_listen: Option<SocketAddr>,
    ) -> Result<ClusterConfig, ConfigError> {
        let field = |name: &str| format!("cluster.{name}");
        let endpoints = self.etcd_endpoints.into_vec();
        if endpoints.is_empty() {
            return Err(invalid(
                origin,
                &field("etcd_endpoints"),
                "name at least one etcd member",
            ));
        }
        for endpoint in &endpoints {
            if !is_http_url(endpoint) {
                return Err(invalid(
                    origin,
                    &field("etcd_endpoints"),
                    &format!("{endpoint:?} is not an etcd client URL, e.g. http://10.0.0.1:2379"),
                ));
            }
        }
        check_agent_id(&self.relay_id)
            .map_err(|why| invalid(origin, &field("relay_id"), &format!("a relay id {why}")))?;
        if !is_http_url(&self.advertise) {
            return Err(invalid(
                origin,
                &field("advertise"),
                &format!(
                    "{:?} is not a URL of this relay's control port, e.g. http://10.0.0.11:8080",
                    self.advertise
                ),
            ));
        }
        let lease_ttl = match self.lease_ttl_secs {
            None => DEFAULT_LEASE_TTL,
            Some(secs @ 2..=300) => Duration::from_secs(secs),
            Some(_) => {
                return Err(invalid(
                    origin,
                    &field("lease_ttl_secs"),
                    "must be from 2 to 300 seconds",
                ))
            }
        };
        let key_prefix = self
            .key_prefix
            .unwrap_or_else(|| "/camera-relay/".to_string());
        if key_prefix.is_empty() || !key_prefix.ends_with('/') {
            return Err(invalid(origin, &field("key_prefix"), "must end with \"/\""));
        }
        let identity = match (self.etcd_cert, self.etcd_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    origin,
                    &field("etcd_key"),
                    "etcd_cert needs its key",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    origin,
                    &field("etcd_cert"),
                    "etcd_key needs its certificate",
                ))
            }
        };
        let user = match (self.etcd_user, self.etcd_password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    origin,
                    &field("etcd_password"),
                    "etcd_user needs its password",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    origin,
                    &field("etcd_user"),
                    "etcd_password needs its user",
                ))
            }
        };
        let tls_asked = self.etcd_ca.is_some() || identity.is_some();
        if tls_asked && endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(invalid(
                origin,
                &field("etcd_endpoints"),
                "TLS files are set, so every endpoint must be https://",
            ));
        }
        let peer = match (
            self.peer_listen,
            self.peer_cert,
            self.peer_key,
            self.peer_ca,
        ) {
            (None, None, None, None) => {
                if self.peer_advertise.is_some() {
                    return Err(invalid(
                        origin,
                        &field("peer_advertise"),
                        "set peer_listen too, or leave both out",
                    ));
                }
                None
            }
            (Some(listen), Some(cert), Some(key), Some(ca)) => {
                let advertise = match self.peer_advertise {
                    Some(address) => address,
                    None => format!("{}:{}", url_host(&self.advertise), listen.port()),
                };
                Some(PeerConfig {
                    listen,
                    advertise,
                    identity: (cert, key),
                    ca,
                })
            }
            _ => {
                return Err(invalid(
                    origin,
                    &field("peer_listen"),
                    "the relay-to-relay link needs all of peer_listen, peer_cert, peer_key \
                     and peer_ca (certificates from `certs peer --id <relay_id>`), or none",
                ))
            }
        };
        let crossing = match self.watchers.as_deref() {
            None | Some("forward") => Crossing::Forward,
            Some("redirect") => Crossing::Redirect,
            Some(other) => {
                return Err(invalid(
                    origin,
                    &field("watchers"),
                    &format!("{other:?} is not \"forward\" or \"redirect\""),
                ))
            }
        };
        let rtsp_advertise = match (self.rtsp_advertise, shared_listen) {
            (Some(address), _) => Some(address),
            (None, Some(shared)) => {
                Some(format!("{}:{}", url_host(&self.advertise), shared.port()))
            }
            (None, None) => None,
        };
        for (name, address) in [
            ("rtsp_advertise", rtsp_advertise.as_deref()),
            (
                "peer_advertise",
                peer.as_ref().map(|p| p.advertise.as_str()),
            ),
        ] {
            if address.is_some_and(|a| !is_host_port(a)) {
                return Err(invalid(
                    origin,
                    &field(name),
                    &format!(
                        "{:?} is not host:port, e.g. 10.0.0.11:8553",
                        address.unwrap_or_default()
                    ),
                ));
            }
        }
        let remote_camera_ports = self.remote_camera_ports.unwrap_or(false);
        if remote_camera_ports && peer.is_none() {
            return Err(invalid(
                origin,
                &field("remote_camera_ports"),
                "serving other relays' cameras' ports needs the relay-to-relay link: set \
                 peer_listen (and its certificates) too",
            ));
        }
        let agent_url = match self.agent_url {
            Some(url) if url.starts_with("ws://") || url.starts_with("wss://") => url,
            Some(url) => {
                return Err(invalid(
                    origin,
                    &field("agent_url"),
                    &format!(
                    "{url:?} is not a ws:// or wss:// URL, e.g. wss://relay-a.example.com/tunnel"
                ),
                ))
            }
            None => {
                let scheme = match self.advertise.starts_with("https://") {
                    true => "wss",
                    false => "ws",
                };
                let authority = self
                    .advertise
                    .split_once("://")
                    .map_or("", |(_, rest)| rest.split('/').next().unwrap_or_default());
                format!("{scheme}://{authority}/tunnel")
            }
        };
        let balance = match self.balance {
            None => None,
            Some(share) if (1.0..=10.0).contains(&share) => Some(share),
            Some(_) => {
                return Err(invalid(
                    origin,
                    &field("balance"),
                    "a share from 1.0 (every relay exactly its part of the cameras) to 10.0; \
                     1.25 lets a relay hold a quarter more than its part",
                ))
            }
        };
        let drain_rate = match self.drain_rate {
            None => DEFAULT_DRAIN_RATE,
            Some(rate @ 1..=10_000) => rate,
            Some(_) => {
                return Err(invalid(
                    origin,
                    &field("drain_rate"),
                    "cameras moved a second while draining: 1 to 10000",
                ))
            }
        };
        Ok(ClusterConfig {
            agent_url,
            balance,
            drain_rate,
            remote_camera_ports,
            crossing,
            rtsp_advertise,
            peer,
            endpoints,
            relay_id: self.relay_id,
            advertise: self.advertise.trim_end_matches('/').to_string(),
            lease_ttl,
            key_prefix,
            ca: self.etcd_ca,
            identity,
            user,
        })
    }
}

/// `http://host:port` or `https://host:port` (a path is allowed, nothing is checked beyond).
fn is_http_url(text: &str) -> bool {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"));
    rest.is_some_and(|rest| {
        let authority = rest.split('/').next().unwrap_or_default();
        !authority.is_empty() && !authority.contains(char::is_whitespace)
    })
}

/// `data_shards`: a number, or `"auto"` for one per core.
#[derive(Deserialize)]
#[serde(untagged)]
enum DataShards {
    Count(i64),
    Word(String),
}

impl DataShards {
    fn resolve(self, origin: &str) -> Result<usize, ConfigError> {
        match self {
            DataShards::Count(n) if (1..=MAX_DATA_SHARDS as i64).contains(&n) => Ok(n as usize),
            DataShards::Word(word) if word == "auto" => Ok(cores()),
            _ => Err(invalid(
                origin,
                "data_shards",
                &format!(
                    "must be a number from 1 to {MAX_DATA_SHARDS}, or \"auto\" (one per core)"
                ),
            )),
        }
    }
}

/// Most data-plane shards a relay runs.
pub const MAX_DATA_SHARDS: usize = 64;

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_DATA_SHARDS)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    id: String,
    token: Option<Secret>,
    token_hash: Option<OneOrMany<Secret>>,
    port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTls {
    #[serde(alias = "quic_cert")]
    cert: Option<PathBuf>,
    #[serde(alias = "quic_key")]
    key: Option<PathBuf>,
    #[serde(default)]
    plain_control: bool,
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    registration_timeout_secs: Option<f64>,
    handshake_timeout_secs: Option<f64>,
    tunnel_wait_secs: Option<f64>,
    stream_answer_timeout_secs: Option<f64>,
    missed_heartbeats: Option<u32>,
    max_heartbeat_interval_secs: Option<f64>,
    max_streams_per_camera: Option<u32>,
    stall_secs: Option<f64>,
    first_request_secs: Option<f64>,
    max_pending_handshakes: Option<usize>,
    max_agents: Option<usize>,
    command_timeout_secs: Option<f64>,
    failed_registrations: Option<u32>,
    max_registration_backoff_secs: Option<f64>,
    registrations_per_sec: Option<u32>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_PORT)
}

fn default_camera_bind() -> IpAddr {
    Ipv4Addr::LOCALHOST.into()
}

fn default_camera_ports() -> String {
    format!(
        "{}-{}",
        DEFAULT_CAMERA_PORT,
        DEFAULT_CAMERA_PORT + DEFAULT_CAMERA_PORTS - 1
    )
}

impl RelayConfig {
    /// The seed-style quick start: one shared token, control and QUIC on `port`,
    /// cameras from `tunnel_port` up, state kept in memory.
    pub fn quick(listen: SocketAddr, tunnel_port: u16, token: Secret) -> Result<Self, ConfigError> {
        if token.is_empty() {
            return Err(invalid("command line", "--token", "must not be empty"));
        }
        let last = tunnel_port.saturating_add(DEFAULT_CAMERA_PORTS - 1);
        Ok(RelayConfig {
            listen,
            quic_listen: listen,
            data_shards: 1,
            camera_bind: default_camera_bind(),
            camera_ports: tunnel_port..=last,
            shared_listen: None,
            state_dir: None,
            auth: AgentAuth {
                shared_token: Some(token),
                ..AgentAuth::default()
            },
            tls: TlsConfig::default(),
            limits: Limits::default(),
            api: ApiConfig::default(),
            cluster: None,
            event_history: DEFAULT_HISTORY,
            webhooks: Vec::new(),
            updates: UpdatesConfig::default(),
        })
    }

    /// Adds the shared RTSP port (`--shared-port`) on the camera address.
    pub fn with_shared_port(mut self, port: u16) -> Result<Self, ConfigError> {
        let addr = SocketAddr::new(self.camera_bind, port);
        check_shared_listen(addr, &self.camera_ports, "command line", "--shared-port")?;
        self.shared_listen = Some(addr);
        Ok(self)
    }

    /// Reads and checks a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let camera_ports = parse_port_range(&file.camera_ports).ok_or_else(|| {
            invalid(
                origin,
                "camera_ports",
                "expected FIRST-LAST, e.g. 8554-8653, with FIRST <= LAST and FIRST > 0",
            )
        })?;
        if let Some(addr) = file.shared_listen {
            check_shared_listen(addr, &camera_ports, origin, "shared_listen")?;
        }

        let mut agents = HashMap::new();
        for (i, agent) in file.agents.into_iter().enumerate() {
            let field = |name: &str| format!("agents[{i}].{name}");
            if let Err(reason) = check_agent_id(&agent.id) {
                return Err(invalid(origin, &field("id"), &reason));
            }
            let token = match (agent.token, agent.token_hash) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        origin,
                        &field("token_hash"),
                        "give token or token_hash, not both",
                    ))
                }
                (Some(t), None) if t.is_empty() => {
                    return Err(invalid(origin, &field("token"), "must not be empty"))
                }
                (Some(t), None) => Some(Token::Plain(t)),
                (None, Some(hashes)) => {
                    let hashes = hashes.into_vec();
                    if hashes.is_empty() {
                        return Err(invalid(
                            origin,
                            &field("token_hash"),
                            "an empty list admits nobody; leave it out for a certificate-only agent",
                        ));
                    }
                    for hash in &hashes {
                        check_token_hash(hash.expose())
                            .map_err(|why| invalid(origin, &field("token_hash"), &why))?;
                    }
                    Some(Token::Hash(hashes))
                }
                (None, None) => None,
            };
            if let Some(port) = agent.port {
                if !camera_ports.contains(&port) {
                    return Err(invalid(
                        origin,
                        &field("port"),
                        &format!("{port} is outside camera_ports {}", file.camera_ports),
                    ));
                }
            }
            let entry = AgentEntry {
                token,
                port: agent.port,
            };
            if agents.insert(agent.id.clone(), entry).is_some() {
                return Err(invalid(
                    origin,
                    &field("id"),
                    &format!("{:?} is listed twice", agent.id),
                ));
            }
        }
        if let Some(token) = &file.shared_token {
            if token.is_empty() {
                return Err(invalid(
                    origin,
                    "shared_token",
                    "must not be empty (leave it out to admit only listed agents)",
                ));
            }
        }
        let tls = file.tls.unwrap_or_default();
        let identity = match (tls.cert, tls.key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err(invalid(origin, "tls.key", "tls.cert needs its key")),
            (None, Some(_)) => {
                return Err(invalid(origin, "tls.cert", "tls.key needs its certificate"))
            }
        };
        let certificates_possible = tls.client_ca.is_some();
        if !certificates_possible {
            let needs_ca = if file.any_certified_agent {
                Some("any_certified_agent")
            } else if file.require_certificates {
                Some("require_certificates")
            } else {
                agents
                    .iter()
                    .find(|(_, a)| a.token.is_none())
                    .map(|_| "agents")
            };
            if let Some(field) = needs_ca {
                return Err(invalid(
                    origin,
                    field,
                    "agents can only prove themselves with certificates if tls.client_ca names their CA \
                     (an [[agents]] entry without token or token_hash means: certificate only)",
                ));
            }
        }
        if agents.is_empty() && file.shared_token.is_none() && !file.any_certified_agent {
            return Err(invalid(
                origin,
                "agents",
                "no agent could register: list [[agents]], set shared_token, or any_certified_agent",
            ));
        }

        let defaults = Limits::default();
        let l = file.limits;
        let secs = |v: Option<f64>, name: &str, default: Duration| match v {
            None => Ok(default),
            Some(s) if s.is_finite() && s > 0.0 && s < 1e6 => Ok(Duration::from_secs_f64(s)),
            Some(s) => Err(invalid(
                origin,
                &format!("limits.{name}"),
                &format!("{s} is not a positive number of seconds"),
            )),
        };
        let limits = Limits {
            registration_timeout: secs(
                l.registration_timeout_secs,
                "registration_timeout_secs",
                defaults.registration_timeout,
            )?,
            handshake_timeout: secs(
                l.handshake_timeout_secs,
                "handshake_timeout_secs",
                defaults.handshake_timeout,
            )?,
            tunnel_wait: secs(l.tunnel_wait_secs, "tunnel_wait_secs", defaults.tunnel_wait)?,
            stream_answer_timeout: secs(
                l.stream_answer_timeout_secs,
                "stream_answer_timeout_secs",
                defaults.stream_answer_timeout,
            )?,
            missed_heartbeats: match l.missed_heartbeats {
                Some(0) => {
                    return Err(invalid(
                        origin,
                        "limits.missed_heartbeats",
                        "must be at least 1",
                    ))
                }
                Some(n) => n,
                None => defaults.missed_heartbeats,
            },
            max_heartbeat_interval: secs(
                l.max_heartbeat_interval_secs,
                "max_heartbeat_interval_secs",
                defaults.max_heartbeat_interval,
            )?,
            max_streams_per_camera: match l.max_streams_per_camera {
                Some(0) => {
                    return Err(invalid(
                        origin,
                        "limits.max_streams_per_camera",
                        "must be at least 1",
                    ))
                }
                Some(n) => n,
                None => defaults.max_streams_per_camera,
            },
            stall_after: secs(l.stall_secs, "stall_secs", defaults.stall_after)?,
            first_request_timeout: secs(
                l.first_request_secs,
                "first_request_secs",
                defaults.first_request_timeout,
            )?,
            max_pending_handshakes: match l.max_pending_handshakes {
                Some(0) => {
                    return Err(invalid(
                        origin,
                        "limits.max_pending_handshakes",
                        "must be at least 1",
                    ))
                }
                Some(n) => n,
                None => defaults.max_pending_handshakes,
            },
            max_agents: match l.max_agents {
                Some(0) => return Err(invalid(origin, "limits.max_agents", "must be at least 1")),
                Some(n) => n,
                None => defaults.max_agents,
            },
            command_timeout: secs(
                l.command_timeout_secs,
                "command_timeout_secs",
                defaults.command_timeout,
            )?,
            failed_registrations: match l.failed_registrations {
                Some(0) => {
                    return Err(invalid(
                        origin,
                        "limits.failed_registrations",
                        "must be at least 1",
                    ))
                }
                Some(n) => n,
                None => defaults.failed_registrations,
            },
            max_registration_backoff: secs(
                l.max_registration_backoff_secs,
                "max_registration_backoff_secs",
                defaults.max_registration_backoff,
            )?,
            registrations_per_sec: match l.registrations_per_sec {
                Some(0) => {
                    return Err(invalid(
                        origin,
                        "limits.registrations_per_sec",
                        "must be at least 1",
                    ))
                }
                Some(n) => n,
                None => defaults.registrations_per_sec,
            },
        };

        Ok(RelayConfig {
            listen: file.listen,
            quic_listen: file.quic_listen.unwrap_or(file.listen),
            data_shards: match file.data_shards {
                Some(shards) => shards.resolve(origin)?,
                None => 1,
            },
            camera_bind: file.camera_bind,
            camera_ports,
            shared_listen: file.shared_listen,
            state_dir: file.state_dir,
            auth: AgentAuth {
                agents,
                shared_token: file.shared_token,
                any_certified_agent: file.any_certified_agent,
                require_certificates: file.require_certificates,
            },
            tls: TlsConfig {
                identity,
                plain_control: tls.plain_control,
                client_ca: tls.client_ca,
            },
            api: ApiConfig {
                admin_token: file.admin_token.filter(|t| !t.is_empty()),
                public_metrics: file.public_metrics,
            },
            limits,
            cluster: file
                .cluster
                .map(|c| c.resolve(origin, file.shared_listen))
                .transpose()?,
            event_history: match file.events.history {
                Some(0) => return Err(invalid(origin, "events.history", "must be at least 1")),
                Some(n) => n,
                None => DEFAULT_HISTORY,
            },
            webhooks: file
                .webhooks
                .into_iter()
                .enumerate()
                .map(|(i, hook)| hook.resolve(origin, i))
                .collect::<Result<_, _>>()?,
            updates: file.updates.resolve(origin)?,
        })
    }
}

impl fmt::Display for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "control {} (TCP), QUIC {} (UDP), cameras on {}:{}-{}{}, {} listed agent(s){}",
            self.listen,
            self.quic_listen,
            self.camera_bind,
            self.camera_ports.start(),
            self.camera_ports.end(),
            match self.shared_listen {
                Some(addr) => format!(" and {addr}/<agent-id>/…"),
                None => String::new(),
            },
            self.auth.agents.len(),
            if self.auth.shared_token.is_some() {
                ", shared token"
            } else {
                ""
            }
        )
    }
}

fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let (first, last) = s.split_once('-')?;
    let first: u16 = first.trim().parse().ok()?;
    let last: u16 = last.trim().parse().ok()?;
    (first > 0 && first <= last).then_some(first..=last)
}

/// Checks that `hash` is a PHC-format argon2 hash (what `certs token` prints).
fn check_token_hash(hash: &str) -> Result<(), String> {
    use argon2::password_hash::PasswordHash;
    match PasswordHash::new(hash) {
        Ok(parsed) if parsed.algorithm.as_str().starts_with("argon2") => Ok(()),
        Ok(parsed) => Err(format!(
            "{} hashes are not accepted; use argon2 (`certs token` makes one)",
            parsed.algorithm
        )),
        Err(e) => Err(format!(
            "not a PHC hash string ({e}); `certs token --id <id>` prints one"
        )),
    }
}

fn check_shared_listen(
    addr: SocketAddr,
    camera_ports: &RangeInclusive<u16>,
    origin: &str,
    field: &str,
) -> Result<(), ConfigError> {
    if camera_ports.contains(&addr.port()) {
        return Err(invalid(
            origin,
            field,
            &format!(
                "port {} is one of the camera ports {}-{}; pick one outside them",
                addr.port(),
                camera_ports.start(),
                camera_ports.end()
            ),
        ));
    }
    Ok(())
}

fn invalid(path: &str, field: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_string(),
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        RelayConfig::from_toml(text, "relay.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_updates_section_bounds_transfers() {
        let c = RelayConfig::from_toml(
            "shared_token = \"t\"\n[updates]\nmax_transfers = 2\nmax_rate_kbps = 800\ncamera_timeout_secs = 60\n",
            "relay.toml",
        )
        .unwrap();
        assert_eq!(c.updates.max_transfers, 2);
        assert_eq!(c.updates.max_rate, Some(100_000));
        assert_eq!(c.updates.camera_timeout, Duration::from_secs(60));
        let e = err("shared_token = \"t\"\n[updates]\nmax_transfers = 0\n");
        assert!(e.contains("updates.max_transfers"), "{e}");
        let e = err("shared_token = \"t\"\n[updates]\nrelease_keys = [\"/nonexistent.pub\"]\n");
        assert!(
            e.contains("updates.release_keys[0]") && e.contains("/nonexistent.pub"),
            "{e}"
        );
    }

    #[test]
    fn webhooks_need_a_url_a_secret_and_known_event_types() {
        let hook = |fields: &str| format!("shared_token = \"t\"\n[[webhooks]]\n{fields}\n");
        let config = RelayConfig::from_toml(
            &hook(
                "url = \"https://vms.example/hooks?key=k\"\nsecret = \"s\"\n\
                 events = [\"camera.online\", \"watcher.*\"]\ntimeout_secs = 2",
            ),
            "relay.toml",
        )
        .unwrap();
        let webhook = &config.webhooks[0];
        assert_eq!(webhook.name, "https://vms.example:443");
        assert_eq!(webhook.timeout, Duration::from_secs(2));
        assert_eq!(webhook.queue, DEFAULT_WEBHOOK_QUEUE);
        assert!(webhook.types.passes("watcher.stalled"));
        assert!(!webhook.types.passes("camera.offline"));
        assert_eq!(config.event_history, DEFAULT_HISTORY);

        let e = err(&hook("url = \"http://vms/\""));
        assert!(
            e.contains("webhooks[0].secret") && e.contains("openssl rand"),
            "{e}"
        );
        let e = err(&hook("url = \"vms.example/hooks\"\nsecret = \"s\""));
        assert!(
            e.contains("webhooks[0].url") && e.contains("http://"),
            "{e}"
        );
        let e = err(&hook(
            "url = \"http://vms/\"\nsecret = \"s\"\nevents = [\"camera.up\"]",
        ));
        assert!(
            e.contains("webhooks[0].events") && e.contains("camera.online"),
            "{e}"
        );
        let e = err(&hook(
            "url = \"https://vms/\"\nsecret = \"s\"\nca = \"/nonexistent/ca.crt\"",
        ));
        assert!(
            e.contains("webhooks[0].ca") && e.contains("/nonexistent/ca.crt"),
            "{e}"
        );
        let e = err(&hook("url = \"http://vms/\"\nsecret = \"s\"\nqueue = 0"));
        assert!(e.contains("webhooks[0].queue"), "{e}");
        let e = err("shared_token = \"t\"\n[events]\nhistory = 0\n");
        assert!(e.contains("events.history"), "{e}");
    }

    #[test]
    fn a_cluster_section_names_etcd_this_relay_and_its_address() {
        let base = "shared_token = \"t\"\n[cluster]\nrelay_id = \"relay-a\"\nadvertise = \"http://10.0.0.11:8080/\"\n";
        let config = RelayConfig::from_toml(
            &format!(
                "{base}etcd_endpoints = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n"
            ),
            "relay.toml",
        )
        .unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.endpoints.len(), 2);
        assert_eq!(cluster.relay_id, "relay-a");
        assert_eq!(
            cluster.advertise, "http://10.0.0.11:8080",
            "trailing / dropped"
        );
        assert_eq!(cluster.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(cluster.key_prefix, "/camera-relay/");
        assert!(cluster.peer.is_none());
        let peer = RelayConfig::from_toml(
            &format!(
                "{base}etcd_endpoints = \"http://e:2379\"\npeer_listen = \"0.0.0.0:8445\"\n\
                 peer_cert = \"peer-relay-a.crt\"\npeer_key = \"peer-relay-a.key\"\npeer_ca = \"ca.crt\"\n"
            ),
            "relay.toml",
        )
        .unwrap()
        .cluster
        .unwrap()
        .peer
        .unwrap();
        assert_eq!(
            peer.advertise, "10.0.0.11:8445",
            "the advertised host, the peer port"
        );
        assert_eq!(url_host("https://[2001:db8::1]:8080/x"), "[2001:db8::1]");
        assert_eq!(url_host("http://relay-a.lan"), "relay-a.lan");
        assert!(RelayConfig::from_toml("shared_token = \"t\"\n", "x")
            .unwrap()
            .cluster
            .is_none());

        for (extra, field, words) in [
            (
                "etcd_endpoints = []\n",
                "cluster.etcd_endpoints",
                "at least one",
            ),
            (
                "etcd_endpoints = \"10.0.0.1:2379\"\n",
                "cluster.etcd_endpoints",
                "e.g. http://",
            ),
            (
                "etcd_endpoints = \"http://e:2379\"\nlease_ttl_secs = 1\n",
                "cluster.lease_ttl_secs",
                "2 to 300",
            ),
            (
                "etcd_endpoints = \"http://e:2379\"\netcd_ca = \"/ca.pem\"\n",
                "cluster.etcd_endpoints",
                "https://",
            ),
            (
                "etcd_endpoints = \"https://e:2379\"\netcd_user = \"relay\"\n",
                "cluster.etcd_password",
                "needs its password",
            ),
            (
                "etcd_endpoints = \"https://e:2379\"\netcd_cert = \"/c.pem\"\n",
                "cluster.etcd_key",
                "needs its key",
            ),
            (
                "etcd_endpoints = \"http://e:2379\"\nkey_prefix = \"/x\"\n",
                "cluster.key_prefix",
                "end with",
            ),
            (
                "etcd_endpoints = \"http://e:2379\"\npeer_listen = \"0.0.0.0:8445\"\n",
                "cluster.peer_listen",
                "certs peer",
            ),
            (
                "etcd_endpoints = \"http://e:2379\"\npeer_advertise = \"h:1\"\n",
                "cluster.peer_advertise",
                "peer_listen",
            ),
            (
                "etcd_endpoints = \"http://e:2379\"\npeer_listen = \"0.0.0.0:8445\"\npeer_cert = \"c\"\npeer_key = \"k\"\npeer_ca = \"ca\"\npeer_advertise = \"10.0.0.11\"\n",
                "cluster.peer_advertise",
                "host:port",
            ),
        ] {
            let e = err(&format!("{base}{extra}"));
            assert!(e.contains(field) && e.contains(words), "{extra}: {e}");
        }
        let e = err("shared_token = \"t\"\n[cluster]\nrelay_id = \"a b\"\nadvertise = \"http://h:1\"\netcd_endpoints = \"http://e:2379\"\n");
        assert!(e.contains("cluster.relay_id"), "{e}");
        let e = err("shared_token = \"t\"\n[cluster]\nrelay_id = \"a\"\nadvertise = \"10.0.0.11:8080\"\netcd_endpoints = \"http://e:2379\"\n");
        assert!(
            e.contains("cluster.advertise") && e.contains("http://"),
            "{e}"
        );
        let e = err("shared_token = \"t\"\n[cluster]\nrelay_id = \"a\"\nadvertise = \"http://h:1\"\netcd_endpoints = \"http://e:2379\"\netcd = 1\n");
        assert!(e.contains("unknown field") && e.contains("etcd"), "{e}");
    }

    #[test]
    fn data_shards_are_a_count_or_auto() {
        let shards = |value: &str| {
            RelayConfig::from_toml(
                &format!("shared_token = \"t\"\ndata_shards = {value}\n"),
                "relay.toml",
            )
            .map(|c| c.data_shards)
        };
        assert_eq!(
            RelayConfig::from_toml("shared_token = \"t\"", "x")
                .unwrap()
                .data_shards,
            1
        );
        assert_eq!(shards("4").unwrap(), 4);
        assert_eq!(shards("\"auto\"").unwrap(), cores());
        for bad in ["0", "65", "\"many\"", "-1"] {
            let e = shards(bad).unwrap_err().to_string();
            assert!(
                e.contains("data_shards") && e.contains("auto"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn full_config_parses() {
        let c = RelayConfig::from_toml(
            r#"
            listen = "127.0.0.1:9000"
            camera_ports = "10000-10009"
            state_dir = "/tmp/x"
            [[agents]]
            id = "cam-1"
            token = "t1"
            port = 10005
            [limits]
            missed_heartbeats = 5
            "#,
            "relay.toml",
        )
        .unwrap();
        assert_eq!(c.quic_listen, c.listen);
        assert_eq!(c.camera_ports, 10000..=10009);
        assert_eq!(c.auth.agents["cam-1"].port, Some(10005));
        assert_eq!(c.limits.missed_heartbeats, 5);
        assert!(c.auth.shared_token.is_none());
    }

    #[test]
    fn the_example_in_deploy_parses() {
        let c =
            RelayConfig::from_toml(include_str!("../../deploy/relay.toml"), "deploy/relay.toml")
                .unwrap();
        assert_eq!(c.auth.agents.len(), 2);
        assert_eq!(c.camera_ports, 8554..=8653);
        assert_eq!(c.shared_listen, Some(([127, 0, 0, 1], 8553).into()));
        assert_eq!(c.limits.missed_heartbeats, 3);
        assert!(c.cluster.is_none(), "a relay alone unless [cluster] is set");

        // Its commented events and webhook, switched on, parse.
        let text = include_str!("../../deploy/relay.toml");
        let (_, events) = text.split_once("# [events]\n").unwrap();
        let (events, _) = events.split_once("\n\n").unwrap();
        let events: String = events
            .lines()
            .filter(|line| !line.starts_with("# #"))
            .map(|line| format!("{}\n", line.trim_start_matches('#').trim_start()))
            .collect();
        let c = RelayConfig::from_toml(&format!("shared_token = \"t\"\n[events]\n{events}"), "x")
            .unwrap();
        assert_eq!(c.event_history, 10_000);
        assert_eq!(c.webhooks[0].name, "watcher");
        assert!(c.webhooks[0].types.passes("camera.online"));

        // Its commented [cluster] section, switched on, is the cluster example's.
        let (_, section) = text.split_once("# [cluster]\n").unwrap();
        let section: String = section
            .lines()
            .filter(|line| !line.starts_with("# #"))
            .map(|line| format!("{}\n", line.trim_start_matches("# ")))
            .collect();
        let c = RelayConfig::from_toml(&format!("shared_token = \"t\"\n[cluster]\n{section}"), "x")
            .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.endpoints.len(), 3);
        assert_eq!(cluster.peer.unwrap().advertise, "10.0.0.11:8445");
        assert_eq!(cluster.crossing, Crossing::Forward);
        assert_eq!(cluster.balance, Some(1.25));
        assert_eq!(cluster.agent_url, "wss://relay-a.example.com/tunnel");
        let c = RelayConfig::from_toml(
            include_str!("../../deploy/cluster/relay-a.toml"),
            "deploy/cluster/relay-a.toml",
        )
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.relay_id, "relay-a");
        assert_eq!(cluster.peer.unwrap().advertise, "10.0.0.11:8445");
        assert_eq!(cluster.agent_url, "ws://10.0.0.11:8080/tunnel");
        assert_eq!(cluster.rtsp_advertise.as_deref(), Some("10.0.0.11:8553"));
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = err("shared_token = \"x\"\nlisten_adress = \"1.2.3.4:5\"");
        assert!(
            e.contains("relay.toml") && e.contains("listen_adress"),
            "{e}"
        );
        let e = err("shared_token = \"x\"\ncamera_ports = \"9-1\"");
        assert!(e.contains("camera_ports"), "{e}");
        let e = err("[[agents]]\nid = \"bad id\"\ntoken = \"t\"");
        assert!(e.contains("agents[0].id"), "{e}");
        let e = err("[[agents]]\nid = \"a\"\ntoken = \"t\"\nport = 1");
        assert!(e.contains("agents[0].port") && e.contains("outside"), "{e}");
        let e = err("");
        assert!(e.contains("no agent could register"), "{e}");
        let e = err("shared_token = \"x\"\nshared_listen = \"127.0.0.1:8600\"");
        assert!(
            e.contains("shared_listen") && e.contains("camera ports"),
            "{e}"
        );
        let e = err("shared_token = \"x\"\n[limits]\ntunnel_wait_secs = -1");
        assert!(e.contains("limits.tunnel_wait_secs"), "{e}");
    }

    #[test]
    fn credentials_are_checked_where_they_are_written() {
        let e = err("[[agents]]\nid = \"a\"\ntoken_hash = \"plain\"");
        assert!(
            e.contains("agents[0].token_hash") && e.contains("certs token"),
            "{e}"
        );
        let e = err("[[agents]]\nid = \"a\"\ntoken = \"t\"\ntoken_hash = \"h\"");
        assert!(e.contains("not both"), "{e}");
        let e = err("[[agents]]\nid = \"a\"");
        assert!(
            e.contains("tls.client_ca"),
            "a certificate-only agent needs a CA: {e}"
        );
        let e = err("any_certified_agent = true");
        assert!(
            e.contains("any_certified_agent") && e.contains("tls.client_ca"),
            "{e}"
        );
        let e = err("shared_token = \"x\"\n[tls]\ncert = \"r.crt\"");
        assert!(e.contains("tls.key"), "{e}");

        let c = RelayConfig::from_toml(
            "any_certified_agent = true\n[tls]\nclient_ca = \"ca.crt\"\n[[agents]]\nid = \"a\"",
            "relay.toml",
        )
        .unwrap();
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$hIK5j9K16AL2wcYii+xXww$UaLWEuWIl+kwi5umW0xrAguGUG3ZHoG1LfjobiZHQDk";
        let two = RelayConfig::from_toml(
            &format!("[[agents]]\nid = \"a\"\ntoken_hash = [\"{hash}\", \"{hash}\"]"),
            "relay.toml",
        )
        .unwrap();
        assert!(matches!(&two.auth.agents["a"].token, Some(Token::Hash(h)) if h.len() == 2));
        assert!(c.auth.any_certified_agent && c.auth.agents["a"].token.is_none());
        let deploy =
            RelayConfig::from_toml(include_str!("../../deploy/relay.toml"), "deploy/relay.toml")
                .unwrap();
        assert!(matches!(
            deploy.auth.agents["dahua-2449s-il-002"].token,
            Some(Token::Hash(_))
        ));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = RelayConfig::from_toml(
            "shared_token = \"sh4red\"\n[[agents]]\nid = \"a\"\ntoken = \"0wn\"",
            "relay.toml",
        )
        .unwrap();
        let text = format!("{c:?} {c}");
        assert!(!text.contains("sh4red") && !text.contains("0wn"), "{text}");
    }
}
