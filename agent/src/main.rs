//! `camera-agent`: read the config, run until a signal.

use std::{os::unix::process::CommandExt, path::PathBuf, process::ExitCode};

use agent::{config::DEFAULT_CONFIG_PATH, Agent, AgentConfig, Exit, RestartMode};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Runs inside the IP camera: dials out to the relay and carries its RTSP sessions.
#[derive(Parser, Debug)]
#[command(name = "camera-agent", version = env!("CAMERA_AGENT_VERSION_LINE"))]
struct Cli {
    /// Config file, in the JSON schema of the earlier camera agent.
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log filter overriding `agent.log_level`, e.g. `debug` or `agent=debug,info`.
    #[arg(long, env = "AGENT_LOG")]
    log: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match AgentConfig::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("camera-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = cli.log.clone().unwrap_or_else(|| {
        common::process::project_filter(config.log_level, &["camera_agent", "agent", "common"])
    });
    common::process::init_logging(&filter);
    if let Err(e) = common::process::check_randomness() {
        tracing::error!("{e}");
        return ExitCode::from(1);
    }
    if !config.ignored.is_empty() {
        tracing::info!(
            "{}: ignoring settings of the earlier agent that this one does not use: {}",
            cli.config.display(),
            config.ignored.join(", ")
        );
    }
    for note in &config.notes {
        tracing::info!("{}: {note}", cli.config.display());
    }
    tracing::info!(
        agent = %config.agent_id,
        version = agent::VERSION,
        target = agent::TARGET,
        camera = %config.rtsp_target,
        "camera-agent starting"
    );
    let security = &config.security;
    let plain: Vec<&str> = config
        .relays
        .iter()
        .map(|r| r.url.as_str())
        .filter(|url| !url.starts_with("wss://"))
        .collect();
    if plain.is_empty() {
        tracing::info!(
            relay_checked_against = %security.trust_source,
            client_certificate = security.identity.is_some(),
            "control link is TLS (wss://)"
        );
    } else {
        tracing::warn!(
            client_certificate = security.identity.is_some(),
            relays = %plain.join(", "),
            "control link is plain ws://: the token crosses the network readable by anyone \
             on the path, and the relay is not verified; use wss:// outside a trial"
        );
    }

    let agent = Agent::new(config);
    let shutdown = CancellationToken::new();
    tokio::spawn(common::process::cancel_on_signal(shutdown.clone()));
    match agent.run(shutdown).await {
        Exit::Stopped => ExitCode::SUCCESS,
        Exit::Restart => restart(agent.config().restart),
    }
}

/// Exit status that asks a supervisor to start the agent again (EX_TEMPFAIL).
const EXIT_RESTART: u8 = 75;

/// Restarts the agent as its config says: re-executes this binary with the same
/// arguments, or exits for a supervisor (also the fallback if exec fails).
fn restart(mode: RestartMode) -> ExitCode {
    if mode == RestartMode::Exec {
        match std::env::current_exe() {
            Ok(exe) => {
                tracing::info!("restarting: exec {}", exe.display());
                let e = std::process::Command::new(&exe)
                    .args(std::env::args_os().skip(1))
                    .exec();
                tracing::error!(
                    "cannot re-execute {}: {e}; exiting for a supervisor",
                    exe.display()
                );
            }
            Err(e) => {
                tracing::error!("cannot find the agent's own binary: {e}; exiting for a supervisor")
            }
        }
    }
    tracing::info!("exiting with status {EXIT_RESTART} so the supervisor restarts the agent");
    ExitCode::from(EXIT_RESTART)
}
