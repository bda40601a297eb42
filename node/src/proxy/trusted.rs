//! `trusted_ips` (Kong's setting): which peers may speak for the client.
//!
//! From a trusted peer, the `X-Forwarded-Proto`, `-Host` and `-Port` it sent are kept,
//! and the client's address is the right-most address in `X-Forwarded-For` that is not
//! itself trusted (nginx's `real_ip_recursive on`, as Kong configures it). From any
//! other peer those headers are replaced by this hop's values and the client is the
//! peer. `X-Forwarded-For` always gets the peer appended.

use std::net::IpAddr;

/// Most CIDR ranges in `trusted_ips`.
pub const TRUSTED_RANGES_MAX: usize = 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedIps {
    ranges: Vec<(IpAddr, u8)>,
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
        Ok(TrustedIps { ranges })
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

    /// The client's address: the peer, or when the peer is trusted the right-most
    /// untrusted address of `X-Forwarded-For`.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let Some(chain) = forwarded_for else { return peer };
        let mut client = peer;
        for hop in chain.rsplit(',').map(str::trim) {
            let Ok(address) = hop.parse::<IpAddr>() else { break };
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
        let trusted = TrustedIps::parse("127.0.0.1, 10.0.0.0/8").unwrap();
        assert!(trusted.contains("10.2.3.4".parse().unwrap()));
        assert!(!trusted.contains("11.0.0.1".parse().unwrap()));
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(trusted.client_ip(peer, Some("203.0.113.5, 10.0.0.7")), "203.0.113.5".parse::<IpAddr>().unwrap());
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(trusted.client_ip(stranger, Some("203.0.113.5")), stranger);
        assert!(TrustedIps::parse("300.1.1.1").is_err());
        assert!(TrustedIps::parse("10.0.0.0/33").is_err());
        assert!(TrustedIps::default().client_ip(peer, Some("1.2.3.4")) == peer);
    }
}
