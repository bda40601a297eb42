//! Kong's Admin API input, replayed from Kong's own specs: bodies (form-encoded and
//! multipart as Kong's docs send them, 415, Kong's "Cannot parse JSON body"), and list
//! filters: `?tags=` (AND with `,`, OR with
//! `/`, Kong's errors, the `next` link keeping the filter, ignored on nested lists),
//! `/tags` and `/tags/{tag}`, and `/consumers?custom_id=`. Each test names the spec
//! file and line it replays (Kong's repository, spec/02-integration/04-admin_api/).
//! Before, `?tags=` and `?custom_id=` were ignored: a tool scoping by tags saw, and
//! could delete, every entity.

use serde_json::{json, Value};
use tollgate_client::AdminClient;
use tollgate_tests::TestCluster;

/// Kong's fixture (14-tags_spec.lua:19-37): two consumers tagged `corp_ a`,
/// `consumer_ i` and 🦍, each with a plugin tagged `corp_ a` and `consumer_ i`.
async fn tagged_consumers(client: &AdminClient) -> anyhow::Result<()> {
    for i in 1..=2 {
        let username = format!("adminapi-filter-by-tag-{i}");
        let tags = json!(["corp_ a", format!("consumer_ {i}"), "🦍"]);
        client.post("/consumers", &json!({"username": username, "tags": tags})).await?;
        let plugin =
            json!({"name": "rate-limiting", "config": {"minute": 10}, "tags": ["corp_ a", format!("consumer_ {i}")]});
        client.post(&format!("/consumers/{username}/plugins"), &plugin).await?;
    }
    Ok(())
}

async fn get(client: &AdminClient, path: &str) -> (u16, Value) {
    match client.get(path).await {
        Ok(reply) => (reply.status, reply.body),
        Err(error) => {
            let status = error.status().unwrap_or(0);
            let body = error.api_error().map(|e| e.to_json()).unwrap_or(Value::Null);
            (status, body)
        }
    }
}

fn tags_of(entity: &Value) -> Vec<&str> {
    entity["tags"].as_array().map(|tags| tags.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_filter_lists_as_kong_does() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    tagged_consumers(&client).await?;
    // Untagged entities, which a filter must leave out.
    client.post("/consumers", &json!({"username": "untagged"})).await?;
    client.post("/services", &json!({"name": "s", "url": "http://example.com", "tags": ["corp_ a"]})).await?;

    // 14-tags_spec.lua:50 "filter by single tag"
    let (status, body) = get(&client, "/consumers?tags=corp_%20a").await;
    assert_eq!(status, 200);
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2, "{body}");
    assert!(data.iter().all(|c| tags_of(c).contains(&"corp_ a")));

    // 14-tags_spec.lua:63 "filter by single unicode tag"
    let (status, body) = get(&client, "/consumers?tags=%F0%9F%A6%8D").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2), "{body}");

    // 14-tags_spec.lua:76 "filter by empty tag"
    let (status, body) = get(&client, "/consumers?tags=").await;
    assert_eq!(status, 400);
    assert_eq!(body["message"], "invalid option (tags: cannot be null)");

    // 14-tags_spec.lua:86 "filter by empty string tag"
    let (status, body) = get(&client, "/consumers?tags=''").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(0), "{body}");

    // 14-tags_spec.lua:96 "filter by multiple tags with AND"
    let (status, body) = get(&client, "/consumers?tags=corp_%20a,consumer_%201").await;
    assert_eq!(status, 200);
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "{body}");
    assert_eq!(tags_of(&data[0]).len(), 3);
    for tag in ["corp_ a", "consumer_ 1", "🦍"] {
        assert!(tags_of(&data[0]).contains(&tag));
    }

    // 14-tags_spec.lua:110 "filter by multiple tags with OR"
    let (status, body) = get(&client, "/consumers?tags=consumer_%202/consumer_%201").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2), "{body}");

    // 14-tags_spec.lua:120 "ignores tags when filtering by multiple filters #6779"
    let (status, body) = get(&client, "/consumers/adminapi-filter-by-tag-1/plugins?tags=consumer_%202").await;
    assert_eq!(status, 200);
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "{body}");
    assert!(tags_of(&data[0]).contains(&"consumer_ 1") && !tags_of(&data[0]).contains(&"consumer_ 2"));

    // 14-tags_spec.lua:131 "errors if filter by mix of AND and OR"
    for path in [
        "/consumers?tags=consumer_%203,consumer_%202/consumer_%201",
        "/consumers?tags=consumer_%203/consumer_%202,consumer_%201",
    ] {
        let (status, body) = get(&client, path).await;
        assert_eq!(status, 400);
        assert_eq!(body["message"], "invalid option (tags: invalid filter syntax)");
    }

    // 14-tags_spec.lua:149 "errors if filter by tag with invalid value"
    let (status, body) = get(&client, "/consumers?tags=%FF").await;
    assert_eq!(status, 400);
    assert_eq!(body["message"], "invalid option (tags: invalid filter syntax)");

    // 14-tags_spec.lua:159 "returns the correct 'next' arg"
    let (status, body) = get(&client, "/consumers?tags=corp_%20a&size=1").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
    let next = body["next"].as_str().expect("a next page");
    assert!(next.contains("tags=corp_%20a"), "{next}");
    let (_, second) = get(&client, next).await;
    assert_eq!(second["data"].as_array().map(Vec::len), Some(1), "the next page keeps the filter: {second}");
    assert!(second["next"].is_null(), "and it ends there: {second}");

    // Across kinds: the service is tagged too, the untagged consumer is not listed.
    let (_, body) = get(&client, "/services?tags=corp_%20a").await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_endpoints_list_every_tag() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    // 14-tags_spec.lua:177-192: two consumers with two tags each.
    for i in 1..=2 {
        let body =
            json!({"username": format!("adminapi-filter-by-tag-{i}"), "tags": ["corp_ a", format!("consumer_ {i}")]});
        client.post("/consumers", &body).await?;
    }
    // 14-tags_spec.lua:226 "/tags"
    let (status, body) = get(&client, "/tags").await;
    assert_eq!(status, 200);
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 4, "{body}");
    assert!(data.iter().all(|row| row["entity_name"] == "consumers" && row["entity_id"].is_string()));
    // 14-tags_spec.lua:231 "/tags/:tags"
    let (_, body) = get(&client, "/tags/corp_%20a").await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2), "{body}");
    // 14-tags_spec.lua:236 "/tags/:tags with a not exist tag"
    let (_, body) = get(&client, "/tags/does-not-exist").await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(0), "{body}");
    // 14-tags_spec.lua:241 "/tags/:tags with invalid :tags value"
    let (status, body) = get(&client, "/tags/%FF").await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().is_some_and(|m| m.contains("invalid utf-8")), "{body}");
    // 14-tags_spec.lua:251 and :259 "ignores ?tags= query"
    let (_, body) = get(&client, "/tags?tags=not_a_tag").await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(4));
    let (_, body) = get(&client, "/tags/corp_%20a?tags=invalid@tag").await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_by_custom_id() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    let created = client.post("/consumers", &json!({"custom_id": "abc 123"})).await?;
    let uuid_like = "6f5b5f3c-2b0f-4c41-9f43-2a9a6f7d2b11";
    let uuid_consumer = client.post("/consumers", &json!({"custom_id": uuid_like})).await?;
    client.post("/consumers", &json!({"username": "other"})).await?;

    // 03-consumers_routes_spec.lua:250 "not crashed by empty custom_id #KAG-867"
    for path in ["/consumers?custom_id=", "/consumers?custom_id"] {
        let (status, body) = get(&client, path).await;
        assert_eq!(status, 400, "{path}");
        assert!(body.is_object());
    }
    // 03-consumers_routes_spec.lua:258 "allows filtering by custom_id"
    let (status, body) = get(&client, "/consumers?custom_id=abc%20123").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!([created.body]));
    // 03-consumers_routes_spec.lua:269 "allows filtering by uuid-like custom_id"
    let (_, body) = get(&client, &format!("/consumers?custom_id={uuid_like}")).await;
    assert_eq!(body["data"], json!([uuid_consumer.body]));
    // 03-consumers_routes_spec.lua:280 "returns empty json array when consumer does not exist"
    let (status, body) = get(&client, "/consumers?custom_id=does-not-exist").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!([]));
    Ok(())
}

/// Sends `body` as `content_type` ("" for none) and returns status and answer.
async fn send(client: &AdminClient, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let method = http::Method::from_bytes(method.as_bytes()).expect("method");
    match client.request_bytes(method, path, content_type, body.to_vec()).await {
        Ok(reply) => (reply.status, reply.body),
        Err(error) => (error.status().unwrap_or(0), error.api_error().map(|e| e.to_json()).unwrap_or(Value::Null)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_kong_accepts_and_refuses() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();

    // 03-consumers_routes_spec.lua:135 "returns 415 on invalid content-type"
    let (status, _) = send(&client, "POST", "/consumers", "invalid", br#"{"hello": "world"}"#).await;
    assert_eq!(status, 415);
    // 03-consumers_routes_spec.lua:144 "returns 415 on missing content-type with body"
    let (status, _) = send(&client, "POST", "/consumers", "", b"invalid").await;
    assert_eq!(status, 415);
    // 03-consumers_routes_spec.lua:151 "returns 400 on missing body with application/json"
    let (status, body) = send(&client, "POST", "/consumers", "application/json", b"").await;
    assert_eq!((status, body), (400, json!({"message": "Cannot parse JSON body"})));
    // 03-consumers_routes_spec.lua:555 "handles malformed JSON body" (PUT)
    let (status, body) = send(&client, "PUT", "/consumers/x", "application/json", br#"{"hello": "world""#).await;
    assert_eq!((status, body), (400, json!({"message": "Cannot parse JSON body"})));
    assert!(client.get("/consumers").await?.body["data"].as_array().is_some_and(Vec::is_empty), "nothing was made");

    // 10-services_routes_spec.lua:53 "creates a service", form-encoded (the form of
    // every example in Kong's docs) and multipart.
    let form = "application/x-www-form-urlencoded";
    let (status, service) = send(&client, "POST", "/services", form, b"protocol=http&host=service.test").await;
    assert_eq!(status, 201, "{service}");
    assert!(service["id"].is_string() && service["created_at"].is_number() && service["updated_at"].is_number());
    assert_eq!(service["name"], Value::Null);
    assert_eq!((service["protocol"].as_str(), service["host"].as_str()), (Some("http"), Some("service.test")));
    assert_eq!(service["port"], 80);
    for timeout in ["connect_timeout", "write_timeout", "read_timeout"] {
        assert_eq!(service[timeout], 60000);
    }
    let multipart = "--B0undary\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nmulti\r\n\
                     --B0undary\r\nContent-Disposition: form-data; name=\"url\"\r\n\r\nhttp://multi.test:8080/p\r\n\
                     --B0undary--\r\n";
    let (status, multi) =
        send(&client, "POST", "/services", "multipart/form-data; boundary=B0undary", multipart.as_bytes()).await;
    assert_eq!(status, 201, "{multi}");
    assert_eq!(
        (multi["host"].as_str(), multi["port"].as_u64(), multi["path"].as_str()),
        (Some("multi.test"), Some(8080), Some("/p"))
    );

    // 09-routes_routes_spec.lua:69 "creates a route", form-encoded: lists, a header
    // map and the service by `service.id`.
    let service_id = service["id"].as_str().expect("id");
    let route_form = format!(
        "protocols%5B1%5D=http&hosts%5B1%5D=my.route.test&headers.location%5B1%5D=my-location&service.id={service_id}"
    );
    let (status, route) = send(&client, "POST", "/routes", form, route_form.as_bytes()).await;
    assert_eq!(status, 201, "{route}");
    assert_eq!(route["hosts"], json!(["my.route.test"]));
    assert_eq!(route["headers"], json!({"location": ["my-location"]}));
    assert!(route["created_at"].is_number() && route["regex_priority"].is_number() && route["id"].is_string());
    assert_eq!((route["name"].clone(), route["paths"].clone()), (Value::Null, Value::Null));
    assert_eq!((route["preserve_host"].as_bool(), route["strip_path"].as_bool()), (Some(false), Some(true)));

    // 10-services_routes_spec.lua:520 "creates a plugin config for a Service" (the
    // inputs at :505: `config.key_names[1]`), and the docs' `config.minute=5`.
    let path = format!("/services/{service_id}/plugins");
    let body = "name=key-auth&config.key_names%5B1%5D=apikey&config.key_names%5B2%5D=key";
    let (status, plugin) = send(&client, "POST", &path, form, body.as_bytes()).await;
    assert_eq!(status, 201, "{plugin}");
    assert_eq!(plugin["name"], "key-auth");
    assert_eq!(plugin["config"]["key_names"], json!(["apikey", "key"]));
    let body = "name=rate-limiting&config.minute=5&config.policy=local&config.hide_client_headers=true";
    let (status, plugin) = send(&client, "POST", &path, form, body.as_bytes()).await;
    assert_eq!(status, 201, "{plugin}");
    assert_eq!(
        (plugin["config"]["minute"].as_f64(), plugin["config"]["hide_client_headers"].as_bool()),
        (Some(5.0), Some(true))
    );
    // A value the config cannot take is still refused, naming the field.
    let (status, error) = send(&client, "POST", &path, form, b"name=rate-limiting&config.minute=often").await;
    assert_eq!(status, 400, "{error}");
    assert!(error["fields"].to_string().contains("minute"), "{error}");
    Ok(())
}

/// Raw HTTP/1.1 exchange with the Admin API (HEAD and OPTIONS need no client support).
async fn exchange(admin_url: &str, request: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = admin_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_status_methods_and_pages_as_kong_answers() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    let admin = cluster.node(1).admin_url();

    // 02-kong_routes_spec.lua:35 "returns headers with HEAD method"
    let got = exchange(&admin, "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await?;
    let head = exchange(&admin, "HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await?;
    assert!(got.starts_with("HTTP/1.1 200") && head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");
    assert_eq!(header(&got, "content-length"), header(&head, "content-length"));
    assert_eq!(header(&got, "content-type"), header(&head, "content-type"));

    // 02-kong_routes_spec.lua:59 "returns allow and CORS headers with OPTIONS method"
    let options = exchange(&admin, "OPTIONS / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await?;
    assert!(options.starts_with("HTTP/1.1 204"), "{options}");
    assert_eq!(header(&options, "allow"), Some("GET, HEAD, OPTIONS"));
    assert_eq!(header(&options, "access-control-allow-methods"), Some("GET, HEAD, OPTIONS"));
    assert_eq!(header(&options, "access-control-allow-headers"), Some("Content-Type"));
    assert_eq!(header(&options, "access-control-allow-origin"), Some("*"));
    let options = exchange(&admin, "OPTIONS /services/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await?;
    assert_eq!(header(&options, "allow"), Some("DELETE, GET, HEAD, OPTIONS, PATCH, PUT"));

    // 02-kong_routes_spec.lua:74 "returns Kong's version number, edition info and tagline"
    // (the tagline is Tollgate's own) and :117 "exposes the node's configuration".
    let (status, root) = get(&client, "/").await;
    assert_eq!(status, 200);
    assert!(root["version"].is_string() && root["edition"] == "community", "{root}");
    assert!(root["configuration"].is_object(), "{root}");
    // decK reads configuration.database: not "off", Tollgate has the entity API.
    assert_ne!(root["configuration"]["database"], "off");
    // 02-kong_routes_spec.lua:126 "enabled_in_cluster property is an array"
    assert!(root["plugins"]["enabled_in_cluster"].is_array(), "{root}");

    // 02-kong_routes_spec.lua:103 "returns 405 on invalid method"
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let (status, body) = send(&client, method, "/", "application/json", b"{}").await;
        assert_eq!((status, body), (405, json!({"message": "Method not allowed"})), "{method} /");
    }

    // 02-kong_routes_spec.lua:197 "returns status info"
    let (status, body) = get(&client, "/status").await;
    assert_eq!(status, 200);
    for counter in [
        "connections_accepted",
        "connections_active",
        "connections_handled",
        "connections_reading",
        "connections_writing",
        "connections_waiting",
        "total_requests",
    ] {
        assert!(body["server"][counter].is_number(), "server.{counter} in {body}");
    }
    assert_eq!(body["database"]["reachable"], true);

    // An empty page has no `offset` (Kong sends it only with a next page:
    // 10-services_routes_spec.lua:496 `{ data = { route }, next = cjson.null }`).
    let (_, page) = get(&client, "/services").await;
    assert_eq!(page, json!({"data": [], "next": null}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utf8_names() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    // 10-services_routes_spec.lua:259 "retrieves by utf-8 name and percent-escaped
    // utf-8 name" (the raw form needs a client that sends non-ASCII request targets).
    let created = client.post("/services", &json!({"name": "円", "url": "http://example.test"})).await?;
    let (status, found) = get(&client, "/services/%E5%86%86").await;
    assert_eq!(status, 200);
    assert_eq!(found, created.body);
    let route = client.post("/services/%E5%86%86/routes", &json!({"name": "ルート", "paths": ["/yen"]})).await?;
    assert_eq!(route.body["name"], "ルート");
    // Kong's utf8_name (kong/db/schema/typedefs.lua:137): ASCII beyond letters, digits
    // and `.-_~` is refused, with Kong's message.
    let error = client.post("/services", &json!({"name": "a b", "url": "http://example.test"})).await.unwrap_err();
    let error = error.api_error().expect("an API error");
    assert_eq!(
        error.fields.get("name").map(String::as_str),
        Some("invalid value 'a b': the only accepted ascii characters are alphanumerics or ., -, _, and ~")
    );
    Ok(())
}
