//! The graceful stop (SIGTERM, as Docker and Kubernetes send it): the node answers not
//! ready, accepts no new proxy connections, closes idle ones, answers the request in
//! progress (with `Connection: close`), hands leadership to another voter while it is
//! still running, and exits cleanly.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate_tests::{eventually, read_request_head, TestCluster, CONVERGE_TIMEOUT};

/// An upstream that holds every request until `release` fires, then answers 200.
async fn held_upstream() -> anyhow::Result<(String, tokio::sync::watch::Sender<bool>, tokio::sync::mpsc::Receiver<()>)>
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let (release, released) = tokio::sync::watch::channel(false);
    let (arrived_tx, arrived) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut released = released.clone();
            let arrived_tx = arrived_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_request_head(&mut stream, &mut buf).await.is_some() {
                    let _ = arrived_tx.try_send(());
                    let _ = released.wait_for(|go| *go).await;
                    let body = "held";
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((address, release, arrived))
}

type Held = (TestCluster, tokio::sync::watch::Sender<bool>, tokio::sync::mpsc::Receiver<()>);

/// Three nodes with `--drain-timeout-ms drain_ms`, and route `/held` to a held upstream.
async fn cluster_with_held_route(drain_ms: &str) -> anyhow::Result<Held> {
    let cluster = TestCluster::start_with(3, &["--drain-timeout-ms", drain_ms]).await?;
    let (upstream, release, arrived) = held_upstream().await?;
    cluster.client().post("/services", &json!({"name": "held", "url": format!("http://{upstream}")})).await?;
    let route = cluster.client().post("/services/held/routes", &json!({"paths": ["/held"]})).await?;
    cluster.converged(route.config_version.expect("a config version")).await?;
    Ok((cluster, release, arrived))
}

async fn ready(url: &str) -> Option<u16> {
    let client = tollgate_client::AdminClient::new([url]);
    match client.get("/status/ready").await {
        Ok(reply) => Some(reply.status),
        Err(error) => error.status(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_hands_off_leadership_and_exits() -> anyhow::Result<()> {
    // A drain bound long enough that the node is still running, draining, while the
    // test looks at the rest of the cluster.
    let (mut cluster, release, mut arrived) = cluster_with_held_route("30000").await?;

    let leader = cluster.leader().await?;
    let (proxy, admin) = {
        let node = cluster.node(leader);
        (node.proxy_url(), node.admin_url())
    };
    let proxy_addr = proxy.trim_start_matches("http://").to_string();
    assert_eq!(ready(&admin).await, Some(200), "the leader is ready before it stops");

    // An idle keep-alive connection, and a request in progress.
    let mut idle = TcpStream::connect(&proxy_addr).await?;
    let mut busy = TcpStream::connect(&proxy_addr).await?;
    busy.write_all(b"GET /held HTTP/1.1\r\nHost: gw\r\n\r\n").await?;
    tokio::time::timeout(CONVERGE_TIMEOUT, arrived.recv()).await?.expect("the request reached the upstream");

    cluster.node(leader).terminate();

    eventually("the stopping node to answer not ready", CONVERGE_TIMEOUT, || async {
        (ready(&admin).await == Some(503)).then_some(())
    })
    .await?;
    eventually("the stopping node to refuse new proxy connections", CONVERGE_TIMEOUT, || async {
        TcpStream::connect(&proxy_addr).await.is_err().then_some(())
    })
    .await?;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(CONVERGE_TIMEOUT, idle.read_to_end(&mut rest)).await?;
    assert!(closed.is_ok() && rest.is_empty(), "the idle connection is closed without an answer");

    // Leadership moved while the old leader still runs (it is holding a request).
    let others: Vec<u64> = cluster.nodes.iter().map(|node| node.id).filter(|id| *id != leader).collect();
    let successor = eventually("another node to lead while the old leader drains", CONVERGE_TIMEOUT, || async {
        for id in &others {
            if let Some(status) = cluster.status(*id).await {
                if status["role"] == "leader" && status["leader_id"].as_u64() == Some(*id) {
                    return Some(*id);
                }
            }
        }
        None
    })
    .await;
    let Ok(successor) = successor else {
        panic!("no other leader while the old one drains; its log:\n{}", cluster.node(leader).log());
    };
    assert!(cluster.node(leader).try_exit().is_none(), "the old leader is still draining");
    // A write through the new leader is accepted meanwhile.
    cluster
        .client_of(successor)
        .post("/services", &json!({"name": "during-drain", "url": "http://x.internal"}))
        .await?;

    // The request in progress is answered, and its connection closed after it.
    release.send_replace(true);
    let mut answer = Vec::new();
    tokio::time::timeout(CONVERGE_TIMEOUT, busy.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "the request in progress is answered: {answer}");
    assert!(answer.contains("connection: close"), "with Connection: close: {answer}");
    assert!(answer.ends_with("held"), "{answer}");

    let status = eventually("the node to exit", CONVERGE_TIMEOUT, || {
        let status = cluster.node(leader).try_exit();
        async move { status }
    })
    .await?;
    assert!(status.success(), "a graceful stop exits 0: {status:?}");
    let log = cluster.node(leader).log();
    assert!(log.contains("leadership handed off"), "the log says the hand-off happened:\n{log}");
    Ok(())
}

/// A node whose drain bound passes with a request still in progress cuts it and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_bound_cuts_what_is_left() -> anyhow::Result<()> {
    let (mut cluster, _release, mut arrived) = cluster_with_held_route("300").await?;
    let proxy_addr = cluster.node(1).proxy_url().trim_start_matches("http://").to_string();
    let mut busy = TcpStream::connect(&proxy_addr).await?;
    busy.write_all(b"GET /held HTTP/1.1\r\nHost: gw\r\n\r\n").await?;
    tokio::time::timeout(CONVERGE_TIMEOUT, arrived.recv()).await?.expect("the request reached the upstream");
    cluster.node(1).terminate();
    let status = eventually("the node to exit past its drain bound", CONVERGE_TIMEOUT, || {
        let status = cluster.node(1).try_exit();
        async move { status }
    })
    .await?;
    assert!(status.success(), "{status:?}");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), busy.read_to_end(&mut answer)).await?;
    assert!(answer.is_empty(), "the held request was cut, not answered: {}", String::from_utf8_lossy(&answer));
    Ok(())
}
