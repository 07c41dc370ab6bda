//! A fleet of cameras in one process: real agents (the agent crate's own session loop,
//! control link, QUIC connection and heartbeats) sharing one runtime, so a thousand
//! cameras cost a thousand sessions, not a thousand processes.

use std::{sync::Arc, time::Duration};

use agent::{config::AgentConfig, Agent, AgentState};
use anyhow::bail;
use common::protocol::Rejection;
use tokio::{task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

/// Running agents; stopped when dropped.
#[derive(Debug)]
pub struct Fleet {
    agents: Vec<Arc<Agent>>,
    shutdown: CancellationToken,
    tasks: JoinSet<agent::Exit>,
}

impl Fleet {
    /// Starts one agent per config.
    pub fn start(configs: Vec<AgentConfig>) -> Self {
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let agents: Vec<Arc<Agent>> = configs
            .into_iter()
            .map(|config| Arc::new(Agent::new(config)))
            .collect();
        for agent in &agents {
            let (agent, token) = (agent.clone(), shutdown.clone());
            tasks.spawn(async move { agent.run(token).await });
        }
        Fleet {
            agents,
            shutdown,
            tasks,
        }
    }

    /// Each agent's relay port while online (None while not).
    pub fn ports(&self) -> Vec<Option<u16>> {
        self.agents
            .iter()
            .map(|a| match *a.subscribe().borrow() {
                AgentState::Online { port, .. } => Some(port),
                _ => None,
            })
            .collect()
    }

    /// Waits until every agent is online, and returns for each how long after `since`
    /// it was seen coming online (zero if it already was). Fails at `deadline`, or at
    /// once when an agent is refused for good (any refusal but "retry later"), saying
    /// how many made it and why one did not.
    pub async fn online_times(
        &self,
        since: Instant,
        deadline: Duration,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut watches = JoinSet::new();
        for (i, agent) in self.agents.iter().enumerate() {
            let mut state = agent.subscribe();
            watches.spawn(async move {
                let settled = state
                    .wait_for(|s| match s {
                        AgentState::Online { .. } => true,
                        AgentState::Retrying { rejection, .. } => {
                            !matches!(rejection, None | Some(Rejection::RetryLater { .. }))
                        }
                        _ => false,
                    })
                    .await
                    .map(|s| s.clone());
                (i, since.elapsed(), settled)
            });
        }
        let mut times = vec![Duration::ZERO; self.agents.len()];
        let waited = tokio::time::timeout_at(since + deadline, async {
            while let Some(joined) = watches.join_next().await {
                let (i, elapsed, settled) = joined?;
                match settled {
                    Ok(AgentState::Online { .. }) => times[i] = elapsed,
                    Ok(other) => bail!("agent {i} was refused: {other:?}"),
                    Err(_) => bail!("agent {i} stopped"),
                }
            }
            anyhow::Ok(())
        })
        .await;
        match waited {
            Ok(result) => result.map(|()| times),
            Err(_) => {
                let online = self.ports().iter().filter(|p| p.is_some()).count();
                let stuck = self
                    .agents
                    .iter()
                    .map(|a| a.subscribe().borrow().clone())
                    .find(|s| !matches!(s, AgentState::Online { .. }));
                bail!(
                    "{online} of {} agents online after {deadline:?}; one is {stuck:?}",
                    self.agents.len()
                )
            }
        }
    }

    /// Waits until no agent is online (after the relay went away).
    pub async fn all_offline(&self, deadline: Duration) -> anyhow::Result<()> {
        for agent in &self.agents {
            let mut state = agent.subscribe();
            let offline = state.wait_for(|s| !matches!(s, AgentState::Online { .. }));
            if tokio::time::timeout(deadline, offline).await.is_err() {
                bail!("an agent stayed online for {deadline:?} after its relay went");
            }
        }
        Ok(())
    }

    /// Stops every agent and waits for them.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
