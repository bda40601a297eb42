//! Seeds the simulator found bugs with, kept as regressions, and the fixed range CI
//! runs. Runs are sequential: one test per binary (simulation/README.md).

use std::time::Duration;

use tollgate_simulation::run::{run, Options};

/// The seeds CI runs on every change (debug build, about four minutes on two cores).
const CI_SEEDS: std::ops::RangeInclusive<u64> = 1..=80;

/// Seeds that fail on the code before a fix, under the current workload (the comments
/// at the fixes; simulation/README.md's "Bugs found").
const FOUND: [u64; 4] = [
    // An isolated leader's failed read barriers were retried at once, because the
    // retry waited for "any change in Raft's metrics", which a leader's metrics make
    // all the time: thousands of read barriers, each dialling both peers, in one
    // instant of simulated time, until the host ran out of ports. Now a retry waits
    // for a new leader or term, or the retry pause (`cluster::attempt_on_leader`).
    // Found by seed 2 of the first workload; 36, 56 and 57 run out of ports with the
    // old retry under this one (seeds 1–80 run on the old code, replacements and clock
    // steps in the runs: 36 and 56 fail; 30 and 57 abort the process while a panic
    // unwinds).
    36, 56, 57,
    // A leader whose clock was stepped ahead ended a second's window early in the
    // quota ledger, and leader time going back opened it afresh: its limit granted
    // twice. The ledger's clock now never goes back (`quota::QuotaLedger`). Seeds 7,
    // 11, 51, 63, 67, 69 and 95 of 1–100 failed RL1/RL2 on the code before; those
    // past the CI range are kept here.
    95,
];

fn options(seed: u64) -> Options {
    Options { seed, nodes: 3, duration: Duration::from_secs(10), plant: None }
}

#[test]
fn found_seeds_and_the_ci_range_run_clean() {
    let mut failures = Vec::new();
    for seed in FOUND.into_iter().chain(CI_SEEDS) {
        let outcome = run(&options(seed));
        if let Some(failure) = outcome.failure {
            failures
                .push(format!("seed {seed}: invariant {}: {}\n{}", failure.invariant, failure.detail, failure.history));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
