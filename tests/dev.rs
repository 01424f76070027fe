//! `capstan dev --tls`: the local cluster comes up with mutual TLS on every listener, and the
//! etcdctl command it prints once it serves (with its flags) reaches it at once, while a client without the
//! certificate is refused; a data directory made with TLS is not started without it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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
    // The planes' and agents' logs (dev's stderr, which they share) go to a file, shown
    // when the test fails.
    let log_path = dir.path().join("dev.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(dev_args(true))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let dev = common::Dev(child);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // dev prints its hints once the cluster serves. The reader gives up at the first of
    // them: dev's stdout is then closed, which must not stop it.
    let (lines, hints) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let put = BufReader::new(stdout).lines().map_while(Result::ok).find(|line| line.contains("put hello world"));
        let _ = lines.send(put);
    });
    let put_line = match hints.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Some(line)) => line,
        outcome => panic!("capstan dev printed no etcdctl command ({outcome:?}); its log:\n{}", log()),
    };
    let printed: Vec<&str> = put_line.split_whitespace().skip(1).collect();
    assert!(printed.contains(&"--cacert") && printed.contains(&"--cert"), "{put_line}");
    let (ok, out) = common::etcdctl(&printed);
    assert!(ok, "the printed command failed: {out}\nthe cluster's log:\n{}", log());
    let get: Vec<&str> = printed.iter().copied().take_while(|arg| *arg != "put").chain(["get", "hello"]).collect();
    let (ok, out) = common::etcdctl(&get);
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
