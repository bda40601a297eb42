//! Deterministic simulation of whole Tollgate clusters under turmoil (issue 15).
//!
//! - [`run`]: one seed, a whole cluster of real nodes (`node::start`) on turmoil's
//!   simulated network, a workload, faults, and the invariants checked on what the
//!   clients saw; the run's trace hash is its fingerprint.
//! - [`env`]: the simulator's side of the node's environment seam.
//! - [`linearizability`]: the CFG2 checker (Wing–Gong with Lowe's memoisation),
//!   tested on known linearizable and non-linearizable histories.
//! - [`disk`]: the simulated durable disk redb runs on: what was synced survives a
//!   crash, what was not is kept, lost or torn as the seed decides.
#![forbid(unsafe_code)]

pub mod disk;
pub mod env;
pub mod linearizability;
pub mod run;
