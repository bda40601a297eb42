//! One seed: a whole cluster under turmoil, a workload, faults, and the invariants.
//!
//! A run has two phases. In the **safety** phase (`duration`), admin clients write,
//! delete and read services through every node, and proxy clients send through
//! cluster rate limits and a health-checked upstream, while the seed's faults hit the
//! cluster one at a time (`faults`). Then the **liveness** phase heals everything and
//! requires every node to apply and serve the same last version within
//! [`LIVENESS_BOUND`] and to stop routing to a target the cluster knows is down within
//! [`HEALTH_BOUND`]; final reads of every key join the history. The invariants are
//! checked on what the clients saw (`checks`): CFG1–CFG4, RL1, RL2 and HC1.
//!
//! Every node's wall clock runs off simulated time by an offset the seed chose (at
//! most [`CLOCK_OFFSET_MAX_MS`] either way). Beside the one-at-a-time faults, each
//! from a generator of its own, half the runs replace a node (a new one joins, then
//! the operator removes the old one) and half step one node's clock by up to
//! [`CLOCK_JUMP_MAX_MS`] for a while.
//!
//! Everything the run does is appended to its trace; the trace's FNV-1a hash is the
//! run's fingerprint: the same seed gives the same hash, in one process or another.

use std::rc::Rc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tollgate_node::config::NodeConfig;

use crate::checks::{check, check_health, check_rate_limits, tail};
use crate::faults::{
    heal, inflict, jump_clock, plan_clock_jump, plan_replacement, replace, schedule, undo_jump, Heal, LATENCY_MAX,
};
use crate::workload::{upstream, workload};
use crate::world::{
    data_dir, host, Shared, ADMIN_HOST, ADMIN_PORT, ADMIN_TOKEN, BACKUP_HOST, CLUSTER_PORT, CLUSTER_SECRET,
    FIRST_FAULT_AT, PROXY_PORT, SNAPSHOT_LOGS, TCP_BACKLOG, UPSTREAM_HOST,
};
pub use crate::world::{
    Failure, Options, Outcome, CLIENTS, CLOCK_JUMP_MAX_MS, CLOCK_OFFSET_MAX_MS, HEALTH_BOUND, KEYS, LIVENESS_BOUND,
    PROXY_CLIENTS, REQUEST_TIMEOUT,
};

pub(crate) fn node_config(id: u64, nodes: u64) -> NodeConfig {
    let any = |port: u16| std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let mut config = NodeConfig::new(id, data_dir(id));
    config.proxy_listen = any(PROXY_PORT);
    config.admin_listen = any(ADMIN_PORT);
    config.cluster_listen = any(CLUSTER_PORT);
    config.advertise = format!("{}:{CLUSTER_PORT}", host(id));
    config.initial_cluster = (1..=nodes).map(|peer| (peer, format!("{}:{CLUSTER_PORT}", host(peer)))).collect();
    config.workers = 1;
    config.access_log = false;
    config.admin_token = Some(ADMIN_TOKEN.to_string());
    config.cluster_secret = Some(CLUSTER_SECRET.to_string());
    config.snapshot_logs = SNAPSHOT_LOGS;
    config
}

/// A node that joins the running cluster through `members` (`--join`): a replacement.
pub(crate) fn joiner_config(id: u64, members: &[u64]) -> NodeConfig {
    // No initial cluster: a node of no bootstrap set.
    let mut config = node_config(id, 0);
    config.join = members
        .iter()
        .filter(|member| **member != id)
        .map(|member| format!("{}:{CLUSTER_PORT}", host(*member)))
        .collect();
    config
}

/// Registers node `id`'s host, its wall clock `offset_ms` off simulated time.
fn start_node(sim: &mut turmoil::Sim, config: NodeConfig, offset_ms: i64, record: &Shared) {
    let id = config.node_id;
    crate::faults::set_clock(sim, id, offset_ms, record);
    sim.host(host(id), move || {
        let config = config.clone();
        async move {
            crate::env::set_clock_node(id);
            let handle = tollgate_node::startup::start(config, None).await?;
            std::future::pending::<()>().await;
            drop(handle);
            Ok(())
        }
    });
}

/// Runs one seed.
pub fn run(options: &Options) -> Outcome {
    crate::env::install();
    crate::env::begin_run(options.seed);
    tollgate_raft_store::planted::plant(options.plant);
    let mut faults_rng = StdRng::seed_from_u64(options.seed ^ 0xfa017);
    let safety_end = FIRST_FAULT_AT + options.duration;
    let mut sim = turmoil::Builder::new()
        .rng_seed(options.seed)
        .simulation_duration(safety_end + LIVENESS_BOUND + Duration::from_secs(60))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(LATENCY_MAX)
        // A listener's backlog of connections not accepted yet: Linux's default
        // (`net.core.somaxconn`). turmoil's own (64) panics when full, where a kernel
        // drops the SYN; a held link released at once delivers more than 64.
        .tcp_capacity(TCP_BACKLOG)
        .build();
    let nodes = options.nodes;
    let record: Shared = Rc::default();
    record.borrow_mut().members = (1..=nodes).collect();
    let mut clocks = StdRng::seed_from_u64(options.seed ^ 0xc10c);
    for id in 1..=nodes {
        let offset_ms = clocks.gen_range(-CLOCK_OFFSET_MAX_MS..=CLOCK_OFFSET_MAX_MS);
        start_node(&mut sim, node_config(id, nodes), offset_ms, &record);
    }
    crate::workload::begin_run();
    sim.host(UPSTREAM_HOST, || upstream(UPSTREAM_HOST));
    sim.host(BACKUP_HOST, || upstream(BACKUP_HOST));
    sim.client(ADMIN_HOST, workload(options.clone(), safety_end, record.clone()));

    let schedule = schedule(&mut faults_rng, nodes, FIRST_FAULT_AT, safety_end);
    // A membership change, from its own generator: runs without one keep the faults
    // and the traces they had before replacements existed.
    let mut replacing_rng = StdRng::seed_from_u64(options.seed ^ 0x5e91ace);
    let mut replacement = plan_replacement(&mut replacing_rng, nodes, FIRST_FAULT_AT, safety_end);
    // A clock step, from its own generator too.
    let mut jump =
        plan_clock_jump(&mut StdRng::seed_from_u64(options.seed ^ 0x57e9), nodes, FIRST_FAULT_AT, safety_end);
    let mut jumped = None;
    let mut pending = schedule.into_iter().peekable();
    let mut active: Vec<Heal> = Vec::new();
    let mut healed = false;
    let mut error = None;
    loop {
        let now = sim.elapsed();
        while let Some((at, _)) = pending.peek() {
            if *at > now {
                break;
            }
            let Some((_, fault)) = pending.next() else { break };
            heal(&mut sim, &mut active, &record, true);
            active.push(inflict(&mut sim, fault, &record, &mut faults_rng));
        }
        if let Some((at, slot)) = replacement.filter(|(at, _)| *at <= now) {
            replacement = None;
            let new = nodes + 1;
            replace(&mut sim, slot, new, &record, &mut replacing_rng);
            let offset_ms = clocks.gen_range(-CLOCK_OFFSET_MAX_MS..=CLOCK_OFFSET_MAX_MS);
            start_node(&mut sim, joiner_config(new, &crate::world::members(&record)), offset_ms, &record);
            // A new node process, for the rate limits' bound like a restart.
            record.borrow_mut().restarts.push((at.as_millis() as u64, new));
        }
        if let Some(planned) = jump.filter(|planned| planned.at <= now) {
            jump = None;
            jumped = Some(jump_clock(&sim, planned, &record));
        }
        if let Some(done) = jumped.filter(|done| done.until <= now || now >= safety_end) {
            jumped = None;
            undo_jump(&sim, done, &record);
        }
        heal(&mut sim, &mut active, &record, false);
        if now >= safety_end && !healed {
            heal(&mut sim, &mut active, &record, true);
            record.borrow_mut().trace.push_at(now, "healed; backup sick until the end".to_string());
            // HC1's target: one the cluster must learn is down and stop routing to.
            crate::workload::set_sick(true);
            healed = true;
        }
        // A panic in the simulated network (turmoil's own limits) or in a node is a
        // finding like any other: reported with the seed's history, not a crash.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.step())) {
            Ok(Ok(true)) => break,
            Ok(Ok(false)) => {}
            Ok(Err(failure)) => {
                error = Some(failure.to_string());
                break;
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                    .unwrap_or_default();
                error = Some(format!("panicked: {message}"));
                break;
            }
        }
    }
    let mut record = record.borrow_mut();
    let failure = match error {
        Some(error) => Some(Failure {
            invariant: "simulation",
            detail: format!("a host failed: {error}"),
            history: tail(&record.trace.events, 30),
        }),
        None => check(&record).or_else(|| check_health(&record)).or_else(|| check_rate_limits(&record, nodes)),
    };
    let trace = record.trace.hash();
    Outcome {
        seed: options.seed,
        trace,
        operations: record.history.len(),
        faults: record.faults,
        failure,
        events: std::mem::take(&mut record.trace.events),
    }
}
