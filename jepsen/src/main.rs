//! `capstan-jepsen test`: one chaos run against real planes in network namespaces (needs
//! root and iproute2); `capstan-jepsen analyze DIR`: check a stored history again. Prints
//! a summary; exits non-zero when the history is not linearizable.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use capstan_jepsen::run::{analyze, read_history, run, Fault, Report, RunConfig};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "capstan-jepsen", about = "Chaos runs against a Capstan cluster, with the histories checked")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a workload under faults and check its history.
    Test {
        /// Workloads to run side by side.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "register,set")]
        workload: Vec<Workload>,
        /// Faults to inject, in turn.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "kill,partition,pause")]
        nemesis: Vec<NemesisArg>,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How long the workload runs (`60s`, `5m`).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        time: Duration,
        /// Clients at once, spread over the planes.
        #[arg(long, default_value_t = 6)]
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
        /// Keys in use at a time (they rotate every 2 s).
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
    },
    /// Check the history a run left in DIR again.
    Analyze { dir: PathBuf },
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// Per-key read/write/compare-and-set, checked for linearizability.
    Register,
    /// Unique adds and a final read: no acknowledged add may be lost.
    Set,
}

#[derive(ValueEnum, Clone, Copy)]
enum NemesisArg {
    Kill,
    Partition,
    Pause,
}

fn main() -> std::process::ExitCode {
    match run_cli(Cli::parse()) {
        Ok(report) => {
            for fault in &report.faults {
                println!("{fault}");
            }
            println!(
                "{} operations: {} completed, {} indeterminate",
                report.operations, report.completed, report.indeterminate
            );
            match report.violation {
                None => {
                    println!("linearizable: yes");
                    std::process::ExitCode::SUCCESS
                }
                Some(violation) => {
                    println!("linearizable: NO: {violation}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Err(error) => {
            eprintln!("capstan-jepsen: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cli(cli: Cli) -> anyhow::Result<Report> {
    let config = match cli.command {
        Command::Analyze { dir } => return Ok(analyze(&read_history(&dir.join("history.jsonl"))?, Vec::new())),
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
        } => RunConfig {
            capstan,
            dir,
            nodes,
            time_limit: time,
            faults: nemesis
                .into_iter()
                .map(|n| match n {
                    NemesisArg::Kill => Fault::Kill,
                    NemesisArg::Partition => Fault::Partition,
                    NemesisArg::Pause => Fault::Pause,
                })
                .collect(),
            fault_interval: fault_interval.max(Duration::from_millis(100)),
            keys,
            // With both workloads, a third of the clients add to the set.
            clients: if workload.contains(&Workload::Register) {
                concurrency.saturating_sub(set_clients(&workload, concurrency))
            } else {
                0
            },
            set_clients: set_clients(&workload, concurrency),
            rate,
            seed: seed.unwrap_or_else(|| fastrand::u64(..)),
            plane_args,
        },
    };
    check_privileges()?;
    println!("seed {}", config.seed);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        tokio::select! {
            report = run(config) => report,
            // Dropping the run kills the planes and removes the network.
            _ = tokio::signal::ctrl_c() => bail!("interrupted; the cluster and its network were removed"),
        }
    })
}

fn set_clients(workloads: &[Workload], concurrency: usize) -> usize {
    match (workloads.contains(&Workload::Register), workloads.contains(&Workload::Set)) {
        (true, true) => (concurrency / 3).max(1),
        (false, true) => concurrency,
        _ => 0,
    }
}

/// Network namespaces need root and iproute2: say so before anything starts.
fn check_privileges() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("chaos runs make network namespaces: run as root");
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        bail!("chaos runs need `ip` from iproute2 (apt-get install iproute2)");
    }
    Ok(())
}
