//! Planted bugs: test-only switches the simulator turns on to show that each of its
//! invariants catches the bug it is meant to (issue 15). A production process never
//! plants one; each site costs one relaxed atomic load, and none is on the proxy's
//! request path.

use std::sync::atomic::{AtomicU32, Ordering};

/// A bug that can be planted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Bug {
    /// The Admin API acknowledges a write before Raft commits it (CFG1).
    AckBeforeCommit = 1,
    /// Admin reads skip the read barrier: a deposed leader or a lagging follower
    /// answers from what it holds (CFG2).
    StaleReads = 2,
    /// The quota ledger grants up to twice a key's limit (RL1).
    GrantPastLimit = 4,
}

impl Bug {
    pub const ALL: [Bug; 3] = [Bug::AckBeforeCommit, Bug::StaleReads, Bug::GrantPastLimit];

    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeCommit => "ack-before-commit",
            Bug::StaleReads => "stale-reads",
            Bug::GrantPastLimit => "grant-past-limit",
        }
    }

    pub fn parse(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|bug| bug.name() == name)
    }
}

static PLANTED: AtomicU32 = AtomicU32::new(0);

/// Plants `bug` (or nothing, `None`) for the rest of the process, replacing any other.
pub fn plant(bug: Option<Bug>) {
    PLANTED.store(bug.map_or(0, |bug| bug as u32), Ordering::Relaxed);
}

/// Whether `bug` is planted.
#[inline]
pub fn planted(bug: Bug) -> bool {
    PLANTED.load(Ordering::Relaxed) & bug as u32 != 0
}
