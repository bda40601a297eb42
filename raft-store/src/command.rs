//! Commands: what goes into the Raft log, and what applying one answers.
//!
//! A command carries everything its outcome depends on (time, generated ids), so
//! applying the same log gives the same state on every node.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ApiError;
use crate::json::{JsonText, JsonValue};
use crate::schema::EntityKind;

/// One replicated write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Wall-clock seconds since the epoch, stamped by the leader before proposing.
    /// The state machine never reads a clock.
    pub now_s: i64,
    /// Set on writes a node may send to a leader more than once (admin writes, quota
    /// releases): the state machine applies a write id once ([`crate::recent`]).
    pub write_id: Option<WriteId>,
    pub op: Op,
}

/// Names one write across the attempts to get it committed; chosen at random by the
/// node that took the write, before its first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WriteId(pub u128);

/// The entity a nested Admin API path is scoped to (`/services/{key}/routes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    pub kind: EntityKind,
    /// Id or endpoint key of the parent.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// `POST /{collection}`: `id` is used unless the body names one.
    Create { kind: EntityKind, id: Uuid, parent: Option<Parent>, body: JsonValue },
    /// `PUT /{collection}/{key}`: create or replace. `id` is used when `key` is not a
    /// uuid and no entity has that endpoint key yet.
    Upsert { kind: EntityKind, key: String, id: Uuid, parent: Option<Parent>, body: JsonValue },
    /// `PATCH /{collection}/{key}`.
    Patch { kind: EntityKind, key: String, parent: Option<Parent>, body: JsonValue },
    /// `DELETE /{collection}/{key}`.
    Delete { kind: EntityKind, key: String, parent: Option<Parent> },
    /// `POST /config`: replace the whole configuration with a declarative document.
    /// Entities without an id get one derived from `id_seed` and their position.
    ReplaceAll { document: JsonText, id_seed: u128 },
    /// Tokens of the cluster rate-limit ledger for `node`, many keys at once.
    Grant { node: crate::NodeId, requests: Vec<crate::quota::GrantRequest> },
    /// Tokens `node` gives back unused (it stops, and will not use them).
    Release { node: crate::NodeId, releases: Vec<(crate::quota::QuotaKey, u64)> },
    /// `POST /config` as [`Op::ReplaceAll`], with the hash of the text as sent (Kong's
    /// `configuration_hash`, which `?check_hash=1` compares). Last: variants are
    /// numbered in encoded entries.
    ReplaceHashed { document: JsonText, id_seed: u128, hash: String },
}

impl Op {
    /// Whether applying this changes the configuration (the quota ledger is not).
    pub fn changes_config(&self) -> bool {
        !matches!(self, Op::Grant { .. } | Op::Release { .. })
    }
}

/// What applying a command answered; errors change nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// A new entity (HTTP 201).
    Created(JsonValue),
    /// An existing entity, after the write (HTTP 200).
    Updated(JsonValue),
    /// Deleted, or was not there (HTTP 204, as Kong).
    Deleted,
    /// The whole configuration was replaced; how many entities it now holds.
    Replaced { entities: u64 },
    /// A Raft-internal entry (blank, membership).
    Internal,
    /// The answers to a grant command, one per request, in order.
    Granted(Vec<crate::quota::Grant>),
}

/// The state machine's answer to one log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResponse {
    pub result: Result<Outcome, ApiError>,
}
