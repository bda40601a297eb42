//! Kong's Admin API errors and validation, replayed from Kong's own specs: the shapes
//! of `kong/db/errors.lua` (`@entity` a list, array elements at their position, plugin
//! configs nested, unique and foreign key violations naming the values, `size` and
//! `offset`), and the validation rows Kong's schemas add (gRPC routes, distinct hash
//! headers, a target's default port, nested deletes, `path_handling`). Each case names
//! its spec file and line (Kong's repository, under spec/).

use serde_json::{json, Value};
use tollgate_tests::TestCluster;

/// One raw JSON exchange: status and the body as sent, parsed.
async fn call(admin_url: &str, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
    let (status, text) = tollgate_tests::admin_exchange(admin_url, method, path, body).await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_have_kongs_shapes() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let admin = cluster.nodes[0].admin_url();

    // 04-admin_api/03-consumers_routes_spec.lua:573-582.
    let (status, body) =
        call(&admin, "PUT", "/consumers/0b7ac6c4-2d3f-4c65-a7d4-1b2a8bd6a6b3", Some(&json!({}))).await?;
    assert_eq!(status, 400);
    let message = "at least one of these fields must be non-empty: 'custom_id', 'username'";
    assert_eq!(
        body,
        json!({"code": 2, "name": "schema violation", "message": format!("schema violation ({message})"),
               "fields": {"@entity": [message]}})
    );

    // 04-admin_api/09-routes_routes_spec.lua:312-330.
    let (status, body) = call(&admin, "POST", "/routes", Some(&json!({}))).await?;
    assert_eq!(status, 400);
    let message = "must set one of 'methods', 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'https'";
    assert_eq!(
        body,
        json!({"code": 2, "name": "schema violation", "message": format!("schema violation ({message})"),
               "fields": {"@entity": [message]}})
    );

    // 04-admin_api/09-routes_routes_spec.lua:354-371: an array element's error.
    let (status, body) =
        call(&admin, "POST", "/routes", Some(&json!({"methods": ["GET"], "protocols": ["foo", "http"]}))).await?;
    assert_eq!(status, 400);
    let protocols = body["fields"]["protocols"].as_array().cloned().unwrap_or_default();
    assert_eq!(protocols.len(), 1, "{body}");
    assert!(protocols[0].as_str().unwrap_or_default().starts_with("expected one of: "), "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap_or_default()
        .starts_with("schema violation (protocols.1: expected one of: "));
    // The same for the second element: `null` stands for the first.
    let (_, body) = call(&admin, "POST", "/routes", Some(&json!({"paths": ["/ok", "foo"]}))).await?;
    assert_eq!(body["fields"], json!({"paths": [null, "should start with: / (fixed path) or ~/ (regex path)"]}));
    assert_eq!(body["message"], "schema violation (paths.2: should start with: / (fixed path) or ~/ (regex path))");

    // 03-plugins/36-request-transformer/03-api_spec.lua:55-75: a plugin config's
    // errors nest as the config does.
    let plugin = json!({"name": "request-transformer", "config": {"add": {"headers": ["just_a_key"]}}});
    let (status, body) = call(&admin, "POST", "/plugins", Some(&plugin)).await?;
    assert_eq!(status, 400);
    assert_eq!(body["fields"], json!({"config": {"add": {"headers": ["invalid value: just_a_key"]}}}));

    // 04-admin_api/07-upstreams_routes_spec.lua:473-485 and
    // 03-db/02-db_core_entities_spec.lua:1464-1488: the unique values.
    call(&admin, "POST", "/upstreams", Some(&json!({"name": "my.upstream"}))).await?;
    let (status, body) = call(&admin, "POST", "/upstreams", Some(&json!({"name": "my.upstream"}))).await?;
    assert_eq!(status, 409);
    assert_eq!(
        body,
        json!({"code": 5, "name": "unique constraint violation",
               "message": "UNIQUE violation detected on '{name=\"my.upstream\"}'", "fields": {"name": "my.upstream"}})
    );

    // 03-db/02-db_core_entities_spec.lua:2016-2043: a dangling reference.
    let missing = "5e1a2e2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    let (status, body) =
        call(&admin, "POST", "/routes", Some(&json!({"paths": ["/x"], "service": {"id": missing}}))).await?;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"code": 4, "name": "foreign key violation",
               "message": format!("the foreign key '{{id=\"{missing}\"}}' does not reference an existing 'services' entity."),
               "fields": {"service": {"id": missing}}})
    );

    // 04-admin_api/09-routes_routes_spec.lua:544-563 and :565-585.
    let (status, body) = call(&admin, "GET", "/routes?size=x", None).await?;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"code": 9, "name": "invalid size", "message": "size must be a number"}));
    let (_, body) = call(&admin, "GET", "/routes?size=1001", None).await?;
    assert_eq!(
        body,
        json!({"code": 9, "name": "invalid size", "message": "size must be an integer between 1 and 1000"})
    );
    let (status, body) = call(&admin, "GET", "/routes?offset=x", None).await?;
    assert_eq!(status, 400);
    assert_eq!((body["code"].clone(), body["name"].clone()), (json!(7), json!("invalid offset")));
    assert!(body["message"].as_str().unwrap_or_default().starts_with("'x' is not a valid offset"), "{body}");
    assert!(body.get("fields").is_none(), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_rows_kong_adds() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let admin = cluster.nodes[0].admin_url();

    // 04-admin_api/09-routes_routes_spec.lua:960-1031: gRPC routes.
    let route = json!({"protocols": ["grpc", "grpcs"], "paths": ["/"], "strip_path": true});
    let (status, body) = call(&admin, "POST", "/routes", Some(&route)).await?;
    assert_eq!(status, 400);
    let why = "cannot set 'strip_path' when 'protocols' is 'grpc' or 'grpcs'";
    assert_eq!(
        body,
        json!({"code": 2, "name": "schema violation", "message": format!("schema violation (strip_path: {why})"),
               "fields": {"strip_path": why}})
    );
    let route = json!({"protocols": ["grpc", "grpcs"], "paths": ["/"], "methods": ["GET"]});
    let (status, body) = call(&admin, "POST", "/routes", Some(&route)).await?;
    assert_eq!(status, 400);
    assert_eq!(body["fields"], json!({"methods": "cannot set 'methods' when 'protocols' is 'grpc' or 'grpcs'"}));
    let (status, body) = call(&admin, "POST", "/routes", Some(&json!({"protocols": ["grpc", "grpcs"]}))).await?;
    assert_eq!(status, 400);
    assert_eq!(
        body["fields"]["@entity"],
        json!(["must set one of 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'grpcs'"])
    );
    // A gRPC route keeps its path by default.
    let (status, body) =
        call(&admin, "POST", "/routes", Some(&json!({"protocols": ["grpc"], "paths": ["/g"]}))).await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["strip_path"], false);

    // 04-admin_api/07-upstreams_routes_spec.lua:318-334.
    let upstream = json!({"name": "my.upstream", "hash_on": "header", "hash_fallback": "header",
                          "hash_on_header": "headername", "hash_fallback_header": "headername"});
    let (status, body) = call(&admin, "POST", "/upstreams", Some(&upstream)).await?;
    assert_eq!(status, 400);
    assert_eq!(
        body["fields"],
        json!({"@entity": ["values of these fields must be distinct: 'hash_on_header', 'hash_fallback_header'"]})
    );

    // 04-admin_api/08-targets_routes_spec.lua:78-93: the default port.
    call(&admin, "POST", "/upstreams", Some(&json!({"name": "pool"}))).await?;
    let (status, body) =
        call(&admin, "POST", "/upstreams/pool/targets", Some(&json!({"target": "konghq.test"}))).await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["target"], "konghq.test:8000");
    let (status, body) = call(&admin, "GET", "/upstreams/pool/targets/konghq.test", None).await?;
    assert_eq!((status, body["target"].clone()), (200, json!("konghq.test:8000")));
    let (_, body) = call(&admin, "POST", "/upstreams/pool/targets", Some(&json!({"target": "::1"}))).await?;
    assert_eq!(body["target"], "[::1]:8000");

    // 04-admin_api/03-consumers_routes_spec.lua:1019-1028: a nested DELETE of a plugin
    // that is not there is 404; 04-plugins_routes_spec.lua:418-430: at the top 204.
    let (_, route) = call(&admin, "POST", "/routes", Some(&json!({"paths": ["/d"]}))).await?;
    let route_id = route["id"].as_str().unwrap_or_default().to_string();
    let missing = "5e1a2e2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    let (status, body) = call(&admin, "DELETE", &format!("/routes/{route_id}/plugins/{missing}"), None).await?;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["message"], "Not found");
    let (status, _) = call(&admin, "DELETE", &format!("/plugins/{missing}"), None).await?;
    assert_eq!(status, 204);

    // kong/db/schema/entities/routes.lua:202: `v1` is accepted (deprecated).
    let (status, body) =
        call(&admin, "POST", "/routes", Some(&json!({"paths": ["/v1"], "path_handling": "v1"}))).await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        call(&admin, "POST", "/routes", Some(&json!({"paths": ["/v2"], "path_handling": "v2"}))).await?;
    assert_eq!(status, 400);
    assert_eq!(body["fields"], json!({"path_handling": "expected one of: v0, v1"}));
    Ok(())
}
