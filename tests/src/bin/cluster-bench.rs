//! Control-path benchmark on a real three-node cluster on loopback.
//!
//! 1. Ack → visible: `--writes` writes spread over the nodes; for each, the time from
//!    the acknowledgement until every node serves it with `?consistency=local`.
//! 2. Failover: the leader is killed with SIGKILL (`--kills` times), or frozen with
//!    SIGSTOP (`--pauses` times), and a write is sent through a survivor at once; the
//!    time from the fault until that write is acknowledged. A paused leader is resumed
//!    afterwards and must rejoin.
//! 3. Stability: `--idle-s` seconds with nothing happening, then `--load-s` seconds of
//!    keep-alive proxy traffic through all three nodes (`--load-clients` connections);
//!    every term change meanwhile is a spurious election.
//!
//! Run: `cargo build --release -p tollgate-node -p tollgate-tests &&
//!       target/release/cluster-bench [--writes 1000] [--kills 20] [--pauses 10]
//!       [--idle-s 600] [--load-s 600] [--load-clients 48] [--tls]`
//! Extra arguments after `--` go to every node (`-- --raft-election-min-ms 300`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tollgate_tests::{cli_arg, eventually, CountingUpstream, ProxyClient, TestCluster, CONVERGE_TIMEOUT};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Arguments after `--`, for every node.
fn node_args() -> Vec<String> {
    std::env::args().skip_while(|arg| arg != "--").skip(1).collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let writes = cli_arg("--writes", 1000);
    let kills = cli_arg("--kills", 5);
    let pauses = cli_arg("--pauses", 0);
    let idle_s = cli_arg("--idle-s", 0u64);
    let load_s = cli_arg("--load-s", 0u64);
    let load_clients = cli_arg("--load-clients", 48usize);
    let extra = node_args();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    // `--tls`: mutual TLS on the cluster port (certificates from `tollgate certs init`).
    let tls = std::env::args().take_while(|arg| arg != "--").any(|arg| arg == "--tls");
    let mut cluster =
        if tls { TestCluster::start_with_tls(3, &extra).await? } else { TestCluster::start_with(3, &extra).await? };
    println!("cluster port: {}", if tls { "mutual TLS" } else { "plain (loopback)" });
    if !extra.is_empty() {
        println!("node flags: {}", extra.join(" "));
    }
    ack_to_visible(&cluster, writes).await?;
    let mut failovers = Vec::new();
    for round in 0..kills {
        failovers.push(failover(&mut cluster, round, Fault::Kill).await?);
    }
    report("kill -9", &mut failovers);
    let mut stalls = Vec::new();
    for round in 0..pauses {
        stalls.push(failover(&mut cluster, round, Fault::Pause).await?);
    }
    report("SIGSTOP", &mut stalls);
    if idle_s > 0 {
        stability(&cluster, Duration::from_secs(idle_s), 0).await?;
    }
    if load_s > 0 {
        stability(&cluster, Duration::from_secs(load_s), load_clients).await?;
    }
    Ok(())
}

async fn ack_to_visible(cluster: &TestCluster, writes: usize) -> anyhow::Result<()> {
    if writes == 0 {
        return Ok(());
    }
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let clients: Vec<_> = ids.iter().map(|id| cluster.client_of(*id)).collect();
    let mut visible = Vec::with_capacity(writes);
    let mut acked = Vec::with_capacity(writes);
    for n in 0..writes {
        let body = json!({"name": format!("bench-{n}"), "url": "http://bench.internal:8080"});
        let sent = Instant::now();
        let reply = clients[n % clients.len()].post("/services", &body).await?;
        let ack = Instant::now();
        acked.push(ack - sent);
        let path = format!("/services/{}?consistency=local", reply.body["id"].as_str().expect("id"));
        let mut waiting: Vec<usize> = (0..clients.len()).collect();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for index in waiting {
                if clients[index].get(&path).await.is_err() {
                    still.push(index);
                }
            }
            waiting = still;
            if ack.elapsed() > CONVERGE_TIMEOUT {
                anyhow::bail!("write {n} not visible everywhere after {CONVERGE_TIMEOUT:?}");
            }
        }
        visible.push(ack.elapsed());
    }
    visible.sort();
    acked.sort();
    println!("writes: {writes} over {} nodes (round-robin)", clients.len());
    println!(
        "ack latency:           p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(percentile(&acked, 0.50)),
        ms(percentile(&acked, 0.99)),
        ms(*acked.last().expect("writes > 0"))
    );
    println!(
        "ack -> visible on all: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(percentile(&visible, 0.50)),
        ms(percentile(&visible, 0.99)),
        ms(*visible.last().expect("writes > 0"))
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Pause,
}

/// One leader fault; the time from it until a write through a survivor is acknowledged.
async fn failover(cluster: &mut TestCluster, round: usize, fault: Fault) -> anyhow::Result<Duration> {
    let leader = cluster.leader().await?;
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let survivor = *ids.iter().find(|id| **id != leader).expect("a survivor");
    let client = cluster.client_of(survivor);
    match fault {
        Fault::Kill => cluster.node(leader).kill9(),
        Fault::Pause => cluster.node(leader).pause(),
    }
    let faulted_at = Instant::now();
    let name = format!("failover-{}-{round}", if fault == Fault::Kill { "kill" } else { "pause" });
    let body = json!({"name": name, "host": "failover.internal"});
    let mut attempts = 0;
    eventually("a write through a survivor", CONVERGE_TIMEOUT, || {
        attempts += 1;
        async { client.post("/services", &body).await.ok().map(|_| ()) }
    })
    .await?;
    let elapsed = faulted_at.elapsed();
    let new_leader = client.get("/status").await?.body["leader_id"].as_u64().unwrap_or(0);
    println!(
        "{} leader {leader}: write through node {survivor} acknowledged after {} ms ({attempts} attempt(s)); leader now {new_leader}",
        if fault == Fault::Kill { "kill -9" } else { "SIGSTOP" },
        elapsed.as_millis()
    );
    match fault {
        Fault::Kill => cluster.node(leader).start()?,
        Fault::Pause => cluster.node(leader).resume(),
    }
    let version = client.get("/status").await?.body["config_version"].as_u64().unwrap_or(0);
    cluster.converged(version).await?;
    Ok(elapsed)
}

fn report(what: &str, times: &mut [Duration]) {
    if times.is_empty() {
        return;
    }
    times.sort();
    println!(
        "failover after {what} over {} faults: median {} ms, worst {} ms",
        times.len(),
        percentile(times, 0.5).as_millis(),
        times.last().expect("not empty").as_millis()
    );
}

/// Each node's term.
async fn terms(cluster: &TestCluster) -> Vec<u64> {
    let mut terms = Vec::new();
    for node in &cluster.nodes {
        let term = cluster.status(node.id).await.and_then(|status| status["term"].as_u64()).unwrap_or(0);
        terms.push(term);
    }
    terms
}

/// `duration` with no fault, and `clients` keep-alive proxy clients when not 0:
/// counts term changes (elections) and leader changes seen by polling.
async fn stability(cluster: &TestCluster, duration: Duration, clients: usize) -> anyhow::Result<()> {
    let upstream = CountingUpstream::start().await?;
    let stable_leader = cluster.leader().await?;
    let mut load = tokio::task::JoinSet::new();
    let running = Arc::new(AtomicBool::new(true));
    let answered = Arc::new(AtomicU64::new(0));
    if clients > 0 {
        let admin = cluster.client();
        let service = json!({"name": "stability", "url": format!("http://{}", upstream.address)});
        admin.put("/services/stability", &service).await?;
        let route = admin.put("/services/stability/routes/stability", &json!({"paths": ["/stability"]})).await?;
        cluster.published(route.config_version.unwrap_or(0)).await?;
        let urls: Vec<String> = cluster.nodes.iter().map(|node| node.proxy_url()).collect();
        for client in 0..clients {
            let (url, running, answered) = (urls[client % urls.len()].clone(), running.clone(), answered.clone());
            load.spawn(async move {
                let proxy = ProxyClient::new();
                while running.load(Ordering::Relaxed) {
                    if proxy.request(&url, "GET", None, "/stability", &[]).await.is_ok_and(|r| r.status == 200) {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }
    let before = terms(cluster).await;
    let started = Instant::now();
    let mut leader_changes = 0;
    let mut leader = stable_leader;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(now) = cluster.status(leader).await.and_then(|status| status["leader_id"].as_u64()) {
            if now != leader && now != 0 {
                leader_changes += 1;
                println!("leader changed from {leader} to {now} after {:.1} s", started.elapsed().as_secs_f64());
                leader = now;
            }
        }
    }
    running.store(false, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let after = terms(cluster).await;
    let elections: u64 = before.iter().zip(&after).map(|(b, a)| a.saturating_sub(*b)).max().unwrap_or(0);
    let rate = answered.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!(
        "stability for {} s with {clients} proxy clients ({rate:.0} req/s): terms {before:?} -> {after:?}, {elections} election(s), {leader_changes} leader change(s) seen",
        duration.as_secs()
    );
    Ok(())
}
