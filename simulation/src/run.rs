//! One seed: a whole cluster under turmoil, a workload, faults, and the invariants.
//!
//! A run has two phases. In the **safety** phase (`duration`), admin clients write,
//! delete and read services through every node while the seed's faults hit the
//! cluster (one at a time: a node isolated, a one-way partition, a node's links held,
//! a client cut off from a node, a crash with the loss of unsynced writes and a
//! restart). Then the **liveness** phase heals everything and requires every node to
//! apply and serve the same last version within [`LIVENESS_BOUND`]; final reads of
//! every key join the history. The invariants are checked on what the clients saw:
//! CFG1 (an acknowledged write that nothing followed is what the final read sees),
//! CFG2 (the linearizability checker over the whole history), CFG3 (no node's
//! applied config version goes down, across restarts), CFG4 (convergence) and RL1
//! (what two proxy clients got through a cluster rate limit, per second and minute
//! window, never over the limit, or over by no more than `node/QUOTA.md`'s bound with
//! `fault_tolerant: true`).
//!
//! Everything the run does is appended to its trace; the trace's FNV-1a hash is the
//! run's fingerprint: the same seed gives the same hash, in one process or another.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;
use tollgate_node::config::NodeConfig;

use crate::linearizability::{self, Action, Operation, Verdict};

/// How long after healing every node must serve the same last version.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(20);
/// Admin clients writing and reading at once.
pub const CLIENTS: u64 = 3;
/// Services the clients work on (one register each).
pub const KEYS: usize = 4;
/// Longest a client waits for an answer before calling it indeterminate.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the status monitor asks every node for its applied version.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// The ports every simulated node listens on.
const ADMIN_PORT: u16 = 8001;
const PROXY_PORT: u16 = 8000;
const CLUSTER_PORT: u16 = 7946;
const ADMIN_TOKEN: &str = "sim-admin-token";
const CLUSTER_SECRET: &str = "sim-cluster-secret";
/// The cluster rate limit the proxy clients run into (one key: they share an address).
pub const LIMIT_SECOND: u64 = 8;
pub const LIMIT_MINUTE: u64 = 60;
/// Proxy clients sending through every node at once.
pub const PROXY_CLIENTS: u64 = 2;
const UPSTREAM_PORT: u16 = 80;
/// Longest a proxy client waits for an answer.
const PROXY_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections a simulated listener queues before accepting them.
const TCP_BACKLOG: usize = 4096;
/// The first fault comes after the cluster had this long to elect.
const FIRST_FAULT_AT: Duration = Duration::from_secs(2);

/// What one run is.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub nodes: u64,
    /// The safety phase.
    pub duration: Duration,
    /// A planted bug (test-only), to show the invariants catch it.
    pub plant: Option<tollgate_raft_store::planted::Bug>,
}

/// An invariant that did not hold.
#[derive(Clone, Debug)]
pub struct Failure {
    pub invariant: &'static str,
    pub detail: String,
    /// The events that led there, readable.
    pub history: String,
}

/// What one run found.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    /// FNV-1a of the trace.
    pub trace: u64,
    pub operations: usize,
    pub faults: usize,
    pub failure: Option<Failure>,
    /// Every event, one line each (`--verbose`).
    pub events: Vec<String>,
}

/// The run's event log.
#[derive(Default)]
struct Trace {
    events: Vec<String>,
}

impl Trace {
    /// An event of a host, at its simulated time.
    fn push(&mut self, line: String) {
        self.push_at(Duration::from_millis(now_ms()), line);
    }

    /// An event of the driver (faults, healing), at the simulation's time.
    fn push_at(&mut self, at: Duration, line: String) {
        self.events.push(format!("{:>7} {line}", at.as_millis()));
    }

    fn hash(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.events.iter().flat_map(|line| line.bytes().chain(std::iter::once(b'\n'))) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    }
}

/// What the clients recorded.
#[derive(Default)]
struct Record {
    trace: Trace,
    history: Vec<Operation>,
    /// Per node: (time, applied config version) as `/status` reported it.
    statuses: BTreeMap<u64, Vec<(u64, u64)>>,
    converged: Option<Result<u64, String>>,
    faults: usize,
    /// The rate limit's `fault_tolerant`, once the proxy route is configured.
    rate_limited: Option<bool>,
    /// Proxy requests: (sent, answered, status).
    proxied: Vec<(u64, u64, u16)>,
}

type Shared = Rc<RefCell<Record>>;

/// Simulated milliseconds since the run began.
fn now_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

fn host(id: u64) -> String {
    format!("node{id}")
}

fn data_dir(id: u64) -> PathBuf {
    PathBuf::from(format!("/sim/{}", host(id)))
}

fn node_config(id: u64, nodes: u64) -> NodeConfig {
    let any = |port: u16| std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let mut config = NodeConfig::new(id, data_dir(id));
    config.proxy_listen = any(PROXY_PORT);
    config.admin_listen = any(ADMIN_PORT);
    config.cluster_listen = any(CLUSTER_PORT);
    config.advertise = format!("{}:{CLUSTER_PORT}", host(id));
    config.initial_cluster = (1..=nodes).map(|peer| (peer, format!("{}:{CLUSTER_PORT}", host(peer)))).collect();
    config.workers = 1;
    config.access_log = false;
    config.admin_token = Some(ADMIN_TOKEN.to_string());
    config.cluster_secret = Some(CLUSTER_SECRET.to_string());
    config
}

/// Runs one seed.
pub fn run(options: &Options) -> Outcome {
    crate::env::install();
    crate::env::begin_run(options.seed);
    tollgate_raft_store::planted::plant(options.plant);
    let mut faults_rng = StdRng::seed_from_u64(options.seed ^ 0xfa017);
    let safety_end = FIRST_FAULT_AT + options.duration;
    let mut sim = turmoil::Builder::new()
        .rng_seed(options.seed)
        .simulation_duration(safety_end + LIVENESS_BOUND + Duration::from_secs(60))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(8))
        // A listener's backlog of connections not accepted yet: Linux's default
        // (`net.core.somaxconn`). turmoil's own (64) panics when full, where a kernel
        // drops the SYN; a held link released at once delivers more than 64.
        .tcp_capacity(TCP_BACKLOG)
        .build();
    let nodes = options.nodes;
    for id in 1..=nodes {
        sim.host(host(id), move || async move {
            let handle = tollgate_node::node::start(node_config(id, nodes), None).await?;
            std::future::pending::<()>().await;
            drop(handle);
            Ok(())
        });
    }
    sim.host("upstream", upstream);
    let record: Shared = Rc::default();
    sim.client("admin", workload(options.clone(), safety_end, record.clone()));

    let schedule = schedule(&mut faults_rng, nodes, FIRST_FAULT_AT, safety_end);
    let mut pending = schedule.into_iter().peekable();
    let mut active: Vec<Heal> = Vec::new();
    let mut healed = false;
    let mut error = None;
    loop {
        let now = sim.elapsed();
        while let Some((at, _)) = pending.peek() {
            if *at > now {
                break;
            }
            let Some((_, fault)) = pending.next() else { break };
            heal(&mut sim, nodes, &mut active, &record, true);
            active.push(inflict(&mut sim, nodes, fault, &record, &mut faults_rng));
        }
        heal(&mut sim, nodes, &mut active, &record, false);
        if now >= safety_end && !healed {
            heal(&mut sim, nodes, &mut active, &record, true);
            record.borrow_mut().trace.push_at(now, "healed".to_string());
            healed = true;
        }
        // A panic in the simulated network (turmoil's own limits) or in a node is a
        // finding like any other: reported with the seed's history, not a crash.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.step())) {
            Ok(Ok(true)) => break,
            Ok(Ok(false)) => {}
            Ok(Err(failure)) => {
                error = Some(failure.to_string());
                break;
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                    .unwrap_or_default();
                error = Some(format!("panicked: {message}"));
                break;
            }
        }
    }
    let mut record = record.borrow_mut();
    let failure = match error {
        Some(error) => Some(Failure {
            invariant: "simulation",
            detail: format!("a host failed: {error}"),
            history: tail(&record.trace.events, 30),
        }),
        None => check(&record).or_else(|| check_rate_limit(&record, nodes)),
    };
    let trace = record.trace.hash();
    Outcome {
        seed: options.seed,
        trace,
        operations: record.history.len(),
        faults: record.faults,
        failure,
        events: std::mem::take(&mut record.trace.events),
    }
}

/// A fault the seed chose.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The node cannot reach the other nodes nor they it.
    Isolate { node: u64, for_ms: u64 },
    /// What `from` sends to `to` is lost.
    OneWay { from: u64, to: u64, for_ms: u64 },
    /// The node's links to the other nodes hold every message (a long pause).
    Hold { node: u64, for_ms: u64 },
    /// The admin client cannot reach the node.
    CutClient { node: u64, for_ms: u64 },
    /// The node's machine dies (unsynced writes kept, lost or torn) and restarts.
    Crash { node: u64, for_ms: u64 },
    /// The upstream target dies, and revives.
    UpstreamDown { for_ms: u64 },
}

/// How to undo an inflicted fault, and when.
struct Heal {
    at: Duration,
    fault: Fault,
}

fn schedule(rng: &mut StdRng, nodes: u64, from: Duration, until: Duration) -> Vec<(Duration, Fault)> {
    let mut faults = Vec::new();
    let mut at = from;
    loop {
        at += Duration::from_millis(rng.gen_range(500..2_500));
        if at >= until {
            return faults;
        }
        let node = rng.gen_range(1..=nodes);
        let for_ms = rng.gen_range(300..3_000);
        let fault = match rng.gen_range(0..6) {
            0 => Fault::Isolate { node, for_ms },
            1 => {
                let to = (node % nodes) + 1;
                Fault::OneWay { from: node, to, for_ms }
            }
            2 => Fault::Hold { node, for_ms },
            3 => Fault::CutClient { node, for_ms },
            4 => Fault::Crash { node, for_ms },
            _ => Fault::UpstreamDown { for_ms },
        };
        faults.push((at, fault));
        at += Duration::from_millis(for_ms);
    }
}

fn others(node: u64, nodes: u64) -> Vec<String> {
    (1..=nodes).filter(|other| *other != node).map(host).collect()
}

fn inflict(sim: &mut turmoil::Sim, nodes: u64, fault: Fault, record: &Shared, rng: &mut StdRng) -> Heal {
    let now = sim.elapsed();
    let mut record = record.borrow_mut();
    record.faults += 1;
    let (line, for_ms) = match fault {
        Fault::Isolate { node, for_ms } => {
            for other in others(node, nodes) {
                sim.partition(host(node), other);
            }
            (format!("fault isolate {}", host(node)), for_ms)
        }
        Fault::OneWay { from, to, for_ms } => {
            sim.partition_oneway(host(from), host(to));
            (format!("fault drop {} -> {}", host(from), host(to)), for_ms)
        }
        Fault::Hold { node, for_ms } => {
            for other in others(node, nodes) {
                sim.hold(host(node), other);
            }
            (format!("fault hold {}", host(node)), for_ms)
        }
        Fault::CutClient { node, for_ms } => {
            sim.partition("admin", host(node));
            (format!("fault cut admin from {}", host(node)), for_ms)
        }
        Fault::Crash { node, for_ms } => {
            sim.crash(host(node));
            let report = crate::env::disk(&data_dir(node)).crash(rng.next_u64());
            (
                format!(
                    "fault crash {} (unsynced writes: {} kept, {} lost, {} torn)",
                    host(node),
                    report.kept,
                    report.lost,
                    report.torn
                ),
                for_ms,
            )
        }
        Fault::UpstreamDown { for_ms } => {
            sim.crash("upstream");
            ("fault upstream down".to_string(), for_ms)
        }
    };
    record.trace.push_at(now, format!("{line} for {for_ms} ms"));

    Heal { at: now + Duration::from_millis(for_ms), fault }
}

/// Undoes the active faults whose time has come, or all of them (`all`).
fn heal(sim: &mut turmoil::Sim, nodes: u64, active: &mut Vec<Heal>, record: &Shared, all: bool) {
    let now = sim.elapsed();
    let (due, kept): (Vec<Heal>, Vec<Heal>) = active.drain(..).partition(|heal| all || heal.at <= now);
    *active = kept;
    for heal in due {
        let line = match heal.fault {
            Fault::Isolate { node, .. } => {
                for other in others(node, nodes) {
                    sim.repair(host(node), other);
                }
                format!("heal isolate {}", host(node))
            }
            Fault::OneWay { from, to, .. } => {
                sim.repair_oneway(host(from), host(to));
                format!("heal drop {} -> {}", host(from), host(to))
            }
            Fault::Hold { node, .. } => {
                for other in others(node, nodes) {
                    sim.release(host(node), other);
                }
                format!("heal hold {}", host(node))
            }
            Fault::CutClient { node, .. } => {
                sim.repair("admin", host(node));
                format!("heal admin to {}", host(node))
            }
            Fault::Crash { node, .. } => {
                sim.bounce(host(node));
                format!("restart {}", host(node))
            }
            Fault::UpstreamDown { .. } => {
                sim.bounce("upstream");
                "upstream revived".to_string()
            }
        };
        record.borrow_mut().trace.push_at(sim.elapsed(), line);
    }
}

/// The upstream target: answers every request with 200.
async fn upstream() -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", UPSTREAM_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::task::spawn_local(async move {
            let answer = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), answer).await;
        });
    }
}

/// A service on the upstream, a route `/rl` to it, and a cluster rate limit on it
/// (`fault_tolerant` as the seed says); each step sent through the nodes in turn
/// until one answers, a conflict meaning an earlier attempt succeeded.
async fn configure_rate_limit(nodes: u64, fault_tolerant: bool, record: &Shared) -> bool {
    let plugin = serde_json::json!({
        "name": "rate-limiting",
        "config": {
            "second": LIMIT_SECOND,
            "minute": LIMIT_MINUTE,
            "policy": "cluster",
            "fault_tolerant": fault_tolerant,
        },
    });
    let steps = [
        ("PUT", "/services/up", serde_json::json!({ "url": format!("http://upstream:{UPSTREAM_PORT}") })),
        ("POST", "/services/up/routes", serde_json::json!({ "name": "rl", "paths": ["/rl"] })),
        ("POST", "/services/up/plugins", plugin),
    ];
    // The node that acknowledged the last step: it had applied it when it answered.
    let mut acknowledged = 1;
    for (method, path, body) in steps {
        let mut done = false;
        for attempt in 0..20u64 {
            let node = attempt % nodes + 1;
            let answer = request(node, method, path, Some(body.to_string())).await;
            record.borrow_mut().trace.push(format!("setup {method} {path} via {} -> {}", host(node), show(&answer)));
            if matches!(answer, Ok((200 | 201 | 409, _))) {
                done = true;
                acknowledged = node;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !done {
            return false;
        }
    }
    // Proxy traffic starts once every node serves the limit: before that a node that
    // has the route and not yet the plugin admits without it, which is not the limit
    // being broken (the config has not reached it).
    let Some(version) =
        status(acknowledged).await.and_then(|status| status.get("config_version").and_then(Value::as_u64))
    else {
        return false;
    };
    for _ in 0..40 {
        let mut serving = 0;
        for node in 1..=nodes {
            let published =
                status(node).await.and_then(|status| status.get("published_version").and_then(Value::as_u64));
            if published.is_some_and(|published| published >= version) {
                serving += 1;
            }
        }
        if serving == nodes {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn proxy_client(client: u64, mut rng: StdRng, nodes: u64, safety_end: Duration, record: Shared) {
    while turmoil::sim_elapsed().unwrap_or_default() < safety_end {
        let node = rng.gen_range(1..=nodes);
        let call = now_ms();
        let answer = exchange(node, PROXY_PORT, "GET", "/rl", None, PROXY_TIMEOUT).await;
        let ret = now_ms();
        let status = answer.as_ref().map_or(0, |(status, _)| *status);
        {
            let mut record = record.borrow_mut();
            record.trace.push(format!("p{client} GET /rl via {} -> {}", host(node), show(&answer)));
            record.proxied.push((call, ret, status));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
    }
}

/// The admin side: clients, the status monitor, then healing's checks and the final
/// reads.
async fn workload(options: Options, safety_end: Duration, record: Shared) -> turmoil::Result {
    tokio::time::sleep(FIRST_FAULT_AT / 4).await;
    let fault_tolerant = options.seed.is_multiple_of(2);
    if configure_rate_limit(options.nodes, fault_tolerant, &record).await {
        record.borrow_mut().rate_limited = Some(fault_tolerant);
    }
    let mut clients = Vec::new();
    if record.borrow().rate_limited.is_some() {
        for client in 1..=PROXY_CLIENTS {
            let rng = StdRng::seed_from_u64(options.seed.wrapping_mul(37).wrapping_add(client));
            clients.push(tokio::task::spawn_local(proxy_client(
                client,
                rng,
                options.nodes,
                safety_end,
                record.clone(),
            )));
        }
    }
    for client in 1..=CLIENTS {
        let rng = StdRng::seed_from_u64(options.seed.wrapping_mul(31).wrapping_add(client));
        clients.push(tokio::task::spawn_local(admin_client(client, rng, options.nodes, safety_end, record.clone())));
    }
    let monitor = tokio::task::spawn_local(status_monitor(options.nodes, record.clone()));
    for client in clients {
        let _ = client.await;
    }
    // Liveness: every fault is healed at `safety_end`; every node must now apply
    // and serve the same last version within the bound.
    let deadline = safety_end + LIVENESS_BOUND;
    while turmoil::sim_elapsed().unwrap_or_default() < safety_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let converged = loop {
        if let Some(version) = converged(options.nodes).await {
            break Ok(version);
        }
        if turmoil::sim_elapsed().unwrap_or_default() >= deadline {
            break Err(describe_statuses(options.nodes).await);
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
    };
    record.borrow_mut().trace.push(format!("converged: {converged:?}"));
    let ok = converged.is_ok();
    record.borrow_mut().converged = Some(converged);
    if ok {
        // Final reads: what survived, through each node in turn.
        for key in 0..KEYS {
            let node = (key as u64 % options.nodes) + 1;
            final_read(node, key, &record).await;
        }
    }
    monitor.abort();
    Ok(())
}

async fn final_read(node: u64, key: usize, record: &Shared) {
    for _ in 0..10 {
        let call = now_ms();
        let path = format!("/services/s{key}");
        let answer = request(node, "GET", &path, None).await;
        let ret = now_ms();
        if let Some(observed) = read_outcome(&answer) {
            let mut record = record.borrow_mut();
            record.trace.push(format!("final read s{key} via {} -> {observed:?}", host(node)));
            record.history.push(Operation {
                client: 0,
                key: format!("s{key}"),
                action: Action::Read { observed },
                call,
                ret: Some(ret),
            });
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    record.borrow_mut().trace.push(format!("final read s{key} via {} failed", host(node)));
}

/// What a read answer says: `Some(value)` for 200, `Some(None)` for 404, `None`
/// when it says nothing (an error, no answer).
fn read_outcome(answer: &Result<(u16, String), String>) -> Option<Option<String>> {
    match answer {
        Ok((200, body)) => {
            let value: Value = serde_json::from_str(body).ok()?;
            Some(value.get("host").and_then(Value::as_str).map(str::to_string))
        }
        Ok((404, _)) => Some(None),
        _ => None,
    }
}

async fn admin_client(client: u64, mut rng: StdRng, nodes: u64, safety_end: Duration, record: Shared) {
    let mut written = 0u64;
    tokio::time::sleep(FIRST_FAULT_AT / 2).await;
    while turmoil::sim_elapsed().unwrap_or_default() < safety_end {
        let node = rng.gen_range(1..=nodes);
        let key = format!("s{}", rng.gen_range(0..KEYS));
        let path = format!("/services/{key}");
        let call = now_ms();
        match rng.gen_range(0..10) {
            0..=3 => {
                written += 1;
                let value = format!("c{client}-{written}.sim");
                let body = serde_json::json!({ "host": value }).to_string();
                let answer = request(node, "PUT", &path, Some(body)).await;
                let ok = matches!(answer, Ok((200 | 201, _)));
                let ret = ok.then(now_ms);
                let mut record = record.borrow_mut();
                record.trace.push(format!("c{client} PUT {key} {value} via {} -> {}", host(node), show(&answer)));
                record.history.push(Operation { client, key, action: Action::Write(Some(value)), call, ret });
            }
            4 => {
                let answer = request(node, "DELETE", &path, None).await;
                let ok = matches!(answer, Ok((204, _)));
                let ret = ok.then(now_ms);
                let mut record = record.borrow_mut();
                record.trace.push(format!("c{client} DELETE {key} via {} -> {}", host(node), show(&answer)));
                record.history.push(Operation { client, key, action: Action::Write(None), call, ret });
            }
            5 => {
                // A local read: this node's view, not linearizable; traced only.
                let answer = request(node, "GET", &format!("{path}?consistency=local"), None).await;
                let observed = read_outcome(&answer);
                record.borrow_mut().trace.push(format!("c{client} GET {key} local via {} -> {observed:?}", host(node)));
            }
            _ => {
                let answer = request(node, "GET", &path, None).await;
                let ret = now_ms();
                let observed = read_outcome(&answer);
                let mut record = record.borrow_mut();
                record.trace.push(format!("c{client} GET {key} via {} -> {observed:?}", host(node)));
                if let Some(observed) = observed {
                    record.history.push(Operation {
                        client,
                        key,
                        action: Action::Read { observed },
                        call,
                        ret: Some(ret),
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;
    }
}

fn show(answer: &Result<(u16, String), String>) -> String {
    match answer {
        Ok((status, _)) => status.to_string(),
        Err(error) => error.clone(),
    }
}

async fn status_monitor(nodes: u64, record: Shared) {
    loop {
        for node in 1..=nodes {
            if let Some(status) = status(node).await {
                let version = status.get("config_version").and_then(Value::as_u64).unwrap_or_default();
                let mut record = record.borrow_mut();
                let at = now_ms();
                record.statuses.entry(node).or_default().push((at, version));
            }
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
    }
}

async fn status(node: u64) -> Option<Value> {
    match request(node, "GET", "/status", None).await {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// The version every node applied and serves, when they all agree.
async fn converged(nodes: u64) -> Option<u64> {
    let mut versions = Vec::new();
    for node in 1..=nodes {
        let status = status(node).await?;
        let applied = status.get("config_version").and_then(Value::as_u64)?;
        let published = status.get("published_version").and_then(Value::as_u64)?;
        if applied != published {
            return None;
        }
        versions.push(applied);
    }
    versions.windows(2).all(|pair| pair[0] == pair[1]).then(|| versions[0])
}

async fn describe_statuses(nodes: u64) -> String {
    let mut lines = Vec::new();
    for node in 1..=nodes {
        let line = match status(node).await {
            Some(status) => format!(
                "{}: config_version {} published_version {} role {} term {}",
                host(node),
                status["config_version"],
                status["published_version"],
                status["role"],
                status["term"]
            ),
            None => format!("{}: no status", host(node)),
        };
        lines.push(line);
    }
    lines.join("; ")
}

/// One admin request over a fresh simulated connection.
async fn request(node: u64, method: &str, path: &str, body: Option<String>) -> Result<(u16, String), String> {
    exchange(node, ADMIN_PORT, method, path, body, REQUEST_TIMEOUT).await
}

/// One request to a node's `port` over a fresh simulated connection.
async fn exchange(
    node: u64,
    port: u16,
    method: &str,
    path: &str,
    body: Option<String>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        let stream = turmoil::net::TcpStream::connect((host(node), port)).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::task::spawn_local(connection);
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host(node))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"));
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err("timeout".to_string()),
    }
}

/// The invariants, on what was recorded.
fn check(record: &Record) -> Option<Failure> {
    let history_of = |key: &str| {
        let lines: Vec<&String> = record
            .trace
            .events
            .iter()
            .filter(|line| {
                line.contains(&format!(" {key} "))
                    || line.contains("fault")
                    || line.contains("heal")
                    || line.contains("restart")
            })
            .collect();
        tail(&lines.into_iter().cloned().collect::<Vec<_>>(), 40)
    };
    // CFG4: convergence after healing.
    match &record.converged {
        Some(Ok(_)) => {}
        Some(Err(statuses)) => {
            return Some(Failure {
                invariant: "CFG4",
                detail: format!("not converged {} s after healing: {statuses}", LIVENESS_BOUND.as_secs()),
                history: tail(&record.trace.events, 30),
            })
        }
        None => {
            return Some(Failure {
                invariant: "CFG4",
                detail: "the run ended before convergence was checked".to_string(),
                history: tail(&record.trace.events, 30),
            })
        }
    }
    // CFG3: no node's applied version goes down.
    for (node, seen) in &record.statuses {
        for pair in seen.windows(2) {
            if pair[1].1 < pair[0].1 {
                return Some(Failure {
                    invariant: "CFG3",
                    detail: format!(
                        "{} reported config_version {} at {} ms, then {} at {} ms",
                        host(*node),
                        pair[0].1,
                        pair[0].0,
                        pair[1].1,
                        pair[1].0
                    ),
                    history: tail(&record.trace.events, 30),
                });
            }
        }
    }
    // CFG1: per key, when the last write invoked was acknowledged, the final read
    // sees it.
    let mut keys: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in &record.history {
        keys.entry(operation.key.as_str()).or_default().push(operation);
    }
    for (key, operations) in &keys {
        let last_write = operations
            .iter()
            .filter(|operation| operation.client != 0 && matches!(operation.action, Action::Write(_)))
            .max_by_key(|operation| operation.call);
        let final_read = operations.iter().find(|operation| operation.client == 0);
        if let (Some(write), Some(read)) = (last_write, final_read) {
            let Action::Write(written) = &write.action else { continue };
            let Action::Read { observed } = &read.action else { continue };
            let overlapping = operations.iter().any(|other| {
                !std::ptr::eq(*other, *write)
                    && other.client != 0
                    && matches!(other.action, Action::Write(_))
                    && other.ret.is_none_or(|ret| ret > write.call)
            });
            if write.ret.is_some() && !overlapping && observed != written {
                return Some(Failure {
                    invariant: "CFG1",
                    detail: format!(
                        "{key}: the last write, {written:?}, was acknowledged at {} ms; after healing the cluster answers {observed:?}",
                        write.ret.unwrap_or_default()
                    ),
                    history: history_of(key),
                });
            }
        }
    }
    // CFG2: the whole history.
    match linearizability::check(&record.history) {
        Verdict::Linearizable => None,
        Verdict::NotLinearizable { key, operations } => {
            let shortest = shortest_failing_prefix(&operations);
            let shown = &shortest[shortest.len().saturating_sub(CFG2_SHOWN_MAX)..];
            Some(Failure {
                invariant: "CFG2",
                detail: format!(
                    "no order of {key}'s first {} operations explains what the clients saw (the last {} shown)",
                    shortest.len(),
                    shown.len()
                ),
                history: linearizability::describe(shown),
            })
        }
        Verdict::Unknown { key } => Some(Failure {
            invariant: "CFG2",
            detail: format!("the checker could not decide on {key} within its step bound"),
            history: history_of(&key),
        }),
    }
}

/// RL1: within every window, what the proxy admitted is at most the limit: exactly
/// with `fault_tolerant: false`; with `true`, plus what each node may admit on its own
/// while cut off or leaderless, ⌈limit / voters⌉ per node (node/QUOTA.md). Only
/// requests sent and answered inside one window are counted: they were admitted in it.
fn check_rate_limit(record: &Record, nodes: u64) -> Option<Failure> {
    let fault_tolerant = record.rate_limited?;
    let epoch_ms = crate::env::EPOCH.as_millis() as u64;
    for (window, limit) in [("second", LIMIT_SECOND), ("minute", LIMIT_MINUTE)] {
        let size_ms = if window == "second" { 1_000 } else { 60_000 };
        let bound = if fault_tolerant { limit + nodes * limit.div_ceil(nodes) } else { limit };
        let mut admitted: BTreeMap<u64, u64> = BTreeMap::new();
        for (call, ret, status) in &record.proxied {
            let (first, last) = ((epoch_ms + call) / size_ms, (epoch_ms + ret) / size_ms);
            if *status == 200 && first == last {
                *admitted.entry(first).or_default() += 1;
            }
        }
        if let Some((start, count)) = admitted.iter().find(|(_, count)| **count > bound) {
            let from = start * size_ms - epoch_ms;
            return Some(Failure {
                invariant: "RL1",
                detail: format!(
                    "{count} requests admitted in the {window} from {from} ms, limit {limit} (fault_tolerant {fault_tolerant}: at most {bound})"
                ),
                history: record
                    .trace
                    .events
                    .iter()
                    .filter(|line| line.contains("/rl") || line.contains("fault") || line.contains("heal"))
                    .filter(|line| {
                        let at: u64 = line.split_whitespace().next().and_then(|t| t.parse().ok()).unwrap_or(0);
                        at + 1_000 >= from && at <= from + size_ms
                    })
                    .take(40)
                    .map(|line| format!("    {line}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
    }
    None
}

/// Operations of a failing key a report shows.
const CFG2_SHOWN_MAX: usize = 16;

/// The shortest prefix (in call order) of a key's operations that no order explains:
/// what led to the violation, without what came after.
fn shortest_failing_prefix(operations: &[Operation]) -> Vec<Operation> {
    for length in 1..operations.len() {
        if matches!(linearizability::check(&operations[..length]), Verdict::NotLinearizable { .. }) {
            return operations[..length].to_vec();
        }
    }
    operations.to_vec()
}

fn tail(events: &[String], lines: usize) -> String {
    let start = events.len().saturating_sub(lines);
    events[start..].iter().map(|line| format!("    {line}")).collect::<Vec<_>>().join("\n")
}
