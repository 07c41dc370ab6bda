//! The agent's QUIC tunnel: dial the relay, prove the registration, then serve every
//! stream the relay opens by connecting it to the camera.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use common::{
    protocol::{
        read_frame, write_frame, DataHello, HelloReply, Registered, StreamOpen, StreamStatus,
        SERVICE_RTSP,
    },
    splice::splice,
    tls,
};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{config::AgentConfig, resolve::resolve, stats::Stats, SessionError};

/// Time the relay has to send a stream's header after opening it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A live tunnel to the relay.
#[derive(Debug)]
pub(crate) struct Tunnel {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// Dials the relay's QUIC endpoint named in `registered` and proves the registration.
pub(crate) async fn dial(
    config: &AgentConfig,
    registered: &Registered,
) -> Result<Tunnel, SessionError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| SessionError::Tunnel(format!("{what}: {e}"));
    let relay = resolve(
        &config.relay.host,
        registered.quic_port,
        &config.fallback_nameservers,
    )
    .await
    .map_err(SessionError::Tunnel)?
    .into_iter()
    .next()
    .ok_or_else(|| SessionError::Tunnel(format!("{} has no address", config.relay.host)))?;
    // A fresh UDP socket per session: after a network change the old port may be dead.
    let local: SocketAddr = match relay {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint =
        quinn::Endpoint::client(local).map_err(|e| fail("cannot open a UDP socket", &e))?;
    let client = tls::quic_client_config(
        registered.cert_sha256,
        config.security.identity.as_deref(),
        config.max_streams,
        config.quic_keepalive,
    )
    .map_err(|e| fail("TLS setup", &e))?;
    endpoint.set_default_client_config(client);

    let handshake = async {
        let conn = endpoint
            .connect(relay, &config.relay.host)
            .map_err(|e| fail(&format!("cannot dial {relay}"), &e))?
            .await
            .map_err(|e| fail(&format!("QUIC handshake with {relay} failed"), &e))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| fail("cannot open the hello stream", &e))?;
        let hello = DataHello {
            agent_id: config.agent_id.clone(),
            session_key: registered.session_key,
        };
        write_frame(&mut send, &hello)
            .await
            .map_err(|e| fail("hello", &e))?;
        let _ = send.finish();
        match read_frame(&mut recv)
            .await
            .map_err(|e| fail("hello reply", &e))?
        {
            HelloReply::Accepted => Ok(conn),
            HelloReply::Refused(why) => Err(SessionError::Tunnel(format!(
                "the relay refused the tunnel: {why}"
            ))),
        }
    };
    let conn = tokio::time::timeout(config.connection_timeout, handshake)
        .await
        .map_err(|_| {
            SessionError::Tunnel(format!(
                "no QUIC tunnel to {relay} within {:?}; is UDP port {} reachable?",
                config.connection_timeout, registered.quic_port
            ))
        })??;
    Ok(Tunnel { endpoint, conn })
}

impl Tunnel {
    /// Round-trip time of the tunnel.
    pub(crate) fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Serves the relay's streams until the tunnel ends; returns why it ended.
    pub(crate) async fn serve(
        &self,
        config: &Arc<AgentConfig>,
        stats: &Arc<Stats>,
        tracker: &TaskTracker,
    ) -> SessionError {
        loop {
            let (send, recv) = match self.conn.accept_bi().await {
                Ok(stream) => stream,
                Err(e) => return SessionError::Lost(format!("tunnel closed: {e}")),
            };
            let span = tracing::info_span!("stream", id = %send.id(), conn = tracing::field::Empty);
            let (config, stats) = (config.clone(), stats.clone());
            tracker
                .spawn(async move { stream(send, recv, &config, &stats).await }.instrument(span));
        }
    }

    /// Closes the tunnel and its UDP socket.
    pub(crate) fn close(self) {
        self.conn
            .close(quinn::VarInt::from_u32(0), b"agent closing");
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"agent closing");
    }
}

/// One stream: read the header, connect to the camera, answer, splice.
async fn stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    config: &AgentConfig,
    stats: &Stats,
) {
    let open: StreamOpen = match tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => return tracing::warn!("bad stream header from the relay: {e}"),
        Err(_) => {
            return tracing::warn!("no stream header from the relay within {HEADER_TIMEOUT:?}")
        }
    };
    tracing::Span::current().record("conn", open.connection_id);
    let target = match target_of(&open, config) {
        Ok(target) => target,
        Err(status) => {
            tracing::warn!("stream refused: {status}");
            return answer_and_finish(send, &status).await;
        }
    };
    let tcp = match tokio::time::timeout(config.connection_timeout, TcpStream::connect(target))
        .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let status = match e.kind() {
                    io::ErrorKind::ConnectionRefused => {
                        StreamStatus::Refused(format!(
                    "nothing listens on {target} ({e}); is the camera's RTSP server up, and streaming.rtsp_port right?"
                ))
                    }
                    _ => StreamStatus::Failed(format!("connecting to {target}: {e}")),
                };
            tracing::warn!("camera connection failed: {status}");
            return answer_and_finish(send, &status).await;
        }
        Err(_) => {
            let status = StreamStatus::TimedOut(format!(
                "{target} did not accept within {:?}",
                config.connection_timeout
            ));
            tracing::warn!("camera connection failed: {status}");
            return answer_and_finish(send, &status).await;
        }
    };
    // Camera traffic is paced small writes; Nagle would hold them back.
    let _ = tcp.set_nodelay(true);
    if let Err(e) = write_frame(&mut send, &StreamStatus::Connected).await {
        return tracing::debug!("relay went away before the stream started: {e}");
    }
    stats.active_streams.fetch_add(1, Ordering::Relaxed);
    let result = splice(tcp, recv, send, &stats.bytes).await;
    stats.active_streams.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(t) => tracing::debug!(
            to_camera = t.to_tcp,
            from_camera = t.from_tcp,
            "stream done"
        ),
        Err(e) => tracing::debug!("stream ended: {e}"),
    }
}

/// Where a stream goes: only to targets this agent's own config names. The relay names
/// a service, never an address, so a compromised relay cannot use the agent to reach
/// anything else on the camera's network.
fn target_of(open: &StreamOpen, config: &AgentConfig) -> Result<SocketAddr, StreamStatus> {
    if open.service == SERVICE_RTSP {
        Ok(config.rtsp_target)
    } else {
        Err(StreamStatus::NotAllowed(format!(
            "this agent offers only {SERVICE_RTSP:?} ({}), not {:?}",
            config.rtsp_target, open.service
        )))
    }
}

async fn answer_and_finish(mut send: quinn::SendStream, status: &StreamStatus) {
    if write_frame(&mut send, status).await.is_ok() {
        let _ = send.finish();
        // Let the status reach the relay before the stream is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_go_only_to_the_configured_camera() {
        let config = AgentConfig::parse(
            r#"{"agent": {"agent_id": "a", "tunnel_server_url": "ws://r", "tunnel_server_token": "t"}, "streaming": {"rtsp_port": 8554}}"#,
            "x",
        )
        .unwrap();
        let open = |service: &str| StreamOpen {
            service: service.into(),
            connection_id: 1,
        };
        assert_eq!(
            target_of(&open(SERVICE_RTSP), &config),
            Ok("127.0.0.1:8554".parse().unwrap())
        );
        for service in ["ssh", "192.168.1.1:80", ""] {
            let refusal = target_of(&open(service), &config).unwrap_err();
            assert!(
                matches!(&refusal, StreamStatus::NotAllowed(why) if why.contains("only")),
                "{refusal:?}"
            );
        }
    }
}
