//! openraft's type configuration for Capstan, and the conversions between openraft's types
//! and their protobuf form (`capstan_proto::raftpb`), which is what goes to disk and over
//! the wire.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use capstan_proto::raftpb;
use openraft::raft::{AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{EntryPayload, LeaderId, LogId, Membership, StoredMembership, Vote};

use crate::error::DecodeError;

openraft::declare_raft_types!(
    /// Capstan's Raft: commands are etcd write requests, node IDs are etcd member IDs.
    pub TypeConfig:
        D = raftpb::Command,
        R = Response,
        NodeId = NodeId,
        Node = PeerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::snapshot::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A plane's Raft node ID, which is also its etcd member ID.
pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// What applying one log entry returns to the proposer.
#[derive(Debug)]
pub struct Response {
    /// The command's response, or the error its client gets; `None` for entries that carry
    /// no command (blank and membership entries).
    pub result: Option<capstan_store::Result<capstan_store::CommandResponse>>,
    /// For a batch entry: each command's response, in order (`result` is then `None`).
    pub batch: Vec<capstan_store::Result<capstan_store::CommandResponse>>,
    /// The store's revision after the entry.
    pub revision: i64,
}

/// What a plane tells its peers about itself: etcd's member name and URLs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerNode {
    pub name: String,
    pub peer_url: String,
    pub client_urls: Vec<String>,
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_url)
    }
}

/// The member ID of a plane named `name` in the cluster named `cluster_token`: stable,
/// never zero (etcd treats zero as "none").
pub fn member_id(cluster_token: &str, name: &str) -> NodeId {
    fnv1a64(format!("{cluster_token}/{name}").as_bytes()).max(1)
}

/// An ID for a member added to a running cluster, as etcd makes one: from the cluster, the
/// member's peer URLs and the time, so that re-adding the same URLs later gives a new ID.
pub fn new_member_id(cluster_id: u64, peer_urls: &[String], unix_nanos: u128) -> NodeId {
    fnv1a64(format!("{cluster_id:x}|{}|{unix_nanos}", peer_urls.join(",")).as_bytes()).max(1)
}

/// The cluster ID of the cluster named `cluster_token` whose first members are `names`.
pub fn cluster_id(cluster_token: &str, names: &[String]) -> u64 {
    let mut sorted = names.to_vec();
    sorted.sort();
    fnv1a64(format!("{cluster_token}|{}", sorted.join(",")).as_bytes()).max(1)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

pub fn log_id_to_pb(log_id: &LogId<NodeId>) -> raftpb::LogId {
    raftpb::LogId { term: log_id.leader_id.term, node_id: log_id.leader_id.node_id, index: log_id.index }
}

pub fn log_id_from_pb(log_id: &raftpb::LogId) -> LogId<NodeId> {
    LogId::new(LeaderId::new(log_id.term, log_id.node_id), log_id.index)
}

pub fn vote_to_pb(vote: &Vote<NodeId>) -> raftpb::Vote {
    raftpb::Vote { term: vote.leader_id.term, node_id: vote.leader_id.node_id, committed: vote.committed }
}

pub fn vote_from_pb(vote: &raftpb::Vote) -> Vote<NodeId> {
    if vote.committed {
        Vote::new_committed(vote.term, vote.node_id)
    } else {
        Vote::new(vote.term, vote.node_id)
    }
}

pub fn peer_to_pb(node: &PeerNode) -> raftpb::PeerNode {
    raftpb::PeerNode { name: node.name.clone(), peer_url: node.peer_url.clone(), client_urls: node.client_urls.clone() }
}

pub fn peer_from_pb(node: raftpb::PeerNode) -> PeerNode {
    PeerNode { name: node.name, peer_url: node.peer_url, client_urls: node.client_urls }
}

pub fn membership_to_pb(membership: &Membership<NodeId, PeerNode>) -> raftpb::Membership {
    raftpb::Membership {
        configs: membership
            .get_joint_config()
            .iter()
            .map(|ids| raftpb::NodeIdSet { ids: ids.iter().copied().collect() })
            .collect(),
        nodes: membership.nodes().map(|(id, node)| (*id, peer_to_pb(node))).collect(),
    }
}

pub fn membership_from_pb(membership: raftpb::Membership) -> Membership<NodeId, PeerNode> {
    let configs: Vec<BTreeSet<NodeId>> =
        membership.configs.into_iter().map(|set| set.ids.into_iter().collect()).collect();
    let nodes: BTreeMap<NodeId, PeerNode> =
        membership.nodes.into_iter().map(|(id, node)| (id, peer_from_pb(node))).collect();
    Membership::new(configs, nodes)
}

pub fn stored_membership_to_pb(stored: &StoredMembership<NodeId, PeerNode>) -> raftpb::StoredMembership {
    raftpb::StoredMembership {
        log_id: stored.log_id().as_ref().map(log_id_to_pb),
        membership: Some(membership_to_pb(stored.membership())),
    }
}

pub fn stored_membership_from_pb(stored: raftpb::StoredMembership) -> StoredMembership<NodeId, PeerNode> {
    StoredMembership::new(
        stored.log_id.as_ref().map(log_id_from_pb),
        membership_from_pb(stored.membership.unwrap_or_default()),
    )
}

/// Takes the entry, so that its command (a batch of up to hundreds) is moved, not copied.
pub fn entry_into_pb(entry: Entry) -> raftpb::Entry {
    use raftpb::entry::Payload;
    let payload = match entry.payload {
        EntryPayload::Blank => Payload::Blank(raftpb::Empty {}),
        EntryPayload::Normal(command) => Payload::Command(command),
        EntryPayload::Membership(membership) => Payload::Membership(membership_to_pb(&membership)),
    };
    raftpb::Entry { log_id: Some(log_id_to_pb(&entry.log_id)), payload: Some(payload) }
}

pub fn entry_from_pb(entry: raftpb::Entry) -> Result<Entry, DecodeError> {
    use raftpb::entry::Payload;
    let log_id = entry.log_id.as_ref().map(log_id_from_pb).ok_or(DecodeError::Missing("entry.log_id"))?;
    let payload = match entry.payload.ok_or(DecodeError::Missing("entry.payload"))? {
        Payload::Blank(_) => EntryPayload::Blank,
        Payload::Command(command) => EntryPayload::Normal(command),
        Payload::Membership(membership) => EntryPayload::Membership(membership_from_pb(membership)),
    };
    Ok(Entry { log_id, payload })
}

pub fn snapshot_meta_to_pb(meta: &openraft::SnapshotMeta<NodeId, PeerNode>) -> raftpb::SnapshotMeta {
    raftpb::SnapshotMeta {
        last_log_id: meta.last_log_id.as_ref().map(log_id_to_pb),
        last_membership: Some(stored_membership_to_pb(&meta.last_membership)),
        snapshot_id: meta.snapshot_id.clone(),
    }
}

pub fn snapshot_meta_from_pb(meta: raftpb::SnapshotMeta) -> openraft::SnapshotMeta<NodeId, PeerNode> {
    openraft::SnapshotMeta {
        last_log_id: meta.last_log_id.as_ref().map(log_id_from_pb),
        last_membership: stored_membership_from_pb(meta.last_membership.unwrap_or_default()),
        snapshot_id: meta.snapshot_id,
    }
}

pub fn append_response_to_pb(response: &AppendEntriesResponse<NodeId>) -> raftpb::AppendEntriesResponse {
    use raftpb::append_entries_response::Result as Outcome;
    let result = match response {
        AppendEntriesResponse::Success => Outcome::Success(raftpb::Empty {}),
        AppendEntriesResponse::PartialSuccess(matching) => {
            Outcome::PartialSuccess(raftpb::PartialSuccess { matching: matching.as_ref().map(log_id_to_pb) })
        }
        AppendEntriesResponse::Conflict => Outcome::Conflict(raftpb::Empty {}),
        AppendEntriesResponse::HigherVote(vote) => Outcome::HigherVote(vote_to_pb(vote)),
    };
    raftpb::AppendEntriesResponse { result: Some(result) }
}

pub fn append_response_from_pb(
    response: raftpb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<NodeId>, DecodeError> {
    use raftpb::append_entries_response::Result as Outcome;
    Ok(match response.result.ok_or(DecodeError::Missing("append_entries_response.result"))? {
        Outcome::Success(_) => AppendEntriesResponse::Success,
        Outcome::PartialSuccess(partial) => {
            AppendEntriesResponse::PartialSuccess(partial.matching.as_ref().map(log_id_from_pb))
        }
        Outcome::Conflict(_) => AppendEntriesResponse::Conflict,
        Outcome::HigherVote(vote) => AppendEntriesResponse::HigherVote(vote_from_pb(&vote)),
    })
}

pub fn vote_request_to_pb(cluster_id: u64, member_id: NodeId, request: &VoteRequest<NodeId>) -> raftpb::VoteRequest {
    raftpb::VoteRequest {
        cluster_id,
        member_id,
        vote: Some(vote_to_pb(&request.vote)),
        last_log_id: request.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub fn vote_request_from_pb(request: raftpb::VoteRequest) -> Result<VoteRequest<NodeId>, DecodeError> {
    let vote = request.vote.as_ref().map(vote_from_pb).ok_or(DecodeError::Missing("vote_request.vote"))?;
    Ok(VoteRequest { vote, last_log_id: request.last_log_id.as_ref().map(log_id_from_pb) })
}

pub fn vote_response_to_pb(response: &VoteResponse<NodeId>) -> raftpb::VoteResponse {
    raftpb::VoteResponse {
        vote: Some(vote_to_pb(&response.vote)),
        vote_granted: response.vote_granted,
        last_log_id: response.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub fn vote_response_from_pb(response: raftpb::VoteResponse) -> Result<VoteResponse<NodeId>, DecodeError> {
    let vote = response.vote.as_ref().map(vote_from_pb).ok_or(DecodeError::Missing("vote_response.vote"))?;
    Ok(VoteResponse {
        vote,
        vote_granted: response.vote_granted,
        last_log_id: response.last_log_id.as_ref().map(log_id_from_pb),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_protobuf() {
        let nodes =
            BTreeMap::from([(7, PeerNode { name: "a".into(), peer_url: "http://a".into(), client_urls: vec![] })]);
        let membership = Membership::new(vec![BTreeSet::from([7])], nodes);
        let entries = [
            Entry { log_id: LogId::new(LeaderId::new(3, 7), 10), payload: EntryPayload::Blank },
            Entry { log_id: LogId::new(LeaderId::new(3, 7), 11), payload: EntryPayload::Membership(membership) },
            Entry {
                log_id: LogId::new(LeaderId::new(4, 7), 12),
                payload: EntryPayload::Normal(raftpb::Command {
                    request: Some(raftpb::command::Request::Compaction(Default::default())),
                    caller: None,
                    origin: 0,
                }),
            },
        ];
        for entry in entries {
            let back = entry_from_pb(entry_into_pb(entry.clone())).unwrap();
            assert_eq!(format!("{back:?}"), format!("{entry:?}"));
        }
    }

    #[test]
    fn an_entry_without_payload_is_an_error() {
        assert!(entry_from_pb(raftpb::Entry { log_id: Some(Default::default()), payload: None }).is_err());
        assert!(entry_from_pb(raftpb::Entry { log_id: None, payload: None }).is_err());
    }

    #[test]
    fn member_ids_are_stable_and_never_zero() {
        assert_eq!(member_id("t", "a"), member_id("t", "a"));
        assert_ne!(member_id("t", "a"), member_id("t", "b"));
        assert_ne!(member_id("t", "a"), 0);
    }
}
