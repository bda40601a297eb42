//! Observability plugins: prometheus.

use std::collections::HashMap;
use std::sync::RwLock;

use metrics::{Counter, Histogram};
use tollgate_raft_store::plugins::PrometheusConfig;

use super::{Ctx, LogSummary, Plugin};

/// Metric handles one prometheus instance caches (by service, route, status and
/// consumer); past this, new label sets are recorded without caching their handle.
pub const PROMETHEUS_CACHED_SERIES_MAX: usize = 10_000;

/// prometheus: Kong's metric names on the node's `/metrics`, recorded in the log phase
/// from handles cached per label set, so a request costs a map lookup and atomics.
pub struct Prometheus {
    config: PrometheusConfig,
    requests: RwLock<HashMap<(Scope, u16, bool), Counter>>,
    latencies: RwLock<HashMap<Scope, [Histogram; 3]>>,
    bandwidth: RwLock<HashMap<Scope, Counter>>,
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

/// The cached handle for `key`, made by `make` the first time.
fn cached<K: std::hash::Hash + Eq + Clone, V: Clone>(
    cache: &RwLock<HashMap<K, V>>,
    key: &K,
    make: impl FnOnce() -> V,
) -> V {
    if let Some(value) = cache.read().ok().and_then(|cache| cache.get(key).cloned()) {
        return value;
    }
    let value = make();
    if let Ok(mut cache) = cache.write() {
        if cache.len() < PROMETHEUS_CACHED_SERIES_MAX {
            cache.insert(key.clone(), value.clone());
        }
    }
    value
}

impl Plugin for Prometheus {
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
            let counter = cached(&self.requests, &(scope, summary.status, summary.from_upstream), || {
                let mut labels = base();
                labels.push(("code", summary.status.to_string()));
                labels.push(("source", if summary.from_upstream { "service" } else { "kong" }.to_string()));
                metrics::counter!("kong_http_requests_total", &labels)
            });
            counter.increment(1);
        }
        if self.config.latency_metrics {
            let [total, upstream, kong] = cached(&self.latencies, &scope, || {
                let labels = base();
                [
                    metrics::histogram!("kong_request_latency_ms", &labels),
                    metrics::histogram!("kong_upstream_latency_ms", &labels),
                    metrics::histogram!("kong_kong_latency_ms", &labels),
                ]
            });
            total.record(summary.latency_ms);
            let proxy_ms = summary.upstream_ms.map_or(summary.latency_ms, |upstream| summary.latency_ms - upstream);
            if let Some(upstream_ms) = summary.upstream_ms {
                upstream.record(upstream_ms);
            }
            kong.record(proxy_ms.max(0.0));
        }
        if self.config.bandwidth_metrics {
            if let Some(bytes) = summary.response_bytes {
                let counter = cached(&self.bandwidth, &scope, || {
                    let mut labels = base();
                    labels.push(("direction", "egress".to_string()));
                    metrics::counter!("kong_bandwidth_bytes", &labels)
                });
                counter.increment(bytes);
            }
        }
    }
}
