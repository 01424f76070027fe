//! Node agents (`capstan agent`) on real planes: pods run as processes to their end,
//! fail with their exit code or a clear message, crash-loop with back-off, stop with
//! SIGTERM on deletion, serve their logs; a killed agent's pods are replaced on another
//! node; an agent puts back its lost node lease key; agents keep their nodes Ready through
//! a plane leader's failover.

mod common;

use std::time::Duration;

use capstan_client::{Listed, Objects};
use capstan_proto::objects::{condition, Object, Pod, PodPhase, NODE_READY};
use common::{ctl, leader_index, wait_for, AgentProcess, Cluster, PlaneProcess, CONVERGE_TIMEOUT};
use etcd_client::{EventType, WatchOptions};

async fn objects_at(endpoints: &[String]) -> Objects {
    Objects::new(capstan_client::connect(endpoints, Duration::from_secs(10)).await.expect("connect"))
}

fn pod_of(object: &Object) -> Option<&Pod> {
    match object {
        Object::Pod(pod) => Some(pod),
        _ => None,
    }
}

fn pod<'a>(listed: &'a Listed, name: &str) -> Option<&'a Pod> {
    listed.objects.iter().filter_map(pod_of).find(|pod| pod.metadata.name == name)
}

fn phase_is(listed: &Listed, name: &str, phase: PodPhase) -> bool {
    pod(listed, name).is_some_and(|pod| pod.status.phase == phase)
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: done}
spec:
  restartPolicy: Never
  containers:
  - name: c
    command: [sh, -c, 'echo out; echo "$GREETING"; pwd']
    env: [{name: GREETING, value: hi}]
---
apiVersion: v1
kind: Pod
metadata: {name: fails}
spec:
  restartPolicy: Never
  containers: [{name: c, command: [sh, -c, 'echo oops >&2; exit 3']}]
---
apiVersion: v1
kind: Pod
metadata: {name: crashes}
spec:
  containers: [{name: c, command: [sh, -c, 'exit 1']}]
---
apiVersion: v1
kind: Pod
metadata: {name: missing}
spec:
  restartPolicy: Never
  containers: [{name: c, command: [/no/such/program]}]
---
apiVersion: v1
kind: Pod
metadata: {name: second-try}
spec:
  restartPolicy: OnFailure
  containers: [{name: c, command: [sh, -c, 'if [ -f ran ]; then exit 0; fi; touch ran; exit 1']}]
---
apiVersion: v1
kind: Pod
metadata: {name: ghost}
spec:
  nodeName: ghost
  containers: [{name: c, command: [sleep, '1']}]
---
apiVersion: v1
kind: Pod
metadata: {name: server}
spec:
  terminationGracePeriodSeconds: 5
  containers:
  - name: c
    command: [sh, -c, 'trap "echo stopping; exit 0" TERM; echo started; while true; do sleep 0.1; done']
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runs_pods_to_their_end_and_reports_how_they_ended() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &["--scheduler"]);
    let endpoint = plane.client_addr.to_string();
    let agent = AgentProcess::start("a1", &endpoint, &dir.path().join("a1"), &["--restart-backoff-ms", "100"]);
    let objects = objects_at(std::slice::from_ref(&endpoint)).await;
    let (ok, _, err) = ctl(&endpoint, &["apply", "-f", "-"], PODS);
    assert!(ok, "{err}");

    let listed = wait_for(&objects, "every pod to settle", |l| {
        phase_is(l, "done", PodPhase::Succeeded)
            && phase_is(l, "fails", PodPhase::Failed)
            && phase_is(l, "missing", PodPhase::Failed)
            && phase_is(l, "second-try", PodPhase::Succeeded)
            && phase_is(l, "server", PodPhase::Running)
            && pod(l, "crashes")
                .is_some_and(|p| p.status.container_statuses.first().is_some_and(|c| c.restart_count >= 3))
            && pod(l, "ghost").is_some_and(|p| p.status.reason == "NodeNotFound")
    })
    .await;
    let terminated =
        |name: &str| pod(&listed, name).unwrap().status.container_statuses[0].state.terminated.clone().unwrap();
    assert_eq!(terminated("done").exit_code, 0);
    assert_eq!(terminated("fails").exit_code, 3);
    assert_eq!(pod(&listed, "fails").unwrap().status.message, "container \"c\" exited with code 3");
    let missing = pod(&listed, "missing").unwrap();
    assert_eq!(terminated("missing").reason, "StartError");
    assert!(
        missing.status.message.contains("\"/no/such/program\"") && missing.status.message.contains("No such file"),
        "{}",
        missing.status.message
    );
    assert_eq!(pod(&listed, "second-try").unwrap().status.container_statuses[0].restart_count, 1);
    let crashes = &pod(&listed, "crashes").unwrap().status;
    assert_eq!(crashes.phase, PodPhase::Running, "a crash-looping pod stays Running");
    let waiting = crashes.container_statuses[0].state.waiting.clone();
    assert!(waiting.is_none_or(|w| w.reason == "CrashLoopBackOff"));
    assert!(pod(&listed, "ghost").unwrap().status.message.contains("\"ghost\""));
    let server = pod(&listed, "server").unwrap();
    assert!(condition(&server.status.conditions, "Ready").is_some_and(|c| c.status == "True"));
    assert_eq!(server.status.host_ip, "127.0.0.1");

    // Logs, through the agent's log service.
    let (ok, out, err) = ctl(&endpoint, &["logs", "done"], "");
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["out", "hi"]);
    assert!(lines[2].starts_with(&agent.data_dir.join("pods").join("default_done_").display().to_string()), "{out}");
    assert_eq!(ctl(&endpoint, &["logs", "fails"], "").1, "oops\n");
    let (ok, _, err) = ctl(&endpoint, &["logs", "nope"], "");
    assert!(!ok && err.contains("pods \"nope\" not found"), "{err}");
    let (_, out, _) = ctl(&endpoint, &["get", "pods"], "");
    assert!(out.contains("crashes") && out.contains("missing      0/1     StartError"), "{out}");

    // Deleting a running pod sends its processes SIGTERM; `logs -f` sees it stop.
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["ctl", "--endpoints", &endpoint, "logs", "-f", "server"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (lines, mut seen) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Delete only once the log is being followed, so it is followed to the end.
    let first = tokio::time::timeout(CONVERGE_TIMEOUT, seen.recv()).await.expect("a log line in time");
    assert_eq!(first.as_deref(), Some("started"));
    assert!(ctl(&endpoint, &["delete", "pod", "server"], "").0);
    // (The shell may first report its `sleep` as Terminated: the whole group gets SIGTERM.)
    loop {
        let line = tokio::time::timeout(CONVERGE_TIMEOUT, seen.recv()).await.expect("a log line in time");
        match line.as_deref() {
            Some("stopping") => break,
            Some(_) => {}
            None => panic!("the log ended before the pod said it was stopping"),
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();

    // Regression: a pod deleted and at once re-created under its name is a new pod (a new
    // UID); the old one's last status, written as it stops, must not land on it.
    // (Created through the client with no UID, as any program may.)
    let again = "apiVersion: v1\nkind: Pod\nmetadata: {name: again}\nspec:\n  containers: [{name: c, command: [sleep, '3600']}]\n";
    let again = capstan_proto::objects::manifest::decode_documents(again).unwrap().remove(0).unwrap().object;
    objects.create(&again).await.unwrap();
    wait_for(&objects, "again running", |l| phase_is(l, "again", PodPhase::Running)).await;
    assert!(ctl(&endpoint, &["delete", "pod", "again"], "").0);
    objects.create(&again).await.unwrap();
    let listed = wait_for(&objects, "the new again running", |l| {
        pod(l, "again")
            .is_some_and(|p| p.status.phase == PodPhase::Running && p.status.container_statuses[0].restart_count == 0)
    })
    .await;
    let uid = pod(&listed, "again").unwrap().metadata.uid.clone();
    // Stop the agent cleanly: it stops the new pod, whose final status is its own.
    drop(agent);
    let after = objects.get(capstan_proto::objects::Kind::Pod, "default", "again").await.unwrap().unwrap();
    assert_eq!(after.metadata().uid, uid);
}

/// kill -9 an agent: its lease expires, its node turns NotReady, its pods fail with
/// NodeLost, and the ReplicaSet's replacements run on the other node. Restarted, the
/// agent kills what it left running rather than duplicating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_pods_are_replaced_on_another_node() {
    let cluster = Cluster::start_with(3, &["--scheduler", "--pod-eviction-timeout-secs", "2"]);
    let endpoints = cluster.endpoints().join(",");
    let lease = ["--node-lease-ttl-secs", "3", "--node-lease-renew-secs", "1"];
    let mut a1 = AgentProcess::start("a1", &endpoints, &cluster.dir().join("a1"), &lease);
    let _a2 = AgentProcess::start("a2", &endpoints, &cluster.dir().join("a2"), &lease);
    let objects = objects_at(&cluster.endpoints()).await;
    let rs = "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: app}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: a}}\n  template:\n    metadata: {labels: {app: a}}\n    spec:\n      containers: [{name: c, command: [sleep, '3600'], resources: {requests: {cpu: 100m}}}]\n";
    assert!(ctl(&endpoints, &["apply", "-f", "-"], rs).0);
    let running_on = |l: &Listed, node: &str| {
        l.objects
            .iter()
            .filter_map(pod_of)
            .filter(|p| p.spec.node_name == node && p.status.phase == PodPhase::Running)
            .count()
    };
    wait_for(&objects, "one replica running on each node", |l| running_on(l, "a1") == 1 && running_on(l, "a2") == 1)
        .await;

    a1.kill();
    let listed = wait_for(&objects, "a1's replica replaced on a2", |l| {
        let lost =
            l.objects.iter().filter_map(pod_of).filter(|p| p.spec.node_name == "a1" && p.status.reason == "NodeLost");
        lost.count() == 1 && running_on(l, "a2") == 2
    })
    .await;
    let node = listed.objects.iter().find(|o| o.metadata().name == "a1").unwrap();
    let Object::Node(node) = node else { panic!("not a node") };
    assert_ne!(condition(&node.status.conditions, NODE_READY).unwrap().status, "True");

    // The killed agent's `sleep` still runs; a restarted agent kills it, and posts Ready.
    let orphan = left_running(&a1.data_dir);
    assert_eq!(orphan.len(), 1, "the killed agent's container outlives it");
    a1.restart();
    a1.wait_for_log("killed containers a previous agent left running");
    let deadline = std::time::Instant::now() + CONVERGE_TIMEOUT;
    while alive(orphan[0]) {
        assert!(std::time::Instant::now() < deadline, "the orphaned container was not killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for(&objects, "a1 Ready again", |l| {
        l.objects.iter().any(|o| matches!(o, Object::Node(n) if n.metadata.name == "a1" && n.is_ready()))
    })
    .await;

    // Drain a2: a pod no ReplicaSet owns blocks it unless forced; then a2's replicas are
    // evicted and replaced on a1.
    let bare = "apiVersion: v1\nkind: Pod\nmetadata: {name: bare}\nspec:\n  nodeName: a2\n  containers: [{name: c, command: [sleep, '3600']}]\n";
    assert!(ctl(&endpoints, &["apply", "-f", "-"], bare).0);
    let (ok, _, err) = ctl(&endpoints, &["drain", "a2"], "");
    assert!(
        !ok && err.contains("cannot delete Pods that declare no controller (use --force to override): default/bare"),
        "{err}"
    );
    let (ok, out, err) = ctl(&endpoints, &["drain", "a2", "--force"], "");
    assert!(ok, "{err}");
    assert!(out.ends_with("node/a2 drained\n"), "{out}");
    wait_for(&objects, "the replicas on a1", |l| running_on(l, "a1") == 2 && running_on(l, "a2") == 0).await;
    let (_, out, _) = ctl(&endpoints, &["get", "nodes"], "");
    assert!(out.contains("a2     Ready,SchedulingDisabled"), "{out}");
}

/// The planes go away and come back: the agent's pods keep running meanwhile, and once
/// the planes return the agent carries on (the same process, no restart) and runs new
/// pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_keep_running_while_the_planes_are_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = PlaneProcess::start(&dir.path().join("plane"), &["--scheduler"]);
    let endpoint = plane.client_addr.to_string();
    let lease = ["--node-lease-ttl-secs", "10", "--node-lease-renew-secs", "1"];
    let mut agent = AgentProcess::start("a1", &endpoint, &dir.path().join("a1"), &lease);
    let objects = objects_at(std::slice::from_ref(&endpoint)).await;
    let pod_yaml = |name: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers: [{{name: c, command: [sleep, '3600']}}]\n")
    };
    assert!(ctl(&endpoint, &["apply", "-f", "-"], &pod_yaml("before")).0);
    wait_for(&objects, "before running", |l| phase_is(l, "before", PodPhase::Running)).await;
    let pids = left_running(&agent.data_dir);
    assert_eq!(pids.len(), 1);

    plane.kill();
    agent.wait_for_log("cannot renew the node lease");
    assert!(alive(pids[0]), "the pod runs on while the planes are away");
    plane.restart();
    plane.wait_until_ready();

    let objects = objects_at(std::slice::from_ref(&endpoint)).await;
    assert!(ctl(&endpoint, &["apply", "-f", "-"], &pod_yaml("after")).0);
    let listed = wait_for(&objects, "after running", |l| phase_is(l, "after", PodPhase::Running)).await;
    let before = pod(&listed, "before").unwrap();
    assert_eq!((before.status.phase, before.status.container_statuses[0].restart_count), (PodPhase::Running, 0));
    assert!(alive(pids[0]), "the same process, not a restart");
}

/// The pids of containers an agent recorded as running.
fn left_running(data_dir: &std::path::Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for pod in std::fs::read_dir(data_dir.join("pods")).unwrap().filter_map(Result::ok) {
        for file in std::fs::read_dir(pod.path()).unwrap().filter_map(Result::ok) {
            if file.path().extension().is_some_and(|e| e == "pid") {
                let text = std::fs::read_to_string(file.path()).unwrap();
                pids.push(text.split_whitespace().next().unwrap().parse().unwrap());
            }
        }
    }
    pids.into_iter().filter(|pid| alive(*pid)).collect()
}

/// Running, not a zombie waiting to be reaped.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// Waits for the next put of `key` under `lease` after `revision`.
async fn put_back(objects: &Objects, key: &str, lease: i64, revision: i64) {
    let options = WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = objects.client().watch_client().watch(key, Some(options)).await.unwrap();
    let put_back = async {
        loop {
            let message = stream.message().await.unwrap().expect("watch open");
            let mut events = message.events().iter();
            if events.any(|e| e.event_type() == EventType::Put && e.kv().is_some_and(|kv| kv.lease() == lease)) {
                return;
            }
        }
    };
    tokio::time::timeout(CONVERGE_TIMEOUT, put_back).await.expect("the agent puts its node lease key back");
}

/// The node's lease key is the agent's to keep: deleted, or left on another lease that
/// then goes away, it is put back under the agent's own lease at the next renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_puts_its_lost_node_lease_key_back() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    let endpoint = plane.client_addr.to_string();
    let lease = ["--node-lease-ttl-secs", "10", "--node-lease-renew-secs", "1"];
    let _agent = AgentProcess::start("keeper", &endpoint, &dir.path().join("keeper"), &lease);
    let objects = objects_at(std::slice::from_ref(&endpoint)).await;
    let key = "/registry/leases/nodes/keeper";
    let mut kv = objects.client().kv_client();
    let held = loop {
        let response = kv.get(key, None).await.unwrap();
        if let Some(held) = response.kvs().first().map(|kv| kv.lease()) {
            break held;
        }
        // The agent registers its node before it takes the lease.
        let options = WatchOptions::new().with_start_revision(response.header().unwrap().revision() + 1);
        let mut stream = objects.client().watch_client().watch(key, Some(options)).await.unwrap();
        stream.message().await.unwrap();
    };
    assert_ne!(held, 0);

    let deleted = kv.delete(key, None).await.unwrap().header().unwrap().revision();
    put_back(&objects, key, held, deleted).await;

    let other = objects.client().lease_client().grant(60, None).await.unwrap().id();
    let options = etcd_client::PutOptions::new().with_lease(other);
    let moved = kv.put(key, "someone else", Some(options)).await.unwrap().header().unwrap().revision();
    objects.client().lease_client().revoke(other).await.unwrap();
    // The agent may put the key back before the revoke (its renewal saw the other lease)
    // or after it (the revoke deleted the key); either way it ends under its own lease.
    put_back(&objects, key, held, moved).await;
    let now = kv.get(key, None).await.unwrap();
    assert_eq!(now.kvs()[0].lease(), held, "the key stays under the agent's lease");
}

/// Kill -9 the planes' Raft leader while agents heartbeat: their leases live on through
/// the new leader, so no node ever leaves Ready (watched over several lease TTLs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_keep_their_nodes_ready_through_a_plane_leader_failover() {
    const LEASE_TTL_SECS: u64 = 3;
    let mut cluster = Cluster::start_with(3, &["--scheduler", "--node-monitor-grace-secs", "3"]);
    let endpoints = cluster.endpoints().join(",");
    let lease = ["--node-lease-ttl-secs", "3", "--node-lease-renew-secs", "1"];
    let _a1 = AgentProcess::start("a1", &endpoints, &cluster.dir().join("a1"), &lease);
    let _a2 = AgentProcess::start("a2", &endpoints, &cluster.dir().join("a2"), &lease);
    let leader = leader_index(&cluster).await;
    let survivors: Vec<String> =
        cluster.endpoints().into_iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, e)| e).collect();
    let objects = objects_at(&survivors).await;
    let start = objects.list_prefix("/registry/nodes/").await.unwrap();
    assert_eq!(start.objects.len(), 2);
    assert!(start.objects.iter().all(|o| matches!(o, Object::Node(n) if n.is_ready())));
    cluster.planes[leader].kill();

    // Watch every node change for three lease TTLs after the kill: none may leave Ready.
    let options = WatchOptions::new().with_prefix().with_start_revision(start.revision + 1);
    let mut stream = objects.client().watch_client().watch("/registry/nodes/", Some(options)).await.unwrap();
    let window = tokio::time::Instant::now() + Duration::from_secs(3 * LEASE_TTL_SECS);
    while let Ok(message) = tokio::time::timeout_at(window, stream.message()).await {
        for event in message.unwrap().expect("watch").events() {
            let kv = event.kv().unwrap();
            let object = capstan_proto::objects::decode_stored(kv.key(), kv.value(), kv.mod_revision());
            if let Ok(Object::Node(node)) = object {
                assert!(node.is_ready(), "node {} flapped to NotReady during the failover", node.metadata.name);
            }
        }
    }
    // And both leases are still there, renewed through the new leader.
    let leases = objects
        .client()
        .kv_client()
        .get("/registry/leases/nodes/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(leases.kvs().len(), 2);
}
