//! The relay's table of live agents: who is registered, on which port, with which
//! tunnel. Registration (credentials, port, takeover of a stale session) happens here,
//! so the control link, the QUIC endpoint, the forwarders and the API all read one
//! source of truth. Each of its jobs has a file: [`credentials`] (is the agent who it
//! says), [`ports`] (which port is whose, remembered across restarts), [`session`] (one
//! agent's session and its commands), [`links`] (what carries its streams),
//! [`watchers`] (the Watcher connections open now).

mod credentials;
pub(crate) mod fleet;
mod links;
pub(crate) mod ports;
mod remote;
mod session;
mod watchers;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use common::protocol::{
    check_agent_id, CloseReason, Register, Rejection, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    SERVICE_RTSP,
};
use tokio_util::sync::CancellationToken;

pub use fleet::{Presence, StoreHealth};
pub use links::Link;
pub use session::{AgentSession, CommandError, CommandRequest};
pub use watchers::{WatcherGuard, WatcherSession};

use crate::{
    config::{AgentAuth, Limits},
    events::{EventKind, Events},
    metrics::Metrics,
};
use fleet::{
    etcd::{EtcdStore, Taken},
    Store,
};
use ports::PortPolicy;
use session::NewSession;
use watchers::Watchers;

/// All live agent sessions, by agent id.
#[derive(Debug)]
pub struct Registry {
    auth: AgentAuth,
    sessions: Mutex<HashMap<String, Arc<AgentSession>>>,
    /// Agents the relay knows, online or not: listed in the config, or registered at
    /// some time (and so holding a port).
    known: Mutex<HashSet<String>>,
    /// When each camera that was online here since the relay started went offline.
    offline_since: Mutex<HashMap<String, Instant>>,
    /// Held for the whole of a registration: port choice, takeover and bind must not
    /// interleave between two agents, or two could be promised one port.
    ports: tokio::sync::Mutex<PortPolicy>,
    /// Remembered ports, and in a cluster which relay holds which camera.
    store: Store,
    next_connection_id: AtomicU64,
    metrics: Arc<Metrics>,
    /// What happens, for `/events` and webhooks.
    events: Arc<Events>,
    /// Watcher connections open now, for `/streams`.
    watchers: Watchers,
    /// Listeners on the ports of cameras other relays hold.
    remote_ports: remote::RemotePorts,
    started: Instant,
}

impl Registry {
    /// An empty registry admitting agents per `auth` and `ports`, remembering in
    /// `store`, counting in `metrics`.
    pub(crate) fn new(
        auth: AgentAuth,
        ports: PortPolicy,
        store: Store,
        metrics: Arc<Metrics>,
        events: Arc<Events>,
    ) -> Self {
        let known = auth
            .agents
            .keys()
            .cloned()
            .chain(ports.pinned_ids().map(str::to_string))
            .chain(store.assignments().into_keys())
            .collect();
        Registry {
            auth,
            sessions: Mutex::new(HashMap::new()),
            known: Mutex::new(known),
            offline_since: Mutex::default(),
            ports: tokio::sync::Mutex::new(ports),
            store,
            next_connection_id: AtomicU64::new(1),
            metrics,
            events,
            watchers: Watchers::default(),
            remote_ports: remote::RemotePorts::default(),
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
        credentials::check(&self.auth, reg, certified).await?;
        let requested = reg
            .services
            .iter()
            .find(|s| s.name == SERVICE_RTSP)
            .map(|s| s.port)
            .ok_or_else(|| Rejection::Invalid(format!("no {SERVICE_RTSP:?} service requested")))?;

        let ports = self.ports.lock().await;
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
        if let Some(cluster) = self.store.cluster() {
            // Refused before anything changes here: an older session stays as it is.
            cluster.check_ready()?;
        }
        let old = self.lock_sessions().remove(&reg.agent_id);
        if let Some(old) = old {
            tracing::warn!(agent = %reg.agent_id, old = %old.remote, new = %remote, "agent connected again; closing its older session");
            self.events.emit(
                &reg.agent_id,
                EventKind::Replaced {
                    old_remote: old.remote.to_string(),
                    new_remote: remote.to_string(),
                },
            );
            old.close(CloseReason::Replaced(remote.to_string()));
            old.wait_released().await;
        }
        let previous = ports.assigned(&reg.agent_id, &self.store.assignments());
        let (port, listener) = self.take_port(&ports, &reg.agent_id, requested).await?;
        if previous != Some(port) {
            self.events
                .emit(&reg.agent_id, EventKind::PortAssigned { port, previous });
        }
        let epoch = rand::random::<u64>();
        let mut presence = Presence {
            agent_id: reg.agent_id.clone(),
            relay: String::new(),
            epoch,
            port,
            link: None,
            since: unix_now(),
            remote: remote.to_string(),
            agent_version: reg.agent_version.clone(),
        };
        if let Some(cluster) = self.store.cluster() {
            presence.relay = cluster.relay_id().to_string();
            if let Some(before) = self.store.claim(presence.clone()).await? {
                tracing::info!(agent = %reg.agent_id, from = %before, "camera moved here from relay {before}");
            }
        }

        let heartbeat_interval = Duration::from_secs(u64::from(reg.heartbeat_interval_secs.max(1)))
            .min(limits.max_heartbeat_interval);
        let session = Arc::new(AgentSession::new(NewSession {
            reg,
            remote,
            port,
            heartbeat_interval,
            metrics: self.metrics.camera(&reg.agent_id),
            certified: certified.is_some(),
            cancel: parent.child_token(),
            epoch,
        }));
        let cluster = self.store.cluster().map(|c| (c.clone(), presence));
        tokio::spawn(follow_links(session.clone(), self.events.clone(), cluster));
        self.lock_sessions()
            .insert(session.id.clone(), session.clone());
        lock(&self.known).insert(session.id.clone());
        Ok((session, listener))
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
                lock(&self.offline_since).insert(session.id.clone(), Instant::now());
            }
        }
        session.end();
        session.wait_released().await;
        self.store.release(&session.id, session.epoch).await;
    }

    /// The port for `agent_id`, bound, and remembered by the store. In a cluster another
    /// relay may hand out the same fresh port at the same moment; the store's
    /// transaction lets one of them have it and the other picks again.
    async fn take_port(
        &self,
        ports: &PortPolicy,
        agent_id: &str,
        requested: u16,
    ) -> Result<(u16, tokio::net::TcpListener), Rejection> {
        const RACES: usize = 3;
        for _ in 0..RACES {
            let remembered = self.store.assignments();
            let chosen = ports.choose(agent_id, requested, &remembered)?;
            // A port picked fresh for a camera that asked for any may be in use by
            // another program: take the next free one. Requested, pinned and
            // remembered ports stay.
            let fresh_pick = requested == 0 && ports.assigned(agent_id, &remembered).is_none();
            let (port, listener) = if fresh_pick {
                ports.bind_any_from(agent_id, chosen, &remembered).await?
            } else {
                // The camera may have been held elsewhere until now, its port served
                // here for it.
                self.remote_ports.close(chosen).await;
                (chosen, ports.bind(chosen).await?)
            };
            if ports.is_pinned(agent_id) {
                return Ok((port, listener));
            }
            match self.store.remember(agent_id, port).await? {
                None => return Ok((port, listener)),
                Some(_) if fresh_pick => continue,
                Some(holder) => {
                    return Err(Rejection::PortTaken {
                        port,
                        holder: format!("assigned to camera {holder:?}"),
                    })
                }
            }
        }
        Err(Rejection::RetryLater {
            secs: 1,
            why: "other relays of the cluster took every port this one tried; try again".into(),
        })
    }

    /// Ends the session another relay took (`taken`), telling its agent where it went.
    pub(crate) fn taken(&self, taken: &Taken) {
        let Some(session) = self.get(&taken.agent_id).filter(|s| s.epoch == taken.epoch) else {
            return;
        };
        tracing::warn!(
            agent = %taken.agent_id,
            relay = %taken.by,
            "the camera registered on relay {} ({}); ending its session here",
            taken.by,
            taken.remote
        );
        session.close(CloseReason::Replaced(format!(
            "{}, on relay {}",
            taken.remote, taken.by
        )));
    }

    /// The fleet store.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// This relay's id in its cluster, if it is in one.
    pub(crate) fn relay_id(&self) -> Option<&str> {
        self.store.cluster().map(|store| store.relay_id())
    }

    /// Checks a registration's credentials, as [`Registry::admit`] does, for a relay
    /// that sends the camera elsewhere before admitting it.
    pub(crate) async fn check_credentials(
        &self,
        reg: &Register,
        certified: Option<&str>,
    ) -> Result<(), Rejection> {
        credentials::check(&self.auth, reg, certified).await
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

    /// The relay's events.
    pub(crate) fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// The port assigned to `agent_id` (pinned, or remembered from its registrations).
    pub async fn assigned_port(&self, agent_id: &str) -> Option<u16> {
        let remembered = self.store.assignments();
        self.ports.lock().await.assigned(agent_id, &remembered)
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

    /// How long camera `agent_id` has been offline, if it was online here since the
    /// relay started and is not now.
    pub fn offline_for(&self, agent_id: &str) -> Option<Duration> {
        if self.get(agent_id).is_some() {
            return None;
        }
        lock(&self.offline_since)
            .get(agent_id)
            .map(Instant::elapsed)
    }

    /// Records an open Watcher connection until the guard is dropped.
    pub fn open_watcher(
        &self,
        id: u64,
        camera: &str,
        peer: SocketAddr,
        opened: Instant,
    ) -> WatcherGuard<'_> {
        self.watchers.open(id, camera, peer, opened)
    }

    /// The Watcher connections open now, oldest first.
    pub fn watchers(&self) -> Vec<Arc<WatcherSession>> {
        self.watchers.list()
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

/// Follows what carries `session`'s streams until it ends: each change is a
/// `camera.link` event and, in a cluster, goes into the camera's record.
async fn follow_links(
    session: Arc<AgentSession>,
    events: Arc<Events>,
    mut cluster: Option<(Arc<EtcdStore>, Presence)>,
) {
    let mut links = session.links_changed();
    let mut current = None;
    loop {
        tokio::select! {
            () = session.cancelled() => return,
            changed = links.changed() => if changed.is_err() { return },
        }
        let link = session.current_link().map(|l| l.transport());
        if link == current {
            continue;
        }
        events.emit(
            &session.id,
            EventKind::Link {
                link,
                previous: current,
            },
        );
        current = link;
        if let Some((store, presence)) = &mut cluster {
            presence.link = link.map(String::from);
            store.update(presence.clone()).await;
        }
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every mutation behind these locks is one insert, remove or replacement, so a
    // panic while holding one leaves a consistent value: poisoning carries no meaning.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
