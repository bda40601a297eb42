//! Access control and traffic plugins: acl, ip-restriction, request-termination,
//! rate-limiting (`policy: local`), correlation-id and request-size-limiting (cors
//! has its own file).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use tollgate_raft_store::plugins::{
    parse_cidr, AclConfig, CorrelationIdConfig, IpRestrictionConfig, RateLimitingConfig, RequestSizeLimitingConfig,
    RequestTerminationConfig,
};
use tollgate_raft_store::quota::QuotaKey;
use uuid::Uuid;

use super::auth::query_param;
use super::{Ctx, Env, Exit, Flow, Phases, Plugin, RequestView};
use crate::quota::Take;

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
    fn phases(&self) -> Phases {
        Phases::NONE
    }

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
    /// `None`: Kong's `IP address not allowed: <client address>`.
    message: Option<String>,
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
            message: config.message,
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
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, _request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        let ip = ctx.client_ip;
        let denied = self.deny.iter().any(|cidr| cidr_contains(cidr, ip))
            || self.allow.as_ref().is_some_and(|allow| !allow.iter().any(|cidr| cidr_contains(cidr, ip)));
        if denied {
            let message = match &self.message {
                Some(message) => std::borrow::Cow::Borrowed(message.as_str()),
                None => std::borrow::Cow::Owned(format!("IP address not allowed: {ip}")),
            };
            return Flow::Exit(Exit::message(self.status, &message));
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
    fn phases(&self) -> Phases {
        Phases::NONE
    }

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
    identifier: Identifier,
    window_s: u64,
    start_s: u64,
}

/// Who a limit counts for (`limit_by`); ids and addresses without a string made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Identifier {
    Id(Uuid),
    Ip(IpAddr),
    Text(String),
}

impl Identifier {
    /// The ledger's subject string.
    fn subject(&self) -> String {
        match self {
            Identifier::Id(id) => id.to_string(),
            Identifier::Ip(ip) => ip.to_string(),
            Identifier::Text(text) => text.clone(),
        }
    }
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

/// Windows a rate-limiting config may set: second, minute, hour, day, month, year.
const RATE_WINDOWS_MAX: usize = 6;

/// One window of a rate-limiting config, with its header names and its limit as a
/// header value, made when the config compiles.
struct Window {
    seconds: u64,
    limit: u64,
    limit_value: HeaderValue,
    limit_header: HeaderName,
    remaining_header: HeaderName,
}

/// rate-limiting with `policy: local`: fixed windows per node.
pub struct RateLimiting {
    /// The plugin instance: counters are keyed by it.
    id: Uuid,
    config: RateLimitingConfig,
    windows: Vec<Window>,
    header_name: Option<HeaderName>,
    /// `policy: cluster`: tokens leased from the cluster ledger.
    cluster: bool,
}

impl RateLimiting {
    pub fn new(id: Uuid, config: RateLimitingConfig) -> RateLimiting {
        let windows = config
            .limits()
            .into_iter()
            .take(RATE_WINDOWS_MAX)
            .filter_map(|(name, seconds, limit)| {
                let title = format!("{}{}", name[..1].to_ascii_uppercase(), &name[1..]);
                let limit_header = HeaderName::from_bytes(format!("x-ratelimit-limit-{title}").as_bytes()).ok()?;
                let remaining_header =
                    HeaderName::from_bytes(format!("x-ratelimit-remaining-{title}").as_bytes()).ok()?;
                Some(Window { seconds, limit, limit_value: HeaderValue::from(limit), limit_header, remaining_header })
            })
            .collect();
        let header_name = config.header_name.as_deref().and_then(|name| HeaderName::from_bytes(name.as_bytes()).ok());
        let cluster = config.policy == "cluster";
        RateLimiting { id, config, windows, header_name, cluster }
    }

    fn identifier(&self, ctx: &Ctx, request: &RequestView<'_>) -> Identifier {
        let ip = || Identifier::Ip(ctx.client_ip);
        match self.config.limit_by.as_str() {
            "consumer" => ctx.consumer.as_ref().map_or_else(ip, |consumer| Identifier::Id(consumer.id)),
            "credential" => ctx.credential.map_or_else(ip, Identifier::Id),
            "service" => ctx.service.map_or_else(ip, Identifier::Id),
            "header" => self
                .header_name
                .as_ref()
                .and_then(|name| request.headers.get(name))
                .and_then(|value| value.to_str().ok())
                .map_or_else(ip, |value| Identifier::Text(value.to_string())),
            // Kong's get_identifier (kong/plugins/rate-limiting/handler.lua): requests
            // to the configured path share its counter; every other request counts
            // per client address (spec/03-plugins/23-rate-limiting/04-access_spec.lua:877).
            "path" => match &self.config.path {
                Some(path) if is_request_path(request.path, path) => Identifier::Text(path.clone()),
                _ => ip(),
            },
            _ => ip(),
        }
    }
}

/// Whether the request's path (as sent) is `configured`, once normalised as Kong's
/// `kong.request.get_path()` is (escapes decoded, dot segments and double slashes gone).
fn is_request_path(sent: &str, configured: &str) -> bool {
    sent == configured || crate::proxy::path::normalize(sent).is_some_and(|normal| normal == configured)
}

/// What one request found in one window: tokens left and seconds to the reset.
#[derive(Clone, Copy)]
struct Found {
    remaining: u64,
    reset: u64,
    /// This window refused the request.
    over: bool,
}

impl RateLimiting {
    /// `policy: local`: a counter per window on this node.
    fn count_local(&self, now_s: u64, identifier: &Identifier, env: &Env<'_>) -> [Option<Found>; RATE_WINDOWS_MAX] {
        let mut taken: [Option<(Arc<AtomicU64>, u64)>; RATE_WINDOWS_MAX] = [const { None }; RATE_WINDOWS_MAX];
        let mut exceeded = false;
        let mut found = [None; RATE_WINDOWS_MAX];
        for ((slot, found), window) in taken.iter_mut().zip(found.iter_mut()).zip(&self.windows) {
            let start_s = now_s - now_s % window.seconds;
            let key = CounterKey { plugin: self.id, identifier: identifier.clone(), window_s: window.seconds, start_s };
            let Some(counter) = env.counters.counter(key, now_s) else { continue };
            let used = counter.fetch_add(1, Ordering::Relaxed) + 1;
            exceeded |= used > window.limit;
            *found = Some(Found { remaining: 0, reset: start_s + window.seconds - now_s, over: used > window.limit });
            *slot = Some((counter, used));
        }
        for ((slot, found), window) in taken.iter().zip(found.iter_mut()).zip(&self.windows) {
            let (Some((counter, used)), Some(found)) = (slot, found) else { continue };
            // A refused request uses nothing: give back what was taken.
            if exceeded {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
            found.remaining = window.limit.saturating_sub((used - u64::from(exceeded)).min(window.limit));
        }
        found
    }

    /// `policy: cluster`: a token of this node's lease per window. `waited` is how the
    /// request's wait for grant rounds ended, when it already waited: `Some(true)` when
    /// every round answered, `Some(false)` when one failed or ran out of time.
    fn take_cluster(
        &self,
        now_ms: u64,
        identifier: &Identifier,
        env: &Env<'_>,
        waited: Option<bool>,
    ) -> Result<[Option<Found>; RATE_WINDOWS_MAX], Flow> {
        let now_s = now_ms / 1000;
        let subject = identifier.subject();
        let mut leases: [Option<Arc<crate::quota::Lease>>; RATE_WINDOWS_MAX] = [const { None }; RATE_WINDOWS_MAX];
        let mut takes = [None; RATE_WINDOWS_MAX];
        for ((lease, take), window) in leases.iter_mut().zip(takes.iter_mut()).zip(&self.windows) {
            let start_s = now_s - now_s % window.seconds;
            let key = QuotaKey {
                plugin: self.id,
                subject: subject.clone(),
                window_s: window.seconds,
                start_s: start_s as i64,
            };
            let Some(found) = env.quota.lease(&key, window.limit) else {
                *take = Some(Take::Empty);
                continue;
            };
            *take = Some(env.quota.take(&found, now_ms));
            *lease = Some(found);
        }
        let give_back = |leases: &[Option<Arc<crate::quota::Lease>>], takes: &[Option<Take>]| {
            for (lease, take) in leases.iter().zip(takes) {
                if let (Some(lease), Some(Take::Admitted { .. })) = (lease, take) {
                    lease.give_back();
                }
            }
        };
        let spent = takes.contains(&Some(Take::Spent));
        let empty = takes.contains(&Some(Take::Empty));
        let cut_off = env.quota.is_cut_off();
        if empty && !spent && waited.is_none() && !cut_off {
            // The first request of a key in a window here: wait for grant rounds.
            give_back(&leases, &takes);
            let waiting: Vec<_> = leases
                .iter()
                .zip(&takes)
                .filter(|(_, take)| **take == Some(Take::Empty))
                .filter_map(|(lease, _)| lease.clone())
                .collect();
            let quota = env.quota.clone();
            return Err(Flow::Verify(Box::pin(async move { quota.wait_for_tokens(&waiting).await.is_ok() })));
        }
        let mut fallback = false;
        // The local bound only where the ledger cannot be reached: cut off, or the
        // rounds this request waited for failed. A request whose rounds answered but
        // whose tokens went to concurrent requests is refused like any other over the
        // limit; admitting it would pass the limit with nothing failing.
        let unreachable = cut_off || waited == Some(false);
        if empty && !spent && unreachable && self.config.fault_tolerant {
            fallback = leases.iter().zip(&takes).all(|(lease, take)| match (lease, take) {
                (Some(lease), Some(Take::Empty)) => env.quota.take_fallback(lease),
                (None, Some(Take::Empty)) => false,
                _ => true,
            });
        }
        let admitted = !spent && (!empty || fallback);
        if !admitted {
            give_back(&leases, &takes);
        }
        metrics::counter!(if admitted { "tollgate_quota_admitted_total" } else { "tollgate_quota_rejected_total" })
            .increment(1);
        if fallback {
            metrics::counter!("tollgate_quota_fallback_total").increment(1);
        }
        let mut found = [None; RATE_WINDOWS_MAX];
        for (((found, take), lease), window) in found.iter_mut().zip(&takes).zip(&leases).zip(&self.windows) {
            let start_s = now_s - now_s % window.seconds;
            let reset = start_s + window.seconds - now_s;
            let (remaining, over) = match take {
                Some(Take::Admitted { remaining }) => (*remaining, false),
                Some(Take::Spent) => (0, true),
                _ => (lease.as_ref().map_or(0, |lease| lease.remaining()), !admitted),
            };
            *found = Some(Found { remaining, reset, over: over && !admitted });
        }
        Ok(found)
    }
}

impl Plugin for RateLimiting {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        let now = crate::clock::wall();
        let now_s = now.as_secs();
        let identifier = self.identifier(ctx, request);
        let found = if self.cluster {
            match self.take_cluster(now.as_millis() as u64, &identifier, env, ctx.verified) {
                Ok(found) => found,
                Err(flow) => return flow,
            }
        } else {
            self.count_local(now_s, &identifier, env)
        };
        let exceeded = found.iter().flatten().any(|found| found.over);
        let found = || self.windows.iter().zip(&found).filter_map(|(window, found)| Some((window, found.as_ref()?)));
        if !self.config.hide_client_headers {
            // RateLimit-*: the window closest to running out.
            if let Some((window, found)) = found().min_by_key(|(_, found)| found.remaining) {
                let headers = &mut ctx.response_headers;
                headers.push((HeaderName::from_static("ratelimit-limit"), window.limit_value.clone()));
                headers.push((HeaderName::from_static("ratelimit-remaining"), super::number_value(found.remaining)));
                headers.push((HeaderName::from_static("ratelimit-reset"), super::number_value(found.reset)));
            }
            for (window, found) in found() {
                ctx.response_headers.push((window.limit_header.clone(), window.limit_value.clone()));
                ctx.response_headers.push((window.remaining_header.clone(), super::number_value(found.remaining)));
            }
        }
        if exceeded {
            let reset = found().filter(|(_, found)| found.over).map(|(_, found)| found.reset).max();
            let status = StatusCode::from_u16(self.config.error_code).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            let mut exit = Exit::message(status, &self.config.error_message);
            // Kong sends `Retry-After` with the other client headers only
            // (spec/03-plugins/23-rate-limiting/04-access_spec.lua:678).
            if !self.config.hide_client_headers {
                exit.headers.push((http::header::RETRY_AFTER, super::number_value(reset.unwrap_or(1))));
            }
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
    /// `uuid#counter`: one uuid per plugin instance (made when the config compiles),
    /// then a counter.
    prefix: String,
    counter: AtomicU64,
}

impl CorrelationId {
    pub fn new(config: CorrelationIdConfig) -> Result<CorrelationId, String> {
        let header = HeaderName::from_bytes(config.header_name.as_bytes()).map_err(|error| error.to_string())?;
        Ok(CorrelationId { config, header, prefix: crate::env::uuid().to_string(), counter: AtomicU64::new(0) })
    }

    fn generate(&self, ctx: &Ctx) -> String {
        let sequence = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        match self.config.generator.as_str() {
            "uuid" => crate::env::uuid().to_string(),
            // Kong's tracker is nginx's `ip-port-pid-connection-requests-msec`; Tollgate
            // has no nginx connection numbers and sends `ip-pid-sequence-msec`.
            "tracker" => {
                let ms = crate::clock::wall().as_millis();
                format!("{}-{}-{sequence}-{ms}", ctx.client_ip, std::process::id())
            }
            _ => {
                use std::fmt::Write;
                let mut id = String::with_capacity(self.prefix.len() + 21);
                id.push_str(&self.prefix);
                let _ = write!(id, "#{sequence}");
                id
            }
        }
    }
}

impl Plugin for CorrelationId {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        let value = match request.headers.get(&self.header) {
            Some(value) => value.clone(),
            None => {
                let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(self.generate(ctx))) else {
                    return Flow::Continue;
                };
                request.headers.insert(self.header.clone(), value.clone());
                value
            }
        };
        if self.config.echo_downstream {
            // Unique per request: never indexed by HPACK on h2, as the proxy's own
            // request id (`lifecycle::request_id_value`).
            let mut echoed = value;
            echoed.set_sensitive(true);
            ctx.response_headers.push((self.header.clone(), echoed));
        }
        Flow::Continue
    }
}

/// request-size-limiting: `Content-Length` over the limit is 413 (417 with `Expect:
/// 100-continue`) before anything is read; a body without one is read whole first
/// and refused the same way, or, under a limit above [`super::BODY_FILTER_BYTES_MAX`],
/// cut at the limit as it streams.
pub struct RequestSizeLimiting {
    limit: u64,
    require_content_length: bool,
}

impl RequestSizeLimiting {
    pub fn new(config: RequestSizeLimitingConfig) -> RequestSizeLimiting {
        RequestSizeLimiting { limit: config.limit_bytes(), require_content_length: config.require_content_length }
    }
}

impl Plugin for RequestSizeLimiting {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        let declared = request
            .headers
            .get(http::header::CONTENT_LENGTH)
            .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
        // Kong's check_size (kong/plugins/request-size-limiting/handler.lua): 417 for a
        // client waiting on `Expect: 100-continue`, else 413
        // (spec/03-plugins/12-request-size-limiting/01-access_spec.lua:129, :234).
        let waits = request
            .headers
            .get(http::header::EXPECT)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("100-continue"));
        let exceeded = || {
            let status = if waits { StatusCode::EXPECTATION_FAILED } else { StatusCode::PAYLOAD_TOO_LARGE };
            Flow::Exit(Exit::message(status, "Request size limit exceeded"))
        };
        match declared {
            Some(Some(length)) if length > self.limit => exceeded(),
            Some(Some(_)) => Flow::Continue,
            _ if self.require_content_length && !request.headers.contains_key(http::header::TRANSFER_ENCODING) => {
                Flow::Exit(Exit::message(StatusCode::LENGTH_REQUIRED, "A valid Content-Length header is required"))
            }
            // A body without a length (chunked) is read whole before anything goes
            // upstream, as Kong buffers it, so the upstream never sees part of a body
            // that is refused. A limit above what plugins read whole is enforced while
            // the body streams instead.
            _ if self.limit <= super::BODY_FILTER_BYTES_MAX as u64 => match &ctx.request_body {
                None => Flow::ReadBody,
                Some(body) if body.len() as u64 > self.limit => exceeded(),
                Some(_) => Flow::Continue,
            },
            _ => {
                ctx.body_limit = Some(ctx.body_limit.map_or(self.limit, |limit| limit.min(self.limit)));
                Flow::Continue
            }
        }
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
