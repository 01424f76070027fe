//! The chaos harness on real planes in network namespaces (needs root and iproute2, as
//! CI has): a register workload under kills, partitions and pauses is linearizable, and the same
//! run against planes that serve stale reads is caught.

use std::time::Duration;

use capstan_jepsen::run::{run, Fault, RunConfig};

fn config(dir: &std::path::Path, faults: Vec<Fault>, plane_args: &[&str]) -> RunConfig {
    RunConfig {
        capstan: env!("CARGO_BIN_EXE_capstan").into(),
        dir: dir.to_path_buf(),
        nodes: 3,
        time_limit: Duration::from_secs(20),
        faults,
        fault_interval: Duration::from_secs(2),
        keys: 4,
        clients: 5,
        set_clients: 2,
        rate: 0,
        seed: 42,
        plane_args: plane_args.iter().map(|arg| arg.to_string()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_stay_linearizable_under_kills_partitions_and_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let report =
        run(config(dir.path(), vec![Fault::Kill, Fault::Partition, Fault::Pause], &[])).await.expect("the run");
    eprintln!("{report:#?}");
    assert_eq!(report.violation, None);
    let set = report.set.as_ref().expect("the set workload ran");
    assert!(set.valid(), "{set:?}");
    assert!(set.acknowledged > 100, "{set:?}");
    for fault in ["kill", "partition", "pause"] {
        assert!(report.faults.iter().any(|f| f.contains(fault)), "no {fault} in {:?}", report.faults);
    }
    assert!(report.completed > 1000, "{} operations completed", report.completed);
}

/// The harness is trusted because it catches this: planes that answer linearizable reads
/// from their own state serve stale values from the minority side of a partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planes_serving_stale_reads_are_caught_under_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(config(dir.path(), vec![Fault::Partition], &["--unsafe-stale-reads"])).await.expect("the run");
    assert!(report.violation.is_some(), "stale reads went unnoticed: {report:#?}");
}
