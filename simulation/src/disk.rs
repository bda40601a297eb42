//! A simulated durable disk for redb: what was synced survives a crash; what was
//! written since the last sync survives, vanishes or is torn, as the crash's seed
//! decides.
//!
//! A [`SimDisk`] is one node's disk. redb reaches it through a [`SimBackend`] (a
//! `redb::StorageBackend`). Writes land in the image reads see at once and are also
//! kept, in order, as *pending* until `sync_data`, which makes the image durable. A crash
//! ([`SimDisk::crash`]) builds the image the node restarts from: the durable image, then
//! each pending write applied whole, dropped, or (a write only) cut to a prefix, chosen
//! one by one from the seed, so any subset of unsynced writes may reach the platter, in
//! any combination a reordering disk could produce. The crash also kills every backend
//! handed out before it: the old database's later calls (its drop, a commit in flight)
//! fail and change nothing, as a dead process writes nothing.
//!
//! [`SimDisk::crash_after_writes`] arms a crash that happens *during* a later write: the
//! write that reaches the count and everything after it fail, so a commit can be cut
//! between any two of its writes.

// redb's `StorageBackend` is a synchronous trait, called from blocking threads and from
// the simulator's one thread: a std mutex, held only for a copy and never across an
// await, is what it needs (the lint guards async code against blocking the runtime).
#![allow(clippy::disallowed_types)]

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The largest image one simulated disk holds. redb grows its file in steps; a node's
/// database in the simulator stays far below this, and a write past it is refused
/// rather than allocating without bound.
pub const DISK_BYTES_MAX: u64 = 1 << 30;

/// One node's disk, shared by the simulator (to crash it) and redb (through backends).
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<Disk>>,
}

#[derive(Default)]
struct Disk {
    /// What survives any crash: the image as of the last `sync_data`.
    durable: Vec<u8>,
    /// What reads see: `durable` with the pending changes applied.
    current: Vec<u8>,
    /// Changes since the last `sync_data`, in the order they were made.
    pending: Vec<Change>,
    /// Bumped by each crash; a backend from an earlier generation is dead.
    generation: u64,
    /// Writes left before an armed crash happens (`None`: none armed).
    writes_until_crash: Option<u64>,
    /// Set once an armed crash has happened, until [`SimDisk::crash`] builds the image.
    down: bool,
}

#[derive(Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// What a crash did to the unsynced changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    pub kept: usize,
    pub lost: usize,
    pub torn: usize,
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// A backend for one open of the database; it dies with the next crash.
    pub fn backend(&self) -> SimBackend {
        let generation = self.lock().generation;
        SimBackend { disk: self.clone(), generation }
    }

    /// Makes the write that is `writes` writes from now, and everything after it, fail
    /// as if the machine died there. [`SimDisk::crash`] then builds the restart image.
    pub fn crash_after_writes(&self, writes: u64) {
        self.lock().writes_until_crash = Some(writes);
    }

    /// The machine dies now (if an armed crash has not already killed it): every
    /// backend handed out so far is dead, and the disk holds what survived, chosen by
    /// `seed`.
    pub fn crash(&self, seed: u64) -> CrashReport {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut disk = self.lock();
        let mut image = disk.durable.clone();
        let mut report = CrashReport::default();
        for change in std::mem::take(&mut disk.pending) {
            match (rng.gen_range(0..3u8), change) {
                (0, _) => report.lost += 1,
                (1, Change::Write { offset, data }) if data.len() > 1 => {
                    let cut = rng.gen_range(1..data.len());
                    write_into(&mut image, offset, &data[..cut]);
                    report.torn += 1;
                }
                (_, Change::Write { offset, data }) => {
                    write_into(&mut image, offset, &data);
                    report.kept += 1;
                }
                (_, Change::SetLen(len)) => {
                    image.resize(len as usize, 0);
                    report.kept += 1;
                }
            }
        }
        disk.durable = image.clone();
        disk.current = image;
        disk.generation += 1;
        disk.writes_until_crash = None;
        disk.down = false;
        report
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        // A panic while the lock was held is a simulator bug already reported by that
        // panic; the image itself is always whole between calls.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn write_into(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[offset as usize..end].copy_from_slice(data);
}

/// redb's view of a [`SimDisk`], valid until the disk's next crash.
pub struct SimBackend {
    disk: SimDisk,
    generation: u64,
}

impl std::fmt::Debug for SimBackend {
    // Hand-written: a derived impl would print the whole image.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend").field("generation", &self.generation).finish()
    }
}

fn dead() -> io::Error {
    io::Error::other("the simulated machine crashed")
}

impl SimBackend {
    /// The disk, if this backend's machine is still alive.
    fn alive(&self) -> io::Result<MutexGuard<'_, Disk>> {
        let disk = self.disk.lock();
        if disk.generation != self.generation || disk.down {
            return Err(dead());
        }
        Ok(disk)
    }
}

impl redb::StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.alive()?.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let disk = self.alive()?;
        let end = offset as usize + out.len();
        let Some(bytes) = disk.current.get(offset as usize..end) else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the simulated disk"));
        };
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > DISK_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "the simulated disk is full"));
        }
        let mut disk = self.alive()?;
        disk.current.resize(len as usize, 0);
        disk.pending.push(Change::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.alive()?;
        disk.durable = disk.current.clone();
        disk.pending.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset + data.len() as u64 > DISK_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "the simulated disk is full"));
        }
        let mut disk = self.alive()?;
        if let Some(left) = disk.writes_until_crash {
            if left == 0 {
                disk.down = true;
                return Err(dead());
            }
            disk.writes_until_crash = Some(left - 1);
        }
        write_into(&mut disk.current, offset, data);
        disk.pending.push(Change::Write { offset, data: data.to_vec() });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::storage::RaftLogStorage;
    use redb::{ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};

    const TABLE: TableDefinition<u64, u64> = TableDefinition::new("acknowledged");

    #[test]
    fn synced_bytes_survive_every_crash_and_unsynced_ones_are_kept_lost_or_torn() {
        let mut outcomes = CrashReport::default();
        for seed in 0..200 {
            let disk = SimDisk::new();
            let backend = disk.backend();
            backend.write(0, b"durable").unwrap();
            backend.sync_data().unwrap();
            backend.write(7, b"-unsynced").unwrap();
            let report = disk.crash(seed);
            outcomes.kept += report.kept;
            outcomes.lost += report.lost;
            outcomes.torn += report.torn;
            let after = disk.backend();
            let mut head = [0u8; 7];
            after.read(0, &mut head).unwrap();
            assert_eq!(&head, b"durable", "seed {seed}");
            let length = after.len().unwrap();
            let mut tail = vec![0u8; length as usize - 7];
            after.read(7, &mut tail).unwrap();
            assert!(b"-unsynced".starts_with(&tail), "seed {seed}: {tail:?} is not a prefix of the write");
            // The backend from before the crash is dead.
            assert!(backend.write(0, b"x").is_err() && backend.len().is_err());
        }
        assert!(outcomes.kept > 0 && outcomes.lost > 0 && outcomes.torn > 0, "{outcomes:?}");
    }

    #[test]
    fn the_same_seed_makes_the_same_image() {
        let image = |seed| {
            let disk = SimDisk::new();
            let backend = disk.backend();
            for n in 0..20u8 {
                backend.write(u64::from(n) * 3, &[n; 5]).unwrap();
            }
            disk.crash(seed);
            let after = disk.backend();
            let mut bytes = vec![0u8; after.len().unwrap() as usize];
            after.read(0, &mut bytes).unwrap();
            bytes
        };
        assert_eq!(image(7), image(7));
        assert!((0..20).any(|seed| image(seed) != image(7)), "the seed changes nothing");
    }

    fn open(disk: &SimDisk) -> redb::Database {
        redb::Database::builder().create_with_backend(disk.backend()).expect("the database opens after a crash")
    }

    /// redb on the simulated disk, crashed between any two writes of a commit and with
    /// unsynced commits in flight: every commit acknowledged with `Immediate`
    /// durability is there after the restart, and nothing else is corrupt.
    #[test]
    fn acknowledged_commits_survive_crashes_cut_anywhere() {
        let (mut cut_short, mut survived) = (0, 0);
        for seed in 0..60u64 {
            let disk = SimDisk::new();
            let database = open(&disk);
            let mut acknowledged = Vec::new();
            // Crash somewhere inside the commits below (each takes a handful of writes).
            disk.crash_after_writes(5 + seed * 3);
            for key in 0..40u64 {
                let Ok(mut txn) = database.begin_write() else { break };
                if key % 3 == 2 {
                    // An unsynced commit: may vanish, never corrupts.
                    let _ = txn.set_durability(redb::Durability::None);
                }
                let inserted = match txn.open_table(TABLE) {
                    Ok(mut table) => table.insert(key, key * 10).is_ok(),
                    Err(_) => false,
                };
                if !inserted {
                    break;
                }
                match txn.commit() {
                    Ok(()) if key % 3 != 2 => acknowledged.push(key),
                    Ok(()) => {}
                    Err(_) => break,
                }
            }
            cut_short += usize::from(acknowledged.len() < 27);
            survived += acknowledged.len();
            disk.crash(seed);
            drop(database);
            let database = open(&disk);
            let txn = database.begin_read().unwrap();
            let table = match txn.open_table(TABLE) {
                Ok(table) => Some(table),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(error) => panic!("seed {seed}: {error}"),
            };
            for key in &acknowledged {
                let value = table.as_ref().and_then(|t| t.get(key).unwrap()).map(|v| v.value());
                assert_eq!(value, Some(key * 10), "seed {seed}: acknowledged key {key} was lost");
            }
            if let Some(table) = table {
                for entry in table.iter().unwrap() {
                    let (key, value) = entry.unwrap();
                    assert_eq!(value.value(), key.value() * 10, "seed {seed}: a corrupt value");
                }
            }
        }
        println!("{cut_short} of 60 runs cut short by the crash, {survived} acknowledged commits checked");
        // The crash points must fall inside the work, and acknowledged commits must exist.
        assert!(cut_short >= 30 && survived >= 100, "{cut_short} runs cut short, {survived} commits acknowledged");
    }

    /// The Raft vote, which election safety rests on, as Tollgate's log store saves it:
    /// once `save_vote` returned, a crash does not take it back.
    #[tokio::test]
    async fn a_saved_vote_survives_a_crash() {
        for seed in 0..20u64 {
            let disk = SimDisk::new();
            let database = tollgate_raft_store::store::prepare_database(open(&disk)).unwrap();
            let mut store = tollgate_raft_store::store::LogStore::new(database.clone());
            let vote = openraft::Vote::new_committed(seed + 1, 2);
            store.save_vote(&vote).await.unwrap();
            // A later write that is never synced: the crash decides what of it is left.
            let mut txn = database.begin_write().unwrap();
            txn.set_durability(redb::Durability::None).unwrap();
            txn.open_table(TABLE).unwrap().insert(1, 1).unwrap();
            txn.commit().unwrap();
            disk.crash(seed);
            drop(store);
            drop(database);
            let database = tollgate_raft_store::store::prepare_database(open(&disk)).unwrap();
            let mut store = tollgate_raft_store::store::LogStore::new(database);
            assert_eq!(store.read_vote().await.unwrap(), Some(vote), "seed {seed}");
        }
    }
}
