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
    /// Exit 0 when a node answers ready (`GET /status/ready`): a container health check
    /// for images without curl.
    Ready {
        /// The node's Admin API.
        #[arg(long, env = "TOLLGATE_ADMIN", default_value = "http://127.0.0.1:8001")]
        admin: String,
    },
    /// Write the whole configuration, read linearizably through any node (`GET /config`),
    /// to a file: entities with their ids, hashed passwords as stored.
    Backup {
        /// Admin API URLs, comma-separated: tried in turn until one answers.
        #[arg(long, env = "TOLLGATE_ADMIN", default_value = "http://127.0.0.1:8001")]
        admin: String,
        #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The file to write (replaced whole, never left half-written).
        #[arg(long)]
        out: PathBuf,
    },
    /// Load a backup into a cluster (`POST /config`): it replaces the cluster's whole
    /// configuration in one Raft entry.
    Restore {
        #[arg(long, env = "TOLLGATE_ADMIN", default_value = "http://127.0.0.1:8001")]
        admin: String,
        #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file `tollgate backup` wrote (or any declarative config in JSON).
        #[arg(long = "in")]
        input: PathBuf,
    },
}

/// How long `ready`, `backup` and `restore` wait for one node's answer.
const ADMIN_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long the health check waits for its answer.
const READY_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn admin_client(admin: &str, token: Option<String>, timeout: std::time::Duration) -> tollgate_client::AdminClient {
    let urls: Vec<String> = admin.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect();
    let client = tollgate_client::AdminClient::new(urls).with_timeout(timeout);
    match token {
        Some(token) => client.with_token(token),
        None => client,
    }
}

async fn ready(admin: &str) -> anyhow::Result<()> {
    let reply = admin_client(admin, None, READY_CALL_TIMEOUT).get("/status/ready").await;
    match reply {
        Ok(reply) if reply.status == 200 => Ok(()),
        Ok(reply) => anyhow::bail!("not ready: {} {}", reply.status, reply.body),
        Err(error) => anyhow::bail!("not ready: {error}"),
    }
}

async fn backup(admin: &str, token: Option<String>, out: &std::path::Path) -> anyhow::Result<()> {
    let reply = admin_client(admin, token, ADMIN_CALL_TIMEOUT).get("/config").await.context("GET /config")?;
    let text = serde_json::to_string_pretty(&reply.body)? + "\n";
    let partial = out.with_extension("partial");
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, out).with_context(|| format!("writing {}", out.display()))?;
    let version = reply.config_version.map_or_else(|| "?".to_string(), |v| v.to_string());
    eprintln!("backed up config version {version} from {} to {}", reply.node, out.display());
    Ok(())
}

async fn restore(admin: &str, token: Option<String>, input: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let document: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not a JSON document", input.display()))?;
    let reply =
        admin_client(admin, token, ADMIN_CALL_TIMEOUT).post("/config", &document).await.context("POST /config")?;
    let version = reply.config_version.map_or_else(|| "?".to_string(), |v| v.to_string());
    eprintln!("restored {} through {}: config version {version}", input.display(), reply.node);
    Ok(())
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
    /// The node id from the host name's trailing `-N`, plus one (`tollgate-0` is node 1):
    /// a Kubernetes StatefulSet's pods. `{id}` in the certificate paths is the id.
    #[arg(long, env = "TOLLGATE_NODE_ID_FROM_HOSTNAME", value_parser = clap::builder::BoolishValueParser::new())]
    node_id_from_hostname: Option<bool>,
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
    /// Where a trusted peer names the client (Kong's `real_ip_header`): `X-Real-IP`
    /// (the default), `X-Forwarded-For`, or another header.
    #[arg(long, env = "TOLLGATE_REAL_IP_HEADER")]
    real_ip_header: Option<String>,
    /// With `X-Forwarded-For`: the right-most untrusted hop (`on`) or the last one
    /// (`off`, the default), as Kong's `real_ip_recursive`.
    #[arg(long, env = "TOLLGATE_REAL_IP_RECURSIVE", value_parser = clap::builder::BoolishValueParser::new())]
    real_ip_recursive: Option<bool>,
    /// Time for a request's line and headers once its first byte arrived: 408 after it.
    #[arg(long, env = "TOLLGATE_PROXY_HEADER_TIMEOUT_MS")]
    proxy_header_timeout_ms: Option<u64>,
    /// Idle time between requests on a keep-alive connection before it is closed.
    #[arg(long, env = "TOLLGATE_PROXY_KEEPALIVE_TIMEOUT_MS")]
    proxy_keepalive_timeout_ms: Option<u64>,
    /// Connections queued on a proxy listener before they are accepted (nginx's 511).
    #[arg(long, env = "TOLLGATE_PROXY_BACKLOG")]
    proxy_backlog: Option<u32>,
    /// The direct HTTP/1.1 path (`on`, the default) or every request through hyper
    /// (`off`): for comparing the two, and a way around a direct-path fault.
    #[arg(long, env = "TOLLGATE_PROXY_DIRECT", value_parser = clap::builder::BoolishValueParser::new())]
    proxy_direct: Option<bool>,
    /// How long a write to a client may make no progress before the connection closes.
    #[arg(long, env = "TOLLGATE_PROXY_SEND_TIMEOUT_MS")]
    proxy_send_timeout_ms: Option<u64>,
    /// On SIGTERM, how long requests in progress may take to finish before their
    /// connections are cut (the node answers not ready and accepts none meanwhile).
    #[arg(long, env = "TOLLGATE_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
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
        let from_hostname = match self.node_id_from_hostname {
            Some(true) => Some(node_id_from_hostname(&config::hostname().context("reading the host name")?)?),
            _ => None,
        };
        let node_id = self
            .node_id
            .or(from_hostname)
            .or(file.node_id)
            .context("--node-id (TOLLGATE_NODE_ID) or --node-id-from-hostname is required")?;
        let with_id = |path: PathBuf| PathBuf::from(path.to_string_lossy().replace("{id}", &node_id.to_string()));
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
        pick!(proxy_backlog);
        pick!(proxy_direct);
        pick!(proxy_send_timeout_ms);
        pick!(drain_timeout_ms);
        pick!(admin_header_timeout_ms);
        pick!(admin_keepalive_timeout_ms);
        let cluster_tls = (
            self.cluster_ca.or(file.cluster_ca).map(with_id),
            self.cluster_cert.or(file.cluster_cert).map(with_id),
            self.cluster_key.or(file.cluster_key).map(with_id),
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
            use tollgate_node::proxy::trusted::{RealIpHeader, TrustedIps};
            let source = match self.real_ip_header.or(file.real_ip_header) {
                Some(name) => RealIpHeader::parse(&name).map_err(anyhow::Error::msg)?,
                None => RealIpHeader::default(),
            };
            let recursive = self.real_ip_recursive.or(file.real_ip_recursive).unwrap_or(false);
            let parsed = TrustedIps::parse(&trusted).map_err(anyhow::Error::msg)?.with_real_ip(source, recursive);
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

/// `tollgate-2` is node 3: a StatefulSet's ordinal plus one (node ids start at 1).
fn node_id_from_hostname(hostname: &str) -> anyhow::Result<u64> {
    let ordinal = hostname
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u64>().ok())
        .with_context(|| format!("--node-id-from-hostname: host name {hostname:?} does not end in -<number>"))?;
    ordinal.checked_add(1).context("--node-id-from-hostname: ordinal too large")
}

/// mimalloc instead of glibc's malloc: with a large config (10 000 routes) glibc's
/// fastbin consolidation showed up in proxy profiles; tests/bench/proxy-bench.sh
/// measures the difference.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lets mimalloc return the pages freed on the calling thread (after its purge delay)
/// to the system: proxy workers call it periodically, so that memory held by a burst
/// of connections goes back once they close (`tollgate_node::proxy::set_memory_release`).
fn release_memory() {
    // `unsafe` only because it is a C function: `mi_collect` takes no pointers and
    // may be called from any thread at any time.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(false)
    }
}

/// Transparent huge pages off for this process. mimalloc asks for them on its arenas
/// where the system leaves them to each process (Debian's `madvise` setting): a node
/// then starts at about 39 MB of RSS instead of 20, and after a burst of connections
/// it kept 8 MB more in about a third of the runs (huge pages the purge of freed
/// memory could not give back; tests/bench/idle-conns.py). mimalloc's own option
/// (`MIMALLOC_ALLOW_THP=0`) is read before `main`; the process-wide switch covers the
/// arenas already made.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() {
    // `unsafe` only because it is a C function; this request takes no pointers. It
    // fails only on kernels older than 3.15, which then keep their default.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// `tollgate dev`'s log while the cluster starts, and once it runs (`RUST_LOG` wins).
const DEV_STARTING_LOG: &str = "warn,openraft=off";
const DEV_RUNNING_LOG: &str = "warn,openraft=error";

/// Threads of the control-plane runtime.
const CONTROL_THREADS: usize = 2;

fn main() -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    disable_transparent_huge_pages();
    tollgate_node::proxy::set_memory_release(release_memory);
    let cli = Cli::parse();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let chosen = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let is_dev = matches!(cli.command, Command::Dev { .. });
    // `tollgate dev` is a newcomer's first screen: while its three nodes find each
    // other (votes to peers not listening yet are expected), only this program's own
    // warnings and errors show; once the cluster is up, openraft's errors show too.
    let initial = match (&chosen, is_dev) {
        (Some(_), _) => None,
        (None, true) => Some(tracing_subscriber::EnvFilter::new(DEV_STARTING_LOG)),
        (None, false) => Some(tracing_subscriber::EnvFilter::new("info,openraft=warn")),
    };
    let (filter, reload) = tracing_subscriber::reload::Layer::new(chosen.or(initial).unwrap_or_default());
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let user_chose_filter = std::env::var_os("RUST_LOG").is_some();
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
            let started: Box<dyn FnOnce() + Send> = Box::new(move || {
                if !user_chose_filter {
                    let _ = reload.reload(tracing_subscriber::EnvFilter::new(DEV_RUNNING_LOG));
                }
            });
            runtime.block_on(dev::run(DevOptions { data_dir, echo_listen, started: Some(started) }))
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
        Command::Ready { admin } => current_thread()?.block_on(ready(&admin)),
        Command::Backup { admin, token, out } => current_thread()?.block_on(backup(&admin, token, &out)),
        Command::Restore { admin, token, input } => current_thread()?.block_on(restore(&admin, token, &input)),
        Command::Echo { listen } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
                eprintln!("echo listening on http://{}", listener.local_addr()?);
                let (stop, stop_rx) = tokio::sync::watch::channel(false);
                let server =
                    tokio::spawn(tollgate_node::echo::serve(tollgate_node::env::Listener::Tcp(listener), stop_rx));
                // PID 1 in a container: SIGTERM has no default action there.
                stop_signal().await?;
                let _ = stop.send(true);
                let _ = server.await;
                Ok(())
            })
        }
    }
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
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
    let drain = std::time::Duration::from_millis(config.drain_timeout_ms);
    let node = tollgate_node::startup::start(config, Some(handle)).await?;
    stop_signal().await?;
    // A second signal stops at once.
    tokio::select! {
        _ = node.stop(drain) => tracing::info!("stopped"),
        _ = stop_signal() => tracing::warn!("second stop signal: stopping without waiting"),
    }
    Ok(())
}

/// SIGTERM (Docker, Kubernetes, systemd) or SIGINT (Ctrl-C).
async fn stop_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_ids_come_from_a_statefulset_ordinal() {
        assert_eq!(super::node_id_from_hostname("tollgate-0").unwrap(), 1);
        assert_eq!(super::node_id_from_hostname("my-gw-tollgate-4").unwrap(), 5);
        let error = super::node_id_from_hostname("tollgate").unwrap_err().to_string();
        assert!(error.contains("--node-id-from-hostname") && error.contains("\"tollgate\""), "{error}");
    }
}
