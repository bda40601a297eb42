//! The wall-clock seam: once the simulator installs its clock, every wall-clock read of
//! the node answers with it (its own process: the clock is process-wide).

use std::time::{Duration, UNIX_EPOCH};

use tollgate_node::clock::{install_wall_clock, wall, wall_ms, wall_time, Clock, SystemClock};

/// A virtual time far from the machine's, so a read of the system clock cannot pass.
fn virtual_now() -> Duration {
    Duration::from_millis(1_000_000_250)
}

fn another_clock() -> Duration {
    Duration::ZERO
}

#[test]
fn an_installed_wall_clock_is_what_the_node_reads() {
    install_wall_clock(virtual_now).expect("the first clock installs");
    assert_eq!(wall(), virtual_now());
    assert_eq!(wall_ms(), 1_000_000_250);
    // Raft's command stamps (and every other reader, through `wall`), and HTTP dates.
    assert_eq!(SystemClock.now_s(), 1_000_000);
    assert_eq!(httpdate::fmt_http_date(wall_time()), httpdate::fmt_http_date(UNIX_EPOCH + virtual_now()));
    // One source of time per process.
    assert!(install_wall_clock(another_clock).is_err());
    assert_eq!(wall(), virtual_now());
}
