//! A node cut off from gossip (and Raft): it keeps its own view and keeps proxying on
//! its last config, and converges once the cut heals. Node 3 runs in its own network
//! namespace (see `tollgate_tests::netns`); needs root, iproute2 and iptables.

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_tests::netns::SplitCluster;
use tollgate_tests::{eventually, ProxyClient};

/// Node `index`'s gossip view: node id → (live, reported config version).
async fn view(split: &SplitCluster, index: usize) -> Option<Vec<(String, bool, u64)>> {
    let reply = split.admin_of(index).get("/cluster?consistency=local").await.ok()?;
    let nodes = reply.body["gossip"]["nodes"].as_object()?.clone();
    Some(
        nodes
            .into_iter()
            .map(|(id, node): (String, Value)| {
                let version = node["keys"]["config_version"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
                (id, node["live"] == true, version)
            })
            .collect(),
    )
}

fn live(view: &[(String, bool, u64)]) -> Vec<&str> {
    view.iter().filter(|(_, live, _)| *live).map(|(id, _, _)| id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_gossip_keeps_its_view_and_proxying_and_converges_after() -> anyhow::Result<()> {
    let split = SplitCluster::start().await?;
    let admin = split.admin();
    let long = Duration::from_secs(60);
    eventually("the cluster to take writes", long, || async {
        admin
            .post("/services", &json!({"name": "svc", "url": format!("http://127.0.0.1:{}", split.upstream_port)}))
            .await
            .ok()
    })
    .await?;
    admin.post("/services/svc/routes", &json!({"paths": ["/before"]})).await?;
    for index in 0..3 {
        eventually(&format!("node {} to see three live nodes", index + 1), long, || async {
            (live(&view(&split, index).await?).len() == 3).then_some(())
        })
        .await?;
    }
    let proxy = ProxyClient::new();
    let node3 = split.nodes[2].proxy.clone();
    eventually("node 3 to serve /before", long, || async {
        (proxy.request(&node3, "GET", None, "/before", &[]).await.ok()?.status == 200).then_some(())
    })
    .await?;

    split.cut(true)?;
    // Node 3's own view: the others are no longer live; theirs: node 3 is not.
    let cut = tokio::time::Instant::now();
    eventually("node 3 to see only itself live", long, || async {
        (live(&view(&split, 2).await?) == ["3"]).then_some(())
    })
    .await?;
    eventually("node 1 to see node 3 gone", long, || async {
        (!live(&view(&split, 0).await?).contains(&"3")).then_some(())
    })
    .await?;
    let detected = cut.elapsed();
    // A route written on the connected side, while node 3 keeps proxying on its last
    // config.
    split.admin_of(0).post("/services/svc/routes", &json!({"paths": ["/after"]})).await?;
    for _ in 0..20 {
        let reply = proxy.request(&node3, "GET", None, "/before", &[]).await?;
        assert_eq!(reply.status, 200, "node 3 stopped proxying while cut off");
    }
    assert_eq!(proxy.request(&node3, "GET", None, "/after", &[]).await?.status, 404, "node 3 cannot know /after yet");

    split.cut(false)?;
    let healed = tokio::time::Instant::now();
    for index in 0..3 {
        eventually(&format!("node {} to see three live nodes at one config version", index + 1), long, || async {
            let view = view(&split, index).await?;
            let versions: Vec<u64> = view.iter().map(|(_, _, version)| *version).collect();
            let converged = live(&view).len() == 3 && versions.windows(2).all(|pair| pair[0] == pair[1]);
            converged.then_some(())
        })
        .await?;
    }
    eventually("node 3 to serve /after", long, || async {
        (proxy.request(&node3, "GET", None, "/after", &[]).await.ok()?.status == 200).then_some(())
    })
    .await?;
    eprintln!(
        "gossip cut: detected on both sides after {detected:?}; node 3 kept proxying; converged {:?} after the heal",
        healed.elapsed()
    );
    Ok(())
}
