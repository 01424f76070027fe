//! capstan-nodeagent: the node agent (`capstan agent`), Capstan's kubelet.
//!
//! It registers its Node with the machine's capacity ([`node`]), proves it is alive with a
//! lease key the node-lifecycle controller watches, and runs the pods bound to it as
//! supervised child processes ([`runtime`]), reporting their status by CAS ([`status`]
//! computes it) and serving their logs over gRPC ([`logs`]).
//!
//! Layout of `--data-dir`: `pods/<namespace>_<name>_<uid>/` holds each container's
//! `<container>.log` and, while it runs, `<container>.pid`.
//!
//! Invariant: it reaches the planes only over the etcd v3 API (an etcd client); it never
//! depends on capstan-store or capstan-raft. Pods keep running while the planes are out
//! of reach; the agent retries with back-off and reconciles when they return.

pub mod cgroup;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod runtime;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use capstan_client::{ClientError, Objects};
use capstan_proto::objects::{decode_stored, timestamp, Kind, Object, Pod, Taint};
use etcd_client::{EventType, WatchOptions};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::runtime::{PodState, RuntimeConfig, GRACE_PERIOD_DEFAULT, GRACE_PERIOD_MAX};
use crate::status::{pod_status, ContainerRun};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The Node's name.
    pub name: String,
    pub endpoints: Vec<String>,
    pub data_dir: PathBuf,
    /// Capacity as Kubernetes quantities (default: the machine's).
    pub cpu: String,
    pub memory: String,
    pub pods: u32,
    pub labels: BTreeMap<String, String>,
    /// Set when the node is first registered.
    pub taints: Vec<Taint>,
    /// The node lease's TTL (the kubelet's is 40 s) and how often it is renewed (10 s).
    pub lease_ttl: Duration,
    pub renew_interval: Duration,
    /// The address other machines reach this agent at (the Node's InternalIP).
    pub address: String,
    /// Where the log service listens; port 0 picks one. The port is advertised.
    pub listen_logs: SocketAddr,
    /// Filled in once the log service is bound.
    pub logs_port: u16,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Where the agent measures into (its metrics endpoint registers these).
    pub metrics: metrics::AgentMetrics,
    /// TLS and user to reach the planes with (none: plain, anonymous).
    pub credentials: capstan_client::Credentials,
}

/// Delay before reconnecting after the planes could not be reached, doubling to the max.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(200);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(10);
/// How often a status write that failed (planes unreachable) is tried again.
const STATUS_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the agent until `shutdown` resolves; then stops its pods (SIGTERM, then SIGKILL
/// after each pod's grace period) and revokes its lease, so the node goes NotReady now.
pub async fn run(mut config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let io = |what: String| move |source| AgentError::Io { what, source };
    std::fs::create_dir_all(config.data_dir.join("pods"))
        .map_err(io(format!("cannot create {}", config.data_dir.display())))?;
    let mounts: Vec<&std::path::Path> = cgroup::MOUNTS.iter().map(std::path::Path::new).collect();
    let cgroups = cgroup::Cgroups::detect(&mounts).map(Arc::new);
    match &cgroups {
        Some(_) => tracing::info!("cgroup v2: container cpu and memory limits are enforced"),
        None => tracing::warn!("no cgroup v2 cpu and memory controllers here: container limits are not enforced"),
    }
    let leftovers = runtime::kill_leftovers(&config.data_dir);
    if leftovers > 0 {
        tracing::warn!(killed = leftovers, "killed containers a previous agent left running; their pods start again");
    }
    let listener = tokio::net::TcpListener::bind(config.listen_logs)
        .await
        .map_err(io(format!("cannot listen for log requests on {}", config.listen_logs)))?;
    config.logs_port = listener.local_addr().map_err(io("cannot read the log address".into()))?.port();
    let logs = tonic::transport::Server::builder()
        .add_service(capstan_proto::agentpb::pod_logs_server::PodLogsServer::new(logs::LogService {
            data_dir: config.data_dir.clone(),
        }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let logs = tokio::spawn(logs);

    tokio::pin!(shutdown);
    let registered = async {
        let objects = connect(&config).await;
        let mut delay = RETRY_DELAY_MIN;
        while let Err(error) = node::register(&objects, &config).await {
            tracing::warn!(%error, "cannot register the node; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_DELAY_MAX);
        }
        objects
    };
    let objects = tokio::select! {
        objects = registered => objects,
        () = &mut shutdown => {
            logs.abort();
            return Ok(());
        }
    };
    tracing::info!(node = %config.name, logs_port = config.logs_port, "node registered");
    let (stop_heartbeat, heartbeat_stop) = watch::channel(false);
    let heartbeat = tokio::spawn(node::heartbeat(objects.clone(), config.clone(), heartbeat_stop));

    let mut agent = Agent {
        objects,
        config,
        cgroups,
        pods: HashMap::new(),
        stopping: Vec::new(),
        shutting_down: Default::default(),
    };
    tokio::select! {
        () = &mut shutdown => {}
        () = agent.follow_pods() => {}
    }
    tracing::info!("stopping pods");
    agent.stop_all().await;
    let _ = stop_heartbeat.send(true);
    let _ = heartbeat.await;
    logs.abort();
    Ok(())
}

async fn connect(config: &AgentConfig) -> Objects {
    let mut delay = RETRY_DELAY_MIN;
    loop {
        match capstan_client::connect_with(&config.endpoints, Duration::from_secs(5), &config.credentials).await {
            Ok(client) => return Objects::new(client),
            Err(error) => tracing::warn!(%error, "cannot reach the planes; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_DELAY_MAX);
    }
}

/// A pod this agent runs (or ran: the entry stays until the pod is deleted, so a stale
/// event never starts a finished pod again).
struct PodWorker {
    uid: String,
    grace: Duration,
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

struct Agent {
    objects: Objects,
    config: AgentConfig,
    cgroups: Option<Arc<cgroup::Cgroups>>,
    pods: HashMap<String, PodWorker>,
    /// Workers told to stop, still stopping.
    stopping: Vec<JoinHandle<()>>,
    /// Set when the agent stops: its pods are stopped but their status is left as it was,
    /// so the next start of the agent runs them again (a stop is not the pods' end).
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

impl Agent {
    /// Lists the pods, then follows them by watch; after any error, lists again (with
    /// back-off) and reconciles, so nothing missed while the planes were away is lost.
    async fn follow_pods(&mut self) {
        let mut delay = RETRY_DELAY_MIN;
        loop {
            if let Err(error) = self.list_and_watch(&mut delay).await {
                tracing::warn!(%error, "lost the pod watch; relisting");
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_DELAY_MAX);
        }
    }

    async fn list_and_watch(&mut self, delay: &mut Duration) -> Result<(), AgentError> {
        let listed = self.objects.list(Kind::Pod, None).await?;
        let mut present: std::collections::HashSet<String> = std::collections::HashSet::new();
        for object in listed.objects {
            if let Object::Pod(pod) = object {
                let key = Kind::Pod.key(pod.namespace(), &pod.metadata.name);
                present.insert(key.clone());
                self.reconcile(&key, Some(pod));
            }
        }
        let gone: Vec<String> = self.pods.keys().filter(|key| !present.contains(*key)).cloned().collect();
        for key in gone {
            self.reconcile(&key, None);
        }
        // Pods deleted while the watch was down that had no worker (finished ones).
        self.config.metrics.keep_only(&present);
        let options = WatchOptions::new().with_prefix().with_start_revision(listed.revision + 1);
        let mut stream = self.objects.client().watch_client().watch(Kind::Pod.prefix(), Some(options)).await?;
        *delay = RETRY_DELAY_MIN;
        while let Some(response) = stream.message().await? {
            if response.canceled() {
                return Ok(());
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match event.event_type() {
                    EventType::Delete => self.reconcile(&key, None),
                    EventType::Put => match decode_stored(kv.key(), kv.value(), kv.mod_revision()) {
                        Ok(Object::Pod(pod)) => self.reconcile(&key, Some(pod)),
                        Ok(_) => {}
                        Err(error) => tracing::warn!(%error, "skipping a pod that does not decode"),
                    },
                }
            }
            self.stopping.retain(|task| !task.is_finished());
        }
        Ok(())
    }

    /// Starts, keeps or stops the worker of one pod key given what the store has.
    fn reconcile(&mut self, key: &str, pod: Option<Pod>) {
        let ours = pod.filter(|pod| pod.spec.node_name == self.config.name);
        self.config.metrics.pod_phase(key, ours.as_ref().map(|pod| pod.status.phase));
        match (ours, self.pods.get(key)) {
            (None, Some(_)) => self.stop(key),
            (Some(pod), Some(worker)) if worker.uid != pod.metadata.uid => {
                self.stop(key);
                self.start(key, pod);
            }
            // Failed by someone else (NodeLost), or finished: stop what still runs.
            (Some(pod), Some(worker))
                if pod.status.phase.is_terminal() && !worker.task.is_finished() && worker.stop.borrow().is_none() =>
            {
                let _ = worker.stop.send(Some(worker.grace));
            }
            (Some(pod), None) if !pod.status.phase.is_terminal() => {
                // Pods written by other clients are unchecked: names become paths here.
                let report = capstan_proto::objects::validate::validate(&Object::Pod(pod.clone()));
                match report.errors.first() {
                    Some(problem) => tracing::warn!(pod = %key, %problem, "not running an invalid pod"),
                    None => self.start(key, pod),
                }
            }
            _ => {}
        }
    }

    fn stop(&mut self, key: &str) {
        if let Some(worker) = self.pods.remove(key) {
            let _ = worker.stop.send(Some(worker.grace));
            self.stopping.push(worker.task);
        }
    }

    fn start(&mut self, key: &str, pod: Pod) {
        tracing::info!(pod = %key, "starting pod");
        let restarts: Vec<i32> = pod
            .spec
            .containers
            .iter()
            .map(|container| {
                // A container the store saw run before ran under an earlier agent: this is
                // a restart.
                pod.status.container_statuses.iter().find(|s| s.name == container.name).map_or(0, |s| {
                    s.restart_count + i32::from(s.state.running.is_some() || s.state.terminated.is_some())
                })
            })
            .collect();
        let state = Arc::new(PodState {
            containers: Mutex::new(
                pod.spec.containers.iter().zip(&restarts).map(|(c, r)| ContainerRun::new(&c.name, *r)).collect(),
            ),
            changed: Notify::new(),
            start_time: timestamp(SystemTime::now()),
        });
        let grace = pod
            .spec
            .termination_grace_period_seconds
            .map_or(GRACE_PERIOD_DEFAULT, |s| Duration::from_secs(s.max(0) as u64))
            .min(GRACE_PERIOD_MAX);
        let (stop, stopped) = watch::channel(None);
        let runtime = RuntimeConfig {
            data_dir: self.config.data_dir.clone(),
            backoff_base: self.config.backoff_base,
            backoff_max: self.config.backoff_max,
            cgroups: self.cgroups.clone(),
            host_ip: self.config.address.clone(),
        };
        let uid = pod.metadata.uid.clone();
        let task = tokio::spawn(work(
            self.objects.clone(),
            runtime,
            pod,
            state,
            restarts,
            stopped,
            self.shutting_down.clone(),
        ));
        self.pods.insert(key.to_string(), PodWorker { uid, grace, stop, task });
    }

    async fn stop_all(&mut self) {
        self.shutting_down.store(true, std::sync::atomic::Ordering::Relaxed);
        for key in self.pods.keys().cloned().collect::<Vec<_>>() {
            self.stop(&key);
        }
        for task in self.stopping.drain(..) {
            let _ = task.await;
        }
    }
}

/// Runs a pod and writes its status whenever a container's state changes, until it is
/// done for good and its final status is written.
async fn work(
    objects: Objects,
    runtime: RuntimeConfig,
    pod: Pod,
    state: Arc<PodState>,
    restarts: Vec<i32>,
    stop: watch::Receiver<Option<Duration>>,
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
) {
    let host_ip = runtime.host_ip.clone();
    let runner = runtime::run_pod(runtime, pod.clone(), state.clone(), restarts, stop.clone());
    tokio::pin!(runner);
    let mut written = true;
    let mut retry = tokio::time::interval(STATUS_RETRY_INTERVAL);
    loop {
        tokio::select! {
            () = &mut runner => break,
            () = state.changed.notified() => written = write_status(&objects, &pod, &state, &host_ip).await,
            _ = retry.tick(), if !written => written = write_status(&objects, &pod, &state, &host_ip).await,
        }
    }
    if shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    // A pod that ended by itself must have its final status land: retry (with back-off)
    // while the planes are away. One stopped by the agent (deleted, failed by someone
    // else, or the agent stopping) gets one try.
    let mut delay = RETRY_DELAY_MIN;
    while !write_status(&objects, &pod, &state, &host_ip).await && stop.borrow().is_none() {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_DELAY_MAX);
    }
}

/// Writes the pod's status by CAS (a fresh read and retry when another writer got there
/// first). Returns false if the planes could not be reached; a pod that is gone, was
/// replaced, or was finished by someone else (NodeLost) is left alone.
async fn write_status(objects: &Objects, pod: &Pod, state: &PodState, host_ip: &str) -> bool {
    let containers = state.containers.lock().expect("no panics while locked").clone();
    let now = timestamp(SystemTime::now());
    let result = objects
        .modify(Kind::Pod, pod.namespace(), &pod.metadata.name, |object| {
            let Object::Pod(stored) = object else { return Ok(false) };
            // Another pod now (same name, new UID), moved to another node, or finished by
            // someone else: not this worker's to write.
            if stored.metadata.uid != pod.metadata.uid
                || stored.spec.node_name != pod.spec.node_name
                || stored.status.phase.is_terminal()
            {
                return Ok(false);
            }
            let status = pod_status(&containers, &stored.status, &state.start_time, host_ip, &now);
            if status == stored.status {
                return Ok(false);
            }
            stored.status = status;
            Ok::<_, ClientError>(true)
        })
        .await;
    match result {
        Ok(_) | Err(ClientError::NotFound { .. }) => true,
        Err(error) => {
            tracing::warn!(%error, pod = %pod.metadata.name, "cannot write the pod status; retrying");
            false
        }
    }
}
