//! The proxy listeners' listen backlog: nginx's 511 by default (std's bind gave 128,
//! issue 19), `--proxy-backlog` sets it, a value out of range is refused naming it.
//! And the process the listeners run in: without transparent huge pages. And what
//! they send on h2: the request id never indexed by HPACK.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_tests::{EchoServer, TestCluster, CONVERGE_TIMEOUT};

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

/// An HPACK integer with an `prefix`-bit prefix at the start of `block` (RFC 7541
/// §5.1): its value and the bytes it took.
fn hpack_integer(block: &[u8], prefix: u32) -> (usize, usize) {
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(block[0]) & max;
    let mut used = 1;
    if value == max {
        let mut shift = 0;
        loop {
            let byte = block[used];
            used += 1;
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    (value, used)
}

/// The representations in an HPACK header block, as (first byte's kind, name index):
/// "indexed", "incremental", "size", "never", "without" (RFC 7541 §6).
fn hpack_representations(mut block: &[u8]) -> Vec<(&'static str, usize)> {
    let mut seen = Vec::new();
    while let Some(&first) = block.first() {
        let (kind, prefix) = match first {
            0x80.. => ("indexed", 7),
            0x40.. => ("incremental", 6),
            0x20.. => ("size", 5),
            0x10.. => ("never", 4),
            _ => ("without", 4),
        };
        let (index, mut used) = hpack_integer(block, prefix);
        if matches!(kind, "incremental" | "never" | "without") {
            // A new name (index 0) as a string, then the value as one.
            for _ in 0..if index == 0 { 2 } else { 1 } {
                let (length, took) = hpack_integer(&block[used..], 7);
                used += took + length;
            }
        }
        seen.push((kind, index));
        block = &block[used..];
    }
    seen
}

/// On h2 each response's request id (unique; the proxy's and correlation-id's) goes as
/// a literal never indexed: indexed, it went into the connection's HPACK table on both
/// ends with every response, evicting the fields that do repeat, and the encoder
/// compared each new id with all those still there (2.5% of the proxy's CPU on h2c;
/// node/PROXY.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_responses_never_index_the_request_id() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    client.post("/services", &serde_json::json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    client.post("/services/echo/routes", &serde_json::json!({"name": "h2", "paths": ["/h2"]})).await?;
    // correlation-id echoes its (as unique) id too.
    let plugin = serde_json::json!({"name": "correlation-id", "config": {"echo_downstream": true}});
    let last = client.post("/routes/h2/plugins", &plugin).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", cluster.nodes[0].proxy_port)).await?;
    // The preface and empty SETTINGS, then three GETs of /h2 (HEADERS with END_STREAM
    // and END_HEADERS): :method GET and :scheme http from the static table, :path and
    // :authority as literals not indexed.
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec();
    let block: &[u8] = b"\x82\x86\x04\x03/h2\x01\x09127.0.0.1";
    for stream_id in [1u32, 3, 5] {
        out.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[0x1, 0x5]);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(block);
    }
    stream.write_all(&out).await?;

    let mut answered = Vec::new();
    let read = async {
        while answered.len() < 3 {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await?;
            let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; length];
            stream.read_exact(&mut payload).await?;
            match (head[3], head[4]) {
                // The server's SETTINGS: acknowledged.
                (0x4, 0) => stream.write_all(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00").await?,
                (0x1, flags) => {
                    assert_eq!(flags & 0x4, 0x4, "one HEADERS frame per response head");
                    answered.push(hpack_representations(&payload));
                }
                _ => {}
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(CONVERGE_TIMEOUT, read).await??;
    for representations in &answered {
        let never: Vec<_> = representations.iter().filter(|(kind, _)| *kind == "never").collect();
        // Tollgate's id and correlation-id's `Kong-Request-ID`: names in no table, so
        // new names, index 0.
        assert_eq!(never, [&("never", 0), &("never", 0)], "{answered:?}");
    }
    Ok(())
}
