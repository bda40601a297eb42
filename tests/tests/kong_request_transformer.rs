//! request-transformer, replayed from Kong's own spec:
//! spec/03-plugins/36-request-transformer/02-access_spec.lua in Kong's repository
//! ("SPEC" below; each case names its line). The spec's routes are set up as its
//! `lazy_setup` does (routes at :33-:142, plugins at :144-:374), one host per route,
//! on the echo upstream, which answers with what it received (`method`, `path`,
//! `query`, `headers`, `body`).
//!
//! Every request case runs on both request paths: the direct HTTP/1.1 codec and hyper
//! (`--proxy-direct off`). The cases whose templates Kong evaluates with Lua beyond
//! Tollgate's grammar (raft-store/src/template.rs) are refused when written, with a
//! 400 naming the field, where Kong answers each request 500.

use serde_json::{json, Value};
use tollgate_client::AdminClient;
use tollgate_tests::{EchoServer, ProxyClient, ProxyMode, ProxyReply, TestCluster};

const MODES: [ProxyMode; 2] = [ProxyMode::Direct, ProxyMode::Hyper];

const USER_PATH: &str = "~/requests/user1/(?P<user1>\\w+)/user2/(?P<user2>\\S+)";
const USER_PATH_PCRE: &str = "~/requests/user1/(?<user1>\\w+)/user2/(?<user2>\\S+)";

/// The spec's routes and their request-transformer configs (SPEC:33-:142 and
/// :144-:374): host, route fields, plugin config.
fn spec_routes() -> Vec<(&'static str, Value, Value)> {
    vec![
        // SPEC:51 and :227
        ("test7.test", json!({}), json!({"http_method": "POST"})),
        // SPEC:54 and :234
        ("test8.test", json!({}), json!({"http_method": "GET"})),
        // SPEC:111 and :364
        (
            "test20.test",
            json!({}),
            json!({"http_method": "POST", "add": {"headers": ["Content-Type:application/json"], "body": ["body:somecontent"]}}),
        ),
        // SPEC:60 and :253
        (
            "test10.test",
            json!({"paths": [USER_PATH], "strip_path": false}),
            json!({"add": {"querystring": ["uri_param1:$(uri_captures.user1)", "uri_param2[some_index][1]:$(uri_captures.user2)"]}}),
        ),
        // SPEC:65 and :263
        (
            "test11.test",
            json!({"paths": [USER_PATH]}),
            json!({"replace": {"uri": "/requests/user2/$(uri_captures.user2)/user1/$(uri_captures.user1)"}}),
        ),
        // SPEC:69 and :272
        (
            "test12.test",
            json!({"paths": ["/requests/"], "strip_path": false}),
            json!({"add": {"querystring": [
                "uri_param1:$(uri_captures.user1 or 'default1')",
                "uri_param2:$(uri_captures.user2 or 'default2')"
            ]}}),
        ),
        // SPEC:78 and :290
        (
            "test14.test",
            json!({"paths": ["~/user1/(?P<user1>\\w+)/user2/(?P<user2>\\S+)"]}),
            json!({"replace": {"uri": "/requests$(uri_captures[0])"}}),
        ),
        // SPEC:82 and :299
        (
            "test15.test",
            json!({"paths": [USER_PATH_PCRE], "strip_path": false}),
            json!({
                "add": {"querystring": ["uri_param1:$(uri_captures.user1)", "uri_param2:$(headers.host)"],
                        "headers": ["x-test-header:$(query_params.q1)"]},
                "remove": {"querystring": ["q1"]}
            }),
        ),
        // SPEC:87 and :313
        (
            "test16.test",
            json!({"paths": [USER_PATH_PCRE], "strip_path": false}),
            json!({
                "replace": {"querystring": ["q2:$(headers['x-remove-header'])"]},
                "add": {"querystring": ["q1:$(uri_captures.user1)"],
                        "headers": ["x-test-header:$(headers['x-remove-header'])"]},
                "remove": {"headers": ["x-remove-header"]}
            }),
        ),
        // SPEC:92 and :328
        (
            "test17.test",
            json!({"paths": [USER_PATH_PCRE], "strip_path": false}),
            json!({
                "replace": {"querystring": ["q2:$(headers['x-replace-header'])"],
                            "headers": ["x-replace-header:the new value"]},
                "add": {"querystring": ["q1:$(uri_captures.user1)"],
                        "headers": ["x-test-header:$(headers['x-replace-header'])"]}
            }),
        ),
        // SPEC:97 and :343
        (
            "test18.test",
            json!({"paths": [USER_PATH_PCRE], "strip_path": false}),
            json!({"add": {"querystring": ["q1:$('$(uri_captures.user1)')"]}}),
        ),
        // SPEC:138 and :459
        (
            "test29.test",
            json!({"paths": ["~/(gw/)?api/(?<subpath>htest)$"], "strip_path": false}),
            json!({"replace": {"uri": "/api/v2/$(uri_captures[\"subpath\"])"}}),
        ),
    ]
}

/// One node in `mode` with the spec's routes on the echo upstream, serving them.
async fn kong_setup(mode: ProxyMode, echo: &EchoServer) -> anyhow::Result<TestCluster> {
    let cluster = mode.cluster(1, &[]).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "spec", "url": format!("http://{}", echo.address)})).await?;
    let mut version = 0;
    for (host, fields, config) in spec_routes() {
        let mut route = fields.clone();
        route["name"] = json!(host.replace('.', "-"));
        route["hosts"] = json!([host]);
        client.post("/services/spec/routes", &route).await?;
        let plugin = json!({"name": "request-transformer", "config": config});
        let written = client.post(&format!("/routes/{}/plugins", host.replace('.', "-")), &plugin).await?;
        version = written.config_version.unwrap_or(version);
    }
    cluster.published(version).await?;
    Ok(cluster)
}

/// Sends one request through the node's proxy.
async fn send(
    cluster: &TestCluster,
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<ProxyReply> {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{}{target}", cluster.nodes[0].proxy_url()))
        .header(http::header::HOST, host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))?;
    ProxyClient::new().send(request).await
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut position = 0;
    while position < bytes.len() {
        let hex = text.get(position + 1..position + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[position], hex) {
            (b'%', Some(value)) => {
                out.push(value);
                position += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                position += 1;
            }
            (byte, _) => {
                out.push(byte);
                position += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The upstream's query arguments, decoded, in order.
fn query_params(reply: &ProxyReply) -> Vec<(String, String)> {
    reply.body["query"]
        .as_str()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

/// The first value of the upstream's query argument `name`.
fn query_param(reply: &ProxyReply, name: &str) -> Option<String> {
    query_params(reply).into_iter().find(|(n, _)| n == name).map(|(_, value)| value)
}

/// The first value of the header `name` the upstream received.
fn upstream_header<'r>(reply: &'r ProxyReply, name: &str) -> Option<&'r str> {
    reply.body["headers"][name][0].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_method_changes_as_kongs() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    for mode in MODES {
        let cluster = kong_setup(mode, &echo).await?;

        // SPEC:539 "changes the HTTP method from GET to POST".
        let reply = send(&cluster, "GET", "test7.test", "/request?hello=world&name=marco", &[], "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:546 {}", reply.body);
        assert_eq!(reply.body["method"], "POST", "{mode:?} SPEC:548");
        assert_eq!(query_param(&reply, "hello").as_deref(), Some("world"), "{mode:?} SPEC:549");
        assert_eq!(query_param(&reply, "name").as_deref(), Some("marco"), "{mode:?} SPEC:550");

        // SPEC:553 "changes the HTTP method from POST to GET": the form body's fields
        // join the query (Kong's transform_method).
        let reply = send(&cluster, "POST", "test8.test", "/request?hello=world", &[FORM], "name=marco").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:564 {}", reply.body);
        assert_eq!(reply.body["method"], "GET", "{mode:?} SPEC:566");
        assert_eq!(query_param(&reply, "hello").as_deref(), Some("world"), "{mode:?} SPEC:567");
        assert_eq!(query_param(&reply, "name").as_deref(), Some("marco"), "{mode:?} SPEC:568");

        // SPEC:571 "changes the HTTP method from GET to POST and adds JSON body": the
        // header step runs before the body step, so the Content-Type it adds makes the
        // empty body a JSON one.
        let reply = send(&cluster, "GET", "test20.test", "/request", &[], "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:579 {}", reply.body);
        assert_eq!(reply.body["method"], "POST", "{mode:?} SPEC:582");
        let sent: Value = serde_json::from_str(reply.body["body"].as_str().unwrap_or_default())
            .unwrap_or_else(|error| panic!("{mode:?} SPEC:581, 583: the upstream got JSON ({error}): {}", reply.body));
        assert_eq!(sent, json!({"body": "somecontent"}), "{mode:?} SPEC:581");
        assert_eq!(upstream_header(&reply, "content-type"), Some("application/json"), "{mode:?} SPEC:584");
        let length = upstream_header(&reply, "content-length").and_then(|v| v.parse::<usize>().ok());
        assert_eq!(length, Some(sent.to_string().len()), "{mode:?}: the new body's length goes with it");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_render_captures_headers_and_query_as_kongs() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    for mode in MODES {
        let cluster = kong_setup(mode, &echo).await?;
        let user_path = "/requests/user1/foo/user2/bar";

        // SPEC:2064 "template as querystring parameters on GET" (route 10).
        let reply = send(&cluster, "GET", "test10.test", &format!("{user_path}?q1=20"), &[FORM], "hello=world").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:2079 {}", reply.body);
        assert_eq!(query_param(&reply, "uri_param1").as_deref(), Some("foo"), "{mode:?} SPEC:2081");
        assert_eq!(reply.body["path"], user_path, "{mode:?} SPEC:2083");
        assert_eq!(
            reply.body["query"], "q1=20&uri_param1=foo&uri_param2%5Bsome_index%5D%5B1%5D=bar",
            "{mode:?} SPEC:2083"
        );

        // SPEC:2086 "should update request path using hash" (route 11).
        let reply = send(&cluster, "GET", "test11.test", user_path, &[], "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:2094 {}", reply.body);
        assert_eq!(reply.body["path"], "/requests/user2/bar/user1/foo", "{mode:?} SPEC:2096");

        // SPEC:2099 "should not add querystring if hash missing" (route 12: a prefix
        // path, no captures, the defaults).
        let reply = send(&cluster, "GET", "test12.test", "/requests/?q1=20", &[], "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:2110 {}", reply.body);
        assert_eq!(query_param(&reply, "q1").as_deref(), Some("20"), "{mode:?} SPEC:2111");
        assert_eq!(query_param(&reply, "uri_param1").as_deref(), Some("default1"), "{mode:?} SPEC:2113");
        assert_eq!(query_param(&reply, "uri_param2").as_deref(), Some("default2"), "{mode:?} SPEC:2115");

        // SPEC:2127 "should not fail when uri template rendered using index" (route 14).
        let reply = send(&cluster, "GET", "test14.test", "/user1/foo/user2/bar", &[], "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:2135 {}", reply.body);
        assert_eq!(reply.body["path"], "/requests/user1/foo/user2/bar", "{mode:?} SPEC:2137");

        // SPEC:2140 "validate using headers/req_querystring for rendering templates"
        // (route 15): `q1` is removed, yet the header template reads it.
        let reply = send(&cluster, "GET", "test15.test", &format!("{user_path}?q1=20"), &[FORM], "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:2153 {}", reply.body);
        assert_eq!(query_param(&reply, "q1"), None, "{mode:?} SPEC:2154");
        assert_eq!(query_param(&reply, "uri_param1").as_deref(), Some("foo"), "{mode:?} SPEC:2156");
        assert_eq!(query_param(&reply, "uri_param2").as_deref(), Some("test15.test"), "{mode:?} SPEC:2158");
        assert_eq!(upstream_header(&reply, "x-test-header"), Some("20"), "{mode:?} SPEC:2160");

        // SPEC:2162 "validate that removed header can be used as template" (route 16).
        let headers = [("x-remove-header", "its a test"), FORM];
        let reply = send(&cluster, "GET", "test16.test", &format!("{user_path}?q2=20"), &headers, "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:2175 {}", reply.body);
        assert_eq!(upstream_header(&reply, "x-remove-header"), None, "{mode:?} SPEC:2176");
        assert_eq!(query_param(&reply, "q1").as_deref(), Some("foo"), "{mode:?} SPEC:2178");
        assert_eq!(query_param(&reply, "q2").as_deref(), Some("its a test"), "{mode:?} SPEC:2180");
        assert_eq!(upstream_header(&reply, "x-test-header"), Some("its a test"), "{mode:?} SPEC:2182");

        // SPEC:2184 "validate template will be rendered with old value of replaced
        // header" (route 17).
        let headers = [("x-replace-header", "the old value"), FORM];
        let reply = send(&cluster, "GET", "test17.test", &format!("{user_path}?q2=20"), &headers, "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:2197 {}", reply.body);
        assert_eq!(query_param(&reply, "q1").as_deref(), Some("foo"), "{mode:?} SPEC:2199");
        assert_eq!(query_param(&reply, "q2").as_deref(), Some("the old value"), "{mode:?} SPEC:2201");
        assert_eq!(upstream_header(&reply, "x-test-header"), Some("the old value"), "{mode:?} SPEC:2203");
        assert_eq!(upstream_header(&reply, "x-replace-header"), Some("the new value"), "{mode:?} SPEC:2205");

        // SPEC:2208 "validate template can be escaped" (route 18).
        let reply = send(&cluster, "GET", "test18.test", &format!("{user_path}?q2=20"), &headers, "").await?;
        assert_eq!(reply.status, 200, "{mode:?} SPEC:2221 {}", reply.body);
        assert_eq!(query_param(&reply, "q1").as_deref(), Some("$(uri_captures.user1)"), "{mode:?} SPEC:2223");
        assert_eq!(query_param(&reply, "q2").as_deref(), Some("20"), "{mode:?} SPEC:2225");

        // SPEC:1205 and :1218 "replaces request uri with optional capture prefix" /
        // "with the capature prefix" (route 29: `uri_captures["subpath"]`, with the
        // optional group absent and present). Kong's mock upstream answers 404 for the
        // new path; the echo answers every path.
        for path in ["/api/htest", "/gw/api/htest"] {
            let reply = send(&cluster, "GET", "test29.test", path, &[], "").await?;
            assert_eq!(reply.status, 200, "{mode:?} {path} {}", reply.body);
            assert_eq!(reply.body["path"], "/api/v2/htest", "{mode:?} {path}: SPEC:1215, :1228");
        }
    }
    Ok(())
}

/// Kong accepts these and fails each request at run time (500) or runs Lua Tollgate
/// does not have; Tollgate refuses them when written, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_beyond_the_template_grammar_is_refused_when_written() -> anyhow::Result<()> {
    // Admin API only: no request path is involved.
    let cluster = TestCluster::start(1).await?;
    let client: AdminClient = cluster.client();
    let cases = [
        // SPEC:2117 "should fail when uri template is not a proper expression" (route
        // 13, :281): Kong answers 500.
        (json!({"replace": {"uri": "/requests/user2/$(10 * uri_captures.user1)"}}), "config.replace.uri"),
        // SPEC:2228 "rendering error (query) should fail when rendering errors out"
        // (route 19, :352): Kong answers 500.
        (json!({"add": {"querystring": ["q1:$(ERROR())"]}}), "config.add.querystring[0]"),
        // SPEC:2243 (route 24, :420): Kong answers 500 and logs the Lua error.
        (
            json!({"add": {"headers": ["x-user-agent:$(foo(headers[\"User-Agent\"]) == \"table\" and headers[\"User-Agent\"][1] or headers[\"User-Agent\"])"]}}),
            "config.add.headers[0]",
        ),
        // SPEC:2261 "type function is available in template environment" (route 25,
        // :430): Lua's `type` and `..`, which Tollgate's grammar does not have.
        (
            json!({"add": {"headers": ["X-Foo-Transformed:$(type(headers[\"X-Foo\"]) == \"table\" and headers[\"X-Foo\"][1] .. \"-first\" or headers[\"X-Foo\"])"]}}),
            "config.add.headers[0]",
        ),
        // SPEC:2275 "can inject a value from 'kong.ctx.shared'" (route 21, :390): no
        // Tollgate plugin writes `shared`.
        (json!({"add": {"querystring": ["shared_param1:$(shared.my_version)"]}}), "config.add.querystring[0]"),
        // SPEC:2287 "cannot write a value in `kong.ctx.shared`" (route 28, :470): Kong
        // answers 500.
        (json!({"add": {"headers": ["X-Write-Attempt:$(shared.written = true)"]}}), "config.add.headers[0]"),
    ];
    for (config, field) in cases {
        let refused = client
            .post("/plugins", &json!({"name": "request-transformer", "config": config}))
            .await
            .expect_err("refused when written");
        assert_eq!(refused.status(), Some(400), "{config}: {refused}");
        let error = refused.api_error().expect("an Admin API error");
        assert!(
            error.fields.get(field).is_some_and(|message| message.contains("not supported")),
            "{config}: the error names {field}: {refused}"
        );
    }
    let listed = client.get("/plugins").await?;
    assert_eq!(listed.body["data"], json!([]), "nothing was written");
    Ok(())
}
