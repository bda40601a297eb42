// The suite itself; `PROXY_MODE` comes from the test file that includes it
// (tests/tests/proxy.rs and tests/tests/proxy_hyper.rs).

use serde_json::json;
use tollgate_tests::{eventually, proxy_request, EchoServer, CONVERGE_TIMEOUT};

/// Kong's `path_handling: v0` table: service path × route path × strip_path × request
/// path → the path the upstream receives.
const PATH_TABLE: &[(&str, &str, bool, &str, &str)] = &[
    ("/s", "/fv0", false, "/fv0req", "/s/fv0req"),
    ("/s", "/fv0", false, "/fv0", "/s/fv0"),
    ("/s", "/fv1/", false, "/fv1/req", "/s/fv1/req"),
    ("/s", "/fv1/", false, "/fv1/", "/s/fv1/"),
    ("/s", "/tv0", true, "/tv0req", "/s/req"),
    ("/s", "/tv0", true, "/tv0", "/s"),
    ("/s", "/tv1/", true, "/tv1/req", "/s/req"),
    ("/s", "/tv1/", true, "/tv1/", "/s/"),
    ("/s/", "/fv0", false, "/fv0req", "/s/fv0req"),
    ("/s/", "/fv0", false, "/fv0", "/s/fv0"),
    ("/s/", "/fv1/", false, "/fv1/req", "/s/fv1/req"),
    ("/s/", "/fv1/", false, "/fv1/", "/s/fv1/"),
    ("/s/", "/tv0", true, "/tv0req", "/s/req"),
    ("/s/", "/tv0", true, "/tv0", "/s"),
    ("/s/", "/tv1/", true, "/tv1/req", "/s/req"),
    ("/s/", "/tv1/", true, "/tv1/", "/s/"),
    ("/", "/api", true, "/api/users?id=7", "/users"),
    ("/", "/api", false, "/api/users", "/api/users"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kong_v0_path_handling_against_a_real_upstream() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    // One service per service path; its routes are told apart by host.
    for (index, service_path) in ["/s", "/s/", "/"].iter().enumerate() {
        let host = format!("svc{index}.test");
        client
            .post(
                "/services",
                &json!({"name": format!("svc{index}"), "url": format!("http://{}{service_path}", echo.address)}),
            )
            .await?;
        for (route_path, strip) in [("/fv0", false), ("/fv1/", false), ("/tv0", true), ("/tv1/", true), ("/api", true)]
        {
            let name = format!("svc{index}{}", route_path.replace('/', "-"));
            let route = json!({"name": name, "hosts": [host], "paths": [route_path], "strip_path": strip});
            client.post(&format!("/services/svc{index}/routes"), &route).await?;
        }
    }
    // The /api rows without strip need their own route.
    client
        .post("/services/svc2/routes", &json!({"hosts": ["nostrip.test"], "paths": ["/api"], "strip_path": false}))
        .await?;
    let version = client.get("/status").await?.body["config_version"].as_u64().unwrap_or(0);
    let proxy = cluster.nodes[0].proxy_url();
    cluster.published(version).await?;

    for (service_path, route_path, strip, request, expected) in PATH_TABLE {
        let index = ["/s", "/s/", "/"].iter().position(|p| p == service_path).expect("known service path");
        let host = if *service_path == "/" && !strip { "nostrip.test".to_string() } else { format!("svc{index}.test") };
        let reply = proxy_request(&proxy, "GET", Some(&host), request, &[]).await?;
        assert_eq!(reply.status, 200, "{service_path} {route_path} {request}: {}", reply.body);
        assert_eq!(
            reply.body["path"], *expected,
            "service path {service_path}, route {route_path}, strip_path {strip}, request {request}"
        );
    }
    let reply = proxy_request(&proxy, "GET", Some("svc2.test"), "/api/users?id=7", &[]).await?;
    assert_eq!(reply.body["query"], "id=7", "the query string reaches the upstream");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_errors_and_no_route() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    client.post("/services/echo/routes", &json!({"name": "echo", "paths": ["/echo"]})).await?;
    client
        .post("/services", &json!({"name": "dead", "url": format!("http://127.0.0.1:{}", tollgate_tests::free_port())}))
        .await?;
    client.post("/services/dead/routes", &json!({"paths": ["/dead"]})).await?;
    client.post("/upstreams", &json!({"name": "empty-pool"})).await?;
    client.post("/services", &json!({"name": "nobody", "host": "empty-pool"})).await?;
    let last = client.post("/services/nobody/routes", &json!({"paths": ["/nobody"]})).await?;
    let proxy = cluster.nodes[0].proxy_url();
    cluster.published(last.config_version.unwrap_or(0)).await?;

    let reply = proxy_request(
        &proxy,
        "GET",
        Some("example.com"),
        "/echo/x",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
        ],
    )
    .await?;
    assert_eq!(reply.status, 200);
    let seen = &reply.body["headers"];
    assert_eq!(seen["x-forwarded-for"], json!(["203.0.113.9, 127.0.0.1"]));
    assert_eq!(seen["x-forwarded-host"], json!(["example.com"]));
    assert_eq!(seen["x-forwarded-proto"], json!(["http"]));
    assert!(seen.get("x-secret").is_none(), "a header named in Connection is hop-by-hop");
    assert!(seen.get("keep-alive").is_none());
    assert_eq!(seen["host"], json!([echo.address.clone()]), "Host is the upstream's unless preserve_host");
    assert!(reply.headers.get("x-tollgate-request-id").is_some());
    assert_eq!(reply.headers.get("via").and_then(|v| v.to_str().ok()), Some("1.1 tollgate"));

    let none = proxy_request(&proxy, "GET", None, "/nowhere", &[]).await?;
    assert_eq!((none.status, none.body["message"].as_str()), (404, Some("no Route matched with those values")));
    let dead = proxy_request(&proxy, "GET", None, "/dead", &[]).await?;
    assert_eq!(dead.status, 502, "{}", dead.body);
    let nobody = proxy_request(&proxy, "GET", None, "/nobody", &[]).await?;
    assert_eq!(nobody.status, 503, "{}", nobody.body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_written_on_node_1_serves_on_node_3_and_survives_losing_two_nodes() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let mut cluster = PROXY_MODE.cluster(3, &[]).await?;
    let node1 = cluster.client_of(1);
    node1.post("/upstreams", &json!({"name": "echo-pool"})).await?;
    node1.post("/upstreams/echo-pool/targets", &json!({"target": echo.address})).await?;
    node1.post("/services", &json!({"name": "pooled", "host": "echo-pool", "path": "/base"})).await?;
    node1.post("/services/pooled/routes", &json!({"name": "pooled", "paths": ["/pooled"]})).await?;
    let proxy3 = cluster.node(3).proxy_url();
    let reply = eventually("node 3 to serve the route written on node 1", CONVERGE_TIMEOUT, || async {
        let reply = proxy_request(&proxy3, "GET", None, "/pooled/items", &[]).await.ok()?;
        (reply.status == 200).then_some(reply)
    })
    .await?;
    assert_eq!(reply.body["path"], "/base/items");

    cluster.node(1).kill9();
    cluster.node(2).kill9();
    for _ in 0..20 {
        let reply = proxy_request(&proxy3, "GET", None, "/pooled/items", &[]).await?;
        assert_eq!(reply.status, 200, "node 3 keeps proxying on its last config without a quorum");
    }
    Ok(())
}

/// Writes raw bytes to the proxy (optionally one byte at a time) and returns the status
/// code of the first answer, or 0 when the connection closed without one.
/// An upstream that accepts connections and never answers, until the test ends.
async fn silent_upstream() -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = silent.local_addr()?;
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    Ok((address, task))
}

async fn raw_status(proxy_url: &str, request: &[u8], trickle: bool) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = proxy_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    if trickle {
        for byte in request {
            stream.write_all(std::slice::from_ref(byte)).await?;
            // The behaviour under test is a slow client, not a wait for a condition.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    } else {
        // The server may answer and close before reading everything: ignore write errors.
        let _ = stream.write_all(request).await;
    }
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(CONVERGE_TIMEOUT, stream.read(&mut answer)).await??;
    let text = String::from_utf8_lossy(&answer[..read]);
    Ok(text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_and_path_tricks_do_not_escape_routes() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "public", "url": format!("http://{}/public", echo.address)})).await?;
    client.post("/services/public/routes", &json!({"name": "public", "paths": ["/a"]})).await?;
    client
        .post("/services", &json!({"name": "admin", "url": format!("http://{}/admin-service", echo.address)}))
        .await?;
    let last = client.post("/services/admin/routes", &json!({"name": "admin", "paths": ["/admin"]})).await?;
    let proxy = cluster.nodes[0].proxy_url();
    cluster.published(last.config_version.unwrap_or(0)).await?;

    let head = "GET /a HTTP/1.1\r\nHost: t\r\n";
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "duplicate Content-Length",
            b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
            400,
        ),
        (
            "bad chunk size",
            b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        ("obs-fold", format!("{head}X-A: b\r\n  folded\r\n\r\n").into_bytes(), 400),
        ("NUL in a header value", format!("{head}X-A: b\0c\r\n\r\n").into_bytes(), 400),
        ("CR in a header value", format!("{head}X-A: b\rc\r\n\r\n").into_bytes(), 400),
        (
            "too many headers",
            format!("{head}{}\r\n", (0..150).map(|i| format!("X-{i}: v\r\n")).collect::<String>()).into_bytes(),
            431,
        ),
        ("oversize headers", format!("{head}X-Big: {}\r\n\r\n", "a".repeat(40 * 1024)).into_bytes(), 431),
        ("oversize URI", format!("GET /a/{} HTTP/1.1\r\nHost: t\r\n\r\n", "b".repeat(9 * 1024)).into_bytes(), 414),
        (
            "declared body over the limit",
            b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
            413,
        ),
    ];
    for (name, request, expected) in cases {
        let status = raw_status(&proxy, &request, false).await?;
        assert_eq!(status, expected, "{name}");
    }
    // Content-Length with Transfer-Encoding: framed by Transfer-Encoding (the empty
    // chunked body), the conflicting Content-Length never reaches the upstream, and the
    // connection is closed after the answer so the leftover bytes are never a request.
    let smuggle = b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: t\r\n\r\n";
    let (status, answers) = tollgate_tests::raw_exchange(&proxy, smuggle).await?;
    assert_eq!(status, 200);
    assert_eq!(answers.matches("HTTP/1.1 ").count(), 1, "the smuggled request was not answered: {answers}");
    assert!(answers.contains("\"body\":\"\""), "the upstream saw the chunked (empty) body: {answers}");
    assert!(!answers.contains("content-length\":[\"40"), "{answers}");

    // A slow but complete request is served.
    assert_eq!(raw_status(&proxy, format!("{head}X-Slow: yes\r\n\r\n").as_bytes(), true).await?, 200);
    // `Connection: close, X-Forwarded-For` cannot smuggle a client-chosen chain through.
    let reply = proxy_request(
        &proxy,
        "GET",
        None,
        "/a",
        &[("connection", "close, x-forwarded-for"), ("x-forwarded-for", "10.9.9.9")],
    )
    .await?;
    assert_eq!(reply.body["headers"]["x-forwarded-for"], json!(["127.0.0.1"]));

    // Path tricks reach only what the normalised path matches.
    for (trick, expected_upstream_path) in [
        ("/a/../admin/x", "/admin-service/x"),
        ("/a/%2e%2e/admin/x", "/admin-service/x"),
        ("//admin/x", "/admin-service/x"),
        ("/a/./b", "/public/b"),
        ("/a;x=1/../admin", "/admin-service"),
    ] {
        let reply = proxy_request(&proxy, "GET", None, trick, &[]).await?;
        assert_eq!(reply.status, 200, "{trick}");
        assert_eq!(reply.body["path"], expected_upstream_path, "{trick}");
    }
    // An encoded slash is data, not a separator: it does not climb out of /a.
    let reply = proxy_request(&proxy, "GET", None, "/a/..%2Fadmin", &[]).await?;
    assert_eq!(reply.body["path"], "/public/..%2Fadmin");
    let reply = proxy_request(&proxy, "GET", None, "/nope/../../a", &[]).await?;
    assert_eq!(reply.body["path"], "/public");
    assert_eq!(proxy_request(&proxy, "GET", None, "/%zz", &[]).await?.status, 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_is_skipped_for_requests_without_a_body_and_with_a_small_one() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/upstreams", &json!({"name": "half-dead"})).await?;
    let dead = format!("127.0.0.1:{}", tollgate_tests::free_port());
    client.post("/upstreams/half-dead/targets", &json!({"target": dead})).await?;
    client.post("/upstreams/half-dead/targets", &json!({"target": echo.address})).await?;
    client.post("/services", &json!({"name": "retrying", "host": "half-dead", "retries": 2})).await?;
    let last = client.post("/services/retrying/routes", &json!({"paths": ["/r"]})).await?;
    let proxy = cluster.nodes[0].proxy_url();
    cluster.published(last.config_version.unwrap_or(0)).await?;
    // Round-robin alternates between the two targets: every GET still succeeds.
    for _ in 0..10 {
        let reply = proxy_request(&proxy, "GET", None, "/r/x", &[]).await?;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["listen"], echo.address.as_str());
    }
    // A POST with a small body is read whole first, so it is retried too: the
    // connection to the dead target was never made, nothing reached an upstream.
    let client = tollgate_tests::ProxyClient::new();
    for round in 0..6 {
        let body = format!("{{\"order\": {round}}}");
        let request = http::Request::post(format!("{proxy}/r/orders"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))?;
        let reply = client.send(request).await?;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["method"], "POST");
        assert_eq!(reply.body["body"], body.as_str(), "the upstream got the whole body");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_never_fail_requests_on_routes_that_stay() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(3, &[]).await?;
    // A short storm for the suite; `config-storm` runs the 30 s one.
    let report = tollgate_tests::storm::run(&cluster, &echo, std::time::Duration::from_secs(4), 50, 50).await?;
    assert!(report.writes >= 150, "{report:?}");
    assert_eq!(report.failed_writes, 0, "{report:?}");
    assert!(report.requests >= 300, "{report:?}");
    assert_eq!((report.failed_requests, report.socket_errors), (0, 0), "{report:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_reach_http1_upstreams_and_slow_upstreams_time_out() -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let echo = EchoServer::start().await?;
    let (silent_address, _silent_task) = silent_upstream().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    client.post("/services/echo/routes", &json!({"paths": ["/h2"]})).await?;
    let slow =
        json!({"name": "slow", "url": format!("http://{silent_address}"), "read_timeout": 300, "connect_timeout": 200});
    client.post("/services", &slow).await?;
    let last = client.post("/services/slow/routes", &json!({"paths": ["/slow"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let proxy = cluster.nodes[0].proxy_url();

    // HTTP/2 with prior knowledge (h2c) in, HTTP/1.1 out.
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let request = http::Request::get(format!("{proxy}/h2/x")).body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let response = h2.request(request).await?;
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    assert_eq!(body["path"], "/x", "the HTTP/1.1 upstream got the request");

    // No answer within read_timeout (0.3 s) of the request going out: 504, promptly.
    let started = tokio::time::Instant::now();
    let reply = proxy_request(&proxy, "GET", None, "/slow", &[]).await?;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert!(elapsed < std::time::Duration::from_secs(3), "the timeout took {elapsed:?}");
    assert!(elapsed >= std::time::Duration::from_millis(300), "answered before the read timeout: {elapsed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_passes_through_and_bytes_flow_both_ways() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    let last = client.post("/services/echo/routes", &json!({"paths": ["/ws"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let address = cluster.nodes[0].proxy_url().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await?;
    // Read the 101 head.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(CONVERGE_TIMEOUT, stream.read_exact(&mut byte)).await??;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // The connection is now the upstream's: what goes in comes back.
    for message in [&b"first frame"[..], &b"second, longer frame of bytes"[..]] {
        stream.write_all(message).await?;
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(CONVERGE_TIMEOUT, stream.read_exact(&mut back)).await??;
        assert_eq!(back, message);
    }
    Ok(())
}

/// A self-signed EC certificate and key for `name`, made with the openssl CLI.
fn self_signed(dir: &std::path::Path, name: &str) -> anyhow::Result<(String, String)> {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", &format!("/CN={name}")])
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl failed");
    Ok((std::fs::read_to_string(cert)?, std::fs::read_to_string(key)?))
}

/// GET over TLS with SNI `name` through curl: (status, certificate subject, body).
async fn https_get(port: u16, name: &str, path: &str) -> anyhow::Result<(u16, String, String)> {
    let output = tokio::process::Command::new("curl")
        .args(["-sk", "-v", "-o", "-", "-w", "\n%{http_code}", "--resolve"])
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    let subject = stderr.lines().find(|l| l.contains("subject:")).unwrap_or_default().trim().to_string();
    Ok((status.trim().parse().unwrap_or(0), subject, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_picks_the_certificate_by_sni_from_the_replicated_config() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert_a, key_a) = self_signed(dir.path(), "a.test")?;
    let (cert_b, key_b) = self_signed(dir.path(), "b.test")?;
    let echo = EchoServer::start().await?;
    let tls_port = tollgate_tests::free_port();
    let cluster = PROXY_MODE.cluster(1, &["--proxy-tls-listen", &format!("127.0.0.1:{tls_port}")]).await?;
    let client = cluster.client();
    // A key that does not match its certificate is refused at write time.
    let mismatched = client.post("/certificates", &json!({"cert": cert_a, "key": key_b})).await.unwrap_err();
    assert_eq!(mismatched.status(), Some(400));
    assert!(mismatched.api_error().is_some_and(|e| e.fields.contains_key("key")), "{mismatched}");

    for (name, cert, key) in [("a.test", &cert_a, &key_a), ("b.test", &cert_b, &key_b)] {
        let created = client.post("/certificates", &json!({"cert": cert, "key": key})).await?;
        let id = created.body["id"].as_str().expect("id").to_string();
        client.post(&format!("/certificates/{id}/snis"), &json!({"name": name})).await?;
    }
    client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    let last = client.post("/services/echo/routes", &json!({"paths": ["/tls"], "protocols": ["https"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;

    for name in ["a.test", "b.test"] {
        let (status, subject, body) = https_get(tls_port, name, "/tls/x").await?;
        assert_eq!(status, 200, "{name}: {body}");
        assert!(subject.contains(&format!("CN={name}")), "{name} got the certificate {subject}");
        let body: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(body["headers"]["x-forwarded-proto"], json!(["https"]));
    }
    // A name with no certificate gets no handshake.
    let (status, _, _) = https_get(tls_port, "c.test", "/tls/x").await?;
    assert_eq!(status, 0);
    // The https-only route is not served over plain HTTP.
    let plain = proxy_request(&cluster.nodes[0].proxy_url(), "GET", None, "/tls/x", &[]).await?;
    assert_eq!(plain.status, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_per_route_and_a_json_access_log_line_per_request() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "counted", "url": format!("http://{}", echo.address)})).await?;
    let last =
        client.post("/services/counted/routes", &json!({"name": "counted-route", "paths": ["/counted"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let mut request_ids = Vec::new();
    for _ in 0..3 {
        let reply = proxy_request(&proxy, "GET", None, "/counted/x", &[]).await?;
        assert_eq!(reply.status, 200);
        request_ids.push(reply.headers["x-tollgate-request-id"].to_str()?.to_string());
    }
    assert_eq!(proxy_request(&proxy, "GET", None, "/unrouted", &[]).await?.status, 404);

    let text = client.get("/metrics").await?.body.as_str().unwrap_or_default().to_string();
    let ok_line = text
        .lines()
        .find(|l| {
            l.starts_with("tollgate_http_requests_total")
                && l.contains("route=\"counted-route\"")
                && l.contains("service=\"counted\"")
                && l.contains("code_class=\"2xx\"")
        })
        .unwrap_or_else(|| panic!("no per-route counter in:\n{text}"));
    assert!(ok_line.ends_with(" 3"), "{ok_line}");
    assert!(text
        .lines()
        .any(|l| l.starts_with("tollgate_http_requests_total") && l.contains("route=\"\"") && l.contains("4xx")));
    assert!(text.contains("tollgate_request_latency_ms"));
    assert!(text.lines().any(|l| l.starts_with("tollgate_bandwidth_bytes_total")
        && l.contains("egress")
        && l.contains("counted-route")));

    // One JSON line per request on the node's stdout.
    let node = &cluster.nodes[0];
    let line = eventually("the access log line", CONVERGE_TIMEOUT, || async {
        let log = node.log();
        let line = log.lines().find(|l| l.contains(&request_ids[2]) && l.starts_with('{'))?.to_string();
        Some(line)
    })
    .await?;
    let entry: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(
        (entry["status"].as_u64(), entry["route"].as_str(), entry["method"].as_str()),
        (Some(200), Some("counted-route"), Some("GET"))
    );
    assert_eq!(entry["path"], "/counted/x");
    assert!(entry["upstream_latency_ms"].as_f64().is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_sends_a_key_to_the_same_target_from_every_node() -> anyhow::Result<()> {
    let (echo_a, echo_b) = (EchoServer::start().await?, EchoServer::start().await?);
    let cluster = PROXY_MODE.cluster(3, &[]).await?;
    let client = cluster.client();
    client.post("/upstreams", &json!({"name": "sticky", "algorithm": "consistent-hashing", "hash_on": "header", "hash_on_header": "x-user"})).await?;
    client.post("/upstreams/sticky/targets", &json!({"target": echo_a.address})).await?;
    client.post("/upstreams/sticky/targets", &json!({"target": echo_b.address})).await?;
    client.post("/services", &json!({"name": "sticky", "host": "sticky"})).await?;
    let last = client.post("/services/sticky/routes", &json!({"paths": ["/sticky"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let mut targets_used = std::collections::BTreeSet::new();
    for user in 0..20 {
        let header = format!("user-{user}");
        let mut seen = std::collections::BTreeSet::new();
        for node in &cluster.nodes {
            for _ in 0..2 {
                let reply = proxy_request(&node.proxy_url(), "GET", None, "/sticky", &[("x-user", &header)]).await?;
                assert_eq!(reply.status, 200);
                seen.insert(reply.body["listen"].as_str().unwrap_or_default().to_string());
            }
        }
        assert_eq!(seen.len(), 1, "{header} went to {seen:?}");
        targets_used.extend(seen);
    }
    assert_eq!(targets_used.len(), 2, "keys spread over both targets");
    Ok(())
}

/// Hashing on a header reads the request as the client sent it, never the fields the
/// proxy sets upstream: a key in `X-Forwarded-For` goes to the same target over
/// HTTP/1.1 and h2c. (Until 324d0ca the hyper adapter hashed its map after the proxy
/// had extended the chain with the peer's address; the direct codec never did.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_on_a_header_reads_what_the_client_sent_over_both_protocols() -> anyhow::Result<()> {
    let (echo_a, echo_b) = (EchoServer::start().await?, EchoServer::start().await?);
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let upstream = json!({"name": "chained", "algorithm": "consistent-hashing", "hash_on": "header", "hash_on_header": "x-forwarded-for"});
    client.post("/upstreams", &upstream).await?;
    client.post("/upstreams/chained/targets", &json!({"target": echo_a.address})).await?;
    client.post("/upstreams/chained/targets", &json!({"target": echo_b.address})).await?;
    client.post("/services", &json!({"name": "chained", "host": "chained"})).await?;
    let last = client.post("/services/chained/routes", &json!({"paths": ["/chained"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let h2c = tollgate_tests::ProxyClient::h2c();
    let mut targets_used = std::collections::BTreeSet::new();
    for client_ip in 0..24 {
        let chain = format!("198.51.100.{client_ip}");
        let headers = [("x-forwarded-for", chain.as_str())];
        let over_h1 = proxy_request(&proxy, "GET", None, "/chained", &headers).await?;
        let over_h2 = h2c.request(&proxy, "GET", None, "/chained", &headers).await?;
        assert_eq!((over_h1.status, over_h2.status), (200, 200), "{chain}");
        let target = over_h1.body["listen"].as_str().unwrap_or_default().to_string();
        assert_eq!(over_h2.body["listen"].as_str(), Some(target.as_str()), "{chain}: HTTP/1.1 and h2c went apart");
        // The upstream still gets the chain the proxy extended.
        assert_eq!(over_h2.body["headers"]["x-forwarded-for"], json!([format!("{chain}, 127.0.0.1")]));
        targets_used.insert(target);
    }
    assert_eq!(targets_used.len(), 2, "keys spread over both targets");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_believed_only_from_trusted_peers() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let trusting = PROXY_MODE.cluster(1, &["--trusted-ips", "127.0.0.0/8", "--real-ip-header", "X-Forwarded-For", "--real-ip-recursive", "on"]).await?;
    let doubting = PROXY_MODE.cluster(1, &[]).await?;
    let forwarded =
        [("x-forwarded-for", "203.0.113.5"), ("x-forwarded-proto", "https"), ("x-forwarded-host", "api.example.com")];
    for (cluster, trusted) in [(&trusting, true), (&doubting, false)] {
        let client = cluster.client();
        client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
        let last = client.post("/services/echo/routes", &json!({"paths": ["/f"]})).await?;
        cluster.published(last.config_version.unwrap_or(0)).await?;
        let reply = proxy_request(&cluster.nodes[0].proxy_url(), "GET", Some("local.test"), "/f", &forwarded).await?;
        let seen = &reply.body["headers"];
        assert_eq!(seen["x-forwarded-for"], json!(["203.0.113.5, 127.0.0.1"]), "the chain is extended either way");
        if trusted {
            assert_eq!(seen["x-forwarded-proto"], json!(["https"]));
            assert_eq!(seen["x-forwarded-host"], json!(["api.example.com"]));
            assert_eq!(seen["x-real-ip"], json!(["203.0.113.5"]));
        } else {
            assert_eq!(seen["x-forwarded-proto"], json!(["http"]));
            assert_eq!(seen["x-forwarded-host"], json!(["local.test"]));
            assert_eq!(seen["x-real-ip"], json!(["127.0.0.1"]));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_get_408_idle_connections_close_and_slow_upstreams_are_not_cut() -> anyhow::Result<()> {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (silent_address, _silent_task) = silent_upstream().await?;
    let args = ["--proxy-header-timeout-ms", "400", "--proxy-keepalive-timeout-ms", "700"];
    let cluster = PROXY_MODE.cluster(1, &args).await?;
    let client = cluster.client();
    let slow = json!({"name": "slow", "url": format!("http://{silent_address}"), "read_timeout": 1500, "connect_timeout": 100});
    client.post("/services", &slow).await?;
    let last = client.post("/services/slow/routes", &json!({"paths": ["/slow"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let address = cluster.nodes[0].proxy_url().trim_start_matches("http://").to_string();

    // Headers started and never finished: 408 with Kong's JSON, then the connection closes.
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow").await?;
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(CONVERGE_TIMEOUT, stream.read_to_end(&mut answer)).await??;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("Request header timeout"), "{text}");
    assert!(elapsed >= Duration::from_millis(380) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    eprintln!("408 after {elapsed:?}");

    // An answered request, then silence: closed quietly after the keep-alive timeout.
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream.write_all(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n").await?;
    let mut first = vec![0u8; 4096];
    let read = tokio::time::timeout(CONVERGE_TIMEOUT, stream.read(&mut first)).await??;
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 404 "));
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(CONVERGE_TIMEOUT, stream.read_to_end(&mut rest)).await??;
    let elapsed = started.elapsed();
    assert!(rest.is_empty(), "nothing more is sent: {}", String::from_utf8_lossy(&rest));
    assert!(elapsed >= Duration::from_millis(650) && elapsed < Duration::from_millis(1050), "{elapsed:?}");
    eprintln!("idle close after {elapsed:?}");

    // An upstream slower than both timeouts is waited for: its own read_timeout (1.5 s)
    // gives the 504, the client's connection is not cut.
    let started = tokio::time::Instant::now();
    let reply = proxy_request(&cluster.nodes[0].proxy_url(), "GET", None, "/slow", &[]).await?;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert!(started.elapsed() >= Duration::from_millis(1400), "{:?}", started.elapsed());
    eprintln!("504 after {:?}", started.elapsed());
    Ok(())
}

/// An upstream that answers a head and part of its body, then holds the connection
/// open without another byte.
async fn stalling_upstream() -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789").await;
            held.push(stream);
        }
    });
    Ok((address, task))
}

/// Kong's `read_timeout` counts between two reads of the upstream, the response head
/// and every read of its body after; `write_timeout` between two writes of the request.
/// Both codecs cut a stalled upstream off by them (the general path used to time only
/// the response head, so a body that stalled held the client forever, and neither
/// honoured `write_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_that_stall_mid_body_or_stop_reading_are_cut_off_by_their_timeouts() -> anyhow::Result<()> {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (stalling, _stalling_task) = stalling_upstream().await?;
    let (deaf, _deaf_task) = silent_upstream().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "stalling", "url": format!("http://{stalling}"), "read_timeout": 500})).await?;
    client.post("/services/stalling/routes", &json!({"paths": ["/stalling"]})).await?;
    let deaf_service = json!({"name": "deaf", "url": format!("http://{deaf}"), "write_timeout": 500});
    client.post("/services", &deaf_service).await?;
    let last = client.post("/services/deaf/routes", &json!({"paths": ["/deaf"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let address = cluster.nodes[0].proxy_url().trim_start_matches("http://").to_string();

    // A body that stops after 10 of its 100 bytes: the client gets those 10, and its
    // connection closes once read_timeout (0.5 s) passes without another byte.
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream.write_all(b"GET /stalling HTTP/1.1\r\nHost: a\r\n\r\n").await?;
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "the connection is still open after {elapsed:?}: {text}");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.ends_with("\r\n\r\n0123456789"), "the bytes that came, and no more: {text}");
    assert!(elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    eprintln!("stalled body cut off after {elapsed:?}");

    // An upstream that stops reading a large request body: once its socket buffers are
    // full, a write waits; after write_timeout (0.5 s) the answer is 504, not a wait
    // for read_timeout (60 s).
    const BODY_BYTES: usize = 32 * 1024 * 1024;
    let stream = tokio::net::TcpStream::connect(&address).await?;
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        let head = format!("POST /deaf HTTP/1.1\r\nHost: a\r\nContent-Length: {BODY_BYTES}\r\n\r\n");
        if writer.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..BODY_BYTES / chunk.len() {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(15), async {
        let mut chunk = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => answer.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    sender.abort();
    let text = String::from_utf8_lossy(&answer);
    assert!(head.is_ok(), "no answer after {elapsed:?}");
    assert!(text.starts_with("HTTP/1.1 504 "), "{text}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    eprintln!("stalled upstream write answered 504 after {elapsed:?}");
    Ok(())
}

/// A TLS connection the proxy closes (`Connection: close`) ends with `close_notify`:
/// without it OpenSSL 3 clients see an unexpected EOF and discard the session, so they
/// can never resume it (issue 19; nginx closes cleanly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_the_proxy_closes_end_with_close_notify() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = self_signed(dir.path(), "a.test")?;
    let echo = EchoServer::start().await?;
    let tls_port = tollgate_tests::free_port();
    let cluster = PROXY_MODE.cluster(1, &["--proxy-tls-listen", &format!("127.0.0.1:{tls_port}")]).await?;
    let client = cluster.client();
    let created = client.post("/certificates", &json!({"cert": cert, "key": key})).await?;
    let id = created.body["id"].as_str().expect("id").to_string();
    client.post(&format!("/certificates/{id}/snis"), &json!({"name": "a.test"})).await?;
    client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    let last = client.post("/services/echo/routes", &json!({"paths": ["/tls"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;

    for request in ["GET /tls/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n", "GET /tls/x HTTP/1.0\r\n\r\n"] {
        let mut s_client = tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{tls_port}"), "-servername", "a.test", "-ign_eof"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = s_client.stdin.take() {
            use tokio::io::AsyncWriteExt;
            stdin.write_all(request.as_bytes()).await?;
        }
        let output = tokio::time::timeout(tollgate_tests::CONVERGE_TIMEOUT, s_client.wait_with_output()).await??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stdout.contains(" 200 OK"), "{request:?}: {stdout}");
        assert!(!stderr.to_ascii_lowercase().contains("unexpected eof"), "{request:?}: no close_notify: {stderr}");
    }
    Ok(())
}
