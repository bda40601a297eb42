//! The data path against a real upstream (`tollgate echo`).

use serde_json::json;
use tollgate_tests::{eventually, proxy_request, EchoServer, TestCluster, CONVERGE_TIMEOUT};

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
    let cluster = TestCluster::start(1).await?;
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
    eventually("the proxy to publish the routes", CONVERGE_TIMEOUT, || async {
        let status = cluster.status(1).await?;
        (status["published_version"].as_u64()? >= version).then_some(())
    })
    .await?;

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
    let cluster = TestCluster::start(1).await?;
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
    let version = last.config_version.unwrap_or(0);
    eventually("the proxy to publish", CONVERGE_TIMEOUT, || async {
        (cluster.status(1).await?["published_version"].as_u64()? >= version).then_some(())
    })
    .await?;

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
    let mut cluster = TestCluster::start(3).await?;
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
