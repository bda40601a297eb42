//! The Admin API's contract on a single node: Kong's shapes, and bad input of every
//! class refused with the field named, changing nothing, the node still serving.

use serde_json::{json, Value};
use tollgate_client::{AdminClient, ErrorCode};
use tollgate_tests::{eventually, TestCluster, CONVERGE_TIMEOUT};

/// The whole config and version, to show a refused write changed nothing.
async fn snapshot(client: &AdminClient) -> (Value, u64) {
    let reply = client.get("/config").await.expect("GET /config");
    (reply.body, reply.config_version.expect("version"))
}

async fn seeded() -> anyhow::Result<(TestCluster, AdminClient)> {
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "orders", "url": "http://orders:8080/api"})).await?;
    client.post("/services/orders/routes", &json!({"name": "orders-route", "paths": ["/orders"]})).await?;
    Ok((cluster, client))
}

/// Sends a raw body and returns status and JSON answer.
async fn raw(client: &AdminClient, method: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let method = http::Method::from_bytes(method.as_bytes()).expect("method");
    match client.request_bytes(method, path, "application/json", body).await {
        Ok(reply) => (reply.status, reply.body),
        Err(tollgate_client::ClientError::Api { status, error, .. }) => (status, error.to_json()),
        Err(other) => panic!("{path}: {other}"),
    }
}

async fn assert_refused(client: &AdminClient, method: &str, path: &str, body: Vec<u8>, status: u16, field: &str) {
    let before = snapshot(client).await;
    let (got_status, answer) = raw(client, method, path, body).await;
    assert_eq!(got_status, status, "{method} {path}: {answer}");
    // `fields` nests as Kong's does; the client's flat paths name each message.
    let named = tollgate_client::ApiError::from_json(&answer).map(|error| error.fields).unwrap_or_default();
    let names =
        |key: &String| key == field || key.starts_with(&format!("{field}[")) || key.starts_with(&format!("{field}."));
    assert!(named.keys().any(names), "{method} {path}: field '{field}' not named in {answer}");
    assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    assert_eq!(snapshot(client).await, before, "{method} {path} changed the config");
    assert_eq!(client.get("/status").await.expect("still serving").status, 200);
}

/// Kong's answer, exactly (spec/02-integration/04-admin_api/10-services_routes_spec.lua:857
/// "handles malformed JSON body"; 03-consumers_routes_spec.lua:151 for an empty JSON body).
#[tokio::test]
async fn malformed_json() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    for body in [b"{\"name\": \"x\",".to_vec(), Vec::new()] {
        let before = snapshot(&client).await;
        let (status, answer) = raw(&client, "POST", "/services", body).await;
        assert_eq!(status, 400);
        assert_eq!(answer, json!({"message": "Cannot parse JSON body"}));
        assert_eq!(snapshot(&client).await, before, "nothing changed");
    }
    Ok(())
}

#[tokio::test]
async fn unknown_fields() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    let body = json!({"name": "x", "host": "x.internal", "colour": "red"}).to_string().into_bytes();
    assert_refused(&client, "POST", "/services", body, 400, "colour").await;
    Ok(())
}

#[tokio::test]
async fn wrong_types() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    let body = json!({"name": "x", "host": "x.internal", "port": "eighty"}).to_string().into_bytes();
    assert_refused(&client, "POST", "/services", body, 400, "port").await;
    let body = json!({"paths": "/not-an-array"}).to_string().into_bytes();
    assert_refused(&client, "PATCH", "/routes/orders-route", body, 400, "paths").await;
    Ok(())
}

#[tokio::test]
async fn dangling_references() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    let body =
        json!({"paths": ["/x"], "service": {"id": "00000000-0000-4000-8000-000000000000"}}).to_string().into_bytes();
    assert_refused(&client, "POST", "/routes", body, 400, "service").await;
    // Deleting a service that routes reference is refused too (Kong's restrict).
    let error = client.delete("/services/orders").await.unwrap_err();
    assert_eq!(error.api_error().map(|e| e.code), Some(ErrorCode::ForeignKeyViolation));
    assert_eq!(client.get("/services/orders").await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn duplicate_names() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    let body = json!({"name": "orders", "host": "elsewhere.internal"}).to_string().into_bytes();
    assert_refused(&client, "POST", "/services", body, 409, "name").await;
    Ok(())
}

#[tokio::test]
async fn ten_megabyte_body() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    let mut body = b"{\"name\": \"big\", \"host\": \"big.internal\", \"tags\": [\"".to_vec();
    body.extend(std::iter::repeat_n(b'a', 10 * 1024 * 1024));
    body.extend(b"\"]}");
    assert_refused(&client, "POST", "/services", body, 413, "@body").await;
    Ok(())
}

#[tokio::test]
async fn unknown_plugin_name() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    let body = json!({"name": "no-such-plugin"}).to_string().into_bytes();
    assert_refused(&client, "POST", "/plugins", body, 400, "name").await;
    Ok(())
}

/// Kong's `GET /plugins/enabled` (spec/02-integration/04-admin_api/04-plugins_routes_spec.lua:40-50):
/// every plugin this build runs, from the one registry the Admin API's validation
/// reads too, so each listed name is accepted and an unlisted one refused.
#[tokio::test]
async fn the_enabled_plugins_are_the_ones_accepted() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    let listed = client.get("/plugins/enabled").await?;
    assert_eq!(listed.status, 200);
    let names: Vec<String> = serde_json::from_value(listed.body["enabled_plugins"].clone())?;
    assert_eq!(names.len(), 18, "{names:?}");
    for expected in ["key-auth", "jwt", "proxy-cache", "response-transformer", "opentelemetry", "http-log"] {
        assert!(names.iter().any(|name| name == expected), "{expected} in {names:?}");
    }
    // Each listed plugin is accepted by name: its config may be refused, never its name.
    for name in &names {
        let body = json!({"name": name, "enabled": false}).to_string().into_bytes();
        let (_, answer) = raw(&client, "POST", "/plugins", body).await;
        assert!(answer["fields"].get("name").is_none(), "{name}: {answer}");
    }
    let (status, answer) =
        raw(&client, "POST", "/plugins", json!({"name": "aws-lambda"}).to_string().into_bytes()).await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["fields"]["name"],
        "plugin 'aws-lambda' not enabled; add it to the 'plugins' configuration property"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_declarative_document() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    let body = json!({"_format_version": "3.0", "services": [{"name": "a", "host": "a.internal", "routes": [{"paths": ["bad"]}]}]})
        .to_string()
        .into_bytes();
    assert_refused(&client, "POST", "/config", body, 400, "services[0].routes[0].paths").await;
    Ok(())
}

#[tokio::test]
async fn kong_shapes_crud_nesting_and_pagination() -> anyhow::Result<()> {
    let (_cluster, client) = seeded().await?;
    // PUT upserts by name; PATCH changes one field; GET by id or name.
    let put = client.put("/services/payments", &json!({"host": "payments.internal"})).await?;
    assert_eq!(put.status, 200, "Kong answers PUT with 200, created or not");
    let id = put.body["id"].as_str().expect("id").to_string();
    let again = client.put("/services/payments", &json!({"host": "payments2.internal"})).await?;
    assert_eq!((again.status, again.body["id"].as_str()), (200, Some(id.as_str())));
    let patched = client.patch(&format!("/services/{id}"), &json!({"port": 8443})).await?;
    assert_eq!(
        (patched.body["port"].as_u64(), patched.body["host"].as_str()),
        (Some(8443), Some("payments2.internal"))
    );

    // Nested credentials and targets; a nested path only reaches its own children.
    client.post("/consumers", &json!({"username": "bob"})).await?;
    let credential = client.post("/consumers/bob/key-auth", &json!({})).await?;
    assert!(credential.body["key"].as_str().is_some_and(|k| !k.is_empty()), "a key is generated");
    client.post("/upstreams", &json!({"name": "pool"})).await?;
    client.post("/upstreams/pool/targets", &json!({"target": "10.0.0.1:80"})).await?;
    assert_eq!(client.get("/upstreams/pool/targets/10.0.0.1:80").await?.body["weight"], 100);
    assert_eq!(client.get("/services/payments/routes/orders-route").await.unwrap_err().status(), Some(404));

    // Pagination walks every entity once.
    for n in 0..7 {
        client.post("/consumers", &json!({"username": format!("user{n}")})).await?;
    }
    let first = client.get("/consumers?size=3").await?;
    assert_eq!(first.body["data"].as_array().map(Vec::len), Some(3));
    assert!(first.body["next"].as_str().is_some_and(|next| next.starts_with("/consumers?offset=")));
    assert_eq!(client.list_all("/consumers").await?.len(), 8);
    assert_eq!(client.get("/consumers?size=0").await.unwrap_err().status(), Some(400));

    // Deletes cascade as Kong's do: the consumer takes its credential with it; DELETE
    // of a missing entity is 204.
    assert_eq!(client.delete("/consumers/bob").await?.status, 204);
    assert_eq!(
        client
            .get(&format!("/consumers/bob/key-auth/{}", credential.body["id"].as_str().unwrap()))
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    assert_eq!(client.delete("/consumers/bob").await?.status, 204);

    // Declarative replace is atomic and GET /config round-trips.
    let dumped = client.get("/config").await?.body;
    let replaced = client
        .post("/config", &json!({"_format_version": "3.0", "services": [{"name": "only", "url": "http://only:1"}]}))
        .await?;
    assert_eq!(replaced.status, 201);
    assert_eq!(client.list_all("/services").await?.len(), 1);
    client.post("/config", &dumped).await?;
    assert_eq!(client.get("/config").await?.body, dumped);
    Ok(())
}

#[tokio::test]
async fn admin_token_is_required_when_set() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with_token(1, "s3cret").await?;
    let url = cluster.nodes[0].admin_url();
    let anonymous = AdminClient::new([url.clone()]);
    assert_eq!(anonymous.get("/status").await.unwrap_err().status(), Some(401));
    let wrong = AdminClient::new([url.clone()]).with_token("s3cre");
    assert_eq!(wrong.get("/services").await.unwrap_err().status(), Some(401));
    let right = AdminClient::new([url]).with_token("s3cret");
    assert_eq!(right.post("/services", &json!({"name": "a", "host": "a.internal"})).await?.status, 201);
    Ok(())
}

#[tokio::test]
async fn client_moves_past_unreachable_nodes() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    // A port nothing listens on, first in the list.
    let dead = format!("http://127.0.0.1:{}", tollgate_tests::free_port());
    let live = cluster.nodes[0].admin_url();
    let client = AdminClient::new([dead.clone(), live.clone()]);
    let reply = client.post("/consumers", &json!({"username": "carol"})).await?;
    assert_eq!((reply.status, reply.node.as_str()), (201, live.as_str()));
    // With no node reachable the error says so, and names what was tried.
    let error = AdminClient::new([dead.clone()]).get("/status").await.unwrap_err();
    assert!(
        matches!(&error, tollgate_client::ClientError::Unreachable { tried, .. } if tried == &vec![dead]),
        "{error}"
    );
    Ok(())
}

/// Issue 16: `GET /status/ready` answers without the admin token (Kong's status API
/// needs none): 200 `{"message": "ready"}` on every member; 503 saying why on a node
/// left without a quorum (a leader that lost its followers included); 200 again once
/// the others are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_a_leader_with_a_quorum_and_no_token() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start_with_token(3, "s3cret").await?;
    let anonymous = |cluster: &TestCluster, id: u64| {
        let node = cluster.nodes.iter().find(|node| node.id == id).expect("known node");
        AdminClient::new([node.admin_url()])
    };
    for id in 1..=3 {
        let reply = anonymous(&cluster, id).get("/status/ready").await?;
        assert_eq!(reply.body["message"], "ready", "node {id}");
    }
    // Everything else still needs the token.
    assert_eq!(anonymous(&cluster, 1).get("/status").await.err().and_then(|e| e.status()), Some(401));
    // The leader alone: openraft 0.9 keeps it leading, but without a quorum it is not
    // ready (it can neither commit a write nor confirm a read).
    let leader = cluster.leader().await?;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for id in &others {
        cluster.node(*id).kill9();
    }
    let reason = eventually("the lone leader to turn not ready", CONVERGE_TIMEOUT, || async {
        match anonymous(&cluster, leader).get("/status/ready").await {
            Err(error) if error.status() == Some(503) => Some(error.to_string()),
            _ => None,
        }
    })
    .await?;
    assert!(reason.contains("without a quorum") || reason.contains("no leader"), "{reason}");
    for id in &others {
        cluster.node(*id).start()?;
    }
    eventually("the node to be ready again", CONVERGE_TIMEOUT, || async {
        anonymous(&cluster, leader).get("/status/ready").await.ok().map(|_| ())
    })
    .await?;
    Ok(())
}
