//! `capstan bench`: load over the etcd v3 API, so that it measures etcd and Capstan alike.
//!
//! Workers (`--in-flight` of them) share `--clients` connections, spread round-robin over
//! the endpoints; each worker sends one request at a time for `--duration-secs` after a
//! warm-up, and records every latency. `failover` instead sends sequential puts and
//! reports the longest gap between two acknowledged ones: kill the leader while it runs.
//! `watch` measures watch fan-out: see `watch.rs`; `schedule` measures the scheduler: see
//! `schedule.rs`.

mod schedule;
mod watch;

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use etcd_client::{Client, Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp};
use tonic::transport::Endpoint;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Comma-separated gRPC endpoints (host:port or http://host:port).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub credentials: crate::cli::CredentialArgs,
    /// gRPC connections, spread over the endpoints.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Requests in flight at once (workers), spread over the connections.
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 1)]
    pub warmup_secs: u64,
    /// Distinct keys written or read.
    #[arg(long, default_value_t = 1000)]
    pub key_count: u64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub workload: Workload,
}

#[derive(Subcommand, Debug, Clone, Copy)]
pub enum Workload {
    /// Puts of random keys.
    Put,
    /// Gets of random existing keys.
    Range {
        #[arg(long, value_enum, default_value_t = Consistency::L)]
        consistency: Consistency,
    },
    /// Txns that compare a key's mod revision, then put it.
    Txn,
    /// One writer and many watchers of its keys; reports events delivered per second and
    /// each event's delay from put to delivery.
    Watch {
        #[arg(long, default_value_t = 128)]
        watchers: usize,
    },
    /// Sequential puts; reports the longest gap without an acknowledged put.
    Failover,
    /// Registers nodes, creates pods, and measures how fast the cluster's scheduler binds
    /// them (pods/s, and creation-to-bound latency). Needs planes run with --scheduler.
    Schedule {
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
        #[arg(long, default_value_t = 10_000)]
        pods: usize,
    },
    /// Creates pods and measures how long node agents take from a pod's bind to its
    /// Running status (p50/p99). Needs a scheduler and running agents.
    PodStart {
        #[arg(long, default_value_t = 200)]
        pods: usize,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Linearizable.
    L,
    /// Serializable.
    S,
}

/// How long one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Failover puts give up sooner, so that the next goes to a surviving member.
const FAILOVER_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

fn key(index: u64) -> String {
    format!("bench/{index:08}")
}

/// One worker's tally.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let credentials = args.credentials.credentials();
    let endpoints = credentials.urls(&args.endpoints);
    match args.workload {
        Workload::Failover => return failover(&args, &endpoints).await,
        Workload::Watch { watchers } => return watch::run(&args, &endpoints, watchers).await,
        Workload::Schedule { nodes, pods } => return schedule::run(&args, &endpoints, nodes, pods).await,
        Workload::PodStart { pods } => return schedule::pod_start(&args, &endpoints, pods).await,
        _ => {}
    }
    let connections = connect(&args, &endpoints).await?;
    let value = "v".repeat(args.value_size);
    if let Workload::Range { .. } = args.workload {
        populate(&connections, args.key_count, &value).await?;
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let end = measure_from + Duration::from_secs(args.duration_secs);
    let (progress, mut progress_seen) = tokio::sync::watch::channel(0u64);
    let progress = std::sync::Arc::new(progress);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.in_flight.max(1) {
        // A worker's own KV client, not a clone of the whole client per request: those
        // clones (ten service clients) were a tenth of the bench's CPU.
        let mut kv = connections[worker % connections.len()].kv_client();
        let (value, workload, key_count, progress) = (value.clone(), args.workload, args.key_count, progress.clone());
        workers.spawn(async move {
            let mut tally = Tally::default();
            let mut state = (worker as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            while Instant::now() < end {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let key = key(state % key_count.max(1));
                let sent = Instant::now();
                let ok = request(&mut kv, workload, key, &value).await;
                if sent < measure_from {
                    continue;
                }
                match ok {
                    Ok(()) => tally.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    Err(_) => tally.errors += 1,
                }
                progress.send_modify(|done| *done += 1);
            }
            tally
        });
    }
    let reporter = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let done = *progress_seen.borrow_and_update();
            eprint!("\r{:>4} s  {done} requests measured", start.elapsed().as_secs());
        }
    });
    let mut all = Tally::default();
    while let Some(tally) = workers.join_next().await {
        let tally = tally.context("a bench worker panicked")?;
        all.latencies_us.extend(tally.latencies_us);
        all.errors += tally.errors;
    }
    reporter.abort();
    eprintln!();
    report(&args, &mut all);
    Ok(())
}

/// `--clients` connections, each to one endpoint, round-robin. Each is a tonic channel
/// over a coalescing connection (`crate::socket`): the bench shares the machine with the
/// servers it measures, and a system call per request would cost it CPU they could use.
async fn connect(args: &BenchArgs, endpoints: &[String]) -> anyhow::Result<Vec<Client>> {
    let credentials = args.credentials.credentials();
    let options = credentials.connect_options(REQUEST_TIMEOUT)?;
    let tls = credentials.tls_options()?;
    let mut connections = Vec::new();
    for index in 0..args.clients.max(1) {
        let url = &endpoints[index % endpoints.len()];
        let mut endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad endpoint {url}"))?
            .connect_timeout(REQUEST_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if let Some(tls) = &tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint
            .connect_with_connector(crate::socket::Connector)
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let client = Client::from_channel(etcd_client::Channel::Tonic(channel), Some(options.clone()))
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        connections.push(client);
    }
    Ok(connections)
}

async fn request(kv: &mut KvClient, workload: Workload, key: String, value: &str) -> Result<(), etcd_client::Error> {
    match workload {
        Workload::Put
        | Workload::Failover
        | Workload::Watch { .. }
        | Workload::Schedule { .. }
        | Workload::PodStart { .. } => kv.put(key, value, None).await.map(|_| ()),
        Workload::Range { consistency } => {
            let options = (consistency == Consistency::S).then(|| GetOptions::new().with_serializable());
            kv.get(key, options).await.map(|_| ())
        }
        Workload::Txn => {
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Less, i64::MAX)])
                .and_then([TxnOp::put(key, value, None)]);
            kv.txn(txn).await.map(|_| ())
        }
    }
}

/// Puts in each txn that loads the keys: etcd's default `--max-txn-ops`, which Capstan has too.
const POPULATE_TXN_PUTS: u64 = 128;

/// Writes every key a range workload reads, 128 to a txn, so that millions load in minutes.
async fn populate(connections: &[Client], key_count: u64, value: &str) -> anyhow::Result<()> {
    let mut writers = tokio::task::JoinSet::new();
    let chunk = key_count.div_ceil(16).max(1);
    for (writer, first) in (0..key_count).step_by(chunk as usize).enumerate() {
        let mut client = connections[writer % connections.len()].clone();
        let value = value.to_string();
        let end = (first + chunk).min(key_count);
        writers.spawn(async move {
            for start in (first..end).step_by(POPULATE_TXN_PUTS as usize) {
                let puts = (start..(start + POPULATE_TXN_PUTS).min(end))
                    .map(|index| TxnOp::put(key(index), value.as_str(), None));
                client.txn(Txn::new().and_then(puts.collect::<Vec<_>>())).await?;
            }
            Ok::<_, etcd_client::Error>(())
        });
    }
    while let Some(written) = writers.join_next().await {
        written.context("a populating writer panicked")?.context("cannot populate the keys")?;
    }
    Ok(())
}

pub(crate) fn percentile(sorted: &[u32], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[index]) / 1000.0
}

fn report(args: &BenchArgs, tally: &mut Tally) {
    tally.latencies_us.sort_unstable();
    let seconds = args.duration_secs.max(1) as f64;
    let throughput = tally.latencies_us.len() as f64 / seconds;
    let (p50, p99, p999) = (
        percentile(&tally.latencies_us, 0.5),
        percentile(&tally.latencies_us, 0.99),
        percentile(&tally.latencies_us, 0.999),
    );
    let workload = match args.workload {
        Workload::Put => "put".to_string(),
        Workload::Range { consistency: Consistency::L } => "range-linearizable".to_string(),
        Workload::Range { consistency: Consistency::S } => "range-serializable".to_string(),
        Workload::Txn => "txn".to_string(),
        Workload::Watch { watchers } => format!("watch ({watchers} watchers)"),
        Workload::Failover => "failover".to_string(),
        Workload::Schedule { .. } => "schedule".to_string(),
        Workload::PodStart { .. } => "pod-start".to_string(),
    };
    if args.json {
        let result = serde_json::json!({
            "workload": workload, "clients": args.clients, "in_flight": args.in_flight,
            "duration_secs": args.duration_secs, "requests": tally.latencies_us.len(), "errors": tally.errors,
            "throughput_per_sec": throughput, "p50_ms": p50, "p99_ms": p99, "p999_ms": p999,
        });
        println!("{result}");
    } else {
        println!(
            "{workload} {}:{}  {throughput:.0}/s  p50 {p50:.2} ms  p99 {p99:.2} ms  p99.9 {p999:.2} ms  errors {}",
            args.clients, args.in_flight, tally.errors
        );
    }
}

/// Sequential puts for the duration; the longest time between two acknowledged puts is
/// the write-unavailability gap a leader failure caused.
async fn failover(args: &BenchArgs, endpoints: &[String]) -> anyhow::Result<()> {
    let options = args.credentials.credentials().connect_options(FAILOVER_REQUEST_TIMEOUT)?;
    let mut client = Client::connect(endpoints, Some(options)).await.context("cannot connect")?;
    let value = "v".repeat(args.value_size);
    let end = Instant::now() + Duration::from_secs(args.duration_secs);
    let (mut last_ack, mut longest_gap, mut acknowledged, mut errors) = (Instant::now(), Duration::ZERO, 0u64, 0u64);
    let mut index = 0;
    while Instant::now() < end {
        index += 1;
        match client.put(key(index % args.key_count.max(1)), value.as_str(), None).await {
            Ok(_) => {
                longest_gap = longest_gap.max(last_ack.elapsed());
                last_ack = Instant::now();
                acknowledged += 1;
            }
            Err(_) => errors += 1,
        }
    }
    // A cluster that never recovered is one long gap up to the end.
    longest_gap = longest_gap.max(last_ack.elapsed());
    let gap_ms = longest_gap.as_secs_f64() * 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"workload": "failover", "gap_ms": gap_ms, "acknowledged": acknowledged, "errors": errors})
        );
    } else {
        println!("failover  longest gap {gap_ms:.0} ms  acknowledged {acknowledged}  errors {errors}");
    }
    Ok(())
}
