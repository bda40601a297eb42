//! Kong's cors plugin, replayed from its spec
//! (spec/03-plugins/13-cors/01-access_spec.lua in Kong's repository; each case names
//! its line) on both request paths: the direct HTTP/1.1 codec and hyper.
//!
//! Routes are set up as the spec's `lazy_setup` (l.239-561) does: one per host, each
//! with its cors config, on a service of the echo upstream.

use serde_json::{json, Value};
use tollgate_tests::{free_port, EchoServer, ProxyClient, ProxyMode, ProxyReply, TestCluster};

/// The two request paths every case runs on.
const MODES: [ProxyMode; 2] = [ProxyMode::Direct, ProxyMode::Hyper];

/// Kong's `CORS_DEFAULT_METHODS` (l.7).
const DEFAULT_METHODS: &str = "GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT";

/// A route of the setup: its host, the service it goes to, its cors config.
struct Route {
    host: String,
    service: &'static str,
    config: Value,
}

fn route(host: &str, config: Value) -> Route {
    Route { host: host.to_string(), service: "echo", config }
}

/// A one-node cluster in `mode` with two services, `echo` (the echo upstream) and
/// `closed` (a local port nothing listens on), and `routes`; returns once the data
/// path serves every route.
async fn setup(mode: ProxyMode, echo: &EchoServer, routes: &[Route]) -> anyhow::Result<TestCluster> {
    let cluster = mode.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "echo", "url": format!("http://{}", echo.address)})).await?;
    let closed = format!("http://127.0.0.1:{}", free_port());
    client.post("/services", &json!({"name": "closed", "url": closed})).await?;
    let mut version = 0;
    for (index, route) in routes.iter().enumerate() {
        let name = format!("route-{index}");
        let body = json!({"name": name, "hosts": [route.host]});
        client.post(&format!("/services/{}/routes", route.service), &body).await?;
        let plugin = json!({"name": "cors", "config": route.config});
        let created = client.post(&format!("/routes/{name}/plugins"), &plugin).await?;
        version = version.max(created.config_version.unwrap_or(0));
    }
    cluster.published(version).await?;
    Ok(cluster)
}

/// Sends a request with `Host: host` and `headers`.
async fn send(
    cluster: &TestCluster,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<ProxyReply> {
    ProxyClient::new().request(&cluster.nodes[0].proxy_url(), method, Some(host), path, headers).await
}

/// A preflight from `origin` asking for GET (the spec's usual one).
async fn preflight(cluster: &TestCluster, host: &str, origin: &str) -> anyhow::Result<ProxyReply> {
    send(cluster, "OPTIONS", host, "/", &[("origin", origin), ("access-control-request-method", "GET")]).await
}

fn header<'a>(reply: &'a ProxyReply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).and_then(|value| value.to_str().ok())
}

/// Every line of a header, in order.
fn lines<'a>(reply: &'a ProxyReply, name: &str) -> Vec<&'a str> {
    reply.headers.get_all(name).iter().filter_map(|value| value.to_str().ok()).collect()
}

/// The regex and origin table (l.29-236): origins, the request's `Origin`, what
/// `Access-Control-Allow-Origin` carries (`None`: refused), and the line of the row.
const ORIGIN_TABLE: [(&[&str], &str, Option<&str>, u32); 24] = [
    // A single entry that is no regex is sent whatever the Origin.
    (&["foo.test"], "http://evil.test", Some("foo.test"), 34),
    (&["foo.test"], "https://bar.test:1234", Some("foo.test"), 44),
    (&["https://bar.test:1234"], "http://foo.test", Some("https://bar.test:1234"), 52),
    // A regex without `:` matches the host alone, anchored.
    (&["foo\\.test"], "http://foo.test", Some("http://foo.test"), 69),
    (&["foo\\.test"], "http://foo.test.evil.test", None, 70),
    (&["foo\\.test"], "http://foo.test:80", Some("http://foo.test"), 73),
    (&["foo\\.test"], "http://foo.test:8000", Some("http://foo.test:8000"), 74),
    (&["(.*[./])?foo\\.test"], "http://something.foo.test", Some("http://something.foo.test"), 88),
    (&["(.*[./])?foo\\.test"], "http://evilfoo.test", None, 89),
    // With `:`, the normalised `scheme://host[:port]`.
    (&["(.*[./])?foo\\.test:8000"], "http://foo.test", None, 103),
    (&["(.*[./])?foo\\.test:8000"], "https://foo.test:8000", Some("https://foo.test:8000"), 109),
    (&["(.*[./])?foo\\.test:8000"], "http://foo.test:90", None, 110),
    (&["https://(.*[.])?foo\\.test:8000"], "http://foo.test:8000", None, 124),
    (&["https://(.*[.])?foo\\.test:8000"], "https://foo.test:8000", Some("https://foo.test:8000"), 125),
    (&["^http://(.*[.])?foo\\.test(:(80|90))?$"], "http://foo.test:80", Some("http://foo.test"), 139),
    (&["^http://(.*[.])?foo\\.test(:(80|90))?$"], "https://foo.test:8000", None, 141),
    (&["^http://(.*[.])?foo\\.test(:(80|90))?$"], "http://foo.test:90", Some("http://foo.test:90"), 142),
    // Two bare hosts: compared with the whole normalised origin, so never matched.
    (&["foo.test", "bar.test"], "http://foo.test", None, 152),
    (&["foo.test", "bar.test"], "http://foo.test:80", None, 154),
    (&["http://foo.test", "https://bar.test:1234"], "http://foo.test:80", Some("http://foo.test"), 168),
    (&["http://foo.test", "https://bar.test:1234"], "http://foo.test:8000", None, 169),
    (&["http://foo.test", "https://bar.test:1234"], "https://bar.test:1234", Some("https://bar.test:1234"), 172),
    (&["bar.test", "(.*[./])?foo\\.test:8000"], "http://foo.test:8000", Some("http://foo.test:8000"), 214),
    (&["bar.test", "https://(.*\\.)?foo\\.test:8000"], "http://foo.test:8000", None, 230),
];

/// The routes of the preflight cases: the table's (`cors-regex-N.test`, one per row),
/// cors2, cors3 and cors5 (l.335-378).
fn preflight_routes() -> Vec<Route> {
    let mut routes: Vec<Route> = ORIGIN_TABLE
        .iter()
        .enumerate()
        .map(|(row, (origins, ..))| route(&format!("cors-regex-{row}.test"), json!({ "origins": origins })))
        .collect();
    routes.push(route(
        "cors2.test",
        json!({"origins": ["example.test"], "methods": ["GET"], "headers": ["origin", "type", "accepts"],
               "exposed_headers": ["x-auth-token"], "max_age": 23, "credentials": true}),
    ));
    routes.push(route(
        "cors3.test",
        json!({"origins": ["example.test"], "methods": ["GET"], "headers": ["origin", "type", "accepts"],
               "exposed_headers": ["x-auth-token"], "max_age": 23, "preflight_continue": true}),
    ));
    routes.push(route("cors5.test", json!({"origins": ["*"], "credentials": true})));
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_are_answered_as_kongs() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    for mode in MODES {
        let cluster = setup(mode, &echo, &preflight_routes()).await?;

        // spec/03-plugins/13-cors/01-access_spec.lua:582-614, over the rows of l.29-236.
        for (row, (origins, origin, allowed, line)) in ORIGIN_TABLE.iter().enumerate() {
            let case = format!("{mode:?}, l.{line}: {origins:?} given {origin}");
            let reply = preflight(&cluster, &format!("cors-regex-{row}.test"), origin).await?;
            assert_eq!(reply.status, 200, "{case}");
            assert_eq!(header(&reply, "access-control-allow-origin"), *allowed, "{case}");
            if allowed.is_some() {
                assert_eq!(header(&reply, "access-control-allow-methods"), Some(DEFAULT_METHODS), "{case}");
                for absent in [
                    "access-control-allow-headers",
                    "access-control-expose-headers",
                    "access-control-allow-credentials",
                    "access-control-max-age",
                ] {
                    assert_eq!(header(&reply, absent), None, "{case}: {absent}");
                }
            }
        }

        // spec/03-plugins/13-cors/01-access_spec.lua:663-680: `*` with credentials
        // sends the origin back.
        let reply = preflight(&cluster, "cors5.test", "origin5.test").await?;
        assert_eq!(reply.status, 200, "{mode:?}");
        assert_eq!(header(&reply, "content-length"), Some("0"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-methods"), Some(DEFAULT_METHODS), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-origin"), Some("origin5.test"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-credentials"), Some("true"), "{mode:?}");
        assert_eq!(lines(&reply, "vary"), ["Origin"], "{mode:?}");
        for absent in ["access-control-allow-headers", "access-control-expose-headers", "access-control-max-age"] {
            assert_eq!(header(&reply, absent), None, "{mode:?}: {absent}");
        }

        // spec/03-plugins/13-cors/01-access_spec.lua:702-720: the config's options.
        let reply = preflight(&cluster, "cors2.test", "origin5.test").await?;
        assert_eq!(reply.status, 200, "{mode:?}");
        assert_eq!(header(&reply, "content-length"), Some("0"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-methods"), Some("GET"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-origin"), Some("example.test"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-max-age"), Some("23"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-credentials"), Some("true"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-headers"), Some("origin,type,accepts"), "{mode:?}");
        assert_eq!(lines(&reply, "vary"), ["Origin"], "{mode:?}");
        assert_eq!(header(&reply, "access-control-expose-headers"), None, "{mode:?}");

        // handler.lua `access`: a preflight left to the upstream (`preflight_continue`)
        // gets no CORS headers on its way back (`skip_response_headers`).
        let reply = preflight(&cluster, "cors3.test", "http://example.test").await?;
        assert_eq!(reply.status, 200, "{mode:?}");
        assert_eq!(reply.body["method"], "OPTIONS", "{mode:?}: the upstream answered");
        assert_eq!(header(&reply, "access-control-allow-origin"), None, "{mode:?}");
        assert_eq!(header(&reply, "access-control-expose-headers"), None, "{mode:?}");
        assert!(lines(&reply, "vary").is_empty(), "{mode:?}");
    }
    Ok(())
}

/// The routes of the response cases (l.335-538): cors2, cors11, cors12, cors15,
/// cors16, cors-upstream, and cors-timeout on the closed port.
fn response_routes() -> Vec<Route> {
    let options = json!({"origins": ["example.test"], "methods": ["GET"], "headers": ["origin", "type", "accepts"],
                         "exposed_headers": ["x-auth-token"], "max_age": 10, "preflight_continue": true});
    vec![
        route(
            "cors2.test",
            json!({"origins": ["example.test"], "methods": ["GET"], "headers": ["origin", "type", "accepts"],
                   "exposed_headers": ["x-auth-token"], "max_age": 23, "credentials": true}),
        ),
        route("cors11.test", json!({"origins": ["http://my-site.test", "https://my-other-site.test:9000"]})),
        route(
            "cors12.test",
            json!({"credentials": true, "preflight_continue": false, "max_age": 1_728_000,
                   "headers": ["DNT", "X-CustomHeader", "Keep-Alive", "User-Agent", "X-Requested-With",
                               "If-Modified-Since", "Cache-Control", "Content-Type", "Authorization"],
                   "methods": null, "origins": ["a.xxx.test", "allowed-domain.test"]}),
        ),
        route(
            "cors15.test",
            json!({"allow_origin_absent": false, "origins": ["foo.bar"], "exposed_headers": ["x-auth-token"],
                   "credentials": true}),
        ),
        route(
            "cors16.test",
            json!({"allow_origin_absent": true, "origins": ["foo.bar"], "exposed_headers": ["x-auth-token"],
                   "credentials": true}),
        ),
        route("cors-upstream.test", options.clone()),
        Route { host: "cors-timeout.test".to_string(), service: "closed", config: options },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_kongs_headers() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    for mode in MODES {
        let cluster = setup(mode, &echo, &response_routes()).await?;

        // spec/03-plugins/13-cors/01-access_spec.lua:842-857: a request without
        // Origin gets the configured origin, credentials and exposed headers.
        let reply = send(&cluster, "GET", "cors2.test", "/", &[]).await?;
        assert_eq!(reply.status, 200, "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-origin"), Some("example.test"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-expose-headers"), Some("x-auth-token"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-credentials"), Some("true"), "{mode:?}");
        assert_eq!(lines(&reply, "vary"), ["Origin"], "{mode:?}");
        for absent in ["access-control-allow-methods", "access-control-allow-headers", "access-control-max-age"] {
            assert_eq!(header(&reply, absent), None, "{mode:?}: {absent}");
        }

        // spec/03-plugins/13-cors/01-access_spec.lua:859-874: the upstream cannot be
        // reached (502), and the answer still carries the headers.
        let reply = send(&cluster, "GET", "cors-timeout.test", "/", &[]).await?;
        assert_eq!(reply.status, 502, "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-origin"), Some("example.test"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-expose-headers"), Some("x-auth-token"), "{mode:?}");
        assert_eq!(lines(&reply, "vary"), ["Origin"], "{mode:?}");
        for absent in [
            "access-control-allow-credentials",
            "access-control-allow-methods",
            "access-control-allow-headers",
            "access-control-max-age",
        ] {
            assert_eq!(header(&reply, absent), None, "{mode:?}: {absent}");
        }

        // spec/03-plugins/13-cors/01-access_spec.lua:963-974: `Vary: Origin` is added
        // to the upstream's `Vary`, not in its place.
        let path = "/response-headers?vary=Accept-Encoding";
        let reply = send(&cluster, "GET", "cors-upstream.test", path, &[("origin", "example.test")]).await?;
        assert_eq!(reply.status, 200, "{mode:?}");
        assert_eq!(lines(&reply, "vary"), ["Accept-Encoding", "Origin"], "{mode:?}");

        // spec/03-plugins/13-cors/01-access_spec.lua:999-1059: scheme and port count,
        // a default port is dropped.
        for (origin, allowed, line) in [
            ("http://my-site.test", Some("http://my-site.test"), 1008),
            ("http://my-site.test:80", Some("http://my-site.test"), 1018),
            ("http://my-site.test:8000", None, 1028),
            ("https://my-site.test", None, 1038),
            ("https://my-other-site.test:9000", Some("https://my-other-site.test:9000"), 1048),
            ("https://my-other-site.test:9001", None, 1058),
        ] {
            let reply = send(&cluster, "GET", "cors11.test", "/", &[("origin", origin)]).await?;
            assert_eq!(reply.status, 200, "{mode:?}, l.{line}");
            assert_eq!(header(&reply, "access-control-allow-origin"), allowed, "{mode:?}, l.{line}: {origin}");
        }

        // spec/03-plugins/13-cors/01-access_spec.lua:1127-1167: the upstream's own
        // `Access-Control-Allow-Origin` is replaced on a match and removed without one;
        // credentials are offered either way.
        let path = "/response-headers?Response-Header=is-added&Access-Control-Allow-Origin=%2A";
        let reply = send(&cluster, "GET", "cors12.test", path, &[("origin", "allowed-domain.test")]).await?;
        assert_eq!(reply.status, 200, "{mode:?}");
        assert_eq!(header(&reply, "response-header"), Some("is-added"), "{mode:?}");
        assert_eq!(lines(&reply, "access-control-allow-origin"), ["allowed-domain.test"], "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-credentials"), Some("true"), "{mode:?}");
        assert_eq!(lines(&reply, "vary"), ["Origin"], "{mode:?}");
        assert_eq!(reply.body["headers"]["origin"][0], "allowed-domain.test", "{mode:?}");
        let reply = send(&cluster, "GET", "cors12.test", path, &[("origin", "disallowed-domain.test")]).await?;
        assert_eq!(reply.status, 200, "{mode:?}");
        assert_eq!(header(&reply, "response-header"), Some("is-added"), "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-origin"), None, "{mode:?}");
        assert_eq!(header(&reply, "access-control-allow-credentials"), Some("true"), "{mode:?}");
        assert_eq!(reply.body["headers"]["origin"][0], "disallowed-domain.test", "{mode:?}");

        // spec/03-plugins/13-cors/01-access_spec.lua:1170-1198: no Origin, or an empty
        // one: nothing with `allow_origin_absent: false`, the headers with `true`.
        for origin in [None, Some("")] {
            let headers: Vec<(&str, &str)> = origin.map(|origin| ("origin", origin)).into_iter().collect();
            let case = format!("{mode:?}, Origin {origin:?}");
            let reply = send(&cluster, "GET", "cors15.test", "/", &headers).await?;
            assert_eq!(reply.status, 200, "{case}");
            for absent in
                ["access-control-allow-origin", "access-control-allow-credentials", "access-control-expose-headers"]
            {
                assert_eq!(header(&reply, absent), None, "{case}: l.1180-1182 {absent}");
            }
            let reply = send(&cluster, "GET", "cors16.test", "/", &headers).await?;
            assert_eq!(reply.status, 200, "{case}");
            assert_eq!(header(&reply, "access-control-allow-origin"), Some("foo.bar"), "{case}: l.1195");
            assert_eq!(header(&reply, "access-control-allow-credentials"), Some("true"), "{case}: l.1196");
            assert_eq!(header(&reply, "access-control-expose-headers"), Some("x-auth-token"), "{case}: l.1197");
        }
    }
    Ok(())
}
