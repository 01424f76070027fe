//! Debian's real `etcdctl` (v3.4) against a real `capstan plane` process: everything it
//! does here it must do as it does against etcd, output and error messages included.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};

use common::{Cluster, PlaneProcess};

struct Ctl<'a> {
    plane: &'a PlaneProcess,
}

impl Ctl<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("etcdctl");
        // host:port without a scheme: etcdctl 3.4 sends an `http://...` endpoint verbatim as
        // the HTTP/2 :authority of its per-endpoint calls (endpoint status, defrag), which
        // Capstan's HTTP/2 stack rejects; see README, "Differences from etcd".
        command.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.plane.client_addr)).args(args);
        command
    }

    fn run_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl must be installed (Debian package etcd-client)");
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
        child.wait_with_output().expect("etcdctl output")
    }

    /// Runs etcdctl, asserts it succeeded, returns its standard output.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_with_input(args, b"")
    }

    fn ok_with_input(&self, args: &[&str], input: &[u8]) -> String {
        let output = self.run_with_input(args, input);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "etcdctl {args:?} failed: {}{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Runs etcdctl, asserts it failed, returns its standard error.
    fn fails(&self, args: &[&str], input: &[u8]) -> String {
        let output = self.run_with_input(args, input);
        assert!(
            !output.status.success(),
            "etcdctl {args:?} should have failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// The header revision of a `-w json` response.
    fn revision_of(&self, args: &[&str]) -> i64 {
        let mut args = args.to_vec();
        args.extend(["-w", "json"]);
        let json: serde_json::Value = serde_json::from_str(&self.ok(&args)).expect("json output");
        json["header"]["revision"].as_i64().expect("header.revision")
    }
}

fn plane() -> (tempfile::TempDir, PlaneProcess) {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    (dir, plane)
}

#[test]
fn put_get_ranges_and_delete_work_as_with_etcd() {
    let (_dir, plane) = plane();
    put_get_ranges_and_delete_work_as_with_etcd_on(&Ctl { plane: &plane });
}

fn put_get_ranges_and_delete_work_as_with_etcd_on(ctl: &Ctl) {
    assert_eq!(ctl.ok(&["put", "foo", "bar"]), "OK\n");
    assert_eq!(ctl.ok(&["get", "foo"]), "foo\nbar\n");
    ctl.ok(&["put", "foo2", "b2"]);
    ctl.ok(&["put", "foo3", "b3"]);
    ctl.ok(&["put", "zed", "z"]);
    assert_eq!(ctl.ok(&["get", "foo", "--prefix"]), "foo\nbar\nfoo2\nb2\nfoo3\nb3\n");
    assert_eq!(ctl.ok(&["get", "foo", "foo3"]), "foo\nbar\nfoo2\nb2\n");
    assert_eq!(ctl.ok(&["get", "foo3", "--from-key", "--keys-only"]), "foo3\n\nzed\n\n");
    assert_eq!(
        ctl.ok(&["get", "foo", "--prefix", "--order=DESCEND", "--sort-by=KEY", "--keys-only"]),
        "foo3\n\nfoo2\n\nfoo\n\n"
    );
    assert_eq!(ctl.ok(&["get", "foo", "--prefix", "--consistency=s", "--print-value-only"]), "bar\nb2\nb3\n");

    let json: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["get", "foo", "--prefix", "--limit=1", "-w", "json"])).unwrap();
    assert_eq!(json["count"], 3);
    assert_eq!(json["more"], true);
    assert_eq!(json["kvs"].as_array().unwrap().len(), 1);
    assert_eq!(json["kvs"][0]["key"], "Zm9v", "base64 of foo");
    assert_eq!(json["kvs"][0]["version"], 1);
    let everything: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["get", "", "--from-key", "--keys-only", "-w", "json"])).unwrap();
    assert_eq!(everything["count"], 4);
    assert_eq!(everything["kvs"][3]["key"], "emVk", "base64 of zed");
    assert!(everything["kvs"][3].get("value").is_none(), "keys only");

    assert_eq!(ctl.ok(&["put", "foo", "baz", "--prev-kv"]), "OK\nfoo\nbar\n");
    assert_eq!(ctl.ok(&["del", "foo", "--prefix"]), "3\n");
    assert_eq!(ctl.ok(&["get", "foo", "--prefix"]), "");
    assert_eq!(ctl.ok(&["del", "nothing-here"]), "0\n");
}

#[test]
fn old_revisions_compaction_and_their_errors() {
    let (_dir, plane) = plane();
    let ctl = Ctl { plane: &plane };
    let first = ctl.revision_of(&["put", "k", "v1"]);
    assert_eq!(first, 2, "a new store's first write is revision 2, as in etcd");
    let second = ctl.revision_of(&["put", "k", "v2"]);
    ctl.ok(&["put", "k", "v3"]);
    assert_eq!(ctl.ok(&["get", "k", &format!("--rev={first}")]), "k\nv1\n");
    assert_eq!(ctl.ok(&["get", "k", &format!("--rev={second}")]), "k\nv2\n");
    let future = ctl.fails(&["get", "k", "--rev=1000"], b"");
    assert!(future.contains("etcdserver: mvcc: required revision is a future revision"), "{future}");

    assert!(ctl.ok(&["compact", &second.to_string()]).contains(&format!("compacted revision {second}")));
    let compacted = ctl.fails(&["get", "k", &format!("--rev={first}")], b"");
    assert!(compacted.contains("etcdserver: mvcc: required revision has been compacted"), "{compacted}");
    assert_eq!(ctl.ok(&["get", "k", &format!("--rev={second}")]), "k\nv2\n");
    assert_eq!(ctl.ok(&["get", "k"]), "k\nv3\n");
    let again = ctl.fails(&["compact", &first.to_string()], b"");
    assert!(again.contains("required revision has been compacted"), "{again}");
}

#[test]
fn txn_compares_and_branches() {
    let (_dir, plane) = plane();
    txn_compares_and_branches_on(&Ctl { plane: &plane });
}

fn txn_compares_and_branches_on(ctl: &Ctl) {
    ctl.ok(&["put", "user", "alice"]);
    let success = "value(\"user\") = \"alice\"\n\nput user bob\nget user\n\nput user carol\n\n";
    assert_eq!(ctl.ok_with_input(&["txn"], success.as_bytes()), "SUCCESS\n\nOK\n\nuser\nbob\n");
    let failure = "value(\"user\") = \"alice\"\n\nput user dave\n\nget user\n\n";
    assert_eq!(ctl.ok_with_input(&["txn"], failure.as_bytes()), "FAILURE\n\nuser\nbob\n");
    let version = "version(\"user\") = \"2\"\nmod(\"user\") > \"0\"\ncreate(\"absent\") = \"0\"\n\ndel user\n\n\n";
    assert_eq!(ctl.ok_with_input(&["txn"], version.as_bytes()), "SUCCESS\n\n1\n");

    let mut many = String::from("\n");
    for index in 0..129 {
        many.push_str(&format!("put key{index} v\n"));
    }
    many.push_str("\n\n");
    let too_many = ctl.fails(&["txn"], many.as_bytes());
    assert!(too_many.contains("etcdserver: too many operations in txn request"), "{too_many}");
    let duplicate = ctl.fails(&["txn"], b"\nput a 1\nput a 2\n\n\n");
    assert!(duplicate.contains("etcdserver: duplicate key given in txn request"), "{duplicate}");
}

#[test]
fn watch_replays_history_then_follows_live_writes() {
    let (_dir, plane) = plane();
    watch_replays_history_then_follows_live_writes_on(&Ctl { plane: &plane });
}

fn watch_replays_history_then_follows_live_writes_on(ctl: &Ctl) {
    let start = ctl.revision_of(&["put", "w/1", "a"]);
    ctl.ok(&["put", "w/2", "b"]);
    ctl.ok(&["del", "w/1"]);
    ctl.ok(&["put", "other", "x"]);
    let mut watch = ctl
        .command(&["watch", "w/", "--prefix", &format!("--rev={start}"), "--prev-kv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines().map_while(Result::ok);
    let mut next =
        |count: usize| (0..count).map(|_| lines.next().expect("watch output")).collect::<Vec<_>>().join("\n");
    // History: two puts and a delete (with the previous value), not the other key.
    assert_eq!(next(3), "PUT\nw/1\na");
    assert_eq!(next(3), "PUT\nw/2\nb");
    assert_eq!(next(5), "DELETE\nw/1\na\nw/1\n");
    // The watch has caught up (it printed the newest history event); now a live write.
    ctl.ok(&["put", "w/3", "c"]);
    assert_eq!(next(3), "PUT\nw/3\nc");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn leases_grant_attach_keepalive_revoke_and_expire() {
    let (_dir, plane) = plane();
    leases_grant_attach_keepalive_revoke_and_expire_on(&Ctl { plane: &plane });
}

fn leases_grant_attach_keepalive_revoke_and_expire_on(ctl: &Ctl) {
    let granted = ctl.ok(&["lease", "grant", "60"]);
    let id = granted.split_whitespace().nth(1).expect("lease ID").to_string();
    assert_eq!(granted, format!("lease {id} granted with TTL(60s)\n"));
    ctl.ok(&["put", "owned", "v", &format!("--lease={id}")]);
    let ttl = ctl.ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.starts_with(&format!("lease {id} granted with TTL(60s), remaining(")), "{ttl}");
    assert!(ttl.contains("attached keys([owned])"), "{ttl}");
    assert!(ctl.ok(&["lease", "keep-alive", "--once", &id]).contains(&format!("lease {id} keepalived with TTL(60)")));
    assert!(ctl.ok(&["lease", "list"]).contains(&id));
    assert!(ctl.ok(&["lease", "revoke", &id]).contains("revoked"));
    assert_eq!(ctl.ok(&["get", "owned"]), "");
    let unknown = ctl.fails(&["put", "k", "v", &format!("--lease={id}")], b"");
    assert!(unknown.contains("etcdserver: requested lease not found"), "{unknown}");

    // Expiry: a short lease whose key the leader deletes; watch from the put for it.
    let short = ctl.ok(&["lease", "grant", "1"]);
    let short_id = short.split_whitespace().nth(1).unwrap().to_string();
    let put = ctl.revision_of(&["put", "ephemeral", "v", &format!("--lease={short_id}")]);
    let mut watch =
        ctl.command(&["watch", "ephemeral", &format!("--rev={put}")]).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines().map_while(Result::ok);
    assert_eq!(lines.next().as_deref(), Some("PUT"));
    lines.next();
    lines.next();
    assert_eq!(lines.next().as_deref(), Some("DELETE"), "the expired lease's key is deleted");
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(ctl.ok(&["get", "ephemeral"]), "");
    let gone = ctl.fails(&["lease", "timetolive", &short_id], b"");
    assert!(
        gone.contains("requested lease not found")
            || ctl.ok(&["lease", "timetolive", &short_id]).contains("already expired")
    );
}

#[test]
fn bad_requests_get_etcds_errors() {
    let (_dir, plane) = plane();
    let ctl = Ctl { plane: &plane };
    let empty = ctl.fails(&["put", "", "v"], b"");
    assert!(empty.contains("etcdserver: key is not provided"), "{empty}");
    let large = vec![b'x'; 1_600_000];
    let too_large = ctl.fails(&["put", "big"], &large);
    assert!(too_large.contains("etcdserver: request is too large"), "{too_large}");
    // Within the limit is fine.
    ctl.ok_with_input(&["put", "big"], &large[..1_000_000]);
    assert_eq!(ctl.ok(&["get", "big", "--print-value-only"]).len(), 1_000_001);
}

#[test]
fn endpoint_status_and_member_list() {
    let (_dir, plane) = plane();
    let ctl = Ctl { plane: &plane };
    let status = ctl.ok(&["endpoint", "status", "-w", "json"]);
    let json: serde_json::Value = serde_json::from_str(&status).unwrap();
    let status = &json[0]["Status"];
    assert_eq!(status["leader"], status["header"]["member_id"], "a single plane leads");
    assert!(status["raftTerm"].as_u64().unwrap() >= 1);
    assert!(status["raftIndex"].as_u64().unwrap() >= 1);
    let members = ctl.ok(&["member", "list"]);
    assert!(
        members
            .contains(&format!("started, test-plane, http://{}, http://{}, false", plane.peer_addr, plane.client_addr)),
        "{members}"
    );
    // etcdctl 3.4 reports health on standard error.
    let health = ctl.run_with_input(&["endpoint", "health"], b"");
    assert!(health.status.success());
    assert!(String::from_utf8_lossy(&health.stderr).contains("is healthy: successfully committed proposal"));
}

/// A follower serves etcdctl exactly as a single plane does: writes, txns and lease calls
/// go through the leader, reads and watches are its own. It caught a lease granted through a
/// follower never expiring: the deadline was kept by the follower, not the leader.
#[test]
fn a_follower_serves_etcdctl_like_a_leader() {
    let cluster = Cluster::start(3);
    let status = |plane: &PlaneProcess| -> serde_json::Value {
        let json: serde_json::Value =
            serde_json::from_str(&Ctl { plane }.ok(&["endpoint", "status", "-w", "json"])).unwrap();
        json[0]["Status"].clone()
    };
    let follower = cluster
        .planes
        .iter()
        .find(|plane| {
            let status = status(plane);
            status["leader"] != status["header"]["member_id"]
        })
        .expect("a follower");
    let ctl = Ctl { plane: follower };
    put_get_ranges_and_delete_work_as_with_etcd_on(&ctl);
    txn_compares_and_branches_on(&ctl);
    watch_replays_history_then_follows_live_writes_on(&ctl);
    leases_grant_attach_keepalive_revoke_and_expire_on(&ctl);
}
