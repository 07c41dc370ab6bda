//! Listeners on the ports of cameras other relays of the cluster hold
//! (`[cluster] remote_camera_ports`): a Watcher that dials a camera's own port on any
//! relay reaches it. The registry keeps them in line with the cluster's view, under its
//! registration lock, so a camera that registers here finds its port free.

use std::collections::HashMap;

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{fleet::Presence, lock, Registry};

/// The listeners open on other relays' cameras' ports, by port.
#[derive(Debug, Default)]
pub(crate) struct RemotePorts {
    open: std::sync::Mutex<HashMap<u16, Open>>,
}

/// One such listener.
#[derive(Debug)]
struct Open {
    agent: String,
    relay: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Open {
    async fn close(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl RemotePorts {
    /// Closes the listener on `port`, if there is one, and waits until it is free.
    pub(crate) async fn close(&self, port: u16) {
        let open = lock(&self.open).remove(&port);
        if let Some(open) = open {
            open.close().await;
        }
    }
}

impl Registry {
    /// Brings the listeners on other relays' cameras' ports in line with the cluster's
    /// view: one on the port of every camera another relay holds, started by `serve`
    /// (given the listener, the camera, and the token that stops it); none once the
    /// camera is offline or here. Ports in use by something else are left for the next
    /// call.
    pub(crate) async fn follow_remote_ports<F>(&self, serve: F)
    where
        F: Fn(TcpListener, &Presence, CancellationToken) -> JoinHandle<()>,
    {
        let Some(store) = self.store.cluster() else {
            return;
        };
        // A registration binds under this lock, after closing any listener here on its
        // port: none can be opened in between.
        let ports = self.ports.lock().await;
        let me = store.relay_id();
        let wanted: HashMap<u16, Presence> = store
            .cameras()
            .into_iter()
            .filter(|p| p.relay != me && p.port != 0 && self.get(&p.agent_id).is_none())
            .map(|p| (p.port, p))
            .collect();
        let stale: Vec<Open> = {
            let mut open = lock(&self.remote_ports.open);
            let ports: Vec<u16> = open
                .iter()
                .filter(|(port, o)| {
                    wanted
                        .get(port)
                        .is_none_or(|p| p.agent_id != o.agent || p.relay != o.relay)
                })
                .map(|(port, _)| *port)
                .collect();
            ports.iter().filter_map(|port| open.remove(port)).collect()
        };
        for open in stale {
            open.close().await;
        }
        for (port, presence) in wanted {
            if lock(&self.remote_ports.open).contains_key(&port) {
                continue;
            }
            match ports.bind(port).await {
                Ok(listener) => {
                    let stop = CancellationToken::new();
                    let task = serve(listener, &presence, stop.clone());
                    let open = Open {
                        agent: presence.agent_id,
                        relay: presence.relay,
                        stop,
                        task,
                    };
                    lock(&self.remote_ports.open).insert(port, open);
                }
                Err(e) => tracing::debug!(
                    port,
                    camera = %presence.agent_id,
                    "the port of a camera on relay {} is not free here yet: {e}",
                    presence.relay
                ),
            }
        }
    }

    /// Closes every listener on other relays' cameras' ports.
    pub(crate) async fn close_remote_ports(&self) {
        let all: Vec<Open> = lock(&self.remote_ports.open)
            .drain()
            .map(|(_, open)| open)
            .collect();
        for open in all {
            open.close().await;
        }
    }
}
