//! A Kong 1.1-format declarative file loads unchanged and proxies as Kong 3.x would:
//! hundreds of services, regex route paths written the pre-3.0 way (no `~`), a plugin,
//! a consumer with a key, sent as YAML and in Kong's `{"config": "<yaml>"}` shape
//! (spec/02-integration/04-admin_api/15-off_spec.lua:225 posts 1.1 documents, :960
//! its large 1.1 fixture in the `config` shape; Kong's conversion of the paths is
//! kong/db/migrations/migrate_path_280_300.lua).

use std::fmt::Write as _;

use serde_json::{json, Value};
use tollgate_tests::{eventually, EchoServer, ProxyClient, TestCluster, CONVERGE_TIMEOUT};

const SERVICES: usize = 300;

/// A 1.1 file shaped as Kong users' are (`kong config db_export` of a 1.x/2.x node).
fn kong_1_1_file(echo: &str) -> String {
    let mut yaml = String::from("_format_version: \"1.1\"\nservices:\n");
    for i in 0..SERVICES {
        let _ = write!(
            yaml,
            "- name: svc-{i}\n  url: http://{echo}/base-{i}\n  connect_timeout: 60000\n  retries: 5\n  routes:\n  \
             - name: items-{i}\n    paths:\n    - /svc-{i}/items/\\d+$\n    strip_path: false\n    regex_priority: 0\n  \
             - name: plain-{i}\n    paths:\n    - /svc-{i}/plain\n    strip_path: true\n"
        );
    }
    let _ = write!(
        yaml,
        "plugins:\n- name: key-auth\n  service: svc-1\nconsumers:\n- username: alice\n  keyauth_credentials:\n  - key: alice-key\n"
    );
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kong_1_1_file_loads_and_proxies_as_kong_3_would() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3).await?;
    let echo = EchoServer::start().await?;
    let file = kong_1_1_file(&echo.address);
    let client = cluster.client();

    // Kong's `{"config": "<yaml>"}` body, then the same file as YAML: both load.
    let loaded = client.post("/config", &json!({ "config": file })).await?;
    assert_eq!(loaded.status, 201);
    let reply =
        client.request_bytes(http::Method::POST, "/config", "application/yaml", file.clone().into_bytes()).await?;
    assert_eq!(reply.status, 201);
    cluster.converged(reply.config_version.expect("a version")).await?;

    // Stored as 3.0: the regex path has Kong 3's `~`, the plain one is unchanged.
    let route = client.get("/routes/items-7").await?.body;
    assert_eq!(route["paths"], json!(["~/svc-7/items/\\d+$"]));
    assert_eq!(client.get("/routes/plain-7").await?.body["paths"], json!(["/svc-7/plain"]));
    let services = client.list_all("/services").await?;
    assert_eq!(services.len(), SERVICES);

    // Proxied through another node, as Kong 3 routes them.
    let proxy = ProxyClient::new();
    let proxy_url = cluster.nodes[2].proxy_url();
    let get = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let (proxy, proxy_url) = (proxy.clone(), proxy_url.clone());
        async move { proxy.request(&proxy_url, "GET", None, path, headers).await }
    };
    let matched = eventually("the regex route to match", CONVERGE_TIMEOUT, || async {
        get("/svc-7/items/42", &[]).await.ok().filter(|reply| reply.status == 200)
    })
    .await?;
    assert_eq!(matched.body["path"], "/base-7/svc-7/items/42", "strip_path false: {}", matched.body);
    assert_eq!(get("/svc-7/items/abc", &[]).await?.status, 404, "the regex is a regex, not a prefix");
    assert_eq!(get("/svc-7/items/42/more", &[]).await?.status, 404, "anchored by its `$`");
    let plain = get("/svc-299/plain/x", &[]).await?;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.body["path"], "/base-299/x");
    // The plugin and the consumer came along.
    assert_eq!(get("/svc-1/plain", &[]).await?.status, 401);
    assert_eq!(get("/svc-1/plain", &[("apikey", "alice-key")]).await?.status, 200);
    let dumped: Value = client.get("/config").await?.body;
    assert_eq!(dumped["_format_version"], "3.0");
    Ok(())
}

async fn call(admin_url: &str, method: &str, path: &str, body: &Value) -> anyhow::Result<(u16, String)> {
    tollgate_tests::admin_exchange(admin_url, method, path, Some(body)).await
}

/// spec/02-integration/04-admin_api/15-off_spec.lua:582-619: `?check_hash=1` with the
/// text the config was loaded from answers 304 and changes nothing; and
/// 02-kong_routes_spec.lua:224-269: `/status` reports the hash (32 characters). The
/// hash is replicated with the config: it survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_hash_skips_a_config_already_loaded() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(1).await?;
    let admin = cluster.nodes[0].admin_url();
    let document = json!({"config": "_format_version: \"1.1\"\nconsumers:\n- username: bobby_tables\n"});
    let (status, body) = call(&admin, "POST", "/config?check_hash=1", &document).await?;
    assert_eq!(status, 201, "{body}");
    let client = cluster.client();
    let hash = client.get("/status").await?.body["configuration_hash"].as_str().unwrap_or_default().to_string();
    assert_eq!(hash.len(), 32);
    assert_ne!(hash, "0".repeat(32));
    let (status, body) = call(&admin, "POST", "/config?check_hash=1", &document).await?;
    assert_eq!((status, body.as_str()), (304, ""));
    // Without check_hash the same text loads again.
    let (status, _) = call(&admin, "POST", "/config", &document).await?;
    assert_eq!(status, 201);

    // The hash is part of the replicated state: after a restart it still matches.
    cluster.node(1).stop();
    cluster.node(1).start()?;
    let admin = cluster.nodes[0].admin_url();
    let status = eventually("the restarted node to answer", CONVERGE_TIMEOUT, || async {
        call(&admin, "POST", "/config?check_hash=1", &document)
            .await
            .ok()
            .map(|(status, _)| status)
            .filter(|s| *s != 503)
    })
    .await?;
    assert_eq!(status, 304);

    // An entity write makes the config differ from the text: the hash is cleared and
    // the same text loads again.
    let client = cluster.client();
    client.post("/consumers", &json!({"username": "another"})).await?;
    assert_eq!(client.get("/status").await?.body["configuration_hash"], "0".repeat(32));
    let (status, _) = call(&admin, "POST", "/config?check_hash=1", &document).await?;
    assert_eq!(status, 201);
    assert_eq!(client.get("/consumers").await?.body["data"].as_array().map(Vec::len), Some(1));
    Ok(())
}
