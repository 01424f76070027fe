//! Membership changes on a cluster of real `capstan plane` processes, driven the way an
//! operator drives them: `capstan ctl member ...` and a new plane started with
//! `--initial-cluster-state existing`.

mod common;

use std::time::Duration;

use etcd_client::{Client, GetOptions};

use common::{ctl, free_addr, Cluster, PlaneProcess};

const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Low enough that the log the new member would need is purged behind a snapshot.
const SNAPSHOT_COUNT: &str = "20";
const CATCHUP_ENTRIES: &str = "5";
const KEYS: usize = 150;

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future).await.expect("step timed out")
}

async fn client_of(endpoint: &str) -> Client {
    bounded(Client::connect([endpoint], None)).await.expect("connect")
}

fn ctl_ok(endpoint: &str, args: &[&str]) -> String {
    let (success, stdout, stderr) = ctl(endpoint, args, "");
    assert!(success, "capstan ctl {args:?} failed: {stderr}");
    stdout
}

/// The member ID a plane answers with.
async fn member_id(endpoint: &str) -> u64 {
    bounded(client_of(endpoint).await.status()).await.unwrap().header().unwrap().member_id()
}

async fn leader_id(endpoint: &str) -> u64 {
    bounded(client_of(endpoint).await.status()).await.unwrap().leader()
}

/// Promotes learner `id` with ctl, trying again while the leader says it is not yet in
/// sync, as etcd's documentation tells operators to: the learner logs its snapshot
/// installed before the leader hears so and counts it as matching.
async fn promote_once_in_sync(endpoint: &str, id: u64) -> String {
    loop {
        let (success, stdout, stderr) = ctl(endpoint, &["member", "promote", &format!("{id:x}")], "");
        if success {
            return stdout;
        }
        assert!(stderr.contains("in sync with leader"), "capstan ctl member promote failed: {stderr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `plane` to exit on its own; returns its log.
async fn exits(plane: PlaneProcess) -> String {
    let waited = tokio::task::spawn_blocking(move || plane.wait_for_exit());
    let (status, log) = bounded(waited).await.unwrap();
    assert!(status.success(), "a removed plane stops cleanly, got {status}; log:\n{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_joins_by_snapshot_and_a_removed_leader_hands_over() {
    let mut cluster =
        Cluster::start_with(3, &["--snapshot-count", SNAPSHOT_COUNT, "--snapshot-catchup-entries", CATCHUP_ENTRIES]);
    let first = cluster.planes[0].endpoint();
    let mut client = client_of(&first).await;
    for index in 0..KEYS {
        bounded(client.put(format!("key/{index:04}"), "v", None)).await.unwrap();
    }

    // Add a learner with ctl; it prints how to start the new plane.
    let (client_addr, peer_addr) = (free_addr(), free_addr());
    let peer_url = format!("http://{peer_addr}");
    let added = ctl_ok(&first, &["member", "add", "plane-3", "--peer-urls", &peer_url, "--learner"]);
    assert!(added.contains("added to cluster"), "{added}");
    // Start the plane with the flags ctl printed, as an operator would.
    let start_line = added.lines().find(|line| line.starts_with("capstan plane")).expect("a start line");
    let words: Vec<&str> = start_line.split_whitespace().collect();
    let initial_cluster = words[words.iter().position(|word| *word == "--initial-cluster").unwrap() + 1];
    let mut expected: Vec<String> = cluster.initial_cluster().split(',').map(String::from).collect();
    expected.push(format!("plane-3={peer_url}"));
    let mut printed: Vec<String> = initial_cluster.split(',').map(String::from).collect();
    expected.sort();
    printed.sort();
    assert_eq!(printed, expected);
    assert!(start_line.ends_with("--initial-cluster-state existing"), "{start_line}");
    let listed = ctl_ok(&first, &["member", "list"]);
    assert!(listed.contains(&format!(", unstarted, , {peer_url}, , true")), "{listed}");

    // The new plane learns its identity from a member, and the leader sends it a snapshot
    // because the entries it lacks are purged.
    let mut joined = PlaneProcess::spawn_named(
        "plane-3",
        &cluster.dir().join("plane-3"),
        client_addr,
        peer_addr,
        &[
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            "existing",
            "--snapshot-count",
            SNAPSHOT_COUNT,
        ],
    );
    joined.wait_for_logs(&["joining", "installed snapshot", "client URLs published"]);
    let joined_id = member_id(&joined.endpoint()).await;
    let promoted = bounded(promote_once_in_sync(&first, joined_id)).await;
    assert!(promoted.contains("promoted in cluster"), "{promoted}");

    // It serves linearizable reads and writes as a voter.
    let mut on_joined = client_of(&joined.endpoint()).await;
    let all = bounded(on_joined.get("key/", Some(GetOptions::new().with_prefix().with_count_only()))).await.unwrap();
    assert_eq!(all.count() as usize, KEYS);
    bounded(on_joined.put("from/joined", "v", None)).await.unwrap();
    let members = bounded(on_joined.member_list()).await.unwrap();
    assert_eq!(members.members().len(), 4);
    let listed = members.members().iter().find(|member| member.id() == joined_id).expect("the new member is listed");
    assert_eq!((listed.name(), listed.is_learner()), ("plane-3", false));
    assert_eq!(listed.client_urls(), [joined.endpoint()]);
    cluster.planes.push(joined);

    // Removing the leader: it stops, and the others elect a leader and keep serving.
    let leader = leader_id(&first).await;
    let leader_index = {
        let mut found = None;
        for (index, plane) in cluster.planes.iter().enumerate() {
            if member_id(&plane.endpoint()).await == leader {
                found = Some(index);
            }
        }
        found.expect("one plane leads")
    };
    let survivor = cluster.planes[(leader_index + 1) % 4].endpoint();
    let removed = ctl_ok(&survivor, &["member", "remove", &format!("{leader:x}")]);
    assert!(removed.contains("removed from cluster"), "{removed}");
    let old_leader = cluster.planes.remove(leader_index);
    let (name, data_dir) = (old_leader.name.clone(), old_leader.data_dir.clone());
    let log = exits(old_leader).await;
    assert!(log.contains("removed from the cluster"), "{log}");
    let mut on_survivor = client_of(&survivor).await;
    bounded(on_survivor.put("after/removal", "v", None)).await.unwrap();
    assert_ne!(leader_id(&survivor).await, leader);
    assert_eq!(bounded(on_survivor.member_list()).await.unwrap().members().len(), 3);

    // Its data directory refuses to serve again.
    let mut again = PlaneProcess::spawn_named(&name, &data_dir, free_addr(), free_addr(), &[]);
    again.wait_for_logs(&["was removed from cluster"]);

    // Removing a follower: the leader tells it, and it stops too.
    let leader = leader_id(&survivor).await;
    let mut follower_index = None;
    for (index, plane) in cluster.planes.iter().enumerate() {
        if member_id(&plane.endpoint()).await != leader {
            follower_index = Some(index);
        }
    }
    let follower = cluster.planes.remove(follower_index.expect("a follower"));
    let follower_id = member_id(&follower.endpoint()).await;
    let remaining = cluster.planes[0].endpoint();
    ctl_ok(&remaining, &["member", "remove", &format!("{follower_id:x}")]);
    exits(follower).await;
    let mut on_remaining = client_of(&remaining).await;
    bounded(on_remaining.put("after/second-removal", "v", None)).await.unwrap();
    assert_eq!(bounded(on_remaining.member_list()).await.unwrap().members().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_requests_get_etcds_errors() {
    let cluster = Cluster::start(3);
    let endpoint = cluster.planes[1].endpoint();
    let taken = format!("http://{}", cluster.planes[2].peer_addr);
    let refused = |args: &[&str]| {
        let (success, _, stderr) = ctl(&endpoint, args, "");
        assert!(!success, "capstan ctl {args:?} should fail");
        stderr
    };
    assert!(refused(&["member", "add", "x", "--peer-urls", &taken]).contains("Peer URLs already exists"));
    assert!(refused(&["member", "add", "x", "--peer-urls", "not a url"]).contains("given member URLs are invalid"));
    assert!(refused(&["member", "remove", "1234"]).contains("member not found"));
    let voter = format!("{:x}", member_id(&endpoint).await);
    assert!(refused(&["member", "promote", &voter]).contains("can only promote a learner member"));
    let learner_url = format!("http://{}", free_addr());
    ctl_ok(&endpoint, &["member", "add", "x", "--peer-urls", &learner_url, "--learner"]);
    let second_learner = format!("http://{}", free_addr());
    assert!(refused(&["member", "add", "y", "--peer-urls", &second_learner, "--learner"])
        .contains("too many learner members in cluster"));
    // A learner that never started has not caught up.
    let listed = ctl_ok(&endpoint, &["member", "list"]);
    let learner_id = listed.lines().find(|line| line.contains(&learner_url)).unwrap().split(',').next().unwrap();
    assert!(refused(&["member", "promote", learner_id]).contains("in sync with leader"));
}
