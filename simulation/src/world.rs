//! What every part of a run shares: its constants, its options, the trace, and the
//! record the clients fill in and the checks read.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use crate::linearizability::Operation;

/// How long after healing every node must serve the same last version.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(20);
/// Admin clients writing and reading at once.
pub const CLIENTS: u64 = 3;
/// Services the clients work on (one register each).
pub const KEYS: usize = 4;
/// Longest a client waits for an answer before calling it indeterminate.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the status monitor asks every node for its applied version.
pub(crate) const STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// The hosts that are not nodes: the clients, and the two upstream targets.
pub(crate) const ADMIN_HOST: &str = "admin";
pub(crate) const UPSTREAM_HOST: &str = "upstream";
pub(crate) const BACKUP_HOST: &str = "backup";
/// Attempts at one setup step before the run goes on without the proxy workload, each
/// through the next node, and the pause between them.
pub(crate) const ATTEMPTS_MAX: u64 = 20;
pub(crate) const ATTEMPT_PAUSE: Duration = Duration::from_millis(100);
/// How often, and how many times, the setup asks whether every node serves it.
pub(crate) const SERVING_POLL: Duration = Duration::from_millis(50);
pub(crate) const SERVING_POLLS_MAX: u32 = 40;
/// Attempts at a final read after healing, and the pause between them.
pub(crate) const FINAL_READ_ATTEMPTS: u32 = 10;
pub(crate) const FINAL_READ_PAUSE: Duration = Duration::from_millis(200);
/// The ports every simulated node listens on.
pub(crate) const ADMIN_PORT: u16 = 8001;
pub(crate) const PROXY_PORT: u16 = 8000;
pub(crate) const CLUSTER_PORT: u16 = 7946;
pub(crate) const ADMIN_TOKEN: &str = "sim-admin-token";
pub(crate) const CLUSTER_SECRET: &str = "sim-cluster-secret";
/// How long after healing every node must have stopped routing to a target the
/// cluster knows is down: the prober's detection (a 1 s interval, a timeout of 1 s,
/// a threshold of 1), a gossip round (0.5 s), and up to 2 s for a node that was cut
/// off to be seen live again, with room to spare.
pub const HEALTH_BOUND: Duration = Duration::from_secs(10);
/// Largest offset of a node's wall clock from simulated time, either way.
pub const CLOCK_OFFSET_MAX_MS: i64 = 400;
/// The chance that a run steps one node's wall clock (an NTP step, a VM resumed),
/// drawn from its own generator; the step is by [`CLOCK_JUMP_MIN_MS`] to
/// [`CLOCK_JUMP_MAX_MS`] either way and is undone after [`CLOCK_JUMP_FOR_MS`]. A step
/// back of more than the time since the epoch puts the node in 2025: every window kind
/// rolls over.
pub(crate) const CLOCK_JUMP_CHANCE: f64 = 0.5;
pub(crate) const CLOCK_JUMP_MIN_MS: i64 = 1_000;
pub const CLOCK_JUMP_MAX_MS: i64 = 5_000;
/// How long a clock stays stepped, in milliseconds.
pub(crate) const CLOCK_JUMP_FOR_MS: std::ops::Range<u64> = 1_000..4_000;
/// Proxy clients sending through every node at once (one rate-limit key: they share
/// an address).
pub const PROXY_CLIENTS: u64 = 2;
pub(crate) const UPSTREAM_PORT: u16 = 80;
/// Raft log entries between snapshots: the configurable minimum, so that runs build,
/// send and restore snapshots (with the quota ledger in them) many times.
pub(crate) const SNAPSHOT_LOGS: u64 = 100;
/// Longest a proxy client waits for an answer.
pub(crate) const PROXY_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections a simulated listener queues before accepting them.
pub(crate) const TCP_BACKLOG: usize = 4096;
/// The first fault comes after the cluster had this long to elect.
pub(crate) const FIRST_FAULT_AT: Duration = Duration::from_secs(2);
/// The chance that a run replaces one of its nodes (a membership change), drawn from
/// its own generator so that runs without one keep their schedules.
pub(crate) const REPLACE_CHANCE: f64 = 0.5;
/// A replacement comes this long after the first fault at the earliest, and this long
/// before the safety phase ends at the latest (the operator's add and remove run into
/// the faults after it).
pub(crate) const REPLACE_AFTER: Duration = Duration::from_secs(1);
pub(crate) const REPLACE_BEFORE: Duration = Duration::from_secs(4);
/// How often the operator asks whether the replacement joined, or sends the removal
/// again.
pub(crate) const OPERATOR_POLL: Duration = Duration::from_millis(200);

/// What one run is.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub nodes: u64,
    /// The safety phase.
    pub duration: Duration,
    /// A planted bug (test-only), to show the invariants catch it.
    pub plant: Option<tollgate_raft_store::planted::Bug>,
}

/// An invariant that did not hold.
#[derive(Clone, Debug)]
pub struct Failure {
    pub invariant: &'static str,
    pub detail: String,
    /// The events that led there, readable.
    pub history: String,
}

/// What one run found.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    /// FNV-1a of the trace.
    pub trace: u64,
    pub operations: usize,
    pub faults: usize,
    pub failure: Option<Failure>,
    /// Every event, one line each (`--verbose`).
    pub events: Vec<String>,
}

/// The run's event log.
#[derive(Default)]
pub(crate) struct Trace {
    pub(crate) events: Vec<String>,
}

impl Trace {
    /// An event of a host, at its simulated time.
    pub(crate) fn push(&mut self, line: String) {
        self.push_at(Duration::from_millis(now_ms()), line);
    }

    /// An event of the driver (faults, healing), at the simulation's time.
    pub(crate) fn push_at(&mut self, at: Duration, line: String) {
        self.events.push(format!("{:>7} {line}", at.as_millis()));
    }

    pub(crate) fn hash(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.events.iter().flat_map(|line| line.bytes().chain(std::iter::once(b'\n'))) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    }
}

/// What the clients recorded.
#[derive(Default)]
pub(crate) struct Record {
    pub(crate) trace: Trace,
    pub(crate) history: Vec<Operation>,
    /// Each node's wall-clock offsets from simulated time, in milliseconds, each from
    /// the simulated millisecond it took effect (a start, a clock jump, its undoing).
    pub(crate) offsets: BTreeMap<u64, Vec<(u64, i64)>>,
    /// Node boots after the first, (time, node): crashes and full restarts.
    pub(crate) restarts: Vec<(u64, u64)>,
    /// HC1: every node stopped routing to the sick target (`Ok`), or which did not.
    pub(crate) health: Option<Result<(), String>>,
    /// Per node: (time, applied config version) as `/status` reported it.
    pub(crate) statuses: BTreeMap<u64, Vec<(u64, u64)>>,
    pub(crate) converged: Option<Result<u64, String>>,
    /// After healing: every member's voters are the run's members (`Err`: who
    /// disagrees), once the replacement, if any, is done.
    pub(crate) membership: Option<Result<(), String>>,
    pub(crate) faults: usize,
    /// The rate limit's `fault_tolerant`, once the proxy route is configured.
    pub(crate) rate_limited: Option<bool>,
    /// Proxy requests, as the clients saw them.
    pub(crate) proxied: Vec<Proxied>,
    /// The cluster's nodes by slot: faults and clients pick a slot, and a replaced
    /// node's slot goes to its replacement. Node `i` holds slot `i` until then.
    pub(crate) members: Vec<u64>,
    /// Nodes replaced: their machines are gone for good.
    pub(crate) retired: Vec<u64>,
    /// Replacements the operator has yet to finish, (removed, added): the new node
    /// joins by itself (`--join`), then the operator removes the old one.
    pub(crate) replacing: Vec<(u64, u64)>,
}

impl Record {
    /// `node`'s wall-clock offset at simulated millisecond `at`.
    pub(crate) fn offset(&self, node: u64, at: u64) -> i64 {
        let changes = self.offsets.get(&node).map(Vec::as_slice).unwrap_or_default();
        changes.iter().take_while(|(from, _)| *from <= at).last().map_or(0, |(_, offset)| *offset)
    }

    /// The node that holds `slot` (1-based) now.
    pub(crate) fn member(&self, slot: u64) -> u64 {
        self.members.get(slot as usize - 1).copied().unwrap_or(slot)
    }
}

/// The cluster's nodes now.
pub(crate) fn members(record: &Shared) -> Vec<u64> {
    record.borrow().members.clone()
}

pub(crate) type Shared = Rc<RefCell<Record>>;

/// One proxy request.
pub(crate) struct Proxied {
    pub(crate) path: &'static str,
    pub(crate) node: u64,
    /// Sent and answered, in simulated milliseconds.
    pub(crate) call: u64,
    pub(crate) ret: u64,
    /// 0: no answer.
    pub(crate) status: u16,
}

/// Simulated milliseconds since the run began.
pub(crate) fn now_ms() -> u64 {
    now_ms_of(turmoil::sim_elapsed().unwrap_or_default())
}

/// `elapsed` in whole milliseconds.
pub(crate) fn now_ms_of(elapsed: Duration) -> u64 {
    elapsed.as_millis() as u64
}

pub(crate) fn host(id: u64) -> String {
    format!("node{id}")
}

pub(crate) fn data_dir(id: u64) -> PathBuf {
    PathBuf::from(format!("/sim/{}", host(id)))
}
