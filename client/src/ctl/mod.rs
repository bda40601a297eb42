//! `tollctl`: config as code and cluster operations from one command line.
//!
//! The config commands read a declarative file (Tollgate's or Kong's: `_format_version`
//! 1.1, 2.1 or 3.0, nested or flat, YAML or JSON) through the server's own loader
//! ([`tollgate_raft_store::declarative::load`]), so `validate` offline accepts and
//! refuses exactly what a node would. `diff` matches the file against the cluster's
//! config entity by entity ([`diff`]); `sync` and `apply` send the whole result as one
//! `POST /config`, one Raft entry: it is applied whole or not at all.

pub mod diff;
pub mod output;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tollgate_raft_store::schema::EntityKind;

use crate::{AdminClient, ClientError};
use diff::{Change, Index, Scope};
use output::{Output, Style};

/// Largest file `tollctl` reads.
pub const FILE_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// How long a sync's `POST /config` may take (a large config is one Raft entry that
/// every node applies and compiles).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// An error `tollctl` reports and exits 1 on: what failed, naming the file, the
/// entity and the field where it can.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{0}")]
    Usage(String),
}

/// A declarative file as the cluster would hold it, with what could not be carried.
pub struct Loaded {
    /// The flat document with every default and derived id (`GET /config`'s form).
    pub document: Value,
    pub entities: usize,
    /// What the file holds that Tollgate does not carry over (said, never dropped
    /// silently).
    pub warnings: Vec<String>,
}

/// Reads and validates a declarative file with the node's own loader.
pub fn load_file(path: &Path) -> Result<Loaded, CtlError> {
    let file = path.display().to_string();
    let fail = |message: String| CtlError::File { file: file.clone(), message };
    let size = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?.len();
    if size > FILE_BYTES_MAX {
        return Err(fail(format!("larger than {FILE_BYTES_MAX} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let document: Value = match serde_json::from_str(&text) {
        Ok(document) => document,
        Err(_) => serde_saphyr::from_str(&text).map_err(|e| fail(format!("neither JSON nor YAML: {e}")))?,
    };
    let mut warnings = Vec::new();
    if let Some(object) = document.as_object() {
        for key in object.keys().filter(|key| key.starts_with('_') && *key != "_format_version") {
            warnings.push(format!("'{key}' is not carried over: Tollgate has no such setting (Kong's {key})"));
        }
    }
    let id_seed = u128::from_le_bytes(*uuid::Uuid::new_v4().as_bytes());
    let state = tollgate_raft_store::declarative::load(&document, id_seed, 0).map_err(|error| {
        let mut lines = vec![error.message.clone()];
        for (field, why) in &error.fields {
            lines.push(format!("  {field}: {why}"));
        }
        fail(lines.join("\n"))
    })?;
    Ok(Loaded { document: state.dump(), entities: state.entity_count(), warnings })
}

/// The entities of `document` that carry every tag of `tags` (all when none).
pub fn select_tagged(document: &Value, tags: &[String]) -> Value {
    let scope = Scope::of(tags);
    let mut selected = Map::new();
    for (table, value) in document.as_object().into_iter().flatten() {
        let kept = match value.as_array() {
            Some(entities) => Value::Array(
                entities.iter().filter(|e| e.as_object().is_some_and(|e| scope.holds(e))).cloned().collect(),
            ),
            None => value.clone(),
        };
        selected.insert(table.clone(), kept);
    }
    Value::Object(selected)
}

/// The cluster's config and the file's, indexed for comparison.
pub async fn both_sides(client: &AdminClient, loaded: &Loaded) -> Result<(Index, Index), CtlError> {
    let current = client.get("/config").await?.body;
    let mut cluster = diff::index(&current);
    let mut file = diff::index(&loaded.document);
    diff::forget_passwords(&mut cluster);
    diff::forget_passwords(&mut file);
    Ok((cluster, file))
}

/// With `--select-tag`, every entity of the file must carry the tags: a file that
/// manages one team's entities cannot create another's.
pub fn check_file_in_scope(file: &Index, tags: &[String]) -> Result<(), CtlError> {
    if tags.is_empty() {
        return Ok(());
    }
    let scope = Scope::of(tags);
    match file.values().find(|entity| !scope.holds(&entity.entity)) {
        Some(outside) => Err(CtlError::Usage(format!(
            "{} '{}' lacks the selected tags {tags:?}: with --select-tag every entity of the file must carry them",
            outside.kind.table(),
            outside.key
        ))),
        None => Ok(()),
    }
}

/// A file entity that names a cluster entity outside the selected tags would change
/// it: refused, so a team's file never takes over another's entity.
pub fn check_no_takeover(cluster: &Index, file: &Index, scope: Scope<'_>) -> Result<(), CtlError> {
    for (key, _) in file.iter() {
        if let Some(current) = cluster.get(key) {
            if !scope.holds(&current.entity) {
                return Err(CtlError::Usage(format!(
                    "{} '{}' exists in the cluster without the selected tags: the file cannot take it over",
                    key.0.table(),
                    output::short_key(&key.1)
                )));
            }
        }
    }
    Ok(())
}

/// The answer of `sync`/`apply`: what changed, and how long the write took.
pub struct Written {
    pub changes: Vec<Change>,
    pub elapsed: Duration,
}

/// Makes the cluster equal to the file within `tags` (`deletes`), or creates and
/// updates only (`apply`): one `POST /config` of the merged document.
pub async fn write_file(
    client: &AdminClient,
    loaded: &Loaded,
    tags: &[String],
    deletes: bool,
) -> Result<Written, CtlError> {
    let started = tokio::time::Instant::now();
    let plan = plan(client, loaded, tags, deletes).await?;
    if !plan.changes.is_empty() {
        let scope = Scope::of(tags);
        let document = diff::merged_document(&plan.cluster, &plan.file, scope, deletes);
        client.post("/config", &document).await?;
    }
    Ok(Written { changes: plan.changes, elapsed: started.elapsed() })
}

/// Both sides, checked against the selected tags, and what would change.
pub struct Plan {
    pub cluster: Index,
    pub file: Index,
    pub changes: Vec<Change>,
}

/// What `diff` shows and `sync` (`deletes`) or `apply` would send.
pub async fn plan(client: &AdminClient, loaded: &Loaded, tags: &[String], deletes: bool) -> Result<Plan, CtlError> {
    let (cluster, file) = both_sides(client, loaded).await?;
    check_file_in_scope(&file, tags)?;
    let scope = Scope::of(tags);
    check_no_takeover(&cluster, &file, scope)?;
    let changes = diff::changes(&cluster, &file, scope, deletes);
    Ok(Plan { cluster, file, changes })
}

/// Resolves an entity name as typed (`services`, `routes`, `key-auth`,
/// `keyauth_credentials`) to its kind.
pub fn entity_kind(name: &str) -> Result<EntityKind, CtlError> {
    let singular = |kind: &EntityKind| format!("{}s", kind.path()) == name;
    let found = EntityKind::from_path(name)
        .or_else(|| EntityKind::from_table(name))
        .or_else(|| EntityKind::ALL.into_iter().find(singular));
    found.ok_or_else(|| {
        let known: Vec<&str> = EntityKind::ALL.iter().map(|kind| kind.path()).collect();
        CtlError::Usage(format!("unknown entity '{name}': one of {}", known.join(", ")))
    })
}

/// The parent a kind is reached under in the Admin API (`/consumers/{c}/key-auth`), or
/// `None` for a top-level collection.
fn parent_of(kind: EntityKind) -> Option<(&'static str, EntityKind)> {
    match kind {
        EntityKind::KeyAuth | EntityKind::BasicAuth | EntityKind::Jwt | EntityKind::HmacAuth | EntityKind::Acl => {
            Some(("consumer", EntityKind::Consumer))
        }
        EntityKind::Target => Some(("upstream", EntityKind::Upstream)),
        EntityKind::Sni => Some(("certificate", EntityKind::Certificate)),
        EntityKind::CaCertificate => None,
        _ => None,
    }
}

/// Every entity of a kind: credentials, targets and SNIs too (read from the config,
/// since the Admin API lists them only under their parent).
pub async fn list(client: &AdminClient, kind: EntityKind) -> Result<Vec<Value>, CtlError> {
    if parent_of(kind).is_none() {
        return Ok(client.list_all(&format!("/{}", kind.path())).await?);
    }
    let document = client.get("/config").await?.body;
    Ok(document.get(kind.table()).and_then(Value::as_array).cloned().unwrap_or_default())
}

/// The Admin API path of one entity, by id or endpoint key (a nested kind's through
/// its parent, found in the config).
pub async fn entity_path(client: &AdminClient, kind: EntityKind, key: &str) -> Result<String, CtlError> {
    let Some((field, parent_kind)) = parent_of(kind) else {
        return Ok(format!("/{}/{}", kind.path(), escape(key)));
    };
    let entities = list(client, kind).await?;
    let names = |entity: &&Value| {
        entity.get("id").and_then(Value::as_str) == Some(key)
            || kind.schema().endpoint_keys.iter().any(|k| entity.get(*k).and_then(Value::as_str) == Some(key))
    };
    let found = entities.iter().find(names).ok_or_else(|| CtlError::Usage(format!("no {} '{key}'", kind.table())))?;
    let parent = found.get(field).and_then(|p| p.get("id")).and_then(Value::as_str).unwrap_or_default();
    let id = found.get("id").and_then(Value::as_str).unwrap_or_default();
    Ok(format!("/{}/{parent}/{}/{id}", parent_kind.path(), kind.path()))
}

/// A path segment as the Admin API takes it.
pub fn escape(segment: &str) -> String {
    let mut escaped = String::new();
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}

/// One row per node of `tollctl status`: Raft's view joined with each node's own
/// `/status` and gossip's liveness.
pub async fn cluster_status(client: &AdminClient) -> Result<Value, CtlError> {
    let cluster = client.get("/cluster").await?.body;
    let mut statuses: Map<String, Value> = Map::new();
    for index in 0..client.urls().len() {
        if let Ok(reply) = client.request_node(index, http::Method::GET, "/status", None).await {
            if let Some(id) = reply.body.get("node_id").and_then(Value::as_u64) {
                statuses.insert(id.to_string(), reply.body);
            }
        }
    }
    let newest = statuses.values().filter_map(|s| s["applied_index"].as_u64()).max().unwrap_or(0);
    let gossip = cluster.get("gossip").and_then(|g| g.get("nodes")).cloned().unwrap_or(Value::Null);
    let mut rows = Vec::new();
    for member in cluster["members"].as_array().into_iter().flatten() {
        let id = member["node_id"].as_u64().unwrap_or(0).to_string();
        let status = statuses.get(&id);
        let live = gossip.as_object().and_then(|nodes| {
            nodes.iter().find(|(name, _)| name.as_str() == id || name.split(['-', '@', ':']).next() == Some(&id))
        });
        let applied = status.and_then(|s| s["applied_index"].as_u64());
        rows.push(json!({
            "node_id": member["node_id"],
            "address": member["address"],
            "role": status.map_or_else(|| Value::from("unreachable"), |s| s["role"].clone()),
            "voter": member["voter"],
            "term": status.map_or(Value::Null, |s| s["term"].clone()),
            "applied_index": applied,
            "config_version": status.map_or(Value::Null, |s| s["config_version"].clone()),
            "gossip": live.map_or(Value::from("unknown"), |(_, node)| {
                Value::from(if node["live"].as_bool() == Some(true) { "live" } else { "dead" })
            }),
            "lag": applied.map(|applied| newest.saturating_sub(applied)),
        }));
    }
    Ok(json!({"leader_id": cluster["leader_id"], "term": cluster["term"], "nodes": rows}))
}

/// Prints a value in the chosen form; `human` renders it for a person.
pub fn emit(output: Output, value: &Value, human: impl FnOnce(&Value) -> String) -> Result<(), CtlError> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value).unwrap_or_default(),
        Output::Yaml => serde_saphyr::to_string(value).map_err(|e| CtlError::Usage(format!("yaml: {e}")))?,
        Output::Human => human(value),
    };
    println!("{}", text.trim_end());
    Ok(())
}

/// A diff as a person reads it: `+` created, `~` updated (with each field's values),
/// `-` deleted; coloured when `style` says so.
pub fn render_changes(changes: &[Change], style: Style) -> String {
    let mut lines = Vec::new();
    for change in changes {
        let (sign, color) = match change {
            Change::Create { .. } => ('+', output::GREEN),
            Change::Update { .. } => ('~', output::YELLOW),
            Change::Delete { .. } => ('-', output::RED),
        };
        let head = format!("{sign} {} {}", change.kind().table(), output::short_key(change.key()));
        lines.push(style.paint(color, &head));
        if let Change::Update { fields, .. } = change {
            for (name, from, to) in fields {
                lines.push(format!("    {name}: {} → {}", output::short(from), output::short(to)));
            }
        }
    }
    let count = |wanted: fn(&Change) -> bool| changes.iter().filter(|c| wanted(c)).count();
    lines.push(format!(
        "{} to create, {} to update, {} to delete",
        count(|c| matches!(c, Change::Create { .. })),
        count(|c| matches!(c, Change::Update { .. })),
        count(|c| matches!(c, Change::Delete { .. })),
    ));
    lines.join("\n")
}

/// Changes as `-o json|yaml` gives them.
pub fn changes_json(changes: &[Change]) -> Value {
    Value::Array(changes.iter().map(Change::to_json).collect())
}
