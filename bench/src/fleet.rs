//! Many idle cameras in one process (`bench fleet`), an [`e2e::Fleet`] of real agents.

use std::time::Duration;

use agent::config::AgentConfig;
use anyhow::Context as _;

/// What each camera of the fleet is told.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The relays' control URLs (`wss://…/tunnel`), as each camera lists them.
    pub relay_urls: Vec<String>,
    /// Where every camera's RTSP server is (the bench target), if anywhere.
    pub target: Option<std::net::SocketAddr>,
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
    let started = tokio::time::Instant::now();
    let configs = (0..config.count)
        .map(|i| {
            let mut json = serde_json::json!({
                "agent": {
                    "agent_id": format!("fleet-{i}"),
                    "tunnel_server_url": config.relay_urls,
                    "tunnel_server_token": config.token,
                },
                "security": { "relay_fingerprint": config.fingerprint },
                "tunnel": { "tunnel_port": 0 },
            });
            if let Some(target) = config.target {
                json["streaming"] =
                    serde_json::json!({ "rtsp_host": target.ip(), "rtsp_port": target.port() });
            }
            AgentConfig::parse(&json.to_string(), "bench fleet")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fleet = e2e::Fleet::start(configs);
    let times = fleet.online_times(started, config.deadline).await?;
    let last = times.iter().max().copied().unwrap_or_default();
    println!("READY {:.3}", last.as_secs_f64());
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
