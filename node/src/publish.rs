//! The publish path: after the state machine applies entries, build the immutable
//! compiled configuration the data path reads, and swap it in atomically.
//!
//! The state machine announces each applied batch on a `watch` channel (which holds
//! only the newest value, so a burst of applies costs one compile). This task compiles
//! off the request path; readers call [`Published::load`] and never wait.

use std::sync::Arc;

use tokio::sync::watch;
use tollgate_raft_store::planted::{planted, Bug};
use tollgate_raft_store::store::Applied;

pub use crate::proxy::snapshot::{CompiledConfig, Published};

/// Compiles and publishes every new applied state until the channel closes.
pub async fn run(mut applied: watch::Receiver<Applied>, published: Arc<Published>) {
    let mut batches = 0u64;
    loop {
        batches += 1;
        let current = published.load();
        let compiled = current.next(&applied.borrow_and_update());
        let dropped = planted(Bug::DropPublish) && batches.is_multiple_of(2);
        if compiled.version >= published.load().version && !dropped {
            published.store(compiled);
        }
        if applied.changed().await.is_err() {
            return;
        }
    }
}
