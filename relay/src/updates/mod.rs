//! Over-the-air agent updates, the relay's side (docs/updates.md): releases
//! ([`releases`]), one camera's update (a job), and rollouts over many cameras in
//! batches that stop at a failure threshold. The relay only carries: each camera checks
//! the release's signature with the keys it was installed with, so a relay cannot run
//! code on cameras.
//!
//! A job is offered when its camera is online and a transfer slot is free
//! (`updates.max_transfers`: a rollout cannot take the relay's bandwidth from video);
//! the camera fetches the binary over its control link, chunk by chunk, resuming after
//! a dropped link; its reports move the job on, and each move is an `update.progress`
//! event.

pub(crate) mod api;
pub(crate) mod releases;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use common::protocol::{UpdateOffer, UpdateProgress};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    config::UpdatesConfig,
    events::{EventKind, Events},
    metrics::Metrics,
    registry::{AgentSession, Registry},
};
use releases::{Releases, Stored};

/// How often jobs and rollouts are looked at besides when something happens.
const TICK: Duration = Duration::from_secs(1);

/// Where one camera's update stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub(crate) enum JobState {
    /// Waiting for the camera to be online and a transfer slot.
    Waiting,
    /// Offered; the camera is checking it.
    Offered,
    /// The camera is fetching the binary.
    Downloading,
    /// Verified on the camera, which is restarting into it.
    Installing,
    /// The new agent is online.
    Updated,
    /// The camera would not take it; nothing changed there.
    Refused(String),
    /// It failed (the download's check, no answer in time); nothing changed, or the
    /// camera rolled back.
    Failed(String),
    /// The new agent did not come up healthy; the previous one is back.
    RolledBack(String),
    /// Offline when its rollout came to it.
    Skipped(String),
}

impl JobState {
    fn is_final(&self) -> bool {
        matches!(
            self,
            JobState::Updated
                | JobState::Refused(_)
                | JobState::Failed(_)
                | JobState::RolledBack(_)
                | JobState::Skipped(_)
        )
    }

    fn failed(&self) -> bool {
        matches!(
            self,
            JobState::Refused(_) | JobState::Failed(_) | JobState::RolledBack(_)
        )
    }

    fn word(&self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Offered => "offered",
            JobState::Downloading => "downloading",
            JobState::Installing => "installing",
            JobState::Updated => "updated",
            JobState::Refused(_) => "refused",
            JobState::Failed(_) => "failed",
            JobState::RolledBack(_) => "rolled_back",
            JobState::Skipped(_) => "skipped",
        }
    }
}

/// One camera's update.
#[derive(Debug)]
struct Job {
    /// The offer's id.
    id: u64,
    release: Arc<Stored>,
    force: bool,
    state: JobState,
    /// Bytes the camera has fetched.
    bytes: u64,
    /// The version the camera ran when the job began.
    from: Option<String>,
    rollout: Option<u64>,
    started: SystemTime,
    /// Since when it is in its state.
    since: Instant,
    /// The session the offer went to, and its transfer slot.
    offered: Option<(Arc<AgentSession>, OwnedSemaphorePermit)>,
}

/// The view of a job in the API.
#[derive(Debug, Serialize)]
pub(crate) struct JobView {
    agent: String,
    release: String,
    version: String,
    #[serde(flatten)]
    state: JobState,
    bytes: u64,
    size: u64,
    from_version: Option<String>,
    rollout: Option<u64>,
    started_unix: u64,
}

/// A rollout: one release to many cameras, `batch` at a time.
#[derive(Debug)]
struct Rollout {
    release: Arc<Stored>,
    force: bool,
    /// Cameras in the order they are updated.
    targets: Vec<String>,
    /// Cameras taken so far (`targets[..next]`).
    next: usize,
    batch: usize,
    max_failures: usize,
    /// Why it stopped before its end, if it did.
    stopped: Option<String>,
    started: SystemTime,
}

/// The view of a rollout in the API.
#[derive(Debug, Serialize)]
pub(crate) struct RolloutView {
    id: u64,
    release: String,
    state: &'static str,
    stopped: Option<String>,
    batch: usize,
    max_failures: usize,
    total: usize,
    counts: BTreeMap<&'static str, usize>,
    cameras: Vec<RolloutCamera>,
    started_unix: u64,
}

#[derive(Debug, Serialize)]
struct RolloutCamera {
    agent: String,
    #[serde(flatten)]
    state: JobState,
}

/// Which cameras a rollout takes.
#[derive(Debug, Default)]
pub(crate) struct Pick {
    /// Agent ids, or patterns with `*`.
    pub(crate) agents: Vec<String>,
    /// Labels (`agent.labels`) of online agents.
    pub(crate) labels: Vec<String>,
}

/// Why an update cannot start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("no release {0:?} on this relay (GET /releases lists them; POST /releases adds one)")]
    NoRelease(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

/// The relay's updates.
#[derive(Debug)]
pub(crate) struct Updates {
    pub(crate) releases: Releases,
    config: UpdatesConfig,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
    next_id: AtomicU64,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    /// Something happened: look at jobs and rollouts now.
    wake: Notify,
}

#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<String, Job>,
    rollouts: BTreeMap<u64, Rollout>,
}

impl Updates {
    pub(crate) fn new(
        releases: Releases,
        config: UpdatesConfig,
        events: Arc<Events>,
        metrics: Arc<Metrics>,
    ) -> Updates {
        Updates {
            releases,
            slots: Arc::new(Semaphore::new(config.max_transfers)),
            config,
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(1),
            events,
            metrics,
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts updating `agent` to `release` (replacing a finished or waiting update).
    pub(crate) fn start(
        &self,
        registry: &Registry,
        agent: &str,
        release: &str,
        force: bool,
    ) -> Result<JobView, StartError> {
        let release = self
            .releases
            .get(release)
            .ok_or_else(|| StartError::NoRelease(release.to_string()))?;
        let session = registry.get(agent);
        check_fits(session.as_deref(), &release)?;
        let mut state = self.lock();
        if let Some(job) = state.jobs.get(agent) {
            if !job.state.is_final() && job.state != JobState::Waiting {
                return Err(StartError::Conflict(format!(
                    "agent {agent:?} is already updating to {} ({}); wait for it to end",
                    job.release.id,
                    job.state.word()
                )));
            }
        }
        let job = self.new_job(session.as_deref(), release, force, None);
        state.jobs.insert(agent.to_string(), job);
        let view = view_of(agent, &state.jobs[agent]);
        self.progress(&state, agent);
        drop(state);
        self.wake.notify_one();
        Ok(view)
    }

    fn new_job(
        &self,
        session: Option<&AgentSession>,
        release: Arc<Stored>,
        force: bool,
        rollout: Option<u64>,
    ) -> Job {
        Job {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            release,
            force,
            state: JobState::Waiting,
            bytes: 0,
            from: session.map(|s| s.agent_version.clone()),
            rollout,
            started: SystemTime::now(),
            since: Instant::now(),
            offered: None,
        }
    }

    /// Starts a rollout of `release` to the known agents whose ids match `pick.agents`
    /// (exact ids, or patterns with `*`) and the online agents with any of
    /// `pick.labels`.
    pub(crate) fn rollout(
        &self,
        registry: &Registry,
        release: &str,
        pick: &Pick,
        batch: usize,
        max_failures: usize,
        force: bool,
    ) -> Result<RolloutView, StartError> {
        let release = self
            .releases
            .get(release)
            .ok_or_else(|| StartError::NoRelease(release.to_string()))?;
        if batch == 0 {
            return Err(StartError::Invalid("batch must be at least 1".into()));
        }
        let sessions = registry.sessions();
        let mut targets: Vec<String> = registry
            .known()
            .into_iter()
            .chain(sessions.iter().map(|s| s.id.clone()))
            .filter(|id| pick.agents.iter().any(|pattern| glob(pattern, id)))
            .chain(
                sessions
                    .iter()
                    .filter(|s| s.labels.iter().any(|l| pick.labels.contains(l)))
                    .map(|s| s.id.clone()),
            )
            .collect();
        targets.sort_unstable();
        targets.dedup();
        if targets.is_empty() {
            return Err(StartError::Invalid(format!(
                "no agent known to this relay matches agents {:?} or labels {:?}",
                pick.agents, pick.labels
            )));
        }
        let mut state = self.lock();
        let busy: Vec<&String> = targets
            .iter()
            .filter(|t| state.jobs.get(*t).is_some_and(|j| !j.state.is_final()))
            .collect();
        if !busy.is_empty() {
            return Err(StartError::Conflict(format!(
                "these cameras are updating already: {busy:?}"
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rollout = Rollout {
            release,
            force,
            targets,
            next: 0,
            batch,
            max_failures,
            stopped: None,
            started: SystemTime::now(),
        };
        tracing::info!(rollout = id, release = %rollout.release.id, cameras = rollout.targets.len(), batch, max_failures, "rollout started");
        state.rollouts.insert(id, rollout);
        let view = rollout_view(&state, id);
        drop(state);
        self.wake.notify_one();
        view.ok_or_else(|| StartError::Invalid("the rollout vanished".into()))
    }

    /// Stops a rollout: no camera is started after this (those updating finish).
    pub(crate) fn stop_rollout(&self, id: u64) -> Option<RolloutView> {
        let mut state = self.lock();
        let rollout = state.rollouts.get_mut(&id)?;
        if rollout.next < rollout.targets.len() && rollout.stopped.is_none() {
            rollout.stopped = Some("stopped by an operator".into());
        }
        rollout_view(&state, id)
    }

    /// The job of `agent`.
    pub(crate) fn job(&self, agent: &str) -> Option<JobView> {
        self.lock().jobs.get(agent).map(|job| view_of(agent, job))
    }

    /// Every rollout, oldest first.
    pub(crate) fn rollouts(&self) -> Vec<RolloutView> {
        let state = self.lock();
        state
            .rollouts
            .keys()
            .filter_map(|id| rollout_view(&state, *id))
            .collect()
    }

    /// The rollout `id`.
    pub(crate) fn rollout_view(&self, id: u64) -> Option<RolloutView> {
        rollout_view(&self.lock(), id)
    }

    /// Bytes a second each camera may fetch at most (`updates.max_rate_kbps`).
    pub(crate) fn max_rate(&self) -> Option<u64> {
        self.config.max_rate
    }

    /// A camera registered: its update may go on.
    pub(crate) fn online(&self) {
        self.wake.notify_one();
    }

    /// A camera's session ended: an offer to it is off until it is back (its download
    /// resumes then).
    pub(crate) fn offline(&self, session: &Arc<AgentSession>) {
        let mut state = self.lock();
        if let Some(job) = state.jobs.get_mut(&session.id) {
            let ours = job
                .offered
                .as_ref()
                .is_some_and(|(offered, _)| Arc::ptr_eq(offered, session));
            if ours && matches!(job.state, JobState::Offered | JobState::Downloading) {
                job.offered = None;
                job.state = JobState::Waiting;
                job.since = Instant::now();
            } else if ours {
                // Installing: the camera restarts; the slot is free, the job waits for
                // the new agent's word.
                job.offered = None;
            }
        }
        drop(state);
        self.wake.notify_one();
    }

    /// `len` bytes at `offset` of the release offered as `id` to `agent`.
    pub(crate) fn fetch(&self, agent: &str, id: u64, offset: u64, len: u32) -> Option<Vec<u8>> {
        let mut state = self.lock();
        let job = state
            .jobs
            .get_mut(agent)
            .filter(|j| j.id == id && j.offered.is_some())?;
        let binary = &job.release.binary;
        let start = usize::try_from(offset).ok()?.min(binary.len());
        let end = start
            .saturating_add(len.min(common::protocol::UPDATE_CHUNK) as usize)
            .min(binary.len());
        job.bytes = job.bytes.max(end as u64);
        Some(binary[start..end].to_vec())
    }

    /// The camera's word on an update.
    pub(crate) fn report(&self, agent: &str, id: u64, progress: UpdateProgress) {
        let mut state = self.lock();
        let Some(job) = state.jobs.get_mut(agent).filter(|j| j.id == id) else {
            tracing::info!(
                agent,
                id,
                ?progress,
                "update report for no update under way"
            );
            return;
        };
        let before = job.state.clone();
        job.state = match progress {
            UpdateProgress::Refused(why) => JobState::Refused(why),
            UpdateProgress::Downloading { have } => {
                job.bytes = job.bytes.max(have);
                JobState::Downloading
            }
            UpdateProgress::Failed(why) => JobState::Failed(why),
            UpdateProgress::Installing => JobState::Installing,
            UpdateProgress::Updated { .. } => JobState::Updated,
            UpdateProgress::RolledBack { why, .. } => JobState::RolledBack(why),
        };
        if job.state.is_final() || job.state == JobState::Installing {
            // Its slot goes to the next camera.
            job.offered = None;
        }
        // Any word from the camera keeps its update from timing out.
        job.since = Instant::now();
        let moved_on = job.state != before;
        self.progress(&state, agent);
        drop(state);
        if moved_on {
            self.wake.notify_one();
        }
    }

    /// Emits the `update.progress` event of `agent`'s job.
    fn progress(&self, state: &State, agent: &str) {
        let Some(job) = state.jobs.get(agent) else {
            return;
        };
        let word = job.state.word();
        let detail = match &job.state {
            JobState::Refused(d)
            | JobState::Failed(d)
            | JobState::RolledBack(d)
            | JobState::Skipped(d) => Some(d.clone()),
            _ => None,
        };
        if job.state.is_final() {
            tracing::info!(agent, release = %job.release.id, state = word, detail = detail.as_deref().unwrap_or(""), "update ended");
            self.metrics.updates_total.with_label_values(&[word]).inc();
        }
        self.metrics
            .update_transfers
            .set((self.config.max_transfers - self.slots.available_permits()) as i64);
        self.events.emit(
            agent,
            EventKind::UpdateProgress {
                release: job.release.id.clone(),
                state: word,
                detail,
                bytes: job.bytes,
                size: job.release.release.size,
                rollout: job.rollout,
            },
        );
    }

    /// Moves jobs and rollouts on until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, registry: Arc<Registry>, shutdown: CancellationToken) {
        loop {
            self.step(&registry);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// One look at everything: rollouts start their next cameras, waiting jobs are
    /// offered, jobs that hear nothing time out.
    fn step(&self, registry: &Registry) {
        let mut state = self.lock();
        let mut changed = Vec::new();
        self.drive_rollouts(&mut state, registry, &mut changed);
        for (agent, job) in state.jobs.iter_mut() {
            match job.state {
                JobState::Waiting => {
                    let Some(session) = registry.get(agent) else {
                        continue;
                    };
                    if let Err(e) = check_fits(Some(&session), &job.release) {
                        job.state = JobState::Refused(e.to_string());
                        changed.push(agent.clone());
                        continue;
                    }
                    let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                        continue;
                    };
                    job.from
                        .get_or_insert_with(|| session.agent_version.clone());
                    session.offer_update(UpdateOffer {
                        id: job.id,
                        release: job.release.release.clone(),
                        force: job.force,
                    });
                    job.offered = Some((session, permit));
                    job.state = JobState::Offered;
                    job.since = Instant::now();
                    changed.push(agent.clone());
                }
                JobState::Offered | JobState::Downloading | JobState::Installing
                    if job.since.elapsed() > self.config.camera_timeout =>
                {
                    job.state = JobState::Failed(format!(
                        "no word from the camera for {:?} while {} (updates.camera_timeout_secs)",
                        self.config.camera_timeout,
                        job.state.word()
                    ));
                    job.offered = None;
                    changed.push(agent.clone());
                }
                _ => {}
            }
        }
        for agent in changed {
            self.progress(&state, &agent);
        }
    }

    /// Starts each rollout's next cameras while it has room in its batch and has not
    /// failed too often.
    fn drive_rollouts(&self, state: &mut State, registry: &Registry, changed: &mut Vec<String>) {
        let ids: Vec<u64> = state.rollouts.keys().copied().collect();
        for id in ids {
            let (in_flight, failures) = {
                let rollout = &state.rollouts[&id];
                let mine = rollout.targets[..rollout.next]
                    .iter()
                    .filter_map(|t| state.jobs.get(t).filter(|j| j.rollout == Some(id)));
                let (mut in_flight, mut failures) = (0, 0);
                for job in mine {
                    in_flight += usize::from(!job.state.is_final());
                    failures += usize::from(job.state.failed());
                }
                (in_flight, failures)
            };
            let Some(rollout) = state.rollouts.get_mut(&id) else {
                continue;
            };
            if rollout.stopped.is_none() && failures > rollout.max_failures {
                let why = format!(
                    "{failures} cameras failed, more than max_failures = {}",
                    rollout.max_failures
                );
                tracing::warn!(rollout = id, "rollout stopped: {why}");
                rollout.stopped = Some(why);
            }
            let mut room = rollout.batch.saturating_sub(in_flight);
            while room > 0 && rollout.stopped.is_none() && rollout.next < rollout.targets.len() {
                let agent = rollout.targets[rollout.next].clone();
                rollout.next += 1;
                let session = registry.get(&agent);
                let mut job = self.new_job(
                    session.as_deref(),
                    rollout.release.clone(),
                    rollout.force,
                    Some(id),
                );
                if session.is_none() {
                    job.state = JobState::Skipped("offline when the rollout came to it".into());
                } else {
                    room -= 1;
                }
                state.jobs.insert(agent.clone(), job);
                changed.push(agent);
            }
        }
    }
}

/// Whether `release` can go to the agent of `session` (if online): its target.
fn check_fits(session: Option<&AgentSession>, release: &Stored) -> Result<(), StartError> {
    let Some(session) = session else {
        return Ok(());
    };
    if !session.takes_updates {
        return Err(StartError::Conflict(format!(
            "agent {:?} (version {}) does not take over-the-air updates; update it once by hand",
            session.id, session.agent_version
        )));
    }
    match &session.target {
        Some(target) if *target != release.release.target => Err(StartError::Conflict(format!(
            "release {} is for {}; agent {:?} runs {target}",
            release.id, release.release.target, session.id
        ))),
        _ => Ok(()),
    }
}

fn view_of(agent: &str, job: &Job) -> JobView {
    JobView {
        agent: agent.to_string(),
        release: job.release.id.clone(),
        version: job.release.release.version.clone(),
        state: job.state.clone(),
        bytes: job.bytes,
        size: job.release.release.size,
        from_version: job.from.clone(),
        rollout: job.rollout,
        started_unix: unix(job.started),
    }
}

fn rollout_view(state: &State, id: u64) -> Option<RolloutView> {
    let rollout = state.rollouts.get(&id)?;
    let mut counts = BTreeMap::new();
    let mut cameras = Vec::new();
    for (i, agent) in rollout.targets.iter().enumerate() {
        let job_state = match state.jobs.get(agent).filter(|j| j.rollout == Some(id)) {
            Some(job) if i < rollout.next => job.state.clone(),
            _ => JobState::Waiting,
        };
        *counts
            .entry(if i < rollout.next {
                job_state.word()
            } else {
                "pending"
            })
            .or_insert(0) += 1;
        cameras.push(RolloutCamera {
            agent: agent.clone(),
            state: job_state,
        });
    }
    let all_final = rollout.targets[..rollout.next].iter().all(|t| {
        state
            .jobs
            .get(t)
            .is_none_or(|j| j.rollout != Some(id) || j.state.is_final())
    });
    let state_word = match (
        &rollout.stopped,
        all_final,
        rollout.next == rollout.targets.len(),
    ) {
        (Some(_), true, _) => "stopped",
        (Some(_), false, _) => "stopping",
        (None, true, true) => "done",
        _ => "running",
    };
    Some(RolloutView {
        id,
        release: rollout.release.id.clone(),
        state: state_word,
        stopped: rollout.stopped.clone(),
        batch: rollout.batch,
        max_failures: rollout.max_failures,
        total: rollout.targets.len(),
        counts,
        cameras,
        started_unix: unix(rollout.started),
    })
}

/// `pattern` with `*` for any run of characters, against `text`.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_ids() {
        assert!(glob("cam-*", "cam-1"));
        assert!(glob("*", "anything"));
        assert!(glob("site-*-cam-*", "site-a-cam-7"));
        assert!(!glob("cam-*", "dahua-1"));
        assert!(glob("cam-1", "cam-1"));
        assert!(!glob("cam-1", "cam-10"));
    }
}
