//! The agent's config file: the JSON the earlier Python agent used
//! (`/etc/camera_agent/config.json`), read as-is, parsed into an [`AgentConfig`] that
//! needs no further checks.
//!
//! Every setting the earlier agent had is accepted: those that mean something here are
//! honoured wherever it kept them (`network.*` or `tunnel.*`; `streaming.rtsp_port` or
//! `camera.rtsp_port`; `tunnel_server_url` or `cloud_server_url`), with a note when a
//! file sets one in two places; those that mean nothing here ([`EARLIER_UNUSED`]) are
//! listed once in the log. A name that no version of the agent had is an error naming
//! the file, the field and the reason. docs/agent-config.md has the whole table.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use common::{
    protocol::{check_agent_id, sha256_from_hex, FALLBACK_PATH_SUFFIX},
    release::PublicKey,
    tls::{self, Identity, RelayTrust},
    OneOrMany, Secret,
};
use serde::{de::IgnoredAny, Deserialize};
use tokio_tungstenite::tungstenite::http::Uri;

/// Where the agent looks for its config unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/camera_agent/config.json";

/// The RTSP paths of a Dahua camera's main and sub stream.
pub const DAHUA_STREAM_PATHS: [&str; 2] = [
    "/cam/realmonitor?channel=1&subtype=0",
    "/cam/realmonitor?channel=1&subtype=1",
];

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Unique id of this camera at the relay.
    pub agent_id: String,
    /// The relays' control links, in the order written (never empty). A session goes to
    /// one of them; when it is lost, the next session starts with the next one.
    pub relays: Vec<RelayUrl>,
    /// Token presented at registration.
    pub token: Secret,
    /// Log level, from `agent.log_level`.
    pub log_level: tracing::Level,
    /// Camera model reported to the relay.
    pub camera_model: String,
    /// Labels for operators (`agent.labels`: site, floor, batch…), sent to the relay,
    /// where rollouts can pick cameras by them.
    pub labels: Vec<String>,
    /// Relay port this camera would like (`tunnel.tunnel_port`).
    pub tunnel_port: u16,
    /// The camera's RTSP server (`streaming.rtsp_host`, `streaming.rtsp_port`).
    pub rtsp_target: SocketAddr,
    /// RTSP paths the camera serves, reported to the relay.
    pub stream_paths: Vec<String>,
    /// Limit for connecting to the relay and to the camera (`network.connection_timeout`).
    pub connection_timeout: Duration,
    /// Longest wait between reconnection attempts (`network.reconnect_interval`).
    pub reconnect_interval: Duration,
    /// Heartbeat period (`network.heartbeat_interval`).
    pub heartbeat_interval: Duration,
    /// How often an idle QUIC connection sends a keep-alive
    /// (`network.quic_keepalive_interval`): what holds the camera's UDP mapping open
    /// in its NAT. Below the QUIC idle timeout.
    pub quic_keepalive: Duration,
    /// Nameservers asked when the system resolver cannot find the relay
    /// (`network.fallback_nameservers`, port 53 unless given), e.g. on a camera with no
    /// /etc/resolv.conf.
    pub fallback_nameservers: Vec<SocketAddr>,
    /// Watcher connections the relay may have open through this agent at once.
    pub max_streams: u32,
    /// How the relay is verified, and the agent's own certificate.
    pub security: Security,
    /// What the `restart` command does (`agent.restart`).
    pub restart: RestartMode,
    /// Over-the-air updates (`update`).
    pub update: UpdatePolicy,
    /// The file this came from, for `reload_config`.
    pub source: Option<PathBuf>,
    /// Settings of the earlier agent that were present and mean nothing here
    /// ([`EARLIER_UNUSED`]), and unknown `security` fields.
    pub ignored: Vec<String>,
    /// What an operator should know about how the file was read: a setting written in
    /// two places and which one wins, the earlier server's URL completed. Logged once.
    pub notes: Vec<String>,
}

/// What the `restart` command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    /// Re-execute the agent's own binary with the same arguments (`"exec"`, default).
    Exec,
    /// Exit with status 75 (EX_TEMPFAIL) and leave the restart to a supervisor
    /// (`"exit"`: systemd `Restart=on-failure`, busybox init `respawn`).
    Exit,
}

/// The `update` section: which releases the camera takes (docs/updates.md).
#[derive(Debug, Clone)]
pub struct UpdatePolicy {
    /// Release keys trusted (`update.release_keys`; default `release.pub` next to the
    /// config file, if present). Without any, every update is refused.
    pub keys: Vec<PublicKey>,
    /// Where they came from, for the log.
    pub key_files: Vec<PathBuf>,
    /// How long a new agent has to come online before the previous one comes back
    /// (`update.trial_secs`, default 120).
    pub trial: Duration,
}

/// Default time a new agent has to come online.
pub const DEFAULT_TRIAL: Duration = Duration::from_secs(120);

/// The `security` section, with its files loaded.
#[derive(Debug, Clone)]
pub struct Security {
    /// How a `wss://` control link's certificate is checked: `security.relay_fingerprint`,
    /// else `security.ca_file` (default `ca.crt` next to the config file, if present),
    /// else the public web PKI.
    pub relay_trust: RelayTrust,
    /// Where the trust came from, for the log.
    pub trust_source: String,
    /// The agent's client certificate and key (`security.client_cert`, `client_key`;
    /// default `agent.crt` and `agent.key` next to the config file, if both exist).
    pub identity: Option<Arc<Identity>>,
    /// `security.ssl_verify` (default true); false is accepted only with `ws://` and
    /// warned about at every connect.
    pub ssl_verify: bool,
}

/// The relay's control URL, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    /// The URL to dial (`ws://` or `wss://`, path `/tunnel` if none was given).
    pub url: String,
    /// Host name or address; QUIC goes to the same host.
    pub host: String,
    /// TCP port of the control link.
    pub port: u16,
    /// The URL named the earlier server's endpoint, `/agent`, and the agent id was
    /// appended to it, as the earlier agent did.
    pub appended_id: bool,
}

/// The earlier server's agent endpoint: `WS /agent/{id}`, configured without the id.
const EARLIER_AGENT_PATH: &str = "/agent";

impl RelayUrl {
    /// Parses `ws://`, `wss://` (and `http://`, `https://`, which older configs used)
    /// URLs; an empty path becomes `/tunnel`, and a path ending in `/agent` (the earlier
    /// server's endpoint) becomes `/agent/<agent_id>`.
    pub fn parse(text: &str, agent_id: &str) -> Result<Self, String> {
        let uri: Uri = text.parse().map_err(|e| {
            format!("{text:?} is not a URL ({e}); expected e.g. ws://relay.example.com:8080/tunnel")
        })?;
        let (scheme, default_port) = match uri.scheme_str() {
            Some("ws") | Some("http") => ("ws", 80),
            Some("wss") | Some("https") => ("wss", 443),
            _ => return Err(format!("{text:?} must start with ws:// or wss://")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{text:?} names no host"))?
            .to_string();
        let port = uri.port_u16().unwrap_or(default_port);
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let trimmed = uri.path().trim_end_matches('/');
        let appended_id = trimmed.ends_with(EARLIER_AGENT_PATH);
        let path = match trimmed {
            "" => "/tunnel".to_string(),
            _ if appended_id => format!("{trimmed}/{agent_id}"),
            _ => uri.path().to_string(),
        };
        Ok(RelayUrl {
            url: format!("{scheme}://{}:{port}{path}{query}", host_for_url(&host)),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            appended_id,
        })
    }
}

impl RelayUrl {
    /// The URL of the data plane's TCP fallback: the control URL with `/data` appended
    /// to its path (`wss://relay/tunnel` → `wss://relay/tunnel/data`), so a reverse proxy
    /// in front of the relay needs no rule of its own.
    pub fn fallback_url(&self) -> String {
        let (path, query) = self
            .url
            .split_at(self.url.find('?').unwrap_or(self.url.len()));
        format!(
            "{}{FALLBACK_PATH_SUFFIX}{query}",
            path.trim_end_matches('/')
        )
    }
}

fn host_for_url(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// A config problem, saying which file, which field and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the agent config: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path}: not valid JSON: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// Parser message with line and column.
        message: String,
    },
    /// A field is missing, unknown or has a bad value.
    #[error("{path}: field `{field}`: {reason}")]
    Field {
        /// The file.
        path: String,
        /// Dotted path of the field, e.g. `network.heartbeat_interval`.
        field: String,
        /// Why.
        reason: String,
    },
}

// ---- the earlier agent's settings ----------------------------------------------

/// Settings of the earlier agent that mean nothing to this one, and why. They are
/// accepted, so its config files start this agent unchanged, and listed once in the log;
/// a name in no version of the agent is still an error. `fields` empty: the whole
/// section. docs/agent-config.md lists every setting of the earlier agent and what this
/// one does with it.
pub const EARLIER_UNUSED: &[Unused] = &[
    Unused {
        section: "agent",
        fields: &["device_id", "name"],
        why: "the relay knows a camera by agent.agent_id",
    },
    Unused {
        section: "agent",
        fields: &["connection_mode"],
        why: "this agent always dials out: WebSocket control link, video over QUIC, \
              TCP when UDP is blocked",
    },
    Unused {
        section: "agent",
        fields: &["log_file"],
        why: "the agent logs to stderr, for the init system or syslog to keep",
    },
    Unused {
        section: "agent",
        fields: &["version"],
        why: "the agent reports its own build's version",
    },
    Unused {
        section: "tunnel",
        fields: &["enabled", "tunnel_type"],
        why: "the tunnel is what this agent is for: always on, TCP for the Watcher",
    },
    Unused {
        section: "network",
        fields: &["max_retries"],
        why: "this agent never gives up: it retries with backoff up to \
              reconnect_interval, since a camera whose agent stopped stays offline \
              until someone visits it",
    },
    Unused {
        section: "tunnel",
        fields: &["max_retries"],
        why: "as network.max_retries",
    },
    Unused {
        section: "streaming",
        fields: &["buffer_size"],
        why: "QUIC retransmits what is lost; the agent keeps no buffer of its own",
    },
    Unused {
        section: "streaming",
        fields: &["quality", "stream_quality", "video_codec", "bitrate"],
        why: "the camera's encoder sets these; the agent carries its bytes unchanged",
    },
    Unused {
        section: "streaming",
        fields: DESCRIPTIVE,
        why: "describes the camera; the agent carries its bytes unchanged",
    },
    Unused {
        section: "camera",
        fields: &["username", "password"],
        why: "a Watcher logs in to the camera itself, through the tunnel; the agent \
              never needs the camera's login",
    },
    Unused {
        section: "camera",
        fields: DESCRIPTIVE,
        why: "describes the camera; the agent carries its bytes unchanged",
    },
    Unused {
        section: "recording",
        fields: &[],
        why: "recording is the VMS's job",
    },
    Unused {
        section: "storage",
        fields: &[],
        why: "recording is the VMS's job",
    },
    Unused {
        section: "motion_detection",
        fields: &[],
        why: "the camera's own events reach the VMS through the tunnel",
    },
    Unused {
        section: "onvif",
        fields: &[],
        why: "ONVIF is the camera's own service; the agent carries RTSP",
    },
    Unused {
        section: "logging",
        fields: &[],
        why: "the agent logs to stderr at agent.log_level",
    },
    Unused {
        section: "p2p",
        fields: &[],
        why: "the agent reaches the relay by dialing out; no peer-to-peer mode",
    },
    Unused {
        section: "cloud",
        fields: &[],
        why: "the relay is set by agent.tunnel_server_url",
    },
];

/// What the earlier agent's files say about the camera and its streams, in either
/// section (the firmware build tool copied them from its table of camera models).
const DESCRIPTIVE: &[&str] = &[
    "max_resolution",
    "max_fps",
    "codec",
    "resolution",
    "fps",
    "features",
    "storage",
    "power",
    "protection",
    "platform",
    "architecture",
];

/// Settings of the earlier agent that this one accepts and does not use.
#[derive(Debug, Clone, Copy)]
pub struct Unused {
    /// The top-level section.
    pub section: &'static str,
    /// Its fields; empty for the whole section.
    pub fields: &'static [&'static str],
    /// Why they mean nothing here.
    pub why: &'static str,
}

impl Unused {
    /// The dotted names this entry covers (`agent.device_id`, or `recording`).
    pub fn names(&self) -> Vec<String> {
        if self.fields.is_empty() {
            return vec![self.section.to_string()];
        }
        self.fields
            .iter()
            .map(|field| format!("{}.{field}", self.section))
            .collect()
    }
}

/// Takes the settings of [`EARLIER_UNUSED`] out of the file's JSON, so the strict
/// parse that follows sees only settings this agent reads; returns their names.
fn take_unused(json: &mut serde_json::Value) -> Vec<String> {
    let mut taken = Vec::new();
    let Some(top) = json.as_object_mut() else {
        return taken; // the strict parse says what is wrong with it
    };
    for unused in EARLIER_UNUSED {
        if unused.fields.is_empty() {
            if top.remove(unused.section).is_some() {
                taken.push(unused.section.to_string());
            }
            continue;
        }
        let Some(section) = top.get_mut(unused.section).and_then(|s| s.as_object_mut()) else {
            continue;
        };
        for field in unused.fields {
            if section.remove(*field).is_some() {
                taken.push(format!("{}.{field}", unused.section));
            }
        }
    }
    taken
}

// ---- the file as written -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Optional here only to say better than serde what a file without it lacks.
    agent: Option<RawAgent>,
    #[serde(default)]
    tunnel: RawTunnel,
    #[serde(default)]
    streaming: RawStreaming,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    camera: RawCamera,
    #[serde(default)]
    security: RawSecurity,
    #[serde(default)]
    update: RawUpdate,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    release_keys: Option<OneOrMany<PathBuf>>,
    trial_secs: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    agent_id: String,
    /// One URL, or a list of a cluster's relays.
    tunnel_server_url: Option<OneOrMany<String>>,
    /// The earlier agent's name for the relay's URL.
    cloud_server_url: Option<OneOrMany<String>>,
    tunnel_server_token: Option<Secret>,
    /// The earlier agent's name for the token.
    cloud_server_token: Option<Secret>,
    #[serde(default = "default_log_level")]
    log_level: String,
    camera_model: Option<String>,
    #[serde(default)]
    labels: Vec<String>,
    restart: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    tunnel_port: Option<u16>,
    max_streams: Option<u32>,
    // Where the tunnel agent kept the network settings; `network.*` wins.
    connection_timeout: Option<f64>,
    reconnect_interval: Option<f64>,
    heartbeat_interval: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStreaming {
    rtsp_port: Option<u16>,
    rtsp_host: Option<IpAddr>,
    stream_paths: Option<Vec<String>>,
}

/// The earlier agent's description of the camera it runs on.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCamera {
    model: Option<String>,
    /// The camera's address, if its RTSP server is not on loopback; `""` is unset.
    ip: Option<String>,
    rtsp_port: Option<u16>,
    stream_paths: Option<Vec<String>>,
    /// Find the camera's address by itself: here, the camera this agent runs on.
    auto_detect_ip: Option<bool>,
}

/// The older agent's fields in this section are not known here, so unknown fields are
/// listed as ignored rather than refused; a misspelled field of ours therefore falls
/// back to the stricter default (it can only make verification fail, never pass).
#[derive(Deserialize, Default)]
struct RawSecurity {
    ssl_verify: Option<bool>,
    ca_file: Option<PathBuf>,
    relay_fingerprint: Option<OneOrMany<String>>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(flatten)]
    other: BTreeMap<String, IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    connection_timeout: Option<f64>,
    reconnect_interval: Option<f64>,
    heartbeat_interval: Option<f64>,
    quic_keepalive_interval: Option<f64>,
    fallback_nameservers: Option<OneOrMany<String>>,
}

/// A setting the earlier agents kept in two places (a newer and an older name, or
/// `network` and `tunnel`): the first wins, and when both are set a note says which.
fn prefer<T: std::fmt::Debug>(
    notes: &mut Vec<String>,
    (name, value): (&str, Option<T>),
    (other, other_value): (&str, Option<T>),
) -> Option<T> {
    match (value, other_value) {
        (Some(value), Some(other_value)) => {
            notes.push(format!(
                "{name} ({value:?}) and {other} ({other_value:?}) are both set; using {name}"
            ));
            Some(value)
        }
        (value, other_value) => value.or(other_value),
    }
}

/// A label: what the relay takes in a service name (letters, digits, `-_.:=/`, at most
/// 64).
fn check_label(label: &str) -> Result<(), String> {
    let fine = |c: char| c.is_ascii_alphanumeric() || "-_.:=/".contains(c);
    if !label.is_empty() && label.len() <= 64 && label.chars().all(fine) {
        Ok(())
    } else {
        Err(format!(
            "{label:?}: a label is 1 to 64 letters, digits or - _ . : = /"
        ))
    }
}

/// The `update` section, its key files read.
fn update_policy(
    raw: RawUpdate,
    dir: &Path,
    field_error: &dyn Fn(&str, String) -> ConfigError,
) -> Result<UpdatePolicy, ConfigError> {
    let default = dir.join("release.pub");
    let key_files = match raw.release_keys {
        Some(files) => files.into_vec().into_iter().map(|f| dir.join(f)).collect(),
        None if default.is_file() => vec![default],
        None => Vec::new(),
    };
    let mut keys = Vec::new();
    for (i, file) in key_files.iter().enumerate() {
        let text = std::fs::read(file).map_err(|e| {
            field_error(
                &format!("update.release_keys[{i}]"),
                format!("{}: {e}", file.display()),
            )
        })?;
        keys.push(PublicKey::from_pem(&text).map_err(|why| {
            field_error(
                &format!("update.release_keys[{i}]"),
                format!("{}: {why}", file.display()),
            )
        })?);
    }
    let trial = match raw.trial_secs {
        None => DEFAULT_TRIAL,
        Some(s) if (1.0..1e6).contains(&s) => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(field_error(
                "update.trial_secs",
                format!("{s} is not a number of seconds of at least 1"),
            ))
        }
    };
    Ok(UpdatePolicy {
        keys,
        key_files,
        trial,
    })
}

/// A nameserver: an IP address, port 53 unless written as `address:port`.
fn nameserver(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{text:?} is not an IP address (a nameserver, e.g. \"192.168.1.1\")"))
}

fn default_log_level() -> String {
    "INFO".into()
}

impl AgentConfig {
    /// Reads and checks the config file at `path`; files it names are relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse_at(&text, &path.display().to_string(), dir)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses config text; `origin` names it in errors, files it names are relative to
    /// the current directory. `//` and `/* */` comments are allowed, so example files
    /// can explain every field.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_at(text, origin, Path::new("."))
    }

    /// [`AgentConfig::parse`] with files relative to `dir`.
    pub fn parse_at(text: &str, origin: &str, dir: &Path) -> Result<Self, ConfigError> {
        let field_error = |field: &str, reason: String| ConfigError::Field {
            path: origin.to_string(),
            field: field.to_string(),
            reason,
        };
        let mut json: serde_json::Value =
            serde_json::from_str(&blank_comments(text)).map_err(|e| ConfigError::Syntax {
                path: origin.to_string(),
                message: e.to_string(),
            })?;
        let mut ignored = take_unused(&mut json);
        let raw: RawConfig = serde_path_to_error::deserialize(json)
            .map_err(|e| field_error(&e.path().to_string(), e.into_inner().to_string()))?;
        let mut notes = Vec::new();

        let Some(agent) = raw.agent else {
            return Err(field_error(
                "agent",
                "missing: the agent needs at least agent.agent_id, \
                 agent.tunnel_server_url (or cloud_server_url) and its token. A file with \
                 only a `camera` section is the camera's part of config.json: put it \
                 beside `agent` in one file"
                    .into(),
            ));
        };
        check_agent_id(&agent.agent_id).map_err(|r| field_error("agent.agent_id", r))?;
        let url = prefer(
            &mut notes,
            ("agent.tunnel_server_url", agent.tunnel_server_url),
            ("agent.cloud_server_url", agent.cloud_server_url),
        )
        .ok_or_else(|| {
            field_error(
                "agent.tunnel_server_url",
                "missing; set it to the relay's control URL, e.g. \
                 ws://relay.example.com:8080/tunnel (the earlier name cloud_server_url \
                 works too)"
                    .into(),
            )
        })?;
        let urls = url.into_vec();
        if urls.is_empty() {
            return Err(field_error(
                "agent.tunnel_server_url",
                "an empty list; name at least one relay".into(),
            ));
        }
        let mut relays = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let relay = RelayUrl::parse(url, &agent.agent_id).map_err(|r| {
                let field = match urls.len() {
                    1 => "agent.tunnel_server_url".to_string(),
                    _ => format!("agent.tunnel_server_url[{i}]"),
                };
                field_error(&field, r)
            })?;
            if relay.appended_id {
                notes.push(format!(
                    "the relay URL {url:?} names the earlier server's /agent endpoint; \
                     dialing {} as the earlier agent did",
                    relay.url
                ));
            }
            relays.push(relay);
        }
        let token = prefer(
            &mut notes,
            ("agent.tunnel_server_token", agent.tunnel_server_token),
            ("agent.cloud_server_token", agent.cloud_server_token),
        )
        .unwrap_or_default();
        let (security, ignored_security) = security(raw.security, &relays, dir, &field_error)?;
        if token.is_empty() && security.identity.is_none() {
            return Err(field_error(
                "agent.tunnel_server_token",
                "missing or empty; set it to the relay's token for this camera \
                 (or give the camera a client certificate: security.client_cert)"
                    .into(),
            ));
        }
        let log_level =
            parse_log_level(&agent.log_level).map_err(|r| field_error("agent.log_level", r))?;
        let restart = match agent.restart.as_deref() {
            None | Some("exec") => RestartMode::Exec,
            Some("exit") => RestartMode::Exit,
            Some(other) => {
                return Err(field_error(
                    "agent.restart",
                    format!("{other:?} is not a restart mode; use \"exec\" or \"exit\""),
                ))
            }
        };

        let update = update_policy(raw.update, dir, &field_error)?;
        for (i, label) in agent.labels.iter().enumerate() {
            check_label(label).map_err(|why| field_error(&format!("agent.labels[{i}]"), why))?;
        }
        let labels = agent.labels;

        // The network settings, from `network` or, where the tunnel agent kept them,
        // from `tunnel`.
        let (network, tunnel) = (raw.network, raw.tunnel);
        let mut seconds = |setting: &str,
                           value: Option<f64>,
                           earlier: Option<f64>,
                           default: u64|
         -> Result<Duration, ConfigError> {
            let network_name = format!("network.{setting}");
            let value = prefer(
                &mut notes,
                (&network_name, value),
                (&format!("tunnel.{setting}"), earlier),
            );
            match value {
                None => Ok(Duration::from_secs(default)),
                Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => {
                    Ok(Duration::from_secs_f64(s))
                }
                Some(s) => Err(field_error(
                    &network_name,
                    format!("{s} is not a number of seconds between 0 and 86400"),
                )),
            }
        };
        let connection_timeout = seconds(
            "connection_timeout",
            network.connection_timeout,
            tunnel.connection_timeout,
            30,
        )?;
        let reconnect_interval = seconds(
            "reconnect_interval",
            network.reconnect_interval,
            tunnel.reconnect_interval,
            10,
        )?;
        let heartbeat_interval = seconds(
            "heartbeat_interval",
            network.heartbeat_interval,
            tunnel.heartbeat_interval,
            30,
        )?;
        let quic_keepalive = seconds(
            "quic_keepalive_interval",
            network.quic_keepalive_interval,
            None,
            common::tls::QUIC_KEEP_ALIVE.as_secs(),
        )?;
        if quic_keepalive >= common::tls::QUIC_IDLE_TIMEOUT {
            return Err(field_error(
                "network.quic_keepalive_interval",
                format!(
                    "must be below the QUIC idle timeout ({} s), or the connection dies idle",
                    common::tls::QUIC_IDLE_TIMEOUT.as_secs()
                ),
            ));
        }
        let fallback_nameservers = network
            .fallback_nameservers
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .iter()
            .map(|text| nameserver(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|r| field_error("network.fallback_nameservers", r))?;

        // The camera's RTSP server, from `streaming` or, as the earlier agent had it,
        // from `camera`.
        let (streaming, camera) = (raw.streaming, raw.camera);
        let rtsp_port = prefer(
            &mut notes,
            ("streaming.rtsp_port", streaming.rtsp_port),
            ("camera.rtsp_port", camera.rtsp_port),
        )
        .unwrap_or(554);
        if rtsp_port == 0 {
            return Err(field_error(
                "streaming.rtsp_port",
                "must be a port number from 1 to 65535".into(),
            ));
        }
        let camera_ip = match camera.ip.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(_) if camera.auto_detect_ip == Some(true) => {
                notes.push(
                    "camera.auto_detect_ip is true: the camera is the one this agent runs \
                     on, reached on 127.0.0.1, not at camera.ip"
                        .into(),
                );
                None
            }
            Some("localhost") => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
                field_error(
                    "camera.ip",
                    format!(
                        "{text:?} is not an IP address; give the camera's address \
                         (e.g. \"192.168.1.108\"), or leave it out for the camera this \
                         agent runs on (127.0.0.1)"
                    ),
                )
            })?),
        };
        let rtsp_host = prefer(
            &mut notes,
            ("streaming.rtsp_host", streaming.rtsp_host),
            ("camera.ip", camera_ip),
        )
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let stream_paths = prefer(
            &mut notes,
            ("streaming.stream_paths", streaming.stream_paths),
            ("camera.stream_paths", camera.stream_paths),
        )
        .unwrap_or_else(|| DAHUA_STREAM_PATHS.iter().map(|p| p.to_string()).collect());
        let camera_model = prefer(
            &mut notes,
            ("agent.camera_model", agent.camera_model),
            ("camera.model", camera.model),
        )
        .unwrap_or_else(|| "unknown".into());
        let max_streams = tunnel.max_streams.unwrap_or(64);
        if max_streams == 0 {
            return Err(field_error(
                "tunnel.max_streams",
                "must be at least 1".into(),
            ));
        }
        ignored.extend(ignored_security);

        Ok(AgentConfig {
            agent_id: agent.agent_id,
            relays,
            token,
            log_level,
            camera_model,
            labels,
            tunnel_port: tunnel.tunnel_port.unwrap_or(8554),
            rtsp_target: SocketAddr::new(rtsp_host, rtsp_port),
            stream_paths,
            connection_timeout,
            reconnect_interval,
            heartbeat_interval,
            quic_keepalive,
            fallback_nameservers,
            max_streams,
            security,
            restart,
            update,
            source: None,
            ignored,
            notes,
        })
    }
}

impl AgentConfig {
    /// The settings that differ between `self` and `newer`: those that apply from the
    /// next session, and those that need the agent restarted.
    pub fn changes(&self, newer: &AgentConfig) -> (Vec<String>, Vec<String>) {
        let field = |name: &str, changed: bool| changed.then(|| name.to_string());
        let applied = [
            field("agent.agent_id", self.agent_id != newer.agent_id),
            field("agent.tunnel_server_url", self.relays != newer.relays),
            field(
                "agent.tunnel_server_token",
                !self.token.matches(&newer.token),
            ),
            field(
                "agent.camera_model",
                self.camera_model != newer.camera_model,
            ),
            field("agent.labels", self.labels != newer.labels),
            field("agent.restart", self.restart != newer.restart),
            field("tunnel.tunnel_port", self.tunnel_port != newer.tunnel_port),
            field("tunnel.max_streams", self.max_streams != newer.max_streams),
            field(
                "streaming.rtsp_host/rtsp_port",
                self.rtsp_target != newer.rtsp_target,
            ),
            field(
                "streaming.stream_paths",
                self.stream_paths != newer.stream_paths,
            ),
            field(
                "network.connection_timeout",
                self.connection_timeout != newer.connection_timeout,
            ),
            field(
                "network.reconnect_interval",
                self.reconnect_interval != newer.reconnect_interval,
            ),
            field(
                "network.heartbeat_interval",
                self.heartbeat_interval != newer.heartbeat_interval,
            ),
            field(
                "network.quic_keepalive_interval",
                self.quic_keepalive != newer.quic_keepalive,
            ),
            field(
                "network.fallback_nameservers",
                self.fallback_nameservers != newer.fallback_nameservers,
            ),
            field(
                "security",
                format!("{:?}", self.security) != format!("{:?}", newer.security),
            ),
        ];
        let need_restart = [field("agent.log_level", self.log_level != newer.log_level)];
        (
            applied.into_iter().flatten().collect(),
            need_restart.into_iter().flatten().collect(),
        )
    }
}

/// Resolves the `security` section: loads the files it names (or the defaults next to
/// the config file), and checks that `ssl_verify: false` is used only with `ws://`.
/// Also returns the older agent's fields it ignores.
fn security(
    raw: RawSecurity,
    relays: &[RelayUrl],
    dir: &Path,
    field_error: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(Security, Vec<String>), ConfigError> {
    let ssl_verify = raw.ssl_verify.unwrap_or(true);
    if !ssl_verify && relays.iter().any(|r| r.url.starts_with("wss://")) {
        return Err(field_error(
            "security.ssl_verify",
            "false is only accepted with a plain ws:// relay (development); for wss:// \
             give security.ca_file or security.relay_fingerprint instead"
                .into(),
        ));
    }
    let at = |path: PathBuf| {
        if path.is_absolute() {
            path
        } else {
            dir.join(path)
        }
    };
    let (relay_trust, trust_source) = match (raw.relay_fingerprint, raw.ca_file) {
        (Some(_), Some(_)) => {
            return Err(field_error(
                "security.relay_fingerprint",
                "give relay_fingerprint or ca_file, not both".into(),
            ))
        }
        (Some(pins), None) => {
            let pins = pins
                .into_vec()
                .iter()
                .map(|pin| parse_fingerprint(pin))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|why| field_error("security.relay_fingerprint", why))?;
            if pins.is_empty() {
                return Err(field_error(
                    "security.relay_fingerprint",
                    "an empty list trusts nothing".into(),
                ));
            }
            (
                RelayTrust::Pin(pins),
                "security.relay_fingerprint".to_string(),
            )
        }
        (None, file) => {
            // Named, or ca.crt next to the config file if there is one.
            let default = dir.join("ca.crt");
            match file
                .map(at)
                .or_else(|| default.is_file().then_some(default))
            {
                Some(file) => {
                    let roots = tls::load_roots(&file)
                        .map_err(|e| field_error("security.ca_file", e.to_string()))?;
                    (RelayTrust::Ca(roots), file.display().to_string())
                }
                None => (RelayTrust::WebPki, "the public web PKI".to_string()),
            }
        }
    };
    let identity = match (raw.client_cert, raw.client_key) {
        (Some(cert), Some(key)) => Some((at(cert), at(key))),
        (None, None) => {
            let (cert, key) = (dir.join("agent.crt"), dir.join("agent.key"));
            (cert.is_file() && key.is_file()).then_some((cert, key))
        }
        (Some(_), None) => {
            return Err(field_error(
                "security.client_key",
                "security.client_cert needs its key".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(field_error(
                "security.client_cert",
                "security.client_key needs its certificate".into(),
            ))
        }
    };
    let identity = match identity {
        Some((cert, key)) => Some(Arc::new(
            Identity::from_pem_files(&cert, &key)
                .map_err(|e| field_error("security.client_cert", e.to_string()))?,
        )),
        None => None,
    };
    let ignored = raw
        .other
        .into_keys()
        .map(|name| format!("security.{name}"))
        .collect();
    Ok((
        Security {
            relay_trust,
            trust_source,
            identity,
            ssl_verify,
        },
        ignored,
    ))
}

/// A SHA-256 fingerprint as `certs fingerprint` prints it (64 hex digits; colons and
/// upper case are accepted too).
fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    sha256_from_hex(text).ok_or_else(|| {
        format!(
            "{text:?} is not a SHA-256 fingerprint (64 hex digits, as `certs fingerprint` prints)"
        )
    })
}

/// Replaces `//` and `/* */` comments outside strings with spaces, keeping newlines,
/// so the JSON parser's line and column numbers still point into the original file.
fn blank_comments(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        match (in_string, bytes[i], bytes.get(i + 1)) {
            (true, b'\\', _) => i += 1, // skip the escaped byte
            (true, b'"', _) | (false, b'"', _) => in_string = !in_string,
            (false, b'/', Some(b'/')) => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
                continue;
            }
            (false, b'/', Some(b'*')) => {
                let end = text[i + 2..]
                    .find("*/")
                    .map_or(bytes.len(), |e| i + 2 + e + 2);
                for b in &mut out[i..end] {
                    if *b != b'\n' {
                        *b = b' ';
                    }
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    // Only ASCII bytes outside strings were replaced by ASCII spaces: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| text.to_string())
}

/// Python's level names (the older agent's) and tracing's.
fn parse_log_level(name: &str) -> Result<tracing::Level, String> {
    match name.to_ascii_uppercase().as_str() {
        "TRACE" => Ok(tracing::Level::TRACE),
        "DEBUG" => Ok(tracing::Level::DEBUG),
        "INFO" => Ok(tracing::Level::INFO),
        "WARN" | "WARNING" => Ok(tracing::Level::WARN),
        "ERROR" | "CRITICAL" => Ok(tracing::Level::ERROR),
        _ => Err(format!(
            "{name:?} is not a level; use DEBUG, INFO, WARNING or ERROR"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{
        "agent": {
            "agent_id": "dahua-2449s-il-001",
            "cloud_server_url": "ws://relay.example.com:8080",
            "cloud_server_token": "s3cret",
            "log_level": "WARNING",
            "device_id": "ABC123"
        },
        "camera": {"model": "dahua-2449s-il", "resolution": "2688x1520", "fps": 20},
        "tunnel": {"tunnel_port": 8555},
        "streaming": {"rtsp_port": 554, "stream_paths": ["/cam/realmonitor?channel=1&subtype=0"]},
        "network": {"connection_timeout": 30, "reconnect_interval": 10, "heartbeat_interval": 30},
        "recording": {"enabled": false},
        "motion_detection": {"enabled": true, "sensitivity": 5},
        "security": {"ssl_verify": true, "encryption": "aes"}
    }"#;

    fn error(text: &str) -> String {
        AgentConfig::parse(text, "/etc/camera_agent/config.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn release_keys_and_labels_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let minimal = r#"{"agent": {"agent_id": "cam", "tunnel_server_url": "ws://r:8080", "tunnel_server_token": "t"}"#;
        // No release.pub beside the config: no key, every update refused.
        let c = AgentConfig::parse_at(&format!("{minimal}}}"), "c.json", dir.path()).unwrap();
        assert!(c.update.keys.is_empty());
        assert_eq!(c.update.trial, DEFAULT_TRIAL);
        assert!(c.labels.is_empty());

        let key = common::release::SigningKey::generate().unwrap();
        std::fs::write(dir.path().join("release.pub"), key.public().to_pem()).unwrap();
        let c = AgentConfig::parse_at(&format!("{minimal}}}"), "c.json", dir.path()).unwrap();
        assert_eq!(
            c.update.keys,
            vec![key.public()],
            "release.pub beside the config"
        );

        let text = r#"{"agent": {"agent_id": "cam", "tunnel_server_url": "ws://r:8080", "tunnel_server_token": "t", "labels": ["site-a", "floor=2"]}, "update": {"trial_secs": 30}}"#;
        let c = AgentConfig::parse_at(text, "c.json", dir.path()).unwrap();
        assert_eq!(c.labels, ["site-a", "floor=2"]);
        assert_eq!(c.update.trial, Duration::from_secs(30));

        std::fs::write(dir.path().join("bad.pub"), "not a key").unwrap();
        let bad = format!(r#"{minimal}, "update": {{"release_keys": ["bad.pub"]}}}}"#);
        let err = AgentConfig::parse_at(&bad, "c.json", dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("update.release_keys[0]") && err.contains("bad.pub"),
            "{err}"
        );
        let err = error(
            r#"{"agent": {"agent_id": "cam", "tunnel_server_url": "ws://r:8080", "tunnel_server_token": "t", "labels": ["two words"]}}"#,
        );
        assert!(err.contains("agent.labels[0]"), "{err}");
        let err = error(
            r#"{"agent": {"agent_id": "cam", "tunnel_server_url": "ws://r:8080", "tunnel_server_token": "t"}, "update": {"trial_secs": 0}}"#,
        );
        assert!(err.contains("update.trial_secs"), "{err}");
    }

    #[test]
    fn reads_the_seed_schema_with_old_names() {
        let c = AgentConfig::parse(SEED, "config.json").unwrap();
        assert_eq!(c.agent_id, "dahua-2449s-il-001");
        assert_eq!(c.relays[0].url, "ws://relay.example.com:8080/tunnel");
        assert_eq!(c.token.expose(), "s3cret");
        assert_eq!(c.log_level, tracing::Level::WARN);
        assert_eq!(c.camera_model, "dahua-2449s-il");
        assert_eq!(c.tunnel_port, 8555);
        assert_eq!(c.rtsp_target, "127.0.0.1:554".parse().unwrap());
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(
            c.ignored,
            [
                "agent.device_id",
                "camera.resolution",
                "camera.fps",
                "recording",
                "motion_detection",
                "security.encryption"
            ]
        );
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn the_fallback_url_follows_the_control_url() {
        let fallback = |url: &str| RelayUrl::parse(url, "cam-1").unwrap().fallback_url();
        assert_eq!(fallback("wss://relay"), "wss://relay:443/tunnel/data");
        assert_eq!(
            fallback("ws://r:8080/agent/cam-1"),
            "ws://r:8080/agent/cam-1/data"
        );
        assert_eq!(
            fallback("ws://r:8080/agent"),
            "ws://r:8080/agent/cam-1/data"
        );
        assert_eq!(
            fallback("wss://r/proxy/tunnel/?x=1"),
            "wss://r:443/proxy/tunnel/data?x=1"
        );
        assert_eq!(fallback("ws://[::1]:9/tunnel"), "ws://[::1]:9/tunnel/data");
    }

    #[test]
    fn security_settings_are_checked_and_files_found_next_to_the_config() {
        let config = |url: &str, security: &str| {
            format!(
                r#"{{"agent": {{"agent_id": "a", "tunnel_server_url": "{url}", "tunnel_server_token": "t"}}, "security": {security}}}"#
            )
        };
        let e = error(&config("wss://r", r#"{"ssl_verify": false}"#));
        assert!(
            e.contains("security.ssl_verify") && e.contains("ws://"),
            "{e}"
        );
        let c = AgentConfig::parse(&config("ws://r", r#"{"ssl_verify": false}"#), "x").unwrap();
        assert!(!c.security.ssl_verify);
        assert!(matches!(c.security.relay_trust, RelayTrust::WebPki));

        let e = error(&config("wss://r", r#"{"relay_fingerprint": "abc"}"#));
        assert!(
            e.contains("security.relay_fingerprint") && e.contains("64 hex"),
            "{e}"
        );
        let pin = "AB:".repeat(31) + "AB";
        let c = AgentConfig::parse(
            &config("wss://r", &format!(r#"{{"relay_fingerprint": "{pin}"}}"#)),
            "x",
        )
        .unwrap();
        assert!(matches!(&c.security.relay_trust, RelayTrust::Pin(p) if p == &[[0xab; 32]]));
        let two = format!(
            r#"{{"relay_fingerprint": ["{pin}", "{}"]}}"#,
            "cd".repeat(32)
        );
        let c = AgentConfig::parse(&config("wss://r", &two), "x").unwrap();
        assert!(matches!(&c.security.relay_trust, RelayTrust::Pin(p) if p.len() == 2));
        let e = error(&config("wss://r", r#"{"client_cert": "a.crt"}"#));
        assert!(e.contains("security.client_key"), "{e}");
        let e = error(&config("wss://r", r#"{"ca_file": "/nonexistent/ca.crt"}"#));
        assert!(
            e.contains("security.ca_file") && e.contains("/nonexistent/ca.crt"),
            "{e}"
        );

        // ca.crt, agent.crt and agent.key next to config.json are used without naming them.
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
        std::fs::write(dir.path().join("ca.crt"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("agent.crt"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("agent.key"), cert.key_pair.serialize_pem()).unwrap();
        let text = r#"{"agent": {"agent_id": "a", "tunnel_server_url": "wss://r"}}"#;
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).unwrap();
        let c = AgentConfig::load(&path).unwrap();
        assert!(matches!(c.security.relay_trust, RelayTrust::Ca(_)));
        assert!(c.security.trust_source.ends_with("ca.crt"));
        assert!(
            c.security.identity.is_some(),
            "a certificate stands in for the token"
        );
        assert!(!format!("{c:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_cluster_is_a_list_of_relays() {
        let c = AgentConfig::parse(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": ["wss://relay-a.example/tunnel", "wss://relay-b.example:8443"], "tunnel_server_token": "t"}}"#,
            "config.json",
        )
        .unwrap();
        let urls: Vec<&str> = c.relays.iter().map(|r| r.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "wss://relay-a.example:443/tunnel",
                "wss://relay-b.example:8443/tunnel"
            ]
        );

        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": ["ws://r", "ftp://s"], "tunnel_server_token": "t"}}"#,
        );
        assert!(
            e.contains("agent.tunnel_server_url[1]") && e.contains("ftp://s"),
            "{e}"
        );
        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": [], "tunnel_server_token": "t"}}"#,
        );
        assert!(e.contains("empty list"), "{e}");
        // ssl_verify false is for plain ws:// only, whichever relay of the list is wss.
        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": ["ws://r", "wss://s"], "tunnel_server_token": "t"}, "security": {"ssl_verify": false}}"#,
        );
        assert!(e.contains("security.ssl_verify"), "{e}");
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = AgentConfig::parse(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "wss://r.example/agent/a", "tunnel_server_token": "t"}}"#,
            "x",
        )
        .unwrap();
        assert_eq!(c.relays[0].url, "wss://r.example:443/agent/a");
        assert_eq!(c.tunnel_port, 8554);
        assert_eq!(c.rtsp_target.port(), 554);
        assert_eq!(c.stream_paths, DAHUA_STREAM_PATHS);
        assert_eq!(c.reconnect_interval, Duration::from_secs(10));
    }

    #[test]
    fn the_example_in_deploy_parses() {
        let text = include_str!("../../deploy/agent/config.json");
        let c = AgentConfig::parse(text, "deploy/agent/config.json").unwrap();
        assert_eq!(c.agent_id, "dahua-2449s-il-001");
        assert!(c.ignored.is_empty());
        assert_eq!(
            c.fallback_nameservers,
            ["192.168.1.1:53".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn fallback_nameservers_are_addresses_with_port_53_by_default() {
        let with = |value: &str| {
            format!(
                r#"{{"agent": {{"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}}, "network": {{"fallback_nameservers": {value}}}}}"#
            )
        };
        let c = AgentConfig::parse(&with(r#"["1.1.1.1", "[2001:db8::1]:5353"]"#), "x").unwrap();
        assert_eq!(
            c.fallback_nameservers,
            [
                "1.1.1.1:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:5353".parse().unwrap()
            ]
        );
        let c = AgentConfig::parse(&with(r#""192.168.1.1""#), "x").unwrap();
        assert_eq!(c.fallback_nameservers.len(), 1);
        let e = error(&with(r#"["dns.google"]"#));
        assert!(
            e.contains("network.fallback_nameservers") && e.contains("dns.google"),
            "{e}"
        );
    }

    #[test]
    fn comments_are_allowed_and_positions_kept() {
        let text = "{ // the agent\n  \"agent\": { /* who */ \"agent_id\": \"a//b\",\n";
        let blanked = blank_comments(text);
        assert_eq!(blanked.len(), text.len());
        assert_eq!(blanked.lines().count(), text.lines().count());
        assert!(blanked.contains("\"a//b\""), "{blanked}");
        assert!(
            !blanked.contains("who") && !blanked.contains("the agent"),
            "{blanked}"
        );

        let c = AgentConfig::parse(
            "// example\n{\"agent\": {\"agent_id\": \"a\", /* url: */ \"tunnel_server_url\": \"ws://r/x\", \"tunnel_server_token\": \"t\\\"//\"}}",
            "x",
        )
        .unwrap();
        assert_eq!(c.token.expose(), "t\"//");
        let e = error("// comment\n{\"agent\": }");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "network": {"heartbeat_intervall": 3}}"#,
        );
        assert!(
            e.contains("/etc/camera_agent/config.json") && e.contains("heartbeat_intervall"),
            "{e}"
        );
        assert!(e.contains("network"), "{e}");

        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "network": {"heartbeat_interval": "often"}}"#,
        );
        assert!(e.contains("network.heartbeat_interval"), "{e}");

        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "network": {"quic_keepalive_interval": 30}}"#,
        );
        assert!(
            e.contains("network.quic_keepalive_interval") && e.contains("idle timeout"),
            "{e}"
        );

        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ftp://r", "tunnel_server_token": "t"}}"#,
        );
        assert!(
            e.contains("agent.tunnel_server_url") && e.contains("ws://"),
            "{e}"
        );

        let e = error(
            r#"{"agent": {"agent_id": "a b", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}}"#,
        );
        assert!(e.contains("agent.agent_id"), "{e}");

        let e = error(r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r"}}"#);
        assert!(e.contains("agent.tunnel_server_token"), "{e}");

        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "network": {"reconnect_interval": 0}}"#,
        );
        assert!(e.contains("network.reconnect_interval"), "{e}");

        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "tunel": {}}"#,
        );
        assert!(e.contains("tunel"), "{e}");

        let e = error("{\"agent\": {");
        assert!(e.contains("not valid JSON") && e.contains("line"), "{e}");
    }

    /// The earlier agent's files as its documents show them (deploy/agent/earlier/).
    const FIRMWARE_DOC: &str =
        include_str!("../../deploy/agent/earlier/camera-agent-firmware.json");
    const TUNNEL_DOC: &str = include_str!("../../deploy/agent/earlier/tunnel-architecture.json");
    const CAMERA_PART: &str = include_str!("../../deploy/agent/earlier/camera-dahua-2449s-il.json");
    const EVERY_FIELD: &str = include_str!("../../deploy/agent/earlier/every-field.json");

    #[test]
    fn the_documents_configs_are_read_as_the_earlier_agent_read_them() {
        let c = AgentConfig::parse(FIRMWARE_DOC, "config.json").unwrap();
        assert_eq!(c.agent_id, "dahua-2449s-il-001");
        // The earlier server's endpoint, WS /agent/{id}: the id is appended.
        assert_eq!(
            c.relays[0].url,
            "ws://your-server.com:8080/agent/dahua-2449s-il-001"
        );
        assert!(c.relays[0].appended_id);
        assert_eq!(c.token.expose(), "your-secret-token");
        assert_eq!(c.rtsp_target, "127.0.0.1:554".parse().unwrap());
        assert_eq!(c.stream_paths, DAHUA_STREAM_PATHS);
        assert_eq!(c.reconnect_interval, Duration::from_secs(10));
        assert_eq!(c.ignored, ["streaming.buffer_size", "streaming.quality"]);
        assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
        assert!(
            c.notes[0].contains("/agent/dahua-2449s-il-001"),
            "{:?}",
            c.notes
        );

        let c = AgentConfig::parse(TUNNEL_DOC, "config.json").unwrap();
        assert_eq!(c.relays[0].url, "ws://YOUR-TUNNEL-SERVER:8080/tunnel");
        assert_eq!(c.relays[0].host, "YOUR-TUNNEL-SERVER");
        assert_eq!(c.tunnel_port, 8554);
        assert!(c.ignored.is_empty() && c.notes.is_empty());

        // The camera part alone cannot start an agent, and the error says what it is.
        let e = error(CAMERA_PART);
        assert!(
            e.contains("field `agent`") && e.contains("camera") && e.contains("one file"),
            "{e}"
        );
        // Beside the main config, as the earlier build tool wrote it, it works.
        let mut merged: serde_json::Value = serde_json::from_str(FIRMWARE_DOC).unwrap();
        let camera: serde_json::Value = serde_json::from_str(CAMERA_PART).unwrap();
        merged["camera"] = camera["camera"].clone();
        let c = AgentConfig::parse(&merged.to_string(), "config.json").unwrap();
        assert_eq!(c.camera_model, "dahua-2449s-il");
        assert_eq!(
            c.ignored,
            [
                "streaming.buffer_size",
                "streaming.quality",
                "camera.max_resolution",
                "camera.max_fps",
                "camera.codec",
                "camera.features"
            ]
        );
    }

    #[test]
    fn every_setting_of_the_earlier_agent_at_once() {
        let c = AgentConfig::parse(EVERY_FIELD, "config.json").unwrap();
        // tunnel_server_url wins over cloud_server_url, network.* over tunnel.*,
        // streaming.* over camera.*; camera.ip is the RTSP host (streaming has none).
        assert_eq!(c.relays[0].url, "ws://YOUR-TUNNEL-SERVER:8080/tunnel");
        assert_eq!(c.token.expose(), "your-secret-token");
        assert_eq!(c.connection_timeout, Duration::from_secs(30));
        assert_eq!(c.reconnect_interval, Duration::from_secs(10));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.rtsp_target, "192.168.1.108:554".parse().unwrap());
        assert_eq!(c.tunnel_port, 8555);
        assert_eq!(c.camera_model, "dahua-2449s-il");
        let notes = c.notes.join("\n");
        for both in [
            "agent.tunnel_server_url",
            "agent.tunnel_server_token",
            "network.connection_timeout (30.0) and tunnel.connection_timeout (20.0)",
            "network.reconnect_interval",
            "network.heartbeat_interval",
            "streaming.rtsp_port",
            "streaming.stream_paths",
        ] {
            assert!(notes.contains(both), "{both}: {notes}");
        }
        assert!(!notes.contains("your-secret-token"), "{notes}");
        // Every unused setting is listed, by name only: the camera's password stays out.
        for name in [
            "agent.device_id",
            "network.max_retries",
            "tunnel.max_retries",
            "tunnel.enabled",
            "camera.username",
            "camera.password",
            "camera.protection",
            "streaming.bitrate",
            "onvif",
            "security.encryption",
        ] {
            assert!(
                c.ignored.iter().any(|i| i == name),
                "{name}: {:?}",
                c.ignored
            );
        }
        assert!(!format!("{c:?}").contains("admin"));
    }

    #[test]
    fn the_camera_section_says_where_the_camera_is() {
        let with = |camera: &str, streaming: &str| {
            let text = format!(
                r#"{{"agent": {{"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}}, "camera": {camera}, "streaming": {streaming}}}"#
            );
            AgentConfig::parse(&text, "x").unwrap()
        };
        let c = with(
            r#"{"ip": "192.168.1.108", "rtsp_port": 10554, "stream_paths": ["/live"]}"#,
            "{}",
        );
        assert_eq!(c.rtsp_target, "192.168.1.108:10554".parse().unwrap());
        assert_eq!(c.stream_paths, ["/live"]);
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        // streaming.* wins, and says so.
        let c = with(
            r#"{"ip": "192.168.1.108", "rtsp_port": 10554}"#,
            r#"{"rtsp_port": 554, "rtsp_host": "127.0.0.1"}"#,
        );
        assert_eq!(c.rtsp_target, "127.0.0.1:554".parse().unwrap());
        assert_eq!(c.notes.len(), 2, "{:?}", c.notes);
        // Auto-detection finds the camera the agent runs on.
        let c = with(r#"{"ip": "192.168.1.108", "auto_detect_ip": true}"#, "{}");
        assert_eq!(c.rtsp_target, "127.0.0.1:554".parse().unwrap());
        assert!(c.notes[0].contains("auto_detect_ip"), "{:?}", c.notes);
        let c = with(r#"{"ip": "", "auto_detect_ip": false}"#, "{}");
        assert_eq!(c.rtsp_target, "127.0.0.1:554".parse().unwrap());
        let c = with(r#"{"ip": "localhost"}"#, "{}");
        assert_eq!(c.rtsp_target, "127.0.0.1:554".parse().unwrap());

        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "camera": {"ip": "camera.lan"}}"#,
        );
        assert!(e.contains("camera.ip") && e.contains("camera.lan"), "{e}");
    }

    #[test]
    fn the_tunnel_section_carries_the_network_settings_too() {
        let c = AgentConfig::parse(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"},
                "tunnel": {"connection_timeout": 5, "reconnect_interval": 2, "heartbeat_interval": 1.5}}"#,
            "x",
        )
        .unwrap();
        assert_eq!(c.connection_timeout, Duration::from_secs(5));
        assert_eq!(c.reconnect_interval, Duration::from_secs(2));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(1500));
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "tunnel": {"heartbeat_interval": -1}}"#,
        );
        assert!(e.contains("heartbeat_interval"), "{e}");
    }

    #[test]
    fn the_earlier_servers_endpoint_gets_the_agent_id() {
        let url = |text: &str| RelayUrl::parse(text, "cam-7").unwrap();
        assert_eq!(url("ws://r:8080/agent").url, "ws://r:8080/agent/cam-7");
        assert_eq!(url("ws://r:8080/agent/").url, "ws://r:8080/agent/cam-7");
        assert_eq!(
            url("wss://secure-server.com/agent").url,
            "wss://secure-server.com:443/agent/cam-7"
        );
        assert_eq!(
            url("wss://r/proxy/agent?k=v").url,
            "wss://r:443/proxy/agent/cam-7?k=v"
        );
        // Anything else is dialed as written.
        for (text, dialed) in [
            ("ws://r:8080/agent/cam-7", "ws://r:8080/agent/cam-7"),
            ("ws://r:8080/agent/agent-id", "ws://r:8080/agent/agent-id"),
            ("ws://r:8080/tunnel", "ws://r:8080/tunnel"),
            ("ws://r:8080/myagent", "ws://r:8080/myagent"),
            ("ws://r:8080", "ws://r:8080/tunnel"),
        ] {
            let parsed = url(text);
            assert_eq!(parsed.url, dialed);
            assert!(!parsed.appended_id, "{text}");
        }
    }

    #[test]
    fn a_name_no_agent_ever_had_is_still_an_error() {
        for (section, typo) in [
            ("camera", r#"{"rtsp_prot": 554}"#),
            ("streaming", r#"{"qualty": "high"}"#),
            ("tunnel", r#"{"reconect_interval": 5}"#),
            ("network", r#"{"max_retry": 3}"#),
            (
                "agent",
                r#"{"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t", "cloud_url": "ws://r"}"#,
            ),
        ] {
            let agent = r#""agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}"#;
            let text = if section == "agent" {
                format!(r#"{{"agent": {typo}}}"#)
            } else {
                format!(r#"{{{agent}, "{section}": {typo}}}"#)
            };
            let e = error(&text);
            assert!(
                e.starts_with("/etc/camera_agent/config.json: field `")
                    && e.contains(section)
                    && e.contains("unknown field"),
                "{e}"
            );
        }
        // A whole section the earlier agent never had.
        let e = error(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "camra": {}}"#,
        );
        assert!(e.contains("camra"), "{e}");
    }

    #[test]
    fn the_docs_list_every_setting_of_the_earlier_agent() {
        let docs = include_str!("../../docs/agent-config.md");
        // Each row names a section's table and the field; check the field is in a row of
        // its section's table (or in the table of whole sections).
        let table = |section: &str| -> String {
            let heading = format!("### `{section}`");
            docs.split(&heading)
                .nth(1)
                .map(|rest| rest.split("\n### ").next().unwrap_or(rest).to_string())
                .unwrap_or_default()
        };
        let whole = docs
            .split("### Sections with nothing this agent uses")
            .nth(1)
            .unwrap_or_default();
        for unused in EARLIER_UNUSED {
            if unused.fields.is_empty() {
                assert!(
                    whole.contains(&format!("`{}`", unused.section)),
                    "{}",
                    unused.section
                );
                continue;
            }
            let table = table(unused.section);
            for field in unused.fields {
                assert!(
                    table
                        .lines()
                        .any(|row| row.contains(&format!("`{field}`")) && row.contains("ignored")),
                    "docs/agent-config.md does not list {}.{field} as ignored",
                    unused.section
                );
            }
        }
    }
}
