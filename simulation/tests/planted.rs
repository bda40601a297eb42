//! Planted bugs (`raft-store`'s `planted`): each invariant catches the bug it is
//! meant to, within a stated number of seeds.

use std::time::Duration;

use tollgate_raft_store::planted::Bug;
use tollgate_simulation::run::{run, Options};

fn options(seed: u64) -> Options {
    Options { seed, nodes: 3, duration: Duration::from_secs(10), plant: None }
}

/// Each planted bug is caught within [`PLANTED_SEEDS`] seeds, by the invariant meant
/// to catch it.
const PLANTED_SEEDS: u64 = 10;

fn caught(bug: Bug, invariants: &[&str]) {
    for seed in 1..=PLANTED_SEEDS {
        let outcome = run(&Options { plant: Some(bug), ..options(seed) });
        if let Some(failure) = outcome.failure {
            assert!(
                invariants.contains(&failure.invariant),
                "{}: seed {seed} failed {} instead: {}",
                bug.name(),
                failure.invariant,
                failure.detail
            );
            tollgate_raft_store::planted::plant(None);
            return;
        }
    }
    tollgate_raft_store::planted::plant(None);
    panic!("{} was not caught within {PLANTED_SEEDS} seeds", bug.name());
}

/// One test, the bugs in turn: a planted bug is planted for the whole process, so
/// no other run may share it (this file is its own test binary).
#[test]
fn each_planted_bug_is_caught_by_its_invariant() {
    // Reads answered from the node's own state, without the read barrier: a lagging
    // follower or a deposed leader answers stale.
    caught(Bug::StaleReads, &["CFG2"]);
    // Writes answered before Raft commits them: one that is then lost is seen missing
    // by the final read (CFG1), or by a read in between (CFG2).
    caught(Bug::AckBeforeCommit, &["CFG1", "CFG2"]);
    // The quota ledger grants up to twice the limit: the proxy admits past it.
    caught(Bug::GrantPastLimit, &["RL1"]);
}
