//! One chaos run: a cluster of real planes in network namespaces, clients doing register
//! operations (read, write, compare-and-set on a few keys) against every plane, a nemesis
//! killing planes and partitioning the network on a schedule, and the history checked
//! for linearizability key by key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};

use crate::cluster::Cluster;
use crate::linearizability::{check_keys, Operation, RegisterOp, Verdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a plane, restart it later.
    Kill,
    /// Cut the network in two (one side a majority), heal it later.
    Partition,
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The `capstan` binary the planes run.
    pub capstan: PathBuf,
    /// Where the planes' data, their logs, the history and the report go.
    pub dir: PathBuf,
    pub nodes: usize,
    pub time_limit: Duration,
    pub faults: Vec<Fault>,
    /// How long a fault lasts, and the calm between two.
    pub fault_interval: Duration,
    pub keys: usize,
    pub clients: usize,
    /// Extra flags for every plane (`--unsafe-stale-reads` proves the checker).
    pub plane_args: Vec<String>,
}

#[derive(Debug)]
pub struct Report {
    pub operations: usize,
    pub completed: usize,
    pub indeterminate: usize,
    /// What the nemesis did, with the time since the start.
    pub faults: Vec<String>,
    /// None when every key's history is linearizable; else the key and why not.
    pub violation: Option<String>,
}

/// A client's request timeout: past it, a write's outcome is unknown.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client waits after a failed request.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Seconds each generation of keys is used for.
const KEY_GENERATION_SECS: u64 = 2;

/// Whether a request failed before it reached any plane (the connection was refused), so
/// it certainly did not happen. Anything else (a timeout, a reset) may have happened.
fn never_sent(error: &etcd_client::Error) -> bool {
    error.to_string().contains("tcp connect error")
}

type History = BTreeMap<String, Vec<Operation<u64>>>;

pub async fn run(config: RunConfig) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&config.dir).with_context(|| format!("cannot create {}", config.dir.display()))?;
    let mut cluster = Cluster::start(&config.capstan, &config.dir, config.nodes, &config.plane_args)?;
    cluster.wait_until_serving(Duration::from_secs(60)).await?;
    let start = Instant::now();
    let deadline = start + config.time_limit;
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..config.clients {
        let endpoint = cluster.endpoint(id % cluster.len());
        clients.spawn(client(id, endpoint, config.keys, start, deadline));
    }
    let faults = nemesis(&mut cluster, &config, start, deadline).await?;
    let mut history = History::new();
    while let Some(operations) = clients.join_next().await {
        for (key, operation) in operations.context("a client panicked")? {
            history.entry(key).or_default().push(operation);
        }
    }
    let operations: usize = history.values().map(Vec::len).sum();
    let indeterminate = history.values().flatten().filter(|op| op.ret.is_none()).count();
    let violation = match check_keys(&history) {
        Ok(()) => None,
        Err((key, Verdict::NotLinearizable { stuck })) => {
            Some(format!("key {key} is not linearizable; the search got stuck at {:?}", history[&key][stuck]))
        }
        Err((key, verdict)) => Some(format!("key {key}: {verdict:?}")),
    };
    write_history(&config, &history)?;
    Ok(Report { operations, completed: operations - indeterminate, indeterminate, faults, violation })
}

/// One client: random reads, writes and CASes on `keys` keys through one plane until the
/// deadline. Every written value is unique, so a read names the write it saw.
async fn client(
    id: usize,
    endpoint: String,
    keys: usize,
    start: Instant,
    deadline: Instant,
) -> Vec<(String, Operation<u64>)> {
    let mut history = Vec::new();
    let options = ConnectOptions::new().with_connect_timeout(REQUEST_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
    let mut connection: Option<Client> = None;
    let mut last_seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut counter = 0u64;
    let now = || start.elapsed().as_nanos() as u64;
    while Instant::now() < deadline {
        let client = match &mut connection {
            Some(client) => client,
            None => match Client::connect([endpoint.as_str()], Some(options.clone())).await {
                Ok(client) => connection.insert(client),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Keys rotate every few seconds, so each key's history stays short enough for the
        // checker, whose search grows with the operations that overlap.
        let generation = start.elapsed().as_secs() / KEY_GENERATION_SECS;
        let key = format!("jepsen/g{generation}/r{}", fastrand::usize(..keys.max(1)));
        counter += 1;
        let value = id as u64 * 1_000_000_000 + counter;
        let call = now();
        let (op, outcome) = match (fastrand::u8(..3), last_seen.get(&key).copied()) {
            (0, _) => match client.get(key.as_str(), None).await {
                Ok(response) => {
                    let observed =
                        response.kvs().first().and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok());
                    if let Some(seen) = observed {
                        last_seen.insert(key.clone(), seen);
                    }
                    (RegisterOp::Read { observed }, Ok(()))
                }
                // A read that failed says nothing: leave it out.
                Err(_) => continue,
            },
            (1, Some(expected)) => {
                let txn = Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, expected.to_string())])
                    .and_then([TxnOp::put(key.as_str(), value.to_string(), None)]);
                match client.txn(txn).await {
                    Ok(response) => (RegisterOp::Cas { expected, new: value, succeeded: response.succeeded() }, Ok(())),
                    Err(error) => (RegisterOp::Cas { expected, new: value, succeeded: false }, Err(error)),
                }
            }
            _ => {
                let result = client.put(key.as_str(), value.to_string(), None).await.map(|_| ());
                (RegisterOp::Write { value }, result)
            }
        };
        let ret = match outcome {
            Ok(()) => Some(now()),
            Err(error) => {
                // The plane may be dead or cut off: reconnect for the next operation, after
                // a pause rather than a flood of failures.
                connection = None;
                tokio::time::sleep(ERROR_PAUSE).await;
                if never_sent(&error) {
                    continue;
                }
                None
            }
        };
        history.push((key, Operation { call, ret, op }));
    }
    history
}

/// Injects faults in turn until the deadline, then heals everything and restarts every
/// plane. Returns what it did.
async fn nemesis(
    cluster: &mut Cluster,
    config: &RunConfig,
    start: Instant,
    deadline: Instant,
) -> anyhow::Result<Vec<String>> {
    let mut log = Vec::new();
    let mut note = |what: String| log.push(format!("{:>7.3}s {what}", start.elapsed().as_secs_f64()));
    let mut turn = 0;
    while !config.faults.is_empty() && Instant::now() + 2 * config.fault_interval < deadline {
        tokio::time::sleep(config.fault_interval).await;
        match config.faults[turn % config.faults.len()] {
            Fault::Kill => {
                let node = fastrand::usize(..cluster.len());
                cluster.kill(node);
                note(format!("kill n{node}"));
                tokio::time::sleep(config.fault_interval).await;
                cluster.restart(node)?;
                note(format!("restart n{node}"));
            }
            Fault::Partition => {
                let mut nodes: Vec<usize> = (0..cluster.len()).collect();
                fastrand::shuffle(&mut nodes);
                let minority = nodes.split_off(nodes.len() / 2 + 1);
                cluster.network.partition(&[nodes.clone(), minority.clone()])?;
                note(format!("partition {nodes:?} | {minority:?}"));
                tokio::time::sleep(config.fault_interval).await;
                cluster.network.heal()?;
                note("heal".into());
            }
        }
        turn += 1;
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(remaining).await;
    Ok(log)
}

/// The history as JSON lines: key, call and return (ns since the start; null: unknown),
/// and the operation.
fn write_history(config: &RunConfig, history: &History) -> anyhow::Result<()> {
    let mut lines = String::new();
    for (key, operations) in history {
        for operation in operations {
            let op = match &operation.op {
                RegisterOp::Read { observed } => serde_json::json!({"f": "read", "value": observed}),
                RegisterOp::Write { value } => serde_json::json!({"f": "write", "value": value}),
                RegisterOp::Cas { expected, new, succeeded } => {
                    serde_json::json!({"f": "cas", "expected": expected, "new": new, "succeeded": succeeded})
                }
            };
            let line = serde_json::json!({"key": key, "call": operation.call, "return": operation.ret, "op": op});
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
    }
    let path = config.dir.join("history.jsonl");
    std::fs::write(&path, lines).with_context(|| format!("cannot write {}", path.display()))
}
