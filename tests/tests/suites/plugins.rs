// The suite itself; `PROXY_MODE` comes from the test file that includes it
// (tests/tests/plugins.rs and tests/tests/plugins_hyper.rs).

use serde_json::{json, Value};
use tollgate_client::AdminClient;
use tollgate_tests::{proxy_request, EchoServer, TestCluster};

fn id(reply: &tollgate_client::Reply) -> String {
    reply.body["id"].as_str().expect("an id").to_string()
}

/// A service on the echo upstream with one route per path; returns their ids.
async fn service_with_routes(
    client: &AdminClient,
    echo: &EchoServer,
    name: &str,
    paths: &[&str],
) -> anyhow::Result<(String, Vec<String>)> {
    let service = client.post("/services", &json!({"name": name, "url": format!("http://{}", echo.address)})).await?;
    let mut routes = Vec::new();
    for path in paths {
        let route = client.post(&format!("/services/{name}/routes"), &json!({ "paths": [path] })).await?;
        routes.push(id(&route));
    }
    Ok((id(&service), routes))
}

async fn consumer_with_key(client: &AdminClient, username: &str, key: &str) -> anyhow::Result<String> {
    let consumer = client.post("/consumers", &json!({ "username": username })).await?;
    client.post(&format!("/consumers/{username}/key-auth"), &json!({ "key": key })).await?;
    Ok(id(&consumer))
}

/// Waits until the data path has everything written so far.
async fn settle(cluster: &TestCluster) -> anyhow::Result<()> {
    let status = cluster.status(1).await.ok_or_else(|| anyhow::anyhow!("no /status from node 1"))?;
    cluster.published(status["config_version"].as_u64().unwrap_or(0)).await
}

fn header<'a>(reply: &'a tollgate_tests::ProxyReply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).and_then(|value| value.to_str().ok())
}

fn upstream_header<'a>(reply: &'a tollgate_tests::ProxyReply, name: &str) -> Option<&'a str> {
    reply.body["headers"][name][0].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precedence_follows_kongs_order_over_every_scope_combination() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (service, routes) = service_with_routes(&client, &echo, "scoped", &["/scoped"]).await?;
    let route = &routes[0];
    let consumer = consumer_with_key(&client, "alice", "alice-key").await?;
    client.post("/plugins", &json!({"name": "key-auth"})).await?;

    // One request-termination per scope, each saying which it is. Kong's order, most
    // specific first.
    let scopes: [(&str, Value); 8] = [
        (
            "consumer+route+service",
            json!({"consumer": {"id": consumer}, "route": {"id": route}, "service": {"id": service}}),
        ),
        ("consumer+route", json!({"consumer": {"id": consumer}, "route": {"id": route}})),
        ("consumer+service", json!({"consumer": {"id": consumer}, "service": {"id": service}})),
        ("route+service", json!({"route": {"id": route}, "service": {"id": service}})),
        ("consumer", json!({"consumer": {"id": consumer}})),
        ("route", json!({"route": {"id": route}})),
        ("service", json!({"service": {"id": service}})),
        ("global", json!({})),
    ];
    let mut ids = Vec::new();
    for (label, scope) in &scopes {
        let mut body = json!({"name": "request-termination", "config": {"status_code": 418, "message": label}});
        for (key, value) in scope.as_object().expect("object") {
            body[key] = value.clone();
        }
        ids.push(id(&client.post("/plugins", &body).await?));
    }
    let proxy = cluster.nodes[0].proxy_url();
    for (position, (label, _)) in scopes.iter().enumerate() {
        settle(&cluster).await?;
        let reply = proxy_request(&proxy, "GET", None, "/scoped/x", &[("apikey", "alice-key")]).await?;
        assert_eq!(reply.status, 418, "{label}: {}", reply.body);
        assert_eq!(reply.body["message"], *label, "with every scope up to {label} configured");
        // Remove the winner: the next most specific scope must answer.
        client.delete(&format!("/plugins/{}", ids[position])).await?;
    }
    settle(&cluster).await?;
    let reply = proxy_request(&proxy, "GET", None, "/scoped/x", &[("apikey", "alice-key")]).await?;
    assert_eq!(reply.status, 200, "no termination left: {}", reply.body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_auth_identifies_consumers_hides_credentials_and_falls_back_to_anonymous() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "keyed", &["/keyed", "/hidden", "/open"]).await?;
    let alice = consumer_with_key(&client, "alice", "alice-key").await?;
    let guest = client.post("/consumers", &json!({"username": "guest"})).await?;
    client.post(&format!("/routes/{}/plugins", routes[0]), &json!({"name": "key-auth"})).await?;
    client
        .post(
            &format!("/routes/{}/plugins", routes[1]),
            &json!({"name": "key-auth", "config": {"hide_credentials": true, "key_names": ["apikey", "x-api-key"]}}),
        )
        .await?;
    client
        .post(&format!("/routes/{}/plugins", routes[2]), &json!({"name": "key-auth", "config": {"anonymous": "guest"}}))
        .await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();

    let missing = proxy_request(&proxy, "GET", None, "/keyed/x", &[]).await?;
    assert_eq!(missing.status, 401);
    // Kong's spec/03-plugins/09-key-auth/02-access_spec.lua:220 and :296 (`Key`, no
    // realm unless configured), :320 ("Unauthorized" for an unknown key).
    assert_eq!(missing.body["message"], "No API key found in request");
    assert_eq!(header(&missing, "www-authenticate"), Some("Key"));
    let wrong = proxy_request(&proxy, "GET", None, "/keyed/x", &[("apikey", "nope")]).await?;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.body["message"], "Unauthorized");
    assert_eq!(header(&wrong, "www-authenticate"), Some("Key"));

    // A client's own X-Consumer-* headers never reach the upstream.
    let good = proxy_request(&proxy, "GET", None, "/keyed/x", &[("apikey", "alice-key"), ("x-consumer-id", "spoofed")])
        .await?;
    assert_eq!(good.status, 200, "{}", good.body);
    assert_eq!(upstream_header(&good, "x-consumer-id"), Some(alice.as_str()));
    assert_eq!(upstream_header(&good, "x-consumer-username"), Some("alice"));
    assert!(upstream_header(&good, "x-credential-identifier").is_some());
    assert_eq!(upstream_header(&good, "apikey"), Some("alice-key"), "kept without hide_credentials");
    assert_eq!(upstream_header(&good, "x-anonymous-consumer"), None);

    // hide_credentials: the key leaves neither the query string nor the header.
    let query = proxy_request(&proxy, "GET", None, "/hidden/x?a=1&apikey=alice-key&b=2", &[]).await?;
    assert_eq!(query.status, 200, "{}", query.body);
    assert_eq!(query.body["query"], "a=1&b=2");
    let headed = proxy_request(&proxy, "GET", None, "/hidden/x", &[("x-api-key", "alice-key")]).await?;
    assert_eq!(headed.status, 200, "{}", headed.body);
    assert_eq!(upstream_header(&headed, "x-api-key"), None);

    // anonymous: no key is let through as the configured consumer, and says so.
    let anonymous = proxy_request(&proxy, "GET", None, "/open/x", &[]).await?;
    assert_eq!(anonymous.status, 200, "{}", anonymous.body);
    assert_eq!(upstream_header(&anonymous, "x-consumer-id"), guest.body["id"].as_str());
    assert_eq!(upstream_header(&anonymous, "x-anonymous-consumer"), Some("true"));
    Ok(())
}

/// POSTs `body` with `content_type` through the proxy.
async fn post_body(
    proxy: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> anyhow::Result<tollgate_tests::ProxyReply> {
    let request = http::Request::post(format!("{proxy}{path}"))
        .header("content-type", content_type)
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))?;
    tollgate_tests::ProxyClient::new().send(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_auth_finds_keys_in_form_and_json_bodies_and_hides_them() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "bodies", &["/body", "/hidden-body"]).await?;
    consumer_with_key(&client, "alice", "alice-key").await?;
    client
        .post(&format!("/routes/{}/plugins", routes[0]), &json!({"name": "key-auth", "config": {"key_in_body": true}}))
        .await?;
    let hidden = json!({"name": "key-auth", "config": {"key_in_body": true, "hide_credentials": true}});
    client.post(&format!("/routes/{}/plugins", routes[1]), &hidden).await?;
    let transformer = json!({"name": "request-transformer", "config": {"add": {"body": ["via:tollgate"]}}});
    client.post(&format!("/routes/{}/plugins", routes[1]), &transformer).await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    const FORM: &str = "application/x-www-form-urlencoded";

    let form = post_body(&proxy, "/body/x", FORM, "x=1&apikey=alice-key").await?;
    assert_eq!(form.status, 200, "{}", form.body);
    assert_eq!(upstream_header(&form, "x-consumer-username"), Some("alice"));
    assert_eq!(form.body["body"], "x=1&apikey=alice-key", "kept without hide_credentials");
    let json_body = post_body(&proxy, "/body/x", "application/json", r#"{"apikey":"alice-key","n":1}"#).await?;
    assert_eq!(json_body.status, 200, "{}", json_body.body);
    assert_eq!(upstream_header(&json_body, "x-consumer-username"), Some("alice"));
    let missing = post_body(&proxy, "/body/x", FORM, "x=1").await?;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.body["message"], "No API key found in request");
    let wrong = post_body(&proxy, "/body/x", FORM, "apikey=nope").await?;
    assert_eq!(wrong.status, 401);
    // 09-key-auth/02-access_spec.lua:496 "returns 401 Unauthorized on invalid key" (body)
    assert_eq!(wrong.body["message"], "Unauthorized");
    // A header key still works, and the body is not read for it.
    let headed = proxy_request(&proxy, "GET", None, "/body/x", &[("apikey", "alice-key")]).await?;
    assert_eq!(headed.status, 200, "{}", headed.body);

    // hide_credentials takes the key out of the body; request-transformer then adds a
    // field to what is left, form or JSON, and the upstream gets a length that fits.
    let form = post_body(&proxy, "/hidden-body/x", FORM, "apikey=alice-key&x=a+b").await?;
    assert_eq!(form.status, 200, "{}", form.body);
    let sent = form.body["body"].as_str().unwrap_or_default();
    let mut fields: Vec<&str> = sent.split('&').collect();
    fields.sort_unstable();
    assert_eq!(fields, ["via=tollgate", "x=a%20b"], "{sent}");
    assert_eq!(upstream_header(&form, "content-length"), Some(sent.len().to_string().as_str()));
    let json_body =
        post_body(&proxy, "/hidden-body/x", "application/json", r#"{"apikey":"alice-key","keep":true}"#).await?;
    assert_eq!(json_body.status, 200, "{}", json_body.body);
    let sent: Value = serde_json::from_str(json_body.body["body"].as_str().unwrap_or_default())?;
    assert_eq!(sent, json!({"keep": true, "via": "tollgate"}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_ip_restriction_rate_limiting_correlation_id_and_termination() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &["--trusted-ips", "127.0.0.1/32", "--real-ip-header", "X-Forwarded-For", "--real-ip-recursive", "on"]).await?;
    let client = cluster.client();
    let (_, routes) =
        service_with_routes(&client, &echo, "guarded", &["/acl", "/ip", "/limited", "/correlated", "/maybe"]).await?;
    consumer_with_key(&client, "alice", "alice-key").await?;
    consumer_with_key(&client, "bob", "bob-key").await?;
    client.post("/consumers/alice/acls", &json!({"group": "gold"})).await?;
    let plugins = [
        (0, json!({"name": "key-auth"})),
        (0, json!({"name": "acl", "config": {"allow": ["gold"]}})),
        (
            1,
            json!({"name": "ip-restriction", "config": {"allow": ["10.1.0.0/16"], "deny": ["10.1.9.0/24"], "status": 451, "message": "not from there"}}),
        ),
        (2, json!({"name": "rate-limiting", "config": {"day": 3, "limit_by": "ip"}})),
        (3, json!({"name": "correlation-id", "config": {"echo_downstream": true}})),
        (
            4,
            json!({"name": "request-termination", "config": {"status_code": 403, "body": "<b>closed</b>", "content_type": "text/html", "trigger": "x-close"}}),
        ),
    ];
    for (route, body) in plugins {
        client.post(&format!("/routes/{}/plugins", routes[route]), &body).await?;
    }
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();

    // acl: alice is in gold, bob is not.
    let alice = proxy_request(&proxy, "GET", None, "/acl/x", &[("apikey", "alice-key")]).await?;
    assert_eq!(alice.status, 200, "{}", alice.body);
    assert_eq!(upstream_header(&alice, "x-consumer-groups"), Some("gold"));
    let bob = proxy_request(&proxy, "GET", None, "/acl/x", &[("apikey", "bob-key")]).await?;
    assert_eq!(bob.status, 403);
    assert_eq!(bob.body["message"], "You cannot consume this service");

    // ip-restriction on the client address from the trusted forwarded chain.
    let inside = proxy_request(&proxy, "GET", None, "/ip/x", &[("x-forwarded-for", "10.1.2.3")]).await?;
    assert_eq!(inside.status, 200, "{}", inside.body);
    for outside in ["10.2.0.1", "10.1.9.9"] {
        let refused = proxy_request(&proxy, "GET", None, "/ip/x", &[("x-forwarded-for", outside)]).await?;
        assert_eq!(refused.status, 451, "{outside}");
        assert_eq!(refused.body["message"], "not from there");
    }

    // rate-limiting, local policy: three a day per client address, Kong's headers.
    for remaining in [2, 1, 0] {
        let reply = proxy_request(&proxy, "GET", None, "/limited/x", &[("x-forwarded-for", "10.7.7.7")]).await?;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(header(&reply, "ratelimit-limit"), Some("3"));
        assert_eq!(header(&reply, "ratelimit-remaining"), Some(remaining.to_string().as_str()));
        assert_eq!(header(&reply, "x-ratelimit-limit-day"), Some("3"));
        assert_eq!(header(&reply, "x-ratelimit-remaining-day"), Some(remaining.to_string().as_str()));
        assert!(header(&reply, "ratelimit-reset").and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s <= 86_400));
    }
    let limited = proxy_request(&proxy, "GET", None, "/limited/x", &[("x-forwarded-for", "10.7.7.7")]).await?;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["message"], "API rate limit exceeded");
    assert!(header(&limited, "retry-after").is_some());
    assert_eq!(header(&limited, "ratelimit-remaining"), Some("0"));
    let other = proxy_request(&proxy, "GET", None, "/limited/x", &[("x-forwarded-for", "10.7.7.8")]).await?;
    assert_eq!(other.status, 200, "another client has its own count");

    // correlation-id: generated, sent upstream, echoed; a client's own id is kept.
    let generated = proxy_request(&proxy, "GET", None, "/correlated/x", &[]).await?;
    let echoed = header(&generated, "kong-request-id").expect("echoed id");
    assert_eq!(upstream_header(&generated, "kong-request-id"), Some(echoed));
    assert!(echoed.contains('#'), "uuid#counter: {echoed}");
    let kept = proxy_request(&proxy, "GET", None, "/correlated/x", &[("kong-request-id", "mine")]).await?;
    assert_eq!(header(&kept, "kong-request-id"), Some("mine"));

    // request-termination with a trigger: only requests carrying it are answered.
    let passed = proxy_request(&proxy, "GET", None, "/maybe/x", &[]).await?;
    assert_eq!(passed.status, 200);
    let closed = proxy_request(&proxy, "GET", None, "/maybe/x", &[("x-close", "1")]).await?;
    assert_eq!(closed.status, 403);
    assert_eq!(closed.body, "<b>closed</b>");
    assert_eq!(header(&closed, "content-type"), Some("text/html"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_plugin_configs_are_refused_with_the_field_named_and_change_nothing() -> anyhow::Result<()> {
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let before = client.get("/config").await?;
    let cases = [
        (json!({"name": "key-auth", "config": {"key_names": []}}), "config.key_names"),
        (json!({"name": "key-auth", "config": {"hide_credentials": "yes"}}), "config.hide_credentials"),
        (json!({"name": "acl", "config": {}}), "config"),
        (json!({"name": "ip-restriction", "config": {"allow": ["300.1.1.1"]}}), "config.allow[0]"),
        (json!({"name": "request-termination", "config": {"status_code": 600}}), "config.status_code"),
        (json!({"name": "rate-limiting", "config": {"minute": 5, "limit_by": "planet"}}), "config.limit_by"),
        (json!({"name": "rate-limiting", "config": {"minute": 5, "policy": "redis"}}), "config.policy"),
        (json!({"name": "correlation-id", "config": {"generator": "dice"}}), "config.generator"),
        (json!({"name": "aws-lambda"}), "name"),
        (json!({"name": "cors", "config": {"methods": ["GET", "FETCH"]}}), "config.methods[1]"),
        (json!({"name": "cors", "config": {"origins": ["https://(unclosed"]}}), "config.origins[0]"),
        (json!({"name": "request-size-limiting", "config": {"size_unit": "gigabytes"}}), "config.size_unit"),
        (json!({"name": "basic-auth", "config": {"realm": "a\"b"}}), "config.realm"),
        (
            json!({"name": "response-transformer", "config": {"add": {"json": ["a:1"], "json_types": ["date"]}}}),
            "config.add.json_types[0]",
        ),
        (
            json!({"name": "request-transformer", "config": {"rename": {"querystring": ["no-colon"]}}}),
            "config.rename.querystring[0]",
        ),
        (json!({"name": "file-log", "config": {"path": "relative.log"}}), "config.path"),
        (
            json!({"name": "http-log", "config": {"http_endpoint": "http://collector/logs", "method": "GET"}}),
            "config.method",
        ),
        (
            json!({"name": "opentelemetry", "config": {"endpoint": "http://collector:4318/v1/traces", "sampling_rate": 2}}),
            "config.sampling_rate",
        ),
        (json!({"name": "prometheus", "config": {"per_consumer": "yes"}}), "config.per_consumer"),
        (json!({"name": "proxy-cache", "config": {"strategy": "redis"}}), "config.strategy"),
        (json!({"name": "hmac-auth", "config": {"algorithms": ["hmac-md5"]}}), "config.algorithms[0]"),
        (json!({"name": "jwt", "config": {"claims_to_verify": ["iat"]}}), "config.claims_to_verify[0]"),
    ];
    for (body, field) in cases {
        let refused = client.post("/plugins", &body).await.unwrap_err();
        assert_eq!(refused.status(), Some(400), "{body}: {refused}");
        let fields = refused.api_error().map(|e| e.fields.clone()).unwrap_or_default();
        assert!(fields.contains_key(field), "{body}: expected {field} in {fields:?}");
    }
    // A stored config shows every default, and PATCH merges into it.
    let created = client.post("/plugins", &json!({"name": "rate-limiting", "config": {"minute": 5}})).await?;
    assert_eq!(created.body["config"]["limit_by"], "consumer");
    assert_eq!(created.body["config"]["error_code"], 429);
    let patched = client.patch(&format!("/plugins/{}", id(&created)), &json!({"config": {"hour": 100}})).await?;
    assert_eq!(patched.body["config"]["minute"], 5.0);
    assert_eq!(patched.body["config"]["hour"], 100.0);
    client.delete(&format!("/plugins/{}", id(&created))).await?;
    let after = client.get("/config").await?;
    assert_eq!(before.body["plugins"], after.body["plugins"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_request_size_limiting_and_prometheus() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "browser", &["/cors", "/small", "/counted"]).await?;
    let plugins = [
        (
            0,
            json!({"name": "cors", "config": {"origins": ["https://app.example", "https://.*\\.trusted\\.example"], "credentials": true, "max_age": 600, "exposed_headers": ["x-total"]}}),
        ),
        (1, json!({"name": "request-size-limiting", "config": {"allowed_payload_size": 1, "size_unit": "kilobytes"}})),
        (2, json!({"name": "prometheus", "config": {"status_code_metrics": true, "latency_metrics": true}})),
    ];
    for (route, body) in plugins {
        client.post(&format!("/routes/{}/plugins", routes[route]), &body).await?;
    }
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();

    // cors: a preflight is answered here; a simple request gets the headers added.
    let preflight = proxy_request(
        &proxy,
        "OPTIONS",
        None,
        "/cors/x",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "x-custom"),
        ],
    )
    .await?;
    assert_eq!(preflight.status, 200);
    assert_eq!(header(&preflight, "access-control-allow-origin"), Some("https://app.example"));
    assert_eq!(header(&preflight, "access-control-allow-credentials"), Some("true"));
    assert_eq!(header(&preflight, "access-control-allow-headers"), Some("x-custom"));
    assert_eq!(header(&preflight, "access-control-max-age"), Some("600"));
    assert!(header(&preflight, "access-control-allow-methods").is_some_and(|m| m.contains("PUT")));
    assert!(preflight.body.get("method").is_none(), "a preflight does not reach the upstream");
    let simple = proxy_request(&proxy, "GET", None, "/cors/x", &[("origin", "https://a.trusted.example")]).await?;
    assert_eq!(simple.status, 200);
    assert_eq!(simple.body["method"], "GET");
    assert_eq!(header(&simple, "access-control-allow-origin"), Some("https://a.trusted.example"));
    assert_eq!(header(&simple, "access-control-expose-headers"), Some("x-total"));
    let stranger = proxy_request(&proxy, "GET", None, "/cors/x", &[("origin", "https://evil.example")]).await?;
    assert_eq!(header(&stranger, "access-control-allow-origin"), None);

    // request-size-limiting: by Content-Length, and a chunked body cut as it streams.
    let sender = tollgate_tests::ProxyClient::new();
    let post = |body: Vec<u8>| {
        http::Request::post(format!("{proxy}/small/x")).body(http_body_util::Full::new(bytes::Bytes::from(body)))
    };
    assert_eq!(sender.send(post(vec![b'a'; 1024])?).await?.status, 200);
    let too_big = sender.send(post(vec![b'a'; 1025])?).await?;
    assert_eq!(too_big.status, 413);
    assert_eq!(too_big.body["message"], "Request size limit exceeded");
    let chunked = format!(
        "POST /small/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
        "b".repeat(0x800)
    );
    let (status, _) = tollgate_tests::raw_exchange(&proxy, chunked.as_bytes()).await?;
    assert_eq!(status, 413);

    // prometheus: Kong's names on the node's /metrics.
    for _ in 0..3 {
        assert_eq!(proxy_request(&proxy, "GET", None, "/counted/x", &[]).await?.status, 200);
    }
    let text = client.get("/metrics").await?.body.as_str().unwrap_or_default().to_string();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("kong_http_requests_total") && l.contains("code=\"200\"") && l.contains("source=\"service\"")
        })
        .unwrap_or_else(|| panic!("no kong_http_requests_total line in\n{text}"));
    assert!(line.ends_with(" 3"), "{line}");
    assert!(text.contains("kong_request_latency_ms_bucket"), "latency histograms exported");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_stores_only_salted_hashes_and_verifies_off_the_worker() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "basic", &["/basic"]).await?;
    client.post("/consumers", &json!({"username": "alice"})).await?;
    let created =
        client.post("/consumers/alice/basic-auth", &json!({"username": "alice", "password": "s3cret"})).await?;
    let stored = created.body["password"].as_str().expect("password field").to_string();
    assert!(stored.starts_with("$pbkdf2-sha256$"), "{stored}");
    assert!(!created.body.to_string().contains("s3cret"), "the Admin API never shows the password");
    client
        .post(
            &format!("/routes/{}/plugins", routes[0]),
            &json!({"name": "basic-auth", "config": {"hide_credentials": true}}),
        )
        .await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let basic = |user_pass: &str| format!("Basic {}", base64(user_pass.as_bytes()));

    let missing = proxy_request(&proxy, "GET", None, "/basic/x", &[]).await?;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.body["message"], "Unauthorized");
    assert_eq!(header(&missing, "www-authenticate"), Some("Basic realm=\"service\""));
    let wrong = proxy_request(&proxy, "GET", None, "/basic/x", &[("authorization", &basic("alice:guess"))]).await?;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.body["message"], "Invalid authentication credentials");
    for _ in 0..3 {
        // The first success hashes on the blocking pool; the next ones hit the cache.
        let good = proxy_request(&proxy, "GET", None, "/basic/x", &[("authorization", &basic("alice:s3cret"))]).await?;
        assert_eq!(good.status, 200, "{}", good.body);
        assert_eq!(upstream_header(&good, "x-consumer-username"), Some("alice"));
        assert_eq!(upstream_header(&good, "authorization"), None, "hide_credentials");
    }

    // The secret is nowhere: not in the config dump, the metrics or the node's log.
    let dump = client.get("/config").await?;
    assert!(!dump.body.to_string().contains("s3cret"));
    let metrics = client.get("/metrics").await?;
    assert!(!metrics.body.to_string().contains("s3cret"));
    assert!(!cluster.nodes[0].log().contains("s3cret"), "access log and node log");
    // A dump loads back without hashing the hash again: the password still works.
    client.post("/config", &dump.body).await?;
    settle(&cluster).await?;
    let again = proxy_request(&proxy, "GET", None, "/basic/x", &[("authorization", &basic("alice:s3cret"))]).await?;
    assert_eq!(again.status, 200, "{}", again.body);
    // A declarative document's plain passwords are hashed before they are stored.
    let mut document = dump.body.clone();
    match document.get_mut("basicauth_credentials").and_then(Value::as_array_mut) {
        Some(flat) => flat[0]["password"] = json!("n3w-secret"),
        None => document["consumers"][0]["basicauth_credentials"][0]["password"] = json!("n3w-secret"),
    }
    client.post("/config", &document).await?;
    settle(&cluster).await?;
    let after = client.get("/config").await?;
    assert!(!after.body.to_string().contains("n3w-secret"), "{}", after.body);
    let renewed =
        proxy_request(&proxy, "GET", None, "/basic/x", &[("authorization", &basic("alice:n3w-secret"))]).await?;
    assert_eq!(renewed.status, 200, "{}", renewed.body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_transformers_edit_headers_query_method_and_path() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "shaped", &["/shaped"]).await?;
    let request = json!({"name": "request-transformer", "config": {
        "http_method": "POST",
        "remove": {"headers": ["x-drop"], "querystring": ["secret"]},
        "rename": {"headers": ["x-old:x-new"], "querystring": ["q:query"]},
        "replace": {"headers": ["x-keep:replaced", "x-absent:never"], "uri": "/rewritten"},
        "add": {"headers": ["x-added:yes", "x-keep:not-added"], "querystring": ["source:tollgate"]},
        "append": {"headers": ["x-list:two"], "querystring": ["tag:b"]}
    }});
    let response = json!({"name": "response-transformer", "config": {
        "remove": {"headers": ["x-tollgate-upstream-latency"]},
        "rename": {"headers": ["content-type:x-original-content-type"]},
        "add": {"headers": ["x-served-by:tollgate"]},
        "append": {"headers": ["x-list:b"]}
    }});
    for plugin in [request, response] {
        client.post(&format!("/routes/{}/plugins", routes[0]), &plugin).await?;
    }
    let refused = client
        .post("/plugins", &json!({"name": "request-transformer", "config": {"add": {"headers": ["no-colon"]}}}))
        .await
        .unwrap_err();
    assert!(refused.api_error().is_some_and(|e| e.fields.contains_key("config.add.headers[0]")), "{refused}");
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();

    let reply = proxy_request(
        &proxy,
        "GET",
        None,
        "/shaped/x?secret=s&q=1&tag=a",
        &[("x-drop", "1"), ("x-old", "moved"), ("x-keep", "original"), ("x-list", "one")],
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = &reply.body;
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/rewritten");
    assert_eq!(seen["query"], "query=1&tag=a&source=tollgate&tag=b");
    assert_eq!(upstream_header(&reply, "x-drop"), None);
    assert_eq!(upstream_header(&reply, "x-old"), None);
    assert_eq!(upstream_header(&reply, "x-new"), Some("moved"));
    assert_eq!(upstream_header(&reply, "x-keep"), Some("replaced"));
    assert_eq!(upstream_header(&reply, "x-absent"), None);
    assert_eq!(upstream_header(&reply, "x-added"), Some("yes"));
    assert_eq!(seen["headers"]["x-list"], json!(["one", "two"]));
    // The response side.
    assert_eq!(header(&reply, "x-tollgate-upstream-latency"), None);
    assert_eq!(header(&reply, "content-type"), None);
    assert_eq!(header(&reply, "x-original-content-type"), Some("application/json"));
    assert_eq!(header(&reply, "x-served-by"), Some("tollgate"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_log_and_http_log_write_kongs_entries_without_credentials() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let (collector_address, received) = start_collector().await?;
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("requests.log");
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "logged", &["/logged"]).await?;
    consumer_with_key(&client, "alice", "alice-secret-key").await?;
    let plugins = [
        json!({"name": "key-auth"}),
        json!({"name": "file-log", "config": {"path": log_path.to_string_lossy()}}),
        json!({"name": "http-log", "config": {"http_endpoint": format!("http://{collector_address}/logs"), "queue": {"max_batch_size": 2, "max_coalescing_delay": 0.2}}}),
    ];
    for plugin in plugins {
        client.post(&format!("/routes/{}/plugins", routes[0]), &plugin).await?;
    }
    let refused = client
        .post("/plugins", &json!({"name": "http-log", "config": {"http_endpoint": "ftp://example.com"}}))
        .await
        .unwrap_err();
    assert!(refused.api_error().is_some_and(|e| e.fields.contains_key("config.http_endpoint")), "{refused}");
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    for path in ["/logged/a?apikey=alice-secret-key&page=2", "/logged/b"] {
        let reply =
            proxy_request(&proxy, "GET", None, path, &[("apikey", "alice-secret-key"), ("x-trace", "t1")]).await?;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    let lines = tollgate_tests::eventually("two file-log lines", tollgate_tests::CONVERGE_TIMEOUT, || async {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await?;
    let first: Value = serde_json::from_str(&lines[0])?;
    assert_eq!(first["request"]["method"], "GET");
    assert_eq!(first["request"]["uri"], "/logged/a");
    assert_eq!(first["request"]["querystring"]["page"], "2");
    assert_eq!(first["request"]["headers"]["x-trace"], "t1");
    assert_eq!(first["response"]["status"], 200);
    assert_eq!(first["consumer"]["username"], "alice");
    assert_eq!(first["route"]["id"], routes[0].as_str());
    assert!(first["latencies"]["request"].is_u64());
    for line in &lines {
        assert!(!line.contains("alice-secret-key"), "a credential reached the log: {line}");
    }

    // http-log: both entries in one batch of two.
    let batch = tollgate_tests::eventually("an http-log batch", tollgate_tests::CONVERGE_TIMEOUT, || async {
        received.lock().await.first().map(|(_, body)| body.clone())
    })
    .await?;
    let entries = batch.as_array().expect("a batch is a JSON array");
    assert_eq!(entries.len(), 2, "{batch}");
    assert_eq!(entries[1]["request"]["uri"], "/logged/b");
    assert!(!batch.to_string().contains("alice-secret-key"));
    Ok(())
}

type Received = std::sync::Arc<tokio::sync::Mutex<Vec<(String, Value)>>>;

/// A log or trace collector: every JSON body POSTed to it, with its path.
async fn start_collector() -> anyhow::Result<(std::net::SocketAddr, Received)> {
    let received: Received = Default::default();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = collector.local_addr()?;
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = collector.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let path = request.uri().path().to_string();
                        let body = request.into_body().collect().await?.to_bytes();
                        if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                            sink.lock().await.push((path, value));
                        }
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((address, received))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentelemetry_propagates_traceparent_and_exports_spans_over_otlp_http() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let (collector, received) = start_collector().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "traced", &["/traced"]).await?;
    let config = json!({"endpoint": format!("http://{collector}/v1/traces"), "batch_span_count": 2, "batch_flush_delay": 0.2,
                        "resource_attributes": {"deployment.environment": "test"}});
    client.post(&format!("/routes/{}/plugins", routes[0]), &json!({"name": "opentelemetry", "config": config})).await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();

    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let continued = proxy_request(&proxy, "GET", None, "/traced/a", &[("traceparent", incoming)]).await?;
    let sent = upstream_header(&continued, "traceparent").expect("traceparent upstream").to_string();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "the client's trace continues");
    assert_ne!(parts[2], "00f067aa0ba902b7", "the upstream's parent is the proxy's span");
    assert_eq!(parts[3], "01");
    let fresh = proxy_request(&proxy, "GET", None, "/traced/b", &[]).await?;
    let fresh_header = upstream_header(&fresh, "traceparent").expect("a new trace").to_string();
    assert_ne!(fresh_header.split('-').nth(1), Some(parts[1]));

    let (path, body) = tollgate_tests::eventually("an OTLP batch", tollgate_tests::CONVERGE_TIMEOUT, || async {
        received.lock().await.first().cloned()
    })
    .await?;
    assert_eq!(path, "/v1/traces");
    let resource = &body["resourceSpans"][0]["resource"]["attributes"];
    assert!(resource.as_array().is_some_and(|a| a.iter().any(|kv| kv["key"] == "deployment.environment")), "{body}");
    let spans = body["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().expect("spans").clone();
    assert_eq!(spans.len(), 2, "{body}");
    let first = spans.iter().find(|span| span["traceId"] == parts[1]).expect("the continued trace's span");
    assert_eq!(first["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(first["spanId"], parts[2]);
    assert_eq!(first["name"], "kong");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cache_hits_misses_bypasses_expires_and_purges() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "cached", &["/cached", "/short"]).await?;
    client
        .post(
            &format!("/routes/{}/plugins", routes[0]),
            &json!({"name": "proxy-cache", "config": {"content_type": ["application/json"], "cache_control": true}}),
        )
        .await?;
    client
        .post(
            &format!("/routes/{}/plugins", routes[1]),
            &json!({"name": "proxy-cache", "config": {"content_type": ["application/json"], "cache_ttl": 1}}),
        )
        .await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let status = |reply: &tollgate_tests::ProxyReply| header(reply, "x-cache-status").map(str::to_string);

    let miss = proxy_request(&proxy, "GET", None, "/cached/item?a=1", &[]).await?;
    assert_eq!(status(&miss).as_deref(), Some("Miss"));
    let key = header(&miss, "x-cache-key").expect("a cache key").to_string();
    let hit = proxy_request(&proxy, "GET", None, "/cached/item?a=1", &[]).await?;
    assert_eq!(status(&hit).as_deref(), Some("Hit"));
    assert_eq!(hit.body, miss.body, "the stored body, byte for byte (the echo's peer port would differ)");
    assert!(header(&hit, "age").is_some());
    assert_eq!(header(&hit, "x-cache-key"), Some(key.as_str()));
    // Another query is another entry; a POST and a no-cache request bypass.
    let other = proxy_request(&proxy, "GET", None, "/cached/item?a=2", &[]).await?;
    assert_eq!(status(&other).as_deref(), Some("Miss"));
    let post = proxy_request(&proxy, "POST", None, "/cached/item?a=1", &[]).await?;
    assert_eq!(status(&post).as_deref(), Some("Bypass"));
    assert_eq!(post.body["method"], "POST");
    let fresh = proxy_request(&proxy, "GET", None, "/cached/item?a=1", &[("cache-control", "no-cache")]).await?;
    assert_eq!(status(&fresh).as_deref(), Some("Bypass"));

    // Purge through the Admin API: one key, then everything.
    let described = client.get(&format!("/proxy-cache/{key}")).await?;
    assert_eq!(described.body["status"], 200);
    client.delete(&format!("/proxy-cache/{key}")).await?;
    assert_eq!(client.get(&format!("/proxy-cache/{key}")).await.unwrap_err().status(), Some(404));
    let again = proxy_request(&proxy, "GET", None, "/cached/item?a=1", &[]).await?;
    assert_eq!(status(&again).as_deref(), Some("Miss"));
    client.delete("/proxy-cache").await?;
    let after_purge = proxy_request(&proxy, "GET", None, "/cached/item?a=2", &[]).await?;
    assert_eq!(status(&after_purge).as_deref(), Some("Miss"));

    // cache_ttl 1: the entry expires.
    assert_eq!(status(&proxy_request(&proxy, "GET", None, "/short/x", &[]).await?).as_deref(), Some("Miss"));
    assert_eq!(status(&proxy_request(&proxy, "GET", None, "/short/x", &[]).await?).as_deref(), Some("Hit"));
    tollgate_tests::eventually("the entry to expire", tollgate_tests::CONVERGE_TIMEOUT, || async {
        let reply = proxy_request(&proxy, "GET", None, "/short/x", &[]).await.ok()?;
        (status(&reply).as_deref() == Some("Miss")).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transformers_edit_json_bodies_both_ways() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "json", &["/json"]).await?;
    let request = json!({"name": "request-transformer", "config": {
        "remove": {"body": ["password"]},
        "rename": {"body": ["user:username"]},
        "add": {"body": ["source:tollgate"]},
        "append": {"body": ["tags:new"]}
    }});
    let response = json!({"name": "response-transformer", "config": {
        "remove": {"json": ["peer", "headers"]},
        "rename": {"json": ["listen:upstream"]},
        "add": {"json": ["cached:false", "version:2"], "json_types": ["boolean", "number"]}
    }});
    for plugin in [request, response] {
        client.post(&format!("/routes/{}/plugins", routes[0]), &plugin).await?;
    }
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let body = json!({"user": "alice", "password": "hunter2", "tags": ["a"]}).to_string();
    let request = http::Request::post(format!("{proxy}/json/x"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let reply = tollgate_tests::ProxyClient::new().send(request).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // What the upstream received (the echo returns it as a string).
    let sent: Value = serde_json::from_str(reply.body["body"].as_str().expect("the echoed body"))?;
    assert_eq!(sent, json!({"username": "alice", "tags": ["a", "new"], "source": "tollgate"}));
    // What the client got back.
    assert!(reply.body.get("peer").is_none() && reply.body.get("headers").is_none(), "{}", reply.body);
    assert_eq!(reply.body["upstream"], echo.address.as_str());
    assert_eq!(reply.body["cached"], false);
    assert_eq!(reply.body["version"], 2.0);
    let length: usize = header(&reply, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert_eq!(length, reply.body.to_string().len(), "Content-Length fits the edited body");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_runs_only_for_its_protocols() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "proto", &["/proto"]).await?;
    let https_only = json!({"name": "request-termination", "protocols": ["https"], "config": {"status_code": 403}});
    client.post(&format!("/routes/{}/plugins", routes[0]), &https_only).await?;
    settle(&cluster).await?;
    let reply = proxy_request(&cluster.nodes[0].proxy_url(), "GET", None, "/proto/x", &[]).await?;
    assert_eq!(reply.status, 200, "an https-only plugin does not run for http: {}", reply.body);
    Ok(())
}
