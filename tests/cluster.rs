//! A 3-plane cluster of real `capstan plane` processes: any endpoint serves reads and
//! writes, the leader can be killed under a stream of writes without losing one that was
//! acknowledged, and a restarted plane catches up.

mod common;

use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, WatchOptions};

use common::{leader_index, Cluster};

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future).await.expect("step timed out")
}

async fn client_of(endpoint: &str) -> Client {
    bounded(Client::connect([endpoint], None)).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_plane_serves_reads_writes_watches_and_leases() {
    let cluster = Cluster::start(3);
    let leader = leader_index(&cluster).await;
    let follower = (leader + 1) % 3;
    let mut on_follower = client_of(&cluster.planes[follower].endpoint()).await;
    let mut on_other = client_of(&cluster.planes[(leader + 2) % 3].endpoint()).await;

    let mut watch = bounded(on_other.watch("shared/", Some(WatchOptions::new().with_prefix()))).await.unwrap();
    assert!(bounded(watch.message()).await.unwrap().unwrap().created());

    let put = bounded(on_follower.put("shared/a", "1", None)).await.unwrap();
    let revision = put.header().unwrap().revision();
    // A linearizable read on another follower sees the write at once.
    let got = bounded(on_other.get("shared/a", None)).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"1");
    assert!(got.header().unwrap().revision() >= revision);
    let event = bounded(watch.message()).await.unwrap().unwrap();
    assert_eq!(event.events()[0].kv().unwrap().key(), b"shared/a");

    let lease = bounded(on_follower.lease_grant(30, None)).await.unwrap();
    bounded(on_follower.put("shared/leased", "v", Some(PutOptions::new().with_lease(lease.id())))).await.unwrap();
    let (mut keeper, mut kept) = bounded(on_other.lease_keep_alive(lease.id())).await.unwrap();
    bounded(keeper.keep_alive()).await.unwrap();
    assert_eq!(bounded(kept.message()).await.unwrap().unwrap().ttl(), 30);
    let ttl = bounded(on_other.lease_time_to_live(lease.id(), None)).await.unwrap();
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 30);
    bounded(on_other.lease_revoke(lease.id())).await.unwrap();
    assert!(bounded(on_follower.get("shared/leased", None)).await.unwrap().kvs().is_empty());

    let members = bounded(on_follower.member_list()).await.unwrap();
    assert_eq!(members.members().len(), 3);
    for member in members.members() {
        assert_eq!(member.client_urls().len(), 1, "{} published its client URL", member.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3);
    let leader = leader_index(&cluster).await;
    let endpoints = cluster.endpoints();
    let writer_endpoint = endpoints[(leader + 1) % 3].clone();
    let (acked_sender, mut acked) = tokio::sync::mpsc::unbounded_channel();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let mut client = client_of(&writer_endpoint).await;
        let mut index = 0u64;
        while !*stopped.borrow_and_update() {
            let key = format!("stream/{index:06}");
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), client.put(key.clone(), "v", None)).await {
                let _ = acked_sender.send(key);
            }
            index += 1;
        }
    });
    // Let some writes through, kill the leader, and wait for writes to be acknowledged again.
    let mut acknowledged: Vec<String> = Vec::new();
    while acknowledged.len() < 50 {
        acknowledged.push(bounded(acked.recv()).await.unwrap());
    }
    cluster.planes[leader].kill();
    while acknowledged.len() < 100 {
        acknowledged.push(bounded(acked.recv()).await.expect("writes resume on a new leader"));
    }
    let _ = stop.send(true);
    writer.await.unwrap();
    while let Ok(key) = acked.try_recv() {
        acknowledged.push(key);
    }

    // Every acknowledged write is there, read through a surviving plane.
    let mut client = client_of(&endpoints[(leader + 2) % 3]).await;
    let all = bounded(client.get("stream/", Some(GetOptions::new().with_prefix().with_keys_only()))).await.unwrap();
    let present: std::collections::BTreeSet<Vec<u8>> = all.kvs().iter().map(|kv| kv.key().to_vec()).collect();
    for key in &acknowledged {
        assert!(present.contains(key.as_bytes()), "acknowledged {key} is missing");
    }

    // The killed plane comes back and catches up.
    cluster.planes[leader].restart();
    cluster.planes[leader].wait_for_logs(&["plane serving", "leader elected"]);
    let mut rejoined = client_of(&endpoints[leader]).await;
    let seen = bounded(rejoined.get("stream/", Some(GetOptions::new().with_prefix().with_count_only()))).await.unwrap();
    assert_eq!(seen.count() as usize, present.len());
}

/// Peers hold long-lived streams (pipes) to each other: the leader's appends to each
/// follower, a follower's forwarded writes to the leader. A plane that stops ends the ones
/// it serves, so a follower and then a leader asked to stop (SIGTERM) each exit cleanly
/// without waiting out the grace period for their peers to hang up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planes_stop_promptly_though_peers_hold_streams_to_them() {
    let mut cluster = Cluster::start(3);
    let leader = leader_index(&cluster).await;
    let (first, second) = ((leader + 1) % 3, (leader + 2) % 3);
    for follower in [first, second] {
        let mut client = client_of(&cluster.planes[follower].endpoint()).await;
        bounded(client.put(format!("through/{follower}"), "v", None)).await.unwrap();
    }
    let stop = |plane: common::PlaneProcess| {
        plane.terminate();
        let name = plane.name.clone();
        let (status, log) = plane.wait_for_exit();
        assert!(status.success(), "{name} exited with {status}:\n{log}");
        assert!(log.contains("plane stopped"), "{name} did not stop cleanly:\n{log}");
        assert!(!log.contains("still connected after the grace period"), "{name} waited for its peers:\n{log}");
    };
    // The follower first, then (two planes are still a quorum) a write, then the leader.
    let (leader_plane, first_plane, second_plane) = {
        let mut planes: Vec<Option<common::PlaneProcess>> = cluster.planes.drain(..).map(Some).collect();
        (planes[leader].take().unwrap(), planes[first].take().unwrap(), planes[second].take().unwrap())
    };
    stop(first_plane);
    let mut client = client_of(&second_plane.endpoint()).await;
    bounded(client.put("after/follower-stopped", "v", None)).await.unwrap();
    stop(leader_plane);
    drop(second_plane);
}

/// A follower that missed more than the log keeps gets a snapshot while writes go on: the
/// leader's store as it stands when sent (newer than the snapshot the leader last took),
/// installed under the export's own log id. The follower then skips the entries up to it
/// that the leader sends next, and ends with the same keys and revisions as the others
/// (etcd's HashKV at one revision, on every plane). A leader that cannot write the export
/// at first (its snapshot directory replaced by a file) keeps serving and sends it once it
/// can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_catches_up_by_a_snapshot_taken_while_writes_go_on() {
    let mut cluster = Cluster::start_with(3, &["--snapshot-count", "20", "--snapshot-catchup-entries", "5"]);
    let leader = leader_index(&cluster).await;
    let behind = (leader + 1) % 3;
    let endpoints = cluster.endpoints();
    cluster.planes[behind].kill();
    let mut client = client_of(&endpoints[leader]).await;
    for index in 0..200 {
        bounded(client.put(format!("missed/{index:04}"), "v", None)).await.unwrap();
    }

    // Writes go on through the leader while the follower comes back and is sent the store.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let writer_endpoint = endpoints[leader].clone();
    let writer = tokio::spawn(async move {
        let mut client = client_of(&writer_endpoint).await;
        let mut index = 0u64;
        while !*stopped.borrow_and_update() {
            bounded(client.put(format!("during/{index:06}"), "v", None)).await.unwrap();
            index += 1;
        }
        index
    });
    let exports = cluster.planes[leader].data_dir.join("snapshots");
    std::fs::remove_dir_all(&exports).unwrap();
    std::fs::write(&exports, "not a directory").unwrap();
    cluster.planes[behind].restart();
    cluster.planes[leader].wait_for_logs(&["a snapshot was not sent"]);
    bounded(client.put("while/unsent", "v", None)).await.expect("the leader serves on");
    std::fs::remove_file(&exports).unwrap();
    std::fs::create_dir(&exports).unwrap();
    cluster.planes[behind].wait_for_logs(&["installed snapshot"]);
    let _ = stop.send(true);
    let written = bounded(writer).await.unwrap();
    assert!(written > 0, "writes went on while the snapshot was sent");
    let last = bounded(client.put("last", "v", None)).await.unwrap().header().unwrap().revision();

    let mut hashes = Vec::new();
    for endpoint in &endpoints {
        let mut plane = client_of(endpoint).await;
        let caught_up = async {
            loop {
                let serializable = GetOptions::new().with_serializable();
                let found = plane.get("last", Some(serializable)).await.unwrap();
                if let Some(kv) = found.kvs().first() {
                    return kv.mod_revision();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        assert_eq!(bounded(caught_up).await, last, "{endpoint} applied the last write at another revision");
        let hash = bounded(plane.hash_kv(last)).await.unwrap();
        hashes.push(hash.hash());
    }
    assert!(hashes.iter().all(|hash| *hash == hashes[0]), "the planes' stores differ at revision {last}: {hashes:?}");
}

/// A follower restored by a snapshot newer than the last one the leader took, with nothing
/// written since, answers the leader at once: the leader sends the entries up to the
/// export's id again (it counts from its own snapshot), the follower has them in its store,
/// not its log, and says so. With the third plane down, a linearizable read through the
/// leader needs that answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_restored_by_a_snapshot_answers_though_nothing_is_written_after_it() {
    let mut cluster = Cluster::start_with(3, &["--snapshot-count", "20", "--snapshot-catchup-entries", "5"]);
    let leader = leader_index(&cluster).await;
    let (behind, other) = ((leader + 1) % 3, (leader + 2) % 3);
    cluster.planes[behind].kill();
    let mut client = client_of(&cluster.planes[leader].endpoint()).await;
    // Past a snapshot boundary, so that the export is newer than the leader's snapshot.
    for index in 0..205 {
        bounded(client.put(format!("missed/{index:04}"), "v", None)).await.unwrap();
    }
    cluster.planes[behind].restart();
    cluster.planes[behind].wait_for_logs(&["installed snapshot"]);
    cluster.planes[other].kill();
    let read = bounded(client.get("missed/0204", None)).await.expect("a linearizable read with the restored follower");
    assert_eq!(read.kvs().len(), 1);
}
