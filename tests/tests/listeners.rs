//! The proxy listeners' listen backlog: nginx's 511 by default (std's bind gave 128,
//! issue 19), `--proxy-backlog` sets it, a value out of range is refused naming it.
//! And the process the listeners run in: without transparent huge pages.

use tollgate_tests::TestCluster;

/// The backlog the kernel reports for the socket listening on `port` (`ss`: Send-Q of
/// a listening socket).
fn backlog_of(port: u16) -> Option<u32> {
    let output = std::process::Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().find_map(|line| line.split_whitespace().nth(2)?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_listen_backlog_is_nginxs_and_configurable() -> anyhow::Result<()> {
    let tls_port = tollgate_tests::free_port();
    let cluster = TestCluster::start_each(&[
        &[],
        &["--proxy-backlog", "1024", "--proxy-tls-listen", &format!("127.0.0.1:{tls_port}")],
    ])
    .await?;
    assert_eq!(backlog_of(cluster.nodes[0].proxy_port), Some(511));
    assert_eq!(backlog_of(cluster.nodes[1].proxy_port), Some(1024));
    assert_eq!(backlog_of(tls_port), Some(1024));

    let dir = tempfile::tempdir()?;
    let refused = std::process::Command::new(tollgate_tests::tollgate_binary())
        .args(["run", "--node-id", "1", "--proxy-backlog", "0", "--data-dir"])
        .arg(dir.path())
        .output()?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("proxy_backlog"), "{stderr}");
    Ok(())
}

/// A node runs without transparent huge pages: mimalloc asks for them, and with them a
/// node started at 39 MB of RSS instead of 25 and kept 8 MB of a burst of connections
/// after they closed in a third of the runs (node/PROXY.md, "Memory per connection").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_without_transparent_huge_pages() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let pid = cluster.nodes[0].pid().expect("the node runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    // The process-wide switch (`prctl(PR_SET_THP_DISABLE)`), as Linux 5.0 and later show it.
    let enabled = status.lines().find_map(|line| line.strip_prefix("THP_enabled:")).map(str::trim);
    assert_eq!(enabled, Some("0"), "{status}");
    Ok(())
}
