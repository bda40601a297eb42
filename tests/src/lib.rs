//! Harness for end-to-end tests: real `tollgate` processes on free loopback ports, each
//! with its own data directory, that tests can kill -9, stop and restart.
//!
//! Nothing here sleeps to wait: [`eventually`] polls a condition until a deadline.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tollgate_client::AdminClient;

/// How long a condition may take to become true before a test fails.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between polls of a condition.
const POLL_PAUSE: Duration = Duration::from_millis(20);

/// The `tollgate` binary: `TOLLGATE_BIN`, or the one cargo built beside this test.
pub fn tollgate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TOLLGATE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps/, benchmark binaries from target/<profile>/.
    let beside = exe.parent().map(|dir| dir.join("tollgate"));
    let above = exe.parent().and_then(Path::parent).map(|dir| dir.join("tollgate"));
    let binary = [beside, above].into_iter().flatten().find(|path| path.exists()).unwrap_or_default();
    assert!(
        binary.exists(),
        "tollgate not found beside {}: build it with `cargo build -p tollgate-node` (cargo test --workspace does) or set TOLLGATE_BIN",
        exe.display()
    );
    binary
}

/// A free loopback port (bound, then released for the node to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().expect("local addr").port()
}

/// Polls `condition` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

pub struct TestNode {
    pub id: u64,
    pub admin_port: u16,
    pub cluster_port: u16,
    pub proxy_port: u16,
    pub data_dir: PathBuf,
    /// `--initial-cluster` or `--join` and any other flags this node starts with.
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

impl TestNode {
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn cluster_address(&self) -> String {
        format!("127.0.0.1:{}", self.cluster_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = std::fs::File::create(self.data_dir.with_extension("log"))?;
        let child = Command::new(tollgate_binary())
            .arg("run")
            .args(["--node-id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin_port)])
            .args(["--cluster-listen", &self.cluster_address()])
            .args(["--proxy-listen", &format!("127.0.0.1:{}", self.proxy_port)])
            .args(&self.extra_args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning tollgate")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// The node's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    /// `--admin-token` every node was started with.
    pub token: Option<String>,
    _dir: tempfile::TempDir,
    dir_path: PathBuf,
}

impl TestCluster {
    /// Starts `size` nodes bootstrapped with `--initial-cluster` and waits for a leader.
    pub async fn start(size: u64) -> anyhow::Result<TestCluster> {
        TestCluster::start_with(size, &[]).await
    }

    /// Starts nodes that require `--admin-token token`.
    pub async fn start_with_token(size: u64, token: &str) -> anyhow::Result<TestCluster> {
        TestCluster::launch(size, &["--admin-token", token], Some(token.to_string())).await
    }

    pub async fn start_with(size: u64, extra_args: &[&str]) -> anyhow::Result<TestCluster> {
        TestCluster::launch(size, extra_args, None).await
    }

    async fn launch(size: u64, extra_args: &[&str], token: Option<String>) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let dir_path = dir.path().to_path_buf();
        let mut nodes: Vec<TestNode> = (1..=size)
            .map(|id| TestNode {
                id,
                admin_port: free_port(),
                cluster_port: free_port(),
                proxy_port: free_port(),
                data_dir: dir_path.join(format!("node{id}")),
                extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
                child: None,
            })
            .collect();
        let members: Vec<String> = nodes.iter().map(|n| format!("{}={}", n.id, n.cluster_address())).collect();
        for node in &mut nodes {
            node.extra_args.extend(["--initial-cluster".to_string(), members.join(",")]);
            node.start()?;
        }
        let cluster = TestCluster { nodes, token, _dir: dir, dir_path };
        cluster.leader().await?;
        Ok(cluster)
    }

    /// Adds a node that joins through the running members (not started yet).
    pub fn add_joiner(&mut self, id: u64) -> &mut TestNode {
        let seeds: Vec<String> = self.nodes.iter().map(TestNode::cluster_address).collect();
        self.nodes.push(TestNode {
            id,
            admin_port: free_port(),
            cluster_port: free_port(),
            proxy_port: free_port(),
            data_dir: self.dir_path.join(format!("node{id}")),
            extra_args: vec!["--join".to_string(), seeds.join(",")],
            child: None,
        });
        self.nodes.last_mut().expect("just pushed")
    }

    pub fn node(&mut self, id: u64) -> &mut TestNode {
        self.nodes.iter_mut().find(|n| n.id == id).expect("known node id")
    }

    /// A client over every node.
    pub fn client(&self) -> AdminClient {
        self.authorised(AdminClient::new(self.nodes.iter().map(TestNode::admin_url)))
    }

    fn authorised(&self, client: AdminClient) -> AdminClient {
        match &self.token {
            Some(token) => client.with_token(token.clone()),
            None => client,
        }
    }

    /// A client for one node only.
    pub fn client_of(&self, id: u64) -> AdminClient {
        let node = self.nodes.iter().find(|n| n.id == id).expect("known node id");
        self.authorised(AdminClient::new([node.admin_url()]))
    }

    /// `/status` of one node.
    pub async fn status(&self, id: u64) -> Option<Value> {
        self.client_of(id).get("/status").await.ok().map(|reply| reply.body)
    }

    /// Waits until the running nodes agree on one leader; returns its id.
    pub async fn leader(&self) -> anyhow::Result<u64> {
        let running: Vec<u64> = self.nodes.iter().filter(|n| n.is_running()).map(|n| n.id).collect();
        eventually("a leader all running nodes agree on", CONVERGE_TIMEOUT, || async {
            let mut leaders = Vec::new();
            for id in &running {
                let status = self.status(*id).await?;
                leaders.push(status.get("leader_id")?.as_u64()?);
            }
            let first = *leaders.first()?;
            let agreed = leaders.iter().all(|l| *l == first) && running.contains(&first);
            agreed.then_some(first)
        })
        .await
    }

    /// Waits until every running node has applied at least `version`.
    pub async fn converged(&self, version: u64) -> anyhow::Result<()> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            eventually(&format!("node {} to apply {version}", node.id), CONVERGE_TIMEOUT, || async {
                let applied = self.status(node.id).await?.get("config_version")?.as_u64()?;
                (applied >= version).then_some(())
            })
            .await?;
        }
        Ok(())
    }
}
