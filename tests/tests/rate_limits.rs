//! `rate-limiting` with `policy: cluster` on three real nodes: never over the limit,
//! close to it under skewed saturating load, through node crashes and a full restart.
//!
//! The load lasts `TOLLGATE_RL_LOAD_S` seconds (6 by default, to keep the suite short;
//! the figures in `node/QUOTA.md` were taken with 20).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::Mutex;
use tollgate_tests::{CountingUpstream, ProxyClient, TestCluster};

fn load_duration() -> Duration {
    let seconds = std::env::var("TOLLGATE_RL_LOAD_S").ok().and_then(|s| s.parse().ok()).unwrap_or(6u64);
    Duration::from_secs(seconds)
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    admitted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    /// Admitted requests per wall-clock second, counting only those sent and answered
    /// within one second: the node admitted each of them in that second's window, so
    /// these counts are lower bounds of what each window admitted.
    admitted_by_second: Mutex<BTreeMap<u64, u64>>,
}

fn unix_ms() -> u64 {
    tollgate_tests::system_now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

impl Seen {
    fn get(&self) -> (u64, u64, u64) {
        (self.admitted.load(Ordering::SeqCst), self.refused.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst))
    }
}

/// Back-to-back requests to `path` from `workers` loops per proxy URL, for `duration`.
async fn load(targets: Vec<(String, usize)>, path: &'static str, duration: Duration, seen: Arc<Seen>) {
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (url, workers) in targets {
        for _ in 0..workers {
            let (url, seen) = (url.clone(), seen.clone());
            tasks.spawn(async move {
                let client = ProxyClient::new();
                while tokio::time::Instant::now() < deadline {
                    let sent_ms = unix_ms();
                    match client.request(&url, "GET", None, path, &[]).await {
                        Ok(reply) if reply.status == 200 => {
                            let second = sent_ms / 1000;
                            if unix_ms() / 1000 == second {
                                *seen.admitted_by_second.lock().await.entry(second).or_default() += 1;
                            }
                            seen.admitted.fetch_add(1, Ordering::SeqCst)
                        }
                        Ok(reply) if reply.status == 429 => seen.refused.fetch_add(1, Ordering::SeqCst),
                        _ => {
                            // A killed node: back off a little instead of spinning.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            seen.failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Three nodes, a service on `upstream` with route `/limited` and a cluster
/// rate-limiting plugin with `config` on the service.
async fn limited_cluster(upstream: &CountingUpstream, config: serde_json::Value) -> anyhow::Result<TestCluster> {
    let cluster = TestCluster::start(3).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "metered", "url": format!("http://{}", upstream.address)})).await?;
    client.post("/services/metered/routes", &json!({"paths": ["/limited"]})).await?;
    let plugin = client.post("/services/metered/plugins", &json!({"name": "rate-limiting", "config": config})).await?;
    let version = plugin.config_version.unwrap_or(0);
    cluster.published(version).await?;
    Ok(cluster)
}

fn skewed(cluster: &TestCluster) -> Vec<(String, usize)> {
    cluster.nodes.iter().zip([7, 2, 1]).map(|(node, workers)| (node.proxy_url(), workers)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_hour_limit_holds_across_three_nodes_under_skewed_load() -> anyhow::Result<()> {
    let upstream = CountingUpstream::start().await?;
    let config = json!({"hour": 3000, "policy": "cluster", "limit_by": "service", "fault_tolerant": false});
    let cluster = limited_cluster(&upstream, config).await?;
    let seen = Arc::new(Seen::default());
    load(skewed(&cluster), "/limited", load_duration(), seen.clone()).await;
    let (admitted, refused, failed) = seen.get();
    let received = upstream.received();
    eprintln!("hour limit 3000, 7:2:1 for {:?}: upstream received {received}, clients saw {admitted} admitted, {refused} refused, {failed} failed", load_duration());
    assert!(received <= 3000, "over the limit: {received}");
    assert!(received >= 2850, "under 95% of the limit: {received}");
    assert_eq!(admitted, received, "every admitted request reached the upstream");
    assert!(refused > 0, "the load was over the limit");

    // The Admin API shows the ledger: one key, its limit, grants per node.
    let plugins = cluster.client().get("/plugins").await?;
    let id = plugins.body["data"][0]["id"].as_str().unwrap_or_default().to_string();
    let view = cluster.client().get(&format!("/rate-limits/{id}")).await?;
    let account = &view.body["data"][0];
    assert_eq!(account["limit"], 3000, "{}", view.body);
    assert_eq!(account["window_s"], 3600);
    let granted: u64 =
        account["granted_by_node"].as_object().map_or(0, |nodes| nodes.values().filter_map(|n| n.as_u64()).sum());
    assert_eq!(account["granted"].as_u64(), Some(granted));
    assert!((received..=3000).contains(&granted), "granted {granted} between received {received} and the limit");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_limit_holds_window_after_window() -> anyhow::Result<()> {
    let upstream = CountingUpstream::start().await?;
    let config = json!({"second": 100, "policy": "cluster", "limit_by": "service", "fault_tolerant": false});
    let cluster = limited_cluster(&upstream, config).await?;
    let seen = Arc::new(Seen::default());
    let duration = Duration::from_secs(4);
    let started = tollgate_tests::system_now();
    load(skewed(&cluster), "/limited", duration, seen.clone()).await;
    let elapsed = started.elapsed()?;
    // Windows the load touched: whole seconds from its start to its end, both partial.
    let first = started.duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let last = (started + elapsed).duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let windows = last - first + 1;
    let received = upstream.received();
    let (admitted, refused, _) = seen.get();
    eprintln!(
        "second limit 100 over {windows} windows: upstream received {received}, {admitted} admitted, {refused} refused"
    );
    assert!(received <= 100 * windows, "over the limit: {received} in {windows} windows");
    // The whole windows inside the load were used (the edges are partial).
    assert!(received >= 90 * (windows - 2), "under-used: {received} in {windows} windows");
    Ok(())
}

/// Issue 12: with `fault_tolerant` at its default (true) and nothing failing, a
/// saturating load over the three proxies is never admitted past the limit in any
/// window. The fallback is for nodes cut off from the ledger, not for a request that
/// lost its freshly granted token to a concurrent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_default_fault_tolerant_limit_is_never_over_without_faults() -> anyhow::Result<()> {
    const LIMIT: u64 = 30;
    const WINDOWS_MIN: usize = 30;
    let upstream = CountingUpstream::start().await?;
    let config = json!({"second": LIMIT, "policy": "cluster", "limit_by": "service"});
    let cluster = limited_cluster(&upstream, config).await?;
    let seen = Arc::new(Seen::default());
    let targets = cluster.nodes.iter().map(|node| (node.proxy_url(), 4)).collect();
    load(targets, "/limited", Duration::from_secs(WINDOWS_MIN as u64 + 2), seen.clone()).await;
    let (admitted, refused, failed) = seen.get();
    let by_second = seen.admitted_by_second.lock().await.clone();
    // The first and last seconds were partly outside the load.
    let whole: Vec<(u64, u64)> = by_second.into_iter().skip(1).collect::<Vec<_>>();
    let whole = &whole[..whole.len().saturating_sub(1)];
    let over: Vec<&(u64, u64)> = whole.iter().filter(|(_, count)| *count > LIMIT).collect();
    let counts: Vec<u64> = whole.iter().map(|(_, count)| *count).collect();
    eprintln!(
        "second limit {LIMIT}, fault_tolerant default, 4+4+4 clients: {admitted} admitted, {refused} refused, {failed} failed; per window {counts:?}"
    );
    assert!(whole.len() >= WINDOWS_MIN, "only {} whole windows measured", whole.len());
    assert!(
        refused > 100 * admitted / 10,
        "the load did not saturate the limit: {admitted} admitted, {refused} refused"
    );
    assert!(over.is_empty(), "windows over the limit of {LIMIT}: {over:?}");
    assert_eq!(failed, 0, "every request answered");
    Ok(())
}

/// Kills the leader (or a follower) with -9 once a third of the limit is admitted,
/// while grants are being asked for, and restarts it once the others carried on.
async fn load_through_a_crash(leader: bool) -> anyhow::Result<()> {
    let upstream = CountingUpstream::start().await?;
    let config = json!({"hour": 3000, "policy": "cluster", "limit_by": "service", "fault_tolerant": false});
    let mut cluster = limited_cluster(&upstream, config).await?;
    let leader_id = cluster.leader().await?;
    let victim =
        if leader { leader_id } else { cluster.nodes.iter().map(|n| n.id).find(|id| *id != leader_id).unwrap_or(1) };
    let seen = Arc::new(Seen::default());
    let duration = load_duration();
    let running = tokio::spawn(load(skewed(&cluster), "/limited", duration, seen.clone()));
    tollgate_tests::eventually("a third of the limit admitted", duration, || async {
        (seen.admitted.load(Ordering::SeqCst) >= 1000).then_some(())
    })
    .await?;
    let admitted_at_kill = seen.admitted.load(Ordering::SeqCst);
    cluster.node(victim).kill9();
    // The victim stays down until the survivors agree on a leader and the load has
    // gone on without it for a while (1000 more answers).
    cluster.leader().await?;
    let answered = |seen: &Seen| seen.admitted.load(Ordering::SeqCst) + seen.refused.load(Ordering::SeqCst);
    let at_kill = answered(&seen);
    tollgate_tests::eventually("the load to go on without the victim", duration, || async {
        (answered(&seen) >= at_kill + 1000).then_some(())
    })
    .await?;
    cluster.node(victim).start()?;
    running.await?;
    let (admitted, refused, failed) = seen.get();
    let received = upstream.received();
    eprintln!(
        "{} (node {victim}) killed -9 at {admitted_at_kill} admitted and restarted during {duration:?}: upstream received {received} of 3000 ({} under), clients saw {admitted} admitted, {refused} refused, {failed} failed",
        if leader { "leader" } else { "follower" },
        3000 - received.min(3000)
    );
    assert!(received <= 3000, "over the limit: {received}");
    assert!(admitted <= received, "a 200 the upstream never saw");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limit_holds_when_the_leader_is_killed_during_load() -> anyhow::Result<()> {
    load_through_a_crash(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_limit_holds_when_a_follower_is_killed_during_load() -> anyhow::Result<()> {
    load_through_a_crash(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_day_quota_survives_a_full_cluster_restart() -> anyhow::Result<()> {
    let upstream = CountingUpstream::start().await?;
    let config = json!({"day": 1000, "policy": "cluster", "limit_by": "service", "fault_tolerant": false});
    let mut cluster = limited_cluster(&upstream, config).await?;
    let client = ProxyClient::new();
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.proxy_url()).collect();
    // The 900 go through one node: spread over three, the ledger's last tokens can
    // sit in two nodes' leases while the third is refused (QUOTA.md, failure cases),
    // which is not what this test is about.
    let mut used = 0;
    while used < 900 {
        let reply = client.request(&urls[0], "GET", None, "/limited", &[]).await?;
        assert_eq!(reply.status, 200, "{} after {used} admitted", reply.body);
        used += 1;
    }
    for id in 1..=3 {
        cluster.node(id).stop();
    }
    for id in 1..=3 {
        cluster.node(id).start()?;
    }
    cluster.leader().await?;
    let client = ProxyClient::new();
    let mut more = 0;
    let mut refused = 0;
    for attempt in 0..600 {
        match client.request(&urls[attempt % 3], "GET", None, "/limited", &[]).await {
            Ok(reply) if reply.status == 200 => more += 1,
            Ok(reply) if reply.status == 429 => refused += 1,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let received = upstream.received();
    eprintln!("day quota 1000: 900 used, full restart, then {more} more admitted, {refused} refused; upstream received {received}");
    assert!(more <= 100, "{more} admitted after the restart");
    assert!(received <= 1000);
    assert!(refused > 0);
    Ok(())
}
