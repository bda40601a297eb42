//! Steady proxy load at a fixed rate, for deploy/test.sh's rolling restarts: every
//! request's outcome is counted, and a JSON summary is printed when it stops.
//!
//! Run: `steady-load --url http://127.0.0.1:8000/echo [--rps 200] [--seconds 600]
//!       [--stop-file PATH] [--ready-file PATH] [--concurrency 64]`
//! It stops after `--seconds`, or as soon as `--stop-file` exists; it creates
//! `--ready-file` once a first request succeeded. A request failed when
//! it got no answer (connection refused or reset, timeout) or an answer other than 2xx.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tollgate_tests::{cli_arg, ProxyClient};

/// Longest one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the stop file is looked for.
const STOP_POLL: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Outcomes {
    ok: u64,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url: String = cli_arg("--url", "http://127.0.0.1:8000/echo".to_string());
    let rps: u64 = cli_arg("--rps", 200).max(1);
    let seconds: u64 = cli_arg("--seconds", 600);
    let concurrency: usize = cli_arg("--concurrency", 64).max(1);
    let stop_file: Option<PathBuf> =
        cli_arg("--stop-file", String::new()).parse().ok().filter(|p: &PathBuf| !p.as_os_str().is_empty());
    let ready_file: Option<PathBuf> =
        cli_arg("--ready-file", String::new()).parse().ok().filter(|p: &PathBuf| !p.as_os_str().is_empty());
    let (origin, path) = match url.find("://").and_then(|scheme| url[scheme + 3..].find('/').map(|i| scheme + 3 + i)) {
        Some(split) => (url[..split].to_string(), url[split..].to_string()),
        None => (url.clone(), "/".to_string()),
    };

    let client = ProxyClient::new();
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut ticks = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rps));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_stop_check = started;
    let mut sent = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        ticks.tick().await;
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now >= next_stop_check {
            next_stop_check = now + STOP_POLL;
            if stop_file.as_ref().is_some_and(|file| file.exists()) {
                break;
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let (client, outcomes, origin, path) = (client.clone(), outcomes.clone(), origin.clone(), path.clone());
        let ready_file = ready_file.clone();
        sent += 1;
        tasks.spawn(async move {
            let _slot = slot;
            let result = tokio::time::timeout(REQUEST_TIMEOUT, client.request(&origin, "GET", None, &path, &[])).await;
            let mut outcomes = outcomes.lock().await;
            match result {
                Ok(Ok(reply)) if (200..300).contains(&reply.status) => {
                    outcomes.ok += 1;
                    if outcomes.ok == 1 {
                        if let Some(file) = ready_file {
                            let _ = std::fs::write(file, b"");
                        }
                    }
                }
                Ok(Ok(reply)) => *outcomes.statuses.entry(reply.status).or_default() += 1,
                Ok(Err(error)) => *outcomes.errors.entry(root_cause(&error)).or_default() += 1,
                Err(_) => *outcomes.errors.entry("timeout".to_string()).or_default() += 1,
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let outcomes = outcomes.lock().await;
    let failed: u64 = outcomes.statuses.values().sum::<u64>() + outcomes.errors.values().sum::<u64>();
    let summary = json!({
        "url": url,
        "seconds": (elapsed * 10.0).round() / 10.0,
        "target_rps": rps,
        "sent": sent,
        "ok": outcomes.ok,
        "failed": failed,
        "failed_statuses": outcomes.statuses,
        "errors": outcomes.errors,
    });
    println!("{summary}");
    Ok(())
}

/// The innermost error's text (a refused connection, a reset), without addresses.
fn root_cause(error: &anyhow::Error) -> String {
    let mut source: &dyn std::error::Error = error.as_ref();
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}
