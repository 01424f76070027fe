//! The scheduler workload: the planes run their schedulers (`--scheduler`, with a short
//! election lease so faults move the leadership); the harness registers nodes and holds
//! their leases, as agents would, and clients create and delete pods of random sizes. Each
//! client keeps its live pods within its share of three quarters of the cluster's CPU, so
//! every pod fits somewhere (no pod asks for more than a quarter of a node).
//!
//! Checked on the whole history of pods, replayed after the heal: no pod is ever bound to
//! a second node, no node is ever over-committed, every acknowledged pod that was not
//! deleted exists, and every pod is bound once the cluster has healed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use anyhow::Context;
use capstan_proto::objects::{decode_stored, Kind, Node, Object, Pod, NODE_LEASE_PREFIX};
use etcd_client::{EventType, PutOptions, Txn, TxnOp};

use crate::check::Check;
use crate::client::{final_client, history, Endpoints, Session};
use crate::history::{Clock, Op, Outcome, PodEvent, Process, Record};

const NAMESPACE: &str = "jepsen";
const NODES: usize = 10;
const NODE_CPU_MILLI: i64 = 4000;
/// The share of the cluster's CPU the clients' live pods may take together.
const BUDGET_MILLI: i64 = NODES as i64 * NODE_CPU_MILLI * 3 / 4;
/// The planes' extra flags: schedulers that fail over within seconds, and nodes that stay
/// Ready while the harness holds their lease keys.
pub const PLANE_ARGS: [&str; 5] =
    ["--scheduler", "--scheduler-lease-ttl-secs", "3", "--node-monitor-grace-secs", "600"];
/// How long the final read waits for the scheduler to bind every pod after the heal.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

fn node(index: usize) -> Object {
    Object::Node(Node::ready(&format!("jepsen-node-{index}"), &format!("{NODE_CPU_MILLI}m"), "64Gi", "110"))
}

fn pod(name: &str, cpu_milli: i64) -> Object {
    Object::Pod(Pod::requesting(NAMESPACE, name, &["sleep"], &format!("{cpu_milli}m"), "64Mi"))
}

/// Registers the nodes and their lease keys (on a lease that outlives the run).
pub async fn register_nodes(endpoints: &Endpoints) -> anyhow::Result<()> {
    let mut client = final_client(endpoints).await?;
    let lease = client.lease_grant(3600, None).await.context("cannot grant the node leases' lease")?.id();
    for index in 0..NODES {
        let (compare, put) = capstan_client::create_op(&node(index));
        let lease_key = format!("{NODE_LEASE_PREFIX}jepsen-node-{index}");
        let txn = Txn::new()
            .when([compare])
            .and_then([put, TxnOp::put(lease_key, "", Some(PutOptions::new().with_lease(lease)))]);
        client.txn(txn).await.context("cannot register a node")?;
    }
    Ok(())
}

/// One client: creates pods and deletes its oldest to stay within its CPU share.
pub async fn client(mut session: Session, clients: usize, mut rng: fastrand::Rng) -> Vec<Record> {
    let share = BUDGET_MILLI / clients.max(1) as i64;
    let mut live: VecDeque<(String, i64)> = VecDeque::new();
    let mut counter = 0;
    while session.run.going() {
        let Some(mut client) = session.client().await else { continue };
        let cpu_milli = rng.i64(1..=10) * NODE_CPU_MILLI / 40;
        let used: i64 = live.iter().map(|(_, cpu)| cpu).sum();
        let call = session.run.clock.now();
        if used + cpu_milli > share {
            let (name, cpu) = live.pop_front().expect("a share holds at least one pod");
            let outcome = match client.delete(Kind::Pod.key(NAMESPACE, &name), None).await {
                Ok(_) => Outcome::Ok,
                Err(error) => {
                    // A delete that failed, or may have, leaves the pod counted against
                    // the share and first in line to be deleted again (deleting it once
                    // more is harmless). Dropping it from the count instead let a pod
                    // that survived an unknown delete push the cluster past the budget,
                    // where a pod may fit no node and stay unbound for good.
                    live.push_front((name.clone(), cpu));
                    session.failed(&error)
                }
            };
            session.record(call, outcome, Op::DeletePod { name });
            continue;
        }
        counter += 1;
        let name = format!("pod-{}-{counter}", session.process);
        let (compare, put) = capstan_client::create_op(&pod(&name, cpu_milli));
        let outcome = match client.txn(Txn::new().when([compare]).and_then([put])).await {
            Ok(response) if response.succeeded() => Outcome::Ok,
            Ok(_) => Outcome::Fail,
            Err(error) => session.failed(&error),
        };
        if outcome != Outcome::Fail {
            // An unknown create may have happened: it counts against the share.
            live.push_back((name.clone(), cpu_milli));
        }
        session.record(call, outcome, Op::CreatePod { name, cpu_milli });
        session.run.pace().await;
    }
    session.history
}

fn pod_event(kv: &etcd_client::KeyValue, deleted: bool) -> Option<PodEvent> {
    let key = std::str::from_utf8(kv.key()).ok()?;
    let name = key.strip_prefix(&Kind::Pod.namespace_prefix(NAMESPACE))?.to_string();
    if deleted {
        return Some(PodEvent { revision: kv.mod_revision(), pod: name, node: None, cpu_milli: 0 });
    }
    // A pod the harness cannot decode is reported as bound nowhere with no size; the
    // checker then finds it unbound.
    let (node, cpu_milli) = match decode_stored(kv.key(), kv.value(), kv.mod_revision()) {
        Ok(Object::Pod(pod)) => (pod.spec.node_name.clone(), pod.requests().cpu_millis),
        _ => (String::new(), 0),
    };
    Some(PodEvent { revision: kv.mod_revision(), pod: name, node: Some(node), cpu_milli })
}

/// After the heal: waits (bounded) until every pod is bound, then replays every pod
/// event of the run.
pub async fn final_read(endpoints: &Endpoints, from: i64, process: usize, clock: Clock) -> anyhow::Result<Record> {
    let mut client = final_client(endpoints).await?;
    let call = clock.now();
    let prefix = Kind::Pod.namespace_prefix(NAMESPACE);
    let settle_deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let listed = client.get(prefix.as_str(), Some(etcd_client::GetOptions::new().with_prefix())).await?;
        let mut pods = listed.kvs().iter().filter_map(|kv| pod_event(kv, false));
        if !pods.any(|event| event.node == Some(String::new())) || tokio::time::Instant::now() > settle_deadline {
            break;
        }
        // The scheduler binds in batches as pods arrive; look again shortly.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = history(&mut client, &prefix, from).await?;
    let events =
        events.iter().filter_map(|event| pod_event(event.kv()?, event.event_type() == EventType::Delete)).collect();
    let op = Op::ReadPods { node_cpu_milli: vec![NODE_CPU_MILLI; NODES], events };
    Ok(Record { process: Process::Client(process), outcome: Outcome::Ok, call, ret: clock.now(), op })
}

pub fn check(history: &[Record]) -> Check {
    let Some((node_cpu_milli, events)) = history.iter().find_map(|record| match &record.op {
        Op::ReadPods { node_cpu_milli, events } => Some((node_cpu_milli, events)),
        _ => None,
    }) else {
        return Check::invalid("the pods' history was not read");
    };
    let capacity = |node: &str| {
        let index = node.strip_prefix("jepsen-node-")?.parse::<usize>().ok()?;
        node_cpu_milli.get(index).copied()
    };
    let mut problems = Vec::new();
    // Replay: each pod's node and size, each node's CPU in use.
    let mut pods: BTreeMap<&str, (&str, i64)> = BTreeMap::new();
    let mut used: BTreeMap<&str, i64> = BTreeMap::new();
    let mut binds = 0;
    // Nodes whose usage grew in the revision being replayed: judged once all its events
    // are in (a txn binds many pods).
    let mut touched: BTreeSet<&str> = BTreeSet::new();
    for (index, event) in events.iter().enumerate() {
        let before = pods.remove(event.pod.as_str());
        if let Some((node, cpu)) = before {
            *used.entry(node).or_default() -= cpu;
        }
        if let Some(node) = &event.node {
            match before {
                Some((old, _)) if !old.is_empty() && old != node => problems.push(format!(
                    "pod {} was bound to {old}, then to {node} at revision {}",
                    event.pod, event.revision
                )),
                Some((old, _)) if old.is_empty() && !node.is_empty() => binds += 1,
                None if !node.is_empty() => binds += 1,
                _ => {}
            }
            pods.insert(&event.pod, (node, event.cpu_milli));
            if !node.is_empty() {
                *used.entry(node).or_default() += event.cpu_milli;
                touched.insert(node);
            }
        }
        if events.get(index + 1).is_some_and(|next| next.revision == event.revision) {
            continue;
        }
        for node in std::mem::take(&mut touched) {
            match capacity(node) {
                None => problems.push(format!("a pod was bound to {node}, which is not a node")),
                Some(capacity) if used[node] > capacity => problems.push(format!(
                    "{node} was over-committed at revision {}: {}m of {capacity}m",
                    event.revision, used[node]
                )),
                _ => {}
            }
        }
    }
    let unbound: Vec<&str> = pods.iter().filter(|(_, (node, _))| node.is_empty()).map(|(pod, _)| *pod).collect();
    if !unbound.is_empty() {
        problems.push(format!("{} pods were still unbound after the heal, e.g. {}", unbound.len(), unbound[0]));
    }
    // Acknowledged creates must exist unless a delete (of any outcome) may have removed them.
    let mut created = BTreeSet::new();
    let mut deleted = BTreeSet::new();
    for record in history {
        match &record.op {
            Op::CreatePod { name, .. } if record.outcome == Outcome::Ok => {
                created.insert(name.as_str());
            }
            Op::DeletePod { name } if record.outcome != Outcome::Fail => {
                deleted.insert(name.as_str());
            }
            _ => {}
        }
    }
    let lost: Vec<&&str> = created.difference(&deleted).filter(|pod| !pods.contains_key(**pod)).collect();
    if let Some(pod) = lost.first() {
        problems.push(format!("{} acknowledged pods are missing, e.g. {pod}", lost.len()));
    }
    let valid = problems.is_empty() && binds > 0;
    let summary = match problems.first() {
        None if binds == 0 => "no pod was bound".to_string(),
        None => format!(
            "{binds} binds of {} pods created, none twice, no node over-committed, all {} pods bound after the heal",
            created.len(),
            pods.len()
        ),
        Some(first) => format!("{} problems; the first: {first}", problems.len()),
    };
    Check {
        valid,
        summary,
        detail: serde_json::json!({
            "created": created.len(), "binds": binds, "pods_at_end": pods.len(), "problems": problems,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: i64, pod: &str, node: Option<&str>, cpu_milli: i64) -> PodEvent {
        PodEvent { revision, pod: pod.into(), node: node.map(String::from), cpu_milli }
    }

    fn history(events: Vec<PodEvent>) -> Vec<Record> {
        let create = |name: &str| Record {
            process: Process::Client(0),
            outcome: Outcome::Ok,
            call: 0,
            ret: 1,
            op: Op::CreatePod { name: name.into(), cpu_milli: 1000 },
        };
        let read = Op::ReadPods { node_cpu_milli: vec![4000, 4000], events };
        vec![
            create("a"),
            create("b"),
            create("c"),
            Record { process: Process::Client(9), outcome: Outcome::Ok, call: 2, ret: 3, op: read },
        ]
    }

    fn good() -> Vec<PodEvent> {
        vec![
            event(2, "a", Some(""), 3000),
            event(3, "b", Some(""), 1000),
            event(3, "c", Some(""), 1000),
            // One txn binds all three, filling jepsen-node-0 exactly.
            event(4, "a", Some("jepsen-node-0"), 3000),
            event(4, "b", Some("jepsen-node-0"), 1000),
            event(4, "c", Some("jepsen-node-1"), 1000),
            // a's status is written: same node.
            event(5, "a", Some("jepsen-node-0"), 3000),
        ]
    }

    #[test]
    fn a_clean_history_passes() {
        let verdict = check(&history(good()));
        assert!(verdict.valid, "{}", verdict.summary);
        assert_eq!(verdict.detail["binds"], 3);
    }

    #[test]
    fn double_binds_over_commits_unbound_and_lost_pods_are_caught() {
        let mut rebound = good();
        rebound.push(event(6, "a", Some("jepsen-node-1"), 3000));
        let mut over = good();
        over.push(event(6, "d", Some("jepsen-node-0"), 1000));
        // The over-commit is not the revision's last event.
        let mut over_mid_txn = good();
        over_mid_txn.push(event(6, "d", Some("jepsen-node-0"), 1000));
        over_mid_txn.push(event(6, "e", Some("jepsen-node-1"), 100));
        let mut unbound = good();
        unbound.push(event(6, "d", Some(""), 100));
        let mut lost = good();
        lost.push(event(6, "b", None, 0));
        let mut nowhere = good();
        nowhere[3] = event(4, "a", Some("elsewhere"), 3000);
        for (what, events) in [
            ("rebound", rebound),
            ("over-committed", over),
            ("over-committed mid-txn", over_mid_txn),
            ("unbound", unbound),
            ("lost", lost),
            ("nowhere", nowhere),
        ] {
            let verdict = check(&history(events));
            assert!(!verdict.valid, "{what} passed: {}", verdict.summary);
        }
    }
}
