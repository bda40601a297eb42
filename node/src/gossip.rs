//! Gossip: soft, fast cluster state over chitchat on the cluster port's UDP side.
//!
//! Raft carries what must agree (config, quota ledger); gossip carries what may be
//! briefly stale: each node's addresses, the config version it applied and serves, and
//! (with the health-check work) what it observed of upstream targets. A node's view
//! of who is live comes from chitchat's phi-accrual failure detector.
//!
//! chitchat has no security of its own; the transport here is ours. With a cluster
//! secret (`--cluster-secret`, required off loopback), every datagram carries the
//! time it was sent and an HMAC-SHA256 tag of both (keyed by the secret and the
//! cluster id); datagrams without a valid tag, or sent more than [`TAG_SKEW`] from
//! now (a replay), are dropped before chitchat sees them
//! (`tollgate_gossip_datagrams_rejected_total`). Without one (loopback only),
//! chitchat's own parser drops what is not a chitchat message, and the cluster id
//! keeps foreign clusters apart. Either way, nothing that arrives on the socket can
//! stop the node, and what gossip says of upstream health is believed only from Raft
//! members (`health.rs`). The time and tag cost 40 bytes, so with a secret a datagram
//! at chitchat's largest (about 64 KiB of state in one delta) does not fit and is not
//! sent; gossip state stays far below that here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ProtocolVersion,
};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

mod plain;

/// How often a node gossips with a few peers.
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(500);
/// Largest datagram accepted (chitchat's own bound).
const DATAGRAM_BYTES_MAX: usize = 65_507;
/// Authenticated datagrams handed to chitchat's socket and not decoded yet; past it,
/// new ones are dropped (normally there is at most one).
const PENDING_DATAGRAMS_MAX: usize = 256;
/// Length of the authentication tag appended to every datagram with a secret.
const TAG_BYTES: usize = 32;
/// Length of the send time (ms since the epoch) before the tag.
const STAMP_BYTES: usize = 8;
/// How far a datagram's send time may be from the receiver's clock.
pub const TAG_SKEW: Duration = Duration::from_secs(30);
/// How often this node's own keys (applied config version) are refreshed.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// Membership events queued for each subscriber; a slow one misses old events and
/// reads the current view instead.
pub const MEMBER_EVENTS_MAX: usize = 1024;

/// Keys every node publishes about itself.
pub const KEY_CLUSTER_ADDR: &str = "cluster_addr";
pub const KEY_PROXY_ADDR: &str = "proxy_addr";
pub const KEY_ADMIN_ADDR: &str = "admin_addr";
pub const KEY_CONFIG_VERSION: &str = "config_version";
/// Requests the node's proxy is handling (until their response headers).
pub const KEY_IN_FLIGHT: &str = "in_flight";
/// Requests per second over the last publish interval.
pub const KEY_REQUESTS_PER_S: &str = "requests_per_s";

/// What a node publishes about itself every second.
pub struct SelfState {
    pub config_version: u64,
    pub in_flight: u64,
    /// Requests since start (the rate is derived from it).
    pub requests_total: u64,
    /// The Raft members' cluster addresses: any gossip does not see live is sent a
    /// gossip round, so members that joined after start are found.
    pub members: Vec<String>,
}

/// A change in the live membership as gossip sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    Added(String),
    Updated(String),
    Removed(String),
}

/// The gossip side of a node.
pub struct Gossip {
    backend: Backend,
    events: broadcast::Sender<MemberEvent>,
    /// Datagrams dropped unread (bad tag, too short).
    rejected: Arc<std::sync::atomic::AtomicU64>,
}

/// chitchat in production; under the simulator, gossip whose every choice follows a
/// fixed order ([`plain`]).
enum Backend {
    Chitchat(ChitchatHandle),
    Plain(Arc<plain::Plain>, watch::Sender<bool>),
}

/// What a node needs to start gossiping.
pub struct GossipSetup {
    pub node_id: u64,
    pub cluster_id: String,
    pub secret: Option<String>,
    /// UDP address to bind (the cluster port).
    pub listen: SocketAddr,
    /// What peers send to.
    pub advertise: SocketAddr,
    /// Addresses of other members to start from.
    pub seeds: Vec<String>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

/// How long a starting node retries looking its gossip seeds up while none resolves
/// (peers started at the same moment may not be in DNS yet).
const SEED_RESOLVE_WAIT: Duration = Duration::from_secs(30);
const SEED_RESOLVE_PAUSE: Duration = Duration::from_millis(500);

/// The seeds' addresses (`ip:port`). Those that do not resolve are left out: gossip
/// spreads membership, so one reachable seed is enough. While none resolves, it retries
/// for [`SEED_RESOLVE_WAIT`].
async fn resolve_seeds(seeds: &[String]) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + SEED_RESOLVE_WAIT;
    loop {
        let mut resolved = Vec::new();
        for seed in seeds {
            match crate::env::resolve(seed).await {
                Ok(address) => resolved.push(address.to_string()),
                Err(error) => tracing::debug!(%seed, %error, "gossip seed does not resolve yet"),
            }
        }
        if !resolved.is_empty() || seeds.is_empty() || tokio::time::Instant::now() >= deadline {
            if resolved.len() < seeds.len() {
                tracing::warn!(resolved = resolved.len(), seeds = seeds.len(), "some gossip seeds did not resolve");
            }
            return resolved;
        }
        tokio::time::sleep(SEED_RESOLVE_PAUSE).await;
    }
}

impl Gossip {
    pub async fn start(setup: GossipSetup) -> anyhow::Result<Arc<Gossip>> {
        // A restarted node is a new generation, so peers do not mistake its fresh
        // state for an old one.
        let generation = crate::clock::wall().as_nanos() as u64;
        if crate::env::simulated() {
            return Gossip::start_plain(setup, generation).await;
        }
        // chitchat looks seed names up with glibc's resolver, which a static binary in
        // an empty image cannot load (crate::dns): it gets addresses.
        let seeds = resolve_seeds(&setup.seeds).await;
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(setup.node_id.to_string(), generation, setup.advertise),
            cluster_id: setup.cluster_id.clone(),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: setup.listen,
            seed_nodes: seeds,
            failure_detector_config: FailureDetectorConfig {
                initial_interval: GOSSIP_INTERVAL,
                dead_node_grace_period: Duration::from_secs(3600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let initial = vec![
            (KEY_CLUSTER_ADDR.to_string(), setup.advertise.to_string()),
            (KEY_PROXY_ADDR.to_string(), setup.proxy_addr.to_string()),
            (KEY_ADMIN_ADDR.to_string(), setup.admin_addr.to_string()),
            (KEY_CONFIG_VERSION.to_string(), "0".to_string()),
        ];
        let rejected = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let key = setup.secret.map(|secret| tag_key(&secret, &setup.cluster_id));
        let transport = AuthTransport { key, rejected: rejected.clone() };
        let handle = spawn_chitchat(config, initial, &transport).await?;
        let (events, _) = broadcast::channel(MEMBER_EVENTS_MAX);
        let gossip = Arc::new(Gossip { backend: Backend::Chitchat(handle), events, rejected });
        tokio::spawn(watch_members(gossip.clone()));
        Ok(gossip)
    }

    async fn start_plain(setup: GossipSetup, generation: u64) -> anyhow::Result<Arc<Gossip>> {
        let socket = crate::env::bind_udp(setup.listen).await?;
        let mut seeds = Vec::new();
        for seed in &setup.seeds {
            seeds.push(crate::env::resolve(seed).await?);
        }
        let rejected = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let key = setup.secret.map(|secret| tag_key(&secret, &setup.cluster_id));
        let own = (setup.cluster_id, setup.node_id.to_string(), generation);
        let plain = plain::Plain::new(socket, key, own, setup.advertise, &seeds, rejected.clone());
        plain.set(KEY_CLUSTER_ADDR, setup.advertise.to_string());
        plain.set(KEY_PROXY_ADDR, setup.proxy_addr.to_string());
        plain.set(KEY_ADMIN_ADDR, setup.admin_addr.to_string());
        plain.set(KEY_CONFIG_VERSION, "0".to_string());
        let (events, _) = broadcast::channel(MEMBER_EVENTS_MAX);
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(plain.clone().run(stopped));
        let gossip = Arc::new(Gossip { backend: Backend::Plain(plain, stop), events, rejected });
        tokio::spawn(watch_members(gossip.clone()));
        Ok(gossip)
    }

    /// Sets one of this node's keys.
    pub async fn set(&self, key: &str, value: String) {
        match &self.backend {
            Backend::Chitchat(handle) => {
                handle.with_chitchat(|chitchat| chitchat.self_node_state().set(key, value.clone())).await
            }
            Backend::Plain(plain, _) => plain.set(key, value),
        }
    }

    /// Datagrams this node dropped unread (bad or missing tag).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Membership changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        self.events.subscribe()
    }

    /// Every live node's keys under `prefix`: (node id, key, value).
    pub async fn entries(&self, prefix: &str) -> Vec<(String, String, String)> {
        let handle = match &self.backend {
            Backend::Chitchat(handle) => handle,
            Backend::Plain(plain, _) => {
                let mut found = Vec::new();
                for (id, keys) in plain.live_nodes() {
                    for (key, value) in keys.into_iter().filter(|(key, _)| key.starts_with(prefix)) {
                        found.push((id.clone(), key, value));
                    }
                }
                return found;
            }
        };
        handle
            .with_chitchat(|chitchat| {
                let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
                let mut found = Vec::new();
                for id in &live {
                    let Some(state) = chitchat.node_state(id) else { continue };
                    for (key, value) in state.key_values().filter(|(key, _)| key.starts_with(prefix)) {
                        found.push((id.node_id.to_string(), key.to_string(), value.to_string()));
                    }
                }
                found
            })
            .await
    }

    /// Live node ids (this one included), by gossip's failure detector.
    pub async fn live_nodes(&self) -> Vec<String> {
        match &self.backend {
            Backend::Chitchat(handle) => {
                handle.with_chitchat(|chitchat| chitchat.live_nodes().map(|id| id.node_id.to_string()).collect()).await
            }
            Backend::Plain(plain, _) => plain.live_nodes().into_iter().map(|(id, _)| id).collect(),
        }
    }

    /// The gossip view for `/cluster`: per node, live or not, and its keys.
    pub async fn view(&self) -> Value {
        let handle = match &self.backend {
            Backend::Chitchat(handle) => handle,
            Backend::Plain(plain, _) => {
                let live: std::collections::BTreeSet<String> =
                    plain.live_nodes().into_iter().map(|(id, _)| id).collect();
                let mut nodes = serde_json::Map::new();
                for (id, generation, address, keys) in plain.all_nodes() {
                    let keys: serde_json::Map<String, Value> =
                        keys.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
                    let entry = json!({
                        "live": live.contains(&id),
                        "generation": generation,
                        "gossip_addr": address.to_string(),
                        "keys": keys,
                    });
                    nodes.insert(id, entry);
                }
                return json!({ "live": live.len(), "nodes": nodes });
            }
        };
        handle
            .with_chitchat(|chitchat| {
                let live: std::collections::BTreeSet<String> =
                    chitchat.live_nodes().map(|id| id.node_id.to_string()).collect();
                let mut nodes = serde_json::Map::new();
                for (id, state) in chitchat.node_states() {
                    let keys: serde_json::Map<String, Value> =
                        state.key_values().map(|(k, v)| (k.to_string(), Value::from(v))).collect();
                    nodes.insert(
                        id.node_id.to_string(),
                        json!({
                            "live": live.contains(id.node_id.as_ref()),
                            "generation": id.generation_id,
                            "gossip_addr": id.gossip_advertise_addr.to_string(),
                            "keys": keys,
                        }),
                    );
                }
                json!({ "cluster_id": chitchat.cluster_id(), "live": live.len(), "nodes": nodes })
            })
            .await
    }

    /// Publishes this node's applied config version and load every second until
    /// `stop`, and reaches out to Raft members gossip does not see live.
    pub async fn publish_loop(self: Arc<Self>, read: impl Fn() -> SelfState, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(PUBLISH_INTERVAL);
        let mut last: Option<(tokio::time::Instant, u64)> = None;
        loop {
            tokio::select! {
                biased;
                _ = ticks.tick() => {}
                _ = stop.changed() => return,
            }
            let state = read();
            let now = tokio::time::Instant::now();
            let rate = last.map_or(0.0, |(at, total)| {
                state.requests_total.saturating_sub(total) as f64 / now.duration_since(at).as_secs_f64().max(0.001)
            });
            last = Some((now, state.requests_total));
            self.set(KEY_CONFIG_VERSION, state.config_version.to_string()).await;
            self.set(KEY_IN_FLIGHT, state.in_flight.to_string()).await;
            self.set(KEY_REQUESTS_PER_S, format!("{rate:.1}")).await;
            let known: Vec<String> = self
                .entries(KEY_CLUSTER_ADDR)
                .await
                .into_iter()
                .filter(|(_, key, _)| key == KEY_CLUSTER_ADDR)
                .map(|(_, _, address)| address)
                .collect();
            for member in state.members.iter().filter(|member| !known.contains(member)) {
                if let Ok(address) = member.parse::<SocketAddr>() {
                    match &self.backend {
                        Backend::Chitchat(handle) => {
                            let _ = handle.gossip(address);
                        }
                        Backend::Plain(plain, _) => plain.add_peer(address),
                    }
                }
            }
        }
    }

    pub async fn shutdown(&self) {
        match &self.backend {
            Backend::Chitchat(handle) => {
                let _ = handle.initiate_shutdown();
            }
            Backend::Plain(_, stop) => {
                let _ = stop.send(true);
            }
        }
    }
}

/// Turns chitchat's live-node snapshots into add/update/remove events.
async fn watch_members(gossip: Arc<Gossip>) {
    match &gossip.backend {
        Backend::Chitchat(handle) => {
            let mut watcher = handle.with_chitchat(|chitchat| chitchat.live_nodes_watcher()).await;
            let mut known = BTreeMap::new();
            loop {
                let current = watcher
                    .borrow_and_update()
                    .iter()
                    .map(|(id, state)| (id.node_id.to_string(), state.max_version()))
                    .collect();
                known = announce(&gossip.events, known, current);
                if watcher.changed().await.is_err() {
                    return;
                }
            }
        }
        Backend::Plain(plain, _) => {
            let mut watcher = plain.live.subscribe();
            let mut known = BTreeMap::new();
            loop {
                let current = watcher.borrow_and_update().clone();
                known = announce(&gossip.events, known, current);
                if watcher.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends the events that turn `known` into `current`, and returns `current`.
fn announce(
    events: &broadcast::Sender<MemberEvent>,
    known: BTreeMap<String, u64>,
    current: BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    for (id, version) in &current {
        let event = match known.get(id) {
            None => Some(MemberEvent::Added(id.clone())),
            Some(old) if old != version => Some(MemberEvent::Updated(id.clone())),
            Some(_) => None,
        };
        if let Some(event) = event {
            if matches!(event, MemberEvent::Added(_)) {
                tracing::info!(node = %id, "gossip: node live");
            }
            let _ = events.send(event);
        }
    }
    for id in known.keys().filter(|id| !current.contains_key(*id)) {
        tracing::info!(node = %id, "gossip: node no longer live");
        let _ = events.send(MemberEvent::Removed(id.clone()));
    }
    metrics::gauge!("tollgate_gossip_live_nodes").set(current.len() as f64);
    current
}

/// The key datagrams are tagged with: the secret, bound to the cluster id.
fn tag_key(secret: &str, cluster_id: &str) -> ring::hmac::Key {
    let material = format!("tollgate-gossip\0{cluster_id}\0{secret}");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, material.as_bytes())
}

/// UDP with an optional HMAC tag per datagram.
///
/// chitchat 0.13 keeps its wire encoding to itself, so the sealing socket lets
/// chitchat's own UDP socket encode and decode, over loopback: an outgoing envelope
/// is sent to a local outbox socket, read back as bytes, tagged and sent to the peer
/// from the cluster port; an incoming datagram with a valid tag is passed, untagged,
/// to chitchat's socket to decode. Without a secret, chitchat's socket is bound to
/// the cluster port itself.
struct AuthTransport {
    key: Option<ring::hmac::Key>,
    rejected: Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait::async_trait]
impl Transport for AuthTransport {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let Some(key) = self.key.clone() else {
            return Ok(Box::new(CountingSocket(chitchat::transport::UdpTransport.open(listen).await?)));
        };
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let inner = chitchat::transport::UdpTransport.open(loopback).await?;
        let inner_addr = inner.local_addr()?;
        Ok(Box::new(SealingSocket {
            public: tokio::net::UdpSocket::bind(listen).await?,
            outbox: tokio::net::UdpSocket::bind(loopback).await?,
            inner,
            inner_addr,
            key,
            rejected: self.rejected.clone(),
            buffer: vec![0; DATAGRAM_BYTES_MAX],
            destinations: std::collections::VecDeque::new(),
            senders: std::collections::VecDeque::new(),
        }))
    }
}

/// chitchat's own UDP socket, with the gossip byte counters.
struct CountingSocket(Box<dyn Socket>);

#[async_trait::async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.0.local_addr()
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let outcome = self.0.send(to, envelope).await?;
        metrics::counter!("tollgate_gossip_bytes_sent_total").increment(outcome.num_bytes_sent as u64);
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let outcome = self.0.recv().await?;
        metrics::counter!("tollgate_gossip_bytes_received_total").increment(outcome.num_bytes_received as u64);
        Ok(outcome)
    }
}

struct SealingSocket {
    /// The cluster port: tagged datagrams in and out.
    public: tokio::net::UdpSocket,
    /// Where chitchat's socket sends outgoing envelopes to be read back as bytes, and
    /// where incoming payloads are sent from to be decoded.
    outbox: tokio::net::UdpSocket,
    /// chitchat's own socket, on loopback.
    inner: Box<dyn Socket>,
    inner_addr: SocketAddr,
    key: ring::hmac::Key,
    rejected: Arc<std::sync::atomic::AtomicU64>,
    buffer: Vec<u8>,
    /// Peers of envelopes encoded but not sent yet, in order (a cancelled send leaves
    /// its bytes in the outbox; the next send delivers them first).
    destinations: std::collections::VecDeque<SocketAddr>,
    /// Senders of payloads passed to chitchat's socket but not decoded yet, in order.
    senders: std::collections::VecDeque<SocketAddr>,
}

#[async_trait::async_trait]
impl Socket for SealingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.public.local_addr()?)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let outbox = self.outbox.local_addr()?;
        self.inner.send(outbox, envelope).await?;
        self.destinations.push_back(to);
        let mut sent = 0;
        while let Some(to) = self.destinations.front().copied() {
            let (length, _) = self.outbox.recv_from(&mut self.buffer).await?;
            self.destinations.pop_front();
            let frame = seal(&self.key, self.buffer[..length].to_vec());
            // A send that fails (too large with its tag, a peer unreachable now) is
            // not fatal: gossip tries other peers next round.
            match self.public.send_to(&frame, to).await {
                Ok(bytes) => sent += bytes,
                Err(error) => tracing::debug!(%error, %to, "gossip send failed"),
            }
        }
        metrics::counter!("tollgate_gossip_bytes_sent_total").increment(sent as u64);
        Ok(SendOutcome { num_bytes_sent: sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if let Some(from) = self.senders.front().copied() {
                // Only authenticated payloads reach chitchat's socket, so each decodes.
                let mut outcome = self.inner.recv().await?;
                self.senders.pop_front();
                outcome.from_addr = from;
                return Ok(outcome);
            }
            let (length, from) = match self.public.recv_from(&mut self.buffer).await {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "gossip recv failed");
                    continue;
                }
            };
            metrics::counter!("tollgate_gossip_bytes_received_total").increment(length as u64);
            let payload = match unseal(&self.key, &self.buffer[..length]) {
                Ok(payload) => payload,
                Err(why) => {
                    self.reject(from, why);
                    continue;
                }
            };
            if self.senders.len() >= PENDING_DATAGRAMS_MAX {
                self.reject(from, "too many datagrams waiting to be decoded");
                continue;
            }
            self.outbox.send_to(payload, self.inner_addr).await?;
            self.senders.push_back(from);
        }
    }
}

impl SealingSocket {
    fn reject(&self, from: SocketAddr, why: &str) {
        reject(&self.rejected, from, why);
    }
}

fn reject(rejected: &std::sync::atomic::AtomicU64, from: SocketAddr, why: &str) {
    tracing::debug!(%from, why, "gossip datagram dropped");
    rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics::counter!("tollgate_gossip_datagrams_rejected_total").increment(1);
}

/// `payload`, then the time it is sent and the tag of both.
fn seal(key: &ring::hmac::Key, mut payload: Vec<u8>) -> Vec<u8> {
    payload.extend_from_slice(&crate::clock::wall_ms().to_be_bytes());
    let tag = ring::hmac::sign(key, &payload);
    payload.extend_from_slice(tag.as_ref());
    payload
}

/// The payload of a sealed datagram, or why it is refused.
fn unseal<'a>(key: &ring::hmac::Key, datagram: &'a [u8]) -> Result<&'a [u8], &'static str> {
    let Some(split) = datagram.len().checked_sub(TAG_BYTES + STAMP_BYTES) else {
        return Err("shorter than its tag");
    };
    let (stamped, tag) = datagram.split_at(split + STAMP_BYTES);
    if ring::hmac::verify(key, stamped, tag).is_err() {
        return Err("bad tag");
    }
    let (payload, stamp) = stamped.split_at(split);
    let sent_ms = u64::from_be_bytes(stamp.try_into().unwrap_or_default());
    if crate::clock::wall_ms().abs_diff(sent_ms) > TAG_SKEW.as_millis() as u64 {
        return Err("sent too long ago (a replay) or clocks too far apart");
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_udp() -> SocketAddr {
        std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free port")
    }

    async fn node(id: u64, listen: SocketAddr, seed: SocketAddr, secret: Option<&str>) -> Arc<Gossip> {
        Gossip::start(GossipSetup {
            node_id: id,
            cluster_id: "test".into(),
            secret: secret.map(str::to_string),
            listen,
            advertise: listen,
            seeds: vec![seed.to_string()],
            proxy_addr: listen,
            admin_addr: listen,
        })
        .await
        .expect("gossip starts")
    }

    /// Waits for `wanted` on `events`, at most ten seconds.
    async fn expect_event(events: &mut broadcast::Receiver<MemberEvent>, wanted: MemberEvent) {
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(event) = events.recv().await {
                if event == wanted {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "no {wanted:?}");
    }

    #[tokio::test]
    async fn membership_changes_arrive_as_one_stream_and_a_wrong_secret_stays_out() {
        let (a, b, c) = (free_udp(), free_udp(), free_udp());
        let first = node(1, a, b, Some("s")).await;
        let mut events = first.subscribe();
        let second = node(2, b, a, Some("s")).await;
        expect_event(&mut events, MemberEvent::Added("2".into())).await;
        second.set(KEY_CONFIG_VERSION, "7".into()).await;
        expect_event(&mut events, MemberEvent::Updated("2".into())).await;
        // A node with another secret never becomes live for the others: its datagrams
        // are dropped unread.
        let stranger = node(3, c, a, Some("other")).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while first.rejected() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "the stranger's datagrams never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(first.live_nodes().await.len(), 2, "{}", first.view().await);
        stranger.shutdown().await;
        second.shutdown().await;
        expect_event(&mut events, MemberEvent::Removed("2".into())).await;
    }
}
