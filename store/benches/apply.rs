//! The store's apply and read paths on RocksDB, without Raft or gRPC: puts per second
//! (100-byte values, no fsync: the Raft log carries durability) and ranges per second
//! (a point read and a 100-key range over 10,000 keys).
//!
//! Run: `cargo bench -p capstan-store --bench apply`.

use capstan_proto::etcdserverpb as pb;
use capstan_proto::raftpb::{command, Command};
use capstan_store::Store;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const KEYS: usize = 10_000;
const VALUE_BYTES: usize = 100;

fn put(key: String) -> Command {
    Command {
        request: Some(command::Request::Put(pb::PutRequest {
            key: key.into_bytes(),
            value: vec![b'v'; VALUE_BYTES],
            ..Default::default()
        })),
        caller: None,
        origin: 0,
    }
}

fn loaded_store(dir: &std::path::Path) -> Store {
    let store = Store::open(dir, &[]).expect("open store");
    for index in 0..KEYS {
        store.apply(&put(format!("key/{index:06}")), &[]).expect("apply");
    }
    store
}

fn bench_puts(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &[]).unwrap();
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    group.bench_function("put_100b", |b| {
        b.iter_batched(
            || {
                next += 1;
                put(format!("key/{:06}", next % KEYS))
            },
            |command| store.apply(&command, &[]).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn bench_ranges(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = loaded_store(dir.path());
    let mut group = c.benchmark_group("range");
    group.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    group.bench_function("point", |b| {
        b.iter(|| {
            next = (next + 7919) % KEYS;
            let request = pb::RangeRequest { key: format!("key/{next:06}").into_bytes(), ..Default::default() };
            let response = store.range(&request).unwrap();
            assert_eq!(response.kvs.len(), 1);
        })
    });
    group.bench_function("100_keys", |b| {
        b.iter(|| {
            next = (next + 7919) % (KEYS - 100);
            let request = pb::RangeRequest {
                key: format!("key/{next:06}").into_bytes(),
                range_end: format!("key/{:06}", next + 100).into_bytes(),
                ..Default::default()
            };
            let response = store.range(&request).unwrap();
            assert_eq!(response.kvs.len(), 100);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_puts, bench_ranges);
criterion_main!(benches);
