//! `tollgate dev`, a newcomer's first screen: a short summary (each node's proxy and
//! admin URLs, the demo route, how to stop) and nothing alarming while the three nodes
//! find each other; the demo route answers; Ctrl-C stops it cleanly.
//!
//! It takes `tollgate dev`'s fixed ports (8000-8205, echo on 9000): no other test uses
//! them (tests take ports from 20000 up).

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tollgate_tests::{eventually, tollgate_binary, ProxyClient, CONVERGE_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_starts_with_a_summary_and_nothing_alarming() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(tollgate_binary())
        .arg("dev")
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut screen = Vec::new();
    tokio::time::timeout(CONVERGE_TIMEOUT, async {
        while let Some(line) = stdout.next_line().await? {
            let last = line.contains("Ctrl-C stops");
            screen.push(line);
            if last {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await??;
    let screen = screen.join("\n");
    for expected in [
        "node 1: proxy http://127.0.0.1:8000  admin http://127.0.0.1:8001",
        "node 2: proxy http://127.0.0.1:8100  admin http://127.0.0.1:8101",
        "node 3: proxy http://127.0.0.1:8200  admin http://127.0.0.1:8201",
        "curl -s http://127.0.0.1:8200/echo/hello",
        "Ctrl-C stops the cluster.",
    ] {
        assert!(screen.contains(expected), "the first screen shows {expected:?}:\n{screen}");
    }
    let proxy = ProxyClient::new();
    let reply = eventually("the demo route to answer", CONVERGE_TIMEOUT, || async {
        proxy.request("http://127.0.0.1:8200", "GET", None, "/echo/hello", &[]).await.ok().filter(|r| r.status == 200)
    })
    .await?;
    assert_eq!(reply.body["path"], "/hello", "the echo upstream got the path without the route's prefix");

    let pid = child.id().expect("running").to_string();
    std::process::Command::new("kill").args(["-INT", &pid]).status()?;
    let status = tokio::time::timeout(CONVERGE_TIMEOUT, child.wait()).await??;
    assert!(status.success(), "Ctrl-C stops it cleanly: {status:?}");
    let errors = errors.await?;
    assert!(
        !errors.contains("ERROR") && !errors.contains("WARN"),
        "nothing alarming on an expected start and stop:\n{errors}"
    );
    Ok(())
}
