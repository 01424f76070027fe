//! The register workload: clients read, write and compare-and-set a few keys through one
//! plane each; every written value is unique, so a read names the write it saw. Checked
//! for linearizability key by key ([`crate::linearizability`]).

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::check::Check;
use crate::client::Session;
use crate::history::{Op, Outcome, Record};
use crate::linearizability::{check_keys, Operation, RegisterOp, Verdict};

/// Seconds each generation of keys is used for: keys rotate, so each key's history stays
/// short enough for the checker, whose search grows with the operations that overlap.
const KEY_GENERATION_SECS: u64 = 2;

/// One client: random reads, writes and CASes on `keys` keys until the deadline.
pub async fn client(mut session: Session, keys: usize, mut rng: fastrand::Rng) -> Vec<Record> {
    let mut last_seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut counter = 0u64;
    while session.run.going() {
        let Some(mut client) = session.client().await else { continue };
        let generation = session.run.clock.0.elapsed().as_secs() / KEY_GENERATION_SECS;
        let key = format!("jepsen/g{generation}/r{}", rng.usize(..keys.max(1)));
        counter += 1;
        let value = session.process as u64 * 1_000_000_000 + counter;
        let call = session.run.clock.now();
        let (op, outcome) = match (rng.u8(..3), last_seen.get(&key).copied()) {
            (0, _) => match client.get(key.as_str(), None).await {
                Ok(response) => {
                    let value =
                        response.kvs().first().and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok());
                    if let Some(seen) = value {
                        last_seen.insert(key.clone(), seen);
                    }
                    (Op::Read { key, value }, Ok(()))
                }
                Err(error) => (Op::Read { key, value: None }, Err(error)),
            },
            (1, Some(expected)) => {
                let txn = Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, expected.to_string())])
                    .and_then([TxnOp::put(key.as_str(), value.to_string(), None)]);
                match client.txn(txn).await {
                    Ok(response) => (Op::Cas { key, expected, new: value, succeeded: response.succeeded() }, Ok(())),
                    Err(error) => (Op::Cas { key, expected, new: value, succeeded: false }, Err(error)),
                }
            }
            _ => {
                let result = client.put(key.as_str(), value.to_string(), None).await.map(|_| ());
                (Op::Write { key, value }, result)
            }
        };
        let outcome = match outcome {
            Ok(()) => Outcome::Ok,
            Err(error) => session.failed(&error),
        };
        session.record(call, outcome, op);
        session.run.pace().await;
    }
    session.history
}

/// Checks every key's operations for linearizability. Failed operations did not happen;
/// reads that did not complete say nothing; writes and CASes whose outcome is unknown
/// may have taken effect at any time after their call.
pub fn check(history: &[Record]) -> Check {
    let mut keys: BTreeMap<&str, Vec<Operation<u64>>> = BTreeMap::new();
    for record in history {
        let ret = match record.outcome {
            Outcome::Ok => Some(record.ret),
            Outcome::Info => None,
            Outcome::Fail => continue,
        };
        let (key, op) = match &record.op {
            Op::Read { key, value } if ret.is_some() => (key, RegisterOp::Read { observed: *value }),
            Op::Write { key, value } => (key, RegisterOp::Write { value: *value }),
            Op::Cas { key, expected, new, succeeded } => {
                (key, RegisterOp::Cas { expected: *expected, new: *new, succeeded: *succeeded })
            }
            _ => continue,
        };
        keys.entry(key.as_str()).or_default().push(Operation { call: record.call, ret, op });
    }
    let operations: usize = keys.values().map(Vec::len).sum();
    let indeterminate = keys.values().flatten().filter(|op| op.ret.is_none()).count();
    let violation = match check_keys(&keys) {
        Ok(()) => None,
        Err((key, Verdict::NotLinearizable { stuck })) => {
            Some(format!("key {key} is not linearizable; the search got stuck at {:?}", keys[key][stuck]))
        }
        Err((key, verdict)) => Some(format!("key {key}: {verdict:?}")),
    };
    let summary = match &violation {
        None => format!("{operations} operations on {} keys ({indeterminate} indeterminate): linearizable", keys.len()),
        Some(violation) => format!("NOT linearizable: {violation}"),
    };
    Check {
        valid: violation.is_none(),
        summary,
        detail: serde_json::json!({
            "operations": operations, "keys": keys.len(), "indeterminate": indeterminate, "violation": violation,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Process;

    fn record(call: u64, ret: u64, outcome: Outcome, op: Op) -> Record {
        Record { process: Process::Client(0), outcome, call, ret, op }
    }

    #[test]
    fn a_read_of_a_value_never_written_is_caught_and_unknown_writes_may_go_either_way() {
        let write = |value| Op::Write { key: "k".into(), value };
        let read = |value| Op::Read { key: "k".into(), value };
        let good = vec![
            record(0, 10, Outcome::Ok, write(1)),
            // Timed out: it may have happened, so a later read may see it...
            record(20, 25, Outcome::Info, write(2)),
            record(30, 40, Outcome::Ok, read(Some(2))),
            // ...and a refused write did not happen, whatever it says.
            record(50, 55, Outcome::Fail, write(3)),
            record(60, 70, Outcome::Ok, read(Some(2))),
        ];
        let verdict = check(&good);
        assert!(verdict.valid, "{}", verdict.summary);
        assert_eq!(verdict.detail["indeterminate"], 1);

        let mut stale = good.clone();
        stale.push(record(80, 90, Outcome::Ok, read(Some(1))));
        assert!(!check(&stale).valid);
        let mut invented = good;
        invented.push(record(80, 90, Outcome::Ok, read(Some(3))));
        let verdict = check(&invented);
        assert!(!verdict.valid);
        assert!(verdict.summary.contains("key k is not linearizable"), "{}", verdict.summary);
    }
}
