//! The store against a model: random sequences of puts, deletes, txns, ranges (at old
//! revisions too), compactions, lease grants and revokes, and restarts (RocksDB closed
//! and reopened) are applied to both, the writes one by one or in runs of many (as Raft
//! batch entries are); every response, revision and watch event must be the same. The model is the plainest thing that can be right: a full copy of the key
//! space for every revision.

use std::collections::BTreeMap;

use capstan_proto::etcdserverpb as pb;
use capstan_proto::mvccpb::{self, event::EventType, KeyValue};
use capstan_proto::raftpb::{command, Command};
use capstan_store::{CommandResponse, Store, StoreError};
use proptest::prelude::*;

const KEYS: [&[u8]; 6] = [b"a", b"a\0", b"ab", b"b", b"b\0c", b"c"];

type State = BTreeMap<Vec<u8>, KeyValue>;

#[derive(Debug, Clone)]
enum Op {
    Put { key: usize, value: u8, lease: Option<usize>, prev_kv: bool },
    Delete { key: usize, end: End, prev_kv: bool },
    Range { key: usize, end: End, back: i64, limit: i64 },
    Txn { compare_key: usize, compare: Cmp, success: Vec<TxnStep>, failure: Vec<TxnStep> },
    Compact { back: i64 },
    Grant { lease: usize },
    Revoke { lease: usize },
    Restart,
}

#[derive(Debug, Clone, Copy)]
enum End {
    Single,
    Prefix,
    FromKey,
    To(usize),
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    ValueEquals(u8),
    VersionGreater(i64),
    ModLess(i64),
    CreateEquals(i64),
}

#[derive(Debug, Clone)]
enum TxnStep {
    Put(usize, u8),
    Delete(usize, End),
    /// A range at the newest revision (0), or this many revisions back from the one
    /// before the txn (1 is that one).
    Range(usize, End, i64),
}

const LEASES: [i64; 3] = [7, 8, 0x7fff_0000_0000];

fn end_strategy() -> impl Strategy<Value = End> {
    prop_oneof![Just(End::Single), Just(End::Prefix), Just(End::FromKey), (0..KEYS.len()).prop_map(End::To)]
}

fn step_strategy() -> impl Strategy<Value = TxnStep> {
    prop_oneof![
        (0..KEYS.len(), any::<u8>()).prop_map(|(key, value)| TxnStep::Put(key, value % 4)),
        (0..KEYS.len(), end_strategy()).prop_map(|(key, end)| TxnStep::Delete(key, end)),
        (0..KEYS.len(), end_strategy(), 0i64..4).prop_map(|(key, end, back)| TxnStep::Range(key, end, back)),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS.len(), any::<u8>(), proptest::option::of(0..LEASES.len()), any::<bool>())
            .prop_map(|(key, value, lease, prev_kv)| Op::Put { key, value: value % 4, lease, prev_kv }),
        2 => (0..KEYS.len(), end_strategy(), any::<bool>()).prop_map(|(key, end, prev_kv)| Op::Delete { key, end, prev_kv }),
        3 => (0..KEYS.len(), end_strategy(), 0i64..6, 0i64..3).prop_map(|(key, end, back, limit)| Op::Range { key, end, back, limit }),
        2 => (
            0..KEYS.len(),
            prop_oneof![
                any::<u8>().prop_map(|v| Cmp::ValueEquals(v % 4)),
                (0i64..3).prop_map(Cmp::VersionGreater),
                (0i64..20).prop_map(Cmp::ModLess),
                (0i64..20).prop_map(Cmp::CreateEquals),
            ],
            proptest::collection::vec(step_strategy(), 0..4),
            proptest::collection::vec(step_strategy(), 0..3),
        )
            .prop_map(|(compare_key, compare, success, failure)| Op::Txn { compare_key, compare, success, failure }),
        1 => (0i64..8).prop_map(|back| Op::Compact { back }),
        1 => (0..LEASES.len()).prop_map(|lease| Op::Grant { lease }),
        1 => (0..LEASES.len()).prop_map(|lease| Op::Revoke { lease }),
        1 => Just(Op::Restart),
    ]
}

fn range_end(key: usize, end: End) -> Vec<u8> {
    match end {
        End::Single => Vec::new(),
        End::FromKey => vec![0],
        End::Prefix => {
            let mut end = KEYS[key].to_vec();
            // Every test key's last byte is below 0xff, so bumping it gives the prefix end.
            *end.last_mut().unwrap() += 1;
            end
        }
        End::To(other) => KEYS[other].to_vec(),
    }
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        end => key >= start && key < end,
    }
}

/// The model store: every revision's full state.
struct Model {
    states: BTreeMap<i64, State>,
    revision: i64,
    compacted: i64,
    leases: BTreeMap<i64, i64>,
    events: BTreeMap<i64, Vec<mvccpb::Event>>,
}

/// A model error: the store's error kind, by name.
type ModelResult<T> = Result<T, &'static str>;

fn kind(error: &StoreError) -> &'static str {
    match error {
        StoreError::Compacted { .. } => "compacted",
        StoreError::FutureRevision { .. } => "future",
        StoreError::LeaseNotFound { .. } => "lease-not-found",
        StoreError::LeaseExists { .. } => "lease-exists",
        StoreError::DuplicateKey => "duplicate",
        other => panic!("unexpected store error {other}"),
    }
}

/// A txn (or a lone write) being applied to the model.
struct Draft {
    state: State,
    revision: i64,
    wrote: bool,
    events: Vec<mvccpb::Event>,
}

impl Draft {
    fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Option<KeyValue> {
        let previous = self.state.get(key).cloned();
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: previous.as_ref().map_or(self.revision, |p| p.create_revision),
            mod_revision: self.revision,
            version: previous.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        self.events.push(mvccpb::Event {
            r#type: EventType::Put as i32,
            kv: Some(kv.clone()),
            prev_kv: previous.clone(),
        });
        self.state.insert(key.to_vec(), kv);
        self.wrote = true;
        previous
    }

    fn delete(&mut self, start: &[u8], end: &[u8]) -> Vec<KeyValue> {
        let doomed: Vec<KeyValue> = self.state.values().filter(|kv| in_range(&kv.key, start, end)).cloned().collect();
        for previous in &doomed {
            self.state.remove(&previous.key);
            let tombstone = KeyValue { key: previous.key.clone(), mod_revision: self.revision, ..Default::default() };
            self.events.push(mvccpb::Event {
                r#type: EventType::Delete as i32,
                kv: Some(tombstone),
                prev_kv: Some(previous.clone()),
            });
            self.wrote = true;
        }
        doomed
    }
}

impl Model {
    fn new() -> Model {
        Model {
            states: BTreeMap::from([(1, State::new())]),
            revision: 1,
            compacted: 0,
            leases: BTreeMap::new(),
            events: BTreeMap::new(),
        }
    }

    fn current(&self) -> &State {
        self.states.get(&self.revision).unwrap()
    }

    fn state_at(&self, revision: i64) -> &State {
        self.states.range(..=revision).next_back().unwrap().1
    }

    fn draft(&self) -> Draft {
        Draft { state: self.current().clone(), revision: self.revision + 1, wrote: false, events: Vec::new() }
    }

    fn commit(&mut self, draft: Draft) {
        if draft.wrote {
            self.revision = draft.revision;
            self.states.insert(draft.revision, draft.state);
            self.events.insert(draft.revision, draft.events);
        }
    }

    fn range(&self, state: &State, request: &pb::RangeRequest) -> pb::RangeResponse {
        let all: Vec<KeyValue> =
            state.values().filter(|kv| in_range(&kv.key, &request.key, &request.range_end)).cloned().collect();
        let count = all.len() as i64;
        let mut kvs = all;
        let mut more = false;
        if request.limit > 0 && kvs.len() > request.limit as usize {
            kvs.truncate(request.limit as usize);
            more = true;
        }
        pb::RangeResponse { header: None, kvs, more, count }
    }

    fn read(&self, request: &pb::RangeRequest) -> ModelResult<pb::RangeResponse> {
        let revision = if request.revision <= 0 { self.revision } else { request.revision };
        if revision > self.revision {
            return Err("future");
        }
        if revision < self.compacted {
            return Err("compacted");
        }
        Ok(self.range(self.state_at(revision), request))
    }

    fn txn_is_valid(steps: &[TxnStep]) -> bool {
        let puts: Vec<usize> =
            steps.iter().filter_map(|s| if let TxnStep::Put(k, _) = s { Some(*k) } else { None }).collect();
        let mut seen = std::collections::BTreeSet::new();
        if puts.iter().any(|key| !seen.insert(KEYS[*key])) {
            return false;
        }
        !steps.iter().any(|step| match step {
            TxnStep::Delete(key, end) => {
                puts.iter().any(|put| in_range(KEYS[*put], KEYS[*key], &range_end(*key, *end)))
            }
            _ => false,
        })
    }

    fn compare(&self, key: &[u8], compare: Cmp) -> bool {
        let kv = self.current().get(key);
        match compare {
            Cmp::ValueEquals(value) => kv.is_some_and(|kv| kv.value == [value]),
            Cmp::VersionGreater(n) => kv.map_or(0, |kv| kv.version) > n,
            Cmp::ModLess(n) => kv.map_or(0, |kv| kv.mod_revision) < n,
            Cmp::CreateEquals(n) => kv.map_or(0, |kv| kv.create_revision) == n,
        }
    }
}

/// The revision a txn's range `back` revisions back reads, the txn coming at `revision + 1`.
fn txn_range_revision(revision: i64, back: i64) -> i64 {
    if back == 0 {
        0
    } else {
        (revision - back + 1).max(1)
    }
}

fn to_request_op(step: &TxnStep, revision: i64) -> pb::RequestOp {
    use pb::request_op::Request;
    let request = match step {
        TxnStep::Put(key, value) => {
            Request::RequestPut(pb::PutRequest { key: KEYS[*key].to_vec(), value: vec![*value], ..Default::default() })
        }
        TxnStep::Delete(key, end) => Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: KEYS[*key].to_vec(),
            range_end: range_end(*key, *end),
            prev_kv: true,
        }),
        TxnStep::Range(key, end, back) => Request::RequestRange(pb::RangeRequest {
            key: KEYS[*key].to_vec(),
            range_end: range_end(*key, *end),
            revision: txn_range_revision(revision, *back),
            ..Default::default()
        }),
    };
    pb::RequestOp { request: Some(request) }
}

fn to_compare(key: usize, compare: Cmp) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let (target, result, union) = match compare {
        Cmp::ValueEquals(v) => (CompareTarget::Value, CompareResult::Equal, TargetUnion::Value(vec![v])),
        Cmp::VersionGreater(n) => (CompareTarget::Version, CompareResult::Greater, TargetUnion::Version(n)),
        Cmp::ModLess(n) => (CompareTarget::Mod, CompareResult::Less, TargetUnion::ModRevision(n)),
        Cmp::CreateEquals(n) => (CompareTarget::Create, CompareResult::Equal, TargetUnion::CreateRevision(n)),
    };
    pb::Compare {
        result: result as i32,
        target: target as i32,
        key: KEYS[key].to_vec(),
        target_union: Some(union),
        range_end: Vec::new(),
    }
}

/// Applies `op` to the model and returns what the store must answer.
fn model_apply(model: &mut Model, op: &Op) -> ModelResult<CommandResponse> {
    use pb::response_op::Response;
    match op {
        Op::Put { key, value, lease, prev_kv } => {
            let lease = lease.map_or(0, |index| LEASES[index]);
            if lease != 0 && !model.leases.contains_key(&lease) {
                return Err("lease-not-found");
            }
            let mut draft = model.draft();
            let previous = draft.put(KEYS[*key], vec![*value], lease);
            model.commit(draft);
            Ok(CommandResponse::Put(pb::PutResponse { header: None, prev_kv: previous.filter(|_| *prev_kv) }))
        }
        Op::Delete { key, end, prev_kv } => {
            let mut draft = model.draft();
            let doomed = draft.delete(KEYS[*key], &range_end(*key, *end));
            model.commit(draft);
            Ok(CommandResponse::DeleteRange(pb::DeleteRangeResponse {
                header: None,
                deleted: doomed.len() as i64,
                prev_kvs: if *prev_kv { doomed } else { Vec::new() },
            }))
        }
        Op::Txn { compare_key, compare, success, failure } => {
            let succeeded = model.compare(KEYS[*compare_key], *compare);
            let steps = if succeeded { success } else { failure };
            if !Model::txn_is_valid(success) || !Model::txn_is_valid(failure) {
                return Err("duplicate");
            }
            let reads_compacted = steps.iter().any(|step| match step {
                TxnStep::Range(_, _, back) => {
                    let revision = txn_range_revision(model.revision, *back);
                    revision > 0 && revision < model.compacted
                }
                _ => false,
            });
            if reads_compacted {
                return Err("compacted");
            }
            let mut draft = model.draft();
            let mut responses = Vec::new();
            for step in steps {
                let response = match step {
                    TxnStep::Put(key, value) => {
                        draft.put(KEYS[*key], vec![*value], 0);
                        Response::ResponsePut(pb::PutResponse::default())
                    }
                    TxnStep::Delete(key, end) => {
                        let doomed = draft.delete(KEYS[*key], &range_end(*key, *end));
                        Response::ResponseDeleteRange(pb::DeleteRangeResponse {
                            header: None,
                            deleted: doomed.len() as i64,
                            prev_kvs: doomed,
                        })
                    }
                    TxnStep::Range(key, end, back) => {
                        let request = pb::RangeRequest {
                            key: KEYS[*key].to_vec(),
                            range_end: range_end(*key, *end),
                            ..Default::default()
                        };
                        let state = match txn_range_revision(model.revision, *back) {
                            0 => &draft.state,
                            revision => model.state_at(revision),
                        };
                        Response::ResponseRange(model.range(state, &request))
                    }
                };
                responses.push(pb::ResponseOp { response: Some(response) });
            }
            model.commit(draft);
            Ok(CommandResponse::Txn(pb::TxnResponse { header: None, succeeded, responses }))
        }
        Op::Compact { back } => {
            let revision = model.revision - back;
            if revision <= model.compacted {
                return Err("compacted");
            }
            model.compacted = revision;
            Ok(CommandResponse::Compaction(pb::CompactionResponse { header: None }))
        }
        Op::Grant { lease } => {
            let id = LEASES[*lease];
            if model.leases.insert(id, 30).is_some() {
                return Err("lease-exists");
            }
            Ok(CommandResponse::LeaseGrant(pb::LeaseGrantResponse { header: None, id, ttl: 30, error: String::new() }))
        }
        Op::Revoke { lease } => {
            let id = LEASES[*lease];
            if model.leases.remove(&id).is_none() {
                return Err("lease-not-found");
            }
            let mut draft = model.draft();
            let owned: Vec<Vec<u8>> =
                draft.state.values().filter(|kv| kv.lease == id).map(|kv| kv.key.clone()).collect();
            for key in owned {
                draft.delete(&key, &[]);
            }
            model.commit(draft);
            Ok(CommandResponse::LeaseRevoke(pb::LeaseRevokeResponse { header: None }))
        }
        Op::Range { .. } | Op::Restart => unreachable!("not a command"),
    }
}

fn to_command(op: &Op, model: &Model) -> Command {
    use command::Request;
    let request = match op {
        Op::Put { key, value, lease, prev_kv } => Request::Put(pb::PutRequest {
            key: KEYS[*key].to_vec(),
            value: vec![*value],
            lease: lease.map_or(0, |index| LEASES[index]),
            prev_kv: *prev_kv,
            ..Default::default()
        }),
        Op::Delete { key, end, prev_kv } => Request::DeleteRange(pb::DeleteRangeRequest {
            key: KEYS[*key].to_vec(),
            range_end: range_end(*key, *end),
            prev_kv: *prev_kv,
        }),
        Op::Txn { compare_key, compare, success, failure } => Request::Txn(pb::TxnRequest {
            compare: vec![to_compare(*compare_key, *compare)],
            success: success.iter().map(|step| to_request_op(step, model.revision)).collect(),
            failure: failure.iter().map(|step| to_request_op(step, model.revision)).collect(),
        }),
        Op::Compact { back } => {
            Request::Compaction(pb::CompactionRequest { revision: model.revision - back, physical: true })
        }
        Op::Grant { lease } => Request::LeaseGrant(pb::LeaseGrantRequest { id: LEASES[*lease], ttl: 30 }),
        Op::Revoke { lease } => Request::LeaseRevoke(pb::LeaseRevokeRequest { id: LEASES[*lease] }),
        Op::Range { .. } | Op::Restart => unreachable!("not a command"),
    };
    Command { request: Some(request), caller: None, origin: 0 }
}

fn strip_header(response: &mut CommandResponse) {
    match response {
        CommandResponse::Put(r) => r.header = None,
        CommandResponse::DeleteRange(r) => r.header = None,
        CommandResponse::Txn(r) => r.visit_headers(&mut |header| *header = None),
        CommandResponse::Compaction(r) => r.header = None,
        CommandResponse::LeaseGrant(r) => r.header = None,
        CommandResponse::LeaseRevoke(r) => r.header = None,
        CommandResponse::Auth(header) => *header = None,
    }
}

/// A write applied to the model, to check the store's result of the same command against.
struct Expected {
    step: usize,
    response: ModelResult<CommandResponse>,
    revision: i64,
}

/// Runs `ops` against the store and the model. With `together`, each run of writes between
/// two reads or restarts goes to the store in one `apply_all`, as a Raft batch entry does.
fn run(ops: &[Op], together: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut store = Store::open(&path, &[]).unwrap();
    let mut model = Model::new();
    let mut commands = Vec::new();
    let mut expected = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let is_write = !matches!(op, Op::Restart | Op::Range { .. });
        if is_write {
            commands.push(to_command(op, &model));
            let response = model_apply(&mut model, op);
            expected.push(Expected { step, response, revision: model.revision });
        }
        let last = step + 1 == ops.len();
        if !commands.is_empty() && (!together || !is_write || last) {
            let applied = store.apply_all(&commands, |_| Vec::new()).unwrap();
            prop_assert_eq!(applied.len(), commands.len());
            for (applied, expected) in applied.into_iter().zip(expected.drain(..)) {
                let step = expected.step;
                let actual = applied.response.map_err(|error| kind(&error)).map(|mut response| {
                    strip_header(&mut response);
                    response
                });
                prop_assert_eq!(actual, expected.response, "step {}: {:?}", step, ops[step]);
                prop_assert_eq!(applied.revision, expected.revision, "step {}", step);
                let expected_events = model.events.get(&applied.revision).filter(|_| !applied.events.is_empty());
                if let Some(expected_events) = expected_events {
                    prop_assert_eq!(&applied.events, expected_events, "events of step {}", step);
                }
            }
            commands.clear();
            prop_assert_eq!(store.revision(), model.revision);
            prop_assert_eq!(store.compacted_revision(), model.compacted);
        }
        match op {
            Op::Restart => {
                drop(store);
                store = Store::open(&path, &[]).unwrap();
            }
            Op::Range { key, end, back, limit } => {
                let request = pb::RangeRequest {
                    key: KEYS[*key].to_vec(),
                    range_end: range_end(*key, *end),
                    revision: if *back == 0 { 0 } else { model.revision - back + 1 },
                    limit: *limit,
                    ..Default::default()
                };
                let expected = model.read(&request);
                let actual = match store.range(&request) {
                    Ok(mut response) => {
                        prop_assert_eq!(response.header.as_ref().map(|h| h.revision), Some(model.revision));
                        response.header = None;
                        Ok(response)
                    }
                    Err(error) => Err(kind(&error)),
                };
                prop_assert_eq!(actual, expected, "step {}: {:?}", step, op);
            }
            _ => {}
        }
    }
    // The history from the compaction point on replays exactly the model's events.
    let from = model.compacted.max(1);
    let page = store.events(from, usize::MAX).unwrap();
    // Compaction removed what preceded the compact revision, so its events lose prev_kv,
    // as etcd's do.
    let expected: Vec<mvccpb::Event> = model
        .events
        .range(from..)
        .flat_map(|(revision, events)| {
            events.iter().cloned().map(move |mut event| {
                if *revision == model.compacted {
                    event.prev_kv = None;
                }
                event
            })
        })
        .collect();
    prop_assert_eq!(page.events, expected);
    prop_assert_eq!(page.next_revision, model.revision + 1);
    if model.compacted > 1 {
        let compacted = matches!(store.events(model.compacted - 1, 10), Err(StoreError::Compacted { .. }));
        prop_assert!(compacted, "history below the compact revision must be gone");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(ops in proptest::collection::vec(op_strategy(), 1..60), together in any::<bool>()) {
        run(&ops, together)?;
    }
}
