//! `capstan-jepsen run`: one chaos run against real planes in network namespaces (needs
//! root and iproute2). Prints the report; exits non-zero when the history is not
//! linearizable.

use std::path::PathBuf;
use std::time::Duration;

use capstan_jepsen::run::{run, Fault, RunConfig};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "capstan-jepsen", about = "Chaos runs against a Capstan cluster, with the histories checked")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a register workload under faults and check it for linearizability.
    Run {
        /// The capstan binary the planes run.
        #[arg(long, default_value = "capstan")]
        capstan: PathBuf,
        /// Where data, logs, the history and the report go.
        #[arg(long, default_value = "jepsen-run")]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 60)]
        time_limit_secs: u64,
        /// Faults to inject, in turn.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "kill,partition")]
        nemesis: Vec<NemesisArg>,
        /// Seconds a fault lasts, and between faults.
        #[arg(long, default_value_t = 3)]
        fault_interval_secs: u64,
        #[arg(long, default_value_t = 5)]
        keys: usize,
        #[arg(long, default_value_t = 6)]
        clients: usize,
        /// Extra flags for every plane.
        #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
        plane_args: Vec<String>,
    },
}

#[derive(ValueEnum, Clone, Copy)]
enum NemesisArg {
    Kill,
    Partition,
}

fn main() -> std::process::ExitCode {
    let Command::Run { capstan, dir, nodes, time_limit_secs, nemesis, fault_interval_secs, keys, clients, plane_args } =
        Cli::parse().command;
    let faults = nemesis.into_iter().map(|n| match n {
        NemesisArg::Kill => Fault::Kill,
        NemesisArg::Partition => Fault::Partition,
    });
    let config = RunConfig {
        capstan,
        dir,
        nodes,
        time_limit: Duration::from_secs(time_limit_secs),
        faults: faults.collect(),
        fault_interval: Duration::from_secs(fault_interval_secs.max(1)),
        keys,
        clients,
        plane_args,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("capstan-jepsen: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
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
