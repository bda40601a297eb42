//! Name lookups without the C library's resolver: `/etc/hosts`, then the name servers
//! of `/etc/resolv.conf` over UDP (TCP when an answer is truncated), with its `search`
//! list and `ndots`.
//!
//! The container image is a static binary in an empty file system. glibc's
//! `getaddrinfo` loads its NSS modules at run time, which such an image does not
//! have, so peers and upstreams named by a service name (`node2`, `echo`,
//! `tollgate-0.tollgate-peers`) would not resolve. Docker and Kubernetes both write
//! `/etc/hosts` and `/etc/resolv.conf` into every container, and that is all this
//! reads. Without a `resolv.conf` naming a server it falls back to `getaddrinfo`.
//! Packets are built and parsed by `simple-dns`, `resolv.conf` by `resolv-conf`
//! (both without dependencies).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use simple_dns::rdata::RData;
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const HOSTS_PATH: &str = "/etc/hosts";
pub const RESOLV_CONF_PATH: &str = "/etc/resolv.conf";
/// Longest wait for one server's answer to one question (`resolv.conf`'s
/// `options timeout` when smaller).
pub const QUERY_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// Largest DNS message read (UDP answers are at most 512 bytes without EDNS; TCP
/// ones carry their length).
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Names tried per lookup (the name and its `search` suffixes).
pub const CANDIDATES_MAX: usize = 8;

/// The addresses `name` has (a literal address is its own answer).
pub async fn lookup(name: &str) -> io::Result<Vec<IpAddr>> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    if let Ok(hosts) = tokio::fs::read_to_string(HOSTS_PATH).await {
        let found = from_hosts(&hosts, name);
        if !found.is_empty() {
            return Ok(found);
        }
    }
    if name.eq_ignore_ascii_case("localhost") {
        return Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]);
    }
    let conf =
        match tokio::fs::read(RESOLV_CONF_PATH).await.ok().and_then(|bytes| resolv_conf::Config::parse(bytes).ok()) {
            Some(conf) if !conf.nameservers.is_empty() => conf,
            _ => return system_lookup(name).await,
        };
    let servers: Vec<SocketAddr> = conf
        .nameservers
        .iter()
        .map(|server| match server {
            resolv_conf::ScopedIp::V4(ip) => SocketAddr::new(IpAddr::V4(*ip), 53),
            resolv_conf::ScopedIp::V6(ip, _) => SocketAddr::new(IpAddr::V6(*ip), 53),
        })
        .collect();
    let timeout = Duration::from_secs(u64::from(conf.timeout.max(1))).min(QUERY_TIMEOUT_MAX);
    let attempts = conf.attempts.clamp(1, 5);
    let search: Vec<String> = conf.get_last_search_or_domain().map(|domain| domain.to_string()).collect();
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such host"));
    for candidate in candidates(name, &search, conf.ndots) {
        match lookup_candidate(&candidate, &servers, timeout, attempts).await {
            Ok(found) if !found.is_empty() => return Ok(found),
            Ok(_) => {}
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// `getaddrinfo`, for hosts without a `resolv.conf` naming a server.
async fn system_lookup(name: &str) -> io::Result<Vec<IpAddr>> {
    Ok(tokio::net::lookup_host((name, 0)).await?.map(|address| address.ip()).collect())
}

/// The addresses `/etc/hosts` gives `name` (case-insensitive, aliases included).
fn from_hosts(hosts: &str, name: &str) -> Vec<IpAddr> {
    let wanted = name.trim_end_matches('.');
    hosts
        .lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            let ip: IpAddr = fields.next()?.split('%').next()?.parse().ok()?;
            fields.any(|host| host.trim_end_matches('.').eq_ignore_ascii_case(wanted)).then_some(ip)
        })
        .collect()
}

/// The names to ask for, in order (as glibc orders them): a name ending in `.` as is;
/// one with at least `ndots` dots first as is, then with each search suffix; one with
/// fewer the other way round.
fn candidates(name: &str, search: &[String], ndots: u32) -> Vec<String> {
    if let Some(absolute) = name.strip_suffix('.') {
        return vec![absolute.to_string()];
    }
    let suffixed = search.iter().map(|suffix| format!("{name}.{}", suffix.trim_matches('.')));
    let dots = name.matches('.').count() as u32;
    let mut names: Vec<String> = if dots >= ndots {
        std::iter::once(name.to_string()).chain(suffixed).collect()
    } else {
        suffixed.chain(std::iter::once(name.to_string())).collect()
    };
    names.truncate(CANDIDATES_MAX);
    names
}

/// A and AAAA answers for one name, from the first server that answers. `Ok(empty)`
/// when the name does not exist (or has no address).
async fn lookup_candidate(
    name: &str,
    servers: &[SocketAddr],
    timeout: Duration,
    attempts: u32,
) -> io::Result<Vec<IpAddr>> {
    let mut last_error = io::Error::new(io::ErrorKind::TimedOut, format!("{name}: no name server answered"));
    for _ in 0..attempts {
        for server in servers {
            let v4 = exchange(*server, name, TYPE::A, timeout).await;
            let v6 = exchange(*server, name, TYPE::AAAA, timeout).await;
            match (v4, v6) {
                (Ok(mut v4), Ok(v6)) => {
                    v4.extend(v6);
                    return Ok(v4);
                }
                (Ok(found), Err(_)) | (Err(_), Ok(found)) if !found.is_empty() => return Ok(found),
                (Err(error), _) | (_, Err(error)) => last_error = error,
            }
        }
    }
    Err(last_error)
}

/// One question to one server: over UDP, again over TCP when the answer is truncated.
async fn exchange(server: SocketAddr, name: &str, kind: TYPE, timeout: Duration) -> io::Result<Vec<IpAddr>> {
    // Never under the simulator (crate::env resolves names there), so the system's
    // randomness, not the environment's.
    let id = uuid::Uuid::new_v4().as_u128() as u16;
    let query = query(id, name, kind)?;
    let answer = tokio::time::timeout(timeout, async {
        let local: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let socket = tokio::net::UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        socket.send(&query).await?;
        let mut buf = vec![0u8; 4096];
        loop {
            let read = socket.recv(&mut buf).await?;
            match parse_answer(&buf[..read], id)? {
                Answer::Other => continue,
                Answer::Truncated => return exchange_tcp(server, &query, id).await,
                Answer::Found(found) => return Ok(found),
            }
        }
    })
    .await;
    answer.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, format!("{server} did not answer"))))
}

async fn exchange_tcp(server: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<IpAddr>> {
    let mut stream = tokio::net::TcpStream::connect(server).await?;
    let length = u16::try_from(query.len()).map_err(|_| invalid("query too long"))?;
    stream.write_all(&length.to_be_bytes()).await?;
    stream.write_all(query).await?;
    let length = usize::from(stream.read_u16().await?).min(MESSAGE_BYTES_MAX);
    let mut buf = vec![0u8; length];
    stream.read_exact(&mut buf).await?;
    match parse_answer(&buf, id)? {
        Answer::Found(found) => Ok(found),
        Answer::Other | Answer::Truncated => Err(invalid("no usable answer over TCP")),
    }
}

fn query(id: u16, name: &str, kind: TYPE) -> io::Result<Vec<u8>> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    let name = Name::new(name).map_err(|error| invalid(&format!("{name}: {error}")))?;
    packet.questions.push(Question::new(name, QTYPE::TYPE(kind), QCLASS::CLASS(CLASS::IN), false));
    packet.build_bytes_vec().map_err(|error| invalid(&error.to_string()))
}

enum Answer {
    /// Not the answer to our question (another id): keep waiting.
    Other,
    Truncated,
    /// The addresses (none when the name does not exist).
    Found(Vec<IpAddr>),
}

fn parse_answer(bytes: &[u8], id: u16) -> io::Result<Answer> {
    let Ok(packet) = Packet::parse(bytes) else { return Ok(Answer::Other) };
    if packet.id() != id {
        return Ok(Answer::Other);
    }
    if packet.has_flags(PacketFlag::TRUNCATION) {
        return Ok(Answer::Truncated);
    }
    match packet.rcode() {
        RCODE::NoError | RCODE::NameError => {}
        other => return Err(io::Error::other(format!("name server answered {other:?}"))),
    }
    // A CNAME chain comes with the addresses it ends at: every address in the answer.
    let found = packet
        .answers
        .iter()
        .filter_map(|record| match &record.rdata {
            RData::A(a) => Some(IpAddr::V4(Ipv4Addr::from(a.address))),
            RData::AAAA(aaaa) => Some(IpAddr::V6(Ipv6Addr::from(aaaa.address))),
            _ => None,
        })
        .collect();
    Ok(Answer::Found(found))
}

fn invalid(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, reason.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_match_names_and_aliases_case_insensitively() {
        let hosts = "127.0.0.1 localhost\n# 10.0.0.9 commented\n172.18.0.3\tnode2 Node2.tollgate_default  # docker\nfe80::1%eth0 linklocal\n";
        assert_eq!(from_hosts(hosts, "node2"), vec!["172.18.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(from_hosts(hosts, "node2.TOLLGATE_DEFAULT."), vec!["172.18.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(from_hosts(hosts, "linklocal"), vec!["fe80::1".parse::<IpAddr>().unwrap()]);
        assert!(from_hosts(hosts, "commented").is_empty());
        assert!(from_hosts(hosts, "node").is_empty());
    }

    #[test]
    fn search_order_follows_ndots_as_glibc_does() {
        let search = vec!["tollgate.svc.cluster.local".to_string(), "svc.cluster.local".to_string()];
        assert_eq!(
            candidates("tollgate-0.tollgate-peers", &search, 5),
            vec![
                "tollgate-0.tollgate-peers.tollgate.svc.cluster.local",
                "tollgate-0.tollgate-peers.svc.cluster.local",
                "tollgate-0.tollgate-peers"
            ]
        );
        assert_eq!(candidates("echo.example.com", &search, 1)[0], "echo.example.com");
        assert_eq!(candidates("echo.", &search, 1), vec!["echo"]);
    }

    /// A real exchange with a name server on loopback that answers one A record and
    /// truncates AAAA answers (so the TCP path is taken too).
    #[tokio::test]
    async fn asks_a_name_server_over_udp_and_tcp() {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(server).await.unwrap();
        let reply = |query: &[u8], truncate: bool| -> Vec<u8> {
            let query = Packet::parse(query).unwrap();
            let mut reply = Packet::new_reply(query.id());
            let question = query.questions[0].clone();
            let is_a = question.qtype == QTYPE::TYPE(TYPE::A);
            let name = question.qname.clone();
            reply.questions.push(question);
            if truncate && !is_a {
                reply.set_flags(PacketFlag::TRUNCATION);
            } else if is_a {
                let a = RData::A(simple_dns::rdata::A { address: u32::from(Ipv4Addr::new(10, 1, 2, 3)) });
                reply.answers.push(simple_dns::ResourceRecord::new(name, CLASS::IN, 30, a));
            } else {
                let aaaa = RData::AAAA(simple_dns::rdata::AAAA { address: u128::from(Ipv6Addr::LOCALHOST) });
                reply.answers.push(simple_dns::ResourceRecord::new(name, CLASS::IN, 30, aaaa));
            }
            reply.build_bytes_vec().unwrap()
        };
        let served = tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            for _ in 0..2 {
                let (read, from) = udp.recv_from(&mut buf).await.unwrap();
                udp.send_to(&reply(&buf[..read], true), from).await.unwrap();
            }
            let (mut stream, _) = tcp.accept().await.unwrap();
            let length = usize::from(stream.read_u16().await.unwrap());
            let mut query = vec![0u8; length];
            stream.read_exact(&mut query).await.unwrap();
            let answer = reply(&query, false);
            stream.write_all(&(answer.len() as u16).to_be_bytes()).await.unwrap();
            stream.write_all(&answer).await.unwrap();
        });
        let found = lookup_candidate("echo.test", &[server], Duration::from_secs(5), 1).await.unwrap();
        assert_eq!(found, vec![IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        served.await.unwrap();
    }
}
