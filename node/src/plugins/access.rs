//! Access control and traffic plugins: acl, ip-restriction, request-termination,
//! rate-limiting (`policy: local`) and correlation-id.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use tollgate_raft_store::plugins::{
    parse_cidr, AclConfig, CorrelationIdConfig, IpRestrictionConfig, RateLimitingConfig, RequestTerminationConfig,
};
use uuid::Uuid;

use super::auth::query_param;
use super::{Ctx, Env, Exit, Flow, Plugin, RequestView};

/// acl: the consumer's groups against `allow` or `deny`.
pub struct Acl {
    config: AclConfig,
}

impl Acl {
    pub fn new(config: AclConfig) -> Acl {
        Acl { config }
    }
}

impl Plugin for Acl {
    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        let Some(consumer) = &ctx.consumer else {
            return Flow::Exit(Exit::message(StatusCode::UNAUTHORIZED, "Unauthorized"));
        };
        let member = |groups: &[String]| consumer.groups.iter().any(|group| groups.contains(group));
        let allowed = match (&self.config.allow, &self.config.deny) {
            (Some(allow), _) => member(allow),
            (None, Some(deny)) => !member(deny),
            (None, None) => true,
        };
        if !allowed {
            return Flow::Exit(Exit::message(StatusCode::FORBIDDEN, "You cannot consume this service"));
        }
        if !self.config.hide_groups_header && !consumer.groups.is_empty() {
            if let Ok(value) = HeaderValue::from_str(&consumer.groups.join(", ")) {
                request.headers.insert(HeaderName::from_static("x-consumer-groups"), value);
            }
        }
        Flow::Continue
    }
}

/// ip-restriction: the client address (from the trusted forwarded chain) against
/// `deny` first, then `allow`.
pub struct IpRestriction {
    allow: Option<Vec<(IpAddr, u8)>>,
    deny: Vec<(IpAddr, u8)>,
    status: StatusCode,
    message: String,
}

impl IpRestriction {
    pub fn new(config: IpRestrictionConfig) -> Result<IpRestriction, String> {
        let parse = |list: &Option<Vec<String>>| -> Result<Option<Vec<(IpAddr, u8)>>, String> {
            list.as_ref()
                .map(|list| {
                    list.iter().map(|cidr| parse_cidr(cidr).ok_or_else(|| format!("invalid cidr '{cidr}'"))).collect()
                })
                .transpose()
        };
        Ok(IpRestriction {
            allow: parse(&config.allow)?.filter(|list| !list.is_empty()),
            deny: parse(&config.deny)?.unwrap_or_default(),
            status: StatusCode::from_u16(config.status.unwrap_or(403)).map_err(|error| error.to_string())?,
            message: config.message.unwrap_or_else(|| "Your IP address is not allowed".into()),
        })
    }
}

/// Whether `address` is inside `network/prefix` (IPv4-mapped IPv6 counts as IPv4).
pub fn cidr_contains(&(network, prefix): &(IpAddr, u8), address: IpAddr) -> bool {
    let address = match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    };
    match (network, address) {
        (IpAddr::V4(network), IpAddr::V4(address)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            u32::from(network) & mask == u32::from(address) & mask
        }
        (IpAddr::V6(network), IpAddr::V6(address)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            u128::from(network) & mask == u128::from(address) & mask
        }
        _ => false,
    }
}

impl Plugin for IpRestriction {
    fn access(&self, ctx: &mut Ctx, _request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        let ip = ctx.client_ip;
        let denied = self.deny.iter().any(|cidr| cidr_contains(cidr, ip))
            || self.allow.as_ref().is_some_and(|allow| !allow.iter().any(|cidr| cidr_contains(cidr, ip)));
        if denied {
            return Flow::Exit(Exit::message(self.status, &self.message));
        }
        Flow::Continue
    }
}

/// request-termination: answers every request (or those carrying `trigger`) itself.
pub struct RequestTermination {
    config: RequestTerminationConfig,
    status: StatusCode,
    trigger: Option<HeaderName>,
}

impl RequestTermination {
    pub fn new(config: RequestTerminationConfig) -> Result<RequestTermination, String> {
        let status = StatusCode::from_u16(config.status_code).map_err(|error| error.to_string())?;
        let trigger = config
            .trigger
            .as_deref()
            .map(|name| HeaderName::from_bytes(name.as_bytes()))
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(RequestTermination { config, status, trigger })
    }
}

impl Plugin for RequestTermination {
    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        if let (Some(trigger), Some(name)) = (&self.trigger, &self.config.trigger) {
            let asked =
                request.headers.contains_key(trigger) || request.query.and_then(|q| query_param(q, name)).is_some();
            if !asked {
                return Flow::Continue;
            }
        }
        if self.config.echo {
            let headers: serde_json::Map<String, serde_json::Value> = request
                .headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or_default().into()))
                .collect();
            let body = serde_json::json!({
                "message": self.config.message,
                "request": { "method": request.method.as_str(), "query": request.query, "headers": headers },
                "matched_route": ctx.route.map(|id| id.to_string()),
                "matched_service": ctx.service.map(|id| id.to_string()),
                "consumer": ctx.consumer.as_ref().map(|consumer| consumer.id.to_string()),
            });
            let mut exit = Exit::message(self.status, "");
            exit.body = Bytes::from(body.to_string());
            return Flow::Exit(exit);
        }
        if let Some(body) = &self.config.body {
            let content_type = self.config.content_type.as_deref().unwrap_or("application/json; charset=utf-8");
            let content_type = HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("text/plain"));
            return Flow::Exit(Exit {
                status: self.status,
                body: Bytes::from(body.clone()),
                headers: vec![(http::header::CONTENT_TYPE, content_type)],
            });
        }
        let default = self.status.canonical_reason().unwrap_or("Request terminated");
        Flow::Exit(Exit::message(self.status, self.config.message.as_deref().unwrap_or(default)))
    }
}

/// Counters of windows a node holds for `policy: local`, past this many the ones of
/// windows already over are dropped; if none are over, new keys are admitted
/// uncounted (fault-tolerant, as Kong's `fault_tolerant: true`) and counted in
/// `tollgate_rate_limit_counters_full_total`.
pub const RATE_COUNTERS_MAX: usize = 200_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CounterKey {
    plugin: Uuid,
    identifier: String,
    window_s: u64,
    start_s: u64,
}

/// A node's `policy: local` counters, shared by its proxy workers and kept across
/// config changes (a plugin instance keeps its counts while other entities change).
#[derive(Default)]
pub struct RateCounters {
    counters: RwLock<HashMap<CounterKey, Arc<AtomicU64>>>,
}

impl RateCounters {
    fn counter(&self, key: CounterKey, now_s: u64) -> Option<Arc<AtomicU64>> {
        if let Some(counter) = self.counters.read().ok()?.get(&key) {
            return Some(counter.clone());
        }
        let mut counters = self.counters.write().ok()?;
        if counters.len() >= RATE_COUNTERS_MAX {
            counters.retain(|key, _| key.start_s + key.window_s > now_s);
            if counters.len() >= RATE_COUNTERS_MAX {
                metrics::counter!("tollgate_rate_limit_counters_full_total").increment(1);
                return None;
            }
        }
        Some(counters.entry(key).or_default().clone())
    }
}

/// rate-limiting with `policy: local`: fixed windows per node.
pub struct RateLimiting {
    /// The plugin instance: counters are keyed by it.
    id: Uuid,
    config: RateLimitingConfig,
    limits: Vec<(&'static str, u64, u64)>,
    header_name: Option<HeaderName>,
}

impl RateLimiting {
    pub fn new(id: Uuid, config: RateLimitingConfig) -> RateLimiting {
        let limits = config.limits();
        let header_name = config.header_name.as_deref().and_then(|name| HeaderName::from_bytes(name.as_bytes()).ok());
        RateLimiting { id, config, limits, header_name }
    }

    fn identifier(&self, ctx: &Ctx, request: &RequestView<'_>) -> String {
        let ip = || ctx.client_ip.to_string();
        match self.config.limit_by.as_str() {
            "consumer" => ctx.consumer.as_ref().map_or_else(ip, |consumer| consumer.id.to_string()),
            "credential" => ctx.credential.map_or_else(ip, |credential| credential.to_string()),
            "service" => ctx.service.map_or_else(ip, |service| service.to_string()),
            "header" => self
                .header_name
                .as_ref()
                .and_then(|name| request.headers.get(name))
                .and_then(|value| value.to_str().ok())
                .map_or_else(ip, str::to_string),
            "path" => self.config.path.clone().unwrap_or_else(ip),
            _ => ip(),
        }
    }
}

impl Plugin for RateLimiting {
    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        let limiter = self;
        let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let identifier = limiter.identifier(ctx, request);
        let mut taken: Vec<(Arc<AtomicU64>, &'static str, u64, u64, u64)> = Vec::with_capacity(limiter.limits.len());
        let mut exceeded = false;
        for &(name, window_s, limit) in &limiter.limits {
            let start_s = now_s - now_s % window_s;
            let key = CounterKey { plugin: self.id, identifier: identifier.clone(), window_s, start_s };
            let Some(counter) = env.counters.counter(key, now_s) else { continue };
            let used = counter.fetch_add(1, Ordering::Relaxed) + 1;
            exceeded |= used > limit;
            taken.push((counter, name, limit, used, start_s + window_s - now_s));
        }
        if exceeded {
            // A refused request uses nothing: give back what was taken.
            for (counter, ..) in &taken {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if !limiter.config.hide_client_headers {
            let remaining = |limit: u64, used: u64| limit.saturating_sub(used.min(limit));
            // RateLimit-*: the window closest to running out.
            if let Some((_, _, limit, used, reset)) =
                taken.iter().min_by_key(|(_, _, limit, used, _)| remaining(*limit, *used - u64::from(exceeded)))
            {
                let used = used - u64::from(exceeded);
                let headers = &mut ctx.response_headers;
                headers.push((HeaderName::from_static("ratelimit-limit"), HeaderValue::from(*limit)));
                headers
                    .push((HeaderName::from_static("ratelimit-remaining"), HeaderValue::from(remaining(*limit, used))));
                headers.push((HeaderName::from_static("ratelimit-reset"), HeaderValue::from(*reset)));
            }
            for (_, name, limit, used, _) in &taken {
                let used = used - u64::from(exceeded);
                let title = format!("{}{}", name[..1].to_ascii_uppercase(), &name[1..]);
                if let Ok(header) = HeaderName::from_bytes(format!("x-ratelimit-limit-{title}").as_bytes()) {
                    ctx.response_headers.push((header, HeaderValue::from(*limit)));
                }
                if let Ok(header) = HeaderName::from_bytes(format!("x-ratelimit-remaining-{title}").as_bytes()) {
                    ctx.response_headers.push((header, HeaderValue::from(remaining(*limit, used))));
                }
            }
        }
        if exceeded {
            let reset =
                taken.iter().filter(|(_, _, limit, used, _)| used > limit).map(|(.., reset)| *reset).max().unwrap_or(1);
            let status = StatusCode::from_u16(limiter.config.error_code).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            let mut exit = Exit::message(status, &limiter.config.error_message);
            exit.headers.push((http::header::RETRY_AFTER, HeaderValue::from(reset)));
            return Flow::Exit(exit);
        }
        Flow::Continue
    }
}

/// correlation-id: a request id in `header_name`, generated when the client sent none,
/// echoed to the client with `echo_downstream`.
pub struct CorrelationId {
    config: CorrelationIdConfig,
    header: HeaderName,
    /// `uuid#counter`: one uuid per plugin instance and worker start, then a counter.
    prefix: Uuid,
    counter: AtomicU64,
}

impl CorrelationId {
    pub fn new(config: CorrelationIdConfig) -> Result<CorrelationId, String> {
        let header = HeaderName::from_bytes(config.header_name.as_bytes()).map_err(|error| error.to_string())?;
        Ok(CorrelationId { config, header, prefix: Uuid::new_v4(), counter: AtomicU64::new(0) })
    }

    fn generate(&self, ctx: &Ctx) -> String {
        let sequence = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        match self.config.generator.as_str() {
            "uuid" => Uuid::new_v4().to_string(),
            // Kong's tracker is nginx's `ip-port-pid-connection-requests-msec`; Tollgate
            // has no nginx connection numbers and sends `ip-pid-sequence-msec`.
            "tracker" => {
                let ms =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
                format!("{}-{}-{sequence}-{ms}", ctx.client_ip, std::process::id())
            }
            _ => format!("{}#{sequence}", self.prefix),
        }
    }
}

impl Plugin for CorrelationId {
    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        let value = match request.headers.get(&self.header) {
            Some(value) => value.clone(),
            None => {
                let Ok(value) = HeaderValue::from_str(&self.generate(ctx)) else { return Flow::Continue };
                request.headers.insert(self.header.clone(), value.clone());
                value
            }
        };
        if self.config.echo_downstream {
            ctx.response_headers.push((self.header.clone(), value));
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_v4_v6_and_mapped_addresses() {
        let net = |text| parse_cidr(text).unwrap();
        assert!(cidr_contains(&net("10.0.0.0/8"), "10.200.3.4".parse().unwrap()));
        assert!(!cidr_contains(&net("10.0.0.0/8"), "11.0.0.1".parse().unwrap()));
        assert!(cidr_contains(&net("0.0.0.0/0"), "1.2.3.4".parse().unwrap()));
        assert!(cidr_contains(&net("127.0.0.1"), "::ffff:127.0.0.1".parse().unwrap()));
        assert!(cidr_contains(&net("2001:db8::/32"), "2001:db8:1::5".parse().unwrap()));
        assert!(!cidr_contains(&net("2001:db8::/32"), "2001:db9::5".parse().unwrap()));
    }
}
