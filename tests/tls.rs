//! TLS on a real plane's client port, checked with Debian's etcdctl and `capstan ctl`:
//! with `--client-cert-auth`, a client with a certificate from the cluster's CA is served
//! (the plane's own scheduler and an agent too); one without a certificate, with one from another CA,
//! or speaking plain HTTP/2 is refused, and a client refuses a plane it does not trust. With
//! auth on, the certificate's CN is the user.

mod common;

use std::path::{Path, PathBuf};

use common::{ctl, AgentProcess, PlaneProcess};
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

/// Runs etcdctl 3.4 with `args`; whether it succeeded, and what it printed.
fn etcdctl(args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--dial-timeout", "3s", "--command-timeout", "5s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
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

    let plane = PlaneProcess::start(
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

    // No client certificate, another CA's, or no TLS at all: refused.
    let (ok, out) = etcdctl(&["--endpoints", &endpoint, "--cacert", path(&ca_file), "get", "secure"]);
    assert!(!ok, "served without a client certificate: {out}");
    let foreign = ["--cacert", path(&ca_file), "--cert", path(&foreign_cert), "--key", path(&foreign_key)];
    let (ok, out) = etcdctl(&[&["--endpoints", &endpoint][..], &foreign, &["get", "secure"]].concat());
    assert!(!ok, "served another CA's client: {out}");
    let (ok, out, err) = ctl(&endpoint, &["get", "secure"], "");
    assert!(!ok, "served plain HTTP/2: {out}{err}");
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
        (vec!["--cert-file", path(&cert), "--key-file", path(&garbage)], "not usable"),
        (
            vec!["--cert-file", path(&cert), "--key-file", path(&garbage), "--client-cert-auth"],
            "--client-cert-auth needs --trusted-ca-file",
        ),
        (vec!["--cert-file", path(&cert), "--key-file", "/nonexistent/key.pem"], "cannot read /nonexistent/key.pem"),
    ] {
        let plane = PlaneProcess::spawn(&dir.path().join("p"), common::free_addr(), common::free_addr(), &args);
        let (status, log) = plane.wait_for_exit();
        assert!(!status.success() && log.contains(expected), "{args:?}: {log}");
    }
}
