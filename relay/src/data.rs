//! The QUIC endpoint: agents dial in, prove which registration they belong to, and
//! their connection becomes that camera's tunnel.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use common::protocol::{read_frame, write_frame, DataHello, HelloReply};
use common::tls::peer_common_name;
use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{config::Limits, Registry};

/// Application close code: the hello was refused.
const CLOSE_REFUSED: u32 = 1;
/// How long a refused agent gets to read the refusal before the connection closes.
const REPLY_LINGER: Duration = Duration::from_secs(1);
/// Application close code: the agent's session ended.
const CLOSE_SESSION_ENDED: u32 = 2;

/// Accepts QUIC connections until `shutdown`; at most `limits.max_pending_handshakes`
/// handshakes (with their hellos) at once, further ones are refused at once.
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    registry: Arc<Registry>,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let handshakes = Arc::new(Semaphore::new(limits.max_pending_handshakes));
    let mut refused_logged = false;
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            if !refused_logged {
                tracing::warn!(
                    "refusing QUIC connections: {} handshakes already in flight (limits.max_pending_handshakes)",
                    limits.max_pending_handshakes
                );
                refused_logged = true;
            }
            incoming.refuse();
            continue;
        };
        refused_logged = false;
        let span = tracing::info_span!("tunnel", peer = %incoming.remote_address());
        let registry = registry.clone();
        let timeout = limits.handshake_timeout;
        tracker.spawn(
            async move {
                if let Err(e) = tunnel(incoming, &registry, timeout, permit).await {
                    tracing::warn!("tunnel refused: {e:#}");
                }
            }
            .instrument(span),
        );
    }
}

/// Handshakes one agent connection and keeps it as the camera's tunnel while it lives.
async fn tunnel(
    incoming: quinn::Incoming,
    registry: &Registry,
    handshake_timeout: Duration,
    handshake: OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let (conn, hello, mut send) = tokio::time::timeout(handshake_timeout, async {
        let conn = incoming.await.context("QUIC handshake failed")?;
        let (send, mut recv) = conn.accept_bi().await.context("no hello stream")?;
        let hello: DataHello = read_frame(&mut recv).await.context("bad hello")?;
        anyhow::Ok((conn, hello, send))
    })
    .await
    .with_context(|| {
        format!("no QUIC handshake and hello within {handshake_timeout:?} (limits.handshake_timeout_secs)")
    })??;
    drop(handshake);

    let certified = conn
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(|leaf| peer_common_name(leaf)));
    let session = registry
        .get(&hello.agent_id)
        .filter(|s| s.key_matches(&hello.session_key));
    let refusal = match (&session, &certified) {
        (None, _) => Some(format!(
            "no live registration of agent {:?} with this session key",
            hello.agent_id
        )),
        (Some(s), Some(name)) if *name != s.id => Some(format!(
            "the client certificate is for agent {name:?}, not {:?}",
            s.id
        )),
        (Some(s), None) if s.certified => Some(format!(
            "agent {:?} registered with a client certificate but its QUIC connection has none",
            s.id
        )),
        _ => None,
    };
    let (Some(session), None) = (session, refusal.clone()) else {
        let why = refusal.unwrap_or_default();
        let _ = write_frame(&mut send, &HelloReply::Refused(why.clone())).await;
        let _ = send.finish();
        // Let the reply arrive before the close, which would discard it (bounded: the
        // close carries the reason too).
        let _ = tokio::time::timeout(REPLY_LINGER, send.stopped()).await;
        conn.close(VarInt::from_u32(CLOSE_REFUSED), why.as_bytes());
        anyhow::bail!(why);
    };
    write_frame(&mut send, &HelloReply::Accepted).await?;
    send.finish()?;

    tracing::info!(agent = %session.id, rtt_ms = conn.rtt().as_millis() as u64, "tunnel up");
    if let Some(old) = session.attach_tunnel(conn.clone()) {
        old.close(
            VarInt::from_u32(CLOSE_SESSION_ENDED),
            b"replaced by a newer tunnel",
        );
    }
    tokio::select! {
        _ = session.cancelled() => {
            let why = session
                .close_reason()
                .map_or_else(|| "session ended".to_string(), |r| r.to_string());
            conn.close(VarInt::from_u32(CLOSE_SESSION_ENDED), why.as_bytes());
        }
        reason = conn.closed() => {
            tracing::info!(agent = %session.id, "tunnel closed: {reason}");
        }
    }
    session.detach_tunnel(&conn);
    Ok(())
}
