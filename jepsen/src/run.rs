//! One chaos run: a cluster of real planes in network namespaces, the chosen workloads'
//! clients spread over the planes, the nemesis injecting faults on a schedule, then the
//! heal, the final reads, and every workload's history checked. The run's directory gets
//! the planes' data and logs, `history.jsonl`, `report.json`, `timeline.html` and plots.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::check::{check, Check};
use crate::client::{next_revision, Run, Session};
use crate::cluster::Cluster;
use crate::history::{write_history, Clock, History, Op, Outcome};
use crate::nemesis::{Fault, Nemesis};
use crate::workload::{bank, lock, register, scheduler, set, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Per-key read/write/compare-and-set, checked for linearizability.
    Register,
    /// Unique adds and a final read: no acknowledged add may be lost.
    Set,
    /// Transfers between accounts in txns: every read conserves the total.
    Bank,
    /// A watcher on every plane: ordered, gap-free, resumable, identical streams.
    Watch,
    /// A lease lock with fencing tokens: holders' writes never overlap.
    Lock,
    /// The planes' schedulers bind pods the clients create and delete: never twice,
    /// never over a node's capacity, all of them after the heal.
    Scheduler,
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The `capstan` binary the planes run.
    pub capstan: PathBuf,
    /// Where the planes' data, their logs, the history and the report go.
    pub dir: PathBuf,
    pub nodes: usize,
    pub time_limit: Duration,
    pub workloads: Vec<Workload>,
    /// The nemesis' turns, in order and then again: each a fault or faults at once.
    pub schedule: Vec<Vec<Fault>>,
    /// How long a fault lasts, and the calm between two.
    pub fault_interval: Duration,
    /// Register keys in use at a time.
    pub keys: usize,
    /// Clients of the register, set, bank, lock and scheduler workloads, dealt out among
    /// them in that order and spread over the planes. The watch workload has a watcher per
    /// plane.
    pub concurrency: usize,
    /// Operations per second over all clients; 0: as fast as they go.
    pub rate: u32,
    /// Seeds every random choice (operations, values picked, faults and their targets).
    pub seed: u64,
    /// Extra flags for every plane (`--unsafe-stale-reads` proves the checker). The
    /// scheduler workload adds its own.
    pub plane_args: Vec<String>,
    /// Mutual TLS between the planes and for every client, with certificates made for
    /// the run in `<dir>/tls`.
    pub tls: bool,
}

#[derive(Debug)]
pub struct Report {
    pub operations: usize,
    pub ok: usize,
    pub info: usize,
    pub fail: usize,
    /// What the nemesis did, with when.
    pub faults: Vec<String>,
    /// Each workload's verdict.
    pub checks: Vec<(&'static str, Check)>,
    /// Anything that went wrong around the checks (a final read that failed).
    pub notes: Vec<String>,
}

impl Report {
    pub fn valid(&self) -> bool {
        self.checks.iter().all(|(_, check)| check.valid)
    }

    pub fn check(&self, workload: &str) -> Option<&Check> {
        self.checks.iter().find(|(name, _)| *name == workload).map(|(_, check)| check)
    }

    /// One screen for people: the faults, the operations, each verdict.
    pub fn summary(&self) -> String {
        let mut lines: Vec<String> = self.faults.clone();
        lines.push(format!(
            "{} operations: {} ok, {} unknown, {} failed",
            self.operations, self.ok, self.info, self.fail
        ));
        lines.extend(self.notes.iter().map(|note| format!("note: {note}")));
        for (workload, check) in &self.checks {
            lines.push(format!("{workload:<9} {} {}", if check.valid { "valid  " } else { "INVALID" }, check.summary));
        }
        lines.push(if self.valid() { "valid: yes".into() } else { "valid: NO".into() });
        lines.join("\n")
    }

    pub fn to_json(&self, seed: Option<u64>) -> serde_json::Value {
        let checks: serde_json::Map<String, serde_json::Value> = self
            .checks
            .iter()
            .map(|(workload, check)| {
                let mut detail = check.detail.clone();
                detail["valid"] = check.valid.into();
                detail["summary"] = check.summary.clone().into();
                (workload.to_string(), detail)
            })
            .collect();
        serde_json::json!({
            "seed": seed, "valid": self.valid(), "operations": self.operations, "ok": self.ok, "info": self.info,
            "fail": self.fail, "faults": self.faults, "notes": self.notes, "checkers": checks,
        })
    }
}

/// Counts and checks a history.
pub fn analyze(history: &History) -> Report {
    let clients = history.iter().filter(|record| !matches!(record.op, Op::Fault { .. }));
    let count = |outcome| clients.clone().filter(|record| record.outcome == outcome).count();
    let faults = history
        .iter()
        .filter_map(|record| match &record.op {
            Op::Fault { what } => {
                Some(format!("{:>8.3}s–{:.3}s {what}", record.call as f64 / 1e9, record.ret as f64 / 1e9))
            }
            _ => None,
        })
        .collect();
    Report {
        operations: clients.clone().count(),
        ok: count(Outcome::Ok),
        info: count(Outcome::Info),
        fail: count(Outcome::Fail),
        faults,
        checks: check(history),
        notes: Vec::new(),
    }
}

pub async fn run(config: RunConfig) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&config.dir).with_context(|| format!("cannot create {}", config.dir.display()))?;
    let has = |workload| config.workloads.contains(&workload);
    let mut plane_args = config.plane_args.clone();
    if has(Workload::Scheduler) {
        plane_args.extend(scheduler::PLANE_ARGS.iter().map(|arg| arg.to_string()));
    }
    let mut cluster = Cluster::start(&config.capstan, &config.dir, config.nodes, &plane_args, config.tls)?;
    cluster.wait_until_serving(Duration::from_secs(60)).await?;
    let endpoints = cluster.endpoints();
    if has(Workload::Bank) {
        bank::open_accounts(&endpoints).await.context("cannot open the bank's accounts")?;
    }
    if has(Workload::Scheduler) {
        scheduler::register_nodes(&endpoints).await.context("cannot register the scheduler workload's nodes")?;
    }
    let start_revision = next_revision(&endpoints).await?;

    let clock = Clock::start();
    let deadline = Instant::now() + config.time_limit;
    let pause = match config.rate {
        0 => Duration::ZERO,
        rate => Duration::from_secs_f64(config.concurrency as f64 / f64::from(rate)),
    };
    let shared = Run { clock, deadline, pause };
    let mut clients = tokio::task::JoinSet::new();
    let dealt: Vec<Workload> = config.workloads.iter().copied().filter(|w| *w != Workload::Watch).collect();
    let scheduler_clients =
        dealt.iter().cycle().take(config.concurrency).filter(|workload| **workload == Workload::Scheduler).count();
    for (process, workload) in dealt.iter().cycle().take(config.concurrency).enumerate() {
        let session = Session::new(process, endpoints.one(process % cluster.len()), shared);
        let rng = fastrand::Rng::with_seed(config.seed.wrapping_add(process as u64 + 1));
        match workload {
            Workload::Register => clients.spawn(register::client(session, config.keys, rng)),
            Workload::Set => clients.spawn(set::client(session)),
            Workload::Bank => clients.spawn(bank::client(session, rng)),
            Workload::Lock => clients.spawn(lock::client(session, rng)),
            Workload::Scheduler => clients.spawn(scheduler::client(session, scheduler_clients, rng)),
            Workload::Watch => unreachable!("watchers are not dealt"),
        };
    }
    let mut next_process = config.concurrency;
    if has(Workload::Watch) {
        for plane in 0..cluster.len() {
            let session = Session::new(next_process, endpoints.one(plane), shared);
            clients.spawn(watch::watcher(session, plane, start_revision));
            next_process += 1;
        }
    }
    let nemesis = Nemesis {
        cluster: &mut cluster,
        schedule: config.schedule.clone(),
        interval: config.fault_interval,
        rng: fastrand::Rng::with_seed(config.seed),
        clock,
    };
    let mut history = nemesis.run(deadline).await?;
    while let Some(records) = clients.join_next().await {
        history.extend(records.context("a client panicked")?);
    }

    // Healed, every plane up: the final reads.
    cluster.wait_until_serving(Duration::from_secs(60)).await?;
    let mut notes = Vec::new();
    let mut final_read = |result: anyhow::Result<crate::history::Record>| match result {
        Ok(record) => history.push(record),
        Err(error) => notes.push(format!("{error:#}")),
    };
    if has(Workload::Set) {
        final_read(set::final_read(&endpoints, next_process, clock).await);
    }
    if has(Workload::Watch) {
        final_read(watch::final_read(&endpoints, start_revision, next_process + 1, clock).await);
    }
    if has(Workload::Lock) {
        final_read(lock::final_read(&endpoints, start_revision, next_process + 2, clock).await);
    }
    if has(Workload::Scheduler) {
        final_read(scheduler::final_read(&endpoints, start_revision, next_process + 3, clock).await);
    }

    history.sort_by_key(|record| (record.call, record.ret));
    write_history(&config.dir.join("history.jsonl"), &history)?;
    let mut report = analyze(&history);
    report.notes = notes;
    let path = config.dir.join("report.json");
    std::fs::write(&path, format!("{:#}\n", report.to_json(Some(config.seed))))
        .with_context(|| format!("cannot write {}", path.display()))?;
    crate::report::write_report(&config.dir, &format!("capstan-jepsen, seed {}", config.seed), &history)?;
    Ok(report)
}
