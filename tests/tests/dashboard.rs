//! The observability files in `deploy/` against what nodes really export: every metric
//! the Grafana dashboard (`deploy/grafana/tollgate.json`) queries has a sample on some
//! node's `/metrics` once a three-node cluster has served what the dashboard shows
//! (answers 2xx, 404 without a route, 429 from a cluster rate limit, 502 from a dead
//! upstream), probed a target down and granted quota. `/metrics` asks for the admin
//! token, as `deploy/prometheus/prometheus.yml` assumes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::{json, Value};
use tollgate_tests::{
    eventually, free_port, pool_health_everywhere, EchoServer, ProxyClient, TestCluster, CONVERGE_TIMEOUT,
};

const TOKEN: &str = "dashboard-admin-token";

/// The dashboard, relative to this crate.
fn dashboard_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/tollgate.json")
}

fn dashboard() -> Value {
    let path = dashboard_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{} is not JSON: {error}", path.display()))
}

/// Adds the metric names in a PromQL expression: `tollgate_` and what follows of
/// `[a-z0-9_]`, where it does not continue a longer identifier. A histogram is named
/// as queried (`…_ms_bucket`, `…_ms_sum`, `…_ms_count`), which is how its samples are
/// named too.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    const PREFIX: &str = "tollgate_";
    let bytes = expr.as_bytes();
    let mut from = 0;
    while let Some(found) = expr[from..].find(PREFIX) {
        let start = from + found;
        let mut end = start + PREFIX.len();
        while end < bytes.len() && matches!(bytes[end], b'a'..=b'z' | b'0'..=b'9' | b'_') {
            end += 1;
        }
        let continues_a_word = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !continues_a_word && end > start + PREFIX.len() {
            into.insert(expr[start..end].to_string());
        }
        from = end;
    }
}

/// Adds the metric names of every query in the dashboard: panel targets' `expr`, and
/// the template variables' `query` and `definition`.
fn queried_names(value: &Value, into: &mut BTreeSet<String>) {
    match value {
        Value::Object(fields) => {
            for (key, value) in fields {
                let query = value.as_str().filter(|_| matches!(key.as_str(), "expr" | "query" | "definition"));
                if let Some(text) = query {
                    metric_names(text, into);
                }
                queried_names(value, into);
            }
        }
        Value::Array(items) => {
            for item in items {
                queried_names(item, into);
            }
        }
        _ => {}
    }
}

/// Every node's `/metrics` (with the admin token); a node that does not answer is left out.
async fn scrape(cluster: &TestCluster) -> Vec<String> {
    let mut texts = Vec::new();
    for node in &cluster.nodes {
        if let Ok(reply) = cluster.client_of(node.id).get("/metrics").await {
            texts.push(reply.body.as_str().unwrap_or_default().to_string());
        }
    }
    texts
}

/// The names of the sample lines in Prometheus text (comments and blank lines skipped).
fn exported(texts: &[String]) -> BTreeSet<String> {
    texts
        .iter()
        .flat_map(|text| text.lines())
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line[..line.find(['{', ' ']).unwrap_or(line.len())].to_string())
        .collect()
}

/// The sum of the samples of `name` whose line contains `with` (a label, say).
fn sum_of(texts: &[String], name: &str, with: &str) -> f64 {
    texts
        .iter()
        .flat_map(|text| text.lines())
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter(|line| line.contains(with))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metric_names_are_read_from_promql() {
    let mut names = BTreeSet::new();
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(tollgate_request_latency_ms_bucket{job=~"tollgate"}[5m])))
        / on (job) tollgate_raft_term + x_tollgate_not_this + tollgate_"#;
    metric_names(expr, &mut names);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(names, ["tollgate_raft_term", "tollgate_request_latency_ms_bucket"]);
}

/// The dashboard's queries all go to the `DS_PROMETHEUS` input, and there are some.
#[test]
fn the_dashboard_queries_its_prometheus_input() {
    let dashboard = dashboard();
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS", "the dashboard's data source input");
    let mut queries = 0;
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries += 1;
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}: {target}", panel["title"]);
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("tollgate_"), "panel {}: a query of no tollgate metric: {expr:?}", panel["title"]);
        }
    }
    assert!(queries >= 20, "only {queries} queries in {}", dashboard_path().display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_queries_is_exported() -> anyhow::Result<()> {
    let mut queried = BTreeSet::new();
    queried_names(&dashboard(), &mut queried);
    assert!(queried.len() >= 20, "only {} metric names in {}: {queried:?}", queried.len(), dashboard_path().display());

    let cluster = TestCluster::start_with_token(3, TOKEN).await?;
    let anonymous = ProxyClient::new().request(&cluster.nodes[0].admin_url(), "GET", None, "/metrics", &[]).await?;
    assert_eq!(anonymous.status, 401, "GET /metrics without the admin token: {}", anonymous.body);

    // An upstream of the echo server and an address nothing listens on, actively
    // checked (the dead one goes down); the echo service behind a cluster rate limit;
    // and a service on the dead address (502).
    let echo = EchoServer::start().await?;
    let dead = format!("127.0.0.1:{}", free_port());
    let client = cluster.client();
    let healthchecks =
        json!({"active": {"type": "tcp", "healthy": {"interval": 1}, "unhealthy": {"interval": 1, "tcp_failures": 1}}});
    client.post("/upstreams", &json!({"name": "pool", "healthchecks": healthchecks})).await?;
    client.post("/upstreams/pool/targets", &json!({"target": echo.address})).await?;
    client.post("/upstreams/pool/targets", &json!({"target": dead})).await?;
    client.post("/services", &json!({"name": "echo", "host": "pool", "port": 80, "protocol": "http"})).await?;
    client.post("/services/echo/routes", &json!({"name": "echo-route", "paths": ["/echo"]})).await?;
    // Two windows: the second's leases end every second (unused tokens are counted
    // then), the minute's limit refuses most of the traffic below.
    let limits =
        json!({"second": 10, "minute": 20, "policy": "cluster", "limit_by": "service", "fault_tolerant": false});
    client.post("/services/echo/plugins", &json!({"name": "rate-limiting", "config": limits})).await?;
    client.post("/services", &json!({"name": "broken", "url": format!("http://{dead}")})).await?;
    let last = client.post("/services/broken/routes", &json!({"name": "broken-route", "paths": ["/broken"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    pool_health_everywhere(&cluster, &echo.address, "HEALTHY").await?;
    pool_health_everywhere(&cluster, &dead, "UNHEALTHY").await?;

    // Traffic through every node: 45 requests against 20 a minute (at most 40 in the
    // two windows a minute's turn can split them into), one without a route, one to
    // the dead service.
    let proxy = ProxyClient::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for node in &cluster.nodes {
        let url = node.proxy_url();
        for _ in 0..15 {
            let reply = proxy.request(&url, "GET", None, "/echo", &[]).await?;
            *statuses.entry(reply.status).or_default() += 1;
        }
        let reply = proxy.request(&url, "GET", None, "/no-such-route", &[]).await?;
        assert_eq!(reply.status, 404, "node {}: {}", node.id, reply.body);
        let reply = proxy.request(&url, "GET", None, "/broken", &[]).await?;
        assert!(matches!(reply.status, 502 | 503), "node {}: /broken: {} {}", node.id, reply.status, reply.body);
    }
    assert!(statuses.get(&200).is_some_and(|n| *n > 0), "no /echo request admitted: {statuses:?}");
    assert!(statuses.get(&429).is_some_and(|n| *n > 0), "no /echo request rate-limited: {statuses:?}");

    // Counters are bumped once a request is logged and unused tokens once a window's
    // lease expires: poll the scrapes until all is there.
    let complete = |texts: &[String]| {
        let exported = exported(texts);
        queried.iter().all(|name| exported.contains(name))
            && sum_of(texts, "tollgate_http_requests_total", "code_class=\"4xx\"") > 0.0
            && sum_of(texts, "tollgate_http_requests_total", "code_class=\"5xx\"") > 0.0
            && sum_of(texts, "tollgate_quota_rejected_total", "") > 0.0
    };
    let scraped = eventually("every queried metric on some node's /metrics", CONVERGE_TIMEOUT, || async {
        let texts = scrape(&cluster).await;
        complete(&texts).then_some(())
    })
    .await;
    if let Err(error) = scraped {
        let texts = scrape(&cluster).await;
        let exported = exported(&texts);
        let missing: Vec<&String> = queried.iter().filter(|name| !exported.contains(*name)).collect();
        panic!(
            "{error}\nmetrics {} queries that no node exports: {missing:?}\n\
             4xx answers counted: {}, 5xx: {}, quota refusals: {} (each should be above 0)\n\
             {} of 3 nodes scraped; /echo answered {statuses:?}",
            dashboard_path().display(),
            sum_of(&texts, "tollgate_http_requests_total", "code_class=\"4xx\""),
            sum_of(&texts, "tollgate_http_requests_total", "code_class=\"5xx\""),
            sum_of(&texts, "tollgate_quota_rejected_total", ""),
            texts.len(),
        );
    }
    Ok(())
}
