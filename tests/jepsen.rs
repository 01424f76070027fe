//! The chaos harness on real planes in network namespaces (needs root, iproute2 and
//! nftables, as CI has): every workload stays correct under every fault on 3 and 5 planes,
//! and planes that serve stale reads are caught.
//!
//! The runs take turns (one cluster at a time on this 2-core machine), so a slow run is
//! the cluster's doing, not its neighbours'.

use std::path::Path;
use std::time::Duration;

use capstan_jepsen::nemesis::parse_turn;
use capstan_jepsen::run::{run, Report, RunConfig, Workload};

static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ALL: [Workload; 6] =
    [Workload::Register, Workload::Set, Workload::Bank, Workload::Watch, Workload::Lock, Workload::Scheduler];

fn config(
    dir: &Path,
    nodes: usize,
    seconds: u64,
    workloads: &[Workload],
    turns: &[&str],
    plane_args: &[&str],
    tls: bool,
) -> RunConfig {
    RunConfig {
        capstan: env!("CARGO_BIN_EXE_capstan").into(),
        dir: dir.to_path_buf(),
        nodes,
        time_limit: Duration::from_secs(seconds),
        workloads: workloads.to_vec(),
        schedule: turns.iter().map(|turn| parse_turn(turn).unwrap()).collect(),
        fault_interval: Duration::from_secs(2),
        keys: 4,
        concurrency: 10,
        rate: 0,
        seed: 42,
        plane_args: plane_args.iter().map(|arg| arg.to_string()).collect(),
        tls,
    }
}

async fn chaos(
    nodes: usize,
    seconds: u64,
    workloads: &[Workload],
    turns: &[&str],
    plane_args: &[&str],
    tls: bool,
) -> Report {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let report = run(config(dir.path(), nodes, seconds, workloads, turns, plane_args, tls)).await.expect("the run");
    assert_eq!(dir.path().join("tls/ca.pem").exists(), tls, "certificates made exactly for a TLS run");
    eprintln!("{}", report.summary());
    for file in ["history.jsonl", "report.json", "timeline.html", "latency.svg", "throughput.svg"] {
        assert!(dir.path().join(file).exists(), "no {file}");
    }
    report
}

/// Every fault was injected and healed; every workload passed its checker and saw what it
/// needs to mean something. (That the cluster works after the heal, the final reads show.)
fn assert_correct(report: &Report, faults: &[&str]) {
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    for fault in faults {
        assert!(report.faults.iter().any(|f| f.contains(fault)), "no {fault:?} in {:#?}", report.faults);
    }
    assert!(!report.faults.iter().any(|f| f.contains("failed")), "{:#?}", report.faults);
    for workload in ["register", "set", "bank", "watch", "lock", "scheduler"] {
        let check = report.check(workload).unwrap_or_else(|| panic!("no {workload} verdict"));
        assert!(check.valid, "{workload}: {}", check.summary);
    }
    let detail = |workload: &str, field: &str| report.check(workload).unwrap().detail[field].as_u64().unwrap();
    for (workload, field) in [
        ("register", "operations"),
        ("set", "acknowledged"),
        ("bank", "transfers"),
        ("bank", "serializable_reads"),
        ("watch", "delivered"),
        ("lock", "tokens"),
        ("scheduler", "binds"),
    ] {
        assert!(detail(workload, field) > 0, "{workload}: no {field}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_planes_stay_correct_under_kills_partitions_pauses_and_membership_changes() {
    let turns = ["kill", "partition", "kill-leader", "partition-leader", "pause", "membership"];
    let report = chaos(3, 60, &ALL, &turns, &[], false).await;
    assert_correct(&report, &["kill [n", "partition [", "kill leader", "isolate leader", "pause n", "remove member"]);
}

/// Over mutual TLS (`--tls`: clients and peers), which must change nothing of the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_planes_over_mutual_tls_stay_correct_under_bridges_rings_and_bad_links() {
    let turns = ["bridge", "ring", "kill-minority", "slow+partition", "lossy", "pause-leader"];
    let report = chaos(5, 36, &ALL, &turns, &[], true).await;
    assert_correct(&report, &["bridge n", "ring n", "slow links", "lossy links", "pause leader"]);
}

/// The harness is trusted because it catches this: planes that answer linearizable reads
/// from their own state serve stale values from the minority side of a partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planes_serving_stale_reads_are_caught_under_partitions() {
    let report = chaos(3, 20, &[Workload::Register], &["partition"], &["--unsafe-stale-reads"], false).await;
    let register = report.check("register").expect("a register verdict");
    assert!(!register.valid, "stale reads went unnoticed: {}", register.summary);
}

/// The harness's namespaces (`cj<id>-...`) that exist now.
fn namespaces() -> Vec<String> {
    let listed = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    listed
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|n| n.starts_with("cj"))
        .map(String::from)
        .collect()
}

/// Processes whose command line names `dir` (the planes of a run in it).
fn processes_in(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&dir))
        .collect()
}

/// Ctrl-C drops the run mid-way (as does a panic): its planes and namespaces go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_leaves_no_plane_or_namespace_behind() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let before = namespaces();
    let run = run(config(dir.path(), 3, 30, &[Workload::Register], &["partition"], &[], false));
    // Interrupted once its three planes run (nothing announces it but /proc).
    let mut run = Box::pin(run);
    let planes_up = async {
        while processes_in(dir.path()).len() < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = &mut run => panic!("the run ended before it was interrupted"),
        _ = planes_up => {}
    }
    assert!(namespaces().len() > before.len(), "the run made no namespaces");
    drop(run);
    assert_eq!(namespaces(), before);
    assert_eq!(processes_in(dir.path()), Vec::<String>::new());
}

/// A follower that fell behind catches up over a link too narrow to carry openraft's
/// usual AppendEntries (hundreds of entries) within its deadline of one heartbeat: the
/// leader sends it smaller batches instead of the same one again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_narrow_link_catches_up() {
    const KEYS: i64 = 1_000;
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let capstan = Path::new(env!("CARGO_BIN_EXE_capstan"));
    let mut cluster = capstan_jepsen::cluster::Cluster::start(capstan, dir.path(), 3, &[], false).unwrap();
    cluster.wait_until_serving(Duration::from_secs(30)).await.unwrap();
    let leader = cluster.leader().await.expect("a leader");
    let behind = (leader + 1) % 3;
    cluster.kill(behind);
    let endpoints = cluster.endpoints();
    let mut writer = endpoints.one(leader).connect(Duration::from_secs(5)).await.unwrap();
    let value = vec![b'v'; 2048];
    for key in 0..KEYS {
        writer.put(format!("catch-up/{key:04}"), value.clone(), None).await.unwrap();
    }
    // 1 MB/s: 300 entries of 2 KiB take 0.6 s, twelve times openraft's 50 ms deadline.
    cluster.network.narrow(behind, "8mbit").unwrap();
    cluster.restart(behind).unwrap();
    let count_only = etcd_client::GetOptions::new().with_prefix().with_count_only().with_serializable();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen = None;
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut reader) = endpoints.one(behind).connect(Duration::from_secs(2)).await {
            seen = reader.get("catch-up/", Some(count_only.clone())).await.ok().map(|got| got.count());
            if seen == Some(KEYS) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for node in 0..3 {
        let log = std::fs::read_to_string(dir.path().join(format!("n{node}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("== n{node}.log, last lines:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    panic!("the follower behind the narrow link (n{behind}) holds {seen:?} of {KEYS} keys after a minute");
}
