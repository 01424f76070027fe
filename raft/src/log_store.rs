//! The Raft log and vote in RocksDB, in the plane's one database beside the store.
//!
//! `raft_log` maps the big-endian log index to a protobuf `Entry`; `raft_meta` holds the
//! vote, the last purged log ID and the committed log ID. An append is written at once
//! (readable, not yet durable) and queued for the sync thread, which commits in groups:
//! one WAL fsync covers every append queued meanwhile. Votes are synced before
//! `save_vote` returns.
//!
//! Appends are reported to openraft at once, before they are durable. openraft 0.9 waits
//! for that report before it does anything else, so a leader sends its entries to the
//! followers while its own fsync runs (the Raft thesis, §10.2.1), and a follower applies
//! what the same AppendEntries tells it is committed while it syncs. openraft then counts
//! the leader in the quorum early and a follower's entries as durable early, and three
//! guards keep that from showing: the state machine applies an entry only once this log is
//! durable up to it ([`Durability::until`]), no AppendEntries tells a follower of a commit
//! beyond it (`network`), and a follower answers an AppendEntries only once it is durable
//! up to its last entry with no truncation since (`service`). So whatever a client or peer
//! learns is committed, or held by a follower, is on its disks. Membership changes always
//! take the synced path.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftLogReader, StorageIOError, Vote};
use prost::Message;
use rocksdb::{WriteBatch, WriteOptions, DB};
use tokio::sync::watch;

use capstan_proto::raftpb;

use crate::error::DecodeError;
use crate::types::{self, Entry, NodeId, StorageError, TypeConfig};

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_META: &str = "raft_meta";
const META_VOTE: &[u8] = b"vote";
const META_PURGED: &[u8] = b"purged";
const META_COMMITTED: &[u8] = b"committed";

/// Appends written but not yet synced, at most; a full queue makes appends wait.
const SYNC_QUEUE_MAX: usize = 4096;

/// What the disk does before each WAL sync of the log: the hook through which tests hold
/// a plane's syncs back. Production planes have none.
pub trait SyncFaults: Send + Sync + 'static {
    /// Runs on the sync thread before a sync; the sync waits for it to return.
    fn before_sync(&self);
}

impl Debug for dyn SyncFaults {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SyncFaults")
    }
}

/// The last log ID a WAL sync has covered (`Ok(None)`: nothing yet), or why a sync failed.
pub(crate) type Synced = Result<Option<LogId<NodeId>>, String>;

/// How far the log is durable; clones follow the same log.
#[derive(Clone, Debug)]
pub struct Durability(pub(crate) watch::Receiver<Synced>);

impl Durability {
    /// Waits until every entry up to `index` is durable. An error says a sync failed (or
    /// the log was closed): nothing beyond what is durable may be revealed then.
    pub async fn until(&mut self, index: u64) -> Result<(), String> {
        let synced = self
            .0
            .wait_for(|synced| synced.as_ref().map_or(true, |upto| upto.is_some_and(|id| id.index >= index)))
            .await
            .map_err(|_| "the log is closed".to_string())?;
        synced.clone().map(|_| ())
    }
}

/// How far the log is written (durable or not) and how often it was truncated, for a
/// leader's peer clients to see its appends as they happen and for a follower's answers;
/// clones follow the same log.
#[derive(Clone, Debug)]
pub struct Appends(watch::Receiver<Written>);

impl Appends {
    /// Whether the log's last entry is past `index` (`None`: the log's start), or gets
    /// there within `within`.
    pub async fn past(&mut self, index: Option<u64>, within: std::time::Duration) -> bool {
        let past = |written: &Written| written.last.map(|id| id.index) > index;
        tokio::time::timeout(within, self.0.wait_for(past)).await.is_ok_and(|seen| seen.is_ok())
    }

    /// How many truncations the log has seen: entries written after one count and found
    /// durable while the count is the same are still the entries written.
    pub fn truncations(&self) -> u64 {
        self.0.borrow().truncations
    }
}

/// What has been written to the log, for the sync thread to publish once synced.
#[derive(Clone, Copy, Debug, Default)]
struct Written {
    /// The last entry written.
    last: Option<LogId<NodeId>>,
    /// How many truncations the log has seen: a sync that started before a truncation
    /// must not report entries that the truncation removed.
    truncations: u64,
}

/// The log's state shared by every clone of the store and the sync thread.
struct Shared {
    /// Held by the sync thread from its check of the truncation count to its publishing,
    /// and by a truncation through its write, so that a sync never publishes entries a
    /// truncation removed; watched by `Appends`.
    written: watch::Sender<Written>,
    /// The commit openraft reported last, written with the next append rather than on its
    /// own: a write per commit delays the apply that follows it, and losing the newest
    /// commit only means a restarted plane applies a little less before it hears from the
    /// leader.
    committed: Mutex<Option<LogId<NodeId>>>,
    synced: watch::Sender<Synced>,
}

impl Shared {
    /// Raises how far the log counts as durable to `upto`, unless it is there already or a
    /// sync failed.
    fn raise_synced(&self, upto: Option<LogId<NodeId>>) {
        self.synced.send_if_modified(|synced| match synced {
            Ok(durable) if *durable < upto => {
                *durable = upto;
                true
            }
            _ => false,
        });
    }

    fn committed(&self) -> std::sync::MutexGuard<'_, Option<LogId<NodeId>>> {
        self.committed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The log store; clones share the database and the sync thread.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    shared: Arc<Shared>,
    /// Written appends, in log order, for the sync thread: a callback to call once synced,
    /// or `None` for a leader's append openraft was told of already.
    unsynced: tokio::sync::mpsc::Sender<Option<LogFlushed<TypeConfig>>>,
}

/// The sync thread: waits for appends, syncs the WAL once for all that are queued, then
/// publishes how far the log is durable and tells openraft of the appends waiting for it,
/// oldest first. Ends when every `LogStore` is dropped. It holds the database only while
/// syncing, so that a stopped plane's database closes as soon as the plane lets go of it.
fn sync_appends(
    db: std::sync::Weak<DB>,
    shared: Arc<Shared>,
    mut unsynced: tokio::sync::mpsc::Receiver<Option<LogFlushed<TypeConfig>>>,
    fsync_seconds: prometheus_client::metrics::histogram::Histogram,
    faults: Option<Arc<dyn SyncFaults>>,
) {
    while let Some(first) = unsynced.blocking_recv() {
        let mut waiting: Vec<_> = first.into_iter().collect();
        while let Ok(next) = unsynced.try_recv() {
            waiting.extend(next);
        }
        if let Some(faults) = &faults {
            faults.before_sync();
        }
        // Everything written by now is covered by the sync below.
        let written = *shared.written.borrow();
        let synced = match db.upgrade() {
            Some(db) => crate::metrics::timed(&fsync_seconds, || db.flush_wal(true)).map_err(|error| error.to_string()),
            None => Err("the database is closed".to_string()),
        };
        match &synced {
            Ok(()) => {
                let current = shared.written.borrow();
                if current.truncations == written.truncations {
                    shared.raise_synced(written.last);
                }
            }
            Err(error) => {
                tracing::error!(%error, "syncing the Raft log failed; nothing more is applied or committed");
                shared.synced.send_modify(|synced| *synced = Err(error.clone()));
            }
        }
        for callback in waiting {
            callback.log_io_completed(synced.clone().map_err(std::io::Error::other));
        }
    }
}

fn io_error(subject: ErrorSubject<NodeId>, verb: ErrorVerb, error: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&error)).into()
}

fn read_error(error: impl std::error::Error + 'static) -> StorageError {
    io_error(ErrorSubject::Logs, ErrorVerb::Read, error)
}

fn write_error(error: impl std::error::Error + 'static) -> StorageError {
    io_error(ErrorSubject::Logs, ErrorVerb::Write, error)
}

pub(crate) fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

impl LogStore {
    /// The log in `db`, timing each WAL sync into `fsync_seconds`; `faults` runs before
    /// each sync (tests only).
    pub fn new(
        db: Arc<DB>,
        fsync_seconds: prometheus_client::metrics::histogram::Histogram,
        faults: Option<Arc<dyn SyncFaults>>,
    ) -> Result<LogStore, StorageError> {
        // Whatever an earlier run wrote and did not sync is made durable now, so the log
        // starts durable to its end.
        db.flush_wal(true).map_err(write_error)?;
        let (unsynced, queue) = tokio::sync::mpsc::channel(SYNC_QUEUE_MAX);
        let shared = Arc::new(Shared {
            written: watch::Sender::new(Written::default()),
            committed: Mutex::default(),
            synced: watch::Sender::new(Ok(None)),
        });
        let store = LogStore { db: db.clone(), shared: shared.clone(), unsynced };
        let last = store.last_log_id()?;
        shared.written.send_modify(|written| written.last = last);
        shared.synced.send_modify(|synced| *synced = Ok(last));
        let sync_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || sync_appends(sync_db, shared, queue, fsync_seconds, faults))
            .map_err(write_error)?;
        Ok(store)
    }

    /// How far this log is durable.
    pub fn durability(&self) -> Durability {
        Durability(self.shared.synced.subscribe())
    }

    /// How far this log is written.
    pub fn appends(&self) -> Appends {
        Appends(self.shared.written.subscribe())
    }

    /// The last entry's log ID, or the last purged one when the log is empty.
    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, StorageError> {
        let purged = self.meta::<raftpb::LogId>(META_PURGED)?.map(|id| types::log_id_from_pb(&id));
        Ok(self.last_entry_log_id()?.or(purged))
    }

    fn family(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} is opened with the store"))
    }

    fn meta<M: Message + Default>(&self, name: &[u8]) -> Result<Option<M>, StorageError> {
        let raw = self.db.get_pinned_cf(self.family(CF_RAFT_META), name).map_err(read_error)?;
        raw.map(|raw| M::decode(raw.as_ref()).map_err(|error| read_error(DecodeError::from(error)))).transpose()
    }

    /// Writes a meta value and syncs it before returning.
    fn put_meta(&self, name: &[u8], message: &impl Message) -> Result<(), StorageError> {
        self.db.put_cf_opt(self.family(CF_RAFT_META), name, message.encode_to_vec(), &synced()).map_err(write_error)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId<NodeId>>, StorageError> {
        let mut iter = self.db.raw_iterator_cf(self.family(CF_RAFT_LOG));
        iter.seek_to_last();
        iter.status().map_err(read_error)?;
        match iter.value() {
            Some(raw) => Ok(Some(decode_entry(raw)?.log_id)),
            None => Ok(None),
        }
    }

    /// The entries at `indexes`, read by key, or `None` if one is missing (the caller then
    /// scans, as for any range).
    fn entries_by_key(&self, indexes: std::ops::Range<u64>) -> Result<Option<Vec<Entry>>, StorageError> {
        let keys: Vec<[u8; 8]> = indexes.map(index_key).collect();
        let mut entries = Vec::with_capacity(keys.len());
        for value in self.db.batched_multi_get_cf(self.family(CF_RAFT_LOG), &keys, true) {
            match value.map_err(read_error)? {
                Some(value) => entries.push(decode_entry(&value)?),
                None => return Ok(None),
            }
        }
        Ok(Some(entries))
    }
}

/// Entries read back one key each, at most; larger ranges are scanned. What openraft reads
/// (to replicate, to apply) is nearly always the newest entries, still in the memtable,
/// where a point read finds each at once; an iterator first opens and seeks every SST file
/// of the log (a dozen L0 files on a busy plane: at put 8:64 after 20 s of writes, 2.8%
/// of the planes' CPU went to those seeks, against 0.9% on a fresh plane).
const POINT_READS_MAX: u64 = 64;

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_entry(raw: &[u8]) -> Result<Entry, StorageError> {
    let entry = raftpb::Entry::decode(raw).map_err(|error| read_error(DecodeError::from(error)))?;
    types::entry_from_pb(entry).map_err(read_error)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&index) => index,
            Bound::Excluded(&index) => index + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&index) => index.checked_add(1),
            Bound::Excluded(&index) => Some(index),
            Bound::Unbounded => None,
        };
        if let Some(end) = end.filter(|&end| end.saturating_sub(start) <= POINT_READS_MAX) {
            if let Some(entries) = self.entries_by_key(start..end)? {
                return Ok(entries);
            }
        }
        let mut iter = self.db.raw_iterator_cf(self.family(CF_RAFT_LOG));
        iter.seek(index_key(start));
        let mut entries = Vec::new();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            let index = u64::from_be_bytes(key.try_into().map_err(|_| read_error(DecodeError::LogKey(key.len())))?);
            if !range.contains(&index) {
                break;
            }
            entries.push(decode_entry(value)?);
            iter.next();
        }
        iter.status().map_err(read_error)?;
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged = self.meta::<raftpb::LogId>(META_PURGED)?.map(|id| types::log_id_from_pb(&id));
        Ok(LogState { last_purged_log_id: purged, last_log_id: self.last_log_id()? })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(META_VOTE, &types::vote_to_pb(vote))
            .map_err(|_| io_error(ErrorSubject::Vote, ErrorVerb::Write, std::io::Error::other("vote not saved")))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.meta::<raftpb::Vote>(META_VOTE)?.map(|vote| types::vote_from_pb(&vote)))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError> {
        if committed.is_some() {
            *self.shared.committed() = committed;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.meta::<raftpb::LogId>(META_COMMITTED)?.map(|id| types::log_id_from_pb(&id)))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        if let Some(committed) = self.shared.committed().take() {
            batch.put_cf(self.family(CF_RAFT_META), META_COMMITTED, types::log_id_to_pb(&committed).encode_to_vec());
        }
        let family = self.family(CF_RAFT_LOG);
        let mut last = None;
        let mut membership = false;
        for entry in entries {
            membership |= matches!(entry.payload, EntryPayload::Membership(_));
            last = Some(entry.log_id);
            batch.put_cf(family, index_key(entry.log_id.index), types::entry_into_pb(entry).encode_to_vec());
        }
        // Written now (readable at once, as openraft requires), synced by the sync thread.
        if let Err(error) = self.db.write(batch) {
            callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
            return Err(write_error(error));
        }
        if let Some(last) = last {
            self.shared.written.send_modify(|written| written.last = Some(last));
        }
        let waiting = if membership {
            Some(callback)
        } else {
            callback.log_io_completed(Ok(()));
            None
        };
        self.unsynced
            .send(waiting)
            .await
            .map_err(|_| write_error(std::io::Error::other("the log sync thread has stopped")))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let family = self.family(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(family, index_key(log_id.index), index_key(u64::MAX));
        batch.delete_cf(family, index_key(u64::MAX));
        let mut truncated = Ok(());
        self.shared.written.send_if_modified(|written| {
            // A synced write: everything before it is durable too.
            let last = self.db.write_opt(batch, &synced()).map_err(write_error).and_then(|()| self.last_log_id());
            let last = match last {
                Ok(last) => last,
                Err(error) => {
                    truncated = Err(error);
                    return false;
                }
            };
            *written = Written { last, truncations: written.truncations + 1 };
            self.shared.synced.send_if_modified(|synced| match synced {
                Ok(upto) if *upto != last => {
                    *upto = last;
                    true
                }
                _ => false,
            });
            true
        });
        truncated
    }

    /// Drops the entries up to `log_id`, which a snapshot covers. The log then counts as
    /// written and durable at least that far, as it does when a plane starts: a follower
    /// that installed a snapshot past the end of its own log gets no appends up to it (they
    /// are at or below its commit, so openraft skips them when the leader sends them
    /// again), and its answers to those appends claim that far.
    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.put_meta(META_PURGED, &types::log_id_to_pb(&log_id))?;
        self.db
            .delete_range_cf(self.family(CF_RAFT_LOG), index_key(0), index_key(log_id.index + 1))
            .map_err(write_error)?;
        let purged = Some(log_id);
        self.shared.written.send_if_modified(|written| {
            let behind = written.last < purged;
            if behind {
                written.last = purged;
            }
            behind
        });
        self.shared.raise_synced(purged);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry as RaftEntry};

    fn entry(index: u64) -> Entry {
        RaftEntry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|entry| entry.log_id.index).collect()
    }

    /// Reads by key (short ranges) and scans (long or open ones, or where a key is missing)
    /// return the same entries: the contiguous run from the range's first stored index.
    #[tokio::test]
    async fn ranges_read_by_key_and_by_scan_agree() {
        let dir = std::env::temp_dir().join(format!("capstan-log-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = capstan_store::Store::open(&dir, &[CF_RAFT_LOG, CF_RAFT_META]).unwrap();
        let db = store.db().clone();
        let fsync_seconds = prometheus_client::metrics::histogram::Histogram::new(crate::metrics::duration_buckets());
        let mut log = LogStore::new(db.clone(), fsync_seconds, None).unwrap();
        let mut batch = WriteBatch::default();
        for index in 1..=200 {
            batch.put_cf(log.family(CF_RAFT_LOG), index_key(index), types::entry_into_pb(entry(index)).encode_to_vec());
        }
        db.write(batch).unwrap();

        assert_eq!(indexes(&log.try_get_log_entries(10..20).await.unwrap()), (10..20).collect::<Vec<_>>());
        assert_eq!(indexes(&log.try_get_log_entries(10..=20).await.unwrap()), (10..=20).collect::<Vec<_>>());
        assert_eq!(indexes(&log.try_get_log_entries(1..=200).await.unwrap()), (1..=200).collect::<Vec<_>>());
        assert_eq!(indexes(&log.try_get_log_entries(190..).await.unwrap()), (190..=200).collect::<Vec<_>>());
        // Past the end: what is there.
        assert_eq!(indexes(&log.try_get_log_entries(195..205).await.unwrap()), (195..=200).collect::<Vec<_>>());
        assert!(log.try_get_log_entries(201..210).await.unwrap().is_empty());

        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 30)).await.unwrap();
        assert_eq!(indexes(&log.try_get_log_entries(25..35).await.unwrap()), (31..35).collect::<Vec<_>>());
        assert_eq!(indexes(&log.try_get_log_entries(31..41).await.unwrap()), (31..41).collect::<Vec<_>>());

        drop((log, store, db));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
