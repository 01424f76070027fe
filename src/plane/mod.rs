//! The plane server: the etcd v3 gRPC API (KV, Watch, Lease, Cluster, Maintenance, Auth)
//! served over the Raft-replicated store.
//!
//! Writes become Raft commands (`propose`); linearizable reads confirm leadership through
//! read-index first, serializable reads are local. The leader alone expires leases
//! ([`lease::Lessor`]). Watches read the event channel the state machine feeds and fall
//! back to the store's history when they fall behind ([`watch`]).

pub mod auth;
mod batch;
pub mod compaction;
mod dashboard;
mod forward;
mod grpc;
mod kv;
mod lease;
mod maintenance;
mod membership;
pub mod metrics;
pub mod status;

pub use membership::check_peer_url;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use openraft::error::{CheckIsLeaderError, RaftError};
use prost::Message;
use tonic::Status;

use crate::socket;
use capstan_proto::etcdserverpb as pb;
use capstan_proto::raftpb::{command, Command};
use capstan_raft::network::{PeerChannels, PeerFaults};
use capstan_raft::{NodeId, PeerNode, PlaneIdentity, Raft, RaftConfig, RevisionEvents};
use capstan_store::{CommandResponse, Store};

/// etcd's limit on one request (`--max-request-bytes`).
pub const REQUEST_BYTES_MAX: usize = 3 * 512 * 1024;
/// gRPC accepts a little more than a request so that an oversize request gets etcd's
/// "request is too large" rather than a transport error, as in etcd.
pub const GRPC_MESSAGE_BYTES_MAX: usize = REQUEST_BYTES_MAX + 512 * 1024;
/// etcd's default backend quota (`--quota-backend-bytes`).
pub const QUOTA_BYTES_DEFAULT: u64 = 2 << 30;
/// How long a stopping plane waits for its clients' requests and streams to finish.
pub const SHUTDOWN_GRACE_MS: u64 = 3_000;
/// How long a write or read-index waits for Raft before the client gets a timeout.
pub const PROPOSE_TIMEOUT_MS: u64 = 7_000;
/// Client and peer connections are pinged after this long without a frame, so that dead
/// ones end (with the streams they carry, a peer's pipes among them).
const KEEPALIVE_MS: u64 = 10_000;

/// Everything a plane is started with.
#[derive(Clone, Debug)]
pub struct PlaneConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client: SocketAddr,
    pub listen_peer: SocketAddr,
    /// Where to serve `/metrics`, `/health`, `/readyz` and `/livez` over HTTP.
    pub listen_metrics: Option<SocketAddr>,
    /// TLS on the client listener (`--cert-file` and the rest).
    pub client_tls: Option<crate::tls::ServerTls>,
    /// TLS between planes (`--peer-cert-file` and the rest), both ways: the peer listener
    /// serves with it, and the plane shows the same certificate to its peers.
    pub peer_tls: Option<crate::tls::ServerTls>,
    /// Token lifetime and password hashing cost.
    pub auth: auth::AuthConfig,
    pub advertise_client_urls: Vec<String>,
    /// `name=peer-url` of every initial member, this plane included; when joining a running
    /// cluster, this plane and members to ask for the cluster.
    pub initial_cluster: Vec<(String, String)>,
    /// Bootstrap a new cluster, or join a running one that already added this plane.
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    pub raft: RaftConfig,
    pub quota_bytes: u64,
    /// How often a watch that asked for progress notifications gets one when idle.
    pub watch_progress_notify_interval: Duration,
    /// Faults injected into peer traffic, for tests; `None` in a real plane.
    pub peer_faults: Option<Arc<dyn PeerFaults>>,
    /// Faults injected before the Raft log's WAL syncs, for tests; `None` in a real plane.
    pub sync_faults: Option<Arc<dyn capstan_raft::log_store::SyncFaults>>,
    /// Deliberately unsafe, for proving that the tests catch it: linearizable reads are
    /// served from this plane's state without read-index. Never set outside tests.
    pub unsafe_stale_reads: bool,
    /// Run a scheduler candidate (and the controllers, when it leads) beside the plane,
    /// as a client of this plane's own client address.
    pub scheduler: Option<capstan_scheduler::SchedulerConfig>,
    /// The user and password the in-plane scheduler authenticates as while auth is enabled.
    pub scheduler_user: Option<(String, String)>,
    /// Compact history automatically (etcd's --auto-compaction-*); `None`: never.
    pub auto_compaction: Option<compaction::AutoCompaction>,
    /// A backup (`capstan ctl snapshot save`) to fill a new data directory with before the
    /// plane bootstraps a new cluster on it, as `etcdutl snapshot restore` does.
    pub restore: Option<PathBuf>,
}

impl PlaneConfig {
    /// A single-plane configuration with etcd's defaults, for `capstan dev` and tests.
    pub fn single(name: &str, data_dir: PathBuf, listen_client: SocketAddr, listen_peer: SocketAddr) -> PlaneConfig {
        PlaneConfig {
            name: name.to_string(),
            data_dir,
            listen_client,
            listen_peer,
            listen_metrics: None,
            client_tls: None,
            peer_tls: None,
            auth: auth::AuthConfig::default(),
            advertise_client_urls: vec![format!("http://{listen_client}")],
            initial_cluster: vec![(name.to_string(), format!("http://{listen_peer}"))],
            initial_cluster_state: ClusterState::New,
            initial_cluster_token: "capstan-cluster".to_string(),
            raft: RaftConfig::default(),
            quota_bytes: QUOTA_BYTES_DEFAULT,
            watch_progress_notify_interval: Duration::from_secs(600),
            peer_faults: None,
            sync_faults: None,
            unsafe_stale_reads: false,
            scheduler: None,
            scheduler_user: None,
            auto_compaction: None,
            restore: None,
        }
    }

    /// The channels to reach peers with: over TLS to `https://` peers when `--peer-*` TLS
    /// is set.
    fn peer_channels(&self) -> anyhow::Result<PeerChannels> {
        let tls = self.peer_tls.as_ref().map(crate::tls::ServerTls::peer_client_config).transpose()?;
        Ok(PeerChannels::default().with_tls(tls))
    }

    /// This plane as `--initial-cluster` and `--advertise-client-urls` describe it.
    fn own_node(&self) -> anyhow::Result<PeerNode> {
        let (_, peer_url) = self
            .initial_cluster
            .iter()
            .find(|(name, _)| *name == self.name)
            .with_context(|| format!("--initial-cluster does not name this plane ({})", self.name))?;
        Ok(PeerNode {
            name: self.name.clone(),
            peer_url: peer_url.clone(),
            client_urls: self.advertise_client_urls.clone(),
        })
    }

    /// The identity of a member of a new cluster: everything derives from the token and
    /// the initial members' names, so every initial member computes the same.
    fn bootstrap_identity(&self) -> anyhow::Result<PlaneIdentity> {
        let token = &self.initial_cluster_token;
        let names: Vec<String> = self.initial_cluster.iter().map(|(name, _)| name.clone()).collect();
        let mut initial_members = BTreeMap::new();
        for (name, peer_url) in &self.initial_cluster {
            let node = PeerNode { name: name.clone(), peer_url: peer_url.clone(), client_urls: Vec::new() };
            if initial_members.insert(capstan_raft::member_id(token, name), node).is_some() {
                anyhow::bail!("--initial-cluster names {name} twice");
            }
        }
        let node_id = capstan_raft::member_id(token, &self.name);
        let node = self.own_node()?;
        Ok(PlaneIdentity { node_id, cluster_id: capstan_raft::cluster_id(token, &names), node, initial_members })
    }

    /// Who this plane is: what its data directory remembers, else a new cluster's member,
    /// else a member a running cluster added.
    async fn identity(&self, store: &Store) -> anyhow::Result<PlaneIdentity> {
        let stored = capstan_raft::stored_identity(store)?;
        match (stored, self.initial_cluster_state) {
            (Some(stored), _) if stored.removed => anyhow::bail!(
                "member {:x} was removed from cluster {:x}; to rejoin, add it again and start it with an empty data directory",
                stored.node_id,
                stored.cluster_id
            ),
            (Some(stored), ClusterState::New) => {
                let bootstrap = self.bootstrap_identity()?;
                if bootstrap.cluster_id != stored.cluster_id {
                    anyhow::bail!(
                        "{} belongs to cluster {:x}, but --initial-cluster and --initial-cluster-token describe cluster {:x} \
                         (a plane that joined a running cluster restarts with --initial-cluster-state existing)",
                        self.data_dir.display(),
                        stored.cluster_id,
                        bootstrap.cluster_id
                    );
                }
                Ok(PlaneIdentity { node_id: stored.node_id, ..bootstrap })
            }
            (Some(stored), ClusterState::Existing) => Ok(PlaneIdentity {
                node_id: stored.node_id,
                cluster_id: stored.cluster_id,
                node: self.own_node()?,
                initial_members: BTreeMap::new(),
            }),
            (None, ClusterState::New) => self.bootstrap_identity(),
            (None, ClusterState::Existing) => membership::join(self).await,
        }
    }
}

/// etcd's `--initial-cluster-state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClusterState {
    New,
    Existing,
}

/// Alarms raised on this plane (etcd's Alarm API).
#[derive(Default)]
struct Alarms {
    no_space: bool,
}

/// One running plane: what every service handler shares.
pub struct Plane {
    raft: Raft,
    store: Store,
    events: tokio::sync::broadcast::Sender<Arc<RevisionEvents>>,
    node_id: NodeId,
    cluster_id: u64,
    identity: PlaneIdentity,
    config: PlaneConfig,
    alarms: Mutex<Alarms>,
    lessor: lease::Lessor,
    /// Commands for the batcher to propose (on the leader).
    proposals: tokio::sync::mpsc::Sender<batch::Proposal>,
    /// Key writes of this plane's clients, answered as this plane applies them.
    own_proposals: Arc<capstan_raft::OwnProposals>,
    /// Linearizable reads waiting for a read-index round.
    reads: tokio::sync::mpsc::Sender<batch::ReadWaiter>,
    forwarder: forward::Forwarder,
    /// Notified when the plane must stop on its own (the cluster removed it).
    stop: tokio::sync::Notify,
    /// Set once the plane is stopping, for long-lived streams to end.
    stopping: tokio::sync::watch::Sender<bool>,
    metrics: metrics::PlaneMetrics,
}

impl Plane {
    /// Resolves once the plane is stopping: watch and keep-alive streams end with it, so
    /// that stopping never waits on a client.
    fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }
    }

    /// The response header etcd puts on every response.
    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        let raft_term = self.raft.server_metrics().borrow().vote.leader_id().term;
        Some(pb::ResponseHeader { cluster_id: self.cluster_id, member_id: self.node_id, revision, raft_term })
    }

    /// Fills in the cluster, member and term of a header the store made.
    fn complete_header(&self, header: &mut Option<pb::ResponseHeader>) {
        let revision = header.as_ref().map_or_else(|| self.store.revision(), |header| header.revision);
        *header = self.header(revision);
    }

    /// Replicates `command` (through the leader, from a follower) and returns what applying
    /// it produced.
    ///
    /// A key write is answered by whichever comes first: this plane applying it, or the
    /// batcher's answer (the leader's, on a follower), which also carries refusals
    /// ([`capstan_raft::own_proposals`]). Lease grants and revokes wait for the batcher,
    /// which tells the leader's lessor of them before it answers.
    async fn propose(&self, command: Command) -> Result<CommandResponse, Status> {
        let size = command.encoded_len();
        if size > REQUEST_BYTES_MAX {
            return Err(status::request_too_large());
        }
        let key_write = matches!(
            command.request,
            Some(command::Request::Put(_) | command::Request::DeleteRange(_) | command::Request::Txn(_))
        );
        self.with_leader(|| async {
            let mut command = command.clone();
            let own = key_write.then(|| self.own_proposals.register());
            if let Some(own) = &own {
                command.origin = own.origin();
            }
            let answered = self.enqueue(command, true).await?;
            let Some(mut own) = own else { return answered.await.map_err(|_| status::stopped())? };
            tokio::select! {
                biased;
                Ok(response) = &mut own.applied => {
                    self.metrics.proposals_answered_on_apply.inc();
                    Ok(response)
                }
                outcome = answered => outcome.map_err(|_| status::stopped())?,
            }
        })
        .await
    }

    /// Runs `attempt` against the current leader until it succeeds or fails for a reason
    /// other than "not leader" or "leader unreachable" (which mean nothing was done),
    /// waiting for a leader and for leadership to change between tries; gives up with
    /// etcd's timeout error.
    async fn with_leader<T, Attempt, Outcome>(&self, mut attempt: Attempt) -> Result<T, Status>
    where
        Attempt: FnMut() -> Outcome,
        Outcome: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(PROPOSE_TIMEOUT_MS);
        let mut metrics = self.raft.server_metrics();
        loop {
            self.wait_for_leader(deadline).await?;
            metrics.borrow_and_update();
            match tokio::time::timeout_at(deadline, attempt()).await {
                Err(_) => return Err(Status::unavailable(status::TIMEOUT)),
                Ok(Err(refused)) if status::is_retryable_on_leader_change(&refused) => {
                    match tokio::time::timeout_at(deadline, metrics.changed()).await {
                        Err(_) => return Err(Status::unavailable(status::TIMEOUT)),
                        Ok(Err(_)) => return Err(status::stopped()),
                        Ok(Ok(())) => continue,
                    }
                }
                Ok(outcome) => return outcome,
            }
        }
    }

    /// Runs `local` on the leader, or asks the leader with `remote`, through [`with_leader`].
    ///
    /// [`with_leader`]: Plane::with_leader
    async fn on_leader<T, Local, LocalOutcome, Remote, RemoteOutcome>(
        &self,
        local: Local,
        remote: Remote,
    ) -> Result<T, Status>
    where
        Local: Fn() -> LocalOutcome,
        LocalOutcome: std::future::Future<Output = Result<T, Status>>,
        Remote: Fn(forward::LeaderClient) -> RemoteOutcome,
        RemoteOutcome: std::future::Future<Output = Result<T, Status>>,
    {
        self.with_leader(|| async {
            if self.is_leader() {
                local().await
            } else {
                remote(self.leader_client()?).await
            }
        })
        .await
    }

    /// Replicates `command` from this plane, which must lead, batched with whatever else is
    /// being proposed ([`batch`]).
    async fn propose_local(&self, command: Command) -> Result<CommandResponse, Status> {
        self.enqueue(command, false).await?.await.map_err(|_| status::stopped())?
    }

    /// Queues `command` for the batcher; the outcome comes on the returned channel.
    async fn enqueue(
        &self,
        command: Command,
        forwardable: bool,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<CommandResponse, Status>>, Status> {
        if let Some(command::Request::Batch(_)) = command.request {
            return Err(Status::invalid_argument("capstan: batches are made by the leader, not proposed"));
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.proposals.send(batch::Proposal { command, forwardable, answer }).await.map_err(|_| status::stopped())?;
        Ok(answered)
    }

    /// Waits until this plane's state includes every write acknowledged before the call:
    /// the leader confirms it still leads (read-index) and this plane applies up to there.
    async fn linearizable_barrier(&self) -> Result<(), Status> {
        if self.config.unsafe_stale_reads {
            return Ok(());
        }
        self.with_leader(|| async {
            let read_index = self.read_index().await?;
            let mut metrics = self.raft.metrics();
            let applied = |metrics: &openraft::RaftMetrics<NodeId, PeerNode>| {
                metrics.last_applied.is_some_and(|applied| applied.index >= read_index)
            };
            metrics.wait_for(applied).await.map(|_| ()).map_err(|_| status::stopped())
        })
        .await
    }

    /// The log index a linearizable read must wait for, from a read-index round shared with
    /// the reads queued beside it ([`batch::run_reads`]).
    async fn read_index(&self) -> Result<u64, Status> {
        let (waiter, answered) = tokio::sync::oneshot::channel();
        self.reads.send(waiter).await.map_err(|_| status::stopped())?;
        answered.await.map_err(|_| status::stopped())?
    }

    /// One read-index round: the leader confirms its leadership with a quorum; a follower
    /// asks the leader. The leader is read once, so a plane never asks itself; a round whose
    /// leader changes meanwhile ends with "not leader", for its reads to try the next one.
    async fn read_round(&self) -> Result<u64, Status> {
        let (leader, node) = self.leader().ok_or_else(status::not_leader)?;
        let mut metrics = self.raft.server_metrics();
        let deposed = async move {
            let _ = metrics.wait_for(|metrics| metrics.current_leader != Some(leader)).await;
        };
        let round = async {
            if leader != self.node_id {
                return self.forward_read_index(&node.peer_url).await;
            }
            // A quorum that did not answer one heartbeat in time (a slow disk or a loaded
            // machine) may answer the next: try again, at most once a heartbeat interval,
            // until the leader changes or the read times out, as etcd retries ReadIndex.
            let pace = Duration::from_millis(self.config.raft.heartbeat_interval_ms);
            loop {
                let started = tokio::time::Instant::now();
                match self.raft.get_read_log_id().await {
                    Ok((read_log_id, _)) => return Ok(read_log_id.map_or(0, |id| id.index)),
                    Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(short))) => {
                        tracing::debug!(%short, "leadership not confirmed; confirming again");
                        tokio::time::sleep_until(started + pace).await;
                    }
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                        return Err(status::not_leader())
                    }
                    Err(RaftError::Fatal(error)) => {
                        tracing::error!(%error, "raft stopped");
                        return Err(status::stopped());
                    }
                }
            }
        };
        tokio::select! {
            outcome = round => outcome,
            () = deposed => Err(status::not_leader()),
        }
    }

    /// Waits, as etcd does, until the cluster has a leader (for example while the first
    /// election of a new cluster runs), failing with etcd's "no leader" at `deadline`.
    async fn wait_for_leader(&self, deadline: tokio::time::Instant) -> Result<(), Status> {
        let mut metrics = self.raft.server_metrics();
        // A removed leader stays `current_leader` until the next election, but is no longer
        // in the membership: that is no leader to send anything to.
        let has_leader = |metrics: &openraft::metrics::RaftServerMetrics<NodeId, PeerNode>| {
            metrics
                .current_leader
                .is_some_and(|leader| metrics.membership_config.membership().get_node(&leader).is_some())
        };
        let waited = tokio::time::timeout_at(deadline, async { metrics.wait_for(has_leader).await.map(|_| ()) }).await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(status::stopped()),
            Err(_) => Err(Status::unavailable(status::NO_LEADER)),
        }
    }

    /// Refuses writes that would grow the store past its quota, raising NOSPACE as etcd does.
    fn check_quota(&self) -> Result<(), Status> {
        let mut alarms = self.alarms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !alarms.no_space && self.store.size_bytes_recent() > self.config.quota_bytes {
            tracing::warn!(quota_bytes = self.config.quota_bytes, "store is over its quota; raising NOSPACE");
            alarms.no_space = true;
        }
        if alarms.no_space {
            return Err(status::no_space());
        }
        Ok(())
    }
}

/// `--restore`: a new data directory takes a backup's content, checked whole first.
fn restore(store: &Store, backup: &std::path::Path, config: &PlaneConfig) -> anyhow::Result<()> {
    if config.initial_cluster_state == ClusterState::Existing {
        anyhow::bail!(
            "--restore starts a new cluster; it cannot join a running one (--initial-cluster-state existing)"
        );
    }
    let cannot_restore = || format!("cannot restore {}", backup.display());
    if let Some(stored) = capstan_raft::stored_identity(store)? {
        // A restart with the flag still set (a service unit, say) goes on with the
        // restored member; any other backup would overwrite a member's data.
        let digest = capstan_store::check_backup(backup).with_context(cannot_restore)?;
        if capstan_raft::restored_from(store)? == Some(digest) {
            tracing::info!(backup = %backup.display(), "the data directory was restored from this backup already; starting it as it is");
            return Ok(());
        }
        anyhow::bail!(
            "--restore needs a new data directory: {} already holds member {:x} of cluster {:x}, not restored from {} (start it without --restore)",
            config.data_dir.display(),
            stored.node_id,
            stored.cluster_id,
            backup.display()
        );
    }
    capstan_raft::restore_backup(store, backup).with_context(cannot_restore)?;
    tracing::info!(backup = %backup.display(), revision = store.revision(), "restored a backup");
    Ok(())
}

/// How often the in-plane scheduler looks whether auth was turned on or off.
const SCHEDULER_AUTH_CHECK_MS: u64 = 1_000;

/// Runs the plane's scheduler candidate until the plane stops; a leader resigns then, so
/// a standby on another plane takes over without waiting for the lease to expire.
///
/// It is a client of this plane like any other, so once auth is enabled it needs a user
/// (`--scheduler-user`), and with auth disabled etcd refuses to authenticate anyone. So
/// it connects with the user exactly while this plane's auth state says auth is on, and
/// reconnects (resigning first) when that changes.
async fn run_scheduler(plane: Arc<Plane>, config: capstan_scheduler::SchedulerConfig) {
    let mut stopping = plane.stopping.subscribe();
    while !*stopping.borrow() {
        let auth_enabled = plane.store.auth().enabled;
        let Some(client) = connect_scheduler(&plane, auth_enabled, &mut stopping).await else { return };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let scheduler = capstan_scheduler::run(client, config.clone(), &plane.metrics.scheduler, stopped);
        tokio::pin!(scheduler);
        let auth_changed = async {
            while plane.store.auth().enabled == auth_enabled {
                tokio::time::sleep(Duration::from_millis(SCHEDULER_AUTH_CHECK_MS)).await;
            }
        };
        tokio::select! {
            () = &mut scheduler => return,
            _ = stopping.changed() => {}
            () = auth_changed => tracing::info!(auth_enabled = !auth_enabled, "auth changed; the in-plane scheduler reconnects"),
        }
        let _ = stop.send(true);
        scheduler.await;
    }
}

/// A client of this plane for its scheduler, as `--scheduler-user` when `auth_enabled`;
/// None once the plane stops.
async fn connect_scheduler(
    plane: &Plane,
    auth_enabled: bool,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<etcd_client::Client> {
    let own = plane.config.listen_client;
    let loopback = if own.ip().is_unspecified() {
        let ip: std::net::IpAddr =
            if own.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() };
        SocketAddr::new(ip, own.port())
    } else {
        own
    };
    let endpoint = [loopback.to_string()];
    let mut credentials = plane.config.client_tls.as_ref().map(crate::tls::ServerTls::as_client).unwrap_or_default();
    if auth_enabled {
        credentials.user = plane.config.scheduler_user.clone();
        let by_certificate = plane.config.client_tls.as_ref().is_some_and(|tls| tls.client_cert_auth);
        if credentials.user.is_none() && !by_certificate {
            tracing::error!(
                "auth is enabled but the in-plane scheduler has no user: start the plane with --scheduler-user \
                 name:password (or CAPSTAN_SCHEDULER_USER); pods stay unscheduled until then"
            );
        }
    }
    loop {
        match capstan_client::connect_with(&endpoint, Duration::from_secs(5), &credentials).await {
            Ok(client) => return Some(client),
            Err(error) => tracing::warn!(%error, "scheduler cannot reach its plane yet"),
        }
        tokio::select! {
            _ = stopping.changed() => return None,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Starts a plane and serves it until `shutdown` resolves.
pub async fn run(
    config: PlaneConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client_tls = config.client_tls.as_ref().map(crate::tls::ServerTls::server_config).transpose()?;
    let peer_tls = config.peer_tls.as_ref().map(crate::tls::ServerTls::server_config).transpose()?;
    let listener = tokio::net::TcpListener::bind(config.listen_client)
        .await
        .with_context(|| format!("cannot listen for clients on {}", config.listen_client))?;
    let peer_listener = tokio::net::TcpListener::bind(config.listen_peer)
        .await
        .with_context(|| format!("cannot listen for peers on {}", config.listen_peer))?;
    let metrics_listener = match config.listen_metrics {
        Some(address) => Some(crate::http::bind(address).await?),
        None => None,
    };
    let metrics = metrics::PlaneMetrics::default();
    let cannot_start = || format!("cannot start the plane in {}", config.data_dir.display());
    let store = capstan_raft::open_store(config.data_dir.clone()).await.with_context(cannot_start)?;
    // Backups a stopped plane was streaming are of no use now.
    let _ = std::fs::remove_dir_all(config.data_dir.join(maintenance::BACKUP_DIR));
    if let Some(backup) = &config.restore {
        restore(&store, backup, &config)?;
    }
    let identity = config.identity(&store).await?;
    let channels = config.peer_channels()?.with_faults(config.peer_faults.clone());
    let started = capstan_raft::start(
        store,
        config.data_dir.clone(),
        &identity,
        &config.raft,
        channels,
        &metrics.storage,
        config.sync_faults.clone(),
    )
    .await
    .with_context(cannot_start)?;
    let (proposals, queued) = tokio::sync::mpsc::channel(batch::QUEUE_MAX);
    let (reads, queued_reads) = tokio::sync::mpsc::channel(batch::QUEUE_MAX);
    let plane = Arc::new(Plane {
        raft: started.raft.clone(),
        store: started.store,
        events: started.events,
        node_id: identity.node_id,
        cluster_id: identity.cluster_id,
        lessor: lease::Lessor::new(&config.raft),
        proposals,
        own_proposals: started.own_proposals,
        reads,
        config,
        alarms: Mutex::new(Alarms::default()),
        forwarder: forward::Forwarder::new(started.peer_channels, identity.cluster_id),
        identity,
        stop: tokio::sync::Notify::new(),
        stopping: tokio::sync::watch::channel(false).0,
        metrics,
    });
    tracing::info!(
        name = %plane.config.name,
        member_id = format!("{:x}", plane.node_id),
        cluster_id = format!("{:x}", plane.cluster_id),
        client = %plane.config.listen_client,
        revision = plane.store.revision(),
        "plane serving"
    );
    // The plane's background work lives in one set, aborted together when `run` ends or
    // is dropped, so nothing outlives the plane holding its store.
    let mut background = tokio::task::JoinSet::new();
    background.spawn(batch::run(plane.clone(), queued));
    background.spawn(batch::run_reads(plane.clone(), queued_reads));
    background.spawn(lease::run_expiry(plane.clone()));
    background.spawn(log_leadership(plane.raft.clone(), plane.metrics.leader_changes.clone()));
    if let Some(listener) = metrics_listener {
        let routes = metrics::router(plane.clone()).merge(dashboard::router(plane.clone()));
        background.spawn(crate::http::serve(listener, routes, plane.stopping()));
    }
    background.spawn(publish_client_urls(plane.clone()));
    background.spawn(membership::watch_removal(plane.clone()));
    if let Some(mode) = plane.config.auto_compaction {
        background.spawn(compaction::run(plane.clone(), mode));
    }
    if let Some(config) = plane.config.scheduler.clone() {
        background.spawn(run_scheduler(plane.clone(), config));
    }
    let (stop_peers, peers_stopped) = tokio::sync::oneshot::channel::<()>();
    // Ends the peers' pipes (appends to this plane, writes forwarded to it) as it stops.
    let peer_pipes = started.peer_service.stop();
    let peer_routes = grpc::Routes::default()
        .add(
            capstan_proto::raftpb::raft_peer_server::RaftPeerServer::new(started.peer_service)
                .max_decoding_message_size(capstan_raft::network::PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(capstan_raft::network::PEER_MESSAGE_BYTES_MAX),
        )
        .add(
            // Forwarded proposals come a batch at a time.
            capstan_proto::raftpb::plane_peer_server::PlanePeerServer::new(forward::PlanePeerService(
                plane.clone(),
                peer_pipes.clone(),
            ))
            .max_decoding_message_size(capstan_raft::network::PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(usize::MAX),
        );
    // Graceful, so that the connections end with the server and drop their hold on the
    // plane.
    let peers_stopped = async {
        let _ = peers_stopped.await;
    };
    let keepalive = Some(Duration::from_millis(KEEPALIVE_MS));
    let mut peer_task = match peer_tls {
        Some(tls) => tokio::spawn(grpc::serve(
            socket::coalesced(crate::tls::incoming(peer_listener, tls, "peer")),
            peer_routes,
            keepalive,
            peers_stopped,
        )),
        None => tokio::spawn(grpc::serve(
            socket::coalesced(socket::incoming(peer_listener)),
            peer_routes,
            keepalive,
            peers_stopped,
        )),
    };
    // Stopping ends long-lived streams and lets requests in flight finish, for at most a
    // grace period.
    let stop_requested = {
        let plane = plane.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = plane.stop.notified() => {}
            }
            plane.stopping.send_replace(true);
        }
    };
    let grace_over = {
        let stopping = plane.stopping();
        async move {
            stopping.await;
            tokio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)).await;
        }
    };
    tokio::select! {
        () = serve(plane.clone(), listener, client_tls, stop_requested) => {}
        () = grace_over => {
            tracing::warn!(grace_ms = SHUTDOWN_GRACE_MS, "clients still connected after the grace period; stopping anyway");
        }
    }
    background.shutdown().await;
    peer_pipes.stop();
    let _ = stop_peers.send(());
    match tokio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), &mut peer_task).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "peer server task failed"),
        Err(_) => {
            tracing::warn!("peers still connected after the grace period; stopping anyway");
            peer_task.abort();
        }
    }
    let raft_stopped = started.raft.shutdown().await;
    raft_stopped.map_err(|error| anyhow::anyhow!("raft did not stop cleanly: {error}"))?;
    tracing::info!("plane stopped");
    Ok(())
}

/// Makes the membership carry this plane's client URLs (the bootstrap membership has only
/// peer URLs), so MemberList shows them and peers can forward to them.
async fn publish_client_urls(plane: Arc<Plane>) {
    let mut metrics = plane.raft.metrics();
    loop {
        let (leading, published) = {
            let current = metrics.borrow_and_update();
            let published = current.membership_config.membership().get_node(&plane.node_id).cloned();
            (current.current_leader == Some(plane.node_id), published)
        };
        if published.as_ref() == Some(&plane.identity.node) {
            tracing::info!(urls = ?plane.identity.node.client_urls, "client URLs published");
            return;
        }
        if published.is_some() && plane.leader().is_some() {
            let outcome = if leading {
                let update = BTreeMap::from([(plane.node_id, plane.identity.node.clone())]);
                plane
                    .change_members(openraft::ChangeMembers::SetNodes(update), true)
                    .await
                    .map_err(|status| status.message().to_string())
            } else {
                let request = capstan_proto::raftpb::PublishMemberRequest {
                    member_id: plane.node_id,
                    node: Some(capstan_raft::types::peer_to_pb(&plane.identity.node)),
                };
                match plane.leader_client() {
                    Ok(mut client) => {
                        client.publish_member(request).await.map(|_| ()).map_err(|status| status.message().to_string())
                    }
                    Err(status) => Err(status.message().to_string()),
                }
            };
            match outcome {
                Ok(()) => continue,
                Err(error) => tracing::warn!(%error, "could not publish client URLs; will retry"),
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Logs and counts every change of leader, as etcd does ("elected leader", "lost leader").
/// It follows the server metrics, which change with the leader, not with every write.
async fn log_leadership(raft: Raft, leader_changes: prometheus_client::metrics::counter::Counter) {
    let mut metrics = raft.server_metrics();
    let mut known = None;
    loop {
        let (leader, term) = {
            let current = metrics.borrow_and_update();
            (current.current_leader, current.vote.leader_id().term)
        };
        if leader != known {
            match leader {
                Some(leader) => {
                    leader_changes.inc();
                    tracing::info!(leader = format!("{leader:x}"), term, "leader elected")
                }
                None => tracing::warn!(term, "no leader"),
            }
            known = leader;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

async fn serve(
    plane: Arc<Plane>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use capstan_proto::etcdserverpb::{
        auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
        maintenance_server::MaintenanceServer, watch_server::WatchServer,
    };
    macro_rules! limited {
        ($server:expr) => {
            $server.max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX).max_encoding_message_size(usize::MAX)
        };
    }
    let routes = grpc::Routes::measured(plane.metrics.grpc.clone())
        .add(limited!(KvServer::new(kv::KvService(plane.clone()))))
        .add(limited!(WatchServer::new(watch::WatchService(plane.clone()))))
        .add(limited!(LeaseServer::new(lease::LeaseService(plane.clone()))))
        .add(limited!(ClusterServer::new(membership::ClusterService(plane.clone()))))
        .add(limited!(MaintenanceServer::new(maintenance::MaintenanceService(plane.clone()))))
        .add(limited!(AuthServer::new(auth::AuthService(plane))));
    let keepalive = Some(Duration::from_millis(KEEPALIVE_MS));
    match tls {
        Some(tls) => {
            let incoming = socket::coalesced(crate::tls::incoming(listener, tls, "client"));
            grpc::serve(incoming, routes, keepalive, shutdown).await
        }
        None => grpc::serve(socket::coalesced(socket::incoming(listener)), routes, keepalive, shutdown).await,
    }
}
