//! `trusted_ips`, `real_ip_header` and `real_ip_recursive` (Kong's settings, which
//! Kong hands to nginx's realip module): which peers may speak for the client, and how.
//!
//! From a trusted peer, the `X-Forwarded-Proto`, `-Host` and `-Port` it sent are kept,
//! and the client's address is read from `real_ip_header` (Kong's default
//! `X-Real-IP`). With `X-Forwarded-For` it is the last address, or with
//! `real_ip_recursive` the right-most one that is not itself trusted. From any other
//! peer those headers are replaced by this hop's values and the client is the peer.
//! `X-Forwarded-For` always gets the peer appended.

use std::net::IpAddr;

/// Most CIDR ranges in `trusted_ips`.
pub const TRUSTED_RANGES_MAX: usize = 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedIps {
    ranges: Vec<(IpAddr, u8)>,
    source: RealIpHeader,
    recursive: bool,
}

/// Where a trusted peer names the client (`real_ip_header`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RealIpHeader {
    /// `X-Real-IP`, Kong's default: one address.
    #[default]
    RealIp,
    /// `X-Forwarded-For`: a list of hops, client first.
    ForwardedFor,
    /// Another header holding one address (`CF-Connecting-IP`, …), lower case.
    Other(String),
}

impl RealIpHeader {
    /// Parses a header name; `proxy_protocol` is refused (the listeners do not speak it).
    pub fn parse(name: &str) -> Result<RealIpHeader, String> {
        let lower = name.trim().to_ascii_lowercase();
        match lower.as_str() {
            "x-real-ip" => Ok(RealIpHeader::RealIp),
            "x-forwarded-for" => Ok(RealIpHeader::ForwardedFor),
            "proxy_protocol" => {
                Err("real_ip_header: 'proxy_protocol' is not supported (no PROXY protocol listener)".into())
            }
            _ if !lower.is_empty() && lower.len() <= 64 && http::HeaderName::from_bytes(lower.as_bytes()).is_ok() => {
                Ok(RealIpHeader::Other(lower))
            }
            _ => Err(format!("real_ip_header: '{name}' is not a header name")),
        }
    }

    fn name(&self) -> &str {
        match self {
            RealIpHeader::RealIp => "x-real-ip",
            RealIpHeader::ForwardedFor => "x-forwarded-for",
            RealIpHeader::Other(name) => name,
        }
    }
}

/// An address as nginx's realip reads it: an IP, maybe with a port (`1.2.3.4:15`,
/// `[::1]:80`).
fn parse_address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(address) = text.parse::<IpAddr>() {
        return Some(address);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split_once(']').and_then(|(address, _)| address.parse().ok());
    }
    text.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).and_then(|(address, _)| address.parse().ok())
}

impl TrustedIps {
    /// Parses `10.0.0.0/8,127.0.0.1,::1/128`.
    pub fn parse(text: &str) -> Result<TrustedIps, String> {
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (address, prefix) = part.split_once('/').map_or((part, None), |(a, p)| (a, Some(p)));
            let address: IpAddr = address.parse().map_err(|_| format!("trusted_ips: '{part}' is not an IP or CIDR"))?;
            let max = if address.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                Some(prefix) => prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| format!("trusted_ips: bad prefix in '{part}'"))?,
                None => max,
            };
            ranges.push((address, prefix));
        }
        if ranges.len() > TRUSTED_RANGES_MAX {
            return Err(format!("trusted_ips: at most {TRUSTED_RANGES_MAX} ranges"));
        }
        Ok(TrustedIps { ranges, ..TrustedIps::default() })
    }

    /// Sets `real_ip_header` and `real_ip_recursive`.
    pub fn with_real_ip(self, source: RealIpHeader, recursive: bool) -> TrustedIps {
        TrustedIps { source, recursive, ..self }
    }

    /// The header a trusted peer names the client in (`None`: `X-Forwarded-For`,
    /// which callers already hold joined).
    pub fn real_ip_header(&self) -> Option<&str> {
        match self.source {
            RealIpHeader::ForwardedFor => None,
            _ => Some(self.source.name()),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.ranges.iter().any(|(network, prefix)| match (network, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = if *prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
                u32::from(*network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = if *prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
                u128::from(*network) & mask == u128::from(ip) & mask
            }
            _ => false,
        })
    }

    /// The client's address: the peer, or when the peer is trusted the address in the
    /// `real_ip_header` it sent (`named`: that header's value, when it is not
    /// `X-Forwarded-For`). An address that does not parse leaves the peer.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>, named: Option<&str>) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let chain = match self.source {
            RealIpHeader::ForwardedFor => forwarded_for,
            _ => named,
        };
        let Some(chain) = chain else { return peer };
        let mut hops = chain.rsplit(',');
        if !self.recursive {
            // nginx takes the last address of the list (the one the peer added).
            return hops.next().and_then(parse_address).unwrap_or(peer);
        }
        let mut client = peer;
        for hop in hops {
            let Some(address) = parse_address(hop) else { break };
            client = address;
            if !self.contains(address) {
                break;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_real_ip() {
        let trusted =
            TrustedIps::parse("127.0.0.1, 10.0.0.0/8").unwrap().with_real_ip(RealIpHeader::ForwardedFor, true);
        assert!(trusted.contains("10.2.3.4".parse().unwrap()));
        assert!(!trusted.contains("11.0.0.1".parse().unwrap()));
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            trusted.client_ip(peer, Some("203.0.113.5, 10.0.0.7"), None),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(trusted.client_ip(stranger, Some("203.0.113.5"), None), stranger);
        assert!(TrustedIps::parse("300.1.1.1").is_err());
        assert!(TrustedIps::parse("10.0.0.0/33").is_err());
        assert!(TrustedIps::default().client_ip(peer, Some("1.2.3.4"), Some("1.2.3.4")) == peer);
    }

    /// spec/02-integration/05-proxy/03-upstream_headers_spec.lua: X-Real-IP from a
    /// trusted peer by default (:576), not from another (:721); X-Forwarded-For
    /// recursive with ports (:880, :894); the last hop without recursion.
    #[test]
    fn kongs_real_ip_rows() {
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let default = TrustedIps::parse("127.0.0.1").unwrap();
        assert_eq!(default.client_ip(peer, Some("10.0.0.9"), Some("10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(default.client_ip(peer, Some("10.0.0.9"), None), peer);
        let other = TrustedIps::parse("10.0.0.1").unwrap();
        assert_eq!(other.client_ip(peer, None, Some("10.0.0.1")), peer);
        let recursive = TrustedIps::parse("127.0.0.1,172.16.0.1,192.168.0.1")
            .unwrap()
            .with_real_ip(RealIpHeader::parse("X-Forwarded-For").unwrap(), true);
        let chain = "127.0.0.1, 10.0.0.1, 192.168.0.1, 127.0.0.1, 172.16.0.1";
        assert_eq!(recursive.client_ip(peer, Some(chain), Some("10.0.0.2")), ip("10.0.0.1"));
        let ported = "127.0.0.1:14, 10.0.0.1:15, 192.168.0.1:16, 127.0.0.1:17, 172.16.0.1:18";
        assert_eq!(recursive.client_ip(peer, Some(ported), None), ip("10.0.0.1"));
        let last = recursive.clone().with_real_ip(RealIpHeader::ForwardedFor, false);
        assert_eq!(last.client_ip(peer, Some(chain), None), ip("172.16.0.1"));
        assert!(RealIpHeader::parse("proxy_protocol").is_err());
        assert_eq!(RealIpHeader::parse("CF-Connecting-IP").unwrap(), RealIpHeader::Other("cf-connecting-ip".into()));
    }
}
