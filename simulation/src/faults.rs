//! The faults a seed chooses, inflicted on the simulation and undone when their time
//! comes (or all at once when the safety phase ends).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore};

use crate::world::{data_dir, host, Shared, ADMIN_HOST, BACKUP_HOST, UPSTREAM_HOST};

/// A fault the seed chose.
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

pub(crate) fn others(node: u64, nodes: u64) -> Vec<String> {
    (1..=nodes).filter(|other| *other != node).map(host).collect()
}

pub(crate) fn inflict(sim: &mut turmoil::Sim, nodes: u64, fault: Fault, record: &Shared, rng: &mut StdRng) -> Heal {
    let now = sim.elapsed();
    let mut record = record.borrow_mut();
    record.faults += 1;
    let (line, for_ms) = match fault {
        Fault::Isolate { node, for_ms } => {
            for other in others(node, nodes) {
                sim.partition(host(node), other);
            }
            (format!("fault isolate {}", host(node)), for_ms)
        }
        Fault::OneWay { from, to, for_ms } => {
            sim.partition_oneway(host(from), host(to));
            (format!("fault drop {} -> {}", host(from), host(to)), for_ms)
        }
        Fault::Hold { node, for_ms } => {
            for other in others(node, nodes) {
                sim.hold(host(node), other);
            }
            (format!("fault hold {}", host(node)), for_ms)
        }
        Fault::CutClient { node, for_ms } => {
            sim.partition(ADMIN_HOST, host(node));
            (format!("fault cut admin from {}", host(node)), for_ms)
        }
        Fault::Crash { node, for_ms } => (format!("fault crash {}", crash(sim, node, nodes, rng)), for_ms),
        Fault::UpstreamDown { for_ms } => {
            sim.crash(UPSTREAM_HOST);
            ("fault upstream down".to_string(), for_ms)
        }
        Fault::Lossy { node, for_ms } => {
            for other in others(node, nodes) {
                sim.set_link_fail_rate(host(node), other, LOSS_RATE);
            }
            (format!("fault lossy {}", host(node)), for_ms)
        }
        Fault::Slow { node, max_ms, for_ms } => {
            for other in others(node, nodes) {
                sim.set_link_max_message_latency(host(node), other, Duration::from_millis(max_ms));
            }
            (format!("fault slow {} up to {max_ms} ms", host(node)), for_ms)
        }
        Fault::RestartAll { for_ms } => {
            let crashed: Vec<String> = (1..=nodes).map(|node| crash(sim, node, nodes, rng)).collect();
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
fn crash(sim: &mut turmoil::Sim, node: u64, nodes: u64, rng: &mut StdRng) -> String {
    let peers: Vec<String> =
        others(node, nodes).into_iter().chain([ADMIN_HOST, UPSTREAM_HOST, BACKUP_HOST].map(String::from)).collect();
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
pub(crate) fn heal(sim: &mut turmoil::Sim, nodes: u64, active: &mut Vec<Heal>, record: &Shared, all: bool) {
    let now = sim.elapsed();
    let (due, kept): (Vec<Heal>, Vec<Heal>) = active.drain(..).partition(|heal| all || heal.at <= now);
    *active = kept;
    for heal in due {
        let line = match heal.fault {
            Fault::Isolate { node, .. } => {
                for other in others(node, nodes) {
                    sim.repair(host(node), other);
                }
                format!("heal isolate {}", host(node))
            }
            Fault::OneWay { from, to, .. } => {
                sim.repair_oneway(host(from), host(to));
                format!("heal drop {} -> {}", host(from), host(to))
            }
            Fault::Hold { node, .. } => {
                for other in others(node, nodes) {
                    sim.release(host(node), other);
                }
                format!("heal hold {}", host(node))
            }
            Fault::CutClient { node, .. } => {
                sim.repair(ADMIN_HOST, host(node));
                format!("heal admin to {}", host(node))
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
                for other in others(node, nodes) {
                    sim.set_link_fail_rate(host(node), other, 0.0);
                }
                format!("heal lossy {}", host(node))
            }
            Fault::Slow { node, .. } => {
                for other in others(node, nodes) {
                    sim.set_link_max_message_latency(host(node), other, LATENCY_MAX);
                }
                format!("heal slow {}", host(node))
            }
            Fault::RestartAll { .. } => {
                for node in 1..=nodes {
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
