//! Spreading a cluster's cameras over its relays. A relay holding more than its share
//! (`[cluster] balance`), or draining for maintenance (`POST /relay/drain`), sends a
//! registering camera to the least loaded relay that takes cameras, with a
//! [`Redirect`]; a draining relay also moves the cameras it holds, `drain_rate` a
//! second, each to the relay least loaded at that moment, so no relay gets a herd.
//! Agents that do not follow redirects are told the relay shuts down, and come back
//! by themselves (to another relay if they know one).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::protocol::Redirect;
use serde::Serialize;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{registry::fleet::etcd::EtcdStore, Registry};

/// How often a draining relay moves its next cameras.
const DRAIN_TICK: Duration = Duration::from_secs(1);

/// A relay of the cluster that takes cameras, and how many it holds.
#[derive(Debug, Clone)]
struct Load {
    relay: String,
    url: String,
    cameras: usize,
}

/// This relay's part in spreading the cameras.
#[derive(Debug)]
pub(crate) struct Balance {
    store: Arc<EtcdStore>,
    /// Above this multiple of the average cameras per relay, registering cameras go
    /// elsewhere; `None`: only a draining relay sends cameras away.
    share: Option<f64>,
    /// Cameras moved a second while draining.
    drain_rate: u32,
    /// Stops the drain in progress.
    draining: Mutex<Option<CancellationToken>>,
}

/// A drain, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrainState {
    /// The relay takes no cameras and moves its own away.
    pub(crate) draining: bool,
    /// Cameras it still holds.
    pub(crate) cameras_left: usize,
    /// Cameras it moves a second.
    pub(crate) rate: u32,
}

impl Balance {
    pub(crate) fn new(store: Arc<EtcdStore>, share: Option<f64>, drain_rate: u32) -> Self {
        Balance {
            store,
            share,
            drain_rate,
            draining: Mutex::new(None),
        }
    }

    /// Where camera `agent_id`, registering here, goes instead: another relay when this
    /// one is draining or holds more than its share and a relay with fewer cameras
    /// takes them. `None`: it stays here.
    pub(crate) fn redirect_for(&self, agent_id: &str) -> Option<Redirect> {
        if self.share.is_none() && !self.store.draining() {
            return None;
        }
        let (mine, others) = self.loads(agent_id);
        let target = least_loaded(&others, &HashMap::new())?;
        let me = self.store.relay_id();
        if self.store.draining() {
            return Some(redirect(
                target,
                format!("relay {me} is draining for maintenance"),
            ));
        }
        let share = self.share?;
        // The average counts this camera, and every relay that takes cameras.
        let total = mine + others.iter().map(|l| l.cameras).sum::<usize>() + 1;
        let allowed = (share * total as f64 / (others.len() + 1) as f64).ceil() as usize;
        // Only to a relay with fewer: two relays never send a camera back and forth.
        (mine + 1 > allowed && target.cameras < mine).then(|| {
            redirect(
                target,
                format!(
                    "relay {me} holds {mine} cameras, and one more is above its share ({allowed} of {total} over {} relays, cluster.balance = {share})",
                    others.len() + 1
                ),
            )
        })
    }

    /// The cameras this relay holds and the relays that take cameras (announcing a
    /// control URL and not draining) with theirs, `skip` not counted.
    fn loads(&self, skip: &str) -> (usize, Vec<Load>) {
        let me = self.store.relay_id();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for camera in self.store.cameras() {
            if camera.agent_id != skip {
                *counts.entry(camera.relay).or_default() += 1;
            }
        }
        let others = self
            .store
            .relays()
            .into_iter()
            .filter(|(id, record)| id != me && !record.draining)
            .filter_map(|(relay, record)| {
                Some(Load {
                    cameras: counts.get(&relay).copied().unwrap_or(0),
                    url: record.agent_url?,
                    relay,
                })
            })
            .collect();
        (counts.get(me).copied().unwrap_or(0), others)
    }

    /// Starts draining: announced (other relays send this one no cameras), registering
    /// cameras sent elsewhere, the cameras here moved away `drain_rate` a second.
    pub(crate) async fn drain(
        self: &Arc<Self>,
        registry: Arc<Registry>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<DrainState> {
        self.store.set_draining(true).await?;
        let stop = shutdown.child_token();
        let previous = self
            .draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(stop.clone());
        if let Some(previous) = previous {
            previous.cancel();
        }
        tracing::warn!(
            rate = self.drain_rate,
            "draining: this relay takes no cameras and moves its own to the others"
        );
        tracker.spawn(self.clone().move_cameras(registry.clone(), stop));
        Ok(self.state(&registry))
    }

    /// Stops draining: the relay takes cameras again.
    pub(crate) async fn undrain(&self, registry: &Registry) -> anyhow::Result<DrainState> {
        let stop = self
            .draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stop) = stop {
            stop.cancel();
        }
        self.store.set_draining(false).await?;
        tracing::warn!("no longer draining: this relay takes cameras again");
        Ok(self.state(registry))
    }

    /// The drain, as it stands.
    pub(crate) fn state(&self, registry: &Registry) -> DrainState {
        DrainState {
            draining: self.store.draining(),
            cameras_left: registry.sessions().len(),
            rate: self.drain_rate,
        }
    }

    /// Moves the cameras here to the other relays, `drain_rate` each [`DRAIN_TICK`],
    /// until `stop`.
    async fn move_cameras(self: Arc<Self>, registry: Arc<Registry>, stop: CancellationToken) {
        let me = self.store.relay_id().to_string();
        let mut tick = tokio::time::interval(DRAIN_TICK);
        let mut stuck = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut sessions = registry.sessions();
            if sessions.is_empty() {
                continue;
            }
            sessions.sort_by(|a, b| a.id.cmp(&b.id));
            // What this tick sent where: the view learns of it only as the cameras
            // arrive.
            let mut sent: HashMap<String, usize> = HashMap::new();
            for session in sessions.iter().take(self.drain_rate as usize) {
                let (_, others) = self.loads(&session.id);
                let Some(target) = least_loaded(&others, &sent) else {
                    if !stuck {
                        tracing::warn!(
                            "draining, but no other relay takes cameras: the {} here stay",
                            sessions.len()
                        );
                    }
                    stuck = true;
                    break;
                };
                stuck = false;
                *sent.entry(target.relay.clone()).or_default() += 1;
                session.move_to(redirect(
                    target,
                    format!("relay {me} is draining for maintenance"),
                ));
            }
            let moved: usize = sent.values().sum();
            if moved > 0 {
                tracing::info!(
                    moved,
                    left = sessions.len() - moved,
                    "draining: cameras sent to {:?}",
                    sent
                );
            }
        }
    }
}

/// The relay with the fewest cameras, counting `sent` (on their way there); ties go
/// to the first by id.
fn least_loaded<'a>(loads: &'a [Load], sent: &HashMap<String, usize>) -> Option<&'a Load> {
    loads.iter().min_by_key(|load| {
        (
            load.cameras + sent.get(&load.relay).copied().unwrap_or(0),
            load.relay.as_str(),
        )
    })
}

fn redirect(to: &Load, reason: String) -> Redirect {
    Redirect {
        relay: to.relay.clone(),
        url: to.url.clone(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(relay: &str, cameras: usize) -> Load {
        Load {
            relay: relay.into(),
            url: format!("ws://{relay}/tunnel"),
            cameras,
        }
    }

    #[test]
    fn the_least_loaded_relay_counts_what_was_sent_this_tick() {
        let loads = [load("b", 3), load("c", 1), load("d", 1)];
        let mut sent = HashMap::new();
        let mut order = Vec::new();
        for _ in 0..4 {
            let target = least_loaded(&loads, &sent).unwrap();
            order.push(target.relay.clone());
            *sent.entry(target.relay.clone()).or_default() += 1;
        }
        // Not four to one relay: the moves spread as the counts even out.
        assert_eq!(order, ["c", "d", "c", "d"]);
        assert!(least_loaded(&[], &sent).is_none());
    }
}
