//! Admin writes applied lately, by write id, so that a write is applied once even when
//! it reaches the log twice.
//!
//! A node forwards an admin write to the leader it knows. When that leader stalls or
//! is replaced while the write is with it, whether the write reached its log is
//! unknown: it may still be committed by the next leader, or lost. The forwarding node
//! then sends it again, under the same [`WriteId`], to the new leader. Applying an
//! entry whose id is already here answers what the first application answered and
//! changes nothing, so the client gets one answer for one application (Raft
//! dissertation §6.3, client sessions, reduced to the one case Tollgate retries).
//!
//! Like the rest of the state machine this is a pure function of the log: entries are
//! kept in apply order and forgotten by the leader's stamps, by count and by size, the
//! same on every node. An id forgotten before its retry arrives makes that retry apply
//! again; the bounds are far above how long a node retries a write
//! (`write_leader_wait_ms`, at most 600 s) and how many writes arrive meanwhile.

use imbl::{OrdMap, Vector};
use serde::{Deserialize, Serialize};

use crate::command::{Outcome, WriteId};
use crate::error::ApiError;

/// Most writes remembered.
pub const RECENT_WRITES_MAX: usize = 16_384;
/// Most bytes of remembered answers (an answer is the written entity).
pub const RECENT_WRITES_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// How long (by the leader's stamps) a write is remembered.
pub const RECENT_WRITE_TTL_S: i64 = 900;

/// What applying a write answered, and where in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    pub log_index: u64,
    pub result: Result<Outcome, ApiError>,
}

/// One remembered write, in apply order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Remembered {
    id: WriteId,
    now_s: i64,
    bytes: u64,
}

/// The writes applied lately. Cloning is O(1) (persistent maps), so it travels with
/// every published state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentWrites {
    by_id: OrdMap<WriteId, Recorded>,
    order: Vector<Remembered>,
    bytes: u64,
}

/// The remembered writes as stored in snapshots, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecentImage {
    writes: Vec<(WriteId, i64, Recorded)>,
}

impl RecentWrites {
    pub fn get(&self, id: &WriteId) -> Option<&Recorded> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Remembers what write `id`, applied at `log_index` with leader time `now_s`,
    /// answered; forgets what the bounds no longer hold.
    pub fn record(&mut self, id: WriteId, now_s: i64, log_index: u64, result: &Result<Outcome, ApiError>) {
        debug_assert!(!self.by_id.contains_key(&id), "a write is recorded once");
        let recorded = Recorded { log_index, result: result.clone() };
        // The size as encoded: deterministic, and what a snapshot stores.
        let bytes = postcard::to_allocvec(&recorded).map_or(0, |encoded| encoded.len() as u64);
        self.by_id.insert(id, recorded);
        self.order.push_back(Remembered { id, now_s, bytes });
        self.bytes += bytes;
        self.forget(now_s);
    }

    /// Forgets the oldest writes while any bound is passed.
    fn forget(&mut self, now_s: i64) {
        while let Some(oldest) = self.order.front() {
            let expired = oldest.now_s.saturating_add(RECENT_WRITE_TTL_S) < now_s;
            let over = self.order.len() > RECENT_WRITES_MAX || self.bytes > RECENT_WRITES_BYTES_MAX;
            if !expired && !over {
                break;
            }
            let oldest = self.order.pop_front().expect("checked above");
            self.by_id.remove(&oldest.id);
            self.bytes -= oldest.bytes;
        }
        debug_assert_eq!(self.by_id.len(), self.order.len());
    }

    pub fn to_image(&self) -> RecentImage {
        let writes = self
            .order
            .iter()
            .filter_map(|entry| Some((entry.id, entry.now_s, self.by_id.get(&entry.id)?.clone())))
            .collect();
        RecentImage { writes }
    }

    pub fn from_image(image: RecentImage) -> RecentWrites {
        let mut recent = RecentWrites::default();
        for (id, now_s, recorded) in image.writes {
            let bytes = postcard::to_allocvec(&recorded).map_or(0, |encoded| encoded.len() as u64);
            recent.by_id.insert(id, recorded);
            recent.order.push_back(Remembered { id, now_s, bytes });
            recent.bytes += bytes;
        }
        recent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn writes_are_remembered_until_their_time_count_or_size_runs_out() {
        let mut recent = RecentWrites::default();
        recent.record(WriteId(1), 100, 7, &Ok(Outcome::Deleted));
        recent.record(WriteId(2), 100, 8, &Err(ApiError::new(ErrorCode::NotFound, "gone")));
        assert_eq!(recent.get(&WriteId(1)).map(|r| r.log_index), Some(7));
        assert!(recent.get(&WriteId(2)).is_some_and(|r| r.result.is_err()));
        // Past the time bound, by the stamps of later writes.
        recent.record(WriteId(3), 100 + RECENT_WRITE_TTL_S + 1, 9, &Ok(Outcome::Deleted));
        assert_eq!((recent.get(&WriteId(1)), recent.len()), (None, 1));
        // Past the count bound, oldest first.
        for n in 0..RECENT_WRITES_MAX as u128 {
            recent.record(WriteId(10 + n), 2000, 10, &Ok(Outcome::Deleted));
        }
        assert_eq!(recent.len(), RECENT_WRITES_MAX);
        assert!(recent.get(&WriteId(3)).is_none() && recent.get(&WriteId(10)).is_some());
        // Past the size bound: a few large answers push the rest out.
        let large = Outcome::Updated(serde_json::json!({"blob": "x".repeat(8 * 1024 * 1024)}).into());
        for n in 0..9 {
            recent.record(WriteId(100_000 + n), 2000, 11, &Ok(large.clone()));
        }
        assert!(recent.bytes <= RECENT_WRITES_BYTES_MAX);
        assert!(recent.get(&WriteId(100_008)).is_some() && recent.get(&WriteId(100_000)).is_none());
        // A snapshot keeps order and contents.
        assert_eq!(RecentWrites::from_image(recent.to_image()), recent);
    }
}
