//! The clock seam. Wall-clock time is read only here: [`wall`] for the process, and
//! [`Clock`] where a component is handed a clock (the commands Raft stamps). Monotonic
//! time is tokio's (`tokio::time::Instant`), which the simulator drives already.
//!
//! A production node never installs a clock and reads the system's. The simulator
//! installs one function for the whole process, before any node starts, that answers
//! with virtual time plus the offset of the host it is called from, so nodes can
//! disagree about the time as real machines do. A function pointer, not a trait object
//! on every component: the wall clock is read on the request path (rate-limit windows,
//! the `Date` header), and this costs one atomic load there.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static INSTALLED: OnceLock<fn() -> Duration> = OnceLock::new();

/// Makes [`wall`] answer with `clock` for the rest of the process. Once per process:
/// a second clock is refused, so no node can see time from two sources.
pub fn install_wall_clock(clock: fn() -> Duration) -> Result<(), &'static str> {
    INSTALLED.set(clock).map_err(|_| "a wall clock is already installed in this process")
}

/// Time since the Unix epoch: the installed clock's, or the system's.
#[inline]
pub fn wall() -> Duration {
    match INSTALLED.get() {
        Some(clock) => clock(),
        // Before the epoch only on a machine whose clock is broken; 0 then.
        #[allow(clippy::disallowed_methods)]
        None => SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
    }
}

/// [`wall`] as a `SystemTime` (HTTP dates).
pub fn wall_time() -> SystemTime {
    UNIX_EPOCH + wall()
}

/// [`wall`] in milliseconds.
pub fn wall_ms() -> u64 {
    wall().as_millis() as u64
}

/// Wall-clock seconds since the Unix epoch, for a component handed a clock.
pub trait Clock: Send + Sync + 'static {
    fn now_s(&self) -> i64;
}

/// The process's wall clock ([`wall`]).
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_s(&self) -> i64 {
        wall().as_secs() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_installed_clock_the_wall_is_the_systems() {
        #[allow(clippy::disallowed_methods)]
        let system = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        assert!(wall().abs_diff(system) < Duration::from_secs(5));
        assert_eq!(SystemClock.now_s() / 10, system.as_secs() as i64 / 10);
    }
}
