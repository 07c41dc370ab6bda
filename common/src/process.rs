//! What both binaries do the same way at start and stop: logging and signals.

use std::io::IsTerminal;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Logs to stderr, with colours only on a terminal. `filter` is a tracing filter such as
/// `info` or `relay=debug,info`; an invalid one falls back to `info` with a warning.
pub fn init_logging(filter: &str) {
    let (filter, problem) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new("info"),
            Some(format!(
                "log filter {filter:?} is invalid ({e}); using info"
            )),
        ),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    }
}

/// A filter at `level` for this project's crates and at most `info` for libraries, so
/// `DEBUG` shows what the agent does, not every TLS record.
pub fn project_filter(level: tracing::Level, crates: &[&str]) -> String {
    if level <= tracing::Level::INFO {
        return level.to_string().to_lowercase();
    }
    let level = level.to_string().to_lowercase();
    let mut parts: Vec<String> = crates.iter().map(|c| format!("{c}={level}")).collect();
    parts.push("info".into());
    parts.join(",")
}

/// Cancels `token` on SIGINT (Ctrl-C) or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("signal received; shutting down");
    token.cancel();
}

/// Checks that the system gives random numbers, which TLS, QUIC and backoff jitter
/// need; without them the first handshake would abort the process.
///
/// A static glibc binary cannot find glibc's `getrandom` (it is looked up with
/// `dlsym`), so it reads `/dev/urandom` once `/dev/random` is readable. A camera root
/// without those device nodes gets this error instead of an abort.
pub fn check_randomness() -> Result<(), String> {
    use rand::TryRngCore;
    let mut probe = [0u8; 16];
    rand::rngs::OsRng.try_fill_bytes(&mut probe).map_err(|e| {
        format!(
            "this system gives no random numbers ({e}); TLS and QUIC need them. A static \
             build reads /dev/random and /dev/urandom: check that both exist as character \
             devices (mknod /dev/random c 1 8; mknod /dev/urandom c 1 9)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_for_our_crates_only() {
        assert_eq!(project_filter(tracing::Level::WARN, &["agent"]), "warn");
        assert_eq!(
            project_filter(tracing::Level::DEBUG, &["agent", "common"]),
            "agent=debug,common=debug,info"
        );
    }
}
