//! Control-path benchmark on a real three-node cluster on loopback.
//!
//! 1. Ack → visible: 1000 writes spread over the nodes; for each, the time from the
//!    acknowledgement until every node serves it with `?consistency=local`.
//! 2. Failover: the leader is killed with SIGKILL; the time until the first write is
//!    accepted through a survivor. Repeated `--kills` times.
//!
//! Run: `cargo build --release -p tollgate-node -p tollgate-tests &&
//!       target/release/cluster-bench [--writes 1000] [--kills 5]`

use std::time::Duration;

use tokio::time::Instant;

use serde_json::json;
use tollgate_tests::{cli_arg, eventually, TestCluster, CONVERGE_TIMEOUT};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let writes = cli_arg("--writes", 1000);
    let kills = cli_arg("--kills", 5);
    let mut cluster = TestCluster::start(3).await?;
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
        percentile(&acked, 0.50).as_secs_f64() * 1e3,
        percentile(&acked, 0.99).as_secs_f64() * 1e3,
        acked.last().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "ack -> visible on all: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        percentile(&visible, 0.50).as_secs_f64() * 1e3,
        percentile(&visible, 0.99).as_secs_f64() * 1e3,
        visible.last().unwrap().as_secs_f64() * 1e3
    );

    let mut failovers = Vec::new();
    for round in 0..kills {
        let leader = cluster.leader().await?;
        let survivor = *ids.iter().find(|id| **id != leader).expect("a survivor");
        let client = cluster.client_of(survivor);
        cluster.node(leader).kill9();
        let killed_at = Instant::now();
        let elected = eventually("a new leader known to a survivor", CONVERGE_TIMEOUT, || async {
            let status = client.get("/status").await.ok()?.body;
            let known = status["leader_id"].as_u64()?;
            (known != leader).then_some(killed_at.elapsed())
        })
        .await?;
        let body = json!({"name": format!("failover-{round}"), "host": "failover.internal"});
        eventually("a write through a survivor", CONVERGE_TIMEOUT, || async {
            client.post("/services", &body).await.ok().map(|_| ())
        })
        .await?;
        let elapsed = killed_at.elapsed();
        println!(
            "kill -9 leader {leader}: new leader known after {} ms, first write accepted through node {survivor} after {} ms",
            elected.as_millis(),
            elapsed.as_millis()
        );
        failovers.push(elapsed);
        cluster.node(leader).start()?;
        let version = client.get("/status").await?.body["config_version"].as_u64().unwrap_or(0);
        cluster.converged(version).await?;
    }
    if !failovers.is_empty() {
        failovers.sort();
        println!(
            "failover over {kills} kills: median {} ms, max {} ms",
            percentile(&failovers, 0.5).as_millis(),
            failovers.last().unwrap().as_millis()
        );
    }
    Ok(())
}
