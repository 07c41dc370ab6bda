//! The fleet's state in etcd, shared by every relay of a cluster (docs/cluster.md).
//!
//! Keys, under the cluster's `key_prefix` (default `/camera-relay/`), values JSON:
//! - `relays/<relay-id>` → [`RelayRecord`], under the relay's lease;
//! - `cameras/<agent-id>` → [`Presence`], under the lease of the relay holding the
//!   camera: a relay that dies or is cut off loses its cameras within the lease's TTL,
//!   with nobody cleaning up;
//! - `ports/<port>` → the agent id that port belongs to, without a lease: it outlives
//!   every relay, and a returning camera gets it back wherever it lands. Created by
//!   transaction, so two relays never hand one port to two cameras.
//!
//! Each relay keeps one lease alive and follows the whole prefix with one watch, so its
//! view of the fleet is at most a watch event behind. A camera that registers on
//! another relay overwrites its `cameras/` key; the relay that held it sees that in its
//! watch and ends its own session ([`Taken`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use common::protocol::{check_agent_id, Rejection};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Presence, StoreHealth};
use crate::{config::ClusterConfig, registry::lock};

/// How long the relay waits for etcd at start before it gives up.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Pause before a failed lease or watch is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// Tries of one request before etcd counts as unreachable.
const ATTEMPTS: u32 = 3;

/// A relay of the cluster, as it announces itself (`relays/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RelayRecord {
    /// Where other relays and operators reach its control port.
    pub advertise: String,
    /// Where other relays reach its relay-to-relay endpoint (`host:port`, UDP), if it
    /// has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Where Watchers reach its shared RTSP port (`host:port`), if it announces one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtsp: Option<String>,
    /// The control URL agents dial to register with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// It is draining for maintenance: it takes no cameras and moves its own away.
    #[serde(default)]
    pub draining: bool,
    /// Its software version.
    pub version: String,
    /// When it started, Unix seconds.
    pub since: u64,
}

/// A camera another relay took from this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taken {
    /// The camera's agent id.
    pub(crate) agent_id: String,
    /// The session epoch this relay held it with.
    pub(crate) epoch: u64,
    /// The relay that holds it now.
    pub(crate) by: String,
    /// Where the camera's new control connection comes from.
    pub(crate) remote: String,
}

/// A store just connected: the store, the cameras other relays take from this one, and
/// the revision its watch goes on from ([`EtcdStore::run`]).
#[derive(Debug)]
pub(crate) struct Connected {
    pub(crate) store: Arc<EtcdStore>,
    pub(crate) taken: mpsc::UnboundedReceiver<Taken>,
    pub(crate) revision: i64,
}

/// What this relay has seen of the fleet through its watch.
#[derive(Debug, Default)]
struct View {
    cameras: HashMap<String, Presence>,
    /// Agent → port, from `ports/`.
    ports: BTreeMap<String, u16>,
    relays: HashMap<String, RelayRecord>,
}

/// The connection to etcd and this relay's part in it.
pub(crate) struct EtcdStore {
    /// Replaced when etcd forgets this relay's auth token (it expired, or etcd
    /// restarted): the client signs in once, at connect.
    client: Mutex<Client>,
    config: ClusterConfig,
    relay_id: String,
    /// What this relay announces; changes when it starts or stops draining.
    record: Mutex<RelayRecord>,
    prefix: String,
    ttl: Duration,
    endpoints: String,
    /// The lease this relay's keys live under; 0 while it has none.
    lease: AtomicI64,
    view: Mutex<View>,
    /// The cameras this relay holds, as it wrote them: re-announced under a new lease
    /// after the old one expired, and released only while still its own.
    claims: Mutex<HashMap<String, Presence>>,
    /// Keys this relay must delete once etcd answers again (releases that failed).
    orphans: Mutex<Vec<(String, Vec<u8>)>>,
    health: Mutex<Health>,
    taken: mpsc::UnboundedSender<Taken>,
    /// Counts changes of the view, for whoever follows it.
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("relay_id", &self.relay_id)
            .field("endpoints", &self.endpoints)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// The store's state as this relay sees it.
#[derive(Debug)]
struct Health {
    reachable: bool,
    changed: Instant,
    last_keepalive: Option<Instant>,
    last_watch: Option<Instant>,
    problem: Option<String>,
}

impl EtcdStore {
    /// Connects to etcd, takes a lease, announces the relay and reads the fleet. An
    /// error names the endpoints and what failed. The receiver gets the cameras other
    /// relays take from this one.
    pub(crate) async fn connect(config: &ClusterConfig) -> anyhow::Result<Connected> {
        let endpoints = config.endpoints.join(", ");
        let connected = tokio::time::timeout(CONNECT_WAIT, Self::open(config))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {CONNECT_WAIT:?}")))
            .with_context(|| format!("cannot reach the cluster store (etcd at {endpoints})"))?;
        let (client, lease) = connected;
        let config = config.clone();
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (taken, taken_rx) = mpsc::unbounded_channel();
        let store = Arc::new(EtcdStore {
            client: Mutex::new(client),
            relay_id: config.relay_id.clone(),
            record: Mutex::new(RelayRecord {
                advertise: config.advertise.clone(),
                peer: config.peer.as_ref().map(|p| p.advertise.clone()),
                rtsp: config.rtsp_advertise.clone(),
                agent_url: Some(config.agent_url.clone()),
                draining: false,
                version: env!("CARGO_PKG_VERSION").to_string(),
                since,
            }),
            prefix: config.key_prefix.clone(),
            ttl: config.lease_ttl,
            config,
            endpoints,
            lease: AtomicI64::new(lease),
            view: Mutex::new(View::default()),
            claims: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            health: Mutex::new(Health {
                reachable: true,
                changed: Instant::now(),
                last_keepalive: Some(Instant::now()),
                last_watch: None,
                problem: None,
            }),
            taken,
            changes: watch::Sender::new(0),
        });
        store.check_relay_id().await?;
        let revision = store
            .announce(lease)
            .await
            .with_context(|| format!("announcing this relay in etcd at {}", store.endpoints))?;
        Ok(Connected {
            store,
            taken: taken_rx,
            revision,
        })
    }

    /// The client and a fresh lease.
    async fn open(config: &ClusterConfig) -> anyhow::Result<(Client, i64)> {
        let mut client = Self::sign_in(config).await?;
        let ttl = i64::try_from(config.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl, None).await?.id();
        Ok((client, lease))
    }

    /// A client of `config`'s etcd, signed in if etcd has users.
    async fn sign_in(config: &ClusterConfig) -> anyhow::Result<Client> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(config.lease_ttl)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.clone(), password.expose().to_string());
        }
        if config.ca.is_some() || config.identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("cluster.etcd_ca {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &config.identity {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("cluster.etcd_cert {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("cluster.etcd_key {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        Ok(Client::connect(&config.endpoints, Some(options)).await?)
    }

    fn client(&self) -> Client {
        lock(&self.client).clone()
    }

    /// Signs in again when `e` says etcd no longer knows this relay's auth token.
    async fn sign_in_again_if(&self, e: &etcd_client::Error) {
        let forgotten = matches!(e, etcd_client::Error::GRpcStatus(status)
            if status.code() == tonic::Code::Unauthenticated);
        if !forgotten || self.config.user.is_none() {
            return;
        }
        match tokio::time::timeout(CONNECT_WAIT, Self::sign_in(&self.config)).await {
            Ok(Ok(client)) => {
                *lock(&self.client) = client;
                tracing::info!(
                    "signed in to etcd again (it no longer knew this relay's auth token)"
                );
            }
            Ok(Err(e)) => tracing::debug!("signing in to etcd again failed: {e:#}"),
            Err(_) => {
                tracing::debug!("signing in to etcd again: no answer within {CONNECT_WAIT:?}")
            }
        }
    }

    /// Runs a request, again (on another member, as the client's balancer then picks
    /// one that is up) when it fails: a member that just died must cost nothing.
    async fn request<T, F, Fut>(&self, request: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 0;
        loop {
            match request(self.client()).await {
                Ok(answer) => return Ok(answer),
                Err(e) if attempt + 1 >= ATTEMPTS => return Err(e),
                Err(e) => {
                    attempt += 1;
                    self.sign_in_again_if(&e).await;
                    tracing::debug!("etcd request failed ({e}); trying again");
                    tokio::time::sleep(RETRY / 4 * attempt).await;
                }
            }
        }
    }

    /// Writes `relays/<id>` as it is now under `lease`.
    async fn put_record(&self, lease: i64) -> anyhow::Result<()> {
        let record = serde_json::to_vec(&*lock(&self.record))?;
        let key = self.key("relays/", &self.relay_id);
        let options = PutOptions::new().with_lease(lease);
        self.request(|mut client| {
            let (key, record, options) = (key.clone(), record.clone(), options.clone());
            async move { client.put(key, record, Some(options)).await }
        })
        .await?;
        Ok(())
    }

    /// Announces whether this relay is draining (other relays then send it no
    /// cameras).
    pub(crate) async fn set_draining(&self, draining: bool) -> anyhow::Result<()> {
        lock(&self.record).draining = draining;
        let lease = self.lease.load(Ordering::SeqCst);
        if lease != 0 {
            self.put_record(lease).await?;
        }
        Ok(())
    }

    /// Whether this relay announces that it is draining.
    pub(crate) fn draining(&self) -> bool {
        lock(&self.record).draining
    }

    /// Refuses a relay id that a live relay elsewhere announces: two relays under one id
    /// would each take the other's cameras for their own. The same id at the same
    /// address is this relay's previous run, whose lease has not run out yet.
    async fn check_relay_id(&self) -> anyhow::Result<()> {
        let key = self.key("relays/", &self.relay_id);
        let found = self
            .request(|mut client| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await
            .with_context(|| format!("reading {key} in etcd at {}", self.endpoints))?;
        let other = found
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<RelayRecord>(kv.value()).ok())
            .filter(|record| record.advertise != lock(&self.record).advertise);
        match other {
            Some(record) => anyhow::bail!(
                "relay id {:?} is in use by a live relay at {}; give each relay its own \
                 cluster.relay_id",
                self.relay_id,
                record.advertise
            ),
            None => Ok(()),
        }
    }

    /// Writes `relays/<id>` under `lease` and reads the fleet as it is now; returns the
    /// revision the watch goes on from.
    async fn announce(&self, lease: i64) -> anyhow::Result<i64> {
        self.put_record(lease).await?;
        let all = self
            .request(|mut client| {
                let prefix = self.prefix.clone();
                async move {
                    client
                        .get(prefix, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        let revision = all.header().map_or(0, |h| h.revision());
        let mut view = View::default();
        for kv in all.kvs() {
            self.apply_put(&mut view, kv);
        }
        *lock(&self.view) = view;
        self.changes.send_modify(|n| *n += 1);
        Ok(revision)
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.request(|mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    /// Keeps the lease and the watch going until `shutdown`; then gives the lease back,
    /// so this relay's cameras leave the cluster's view at once.
    pub(crate) async fn run(self: Arc<Self>, revision: i64, shutdown: CancellationToken) {
        tokio::select! {
            () = self.keep_lease() => {}
            () = self.follow(revision) => {}
            () = shutdown.cancelled() => {}
        }
        let lease = self.lease.swap(0, Ordering::Relaxed);
        if lease != 0 {
            let mut client = self.client();
            let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
        }
    }

    /// Keeps the lease alive; takes a new one (and announces everything again) when
    /// it expired while etcd was out of reach.
    ///
    /// A keep-alive goes out every quarter of the TTL and its answer is awaited as
    /// long. A failed stream (its member died) is replaced at once by one to another
    /// member. etcd counts as unreachable once the lease went unrenewed for three
    /// quarters of its TTL: longer than a leader election (about a second), during
    /// which etcd answers nothing but loses no lease.
    async fn keep_lease(&self) {
        let beat = self.ttl / 4;
        loop {
            let mut lease = self.lease.load(Ordering::Relaxed);
            if lease == 0 {
                match self.renew().await {
                    Ok(new) => lease = new,
                    Err(e) => {
                        self.unreachable(&format!("cannot take a new lease: {e}"));
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            }
            let mut client = self.client();
            let failure = match client.lease_keep_alive(lease).await {
                Err(e) => {
                    self.sign_in_again_if(&e).await;
                    format!("lease keep-alive: {e}")
                }
                Ok((mut keeper, mut answers)) => loop {
                    if let Err(e) = keeper.keep_alive().await {
                        break format!("lease keep-alive: {e}");
                    }
                    match tokio::time::timeout(beat, answers.message()).await {
                        Ok(Ok(Some(answer))) if answer.ttl() > 0 => self.kept_alive(),
                        Ok(Ok(Some(_))) => {
                            tracing::warn!(
                                "the relay's etcd lease expired; announcing its cameras again"
                            );
                            self.lease.store(0, Ordering::Relaxed);
                            break "the lease expired".to_string();
                        }
                        Ok(Ok(None)) => break "etcd closed the keep-alive stream".to_string(),
                        Ok(Err(e)) => {
                            self.sign_in_again_if(&e).await;
                            break format!("lease keep-alive: {e}");
                        }
                        Err(_) => break format!("no keep-alive answer within {beat:?}"),
                    }
                    self.release_orphans().await;
                    tokio::time::sleep(beat).await;
                },
            };
            let unrenewed = lock(&self.health)
                .last_keepalive
                .map_or(self.ttl, |at| at.elapsed());
            tracing::debug!("{failure}; lease unrenewed for {unrenewed:?}");
            if unrenewed >= self.ttl * 3 / 4 {
                self.unreachable(&failure);
            }
            if unrenewed >= self.ttl {
                // Gone in etcd: start afresh.
                self.lease.store(0, Ordering::Relaxed);
            }
            tokio::time::sleep(RETRY / 5).await;
        }
    }

    /// A new lease, with the relay and every camera it holds announced under it. A
    /// camera another relay took meanwhile is given up.
    async fn renew(&self) -> anyhow::Result<i64> {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = self
            .request(|mut client| async move { client.lease_grant(ttl, None).await })
            .await?
            .id();
        self.announce(lease).await?;
        let claims: Vec<Presence> = lock(&self.claims).values().cloned().collect();
        for presence in claims {
            let key = self.key("cameras/", &presence.agent_id);
            let value = serde_json::to_vec(&presence)?;
            let put = TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            );
            // Free (the old lease took the key with it), or still exactly this claim
            // (etcd kept the old lease a little longer, as it does across an election):
            // either way it is this relay's to announce again. Anything else is
            // another relay's claim.
            let free = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
            let still_ours = Compare::value(key.clone(), CompareOp::Equal, value.clone());
            let mut held_by = None;
            for compare in [free.clone(), still_ours, free] {
                let txn = Txn::new()
                    .when([compare])
                    .and_then([put.clone()])
                    .or_else([TxnOp::get(key.clone(), None)]);
                let answer = self.txn(txn).await?;
                if answer.succeeded() {
                    held_by = None;
                    break;
                }
                // Which claim stands now (none if it expired just now: try again).
                held_by = answer.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                    _ => None,
                });
                if held_by.as_ref().is_some_and(|held| *held != value) {
                    break;
                }
                held_by = None;
            }
            if let Some(holder) = held_by {
                let holder =
                    serde_json::from_slice::<Presence>(&holder).unwrap_or_else(|_| Presence {
                        relay: "another relay".to_string(),
                        remote: "unknown".to_string(),
                        ..presence.clone()
                    });
                self.give_up(&presence, &holder);
            }
        }
        self.lease.store(lease, Ordering::Relaxed);
        self.kept_alive();
        tracing::info!(
            lease,
            "etcd lease renewed; this relay and its cameras announced again"
        );
        Ok(lease)
    }

    /// Follows every key under the prefix from `revision` on, for good.
    async fn follow(&self, mut revision: i64) {
        loop {
            let mut client = self.client();
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1)
                .with_progress_notify();
            let failure = match client.watch(self.prefix.clone(), Some(options)).await {
                Err(e) => {
                    self.sign_in_again_if(&e).await;
                    format!("watch: {e}")
                }
                Ok((mut watcher, mut stream)) => {
                    let mut progress = tokio::time::interval(self.ttl);
                    loop {
                        tokio::select! {
                            _ = progress.tick() => {
                                // A healthy watch answers at once; its answers are the
                                // watch's age in the metrics.
                                let _ = watcher.request_progress().await;
                            }
                            message = stream.message() => match message {
                                Ok(Some(answer)) if answer.canceled() => {
                                    if answer.compact_revision() > 0 {
                                        // History is gone: read the whole prefix again.
                                        match self.announce(self.lease.load(Ordering::Relaxed)).await {
                                            Ok(now) => revision = now,
                                            Err(e) => tracing::warn!("rereading the fleet after a compaction: {e}"),
                                        }
                                    }
                                    break format!("etcd cancelled the watch: {}", answer.cancel_reason());
                                }
                                Ok(Some(answer)) => {
                                    lock(&self.health).last_watch = Some(Instant::now());
                                    for event in answer.events() {
                                        let Some(kv) = event.kv() else { continue };
                                        revision = revision.max(kv.mod_revision());
                                        self.apply(event.event_type(), kv);
                                    }
                                    if answer.events().is_empty() {
                                        revision = revision.max(answer.header().map_or(0, |h| h.revision()));
                                    }
                                }
                                Ok(None) => break "etcd closed the watch".to_string(),
                                Err(e) => {
                                    self.sign_in_again_if(&e).await;
                                    break format!("watch: {e}");
                                }
                            }
                        }
                    }
                }
            };
            tracing::debug!("{failure}; watching again from revision {}", revision + 1);
            tokio::time::sleep(RETRY).await;
        }
    }

    fn apply(&self, kind: EventType, kv: &KeyValue) {
        self.apply_locked(kind, kv);
        self.changes.send_modify(|n| *n += 1);
    }

    fn apply_locked(&self, kind: EventType, kv: &KeyValue) {
        let mut view = lock(&self.view);
        match kind {
            EventType::Put => self.apply_put(&mut view, kv),
            EventType::Delete => {
                let Some((kind, name)) = self.split_key(kv.key()) else {
                    return;
                };
                match kind {
                    "cameras/" => drop(view.cameras.remove(name)),
                    "relays/" => drop(view.relays.remove(name)),
                    "ports/" => view.ports.retain(|_, port| port.to_string() != name),
                    _ => {}
                }
            }
        }
    }

    /// Takes one key's new value into `view`; garbage is logged and skipped.
    fn apply_put(&self, view: &mut View, kv: &KeyValue) {
        let Some((kind, name)) = self.split_key(kv.key()) else {
            return;
        };
        let skip = |why: &str| {
            tracing::warn!(
                "skipping etcd key {:?}: {why} (written by another version, or by hand?)",
                String::from_utf8_lossy(kv.key())
            );
        };
        match kind {
            "cameras/" => match serde_json::from_slice::<Presence>(kv.value()) {
                Ok(presence) if presence.agent_id == name => {
                    if presence.relay != self.relay_id {
                        let mine = lock(&self.claims).get(name).cloned();
                        if let Some(mine) = mine {
                            self.give_up(&mine, &presence);
                        }
                    }
                    view.cameras.insert(name.to_string(), presence);
                }
                Ok(_) => skip("its agent id differs from its key"),
                Err(e) => skip(&format!("not a camera record: {e}")),
            },
            "relays/" => match serde_json::from_slice::<RelayRecord>(kv.value()) {
                Ok(record) => drop(view.relays.insert(name.to_string(), record)),
                Err(e) => skip(&format!("not a relay record: {e}")),
            },
            "ports/" => {
                let port = name.parse::<u16>().ok().filter(|p| *p > 0);
                let agent = std::str::from_utf8(kv.value())
                    .ok()
                    .filter(|id| check_agent_id(id).is_ok());
                match (port, agent) {
                    (Some(port), Some(agent)) => {
                        view.ports.retain(|_, p| *p != port);
                        view.ports.insert(agent.to_string(), port);
                    }
                    _ => skip("not a port and an agent id"),
                }
            }
            _ => skip("unknown key"),
        }
    }

    /// `(kind, name)` of a key under the prefix, e.g. `("cameras/", "cam-1")`.
    fn split_key<'k>(&self, key: &'k [u8]) -> Option<(&'static str, &'k str)> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        ["cameras/", "relays/", "ports/"]
            .into_iter()
            .find_map(|kind| key.strip_prefix(kind).map(|name| (kind, name)))
            .or(Some(("", key)))
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}{name}", self.prefix)
    }

    /// Forgets a camera another relay holds now (`holder`) and tells the registry.
    fn give_up(&self, presence: &Presence, holder: &Presence) {
        let mut claims = lock(&self.claims);
        if claims
            .get(&presence.agent_id)
            .is_some_and(|c| c.epoch == presence.epoch)
        {
            claims.remove(&presence.agent_id);
            let _ = self.taken.send(Taken {
                agent_id: presence.agent_id.clone(),
                epoch: presence.epoch,
                by: holder.relay.clone(),
                remote: holder.remote.clone(),
            });
        }
    }

    fn kept_alive(&self) {
        let mut health = lock(&self.health);
        health.last_keepalive = Some(Instant::now());
        if !health.reachable {
            let out = health.changed.elapsed();
            health.reachable = true;
            health.changed = Instant::now();
            health.problem = None;
            tracing::info!(
                "the cluster store (etcd at {}) is reachable again after {:.1} s",
                self.endpoints,
                out.as_secs_f64()
            );
        }
    }

    /// Notes a failure; logs only a change of state.
    fn unreachable(&self, why: &str) {
        let mut health = lock(&self.health);
        if health.reachable {
            health.reachable = false;
            health.changed = Instant::now();
            tracing::warn!(
                "the cluster store (etcd at {}) is unreachable: {why}; cameras online keep \
                 streaming, new registrations are refused until it answers",
                self.endpoints
            );
        }
        health.problem = Some(why.to_string());
    }

    /// True while this relay holds a live lease and etcd answers.
    fn ready(&self) -> bool {
        self.lease.load(Ordering::Relaxed) != 0 && lock(&self.health).reachable
    }

    /// Refuses a registration while the store is out of reach.
    pub(crate) fn check_ready(&self) -> Result<(), Rejection> {
        if self.ready() {
            Ok(())
        } else {
            Err(self.not_ready())
        }
    }

    fn not_ready(&self) -> Rejection {
        Rejection::RetryLater {
            secs: self.ttl.as_secs().max(1) as u32,
            why: "the relay cannot reach its cluster store (etcd) and cannot take the camera \
                  without it; try again, or another relay"
                .to_string(),
        }
    }

    /// Every remembered port assignment of the cluster, agent → port.
    pub(crate) fn assignments(&self) -> BTreeMap<String, u16> {
        lock(&self.view).ports.clone()
    }

    /// Records `port` as `agent_id`'s, unless another camera has it: then `Ok(Some(that
    /// camera))`.
    pub(crate) async fn remember(
        &self,
        agent_id: &str,
        port: u16,
    ) -> Result<Option<String>, Rejection> {
        let old = lock(&self.view).ports.get(agent_id).copied();
        if old == Some(port) {
            return Ok(None);
        }
        if !self.ready() {
            return Err(self.not_ready());
        }
        let key = self.key("ports/", &port.to_string());
        let free = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
        let txn = Txn::new()
            .when([free])
            .and_then([TxnOp::put(key.clone(), agent_id, None)])
            .or_else([TxnOp::get(key, None)]);
        let answer = self.txn(txn).await.map_err(|e| {
            self.unreachable(&format!("port transaction: {e}"));
            self.not_ready()
        })?;
        if !answer.succeeded() {
            let holder = answer.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            });
            return match holder {
                Some(holder) if holder == agent_id => Ok(None),
                holder => Ok(Some(holder.unwrap_or_default())),
            };
        }
        {
            let mut view = lock(&self.view);
            view.ports.insert(agent_id.to_string(), port);
        }
        if let Some(old) = old {
            // The camera moved to a port it asked for: its old one is free again.
            let old_key = self.key("ports/", &old.to_string());
            let still_ours = Compare::value(old_key.clone(), CompareOp::Equal, agent_id);
            let txn = Txn::new()
                .when([still_ours])
                .and_then([TxnOp::delete(old_key, None)]);
            if let Err(e) = self.txn(txn).await {
                tracing::warn!(
                    agent = agent_id,
                    old,
                    "could not free the old port in etcd: {e}"
                );
            }
        }
        Ok(None)
    }

    /// Claims `presence.agent_id` for this relay; returns the relay that held it before,
    /// if another one did.
    pub(crate) async fn claim(&self, presence: Presence) -> Result<Option<String>, Rejection> {
        let lease = self.lease.load(Ordering::Relaxed);
        if !self.ready() {
            return Err(self.not_ready());
        }
        let key = self.key("cameras/", &presence.agent_id);
        let value = serde_json::to_vec(&presence).map_err(|e| Rejection::Invalid(e.to_string()))?;
        lock(&self.claims).insert(presence.agent_id.clone(), presence.clone());
        let options = PutOptions::new().with_lease(lease).with_prev_key();
        let put = self.request(|mut client| {
            let (key, value, options) = (key.clone(), value.clone(), options.clone());
            async move { client.put(key, value, Some(options)).await }
        });
        let answer = match put.await {
            Ok(answer) => answer,
            Err(e) => {
                lock(&self.claims).remove(&presence.agent_id);
                self.unreachable(&format!("claiming a camera: {e}"));
                return Err(self.not_ready());
            }
        };
        let before = answer
            .prev_key()
            .and_then(|kv| serde_json::from_slice::<Presence>(kv.value()).ok())
            .map(|p| p.relay)
            .filter(|relay| *relay != self.relay_id);
        Ok(before)
    }

    /// Updates a claim this relay still holds (its data link changed).
    pub(crate) async fn update(&self, presence: Presence) {
        let old = {
            let mut claims = lock(&self.claims);
            match claims.get_mut(&presence.agent_id) {
                Some(claim) if claim.epoch == presence.epoch => {
                    std::mem::replace(claim, presence.clone())
                }
                _ => return,
            }
        };
        let (Ok(old), Ok(new)) = (serde_json::to_vec(&old), serde_json::to_vec(&presence)) else {
            return;
        };
        let key = self.key("cameras/", &presence.agent_id);
        let lease = self.lease.load(Ordering::Relaxed);
        let ours = Compare::value(key.clone(), CompareOp::Equal, old);
        let put = TxnOp::put(key, new, Some(PutOptions::new().with_lease(lease)));
        if let Err(e) = self.txn(Txn::new().when([ours]).and_then([put])).await {
            // The next renewal announces the claim as it is now.
            tracing::debug!(agent = %presence.agent_id, "could not update the camera in etcd: {e}");
        }
    }

    /// Ends this relay's claim of a camera whose session (`epoch`) ended, if the claim
    /// is still its own.
    pub(crate) async fn release(&self, agent_id: &str, epoch: u64) {
        let claim = {
            let mut claims = lock(&self.claims);
            match claims.get(agent_id) {
                Some(claim) if claim.epoch == epoch => claims.remove(agent_id),
                _ => None,
            }
        };
        let Some(claim) = claim else { return };
        let Ok(value) = serde_json::to_vec(&claim) else {
            return;
        };
        let key = self.key("cameras/", agent_id);
        if let Err(e) = self.delete_if(key.clone(), value.clone()).await {
            tracing::debug!(
                agent = agent_id,
                "releasing the camera in etcd failed ({e}); retried once etcd answers"
            );
            lock(&self.orphans).push((key, value));
        }
    }

    async fn delete_if(&self, key: String, value: Vec<u8>) -> Result<(), etcd_client::Error> {
        let ours = Compare::value(key.clone(), CompareOp::Equal, value);
        self.txn(Txn::new().when([ours]).and_then([TxnOp::delete(key, None)]))
            .await
            .map(drop)
    }

    async fn release_orphans(&self) {
        let orphans = std::mem::take(&mut *lock(&self.orphans));
        for (key, value) in orphans {
            if self.delete_if(key.clone(), value.clone()).await.is_err() {
                lock(&self.orphans).push((key, value));
            }
        }
    }

    /// Every camera online in the cluster, by agent id.
    pub(crate) fn cameras(&self) -> Vec<Presence> {
        let mut cameras: Vec<Presence> = lock(&self.view).cameras.values().cloned().collect();
        cameras.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        cameras
    }

    /// The camera `agent_id`, if it is online anywhere in the cluster.
    pub(crate) fn camera(&self, agent_id: &str) -> Option<Presence> {
        lock(&self.view).cameras.get(agent_id).cloned()
    }

    /// Follows the view: changes whenever it does.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The relays of the cluster, by id.
    pub(crate) fn relays(&self) -> BTreeMap<String, RelayRecord> {
        lock(&self.view)
            .relays
            .iter()
            .map(|(id, record)| (id.clone(), record.clone()))
            .collect()
    }

    /// This relay's id.
    pub(crate) fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// The store's state, for `/health` and `/metrics`.
    pub(crate) fn health(&self) -> StoreHealth {
        let health = lock(&self.health);
        StoreHealth {
            reachable: health.reachable,
            for_secs: health.changed.elapsed().as_secs_f64(),
            lease_age_secs: health.last_keepalive.map(|at| at.elapsed().as_secs_f64()),
            watch_age_secs: health.last_watch.map(|at| at.elapsed().as_secs_f64()),
            problem: health.problem.clone(),
        }
    }
}
