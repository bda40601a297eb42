//! One Tollgate node as it runs: storage, Raft, the cluster port, the Admin API and the publish
//! task; [`crate::startup`] starts them together and stops them together.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_raft_store::state::counts;

use crate::cluster::Cluster;
use crate::config::NodeConfig;
use crate::publish::Published;

/// Most committed entries a node may have left to apply and still answer ready
/// (`GET /status/ready`): a few batches of a busy cluster, not a node catching up.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

/// `configuration_hash` of a config not loaded from a declarative text (Kong's
/// `DECLARATIVE_EMPTY_CONFIG_HASH`).
pub const EMPTY_CONFIG_HASH: &str = "00000000000000000000000000000000";

pub struct Node {
    pub config: NodeConfig,
    pub cluster: Cluster,
    pub published: Arc<Published>,
    pub(crate) committed_index: Arc<AtomicU64>,
    /// Installed by `tollgate run` (one node per process); absent in `tollgate dev`,
    /// whose three nodes share a process.
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Plugin state kept across config changes (counters, caches), shared with the
    /// proxy workers and read by the Admin API (`/proxy-cache`).
    pub plugin_state: Arc<crate::plugins::NodeState>,
    /// The cluster rate-limit ledger as applied here (`/rate-limits`).
    pub ledger: Arc<tokio::sync::RwLock<tollgate_raft_store::quota::QuotaLedger>>,
    /// Soft cluster state over gossip (`/cluster`).
    pub gossip: Arc<crate::gossip::Gossip>,
    /// Targets down cluster-wide, for the balancers; kept by the health checker.
    pub health: Arc<crate::proxy::balancer::HealthView>,
    /// What the health checker knows per target (`/upstreams/{u}/health`).
    pub health_states: Arc<crate::health::HealthStates>,
    /// The proxy's load, published by gossip.
    pub load: Arc<crate::proxy::Load>,
    /// The graceful stop: once begun, not ready, and the proxy drains.
    pub drain: Arc<crate::serve::Drain>,
}

impl Node {
    /// `GET /`: Kong's fields that tools read (decK reads `version` and, to choose
    /// between the entity API and `/config`, `configuration.database`: Tollgate has
    /// both, so it is not `off`). Secrets are shown as Kong shows them, `******`.
    pub fn info(&self) -> Value {
        let config = &self.config;
        let secret = |value: &Option<String>| value.as_ref().map(|_| "******");
        let plugins: Vec<&str> = tollgate_raft_store::plugins::PLUGINS.iter().map(|spec| spec.name).collect();
        let available: serde_json::Map<String, Value> = plugins
            .iter()
            .map(|name| (name.to_string(), json!({ "version": env!("CARGO_PKG_VERSION"), "priority": 0 })))
            .collect();
        let enabled: std::collections::BTreeSet<String> = self
            .cluster
            .state()
            .state
            .table(tollgate_raft_store::EntityKind::Plugin)
            .values()
            .filter_map(|plugin| plugin.get("name").and_then(Value::as_str).map(str::to_string))
            .collect();
        json!({
            "tagline": "Welcome to Tollgate",
            "version": env!("CARGO_PKG_VERSION"),
            "edition": "community",
            "node_id": config.node_id,
            "hostname": crate::config::hostname().unwrap_or_default(),
            "plugins": { "available_on_server": available, "enabled_in_cluster": enabled },
            "configuration": {
                "database": "raft",
                "node_id": config.node_id,
                "proxy_listen": [config.proxy_listen.to_string()],
                "proxy_tls_listen": config.proxy_tls_listen.map(|a| a.to_string()),
                "admin_listen": [config.admin_listen.to_string()],
                "cluster_listen": config.cluster_listen.to_string(),
                "advertise": config.advertise,
                "workers": config.workers,
                "admin_token": secret(&config.admin_token),
                "cluster_secret": secret(&config.cluster_secret),
                "cluster_id": config.cluster_id,
                "loaded_plugins": plugins,
            },
        })
    }

    /// This node's view: `GET /status`.
    pub fn status(&self) -> Value {
        let metrics = self.cluster.raft.metrics().borrow().clone();
        let applied_index = metrics.last_applied.map_or(0, |id| id.index);
        let compiled = self.published.load();
        json!({
            "node_id": self.config.node_id,
            "role": self.cluster.role(),
            "leader_id": metrics.current_leader,
            "term": metrics.current_term,
            "commit_index": self.committed_index.load(Ordering::Relaxed).max(applied_index),
            "applied_index": applied_index,
            "last_log_index": metrics.last_log_index,
            "snapshot_index": metrics.snapshot.map(|id| id.index),
            "purged_index": metrics.purged.map(|id| id.index),
            "config_version": self.cluster.state().version(),
            "published_version": compiled.version,
            "publications": self.published.publications(),
            "entities": counts(&compiled.state),
            // Kong's fields (spec/02-integration/04-admin_api/02-kong_routes_spec.lua:197):
            // the proxy's connections, and whether the store answers (here: a leader
            // is known).
            "server": self.server_status(),
            "database": { "reachable": metrics.current_leader.is_some() },
            // Kong's hash of the declarative text the config was loaded from; 32 zeros
            // when it was not loaded from one, or an entity write changed it since.
            "configuration_hash": self.cluster.state().state.config_hash().unwrap_or(EMPTY_CONFIG_HASH),
        })
    }

    /// Kong's `server` block of `/status`, from the proxy's counters: `reading` is 0
    /// (a connection reading a request head is not counted apart), `writing` the
    /// requests being answered, `waiting` the open connections without one.
    fn server_status(&self) -> Value {
        let load = &self.load;
        let accepted = load.connections_accepted.load(Ordering::Relaxed);
        let active = load.connections_active.load(Ordering::Relaxed);
        let writing = load.in_flight.load(Ordering::Relaxed);
        json!({
            "connections_accepted": accepted,
            "connections_handled": accepted,
            "connections_active": active,
            "connections_reading": 0,
            "connections_writing": writing,
            "connections_waiting": active.saturating_sub(writing),
            "total_requests": load.requests.load(Ordering::Relaxed),
        })
    }

    /// `GET /status/ready`: whether this node should be sent traffic. It must know a
    /// leader (a node cut off from the quorum, or in an election, does not), and have
    /// applied the committed config to within [`READY_APPLY_LAG_MAX`] entries (a node
    /// catching up after a partition or a restart is not ready until it has). The
    /// Admin API itself answers only once the restored config is compiled. `Err` says
    /// why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.drain.started() {
            return Err("stopping: this node is draining its connections".to_string());
        }
        let metrics = self.cluster.raft.metrics().borrow().clone();
        if metrics.current_leader.is_none() {
            return Err("no leader: the cluster is electing one, or this node is cut off from it".to_string());
        }
        // openraft 0.9 keeps a leader that lost its quorum leading: it is ready only
        // while a quorum acknowledged it within an election timeout.
        let lost_quorum = metrics.current_leader == Some(self.config.node_id)
            && metrics.millis_since_quorum_ack.is_none_or(|ms| ms > self.config.raft_election_max_ms);
        if lost_quorum {
            return Err("leading without a quorum: no majority acknowledged this leader lately".to_string());
        }
        let applied = metrics.last_applied.map_or(0, |id| id.index);
        let committed = self.committed_index.load(Ordering::Relaxed).max(applied);
        if committed - applied > READY_APPLY_LAG_MAX {
            return Err(format!("catching up: applied {applied} of {committed} committed entries"));
        }
        Ok(())
    }

    /// Raft membership as this node sees it: `GET /cluster`.
    pub fn cluster_view(&self) -> Value {
        let metrics = self.cluster.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let members: Vec<Value> = membership
            .nodes()
            .map(|(id, node)| {
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(id).cloned().flatten())
                    .map(|log_id| log_id.index);
                json!({
                    "node_id": id,
                    "address": node.addr,
                    "voter": voters.contains(id),
                    "role": if voters.contains(id) { "voter" } else { "learner" },
                    "leader": metrics.current_leader == Some(*id),
                    // Known on the leader only: how far this member's log matches.
                    "matched_index": matched,
                })
            })
            .collect();
        json!({
            "node_id": self.config.node_id,
            "leader_id": metrics.current_leader,
            "term": metrics.current_term,
            "members": members,
        })
    }

    /// `/cluster`: Raft membership, and beside it gossip's view (who is live, and the
    /// config version each node reports it applied and serves).
    pub async fn cluster_view_with_gossip(&self) -> Value {
        let mut view = self.cluster_view();
        view["gossip"] = self.gossip.view().await;
        view
    }

    /// Prometheus text: Raft gauges of this node, then whatever the process recorder holds.
    pub fn metrics_text(&self) -> String {
        let metrics = self.cluster.raft.metrics().borrow().clone();
        let applied = metrics.last_applied.map_or(0, |id| id.index);
        let committed = self.committed_index.load(Ordering::Relaxed).max(applied);
        let is_leader = u8::from(metrics.current_leader == Some(self.config.node_id));
        let node = self.config.node_id;
        let mut text = String::new();
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node_id=\"{node}\"}} {value}");
        };
        gauge("tollgate_raft_term", "Current Raft term.", metrics.current_term);
        gauge("tollgate_raft_leader_id", "Leader this node knows (0 when none).", metrics.current_leader.unwrap_or(0));
        gauge("tollgate_raft_is_leader", "1 when this node leads.", u64::from(is_leader));
        gauge("tollgate_raft_commit_index", "Last committed log index known here.", committed);
        gauge("tollgate_raft_applied_index", "Last applied log index.", applied);
        gauge("tollgate_raft_apply_lag", "Committed entries not yet applied.", committed.saturating_sub(applied));
        gauge("tollgate_raft_last_log_index", "Last log index stored here.", metrics.last_log_index.unwrap_or(0));
        gauge(
            "tollgate_config_published_version",
            "Version of the compiled config the data path reads.",
            self.published.load().version,
        );
        gauge("tollgate_config_publications", "Compiled configs published since start.", self.published.publications());
        if let Some(handle) = &self.prometheus {
            text.push_str(&handle.render());
        }
        text
    }
}
