//! Node configuration: flags, `TOLLGATE_*` variables and a TOML file, in that order of
//! precedence, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::NodeId;

/// Raft timing defaults. openraft 0.9 lets a follower elect itself only after its
/// leader lease (the maximum election timeout) plus its own election timeout have
/// passed without a heartbeat, so a leader killed with -9 is replaced after 0.6–0.8 s
/// here (measured: median 0.70 s over 20 kills), and a follower must miss 12 or more
/// heartbeats in a row before it stands: none did in 10 minutes idle or 10 minutes
/// of saturating proxy load on a 2-core host. See README "Failover".
pub const RAFT_HEARTBEAT_MS_DEFAULT: u64 = 50;
pub const RAFT_ELECTION_MIN_MS_DEFAULT: u64 = 200;
pub const RAFT_ELECTION_MAX_MS_DEFAULT: u64 = 400;
/// A snapshot is built after this many applied entries; the log before it is purged.
pub const SNAPSHOT_LOGS_DEFAULT: u64 = 5000;
/// Entries kept behind a snapshot so a briefly lagging follower needs no snapshot.
pub const SNAPSHOT_KEEP_LOGS_DEFAULT: u64 = 1000;
/// Largest Admin API request body (a declarative config with ~20 000 routes fits).
pub const ADMIN_BODY_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;
/// How long a write waits for a leader to appear before answering 503.
pub const WRITE_LEADER_WAIT_MS_DEFAULT: u64 = 5000;
/// Gossip's cluster id when none is given.
pub const CLUSTER_ID_DEFAULT: &str = "tollgate";
/// Longest cluster id (it travels in every gossip message).
pub const CLUSTER_ID_BYTES_MAX: usize = 128;

/// How long a client may take to send a request's line and headers once its first
/// byte arrived (slowloris): 408 and close after it (nginx's `client_header_timeout`).
pub const PROXY_HEADER_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// How long a keep-alive connection may sit idle between requests before it is
/// closed quietly (Kong's `nginx_http_keepalive_timeout`, 60 s).
pub const PROXY_KEEPALIVE_TIMEOUT_MS_DEFAULT: u64 = 60_000;
/// Connections the kernel queues on a proxy listener before they are accepted: nginx's
/// default (`listen … backlog=511`). The kernel caps it at `net.core.somaxconn`.
pub const PROXY_BACKLOG_DEFAULT: u32 = 511;

/// How long a proxy write to a client may make no progress (a client that stopped
/// reading) before the connection is closed (nginx's `send_timeout`, 60 s).
pub const PROXY_SEND_TIMEOUT_MS_DEFAULT: u64 = 60_000;
/// How long a stopping node (SIGTERM) lets requests in progress finish before it cuts
/// their connections: within Docker's default stop timeout of 10 s, with time left for
/// the leadership hand-off and giving quota leases back.
pub const DRAIN_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// The Admin API's header timeout (a request head, from its first byte) and idle
/// timeout between requests.
pub const ADMIN_HEADER_TIMEOUT_MS_DEFAULT: u64 = 10_000;
pub const ADMIN_KEEPALIVE_TIMEOUT_MS_DEFAULT: u64 = 60_000;

/// Bounds on the keys above, checked by [`NodeConfig::validate`].
const RAFT_HEARTBEAT_MS_RANGE: (u64, u64) = (10, 10_000);
const RAFT_ELECTION_MS_RANGE: (u64, u64) = (50, 60_000);
const SNAPSHOT_LOGS_RANGE: (u64, u64) = (100, 10_000_000);
/// At most a quarter of the cluster frame limit, so one entry always fits in a frame.
const ADMIN_BODY_BYTES_RANGE: (usize, usize) = (1024, 32 * 1024 * 1024);
const WRITE_LEADER_WAIT_MS_RANGE: (u64, u64) = (100, 600_000);
const PROXY_HEADER_TIMEOUT_MS_RANGE: (u64, u64) = (100, 600_000);
const PROXY_KEEPALIVE_TIMEOUT_MS_RANGE: (u64, u64) = (100, 3_600_000);
const PROXY_BACKLOG_RANGE: (u32, u32) = (1, 65_535);
const PROXY_SEND_TIMEOUT_MS_RANGE: (u64, u64) = (100, 3_600_000);
const DRAIN_TIMEOUT_MS_RANGE: (u64, u64) = (0, 600_000);
const ADMIN_HEADER_TIMEOUT_MS_RANGE: (u64, u64) = (100, 600_000);
const ADMIN_KEEPALIVE_TIMEOUT_MS_RANGE: (u64, u64) = (100, 3_600_000);

/// A fully resolved node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub proxy_listen: SocketAddr,
    pub proxy_tls_listen: Option<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub cluster_listen: SocketAddr,
    /// What peers dial; defaults to `cluster_listen`.
    pub advertise: String,
    pub initial_cluster: Vec<(NodeId, String)>,
    pub join: Vec<String>,
    pub workers: usize,
    pub admin_token: Option<String>,
    /// Gossip's cluster id (`--cluster-id`).
    pub cluster_id: String,
    /// Authenticates gossip datagrams when set (`--cluster-secret`).
    pub cluster_secret: Option<String>,
    pub raft_heartbeat_ms: u64,
    pub raft_election_min_ms: u64,
    pub raft_election_max_ms: u64,
    pub snapshot_logs: u64,
    pub snapshot_keep_logs: u64,
    pub admin_body_bytes_max: usize,
    pub write_leader_wait_ms: u64,
    /// A JSON line per proxied request on stdout.
    pub access_log: bool,
    /// Peers whose X-Forwarded-* headers are believed (Kong's `trusted_ips`).
    pub trusted_ips: std::sync::Arc<crate::proxy::trusted::TrustedIps>,
    pub proxy_header_timeout_ms: u64,
    pub proxy_keepalive_timeout_ms: u64,
    /// The proxy listeners' listen backlog.
    pub proxy_backlog: u32,
    /// HTTP/1.1 requests take the direct path where they can (`--proxy-direct`).
    pub proxy_direct: bool,
    pub proxy_send_timeout_ms: u64,
    /// The graceful stop's bound on requests in progress ([`DRAIN_TIMEOUT_MS_DEFAULT`]).
    pub drain_timeout_ms: u64,
    /// Mutual TLS on the cluster port (`--cluster-ca`, `--cluster-cert`,
    /// `--cluster-key`).
    pub cluster_tls: Option<crate::cluster::tls::TlsFiles>,
    /// The Admin API over HTTPS (`--admin-tls-cert`, `--admin-tls-key`).
    pub admin_tls: Option<(PathBuf, PathBuf)>,
    pub admin_header_timeout_ms: u64,
    pub admin_keepalive_timeout_ms: u64,
}

impl NodeConfig {
    /// A configuration with every default, for `node_id`, listening on the given ports.
    pub fn new(node_id: NodeId, data_dir: PathBuf) -> NodeConfig {
        let cluster_listen: SocketAddr = "127.0.0.1:8005".parse().expect("literal address");
        NodeConfig {
            node_id,
            data_dir,
            proxy_listen: "0.0.0.0:8000".parse().expect("literal address"),
            proxy_tls_listen: None,
            admin_listen: "127.0.0.1:8001".parse().expect("literal address"),
            cluster_listen,
            advertise: cluster_listen.to_string(),
            initial_cluster: Vec::new(),
            join: Vec::new(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            admin_token: None,
            cluster_id: CLUSTER_ID_DEFAULT.to_string(),
            cluster_secret: None,
            raft_heartbeat_ms: RAFT_HEARTBEAT_MS_DEFAULT,
            raft_election_min_ms: RAFT_ELECTION_MIN_MS_DEFAULT,
            raft_election_max_ms: RAFT_ELECTION_MAX_MS_DEFAULT,
            snapshot_logs: SNAPSHOT_LOGS_DEFAULT,
            snapshot_keep_logs: SNAPSHOT_KEEP_LOGS_DEFAULT,
            admin_body_bytes_max: ADMIN_BODY_BYTES_MAX_DEFAULT,
            write_leader_wait_ms: WRITE_LEADER_WAIT_MS_DEFAULT,
            access_log: true,
            trusted_ips: Default::default(),
            proxy_header_timeout_ms: PROXY_HEADER_TIMEOUT_MS_DEFAULT,
            proxy_keepalive_timeout_ms: PROXY_KEEPALIVE_TIMEOUT_MS_DEFAULT,
            proxy_backlog: PROXY_BACKLOG_DEFAULT,
            proxy_direct: true,
            proxy_send_timeout_ms: PROXY_SEND_TIMEOUT_MS_DEFAULT,
            drain_timeout_ms: DRAIN_TIMEOUT_MS_DEFAULT,
            cluster_tls: None,
            admin_tls: None,
            admin_header_timeout_ms: ADMIN_HEADER_TIMEOUT_MS_DEFAULT,
            admin_keepalive_timeout_ms: ADMIN_KEEPALIVE_TIMEOUT_MS_DEFAULT,
        }
    }

    /// Checks every key against its bounds and the rules between keys.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_range("raft_heartbeat_ms", self.raft_heartbeat_ms, RAFT_HEARTBEAT_MS_RANGE)?;
        check_range("raft_election_min_ms", self.raft_election_min_ms, RAFT_ELECTION_MS_RANGE)?;
        check_range("raft_election_max_ms", self.raft_election_max_ms, RAFT_ELECTION_MS_RANGE)?;
        if self.raft_election_min_ms >= self.raft_election_max_ms {
            bail!("raft_election_min_ms must be below raft_election_max_ms");
        }
        if self.raft_heartbeat_ms * 2 > self.raft_election_min_ms {
            bail!("raft_heartbeat_ms must be at most half of raft_election_min_ms");
        }
        check_range("snapshot_logs", self.snapshot_logs, SNAPSHOT_LOGS_RANGE)?;
        check_range("snapshot_keep_logs", self.snapshot_keep_logs, (0, SNAPSHOT_LOGS_RANGE.1))?;
        check_range("admin_body_bytes_max", self.admin_body_bytes_max, ADMIN_BODY_BYTES_RANGE)?;
        check_range("write_leader_wait_ms", self.write_leader_wait_ms, WRITE_LEADER_WAIT_MS_RANGE)?;
        if self.cluster_id.is_empty() || self.cluster_id.len() > CLUSTER_ID_BYTES_MAX {
            anyhow::bail!("cluster_id: between 1 and {CLUSTER_ID_BYTES_MAX} bytes");
        }
        if self.cluster_secret.as_deref().is_some_and(str::is_empty) {
            anyhow::bail!("cluster_secret: empty; leave it out for unauthenticated gossip");
        }
        check_range("workers", self.workers, (1, 1024))?;
        check_range("proxy_header_timeout_ms", self.proxy_header_timeout_ms, PROXY_HEADER_TIMEOUT_MS_RANGE)?;
        check_range("proxy_keepalive_timeout_ms", self.proxy_keepalive_timeout_ms, PROXY_KEEPALIVE_TIMEOUT_MS_RANGE)?;
        check_range("proxy_backlog", self.proxy_backlog, PROXY_BACKLOG_RANGE)?;
        check_range("proxy_send_timeout_ms", self.proxy_send_timeout_ms, PROXY_SEND_TIMEOUT_MS_RANGE)?;
        check_range("drain_timeout_ms", self.drain_timeout_ms, DRAIN_TIMEOUT_MS_RANGE)?;
        check_range("admin_header_timeout_ms", self.admin_header_timeout_ms, ADMIN_HEADER_TIMEOUT_MS_RANGE)?;
        check_range("admin_keepalive_timeout_ms", self.admin_keepalive_timeout_ms, ADMIN_KEEPALIVE_TIMEOUT_MS_RANGE)?;
        // The cluster port off loopback: every peer is authenticated, by certificate
        // (Raft, forwarded writes, joins, snapshots) and by the secret (gossip). The
        // simulator's network is not a real one (every host is a simulated machine
        // of this process): there the secret, which authenticates every frame too,
        // is enough, and no seed pays for TLS handshakes.
        if !self.cluster_listen.ip().is_loopback() {
            if self.cluster_tls.is_none() && !crate::env::simulated() {
                bail!(
                    "cluster_listen {} is not a loopback address: pass --cluster-ca, --cluster-cert and --cluster-key (make them with `tollgate certs init --out DIR --nodes 1,2,3`) so peers are authenticated",
                    self.cluster_listen
                );
            }
            if self.cluster_secret.is_none() {
                bail!(
                    "cluster_listen {} is not a loopback address: set --cluster-secret (TOLLGATE_CLUSTER_SECRET), the same on every node, to authenticate gossip",
                    self.cluster_listen
                );
            }
        }
        if !self.admin_listen.ip().is_loopback() && self.admin_token.as_deref().is_none_or(str::is_empty) {
            bail!(
                "admin_listen {} is not a loopback address: set --admin-token (TOLLGATE_ADMIN_TOKEN) to protect the Admin API",
                self.admin_listen
            );
        }
        if self.initial_cluster.iter().all(|(id, _)| *id != self.node_id) && !self.initial_cluster.is_empty() {
            bail!("initial_cluster does not list this node's id {}", self.node_id);
        }
        if !self.initial_cluster.is_empty() && !self.join.is_empty() {
            bail!("set either initial_cluster (bootstrap) or join (add to a running cluster), not both");
        }
        Ok(())
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(name: &str, value: T, (min, max): (T, T)) -> anyhow::Result<()> {
    if value < min || value > max {
        bail!("{name} = {value} is out of range [{min}, {max}]");
    }
    Ok(())
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_initial_cluster(text: &str) -> anyhow::Result<Vec<(NodeId, String)>> {
    let mut members = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, address) =
            part.split_once('=').with_context(|| format!("initial_cluster: '{part}' is not id=host:port"))?;
        let id: NodeId = id.trim().parse().with_context(|| format!("initial_cluster: bad node id in '{part}'"))?;
        if members.iter().any(|(known, _)| *known == id) {
            bail!("initial_cluster: node id {id} appears twice");
        }
        check_host_port("initial_cluster", address.trim())?;
        members.push((id, address.trim().to_string()));
    }
    Ok(members)
}

pub fn check_host_port(name: &str, text: &str) -> anyhow::Result<()> {
    let (host, port) = text.rsplit_once(':').with_context(|| format!("{name}: '{text}' is not host:port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("{name}: '{text}' is not host:port");
    }
    Ok(())
}

/// The TOML file's keys: the flags' names with `_` for `-`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<NodeId>,
    pub data_dir: Option<PathBuf>,
    pub proxy_listen: Option<SocketAddr>,
    pub proxy_tls_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub cluster_listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub initial_cluster: Option<String>,
    pub join: Option<String>,
    pub workers: Option<usize>,
    pub admin_token: Option<String>,
    pub cluster_id: Option<String>,
    pub cluster_secret: Option<String>,
    pub raft_heartbeat_ms: Option<u64>,
    pub raft_election_min_ms: Option<u64>,
    pub raft_election_max_ms: Option<u64>,
    pub snapshot_logs: Option<u64>,
    pub snapshot_keep_logs: Option<u64>,
    pub admin_body_bytes_max: Option<usize>,
    pub write_leader_wait_ms: Option<u64>,
    pub access_log: Option<bool>,
    pub trusted_ips: Option<String>,
    pub real_ip_header: Option<String>,
    pub real_ip_recursive: Option<bool>,
    pub proxy_header_timeout_ms: Option<u64>,
    pub proxy_keepalive_timeout_ms: Option<u64>,
    pub proxy_backlog: Option<u32>,
    pub proxy_direct: Option<bool>,
    pub proxy_send_timeout_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub cluster_ca: Option<PathBuf>,
    pub cluster_cert: Option<PathBuf>,
    pub cluster_key: Option<PathBuf>,
    pub admin_tls_cert: Option<PathBuf>,
    pub admin_tls_key: Option<PathBuf>,
    pub admin_header_timeout_ms: Option<u64>,
    pub admin_keepalive_timeout_ms: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }
}

/// This host's name: `HOSTNAME` (Kubernetes and Docker set it), else the kernel's.
/// `--node-id-from-hostname` reads it, and `GET /` shows it.
pub fn hostname() -> std::io::Result<String> {
    if let Ok(name) = std::env::var("HOSTNAME") {
        if !name.is_empty() {
            return Ok(name);
        }
    }
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_rejects() {
        let members = parse_initial_cluster("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(members, vec![(1, "127.0.0.1:7001".into()), (2, "127.0.0.1:7002".into())]);
        assert!(parse_initial_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_initial_cluster("x=a:1").is_err());
        assert!(parse_initial_cluster("1=nohost").is_err());
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let mut config = NodeConfig::new(1, "/tmp/x".into());
        config.admin_listen = "0.0.0.0:8001".parse().unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--admin-token"), "{error}");
        config.admin_token = Some("secret".into());
        config.validate().unwrap();
    }

    #[test]
    fn a_cluster_port_off_loopback_needs_certificates_and_a_secret() {
        let mut config = NodeConfig::new(1, "/tmp/x".into());
        config.cluster_listen = "0.0.0.0:8005".parse().unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--cluster-ca") && error.contains("certs init"), "{error}");
        config.cluster_tls = Some(crate::cluster::tls::TlsFiles {
            ca: "ca.pem".into(),
            cert: "node-1.pem".into(),
            key: "node-1-key.pem".into(),
        });
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--cluster-secret"), "{error}");
        config.cluster_secret = Some("s".into());
        config.validate().unwrap();
    }

    #[test]
    fn timing_rules() {
        let mut config = NodeConfig::new(1, "/tmp/x".into());
        config.raft_election_min_ms = 2000;
        assert!(config.validate().is_err());
    }
}
