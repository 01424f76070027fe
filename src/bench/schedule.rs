//! `capstan bench schedule --nodes N --pods M`: the shape of Kubernetes' scheduler_perf
//! SchedulingBasic. Registers N Ready nodes (with leases, as agents would hold them),
//! then creates M pods as fast as the cluster takes them, and watches them get bound by
//! whichever scheduler leads. Reports pods bound per second (first create to last bind)
//! and each pod's latency from its create being acknowledged to its bind being seen.
//! Everything it creates lives under `bench-` names and is deleted before and after.
//!
//! `capstan bench pod-start --pods N` needs real agents: it creates N pods and reports
//! each one's time from being seen bound to being seen Running (the kubelet's pod
//! startup latency, whose Kubernetes SLO is p99 <= 5 s).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capstan_client::{create_op, Objects};
use capstan_proto::objects::{decode_stored, Kind, Node, Object, Pod, PodPhase, NODE_LEASE_PREFIX};
use etcd_client::{DeleteOptions, EventType, PutOptions, Txn, TxnOp, WatchOptions, WatchStream};

use super::{percentile, BenchArgs};

const NAMESPACE: &str = "bench-schedule";
const NODE_PREFIX: &str = "bench-node-";
/// Creates per txn (etcd's limit is 128 ops per branch).
const CREATES_PER_TXN: usize = 128;
/// How long binding may take in all before the run is declared failed.
const BIND_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn run(args: &BenchArgs, endpoints: &[String], nodes: usize, pods: usize) -> anyhow::Result<()> {
    let credentials = args.credentials.credentials();
    let client = capstan_client::connect_with(endpoints, Duration::from_secs(30), &credentials)
        .await
        .context("cannot connect")?;
    let objects = Objects::new(client.clone());
    clean(&objects).await?;
    let started = Instant::now();
    let node_objects: Vec<Object> = (0..nodes).map(node).collect();
    create_all(&objects, &node_objects, args.clients.max(1)).await?;
    let lease = client.lease_client().grant(3600, None).await?.id();
    for chunk in (0..nodes).collect::<Vec<_>>().chunks(CREATES_PER_TXN) {
        let puts: Vec<TxnOp> = chunk
            .iter()
            .map(|i| {
                TxnOp::put(
                    format!("{NODE_LEASE_PREFIX}{NODE_PREFIX}{i:05}"),
                    "",
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        client.kv_client().txn(Txn::new().and_then(puts)).await?;
    }
    eprintln!("{nodes} nodes registered in {:.1} s", started.elapsed().as_secs_f64());

    // Watch the pods from before the first is created, so no bind is missed.
    let revision = client.kv_client().get("bench", None).await?.header().map_or(0, |h| h.revision());
    let prefix = Kind::Pod.namespace_prefix(NAMESPACE);
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = client.watch_client().watch(prefix, Some(options)).await?;
    let pod_objects: Vec<Object> = (0..pods).map(pod).collect();
    let creating = Instant::now();
    let created_at = {
        let objects = objects.clone();
        let clients = args.clients.max(1);
        tokio::spawn(async move { create_all(&objects, &pod_objects, clients).await })
    };
    let seen =
        observe(&mut stream, |seen| seen.bound_at.len() >= pods, "bound: is a scheduler running (plane --scheduler)?")
            .await?;
    let bound_at = seen.bound_at;
    let created_at = created_at.await.context("the creating task panicked")??;
    let last_bound = bound_at.values().max().copied().unwrap_or(creating);
    let (p50, p99) = latency_percentiles(&created_at, &bound_at);
    let creation_secs = created_at.values().max().map_or(0.0, |last| last.duration_since(creating).as_secs_f64());
    let total_secs = last_bound.duration_since(creating).as_secs_f64().max(1e-9);
    let rate = pods as f64 / total_secs;
    clean(&objects).await?;
    client.lease_client().revoke(lease).await?;
    if args.json {
        let result = serde_json::json!({
            "workload": "schedule", "nodes": nodes, "pods": pods, "pods_bound_per_sec": rate,
            "seconds": total_secs, "creation_seconds": creation_secs, "p50_ms": p50, "p99_ms": p99,
        });
        println!("{result}");
    } else {
        println!(
            "schedule {nodes} nodes, {pods} pods  {rate:.0} pods bound/s ({total_secs:.1} s; creating took {creation_secs:.1} s)  create→bound p50 {p50:.0} ms  p99 {p99:.0} ms"
        );
    }
    Ok(())
}

const START_NAMESPACE: &str = "bench-pod-start";

pub async fn pod_start(args: &BenchArgs, endpoints: &[String], pods: usize) -> anyhow::Result<()> {
    let credentials = args.credentials.credentials();
    let client = capstan_client::connect_with(endpoints, Duration::from_secs(30), &credentials)
        .await
        .context("cannot connect")?;
    let objects = Objects::new(client.clone());
    let prefix = Kind::Pod.namespace_prefix(START_NAMESPACE);
    client.kv_client().delete(prefix.clone(), Some(DeleteOptions::new().with_prefix())).await?;
    let revision = client.kv_client().get("bench", None).await?.header().map_or(0, |h| h.revision());
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = client.watch_client().watch(prefix.clone(), Some(options)).await?;
    let pod_objects: Vec<Object> = (0..pods)
        .map(|index| {
            let mut object = pod(index);
            if let Object::Pod(pod) = &mut object {
                pod.metadata.namespace = START_NAMESPACE.into();
                pod.spec.containers[0].resources.requests.clear();
            }
            object
        })
        .collect();
    create_all(&objects, &pod_objects, args.clients.max(1)).await?;
    let Seen { bound_at, running_at } =
        observe(&mut stream, |seen| seen.running_at.len() >= pods, "Running: are agents running?").await?;
    let (p50, p99) = latency_percentiles(&bound_at, &running_at);
    client.kv_client().delete(prefix, Some(DeleteOptions::new().with_prefix())).await?;
    if args.json {
        println!("{}", serde_json::json!({"workload": "pod-start", "pods": pods, "p50_ms": p50, "p99_ms": p99}));
    } else {
        println!("pod-start {pods} pods  bound→Running p50 {p50:.0} ms  p99 {p99:.0} ms");
    }
    Ok(())
}

/// p50 and p99, in ms, of the time from each key's `from` instant to its `to` instant.
fn latency_percentiles(from: &HashMap<Vec<u8>, Instant>, to: &HashMap<Vec<u8>, Instant>) -> (f64, f64) {
    let mut latencies_us: Vec<u32> = from
        .iter()
        .filter_map(|(key, start)| to.get(key).map(|end| end.saturating_duration_since(*start)))
        .map(|latency| latency.as_micros().min(u32::MAX as u128) as u32)
        .collect();
    latencies_us.sort_unstable();
    (percentile(&latencies_us, 0.5), percentile(&latencies_us, 0.99))
}

/// When each pod was first seen bound, and first seen Running.
#[derive(Default)]
struct Seen {
    bound_at: HashMap<Vec<u8>, Instant>,
    running_at: HashMap<Vec<u8>, Instant>,
}

/// Follows a watch of pods until `done`; fails after [`BIND_TIMEOUT`], saying what
/// (`waiting_for`) did not happen.
async fn observe(stream: &mut WatchStream, done: impl Fn(&Seen) -> bool, waiting_for: &str) -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + BIND_TIMEOUT;
    while !done(&seen) {
        let Ok(message) = tokio::time::timeout_at(deadline, stream.message()).await else {
            bail!("not every pod was {waiting_for} (waited {BIND_TIMEOUT:?})");
        };
        let response = message?.context("the watch ended")?;
        let now = Instant::now();
        for event in response.events() {
            let Some(kv) = event.kv().filter(|_| event.event_type() == EventType::Put) else { continue };
            if let Ok(Object::Pod(pod)) = decode_stored(kv.key(), kv.value(), kv.mod_revision()) {
                if !pod.spec.node_name.is_empty() {
                    seen.bound_at.entry(kv.key().to_vec()).or_insert(now);
                }
                if pod.status.phase == PodPhase::Running {
                    seen.running_at.entry(kv.key().to_vec()).or_insert(now);
                }
            }
        }
    }
    Ok(seen)
}

/// Creates objects in txns of [`CREATES_PER_TXN`] from `writers` concurrent writers;
/// returns when each object's create was acknowledged, by key.
async fn create_all(objects: &Objects, all: &[Object], writers: usize) -> anyhow::Result<HashMap<Vec<u8>, Instant>> {
    let chunks: Vec<Vec<Object>> = all.chunks(CREATES_PER_TXN).map(<[Object]>::to_vec).collect();
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(chunks.into_iter()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let (queue, client) = (queue.clone(), objects.client().clone());
        tasks.spawn(async move {
            let mut acknowledged = Vec::new();
            loop {
                let Some(chunk) = queue.lock().await.next() else { return Ok::<_, anyhow::Error>(acknowledged) };
                let (compares, puts): (Vec<_>, Vec<_>) = chunk.iter().map(create_op).unzip();
                let response = client.kv_client().txn(Txn::new().when(compares).and_then(puts)).await?;
                if !response.succeeded() {
                    bail!("an object to create already exists (left from another run?)");
                }
                let now = Instant::now();
                acknowledged.extend(chunk.iter().map(|object| (object.key().into_bytes(), now)));
            }
        });
    }
    let mut all_acknowledged = HashMap::with_capacity(all.len());
    while let Some(done) = tasks.join_next().await {
        all_acknowledged.extend(done.context("a creating task panicked")??);
    }
    Ok(all_acknowledged)
}

/// Deletes what a run creates.
async fn clean(objects: &Objects) -> anyhow::Result<()> {
    let prefixes = [
        Kind::Pod.namespace_prefix(NAMESPACE),
        format!("{}{NODE_PREFIX}", Kind::Node.prefix()),
        format!("{NODE_LEASE_PREFIX}{NODE_PREFIX}"),
    ];
    for prefix in prefixes {
        objects.client().kv_client().delete(prefix, Some(DeleteOptions::new().with_prefix())).await?;
    }
    Ok(())
}

fn node(index: usize) -> Object {
    Object::Node(Node::ready(&format!("{NODE_PREFIX}{index:05}"), "32", "128Gi", "110"))
}

fn pod(index: usize) -> Object {
    Object::Pod(Pod::requesting(NAMESPACE, &format!("pod-{index:06}"), &["sleep", "3600"], "100m", "128Mi"))
}
