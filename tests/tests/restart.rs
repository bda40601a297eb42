//! CFG3 and durability: a full-cluster stop and restart keeps every entity and the
//! config version; a node restarts from its data dir alone, answers every request it
//! accepts from its first moment, and never reports lower indexes than before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;
use tokio::sync::Mutex;
use tollgate_node::config::{RAFT_ELECTION_MAX_MS_DEFAULT, RAFT_ELECTION_MIN_MS_DEFAULT};
use tollgate_tests::{eventually, CountingUpstream, TestCluster, CONVERGE_TIMEOUT};

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

/// What the load saw of one restarting node.
#[derive(Default)]
struct Answers {
    /// Requests answered 200.
    ok: AtomicU64,
    /// Requests answered with another status, or a connection closed without an
    /// answer, while the node was not being stopped.
    wrong: Mutex<Vec<String>>,
}

/// One request on a fresh connection, `None` when the connection was refused (the node
/// is down: nothing was accepted, so nothing is owed).
async fn fresh_request(address: &str) -> Option<Result<u16, String>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let exchange = async {
        stream.write_all(b"GET /hot HTTP/1.1\r\nhost: restart.test\r\nconnection: close\r\n\r\n").await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(CONVERGE_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => return Some(Err(format!("connection failed: {error}"))),
        Err(_) => return Some(Err("no answer in time".to_string())),
    };
    let text = String::from_utf8_lossy(&answer);
    match text.split(' ').nth(1).and_then(|code| code.parse().ok()) {
        Some(status) => Some(Ok(status)),
        None => Some(Err(format!("closed without an answer ({} bytes)", answer.len()))),
    }
}

/// A declarative config of one service at `url` with `routes` routes, and route `/hot`.
fn many_routes(routes: usize, url: &str) -> serde_json::Value {
    let mut paths: Vec<serde_json::Value> = (0..routes).map(|n| json!({"paths": [format!("/r{n}")]})).collect();
    paths.push(json!({"name": "hot", "paths": ["/hot"]}));
    json!({"_format_version": "3.0", "services": [{"name": "many", "url": url, "routes": paths}]})
}

/// Issue 12: a node with 20 000 routes restarted 20 times under load answers every
/// request it accepts, from the first one: no panic before its first publication, no
/// connection closed without an answer, no 404 for a route the config has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_node_answers_every_request_it_accepts() -> anyhow::Result<()> {
    const ROUTES: usize = 20_000;
    const RESTARTS: usize = 20;
    let upstream = CountingUpstream::start().await?;
    let mut cluster = TestCluster::start(1).await?;
    let loaded =
        cluster.client().post("/config", &many_routes(ROUTES, &format!("http://{}", upstream.address))).await?;
    cluster.published(loaded.config_version.unwrap_or(0)).await?;

    let address = format!("127.0.0.1:{}", cluster.nodes[0].proxy_port);
    let answers = Arc::new(Answers::default());
    // Bumped as each stop begins and once the process is gone: an answer lost by a
    // request that overlapped a stop is the stop's doing, not the node's.
    let stops = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (address, answers, stops, running) = (address.clone(), answers.clone(), stops.clone(), running.clone());
        load.spawn(async move {
            while running.load(Ordering::SeqCst) {
                let before = stops.load(Ordering::SeqCst);
                let Some(outcome) = fresh_request(&address).await else {
                    tokio::task::yield_now().await;
                    continue;
                };
                // Odd while a stop is under way; changed if one began meanwhile.
                if before % 2 == 1 || stops.load(Ordering::SeqCst) != before {
                    continue;
                }
                match outcome {
                    Ok(200) => {
                        answers.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(status) => answers.wrong.lock().await.push(format!("status {status}")),
                    Err(error) => answers.wrong.lock().await.push(error),
                }
            }
        });
    }
    for restart in 0..RESTARTS {
        let served = answers.ok.load(Ordering::SeqCst);
        eventually("the node to serve the load", CONVERGE_TIMEOUT, || async {
            (answers.ok.load(Ordering::SeqCst) > served).then_some(())
        })
        .await?;
        stops.fetch_add(1, Ordering::SeqCst);
        if restart % 2 == 0 {
            cluster.node(1).kill9();
        } else {
            cluster.node(1).stop();
        }
        stops.fetch_add(1, Ordering::SeqCst);
        cluster.node(1).start()?;
    }
    let served = answers.ok.load(Ordering::SeqCst);
    eventually("the node to serve after the last start", CONVERGE_TIMEOUT, || async {
        (answers.ok.load(Ordering::SeqCst) > served).then_some(())
    })
    .await?;
    running.store(false, Ordering::SeqCst);
    while load.join_next().await.is_some() {}
    let wrong = answers.wrong.lock().await.clone();
    println!(
        "{RESTARTS} restarts with {ROUTES} routes: {} answered 200, {} wrong",
        answers.ok.load(Ordering::SeqCst),
        wrong.len()
    );
    let log = cluster.nodes[0].log();
    let notable: Vec<&str> = log.lines().filter(|line| line.contains("WARN") || line.contains("ERROR")).collect();
    assert!(
        wrong.is_empty(),
        "{} requests not answered 200: {:?}\nnode warnings:\n{}",
        wrong.len(),
        &wrong[..wrong.len().min(10)],
        notable.join("\n")
    );
    assert!(!cluster.nodes[0].log().contains("panicked"), "the node panicked:\n{}", cluster.nodes[0].log());
    Ok(())
}

/// Issue 12: `/status` never goes backwards, across restarts too (CFG3 as a client sees
/// it): polled as fast as it answers while node 3 restarts ten times, killed or
/// stopped, with writes in between, no field read lower than it was before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_never_goes_backwards_across_restarts() -> anyhow::Result<()> {
    const RESTARTS: usize = 10;
    const FIELDS: [&str; 5] = ["term", "commit_index", "applied_index", "config_version", "published_version"];
    let mut cluster = TestCluster::start(3).await?;
    // A config large enough that compiling it takes a while after each start.
    let loaded = cluster.client().post("/config", &many_routes(20_000, "http://127.0.0.1:9")).await?;
    cluster.published(loaded.config_version.unwrap_or(0)).await?;
    let admin = cluster.client_of(3);
    let readings: Arc<Mutex<Vec<[u64; 5]>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let poller = {
        let (readings, running) = (readings.clone(), running.clone());
        tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                let Ok(reply) = admin.get("/status").await else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let reading = FIELDS.map(|field| reply.body[field].as_u64().unwrap_or(0));
                readings.lock().await.push(reading);
            }
        })
    };
    for restart in 0..RESTARTS {
        let written = cluster.client_of(1).post("/consumers", &json!({"username": format!("user-{restart}")})).await?;
        cluster.published(written.config_version.unwrap_or(0)).await?;
        let seen = readings.lock().await.len();
        eventually("node 3's status read after the write", CONVERGE_TIMEOUT, || async {
            (readings.lock().await.len() > seen + 2).then_some(())
        })
        .await?;
        if restart % 2 == 0 {
            cluster.node(3).kill9();
        } else {
            cluster.node(3).stop();
        }
        cluster.node(3).start()?;
        let seen = readings.lock().await.len();
        eventually("node 3 to answer after its start", CONVERGE_TIMEOUT, || async {
            (readings.lock().await.len() > seen + 2).then_some(())
        })
        .await?;
    }
    running.store(false, Ordering::SeqCst);
    poller.await?;
    let readings = readings.lock().await.clone();
    println!("{} readings of node 3's /status over {RESTARTS} restarts", readings.len());
    for pair in readings.windows(2) {
        for (index, field) in FIELDS.iter().enumerate() {
            assert!(pair[1][index] >= pair[0][index], "{field} went from {} to {}", pair[0][index], pair[1][index]);
        }
    }
    Ok(())
}

/// A restarting follower with a large config leaves the leader and the term alone. Found
/// by CI (status_never_goes_backwards_across_restarts, 503 "no leader reachable"): the
/// cluster port was served only after the restored config was compiled, so a follower
/// that takes longer than an election timeout to compile heard no heartbeat, called an
/// election its current log could win, and then led while nothing answered on its
/// cluster port. Raft's port now answers from the moment Raft runs. Under the full
/// suite's load the term still rose (4 to 6) when the restarted member's first election
/// timeout beat the leader's next heartbeat: a restarting member now holds its
/// elections for three timeouts (`RESTART_ELECTION_HOLD_TIMEOUTS`).
///
/// The three members share this host's two cores with the restarted one's compile of
/// 20 000 routes (a debug build's, seconds of CPU). CI failed here once; with two busy
/// loops beside the test it failed 1 run in 13, and the nodes' logs showed the leader
/// silent for 0.7 s and the *other* follower, which had not restarted, winning an
/// election at the default 200–400 ms. That is Raft doing its job on a starved host,
/// not what this test is about: the cluster runs with election timeouts
/// `ELECTION_TIMEOUT_SCALE` times the defaults, and the hold, counted in them, scales
/// with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_follower_keeps_the_leader_and_the_term() -> anyhow::Result<()> {
    const RESTARTS: usize = 6;
    const ELECTION_TIMEOUT_SCALE: u64 = 3;
    let min_ms = (ELECTION_TIMEOUT_SCALE * RAFT_ELECTION_MIN_MS_DEFAULT).to_string();
    let max_ms = (ELECTION_TIMEOUT_SCALE * RAFT_ELECTION_MAX_MS_DEFAULT).to_string();
    let mut cluster =
        TestCluster::start_with(3, &["--raft-election-min-ms", &min_ms, "--raft-election-max-ms", &max_ms]).await?;
    let loaded = cluster.client().post("/config", &many_routes(20_000, "http://127.0.0.1:9")).await?;
    let version = loaded.config_version.unwrap_or(0);
    cluster.published(version).await?;
    let leader = cluster.leader().await?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let term_of = |status: Option<serde_json::Value>| status.and_then(|s| s["term"].as_u64()).unwrap_or(0);
    let term = term_of(cluster.status(leader).await);
    for restart in 0..RESTARTS {
        cluster.node(follower).kill9();
        cluster.node(follower).start()?;
        cluster.published(version).await?;
        // An answer, not a failed request, decides (a request that failed read as "no
        // leader" before).
        let status = eventually("the leader's /status", CONVERGE_TIMEOUT, || cluster.status(leader)).await?;
        let (now, after) = (status["leader_id"].as_u64(), term_of(Some(status.clone())));
        if now != Some(leader) || after != term {
            let logs: Vec<String> =
                (1..=3).map(|id| format!("--- node {id}'s log:\n{}", cluster.node(id).log())).collect();
            panic!(
                "restart {restart} of node {follower}: leader {leader} at term {term} became leader {now:?} at term {after}\n{}",
                logs.join("\n")
            );
        }
    }
    Ok(())
}
