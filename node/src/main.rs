//! `tollgate`: `run` a node, start the `dev` cluster, or serve the `echo` upstream.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tollgate_node::config::{self, FileConfig, NodeConfig};
use tollgate_node::dev::{self, DevOptions};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "A distributed API gateway whose cluster is its own database")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a node.
    Run(Box<RunArgs>),
    /// Start a three-node cluster on loopback with a demo upstream and a sample config.
    Dev {
        #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "./tollgate-data/dev")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:9000")]
        echo_listen: SocketAddr,
    },
    /// Serve the demo upstream: answers every request with what it received, as JSON.
    Echo {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
    /// Certificates for the cluster port's mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a CA (or reuse the one in --out) and a certificate for each node:
    /// ca.pem, ca-key.pem, node-<id>.pem, node-<id>-key.pem.
    Init {
        /// Directory to write into (created if missing; existing files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Node ids, comma-separated: 1,2,3.
        #[arg(long)]
        nodes: String,
        /// Host names or addresses to add to every node certificate, comma-separated.
        #[arg(long, default_value = "")]
        hosts: String,
    },
}

/// Every flag also reads `TOLLGATE_<FLAG>`; `--config FILE` (TOML) holds the same keys
/// with `_` for `-`. Flags win over variables, variables over the file.
#[derive(Args)]
struct RunArgs {
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "TOLLGATE_NODE_ID")]
    node_id: Option<u64>,
    #[arg(long, env = "TOLLGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "TOLLGATE_PROXY_LISTEN")]
    proxy_listen: Option<SocketAddr>,
    #[arg(long, env = "TOLLGATE_PROXY_TLS_LISTEN")]
    proxy_tls_listen: Option<SocketAddr>,
    #[arg(long, env = "TOLLGATE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    #[arg(long, env = "TOLLGATE_CLUSTER_LISTEN")]
    cluster_listen: Option<SocketAddr>,
    #[arg(long, env = "TOLLGATE_ADVERTISE")]
    advertise: Option<String>,
    #[arg(long, env = "TOLLGATE_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    #[arg(long, env = "TOLLGATE_JOIN")]
    join: Option<String>,
    #[arg(long, env = "TOLLGATE_WORKERS")]
    workers: Option<usize>,
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Gossip's cluster id: nodes gossip only with nodes of the same id.
    #[arg(long, env = "TOLLGATE_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Authenticates gossip datagrams (HMAC-SHA256); every node needs the same one.
    #[arg(long, env = "TOLLGATE_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    #[arg(long, env = "TOLLGATE_RAFT_HEARTBEAT_MS")]
    raft_heartbeat_ms: Option<u64>,
    #[arg(long, env = "TOLLGATE_RAFT_ELECTION_MIN_MS")]
    raft_election_min_ms: Option<u64>,
    #[arg(long, env = "TOLLGATE_RAFT_ELECTION_MAX_MS")]
    raft_election_max_ms: Option<u64>,
    #[arg(long, env = "TOLLGATE_SNAPSHOT_LOGS")]
    snapshot_logs: Option<u64>,
    #[arg(long, env = "TOLLGATE_SNAPSHOT_KEEP_LOGS")]
    snapshot_keep_logs: Option<u64>,
    #[arg(long, env = "TOLLGATE_ADMIN_BODY_BYTES_MAX")]
    admin_body_bytes_max: Option<usize>,
    #[arg(long, env = "TOLLGATE_WRITE_LEADER_WAIT_MS")]
    write_leader_wait_ms: Option<u64>,
    /// A JSON line per proxied request on stdout (`--access-log false` to switch off).
    #[arg(long, env = "TOLLGATE_ACCESS_LOG")]
    access_log: Option<bool>,
    /// CIDRs whose X-Forwarded-* headers are believed (Kong's `trusted_ips`).
    #[arg(long, env = "TOLLGATE_TRUSTED_IPS")]
    trusted_ips: Option<String>,
    /// Time for a request's line and headers once its first byte arrived: 408 after it.
    #[arg(long, env = "TOLLGATE_PROXY_HEADER_TIMEOUT_MS")]
    proxy_header_timeout_ms: Option<u64>,
    /// Idle time between requests on a keep-alive connection before it is closed.
    #[arg(long, env = "TOLLGATE_PROXY_KEEPALIVE_TIMEOUT_MS")]
    proxy_keepalive_timeout_ms: Option<u64>,
    /// The direct HTTP/1.1 path (`on`, the default) or every request through hyper
    /// (`off`): for comparing the two, and a way around a direct-path fault.
    #[arg(long, env = "TOLLGATE_PROXY_DIRECT", value_parser = clap::builder::BoolishValueParser::new())]
    proxy_direct: Option<bool>,
    /// How long a write to a client may make no progress before the connection closes.
    #[arg(long, env = "TOLLGATE_PROXY_SEND_TIMEOUT_MS")]
    proxy_send_timeout_ms: Option<u64>,
    /// The cluster's CA certificate (PEM): peers must present a certificate it signed.
    #[arg(long, env = "TOLLGATE_CLUSTER_CA")]
    cluster_ca: Option<PathBuf>,
    /// This node's certificate (PEM), naming `node-<id>.tollgate`.
    #[arg(long, env = "TOLLGATE_CLUSTER_CERT")]
    cluster_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "TOLLGATE_CLUSTER_KEY")]
    cluster_key: Option<PathBuf>,
    /// The Admin API over HTTPS: certificate chain (PEM).
    #[arg(long, env = "TOLLGATE_ADMIN_TLS_CERT")]
    admin_tls_cert: Option<PathBuf>,
    /// The Admin API over HTTPS: private key (PEM).
    #[arg(long, env = "TOLLGATE_ADMIN_TLS_KEY")]
    admin_tls_key: Option<PathBuf>,
    /// Time for an Admin API request's line and headers once its first byte arrived.
    #[arg(long, env = "TOLLGATE_ADMIN_HEADER_TIMEOUT_MS")]
    admin_header_timeout_ms: Option<u64>,
    /// Idle time between Admin API requests on a keep-alive connection.
    #[arg(long, env = "TOLLGATE_ADMIN_KEEPALIVE_TIMEOUT_MS")]
    admin_keepalive_timeout_ms: Option<u64>,
}

impl RunArgs {
    fn resolve(self) -> anyhow::Result<NodeConfig> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let node_id = self.node_id.or(file.node_id).context("--node-id (TOLLGATE_NODE_ID) is required")?;
        let data_dir =
            self.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(format!("./tollgate-data/{node_id}")));
        let mut config = NodeConfig::new(node_id, data_dir);
        macro_rules! pick {
            ($field:ident) => {
                if let Some(value) = self.$field.or(file.$field) {
                    config.$field = value;
                }
            };
        }
        pick!(proxy_listen);
        pick!(admin_listen);
        pick!(cluster_listen);
        pick!(workers);
        pick!(raft_heartbeat_ms);
        pick!(raft_election_min_ms);
        pick!(raft_election_max_ms);
        pick!(snapshot_logs);
        pick!(snapshot_keep_logs);
        pick!(admin_body_bytes_max);
        pick!(write_leader_wait_ms);
        pick!(access_log);
        pick!(proxy_header_timeout_ms);
        pick!(proxy_keepalive_timeout_ms);
        pick!(proxy_direct);
        pick!(proxy_send_timeout_ms);
        pick!(admin_header_timeout_ms);
        pick!(admin_keepalive_timeout_ms);
        let cluster_tls = (
            self.cluster_ca.or(file.cluster_ca),
            self.cluster_cert.or(file.cluster_cert),
            self.cluster_key.or(file.cluster_key),
        );
        config.cluster_tls = match cluster_tls {
            (Some(ca), Some(cert), Some(key)) => Some(tollgate_node::cluster::tls::TlsFiles { ca, cert, key }),
            (None, None, None) => None,
            _ => anyhow::bail!("--cluster-ca, --cluster-cert and --cluster-key go together: pass all three or none"),
        };
        config.admin_tls =
            match (self.admin_tls_cert.or(file.admin_tls_cert), self.admin_tls_key.or(file.admin_tls_key)) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => anyhow::bail!("--admin-tls-cert and --admin-tls-key go together: pass both or neither"),
            };
        if let Some(trusted) = self.trusted_ips.or(file.trusted_ips) {
            let parsed = tollgate_node::proxy::trusted::TrustedIps::parse(&trusted).map_err(anyhow::Error::msg)?;
            config.trusted_ips = std::sync::Arc::new(parsed);
        }
        config.proxy_tls_listen = self.proxy_tls_listen.or(file.proxy_tls_listen);
        config.admin_token = self.admin_token.or(file.admin_token);
        if let Some(cluster_id) = self.cluster_id.or(file.cluster_id) {
            config.cluster_id = cluster_id;
        }
        config.cluster_secret = self.cluster_secret.or(file.cluster_secret);
        config.advertise = self.advertise.or(file.advertise).unwrap_or_else(|| config.cluster_listen.to_string());
        config::check_host_port("advertise", &config.advertise)?;
        if let Some(members) = self.initial_cluster.or(file.initial_cluster) {
            config.initial_cluster = config::parse_initial_cluster(&members)?;
        }
        if let Some(seeds) = self.join.or(file.join) {
            config.join = seeds.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
            for seed in &config.join {
                config::check_host_port("join", seed)?;
            }
        }
        config.validate()?;
        Ok(config)
    }
}

/// mimalloc instead of glibc's malloc: with a large config (10 000 routes) glibc's
/// fastbin consolidation showed up in proxy profiles; tests/bench/proxy-bench.sh
/// measures the difference.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Threads of the control-plane runtime.
const CONTROL_THREADS: usize = 2;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => {
            let config = (*args).resolve()?;
            let runtime =
                // The control plane (Raft, Admin API, publish) gets its own small runtime;
                // proxy traffic runs on `workers` threads of its own (proxy::spawn_workers).
                tokio::runtime::Builder::new_multi_thread().worker_threads(CONTROL_THREADS).enable_all().build()?;
            runtime.block_on(run(config))
        }
        Command::Dev { data_dir, echo_listen } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(dev::run(DevOptions { data_dir, echo_listen }))
        }
        Command::Certs { command: CertsCommand::Init { out, nodes, hosts } } => {
            let nodes = tollgate_node::certs::parse_nodes(&nodes)?;
            let hosts: Vec<String> =
                hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_string).collect();
            for path in tollgate_node::certs::init(&out, &nodes, &hosts)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Echo { listen } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
                eprintln!("echo listening on http://{}", listener.local_addr()?);
                let (stop, stop_rx) = tokio::sync::watch::channel(false);
                let server =
                    tokio::spawn(tollgate_node::echo::serve(tollgate_node::env::Listener::Tcp(listener), stop_rx));
                tokio::signal::ctrl_c().await?;
                let _ = stop.send(true);
                let _ = server.await;
                Ok(())
            })
        }
    }
}

async fn run(config: NodeConfig) -> anyhow::Result<()> {
    // Latencies as histograms with Kong-like buckets (ms), not summaries.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_ms".to_string()),
            &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 60000.0],
        )
        .context("latency buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    let node = tollgate_node::node::start(config, Some(handle)).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("stopping");
    node.shutdown().await;
    Ok(())
}
