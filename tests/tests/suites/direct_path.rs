// The suite itself; `PROXY_MODE` comes from the test file that includes it
// (tests/tests/direct_path.rs and tests/tests/direct_path_hyper.rs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_tests::{raw_exchange, ProxyClient, TestCluster};

const BIG_BODY_BYTES: usize = 300_000;

/// An upstream speaking raw HTTP/1.1, its answer chosen by the request path. It counts
/// the connections it accepted; on `/drop-second` connections it closes, unanswered,
/// when a second request arrives (what an upstream closing an idle keep-alive
/// connection looks like to a proxy that just reused it).
struct ScriptedUpstream {
    address: String,
    connections: Arc<AtomicU64>,
    /// Requests for `/secret`, which no test route should let through.
    secrets: Arc<AtomicU64>,
}

impl ScriptedUpstream {
    async fn start() -> anyhow::Result<ScriptedUpstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let connections = Arc::new(AtomicU64::new(0));
        let secrets = Arc::new(AtomicU64::new(0));
        let (counted, secret) = (connections.clone(), secrets.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_scripted(stream, secret.clone()));
            }
        });
        Ok(ScriptedUpstream { address, connections, secrets })
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_scripted(mut stream: tokio::net::TcpStream, secrets: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    let mut answered = 0;
    loop {
        // One request head (the tests send no bodies here).
        let Some(head) = tollgate_tests::read_request_head(&mut stream, &mut buf).await else {
            return;
        };
        // Skip a body: by its length, or (chunked) through its last chunk.
        let lower = head.to_ascii_lowercase();
        let length = lower
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse::<usize>().ok());
        let body_end = |buf: &[u8]| match length {
            Some(length) => (buf.len() >= length).then_some(length),
            None if lower.contains("transfer-encoding: chunked") => {
                buf.windows(5).position(|w| w == b"0\r\n\r\n").map(|at| at + 5)
            }
            None => Some(0),
        };
        loop {
            if let Some(skip) = body_end(&buf) {
                buf.drain(..skip);
                break;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buf.extend_from_slice(&chunk[..read]),
            }
        }
        let mut line = head.split(' ');
        let (method, path) = (line.next().unwrap_or_default(), line.next().unwrap_or_default());
        if path.ends_with("/secret") {
            secrets.fetch_add(1, Ordering::SeqCst);
        }
        if path.ends_with("/drop-second") && answered == 1 {
            return;
        }
        answered += 1;
        let answer: Vec<u8> = match path.rsplit('/').next().unwrap_or_default() {
            "length" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Private: 1\r\nConnection: X-Private\r\nX-Tollgate-Request-Id: forged\r\n\r\nhello".to_vec(),
            "chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5;note=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n".to_vec(),
            "empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            "bare-lf" => b"HTTP/1.1 200 OK\nContent-Length: 8\n\nab\r\n\r\ncd".to_vec(),
            "interim" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            "big" => {
                let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG_BODY_BYTES}\r\n\r\n").into_bytes();
                answer.extend((0..BIG_BODY_BYTES).map(|i| b'a' + (i % 26) as u8));
                answer
            }
            "drop-second" | "secret" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            // How many `x-many-*` headers arrived, as the body.
            "many-headers" => {
                let count = lower.lines().filter(|line| line.starts_with("x-many-")).count().to_string();
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{count}", count.len()).into_bytes()
            }
            "hidden-length" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\nhello".to_vec(),
            "bad" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok".to_vec(),
            "until-close" => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ").await;
                let _ = stream.write_all(b"close").await;
                return;
            }
            _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        };
        let answer = if method == "HEAD" {
            answer[..answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4].to_vec()
        } else {
            answer
        };
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// A node's counter from its `/metrics`.
async fn counter(cluster: &TestCluster, name: &str) -> anyhow::Result<u64> {
    let text = cluster.client().get("/metrics").await?.body.as_str().unwrap_or_default().to_string();
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .unwrap_or(0.0) as u64)
}

/// Requests the direct path answered, and connections it handed to hyper (in hyper
/// mode both stay 0: what the tests check is the same answers).
async fn counters(cluster: &TestCluster) -> anyhow::Result<(u64, u64)> {
    let direct = counter(cluster, "tollgate_proxy_direct_requests_total").await?;
    let handoffs = counter(cluster, "tollgate_proxy_handoffs_total").await?;
    if PROXY_MODE == tollgate_tests::ProxyMode::Hyper {
        assert_eq!((direct, handoffs), (0, 0), "--proxy-direct off: nothing takes the direct path");
    }
    Ok((direct, handoffs))
}

async fn cluster_routing_to(upstream: &ScriptedUpstream) -> anyhow::Result<TestCluster> {
    // One proxy worker: each worker has its own upstream pool, and the tests count
    // upstream connections.
    let cluster = PROXY_MODE.cluster(1, &["--workers", "1"]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "scripted", "url": format!("http://{}", upstream.address)})).await?;
    let last = client.post("/services/scripted/routes", &json!({"name": "scripted", "paths": ["/s"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    Ok(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_passes_through_on_one_reused_upstream_connection() -> anyhow::Result<()> {
    let upstream = ScriptedUpstream::start().await?;
    let cluster = cluster_routing_to(&upstream).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let client = ProxyClient::new();

    let reply = client.request(&proxy, "GET", None, "/s/length", &[]).await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, Some("hello")));
    assert!(reply.headers.get("x-private").is_none(), "a header the upstream's Connection names is hop-by-hop");
    assert_ne!(reply.headers["x-tollgate-request-id"], "forged");
    assert_eq!(reply.headers["via"], "1.1 tollgate");

    let reply = client.request(&proxy, "GET", None, "/s/chunked", &[]).await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, Some("hello world")));
    let reply = client.request(&proxy, "GET", None, "/s/empty", &[]).await?;
    assert_eq!((reply.status, reply.body.as_str()), (204, Some("")));
    // A head whose lines end in a bare LF (httparse takes it), and whose body holds
    // the blank line a CRLF head ends with: the head ends at its own.
    let reply = client.request(&proxy, "GET", None, "/s/bare-lf", &[]).await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, Some("ab\r\n\r\ncd")));
    let reply = client.request(&proxy, "HEAD", None, "/s/length", &[]).await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, Some("")));
    assert_eq!(reply.headers["content-length"], "5", "HEAD keeps the length the GET would have");
    let reply = client.request(&proxy, "GET", None, "/s/interim", &[]).await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, Some("ok")));
    let reply = client.request(&proxy, "GET", None, "/s/big", &[]).await?;
    let body = reply.body.as_str().unwrap_or_default();
    assert_eq!((reply.status, body.len()), (200, BIG_BODY_BYTES));
    assert!(body.bytes().enumerate().all(|(i, b)| b == b'a' + (i % 26) as u8), "the body arrived intact");
    // Each exchange gave the connection back for the next, but the HEAD's: its answer
    // announced a body, which a broken upstream might still send (see node/PROXY.md).
    assert_eq!(upstream.connections(), 2, "one connection before the HEAD, one after");

    // An answer as long as the upstream's connection: the direct path sends it the
    // same way and closes the client's connection after it; hyper re-frames it
    // (chunked) and keeps the connection, so here the client asks to close.
    if PROXY_MODE == tollgate_tests::ProxyMode::Direct {
        let (status, text) = raw_exchange(&proxy, b"GET /s/until-close HTTP/1.1\r\nHost: t\r\n\r\n").await?;
        assert_eq!(status, 200);
        assert!(text.ends_with("\r\n\r\nuntil close"), "{text}");
        assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    } else {
        let request = b"GET /s/until-close HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        let (status, text) = raw_exchange(&proxy, request).await?;
        assert_eq!(status, 200);
        let body = text.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
        assert_eq!(tollgate_tests::dechunk(body), "until close", "{text}");
    }

    // Two Content-Lengths that disagree: Kong's 502, and the connection is not reused.
    let reply = client.request(&proxy, "GET", None, "/s/bad", &[]).await?;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.body["message"], "An invalid response was received from the upstream server");

    // Pipelined requests on one client connection, each answered in order.
    let (status, text) = raw_exchange(
        &proxy,
        b"GET /s/length HTTP/1.1\r\nHost: t\r\n\r\nGET /s/chunked HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.contains("hello\r\n") || text.contains("\r\n\r\nhello"), "{text}");

    let (direct, handoffs) = counters(&cluster).await?;
    if PROXY_MODE == tollgate_tests::ProxyMode::Direct {
        assert!(direct >= 10);
        assert_eq!(handoffs, 0, "nothing here needed hyper");
    }
    Ok(())
}

/// What an HTTP/2 client got: status, head, body and trailers.
struct H2Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
    trailers: Option<http::HeaderMap>,
}

type H2Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// An h2c client (prior knowledge): one connection to the proxy, a stream per request.
fn h2c() -> H2Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

async fn h2_request(
    client: &H2Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<H2Reply> {
    use http_body_util::BodyExt;
    let mut request = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(body)))?;
    let response = tokio::time::timeout(tollgate_tests::CONVERGE_TIMEOUT, client.request(request)).await??;
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (parts, body) = response.into_parts();
    let collected = tokio::time::timeout(tollgate_tests::CONVERGE_TIMEOUT, body.collect()).await??;
    let trailers = collected.trailers().cloned();
    Ok(H2Reply { status: parts.status.as_u16(), headers: parts.headers, body: collected.to_bytes().to_vec(), trailers })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_every_response_framing_and_share_upstream_connections_with_http1() -> anyhow::Result<()> {
    let upstream = ScriptedUpstream::start().await?;
    let cluster = cluster_routing_to(&upstream).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let h2 = h2c();
    let url = |path: &str| format!("{proxy}{path}");

    // An HTTP/1.1 request, then HTTP/2 ones: the worker's one upstream connection
    // carries them all (the HTTP/2 streams reach a plain upstream on the same pool as
    // the HTTP/1.1 requests, in both modes).
    let reply = ProxyClient::new().request(&proxy, "GET", None, "/s/length", &[]).await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, Some("hello")));
    for _ in 0..3 {
        let reply = h2_request(&h2, "GET", &url("/s/length"), &[], b"").await?;
        assert_eq!((reply.status, &reply.body[..]), (200, &b"hello"[..]));
        assert_eq!(reply.headers["content-length"], "5");
        assert!(reply.headers.get("x-private").is_none(), "a header the upstream's Connection names is hop-by-hop");
        assert_ne!(reply.headers["x-tollgate-request-id"], "forged");
        assert_eq!(reply.headers["via"], "1.1 tollgate");
    }
    assert_eq!(upstream.connections(), 1, "HTTP/1.1 and HTTP/2 requests share the upstream connection");

    // Chunked, with trailers for a client that takes them.
    let reply = h2_request(&h2, "GET", &url("/s/chunked"), &[("te", "trailers")], b"").await?;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"hello world"[..]));
    let trailers = reply.trailers.unwrap_or_default();
    assert_eq!(trailers.get("x-sum").map(|v| v.as_bytes()), Some(&b"11"[..]), "{trailers:?}");
    let reply = h2_request(&h2, "GET", &url("/s/empty"), &[], b"").await?;
    assert_eq!((reply.status, reply.body.len()), (204, 0));
    let reply = h2_request(&h2, "HEAD", &url("/s/length"), &[], b"").await?;
    assert_eq!((reply.status, reply.body.len()), (200, 0));
    assert_eq!(reply.headers["content-length"], "5", "HEAD keeps the length the GET would have");
    let reply = h2_request(&h2, "GET", &url("/s/interim"), &[], b"").await?;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"ok"[..]));
    let reply = h2_request(&h2, "GET", &url("/s/big"), &[], b"").await?;
    assert_eq!((reply.status, reply.body.len()), (200, BIG_BODY_BYTES));
    assert!(reply.body.iter().enumerate().all(|(i, b)| *b == b'a' + (i % 26) as u8), "the body arrived intact");
    let reply = h2_request(&h2, "GET", &url("/s/until-close"), &[], b"").await?;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"until close"[..]));
    let reply = h2_request(&h2, "POST", &url("/s/many-headers"), &[("x-many-1", "a")], b"a small body").await?;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"1"[..]));
    // The connection the POST used: its body was framed, so this head is read as one.
    let reply = h2_request(&h2, "GET", &url("/s/length"), &[], b"").await?;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"hello"[..]));
    // Two Content-Lengths that disagree: Kong's 502.
    let reply = h2_request(&h2, "GET", &url("/s/bad"), &[], b"").await?;
    assert_eq!(reply.status, 502, "{}", String::from_utf8_lossy(&reply.body));

    // A response the client stops reading: its connection, half read, never serves
    // another request (the next answers would be the rest of this body).
    let request = http::Request::get(url("/s/big")).body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let response = h2.request(request).await?;
    assert_eq!(response.status(), 200);
    drop(response);
    for _ in 0..3 {
        let reply = h2_request(&h2, "GET", &url("/s/length"), &[], b"").await?;
        assert_eq!((reply.status, &reply.body[..]), (200, &b"hello"[..]));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_the_upstream_closed_is_replaced_only_for_idempotent_requests() -> anyhow::Result<()> {
    let upstream = ScriptedUpstream::start().await?;
    let cluster = cluster_routing_to(&upstream).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let client = ProxyClient::new();
    // The first request opens a connection; the second reuses it, the upstream closes
    // it unanswered, and the GET goes again on a new one.
    for round in 0..2 {
        let reply = client.request(&proxy, "GET", None, "/s/drop-second", &[]).await?;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.body);
    }
    assert_eq!(upstream.connections(), 2);
    // A POST may have been acted on: it is not sent again.
    let reply = client.request(&proxy, "POST", None, "/s/drop-second", &[]).await?;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(upstream.connections(), 2, "no second connection for the POST");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_direct_path_leaves_is_served_by_the_general_path_on_the_same_connection() -> anyhow::Result<()> {
    let upstream = ScriptedUpstream::start().await?;
    let cluster = cluster_routing_to(&upstream).await?;
    let proxy = cluster.nodes[0].proxy_url();
    // A direct request, then one with `Upgrade` but no `Connection: upgrade` (handed
    // off with its bytes; the general path drops the hop-by-hop field), then one more
    // that the general path now serves: three answers, in order.
    let (status, text) = raw_exchange(
        &proxy,
        b"GET /s/length HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /s/length HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\n\r\n\
          GET /s/chunked HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    assert!(text.contains("hello world") || text.contains("hello\r\n6\r\n world"), "{text}");
    if PROXY_MODE == tollgate_tests::ProxyMode::Direct {
        assert_eq!(counters(&cluster).await?, (1, 1));
    }
    Ok(())
}

/// The direct path parses 32 request headers (`DIRECT_HEADERS_MAX`); a request with
/// more, up to the proxy's 100, is served whole by the general path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_more_headers_than_the_direct_path_parses_reaches_the_upstream_whole() -> anyhow::Result<()> {
    let upstream = ScriptedUpstream::start().await?;
    let cluster = cluster_routing_to(&upstream).await?;
    let proxy = cluster.nodes[0].proxy_url();
    for count in [5usize, 90] {
        let mut request = String::from("GET /s/many-headers HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
        for index in 0..count {
            request.push_str(&format!("X-Many-{index}: {index}\r\n"));
        }
        request.push_str("\r\n");
        let (status, text) = raw_exchange(&proxy, request.as_bytes()).await?;
        assert_eq!(status, 200, "{text}");
        let body = text.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
        let body = if body.contains("\r\n") { tollgate_tests::dechunk(body) } else { body.to_string() };
        assert_eq!(body, count.to_string(), "{count} headers sent: {text}");
    }
    if PROXY_MODE == tollgate_tests::ProxyMode::Direct {
        assert_eq!(counters(&cluster).await?, (1, 1), "5 headers: direct; 90: handed off");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_run_on_the_direct_path_unless_one_needs_the_response_body() -> anyhow::Result<()> {
    let echo = tollgate_tests::EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &["--workers", "1"]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    client.post("/services/echo/routes", &json!({"name": "guarded", "paths": ["/guarded"]})).await?;
    client.post("/services/echo/routes", &json!({"name": "open", "paths": ["/open"]})).await?;
    client.post("/consumers", &json!({"username": "ana"})).await?;
    client.post("/consumers/ana/key-auth", &json!({"key": "ana-key"})).await?;
    for plugin in [
        json!({"name": "key-auth"}),
        json!({"name": "rate-limiting", "config": {"minute": 1000, "policy": "local"}}),
        json!({"name": "correlation-id", "config": {"echo_downstream": true}}),
        json!({"name": "request-transformer", "config": {"add": {"headers": ["x-added:yes"]}}}),
    ] {
        client.post("/routes/guarded/plugins", &plugin).await?;
    }
    let last = client.post("/plugins", &json!({"name": "prometheus"})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let http = ProxyClient::new();

    // A plugin's own answer (key-auth's 401), then the upstream's with every plugin's
    // work on it: the header added upstream, the consumer named, the id echoed, the
    // limit counted.
    let refused = http.request(&proxy, "GET", None, "/guarded", &[]).await?;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let reply = http.request(&proxy, "GET", None, "/guarded/x", &[("apikey", "ana-key")]).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["headers"]["x-added"], json!(["yes"]));
    assert_eq!(reply.body["headers"]["x-consumer-username"], json!(["ana"]));
    assert!(reply.body["headers"]["apikey"].is_array(), "hide_credentials is off by default");
    assert_eq!(reply.body["headers"]["kong-request-id"], json!([reply.headers["kong-request-id"].to_str()?]));
    assert_eq!(reply.headers["x-ratelimit-remaining-minute"], "999");
    let open = http.request(&proxy, "GET", None, "/open", &[]).await?;
    assert_eq!(open.status, 200, "a route without plugins of its own runs the global ones only");
    assert!(open.body["headers"]["x-added"].is_null());
    if PROXY_MODE == tollgate_tests::ProxyMode::Direct {
        assert_eq!(counters(&cluster).await?, (3, 0));
    }

    // response-transformer's header rules are a `header_filter`: the route's plan has
    // it, and the direct path runs it on the response head.
    let added = client
        .post(
            "/routes/open/plugins",
            &json!({"name": "response-transformer", "config": {"add": {"headers": ["x-out:1"]}}}),
        )
        .await?;
    cluster.published(added.config_version.unwrap_or(0)).await?;
    let reply = http.request(&proxy, "GET", None, "/open", &[]).await?;
    assert_eq!((reply.status, reply.headers.get("x-out").map(|v| v.to_str().unwrap())), (200, Some("1")));
    if PROXY_MODE == tollgate_tests::ProxyMode::Direct {
        assert_eq!(counters(&cluster).await?, (4, 0), "a header rule keeps the route on the direct path");
    }

    // Its JSON rules read the response body: that route's requests go to the general
    // path; the other route's stay where they were.
    let id = added.body["id"].as_str().unwrap_or_default().to_string();
    let config = json!({"config": {"add": {"headers": ["x-out:1"], "json": ["added:yes"]}}});
    let patched = client.patch(&format!("/plugins/{id}"), &config).await?;
    cluster.published(patched.config_version.unwrap_or(0)).await?;
    let reply = http.request(&proxy, "GET", None, "/open", &[]).await?;
    assert_eq!((reply.headers["x-out"].to_str()?, &reply.body["added"]), ("1", &json!("yes")), "{}", reply.body);
    if PROXY_MODE == tollgate_tests::ProxyMode::Direct {
        assert_eq!(counters(&cluster).await?, (4, 1), "the body rule hands the route's request off");
    }
    // (A new client: the connection handed off stays with the general path.)
    let reply = ProxyClient::new().request(&proxy, "GET", None, "/guarded/x", &[("apikey", "ana-key")]).await?;
    assert_eq!((reply.status, &reply.body["headers"]["x-added"]), (200, &json!(["yes"])));
    assert!(reply.headers.get("x-out").is_none() && reply.body.get("added").is_none());
    if PROXY_MODE == tollgate_tests::ProxyMode::Direct {
        assert_eq!(counters(&cluster).await?, (5, 1), "another route's plugin does not move this one");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_fields_named_by_connection_and_answers_to_head_keep_both_sides_in_step() -> anyhow::Result<()> {
    let upstream = ScriptedUpstream::start().await?;
    let cluster = cluster_routing_to(&upstream).await?;
    let proxy = cluster.nodes[0].proxy_url();

    // `Connection: content-length` on a request must not strip its length while its
    // body, itself a request, goes on: the upstream sees one POST, never `/secret`.
    let inner = "GET /s/secret HTTP/1.1\r\nHost: t\r\n\r\n";
    let smuggling = format!(
        "POST /s/length HTTP/1.1\r\nHost: t\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{inner}\
         GET /s/length HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        inner.len()
    );
    let (status, text) = raw_exchange(&proxy, smuggling.as_bytes()).await?;
    assert_eq!(status, 200, "{text}");
    assert_eq!(upstream.secrets.load(Ordering::SeqCst), 0, "the body was not read as a request: {text}");

    // An upstream's `Connection: content-length`: the client still gets a length, so
    // the next answer on its connection starts where it should.
    let (_, text) = raw_exchange(
        &proxy,
        b"GET /s/hidden-length HTTP/1.1\r\nHost: t\r\n\r\nGET /s/length HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.to_ascii_lowercase().contains("content-length: 5\r\n"), "{text}");

    // A proxy-made answer to HEAD has no body: the next answer follows its head.
    let (status, text) = raw_exchange(
        &proxy,
        b"HEAD /s/bad HTTP/1.1\r\nHost: t\r\n\r\nGET /s/length HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 502, "{text}");
    assert!(!text.contains("\"message\""), "no JSON body after a HEAD: {text}");
    assert!(text.contains("\r\n\r\nHTTP/1.1 200 OK"), "{text}");

    // A target hyper's parser refuses is not routed here either: the general path
    // answers it.
    let (status, _) = raw_exchange(&proxy, b"GET /s/<length> HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await?;
    assert_eq!(status, 400);
    Ok(())
}
