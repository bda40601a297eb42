//! Observability plugins: prometheus.

use std::sync::RwLock;

use metrics::{Counter, Histogram};
use tollgate_raft_store::plugins::PrometheusConfig;

use super::{Ctx, IdMap, LogSummary, Phases, Plugin};
use crate::text::hex;

/// Metric handles one prometheus instance caches (by service, route, status and
/// consumer); past this, new label sets are recorded without caching their handle.
pub const PROMETHEUS_CACHED_SERIES_MAX: usize = 10_000;

/// prometheus: Kong's metric names on the node's `/metrics`, recorded in the log phase
/// from handles cached per label set, so a request costs a map lookup and atomics.
pub struct Prometheus {
    config: PrometheusConfig,
    requests: RwLock<IdMap<(Scope, u16, bool), Counter>>,
    latencies: RwLock<IdMap<Scope, [Histogram; 3]>>,
    bandwidth: RwLock<IdMap<Scope, Counter>>,
}

/// Route, service and (with `per_consumer`) consumer of a request: the cache key. The
/// cache lives in the plugin instance, which is rebuilt with every config change, so
/// a renamed route gets its new label.
type Scope = (Option<uuid::Uuid>, Option<uuid::Uuid>, Option<uuid::Uuid>);

impl Prometheus {
    pub fn new(config: PrometheusConfig) -> Prometheus {
        Prometheus { config, requests: RwLock::default(), latencies: RwLock::default(), bandwidth: RwLock::default() }
    }
}

/// Hands `use_it` the cached handle for `key`, made by `make` the first time; the
/// handle is used under the read lock, not cloned.
fn with_cached<K: std::hash::Hash + Eq + Clone, V>(
    cache: &RwLock<IdMap<K, V>>,
    key: &K,
    make: impl FnOnce() -> V,
    use_it: impl FnOnce(&V),
) {
    if let Ok(cache) = cache.read() {
        if let Some(value) = cache.get(key) {
            use_it(value);
            return;
        }
    }
    let value = make();
    use_it(&value);
    if let Ok(mut cache) = cache.write() {
        if cache.len() < PROMETHEUS_CACHED_SERIES_MAX {
            cache.insert(key.clone(), value);
        }
    }
}

impl Plugin for Prometheus {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn log(&self, ctx: &Ctx, summary: &LogSummary<'_>, _state: &super::NodeState) {
        let consumer_id = if self.config.per_consumer { ctx.consumer.as_ref().map(|c| c.id) } else { None };
        let scope: Scope = (ctx.route, ctx.service, consumer_id);
        // Label values, only built when a handle is made.
        let consumer = || {
            ctx.consumer.as_ref().map(|c| c.username.clone().unwrap_or_else(|| c.id.to_string())).unwrap_or_default()
        };
        let base = || {
            let mut labels = vec![
                ("service", summary.service.to_string()),
                ("route", summary.route.to_string()),
                ("workspace", "default".to_string()),
            ];
            if self.config.per_consumer {
                labels.push(("consumer", consumer()));
            }
            labels
        };
        if self.config.status_code_metrics {
            let key = (scope, summary.status, summary.from_upstream);
            let make = || {
                let mut labels = base();
                labels.push(("code", summary.status.to_string()));
                labels.push(("source", if summary.from_upstream { "service" } else { "kong" }.to_string()));
                metrics::counter!("kong_http_requests_total", &labels)
            };
            with_cached(&self.requests, &key, make, |counter| counter.increment(1));
        }
        if self.config.latency_metrics {
            let make = || {
                let labels = base();
                [
                    metrics::histogram!("kong_request_latency_ms", &labels),
                    metrics::histogram!("kong_upstream_latency_ms", &labels),
                    metrics::histogram!("kong_kong_latency_ms", &labels),
                ]
            };
            with_cached(&self.latencies, &scope, make, |[total, upstream, kong]| {
                total.record(summary.latency_ms);
                let proxy_ms = summary.upstream_ms.map_or(summary.latency_ms, |upstream| summary.latency_ms - upstream);
                if let Some(upstream_ms) = summary.upstream_ms {
                    upstream.record(upstream_ms);
                }
                kong.record(proxy_ms.max(0.0));
            });
        }
        if self.config.bandwidth_metrics {
            if let Some(bytes) = summary.response_bytes {
                let make = || {
                    let mut labels = base();
                    labels.push(("direction", "egress".to_string()));
                    metrics::counter!("kong_bandwidth_bytes", &labels)
                };
                with_cached(&self.bandwidth, &scope, make, |counter| counter.increment(bytes));
            }
        }
    }
}

/// W3C trace context of one request: the trace, our span, its parent, and whether it
/// is sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub sampled: bool,
}

/// Parses `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; all-zero ids are
/// invalid (W3C).
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    let bytes = |text: &str, out: &mut [u8]| -> Option<()> {
        for (index, slot) in out.iter_mut().enumerate() {
            *slot = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
        }
        Some(())
    };
    let mut trace_id = [0u8; 16];
    let mut parent_id = [0u8; 8];
    bytes(trace, &mut trace_id)?;
    bytes(parent, &mut parent_id)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags & 1 == 1))
}

/// opentelemetry (priority 14).
pub struct OpenTelemetry {
    config: tollgate_raft_store::plugins::OpenTelemetryConfig,
    queue_config: tollgate_raft_store::plugins::HttpLogConfig,
    resource: String,
}

impl OpenTelemetry {
    pub fn new(config: tollgate_raft_store::plugins::OpenTelemetryConfig) -> OpenTelemetry {
        let queue_config = tollgate_raft_store::plugins::HttpLogConfig {
            http_endpoint: config.endpoint.clone(),
            headers: config.headers.clone(),
            timeout: config.send_timeout,
            queue: tollgate_raft_store::plugins::LogQueueConfig {
                max_batch_size: config.batch_span_count,
                max_coalescing_delay: config.batch_flush_delay,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut attributes = vec![serde_json::json!({"key": "service.name", "value": {"stringValue": "tollgate"}})];
        for (key, value) in &config.resource_attributes {
            attributes.retain(|a| a["key"] != key.as_str());
            attributes.push(serde_json::json!({"key": key, "value": {"stringValue": value}}));
        }
        let resource = serde_json::json!({ "attributes": attributes }).to_string();
        OpenTelemetry { config, queue_config, resource }
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let random = crate::env::uuid();
    let source = random.as_bytes();
    bytes.copy_from_slice(&source[..N]);
    bytes
}

impl Plugin for OpenTelemetry {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut super::RequestView<'_>, _env: &super::Env<'_>) -> super::Flow {
        let incoming = request.headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
        let (trace_id, parent_id, sampled) = match incoming {
            Some((trace_id, parent_id, sampled)) => (trace_id, Some(parent_id), sampled),
            None => {
                let draw = f64::from(u32::from_be_bytes(random::<4>())) / f64::from(u32::MAX);
                (random::<16>(), None, draw < self.config.sampling_rate)
            }
        };
        let trace = Trace { trace_id, span_id: random::<8>(), parent_id, sampled };
        // The upstream's parent is this proxy's span.
        let value =
            format!("00-{}-{}-{}", hex(&trace.trace_id), hex(&trace.span_id), if sampled { "01" } else { "00" });
        if let Ok(value) = http::HeaderValue::from_str(&value) {
            request.headers.insert(http::HeaderName::from_static("traceparent"), value);
        }
        ctx.trace = Some(trace);
        super::Flow::Continue
    }

    fn log(&self, ctx: &Ctx, summary: &LogSummary<'_>, state: &super::NodeState) {
        let Some(trace) = ctx.trace.as_ref().filter(|trace| trace.sampled) else { return };
        let end_ns = crate::clock::wall().as_nanos();
        let start_ns = end_ns.saturating_sub((summary.latency_ms * 1e6) as u128);
        let attribute = |key: &str, value: serde_json::Value| serde_json::json!({ "key": key, "value": value });
        let mut attributes = vec![
            attribute("http.method", serde_json::json!({ "stringValue": ctx.method.as_str() })),
            attribute("http.status_code", serde_json::json!({ "intValue": summary.status.to_string() })),
            attribute("net.peer.ip", serde_json::json!({ "stringValue": ctx.client_ip.to_string() })),
            attribute("http.route", serde_json::json!({ "stringValue": summary.route })),
            attribute("kong.service.name", serde_json::json!({ "stringValue": summary.service })),
        ];
        if let Some(consumer) = &ctx.consumer {
            attributes.push(attribute("kong.consumer", serde_json::json!({ "stringValue": consumer.id.to_string() })));
        }
        let span = serde_json::json!({
            "traceId": hex(&trace.trace_id),
            "spanId": hex(&trace.span_id),
            "parentSpanId": trace.parent_id.map(|id| hex(&id)).unwrap_or_default(),
            "name": "kong",
            "kind": 2,
            "startTimeUnixNano": start_ns.to_string(),
            "endTimeUnixNano": end_ns.to_string(),
            "attributes": attributes,
            "status": { "code": if summary.status >= 500 { 2 } else { 0 } },
        });
        let wrap = super::logging::Wrap::Otlp { resource: self.resource.clone() };
        let Some(queue) = state.logs.http_queue(&self.queue_config, wrap) else {
            return super::logging::dropped("opentelemetry");
        };
        if queue.try_send(span.to_string()).is_err() {
            super::logging::dropped("opentelemetry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_per_w3c() {
        let (trace, parent, sampled) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&parent), "00f067aa0ba902b7");
        assert!(sampled);
        assert_eq!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
        assert_eq!(parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), None);
        assert_eq!(parse_traceparent("00-4bf92f35-00f067aa0ba902b7-01"), None);
        assert!(!parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().2);
    }
}
