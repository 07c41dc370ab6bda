//! Splicing a TCP connection with a data stream (QUIC, or the TCP fallback's): the one
//! copy loop of the product.
//!
//! What one direction does with the bytes it carries is a [`Layer`]. The agent passes
//! them as they are ([`Plain`]); the relay's RTSP awareness is a layer that renames,
//! answers and measures on this same loop, so both keep one contract: half-close, reset
//! on error, counters, and bytes passed on without being copied.

use std::{
    future::poll_fn,
    io,
    ops::Range,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{tcp::OwnedWriteHalf, TcpStream},
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
    /// Bytes read from the TCP peer (and sent into the stream, changed or not).
    pub from_tcp: u64,
    /// Bytes written to the TCP peer.
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

/// Where a splice counts its bytes as they move, as [`Transfer`] counts them.
pub trait Meter {
    /// `n` bytes were read from the TCP peer.
    fn on_tcp_read(&self, n: usize);
    /// `n` bytes were written to the TCP peer.
    fn on_tcp_written(&self, n: usize);
}

impl Meter for ByteCounters {
    fn on_tcp_read(&self, n: usize) {
        self.from_tcp.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn on_tcp_written(&self, n: usize) {
        self.to_tcp.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A sending half a failed splice abandons: a data stream's, or the TCP side's.
pub trait StreamSend: AsyncWrite + Unpin {
    /// Tells the peer at once that no more bytes will come.
    fn reset(self);
}

/// A TCP connection's writing half is reset by closing it with a RST.
impl StreamSend for OwnedWriteHalf {
    fn reset(self) {
        reset_tcp(self.as_ref());
        // Dropped, the writing half would shut down with a FIN first: the peer would
        // take the reset for a clean end. Forgotten, the socket closes with the reading
        // half, and resets.
        self.forget();
    }
}

impl StreamSend for SendHalf {
    fn reset(self) {
        SendHalf::reset(self);
    }
}

/// What one direction of a splice does with its bytes.
pub trait Layer {
    /// What the bytes of one read become, added to `out` in order: stretches of `read`
    /// passed on as they are, and bytes of the layer's own. An error ends the splice
    /// (and resets both sides).
    fn on_read(&mut self, read: &[u8], out: &mut Out) -> io::Result<()>;

    /// The input ended: the bytes still owed (a message that never completed, say).
    fn on_end(&mut self, _out: &mut Out) {}

    /// Polled while the direction waits for its next read: bytes of the layer's own to
    /// send meanwhile (`Ready` once `out` has some), and its timers. The waker must be
    /// registered for whatever would make it ready.
    fn poll_between(&mut self, _cx: &mut Context<'_>, _out: &mut Out) -> Poll<()> {
        Poll::Pending
    }
}

/// A layer lent to a splice, to be looked at afterwards.
impl<L: Layer + ?Sized> Layer for &mut L {
    fn on_read(&mut self, read: &[u8], out: &mut Out) -> io::Result<()> {
        (**self).on_read(read, out)
    }

    fn on_end(&mut self, out: &mut Out) {
        (**self).on_end(out);
    }

    fn poll_between(&mut self, cx: &mut Context<'_>, out: &mut Out) -> Poll<()> {
        (**self).poll_between(cx, out)
    }
}

/// Every byte passes as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl Layer for Plain {
    fn on_read(&mut self, read: &[u8], out: &mut Out) -> io::Result<()> {
        out.pass(read, read);
        Ok(())
    }
}

/// The TCP side of a splice, split: its reading half (which may begin with bytes
/// already read from the socket) and its writing half. Between relays of a cluster,
/// the "TCP side" of the relay holding the camera is the data stream from the relay the
/// Watcher connected to: the same splice, with a stream's halves here.
#[derive(Debug)]
pub struct Tcp<R, W = OwnedWriteHalf> {
    /// Bytes from the TCP peer.
    pub read: R,
    /// Bytes to the TCP peer; also how the connection is reset.
    pub write: W,
}

/// Copies both ways between `tcp` and a data stream, as they are, until both
/// directions are done. See [`splice_with`].
pub async fn splice<R>(
    tcp: TcpStream,
    recv: R,
    send: SendHalf,
    counters: &ByteCounters,
) -> io::Result<Transfer>
where
    R: AsyncRead + Unpin,
{
    let (read, write) = tcp.into_split();
    splice_with(Tcp { read, write }, recv, send, (Plain, Plain), counters).await
}

/// Carries both ways between `tcp` and a data stream until both directions are done,
/// each through its layer: `layers.0` from TCP into the stream, `layers.1` back.
///
/// Half-close is preserved: a TCP FIN finishes the stream's sending half and the
/// stream's finish shuts down TCP's write side, each direction going on until its own
/// end. If either side fails, or a layer refuses what it read, the stream is reset and
/// the TCP connection is reset, so neither peer waits on a half-dead connection.
/// `meter` counts as bytes move.
pub async fn splice_with<T, W, R, S, U, D, M>(
    tcp: Tcp<T, W>,
    mut recv: R,
    mut send: S,
    layers: (U, D),
    meter: &M,
) -> io::Result<Transfer>
where
    T: AsyncRead + Unpin,
    W: StreamSend,
    R: AsyncRead + Unpin,
    S: StreamSend,
    U: Layer,
    D: Layer,
    M: Meter + ?Sized,
{
    let Tcp {
        read: mut tcp_read,
        write: mut tcp_write,
    } = tcp;
    let (mut up, mut down) = layers;
    let from_tcp = pump(&mut tcp_read, &mut send, &mut up, Counted::Reads(meter));
    let to_tcp = pump(&mut recv, &mut tcp_write, &mut down, Counted::Writes(meter));
    match tokio::try_join!(from_tcp, to_tcp) {
        Ok((from_tcp, to_tcp)) => Ok(Transfer { from_tcp, to_tcp }),
        Err(e) => {
            send.reset();
            tcp_write.reset();
            drop(tcp_read);
            Err(e)
        }
    }
}

/// Makes the next close of `tcp` send a RST instead of a FIN.
pub fn reset_tcp(tcp: &TcpStream) {
    // Failing only means the close is a FIN, which still ends the connection.
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Which bytes of a direction are the TCP side's, counted: those it reads from TCP, or
/// those it writes to TCP.
#[derive(Clone, Copy)]
enum Counted<'a, M: ?Sized> {
    Reads(&'a M),
    Writes(&'a M),
}

/// One direction: read, let the layer decide, write, until the input ends (then shut
/// the output down). The TCP side's bytes of it.
async fn pump<R, W, L, M>(
    from: &mut R,
    to: &mut W,
    layer: &mut L,
    counted: Counted<'_, M>,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    L: Layer + ?Sized,
    M: Meter + ?Sized,
{
    let mut buf = vec![0; SPLICE_BUFFER];
    let mut out = Out::default();
    let mut total = 0;
    loop {
        // The read's length, or `None` when the layer has bytes to send between reads.
        let read = poll_fn(|cx| {
            if layer.poll_between(cx, &mut out).is_ready() {
                return Poll::Ready(Ok(None));
            }
            let mut read = ReadBuf::new(&mut buf);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut read))?;
            Poll::Ready(Ok::<_, io::Error>(Some(read.filled().len())))
        })
        .await?;
        let (read, ended) = match read {
            Some(0) => {
                layer.on_end(&mut out);
                (&[][..], true)
            }
            Some(n) => {
                if let Counted::Reads(meter) = counted {
                    meter.on_tcp_read(n);
                    total += n as u64;
                }
                layer.on_read(&buf[..n], &mut out)?;
                (&buf[..n], false)
            }
            None => (&[][..], false),
        };
        let len = out.len();
        if len > 0 {
            out.write(read, to).await?;
            if let Counted::Writes(meter) = counted {
                meter.on_tcp_written(len);
                total += len as u64;
            }
        }
        if ended {
            to.shutdown().await?;
            return Ok(total);
        }
    }
}

/// What one read becomes, in order: stretches of the read buffer passed on as they are
/// and bytes of a layer's own between them. Written with vectored writes, so passed
/// bytes are never copied: a read that passes whole is one stretch and one write.
#[derive(Debug, Default)]
pub struct Out {
    segments: Vec<Segment>,
}

#[derive(Debug)]
enum Segment {
    /// A stretch of the read buffer.
    Read(Range<usize>),
    /// Bytes of a layer's own.
    Own(Vec<u8>),
}

impl Out {
    /// Passes `part` of `read` on as it is. `part` must be a slice of `read` (what a
    /// parser of `read` hands back), and stretches must come in order.
    pub fn pass(&mut self, read: &[u8], part: &[u8]) {
        if part.is_empty() {
            return;
        }
        let start = (part.as_ptr() as usize).wrapping_sub(read.as_ptr() as usize);
        assert!(
            start <= read.len() && part.len() <= read.len() - start,
            "a passed stretch must be part of the read"
        );
        let range = start..start + part.len();
        match self.segments.last_mut() {
            // A frame's header and its payload, or back-to-back frames: one stretch.
            Some(Segment::Read(last)) if last.end == range.start => last.end = range.end,
            _ => self.segments.push(Segment::Read(range)),
        }
    }

    /// Adds bytes of the layer's own.
    pub fn own(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.segments.push(Segment::Own(bytes));
        }
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// How many bytes are to be written.
    fn len(&self) -> usize {
        self.segments
            .iter()
            .map(|segment| match segment {
                Segment::Read(range) => range.len(),
                Segment::Own(bytes) => bytes.len(),
            })
            .sum()
    }

    /// Writes everything, in order, with `read` the buffer the stretches are in; then
    /// starts empty again.
    async fn write<W: AsyncWrite + Unpin>(&mut self, read: &[u8], to: &mut W) -> io::Result<()> {
        fn slice<'s>(read: &'s [u8], segment: &'s Segment) -> &'s [u8] {
            match segment {
                Segment::Read(range) => &read[range.clone()],
                Segment::Own(bytes) => bytes,
            }
        }
        if let [one] = &self.segments[..] {
            // The common case, media or a plain splice: no slice list to build.
            to.write_all(slice(read, one)).await?;
        } else {
            let mut slices: Vec<io::IoSlice<'_>> = self
                .segments
                .iter()
                .map(|segment| io::IoSlice::new(slice(read, segment)))
                .collect();
            let mut left = &mut slices[..];
            while !left.is_empty() {
                let n = to.write_vectored(left).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                io::IoSlice::advance_slices(&mut left, n);
            }
        }
        self.segments.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{atomic::AtomicBool, Arc};

    use tokio::{
        io::{AsyncReadExt, DuplexStream, ReadHalf, WriteHalf},
        net::TcpListener,
        sync::mpsc,
    };

    use super::*;

    /// The stream side of a splice under test: an in-memory pipe whose sending half
    /// remembers being reset.
    struct PipeSend {
        inner: WriteHalf<DuplexStream>,
        reset: Arc<AtomicBool>,
    }

    impl StreamSend for PipeSend {
        fn reset(self) {
            self.reset.store(true, Ordering::Relaxed);
        }
    }

    impl AsyncWrite for PipeSend {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A TCP connection (client end, splice end), a pipe (far end, the splice's
    /// halves) and the pipe's reset flag.
    async fn ends() -> (
        TcpStream,
        Tcp<tokio::net::tcp::OwnedReadHalf>,
        DuplexStream,
        (ReadHalf<DuplexStream>, PipeSend),
        Arc<AtomicBool>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (read, write) = accepted.into_split();
        let (far, near) = tokio::io::duplex(1024);
        let (recv, send) = tokio::io::split(near);
        let reset = Arc::new(AtomicBool::new(false));
        let send = PipeSend {
            inner: send,
            reset: reset.clone(),
        };
        (client, Tcp { read, write }, far, (recv, send), reset)
    }

    #[tokio::test]
    async fn each_direction_runs_to_its_own_end_and_is_counted() {
        let (mut client, tcp, mut far, (recv, send), reset) = ends().await;
        let counters = ByteCounters::default();
        let splice = splice_with(tcp, recv, send, (Plain, Plain), &counters);
        let peers = async {
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            // The client's FIN ends the stream's sending half, and only it.
            (&mut far).take(7).read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"request");
            far.write_all(b"answer after the client's FIN")
                .await
                .unwrap();
            far.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"answer after the client's FIN");
            let mut rest = Vec::new();
            far.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        };
        let (transfer, ()) = tokio::join!(splice, peers);
        let transfer = transfer.unwrap();
        assert_eq!(
            transfer,
            Transfer {
                from_tcp: 7,
                to_tcp: 29
            }
        );
        assert_eq!(counters.from_tcp.load(Ordering::Relaxed), 7);
        assert_eq!(counters.to_tcp.load(Ordering::Relaxed), 29);
        assert!(!reset.load(Ordering::Relaxed));
    }

    /// Refuses a read that contains `!`, renames `cat` to `dog` in place, passes the rest.
    struct Picky;

    impl Layer for Picky {
        fn on_read(&mut self, read: &[u8], out: &mut Out) -> io::Result<()> {
            if read.contains(&b'!') {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "refused"));
            }
            let mut rest = read;
            while let Some(at) = rest.windows(3).position(|w| w == b"cat") {
                out.pass(read, &rest[..at]);
                out.own(b"dog".to_vec());
                rest = &rest[at + 3..];
            }
            out.pass(read, rest);
            Ok(())
        }

        fn on_end(&mut self, out: &mut Out) {
            out.own(b" (end)".to_vec());
        }
    }

    #[tokio::test]
    async fn a_layer_changes_the_bytes_and_adds_its_own_at_the_end() {
        let (mut client, tcp, mut far, (recv, send), _reset) = ends().await;
        let counters = ByteCounters::default();
        let splice = splice_with(tcp, recv, send, (Picky, Plain), &counters);
        let peers = async {
            client.write_all(b"a cat, two cats").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"a dog, two dogs (end)");
            far.shutdown().await.unwrap();
        };
        let (transfer, ()) = tokio::join!(splice, peers);
        assert_eq!(transfer.unwrap().from_tcp, 15, "the TCP side's bytes");
    }

    #[tokio::test]
    async fn a_refusal_resets_both_sides() {
        let (mut client, tcp, far, (recv, send), reset) = ends().await;
        let counters = ByteCounters::default();
        let splice = splice_with(tcp, recv, send, (Picky, Plain), &counters);
        let peers = async {
            client.write_all(b"no!").await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap_err()
        };
        let (result, client_error) = tokio::join!(splice, peers);
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(reset.load(Ordering::Relaxed), "the stream was reset");
        assert_eq!(client_error.kind(), io::ErrorKind::ConnectionReset);
        drop(far);
    }

    /// Sends what arrives on a channel between reads.
    struct Announcer(mpsc::Receiver<Vec<u8>>);

    impl Layer for Announcer {
        fn on_read(&mut self, read: &[u8], out: &mut Out) -> io::Result<()> {
            Plain.on_read(read, out)
        }

        fn poll_between(&mut self, cx: &mut Context<'_>, out: &mut Out) -> Poll<()> {
            match self.0.poll_recv(cx) {
                Poll::Ready(Some(bytes)) => {
                    out.own(bytes);
                    Poll::Ready(())
                }
                _ => Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn a_layer_speaks_while_its_input_is_silent() {
        let (mut client, tcp, mut far, (recv, send), _reset) = ends().await;
        let (tx, rx) = mpsc::channel(1);
        let counters = ByteCounters::default();
        let splice = splice_with(tcp, recv, send, (Plain, Announcer(rx)), &counters);
        let peers = async {
            tx.send(b"hello".to_vec()).await.unwrap();
            let mut got = [0; 5];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hello", "sent while the stream said nothing");
            far.write_all(b" world").await.unwrap();
            far.shutdown().await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b" world");
        };
        let (transfer, ()) = tokio::join!(splice, peers);
        assert_eq!(transfer.unwrap().to_tcp, 11);
    }

    #[tokio::test]
    async fn out_passes_stretches_of_the_read_uncopied_between_bytes_of_its_own() {
        let read = b"$\x00\x00\x03abc$\x01\x00\x02deRTSP/1.0 200 OK\r\n\r\n";
        let mut out = Out::default();
        // A frame header and its payload, and the next frame: one stretch.
        out.pass(read, &read[..4]);
        out.pass(read, &read[4..7]);
        out.pass(read, &read[7..13]);
        out.own(b"renamed head".to_vec());
        out.pass(read, &read[13..13]); // nothing
        out.own(Vec::new()); // nothing
        out.pass(read, &read[13..17]);
        assert_eq!(out.segments.len(), 3, "{:?}", out.segments);
        assert!(matches!(&out.segments[0], Segment::Read(r) if *r == (0..13)));
        assert_eq!(out.len(), 13 + 12 + 4);

        // A peer that takes a few bytes at a time still gets everything in order.
        let (mut tx, mut rx) = tokio::io::duplex(5);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        });
        out.write(read, &mut tx).await.unwrap();
        assert!(out.is_empty());
        drop(tx);
        let got = reader.await.unwrap();
        assert_eq!(got, [&read[..13], b"renamed head", &read[13..17]].concat());
    }

    #[test]
    #[should_panic(expected = "part of the read")]
    fn out_refuses_bytes_from_elsewhere() {
        let read = [0u8; 8];
        let other = [0u8; 8];
        Out::default().pass(&read, &other[..4]);
    }
}
