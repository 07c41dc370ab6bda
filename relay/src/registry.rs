//! The relay's table of live agents: who is registered, on which port, with which
//! tunnel. Registration (token, port policy, takeover of a stale session) happens here,
//! so the control link, the QUIC endpoint, the forwarders and (later) the API all read
//! one source of truth.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::{Duration, Instant, SystemTime},
};

use common::{
    mux::Opener,
    protocol::{
        check_agent_id, AgentStats, CameraInfo, CloseReason, Command, CommandOutput, Register,
        Rejection, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SERVICE_RTSP, SESSION_KEY_LEN,
    },
    secret::constant_time_eq,
    splice::ByteCounters,
    stream::{RecvHalf, SendHalf},
};
use rand::RngCore;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{AgentAuth, Limits, Token},
    metrics::{CameraMetrics, Metrics},
    ports::PortPolicy,
    shard::{Seat, Shard},
    MediaStats,
};

/// The links of one agent that can carry its camera's streams.
#[derive(Debug, Default)]
struct Links {
    /// The QUIC tunnel.
    quic: Option<quinn::Connection>,
    /// The TCP fallback, used while there is no tunnel.
    fallback: Option<Opener>,
}

impl Links {
    fn preferred(&self) -> Option<Link> {
        match (&self.quic, &self.fallback) {
            (Some(conn), _) => Some(Link::Quic(conn.clone())),
            (None, Some(opener)) => Some(Link::Fallback(opener.clone())),
            (None, None) => None,
        }
    }
}

/// A link that carries a camera's streams.
#[derive(Debug, Clone)]
pub enum Link {
    /// The agent's QUIC tunnel.
    Quic(quinn::Connection),
    /// The agent's TCP fallback, when UDP is blocked.
    Fallback(Opener),
}

impl Link {
    /// Opens a stream to the agent.
    pub async fn open(&self) -> io::Result<(SendHalf, RecvHalf)> {
        match self {
            Link::Quic(conn) => {
                let (send, recv) = conn.open_bi().await?;
                Ok((SendHalf::Quic(send), RecvHalf::Quic(recv)))
            }
            Link::Fallback(opener) => opener.open().await,
        }
    }

    /// `quic` or `tcp`, for metrics and the API.
    pub fn transport(&self) -> &'static str {
        match self {
            Link::Quic(_) => "quic",
            Link::Fallback(_) => "tcp",
        }
    }
}

/// Commands waiting for one agent's control loop; more are refused as busy.
const COMMAND_QUEUE: usize = 16;

/// How long a takeover waits for the old session to release its camera port.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// All live agent sessions, by agent id.
#[derive(Debug)]
pub struct Registry {
    auth: AgentAuth,
    sessions: Mutex<HashMap<String, Arc<AgentSession>>>,
    /// Agents the relay knows, online or not: listed in the config, or registered at
    /// some time (and so holding a port).
    known: Mutex<HashSet<String>>,
    /// Held for the whole of a registration: port choice, takeover and bind must not
    /// interleave between two agents, or two could be promised one port.
    ports: tokio::sync::Mutex<PortPolicy>,
    next_connection_id: AtomicU64,
    metrics: Arc<Metrics>,
    /// Watcher connections open now, by connection id, for `/streams`.
    watchers: Mutex<BTreeMap<u64, Arc<WatcherSession>>>,
    started: Instant,
}

/// One Watcher connection, while it is open.
#[derive(Debug)]
pub struct WatcherSession {
    /// Relay-wide connection id.
    pub id: u64,
    /// The camera's agent id.
    pub camera: String,
    /// The Watcher's address.
    pub peer: SocketAddr,
    /// When it connected.
    pub opened: Instant,
    /// Method and path of its first RTSP request line, once seen.
    pub request: OnceLock<(String, String)>,
    /// Its bytes (`from_tcp`: Watcher → camera).
    pub bytes: ByteCounters,
}

/// Removes its [`WatcherSession`] from the table when dropped.
#[derive(Debug)]
pub struct WatcherGuard<'a> {
    registry: &'a Registry,
    /// The session.
    pub session: Arc<WatcherSession>,
}

impl Drop for WatcherGuard<'_> {
    fn drop(&mut self) {
        lock(&self.registry.watchers).remove(&self.session.id);
    }
}

/// A command for an agent, with where to put its answer.
#[derive(Debug)]
pub struct CommandRequest {
    /// What to do.
    pub command: Command,
    /// The agent's result.
    pub reply: oneshot::Sender<Result<CommandOutput, String>>,
}

/// Why a command got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The agent's session ended before it answered.
    #[error("the agent went offline before answering")]
    Offline,
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    TimedOut(Duration),
}

/// One registered agent: its camera port, its tunnel, its last heartbeat.
///
/// Cancelling [`AgentSession::cancel`] ends everything the session owns: the camera
/// listener, the Watcher streams, the QUIC connection and the control connection.
#[derive(Debug)]
pub struct AgentSession {
    /// The agent id.
    pub id: String,
    /// Where the control connection comes from.
    pub remote: SocketAddr,
    /// The camera, as the agent describes it.
    pub camera: CameraInfo,
    /// The agent's software version.
    pub agent_version: String,
    /// The relay port Watchers connect to for this camera.
    pub port: u16,
    /// When the registration was accepted.
    pub registered_at: SystemTime,
    /// Heartbeat interval the agent announced.
    pub heartbeat_interval: Duration,
    /// Watcher connections open right now.
    pub active_streams: AtomicU32,
    /// The camera's Prometheus series.
    pub metrics: CameraMetrics,
    /// True if the agent registered with a client certificate; its QUIC connection
    /// must then present one too.
    pub certified: bool,
    /// Commands for the agent, sent by its control loop.
    commands: mpsc::Sender<CommandRequest>,
    /// The control loop's end of `commands`, taken once.
    command_inbox: Mutex<Option<mpsc::Receiver<CommandRequest>>>,
    session_key: [u8; SESSION_KEY_LEN],
    /// Child of the relay's root token; see the type's docs.
    cancel: CancellationToken,
    /// Why the session was ended from outside, for the control loop to tell the agent.
    close_reason: Mutex<Option<CloseReason>>,
    /// The links that carry the camera's streams, once the agent's hello proved it
    /// owns this registration; Watcher connections that arrive before that wait.
    links: watch::Sender<Links>,
    /// Last heartbeat: when, and the stats it carried.
    heartbeat: Mutex<Option<(Instant, AgentStats)>>,
    /// The camera listener's task; a takeover awaits it so the port is free to bind.
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Media health of the camera's last finished Watcher session; a watch so that the
    /// API (and tests) can follow it.
    media: watch::Sender<Option<MediaStats>>,
    /// The data-plane shard the camera's work runs on, set once at registration; the
    /// shard counts the camera until the session is gone.
    seat: OnceLock<Seat>,
}

impl Registry {
    /// An empty registry admitting agents per `auth` and `ports`, counting in `metrics`.
    pub fn new(auth: AgentAuth, ports: PortPolicy, metrics: Arc<Metrics>) -> Self {
        let known = auth
            .agents
            .keys()
            .map(String::as_str)
            .chain(ports.assigned_ids())
            .map(str::to_string)
            .collect();
        Registry {
            auth,
            sessions: Mutex::new(HashMap::new()),
            known: Mutex::new(known),
            ports: tokio::sync::Mutex::new(ports),
            next_connection_id: AtomicU64::new(1),
            metrics,
            watchers: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
        }
    }

    /// Checks a registration and, if it is good, takes over any older session of the
    /// same id, binds the camera port and records the new session. The caller starts
    /// the listener with the returned [`tokio::net::TcpListener`].
    pub async fn admit(
        &self,
        reg: &Register,
        certified: Option<&str>,
        remote: SocketAddr,
        limits: &Limits,
        parent: &CancellationToken,
    ) -> Result<(Arc<AgentSession>, tokio::net::TcpListener), Rejection> {
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&reg.version) {
            return Err(Rejection::UnsupportedVersion {
                agent: reg.version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        check_agent_id(&reg.agent_id)
            .map_err(|why| Rejection::Invalid(format!("agent id {why}")))?;
        self.check_credentials(reg, certified).await?;
        let requested = reg
            .services
            .iter()
            .find(|s| s.name == SERVICE_RTSP)
            .map(|s| s.port)
            .ok_or_else(|| Rejection::Invalid(format!("no {SERVICE_RTSP:?} service requested")))?;

        let mut ports = self.ports.lock().await;
        {
            let sessions = self.lock_sessions();
            if sessions.len() >= limits.max_agents && !sessions.contains_key(&reg.agent_id) {
                tracing::warn!(
                    "refusing {:?}: {} agents registered (limits.max_agents)",
                    reg.agent_id,
                    limits.max_agents
                );
                return Err(Rejection::RetryLater {
                    secs: 60,
                    why: format!(
                        "the relay serves its maximum of {} agents (limits.max_agents)",
                        limits.max_agents
                    ),
                });
            }
        }
        let chosen = ports.choose(&reg.agent_id, requested)?;
        let old = self.lock_sessions().remove(&reg.agent_id);
        if let Some(old) = old {
            tracing::warn!(agent = %reg.agent_id, old = %old.remote, new = %remote, "agent connected again; closing its older session");
            old.close(CloseReason::Replaced(remote.to_string()));
            old.wait_released().await;
        }
        // A port picked fresh for a camera that asked for any may be in use by another
        // program: take the next free one. Requested, pinned and remembered ports stay.
        let fresh_pick = requested == 0 && ports.assigned(&reg.agent_id).is_none();
        let (port, listener) = if fresh_pick {
            ports.bind_any_from(&reg.agent_id, chosen).await?
        } else {
            (chosen, ports.bind(chosen).await?)
        };
        if let Err(e) = ports.remember(&reg.agent_id, port) {
            tracing::warn!(agent = %reg.agent_id, port, "could not save the port assignment: {e}");
        }

        let mut session_key = [0; SESSION_KEY_LEN];
        rand::rng().fill_bytes(&mut session_key);
        let interval = Duration::from_secs(u64::from(reg.heartbeat_interval_secs.max(1)))
            .min(limits.max_heartbeat_interval);
        let (commands, command_inbox) = mpsc::channel(COMMAND_QUEUE);
        let session = Arc::new(AgentSession {
            commands,
            command_inbox: Mutex::new(Some(command_inbox)),
            id: reg.agent_id.clone(),
            remote,
            camera: reg.camera.clone(),
            agent_version: reg.agent_version.clone(),
            port,
            registered_at: SystemTime::now(),
            heartbeat_interval: interval,
            active_streams: AtomicU32::new(0),
            metrics: self.metrics.camera(&reg.agent_id),
            certified: certified.is_some(),
            session_key,
            cancel: parent.child_token(),
            close_reason: Mutex::new(None),
            links: watch::Sender::new(Links::default()),
            heartbeat: Mutex::new(None),
            listener: Mutex::new(None),
            media: watch::Sender::new(None),
            seat: OnceLock::new(),
        });
        self.lock_sessions()
            .insert(session.id.clone(), session.clone());
        lock(&self.known).insert(session.id.clone());
        Ok((session, listener))
    }

    /// Checks what the agent proves itself with: its token, and `certified`, the
    /// common name of the client certificate it presented (already verified against
    /// the client CA by TLS), if any.
    async fn check_credentials(
        &self,
        reg: &Register,
        certified: Option<&str>,
    ) -> Result<(), Rejection> {
        if let Some(name) = certified {
            if name != reg.agent_id {
                return Err(Rejection::CertificateMismatch(name.to_string()));
            }
        }
        let expected = match self.auth.agents.get(&reg.agent_id) {
            Some(entry) => entry.token.clone(),
            None if certified.is_some() && self.auth.any_certified_agent => None,
            None => match &self.auth.shared_token {
                Some(token) => Some(Token::Plain(token.clone())),
                None => return Err(Rejection::UnknownAgent(reg.agent_id.clone())),
            },
        };
        match expected {
            None if certified.is_none() => return Err(Rejection::CertificateRequired),
            None => {}
            Some(Token::Plain(token)) if !token.matches(&reg.token) => {
                return Err(Rejection::BadToken)
            }
            Some(Token::Plain(_)) => {}
            Some(Token::Hash(hashes)) => {
                let presented = reg.token.clone();
                // Argon2 is slow on purpose; keep it off the runtime's threads.
                let verified = tokio::task::spawn_blocking(move || {
                    use argon2::{password_hash::PasswordHash, Argon2, PasswordVerifier};
                    hashes.iter().any(|hash| {
                        PasswordHash::new(hash.expose()).is_ok_and(|parsed| {
                            Argon2::default()
                                .verify_password(presented.expose().as_bytes(), &parsed)
                                .is_ok()
                        })
                    })
                })
                .await
                .unwrap_or(false);
                if !verified {
                    return Err(Rejection::BadToken);
                }
            }
        }
        if self.auth.require_certificates && certified.is_none() {
            return Err(Rejection::CertificateRequired);
        }
        Ok(())
    }

    /// Removes `session` if it is still the registered one for its id (a takeover may
    /// already have replaced it), ends it and waits until its camera port is free.
    pub async fn remove(&self, session: &Arc<AgentSession>) {
        {
            let mut sessions = self.lock_sessions();
            if sessions
                .get(&session.id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.id);
            }
        }
        session.cancel.cancel();
        session.wait_released().await;
    }

    /// The live session of `agent_id`, if any.
    pub fn get(&self, agent_id: &str) -> Option<Arc<AgentSession>> {
        self.lock_sessions().get(agent_id).cloned()
    }

    /// True if `agent_id` is listed in the config or has registered before, even if it
    /// is offline now.
    pub fn knows(&self, agent_id: &str) -> bool {
        lock(&self.known).contains(agent_id)
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The port assigned to `agent_id` (pinned, or remembered from its registrations).
    pub async fn assigned_port(&self, agent_id: &str) -> Option<u16> {
        self.ports.lock().await.assigned(agent_id)
    }

    /// Time since the registry (the relay) started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Every agent id the relay knows, online or not, sorted.
    pub fn known(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.known).iter().cloned().collect();
        ids.sort_unstable();
        ids
    }

    /// Records an open Watcher connection until the guard is dropped.
    pub fn open_watcher(
        &self,
        id: u64,
        camera: &str,
        peer: SocketAddr,
        opened: Instant,
    ) -> WatcherGuard<'_> {
        let session = Arc::new(WatcherSession {
            id,
            camera: camera.to_string(),
            peer,
            opened,
            request: OnceLock::new(),
            bytes: ByteCounters::default(),
        });
        lock(&self.watchers).insert(id, session.clone());
        WatcherGuard {
            registry: self,
            session,
        }
    }

    /// The Watcher connections open now, oldest first.
    pub fn watchers(&self) -> Vec<Arc<WatcherSession>> {
        lock(&self.watchers).values().cloned().collect()
    }

    /// Every live session, for listings.
    pub fn sessions(&self) -> Vec<Arc<AgentSession>> {
        self.lock_sessions().values().cloned().collect()
    }

    /// A relay-wide id for a new Watcher connection.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock_sessions(&self) -> MutexGuard<'_, HashMap<String, Arc<AgentSession>>> {
        lock(&self.sessions)
    }
}

impl AgentSession {
    /// Ends the session from outside; the control loop tells the agent `reason`.
    pub fn close(&self, reason: CloseReason) {
        lock(&self.close_reason).get_or_insert(reason);
        self.cancel.cancel();
    }

    /// Why the session was closed from outside, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.close_reason).clone()
    }

    /// Resolves when the session ends.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// True if `key` is this session's key.
    pub fn key_matches(&self, key: &[u8]) -> bool {
        constant_time_eq(&self.session_key, key)
    }

    /// The session key, to hand to the agent in `Registered`.
    pub fn session_key(&self) -> [u8; SESSION_KEY_LEN] {
        self.session_key
    }

    /// Makes `conn` this session's tunnel; returns the one it replaces.
    pub fn attach_tunnel(&self, conn: quinn::Connection) -> Option<quinn::Connection> {
        let mut old = None;
        self.links
            .send_modify(|links| old = links.quic.replace(conn));
        old
    }

    /// Forgets `conn` if it is still the tunnel.
    pub fn detach_tunnel(&self, conn: &quinn::Connection) {
        self.links.send_if_modified(|links| {
            let current = links
                .quic
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id());
            if current {
                links.quic = None;
            }
            current
        });
    }

    /// Makes `opener`'s link this session's TCP fallback, in place of any earlier one.
    /// Returns the QUIC tunnel it supersedes: an agent opens a fallback only when QUIC
    /// does not reach the relay, so a tunnel still held for it is dead, merely not yet
    /// timed out; new streams must not wait on it.
    pub fn attach_fallback(&self, opener: Opener) -> Option<quinn::Connection> {
        let mut stale = None;
        self.links.send_modify(|links| {
            links.fallback = Some(opener);
            stale = links.quic.take();
        });
        stale
    }

    /// Forgets `opener`'s link if it is still the fallback.
    pub fn detach_fallback(&self, opener: &Opener) {
        self.links.send_if_modified(|links| {
            let current = links.fallback.as_ref().is_some_and(|o| o.same_link(opener));
            if current {
                links.fallback = None;
            }
            current
        });
    }

    /// The link a new stream should take, waiting up to `wait` for the agent to bring
    /// one up: the QUIC tunnel if it is up, else the TCP fallback.
    pub async fn link(&self, wait: Duration) -> Option<Link> {
        let mut rx = self.links.subscribe();
        let ready = tokio::time::timeout(wait, rx.wait_for(|l| l.preferred().is_some())).await;
        match ready {
            Ok(Ok(links)) => links.preferred(),
            _ => None,
        }
    }

    /// Records a heartbeat.
    pub fn heartbeat(&self, stats: AgentStats) {
        *lock(&self.heartbeat) = Some((Instant::now(), stats));
    }

    /// The last heartbeat's time and stats.
    pub fn last_heartbeat(&self) -> Option<(Instant, AgentStats)> {
        *lock(&self.heartbeat)
    }

    /// Records the media health of a finished Watcher session.
    pub fn record_media(&self, media: MediaStats) {
        self.media.send_replace(Some(media));
    }

    /// Follows the media health of the camera's finished Watcher sessions.
    pub fn media(&self) -> watch::Receiver<Option<MediaStats>> {
        self.media.subscribe()
    }

    /// Sends `command` to the agent and waits up to `wait` for its result.
    pub async fn command(
        &self,
        command: Command,
        wait: Duration,
    ) -> Result<Result<CommandOutput, String>, CommandError> {
        let (reply, answer) = oneshot::channel();
        let asked = async {
            self.commands
                .send(CommandRequest { command, reply })
                .await
                .map_err(|_| CommandError::Offline)?;
            answer.await.map_err(|_| CommandError::Offline)
        };
        tokio::time::timeout(wait, asked)
            .await
            .map_err(|_| CommandError::TimedOut(wait))?
    }

    /// The control loop's inbox of commands; `None` after the first call.
    pub(crate) fn take_command_inbox(&self) -> Option<mpsc::Receiver<CommandRequest>> {
        lock(&self.command_inbox).take()
    }

    /// The QUIC tunnel, if it is up.
    pub fn current_tunnel(&self) -> Option<quinn::Connection> {
        self.links.borrow().quic.clone()
    }

    /// The link new streams take right now, if any.
    pub fn current_link(&self) -> Option<Link> {
        self.links.borrow().preferred()
    }

    /// Keeps the camera listener's task, so a takeover can wait for the port.
    /// Seats the camera on a data-plane shard (once; a second seat is dropped).
    pub(crate) fn seat(&self, seat: Seat) -> &Arc<Shard> {
        self.seat.get_or_init(|| seat).shard()
    }

    /// The data-plane shard the camera's work runs on, once seated.
    pub(crate) fn shard(&self) -> Option<&Arc<Shard>> {
        self.seat.get().map(Seat::shard)
    }

    /// Which data-plane shard (0, 1, …) the camera's work runs on, once seated.
    pub fn data_shard(&self) -> Option<usize> {
        self.shard().map(|shard| shard.index)
    }

    pub fn set_listener(&self, task: JoinHandle<()>) {
        *lock(&self.listener) = Some(task);
    }

    async fn wait_released(&self) {
        let task = lock(&self.listener).take();
        if let Some(task) = task {
            if tokio::time::timeout(RELEASE_WAIT, task).await.is_err() {
                tracing::warn!(agent = %self.id, port = self.port, "old camera listener did not stop in time");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every mutation behind these locks is one insert, remove or replacement, so a
    // panic while holding one leaves a consistent value: poisoning carries no meaning.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
