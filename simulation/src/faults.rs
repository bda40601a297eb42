//! The faults a seed chooses, inflicted on the simulation and undone when their time
//! comes (or all at once when the safety phase ends).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore};

use crate::world::{
    data_dir, host, members, now_ms_of, Record, Shared, ADMIN_HOST, BACKUP_HOST, CLOCK_JUMP_CHANCE, CLOCK_JUMP_FOR_MS,
    CLOCK_JUMP_MAX_MS, CLOCK_JUMP_MIN_MS, REPLACE_AFTER, REPLACE_BEFORE, REPLACE_CHANCE, UPSTREAM_HOST,
};

/// A fault the seed chose. Its nodes are slots when scheduled ([`Record::members`]),
/// the nodes in them once inflicted.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    /// The node cannot reach the other nodes nor they it.
    Isolate { node: u64, for_ms: u64 },
    /// What `from` sends to `to` is lost.
    OneWay { from: u64, to: u64, for_ms: u64 },
    /// The node's links to the other nodes hold every message (a long pause).
    Hold { node: u64, for_ms: u64 },
    /// The admin client cannot reach the node.
    CutClient { node: u64, for_ms: u64 },
    /// The node's machine dies (unsynced writes kept, lost or torn) and restarts.
    Crash { node: u64, for_ms: u64 },
    /// The upstream target dies, and revives.
    UpstreamDown { for_ms: u64 },
    /// The node's links to the other nodes lose messages at random (each send has a
    /// [`LOSS_RATE`] chance to break the link and drop what is on it).
    Lossy { node: u64, for_ms: u64 },
    /// The node's links to the other nodes take up to `max_ms` per message.
    Slow { node: u64, max_ms: u64, for_ms: u64 },
    /// Every node dies at once (each disk keeps, loses or tears its unsynced writes)
    /// and they all restart: a full restart.
    RestartAll { for_ms: u64 },
    /// The backup target fails its health probes (HTTP 500), while still answering
    /// proxied requests.
    Sick { for_ms: u64 },
}

/// What a lossy link's sends risk: turmoil breaks the link (dropping what is in
/// flight on it) with this chance per send, and repairs it at the next.
pub(crate) const LOSS_RATE: f64 = 0.02;
/// Longest a full restart keeps every node down: longer, and the run's liveness
/// phase is mostly an election.
const FULL_RESTART_MAX_MS: u64 = 1_500;
/// The message latency of a healthy link, at most.
pub(crate) const LATENCY_MAX: Duration = Duration::from_millis(8);

/// How to undo an inflicted fault, and when.
pub(crate) struct Heal {
    at: Duration,
    fault: Fault,
}

pub(crate) fn schedule(rng: &mut StdRng, nodes: u64, from: Duration, until: Duration) -> Vec<(Duration, Fault)> {
    let mut faults = Vec::new();
    let mut at = from;
    loop {
        at += Duration::from_millis(rng.gen_range(500..2_500));
        if at >= until {
            return faults;
        }
        let node = rng.gen_range(1..=nodes);
        let for_ms = rng.gen_range(300..3_000);
        let fault = match rng.gen_range(0..10) {
            0 => Fault::Isolate { node, for_ms },
            1 => {
                let to = (node % nodes) + 1;
                Fault::OneWay { from: node, to, for_ms }
            }
            2 => Fault::Hold { node, for_ms },
            3 => Fault::CutClient { node, for_ms },
            4 => Fault::Crash { node, for_ms },
            5 => Fault::UpstreamDown { for_ms },
            6 => Fault::Lossy { node, for_ms },
            7 => Fault::Slow { node, max_ms: rng.gen_range(50..500), for_ms },
            8 => Fault::RestartAll { for_ms: for_ms.min(FULL_RESTART_MAX_MS) },
            _ => Fault::Sick { for_ms },
        };
        faults.push((at, fault));
        at += Duration::from_millis(for_ms);
    }
}

/// The other members' hosts.
pub(crate) fn others(node: u64, members: &[u64]) -> Vec<String> {
    members.iter().filter(|other| **other != node).map(|other| host(*other)).collect()
}

impl Fault {
    /// The fault on the nodes that hold its slots now.
    fn resolve(self, record: &Record) -> Fault {
        match self {
            Fault::Isolate { node, for_ms } => Fault::Isolate { node: record.member(node), for_ms },
            Fault::OneWay { from, to, for_ms } => {
                Fault::OneWay { from: record.member(from), to: record.member(to), for_ms }
            }
            Fault::Hold { node, for_ms } => Fault::Hold { node: record.member(node), for_ms },
            Fault::CutClient { node, for_ms } => Fault::CutClient { node: record.member(node), for_ms },
            Fault::Crash { node, for_ms } => Fault::Crash { node: record.member(node), for_ms },
            Fault::Lossy { node, for_ms } => Fault::Lossy { node: record.member(node), for_ms },
            Fault::Slow { node, max_ms, for_ms } => Fault::Slow { node: record.member(node), max_ms, for_ms },
            Fault::UpstreamDown { .. } | Fault::RestartAll { .. } | Fault::Sick { .. } => self,
        }
    }
}

pub(crate) fn inflict(sim: &mut turmoil::Sim, fault: Fault, record: &Shared, rng: &mut StdRng) -> Heal {
    let now = sim.elapsed();
    let members = members(record);
    let mut record = record.borrow_mut();
    record.faults += 1;
    let fault = fault.resolve(&record);
    let (line, for_ms) = match fault {
        Fault::Isolate { node, for_ms } => {
            for other in others(node, &members) {
                sim.partition(host(node), other);
            }
            (format!("fault isolate {}", host(node)), for_ms)
        }
        Fault::OneWay { from, to, for_ms } => {
            sim.partition_oneway(host(from), host(to));
            (format!("fault drop {} -> {}", host(from), host(to)), for_ms)
        }
        Fault::Hold { node, for_ms } => {
            for other in others(node, &members) {
                sim.hold(host(node), other);
            }
            (format!("fault hold {}", host(node)), for_ms)
        }
        Fault::CutClient { node, for_ms } => {
            sim.partition(ADMIN_HOST, host(node));
            (format!("fault cut admin from {}", host(node)), for_ms)
        }
        Fault::Crash { node, for_ms } => (format!("fault crash {}", crash(sim, node, &members, rng)), for_ms),
        Fault::UpstreamDown { for_ms } => {
            sim.crash(UPSTREAM_HOST);
            ("fault upstream down".to_string(), for_ms)
        }
        Fault::Lossy { node, for_ms } => {
            for other in others(node, &members) {
                sim.set_link_fail_rate(host(node), other, LOSS_RATE);
            }
            (format!("fault lossy {}", host(node)), for_ms)
        }
        Fault::Slow { node, max_ms, for_ms } => {
            for other in others(node, &members) {
                sim.set_link_max_message_latency(host(node), other, Duration::from_millis(max_ms));
            }
            (format!("fault slow {} up to {max_ms} ms", host(node)), for_ms)
        }
        Fault::RestartAll { for_ms } => {
            let crashed: Vec<String> = members.iter().map(|node| crash(sim, *node, &members, rng)).collect();
            (format!("fault crash all: {}", crashed.join(", ")), for_ms)
        }
        Fault::Sick { for_ms } => {
            crate::workload::set_sick(true);
            ("fault backup sick".to_string(), for_ms)
        }
    };
    record.trace.push_at(now, format!("{line} for {for_ms} ms"));

    Heal { at: now + Duration::from_millis(for_ms), fault }
}

/// Crashes `node`'s host and its disk; says what the disk did with unsynced writes.
///
/// The machine's links are cut for the crash itself: a dead machine sends nothing (no
/// FIN, no RST), and the connections its process held are dropped in the order of the
/// maps that held them (hyper-util's pool among them: std `HashMap`s, whose order is
/// drawn per map), so closes sent through turmoil would draw latencies from the run's
/// generator in an order no seed decides.
pub(crate) fn crash(sim: &mut turmoil::Sim, node: u64, members: &[u64], rng: &mut StdRng) -> String {
    let peers: Vec<String> =
        others(node, members).into_iter().chain([ADMIN_HOST, UPSTREAM_HOST, BACKUP_HOST].map(String::from)).collect();
    for peer in &peers {
        sim.partition(host(node), peer.as_str());
    }
    sim.crash(host(node));
    for peer in &peers {
        sim.repair(host(node), peer.as_str());
    }
    let report = crate::env::disk(&data_dir(node)).crash(rng.next_u64());
    format!("{} (unsynced writes: {} kept, {} lost, {} torn)", host(node), report.kept, report.lost, report.torn)
}

/// Undoes the active faults whose time has come, or all of them (`all`).
pub(crate) fn heal(sim: &mut turmoil::Sim, active: &mut Vec<Heal>, record: &Shared, all: bool) {
    let now = sim.elapsed();
    let members = members(record);
    let (due, kept): (Vec<Heal>, Vec<Heal>) = active.drain(..).partition(|heal| all || heal.at <= now);
    *active = kept;
    for heal in due {
        let line = match heal.fault {
            Fault::Isolate { node, .. } => {
                for other in others(node, &members) {
                    sim.repair(host(node), other);
                }
                format!("heal isolate {}", host(node))
            }
            Fault::OneWay { from, to, .. } => {
                sim.repair_oneway(host(from), host(to));
                format!("heal drop {} -> {}", host(from), host(to))
            }
            Fault::Hold { node, .. } => {
                for other in others(node, &members) {
                    sim.release(host(node), other);
                }
                format!("heal hold {}", host(node))
            }
            Fault::CutClient { node, .. } => {
                sim.repair(ADMIN_HOST, host(node));
                format!("heal admin to {}", host(node))
            }
            Fault::Crash { node, .. } if record.borrow().retired.contains(&node) => {
                format!("{} stays down: it was replaced", host(node))
            }
            Fault::Crash { node, .. } => {
                sim.bounce(host(node));
                record.borrow_mut().restarts.push((sim.elapsed().as_millis() as u64, node));
                format!("restart {}", host(node))
            }
            Fault::UpstreamDown { .. } => {
                sim.bounce(UPSTREAM_HOST);
                "upstream revived".to_string()
            }
            Fault::Lossy { node, .. } => {
                for other in others(node, &members) {
                    sim.set_link_fail_rate(host(node), other, 0.0);
                }
                format!("heal lossy {}", host(node))
            }
            Fault::Slow { node, .. } => {
                for other in others(node, &members) {
                    sim.set_link_max_message_latency(host(node), other, LATENCY_MAX);
                }
                format!("heal slow {}", host(node))
            }
            Fault::RestartAll { .. } => {
                for &node in &members {
                    sim.bounce(host(node));
                    record.borrow_mut().restarts.push((sim.elapsed().as_millis() as u64, node));
                }
                "restart all".to_string()
            }
            Fault::Sick { .. } => {
                crate::workload::set_sick(false);
                "backup well".to_string()
            }
        };
        record.borrow_mut().trace.push_at(sim.elapsed(), line);
    }
}

/// When a run replaces a node, and which slot's: drawn from `rng` (the run's own
/// generator for it), `None` for the runs that do not.
pub(crate) fn plan_replacement(
    rng: &mut StdRng,
    nodes: u64,
    from: Duration,
    until: Duration,
) -> Option<(Duration, u64)> {
    let earliest = from + REPLACE_AFTER;
    let latest = until.checked_sub(REPLACE_BEFORE)?;
    if !rng.gen_bool(REPLACE_CHANCE) || latest <= earliest {
        return None;
    }
    let at = rng.gen_range(earliest.as_millis() as u64..latest.as_millis() as u64);
    Some((Duration::from_millis(at), rng.gen_range(1..=nodes)))
}

/// Replaces the node in `slot` by node `new`, as an operator replaces a machine that
/// died: the old machine crashes for good (its disk with it), the new node takes its
/// slot, and the operator (`workload::operator`) removes the old one from Raft once
/// the new one has joined. Starting the new node's host is the caller's.
pub(crate) fn replace(sim: &mut turmoil::Sim, slot: u64, new: u64, record: &Shared, rng: &mut StdRng) {
    let members = members(record);
    let old = record.borrow().member(slot);
    let crashed = crash(sim, old, &members, rng);
    let mut record = record.borrow_mut();
    record.members[slot as usize - 1] = new;
    record.retired.push(old);
    record.replacing.push((old, new));
    record.faults += 1;
    record.trace.push_at(sim.elapsed(), format!("fault replace {crashed} by {}", host(new)));
}

/// A step of one node's wall clock, undone `for_ms` later.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClockJump {
    pub(crate) at: Duration,
    slot: u64,
    by_ms: i64,
    for_ms: u64,
}

/// A jump that was made: when to undo it, whose clock, and the offset it had.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Jumped {
    pub(crate) until: Duration,
    node: u64,
    offset_ms: i64,
}

/// Whether a run steps a clock, when, whose, by how much and for how long: drawn from
/// `rng` (the run's own generator for it), `None` for the runs that do not.
pub(crate) fn plan_clock_jump(rng: &mut StdRng, nodes: u64, from: Duration, until: Duration) -> Option<ClockJump> {
    if !rng.gen_bool(CLOCK_JUMP_CHANCE) || until <= from {
        return None;
    }
    let at = Duration::from_millis(rng.gen_range(from.as_millis() as u64..until.as_millis() as u64));
    let slot = rng.gen_range(1..=nodes);
    let size = rng.gen_range(CLOCK_JUMP_MIN_MS..=CLOCK_JUMP_MAX_MS);
    let by_ms = if rng.gen_bool(0.5) { size } else { -size };
    Some(ClockJump { at, slot, by_ms, for_ms: rng.gen_range(CLOCK_JUMP_FOR_MS) })
}

/// Sets `node`'s wall clock `offset_ms` off simulated time from now on, and records it.
pub(crate) fn set_clock(sim: &turmoil::Sim, node: u64, offset_ms: i64, record: &Shared) {
    crate::env::set_clock_offset(node, offset_ms);
    let now = sim.elapsed();
    let mut record = record.borrow_mut();
    record.offsets.entry(node).or_default().push((now_ms_of(now), offset_ms));
    record.trace.push_at(now, format!("{} clock offset {offset_ms} ms", host(node)));
}

/// Steps the clock of the node in the jump's slot.
pub(crate) fn jump_clock(sim: &turmoil::Sim, jump: ClockJump, record: &Shared) -> Jumped {
    let now = sim.elapsed();
    let (node, offset_ms) = {
        let record = record.borrow();
        let node = record.member(jump.slot);
        (node, record.offset(node, now_ms_of(now)))
    };
    record
        .borrow_mut()
        .trace
        .push_at(now, format!("fault clock of {} steps {} ms for {} ms", host(node), jump.by_ms, jump.for_ms));
    record.borrow_mut().faults += 1;
    set_clock(sim, node, offset_ms + jump.by_ms, record);
    Jumped { until: now + Duration::from_millis(jump.for_ms), node, offset_ms }
}

/// Undoes a clock jump: the node's clock is right again (stepped back).
pub(crate) fn undo_jump(sim: &turmoil::Sim, jumped: Jumped, record: &Shared) {
    record.borrow_mut().trace.push_at(sim.elapsed(), format!("heal clock of {}", host(jumped.node)));
    set_clock(sim, jumped.node, jumped.offset_ms, record);
}
