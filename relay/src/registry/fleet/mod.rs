//! The fleet store: what the relays of a cluster must agree on (which port is whose,
//! which relay holds which camera), behind one small interface with two stores: this
//! relay alone ([`local`]: in memory, and the state file) or a cluster ([`etcd`]).

pub(crate) mod etcd;
pub(crate) mod local;

use std::{collections::BTreeMap, sync::Arc};

use common::protocol::Rejection;
use serde::{Deserialize, Serialize};

use self::{etcd::EtcdStore, local::LocalStore};

/// A camera online on a relay of the cluster (`cameras/<agent-id>` in etcd).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// The camera's agent id.
    pub agent_id: String,
    /// The relay holding it.
    pub relay: String,
    /// Its session there: a new registration is a new epoch.
    pub epoch: u64,
    /// Its port.
    pub port: u16,
    /// The link carrying its streams: `quic`, `tcp`, or none yet.
    pub link: Option<String>,
    /// When it registered, Unix seconds.
    pub since: u64,
    /// Where its control connection comes from.
    pub remote: String,
    /// Its agent's software version.
    pub agent_version: String,
}

/// The store's state, for `/health` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreHealth {
    /// Whether etcd answers.
    pub reachable: bool,
    /// Seconds in that state.
    pub for_secs: f64,
    /// Seconds since the lease was last renewed.
    pub lease_age_secs: Option<f64>,
    /// Seconds since the watch last answered.
    pub watch_age_secs: Option<f64>,
    /// The last failure, while unreachable.
    pub problem: Option<String>,
}

/// Where the fleet's shared facts live.
#[derive(Debug)]
pub(crate) enum Store {
    /// This relay alone.
    Local(LocalStore),
    /// A cluster of relays sharing etcd.
    Etcd(Arc<EtcdStore>),
}

impl Store {
    /// Every remembered port assignment, agent → port.
    pub(crate) fn assignments(&self) -> BTreeMap<String, u16> {
        match self {
            Store::Local(store) => store.assignments(),
            Store::Etcd(store) => store.assignments(),
        }
    }

    /// Records that `agent_id` has `port`. `Ok(Some(holder))` if another camera took
    /// it first (only in a cluster, where another relay may have just handed it out).
    pub(crate) async fn remember(
        &self,
        agent_id: &str,
        port: u16,
    ) -> Result<Option<String>, Rejection> {
        match self {
            Store::Local(store) => {
                if let Err(e) = store.remember(agent_id, port) {
                    // The camera works; only a restart would lose its port.
                    tracing::warn!(
                        agent = agent_id,
                        port,
                        "could not save the port assignment: {e}"
                    );
                }
                Ok(None)
            }
            Store::Etcd(store) => store.remember(agent_id, port).await,
        }
    }

    /// Claims the camera for this relay; the relay that held it before, if another.
    pub(crate) async fn claim(&self, presence: Presence) -> Result<Option<String>, Rejection> {
        match self {
            Store::Local(_) => Ok(None),
            Store::Etcd(store) => store.claim(presence).await,
        }
    }

    /// The session `epoch` of `agent_id` ended on this relay.
    pub(crate) async fn release(&self, agent_id: &str, epoch: u64) {
        if let Store::Etcd(store) = self {
            store.release(agent_id, epoch).await;
        }
    }

    /// The cluster, if there is one.
    pub(crate) fn cluster(&self) -> Option<&Arc<EtcdStore>> {
        match self {
            Store::Local(_) => None,
            Store::Etcd(store) => Some(store),
        }
    }
}
