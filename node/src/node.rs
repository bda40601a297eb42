//! One Tollgate node: storage, Raft, the cluster port, the Admin API and the publish
//! task, started together and stopped together.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::storage::RaftLogStorage;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tollgate_raft_store::state::counts;
use tollgate_raft_store::Raft;

use crate::clock::{Clock, SystemClock};
use crate::cluster::network::NetworkFactory;
use crate::cluster::tls::ClusterTls;
use crate::cluster::transport::{self, ClusterAuth, PeerClient};
use crate::cluster::{self, Cluster, ClusterHandler};
use crate::config::NodeConfig;
use crate::publish::{self, CompiledConfig, Published};

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
    committed_index: Arc<AtomicU64>,
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

/// A running node; dropping it does not stop it, [`NodeHandle::shutdown`] does.
pub struct NodeHandle {
    pub node: Arc<Node>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cluster_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    proxy_threads: Vec<std::thread::JoinHandle<()>>,
}

impl NodeHandle {
    /// The graceful stop (SIGTERM): this node answers not ready, its proxy stops
    /// accepting and closes idle connections, requests in progress are answered for
    /// up to `drain` (then cut), a leader hands leadership to its most caught-up voter,
    /// and then [`NodeHandle::shutdown`] gives quota leases back and stops the rest.
    pub async fn stop(self, drain: Duration) {
        let started = tokio::time::Instant::now();
        self.node.drain.start();
        tracing::info!(drain_ms = drain.as_millis() as u64, "stopping: not ready, draining proxy connections");
        // Followers first wait out their leader lease (an election timeout), then elect.
        self.node.cluster.hand_off_leadership(Duration::from_millis(5 * self.node.config.raft_election_max_ms)).await;
        let deadline = started + drain;
        // Worker threads end once their connections have (`proxy::serve`); the
        // simulator's proxy task is checked through the node's in-flight count.
        while tokio::time::Instant::now() < deadline {
            let threads_done = self.proxy_threads.iter().all(|thread| thread.is_finished());
            let in_flight = self.node.load.in_flight.load(std::sync::atomic::Ordering::Relaxed);
            if threads_done && in_flight == 0 {
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let cut = self.proxy_threads.iter().filter(|thread| !thread.is_finished()).count();
        if cut > 0 {
            tracing::warn!(workers = cut, "drain bound reached: connections still open are cut");
        } else {
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "proxy drained");
        }
        self.shutdown().await;
    }

    /// Stops serving, then stops Raft.
    pub async fn shutdown(mut self) {
        self.node.drain.start();
        let _ = self.shutdown.send(true);
        // Tokens leased and unused go back to the ledger, so a clean restart loses none
        // (a crash loses them: under the limit, never over).
        let unused = self.node.plugin_state.quota.release_all();
        if !unused.is_empty() {
            let keys = unused.len();
            match tokio::time::timeout(RELEASE_TIMEOUT, self.node.cluster.release(unused)).await {
                Ok(Ok(())) => tracing::info!(keys, "gave unused rate-limit tokens back"),
                _ => tracing::warn!(
                    keys,
                    "could not give unused rate-limit tokens back; they are lost for their windows"
                ),
            }
        }
        self.node.gossip.shutdown().await;
        if let Err(error) = self.node.cluster.raft.shutdown().await {
            tracing::warn!(%error, "raft shutdown failed");
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let threads = std::mem::take(&mut self.proxy_threads);
        let _ = crate::env::blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// How long a starting node waits for Raft's first report of the state it restored.
const RAFT_REPORT_WAIT: Duration = Duration::from_secs(10);

/// How long a stopping node tries to give its unused rate-limit tokens back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a starting node retries looking its own `--advertise` name up.
const ADVERTISE_RESOLVE_WAIT: Duration = Duration::from_secs(60);
const ADVERTISE_RESOLVE_PAUSE: Duration = Duration::from_millis(500);

/// How often a draining node looks whether its proxy connections have closed.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// How often queued histogram samples are folded into their buckets.
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Starts a node from its configuration and data directory.
pub async fn start(
    config: NodeConfig,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<NodeHandle> {
    config.validate()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let (mut log_store, state_machine) = tollgate_raft_store::store::open(&config.data_dir)
        .await
        .with_context(|| format!("opening storage in {}", config.data_dir.display()))?;
    // The term this node durably voted in, to wait for Raft to report it (below).
    let durable_term = log_store.read_vote().await?.map_or(0, |vote| vote.leader_id().get_term());
    let committed_index = log_store.committed_index();
    let applied = state_machine.subscribe();
    let ledger = state_machine.ledger();

    let cluster_listener = crate::env::bind(config.cluster_listen)
        .await
        .with_context(|| format!("binding cluster_listen {}", config.cluster_listen))?;
    let admin_listener = crate::env::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin_listen {}", config.admin_listen))?;
    let proxy_listener = crate::proxy::Workers::bind(config.proxy_listen, config.proxy_backlog)
        .await
        .with_context(|| format!("binding proxy_listen {}", config.proxy_listen))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let proxy_tls_listener = match config.proxy_tls_listen {
        Some(address) => Some(
            crate::proxy::Workers::bind(address, config.proxy_backlog)
                .await
                .with_context(|| format!("binding proxy_tls_listen {address}"))?,
        ),
        None => None,
    };
    let cluster_addr = cluster_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    // How the cluster port knows its peers (see `cluster::transport`).
    let auth = match (&config.cluster_tls, &config.cluster_secret) {
        (Some(files), _) => ClusterAuth::Tls(ClusterTls::load(config.node_id, files.clone())?),
        (None, Some(secret)) => {
            tracing::info!("cluster port without TLS (loopback): requests authenticated by the cluster secret");
            ClusterAuth::secret(secret, &config.cluster_id)
        }
        (None, None) => {
            tracing::warn!(
                cluster_listen = %config.cluster_listen,
                "the cluster port has neither TLS nor a secret: any local process can act as a cluster member; pass --cluster-ca, --cluster-cert and --cluster-key (or at least --cluster-secret)"
            );
            ClusterAuth::None
        }
    };
    let peers = PeerClient::new(auth.clone());
    let restarting = durable_term > 0;
    let raft_config = cluster::raft_config(&config, restarting)?;
    let raft =
        Raft::new(config.node_id, raft_config, NetworkFactory { client: peers.clone() }, log_store, state_machine)
            .await
            .context("starting raft")?;
    let cluster = Cluster::new(
        config.node_id,
        raft,
        applied.clone(),
        peers,
        clock,
        Duration::from_millis(config.write_leader_wait_ms),
    );
    // Raft's port answers from the moment Raft runs. A restarted follower that compiled
    // its restored config first heard no heartbeat for as long as that took, called an
    // election its current log could win, and then led while nothing answered here.
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    if let ClusterAuth::Tls(tls) = &auth {
        tasks.spawn(tls.clone().watch(shutdown_rx.clone()));
    }
    if restarting {
        tasks.spawn(cluster::hold_elections_after_restart(cluster.raft.clone(), config.raft_election_max_ms));
    }
    tasks.spawn(transport::serve(
        cluster_listener,
        auth,
        Arc::new(ClusterHandler::new(cluster.clone())),
        shutdown_rx.clone(),
    ));
    // Nothing answers before this node can answer with what it holds (CFG3 as clients
    // see it): `Raft::new` has re-applied the committed log, so the first publication
    // is compiled from it before any proxy worker accepts, and `/status` waits for
    // Raft's first report of the restored term and index rather than its zeroed
    // initial metrics.
    let restored = applied.borrow().clone();
    let first = crate::env::blocking(move || CompiledConfig::compile(&restored)).await?;
    let restored_index = first.version;
    let published = Arc::new(Published::new(first));
    let reported = cluster
        .raft
        .wait(Some(RAFT_REPORT_WAIT))
        .metrics(
            |m| m.current_term >= durable_term && m.last_applied.map_or(0, |id| id.index) >= restored_index,
            "raft reports the restored state",
        )
        .await;
    if let Err(error) = reported {
        tracing::warn!(%error, durable_term, restored_index, "raft has not reported its restored state yet");
    }

    // Gossip on the cluster port's UDP side, seeded with the other members' addresses.
    // A new pod's own name may reach DNS a little after the pod starts.
    let mut advertise = crate::env::resolve(&config.advertise).await;
    let deadline = tokio::time::Instant::now() + ADVERTISE_RESOLVE_WAIT;
    while advertise.is_err() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(ADVERTISE_RESOLVE_PAUSE).await;
        advertise = crate::env::resolve(&config.advertise).await;
    }
    let advertise = advertise.with_context(|| format!("resolving advertise {}", config.advertise))?;
    let seeds: Vec<String> = config
        .initial_cluster
        .iter()
        .filter(|(id, _)| *id != config.node_id)
        .map(|(_, address)| address.clone())
        .chain(config.join.iter().cloned())
        .collect();
    let gossip = crate::gossip::Gossip::start(crate::gossip::GossipSetup {
        node_id: config.node_id,
        cluster_id: config.cluster_id.clone(),
        secret: config.cluster_secret.clone(),
        listen: cluster_addr,
        advertise,
        seeds,
        proxy_addr,
        admin_addr,
    })
    .await
    .context("starting gossip")?;

    let upkeep = prometheus.clone();
    let applied_version = published.clone();
    let node = Arc::new(Node {
        config: config.clone(),
        cluster: cluster.clone(),
        published: published.clone(),
        committed_index,
        prometheus,
        plugin_state: Arc::default(),
        ledger,
        gossip: gossip.clone(),
        health: Arc::default(),
        health_states: Arc::default(),
        load: Arc::default(),
        drain: Arc::default(),
    });

    tasks.spawn(publish::run(applied, published.clone()));
    if let Some(handle) = upkeep {
        // Histogram samples queue in the recorder until drained: without a scrape they
        // would grow with every request. Upkeep folds them into the buckets.
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            loop {
                ticks.tick().await;
                handle.run_upkeep();
            }
        });
    }
    let access_log = if config.access_log { Some(crate::proxy::telemetry::AccessLog::start()?) } else { None };
    let setup = crate::proxy::ProxySetup {
        published: published.clone(),
        access_log,
        trusted_ips: config.trusted_ips.clone(),
        timeouts: crate::conn::Timeouts {
            header: Duration::from_millis(config.proxy_header_timeout_ms),
            keepalive: Duration::from_millis(config.proxy_keepalive_timeout_ms),
            send: Duration::from_millis(config.proxy_send_timeout_ms),
        },
        plugin_state: node.plugin_state.clone(),
        health: node.health.clone(),
        load: node.load.clone(),
        direct: config.proxy_direct,
        drain: node.drain.clone(),
    };
    let mut proxy_threads =
        proxy_listener.spawn(config.workers, None, setup.clone(), shutdown_rx.clone(), &mut tasks)?;
    if let Some(tls_listener) = proxy_tls_listener {
        let tls = crate::proxy::server_config(published).context("tls configuration")?;
        proxy_threads.extend(tls_listener.spawn(config.workers, Some(tls), setup, shutdown_rx.clone(), &mut tasks)?);
    }
    let admin_tls = match &config.admin_tls {
        Some((cert, key)) => Some(crate::admin::tls_source(cert, key)?),
        None => None,
    };
    tasks.spawn(crate::admin::serve(admin_listener, node.clone(), admin_tls, shutdown_rx.clone()));
    tasks.spawn(cluster::grants::run(cluster.clone(), node.plugin_state.quota.clone(), shutdown_rx.clone()));
    let (load, raft) = (node.load.clone(), cluster.raft.clone());
    let read_self = move || crate::gossip::SelfState {
        config_version: applied_version.load().version,
        in_flight: load.in_flight.load(std::sync::atomic::Ordering::Relaxed),
        requests_total: load.requests.load(std::sync::atomic::Ordering::Relaxed),
        members: raft.metrics().borrow().membership_config.membership().nodes().map(|(_, n)| n.addr.clone()).collect(),
    };
    tasks.spawn(gossip.clone().publish_loop(read_self, shutdown_rx.clone()));
    let membership = cluster.raft.clone();
    let checker = crate::health::Checker {
        node_id: config.node_id,
        members: Box::new(move || membership.metrics().borrow().membership_config.membership().voter_ids().collect()),
        published: node.published.clone(),
        gossip: gossip.clone(),
        view: node.health.clone(),
        states: node.health_states.clone(),
    };
    tasks.spawn(checker.run(shutdown_rx.clone()));

    if !config.initial_cluster.is_empty() {
        cluster.bootstrap(&config.initial_cluster).await?;
    }
    if !config.join.is_empty() {
        let joining = cluster.clone();
        let seeds = config.join.clone();
        let advertise = config.advertise.clone();
        let stop = shutdown_rx.clone();
        tasks.spawn(async move { joining.join(seeds, advertise, stop).await });
    }
    tracing::info!(node_id = config.node_id, %proxy_addr, %admin_addr, %cluster_addr, "node started");
    Ok(NodeHandle { node, proxy_addr, admin_addr, cluster_addr, shutdown, tasks, proxy_threads })
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
