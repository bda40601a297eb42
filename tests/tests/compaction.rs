//! After 10 000 writes the log is compacted (a snapshot is built and the log before it
//! purged); a node added afterwards with `--join` receives the snapshot and ends with
//! the same config.

use std::sync::Arc;

use serde_json::json;
use tollgate_tests::{eventually, TestCluster, CONVERGE_TIMEOUT};

const WRITES: usize = 10_000;
const WRITERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_log_ships_as_a_snapshot_to_a_joining_node() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3).await?;
    let client = Arc::new(cluster.client());
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let client = client.clone();
        writers.spawn(async move {
            for n in (writer..WRITES).step_by(WRITERS) {
                client.post("/consumers", &json!({"username": format!("user-{n:05}")})).await?;
            }
            Ok::<_, tollgate_client::ClientError>(())
        });
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    let leader = cluster.leader().await?;
    let status = cluster.status(leader).await.expect("leader status");
    let purged = status["purged_index"].as_u64().unwrap_or(0);
    assert!(purged > 0, "the log was not compacted after {WRITES} writes: {status}");
    println!("after {WRITES} writes: snapshot at {}, log purged up to {purged}", status["snapshot_index"]);

    let version = status["config_version"].as_u64().expect("version");
    let joiner = cluster.add_joiner(4);
    joiner.start()?;
    eventually("node 4 to become a voter", CONVERGE_TIMEOUT, || async {
        let view = cluster.client().get("/cluster").await.ok()?.body;
        let members = view["members"].as_array()?.clone();
        members.iter().any(|m| m["node_id"] == 4 && m["voter"] == true).then_some(())
    })
    .await?;
    cluster.converged(version).await?;

    let joined = cluster.status(4).await.expect("joiner status");
    // The entries before `purged` exist nowhere as log any more: node 4 can only hold
    // them through a snapshot (the leader may have built a newer one meanwhile).
    assert!(
        joined["snapshot_index"].as_u64().is_some_and(|index| index >= purged),
        "node 4 did not install a snapshot covering the purged log (up to {purged}): {joined}"
    );
    let expected = cluster.client_of(leader).get("/config?consistency=local").await?.body;
    let got = cluster.client_of(4).get("/config?consistency=local").await?.body;
    assert_eq!(got["consumers"].as_array().map(Vec::len), Some(WRITES));
    assert!(got == expected, "node 4's config differs from the leader's");

    // And out again: DELETE /cluster/members/4 leaves three voters that keep writing.
    let client = cluster.client();
    assert_eq!(client.delete("/cluster/members/4").await?.status, 204);
    // Every node's answer after the removal reflects it (GET /cluster is a linearizable
    // read; a follower's own view used to lag: seen once in a full run).
    for id in [1, 2, 3] {
        let view = cluster.client_of(id).get("/cluster").await?.body;
        let members: Vec<u64> =
            view["members"].as_array().expect("members").iter().filter_map(|m| m["node_id"].as_u64()).collect();
        assert_eq!(members, vec![1, 2, 3], "node {id}'s view after the removal: {view}");
    }
    assert_eq!(client.post("/consumers", &json!({"username": "after-removal"})).await?.status, 201);
    Ok(())
}
