//! TLS on a real plane's client port, checked with Debian's etcdctl and `capstan ctl`:
//! with `--client-cert-auth`, a client with a certificate from the cluster's CA is served
//! (the plane's own scheduler and an agent too); one without a certificate, with one from another CA,
//! or speaking plain HTTP/2 is refused, and a client refuses a plane it does not trust. With
//! auth on, the certificate's CN is the user.

mod common;

use std::path::{Path, PathBuf};

use common::{ctl, etcdctl, AgentProcess, PlaneProcess};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA, and certificates it signs, written as PEM files into a directory.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).unwrap();
        Ca { cert, key, dir: dir.to_path_buf() }
    }

    fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// Signs a certificate for `names` (host names or IPs) with common name `cn`; returns
    /// the certificate and key files.
    fn sign(&self, file: &str, cn: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_file, key_file) = (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}-key.pem")));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

fn path(file: &Path) -> &str {
    file.to_str().unwrap()
}

#[test]
fn mutual_tls_serves_the_clusters_clients_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let (server_cert, server_key) = ca.sign("server", "plane", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = ca.sign("client", "root", &[]);
    let other = Ca::new(dir.path(), "other");
    let (foreign_cert, foreign_key) = other.sign("foreign", "root", &[]);
    let ca_file = ca.ca_file("cluster");

    let mut plane = PlaneProcess::start(
        &dir.path().join("plane"),
        &[
            "--cert-file",
            path(&server_cert),
            "--key-file",
            path(&server_key),
            "--trusted-ca-file",
            path(&ca_file),
            "--client-cert-auth",
            "--scheduler",
        ],
    );
    // As etcdctl users give it: host:port (TLS follows from the certificate flags).
    let endpoint = plane.client_addr.to_string();
    let tls = ["--cacert", path(&ca_file), "--cert", path(&client_cert), "--key", path(&client_key)];

    let (ok, out, err) = ctl(&endpoint, &[&tls[..], &["put", "secure", "yes"]].concat(), "");
    assert!(ok, "{out}{err}");
    let (ok, out) = etcdctl(&[&["--endpoints", &endpoint][..], &tls, &["put", "secure", "yes"]].concat());
    assert!(ok, "{out}");
    let (ok, out) =
        etcdctl(&[&["--endpoints", &endpoint][..], &tls, &["get", "secure", "--print-value-only"]].concat());
    assert!(ok && out.trim() == "yes", "{out}");
    let (ok, out, err) = ctl(&endpoint, &[&tls[..], &["get", "secure"]].concat(), "");
    assert!(ok && out.contains("yes"), "{out}{err}");
    // The plane's own scheduler reaches it over TLS too, with the plane's certificate.
    let elected = || {
        let (_, out, _) = ctl(&endpoint, &[&tls[..], &["get", capstan_scheduler::LEADER_KEY]].concat(), "");
        out.contains("test-plane")
    };
    let deadline = std::time::Instant::now() + common::CONVERGE_TIMEOUT;
    while !elected() {
        assert!(std::time::Instant::now() < deadline, "the scheduler never led over TLS");
        // Polling: the election is visible only in the store.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // An agent registers its node over TLS with the same flags.
    let _agent = AgentProcess::start("tls-node", &endpoint, &dir.path().join("agent"), &tls);
    let (ok, out, err) = ctl(&endpoint, &[&tls[..], &["get", "nodes"]].concat(), "");
    assert!(ok && out.contains("tls-node"), "{out}{err}");

    // So does `capstan bench`.
    let bench = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(["bench", "--endpoints", &endpoint, "--json", "--duration-secs", "1", "--warmup-secs", "0"])
        .args(tls)
        .arg("put")
        .output()
        .unwrap();
    assert!(bench.status.success(), "bench over TLS: {}", String::from_utf8_lossy(&bench.stderr));
    let result: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert!(result["requests"].as_u64().unwrap() > 0 && result["errors"] == 0, "{result}");

    // No client certificate, another CA's, or no TLS at all: refused.
    let (ok, out) = etcdctl(&["--endpoints", &endpoint, "--cacert", path(&ca_file), "get", "secure"]);
    assert!(!ok, "served without a client certificate: {out}");
    let foreign = ["--cacert", path(&ca_file), "--cert", path(&foreign_cert), "--key", path(&foreign_key)];
    let (ok, out) = etcdctl(&[&["--endpoints", &endpoint][..], &foreign, &["get", "secure"]].concat());
    assert!(!ok, "served another CA's client: {out}");
    let (ok, out, err) = ctl(&endpoint, &["get", "secure"], "");
    assert!(!ok, "served plain HTTP/2: {out}{err}");
    // Each refused handshake is an audit line with the reason.
    plane.wait_for_logs(&["TLS handshake refused", "peer sent no certificates", "UnknownIssuer"]);
    // A client that does not trust the plane's CA refuses it.
    let other_ca = other.ca_file("other");
    let (ok, out, err) = ctl(&endpoint, &["--cacert", path(&other_ca), "get", "secure"], "");
    assert!(!ok, "trusted a plane it should not: {out}{err}");

    // With auth on, a certificate's CN is the user: CN root administers without a
    // password; a certificate of the same CA whose CN is no user is refused.
    let as_root = |args: &[&str]| etcdctl(&[&["--endpoints", &endpoint][..], &tls, args].concat());
    for args in [&["user", "add", "root:rootpw"][..], &["user", "grant-role", "root", "root"], &["auth", "enable"]] {
        let (ok, out) = as_root(args);
        assert!(ok, "{args:?}: {out}");
    }
    let (ok, out) = as_root(&["put", "secure", "as-root"]);
    assert!(ok, "CN root refused: {out}");
    let (guest_cert, guest_key) = ca.sign("guest", "guest", &[]);
    let guest = ["--cacert", path(&ca_file), "--cert", path(&guest_cert), "--key", path(&guest_key)];
    let (ok, out) = etcdctl(&[&["--endpoints", &endpoint][..], &guest, &["get", "secure"]].concat());
    assert!(!ok && out.contains("permission denied"), "CN guest served: {out}");
}

#[test]
fn unusable_tls_flags_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let (cert, _) = ca.sign("server", "plane", &["127.0.0.1"]);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    for (args, expected) in [
        (vec!["--cert-file", path(&cert)], "--cert-file and --key-file go together"),
        (vec!["--cert-file", path(&cert), "--key-file", path(&garbage)], "garbage.pem: not a PEM private key"),
        (
            vec!["--cert-file", path(&cert), "--key-file", path(&garbage), "--client-cert-auth"],
            "--client-cert-auth needs --trusted-ca-file",
        ),
        (vec!["--cert-file", path(&cert), "--key-file", "/nonexistent/key.pem"], "cannot read /nonexistent/key.pem"),
        (vec!["--peer-cert-file", path(&cert)], "--peer-cert-file and --peer-key-file go together"),
        (vec!["--initial-cluster", "p=https://127.0.0.1:1"], "needs --peer-cert-file"),
        (
            vec![
                "--peer-cert-file",
                path(&cert),
                "--peer-key-file",
                path(&garbage),
                "--initial-cluster",
                "p=http://127.0.0.1:1",
            ],
            "is not https://",
        ),
    ] {
        let plane = PlaneProcess::spawn(&dir.path().join("p"), common::free_addr(), common::free_addr(), &args);
        let (status, log) = plane.wait_for_exit();
        assert!(!status.success() && log.contains(expected), "{args:?}: {log}");
    }
}

/// Three planes whose peer URLs are https:// and who ask each other for certificates
/// (`--peer-client-cert-auth`): they elect, replicate and fail over as usual, and a peer
/// without a certificate of their CA gets nothing out of the peer port.
#[tokio::test(flavor = "multi_thread")]
async fn planes_speak_mutual_tls_to_each_other_and_refuse_other_peers() {
    use capstan_proto::raftpb::{raft_peer_client::RaftPeerClient, VoteRequest};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "peers");
    let (cert, key) = ca.sign("peer", "plane", &["127.0.0.1"]);
    let ca_file = ca.ca_file("peers");
    let addrs: Vec<_> = (0..3).map(|_| (common::free_addr(), common::free_addr())).collect();
    let initial: Vec<String> = addrs.iter().enumerate().map(|(i, (_, peer))| format!("p{i}=https://{peer}")).collect();
    let initial = initial.join(",");
    let args = [
        "--initial-cluster",
        &initial,
        "--peer-cert-file",
        path(&cert),
        "--peer-key-file",
        path(&key),
        "--peer-trusted-ca-file",
        path(&ca_file),
        "--peer-client-cert-auth",
    ];
    let mut planes: Vec<PlaneProcess> = addrs
        .iter()
        .enumerate()
        .map(|(i, (client, peer))| {
            PlaneProcess::spawn_named(&format!("p{i}"), &dir.path().join(format!("p{i}")), *client, *peer, &args)
        })
        .collect();
    for plane in &mut planes {
        plane.wait_until_ready();
    }
    let endpoints: Vec<String> = planes.iter().map(|plane| plane.client_addr.to_string()).collect();
    let (ok, out) = etcdctl(&["--endpoints", &endpoints[0], "put", "over", "tls"]);
    assert!(ok, "{out}");
    // A linearizable read on another plane goes through the leader over TLS.
    let (ok, out) = etcdctl(&["--endpoints", &endpoints[2], "get", "over", "--print-value-only"]);
    assert!(ok && out.trim() == "tls", "{out}");

    // Kill the leader: the others elect over TLS and keep serving.
    let client = etcd_client::Client::connect([format!("http://{}", endpoints[0])], None).await.unwrap();
    let leader = client.clone().status().await.unwrap().leader();
    let mut leader_index = None;
    for (index, endpoint) in endpoints.iter().enumerate() {
        let mut one = etcd_client::Client::connect([format!("http://{endpoint}")], None).await.unwrap();
        if one.status().await.unwrap().header().unwrap().member_id() == leader {
            leader_index = Some(index);
        }
    }
    let leader_index = leader_index.expect("a plane leads");
    planes[leader_index].kill();
    let survivor = &endpoints[(leader_index + 1) % 3];
    let (ok, out) = etcdctl(&["--endpoints", survivor, "put", "after", "failover"]);
    assert!(ok, "{out}");
    planes[leader_index].restart();
    planes[leader_index].wait_for_logs(&["plane serving"]);
    let (ok, out) = etcdctl(&["--endpoints", &endpoints[leader_index], "get", "after", "--print-value-only"]);
    assert!(ok && out.trim() == "failover", "the restarted plane caught up over TLS: {out}");

    // Strangers on the peer port: plain HTTP/2, TLS without a client certificate, and a
    // certificate from another CA all fail before any Raft message is read, while a
    // holder of the cluster's certificate reaches the Raft service (which refuses a vote
    // of another cluster: the sign that the message was read).
    let peer = addrs[0].1;
    let vote = || VoteRequest { cluster_id: 0, ..Default::default() };
    let read_by_raft = |outcome: &Result<_, tonic::Status>| {
        outcome.as_ref().err().is_some_and(|status| status.message().contains("cluster ID mismatch"))
    };
    let trusting = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&ca_file).unwrap()));
    let member =
        trusting.clone().identity(Identity::from_pem(std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()));
    let channel = Endpoint::from_shared(format!("https://{peer}")).unwrap().tls_config(member).unwrap();
    let answered = RaftPeerClient::new(channel.connect().await.unwrap()).vote(vote()).await;
    assert!(read_by_raft(&answered), "a member's certificate did not reach Raft: {answered:?}");
    let plain = Endpoint::from_shared(format!("http://{peer}")).unwrap().connect().await;
    if let Ok(channel) = plain {
        let outcome = RaftPeerClient::new(channel).vote(vote()).await;
        assert!(outcome.is_err() && !read_by_raft(&outcome), "served plain HTTP/2: {outcome:?}");
    }
    let other = Ca::new(dir.path(), "other");
    let (foreign_cert, foreign_key) = other.sign("foreign", "plane", &[]);
    let foreign = trusting
        .clone()
        .identity(Identity::from_pem(std::fs::read(&foreign_cert).unwrap(), std::fs::read(&foreign_key).unwrap()));
    for tls in [trusting, foreign] {
        let endpoint = Endpoint::from_shared(format!("https://{peer}")).unwrap().tls_config(tls).unwrap();
        if let Ok(channel) = endpoint.connect().await {
            let outcome = RaftPeerClient::new(channel).vote(vote()).await;
            assert!(
                outcome.is_err() && !read_by_raft(&outcome),
                "served a peer without a certificate of the cluster's CA: {outcome:?}"
            );
        }
    }
    planes[0].wait_for_logs(&["TLS handshake refused", "listener=\"peer\""]);
}
