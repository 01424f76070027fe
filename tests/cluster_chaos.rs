//! Planes in one process under a generated fault schedule: partitions, lost and delayed
//! peer messages, and planes stopped and restarted on their RocksDB. Clients run single-key
//! reads, writes and compare-and-sets against every plane meanwhile. After healing:
//!
//! - every acknowledged write is in the store, at the revision it was acknowledged with;
//! - every plane reaches the same revision with the same HashKV;
//! - no plane's view of (term, leader) ever went back: openraft's leader IDs are (term,
//!   member), so two candidates may both win one term after a split vote, and the one with
//!   the greater member ID then supersedes the other, but a plane never returns to a
//!   smaller one;
//! - the client history is linearizable (`capstan_jepsen::linearizability`, whose own tests
//!   show it rejecting non-linearizable histories; `planes_serving_stale_reads_are_caught`
//!   shows this whole test failing on a deliberately unsafe cluster).
//!
//! A failing case is printed by proptest and its seed saved in
//! `tests/cluster_chaos.proptest-regressions`, from which the next run replays it first. Faults go through the planes' peer-traffic
//! hook (`capstan_raft::network::PeerFaults`); everything else is the real plane: gRPC on
//! loopback sockets, openraft, RocksDB.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use proptest::prelude::*;

use capstan::plane::PlaneConfig;
use capstan_jepsen::linearizability::{check_keys, Operation, RegisterOp};
use capstan_raft::network::{Fate, PeerFaults};

/// Registers in use at any moment. Clients move on to fresh registers every
/// `KEY_EPOCH_MS`, so that each register's history stays short enough to check exactly
/// (the search is exponential in the number of concurrent and indeterminate operations;
/// Jepsen's etcd tests rotate keys for the same reason).
const KEYS_AT_ONCE: u64 = 3;
const KEY_EPOCH_MS: u128 = 400;
const CLIENTS: u64 = 3;
const OP_TIMEOUT: Duration = Duration::from_millis(1_500);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A small deterministic generator. A case's seed fixes the schedule and each client's
/// choices; which messages a lossy network drops still depends on timing.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound.max(1)
    }
}

#[derive(Clone, Debug)]
enum Fault {
    Healthy,
    /// Planes whose bit is set cannot talk to the others, and the reverse.
    Partition(u32),
    /// Each peer message is lost with this probability (percent).
    Lossy(u64),
    /// Each peer message is delayed by up to this many milliseconds.
    Slow(u64),
    /// The peer answers are lost: requests take effect, their senders never learn it.
    LostAnswers(u64),
    /// The plane stops, then starts again on its data at the end of the step.
    Crash(usize),
}

#[derive(Clone, Debug)]
struct Step {
    fault: Fault,
    millis: u64,
}

fn schedule(planes: usize) -> impl Strategy<Value = Vec<Step>> {
    let fault = prop_oneof![
        Just(Fault::Healthy),
        (1u32..(1 << planes) - 1).prop_map(Fault::Partition),
        (10u64..50).prop_map(Fault::Lossy),
        (5u64..60).prop_map(Fault::Slow),
        (10u64..40).prop_map(Fault::LostAnswers),
        (0..planes).prop_map(Fault::Crash),
    ];
    proptest::collection::vec((fault, 300u64..900).prop_map(|(fault, millis)| Step { fault, millis }), 4..8)
}

/// The fault state every plane's hook consults.
struct Network {
    plane_of_url: HashMap<String, usize>,
    state: Mutex<NetworkState>,
}

struct NetworkState {
    fault: Fault,
    rng: Rng,
}

/// One plane's view of the network.
struct Hook {
    network: Arc<Network>,
    plane: usize,
}

impl PeerFaults for Hook {
    fn fate(&self, peer_url: &str) -> Fate {
        let Some(&peer) = self.network.plane_of_url.get(peer_url) else { return Fate::Deliver };
        let mut state = self.network.state.lock().unwrap();
        let roll = state.rng.below(100);
        match state.fault {
            Fault::Partition(mask) if (mask >> self.plane) & 1 != (mask >> peer) & 1 => Fate::Drop,
            Fault::Lossy(percent) if roll < percent => Fate::Drop,
            Fault::Slow(millis) => Fate::Delay(Duration::from_millis(roll * millis / 100)),
            Fault::LostAnswers(percent) if roll < percent => Fate::DropResponse,
            _ => Fate::Deliver,
        }
    }
}

/// A plane running as a task of this process.
struct InProcessPlane {
    config: PlaneConfig,
    running: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>)>,
}

impl InProcessPlane {
    fn start(&mut self) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(capstan::plane::run(self.config.clone(), async {
            let _ = stopped.await;
        }));
        self.running = Some((stop, task));
    }

    /// Starts the plane again on its data after `stop`, and waits until it serves. The
    /// stopped plane's store may still be closing (RocksDB refuses a second open in one
    /// process), so a start that fails for that reason is tried again; any other failure
    /// fails the test here.
    async fn restart(&mut self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let endpoint = self.config.listen_client.to_string();
        loop {
            self.start();
            let (stop, mut task) = self.running.take().expect("just started");
            let serving = async {
                loop {
                    let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(1));
                    if let Ok(mut client) = Client::connect([endpoint.as_str()], Some(options)).await {
                        if client.status().await.is_ok() {
                            return;
                        }
                    }
                    // Polling: nothing announces that a plane serves but its answer.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            tokio::select! {
                () = serving => {
                    self.running = Some((stop, task));
                    return;
                }
                outcome = &mut task => {
                    let failure = format!("{outcome:?}");
                    assert!(
                        failure.contains("in use") && Instant::now() < deadline,
                        "plane {} does not restart: {failure}",
                        self.config.name
                    );
                }
            }
        }
    }

    /// Fails the test if the plane stopped on its own (a plane never should), with why.
    async fn assert_running(&mut self) {
        let Some((_, task)) = self.running.as_mut() else { return };
        if task.is_finished() {
            let (_, task) = self.running.take().expect("checked above");
            panic!("plane {} stopped on its own: {:?}", self.config.name, task.await);
        }
    }

    /// Stops the plane as `capstan plane` stops on SIGTERM, and waits until it has.
    async fn stop(&mut self) {
        let Some((stop, task)) = self.running.take() else { return };
        let _ = stop.send(());
        let stopped = tokio::time::timeout(SETTLE_TIMEOUT, task).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "plane {} did not stop cleanly: {stopped:?}", self.config.name);
    }
}

/// One client operation with its outcome, as recorded.
struct Recorded {
    key: String,
    operation: Operation<u64>,
}

/// An acknowledged write: the key had `value` at `revision`.
struct Acknowledged {
    key: String,
    value: u64,
    revision: i64,
}

#[derive(Default)]
struct History {
    operations: Vec<Recorded>,
    acknowledged: Vec<Acknowledged>,
    /// The (term, leader) each plane reported last, by plane.
    leaders: Vec<(u64, u64)>,
    /// A plane whose (term, leader) went back, from what to what.
    leader_regressions: Vec<((u64, u64), (u64, u64))>,
}

impl History {
    /// Plane `index` reported `seen` as its (term, leader).
    fn saw_leader(&mut self, index: usize, seen: (u64, u64)) {
        if self.leaders.len() <= index {
            self.leaders.resize(index + 1, (0, 0));
        }
        let last = self.leaders[index];
        if seen < last {
            self.leader_regressions.push((last, seen));
        }
        self.leaders[index] = seen;
    }
}

/// The leader check itself: a second leader of a term, with a greater member ID, is an
/// advance; a plane going back to a smaller one, or to an older term, is caught.
#[test]
fn a_plane_going_back_to_an_older_leader_is_caught() {
    let mut history = History::default();
    history.saw_leader(1, (6, 10));
    history.saw_leader(0, (6, 20));
    history.saw_leader(1, (6, 20));
    history.saw_leader(1, (7, 10));
    assert!(history.leader_regressions.is_empty(), "{:?}", history.leader_regressions);
    history.saw_leader(1, (7, 5));
    history.saw_leader(0, (5, 30));
    assert_eq!(history.leader_regressions, [((7, 10), (7, 5)), ((6, 20), (5, 30))]);
}

fn parse_value(raw: &[u8]) -> u64 {
    std::str::from_utf8(raw).unwrap().parse().unwrap()
}

/// Runs one client: random operations on random keys through random planes until `stop`.
async fn client(
    id: u64,
    clients: Vec<Client>,
    seed: u64,
    origin: Instant,
    history: Arc<Mutex<History>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rng = Rng(seed ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut known: HashMap<String, u64> = HashMap::new();
    let mut counter = 0;
    let now = || origin.elapsed().as_nanos() as u64;
    while !*stop.borrow() {
        let mut client = clients[rng.below(clients.len() as u64) as usize].clone();
        let key = format!("r{}-{}", origin.elapsed().as_millis() / KEY_EPOCH_MS, rng.below(KEYS_AT_ONCE));
        let key = key.as_str();
        counter += 1;
        let value = (id << 32) | counter;
        let choice = rng.below(3);
        let call = now();
        let (op, outcome) = match (choice, known.get(key).copied()) {
            (0, _) => {
                let got = tokio::time::timeout(OP_TIMEOUT, client.get(key, None)).await;
                let Ok(Ok(got)) = got else { continue }; // a failed read says nothing
                let observed = got.kvs().first().map(|kv| parse_value(kv.value()));
                if let Some(observed) = observed {
                    known.insert(key.to_string(), observed);
                }
                (RegisterOp::Read { observed }, Some(None))
            }
            (1, Some(expected)) => {
                let txn = Txn::new()
                    .when([Compare::value(key, CompareOp::Equal, expected.to_string())])
                    .and_then([TxnOp::put(key, value.to_string(), None)]);
                match tokio::time::timeout(OP_TIMEOUT, client.txn(txn)).await {
                    Ok(Ok(done)) => {
                        let revision = done.header().unwrap().revision();
                        let succeeded = done.succeeded();
                        (RegisterOp::Cas { expected, new: value, succeeded }, Some(succeeded.then_some(revision)))
                    }
                    _ => (RegisterOp::Cas { expected, new: value, succeeded: false }, None),
                }
            }
            _ => match tokio::time::timeout(OP_TIMEOUT, client.put(key, value.to_string(), None)).await {
                Ok(Ok(done)) => (RegisterOp::Write { value }, Some(Some(done.header().unwrap().revision()))),
                _ => (RegisterOp::Write { value }, None),
            },
        };
        let ret = outcome.is_some().then(now);
        if ret.is_none() {
            // A client that got an error waits a little, as real clients do, rather than
            // flooding a struggling cluster (and the history) with doomed attempts.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut history = history.lock().unwrap();
        if let Some(Some(revision)) = outcome {
            history.acknowledged.push(Acknowledged { key: key.to_string(), value, revision });
        }
        history.operations.push(Recorded { key: key.to_string(), operation: Operation { call, ret, op } });
    }
}

/// Polls every plane's view of (term, leader) until `stop`.
async fn watch_leaders(
    clients: Vec<Client>,
    history: Arc<Mutex<History>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        for (index, client) in clients.iter().enumerate() {
            let mut client = client.clone();
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(200), client.status()).await {
                if status.leader() != 0 {
                    history.lock().unwrap().saw_leader(index, (status.raft_term(), status.leader()));
                }
            }
        }
    }
}

/// Retries `attempt` (on a clone of `client`) until it succeeds or `SETTLE_TIMEOUT` passes.
async fn settle<T, F: std::future::Future<Output = Result<T, etcd_client::Error>>>(
    what: &str,
    client: &Client,
    attempt: impl Fn(Client) -> F,
) -> T {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut pause = Duration::from_millis(20);
    loop {
        let error = match tokio::time::timeout(OP_TIMEOUT, attempt(client.clone())).await {
            Ok(Ok(value)) => return value,
            Ok(Err(error)) => error.to_string(),
            Err(_) => "timed out".to_string(),
        };
        assert!(Instant::now() < deadline, "{what} never succeeded: {error}");
        // Back-off between attempts at a remote condition; not synchronisation.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// The configurations of `size` planes of one new cluster, with their data under `dir`.
fn cluster_configs(dir: &std::path::Path, size: usize) -> Vec<PlaneConfig> {
    let addrs: Vec<(SocketAddr, SocketAddr)> = (0..size).map(|_| (common::free_addr(), common::free_addr())).collect();
    let initial_cluster: Vec<(String, String)> = addrs
        .iter()
        .enumerate()
        .map(|(index, (_, peer))| (format!("plane-{index}"), format!("http://{peer}")))
        .collect();
    addrs
        .iter()
        .enumerate()
        .map(|(index, (client, peer))| {
            let name = format!("plane-{index}");
            let mut config = PlaneConfig::single(&name, dir.join(&name), *client, *peer);
            config.initial_cluster = initial_cluster.clone();
            config
        })
        .collect()
}

/// Starts a plane for each of `configs`, and connects a client to each.
async fn start_cluster(configs: Vec<PlaneConfig>) -> (Vec<InProcessPlane>, Vec<Client>) {
    let mut planes: Vec<InProcessPlane> =
        configs.into_iter().map(|config| InProcessPlane { config, running: None }).collect();
    for plane in &mut planes {
        plane.start();
    }
    let mut clients = Vec::new();
    for plane in &planes {
        clients.push(Client::connect([format!("http://{}", plane.config.listen_client)], None).await.unwrap());
    }
    (planes, clients)
}

/// Runs one case and asserts every property but linearizability, whose verdict it returns
/// (the first key that fails, with where its history was saved).
async fn run_case(size: usize, steps: Vec<Step>, seed: u64, stale_reads: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut configs = cluster_configs(dir.path(), size);
    let network = Arc::new(Network {
        plane_of_url: configs[0]
            .initial_cluster
            .iter()
            .enumerate()
            .map(|(index, (_, url))| (url.clone(), index))
            .collect(),
        state: Mutex::new(NetworkState { fault: Fault::Healthy, rng: Rng(seed | 1) }),
    });
    for (index, config) in configs.iter_mut().enumerate() {
        config.raft.snapshot_entries = 200;
        config.raft.log_entries_kept = 50;
        config.peer_faults = Some(Arc::new(Hook { network: network.clone(), plane: index }));
        config.unsafe_stale_reads = stale_reads;
    }
    let (mut planes, clients) = start_cluster(configs).await;
    settle("a first write", &clients[0], |mut client| async move { client.put("ready", "1", None).await }).await;

    let origin = Instant::now();
    let history = Arc::new(Mutex::new(History::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        workers.spawn(client(id, clients.clone(), seed, origin, history.clone(), stopped.clone()));
    }
    workers.spawn(watch_leaders(clients.clone(), history.clone(), stopped.clone()));

    for step in &steps {
        network.state.lock().unwrap().fault = step.fault.clone();
        if let Fault::Crash(index) = step.fault {
            planes[index].stop().await;
        }
        tokio::time::sleep(Duration::from_millis(step.millis)).await; // the fault's duration
        if let Fault::Crash(index) = step.fault {
            planes[index].restart().await;
        }
    }
    network.state.lock().unwrap().fault = Fault::Healthy;
    for plane in &mut planes {
        plane.assert_running().await;
    }
    let _ = stop.send(true);
    while workers.join_next().await.is_some() {}

    // Healed: a final read of every key through each plane joins the history.
    let mut history = Arc::into_inner(history).unwrap().into_inner().unwrap();
    let keys: std::collections::BTreeSet<String> =
        history.operations.iter().map(|recorded| recorded.key.clone()).collect();
    for client in &clients {
        for key in &keys {
            let call = origin.elapsed().as_nanos() as u64;
            let got =
                settle("a final read", client, |mut client| async move { client.get(key.as_str(), None).await }).await;
            let ret = origin.elapsed().as_nanos() as u64;
            let observed = got.kvs().first().map(|kv| parse_value(kv.value()));
            history.operations.push(Recorded {
                key: key.clone(),
                operation: Operation { call, ret: Some(ret), op: RegisterOp::Read { observed } },
            });
        }
    }

    // Every acknowledged write is there, at its revision.
    let reader = &clients[0];
    for write in &history.acknowledged {
        let at = |mut client: Client| async move {
            client.get(write.key.as_str(), Some(GetOptions::new().with_revision(write.revision))).await
        };
        let got = settle("a read at a revision", reader, at).await;
        let stored = got.kvs().first().map(|kv| parse_value(kv.value()));
        assert_eq!(stored, Some(write.value), "acknowledged write of {} at {} is lost", write.key, write.revision);
    }

    // All planes converge on one revision and one hash.
    let status = settle("the current revision", reader, |mut client| async move { client.status().await }).await;
    let revision = status.header().unwrap().revision();
    let mut hashes = Vec::new();
    for client in &clients {
        let caught_up = |mut client: Client| async move {
            let status = client.status().await?;
            match status.header().map_or(0, |header| header.revision()) {
                reached if reached >= revision => Ok(()),
                reached => Err(etcd_client::Error::InvalidArgs(format!("at revision {reached}, not {revision}"))),
            }
        };
        settle("catching up", client, caught_up).await;
        let hash = settle("HashKV", client, |mut client| async move { client.hash_kv(revision).await }).await;
        hashes.push(hash.hash());
    }
    assert!(hashes.windows(2).all(|pair| pair[0] == pair[1]), "planes diverged at revision {revision}: {hashes:?}");

    assert!(history.leader_regressions.is_empty(), "(term, leader) went back: {:?}", history.leader_regressions);

    let mut by_key: BTreeMap<String, Vec<Operation<u64>>> = BTreeMap::new();
    for recorded in history.operations {
        by_key.entry(recorded.key).or_default().push(recorded.operation);
    }
    let count: usize = by_key.values().map(Vec::len).sum();
    assert!(count > 50, "too few operations ran ({count}) for the history to say anything");
    let verdict = check_keys(&by_key).map_err(|(key, verdict)| {
        let saved = std::env::temp_dir().join(format!("capstan-chaos-{key}.history"));
        let _ = std::fs::write(&saved, format!("{:#?}", by_key[&key]));
        format!("the history of {key} is not linearizable: {verdict:?}; it is in {}", saved.display())
    });

    for plane in &mut planes {
        plane.stop().await;
    }
    verdict
}

/// One case at a time: several clusters at once on a small machine only test its scheduler.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(size: usize, steps: Vec<Step>, seed: u64, stale_reads: bool) -> Result<(), String> {
    alone(run_case(size, steps, seed, stale_reads))
}

/// Runs `test` on a runtime of its own, while no other case runs.
fn alone<T>(test: impl std::future::Future<Output = T>) -> T {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(test)
}

/// The whole harness catches a broken cluster: planes that answer linearizable reads from
/// their own state (skipping read-index), with one plane cut off, serve stale reads, and
/// the history says so.
#[test]
fn planes_serving_stale_reads_are_caught() {
    let isolate_last = |millis| Step { fault: Fault::Partition(0b100), millis };
    let steps = vec![isolate_last(1_500), Step { fault: Fault::Healthy, millis: 300 }, isolate_last(1_500)];
    let verdict = run(3, steps, 7, true);
    assert!(verdict.is_err(), "stale reads went unnoticed");
}

/// Few cases, since each runs a cluster for seconds; no shrinking, since a smaller schedule
/// is no cheaper to understand than the failing one; failures saved for replay.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 0,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            "tests/cluster_chaos.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(3))]

    #[test]
    fn three_planes_stay_linearizable_under_faults(steps in schedule(3), seed in any::<u64>()) {
        if let Err(violation) = run(3, steps, seed, false) {
            panic!("{violation}");
        }
    }
}

proptest! {
    #![proptest_config(config(2))]

    #[test]
    fn five_planes_stay_linearizable_under_faults(steps in schedule(5), seed in any::<u64>()) {
        if let Err(violation) = run(5, steps, seed, false) {
            panic!("{violation}");
        }
    }
}

/// Holds a plane's WAL syncs while closed (`capstan_raft::log_store::SyncFaults`).
#[derive(Default)]
struct SyncGate {
    held: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl SyncGate {
    fn hold(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.opened.notify_all();
    }
}

impl capstan_raft::log_store::SyncFaults for SyncGate {
    fn before_sync(&self) {
        let held = self.held.lock().unwrap();
        drop(self.opened.wait_while(held, |held| *held).unwrap());
    }
}

/// Whose WAL syncs a `Stalled` cluster holds back.
#[derive(Clone, Copy, Debug)]
enum Held {
    Leader,
    Followers,
}

/// A cluster that holds back the WAL syncs of its leader (or of both followers) while a
/// write the leader took is in the other planes' logs.
struct Stalled {
    _dir: tempfile::TempDir,
    planes: Vec<InProcessPlane>,
    clients: Vec<Client>,
    gates: Vec<Arc<SyncGate>>,
    leader: usize,
    held: Vec<usize>,
    /// The held write, not answered yet.
    put: tokio::task::JoinHandle<Result<etcd_client::PutResponse, etcd_client::Error>>,
}

impl Stalled {
    async fn start(held: Held) -> Stalled {
        let dir = tempfile::tempdir().unwrap();
        let gates: Vec<Arc<SyncGate>> = (0..3).map(|_| Arc::default()).collect();
        let mut configs = cluster_configs(dir.path(), 3);
        for (config, gate) in configs.iter_mut().zip(&gates) {
            // The followers must not give up on the held leader while the test looks.
            config.raft.election_timeout_ms = 10_000;
            config.sync_faults = Some(gate.clone());
        }
        let (planes, clients) = start_cluster(configs).await;
        settle("a first write", &clients[0], |mut client| async move { client.put("ready", "1", None).await }).await;
        let statuses = || async {
            let mut statuses = Vec::new();
            for client in &clients {
                statuses.push(client.clone().status().await.unwrap());
            }
            statuses
        };
        let before = statuses().await;
        let leader = before.iter().position(|status| status.leader() == status.header().unwrap().member_id()).unwrap();
        let written = before[leader].raft_index();
        // Each plane applies only what its log has made durable: once all have applied the
        // first write, none is still syncing it. (A follower whose gate closed on an
        // unsynced entry would never answer for it, and so never be sent the held write.)
        let applied = async {
            while !statuses().await.iter().all(|status| status.raft_applied_index() >= written) {
                tokio::time::sleep(Duration::from_millis(10)).await; // polling the planes' applies
            }
        };
        tokio::time::timeout(SETTLE_TIMEOUT, applied).await.expect("every plane applies the first write");
        let followers: Vec<usize> = (0..3).filter(|index| *index != leader).collect();
        let held = match held {
            Held::Leader => vec![leader],
            Held::Followers => followers.clone(),
        };
        for index in &held {
            gates[*index].hold(true);
        }
        let put = tokio::spawn({
            let mut client = clients[leader].clone();
            async move { client.put("durable", "1", None).await }
        });
        let appended = async {
            loop {
                let now = statuses().await;
                if followers.iter().all(|index| now[*index].raft_index() > written) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await; // polling the followers' logs
            }
        };
        tokio::time::timeout(SETTLE_TIMEOUT, appended).await.expect("both followers append the held write");
        Stalled { _dir: dir, planes, clients, gates, leader, held, put }
    }

    /// Lets the held syncs go on; the held write's revision, once answered.
    async fn resume(&mut self) -> i64 {
        for index in &self.held {
            self.gates[*index].hold(false);
        }
        let answered = tokio::time::timeout(SETTLE_TIMEOUT, &mut self.put).await.expect("the write is answered");
        answered.unwrap().unwrap().header().unwrap().revision()
    }

    async fn stop(mut self) {
        for plane in &mut self.planes {
            plane.stop().await;
        }
    }
}

/// Planes tell openraft of their appends before they are durable: a leader, so that they
/// go to the followers while its fsync runs; a follower, so that it applies what the same
/// AppendEntries says is committed while it syncs. With the leader's syncs held back, a
/// write that both followers have made durable is still neither applied anywhere nor
/// answered: the leader's copy is not durable, so a majority's disks do not hold it yet.
#[test]
fn nothing_is_applied_before_the_leaders_own_copy_is_durable() {
    nothing_is_applied_while_held(Held::Leader);
}

/// With both followers' syncs held back, a write the leader has made durable and both
/// followers have in their logs is neither applied anywhere nor answered: a follower
/// answers an AppendEntries only once its copy is durable.
#[test]
fn nothing_is_applied_before_a_followers_copy_is_durable() {
    nothing_is_applied_while_held(Held::Followers);
}

/// While the syncs of `held` are held back, for many heartbeats, the write is neither
/// answered nor applied on any plane; once they go on, it is answered and every plane
/// applies it.
fn nothing_is_applied_while_held(held: Held) {
    alone(async {
        let mut stalled = Stalled::start(held).await;
        let watching = Instant::now();
        while watching.elapsed() < Duration::from_millis(1_000) {
            assert!(!stalled.put.is_finished(), "a write was answered before a majority's copies were durable");
            for (index, client) in stalled.clients.iter().enumerate() {
                let got = client.clone().get("durable", Some(GetOptions::new().with_serializable())).await.unwrap();
                assert!(got.kvs().is_empty(), "plane {index} applied a write while the syncs of {held:?} were held");
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // watching for what must not happen
        }

        let revision = stalled.resume().await;
        for client in &stalled.clients {
            let got = settle("a read of the write", client, |mut client| async move {
                let got = client.get("durable", Some(GetOptions::new().with_serializable())).await?;
                match got.kvs().first() {
                    Some(_) => Ok(got),
                    None => Err(etcd_client::Error::InvalidArgs("not applied yet".into())),
                }
            })
            .await;
            assert_eq!(got.kvs()[0].mod_revision(), revision);
        }
        stalled.stop().await;
    });
}

/// While the leader's disk stalls with a commit pending, its heartbeats wait for its own
/// copy (a follower hears of a commit only once the leader's copy is durable), so no quorum
/// confirms its leadership in time and read-index rounds fail. Linearizable reads taken
/// meanwhile, on the leader and through a follower, keep trying rather than waiting for a
/// leader change that is not coming: once the disk goes on they are answered. Each was
/// invoked while the write was in flight, so either answer (without the write or with it)
/// is linearizable, and so is an answer during the stall, from a round that began before
/// the leader counted the write committed (rare: most runs see every round fail); a read
/// invoked after the write was answered must see it.
#[test]
fn reads_taken_during_a_leader_disk_stall_are_answered_once_it_ends() {
    alone(async {
        let mut stalled = Stalled::start(Held::Leader).await;
        let follower = (stalled.leader + 1) % 3;
        let reads: Vec<_> = [stalled.leader, follower]
            .into_iter()
            .map(|index| {
                let mut client = stalled.clients[index].clone();
                tokio::spawn(async move { client.get("durable", None).await })
            })
            .collect();
        // The stall lasts many heartbeats: the reads' rounds fail meanwhile.
        tokio::time::sleep(Duration::from_millis(1_000)).await; // the fault's length

        let revision = stalled.resume().await;
        for (read, on) in reads.into_iter().zip(["the leader", "a follower"]) {
            let got = read.await.unwrap().unwrap_or_else(|error| panic!("the read on {on} failed: {error}"));
            let seen = got.kvs().first().map(|kv| kv.mod_revision());
            assert!(
                seen.is_none() || seen == Some(revision),
                "the read on {on} saw revision {seen:?}, not the write's {revision}"
            );
        }
        for (index, client) in stalled.clients.iter().enumerate() {
            let got = client.clone().get("durable", None).await.unwrap();
            assert_eq!(got.kvs().first().map(|kv| kv.mod_revision()), Some(revision), "a later read on plane {index}");
        }
        stalled.stop().await;
    });
}
