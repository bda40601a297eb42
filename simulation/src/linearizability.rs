//! CFG2 as a property of a recorded history: were the admin reads and writes
//! linearizable?
//!
//! The checker is Wing and Gong's search with Lowe's memoisation (the algorithm of
//! Knossos and Porcupine): walk the history's call and return events in time order,
//! linearize any pending call whose effect the register model accepts, and back up when
//! a return is reached whose operation could not be placed. A cache of (operations
//! linearized, register state) pairs already explored keeps the search from repeating
//! itself. Linearizability is local (Herlihy and Wing): a history of many registers is
//! linearizable when each register's sub-history is, so every key is checked alone.
//!
//! The model is the Admin API as a map of registers, one per entity key: a write sets
//! the value (or removes it), a read returns it. An operation whose outcome the client
//! never learned (a timeout, a reset connection) is *indeterminate*: a write may or may
//! not have taken effect, so it gets a return time at infinity and may be placed
//! anywhere after its call, including after everything else, which is the same as never;
//! an indeterminate read observed nothing and constrains nothing, so it is dropped.

use std::collections::{BTreeMap, HashSet};

/// Search steps one key's history may take before the checker gives up with
/// [`Verdict::Unknown`]. The search is exponential in the worst case (many concurrent
/// operations on one key); the simulator's workloads keep concurrency per key low, and
/// a verdict that could not be reached is reported, never taken as a pass.
pub const CHECK_STEPS_MAX: u64 = 5_000_000;

/// What an operation did to one register.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Set the value (`Some`) or remove the entity (`None`): `PUT`, `POST`, `DELETE`.
    Write(Option<String>),
    /// Read the value; `observed` is what the client got back, `None` for a 404.
    Read { observed: Option<String> },
}

/// One client operation on one key, with its real-time interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// The client that issued it (for the readable history only).
    pub client: u64,
    pub key: String,
    pub action: Action,
    /// When the request was sent.
    pub call: u64,
    /// When its answer arrived; `None` when it never did (indeterminate).
    pub ret: Option<u64>,
}

/// The checker's answer for a whole history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order of `key`'s operations explains what its clients saw; `operations` is that
    /// key's sub-history, ordered by call time, for the report.
    NotLinearizable {
        key: String,
        operations: Vec<Operation>,
    },
    /// The search for `key` ran past [`CHECK_STEPS_MAX`] without a verdict.
    Unknown {
        key: String,
    },
}

/// Checks a whole history, key by key (keys in sorted order, so the verdict for a
/// history with several failing keys is always the same one).
pub fn check(history: &[Operation]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in history {
        by_key.entry(operation.key.as_str()).or_default().push(operation);
    }
    for (key, operations) in by_key {
        match check_register(&operations) {
            Some(true) => {}
            Some(false) => {
                let mut operations: Vec<Operation> = operations.into_iter().cloned().collect();
                operations.sort_by_key(|operation| operation.call);
                return Verdict::NotLinearizable { key: key.to_string(), operations };
            }
            None => return Verdict::Unknown { key: key.to_string() },
        }
    }
    Verdict::Linearizable
}

/// One event of the search's list: the call or the return of operation `op`.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// For a call, the index of its return event.
    matching: usize,
}

/// Wing–Gong–Lowe over one register. `Some(verdict)`, or `None` past the step bound.
fn check_register(operations: &[&Operation]) -> Option<bool> {
    // Indeterminate reads observed nothing: they cannot constrain the order.
    let ops: Vec<&Operation> = operations
        .iter()
        .copied()
        .filter(|operation| operation.ret.is_some() || matches!(operation.action, Action::Write(_)))
        .collect();
    if ops.is_empty() {
        return Some(true);
    }
    // Events in time order; at equal times calls come first, so operations that touch
    // at an instant count as concurrent (the permissive reading).
    let mut timed: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (index, operation) in ops.iter().enumerate() {
        timed.push((operation.call, true, index));
        timed.push((operation.ret.unwrap_or(u64::MAX), false, index));
    }
    timed.sort_by_key(|&(time, is_call, index)| (time, !is_call, index));
    let mut events: Vec<Event> =
        timed.iter().map(|&(_, is_call, op)| Event { op, is_call, matching: usize::MAX }).collect();
    let mut return_of = vec![0; ops.len()];
    for (position, event) in events.iter().enumerate() {
        if !event.is_call {
            return_of[event.op] = position;
        }
    }
    for event in events.iter_mut() {
        if event.is_call {
            event.matching = return_of[event.op];
        }
    }

    // A doubly linked list over the events, with a head sentinel at index `n`.
    const END: usize = usize::MAX;
    let n = events.len();
    let head = n;
    let mut next: Vec<usize> = (0..=n).map(|at| if at + 1 < n { at + 1 } else { END }).collect();
    let mut prev: Vec<usize> = (0..=n).map(|at| if at == 0 { head } else { at - 1 }).collect();
    next[head] = 0;
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, at: usize| {
        let (before, after) = (prev[at], next[at]);
        next[before] = after;
        if after != END {
            prev[after] = before;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, at: usize| {
        let (before, after) = (prev[at], next[at]);
        next[before] = at;
        if after != END {
            prev[after] = at;
        }
    };

    let mut state: Option<String> = None;
    let mut linearized = vec![0u64; ops.len().div_ceil(64)];
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut calls: Vec<(usize, Option<String>)> = Vec::new();
    let mut entry = next[head];
    let mut steps = 0u64;
    while next[head] != END {
        steps += 1;
        if steps > CHECK_STEPS_MAX {
            return None;
        }
        let event = events[entry];
        if event.is_call {
            let after = apply(&state, &ops[event.op].action);
            if let Some(after) = after {
                let mut marked = linearized.clone();
                marked[event.op / 64] |= 1 << (event.op % 64);
                if seen.insert((marked.clone(), after.clone())) {
                    calls.push((entry, state));
                    state = after;
                    linearized = marked;
                    unlink(&mut next, &mut prev, entry);
                    unlink(&mut next, &mut prev, event.matching);
                    entry = next[head];
                    continue;
                }
            }
            entry = next[entry];
        }
        if entry == END || !events[entry].is_call {
            // A return whose operation is not linearized yet: everything linearized
            // since the last choice has to be undone.
            let Some((call, previous)) = calls.pop() else {
                return Some(false);
            };
            unmark(&mut linearized, &events, call);
            state = previous;
            relink(&mut next, &mut prev, events[call].matching);
            relink(&mut next, &mut prev, call);
            entry = next[call];
        }
    }
    Some(true)
}

fn unmark(linearized: &mut [u64], events: &[Event], call: usize) {
    let op = events[call].op;
    linearized[op / 64] &= !(1 << (op % 64));
}

/// The register model: the state after `action`, or `None` when `action` could not
/// have happened in `state` (a read that saw something else).
fn apply(state: &Option<String>, action: &Action) -> Option<Option<String>> {
    match action {
        Action::Write(value) => Some(value.clone()),
        Action::Read { observed } => (observed == state).then(|| state.clone()),
    }
}

/// A few lines a person can read: one per operation of a failing key, in call order.
pub fn describe(operations: &[Operation]) -> String {
    let mut lines = Vec::with_capacity(operations.len());
    for operation in operations {
        let what = match &operation.action {
            Action::Write(Some(value)) => format!("write {value:?}"),
            Action::Write(None) => "delete".to_string(),
            Action::Read { observed: Some(value) } => format!("read -> {value:?}"),
            Action::Read { observed: None } => "read -> absent".to_string(),
        };
        let ret = operation.ret.map_or("never answered".to_string(), |ret| format!("{ret}"));
        lines.push(format!("  client {} {} [{} .. {}]", operation.client, what, operation.call, ret));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(client: u64, key: &str, value: Option<&str>, call: u64, ret: Option<u64>) -> Operation {
        Operation { client, key: key.into(), action: Action::Write(value.map(Into::into)), call, ret }
    }

    fn read(client: u64, key: &str, observed: Option<&str>, call: u64, ret: Option<u64>) -> Operation {
        Operation { client, key: key.into(), action: Action::Read { observed: observed.map(Into::into) }, call, ret }
    }

    fn fails_on(history: &[Operation], key: &str) -> bool {
        matches!(check(history), Verdict::NotLinearizable { key: failed, .. } if failed == key)
    }

    #[test]
    fn sequential_histories_that_follow_the_register_pass() {
        let history = [
            read(1, "a", None, 0, Some(1)),
            write(1, "a", Some("1"), 2, Some(3)),
            read(2, "a", Some("1"), 4, Some(5)),
            write(2, "a", None, 6, Some(7)),
            read(1, "a", None, 8, Some(9)),
        ];
        assert_eq!(check(&history), Verdict::Linearizable);
    }

    #[test]
    fn a_read_of_a_value_never_written_fails() {
        let history = [write(1, "a", Some("1"), 0, Some(1)), read(2, "a", Some("2"), 2, Some(3))];
        assert!(fails_on(&history, "a"));
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_fails() {
        // The write returned before the read was sent: the read must see it.
        let history = [
            write(1, "a", Some("1"), 0, Some(1)),
            write(1, "a", Some("2"), 2, Some(3)),
            read(2, "a", Some("1"), 4, Some(5)),
        ];
        assert!(fails_on(&history, "a"));
    }

    #[test]
    fn a_read_concurrent_with_a_write_may_see_either_value() {
        for observed in [None, Some("1")] {
            let history = [write(1, "a", Some("1"), 0, Some(10)), read(2, "a", observed, 2, Some(5))];
            assert_eq!(check(&history), Verdict::Linearizable, "read saw {observed:?}");
        }
    }

    #[test]
    fn reads_that_see_new_then_old_during_one_write_fail() {
        // The first read returned the new value before the second was sent; the second
        // cannot go back to the old one, although both overlap the write.
        let history = [
            write(1, "a", Some("1"), 0, Some(100)),
            read(2, "a", Some("1"), 10, Some(20)),
            read(3, "a", None, 30, Some(40)),
        ];
        assert!(fails_on(&history, "a"));
    }

    #[test]
    fn an_indeterminate_write_may_or_may_not_have_happened_but_not_both() {
        let seen = [write(1, "a", Some("1"), 0, None), read(2, "a", Some("1"), 10, Some(20))];
        assert_eq!(check(&seen), Verdict::Linearizable);
        let unseen = [write(1, "a", Some("1"), 0, None), read(2, "a", None, 10, Some(20))];
        assert_eq!(check(&unseen), Verdict::Linearizable);
        let flip = [
            write(1, "a", Some("1"), 0, None),
            read(2, "a", Some("1"), 10, Some(20)),
            read(2, "a", None, 30, Some(40)),
        ];
        assert!(fails_on(&flip, "a"));
        // An indeterminate read constrains nothing.
        let ghost = [write(1, "a", Some("1"), 0, Some(1)), read(2, "a", Some("zzz"), 2, None)];
        assert_eq!(check(&ghost), Verdict::Linearizable);
    }

    #[test]
    fn keys_are_checked_alone_and_the_failing_one_is_named() {
        let history = [
            write(1, "a", Some("1"), 0, Some(1)),
            write(1, "b", Some("1"), 0, Some(1)),
            read(2, "b", Some("1"), 2, Some(3)),
            read(2, "a", None, 2, Some(3)),
        ];
        match check(&history) {
            Verdict::NotLinearizable { key, operations } => {
                assert_eq!(key, "a");
                assert_eq!(operations.len(), 2);
                assert!(describe(&operations).contains("read -> absent"));
            }
            other => panic!("expected key a to fail, got {other:?}"),
        }
    }

    /// A deterministic generator (a 64-bit LCG): the tests need no RNG dependency.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % bound
        }
    }

    /// Histories made by a real register with overlapping intervals around each
    /// operation's linearization point: always linearizable, whatever the overlap.
    fn concurrent_history(seed: u64, length: u64) -> Vec<Operation> {
        let mut rng = Lcg(seed);
        let mut value: Option<String> = None;
        let mut history = Vec::new();
        for point in 0..length {
            let at = point * 10 + 100;
            let (call, ret) = (at - rng.below(40), at + rng.below(40));
            let client = rng.below(5);
            match rng.below(3) {
                0 => {
                    value = Some(format!("v{point}"));
                    let ret = if rng.below(10) == 0 { None } else { Some(ret) };
                    history.push(write(client, "k", value.as_deref(), call, ret));
                }
                1 => {
                    value = None;
                    history.push(write(client, "k", None, call, Some(ret)));
                }
                _ => history.push(read(client, "k", value.as_deref(), call, Some(ret))),
            }
        }
        history
    }

    #[test]
    fn generated_concurrent_histories_pass_and_a_planted_stale_read_fails() {
        let mut planted = 0;
        for seed in 0..50 {
            let mut history = concurrent_history(seed, 60);
            assert_eq!(check(&history), Verdict::Linearizable, "seed {seed}");
            // Plant a read, long after everything, of a value whose write was followed
            // by another acknowledged write that started after it returned: no order
            // leaves that value in place.
            let last = history.iter().filter_map(|op| op.ret).max().unwrap_or(0);
            let overwritten = history.iter().find_map(|first| match (&first.action, first.ret) {
                (Action::Write(Some(value)), Some(ret)) => history
                    .iter()
                    .any(|later| matches!(later.action, Action::Write(_)) && later.ret.is_some() && later.call > ret)
                    .then(|| value.clone()),
                _ => None,
            });
            if let Some(stale) = overwritten {
                history.push(read(9, "k", Some(&stale), last + 1_000, Some(last + 1_001)));
                assert!(fails_on(&history, "k"), "seed {seed}: the planted stale read passed");
                planted += 1;
            }
        }
        assert!(planted >= 10, "only {planted} of 50 histories had a stale read planted");
    }
}
