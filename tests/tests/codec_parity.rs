//! The two codecs answer alike: the same requests, byte for byte, through a node on
//! the direct HTTP/1.1 codec and a node with `--proxy-direct off` (the hyper adapter
//! only), compared on what the client got and what the upstream received.
//!
//! Compared exactly: the status line, every response header but the per-request ones
//! (`Date`, the request id, the two latencies) and framing (`Content-Length`,
//! `Transfer-Encoding`, `Connection`: hyper may frame a body differently, as HTTP
//! allows), the body's bytes (de-chunked), the upstream's request line, every header
//! it received but the request id and `X-Forwarded-Port` (each node's own listener,
//! checked separately), and the body it received. Header names compare without case
//! and in sorted order, as HTTP defines them.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tollgate_tests::TestCluster;

/// What an upstream received: the request head's text and the body bytes.
type Received = (String, Vec<u8>);

/// An upstream speaking raw HTTP/1.1 that records every request, its answer chosen by
/// the last path segment.
struct RecordingUpstream {
    address: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl RecordingUpstream {
    async fn start() -> anyhow::Result<RecordingUpstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let received = Arc::new(Mutex::new(Vec::new()));
        let record = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, record.clone()));
            }
        });
        Ok(RecordingUpstream { address, received })
    }

    async fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().await)
    }
}

async fn serve(mut stream: tokio::net::TcpStream, record: Arc<Mutex<Vec<Received>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(head) = tollgate_tests::read_request_head(&mut stream, &mut buf).await else {
            return;
        };
        let length = head
            .to_ascii_lowercase()
            .lines()
            .find_map(|line| line.strip_prefix("content-length:").map(|v| v.trim().to_string()))
            .and_then(|value| value.parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buf.extend_from_slice(&chunk[..read]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let mut line = head.split(' ');
        let (method, path) = (line.next().unwrap_or_default().to_string(), line.next().unwrap_or_default());
        let last = path.split('?').next().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string();
        record.lock().await.push((head.clone(), body));
        let answer: &[u8] = match last.as_str() {
            "drop" => return,
            "chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            "hop" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nX-Tollgate-Request-Id: forged\r\nVia: 1.0 other\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok",
            "empty" => b"HTTP/1.1 204 No Content\r\nX-Empty: yes\r\n\r\n",
            "json" => b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\":\"b\"}\r\n",
            "missing" => b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n\r\nnot here\n",
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\n\r\nhello",
        };
        let answer = if method == "HEAD" {
            &answer[..answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4]
        } else {
            answer
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// What a client sees of an answer, normalised as the module doc says.
#[derive(Debug, PartialEq)]
struct Seen {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

const PER_REQUEST: [&str; 7] = [
    "date",
    "x-tollgate-request-id",
    "x-tollgate-upstream-latency",
    "x-tollgate-proxy-latency",
    "content-length",
    "transfer-encoding",
    "connection",
];

fn headers_of(head: &str, skipped: &[&str]) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .filter(|(name, _)| !skipped.contains(&name.as_str()))
        .collect();
    headers.sort();
    headers
}

/// Sends `request` on a new connection and reads the answer to the end.
async fn exchange(proxy_url: &str, request: &[u8]) -> anyhow::Result<Seen> {
    let mut stream = tokio::net::TcpStream::connect(proxy_url.trim_start_matches("http://")).await?;
    stream.write_all(request).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), stream.read_to_end(&mut answer)).await??;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |at| at + 4);
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let raw_body = String::from_utf8_lossy(&answer[split..]).into_owned();
    let mut body = if chunked { tollgate_tests::dechunk(&raw_body).into_bytes() } else { answer[split..].to_vec() };
    // A proxy-made error names its request id in the body too.
    if let Ok(mut json) = serde_json::from_slice::<Value>(&body) {
        if json.get("request_id").is_some() {
            json["request_id"] = json!("-");
            body = json.to_string().into_bytes();
        }
    }
    Ok(Seen {
        status_line: head.lines().next().unwrap_or_default().to_string(),
        headers: headers_of(&head, &PER_REQUEST),
        body,
    })
}

/// The upstream's view of one request, normalised; `port` is the node's proxy port,
/// which must be what `X-Forwarded-Port` says.
/// A request as compared: its line, its headers, its body.
type Sent = (String, Vec<(String, String)>, Vec<u8>);

fn upstream_view(received: &[Received], port: u16) -> Vec<Sent> {
    received
        .iter()
        .map(|(head, body)| {
            let forwarded_port = headers_of(head, &[]).into_iter().find(|(name, _)| name == "x-forwarded-port");
            assert_eq!(forwarded_port.map(|(_, port)| port), Some(port.to_string()), "{head}");
            let headers = headers_of(head, &["x-tollgate-request-id", "x-forwarded-port"]);
            (head.lines().next().unwrap_or_default().to_string(), headers, body.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_codecs_send_and_answer_the_same_bytes() -> anyhow::Result<()> {
    let upstream = RecordingUpstream::start().await?;
    let cluster = TestCluster::start_each(&[&[], &["--proxy-direct", "off"]]).await?;
    let client = cluster.client();
    let url = format!("http://{}", upstream.address);
    client.post("/services", &json!({"name": "plain", "url": url})).await?;
    client.post("/services/plain/routes", &json!({"name": "plain", "paths": ["/p"]})).await?;
    client.post("/services", &json!({"name": "based", "url": format!("{url}/base")})).await?;
    client.post("/services/based/routes", &json!({"paths": ["/strip"]})).await?;
    client.post("/services/based/routes", &json!({"paths": ["/keep"], "strip_path": false})).await?;
    client.post("/services/based/routes", &json!({"paths": ["/preserve"], "preserve_host": true})).await?;
    client.post("/services", &json!({"name": "guarded", "url": url})).await?;
    client.post("/services/guarded/routes", &json!({"name": "guarded", "paths": ["/g"]})).await?;
    client.post("/routes", &json!({"name": "orphan", "paths": ["/orphan"]})).await?;
    client.post("/consumers", &json!({"username": "ana"})).await?;
    client.post("/consumers/ana/key-auth", &json!({"key": "ana-key"})).await?;
    for plugin in [
        json!({"name": "key-auth", "config": {"hide_credentials": true}}),
        json!({"name": "correlation-id", "config": {"echo_downstream": true}}),
        json!({"name": "request-transformer", "config": {"add": {"headers": ["x-added:yes"], "querystring": ["q:1"]}}}),
        json!({"name": "response-transformer", "config": {"add": {"headers": ["x-out:1"]}, "remove": {"headers": ["cache-control"]}}}),
        json!({"name": "rate-limiting", "config": {"hour": 10000, "policy": "local"}}),
    ] {
        client.post("/routes/guarded/plugins", &plugin).await?;
    }
    let last = client.post("/plugins", &json!({"name": "prometheus"})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("plain GET", b"GET /p/a?x=1&y=%20 HTTP/1.1\r\nHost: Example.COM:8000\r\nUser-Agent: parity\r\nAccept: */*\r\nConnection: close\r\n\r\n".to_vec()),
        (
            "hop-by-hop and forwarded headers",
            b"GET /p/a HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Prefix: /evil\r\nX-Real-IP: 9.9.9.9\r\nProxy: http://evil\r\nX-Drop-Me: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nVia: 1.0 edge\r\nX-Tollgate-Request-Id: forged\r\nConnection: close, x-drop-me\r\n\r\n".to_vec(),
        ),
        ("POST with a body", b"POST /p/form HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world".to_vec()),
        ("HEAD", b"HEAD /p/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("strip_path onto a service path", b"GET /strip/x/y?z=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("strip_path off", b"GET /keep/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("preserve_host", b"GET /preserve/ HTTP/1.1\r\nHost: client.example:81\r\nConnection: close\r\n\r\n".to_vec()),
        ("dot segments and escapes", b"GET /p/b/%2e%2e/c/%7Euser/x%2Fy HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("chunked answer", b"GET /p/chunked HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("hop-by-hop answer headers", b"GET /p/hop HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("204", b"GET /p/empty HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("upstream 404", b"GET /p/missing HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("no route", b"GET /nowhere HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("HEAD with no route", b"HEAD /nowhere HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("a route without a service", b"GET /orphan HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("the upstream closes unanswered", b"GET /p/drop HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".to_vec()),
        ("plugins: refused", b"GET /g/json HTTP/1.1\r\nHost: h\r\nKong-Request-ID: fixed\r\nConnection: close\r\n\r\n".to_vec()),
        ("plugins: through", b"GET /g/json?apikey=ana-key&k=v HTTP/1.1\r\nHost: h\r\nKong-Request-ID: fixed\r\nConnection: close\r\n\r\n".to_vec()),
        ("plugins: a POST", b"POST /g/form?apikey=ana-key HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nKong-Request-ID: fixed\r\nConnection: close\r\n\r\nabc".to_vec()),
    ];
    let direct = cluster.nodes[0].proxy_url();
    let hyper = cluster.nodes[1].proxy_url();
    let port = |url: &str| url.rsplit(':').next().and_then(|port| port.parse::<u16>().ok()).unwrap_or(0);
    for (name, request) in &cases {
        upstream.take().await;
        let seen_direct = exchange(&direct, request).await?;
        let mut sent_direct = upstream_view(&upstream.take().await, port(&direct));
        let seen_hyper = exchange(&hyper, request).await?;
        let mut sent_hyper = upstream_view(&upstream.take().await, port(&hyper));
        if request.starts_with(b"GET /p/drop ") {
            // Either codec sends this once more when the connection it used was a
            // pooled one (closed unanswered on a reused connection: retried, as nginx
            // does), and whether the previous case's connection was back in the pool
            // yet is a race of the node's tasks, not a difference of the codecs (seen
            // once in CI). The bytes of what was sent must still be the same.
            sent_direct.dedup();
            sent_hyper.dedup();
        }
        assert_eq!(seen_direct, seen_hyper, "{name}: what the client got");
        assert_eq!(sent_direct, sent_hyper, "{name}: what the upstream received");
        assert!(seen_direct.status_line.starts_with("HTTP/1.1 "), "{name}: {seen_direct:?}");
        eprintln!("{name}: {} ({} upstream requests)", seen_direct.status_line, sent_direct.len());
    }
    // The direct node took these on its direct codec (the comparison is between the
    // two codecs, not twice the same one), all but a request asking for trailers
    // (`TE`), which takes the hyper adapter on both nodes.
    let metrics = cluster.client_of(1).get("/metrics").await?.body.as_str().unwrap_or_default().to_string();
    let direct_requests = metrics
        .lines()
        .find_map(|line| line.strip_prefix("tollgate_proxy_direct_requests_total"))
        .and_then(|rest| rest.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let asking_trailers = cases.iter().filter(|(_, request)| request.windows(6).any(|w| w == b"\r\nTE: ")).count();
    assert_eq!(asking_trailers, 1);
    assert_eq!(direct_requests, (cases.len() - asking_trailers) as f64);
    Ok(())
}
