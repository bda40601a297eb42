use super::*;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn query_operations_run_in_kongs_order() {
    let lists = [
        strings(&["drop", "a[]"]),
        strings(&["old:new", "other:keep"]),
        strings(&["keep:changed", "absent:never", "twice:once"]),
        strings(&["keep:not-added", "extra:a b", "p[x]:1"]),
        strings(&["list:2"]),
    ];
    let entries = Entries::parse(lists.each_ref().map(Vec::as_slice), true).unwrap();
    let operations = QueryOperations::build(&entries, &NoValues).unwrap();
    let query = operations.apply(Some("drop=1&a%5B%5D=2&old=x&keep=y&keep=z&list=1&twice=1&twice=2&flag")).unwrap();
    // Names match decoded; `rename` takes over the new name, `replace` leaves one
    // value; new arguments are encoded.
    assert_eq!(query, "new=x&keep=changed&list=1&twice=once&flag&extra=a%20b&p%5Bx%5D=1&list=2");
    let renamed = operations.apply(Some("old=1&new=2&other=3")).unwrap();
    assert_eq!(renamed, "new=1&keep=changed&extra=a%20b&p%5Bx%5D=1&list=2");
    assert_eq!(Operations::<String, String>::default().apply(None), None);
}

/// Runs the plugin as the framework does: once, and again with the body when it
/// asks for it.
fn run(
    config: Value,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    regex: Option<&regex::Regex>,
) -> (Ctx, HeaderMap, Option<Exit>) {
    let plugin = RequestTransformer::new(serde_json::from_value(config).unwrap()).unwrap();
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value.as_bytes()).unwrap(),
        );
    }
    let mut ctx = Ctx::new([127, 0, 0, 1].into(), None, None, method.clone(), "http");
    let state = super::super::NodeState::default();
    let data = super::super::PluginData::default();
    let env = Env {
        data: &data,
        counters: &state.counters,
        verified: &state.verified,
        cache: &state.cache,
        quota: &state.quota,
    };
    let uri = super::super::UriMatch::new(regex, path);
    let mut view = RequestView { method: &method, path, query, headers: &mut map, uri };
    let mut flow = plugin.access(&mut ctx, &mut view, &env);
    if matches!(flow, Flow::ReadBody) {
        ctx.request_body = Some(bytes::Bytes::copy_from_slice(body));
        flow = plugin.access(&mut ctx, &mut view, &env);
    }
    let exit = match flow {
        Flow::Continue => None,
        Flow::Exit(exit) => Some(exit),
        _ => panic!("the plugin asked for more than the body"),
    };
    (ctx, map, exit)
}

fn query_of(ctx: &Ctx) -> Vec<(String, String)> {
    form_fields(ctx.upstream_query.as_deref().unwrap_or_default()).collect()
}

fn captures_route() -> regex::Regex {
    regex::Regex::new(r"^(?:/requests/user1/(?<user1>\w+)/user2/(?<user2>\S+))").unwrap()
}

#[test]
fn templates_read_the_request_as_received() {
    // spec/03-plugins/36-request-transformer/02-access_spec.lua:2162 (route 16).
    let config = serde_json::json!({
        "replace": {"querystring": ["q2:$(headers['x-remove-header'])"]},
        "add": {"querystring": ["q1:$(uri_captures.user1)"], "headers": ["x-test-header:$(headers['x-remove-header'])"]},
        "remove": {"headers": ["x-remove-header"]}
    });
    let regex = captures_route();
    let (ctx, headers, exit) = run(
        config,
        Method::GET,
        "/requests/user1/foo/user2/bar?q2=20",
        &[("x-remove-header", "its a test")],
        b"",
        Some(&regex),
    );
    assert!(exit.is_none());
    assert!(!headers.contains_key("x-remove-header"));
    assert_eq!(headers["x-test-header"], "its a test");
    let expected = [("q2", "its a test"), ("q1", "foo")].map(|(n, v)| (n.to_string(), v.to_string()));
    assert_eq!(query_of(&ctx), expected);

    // :2064 (route 10), :2099 (route 12: no regex, the defaults), :2127 (route 14).
    let config = serde_json::json!({"add": {"querystring": [
        "uri_param1:$(uri_captures.user1 or 'default1')", "uri_param2[some_index][1]:$(uri_captures.user2)"
    ]}, "replace": {"uri": "/requests$(uri_captures[0])"}});
    let (ctx, _, _) = run(config.clone(), Method::GET, "/requests/user1/foo/user2/bar?q1=20", &[], b"", Some(&regex));
    assert_eq!(ctx.upstream_query.as_deref(), Some("q1=20&uri_param1=foo&uri_param2%5Bsome_index%5D%5B1%5D=bar"));
    assert_eq!(ctx.upstream_path.as_deref(), Some("/requests/requests/user1/foo/user2/bar"));
    let (ctx, _, _) = run(config, Method::GET, "/requests/?q1=20", &[], b"", None);
    assert_eq!(ctx.upstream_query.as_deref(), Some("q1=20&uri_param1=default1&uri_param2%5Bsome_index%5D%5B1%5D="));
    assert_eq!(ctx.upstream_path.as_deref(), Some("/requests"));
}

#[test]
fn the_method_step_merges_a_form_body_and_the_header_step_decides_the_body() {
    // spec/03-plugins/36-request-transformer/02-access_spec.lua:553 (route 8).
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let (ctx, _, _) = run(
        serde_json::json!({"http_method": "GET"}),
        Method::POST,
        "/request?hello=world",
        &form,
        b"name=marco",
        None,
    );
    assert_eq!(ctx.upstream_method, Some(Method::GET));
    assert_eq!(ctx.upstream_query.as_deref(), Some("hello=world&name=marco"));
    // :571 (route 20): the Content-Type the header step adds makes the empty body JSON.
    let config = serde_json::json!({"http_method": "POST",
        "add": {"headers": ["Content-Type:application/json"], "body": ["body:somecontent"]}});
    let (ctx, headers, _) = run(config, Method::GET, "/request", &[], b"", None);
    assert_eq!(ctx.upstream_method, Some(Method::POST));
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(ctx.request_body.as_deref(), Some(&br#"{"body":"somecontent"}"#[..]));
}

#[test]
fn rendered_values_that_cannot_be_sent_answer_500() {
    let config = serde_json::json!({"add": {"headers": ["x-q:$(query_params.q)"]}});
    let (_, _, exit) = run(config.clone(), Method::GET, "/?q=a%0Ab", &[], b"", None);
    assert_eq!(exit.map(|exit| exit.status), Some(StatusCode::INTERNAL_SERVER_ERROR));
    let (_, headers, exit) = run(config.clone(), Method::GET, "/?q=a+b&q=c", &[], b"", None);
    assert!(exit.is_none());
    assert_eq!(headers["x-q"], "a b, c", "a repeated argument renders its values joined");
    // Rendered empty: nginx's empty header, not sent.
    let (_, headers, _) = run(config, Method::GET, "/", &[], b"", None);
    assert!(!headers.contains_key("x-q"));
    let config = serde_json::json!({"replace": {"uri": "$(headers.x_path)"}});
    let (ctx, _, exit) = run(config.clone(), Method::GET, "/", &[("x-path", "/a b#c/tést")], b"", None);
    assert!(exit.is_none());
    assert_eq!(ctx.upstream_path.as_deref(), Some("/a%20b%23c/t%C3%A9st"));
    let (_, _, exit) = run(config, Method::GET, "/", &[("x-path", "relative")], b"", None);
    assert_eq!(exit.map(|exit| exit.status), Some(StatusCode::INTERNAL_SERVER_ERROR), "Kong's set_path refuses it");
}

#[test]
fn captures_are_read_in_kongs_spelling() {
    assert_eq!(kong_decoded("a%20b%2Fc%41"), "a b%2FcA");
    assert_eq!(kong_decoded("plain"), "plain");
    assert_eq!(merge_form_into_query(None, b"a=1&b=x+y").as_deref(), Some("a=1&b=x%20y"));
    assert_eq!(merge_form_into_query(Some("q=1"), b"").as_deref(), Some("q=1"));
    // spec/03-plugins/36-request-transformer/02-access_spec.lua:1205 (route 29): an
    // optional group that took no part.
    let regex = regex::Regex::new(r"^(?:/(gw/)?api/(?<subpath>htest)$)").unwrap();
    let config = serde_json::json!({"replace": {"uri": "/api/v2/$(uri_captures[\"subpath\"])$(uri_captures[1])"}});
    for path in ["/api/htest", "/gw/api/htest"] {
        let (ctx, _, _) = run(config.clone(), Method::GET, path, &[], b"", Some(&regex));
        let expected = if path.starts_with("/gw") { "/api/v2/htestgw/" } else { "/api/v2/htest" };
        assert_eq!(ctx.upstream_path.as_deref(), Some(expected));
    }
}

#[test]
fn json_operations_run_in_kongs_order_with_types() {
    let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (remove, rename, replace, add, append) = (
        strings(&["secret"]),
        strings(&["old:new"]),
        strings(&["n:7"]),
        strings(&["flag:true", "n:1"]),
        strings(&["list:c"]),
    );
    let types = strings(&["number"]);
    let add_types = strings(&["boolean", "number"]);
    let none: Vec<String> = Vec::new();
    let operations = JsonOperations::compile_json([
        (&remove, &none),
        (&rename, &none),
        (&replace, &types),
        (&add, &add_types),
        (&append, &none),
    ])
    .unwrap();
    let body = br#"{"secret":"x","old":1,"n":"2","list":["a","b"]}"#;
    let out: Value = serde_json::from_slice(&operations.apply_json(body).unwrap()).unwrap();
    assert_eq!(out, serde_json::json!({"new": 1, "n": 7.0, "flag": true, "list": ["a", "b", "c"]}));
    assert_eq!(operations.apply_json(b"[1,2]"), None, "only objects are transformed");
}
