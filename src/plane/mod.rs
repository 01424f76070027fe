//! The plane server: the etcd v3 gRPC API (KV, Watch, Lease, Cluster, Maintenance) served
//! over the Raft-replicated store.
//!
//! Writes become Raft commands (`propose`); linearizable reads confirm leadership through
//! read-index first, serializable reads are local. The leader alone expires leases
//! ([`lease::Lessor`]). Watches read the event channel the state machine feeds and fall
//! back to the store's history when they fall behind ([`watch`]).

mod kv;
mod lease;
mod maintenance;
pub mod status;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Status;

use capstan_proto::etcdserverpb as pb;
use capstan_proto::raftpb::Command;
use capstan_raft::{NodeId, PeerNode, PlaneIdentity, Raft, RaftConfig, RevisionEvents};
use capstan_store::{CommandResponse, Store};

/// etcd's limit on one request (`--max-request-bytes`).
pub const REQUEST_BYTES_MAX: usize = 3 * 512 * 1024;
/// gRPC accepts a little more than a request so that an oversize request gets etcd's
/// "request is too large" rather than a transport error, as in etcd.
pub const GRPC_MESSAGE_BYTES_MAX: usize = REQUEST_BYTES_MAX + 512 * 1024;
/// etcd's default backend quota (`--quota-backend-bytes`).
pub const QUOTA_BYTES_DEFAULT: u64 = 2 << 30;
/// How long a write or read-index waits for Raft before the client gets a timeout.
pub const PROPOSE_TIMEOUT_MS: u64 = 7_000;

/// Everything a plane is started with.
#[derive(Clone, Debug)]
pub struct PlaneConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client: SocketAddr,
    pub listen_peer: SocketAddr,
    pub advertise_client_urls: Vec<String>,
    /// `name=peer-url` of every initial member, this plane included.
    pub initial_cluster: Vec<(String, String)>,
    pub initial_cluster_token: String,
    pub raft: RaftConfig,
    pub quota_bytes: u64,
    /// How often a watch that asked for progress notifications gets one when idle.
    pub watch_progress_notify_interval: Duration,
}

impl PlaneConfig {
    /// A single-plane configuration with etcd's defaults, for `capstan dev` and tests.
    pub fn single(name: &str, data_dir: PathBuf, listen_client: SocketAddr, listen_peer: SocketAddr) -> PlaneConfig {
        PlaneConfig {
            name: name.to_string(),
            data_dir,
            listen_client,
            listen_peer,
            advertise_client_urls: vec![format!("http://{listen_client}")],
            initial_cluster: vec![(name.to_string(), format!("http://{listen_peer}"))],
            initial_cluster_token: "capstan-cluster".to_string(),
            raft: RaftConfig::default(),
            quota_bytes: QUOTA_BYTES_DEFAULT,
            watch_progress_notify_interval: Duration::from_secs(600),
        }
    }

    fn identity(&self) -> anyhow::Result<PlaneIdentity> {
        let token = &self.initial_cluster_token;
        let names: Vec<String> = self.initial_cluster.iter().map(|(name, _)| name.clone()).collect();
        let mut initial_members = BTreeMap::new();
        for (name, peer_url) in &self.initial_cluster {
            let client_urls = if *name == self.name { self.advertise_client_urls.clone() } else { Vec::new() };
            let node = PeerNode { name: name.clone(), peer_url: peer_url.clone(), client_urls };
            if initial_members.insert(capstan_raft::member_id(token, name), node).is_some() {
                anyhow::bail!("--initial-cluster names {name} twice");
            }
        }
        let node_id = capstan_raft::member_id(token, &self.name);
        let node = initial_members
            .get(&node_id)
            .cloned()
            .with_context(|| format!("--initial-cluster does not name this plane ({})", self.name))?;
        Ok(PlaneIdentity { node_id, cluster_id: capstan_raft::cluster_id(token, &names), node, initial_members })
    }
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
    config: PlaneConfig,
    alarms: Mutex<Alarms>,
    lessor: lease::Lessor,
}

impl Plane {
    /// The response header etcd puts on every response.
    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        let raft_term = self.raft.metrics().borrow().current_term;
        Some(pb::ResponseHeader { cluster_id: self.cluster_id, member_id: self.node_id, revision, raft_term })
    }

    /// Fills in the cluster, member and term of a header the store made.
    fn complete_header(&self, header: &mut Option<pb::ResponseHeader>) {
        let revision = header.as_ref().map_or_else(|| self.store.revision(), |header| header.revision);
        *header = self.header(revision);
    }

    /// Replicates `command` and returns what applying it produced.
    async fn propose(&self, command: Command) -> Result<CommandResponse, Status> {
        let size = command.encoded_len();
        if size > REQUEST_BYTES_MAX {
            return Err(status::request_too_large());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(PROPOSE_TIMEOUT_MS);
        self.wait_for_leader(deadline).await?;
        let written = tokio::time::timeout_at(deadline, self.raft.client_write(command))
            .await
            .map_err(|_| Status::unavailable(status::TIMEOUT))?;
        match written {
            Ok(written) => match written.data.result {
                Some(Ok(response)) => Ok(response),
                Some(Err(error)) => Err(status::from_store(&error)),
                None => Err(Status::internal("a command entry applied without a response")),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(Status::unavailable(status::NO_LEADER))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => {
                Err(Status::failed_precondition(error.to_string()))
            }
            Err(RaftError::Fatal(error)) => {
                tracing::error!(%error, "raft stopped");
                Err(Status::unavailable(status::STOPPED))
            }
        }
    }

    /// Waits until this plane's state includes every write acknowledged before the call:
    /// the leader confirms it still leads (read-index) and this plane applies up to there.
    async fn linearizable_barrier(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(PROPOSE_TIMEOUT_MS);
        self.wait_for_leader(deadline).await?;
        match tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await {
            Err(_) => Err(Status::unavailable(status::TIMEOUT)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(_))) => Err(Status::unavailable(status::NO_LEADER)),
            Ok(Err(RaftError::Fatal(error))) => {
                tracing::error!(%error, "raft stopped");
                Err(Status::unavailable(status::STOPPED))
            }
        }
    }

    /// Waits, as etcd does, until the cluster has a leader (for example while the first
    /// election of a new cluster runs), failing with etcd's "no leader" at `deadline`.
    async fn wait_for_leader(&self, deadline: tokio::time::Instant) -> Result<(), Status> {
        let mut metrics = self.raft.metrics();
        let has_leader = |metrics: &openraft::RaftMetrics<NodeId, PeerNode>| metrics.current_leader.is_some();
        let waited = tokio::time::timeout_at(deadline, async { metrics.wait_for(has_leader).await.map(|_| ()) }).await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Status::unavailable(status::STOPPED)),
            Err(_) => Err(Status::unavailable(status::NO_LEADER)),
        }
    }

    /// Refuses writes that would grow the store past its quota, raising NOSPACE as etcd does.
    fn check_quota(&self) -> Result<(), Status> {
        let mut alarms = self.alarms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !alarms.no_space && self.store.size_bytes() > self.config.quota_bytes {
            tracing::warn!(quota_bytes = self.config.quota_bytes, "store is over its quota; raising NOSPACE");
            alarms.no_space = true;
        }
        if alarms.no_space {
            return Err(status::no_space());
        }
        Ok(())
    }
}

/// Starts a plane and serves it until `shutdown` resolves.
pub async fn run(
    config: PlaneConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let identity = config.identity()?;
    let listener = tokio::net::TcpListener::bind(config.listen_client)
        .await
        .with_context(|| format!("cannot listen for clients on {}", config.listen_client))?;
    let started = capstan_raft::start(config.data_dir.clone(), &identity, &config.raft)
        .await
        .with_context(|| format!("cannot start the plane in {}", config.data_dir.display()))?;
    let plane = Arc::new(Plane {
        raft: started.raft.clone(),
        store: started.store,
        events: started.events,
        node_id: identity.node_id,
        cluster_id: identity.cluster_id,
        lessor: lease::Lessor::new(&config.raft),
        config,
        alarms: Mutex::new(Alarms::default()),
    });
    tracing::info!(
        name = %plane.config.name,
        member_id = format!("{:x}", plane.node_id),
        cluster_id = format!("{:x}", plane.cluster_id),
        client = %plane.config.listen_client,
        revision = plane.store.revision(),
        "plane serving"
    );
    let lessor_task = tokio::spawn(lease::run_expiry(plane.clone()));
    let leadership_task = tokio::spawn(log_leadership(plane.raft.clone()));
    let served = serve(plane.clone(), listener, shutdown).await;
    lessor_task.abort();
    leadership_task.abort();
    let raft_stopped = started.raft.shutdown().await;
    served?;
    raft_stopped.map_err(|error| anyhow::anyhow!("raft did not stop cleanly: {error}"))?;
    tracing::info!("plane stopped");
    Ok(())
}

/// Logs every change of leader, as etcd does ("elected leader", "lost leader").
async fn log_leadership(raft: Raft) {
    let mut metrics = raft.metrics();
    let mut known = None;
    loop {
        let (leader, term) = {
            let current = metrics.borrow_and_update();
            (current.current_leader, current.current_term)
        };
        if leader != known {
            match leader {
                Some(leader) => tracing::info!(leader = format!("{leader:x}"), term, "leader elected"),
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
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use capstan_proto::etcdserverpb::{
        cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
        maintenance_server::MaintenanceServer, watch_server::WatchServer,
    };
    macro_rules! limited {
        ($server:expr) => {
            $server.max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX).max_encoding_message_size(usize::MAX)
        };
    }
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(limited!(KvServer::new(kv::KvService(plane.clone()))))
        .add_service(limited!(WatchServer::new(watch::WatchService(plane.clone()))))
        .add_service(limited!(LeaseServer::new(lease::LeaseService(plane.clone()))))
        .add_service(limited!(ClusterServer::new(maintenance::ClusterService(plane.clone()))))
        .add_service(limited!(MaintenanceServer::new(maintenance::MaintenanceService(plane))))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("gRPC server failed")
}
