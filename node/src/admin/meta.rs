//! Kong's Admin API about itself and about links between entities:
//!
//! - `GET /endpoints`: every path template the API serves, Kong style
//!   (`/services/{services}/routes/{routes}`), sorted by segment;
//! - `GET /schemas/{entity}`, `GET /schemas/plugins/{name}`: the schemas writes are
//!   checked against ([`tollgate_raft_store::schema_doc`]); `POST
//!   /schemas/{entity}/validate` (and `/schemas/plugins/validate`): a create's checks
//!   without the write;
//! - `/{collection}/{key}/{field}` for a foreign key field (`/routes/{r}/service`,
//!   `/plugins/{p}/consumer`, `/snis/{s}/certificate`): the linked entity, as Kong's
//!   generated endpoints (kong/api/endpoints.lua `generate_entity_endpoints`) serve it;
//! - `GET /upstreams/{u}/targets/all`: every target of an upstream, weight 0 included.

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tollgate_raft_store::command::{Op, Outcome, Parent};
use tollgate_raft_store::schema::FieldType;
use tollgate_raft_store::schema_doc;
use tollgate_raft_store::state::{entity_id, foreign_id, page_size};
use tollgate_raft_store::{ApiError, EntityKind, ErrorCode};

use super::{
    check_certificate, fill_generated_fields, json_response, list_offset, method_not_allowed, nested_allowed,
    parse_body, read_state, top_level, versioned, write, AdminRequest, TOP_LEVEL,
};
use crate::node::Node;

type Answer = Result<Response<Full<Bytes>>, ApiError>;

/// The API's paths that are not entity collections, as Kong names its parameters.
const FIXED_ENDPOINTS: [&str; 21] = [
    "/",
    "/status",
    "/status/ready",
    "/metrics",
    "/endpoints",
    "/cluster",
    "/cluster/members",
    "/cluster/members/{node_id}",
    "/config",
    "/tags",
    "/tags/{tags}",
    "/plugins/enabled",
    "/rate-limits/{plugins}",
    "/proxy-cache",
    "/proxy-cache/{cache_key}",
    "/upstreams/{upstreams}/health",
    "/upstreams/{upstreams}/targets/all",
    "/schemas/{name}",
    "/schemas/{db_entity_name}/validate",
    "/schemas/plugins/{name}",
    "/schemas/plugins/validate",
];

/// Every path template the Admin API serves, sorted as Kong sorts them: by segment,
/// `/` lower than any character (kong/api/routes/kong.lua `/endpoints`).
pub(super) fn endpoints() -> Vec<String> {
    let mut paths: Vec<String> = FIXED_ENDPOINTS.iter().map(|path| path.to_string()).collect();
    for kind in TOP_LEVEL {
        let collection = format!("/{}", kind.path());
        let entity = format!("{collection}/{{{}}}", kind.table());
        for (field, _, _) in kind.schema().foreign_keys() {
            paths.push(format!("{entity}/{field}"));
        }
        for child in EntityKind::ALL.into_iter().filter(|child| nested_allowed(kind, *child)) {
            paths.push(format!("{entity}/{}", child.path()));
            paths.push(format!("{entity}/{}/{{{}}}", child.path(), child.table()));
        }
        paths.push(collection);
        paths.push(entity);
    }
    paths.sort_by_key(|path| path.replace('/', "\0"));
    paths.dedup();
    paths
}

pub(super) fn endpoints_response() -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, &json!({ "data": endpoints() }))
}

/// Kong's 404 for a schema it does not have: the message alone.
fn no_such(what: &str, name: &str) -> Response<Full<Bytes>> {
    json_response(StatusCode::NOT_FOUND, &json!({ "message": format!("No {what} named '{name}'") }))
}

/// `GET /schemas/{entity}`, by Kong's table name.
pub(super) fn entity_schema(table: &str) -> Response<Full<Bytes>> {
    match schema_doc::entity_schema(table) {
        Some(schema) => json_response(StatusCode::OK, &schema),
        None => no_such("entity", table),
    }
}

/// `GET /schemas/plugins/{name}`.
pub(super) fn plugin_schema(name: &str) -> Response<Full<Bytes>> {
    match schema_doc::plugin_schema(name) {
        Some(schema) => json_response(StatusCode::OK, &schema),
        None => no_such("plugin", name),
    }
}

/// `POST /schemas/{entity}/validate`: the checks a `POST /{collection}` makes before
/// its write (generated keys, certificate pairs, the schema), and no write.
/// References are not resolved, as Kong's validation does not look them up either.
pub(super) fn validate(request: &AdminRequest, table: &str) -> Answer {
    let Some(kind) = EntityKind::from_table(table) else {
        return Ok(no_such("entity", table));
    };
    let mut body = parse_body(request, Some(kind))?;
    fill_generated_fields(kind, &mut body);
    check_certificate(kind, &body)?;
    schema_doc::validate_input(kind, &body)?;
    Ok(json_response(StatusCode::OK, &json!({ "message": "schema validation successful" })))
}

/// The entity kind of `collection` and what its foreign key `field` references, when
/// `/{collection}/{key}/{field}` is a link endpoint (`/routes/{r}/service`). No
/// nested collection has the name of a foreign key field, so the two never collide
/// (a unit test checks it).
pub(super) fn foreign_link(collection: &str, field: &str) -> Option<(EntityKind, EntityKind)> {
    let kind = top_level(collection).ok()?;
    match kind.schema().field(field)?.ty {
        FieldType::Foreign { kind: target, .. } => Some((kind, target)),
        _ => None,
    }
}

/// `/{collection}/{key}/{field}`: the entity `field` links to. GET reads it, PATCH and
/// PUT write it, DELETE is 405 (Kong's: a linked entity is not deleted through the
/// link); 404 when the entity is unknown or links nothing. A PUT on an entity that
/// links nothing creates the linked entity and links it, as Kong's does (two writes:
/// the new entity stays if the link then fails, as in Kong).
pub(super) async fn foreign_entity_route(
    node: &Node,
    request: &AdminRequest,
    kind: EntityKind,
    key: &str,
    field: &str,
    target: EntityKind,
) -> Answer {
    let applied = read_state(node, request).await?;
    let entity = applied.state.find(kind, key, None)?;
    let Some(linked) = foreign_id(&entity, field) else {
        return match request.method {
            Method::PUT => link_new(node, request, kind, entity_id(&entity), field, target).await,
            _ => Err(ApiError::not_found()),
        };
    };
    let linked_key = linked.to_string();
    match request.method {
        Method::GET => {
            let found = applied.state.find(target, &linked_key, None)?;
            Ok(versioned(json_response(StatusCode::OK, &Value::Object((*found).clone())), applied.version()))
        }
        Method::PATCH => {
            let body = parse_body(request, Some(target))?;
            write(node, Op::Patch { kind: target, key: linked_key, parent: None, body: body.into() }).await
        }
        Method::PUT => {
            let mut body = parse_body(request, Some(target))?;
            fill_generated_fields(target, &mut body);
            check_certificate(target, &body)?;
            write(node, Op::Upsert { kind: target, key: linked_key, id: linked, parent: None, body: body.into() }).await
        }
        _ => Err(method_not_allowed()),
    }
}

/// PUT through a link that links nothing yet: create the entity, then link it.
async fn link_new(
    node: &Node,
    request: &AdminRequest,
    kind: EntityKind,
    id: uuid::Uuid,
    field: &str,
    target: EntityKind,
) -> Answer {
    let mut body = parse_body(request, Some(target))?;
    fill_generated_fields(target, &mut body);
    check_certificate(target, &body)?;
    let new_id = crate::env::uuid();
    let op = Op::Upsert { kind: target, key: new_id.to_string(), id: new_id, parent: None, body: body.into() };
    let created = match node.cluster.write(op).await?.0 {
        Outcome::Created(entity) | Outcome::Updated(entity) => entity.0,
        _ => return Err(ApiError::new(ErrorCode::Internal, "an upsert answered something else")),
    };
    let link = json!({ field: { "id": new_id.to_string() } });
    let (_, version) =
        node.cluster.write(Op::Patch { kind, key: id.to_string(), parent: None, body: link.into() }).await?;
    Ok(versioned(json_response(StatusCode::OK, &created), version))
}

/// `GET /upstreams/{u}/targets/all`: every target of the upstream, weight 0 included
/// (Kong's `page_for_upstream_raw`), paged as other lists; Kong's `next` names this
/// path and the offset only (08-targets_routes_spec.lua:666).
pub(super) async fn all_targets(node: &Node, request: &AdminRequest, upstream: &str) -> Answer {
    let size = page_size(request.query.get("size").map(String::as_str))?;
    let offset = list_offset(request)?;
    let applied = read_state(node, request).await?;
    let parent = Parent { kind: EntityKind::Upstream, key: upstream.to_string() };
    let (page, next) = applied.state.list(EntityKind::Target, Some(&parent), offset, size, &|_| true)?;
    let data: Vec<Value> = page.iter().map(|target| Value::Object((**target).clone())).collect();
    let upstream = crate::text::percent_encode(upstream);
    let next_path = next.map(|after| format!("/upstreams/{upstream}/targets/all?offset={after}"));
    let mut body = json!({ "data": data, "next": next_path });
    if let Some(after) = next {
        body["offset"] = Value::from(after.to_string());
    }
    Ok(versioned(json_response(StatusCode::OK, &body), applied.version()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed template, with its parameters filled in, is a path of the API.
    #[test]
    fn every_endpoint_listed_is_served() {
        let listed = endpoints();
        assert_eq!(listed.first().map(String::as_str), Some("/"));
        for template in &listed {
            let segments: Vec<String> = template
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| if s.starts_with('{') { "x".to_string() } else { s.to_string() })
                .collect();
            assert!(super::super::allowed_methods(&segments).is_some(), "{template} is not routed");
        }
        for expected in [
            "/routes/{routes}/service",
            "/services/{services}/routes/{routes}",
            "/consumers/{consumers}/key-auth/{keyauth_credentials}",
            "/upstreams/{upstreams}/targets/all",
            "/schemas/plugins/{name}",
        ] {
            assert!(listed.iter().any(|path| path == expected), "{expected} in {listed:?}");
        }
        let keys: Vec<String> = listed.iter().map(|path| path.replace('/', "\0")).collect();
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "sorted by segment, no duplicates");
    }

    /// A link field never has the name of a nested collection of the same entity.
    #[test]
    fn links_and_nested_collections_do_not_collide() {
        for kind in TOP_LEVEL {
            for (field, _, _) in kind.schema().foreign_keys() {
                assert!(
                    EntityKind::from_path(field).is_none_or(|child| !nested_allowed(kind, child)),
                    "/{}/{{key}}/{field}",
                    kind.path()
                );
            }
        }
        assert_eq!(foreign_link("routes", "service"), Some((EntityKind::Route, EntityKind::Service)));
        assert_eq!(foreign_link("routes", "plugins"), None);
        assert_eq!(foreign_link("routes", "name"), None);
    }
}
