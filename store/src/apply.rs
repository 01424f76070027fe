//! The write path. Commands are applied into a RocksDB `WriteBatch`, committed atomically
//! with whatever metadata the caller adds (the Raft applied index), so a crash leaves
//! either all of a write or none of it. A write carries one command, or a run of commands
//! that only touch keys ([`shares_write`]): one write then serves a whole Raft batch
//! entry of puts, where a write per command would cost a WAL append and a round of
//! RocksDB's write path each.
//!
//! A command may read keys written a moment before, by itself (a txn) or by an earlier
//! command of the same write; those writes sit in `pending` until the batch commits, and
//! every read of the newest state looks there first, then among the newest versions kept
//! in memory (`newest.rs`), and only then in the database.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use rocksdb::WriteBatch;

use capstan_proto::etcdserverpb as pb;
use capstan_proto::mvccpb;
use capstan_proto::raftpb::{command, Command};

use crate::auth::AuthState;
use crate::codec::{self, Version};
use crate::error::{Result, StoreError};
use crate::read::{event, key_value, range_in, AtRevision, KeyRange, LiveKeys, Reader};
use crate::{cf, CommandResponse, Store, LEASE_TTL_SECS_MAX, TXN_OPS_MAX};

/// What applying one command produced.
#[derive(Debug)]
pub struct Applied {
    /// The response, or the error the client gets; both are the same on every replica.
    pub response: Result<CommandResponse>,
    /// The watch events, in order; empty when nothing changed.
    pub events: Vec<mvccpb::Event>,
    /// The store's revision after the command.
    pub revision: i64,
}

/// Applies at most this many compaction deletes per `WriteBatch`, to bound memory.
const COMPACTION_BATCH_KEYS: usize = 1000;

struct Apply<'a> {
    store: &'a Store,
    reader: Reader<'a>,
    /// The revision before the command; `main` is the one its writes get.
    revision: i64,
    main: i64,
    sub: u32,
    batch: WriteBatch,
    /// The newest version of every key this write wrote.
    pending: BTreeMap<Vec<u8>, Version>,
    events: Vec<mvccpb::Event>,
    /// The auth state after this command, when it is an auth change.
    auth: Option<AuthState>,
}

impl Store {
    /// Applies one command, then commits it together with `meta` (name, value) pairs in the
    /// `meta` family. An `Err` is a storage failure: the store can no longer be trusted.
    /// A request the store refuses is not an `Err`: it is in [`Applied::response`].
    pub fn apply(&self, command: &Command, meta: &[(&[u8], Vec<u8>)]) -> Result<Applied> {
        let mut applied = self.apply_run(std::slice::from_ref(command), meta)?;
        Ok(applied.pop().expect("one command applies to one result"))
    }

    /// Applies `commands` in order, each at its own revision and with the response it would
    /// get alone, in as few RocksDB writes as that allows: consecutive commands that
    /// share a write (`shares_write`) go together, any other command goes alone. Each write
    /// commits the `meta` pairs that `meta_at` gives for the position of its last command,
    /// so the caller can record how far it got. The results are in the commands' order;
    /// an `Err` is a storage failure, as for [`Store::apply`].
    pub fn apply_all<'m>(
        &self,
        commands: &[Command],
        meta_at: impl Fn(usize) -> Vec<(&'m [u8], Vec<u8>)>,
    ) -> Result<Vec<Applied>> {
        let mut applied = Vec::with_capacity(commands.len());
        let mut start = 0;
        while start < commands.len() {
            let shared = commands[start..].iter().take_while(|command| shares_write(command)).count();
            let end = start + shared.max(1);
            applied.extend(self.apply_run(&commands[start..end], &meta_at(end - 1))?);
            start = end;
        }
        Ok(applied)
    }

    /// Applies `commands` and commits them, with `meta`, in one write. Only the first may
    /// be a command that does not share a write (`shares_write`).
    fn apply_run(&self, commands: &[Command], meta: &[(&[u8], Vec<u8>)]) -> Result<Vec<Applied>> {
        let revision = self.revision();
        let mut apply = Apply {
            store: self,
            reader: Reader::latest(self.db()),
            revision,
            main: revision + 1,
            sub: 0,
            batch: WriteBatch::default(),
            pending: BTreeMap::new(),
            events: Vec::new(),
            auth: None,
        };
        let mut applied = Vec::with_capacity(commands.len());
        let mut compact_until = None;
        for command in commands {
            apply.next_command();
            let writes_before = apply.batch.len();
            let response = apply.command(command);
            match &response {
                Err(error) if !error.is_client_error() => return Err(apply.fail(response.unwrap_err())),
                // A refused request must leave no trace; validation runs before any write.
                Err(_) => assert_eq!(apply.batch.len(), writes_before, "a refused command wrote"),
                Ok(_) => {}
            }
            if let (Ok(_), Some(command::Request::Compaction(request))) = (&response, command.request.as_ref()) {
                compact_until = Some(request.revision);
            }
            let events = std::mem::take(&mut apply.events);
            applied.push(Applied { response, events, revision: apply.revision_now() });
        }
        let new_revision = apply.revision_now();
        let Apply { mut batch, auth, pending, .. } = apply;
        assert!(new_revision >= revision, "revision went down from {revision} to {new_revision}");
        let metas = cf(self.db(), codec::CF_META);
        if new_revision > revision {
            batch.put_cf(metas, codec::META_REVISION, new_revision.to_be_bytes());
        }
        if let Some(until) = compact_until {
            batch.put_cf(metas, codec::META_COMPACTED, until.to_be_bytes());
            batch.put_cf(metas, codec::META_COMPACT_SCHEDULED, until.to_be_bytes());
        }
        for (name, value) in meta {
            batch.put_cf(metas, name, value);
        }
        let write = self.revision_write();
        self.db().write(batch)?;
        // Recorded before the revision is published: a reader at that revision may look
        // here first (`Reader::version_at`).
        let mut newest = self.newest_versions();
        for (key, version) in pending {
            newest.record(key, version);
        }
        drop(newest);
        self.inner.revision.store(new_revision, Ordering::Release);
        drop(write);
        if let Some(auth) = auth {
            self.set_auth(auth);
        }
        if let Some(until) = compact_until {
            self.inner.compacted.store(until, Ordering::Release);
            self.compact_physically(until)?;
        }
        Ok(applied)
    }

    /// Writes `meta` pairs alone, for commands that change only the caller's metadata.
    pub fn put_meta(&self, meta: &[(&[u8], Vec<u8>)]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (name, value) in meta {
            batch.put_cf(cf(self.db(), codec::CF_META), name, value);
        }
        Ok(self.db().write(batch)?)
    }

    /// Deletes what compaction at `until` made unreachable: every version of a key older
    /// than its newest version at or below `until`, that version too if it is a tombstone
    /// below `until`, and the history below `until`. Idempotent, so an interrupted run is
    /// simply run again at the next open.
    pub(crate) fn compact_physically(&self, until: i64) -> Result<()> {
        let db = self.db();
        let reader = Reader::latest(db);
        let mut history = reader.iter(codec::CF_HISTORY, Some(codec::history_key(until, 0).to_vec()));
        history.seek_to_first();
        let mut removed = 0usize;
        loop {
            let mut batch = WriteBatch::default();
            let mut seen = std::collections::HashSet::new();
            while let (Some(raw), Some(key)) = (history.key(), history.value()) {
                if seen.len() >= COMPACTION_BATCH_KEYS {
                    break;
                }
                if seen.insert(key.to_vec()) {
                    removed += self.compact_key(&reader, key, until, &mut batch)?;
                }
                batch.delete_cf(cf(db, codec::CF_HISTORY), raw);
                history.next();
            }
            history.status()?;
            let done = history.key().is_none();
            if done {
                batch.delete_cf(cf(db, codec::CF_META), codec::META_COMPACT_SCHEDULED);
            }
            db.write(batch)?;
            if done {
                break;
            }
        }
        tracing::info!(revision = until, versions_removed = removed, "compacted");
        Ok(())
    }

    fn compact_key(&self, reader: &Reader, key: &[u8], until: i64, batch: &mut WriteBatch) -> Result<usize> {
        let Some(kept) = reader.version_at(key, until)? else { return Ok(0) };
        let prefix = codec::kv_key_prefix(key);
        let mut iter = reader.iter(codec::CF_KV, Some(codec::kv_next_key_seek(&prefix)));
        let drop_kept = kept.tombstone && kept.mod_revision < until;
        iter.seek(codec::kv_key(key, if drop_kept { kept.mod_revision } else { kept.mod_revision - 1 }));
        let mut removed = 0;
        while let Some(raw) = iter.key() {
            batch.delete_cf(cf(self.db(), codec::CF_KV), raw);
            removed += 1;
            iter.next();
        }
        iter.status()?;
        Ok(removed)
    }
}

/// Whether `command` may share a write with the commands around it: a put, a delete range
/// or a txn that reads no past revision. These read and write keys only, and see the keys
/// that earlier commands of the same write wrote (`Apply::pending`). Anything else reads
/// or changes state beside the keys (leases, auth, the compacted revision) or reads an
/// older revision, which the database has only once the write before it is committed.
fn shares_write(command: &Command) -> bool {
    match &command.request {
        Some(command::Request::Put(_) | command::Request::DeleteRange(_)) => true,
        Some(command::Request::Txn(txn)) => reads_no_past_revision(txn),
        _ => false,
    }
}

fn reads_no_past_revision(txn: &pb::TxnRequest) -> bool {
    use pb::request_op::Request;
    txn.success.iter().chain(&txn.failure).all(|op| match &op.request {
        Some(Request::RequestRange(range)) => range.revision <= 0,
        Some(Request::RequestTxn(nested)) => reads_no_past_revision(nested),
        _ => true,
    })
}

impl Apply<'_> {
    /// Moves on to the next command of the write: it gets the revision after the last one
    /// that wrote.
    fn next_command(&mut self) {
        self.revision = self.revision_now();
        self.main = self.revision + 1;
        self.sub = 0;
    }

    /// The store's revision after what has been applied so far.
    fn revision_now(&self) -> i64 {
        if self.sub > 0 {
            self.main
        } else {
            self.revision
        }
    }

    fn fail(self, error: StoreError) -> StoreError {
        tracing::error!(%error, revision = self.revision, "apply failed; the store stops");
        error
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader { revision: self.revision_now(), ..Default::default() })
    }

    fn command(&mut self, command: &Command) -> Result<CommandResponse> {
        use command::Request;
        let request = command.request.as_ref().ok_or(StoreError::EmptyCommand)?;
        let auth = self.store.auth();
        if let Some(caller) = &command.caller {
            auth.check_command(&caller.user, request, &self.reader)?;
        }
        match request {
            Request::Put(request) => {
                self.check_put(request)?;
                let mut response = self.put(request)?;
                response.header = self.header();
                Ok(CommandResponse::Put(response))
            }
            Request::DeleteRange(request) => {
                check_key(&request.key)?;
                let mut response = self.delete_range(request)?;
                response.header = self.header();
                Ok(CommandResponse::DeleteRange(response))
            }
            Request::Txn(request) => {
                let response = self.txn(request)?;
                Ok(CommandResponse::Txn(response))
            }
            Request::Compaction(request) => {
                let compacted = self.store.compacted_revision();
                if request.revision <= compacted {
                    return Err(StoreError::Compacted { compacted });
                }
                if request.revision > self.revision {
                    return Err(StoreError::FutureRevision { requested: request.revision, current: self.revision });
                }
                Ok(CommandResponse::Compaction(pb::CompactionResponse { header: self.header() }))
            }
            Request::LeaseGrant(request) => {
                self.lease_grant(request)?;
                Ok(CommandResponse::LeaseGrant(pb::LeaseGrantResponse {
                    header: self.header(),
                    id: request.id,
                    ttl: request.ttl,
                    error: String::new(),
                }))
            }
            Request::LeaseRevoke(request) => {
                self.lease_revoke(request.id)?;
                Ok(CommandResponse::LeaseRevoke(pb::LeaseRevokeResponse { header: self.header() }))
            }
            Request::Batch(_) => Err(StoreError::BatchNotUnrolled),
            Request::AuthEnable(_)
            | Request::AuthDisable(_)
            | Request::UserAdd(_)
            | Request::UserDelete(_)
            | Request::UserChangePassword(_)
            | Request::UserGrantRole(_)
            | Request::UserRevokeRole(_)
            | Request::RoleAdd(_)
            | Request::RoleDelete(_)
            | Request::RoleGrantPermission(_)
            | Request::RoleRevokePermission(_) => {
                let mut changed = (*auth).clone();
                changed.change(request)?;
                changed.write_changes(&auth, &mut self.batch, cf(self.store.db(), codec::CF_AUTH));
                self.auth = Some(changed);
                Ok(CommandResponse::Auth(self.header()))
            }
        }
    }

    /// The newest live version of `key`, counting this write's own: from `pending`, else
    /// from the newest versions kept in memory, else from the database.
    fn newest_live(&self, key: &[u8]) -> Result<Option<Version>> {
        let known = self.pending.get(key).cloned().or_else(|| self.store.newest_versions().get(key).cloned());
        let newest = match known {
            Some(version) => Some(version),
            None => self.reader.version_at(key, self.revision)?,
        };
        Ok(newest.filter(|version| !version.tombstone))
    }

    fn check_put(&self, request: &pb::PutRequest) -> Result<()> {
        check_key(&request.key)?;
        if request.ignore_value && !request.value.is_empty() {
            return Err(StoreError::ValueProvided);
        }
        if request.ignore_lease && request.lease != 0 {
            return Err(StoreError::LeaseProvided);
        }
        if (request.ignore_value || request.ignore_lease) && self.newest_live(&request.key)?.is_none() {
            return Err(StoreError::KeyNotFound);
        }
        if request.lease != 0 && self.reader.lease(request.lease)?.is_none() {
            return Err(StoreError::LeaseNotFound { id: request.lease });
        }
        Ok(())
    }

    /// Records one write of `key` at this command's revision.
    fn write(&mut self, key: &[u8], version: Version, previous: Option<Version>) {
        let db = self.store.db();
        self.batch.put_cf(cf(db, codec::CF_KV), codec::kv_key(key, self.main), version.encode());
        self.batch.put_cf(cf(db, codec::CF_HISTORY), codec::history_key(self.main, self.sub), key);
        self.sub += 1;
        let old_lease = previous.as_ref().map_or(0, |previous| previous.lease);
        if old_lease != 0 && old_lease != version.lease {
            self.batch.delete_cf(cf(db, codec::CF_LEASE_KEYS), codec::lease_keys_key(old_lease, key));
        }
        if version.lease != 0 && version.lease != old_lease {
            self.batch.put_cf(cf(db, codec::CF_LEASE_KEYS), codec::lease_keys_key(version.lease, key), []);
        }
        let prev_kv = previous.map(|previous| key_value(key.to_vec(), previous, false));
        self.events.push(event(key.to_vec(), version.clone(), prev_kv));
        self.pending.insert(key.to_vec(), version);
    }

    /// A put that `check_put` accepted.
    fn put(&mut self, request: &pb::PutRequest) -> Result<pb::PutResponse> {
        let previous = self.newest_live(&request.key)?;
        let value = match (&previous, request.ignore_value) {
            (Some(previous), true) => previous.value.clone(),
            _ => request.value.clone(),
        };
        let lease = match (&previous, request.ignore_lease) {
            (Some(previous), true) => previous.lease,
            _ => request.lease,
        };
        let version = Version {
            mod_revision: self.main,
            tombstone: false,
            create_revision: previous.as_ref().map_or(self.main, |previous| previous.create_revision),
            version: previous.as_ref().map_or(1, |previous| previous.version + 1),
            lease,
            value,
        };
        let prev_kv = previous
            .clone()
            .filter(|_| request.prev_kv)
            .map(|previous| key_value(request.key.clone(), previous, false));
        self.write(&request.key, version, previous);
        Ok(pb::PutResponse { header: None, prev_kv })
    }

    fn delete_range(&mut self, request: &pb::DeleteRangeRequest) -> Result<pb::DeleteRangeResponse> {
        let mut doomed = Vec::new();
        self.scan(&KeyRange { key: &request.key, end: &request.range_end }, &mut |key, version| {
            doomed.push((key, version));
            Ok(true)
        })?;
        let mut prev_kvs = Vec::new();
        let deleted = doomed.len() as i64;
        for (key, previous) in doomed {
            if request.prev_kv {
                prev_kvs.push(key_value(key.clone(), previous.clone(), false));
            }
            self.write(&key, Version::tombstone(self.main), Some(previous));
        }
        Ok(pb::DeleteRangeResponse { header: None, deleted, prev_kvs })
    }

    fn txn(&mut self, request: &pb::TxnRequest) -> Result<pb::TxnResponse> {
        check_txn(request)?;
        // Every compare, nested ones included, sees the state before the txn; decide the
        // whole path first, then check what it will do, then do it.
        let mut path = Vec::new();
        self.choose_path(request, &mut path)?;
        let mut cursor = path.iter().copied();
        self.check_path(request, &mut cursor)?;
        let mut cursor = path.iter().copied();
        let mut response = self.run_txn(request, &mut cursor)?;
        // Every response in a txn carries the revision after the txn, as in etcd.
        let header = self.header();
        response.visit_headers(&mut |inner| *inner = header);
        Ok(response)
    }

    fn choose_path(&self, request: &pb::TxnRequest, path: &mut Vec<bool>) -> Result<()> {
        let mut succeeded = true;
        for compare in &request.compare {
            if !self.compare(compare)? {
                succeeded = false;
                break;
            }
        }
        path.push(succeeded);
        for op in branch(request, succeeded) {
            if let Some(pb::request_op::Request::RequestTxn(nested)) = &op.request {
                self.choose_path(nested, path)?;
            }
        }
        Ok(())
    }

    fn check_path(&self, request: &pb::TxnRequest, path: &mut impl Iterator<Item = bool>) -> Result<()> {
        let succeeded = path.next().unwrap_or(false);
        for op in branch(request, succeeded) {
            match &op.request {
                Some(pb::request_op::Request::RequestPut(put)) => self.check_put(put)?,
                Some(pb::request_op::Request::RequestDeleteRange(delete)) => check_key(&delete.key)?,
                Some(pb::request_op::Request::RequestRange(range)) => {
                    check_key(&range.key)?;
                    self.reader.check_revision(range.revision, self.revision)?;
                }
                Some(pb::request_op::Request::RequestTxn(nested)) => self.check_path(nested, path)?,
                None => {}
            }
        }
        Ok(())
    }

    fn run_txn(&mut self, request: &pb::TxnRequest, path: &mut impl Iterator<Item = bool>) -> Result<pb::TxnResponse> {
        use pb::request_op::Request;
        use pb::response_op::Response;
        let succeeded = path.next().unwrap_or(false);
        let mut responses = Vec::new();
        for op in branch(request, succeeded) {
            let response = match &op.request {
                Some(Request::RequestRange(range)) => {
                    let current = self.revision_now();
                    let response = if range.revision <= 0 || range.revision >= current {
                        range_in(self, range, current)?
                    } else {
                        let view = AtRevision { reader: &self.reader, revision: range.revision };
                        range_in(&view, range, current)?
                    };
                    Response::ResponseRange(response)
                }
                Some(Request::RequestPut(put)) => Response::ResponsePut(self.put(put)?),
                Some(Request::RequestDeleteRange(delete)) => Response::ResponseDeleteRange(self.delete_range(delete)?),
                Some(Request::RequestTxn(nested)) => Response::ResponseTxn(self.run_txn(nested, path)?),
                None => continue,
            };
            responses.push(pb::ResponseOp { response: Some(response) });
        }
        Ok(pb::TxnResponse { header: None, succeeded, responses })
    }

    /// etcd's compare: true when every key in the range satisfies it; a VALUE compare on no
    /// keys is false, other targets compare against a key that does not exist (all zero).
    fn compare(&self, compare: &pb::Compare) -> Result<bool> {
        use pb::compare::{CompareResult, CompareTarget, TargetUnion};
        let target = CompareTarget::try_from(compare.target).unwrap_or(CompareTarget::Version);
        let result = CompareResult::try_from(compare.result).unwrap_or(CompareResult::Equal);
        let mut versions = Vec::new();
        self.scan(&KeyRange { key: &compare.key, end: &compare.range_end }, &mut |_, version| {
            versions.push(version);
            Ok(true)
        })?;
        if versions.is_empty() {
            if target == CompareTarget::Value {
                return Ok(false);
            }
            versions.push(Version::tombstone(0));
        }
        let holds = |ordering: std::cmp::Ordering| match result {
            CompareResult::Equal => ordering.is_eq(),
            CompareResult::NotEqual => ordering.is_ne(),
            CompareResult::Greater => ordering.is_gt(),
            CompareResult::Less => ordering.is_lt(),
        };
        let wanted = compare.target_union.as_ref();
        Ok(versions.iter().all(|version| {
            let ordering = match (target, wanted) {
                (CompareTarget::Value, Some(TargetUnion::Value(value))) => {
                    version.value.as_slice().cmp(value.as_slice())
                }
                (CompareTarget::Value, _) => version.value.as_slice().cmp(&[]),
                (CompareTarget::Version, _) => version.version.cmp(&int_target(wanted)),
                (CompareTarget::Create, _) => version.create_revision.cmp(&int_target(wanted)),
                (CompareTarget::Mod, _) => version.mod_revision.cmp(&int_target(wanted)),
                (CompareTarget::Lease, _) => version.lease.cmp(&int_target(wanted)),
            };
            holds(ordering)
        }))
    }

    fn lease_grant(&mut self, request: &pb::LeaseGrantRequest) -> Result<()> {
        if request.id <= 0 {
            return Err(StoreError::LeaseIdInvalid { id: request.id });
        }
        if request.ttl > LEASE_TTL_SECS_MAX {
            return Err(StoreError::LeaseTtlTooLarge { ttl_secs: request.ttl, max_secs: LEASE_TTL_SECS_MAX });
        }
        if self.reader.lease(request.id)?.is_some() {
            return Err(StoreError::LeaseExists { id: request.id });
        }
        let db = self.store.db();
        self.batch.put_cf(cf(db, codec::CF_LEASE), codec::lease_key(request.id), request.ttl.to_be_bytes());
        Ok(())
    }

    /// Deletes the lease and every key attached to it, all at one revision.
    fn lease_revoke(&mut self, id: i64) -> Result<()> {
        if self.reader.lease(id)?.is_none() {
            return Err(StoreError::LeaseNotFound { id });
        }
        for key in self.reader.lease_keys(id)? {
            if let Some(previous) = self.newest_live(&key)? {
                self.write(&key, Version::tombstone(self.main), Some(previous));
            }
        }
        let db = self.store.db();
        self.batch.delete_cf(cf(db, codec::CF_LEASE), codec::lease_key(id));
        Ok(())
    }
}

impl LiveKeys for Apply<'_> {
    /// The newest state: committed keys merged with this write's pending ones.
    fn scan(&self, range: &KeyRange, visit: &mut dyn FnMut(Vec<u8>, Version) -> Result<bool>) -> Result<()> {
        if range.end.is_empty() {
            if let Some(version) = self.newest_live(range.key)? {
                visit(range.key.to_vec(), version)?;
            }
            return Ok(());
        }
        let in_range: Vec<(&Vec<u8>, &Version)> = self.pending.iter().filter(|(key, _)| range.contains(key)).collect();
        let mut pending = in_range.into_iter().peekable();
        let mut stopped = false;
        self.reader.scan_at(range, self.revision, &mut |key, version| {
            while let Some((pending_key, pending_version)) = pending.next_if(|(pending_key, _)| **pending_key < key) {
                if !pending_version.tombstone && !visit(pending_key.clone(), pending_version.clone())? {
                    stopped = true;
                    return Ok(false);
                }
            }
            if let Some((_, pending_version)) = pending.next_if(|(pending_key, _)| **pending_key == key) {
                if pending_version.tombstone {
                    return Ok(true);
                }
                let keep_going = visit(key, pending_version.clone())?;
                stopped = !keep_going;
                return Ok(keep_going);
            }
            let keep_going = visit(key, version)?;
            stopped = !keep_going;
            Ok(keep_going)
        })?;
        if !stopped {
            for (key, version) in pending {
                if !version.tombstone && !visit(key.clone(), version.clone())? {
                    break;
                }
            }
        }
        Ok(())
    }
}

fn int_target(wanted: Option<&pb::compare::TargetUnion>) -> i64 {
    use pb::compare::TargetUnion;
    match wanted {
        Some(
            TargetUnion::Version(n)
            | TargetUnion::CreateRevision(n)
            | TargetUnion::ModRevision(n)
            | TargetUnion::Lease(n),
        ) => *n,
        _ => 0,
    }
}

fn branch(request: &pb::TxnRequest, succeeded: bool) -> &[pb::RequestOp] {
    if succeeded {
        &request.success
    } else {
        &request.failure
    }
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::KeyNotProvided);
    }
    Ok(())
}

/// etcd's txn checks: op counts per level and no key written twice on one path (a put of a
/// key that another put, or a delete range, of the same txn also touches).
pub fn check_txn(request: &pb::TxnRequest) -> Result<()> {
    check_txn_writes(request).map(|_| ())
}

/// The puts and delete ranges a txn may do, for the duplicate check of the level above.
struct Writes {
    puts: Vec<Vec<u8>>,
    deletes: Vec<(Vec<u8>, Vec<u8>)>,
}

fn check_txn_writes(request: &pb::TxnRequest) -> Result<Writes> {
    for count in [request.compare.len(), request.success.len(), request.failure.len()] {
        if count > TXN_OPS_MAX {
            return Err(StoreError::TooManyOps { ops: count, max: TXN_OPS_MAX });
        }
    }
    let mut all = Writes { puts: Vec::new(), deletes: Vec::new() };
    for ops in [&request.success, &request.failure] {
        let writes = check_branch_writes(ops)?;
        all.puts.extend(writes.puts);
        all.deletes.extend(writes.deletes);
    }
    Ok(all)
}

fn check_branch_writes(ops: &[pb::RequestOp]) -> Result<Writes> {
    use pb::request_op::Request;
    let mut puts: Vec<Vec<u8>> = Vec::new();
    let mut deletes = Vec::new();
    for op in ops {
        match &op.request {
            Some(Request::RequestPut(put)) => {
                if puts.contains(&put.key) {
                    return Err(StoreError::DuplicateKey);
                }
                puts.push(put.key.clone());
            }
            Some(Request::RequestDeleteRange(delete)) => deletes.push((delete.key.clone(), delete.range_end.clone())),
            Some(Request::RequestTxn(nested)) => {
                let nested = check_txn_writes(nested)?;
                if nested.puts.iter().any(|key| puts.contains(key)) {
                    return Err(StoreError::DuplicateKey);
                }
                puts.extend(nested.puts);
                deletes.extend(nested.deletes);
            }
            Some(Request::RequestRange(_)) | None => {}
        }
    }
    for (key, end) in &deletes {
        let range = KeyRange { key, end };
        if puts.iter().any(|put| range.contains(put)) {
            return Err(StoreError::DuplicateKey);
        }
    }
    Ok(Writes { puts, deletes })
}
