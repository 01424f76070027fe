//! etcd's Cluster service: list, add, promote, update and remove members.
//!
//! Only the leader changes the membership; a follower forwards the etcd request to it over
//! `PlanePeer`. A member is added under a fresh ID with only its peer URL; when its plane
//! starts with `--initial-cluster-state existing` it asks a running member for the
//! cluster ([`join`]), finds itself by that peer URL, and the leader brings it up to date
//! (by snapshot when the log it needs is purged). Once running it publishes its name and
//! client URLs. A removed member is told so by the leader (or sees itself gone from the
//! membership), marks its data directory and stops serving.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use tonic::{Request, Response, Status};

use capstan_proto::etcdserverpb::{self as pb, cluster_server::Cluster};
use capstan_proto::raftpb;
use capstan_raft::{NodeId, PeerNode, PlaneIdentity};

use super::{status, Plane, PlaneConfig};

/// etcd's default `--max-learners`.
pub const LEARNERS_MAX: usize = 1;
/// A learner may be promoted once it has this share (in tenths) of the leader's log, as in etcd.
const PROMOTE_MATCH_TENTHS: u64 = 9;
/// How long a joining plane keeps asking the members it was given for the cluster.
const JOIN_TIMEOUT_MS: u64 = 60_000;
/// How long the leader waits for a removed member to hear that it was removed.
const NOTIFY_REMOVED_TIMEOUT_MS: u64 = 2_000;

const MEMBER_NOT_FOUND: &str = "etcdserver: member not found";

fn member_not_found() -> Status {
    Status::not_found(MEMBER_NOT_FOUND)
}

pub struct ClusterService(pub Arc<Plane>);

impl Plane {
    /// The members as etcd lists them, voters and learners alike.
    pub(super) fn members(&self) -> Vec<pb::Member> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership.nodes().map(|(id, node)| member_to_pb(*id, node, !voters.contains(id))).collect()
    }

    /// Applies a membership change from the leader, waiting while another change is in
    /// progress (Raft changes membership one step at a time).
    pub(super) async fn change_members(
        &self,
        changes: ChangeMembers<NodeId, PeerNode>,
        retain: bool,
    ) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(super::PROPOSE_TIMEOUT_MS);
        let mut metrics = self.raft.metrics();
        loop {
            metrics.borrow_and_update();
            // In a task of its own: openraft commits a joint configuration, then the final
            // one, from this call; a caller that gave up must not leave the cluster joint.
            let raft = self.raft.clone();
            let change = changes.clone();
            let changed = tokio::spawn(async move { raft.change_membership(change, retain).await })
                .await
                .map_err(|error| Status::internal(format!("a membership change task failed: {error}")))?;
            match changed {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => return Err(status::not_leader()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) => membership_applied(&mut metrics, deadline).await?,
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => {
                    return Err(Status::failed_precondition(format!("etcdserver: {error}")))
                }
                Err(RaftError::Fatal(error)) => {
                    tracing::error!(%error, "raft stopped");
                    return Err(status::stopped());
                }
            }
        }
    }

    pub(super) async fn member_add_local(
        &self,
        request: &pb::MemberAddRequest,
    ) -> Result<pb::MemberAddResponse, Status> {
        let peer_url = single_peer_url(&request.peer_ur_ls)?;
        let members = self.members();
        if members.iter().any(|member| member.peer_ur_ls.contains(&peer_url)) {
            return Err(Status::failed_precondition("etcdserver: Peer URLs already exists"));
        }
        if request.is_learner && members.iter().filter(|member| member.is_learner).count() >= LEARNERS_MAX {
            return Err(Status::failed_precondition("etcdserver: too many learner members in cluster"));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_nanos());
        let mut id = capstan_raft::new_member_id(self.cluster_id, &request.peer_ur_ls, now);
        while members.iter().any(|member| member.id == id) {
            id = id.wrapping_add(1).max(1);
        }
        let node = PeerNode { name: String::new(), peer_url, client_urls: Vec::new() };
        let added = BTreeMap::from([(id, node.clone())]);
        let changes = if request.is_learner { ChangeMembers::AddNodes(added) } else { ChangeMembers::AddVoters(added) };
        self.change_members(changes, true).await?;
        tracing::info!(member = format!("{id:x}"), peer_url = %node.peer_url, learner = request.is_learner, "member added");
        Ok(pb::MemberAddResponse {
            header: self.header(self.store.revision()),
            member: Some(member_to_pb(id, &node, request.is_learner)),
            members: self.members(),
        })
    }

    pub(super) async fn member_remove_local(
        &self,
        request: &pb::MemberRemoveRequest,
    ) -> Result<pb::MemberRemoveResponse, Status> {
        let id = request.id;
        let member = self.members().into_iter().find(|member| member.id == id).ok_or_else(member_not_found)?;
        let changes = if member.is_learner {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        };
        self.change_members(changes, false).await?;
        tracing::info!(member = format!("{id:x}"), "member removed");
        if id != self.node_id {
            self.notify_removed(id, &member.peer_ur_ls).await;
        }
        Ok(pb::MemberRemoveResponse { header: self.header(self.store.revision()), members: self.members() })
    }

    /// Tells a removed member so; it may never see the membership without itself, because
    /// the leader stops replicating to it. Best effort: a member that is down is refused by
    /// the others when it comes back and finds no leader (see [`watch_removal`]).
    async fn notify_removed(&self, id: NodeId, peer_urls: &[String]) {
        let Some(peer_url) = peer_urls.first() else { return };
        let notify = async {
            let mut client = self.peer_client(peer_url)?;
            client.member_removed(raftpb::MemberRemovedRequest { member_id: id }).await
        };
        match tokio::time::timeout(Duration::from_millis(NOTIFY_REMOVED_TIMEOUT_MS), notify).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(member = format!("{id:x}"), %error, "could not tell a removed member"),
            Err(_) => tracing::warn!(member = format!("{id:x}"), "a removed member did not answer in time"),
        }
    }

    pub(super) async fn member_update_local(
        &self,
        request: &pb::MemberUpdateRequest,
    ) -> Result<pb::MemberUpdateResponse, Status> {
        let peer_url = single_peer_url(&request.peer_ur_ls)?;
        let members = self.members();
        let member = members.iter().find(|member| member.id == request.id).ok_or_else(member_not_found)?;
        if members.iter().any(|other| other.id != request.id && other.peer_ur_ls.contains(&peer_url)) {
            return Err(Status::failed_precondition("etcdserver: Peer URLs already exists"));
        }
        let node = PeerNode { name: member.name.clone(), peer_url, client_urls: member.client_ur_ls.clone() };
        self.change_members(ChangeMembers::SetNodes(BTreeMap::from([(request.id, node)])), true).await?;
        tracing::info!(member = format!("{:x}", request.id), urls = ?request.peer_ur_ls, "member peer URLs updated");
        Ok(pb::MemberUpdateResponse { header: self.header(self.store.revision()), members: self.members() })
    }

    pub(super) async fn member_promote_local(
        &self,
        request: &pb::MemberPromoteRequest,
    ) -> Result<pb::MemberPromoteResponse, Status> {
        let id = request.id;
        let member = self.members().into_iter().find(|member| member.id == id).ok_or_else(member_not_found)?;
        if !member.is_learner {
            return Err(Status::failed_precondition("etcdserver: can only promote a learner member"));
        }
        let (matched, last) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|replication| replication.get(&id).cloned().flatten())
                .map_or(0, |log_id| log_id.index);
            (matched, metrics.last_log_index.unwrap_or(0))
        };
        if matched * 10 < last * PROMOTE_MATCH_TENTHS {
            return Err(Status::failed_precondition(
                "etcdserver: can only promote a learner member which is in sync with leader",
            ));
        }
        self.change_members(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true).await?;
        tracing::info!(member = format!("{id:x}"), "learner promoted");
        Ok(pb::MemberPromoteResponse { header: self.header(self.store.revision()), members: self.members() })
    }

    /// Stops this plane for good: the cluster no longer has it.
    pub(super) fn removed_from_cluster(&self) {
        tracing::error!(member = format!("{:x}", self.node_id), "this member was removed from the cluster; stopping");
        if let Err(error) = capstan_raft::mark_removed(&self.store) {
            tracing::error!(%error, "could not record the removal in the data directory");
        }
        self.stop.notify_one();
    }
}

/// Stops the plane once a membership without it takes effect after one with it (the
/// leader removing itself sees this; a removed follower usually hears from the leader).
/// It follows the server metrics, which change with the membership and the leader, not
/// with every write.
pub(super) async fn watch_removal(plane: Arc<Plane>) {
    let mut server = plane.raft.server_metrics();
    let mut was_member = false;
    loop {
        let membership = server.borrow_and_update().membership_config.clone();
        if membership.membership().get_node(&plane.node_id).is_some() {
            was_member = true;
        } else if was_member {
            // Only an applied membership counts: an appended one may still be undone.
            let index = membership.log_id().as_ref().map_or(0, |id| id.index);
            let mut metrics = plane.raft.metrics();
            let applied = |metrics: &openraft::RaftMetrics<NodeId, PeerNode>| {
                metrics.last_applied.as_ref().is_some_and(|applied| applied.index >= index)
            };
            tokio::select! {
                applied = metrics.wait_for(applied) => {
                    if applied.is_ok() {
                        plane.removed_from_cluster();
                    }
                    return;
                }
                changed = server.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if server.changed().await.is_err() {
            return;
        }
    }
}

/// Waits, after a refused change, for the metrics to move and the newest membership to be
/// applied: openraft refuses a change while the one before it is not committed (planes
/// publishing their URLs at start race so), and retrying at every other change of the
/// metrics would spin.
async fn membership_applied(
    metrics: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, PeerNode>>,
    deadline: tokio::time::Instant,
) -> Result<(), Status> {
    loop {
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(status::stopped()),
            Err(_) => return Err(Status::unavailable(status::TIMEOUT)),
        }
        let current = metrics.borrow_and_update();
        // Nothing applied yet (None) is before the bootstrap membership at index 0.
        let applied = current.last_applied.as_ref().map(|id| id.index);
        if applied >= current.membership_config.log_id().as_ref().map(|id| id.index) {
            return Ok(());
        }
    }
}

pub(super) fn member_to_pb(id: NodeId, node: &PeerNode, is_learner: bool) -> pb::Member {
    pb::Member {
        id,
        name: node.name.clone(),
        peer_ur_ls: vec![node.peer_url.clone()],
        client_ur_ls: node.client_urls.clone(),
        is_learner,
    }
}

/// A member has one peer URL in Capstan; it must be an http(s) URL with a host and port.
fn single_peer_url(urls: &[String]) -> Result<String, Status> {
    let bad_urls = || Status::invalid_argument("etcdserver: given member URLs are invalid");
    let [url] = urls else {
        return Err(if urls.is_empty() {
            bad_urls()
        } else {
            Status::invalid_argument("capstan: a member has exactly one peer URL")
        });
    };
    check_peer_url(url).map_err(|_| bad_urls())?;
    Ok(url.clone())
}

/// Checks that `url` is `http(s)://host:port`.
pub fn check_peer_url(url: &str) -> anyhow::Result<()> {
    let uri: tonic::codegen::http::Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    let has_port = uri.port_u16().is_some();
    if !scheme_ok || !has_port || uri.path().len() > 1 {
        anyhow::bail!("{url:?} is not http(s)://host:port");
    }
    Ok(())
}

/// Finds this plane in a running cluster through the members `--initial-cluster` names:
/// a member that was added with this plane's peer URL.
pub async fn join(config: &PlaneConfig) -> anyhow::Result<PlaneIdentity> {
    let node = config.own_node()?;
    let others: Vec<&str> =
        config.initial_cluster.iter().filter(|(name, _)| *name != config.name).map(|(_, url)| url.as_str()).collect();
    if others.is_empty() {
        anyhow::bail!("--initial-cluster-state existing needs the running members in --initial-cluster");
    }
    let channels = config.peer_channels()?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(JOIN_TIMEOUT_MS);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut answered = false;
        for peer_url in &others {
            let channel = channels.channel(peer_url).with_context(|| format!("bad peer URL {peer_url}"))?;
            let mut client = raftpb::plane_peer_client::PlanePeerClient::new(channel);
            let asked =
                tokio::time::timeout(Duration::from_secs(5), client.cluster_info(raftpb::ClusterInfoRequest {}));
            let info = match asked.await {
                Ok(Ok(info)) => info.into_inner(),
                Ok(Err(error)) => {
                    tracing::warn!(peer = %peer_url, %error, "cannot get the cluster from a member");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(peer = %peer_url, "a member did not answer in time");
                    continue;
                }
            };
            let Some(member) = info.members.iter().find(|member| member.peer_ur_ls.contains(&node.peer_url)) else {
                // This member may lag behind the addition; ask the others too.
                answered = true;
                tracing::warn!(peer = %peer_url, cluster = format!("{:x}", info.cluster_id), "not a member there");
                continue;
            };
            tracing::info!(member = format!("{:x}", member.id), cluster = format!("{:x}", info.cluster_id), "joining");
            return Ok(PlaneIdentity {
                node_id: member.id,
                cluster_id: info.cluster_id,
                node,
                initial_members: BTreeMap::new(),
            });
        }
        if answered {
            anyhow::bail!(
                "no member lists this plane's peer URL {}; add it first: capstan ctl member add {} --peer-urls {}",
                node.peer_url,
                config.name,
                node.peer_url
            );
        }
        if tokio::time::Instant::now() + backoff > deadline {
            anyhow::bail!("no member in --initial-cluster answered within {} s", JOIN_TIMEOUT_MS / 1000);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Serves a membership request (root's alone, with auth on) on the leader, or sends it
/// there, and answers with this plane's header.
macro_rules! on_leader {
    ($service:expr, $request:expr, $local:ident, $remote:ident) => {{
        let plane = &$service.0;
        plane.require_admin(&$request, stringify!($remote))?;
        let request = $request.into_inner();
        let forward = |mut leader: super::forward::LeaderClient| {
            let request = request.clone();
            async move { leader.$remote(request).await.map(Response::into_inner) }
        };
        let mut response = plane.on_leader(|| plane.$local(&request), forward).await?;
        plane.complete_header(&mut response.header);
        Ok(Response::new(response))
    }};
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        on_leader!(self, request, member_add_local, member_add)
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        on_leader!(self, request, member_remove_local, member_remove)
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        on_leader!(self, request, member_update_local, member_update)
    }

    async fn member_list(
        &self,
        request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let plane = &self.0;
        if request.into_inner().linearizable {
            plane.linearizable_barrier().await?;
        }
        Ok(Response::new(pb::MemberListResponse {
            header: plane.header(plane.store.revision()),
            members: plane.members(),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        on_leader!(self, request, member_promote_local, member_promote)
    }
}
