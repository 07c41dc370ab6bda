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

pub mod config;
mod control;
mod data;
mod forward;
pub mod metrics;
pub mod ports;
pub mod registry;
mod rtsp;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use common::{protocol::hex, tls};
use tokio::net::TcpListener;
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
    quic_port: u16,
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
    endpoint: quinn::Endpoint,
    /// The shared RTSP port (`/<agent-id>/…`), if configured.
    shared_listener: Option<TcpListener>,
    shared: Arc<Shared>,
}

impl Relay {
    /// Binds the control listener and the QUIC endpoint and loads the port state.
    pub async fn bind(config: RelayConfig) -> anyhow::Result<Relay> {
        let identity = match &config.quic_tls {
            Some((cert, key)) => tls::Identity::from_pem_files(cert, key)?,
            None => tls::Identity::self_signed(&["camera-relay"])?,
        };
        let cert_sha256 = identity.leaf_sha256();
        let ports = ports::PortPolicy::load(&config)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (TCP, control link)", config.listen))?;
        let endpoint =
            quinn::Endpoint::server(tls::quic_server_config(&identity)?, config.quic_listen)
                .with_context(|| format!("cannot listen on {} (UDP, QUIC)", config.quic_listen))?;
        let quic_port = endpoint.local_addr()?.port();
        let shared_listener = match config.shared_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} (TCP, shared RTSP port, shared_listen)")
            })?),
            None => None,
        };
        tracing::info!(cert_sha256 = %hex(&cert_sha256), "relay ready: {config}");
        Ok(Relay {
            listener,
            endpoint,
            shared_listener,
            shared: Arc::new(Shared {
                registry: Arc::new(Registry::new(
                    config.auth,
                    ports,
                    Arc::new(metrics::Metrics::new()?),
                )),
                limits: config.limits,
                quic_port,
                cert_sha256,
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
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

    /// Address of the QUIC endpoint (UDP).
    pub fn quic_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Address of the shared RTSP port, if there is one.
    pub fn shared_addr(&self) -> Option<SocketAddr> {
        self.shared_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
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
            endpoint,
            shared_listener,
            shared,
        } = self;
        let root = shared.shutdown.clone();
        shared.tracker.spawn(data::serve(
            endpoint.clone(),
            shared.registry.clone(),
            shared.limits.handshake_timeout,
            root.clone(),
            shared.tracker.clone(),
        ));
        if let Some(listener) = shared_listener {
            shared.tracker.spawn(forward::serve_shared(
                listener,
                shared.registry.clone(),
                shared.limits.clone(),
                shared.tracker.clone(),
                root.clone(),
            ));
        }
        let app = control::router(shared.clone());
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await });
        let served = server.await.context("control listener failed");

        tracing::info!("relay shutting down");
        root.cancel();
        shared.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not end within {SHUTDOWN_GRACE:?}");
        }
        endpoint.close(quinn::VarInt::from_u32(0), b"relay shutting down");
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
        served
    }
}
