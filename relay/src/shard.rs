//! Data-plane shards: a camera's work stays on one thread.
//!
//! A shard is one thread with its own current-thread runtime and its own QUIC endpoint
//! (one UDP socket, one port). A camera is given a shard at registration (the one
//! carrying the fewest cameras), told that shard's port in `Registered::quic_port`, and
//! its QUIC connection, its Watcher listener and every Watcher session run there. With
//! the relay's multi-thread runtime one session's endpoint driver, connection driver and
//! stream task ran on different workers and paid for every hand-off between them (about
//! a third of the relay's CPU per byte, docs/benchmarks.md); a shard pays none, and
//! several shards use several cores for different cameras. The control link, the API and
//! the TCP fallback stay on the main runtime.
//!
//! Shard `i` listens on the QUIC port plus `i` (all on ephemeral ports when the QUIC
//! port is 0). Each keeps an unconnected socket, so a camera whose NAT rebinds is still
//! followed by its shard's endpoint.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use anyhow::Context as _;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// One data-plane thread.
#[derive(Debug)]
pub(crate) struct Shard {
    /// Its position, for logs.
    pub(crate) index: usize,
    /// Its runtime, where its cameras' tasks are spawned.
    pub(crate) handle: Handle,
    /// Its QUIC endpoint.
    pub(crate) endpoint: quinn::Endpoint,
    /// The UDP port agents on this shard dial.
    pub(crate) port: u16,
    /// Cameras placed here now, for placing the next one.
    cameras: AtomicUsize,
}

/// A camera's place on a shard; the shard counts it until this is dropped.
#[derive(Debug)]
pub(crate) struct Seat(Arc<Shard>);

impl Seat {
    /// The shard.
    pub(crate) fn shard(&self) -> &Arc<Shard> {
        &self.0
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.cameras.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every shard of the relay.
#[derive(Debug)]
pub(crate) struct Shards {
    shards: Vec<Arc<Shard>>,
    /// Ends every shard's thread (its runtime, and what still runs on it).
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shards {
    /// Starts `count` shards, shard `i` with a QUIC endpoint on `quic_listen`'s port
    /// plus `i`.
    pub(crate) fn start(
        count: usize,
        quic_listen: SocketAddr,
        server_config: quinn::ServerConfig,
    ) -> anyhow::Result<Shards> {
        anyhow::ensure!(count > 0, "data_shards must be at least 1");
        let stop = CancellationToken::new();
        let mut shards = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let addr = match quic_listen.port() {
                0 => quic_listen,
                base => {
                    let port = u16::try_from(usize::from(base) + index)
                        .ok()
                        .context("data_shards: the shards' QUIC ports run past 65535")?;
                    SocketAddr::new(quic_listen.ip(), port)
                }
            };
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (config, stop) = (server_config.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("relay-data-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                            return;
                        }
                    };
                    let endpoint = {
                        // quinn spawns its endpoint driver on the runtime it is made in.
                        let _in_runtime = runtime.enter();
                        quinn::Endpoint::server(config, addr)
                            .with_context(|| format!("cannot listen on {addr} (UDP, QUIC)"))
                    };
                    let ready = endpoint.map(|endpoint| (runtime.handle().clone(), endpoint));
                    let started = ready.is_ok();
                    let _ = ready_tx.send(ready);
                    if started {
                        runtime.block_on(stop.cancelled());
                    }
                })
                .context("cannot start a data-plane thread")?;
            threads.push(thread);
            let (handle, endpoint) = ready_rx
                .recv()
                .context("a data-plane thread ended at start")??;
            let port = endpoint.local_addr()?.port();
            shards.push(Arc::new(Shard {
                index,
                handle,
                endpoint,
                port,
                cameras: AtomicUsize::new(0),
            }));
        }
        Ok(Shards {
            shards,
            stop,
            threads: Mutex::new(threads),
        })
    }

    /// Every shard.
    pub(crate) fn all(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    /// The first shard's QUIC address (the configured port).
    pub(crate) fn first_addr(&self) -> Option<SocketAddr> {
        self.shards.first()?.endpoint.local_addr().ok()
    }

    /// A seat for one more camera on the shard carrying the fewest.
    pub(crate) fn seat(&self) -> Seat {
        // `start` refuses to make no shard, so there is a least loaded one.
        let shard = self
            .shards
            .iter()
            .min_by_key(|s| s.cameras.load(Ordering::Relaxed))
            .cloned()
            .unwrap_or_else(|| self.shards[0].clone());
        shard.cameras.fetch_add(1, Ordering::Relaxed);
        Seat(shard)
    }

    /// Closes every endpoint, waits (at most `grace`) for its connections to say
    /// goodbye, then ends the shards' threads.
    pub(crate) async fn shutdown(&self, grace: std::time::Duration) {
        for shard in &self.shards {
            shard
                .endpoint
                .close(quinn::VarInt::from_u32(0), b"relay shutting down");
        }
        let idle =
            futures_util::future::join_all(self.shards.iter().map(|s| s.endpoint.wait_idle()));
        let _ = tokio::time::timeout(grace, idle).await;
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        // A relay dropped without `shutdown` (a test's) still ends its threads.
        self.stop.cancel();
    }
}
