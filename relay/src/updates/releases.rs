//! The agent releases this relay can hand out: each a binary and its detached
//! signature (`certs sign`), uploaded through `POST /releases` and kept in
//! `<state_dir>/releases/` (in memory without a state directory).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use common::release::{PublicKey, Release};

/// One release: its signature and its bytes.
#[derive(Debug)]
pub(crate) struct Stored {
    /// `<version>-<target>`.
    pub(crate) id: String,
    pub(crate) release: Release,
    pub(crate) binary: Arc<[u8]>,
    pub(crate) uploaded: SystemTime,
}

/// Every release, by id.
#[derive(Debug)]
pub(crate) struct Releases {
    dir: Option<PathBuf>,
    /// If set, uploads must be signed by one of these (the cameras check anyway).
    trusted: Vec<PublicKey>,
    all: Mutex<BTreeMap<String, Arc<Stored>>>,
}

/// Why an upload is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    /// The signature or the binary is not right.
    #[error("{0}")]
    Invalid(String),
    /// Another binary has this id.
    #[error("release {0} exists with another binary; a release is never replaced (sign the new one with another version)")]
    Conflict(String),
    /// It could not be kept.
    #[error("cannot keep the release: {0}")]
    Io(String),
}

impl Releases {
    /// The releases kept in `state_dir` (none without one).
    pub(crate) fn load(state_dir: Option<&Path>, trusted: Vec<PublicKey>) -> anyhow::Result<Self> {
        let dir = state_dir.map(|d| d.join("releases"));
        let mut all = BTreeMap::new();
        if let Some(dir) = &dir {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().and_then(|e| e.to_str()) != Some("sig") {
                        continue;
                    }
                    match load_one(&path) {
                        Ok(stored) => {
                            all.insert(stored.id.clone(), Arc::new(stored));
                        }
                        Err(why) => {
                            tracing::warn!("{}: not a release, skipped: {why}", path.display())
                        }
                    }
                }
            }
        }
        Ok(Releases {
            dir,
            trusted,
            all: Mutex::new(all),
        })
    }

    /// Checks and keeps an upload; the release kept (an identical re-upload is fine).
    pub(crate) fn upload(
        &self,
        release: Release,
        binary: Vec<u8>,
    ) -> Result<Arc<Stored>, UploadError> {
        release
            .check_binary(&binary)
            .map_err(|e| UploadError::Invalid(e.to_string()))?;
        if !self.trusted.is_empty() {
            release
                .verify(&self.trusted)
                .map_err(|e| UploadError::Invalid(format!("{e} (updates.release_keys)")))?;
        }
        let id = release_id(&release).map_err(UploadError::Invalid)?;
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = all.get(&id) {
            return if existing.release == release {
                Ok(existing.clone())
            } else {
                Err(UploadError::Conflict(id))
            };
        }
        if let Some(dir) = &self.dir {
            let io = |e: std::io::Error| UploadError::Io(format!("{}: {e}", dir.display()));
            std::fs::create_dir_all(dir).map_err(io)?;
            let json =
                serde_json::to_vec_pretty(&release).map_err(|e| UploadError::Io(e.to_string()))?;
            // The binary first: a signature on disk always has its binary.
            write_atomically(&dir.join(format!("{id}.bin")), &binary).map_err(io)?;
            write_atomically(&dir.join(format!("{id}.sig")), &json).map_err(io)?;
        }
        let stored = Arc::new(Stored {
            id: id.clone(),
            release,
            binary: binary.into(),
            uploaded: SystemTime::now(),
        });
        all.insert(id, stored.clone());
        Ok(stored)
    }

    /// The release `id`.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Stored>> {
        self.all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every release, by id.
    pub(crate) fn list(&self) -> Vec<Arc<Stored>> {
        self.all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// `<version>-<target>`, checked to be a safe file name.
pub(crate) fn release_id(release: &Release) -> Result<String, String> {
    let id = format!("{}-{}", release.version, release.target);
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+');
    if id.chars().all(fine) && !id.starts_with('.') && id.len() <= 128 {
        Ok(id)
    } else {
        Err(format!(
            "{id:?} is not a usable release name (version and target: letters, digits, . - _ +)"
        ))
    }
}

fn load_one(sig: &Path) -> Result<Stored, String> {
    let release: Release = serde_json::from_slice(&std::fs::read(sig).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let binary = std::fs::read(sig.with_extension("bin")).map_err(|e| e.to_string())?;
    release.check_binary(&binary).map_err(|e| e.to_string())?;
    Ok(Stored {
        id: release_id(&release)?,
        release,
        binary: binary.into(),
        uploaded: std::fs::metadata(sig)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH),
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}
