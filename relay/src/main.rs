//! `relay`: parse the command line, load the config, run until a signal.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use common::Secret;
use relay::{config, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

/// Makes IP cameras behind NAT reachable as local RTSP servers.
///
/// Quick start: `relay --port 8080 --tunnel-port 8554 --token SECRET`.
/// Full form: `relay --config relay.toml` (see deploy/relay.toml).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Relay config file (TOML). Without it, the quick-start flags apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address agents connect to: TCP for the control link, UDP for QUIC. `--host` is
    /// the earlier server's name for it.
    #[arg(
        long,
        alias = "host",
        default_value = "0.0.0.0",
        conflicts_with = "config"
    )]
    bind: std::net::IpAddr,
    /// Port agents connect to (same number for TCP and UDP).
    #[arg(long, default_value_t = config::DEFAULT_PORT, conflicts_with = "config")]
    port: u16,
    /// First camera port on 127.0.0.1; cameras get ports from here up (100 of them).
    #[arg(long, default_value_t = config::DEFAULT_CAMERA_PORT, conflicts_with = "config")]
    tunnel_port: u16,
    /// Data-plane threads, each with a QUIC endpoint on --port and the ports after it
    /// (open them for UDP): a number, or `auto` for one per core.
    #[arg(long, default_value = "1", value_parser = parse_shards, conflicts_with = "config")]
    data_shards: usize,
    /// Also serve every camera on this one port, as rtsp://127.0.0.1:PORT/<agent-id>/…
    #[arg(long, conflicts_with = "config")]
    shared_port: Option<u16>,
    /// Bearer token for the operator API (/agents, /streams, /tunnels…); without one
    /// it answers only to clients on this host.
    #[arg(
        long,
        env = "RELAY_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "config"
    )]
    admin_token: Option<String>,
    /// Let anyone read /metrics (like /health), not only operators.
    #[arg(long, conflicts_with = "config")]
    public_metrics: bool,
    /// Token every agent must present (quick start).
    #[arg(
        long,
        env = "RELAY_TOKEN",
        hide_env_values = true,
        conflicts_with = "config"
    )]
    token: Option<String>,
    /// Log filter, e.g. `info` or `relay=debug,info`.
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    common::process::init_logging(&cli.log);

    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = run(config).await {
        tracing::error!("{e:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn load_config(cli: &Cli) -> anyhow::Result<RelayConfig> {
    if let Some(path) = &cli.config {
        let config = RelayConfig::from_file(path)?;
        let mut plain: Vec<&str> = config
            .auth
            .agents
            .iter()
            .filter(|(_, a)| matches!(a.token, Some(config::Token::Plain(_))))
            .map(|(id, _)| id.as_str())
            .collect();
        if !plain.is_empty() {
            plain.sort_unstable();
            tracing::warn!(
                "{}: tokens in the clear for {}; anyone who reads the file can register as \
                 those cameras. Store token_hash instead (`certs token --id <id>`)",
                path.display(),
                plain.join(", ")
            );
        }
        if config.tls.identity.is_none() {
            tracing::warn!(
                "no [tls] certificate: the control link is plain ws://, so tokens cross the \
                 network in the clear and agents cannot verify this relay"
            );
        }
        return Ok(config);
    }
    let Some(token) = &cli.token else {
        anyhow::bail!(
            "no agent could register: give --token SECRET (or RELAY_TOKEN), or --config relay.toml"
        );
    };
    tracing::warn!(
        "quick-start mode: one shared token for every agent id (any holder can register \
         as any camera, and take over a live camera's id), plain ws:// control link (the \
         token crosses the network in the clear and agents cannot verify this relay); \
         use --config with per-agent credentials and [tls] for anything beyond a trial \
         (docs/security.md)"
    );
    let mut config = RelayConfig::quick(
        SocketAddr::new(cli.bind, cli.port),
        cli.tunnel_port,
        Secret::new(token.clone()),
    )?;
    config.data_shards = cli.data_shards;
    let mut config = match cli.shared_port {
        Some(port) => config.with_shared_port(port)?,
        None => config,
    };
    config.api = config::ApiConfig {
        admin_token: cli
            .admin_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        public_metrics: cli.public_metrics,
    };
    Ok(config)
}

/// `--data-shards`: 1 to [`config::MAX_DATA_SHARDS`], or `auto`.
fn parse_shards(text: &str) -> Result<usize, String> {
    match text {
        "auto" => Ok(config::cores()),
        _ => text
            .parse()
            .ok()
            .filter(|n| (1..=config::MAX_DATA_SHARDS).contains(n))
            .ok_or_else(|| {
                format!(
                    "a number from 1 to {}, or auto (one per core)",
                    config::MAX_DATA_SHARDS
                )
            }),
    }
}

async fn run(config: RelayConfig) -> anyhow::Result<()> {
    let relay = Relay::bind(config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(common::process::cancel_on_signal(shutdown.clone()));
    relay.run(shutdown).await
}
