//! `tollctl` against real clusters: a Kong-shaped file synced into three nodes and
//! proxied, `diff` empty right after; updates, deletes and `apply`; a sync that fails
//! (offline, or on the cluster) leaving the config as it was; `--select-tag` leaving
//! other entities alone; and every command through the other nodes while one is down.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tollgate_tests::{EchoServer, ProxyClient, TestCluster};

/// `tollctl`, beside the `tollgate` binary (`cargo test --workspace` builds both).
fn tollctl_binary() -> PathBuf {
    let binary = tollgate_tests::tollgate_binary().with_file_name("tollctl");
    assert!(binary.exists(), "{} missing: build it with `cargo build -p tollgate-client`", binary.display());
    binary
}

/// What one run of tollctl answered.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn tollctl(admin: &[String], args: &[&str]) -> Ran {
    let mut command = std::process::Command::new(tollctl_binary());
    command.arg("--admin").arg(admin.join(",")).args(args).env("NO_COLOR", "1");
    let output = tokio::task::spawn_blocking(move || command.output()).await.expect("joins").expect("runs tollctl");
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn admin_urls(cluster: &TestCluster) -> Vec<String> {
    cluster.nodes.iter().map(|node| node.admin_url()).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writes");
    path
}

/// A Kong 1.1 file shaped as users' are: `services` services each with a route (one
/// with a regex path written the pre-3.0 way), a route-level plugin on every tenth, an
/// upstream with active health checks and its target, a global plugin, a consumer with
/// a key.
fn kong_file(echo: &str, services: usize, skip: Option<usize>, extra: &str) -> String {
    let mut yaml = String::from("_format_version: \"1.1\"\nservices:\n");
    for i in (0..services).filter(|i| Some(*i) != skip) {
        let _ = write!(
            yaml,
            "- name: svc-{i}\n  url: http://{echo}/base-{i}\n  routes:\n  - name: route-{i}\n    paths:\n    - /svc-{i}\n    - /svc-{i}/items/\\d+$\n"
        );
        if i % 10 == 0 {
            let _ = write!(yaml, "    plugins:\n    - name: rate-limiting\n      config:\n        minute: 1000\n");
        }
    }
    yaml.push_str(extra);
    let _ = write!(
        yaml,
        "upstreams:\n- name: pool\n  healthchecks:\n    active:\n      healthy:\n        interval: 5\n      unhealthy:\n        interval: 5\n  targets:\n  - target: {echo}\nplugins:\n- name: correlation-id\nconsumers:\n- username: alice\n  keyauth_credentials:\n  - key: alice-key\n"
    );
    yaml
}

async fn config(cluster: &TestCluster) -> Value {
    cluster.client().get("/config").await.expect("GET /config").body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kong_file_syncs_proxies_and_diffs_empty() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = TestCluster::start(3).await?;
    let admin = admin_urls(&cluster);
    let dir = tempfile::tempdir()?;
    let file = write(dir.path(), "kong.yaml", &kong_file(&echo.address, 300, None, ""));

    let synced = tollctl(&admin, &["sync", "-f", file.to_str().unwrap_or_default()]).await;
    assert_eq!(synced.code, 0, "{}{}", synced.stdout, synced.stderr);
    assert!(synced.stdout.contains("300 to create") || synced.stdout.contains("to create"), "{}", synced.stdout);
    let diffed = tollctl(&admin, &["diff", "-f", file.to_str().unwrap_or_default()]).await;
    assert_eq!(diffed.code, 0, "diff right after sync: {}{}", diffed.stdout, diffed.stderr);
    assert!(diffed.stdout.contains("0 to create, 0 to update, 0 to delete"), "{}", diffed.stdout);

    // Proxied as Kong would: strip_path (1.1's default) under the service path, and
    // the regex path converted to 3.0's `~` form.
    let proxy = ProxyClient::new();
    let node3 = cluster.nodes[2].proxy_url();
    let reply =
        tollgate_tests::eventually("node 3 to serve the synced routes", tollgate_tests::CONVERGE_TIMEOUT, || async {
            proxy.request(&node3, "GET", None, "/svc-7/x", &[]).await.ok().filter(|reply| reply.status == 200)
        })
        .await?;
    assert_eq!(reply.body["path"], "/base-7/x");
    assert!(reply.body["headers"]["kong-request-id"][0].is_string(), "the global plugin ran: {}", reply.body);
    let node2 = cluster.nodes[1].proxy_url();
    let reply =
        tollgate_tests::eventually("node 2 to serve the regex route", tollgate_tests::CONVERGE_TIMEOUT, || async {
            proxy.request(&node2, "GET", None, "/svc-8/items/42", &[]).await.ok().filter(|reply| reply.status == 200)
        })
        .await?;
    assert!(reply.body["path"].as_str().unwrap_or_default().starts_with("/base-8"), "{}", reply.body);

    // A changed file: one service's URL, one service gone, one new.
    let ids_before = config(&cluster).await;
    let changed = kong_file(&echo.address, 300, Some(1), "- name: svc-new\n  url: http://example.test\n")
        .replace("/base-0\n", "/moved-0\n");
    let file = write(dir.path(), "kong.yaml", &changed);
    let diffed = tollctl(&admin, &["diff", "-f", file.to_str().unwrap_or_default()]).await;
    assert_eq!(diffed.code, 2, "{}{}", diffed.stdout, diffed.stderr);
    for line in
        ["+ services svc-new", "~ services svc-0", "path: /base-0 → /moved-0", "- services svc-1", "- routes route-1"]
    {
        assert!(diffed.stdout.contains(line), "'{line}' in {}", diffed.stdout);
    }
    let json_diff = tollctl(&admin, &["-o", "json", "diff", "-f", file.to_str().unwrap_or_default()]).await;
    let changes: Value = serde_json::from_str(&json_diff.stdout)?;
    assert_eq!(changes.as_array().map(Vec::len), Some(4), "{changes}");
    let synced = tollctl(&admin, &["sync", "-f", file.to_str().unwrap_or_default()]).await;
    assert_eq!(synced.code, 0, "{}{}", synced.stdout, synced.stderr);
    let diffed = tollctl(&admin, &["diff", "-f", file.to_str().unwrap_or_default()]).await;
    assert_eq!(diffed.code, 0, "{}", diffed.stdout);
    // Entities the sync kept kept their ids.
    let after = config(&cluster).await;
    let id_of = |document: &Value, name: &str| {
        document["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name)).map(|s| s["id"].clone())
    };
    assert_eq!(id_of(&ids_before, "svc-2"), id_of(&after, "svc-2"));
    assert_eq!(id_of(&ids_before, "svc-0"), id_of(&after, "svc-0"));

    // apply creates and updates, never deletes.
    let extra = write(
        dir.path(),
        "extra.yaml",
        "_format_version: \"3.0\"\nservices:\n- name: svc-extra\n  url: http://example.test\n",
    );
    let applied = tollctl(&admin, &["apply", "-f", extra.to_str().unwrap_or_default()]).await;
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let services = config(&cluster).await["services"].as_array().map(Vec::len);
    assert_eq!(services, Some(301), "300 - 1 + new + extra");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_leaves_the_config_as_it_was() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let admin = admin_urls(&cluster);
    let client = cluster.client();
    client.post("/services", &json!({"name": "shared", "url": "http://a.test"})).await?;
    client.post("/services", &json!({"name": "mine", "url": "http://b.test", "tags": ["team-b"]})).await?;
    client.post("/consumers", &json!({"username": "bob", "custom_id": "c-1"})).await?;
    let before = config(&cluster).await;
    let dir = tempfile::tempdir()?;

    // Refused before anything is sent: the file names the entity and field.
    let mut yaml = String::from("_format_version: \"3.0\"\nservices:\n");
    for i in 0..50 {
        let _ = write!(yaml, "- name: s-{i}\n  url: http://x.test\n");
    }
    yaml.push_str("- name: s-bad\n  url: http://x.test\n  routes:\n  - paths: [\"no-slash\"]\n");
    let bad = write(dir.path(), "bad.yaml", &yaml);
    let synced = tollctl(&admin, &["sync", "-f", bad.to_str().unwrap_or_default()]).await;
    assert_eq!(synced.code, 1);
    assert!(
        synced.stderr.contains("bad.yaml") && synced.stderr.contains("services[50].routes[0].paths[0]"),
        "{}",
        synced.stderr
    );
    assert_eq!(config(&cluster).await, before);

    // A file entity naming an untagged one is refused before anything is sent.
    let takeover = write(
        dir.path(),
        "takeover.yaml",
        "_format_version: \"3.0\"\nservices:\n- name: shared\n  url: http://y.test\n  tags: [team-b]\n",
    );
    let synced =
        tollctl(&admin, &["sync", "--select-tag", "team-b", "-f", takeover.to_str().unwrap_or_default()]).await;
    assert_eq!(synced.code, 1, "{}{}", synced.stdout, synced.stderr);
    assert!(synced.stderr.contains("cannot take it over"), "{}", synced.stderr);
    assert_eq!(config(&cluster).await, before);

    // Refused by the cluster midway through the document (the last consumer's
    // custom_id is an untagged consumer's): nothing of the file is applied.
    let mut yaml = String::from("_format_version: \"3.0\"\nservices:\n");
    for i in 0..50 {
        let _ = write!(yaml, "- name: t-{i}\n  url: http://x.test\n  tags: [team-b]\n");
    }
    yaml.push_str("consumers:\n- username: bob-b\n  custom_id: c-1\n  tags: [team-b]\n");
    let clash = write(dir.path(), "clash.yaml", &yaml);
    let synced = tollctl(&admin, &["sync", "--select-tag", "team-b", "-f", clash.to_str().unwrap_or_default()]).await;
    assert_eq!(synced.code, 1, "{}{}", synced.stdout, synced.stderr);
    assert!(synced.stderr.contains("UNIQUE violation"), "{}", synced.stderr);
    assert_eq!(config(&cluster).await, before, "a failed sync changed the config");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_tag_sync_leaves_untagged_entities_alone() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let admin = admin_urls(&cluster);
    let client = cluster.client();
    let untagged = client.post("/services", &json!({"name": "theirs", "url": "http://a.test"})).await?;
    client.post("/services/theirs/routes", &json!({"name": "their-route", "paths": ["/theirs"]})).await?;
    client.post("/services", &json!({"name": "t1", "url": "http://t1.test", "tags": ["team-a"]})).await?;
    client.post("/services", &json!({"name": "t2", "url": "http://t2.test", "tags": ["team-a"]})).await?;
    let dir = tempfile::tempdir()?;
    let file = write(
        dir.path(),
        "team-a.yaml",
        "_format_version: \"3.0\"\nservices:\n- name: t1\n  url: http://t1-new.test\n  tags: [team-a]\n- name: t3\n  url: http://t3.test\n  tags: [team-a]\n",
    );
    let path = file.to_str().unwrap_or_default();
    let synced = tollctl(&admin, &["sync", "--select-tag", "team-a", "-f", path]).await;
    assert_eq!(synced.code, 0, "{}{}", synced.stdout, synced.stderr);
    assert!(synced.stdout.contains("1 to create, 1 to update, 1 to delete"), "{}", synced.stdout);
    let after = config(&cluster).await;
    let names: Vec<&str> =
        after["services"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    assert!(
        names.contains(&"theirs") && names.contains(&"t1") && names.contains(&"t3") && !names.contains(&"t2"),
        "{names:?}"
    );
    let theirs = after["services"].as_array().into_iter().flatten().find(|s| s["name"] == "theirs").cloned();
    assert_eq!(theirs.map(|s| s["id"].clone()), Some(untagged.body["id"].clone()), "untouched, id included");
    assert_eq!(after["routes"].as_array().map(Vec::len), Some(1), "the untagged route stays");
    let diffed = tollctl(&admin, &["diff", "--select-tag", "team-a", "-f", path]).await;
    assert_eq!(diffed.code, 0, "{}", diffed.stdout);
    // Without the tag the untagged entities would go: diff says so.
    let whole = tollctl(&admin, &["diff", "-f", path]).await;
    assert_eq!(whole.code, 2);
    assert!(whole.stdout.contains("- services theirs"), "{}", whole.stdout);
    // A file entity outside the selected tags is refused.
    let outside =
        write(dir.path(), "outside.yaml", "_format_version: \"3.0\"\nservices:\n- name: x\n  url: http://x.test\n");
    let refused =
        tollctl(&admin, &["sync", "--select-tag", "team-a", "-f", outside.to_str().unwrap_or_default()]).await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("lacks the selected tags"), "{}", refused.stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_with_one_node_of_three_down() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let mut cluster = TestCluster::start(3).await?;
    let admin = admin_urls(&cluster);
    let dir = tempfile::tempdir()?;
    let file = write(dir.path(), "kong.yaml", &kong_file(&echo.address, 20, None, ""));
    let path = file.to_str().unwrap_or_default().to_string();
    assert_eq!(tollctl(&admin, &["sync", "-f", &path]).await.code, 0);
    // The first node the commands would ask is down.
    cluster.node(1).kill9();
    let changed = write(dir.path(), "changed.yaml", &kong_file(&echo.address, 20, Some(3), ""));
    let changed = changed.to_str().unwrap_or_default().to_string();
    let runs: Vec<(Vec<&str>, i32)> = vec![
        (vec!["validate", "-f", &path], 0),
        (vec!["dump"], 0),
        (vec!["-o", "json", "dump", "--select-tag", "none"], 0),
        (vec!["diff", "-f", &path], 0),
        (vec!["diff", "-f", &changed], 2),
        (vec!["sync", "-f", &changed], 0),
        (vec!["diff", "-f", &changed], 0),
        (vec!["apply", "-f", &path], 0),
        (vec!["list", "services"], 0),
        (vec!["get", "services", "svc-4"], 0),
        (vec!["delete", "routes", "route-3"], 0),
        (vec!["delete", "key-auth", "alice-key"], 0),
        (vec!["status"], 0),
        (vec!["health", "pool"], 0),
        (vec!["list", "key-auths"], 0),
    ];
    for (args, expected) in runs {
        let ran = tollctl(&admin, &args).await;
        assert_eq!(ran.code, expected, "{args:?}: {}{}", ran.stdout, ran.stderr);
    }
    let status = tollctl(&admin, &["-o", "json", "status"]).await;
    let status: Value = serde_json::from_str(&status.stdout)?;
    let roles: Vec<&str> =
        status["nodes"].as_array().into_iter().flatten().filter_map(|n| n["role"].as_str()).collect();
    assert_eq!(roles.iter().filter(|role| **role == "unreachable").count(), 1, "{status}");
    assert_eq!(roles.iter().filter(|role| **role == "leader").count(), 1, "{status}");
    Ok(())
}

/// `--cacert`: an Admin API served over HTTPS (`--admin-tls-cert`) is reached with the
/// CA that signed its certificate, and refused, saying why, without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_admin_apis_are_reached_with_cacert() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let made = std::process::Command::new(tollgate_tests::tollgate_binary())
        .args(["certs", "init", "--nodes", "1", "--hosts", "127.0.0.1", "--out"])
        .arg(&certs)
        .output()?;
    anyhow::ensure!(made.status.success(), "certs init: {}", String::from_utf8_lossy(&made.stderr));
    let (admin_port, cluster_port, proxy_port) =
        (tollgate_tests::free_port(), tollgate_tests::free_port(), tollgate_tests::free_port());
    let mut command = std::process::Command::new(tollgate_tests::tollgate_binary());
    command
        .args(["run", "--node-id", "1", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--cluster-listen", &format!("127.0.0.1:{cluster_port}")])
        .args(["--proxy-listen", &format!("127.0.0.1:{proxy_port}")])
        .args(["--initial-cluster", &format!("1=127.0.0.1:{cluster_port}")])
        .arg("--admin-tls-cert")
        .arg(certs.join("node-1.pem"))
        .arg("--admin-tls-key")
        .arg(certs.join("node-1-key.pem"));
    let log = std::fs::File::create(dir.path().join("node.log"))?;
    let mut node = tollgate_tests::spawn_logged(&mut command, log)?;
    let admin = vec![format!("https://127.0.0.1:{admin_port}")];
    let cacert = certs.join("ca.pem").to_string_lossy().into_owned();
    let answered = tollgate_tests::eventually(
        "the HTTPS Admin API through --cacert",
        tollgate_tests::CONVERGE_TIMEOUT,
        || async {
            let ran = tollctl(&admin, &["--cacert", &cacert, "-o", "json", "status"]).await;
            (ran.code == 0).then_some(ran.stdout)
        },
    )
    .await;
    let without = tollctl(&admin, &["status"]).await;
    let _ = node.kill();
    let _ = node.wait();
    let status: Value = serde_json::from_str(&answered?)?;
    assert_eq!(status["nodes"][0]["role"], "leader", "{status}");
    assert_eq!(without.code, 1);
    assert!(without.stderr.contains("--cacert"), "{}", without.stderr);
    Ok(())
}
