//! Gossip under the simulator: every node sends its whole state to every peer it
//! knows, each round, in address order; a node is live while it was heard within
//! [`LIVE_TIMEOUT`].
//!
//! chitchat picks the peers of a round with a generator it seeds from the operating
//! system and iterates std hash sets, so no seed can make it replay; this backend
//! keeps the boundary the rest of the node sees ([`super::Gossip`]: keys per node,
//! live nodes, membership events) and makes every choice in a fixed order. It does
//! not relay what a node heard from others (chitchat does): under a partition a
//! node's view holds only the nodes it reaches itself. Datagrams are sealed with the
//! cluster secret as chitchat's are (`seal`, `unseal`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{GOSSIP_INTERVAL, KEY_CLUSTER_ADDR};
use crate::env::Datagrams;

/// How long a node stays live after it was last heard: four rounds.
pub const LIVE_TIMEOUT: Duration = Duration::from_millis(4 * GOSSIP_INTERVAL.as_millis() as u64);
/// Largest datagram read.
const DATAGRAM_BYTES_MAX: usize = 65_507;
/// Peers one node sends to; addresses past it are not added.
const PEERS_MAX: usize = 64;
/// Nodes one node keeps state of.
const NODES_MAX: usize = 64;

/// One node's state as sent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Digest {
    cluster_id: String,
    node_id: String,
    generation: u64,
    /// Bumped by every change to `keys`.
    version: u64,
    keys: BTreeMap<String, String>,
}

/// What a node heard of another.
#[derive(Clone, Debug)]
pub struct Heard {
    pub generation: u64,
    pub version: u64,
    pub keys: BTreeMap<String, String>,
    pub address: SocketAddr,
    at: Instant,
}

struct State {
    own: Digest,
    nodes: BTreeMap<String, Heard>,
    peers: BTreeSet<SocketAddr>,
}

pub struct Plain {
    state: RwLock<State>,
    socket: Box<dyn Datagrams>,
    key: Option<ring::hmac::Key>,
    advertise: SocketAddr,
    rejected: Arc<AtomicU64>,
    /// Live node id → the version last heard (this node's included).
    pub live: watch::Sender<BTreeMap<String, u64>>,
}

impl Plain {
    pub fn new(
        socket: Box<dyn Datagrams>,
        key: Option<ring::hmac::Key>,
        own: (String, String, u64),
        advertise: SocketAddr,
        seeds: &[SocketAddr],
        rejected: Arc<AtomicU64>,
    ) -> Arc<Plain> {
        let (cluster_id, node_id, generation) = own;
        let digest = Digest { cluster_id, node_id: node_id.clone(), generation, version: 0, keys: BTreeMap::new() };
        let peers = seeds.iter().copied().filter(|seed| *seed != advertise).take(PEERS_MAX).collect();
        let (live, _) = watch::channel(BTreeMap::from([(node_id, 0)]));
        Arc::new(Plain {
            state: RwLock::new(State { own: digest, nodes: BTreeMap::new(), peers }),
            socket,
            key,
            advertise,
            rejected,
            live,
        })
    }

    pub fn set(&self, key: &str, value: String) {
        let Ok(mut state) = self.state.write() else { return };
        if state.own.keys.get(key) != Some(&value) {
            state.own.keys.insert(key.to_string(), value);
            state.own.version += 1;
        }
    }

    /// Sends to `address` from the next round on.
    pub fn add_peer(&self, address: SocketAddr) {
        let Ok(mut state) = self.state.write() else { return };
        if address != self.advertise && state.peers.len() < PEERS_MAX {
            state.peers.insert(address);
        }
    }

    /// Live nodes with their keys (this one first by id order, with the rest).
    pub fn live_nodes(&self) -> Vec<(String, BTreeMap<String, String>)> {
        let Ok(state) = self.state.read() else { return Vec::new() };
        let now = Instant::now();
        let mut live: Vec<(String, BTreeMap<String, String>)> = state
            .nodes
            .iter()
            .filter(|(_, heard)| now.saturating_duration_since(heard.at) < LIVE_TIMEOUT)
            .map(|(id, heard)| (id.clone(), heard.keys.clone()))
            .collect();
        live.push((state.own.node_id.clone(), state.own.keys.clone()));
        live.sort_by(|a, b| a.0.cmp(&b.0));
        live
    }

    /// Every node heard of, live or not, and this one: (id, generation, address, keys).
    pub fn all_nodes(&self) -> Vec<(String, u64, SocketAddr, BTreeMap<String, String>)> {
        let Ok(state) = self.state.read() else { return Vec::new() };
        let mut all: Vec<_> = state
            .nodes
            .iter()
            .map(|(id, heard)| (id.clone(), heard.generation, heard.address, heard.keys.clone()))
            .collect();
        all.push((state.own.node_id.clone(), state.own.generation, self.advertise, state.own.keys.clone()));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Rounds until `stop`: send this node's state to every peer, then refresh who
    /// is live; datagrams are read in between.
    pub async fn run(self: Arc<Plain>, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(GOSSIP_INTERVAL);
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => return,
                _ = ticks.tick() => self.round().await,
                received = self.socket.recv_from() => match received {
                    Ok((datagram, from)) => self.receive(&datagram, from),
                    Err(error) => tracing::debug!(%error, "gossip recv failed"),
                },
            }
        }
    }

    async fn round(&self) {
        let (payload, peers) = {
            let Ok(state) = self.state.read() else { return };
            let Ok(payload) = serde_json::to_vec(&state.own) else { return };
            (payload, state.peers.iter().copied().collect::<Vec<_>>())
        };
        let payload = match &self.key {
            Some(key) => super::seal(key, payload),
            None => payload,
        };
        for peer in peers {
            if let Err(error) = self.socket.send_to(payload.clone(), peer).await {
                tracing::debug!(%error, %peer, "gossip send failed");
            }
        }
        self.refresh_live();
    }

    fn receive(&self, datagram: &[u8], from: SocketAddr) {
        if datagram.len() > DATAGRAM_BYTES_MAX {
            return super::reject(&self.rejected, from, "too large");
        }
        let payload = match &self.key {
            Some(key) => match super::unseal(key, datagram) {
                Ok(payload) => payload,
                Err(why) => return super::reject(&self.rejected, from, why),
            },
            None => datagram,
        };
        let Ok(digest) = serde_json::from_slice::<Digest>(payload) else {
            return super::reject(&self.rejected, from, "not a gossip digest");
        };
        let Ok(mut state) = self.state.write() else { return };
        if digest.cluster_id != state.own.cluster_id || digest.node_id == state.own.node_id {
            return;
        }
        if !state.nodes.contains_key(&digest.node_id) && state.nodes.len() >= NODES_MAX {
            return;
        }
        let address = digest.keys.get(KEY_CLUSTER_ADDR).and_then(|address| address.parse().ok()).unwrap_or(from);
        let newer = state
            .nodes
            .get(&digest.node_id)
            .is_none_or(|heard| (digest.generation, digest.version) >= (heard.generation, heard.version));
        if newer {
            let heard = Heard {
                generation: digest.generation,
                version: digest.version,
                keys: digest.keys,
                address,
                at: Instant::now(),
            };
            state.nodes.insert(digest.node_id, heard);
        }
        if address != self.advertise && state.peers.len() < PEERS_MAX {
            state.peers.insert(address);
        }
        drop(state);
        self.refresh_live();
    }

    fn refresh_live(&self) {
        let Ok(state) = self.state.read() else { return };
        let now = Instant::now();
        let mut live: BTreeMap<String, u64> = state
            .nodes
            .iter()
            .filter(|(_, heard)| now.saturating_duration_since(heard.at) < LIVE_TIMEOUT)
            .map(|(id, heard)| (id.clone(), heard.version))
            .collect();
        live.insert(state.own.node_id.clone(), state.own.version);
        drop(state);
        self.live.send_if_modified(|current| {
            if *current == live {
                return false;
            }
            *current = live;
            true
        });
    }
}
