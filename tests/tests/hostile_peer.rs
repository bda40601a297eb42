//! The cluster-port attacks of the trust-boundary audit (issue 13), replayed by a
//! process on the same network against a cluster with mutual TLS and against one
//! without TLS on loopback (frames authenticated by the cluster secret): hand-built
//! frames (a version byte, then postcard) of a forwarded write, a join, an
//! AppendEntries and a pair of InstallSnapshot chunks from a node that is not a
//! member, and 300 silent sockets. Afterwards the config and the leader are unchanged,
//! the node's memory stayed bounded, and the real members' writes are accepted.
//!
//! A third configuration, neither TLS nor a secret (loopback only, with a warning at
//! start), trusts every local process by design; its test shows what still holds
//! there: Raft RPCs from a node that is not a member are refused.

use openraft::{CommittedLeaderId, SnapshotMeta, StoredMembership, Vote};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_node::cluster::network::{PATH_APPEND, PATH_SNAPSHOT, PATH_VOTE};
use tollgate_node::cluster::{Forwarded, LeaderRequest, PATH_JOIN, PATH_LEADER};
use tollgate_raft_store::command::{Command, Op};
use tollgate_raft_store::{EntityKind, TypeConfig};
use tollgate_tests::{eventually, TestCluster, CONVERGE_TIMEOUT};

const SECRET: &str = "the-cluster-secret";
/// The node id the attacker claims when it does not claim a member's.
const STRANGER: u64 = 99;

/// POSTs `frame` to `path` on `address` as plain HTTP/1.1, or over TLS with
/// `tls`; the status, 0 when the connection closed without one.
async fn post_frame(address: &str, path: &str, frame: &[u8], tls: Option<&tls::Client>) -> u16 {
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/x-tollgate-frame\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        frame.len()
    );
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(address).await?;
        let mut answer = Vec::new();
        match tls {
            None => {
                let mut stream = stream;
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(frame).await?;
                stream.read_to_end(&mut answer).await?;
            }
            Some(client) => {
                let mut stream = client.connect(stream).await?;
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(frame).await?;
                let _ = stream.read_to_end(&mut answer).await;
            }
        }
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(CONVERGE_TIMEOUT, exchange).await.ok().and_then(Result::ok).unwrap_or_default();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

/// TLS as an attacker without the cluster's CA would try it: a client certificate of
/// a CA of its own.
mod tls {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    pub struct Client(tokio_rustls::TlsConnector);

    /// Accepts any server certificate (the attacker does not care who answers).
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    impl Client {
        pub fn with_certificate(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Client> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)?;
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
                .with_client_auth_cert(chain, key)?;
            Ok(Client(tokio_rustls::TlsConnector::from(Arc::new(config))))
        }

        pub async fn connect(
            &self,
            stream: tokio::net::TcpStream,
        ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
            self.0.connect(ServerName::try_from("node-1.tollgate").expect("a name"), stream).await
        }
    }
}

/// Node 99 at term 1000: its vote, an (empty) AppendEntries as leader, a vote request.
fn stranger_frames() -> (Vote<u64>, openraft::raft::AppendEntriesRequest<TypeConfig>, openraft::raft::VoteRequest<u64>)
{
    let vote = Vote::new_committed(1000, STRANGER);
    let append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let ballot = openraft::raft::VoteRequest::<u64> { vote: Vote::new(1000, STRANGER), last_log_id: None };
    (vote, append, ballot)
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    tollgate_raft_store::codec::encode(value).expect("encodes")
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0);
    kib / 1024
}

/// Every attack, from an attacker whose frames go out as `tls` makes them (plain, or
/// TLS with a certificate of a foreign CA), then what must hold afterwards.
/// Who the members are and what each one is: `/cluster` without its progress fields
/// (`matched_index` moves with every write, the real user's included).
fn membership(cluster: &serde_json::Value) -> Vec<(u64, String, String)> {
    let members = cluster["members"].as_array().cloned().unwrap_or_default();
    members
        .iter()
        .map(|member| {
            let text = |field: &str| member[field].as_str().unwrap_or_default().to_string();
            (member["node_id"].as_u64().unwrap_or(0), text("address"), text("role"))
        })
        .collect()
}

async fn replay_attacks(cluster: &mut TestCluster, tls: Option<&tls::Client>, round: &str) -> anyhow::Result<()> {
    let leader = cluster.leader().await?;
    let follower = cluster.nodes.iter().map(|node| node.id).find(|id| *id != leader).expect("a follower");
    let term = cluster.status(leader).await.and_then(|status| status["term"].as_u64()).unwrap_or(0);
    let target = cluster.node(leader).cluster_address();
    let client = cluster.client();
    client.put("/services/victim", &json!({"url": "http://victim.internal:8080"})).await?;
    let config_before = client.get("/config").await?.body;
    let members_before = membership(&client.get("/cluster").await?.body);

    // 1. A forwarded write, claiming to come from a member, and one creating a consumer.
    let patch = Command {
        now_s: 0,
        write_id: None,
        op: Op::Patch {
            kind: EntityKind::Service,
            key: "victim".into(),
            parent: None,
            body: json!({"url": "http://attacker.example:9"}).into(),
        },
    };
    let create = Command {
        now_s: 0,
        write_id: None,
        op: Op::Create {
            kind: EntityKind::Consumer,
            id: uuid::Uuid::new_v4(),
            parent: None,
            body: json!({"username": "intruder"}).into(),
        },
    };
    for command in [patch, create] {
        let forwarded = Forwarded { from: follower, term, request: LeaderRequest::Write(command) };
        let status = post_frame(&target, PATH_LEADER, &encode(&forwarded), tls).await;
        assert!(status != 200, "a forwarded write was answered 200");
    }
    // 2. A join of a process that is not a member, and a removal.
    let join = LeaderRequest::AddMember { node_id: STRANGER, address: "127.0.0.1:9".into() };
    assert!(post_frame(&target, PATH_JOIN, &encode(&join), tls).await != 200, "a join was answered 200");
    let remove = Forwarded { from: follower, term, request: LeaderRequest::RemoveMember { node_id: follower } };
    assert!(post_frame(&target, PATH_LEADER, &encode(&remove), tls).await != 200, "a removal was answered 200");
    // 3. AppendEntries and a vote request from node 99 at term 1000, to every node.
    let (vote, append, ballot) = stranger_frames();
    let addresses: Vec<String> = cluster.nodes.iter().map(|node| node.cluster_address()).collect();
    for address in &addresses {
        assert!(post_frame(address, PATH_APPEND, &encode(&append), tls).await != 200, "an append was answered 200");
        assert!(post_frame(address, PATH_VOTE, &encode(&ballot), tls).await != 200, "a vote was answered 200");
    }
    // 4. Two snapshot chunks, the second 43 bytes at 1 GiB.
    let pid = cluster.node(leader).pid().expect("running");
    let memory_before = rss_mib(pid);
    let meta = SnapshotMeta::<u64, openraft::BasicNode> {
        last_log_id: Some(openraft::LogId::new(CommittedLeaderId::new(1000, STRANGER), 1_000_000)),
        last_membership: StoredMembership::default(),
        snapshot_id: "attack".into(),
    };
    for (offset, length) in [(0u64, 10usize), (1 << 30, 43)] {
        let chunk = openraft::raft::InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: meta.clone(),
            offset,
            data: vec![7; length],
            done: false,
        };
        assert!(post_frame(&target, PATH_SNAPSHOT, &encode(&chunk), tls).await != 200, "a chunk was answered 200");
    }
    // 5. 300 silent sockets on the leader's cluster port.
    let mut silent = Vec::new();
    for _ in 0..300 {
        if let Ok(socket) = tokio::net::TcpStream::connect(&target).await {
            silent.push(socket);
        }
    }

    // The real members carry on: a write through a follower is accepted, promptly.
    let started = tokio::time::Instant::now();
    let written = eventually("a write through a follower during the attack", CONVERGE_TIMEOUT, || async {
        cluster.client_of(follower).post("/consumers", &json!({"username": format!("real-user-{round}")})).await.ok()
    })
    .await?;
    let write_ms = started.elapsed().as_millis();
    drop(silent);
    assert_eq!(written.status, 201);
    assert!(write_ms < 5_000, "the write took {write_ms} ms");
    // Nothing the attacker sent took effect.
    let leader_after = cluster.leader().await?;
    assert_eq!(leader_after, leader, "the leader changed");
    let term_after = cluster.status(leader).await.and_then(|status| status["term"].as_u64()).unwrap_or(0);
    assert_eq!(term_after, term, "the term changed");
    let mut config_after = client.get("/config").await?.body;
    let consumers = |config: &serde_json::Value| config["consumers"].as_array().map_or(0, Vec::len);
    assert_eq!(consumers(&config_after), consumers(&config_before) + 1, "only the real user: {config_after}");
    // The real user apart, the same config.
    let mut config_before = config_before;
    for config in [&mut config_after, &mut config_before] {
        if let Some(object) = config.as_object_mut() {
            object.remove("consumers");
        }
    }
    assert_eq!(config_after, config_before, "the config changed");
    assert_eq!(membership(&client.get("/cluster").await?.body), members_before, "the membership changed");
    let memory_after = rss_mib(pid);
    println!("leader {leader}: RSS {memory_before} MiB before the snapshot chunks, {memory_after} MiB after; a follower's write took {write_ms} ms");
    assert!(memory_after < memory_before + 64, "memory grew from {memory_before} to {memory_after} MiB");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_mutual_tls_ignores_every_attack() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start_with_tls(3, &[]).await?;
    // Plain HTTP: the handshake fails before a byte is parsed.
    replay_attacks(&mut cluster, None, "plain").await?;
    // TLS with a certificate of another CA, naming node 2 and node 99.
    let foreign = tempfile::tempdir()?;
    let made = std::process::Command::new(tollgate_tests::tollgate_binary())
        .args(["certs", "init", "--out"])
        .arg(foreign.path())
        .args(["--nodes", "2,99"])
        .stdout(std::process::Stdio::null())
        .status()?;
    assert!(made.success());
    let attacker =
        tls::Client::with_certificate(&foreign.path().join("node-2.pem"), &foreign.path().join("node-2-key.pem"))?;
    replay_attacks(&mut cluster, Some(&attacker), "foreign-ca").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_authenticated_by_its_secret_ignores_every_attack() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start_with(3, &["--cluster-secret", SECRET]).await?;
    replay_attacks(&mut cluster, None, "plain").await
}

/// Neither TLS nor a secret: every local process is trusted as any member (said at
/// start). A node that is not a member still cannot depose the leader or vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_or_secret_raft_rpcs_from_non_members_are_still_refused() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.leader().await?;
    let term = cluster.status(leader).await.and_then(|status| status["term"].as_u64()).unwrap_or(0);
    let (_, append, ballot) = stranger_frames();
    for node in &cluster.nodes {
        let address = node.cluster_address();
        assert_eq!(post_frame(&address, PATH_APPEND, &encode(&append), None).await, 403);
        assert_eq!(post_frame(&address, PATH_VOTE, &encode(&ballot), None).await, 403);
    }
    assert_eq!(cluster.leader().await?, leader, "the leader changed");
    let term_after = cluster.status(leader).await.and_then(|status| status["term"].as_u64()).unwrap_or(0);
    assert_eq!(term_after, term, "the term changed");
    Ok(())
}
