//! Network namespaces for tests that cut one node off: node 3 of a three-node cluster
//! runs in its own namespace, joined to the host by a veth pair, and iptables rules in
//! that namespace reset its cluster traffic (Raft over TCP, gossip over UDP) while
//! clients still reach its proxy and admin ports. Needs root, iproute2 and iptables.

use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::{spawn_logged, tollgate_binary};

/// The admin token every node of a namespaced cluster requires (node 3's admin
/// address is not loopback).
pub const TOKEN: &str = "partition-test-token";
/// The gossip secret of the split cluster (required off loopback).
pub const CLUSTER_SECRET: &str = "partition-test-secret";

/// The namespace, veth pair and addresses of one test run, removed on drop.
pub struct Namespace {
    pub name: String,
    host_link: String,
    pub host_ip: String,
    pub inner_ip: String,
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    anyhow::ensure!(status.success(), "{program} {} failed: {status}", args.join(" "));
    Ok(())
}

impl Namespace {
    pub fn create() -> anyhow::Result<Namespace> {
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

    /// Cuts (or, with `add` false, restores) the cluster traffic between the namespace
    /// and the host's cluster ports: TCP connections are reset, gossip datagrams
    /// dropped. Proxy and admin traffic still flows.
    pub fn cut(&self, inner_cluster_port: u16, host_cluster_ports: &[u16], add: bool) -> anyhow::Result<()> {
        let action = if add { "-A" } else { "-D" };
        let port = inner_cluster_port.to_string();
        let tcp_reset = ["-j", "REJECT", "--reject-with", "tcp-reset"];
        let drop = ["-j", "DROP"];
        for (protocol, verdict) in [("tcp", &tcp_reset[..]), ("udp", &drop[..])] {
            let mut rule = vec![action, "INPUT", "-p", protocol, "--dport", &port];
            rule.extend_from_slice(verdict);
            self.iptables(&rule)?;
            for host_port in host_cluster_ports {
                let host_port = host_port.to_string();
                let mut rule = vec![action, "OUTPUT", "-p", protocol, "-d", &self.host_ip, "--dport", &host_port];
                rule.extend_from_slice(verdict);
                self.iptables(&rule)?;
            }
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
pub struct Node {
    pub child: Child,
    pub admin: String,
    pub proxy: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_node(
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
        .args(["--admin-token", TOKEN])
        // Off loopback the cluster port needs its certificates (made in `dir/certs`
        // by `SplitCluster::start`) and the gossip secret.
        .args(["--cluster-secret", CLUSTER_SECRET])
        .arg("--cluster-ca")
        .arg(dir.join("certs/ca.pem"))
        .arg("--cluster-cert")
        .arg(dir.join(format!("certs/node-{id}.pem")))
        .arg("--cluster-key")
        .arg(dir.join(format!("certs/node-{id}-key.pem")));
    let child = spawn_logged(&mut command, log)?;
    Ok(Node { child, admin: format!("http://{local}:{admin}"), proxy: format!("http://{local}:{proxy}") })
}

/// Three nodes with node 3 in its own namespace, and an upstream on the same loopback
/// port on both sides: the host's counts what nodes 1 and 2 send; the namespace's is
/// an echo server answering node 3.
pub struct SplitCluster {
    // Fields drop in order: the processes go before the namespace does.
    pub nodes: Vec<Node>,
    _inner_upstream: Node,
    pub upstream: crate::CountingUpstream,
    pub upstream_port: String,
    pub ports: Vec<(u16, u16, u16)>,
    pub namespace: Namespace,
    _dir: tempfile::TempDir,
}

impl SplitCluster {
    pub async fn start() -> anyhow::Result<SplitCluster> {
        let namespace = Namespace::create().context("this test needs root, iproute2 and iptables")?;
        let dir = tempfile::tempdir()?;
        let made = Command::new(tollgate_binary())
            .args(["certs", "init", "--out"])
            .arg(dir.path().join("certs"))
            .args(["--nodes", "1,2,3"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(made.success(), "tollgate certs init failed");
        let ports: Vec<(u16, u16, u16)> =
            (0..3).map(|_| (crate::free_port(), crate::free_port(), crate::free_port())).collect();
        let ips = [namespace.host_ip.clone(), namespace.host_ip.clone(), namespace.inner_ip.clone()];
        let members: Vec<String> = (0..3).map(|i| format!("{}={}:{}", i + 1, ips[i], ports[i].0)).collect();
        let members = members.join(",");
        let upstream = crate::CountingUpstream::start().await?;
        let upstream_port = upstream.address.rsplit(':').next().unwrap_or_default().to_string();
        let inner_upstream = Node {
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
        let nodes = vec![
            start_node(None, 1, &ips[0], ports[0], &members, dir.path())?,
            start_node(None, 2, &ips[1], ports[1], &members, dir.path())?,
            start_node(Some(&namespace.name), 3, &ips[2], ports[2], &members, dir.path())?,
        ];
        Ok(SplitCluster {
            nodes,
            _inner_upstream: inner_upstream,
            upstream,
            upstream_port,
            ports,
            namespace,
            _dir: dir,
        })
    }

    /// A client over every node.
    pub fn admin(&self) -> tollgate_client::AdminClient {
        tollgate_client::AdminClient::new(self.nodes.iter().map(|n| n.admin.clone())).with_token(TOKEN)
    }

    /// A client for node `index` (0-based) only.
    pub fn admin_of(&self, index: usize) -> tollgate_client::AdminClient {
        tollgate_client::AdminClient::new([self.nodes[index].admin.clone()]).with_token(TOKEN)
    }

    /// Cuts node 3 off from the others' cluster ports (`false`: heals the cut).
    pub fn cut(&self, add: bool) -> anyhow::Result<()> {
        self.namespace.cut(self.ports[2].0, &[self.ports[0].0, self.ports[1].0], add)
    }
}
