//! What the data path reads: one compiled configuration ([`CompiledConfig`], with its
//! [`ProxySnapshot`]), swapped whole by the publish task (`publish.rs`) and loaded
//! once per request ([`Published::load`]), never waited on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tollgate_raft_store::state::ConfigState;
use tollgate_raft_store::store::Applied;
use tollgate_raft_store::EntityKind;
use uuid::Uuid;

use super::router::Router;
use super::service::{self, Services, Upstreams};
use super::{telemetry, tls};

/// What the data path reads, compiled from one applied config.
#[derive(Default)]
pub struct ProxySnapshot {
    pub router: Router,
    pub services: Services,
    /// Upstreams by name, with their targets in rotation.
    pub upstreams: Upstreams,
    /// Certificates by SNI name, for the TLS listener.
    pub certificates: tls::Certificates,
    /// Metric handles per route id, and for requests no route matched.
    pub route_metrics: crate::plugins::IdMap<Uuid, Arc<telemetry::RouteMetrics>>,
    pub unmatched_metrics: Option<Arc<telemetry::RouteMetrics>>,
    /// Plugin instances by scope, consumers and credentials.
    pub plugins: crate::plugins::Plugins,
}

impl ProxySnapshot {
    pub fn compile(state: &ConfigState) -> ProxySnapshot {
        ProxySnapshot::compile_after(state, None)
    }

    /// `state` compiled; what did not change since `previous` (its state and
    /// snapshot) is kept as it was (the upstreams' balancers).
    pub fn compile_after(state: &ConfigState, previous: Option<(&ConfigState, &ProxySnapshot)>) -> ProxySnapshot {
        let routes: Vec<tollgate_raft_store::entities::Route> = service::typed(state, EntityKind::Route).collect();
        let upstreams = service::compile_upstreams(state, previous.map(|(old_state, old)| (old_state, &old.upstreams)));
        let services = service::compile_services(state, &upstreams);
        // A route whose service is disabled is not in the router, as in Kong
        // (kong/runloop/handler.lua; spec/02-integration/05-proxy/02-router_spec.lua:458):
        // a request matching it matches the next route, or none (404).
        let disabled = |route: &&tollgate_raft_store::entities::Route| {
            route.service.and_then(|key| services.get(&key.id)).is_some_and(|service| !service.enabled)
        };
        let router = Router::compile(routes.iter().filter(|route| !disabled(route)));
        // Metric labels: names, or ids where there is none.
        let route_metrics = routes
            .iter()
            .map(|route| {
                let service = route
                    .service
                    .and_then(|key| services.get(&key.id))
                    .map(|service| service.name.clone().unwrap_or_else(|| service.id.to_string()));
                let label = route.name.clone().unwrap_or_else(|| route.id.to_string());
                let metrics = telemetry::RouteMetrics::register(&service.unwrap_or_default(), &label);
                (route.id, Arc::new(metrics))
            })
            .collect();
        ProxySnapshot {
            router,
            services,
            upstreams,
            certificates: tls::Certificates::compile(state),
            route_metrics,
            unmatched_metrics: Some(Arc::new(telemetry::RouteMetrics::register("", ""))),
            plugins: crate::plugins::Plugins::compile(state),
        }
    }
}

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
    pub fn next(&self, applied: &Applied) -> CompiledConfig {
        if self.revision == Some(applied.config_revision) {
            return CompiledConfig {
                version: applied.version(),
                state: self.state.clone(),
                proxy: self.proxy.clone(),
                revision: self.revision,
            };
        }
        CompiledConfig {
            version: applied.version(),
            state: applied.state.clone(),
            proxy: Arc::new(ProxySnapshot::compile_after(&applied.state, Some((&self.state, &self.proxy)))),
            revision: Some(applied.config_revision),
        }
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

    pub fn store(&self, compiled: CompiledConfig) {
        let version = compiled.version;
        let previous = self.current.swap(Arc::new(compiled));
        debug_assert!(previous.version <= version, "CFG3: the published version never decreases");
        self.publications.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tollgate_config_publications_total").increment(1);
        metrics::gauge!("tollgate_config_version").set(version as f64);
    }
}
