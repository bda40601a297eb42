//! Config storm: steady proxy traffic on routes that stay, while routes are created and
//! deleted through the Admin API at a fixed rate. Used by the `config-storm` benchmark
//! (30 s) and by an e2e test (a few seconds).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::{eventually, EchoServer, TestCluster, CONVERGE_TIMEOUT};

/// Churn routes alive at once; older ones are deleted as new ones are created.
const CHURN_ROUTES_ALIVE: u64 = 50;

#[derive(Debug, Default)]
pub struct StormReport {
    pub writes: u64,
    pub failed_writes: u64,
    pub requests: u64,
    /// Requests on the stable routes answered with anything but 200.
    pub failed_requests: u64,
    /// Requests that got no HTTP answer at all (connection refused, reset, ...).
    pub socket_errors: u64,
}

/// Runs the storm on a running cluster behind which `echo` answers.
pub async fn run(
    cluster: &TestCluster,
    echo: &EchoServer,
    duration: Duration,
    writes_per_second: u64,
    requests_per_second_per_node: u64,
) -> anyhow::Result<StormReport> {
    let client = cluster.client();
    client.post("/services", &json!({"name": "storm", "url": format!("http://{}", echo.address)})).await?;
    let stable = client.post("/services/storm/routes", &json!({"name": "stable", "paths": ["/stable"]})).await?;
    cluster.converged(stable.config_version.unwrap_or(0)).await?;
    for node in &cluster.nodes {
        let proxy = node.proxy_url();
        eventually("the stable route on every node", CONVERGE_TIMEOUT, || async {
            let reply = crate::proxy_request(&proxy, "GET", None, "/stable", &[]).await.ok()?;
            (reply.status == 200).then_some(())
        })
        .await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let socket_errors = Arc::new(AtomicU64::new(0));
    let mut load = tokio::task::JoinSet::new();
    for node in &cluster.nodes {
        let proxy = node.proxy_url();
        let (stop, requests, failed, socket_errors) =
            (stop.clone(), requests.clone(), failed.clone(), socket_errors.clone());
        load.spawn(async move {
            // One keep-alive client per node: a config change must not drop connections.
            let proxy_client = crate::ProxyClient::new();
            let mut ticker =
                tokio::time::interval(Duration::from_micros(1_000_000 / requests_per_second_per_node.max(1)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                requests.fetch_add(1, Ordering::Relaxed);
                match proxy_client.request(&proxy, "GET", None, "/stable/item", &[]).await {
                    Ok(reply) if reply.status == 200 => {}
                    Ok(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        socket_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }

    let mut report = StormReport::default();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / writes_per_second.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::Instant::now() + duration;
    let mut created = 0u64;
    let mut deleted = 0u64;
    while tokio::time::Instant::now() < deadline {
        ticker.tick().await;
        // Alternate: create until CHURN_ROUTES_ALIVE exist, then delete the oldest.
        let write = if created - deleted < CHURN_ROUTES_ALIVE || (created + deleted).is_multiple_of(2) {
            created += 1;
            let route = json!({"name": format!("churn-{created}"), "paths": [format!("/churn-{created}")]});
            client.post("/services/storm/routes", &route).await.map(|_| ())
        } else {
            deleted += 1;
            client.delete(&format!("/routes/churn-{deleted}")).await.map(|_| ())
        };
        report.writes += 1;
        if write.is_err() {
            report.failed_writes += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    report.requests = requests.load(Ordering::Relaxed);
    report.failed_requests = failed.load(Ordering::Relaxed);
    report.socket_errors = socket_errors.load(Ordering::Relaxed);
    Ok(report)
}
