//! The scheduler and controllers on real 3-plane clusters (`capstan plane --scheduler`),
//! driven like a user would: `capstan ctl apply/get/scale/delete/cordon` and an etcd
//! client writing objects.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use capstan_client::{Listed, Objects};
use capstan_proto::objects::{condition, decode_stored, Kind, Node, Object, Pod, NODE_READY, POD_SCHEDULED};
use capstan_scheduler::LEADER_KEY;
use common::{ctl, pods, summary, wait_for, Cluster, CONVERGE_TIMEOUT};
use etcd_client::{EventType, PutOptions, Txn, TxnOp, WatchOptions};
use futures::StreamExt;

async fn objects(cluster: &Cluster) -> Objects {
    Objects::new(capstan_client::connect(&cluster.endpoints(), Duration::from_secs(10)).await.expect("connect"))
}

fn node(name: &str, cpu: &str, memory: &str, labels: &[(&str, &str)]) -> Object {
    let mut node = Node::ready(name, cpu, memory, "110");
    node.metadata.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Object::Node(node)
}

fn pod(name: &str, cpu: &str, memory: &str) -> Object {
    let mut pod = Pod::requesting("default", name, &["sleep", "3600"], cpu, memory);
    pod.metadata.uid = format!("uid-{name}");
    Object::Pod(pod)
}

/// Node leases, as agents keep them, so the node-lifecycle controller leaves the nodes Ready.
async fn hold_node_leases(objects: &Objects, names: &[String]) {
    let lease = objects.client().lease_client().grant(600, None).await.expect("grant").id();
    for name in names {
        let key = format!("/registry/leases/nodes/{name}");
        objects.client().kv_client().put(key, "", Some(PutOptions::new().with_lease(lease))).await.expect("lease key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_applies_gets_scales_and_the_scheduler_places_pods() {
    let cluster = Cluster::start_with(3, &["--scheduler"]);
    let endpoints = cluster.endpoints().join(",");
    let objects = objects(&cluster).await;

    const NODES: &str = "
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {disk: ssd}}
status:
  capacity: {cpu: '4', memory: 8Gi, pods: '110'}
  conditions: [{type: Ready, status: 'True'}]
---
apiVersion: v1
kind: Node
metadata: {name: n2}
spec:
  taints: [{key: gpu, value: 'yes', effect: NoSchedule}]
status:
  capacity: {cpu: '2', memory: 4Gi, pods: '110'}
  conditions: [{type: Ready, status: 'True'}]
";
    let (ok, out, err) = ctl(&endpoints, &["apply", "-f", "-"], NODES);
    assert!(ok, "{err}");
    assert_eq!(out, "node/n1 created\nnode/n2 created\n");
    hold_node_leases(&objects, &["n1".into(), "n2".into()]).await;
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let (ok, out, err) = ctl(&endpoints, &["apply", "-f", examples], "");
    assert!(ok, "{err}");
    assert_eq!(out, "pod/hello created\nreplicaset.apps/web created\n");
    assert!(
        err.contains("Warning: replicaset.apps/web: unknown field \"spec.template.spec.containers[0].image\""),
        "{err}"
    );

    // Three replicas and the pod, all on n1 (n2's taint is not tolerated).
    let listed = wait_for(&objects, "4 pods bound", |l| {
        pods(l).len() == 4 && pods(l).iter().all(|p| !p.spec.node_name.is_empty())
    })
    .await;
    assert!(pods(&listed).iter().all(|p| p.spec.node_name == "n1"), "{:#?}", summary(&listed));
    let (ok, out, _) = ctl(&endpoints, &["get", "pods", "-o", "wide"], "");
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[0].starts_with("NAME        READY   STATUS    RESTARTS   AGE"), "{out}");
    assert!(lines[1].starts_with("hello       0/1     Pending   0 "), "{out}");
    assert!(lines.iter().skip(1).all(|line| line.ends_with("n1")), "{out}");
    wait_for(&objects, "the ReplicaSet's status", |l| {
        l.objects.iter().any(|o| matches!(o, Object::ReplicaSet(rs) if rs.status.replicas == 3))
    })
    .await;
    let (_, out, _) = ctl(&endpoints, &["get", "rs"], "");
    assert!(out.lines().nth(1).unwrap().starts_with("web    3         3         0"), "{out}");

    // A pod that fits nowhere says why, and is bound once a node for it appears.
    let picky = "apiVersion: v1\nkind: Pod\nmetadata: {name: picky}\nspec:\n  nodeSelector: {zone: x}\n  containers:\n  - {name: c, command: [sleep, '1'], resources: {requests: {cpu: '3'}}}\n";
    assert!(ctl(&endpoints, &["apply", "-f", "-"], picky).0);
    let listed = wait_for(&objects, "picky marked unschedulable", |l| {
        pods(l).iter().any(|p| {
            p.metadata.name == "picky"
                && condition(&p.status.conditions, POD_SCHEDULED).is_some_and(|c| c.reason == "Unschedulable")
        })
    })
    .await;
    let picky_pod = pods(&listed).into_iter().find(|p| p.metadata.name == "picky").unwrap().clone();
    assert_eq!(
        condition(&picky_pod.status.conditions, POD_SCHEDULED).unwrap().message,
        "0/2 nodes available: 1 insufficient cpu, 1 node(s) didn't match Pod's node selector"
    );
    // Junk under /registry/ from some other client is skipped, not fatal.
    objects.client().kv_client().put("/registry/pods/default/junk", "not json", None).await.unwrap();
    objects.create(&node("n3", "8", "16Gi", &[("zone", "x")])).await.unwrap();
    hold_node_leases(&objects, &["n3".into()]).await;
    wait_for(&objects, "picky bound to n3", |l| {
        pods(l).iter().any(|p| p.metadata.name == "picky" && p.spec.node_name == "n3")
    })
    .await;
    let (ok, _, err) = ctl(&endpoints, &["get", "pods"], "");
    assert!(ok && err.contains("/registry/pods/default/junk: cannot decode"), "{err}");

    // Scale up onto the free nodes, spread; cordon keeps new pods off n1; scale down.
    assert!(ctl(&endpoints, &["cordon", "n1"], "").0);
    let (ok, out, _) = ctl(&endpoints, &["scale", "rs", "web", "--replicas", "7"], "");
    assert!(ok && out == "replicaset.apps/web scaled\n", "{out}");
    let listed = wait_for(&objects, "7 web pods bound", |l| {
        pods(l).iter().filter(|p| p.metadata.name.starts_with("web-") && !p.spec.node_name.is_empty()).count() == 7
    })
    .await;
    let new_on: Vec<&str> = pods(&listed)
        .iter()
        .filter(|p| p.metadata.name.starts_with("web-"))
        .map(|p| p.spec.node_name.as_str())
        .collect();
    assert_eq!(
        new_on.iter().filter(|n| **n == "n3").count(),
        4,
        "the four new replicas go to n3 (n1 cordoned, n2 tainted): {new_on:?}"
    );
    assert!(ctl(&endpoints, &["scale", "rs", "web", "--replicas", "1"], "").0);
    wait_for(&objects, "1 web pod", |l| pods(l).iter().filter(|p| p.metadata.name.starts_with("web-")).count() == 1)
        .await;
    let (_, out, _) = ctl(&endpoints, &["get", "nodes"], "");
    assert!(out.contains("n1     Ready,SchedulingDisabled"), "{out}");

    // Output round-trips: what `get -o yaml` prints applies as unchanged.
    let (ok, yaml, _) = ctl(&endpoints, &["get", "pod/hello", "-o", "yaml"], "");
    assert!(ok && yaml.contains("nodeName: n1"), "{yaml}");
    let (ok, out, err) = ctl(&endpoints, &["apply", "-f", "-"], &yaml);
    assert!(ok && out == "pod/hello unchanged\n", "{out}{err}");

    // Bad input is refused with the field named; unknown kinds too.
    let bad = "apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec:\n  containers:\n  - {name: c, command: [x], resources: {requests: {cpu: 2x}}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
    let (ok, _, err) = ctl(&endpoints, &["apply", "-f", "-"], bad);
    assert!(!ok);
    assert!(
        err.contains("The Pod \"bad\" is invalid: spec.containers[0].resources.requests.cpu: invalid quantity \"2x\""),
        "{err}"
    );
    assert!(err.contains("document 2: no matches for kind \"Deployment\" in version \"apps/v1\""), "{err}");

    // Deleting the ReplicaSet deletes its pods.
    let (ok, out, _) = ctl(&endpoints, &["delete", "rs", "web"], "");
    assert!(ok && out == "replicaset.apps \"web\" deleted\n", "{out}");
    wait_for(&objects, "web pods collected", |l| !pods(l).iter().any(|p| p.metadata.name.starts_with("web-"))).await;
}

/// 1000 pods onto 100 nodes, then kill -9 the plane whose scheduler leads while more pods
/// arrive: another plane's scheduler takes over, every pod is bound, no node is
/// over-committed, and no pod was ever bound twice (checked on the whole history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pods_bind_and_a_killed_leader_is_replaced_without_double_binds() {
    const LEASE_TTL_SECS: u64 = 5;
    let mut cluster = Cluster::start_with(3, &["--scheduler", "--scheduler-lease-ttl-secs", "5"]);
    let objects = objects(&cluster).await;
    let names: Vec<String> = (0..100).map(|i| format!("node-{i:03}")).collect();
    let create = |object: Object| {
        let objects = objects.clone();
        async move { objects.create(&object).await.expect("create") }
    };
    futures::stream::iter(
        names.iter().enumerate().map(|(i, name)| create(node(name, &format!("{}", 2 + i % 7), "16Gi", &[]))),
    )
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    hold_node_leases(&objects, &names).await;
    futures::stream::iter(
        (0..1000).map(|i| create(pod(&format!("pod-{i:04}"), &format!("{}m", 100 + (i % 5) * 150), "512Mi"))),
    )
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await;
    let listed = wait_for(&objects, "1000 pods bound", |l| {
        pods(l).iter().filter(|p| !p.spec.node_name.is_empty()).count() == 1000
    })
    .await;
    check_capacity(&listed);

    // Kill the plane whose scheduler leads; new pods must still be bound.
    let response = objects.client().kv_client().get(LEADER_KEY, None).await.unwrap();
    let leader = String::from_utf8_lossy(response.kvs()[0].value()).into_owned();
    let index = cluster.planes.iter().position(|plane| plane.name == leader).expect("the leader is a plane");
    let killed_at = Instant::now();
    cluster.planes[index].kill();
    let survivors: Vec<String> =
        cluster.planes.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, p)| p.endpoint()).collect();
    let objects = Objects::new(capstan_client::connect(&survivors, Duration::from_secs(10)).await.unwrap());
    for i in 1000..1100 {
        let object = pod(&format!("pod-{i:04}"), "100m", "64Mi");
        // The cluster may be electing a Raft leader; retry the few refused creates.
        loop {
            match objects.create(&object).await {
                Ok(_) | Err(capstan_client::ClientError::AlreadyExists { .. }) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let listed = wait_for(&objects, "1100 pods bound after failover", |l| {
        pods(l).iter().filter(|p| !p.spec.node_name.is_empty()).count() == 1100
    })
    .await;
    let took_over = killed_at.elapsed();
    let response = objects.client().kv_client().get(LEADER_KEY, None).await.unwrap();
    let new_leader = String::from_utf8_lossy(response.kvs()[0].value()).into_owned();
    assert_ne!(new_leader, leader);
    eprintln!("scheduler failover: {leader} killed, {new_leader} bound the last pod after {took_over:?} (lease TTL {LEASE_TTL_SECS} s)");
    check_capacity(&listed);
    assert_no_pod_bound_twice(&objects).await;
}

/// No node has more requested than its capacity.
fn check_capacity(listed: &Listed) {
    let mut requested: HashMap<&str, (i64, i64)> = HashMap::new();
    for pod in pods(listed) {
        let requests = pod.requests();
        let entry = requested.entry(pod.spec.node_name.as_str()).or_default();
        entry.0 += requests.cpu_millis;
        entry.1 += requests.memory_bytes;
    }
    for object in &listed.objects {
        if let Object::Node(node) = object {
            let (cpu, memory) = requested.get(node.metadata.name.as_str()).copied().unwrap_or_default();
            let capacity = node.allocatable("cpu").unwrap().milli_value().unwrap();
            assert!(cpu <= capacity, "{} over-committed: {cpu}m of {capacity}m", node.metadata.name);
            assert!(
                memory <= node.allocatable("memory").unwrap().value().unwrap(),
                "{} memory over-committed",
                node.metadata.name
            );
        }
    }
}

/// Replays every pod event from revision 1; returns how many pods were bound and the
/// pods whose nodeName changed once set (bound twice).
async fn binds_in_history(objects: &Objects) -> (usize, Vec<String>) {
    let revision = objects.client().kv_client().get("x", None).await.unwrap().header().unwrap().revision();
    let options = WatchOptions::new().with_prefix().with_start_revision(1);
    let mut stream = objects.client().watch_client().watch(Kind::Pod.prefix(), Some(options)).await.unwrap();
    let mut bound: BTreeMap<String, String> = BTreeMap::new();
    let mut twice = Vec::new();
    let mut seen = 0;
    while seen < revision {
        let response = stream.message().await.unwrap().expect("watch stream");
        if response.events().is_empty() && !response.created() {
            seen = seen.max(response.header().map_or(0, |h| h.revision()));
        }
        for event in response.events() {
            let kv = event.kv().unwrap();
            seen = seen.max(kv.mod_revision());
            if event.event_type() != EventType::Put {
                continue;
            }
            let Ok(Object::Pod(pod)) = decode_stored(kv.key(), kv.value(), kv.mod_revision()) else { continue };
            if pod.spec.node_name.is_empty() {
                continue;
            }
            if let Some(before) = bound.insert(pod.metadata.name.clone(), pod.spec.node_name.clone()) {
                if before != pod.spec.node_name {
                    twice.push(pod.metadata.name.clone());
                }
            }
        }
    }
    (bound.len(), twice)
}

async fn assert_no_pod_bound_twice(objects: &Objects) {
    assert_eq!(binds_in_history(objects).await, (1100, vec![]));
}

/// The fence: once a new leader holds the key, a txn carrying the old leader's fence
/// changes nothing, even though the old leader still believes it leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_write() {
    let cluster = Cluster::start(1);
    let objects = objects(&cluster).await;
    let client = objects.client().clone();
    let config = capstan_scheduler::election::ElectionConfig {
        key: LEADER_KEY.into(),
        identity: "old".into(),
        lease_ttl: Duration::from_secs(5),
        renew_interval: Duration::from_secs(1),
    };
    let old = capstan_scheduler::election::campaign(&client, &config).await.unwrap();
    let old_fence = old.fence.clone();
    // The old leader's lease is lost (as if it stalled past its TTL).
    client.lease_client().revoke(old.lease_id).await.unwrap();
    let new = capstan_scheduler::election::campaign(
        &client,
        &capstan_scheduler::election::ElectionConfig { identity: "new".into(), ..config },
    )
    .await
    .unwrap();
    assert_ne!(new.fence, old_fence);
    let bind = |fence: &capstan_scheduler::Fence, value: &str| {
        Txn::new().when([fence.compare()]).and_then([TxnOp::put("/registry/pods/default/x", value, None)])
    };
    assert!(
        !client.kv_client().txn(bind(&old_fence, "old")).await.unwrap().succeeded(),
        "the deposed leader's write must fail"
    );
    assert!(client.kv_client().txn(bind(&new.fence, "new")).await.unwrap().succeeded());

    // The history check used above catches a pod bound twice.
    let mut rebound = pod("y", "1m", "1Mi");
    if let Object::Pod(p) = &mut rebound {
        p.spec.node_name = "n1".into();
    }
    let stored = objects.create(&rebound).await.unwrap();
    let mut moved = stored.clone();
    if let Object::Pod(p) = &mut moved {
        p.spec.node_name = "n2".into();
    }
    objects.update(&moved).await.unwrap();
    assert_eq!(binds_in_history(&objects).await, (1, vec!["y".to_string()]));
}

/// A node whose lease expires turns NotReady; after the eviction timeout its pods fail
/// with reason NodeLost and their ReplicaSet replaces them on a healthy node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_lost_node_fail_and_are_replaced_elsewhere() {
    let cluster = Cluster::start_with(3, &["--scheduler", "--pod-eviction-timeout-secs", "2"]);
    let endpoints = cluster.endpoints().join(",");
    let objects = objects(&cluster).await;
    objects.create(&node("doomed", "4", "8Gi", &[])).await.unwrap();
    let lease = objects.client().lease_client().grant(600, None).await.unwrap().id();
    let options = Some(PutOptions::new().with_lease(lease));
    objects.client().kv_client().put("/registry/leases/nodes/doomed", "", options).await.unwrap();
    let rs = "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: app}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: a}}\n  template:\n    metadata: {labels: {app: a}}\n    spec:\n      containers: [{name: c, command: [sleep, '3600'], resources: {requests: {cpu: 100m}}}]\n";
    assert!(ctl(&endpoints, &["apply", "-f", "-"], rs).0);
    wait_for(&objects, "2 pods on doomed", |l| pods(l).iter().filter(|p| p.spec.node_name == "doomed").count() == 2)
        .await;
    objects.create(&node("healthy", "4", "8Gi", &[])).await.unwrap();
    hold_node_leases(&objects, &["healthy".into()]).await;

    // The agent's lease ends (revoked here; expiry deletes the key the same way).
    objects.client().lease_client().revoke(lease).await.unwrap();
    let listed = wait_for(&objects, "replacements on healthy", |l| {
        let lost = pods(l).iter().filter(|p| p.spec.node_name == "doomed" && p.status.reason == "NodeLost").count();
        let replaced = pods(l).iter().filter(|p| p.spec.node_name == "healthy").count();
        lost == 2 && replaced == 2
    })
    .await;
    let doomed = listed.objects.iter().find(|o| o.metadata().name == "doomed").unwrap();
    let Object::Node(doomed) = doomed else { panic!() };
    assert_eq!(condition(&doomed.status.conditions, NODE_READY).unwrap().status, "Unknown");
    let mut on_doomed = pods(&listed).into_iter().filter(|p| p.spec.node_name == "doomed");
    assert!(on_doomed.all(|p| p.status.phase == capstan_proto::objects::PodPhase::Failed));
    let (_, out, _) = ctl(&endpoints, &["get", "nodes"], "");
    assert!(out.contains("doomed    NotReady"), "{out}");
    let (_, out, _) = ctl(&endpoints, &["get", "pods"], "");
    assert_eq!(out.matches("NodeLost").count(), 2, "{out}");
}

/// `capstan scheduler` runs standalone against planes without one; `ctl get pods -w`
/// streams the bind as it happens; `describe` shows it; a stopped scheduler resigns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_scheduler_binds_while_ctl_watches() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let plane = common::PlaneProcess::start(&dir.path().join("plane"), &[]);
    let endpoint = plane.client_addr.to_string();
    let objects =
        Objects::new(capstan_client::connect(std::slice::from_ref(&endpoint), Duration::from_secs(10)).await.unwrap());
    let mut scheduler = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["scheduler", "--endpoints", &endpoint, "--identity", "standalone"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut watcher = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["ctl", "--endpoints", &endpoint, "get", "pods", "-o", "wide", "-w"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watcher.stdout.take().unwrap()).lines();
    objects.create(&node("n1", "2", "4Gi", &[])).await.unwrap();
    hold_node_leases(&objects, &["n1".into()]).await;
    objects.create(&pod("p", "500m", "1Gi")).await.unwrap();
    let watched = tokio::task::spawn_blocking(move || {
        lines.by_ref().map_while(Result::ok).find(|line| line.starts_with("p ") && line.ends_with(" n1"))
    });
    let line = tokio::time::timeout(CONVERGE_TIMEOUT, watched).await.expect("the bind is watched").unwrap();
    assert!(line.is_some(), "ctl get -w ended without showing the bind");
    let _ = watcher.kill();
    let _ = watcher.wait();
    let (ok, out, _) = ctl(&endpoint, &["describe", "pod", "p"], "");
    assert!(ok);
    assert!(out.contains("Node:             n1"), "{out}");
    assert!(out.contains("  PodScheduled   True"), "{out}");
    assert!(out.contains("Requests:  cpu=500m, memory=1Gi"), "{out}");
    let leader = objects.client().kv_client().get(LEADER_KEY, None).await.unwrap();
    assert_eq!(leader.kvs()[0].value(), b"standalone");

    // SIGTERM: the leader resigns, deleting its key at once rather than at lease expiry.
    // SAFETY: signalling our own child, which has not been reaped.
    unsafe { libc::kill(scheduler.id() as libc::pid_t, libc::SIGTERM) };
    assert!(scheduler.wait().unwrap().success());
    assert!(objects.client().kv_client().get(LEADER_KEY, None).await.unwrap().kvs().is_empty());
}
