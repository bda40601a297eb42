//! The publish path: after the state machine applies entries, build the immutable
//! compiled configuration the data path reads, and swap it in atomically.
//!
//! The state machine announces each applied batch on a `watch` channel (which holds
//! only the newest value, so a burst of applies costs one compile). This task compiles
//! off the request path; readers call [`Published::load`] and never wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tollgate_raft_store::state::ConfigState;
use tollgate_raft_store::store::Applied;

use crate::proxy::ProxySnapshot;

/// One immutable compiled configuration: the validated entities, and what the data
/// path reads (router, services, balancers).
#[derive(Default)]
pub struct CompiledConfig {
    /// The Raft log index of the last entry applied into this config.
    pub version: u64,
    pub state: ConfigState,
    pub proxy: Arc<ProxySnapshot>,
    /// The state machine's config revision this was compiled from (`None` before the
    /// first compile).
    revision: Option<u64>,
}

impl CompiledConfig {
    pub fn compile(applied: &Applied) -> CompiledConfig {
        CompiledConfig {
            version: applied.version(),
            state: applied.state.clone(),
            proxy: Arc::new(ProxySnapshot::compile(&applied.state)),
            revision: Some(applied.config_revision),
        }
    }

    /// `applied` compiled, reusing `self` when the config is the same (entries that
    /// only moved the applied index, such as quota grants).
    fn next(&self, applied: &Applied) -> CompiledConfig {
        if self.revision == Some(applied.config_revision) {
            return CompiledConfig {
                version: applied.version(),
                state: self.state.clone(),
                proxy: self.proxy.clone(),
                revision: self.revision,
            };
        }
        CompiledConfig::compile(applied)
    }
}

/// The current compiled configuration, swapped whole.
pub struct Published {
    current: ArcSwap<CompiledConfig>,
    publications: AtomicU64,
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Published").field("version", &self.load().version).finish()
    }
}

impl Published {
    /// Starts from `first`: a node compiles the config it holds before any listener
    /// answers, so nothing is served from an empty placeholder.
    pub fn new(first: CompiledConfig) -> Published {
        metrics::gauge!("tollgate_config_version").set(first.version as f64);
        Published { current: ArcSwap::from_pointee(first), publications: AtomicU64::new(1) }
    }

    pub fn load(&self) -> Arc<CompiledConfig> {
        self.current.load_full()
    }

    pub fn publications(&self) -> u64 {
        self.publications.load(Ordering::Relaxed)
    }

    fn store(&self, compiled: CompiledConfig) {
        let version = compiled.version;
        let previous = self.current.swap(Arc::new(compiled));
        debug_assert!(previous.version <= version, "CFG3: the published version never decreases");
        self.publications.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tollgate_config_publications_total").increment(1);
        metrics::gauge!("tollgate_config_version").set(version as f64);
    }
}

/// Compiles and publishes every new applied state until the channel closes.
pub async fn run(mut applied: watch::Receiver<Applied>, published: Arc<Published>) {
    loop {
        let current = published.load();
        let compiled = current.next(&applied.borrow_and_update());
        if compiled.version >= published.load().version {
            published.store(compiled);
        }
        if applied.changed().await.is_err() {
            return;
        }
    }
}
