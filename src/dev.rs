//! `capstan dev`: a local cluster on 127.0.0.1: 3 planes (each also a scheduler
//! candidate) and 2 node agents, each a supervised child process (restarted with back-off
//! if it dies), data under `--data-dir` so a restart of `capstan dev` keeps it. Client
//! ports follow etcd's local-cluster convention (2379, 22379, 32379); Ctrl-C stops every
//! plane. With `--tls`, clients and peers speak mutual TLS with certificates from a
//! throw-away CA made in `<data-dir>/tls`.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use capstan_client::pki::ThrowawayPki;
use capstan_client::Credentials;
use clap::Args;
use etcd_client::GetOptions;
use tokio::process::{Child, Command};

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the local cluster keeps its data.
    #[arg(long, default_value = ".capstan-dev")]
    pub data_dir: PathBuf,
    /// Client ports of the planes (their peer ports are one higher, their metrics and
    /// health ports two higher, as etcd's 2379/2380/2381).
    #[arg(long, value_delimiter = ',', default_value = "2379,22379,32379")]
    pub client_ports: Vec<u16>,
    /// Mutual TLS for clients and between planes, with a throw-away CA and certificates
    /// made (once) in `<data-dir>/tls`; prints the etcdctl flags to use.
    #[arg(long)]
    pub tls: bool,
}

/// The longest a crashed plane waits before it is started again.
const RESTART_BACKOFF_MS_MAX: u64 = 10_000;
/// Node agents beside the planes, each registering a node of this machine.
const DEV_AGENTS: u16 = 2;
/// Agent i serves logs on this port + i.
const DEV_AGENT_LOG_PORT: u16 = 10249;
/// Agent i serves metrics on this port + i (the kubelet's read-only port is 10255).
const DEV_AGENT_METRICS_PORT: u16 = 10254;
/// Short, so a lost node is noticed in seconds (production: 40 s).
const DEV_NODE_LEASE_TTL_SECS: u64 = 10;
const DEV_RESTART_BACKOFF_MS: u64 = 1_000;
/// The node-lifecycle timings of the local cluster (production defaults: 40 s and 300 s).
const DEV_NODE_MONITOR_GRACE_SECS: u64 = 10;
const DEV_POD_EVICTION_TIMEOUT_SECS: u64 = 20;
/// How long planes and agents get to stop after SIGTERM before they are killed.
const STOP_GRACE_MS: u64 = 5_000;
/// How often, and for how long each time, dev asks whether the cluster serves yet.
const READY_POLL: Duration = Duration::from_millis(500);
/// The key of that question (a count of it, which any value answers).
const READY_PROBE_KEY: &str = "capstan-dev-ready";

struct DevPlane {
    name: String,
    client_port: u16,
    peer_port: u16,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.client_ports.is_empty() || args.client_ports.len().is_multiple_of(2) {
        anyhow::bail!("--client-ports must name an odd number of planes (3 or 5), not {}", args.client_ports.len());
    }
    let planes: Vec<DevPlane> = args
        .client_ports
        .iter()
        .enumerate()
        .map(|(index, &port)| DevPlane { name: format!("dev-{}", index + 1), client_port: port, peer_port: port + 1 })
        .collect();
    let tls_dir = args.data_dir.join("tls");
    let made_before = args.data_dir.join(&planes[0].name).exists();
    if made_before && tls_dir.exists() != args.tls {
        let (was, is) = if args.tls { ("without", "with") } else { ("with", "without") };
        anyhow::bail!(
            "{} holds a cluster made {was} --tls, which cannot be started {is} it; use another --data-dir",
            args.data_dir.display()
        );
    }
    let scheme = if args.tls { "https" } else { "http" };
    let initial_cluster = planes
        .iter()
        .map(|plane| format!("{}={scheme}://127.0.0.1:{}", plane.name, plane.peer_port))
        .collect::<Vec<_>>()
        .join(",");
    let endpoint_list: Vec<String> = planes.iter().map(|plane| format!("127.0.0.1:{}", plane.client_port)).collect();
    let endpoints = endpoint_list.join(",");
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the capstan binary")?;
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    let tls = args.tls.then(|| ThrowawayPki::ensure(&tls_dir, &hosts)).transpose().map_err(anyhow::Error::msg)?;
    let client_flags = tls.as_ref().map(ThrowawayPki::client_flags).unwrap_or_default();
    let plane_flags = tls.as_ref().map(ThrowawayPki::plane_flags).unwrap_or_default();
    let shown_flags: String = client_flags.iter().map(|flag| format!(" {flag}")).collect();

    let mut header = format!(
        "capstan dev: {} planes and {DEV_AGENTS} node agents on 127.0.0.1, data in {}\n",
        planes.len(),
        args.data_dir.display()
    );
    for plane in &planes {
        header += &format!(
            "  {}: clients 127.0.0.1:{}, peers 127.0.0.1:{}, metrics, health and dashboard http://127.0.0.1:{}/\n",
            plane.name,
            plane.client_port,
            plane.peer_port,
            plane.client_port + 2
        );
    }
    if let Some(tls) = &tls {
        header += &format!("Mutual TLS: certificates in {} (the client's CN is root)\n", tls.dir.display());
    }
    header += "Waiting for the planes to elect a leader...\n";
    say(&header);
    let mut hints = String::from("The cluster is serving. Try:\n");
    for command in [
        "etcdctl {} put hello world",
        "etcdctl {} endpoint status -w table",
        "capstan ctl {} get hello",
        "capstan ctl {} apply -f examples/",
        "capstan ctl {} get pods -o wide",
        "capstan ctl {} logs hello",
    ] {
        hints += &format!("  {}\n", command.replace("{}", &format!("--endpoints={endpoints}{shown_flags}")));
    }
    hints += "Ctrl-C stops the cluster.\n";

    // Agents stop first, while the planes can still take their pods' last status.
    let (stop_planes, _) = tokio::sync::watch::channel(false);
    let (stop_agents, _) = tokio::sync::watch::channel(false);
    let mut planes_supervised = Vec::new();
    let mut agents_supervised = Vec::new();
    for plane in planes {
        let mut command = Command::new(&exe);
        command
            .arg("plane")
            .args(["--name", &plane.name])
            .arg("--data-dir")
            .arg(args.data_dir.join(&plane.name))
            .args(["--listen-client", &format!("127.0.0.1:{}", plane.client_port)])
            .args(["--listen-peer", &format!("127.0.0.1:{}", plane.peer_port)])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", plane.client_port + 2)])
            .args(["--initial-cluster", &initial_cluster])
            .args(&plane_flags)
            // Every plane runs a scheduler candidate; dev's node timings are short so a
            // lost node's pods are visibly replaced within a minute.
            .arg("--scheduler")
            .args(["--node-monitor-grace-secs", &DEV_NODE_MONITOR_GRACE_SECS.to_string()])
            .args(["--pod-eviction-timeout-secs", &DEV_POD_EVICTION_TIMEOUT_SECS.to_string()])
            .stdin(Stdio::null())
            // Their own process group: a terminal's Ctrl-C reaches `capstan dev` only,
            // which stops the agents first, then the planes.
            .process_group(0);
        planes_supervised.push(tokio::spawn(supervise(plane.name, command, stop_planes.subscribe())));
    }
    for index in 1..=DEV_AGENTS {
        let name = format!("dev-agent-{index}");
        let mut command = Command::new(&exe);
        command
            .arg("agent")
            .args(["--name", &name])
            .args(["--endpoints", &endpoints])
            .args(&client_flags)
            .arg("--data-dir")
            .arg(args.data_dir.join(&name))
            .args(["--listen-logs", &format!("127.0.0.1:{}", DEV_AGENT_LOG_PORT + index)])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", DEV_AGENT_METRICS_PORT + index)])
            .args(["--node-lease-ttl-secs", &DEV_NODE_LEASE_TTL_SECS.to_string()])
            .args(["--restart-backoff-ms", &DEV_RESTART_BACKOFF_MS.to_string()])
            .stdin(Stdio::null())
            .process_group(0);
        agents_supervised.push(tokio::spawn(supervise(name, command, stop_agents.subscribe())));
    }
    // The hints are shown once they work: when the cluster answers a linearizable read.
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    let credentials = tls.as_ref().map(ThrowawayPki::client_credentials).unwrap_or_default();
    tokio::select! {
        () = &mut shutdown => {}
        () = serving(&endpoint_list, &credentials) => {
            say(&hints);
            shutdown.await;
        }
    }
    // Logged, not printed: whoever read stdout may be gone, and a failed print must not
    // leave the cluster running.
    tracing::info!("stopping the local cluster");
    // Every process is stopped, whatever happens to one of them; the first failure is
    // reported after.
    let mut failure = None;
    for (stop, supervised) in [(stop_agents, agents_supervised), (stop_planes, planes_supervised)] {
        let _ = stop.send(true);
        for supervisor in supervised {
            let outcome = supervisor.await.context("a supervisor panicked").and_then(|stopped| stopped);
            if let Err(error) = outcome {
                failure.get_or_insert(error);
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Writes to stdout, where a reader that went away (`capstan dev | head`) is no error:
/// the cluster runs on without one.
fn say(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

/// Resolves once the cluster answers a linearizable read, which takes an elected leader.
async fn serving(endpoints: &[String], credentials: &Credentials) {
    let options = Some(GetOptions::new().with_count_only());
    loop {
        if let Ok(mut client) = capstan_client::connect_with(endpoints, READY_POLL, credentials).await {
            if client.get(READY_PROBE_KEY, options.clone()).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Keeps one process (a plane or an agent) running until `stop` turns true, then stops it.
async fn supervise(
    name: String,
    mut command: Command,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut backoff_ms = 250;
    loop {
        let mut child = command.spawn().with_context(|| format!("cannot start {name}"))?;
        let started = tokio::time::Instant::now();
        let exited = tokio::select! {
            exited = child.wait() => exited,
            _ = stopped(&mut stop) => return stop_child(&name, child).await,
        };
        let status = exited.with_context(|| format!("cannot wait for plane {name}"))?;
        if started.elapsed() > Duration::from_secs(30) {
            backoff_ms = 250;
        }
        tracing::warn!(process = %name, %status, backoff_ms, "exited; restarting");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
            _ = stopped(&mut stop) => return Ok(()),
        }
        backoff_ms = (backoff_ms * 2).min(RESTART_BACKOFF_MS_MAX);
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// SIGTERM, then SIGKILL after a grace period.
async fn stop_child(name: &str, mut child: Child) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        // SAFETY: sending a signal to our own child process; the pid is alive (not reaped).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    match tokio::time::timeout(Duration::from_millis(STOP_GRACE_MS), child.wait()).await {
        Ok(status) => {
            status.with_context(|| format!("cannot wait for plane {name}"))?;
        }
        Err(_) => {
            tracing::warn!(process = %name, "did not stop in time; killing it");
            child.kill().await.with_context(|| format!("cannot kill plane {name}"))?;
        }
    }
    Ok(())
}
