//! Services and upstreams as the data path uses them, compiled once per config version
//! from the typed entities ([`tollgate_raft_store::entities`], whose defaults are the
//! schema's): each [`Service`] is built whole, with its transport, balancer and
//! addresses, before the snapshot is published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::HeaderValue;
use tollgate_raft_store::entities::{self, read};
use tollgate_raft_store::state::ConfigState;
use tollgate_raft_store::EntityKind;
use uuid::Uuid;

use super::balancer::{self, Balancer, HashOn, Target};
use super::connect::Timeouts;
use super::upstream::Transport;
use crate::plugins::IdMap;

/// One service as requests use it.
#[derive(Debug)]
pub struct Service {
    pub id: Uuid,
    pub name: Option<String>,
    /// The service's `path`; `/` when it has none.
    pub path: String,
    pub retries: u32,
    pub timeouts: Timeouts,
    pub enabled: bool,
    /// How requests reach the upstream.
    pub transport: Transport,
    /// The upstream `host` names, when it names one.
    pub balancer: Option<Arc<balancer::Upstream>>,
    /// `host:port` when `host` names no upstream.
    pub authority: Option<Authority>,
    /// The `Host` sent upstream: `host`, with `:port` when the port is not 80 and no
    /// upstream is named.
    pub host_header: Option<HeaderValue>,
}

/// Services by id.
pub type Services = IdMap<Uuid, Arc<Service>>;
/// Upstreams by name (lower case), with their targets in rotation.
pub type Upstreams = HashMap<String, Arc<balancer::Upstream>>;

impl Service {
    fn compile(service: &entities::Service, state: &ConfigState, upstreams: &Upstreams) -> Service {
        let balancer = upstreams.get(&service.host.to_ascii_lowercase()).cloned();
        let direct = format!("{}:{}", service.host, service.port);
        let host_header = if balancer.is_some() || service.port == 80 { &service.host } else { &direct };
        Service {
            id: service.id,
            name: service.name.clone(),
            path: service.path.clone().unwrap_or_else(|| "/".to_string()),
            retries: service.retries,
            timeouts: Timeouts {
                connect: Duration::from_millis(service.connect_timeout),
                write: Duration::from_millis(service.write_timeout),
                read: Duration::from_millis(service.read_timeout),
            },
            enabled: service.enabled,
            transport: Transport::for_service(service, state),
            authority: Authority::try_from(direct.as_str()).ok(),
            host_header: HeaderValue::from_str(host_header).ok(),
            balancer,
        }
    }
}

/// Every readable stored entity of `kind` as `T` (one that is not is logged and
/// left out: it cannot be routed to).
pub fn typed<'a, T: serde::de::DeserializeOwned>(
    state: &'a ConfigState,
    kind: EntityKind,
) -> impl Iterator<Item = T> + 'a {
    state.table(kind).values().filter_map(move |entity| match read::<T>(kind, entity) {
        Ok(typed) => Some(typed),
        Err(error) => {
            let id = tollgate_raft_store::state::entity_id(entity);
            tracing::warn!(kind = kind.table(), %id, %error, "stored entity not readable; left out");
            None
        }
    })
}

/// The upstream entities and their target entities, by upstream id: what a compiled
/// upstream is built from.
fn upstream_sources(state: &ConfigState) -> HashMap<Uuid, Vec<&Arc<tollgate_raft_store::schema::Object>>> {
    let mut sources: HashMap<Uuid, Vec<_>> = HashMap::new();
    for (id, upstream) in state.table(EntityKind::Upstream) {
        sources.entry(*id).or_default().push(upstream);
    }
    for target in state.table(EntityKind::Target).values() {
        let upstream = tollgate_raft_store::state::foreign_id(target, "upstream");
        if let Some(sources) = upstream.and_then(|id| sources.get_mut(&id)) {
            sources.push(target);
        }
    }
    sources
}

/// The upstreams of `state`. An upstream whose entity and targets are what they were
/// in `previous` keeps its compiled balancer: a config change elsewhere (a route, a
/// service) does not restart its round-robin rotation at the first target, nor reset
/// its passive health counters, as Kong rebuilds a balancer only when its upstream or
/// targets change. (Rebuilding at every change sent the first target of the schedule
/// more than its share under frequent admin writes: the simulator's `/pooled` clients
/// saw about 60 % of answers from one of two equal targets.)
pub fn compile_upstreams(state: &ConfigState, previous: Option<(&ConfigState, &Upstreams)>) -> Upstreams {
    let sources = previous.map(|(old_state, _)| (upstream_sources(old_state), upstream_sources(state)));
    // The balancer compiled before for upstream `id` named `name`, if its upstream and
    // targets are what they were.
    let kept = |name: &str, id: Uuid| -> Option<Arc<balancer::Upstream>> {
        let ((_, upstreams), (before, now)) = (previous?, sources.as_ref()?);
        let (before, now) = (before.get(&id)?, now.get(&id)?);
        let same = before.len() == now.len() && before.iter().zip(now).all(|(a, b)| Arc::ptr_eq(a, b) || a == b);
        upstreams.get(name).filter(|compiled| same && compiled.id == id).cloned()
    };
    let mut targets_by_upstream: HashMap<Uuid, Vec<Target>> = HashMap::new();
    for target in typed::<entities::Target>(state, EntityKind::Target) {
        let address = balancer::target_address(&target.target);
        targets_by_upstream.entry(target.upstream.id).or_default().push(Target::new(address, target.weight));
    }
    typed::<entities::Upstream>(state, EntityKind::Upstream)
        .map(|upstream| {
            let name = upstream.name.to_ascii_lowercase();
            if let Some(compiled) = kept(&name, upstream.id) {
                return (name, compiled);
            }
            let mut targets = targets_by_upstream.remove(&upstream.id).unwrap_or_default();
            targets.sort_by(|a, b| a.address.cmp(&b.address));
            let hash_on = HashOn::from_config(
                &upstream.hash_on,
                upstream.hash_on_header.as_deref(),
                upstream.hash_on_cookie.as_deref(),
                upstream.hash_on_query_arg.as_deref(),
            );
            let hash_fallback = HashOn::from_config(
                &upstream.hash_fallback,
                upstream.hash_fallback_header.as_deref(),
                upstream.hash_on_cookie.as_deref(),
                upstream.hash_fallback_query_arg.as_deref(),
            );
            let balancer = Balancer::new(&upstream.algorithm, targets, hash_on, hash_fallback);
            let passive = balancer::passive_checks_on(Some(&upstream.healthchecks));
            let compiled = balancer::Upstream::new(upstream.id, balancer, passive);
            (name, Arc::new(compiled))
        })
        .collect()
}

pub fn compile_services(state: &ConfigState, upstreams: &Upstreams) -> Services {
    typed::<entities::Service>(state, EntityKind::Service)
        .map(|service| (service.id, Arc::new(Service::compile(&service, state, upstreams))))
        .collect()
}
