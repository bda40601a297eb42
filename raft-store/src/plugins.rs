//! Plugin configurations: Kong's field names and defaults, one typed struct per
//! plugin, checked when a plugin is written and stored with every default filled in
//! (as Kong's Admin API shows it). The data path deserializes the stored form into
//! the same structs once per snapshot, never per request.
//!
//! Errors name the field as `config.<path>` (`config.key_names[0]`); the Admin API
//! nests them as Kong's objects (`error.rs`).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod logging;
mod transform;

pub use logging::*;
pub use transform::*;

/// One bundled plugin, as everything else reads it: the Admin API's validation and
/// its `GET /plugins/enabled`, the order plugins run in, whether consumers need
/// indexing. Adding a plugin is one row here and one builder in the node (whose
/// tests check that every row has one). Names Kong bundles that are not here are
/// refused at write time: a plugin that was accepted but not enforced (an
/// authentication plugin, say) would be worse than an error.
pub struct PluginSpec {
    pub name: &'static str,
    /// Kong's priority: higher runs first.
    pub priority: i32,
    /// It identifies consumers: consumers and credentials are indexed for the data
    /// path only when such a plugin is configured.
    pub authenticates: bool,
    /// Checks a config and returns it with defaults filled in, or the failing field's
    /// path and why.
    normalize: fn(&Value) -> Result<Value, (String, String)>,
}

const fn spec(
    name: &'static str,
    priority: i32,
    authenticates: bool,
    normalize: fn(&Value) -> Result<Value, (String, String)>,
) -> PluginSpec {
    PluginSpec { name, priority, authenticates, normalize }
}

/// Every plugin this build runs, by Kong priority (highest first).
pub static PLUGINS: [PluginSpec; 18] = [
    spec("correlation-id", 100_001, false, typed::<CorrelationIdConfig>),
    spec("cors", 2000, false, typed::<CorsConfig>),
    spec("jwt", 1450, true, typed::<JwtConfig>),
    spec("key-auth", 1250, true, typed::<KeyAuthConfig>),
    spec("basic-auth", 1100, true, typed::<BasicAuthConfig>),
    spec("hmac-auth", 1030, true, typed::<HmacAuthConfig>),
    spec("ip-restriction", 990, false, typed::<IpRestrictionConfig>),
    spec("request-size-limiting", 951, false, typed::<RequestSizeLimitingConfig>),
    spec("acl", 950, false, typed::<AclConfig>),
    spec("rate-limiting", 910, false, typed::<RateLimitingConfig>),
    spec("request-transformer", 801, false, typed::<RequestTransformerConfig>),
    spec("response-transformer", 800, false, typed::<ResponseTransformerConfig>),
    spec("proxy-cache", 100, false, typed::<ProxyCacheConfig>),
    spec("opentelemetry", 14, false, typed::<OpenTelemetryConfig>),
    spec("prometheus", 13, false, typed::<PrometheusConfig>),
    spec("http-log", 12, false, typed::<HttpLogConfig>),
    spec("file-log", 9, false, typed::<FileLogConfig>),
    spec("request-termination", 2, false, typed::<RequestTerminationConfig>),
];

/// The plugin named `name`, when this build has it.
pub fn plugin(name: &str) -> Option<&'static PluginSpec> {
    PLUGINS.iter().find(|spec| spec.name == name)
}

/// Kong's answer to a plugin name it does not run (`name` field).
pub fn unknown_plugin(name: &str) -> String {
    format!("plugin '{name}' not enabled; add it to the 'plugins' configuration property")
}

/// Longest list in a plugin config (key names, groups, CIDRs).
pub const CONFIG_LIST_MAX: usize = 1024;

/// Checks `config` for plugin `name` and returns it with defaults filled in, or
/// errors by field (`config.<path>`, or `name` when the plugin is not available).
pub fn normalize(name: &str, config: &Value) -> Result<Value, BTreeMap<String, String>> {
    let Some(spec) = plugin(name) else {
        return Err(BTreeMap::from([("name".to_string(), unknown_plugin(name))]));
    };
    (spec.normalize)(config).map_err(|(path, message)| {
        let field = if path.is_empty() || path == "." || path == "config" {
            "config".to_string()
        } else {
            format!("config.{path}")
        };
        BTreeMap::from([(field, message)])
    })
}

/// Most repairs [`coerce_text`] makes to one config.
pub const TEXT_COERCIONS_MAX: usize = 256;

/// Types the text values of a form-encoded `config` (every value arrives as text) the
/// way plugin `name`'s config asks for them, as Kong types form arguments by schema:
/// the config is decoded, and where the decoder wanted a number, a boolean or a list
/// and found text, that text becomes one. A value that is none of those is left, and
/// the check that follows names its field.
pub fn coerce_text(name: &str, config: &mut Value) {
    let Some(spec) = plugin(name) else { return };
    for _ in 0..TEXT_COERCIONS_MAX {
        let Err((path, message)) = (spec.normalize)(config) else { return };
        let Some(at) = value_at(config, &path) else { return };
        let Value::String(text) = &*at else { return };
        let repaired = if message.contains("expected a sequence") {
            Value::Array(vec![Value::String(text.clone())])
        } else if message.contains("expected a boolean") {
            match text.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return,
            }
        } else if message.contains("expected u") || message.contains("expected i") {
            match text.parse::<i64>() {
                Ok(number) => Value::from(number),
                Err(_) => return,
            }
        } else if message.contains("expected f") {
            // An integer stays one, as it would be written in JSON.
            match text.parse::<i64>() {
                Ok(number) => Value::from(number),
                Err(_) => match text.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
                    Some(number) => Value::Number(number),
                    None => return,
                },
            }
        } else {
            return;
        };
        *at = repaired;
    }
}

/// The value at a `serde_path_to_error` path (`a.b[0].c`).
fn value_at<'v>(mut value: &'v mut Value, path: &str) -> Option<&'v mut Value> {
    for part in path.split('.').filter(|part| !part.is_empty() && *part != "?") {
        let (name, indexes) = part.split_once('[').map_or((part, ""), |(name, rest)| (name, rest));
        if !name.is_empty() {
            value = value.get_mut(name)?;
        }
        for index in indexes.split('[').filter(|i| !i.is_empty()) {
            value = value.get_mut(index.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(value)
}

/// A config's own rules beyond its types.
pub trait Check {
    /// `Err((field path, message))`.
    fn check(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

fn typed<T: DeserializeOwned + Serialize + Check>(config: &Value) -> Result<Value, (String, String)> {
    let parsed: T = serde_path_to_error::deserialize(config).map_err(|error| {
        let path = error.path().to_string();
        (path, error.into_inner().to_string())
    })?;
    parsed.check()?;
    serde_json::to_value(parsed).map_err(|error| (String::new(), error.to_string()))
}

fn fail<T>(field: &str, message: impl Into<String>) -> Result<T, (String, String)> {
    Err((field.to_string(), message.into()))
}

fn check_list(field: &str, items: &[String]) -> Result<(), (String, String)> {
    if items.len() > CONFIG_LIST_MAX {
        return fail(field, format!("length must be at most {CONFIG_LIST_MAX}"));
    }
    if let Some(position) = items.iter().position(|item| item.is_empty()) {
        return fail(&format!("{field}[{position}]"), "length must be at least 1");
    }
    Ok(())
}

/// key-auth (Kong priority 1250).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyAuthConfig {
    pub key_names: Vec<String>,
    pub hide_credentials: bool,
    /// A consumer id or username used when no key is sent or the key is unknown.
    pub anonymous: Option<String>,
    pub key_in_header: bool,
    pub key_in_query: bool,
    pub key_in_body: bool,
    pub run_on_preflight: bool,
    pub realm: Option<String>,
}

impl Default for KeyAuthConfig {
    fn default() -> Self {
        KeyAuthConfig {
            key_names: vec!["apikey".into()],
            hide_credentials: false,
            anonymous: None,
            key_in_header: true,
            key_in_query: true,
            key_in_body: false,
            run_on_preflight: true,
            realm: None,
        }
    }
}

impl Check for KeyAuthConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if self.key_names.is_empty() {
            return fail("key_names", "length must be at least 1");
        }
        check_list("key_names", &self.key_names)?;
        for (position, name) in self.key_names.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return fail(
                    &format!("key_names[{position}]"),
                    "bad header name, allowed characters are A-Z, a-z, 0-9, '_', and '-'",
                );
            }
        }
        Ok(())
    }
}

/// basic-auth (priority 1100).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BasicAuthConfig {
    pub anonymous: Option<String>,
    pub hide_credentials: bool,
    pub realm: String,
}

impl Default for BasicAuthConfig {
    fn default() -> Self {
        BasicAuthConfig { anonymous: None, hide_credentials: false, realm: "service".into() }
    }
}

impl Check for BasicAuthConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if self.realm.is_empty() || self.realm.contains('"') || http::HeaderValue::from_str(&self.realm).is_err() {
            return fail("realm", "a non-empty header-safe string without quotes");
        }
        Ok(())
    }
}

/// jwt (priority 1450).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    pub uri_param_names: Vec<String>,
    pub cookie_names: Vec<String>,
    pub header_names: Vec<String>,
    pub claims_to_verify: Vec<String>,
    pub key_claim_name: String,
    pub secret_is_base64: bool,
    pub anonymous: Option<String>,
    pub run_on_preflight: bool,
    /// Longest a token may live, in seconds (0: no limit); needs `exp` verified.
    pub maximum_expiration: u64,
    pub realm: Option<String>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            uri_param_names: vec!["jwt".into()],
            cookie_names: Vec::new(),
            header_names: vec!["authorization".into()],
            claims_to_verify: Vec::new(),
            key_claim_name: "iss".into(),
            secret_is_base64: false,
            anonymous: None,
            run_on_preflight: true,
            maximum_expiration: 0,
            realm: None,
        }
    }
}

impl Check for JwtConfig {
    fn check(&self) -> Result<(), (String, String)> {
        check_list("uri_param_names", &self.uri_param_names)?;
        check_list("cookie_names", &self.cookie_names)?;
        check_list("header_names", &self.header_names)?;
        for (position, name) in self.header_names.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return fail(&format!("header_names[{position}]"), "not a valid header name");
            }
        }
        if let Some(position) = self.claims_to_verify.iter().position(|c| c != "exp" && c != "nbf") {
            return fail(&format!("claims_to_verify[{position}]"), "expected one of: exp, nbf");
        }
        if self.key_claim_name.is_empty() {
            return fail("key_claim_name", "length must be at least 1");
        }
        if self.maximum_expiration > 31_536_000 {
            return fail("maximum_expiration", "value should be between 0 and 31536000");
        }
        if self.maximum_expiration > 0 && !self.claims_to_verify.iter().any(|c| c == "exp") {
            return fail("config", "expected 'exp' in claims_to_verify when maximum_expiration is set");
        }
        Ok(())
    }
}

/// hmac-auth (priority 1030).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HmacAuthConfig {
    pub hide_credentials: bool,
    /// Seconds a request's `Date`/`X-Date` may be off from the node's clock.
    pub clock_skew: u64,
    pub anonymous: Option<String>,
    pub validate_request_body: bool,
    /// Headers every signature must cover.
    pub enforce_headers: Vec<String>,
    pub algorithms: Vec<String>,
    pub realm: Option<String>,
}

impl Default for HmacAuthConfig {
    fn default() -> Self {
        HmacAuthConfig {
            hide_credentials: false,
            clock_skew: 300,
            anonymous: None,
            validate_request_body: false,
            enforce_headers: Vec::new(),
            algorithms: ["hmac-sha1", "hmac-sha256", "hmac-sha384", "hmac-sha512"].map(String::from).to_vec(),
            realm: None,
        }
    }
}

/// The algorithms hmac-auth knows.
pub const HMAC_ALGORITHMS: [&str; 4] = ["hmac-sha1", "hmac-sha256", "hmac-sha384", "hmac-sha512"];

impl Check for HmacAuthConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if self.clock_skew == 0 || self.clock_skew > 86_400 {
            return fail("clock_skew", "value should be between 1 and 86400");
        }
        check_list("enforce_headers", &self.enforce_headers)?;
        if self.algorithms.is_empty() {
            return fail("algorithms", "length must be at least 1");
        }
        if let Some(position) = self.algorithms.iter().position(|a| !HMAC_ALGORITHMS.contains(&a.as_str())) {
            return fail(
                &format!("algorithms[{position}]"),
                format!("expected one of: {}", HMAC_ALGORITHMS.join(", ")),
            );
        }
        Ok(())
    }
}

/// proxy-cache's response headers switches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheResponseHeaders {
    pub age: bool,
    #[serde(rename = "X-Cache-Status")]
    pub x_cache_status: bool,
    #[serde(rename = "X-Cache-Key")]
    pub x_cache_key: bool,
}

impl Default for CacheResponseHeaders {
    fn default() -> Self {
        CacheResponseHeaders { age: true, x_cache_status: true, x_cache_key: true }
    }
}

/// proxy-cache (priority 100) with the `memory` strategy: per node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyCacheConfig {
    pub response_code: Vec<u16>,
    pub request_method: Vec<String>,
    pub content_type: Vec<String>,
    pub cache_ttl: u64,
    pub strategy: String,
    pub cache_control: bool,
    pub ignore_uri_case: bool,
    pub storage_ttl: Option<u64>,
    pub vary_query_params: Option<Vec<String>>,
    pub vary_headers: Option<Vec<String>>,
    pub response_headers: CacheResponseHeaders,
}

impl Default for ProxyCacheConfig {
    fn default() -> Self {
        ProxyCacheConfig {
            response_code: vec![200, 301, 404],
            request_method: vec!["GET".into(), "HEAD".into()],
            content_type: vec!["text/plain".into(), "application/json".into()],
            cache_ttl: 300,
            strategy: "memory".into(),
            cache_control: false,
            ignore_uri_case: false,
            storage_ttl: None,
            vary_query_params: None,
            vary_headers: None,
            response_headers: CacheResponseHeaders::default(),
        }
    }
}

impl Check for ProxyCacheConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if self.strategy != "memory" {
            return fail("strategy", "expected one of: memory");
        }
        if self.response_code.is_empty() {
            return fail("response_code", "length must be at least 1");
        }
        if let Some(position) = self.response_code.iter().position(|code| !(100..=900).contains(code)) {
            return fail(&format!("response_code[{position}]"), "value should be between 100 and 900");
        }
        check_list("request_method", &self.request_method)?;
        if let Some(position) =
            self.request_method.iter().position(|m| !["GET", "HEAD", "POST", "PATCH", "PUT"].contains(&m.as_str()))
        {
            return fail(&format!("request_method[{position}]"), "expected one of: HEAD, GET, POST, PATCH, PUT");
        }
        check_list("content_type", &self.content_type)?;
        if self.cache_ttl == 0 {
            return fail("cache_ttl", "value must be greater than 0");
        }
        for (field, list) in [("vary_query_params", &self.vary_query_params), ("vary_headers", &self.vary_headers)] {
            if let Some(list) = list {
                check_list(field, list)?;
            }
        }
        Ok(())
    }
}

/// acl (priority 950): `allow` or `deny` groups, exactly one of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub hide_groups_header: bool,
    pub always_use_authenticated_groups: bool,
    pub include_consumer_groups: bool,
}

impl Check for AclConfig {
    fn check(&self) -> Result<(), (String, String)> {
        match (&self.allow, &self.deny) {
            (Some(_), Some(_)) | (None, None) => {
                fail("config", "exactly one of these fields must be non-empty: 'config.allow', 'config.deny'")
            }
            (Some(groups), None) => check_list("allow", groups),
            (None, Some(groups)) => check_list("deny", groups),
        }
    }
}

/// ip-restriction (priority 990): addresses or CIDRs, v4 and v6.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpRestrictionConfig {
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub status: Option<u16>,
    pub message: Option<String>,
}

impl Check for IpRestrictionConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if self.allow.as_ref().is_none_or(Vec::is_empty) && self.deny.as_ref().is_none_or(Vec::is_empty) {
            return fail("config", "at least one of these fields must be non-empty: 'config.allow', 'config.deny'");
        }
        for (field, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            let Some(list) = list else { continue };
            check_list(field, list)?;
            for (position, cidr) in list.iter().enumerate() {
                if parse_cidr(cidr).is_none() {
                    return fail(&format!("{field}[{position}]"), format!("invalid ip or cidr range: '{cidr}'"));
                }
            }
        }
        if let Some(status) = self.status {
            if !(100..=599).contains(&status) {
                return fail("status", "value should be between 100 and 599");
            }
        }
        Ok(())
    }
}

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a single address: (network, prefix length).
pub fn parse_cidr(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address: std::net::IpAddr = address.trim().parse().ok()?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(prefix) => prefix.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
        None => max,
    };
    Some((address, prefix))
}

/// request-termination (priority 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestTerminationConfig {
    pub status_code: u16,
    pub message: Option<String>,
    pub body: Option<String>,
    pub content_type: Option<String>,
    /// Only requests carrying this header or query argument are terminated.
    pub trigger: Option<String>,
    pub echo: bool,
}

impl Default for RequestTerminationConfig {
    fn default() -> Self {
        RequestTerminationConfig {
            status_code: 503,
            message: None,
            body: None,
            content_type: None,
            trigger: None,
            echo: false,
        }
    }
}

impl Check for RequestTerminationConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if !(100..=599).contains(&self.status_code) {
            return fail("status_code", "value should be between 100 and 599");
        }
        if self.message.is_some() && self.body.is_some() {
            return fail("config", "message cannot be used with content_type or body");
        }
        if self.content_type.is_some() && self.body.is_none() {
            return fail("content_type", "content_type requires a body");
        }
        if self.content_type.as_deref().is_some_and(|value| http::HeaderValue::from_str(value).is_err()) {
            return fail("content_type", "not a valid header value");
        }
        if self.trigger.as_deref().is_some_and(|name| http::HeaderName::from_bytes(name.as_bytes()).is_err()) {
            return fail("trigger", "not a valid header name");
        }
        Ok(())
    }
}

/// rate-limiting (priority 910). `policy: local` counts per node; `cluster` leases
/// tokens from the ledger in the Raft state machine (exact cluster-wide); `redis` needs
/// Redis, which Tollgate does not use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitingConfig {
    pub second: Option<f64>,
    pub minute: Option<f64>,
    pub hour: Option<f64>,
    pub day: Option<f64>,
    pub month: Option<f64>,
    pub year: Option<f64>,
    pub limit_by: String,
    pub header_name: Option<String>,
    pub path: Option<String>,
    pub policy: String,
    pub fault_tolerant: bool,
    pub hide_client_headers: bool,
    pub error_code: u16,
    pub error_message: String,
}

impl Default for RateLimitingConfig {
    fn default() -> Self {
        RateLimitingConfig {
            second: None,
            minute: None,
            hour: None,
            day: None,
            month: None,
            year: None,
            limit_by: "consumer".into(),
            header_name: None,
            path: None,
            policy: "local".into(),
            fault_tolerant: true,
            hide_client_headers: false,
            error_code: 429,
            error_message: "API rate limit exceeded".into(),
        }
    }
}

/// Kong's windows, shortest first, with their length in seconds (a month is 30 days,
/// a year 365, as Kong's fixed windows count them).
pub const RATE_WINDOWS: [(&str, u64); 6] =
    [("second", 1), ("minute", 60), ("hour", 3600), ("day", 86_400), ("month", 2_592_000), ("year", 31_536_000)];

impl RateLimitingConfig {
    /// The configured limits, shortest window first: (name, seconds, limit).
    pub fn limits(&self) -> Vec<(&'static str, u64, u64)> {
        let values = [self.second, self.minute, self.hour, self.day, self.month, self.year];
        RATE_WINDOWS
            .iter()
            .zip(values)
            .filter_map(|((name, seconds), limit)| limit.map(|limit| (*name, *seconds, limit as u64)))
            .collect()
    }
}

impl Check for RateLimitingConfig {
    fn check(&self) -> Result<(), (String, String)> {
        let values = [self.second, self.minute, self.hour, self.day, self.month, self.year];
        if values.iter().all(Option::is_none) {
            return fail(
                "config",
                "at least one of these fields must be non-empty: 'config.second', 'config.minute', 'config.hour', 'config.day', 'config.month', 'config.year'",
            );
        }
        let mut previous: Option<(&str, f64)> = None;
        for ((name, _), value) in RATE_WINDOWS.iter().zip(values) {
            let Some(value) = value else { continue };
            if !value.is_finite() || value < 0.0 {
                return fail(name, "value should be a number of at least 0");
            }
            if let Some((shorter, limit)) = previous {
                if value < limit {
                    return fail(
                        "config",
                        format!(
                            "the limit for {name}({value:.1}) cannot be lower than the limit for {shorter}({limit:.1})"
                        ),
                    );
                }
            }
            previous = Some((name, value));
        }
        const LIMIT_BY: [&str; 6] = ["consumer", "credential", "ip", "service", "header", "path"];
        if !LIMIT_BY.contains(&self.limit_by.as_str()) {
            return fail("limit_by", format!("expected one of: {}", LIMIT_BY.join(", ")));
        }
        if self.limit_by == "header" && self.header_name.as_deref().is_none_or(str::is_empty) {
            return fail("header_name", "required field missing when limit_by is 'header'");
        }
        if self.limit_by == "path" && self.path.as_deref().is_none_or(|path| !path.starts_with('/')) {
            return fail("path", "required field missing when limit_by is 'path' (a path starting with '/')");
        }
        match self.policy.as_str() {
            "local" | "cluster" => {}
            "redis" => return fail("policy", "Tollgate does not use Redis; use 'local'"),
            _ => return fail("policy", "expected one of: local, cluster"),
        }
        if !(400..=599).contains(&self.error_code) {
            return fail("error_code", "value should be between 400 and 599");
        }
        Ok(())
    }
}

/// correlation-id (priority 100001).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorrelationIdConfig {
    pub header_name: String,
    pub generator: String,
    pub echo_downstream: bool,
}

impl Default for CorrelationIdConfig {
    fn default() -> Self {
        CorrelationIdConfig {
            header_name: "Kong-Request-ID".into(),
            generator: "uuid#counter".into(),
            echo_downstream: false,
        }
    }
}

impl Check for CorrelationIdConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if http::HeaderName::from_bytes(self.header_name.as_bytes()).is_err() {
            return fail("header_name", "not a valid header name");
        }
        if !["uuid", "uuid#counter", "tracker"].contains(&self.generator.as_str()) {
            return fail("generator", "expected one of: uuid, uuid#counter, tracker");
        }
        Ok(())
    }
}

/// cors (priority 2000).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins, `*`, or regular expressions (an entry with a character outside
    /// `[A-Za-z0-9.:/-]`, as Kong tells them apart).
    pub origins: Option<Vec<String>>,
    pub headers: Option<Vec<String>>,
    pub exposed_headers: Option<Vec<String>>,
    /// Kong's schema gives a default but no `required`: an explicit `null` stays and
    /// the preflight answers with every method.
    pub methods: Option<Vec<String>>,
    pub max_age: Option<u64>,
    pub credentials: bool,
    pub private_network: bool,
    pub preflight_continue: bool,
    /// A response to a request without `Origin` (or an empty one) still gets the
    /// headers.
    pub allow_origin_absent: bool,
}

/// Kong's `Access-Control-Allow-Methods` default, and the methods `methods` may list.
pub const CORS_METHODS: [&str; 9] = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"];

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            origins: None,
            headers: None,
            exposed_headers: None,
            methods: Some(CORS_METHODS.map(String::from).to_vec()),
            max_age: None,
            credentials: false,
            private_network: false,
            preflight_continue: false,
            allow_origin_absent: true,
        }
    }
}

impl Check for CorsConfig {
    fn check(&self) -> Result<(), (String, String)> {
        for (field, list) in [
            ("origins", &self.origins),
            ("headers", &self.headers),
            ("exposed_headers", &self.exposed_headers),
            ("methods", &self.methods),
        ] {
            if let Some(list) = list {
                check_list(field, list)?;
            }
        }
        let methods = self.methods.as_deref().unwrap_or_default();
        if let Some(position) = methods.iter().position(|m| !CORS_METHODS.contains(&m.as_str())) {
            return fail(&format!("methods[{position}]"), format!("expected one of: {}", CORS_METHODS.join(", ")));
        }
        if let Some(origins) = &self.origins {
            for (position, origin) in origins.iter().enumerate() {
                if is_origin_pattern(origin) {
                    if let Err(error) = origin_regex(origin) {
                        return fail(
                            &format!("origins[{position}]"),
                            format!("not a valid regular expression: {error}"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a cors origin entry is a regular expression rather than an origin: Kong's
/// test, any character outside `[A-Za-z0-9.:/-]` (`*` alone is the wildcard). Only
/// such entries can fail to compile; the others are matched as normalised origins.
pub fn is_origin_pattern(origin: &str) -> bool {
    origin != "*" && origin.bytes().any(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'/' | b'-')))
}

/// Compiles a cors origin pattern as Kong runs it: a leading `^` dropped, `$` added
/// unless it ends with one, and matched from the start of the subject (Kong 0.x did
/// not anchor; patterns written for it keep working).
pub fn origin_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    let pattern = pattern.strip_prefix('^').unwrap_or(pattern);
    let end = if pattern.ends_with('$') { "" } else { "$" };
    regex::RegexBuilder::new(&format!("^(?:{pattern}{end})")).size_limit(ORIGIN_REGEX_BYTES_MAX).build()
}

/// Compiled size limit of one cors origin pattern.
pub const ORIGIN_REGEX_BYTES_MAX: usize = 64 * 1024;

/// request-size-limiting (priority 951).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestSizeLimitingConfig {
    pub allowed_payload_size: u64,
    pub size_unit: String,
    pub require_content_length: bool,
}

impl Default for RequestSizeLimitingConfig {
    fn default() -> Self {
        RequestSizeLimitingConfig {
            allowed_payload_size: 128,
            size_unit: "megabytes".into(),
            require_content_length: false,
        }
    }
}

impl RequestSizeLimitingConfig {
    pub fn limit_bytes(&self) -> u64 {
        let unit = match self.size_unit.as_str() {
            "bytes" => 1,
            "kilobytes" => 1024,
            _ => 1024 * 1024,
        };
        self.allowed_payload_size.saturating_mul(unit)
    }
}

impl Check for RequestSizeLimitingConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if !["megabytes", "kilobytes", "bytes"].contains(&self.size_unit.as_str()) {
            return fail("size_unit", "expected one of: megabytes, kilobytes, bytes");
        }
        if self.allowed_payload_size == 0 {
            return fail("allowed_payload_size", "value should be at least 1");
        }
        Ok(())
    }
}

/// prometheus (priority 13): Kong 3's switches, all off by default (the node's own
/// metrics are always on `/metrics`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrometheusConfig {
    pub per_consumer: bool,
    pub status_code_metrics: bool,
    pub latency_metrics: bool,
    pub bandwidth_metrics: bool,
    pub upstream_health_metrics: bool,
}

impl Check for PrometheusConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if self.upstream_health_metrics {
            return fail(
                "upstream_health_metrics",
                "upstream health metrics come with shared health checks; not available yet",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_are_filled_and_bad_fields_are_named() {
        let config = normalize("key-auth", &json!({})).unwrap();
        assert_eq!(config["key_names"], json!(["apikey"]));
        assert_eq!(config["key_in_header"], json!(true));

        let error = normalize("key-auth", &json!({"key_names": "apikey"})).unwrap_err();
        assert!(error.contains_key("config.key_names"), "{error:?}");
        let error = normalize("key-auth", &json!({"key_names": ["ok", "bad name"]})).unwrap_err();
        assert!(error.contains_key("config.key_names[1]"), "{error:?}");
        let error = normalize("key-auth", &json!({"surprise": 1})).unwrap_err();
        assert!(error.contains_key("config.surprise"), "{error:?}");

        let error = normalize("rate-limiting", &json!({"second": 10, "minute": 5})).unwrap_err();
        assert!(error["config"].contains("cannot be lower"), "{error:?}");
        let error = normalize("rate-limiting", &json!({"minute": 5, "policy": "redis"})).unwrap_err();
        assert!(error.contains_key("config.policy"), "{error:?}");
        assert!(normalize("rate-limiting", &json!({})).is_err());

        let error = normalize("ip-restriction", &json!({"allow": ["10.0.0.0/33"]})).unwrap_err();
        assert!(error.contains_key("config.allow[0]"), "{error:?}");
        assert!(normalize("ip-restriction", &json!({"deny": ["::1", "10.0.0.0/8"]})).is_ok());

        let error = normalize("acl", &json!({"allow": ["a"], "deny": ["b"]})).unwrap_err();
        assert!(error.contains_key("config"), "{error:?}");
        let error = normalize("request-termination", &json!({"status_code": 99})).unwrap_err();
        assert!(error.contains_key("config.status_code"), "{error:?}");
        let error = normalize("aws-lambda", &json!({})).unwrap_err();
        assert!(error["name"].contains("'aws-lambda' not enabled"), "{error:?}");
    }

    #[test]
    fn request_transformer_templates_outside_the_grammar_are_refused_by_field() {
        // spec/03-plugins/36-request-transformer/02-access_spec.lua: routes 10-18 take
        // these; 13 and 19 fail in Kong per request (500), here when written.
        let accepted = json!({
            "add": {"querystring": ["uri_param1:$(uri_captures.user1)", "q:$(uri_captures.x or 'default1')"],
                    "headers": ["x-test-header:$(query_params.q1)", "x-h:$(headers['x-remove-header'])"]},
            "replace": {"uri": "/requests$(uri_captures[0])", "querystring": ["q2:$(headers['x-replace-header'])"]},
            "append": {"body": ["b:$('$(uri_captures.user1)')"]},
            "rename": {"querystring": ["a:$(query_params.to)"]}
        });
        assert!(normalize("request-transformer", &accepted).is_ok());
        assert!(normalize("request-transformer", &json!({"replace": {"uri": "$(uri_captures[0])"}})).is_ok());
        let refused = |config: Value, field: &str| {
            let error = normalize("request-transformer", &config).unwrap_err();
            assert!(error.contains_key(field), "{field}: {error:?}");
        };
        refused(json!({"replace": {"uri": "/requests/user2/$(10 * uri_captures.user1)"}}), "config.replace.uri");
        refused(json!({"add": {"querystring": ["q1:$(ERROR())"]}}), "config.add.querystring[0]");
        refused(json!({"add": {"querystring": ["ok:1", "s:$(shared.my_version)"]}}), "config.add.querystring[1]");
        refused(json!({"add": {"headers": ["x:$(foo(headers[\"User-Agent\"]))"]}}), "config.add.headers[0]");
        refused(json!({"append": {"body": ["p:$(headers.a.b)"]}}), "config.append.body[0]");
        refused(json!({"add": {"body": ["p1:"]}}), "config.add.body[0]");
        refused(json!({"rename": {"headers": ["a:$(headers.b)"]}}), "config.rename.headers[0]");
        refused(json!({"replace": {"uri": "relative"}}), "config.replace.uri");
        assert_eq!(split_entry("h2:value:2"), Some(("h2", "value:2")));
        assert_eq!(split_entry("a::b"), Some(("a", "b")));
        assert_eq!(split_entry("no-colon"), None);
    }

    /// Kong's cors schema: `methods` defaults but may be `null`, `allow_origin_absent`
    /// defaults to true, and only entries with regex characters are compiled.
    #[test]
    fn cors_keeps_kongs_defaults_nulls_and_origin_kinds() {
        let config = normalize("cors", &json!({})).unwrap();
        assert_eq!(config["methods"].as_array().map(Vec::len), Some(9));
        assert_eq!(config["allow_origin_absent"], json!(true));
        let config = normalize("cors", &json!({"methods": null, "allow_origin_absent": false})).unwrap();
        assert_eq!(config["methods"], Value::Null);
        assert_eq!(config["allow_origin_absent"], json!(false));
        let error = normalize("cors", &json!({"origins": ["ok.test", "https://(unclosed"]})).unwrap_err();
        assert!(error.contains_key("config.origins[1]"), "{error:?}");
        assert!(!is_origin_pattern("https://bar.test:1234") && !is_origin_pattern("*"));
        assert!(is_origin_pattern("foo\\.test") && is_origin_pattern("foo_bar.test"));
        let regex = origin_regex("^http://(.*[.])?foo\\.test(:(80|90))?$").unwrap();
        assert!(regex.is_match("http://a.foo.test:90") && !regex.is_match("http://foo.test:8000"));
        // Anchored at the start, as Kong's `a` flag: no match inside the subject.
        assert!(!origin_regex("foo\\.test").unwrap().is_match("evilfoo.test"));
    }

    /// The plugins `{}` is not a whole config of.
    const REQUIRING_CONFIG: [&str; 6] =
        ["acl", "file-log", "http-log", "ip-restriction", "opentelemetry", "rate-limiting"];

    #[test]
    fn the_registry_is_in_priority_order_and_every_default_config_normalizes() {
        let priorities: Vec<i32> = PLUGINS.iter().map(|spec| spec.priority).collect();
        let mut sorted = priorities.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(priorities, sorted);
        let names: std::collections::HashSet<&str> = PLUGINS.iter().map(|spec| spec.name).collect();
        assert_eq!(names.len(), PLUGINS.len(), "one row per name");
        // Plugins whose config has a required field: the rest take `{}`.
        let mut required: Vec<&str> =
            PLUGINS.iter().filter(|spec| normalize(spec.name, &json!({})).is_err()).map(|spec| spec.name).collect();
        required.sort();
        assert_eq!(required, REQUIRING_CONFIG);
    }
}
