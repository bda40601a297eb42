//! Harness for end-to-end tests: real `tollgate` processes on free loopback ports, each
//! with its own data directory, that tests can kill -9, stop and restart.
//!
//! Nothing here sleeps to wait: [`eventually`] polls a condition until a deadline.

pub mod netns;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tollgate_client::AdminClient;

pub mod storm;

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

/// `--name value` from the command line of a benchmark binary, or `default`.
pub fn cli_arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Where [`free_port`] hands out ports: below Linux's ephemeral range (32768–60999),
/// so a port handed to a node cannot meanwhile be given by the kernel to some other
/// socket bound to port 0 (an upstream in another test of the same binary).
const FREE_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// The next candidate from [`FREE_PORTS`]. Ports go out in turn from a start that
/// depends on the process id, so test binaries and the tests within one do not pick
/// the same port.
fn next_port_candidate() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(FREE_PORTS.end - FREE_PORTS.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    FREE_PORTS.start + (NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16
}

/// A free loopback port for another process (a node) to take: bound, then released.
/// Between the release and the other process's bind, a third party may take it; a
/// listener in this process uses [`listen_on_free_port`], which has no such window.
pub fn free_port() -> u16 {
    for _ in FREE_PORTS {
        let port = next_port_candidate();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().expect("local addr").port()
}

/// A loopback listener in this process on a port from [`FREE_PORTS`], bound in one
/// step: a port someone else holds (another test run on this machine, say) is
/// skipped instead of failing the test with "address in use" as a check-then-bind
/// could. The range, not port 0, so the port can be bound again after the listener
/// is dropped (a target brought back) without meeting a connection's ephemeral port.
pub async fn listen_on_free_port() -> anyhow::Result<tokio::net::TcpListener> {
    for _ in FREE_PORTS {
        if let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", next_port_candidate())).await {
            return Ok(listener);
        }
    }
    Ok(tokio::net::TcpListener::bind("127.0.0.1:0").await?)
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
    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy_port)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn cluster_address(&self) -> String {
        format!("127.0.0.1:{}", self.cluster_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        // Appended: a restarted node's log follows its earlier runs'.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data_dir.with_extension("log"))?;
        let mut command = Command::new(tollgate_binary());
        command
            .arg("run")
            .args(["--node-id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin_port)])
            .args(["--cluster-listen", &self.cluster_address()])
            .args(["--proxy-listen", &format!("127.0.0.1:{}", self.proxy_port)])
            .args(&self.extra_args);
        self.child = Some(spawn_logged(&mut command, log)?);
        Ok(())
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes with its sockets open, as a node stalled by a long
    /// GC pause, a swapped-out page or a hung disk would. [`TestNode::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`TestNode::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([signal, &pid.to_string()]).status();
        }
    }

    /// SIGTERM, without waiting: the node stops gracefully ([`TestNode::wait_exit`]).
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Whether the process has exited, and how (reaped once it has).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
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

/// Which request path a test's nodes use: the direct HTTP/1.1 path where it applies
/// (the default), or hyper for every request (`--proxy-direct off`). The proxy,
/// plugin and direct-path suites run in both (tests/tests/suites/, included by one
/// test file per mode), the way linkerd2-proxy runs its HTTP/1 suite in two
/// topologies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Direct,
    Hyper,
}

impl ProxyMode {
    /// The node flags of this mode.
    pub fn args(self) -> &'static [&'static str] {
        match self {
            ProxyMode::Direct => &[],
            ProxyMode::Hyper => &["--proxy-direct", "off"],
        }
    }

    /// `size` nodes in this mode, with `extra_args`.
    pub async fn cluster(self, size: u64, extra_args: &[&str]) -> anyhow::Result<TestCluster> {
        let mut args: Vec<&str> = extra_args.to_vec();
        args.extend(self.args());
        TestCluster::start_with(size, &args).await
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

    /// Starts one node per entry of `per_node`, each with its own extra flags (node 2
    /// with `--proxy-direct off`, say).
    pub async fn start_each(per_node: &[&[&str]]) -> anyhow::Result<TestCluster> {
        let args: Vec<Vec<String>> = per_node.iter().map(|args| args.iter().map(|s| s.to_string()).collect()).collect();
        TestCluster::launch_each(args, None).await
    }

    async fn launch(size: u64, extra_args: &[&str], token: Option<String>) -> anyhow::Result<TestCluster> {
        let args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        TestCluster::launch_each((0..size).map(|_| args.clone()).collect(), token).await
    }

    /// Starts `size` nodes with mutual TLS on the cluster port (a CA and node
    /// certificates made by `tollgate certs init` in the cluster's directory, see
    /// [`TestCluster::certs`]) and `extra_args`.
    pub async fn start_with_tls(size: u64, extra_args: &[&str]) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        let ids: Vec<String> = (1..=size).map(|id| id.to_string()).collect();
        let made = Command::new(tollgate_binary())
            .args(["certs", "init", "--out"])
            .arg(&certs)
            .args(["--nodes", &ids.join(",")])
            .stdout(Stdio::null())
            .status()
            .context("running tollgate certs init")?;
        anyhow::ensure!(made.success(), "tollgate certs init failed");
        let per_node = (1..=size)
            .map(|id| {
                let mut args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
                let file = |name: String| certs.join(name).to_string_lossy().into_owned();
                args.extend(["--cluster-ca".into(), file("ca.pem".into())]);
                args.extend(["--cluster-cert".into(), file(format!("node-{id}.pem"))]);
                args.extend(["--cluster-key".into(), file(format!("node-{id}-key.pem"))]);
                args
            })
            .collect();
        TestCluster::launch_in(dir, per_node, None).await
    }

    /// The directory `start_with_tls` made the certificates in.
    pub fn certs(&self) -> PathBuf {
        self.dir_path.join("certs")
    }

    async fn launch_each(per_node: Vec<Vec<String>>, token: Option<String>) -> anyhow::Result<TestCluster> {
        TestCluster::launch_in(tempfile::tempdir()?, per_node, token).await
    }

    async fn launch_in(
        dir: tempfile::TempDir,
        per_node: Vec<Vec<String>>,
        token: Option<String>,
    ) -> anyhow::Result<TestCluster> {
        let dir_path = dir.path().to_path_buf();
        let mut nodes: Vec<TestNode> = per_node
            .into_iter()
            .zip(1..)
            .map(|(extra_args, id)| TestNode {
                id,
                admin_port: free_port(),
                cluster_port: free_port(),
                proxy_port: free_port(),
                data_dir: dir_path.join(format!("node{id}")),
                extra_args,
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

    /// Waits until every running node's data path serves at least `version`.
    pub async fn published(&self, version: u64) -> anyhow::Result<()> {
        self.every_node_reaches("published_version", version).await
    }

    /// Waits until every running node has applied at least `version`.
    pub async fn converged(&self, version: u64) -> anyhow::Result<()> {
        self.every_node_reaches("config_version", version).await
    }

    /// Waits until `/status` field `field` is at least `version` on every running node.
    async fn every_node_reaches(&self, field: &str, version: u64) -> anyhow::Result<()> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            eventually(&format!("node {} to reach {field} {version}", node.id), CONVERGE_TIMEOUT, || async {
                let reached = self.status(node.id).await?.get(field)?.as_u64()?;
                (reached >= version).then_some(())
            })
            .await?;
        }
        Ok(())
    }
}

/// The real wall clock. The nodes under test are real processes on it; the lint that
/// sends the node's own reads through `clock::wall` does not apply to what tests compare
/// with them.
#[allow(clippy::disallowed_methods)]
pub fn system_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

/// Reads one request head from a raw upstream connection into `buf` and returns it,
/// leaving whatever followed it (a body, the next request) in `buf`; `None` once the
/// peer closed or failed before a whole head arrived.
pub async fn read_request_head(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => buf.extend_from_slice(&chunk[..read]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    Some(head)
}

/// The nodes' log filter: `TOLLGATE_TEST_LOG` when set (`info,openraft=info` shows
/// elections, to chase a fault), else this.
pub const NODE_LOG_DEFAULT: &str = "info,openraft=warn";

/// Starts a `tollgate run` command with the tests' log level, its output in `log`.
pub fn spawn_logged(command: &mut Command, log: std::fs::File) -> anyhow::Result<Child> {
    let filter = std::env::var("TOLLGATE_TEST_LOG").unwrap_or_else(|_| NODE_LOG_DEFAULT.to_string());
    command
        .env("RUST_LOG", filter)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning tollgate")
}

/// `tollgate echo` as a separate process: the upstream the proxy tests talk to.
pub struct EchoServer {
    pub address: String,
    child: Child,
}

impl EchoServer {
    pub async fn start() -> anyhow::Result<EchoServer> {
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new(tollgate_binary())
            .args(["echo", "--listen", &address])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning tollgate echo")?;
        let echo = EchoServer { address, child };
        eventually("the echo upstream to listen", CONVERGE_TIMEOUT, || async {
            tokio::net::TcpStream::connect(&echo.address).await.ok().map(|_| ())
        })
        .await?;
        Ok(echo)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy response: status, headers and the body (as JSON when it is JSON).
pub struct ProxyReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
}

/// Polls every node's `/upstreams/pool/health` until `target` shows `health` there;
/// returns the time it took.
pub async fn pool_health_everywhere(cluster: &TestCluster, target: &str, health: &str) -> anyhow::Result<Duration> {
    let started = tokio::time::Instant::now();
    for node in &cluster.nodes {
        eventually(&format!("node {} to see {target} {health}", node.id), Duration::from_secs(20), || async {
            let view = cluster.client_of(node.id).get("/upstreams/pool/health").await.ok()?;
            let found = view.body["data"].as_array()?.iter().any(|t| t["target"] == target && t["health"] == health);
            found.then_some(())
        })
        .await?;
    }
    Ok(started.elapsed())
}

/// A keep-alive HTTP client for proxy listeners.
#[derive(Clone)]
pub struct ProxyClient {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

impl Default for ProxyClient {
    fn default() -> Self {
        ProxyClient::new()
    }
}

impl ProxyClient {
    pub fn new() -> ProxyClient {
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
        ProxyClient { http }
    }

    /// One that speaks h2c (HTTP/2 with prior knowledge) to the proxy: every request
    /// takes the hyper adapter's path.
    pub fn h2c() -> ProxyClient {
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
        ProxyClient { http }
    }

    /// Sends one request through a proxy listener.
    pub async fn request(
        &self,
        proxy_url: &str,
        method: &str,
        host: Option<&str>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<ProxyReply> {
        let mut builder = http::Request::builder().method(method).uri(format!("{proxy_url}{path}"));
        if let Some(host) = host {
            builder = builder.header(http::header::HOST, host);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        self.send(builder.body(http_body_util::Full::new(bytes::Bytes::new()))?).await
    }

    /// Sends a request built by the caller (a body, say).
    pub async fn send(&self, request: http::Request<http_body_util::Full<bytes::Bytes>>) -> anyhow::Result<ProxyReply> {
        use http_body_util::BodyExt;
        let response = self.http.request(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(ProxyReply { status, headers, body })
    }
}

/// Sends one request through a proxy listener on a fresh connection.
pub async fn proxy_request(
    proxy_url: &str,
    method: &str,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<ProxyReply> {
    ProxyClient::new().request(proxy_url, method, host, path, headers).await
}

/// Writes raw bytes and reads until the proxy closes the connection.
pub async fn raw_exchange(proxy_url: &str, request: &[u8]) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy_url.trim_start_matches("http://")).await?;
    stream.write_all(request).await?;
    let mut answers = Vec::new();
    tokio::time::timeout(CONVERGE_TIMEOUT, stream.read_to_end(&mut answers)).await??;
    let text = String::from_utf8_lossy(&answers).into_owned();
    let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

/// The data of a chunked HTTP/1.1 body (as text); a body that is not chunked as it is.
pub fn dechunk(body: &str) -> String {
    let mut rest = body;
    let mut data = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else { return body.to_string() };
        let Ok(size) = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16) else {
            return body.to_string();
        };
        if size == 0 {
            return data;
        }
        let Some(chunk) = after.get(..size) else { return body.to_string() };
        data.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or_default();
    }
}

/// An upstream in the test process that answers every request `200 ok` and counts
/// what it received: what a rate limit let through.
pub struct CountingUpstream {
    pub address: String,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingUpstream {
    pub async fn start() -> anyhow::Result<CountingUpstream> {
        CountingUpstream::serve(listen_on_free_port().await?, 200)
    }

    /// On a given address (a target brought back where it was).
    pub async fn start_at(address: &str) -> anyhow::Result<CountingUpstream> {
        CountingUpstream::serve(tokio::net::TcpListener::bind(address).await?, 200)
    }

    /// One that answers every request with `status` (a failing target).
    pub async fn start_answering(status: u16) -> anyhow::Result<CountingUpstream> {
        CountingUpstream::serve(listen_on_free_port().await?, status)
    }

    fn serve(listener: tokio::net::TcpListener, status: u16) -> anyhow::Result<CountingUpstream> {
        let status = http::StatusCode::from_u16(status)?;
        let address = listener.local_addr()?.to_string();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request: http::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut response =
                            http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")));
                        *response.status_mut() = status;
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Ok(CountingUpstream { address, received, task })
    }

    /// Requests received so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One raw JSON exchange with an Admin API: the status and the body text exactly as
/// sent (the client's own parsing would flatten an error's `fields`).
pub async fn admin_exchange(
    admin_url: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin_url.trim_start_matches("http://")).await?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(CONVERGE_TIMEOUT, stream.read_to_end(&mut answer)).await??;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    Ok((status, text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()))
}

/// Base64 of `bytes`: the standard alphabet padded, or base64url (`url`) unpadded.
pub fn base64(bytes: &[u8], url: bool) -> String {
    let table: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let group = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(table[((group >> (18 - 6 * i)) & 63) as usize] as char);
            } else if !url {
                out.push('=');
            }
        }
    }
    out
}
