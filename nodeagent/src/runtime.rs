//! Runs a pod's containers as supervised child processes: each in its own process group
//! (so a stop reaches everything it started), stdout and stderr appended to a log file,
//! restarted by the pod's restartPolicy with exponential back-off, stopped with SIGTERM
//! and, after the grace period, SIGKILL. Every state change goes to the pod's status,
//! written by CAS (see `lib.rs`).
//!
//! Each run records `<pid> <start time>` in a pid file, so an agent that was killed can
//! find and kill what it left behind before it starts the pods again (no duplicates).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use capstan_proto::objects::{timestamp, Container, Pod, RestartPolicy};
use tokio::process::Command;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::cgroup::{Cgroups, Limits};
use crate::status::{ContainerRun, Exit, RunState};

/// Kubernetes' default termination grace period.
pub const GRACE_PERIOD_DEFAULT: Duration = Duration::from_secs(30);
/// The longest grace period honoured, so a stop always ends.
pub const GRACE_PERIOD_MAX: Duration = Duration::from_secs(600);
/// A container that ran this long restarts with the back-off reset, as in Kubernetes.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);
/// Exit codes a shell reports for a command that is missing or not executable.
const EXIT_NOT_FOUND: i32 = 127;
const EXIT_NOT_EXECUTABLE: i32 = 126;

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub data_dir: PathBuf,
    /// The first restart delay; it doubles up to `backoff_max` (Kubernetes: 10 s, 5 min).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Where containers' limits are enforced (cgroup v2), if this machine can.
    pub cgroups: Option<Arc<Cgroups>>,
    /// The node's address, reported as the pods' hostIP.
    pub host_ip: String,
}

/// The shared view of a pod's containers, read by the status writer.
pub struct PodState {
    pub containers: Mutex<Vec<ContainerRun>>,
    pub changed: Notify,
    pub start_time: String,
}

/// The directory of one pod's files: `<data>/pods/<namespace>_<name>_<uid>`.
pub fn pod_dir(data_dir: &Path, pod: &Pod) -> PathBuf {
    data_dir.join("pods").join(format!("{}_{}_{}", pod.namespace(), pod.metadata.name, pod.metadata.uid))
}

/// Runs every container of the pod until each is done for good, or until `stop` carries
/// a grace period. `restarts` are the counts the store already has (an agent restart
/// continues them).
pub async fn run_pod(
    config: RuntimeConfig,
    pod: Pod,
    state: Arc<PodState>,
    restarts: Vec<i32>,
    stop: watch::Receiver<Option<Duration>>,
) {
    let dir = pod_dir(&config.data_dir, &pod);
    if let Err(error) = std::fs::create_dir_all(&dir) {
        tracing::error!(%error, dir = %dir.display(), "cannot create the pod's directory");
    }
    let mut supervisors = tokio::task::JoinSet::new();
    for (index, container) in pod.spec.containers.iter().enumerate() {
        let supervisor = Supervisor {
            config: config.clone(),
            pod_name: pod.metadata.name.clone(),
            policy: pod.spec.restart_policy,
            container: container.clone(),
            index,
            dir: dir.clone(),
            state: state.clone(),
        };
        let restarts = restarts.get(index).copied().unwrap_or(0);
        supervisors.spawn(supervisor.run(restarts, stop.clone()));
    }
    while supervisors.join_next().await.is_some() {}
}

struct Supervisor {
    config: RuntimeConfig,
    pod_name: String,
    policy: RestartPolicy,
    container: Container,
    index: usize,
    dir: PathBuf,
    state: Arc<PodState>,
}

impl Supervisor {
    fn set(&self, change: impl FnOnce(&mut ContainerRun)) {
        if let Some(run) = self.state.containers.lock().expect("no panics while locked").get_mut(self.index) {
            change(run);
        }
        self.state.changed.notify_one();
    }

    async fn run(self, mut restarts: i32, mut stop: watch::Receiver<Option<Duration>>) {
        let mut backoff = self.config.backoff_base;
        loop {
            if stop.borrow().is_some() {
                return;
            }
            let started = Instant::now();
            let exit = self.run_once(&mut stop).await;
            if started.elapsed() >= BACKOFF_RESET_AFTER {
                backoff = self.config.backoff_base;
            }
            let again = match self.policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !exit.succeeded(),
                RestartPolicy::Never => false,
            };
            if !again || stop.borrow().is_some() {
                self.set(|run| run.state = RunState::Terminated(exit));
                return;
            }
            restarts += 1;
            let message = format!(
                "back-off {}s restarting failed container={} pod={}",
                backoff.as_secs_f64().ceil(),
                self.container.name,
                self.pod_name
            );
            self.set(|run| {
                run.state = RunState::Waiting { reason: "CrashLoopBackOff".into(), message };
                run.restart_count = restarts;
                run.last_exit = Some(exit);
            });
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(Option::is_some) => return,
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    /// Starts the container once and waits for it to exit (or stops it).
    async fn run_once(&self, stop: &mut watch::Receiver<Option<Duration>>) -> Exit {
        let started_at = timestamp(SystemTime::now());
        let mut child = match self.spawn() {
            Ok(child) => child,
            Err(message) => {
                let code = if message.contains("not found") || message.contains("No such file") {
                    EXIT_NOT_FOUND
                } else {
                    EXIT_NOT_EXECUTABLE
                };
                return Exit {
                    code,
                    signal: None,
                    reason: "StartError".into(),
                    message,
                    finished_at: started_at.clone(),
                    started_at,
                };
            }
        };
        let pid = child.id();
        if let Some(pid) = pid {
            record_pid(&self.pid_file(), pid);
        }
        self.set(|run| run.state = RunState::Running { started_at: started_at.clone() });
        let status = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(Option::is_some) => None,
        };
        let status = match status {
            Some(status) => status,
            None => {
                let grace = stop.borrow().unwrap_or_default();
                terminate(&mut child, pid, grace).await
            }
        };
        // The container is over when its first process ends: what it left behind in its
        // process group (`daemon &`) goes too, or a restart would run it twice.
        if let Some(pid) = pid {
            signal_group(pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_file(self.pid_file());
        if let Some(cgroups) = &self.config.cgroups {
            cgroups.remove(&self.cgroup_name());
        }
        let finished_at = timestamp(SystemTime::now());
        match status {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                let signal = status.signal();
                let code = status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0));
                let reason = if code == 0 { "Completed" } else { "Error" };
                Exit { code, signal, reason: reason.into(), message: String::new(), started_at, finished_at }
            }
            Err(error) => Exit {
                code: -1,
                signal: None,
                reason: "Error".into(),
                message: format!("cannot wait for the container: {error}"),
                started_at,
                finished_at,
            },
        }
    }

    /// The container's cgroup: `<pod dir name>-<container>`.
    fn cgroup_name(&self) -> String {
        let pod = self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{pod}-{}", self.container.name)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join(format!("{}.pid", self.container.name))
    }

    fn spawn(&self) -> Result<tokio::process::Child, String> {
        let container = &self.container;
        let log_path = self.dir.join(format!("{}.log", container.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open the log file {}: {e}", log_path.display()))?;
        let err_log = log.try_clone().map_err(|e| format!("cannot open the log file {}: {e}", log_path.display()))?;
        let Some(program) = container.command.first() else {
            return Err(format!("container {:?} has no command to run", container.name));
        };
        let working_dir =
            if container.working_dir.is_empty() { self.dir.clone() } else { PathBuf::from(&container.working_dir) };
        let mut command = Command::new(program);
        command
            .args(&container.command[1..])
            .args(&container.args)
            .envs(container.env.iter().map(|e| (e.name.as_str(), e.value.as_str())))
            .current_dir(&working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log))
            .process_group(0);
        let limits = Limits::of(container);
        if let (Some(cgroups), false) = (&self.config.cgroups, limits.is_empty()) {
            let procs = cgroups
                .create(&self.cgroup_name(), &limits)
                .map_err(|e| format!("cannot create the container's cgroup: {e}"))?;
            let procs = std::ffi::CString::new(procs.into_os_string().into_encoded_bytes())
                .map_err(|_| "the cgroup path holds a NUL byte".to_string())?;
            // SAFETY: `join` only makes system calls, as the pre-exec closure must.
            unsafe { command.pre_exec(move || crate::cgroup::join(&procs)) };
        }
        command.spawn().map_err(|e| format!("failed to start container {:?}: {program:?}: {e}", container.name))
    }
}

/// SIGTERM to the container's process group, SIGKILL after `grace`.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: Option<u32>,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = pid {
        signal_group(pid, libc::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            if let Some(pid) = pid {
                signal_group(pid, libc::SIGKILL);
            }
            child.wait().await
        }
    }
}

fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals the process group we created for the
    // container (process_group(0) made the child its leader); no memory is touched.
    unsafe { libc::kill(-(pid as libc::pid_t), signal) };
}

/// The kernel's start time of a process (field 22 of /proc/<pid>/stat), which tells a
/// live process from a later one that reused its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn record_pid(path: &Path, pid: u32) {
    let line = format!("{pid} {}", start_time(pid).unwrap_or(0));
    if let Err(error) = std::fs::write(path, line) {
        tracing::warn!(%error, path = %path.display(), "cannot record the container's pid");
    }
}

/// Kills the process groups an earlier agent left running (it was killed before it could
/// stop its pods), so restarting the pods duplicates nothing. Returns how many.
pub fn kill_leftovers(data_dir: &Path) -> usize {
    let Ok(pods) = std::fs::read_dir(data_dir.join("pods")) else { return 0 };
    let mut killed = 0;
    for pod in pods.filter_map(Result::ok) {
        let Ok(files) = std::fs::read_dir(pod.path()) else { continue };
        for file in files.filter_map(Result::ok).map(|f| f.path()).filter(|p| p.extension().is_some_and(|e| e == "pid"))
        {
            let recorded = std::fs::read_to_string(&file).unwrap_or_default();
            let mut fields = recorded.split_whitespace().map(str::parse::<u64>);
            if let (Some(Ok(pid)), Some(Ok(started))) = (fields.next(), fields.next()) {
                if pid > 0 && pid <= u64::from(u32::MAX) && start_time(pid as u32) == Some(started) {
                    signal_group(pid as u32, libc::SIGKILL);
                    killed += 1;
                }
            }
            let _ = std::fs::remove_file(&file);
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_reads_proc() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX - 1), None);
    }
}
