//! The data plane's entry points: the QUIC endpoint, where agents dial in, prove which
//! registration they belong to, and their connection becomes that camera's tunnel; and
//! the TCP fallback (`/tunnel/data`, see [`common::mux`]) for agents whose UDP is
//! blocked, where the same hello makes a WebSocket the camera's fallback link.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Extension,
};
use common::{
    mux::{self, RelayEnd, WsBytes},
    protocol::{read_frame, tunnel_close, write_frame, DataHello, HelloReply},
    tls::peer_common_name,
};
use hyper_util::rt::TokioIo;
use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use tokio::{
    io::AsyncWriteExt as _,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_tungstenite::{
    tungstenite::{
        handshake::derive_accept_key,
        protocol::{Role, WebSocketConfig},
    },
    WebSocketStream,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{config::Limits, http::ClientCertificate, registry::AgentSession, Registry, Shared};

/// How long a refused agent gets to read the refusal before the connection closes.
const REPLY_LINGER: Duration = Duration::from_secs(1);

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
    let session = match check_hello(registry, &hello, certified.as_deref()) {
        Ok(session) => session,
        Err(why) => {
            let _ = write_frame(&mut send, &HelloReply::Refused(why.clone())).await;
            let _ = send.finish();
            // Let the reply arrive before the close, which would discard it (bounded:
            // the close carries the reason too).
            let _ = tokio::time::timeout(REPLY_LINGER, send.stopped()).await;
            conn.close(VarInt::from_u32(tunnel_close::REFUSED), why.as_bytes());
            anyhow::bail!(why);
        }
    };
    write_frame(&mut send, &HelloReply::Accepted).await?;
    send.finish()?;

    tracing::info!(agent = %session.id, rtt_ms = conn.rtt().as_millis() as u64, "tunnel up");
    if let Some(old) = session.attach_tunnel(conn.clone()) {
        old.close(
            VarInt::from_u32(tunnel_close::SUPERSEDED),
            b"replaced by a newer tunnel",
        );
    }
    tokio::select! {
        _ = session.cancelled() => {
            let why = session
                .close_reason()
                .map_or_else(|| "session ended".to_string(), |r| r.to_string());
            conn.close(VarInt::from_u32(tunnel_close::SESSION_ENDED), why.as_bytes());
        }
        reason = conn.closed() => {
            tracing::info!(agent = %session.id, "tunnel closed: {reason}");
        }
    }
    session.detach_tunnel(&conn);
    Ok(())
}

/// Whether `hello` proves a live registration: its session key, and the client
/// certificate (`certified`, its common name) if the registration had one. The refusal
/// is meant for the agent's log.
fn check_hello(
    registry: &Registry,
    hello: &DataHello,
    certified: Option<&str>,
) -> Result<Arc<AgentSession>, String> {
    let Some(session) = registry
        .get(&hello.agent_id)
        .filter(|s| s.key_matches(&hello.session_key))
    else {
        return Err(format!(
            "no live registration of agent {:?} with this session key",
            hello.agent_id
        ));
    };
    match certified {
        Some(name) if name != session.id => Err(format!(
            "the client certificate is for agent {name:?}, not {:?}",
            session.id
        )),
        None if session.certified => Err(format!(
            "agent {:?} registered with a client certificate but its data link has none",
            session.id
        )),
        _ => Ok(session),
    }
}

/// The TCP fallback's WebSocket upgrade (`/tunnel/data`, `/agent/{id}/data`). Done here
/// rather than with axum's `WebSocketUpgrade` so that the link is a tungstenite socket,
/// the same type as on the agent's end ([`WsBytes`]).
pub(crate) async fn fallback(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(cert): Extension<ClientCertificate>,
    State(shared): State<Arc<Shared>>,
    mut request: Request,
) -> Response {
    let key = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| {
            request
                .headers()
                .get(header::UPGRADE)
                .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"))
        })
        .map(|key| derive_accept_key(key.as_bytes()));
    let Some(accept) = key else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this is the agents' data link: a WebSocket upgrade is expected\n",
        )
            .into_response();
    };
    let upgrade = hyper::upgrade::on(&mut request);
    let span = tracing::info_span!("fallback", %peer, agent = tracing::field::Empty);
    let task = {
        let shared = shared.clone();
        async move {
            let upgraded = match upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => return tracing::warn!("fallback link upgrade failed: {e}"),
            };
            let config = WebSocketConfig::default()
                .max_message_size(Some(mux::MAX_MESSAGE))
                .max_frame_size(Some(mux::MAX_MESSAGE))
                .read_buffer_size(mux::READ_BUFFER);
            let socket = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            if let Err(e) = fallback_link(WsBytes::new(socket), &shared, cert).await {
                tracing::warn!("fallback link refused: {e:#}");
            }
        }
        .instrument(span)
    };
    shared.tracker.spawn(task);
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Checks a fallback link's hello and keeps the link as the camera's fallback while
/// it lives.
async fn fallback_link<S>(
    mut link: WsBytes<S>,
    shared: &Shared,
    cert: ClientCertificate,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let timeout = shared.limits.handshake_timeout;
    let hello: DataHello = tokio::time::timeout(timeout, read_frame(&mut link))
        .await
        .with_context(|| format!("no hello within {timeout:?} (limits.handshake_timeout_secs)"))?
        .context("bad hello")?;
    tracing::Span::current().record("agent", hello.agent_id.as_str());
    let session = match check_hello(&shared.registry, &hello, cert.0.as_deref()) {
        Ok(session) => session,
        Err(why) => {
            let _ = write_frame(&mut link, &HelloReply::Refused(why.clone())).await;
            let _ = tokio::time::timeout(REPLY_LINGER, link.shutdown()).await;
            anyhow::bail!(why);
        }
    };
    write_frame(&mut link, &HelloReply::Accepted).await?;
    link.flush().await?;

    tracing::info!("fallback link up: the camera's streams ride its TCP connection");
    if let Some(shard) = session.shard().filter(|shard| shard.index > 0) {
        // The likeliest cause when other cameras have QUIC: a firewall that lets
        // through the first shard's port only.
        tracing::warn!(
            "the camera could not reach its data-plane shard {} on UDP port {}; if other \
             cameras reach theirs, open every shard's port (the QUIC port and the \
             data_shards - 1 after it) for UDP, or set data_shards = 1",
            shard.index,
            shard.port
        );
    }
    let (end, opener) = RelayEnd::new(link);
    if let Some(stale) = session.attach_fallback(opener.clone()) {
        stale.close(
            VarInt::from_u32(tunnel_close::SUPERSEDED),
            b"the agent cannot reach this tunnel and carries its streams over TCP",
        );
    }
    tokio::select! {
        _ = session.cancelled() => {}
        ended = end.drive() => match ended {
            Ok(()) => tracing::info!("fallback link closed"),
            Err(e) => tracing::info!("fallback link lost: {e}"),
        },
    }
    session.detach_fallback(&opener);
    Ok(())
}
