//! The relay: serves camera agents (WebSocket control link and QUIC tunnels) and makes
//! each camera reachable as a plain local RTSP server, one TCP port per camera (and,
//! optionally, all of them on one shared port as `/<agent-id>/…`).
//!
//! # Glossary
//! - **Agent**: `camera-agent` inside a camera; dials out to this relay.
//! - **Control link**: the agent's WebSocket (`/tunnel`): register, heartbeats.
//! - **Tunnel**: the agent's QUIC connection; one bidirectional stream per Watcher
//!   connection, opened by the relay.
//! - **Watcher**: the VMS, ffmpeg, VLC… connecting to a camera's port on this host.
//!
//! [`Relay::bind`] binds everything and reports the real addresses (tests bind port 0);
//! [`Relay::run`] serves until its shutdown token is cancelled.

#![forbid(unsafe_code)]

mod admission;
mod api;
mod balance;
pub mod config;
mod console;
mod control;
mod data;
pub mod events;
mod forward;
mod http;
pub mod metrics;
mod outbound;
mod peer;
pub mod registry;
mod rtsp;
mod shard;
mod throttle;
mod traffic;
mod updates;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use common::{protocol::hex, tls};
use peer::link::PeerLinks;
use registry::fleet::{
    etcd::{EtcdStore, Taken},
    local::LocalStore,
    Store,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::RelayConfig;
pub use registry::Registry;
pub use rtsp::MediaStats;

/// Time given to open sessions to say goodbye at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by the relay's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    registry: Arc<Registry>,
    limits: config::Limits,
    /// Who may use the operator API.
    api: config::ApiConfig,
    /// Backoff for addresses whose registrations keep failing.
    throttle: throttle::Throttle,
    /// The pace of registrations (`limits.registrations_per_sec`).
    admission: std::sync::Mutex<admission::Admission>,
    /// The data-plane threads, each with its QUIC endpoint; cameras are seated on them.
    shards: shard::Shards,
    /// In a cluster: sending cameras to other relays (balance, drain).
    balance: Option<Arc<balance::Balance>>,
    /// Over-the-air agent updates.
    updates: Arc<updates::Updates>,
    /// The cameras' recent traffic, for the console.
    traffic: Arc<traffic::Traffic>,
    /// The address the camera ports listen on, for the URLs the API shows.
    camera_bind: std::net::IpAddr,
    cert_sha256: [u8; 32],
    /// Every task the relay spawns, so shutdown can wait for them.
    tracker: TaskTracker,
    /// The root token; agent sessions hang off it as children.
    shutdown: CancellationToken,
}

/// A bound, not yet running relay.
#[derive(Debug)]
pub struct Relay {
    listener: TcpListener,
    /// The shared RTSP port (`/<agent-id>/…`), if configured.
    shared_listener: Option<TcpListener>,
    /// TLS of the control listener; `None` serves plain `ws://`.
    control_tls: Option<Arc<rustls::ServerConfig>>,
    /// In a cluster: the cameras other relays take from this one, and the revision the
    /// store's watch goes on from.
    cluster: Option<(mpsc::UnboundedReceiver<Taken>, i64)>,
    /// In a cluster with `peer_listen`: the links to the other relays.
    peers: Option<Arc<PeerLinks>>,
    /// In a cluster: redirect Watchers for other relays' cameras there.
    redirect: bool,
    /// In a cluster: serve other relays' cameras' ports too.
    remote_camera_ports: bool,
    shared: Arc<Shared>,
}

impl Relay {
    /// Binds the control listener and the QUIC endpoint and loads the port state.
    pub async fn bind(config: RelayConfig) -> anyhow::Result<Relay> {
        let identity = match &config.tls.identity {
            Some((cert, key)) => tls::Identity::from_pem_files(cert, key)?,
            None => tls::Identity::self_signed(&["camera-relay"])?,
        };
        let client_ca = match &config.tls.client_ca {
            Some(path) => Some(tls::load_roots(path).context("tls.client_ca")?),
            None => None,
        };
        let control_tls = match (&config.tls.identity, config.tls.plain_control) {
            (Some(_), false) => Some(Arc::new(tls::server_config(
                &identity,
                client_ca.as_ref(),
                b"http/1.1",
            )?)),
            _ => None,
        };
        let cert_sha256 = identity.leaf_sha256();
        let ports = registry::ports::PortPolicy::new(&config);
        let (store, cluster) = match &config.cluster {
            None => (
                Store::Local(LocalStore::load(config.state_dir.as_deref())?),
                None,
            ),
            Some(cluster) => {
                let connected = EtcdStore::connect(cluster).await?;
                tracing::info!(
                    relay = %cluster.relay_id,
                    etcd = %cluster.endpoints.join(", "),
                    "joined the relay cluster"
                );
                let follow = (connected.taken, connected.revision);
                (Store::Etcd(connected.store), Some(follow))
            }
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (TCP, control link)", config.listen))?;
        let shards = shard::Shards::start(
            config.data_shards,
            config.quic_listen,
            tls::quic_server_config(&identity, client_ca.as_ref())?,
        )?;
        let shared_listener = match config.shared_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} (TCP, shared RTSP port, shared_listen)")
            })?),
            None => None,
        };
        let cameras = config.camera_ports.len().min(config.limits.max_agents);
        if let Some(limit) = open_file_limit() {
            // Each camera holds its control connection and its listener; each Watcher
            // one more.
            let needed = 2 * cameras as u64 + 256;
            if limit < needed {
                tracing::warn!(
                    "this process may open {limit} files, and serving {cameras} cameras \
                     (camera_ports) takes about {needed} before any Watcher: raise the limit \
                     (ulimit -n, or LimitNOFILE= in the systemd unit) or cameras will be \
                     refused with \"too many open files\""
                );
            }
        }
        let quic_ports: Vec<u16> = shards.all().iter().map(|s| s.port).collect();
        tracing::info!(
            cert_sha256 = %hex(&cert_sha256),
            control = if control_tls.is_some() { "wss" } else { "ws" },
            client_certificates = client_ca.is_some(),
            ?quic_ports,
            "relay ready: {config}"
        );
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(metrics::Metrics::new()?);
        let hooks = config
            .webhooks
            .iter()
            .map(|hook| {
                tracing::info!(webhook = %hook.name, types = ?hook.types, "events are POSTed to a webhook");
                events::webhook::start(hook, &metrics, &tracker, &shutdown)
            })
            .collect();
        let events = Arc::new(events::Events::new(
            store.cluster().map(|c| c.relay_id().to_string()),
            config.event_history,
            hooks,
            metrics.clone(),
        ));
        let releases = updates::releases::Releases::load(
            config.state_dir.as_deref(),
            config.updates.release_keys.clone(),
        )?;
        let updates = Arc::new(updates::Updates::new(
            releases,
            config.updates,
            events.clone(),
            metrics.clone(),
        ));
        let registry = Arc::new(Registry::new(config.auth, ports, store, metrics, events));
        let balance = match (&config.cluster, registry.store().cluster()) {
            (Some(cluster), Some(store)) => Some(Arc::new(balance::Balance::new(
                store.clone(),
                cluster.balance,
                cluster.drain_rate,
            ))),
            _ => None,
        };
        let peer = config.cluster.as_ref().and_then(|c| c.peer.as_ref());
        let peers = match (peer, registry.store().cluster()) {
            (Some(peer), Some(store)) => {
                let links = PeerLinks::bind(
                    peer,
                    store.clone(),
                    registry.clone(),
                    config.limits.clone(),
                    tracker.clone(),
                )?;
                tracing::info!(
                    listen = ?links.local_addr(),
                    advertise = %peer.advertise,
                    "relay-to-relay links served"
                );
                Some(Arc::new(links))
            }
            _ => None,
        };
        Ok(Relay {
            listener,
            shared_listener,
            control_tls,
            cluster,
            peers,
            redirect: config
                .cluster
                .as_ref()
                .is_some_and(|c| c.crossing == config::Crossing::Redirect),
            remote_camera_ports: config
                .cluster
                .as_ref()
                .is_some_and(|c| c.remote_camera_ports),
            shared: Arc::new(Shared {
                registry,
                throttle: throttle::Throttle::new(
                    config.limits.failed_registrations,
                    config.limits.max_registration_backoff,
                ),
                admission: std::sync::Mutex::new(admission::Admission::new(
                    config.limits.registrations_per_sec,
                )),
                limits: config.limits,
                api: config.api,
                shards,
                balance,
                updates,
                traffic: Arc::default(),
                camera_bind: config.camera_bind,
                cert_sha256,
                tracker,
                shutdown,
            }),
        })
    }

    /// Address of the control link (TCP).
    pub fn control_addr(&self) -> SocketAddr {
        // A bound listener always has a local address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Address of the first shard's QUIC endpoint (UDP): the configured QUIC port.
    pub fn quic_addr(&self) -> SocketAddr {
        self.shared
            .shards
            .first_addr()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Address of the shared RTSP port, if there is one.
    pub fn shared_addr(&self) -> Option<SocketAddr> {
        self.shared_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Address of the relay-to-relay endpoint (UDP), in a cluster that has one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peers.as_ref().and_then(|p| p.local_addr())
    }

    /// The live agents.
    pub fn registry(&self) -> Arc<Registry> {
        self.shared.registry.clone()
    }

    /// Serves until `shutdown` is cancelled, then closes every session and waits a
    /// bounded time for them to end.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Relay {
            listener,
            shared_listener,
            control_tls,
            cluster,
            peers,
            redirect,
            remote_camera_ports,
            shared,
        } = self;
        let root = shared.shutdown.clone();
        let mut store_task = None;
        if let (Some((mut taken, revision)), Some(store)) =
            (cluster, shared.registry.store().cluster())
        {
            // Awaited last: it gives the lease back once the relay shuts down.
            store_task = Some(tokio::spawn(store.clone().run(revision, root.clone())));
            let registry = shared.registry.clone();
            let stop = root.clone();
            shared.tracker.spawn(async move {
                while let Some(Some(taken)) = stop.run_until_cancelled(taken.recv()).await {
                    registry.taken(&taken);
                }
            });
        }
        shared.tracker.spawn(
            shared
                .traffic
                .clone()
                .run(shared.registry.clone(), root.clone()),
        );
        shared.tracker.spawn(
            shared
                .updates
                .clone()
                .run(shared.registry.clone(), root.clone()),
        );
        for shard in shared.shards.all() {
            shard.handle.spawn(shared.tracker.track_future(data::serve(
                shard.endpoint.clone(),
                shared.registry.clone(),
                shared.limits.clone(),
                root.clone(),
                shared.tracker.clone(),
            )));
        }
        if let Some(peers) = &peers {
            shared.tracker.spawn(peers.clone().serve(root.clone()));
            if remote_camera_ports {
                shared.tracker.spawn(follow_remote_ports(
                    shared.clone(),
                    peers.clone(),
                    root.clone(),
                ));
            }
        }
        if let Some(listener) = shared_listener {
            let crossing = forward::Crossings { peers, redirect };
            shared.tracker.spawn(forward::serve_shared(
                listener,
                shared.registry.clone(),
                crossing,
                shared.limits.clone(),
                shared.tracker.clone(),
                root.clone(),
            ));
        }
        http::serve(
            listener,
            control::router(shared.clone()),
            control_tls.map(tokio_rustls::TlsAcceptor::from),
            shared.limits.clone(),
            shared.tracker.clone(),
            shutdown,
        )
        .await;

        tracing::info!("relay shutting down");
        root.cancel();
        shared.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not end within {SHUTDOWN_GRACE:?}");
        }
        shared.shards.shutdown(SHUTDOWN_GRACE).await;
        if let Some(task) = store_task {
            // The lease given back, this relay's cameras leave the cluster's view now,
            // not a TTL later.
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        Ok(())
    }
}

/// How often the listeners on other relays' cameras' ports are checked against the
/// view even when it did not change (a port that was busy may be free now).
const REMOTE_PORTS_RECHECK: Duration = Duration::from_secs(2);

/// Keeps a listener on the port of every camera another relay holds, until `stop`.
async fn follow_remote_ports(shared: Arc<Shared>, peers: Arc<PeerLinks>, stop: CancellationToken) {
    let registry = &shared.registry;
    let Some(store) = registry.store().cluster() else {
        return;
    };
    let mut changes = store.changes();
    loop {
        registry
            .follow_remote_ports(|listener, presence, stop| {
                forward::open_remote_port(
                    listener,
                    presence,
                    peers.clone(),
                    registry.clone(),
                    shared.limits.clone(),
                    shared.tracker.clone(),
                    stop,
                )
            })
            .await;
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(REMOTE_PORTS_RECHECK) => {}
        }
    }
    registry.close_remote_ports().await;
}

/// The soft limit on open files (`Max open files` in /proc/self/limits), if known.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&limits)
}

fn parse_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_soft_open_file_limit_is_read_from_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95534                95534                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_file_limit(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_file_limit(unlimited), None);
        assert!(open_file_limit().is_some(), "this test runs on Linux");
    }
}
