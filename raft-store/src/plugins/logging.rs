//! file-log's, http-log's and opentelemetry's configurations.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::{fail, Check};

/// file-log (priority 9): one JSON line per request appended to `path`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileLogConfig {
    pub path: String,
    pub reopen: bool,
}

impl Check for FileLogConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if !self.path.starts_with('/') || self.path.contains("..") || self.path.len() > 4096 {
            return fail("path", "an absolute path without '..'");
        }
        Ok(())
    }
}

/// http-log's queue (Kong 3's names; batching by count and delay).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogQueueConfig {
    pub max_batch_size: u32,
    /// Seconds an entry may wait for a batch to fill.
    pub max_coalescing_delay: f64,
    pub max_entries: u32,
    pub max_retry_time: f64,
}

impl Default for LogQueueConfig {
    fn default() -> Self {
        LogQueueConfig { max_batch_size: 1, max_coalescing_delay: 1.0, max_entries: 10_000, max_retry_time: 60.0 }
    }
}

/// http-log (priority 12): JSON entries POSTed in batches to `http_endpoint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLogConfig {
    pub http_endpoint: String,
    pub method: String,
    pub content_type: String,
    /// Milliseconds.
    pub timeout: u64,
    pub keepalive: u64,
    pub headers: BTreeMap<String, String>,
    pub queue: LogQueueConfig,
}

impl Default for HttpLogConfig {
    fn default() -> Self {
        HttpLogConfig {
            http_endpoint: String::new(),
            method: "POST".into(),
            content_type: "application/json".into(),
            timeout: 10_000,
            keepalive: 60_000,
            headers: BTreeMap::new(),
            queue: LogQueueConfig::default(),
        }
    }
}

impl Check for HttpLogConfig {
    fn check(&self) -> Result<(), (String, String)> {
        let Ok(uri) = self.http_endpoint.parse::<http::Uri>() else {
            return fail("http_endpoint", "not a valid URL");
        };
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return fail("http_endpoint", "https endpoints are not supported yet; use http"),
            _ => return fail("http_endpoint", "expected an http:// URL"),
        }
        if uri.host().is_none() {
            return fail("http_endpoint", "missing host");
        }
        if !["POST", "PUT", "PATCH"].contains(&self.method.as_str()) {
            return fail("method", "expected one of: POST, PUT, PATCH");
        }
        if self.content_type != "application/json" {
            return fail("content_type", "expected application/json");
        }
        if !(1..=600_000).contains(&self.timeout) {
            return fail("timeout", "value should be between 1 and 600000");
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() || http::HeaderValue::from_str(value).is_err() {
                return fail(&format!("headers.{name}"), "not a valid header");
            }
        }
        let queue = &self.queue;
        if !(1..=1000).contains(&queue.max_batch_size) {
            return fail("queue.max_batch_size", "value should be between 1 and 1000");
        }
        if !(1..=1_000_000).contains(&queue.max_entries) {
            return fail("queue.max_entries", "value should be between 1 and 1000000");
        }
        if !(0.0..=3600.0).contains(&queue.max_coalescing_delay) {
            return fail("queue.max_coalescing_delay", "value should be between 0 and 3600");
        }
        if !(0.0..=86_400.0).contains(&queue.max_retry_time) {
            return fail("queue.max_retry_time", "value should be between 0 and 86400");
        }
        Ok(())
    }
}

/// opentelemetry (priority 14): W3C `traceparent` propagation and one span per
/// request exported over OTLP/HTTP (JSON encoding), batched.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenTelemetryConfig {
    /// The collector's traces URL (`http://collector:4318/v1/traces`).
    pub endpoint: String,
    pub headers: BTreeMap<String, String>,
    pub resource_attributes: BTreeMap<String, String>,
    pub batch_span_count: u32,
    /// Seconds a span may wait for a batch to fill.
    pub batch_flush_delay: f64,
    /// Milliseconds.
    pub send_timeout: u64,
    /// `preserve` keeps an incoming `traceparent`'s trace; `w3c` does too (the only
    /// propagation format here); others Kong knows are refused.
    pub header_type: String,
    /// Share of requests without an incoming sampled trace that are traced, 0 to 1.
    pub sampling_rate: f64,
}

impl Default for OpenTelemetryConfig {
    fn default() -> Self {
        OpenTelemetryConfig {
            endpoint: String::new(),
            headers: BTreeMap::new(),
            resource_attributes: BTreeMap::new(),
            batch_span_count: 200,
            batch_flush_delay: 3.0,
            send_timeout: 5000,
            header_type: "preserve".into(),
            sampling_rate: 1.0,
        }
    }
}

impl Check for OpenTelemetryConfig {
    fn check(&self) -> Result<(), (String, String)> {
        let Ok(uri) = self.endpoint.parse::<http::Uri>() else { return fail("endpoint", "not a valid URL") };
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return fail("endpoint", "expected an http:// URL (https is not supported yet)");
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() || http::HeaderValue::from_str(value).is_err() {
                return fail(&format!("headers.{name}"), "not a valid header");
            }
        }
        if !(1..=10_000).contains(&self.batch_span_count) {
            return fail("batch_span_count", "value should be between 1 and 10000");
        }
        if !(0.0..=3600.0).contains(&self.batch_flush_delay) {
            return fail("batch_flush_delay", "value should be between 0 and 3600");
        }
        if !(1..=600_000).contains(&self.send_timeout) {
            return fail("send_timeout", "value should be between 1 and 600000");
        }
        if !["preserve", "w3c"].contains(&self.header_type.as_str()) {
            return fail("header_type", "expected one of: preserve, w3c");
        }
        if !(0.0..=1.0).contains(&self.sampling_rate) {
            return fail("sampling_rate", "value should be between 0 and 1");
        }
        Ok(())
    }
}
