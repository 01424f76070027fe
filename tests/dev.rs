//! `capstan dev --tls`: the local cluster comes up with mutual TLS on every listener, and the
//! etcdctl command it prints (with its flags) reaches it, while a client without the
//! certificate is refused; a data directory made with TLS is not started without it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// etcdctl with timeouts long enough for the cluster to come up: it retries until then.
fn etcdctl(args: &[&str]) -> (bool, String) {
    common::etcdctl(&[&["--dial-timeout", "60s", "--command-timeout", "60s"][..], args].concat())
}

#[test]
fn dev_with_tls_prints_the_etcdctl_flags_that_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev");
    let ports: Vec<String> = common::free_client_ports(3).iter().map(u16::to_string).collect();
    let dev_args = |tls: bool| {
        let mut args = vec!["dev".to_string(), "--data-dir".into(), data_dir.display().to_string()];
        args.extend(["--client-ports".into(), ports.join(",")]);
        if tls {
            args.push("--tls".into());
        }
        args
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(dev_args(true))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let dev = common::Dev(child);
    let put_line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("etcdctl ") && line.contains("put hello world"))
        .expect("capstan dev prints an etcdctl command");
    let printed: Vec<&str> = put_line.split_whitespace().skip(1).collect();
    assert!(printed.contains(&"--cacert") && printed.contains(&"--cert"), "{put_line}");
    let (ok, out) = etcdctl(&printed);
    assert!(ok, "the printed command failed: {out}");
    let get: Vec<&str> = printed.iter().copied().take_while(|arg| *arg != "put").chain(["get", "hello"]).collect();
    let (ok, out) = etcdctl(&get);
    assert!(ok && out.contains("world"), "{out}");
    // Without a client certificate (the CA alone), the planes refuse.
    let endpoints = printed.iter().find(|arg| arg.starts_with("--endpoints=")).unwrap();
    let ca = printed[printed.iter().position(|arg| *arg == "--cacert").unwrap() + 1];
    let (ok, out) = common::etcdctl(&[endpoints, "--cacert", ca, "get", "hello"]);
    assert!(!ok, "served a client without a certificate: {out}");
    // Stopping dev stops every plane, even though the reader of its stdout is gone (a
    // print to the closed pipe once made it exit and leave its planes running).
    drop(dev);
    for port in &ports {
        let address = format!("127.0.0.1:{port}");
        assert!(std::net::TcpStream::connect(&address).is_err(), "a plane still listens on {address}");
    }

    // The data directory now holds a TLS cluster: starting it without --tls is refused.
    let output = Command::new(env!("CARGO_BIN_EXE_capstan")).args(dev_args(false)).output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && said.contains("made with --tls"), "{said}");
}
