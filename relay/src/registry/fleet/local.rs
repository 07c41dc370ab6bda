//! One relay's own memory of port assignments: in the process, and in
//! `<state_dir>/ports.json` when there is a state directory, so a restarted relay gives
//! every camera its old port back.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::registry::lock;

/// Name of the state file in the state directory.
pub(crate) const STATE_FILE: &str = "ports.json";

/// Port assignments of one relay.
#[derive(Debug)]
pub(crate) struct LocalStore {
    remembered: Mutex<BTreeMap<String, u16>>,
    state_file: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    ports: BTreeMap<String, u16>,
}

impl LocalStore {
    /// Reads the assignments remembered in `state_dir`, if given.
    pub(crate) fn load(state_dir: Option<&Path>) -> anyhow::Result<Self> {
        let state_file = state_dir.map(|dir| dir.join(STATE_FILE));
        let remembered = match &state_file {
            Some(path) => read_state(path)?,
            None => BTreeMap::new(),
        };
        Ok(LocalStore {
            remembered: Mutex::new(remembered),
            state_file,
        })
    }

    /// Every remembered assignment, agent → port.
    pub(crate) fn assignments(&self) -> BTreeMap<String, u16> {
        lock(&self.remembered).clone()
    }

    /// Records that `agent_id` has `port`, on disk if there is a state directory.
    pub(crate) fn remember(&self, agent_id: &str, port: u16) -> io::Result<()> {
        let mut remembered = lock(&self.remembered);
        if remembered.get(agent_id) == Some(&port) {
            return Ok(());
        }
        remembered.insert(agent_id.to_string(), port);
        match &self.state_file {
            Some(path) => write_state(path, &remembered),
            None => Ok(()),
        }
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
