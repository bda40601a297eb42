//! Cluster rate limits through repeated full-cluster crashes: how much of each window's
//! limit is still admitted when every node is killed with SIGKILL and restarted, again
//! and again, under saturating load. Tokens leased to a node die with it (never over,
//! but under); this measures how far under.
//!
//! Three nodes, `minute: --limit` and `second: --second` with `policy: cluster`,
//! `fault_tolerant: false`, `--clients` keep-alive clients spread over the three
//! proxies: the second limit refuses most requests, so the minute's tokens are used
//! slowly, over `limit / second` seconds, and leases sized from the offered load
//! rather than from what is admitted sit unused. In each of `--crashes` minutes,
//! `--at-ms` into it, all three nodes are killed and restarted. Per whole minute it
//! prints the requests admitted (those sent and answered within the minute, a lower
//! bound) and the crashes in it.
//!
//! Run: `cargo build --release -p tollgate-node -p tollgate-tests &&
//!       target/release/quota-crash [--limit 600] [--second 20] [--crashes 7] [--at-ms 10000] [--clients 12]`

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::Mutex;
use tollgate_tests::{cli_arg, CountingUpstream, ProxyClient, TestCluster};

fn unix_s() -> u64 {
    unix_ms() / 1000
}

fn unix_ms() -> u64 {
    tollgate_tests::system_now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let limit = cli_arg("--limit", 600u64);
    let crashes = cli_arg("--crashes", 7usize);
    let second = cli_arg("--second", 20u64);
    let at_ms = cli_arg("--at-ms", 10_000u64);
    let clients = cli_arg("--clients", 12usize);
    let upstream = CountingUpstream::start().await?;
    let mut cluster = TestCluster::start(3).await?;
    let admin = cluster.client();
    admin.post("/services", &json!({"name": "metered", "url": format!("http://{}", upstream.address)})).await?;
    admin.post("/services/metered/routes", &json!({"paths": ["/limited"]})).await?;
    let config =
        json!({"minute": limit, "second": second, "policy": "cluster", "limit_by": "service", "fault_tolerant": false});
    let plugin = admin.post("/services/metered/plugins", &json!({"name": "rate-limiting", "config": config})).await?;
    cluster.published(plugin.config_version.unwrap_or(0)).await?;

    // Admitted per minute (sent and answered within it), and crashes per minute.
    let admitted: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let urls: Vec<String> = cluster.nodes.iter().map(|node| node.proxy_url()).collect();
    let mut load = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (url, admitted, running) = (urls[client % urls.len()].clone(), admitted.clone(), running.clone());
        load.spawn(async move {
            let mut proxy = ProxyClient::new();
            while running.load(Ordering::Relaxed) {
                let minute = unix_s() / 60;
                match proxy.request(&url, "GET", None, "/limited", &[]).await {
                    Ok(reply) if reply.status == 200 && unix_s() / 60 == minute => {
                        *admitted.lock().await.entry(minute).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // The node is down: a fresh client, after a pause.
                        proxy = ProxyClient::new();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    let mut crashed: BTreeMap<u64, u64> = BTreeMap::new();
    for crash in 0..crashes {
        // `at_ms` into the next minute.
        let now_ms = unix_ms();
        let next_ms = (now_ms / 60_000 + 1) * 60_000 + at_ms;
        tokio::time::sleep(Duration::from_millis(next_ms - now_ms)).await;
        for id in 1..=3 {
            cluster.node(id).kill9();
        }
        *crashed.entry(unix_s() / 60).or_default() += 1;
        for id in 1..=3 {
            cluster.node(id).start()?;
        }
        cluster.leader().await?;
        println!("crash {} of {crashes}: all three killed and restarted", crash + 1);
    }
    // One more whole minute after the last crash.
    tokio::time::sleep(Duration::from_secs(60)).await;
    running.store(false, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let admitted = admitted.lock().await.clone();
    let minutes: Vec<(u64, u64)> = admitted.into_iter().collect();
    // The first and last minutes were partly outside the run.
    let whole = &minutes[1..minutes.len().saturating_sub(1)];
    let mut with_crash = Vec::new();
    for (minute, count) in whole {
        let crashes_in = crashed.get(minute).copied().unwrap_or(0);
        println!("minute {minute}: {count} of {limit} admitted, {crashes_in} full-cluster crash(es)");
        if crashes_in > 0 {
            with_crash.push(*count);
        }
        assert!(*count <= limit, "over the limit");
    }
    with_crash.sort();
    if let (Some(low), Some(high)) = (with_crash.first(), with_crash.last()) {
        println!(
            "minutes with a crash: {} of them, admitted {low}..{high} of {limit} (median {})",
            with_crash.len(),
            with_crash[with_crash.len() / 2]
        );
    }
    Ok(())
}
