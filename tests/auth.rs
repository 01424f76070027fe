//! Authentication and RBAC on a real 3-plane cluster, set up the way operators do it, with
//! Debian's etcdctl (`user add`, `role grant-permission`, `auth enable`, `--user`), and
//! checked through etcdctl and an etcd client library: a user with read on `/a/` reads
//! `/a/` and nothing else, writes nothing (not through a txn either), watches `/a/` but not
//! `/b/`; refusals name no key and leave an audit line; and all of it holds after the leader
//! is killed.

mod common;

use std::time::Duration;

use common::{leader_index, Cluster};
use etcd_client::{Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, WatchOptions};

/// etcdctl against `endpoints`.
fn etcdctl(endpoints: &str, args: &[&str]) -> (bool, String) {
    common::etcdctl(&[&["--endpoints", endpoints][..], args].concat())
}

fn ok(endpoints: &str, args: &[&str]) -> String {
    let (ok, out) = etcdctl(endpoints, args);
    assert!(ok, "etcdctl {args:?}: {out}");
    out
}

/// etcdctl refuses with `expected`, and says nothing of the keys involved.
fn refused(endpoints: &str, args: &[&str], expected: &str) {
    let (ok, out) = etcdctl(endpoints, args);
    assert!(!ok && out.contains(expected), "etcdctl {args:?} was not refused with {expected:?}: {out}");
    assert!(!out.contains("/b/") && !out.contains("/a/"), "a refusal named a key: {out}");
}

async fn client_as(endpoints: Vec<String>, user: &str, password: &str) -> etcd_client::Client {
    let options = ConnectOptions::new()
        .with_user(user, password)
        .with_auto_token_refresh(true)
        .with_timeout(Duration::from_secs(10));
    etcd_client::Client::connect(endpoints, Some(options)).await.expect("connect and authenticate")
}

fn is_denied(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::PermissionDenied && status.message() == "etcdserver: permission denied")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_of_a_prefix_reads_it_and_nothing_else_across_a_failover() {
    let mut cluster = Cluster::start_with(3, &["--bcrypt-cost", "4"]);
    let all = cluster.endpoints().join(",");
    let first = cluster.planes[0].endpoint();
    for args in [
        &["put", "/a/x", "1"][..],
        &["put", "/b/y", "2"],
        &["user", "add", "root:rootpw"],
        &["role", "add", "a-reader"],
        &["role", "grant-permission", "a-reader", "read", "/a/", "--prefix"],
        &["user", "add", "alice:alicepw"],
        &["user", "grant-role", "alice", "a-reader"],
        // etcdctl grants root the root role itself when the cluster asks for it.
        &["auth", "enable"],
    ] {
        ok(&all, args);
    }
    let (_, status) = etcdctl(&all, &["--user", "root:rootpw", "auth", "status"]);
    assert!(status.contains("true"), "{status}");

    // With etcdctl: reads of /a/ only; no writes; no anonymous or wrong-password calls.
    let alice = ["--user", "alice:alicepw"];
    let out = ok(&first, &[&alice[..], &["get", "/a/x", "--print-value-only"]].concat());
    assert_eq!(out.trim(), "1");
    ok(&first, &[&alice[..], &["get", "/a/", "--prefix"]].concat());
    refused(&first, &[&alice[..], &["get", "/b/y"]].concat(), "permission denied");
    refused(&first, &[&alice[..], &["get", "/", "--prefix"]].concat(), "permission denied");
    refused(&first, &[&alice[..], &["put", "/a/x", "2"]].concat(), "permission denied");
    refused(&first, &[&alice[..], &["del", "/a/x"]].concat(), "permission denied");
    refused(&first, &["get", "/a/x"], "user name is empty");
    refused(&first, &["--user", "alice:wrong", "get", "/a/x"], "authentication failed");
    refused(&first, &[&alice[..], &["user", "list"]].concat(), "permission denied");
    refused(&first, &[&alice[..], &["auth", "disable"]].concat(), "permission denied");
    refused(&first, &[&alice[..], &["snapshot", "save", "/dev/null"]].concat(), "permission denied");
    // Each refusal is an audit line in the log of the plane that refused it.
    cluster.planes[0].wait_for_logs(&["audit", "refused", "user=alice", "wrong user or password"]);

    // With a client library: txns are checked whole, watches by their range.
    let mut reader = client_as(cluster.endpoints(), "alice", "alicepw").await;
    let mut root = client_as(cluster.endpoints(), "root", "rootpw").await;
    let read_a =
        Txn::new().when([Compare::version("/a/x", CompareOp::Greater, 0)]).and_then([TxnOp::get("/a/x", None)]);
    let txn = reader.txn(read_a).await.expect("a txn reading /a/");
    assert!(txn.succeeded());
    let compare_b =
        Txn::new().when([Compare::version("/b/y", CompareOp::Greater, 0)]).and_then([TxnOp::get("/a/x", None)]);
    assert!(is_denied(&reader.txn(compare_b).await.unwrap_err()), "a compare on /b/");
    let write_in_else = Txn::new()
        .when([Compare::version("/a/x", CompareOp::Greater, 0)])
        .and_then([TxnOp::get("/a/x", None)])
        .or_else([TxnOp::put("/a/x", "3", None)]);
    assert!(is_denied(&reader.txn(write_in_else).await.unwrap_err()), "a put in the branch not taken");
    let nested = Txn::new().and_then([TxnOp::txn(Txn::new().and_then([TxnOp::get("/b/y", None)]))]);
    assert!(is_denied(&reader.txn(nested).await.unwrap_err()), "a read of /b/ in a nested txn");

    let mut denied = reader.watch("/b/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let refusal = denied.message().await.unwrap().expect("a watch response");
    assert!(refusal.canceled() && refusal.cancel_reason().contains("permission denied"), "{refusal:?}");
    let mut watching = reader.watch("/a/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let created = watching.message().await.unwrap().expect("a watch response");
    assert!(created.created() && !created.canceled(), "{created:?}");
    root.put("/a/w", "watched", None).await.unwrap();
    let event = watching.message().await.unwrap().expect("the event");
    assert_eq!(event.events()[0].kv().unwrap().key(), b"/a/w");

    // A lease holding a key alice may not write is not hers to revoke.
    let lease = root.lease_grant(60, None).await.unwrap().id();
    root.put("/b/leased", "x", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    assert!(is_denied(&reader.lease_revoke(lease).await.unwrap_err()));
    reader.lease_grant(60, None).await.expect("any user may grant a lease");

    // Kill the leader: tokens are the cluster's, not a plane's, so both clients carry on
    // through the survivors, and auth still holds.
    let leader = leader_index(&cluster).await;
    cluster.planes[leader].kill();
    // Tell the clients, as an application that watches the membership would; they keep
    // the tokens they hold.
    let dead = cluster.planes[leader].endpoint();
    reader.remove_endpoint(&dead).await.unwrap();
    root.remove_endpoint(&dead).await.unwrap();
    let survivors: Vec<String> =
        (0..3).filter(|index| *index != leader).map(|index| cluster.planes[index].endpoint()).collect();
    let survivor = survivors[0].clone();
    // A request the client had already bound to the removed endpoint is cancelled in the
    // client, never reaching a plane; an application retries it, as this does.
    let mut attempts = 0;
    let value = loop {
        match reader.get("/a/x", None).await {
            Err(etcd_client::Error::GRpcStatus(status)) if status.code() == tonic::Code::Cancelled && attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            read => break read.expect("alice reads after the failover"),
        }
    };
    assert_eq!(value.kvs()[0].value(), b"1");
    assert!(is_denied(&reader.put("/a/x", "4", None).await.unwrap_err()));
    root.put("/a/after", "failover", None).await.expect("root writes after the failover");
    refused(&survivor, &[&alice[..], &["put", "/a/x", "5"]].concat(), "permission denied");
    ok(&survivor, &[&alice[..], &["get", "/a/after"]].concat());

    // Revoking the permission takes effect at once, for a token issued before.
    ok(&survivor, &["--user", "root:rootpw", "role", "revoke-permission", "a-reader", "/a/", "--prefix"]);
    assert!(is_denied(&reader.get("/a/x", None).await.unwrap_err()));

    // The killed plane comes back with the users, roles and auth of the cluster.
    cluster.planes[leader].restart();
    cluster.planes[leader].wait_until_ready();
    let back = cluster.planes[leader].endpoint();
    refused(&back, &["get", "/a/x"], "user name is empty");
    refused(&back, &[&alice[..], &["get", "/a/x"]].concat(), "permission denied");
    let roles = ok(&back, &["--user", "root:rootpw", "user", "get", "alice"]);
    assert!(roles.contains("a-reader"), "{roles}");

    // A changed password ends the tokens issued under the old one: the client's attempt to
    // authenticate again with the old password fails.
    root.user_change_password("alice", "newpw").await.unwrap();
    let error = reader.get("/a/x", None).await.unwrap_err();
    assert!(!is_denied(&error) && error.to_string().contains("auth"), "{error:?}");
    refused(&survivor, &[&alice[..], &["get", "/a/x"]].concat(), "authentication failed");
}

/// The `etcdctl` lines of the README's least-privilege block, so that the documented roles
/// are the tested ones.
fn documented_role_commands() -> Vec<Vec<String>> {
    let readme = include_str!("../README.md");
    let start = readme.find("Least-privilege roles").expect("the README documents least-privilege roles");
    let block = readme[start..].split("```").nth(1).expect("a code block follows");
    block
        .lines()
        .filter_map(|line| line.strip_prefix("etcdctl "))
        .map(|line| line.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The README's least-privilege roles are enough for the plane's own scheduler and an agent
/// (users `scheduler` and `node-n1`) to place and run pods, and keep them inside their keys.
/// The scheduler starts before auth is on and reconnects as its user when it is turned on;
/// tokens last 2 s, so placing the second pod needs both to authenticate again.
#[tokio::test(flavor = "multi_thread")]
async fn the_documented_least_privilege_roles_run_a_pod() {
    let dir = tempfile::tempdir().unwrap();
    let plane_args =
        ["--bcrypt-cost", "4", "--auth-token-ttl", "2", "--scheduler", "--scheduler-user", "scheduler:schedulerpw"];
    let mut plane = common::PlaneProcess::start(&dir.path().join("plane"), &plane_args);
    let endpoint = plane.client_addr.to_string();
    let commands = documented_role_commands();
    assert!(commands.len() >= 5, "{commands:?}");
    for command in &commands {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        ok(&endpoint, &args);
    }
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "add", "scheduler:schedulerpw"],
        &["user", "grant-role", "scheduler", "scheduler"],
        &["user", "add", "node-n1:nodepw"],
        &["user", "grant-role", "node-n1", "node-n1"],
        &["auth", "enable"],
    ] {
        ok(&endpoint, args);
    }
    plane.wait_for_logs(&["auth changed; the in-plane scheduler reconnects"]);
    let _agent = common::AgentProcess::start("n1", &endpoint, &dir.path().join("agent"), &["--user", "node-n1:nodepw"]);
    let root = client_as(vec![format!("http://{endpoint}")], "root", "rootpw").await;
    let objects = capstan_client::Objects::new(root);
    // A client that never authenticates again, to see its token expire.
    let options = ConnectOptions::new().with_user("root", "rootpw");
    let mut stale = etcd_client::Client::connect([format!("http://{endpoint}")], Some(options)).await.unwrap();
    stale.get("/registry/", None).await.expect("a fresh token is honoured");
    for name in ["p1", "p2"] {
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers: [{{name: c, command: [sleep, '600']}}]\n"
        );
        let (applied, out, err) = common::ctl(&endpoint, &["--user", "root:rootpw", "apply", "-f", "-"], &pod);
        assert!(applied, "{out}{err}");
        common::wait_for(&objects, &format!("pod {name} running on n1"), |listed| {
            common::pods(listed).iter().any(|pod| {
                pod.metadata.name == name
                    && pod.spec.node_name == "n1"
                    && pod.status.phase == capstan_proto::objects::PodPhase::Running
            })
        })
        .await;
        // Past the TTL of every token issued so far: the next pod needs fresh ones.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    match stale.get("/registry/", None).await {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            assert_eq!(status.message(), "etcdserver: invalid auth token");
        }
        other => panic!("an expired token was not refused: {other:?}"),
    }
    // Each stays inside its keys.
    refused(&endpoint, &["--user", "node-n1:nodepw", "put", "/registry/nodes/n2", "{}"], "permission denied");
    refused(&endpoint, &["--user", "scheduler:schedulerpw", "put", "/other", "x"], "permission denied");
}
