//! CFG3 and durability: a full-cluster stop and restart keeps every entity and the
//! config version; a node restarts from its data dir alone.

use serde_json::json;
use tollgate_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cluster_restart_keeps_config_and_version() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "billing", "url": "http://billing:8080"})).await?;
    client.post("/services/billing/routes", &json!({"name": "bills", "paths": ["/bills"]})).await?;
    client.post("/consumers", &json!({"username": "alice"})).await?;
    let last = client.post("/consumers/alice/key-auth", &json!({"key": "alice-key"})).await?;
    let version = last.config_version.expect("version header");
    cluster.converged(version).await?;
    let before = client.get("/config").await?.body;

    // A stop of every node, SIGKILL for one of them.
    cluster.node(1).kill9();
    cluster.node(2).stop();
    cluster.node(3).stop();
    for id in [1, 2, 3] {
        cluster.node(id).start()?;
    }
    cluster.leader().await?;

    // Each node serves the same version and config from its own data dir, before any
    // new write, and its applied version never went below what it acknowledged.
    for id in [1, 2, 3] {
        let node = cluster.client_of(id);
        let status = node.get("/status").await?.body;
        let applied = status["config_version"].as_u64().unwrap_or(0);
        assert!(applied >= version, "node {id} restarted at version {applied}, below {version}");
        let after = node.get("/config?consistency=local").await?.body;
        assert_eq!(after, before, "node {id} lost config across the restart");
    }
    // Kong's shape survives: nested reads by name still resolve.
    let route = client.get("/services/billing/routes/bills").await?;
    assert_eq!(route.body["paths"], json!(["/bills"]));
    Ok(())
}
