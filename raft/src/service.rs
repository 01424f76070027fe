//! The server side of the Raft transport: the `RaftPeer` gRPC service a plane serves on its
//! peer address. Requests from another cluster or for another member, or that do not
//! decode, are refused with a clear status; nothing a peer sends can panic the plane.
//!
//! A leader's AppendEntries come on a pipe (`pipe`): each is handed to Raft in the order
//! sent, and answered once the log is durable up to its entries, the durability waits
//! side by side.

use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::storage::Snapshot;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use capstan_proto::raftpb::{self, raft_peer_server::RaftPeer};

use crate::error::DecodeError;
use crate::log_store::{Appends, Durability};
use crate::network::AppendProtocol;
use crate::pipe;
use crate::snapshot::SnapshotData;
use crate::types::{self, NodeId, Raft};

#[derive(Clone)]
pub struct PeerService {
    raft: Raft,
    cluster_id: u64,
    member_id: NodeId,
    /// How far the plane's log is durable: openraft hears of appends before they are
    /// (`log_store`), and a follower's answer must not claim entries before they are.
    durability: Durability,
    /// How often the log was truncated, so that an answer does not claim entries that
    /// another leader's replaced at the same index before the sync.
    appends: Appends,
    /// Ends the append pipes when the plane stops serving its peers.
    stop: pipe::Stop,
}

impl PeerService {
    pub fn new(
        raft: Raft,
        cluster_id: u64,
        member_id: NodeId,
        durability: Durability,
        appends: Appends,
    ) -> PeerService {
        PeerService { raft, cluster_id, member_id, durability, appends, stop: pipe::Stop::default() }
    }

    /// What ends the pipes this service serves.
    pub fn stop(&self) -> pipe::Stop {
        self.stop.clone()
    }

    /// Refuses a request of another cluster, or one meant for another member: a peer
    /// configured with this plane's URL for another member would otherwise feed it that
    /// member's Raft messages.
    fn check_target(&self, cluster_id: u64, member_id: NodeId) -> Result<(), Status> {
        if cluster_id != self.cluster_id {
            tracing::warn!(
                theirs = format!("{cluster_id:x}"),
                ours = format!("{:x}", self.cluster_id),
                "refused a peer of another cluster"
            );
            return Err(Status::failed_precondition(format!(
                "cluster ID mismatch: the request is for cluster {cluster_id:x}, this plane belongs to {:x}",
                self.cluster_id
            )));
        }
        if member_id != self.member_id {
            tracing::warn!(
                theirs = format!("{member_id:x}"),
                ours = format!("{:x}", self.member_id),
                "refused a peer message for another member; check the peer URLs in --initial-cluster"
            );
            return Err(Status::failed_precondition(format!(
                "member ID mismatch: the request is for member {member_id:x}, this plane is {:x}",
                self.member_id
            )));
        }
        Ok(())
    }
}

fn malformed(error: DecodeError) -> Status {
    Status::invalid_argument(format!("malformed raft message: {error}"))
}

fn raft_status<E: std::error::Error>(error: RaftError<NodeId, E>) -> Status {
    Status::unavailable(format!("raft: {error}"))
}

impl PeerService {
    /// Hands one AppendEntries to Raft; the future it returns answers it, once the log is
    /// durable as far as the answer claims.
    async fn append(
        &self,
        request: raftpb::AppendEntriesRequest,
    ) -> Result<impl std::future::Future<Output = Result<raftpb::AppendEntriesResponse, Status>> + use<>, Status> {
        self.check_target(request.cluster_id, request.member_id)?;
        let vote =
            request.vote.as_ref().map(types::vote_from_pb).ok_or(DecodeError::Missing("vote")).map_err(malformed)?;
        let entries =
            request.entries.into_iter().map(types::entry_from_pb).collect::<Result<Vec<_>, _>>().map_err(malformed)?;
        let prev_log_id = request.prev_log_id.as_ref().map(types::log_id_from_pb);
        // A success says the log matches the leader's up to the last entry sent (or up to
        // `prev_log_id`, if none were), which the leader may count toward a commit.
        let matching = entries.last().map(|entry| entry.log_id).or(prev_log_id);
        let rpc = AppendEntriesRequest {
            vote,
            prev_log_id,
            entries,
            leader_commit: request.leader_commit.as_ref().map(types::log_id_from_pb),
        };
        let truncations = self.appends.truncations();
        let response = self.raft.append_entries(rpc).await.map_err(raft_status)?;
        let (mut durability, appends) = (self.durability.clone(), self.appends.clone());
        Ok(async move {
            if let (AppendEntriesResponse::Success, Some(matching)) = (&response, matching) {
                durability
                    .until(matching.index)
                    .await
                    .map_err(|error| Status::unavailable(format!("the log is not durable: {error}")))?;
                // Durable up to the index, but a truncation meanwhile (this request's own, or
                // a newer leader's) may have put other entries there: the leader sends it again.
                if appends.truncations() != truncations {
                    return Err(Status::unavailable(
                        "the log was truncated while this append was synced; send it again",
                    ));
                }
            }
            Ok(types::append_response_to_pb(&response))
        })
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    type AppendStreamStream = ReceiverStream<Result<raftpb::AppendAnswer, Status>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<raftpb::AppendFrame>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        // Shared by the stream's frames, each of which holds it until answered.
        let service = std::sync::Arc::new(self.clone());
        let take = move |request| {
            let service = service.clone();
            async move { service.append(request).await }
        };
        Ok(Response::new(pipe::serve::<AppendProtocol, _, _, _>(request.into_inner(), &self.stop, take)))
    }

    async fn vote(&self, request: Request<raftpb::VoteRequest>) -> Result<Response<raftpb::VoteResponse>, Status> {
        let request = request.into_inner();
        self.check_target(request.cluster_id, request.member_id)?;
        let rpc = types::vote_request_from_pb(request).map_err(malformed)?;
        let response = self.raft.vote(rpc).await.map_err(raft_status)?;
        Ok(Response::new(types::vote_response_to_pb(&response)))
    }

    /// Receives a whole snapshot, checks it arrived whole, and has Raft install it (which
    /// it does only for a leader whose vote is current).
    async fn install_snapshot(
        &self,
        request: Request<Streaming<raftpb::SnapshotChunk>>,
    ) -> Result<Response<raftpb::InstallSnapshotResponse>, Status> {
        use raftpb::snapshot_chunk::Part;
        let mut chunks = request.into_inner();
        let Some(Part::Header(header)) = chunks.message().await?.and_then(|chunk| chunk.part) else {
            return Err(malformed(DecodeError::Missing("snapshot header")));
        };
        self.check_target(header.cluster_id, header.member_id)?;
        let vote =
            header.vote.as_ref().map(types::vote_from_pb).ok_or(DecodeError::Missing("vote")).map_err(malformed)?;
        let meta = types::snapshot_meta_from_pb(header.meta.ok_or(DecodeError::Missing("meta")).map_err(malformed)?);
        let data = self.raft.begin_receiving_snapshot().await.map_err(raft_status)?;
        let SnapshotData::Received(mut received) = *data else {
            return Err(Status::internal("the state machine gave no file to receive a snapshot in"));
        };
        while let Some(chunk) = chunks.message().await? {
            match chunk.part {
                Some(Part::Data(data)) => received
                    .write(&data)
                    .await
                    .map_err(|error| Status::internal(format!("cannot write the snapshot arriving: {error}")))?,
                _ => return Err(malformed(DecodeError::Missing("snapshot data after the header"))),
            }
        }
        received.finish().await.map_err(|error| Status::data_loss(format!("the snapshot arrived damaged: {error}")))?;
        let snapshot = Snapshot { meta, snapshot: Box::new(SnapshotData::Received(received)) };
        let response = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|error| Status::unavailable(format!("raft: {error}")))?;
        Ok(Response::new(raftpb::InstallSnapshotResponse { vote: Some(types::vote_to_pb(&response.vote)) }))
    }
}
