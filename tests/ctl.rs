//! `capstan ctl` against a real plane: the commands a user types, with their output.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::PlaneProcess;

fn ctl(plane: &PlaneProcess, args: &[&str], input: &str) -> (bool, String, String) {
    common::ctl(&plane.client_addr.to_string(), args, input)
}

fn ok(plane: &PlaneProcess, args: &[&str]) -> String {
    let (success, stdout, stderr) = ctl(plane, args, "");
    assert!(success, "capstan ctl {args:?} failed: {stderr}");
    stdout
}

#[test]
fn ctl_speaks_etcdctl() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    assert_eq!(ok(&plane, &["put", "a/1", "one"]), "OK\n");
    ok(&plane, &["put", "a/2", "two"]);
    ok(&plane, &["put", "b", "bee"]);
    assert_eq!(ok(&plane, &["get", "a/", "--prefix"]), "a/1\none\na/2\ntwo\n");
    assert_eq!(ok(&plane, &["get", "a/1", "--from-key", "--keys-only"]), "a/1\n\na/2\n\nb\n\n");
    assert_eq!(ok(&plane, &["get", "a/", "--prefix", "--count-only"]), "2\n");
    assert_eq!(ok(&plane, &["get", "a/", "--prefix", "--limit", "1", "--print-value-only"]), "one\n");
    let json: serde_json::Value = serde_json::from_str(&ok(&plane, &["get", "b", "-w", "json"])).unwrap();
    assert_eq!(json["kvs"][0]["key"], "Yg==");
    assert_eq!(json["kvs"][0]["value"], "YmVl");
    let revision = json["header"]["revision"].as_i64().unwrap();
    ok(&plane, &["put", "b", "changed"]);
    assert_eq!(ok(&plane, &["get", "b", "--rev", &revision.to_string()]), "b\nbee\n");

    let txn = "value(\"b\") = \"changed\"\n\nput b txn-won\nget b\n\nput b txn-lost\n\n";
    let (success, stdout, stderr) = ctl(&plane, &["txn"], txn);
    assert!(success, "{stderr}");
    assert_eq!(stdout, "SUCCESS\n\nOK\n\nb\ntxn-won\n");

    let granted = ok(&plane, &["lease", "grant", "30"]);
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    ok(&plane, &["put", "leased", "v", "--lease", &id]);
    assert!(ok(&plane, &["lease", "timetolive", &id, "--keys"]).contains("attached keys([leased])"));
    assert!(ok(&plane, &["lease", "keep-alive", &id, "--once"]).contains("keepalived with TTL(30)"));
    assert!(ok(&plane, &["lease", "list"]).contains(&id));
    ok(&plane, &["lease", "revoke", &id]);
    assert_eq!(ok(&plane, &["get", "leased"]), "");

    assert_eq!(ok(&plane, &["del", "a/", "--prefix"]), "2\n");
    ok(&plane, &["compact", &revision.to_string()]);
    let (success, _, stderr) = ctl(&plane, &["get", "b", "--rev", "2"], "");
    assert!(!success && stderr.contains("required revision has been compacted"), "{stderr}");
    let (success, _, stderr) = ctl(&plane, &["put", "", "v"], "");
    assert!(!success && stderr.contains("key is not provided"), "{stderr}");
    assert!(ok(&plane, &["status"]).contains("leader=true"));
    assert!(ok(&plane, &["member", "list"]).contains("test-plane"));
}

#[test]
fn ctl_watch_replays_and_follows() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    ok(&plane, &["put", "w", "first"]);
    let mut watch = Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["ctl", &format!("--endpoints={}", plane.client_addr), "watch", "w", "--rev", "2", "--max-events", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines().map_while(Result::ok);
    assert_eq!(lines.next().as_deref(), Some("PUT"));
    assert_eq!(lines.next().as_deref(), Some("w"));
    assert_eq!(lines.next().as_deref(), Some("first"));
    ok(&plane, &["del", "w"]);
    assert_eq!(lines.next().as_deref(), Some("DELETE"));
    assert!(watch.wait().unwrap().success(), "watch exits after --max-events");
}

/// `capstan bench` against a plane: every workload runs without errors and reports what it
/// measured; the put workload's writes are really in the store.
#[test]
fn bench_measures_each_workload() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &["--scheduler"]);
    let bench = |workload: &[&str]| -> serde_json::Value {
        let mut command = Command::new(env!("CARGO_BIN_EXE_capstan"));
        command.args(["bench", "--endpoints", &plane.client_addr.to_string(), "--json"]);
        command.args(["--duration-secs", "1", "--warmup-secs", "0", "--in-flight", "4", "--key-count", "50"]);
        let output = command.args(workload).output().unwrap();
        assert!(output.status.success(), "bench {workload:?}: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    for workload in [&["put"][..], &["range", "--consistency", "l"], &["range", "--consistency", "s"], &["txn"]] {
        let result = bench(workload);
        assert!(result["requests"].as_u64().unwrap() > 0, "{workload:?}: {result}");
        assert_eq!(result["errors"], 0, "{workload:?}: {result}");
        assert!(result["p50_ms"].as_f64().unwrap() <= result["p99_ms"].as_f64().unwrap(), "{result}");
    }
    let written = ok(&plane, &["get", "bench/", "--prefix", "--count-only", "-w", "json"]);
    let count: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert_eq!(count["count"], 50, "the range workload wrote every key it reads");
    let failover = bench(&["failover"]);
    assert!(failover["acknowledged"].as_u64().unwrap() > 0, "{failover}");
    let schedule = bench(&["schedule", "--nodes", "20", "--pods", "300"]);
    assert!(schedule["pods_bound_per_sec"].as_f64().unwrap() > 0.0, "{schedule}");
    assert!(schedule["p50_ms"].as_f64().unwrap() <= schedule["p99_ms"].as_f64().unwrap(), "{schedule}");
    let left = ok(&plane, &["get", "/registry/pods/", "--prefix", "--count-only", "-w", "json"]);
    let left: serde_json::Value = serde_json::from_str(&left).unwrap();
    assert_eq!(left["count"], 0, "the schedule workload cleans up after itself");
}
