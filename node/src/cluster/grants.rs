//! The grant task: turns the leases' demands into ledger grants, many keys per Raft
//! entry, and drops leases of windows that are over.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tollgate_raft_store::quota::{GrantRequest, GRANT_REQUESTS_MAX};

use super::Cluster;
use crate::quota::{Demand, Leases};

/// How long a batch waits for more demands after its first.
const BATCH_DELAY: Duration = Duration::from_millis(2);
/// How long one grant round may take before its demands count as failed (and the
/// node as cut off from the cluster).
pub const GRANT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often leases of ended windows are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// Runs until `stop` turns true.
pub async fn run(cluster: Cluster, leases: Arc<Leases>, mut stop: watch::Receiver<bool>) {
    let Some(mut demands) = leases.take_demands() else { return };
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => return,
            _ = expire.tick() => {
                leases.expire(cluster.now_s());
                leases.set_voters(voters(&cluster));
            }
            first = demands.recv() => {
                let Some(first) = first else { return };
                let mut batch = vec![first];
                let deadline = tokio::time::Instant::now() + BATCH_DELAY;
                while batch.len() < GRANT_REQUESTS_MAX {
                    match tokio::time::timeout_at(deadline, demands.recv()).await {
                        Ok(Some(demand)) => batch.push(demand),
                        _ => break,
                    }
                }
                round(&cluster, &leases, batch).await;
            }
        }
    }
}

fn voters(cluster: &Cluster) -> u64 {
    cluster.raft.metrics().borrow().membership_config.membership().voter_ids().count() as u64
}

/// One grant round: one Raft entry for the whole batch.
async fn round(cluster: &Cluster, leases: &Leases, batch: Vec<Demand>) {
    // Rounds can follow each other for long (while cut off, each waits out its
    // timeout): keep the fallback bound's voter count fresh here too.
    leases.set_voters(voters(cluster));
    let requests: Vec<GrantRequest> = batch
        .iter()
        .map(|demand| GrantRequest {
            key: demand.lease.key.clone(),
            limit: demand.lease.limit,
            want: demand.want,
            used: demand.lease.used(),
        })
        .collect();
    metrics::counter!("tollgate_quota_grant_requests_total").increment(requests.len() as u64);
    // The entry's size as the log stores it (the requests dominate it).
    let bytes = tollgate_raft_store::codec::encode(&requests).map_or(0, |frame| frame.len() as u64);
    metrics::counter!("tollgate_quota_raft_entry_bytes_total").increment(bytes);
    match tokio::time::timeout(GRANT_TIMEOUT, cluster.grant(requests)).await {
        Ok(Ok(grants)) if grants.len() == batch.len() => {
            metrics::counter!("tollgate_quota_raft_entries_total").increment(1);
            let tokens: u64 = grants.iter().map(|grant| grant.granted).sum();
            metrics::counter!("tollgate_quota_tokens_granted_total").increment(tokens);
            for (demand, grant) in batch.iter().zip(grants) {
                demand.lease.add_grant(grant);
            }
            leases.set_cut_off(false);
        }
        outcome => {
            let why = match outcome {
                Ok(Ok(_)) => "the leader answered a different number of grants".to_string(),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {} ms", GRANT_TIMEOUT.as_millis()),
            };
            tracing::debug!(why, keys = batch.len(), "grant round failed");
            metrics::counter!("tollgate_quota_grant_failures_total").increment(1);
            for demand in &batch {
                demand.lease.demand_failed();
            }
            leases.set_cut_off(true);
        }
    }
}
