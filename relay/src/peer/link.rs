//! The relay-to-relay links of a cluster. A Watcher that connects to one relay for a
//! camera another relay holds rides a stream of a QUIC connection between the two: one
//! connection per pair of relays, opened by whichever needs it first and then used both
//! ways, mutual TLS with certificates the cluster's CA issued (`certs peer`), and only
//! relays the cluster's store announces are served.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use common::{
    protocol::check_agent_id,
    tls::{self, Identity},
};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    config::{Limits, PeerConfig},
    forward,
    registry::fleet::etcd::EtcdStore,
    Registry,
};

/// Longest a dial of another relay may take, handshake included.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// QUIC application error codes of a closed relay-to-relay connection.
const CLOSE_SHUTDOWN: u32 = 0;
const CLOSE_NOT_A_RELAY: u32 = 1;

/// This relay's end of the relay-to-relay links.
#[derive(Debug)]
pub(crate) struct PeerLinks {
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    /// The cluster's store: who the relays are, and where.
    store: Arc<EtcdStore>,
    /// Where the streams other relays open go.
    registry: Arc<Registry>,
    limits: Limits,
    tracker: TaskTracker,
    /// The live connection to each relay, by id, whichever side opened it. A slot's
    /// lock is held while dialing, so concurrent Watchers for one relay dial once.
    links: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
}

/// Why a Watcher could not be carried to the relay holding its camera.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("relay {0:?} announces no relay-to-relay address (no [cluster] peer_listen there)")]
    NoAddress(String),
    #[error("cannot reach relay {relay:?} at {address}: {why}")]
    Unreachable {
        relay: String,
        address: String,
        why: String,
    },
}

impl PeerLinks {
    /// Binds the endpoint of `config`, serving and dialing with the cluster's CA; the
    /// streams other relays open are Watchers for `registry`'s cameras.
    pub(crate) fn bind(
        config: &PeerConfig,
        store: Arc<EtcdStore>,
        registry: Arc<Registry>,
        limits: Limits,
        tracker: TaskTracker,
    ) -> anyhow::Result<Self> {
        let (cert, key) = &config.identity;
        let identity = Identity::from_pem_files(cert, key).context("cluster.peer_cert")?;
        let ca = tls::load_roots(&config.ca).context("cluster.peer_ca")?;
        let named = identity
            .chain
            .first()
            .and_then(|der| tls::peer_relay_id(der));
        if named.as_deref() != Some(store.relay_id()) {
            anyhow::bail!(
                "cluster.peer_cert {} names relay {:?}, but this relay is {:?}; issue one with \
                 `certs peer --id {}`",
                cert.display(),
                named.unwrap_or_default(),
                store.relay_id(),
                store.relay_id()
            );
        }
        let (server, client) = tls::peer_quic_configs(&identity, &ca)?;
        let endpoint = Endpoint::server(server, config.listen).with_context(|| {
            format!(
                "cannot listen on {} (UDP, relay-to-relay link, cluster.peer_listen)",
                config.listen
            )
        })?;
        Ok(PeerLinks {
            endpoint,
            client,
            store,
            registry,
            limits,
            tracker,
            links: Mutex::new(HashMap::new()),
        })
    }

    /// The endpoint's UDP address.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// A stream to relay `relay`, on the live connection to it or on a new one.
    pub(crate) async fn open(
        self: &Arc<Self>,
        relay: &str,
    ) -> Result<(SendStream, RecvStream), PeerError> {
        let slot = self.slot(relay);
        let mut live = slot.lock().await;
        if let Some(conn) = live.as_ref().filter(|c| c.close_reason().is_none()) {
            let conn = conn.clone();
            drop(live);
            if let Ok(stream) = conn.open_bi().await {
                return Ok(stream);
            }
            live = slot.lock().await;
        }
        let conn = self.dial(relay).await?;
        *live = Some(conn.clone());
        drop(live);
        conn.open_bi().await.map_err(|e| PeerError::Unreachable {
            relay: relay.to_string(),
            address: conn.remote_address().to_string(),
            why: e.to_string(),
        })
    }

    fn slot(&self, relay: &str) -> Arc<tokio::sync::Mutex<Option<Connection>>> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(relay.to_string())
            .or_default()
            .clone()
    }

    /// Dials `relay` at the address it announces; the connection serves the streams
    /// it opens towards this relay too.
    async fn dial(self: &Arc<Self>, relay: &str) -> Result<Connection, PeerError> {
        let address = self
            .store
            .relays()
            .get(relay)
            .and_then(|record| record.peer.clone())
            .ok_or_else(|| PeerError::NoAddress(relay.to_string()))?;
        let unreachable = |why: String| PeerError::Unreachable {
            relay: relay.to_string(),
            address: address.clone(),
            why,
        };
        let attempt = async {
            let addr = tokio::net::lookup_host(&address)
                .await
                .map_err(|e| e.to_string())?
                .next()
                .ok_or("the name has no address")?;
            // The relay id is the name its certificate must carry.
            let conn = self
                .endpoint
                .connect_with(self.client.clone(), addr, relay)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(conn)
        };
        let conn = tokio::time::timeout(DIAL_TIMEOUT, attempt)
            .await
            .map_err(|_| unreachable(format!("no handshake within {DIAL_TIMEOUT:?}")))?
            .map_err(unreachable)?;
        tracing::info!(relay, %address, "relay-to-relay link up");
        let links = self.clone();
        let (serving, relay) = (conn.clone(), relay.to_string());
        self.tracker
            .spawn(async move { links.streams(serving, relay).await });
        Ok(conn)
    }

    /// Accepts relay-to-relay connections until `shutdown`, and serves the streams of
    /// every connection, dialled or accepted: each is a Watcher for a camera this relay
    /// holds.
    pub(crate) async fn serve(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let links = self.clone();
            let remote = incoming.remote_address();
            self.tracker.spawn(async move {
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        return tracing::warn!(
                            %remote,
                            "relay-to-relay handshake failed: {e} (only relays with a \
                             certificate of the cluster's CA, cluster.peer_ca, get in)"
                        )
                    }
                };
                let Some(relay) = links.admit(&conn) else {
                    return;
                };
                links.keep(&relay, &conn).await;
                links.streams(conn, relay).await;
            });
        }
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"relay shutting down");
    }

    /// The relay id an accepted connection proves, if the store knows that relay;
    /// otherwise the connection is closed, saying why.
    fn admit(&self, conn: &Connection) -> Option<String> {
        let remote = conn.remote_address();
        let named = conn
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| chain.first().and_then(|der| tls::peer_relay_id(der)));
        let refusal = match &named {
            None => Some("its certificate names no relay id (issue one with `certs peer`)"),
            Some(id) if check_agent_id(id).is_err() => Some("its relay id is not valid"),
            Some(id) if id == self.store.relay_id() => Some("it claims this relay's own id"),
            Some(id) if !self.store.relays().contains_key(id) => {
                Some("the cluster's store announces no relay of that id")
            }
            Some(_) => None,
        };
        match (refusal, named) {
            (None, Some(id)) => Some(id),
            (why, named) => {
                let why = why.unwrap_or("unknown");
                tracing::warn!(
                    %remote,
                    relay = named.as_deref().unwrap_or("?"),
                    "relay-to-relay connection refused: {why}"
                );
                conn.close(CLOSE_NOT_A_RELAY.into(), why.as_bytes());
                None
            }
        }
    }

    /// Makes an accepted connection the one this relay uses to reach `relay` too,
    /// unless one is already live.
    async fn keep(&self, relay: &str, conn: &Connection) {
        let slot = self.slot(relay);
        let mut live = slot.lock().await;
        if live.as_ref().is_none_or(|c| c.close_reason().is_some()) {
            *live = Some(conn.clone());
        }
    }

    /// Serves the streams `relay` opens on `conn` until it closes.
    async fn streams(&self, conn: Connection, relay: String) {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (registry, limits, relay) =
                (self.registry.clone(), self.limits.clone(), relay.clone());
            let connection_id = registry.next_connection_id();
            let span = tracing::info_span!(
                "watcher",
                via = %relay,
                conn = connection_id,
                camera = tracing::field::Empty
            );
            self.tracker.spawn(
                forward::carry_from_peer(send, recv, relay, connection_id, registry, limits)
                    .instrument(span),
            );
        }
        tracing::debug!(relay, "relay-to-relay link closed");
    }
}
