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
    /// A snapshot restores the config but an empty quota ledger: what was used before
    /// the snapshot is forgotten at a restart (RL2).
    ForgetLedger = 8,
    /// The health checker believes only its own probes, not the results other
    /// nodes share by gossip (HC1).
    LocalHealthOnly = 16,
    /// The publisher drops every other applied batch: the proxy can be left serving
    /// an older config than the node applied (CFG4).
    DropPublish = 32,
    /// The committed index is not read back at a start: a restarted node serves its
    /// snapshot's older state until the leader tells it the commit index (CFG3).
    ForgetCommitted = 64,
    /// A member's removal is acknowledged and not made: the leader answers
    /// `DELETE /cluster/members/{id}` without changing the membership (the
    /// simulator's membership check).
    KeepRemoved = 128,
}

impl Bug {
    pub const ALL: [Bug; 8] = [
        Bug::AckBeforeCommit,
        Bug::StaleReads,
        Bug::GrantPastLimit,
        Bug::ForgetLedger,
        Bug::LocalHealthOnly,
        Bug::DropPublish,
        Bug::ForgetCommitted,
        Bug::KeepRemoved,
    ];

    /// The invariant that catches it.
    pub fn invariant(self) -> &'static str {
        match self {
            Bug::AckBeforeCommit => "CFG1",
            Bug::StaleReads => "CFG2",
            Bug::GrantPastLimit => "RL1",
            Bug::ForgetLedger => "RL2",
            Bug::LocalHealthOnly => "HC1",
            Bug::DropPublish => "CFG4",
            Bug::ForgetCommitted => "CFG3",
            Bug::KeepRemoved => "membership",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeCommit => "ack-before-commit",
            Bug::StaleReads => "stale-reads",
            Bug::GrantPastLimit => "grant-past-limit",
            Bug::ForgetLedger => "forget-ledger",
            Bug::LocalHealthOnly => "local-health-only",
            Bug::DropPublish => "drop-publish",
            Bug::ForgetCommitted => "forget-committed",
            Bug::KeepRemoved => "keep-removed",
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
