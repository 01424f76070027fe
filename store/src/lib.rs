//! capstan-store: etcd's MVCC key-value semantics on RocksDB.
//!
//! Every write command gets the next cluster revision; each key keeps its create and mod
//! revision, version and lease; old revisions stay readable until they are compacted; the
//! revision-ordered history feeds watches; leases own keys and delete them when revoked.
//! The whole state exports to, and imports from, a single snapshot file.
//!
//! Layout: [`codec`] owns the RocksDB encoding, [`read`] the read path (ranges, history,
//! leases) over a RocksDB snapshot, [`apply`] the write path (one command, one atomic
//! `WriteBatch`), [`snapshot`] export and import.
//!
//! Invariants: the store knows nothing of Raft, gRPC or the clock: it applies the commands
//! it is given in the order given, deterministically. Memory is bounded by the size of one
//! request or response; no key index is held in memory.

mod apply;
mod auth;
pub mod codec;
mod error;
mod newest;
mod read;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::atomic::{self, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

pub use apply::{check_txn, Applied};
pub use auth::{Access, AuthState, ROOT};
pub use error::{Result, StoreError};
pub use read::{EventsPage, KeyRange, Reader};
pub use snapshot::{check_backup, check_snapshot, seal_backup, BackupDigest, Exported};

use capstan_proto::etcdserverpb as pb;

/// At most this many operations in each branch of a txn (etcd's `--max-txn-ops`).
pub const TXN_OPS_MAX: usize = 128;
/// The longest lease TTL a client may ask for (etcd's `MaxLeaseTTL`).
pub const LEASE_TTL_SECS_MAX: i64 = 9_000_000_000;
/// The revision of an empty store; the first write gets revision 2, as in etcd.
pub const REVISION_INITIAL: i64 = 1;

/// The response of one applied command. Header revisions are filled in; the plane adds
/// cluster, member and term.
#[derive(Clone, Debug, PartialEq)]
pub enum CommandResponse {
    Put(pb::PutResponse),
    DeleteRange(pb::DeleteRangeResponse),
    Txn(pb::TxnResponse),
    Compaction(pb::CompactionResponse),
    LeaseGrant(pb::LeaseGrantResponse),
    LeaseRevoke(pb::LeaseRevokeResponse),
    /// Every auth change answers with a header alone.
    Auth(Option<pb::ResponseHeader>),
}

/// The MVCC store. Cheap to clone; clones share one RocksDB.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    path: PathBuf,
    /// The newest committed revision; only the apply path writes it.
    revision: AtomicI64,
    /// A sequence lock over `revision` and the data it names: odd while a write that moves
    /// the revision (an apply, a snapshot import) is under way, even between them, and
    /// never the same twice. See [`Store::reader`] and [`Store::revision_write`].
    revision_stamp: AtomicU64,
    compacted: AtomicI64,
    /// The auth state as of `revision`'s command; only the apply path replaces it.
    auth: RwLock<Arc<AuthState>>,
    /// `size_bytes` and when it was read, for `size_bytes_recent`.
    size: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// The newest versions of the keys written lately; only the apply path uses it.
    newest: std::sync::Mutex<newest::NewestVersions>,
}

/// How old `Store::size_bytes_recent` may be.
const SIZE_STALE_MAX: std::time::Duration = std::time::Duration::from_millis(100);

/// RocksDB's block cache, shared by every family: the data blocks read lately. Index
/// blocks stay with their files instead (about 1% of the data): in the cache, a large store
/// evicts them, and every seek then reads and decompresses a whole index block again.
const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// The memtables of every family together, at most: past this RocksDB flushes the largest.
const MEMTABLE_BUDGET_BYTES: usize = 64 << 20;
/// One family's memtable before it is full. Every write is a skip-list insert into it, a
/// search that costs less in a smaller list: at put 8:64 the skip list took 7–8% of the
/// planes' CPU with 16 MiB memtables, 4% with 4 MiB ones (session 28 in BENCHMARKS.md).
const WRITE_BUFFER_BYTES: usize = 4 << 20;
/// Full memtables written out together, as one L0 file, so that files stay as large as a
/// 16 MiB memtable made them and compaction runs as rarely.
const MEMTABLES_PER_FLUSH: i32 = 4;
/// Memtables per family, at most, before writes stall: the full ones a flush writes out
/// together, and two more that fill while it runs (the active one and the next).
const MEMTABLES_MAX: i32 = MEMTABLES_PER_FLUSH + 2;
/// L0 files before RocksDB compacts them. The store keeps every version of every key until
/// an etcd compaction, and the versions of all keys interleave, so while the store is
/// small each compaction rewrites the whole last level: the rarer they are, the less is
/// rewritten. Over 60 s of put 16:256 on a fresh cluster compaction took 5.7% of the
/// planes' CPU at RocksDB's default of 4, and 3.5% at 8 (session 28).
const L0_FILES_PER_COMPACTION: i32 = 8;
/// The write-ahead log, at most: past this RocksDB flushes the families that hold its
/// oldest file, so a family written rarely does not keep every log file alive.
const WAL_BYTES_MAX: u64 = 128 << 20;
/// Write-ahead log files kept for reuse once RocksDB no longer needs them. A synced append
/// to a new file must also write the file's grown size (an inode write on ext4), one to a
/// reused file overwrites blocks already there: 104–125 µs against 149–160 µs per
/// `fdatasync` of 300 bytes here. Only up to the file's previous size, though: RocksDB
/// truncates a log file to what it wrote when it closes it, so a reused file grows again
/// past that (session 30 in BENCHMARKS.md). Recovery tells a reused file's new records
/// from the older ones past them (RocksDB's recyclable record format), in the default
/// point-in-time recovery mode. The cost: up to this many obsolete files stay on disk.
const WAL_FILES_REUSED: usize = 4;

/// One column family's options; `cache` is shared by all of them.
fn family_options(cache: &rocksdb::Cache) -> Options {
    let mut options = Options::default();
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    options.set_write_buffer_size(WRITE_BUFFER_BYTES);
    options.set_min_write_buffer_number_to_merge(MEMTABLES_PER_FLUSH);
    options.set_max_write_buffer_number(MEMTABLES_MAX);
    options.set_level_zero_file_num_compaction_trigger(L0_FILES_PER_COMPACTION);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    options.set_block_based_table_factory(&table);
    options
}

/// The database's options: the families' (for the default family) and the settings that
/// span every family.
fn database_options(cache: &rocksdb::Cache) -> Options {
    let mut options = family_options(cache);
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_max_background_jobs(2);
    options.set_bytes_per_sync(1 << 20);
    options.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
    options.set_max_total_wal_size(WAL_BYTES_MAX);
    options.set_recycle_log_file_num(WAL_FILES_REUSED);
    options
}

impl Store {
    /// Opens (or creates) the store in `path`, with `extra_column_families` for the caller's
    /// own use in the same RocksDB (the Raft log lives beside the store this way, so one WAL
    /// sync covers both).
    pub fn open(path: &Path, extra_column_families: &[&str]) -> Result<Store> {
        check_not_foreign(path)?;
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let options = database_options(&cache);
        let families = STORE_FAMILIES
            .iter()
            .chain(extra_column_families)
            .map(|name| ColumnFamilyDescriptor::new(*name, family_options(&cache)));
        let db = DB::open_cf_descriptors(&options, path, families).map_err(|error| {
            let detail = error.to_string();
            if detail.contains("lock") || detail.contains("Resource temporarily unavailable") {
                StoreError::Locked { path: path.display().to_string(), detail }
            } else {
                StoreError::Rocks(error)
            }
        })?;
        let db = Arc::new(db);
        let reader = Reader::latest(&db);
        match reader.meta(codec::META_FORMAT)? {
            Some(format) if format == codec::FORMAT_V1 => {}
            Some(other) => {
                return Err(StoreError::Foreign {
                    path: path.display().to_string(),
                    detail: format!("unknown format {:?}", String::from_utf8_lossy(&other)),
                })
            }
            None if reader.is_empty()? => {
                let mut batch = rocksdb::WriteBatch::default();
                batch.put_cf(cf(&db, codec::CF_META), codec::META_FORMAT, codec::FORMAT_V1);
                batch.put_cf(cf(&db, codec::CF_META), codec::META_REVISION, REVISION_INITIAL.to_be_bytes());
                let mut sync = rocksdb::WriteOptions::default();
                sync.set_sync(true);
                db.write_opt(batch, &sync)?;
            }
            None => {
                return Err(StoreError::Foreign {
                    path: path.display().to_string(),
                    detail: "holds data but no Capstan format marker".into(),
                })
            }
        }
        if reader.meta(snapshot::META_IMPORTING)?.is_some() {
            return Err(StoreError::Corrupt(format!(
                "a snapshot install into {} was interrupted; the store is incomplete",
                path.display()
            )));
        }
        let revision = reader.meta_i64(codec::META_REVISION)?.unwrap_or(REVISION_INITIAL);
        let compacted = reader.meta_i64(codec::META_COMPACTED)?.unwrap_or(0);
        let scheduled = reader.meta_i64(codec::META_COMPACT_SCHEDULED)?;
        let auth = AuthState::load(&reader)?;
        drop(reader);
        let store = Store {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                revision: AtomicI64::new(revision),
                revision_stamp: AtomicU64::new(0),
                compacted: AtomicI64::new(compacted),
                auth: RwLock::new(Arc::new(auth)),
                size: std::sync::Mutex::new(None),
                newest: std::sync::Mutex::default(),
            }),
        };
        if let Some(until) = scheduled {
            tracing::info!(until, "resuming an interrupted compaction");
            store.compact_physically(until)?;
        }
        Ok(store)
    }

    /// The RocksDB handle, for the column families the caller asked for at open.
    pub fn db(&self) -> &Arc<DB> {
        &self.inner.db
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The newest committed revision.
    pub fn revision(&self) -> i64 {
        self.inner.revision.load(Ordering::Acquire)
    }

    /// Revisions below this one can no longer be read or watched.
    pub fn compacted_revision(&self) -> i64 {
        self.inner.compacted.load(Ordering::Acquire)
    }

    /// Users, roles and permissions as of the newest applied command.
    pub fn auth(&self) -> Arc<AuthState> {
        self.inner.auth.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn newest_versions(&self) -> std::sync::MutexGuard<'_, newest::NewestVersions> {
        self.inner.newest.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_auth(&self, auth: AuthState) {
        *self.inner.auth.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(auth);
    }

    /// A consistent read view of the newest committed state.
    ///
    /// The view's revision comes from `Inner::revision` when no write moved it while the
    /// snapshot was taken (the stamp was even and the same before and after), which spares
    /// every read a RocksDB lookup of the revision, and lets it find keys written lately in
    /// memory (`Reader::version_at`); else the view reads both from its snapshot.
    pub fn reader(&self) -> Reader<'_> {
        let stamp = self.inner.revision_stamp.load(Ordering::Acquire);
        let revision = self.revision();
        let reader = Reader::snapshot(&self.inner.db);
        atomic::fence(Ordering::Acquire);
        if stamp.is_multiple_of(2) && self.inner.revision_stamp.load(Ordering::Relaxed) == stamp {
            // A published revision: the newest versions in memory hold every write up to
            // it. (Midway through a write they may not hold the write its snapshot has.)
            reader.holding(revision).knowing(&self.inner.newest)
        } else {
            reader
        }
    }

    /// Marks a write that moves the revision as under way until the guard drops. There is
    /// one writer: the apply path, which also imports snapshots.
    fn revision_write(&self) -> RevisionWrite<'_> {
        let stamp = &self.inner.revision_stamp;
        let before = stamp.fetch_add(1, Ordering::Acquire);
        debug_assert!(before.is_multiple_of(2), "two writes of the revision at once");
        // The odd stamp is visible before anything the write does.
        atomic::fence(Ordering::Release);
        RevisionWrite(stamp)
    }

    /// Serves a Range request (the read half of etcd's KV API).
    pub fn range(&self, request: &pb::RangeRequest) -> Result<pb::RangeResponse> {
        self.reader().range(request)
    }

    /// Approximate bytes on disk and in memtables, for status and the space quota.
    pub fn size_bytes(&self) -> u64 {
        let db = &self.inner.db;
        let mut total = 0;
        for name in STORE_FAMILIES {
            for property in ["rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"] {
                total += db.property_int_value_cf(cf(db, name), property).ok().flatten().unwrap_or(0);
            }
        }
        total
    }

    /// [`Store::size_bytes`] as read at most 100 ms ago, for checks on every request (the
    /// space quota) that cannot afford a dozen RocksDB property reads each.
    pub fn size_bytes_recent(&self) -> u64 {
        let mut size = self.inner.size.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match *size {
            Some((read, bytes)) if read.elapsed() < SIZE_STALE_MAX => bytes,
            _ => {
                let bytes = self.size_bytes();
                *size = Some((std::time::Instant::now(), bytes));
                bytes
            }
        }
    }

    /// Stored key versions, as RocksDB estimates them (cheap; for metrics).
    pub fn key_versions_estimate(&self) -> u64 {
        let db = &self.inner.db;
        db.property_int_value_cf(cf(db, codec::CF_KV), "rocksdb.estimate-num-keys").ok().flatten().unwrap_or(0)
    }

    fn reload_counters(&self) -> Result<()> {
        let reader = Reader::latest(&self.inner.db);
        let revision = reader.meta_i64(codec::META_REVISION)?.unwrap_or(REVISION_INITIAL);
        let compacted = reader.meta_i64(codec::META_COMPACTED)?.unwrap_or(0);
        self.inner.revision.store(revision, Ordering::Release);
        self.inner.compacted.store(compacted, Ordering::Release);
        self.set_auth(AuthState::load(&reader)?);
        Ok(())
    }
}

/// A write that moves the revision, under way; see [`Store::revision_write`].
struct RevisionWrite<'a>(&'a AtomicU64);

impl Drop for RevisionWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

const STORE_FAMILIES: [&str; 6] = codec::STORE_COLUMN_FAMILIES;

/// The handle of a column family the store opened. Every family is opened in `open`, so
/// a missing one is a programming error, not an input error.
fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} is opened in Store::open"))
}

/// A directory with files in it that is not a RocksDB is someone else's: refuse it rather
/// than create a store among their files.
fn check_not_foreign(path: &Path) -> Result<()> {
    let foreign = |detail: String| StoreError::Foreign { path: path.display().to_string(), detail };
    match std::fs::read_dir(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(foreign(error.to_string())),
        Ok(mut entries) => {
            if entries.next().is_none() || path.join("CURRENT").exists() {
                Ok(())
            } else {
                Err(foreign("the directory is not empty and holds no RocksDB".into()))
            }
        }
    }
}
