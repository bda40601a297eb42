use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// Marks each phase it runs in, with its name, where the phase lets it write.
struct Recorder {
    name: &'static str,
    logged: Arc<AtomicUsize>,
}

const TRAIL: HeaderName = HeaderName::from_static("x-trail");

impl Plugin for Recorder {
    fn phases(&self) -> Phases {
        Phases { rewrite: true, header_filter: true, response_body: true }
    }

    fn rewrite(&self, request: &mut RewriteView<'_>) -> Option<Exit> {
        request.headers.append(TRAIL, HeaderValue::from_str(&format!("rewrite:{}", self.name)).unwrap());
        None
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        if ctx.request_body.is_none() {
            return Flow::ReadBody;
        }
        request.headers.append(TRAIL, HeaderValue::from_str(&format!("access:{}", self.name)).unwrap());
        Flow::Continue
    }

    fn header_filter(&self, _ctx: &mut Ctx, _status: StatusCode, headers: &mut http::HeaderMap) {
        headers.append(TRAIL, HeaderValue::from_str(&format!("header_filter:{}", self.name)).unwrap());
    }

    fn wants_body(&self, _ctx: &Ctx, _status: StatusCode, _headers: &http::HeaderMap) -> bool {
        true
    }

    fn body_filter(&self, _ctx: &mut Ctx, _headers: &http::HeaderMap, body: &mut Bytes) {
        *body = Bytes::from(format!("{}+{}", String::from_utf8_lossy(body), self.name));
    }

    fn log(&self, _ctx: &Ctx, _summary: &LogSummary<'_>, _state: &NodeState) {
        self.logged.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn phases_run_in_order_and_rewrite_only_for_global_instances() {
    let logged = Arc::new(AtomicUsize::new(0));
    let route = Uuid::new_v4();
    let instance = |name| {
        let plugin = Box::new(Recorder { name, logged: logged.clone() });
        Arc::new(Instance { id: Uuid::new_v4(), plugin, protocols: vec!["http".to_string()] })
    };
    let global = instance("global");
    let scoped = instance("route");
    let none = Scope { consumer: None, route: None, service: None };
    let on_route = Scope { consumer: None, route: Some(route), service: None };
    let plugins = Plugins {
        instances: IdMap::from_iter([((0, none), global.clone()), ((1, on_route), scoped)]),
        shapes: vec![1 << shape(false, false, false), 1 << shape(false, true, false)],
        names: vec!["first".to_string(), "second".to_string()],
        global: vec![global],
        data: PluginData::default(),
        plans: IdMap::default(),
        unrouted: RoutePlan { may_run: true, phases: Phases { rewrite: true, ..Phases::NONE } },
    };
    let mut headers = http::HeaderMap::new();
    let method = http::Method::POST;
    assert!(plugins.rewrite("http", &mut RewriteView { method: &method, path: "/", headers: &mut headers }).is_none());
    let mut ctx = Ctx::new(IpAddr::from([127, 0, 0, 1]), Some(route), None, method.clone(), "http");
    let mut view =
        RequestView { method: &method, path: "/", query: None, headers: &mut headers, uri: UriMatch::default() };
    let mut body = Some(http_body_util::Full::new(Bytes::from_static(b"sent")));
    let state = NodeState::default();
    let (ran, exit) = plugins.access(&mut ctx, &mut view, &mut body, &state).await;
    assert!(exit.is_none());
    assert!(body.is_none(), "the body was taken by the first ReadBody");
    assert_eq!(ctx.request_body.as_deref(), Some(&b"sent"[..]));
    let trail: Vec<&str> = headers.get_all(TRAIL).iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(trail, ["rewrite:global", "access:global", "access:route"]);

    let mut response = http::HeaderMap::new();
    header_filter(&ran, &mut ctx, StatusCode::OK, &mut response);
    assert!(wants_body(&ran, &ctx, StatusCode::OK, &response));
    let mut out = Bytes::from_static(b"body");
    body_filter(&ran, &mut ctx, StatusCode::OK, &response, &mut out);
    let trail: Vec<&str> = response.get_all(TRAIL).iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(trail, ["header_filter:global", "header_filter:route"]);
    assert_eq!(out, "body+global+route");
    let summary = LogSummary {
        status: 200,
        latency_ms: 1.0,
        upstream_ms: None,
        service: "",
        route: "",
        from_upstream: true,
        response_bytes: None,
    };
    log(&ran, &ctx, &summary, &state);
    assert_eq!(logged.load(Ordering::Relaxed), 2);

    // Another protocol: neither instance runs.
    let mut other = http::HeaderMap::new();
    assert!(plugins.rewrite("grpc", &mut RewriteView { method: &method, path: "/", headers: &mut other }).is_none());
    assert!(other.is_empty());
}

#[test]
fn every_registered_plugin_has_a_builder_that_takes_its_default_config() {
    use tollgate_raft_store::plugins::{normalize, PLUGINS};
    let registry: Vec<&str> = PLUGINS.iter().map(|spec| spec.name).collect();
    let builders: Vec<&str> = BUILDERS.iter().map(|(name, _)| *name).collect();
    assert_eq!(registry, builders, "one builder per registered plugin, in the same order");
    let mut built = 0;
    for spec in &PLUGINS {
        if let Ok(config) = normalize(spec.name, &serde_json::json!({})) {
            build(spec.name, Uuid::new_v4(), config).unwrap_or_else(|error| panic!("{}: {error}", spec.name));
            built += 1;
        }
    }
    assert!(built >= 12, "{built}");
    assert!(build("aws-lambda", Uuid::new_v4(), Value::Null).err().unwrap().contains("not enabled"));
}
