//! Shared helpers for the integration tests: real `capstan plane` processes on loopback.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use capstan_client::{Listed, Objects};
use capstan_proto::objects::{Object, Pod, REGISTRY_PREFIX};
use etcd_client::WatchOptions;

/// How long a plane may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback address no one listens on right now. Ports come from below Linux's
/// ephemeral range (32768 and up), so no client connection or port-0 listener of a
/// concurrently running test can take one between this check and the plane's bind; each
/// is handed out once per test process.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_run(1)))
}

/// The first of `count` consecutive free ports, taken from the process's sequence in one
/// step, so that tests running on other threads are never handed one of them.
fn free_run(count: u32) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    let start = std::process::id() % 60 * 200;
    loop {
        let offset = NEXT.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        let first = FIRST + (start + offset) % COUNT;
        if first + count > FIRST + COUNT {
            continue;
        }
        if (first..first + count).all(|port| TcpListener::bind(("127.0.0.1", port as u16)).is_ok()) {
            return first as u16;
        }
    }
}

/// A `capstan plane` child process; killed when dropped.
pub struct PlaneProcess {
    child: Child,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub name: String,
    extra_args: Vec<String>,
    /// Lines the plane wrote to stderr, as they arrive.
    log: mpsc::Receiver<String>,
}

impl PlaneProcess {
    /// Starts a single plane in `data_dir` and waits until it serves.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> PlaneProcess {
        let mut plane = PlaneProcess::spawn(data_dir, free_addr(), free_addr(), extra_args);
        plane.wait_until_ready();
        plane
    }

    /// Starts a plane named `test-plane` without waiting for it.
    pub fn spawn(data_dir: &Path, client_addr: SocketAddr, peer_addr: SocketAddr, extra_args: &[&str]) -> PlaneProcess {
        PlaneProcess::spawn_named("test-plane", data_dir, client_addr, peer_addr, extra_args)
    }

    /// Starts a plane without waiting for it.
    pub fn spawn_named(
        name: &str,
        data_dir: &Path,
        client_addr: SocketAddr,
        peer_addr: SocketAddr,
        extra_args: &[&str],
    ) -> PlaneProcess {
        let name = name.to_string();
        let extra_args: Vec<String> = extra_args.iter().map(|arg| arg.to_string()).collect();
        let (child, log) = spawn_plane(&name, data_dir, client_addr, peer_addr, &extra_args);
        PlaneProcess { child, client_addr, peer_addr, data_dir: data_dir.to_path_buf(), name, extra_args, log }
    }

    /// The client endpoint as etcdctl and etcd-client take it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client_addr)
    }

    /// Blocks until the plane serves clients, has a leader and has published its URLs.
    pub fn wait_until_ready(&mut self) {
        self.wait_for_logs(&["plane serving", "leader elected", "client URLs published"]);
    }

    /// Blocks until the plane has logged a line containing each of `needles`, in any
    /// order; panics with the log so far if it exits or they do not come in time.
    pub fn wait_for_logs(&mut self, needles: &[&str]) {
        let mut missing: Vec<&str> = needles.to_vec();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    missing.retain(|needle| !line.contains(needle));
                    seen.push(line);
                }
                Err(_) => panic!("plane never logged {missing:?}; its log:\n{}", seen.join("\n")),
            }
        }
    }

    /// Waits for the process to exit and returns its status and the rest of its log (all
    /// of it: the reader ends at the end of the exited process's stderr).
    pub fn wait_for_exit(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().expect("wait for plane");
        let log: Vec<String> = self.log.iter().collect();
        (status, log.join("\n"))
    }

    /// SIGKILLs the plane and starts it again on the same addresses and data.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.restart();
        self.wait_until_ready();
    }

    /// Starts the (killed) plane again on the same addresses and data, without waiting.
    pub fn restart(&mut self) {
        let (child, log) = spawn_plane(&self.name, &self.data_dir, self.client_addr, self.peer_addr, &self.extra_args);
        self.child = child;
        self.log = log;
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the plane to stop, as Ctrl-C or a service manager does (SIGTERM).
    pub fn terminate(&self) {
        // SAFETY: kill(2) with the PID of a child this process has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }
}

impl Drop for PlaneProcess {
    fn drop(&mut self) {
        self.kill();
        print_log_if_failing(&self.name, &self.log);
    }
}

/// A failing test's output ends with this many of each child's last log lines.
const FAILING_LOG_LINES: usize = 300;

/// If the test is failing, prints the last lines of an exited child's `log` that no wait
/// consumed, so that a failure (in CI above all) shows what the planes and agents saw.
fn print_log_if_failing(name: &str, log: &mpsc::Receiver<String>) {
    if !std::thread::panicking() {
        return;
    }
    let mut tail = std::collections::VecDeque::new();
    // The reader ends at the end of the child's stderr; a grandchild holding it open
    // costs one timeout.
    while let Ok(line) = log.recv_timeout(Duration::from_secs(1)) {
        if tail.len() == FAILING_LOG_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    eprintln!("---- the last {} log lines of {name} ----", tail.len());
    for line in tail {
        eprintln!("{name}| {line}");
    }
}

/// Runs Debian's etcdctl 3.4 with `args` (short timeouts, which `args` may override:
/// the last of a repeated flag wins); whether it succeeded, and what it printed.
pub fn etcdctl(args: &[&str]) -> (bool, String) {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--dial-timeout", "3s", "--command-timeout", "10s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// A plain HTTP/1.0 GET: the status code and the body.
pub fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(address, "GET", path, &[], "");
    (status, body)
}

/// A plain HTTP/1.0 request with extra header lines: the status code, the head (status
/// line and headers) and the body.
pub fn http_request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the HTTP listener");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: {}\r\n", body.len()).unwrap();
    for header in headers {
        write!(stream, "{header}\r\n").unwrap();
    }
    write!(stream, "\r\n{body}").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).expect("a status code");
    (status, head.to_string(), body.to_string())
}

/// `capstan dev`, stopped as Ctrl-C stops it (SIGTERM; it stops its planes and agents)
/// when dropped.
pub struct Dev(pub Child);

impl Drop for Dev {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// `count` client ports whose peer and metrics ports (one and two higher) are free too;
/// [`free_addr`] hands out none of the three again, to this test or one running beside it
/// (a WebDriver started later once took a plane's peer port, and so did a concurrent
/// test's plane).
pub fn free_client_ports(count: usize) -> Vec<u16> {
    (0..count).map(|_| free_run(3)).collect()
}

/// Any other child process, killed when the guard drops, so a failing test leaves none.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_plane(
    name: &str,
    data_dir: &Path,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
    extra_args: &[String],
) -> (Child, mpsc::Receiver<String>) {
    let mut args: Vec<String> = vec!["plane".into(), "--name".into(), name.into(), "--data-dir".into()];
    args.push(data_dir.display().to_string());
    args.extend(["--listen-client".into(), client_addr.to_string(), "--listen-peer".into(), peer_addr.to_string()]);
    args.extend(extra_args.iter().cloned());
    spawn_capstan(&args)
}

/// Runs `capstan ARGS` with its stderr lines sent to the returned channel.
fn spawn_capstan(args: &[String]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capstan plane");
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (child, log)
}

/// A `capstan agent` child process; killed when dropped.
pub struct AgentProcess {
    child: Child,
    pub name: String,
    pub data_dir: PathBuf,
    args: Vec<String>,
    log: mpsc::Receiver<String>,
}

impl AgentProcess {
    /// Starts an agent named `name` against `endpoints`, serving logs on a free port, and
    /// waits until its node is registered.
    pub fn start(name: &str, endpoints: &str, data_dir: &Path, extra_args: &[&str]) -> AgentProcess {
        let mut args: Vec<String> =
            vec!["agent".into(), "--name".into(), name.into(), "--endpoints".into(), endpoints.into()];
        args.extend([
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen-logs".into(),
            "127.0.0.1:0".into(),
        ]);
        args.extend(extra_args.iter().map(|arg| arg.to_string()));
        let (child, log) = spawn_capstan(&args);
        let mut agent = AgentProcess { child, name: name.into(), data_dir: data_dir.into(), args, log };
        agent.wait_for_log("node registered");
        agent
    }

    /// Blocks until the agent logs a line containing `needle`; returns the line.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("agent never logged {needle:?}; its log:\n{}", seen.join("\n")),
            }
        }
    }

    /// SIGKILL: the agent dies without stopping its pods or revoking its lease.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the (killed) agent again with the same arguments, without waiting.
    pub fn restart(&mut self) {
        let (child, log) = spawn_capstan(&self.args);
        self.child = child;
        self.log = log;
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SIGTERM first, so the agent stops the pods it started.
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if std::time::Instant::now() >= deadline {
                self.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        print_log_if_failing(&self.name, &self.log);
    }
}

/// The index of the plane that leads, as the planes report it.
pub async fn leader_index(cluster: &Cluster) -> usize {
    let connect =
        |endpoint: String| async move { etcd_client::Client::connect([endpoint], None).await.expect("connect") };
    let leader = connect(cluster.planes[0].endpoint()).await.status().await.unwrap().leader();
    for (index, plane) in cluster.planes.iter().enumerate() {
        if connect(plane.endpoint()).await.status().await.unwrap().header().unwrap().member_id() == leader {
            return index;
        }
    }
    panic!("no plane is the leader {leader:x}");
}

/// Planes started together as one cluster.
pub struct Cluster {
    pub planes: Vec<PlaneProcess>,
    /// Each plane's metrics and health listener.
    pub metrics: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `size` planes and waits until each serves, knows the leader and has
    /// published its URLs.
    pub fn start(size: usize) -> Cluster {
        Cluster::start_with(size, &[])
    }

    /// [`Cluster::start`] with `extra_args` given to every plane.
    pub fn start_with(size: usize, extra_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let addrs: Vec<(SocketAddr, SocketAddr)> = (0..size).map(|_| (free_addr(), free_addr())).collect();
        let metrics: Vec<SocketAddr> = (0..size).map(|_| free_addr()).collect();
        let metrics_urls: Vec<String> = metrics.iter().map(|address| format!("http://{address}")).collect();
        let initial = addrs
            .iter()
            .enumerate()
            .map(|(index, (_, peer))| format!("plane-{index}=http://{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut planes: Vec<PlaneProcess> = addrs
            .iter()
            .enumerate()
            .map(|(index, (client, peer))| {
                let name = format!("plane-{index}");
                let mut args = vec!["--initial-cluster", &initial, "--listen-metrics-urls", &metrics_urls[index]];
                args.extend_from_slice(extra_args);
                PlaneProcess::spawn_named(&name, &dir.path().join(&name), *client, *peer, &args)
            })
            .collect();
        for plane in &mut planes {
            plane.wait_until_ready();
        }
        Cluster { planes, metrics, dir }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.planes.iter().map(|plane| plane.endpoint()).collect()
    }

    /// `name=peer-url` of every plane, as `--initial-cluster` takes it.
    pub fn initial_cluster(&self) -> String {
        self.planes
            .iter()
            .map(|plane| format!("{}=http://{}", plane.name, plane.peer_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where the planes keep their data directories.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `capstan ctl --endpoints=<endpoints> <args>` with `input` on stdin; returns whether it
/// succeeded, its stdout and its stderr.
pub fn ctl(endpoints: &str, args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capstan"))
        .arg("ctl")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capstan ctl");
    child.stdin.take().expect("piped stdin").write_all(input.as_bytes()).expect("write ctl input");
    let output = child.wait_with_output().expect("wait for capstan ctl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

/// How long the cluster may take to reach a state after a change: generous, as tests
/// share two cores. It bounds waiting for an event; it is not a performance threshold.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);

/// Waits until `done` holds for everything under /registry/, re-checking on each change
/// (a watch, not a sleep). Returns the final list.
pub async fn wait_for(objects: &Objects, what: &str, done: impl Fn(&Listed) -> bool) -> Listed {
    let deadline = tokio::time::Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let listed = objects.list_prefix(REGISTRY_PREFIX).await.expect("list");
        if done(&listed) {
            return listed;
        }
        let options = WatchOptions::new().with_prefix().with_start_revision(listed.revision + 1);
        let mut stream = objects.client().watch_client().watch(REGISTRY_PREFIX, Some(options)).await.expect("watch");
        loop {
            let message = tokio::time::timeout_at(deadline, stream.message()).await;
            let Ok(message) = message else {
                panic!("timed out waiting for {what}; last list: {:#?}", summary(&listed))
            };
            if message.expect("watch").is_some_and(|response| !response.events().is_empty()) {
                break;
            }
        }
    }
}

pub fn summary(listed: &Listed) -> Vec<String> {
    listed
        .objects
        .iter()
        .map(|object| match object {
            Object::Pod(pod) => format!(
                "pod {} node={:?} phase={:?} {:?}",
                pod.metadata.name, pod.spec.node_name, pod.status.phase, pod.status.conditions
            ),
            other => format!("{:?} {}", other.kind(), other.metadata().name),
        })
        .collect()
}

pub fn pods(listed: &Listed) -> Vec<&Pod> {
    listed.objects.iter().filter_map(|object| if let Object::Pod(pod) = object { Some(pod) } else { None }).collect()
}
