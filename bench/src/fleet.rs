//! Many idle cameras in one process (`bench fleet`): real agents — the agent crate's
//! own session loop, control link, QUIC connection and heartbeats — sharing one
//! runtime, so a thousand cameras cost a thousand sessions, not a thousand processes.

use std::{sync::Arc, time::Duration};

use agent::{config::AgentConfig, Agent, AgentState};
use anyhow::{bail, Context as _};
use common::protocol::Rejection;
use tokio_util::sync::CancellationToken;

/// What each camera of the fleet is told.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The relay's control URL (`wss://…/tunnel`).
    pub relay_url: String,
    /// The shared registration token.
    pub token: String,
    /// The relay certificate's SHA-256 fingerprint, pinned by every agent.
    pub fingerprint: String,
    /// How many cameras.
    pub count: usize,
    /// How long to wait for the whole fleet to come online.
    pub deadline: Duration,
}

/// Starts `count` agents, prints `READY <seconds to all online>` once every one is
/// online, then keeps them until the process is killed.
pub async fn run(config: FleetConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let mut agents = Vec::with_capacity(config.count);
    for i in 0..config.count {
        let json = serde_json::json!({
            "agent": {
                "agent_id": format!("fleet-{i}"),
                "tunnel_server_url": config.relay_url,
                "tunnel_server_token": config.token,
            },
            "security": { "relay_fingerprint": config.fingerprint },
            "tunnel": { "tunnel_port": 0 },
        });
        let agent = Arc::new(Agent::new(AgentConfig::parse(
            &json.to_string(),
            "bench fleet",
        )?));
        let (runner, token) = (agent.clone(), shutdown.clone());
        tokio::spawn(async move { runner.run(token).await });
        agents.push(agent);
    }
    for (i, agent) in agents.iter().enumerate() {
        let mut state = agent.subscribe();
        // Online, or refused for good (a refusal other than "retry later" repeats).
        let settled = tokio::time::timeout_at(
            started + config.deadline,
            state.wait_for(|s| match s {
                AgentState::Online { .. } => true,
                AgentState::Retrying { rejection, .. } => {
                    !matches!(rejection, None | Some(Rejection::RetryLater { .. }))
                }
                _ => false,
            }),
        )
        .await
        .is_ok_and(|waited| waited.is_ok());
        let now = state.borrow().clone();
        if !settled || !matches!(now, AgentState::Online { .. }) {
            let online = agents
                .iter()
                .filter(|a| matches!(*a.subscribe().borrow(), AgentState::Online { .. }))
                .count();
            bail!(
                "{online} of {} cameras online after {:.1} s; fleet-{i} is {now:?}",
                config.count,
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!("READY {:.3}", started.elapsed().as_secs_f64());
    // Kept until killed, as idle cameras are.
    std::future::pending::<()>().await;
    Ok(())
}

/// Parses `READY <seconds>`.
pub fn parse_ready(line: &str) -> anyhow::Result<Duration> {
    let secs: f64 = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad fleet READY line {line:?}"))?;
    Ok(Duration::from_secs_f64(secs))
}
