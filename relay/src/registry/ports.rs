//! Which relay port each camera gets, and remembering it across restarts so the URL a
//! VMS was configured with keeps working.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use common::protocol::Rejection;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::config::RelayConfig;

const STATE_FILE: &str = "ports.json";

/// The port policy: pinned ports from the config, remembered assignments, the range.
#[derive(Debug)]
pub struct PortPolicy {
    bind: IpAddr,
    range: RangeInclusive<u16>,
    pinned: HashMap<String, u16>,
    remembered: BTreeMap<String, u16>,
    state_file: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    ports: BTreeMap<String, u16>,
}

impl PortPolicy {
    /// Builds the policy, reading remembered assignments from the state directory.
    pub fn load(config: &RelayConfig) -> anyhow::Result<Self> {
        let pinned = config
            .auth
            .agents
            .iter()
            .filter_map(|(id, a)| a.port.map(|p| (id.clone(), p)))
            .collect();
        let state_file = config.state_dir.as_ref().map(|d| d.join(STATE_FILE));
        let remembered = match &state_file {
            Some(path) => read_state(path)?,
            None => BTreeMap::new(),
        };
        Ok(PortPolicy {
            bind: config.camera_bind,
            range: config.camera_ports.clone(),
            pinned,
            remembered,
            state_file,
        })
    }

    /// The port for `agent_id`, which asked for `requested` (0: any).
    pub fn choose(&self, agent_id: &str, requested: u16) -> Result<u16, Rejection> {
        if let Some(&port) = self.pinned.get(agent_id) {
            return Ok(port);
        }
        if requested == 0 {
            if let Some(&port) = self.remembered.get(agent_id) {
                if self.range.contains(&port) {
                    return Ok(port);
                }
            }
            return self
                .range
                .clone()
                .find(|p| self.holder(*p, agent_id).is_none())
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
        match self.holder(requested, agent_id) {
            Some(other) => Err(Rejection::PortTaken {
                port: requested,
                holder: format!("assigned to camera {other:?}"),
            }),
            None => Ok(requested),
        }
    }

    /// Which other agent holds `port`, pinned or remembered.
    fn holder(&self, port: u16, agent_id: &str) -> Option<&str> {
        self.pinned
            .iter()
            .chain(self.remembered.iter())
            .find(|(id, p)| **p == port && id.as_str() != agent_id)
            .map(|(id, _)| id.as_str())
    }

    /// The port assigned to `agent_id`, pinned or remembered.
    pub fn assigned(&self, agent_id: &str) -> Option<u16> {
        self.pinned
            .get(agent_id)
            .or_else(|| self.remembered.get(agent_id))
            .copied()
    }

    /// Every agent that has a port assigned, pinned or remembered.
    pub fn assigned_ids(&self) -> impl Iterator<Item = &str> {
        self.pinned
            .keys()
            .chain(self.remembered.keys())
            .map(String::as_str)
    }

    /// Records that `agent_id` has `port`, on disk if there is a state directory.
    pub fn remember(&mut self, agent_id: &str, port: u16) -> io::Result<()> {
        if self.pinned.contains_key(agent_id) || self.remembered.get(agent_id) == Some(&port) {
            return Ok(());
        }
        self.remembered.insert(agent_id.to_string(), port);
        match &self.state_file {
            Some(path) => write_state(path, &self.remembered),
            None => Ok(()),
        }
    }

    /// For a camera that asked for any port: binds the first port of the range from
    /// `from` on that no other camera holds and no other program uses.
    pub async fn bind_any_from(
        &self,
        agent_id: &str,
        from: u16,
    ) -> Result<(u16, TcpListener), Rejection> {
        for port in from..=*self.range.end() {
            if self.holder(port, agent_id).is_some() {
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
    pub async fn bind(&self, port: u16) -> Result<TcpListener, Rejection> {
        TcpListener::bind(SocketAddr::new(self.bind, port))
            .await
            .map_err(|e| Rejection::PortTaken {
                port,
                holder: format!("cannot listen on {}:{port}: {e}", self.bind),
            })
    }
}

fn read_state(path: &Path) -> anyhow::Result<BTreeMap<String, u16>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => anyhow::bail!("{}: cannot read the port state: {e}", path.display()),
    };
    let state: StateFile = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: the port state is damaged ({e}); fix or delete it (cameras then get new ports)",
            path.display()
        )
    })?;
    Ok(state.ports)
}

/// Writes the state atomically: a crash leaves the old file or the new one, never half.
fn write_state(path: &Path, ports: &BTreeMap<String, u16>) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let state = StateFile {
        version: 1,
        ports: ports.clone(),
    };
    let text = serde_json::to_string_pretty(&state).map_err(io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayConfig;

    fn config(state_dir: Option<&Path>) -> RelayConfig {
        let mut text = String::from(
            "camera_ports = \"9000-9002\"\nshared_token = \"t\"\n[[agents]]\nid = \"pinned\"\ntoken = \"t\"\nport = 9002\n",
        );
        if let Some(dir) = state_dir {
            text = format!("state_dir = {:?}\n{text}", dir.display().to_string());
        }
        RelayConfig::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn pinned_requested_and_allocated_ports() {
        let mut p = PortPolicy::load(&config(None)).unwrap();
        assert_eq!(p.choose("pinned", 9000), Ok(9002));
        assert_eq!(p.choose("a", 9000), Ok(9000));
        p.remember("a", 9000).unwrap();
        assert!(matches!(
            p.choose("b", 9000),
            Err(Rejection::PortTaken { port: 9000, .. })
        ));
        assert!(matches!(
            p.choose("b", 9002),
            Err(Rejection::PortTaken { .. })
        ));
        assert!(matches!(
            p.choose("b", 80),
            Err(Rejection::PortNotAllowed { .. })
        ));
        assert_eq!(p.choose("b", 0), Ok(9001));
        p.remember("b", 9001).unwrap();
        assert_eq!(p.choose("b", 0), Ok(9001), "remembered");
        assert!(matches!(
            p.choose("c", 0),
            Err(Rejection::NoFreePort { .. })
        ));
    }

    #[test]
    fn assignments_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = PortPolicy::load(&config(Some(dir.path()))).unwrap();
        let port = p.choose("cam", 0).unwrap();
        p.remember("cam", port).unwrap();
        let p = PortPolicy::load(&config(Some(dir.path()))).unwrap();
        assert_eq!(p.choose("cam", 0), Ok(port));
        assert!(matches!(
            p.choose("other", port),
            Err(Rejection::PortTaken { .. })
        ));

        std::fs::write(dir.path().join(STATE_FILE), "{ not json").unwrap();
        let e = PortPolicy::load(&config(Some(dir.path())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ports.json") && e.contains("damaged"), "{e}");
    }
}
