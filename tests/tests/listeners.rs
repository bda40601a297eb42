//! The proxy listeners' listen backlog: nginx's 511 by default (std's bind gave 128,
//! issue 19), `--proxy-backlog` sets it, a value out of range is refused naming it.

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
