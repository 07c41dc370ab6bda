//! The other tunnels, installed with `cargo install` into a cache shared by every clone
//! (`~/.cache/camera-relay-bench/tools`, or `$BENCH_TOOLS`), once. A peer that fails to
//! install is reported, and the run goes on without it.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::bail;

/// A peer and how it is installed.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Its binary.
    pub binary: &'static str,
    /// The crate.
    pub krate: &'static str,
    /// Extra `cargo install` arguments.
    pub args: &'static [&'static str],
}

/// The peers compared with ours. rathole's lock file does not build with current
/// crates, so it is installed without `--locked` (as its README suggests).
pub const PEERS: [Peer; 3] = [
    Peer {
        binary: "rathole",
        krate: "rathole",
        args: &[],
    },
    Peer {
        binary: "bore",
        krate: "bore-cli",
        args: &["--locked"],
    },
    Peer {
        binary: "rusnel",
        krate: "rusnel",
        args: &["--locked"],
    },
];

/// Where the peers' binaries are, and why any is missing.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    dir: PathBuf,
    missing: BTreeMap<&'static str, String>,
}

impl Tools {
    /// The cache directory.
    pub fn dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("BENCH_TOOLS") {
            return dir.into();
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache/camera-relay-bench/tools")
    }

    /// Installs the peers that are not in the cache yet; `offline` only looks.
    pub async fn install(offline: bool) -> Tools {
        let dir = Self::dir();
        let mut tools = Tools {
            dir: dir.clone(),
            missing: BTreeMap::new(),
        };
        for peer in PEERS {
            if dir.join("bin").join(peer.binary).is_file() {
                continue;
            }
            if offline {
                tools
                    .missing
                    .insert(peer.binary, "not installed (run without --offline)".into());
                continue;
            }
            eprintln!(
                "bench: installing {} (cargo install {} {}; cached in {})",
                peer.binary,
                peer.krate,
                peer.args.join(" "),
                dir.display()
            );
            let status = tokio::process::Command::new("cargo")
                .arg("install")
                .arg("--root")
                .arg(&dir)
                .args(peer.args)
                .arg(peer.krate)
                .status()
                .await;
            match status {
                Ok(s) if s.success() => {}
                Ok(s) => {
                    tools.missing.insert(
                        peer.binary,
                        format!("cargo install {} failed ({s})", peer.krate),
                    );
                }
                Err(e) => {
                    tools
                        .missing
                        .insert(peer.binary, format!("cannot run cargo install: {e}"));
                }
            }
        }
        tools
    }

    /// The binary of `name`, or why it is missing.
    pub fn path(&self, name: &str) -> anyhow::Result<PathBuf> {
        if let Some(why) = self.missing.get(name) {
            bail!("{name}: {why}");
        }
        let path = self.dir.join("bin").join(name);
        if !path.is_file() {
            bail!("{name}: not installed in {}", self.dir.display());
        }
        Ok(path)
    }
}
