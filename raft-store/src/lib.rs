//! Tollgate's replicated state.
//!
//! - [`schema`] and [`error`]: the entity model and the Admin API error shape
//!   ([`schema_doc`]: the schemas as Kong's `GET /schemas` shows them), and
//!   [`entities`] and [`plugins`]: the typed forms and the plugin registry
//!   ([`template`]: request-transformer's `$(…)` values); usable
//!   without the storage half (the client builds with `default-features = false`).
//! - [`command`], [`state`], [`declarative`], [`quota`], [`recent`]: the
//!   deterministic state machine (config, the cluster rate-limit ledger, and the admin
//!   writes applied lately, so a retried write is applied once).
//! - [`store`], [`codec`]: openraft log and state-machine storage on redb.
#![forbid(unsafe_code)]

pub mod entities;
pub mod error;
pub mod planted;
pub mod plugins;
pub mod schema;
pub mod schema_doc;
pub mod tags;
pub mod template;
pub mod validate;

#[cfg(feature = "storage")]
pub mod codec;
#[cfg(feature = "storage")]
pub mod command;
#[cfg(feature = "storage")]
pub mod declarative;
#[cfg(feature = "storage")]
pub mod json;
#[cfg(feature = "storage")]
pub mod quota;
#[cfg(feature = "storage")]
pub mod recent;
#[cfg(feature = "storage")]
pub mod runtime;
#[cfg(feature = "storage")]
pub mod state;
#[cfg(feature = "storage")]
pub mod store;

pub use error::{ApiError, ErrorCode};
pub use schema::EntityKind;

/// Node ids are stable u64s chosen by the operator (`--node-id`).
pub type NodeId = u64;

#[cfg(feature = "storage")]
use std::io::Cursor;

#[cfg(feature = "storage")]
openraft::declare_raft_types!(
    /// Tollgate's openraft type configuration.
    pub TypeConfig:
        D = command::Command,
        R = command::CommandResponse,
        AsyncRuntime = runtime::Runtime,
);

#[cfg(feature = "storage")]
pub type Raft = openraft::Raft<TypeConfig>;
