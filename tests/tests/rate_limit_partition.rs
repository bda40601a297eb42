//! A node cut off from the others, with `policy: cluster` (P5).
//!
//! Node 3 runs in its own network namespace, joined to the host by a veth pair; nodes 1
//! and 2 run on the host (`tollgate_tests::netns`). Cutting node 3 off is iptables
//! rules inside its namespace that reset its cluster connections and drop its gossip,
//! while clients still reach its proxy port and it still reaches its upstream (an echo
//! server in its namespace on the same loopback port as the host's counting upstream).
//!
//! With `fault_tolerant: false` the cut-off node admits only the tokens it held, then
//! answers 429; with `true` it admits at most ⌈limit / voters⌉ more per window on its
//! own. The connected side never passes the limit. Needs root and iproute2/iptables
//! (`.ci/run` installs them).

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_client::AdminClient;
use tollgate_tests::netns::{SplitCluster, TOKEN};
use tollgate_tests::{eventually, ProxyClient};

const LIMIT: u64 = 600;

/// Sends `count` requests to `path` on `proxy`; returns (200s, 429s).
async fn send(proxy: &str, path: &str, count: usize) -> (u64, u64) {
    let client = ProxyClient::new();
    let (mut admitted, mut refused) = (0, 0);
    for _ in 0..count {
        match client.request(proxy, "GET", None, path, &[]).await {
            Ok(reply) if reply.status == 200 => admitted += 1,
            Ok(reply) if reply.status == 429 => refused += 1,
            _ => {}
        }
    }
    (admitted, refused)
}

/// Node 3's lease of `plugin`'s only key: tokens it holds now.
async fn held(node3: &AdminClient, plugin: &str) -> anyhow::Result<u64> {
    let view = node3.get(&format!("/rate-limits/{plugin}")).await?;
    Ok(view.body["data"][0]["this_node"]["available"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_node_admits_only_what_it_holds_or_its_documented_bound() -> anyhow::Result<()> {
    let split = SplitCluster::start().await?;
    let (nodes, upstream, upstream_port) = (&split.nodes, &split.upstream, &split.upstream_port);
    let admin = split.admin();
    let node3 = split.admin_of(2);
    eventually("the cluster to take writes", Duration::from_secs(30), || async {
        admin
            .post("/services", &json!({"name": "metered", "url": format!("http://127.0.0.1:{upstream_port}")}))
            .await
            .ok()
    })
    .await?;
    let mut plugins = Vec::new();
    for (path, fault_tolerant) in [("/strict", false), ("/tolerant", true)] {
        let route = admin.post("/services/metered/routes", &json!({"paths": [path]})).await?;
        let route_id = route.body["id"].as_str().unwrap_or_default().to_string();
        let config =
            json!({"hour": LIMIT, "policy": "cluster", "limit_by": "service", "fault_tolerant": fault_tolerant});
        let plugin = admin
            .post(&format!("/routes/{route_id}/plugins"), &json!({"name": "rate-limiting", "config": config}))
            .await?;
        plugins.push(plugin.body["id"].as_str().unwrap_or_default().to_string());
    }
    // Node 3 has the config and leases for both keys before the cut.
    for path in ["/strict", "/tolerant"] {
        eventually("node 3 to admit through its lease", Duration::from_secs(30), || async {
            (send(&nodes[2].proxy, path, 1).await.0 == 1).then_some(())
        })
        .await?;
    }
    let mut warm = (0, 0);
    for path in ["/strict", "/tolerant"] {
        let (admitted, _) = send(&nodes[2].proxy, path, 20).await;
        if path == "/strict" {
            warm.0 = admitted + 1
        } else {
            warm.1 = admitted + 1
        }
    }

    split.cut(true)?;
    let held_strict = held(&node3, &plugins[0]).await?;
    let held_tolerant = held(&node3, &plugins[1]).await?;

    // The cut-off node: fault_tolerant false admits what it holds, then 429s.
    let (strict_admitted, strict_refused) = send(&nodes[2].proxy, "/strict", 200).await;
    // fault_tolerant true: what it holds, then at most ceil(limit / 3) on its own.
    let (tolerant_admitted, tolerant_refused) = send(&nodes[2].proxy, "/tolerant", 600).await;
    // The connected side takes everything the ledger has left once it has a leader
    // (node 3 may have been it; until the election is over no node gets grants, and
    // `fault_tolerant` nodes fall back, QUOTA.md): a write through node 1 says so.
    let node1 = split.admin_of(0);
    eventually("the connected side to elect a leader", Duration::from_secs(30), || async {
        node1.put("/consumers/election-probe", &json!({})).await.ok()
    })
    .await?;
    let (cluster_strict, _) = send(&nodes[0].proxy, "/strict", 900).await;
    let (cluster_tolerant, _) = send(&nodes[1].proxy, "/tolerant", 900).await;
    let bound = LIMIT.div_ceil(3);
    eprintln!(
        "cut off: strict held {held_strict}, admitted {strict_admitted}, refused {strict_refused}; \
         tolerant held {held_tolerant}, admitted {tolerant_admitted} (bound {bound} on its own), refused {tolerant_refused}; \
         connected side admitted {cluster_strict} strict and {cluster_tolerant} tolerant; before the cut node 3 admitted {warm:?}"
    );
    assert!(strict_admitted <= held_strict, "fault_tolerant false: only what it held");
    assert!(strict_refused > 0);
    assert!(tolerant_admitted <= held_tolerant + bound, "fault_tolerant true: the local bound");
    assert!(tolerant_admitted > held_tolerant, "the fallback admitted some");
    assert!(tolerant_refused > 0, "the fallback has a bound");
    // Never over on the connected side: what it admitted plus everything node 3 ever
    // admitted with tokens stays within the limit.
    assert!(cluster_strict + warm.0 + strict_admitted <= LIMIT, "strict over the limit");
    assert!(cluster_tolerant + warm.1 + held_tolerant <= LIMIT, "tolerant over the limit on the cluster's tokens");
    assert_eq!(upstream.received(), cluster_strict + cluster_tolerant, "the host upstream saw only nodes 1 and 2");

    // Healed: node 3's grant rounds work again.
    split.cut(false)?;
    eventually("node 3 to reach the cluster again", Duration::from_secs(30), || async {
        // A request makes node 3 ask for tokens; a grant round that works clears the flag.
        send(&nodes[2].proxy, "/strict", 1).await;
        let metrics = ProxyClient::new()
            .request(&nodes[2].admin, "GET", None, "/metrics", &[("authorization", &format!("Bearer {TOKEN}"))])
            .await
            .ok()?;
        let text = metrics.body.as_str().map(str::to_string).unwrap_or_else(|| Value::to_string(&metrics.body));
        let status = admin.get("/status").await.ok()?;
        (status.status == 200 && text.lines().any(|line| line == "tollgate_quota_cut_off 0")).then_some(())
    })
    .await?;
    Ok(())
}
