//! Cluster wiring: the Raft instance, bootstrap and join, and the leader path for writes,
//! linearizable reads and membership changes.
//!
//! Every write goes through [`Cluster::on_leader`]: run it here when this node leads,
//! otherwise send it to the leader over the cluster port and return the leader's
//! answer. Everything is bounded by `write_leader_wait_ms`:
//! - A request that certainly did not reach a leader (connection refused, no leader
//!   yet) is retried.
//! - A request with a leader that stalls or is cut off is abandoned as soon as this
//!   node learns of a newer leader, and sent to that one: reads at once; admin writes
//!   and quota releases too, under the same write id, which the state machine applies
//!   once however many copies reach the log (`tollgate_raft_store::recent`). Quota
//!   grants are not resent (a lost grant only under-admits); their round fails.
//! - A request still without an answer at the deadline gets 503 saying its outcome is
//!   unknown: it may or may not have been applied, and the client should read before
//!   retrying.

pub mod grants;
pub mod network;
pub mod tls;
pub mod transport;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tollgate_raft_store::command::{Command, Op, Outcome, WriteId};
use tollgate_raft_store::quota::{Grant, GrantRequest, QuotaKey};
use tollgate_raft_store::store::Applied;
use tollgate_raft_store::{ApiError, ErrorCode, NodeId, Raft, TypeConfig};

use self::network::{PATH_APPEND, PATH_SNAPSHOT, PATH_VOTE};
use self::tls::PeerIdentity;
use self::transport::{FrameHandler, Peer, PeerClient, PeerError, Refusal};
use crate::clock::Clock;
use crate::config::NodeConfig;

/// A request for the leader, sent by a node that believes the receiver leads.
pub const PATH_LEADER: &str = "/cluster/leader";
/// A new node asking any member to add it; the member routes it to the leader.
pub const PATH_JOIN: &str = "/cluster/join";
/// A stopping leader asking the voter it hands leadership to to call an election.
pub const PATH_ELECT: &str = "/cluster/elect";
/// Longest a stopping leader waits for its successor to catch up before asking it to
/// call an election.
const HAND_OFF_CATCH_UP: Duration = Duration::from_secs(1);

/// Sent by a stopping leader to the voter it hands leadership to ([`PATH_ELECT`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ElectRequest {
    pub from: NodeId,
}
/// How long one forwarded request may take before its outcome counts as unknown (and
/// never past the request's `write_leader_wait_ms`).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts while no leader is reachable.
const LEADER_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Largest snapshot a node accepts from a leader. A snapshot of 20 000 routes is a few
/// MiB; the Admin API's body limit and `DOCUMENT_ENTITIES_MAX` keep real ones far
/// below this.
pub const SNAPSHOT_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// Snapshots being received at once (by id); an older one's progress is forgotten.
const SNAPSHOTS_RECEIVING_MAX: usize = 4;
/// Most entries in one AppendEntries; with the frame limit this bounds a batch's size.
const APPEND_ENTRIES_MAX: u64 = 64;
/// Pause between attempts to join a running cluster.
const JOIN_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// A request only the leader can answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderRequest {
    Write(Command),
    /// ReadIndex: the log index a linearizable read must wait for.
    ReadIndex,
    AddMember {
        node_id: NodeId,
        address: String,
    },
    RemoveMember {
        node_id: NodeId,
    },
}

/// A leader request forwarded by node `from` to the node it saw lead in `term`. The
/// receiver runs it only while it leads in that same term, so a leader that stalled,
/// lost its place and won a later election never acts on a request its sender gave up
/// on; and only from a member (whose certificate, with TLS, names `from`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forwarded {
    pub from: NodeId,
    pub term: u64,
    pub request: LeaderRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderReply {
    Write { result: Result<Outcome, ApiError>, log_index: u64 },
    ReadIndex { log_index: u64 },
    Membership { log_index: u64 },
}

/// Why the leader path did not produce an answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderError {
    /// This node is not (or no longer) the leader; try again.
    NotLeader,
    /// The request failed in a way a retry would not fix.
    Failed(ApiError),
}

#[derive(Clone)]
pub struct Cluster {
    pub id: NodeId,
    pub raft: Raft,
    pub applied: watch::Receiver<Applied>,
    peers: PeerClient,
    clock: Arc<dyn Clock>,
    write_leader_wait: Duration,
    /// The cluster port authenticates peers (TLS or the cluster secret).
    authenticated: bool,
}

/// openraft's configuration from the node's.
pub fn raft_config(config: &NodeConfig, restarting: bool) -> anyhow::Result<Arc<Config>> {
    let raft_config = Config {
        // A restarting member holds its elections (see `hold_elections_after_restart`).
        enable_elect: !restarting,
        cluster_name: "tollgate".into(),
        heartbeat_interval: config.raft_heartbeat_ms,
        election_timeout_min: config.raft_election_min_ms,
        election_timeout_max: config.raft_election_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
        max_in_snapshot_log_to_keep: config.snapshot_keep_logs,
        snapshot_max_chunk_size: 1024 * 1024,
        max_payload_entries: APPEND_ENTRIES_MAX,
        install_snapshot_timeout: 2000,
        ..Default::default()
    };
    Ok(Arc::new(raft_config.validate()?))
}

/// How many maximal election timeouts a restarting member waits before it may call an
/// election. openraft 0.9 has no pre-vote: a member that restarts, and does not hear the
/// leader's next heartbeat within one election timeout of starting (the leader retries a
/// peer it lost every 200 ms, and a loaded host adds to that), would call an election
/// its current log can win and unseat a healthy leader. Holding for three timeouts
/// (1.2 s by default) lets the heartbeat arrive, which resets the election timer; when
/// the whole cluster restarts, the first election comes that much later.
pub const RESTART_ELECTION_HOLD_TIMEOUTS: u64 = 3;

/// Lets a restarting member call elections once the hold is over (its Raft config
/// started it with elections off).
pub async fn hold_elections_after_restart(raft: Raft, election_max_ms: u64) {
    tokio::time::sleep(Duration::from_millis(election_max_ms * RESTART_ELECTION_HOLD_TIMEOUTS)).await;
    raft.runtime_config().elect(true);
}

impl LeaderRequest {
    /// Whether sending this again, after an attempt of unknown outcome, is safe: reads
    /// and membership changes are idempotent, and writes with an id are applied once.
    fn may_resend(&self) -> bool {
        match self {
            LeaderRequest::Write(command) => command.write_id.is_some(),
            LeaderRequest::ReadIndex | LeaderRequest::AddMember { .. } | LeaderRequest::RemoveMember { .. } => true,
        }
    }
}

/// A fresh write id: 128 random bits, so ids of different nodes and processes never
/// meet in practice.
fn new_write_id() -> WriteId {
    WriteId(crate::env::random())
}

fn unavailable(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, message)
}

impl Cluster {
    pub fn new(
        id: NodeId,
        raft: Raft,
        applied: watch::Receiver<Applied>,
        peers: PeerClient,
        clock: Arc<dyn Clock>,
        write_leader_wait: Duration,
    ) -> Cluster {
        let authenticated = peers.authenticates();
        Cluster { id, raft, applied, peers, clock, write_leader_wait, authenticated }
    }

    /// The latest applied state (cheap: the maps are shared).
    pub fn state(&self) -> Applied {
        self.applied.borrow().clone()
    }

    /// Static bootstrap: initialise the cluster unless this node already has state.
    /// Every listed node does this with the same members, which openraft allows.
    pub async fn bootstrap(&self, members: &[(NodeId, String)]) -> anyhow::Result<()> {
        if self.raft.is_initialized().await? {
            tracing::info!("raft state found in the data dir; skipping bootstrap");
            return Ok(());
        }
        let nodes: BTreeMap<NodeId, BasicNode> =
            members.iter().map(|(id, address)| (*id, BasicNode::new(address.clone()))).collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => tracing::info!(members = members.len(), "bootstrapped cluster"),
            Err(RaftError::APIError(error)) => tracing::info!(%error, "bootstrap not needed"),
            Err(error) => return Err(error.into()),
        }
        Ok(())
    }

    /// A graceful stop: this node calls no more elections, and if it leads it hands
    /// leadership to its most caught-up voter, waiting up to `wait` for another leader.
    /// openraft 0.9 has no leadership transfer; this does its work. The leader stops
    /// its idle heartbeats, so the followers' leader leases run out, and asks the voter
    /// to call an election. Its vote request wins at once when this leader's own lease
    /// (from its election) is over, or else on the voter's next election timeout;
    /// this node, which calls none, cannot take leadership back.
    pub async fn hand_off_leadership(&self, wait: Duration) {
        self.raft.runtime_config().elect(false);
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.id) {
            return;
        }
        let membership = metrics.membership_config.membership().clone();
        let matched = |metrics: &openraft::RaftMetrics<NodeId, openraft::BasicNode>, id: NodeId| {
            metrics
                .replication
                .as_ref()
                .and_then(|replication| replication.get(&id).cloned().flatten())
                .map(|l| l.index)
        };
        let Some(target) = membership.voter_ids().filter(|id| *id != self.id).max_by_key(|id| matched(&metrics, *id))
        else {
            return;
        };
        let Some(address) = membership.get_node(&target).map(|node| node.addr.clone()) else { return };
        // Its log must be as long as the leader's, or the leader refuses its vote.
        let caught_up = self
            .raft
            .wait(Some(HAND_OFF_CATCH_UP))
            .metrics(|m| m.last_log_index.is_some() && matched(m, target) >= m.last_log_index, "successor caught up")
            .await;
        if caught_up.is_err() {
            tracing::warn!(target, "the successor has not caught up; asking it to call an election anyway");
        }
        self.raft.runtime_config().heartbeat(false);
        let request = ElectRequest { from: self.id };
        let peer = Peer { address: &address, id: Some(target) };
        let answer: Result<Result<(), String>, PeerError> =
            self.peers.call(peer, PATH_ELECT, &request, FORWARD_TIMEOUT.min(wait)).await;
        match answer {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return tracing::warn!(target, reason, "leadership hand-off refused"),
            Err(error) => return tracing::warn!(target, %error, "leadership hand-off failed"),
        }
        let moved = self
            .raft
            .wait(Some(wait))
            .metrics(|m| m.current_leader.is_some_and(|leader| leader != self.id), "leadership handed off")
            .await;
        match moved {
            Ok(m) => tracing::info!(leader = ?m.current_leader, term = m.current_term, "leadership handed off"),
            Err(_) => tracing::warn!(target, "leadership was not handed off; the cluster elects once this node stops"),
        }
    }

    /// Asks the cluster, through any of `seeds`, to add this node; retries until it is
    /// a voter or `stop` turns true.
    pub async fn join(&self, seeds: Vec<String>, advertise: String, mut stop: watch::Receiver<bool>) {
        let request = LeaderRequest::AddMember { node_id: self.id, address: advertise };
        loop {
            for seed in &seeds {
                let seed_peer = Peer { address: seed, id: None };
                let answer: Result<Result<u64, ApiError>, PeerError> =
                    self.peers.call(seed_peer, PATH_JOIN, &request, FORWARD_TIMEOUT).await;
                match answer {
                    Ok(Ok(_)) => {
                        tracing::info!(%seed, "joined the cluster");
                        return;
                    }
                    Ok(Err(error)) => tracing::warn!(%seed, ?error, "join refused; retrying"),
                    Err(error) => tracing::warn!(%seed, %error, "join failed; retrying"),
                }
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep(JOIN_RETRY_PAUSE) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Applies a write through the leader; returns the outcome and its log index.
    pub async fn write(&self, op: Op) -> Result<(Outcome, u64), ApiError> {
        // The id a create will store, to recognise it if a retry meets the first attempt.
        let created = match &op {
            // Only ids this node generated: a client-given id may be someone else's.
            Op::Create { kind, id, body, .. } if body.0.get("id").is_none() => Some((*kind, id.to_string())),
            _ => None,
        };
        if tollgate_raft_store::planted::planted(tollgate_raft_store::planted::Bug::AckBeforeCommit) {
            // The planted bug: answer as if committed, and let the write take its chances.
            let answer = match &op {
                Op::Upsert { body, .. } | Op::Create { body, .. } => Some(Outcome::Updated(body.clone())),
                Op::Delete { .. } => Some(Outcome::Deleted),
                _ => None,
            };
            if let Some(answer) = answer {
                let this = self.clone();
                let command = Command { now_s: self.clock.now_s(), write_id: Some(new_write_id()), op };
                tokio::spawn(async move { this.on_leader(LeaderRequest::Write(command)).await.map(|_| ()) });
                return Ok((answer, self.state().version()));
            }
        }
        let command = Command { now_s: self.clock.now_s(), write_id: Some(new_write_id()), op };
        let (reply, retried) = self.on_leader(LeaderRequest::Write(command)).await?;
        let LeaderReply::Write { result, log_index } = reply else {
            return Err(ApiError::new(ErrorCode::Internal, "leader answered a write with something else"));
        };
        // Answer once this node has applied the write too, so a read here sees it. The
        // write is committed either way: a slow local apply is logged, not an error.
        let applied = self.wait_applied(log_index).await;
        if let Err(error) = &applied {
            tracing::warn!(%error, log_index, "answering a committed write before applying it locally");
        }
        match (result, created) {
            // A create retried after an attempt of unknown fate may meet itself: its id is
            // fixed before the first attempt, so finding it means that attempt succeeded.
            (Err(error), Some((kind, id))) if retried && error.code == ErrorCode::PrimaryKeyViolation => {
                let state = applied?;
                let entity = state.state.find(kind, &id, None).map_err(|_| error)?;
                Ok((Outcome::Created(serde_json::Value::Object((*entity).clone()).into()), log_index))
            }
            (result, _) => Ok((result?, log_index)),
        }
    }

    /// Asks the ledger for tokens, through the leader; one answer per request. Unlike
    /// [`Cluster::write`] it does not wait for this node to apply the entry: the
    /// answer is the leader's.
    pub async fn grant(&self, requests: Vec<GrantRequest>) -> Result<Vec<Grant>, ApiError> {
        // No write id: a grant whose answer is lost is not resent (under, never over).
        let command = Command { now_s: self.clock.now_s(), write_id: None, op: Op::Grant { node: self.id, requests } };
        match self.on_leader(LeaderRequest::Write(command)).await?.0 {
            LeaderReply::Write { result: Ok(Outcome::Granted(grants)), .. } => Ok(grants),
            LeaderReply::Write { result: Err(error), .. } => Err(error),
            _ => Err(ApiError::new(ErrorCode::Internal, "leader answered a grant with something else")),
        }
    }

    /// Gives tokens back to the ledger (the node stops and will not use them).
    pub async fn release(&self, releases: Vec<(QuotaKey, u64)>) -> Result<(), ApiError> {
        // A write id: tokens released twice would be granted twice.
        let command = Command {
            now_s: self.clock.now_s(),
            write_id: Some(new_write_id()),
            op: Op::Release { node: self.id, releases },
        };
        self.on_leader(LeaderRequest::Write(command)).await.map(|_| ())
    }

    /// The node's clock, in seconds since the epoch.
    pub fn now_s(&self) -> i64 {
        self.clock.now_s()
    }

    /// Waits until this node has applied `log_index` (bounded by the write wait).
    pub async fn wait_applied(&self, log_index: u64) -> Result<Applied, ApiError> {
        let mut applied = self.applied.clone();
        let waited = tokio::time::timeout(self.write_leader_wait, applied.wait_for(|a| a.version() >= log_index)).await;
        match waited {
            Ok(Ok(state)) => Ok(state.clone()),
            Ok(Err(_)) => Err(unavailable("node is shutting down")),
            Err(_) => Err(unavailable(format!("this node has not applied index {log_index} yet"))),
        }
    }

    /// Linearizable read barrier (ReadIndex through the leader): returns once this node
    /// has applied everything committed before the call.
    pub async fn read_barrier(&self) -> Result<Applied, ApiError> {
        let (reply, _) = self.on_leader(LeaderRequest::ReadIndex).await?;
        let LeaderReply::ReadIndex { log_index } = reply else {
            return Err(ApiError::new(ErrorCode::Internal, "leader answered a read index with something else"));
        };
        self.wait_applied(log_index).await
    }

    /// [`Cluster::read_barrier`] for what Raft's metrics report (the membership): they
    /// are refreshed by Raft's core after the state machine applied, so this also waits
    /// for them to reach the read index.
    pub async fn metrics_barrier(&self) -> Result<(), ApiError> {
        let index = self.read_barrier().await?.version();
        let reached = self
            .raft
            .wait(Some(self.write_leader_wait))
            .metrics(|m| m.last_applied.is_some_and(|id| id.index >= index), "metrics at the read index")
            .await;
        reached.map(|_| ()).map_err(|_| unavailable(format!("this node's Raft metrics have not reached index {index}")))
    }

    pub async fn add_member(&self, node_id: NodeId, address: String) -> Result<u64, ApiError> {
        match self.on_leader(LeaderRequest::AddMember { node_id, address }).await?.0 {
            LeaderReply::Membership { log_index } => Ok(log_index),
            _ => Err(ApiError::new(ErrorCode::Internal, "unexpected leader reply")),
        }
    }

    pub async fn remove_member(&self, node_id: NodeId) -> Result<u64, ApiError> {
        match self.attempt_on_leader(LeaderRequest::RemoveMember { node_id }).await {
            Ok((LeaderReply::Membership { log_index }, _)) => Ok(log_index),
            Ok(_) => Err(ApiError::new(ErrorCode::Internal, "unexpected leader reply")),
            // Sent again after a leader change: the first attempt removed it.
            Err((error, true)) if error.code == ErrorCode::NotFound => Ok(self.state().version()),
            Err((error, _)) => Err(error),
        }
    }

    /// Runs `request` on the leader, here or remotely. Returns the reply and whether an
    /// earlier attempt may have reached a leader.
    async fn on_leader(&self, request: LeaderRequest) -> Result<(LeaderReply, bool), ApiError> {
        self.attempt_on_leader(request).await.map_err(|(error, _)| error)
    }

    /// [`Cluster::on_leader`], with whether an earlier attempt may have reached a
    /// leader beside an error too.
    async fn attempt_on_leader(&self, request: LeaderRequest) -> Result<(LeaderReply, bool), (ApiError, bool)> {
        let deadline = Instant::now() + self.write_leader_wait;
        let mut metrics = self.raft.metrics();
        let mut retried = false;
        loop {
            let (leader, term) = {
                let seen = metrics.borrow_and_update();
                (seen.current_leader, seen.current_term)
            };
            let attempt = match leader {
                Some(leader) if leader == self.id => self.execute(request.clone()).await,
                Some(leader) => self.forward(leader, term, &request, deadline).await,
                None => Err(LeaderError::NotLeader),
            };
            match attempt {
                Ok(reply) => return Ok((reply, retried)),
                Err(LeaderError::Failed(error)) => return Err((error, retried)),
                Err(LeaderError::NotLeader) => {}
            }
            retried |= leader.is_some();
            if Instant::now() >= deadline {
                let error = unavailable(format!(
                    "no leader reachable within {} ms; the cluster may have lost its quorum",
                    self.write_leader_wait.as_millis()
                ));
                return Err((error, retried));
            }
            // Sent again when a leader or term is new, or after the pause: not on any
            // change of Raft's metrics, which a leader's report all the time, so an
            // isolated leader's failed read barriers were retried in a hot loop, each
            // dialling every peer (the simulator's seed 2, `simulation/tests/seeds.rs`).
            let changed = async {
                let _ = metrics.wait_for(|m| (m.current_leader, m.current_term) != (leader, term)).await;
            };
            let _ = tokio::time::timeout(LEADER_RETRY_PAUSE, changed).await;
        }
    }

    /// Sends `request` to `leader`, which this node saw lead in `term`. Gives up on it
    /// when this node learns of a newer leader first: `NotLeader` (send it again) for
    /// requests that may be sent twice, a failure for those that may not.
    async fn forward(
        &self,
        leader: NodeId,
        term: u64,
        request: &LeaderRequest,
        deadline: Instant,
    ) -> Result<LeaderReply, LeaderError> {
        let address = {
            let metrics = self.raft.metrics();
            let borrowed = metrics.borrow();
            borrowed.membership_config.membership().get_node(&leader).map(|node| node.addr.clone())
        };
        let Some(address) = address else { return Err(LeaderError::NotLeader) };
        let timeout = FORWARD_TIMEOUT.min(deadline.saturating_duration_since(Instant::now())).max(LEADER_RETRY_PAUSE);
        let forwarded = Forwarded { from: self.id, term, request: request.clone() };
        let peer = Peer { address: &address, id: Some(leader) };
        let call = self.peers.call::<_, Result<LeaderReply, LeaderError>>(peer, PATH_LEADER, &forwarded, timeout);
        let mut metrics = self.raft.metrics();
        let superseded = async {
            let newer = metrics.wait_for(|m| m.current_term > term && m.current_leader.is_some_and(|id| id != leader));
            newer.await.is_ok()
        };
        let answer = tokio::select! {
            biased;
            answer = call => answer,
            true = superseded => {
                tracing::info!(leader, term, "a newer leader was elected while a request was with the old one");
                return if request.may_resend() {
                    Err(LeaderError::NotLeader)
                } else {
                    Err(LeaderError::Failed(unavailable(format!(
                        "leader {leader} was replaced while it held the request; it is not resent"
                    ))))
                };
            }
        };
        match answer {
            Ok(reply) => reply,
            Err(error) if error.is_not_delivered() => {
                tracing::debug!(%error, leader, "leader unreachable; retrying");
                Err(LeaderError::NotLeader)
            }
            Err(error @ PeerError::Lost { .. }) if request.may_resend() => {
                tracing::debug!(%error, leader, "connection to the leader lost; sending again");
                Err(LeaderError::NotLeader)
            }
            Err(error @ (PeerError::Timeout { .. } | PeerError::Lost { .. })) => {
                Err(LeaderError::Failed(unavailable(format!(
                    "the outcome is unknown: {error}; the request may or may not have been applied, read before retrying"
                ))))
            }
            Err(error) => Err(LeaderError::Failed(unavailable(format!("forwarding to the leader failed: {error}")))),
        }
    }

    /// Runs a forwarded request if this node still leads in the term its sender saw.
    async fn execute_forwarded(&self, forwarded: Forwarded) -> Result<LeaderReply, LeaderError> {
        let term = self.raft.metrics().borrow().current_term;
        if term != forwarded.term {
            return Err(LeaderError::NotLeader);
        }
        self.execute(forwarded.request).await
    }

    /// Runs a leader request on this node, which believes it leads.
    async fn execute(&self, request: LeaderRequest) -> Result<LeaderReply, LeaderError> {
        match request {
            LeaderRequest::Write(mut command) => {
                // Time in the state machine is the leader's.
                command.now_s = self.clock.now_s();
                // Refused writes cost no log entry: try the command on a copy of the
                // applied state first (O(1) to copy). Once this leader has applied an
                // entry of its own term, that state holds every acknowledged write, so
                // a refusal here is one the log would give too.
                let applied = self.leader_applied_state().await?;
                // A write sent again after a leader change, already applied: its
                // answer, with no new entry. (Applying a second copy would answer the
                // same; this only saves the entry.)
                if let Some(seen) = command.write_id.and_then(|id| applied.recent.get(&id).cloned()) {
                    return Ok(LeaderReply::Write { result: seen.result, log_index: seen.log_index });
                }
                // Quota grants always apply (the ledger answers 0 where it must).
                if command.op.changes_config() && applied.state.clone().apply(&command).is_err() {
                    // A leader cut off from the majority still believes it leads: before
                    // refusing, confirm leadership and catch up (ReadIndex), then retry.
                    let confirmed = self.confirmed_state().await?;
                    if let Err(error) = confirmed.state.clone().apply(&command) {
                        return Ok(LeaderReply::Write { result: Err(error), log_index: confirmed.version() });
                    }
                }
                match self.raft.client_write(command).await {
                    Ok(response) => {
                        Ok(LeaderReply::Write { result: response.data.result, log_index: response.log_id.index })
                    }
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(LeaderError::NotLeader),
                    Err(error) => Err(LeaderError::Failed(unavailable(error.to_string()))),
                }
            }
            LeaderRequest::ReadIndex => match self.raft.get_read_log_id().await {
                Ok((read_log_id, _)) => Ok(LeaderReply::ReadIndex { log_index: read_log_id.map_or(0, |id| id.index) }),
                Err(RaftError::APIError(_)) => Err(LeaderError::NotLeader),
                Err(error) => Err(LeaderError::Failed(unavailable(error.to_string()))),
            },
            LeaderRequest::AddMember { node_id, address } => {
                let is_voter = {
                    let metrics = self.raft.metrics();
                    let borrowed = metrics.borrow();
                    borrowed.membership_config.membership().voter_ids().any(|id| id == node_id)
                };
                if is_voter {
                    let log_index = self.raft.metrics().borrow().last_applied.map_or(0, |id| id.index);
                    return Ok(LeaderReply::Membership { log_index });
                }
                self.raft.add_learner(node_id, BasicNode::new(address), true).await.map_err(membership_error)?;
                let response = self
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), false)
                    .await
                    .map_err(membership_error)?;
                tracing::info!(node_id, "added voter");
                Ok(LeaderReply::Membership { log_index: response.log_id.index })
            }
            LeaderRequest::RemoveMember { node_id } => {
                let (known, is_voter) = {
                    let metrics = self.raft.metrics();
                    let borrowed = metrics.borrow();
                    let membership = borrowed.membership_config.membership();
                    (membership.get_node(&node_id).is_some(), membership.voter_ids().any(|id| id == node_id))
                };
                if !known {
                    return Err(LeaderError::Failed(ApiError::not_found()));
                }
                if tollgate_raft_store::planted::planted(tollgate_raft_store::planted::Bug::KeepRemoved) {
                    let log_index = self.raft.metrics().borrow().last_applied.map_or(0, |id| id.index);
                    return Ok(LeaderReply::Membership { log_index });
                }
                // A voter is demoted and dropped in one change; a learner is just dropped.
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
                };
                let response = self.raft.change_membership(change, false).await.map_err(membership_error)?;
                tracing::info!(node_id, "removed member");
                Ok(LeaderReply::Membership { log_index: response.log_id.index })
            }
        }
    }

    /// The applied state once it includes an entry of the current term (so every
    /// write any leader acknowledged), or `NotLeader` when this node stops leading.
    async fn leader_applied_state(&self) -> Result<Applied, LeaderError> {
        let mut metrics = self.raft.metrics();
        let caught_up = tokio::time::timeout(
            self.write_leader_wait,
            metrics.wait_for(|m| {
                m.state != ServerState::Leader || m.last_applied.is_some_and(|id| id.leader_id.term == m.current_term)
            }),
        )
        .await;
        match caught_up {
            Ok(Ok(m)) if m.state == ServerState::Leader => {}
            _ => return Err(LeaderError::NotLeader),
        }
        Ok(self.state())
    }

    /// The applied state after a ReadIndex round: this node leads and has applied
    /// everything committed before the call.
    async fn confirmed_state(&self) -> Result<Applied, LeaderError> {
        let read_log_id = match self.raft.get_read_log_id().await {
            Ok((read_log_id, _)) => read_log_id,
            Err(RaftError::APIError(_)) => return Err(LeaderError::NotLeader),
            Err(error) => return Err(LeaderError::Failed(unavailable(error.to_string()))),
        };
        self.wait_applied(read_log_id.map_or(0, |id| id.index)).await.map_err(LeaderError::Failed)
    }

    /// A short description of this node's Raft state for `/status`.
    pub fn role(&self) -> &'static str {
        match self.raft.metrics().borrow().state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        }
    }
}

fn membership_error(error: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> LeaderError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => LeaderError::NotLeader,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            LeaderError::Failed(ApiError::new(ErrorCode::BadRequest, error.to_string()))
        }
        other => LeaderError::Failed(unavailable(other.to_string())),
    }
}

/// Answers the cluster port: each frame is checked against who sent it before Raft or
/// the leader path sees it.
pub struct ClusterHandler {
    pub cluster: Cluster,
    /// Bytes received so far of snapshots being installed, by snapshot id.
    snapshots: std::sync::RwLock<Vec<(String, u64)>>,
}

impl ClusterHandler {
    pub fn new(cluster: Cluster) -> ClusterHandler {
        ClusterHandler { cluster, snapshots: std::sync::RwLock::default() }
    }

    /// Members of this node's Raft membership: (voters, every member); empty before
    /// it has one (a node that has not joined yet).
    fn members(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let metrics = self.cluster.raft.metrics();
        let borrowed = metrics.borrow();
        let membership = borrowed.membership_config.membership();
        (membership.voter_ids().collect(), membership.nodes().map(|(id, _)| *id).collect())
    }

    /// The sender speaks for `claimed` (its certificate names it).
    fn speaks_for(from: &PeerIdentity, claimed: Option<NodeId>) -> Result<NodeId, Refusal> {
        let Some(claimed) = claimed else { return Err(Refusal::Bad("the frame names no sender".into())) };
        if !from.is(claimed) {
            return Err(Refusal::Forbidden(format!("the frame claims node {claimed}; the certificate names another")));
        }
        Ok(claimed)
    }

    /// AppendEntries and InstallSnapshot: from a member; or, on an authenticated port
    /// (a certificate of the cluster's CA, or the cluster secret), from a node this
    /// one does not know yet, so a follower that missed the membership change adding
    /// today's leader can still catch up from it.
    fn check_leader(&self, from: &PeerIdentity, claimed: Option<NodeId>) -> Result<(), Refusal> {
        let leader = Self::speaks_for(from, claimed)?;
        let (_, members) = self.members();
        if members.is_empty() || members.contains(&leader) || self.cluster.authenticated {
            return Ok(());
        }
        Err(Refusal::Forbidden(format!("node {leader} is not a member")))
    }

    /// Vote requests: from a voter this node knows, always (a voter of a committed
    /// configuration is known to a majority of it).
    fn check_candidate(&self, from: &PeerIdentity, claimed: Option<NodeId>) -> Result<(), Refusal> {
        let candidate = Self::speaks_for(from, claimed)?;
        let (voters, _) = self.members();
        if voters.is_empty() || voters.contains(&candidate) {
            return Ok(());
        }
        Err(Refusal::Forbidden(format!("node {candidate} is not a voter")))
    }

    /// A snapshot chunk continues what was received of its snapshot (or starts it,
    /// or repeats a chunk), within [`SNAPSHOT_BYTES_MAX`]: openraft writes a chunk at
    /// its offset into memory, so a chunk far ahead would allocate the gap.
    fn check_snapshot_chunk(&self, id: &str, offset: u64, length: u64, done: bool) -> Result<(), Refusal> {
        let end = offset.saturating_add(length);
        if end > SNAPSHOT_BYTES_MAX {
            return Err(Refusal::Bad(format!("snapshot larger than {SNAPSHOT_BYTES_MAX} bytes")));
        }
        let Ok(mut receiving) = self.snapshots.write() else { return Err(Refusal::Bad("busy".into())) };
        let received = receiving.iter().find(|(known, _)| known == id).map_or(0, |(_, bytes)| *bytes);
        if offset > received {
            return Err(Refusal::Bad(format!("snapshot chunk at {offset} after {received} bytes received")));
        }
        receiving.retain(|(known, _)| known != id);
        if !done {
            if receiving.len() >= SNAPSHOTS_RECEIVING_MAX {
                receiving.remove(0);
            }
            receiving.push((id.to_string(), end.max(received)));
        }
        Ok(())
    }
}

fn frame<T: Serialize>(value: &T) -> Result<Vec<u8>, Refusal> {
    tollgate_raft_store::codec::encode(value).map_err(|e| Refusal::Bad(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Refusal> {
    tollgate_raft_store::codec::decode(body).map_err(|e| Refusal::Bad(e.to_string()))
}

impl FrameHandler for ClusterHandler {
    async fn handle(&self, path: String, body: Bytes, from: PeerIdentity) -> Result<Vec<u8>, Refusal> {
        let raft = &self.cluster.raft;
        match path.as_str() {
            PATH_APPEND => {
                let request: openraft::raft::AppendEntriesRequest<TypeConfig> = parse(&body)?;
                self.check_leader(&from, request.vote.leader_id().voted_for())?;
                frame(&raft.append_entries(request).await)
            }
            PATH_VOTE => {
                let request: openraft::raft::VoteRequest<NodeId> = parse(&body)?;
                self.check_candidate(&from, request.vote.leader_id().voted_for())?;
                frame(&raft.vote(request).await)
            }
            PATH_SNAPSHOT => {
                let request: openraft::raft::InstallSnapshotRequest<TypeConfig> = parse(&body)?;
                self.check_leader(&from, request.vote.leader_id().voted_for())?;
                let id = &request.meta.snapshot_id;
                self.check_snapshot_chunk(id, request.offset, request.data.len() as u64, request.done)?;
                frame(&raft.install_snapshot(request).await)
            }
            PATH_LEADER => {
                let forwarded: Forwarded = parse(&body)?;
                let sender = Self::speaks_for(&from, Some(forwarded.from))?;
                let (_, members) = self.members();
                if !members.contains(&sender) {
                    return Err(Refusal::Forbidden(format!("node {sender} is not a member")));
                }
                frame(&self.cluster.execute_forwarded(forwarded).await)
            }
            PATH_ELECT => {
                let request: ElectRequest = parse(&body)?;
                let sender = Self::speaks_for(&from, Some(request.from))?;
                let metrics = raft.metrics().borrow().clone();
                let answer = if metrics.current_leader != Some(sender) {
                    Err(format!("node {sender} is not the leader this node follows"))
                } else if !metrics.membership_config.membership().voter_ids().any(|id| id == self.cluster.id) {
                    Err("this node is not a voter".to_string())
                } else {
                    tracing::info!(leader = sender, "the stopping leader hands leadership here: calling an election");
                    raft.trigger().elect().await.map_err(|error| error.to_string())
                };
                frame(&answer)
            }
            PATH_JOIN => match parse::<LeaderRequest>(&body)? {
                LeaderRequest::AddMember { node_id, address } => {
                    // A node joins as itself: its certificate names the id it asks for.
                    Self::speaks_for(&from, Some(node_id))?;
                    frame(&self.cluster.add_member(node_id, address).await)
                }
                _ => Err(Refusal::Bad("join carries AddMember only".to_string())),
            },
            other => Err(Refusal::Bad(format!("unknown cluster path {other}"))),
        }
    }
}
