//! The transport between planes. A single plane has no peers, so nothing here is called
//! yet; replication over the `RaftPeer` gRPC service is the multi-plane work (issue 3) and
//! replaces this with a tonic client per peer.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

use crate::types::{NodeId, PeerNode, TypeConfig};

/// Peers are unreachable until the gRPC transport lands; openraft backs off on
/// `Unreachable` rather than retrying at once.
pub struct NoPeers;

#[derive(Debug, thiserror::Error)]
#[error("plane {0} is unreachable: this build replicates to no peers")]
struct NoTransport(PeerNode);

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeerClient;

    async fn new_client(&mut self, _target: NodeId, node: &PeerNode) -> NoPeerClient {
        NoPeerClient(node.clone())
    }
}

pub struct NoPeerClient(PeerNode);

impl NoPeerClient {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, PeerNode, E> {
        RPCError::Unreachable(Unreachable::new(&NoTransport(self.0.clone())))
    }
}

impl RaftNetwork<TypeConfig> for NoPeerClient {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }
}
