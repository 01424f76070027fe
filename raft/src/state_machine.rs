//! openraft's state machine over the store. Each entry is applied in one RocksDB batch
//! together with the applied log ID (and membership), so the store and Raft never disagree
//! about what has been applied. Watch events of each applied command are published on a
//! bounded broadcast channel; a watcher that falls behind reads the store's history.
//!
//! A snapshot notes how far the store has applied; its data is the store itself, exported
//! only when a follower needs it (`crate::snapshot`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use prost::Message;
use tokio::sync::broadcast;

use capstan_proto::{etcdserverpb, mvccpb, raftpb};
use capstan_store::{Applied, Store};

use crate::error::DecodeError;
use crate::log_store::Durability;
use crate::own_proposals::OwnProposals;
use crate::snapshot::{LiveStore, SnapshotData};
use crate::types::{self, Entry, NodeId, PeerNode, Response, StorageError, TypeConfig};

pub(crate) const META_APPLIED: &[u8] = b"raft/applied";
pub(crate) const META_MEMBERSHIP: &[u8] = b"raft/membership";
pub(crate) const META_BATCH_PROGRESS: &[u8] = b"raft/batch_progress";

/// The last applied log ID and the membership in force, as openraft asks for them.
pub(crate) type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, PeerNode>);

/// The applied state from the raw `META_APPLIED` and `META_MEMBERSHIP` values of one view
/// of the store.
pub(crate) fn decode_applied(
    applied: Option<&[u8]>,
    membership: Option<&[u8]>,
) -> Result<AppliedState, prost::DecodeError> {
    let applied = applied.map(raftpb::LogId::decode).transpose()?.map(|id| types::log_id_from_pb(&id));
    let membership = membership
        .map(raftpb::StoredMembership::decode)
        .transpose()?
        .map(types::stored_membership_from_pb)
        .unwrap_or_default();
    Ok((applied, membership))
}

/// The events of one applied revision, as published to watchers.
#[derive(Debug)]
pub struct RevisionEvents {
    pub revision: i64,
    pub events: Vec<mvccpb::Event>,
}

/// Entries touching up to this many keys in all, each command bounded work, are applied on
/// the async worker itself: up to a full batch of puts (the batcher's 512 commands), 2–3 ms
/// of one worker with small values. The state machine is one task, so this holds at most
/// one worker at a time, and it spares the two thread hand-offs of a blocking thread that a
/// follower otherwise paid whenever it applied several entries at once: put 16:256 4–10%
/// and put 8:64 1–9% faster than at 32, with 7–15% fewer context switches per put (session
/// 31 in BENCHMARKS.md).
const APPLY_INLINE_COMMANDS_MAX: usize = 512;

/// How many keys applying `entry` touches when each of its commands is bounded work (it
/// names single keys, or only meta); `None` when its work can grow with the store (range
/// deletes, txns with ranges, compaction, revokes).
fn small_commands(entry: &Entry) -> Option<usize> {
    use raftpb::command::Request;
    let keys = |command: &raftpb::Command| match &command.request {
        Some(Request::Put(_) | Request::LeaseGrant(_)) => Some(1),
        Some(Request::DeleteRange(delete)) if delete.range_end.is_empty() => Some(1),
        Some(Request::Txn(txn)) => txn_keys(txn),
        _ => None,
    };
    match &entry.payload {
        EntryPayload::Normal(raftpb::Command { request: Some(Request::Batch(batch)), .. }) => {
            batch.commands.iter().try_fold(0, |sum, command| Some(sum + keys(command)?))
        }
        EntryPayload::Normal(command) => keys(command),
        EntryPayload::Blank | EntryPayload::Membership(_) => Some(1),
    }
}

/// How many keys a txn touches at most when every compare and every operation names one
/// key (a compare-and-put, say); `None` when one names a range.
fn txn_keys(txn: &etcdserverpb::TxnRequest) -> Option<usize> {
    use etcdserverpb::request_op::Request;
    let compares = txn.compare.iter().all(|compare| compare.range_end.is_empty()).then_some(txn.compare.len())?;
    let op_keys = |op: &etcdserverpb::RequestOp| match &op.request {
        Some(Request::RequestPut(_)) => Some(1),
        Some(Request::RequestRange(range)) if range.range_end.is_empty() => Some(1),
        Some(Request::RequestDeleteRange(delete)) if delete.range_end.is_empty() => Some(1),
        Some(Request::RequestTxn(txn)) => txn_keys(txn),
        _ => None,
    };
    let branch = |ops: &[etcdserverpb::RequestOp]| ops.iter().try_fold(0, |sum, op| Some(sum + op_keys(op)?));
    Some(compares + branch(&txn.success)?.max(branch(&txn.failure)?))
}

/// The state machine: the store plus where its snapshot exports go.
#[derive(Clone)]
pub struct StateMachine {
    store: Store,
    snapshot_dir: PathBuf,
    /// The newest snapshot taken or installed since the plane started.
    current: Arc<Mutex<Option<SnapshotMeta<NodeId, PeerNode>>>>,
    events: broadcast::Sender<Arc<RevisionEvents>>,
    metrics: crate::StorageMetrics,
    /// How far the log is durable: an entry is applied only once it is.
    durability: Durability,
    /// This plane's clients waiting on the commands they proposed.
    own: Arc<OwnProposals>,
    /// How far into a batch entry the store got before this process started (a crash cut
    /// it short) or as of the snapshot installed last: read from the store then, and not
    /// on every batch, since a batch this process applies is never left half done.
    cut_short: Arc<Mutex<Option<raftpb::BatchProgress>>>,
}

/// Fills a new plane's store from a backup (a snapshot file `capstan ctl snapshot save`
/// wrote): the keys, their revisions and the leases, without the old cluster's Raft state,
/// so the plane bootstraps a new cluster on that content. Returns the backup's SHA-256.
pub(crate) fn import_backup(
    store: &Store,
    backup: &std::path::Path,
) -> Result<capstan_store::BackupDigest, capstan_store::StoreError> {
    store.import_backup(backup, &[META_APPLIED, META_MEMBERSHIP, META_BATCH_PROGRESS])
}

fn sm_error(verb: ErrorVerb, error: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::StateMachine, verb, openraft::AnyError::new(&error)).into()
}

pub(crate) fn snapshot_error(verb: ErrorVerb, error: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::Snapshot(None), verb, openraft::AnyError::new(&error)).into()
}

impl StateMachine {
    pub fn new(
        store: Store,
        snapshot_dir: PathBuf,
        events: broadcast::Sender<Arc<RevisionEvents>>,
        metrics: crate::StorageMetrics,
        durability: Durability,
        own: Arc<OwnProposals>,
    ) -> Result<StateMachine, StorageError> {
        // What is there is left over: exports a stop cut short, or an earlier version's
        // snapshot files.
        match std::fs::remove_dir_all(&snapshot_dir) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(snapshot_error(ErrorVerb::Delete, error))
            }
            _ => {}
        }
        std::fs::create_dir_all(&snapshot_dir).map_err(|error| snapshot_error(ErrorVerb::Write, error))?;
        let machine = StateMachine {
            store,
            snapshot_dir,
            current: Arc::default(),
            events,
            metrics,
            durability,
            own,
            cut_short: Arc::default(),
        };
        machine.read_batch_progress()?;
        Ok(machine)
    }

    /// The meta value `name` of the store, decoded.
    fn read_meta<M: Message + Default>(&self, name: &[u8]) -> Result<Option<M>, StorageError> {
        let raw = self.store.reader().meta(name).map_err(|error| sm_error(ErrorVerb::Read, error))?;
        raw.map(|raw| M::decode(raw.as_slice()))
            .transpose()
            .map_err(|error| sm_error(ErrorVerb::Read, DecodeError::from(error)))
    }

    fn read_applied(&self) -> Result<AppliedState, StorageError> {
        let reader = self.store.reader();
        let read = |name| reader.meta(name).map_err(|error| sm_error(ErrorVerb::Read, error));
        decode_applied(read(META_APPLIED)?.as_deref(), read(META_MEMBERSHIP)?.as_deref())
            .map_err(|error| sm_error(ErrorVerb::Read, DecodeError::from(error)))
    }

    fn apply_entry(&self, entry: Entry) -> Result<Response, StorageError> {
        let applied_id = types::log_id_to_pb(&entry.log_id).encode_to_vec();
        let mut meta: Vec<(&[u8], Vec<u8>)> = vec![(META_APPLIED, applied_id.clone())];
        match entry.payload {
            EntryPayload::Normal(raftpb::Command { request: Some(raftpb::command::Request::Batch(batch)), .. }) => {
                self.apply_batch(&entry.log_id, batch.commands)
            }
            EntryPayload::Normal(command) => {
                let (result, revision) = self.apply_command(&command, &meta)?;
                Ok(Response { result: Some(result), batch: Vec::new(), revision })
            }
            EntryPayload::Membership(membership) => {
                let stored = StoredMembership::new(Some(entry.log_id), membership);
                meta.push((META_MEMBERSHIP, types::stored_membership_to_pb(&stored).encode_to_vec()));
                self.store.put_meta(&meta).map_err(|error| sm_error(ErrorVerb::Write, error))?;
                Ok(Response { result: None, batch: Vec::new(), revision: self.store.revision() })
            }
            EntryPayload::Blank => {
                self.store.put_meta(&meta).map_err(|error| sm_error(ErrorVerb::Write, error))?;
                Ok(Response { result: None, batch: Vec::new(), revision: self.store.revision() })
            }
        }
    }

    /// Applies one command with `meta` in the same write, and publishes its events.
    fn apply_command(
        &self,
        command: &raftpb::Command,
        meta: &[(&[u8], Vec<u8>)],
    ) -> Result<(capstan_store::Result<capstan_store::CommandResponse>, i64), StorageError> {
        let applied = self.store.apply(command, meta).map_err(|error| sm_error(ErrorVerb::Write, error))?;
        Ok(self.publish(command, applied))
    }

    /// Publishes the events of an applied command and answers its proposer if it waits on
    /// this plane; returns its response and revision.
    fn publish(
        &self,
        command: &raftpb::Command,
        applied: Applied,
    ) -> (capstan_store::Result<capstan_store::CommandResponse>, i64) {
        if !applied.events.is_empty() {
            // No receivers is fine: nobody watches.
            let _ = self.events.send(Arc::new(RevisionEvents { revision: applied.revision, events: applied.events }));
        }
        if let Ok(response) = &applied.response {
            self.own.applied(command.origin, response);
        }
        (applied.response, applied.revision)
    }

    /// Applies a batch entry, command by command, each at its own revision; the store
    /// commits runs of them in one write (`Store::apply_all`). Each write but the last
    /// records how far into the batch it got (`META_BATCH_PROGRESS`); the last records the
    /// entry as applied. A batch cut short by a crash (or a snapshot taken meanwhile, which
    /// carries the progress) is therefore resumed, never applied twice.
    fn apply_batch(&self, log_id: &LogId<NodeId>, commands: Vec<raftpb::Command>) -> Result<Response, StorageError> {
        let entry_id = types::log_id_to_pb(log_id);
        let start = self.batch_progress(&entry_id).map_or(0, |done| done as usize + 1).min(commands.len());
        // Applied before a restart; their clients are gone with the old process.
        let mut results: Vec<_> = (0..start).map(|_| Err(capstan_store::StoreError::BatchNotUnrolled)).collect();
        let mut revision = self.store.revision();
        if start == commands.len() {
            self.store
                .put_meta(&[(META_APPLIED, entry_id.encode_to_vec())])
                .map_err(|error| sm_error(ErrorVerb::Write, error))?;
            return Ok(Response { result: None, batch: results, revision });
        }
        let last = commands.len() - 1;
        let meta_at = |offset: usize| -> Vec<(&[u8], Vec<u8>)> {
            let position = start + offset;
            if position == last {
                vec![(META_APPLIED, entry_id.encode_to_vec())]
            } else {
                let progress = raftpb::BatchProgress { entry: Some(entry_id), applied_commands: position as u64 };
                vec![(META_BATCH_PROGRESS, progress.encode_to_vec())]
            }
        };
        let applied =
            self.store.apply_all(&commands[start..], meta_at).map_err(|error| sm_error(ErrorVerb::Write, error))?;
        for (command, applied) in commands[start..].iter().zip(applied) {
            let (result, after) = self.publish(command, applied);
            results.push(result);
            revision = after;
        }
        Ok(Response { result: None, batch: results, revision })
    }

    /// The last command of batch entry `entry` applied before a restart (or in the snapshot
    /// installed last), if any.
    fn batch_progress(&self, entry: &raftpb::LogId) -> Option<u64> {
        let mut cut_short = self.cut_short.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cut_short.take_if(|progress| progress.entry.as_ref() == Some(entry)).map(|progress| progress.applied_commands)
    }

    /// Reads the store's batch progress into `cut_short`.
    fn read_batch_progress(&self) -> Result<(), StorageError> {
        let progress = self.read_meta(META_BATCH_PROGRESS)?;
        *self.cut_short.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = progress;
        Ok(())
    }

    /// This plane's snapshot data: its store.
    fn live(&self) -> Box<SnapshotData> {
        Box::new(SnapshotData::Live(LiveStore { store: self.store.clone(), dir: self.snapshot_dir.clone() }))
    }

    fn set_current(&self, meta: &SnapshotMeta<NodeId, PeerNode>) {
        *self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(meta.clone());
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Notes the log id applied so far as the snapshot, once the store is durable that far:
    /// openraft then purges the log behind it.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (last_log_id, last_membership) = self.read_applied()?;
        let db = self.store.db().clone();
        tokio::task::spawn_blocking(move || db.flush_wal(true))
            .await
            .map_err(|error| snapshot_error(ErrorVerb::Write, error))?
            .map_err(|error| snapshot_error(ErrorVerb::Write, error))?;
        let meta =
            SnapshotMeta { snapshot_id: crate::snapshot::snapshot_id(&last_log_id), last_log_id, last_membership };
        self.set_current(&meta);
        self.metrics.snapshots_built.inc();
        tracing::info!(snapshot = %meta.snapshot_id, "took a snapshot");
        Ok(Snapshot { meta, snapshot: self.live() })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, PeerNode>), StorageError> {
        self.read_applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            // The leader learns of a commit before its own copy may be durable (see
            // `log_store`); nothing is applied, so nothing answered, before it is.
            self.durability
                .until(last.log_id.index)
                .await
                .map_err(|error| sm_error(ErrorVerb::Write, std::io::Error::other(error)))?;
        }
        // Bounded commands apply faster here than the hand-off to a blocking thread and back
        // takes (each put is one lookup, mostly in memory, and the entries one unsynced
        // RocksDB batch each); more than a batch of them, or any whose work grows with the
        // store, go to a blocking thread.
        let apply_all = |this: &StateMachine, entries: Vec<Entry>| {
            crate::metrics::timed(&this.metrics.apply_seconds, || {
                entries.into_iter().map(|entry| this.apply_entry(entry)).collect()
            })
        };
        let commands = entries.iter().try_fold(0, |sum, entry| Some(sum + small_commands(entry)?));
        if commands.is_some_and(|commands| commands <= APPLY_INLINE_COMMANDS_MAX) {
            return apply_all(self, entries);
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || apply_all(&this, entries))
            .await
            .map_err(|error| sm_error(ErrorVerb::Write, error))?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let file = crate::snapshot::ReceivedFile::create(&self.snapshot_dir)
            .map_err(|error| snapshot_error(ErrorVerb::Write, error))?;
        Ok(Box::new(SnapshotData::Received(file)))
    }

    /// Replaces the store with a received export, which must have applied what `meta`
    /// says (the leader names the export's own log id).
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, PeerNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let SnapshotData::Received(received) = *snapshot else {
            return Err(snapshot_error(ErrorVerb::Write, std::io::Error::other("only a received snapshot installs")));
        };
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || {
            this.store.import(received.path()).map_err(|error| snapshot_error(ErrorVerb::Write, error))?;
            this.read_batch_progress()?;
            let (applied, _) = this.read_applied()?;
            if applied != meta.last_log_id {
                let error = format!("the snapshot {} holds a store applied to {applied:?}", meta.snapshot_id);
                return Err(snapshot_error(ErrorVerb::Read, std::io::Error::other(error)));
            }
            this.set_current(&meta);
            this.metrics.snapshots_received.inc();
            tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
            Ok(())
        })
        .await
        .map_err(|error| snapshot_error(ErrorVerb::Write, error))?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        Ok(current.map(|meta| Snapshot { meta, snapshot: self.live() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::etcdserverpb as pb;
    use openraft::{CommittedLeaderId, Entry as RaftEntry};

    fn put(key: &str, value: &str) -> raftpb::Command {
        let put = pb::PutRequest { key: key.into(), value: value.into(), ..Default::default() };
        raftpb::Command { request: Some(raftpb::command::Request::Put(put)), caller: None, origin: 0 }
    }

    /// A store in a fresh directory under the system's temp dir, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path = std::env::temp_dir().join(format!("capstan-sm-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            Scratch(path)
        }

        fn machine(&self) -> StateMachine {
            self.machine_answering(Arc::new(OwnProposals::new(1)))
        }

        fn machine_answering(&self, own: Arc<OwnProposals>) -> StateMachine {
            let store = Store::open(&self.0.join("db"), &[]).unwrap();
            // These tests apply entries directly, which does not ask how far the log is durable.
            let durability = Durability(tokio::sync::watch::channel(Ok(None)).1);
            StateMachine::new(
                store,
                self.0.join("snapshots"),
                broadcast::channel(16).0,
                Default::default(),
                durability,
                own,
            )
            .unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn only_commands_naming_single_keys_count_as_small() {
        use pb::request_op::Request as Op;
        let entry = |command: raftpb::Command| RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(command),
        };
        let txn = |txn: pb::TxnRequest| raftpb::Command {
            request: Some(raftpb::command::Request::Txn(txn)),
            caller: None,
            origin: 0,
        };
        let compare =
            |range_end: &str| pb::Compare { key: "k".into(), range_end: range_end.into(), ..Default::default() };
        let op = |request: Op| pb::RequestOp { request: Some(request) };
        let get = |range_end: &str| {
            op(Op::RequestRange(pb::RangeRequest {
                key: "k".into(),
                range_end: range_end.into(),
                ..Default::default()
            }))
        };
        let put_op = || op(Op::RequestPut(pb::PutRequest { key: "k".into(), ..Default::default() }));
        let compare_and_put =
            pb::TxnRequest { compare: vec![compare("")], success: vec![put_op()], failure: vec![get("")] };

        assert_eq!(small_commands(&entry(put("k", "v"))), Some(1));
        assert_eq!(small_commands(&entry(txn(compare_and_put.clone()))), Some(2));
        let nested = pb::TxnRequest {
            success: vec![put_op(), op(Op::RequestTxn(compare_and_put.clone()))],
            ..Default::default()
        };
        assert_eq!(small_commands(&entry(txn(nested))), Some(3));
        let batch = raftpb::CommandBatch { commands: vec![put("a", "v"), txn(compare_and_put.clone())] };
        let batch = raftpb::Command { request: Some(raftpb::command::Request::Batch(batch)), caller: None, origin: 0 };
        assert_eq!(small_commands(&entry(batch)), Some(3));

        // A range anywhere (a compare, a read, a delete, deep in a nested txn) can touch
        // any number of keys.
        let ranged_compare =
            pb::TxnRequest { compare: vec![compare("l")], success: vec![put_op()], ..Default::default() };
        assert_eq!(small_commands(&entry(txn(ranged_compare))), None);
        let ranged_read = pb::TxnRequest { failure: vec![get("l")], ..compare_and_put.clone() };
        assert_eq!(small_commands(&entry(txn(ranged_read.clone()))), None);
        let deep = pb::TxnRequest { success: vec![op(Op::RequestTxn(ranged_read))], ..Default::default() };
        assert_eq!(small_commands(&entry(txn(deep))), None);
        let delete = |range_end: &str| raftpb::Command {
            request: Some(raftpb::command::Request::DeleteRange(pb::DeleteRangeRequest {
                key: "k".into(),
                range_end: range_end.into(),
                ..Default::default()
            })),
            caller: None,
            origin: 0,
        };
        assert_eq!(small_commands(&entry(delete(""))), Some(1));
        assert_eq!(small_commands(&entry(delete("l"))), None);
    }

    #[test]
    fn a_batch_cut_short_by_a_crash_is_resumed_not_repeated() {
        let commands = vec![put("a", "1"), put("b", "2"), put("a", "3")];
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), 7);
        let entry = |commands: Vec<raftpb::Command>| RaftEntry::<TypeConfig> {
            log_id,
            payload: EntryPayload::Normal(raftpb::Command {
                request: Some(raftpb::command::Request::Batch(raftpb::CommandBatch { commands })),
                caller: None,
                origin: 0,
            }),
        };

        // Whole: each command at its own revision, each answered.
        let whole = Scratch::new("whole");
        let whole_machine = whole.machine();
        let response = whole_machine.apply_entry(entry(commands.clone())).unwrap();
        assert_eq!(response.batch.len(), 3);
        assert!(response.batch.iter().all(|result| result.is_ok()));
        assert_eq!(response.revision, 4, "three puts after the initial revision 1");
        assert_eq!(whole_machine.read_applied().unwrap().0, Some(log_id));

        // Cut short after its first command, as a crash would leave it: not yet applied.
        let resumed = Scratch::new("resumed");
        let machine = resumed.machine();
        let progress = raftpb::BatchProgress { entry: Some(types::log_id_to_pb(&log_id)), applied_commands: 0 };
        let (first, _) =
            machine.apply_command(&commands[0], &[(META_BATCH_PROGRESS, progress.encode_to_vec())]).unwrap();
        assert!(first.is_ok());
        assert_eq!(machine.read_applied().unwrap().0, None, "a partial batch is not applied");
        drop(machine);
        let machine = resumed.machine();
        let response = machine.apply_entry(entry(commands)).unwrap();
        assert!(response.batch[0].is_err(), "the command applied before the crash has no client any more");
        assert!(response.batch[1..].iter().all(|result| result.is_ok()));
        assert_eq!(response.revision, 4, "the first command is not applied twice");
        assert_eq!(machine.read_applied().unwrap().0, Some(log_id));
        let hash = |machine: &StateMachine| machine.store.reader().hash_kv(0).unwrap();
        assert_eq!(hash(&machine), hash(&whole_machine), "resumed and whole batches leave the same store");
    }

    #[test]
    fn a_command_this_plane_proposed_is_answered_as_it_applies() {
        let scratch = Scratch::new("own");
        let own = Arc::new(OwnProposals::new(1 << 20));
        let machine = scratch.machine_answering(own.clone());
        let mut alone = own.register();
        let mut batched = own.register();
        let mut refused = own.register();
        let tagged = |mut command: raftpb::Command, origin: u64| {
            command.origin = origin;
            command
        };
        let entry = |index: u64, command: raftpb::Command| RaftEntry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        };

        machine.apply_entry(entry(1, tagged(put("a", "1"), alone.origin()))).unwrap();
        let answered = alone.applied.try_recv().expect("a lone command is answered as it applies");
        let capstan_store::CommandResponse::Put(put_response) = answered else { panic!("{answered:?}") };
        assert_eq!(put_response.header.unwrap().revision, 2);

        // A lease grant of an ID already granted is refused: refusals are not passed on.
        let grant = |id: i64| raftpb::Command {
            request: Some(raftpb::command::Request::LeaseGrant(pb::LeaseGrantRequest { ttl: 10, id })),
            caller: None,
            origin: 0,
        };
        let batch =
            vec![put("b", "2"), tagged(put("c", "3"), batched.origin()), grant(5), tagged(grant(5), refused.origin())];
        let command = raftpb::Command {
            request: Some(raftpb::command::Request::Batch(raftpb::CommandBatch { commands: batch })),
            caller: None,
            origin: 0,
        };
        let response = machine.apply_entry(entry(2, command)).unwrap();
        assert!(response.batch[3].is_err(), "{:?}", response.batch[3]);
        let answered = batched.applied.try_recv().expect("a batched command is answered as it applies");
        assert_eq!(Some(&answered), response.batch[1].as_ref().ok());
        assert!(refused.applied.try_recv().is_err(), "a refusal waits for the batcher's answer");
    }

    /// A snapshot notes how far the store had applied; the data a follower gets is the
    /// store when it is sent, under the export's own (newer) log id, and it installs only
    /// if it arrived whole and holds what its meta says.
    #[tokio::test]
    async fn a_snapshot_sends_the_store_as_it_stands_and_installs_under_the_exports_own_id() {
        let (leader_dir, follower_dir) = (Scratch::new("snap-leader"), Scratch::new("snap-follower"));
        let mut leader = leader_dir.machine();
        let entry = |index: u64, command: raftpb::Command| RaftEntry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        };
        leader.apply_entry(entry(1, put("a", "1"))).unwrap();
        leader.apply_entry(entry(2, put("b", "2"))).unwrap();
        let built = leader.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id.map(|id| id.index), Some(2));
        assert_eq!(std::fs::read_dir(leader_dir.0.join("snapshots")).unwrap().count(), 0, "nothing is written out");
        leader.apply_entry(entry(3, put("c", "3"))).unwrap();

        let current = leader.get_current_snapshot().await.unwrap().expect("the snapshot taken");
        assert_eq!(current.meta, built.meta);
        let SnapshotData::Live(live) = *current.snapshot else { panic!("a plane's own snapshot is its store") };
        let (file, meta) = live.export().unwrap();
        assert_eq!(meta.last_log_id.map(|id| id.index), Some(3), "exported as the store stands");
        let bytes = std::fs::read(file.path()).unwrap();

        let mut follower = follower_dir.machine();
        let receive = |follower: &mut StateMachine, bytes: Vec<u8>| {
            let mut follower = follower.clone();
            async move {
                let SnapshotData::Received(mut received) = *follower.begin_receiving_snapshot().await.unwrap() else {
                    panic!("a file to receive into")
                };
                received.write(&bytes).await.unwrap();
                received.finish().await.map(|()| received)
            }
        };
        let cut_short = receive(&mut follower, bytes[..bytes.len() / 2].to_vec()).await;
        assert!(cut_short.is_err(), "a snapshot cut short is found before it is installed");

        let received = receive(&mut follower, bytes.clone()).await.unwrap();
        let older = SnapshotMeta { last_log_id: built.meta.last_log_id, ..meta.clone() };
        let refused = follower.install_snapshot(&older, Box::new(SnapshotData::Received(received))).await;
        assert!(refused.is_err(), "an export installed under another log id than its own is refused");

        let received = receive(&mut follower, bytes).await.unwrap();
        follower.install_snapshot(&meta, Box::new(SnapshotData::Received(received))).await.unwrap();
        assert_eq!(follower.applied_state().await.unwrap().0, meta.last_log_id);
        let all = pb::RangeRequest { key: b"a".to_vec(), range_end: b"d".to_vec(), ..Default::default() };
        assert_eq!(follower.store.reader().range(&all).unwrap().kvs.len(), 3);
        assert_eq!(follower.get_current_snapshot().await.unwrap().map(|snapshot| snapshot.meta), Some(meta));
        assert_eq!(std::fs::read_dir(follower_dir.0.join("snapshots")).unwrap().count(), 0, "received files go");
    }
}
