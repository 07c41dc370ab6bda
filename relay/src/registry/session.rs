//! One registered agent's session: its camera port, its links, its commands, its last
//! heartbeat; cancelling it ends everything it owns.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU32, Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use common::{
    mux::Opener,
    protocol::{
        AgentStats, CameraInfo, CloseReason, Command, CommandOutput, Redirect, Register,
        UpdateOffer, FEATURE_LABEL_PREFIX, FEATURE_REDIRECT, FEATURE_TARGET_PREFIX, FEATURE_UPDATE,
        SESSION_KEY_LEN,
    },
    secret::constant_time_eq,
};
use rand::RngCore;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{
    links::{Link, Links},
    lock,
};
use crate::{
    metrics::CameraMetrics,
    shard::{Seat, Shard},
    MediaStats,
};

/// Commands waiting for one agent's control loop; more are refused as busy.
const COMMAND_QUEUE: usize = 16;

/// How long a takeover waits for the old session to release its camera port.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

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
    /// The agent follows a [`Redirect`] (it listed the feature when registering).
    pub follows_redirects: bool,
    /// The agent takes over-the-air updates (it listed [`FEATURE_UPDATE`]).
    pub takes_updates: bool,
    /// The Rust target triple the agent runs on, if it said.
    pub target: Option<String>,
    /// The agent's labels (`agent.labels` in its config).
    pub labels: Vec<String>,
    /// The update offered to the agent in this session, for its control loop to send.
    offer: watch::Sender<Option<UpdateOffer>>,
    /// Where the session was sent when it was ended, for the control loop to tell the
    /// agent.
    moved_to: Mutex<Option<Redirect>>,
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
    /// This registration among the camera's registrations, cluster-wide (random).
    pub epoch: u64,
    /// The data-plane shard the camera's work runs on, set once at registration; the
    /// shard counts the camera until the session is gone.
    seat: OnceLock<Seat>,
}

/// What a new session is made of, besides what it makes itself.
#[derive(Debug)]
pub(super) struct NewSession<'a> {
    pub(super) reg: &'a Register,
    pub(super) remote: SocketAddr,
    pub(super) port: u16,
    pub(super) heartbeat_interval: Duration,
    pub(super) metrics: CameraMetrics,
    pub(super) certified: bool,
    pub(super) cancel: CancellationToken,
    pub(super) epoch: u64,
}

impl AgentSession {
    /// A fresh session with a new random session key.
    pub(super) fn new(new: NewSession<'_>) -> Self {
        let mut session_key = [0; SESSION_KEY_LEN];
        rand::rng().fill_bytes(&mut session_key);
        let (commands, command_inbox) = mpsc::channel(COMMAND_QUEUE);
        AgentSession {
            commands,
            command_inbox: Mutex::new(Some(command_inbox)),
            id: new.reg.agent_id.clone(),
            remote: new.remote,
            camera: new.reg.camera.clone(),
            agent_version: new.reg.agent_version.clone(),
            follows_redirects: new.reg.services.iter().any(|s| s.name == FEATURE_REDIRECT),
            takes_updates: new.reg.services.iter().any(|s| s.name == FEATURE_UPDATE),
            target: new
                .reg
                .services
                .iter()
                .find_map(|s| s.name.strip_prefix(FEATURE_TARGET_PREFIX))
                .map(String::from),
            labels: new
                .reg
                .services
                .iter()
                .filter_map(|s| s.name.strip_prefix(FEATURE_LABEL_PREFIX))
                .map(String::from)
                .collect(),
            offer: watch::Sender::new(None),
            moved_to: Mutex::new(None),
            port: new.port,
            registered_at: SystemTime::now(),
            heartbeat_interval: new.heartbeat_interval,
            active_streams: AtomicU32::new(0),
            metrics: new.metrics,
            certified: new.certified,
            session_key,
            cancel: new.cancel,
            close_reason: Mutex::new(None),
            links: watch::Sender::new(Links::default()),
            heartbeat: Mutex::new(None),
            listener: Mutex::new(None),
            media: watch::Sender::new(None),
            seat: OnceLock::new(),
            epoch: new.epoch,
        }
    }

    /// Ends the session from outside; the control loop tells the agent `reason`.
    pub fn close(&self, reason: CloseReason) {
        lock(&self.close_reason).get_or_insert(reason);
        self.cancel.cancel();
    }

    /// Ends the session, sending the agent to another relay (if it follows redirects;
    /// else the agent hears that this relay shuts down, and comes back on its own).
    pub(crate) fn move_to(&self, to: Redirect) {
        if self.follows_redirects {
            lock(&self.moved_to).get_or_insert(to);
        }
        self.close(CloseReason::Shutdown);
    }

    /// Where the session was sent, if it was.
    pub(crate) fn moved_to(&self) -> Option<Redirect> {
        lock(&self.moved_to).clone()
    }

    /// Why the session was closed from outside, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.close_reason).clone()
    }

    /// Ends the session (its owner removed it).
    pub(super) fn end(&self) {
        self.cancel.cancel();
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

    /// Offers the agent an update (its control loop sends it).
    pub(crate) fn offer_update(&self, offer: UpdateOffer) {
        self.offer.send_replace(Some(offer));
    }

    /// Follows the update offered to the agent.
    pub(crate) fn offers(&self) -> watch::Receiver<Option<UpdateOffer>> {
        self.offer.subscribe()
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

    /// Follows changes of the session's links.
    pub(super) fn links_changed(&self) -> watch::Receiver<Links> {
        self.links.subscribe()
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

    pub(super) async fn wait_released(&self) {
        let task = lock(&self.listener).take();
        if let Some(task) = task {
            if tokio::time::timeout(RELEASE_WAIT, task).await.is_err() {
                tracing::warn!(agent = %self.id, port = self.port, "old camera listener did not stop in time");
            }
        }
    }
}
