//! Deterministic simulation of whole Tollgate clusters under turmoil.
//!
//! What is here so far (see README.md for the plan and the nondeterminism found):
//! - [`linearizability`]: the CFG2 checker (Wing–Gong with Lowe's memoisation) the
//!   simulator runs over each seed's recorded admin history, tested on known
//!   linearizable and non-linearizable histories.
//! - [`disk`]: the simulated durable disk redb runs on: what was synced survives a
//!   crash, what was not is kept, lost or torn as the seed decides.
//!
//! The cluster harness itself needs the node's environment seam (network, clock,
//! randomness, task spawning) and is not built yet.
#![forbid(unsafe_code)]

pub mod disk;
pub mod linearizability;
