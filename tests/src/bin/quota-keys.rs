//! Many keys through `policy: cluster`: 100 000 client addresses (`limit_by: ip`,
//! through `X-Forwarded-For` from a trusted peer), each sending at most one request
//! per `second` window, for 100 windows. Reports the node's memory (resident and
//! peak), the ledger's size per window (it must not grow across windows), and the
//! Raft entries the grants took, with their size.
//!
//! Run: `cargo build --release -p tollgate-node -p tollgate-tests &&
//!       target/release/quota-keys [--keys 100000] [--windows 100] [--connections 256]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tollgate_tests::{cli_arg, CountingUpstream, ProxyClient, TestCluster};

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A counter's value in Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .unwrap_or(0.0) as u64
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keys: u64 = cli_arg("--keys", 100_000);
    let windows: u64 = cli_arg("--windows", 100);
    let connections: usize = cli_arg("--connections", 256);
    let upstream = CountingUpstream::start().await?;
    let cluster = TestCluster::start_with(1, &["--trusted-ips", "127.0.0.1/32"]).await?;
    let admin = cluster.client();
    admin.post("/services", &json!({"name": "many", "url": format!("http://{}", upstream.address)})).await?;
    admin.post("/services/many/routes", &json!({"paths": ["/many"]})).await?;
    let plugin = admin
        .post(
            "/services/many/plugins",
            &json!({"name": "rate-limiting", "config": {"second": 1, "policy": "cluster", "limit_by": "ip"}}),
        )
        .await?;
    let plugin_id = plugin.body["id"].as_str().unwrap_or_default().to_string();
    cluster.published(plugin.config_version.unwrap_or(0)).await?;
    let pid = cluster.nodes[0].pid().expect("running");
    let proxy = cluster.nodes[0].proxy_url();
    let admin_url = cluster.nodes[0].admin_url();
    let metrics_text = || {
        let admin_url = admin_url.clone();
        async move {
            match ProxyClient::new().request(&admin_url, "GET", None, "/metrics", &[]).await {
                Ok(reply) => reply.body.as_str().unwrap_or_default().to_string(),
                Err(_) => String::new(),
            }
        }
    };

    // Keys go out in turn; a key comes back after all the others, which takes more than
    // a second at the rates this machine reaches, so each key sends at most one
    // request per window.
    let next = Arc::new(AtomicU64::new(0));
    let (admitted, refused, failed) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(windows);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (next, admitted, refused, failed, proxy) =
            (next.clone(), admitted.clone(), refused.clone(), failed.clone(), proxy.clone());
        tasks.spawn(async move {
            let client = ProxyClient::new();
            while tokio::time::Instant::now() < deadline {
                let key = next.fetch_add(1, Ordering::Relaxed) % keys;
                let address = format!("10.{}.{}.{}", key >> 16, (key >> 8) & 255, key & 255);
                match client.request(&proxy, "GET", None, "/many", &[("x-forwarded-for", &address)]).await {
                    Ok(reply) if reply.status == 200 => admitted.fetch_add(1, Ordering::Relaxed),
                    Ok(reply) if reply.status == 429 => refused.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    println!(
        "{:>6} {:>10} {:>10} {:>8} {:>12} {:>10} {:>12} {:>12}",
        "s", "requests", "admitted", "refused", "ledger keys", "entries", "entry MiB", "RSS MiB"
    );
    let mut peak_ledger = 0;
    let mut ledger_by_window = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    while tokio::time::Instant::now() < deadline {
        ticks.tick().await;
        let view = admin.get(&format!("/rate-limits/{plugin_id}?size=1&consistency=local")).await?;
        let ledger = view.body["ledger_keys"].as_u64().unwrap_or(0);
        peak_ledger = peak_ledger.max(ledger);
        ledger_by_window.push(ledger);
        let text = metrics_text().await;
        let (rss, _) = memory_kib(pid);
        let elapsed = started.elapsed().as_secs();
        if elapsed.is_multiple_of(10) || elapsed >= windows {
            println!(
                "{elapsed:>6} {:>10} {:>10} {:>8} {ledger:>12} {:>10} {:>12.1} {:>12.1}",
                next.load(Ordering::Relaxed),
                admitted.load(Ordering::Relaxed),
                refused.load(Ordering::Relaxed),
                metric(&text, "tollgate_quota_raft_entries_total"),
                metric(&text, "tollgate_quota_raft_entry_bytes_total") as f64 / 1048576.0,
                rss as f64 / 1024.0,
            );
        }
    }
    while tasks.join_next().await.is_some() {}
    let text = metrics_text().await;
    let (rss, peak) = memory_kib(pid);
    let entries = metric(&text, "tollgate_quota_raft_entries_total");
    let bytes = metric(&text, "tollgate_quota_raft_entry_bytes_total");
    let requests = admitted.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed);
    let half = ledger_by_window.len() / 2;
    let first_half = ledger_by_window[..half].iter().max().copied().unwrap_or(0);
    let second_half = ledger_by_window[half..].iter().max().copied().unwrap_or(0);
    println!("keys {keys}, windows {windows}: {requests} requests ({} admitted, {} refused, {} failed), upstream received {}",
        admitted.load(Ordering::Relaxed), refused.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), upstream.received());
    println!(
        "ledger keys: peak {peak_ledger}; largest in the first half {first_half}, in the second half {second_half}"
    );
    println!(
        "raft entries for quota: {entries}, {:.1} MiB ({:.0} bytes per entry, {:.1} per key-window)",
        bytes as f64 / 1048576.0,
        bytes as f64 / entries.max(1) as f64,
        bytes as f64 / requests.max(1) as f64
    );
    println!("node memory: resident {:.1} MiB now, peak {:.1} MiB", rss as f64 / 1024.0, peak as f64 / 1024.0);
    Ok(())
}
