//! The read path: ranges at a revision, the watch history, and leases, all over one
//! RocksDB snapshot so a read sees a single committed state.

use std::cmp::Ordering as CmpOrdering;
use std::sync::Mutex;

use rocksdb::{DBPinnableSlice, DBRawIteratorWithThreadMode, ReadOptions, SnapshotWithThreadMode, DB};

use capstan_proto::etcdserverpb as pb;
use capstan_proto::mvccpb;

use crate::codec::{self, Version};
use crate::error::{Result, StoreError};
use crate::newest::NewestVersions;
use crate::{cf, Store};

/// A read view of the store: a RocksDB snapshot, or the live database for the apply path
/// (which is the only writer, so it reads its own committed state).
pub struct Reader<'a> {
    db: &'a DB,
    snapshot: Option<SnapshotWithThreadMode<'a, DB>>,
    /// The revision the snapshot holds, when the store knew it as the snapshot was taken;
    /// else [`Reader::revision`] reads it from the snapshot.
    revision: Option<i64>,
    /// The store's newest versions of the keys written lately, which a client's view
    /// looks in before RocksDB ([`Reader::version_at`]).
    newest: Option<&'a Mutex<NewestVersions>>,
}

/// Where a scan of live keys looks.
pub struct KeyRange<'a> {
    pub key: &'a [u8],
    /// Empty: just `key`; `[0]`: every key from `key` on; else the half-open [key, end).
    pub end: &'a [u8],
}

impl KeyRange<'_> {
    pub fn contains(&self, key: &[u8]) -> bool {
        match self.end {
            [] => key == self.key,
            [0] => key >= self.key,
            end => key >= self.key && key < end,
        }
    }
}

/// Something that can list the live keys of a range in key order: a reader at a revision,
/// or the apply path's view with its pending writes on top.
pub(crate) trait LiveKeys {
    /// Calls `visit` for each live key in `range`, in key order, until it returns false.
    fn scan(&self, range: &KeyRange, visit: &mut dyn FnMut(Vec<u8>, Version) -> Result<bool>) -> Result<()>;
}

/// A page of watch history; see [`Reader::events`].
pub struct EventsPage {
    /// Events in revision order, each with its previous key-value where there is one.
    pub events: Vec<mvccpb::Event>,
    /// The revision to continue from.
    pub next_revision: i64,
}

impl<'a> Reader<'a> {
    pub(crate) fn snapshot(db: &'a DB) -> Reader<'a> {
        Reader { db, snapshot: Some(db.snapshot()), revision: None, newest: None }
    }

    /// This snapshot, known to hold `revision`.
    pub(crate) fn holding(self, revision: i64) -> Reader<'a> {
        Reader { revision: Some(revision), ..self }
    }

    /// This view, looking up a key's version in `newest` before RocksDB. `newest` must
    /// hold every write the view's state holds: the view is at a published revision, and
    /// the apply records a write's versions there before it publishes the revision.
    pub(crate) fn knowing(self, newest: &'a Mutex<NewestVersions>) -> Reader<'a> {
        Reader { newest: Some(newest), ..self }
    }

    pub(crate) fn latest(db: &'a DB) -> Reader<'a> {
        Reader { db, snapshot: None, revision: None, newest: None }
    }

    fn options(&self) -> ReadOptions {
        let mut options = ReadOptions::default();
        if let Some(snapshot) = &self.snapshot {
            options.set_snapshot(snapshot);
        }
        options
    }

    fn get(&self, family: &str, key: &[u8]) -> Result<Option<DBPinnableSlice<'a>>> {
        Ok(self.db.get_pinned_cf_opt(cf(self.db, family), key, &self.options())?)
    }

    pub(crate) fn iter(&self, family: &str, upper: Option<Vec<u8>>) -> DBRawIteratorWithThreadMode<'a, DB> {
        let mut options = self.options();
        if let Some(upper) = upper {
            options.set_iterate_upper_bound(upper);
        }
        self.db.raw_iterator_cf_opt(cf(self.db, family), options)
    }

    pub fn meta(&self, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.get(codec::CF_META, name)?.map(|value| value.to_vec()))
    }

    pub fn meta_i64(&self, name: &[u8]) -> Result<Option<i64>> {
        self.meta(name)?.map(|raw| codec::decode_i64(&raw, "meta value")).transpose()
    }

    /// Whether no column family holds any data.
    pub(crate) fn is_empty(&self) -> Result<bool> {
        for family in codec::STORE_COLUMN_FAMILIES {
            let mut iter = self.iter(family, None);
            iter.seek_to_first();
            iter.status()?;
            if iter.valid() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The revision this reader sees.
    pub fn revision(&self) -> Result<i64> {
        if let Some(revision) = self.revision {
            return Ok(revision);
        }
        Ok(self.meta_i64(codec::META_REVISION)?.unwrap_or(crate::REVISION_INITIAL))
    }

    pub fn compacted_revision(&self) -> Result<i64> {
        Ok(self.meta_i64(codec::META_COMPACTED)?.unwrap_or(0))
    }

    /// etcd's HashKV: a hash of every key version at or below `revision` (0: the current
    /// one), back to the compaction, with the compacted revision. Replicas that applied the
    /// same commands agree on it; the hash is Capstan's own (FNV-1a folded to 32 bits).
    pub fn hash_kv(&self, revision: i64) -> Result<(u32, i64)> {
        let (current, compacted) = (self.revision()?, self.compacted_revision()?);
        let revision = if revision <= 0 { current } else { revision };
        if revision > current {
            return Err(StoreError::FutureRevision { requested: revision, current });
        }
        if revision < compacted {
            return Err(StoreError::Compacted { compacted });
        }
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |bytes: &[u8]| {
            for byte in bytes {
                hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        let mut iter = self.iter(codec::CF_KV, None);
        iter.seek_to_first();
        while let (Some(raw), Some(value)) = (iter.key(), iter.value()) {
            if codec::split_kv_key(raw)?.1 <= revision {
                mix(raw);
                mix(value);
            }
            iter.next();
        }
        iter.status()?;
        Ok(((hash >> 32) as u32 ^ hash as u32, compacted))
    }

    /// The newest version of `key` at or below `revision`, tombstones included.
    ///
    /// A key written lately may be answered from memory: its newest version, when that is
    /// at or below `revision`, is also the newest there (a newer one sends the read to
    /// RocksDB).
    pub(crate) fn version_at(&self, key: &[u8], revision: i64) -> Result<Option<Version>> {
        if let Some(newest) = self.newest {
            let newest = newest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(version) = newest.get(key).filter(|version| version.mod_revision <= revision) {
                return Ok(Some(version.clone()));
            }
        }
        let prefix = codec::kv_key_prefix(key);
        let mut iter = self.iter(codec::CF_KV, Some(codec::kv_next_key_seek(&prefix)));
        iter.seek(codec::kv_key(key, revision));
        iter.status()?;
        match (iter.key(), iter.value()) {
            (Some(raw), Some(value)) => {
                let (_, mod_revision) = codec::split_kv_key(raw)?;
                Ok(Some(Version::decode(mod_revision, value)?))
            }
            _ => Ok(None),
        }
    }

    /// The kept versions of `key`'s current life (compaction drops older ones), oldest
    /// first; none when the key does not exist now.
    pub fn versions(&self, key: &[u8]) -> Result<Vec<mvccpb::KeyValue>> {
        let prefix = codec::kv_key_prefix(key);
        let mut iter = self.iter(codec::CF_KV, Some(codec::kv_next_key_seek(&prefix)));
        iter.seek(&prefix);
        let mut versions = Vec::new();
        // Newest first, back to the version that created the key (or the oldest kept).
        while let (Some(raw), Some(value)) = (iter.key(), iter.value()) {
            let (_, mod_revision) = codec::split_kv_key(raw)?;
            let version = Version::decode(mod_revision, value)?;
            if version.tombstone {
                break;
            }
            let created = version.create_revision == mod_revision;
            versions.push(key_value(key.to_vec(), version, false));
            if created {
                break;
            }
            iter.next();
        }
        iter.status()?;
        versions.reverse();
        Ok(versions)
    }

    /// Lists the live keys of `range` as of `revision` in key order.
    pub(crate) fn scan_at(
        &self,
        range: &KeyRange,
        revision: i64,
        visit: &mut dyn FnMut(Vec<u8>, Version) -> Result<bool>,
    ) -> Result<()> {
        if range.end.is_empty() {
            if let Some(version) = self.version_at(range.key, revision)? {
                if !version.tombstone {
                    visit(range.key.to_vec(), version)?;
                }
            }
            return Ok(());
        }
        let upper = match range.end {
            [0] => None,
            end if end <= range.key => return Ok(()),
            end => Some(codec::kv_lower_bound(end)),
        };
        let mut iter = self.iter(codec::CF_KV, upper);
        iter.seek(codec::kv_lower_bound(range.key));
        while let (Some(raw), Some(value)) = (iter.key(), iter.value()) {
            let (prefix, mod_revision) = codec::split_kv_key(raw)?;
            if mod_revision > revision {
                // Too new: jump to this key's newest version at or below `revision`.
                let mut target = prefix.to_vec();
                target.extend_from_slice(&(!(revision as u64)).to_be_bytes());
                iter.seek(target);
                continue;
            }
            let prefix = prefix.to_vec();
            let version = Version::decode(mod_revision, value)?;
            if !version.tombstone && !visit(codec::unescape_prefix(&prefix)?, version)? {
                return Ok(());
            }
            // Older versions of this key follow; step once (the common case of one version
            // lands on the next key) and seek past the rest if there are more.
            iter.next();
            if iter.key().is_some_and(|next| next.starts_with(&prefix)) {
                iter.seek(codec::kv_next_key_seek(&prefix));
            }
        }
        iter.status()?;
        Ok(())
    }

    /// Serves a Range request at the revision it names (or the newest).
    pub fn range(&self, request: &pb::RangeRequest) -> Result<pb::RangeResponse> {
        if request.key.is_empty() {
            return Err(StoreError::KeyNotProvided);
        }
        let current = self.revision()?;
        let revision = self.check_revision(request.revision, current)?;
        let view = AtRevision { reader: self, revision };
        range_in(&view, request, current)
    }

    /// The revision a read at `requested` (<= 0: the newest) sees, if it is still there.
    pub(crate) fn check_revision(&self, requested: i64, current: i64) -> Result<i64> {
        if requested <= 0 {
            return Ok(current);
        }
        if requested > current {
            return Err(StoreError::FutureRevision { requested, current });
        }
        let compacted = self.compacted_revision()?;
        if requested < compacted {
            return Err(StoreError::Compacted { compacted });
        }
        Ok(requested)
    }

    /// Up to about `max_events` events from revision `from` on, in revision order; the
    /// events of one revision are never split across pages.
    pub fn events(&self, from: i64, max_events: usize) -> Result<EventsPage> {
        let compacted = self.compacted_revision()?;
        if from < compacted {
            return Err(StoreError::Compacted { compacted });
        }
        let current = self.revision()?;
        let mut events = Vec::new();
        let mut next_revision = current + 1;
        let mut iter = self.iter(codec::CF_HISTORY, Some(codec::history_key(current + 1, 0).to_vec()));
        iter.seek(codec::history_key(from.max(0), 0));
        let mut last_revision = None;
        while let (Some(raw), Some(key)) = (iter.key(), iter.value()) {
            let (revision, _) = codec::split_history_key(raw)?;
            if events.len() >= max_events && last_revision != Some(revision) {
                next_revision = revision;
                break;
            }
            last_revision = Some(revision);
            events.push(self.event_at(key, revision, compacted)?);
            iter.next();
        }
        iter.status()?;
        Ok(EventsPage { events, next_revision })
    }

    /// The event that wrote `key` at `revision`, with the key-value it replaced when that is
    /// still readable (as in etcd, an event at the compact revision has no previous value).
    fn event_at(&self, key: &[u8], revision: i64, compacted: i64) -> Result<mvccpb::Event> {
        let version = self
            .version_at(key, revision)?
            .filter(|version| version.mod_revision == revision)
            .ok_or_else(|| StoreError::Corrupt(format!("history names revision {revision} that kv lacks")))?;
        let readable = revision > compacted;
        let prev_kv = if readable { self.version_at(key, revision - 1)? } else { None }
            .filter(|previous| !previous.tombstone)
            .map(|previous| key_value(key.to_vec(), previous, false));
        Ok(event(key.to_vec(), version, prev_kv))
    }

    /// Every lease with its granted TTL, in ID order.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>> {
        let mut leases = Vec::new();
        let mut iter = self.iter(codec::CF_LEASE, None);
        iter.seek_to_first();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            leases.push((codec::decode_i64(key, "lease id")?, codec::decode_i64(value, "lease ttl")?));
            iter.next();
        }
        iter.status()?;
        Ok(leases)
    }

    /// The granted TTL of a lease, if it exists.
    pub fn lease(&self, id: i64) -> Result<Option<i64>> {
        self.get(codec::CF_LEASE, &codec::lease_key(id))?.map(|ttl| codec::decode_i64(&ttl, "lease ttl")).transpose()
    }

    /// The keys attached to a lease, in key order.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let prefix = codec::lease_key(id);
        let upper = codec::lease_key(id.wrapping_add(1));
        let mut iter = self.iter(codec::CF_LEASE_KEYS, (id != -1).then(|| upper.to_vec()));
        iter.seek(prefix);
        let mut keys = Vec::new();
        while let Some(raw) = iter.key() {
            if !raw.starts_with(&prefix) {
                break;
            }
            keys.push(raw[prefix.len()..].to_vec());
            iter.next();
        }
        iter.status()?;
        Ok(keys)
    }
}

/// A reader fixed at one revision.
pub(crate) struct AtRevision<'r, 'a> {
    pub(crate) reader: &'r Reader<'a>,
    pub(crate) revision: i64,
}

impl LiveKeys for AtRevision<'_, '_> {
    fn scan(&self, range: &KeyRange, visit: &mut dyn FnMut(Vec<u8>, Version) -> Result<bool>) -> Result<()> {
        self.reader.scan_at(range, self.revision, visit)
    }
}

pub(crate) fn key_value(key: Vec<u8>, version: Version, keys_only: bool) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key,
        create_revision: version.create_revision,
        mod_revision: version.mod_revision,
        version: version.version,
        value: if keys_only { Vec::new() } else { version.value },
        lease: version.lease,
    }
}

/// The watch event of writing `version` of `key`.
pub(crate) fn event(key: Vec<u8>, version: Version, prev_kv: Option<mvccpb::KeyValue>) -> mvccpb::Event {
    let kind = if version.tombstone { mvccpb::event::EventType::Delete } else { mvccpb::event::EventType::Put };
    mvccpb::Event { r#type: kind as i32, kv: Some(key_value(key, version, false)), prev_kv }
}

/// etcd's Range semantics over any view of live keys: revision filters, sort, limit, count.
/// `header_revision` is the store's current revision, which etcd reports for every read.
pub(crate) fn range_in(
    view: &dyn LiveKeys,
    request: &pb::RangeRequest,
    header_revision: i64,
) -> Result<pb::RangeResponse> {
    use pb::range_request::{SortOrder, SortTarget};
    let sort_target = SortTarget::try_from(request.sort_target).unwrap_or(SortTarget::Key);
    let mut sort_order = SortOrder::try_from(request.sort_order).unwrap_or(SortOrder::None);
    if sort_order == SortOrder::None && sort_target != SortTarget::Key {
        sort_order = SortOrder::Ascend;
    }
    let filtered = request.min_mod_revision != 0
        || request.max_mod_revision != 0
        || request.min_create_revision != 0
        || request.max_create_revision != 0;
    let keep_all =
        filtered || !matches!(sort_order, SortOrder::None | SortOrder::Ascend) || sort_target != SortTarget::Key;
    let limit = usize::try_from(request.limit).unwrap_or(0);
    let passes = |version: &Version| {
        (request.min_mod_revision == 0 || version.mod_revision >= request.min_mod_revision)
            && (request.max_mod_revision == 0 || version.mod_revision <= request.max_mod_revision)
            && (request.min_create_revision == 0 || version.create_revision >= request.min_create_revision)
            && (request.max_create_revision == 0 || version.create_revision <= request.max_create_revision)
    };
    let mut count = 0i64;
    let mut kvs = Vec::new();
    let range = KeyRange { key: &request.key, end: &request.range_end };
    view.scan(&range, &mut |key, version| {
        count += 1;
        let wanted = keep_all || limit == 0 || kvs.len() <= limit;
        if !request.count_only && wanted && passes(&version) {
            kvs.push(key_value(key, version, request.keys_only));
        }
        Ok(true)
    })?;
    if sort_order != SortOrder::None {
        let compare = |a: &mvccpb::KeyValue, b: &mvccpb::KeyValue| -> CmpOrdering {
            match sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        match sort_order {
            SortOrder::Descend => kvs.sort_by(|a, b| compare(b, a)),
            _ => kvs.sort_by(compare),
        }
    }
    let mut more = false;
    if limit > 0 && kvs.len() > limit {
        kvs.truncate(limit);
        more = true;
    }
    Ok(pb::RangeResponse {
        header: Some(pb::ResponseHeader { revision: header_revision, ..Default::default() }),
        kvs,
        more,
        count,
    })
}

impl Store {
    /// See [`Reader::versions`].
    pub fn versions(&self, key: &[u8]) -> Result<Vec<mvccpb::KeyValue>> {
        self.reader().versions(key)
    }

    /// Events from revision `from` on; see [`Reader::events`].
    pub fn events(&self, from: i64, max_events: usize) -> Result<EventsPage> {
        self.reader().events(from, max_events)
    }
}

#[cfg(test)]
mod tests {
    use capstan_proto::etcdserverpb as pb;
    use capstan_proto::raftpb::{command::Request, Command};

    use crate::{codec, Store};

    fn apply(store: &Store, request: Request) {
        store.apply(&Command { request: Some(request), caller: None, origin: 0 }, &[]).unwrap().response.unwrap();
    }

    fn put(store: &Store, key: &str, value: &str) {
        apply(store, Request::Put(pb::PutRequest { key: key.into(), value: value.into(), ..Default::default() }));
    }

    /// Each key-value's mod revision and value.
    fn revisions_and_values(kvs: Vec<capstan_proto::mvccpb::KeyValue>) -> Vec<(i64, String)> {
        kvs.into_iter().map(|kv| (kv.mod_revision, String::from_utf8(kv.value).unwrap())).collect()
    }

    fn values(store: &Store, key: &str) -> Vec<(i64, String)> {
        revisions_and_values(store.versions(key.as_bytes()).unwrap())
    }

    /// An apply caught between its write and publishing its revision: a view taken then
    /// holds the new data, so it must report the new revision, read from its snapshot,
    /// not the stale one in memory.
    #[test]
    fn a_view_taken_while_an_apply_writes_reads_the_revision_from_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &[]).unwrap();
        put(&store, "a", "1"); // revision 2
        assert_eq!(store.reader().revision().unwrap(), 2);
        let write = store.revision_write();
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(crate::cf(store.db(), codec::CF_META), codec::META_REVISION, 3i64.to_be_bytes());
        store.db().write(batch).unwrap();
        assert_eq!(store.revision(), 2, "the apply has not published its revision yet");
        assert_eq!(store.reader().revision().unwrap(), 3, "a view midway through the write");
        store.inner.revision.store(3, std::sync::atomic::Ordering::Release);
        drop(write);
        assert_eq!(store.reader().revision().unwrap(), 3, "a view after it");
        put(&store, "a", "2");
        assert_eq!(store.reader().revision().unwrap(), 4);
    }

    fn get(store: &Store, key: &str, revision: i64) -> Vec<(i64, String)> {
        let request = pb::RangeRequest { key: key.into(), revision, ..Default::default() };
        revisions_and_values(store.range(&request).unwrap().kvs)
    }

    /// A key written lately is read from the newest versions in memory only where its
    /// newest version is the answer: at an older revision the read goes to RocksDB, and a
    /// deletion reads as no key.
    #[test]
    fn reads_take_a_kept_newest_version_only_at_or_above_its_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &[]).unwrap();
        put(&store, "a", "1"); // revision 2
        put(&store, "a", "2"); // 3
        assert!(store.newest_versions().get(b"a").is_some(), "the newest version is kept");
        assert_eq!(get(&store, "a", 0), vec![(3, "2".into())]);
        assert_eq!(get(&store, "a", 3), vec![(3, "2".into())]);
        assert_eq!(get(&store, "a", 2), vec![(2, "1".into())]);
        apply(&store, Request::DeleteRange(pb::DeleteRangeRequest { key: "a".into(), ..Default::default() })); // 4
        assert!(get(&store, "a", 0).is_empty());
        assert_eq!(get(&store, "a", 3), vec![(3, "2".into())]);
    }

    /// Every write goes to one key, so at every revision the key's newest version is that
    /// revision's: a view must never pair a revision with an older version (as it would
    /// if the apply published a revision before recording the write's versions).
    #[test]
    fn a_view_never_sees_a_revision_without_its_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &[]).unwrap();
        put(&store, "k", "0");
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut reads = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let view = store.reader();
                    let revision = view.revision().unwrap();
                    let request = pb::RangeRequest { key: "k".into(), ..Default::default() };
                    let kvs = view.range(&request).unwrap().kvs;
                    assert_eq!(kvs[0].mod_revision, revision, "read {reads}");
                    reads += 1;
                }
            });
            for value in 1..2_000 {
                put(&store, "k", &value.to_string());
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap();
        });
    }

    #[test]
    fn a_keys_versions_are_those_of_its_current_life_back_to_the_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &[]).unwrap();
        put(&store, "a", "1"); // revision 2
        put(&store, "ab", "x"); // 3: a neighbour, not a version of "a"
        put(&store, "a", "2"); // 4
        apply(&store, Request::DeleteRange(pb::DeleteRangeRequest { key: "a".into(), ..Default::default() })); // 5
        assert!(values(&store, "a").is_empty(), "a deleted key has no current life");
        put(&store, "a", "3"); // 6
        put(&store, "a", "4"); // 7
        put(&store, "a", "5"); // 8
        assert_eq!(values(&store, "a"), vec![(6, "3".into()), (7, "4".into()), (8, "5".into())]);
        apply(&store, Request::Compaction(pb::CompactionRequest { revision: 7, physical: true }));
        assert_eq!(values(&store, "a"), vec![(7, "4".into()), (8, "5".into())]);
        assert!(values(&store, "nope").is_empty());
    }
}
