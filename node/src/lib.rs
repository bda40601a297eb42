//! The Tollgate node: cluster wiring, Admin API and publish path.
//!
//! Lifecycle documents live beside the code: [`cluster`] (leader path), [`publish`]
//! (compiled snapshots), `raft-store`'s `store` module (storage).
#![forbid(unsafe_code)]

pub mod admin;
pub mod certs;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod dev;
pub mod dns;
pub mod echo;
pub mod env;
pub mod form;
pub mod gossip;
pub mod health;
pub mod node;
pub mod plugins;
pub mod proxy;
pub mod publish;
pub mod quota;
pub mod serve;
pub mod startup;
pub mod text;

pub use tollgate_raft_store::NodeId;
