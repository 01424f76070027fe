//! Followers serve every client request by asking the leader for what only the leader
//! can do: replicate a command, confirm a read index, renew or inspect a lease, change the
//! membership. The leader serves these on its peer address as the `PlanePeer` service.
//!
//! Errors travel as the gRPC status etcd would return, so a client of a follower sees
//! exactly what a client of the leader sees.
//!
//! Writes go to the leader in batches on a pipe (`capstan_raft::pipe`), one per follower
//! and leader: the leader queues each batch's commands in the order the batches came and
//! answers a batch once all its commands are done. Read-index rounds go on a pipe of
//! their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use capstan_proto::etcdserverpb as pb;
use capstan_proto::raftpb::{
    self, plane_peer_client::PlanePeerClient, plane_peer_server::PlanePeer, propose_answer, propose_outcome,
    read_index_answer, Command,
};
use capstan_raft::network::{Fate, PeerChannels, PEER_MESSAGE_BYTES_MAX};
use capstan_raft::pipe::{self, Pipe, PipesByUrl};
use capstan_raft::{NodeId, PeerNode};
use capstan_store::CommandResponse;

use super::{status, Plane};

const CLUSTER_HEADER: &str = "capstan-cluster-id";

type AddCluster = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send + Sync>;
pub type LeaderClient = PlanePeerClient<InterceptedService<Channel, AddCluster>>;

/// How a plane reaches the leader's `PlanePeer` service: the peer channels it shares with
/// Raft, and the cluster header every call carries.
pub struct Forwarder {
    channels: PeerChannels,
    cluster_header: MetadataValue<Ascii>,
    /// The pipes for writes and for read-index rounds to each peer URL that led while
    /// this plane followed.
    proposals: PipesByUrl<ProposeProtocol>,
    reads: PipesByUrl<ReadIndexProtocol>,
}

impl Forwarder {
    pub fn new(channels: PeerChannels, cluster_id: u64) -> Forwarder {
        let cluster_header =
            MetadataValue::try_from(format!("{cluster_id:x}")).expect("hex digits are a valid header value");
        Forwarder { channels, cluster_header, proposals: PipesByUrl::default(), reads: PipesByUrl::default() }
    }
}

/// Forwarded batches and their outcomes as pipe frames (`PlanePeer.ProposeStream`).
pub struct ProposeProtocol;

capstan_raft::pipe_protocol!(
    ProposeProtocol: raftpb::ProposeRequest => raftpb::ProposeResponse,
    raftpb::ProposeFrame,
    raftpb::ProposeAnswer,
    propose_answer
);

/// Read-index rounds and their indexes as pipe frames (`PlanePeer.ReadIndexStream`).
pub struct ReadIndexProtocol;

capstan_raft::pipe_protocol!(
    ReadIndexProtocol: raftpb::ReadIndexRequest => raftpb::ReadIndexResponse,
    raftpb::ReadIndexFrame,
    raftpb::ReadIndexAnswer,
    read_index_answer
);

impl Plane {
    /// The leader's ID and node, if there is a leader.
    pub(super) fn leader(&self) -> Option<(NodeId, PeerNode)> {
        let metrics = self.raft.server_metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        let node = metrics.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, node))
    }

    pub(super) fn is_leader(&self) -> bool {
        self.raft.server_metrics().borrow().current_leader == Some(self.node_id)
    }

    /// A client of the leader's `PlanePeer` service.
    pub(super) fn leader_client(&self) -> Result<LeaderClient, Status> {
        // The leader just went away: "not leader" has the caller wait for the next one.
        let (_, node) = self.leader().ok_or_else(status::not_leader)?;
        self.peer_client(&node.peer_url)
    }

    /// A client of the `PlanePeer` service at `peer_url`, carrying this cluster's ID.
    pub(super) fn peer_client(&self, peer_url: &str) -> Result<LeaderClient, Status> {
        let channel = self
            .forwarder
            .channels
            .channel(peer_url)
            .map_err(|error| Status::internal(format!("bad peer URL {peer_url}: {error}")))?;
        let cluster = self.forwarder.cluster_header.clone();
        let (channels, peer_url) = (self.forwarder.channels.clone(), peer_url.to_string());
        let add_cluster: AddCluster = Box::new(move |mut request: Request<()>| {
            injected_loss(&channels, &peer_url)?;
            request.metadata_mut().insert(CLUSTER_HEADER, cluster.clone());
            Ok(request)
        });
        // A forwarded batch is larger than any one request, and answers as large as any.
        Ok(PlanePeerClient::with_interceptor(channel, add_cluster)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_decoding_message_size(usize::MAX))
    }

    /// Has the leader replicate `commands`, a batch of this plane's; returns each one's
    /// outcome, in order, or the error of the whole call.
    pub(super) async fn forward_propose(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<Result<CommandResponse, Status>>, Status> {
        let (_, leader) = self.leader().ok_or_else(status::not_leader)?;
        let url = &leader.peer_url;
        let pipe = self.forwarder.proposals.get(url, || {
            let mut client = self.peer_client(url)?;
            Ok(Pipe::open(|frames| async move { client.propose_stream(frames).await }))
        })?;
        injected_loss(&self.forwarder.channels, url)?;
        let answer = pipe.call(raftpb::ProposeRequest { commands }).await?;
        Ok(answer.outcomes.into_iter().map(outcome_from_pb).collect())
    }

    /// The log index the leader (at `leader_peer_url`) says a linearizable read must wait for.
    pub(super) async fn forward_read_index(&self, leader_peer_url: &str) -> Result<u64, Status> {
        let pipe = self.forwarder.reads.get(leader_peer_url, || {
            let mut client = self.peer_client(leader_peer_url)?;
            Ok(Pipe::open(|frames| async move { client.read_index_stream(frames).await }))
        })?;
        injected_loss(&self.forwarder.channels, leader_peer_url)?;
        Ok(pipe.call(raftpb::ReadIndexRequest {}).await?.read_index)
    }

    /// Refuses, with "not leader", what only the leader may do.
    fn require_leader(&self) -> Result<(), Status> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(status::not_leader())
        }
    }
}

/// Injected faults (tests only) lose forwarded requests, a call or a pipe's frame; delays
/// apply to Raft alone.
fn injected_loss(channels: &PeerChannels, peer_url: &str) -> Result<(), Status> {
    match channels.fate(peer_url) {
        Fate::Drop | Fate::DropResponse => Err(Status::unavailable("injected fault: request lost")),
        Fate::Deliver | Fate::Delay(_) => Ok(()),
    }
}

fn outcome_to_pb(outcome: Result<CommandResponse, Status>) -> raftpb::ProposeOutcome {
    use propose_outcome::Outcome;
    let outcome = match outcome {
        Ok(CommandResponse::Put(response)) => Outcome::Put(response),
        Ok(CommandResponse::DeleteRange(response)) => Outcome::DeleteRange(response),
        Ok(CommandResponse::Txn(response)) => Outcome::Txn(response),
        Ok(CommandResponse::Compaction(response)) => Outcome::Compaction(response),
        Ok(CommandResponse::LeaseGrant(response)) => Outcome::LeaseGrant(response),
        Ok(CommandResponse::LeaseRevoke(response)) => Outcome::LeaseRevoke(response),
        Ok(CommandResponse::Auth(header)) => Outcome::Auth(header.unwrap_or_default()),
        Err(refused) => Outcome::Refused(pipe::refusal(&refused)),
    };
    raftpb::ProposeOutcome { outcome: Some(outcome) }
}

fn outcome_from_pb(outcome: raftpb::ProposeOutcome) -> Result<CommandResponse, Status> {
    use propose_outcome::Outcome;
    match outcome.outcome.ok_or_else(|| Status::internal("the leader sent an empty propose outcome"))? {
        Outcome::Put(response) => Ok(CommandResponse::Put(response)),
        Outcome::DeleteRange(response) => Ok(CommandResponse::DeleteRange(response)),
        Outcome::Txn(response) => Ok(CommandResponse::Txn(response)),
        Outcome::Compaction(response) => Ok(CommandResponse::Compaction(response)),
        Outcome::LeaseGrant(response) => Ok(CommandResponse::LeaseGrant(response)),
        Outcome::LeaseRevoke(response) => Ok(CommandResponse::LeaseRevoke(response)),
        Outcome::Auth(header) => Ok(CommandResponse::Auth(Some(header))),
        Outcome::Refused(refusal) => Err(pipe::refused(refusal)),
    }
}

/// The leader's side of forwarding; the `Stop` ends its pipes.
pub struct PlanePeerService(pub Arc<Plane>, pub pipe::Stop);

/// Queues a forwarded batch's commands on the leader, in order; the future returned
/// answers the batch once each command is done.
async fn take_batch(
    plane: Arc<Plane>,
    batch: raftpb::ProposeRequest,
) -> Result<impl std::future::Future<Output = Result<raftpb::ProposeResponse, Status>> + use<>, Status> {
    plane.require_leader()?;
    // Every command joins the leader's queue before any is awaited, so that they batch
    // with each other and with the leader's own.
    let mut queued = Vec::with_capacity(batch.commands.len());
    for command in batch.commands {
        queued.push(plane.enqueue(command, false).await);
    }
    Ok(async move {
        let mut outcomes = Vec::with_capacity(queued.len());
        for queued in queued {
            let outcome = match queued {
                Ok(answered) => answered.await.unwrap_or_else(|_| Err(status::stopped())),
                Err(refused) => Err(refused),
            };
            outcomes.push(outcome_to_pb(outcome));
        }
        Ok(raftpb::ProposeResponse { outcomes })
    })
}

/// Serves a forwarded membership request, which only the leader may do.
macro_rules! leader_only {
    ($service:expr, $request:expr, $local:ident) => {{
        $service.check_cluster(&$request)?;
        $service.0.require_leader()?;
        Ok(Response::new($service.0.$local(&$request.into_inner()).await?))
    }};
}

impl PlanePeerService {
    fn check_cluster<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let ours = &self.0.forwarder.cluster_header;
        let theirs = request.metadata().get(CLUSTER_HEADER);
        if theirs != Some(ours) {
            return Err(Status::failed_precondition(format!(
                "cluster ID mismatch: the request is for cluster {theirs:?}, this plane belongs to {ours:?}"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl PlanePeer for PlanePeerService {
    type ProposeStreamStream = tokio_stream::wrappers::ReceiverStream<Result<raftpb::ProposeAnswer, Status>>;

    async fn propose_stream(
        &self,
        request: Request<tonic::Streaming<raftpb::ProposeFrame>>,
    ) -> Result<Response<Self::ProposeStreamStream>, Status> {
        self.check_cluster(&request)?;
        let plane = self.0.clone();
        let take = move |batch| take_batch(plane.clone(), batch);
        Ok(Response::new(pipe::serve::<ProposeProtocol, _, _, _>(request.into_inner(), &self.1, take)))
    }

    type ReadIndexStreamStream = tokio_stream::wrappers::ReceiverStream<Result<raftpb::ReadIndexAnswer, Status>>;

    async fn read_index_stream(
        &self,
        request: Request<tonic::Streaming<raftpb::ReadIndexFrame>>,
    ) -> Result<Response<Self::ReadIndexStreamStream>, Status> {
        self.check_cluster(&request)?;
        let plane = self.0.clone();
        // Each round is answered beside the others: they share the leader's rounds.
        let take = move |_: raftpb::ReadIndexRequest| {
            let plane = plane.clone();
            async move {
                plane.require_leader()?;
                Ok(async move { Ok(raftpb::ReadIndexResponse { read_index: plane.read_index().await? }) })
            }
        };
        Ok(Response::new(pipe::serve::<ReadIndexProtocol, _, _, _>(request.into_inner(), &self.1, take)))
    }

    async fn lease_keep_alive(
        &self,
        request: Request<pb::LeaseKeepAliveRequest>,
    ) -> Result<Response<pb::LeaseKeepAliveResponse>, Status> {
        self.check_cluster(&request)?;
        self.0.require_leader()?;
        let id = request.into_inner().id;
        let ttl = self.0.keep_alive_local(id)?;
        Ok(Response::new(pb::LeaseKeepAliveResponse { header: self.0.header(self.0.store.revision()), id, ttl }))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        self.check_cluster(&request)?;
        self.0.require_leader()?;
        Ok(Response::new(self.0.time_to_live_local(&request.into_inner())?))
    }

    async fn publish_member(
        &self,
        request: Request<raftpb::PublishMemberRequest>,
    ) -> Result<Response<raftpb::Empty>, Status> {
        self.check_cluster(&request)?;
        self.0.require_leader()?;
        let request = request.into_inner();
        let node = request.node.ok_or_else(|| Status::invalid_argument("publish without a node"))?;
        let update = BTreeMap::from([(request.member_id, capstan_raft::types::peer_from_pb(node))]);
        self.0.change_members(openraft::ChangeMembers::SetNodes(update), true).await?;
        Ok(Response::new(raftpb::Empty {}))
    }

    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        leader_only!(self, request, member_add_local)
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        leader_only!(self, request, member_remove_local)
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        leader_only!(self, request, member_update_local)
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        leader_only!(self, request, member_promote_local)
    }

    async fn cluster_info(
        &self,
        _request: Request<raftpb::ClusterInfoRequest>,
    ) -> Result<Response<raftpb::ClusterInfoResponse>, Status> {
        Ok(Response::new(raftpb::ClusterInfoResponse { cluster_id: self.0.cluster_id, members: self.0.members() }))
    }

    async fn member_removed(
        &self,
        request: Request<raftpb::MemberRemovedRequest>,
    ) -> Result<Response<raftpb::Empty>, Status> {
        self.check_cluster(&request)?;
        let member_id = request.into_inner().member_id;
        if member_id != self.0.node_id {
            return Err(Status::invalid_argument(format!(
                "member {member_id:x} was removed, this plane is member {:x}",
                self.0.node_id
            )));
        }
        self.0.removed_from_cluster();
        Ok(Response::new(raftpb::Empty {}))
    }
}
