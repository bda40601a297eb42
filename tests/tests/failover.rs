//! CFG1 under a leader crash: 200 writes spread over all nodes, the leader killed with
//! SIGKILL midway, writes continuing through the survivors, the killed node restarted
//! from its data dir; every acknowledged write is then present exactly once everywhere.

use std::collections::BTreeMap;
use tokio::time::Instant;

use serde_json::json;
use tollgate_tests::{eventually, TestCluster, CONVERGE_TIMEOUT};

const WRITES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_leader_kill() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3).await?;
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new(); // name -> id
    let mut killed = None;
    let mut failover_ms = None;

    for n in 0..WRITES {
        if n == WRITES / 2 {
            let leader = cluster.leader().await?;
            cluster.node(leader).kill9();
            killed = Some(leader);
        }
        let name = format!("svc-{n:04}");
        let body = json!({"name": name, "url": format!("http://backend-{n}.internal:8080/v1")});
        // Spread writes over the nodes that are running, round-robin.
        let running: Vec<u64> = cluster.nodes.iter().filter(|node| node.is_running()).map(|node| node.id).collect();
        let target = running[n % running.len()];
        let started = Instant::now();
        let created = eventually(&format!("write {name} through node {target}"), CONVERGE_TIMEOUT, || async {
            match cluster.client_of(target).post("/services", &body).await {
                Ok(reply) => Some(Ok(reply)),
                // 503 while the cluster elects a new leader: the write was not applied.
                Err(error) if error.status() == Some(503) => None,
                Err(error) => Some(Err(error)),
            }
        })
        .await??;
        if n == WRITES / 2 {
            failover_ms = Some(started.elapsed().as_millis());
        }
        assert_eq!(created.status, 201);
        assert!(created.config_version.is_some(), "writes answer with Tollgate-Config-Version");
        acknowledged.insert(name, created.body["id"].as_str().expect("id").to_string());
    }
    let killed = killed.expect("a leader was killed");
    println!("first write after killing leader {killed} was accepted after {} ms", failover_ms.unwrap_or_default());

    cluster.node(killed).start()?;
    let final_version = cluster.client().get("/status").await?.body["config_version"].as_u64().unwrap_or(0);
    cluster.converged(final_version).await?;

    for node in [1, 2, 3] {
        let services = cluster.client_of(node).list_all("/services?consistency=local").await?;
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for service in &services {
            let name = service["name"].as_str().expect("name").to_string();
            let previous = seen.insert(name.clone(), service["id"].as_str().expect("id").to_string());
            assert!(previous.is_none(), "node {node} holds {name} twice");
        }
        assert_eq!(seen, acknowledged, "node {node} holds exactly the acknowledged writes");
    }
    Ok(())
}
