//! The camera agent: runs inside the IP camera, dials out to the relay, and carries
//! every Watcher connection the relay sends it to the camera's own RTSP server.
//!
//! # Glossary
//! - **Relay**: the public server the agent dials; it exposes the camera as a local port.
//! - **Control link**: WebSocket to the relay: register, heartbeats, commands.
//! - **Tunnel**: QUIC connection to the relay; each Watcher connection is one stream.
//! - **Fallback link**: a second WebSocket carrying the streams while UDP is blocked.
//! - **Watcher**: the VMS or player pulling RTSP from the relay.
//!
//! [`Agent::run`] keeps a session (control link + tunnel or fallback) up, re-registering with
//! exponential backoff and jitter whenever the relay goes away.

#![forbid(unsafe_code)]

pub mod config;
mod control;
mod resolve;
pub mod stats;
mod tunnel;
pub mod update;

use std::{
    sync::{atomic::Ordering, Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{
    backoff::Backoff,
    protocol::{CloseReason, Command, CommandOutput, Redirect, Rejection, FEATURE_UPDATE},
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::{AgentConfig, RestartMode};
pub use stats::Stats;

/// The agent's version: the crate's, or the one a stamped build was given
/// (`CAMERA_AGENT_VERSION` at build time, as `make firmware VERSION=…` sets it).
pub const VERSION: &str = env!("CAMERA_AGENT_BUILD_VERSION");

/// The Rust target triple the agent was built for; releases for others are refused.
pub const TARGET: &str = env!("CAMERA_AGENT_TARGET");

/// First backoff step after a failure; later steps double up to `network.reconnect_interval`.
const BACKOFF_BASE: Duration = Duration::from_millis(500);

/// How long, after the tunnel closed, the agent waits for the session's reason on the
/// control link (TCP and UDP may deliver out of order); longer than the control link's
/// polite close after a command ([`control::POLITE_CLOSE`]).
const CLOSE_REASON_GRACE: Duration = Duration::from_secs(3);

/// What the agent is doing, for logs, tests and (later) the local status page.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentState {
    /// Dialing the relay.
    Connecting,
    /// Registered, data plane up: the camera is reachable at `port` on the relay host.
    Online {
        /// The relay port granted to the camera.
        port: u16,
        /// The link that carries new Watcher streams.
        link: DataLink,
    },
    /// The last session failed or ended; the agent retries after a backoff.
    Retrying {
        /// Why, in words.
        reason: String,
        /// The relay's refusal, if it refused.
        rejection: Option<Rejection>,
    },
    /// The agent stopped.
    Stopped,
}

/// The link that carries a camera's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLink {
    /// The QUIC tunnel.
    Quic,
    /// The TCP fallback, while QUIC cannot reach the relay (UDP blocked).
    Tcp,
}

/// Why a session with the relay ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The relay could not be reached.
    #[error("{0}")]
    Connect(String),
    /// The relay refused the registration.
    #[error("the relay refused the registration: {0}")]
    Rejected(Rejection),
    /// The relay closed the session.
    #[error("the relay closed the session: {0}")]
    Closed(CloseReason),
    /// The relay sent the camera to another relay of its cluster.
    #[error("the relay sends this camera to relay {} ({}): {}", .0.relay, .0.url, .0.reason)]
    Redirected(Redirect),
    /// The link was lost.
    #[error("{0}")]
    Lost(String),
    /// The QUIC tunnel could not be set up.
    #[error("{0}")]
    Tunnel(String),
    /// The relay broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An operator asked for a reconnect (or a reloaded config needs one).
    #[error("reconnecting as asked")]
    Reconnect,
    /// An operator asked for a restart.
    #[error("restarting as asked")]
    Restart,
}

/// Redirects followed at once in a row; more wait like any failed attempt.
const MAX_REDIRECTS_IN_A_ROW: u32 = 3;

/// Why [`Agent::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shut down (a signal, or the caller's token).
    Stopped,
    /// An operator asked for a restart; see [`AgentConfig::restart`].
    Restart,
}

/// Resolves when a trial that has not been confirmed runs out; never without one.
async fn trial_over(trial: Option<(tokio::time::Instant, Duration)>, updater: &update::Updater) {
    match trial {
        Some((deadline, _)) => {
            tokio::time::sleep_until(deadline).await;
            if updater.trial().is_none() {
                // Confirmed meanwhile.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// What the agent does with one command: its answer for the relay, and whether the
/// session ends after the answer is sent.
#[derive(Debug)]
pub(crate) struct Handled {
    pub(crate) result: Result<CommandOutput, String>,
    pub(crate) then: Option<SessionError>,
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    /// Replaced by `reload_config`; each session runs on the one current at its start.
    config: RwLock<Arc<AgentConfig>>,
    stats: Arc<Stats>,
    /// Published so tests and operators can wait on readiness instead of sleeping.
    state: watch::Sender<AgentState>,
    /// Which relay address the last session reached, among those the config names.
    reached: std::sync::Mutex<Option<usize>>,
    /// Where the relay sent this camera, for the next session to try first.
    redirect: std::sync::Mutex<Option<Redirect>>,
    /// Over-the-air updates of this agent's binary.
    updater: update::Updater,
}

impl Agent {
    /// An agent for `config`; nothing happens until [`Agent::run`].
    pub fn new(config: AgentConfig) -> Self {
        let exe = std::env::current_exe().ok();
        Agent {
            updater: update::Updater::new(config.update.clone(), exe),
            config: RwLock::new(Arc::new(config)),
            stats: Arc::new(Stats::default()),
            state: watch::Sender::new(AgentState::Connecting),
            reached: std::sync::Mutex::new(None),
            redirect: std::sync::Mutex::new(None),
        }
    }

    /// The config in force (the latest one loaded).
    pub fn config(&self) -> Arc<AgentConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Follows the agent's state.
    pub fn subscribe(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    /// The agent's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Keeps a session with the relay until `shutdown` (or an operator's restart),
    /// reconnecting as needed.
    pub async fn run(&self, shutdown: CancellationToken) -> Exit {
        let mut backoff = Backoff::new(BACKOFF_BASE, self.config().reconnect_interval);
        let tracker = TaskTracker::new();
        let mut exit = Exit::Stopped;
        let mut redirects = 0;
        // A new agent on trial must come online by then, or the previous one comes back.
        let trial = self
            .updater
            .trial()
            .map(|within| (tokio::time::Instant::now() + within, within));
        loop {
            self.state.send_replace(AgentState::Connecting);
            let mut was_online = false;
            let ended = tokio::select! {
                _ = shutdown.cancelled() => break,
                ended = self.session(&tracker, &mut was_online) => ended,
                () = trial_over(trial, &self.updater) => {
                    let within = trial.map(|(_, within)| within).unwrap_or_default();
                    let why = format!("the new agent was not online within {within:?} (update.trial_secs)");
                    match self.updater.roll_back(&why) {
                        Ok(()) => {
                            exit = Exit::Restart;
                            break;
                        }
                        Err(e) => {
                            tracing::error!("cannot put the previous agent back: {e}; keeping this one");
                            continue;
                        }
                    }
                }
            };
            if was_online {
                backoff.reset();
                redirects = 0;
            }
            let delay = match &ended {
                SessionError::Restart => {
                    exit = Exit::Restart;
                    break;
                }
                SessionError::Reconnect => {
                    backoff = Backoff::new(BACKOFF_BASE, self.config().reconnect_interval);
                    Duration::ZERO
                }
                // Another agent uses our id. Coming straight back would throw it off in
                // turn, and the two would flap; wait the longest interval instead.
                SessionError::Closed(CloseReason::Replaced(_)) => self.config().reconnect_interval,
                // The relay restarts: every camera heard this at once, so spread the
                // fleet's return over the whole interval instead of storming back.
                SessionError::Closed(CloseReason::Shutdown) => backoff.spread(),
                // Straight to the relay named, unless relays keep sending the camera on
                // (their views of the cluster disagree for a moment): then as for any
                // failure.
                SessionError::Redirected(to) => {
                    redirects += 1;
                    *self.redirect.lock().unwrap_or_else(|e| e.into_inner()) = Some(to.clone());
                    match redirects {
                        ..=MAX_REDIRECTS_IN_A_ROW => Duration::ZERO,
                        _ => backoff.next_delay(),
                    }
                }
                // The relay says when; never sooner, but keep our own growing backoff too.
                SessionError::Rejected(Rejection::RetryLater { secs, .. }) => backoff
                    .next_delay()
                    .max(Duration::from_secs(u64::from(*secs))),
                _ => backoff.next_delay(),
            };
            match &ended {
                SessionError::Redirected(_) => {
                    tracing::info!("{ended}; retrying in {:.1} s", delay.as_secs_f64());
                }
                _ => tracing::warn!("{ended}; retrying in {:.1} s", delay.as_secs_f64()),
            }
            let rejection = match &ended {
                SessionError::Rejected(r) => Some(r.clone()),
                _ => None,
            };
            self.state.send_replace(AgentState::Retrying {
                reason: ended.to_string(),
                rejection,
            });
            // Counted after the state left Online, so whoever sees the count also sees
            // the agent is no longer online on that session.
            if was_online {
                self.stats.reconnections.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        self.state.send_replace(AgentState::Stopped);
        tracing::info!("agent stopped");
        exit
    }

    /// One session: register, bring the tunnel up, serve until either link ends.
    async fn session(&self, tracker: &TaskTracker, was_online: &mut bool) -> SessionError {
        let config = &self.config();
        let previous = *self.reached.lock().unwrap_or_else(|e| e.into_inner());
        let redirect = self
            .redirect
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let connected = control::connect(config, previous, redirect.as_ref()).await;
        let (control, registration, reached) = match connected {
            Ok(ok) => ok,
            Err(e) => return e,
        };
        if reached.is_some() {
            *self.reached.lock().unwrap_or_else(|e| e.into_inner()) = reached;
        }
        tracing::info!(
            relay = %registration.reached.relay.url,
            address = %registration.reached.addr,
            "registered"
        );
        let port = registration
            .registered
            .granted
            .first()
            .map(|g| g.port)
            .unwrap_or_default();
        let quic = std::sync::Mutex::new(None);
        let published = tunnel::Published {
            state: &self.state,
            port,
            quic: &quic,
        };
        let quic_rtt = || {
            quic.lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(quinn::Connection::rtt)
        };
        let handle = |command: Command| self.handle(command, config, quic_rtt());
        // Heartbeats flow while the data plane connects: finding that UDP is blocked
        // takes longer than the relay waits for a heartbeat.
        let updates = registration
            .registered
            .granted
            .iter()
            .any(|g| g.name == FEATURE_UPDATE)
            .then_some(&self.updater);
        let control_run = control.run(config.heartbeat_interval, &self.stats, &handle, updates);
        tokio::pin!(control_run);
        let data = tunnel::run(
            config,
            &registration,
            &self.stats,
            tracker,
            &published,
            || {
                *was_online = true;
                self.updater.confirm();
            },
        );
        tokio::select! {
            ended = &mut control_run => ended,
            ended = data => {
                // The relay ends both links at once, and what the control link says
                // (its Closing message, or the operator's command this agent is closing
                // the session for) may come just after the tunnel's close; give it a
                // moment, and prefer it.
                tokio::time::timeout(CLOSE_REASON_GRACE, &mut control_run)
                    .await
                    .unwrap_or(ended)
            }
        }
    }

    /// Carries out one operator command.
    fn handle(
        &self,
        command: Command,
        config: &AgentConfig,
        quic_rtt: Option<Duration>,
    ) -> Handled {
        let answer = |output: CommandOutput| Handled {
            result: Ok(output),
            then: None,
        };
        match command {
            Command::Ping => answer(CommandOutput::Pong {
                unix_millis: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                quic_rtt_micros: quic_rtt.map(|rtt| rtt.as_micros() as u64),
            }),
            Command::Stats => answer(CommandOutput::Stats(self.stats.snapshot())),
            Command::Reconnect => Handled {
                result: Ok(CommandOutput::Reconnecting),
                then: Some(SessionError::Reconnect),
            },
            Command::Restart => {
                let how = match config.restart {
                    RestartMode::Exec => "re-executing the agent",
                    RestartMode::Exit => "exiting with status 75 for the supervisor to restart",
                };
                Handled {
                    result: Ok(CommandOutput::Restarting(how.into())),
                    then: Some(SessionError::Restart),
                }
            }
            Command::ReloadConfig => self.reload(config),
        }
    }

    /// Re-reads the config file; a broken file changes nothing and says why.
    fn reload(&self, current: &AgentConfig) -> Handled {
        let refuse = |why: String| Handled {
            result: Err(why),
            then: None,
        };
        let Some(path) = &current.source else {
            return refuse("this agent was not started from a config file".into());
        };
        let newer = match AgentConfig::load(path) {
            Ok(newer) => newer,
            Err(e) => return refuse(format!("{e}; the running config is kept")),
        };
        let (applied, need_restart) = current.changes(&newer);
        tracing::info!(?applied, ?need_restart, "{} reloaded", path.display());
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(newer);
        // Settings that shape a session take effect by starting a new one.
        let then = (!applied.is_empty()).then_some(SessionError::Reconnect);
        Handled {
            result: Ok(CommandOutput::Reloaded {
                applied,
                need_restart,
            }),
            then,
        }
    }
}
