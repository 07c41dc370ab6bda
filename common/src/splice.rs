//! Splicing a TCP connection with a data stream (QUIC, or the TCP fallback's): the one
//! copy loop of the product.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::stream::SendHalf;

/// Buffer size of each direction. Large enough for a burst of a 16 Mbit/s I-frame to
/// move in few system calls, small enough for thousands of sessions.
const SPLICE_BUFFER: usize = 64 * 1024;

/// Application error code sent with a QUIC stream reset when the other side failed.
pub const RESET_CODE: u32 = 1;

/// Bytes moved by one splice, as seen from the TCP side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes read from the TCP peer and sent into the QUIC stream.
    pub from_tcp: u64,
    /// Bytes received from the QUIC stream and written to the TCP peer.
    pub to_tcp: u64,
}

/// Live byte counters shared by many splices (per agent, or per camera).
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Bytes read from TCP peers.
    pub from_tcp: AtomicU64,
    /// Bytes written to TCP peers.
    pub to_tcp: AtomicU64,
}

/// Copies both ways between `tcp` and a data stream until both directions are done.
///
/// Half-close is preserved: a TCP FIN finishes the stream's sending half and the
/// stream's finish shuts down TCP's write side, each direction going on until its own
/// end. If either side fails, the stream is reset and the TCP connection is reset, so
/// neither peer waits on a half-dead connection. `counters` advance as bytes move.
pub async fn splice<R>(
    tcp: TcpStream,
    recv: R,
    send: SendHalf,
    counters: &ByteCounters,
) -> io::Result<Transfer>
where
    R: AsyncRead + Unpin,
{
    let mut tcp = Metered {
        inner: tcp,
        counters,
    };
    let mut stream = tokio::io::join(recv, send);
    match tokio::io::copy_bidirectional_with_sizes(
        &mut tcp,
        &mut stream,
        SPLICE_BUFFER,
        SPLICE_BUFFER,
    )
    .await
    {
        Ok((from_tcp, to_tcp)) => Ok(Transfer { from_tcp, to_tcp }),
        Err(e) => {
            let (_recv, send) = stream.into_inner();
            send.reset();
            reset_tcp(&tcp.inner);
            Err(e)
        }
    }
}

/// Makes the next close of `tcp` send a RST instead of a FIN.
pub fn reset_tcp(tcp: &TcpStream) {
    // Failing only means the close is a FIN, which still ends the connection.
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// A TCP stream that counts the bytes through it.
struct Metered<'a> {
    inner: TcpStream,
    counters: &'a ByteCounters,
}

impl AsyncRead for Metered<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.counters.from_tcp.fetch_add(read, Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncWrite for Metered<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.counters.to_tcp.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
