//! Export and import: a store copied through a snapshot file is the same store, and a
//! damaged snapshot file is refused without touching the store it was meant for.

use capstan_proto::etcdserverpb as pb;
use capstan_proto::raftpb::{command, Command};
use capstan_store::{Store, StoreError};

fn apply(store: &Store, request: command::Request) {
    let applied = store
        .apply(&Command { request: Some(request), caller: None, origin: 0 }, &[(b"caller/marker", b"m".to_vec())])
        .unwrap();
    applied.response.unwrap();
}

fn put(key: &str, value: &str, lease: i64) -> command::Request {
    command::Request::Put(pb::PutRequest { key: key.into(), value: value.into(), lease, ..Default::default() })
}

fn everything(store: &Store) -> pb::RangeResponse {
    let mut response =
        store.range(&pb::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() }).unwrap();
    response.header = None;
    response
}

fn populated(dir: &std::path::Path) -> Store {
    let store = Store::open(dir, &[]).unwrap();
    apply(&store, command::Request::LeaseGrant(pb::LeaseGrantRequest { id: 7, ttl: 60 }));
    for index in 0..50 {
        apply(&store, put(&format!("key/{index:02}"), &format!("v{index}"), if index % 5 == 0 { 7 } else { 0 }));
    }
    apply(&store, put("key/01", "again", 0));
    apply(&store, command::Request::DeleteRange(pb::DeleteRangeRequest { key: "key/02".into(), ..Default::default() }));
    apply(&store, command::Request::Compaction(pb::CompactionRequest { revision: 20, physical: true }));
    store
}

#[test]
fn a_store_copied_through_a_snapshot_is_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let source = populated(&dir.path().join("source"));
    let file = dir.path().join("snap");
    let exported = source.export(&file, &[b"caller/marker"]).unwrap();
    assert_eq!(exported.meta, vec![Some(b"m".to_vec())]);
    assert_eq!(exported.bytes, std::fs::metadata(&file).unwrap().len());

    // Import over a store with other content: nothing of it may survive.
    let target = Store::open(&dir.path().join("target"), &[]).unwrap();
    apply(&target, put("stale", "x", 0));
    target.import(&file).unwrap();
    assert_eq!(everything(&target), everything(&source));
    assert_eq!(target.revision(), source.revision());
    assert_eq!(target.compacted_revision(), 20);
    assert_eq!(target.reader().leases().unwrap(), vec![(7, 60)]);
    assert_eq!(target.reader().lease_keys(7).unwrap().len(), 10);
    assert_eq!(target.reader().meta(b"caller/marker").unwrap(), Some(b"m".to_vec()));
    let history = target.events(20, usize::MAX).unwrap();
    assert_eq!(history.events, source.events(20, usize::MAX).unwrap().events);
    let hash = source.reader().hash_kv(0).unwrap();
    assert_eq!(target.reader().hash_kv(0).unwrap(), hash, "replicas with the same content hash alike");
    assert_eq!(hash.1, 20, "with the compacted revision");
    assert!(matches!(target.reader().hash_kv(19), Err(StoreError::Compacted { compacted: 20 })));
    let older = target.reader().hash_kv(target.revision() - 1).unwrap();
    assert_ne!(older.0, hash.0, "an older revision hashes differently");

    // It survives a reopen, and goes on from the same revision.
    drop(target);
    let reopened = Store::open(&dir.path().join("target"), &[]).unwrap();
    assert_eq!(everything(&reopened), everything(&source));
    apply(&reopened, put("next", "n", 0));
    assert_eq!(reopened.revision(), source.revision() + 1);
    assert_eq!(reopened.reader().hash_kv(source.revision()).unwrap(), hash, "a later write leaves the past's hash");
    assert_ne!(reopened.reader().hash_kv(0).unwrap(), hash);
}

#[test]
fn an_import_forgets_the_versions_the_store_wrote_before() {
    let dir = tempfile::tempdir().unwrap();
    let source = populated(&dir.path().join("source"));
    let file = dir.path().join("snap");
    source.export(&file, &[]).unwrap();
    let target = Store::open(&dir.path().join("target"), &[]).unwrap();
    for round in 0..5 {
        apply(&target, put("key/03", &format!("target's {round}"), 0));
    }
    target.import(&file).unwrap();

    // The next put of the key replaces the imported version, not the one the target wrote.
    let next = || {
        let request =
            pb::PutRequest { key: "key/03".into(), value: "next".into(), prev_kv: true, ..Default::default() };
        Command { request: Some(command::Request::Put(request)), caller: None, origin: 0 }
    };
    let response = |store: &Store| store.apply(&next(), &[]).unwrap().response.unwrap();
    assert_eq!(response(&target), response(&source));
    assert_eq!(everything(&target), everything(&source));
}

#[test]
fn a_damaged_snapshot_is_refused_and_the_store_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let source = populated(&dir.path().join("source"));
    let file = dir.path().join("snap");
    source.export(&file, &[]).unwrap();
    let good = std::fs::read(&file).unwrap();
    let target = Store::open(&dir.path().join("target"), &[]).unwrap();
    apply(&target, put("mine", "kept", 0));
    let before = everything(&target);

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    let cases: [(&str, Vec<u8>); 4] = [
        ("flipped byte", flipped),
        ("truncated", good[..good.len() - 20].to_vec()),
        ("not a snapshot", b"hello world, not a snapshot at all".to_vec()),
        ("trailing garbage", [good.as_slice(), b"x"].concat()),
    ];
    for (what, bytes) in cases {
        std::fs::write(&file, bytes).unwrap();
        let refused = target.import(&file);
        assert!(matches!(refused, Err(StoreError::SnapshotInvalid(_))), "{what}: {refused:?}");
        assert_eq!(everything(&target), before, "{what} must not touch the store");
    }
}
