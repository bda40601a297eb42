//! A connection's work raced against the node's stop signals, polling the signals
//! only when they woke the task.
//!
//! `tokio::select!` polls every branch on every wake. A client connection's task
//! wakes several times per request (the client readable, the upstream readable, a
//! write done), and each poll of a `watch` receiver's change takes the lock of the
//! shared `Notify` it waits on: two locks per wake, shared by every connection of
//! every worker, 4% of a keep-alive request's instructions on one worker (callgrind:
//! 22 568 before, 21 617 after) and a lock the workers contend for on several.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Runs `work` until it ends (`Ok`) or `stop` does first (`Err`). `work` is polled
/// first on every wake (as `select!`'s `biased`); `stop` on the first poll and then
/// only after it woke the task itself. Both are pinned by the caller (`pin!`).
pub(super) fn unless<W: Future + Unpin, S: Future + Unpin>(work: W, stop: S) -> Unless<W, S> {
    let signal = Arc::new(Signal { woken: AtomicBool::new(true), task: AtomicWaker::new() });
    Unless { work, stop, stop_waker: Waker::from(signal.clone()), signal, registered: None }
}

/// The future [`unless`] returns.
pub(super) struct Unless<W, S> {
    work: W,
    stop: S,
    signal: Arc<Signal>,
    /// Wakes through `signal`: what `stop` is polled with.
    stop_waker: Waker,
    /// The task's waker as `signal` holds it: registered again only when the task's
    /// changes (a pointer comparison per poll, where registering is two atomic swaps).
    registered: Option<Waker>,
}

impl<W: Future + Unpin, S: Future + Unpin> Future for Unless<W, S> {
    type Output = Result<W::Output, S::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(output) = Pin::new(&mut this.work).poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if !this.registered.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            this.signal.task.register(cx.waker());
            this.registered = Some(cx.waker().clone());
        }
        // Cleared before `stop` is polled: a wake during the poll is not lost.
        if this.signal.woken.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(stopped) = Pin::new(&mut this.stop).poll(&mut Context::from_waker(&this.stop_waker)) {
                return Poll::Ready(Err(stopped));
            }
        }
        Poll::Pending
    }
}

/// What `stop`'s wakes go through: marks it to be polled, then wakes the task.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::watch;

    use std::pin::pin;

    use super::*;

    /// Counts its polls of the future it wraps.
    async fn counted<F: Future>(polls: Arc<AtomicUsize>, future: F) -> F::Output {
        let mut future = pin!(future);
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            future.as_mut().poll(cx)
        })
        .await
    }

    /// Work that wakes its task many times polls the stop signal once; the signal,
    /// when it comes, still ends the race at once.
    #[tokio::test]
    async fn the_stop_signal_is_polled_only_when_it_wakes_the_task() {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let (step_tx, mut step_rx) = tokio::sync::mpsc::channel::<u32>(1);
        let polls = Arc::new(AtomicUsize::new(0));
        let stopping = counted(polls.clone(), async move { stop_rx.wait_for(|stop| *stop).await.is_ok() });
        let working = async move {
            let mut total = 0;
            while let Some(step) = step_rx.recv().await {
                total += step;
            }
            total
        };
        let racing = tokio::spawn(async move { unless(pin!(working), pin!(stopping)).await.map_err(|_| ()) });
        // 100 wakes of the work: the signal was polled once, on the first poll.
        for step in 0..100 {
            step_tx.send(step).await.unwrap();
        }
        stop_tx.send(true).unwrap();
        assert_eq!(racing.await.unwrap(), Err(()));
        assert_eq!(polls.load(Ordering::Relaxed), 2, "the signal polled on the first poll and when it fired, no more");
    }

    /// Work that ends first wins, also when the signal has fired by then (`biased`).
    #[tokio::test]
    async fn work_that_is_done_wins_over_the_signal() {
        assert_eq!(unless(pin!(async { 7 }), pin!(async { "stop" })).await, Ok(7));
        let stopped = unless(pin!(std::future::pending::<()>()), pin!(async { "stop" })).await;
        assert_eq!(stopped, Err("stop"));
    }
}
