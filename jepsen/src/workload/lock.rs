//! The lock workload: mutual exclusion from a lease-backed key with a fencing token, the
//! way etcd users build locks. A client takes the lock by creating the holder key on a
//! short lease (the txn refuses when the key exists); the revision that created it is the
//! token. While it believes it holds the lock it writes the resource, each write a txn
//! that only applies while the holder key is still the one created at its token, then
//! deletes the key. Leases expire under faults, so clients lose the lock without knowing;
//! fencing must keep their late writes out.
//!
//! Checked against every version of the resource, read after the heal: tokens never go
//! back (two holders' writes never interleave), each token's writes come from one client
//! after its lock was taken, every acknowledged write is there and no refused one is.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::check::Check;
use crate::client::{final_client, history, Endpoints, Session};
use crate::history::{Clock, FencedVersion, Op, Outcome, Process, Record};

const HOLDER: &str = "jepsen/lock/holder";
const RESOURCE: &str = "jepsen/lock/resource";
/// The holder key's lease: short, so faults make holders lose the lock.
const LEASE_TTL_SECS: i64 = 2;
/// Fenced writes a holder makes before it lets go.
const WRITES_PER_HOLD: u64 = 4;

/// A txn that applies `then` only while the holder key is the one created at `token`.
fn fenced(token: i64, then: TxnOp) -> Txn {
    Txn::new().when([Compare::create_revision(HOLDER, CompareOp::Equal, token)]).and_then([then])
}

/// One client: takes the lock, writes under it, lets go, until the deadline.
pub async fn client(mut session: Session, mut rng: fastrand::Rng) -> Vec<Record> {
    let mut seq = 0u64;
    while session.run.going() {
        let Some(mut client) = session.client().await else { continue };
        let lease = match client.lease_grant(LEASE_TTL_SECS, None).await {
            Ok(lease) => lease.id(),
            Err(error) => {
                session.failed(&error);
                continue;
            }
        };
        let take = Txn::new().when([Compare::create_revision(HOLDER, CompareOp::Equal, 0)]).and_then([TxnOp::put(
            HOLDER,
            session.process.to_string(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let call = session.run.clock.now();
        let token = match client.txn(take).await {
            Ok(response) if response.succeeded() => response.header().map_or(0, |header| header.revision()),
            Ok(_) => {
                // Held by another: try again soon, on a new lease.
                let _ = client.lease_revoke(lease).await;
                tokio::time::sleep(std::time::Duration::from_millis(rng.u64(10..50))).await;
                continue;
            }
            Err(error) => {
                let outcome = session.failed(&error);
                session.record(call, outcome, Op::Acquire { token: 0 });
                continue;
            }
        };
        session.record(call, Outcome::Ok, Op::Acquire { token });
        for _ in 0..WRITES_PER_HOLD {
            seq += 1;
            let write = TxnOp::put(RESOURCE, format!("{token}:{}:{seq}", session.process), None);
            let call = session.run.clock.now();
            let (outcome, succeeded) = match client.txn(fenced(token, write)).await {
                Ok(response) => (Outcome::Ok, response.succeeded()),
                Err(error) => (session.failed(&error), false),
            };
            session.record(call, outcome, Op::Fenced { token, seq, succeeded });
            if !succeeded {
                break;
            }
        }
        let call = session.run.clock.now();
        let outcome = match client.txn(fenced(token, TxnOp::delete(HOLDER, None))).await {
            Ok(_) => Outcome::Ok,
            Err(error) => session.failed(&error),
        };
        session.record(call, outcome, Op::Release { token });
        // The lease would expire anyway; revoking it spares the store the wait.
        let _ = client.lease_revoke(lease).await;
        session.run.pace().await;
    }
    session.history
}

/// Reads every version of the resource after the heal, from its history.
pub async fn final_read(endpoints: &Endpoints, from: i64, process: usize, clock: Clock) -> anyhow::Result<Record> {
    let mut client = final_client(endpoints).await?;
    let call = clock.now();
    let mut versions = Vec::new();
    for event in history(&mut client, RESOURCE, from).await? {
        let Some(kv) = event.kv() else { continue };
        let value = String::from_utf8_lossy(kv.value());
        let fields: Vec<&str> = value.split(':').collect();
        let parsed = match fields[..] {
            [token, client, seq] => (token.parse().ok(), client.parse().ok(), seq.parse().ok()),
            _ => (None, None, None),
        };
        let (Some(token), Some(client), Some(seq)) = parsed else {
            anyhow::bail!("the resource holds {value:?} at revision {}", kv.mod_revision());
        };
        versions.push(FencedVersion { revision: kv.mod_revision(), token, client, seq });
    }
    let op = Op::ReadFenced { versions };
    Ok(Record { process: Process::Client(process), outcome: Outcome::Ok, call, ret: clock.now(), op })
}

pub fn check(history: &[Record]) -> Check {
    let Some(versions) = history.iter().find_map(|record| match &record.op {
        Op::ReadFenced { versions } => Some(versions),
        _ => None,
    }) else {
        return Check::invalid("the resource's versions were not read");
    };
    // Each client's fenced writes by (token, seq): acknowledged, refused or unknown.
    let mut writes: BTreeMap<(i64, usize, u64), (Outcome, bool)> = BTreeMap::new();
    let mut acquired = 0;
    for record in history {
        let Process::Client(client) = record.process else { continue };
        match record.op {
            Op::Fenced { token, seq, succeeded } => {
                writes.insert((token, client, seq), (record.outcome, succeeded));
            }
            Op::Acquire { .. } if record.outcome == Outcome::Ok => acquired += 1,
            _ => {}
        }
    }
    let mut problems = Vec::new();
    let mut token_owner: BTreeMap<i64, usize> = BTreeMap::new();
    let mut present = BTreeSet::new();
    for (index, version) in versions.iter().enumerate() {
        let FencedVersion { revision, token, client, seq } = *version;
        if let Some(previous) = index.checked_sub(1).map(|previous| &versions[previous]) {
            if token < previous.token {
                problems.push(format!(
                    "revision {revision} was written under token {token} after revision {} under token {}: two \
                     holders overlapped",
                    previous.revision, previous.token
                ));
            }
        }
        if *token_owner.entry(token).or_insert(client) != client {
            problems.push(format!("token {token} was used by clients {} and {client}", token_owner[&token]));
        }
        if revision <= token {
            problems.push(format!("revision {revision} was written before its lock was taken at {token}"));
        }
        match writes.get(&(token, client, seq)) {
            Some((Outcome::Ok, false)) => {
                problems.push(format!("revision {revision} holds a write the store refused ({token}:{client}:{seq})"))
            }
            Some((Outcome::Fail, _)) => {
                problems.push(format!("revision {revision} holds a write that was never sent ({token}:{client}:{seq})"))
            }
            Some(_) => {}
            None => problems.push(format!("revision {revision} holds a write no client made ({token}:{client}:{seq})")),
        }
        present.insert((token, client, seq));
    }
    let acknowledged: Vec<_> = writes
        .iter()
        .filter(|(_, (outcome, succeeded))| *outcome == Outcome::Ok && *succeeded)
        .map(|(w, _)| *w)
        .collect();
    for (token, client, seq) in acknowledged.iter().filter(|write| !present.contains(write)) {
        problems.push(format!("an acknowledged write ({token}:{client}:{seq}) is missing"));
    }
    let valid = problems.is_empty() && !versions.is_empty();
    let summary = match (problems.first(), versions.is_empty()) {
        (_, true) => "no fenced write reached the resource".to_string(),
        (None, false) => format!(
            "{acquired} holds, {} versions under {} tokens, never overlapping; all {} acknowledged writes present",
            versions.len(),
            token_owner.len(),
            acknowledged.len()
        ),
        (Some(first), false) => format!("{} problems; the first: {first}", problems.len()),
    };
    Check {
        valid,
        summary,
        detail: serde_json::json!({
            "holds": acquired, "versions": versions.len(), "tokens": token_owner.len(),
            "acknowledged": acknowledged.len(), "problems": problems,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fenced(client: usize, token: i64, seq: u64, outcome: Outcome, succeeded: bool) -> Record {
        Record { process: Process::Client(client), outcome, call: 0, ret: 1, op: Op::Fenced { token, seq, succeeded } }
    }

    fn versions(versions: &[(i64, i64, usize, u64)]) -> Record {
        let versions = versions
            .iter()
            .map(|&(revision, token, client, seq)| FencedVersion { revision, token, client, seq })
            .collect();
        Record { process: Process::Client(9), outcome: Outcome::Ok, call: 2, ret: 3, op: Op::ReadFenced { versions } }
    }

    fn writes() -> Vec<Record> {
        vec![
            fenced(0, 10, 1, Outcome::Ok, true),
            fenced(0, 10, 2, Outcome::Info, false),
            fenced(1, 20, 3, Outcome::Ok, true),
            fenced(0, 10, 4, Outcome::Ok, false),
        ]
    }

    #[test]
    fn holders_in_turn_pass() {
        // The unknown write happened; the refused one did not.
        let good = [writes(), vec![versions(&[(11, 10, 0, 1), (12, 10, 0, 2), (21, 20, 1, 3)])]].concat();
        let verdict = check(&good);
        assert!(verdict.valid, "{}", verdict.summary);
    }

    #[test]
    fn overlapping_holders_lost_and_refused_writes_are_caught() {
        let bad = [
            ("overlapping tokens", vec![(11, 10, 0, 1), (21, 20, 1, 3), (22, 10, 0, 2)]),
            ("a lost acknowledged write", vec![(11, 10, 0, 1)]),
            ("a refused write applied", vec![(11, 10, 0, 1), (12, 10, 0, 4), (21, 20, 1, 3)]),
            ("a write from nowhere", vec![(11, 10, 0, 1), (21, 20, 1, 3), (23, 20, 1, 7)]),
            ("a write before its lock", vec![(9, 10, 0, 1), (21, 20, 1, 3)]),
        ];
        for (what, read) in bad {
            let verdict = check(&[writes(), vec![versions(&read)]].concat());
            assert!(!verdict.valid, "{what} passed: {}", verdict.summary);
        }
        assert!(!check(&writes()).valid, "no final read, no verdict");
    }
}
