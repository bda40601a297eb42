//! `tollgate dev`: three nodes on loopback in one process, the echo upstream, and a
//! sample configuration. Ctrl-C stops everything cleanly.
//!
//! Ports: node N listens on `8000 + 100 (N-1)` for proxy traffic, `+1` for the Admin
//! API and `+5` for the cluster port (node 1: 8000/8001/8005, node 2: 8100/8101/8105,
//! node 3: 8200/8201/8205). State lives in `--data-dir` (default
//! `./tollgate-data/dev`), so a restart keeps what you configured; the sample config
//! is loaded only into an empty cluster. The cluster port uses mutual TLS with
//! certificates `tollgate certs init` makes in `<data dir>/certs` on the first start.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tollgate_raft_store::command::Op;

use crate::config::NodeConfig;
use crate::startup::{self, NodeHandle};

pub const DEV_NODES: u64 = 3;
const DEV_BASE_PORT: u16 = 8000;
/// How long `tollgate dev` waits for the cluster to elect a leader and take the sample.
const DEV_READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct DevOptions {
    pub data_dir: PathBuf,
    pub echo_listen: std::net::SocketAddr,
    /// Called once the cluster has a leader and the sample config (or the wait for
    /// them ended): `tollgate` turns its start-up log filter back up.
    pub started: Option<Box<dyn FnOnce() + Send>>,
}

pub fn dev_node_config(id: u64, data_dir: &std::path::Path) -> NodeConfig {
    let base = DEV_BASE_PORT + 100 * (id as u16 - 1);
    let mut config = NodeConfig::new(id, data_dir.join(id.to_string()));
    config.proxy_listen = ([127, 0, 0, 1], base).into();
    config.admin_listen = ([127, 0, 0, 1], base + 1).into();
    config.cluster_listen = ([127, 0, 0, 1], base + 5).into();
    config.advertise = config.cluster_listen.to_string();
    config.initial_cluster =
        (1..=DEV_NODES).map(|n| (n, format!("127.0.0.1:{}", DEV_BASE_PORT + 100 * (n as u16 - 1) + 5))).collect();
    config.workers = 1;
    config
}

pub fn sample_config(echo: std::net::SocketAddr) -> serde_json::Value {
    json!({
        "_format_version": "3.0",
        "services": [{
            "name": "echo",
            "url": format!("http://{echo}"),
            "routes": [{ "name": "echo", "paths": ["/echo"] }]
        }]
    })
}

pub async fn run(options: DevOptions) -> anyhow::Result<()> {
    let (stop, stop_rx) = watch::channel(false);
    let echo_listener = TcpListener::bind(options.echo_listen)
        .await
        .with_context(|| format!("binding echo {}", options.echo_listen))?;
    let echo = tokio::spawn(crate::echo::serve(crate::env::Listener::Tcp(echo_listener), stop_rx));

    // The cluster port as it runs in production: mutual TLS, with certificates of
    // the dev cluster's own CA.
    let certs = options.data_dir.join("certs");
    let ids: Vec<u64> = (1..=DEV_NODES).collect();
    let missing: Vec<u64> = ids.iter().copied().filter(|id| !certs.join(format!("node-{id}.pem")).exists()).collect();
    if !missing.is_empty() {
        crate::certs::init(&certs, &missing, &[]).context("making the dev cluster's certificates")?;
    }
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for id in 1..=DEV_NODES {
        let mut config = dev_node_config(id, &options.data_dir);
        config.cluster_tls = Some(crate::cluster::tls::TlsFiles {
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("node-{id}.pem")),
            key: certs.join(format!("node-{id}-key.pem")),
        });
        nodes.push(startup::start(config, None).await?);
    }

    let first = nodes[0].node.clone();
    let seeded = tokio::time::timeout(DEV_READY_TIMEOUT, async {
        let applied = first.cluster.read_barrier().await?;
        if applied.state.entity_count() == 0 {
            let document = sample_config(options.echo_listen);
            let id_seed = crate::env::random();
            first.cluster.write(Op::ReplaceAll { document: document.into(), id_seed }).await?;
        }
        Ok::<_, tollgate_raft_store::ApiError>(())
    })
    .await;
    if let Some(started) = options.started {
        started();
    }
    match seeded {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "could not load the sample config"),
        Err(_) => tracing::warn!("the cluster did not become ready in time"),
    }

    println!("Tollgate dev cluster: {DEV_NODES} nodes on loopback, data in {}", options.data_dir.display());
    for handle in &nodes {
        println!(
            "  node {}: proxy http://{}  admin http://{}  cluster {}",
            handle.node.config.node_id, handle.proxy_addr, handle.admin_addr, handle.cluster_addr
        );
    }
    println!("  demo upstream (tollgate echo): http://{}", options.echo_listen);
    println!("Try: curl -s http://{}/echo/hello   (route 'echo' through node 3)", nodes[2].proxy_addr);
    println!("     curl -s http://{}/services     (Admin API of node 2)", nodes[1].admin_addr);
    println!("Ctrl-C stops the cluster.");

    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    println!("stopping...");
    let _ = stop.send(true);
    for handle in nodes {
        handle.shutdown().await;
    }
    let _ = echo.await;
    println!("stopped");
    Ok(())
}
