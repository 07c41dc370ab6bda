//! A data stream's two halves, whichever link carries it: a stream of the QUIC tunnel,
//! or a yamux stream of the TCP fallback ([`crate::mux`]). Both carry the same bytes
//! (a [`StreamOpen`](crate::protocol::StreamOpen) frame, a
//! [`StreamStatus`](crate::protocol::StreamStatus) frame, then the payload), so the
//! code on either end does not care which.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio_util::compat::Compat;

use crate::splice::RESET_CODE;

/// A yamux stream with tokio's I/O traits.
pub(crate) type MuxStream = Compat<yamux::Stream>;

/// The sending half of a data stream.
#[derive(Debug)]
pub enum SendHalf {
    /// A QUIC stream.
    Quic(quinn::SendStream),
    /// A stream of the TCP fallback.
    Mux(WriteHalf<MuxStream>),
}

/// The receiving half of a data stream.
#[derive(Debug)]
pub enum RecvHalf {
    /// A QUIC stream.
    Quic(quinn::RecvStream),
    /// A stream of the TCP fallback.
    Mux(ReadHalf<MuxStream>),
}

/// Splits a yamux stream into the halves the rest of the code uses.
pub(crate) fn mux_halves(stream: yamux::Stream) -> (SendHalf, RecvHalf) {
    use tokio_util::compat::FuturesAsyncReadCompatExt as _;
    let (recv, send) = tokio::io::split(stream.compat());
    (SendHalf::Mux(send), RecvHalf::Mux(recv))
}

impl SendHalf {
    /// Abandons the stream: the peer learns at once that no more bytes will come and
    /// that it should stop sending. (A yamux stream is reset when its last half is
    /// dropped without having been shut down.)
    pub fn reset(self) {
        match self {
            // Already finished or reset streams refuse a reset; either way the peer knows.
            SendHalf::Quic(mut send) => drop(send.reset(quinn::VarInt::from_u32(RESET_CODE))),
            SendHalf::Mux(_) => {}
        }
    }

    /// Finishes the stream and waits, at most `linger`, until the peer has everything
    /// written (so that a short answer is not lost when the stream is dropped).
    pub async fn finish(mut self, linger: Duration) {
        let _ = tokio::time::timeout(linger, async {
            if self.shutdown().await.is_ok() {
                if let SendHalf::Quic(send) = &mut self {
                    let _ = send.stopped().await;
                }
            }
        })
        .await;
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendHalf::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(Into::into),
            SendHalf::Mux(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendHalf::Quic(s) => Pin::new(s).poll_flush(cx),
            SendHalf::Mux(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendHalf::Quic(s) => Pin::new(s).poll_shutdown(cx),
            SendHalf::Mux(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvHalf::Quic(s) => Pin::new(s).poll_read(cx, buf),
            RecvHalf::Mux(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}
