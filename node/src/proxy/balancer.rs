//! Upstream balancers (Kong's `algorithm`): weighted round-robin, least-connections,
//! consistent hashing and latency (EWMA).
//!
//! Per-target state (in-flight counts, latency averages) lives in the compiled snapshot,
//! so it starts afresh when the upstream's config changes.
//!
//! Round-robin: the schedule is computed when the config is compiled, with nginx's smooth weighted
//! round-robin (so weights 5:1:1 give `a a b a c a a`, not `a a a a a b c`); picking is
//! one atomic increment. Weights are divided by their greatest common divisor and a
//! schedule longer than [`SCHEDULE_LEN_MAX`] is scaled down proportionally.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Longest precomputed schedule.
pub const SCHEDULE_LEN_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as configured.
    pub address: String,
    pub weight: u32,
    /// `address` parsed once for the upstream request's URI; `None` when it does not
    /// parse (the request answers 502).
    pub authority: Option<http::uri::Authority>,
}

/// A target's `host:port` as configured, with Kong's default port (8000) when it
/// names none: the address balancers dial and health checks probe.
pub fn target_address(target: &str) -> String {
    if tollgate_raft_store::schema::split_host_port(target).1.is_some() {
        target.to_string()
    } else {
        format!("{target}:8000")
    }
}

impl Target {
    pub fn new(address: String, weight: u32) -> Target {
        let authority = http::uri::Authority::try_from(address.as_str()).ok();
        Target { address, weight, authority }
    }
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

    /// The next target, or `None` when there is none in rotation.
    /// The next target in the schedule that `up` accepts.
    pub fn pick(&self, up: &dyn Fn(usize) -> bool) -> Option<&Target> {
        if self.schedule.is_empty() {
            return None;
        }
        for _ in 0..self.schedule.len() {
            let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
            let index = self.schedule[turn] as usize;
            if up(index) {
                return self.targets.get(index);
            }
        }
        None
    }
}

/// Points on the consistent-hashing ring, at most (Kong's default `slots`).
pub const RING_POINTS_MAX: usize = 10_000;

/// What consistent hashing hashes, per Kong's `hash_on` / `hash_fallback`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    None,
    Ip,
    Header(String),
    Cookie(String),
    Path,
    QueryArg(String),
    /// Needs authentication plugins; until then it never yields a key.
    Consumer,
}

impl HashOn {
    /// From an upstream entity's `hash_on` (or `hash_fallback`) and its parameter fields.
    pub fn from_config(kind: &str, header: Option<&str>, cookie: Option<&str>, query_arg: Option<&str>) -> HashOn {
        match kind {
            "ip" => HashOn::Ip,
            "header" => header.map_or(HashOn::None, |h| HashOn::Header(h.to_ascii_lowercase())),
            "cookie" => cookie.map_or(HashOn::None, |c| HashOn::Cookie(c.to_string())),
            "path" => HashOn::Path,
            "query_arg" => query_arg.map_or(HashOn::None, |q| HashOn::QueryArg(q.to_string())),
            "consumer" => HashOn::Consumer,
            _ => HashOn::None,
        }
    }
}

/// The parts of a request a balancer may hash.
pub struct BalanceKey<'a> {
    pub client_ip: std::net::IpAddr,
    pub headers: &'a http::HeaderMap,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

impl BalanceKey<'_> {
    fn value(&self, on: &HashOn) -> Option<String> {
        match on {
            HashOn::None | HashOn::Consumer => None,
            HashOn::Ip => Some(self.client_ip.to_string()),
            HashOn::Header(name) => {
                let values: Vec<&str> =
                    self.headers.get_all(name.as_str()).iter().filter_map(|v| v.to_str().ok()).collect();
                (!values.is_empty()).then(|| values.join(","))
            }
            HashOn::Cookie(name) => self
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.to_string()),
            HashOn::Path => Some(self.path.to_string()),
            HashOn::QueryArg(name) => self
                .query?
                .split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.to_string()),
        }
    }
}

/// FNV-1a: stable across nodes and builds, so every node maps a key to the same target.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Spread FNV's low-entropy high bits (splitmix64 finaliser).
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// One upstream's balancer.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    /// Fewest requests in flight relative to weight.
    LeastConnections {
        targets: Vec<Target>,
        in_flight: Vec<Arc<AtomicUsize>>,
    },
    /// A ring of points per target (proportional to weight); the key's hash picks the
    /// next point. Requests without a key fall back to round-robin.
    ConsistentHashing {
        ring: Vec<(u64, u16)>,
        targets: Vec<Target>,
        on: HashOn,
        fallback: HashOn,
        round_robin: RoundRobin,
    },
    /// Lowest moving average of response time (EWMA, in µs) times requests in flight.
    Latency {
        targets: Vec<Target>,
        in_flight: Vec<Arc<AtomicUsize>>,
        ewma_us: Vec<Arc<AtomicU64>>,
    },
}

/// A picked target; while it lives the target counts one more request in flight.
pub struct Pick<'a> {
    pub target: &'a Target,
    in_flight: Option<Arc<AtomicUsize>>,
    ewma_us: Option<Arc<AtomicU64>>,
}

impl Pick<'_> {
    /// Feeds the time to the upstream's response headers to the latency balancer.
    pub fn observe(&self, elapsed: std::time::Duration) {
        let Some(ewma) = &self.ewma_us else { return };
        let sample = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        // EWMA with weight 1/8 for the newest sample; 0 means "no sample yet".
        let _ = ewma.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { sample.max(1) } else { (old * 7 + sample) / 8 })
        });
    }
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        if let Some(in_flight) = &self.in_flight {
            in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Balancer {
    pub fn new(algorithm: &str, targets: Vec<Target>, on: HashOn, fallback: HashOn) -> Balancer {
        let targets: Vec<Target> = targets.into_iter().filter(|t| t.weight > 0).take(u16::MAX as usize).collect();
        let counters = |n: usize| (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect::<Vec<_>>();
        match algorithm {
            "least-connections" => Balancer::LeastConnections { in_flight: counters(targets.len()), targets },
            "latency" => Balancer::Latency {
                in_flight: counters(targets.len()),
                ewma_us: (0..targets.len()).map(|_| Arc::new(AtomicU64::new(0))).collect(),
                targets,
            },
            "consistent-hashing" => {
                let total_weight: u64 = targets.iter().map(|t| u64::from(t.weight)).sum::<u64>().max(1);
                let mut ring = Vec::new();
                for (index, target) in targets.iter().enumerate() {
                    let points = (u64::from(target.weight) * RING_POINTS_MAX as u64 / total_weight).max(1);
                    for point in 0..points {
                        ring.push((fnv1a(format!("{}#{point}", target.address).as_bytes()), index as u16));
                    }
                }
                ring.sort_unstable();
                let round_robin = RoundRobin::new(targets.clone());
                Balancer::ConsistentHashing { ring, targets, on, fallback, round_robin }
            }
            _ => Balancer::RoundRobin(RoundRobin::new(targets)),
        }
    }

    /// The targets in rotation, in the order `pick`'s `up` indexes them.
    /// Whether picks read request headers (hashing on a header or a cookie).
    pub fn reads_headers(&self) -> bool {
        let reads = |on: &HashOn| matches!(on, HashOn::Header(_) | HashOn::Cookie(_));
        matches!(self, Balancer::ConsistentHashing { on, fallback, .. } if reads(on) || reads(fallback))
    }

    pub fn targets(&self) -> &[Target] {
        match self {
            Balancer::RoundRobin(round_robin) => &round_robin.targets,
            Balancer::LeastConnections { targets, .. }
            | Balancer::ConsistentHashing { targets, .. }
            | Balancer::Latency { targets, .. } => targets,
        }
    }

    /// Targets in rotation.
    pub fn len(&self) -> usize {
        match self {
            Balancer::RoundRobin(round_robin) => round_robin.targets.len(),
            Balancer::LeastConnections { targets, .. }
            | Balancer::ConsistentHashing { targets, .. }
            | Balancer::Latency { targets, .. } => targets.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The target for a request, or `None` when no target is in rotation.
    /// A target for a request, among those `up` accepts (the healthy ones).
    pub fn pick(&self, key: &BalanceKey<'_>, up: &dyn Fn(usize) -> bool) -> Option<Pick<'_>> {
        let plain = |target| Pick { target, in_flight: None, ewma_us: None };
        match self {
            Balancer::RoundRobin(round_robin) => round_robin.pick(up).map(plain),
            Balancer::LeastConnections { targets, in_flight } => {
                let index = (0..targets.len()).filter(|&i| up(i)).min_by_key(|&i| {
                    // in_flight / weight, compared without division.
                    let load = in_flight[i].load(Ordering::Relaxed) as u128 * 1_000_000;
                    (load / u128::from(targets[i].weight), i)
                })?;
                in_flight[index].fetch_add(1, Ordering::Relaxed);
                Some(Pick { target: &targets[index], in_flight: Some(in_flight[index].clone()), ewma_us: None })
            }
            Balancer::Latency { targets, in_flight, ewma_us } => {
                // Untried targets (no sample yet) first, then the lowest expected wait.
                let index = (0..targets.len()).filter(|&i| up(i)).min_by_key(|&i| {
                    let ewma = ewma_us[i].load(Ordering::Relaxed);
                    let waiting = in_flight[i].load(Ordering::Relaxed) as u64 + 1;
                    (ewma != 0, ewma.saturating_mul(waiting), i)
                })?;
                in_flight[index].fetch_add(1, Ordering::Relaxed);
                Some(Pick {
                    target: &targets[index],
                    in_flight: Some(in_flight[index].clone()),
                    ewma_us: Some(ewma_us[index].clone()),
                })
            }
            Balancer::ConsistentHashing { ring, targets, on, fallback, round_robin } => {
                let value = key.value(on).or_else(|| key.value(fallback));
                let Some(value) = value else { return round_robin.pick(up).map(plain) };
                let hash = fnv1a(value.as_bytes());
                let start = ring.partition_point(|(point, _)| *point < hash);
                // The key's point, or the next one on the ring whose target is up.
                (0..ring.len())
                    .map(|step| ring[(start + step) % ring.len()].1 as usize)
                    .find(|&index| up(index))
                    .and_then(|index| targets.get(index))
                    .map(plain)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(address: &str, weight: u32) -> Target {
        Target::new(address.into(), weight)
    }

    #[test]
    fn weights_are_respected_and_smooth() {
        let balancer = RoundRobin::new(vec![target("a", 500), target("b", 100), target("c", 100), target("d", 0)]);
        let picks: Vec<&str> = (0..7).map(|_| balancer.pick(&|_| true).unwrap().address.as_str()).collect();
        assert_eq!(picks, ["a", "a", "b", "a", "c", "a", "a"]);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..700 {
            *counts.entry(balancer.pick(&|_| true).unwrap().address.clone()).or_insert(0) += 1;
        }
        assert_eq!((counts["a"], counts["b"], counts["c"]), (500, 100, 100));
        assert!(!counts.contains_key("d"));
    }

    fn key<'a>(headers: &'a http::HeaderMap, path: &'a str) -> BalanceKey<'a> {
        BalanceKey { client_ip: "10.0.0.1".parse().unwrap(), headers, path, query: None }
    }

    #[test]
    fn least_connections_prefers_the_idle_target() {
        let balancer =
            Balancer::new("least-connections", vec![target("a", 100), target("b", 100)], HashOn::None, HashOn::None);
        let headers = http::HeaderMap::new();
        let first = balancer.pick(&key(&headers, "/"), &|_| true).unwrap();
        let second = balancer.pick(&key(&headers, "/"), &|_| true).unwrap();
        assert_ne!(first.target.address, second.target.address, "the busy target is avoided");
        let busy = first.target.address.clone();
        drop(second);
        let third = balancer.pick(&key(&headers, "/"), &|_| true).unwrap();
        assert_ne!(third.target.address, busy);
    }

    #[test]
    fn consistent_hashing_is_sticky_and_spread() {
        let targets = vec![target("a:1", 100), target("b:1", 100), target("c:1", 100)];
        let balancer = Balancer::new("consistent-hashing", targets, HashOn::Header("x-user".into()), HashOn::None);
        let mut spread = std::collections::HashMap::new();
        for user in 0..300 {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-user", format!("user-{user}").parse().unwrap());
            let first = balancer.pick(&key(&headers, "/"), &|_| true).unwrap().target.address.clone();
            let again = balancer.pick(&key(&headers, "/"), &|_| true).unwrap().target.address.clone();
            assert_eq!(first, again, "the same key goes to the same target");
            *spread.entry(first).or_insert(0) += 1;
        }
        assert_eq!(spread.len(), 3);
        assert!(spread.values().all(|count| *count > 50), "{spread:?}");
        // Another balancer built from the same config agrees: every node picks alike.
        let twin = Balancer::new(
            "consistent-hashing",
            vec![target("a:1", 100), target("b:1", 100), target("c:1", 100)],
            HashOn::Header("x-user".into()),
            HashOn::None,
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", "user-7".parse().unwrap());
        assert_eq!(
            balancer.pick(&key(&headers, "/"), &|_| true).unwrap().target.address,
            twin.pick(&key(&headers, "/"), &|_| true).unwrap().target.address
        );
    }

    #[test]
    fn latency_prefers_the_faster_target() {
        let balancer =
            Balancer::new("latency", vec![target("slow", 100), target("fast", 100)], HashOn::None, HashOn::None);
        let headers = http::HeaderMap::new();
        for _ in 0..2 {
            let pick = balancer.pick(&key(&headers, "/"), &|_| true).unwrap();
            let elapsed = if pick.target.address == "slow" { 50_000 } else { 1_000 };
            pick.observe(std::time::Duration::from_micros(elapsed));
        }
        for _ in 0..5 {
            assert_eq!(balancer.pick(&key(&headers, "/"), &|_| true).unwrap().target.address, "fast");
        }
    }

    #[test]
    fn empty_and_huge() {
        assert!(RoundRobin::new(vec![target("a", 0)]).pick(&|_| true).is_none());
        let balancer = RoundRobin::new(vec![target("a", 65535), target("b", 1)]);
        assert!(balancer.schedule.len() <= SCHEDULE_LEN_MAX + 2);
        assert!((0..10_000).any(|_| balancer.pick(&|_| true).unwrap().address == "b"));
    }
}

/// Passive health reports queued for the health checker; past it, reports are dropped
/// (the next ones carry the same news).
pub const PASSIVE_REPORTS_MAX: usize = 65_536;

/// What one proxied request found of its target (passive health checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Status(u16),
    TcpFailure,
    Timeout,
}

/// One passive health report.
#[derive(Debug, Clone)]
pub struct Report {
    pub upstream: uuid::Uuid,
    pub target: String,
    pub observation: Observation,
}

/// Targets known to be down, cluster-wide (merged from gossip by the health checker);
/// the data path reads it without locks, and reports what its requests found.
pub struct HealthView {
    generation: AtomicU64,
    down: arc_swap::ArcSwap<std::collections::HashSet<(uuid::Uuid, String)>>,
    reports: tokio::sync::mpsc::Sender<Report>,
    receiver: tokio::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Report>>>,
}

impl Default for HealthView {
    fn default() -> HealthView {
        let (reports, receiver) = tokio::sync::mpsc::channel(PASSIVE_REPORTS_MAX);
        HealthView {
            generation: AtomicU64::new(0),
            down: Default::default(),
            reports,
            receiver: tokio::sync::Mutex::new(Some(receiver)),
        }
    }
}

impl HealthView {
    /// Queues what a request found of `target` (never waits; dropped when full).
    pub fn report(&self, upstream: uuid::Uuid, target: &str, observation: Observation) {
        let report = Report { upstream, target: target.to_string(), observation };
        if self.reports.try_send(report).is_err() {
            metrics::counter!("tollgate_health_reports_dropped_total").increment(1);
        }
    }

    /// The reports, for the health checker (once).
    pub fn take_reports(&self) -> Option<tokio::sync::mpsc::Receiver<Report>> {
        self.receiver.try_lock().ok()?.take()
    }

    /// Replaces the set of down (upstream id, target address) pairs.
    pub fn set_down(&self, down: std::collections::HashSet<(uuid::Uuid, String)>) {
        // Targets down cluster-wide as this node sees them (the dashboard's upstream
        // health panel).
        metrics::gauge!("tollgate_upstream_targets_down").set(down.len() as f64);
        self.down.store(Arc::new(down));
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn is_down(&self, upstream: uuid::Uuid, target: &str) -> bool {
        self.down.load().contains(&(upstream, target.to_string()))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// An upstream entity compiled: its balancer, and which of its targets are down as of
/// the health view's last change (refreshed on the first pick after a change).
#[derive(Debug)]
pub struct Upstream {
    pub id: uuid::Uuid,
    pub balancer: Balancer,
    /// Passive checks are on: requests report what they found.
    pub passive: bool,
    down: Vec<std::sync::atomic::AtomicBool>,
    /// The view generation `down` reflects (`u64::MAX`: never refreshed).
    seen: AtomicU64,
}

impl Upstream {
    pub fn new(id: uuid::Uuid, balancer: Balancer, passive: bool) -> Upstream {
        let down = (0..balancer.len()).map(|_| std::sync::atomic::AtomicBool::new(false)).collect();
        Upstream { id, balancer, passive, down, seen: AtomicU64::new(u64::MAX) }
    }

    pub fn len(&self) -> usize {
        self.balancer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.balancer.is_empty()
    }

    /// A healthy target for a request; `None` when every target is down (or there
    /// are none).
    pub fn pick(&self, key: &BalanceKey<'_>, health: &HealthView) -> Option<Pick<'_>> {
        let generation = health.generation();
        if self.seen.swap(generation, Ordering::AcqRel) != generation {
            for (flag, target) in self.down.iter().zip(self.balancer.targets()) {
                flag.store(health.is_down(self.id, &target.address), Ordering::Relaxed);
            }
        }
        self.balancer.pick(key, &|index| !self.down[index].load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn down_targets_get_nothing_whatever_the_algorithm_and_all_down_is_none() {
        let headers = http::HeaderMap::new();
        let key =
            BalanceKey { client_ip: std::net::IpAddr::from([127, 0, 0, 1]), headers: &headers, path: "/", query: None };
        let targets =
            || vec![Target::new("a:1".into(), 100), Target::new("b:1".into(), 100), Target::new("c:1".into(), 100)];
        let id = uuid::Uuid::from_u128(5);
        let view = HealthView::default();
        for algorithm in ["round-robin", "least-connections", "latency", "consistent-hashing"] {
            let upstream = Upstream::new(id, Balancer::new(algorithm, targets(), HashOn::Ip, HashOn::None), false);
            view.set_down(["b:1"].map(|t| (id, t.to_string())).into());
            for _ in 0..20 {
                let pick = upstream.pick(&key, &view).expect("a healthy target");
                assert_ne!(pick.target.address, "b:1", "{algorithm}");
            }
            view.set_down(["a:1", "b:1", "c:1"].map(|t| (id, t.to_string())).into());
            assert!(upstream.pick(&key, &view).is_none(), "{algorithm}: every target down");
            view.set_down(Default::default());
            assert!(upstream.pick(&key, &view).is_some(), "{algorithm}: back up");
        }
    }
}

/// Whether an upstream's `healthchecks.passive` is on: any of its thresholds above 0.
pub fn passive_checks_on(healthchecks: Option<&serde_json::Value>) -> bool {
    let Some(passive) = healthchecks.and_then(|h| h.get("passive")) else { return false };
    let above_zero = |side: &str, field: &str| passive[side][field].as_f64().is_some_and(|n| n > 0.0);
    ["tcp_failures", "timeouts", "http_failures"].iter().any(|field| above_zero("unhealthy", field))
        || above_zero("healthy", "successes")
}
