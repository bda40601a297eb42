//! The cluster rate-limit ledger (`rate-limiting` with `policy: cluster`).
//!
//! For every (plugin, subject, window) it records the limit and how many tokens each
//! node was granted. Nodes admit requests only with tokens they were granted, so the
//! invariant the ledger keeps, granted ≤ limit per key, is the cluster's: admitted ≤
//! limit per key and window (RL1). `QUOTA.md` beside the node's code has the whole
//! argument.
//!
//! Like the config state machine it is a pure function of the log: time comes from
//! the leader's stamp on each command, iteration is over ordered maps, nothing is
//! random. Windows that are over (by that stamp) are dropped as commands arrive, so
//! the ledger holds only live windows.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::NodeId;

/// Most (key, window) accounts the ledger holds; a grant for a new key past it gets
/// nothing (the node then follows its `fault_tolerant` setting).
pub const QUOTA_KEYS_MAX: usize = 4_000_000;
/// Most grant requests in one command.
pub const GRANT_REQUESTS_MAX: usize = 8192;
/// Longest subject (a consumer id, an address, a header value) in bytes.
pub const QUOTA_SUBJECT_BYTES_MAX: usize = 512;
/// A grant is at most this fraction (1/n) of what is left ungranted, so that near the
/// limit leases shrink and few tokens sit unused on one node while another runs dry.
pub const GRANT_SHARE_OF_REST: u64 = 4;
/// A grant is at most this fraction (1/n) of the window's limit. Tokens leased to a
/// node that crashes are lost for their window; this bounds the loss to about two
/// grants per key per crashed node (the lease and its renewal), whatever the load.
/// Limits of at least 100 × this keep leases of 100 tokens or more, so quota entries
/// stay at most one per 100 admitted requests (P2).
pub const GRANT_SHARE_OF_LIMIT: u64 = 16;
/// How far ahead of the leader's clock a window may start and still be granted, so
/// nodes can fetch the next window's tokens before it begins.
pub const WINDOW_AHEAD_S: i64 = 2;

/// One counted (plugin, subject, window).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QuotaKey {
    /// The rate-limiting plugin instance.
    pub plugin: Uuid,
    /// Who is limited (`limit_by`): a consumer or credential id, a service id, an
    /// address, a header value or a path.
    pub subject: String,
    /// The window's length (1 for `second` … 31 536 000 for `year`).
    pub window_s: u64,
    /// The window's start, seconds since the epoch, a multiple of `window_s`.
    pub start_s: i64,
}

impl QuotaKey {
    pub fn end_s(&self) -> i64 {
        self.start_s.saturating_add(self.window_s as i64)
    }
}

/// A node asking for tokens of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRequest {
    pub key: QuotaKey,
    /// The limit of this window in the node's config.
    pub limit: u64,
    /// Tokens wanted.
    pub want: u64,
    /// Requests this node has admitted for this key so far (for the Admin API view).
    pub used: u64,
}

/// The answer to one grant request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Tokens granted now.
    pub granted: u64,
    /// Tokens granted to all nodes for this key so far, these included.
    pub total: u64,
    /// Nothing more will be granted for this key in this window: it is spent, over,
    /// too far ahead, malformed, or the ledger is full. Asking again will not help.
    pub spent: bool,
}

/// One key's account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The lowest limit any grant request named: a lowered limit takes effect at
    /// once, a raised one with the next window.
    pub limit: u64,
    /// Tokens granted, per node.
    pub granted: BTreeMap<NodeId, u64>,
    /// Requests admitted, per node, as each last reported.
    pub used: BTreeMap<NodeId, u64>,
    /// Sum of `granted`.
    pub total: u64,
}

/// The ledger: live accounts, their keys by window end for expiry, and its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaLedger {
    accounts: BTreeMap<QuotaKey, Account>,
    by_end: BTreeSet<(i64, QuotaKey)>,
    /// The latest leader time applied: the ledger's clock, which never goes back. A
    /// window over by it stays over, whatever a later command's leader time says.
    /// Found by the simulator (a node's clock stepped ahead while it led): the leader
    /// ended a second's window early, and when leader time went back (the step undone,
    /// or a new leader whose clock is behind) the window was opened afresh, its limit
    /// granted a second time (16 admitted in a second of 8).
    now_s: i64,
}

impl Default for QuotaLedger {
    fn default() -> QuotaLedger {
        QuotaLedger { accounts: BTreeMap::new(), by_end: BTreeSet::new(), now_s: i64::MIN }
    }
}

/// The ledger as stored in snapshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LedgerImage {
    pub accounts: Vec<(QuotaKey, Account)>,
    /// The ledger's clock ([`QuotaLedger`]'s `now_s`).
    pub now_s: i64,
}

/// The ledger as snapshots stored it before it kept its clock; read as one whose clock
/// is unknown (it starts at the first leader time applied after).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LedgerImageV0 {
    pub accounts: Vec<(QuotaKey, Account)>,
}

impl From<LedgerImageV0> for LedgerImage {
    fn from(old: LedgerImageV0) -> LedgerImage {
        LedgerImage { accounts: old.accounts, now_s: i64::MIN }
    }
}

impl QuotaLedger {
    pub fn new() -> QuotaLedger {
        QuotaLedger::default()
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Grants tokens to `node` at leader time `now_s`, one answer per request, in
    /// order. A grant is never more than the limit minus what all nodes already hold,
    /// so the sum of grants never passes the limit.
    pub fn grant(&mut self, node: NodeId, now_s: i64, requests: &[GrantRequest]) -> Vec<Grant> {
        let now_s = self.advance(now_s);
        self.expire(now_s);
        requests.iter().map(|request| self.grant_one(node, now_s, request)).collect()
    }

    fn grant_one(&mut self, node: NodeId, now_s: i64, request: &GrantRequest) -> Grant {
        let key = &request.key;
        let live = key.window_s > 0
            && key.start_s % key.window_s as i64 == 0
            && key.end_s() > now_s
            && key.start_s <= now_s.saturating_add(WINDOW_AHEAD_S)
            && key.subject.len() <= QUOTA_SUBJECT_BYTES_MAX;
        if !live {
            return Grant { granted: 0, total: 0, spent: true };
        }
        if !self.accounts.contains_key(key) {
            if self.accounts.len() >= QUOTA_KEYS_MAX {
                return Grant { granted: 0, total: 0, spent: true };
            }
            self.by_end.insert((key.end_s(), key.clone()));
            self.accounts.insert(key.clone(), Account { limit: request.limit, ..Account::default() });
        }
        let account = self.accounts.get_mut(key).expect("inserted above");
        account.limit = account.limit.min(request.limit);
        let used = account.used.entry(node).or_default();
        *used = (*used).max(request.used);
        let planted = crate::planted::planted(crate::planted::Bug::GrantPastLimit);
        let ceiling = if planted { account.limit.saturating_mul(2) } else { account.limit };
        let rest = ceiling.saturating_sub(account.total);
        let granted =
            request.want.min(rest.div_ceil(GRANT_SHARE_OF_REST)).min(account.limit.div_ceil(GRANT_SHARE_OF_LIMIT));
        if granted > 0 {
            *account.granted.entry(node).or_default() += granted;
            account.total += granted;
        }
        debug_assert!(account.total <= account.limit || granted == 0 || planted, "RL1: grants never pass the limit");
        Grant { granted, total: account.total, spent: account.total >= ceiling }
    }

    /// Takes back tokens `node` returns unused (at most what it was granted). The
    /// node zeroed them before asking, so they can be granted again.
    pub fn release(&mut self, node: NodeId, now_s: i64, releases: &[(QuotaKey, u64)]) {
        let now_s = self.advance(now_s);
        self.expire(now_s);
        for (key, tokens) in releases {
            let Some(account) = self.accounts.get_mut(key) else { continue };
            let Some(granted) = account.granted.get_mut(&node) else { continue };
            let returned = (*tokens).min(*granted);
            *granted -= returned;
            account.total -= returned;
        }
    }

    /// Moves the ledger's clock to `now_s` unless it is already later; returns it.
    fn advance(&mut self, now_s: i64) -> i64 {
        self.now_s = self.now_s.max(now_s);
        self.now_s
    }

    /// Drops every account whose window ended by `now_s`.
    fn expire(&mut self, now_s: i64) {
        while let Some((end_s, _)) = self.by_end.first() {
            if *end_s > now_s {
                break;
            }
            let (_, key) = self.by_end.pop_first().expect("checked above");
            self.accounts.remove(&key);
        }
    }

    /// The accounts of one plugin instance, in key order.
    pub fn accounts_of(&self, plugin: Uuid) -> impl Iterator<Item = (&QuotaKey, &Account)> {
        let from = QuotaKey { plugin, subject: String::new(), window_s: 0, start_s: i64::MIN };
        self.accounts.range(from..).take_while(move |(key, _)| key.plugin == plugin)
    }

    pub fn to_image(&self) -> LedgerImage {
        LedgerImage {
            accounts: self.accounts.iter().map(|(key, account)| (key.clone(), account.clone())).collect(),
            now_s: self.now_s,
        }
    }

    pub fn from_image(image: LedgerImage) -> QuotaLedger {
        let mut ledger = QuotaLedger { now_s: image.now_s, ..QuotaLedger::new() };
        for (key, account) in image.accounts {
            ledger.by_end.insert((key.end_s(), key.clone()));
            ledger.accounts.insert(key, account);
        }
        ledger
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(subject: &str, window_s: u64, start_s: i64) -> QuotaKey {
        QuotaKey { plugin: Uuid::from_u128(7), subject: subject.to_string(), window_s, start_s }
    }

    fn ask(key: &QuotaKey, limit: u64, want: u64) -> GrantRequest {
        GrantRequest { key: key.clone(), limit, want, used: 0 }
    }

    fn granted(ledger: &mut QuotaLedger, node: NodeId, now_s: i64, requests: &[GrantRequest]) -> Vec<u64> {
        ledger.grant(node, now_s, requests).iter().map(|grant| grant.granted).collect()
    }

    #[test]
    fn grants_never_sum_past_the_limit_and_die_with_their_window() {
        let mut ledger = QuotaLedger::new();
        let hour = key("svc", 3600, 3600);
        // What was asked, at most a sixteenth of the limit (63 of 1000).
        assert_eq!(granted(&mut ledger, 1, 3700, &[ask(&hour, 1000, 60)]), [60]);
        assert_eq!(granted(&mut ledger, 1, 3700, &[ask(&hour, 1000, 35)]), [35]);
        assert_eq!(granted(&mut ledger, 1, 3700, &[ask(&hour, 1000, 100)]), [63]);
        // Near the limit, a quarter of what is left at most, so leases shrink.
        let mut drained = Vec::new();
        loop {
            let grant = ledger.grant(2, 3701, &[ask(&hour, 1000, 100)])[0];
            if grant.granted == 0 {
                break;
            }
            drained.push(grant.granted);
        }
        assert_eq!(drained[..10], [63; 10]);
        assert_eq!(drained[10..], [53, 40, 30, 23, 17, 13, 9, 7, 5, 4, 3, 2, 2, 1, 1, 1, 1]);
        let last = ledger.grant(3, 3702, &[ask(&hour, 1000, 1)])[0];
        assert_eq!((last.granted, last.total, last.spent), (0, 1000, true));
        // Node 2 stops and gives back more than it holds: only its 842 return, and
        // they can be granted again, no more.
        ledger.release(2, 3702, &[(hour.clone(), 500), (hour.clone(), 500)]);
        let mut regranted = 0;
        loop {
            let grant = ledger.grant(3, 3702, &[ask(&hour, 1000, 500)])[0];
            regranted += grant.granted;
            if grant.granted == 0 {
                break;
            }
        }
        assert_eq!(regranted, 842);
        let account = ledger.accounts_of(hour.plugin).next().unwrap().1;
        assert_eq!((account.total, account.granted[&1], account.granted[&3]), (1000, 158, 842));
        // A lowered limit holds at once; a window over or too far ahead gets nothing.
        let minute = key("svc", 60, 3660);
        assert_eq!(granted(&mut ledger, 1, 3700, &[ask(&minute, 40, 8), ask(&minute, 20, 8)]), [3, 2]);
        assert_eq!(granted(&mut ledger, 1, 3700, &[ask(&key("svc", 60, 3600), 10, 1)]), [0], "over");
        assert_eq!(granted(&mut ledger, 1, 3700, &[ask(&key("svc", 60, 3780), 10, 1)]), [0], "ahead");
        assert_eq!(granted(&mut ledger, 1, 3719, &[ask(&key("svc", 60, 3720), 10, 1)]), [1], "just ahead");
        assert_eq!(granted(&mut ledger, 1, 3700, &[ask(&key("svc", 60, 3601), 10, 1)]), [0], "unaligned");
        assert_eq!(ledger.len(), 3);
        // Past the hour's end everything before is dropped.
        ledger.grant(1, 7200, &[]);
        assert!(ledger.is_empty());
    }

    /// A leader's clock that ran ahead ends a window; leader time going back (the step
    /// undone, a new leader whose clock is behind) does not open it again, across a
    /// snapshot too. On the code before the ledger kept its clock: 8 more granted.
    #[test]
    fn a_window_once_over_stays_over_when_leader_time_goes_back() {
        let mut ledger = QuotaLedger::new();
        let second = key("svc", 1, 100);
        let drain = |ledger: &mut QuotaLedger, node: NodeId, now_s: i64| {
            let mut total = 0;
            loop {
                let grant = ledger.grant(node, now_s, &[ask(&second, 8, 8)])[0];
                if grant.granted == 0 {
                    return (total, grant.spent);
                }
                total += grant.granted;
            }
        };
        assert_eq!(drain(&mut ledger, 1, 100), (8, true));
        // A leader whose clock is a second ahead: the window is over and dropped.
        ledger.grant(2, 101, &[]);
        assert!(ledger.is_empty());
        // Leader time back at 100: still over, here and after a snapshot.
        assert_eq!(drain(&mut ledger, 3, 100), (0, true));
        let mut restored = QuotaLedger::from_image(ledger.to_image());
        assert_eq!(drain(&mut restored, 3, 100), (0, true));
        // A snapshot from before the ledger kept its clock restores with none.
        let old = LedgerImageV0 { accounts: ledger.to_image().accounts };
        assert_eq!(QuotaLedger::from_image(old.into()).now_s, i64::MIN);
    }

    #[test]
    fn images_round_trip() {
        let mut ledger = QuotaLedger::new();
        ledger.grant(1, 10, &[ask(&key("a", 60, 0), 5, 2), ask(&key("b", 3600, 0), 5, 5)]);
        let restored = QuotaLedger::from_image(ledger.to_image());
        assert_eq!(restored, ledger);
    }
}
