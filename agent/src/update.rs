//! Over-the-air updates on the camera (docs/updates.md).
//!
//! The relay offers a signed release; the agent checks it (a release key it was
//! installed with, its own target, newer unless forced, room on flash), fetches the
//! binary over the control link into `camera-agent.part` beside itself (resuming what
//! an earlier link left), checks its SHA-256 and that it is an executable for this
//! processor, then swaps it in and restarts into it. The new agent is on trial until
//! it is online; if it is not within `update.trial_secs`, or keeps failing to start
//! (the supervisor's `update-check.sh` counts its starts), the previous binary comes
//! back, and the relay hears why.
//!
//! Files in the binary's directory; every change of state is one rename or unlink,
//! so power may fail at any moment:
//! - `camera-agent.part` and `camera-agent.part.sig`: a download and the release it is
//!   of; kept across links and restarts, for resuming.
//! - `camera-agent.old`: the previous binary (a hard link: no room taken until the
//!   swap) while the new one is on trial.
//! - `update.trial`: `id=`, `from=`, `to=` lines: the new binary is on trial.
//! - `update.boots`: starts of the binary on trial, counted by `update-check.sh`.
//! - `update.rolledback`: `id=`, `from=`, `to=`, `why=`: the previous binary is back.

use std::{
    collections::BTreeMap,
    fs, io,
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use common::{
    protocol::{hex, AgentMessage, UpdateOffer, UpdateProgress, UPDATE_CHUNK},
    release::{compare_versions, Release},
};
use tokio::sync::{mpsc, Notify};

use crate::config::UpdatePolicy;

/// Requests for chunks in flight at once.
const WINDOW: u64 = 4;
/// Longest wait for a chunk before the download is left for the next session.
const CHUNK_WAIT: Duration = Duration::from_secs(30);
/// Room kept free on flash besides the new binary.
const FREE_MARGIN: u64 = 256 * 1024;

const PART: &str = "camera-agent.part";
const PART_SIG: &str = "camera-agent.part.sig";
const OLD: &str = "camera-agent.old";
const TRIAL: &str = "update.trial";
const BOOTS: &str = "update.boots";
const ROLLED_BACK: &str = "update.rolledback";

/// Where a download's chunks go: `(offset, bytes)`.
pub(crate) type Chunks = mpsc::Sender<(u64, Vec<u8>)>;

/// What the download task asks of the control loop.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Send this to the relay.
    Send(AgentMessage),
    /// The new binary is in place: end the session and restart into it.
    Restart,
}

/// The new binary on trial, from `update.trial`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trial {
    id: u64,
    from: String,
    to: String,
}

/// The agent's side of updates; one per agent, across its sessions.
#[derive(Debug)]
pub struct Updater {
    policy: UpdatePolicy,
    /// The running binary, replaced by updates; `None` if it cannot be found.
    exe: Option<PathBuf>,
    /// Reports for the next relay that takes them.
    pending: Mutex<Vec<(u64, UpdateProgress)>>,
    reported: Notify,
    trial: Mutex<Option<Trial>>,
}

impl Updater {
    /// The updater of the binary at `exe`, after looking at what an earlier update
    /// left there.
    pub fn new(policy: UpdatePolicy, exe: Option<PathBuf>) -> Updater {
        let updater = Updater {
            policy,
            exe,
            pending: Mutex::new(Vec::new()),
            reported: Notify::new(),
            trial: Mutex::new(None),
        };
        if let Some(dir) = updater.dir() {
            let dir = dir.to_path_buf();
            updater.look_back(&dir);
        }
        updater
    }

    fn dir(&self) -> Option<&Path> {
        self.exe.as_deref().and_then(Path::parent)
    }

    /// Reads what an earlier update left in `dir`.
    fn look_back(&self, dir: &Path) {
        if let Some(fields) = read_fields(&dir.join(ROLLED_BACK)) {
            let id = fields.get("id").and_then(|i| i.parse().ok()).unwrap_or(0);
            let progress = UpdateProgress::RolledBack {
                from: fields.get("from").cloned().unwrap_or_default(),
                to: crate::VERSION.to_string(),
                why: fields.get("why").cloned().unwrap_or_default(),
            };
            tracing::warn!(
                ?progress,
                "an update was rolled back; the previous agent runs again"
            );
            self.report(id, progress);
            remove(&[
                &dir.join(ROLLED_BACK),
                &dir.join(TRIAL),
                &dir.join(BOOTS),
                &dir.join(OLD),
            ]);
            return;
        }
        let Some(trial) = read_fields(&dir.join(TRIAL)).and_then(|f| {
            Some(Trial {
                id: f.get("id")?.parse().ok()?,
                from: f.get("from")?.clone(),
                to: f.get("to")?.clone(),
            })
        }) else {
            // No update under way: an old binary left by power lost after a
            // confirmation is not needed.
            remove(&[&dir.join(OLD), &dir.join(BOOTS)]);
            return;
        };
        if trial.to == crate::VERSION {
            tracing::info!(from = %trial.from, to = %trial.to, "running a new agent on trial: it must come online within {:?} (update.trial_secs)", self.policy.trial);
            *self.trial.lock().unwrap_or_else(|e| e.into_inner()) = Some(trial);
        } else {
            // The swap never happened (power lost during the update), or the binary was
            // put back without a record.
            let why = "the new agent did not take over (the camera may have lost power during the update)";
            tracing::warn!(to = %trial.to, "{why}; version {} runs", crate::VERSION);
            self.report(
                trial.id,
                UpdateProgress::RolledBack {
                    from: trial.to,
                    to: crate::VERSION.to_string(),
                    why: why.into(),
                },
            );
            remove(&[&dir.join(TRIAL), &dir.join(BOOTS), &dir.join(OLD)]);
        }
    }

    /// How long this agent, a new one on trial, has to come online; `None` if it is
    /// not on trial.
    pub fn trial(&self) -> Option<Duration> {
        self.trial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
            .then_some(self.policy.trial)
    }

    /// The agent is online: a new agent on trial is kept.
    pub fn confirm(&self) {
        let Some(trial) = self.trial.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        if let Some(dir) = self.dir() {
            // The marker goes last: until it is gone the update is not done.
            remove(&[&dir.join(OLD), &dir.join(BOOTS), &dir.join(TRIAL)]);
            sync_dir(dir);
        }
        tracing::info!(from = %trial.from, to = %trial.to, "update done: the new agent is online");
        self.report(
            trial.id,
            UpdateProgress::Updated {
                from: trial.from,
                to: trial.to,
            },
        );
    }

    /// The new agent did not come online in time: puts the previous binary back, for
    /// the restart that follows.
    pub fn roll_back(&self, why: &str) -> io::Result<()> {
        let Some(trial) = self.trial.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let (Some(exe), Some(dir)) = (self.exe.as_deref(), self.dir()) else {
            return Err(io::Error::other("the agent's own binary cannot be found"));
        };
        let old = dir.join(OLD);
        if !old.exists() {
            // Power failed while this agent confirmed itself once already.
            return Err(io::Error::other(
                "the previous agent is gone (this one was confirmed once)",
            ));
        }
        fs::rename(&old, exe)?;
        write_fields(
            &dir.join(ROLLED_BACK),
            &[
                ("id", trial.id.to_string()),
                ("from", trial.to.clone()),
                ("to", trial.from.clone()),
                ("why", why.to_string()),
            ],
        )?;
        remove(&[&dir.join(TRIAL), &dir.join(BOOTS)]);
        sync_dir(dir);
        tracing::warn!(from = %trial.to, to = %trial.from, "rolled back: {why}");
        Ok(())
    }

    /// Queues a report for the relay.
    fn report(&self, id: u64, progress: UpdateProgress) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, progress));
        self.reported.notify_one();
    }

    /// The reports waiting, taken.
    pub(crate) fn take_reports(&self) -> Vec<(u64, UpdateProgress)> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves when a report is queued.
    pub(crate) async fn report_queued(&self) {
        self.reported.notified().await;
    }

    /// Checks an offer: `Err` says why the camera will not take it.
    fn check(&self, offer: &UpdateOffer) -> Result<(), String> {
        let release = &offer.release;
        if self.policy.keys.is_empty() {
            return Err(
                "this camera trusts no release key, so it takes no updates: install \
                        release.pub beside its config.json (update.release_keys)"
                    .into(),
            );
        }
        release
            .verify(&self.policy.keys)
            .map_err(|e| e.to_string())?;
        if release.target != crate::TARGET {
            return Err(format!(
                "the release is for {}; this camera runs {}",
                release.target,
                crate::TARGET
            ));
        }
        if !offer.force && compare_versions(&release.version, crate::VERSION).is_le() {
            return Err(format!(
                "{} is not newer than the running {} (an operator may force it)",
                release.version,
                crate::VERSION
            ));
        }
        if self.exe.is_none() {
            return Err("the agent cannot find its own binary to replace".into());
        }
        Ok(())
    }

    /// Starts taking `offer` in the background: chunks arrive through the returned
    /// sender, messages for the relay leave through `out`.
    pub(crate) fn start(&self, offer: UpdateOffer, out: mpsc::Sender<Outgoing>) -> Chunks {
        let (chunks_tx, chunks) = mpsc::channel(WINDOW as usize + 1);
        let checked = self.check(&offer);
        let exe = self.exe.clone();
        tokio::spawn(async move {
            let report = |progress| {
                Outgoing::Send(AgentMessage::UpdateReport {
                    id: offer.id,
                    progress,
                })
            };
            let (Ok(()), Some(exe)) = (checked.clone(), exe) else {
                let why = checked.err().unwrap_or_default();
                tracing::warn!(release = %offer.release.describe(), "update refused: {why}");
                let _ = out.send(report(UpdateProgress::Refused(why))).await;
                return;
            };
            match download(&offer, &exe, chunks, &out).await {
                Ok(Some(failed)) => {
                    tracing::warn!(release = %offer.release.describe(), "update failed: {failed:?}");
                    let _ = out.send(report(failed)).await;
                }
                Ok(None) => {
                    let _ = out.send(report(UpdateProgress::Installing)).await;
                    let _ = out.send(Outgoing::Restart).await;
                }
                Err(e) => {
                    tracing::warn!(release = %offer.release.describe(), "download interrupted: {e}; it resumes at the next offer")
                }
            }
        });
        chunks_tx
    }
}

/// Fetches, checks and installs `offer`'s binary over `exe`. `Ok(None)`: installed,
/// restart; `Ok(Some(report))`: refused or failed, nothing changed; `Err`: cut off,
/// the part is kept for resuming.
async fn download(
    offer: &UpdateOffer,
    exe: &Path,
    mut chunks: mpsc::Receiver<(u64, Vec<u8>)>,
    out: &mpsc::Sender<Outgoing>,
) -> io::Result<Option<UpdateProgress>> {
    let release = &offer.release;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let (part, part_sig) = (dir.join(PART), dir.join(PART_SIG));
    let signature = serde_json::to_string(release).map_err(io::Error::other)?;
    let mut have = match fs::read_to_string(&part_sig) {
        Ok(text) if text == signature => fs::metadata(&part).map_or(0, |m| m.len()),
        _ => 0,
    };
    if have > release.size {
        have = 0;
    }
    let free = free_bytes(dir).unwrap_or(u64::MAX);
    let need = release.size - have + FREE_MARGIN;
    if free < need {
        return Ok(Some(UpdateProgress::Refused(format!(
            "{} needs {} KiB free, and has {} KiB",
            dir.display(),
            need / 1024,
            free / 1024
        ))));
    }
    if have == 0 {
        fs::write(&part, b"")?;
        fs::write(&part_sig, &signature)?;
    } else {
        tracing::info!(
            have,
            size = release.size,
            "resuming the download of {}",
            release.describe()
        );
    }
    let send = |message| out.send(Outgoing::Send(message));
    let closed = || io::Error::other("the control link closed");
    send(AgentMessage::UpdateReport {
        id: offer.id,
        progress: UpdateProgress::Downloading { have },
    })
    .await
    .map_err(|_| closed())?;

    let mut file = fs::OpenOptions::new().append(true).open(&part)?;
    let mut asked = have;
    let mut next_report = have + release.size / 4;
    while have < release.size {
        while asked < release.size && asked - have < WINDOW * u64::from(UPDATE_CHUNK) {
            let len = (release.size - asked).min(u64::from(UPDATE_CHUNK)) as u32;
            send(AgentMessage::UpdateFetch {
                id: offer.id,
                offset: asked,
                len,
            })
            .await
            .map_err(|_| closed())?;
            asked += u64::from(len);
        }
        let (offset, data) = tokio::time::timeout(CHUNK_WAIT, chunks.recv())
            .await
            .map_err(|_| io::Error::other(format!("no data from the relay for {CHUNK_WAIT:?}")))?
            .ok_or_else(closed)?;
        if offset != have || data.is_empty() || have + data.len() as u64 > release.size {
            return Err(io::Error::other(format!(
                "the relay sent {} bytes at {offset}, expected some at {have}",
                data.len()
            )));
        }
        file.write_all(&data)?;
        have += data.len() as u64;
        if have >= next_report && have < release.size {
            next_report = have + release.size / 4;
            let _ = send(AgentMessage::UpdateReport {
                id: offer.id,
                progress: UpdateProgress::Downloading { have },
            })
            .await;
        }
    }
    file.sync_all()?;
    drop(file);

    if let Err(why) = check_download(release, &part) {
        remove(&[&part, &part_sig]);
        return Ok(Some(UpdateProgress::Failed(why)));
    }
    install(offer.id, &release.version, &part, exe)?;
    remove(&[&part_sig]);
    Ok(None)
}

/// Checks the downloaded binary: the bytes signed, an executable for this processor.
fn check_download(release: &Release, part: &Path) -> Result<(), String> {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut file = fs::File::open(part).map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut size = 0u64;
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if head.len() < 20 {
            head.extend_from_slice(&buf[..n.min(20 - head.len())]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let sha256 = hex(hasher.finish().as_ref());
    if size != release.size || sha256 != release.sha256 {
        return Err(format!(
            "the download is not the binary signed ({size} bytes, SHA-256 {sha256}; signed: {} bytes, {})",
            release.size, release.sha256
        ));
    }
    check_elf(&head)
}

/// The ELF header's class and machine, against this agent's own.
fn check_elf(head: &[u8]) -> Result<(), String> {
    let own = match std::env::consts::ARCH {
        "arm" => Some((1u8, 40u16, "32-bit ARM")),
        "aarch64" => Some((2, 183, "AArch64")),
        "x86_64" => Some((2, 62, "x86-64")),
        "x86" => Some((1, 3, "x86")),
        _ => None,
    };
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return Err("the binary is not an ELF executable".into());
    }
    let (class, machine) = (head[4], u16::from_le_bytes([head[18], head[19]]));
    match own {
        Some((own_class, own_machine, name)) if (class, machine) != (own_class, own_machine) => {
            Err(format!(
                "the binary is for another processor (ELF class {class}, machine {machine}); this camera is {name}"
            ))
        }
        _ => Ok(()),
    }
}

/// Swaps the verified `part` in for `exe`, keeping the previous binary as `.old` and
/// marking the new one on trial. At every moment `exe` is a whole binary.
fn install(id: u64, to: &str, part: &Path, exe: &Path) -> io::Result<()> {
    let dir = exe.parent().unwrap_or(Path::new("."));
    let (old, trial) = (dir.join(OLD), dir.join(TRIAL));
    fs::set_permissions(part, fs::Permissions::from_mode(0o755))?;
    write_fields(
        &trial,
        &[
            ("id", id.to_string()),
            ("from", crate::VERSION.to_string()),
            ("to", to.to_string()),
        ],
    )?;
    remove(&[&dir.join(BOOTS), &old]);
    fs::hard_link(exe, &old)?;
    fs::rename(part, exe)?;
    sync_dir(dir);
    tracing::info!("installed the new agent at {}; the previous one is kept as {OLD} until the new one is online", exe.display());
    Ok(())
}

/// Bytes free for this user in the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// `key=value` lines; `None` if the file is missing or unreadable.
fn read_fields(path: &Path) -> Option<BTreeMap<String, String>> {
    let text = fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}

/// Writes `key=value` lines to `path` through a temporary file and a rename.
fn write_fields(path: &Path, fields: &[(&str, String)]) -> io::Result<()> {
    let text: String = fields
        .iter()
        .map(|(k, v)| format!("{k}={}\n", v.replace('\n', " ")))
        .collect();
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

fn remove(paths: &[&Path]) {
    for path in paths {
        let _ = fs::remove_file(path);
    }
}

/// Makes renames and unlinks in `dir` durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use common::release::SigningKey;

    fn policy(keys: Vec<common::release::PublicKey>) -> UpdatePolicy {
        UpdatePolicy {
            keys,
            key_files: Vec::new(),
            trial: Duration::from_secs(5),
        }
    }

    fn elf(machine: u16, class: u8) -> Vec<u8> {
        let mut head = b"\x7fELF".to_vec();
        head.push(class);
        head.extend_from_slice(&[1; 13]);
        head.extend_from_slice(&machine.to_le_bytes());
        head.extend_from_slice(&[0; 100]);
        head
    }

    fn own_elf() -> Vec<u8> {
        match std::env::consts::ARCH {
            "aarch64" => elf(183, 2),
            "arm" => elf(40, 1),
            _ => elf(62, 2),
        }
    }

    fn offer(key: &SigningKey, version: &str, target: &str, binary: &[u8]) -> UpdateOffer {
        UpdateOffer {
            id: 7,
            release: Release::sign(key, target, version, binary),
            force: false,
        }
    }

    #[test]
    fn offers_are_checked_for_key_target_and_version() {
        let key = SigningKey::generate().unwrap();
        let updater = Updater::new(
            policy(vec![key.public()]),
            Some(PathBuf::from("/nonexistent/camera-agent")),
        );
        updater
            .check(&offer(&key, "99.0.0", crate::TARGET, b"x"))
            .unwrap();
        let err = updater
            .check(&offer(&key, "99.0.0", "mips-unknown-linux-musl", b"x"))
            .unwrap_err();
        assert!(
            err.contains("mips-unknown-linux-musl") && err.contains(crate::TARGET),
            "{err}"
        );
        let err = updater
            .check(&offer(&key, "0.0.1", crate::TARGET, b"x"))
            .unwrap_err();
        assert!(err.contains("not newer"), "{err}");
        let mut forced = offer(&key, "0.0.1", crate::TARGET, b"x");
        forced.force = true;
        updater.check(&forced).unwrap();
        let stranger = SigningKey::generate().unwrap();
        let err = updater
            .check(&offer(&stranger, "99.0.0", crate::TARGET, b"x"))
            .unwrap_err();
        assert!(err.contains("does not trust"), "{err}");
        let none = Updater::new(policy(vec![]), None);
        let err = none
            .check(&offer(&key, "99.0.0", crate::TARGET, b"x"))
            .unwrap_err();
        assert!(err.contains("release.pub"), "{err}");
    }

    #[test]
    fn binaries_for_another_processor_are_refused() {
        check_elf(&own_elf()).unwrap();
        let other = if std::env::consts::ARCH == "arm" {
            elf(183, 2)
        } else {
            elf(40, 1)
        };
        assert!(check_elf(&other).unwrap_err().contains("another processor"));
        assert!(check_elf(b"#!/bin/sh\nexit 1\n")
            .unwrap_err()
            .contains("not an ELF"));
    }

    /// Feeds `offer`'s binary to a download over `exe`, as the relay would.
    async fn run_download(
        offer: &UpdateOffer,
        binary: &[u8],
        exe: &Path,
    ) -> io::Result<Option<UpdateProgress>> {
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (chunks_tx, chunks) = mpsc::channel(16);
        let binary = binary.to_vec();
        let relay = tokio::spawn(async move {
            while let Some(Outgoing::Send(message)) = out_rx.recv().await {
                if let AgentMessage::UpdateFetch { offset, len, .. } = message {
                    let end = (offset as usize + len as usize).min(binary.len());
                    let data = binary
                        .get(offset as usize..end)
                        .unwrap_or_default()
                        .to_vec();
                    if chunks_tx.send((offset, data)).await.is_err() {
                        break;
                    }
                }
            }
        });
        let result = download(offer, exe, chunks, &out_tx).await;
        drop(out_tx);
        relay.await.unwrap();
        result
    }

    #[tokio::test]
    async fn a_download_installs_with_the_old_binary_kept_and_a_trial_marked() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("camera-agent");
        fs::write(&exe, b"old binary").unwrap();
        let key = SigningKey::generate().unwrap();
        let mut binary = own_elf();
        binary.resize(200_000, 7);
        let offer = offer(&key, "9.9.9", crate::TARGET, &binary);
        assert_eq!(run_download(&offer, &binary, &exe).await.unwrap(), None);
        assert_eq!(fs::read(&exe).unwrap(), binary);
        assert_eq!(fs::read(dir.path().join(OLD)).unwrap(), b"old binary");
        let trial = read_fields(&dir.path().join(TRIAL)).unwrap();
        assert_eq!(trial["to"], "9.9.9");
        assert_eq!(trial["from"], crate::VERSION);
        assert!(!dir.path().join(PART).exists() && !dir.path().join(PART_SIG).exists());

        // The new agent (this one, pretending) sees the trial; a missed deadline puts
        // the old binary back and leaves word for it.
        let updater = Updater::new(policy(vec![key.public()]), Some(exe.clone()));
        if crate::VERSION == "9.9.9" {
            return;
        }
        // This build is not 9.9.9: to it the update looks interrupted.
        let reports = updater.take_reports();
        assert!(
            matches!(&reports[0].1, UpdateProgress::RolledBack { from, .. } if from == "9.9.9"),
            "{reports:?}"
        );
        assert!(!dir.path().join(TRIAL).exists());
    }

    #[tokio::test]
    async fn a_corrupt_download_is_deleted_and_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("camera-agent");
        fs::write(&exe, b"old binary").unwrap();
        let key = SigningKey::generate().unwrap();
        let mut binary = own_elf();
        binary.resize(100_000, 1);
        let offer = offer(&key, "9.9.9", crate::TARGET, &binary);
        let mut corrupt = binary.clone();
        corrupt[50_000] ^= 0xff;
        let failed = run_download(&offer, &corrupt, &exe).await.unwrap();
        assert!(
            matches!(&failed, Some(UpdateProgress::Failed(why)) if why.contains("not the binary signed")),
            "{failed:?}"
        );
        assert_eq!(fs::read(&exe).unwrap(), b"old binary");
        assert!(!dir.path().join(PART).exists() && !dir.path().join(TRIAL).exists());
    }

    #[tokio::test]
    async fn a_cut_download_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("camera-agent");
        fs::write(&exe, b"old binary").unwrap();
        let key = SigningKey::generate().unwrap();
        let mut binary = own_elf();
        binary.resize(300_000, 3);
        let offer = offer(&key, "9.9.9", crate::TARGET, &binary);
        // The relay sends the first 100,000 bytes only, then nothing: the link is cut.
        let err = run_download(&offer, &binary[..100_000], &exe)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("expected some at"), "{err}");
        let kept = fs::metadata(dir.path().join(PART)).unwrap().len();
        assert!(kept >= 90_000, "{kept}");
        assert_eq!(fs::read(&exe).unwrap(), b"old binary");
        // The next offer of the same release takes only the rest.
        assert_eq!(run_download(&offer, &binary, &exe).await.unwrap(), None);
        assert_eq!(fs::read(&exe).unwrap(), binary);
    }

    #[test]
    fn a_new_agent_that_misses_its_trial_puts_the_previous_one_back() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("camera-agent");
        fs::write(&exe, b"new binary").unwrap();
        fs::write(dir.path().join(OLD), b"old binary").unwrap();
        write_fields(
            &dir.path().join(TRIAL),
            &[
                ("id", "9".into()),
                ("from", "0.0.1".into()),
                ("to", crate::VERSION.into()),
            ],
        )
        .unwrap();
        // This agent is the version on trial.
        let updater = Updater::new(policy(vec![]), Some(exe.clone()));
        assert_eq!(updater.trial(), Some(Duration::from_secs(5)));
        updater.roll_back("not online within 5s").unwrap();
        assert_eq!(fs::read(&exe).unwrap(), b"old binary");
        assert!(!dir.path().join(TRIAL).exists() && !dir.path().join(OLD).exists());
        // The previous agent, started again, reports it.
        let reports = Updater::new(policy(vec![]), Some(exe.clone())).take_reports();
        assert!(
            matches!(&reports[..], [(9, UpdateProgress::RolledBack { why, .. })] if why.contains("not online")),
            "{reports:?}"
        );

        // A trial that is confirmed instead reports the update and leaves no trace.
        fs::write(dir.path().join(OLD), b"old binary").unwrap();
        write_fields(
            &dir.path().join(TRIAL),
            &[
                ("id", "10".into()),
                ("from", "0.0.1".into()),
                ("to", crate::VERSION.into()),
            ],
        )
        .unwrap();
        let updater = Updater::new(policy(vec![]), Some(exe.clone()));
        updater.confirm();
        assert!(matches!(
            &updater.take_reports()[..],
            [(10, UpdateProgress::Updated { .. })]
        ));
        assert!(updater.trial().is_none());
        assert!(!dir.path().join(TRIAL).exists() && !dir.path().join(OLD).exists());
    }

    #[test]
    fn a_rollback_by_the_supervisor_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("camera-agent");
        fs::write(&exe, b"old binary").unwrap();
        write_fields(
            &dir.path().join(ROLLED_BACK),
            &[
                ("id", "7".into()),
                ("from", "9.9.9".into()),
                ("to", "0.1.0".into()),
                ("why", "the new agent did not start 3 times".into()),
            ],
        )
        .unwrap();
        let updater = Updater::new(policy(vec![]), Some(exe.clone()));
        let reports = updater.take_reports();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].0, 7);
        assert!(
            matches!(&reports[0].1, UpdateProgress::RolledBack { from, why, .. } if from == "9.9.9" && why.contains("3 times"))
        );
        assert!(!dir.path().join(ROLLED_BACK).exists());
        assert!(Updater::new(policy(vec![]), Some(exe))
            .take_reports()
            .is_empty());
    }
}
