//! Timers of one client connection (proxy, Admin API, cluster port), kept by wrapping
//! its IO.
//!
//! Between requests a connection is *idle*: if no byte of a next request arrives within
//! the keep-alive timeout it is closed quietly (a new connection's first request has
//! the header timeout to start, as nginx's `client_header_timeout`). Once a byte arrives the request's line
//! and headers must be complete within the header timeout (slowloris); when they are
//! not, the client gets a 408 with Kong's JSON body and the connection is closed.
//! hyper's own `header_read_timeout` closes without an answer, so the timing lives
//! here: the wrapper sees every read, and the request handler tells it (through
//! [`ConnState`]) when headers have been parsed and when the response has been sent.
//!
//! HTTP/2 connections (the h2c preface, or ALPN h2) have no header timer (their
//! requests are multiplexed, and h2 bounds header sizes itself) but the same idle one:
//! with no request in flight, a connection that sends nothing for the keep-alive time
//! is closed.
//!
//! Writes have a send timeout on every connection: a write that makes no progress for
//! that long (a client that stopped reading) fails, which ends the connection and
//! frees what it held, an upstream connection included (nginx's `send_timeout`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The timeouts of a listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Request line and headers, from their first byte.
    pub header: Duration,
    /// Idle between requests.
    pub keepalive: Duration,
    /// A write that makes no progress for this long fails.
    pub send: Duration,
}

/// What the request handler tells the connection's timers.
#[derive(Default)]
pub struct ConnState {
    /// Requests whose headers were parsed and whose response has not been sent.
    in_flight: AtomicU32,
    /// Requests whose headers were parsed, ever.
    started: AtomicU32,
    /// An HTTP/2 connection: no timers here.
    h2: AtomicBool,
    /// The connection task, woken when a response has been sent so the keep-alive
    /// timer starts then (hyper may not read again until woken).
    reader: AtomicWaker,
}

impl ConnState {
    /// A request's headers were parsed.
    pub fn request_started(&self, h2: bool) {
        if h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// A response was sent (its body ended or was dropped).
    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.reader.wake();
    }
}

/// Marks a request finished when dropped: held by the response body.
pub struct RequestGuard(Option<Arc<ConnState>>);

impl RequestGuard {
    pub fn new(state: Option<Arc<ConnState>>) -> RequestGuard {
        RequestGuard(state)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(state) = &self.0 {
            state.request_finished();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A request is being handled: no timer.
    Busy,
    /// Waiting for the first byte of the next request.
    Idle,
    /// Reading a request's line and headers.
    Headers,
    /// Timed out: the connection reads as closed.
    Closed,
}

/// Kong's JSON body for a 408; the connection closes after it.
const REQUEST_TIMEOUT_ANSWER: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: 36\r\nconnection: close\r\n\r\n{\"message\":\"Request header timeout\"}";

/// A client connection's IO with the idle and header timers.
pub struct TimedIo<S> {
    inner: S,
    state: Arc<ConnState>,
    timeouts: Timeouts,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    /// Whether anything was read yet (to spot the h2c preface).
    started: bool,
    /// `ConnState::started` when last looked at: a change means a request's headers
    /// were parsed since (and maybe answered already).
    seen_requests: u32,
    /// The send timer, armed while a write waits.
    send_deadline: Pin<Box<Sleep>>,
    sending: bool,
}

impl<S> TimedIo<S> {
    /// Wraps a connection; `h2` when it is known to be HTTP/2 already (ALPN).
    pub fn new(inner: S, timeouts: Timeouts, h2: bool) -> (TimedIo<S>, Arc<ConnState>) {
        let state = Arc::new(ConnState::default());
        if h2 {
            state.h2.store(true, Ordering::Relaxed);
        }
        let io = TimedIo {
            inner,
            state: state.clone(),
            timeouts,
            phase: Phase::Idle,
            deadline: Box::pin(tokio::time::sleep(timeouts.header)),
            started: false,
            seen_requests: 0,
            send_deadline: Box::pin(tokio::time::sleep(timeouts.send)),
            sending: false,
        };
        (io, state)
    }

    fn arm(&mut self, phase: Phase, after: Duration) {
        self.phase = phase;
        self.deadline.as_mut().reset(Instant::now() + after);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase == Phase::Closed {
            return Poll::Ready(Ok(()));
        }
        if this.state.h2.load(Ordering::Relaxed) {
            return this.poll_read_h2(cx, buf);
        }
        let requests = this.state.started.load(Ordering::Relaxed);
        if this.state.in_flight.load(Ordering::Relaxed) > 0 {
            this.phase = Phase::Busy;
        } else if this.phase == Phase::Busy || requests != this.seen_requests {
            // The last response went out: the next request has the keep-alive time to start.
            let keepalive = this.timeouts.keepalive;
            this.arm(Phase::Idle, keepalive);
        }
        this.seen_requests = requests;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !this.started && !read.is_empty() {
                    this.started = true;
                    if read.starts_with(b"PRI * HTTP/2") {
                        this.state.h2.store(true, Ordering::Relaxed);
                    }
                }
                if this.phase == Phase::Idle && !read.is_empty() {
                    let header = this.timeouts.header;
                    this.arm(Phase::Headers, header);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                this.state.reader.register(cx.waker());
                if this.phase == Phase::Busy || this.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if this.phase == Phase::Headers {
                    metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "header").increment(1);
                    // Best effort: a client too slow to send headers may be too slow to read.
                    let _ = Pin::new(&mut this.inner).poll_write(cx, REQUEST_TIMEOUT_ANSWER);
                    let _ = Pin::new(&mut this.inner).poll_flush(cx);
                } else {
                    metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "keepalive").increment(1);
                }
                this.phase = Phase::Closed;
                // Reads as end of stream: hyper closes the connection.
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> TimedIo<S> {
    /// HTTP/2: only the idle timer, from the last byte read or the last response while
    /// no request is in flight.
    fn poll_read_h2(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let requests = self.state.started.load(Ordering::Relaxed);
        let busy = self.state.in_flight.load(Ordering::Relaxed) > 0;
        if busy {
            self.phase = Phase::Busy;
        } else if self.phase != Phase::Idle || requests != self.seen_requests {
            let keepalive = self.timeouts.keepalive;
            self.arm(Phase::Idle, keepalive);
        }
        self.seen_requests = requests;
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && !busy {
                    let keepalive = self.timeouts.keepalive;
                    self.arm(Phase::Idle, keepalive);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                self.state.reader.register(cx.waker());
                if busy || self.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "keepalive").increment(1);
                self.phase = Phase::Closed;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S> TimedIo<S> {
    /// The outcome of a write: progress disarms the send timer; waiting arms it, and
    /// fails the write once it fires.
    fn timed_write<T>(&mut self, cx: &mut Context<'_>, outcome: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match outcome {
            Poll::Pending => {
                if !self.sending {
                    self.sending = true;
                    let send = self.timeouts.send;
                    self.send_deadline.as_mut().reset(Instant::now() + send);
                }
                if self.send_deadline.as_mut().poll(cx).is_ready() {
                    metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "send").increment(1);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "send timeout: the peer stopped reading",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.sending = false;
                ready
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.timed_write(cx, outcome)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.inner).poll_flush(cx);
        this.timed_write(cx, outcome)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.timed_write(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const TIMEOUTS: Timeouts =
        Timeouts { header: Duration::from_secs(2), keepalive: Duration::from_secs(5), send: Duration::from_secs(7) };

    #[tokio::test(start_paused = true)]
    async fn a_partial_request_gets_a_408_and_an_idle_connection_closes_quietly() {
        // Partial headers: 408 after the header timeout.
        let (client, server) = tokio::io::duplex(4096);
        let (mut io, _state) = TimedIo::new(server, TIMEOUTS, false);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
        let mut buf = vec![0u8; 1024];
        let read = io.read(&mut buf).await.unwrap();
        assert!(read > 0);
        let started = Instant::now();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "reads as closed after the timeout");
        assert_eq!(started.elapsed(), TIMEOUTS.header);
        let mut answer = vec![0u8; REQUEST_TIMEOUT_ANSWER.len()];
        client_read.read_exact(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 408 "));

        // Nothing sent at all: closed after the header timeout, without an answer.
        let (client, server) = tokio::io::duplex(4096);
        let (mut io, _state) = TimedIo::new(server, TIMEOUTS, false);
        let started = Instant::now();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        assert_eq!(started.elapsed(), TIMEOUTS.header);
        drop(io);
        let mut rest = Vec::new();
        let (mut client_read, _) = tokio::io::split(client);
        client_read.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_timer_runs_while_a_request_is_handled_or_on_http2() {
        let (client, server) = tokio::io::duplex(4096);
        let (mut io, state) = TimedIo::new(server, TIMEOUTS, false);
        let (_client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 1024];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        state.request_started(false);
        // A slow upstream: the handler holds the request far past both timeouts.
        let waited = tokio::time::timeout(TIMEOUTS.keepalive * 10, io.read(&mut buf)).await;
        assert!(waited.is_err(), "no timeout while the request is in flight");
        let guard = RequestGuard::new(Some(state.clone()));
        drop(guard);
        // Answered at once, with no read in between: the header timer must not carry on.
        client_write.write_all(b"GET /again HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        state.request_started(false);
        drop(RequestGuard::new(Some(state.clone())));
        // Then the keep-alive timer runs again.
        let started = Instant::now();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        assert_eq!(started.elapsed(), TIMEOUTS.keepalive);

        // HTTP/2: no timer while a request is in flight; idle without one, closed.
        let (client, server) = tokio::io::duplex(4096);
        let (mut io, state) = TimedIo::new(server, TIMEOUTS, false);
        let (_client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        state.request_started(true);
        let waited = tokio::time::timeout(TIMEOUTS.keepalive * 10, io.read(&mut buf)).await;
        assert!(waited.is_err(), "no timeout while an HTTP/2 request is in flight");
        drop(RequestGuard::new(Some(state.clone())));
        let started = Instant::now();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "an idle HTTP/2 connection is closed");
        assert_eq!(started.elapsed(), TIMEOUTS.keepalive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_the_write_after_the_send_timeout() {
        let (client, server) = tokio::io::duplex(1024);
        let (mut io, _state) = TimedIo::new(server, TIMEOUTS, false);
        let started = Instant::now();
        let written = io.write_all(&vec![b'x'; 64 * 1024]).await;
        assert_eq!(written.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), TIMEOUTS.send);
        drop(client);
    }
}
