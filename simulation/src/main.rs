//! `cargo run --release -p tollgate-simulation -- --seeds A..B [--nodes 3|5] [--duration SECONDS]`
//!
//! Runs each seed (a whole cluster, its workload and its faults) and prints one line
//! per seed ending in `trace=<hash>`. On a failure it prints the seed, the
//! invariant, the events that led there and the command that replays it, and exits
//! non-zero. `--seed N --verbose` replays one seed with its full event log.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tollgate_simulation::run::{run, Options};

#[derive(Parser)]
#[command(name = "tollgate-simulation", about = "Deterministic simulation of whole Tollgate clusters")]
struct Args {
    /// A range of seeds, `A..B` (B excluded).
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<String>,
    /// One seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes in the cluster: 3 or 5.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Seconds of the safety phase (faults and workload), in simulated time.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Print every event of each run.
    #[arg(long)]
    verbose: bool,
    /// Test-only: plant a bug (ack-before-commit, stale-reads, grant-past-limit, forget-ledger,
    /// local-health-only, drop-publish, forget-committed, keep-removed) to see an invariant catch it.
    #[arg(long)]
    plant: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.nodes != 3 && args.nodes != 5 {
        eprintln!("--nodes: 3 or 5, not {}", args.nodes);
        return ExitCode::from(2);
    }
    if !(1..=600).contains(&args.duration) {
        eprintln!("--duration: 1 to 600 seconds, not {}", args.duration);
        return ExitCode::from(2);
    }
    let plant = match args.plant.as_deref() {
        None => None,
        Some(name) => match tollgate_raft_store::planted::Bug::parse(name) {
            Some(bug) => Some(bug),
            None => {
                eprintln!("--plant: unknown bug {name}");
                return ExitCode::from(2);
            }
        },
    };
    let seeds = match (&args.seeds, args.seed) {
        (Some(range), _) => match parse_range(range) {
            Some(seeds) => seeds,
            None => {
                eprintln!("--seeds: expected A..B with A < B, not {range}");
                return ExitCode::from(2);
            }
        },
        (None, Some(seed)) => seed..seed + 1,
        (None, None) => {
            eprintln!("give --seeds A..B or --seed N");
            return ExitCode::from(2);
        }
    };
    if args.verbose {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    // Real time, on purpose: seeds per minute of this machine.
    #[allow(clippy::disallowed_types)]
    let started = std::time::Instant::now();
    let mut failed = 0;
    let total = seeds.end - seeds.start;
    for seed in seeds {
        let options = Options { seed, nodes: args.nodes, duration: Duration::from_secs(args.duration), plant };
        let outcome = run(&options);
        if args.verbose {
            for event in &outcome.events {
                println!("  {event}");
            }
        }
        let result = if outcome.failure.is_some() { "FAILED" } else { "ok" };
        println!(
            "seed={seed} nodes={} ops={} faults={} result={result} trace={:016x}",
            args.nodes, outcome.operations, outcome.faults, outcome.trace
        );
        if let Some(failure) = outcome.failure {
            failed += 1;
            println!("  invariant {}: {}", failure.invariant, failure.detail);
            println!("  history:\n{}", failure.history);
            let plant = plant.map(|bug| format!(" --plant {}", bug.name())).unwrap_or_default();
            println!(
                "  replay: cargo run --release -p tollgate-simulation -- --seed {seed} --nodes {} --duration {}{plant} --verbose",
                args.nodes, args.duration
            );
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{total} seeds, {failed} failed, {elapsed:.1} s ({:.1} seeds/minute)",
        total as f64 * 60.0 / elapsed.max(0.001)
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn parse_range(range: &str) -> Option<std::ops::Range<u64>> {
    let (from, to) = range.split_once("..")?;
    let (from, to) = (from.trim().parse().ok()?, to.trim().parse().ok()?);
    (from < to).then_some(from..to)
}
