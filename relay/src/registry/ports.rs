//! Which relay port each camera gets: pinned in the config, remembered from its earlier
//! registrations (by the fleet store, so the URL a VMS was configured with keeps
//! working), asked for, or the first free one of the range.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
};

use common::protocol::Rejection;
use tokio::net::TcpListener;

use crate::config::RelayConfig;

/// Remembered assignments, agent → port, as the fleet store holds them.
pub(crate) type Remembered = BTreeMap<String, u16>;

/// The port rules: pinned ports from the config, the range, the bind address.
#[derive(Debug)]
pub(crate) struct PortPolicy {
    bind: IpAddr,
    range: RangeInclusive<u16>,
    pinned: HashMap<String, u16>,
}

impl PortPolicy {
    /// The rules of `config`.
    pub(crate) fn new(config: &RelayConfig) -> Self {
        let pinned = config
            .auth
            .agents
            .iter()
            .filter_map(|(id, a)| a.port.map(|p| (id.clone(), p)))
            .collect();
        PortPolicy {
            bind: config.camera_bind,
            range: config.camera_ports.clone(),
            pinned,
        }
    }

    /// The port for `agent_id`, which asked for `requested` (0: any).
    pub(crate) fn choose(
        &self,
        agent_id: &str,
        requested: u16,
        remembered: &Remembered,
    ) -> Result<u16, Rejection> {
        if let Some(&port) = self.pinned.get(agent_id) {
            return Ok(port);
        }
        if requested == 0 {
            if let Some(&port) = remembered.get(agent_id) {
                if self.range.contains(&port) {
                    return Ok(port);
                }
            }
            return self
                .range
                .clone()
                .find(|p| self.holder(*p, agent_id, remembered).is_none())
                .ok_or(Rejection::NoFreePort {
                    first: *self.range.start(),
                    last: *self.range.end(),
                });
        }
        if !self.range.contains(&requested) {
            return Err(Rejection::PortNotAllowed {
                port: requested,
                first: *self.range.start(),
                last: *self.range.end(),
            });
        }
        match self.holder(requested, agent_id, remembered) {
            Some(other) => Err(Rejection::PortTaken {
                port: requested,
                holder: format!("assigned to camera {other:?}"),
            }),
            None => Ok(requested),
        }
    }

    /// Which other agent holds `port`, pinned or remembered.
    fn holder<'a>(
        &'a self,
        port: u16,
        agent_id: &str,
        remembered: &'a Remembered,
    ) -> Option<&'a str> {
        self.pinned
            .iter()
            .chain(remembered.iter())
            .find(|(id, p)| **p == port && id.as_str() != agent_id)
            .map(|(id, _)| id.as_str())
    }

    /// True if the config pins `agent_id`'s port (it is then never remembered).
    pub(crate) fn is_pinned(&self, agent_id: &str) -> bool {
        self.pinned.contains_key(agent_id)
    }

    /// The port assigned to `agent_id`, pinned or remembered.
    pub(crate) fn assigned(&self, agent_id: &str, remembered: &Remembered) -> Option<u16> {
        self.pinned
            .get(agent_id)
            .or_else(|| remembered.get(agent_id))
            .copied()
    }

    /// Every agent the config pins a port for.
    pub(crate) fn pinned_ids(&self) -> impl Iterator<Item = &str> {
        self.pinned.keys().map(String::as_str)
    }

    /// For a camera that asked for any port: binds the first port of the range from
    /// `from` on that no other camera holds and no other program uses.
    pub(crate) async fn bind_any_from(
        &self,
        agent_id: &str,
        from: u16,
        remembered: &Remembered,
    ) -> Result<(u16, TcpListener), Rejection> {
        for port in from..=*self.range.end() {
            if self.holder(port, agent_id, remembered).is_some() {
                continue;
            }
            if let Ok(listener) = self.bind(port).await {
                return Ok((port, listener));
            }
        }
        Err(Rejection::NoFreePort {
            first: *self.range.start(),
            last: *self.range.end(),
        })
    }

    /// Binds the camera listener on `port`.
    pub(crate) async fn bind(&self, port: u16) -> Result<TcpListener, Rejection> {
        TcpListener::bind(SocketAddr::new(self.bind, port))
            .await
            .map_err(|e| Rejection::PortTaken {
                port,
                holder: format!("cannot listen on {}:{port}: {e}", self.bind),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{
        config::RelayConfig,
        registry::fleet::local::{LocalStore, STATE_FILE},
    };

    fn config() -> RelayConfig {
        let text = "camera_ports = \"9000-9002\"\nshared_token = \"t\"\n[[agents]]\nid = \"pinned\"\ntoken = \"t\"\nport = 9002\n";
        RelayConfig::from_toml(text, "test").unwrap()
    }

    #[test]
    fn pinned_requested_and_allocated_ports() {
        let p = PortPolicy::new(&config());
        let mut remembered = Remembered::new();
        assert_eq!(p.choose("pinned", 9000, &remembered), Ok(9002));
        assert_eq!(p.choose("a", 9000, &remembered), Ok(9000));
        remembered.insert("a".into(), 9000);
        assert!(matches!(
            p.choose("b", 9000, &remembered),
            Err(Rejection::PortTaken { port: 9000, .. })
        ));
        assert!(matches!(
            p.choose("b", 9002, &remembered),
            Err(Rejection::PortTaken { .. })
        ));
        assert!(matches!(
            p.choose("b", 80, &remembered),
            Err(Rejection::PortNotAllowed { .. })
        ));
        assert_eq!(p.choose("b", 0, &remembered), Ok(9001));
        remembered.insert("b".into(), 9001);
        assert_eq!(p.choose("b", 0, &remembered), Ok(9001), "remembered");
        assert!(matches!(
            p.choose("c", 0, &remembered),
            Err(Rejection::NoFreePort { .. })
        ));
    }

    #[test]
    fn assignments_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let p = PortPolicy::new(&config());
        let store = LocalStore::load(Some(dir.path())).unwrap();
        let port = p.choose("cam", 0, &store.assignments()).unwrap();
        store.remember("cam", port).unwrap();
        let store = LocalStore::load(Some(dir.path())).unwrap();
        assert_eq!(p.choose("cam", 0, &store.assignments()), Ok(port));
        assert!(matches!(
            p.choose("other", port, &store.assignments()),
            Err(Rejection::PortTaken { .. })
        ));

        std::fs::write(dir.path().join(STATE_FILE), "{ not json").unwrap();
        let e = LocalStore::load(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("ports.json") && e.contains("damaged"), "{e}");
    }
}
