//! Backups on real planes: `capstan ctl snapshot save` (and etcdctl's) stream a checked
//! snapshot; `capstan plane --restore` starts a fresh 3-plane cluster with the identical
//! content, revisions, compaction and leases, and a restart with the flag still given
//! keeps the member's data; a truncated, foreign or misplaced backup is refused with a
//! clear error.

mod common;

use std::path::Path;

use common::{ctl, free_addr, Cluster, PlaneProcess};
use etcd_client::{Client, GetOptions, PutOptions};

/// Every key with its value, revisions, version and lease, and the store's revision.
async fn everything(endpoint: &str) -> (Vec<(Vec<u8>, Vec<u8>, i64, i64, i64, i64)>, i64) {
    let mut client = Client::connect([endpoint], None).await.unwrap();
    let response = client.get(vec![0u8], Some(GetOptions::new().with_from_key())).await.unwrap();
    let kvs = response
        .kvs()
        .iter()
        .map(|kv| {
            (kv.key().to_vec(), kv.value().to_vec(), kv.create_revision(), kv.mod_revision(), kv.version(), kv.lease())
        })
        .collect();
    (kvs, response.header().unwrap().revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_a_fresh_cluster_with_identical_content() {
    let old = Cluster::start(3);
    let endpoint = old.planes[0].endpoint();
    let mut client = Client::connect([endpoint.as_str()], None).await.unwrap();
    for i in 0..200 {
        client.put(format!("k/{:03}", i % 150), format!("v{i}"), None).await.unwrap();
    }
    client.delete("k/007", None).await.unwrap();
    let compact_at = client.put("k/mark", "m", None).await.unwrap().header().unwrap().revision();
    client.compact(compact_at, None).await.unwrap();
    let lease = client.lease_grant(600, None).await.unwrap().id();
    client.put("k/leased", "l", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let latest = client.put("k/last", "x", None).await.unwrap().header().unwrap().revision();
    let (content, revision) = everything(&endpoint).await;
    assert_eq!(revision, latest);

    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.snap");
    let backup_arg = backup.to_str().unwrap();
    let (ok, out, err) = ctl(&endpoint, &["snapshot", "save", backup_arg], "");
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("Snapshot saved at {backup_arg}")) && out.contains(&format!("revision {latest}")),
        "{out}"
    );
    assert!(!dir.path().join("backup.snap.part").exists());
    // The plane keeps no copy once the stream is done.
    let backups = old.planes[0].data_dir.join("backups");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(&backups).map_or(0, |entries| entries.count()) > 0 {
        assert!(std::time::Instant::now() < deadline, "a backup stayed in {}", backups.display());
        // Polling: the plane deletes the file after its last chunk, on its own time.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // etcdctl saves the same stream.
    let etcdctl_backup = dir.path().join("etcdctl.snap");
    let saved = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoint, "snapshot", "save", etcdctl_backup.to_str().unwrap()])
        .output()
        .expect("run etcdctl");
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    capstan_store::check_backup(&etcdctl_backup).expect("etcdctl's copy is a whole snapshot");
    drop(old);

    // A new cluster, every member started once with the backup and an empty directory.
    let restored = Cluster::start_with(3, &["--restore", backup_arg]);
    for plane in &restored.planes {
        let (got, got_revision) = everything(&plane.endpoint()).await;
        assert_eq!(got_revision, revision, "on {}", plane.name);
        assert_eq!(got, content, "on {}", plane.name);
    }
    let endpoint = restored.planes[1].endpoint();
    let mut client = Client::connect([endpoint.as_str()], None).await.unwrap();
    // Old revisions above the compaction are there; below it they are compacted.
    let old_read = client.get("k/mark", Some(GetOptions::new().with_revision(compact_at))).await.unwrap();
    assert_eq!(old_read.kvs()[0].value(), b"m");
    let compacted = client.get("k/mark", Some(GetOptions::new().with_revision(compact_at - 1))).await;
    assert!(compacted.unwrap_err().to_string().contains("required revision has been compacted"));
    // The lease came along, and the cluster goes on from the old revision.
    let ttl = client.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "the lease survived the restore: {ttl:?}");
    let next = client.put("k/after", "a", None).await.unwrap().header().unwrap().revision();
    assert_eq!(next, revision + 1);

    // A member restarted with `--restore` still given (a service unit's fixed command
    // line) goes on with its data instead of refusing to start or restoring again...
    let mut restored = restored;
    restored.planes[0].kill_and_restart();
    let (got, got_revision) = everything(&restored.planes[0].endpoint()).await;
    assert_eq!(got_revision, next);
    assert!(got.iter().any(|kv| kv.0 == b"k/after"), "the write after the restore is kept");
    // ...but a different backup never overwrites a member.
    let newer = dir.path().join("newer.snap");
    let (ok, out, err) = ctl(&endpoint, &["snapshot", "save", newer.to_str().unwrap()], "");
    assert!(ok, "{out}{err}");
    restored.planes[2].kill();
    let log = refused(&restored.planes[2].data_dir, &newer);
    assert!(log.contains("--restore needs a new data directory") && log.contains("not restored from"), "{log}");
}

/// `capstan plane --restore FILE` on `data_dir`: it must exit with an error naming why.
fn refused(data_dir: &Path, file: &Path) -> String {
    let file = file.to_str().unwrap();
    let plane = PlaneProcess::spawn(data_dir, free_addr(), free_addr(), &["--restore", file]);
    let (status, log) = plane.wait_for_exit();
    assert!(!status.success(), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backups_are_refused_with_a_clear_error() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("good.snap");
    let (ok, out, err) = ctl(&cluster.planes[0].endpoint(), &["snapshot", "save", backup.to_str().unwrap()], "");
    assert!(ok, "{out}{err}");
    let bytes = std::fs::read(&backup).unwrap();

    let truncated = dir.path().join("truncated.snap");
    std::fs::write(&truncated, &bytes[..bytes.len() - 5]).unwrap();
    let log = refused(&dir.path().join("a"), &truncated);
    assert!(log.contains("cannot restore") && log.contains("not the length of a sealed backup"), "{log}");

    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let corrupt = dir.path().join("corrupt.snap");
    std::fs::write(&corrupt, &flipped).unwrap();
    let log = refused(&dir.path().join("b"), &corrupt);
    assert!(log.contains("SHA-256 mismatch"), "{log}");

    let foreign = dir.path().join("foreign.snap");
    std::fs::write(&foreign, b"SQLite format 3\0 and more").unwrap();
    let log = refused(&dir.path().join("c"), &foreign);
    assert!(log.contains("not the length of a sealed backup"), "{log}");
    // Sealed, but not a Capstan snapshot inside.
    let sealed_foreign = dir.path().join("sealed-foreign.snap");
    std::fs::write(&sealed_foreign, b"SQLite format 3\0 and more").unwrap();
    capstan_store::seal_backup(&sealed_foreign).unwrap();
    let log = refused(&dir.path().join("e"), &sealed_foreign);
    assert!(log.contains("not a Capstan snapshot"), "{log}");

    let log = refused(&dir.path().join("d"), &dir.path().join("missing.snap"));
    assert!(log.contains("cannot restore"), "{log}");

    // A data directory that already holds a member is never overwritten.
    let mut cluster = cluster;
    cluster.planes[0].kill();
    let log = refused(&cluster.planes[0].data_dir, &backup);
    assert!(log.contains("--restore needs a new data directory"), "{log}");
}
