//! The Raft log and vote in RocksDB, in the plane's one database beside the store.
//!
//! `raft_log` maps the big-endian log index to a protobuf `Entry`; `raft_meta` holds the
//! vote, the last purged log ID and the committed log ID. An append is written at once
//! (readable, not yet durable) and queued for the sync thread, which commits in groups:
//! one WAL fsync covers every append queued meanwhile, and only then is openraft told they
//! are durable. Votes are synced before `save_vote` returns.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogId, RaftLogReader, StorageIOError, Vote};
use prost::Message;
use rocksdb::{WriteBatch, WriteOptions, DB};

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

/// The log store; clones share the database and the sync thread.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// The callbacks of written appends, in log order, for the sync thread.
    unsynced: tokio::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// The sync thread: waits for appends, syncs the WAL once for all that are queued, then
/// tells openraft they are durable, oldest first. Ends when every `LogStore` is dropped.
/// It holds the database only while syncing, so that a stopped plane's database closes as
/// soon as the plane lets go of it.
fn sync_appends(
    db: std::sync::Weak<DB>,
    mut unsynced: tokio::sync::mpsc::Receiver<LogFlushed<TypeConfig>>,
    fsync_seconds: prometheus_client::metrics::histogram::Histogram,
) {
    while let Some(first) = unsynced.blocking_recv() {
        let mut written = vec![first];
        while let Ok(next) = unsynced.try_recv() {
            written.push(next);
        }
        let synced = match db.upgrade() {
            Some(db) => crate::metrics::timed(&fsync_seconds, || db.flush_wal(true)).map_err(|error| error.to_string()),
            None => Err("the database is closed".to_string()),
        };
        for callback in written {
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
    /// The log in `db`, timing each WAL sync into `fsync_seconds`.
    pub fn new(
        db: Arc<DB>,
        fsync_seconds: prometheus_client::metrics::histogram::Histogram,
    ) -> std::io::Result<LogStore> {
        let (unsynced, queue) = tokio::sync::mpsc::channel(SYNC_QUEUE_MAX);
        let sync_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || sync_appends(sync_db, queue, fsync_seconds))?;
        Ok(LogStore { db, unsynced })
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
}

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
        let last = self.last_entry_log_id()?.or(purged);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(META_VOTE, &types::vote_to_pb(vote))
            .map_err(|_| io_error(ErrorSubject::Vote, ErrorVerb::Write, std::io::Error::other("vote not saved")))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.meta::<raftpb::Vote>(META_VOTE)?.map(|vote| types::vote_from_pb(&vote)))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError> {
        if let Some(committed) = committed {
            // Not synced: losing it only means replaying a little more of the log.
            self.db
                .put_cf(self.family(CF_RAFT_META), META_COMMITTED, types::log_id_to_pb(&committed).encode_to_vec())
                .map_err(write_error)?;
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
        let family = self.family(CF_RAFT_LOG);
        for entry in entries {
            batch.put_cf(family, index_key(entry.log_id.index), types::entry_to_pb(&entry).encode_to_vec());
        }
        // Written now (readable at once, as openraft requires), synced by the sync thread.
        if let Err(error) = self.db.write(batch) {
            callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
            return Err(write_error(error));
        }
        self.unsynced
            .send(callback)
            .await
            .map_err(|_| write_error(std::io::Error::other("the log sync thread has stopped")))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let family = self.family(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(family, index_key(log_id.index), index_key(u64::MAX));
        batch.delete_cf(family, index_key(u64::MAX));
        self.db.write_opt(batch, &synced()).map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.put_meta(META_PURGED, &types::log_id_to_pb(&log_id))?;
        self.db
            .delete_range_cf(self.family(CF_RAFT_LOG), index_key(0), index_key(log_id.index + 1))
            .map_err(write_error)
    }
}
