//! The deterministic configuration state machine.
//!
//! [`ConfigState`] holds every entity as a validated JSON object in persistent maps
//! (`imbl`), so cloning the whole state for publication is O(1) and the data path can
//! keep reading an old version while the next one is built.
//!
//! [`ConfigState::apply`] is a pure function of the state and the command: no clock, no
//! randomness, no I/O. Errors leave the state exactly as it was (every operation checks
//! before it mutates, and `ReplaceAll` builds a new state and swaps it in only whole).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::command::{Command, Op, Outcome, Parent};
use crate::error::{ApiError, ErrorCode};
use crate::schema::{self, EntityKind, FieldType, Object, OnDelete};
use crate::validate::{self, Mode};

/// Most entities of all kinds together. A write past it is refused.
pub const ENTITIES_MAX: usize = 1_000_000;
/// Default and largest page size of list endpoints (Kong's).
pub const PAGE_SIZE_DEFAULT: usize = 100;
pub const PAGE_SIZE_MAX: usize = 1000;

/// A value in a unique index: which constraint of which kind, and the JSON of the
/// constrained fields' values.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct UniqueKey {
    kind: EntityKind,
    constraint: u8,
    value: String,
}

#[derive(Debug, Clone, Default)]
pub struct ConfigState {
    tables: [OrdMap<Uuid, Arc<Object>>; 14],
    unique: OrdMap<UniqueKey, Uuid>,
    entity_count: usize,
    /// The hash of the declarative text the config was last replaced with, while no
    /// other write changed it since (Kong's `configuration_hash`).
    pub(crate) config_hash: Option<String>,
}

/// The serialised form of the state, as stored in snapshots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateImage {
    /// Per kind, every entity's JSON text.
    pub tables: Vec<(EntityKind, Vec<String>)>,
}

impl ConfigState {
    pub fn new() -> ConfigState {
        ConfigState::default()
    }

    pub fn entity_count(&self) -> usize {
        self.entity_count
    }

    pub fn table(&self, kind: EntityKind) -> &OrdMap<Uuid, Arc<Object>> {
        &self.tables[kind.index()]
    }

    /// The hash of the declarative text this config was loaded from, unless an entity
    /// write changed it since.
    pub fn config_hash(&self) -> Option<&str> {
        self.config_hash.as_deref()
    }

    /// Restores the hash a snapshot kept.
    pub fn set_config_hash(&mut self, hash: Option<String>) {
        self.config_hash = hash;
    }

    /// Applies one command. On error the state is unchanged.
    pub fn apply(&mut self, command: &Command) -> Result<Outcome, ApiError> {
        let now = command.now_s;
        let outcome = match &command.op {
            Op::Create { kind, id, parent, body } => self.create(*kind, *id, parent.as_ref(), &body.0, now),
            Op::Upsert { kind, key, id, parent, body } => self.upsert(*kind, key, *id, parent.as_ref(), &body.0, now),
            Op::Patch { kind, key, parent, body } => self.patch(*kind, key, parent.as_ref(), &body.0, now),
            Op::Delete { kind, key, parent } => self.delete(*kind, key, parent.as_ref()),
            Op::ReplaceAll { document, id_seed } => return self.replace(document, *id_seed, now, None),
            Op::ReplaceHashed { document, id_seed, hash } => {
                return self.replace(document, *id_seed, now, Some(hash.clone()))
            }
            // The store applies grants to the quota ledger; the config is not involved.
            Op::Grant { .. } | Op::Release { .. } => {
                Err(ApiError::new(ErrorCode::Internal, "quota grants are not config writes"))
            }
        };
        // An entity write makes the config differ from the text it was loaded from.
        if outcome.is_ok() {
            self.config_hash = None;
        }
        outcome
    }

    // ---- reads -------------------------------------------------------------------

    /// Finds an entity by id or endpoint key, within `parent` when given.
    pub fn find(&self, kind: EntityKind, key: &str, parent: Option<&Parent>) -> Result<Arc<Object>, ApiError> {
        let scope = self.resolve_parent(kind, parent)?;
        let found = self.lookup(kind, key, scope).ok_or_else(ApiError::not_found)?;
        Ok(found)
    }

    /// A page of entities of `kind` (within `parent` when given), ordered by id, after
    /// `offset` (an id). Returns the page and the offset of the next one.
    /// A page of `kind` (under `parent`) after `offset`: up to `size` entities that
    /// `keep` accepts, in id order, and the offset of the next page.
    pub fn list(
        &self,
        kind: EntityKind,
        parent: Option<&Parent>,
        offset: Option<Uuid>,
        size: usize,
        keep: &dyn Fn(&Object) -> bool,
    ) -> Result<(Vec<Arc<Object>>, Option<Uuid>), ApiError> {
        debug_assert!(size > 0 && size <= PAGE_SIZE_MAX);
        let scope = self.resolve_parent(kind, parent)?;
        let table = self.table(kind);
        let mut page = Vec::with_capacity(size.min(table.len()));
        let start = match offset {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let mut next = None;
        for entity in table.range((start, std::ops::Bound::Unbounded)).map(|(_, entity)| entity) {
            if let Some((field, parent_id)) = scope {
                if foreign_id(entity, field) != Some(parent_id) {
                    continue;
                }
            }
            if !keep(entity) {
                continue;
            }
            if page.len() == size {
                next = page.last().map(|e: &Arc<Object>| entity_id(e));
                break;
            }
            page.push(entity.clone());
        }
        Ok((page, next))
    }

    /// Every entity, as a flat declarative document (foreign keys by id), which
    /// `declarative::load` accepts back.
    pub fn dump(&self) -> Value {
        let mut document = serde_json::Map::new();
        document.insert("_format_version".into(), json!("3.0"));
        for kind in EntityKind::ALL {
            let entities: Vec<Value> = self.table(kind).values().map(|e| Value::Object((**e).clone())).collect();
            if !entities.is_empty() {
                document.insert(kind.table().into(), Value::Array(entities));
            }
        }
        Value::Object(document)
    }

    pub fn to_image(&self) -> StateImage {
        let tables = EntityKind::ALL
            .into_iter()
            .map(|kind| (kind, self.table(kind).values().map(|e| Value::Object((**e).clone()).to_string()).collect()))
            .collect();
        StateImage { tables }
    }

    pub fn from_image(image: &StateImage) -> Result<ConfigState, String> {
        let mut state = ConfigState::new();
        for (kind, entities) in &image.tables {
            for text in entities {
                let entity: Object = serde_json::from_str(text).map_err(|e| format!("snapshot entity: {e}"))?;
                state.insert(*kind, Arc::new(entity));
            }
        }
        Ok(state)
    }

    // ---- writes ------------------------------------------------------------------

    fn create(
        &mut self,
        kind: EntityKind,
        id: Uuid,
        parent: Option<&Parent>,
        body: &Value,
        now: i64,
    ) -> Result<Outcome, ApiError> {
        let mut body = prepare_body(kind, body)?;
        let scope = self.resolve_parent(kind, parent)?;
        if let Some((field, parent_id)) = scope {
            body.insert(field.into(), json!({ "id": parent_id.to_string() }));
        }
        let id = match body.get("id") {
            Some(given) => parse_id(given)?,
            None => id,
        };
        if self.table(kind).contains_key(&id) {
            return Err(ApiError::new(
                ErrorCode::PrimaryKeyViolation,
                format!("primary key violation on key '{{id=\"{id}\"}}'"),
            ));
        }
        // Timestamps given in the body are kept (a dumped config loads back unchanged),
        // as Kong accepts them too.
        let created_at = given_timestamp(&body, "created_at")?.unwrap_or(now);
        let updated_at = given_timestamp(&body, "updated_at")?.unwrap_or(now);
        let mut entity = validate::validate(kind, &Value::Object(body), Mode::Create, None)?;
        self.finish(kind, &mut entity, id, created_at, updated_at)?;
        let entity = Arc::new(entity);
        self.insert(kind, entity.clone());
        Ok(Outcome::Created(Value::Object((*entity).clone()).into()))
    }

    fn upsert(
        &mut self,
        kind: EntityKind,
        key: &str,
        new_id: Uuid,
        parent: Option<&Parent>,
        body: &Value,
        now: i64,
    ) -> Result<Outcome, ApiError> {
        let mut body = prepare_body(kind, body)?;
        let scope = self.resolve_parent(kind, parent)?;
        if let Some((field, parent_id)) = scope {
            body.insert(field.into(), json!({ "id": parent_id.to_string() }));
        }
        let existing = self.lookup(kind, key, scope);
        let key_is_id = Uuid::parse_str(key).ok();
        if existing.is_none() && key_is_id.is_some_and(|id| self.table(kind).contains_key(&id)) {
            // The id exists, but outside the nested path's parent: not this path's to replace.
            return Err(ApiError::not_found());
        }
        if key_is_id.is_none() {
            // PUT /services/{name}: the name comes from the URL.
            let Some(endpoint_key) = kind.schema().endpoint_keys.first() else {
                return Err(ApiError::field("id", format!("expected a uuid, got '{key}'")));
            };
            body.insert((*endpoint_key).into(), Value::from(key));
        }
        if let Some(given) = body.get("id") {
            let given = parse_id(given)?;
            let expected = existing.as_ref().map(|e| entity_id(e)).or(key_is_id).unwrap_or(given);
            if given != expected {
                return Err(ApiError::field("id", "does not match the id in the URL"));
            }
        }
        let (id, created_at) = match &existing {
            Some(entity) => (entity_id(entity), entity.get("created_at").and_then(Value::as_i64).unwrap_or(now)),
            None => (key_is_id.unwrap_or(new_id), now),
        };
        let mut entity = validate::validate(kind, &Value::Object(body), Mode::Create, None)?;
        self.finish(kind, &mut entity, id, created_at, now)?;
        let entity = Arc::new(entity);
        if let Some(old) = existing {
            self.remove(kind, &old);
        }
        self.insert(kind, entity.clone());
        // Kong answers PUT with 200 whether it created or replaced.
        Ok(Outcome::Updated(Value::Object((*entity).clone()).into()))
    }

    fn patch(
        &mut self,
        kind: EntityKind,
        key: &str,
        parent: Option<&Parent>,
        body: &Value,
        now: i64,
    ) -> Result<Outcome, ApiError> {
        let mut body = prepare_body(kind, body)?;
        let scope = self.resolve_parent(kind, parent)?;
        let existing = self.lookup(kind, key, scope).ok_or_else(ApiError::not_found)?;
        let id = entity_id(&existing);
        if let Some(given) = body.remove("id") {
            if parse_id(&given)? != id {
                return Err(ApiError::field("id", "cannot change the id of an entity"));
            }
        }
        body.remove("created_at");
        body.remove("updated_at");
        let created_at = existing.get("created_at").and_then(Value::as_i64).unwrap_or(now);
        let mut entity = validate::validate(kind, &Value::Object(body), Mode::Patch, Some(&existing))?;
        self.finish(kind, &mut entity, id, created_at, now)?;
        let entity = Arc::new(entity);
        self.remove(kind, &existing);
        self.insert(kind, entity.clone());
        Ok(Outcome::Updated(Value::Object((*entity).clone()).into()))
    }

    fn delete(&mut self, kind: EntityKind, key: &str, parent: Option<&Parent>) -> Result<Outcome, ApiError> {
        let scope = self.resolve_parent(kind, parent)?;
        let Some(existing) = self.lookup(kind, key, scope) else {
            // Kong answers 204 for an entity that is not there (DELETE is idempotent),
            // but 404 under a parent that does not hold it (kong/api/endpoints.lua,
            // delete_entity_endpoint; spec/02-integration/04-admin_api/
            // 03-consumers_routes_spec.lua:1019).
            return match parent {
                Some(_) => Err(ApiError::not_found()),
                None => Ok(Outcome::Deleted),
            };
        };
        // Collect the whole cascade first and check every restriction, so that a refused
        // delete changes nothing.
        let mut doomed_ids: BTreeSet<(EntityKind, Uuid)> = BTreeSet::from([(kind, entity_id(&existing))]);
        let mut doomed: Vec<(EntityKind, Arc<Object>)> = vec![(kind, existing)];
        let mut position = 0;
        while position < doomed.len() {
            let (doomed_kind, doomed_entity) = doomed[position].clone();
            let doomed_id = entity_id(&doomed_entity);
            for referencing in EntityKind::ALL {
                for (field, target) in referencing.schema().foreign_id_lists() {
                    if target != doomed_kind {
                        continue;
                    }
                    let wanted = Value::from(doomed_id.to_string());
                    let listed = self.table(referencing).values().any(|entity| {
                        entity.get(field).and_then(Value::as_array).is_some_and(|ids| ids.contains(&wanted))
                    });
                    if listed {
                        return Err(ApiError::new(
                            ErrorCode::ForeignKeyViolation,
                            format!(
                                "an existing '{}' entity references this '{}' entity in '{field}'",
                                referencing.path(),
                                doomed_kind.path()
                            ),
                        ));
                    }
                }
                for (field, target, on_delete) in referencing.schema().foreign_keys() {
                    if target != doomed_kind {
                        continue;
                    }
                    for entity in self.table(referencing).values() {
                        if foreign_id(entity, field) != Some(doomed_id) {
                            continue;
                        }
                        if on_delete == OnDelete::Restrict {
                            return Err(ApiError::new(
                                ErrorCode::ForeignKeyViolation,
                                format!(
                                    "an existing '{}' entity references this '{}' entity",
                                    referencing.path(),
                                    doomed_kind.path()
                                ),
                            ));
                        }
                        if doomed_ids.insert((referencing, entity_id(entity))) {
                            doomed.push((referencing, entity.clone()));
                        }
                    }
                }
            }
            position += 1;
        }
        for (doomed_kind, entity) in doomed {
            self.remove(doomed_kind, &entity);
        }
        Ok(Outcome::Deleted)
    }

    /// Sets the metadata, resolves foreign keys and checks unique constraints of a
    /// validated entity about to be stored under `id` (replacing any entity with that id).
    fn finish(
        &self,
        kind: EntityKind,
        entity: &mut Object,
        id: Uuid,
        created_at: i64,
        now: i64,
    ) -> Result<(), ApiError> {
        let schema = kind.schema();
        for field in schema.fields {
            match field.ty {
                FieldType::Foreign { kind: target, .. } => {
                    let Some(reference) = entity.get(field.name).and_then(|r| r.get("id")).and_then(Value::as_str)
                    else {
                        continue;
                    };
                    let resolved = self.lookup(target, reference, None).ok_or_else(|| {
                        let mut error = ApiError::new(
                            ErrorCode::ForeignKeyViolation,
                            format!(
                                "the foreign key '{{id=\"{reference}\"}}' does not reference an existing '{}' entity.",
                                target.path()
                            ),
                        );
                        // Kong's fields carry the reference itself: `{"service": {"id": …}}`.
                        error.fields.insert(format!("{}.id", field.name), reference.to_string());
                        error
                    })?;
                    entity.insert(field.name.into(), json!({ "id": entity_id(&resolved).to_string() }));
                }
                FieldType::ForeignIds(target) => {
                    let Some(ids) = entity.get(field.name).and_then(Value::as_array) else {
                        continue;
                    };
                    for reference in ids.iter().filter_map(Value::as_str) {
                        let known = Uuid::parse_str(reference).is_ok_and(|id| self.table(target).contains_key(&id));
                        if !known {
                            return Err(ApiError::field(
                                field.name,
                                format!("expected a known '{}' id, got '{reference}'", target.path()),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        entity.insert("id".into(), Value::from(id.to_string()));
        entity.insert("created_at".into(), Value::from(created_at));
        if schema.has_updated_at {
            entity.insert("updated_at".into(), Value::from(now));
        }
        for (constraint, fields) in schema.unique.iter().enumerate() {
            let Some(value) = unique_value(entity, fields) else {
                continue;
            };
            let key = UniqueKey { kind, constraint: constraint as u8, value };
            if let Some(holder) = self.unique.get(&key) {
                if *holder != id {
                    let described: Vec<String> =
                        fields.iter().map(|f| format!("{f}={}", entity.get(*f).unwrap_or(&Value::Null))).collect();
                    let mut error = ApiError::new(
                        ErrorCode::UniqueViolation,
                        format!("UNIQUE violation detected on '{{{}}}'", described.join(",")),
                    );
                    // Kong names the conflicting values (kong/db/errors.lua,
                    // unique_violation): `{"name": "my.upstream"}`, a reference as
                    // `{"route": {"id": …}}`; a null one is left out.
                    for field in *fields {
                        match entity.get(*field) {
                            Some(Value::String(text)) => {
                                error.fields.insert((*field).into(), text.clone());
                            }
                            Some(Value::Object(reference)) => {
                                for (key, value) in reference {
                                    let text = value.as_str().map_or_else(|| value.to_string(), str::to_string);
                                    error.fields.insert(format!("{field}.{key}"), text);
                                }
                            }
                            Some(Value::Null) | None => {}
                            Some(other) => {
                                error.fields.insert((*field).into(), other.to_string());
                            }
                        }
                    }
                    return Err(error);
                }
            }
        }
        if self.entity_count >= ENTITIES_MAX && !self.table(kind).contains_key(&id) {
            return Err(ApiError::new(ErrorCode::SchemaViolation, format!("at most {ENTITIES_MAX} entities")));
        }
        Ok(())
    }

    fn insert(&mut self, kind: EntityKind, entity: Arc<Object>) {
        let id = entity_id(&entity);
        if let Some(replaced) = self.table(kind).get(&id).cloned() {
            self.remove(kind, &replaced);
        }
        for (constraint, fields) in kind.schema().unique.iter().enumerate() {
            if let Some(value) = unique_value(&entity, fields) {
                self.unique.insert(UniqueKey { kind, constraint: constraint as u8, value }, id);
            }
        }
        if self.tables[kind.index()].insert(id, entity).is_none() {
            self.entity_count += 1;
        }
    }

    fn remove(&mut self, kind: EntityKind, entity: &Object) {
        let id = entity_id(entity);
        for (constraint, fields) in kind.schema().unique.iter().enumerate() {
            if let Some(value) = unique_value(entity, fields) {
                let key = UniqueKey { kind, constraint: constraint as u8, value };
                if self.unique.get(&key) == Some(&id) {
                    self.unique.remove(&key);
                }
            }
        }
        if self.tables[kind.index()].remove(&id).is_some() {
            self.entity_count -= 1;
        }
    }

    /// The parent scope of a nested path: which field of `kind` must hold which id.
    fn resolve_parent(
        &self,
        kind: EntityKind,
        parent: Option<&Parent>,
    ) -> Result<Option<(&'static str, Uuid)>, ApiError> {
        let Some(parent) = parent else {
            return Ok(None);
        };
        let field = kind
            .schema()
            .foreign_keys()
            .find(|(_, target, _)| *target == parent.kind)
            .map(|(field, _, _)| field)
            .ok_or_else(ApiError::not_found)?;
        let parent_entity = self.lookup(parent.kind, &parent.key, None).ok_or_else(ApiError::not_found)?;
        Ok(Some((field, entity_id(&parent_entity))))
    }

    /// Finds by id, then by each endpoint key; within the scope when given.
    fn lookup(&self, kind: EntityKind, key: &str, scope: Option<(&'static str, Uuid)>) -> Option<Arc<Object>> {
        let in_scope = |entity: &Arc<Object>| scope.is_none_or(|(field, id)| foreign_id(entity, field) == Some(id));
        if let Ok(id) = Uuid::parse_str(key) {
            if let Some(entity) = self.table(kind).get(&id) {
                return in_scope(entity).then(|| entity.clone());
            }
        }
        // A target is stored with its port; Kong looks one up the same way.
        let normalized;
        let key = if kind == EntityKind::Target {
            normalized = schema::target_with_port(key);
            normalized.as_str()
        } else {
            key
        };
        let schema = kind.schema();
        for endpoint_key in schema.endpoint_keys {
            let indexed = schema.unique.iter().position(|fields| fields.len() == 1 && fields[0] == *endpoint_key);
            let found = match indexed {
                Some(constraint) => {
                    let value = Value::Array(vec![Value::from(key)]).to_string();
                    let unique_key = UniqueKey { kind, constraint: constraint as u8, value };
                    self.unique.get(&unique_key).and_then(|id| self.table(kind).get(id)).cloned()
                }
                // Composite keys (a target within its upstream): scan the scope.
                None => self
                    .table(kind)
                    .values()
                    .find(|e| in_scope(e) && e.get(*endpoint_key).and_then(Value::as_str) == Some(key))
                    .cloned(),
            };
            if let Some(entity) = found {
                return in_scope(&entity).then_some(entity);
            }
        }
        None
    }
}

/// Checks the request body's shape and applies input shorthands.
fn prepare_body(kind: EntityKind, body: &Value) -> Result<Object, ApiError> {
    let Some(body) = body.as_object() else {
        return Err(ApiError::field("@entity", "expected a JSON object"));
    };
    let mut body = body.clone();
    if kind == EntityKind::Service {
        schema::expand_service_url(&mut body)?;
    }
    Ok(body)
}

fn given_timestamp(body: &Object, field: &str) -> Result<Option<i64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_i64() {
            Some(seconds) if seconds >= 0 => Ok(Some(seconds)),
            _ => Err(ApiError::field(field, "expected a non-negative integer (seconds since the epoch)")),
        },
    }
}

fn parse_id(value: &Value) -> Result<Uuid, ApiError> {
    value.as_str().and_then(|s| Uuid::parse_str(s).ok()).ok_or_else(|| ApiError::field("id", "expected a valid uuid"))
}

/// The id of a stored entity. Stored entities always have one.
pub fn entity_id(entity: &Object) -> Uuid {
    let id = entity.get("id").and_then(Value::as_str).and_then(|s| Uuid::parse_str(s).ok());
    debug_assert!(id.is_some(), "stored entities have a uuid id");
    id.unwrap_or_default()
}

/// The id a stored entity's foreign key field points at.
pub fn foreign_id(entity: &Object, field: &str) -> Option<Uuid> {
    entity.get(field)?.get("id")?.as_str().and_then(|s| Uuid::parse_str(s).ok())
}

/// The index value of a unique constraint, or `None` when all its fields are null.
fn unique_value(entity: &Object, fields: &[&str]) -> Option<String> {
    let values: Vec<Value> = fields.iter().map(|f| entity.get(*f).cloned().unwrap_or(Value::Null)).collect();
    if values.iter().all(Value::is_null) {
        return None;
    }
    Some(Value::Array(values).to_string())
}

/// The `?size=` of a list request: default, or 1 to `PAGE_SIZE_MAX`.
pub fn page_size(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(PAGE_SIZE_DEFAULT);
    };
    match raw.parse::<usize>() {
        Ok(size) if (1..=PAGE_SIZE_MAX).contains(&size) => Ok(size),
        // Kong's messages (kong/db/dao/init.lua), without `fields`.
        Err(_) if raw.parse::<f64>().is_err() => Err(ApiError::new(ErrorCode::InvalidSize, "size must be a number")),
        _ => {
            Err(ApiError::new(ErrorCode::InvalidSize, format!("size must be an integer between 1 and {PAGE_SIZE_MAX}")))
        }
    }
}

/// Counts entities per kind, for `/status` and metrics.
pub fn counts(state: &ConfigState) -> BTreeMap<&'static str, usize> {
    EntityKind::ALL.into_iter().map(|kind| (kind.path(), state.table(kind).len())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(state: &mut ConfigState, kind: EntityKind, body: Value) -> Result<Outcome, ApiError> {
        let command = Command {
            now_s: 1_700_000_000,
            write_id: None,
            op: Op::Create { kind, id: Uuid::new_v4(), parent: None, body: body.into() },
        };
        state.apply(&command)
    }

    fn delete(state: &mut ConfigState, kind: EntityKind, key: &str) -> Result<Outcome, ApiError> {
        state.apply(&Command { now_s: 1, write_id: None, op: Op::Delete { kind, key: key.into(), parent: None } })
    }

    #[test]
    fn unique_names_and_references() {
        let mut state = ConfigState::new();
        create(&mut state, EntityKind::Service, json!({"name": "svc", "host": "a.com"})).unwrap();
        let duplicate = create(&mut state, EntityKind::Service, json!({"name": "svc", "host": "b.com"})).unwrap_err();
        assert_eq!(duplicate.code, ErrorCode::UniqueViolation);
        assert_eq!(duplicate.http_status(), 409);

        let dangling =
            create(&mut state, EntityKind::Route, json!({"paths": ["/"], "service": {"id": "nope"}})).unwrap_err();
        assert_eq!(dangling.code, ErrorCode::ForeignKeyViolation);
        assert_eq!(dangling.fields.get("service.id").map(String::as_str), Some("nope"));

        create(&mut state, EntityKind::Route, json!({"name": "r", "paths": ["/"], "service": {"name": "svc"}}))
            .unwrap();
        let route = state.find(EntityKind::Route, "r", None).unwrap();
        let service = state.find(EntityKind::Service, "svc", None).unwrap();
        assert_eq!(foreign_id(&route, "service"), Some(entity_id(&service)));

        // Restrict: the service cannot go while a route references it; nothing changes.
        let refused = delete(&mut state, EntityKind::Service, "svc").unwrap_err();
        assert_eq!(refused.code, ErrorCode::ForeignKeyViolation);
        assert_eq!(state.entity_count(), 2);

        delete(&mut state, EntityKind::Route, "r").unwrap();
        delete(&mut state, EntityKind::Service, "svc").unwrap();
        assert_eq!(state.entity_count(), 0);
    }

    #[test]
    fn cascade_deletes_credentials_and_plugins() {
        let mut state = ConfigState::new();
        create(&mut state, EntityKind::Consumer, json!({"username": "alice"})).unwrap();
        let parent = Some(Parent { kind: EntityKind::Consumer, key: "alice".into() });
        let command = Command {
            now_s: 1,
            write_id: None,
            op: Op::Create { kind: EntityKind::KeyAuth, id: Uuid::new_v4(), parent, body: json!({"key": "k1"}).into() },
        };
        state.apply(&command).unwrap();
        create(
            &mut state,
            EntityKind::Plugin,
            json!({"name": "rate-limiting", "config": {"minute": 5}, "consumer": {"id": "alice"}}),
        )
        .unwrap();
        assert_eq!(state.entity_count(), 3);
        delete(&mut state, EntityKind::Consumer, "alice").unwrap();
        assert_eq!(state.entity_count(), 0);
        assert!(state.find(EntityKind::KeyAuth, "k1", None).is_err());
    }

    #[test]
    fn nested_put_cannot_take_over_an_entity_of_another_parent() {
        let mut state = ConfigState::new();
        create(&mut state, EntityKind::Service, json!({"name": "a", "host": "a.com"})).unwrap();
        create(&mut state, EntityKind::Service, json!({"name": "b", "host": "b.com"})).unwrap();
        create(&mut state, EntityKind::Route, json!({"name": "old", "paths": ["/"], "service": {"id": "b"}})).unwrap();
        let route_id = entity_id(&state.find(EntityKind::Route, "old", None).unwrap()).to_string();
        let put = Command {
            now_s: 2,
            write_id: None,
            op: Op::Upsert {
                kind: EntityKind::Route,
                key: route_id,
                id: Uuid::new_v4(),
                parent: Some(Parent { kind: EntityKind::Service, key: "a".into() }),
                body: json!({"name": "new", "paths": ["/"]}).into(),
            },
        };
        assert_eq!(state.apply(&put).unwrap_err().code, ErrorCode::NotFound);
        // The route and its unique index are as they were.
        assert_eq!(state.find(EntityKind::Route, "old", None).unwrap()["name"], "old");
        let duplicate = create(&mut state, EntityKind::Route, json!({"name": "old", "paths": ["/x"]})).unwrap_err();
        assert_eq!(duplicate.code, ErrorCode::UniqueViolation);
    }

    #[test]
    fn replacing_an_entity_frees_its_old_unique_keys() {
        let mut state = ConfigState::new();
        create(&mut state, EntityKind::Service, json!({"name": "first", "host": "a.com"})).unwrap();
        let patch = Command {
            now_s: 2,
            write_id: None,
            op: Op::Patch {
                kind: EntityKind::Service,
                key: "first".into(),
                parent: None,
                body: json!({"name": "second"}).into(),
            },
        };
        state.apply(&patch).unwrap();
        assert!(state.find(EntityKind::Service, "first", None).is_err());
        create(&mut state, EntityKind::Service, json!({"name": "first", "host": "b.com"})).unwrap();
        assert_eq!(state.entity_count(), 2);
    }

    #[test]
    fn image_round_trips() {
        let mut state = ConfigState::new();
        create(&mut state, EntityKind::Service, json!({"name": "svc", "host": "a.com"})).unwrap();
        let restored = ConfigState::from_image(&state.to_image()).unwrap();
        assert_eq!(restored.dump(), state.dump());
        // The unique index is rebuilt too.
        let mut restored = restored;
        assert!(create(&mut restored, EntityKind::Service, json!({"name": "svc", "host": "b.com"})).is_err());
    }

    #[test]
    fn pagination_walks_everything_once() {
        let mut state = ConfigState::new();
        for n in 0..25 {
            create(&mut state, EntityKind::Consumer, json!({"username": format!("user{n}")})).unwrap();
        }
        let mut seen = Vec::new();
        let mut offset = None;
        loop {
            let (page, next) = state.list(EntityKind::Consumer, None, offset, 10, &|_| true).unwrap();
            seen.extend(page.iter().map(|e| entity_id(e)));
            match next {
                Some(next) => offset = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
        seen.dedup();
        assert_eq!(seen.len(), 25);
    }
}
