//! Config storm on a three-node cluster: steady proxy traffic on a route that stays,
//! while 100 route writes per second (creates and deletes) go through the Admin API.
//!
//! Run: `cargo build --release -p tollgate-node -p tollgate-tests &&
//!       target/release/config-storm [--seconds 30] [--writes 100] [--rps 200]`
//! (`--rps` is per node).

use std::time::Duration;

use tollgate_tests::{cli_arg, storm, EchoServer, TestCluster};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = cli_arg("--seconds", 30);
    let writes = cli_arg("--writes", 100);
    let rps = cli_arg("--rps", 200);
    let echo = EchoServer::start().await?;
    let cluster = TestCluster::start(3).await?;
    let report = storm::run(&cluster, &echo, Duration::from_secs(seconds), writes, rps).await?;
    println!("config storm: {seconds} s, target {writes} writes/s, {rps} requests/s per node on 3 nodes");
    println!(
        "writes: {} ({:.1}/s), failed writes: {}",
        report.writes,
        report.writes as f64 / seconds as f64,
        report.failed_writes
    );
    println!(
        "requests on the stable route: {}, failed: {}, socket errors: {}",
        report.requests, report.failed_requests, report.socket_errors
    );
    if report.failed_requests > 0 || report.socket_errors > 0 {
        anyhow::bail!("requests failed during the storm");
    }
    Ok(())
}
