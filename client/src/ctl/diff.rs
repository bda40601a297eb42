//! What `tollctl diff` shows and `sync`/`apply` send: two configs matched entity by
//! entity on what names them, not on ids.
//!
//! A file rarely carries ids, and a cluster's ids were made when its entities were
//! written, so entities are matched on their natural key: an id the file gives, else
//! the first unique constraint whose fields are all set (a service's `name`, a
//! consumer's `username`, a plugin's `name` with its route, service and consumer, a
//! target with its upstream), else the entity's whole content (an unnamed route, a
//! certificate). References inside an entity are compared by the natural key of what
//! they point at, so a config and its copy with other ids are equal.
//!
//! Both sides are in the flat form `GET /config` dumps (the file goes through the
//! server's own loader first, so defaults and Kong's older formats are filled in the
//! same way).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};
use tollgate_raft_store::schema::{EntityKind, FieldType};

/// Fields that differ between two copies of one entity without meaning anything.
const IGNORED: [&str; 3] = ["id", "created_at", "updated_at"];

/// One entity of a config, by kind and natural key.
#[derive(Debug, Clone)]
pub struct Keyed {
    pub kind: EntityKind,
    pub key: String,
    /// The entity as stored (with its id and references by id).
    pub entity: Map<String, Value>,
    /// The entity as compared: ids and timestamps out, references by natural key.
    pub compared: Map<String, Value>,
}

/// A config's entities by `(kind, natural key)`, kinds in dependency order.
pub type Index = BTreeMap<(EntityKind, String), Keyed>;

/// Indexes a flat document (`GET /config`'s form).
pub fn index(document: &Value) -> Index {
    let mut by_id: BTreeMap<String, String> = BTreeMap::new();
    let mut index = Index::new();
    for kind in EntityKind::ALL {
        let Some(entities) = document.get(kind.table()).and_then(Value::as_array) else { continue };
        for entity in entities.iter().filter_map(Value::as_object) {
            let compared = compared_form(kind, entity, &by_id);
            let key = natural_key(kind, &compared);
            if let Some(id) = entity.get("id").and_then(Value::as_str) {
                by_id.insert(id.to_string(), format!("{}:{key}", kind.table()));
            }
            index.insert((kind, key.clone()), Keyed { kind, key, entity: entity.clone(), compared });
        }
    }
    index
}

/// The entity with ids and timestamps removed and references replaced by the natural
/// key of what they name (`{"service": "services:name=svc"}`).
fn compared_form(
    kind: EntityKind,
    entity: &Map<String, Value>,
    by_id: &BTreeMap<String, String>,
) -> Map<String, Value> {
    let named = |id: &str| by_id.get(id).cloned().unwrap_or_else(|| format!("missing:{id}"));
    let mut compared = Map::new();
    for (name, value) in entity {
        if IGNORED.contains(&name.as_str()) {
            continue;
        }
        let value = match kind.schema().field(name).map(|field| field.ty) {
            Some(FieldType::Foreign { .. }) => match value.get("id").and_then(Value::as_str) {
                Some(id) => Value::String(named(id)),
                None => value.clone(),
            },
            Some(FieldType::ForeignIds(_)) => match value.as_array() {
                Some(ids) => {
                    let mut keys: Vec<String> = ids.iter().filter_map(Value::as_str).map(named).collect();
                    keys.sort();
                    Value::from(keys)
                }
                None => value.clone(),
            },
            // Tags are a set: their order means nothing.
            _ if name == "tags" => match value.as_array() {
                Some(tags) => {
                    let mut tags = tags.clone();
                    tags.sort_by_key(Value::to_string);
                    Value::Array(tags)
                }
                None => value.clone(),
            },
            _ => value.clone(),
        };
        compared.insert(name.clone(), value);
    }
    compared
}

/// What names an entity: the first unique constraint whose plain fields are all set
/// (its references count when set: a plugin is named by its name and the route,
/// service or consumer it is on), else its whole compared content.
fn natural_key(kind: EntityKind, compared: &Map<String, Value>) -> String {
    for fields in kind.schema().unique {
        let plain_set = fields.iter().all(|field| is_reference(kind, field) || is_set(compared, field));
        let values: Vec<String> = fields
            .iter()
            .filter_map(|field| match compared.get(*field) {
                Some(Value::Null) | None => None,
                Some(Value::String(text)) => Some(format!("{field}={text}")),
                Some(other) => Some(format!("{field}={other}")),
            })
            .collect();
        if plain_set && !values.is_empty() {
            return values.join(",");
        }
    }
    format!("content={}", Value::Object(compared.clone()))
}

fn is_reference(kind: EntityKind, field: &str) -> bool {
    matches!(kind.schema().field(field).map(|f| f.ty), Some(FieldType::Foreign { .. }))
}

fn is_set(object: &Map<String, Value>, field: &str) -> bool {
    !matches!(object.get(field), None | Some(Value::Null))
}

/// One difference between the cluster and the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Create {
        kind: EntityKind,
        key: String,
    },
    /// The fields that differ: `(name, cluster's value, file's value)`.
    Update {
        kind: EntityKind,
        key: String,
        fields: Vec<(String, Value, Value)>,
    },
    Delete {
        kind: EntityKind,
        key: String,
    },
}

impl Change {
    pub fn kind(&self) -> EntityKind {
        match self {
            Change::Create { kind, .. } | Change::Update { kind, .. } | Change::Delete { kind, .. } => *kind,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Change::Create { key, .. } | Change::Update { key, .. } | Change::Delete { key, .. } => key,
        }
    }

    pub fn to_json(&self) -> Value {
        let (action, extra) = match self {
            Change::Create { .. } => ("create", Value::Null),
            Change::Delete { .. } => ("delete", Value::Null),
            Change::Update { fields, .. } => {
                let fields: Map<String, Value> = fields
                    .iter()
                    .map(|(name, from, to)| (name.clone(), serde_json::json!({"cluster": from, "file": to})))
                    .collect();
                ("update", Value::Object(fields))
            }
        };
        let mut change = serde_json::json!({"action": action, "entity": self.kind().table(), "key": self.key()});
        if !extra.is_null() {
            change["fields"] = extra;
        }
        change
    }
}

/// Which entities of the cluster a command may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every entity (`sync` without `--select-tag`).
    All,
    /// Only entities carrying every one of these tags.
    Tagged(&'a [String]),
}

impl<'a> Scope<'a> {
    /// Every entity without tags, else those carrying all of them.
    pub fn of(tags: &'a [String]) -> Scope<'a> {
        if tags.is_empty() {
            Scope::All
        } else {
            Scope::Tagged(tags)
        }
    }

    pub fn holds(&self, entity: &Map<String, Value>) -> bool {
        match self {
            Scope::All => true,
            Scope::Tagged(wanted) => {
                let tags: BTreeSet<&str> = entity
                    .get("tags")
                    .and_then(Value::as_array)
                    .map(|tags| tags.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                wanted.iter().all(|tag| tags.contains(tag.as_str()))
            }
        }
    }
}

/// What would make `cluster` equal to `file` within `scope`; `deletes`: whether
/// entities missing from the file go (`sync`) or stay (`apply`).
pub fn changes(cluster: &Index, file: &Index, scope: Scope<'_>, deletes: bool) -> Vec<Change> {
    let mut changes = Vec::new();
    for ((kind, key), wanted) in file {
        match cluster.get(&(*kind, key.clone())) {
            None => changes.push(Change::Create { kind: *kind, key: key.clone() }),
            Some(current) => {
                let fields = differing_fields(&current.compared, &wanted.compared);
                if !fields.is_empty() {
                    changes.push(Change::Update { kind: *kind, key: key.clone(), fields });
                }
            }
        }
    }
    if deletes {
        for ((kind, key), current) in cluster {
            if scope.holds(&current.entity) && !file.contains_key(&(*kind, key.clone())) {
                changes.push(Change::Delete { kind: *kind, key: key.clone() });
            }
        }
    }
    changes
}

fn differing_fields(cluster: &Map<String, Value>, file: &Map<String, Value>) -> Vec<(String, Value, Value)> {
    let names: BTreeSet<&String> = cluster.keys().chain(file.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let from = cluster.get(name).cloned().unwrap_or(Value::Null);
            let to = file.get(name).cloned().unwrap_or(Value::Null);
            (from != to).then(|| (name.clone(), from, to))
        })
        .collect()
}

/// The document `sync` (`deletes`) or `apply` sends: the file's entities with the
/// ids and creation times of the cluster's entities they match (so ids stay stable and
/// references elsewhere keep pointing at them), plus the cluster's entities the command
/// leaves alone: outside `scope`, or, for `apply`, every one the file does not name.
pub fn merged_document(cluster: &Index, file: &Index, scope: Scope<'_>, deletes: bool) -> Value {
    // The file's ids (derived by the loader) → the ids the entities end with.
    let mut final_id: BTreeMap<String, String> = BTreeMap::new();
    for (key, wanted) in file {
        let file_id = id_of(&wanted.entity);
        let kept = cluster.get(key).map(|current| id_of(&current.entity)).unwrap_or_else(|| file_id.clone());
        final_id.insert(file_id, kept);
    }
    let mut tables: BTreeMap<EntityKind, Vec<Value>> = BTreeMap::new();
    for (key, wanted) in file {
        let mut entity = wanted.entity.clone();
        remap_references(key.0, &mut entity, &final_id);
        // The cluster stamps times: a new entity gets its own, a kept one keeps its
        // creation time.
        entity.remove("created_at");
        entity.remove("updated_at");
        if let Some(current) = cluster.get(key) {
            entity.insert("id".into(), Value::String(id_of(&current.entity)));
            if let Some(created) = current.entity.get("created_at") {
                entity.insert("created_at".into(), created.clone());
            }
            keep_stored_secrets(key.0, &current.entity, &mut entity);
        }
        tables.entry(key.0).or_default().push(Value::Object(entity));
    }
    for (key, current) in cluster {
        let left_alone = !scope.holds(&current.entity) || !deletes;
        if left_alone && !file.contains_key(key) {
            tables.entry(key.0).or_default().push(Value::Object(current.entity.clone()));
        }
    }
    let mut document = Map::new();
    document.insert("_format_version".into(), Value::from("3.0"));
    for (kind, entities) in tables {
        document.insert(kind.table().into(), Value::Array(entities));
    }
    Value::Object(document)
}

fn id_of(entity: &Map<String, Value>) -> String {
    entity.get("id").and_then(Value::as_str).unwrap_or_default().to_string()
}

fn remap_references(kind: EntityKind, entity: &mut Map<String, Value>, final_id: &BTreeMap<String, String>) {
    for (name, value) in entity.iter_mut() {
        match kind.schema().field(name).map(|field| field.ty) {
            Some(FieldType::Foreign { .. }) => {
                if let Some(id) = value.get("id").and_then(Value::as_str) {
                    if let Some(kept) = final_id.get(id) {
                        *value = serde_json::json!({ "id": kept });
                    }
                }
            }
            Some(FieldType::ForeignIds(_)) => {
                if let Some(ids) = value.as_array_mut() {
                    for id in ids.iter_mut() {
                        if let Some(kept) = id.as_str().and_then(|text| final_id.get(text)) {
                            *id = Value::String(kept.clone());
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// The cluster keeps basic-auth passwords only as salted hashes: a credential the file
/// matches keeps its stored hash, since a file's password cannot be compared with it.
fn keep_stored_secrets(kind: EntityKind, current: &Map<String, Value>, entity: &mut Map<String, Value>) {
    if kind == EntityKind::BasicAuth {
        if let Some(stored) = current.get("password") {
            entity.insert("password".into(), stored.clone());
        }
    }
}

/// The compared form ignores a basic-auth password (see [`keep_stored_secrets`]).
pub fn forget_passwords(index: &mut Index) {
    for ((kind, _), keyed) in index.iter_mut() {
        if *kind == EntityKind::BasicAuth {
            keyed.compared.remove("password");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(id: &str, name: &str, host: &str) -> Value {
        json!({"id": id, "name": name, "host": host, "port": 80, "created_at": 1, "updated_at": 1})
    }

    #[test]
    fn copies_with_other_ids_are_equal_and_references_match_by_name() {
        let cluster = json!({"services": [service("a1", "svc", "h")],
                             "routes": [{"id": "r1", "name": "r", "paths": ["/"], "service": {"id": "a1"}}]});
        let file = json!({"services": [service("b1", "svc", "h")],
                          "routes": [{"id": "r2", "name": "r", "paths": ["/"], "service": {"id": "b1"}}]});
        let (cluster, file) = (index(&cluster), index(&file));
        assert!(changes(&cluster, &file, Scope::All, true).is_empty());
        let merged = merged_document(&cluster, &file, Scope::All, true);
        assert_eq!(merged["services"][0]["id"], "a1");
        assert_eq!(merged["routes"][0]["id"], "r1");
        assert_eq!(merged["routes"][0]["service"]["id"], "a1");
    }

    #[test]
    fn creates_updates_and_deletes_within_the_scope() {
        let mut tagged = service("a1", "old", "h");
        tagged["tags"] = json!(["team-a"]);
        let mut changed = service("a2", "kept", "h");
        changed["tags"] = json!(["team-a"]);
        let cluster = json!({"services": [tagged, changed, service("a3", "untagged", "h")]});
        let mut new = service("b1", "new", "h");
        new["tags"] = json!(["team-a"]);
        let mut kept = service("b2", "kept", "other");
        kept["tags"] = json!(["team-a"]);
        let file = json!({"services": [new, kept]});
        let (cluster, file) = (index(&cluster), index(&file));
        let tags = vec!["team-a".to_string()];
        let found = changes(&cluster, &file, Scope::Tagged(&tags), true);
        let actions: Vec<(String, &str)> =
            found.iter().map(|c| (c.to_json()["action"].as_str().unwrap_or_default().to_string(), c.key())).collect();
        assert_eq!(
            actions,
            [("update".into(), "name=kept"), ("create".into(), "name=new"), ("delete".into(), "name=old")]
        );
        let merged = merged_document(&cluster, &file, Scope::Tagged(&tags), true);
        let names: BTreeSet<&str> =
            merged["services"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
        assert_eq!(names, BTreeSet::from(["new", "kept", "untagged"]));
        // apply never deletes.
        assert!(!changes(&cluster, &file, Scope::All, false).iter().any(|c| matches!(c, Change::Delete { .. })));
    }

    #[test]
    fn plugins_are_named_by_their_scope() {
        let cluster = json!({"routes": [{"id": "r1", "name": "r", "paths": ["/"]}],
                             "plugins": [{"id": "p1", "name": "cors", "route": {"id": "r1"}, "service": null, "consumer": null, "config": {}}]});
        let keys: Vec<String> = index(&cluster).keys().map(|(_, key)| key.clone()).collect();
        assert!(keys.contains(&"name=cors,route=routes:name=r".to_string()), "{keys:?}");
    }
}
