//! Deterministic simulation of whole Tollgate clusters under turmoil.
//!
//! Not built yet: it arrives with the simulation issue. The node was written for it:
//! the network is behind `tollgate_node::cluster::transport` and openraft's
//! `RaftNetworkFactory`, time behind `tollgate_node::clock::Clock`, and storage is redb,
//! which has an in-memory backend. This crate exists now so that the workspace layout
//! is final.
#![forbid(unsafe_code)]
