//! Kong's bundled plugins' answers, replayed from Kong's own specs (spec/03-plugins/ in
//! Kong's repository; each assertion names its file and line). The key-auth cases are
//! in suites/plugins.rs, which runs on both request paths.

use serde_json::json;
use tollgate_tests::{eventually, EchoServer, ProxyClient, TestCluster, CONVERGE_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_restriction_names_the_address_it_refuses() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let echo = EchoServer::start().await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "s", "url": format!("http://{}", echo.address)})).await?;
    client.post("/services/s/routes", &json!({"name": "r", "paths": ["/ip"]})).await?;
    let plugin = json!({"name": "ip-restriction", "config": {"deny": ["127.0.0.1"]}});
    let created = client.post("/routes/r/plugins", &plugin).await?;
    cluster.converged(created.config_version.expect("a version")).await?;
    let proxy = ProxyClient::new();
    let proxy_url = cluster.nodes[0].proxy_url();
    // 17-ip-restriction/02-access_spec.lua:308: the default message is Kong's, with
    // the client address.
    let refused = eventually("the plugin to apply", CONVERGE_TIMEOUT, || async {
        proxy.request(&proxy_url, "GET", None, "/ip/x", &[]).await.ok().filter(|reply| reply.status == 403)
    })
    .await?;
    assert_eq!(refused.body["message"], "IP address not allowed: 127.0.0.1");
    Ok(())
}

/// spec/02-integration/05-proxy/02-router_spec.lua:458 and :468, with the routes of
/// its setup at :247-273: a route whose service is disabled is not routed (it used to
/// answer 503), and a request it would have taken goes to the next route that matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_of_disabled_services_are_skipped() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let echo = EchoServer::start().await?;
    let client = cluster.client();
    let url = |path: &str| format!("http://{}{path}", echo.address);
    client.post("/services", &json!({"name": "off1", "url": url("/disabled-service-path/"), "enabled": false})).await?;
    client.post("/services/off1/routes", &json!({"paths": ["/disabled-service1"], "strip_path": false})).await?;
    client.post("/services", &json!({"name": "enabled-service", "url": url("/anything/")})).await?;
    client.post("/services/enabled-service/routes", &json!({"paths": ["~/enabled-service/\\w+"]})).await?;
    client.post("/services", &json!({"name": "off2", "url": url("/some-path/"), "enabled": false})).await?;
    let last = client
        .post("/services/off2/routes", &json!({"paths": ["/enabled-service/disabled"], "strip_path": true}))
        .await?;
    cluster.converged(last.config_version.expect("a version")).await?;
    let proxy = ProxyClient::new();
    let proxy_url = cluster.nodes[0].proxy_url();
    let reply = proxy.request(&proxy_url, "GET", None, "/disabled-service1", &[]).await?;
    assert_eq!(reply.status, 404, "{}", reply.body);
    let reply = proxy.request(&proxy_url, "GET", None, "/enabled-service/disabled", &[]).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Kong's spec checks the route and service ids; the service path shows which took it.
    let path = reply.body["path"].as_str().unwrap_or_default();
    assert!(path.starts_with("/anything"), "the enabled service's route took it: {}", reply.body);
    Ok(())
}
