//! The invariants, checked on what the clients recorded once the run is over.

use std::collections::BTreeMap;

use crate::linearizability::{self, Action, Operation, Verdict};
use crate::workload::WINDOWS;
use crate::world::*;

/// The invariants, on what was recorded.
pub(crate) fn check(record: &Record) -> Option<Failure> {
    let history_of = |key: &str| {
        let needle = format!(" {key} ");
        tail_of(&record.trace.events, 40, |line| {
            line.contains(&needle) || line.contains("fault") || line.contains("heal") || line.contains("restart")
        })
    };
    // CFG4: convergence after healing.
    match &record.converged {
        Some(Ok(_)) => {}
        Some(Err(statuses)) => {
            return Some(Failure {
                invariant: "CFG4",
                detail: format!("not converged {} s after healing: {statuses}", LIVENESS_BOUND.as_secs()),
                history: tail(&record.trace.events, 30),
            })
        }
        None => {
            return Some(Failure {
                invariant: "CFG4",
                detail: "the run ended before convergence was checked".to_string(),
                history: tail(&record.trace.events, 30),
            })
        }
    }
    // The membership settles after healing: a replacement finished, every member
    // counts the same voters, and they are the run's members.
    if let Some(Err(detail)) = &record.membership {
        return Some(Failure {
            invariant: "membership",
            detail: format!("not settled {} s after healing: {detail}", LIVENESS_BOUND.as_secs()),
            history: tail_of(&record.trace.events, 30, |line| {
                line.contains("fault") || line.contains("heal") || line.contains("operator") || line.contains("restart")
            }),
        });
    }
    // CFG3: no node's applied version goes down.
    for (node, seen) in &record.statuses {
        for pair in seen.windows(2) {
            if pair[1].1 < pair[0].1 {
                return Some(Failure {
                    invariant: "CFG3",
                    detail: format!(
                        "{} reported config_version {} at {} ms, then {} at {} ms",
                        host(*node),
                        pair[0].1,
                        pair[0].0,
                        pair[1].1,
                        pair[1].0
                    ),
                    history: tail(&record.trace.events, 30),
                });
            }
        }
    }
    // CFG1: per key, when the last write invoked was acknowledged, the final read
    // sees it.
    let mut keys: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in &record.history {
        keys.entry(operation.key.as_str()).or_default().push(operation);
    }
    for (key, operations) in &keys {
        let last_write = operations
            .iter()
            .filter(|operation| operation.client != 0 && matches!(operation.action, Action::Write(_)))
            .max_by_key(|operation| operation.call);
        let final_read = operations.iter().find(|operation| operation.client == 0);
        if let (Some(write), Some(read)) = (last_write, final_read) {
            let Action::Write(written) = &write.action else { continue };
            let Action::Read { observed } = &read.action else { continue };
            let overlapping = operations.iter().any(|other| {
                !std::ptr::eq(*other, *write)
                    && other.client != 0
                    && matches!(other.action, Action::Write(_))
                    && other.ret.is_none_or(|ret| ret > write.call)
            });
            if write.ret.is_some() && !overlapping && observed != written {
                return Some(Failure {
                    invariant: "CFG1",
                    detail: format!(
                        "{key}: the last write, {written:?}, was acknowledged at {} ms; after healing the cluster answers {observed:?}",
                        write.ret.unwrap_or_default()
                    ),
                    history: history_of(key),
                });
            }
        }
    }
    // CFG2: the whole history.
    match linearizability::check(&record.history) {
        Verdict::Linearizable => None,
        Verdict::NotLinearizable { key, operations } => {
            let shortest = shortest_failing_prefix(&operations);
            let shown = &shortest[shortest.len().saturating_sub(CFG2_SHOWN_MAX)..];
            Some(Failure {
                invariant: "CFG2",
                detail: format!(
                    "no order of {key}'s first {} operations explains what the clients saw (the last {} shown)",
                    shortest.len(),
                    shown.len()
                ),
                history: linearizability::describe(shown),
            })
        }
        Verdict::Unknown { key } => Some(Failure {
            invariant: "CFG2",
            detail: format!("the checker could not decide on {key} within its step bound"),
            history: history_of(&key),
        }),
    }
}

/// HC1: after healing, every node stopped routing to the target the cluster knows is
/// down (the backup, sick from the heal on) within [`HEALTH_BOUND`].
pub(crate) fn check_health(record: &Record) -> Option<Failure> {
    let Some(Err(unsettled)) = &record.health else { return None };
    Some(Failure {
        invariant: "HC1",
        detail: format!(
            "{} s after healing, with the backup target failing every probe: {unsettled}",
            HEALTH_BOUND.as_secs()
        ),
        history: tail_of(&record.trace.events, 30, |line| {
            line.contains("/pooled") || line.contains("HC1") || line.contains("sick") || line.contains("heal")
        }),
    })
}

/// RL1 and RL2: within every window of every limit ([`WINDOWS`]), what the proxy
/// admitted is at most the limit: exactly with `fault_tolerant: false`; with `true`,
/// plus what a node may admit on its own while cut off or leaderless, ⌈limit / voters⌉
/// per node process and window (node/QUOTA.md: a node restarted inside a window counts
/// its fallback afresh).
///
/// A window is the admitting node's: its wall clock runs at its offset, and the
/// cluster's ledger counts a window by the start the node computed. Only requests
/// sent and answered inside one window of that node's clock are counted: they were
/// admitted in it. A window over its bound is an RL2 failure when a node restarted
/// inside it (the usage committed before the restart was lost), RL1 otherwise.
pub(crate) fn check_rate_limits(record: &Record, nodes: u64) -> Option<Failure> {
    let fault_tolerant = record.rate_limited?;
    let epoch_ms = crate::env::EPOCH.as_millis() as i64;
    let mut found: Option<Failure> = None;
    for (path, window, size_s, limit) in WINDOWS {
        let size_ms = size_s as i64 * 1_000;
        let window_of = |node: u64, at: u64| {
            let offset = record.offset(node, at);
            (epoch_ms + at as i64 + offset).div_euclid(size_ms)
        };
        let mut admitted: BTreeMap<i64, u64> = BTreeMap::new();
        for request in record.proxied.iter().filter(|request| request.path == path && request.status == 200) {
            // A clock step while the request was in flight leaves its window unknown.
            let stepped = record
                .offsets
                .get(&request.node)
                .is_some_and(|changes| changes.iter().any(|(from, _)| (request.call..=request.ret).contains(from)));
            let first = window_of(request.node, request.call);
            if !stepped && first == window_of(request.node, request.ret) {
                *admitted.entry(first).or_default() += 1;
            }
        }
        for (index, count) in admitted {
            // The window in simulated time, widened by the clocks' offsets and jumps.
            let widest = CLOCK_OFFSET_MAX_MS + CLOCK_JUMP_MAX_MS;
            let from = (index * size_ms - epoch_ms - widest).max(0) as u64;
            let until = ((index + 1) * size_ms - epoch_ms + widest).max(0) as u64;
            // A node process that started in this window of its own clock counts
            // afresh: the restarted node's, or a replacement's.
            let restarts = record.restarts.iter().filter(|(at, node)| window_of(*node, *at) == index).count() as u64;
            let share = limit.div_ceil(nodes);
            let bound = if fault_tolerant { limit + (nodes + restarts) * share } else { limit };
            if count <= bound {
                continue;
            }
            let invariant = if restarts > 0 { "RL2" } else { "RL1" };
            let failure = Failure {
                invariant,
                detail: format!(
                    "{count} requests to {path} admitted in the {window} starting at {} ms of simulated time on the admitting nodes' clocks ({restarts} node processes started in it), limit {limit} (fault_tolerant {fault_tolerant}: at most {bound})",
                    index * size_ms - epoch_ms
                ),
                history: tail_of(&record.trace.events, 40, |line| {
                    let at: u64 = line.split_whitespace().next().and_then(|t| t.parse().ok()).unwrap_or(0);
                    (line.contains(path)
                        || line.contains("fault")
                        || line.contains("heal")
                        || line.contains("restart"))
                        && at + 1_000 >= from
                        && at <= until
                }),
            };
            // RL1 first: a window over without a restart says more than one with.
            if invariant == "RL1" {
                return Some(failure);
            }
            found.get_or_insert(failure);
        }
    }
    found
}

/// Operations of a failing key a report shows.
pub(crate) const CFG2_SHOWN_MAX: usize = 16;

/// The shortest prefix (in call order) of a key's operations that no order explains:
/// what led to the violation, without what came after.
pub(crate) fn shortest_failing_prefix(operations: &[Operation]) -> Vec<Operation> {
    for length in 1..operations.len() {
        if matches!(linearizability::check(&operations[..length]), Verdict::NotLinearizable { .. }) {
            return operations[..length].to_vec();
        }
    }
    operations.to_vec()
}

pub(crate) fn tail(events: &[String], lines: usize) -> String {
    let start = events.len().saturating_sub(lines);
    events[start..].iter().map(|line| format!("    {line}")).collect::<Vec<_>>().join("\n")
}

/// The last `lines` events that `keep` keeps, indented.
pub(crate) fn tail_of(events: &[String], lines: usize, keep: impl Fn(&str) -> bool) -> String {
    let kept: Vec<String> = events.iter().filter(|line| keep(line)).cloned().collect();
    tail(&kept, lines)
}
