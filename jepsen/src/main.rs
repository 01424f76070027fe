//! `capstan-jepsen test`: one chaos run against real planes in network namespaces (needs
//! root, iproute2 and nftables); `capstan-jepsen analyze DIR`: check a stored history
//! again. Prints a one-screen summary; exits non-zero when any checker finds a violation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use capstan_jepsen::history::read_history;
use capstan_jepsen::nemesis::{parse_turn, Fault};
use capstan_jepsen::run::{analyze, run, Report, RunConfig, Workload};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capstan-jepsen", about = "Chaos runs against a Capstan cluster, with the histories checked")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run workloads under faults and check their histories.
    Test {
        /// Workloads to run side by side.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "register,set,bank,watch,lock,scheduler")]
        workload: Vec<Workload>,
        /// The nemesis' turns, in order and then again: kill, kill-leader, kill-minority,
        /// pause, pause-leader, partition, partition-leader, bridge, ring, slow, lossy,
        /// membership; `a+b` injects two at once.
        #[arg(long, value_delimiter = ',', value_parser = parse_turn, default_value = "kill,partition,pause")]
        nemesis: Vec<Vec<Fault>>,
        /// Planes in the cluster: 3 or 5.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How long the workload runs (`60s`, `5m`).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        time: Duration,
        /// Clients at once (besides a watcher per plane), dealt out among the workloads.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Operations per second over all clients (0: as fast as they go).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Seeds every random choice of the run.
        #[arg(long)]
        seed: Option<u64>,
        /// How long a fault lasts, and the calm between two (`3s`).
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        fault_interval: Duration,
        /// Register keys in use at a time (they rotate every 2 s).
        #[arg(long, default_value_t = 5)]
        keys: usize,
        /// The capstan binary the planes run.
        #[arg(long, default_value = "capstan")]
        capstan: PathBuf,
        /// Where data, logs, the history and the report go.
        #[arg(long, default_value = "jepsen-run")]
        dir: PathBuf,
        /// Extra flags for every plane, space-separated.
        #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
        plane_args: Vec<String>,
        /// Mutual TLS between the planes and for every client (client and peer
        /// certificates are made for the run, under DIR/tls).
        #[arg(long)]
        tls: bool,
    },
    /// Check the history a run left in DIR again.
    Analyze { dir: PathBuf },
}

fn main() -> std::process::ExitCode {
    match run_cli(Cli::parse()) {
        Ok((report, dir)) => {
            println!("{}", report.summary());
            if let Some(dir) = dir {
                println!(
                    "results in {}: history.jsonl, report.json, timeline.html, latency.svg, throughput.svg",
                    dir.display()
                );
            }
            if report.valid() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("capstan-jepsen: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The run's report, and the directory its results went to (none for `analyze`).
fn run_cli(cli: Cli) -> anyhow::Result<(Report, Option<PathBuf>)> {
    let config = match cli.command {
        Command::Analyze { dir } => return Ok((analyze(&read_history(&dir.join("history.jsonl"))?), None)),
        Command::Test {
            workload,
            nemesis,
            nodes,
            time,
            concurrency,
            rate,
            seed,
            fault_interval,
            keys,
            capstan,
            dir,
            plane_args,
            tls,
        } => {
            if !matches!(nodes, 3 | 5) {
                bail!("--nodes must be 3 or 5, not {nodes}");
            }
            let dealt = workload.iter().filter(|w| **w != Workload::Watch).count();
            if concurrency < dealt {
                bail!("--concurrency {concurrency} is fewer than the {dealt} workloads that need clients");
            }
            RunConfig {
                capstan,
                dir,
                nodes,
                time_limit: time,
                workloads: workload,
                schedule: nemesis,
                fault_interval: fault_interval.max(Duration::from_millis(100)),
                keys,
                concurrency,
                rate,
                seed: seed.unwrap_or_else(|| fastrand::u64(..)),
                plane_args,
                tls,
            }
        }
    };
    check_privileges()?;
    println!("seed {}", config.seed);
    let dir = config.dir.clone();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = runtime.block_on(async {
        tokio::select! {
            report = run(config) => report,
            // Dropping the run kills the planes and removes the network.
            _ = tokio::signal::ctrl_c() => bail!("interrupted; the cluster and its network were removed"),
        }
    })?;
    Ok((report, Some(dir)))
}

/// Network namespaces need root, iproute2 and nftables: say so before anything starts.
fn check_privileges() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("chaos runs make network namespaces: run as root");
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if std::process::Command::new(tool).arg("-V").output().is_err() {
            bail!("chaos runs need `{tool}` (apt-get install {package})");
        }
    }
    Ok(())
}
