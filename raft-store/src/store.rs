//! openraft storage on redb: the log, the vote, the committed index and snapshots in one
//! database file, and the configuration state machine in memory.
//!
//! Lifecycle of the state machine:
//! - **open**: load the last snapshot (if any) from redb; openraft then re-applies the
//!   log from the snapshot up to the saved committed index before the node serves, so a
//!   restarted node's applied index never goes backwards (CFG3).
//! - **apply**: entries are applied in log order to [`ConfigState`]; after each batch
//!   the new state is published on a `watch` channel (the node compiles it for the data
//!   path and answers reads from it).
//! - **snapshot**: the state is written to redb as one frame; openraft then purges the
//!   log up to it (keeping `max_in_snapshot_log_to_keep` entries for slow followers).
//! - **install**: a snapshot received from the leader replaces the state and is stored.
//!
//! redb calls block (a commit waits for fsync), so writes run on tokio's blocking pool.
//!
//! The simulator swaps where the database lives and where its calls run
//! ([`install_storage`]): a simulated disk per node, and redb called inline on the
//! simulator's one thread.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes); boxing it
// in our helpers would only move the size around.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, RwLock};

use crate::codec;
use crate::command::{CommandResponse, Op, Outcome};
use crate::quota::{LedgerImage, LedgerImageV0, QuotaLedger};
use crate::recent::{RecentImage, RecentWrites};
use crate::state::{ConfigState, StateImage};
use crate::{NodeId, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";
const META_LAST_PURGED: &str = "last_purged";
const SNAPSHOT_CURRENT: &str = "current";

/// The database file inside a node's data directory.
pub const DATABASE_FILE: &str = "tollgate.redb";

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

fn io_error(error: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::<NodeId>::write(&error).into()
}

fn read_error(error: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::<NodeId>::read(&error).into()
}

/// Mode of the data directory: the database holds every credential of the config
/// (key-auth keys, JWT and HMAC secrets), so only the node's user may enter it.
pub const DATA_DIR_MODE: u32 = 0o700;
/// Mode of the database file.
pub const DATABASE_FILE_MODE: u32 = 0o600;

/// Where databases live and how their calls run, when not on files and the blocking
/// pool (the simulator's).
#[derive(Clone, Copy)]
pub struct StorageSeam {
    /// Opens the database of a data directory (created empty the first time).
    pub open: fn(&Path) -> std::result::Result<Database, redb::Error>,
}

static STORAGE: std::sync::OnceLock<StorageSeam> = std::sync::OnceLock::new();

/// Makes every node of this process keep its database where `seam` says, and call
/// redb inline. Once per process, before any node opens storage.
pub fn install_storage(seam: StorageSeam) -> std::result::Result<(), &'static str> {
    STORAGE.set(seam).map_err(|_| "a storage seam is already installed in this process")
}

/// Opens (or creates) the node's database, with the directory and file readable by the
/// node's user only (also when they were made before with wider modes).
pub fn open_database(data_dir: &Path) -> std::result::Result<Arc<Database>, redb::Error> {
    if let Some(seam) = STORAGE.get() {
        return prepare_database((seam.open)(data_dir)?);
    }
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(data_dir)?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(DATA_DIR_MODE))?;
    let path = data_dir.join(DATABASE_FILE);
    if !path.exists() {
        // Created empty with the narrow mode first, so it is never readable by others.
        std::fs::OpenOptions::new().write(true).create_new(true).mode(DATABASE_FILE_MODE).open(&path)?;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(DATABASE_FILE_MODE))?;
    prepare_database(Database::create(&path)?)
}

/// Makes the tables of a database opened on any backend (the node's file, or the
/// simulator's disk, which decides what a crash keeps).
pub fn prepare_database(database: Database) -> std::result::Result<Arc<Database>, redb::Error> {
    let txn = database.begin_write()?;
    {
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.open_table(SNAPSHOT)?;
    }
    txn.commit()?;
    Ok(Arc::new(database))
}

/// Runs a redb transaction on the blocking pool (inline under the simulator).
async fn blocking<T, F>(database: &Arc<Database>, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Database) -> Result<T> + Send + 'static,
{
    if STORAGE.get().is_some() {
        return work(database);
    }
    let database = database.clone();
    match tokio::task::spawn_blocking(move || work(&database)).await {
        Ok(result) => result,
        Err(join) => Err(io_error(std::io::Error::other(join.to_string()))),
    }
}

fn read_meta<T: serde::de::DeserializeOwned>(database: &Database, key: &str) -> Result<Option<T>> {
    let txn = database.begin_read().map_err(read_error)?;
    let table = txn.open_table(META).map_err(read_error)?;
    let Some(frame) = table.get(key).map_err(read_error)? else {
        return Ok(None);
    };
    codec::decode(frame.value()).map(Some).map_err(read_error)
}

fn write_meta<T: Serialize>(database: &Database, key: &str, value: &T) -> Result<()> {
    let frame = codec::encode(value).map_err(io_error)?;
    let txn = database.begin_write().map_err(io_error)?;
    {
        let mut table = txn.open_table(META).map_err(io_error)?;
        table.insert(key, frame.as_slice()).map_err(io_error)?;
    }
    txn.commit().map_err(io_error)
}

/// The Raft log, vote and committed index.
#[derive(Clone)]
pub struct LogStore {
    database: Arc<Database>,
    /// The last committed index saved, for `/status` (openraft's metrics lack it).
    committed_index: Arc<AtomicU64>,
}

impl LogStore {
    pub fn new(database: Arc<Database>) -> LogStore {
        LogStore { database, committed_index: Arc::new(AtomicU64::new(0)) }
    }

    /// A live view of the committed index this node has persisted.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let txn = self.database.begin_read().map_err(read_error)?;
        let table = txn.open_table(LOG).map_err(read_error)?;
        let mut entries = Vec::new();
        for item in table.range::<u64>((start, end)).map_err(read_error)? {
            let (_, frame) = item.map_err(read_error)?;
            entries.push(codec::decode::<Entry<TypeConfig>>(frame.value()).map_err(read_error)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = read_meta(&self.database, META_LAST_PURGED)?;
        let txn = self.database.begin_read().map_err(read_error)?;
        let table = txn.open_table(LOG).map_err(read_error)?;
        let last_log_id = match table.last().map_err(read_error)? {
            Some((_, frame)) => Some(codec::decode::<Entry<TypeConfig>>(frame.value()).map_err(read_error)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        let vote = *vote;
        blocking(&self.database, move |db| write_meta(db, META_VOTE, &vote)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        read_meta(&self.database, META_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        blocking(&self.database, move |db| write_meta(db, META_COMMITTED, &committed)).await?;
        self.committed_index.fetch_max(committed.map_or(0, |id| id.index), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        let committed = read_meta::<Option<LogId<NodeId>>>(&self.database, META_COMMITTED)?.flatten();
        if crate::planted::planted(crate::planted::Bug::ForgetCommitted) {
            return Ok(None);
        }
        self.committed_index.fetch_max(committed.map_or(0, |id| id.index), Ordering::Relaxed);
        Ok(committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut frames = Vec::new();
        for entry in entries {
            frames.push((entry.log_id.index, codec::encode(&entry).map_err(io_error)?));
        }
        let written = blocking(&self.database, move |db| {
            let txn = db.begin_write().map_err(io_error)?;
            {
                let mut table = txn.open_table(LOG).map_err(io_error)?;
                for (index, frame) in &frames {
                    table.insert(*index, frame.as_slice()).map_err(io_error)?;
                }
            }
            txn.commit().map_err(io_error)
        })
        .await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(error)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        blocking(&self.database, move |db| {
            let txn = db.begin_write().map_err(io_error)?;
            {
                let mut table = txn.open_table(LOG).map_err(io_error)?;
                table.retain_in(log_id.index.., |_, _| false).map_err(io_error)?;
            }
            txn.commit().map_err(io_error)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        blocking(&self.database, move |db| {
            let frame = codec::encode(&log_id).map_err(io_error)?;
            let txn = db.begin_write().map_err(io_error)?;
            {
                let mut meta = txn.open_table(META).map_err(io_error)?;
                meta.insert(META_LAST_PURGED, frame.as_slice()).map_err(io_error)?;
                let mut table = txn.open_table(LOG).map_err(io_error)?;
                table.retain_in(..=log_id.index, |_, _| false).map_err(io_error)?;
            }
            txn.commit().map_err(io_error)
        })
        .await
    }
}

/// What a stored snapshot holds besides openraft's metadata.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    image: StateImage,
    ledger: LedgerImage,
    recent: RecentImage,
    /// The config's `configuration_hash` (Kong's), when it was loaded from a document.
    config_hash: Option<String>,
}

/// A snapshot body as stored before the config kept its hash.
#[derive(Serialize, Deserialize)]
struct SnapshotBodyV1 {
    image: StateImage,
    ledger: LedgerImage,
    recent: RecentImage,
}

/// A snapshot body as stored before the ledger kept its clock: read when the current
/// shape does not decode (postcard has no optional trailing fields).
#[derive(Serialize, Deserialize)]
struct SnapshotBodyV0 {
    image: StateImage,
    ledger: LedgerImageV0,
    recent: RecentImage,
}

impl SnapshotBody {
    fn decode(data: &[u8]) -> std::result::Result<SnapshotBody, codec::CodecError> {
        codec::decode::<SnapshotBody>(data).or_else(|error| {
            if let Ok(old) = codec::decode::<SnapshotBodyV1>(data) {
                return Ok(SnapshotBody {
                    image: old.image,
                    ledger: old.ledger,
                    recent: old.recent,
                    config_hash: None,
                });
            }
            let old = codec::decode::<SnapshotBodyV0>(data).map_err(|_| error)?;
            Ok(SnapshotBody { image: old.image, ledger: old.ledger.into(), recent: old.recent, config_hash: None })
        })
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

/// The applied state, as published to the node after every batch of entries.
#[derive(Clone, Default)]
pub struct Applied {
    pub state: ConfigState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, openraft::BasicNode>,
    /// Writes applied lately, by id: a write sent twice is applied once.
    pub recent: RecentWrites,
    /// Counts changes of `state` (config entries, installed snapshots) in this
    /// process: the same revision is the same config, so a publication that only
    /// moves the applied index (quota grants) need not recompile anything.
    pub config_revision: u64,
}

impl Applied {
    /// The config version: the log index of the last applied entry.
    pub fn version(&self) -> u64 {
        self.last_applied.map_or(0, |id| id.index)
    }
}

/// The state machine and its snapshots.
#[derive(Clone)]
pub struct StateMachineStore {
    database: Arc<Database>,
    /// Locked before `ledger` wherever both are.
    applied: Arc<RwLock<Applied>>,
    ledger: Arc<RwLock<QuotaLedger>>,
    publish: Arc<watch::Sender<Applied>>,
}

impl StateMachineStore {
    /// Opens the state machine from the last stored snapshot.
    pub async fn open(database: Arc<Database>) -> Result<StateMachineStore> {
        let stored = load_snapshot(&database)?;
        let (applied, ledger) = match stored {
            Some(snapshot) => applied_from_snapshot(&snapshot.meta, &snapshot.data)?,
            None => (Applied::default(), QuotaLedger::new()),
        };
        let (publish, _) = watch::channel(applied.clone());
        Ok(StateMachineStore {
            database,
            applied: Arc::new(RwLock::new(applied)),
            ledger: Arc::new(RwLock::new(ledger)),
            publish: Arc::new(publish),
        })
    }

    /// The quota ledger as applied on this node (for the Admin API view).
    pub fn ledger(&self) -> Arc<RwLock<QuotaLedger>> {
        self.ledger.clone()
    }

    /// Every published state, latest first. The receiver always holds the newest.
    pub fn subscribe(&self) -> watch::Receiver<Applied> {
        self.publish.subscribe()
    }

    fn publish(&self, applied: &Applied) {
        self.publish.send_replace(applied.clone());
    }
}

fn load_snapshot(database: &Database) -> Result<Option<StoredSnapshot>> {
    let txn = database.begin_read().map_err(read_error)?;
    let table = txn.open_table(SNAPSHOT).map_err(read_error)?;
    let Some(frame) = table.get(SNAPSHOT_CURRENT).map_err(read_error)? else {
        return Ok(None);
    };
    codec::decode(frame.value()).map(Some).map_err(read_error)
}

fn applied_from_snapshot(
    meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
    data: &[u8],
) -> Result<(Applied, QuotaLedger)> {
    let body = SnapshotBody::decode(data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
    let mut state = ConfigState::from_image(&body.image)
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &std::io::Error::other(e)))?;
    state.set_config_hash(body.config_hash);
    let applied = Applied {
        state,
        last_applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
        recent: RecentWrites::from_image(body.recent),
        config_revision: 0,
    };
    if crate::planted::planted(crate::planted::Bug::ForgetLedger) {
        return Ok((applied, QuotaLedger::default()));
    }
    Ok((applied, QuotaLedger::from_image(body.ledger)))
}

/// Stores `snapshot` unless a newer one is already stored. A snapshot build runs in its
/// own task and can finish after a newer snapshot from the leader was installed (and the
/// log purged up to it); keeping the older one would leave a hole at the next start.
async fn store_snapshot(database: &Arc<Database>, snapshot: StoredSnapshot) -> Result<()> {
    blocking(database, move |db| {
        let frame = codec::encode(&snapshot).map_err(io_error)?;
        let txn = db.begin_write().map_err(io_error)?;
        {
            let mut table = txn.open_table(SNAPSHOT).map_err(io_error)?;
            let stored_last = match table.get(SNAPSHOT_CURRENT).map_err(io_error)? {
                Some(stored) => codec::decode::<StoredSnapshot>(stored.value()).map_err(io_error)?.meta.last_log_id,
                None => None,
            };
            if stored_last > snapshot.meta.last_log_id {
                tracing::info!(snapshot_id = %snapshot.meta.snapshot_id, "a newer snapshot is stored; keeping it");
                return Ok(());
            }
            table.insert(SNAPSHOT_CURRENT, frame.as_slice()).map_err(io_error)?;
        }
        txn.commit().map_err(io_error)
    })
    .await
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let (body, last_applied, membership) = {
            let applied = self.applied.read().await;
            let ledger = self.ledger.read().await;
            let body = SnapshotBody {
                image: applied.state.to_image(),
                ledger: ledger.to_image(),
                recent: applied.recent.to_image(),
                config_hash: applied.state.config_hash().map(str::to_string),
            };
            (body, applied.last_applied, applied.membership.clone())
        };
        let data = codec::encode(&body).map_err(io_error)?;
        let snapshot_id = match last_applied {
            Some(last) => format!("{}-{}", last.leader_id, last.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        store_snapshot(&self.database, StoredSnapshot { meta: meta.clone(), data: data.clone() }).await?;
        tracing::info!(snapshot_id = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, openraft::BasicNode>)> {
        let applied = self.applied.read().await;
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.write().await;
        let mut ledger = self.ledger.write().await;
        let mut responses = Vec::new();
        for entry in entries {
            debug_assert!(
                applied.last_applied.is_none_or(|last| last.index < entry.log_id.index),
                "entries are applied in log order, once"
            );
            applied.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Internal),
                EntryPayload::Normal(command) => {
                    // A write already applied under this id: its answer again, no change.
                    let seen = command.write_id.and_then(|id| applied.recent.get(&id).map(|seen| seen.result.clone()));
                    if let Some(result) = seen {
                        responses.push(CommandResponse { result });
                        continue;
                    }
                    let result = match &command.op {
                        Op::Grant { node, requests } => {
                            Ok(Outcome::Granted(ledger.grant(*node, command.now_s, requests)))
                        }
                        Op::Release { node, releases } => {
                            ledger.release(*node, command.now_s, releases);
                            Ok(Outcome::Internal)
                        }
                        _ => {
                            let result = applied.state.apply(&command);
                            if result.is_ok() {
                                applied.config_revision += 1;
                            }
                            result
                        }
                    };
                    if let Some(id) = command.write_id {
                        applied.recent.record(id, command.now_s, entry.log_id.index, &result);
                    }
                    result
                }
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Ok(Outcome::Internal)
                }
            };
            responses.push(CommandResponse { result });
        }
        self.publish(&applied);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        let (mut installed, installed_ledger) = applied_from_snapshot(meta, &data)?;
        store_snapshot(&self.database, StoredSnapshot { meta: meta.clone(), data }).await?;
        let mut applied = self.applied.write().await;
        let mut ledger = self.ledger.write().await;
        installed.config_revision = applied.config_revision + 1;
        *applied = installed;
        *ledger = installed_ledger;
        self.publish(&applied);
        tracing::info!(snapshot_id = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let database = self.database.clone();
        let stored = blocking(&database, load_snapshot).await?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

/// Opens both halves of a node's storage from its data directory.
pub async fn open(data_dir: &Path) -> std::result::Result<(LogStore, StateMachineStore), StorageError<NodeId>> {
    let database = open_database(data_dir).map_err(io_error)?;
    let state_machine = StateMachineStore::open(database.clone()).await?;
    Ok((LogStore::new(database), state_machine))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::{GrantRequest, QuotaKey};

    /// A snapshot stored before the ledger kept its clock still restores, its grants
    /// with it; one stored now keeps the clock.
    #[test]
    fn snapshot_bodies_of_both_shapes_decode() {
        let mut ledger = QuotaLedger::new();
        let key = QuotaKey { plugin: uuid::Uuid::from_u128(1), subject: "s".into(), window_s: 60, start_s: 60 };
        ledger.grant(1, 70, &[GrantRequest { key: key.clone(), limit: 10, want: 5, used: 0 }]);
        let image = ConfigState::default().to_image();
        let old = SnapshotBodyV0 {
            image: image.clone(),
            ledger: LedgerImageV0 { accounts: ledger.to_image().accounts },
            recent: RecentImage::default(),
        };
        let decoded = SnapshotBody::decode(&codec::encode(&old).expect("encodes")).expect("the old shape decodes");
        assert_eq!(decoded.ledger.accounts.len(), 1);
        assert_eq!(decoded.ledger.now_s, i64::MIN);
        let v1 = SnapshotBodyV1 { image: image.clone(), ledger: ledger.to_image(), recent: RecentImage::default() };
        let decoded = SnapshotBody::decode(&codec::encode(&v1).expect("encodes")).expect("the v1 shape decodes");
        assert_eq!(QuotaLedger::from_image(decoded.ledger), ledger);
        assert_eq!(decoded.config_hash, None);
        let new = SnapshotBody {
            image,
            ledger: ledger.to_image(),
            recent: RecentImage::default(),
            config_hash: Some("0123456789abcdef0123456789abcdef".into()),
        };
        let decoded = SnapshotBody::decode(&codec::encode(&new).expect("encodes")).expect("the new shape decodes");
        assert_eq!(QuotaLedger::from_image(decoded.ledger), ledger);
        assert_eq!(decoded.config_hash.as_deref(), Some("0123456789abcdef0123456789abcdef"));
    }
}
