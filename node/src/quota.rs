//! The node's side of cluster rate limits: leases of tokens the ledger granted this
//! node, per (plugin, subject, window), and the demands that renew them.
//!
//! The data path only touches memory here: a request takes a token from its key's
//! lease with one atomic operation. When a lease runs low (below what the key used in
//! the last quarter second), a demand goes on a bounded queue; the grant task
//! (`cluster::grants`) batches demands of many keys into one Raft entry and adds what
//! the ledger granted. A request that finds no token and no lease yet waits for one
//! grant round (the first request of a key in a window on this node), bounded by
//! [`GRANT_WAIT`]; if the round's tokens were taken by concurrent requests first, it
//! asks again within the same bound ([`Leases::wait_for_tokens`]). Only a round that
//! failed or did not answer in time lets `fault_tolerant` admit without a token.
//! The design and the argument for "never over" are in `QUOTA.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tollgate_raft_store::quota::{Grant, QuotaKey};

/// Leases a node holds at once; past it, new keys are not leased (their requests
/// follow `fault_tolerant`) until windows end.
pub const LEASES_MAX: usize = 1_000_000;
/// Demands queued for the grant task; past it a demand is dropped and asked again
/// by the next request that finds its lease low.
pub const DEMANDS_MAX: usize = 65_536;
/// How long a request without a token waits for a grant round.
pub const GRANT_WAIT: Duration = Duration::from_millis(1000);
/// Fewest tokens asked for at once.
pub const WANT_MIN: u64 = 1;
/// A lease is sized to this much of the key's recent rate.
const RENEW_HORIZON_MS: u64 = 500;
/// Renew once fewer tokens than this much of the recent rate are left.
const LOW_WATER_MS: u64 = 250;
/// How long before a window ends its next window's tokens are asked for (at most;
/// half the window for windows shorter than twice this).
const PREFETCH_MS: u64 = 1000;

/// What a request got from its key's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Admitted; about this many tokens are left cluster-wide (what no node holds
    /// plus what this node holds).
    Admitted { remaining: u64 },
    /// The window's limit is spent cluster-wide.
    Spent,
    /// No token here now; a grant is on its way (or the cluster is unreachable).
    Empty,
}

/// One key's lease on this node.
pub struct Lease {
    pub key: QuotaKey,
    pub limit: u64,
    /// Tokens held, not used yet.
    available: AtomicU64,
    /// Requests this node admitted with tokens of this lease.
    used: AtomicU64,
    /// Tokens granted to this node in all.
    granted: AtomicU64,
    /// Tokens granted to all nodes, as of the last grant.
    cluster_total: AtomicU64,
    /// A demand is queued or in flight.
    pending: AtomicBool,
    /// The last grant round for this lease failed (no quorum, no answer in time).
    round_failed: AtomicBool,
    /// The ledger has nothing more to grant for this window.
    spent: AtomicBool,
    /// Requests admitted on the local fallback (`fault_tolerant` while cut off).
    fallback_used: AtomicU64,
    /// Requests in the current rate bucket, and the bucket's start (ms since start).
    bucket_count: AtomicU64,
    bucket_start_ms: AtomicU64,
    /// Requests per second, from the last full bucket.
    rate: AtomicU64,
    /// The next window's lease was made and asked for ahead of this window's end.
    prefetched: AtomicBool,
    granted_notify: Notify,
}

impl Lease {
    fn new(key: QuotaKey, limit: u64) -> Lease {
        Lease {
            key,
            limit,
            available: AtomicU64::new(0),
            used: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            cluster_total: AtomicU64::new(0),
            pending: AtomicBool::new(false),
            round_failed: AtomicBool::new(false),
            spent: AtomicBool::new(false),
            fallback_used: AtomicU64::new(0),
            bucket_count: AtomicU64::new(0),
            bucket_start_ms: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            prefetched: AtomicBool::new(false),
            granted_notify: Notify::new(),
        }
    }

    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Relaxed)
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// Takes one token, if one is held.
    fn take_token(&self) -> bool {
        self.available.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
    }

    /// Gives back a token taken for a request another window refused; the request
    /// does not count in this lease's rate either (refused demand must not size
    /// leases).
    pub fn give_back(&self) {
        self.available.fetch_add(1, Ordering::AcqRel);
        self.used.fetch_sub(1, Ordering::Relaxed);
        let _ = self.bucket_count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Counts a request for the rate estimate (one-second buckets).
    fn count(&self, now_ms: u64) {
        let start = self.bucket_start_ms.load(Ordering::Relaxed);
        if now_ms >= start + 1000
            && self.bucket_start_ms.compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            let count = self.bucket_count.swap(0, Ordering::Relaxed);
            let elapsed = (now_ms - start).max(1000);
            self.rate.store(count * 1000 / elapsed, Ordering::Relaxed);
        }
        self.bucket_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests per second lately: the last full bucket, or the current one when it
    /// already counts more.
    fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed).max(self.bucket_count.load(Ordering::Relaxed))
    }

    /// Tokens to ask for: the recent rate over the renew horizon, at least
    /// [`WANT_MIN`], at most the limit.
    fn want(&self) -> u64 {
        (self.rate() * RENEW_HORIZON_MS / 1000).clamp(WANT_MIN, self.limit.max(1))
    }

    fn low(&self) -> bool {
        let rate = self.rate.load(Ordering::Relaxed);
        self.available() <= rate * LOW_WATER_MS / 1000
    }

    /// Adds a grant's tokens and wakes requests waiting for them.
    pub fn add_grant(&self, grant: Grant) {
        if grant.granted > 0 {
            self.granted.fetch_add(grant.granted, Ordering::Relaxed);
            self.available.fetch_add(grant.granted, Ordering::AcqRel);
        }
        self.cluster_total.fetch_max(grant.total, Ordering::Relaxed);
        if grant.spent {
            self.spent.store(true, Ordering::Relaxed);
        }
        self.round_failed.store(false, Ordering::Relaxed);
        self.pending.store(false, Ordering::Release);
        self.granted_notify.notify_waiters();
    }

    /// Waits until this lease's pending demand is answered or fails.
    pub async fn wait(self: Arc<Self>) {
        let notified = self.granted_notify.notified();
        if !self.pending.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    /// A demand failed (no quorum, timeout): nothing was added.
    pub fn demand_failed(&self) {
        self.round_failed.store(true, Ordering::Relaxed);
        self.pending.store(false, Ordering::Release);
        self.granted_notify.notify_waiters();
    }

    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.cluster_total.load(Ordering::Relaxed)) + self.available()
    }
}

/// No grant round answered a waiting request in time, or one failed: the node may
/// be cut off from the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantsUnavailable;

/// A lease asking for tokens.
pub struct Demand {
    pub lease: Arc<Lease>,
    pub want: u64,
}

/// Every lease of this node, and the queue of demands.
pub struct Leases {
    leases: RwLock<HashMap<QuotaKey, Arc<Lease>>>,
    demands: mpsc::Sender<Demand>,
    receiver: tokio::sync::Mutex<Option<mpsc::Receiver<Demand>>>,
    /// The last grant round failed (no quorum reachable); cleared by the next success.
    cut_off: AtomicBool,
    /// Voters in the cluster, for the `fault_tolerant` local bound.
    voters: AtomicU64,
    started: tokio::time::Instant,
}

impl Default for Leases {
    fn default() -> Leases {
        let (demands, receiver) = mpsc::channel(DEMANDS_MAX);
        Leases {
            leases: RwLock::default(),
            demands,
            receiver: tokio::sync::Mutex::new(Some(receiver)),
            cut_off: AtomicBool::new(false),
            // Unknown until the grant task reads the membership: the tightest bound.
            voters: AtomicU64::new(u64::MAX),
            started: tokio::time::Instant::now(),
        }
    }
}

impl Leases {
    /// The demand queue, for the grant task (once).
    pub fn take_demands(&self) -> Option<mpsc::Receiver<Demand>> {
        self.receiver.try_lock().ok()?.take()
    }

    pub fn set_cut_off(&self, cut_off: bool) {
        if self.cut_off.swap(cut_off, Ordering::Relaxed) != cut_off {
            tracing::warn!(
                cut_off,
                "cluster rate limits: grant rounds {}",
                if cut_off { "fail" } else { "work again" }
            );
        }
        metrics::gauge!("tollgate_quota_cut_off").set(if cut_off { 1.0 } else { 0.0 });
    }

    pub fn is_cut_off(&self) -> bool {
        self.cut_off.load(Ordering::Relaxed)
    }

    /// The cluster's voter count, for the fallback bound; 0 (no membership yet) is
    /// ignored.
    pub fn set_voters(&self, voters: u64) {
        if voters > 0 {
            self.voters.store(voters, Ordering::Relaxed);
        }
    }

    /// The lease of `key`, made when missing; `None` when [`LEASES_MAX`] are held.
    pub fn lease(&self, key: &QuotaKey, limit: u64) -> Option<Arc<Lease>> {
        if let Some(lease) = self.leases.read().ok()?.get(key) {
            return Some(lease.clone());
        }
        let mut leases = self.leases.write().ok()?;
        if leases.len() >= LEASES_MAX && !leases.contains_key(key) {
            metrics::counter!("tollgate_quota_leases_full_total").increment(1);
            return None;
        }
        // A key's next window starts at the rate its last one ended with, so its first
        // grant is sized for the traffic rather than grown from one token.
        let previous = QuotaKey { start_s: key.start_s - key.window_s as i64, ..key.clone() };
        let previous_rate = leases.get(&previous).map_or(0, |lease| lease.rate());
        let lease = leases.entry(key.clone()).or_insert_with(|| {
            let lease = Lease::new(key.clone(), limit);
            lease.rate.store(previous_rate, Ordering::Relaxed);
            Arc::new(lease)
        });
        Some(lease.clone())
    }

    /// Takes a token of `lease` for one request at `now_ms` (wall clock), and asks for
    /// more ahead of need: this window's tokens when few are left, and the next
    /// window's shortly before this one ends, so a busy key never waits at the turn.
    ///
    /// The rate that sizes demands counts the requests that took a token or could have
    /// (the window not spent), not those refused once the limit is reached: sized from
    /// offered load, a lease would strand far more tokens when its node crashes.
    pub fn take(&self, lease: &Arc<Lease>, now_ms: u64) -> Take {
        if lease.take_token() {
            lease.count(self.started.elapsed().as_millis() as u64);
            lease.used.fetch_add(1, Ordering::Relaxed);
            if lease.low() {
                self.demand(lease);
            }
            self.prefetch(lease, now_ms);
            return Take::Admitted { remaining: lease.remaining() };
        }
        if lease.spent.load(Ordering::Relaxed) {
            return Take::Spent;
        }
        lease.count(self.started.elapsed().as_millis() as u64);
        self.demand(lease);
        Take::Empty
    }

    /// Waits, at most [`GRANT_WAIT`], until each of `leases` holds a token or is spent,
    /// asking again when a round's tokens were taken by concurrent requests before this
    /// one's turn. `Ok` when every round answered (the caller takes its tokens, or is
    /// refused if others were faster again); `Err` when a round failed or the wait ran
    /// out: only then may `fault_tolerant` admit without a token.
    pub async fn wait_for_tokens(&self, leases: &[Arc<Lease>]) -> Result<(), GrantsUnavailable> {
        let deadline = tokio::time::Instant::now() + GRANT_WAIT;
        loop {
            for lease in leases {
                if tokio::time::timeout_at(deadline, lease.clone().wait()).await.is_err() {
                    return Err(GrantsUnavailable);
                }
            }
            if leases.iter().any(|lease| lease.round_failed.load(Ordering::Relaxed)) {
                return Err(GrantsUnavailable);
            }
            let mut ready = true;
            for lease in leases {
                if lease.available() == 0 && !lease.spent.load(Ordering::Relaxed) {
                    ready = false;
                    // A full demand queue: the grant task is overwhelmed; do not spin.
                    if !self.demand(lease) {
                        return Err(GrantsUnavailable);
                    }
                }
            }
            if ready {
                return Ok(());
            }
        }
    }

    /// Once per lease, shortly before its window ends (the last half of a window, at
    /// most the last second), makes the next window's lease and asks for its tokens.
    fn prefetch(&self, lease: &Arc<Lease>, now_ms: u64) {
        let window_ms = lease.key.window_s.saturating_mul(1000);
        let end_ms = (lease.key.end_s().max(0) as u64).saturating_mul(1000);
        let ahead_ms = (window_ms / 2).min(PREFETCH_MS);
        if now_ms + ahead_ms < end_ms || lease.prefetched.swap(true, Ordering::Relaxed) {
            return;
        }
        let next = QuotaKey { start_s: lease.key.end_s(), ..lease.key.clone() };
        if let Some(next) = self.lease(&next, lease.limit) {
            self.demand(&next);
        }
    }

    /// Admits one request on the local fallback while cut off (`fault_tolerant`): at
    /// most ⌈limit / voters⌉ per window on this node.
    pub fn take_fallback(&self, lease: &Lease) -> bool {
        let voters = self.voters.load(Ordering::Relaxed).max(1);
        let bound = lease.limit.div_ceil(voters);
        let admitted =
            lease.fallback_used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < bound).then_some(n + 1));
        admitted.is_ok()
    }

    /// Queues a demand for `lease` unless one is already pending; whether one is
    /// pending afterwards (not when the lease is spent or the queue is full).
    fn demand(&self, lease: &Arc<Lease>) -> bool {
        if lease.spent.load(Ordering::Relaxed) {
            return false;
        }
        if lease.pending.swap(true, Ordering::AcqRel) {
            return true;
        }
        let demand = Demand { lease: lease.clone(), want: lease.want() };
        if self.demands.try_send(demand).is_err() {
            lease.pending.store(false, Ordering::Release);
            metrics::counter!("tollgate_quota_demands_dropped_total").increment(1);
            return false;
        }
        true
    }

    /// Closes every lease and returns the tokens they held unused, to give back to
    /// the ledger when the node stops: nothing is admitted with them after this.
    pub fn release_all(&self) -> Vec<(QuotaKey, u64)> {
        let Ok(leases) = self.leases.read() else { return Vec::new() };
        let mut released = Vec::new();
        for lease in leases.values() {
            lease.spent.store(true, Ordering::Relaxed);
            let unused = lease.available.swap(0, Ordering::AcqRel);
            if unused > 0 {
                released.push((lease.key.clone(), unused));
            }
        }
        released
    }

    /// Drops the leases of windows over by `now_s`, counting their unused tokens.
    pub fn expire(&self, now_s: i64) {
        let Ok(mut leases) = self.leases.write() else { return };
        leases.retain(|key, lease| {
            let live = key.end_s() > now_s;
            if !live {
                metrics::counter!("tollgate_quota_tokens_unused_total").increment(lease.available());
            }
            live
        });
        metrics::gauge!("tollgate_quota_leases").set(leases.len() as f64);
    }

    /// This node's leases of one plugin instance (for the Admin API view).
    pub fn of_plugin(&self, plugin: uuid::Uuid) -> Vec<Arc<Lease>> {
        let Ok(leases) = self.leases.read() else { return Vec::new() };
        let mut found: Vec<Arc<Lease>> = leases.values().filter(|lease| lease.key.plugin == plugin).cloned().collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> QuotaKey {
        QuotaKey { plugin: uuid::Uuid::from_u128(1), subject: "s".into(), window_s: 3600, start_s: 0 }
    }

    #[tokio::test]
    async fn tokens_are_taken_only_once_granted_and_demands_are_queued_once() {
        let leases = Leases::default();
        let mut demands = leases.take_demands().unwrap();
        let lease = leases.lease(&key(), 10).unwrap();
        assert_eq!(leases.take(&lease, 0), Take::Empty);
        assert_eq!(leases.take(&lease, 0), Take::Empty);
        let demand = demands.try_recv().unwrap();
        assert!(demands.try_recv().is_err(), "one demand while one is pending");
        demand.lease.add_grant(Grant { granted: 2, total: 2, spent: false });
        assert_eq!(leases.take(&lease, 0), Take::Admitted { remaining: 9 });
        assert_eq!(leases.take(&lease, 0), Take::Admitted { remaining: 8 });
        // Out of tokens: another demand; a partial grant means the window is spent.
        assert_eq!(leases.take(&lease, 0), Take::Empty);
        let demand = demands.try_recv().unwrap();
        demand.lease.add_grant(Grant { granted: 1, total: 10, spent: true });
        assert_eq!(leases.take(&lease, 0), Take::Admitted { remaining: 0 });
        assert_eq!(leases.take(&lease, 0), Take::Spent);
        assert_eq!((lease.used(), lease.granted()), (3, 3));
        // The fallback bound is the limit over the voters.
        leases.set_voters(3);
        let admitted = (0..10).filter(|_| leases.take_fallback(&lease)).count();
        assert_eq!(admitted, 4);
        leases.expire(3600);
        assert!(leases.of_plugin(key().plugin).is_empty());
    }

    #[tokio::test]
    async fn the_next_window_is_asked_for_once_shortly_before_this_one_ends() {
        let leases = Leases::default();
        let mut demands = leases.take_demands().unwrap();
        let minute = QuotaKey { window_s: 60, start_s: 60, ..key() };
        let lease = leases.lease(&minute, 1000).unwrap();
        lease.add_grant(Grant { granted: 100, total: 100, spent: false });
        assert!(matches!(leases.take(&lease, 110_000), Take::Admitted { .. }));
        assert!(demands.try_recv().is_err(), "ten seconds before the end: nothing asked");
        assert!(matches!(leases.take(&lease, 119_500), Take::Admitted { .. }));
        let demand = demands.try_recv().expect("the next window asked for");
        assert_eq!(demand.lease.key.start_s, 120);
        assert!(matches!(leases.take(&lease, 119_900), Take::Admitted { .. }));
        assert!(demands.try_recv().is_err(), "once per lease");
        // The next window's lease is the one requests will find.
        let next = leases.lease(&QuotaKey { start_s: 120, ..minute }, 1000).unwrap();
        assert!(Arc::ptr_eq(&next, &demand.lease));
    }
}
