//! The client stream's side of the direct path: whether a connection is readable,
//! told without holding a buffer for it (nginx's lazy buffers), and the stream a
//! handed-off connection goes on with.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::{CLIENT_BUFFER_BYTES, OUT_BUFFER_BYTES};

/// A client stream that can tell when a read would find bytes without being handed a
/// buffer to read them into, so that an idle connection holds none.
pub trait ReadReady {
    /// Whether [`ReadReady::poll_readable`] can tell at all (the simulator's streams
    /// cannot: a connection on one waits in its read, buffers held).
    fn tells_readable(&self) -> bool;

    /// Ready when a read would not wait (bytes, the end, or an error); it may be
    /// ready when a read still waits, never the other way round.
    fn poll_readable(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl ReadReady for crate::env::Stream {
    fn tells_readable(&self) -> bool {
        matches!(self, crate::env::Stream::Tcp(_))
    }

    fn poll_readable(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            crate::env::Stream::Tcp(stream) => stream.poll_read_ready(context),
            crate::env::Stream::Other(_) => Poll::Ready(Ok(())),
        }
    }
}

impl<S: ReadReady> ReadReady for tokio_rustls::server::TlsStream<S> {
    fn tells_readable(&self) -> bool {
        self.get_ref().0.tells_readable()
    }

    fn poll_readable(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let (io, session) = self.get_mut();
        // Plaintext already decrypted (or the peer's close_notify): a read answers now.
        if !session.wants_read() {
            return Poll::Ready(Ok(()));
        }
        io.poll_readable(context)
    }
}

/// Reads a connection's next bytes into `buf` (empty): at once into the buffers the
/// last request left when the bytes are already there; otherwise both buffers are
/// given back, and taken again once the stream is readable.
pub(super) async fn next_bytes<S>(stream: &mut S, buf: &mut BytesMut, out: &mut Vec<u8>) -> std::io::Result<usize>
where
    S: AsyncRead + ReadReady + Unpin,
{
    loop {
        if buf.capacity() > 0 {
            // Reclaims the whole buffer (it is empty), so a request head fits again.
            buf.reserve(CLIENT_BUFFER_BYTES);
            let mut read = std::pin::pin!(stream.read_buf(buf));
            let now = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
            if let Poll::Ready(read) = now {
                return read;
            }
        }
        if !stream.tells_readable() {
            // Waiting for readiness would be ready at once, every time: wait in the
            // read instead.
            take_buffers(buf, out);
            return stream.read_buf(buf).await;
        }
        *buf = BytesMut::new();
        *out = Vec::new();
        std::future::poll_fn(|cx| stream.poll_readable(cx)).await?;
        take_buffers(buf, out);
    }
}

/// Makes room for a request and its answer's head in the (empty) buffers.
fn take_buffers(buf: &mut BytesMut, out: &mut Vec<u8>) {
    buf.reserve(CLIENT_BUFFER_BYTES);
    out.reserve(OUT_BUFFER_BYTES);
}

/// A connection handed off by the direct path: the bytes it read come first.
pub struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let take = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..take]);
            this.prefix.advance(take);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An idle connection holds no buffers (`next_bytes` gives both back while the
    /// read waits); one whose bytes are already there reads them into the buffers it
    /// holds, without taking new ones.
    #[tokio::test]
    async fn an_idle_connection_gives_its_buffers_back_and_a_busy_one_keeps_them() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let mut server = crate::env::Stream::Tcp(listener.accept().await.unwrap().0);
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

        // As the last request left them; nothing more sent yet.
        let mut buf = BytesMut::with_capacity(CLIENT_BUFFER_BYTES);
        let mut out = Vec::with_capacity(OUT_BUFFER_BYTES);
        {
            let mut reading = std::pin::pin!(next_bytes(&mut server, &mut buf, &mut out));
            let waits = std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx).is_pending())).await;
            assert!(waits);
        }
        assert_eq!((buf.capacity(), out.capacity()), (0, 0));

        // Bytes arrive: both are taken again, and the bytes read.
        client.write_all(request).await.unwrap();
        assert_eq!(next_bytes(&mut server, &mut buf, &mut out).await.unwrap(), request.len());
        assert_eq!(&buf[..], request);
        assert!(buf.capacity() >= CLIENT_BUFFER_BYTES && out.capacity() >= OUT_BUFFER_BYTES);

        // The next request is there by the time the last answer went out: read into
        // the same buffer.
        buf.advance(request.len());
        let held = buf.as_ptr() as usize - request.len();
        client.write_all(request).await.unwrap();
        std::future::poll_fn(|cx| server.poll_readable(cx)).await.unwrap();
        assert_eq!(next_bytes(&mut server, &mut buf, &mut out).await.unwrap(), request.len());
        assert_eq!((&buf[..], buf.as_ptr() as usize), (&request[..], held));
    }

    /// A stream that cannot tell when it is readable (the simulator's) waits in its
    /// read. It used to spin: readiness "ready" at once, the read pending, again,
    /// without ever yielding, and the simulated node hung.
    #[test]
    fn a_stream_that_cannot_tell_readiness_waits_in_its_read() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                use tokio::io::AsyncWriteExt;
                let (mut client, server) = tokio::io::duplex(64 * 1024);
                let mut server = crate::env::Stream::Other(Box::new(server));
                let (mut buf, mut out) = (BytesMut::new(), Vec::new());
                let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
                let (waits, read) = {
                    let mut reading = std::pin::pin!(next_bytes(&mut server, &mut buf, &mut out));
                    let waits = std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx).is_pending())).await;
                    client.write_all(request).await.unwrap();
                    (waits, reading.await.unwrap())
                };
                let _ = done.send((waits, read == request.len() && buf.capacity() >= CLIENT_BUFFER_BYTES));
            });
        });
        let outcome = finished.recv_timeout(Duration::from_secs(30)).expect("next_bytes never yielded: it spins");
        assert_eq!(outcome, (true, true));
    }
}
