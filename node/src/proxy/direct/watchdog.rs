//! The one timer a client connection's deadlines share.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

/// One timer per client connection for every deadline of its requests: the idle
/// keep-alive wait, connecting, each write and read of the upstream exchange, each
/// write to the client. Arming a tokio timer per wait (`tokio::time::timeout`) costs a
/// timer-wheel insertion and removal each time; this one stays armed, and moves only
/// when it fires before the deadline in force (it then checks the time and re-arms)
/// or when a deadline earlier than its own comes. With the usual deadlines (tens of
/// seconds) it moves about once per keep-alive period, not per request.
pub(in crate::proxy) struct Watchdog {
    sleep: Pin<Box<Sleep>>,
}

impl Watchdog {
    pub(in crate::proxy) fn new() -> Watchdog {
        Watchdog { sleep: Box::pin(tokio::time::sleep(Duration::ZERO)) }
    }

    /// Writes all of `bytes` to `stream` unless a write makes no progress for
    /// `timeout`: `Err(None)` then, `Err(Some(_))` when a write fails.
    pub(super) async fn write<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(), Option<std::io::Error>> {
        let mut sent = 0;
        while sent < bytes.len() {
            match self.within(timeout, stream.write(&bytes[sent..])).await {
                Some(Ok(0)) => return Err(Some(std::io::ErrorKind::WriteZero.into())),
                Some(Err(error)) => return Err(Some(error)),
                Some(Ok(written)) => sent += written,
                None => return Err(None),
            }
        }
        Ok(())
    }

    /// Writes to the client (the send timeout, nginx's `send_timeout`); whether it was
    /// all written.
    pub(super) async fn send<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        bytes: &[u8],
        timeout: Duration,
    ) -> bool {
        match self.write(stream, bytes, timeout).await {
            Ok(()) => true,
            Err(Some(_)) => false,
            Err(None) => {
                metrics::counter!("tollgate_proxy_timeouts_total", "kind" => "send").increment(1);
                false
            }
        }
    }

    /// Runs `work` for at most `timeout` from when it first has to wait; `None` when
    /// the time ran out first. The clock is read only then: most writes, and reads whose
    /// bytes are already there, finish at once and read none (a clock read is a few
    /// percent of a request's user time, and a request had eight).
    pub(super) async fn within<F: Future>(&mut self, timeout: Duration, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        let mut armed = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            let deadline = *armed.get_or_insert_with(|| {
                let deadline = Instant::now() + timeout;
                if self.sleep.deadline() > deadline {
                    self.sleep.as_mut().reset(deadline);
                }
                deadline
            });
            while self.sleep.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(None);
                }
                self.sleep.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_holds_every_deadline_whatever_it_was_armed_for() {
        let second = Duration::from_secs(1);
        let mut watchdog = Watchdog::new();
        let start = Instant::now();
        assert_eq!(watchdog.within(10 * second, async { 7 }).await, Some(7));
        // A long deadline: the timer fires early (armed for less), re-arms, and ends
        // at the deadline.
        assert_eq!(watchdog.within(60 * second, std::future::pending::<()>()).await, None);
        assert_eq!(Instant::now(), start + 60 * second);
        // Work done at once is not cut; then a deadline shorter than the one the
        // timer is armed for moves it.
        let now = Instant::now();
        assert_eq!(watchdog.within(120 * second, async {}).await, Some(()));
        assert_eq!(watchdog.within(2 * second, std::future::pending::<()>()).await, None);
        assert_eq!(Instant::now(), now + 2 * second);
        // Work that finishes in time is not cut.
        let now = Instant::now();
        let slow = tokio::time::sleep(5 * second);
        assert_eq!(watchdog.within(6 * second, slow).await, Some(()));
        assert_eq!(Instant::now(), now + 5 * second);
        // Work done at once arms nothing: the timer stays where it was.
        let armed = watchdog.sleep.deadline();
        assert!(armed > Instant::now());
        assert_eq!(watchdog.within(second / 2, async { 1 }).await, Some(1));
        assert_eq!(watchdog.sleep.deadline(), armed);
    }
}
