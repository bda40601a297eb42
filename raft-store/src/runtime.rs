//! openraft's async runtime for Tollgate: tokio in every respect but one, the random
//! numbers Raft draws its election timeouts from, which the simulator seeds.
//!
//! openraft 0.9 draws each election timeout from `AsyncRuntime::thread_rng`; its own
//! tokio runtime answers with `rand::thread_rng`, seeded by the operating system, so no
//! two runs of one cluster elect alike. Here the draw goes to a per-thread generator
//! that [`seed_elections`] can set: the simulator runs every node on one thread and
//! seeds it from the run's seed; a node in production never seeds it and draws from
//! `rand::thread_rng` as before.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    /// This thread's seeded generator; `None`: the operating system's randomness.
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes this thread's election timeouts follow `seed` (the simulator), or the
/// operating system's randomness again (`None`).
pub fn seed_elections(seed: Option<u64>) {
    SEEDED.with(|seeded| *seeded.borrow_mut() = seed.map(StdRng::seed_from_u64));
}

/// The generator openraft draws from: this thread's seeded one when set.
#[derive(Clone, Copy, Debug, Default)]
pub struct ElectionRng;

impl ElectionRng {
    fn draw<T>(with: impl FnOnce(&mut dyn RngCore) -> T) -> T {
        SEEDED.with(|seeded| match seeded.borrow_mut().as_mut() {
            Some(rng) => with(rng),
            None => with(&mut rand::thread_rng()),
        })
    }
}

impl RngCore for ElectionRng {
    fn next_u32(&mut self) -> u32 {
        ElectionRng::draw(|rng| rng.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        ElectionRng::draw(|rng| rng.next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        ElectionRng::draw(|rng| rng.fill_bytes(dest))
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        ElectionRng::draw(|rng| rng.try_fill_bytes(dest))
    }
}

/// tokio, with [`ElectionRng`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Runtime;

impl AsyncRuntime for Runtime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = ElectionRng;
    type OneshotSender<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ElectionRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Election timeouts as openraft draws them (`gen_range` over the configured span).
    fn timeouts() -> Vec<u64> {
        (0..16).map(|_| Runtime::thread_rng().gen_range(200..400)).collect()
    }

    #[test]
    fn a_seed_replays_the_same_election_timeouts_and_unseeded_threads_still_draw() {
        seed_elections(Some(7));
        let first = timeouts();
        seed_elections(Some(7));
        assert_eq!(timeouts(), first, "the same seed drew different timeouts");
        seed_elections(Some(8));
        assert_ne!(timeouts(), first, "another seed drew the same timeouts");
        seed_elections(None);
        let unseeded = timeouts();
        assert!(unseeded.iter().all(|t| (200..400).contains(t)));
        // Another thread is not seeded by this one.
        seed_elections(Some(7));
        let elsewhere = std::thread::spawn(timeouts).join().unwrap_or_default();
        assert_ne!(elsewhere, first);
        seed_elections(None);
    }
}
