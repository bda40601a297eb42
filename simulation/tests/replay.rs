//! A seed replays bit for bit. One test in its own binary: runs of the simulator are
//! sequential on one thread (simulation/README.md, "Determinism").

use std::time::Duration;

use tollgate_simulation::run::{run, Options};

fn options(seed: u64) -> Options {
    Options { seed, nodes: 3, duration: Duration::from_secs(10), plant: None }
}

/// Seeds replayed: 10 has two full restarts (every node crashed at once), a node
/// replaced by a new one, and a clock step; 12 and 30 replayed differently from run to
/// run while the health checker started its probes in hash-set order (`health.rs`).
const SEEDS: [u64; 3] = [10, 12, 30];

/// The same seed twice in this process gives the same trace, and the `tollgate-simulation`
/// command in two other processes prints that trace too.
#[test]
fn a_seed_replays_bit_for_bit_in_one_process_and_in_two() {
    for seed in SEEDS {
        replays(seed);
    }
}

fn replays(seed: u64) {
    let first = run(&options(seed));
    let second = run(&options(seed));
    assert!(first.operations > 100, "seed {seed}: the workload ran: {} operations", first.operations);
    assert!(first.faults > 0, "seed {seed}: faults were inflicted");
    if let Some(at) = (0..first.events.len().max(second.events.len()))
        .find(|&index| first.events.get(index) != second.events.get(index))
    {
        let around = |events: &[String]| events[at.saturating_sub(3)..(at + 3).min(events.len())].join("\n");
        panic!(
            "seed {seed} ran differently in one process, from event {at}:\nfirst:\n{}\nsecond:\n{}",
            around(&first.events),
            around(&second.events)
        );
    }
    assert_eq!(first.trace, second.trace);
    let expected = format!("trace={:016x}", first.trace);
    for _ in 0..2 {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-simulation"))
            .args(["--seed", &seed.to_string(), "--nodes", "3", "--duration", "10"])
            .output()
            .expect("the simulation command runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");
        assert!(stdout.lines().next().is_some_and(|line| line.ends_with(&expected)), "{stdout}\nexpected {expected}");
    }
    // A different seed is a different run.
    assert_ne!(run(&options(seed + 1)).trace, first.trace);
}
