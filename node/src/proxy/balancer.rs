//! Weighted round-robin over an upstream's targets.
//!
//! The schedule is computed when the config is compiled, with nginx's smooth weighted
//! round-robin (so weights 5:1:1 give `a a b a c a a`, not `a a a a a b c`); picking is
//! one atomic increment. Weights are divided by their greatest common divisor and a
//! schedule longer than [`SCHEDULE_LEN_MAX`] is scaled down proportionally.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest precomputed schedule.
pub const SCHEDULE_LEN_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as configured.
    pub address: String,
    pub weight: u32,
}

#[derive(Debug, Default)]
pub struct RoundRobin {
    targets: Vec<Target>,
    schedule: Vec<u16>,
    next: AtomicUsize,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl RoundRobin {
    /// Targets with weight 0 are kept out of rotation, as in Kong.
    pub fn new(targets: Vec<Target>) -> RoundRobin {
        let targets: Vec<Target> = targets.into_iter().filter(|t| t.weight > 0).take(u16::MAX as usize).collect();
        if targets.is_empty() {
            return RoundRobin::default();
        }
        let divisor = targets.iter().fold(0u64, |g, t| gcd(g, u64::from(t.weight))).max(1);
        let mut weights: Vec<u64> = targets.iter().map(|t| u64::from(t.weight) / divisor).collect();
        let total: u64 = weights.iter().sum();
        if total > SCHEDULE_LEN_MAX as u64 {
            for weight in &mut weights {
                *weight = (*weight * SCHEDULE_LEN_MAX as u64 / total).max(1);
            }
        }
        let total: i64 = weights.iter().sum::<u64>() as i64;
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (position, weight) in weights.iter().enumerate() {
                current[position] += *weight as i64;
            }
            let chosen = (0..current.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i))).expect("non-empty");
            current[chosen] -= total;
            schedule.push(chosen as u16);
        }
        debug_assert_eq!(schedule.len() as i64, total);
        RoundRobin { targets, schedule, next: AtomicUsize::new(0) }
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The next target, or `None` when there is none in rotation.
    pub fn pick(&self) -> Option<&Target> {
        if self.schedule.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.targets.get(self.schedule[turn] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(address: &str, weight: u32) -> Target {
        Target { address: address.into(), weight }
    }

    #[test]
    fn weights_are_respected_and_smooth() {
        let balancer = RoundRobin::new(vec![target("a", 500), target("b", 100), target("c", 100), target("d", 0)]);
        let picks: Vec<&str> = (0..7).map(|_| balancer.pick().unwrap().address.as_str()).collect();
        assert_eq!(picks, ["a", "a", "b", "a", "c", "a", "a"]);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..700 {
            *counts.entry(balancer.pick().unwrap().address.clone()).or_insert(0) += 1;
        }
        assert_eq!((counts["a"], counts["b"], counts["c"]), (500, 100, 100));
        assert!(!counts.contains_key("d"));
    }

    #[test]
    fn empty_and_huge() {
        assert!(RoundRobin::new(vec![target("a", 0)]).pick().is_none());
        let balancer = RoundRobin::new(vec![target("a", 65535), target("b", 1)]);
        assert!(balancer.schedule.len() <= SCHEDULE_LEN_MAX + 2);
        assert!((0..10_000).any(|_| balancer.pick().unwrap().address == "b"));
    }
}
