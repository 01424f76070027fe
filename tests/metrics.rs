//! The HTTP listener of real planes and agents: every metric family is served in
//! Prometheus' text format and moves when work happens; `/health`, `/readyz` and `/livez`
//! answer as etcd and Kubernetes probes expect, and turn unhealthy when the plane loses its
//! quorum.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use capstan_client::Objects;
use capstan_proto::objects::{Node, Object, Pod};
use common::{http_get as get, leader_index, wait_for, AgentProcess, Cluster};

/// Samples by name with labels (`name{a="b"}`) → value. A line that is neither a comment
/// nor `sample value` fails the parse.
fn parse(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|line| !line.is_empty() && !line.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').ok_or_else(|| format!("not a sample: {line:?}"))?;
        let value = value.parse().map_err(|_| format!("not a number in {line:?}"))?;
        if !name.starts_with("capstan_") {
            return Err(format!("not a capstan metric: {line:?}"));
        }
        samples.insert(name.to_string(), value);
    }
    if !text.trim_end().ends_with("# EOF") {
        return Err("no # EOF at the end".into());
    }
    Ok(samples)
}

fn scrape(address: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = get(address, "/metrics");
    assert_eq!(status, 200, "{body}");
    parse(&body).unwrap_or_else(|error| panic!("{error}\n{body}"))
}

/// The value of the sample named exactly `name` (with its labels), 0 if absent.
fn value(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}

#[test]
fn the_parser_refuses_what_is_not_prometheus_text() {
    assert!(parse("capstan_a 1\n# EOF\n").is_ok());
    assert!(parse("capstan_a one\n# EOF\n").is_err());
    assert!(parse("capstan_a\n# EOF\n").is_err());
    assert!(parse("other_a 1\n# EOF\n").is_err());
    assert!(parse("capstan_a 1\n").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_is_served_and_moves_with_work() {
    let mut cluster = Cluster::start_with(3, &["--scheduler", "--scheduler-lease-ttl-secs", "5"]);
    let before = scrape(cluster.metrics[0]);
    let families = [
        "capstan_raft_has_leader",
        "capstan_raft_is_leader",
        "capstan_raft_term",
        "capstan_raft_leader_changes_total",
        "capstan_raft_last_log_index",
        "capstan_raft_applied_index",
        "capstan_raft_proposals_committed_total",
        "capstan_raft_proposals_failed_total",
        "capstan_raft_proposals_answered_on_apply_total",
        "capstan_raft_proposals_pending",
        "capstan_raft_wal_fsync_duration_seconds_count",
        "capstan_raft_snapshots_built_total",
        "capstan_raft_snapshots_sent_total",
        "capstan_raft_snapshots_received_total",
        "capstan_raft_commit_notices_folded_total",
        "capstan_store_db_size_bytes",
        "capstan_store_key_versions",
        "capstan_store_revision",
        "capstan_store_compacted_revision",
        "capstan_store_apply_duration_seconds_count",
        "capstan_watch_watchers",
        "capstan_watch_events_sent_total",
        "capstan_watch_slow_watchers_total",
        "capstan_lease_active",
        "capstan_lease_expired_total",
        "capstan_scheduler_leader",
        "capstan_scheduler_pending_pods",
        "capstan_scheduler_bind_duration_seconds_count",
        "capstan_scheduler_decode_errors_total",
    ];
    for family in families {
        assert!(before.contains_key(family), "no {family} in {before:#?}");
    }
    assert_eq!(value(&before, "capstan_raft_has_leader"), 1.0);

    // Work through plane 0: puts, a watch that sees them, a lease that expires, a pod the
    // scheduler binds.
    let endpoint = cluster.planes[0].endpoint();
    let mut client = etcd_client::Client::connect([endpoint.as_str()], None).await.unwrap();
    let mut stream = client.watch("m/", Some(etcd_client::WatchOptions::new().with_prefix())).await.unwrap();
    for i in 0..50 {
        client.put(format!("m/{i}"), "v", None).await.unwrap();
    }
    let mut seen = 0;
    while seen < 50 {
        seen += stream.message().await.unwrap().expect("a watch response").events().len();
    }
    let lease = client.lease_grant(1, None).await.unwrap().id();
    client.put("m/leased", "v", Some(etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();
    let objects = Objects::new(client.clone());
    objects.create(&Object::Node(Node::ready("metrics-node", "4", "8Gi", "110"))).await.unwrap();
    let lease_key = "/registry/leases/nodes/metrics-node";
    let node_lease = client.lease_grant(600, None).await.unwrap().id();
    client.put(lease_key, "", Some(etcd_client::PutOptions::new().with_lease(node_lease))).await.unwrap();
    objects.create(&Object::Pod(Pod::requesting("default", "metrics-pod", &["true"], "100m", "64Mi"))).await.unwrap();
    wait_for(&objects, "the pod bound", |listed| {
        common::pods(listed).iter().any(|pod| pod.metadata.name == "metrics-pod" && !pod.spec.node_name.is_empty())
    })
    .await;
    // The leased key goes when the leader expires the lease.
    let expired = async {
        while !client.get("m/leased", None).await.unwrap().kvs().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), expired).await.expect("the lease expired");

    // A refused request is counted under its code.
    let missing = client.lease_revoke(0x7777).await.expect_err("no such lease");
    assert!(missing.to_string().contains("lease not found"), "{missing}");
    let after = scrape(cluster.metrics[0]);
    let put = r#"capstan_grpc_requests_total{grpc_service="etcdserverpb.KV",grpc_method="Put",grpc_code="OK"}"#;
    assert!(value(&after, put) >= 52.0, "{put}: {after:#?}");
    let refused = r#"capstan_grpc_requests_total{grpc_service="etcdserverpb.Lease",grpc_method="LeaseRevoke",grpc_code="NotFound"}"#;
    assert_eq!(value(&after, refused), 1.0, "{after:#?}");
    let latency = r#"capstan_grpc_request_duration_seconds_count{grpc_service="etcdserverpb.KV",grpc_method="Put"}"#;
    assert!(value(&after, latency) >= 52.0, "{latency}");
    assert!(value(&after, "capstan_watch_events_sent_total") >= 50.0);
    // Ours, and the plane's scheduler's.
    assert!(value(&after, "capstan_watch_watchers") >= 1.0);
    assert!(value(&after, "capstan_store_revision") >= value(&before, "capstan_store_revision") + 52.0);
    assert!(
        value(&after, "capstan_store_apply_duration_seconds_count")
            > value(&before, "capstan_store_apply_duration_seconds_count")
    );
    assert!(value(&after, "capstan_raft_applied_index") > value(&before, "capstan_raft_applied_index"));
    assert!(value(&after, "capstan_store_db_size_bytes") > 0.0);

    // The leader proposed the writes, synced its WAL and expired the lease; one scheduler
    // leads and bound the pod.
    let all: Vec<BTreeMap<String, f64>> = cluster.metrics.iter().map(|address| scrape(*address)).collect();
    let leader = leader_index(&cluster).await;
    let on_leader = &all[leader];
    assert_eq!(value(on_leader, "capstan_raft_is_leader"), 1.0);
    assert_eq!(all.iter().map(|samples| value(samples, "capstan_raft_is_leader")).sum::<f64>(), 1.0);
    assert!(value(on_leader, "capstan_raft_proposals_committed_total") >= 52.0);
    assert!(value(on_leader, "capstan_raft_wal_fsync_duration_seconds_count") > 0.0);
    assert!(value(on_leader, "capstan_lease_expired_total") >= 1.0);
    assert!(value(on_leader, "capstan_lease_active") >= 1.0, "the node's lease is active");
    assert_eq!(all.iter().map(|samples| value(samples, "capstan_scheduler_leader")).sum::<f64>(), 1.0);
    let scheduled = r#"capstan_scheduler_attempts_total{result="scheduled"}"#;
    assert_eq!(all.iter().map(|samples| value(samples, scheduled)).sum::<f64>(), 1.0);

    // Healthy and ready, everywhere.
    for address in &cluster.metrics {
        assert_eq!(get(*address, "/health"), (200, r#"{"health":"true","reason":""}"#.to_string()));
        assert_eq!(get(*address, "/readyz"), (200, "ok\n".to_string()));
        assert_eq!(get(*address, "/livez"), (200, "ok\n".to_string()));
    }

    // Two planes die: the last one has no quorum, so no leader; it says so, and stays live.
    let survivor = (leader + 1) % 3;
    for index in (0..3).filter(|index| *index != survivor) {
        cluster.planes[index].kill();
    }
    let address = cluster.metrics[survivor];
    let unhealthy = async {
        while get(address, "/health").0 == 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), unhealthy).await.expect("the survivor turns unhealthy");
    assert_eq!(get(address, "/health"), (503, r#"{"health":"false","reason":"RAFT NO LEADER"}"#.to_string()));
    assert_eq!(get(address, "/readyz"), (503, "not ready: no leader\n".to_string()));
    assert_eq!(get(address, "/livez"), (200, "ok\n".to_string()));
    assert_eq!(value(&scrape(address), "capstan_raft_has_leader"), 0.0);
}

/// Each plane's count of snapshots built.
fn snapshots_built(cluster: &Cluster) -> Vec<f64> {
    cluster.metrics.iter().map(|address| value(&scrape(*address), "capstan_raft_snapshots_built_total")).collect()
}

/// Waits until every plane has built more snapshots than `before` says.
async fn each_builds_more_than(cluster: &Cluster, before: &[f64], what: &str) -> Vec<f64> {
    let more = async {
        loop {
            let built = snapshots_built(cluster);
            if built.iter().zip(before).all(|(now, before)| now > before) {
                return built;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), more).await.unwrap_or_else(|_| panic!("{what}"))
}

/// `count` values of 64 KiB under `prefix`, as many bytes of store and of log.
async fn put_large(client: &mut etcd_client::Client, prefix: &str, count: usize) {
    let large = "x".repeat(64 * 1024);
    for i in 0..count {
        client.put(format!("{prefix}/{i}"), large.as_str(), None).await.unwrap();
    }
}

/// A snapshot is as cheap for a large store as for a small one: a plane takes one every
/// `--snapshot-count` entries and writes no copy of its store for it (only a follower that
/// needs one gets an export, made as it is sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_come_every_snapshot_count_entries_and_copy_nothing() {
    let cluster = Cluster::start_with(3, &["--snapshot-count", "10"]);
    let endpoint = cluster.planes[0].endpoint();
    let mut client = etcd_client::Client::connect([endpoint.as_str()], None).await.unwrap();
    // 2 MiB of store.
    put_large(&mut client, "large", 32).await;
    let loaded = each_builds_more_than(&cluster, &[0.0; 3], "each plane snapshots the new store").await;

    // 200 small writes, one at a time, are at least 200 entries: 20 snapshot counts.
    for i in 0..200 {
        client.put(format!("small/{i}"), "v", None).await.unwrap();
    }
    let at_least = loaded.iter().map(|loaded| loaded + 10.0).collect::<Vec<_>>();
    each_builds_more_than(&cluster, &at_least, "each plane snapshots every 10 entries").await;
    for plane in &cluster.planes {
        let files: Vec<_> = std::fs::read_dir(plane.data_dir.join("snapshots")).unwrap().collect();
        assert!(files.is_empty(), "{}: no copy of the store is kept: {files:?}", plane.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_its_pods_by_phase_and_its_heartbeats() {
    let cluster = Cluster::start_with(1, &["--scheduler"]);
    let endpoint = cluster.planes[0].endpoint();
    let address = common::free_addr();
    let url = format!("http://{address}");
    let args = ["--listen-metrics-urls", url.as_str(), "--node-lease-ttl-secs", "4", "--node-lease-renew-secs", "1"];
    let _agent = AgentProcess::start("m1", &endpoint, &cluster.dir().join("m1"), &args);
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: sleeper}\nspec:\n  containers: [{name: c, command: [sleep, '3600']}]\n";
    let (ok, _, err) = common::ctl(&endpoint, &["apply", "-f", "-"], pod);
    assert!(ok, "{err}");
    let running = r#"capstan_agent_pods{phase="Running"}"#;
    let seen = async {
        loop {
            let samples = scrape(address);
            if value(&samples, running) == 1.0
                && value(&samples, "capstan_agent_heartbeat_duration_seconds_count") > 0.0
            {
                return samples;
            }
            // Polling: the pod starts and the lease renews on their own time.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let samples = tokio::time::timeout(Duration::from_secs(60), seen).await.expect("the agent's pod and heartbeat");
    assert_eq!(value(&samples, "capstan_agent_heartbeat_failures_total"), 0.0);
    assert_eq!(get(address, "/livez"), (200, "ok\n".to_string()));
}

/// A plane answers its clients' key writes as it applies them (`capstan_raft::own_proposals`)
/// rather than only when its batcher's answer comes: the leader every write, since its
/// apply comes before the batcher learns of it. (A follower does when it learns of the
/// commit before the leader's answer comes, which one write at a time it seldom does: the
/// leader folds the commit into its next AppendEntries.) The answers are the ones the
/// leader gives, through the leader and through a follower: each put's revision is where
/// its value is, and its previous value is the one it replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planes_answer_key_writes_as_they_apply_them() {
    const ANSWERED: &str = "capstan_raft_proposals_answered_on_apply_total";
    const PUTS: usize = 100;
    let cluster = Cluster::start(3);
    let leader = leader_index(&cluster).await;
    let follower = (leader + 1) % 3;
    let mut answered = Vec::new();
    for (index, prefix) in [(leader, "leader"), (follower, "follower")] {
        let endpoint = cluster.planes[index].endpoint();
        let mut client = etcd_client::Client::connect([endpoint.as_str()], None).await.unwrap();
        let before = value(&scrape(cluster.metrics[index]), ANSWERED);
        for round in ["first", "second"] {
            for i in 0..PUTS / 2 {
                let key = format!("{prefix}/{i}");
                let options = etcd_client::PutOptions::new().with_prev_key();
                let put = client.put(key.as_str(), round, Some(options)).await.unwrap();
                let revision = put.header().unwrap().revision();
                let previous = put.prev_key().map(|kv| kv.value_str().unwrap().to_string());
                assert_eq!(previous.as_deref(), (round == "second").then_some("first"), "{key}");
                let got = client.get(key.as_str(), None).await.unwrap();
                assert_eq!(got.kvs()[0].mod_revision(), revision, "{key} is at the revision its put answered");
                assert_eq!(got.kvs()[0].value_str().unwrap(), round);
            }
        }
        answered.push(value(&scrape(cluster.metrics[index]), ANSWERED) - before);
    }
    assert_eq!(answered[0], PUTS as f64, "the leader answers every write as it applies it");
}

/// Under a steady stream of writes the leader folds commit notices into the AppendEntries
/// of the entries after them (`capstan_raft::network`), and the followers still apply every
/// write: the last commit, with no entry after it, reaches them on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_folds_commit_notices_into_its_next_appends() {
    const FOLDED: &str = "capstan_raft_commit_notices_folded_total";
    const PUTS: usize = 400;
    const IN_FLIGHT: usize = 8;
    let cluster = Cluster::start(3);
    let leader = leader_index(&cluster).await;
    let before = value(&scrape(cluster.metrics[leader]), FOLDED);
    let endpoint = cluster.planes[leader].endpoint();
    let client = etcd_client::Client::connect([endpoint.as_str()], None).await.unwrap();
    let mut last = 0;
    for chunk in (0..PUTS).collect::<Vec<_>>().chunks(IN_FLIGHT) {
        let puts = chunk.iter().map(|i| {
            let mut client = client.clone();
            async move { client.put(format!("fold/{i}"), "v", None).await.unwrap().header().unwrap().revision() }
        });
        last = futures::future::join_all(puts).await.into_iter().max().unwrap_or(last).max(last);
    }
    let folded = value(&scrape(cluster.metrics[leader]), FOLDED) - before;
    assert!(folded >= 1.0, "the leader folded none of the commit notices of {PUTS} writes");
    for (index, plane) in cluster.planes.iter().enumerate() {
        // Nothing more is written, so a follower hears of the last commit from a notice of
        // its own; a watch from the last revision sees it as the plane applies it.
        let mut client = etcd_client::Client::connect([plane.endpoint().as_str()], None).await.unwrap();
        let options = etcd_client::WatchOptions::new().with_prefix().with_start_revision(last);
        let mut stream = client.watch("fold/", Some(options)).await.unwrap();
        let applied = async {
            loop {
                let response = stream.message().await.unwrap().expect("a watch response");
                if response.events().iter().any(|event| event.kv().is_some_and(|kv| kv.mod_revision() == last)) {
                    return;
                }
            }
        };
        let waited = tokio::time::timeout(Duration::from_secs(10), applied).await;
        waited.unwrap_or_else(|_| panic!("plane {index} applies revision {last}"));
    }
}
