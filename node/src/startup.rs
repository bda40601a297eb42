//! Starting a node: storage, Raft, the cluster port, the Admin API, the proxy and
//! the publish task, spawned together; [`NodeHandle`] stops them together. Apart from
//! [`crate::node`], which holds what the running node is (and what the Admin API
//! reads), so that the Admin API depends on the node and not the other way round.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::storage::RaftLogStorage;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tollgate_raft_store::Raft;

use crate::clock::{Clock, SystemClock};
use crate::cluster::network::NetworkFactory;
use crate::cluster::tls::ClusterTls;
use crate::cluster::transport::{self, ClusterAuth, PeerClient};
use crate::cluster::{self, Cluster, ClusterHandler};
use crate::config::NodeConfig;
use crate::node::Node;
use crate::publish::{self, CompiledConfig, Published};

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
