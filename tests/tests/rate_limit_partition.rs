//! A node cut off from the others, with `policy: cluster` (P5).
//!
//! Node 3 runs in its own network namespace, joined to the host by a veth pair; nodes 1
//! and 2 run on the host. Cutting node 3 off is two iptables rules inside its
//! namespace that reset every connection to or from the cluster ports, while clients
//! still reach its proxy port and it still reaches its upstream (an echo server in its
//! namespace on the same loopback port as the host's counting upstream).
//!
//! With `fault_tolerant: false` the cut-off node admits only the tokens it held, then
//! answers 429; with `true` it admits at most ⌈limit / voters⌉ more per window on its
//! own. The connected side never passes the limit. Needs root and iproute2/iptables
//! (`.ci/run` installs them).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tollgate_client::AdminClient;
use tollgate_tests::{eventually, free_port, tollgate_binary, CountingUpstream, ProxyClient};

const TOKEN: &str = "partition-test-token";
const LIMIT: u64 = 600;

/// The namespace, veth pair and addresses of one test run, removed on drop.
struct Namespace {
    name: String,
    host_link: String,
    host_ip: String,
    inner_ip: String,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    anyhow::ensure!(status.success(), "{program} {} failed: {status}", args.join(" "));
    Ok(())
}

impl Namespace {
    fn create() -> anyhow::Result<Namespace> {
        let tag = std::process::id() % 60_000;
        let (a, b) = (tag / 250 % 250 + 1, tag % 250);
        let namespace = Namespace {
            name: format!("tg-part-{tag}"),
            host_link: format!("tgh{tag}"),
            host_ip: format!("10.{a}.{b}.1"),
            inner_ip: format!("10.{a}.{b}.2"),
        };
        let inner_link = format!("tgn{tag}");
        run("ip", &["netns", "add", &namespace.name])?;
        run("ip", &["link", "add", &namespace.host_link, "type", "veth", "peer", "name", &inner_link])?;
        run("ip", &["link", "set", &inner_link, "netns", &namespace.name])?;
        run("ip", &["addr", "add", &format!("{}/30", namespace.host_ip), "dev", &namespace.host_link])?;
        run("ip", &["link", "set", &namespace.host_link, "up"])?;
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", namespace.name.as_str()];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        inside(&["ip", "addr", "add", &format!("{}/30", namespace.inner_ip), "dev", &inner_link])?;
        inside(&["ip", "link", "set", &inner_link, "up"])?;
        inside(&["ip", "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// Runs iptables inside the namespace.
    fn iptables(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["netns", "exec", self.name.as_str(), "iptables"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Resets every connection between the namespace and the cluster ports.
    fn cut(&self, inner_cluster_port: u16, host_cluster_ports: &[u16], add: bool) -> anyhow::Result<()> {
        let action = if add { "-A" } else { "-D" };
        let port = inner_cluster_port.to_string();
        self.iptables(&[action, "INPUT", "-p", "tcp", "--dport", &port, "-j", "REJECT", "--reject-with", "tcp-reset"])?;
        for host_port in host_cluster_ports {
            let host_port = host_port.to_string();
            self.iptables(&[
                action,
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                &self.host_ip,
                "--dport",
                &host_port,
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ])?;
        }
        Ok(())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_link]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A node process, killed on drop.
struct Node {
    child: Child,
    admin: String,
    proxy: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(
    namespace: Option<&str>,
    id: u64,
    ip: &str,
    ports: (u16, u16, u16),
    members: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Node> {
    let (cluster, admin, proxy) = ports;
    let binary = tollgate_binary();
    let mut command = match namespace {
        Some(name) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", name]).arg(&binary);
            command
        }
        None => Command::new(&binary),
    };
    // Admin and proxy listen where the test reaches them: the host's loopback, or the
    // namespace's address. A non-loopback admin address needs the token.
    let local = if namespace.is_some() { ip } else { "127.0.0.1" };
    let log = std::fs::File::create(dir.join(format!("node{id}.log")))?;
    command
        .arg("run")
        .args(["--node-id", &id.to_string()])
        .arg("--data-dir")
        .arg(dir.join(format!("node{id}")))
        .args(["--cluster-listen", &format!("{ip}:{cluster}")])
        .args(["--admin-listen", &format!("{local}:{admin}")])
        .args(["--proxy-listen", &format!("{local}:{proxy}")])
        .args(["--initial-cluster", members])
        .args(["--admin-token", TOKEN]);
    let child = tollgate_tests::spawn_logged(&mut command, log)?;
    Ok(Node { child, admin: format!("http://{local}:{admin}"), proxy: format!("http://{local}:{proxy}") })
}

/// Sends `count` requests to `path` on `proxy`; returns (200s, 429s).
async fn send(proxy: &str, path: &str, count: usize) -> (u64, u64) {
    let client = ProxyClient::new();
    let (mut admitted, mut refused) = (0, 0);
    for _ in 0..count {
        match client.request(proxy, "GET", None, path, &[]).await {
            Ok(reply) if reply.status == 200 => admitted += 1,
            Ok(reply) if reply.status == 429 => refused += 1,
            _ => {}
        }
    }
    (admitted, refused)
}

/// Node 3's lease of `plugin`'s only key: tokens it holds now.
async fn held(node3: &AdminClient, plugin: &str) -> anyhow::Result<u64> {
    let view = node3.get(&format!("/rate-limits/{plugin}")).await?;
    Ok(view.body["data"][0]["this_node"]["available"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_node_admits_only_what_it_holds_or_its_documented_bound() -> anyhow::Result<()> {
    let namespace = Namespace::create().context("this test needs root, iproute2 and iptables")?;
    let dir = tempfile::tempdir()?;
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port(), free_port())).collect();
    let ips = [namespace.host_ip.as_str(), namespace.host_ip.as_str(), namespace.inner_ip.as_str()];
    let members: Vec<String> = (0..3).map(|i| format!("{}={}:{}", i + 1, ips[i], ports[i].0)).collect();
    let members = members.join(",");

    // One upstream port, two servers: the host's counts what nodes 1 and 2 admit; the
    // namespace's echo answers node 3 (whose 200s the test counts itself).
    let upstream = CountingUpstream::start().await?;
    let upstream_port = upstream.address.rsplit(':').next().unwrap_or_default().to_string();
    let _inner_upstream = Node {
        child: Command::new("ip")
            .args(["netns", "exec", &namespace.name])
            .arg(tollgate_binary())
            .args(["echo", "--listen", &format!("127.0.0.1:{upstream_port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
        admin: String::new(),
        proxy: String::new(),
    };
    let nodes = [
        start_node(None, 1, ips[0], ports[0], &members, dir.path())?,
        start_node(None, 2, ips[1], ports[1], &members, dir.path())?,
        start_node(Some(&namespace.name), 3, ips[2], ports[2], &members, dir.path())?,
    ];
    let admin = AdminClient::new(nodes.iter().map(|n| n.admin.clone())).with_token(TOKEN);
    let node3 = AdminClient::new([nodes[2].admin.clone()]).with_token(TOKEN);
    eventually("the cluster to take writes", Duration::from_secs(30), || async {
        admin
            .post("/services", &json!({"name": "metered", "url": format!("http://127.0.0.1:{upstream_port}")}))
            .await
            .ok()
    })
    .await?;
    let mut plugins = Vec::new();
    for (path, fault_tolerant) in [("/strict", false), ("/tolerant", true)] {
        let route = admin.post("/services/metered/routes", &json!({"paths": [path]})).await?;
        let route_id = route.body["id"].as_str().unwrap_or_default().to_string();
        let config =
            json!({"hour": LIMIT, "policy": "cluster", "limit_by": "service", "fault_tolerant": fault_tolerant});
        let plugin = admin
            .post(&format!("/routes/{route_id}/plugins"), &json!({"name": "rate-limiting", "config": config}))
            .await?;
        plugins.push(plugin.body["id"].as_str().unwrap_or_default().to_string());
    }
    // Node 3 has the config and leases for both keys before the cut.
    for path in ["/strict", "/tolerant"] {
        eventually("node 3 to admit through its lease", Duration::from_secs(30), || async {
            (send(&nodes[2].proxy, path, 1).await.0 == 1).then_some(())
        })
        .await?;
    }
    let mut warm = (0, 0);
    for path in ["/strict", "/tolerant"] {
        let (admitted, _) = send(&nodes[2].proxy, path, 20).await;
        if path == "/strict" {
            warm.0 = admitted + 1
        } else {
            warm.1 = admitted + 1
        }
    }

    namespace.cut(ports[2].0, &[ports[0].0, ports[1].0], true)?;
    let held_strict = held(&node3, &plugins[0]).await?;
    let held_tolerant = held(&node3, &plugins[1]).await?;

    // The cut-off node: fault_tolerant false admits what it holds, then 429s.
    let (strict_admitted, strict_refused) = send(&nodes[2].proxy, "/strict", 200).await;
    // fault_tolerant true: what it holds, then at most ceil(limit / 3) on its own.
    let (tolerant_admitted, tolerant_refused) = send(&nodes[2].proxy, "/tolerant", 600).await;
    // The connected side, meanwhile, takes everything the ledger has left.
    let (cluster_strict, _) = send(&nodes[0].proxy, "/strict", 900).await;
    let (cluster_tolerant, _) = send(&nodes[1].proxy, "/tolerant", 900).await;
    let bound = LIMIT.div_ceil(3);
    eprintln!(
        "cut off: strict held {held_strict}, admitted {strict_admitted}, refused {strict_refused}; \
         tolerant held {held_tolerant}, admitted {tolerant_admitted} (bound {bound} on its own), refused {tolerant_refused}; \
         connected side admitted {cluster_strict} strict and {cluster_tolerant} tolerant; before the cut node 3 admitted {warm:?}"
    );
    assert!(strict_admitted <= held_strict, "fault_tolerant false: only what it held");
    assert!(strict_refused > 0);
    assert!(tolerant_admitted <= held_tolerant + bound, "fault_tolerant true: the local bound");
    assert!(tolerant_admitted > held_tolerant, "the fallback admitted some");
    assert!(tolerant_refused > 0, "the fallback has a bound");
    // Never over on the connected side: what it admitted plus everything node 3 ever
    // admitted with tokens stays within the limit.
    assert!(cluster_strict + warm.0 + strict_admitted <= LIMIT, "strict over the limit");
    assert!(cluster_tolerant + warm.1 + held_tolerant <= LIMIT, "tolerant over the limit on the cluster's tokens");
    assert_eq!(upstream.received(), cluster_strict + cluster_tolerant, "the host upstream saw only nodes 1 and 2");

    // Healed: node 3's grant rounds work again.
    namespace.cut(ports[2].0, &[ports[0].0, ports[1].0], false)?;
    eventually("node 3 to reach the cluster again", Duration::from_secs(30), || async {
        // A request makes node 3 ask for tokens; a grant round that works clears the flag.
        send(&nodes[2].proxy, "/strict", 1).await;
        let metrics = ProxyClient::new()
            .request(&nodes[2].admin, "GET", None, "/metrics", &[("authorization", &format!("Bearer {TOKEN}"))])
            .await
            .ok()?;
        let text = metrics.body.as_str().map(str::to_string).unwrap_or_else(|| Value::to_string(&metrics.body));
        let status = admin.get("/status").await.ok()?;
        (status.status == 200 && text.lines().any(|line| line == "tollgate_quota_cut_off 0")).then_some(())
    })
    .await?;
    Ok(())
}
