//! The relay's TCP listener: the agents' WebSocket control link and the HTTP endpoints,
//! over TLS when the relay has a certificate. The accept loop is the relay's own (not
//! `axum::serve`) so that everything a stranger can do before a request is read is
//! bounded: TLS handshakes in flight (`limits.max_pending_handshakes`), the time a
//! handshake may take (`limits.handshake_timeout_secs`), and the time to send request
//! headers (`limits.registration_timeout_secs`), which defeats slowloris.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::ConnectInfo, Router};
use common::tls::peer_common_name;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt as _;

use crate::config::Limits;

/// Pause after an accept error (out of file descriptors, say) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The verified client certificate of a connection, put into every request's
/// extensions: its subject common name (an agent id), or `None` without one.
#[derive(Debug, Clone)]
pub(crate) struct ClientCertificate(pub(crate) Option<String>);

/// Serves `app` on `listener` until `shutdown`, over TLS with `tls` if given.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(limits.max_pending_handshakes));
    let mut refused_logged = false;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accepting on the control listener failed: {e}; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            // Logged once per burst, not once per connection: a flood must not flood
            // the log too.
            if !refused_logged {
                tracing::warn!(
                    "refusing connections: {} handshakes already in flight (limits.max_pending_handshakes)",
                    limits.max_pending_handshakes
                );
                refused_logged = true;
            }
            drop(tcp);
            continue;
        };
        refused_logged = false;
        let (app, tls, limits, shutdown) =
            (app.clone(), tls.clone(), limits.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tls {
                None => {
                    drop(permit);
                    connection(tcp, peer, None, app, &limits, shutdown).await;
                }
                Some(acceptor) => {
                    let accepted =
                        tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                    drop(permit);
                    let stream = match accepted {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, "TLS handshake on the control listener failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(
                                %peer,
                                "TLS handshake not done within {:?} (limits.handshake_timeout_secs); closed",
                                limits.handshake_timeout
                            );
                            return;
                        }
                    };
                    let certified = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| peer_common_name(leaf));
                    connection(stream, peer, certified, app, &limits, shutdown).await;
                }
            }
        });
    }
}

/// Serves HTTP/1.1 (and WebSocket upgrades) on one connection.
async fn connection<S>(
    io: S,
    peer: SocketAddr,
    certified: Option<String>,
    app: Router,
    limits: &Limits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request
            .extensions_mut()
            .insert(ClientCertificate(certified.clone()));
        app.clone().oneshot(request.map(axum::body::Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.registration_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            tracing::warn!(
                %peer,
                "no complete request headers within {:?} (limits.registration_timeout_secs); closed",
                limits.registration_timeout
            );
        } else {
            tracing::debug!(%peer, "HTTP connection ended: {e}");
        }
    }
}
