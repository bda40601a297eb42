//! Gossip on the cluster port's UDP side: every node sees the others live with the
//! config version they applied, and nothing sent to the port stops a node.

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_tests::{eventually, ProxyClient, TestCluster};

/// Node `id`'s gossip view, from `/cluster`.
async fn gossip_view(cluster: &TestCluster, id: u64) -> Option<Value> {
    Some(cluster.client_of(id).get("/cluster").await.ok()?.body["gossip"].clone())
}

/// Waits until every node's gossip view has all three nodes live, each reporting at
/// least config version `version`.
async fn all_live_at(cluster: &TestCluster, version: u64) -> anyhow::Result<()> {
    for node in &cluster.nodes {
        eventually(
            &format!("node {} to see three live nodes at version {version}", node.id),
            Duration::from_secs(20),
            || async {
                let view = gossip_view(cluster, node.id).await?;
                let nodes = view["nodes"].as_object()?;
                let ready = nodes.len() == 3
                    && nodes.values().all(|n| {
                        n["live"] == true
                            && n["keys"]["config_version"]
                                .as_str()
                                .and_then(|v| v.parse::<u64>().ok())
                                .is_some_and(|v| v >= version)
                    });
                ready.then_some(())
            },
        )
        .await?;
    }
    Ok(())
}

/// Sends every node datagrams that are not gossip: garbage of many lengths, around
/// the tag's length and up to the datagram limit, and bytes shaped like a chitchat
/// message of this cluster without a valid tag. Returns how many each node got.
async fn send_garbage(cluster: &TestCluster) -> anyhow::Result<usize> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut datagrams: Vec<Vec<u8>> = vec![Vec::new(), vec![0], vec![0xff; 31], vec![0xff; 32], vec![0; 33]];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for length in [7, 100, 1500, 9000, 65_000] {
        datagrams.push(
            (0..length)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect(),
        );
    }
    let mut shaped = vec![0u8, 0, 8];
    shaped.extend_from_slice(b"tollgate");
    shaped.extend_from_slice(&[0u8; 40]);
    datagrams.push(shaped);
    for node in &cluster.nodes {
        for datagram in &datagrams {
            socket.send_to(datagram, node.cluster_address()).await?;
        }
    }
    Ok(datagrams.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sees_the_others_live_with_their_applied_config_version() -> anyhow::Result<()> {
    // Without a secret: chitchat's own datagrams (the authenticated path is below).
    let cluster = TestCluster::start(3).await?;
    let written = cluster.client().post("/services", &json!({"name": "seen", "url": "http://127.0.0.1:9"})).await?;
    let version = written.config_version.unwrap_or(0);
    all_live_at(&cluster, version).await?;
    let view = gossip_view(&cluster, 2).await.unwrap_or_default();
    assert_eq!(view["cluster_id"], "tollgate");
    assert_eq!(view["live"], 3);
    let node1 = &view["nodes"]["1"];
    assert_eq!(node1["keys"]["cluster_addr"], cluster.nodes[0].cluster_address().as_str(), "{view}");
    // Load: requests through node 1 show in the rate it publishes.
    let proxy = ProxyClient::new();
    let client = cluster.client();
    client.post("/services/seen/routes", &json!({"paths": ["/seen"]})).await?;
    eventually("node 1's published request rate to show its traffic", Duration::from_secs(20), || async {
        for _ in 0..20 {
            let _ = proxy.request(&cluster.nodes[0].proxy_url(), "GET", None, "/seen", &[]).await;
        }
        let view = gossip_view(&cluster, 3).await?;
        let keys = &view["nodes"]["1"]["keys"];
        let rate: f64 = keys["requests_per_s"].as_str()?.parse().ok()?;
        (keys["in_flight"].as_str().is_some() && rate > 0.0).then_some(())
    })
    .await?;
    // chitchat's own parser drops what is not gossip; nothing stops.
    send_garbage(&cluster).await?;
    all_live_at(&cluster, version).await?;
    for node in &cluster.nodes {
        assert!(cluster.status(node.id).await.is_some(), "node {} stopped answering", node.id);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_foreign_and_unauthenticated_datagrams_never_stop_a_node() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(3, &["--cluster-secret", "gossip-secret"]).await?;
    all_live_at(&cluster, 0).await?;
    let sent = send_garbage(&cluster).await?;
    // Every node still answers, gossip still sees all three, and the datagrams were
    // counted as rejected.
    all_live_at(&cluster, 0).await?;
    for node in &cluster.nodes {
        let status = cluster.status(node.id).await;
        assert!(status.is_some(), "node {} stopped answering", node.id);
        let metrics = ProxyClient::new().request(&node.admin_url(), "GET", None, "/metrics", &[]).await?;
        let text = metrics.body.as_str().unwrap_or_default().to_string();
        let rejected = text
            .lines()
            .find_map(|line| line.strip_prefix("tollgate_gossip_datagrams_rejected_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(rejected >= sent as f64, "node {}: {rejected} rejected", node.id);
    }
    Ok(())
}
