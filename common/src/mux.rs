//! The data plane's TCP fallback, for cameras whose network blocks UDP: the agent
//! opens a second WebSocket to the relay (its control URL with
//! [`FALLBACK_PATH_SUFFIX`](crate::protocol::FALLBACK_PATH_SUFFIX) appended, over the
//! same TCP port and TLS), proves its registration with the same hello as on QUIC,
//! and then the relay opens one yamux stream per Watcher connection on it, exactly as
//! it opens QUIC streams on the tunnel. yamux runs over the WebSocket's binary messages
//! ([`WsBytes`]); the relay is yamux's client (it opens every stream), the agent its
//! server.
//!
//! A yamux connection only moves bytes while it is polled: [`RelayEnd::drive`] and
//! [`AgentEnd::accept`] must be awaited for as long as the link is wanted.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{mpsc, oneshot},
};
use tokio_tungstenite::{
    tungstenite::{Bytes, Message},
    WebSocketStream,
};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt as _};

use crate::stream::{mux_halves, RecvHalf, SendHalf};

/// Largest WebSocket message the fallback writes: a yamux data frame (16 KiB of
/// payload and its 12-byte header) fits, with room to coalesce small frames.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Read buffer of a fallback WebSocket (the data flows through it; unlike the control
/// link's, it is not an idle cost: a camera has a fallback link only while in use).
pub const READ_BUFFER: usize = 64 * 1024;

/// Streams the relay may have open at once on one fallback link.
const MAX_STREAMS: usize = 256;

type Connection<S> = yamux::Connection<Compat<WsBytes<S>>>;

fn config() -> yamux::Config {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_STREAMS);
    config
}

/// A WebSocket seen as a byte stream: bytes written go out as binary messages (small
/// writes coalesced until a flush), binary messages read come in as bytes. A close or
/// the end of the socket is the end of the stream.
#[derive(Debug)]
pub struct WsBytes<S> {
    socket: WebSocketStream<S>,
    /// The unread rest of the last message received.
    inbound: Bytes,
    /// Bytes written and not yet sent.
    outbound: Vec<u8>,
}

impl<S> WsBytes<S> {
    /// Wraps an open WebSocket.
    pub fn new(socket: WebSocketStream<S>) -> Self {
        WsBytes {
            socket,
            inbound: Bytes::new(),
            outbound: Vec::new(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsBytes<S> {
    /// Sends what was written as one message.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.outbound.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.socket.poll_ready_unpin(cx)).map_err(io::Error::other)?;
        let message = Message::Binary(std::mem::take(&mut self.outbound).into());
        self.socket
            .start_send_unpin(message)
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.inbound.is_empty() {
            match ready!(this.socket.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(data))) => this.inbound = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on the data link",
                    )))
                }
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
        let n = this.inbound.len().min(buf.remaining());
        buf.put_slice(&this.inbound.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.outbound.len() >= MAX_MESSAGE {
            ready!(self.poll_send(cx))?;
        }
        let n = buf.len().min(MAX_MESSAGE - self.outbound.len());
        self.outbound.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        self.socket.poll_flush_unpin(cx).map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        self.socket.poll_close_unpin(cx).map_err(io::Error::other)
    }
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// Opens streams on a fallback link; cheap to clone. Streams open while the link's
/// [`RelayEnd::drive`] runs.
#[derive(Debug, Clone)]
pub struct Opener {
    requests: mpsc::Sender<OpenReply>,
}

impl Opener {
    /// Opens a stream.
    pub async fn open(&self) -> io::Result<(SendHalf, RecvHalf)> {
        let gone = || io::Error::new(io::ErrorKind::NotConnected, "the fallback link is closed");
        let (reply, answer) = oneshot::channel();
        self.requests.send(reply).await.map_err(|_| gone())?;
        let stream = answer
            .await
            .map_err(|_| gone())?
            .map_err(io::Error::other)?;
        Ok(mux_halves(stream))
    }

    /// Whether `self` and `other` open streams on the same link.
    pub fn same_link(&self, other: &Opener) -> bool {
        self.requests.same_channel(&other.requests)
    }
}

/// The relay's end of a fallback link, with the hello already exchanged.
#[derive(Debug)]
pub struct RelayEnd<S> {
    connection: Connection<S>,
    requests: mpsc::Receiver<OpenReply>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RelayEnd<S> {
    /// Starts yamux on `link`; streams are opened through the [`Opener`].
    pub fn new(link: WsBytes<S>) -> (Self, Opener) {
        let (requests_tx, requests) = mpsc::channel(16);
        let connection = yamux::Connection::new(link.compat(), config(), yamux::Mode::Client);
        let end = RelayEnd {
            connection,
            requests,
        };
        (
            end,
            Opener {
                requests: requests_tx,
            },
        )
    }

    /// Moves the link's bytes and opens the streams asked for, until the link ends, or
    /// every [`Opener`] is gone and the link is closed. Streams the agent tries to open
    /// are refused.
    pub async fn drive(mut self) -> Result<(), yamux::ConnectionError> {
        let mut asking: Option<OpenReply> = None;
        let mut openers_gone = false;
        let ended = poll_fn(|cx| {
            loop {
                if asking.is_none() {
                    match self.requests.poll_recv(cx) {
                        Poll::Ready(Some(reply)) => asking = Some(reply),
                        Poll::Ready(None) => {
                            openers_gone = true;
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Pending => break,
                    }
                }
                let Poll::Ready(opened) = self.connection.poll_new_outbound(cx) else {
                    break;
                };
                if let Some(reply) = asking.take() {
                    // An asker that gave up drops the stream, which resets it.
                    let _ = reply.send(opened);
                }
            }
            loop {
                match ready!(self.connection.poll_next_inbound(cx)) {
                    // Dropped at once: yamux resets it.
                    Some(Ok(_refused)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(e)),
                    None => return Poll::Ready(Ok(())),
                }
            }
        })
        .await;
        if openers_gone {
            poll_fn(|cx| self.connection.poll_close(cx)).await?;
        }
        ended
    }
}

/// The agent's end of a fallback link, with the hello already exchanged.
#[derive(Debug)]
pub struct AgentEnd<S> {
    connection: Connection<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AgentEnd<S> {
    /// Starts yamux on `link`.
    pub fn new(link: WsBytes<S>) -> Self {
        AgentEnd {
            connection: yamux::Connection::new(link.compat(), config(), yamux::Mode::Server),
        }
    }

    /// The next stream the relay opens; `None` once the link ended. The link's streams
    /// move bytes only while this is awaited.
    pub async fn accept(&mut self) -> Option<io::Result<(SendHalf, RecvHalf)>> {
        let next = poll_fn(|cx| self.connection.poll_next_inbound(cx)).await?;
        Some(next.map(mux_halves).map_err(io::Error::other))
    }

    /// Closes the link: its open streams end.
    pub async fn close(&mut self) {
        let _ = poll_fn(|cx| self.connection.poll_close(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WsBytes<tokio::io::DuplexStream>,
        WsBytes<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let a = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let b = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (WsBytes::new(a), WsBytes::new(b))
    }

    #[tokio::test]
    async fn bytes_cross_a_websocket_in_order_and_end_with_it() {
        let (mut a, mut b) = pair().await;
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for chunk in sent.chunks(7_000) {
                    a.write_all(chunk).await.unwrap();
                }
                a.shutdown().await.unwrap();
            })
        };
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes differ");
    }

    #[tokio::test]
    async fn the_relay_opens_streams_the_agent_accepts() {
        let (relay, agent) = pair().await;
        let (relay, opener) = RelayEnd::new(relay);
        let driver = tokio::spawn(relay.drive());
        let mut agent = AgentEnd::new(agent);
        let echo = tokio::spawn(async move {
            let mut served = 0;
            while let Some(stream) = agent.accept().await {
                let (mut send, mut recv) = stream.unwrap();
                tokio::spawn(async move {
                    tokio::io::copy(&mut recv, &mut send).await.unwrap();
                    send.shutdown().await.unwrap();
                });
                served += 1;
            }
            served
        });
        let mut sessions = Vec::new();
        for i in 0..3u8 {
            let (mut send, mut recv) = opener.open().await.unwrap();
            sessions.push(tokio::spawn(async move {
                let payload = vec![i; 100_000];
                let (_, echoed) = tokio::join!(
                    async {
                        send.write_all(&payload).await.unwrap();
                        send.shutdown().await.unwrap();
                    },
                    async {
                        let mut echoed = Vec::new();
                        recv.read_to_end(&mut echoed).await.unwrap();
                        echoed
                    }
                );
                assert!(echoed == payload, "stream {i} echoed other bytes");
            }));
        }
        for session in sessions {
            session.await.unwrap();
        }
        // The last opener gone ends the link, and the agent sees it end.
        drop(opener);
        driver.await.unwrap().unwrap();
        assert_eq!(echo.await.unwrap(), 3);
    }
}
