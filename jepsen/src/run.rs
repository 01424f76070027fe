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
use crate::set::{check_set, Add, SetVerdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a plane, restart it later.
    Kill,
    /// Cut the network in two (one side a majority), heal it later.
    Partition,
    /// SIGSTOP a plane, SIGCONT it later.
    Pause,
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
    /// Clients adding unique elements to a set beside the register clients (0: none).
    pub set_clients: usize,
    /// Operations per second over all clients; 0: as fast as they go.
    pub rate: u32,
    /// Seeds every random choice (operations, values picked, faults and their targets).
    pub seed: u64,
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
    /// The set workload's verdict, when it ran.
    pub set: Option<SetVerdict>,
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

pub type History = BTreeMap<String, Vec<Operation<u64>>>;

pub async fn run(config: RunConfig) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&config.dir).with_context(|| format!("cannot create {}", config.dir.display()))?;
    let mut cluster = Cluster::start(&config.capstan, &config.dir, config.nodes, &config.plane_args)?;
    cluster.wait_until_serving(Duration::from_secs(60)).await?;
    let start = Instant::now();
    let deadline = start + config.time_limit;
    let mut clients = tokio::task::JoinSet::new();
    let pause = match config.rate {
        0 => Duration::ZERO,
        rate => Duration::from_secs_f64(config.clients as f64 / f64::from(rate)),
    };
    for id in 0..config.clients {
        let endpoint = cluster.endpoint(id % cluster.len());
        let rng = fastrand::Rng::with_seed(config.seed.wrapping_add(id as u64 + 1));
        clients.spawn(client(ClientSpec { id, endpoint, keys: config.keys, pause, rng }, start, deadline));
    }
    let mut adders = tokio::task::JoinSet::new();
    for id in 0..config.set_clients {
        let endpoint = cluster.endpoint(id % cluster.len());
        adders.spawn(add_elements(id, endpoint, deadline));
    }
    let faults = nemesis(&mut cluster, &config, start, deadline).await?;
    let mut adds = Vec::new();
    while let Some(added) = adders.join_next().await {
        adds.extend(added.context("a set client panicked")?);
    }
    // Healed and all planes up (the nemesis leaves it so): the final read of the set.
    cluster.wait_until_serving(Duration::from_secs(60)).await?;
    let set =
        if config.set_clients > 0 { Some(check_set(&adds, &read_set(&cluster.endpoints()).await?)) } else { None };
    let mut history = History::new();
    while let Some(operations) = clients.join_next().await {
        for (key, operation) in operations.context("a client panicked")? {
            history.entry(key).or_default().push(operation);
        }
    }
    write_history(&config, &history)?;
    let mut report = analyze(&history, faults);
    report.set = set;
    let json = serde_json::json!({
        "seed": config.seed,
        "operations": report.operations,
        "completed": report.completed,
        "indeterminate": report.indeterminate,
        "faults": report.faults,
        "checkers": {
            "linearizable": {"valid": report.violation.is_none(), "violation": report.violation},
            "set": report.set.as_ref().map(|set| serde_json::json!({
                "valid": set.valid(), "acknowledged": set.acknowledged, "recovered": set.recovered,
                "lost": set.lost, "unexpected": set.unexpected,
            })),
        },
    });
    let path = config.dir.join("report.json");
    std::fs::write(&path, format!("{json:#}\n")).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(report)
}

/// Checks a history key by key.
pub fn analyze(history: &History, faults: Vec<String>) -> Report {
    let operations: usize = history.values().map(Vec::len).sum();
    let indeterminate = history.values().flatten().filter(|op| op.ret.is_none()).count();
    let violation = match check_keys(history) {
        Ok(()) => None,
        Err((key, Verdict::NotLinearizable { stuck })) => {
            Some(format!("key {key} is not linearizable; the search got stuck at {:?}", history[&key][stuck]))
        }
        Err((key, verdict)) => Some(format!("key {key}: {verdict:?}")),
    };
    Report { operations, completed: operations - indeterminate, indeterminate, faults, violation, set: None }
}

/// The client's connection to its plane, made anew after a failure; None (after a
/// pause) while the plane cannot be reached.
async fn connected<'a>(connection: &'a mut Option<Client>, endpoint: &str) -> Option<&'a mut Client> {
    if connection.is_none() {
        let options = ConnectOptions::new().with_connect_timeout(REQUEST_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
        match Client::connect([endpoint], Some(options)).await {
            Ok(client) => *connection = Some(client),
            Err(_) => {
                tokio::time::sleep(ERROR_PAUSE).await;
                return None;
            }
        }
    }
    connection.as_mut()
}

const SET_PREFIX: &str = "jepsen/set/";

/// A set client: adds unique elements (a key each) through one plane until the deadline.
async fn add_elements(id: usize, endpoint: String, deadline: Instant) -> Vec<Add> {
    let mut adds = Vec::new();
    let mut connection: Option<Client> = None;
    let mut counter = 0u64;
    while Instant::now() < deadline {
        let Some(client) = connected(&mut connection, &endpoint).await else { continue };
        counter += 1;
        let element = format!("{id}-{counter}");
        match client.put(format!("{SET_PREFIX}{element}"), "", None).await {
            Ok(_) => adds.push(Add { element, acknowledged: true }),
            Err(error) => {
                connection = None;
                tokio::time::sleep(ERROR_PAUSE).await;
                if !never_sent(&error) {
                    adds.push(Add { element, acknowledged: false });
                }
            }
        }
    }
    adds
}

/// The set as the cluster holds it: a linearizable read of every element.
async fn read_set(endpoints: &[String]) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let options = ConnectOptions::new().with_timeout(Duration::from_secs(10));
    let mut client = Client::connect(endpoints, Some(options)).await.context("cannot connect for the final read")?;
    let response = client
        .get(SET_PREFIX, Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
        .await
        .context("the final read of the set failed")?;
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| std::str::from_utf8(kv.key()).ok()?.strip_prefix(SET_PREFIX).map(String::from))
        .collect())
}

/// Reads a history written by a run (`history.jsonl`); a line that is not one says where.
pub fn read_history(path: &std::path::Path) -> anyhow::Result<History> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut history = History::new();
    for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let (key, operation) =
            parse_line(line).with_context(|| format!("{} line {}: not an operation", path.display(), number + 1))?;
        history.entry(key).or_default().push(operation);
    }
    Ok(history)
}

fn parse_line(line: &str) -> anyhow::Result<(String, Operation<u64>)> {
    let value: serde_json::Value = serde_json::from_str(line)?;
    let field = |name: &str| value.get(name).with_context(|| format!("no {name:?}"));
    let number = |v: &serde_json::Value, name: &str| {
        v.get(name).and_then(serde_json::Value::as_u64).with_context(|| format!("no number {name:?}"))
    };
    let key = field("key")?.as_str().context("the key is not a string")?.to_string();
    let call = number(&value, "call")?;
    let ret = match field("return")? {
        serde_json::Value::Null => None,
        other => Some(other.as_u64().context("the return is not a number")?),
    };
    let op = field("op")?;
    let op = match op.get("f").and_then(serde_json::Value::as_str) {
        Some("read") => RegisterOp::Read { observed: op.get("value").and_then(serde_json::Value::as_u64) },
        Some("write") => RegisterOp::Write { value: number(op, "value")? },
        Some("cas") => RegisterOp::Cas {
            expected: number(op, "expected")?,
            new: number(op, "new")?,
            succeeded: op.get("succeeded").and_then(serde_json::Value::as_bool).context("no \"succeeded\"")?,
        },
        other => anyhow::bail!("unknown operation {other:?}"),
    };
    Ok((key, Operation { call, ret, op }))
}

/// What one client is: its number (values it writes are unique to it), the plane it
/// talks to, how many keys it picks from, its pause between operations, its randomness.
struct ClientSpec {
    id: usize,
    endpoint: String,
    keys: usize,
    pause: Duration,
    rng: fastrand::Rng,
}

/// One client: random reads, writes and CASes on `keys` keys through one plane until the
/// deadline. Every written value is unique, so a read names the write it saw.
async fn client(me: ClientSpec, start: Instant, deadline: Instant) -> Vec<(String, Operation<u64>)> {
    let ClientSpec { id, endpoint, keys, pause, mut rng } = me;
    let mut history = Vec::new();
    let mut connection: Option<Client> = None;
    let mut last_seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut counter = 0u64;
    let now = || start.elapsed().as_nanos() as u64;
    while Instant::now() < deadline {
        let Some(client) = connected(&mut connection, &endpoint).await else { continue };
        // Keys rotate every few seconds, so each key's history stays short enough for the
        // checker, whose search grows with the operations that overlap.
        let generation = start.elapsed().as_secs() / KEY_GENERATION_SECS;
        let key = format!("jepsen/g{generation}/r{}", rng.usize(..keys.max(1)));
        counter += 1;
        let value = id as u64 * 1_000_000_000 + counter;
        let call = now();
        let (op, outcome) = match (rng.u8(..3), last_seen.get(&key).copied()) {
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
                Err(_) => {
                    connection = None;
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
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
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
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
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let mut turn = 0;
    while !config.faults.is_empty() && Instant::now() + 2 * config.fault_interval < deadline {
        tokio::time::sleep(config.fault_interval).await;
        match config.faults[turn % config.faults.len()] {
            Fault::Kill => {
                let node = rng.usize(..cluster.len());
                cluster.kill(node);
                note(format!("kill n{node}"));
                tokio::time::sleep(config.fault_interval).await;
                cluster.restart(node)?;
                note(format!("restart n{node}"));
            }
            Fault::Pause => {
                let node = rng.usize(..cluster.len());
                cluster.pause(node, true);
                note(format!("pause n{node}"));
                tokio::time::sleep(config.fault_interval).await;
                cluster.pause(node, false);
                note(format!("resume n{node}"));
            }
            Fault::Partition => {
                let mut nodes: Vec<usize> = (0..cluster.len()).collect();
                rng.shuffle(&mut nodes);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_round_trip_and_bad_lines_say_where() {
        let dir = std::env::temp_dir().join(format!("capstan-jepsen-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = RunConfig {
            capstan: "capstan".into(),
            dir: dir.clone(),
            nodes: 3,
            time_limit: Duration::ZERO,
            faults: vec![],
            fault_interval: Duration::ZERO,
            keys: 1,
            clients: 1,
            set_clients: 0,
            rate: 0,
            seed: 0,
            plane_args: vec![],
        };
        let mut history = History::new();
        history.insert(
            "k".into(),
            vec![
                Operation { call: 0, ret: Some(10), op: RegisterOp::Write { value: 1 } },
                Operation { call: 20, ret: None, op: RegisterOp::Cas { expected: 1, new: 2, succeeded: false } },
                Operation { call: 30, ret: Some(40), op: RegisterOp::Read { observed: Some(1) } },
            ],
        );
        write_history(&config, &history).unwrap();
        let path = dir.join("history.jsonl");
        assert_eq!(read_history(&path).unwrap(), history);
        assert_eq!(analyze(&history, vec![]).violation, None);

        // A read of a value never written is caught when the history is analysed again.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(r#"{"key":"k","call":50,"return":60,"op":{"f":"read","value":7}}"#);
        text.push('\n');
        std::fs::write(&path, &text).unwrap();
        assert!(analyze(&read_history(&path).unwrap(), vec![]).violation.is_some());

        std::fs::write(&path, format!("{text}{{\"key\": 1}}\n")).unwrap();
        let error = format!("{:#}", read_history(&path).unwrap_err());
        assert!(error.contains("line 5: not an operation"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
