//! Kong's Admin API about itself and about links, replayed from Kong's own specs
//! (spec/02-integration/04-admin_api/ in Kong's repository; each case names the file
//! and line it replays): `GET /endpoints`, `GET /schemas/{entity}`, `GET
//! /schemas/plugins/{name}`, `POST /schemas/{entity}/validate`, the link endpoints
//! (`/routes/{r}/service`) and `GET /upstreams/{u}/targets/all`.
//!
//! Not replayed, because Tollgate differs: 02-kong_routes_spec.lua:560 and :575 (a
//! certificate validated with Kong's `snis` shorthand: Tollgate's certificates do not
//! take `snis`, so validation answers what `POST /certificates` would, 400 "unknown
//! field"), :627 (file-log's `custom_fields_by_lua`: no Lua), :523 (the `dummy` test
//! plugin's deprecated field), :468-500 (vaults), and :170's `/basic-auths/...` and
//! `/reports/send-ping` (Tollgate serves credentials under their consumer only and
//! has no reports plugin; their Tollgate counterparts are checked instead).

use serde_json::{json, Value};
use tollgate_client::AdminClient;
use tollgate_tests::TestCluster;

/// One raw HTTP/1.1 exchange: status, headers and body as JSON (`Null` when empty).
/// Raw because Kong's 404 bodies here are the message alone, which the client does
/// not take for an API error, and HEAD and OPTIONS need no client support.
async fn raw(
    admin_url: &str,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> anyhow::Result<(u16, String, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = admin_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
    if let Some(body) = json_body {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(json_body.unwrap_or(""));
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body =
        if body.is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or_else(|_| Value::from(body)) };
    Ok((status, head.to_string(), body))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Status and body of a request through the client, errors included.
async fn call(client: &AdminClient, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let method = http::Method::from_bytes(method.as_bytes()).expect("method");
    match client.request(method, path, body).await {
        Ok(reply) => (reply.status, reply.body),
        Err(error) => (error.status().unwrap_or(0), error.api_error().map(|e| e.to_json()).unwrap_or(Value::Null)),
    }
}

/// The value of the single-key object named `name` in a Kong `fields` list.
fn field<'v>(fields: &'v Value, name: &str) -> Option<&'v Value> {
    fields.as_array()?.iter().find_map(|f| f.get(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_and_validation_as_kong_answers() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    let admin = cluster.node(1).admin_url();

    // 02-kong_routes_spec.lua:431 "returns the schema of all DB entities"
    let tables = [
        "services",
        "routes",
        "consumers",
        "upstreams",
        "targets",
        "plugins",
        "certificates",
        "ca_certificates",
        "snis",
        "keyauth_credentials",
        "basicauth_credentials",
        "jwt_secrets",
        "hmacauth_credentials",
        "acls",
    ];
    for table in tables {
        let (status, _, schema) = raw(&admin, "GET", &format!("/schemas/{table}"), None).await?;
        assert_eq!(status, 200, "{table}: {schema}");
        assert!(schema["fields"].is_array() && schema["entity_checks"].is_array(), "{table}: {schema}");
        // Kong's shape: one single-key object per field, `id` first.
        assert_eq!(field(&schema["fields"], "id"), Some(&json!({"type": "string", "uuid": true, "auto": true})));
        assert!(schema["fields"].as_array().into_iter().flatten().all(|f| f.as_object().is_some_and(|o| o.len() == 1)));
    }
    let (_, _, services) = raw(&admin, "GET", "/schemas/services", None).await?;
    assert_eq!(
        field(&services["fields"], "port"),
        Some(&json!({"type": "integer", "between": [0, 65535], "default": 80}))
    );
    assert_eq!(field(&services["fields"], "host").map(|host| &host["required"]), Some(&json!(true)));
    let (_, _, consumers) = raw(&admin, "GET", "/schemas/consumers", None).await?;
    assert_eq!(consumers["entity_checks"], json!([{"at_least_one_of": ["custom_id", "username"]}]));

    // 02-kong_routes_spec.lua:443 "returns 404 on a missing entity"
    let (status, _, body) = raw(&admin, "GET", "/schemas/not-present", None).await?;
    assert_eq!((status, body), (404, json!({"message": "No entity named 'not-present'"})));

    // 02-kong_routes_spec.lua:452 "does not return schema of a foreign key"
    let (_, _, routes) = raw(&admin, "GET", "/schemas/routes", None).await?;
    let service = field(&routes["fields"], "service").expect("routes.service");
    assert_eq!((service["type"].as_str(), service["reference"].as_str()), (Some("foreign"), Some("services")));
    assert!(service.get("schema").is_none(), "{service}");

    // 02-kong_routes_spec.lua:503 "returns schema of all plugins" (the loaded ones:
    // `GET /plugins/enabled`)
    let enabled = client.get("/plugins/enabled").await?.body;
    let names: Vec<&str> =
        enabled["enabled_plugins"].as_array().expect("list").iter().filter_map(Value::as_str).collect();
    assert!(!names.is_empty());
    for name in &names {
        let (status, _, schema) = raw(&admin, "GET", &format!("/schemas/plugins/{name}"), None).await?;
        assert_eq!(status, 200, "{name}: {schema}");
        assert!(schema["fields"].is_array(), "{name}: {schema}");
        let config = field(&schema["fields"], "config").expect("config");
        assert_eq!(config["type"], "record", "{name}");
    }
    // Kong's defaults, as a config written with `{}` gets them.
    let (_, _, key_auth) = raw(&admin, "GET", "/schemas/plugins/key-auth", None).await?;
    let config = &field(&key_auth["fields"], "config").expect("config")["fields"];
    assert_eq!(field(config, "key_names").map(|f| &f["default"]), Some(&json!(["apikey"])));
    assert_eq!(field(config, "hide_credentials").map(|f| &f["default"]), Some(&json!(false)));
    let written = client.post("/plugins", &json!({"name": "key-auth"})).await?.body;
    for (name, value) in written["config"].as_object().expect("config") {
        let described = field(config, name).unwrap_or_else(|| panic!("config.{name} in the schema"));
        assert_eq!(described.get("default").unwrap_or(&Value::Null), value, "config.{name}");
    }
    client.delete(&format!("/plugins/{}", written["id"].as_str().expect("id"))).await?;

    // 02-kong_routes_spec.lua:514 "returns 404 on a non-existent plugin"
    let (status, _, body) = raw(&admin, "GET", "/schemas/plugins/not-present", None).await?;
    assert_eq!((status, body), (404, json!({"message": "No plugin named 'not-present'"})));

    // 02-kong_routes_spec.lua:550 "returns 200 on a valid schema"
    let (status, body) =
        call(&client, "POST", "/schemas/services/validate", Some(&json!({"host": "example.com"}))).await;
    assert_eq!((status, body), (200, json!({"message": "schema validation successful"})));
    // Validation writes nothing.
    assert_eq!(client.get("/services").await?.body["data"], json!([]));
    // A body a create refuses is refused the same (Kong's validate_schema answers its
    // schema violation, kong/api/routes/kong.lua).
    let (status, body) = call(&client, "POST", "/schemas/services/validate", Some(&json!({"port": "x"}))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["name"], "schema violation");
    assert_eq!(body["fields"]["host"], "required field missing");
    let (status, _, body) = raw(&admin, "POST", "/schemas/not-present/validate", Some("{}")).await?;
    assert_eq!((status, body), (404, json!({"message": "No entity named 'not-present'"})));

    // 02-kong_routes_spec.lua:598 "returns 200 on a valid plugin schema"
    let plugin = json!({"name": "key-auth", "config": {"key_names": ["foo", "bar"], "hide_credentials": true}});
    let (status, body) = call(&client, "POST", "/schemas/plugins/validate", Some(&plugin)).await;
    assert_eq!((status, body), (200, json!({"message": "schema validation successful"})));
    assert_eq!(client.get("/plugins").await?.body["data"], json!([]));

    // 02-kong_routes_spec.lua:613 "returns 400 on an invalid plugin subschema"
    let plugin = json!({"name": "key-auth", "config": {"keys": "foo"}});
    let (status, body) = call(&client, "POST", "/schemas/plugins/validate", Some(&plugin)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["name"], "schema violation");

    // Methods: the schema paths are read-only, validation is POST only.
    let options = raw(&admin, "OPTIONS", "/schemas/plugins/validate", None).await?;
    assert_eq!(header(&options.1, "allow"), Some("OPTIONS, POST"));
    let options = raw(&admin, "OPTIONS", "/schemas/services", None).await?;
    assert_eq!(header(&options.1, "allow"), Some("GET, HEAD, OPTIONS"));
    let (status, body) = call(&client, "DELETE", "/schemas/services", None).await;
    assert_eq!((status, body["message"].as_str()), (405, Some("Method not allowed")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_lists_every_path_served() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(1).await?;
    let admin = cluster.node(1).admin_url();

    // 02-kong_routes_spec.lua:170 "only returns base, plugin, and custom-plugin endpoints"
    let (status, _, body) = raw(&admin, "GET", "/endpoints", None).await?;
    assert_eq!(status, 200);
    let data: Vec<&str> = body["data"].as_array().expect("data").iter().filter_map(Value::as_str).collect();
    for expected in [
        "/plugins",
        "/consumers/{consumers}/basic-auth/{basicauth_credentials}",
        "/routes/{routes}/service",
        "/upstreams/{upstreams}/targets/all",
        "/schemas/plugins/{name}",
    ] {
        assert!(data.contains(&expected), "endpoint '{expected}' not found in list of endpoints from `/endpoints`");
    }
    // kong/api/routes/kong.lua `/endpoints`: sorted by segment, `/` lowest.
    let keys: Vec<String> = data.iter().map(|path| path.replace('/', "\0")).collect();
    assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "{data:?}");
    assert_eq!(data.first(), Some(&"/"));
    // Every path listed is served: OPTIONS names its methods.
    for template in &data {
        let path: String = template
            .split('/')
            .map(|segment| if segment.starts_with('{') { "x" } else { segment })
            .collect::<Vec<_>>()
            .join("/");
        let path = if path.is_empty() { "/".to_string() } else { path };
        let (status, head, _) = raw(&admin, "OPTIONS", &path, None).await?;
        assert_eq!(status, 204, "OPTIONS {path}");
        assert!(header(&head, "allow").is_some(), "OPTIONS {path}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_service_link_as_kong_serves_it() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    let admin = cluster.node(1).admin_url();
    let unknown = "7d3f3c3e-7a55-4bb6-9b55-5d5f1d0ac4b1";

    // 09-routes_routes_spec.lua:1322 "retrieves by id"
    let service = client.post("/services", &json!({"host": "example.com", "path": "/"})).await?.body;
    let route = client.post("/routes", &json!({"paths": ["/my-route"], "service": {"id": service["id"]}})).await?.body;
    let route_id = route["id"].as_str().expect("id");
    let (status, body) = call(&client, "GET", &format!("/routes/{route_id}/service"), None).await;
    assert_eq!((status, &body), (200, &service));

    // 09-routes_routes_spec.lua:1333 "retrieves by name"
    let named = client.post("/services", &json!({"host": "example.com", "path": "/"})).await?.body;
    let body = json!({"name": "my-get-route", "paths": ["/my-route"], "service": {"id": named["id"]}});
    client.post("/routes", &body).await?;
    let (status, body) = call(&client, "GET", "/routes/my-get-route/service", None).await;
    assert_eq!((status, &body), (200, &named));

    // 09-routes_routes_spec.lua:1344 "returns 404 if not found"
    let (status, _) = call(&client, "GET", &format!("/routes/{unknown}/service"), None).await;
    assert_eq!(status, 404);
    // 09-routes_routes_spec.lua:1349 "returns 404 if not found by name"
    let (status, _) = call(&client, "GET", "/routes/my-in-existent-route/service", None).await;
    assert_eq!(status, 404);
    // kong/api/endpoints.lua get_entity_endpoint: a route without a service is 404 too.
    let lone = client.post("/routes", &json!({"paths": ["/lone"]})).await?.body;
    let lone_id = lone["id"].as_str().expect("id");
    let (status, _) = call(&client, "GET", &format!("/routes/{lone_id}/service"), None).await;
    assert_eq!(status, 404);

    // 09-routes_routes_spec.lua:1354 "ignores an invalid body"
    let reply = client
        .request_bytes(
            http::Method::GET,
            &format!("/routes/{route_id}/service"),
            "application/json",
            b"this fails if decoded as json".to_vec(),
        )
        .await?;
    assert_eq!(reply.status, 200);

    // 09-routes_routes_spec.lua:1368 "updates if found" (PATCH)
    let body = json!({"name": "edited-name", "host": "edited-example.com", "path": null});
    let (status, patched) = call(&client, "PATCH", &format!("/routes/{route_id}/service"), Some(&body)).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!((patched["name"].as_str(), patched["host"].as_str()), (Some("edited-name"), Some("edited-example.com")));
    assert_eq!(patched["path"], Value::Null);
    let in_db = client.get(&format!("/services/{}", service["id"].as_str().expect("id"))).await?.body;
    assert_eq!(in_db, patched);
    // 09-routes_routes_spec.lua:1401 "updates if found by name" (PATCH)
    let body = json!({"name": "name-by-route-name", "host": "edited.example.com", "path": null});
    let (status, patched) = call(&client, "PATCH", "/routes/my-get-route/service", Some(&body)).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["id"], named["id"]);
    assert_eq!(patched["name"], "name-by-route-name");
    // 09-routes_routes_spec.lua:1437 "updates with url" (PATCH)
    let body = json!({"url": "http://edited2.test:1234/foo"});
    let (status, patched) = call(&client, "PATCH", &format!("/routes/{route_id}/service"), Some(&body)).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        (patched["host"].as_str(), patched["port"].as_u64(), patched["path"].as_str()),
        (Some("edited2.test"), Some(1234), Some("/foo"))
    );
    // 09-routes_routes_spec.lua:1462 "returns 404 if not found" (PATCH)
    let body = json!({"name": "edited", "host": "edited.test", "path": null});
    let (status, _) = call(&client, "PATCH", &format!("/routes/{unknown}/service"), Some(&body)).await;
    assert_eq!(status, 404);
    // 09-routes_routes_spec.lua:1478 "handles invalid input" (PATCH)
    let body = json!({"connect_timeout": "foobar"});
    let (status, error) = call(&client, "PATCH", &format!("/routes/{route_id}/service"), Some(&body)).await;
    assert_eq!(status, 400);
    assert_eq!(
        error,
        json!({
            "code": 2,
            "name": "schema violation",
            "message": "schema violation (connect_timeout: expected an integer)",
            "fields": {"connect_timeout": "expected an integer"},
        })
    );

    // 09-routes_routes_spec.lua:1506 "returns HTTP 405 when trying to delete a service
    // that is referenced"
    let (status, _, body) = raw(&admin, "DELETE", &format!("/routes/{route_id}/service"), None).await?;
    assert_eq!((status, body), (405, json!({"message": "Method not allowed"})));
    assert!(client.get(&format!("/services/{}", service["id"].as_str().expect("id"))).await.is_ok(), "not deleted");
    // 09-routes_routes_spec.lua:1513 "returns HTTP 404 with non-existing route"
    let (status, _) = call(&client, "DELETE", &format!("/routes/{unknown}/service"), None).await;
    assert_eq!(status, 404);
    // 09-routes_routes_spec.lua:1518 "returns HTTP 404 with non-existing route by name"
    let (status, _) = call(&client, "DELETE", "/routes/in-existent-route/service", None).await;
    assert_eq!(status, 404);

    // 09-routes_routes_spec.lua:1527 "creates if not found" (PUT): the new service is
    // linked to the route.
    let body = json!({"url": "http://konghq.test"});
    let (status, created) = call(&client, "PUT", &format!("/routes/{lone_id}/service"), Some(&body)).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["host"], "konghq.test");
    let in_db = client.get(&format!("/services/{}", created["id"].as_str().expect("id"))).await?.body;
    assert_eq!(in_db, created);
    let (_, linked) = call(&client, "GET", &format!("/routes/{lone_id}/service"), None).await;
    assert_eq!(linked, created);
    // 09-routes_routes_spec.lua:1552 "updates if found" (PUT)
    let body = json!({"name": "put-name", "host": "put.example.com", "path": null});
    let (status, put) = call(&client, "PUT", &format!("/routes/{route_id}/service"), Some(&body)).await;
    assert_eq!(status, 200, "{put}");
    assert_eq!(
        (put["id"].clone(), put["name"].clone(), put["host"].clone()),
        (service["id"].clone(), json!("put-name"), json!("put.example.com"))
    );
    // 09-routes_routes_spec.lua:1621 "updates with url" (PUT)
    let body = json!({"url": "http://edited2.test:1234/foo"});
    let (status, put) = call(&client, "PUT", &format!("/routes/{route_id}/service"), Some(&body)).await;
    assert_eq!(status, 200, "{put}");
    assert_eq!(
        (put["host"].as_str(), put["port"].as_u64(), put["path"].as_str()),
        (Some("edited2.test"), Some(1234), Some("/foo"))
    );

    // The link's methods: Kong's entity methods; POST is 405.
    let (_, head, _) = raw(&admin, "OPTIONS", &format!("/routes/{route_id}/service"), None).await?;
    assert_eq!(header(&head, "allow"), Some("DELETE, GET, HEAD, OPTIONS, PATCH, PUT"));
    let (status, body) = call(&client, "POST", &format!("/routes/{route_id}/service"), Some(&json!({}))).await;
    assert_eq!((status, body["message"].as_str()), (405, Some("Method not allowed")));
    // Other links are served the same way (Kong generates one per foreign key).
    let plugin = json!({"name": "key-auth", "route": {"id": route_id}});
    let plugin = client.post("/plugins", &plugin).await?.body;
    let plugin_id = plugin["id"].as_str().expect("id");
    let (status, body) = call(&client, "GET", &format!("/plugins/{plugin_id}/route"), None).await;
    assert_eq!((status, body["id"].as_str()), (200, Some(route_id)));
    let (status, _) = call(&client, "GET", &format!("/plugins/{plugin_id}/service"), None).await;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_targets_as_kong_lists_them() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    // 08-targets_routes_spec.lua:628-637: an upstream with ten targets.
    client.post("/upstreams", &json!({"name": "all-targets.test"})).await?;
    for i in 1..=10 {
        client
            .post("/upstreams/all-targets.test/targets", &json!({"target": format!("api-{i}:80"), "weight": 100}))
            .await?;
    }
    let path = "/upstreams/all-targets.test/targets/all";

    // 08-targets_routes_spec.lua:639 "retrieves the first page"
    let (status, body) = call(&client, "GET", path, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(10), "{body}");

    // 08-targets_routes_spec.lua:648 "offset is a string"
    let (_, body) = call(&client, "GET", &format!("{path}?size=3"), None).await;
    let offset = body["offset"].as_str().expect("offset is a string");
    // 08-targets_routes_spec.lua:658 "next url ends with /targets/all"
    assert_eq!(body["next"], json!(format!("{path}?offset={offset}")));

    // 08-targets_routes_spec.lua:668 "paginates a set"
    let mut pages: Vec<Value> = Vec::new();
    let mut offset: Option<String> = None;
    for i in 1..=4 {
        let page_path = match &offset {
            Some(offset) => format!("{path}?size=3&offset={offset}"),
            None => format!("{path}?size=3"),
        };
        let (status, page) = call(&client, "GET", &page_path, None).await;
        assert_eq!(status, 200);
        assert_eq!(page["data"].as_array().map(Vec::len), Some(if i < 4 { 3 } else { 1 }), "page {i}: {page}");
        if let Some(previous) = pages.last() {
            assert_ne!(previous, &page, "check all pages are different");
        }
        offset = page["offset"].as_str().map(str::to_string);
        pages.push(page);
    }
    assert!(offset.is_none(), "the last page has no offset");

    // 08-targets_routes_spec.lua:696 "ignores filters"
    let (status, _) = call(&client, "GET", &format!("{path}?foo=bar"), None).await;
    assert_eq!(status, 200);
    // 08-targets_routes_spec.lua:704 "ignores an invalid body"
    let reply = client
        .request_bytes(http::Method::GET, path, "application/json", b"this fails if decoded as json".to_vec())
        .await?;
    assert_eq!(reply.status, 200);

    // 08-targets_routes_spec.lua:717 "data property is an empty array"
    client.post("/upstreams", &json!({"name": "empty.test"})).await?;
    let (status, body) = call(&client, "GET", "/upstreams/empty.test/targets/all", None).await;
    assert_eq!((status, body), (200, json!({"data": [], "next": null})));

    // "all": weight 0 included (kong/db/dao/targets.lua page_for_upstream_raw).
    client.post("/upstreams/all-targets.test/targets", &json!({"target": "api-0:80", "weight": 0})).await?;
    let (_, body) = call(&client, "GET", path, None).await;
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 11, "{body}");
    assert!(data.iter().any(|target| target["target"] == "api-0:80" && target["weight"] == 0));
    // An unknown upstream is 404; the path takes GET only.
    let (status, _) = call(&client, "GET", "/upstreams/no-such.test/targets/all", None).await;
    assert_eq!(status, 404);
    let (status, body) = call(&client, "DELETE", path, None).await;
    assert_eq!((status, body["message"].as_str()), (405, Some("Method not allowed")));
    Ok(())
}
