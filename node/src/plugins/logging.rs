//! Logging plugins: file-log and http-log.
//!
//! The entry is Kong's basic log serializer's shape: `request` (method, uri, url,
//! querystring, size, headers), `response` (status, size), `latencies` (request,
//! proxy, kong), `client_ip`, `started_at`, `route`, `service`, `consumer`.
//! Credentials never appear: `Authorization`, `Proxy-Authorization`, `Cookie`, any
//! header or query argument whose name contains `key`, `token`, `secret`, `password`,
//! `signature`, `auth` or `jwt`, and every name an authentication plugin of the config
//! reads a credential from (key-auth `key_names`, jwt `uri_param_names`,
//! `cookie_names`, `header_names`, whatever they are called) is logged as `REDACTED`
//! (Kong redacts only the authorization headers).
//!
//! Nothing here waits on the request path: entries go through bounded queues to a
//! writer thread (file-log) or to a sender task on the node's logging thread
//! (http-log, batched); a full queue drops the entry and counts it in
//! `tollgate_plugin_log_dropped_total{plugin}`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};
use tollgate_raft_store::plugins::{FileLogConfig, HttpLogConfig};

use super::{Ctx, Env, Flow, LogSummary, NodeState, Phases, Plugin, RequestView};

/// Lines file-log may queue before dropping.
pub const FILE_LOG_QUEUE_MAX: usize = 64 * 1024;
/// Files file-log keeps open at once; past this they are closed and reopened on use.
pub const FILE_LOG_FILES_MAX: usize = 64;
/// Distinct http-log endpoints (and settings) a node sends to.
pub const HTTP_LOG_SINKS_MAX: usize = 64;

const SENSITIVE: [&str; 7] = ["key", "token", "secret", "password", "signature", "auth", "jwt"];

/// Whether a header or query argument `name` holds a credential: by its name, or
/// because an authentication plugin reads one from it (`credential_names`, lower case).
fn sensitive(name: &str, credential_names: &std::collections::HashSet<String>) -> bool {
    let name = name.to_ascii_lowercase();
    name == "cookie" || SENSITIVE.iter().any(|word| name.contains(word)) || credential_names.contains(&name)
}

/// The request half of an entry, taken in the access phase.
fn request_entry(request: &RequestView<'_>, env: &Env<'_>) -> Value {
    let credential_names = &env.data.credential_names;
    let headers: serde_json::Map<String, Value> = request
        .headers
        .iter()
        .map(|(name, value)| {
            let sensitive = sensitive(name.as_str(), credential_names);
            let value = if sensitive { "REDACTED" } else { value.to_str().unwrap_or("") };
            (name.to_string(), Value::from(value))
        })
        .collect();
    let querystring: serde_json::Map<String, Value> = request
        .query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = super::auth::percent_decode(name);
            let value = if sensitive(&decoded, credential_names) { "REDACTED" } else { value };
            (name.to_string(), Value::from(value))
        })
        .collect();
    let size = request.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    json!({
        "method": request.method.as_str(),
        "uri": request.path,
        "querystring": querystring,
        "size": size.unwrap_or(0),
        "headers": headers,
    })
}

/// The whole entry, in the log phase.
fn entry(ctx: &Ctx, summary: &LogSummary<'_>) -> String {
    let now_ms = crate::clock::wall().as_millis() as u64;
    let proxy_ms = summary.upstream_ms.map_or(summary.latency_ms, |upstream| summary.latency_ms - upstream);
    json!({
        "request": ctx.log_request.clone().unwrap_or(Value::Null),
        "response": { "status": summary.status, "size": summary.response_bytes },
        "latencies": {
            "request": summary.latency_ms.round() as u64,
            "proxy": summary.upstream_ms.map(|ms| ms.round() as u64),
            "kong": proxy_ms.max(0.0).round() as u64,
        },
        "client_ip": ctx.client_ip.to_string(),
        "started_at": now_ms.saturating_sub(summary.latency_ms as u64),
        "route": { "id": ctx.route, "name": summary.route },
        "service": { "id": ctx.service, "name": summary.service },
        "consumer": ctx.consumer.as_ref().map(|c| json!({ "id": c.id, "username": c.username })),
    })
    .to_string()
}

pub fn dropped(plugin: &'static str) {
    metrics::counter!("tollgate_plugin_log_dropped_total", "plugin" => plugin).increment(1);
}

/// One file-log line: the file, whether to reopen it, the line.
type FileLine = (Arc<str>, bool, String);

/// The node's log outlets, started when first used.
#[derive(Default)]
pub struct LogSinks {
    files: OnceLock<Option<SyncSender<FileLine>>>,
    runtime: OnceLock<Option<tokio::runtime::Handle>>,
    http: RwLock<HashMap<String, tokio::sync::mpsc::Sender<String>>>,
}

impl LogSinks {
    fn file_queue(&self) -> Option<&SyncSender<FileLine>> {
        self.files
            .get_or_init(|| {
                let (queue, lines) = sync_channel::<FileLine>(FILE_LOG_QUEUE_MAX);
                let spawned = std::thread::Builder::new().name("file-log".into()).spawn(move || {
                    let mut open: HashMap<Arc<str>, std::io::BufWriter<std::fs::File>> = HashMap::new();
                    while let Ok(first) = lines.recv() {
                        // Write what is queued, then flush once: bursts cost few writes.
                        let mut next = Some(first);
                        while let Some((path, reopen, line)) = next.take() {
                            write_line(&mut open, path, reopen, &line);
                            next = lines.try_recv().ok();
                        }
                        for writer in open.values_mut() {
                            let _ = writer.flush();
                        }
                    }
                });
                spawned.ok().map(|_| queue)
            })
            .as_ref()
    }

    fn runtime(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime
            .get_or_init(|| {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                let handle = runtime.handle().clone();
                std::thread::Builder::new()
                    .name("http-log".into())
                    .spawn(move || runtime.block_on(std::future::pending::<()>()))
                    .ok()?;
                Some(handle)
            })
            .as_ref()
    }

    /// The queue of an endpoint's sender task, started on first use. `wrap` makes a
    /// request body of a batch of entries.
    pub fn http_queue(&self, config: &HttpLogConfig, wrap: Wrap) -> Option<tokio::sync::mpsc::Sender<String>> {
        let key = format!("{wrap:?}{}", serde_json::to_string(config).ok()?);
        if let Some(queue) = self.http.read().ok()?.get(&key) {
            return Some(queue.clone());
        }
        let mut sinks = self.http.write().ok()?;
        if let Some(queue) = sinks.get(&key) {
            return Some(queue.clone());
        }
        if sinks.len() >= HTTP_LOG_SINKS_MAX {
            return None;
        }
        let (queue, entries) = tokio::sync::mpsc::channel(config.queue.max_entries as usize);
        self.runtime()?.spawn(send_batches(config.clone(), wrap, entries));
        sinks.insert(key, queue.clone());
        Some(queue)
    }
}

/// Appends one line to `path`, opening it if needed (every time with `reopen`, for
/// log rotation).
fn write_line(
    open: &mut HashMap<Arc<str>, std::io::BufWriter<std::fs::File>>,
    path: Arc<str>,
    reopen: bool,
    line: &str,
) {
    if (open.len() >= FILE_LOG_FILES_MAX && !open.contains_key(&path)) || reopen {
        for writer in open.values_mut() {
            let _ = writer.flush();
        }
        if reopen {
            open.remove(&path);
        } else {
            open.clear();
        }
    }
    let writer = match open.entry(path.clone()) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => {
            match std::fs::OpenOptions::new().create(true).append(true).open(&*path) {
                Ok(file) => entry.insert(std::io::BufWriter::new(file)),
                Err(error) => {
                    tracing::warn!(%error, path = %path, "file-log cannot open its file");
                    dropped("file-log");
                    return;
                }
            }
        }
    };
    let _ = writeln!(writer, "{line}");
}

/// How a batch becomes a request body.
#[derive(Debug, Clone)]
pub enum Wrap {
    /// One entry as an object; more as a JSON array.
    HttpLog,
    /// OTLP/HTTP JSON: the spans under one resource (its JSON object given).
    Otlp { resource: String },
}

/// Sends http-log entries in batches: up to `max_batch_size`, waiting at most
/// `max_coalescing_delay` for a batch to fill; a failed batch is retried with
/// backoff for up to `max_retry_time`, then dropped and counted.
async fn send_batches(config: HttpLogConfig, wrap: Wrap, mut entries: tokio::sync::mpsc::Receiver<String>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_millis(config.keepalive))
        .build_http::<Full<Bytes>>();
    let delay = Duration::from_secs_f64(config.queue.max_coalescing_delay);
    while let Some(first) = entries.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + delay;
        while batch.len() < config.queue.max_batch_size as usize {
            match tokio::time::timeout_at(deadline, entries.recv()).await {
                Ok(Some(entry)) => batch.push(entry),
                _ => break,
            }
        }
        let body = match &wrap {
            Wrap::HttpLog if config.queue.max_batch_size == 1 => batch.remove(0),
            Wrap::HttpLog => format!("[{}]", batch.join(",")),
            Wrap::Otlp { resource } => format!(
                r#"{{"resourceSpans":[{{"resource":{resource},"scopeSpans":[{{"scope":{{"name":"tollgate"}},"spans":[{}]}}]}}]}}"#,
                batch.join(",")
            ),
        };
        let body = Bytes::from(body);
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            let mut request = http::Request::new(Full::new(body.clone()));
            *request.method_mut() = http::Method::from_bytes(config.method.as_bytes()).unwrap_or(http::Method::POST);
            *request.uri_mut() = config.http_endpoint.parse().unwrap_or_default();
            let headers = request.headers_mut();
            headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            for (name, value) in &config.headers {
                if let (Ok(name), Ok(value)) =
                    (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(value))
                {
                    headers.insert(name, value);
                }
            }
            let sent = tokio::time::timeout(Duration::from_millis(config.timeout), client.request(request)).await;
            match sent {
                Ok(Ok(response)) if response.status().is_success() => break,
                other => {
                    let why = match other {
                        Ok(Ok(response)) => format!("status {}", response.status()),
                        Ok(Err(error)) => error.to_string(),
                        Err(_) => "timed out".to_string(),
                    };
                    if started.elapsed().as_secs_f64() + backoff.as_secs_f64() > config.queue.max_retry_time {
                        tracing::warn!(endpoint = %config.http_endpoint, why, "http-log batch dropped");
                        for _ in 0..batch.len().max(1) {
                            dropped("http-log");
                        }
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}

/// file-log (priority 9).
pub struct FileLog {
    path: Arc<str>,
    reopen: bool,
}

impl FileLog {
    pub fn new(config: FileLogConfig) -> FileLog {
        FileLog { path: Arc::from(config.path.as_str()), reopen: config.reopen }
    }
}

impl Plugin for FileLog {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        if ctx.log_request.is_none() {
            ctx.log_request = Some(request_entry(request, env));
        }
        Flow::Continue
    }

    fn log(&self, ctx: &Ctx, summary: &LogSummary<'_>, state: &NodeState) {
        let Some(queue) = state.logs.file_queue() else { return dropped("file-log") };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            queue.try_send((self.path.clone(), self.reopen, entry(ctx, summary)))
        {
            dropped("file-log");
        }
    }
}

/// http-log (priority 12).
pub struct HttpLog {
    config: HttpLogConfig,
}

impl HttpLog {
    pub fn new(config: HttpLogConfig) -> HttpLog {
        HttpLog { config }
    }
}

impl Plugin for HttpLog {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        if ctx.log_request.is_none() {
            ctx.log_request = Some(request_entry(request, env));
        }
        Flow::Continue
    }

    fn log(&self, ctx: &Ctx, summary: &LogSummary<'_>, state: &NodeState) {
        let Some(queue) = state.logs.http_queue(&self.config, Wrap::HttpLog) else { return dropped("http-log") };
        if queue.try_send(entry(ctx, summary)).is_err() {
            dropped("http-log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted() {
        let configured: std::collections::HashSet<String> = ["x-client", "sid"].map(String::from).into();
        for name in [
            "authorization",
            "Proxy-Authorization",
            "apikey",
            "x-api-key",
            "cookie",
            "x-auth-token",
            "jwt-token",
            "jwt",
            "X-Client",
            "sid",
        ] {
            assert!(sensitive(name, &configured), "{name}");
        }
        for name in ["accept", "x-request-id", "content-type", "host"] {
            assert!(!sensitive(name, &configured), "{name}");
        }
    }
}
