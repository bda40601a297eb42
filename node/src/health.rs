//! Active health checks, probing split across the cluster, results shared by gossip.
//!
//! Each target of an upstream with Kong's `healthchecks.active` enabled is probed by
//! one live node: the one with the highest rendezvous hash of (node, upstream, target)
//! among the nodes gossip sees live. When that node dies, gossip stops listing it and
//! the next highest takes over, starting from the state the cluster last knew.
//!
//! A probe is a TCP connect (`type: tcp`), or a `GET http_path` whose status is
//! counted against `healthy.http_statuses` / `unhealthy.http_statuses` (`http`, and
//! `https` after a TLS handshake whose certificate is checked against the system's
//! roots unless `https_verify_certificate` is false; a failed handshake is a TCP
//! failure). Counters are consecutive, as in
//! Kong: a success resets the failures and the other way round. A healthy target
//! becomes unhealthy at `unhealthy.tcp_failures`, `timeouts` or `http_failures` (0
//! disables that counter); an unhealthy one becomes healthy at `healthy.successes`.
//! Healthy targets are probed every `healthy.interval` seconds, unhealthy ones every
//! `unhealthy.interval` (0: not probed in that state).
//!
//! The prober publishes each state it decides as gossip key `health:{upstream}:{target}`
//! = `up|down:{unix ms}`. Every node merges what live nodes published (the latest
//! wins) into the balancers' view: a target down there gets no traffic on any node.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tollgate_raft_store::entities;
use tollgate_raft_store::planted::{planted, Bug};
use tollgate_raft_store::EntityKind;
use uuid::Uuid;

use crate::gossip::Gossip;
use crate::proxy::balancer::{target_address, HealthView, Observation};
use crate::proxy::service::typed;
use crate::proxy::Published;

/// How often the checker looks at what is due and merges the cluster's view.
const TICK: Duration = Duration::from_millis(100);
/// How long after start a member gossip has not heard from yet still counts as live
/// for choosing probers (ending early once every member was heard): without it, every
/// node would probe everything until gossip first converges.
const STARTUP_GRACE: Duration = Duration::from_secs(3);
/// Probes in flight on one node.
pub const PROBES_IN_FLIGHT_MAX: usize = 256;
/// Passive reports handled per tick, so one busy tick does not starve the probes.
const PASSIVE_REPORTS_PER_TICK: usize = 100_000;
/// Largest response head read from a probed target.
const PROBE_RESPONSE_BYTES_MAX: usize = 4096;
/// Gossip key prefix of health states.
const KEY_PREFIX: &str = "health:";
/// Marks a gossiped health state that real traffic decided (passive checks).
const PASSIVE_PREFIX: &str = "passive-";

/// Whether a gossiped health state is believed: it comes from a Raft member, and a
/// probe's from the node rendezvous hashing makes the target's prober (a node that
/// is not, or a process that is not a member at all, cannot mark a target down). Its
/// time is clamped to `now_ms`, so a state stamped in the future cannot outlive later
/// ones. `None` when refused or malformed.
fn believed(
    node: &str,
    key: &str,
    value: &str,
    members: &HashSet<String>,
    live: &[String],
    now_ms: u64,
) -> Option<((Uuid, String), Observed)> {
    if !members.contains(node) {
        metrics::counter!("tollgate_health_states_refused_total", "reason" => "not_a_member").increment(1);
        return None;
    }
    let (upstream, target) = key.strip_prefix(KEY_PREFIX)?.split_once(':')?;
    let upstream = Uuid::parse_str(upstream).ok()?;
    let (state, at) = value.split_once(':')?;
    let at_ms = at.parse::<u64>().ok()?.min(now_ms);
    let (passive, state) = match state.strip_prefix(PASSIVE_PREFIX) {
        Some(state) => (true, state),
        None => (false, state),
    };
    if !passive && prober(live, upstream, target) != Some(node) {
        metrics::counter!("tollgate_health_states_refused_total", "reason" => "not_the_prober").increment(1);
        return None;
    }
    let observed = Observed { healthy: state == "up", dns_error: state == "dns", by: node.to_string(), at_ms };
    Some(((upstream, target.to_string()), observed))
}

/// What the cluster last decided about one target, and who decided it when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub healthy: bool,
    /// The target's host name did not resolve (Kong's `DNS_ERROR`; down as well).
    pub dns_error: bool,
    pub by: String,
    pub at_ms: u64,
}

/// The merged view, per (upstream id, target address), for the Admin API.
#[derive(Default)]
pub struct HealthStates {
    states: RwLock<HashMap<(Uuid, String), Observed>>,
}

impl HealthStates {
    pub fn get(&self, upstream: Uuid, target: &str) -> Option<Observed> {
        self.states.read().ok()?.get(&(upstream, target.to_string())).cloned()
    }
}

/// `http_statuses` of one side (`healthy`/`unhealthy`) of `kind` (`active`/`passive`),
/// or Kong's default list when it is left out.
fn statuses(side_value: &Value, kind: &str, side: &str) -> Vec<u16> {
    let defaults = tollgate_raft_store::schema::default_healthchecks();
    side_value
        .get("http_statuses")
        .or_else(|| defaults[kind][side].get("http_statuses"))
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_u64).map(|s| s as u16).collect())
        .unwrap_or_default()
}

/// Kong's `healthchecks.active`, the parts Tollgate acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveChecks {
    pub kind: String,
    /// `https_verify_certificate` (https probes).
    pub verify: bool,
    pub timeout: Duration,
    pub http_path: String,
    pub healthy_interval: Duration,
    pub successes: u32,
    pub healthy_statuses: Vec<u16>,
    pub unhealthy_interval: Duration,
    pub tcp_failures: u32,
    pub timeouts: u32,
    pub http_failures: u32,
    pub unhealthy_statuses: Vec<u16>,
}

impl ActiveChecks {
    /// The active checks of an upstream's `healthchecks`; `None` when both intervals
    /// are 0 (Kong's "off").
    pub fn from_healthchecks(healthchecks: &Value) -> Option<ActiveChecks> {
        let active = healthchecks.get("active")?;
        let number = |value: &Value, field: &str| value.get(field).and_then(Value::as_f64).unwrap_or(0.0);
        let statuses = |value: &Value, side: &str| statuses(value, "active", side);
        let healthy = active.get("healthy").cloned().unwrap_or(Value::Null);
        let unhealthy = active.get("unhealthy").cloned().unwrap_or(Value::Null);
        let seconds = |s: f64| Duration::from_secs_f64(s.clamp(0.0, 86_400.0));
        let checks = ActiveChecks {
            kind: active.get("type").and_then(Value::as_str).unwrap_or("http").to_string(),
            verify: active.get("https_verify_certificate").and_then(Value::as_bool).unwrap_or(true),
            timeout: seconds(number(active, "timeout").max(0.001)),
            http_path: active.get("http_path").and_then(Value::as_str).unwrap_or("/").to_string(),
            healthy_interval: seconds(number(&healthy, "interval")),
            successes: number(&healthy, "successes") as u32,
            healthy_statuses: statuses(&healthy, "healthy"),
            unhealthy_interval: seconds(number(&unhealthy, "interval")),
            tcp_failures: number(&unhealthy, "tcp_failures") as u32,
            timeouts: number(&unhealthy, "timeouts") as u32,
            http_failures: number(&unhealthy, "http_failures") as u32,
            unhealthy_statuses: statuses(&unhealthy, "unhealthy"),
        };
        (!checks.healthy_interval.is_zero() || !checks.unhealthy_interval.is_zero()).then_some(checks)
    }

    /// Kong's `healthchecks.passive` as thresholds on the same counters (no
    /// intervals: real traffic does the probing); `None` when it is off.
    pub fn passive_from_healthchecks(healthchecks: &Value) -> Option<ActiveChecks> {
        if !crate::proxy::balancer::passive_checks_on(Some(healthchecks)) {
            return None;
        }
        let passive = &healthchecks["passive"];
        let number = |side: &str, field: &str| passive[side][field].as_f64().unwrap_or(0.0) as u32;
        let statuses = |side: &str| statuses(&passive[side], "passive", side);
        Some(ActiveChecks {
            kind: "passive".to_string(),
            verify: false,
            timeout: Duration::ZERO,
            http_path: String::new(),
            healthy_interval: Duration::ZERO,
            successes: number("healthy", "successes"),
            healthy_statuses: statuses("healthy"),
            unhealthy_interval: Duration::ZERO,
            tcp_failures: number("unhealthy", "tcp_failures"),
            timeouts: number("unhealthy", "timeouts"),
            http_failures: number("unhealthy", "http_failures"),
            unhealthy_statuses: statuses("unhealthy"),
        })
    }

    /// What a request's observation counts as.
    fn judge(&self, observation: Observation) -> Outcome {
        match observation {
            Observation::TcpFailure => Outcome::TcpFailure,
            Observation::Timeout => Outcome::Timeout,
            Observation::Status(status) if self.healthy_statuses.contains(&status) => Outcome::Success,
            Observation::Status(status) if self.unhealthy_statuses.contains(&status) => Outcome::HttpFailure,
            Observation::Status(_) => Outcome::Neutral,
        }
    }
}

/// The node that probes `target` of `upstream`: the live node with the highest
/// rendezvous hash (stable while the live set is; only the dead node's targets move).
pub fn prober<'a>(live: &'a [String], upstream: Uuid, target: &str) -> Option<&'a str> {
    live.iter()
        .max_by_key(|node| {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for byte in node.bytes().chain([0]).chain(upstream.as_bytes().iter().copied()).chain(target.bytes()) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
            // FNV's low bits mix poorly; finish with a multiply-xorshift.
            hash ^= hash >> 33;
            hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
            hash ^ (hash >> 33)
        })
        .map(String::as_str)
}

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    HttpFailure,
    TcpFailure,
    Timeout,
    /// The target's host name did not resolve.
    DnsError,
    /// A status in neither list: counts for nothing.
    Neutral,
}

async fn probe(checks: &ActiveChecks, target: &str) -> Outcome {
    let attempt = async {
        // A host name is resolved first, so a name that does not resolve is told
        // apart from a target that refuses connections.
        let address = match target.parse::<std::net::SocketAddr>() {
            Ok(address) => address,
            Err(_) => match crate::env::resolve(target).await {
                Ok(address) => address,
                Err(_) => return Outcome::DnsError,
            },
        };
        let stream = match crate::env::connect_addr(address).await {
            Ok(stream) => stream,
            Err(_) => return Outcome::TcpFailure,
        };
        match checks.kind.as_str() {
            "http" => http_status(stream, checks, target).await,
            "https" => {
                let host = tollgate_raft_store::schema::split_host_port(target).0;
                let Ok((config, server_name)) = crate::proxy::upstream::probe_tls(host, checks.verify) else {
                    return Outcome::TcpFailure;
                };
                match tokio_rustls::TlsConnector::from(config).connect(server_name, stream).await {
                    Ok(tls) => http_status(tls, checks, target).await,
                    // A failed handshake (or certificate check) is a failed connection.
                    Err(_) => Outcome::TcpFailure,
                }
            }
            _ => Outcome::Success,
        }
    };
    tokio::time::timeout(checks.timeout, attempt).await.unwrap_or(Outcome::Timeout)
}

/// `GET http_path` on `stream`, judged by the status of the answer.
async fn http_status<S>(mut stream: S, checks: &ActiveChecks, target: &str) -> Outcome
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\nUser-Agent: tollgate-health\r\n\r\n",
        checks.http_path
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Outcome::TcpFailure;
    }
    let mut head = vec![0u8; PROBE_RESPONSE_BYTES_MAX];
    let mut filled = 0;
    while filled < 12 {
        match stream.read(&mut head[filled..]).await {
            Ok(0) | Err(_) => return Outcome::TcpFailure,
            Ok(n) => filled += n,
        }
    }
    let status = std::str::from_utf8(&head[9..12]).ok().and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(status) if checks.healthy_statuses.contains(&status) => Outcome::Success,
        Some(status) if checks.unhealthy_statuses.contains(&status) => Outcome::HttpFailure,
        Some(_) => Outcome::Neutral,
        None => Outcome::HttpFailure,
    }
}

/// One target this node probes.
struct Probed {
    healthy: bool,
    /// The last probe found no address for the host name.
    dns_error: bool,
    successes: u32,
    tcp_failures: u32,
    timeouts: u32,
    http_failures: u32,
    next: Instant,
    /// The state was published since this node took the target over.
    published: bool,
}

impl Probed {
    /// A target in `healthy` state with no counts yet, next probed at `next`.
    fn new(healthy: bool, next: Instant, published: bool) -> Probed {
        Probed {
            healthy,
            dns_error: false,
            successes: 0,
            tcp_failures: 0,
            timeouts: 0,
            http_failures: 0,
            next,
            published,
        }
    }

    /// Counts an outcome; returns true when the state changed.
    fn count(&mut self, outcome: Outcome, checks: &ActiveChecks) -> bool {
        let reached = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        // A name that does not resolve is down at once (Kong's DNS_ERROR); once it
        // resolves again, the target must earn its way back like any unhealthy one.
        if outcome == Outcome::DnsError {
            let changed = !self.dns_error || self.healthy;
            self.dns_error = true;
            self.healthy = false;
            (self.successes, self.tcp_failures, self.timeouts, self.http_failures) = (0, 0, 0, 0);
            if changed {
                metrics::counter!("tollgate_health_transitions_total").increment(1);
            }
            return changed;
        }
        let was_dns_error = std::mem::take(&mut self.dns_error);
        match outcome {
            Outcome::Success => {
                (self.tcp_failures, self.timeouts, self.http_failures) = (0, 0, 0);
                self.successes += 1;
            }
            Outcome::Neutral => return false,
            failure => {
                self.successes = 0;
                match failure {
                    Outcome::TcpFailure => self.tcp_failures += 1,
                    Outcome::Timeout => self.timeouts += 1,
                    _ => self.http_failures += 1,
                }
            }
        }
        let flip = if self.healthy {
            reached(self.tcp_failures, checks.tcp_failures)
                || reached(self.timeouts, checks.timeouts)
                || reached(self.http_failures, checks.http_failures)
        } else {
            reached(self.successes, checks.successes)
        };
        if flip {
            self.healthy = !self.healthy;
            (self.successes, self.tcp_failures, self.timeouts, self.http_failures) = (0, 0, 0, 0);
            metrics::counter!("tollgate_health_transitions_total").increment(1);
        }
        flip || was_dns_error
    }

    /// The gossip value of this state at `at_ms`: `up`, `down` or `dns` from a probe,
    /// `passive-up` or `passive-down` from real traffic (any member may publish those;
    /// a probe's only the target's prober).
    fn published_value(&self, at_ms: u64, passive: bool) -> String {
        let state = match (self.healthy, self.dns_error) {
            (_, true) => "dns",
            (true, false) => "up",
            (false, false) => "down",
        };
        let source = if passive { PASSIVE_PREFIX } else { "" };
        format!("{source}{state}:{at_ms}")
    }

    fn interval(&self, checks: &ActiveChecks) -> Duration {
        if self.healthy {
            checks.healthy_interval
        } else {
            checks.unhealthy_interval
        }
    }
}

/// What one config version asks the checker to do.
struct Configured {
    version: u64,
    checks: HashMap<Uuid, Arc<ActiveChecks>>,
    passive_checks: HashMap<Uuid, ActiveChecks>,
    /// Targets of upstreams with active checks: (upstream, address).
    targets: Vec<(Uuid, String)>,
}

impl Configured {
    fn of(compiled: &crate::proxy::CompiledConfig) -> Configured {
        let mut checks = HashMap::new();
        let mut passive_checks = HashMap::new();
        let state = &compiled.state;
        for upstream in typed::<entities::Upstream>(state, EntityKind::Upstream) {
            if let Some(active) = ActiveChecks::from_healthchecks(&upstream.healthchecks) {
                checks.insert(upstream.id, Arc::new(active));
            }
            if let Some(passive) = ActiveChecks::passive_from_healthchecks(&upstream.healthchecks) {
                passive_checks.insert(upstream.id, passive);
            }
        }
        let targets = typed::<entities::Target>(state, EntityKind::Target)
            .filter(|target| checks.contains_key(&target.upstream.id))
            .map(|target| (target.upstream.id, target_address(&target.target)))
            .collect();
        Configured { version: compiled.version, checks, passive_checks, targets }
    }
}

/// The checker: probes this node's share of targets and keeps the merged view.
pub struct Checker {
    pub node_id: u64,
    /// The Raft members' ids: the candidates for probing.
    pub members: Box<dyn Fn() -> Vec<u64> + Send>,
    pub published: Arc<Published>,
    pub gossip: Arc<Gossip>,
    pub view: Arc<HealthView>,
    pub states: Arc<HealthStates>,
}

impl Checker {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let me = self.node_id.to_string();
        let mut probed: HashMap<(Uuid, String), Probed> = HashMap::new();
        let mut probes = tokio::task::JoinSet::new();
        let mut in_flight: HashSet<(Uuid, String)> = HashSet::new();
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down_now: HashSet<(Uuid, String)> = HashSet::new();
        let started = Instant::now();
        let mut reports = self.view.take_reports();
        let mut configured: Option<Configured> = None;
        // Gossip has heard from every member at least once: the grace is over.
        let mut heard_everyone = false;
        let mut passive: HashMap<(Uuid, String), Probed> = HashMap::new();
        loop {
            tokio::select! {
                biased;
                _ = ticks.tick() => {}
                _ = stop.changed() => return,
            }
            // Targets with active checks in the config this node serves.
            // The checks of the config this node serves, parsed once per version.
            let compiled = self.published.load();
            if configured.as_ref().is_none_or(|c| c.version != compiled.version) {
                configured = Some(Configured::of(&compiled));
            }
            let Some(Configured { checks, passive_checks, targets, .. }) = &configured else { continue };
            if checks.is_empty() && passive_checks.is_empty() {
                // Nothing to check: no gossip to read, nothing down.
                while reports.as_mut().is_some_and(|r| r.try_recv().is_ok()) {}
                if !down_now.is_empty() {
                    down_now.clear();
                    self.view.set_down(HashSet::new());
                }
                probed.clear();
                passive.clear();
                continue;
            }
            // Probers: the Raft members gossip sees live. While this node starts (gossip
            // has not heard from everyone yet, and counts the unheard as dead), every
            // member counts, so all nodes compute the same owners from the start and
            // later only a dead node's targets move.
            let heard = self.gossip.live_nodes().await;
            let members: Vec<String> = (self.members)().into_iter().map(|id| id.to_string()).collect();
            heard_everyone |= members.iter().all(|id| heard.contains(id));
            let in_grace = !heard_everyone && started.elapsed() < STARTUP_GRACE;
            let member_set: HashSet<String> = members.iter().cloned().collect();
            let mut live: Vec<String> =
                members.into_iter().filter(|id| in_grace || heard.contains(id) || *id == me).collect();
            live.sort();
            // The merged view: the latest believed state per target.
            let mut merged: HashMap<(Uuid, String), Observed> = HashMap::new();
            let now_wall_ms = crate::clock::wall_ms();
            for (node, key, value) in self.gossip.entries(KEY_PREFIX).await {
                if planted(Bug::LocalHealthOnly) && node != me {
                    continue;
                }
                let Some((target, observed)) = believed(&node, &key, &value, &member_set, &live, now_wall_ms) else {
                    continue;
                };
                let slot = merged.entry(target).or_insert_with(|| observed.clone());
                if observed.at_ms > slot.at_ms {
                    *slot = observed;
                }
            }
            // This node's share: start new ones from the cluster's last word, drop others.
            // Ordered, so probes start in the same order every time: iterated from a
            // hash set, they dialled targets in an order drawn per process, and the
            // simulator's seeds 12 and 30 replayed differently from run to run.
            let mine: BTreeSet<(Uuid, String)> = targets
                .iter()
                .filter(|(upstream, target)| prober(&live, *upstream, target) == Some(me.as_str()))
                .cloned()
                .collect();
            probed.retain(|key, _| mine.contains(key));
            let now = Instant::now();
            for key in &mine {
                let healthy = merged.get(key).is_none_or(|observed| observed.healthy);
                let state = probed.entry(key.clone()).or_insert_with(|| Probed::new(healthy, now, false));
                let Some(active) = checks.get(&key.0) else { continue };
                let interval = state.interval(active);
                if interval.is_zero()
                    || state.next > now
                    || in_flight.contains(key)
                    || in_flight.len() >= PROBES_IN_FLIGHT_MAX
                {
                    continue;
                }
                state.next = now + interval;
                in_flight.insert(key.clone());
                let (key, active) = (key.clone(), active.clone());
                metrics::counter!("tollgate_health_probes_total").increment(1);
                probes.spawn(async move {
                    let outcome = probe(&active, &key.1).await;
                    (key, active, outcome)
                });
            }
            while let Some(done) = probes.try_join_next() {
                let Ok((key, active, outcome)) = done else { continue };
                in_flight.remove(&key);
                let Some(state) = probed.get_mut(&key) else { continue };
                let changed = state.count(outcome, &active);
                if changed || !state.published {
                    state.published = true;
                    let at_ms = crate::clock::wall_ms();
                    let value = state.published_value(at_ms, false);
                    self.gossip.set(&format!("{KEY_PREFIX}{}:{}", key.0, key.1), value).await;
                    let observed =
                        Observed { healthy: state.healthy, dns_error: state.dns_error, by: me.clone(), at_ms };
                    merged.insert(key.clone(), observed);
                    if changed {
                        tracing::info!(upstream = %key.0, target = %key.1, healthy = state.healthy, "target health changed");
                    }
                }
            }
            // Passive: what this node's requests found, counted against the same
            // thresholds; a state it decides is published like a probe's.
            let mut drained = 0;
            while let Some(report) = reports.as_mut().and_then(|r| r.try_recv().ok()) {
                drained += 1;
                let key = (report.upstream, report.target);
                if let Some(config) = passive_checks.get(&key.0) {
                    let cluster_healthy = merged.get(&key).is_none_or(|observed| observed.healthy);
                    let state = passive.entry(key.clone()).or_insert_with(|| Probed::new(cluster_healthy, now, true));
                    if state.healthy != cluster_healthy {
                        // The cluster moved on (a probe revived it): start from there.
                        *state = Probed::new(cluster_healthy, now, true);
                    }
                    if state.count(config.judge(report.observation), config) {
                        let at_ms = crate::clock::wall_ms();
                        self.gossip
                            .set(&format!("{KEY_PREFIX}{}:{}", key.0, key.1), state.published_value(at_ms, true))
                            .await;
                        tracing::info!(upstream = %key.0, target = %key.1, healthy = state.healthy, "target health changed (passive)");
                        merged
                            .insert(key, Observed { healthy: state.healthy, dns_error: false, by: me.clone(), at_ms });
                    }
                }
                if drained >= PASSIVE_REPORTS_PER_TICK {
                    break;
                }
            }
            let down: HashSet<(Uuid, String)> = merged
                .iter()
                .filter(|(key, observed)| {
                    !observed.healthy && (checks.contains_key(&key.0) || passive_checks.contains_key(&key.0))
                })
                .map(|(key, _)| key.clone())
                .collect();
            if down != down_now {
                self.view.set_down(down.clone());
                down_now = down;
            }
            if let Ok(mut states) = self.states.states.write() {
                *states = merged;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_has_one_prober_and_only_a_dead_nodes_targets_move() {
        let live: Vec<String> = ["1", "2", "3"].map(String::from).to_vec();
        let upstream = Uuid::from_u128(9);
        let targets: Vec<String> = (0..300).map(|i| format!("10.0.0.{}:80", i % 250)).collect();
        let owners: Vec<&str> = targets.iter().map(|t| prober(&live, upstream, t).unwrap()).collect();
        for node in ["1", "2", "3"] {
            let share = owners.iter().filter(|o| **o == node).count();
            assert!((60..=140).contains(&share), "node {node} probes {share} of 300");
        }
        let survivors: Vec<String> = ["1", "3"].map(String::from).to_vec();
        for (target, owner) in targets.iter().zip(&owners) {
            let now = prober(&survivors, upstream, target).unwrap();
            if *owner != "2" {
                assert_eq!(now, *owner, "{target} moved though its prober lives");
            }
        }
    }

    #[test]
    fn health_states_are_believed_only_from_members_and_probes_only_from_the_prober() {
        let members: HashSet<String> = ["1", "2", "3"].map(String::from).into();
        let live: Vec<String> = ["1", "2", "3"].map(String::from).to_vec();
        let upstream = Uuid::from_u128(9);
        let target = "10.0.0.7:80";
        let key = format!("{KEY_PREFIX}{upstream}:{target}");
        let owner = prober(&live, upstream, target).unwrap().to_string();
        let other = live.iter().find(|node| **node != owner).unwrap().clone();
        let now = 1_000_000;
        // The prober's probe result, a member's passive one: believed.
        let (_, observed) = believed(&owner, &key, "down:999000", &members, &live, now).unwrap();
        assert!(!observed.healthy);
        assert!(believed(&other, &key, "passive-down:999000", &members, &live, now).is_some());
        // Another member's "probe", and anything from a non-member: refused.
        assert!(believed(&other, &key, "down:999000", &members, &live, now).is_none());
        assert!(believed("9", &key, "passive-down:999000", &members, &live, now).is_none());
        // A time in the future is clamped to now, so it cannot outlive later states.
        let (_, future) = believed(&owner, &key, "down:99999999999", &members, &live, now).unwrap();
        assert_eq!(future.at_ms, now);
        assert!(believed(&owner, &key, "garbage", &members, &live, now).is_none());
    }

    #[test]
    fn consecutive_counters_flip_the_state_at_kongs_thresholds() {
        let checks = ActiveChecks::from_healthchecks(&serde_json::json!({"active": {
            "type": "http", "timeout": 1, "http_path": "/",
            "healthy": {"interval": 1, "successes": 2, "http_statuses": [200]},
            "unhealthy": {"interval": 1, "tcp_failures": 2, "timeouts": 0, "http_failures": 1, "http_statuses": [500]}
        }}))
        .unwrap();
        let mut state = Probed::new(true, Instant::now(), false);
        assert!(!state.count(Outcome::TcpFailure, &checks));
        assert!(!state.count(Outcome::Success, &checks), "a success resets the failures");
        assert!(!state.count(Outcome::TcpFailure, &checks));
        assert!(!state.count(Outcome::Timeout, &checks), "timeouts: 0 is off");
        assert!(state.count(Outcome::TcpFailure, &checks) && !state.healthy);
        assert!(!state.count(Outcome::Success, &checks));
        assert!(state.count(Outcome::Success, &checks) && state.healthy);
        assert!(state.count(Outcome::HttpFailure, &checks) && !state.healthy);
        assert!(ActiveChecks::from_healthchecks(&tollgate_raft_store::schema::default_healthchecks()).is_none());
    }
}
