//! Planted bugs (`raft-store`'s `planted`): each invariant catches the bug it is
//! meant to, within a stated number of seeds.

use std::time::Duration;

use tollgate_raft_store::planted::Bug;
use tollgate_simulation::run::{run, Options};

fn options(seed: u64) -> Options {
    Options { seed, nodes: 3, duration: Duration::from_secs(10), plant: None }
}

/// Each planted bug is caught within [`PLANTED_SEEDS`] seeds, by the invariant meant
/// to catch it (`Bug::invariant`).
const PLANTED_SEEDS: u64 = 20;

/// The first seed that catches `bug`, and the invariant that did.
fn caught(bug: Bug, also: &[&str]) -> u64 {
    for seed in 1..=PLANTED_SEEDS {
        let outcome = run(&Options { plant: Some(bug), ..options(seed) });
        if let Some(failure) = outcome.failure {
            tollgate_raft_store::planted::plant(None);
            assert!(
                failure.invariant == bug.invariant() || also.contains(&failure.invariant),
                "{}: seed {seed} failed {} instead of {}: {}",
                bug.name(),
                failure.invariant,
                bug.invariant(),
                failure.detail
            );
            return seed;
        }
    }
    tollgate_raft_store::planted::plant(None);
    panic!("{} was not caught within {PLANTED_SEEDS} seeds", bug.name());
}

/// One test, the bugs in turn: a planted bug is planted for the whole process, so
/// no other run may share it (this file is its own test binary).
#[test]
fn each_planted_bug_is_caught_by_its_invariant() {
    let mut seeds = Vec::new();
    for bug in Bug::ALL {
        let also: &[&str] = match bug {
            // A write answered before Raft commits it and then lost is seen missing by
            // the final read (CFG1), or by a read in between (CFG2), or, when it was
            // the pool's live target, by the health check's streak (HC1).
            Bug::AckBeforeCommit => &["CFG2", "HC1"],
            _ => &[],
        };
        seeds.push(format!("{} by seed {}", bug.name(), caught(bug, also)));
    }
    eprintln!("caught: {}", seeds.join(", "));
}
