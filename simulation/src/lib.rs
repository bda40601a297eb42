//! Deterministic simulation of whole Tollgate clusters under turmoil (issue 15).
//!
//! - [`run`]: one seed, a whole cluster of real nodes (`startup::start`) on turmoil's
//!   simulated network, a workload, faults, and the invariants checked on what the
//!   clients saw; the run's trace hash is its fingerprint. Its parts: `world` (what
//!   they share: constants, options, the trace and the record), `workload` (the
//!   targets and the clients), `faults` (chosen, inflicted, healed) and `checks` (the
//!   invariants, on the record).
//! - [`env`]: the simulator's side of the node's environment seam.
//! - [`linearizability`]: the CFG2 checker (Wing–Gong with Lowe's memoisation),
//!   tested on known linearizable and non-linearizable histories.
//! - [`disk`]: the simulated durable disk redb runs on: what was synced survives a
//!   crash, what was not is kept, lost or torn as the seed decides.
#![forbid(unsafe_code)]

mod checks;
pub mod disk;
pub mod env;
mod faults;
pub mod linearizability;
pub mod run;
mod workload;
mod world;
