//! Data-path telemetry: per-route and per-service metrics registered when the config
//! is compiled (so a request only touches atomics), and a JSON access log written off
//! the request path.
//!
//! Metrics (Prometheus names, labels `service` and `route`, names or ids):
//! - `tollgate_http_requests_total{service, route, code_class}` (`1xx` … `5xx`)
//! - `tollgate_request_latency_ms{service, route}` (histogram, whole request)
//! - `tollgate_upstream_latency_ms{service, route}` (histogram, until the upstream's headers)
//! - `tollgate_bandwidth_bytes_total{service, route, direction}` (`ingress`, `egress`)
//! - `tollgate_access_log_dropped_total` (lines dropped because the log queue was full)
//!
//! Requests that match no route count under `service=""`, `route=""`.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use metrics::{Counter, Histogram};

/// Lines the access log may hold before new ones are dropped (and counted).
pub const ACCESS_LOG_QUEUE_MAX: usize = 64 * 1024;

/// Pre-registered metric handles of one route.
#[derive(Debug)]
pub struct RouteMetrics {
    requests_by_class: [Counter; 5],
    latency_ms: Histogram,
    upstream_latency_ms: Histogram,
    pub ingress_bytes: Counter,
    pub egress_bytes: Counter,
    pub service_label: String,
    pub route_label: String,
}

impl RouteMetrics {
    pub fn register(service: &str, route: &str) -> RouteMetrics {
        let labels = [("service", service.to_string()), ("route", route.to_string())];
        let class = |class: &'static str| metrics::counter!("tollgate_http_requests_total", "service" => service.to_string(), "route" => route.to_string(), "code_class" => class);
        RouteMetrics {
            requests_by_class: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            latency_ms: metrics::histogram!("tollgate_request_latency_ms", &labels),
            upstream_latency_ms: metrics::histogram!("tollgate_upstream_latency_ms", &labels),
            ingress_bytes: metrics::counter!("tollgate_bandwidth_bytes_total", "service" => service.to_string(), "route" => route.to_string(), "direction" => "ingress"),
            egress_bytes: metrics::counter!("tollgate_bandwidth_bytes_total", "service" => service.to_string(), "route" => route.to_string(), "direction" => "egress"),
            service_label: service.to_string(),
            route_label: route.to_string(),
        }
    }

    pub fn record(&self, status: u16, latency_ms: f64, upstream_latency_ms: Option<f64>) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.requests_by_class[class].increment(1);
        self.latency_ms.record(latency_ms);
        if let Some(upstream) = upstream_latency_ms {
            self.upstream_latency_ms.record(upstream);
        }
    }
}

/// A body that adds the bytes it yields to a counter, and holds `G` until it is
/// dropped.
pub struct CountingBody<B, G = ()> {
    inner: B,
    counter: Counter,
    /// Dropped with the body (the hyper adapter's: tell the client connection its
    /// response has been sent, and give the upstream connection back to its pool).
    _guard: G,
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, counter: Counter) -> CountingBody<B> {
        CountingBody { inner, counter, _guard: () }
    }

    pub fn with_guard<G>(self, guard: G) -> CountingBody<B, G> {
        CountingBody { inner: self.inner, counter: self.counter, _guard: guard }
    }
}

impl<B, G: Unpin> Body for CountingBody<B, G>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.increment(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Most bytes of access log lines written to stdout at once.
const ACCESS_LOG_BATCH_BYTES: usize = 64 * 1024;

/// The access log: one JSON line per request to stdout, written by its own thread from
/// a bounded queue, so a slow stdout never slows a request (lines are dropped instead).
#[derive(Clone)]
pub struct AccessLog {
    queue: SyncSender<String>,
    dropped: Counter,
}

impl AccessLog {
    pub fn start() -> std::io::Result<AccessLog> {
        let (queue, lines) = sync_channel::<String>(ACCESS_LOG_QUEUE_MAX);
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let stdout = std::io::stdout();
            let mut batch = Vec::with_capacity(ACCESS_LOG_BATCH_BYTES);
            while let Ok(line) = lines.recv() {
                // What is queued goes out in one write, once the queue is drained (so
                // lines appear promptly when idle). stdout is locked only for that
                // write: held longer, every other writer of the process would wait (the
                // three nodes of `tollgate dev`, and its summary, did).
                batch.clear();
                let _ = writeln!(batch, "{line}");
                while batch.len() < ACCESS_LOG_BATCH_BYTES {
                    let Ok(next) = lines.try_recv() else { break };
                    let _ = writeln!(batch, "{next}");
                }
                let mut out = stdout.lock();
                let _ = out.write_all(&batch);
                let _ = out.flush();
            }
        })?;
        Ok(AccessLog { queue, dropped: metrics::counter!("tollgate_access_log_dropped_total") })
    }

    pub fn log(&self, line: String) {
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.increment(1),
        }
    }
}
