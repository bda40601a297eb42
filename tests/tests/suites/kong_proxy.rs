// The suite itself; `PROXY_MODE` comes from the test file that includes it
// (tests/tests/kong_proxy.rs and tests/tests/kong_proxy_hyper.rs).
//
// Kong's proxy and plugin behaviour, replayed from Kong's own specs: each assertion
// names the spec file and line it comes from (paths under Kong's `spec/`).

use serde_json::{json, Value};
use tollgate_tests::{raw_exchange, EchoServer, ProxyClient, ProxyReply, TestCluster};

/// Waits until the data path has everything written so far.
async fn settle(cluster: &TestCluster) -> anyhow::Result<()> {
    let status = cluster.status(1).await.ok_or_else(|| anyhow::anyhow!("no /status from node 1"))?;
    cluster.published(status["config_version"].as_u64().unwrap_or(0)).await
}

/// A one-node cluster in this suite's mode with service `echo` on the echo upstream
/// at `service_path`.
async fn echo_cluster(extra: &[&str], service_path: &str) -> anyhow::Result<(TestCluster, EchoServer)> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, extra).await?;
    let url = format!("http://{}{service_path}", echo.address);
    cluster.client().post("/services", &json!({"name": "echo", "url": url})).await?;
    Ok((cluster, echo))
}

fn header<'a>(reply: &'a ProxyReply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).and_then(|value| value.to_str().ok())
}

/// What the echo upstream received for header `name` (its first line).
fn upstream_header<'a>(reply: &'a ProxyReply, name: &str) -> Option<&'a str> {
    reply.body["headers"][name][0].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_host_trailers_and_chunked_get_bodies() -> anyhow::Result<()> {
    let (cluster, _echo) = echo_cluster(&[], "").await?;
    cluster.client().post("/services/echo/routes", &json!({"paths": ["/get"], "strip_path": false})).await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();

    // 05-proxy/02-router_spec.lua:353: HTTP/1.0 needs no Host.
    let (status, text) = raw_exchange(&proxy, b"GET /get HTTP/1.0\r\n\r\n").await?;
    assert_eq!(status, 200, "{text}");
    // 05-proxy/02-router_spec.lua:378: HTTP/1.1 without Host is refused.
    let (status, text) = raw_exchange(&proxy, b"GET /get HTTP/1.1\r\nConnection: close\r\n\r\n").await?;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("Bad request"), "{text}");

    // 05-proxy/03-upstream_headers_spec.lua:137 and :158: of the client's TE only
    // `trailers` goes upstream.
    let client = ProxyClient::new();
    let reply = client.request(&proxy, "GET", None, "/get", &[("te", "trailers, deflate;q=0.5")]).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(upstream_header(&reply, "te"), Some("trailers"), "{}", reply.body);
    let reply = client.request(&proxy, "GET", None, "/get", &[]).await?;
    assert_eq!(upstream_header(&reply, "te"), None, "{}", reply.body);

    // A GET with a chunked body: the upstream gets the body (nginx, and so Kong,
    // buffers and sends every request body: templates/nginx_kong.lua
    // `proxy_request_buffering on`).
    let request = b"GET /get HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let (status, text) = raw_exchange(&proxy, request).await?;
    assert_eq!(status, 200, "{text}");
    let echoed = answer_json(&text);
    assert_eq!(echoed["method"], "GET", "{text}");
    assert_eq!(echoed["body"], "hello world", "{text}");
    Ok(())
}

/// The JSON of a raw answer whose body may be chunked.
fn answer_json(text: &str) -> Value {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        tollgate_tests::dechunk(body)
    } else {
        body.to_string()
    };
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// An upstream that answers every request with a chunked body announcing a trailer,
/// as Kong's fixture does (spec/fixtures/template_inject/nginx_kong_test_custom_inject_http.lua:111).
async fn trailer_upstream() -> anyhow::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\nTrailer: Expires\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nExpires: Thu, 01 Dec 1994 16:00:00 GMT\r\n\r\n";
                let _ = stream.write_all(answer).await;
            });
        }
    });
    Ok(address)
}

/// 05-proxy/03-upstream_headers_spec.lua:163-207: the response's `Trailer` reaches
/// only a client that asked for trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trailer_header_reaches_clients_that_ask_for_trailers() -> anyhow::Result<()> {
    let upstream = trailer_upstream().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "hop", "url": format!("http://{upstream}")})).await?;
    client.post("/services/hop/routes", &json!({"paths": ["/hop-by-hop"]})).await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let proxy_client = ProxyClient::new();
    // :186 and :189.
    let reply = proxy_client.request(&proxy, "GET", None, "/hop-by-hop", &[]).await?;
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "trailer"), None);
    assert_eq!(header(&reply, "transfer-encoding"), Some("chunked"));
    // :206.
    let reply = proxy_client.request(&proxy, "GET", None, "/hop-by-hop", &[("te", "trailers")]).await?;
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "trailer"), Some("Expires"));
    Ok(())
}

/// 05-proxy/03-upstream_headers_spec.lua, `trusted_ips` with Kong's default
/// `real_ip_header` (X-Real-IP) and with `X-Forwarded-For` recursive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ip_header_and_recursion_follow_kongs_settings() -> anyhow::Result<()> {
    let (by_default, _echo) = echo_cluster(&["--trusted-ips", "127.0.0.1"], "").await?;
    by_default.client().post("/services/echo/routes", &json!({"paths": ["/"]})).await?;
    settle(&by_default).await?;
    let proxy = by_default.nodes[0].proxy_url();
    let client = ProxyClient::new();
    // :576: the trusted peer's X-Real-IP is the client.
    let reply = client.request(&proxy, "GET", None, "/", &[("x-real-ip", "10.0.0.1")]).await?;
    assert_eq!(upstream_header(&reply, "x-real-ip"), Some("10.0.0.1"), "{}", reply.body);
    // :596: X-Forwarded-For is extended, and is not where the client is read from.
    let reply = client.request(&proxy, "GET", None, "/", &[("x-forwarded-for", "10.0.0.1")]).await?;
    assert_eq!(upstream_header(&reply, "x-forwarded-for"), Some("10.0.0.1, 127.0.0.1"));
    assert_eq!(upstream_header(&reply, "x-real-ip"), Some("127.0.0.1"));

    let args = [
        "--trusted-ips",
        "127.0.0.1,172.16.0.1,192.168.0.1",
        "--real-ip-header",
        "X-Forwarded-For",
        "--real-ip-recursive",
        "on",
    ];
    let (recursive, _echo) = echo_cluster(&args, "").await?;
    recursive.client().post("/services/echo/routes", &json!({"paths": ["/"]})).await?;
    settle(&recursive).await?;
    let proxy = recursive.nodes[0].proxy_url();
    // :880-881.
    let chain = "127.0.0.1, 10.0.0.1, 192.168.0.1, 127.0.0.1, 172.16.0.1";
    let reply =
        client.request(&proxy, "GET", None, "/", &[("x-forwarded-for", chain), ("x-real-ip", "10.0.0.2")]).await?;
    assert_eq!(upstream_header(&reply, "x-real-ip"), Some("10.0.0.1"), "{}", reply.body);
    assert_eq!(upstream_header(&reply, "x-forwarded-for"), Some(format!("{chain}, 127.0.0.1").as_str()));
    // :894-896: hops with ports.
    let ported = "127.0.0.1:14, 10.0.0.1:15, 192.168.0.1:16, 127.0.0.1:17, 172.16.0.1:18";
    let reply = client
        .request(&proxy, "GET", None, "/", &[("x-forwarded-for", ported), ("x-forwarded-port", "14")])
        .await?;
    assert_eq!(upstream_header(&reply, "x-real-ip"), Some("10.0.0.1"), "{}", reply.body);
    assert_eq!(upstream_header(&reply, "x-forwarded-port"), Some("14"));
    Ok(())
}

/// spec/fixtures/router_path_handling_tests.lua:99-113, run by
/// 05-proxy/02-router_spec.lua:2305: routes that match on host only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_only_routes_join_paths_as_kong_does() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    for (index, (service_path, strip)) in [("/service", true), ("/service/", true), ("/service", false)].iter().enumerate() {
        let name = format!("s{index}");
        client.post("/services", &json!({"name": name, "url": format!("http://{}{service_path}", echo.address)})).await?;
        let route = json!({"hosts": [format!("h{index}.test")], "strip_path": strip});
        client.post(&format!("/services/{name}/routes"), &route).await?;
    }
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let proxy_client = ProxyClient::new();
    // (host, request, expected upstream path): :105-107 and :111-113.
    let rows = [
        ("h0.test", "/", "/service"),
        ("h0.test", "/route", "/service/route"),
        ("h0.test", "/route/", "/service/route/"),
        ("h1.test", "/", "/service/"),
        ("h1.test", "/route", "/service/route"),
        ("h1.test", "/route/", "/service/route/"),
        ("h2.test", "/", "/service"),
        ("h2.test", "/route", "/service/route"),
    ];
    for (host, request, expected) in rows {
        let reply = proxy_client.request(&proxy, "GET", Some(host), request, &[]).await?;
        assert_eq!(reply.status, 200, "{host}{request}: {}", reply.body);
        assert_eq!(reply.body["path"], expected, "{host}{request}");
    }
    Ok(())
}

/// 05-proxy/33-request-id-header_spec.lua:89 (hex) and
/// 03-plugins/11-correlation-id/01-access_spec.lua:486 (32 digits): Kong's request
/// ids; and never the same on two nodes, or after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_random_hex_and_unique_across_nodes_and_restarts() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let mut cluster = PROXY_MODE.cluster(2, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    client.post("/services/echo/routes", &json!({"paths": ["/"]})).await?;
    settle(&cluster).await?;
    let proxy_client = ProxyClient::new();
    let mut seen = std::collections::HashSet::new();
    let mut first_ids = Vec::new();
    for node in 0..2 {
        let proxy = cluster.nodes[node].proxy_url();
        for request in 0..20 {
            let reply = proxy_client.request(&proxy, "GET", None, "/", &[]).await?;
            let id = header(&reply, "x-tollgate-request-id").unwrap_or_default().to_string();
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
            assert_eq!(upstream_header(&reply, "x-tollgate-request-id"), Some(id.as_str()));
            if request == 0 {
                first_ids.push(id.clone());
            }
            assert!(seen.insert(id.clone()), "request id {id} repeated");
        }
    }
    // The first request after a restart gets an id never seen before.
    cluster.node(1).stop();
    cluster.node(1).start()?;
    let proxy = cluster.nodes[0].proxy_url();
    let reply = tollgate_tests::eventually("the restarted node to proxy", tollgate_tests::CONVERGE_TIMEOUT, || async {
        proxy_client.request(&proxy, "GET", None, "/", &[]).await.ok().filter(|reply| reply.status == 200)
    })
    .await?;
    let id = header(&reply, "x-tollgate-request-id").unwrap_or_default().to_string();
    assert!(!seen.contains(&id), "request id {id} repeated after a restart (first ids {first_ids:?})");
    Ok(())
}

fn hs256(secret: &str, claims: &Value) -> String {
    let header = tollgate_tests::base64(json!({"alg": "HS256", "typ": "JWT"}).to_string().as_bytes(), true);
    let input = format!("{header}.{}", tollgate_tests::base64(claims.to_string().as_bytes(), true));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("{input}.{}", tollgate_tests::base64(ring::hmac::sign(&key, input.as_bytes()).as_ref(), true))
}

/// Plugins on routes of service `echo`, one route per `(path, plugin)`.
async fn routes_with_plugins(cluster: &TestCluster, plugins: &[(&str, Value)]) -> anyhow::Result<()> {
    let client = cluster.client();
    for (path, plugin) in plugins {
        let route = client.post("/services/echo/routes", &json!({"paths": [path]})).await?;
        let id = route.body["id"].as_str().unwrap_or_default().to_string();
        client.post(&format!("/routes/{id}/plugins"), plugin).await?;
    }
    settle(cluster).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_plugins_name_credentials_and_headers_as_kong() -> anyhow::Result<()> {
    let (cluster, _echo) = echo_cluster(&[], "").await?;
    let client = cluster.client();
    client.post("/consumers", &json!({"username": "bob"})).await?;
    let key = client.post("/consumers/bob/key-auth", &json!({"key": "kong"})).await?;
    client.post("/consumers/bob/basic-auth", &json!({"username": "user123", "password": "password123"})).await?;
    client.post("/consumers/bob/jwt", &json!({"key": "jwt-key", "secret": "jwt-secret"})).await?;
    let plugins = [
        ("/key8", json!({"name": "key-auth", "config": {"key_names": ["api_key"]}})),
        ("/basic", json!({"name": "basic-auth"})),
        ("/jwt", json!({"name": "jwt", "config": {"claims_to_verify": ["exp"]}})),
    ];
    routes_with_plugins(&cluster, &plugins).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let proxy_client = ProxyClient::new();

    // 09-key-auth/02-access_spec.lua:534-552: `api_key` configured, sent either way.
    for name in ["api_key", "api-key"] {
        let reply = proxy_client.request(&proxy, "GET", None, "/key8", &[(name, "kong")]).await?;
        assert_eq!(reply.status, 200, "{name}: {}", reply.body);
        // :600: key-auth's X-Credential-Identifier is the credential id.
        assert_eq!(upstream_header(&reply, "x-credential-identifier"), key.body["id"].as_str());
    }
    // :555-582: an unknown key is refused either way.
    for name in ["api_key", "api-key"] {
        let reply = proxy_client.request(&proxy, "GET", None, "/key8", &[(name, "123")]).await?;
        assert_eq!(reply.status, 401, "{name}");
        assert_eq!(reply.body["message"], "Unauthorized");
        assert_eq!(header(&reply, "www-authenticate"), Some("Key"));
    }

    // 10-basic-auth/03-access_spec.lua:271-282: the username.
    let basic = format!("Basic {}", tollgate_tests::base64(b"user123:password123", false));
    let reply = proxy_client.request(&proxy, "GET", None, "/basic", &[("authorization", &basic)]).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(upstream_header(&reply, "x-consumer-username"), Some("bob"));
    assert_eq!(upstream_header(&reply, "x-credential-identifier"), Some("user123"));

    // 16-jwt/03-access_spec.lua:476-491: the jwt credential's key.
    let exp = tollgate_tests::system_now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 600;
    let token = hs256("jwt-secret", &json!({"iss": "jwt-key", "exp": exp}));
    let bearer = format!("Bearer {token}");
    let reply = proxy_client.request(&proxy, "GET", None, "/jwt", &[("authorization", &bearer)]).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(upstream_header(&reply, "x-credential-identifier"), Some("jwt-key"));
    // :310-323: an empty `iss` is invalid.
    let bearer = format!("Bearer {}", hs256("jwt-secret", &json!({"iss": "", "exp": exp})));
    let reply = proxy_client.request(&proxy, "GET", None, "/jwt", &[("authorization", &bearer)]).await?;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.body, json!({"message": "Invalid 'iss' in claims"}));
    assert_eq!(header(&reply, "www-authenticate"), Some("Bearer error=\"invalid_token\""));
    // :1122-1137: a claim to verify that is missing "must be a number".
    let bearer = format!("Bearer {}", hs256("jwt-secret", &json!({"iss": "jwt-key"})));
    let reply = proxy_client.request(&proxy, "GET", None, "/jwt", &[("authorization", &bearer)]).await?;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.body, json!({"exp": "must be a number"}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting_hides_retry_after_and_limits_by_the_request_path() -> anyhow::Result<()> {
    let (cluster, _echo) = echo_cluster(&[], "").await?;
    let plugins = [(
        "/hidden",
        json!({"name": "rate-limiting", "config": {"minute": 6, "limit_by": "ip", "hide_client_headers": true}}),
    )];
    routes_with_plugins(&cluster, &plugins).await?;
    // 23-rate-limiting/04-access_spec.lua:877-920: `limit_by: path` on a service with
    // two routes; only `/1-test` shares the path's counter, `/2-test` counts per ip.
    let client = cluster.client();
    client.post("/services/echo/routes", &json!({"paths": ["/1-test"]})).await?;
    client.post("/services/echo/routes", &json!({"paths": ["/2-test"]})).await?;
    let plugin = json!({"name": "rate-limiting", "config": {"minute": 6, "limit_by": "path", "path": "/1-test"}});
    client.post("/services/echo/plugins", &plugin).await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let proxy_client = ProxyClient::new();

    // :624-679: no client headers, and no Retry-After on the refusal either.
    for request in 1..=7 {
        let reply = proxy_client.request(&proxy, "GET", None, "/hidden", &[]).await?;
        let expected = if request <= 6 { 200 } else { 429 };
        assert_eq!(reply.status, expected, "request {request}");
        for name in ["x-ratelimit-limit-minute", "ratelimit-limit", "ratelimit-remaining", "retry-after"] {
            assert_eq!(header(&reply, name), None, "request {request}: {name}");
        }
    }
    for path in ["/1-test", "/2-test"] {
        for request in 1..=7 {
            let reply = proxy_client.request(&proxy, "GET", None, path, &[]).await?;
            let expected = if request <= 6 { 200 } else { 429 };
            assert_eq!(reply.status, expected, "{path} request {request}");
        }
    }
    Ok(())
}

/// 12-request-size-limiting/01-access_spec.lua, the limit 2 MB (Kong's fixture uses
/// `allowed_payload_size = 2`; a 2 KB limit here keeps the bodies small).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_size_limiting_answers_417_to_expect_and_reads_chunked_bodies_first() -> anyhow::Result<()> {
    let upstream = tollgate_tests::CountingUpstream::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    cluster.client().post("/services", &json!({"name": "echo", "url": format!("http://{}", upstream.address)})).await?;
    let plugin = json!({"name": "request-size-limiting", "config": {"allowed_payload_size": 2, "size_unit": "kilobytes"}});
    routes_with_plugins(&cluster, &[("/request", plugin)]).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let limit = 2 * 1024;
    let over = "a".repeat(limit + 1);
    let at = "a".repeat(limit);
    let sized = |body: &str, expect: bool| {
        let expect = if expect { "Expect: 100-continue\r\n" } else { "" };
        format!("POST /request HTTP/1.1\r\nHost: limit.test\r\nContent-Length: {}\r\n{expect}Connection: close\r\n\r\n{body}", body.len())
    };
    let chunked = |body: &str, expect: bool| {
        let expect = if expect { "Expect: 100-continue\r\n" } else { "" };
        format!(
            "GET /request HTTP/1.1\r\nHost: limit.test\r\nTransfer-Encoding: chunked\r\n{expect}Connection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    };
    let before = upstream.received();
    // (request, status): :112 (413), :129 (417), :97 (at the limit), :216 (chunked
    // 413), :234 (chunked with Expect 417), :185 (chunked at the limit).
    let rows = [
        (sized(&over, false), 413),
        (sized(&over, true), 417),
        (sized(&at, true), 200),
        (chunked(&over, false), 413),
        (chunked(&over, true), 417),
        (chunked(&at, false), 200),
    ];
    for (index, (request, status)) in rows.iter().enumerate() {
        let (got, text) = raw_exchange(&proxy, request.as_bytes()).await?;
        let last = text.rsplit("HTTP/1.1 ").next().unwrap_or_default();
        let got = if got == 100 { last.split(' ').next().and_then(|s| s.parse().ok()).unwrap_or(0) } else { got };
        assert_eq!(got, *status, "row {index}: {text}");
        if *status != 200 {
            assert!(text.contains("Request size limit exceeded"), "row {index}: {text}");
        }
    }
    // The refused bodies never reached the upstream: only the two at the limit did.
    assert_eq!(upstream.received() - before, 2);
    Ok(())
}
