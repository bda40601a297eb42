//! The hosts that are not nodes: the upstream target, the admin clients, the proxy
//! clients and the status monitor, and how they record what they saw.

use std::cell::Cell;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::linearizability::{Action, Operation};
use crate::world::*;

thread_local! {
    /// Whether the backup target fails its health probes.
    static SICK: Cell<bool> = const { Cell::new(false) };
}

/// Starts a run: the backup target is well.
pub(crate) fn begin_run() {
    SICK.with(|sick| sick.set(false));
}

/// Makes the backup target fail its health probes (`true`) or pass them again.
pub(crate) fn set_sick(sick: bool) {
    SICK.with(|flag| flag.set(sick));
}

/// The path the targets' health probes ask for.
const HEALTH_PATH: &str = "/health";

/// An upstream target named `name`: answers every request with 200 and its name,
/// except that the backup's health path answers 500 while it is sick.
pub(crate) async fn upstream(name: &'static str) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", UPSTREAM_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::task::spawn_local(async move {
            let answer = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| async move {
                let sick = name == BACKUP_HOST && request.uri().path() == HEALTH_PATH && SICK.with(Cell::get);
                let mut response = hyper::Response::new(Full::new(Bytes::from_static(name.as_bytes())));
                if sick {
                    *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                }
                Ok::<_, std::convert::Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), answer).await;
        });
    }
}

/// The proxy routes, what they lead to and what limits them.
/// - `/rl`: service `up` on the upstream target, a cluster rate limit of
///   [`LIMIT_SECOND`] per second and [`LIMIT_MINUTE`] per minute.
/// - `/long`: service `long` on the same target, [`LIMIT_LONG_SECOND`] per second and
///   [`LIMIT_LONG`] per hour, day, month and year: the long windows, which a run never
///   leaves, so what was used before a crash or a full restart must stay used.
/// - `/pooled`: service `pooled` on the upstream entity `pool` (targets `upstream` and
///   `backup`, active health checks every second).
///
/// Both limits are `policy: cluster`, `fault_tolerant` as the seed says.
pub(crate) const LIMIT_SECOND: u64 = 8;
pub(crate) const LIMIT_MINUTE: u64 = 60;
pub(crate) const LIMIT_LONG_SECOND: u64 = 4;
pub(crate) const LIMIT_LONG: u64 = 12;

/// The windows checked: (path, window, seconds, limit).
pub(crate) const WINDOWS: [(&str, &str, u64, u64); 7] = [
    ("/rl", "second", 1, LIMIT_SECOND),
    ("/rl", "minute", 60, LIMIT_MINUTE),
    ("/long", "second", 1, LIMIT_LONG_SECOND),
    ("/long", "hour", 3_600, LIMIT_LONG),
    ("/long", "day", 86_400, LIMIT_LONG),
    ("/long", "month", 2_592_000, LIMIT_LONG),
    ("/long", "year", 31_536_000, LIMIT_LONG),
];

/// The paths proxy clients send to, by weight (out of 10).
const PATHS: [(&str, u32); 3] = [("/rl", 4), ("/long", 3), ("/pooled", 3)];

/// Configures the routes of [`LIMIT_SECOND`]'s list; each step is sent through the
/// nodes in turn until one answers, a conflict meaning an earlier attempt succeeded.
/// Returns once every node serves the last step.
pub(crate) async fn configure_routes(nodes: u64, fault_tolerant: bool, record: &Shared) -> bool {
    let limit = |windows: Value| {
        let mut config = windows;
        config["policy"] = "cluster".into();
        config["fault_tolerant"] = fault_tolerant.into();
        serde_json::json!({ "name": "rate-limiting", "config": config })
    };
    let target = format!("http://{UPSTREAM_HOST}:{UPSTREAM_PORT}");
    let checks = serde_json::json!({ "active": {
        "type": "http",
        "http_path": HEALTH_PATH,
        "timeout": 1,
        "healthy": { "interval": 1, "successes": 1 },
        "unhealthy": { "interval": 1, "tcp_failures": 1, "timeouts": 1, "http_failures": 1 },
    }});
    let steps = [
        ("PUT", "/services/up", serde_json::json!({ "url": target })),
        ("POST", "/services/up/routes", serde_json::json!({ "name": "rl", "paths": ["/rl"] })),
        ("POST", "/services/up/plugins", limit(serde_json::json!({ "second": LIMIT_SECOND, "minute": LIMIT_MINUTE }))),
        ("PUT", "/services/long", serde_json::json!({ "url": target })),
        ("POST", "/services/long/routes", serde_json::json!({ "name": "long", "paths": ["/long"] })),
        (
            "POST",
            "/services/long/plugins",
            limit(serde_json::json!({
                "second": LIMIT_LONG_SECOND,
                "hour": LIMIT_LONG,
                "day": LIMIT_LONG,
                "month": LIMIT_LONG,
                "year": LIMIT_LONG,
            })),
        ),
        ("PUT", "/upstreams/pool", serde_json::json!({ "healthchecks": checks })),
        (
            "POST",
            "/upstreams/pool/targets",
            serde_json::json!({ "target": format!("{UPSTREAM_HOST}:{UPSTREAM_PORT}") }),
        ),
        ("POST", "/upstreams/pool/targets", serde_json::json!({ "target": format!("{BACKUP_HOST}:{UPSTREAM_PORT}") })),
        ("PUT", "/services/pooled", serde_json::json!({ "host": "pool", "port": UPSTREAM_PORT, "protocol": "http" })),
        ("POST", "/services/pooled/routes", serde_json::json!({ "name": "pooled", "paths": ["/pooled"] })),
    ];
    // The node that acknowledged the last step: it had applied it when it answered.
    let mut acknowledged = 1;
    for (method, path, body) in steps {
        let mut done = false;
        for attempt in 0..ATTEMPTS_MAX {
            let node = record.borrow().member(attempt % nodes + 1);
            let answer = request(node, method, path, Some(body.to_string())).await;
            record.borrow_mut().trace.push(format!("setup {method} {path} via {} -> {}", host(node), show(&answer)));
            if matches!(answer, Ok((200 | 201 | 409, _))) {
                done = true;
                acknowledged = node;
                break;
            }
            tokio::time::sleep(ATTEMPT_PAUSE).await;
        }
        if !done {
            return false;
        }
    }
    // Proxy traffic starts once every node serves the limits: before that a node that
    // has a route and not yet its plugin admits without it, which is not the limit
    // being broken (the config has not reached it).
    let Some(version) =
        status(acknowledged).await.and_then(|status| status.get("config_version").and_then(Value::as_u64))
    else {
        return false;
    };
    for _ in 0..SERVING_POLLS_MAX {
        let mut serving = 0;
        for node in members(record) {
            let published =
                status(node).await.and_then(|status| status.get("published_version").and_then(Value::as_u64));
            if published.is_some_and(|published| published >= version) {
                serving += 1;
            }
        }
        if serving == nodes {
            return true;
        }
        tokio::time::sleep(SERVING_POLL).await;
    }
    false
}

fn pick_path(rng: &mut StdRng) -> &'static str {
    let total: u32 = PATHS.iter().map(|(_, weight)| weight).sum();
    let mut draw = rng.gen_range(0..total);
    for (path, weight) in PATHS {
        if draw < weight {
            return path;
        }
        draw -= weight;
    }
    PATHS[0].0
}

pub(crate) async fn proxy_client(client: u64, mut rng: StdRng, nodes: u64, safety_end: Duration, record: Shared) {
    while turmoil::sim_elapsed().unwrap_or_default() < safety_end {
        let node = record.borrow().member(rng.gen_range(1..=nodes));
        let path = pick_path(&mut rng);
        let call = now_ms();
        let answer = exchange(node, PROXY_PORT, "GET", path, None, PROXY_TIMEOUT).await;
        let ret = now_ms();
        let status = answer.as_ref().map_or(0, |(status, _)| *status);
        {
            let mut record = record.borrow_mut();
            let from = match &answer {
                Ok((200, body)) => format!(" from {body}"),
                _ => String::new(),
            };
            record.trace.push(format!("p{client} GET {path} via {} -> {}{from}", host(node), show(&answer)));
            record.proxied.push(Proxied { path, node, call, ret, status });
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
    }
}

/// Answers in a row from the live target that show a node no longer routes to the
/// sick one (with two targets and round-robin, a node that still did would send it
/// about every other request).
const HEALTHY_STREAK: usize = 8;

/// HC1, after healing: every node, within [`HEALTH_BOUND`] of the heal, answers
/// [`HEALTHY_STREAK`] `/pooled` requests in a row from the live target.
async fn health_settled(safety_end: Duration, record: &Shared) -> Result<(), String> {
    let deadline = safety_end + HEALTH_BOUND;
    let mut unsettled = Vec::new();
    for node in members(record) {
        let mut last = String::new();
        let settled = loop {
            let mut streak = 0;
            let mut answers = Vec::new();
            while streak < HEALTHY_STREAK {
                let answer = exchange(node, PROXY_PORT, "GET", "/pooled", None, PROXY_TIMEOUT).await;
                let line = match &answer {
                    Ok((200, body)) => body.clone(),
                    other => show(other),
                };
                let good = line == UPSTREAM_HOST;
                answers.push(line);
                if !good {
                    break;
                }
                streak += 1;
            }
            if streak == HEALTHY_STREAK {
                break true;
            }
            last = answers.join(" ");
            if turmoil::sim_elapsed().unwrap_or_default() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        record.borrow_mut().trace.push(format!("HC1 {} settled {settled}", host(node)));
        if !settled {
            unsettled.push(format!("{} still answered [{last}]", host(node)));
        }
    }
    if unsettled.is_empty() {
        Ok(())
    } else {
        Err(unsettled.join("; "))
    }
}

/// The admin side: clients, the status monitor, then healing's checks and the final
/// reads.
pub(crate) async fn workload(options: Options, safety_end: Duration, record: Shared) -> turmoil::Result {
    tokio::time::sleep(FIRST_FAULT_AT / 4).await;
    let fault_tolerant = options.seed.is_multiple_of(2);
    if configure_routes(options.nodes, fault_tolerant, &record).await {
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
    let monitor = tokio::task::spawn_local(status_monitor(record.clone()));
    let operator = tokio::task::spawn_local(operator(record.clone()));
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
        if let Some(version) = converged(&record).await {
            break Ok(version);
        }
        if turmoil::sim_elapsed().unwrap_or_default() >= deadline {
            break Err(describe_statuses(&record).await);
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
    };
    record.borrow_mut().trace.push(format!("converged: {converged:?}"));
    // A replacement finishes within the same bound.
    let settled = loop {
        let settled = membership_settled(&record).await;
        if settled.is_ok() || turmoil::sim_elapsed().unwrap_or_default() >= deadline {
            break settled;
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
    };
    record.borrow_mut().trace.push(format!("membership settled: {settled:?}"));
    record.borrow_mut().membership = Some(settled);
    let ok = converged.is_ok();
    record.borrow_mut().converged = Some(converged);
    if ok {
        if record.borrow().rate_limited.is_some() {
            let health = health_settled(safety_end, &record).await;
            record.borrow_mut().health = Some(health);
        }
        // Final reads: what survived, through each node in turn.
        for key in 0..KEYS {
            let node = record.borrow().member((key as u64 % options.nodes) + 1);
            final_read(node, key, &record).await;
        }
    }
    monitor.abort();
    operator.abort();
    Ok(())
}

pub(crate) async fn final_read(node: u64, key: usize, record: &Shared) {
    for _ in 0..FINAL_READ_ATTEMPTS {
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
        tokio::time::sleep(FINAL_READ_PAUSE).await;
    }
    record.borrow_mut().trace.push(format!("final read s{key} via {} failed", host(node)));
}

/// What a read answer says: `Some(value)` for 200, `Some(None)` for 404, `None`
/// when it says nothing (an error, no answer).
pub(crate) fn read_outcome(answer: &Result<(u16, String), String>) -> Option<Option<String>> {
    match answer {
        Ok((200, body)) => {
            let value: Value = serde_json::from_str(body).ok()?;
            Some(value.get("host").and_then(Value::as_str).map(str::to_string))
        }
        Ok((404, _)) => Some(None),
        _ => None,
    }
}

pub(crate) async fn admin_client(client: u64, mut rng: StdRng, nodes: u64, safety_end: Duration, record: Shared) {
    let mut written = 0u64;
    tokio::time::sleep(FIRST_FAULT_AT / 2).await;
    while turmoil::sim_elapsed().unwrap_or_default() < safety_end {
        let node = record.borrow().member(rng.gen_range(1..=nodes));
        let key = format!("s{}", rng.gen_range(0..KEYS));
        let path = format!("/services/{key}");
        let call = now_ms();
        match rng.gen_range(0..20) {
            19 => declarative(client, node, &mut rng, &mut written, &record).await,
            0..=7 => {
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
            8..=9 => {
                let answer = request(node, "DELETE", &path, None).await;
                let ok = matches!(answer, Ok((204, _)));
                let ret = ok.then(now_ms);
                let mut record = record.borrow_mut();
                record.trace.push(format!("c{client} DELETE {key} via {} -> {}", host(node), show(&answer)));
                record.history.push(Operation { client, key, action: Action::Write(None), call, ret });
            }
            10..=11 => {
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

/// A declarative write: the whole config read (`GET /config`), the clients' keys
/// rewritten, and the document sent back (`POST /config`, one Raft entry replacing
/// everything). Each key gets a new value, is left out (removed), or keeps what the
/// read saw; to the checker that is one write per key, all at once. The routes,
/// limits and upstreams the setup made go back with their ids, so their quota and
/// balancers carry on.
async fn declarative(client: u64, node: u64, rng: &mut StdRng, written: &mut u64, record: &Shared) {
    let dumped = request(node, "GET", "/config", None).await;
    let Ok((200, body)) = &dumped else {
        record.borrow_mut().trace.push(format!("c{client} GET /config via {} -> {}", host(node), show(&dumped)));
        return;
    };
    let Ok(mut document) = serde_json::from_str::<Value>(body) else { return };
    let ours = |service: &Value| {
        service.get("name").and_then(Value::as_str).is_some_and(|name| (0..KEYS).any(|key| name == format!("s{key}")))
    };
    let before: Vec<Value> = document["services"].as_array().cloned().unwrap_or_default();
    let mut services: Vec<Value> = before.iter().filter(|service| !ours(service)).cloned().collect();
    let mut writes = Vec::new();
    for key in 0..KEYS {
        let name = format!("s{key}");
        let current = before.iter().find(|service| service["name"] == name.as_str());
        let value = match rng.gen_range(0..3) {
            0 => {
                *written += 1;
                let value = format!("c{client}-{written}.sim");
                services.push(serde_json::json!({ "name": name, "host": value }));
                Some(value)
            }
            1 => None,
            _ => current.map(|service| {
                services.push(service.clone());
                service["host"].as_str().unwrap_or_default().to_string()
            }),
        };
        writes.push((name, value));
    }
    document["services"] = Value::Array(services);
    let call = now_ms();
    let answer = request(node, "POST", "/config", Some(document.to_string())).await;
    let ret = matches!(answer, Ok((200 | 201 | 204, _))).then(now_ms);
    let mut record = record.borrow_mut();
    let shown: Vec<String> =
        writes.iter().map(|(key, value)| format!("{key} {}", value.as_deref().unwrap_or("-"))).collect();
    record.trace.push(format!("c{client} POST /config {} via {} -> {}", shown.join(", "), host(node), show(&answer)));
    for (key, value) in writes {
        record.history.push(Operation { client, key, action: Action::Write(value), call, ret });
    }
}

pub(crate) fn show(answer: &Result<(u16, String), String>) -> String {
    match answer {
        Ok((status, _)) => status.to_string(),
        Err(error) => error.clone(),
    }
}

pub(crate) async fn status_monitor(record: Shared) {
    loop {
        for node in members(&record) {
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

/// The voters `node` knows of (`GET /cluster`, its own view), sorted.
pub(crate) async fn voters(node: u64) -> Option<Vec<u64>> {
    let Ok((200, body)) = request(node, "GET", "/cluster?consistency=local", None).await else { return None };
    let cluster: Value = serde_json::from_str(&body).ok()?;
    let mut voters: Vec<u64> = cluster
        .get("members")?
        .as_array()?
        .iter()
        .filter(|member| member.get("voter").and_then(Value::as_bool) == Some(true))
        .filter_map(|member| member.get("node_id").and_then(Value::as_u64))
        .collect();
    voters.sort_unstable();
    Some(voters)
}

/// The operator of a replacement: once the new node is a voter (it joined by
/// itself), removes the old one (`DELETE /cluster/members/{old}`) through the members
/// in turn, until one acknowledges it. Adding before removing keeps the voters at
/// least as many as the run's nodes, as an operator replacing a dead machine does.
pub(crate) async fn operator(record: Shared) {
    let mut attempt = 0u64;
    loop {
        let Some((old, new)) = record.borrow().replacing.first().copied() else {
            tokio::time::sleep(OPERATOR_POLL).await;
            continue;
        };
        let members = members(&record);
        attempt += 1;
        let via = members[attempt as usize % members.len()];
        if voters(via).await.is_some_and(|voters| voters.contains(&new)) {
            let answer = request(via, "DELETE", &format!("/cluster/members/{old}"), None).await;
            let done = matches!(answer, Ok((204, _)));
            let mut record = record.borrow_mut();
            record.trace.push(format!("operator remove {} via {} -> {}", host(old), host(via), show(&answer)));
            if done {
                record.replacing.remove(0);
                continue;
            }
        }
        tokio::time::sleep(OPERATOR_POLL).await;
    }
}

pub(crate) async fn status(node: u64) -> Option<Value> {
    match request(node, "GET", "/status", None).await {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// The version every node applied and serves, when they all agree.
pub(crate) async fn converged(record: &Shared) -> Option<u64> {
    let mut versions = Vec::new();
    for node in members(record) {
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

/// Whether the membership settled: no replacement is left to finish, and every
/// member's voters are the run's members. `Err` says what is not so.
pub(crate) async fn membership_settled(record: &Shared) -> Result<(), String> {
    if let Some((old, new)) = record.borrow().replacing.first() {
        return Err(format!("the removal of {} (replaced by {}) is not done", host(*old), host(*new)));
    }
    let members = members(record);
    let mut expected = members.clone();
    expected.sort_unstable();
    for node in members {
        match voters(node).await {
            Some(voters) if voters == expected => {}
            seen => return Err(format!("{} has voters {seen:?}, not {expected:?}", host(node))),
        }
    }
    Ok(())
}

pub(crate) async fn describe_statuses(record: &Shared) -> String {
    let mut lines = Vec::new();
    for node in members(record) {
        let line = match status(node).await {
            Some(status) => format!(
                "{}: config_version {} published_version {} role {} term {} voters {:?}",
                host(node),
                status["config_version"],
                status["published_version"],
                status["role"],
                status["term"],
                voters(node).await,
            ),
            None => format!("{}: no status", host(node)),
        };
        lines.push(line);
    }
    lines.join("; ")
}

/// One admin request over a fresh simulated connection.
pub(crate) async fn request(
    node: u64,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String), String> {
    exchange(node, ADMIN_PORT, method, path, body, REQUEST_TIMEOUT).await
}

/// One request to a node's `port` over a fresh simulated connection.
pub(crate) async fn exchange(
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
