//! etcd's Lease service and the lessor that expires leases.
//!
//! Grants and revokes are Raft commands; expiry deadlines are not replicated. Only the
//! leader tracks deadlines and keep-alives, and when it expires a lease it proposes the
//! revoke, so every plane deletes the lease's keys at the same revision. A plane that
//! becomes leader gives every lease a full TTL from that moment (as etcd's lessor
//! `Promote` does), so an election never expires leases whose owners kept them alive.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use capstan_proto::etcdserverpb::{self as pb, lease_server::Lease};
use capstan_proto::raftpb::{command, Command};
use capstan_raft::RaftConfig;
use capstan_store::{Access, CommandResponse, StoreError};

use super::{status, Plane};

/// How often the leader looks for expired leases.
const EXPIRY_CHECK_INTERVAL_MS: u64 = 250;
/// Keep-alive responses buffered per stream before the plane waits for the client.
const KEEPALIVE_RESPONSES_MAX: usize = 64;

pub struct Lessor {
    state: Mutex<LessorState>,
    /// The shortest TTL granted: a lease must outlive an election (etcd: 1.5 election
    /// timeouts, rounded up to whole seconds).
    ttl_secs_min: i64,
    next_id: AtomicU64,
}

#[derive(Default)]
struct LessorState {
    deadlines: HashMap<i64, Instant>,
    /// The term in which this plane last became leader; `None` while it follows.
    leading_term: Option<u64>,
}

impl Lessor {
    pub fn new(raft: &RaftConfig) -> Lessor {
        let ttl_secs_min = (raft.election_timeout_ms * 3 / 2).div_ceil(1000).max(1) as i64;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_nanos() as u64);
        Lessor { state: Mutex::new(LessorState::default()), ttl_secs_min, next_id: AtomicU64::new(seed) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LessorState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A fresh positive lease ID: a member prefix and a time-seeded counter, like etcd's.
    fn new_id(&self, node_id: u64) -> i64 {
        let counter = self.next_id.fetch_add(1, Ordering::Relaxed) & ((1 << 47) - 1);
        (((node_id & 0xffff) << 47) | counter) as i64
    }

    pub(super) fn renew(&self, id: i64, ttl_secs: i64) {
        self.state().deadlines.insert(id, Instant::now() + Duration::from_secs(ttl_secs.max(0) as u64));
    }

    pub(super) fn forget(&self, id: i64) {
        self.state().deadlines.remove(&id);
    }

    /// Seconds left before `id` expires, rounded up, if this plane tracks it.
    fn remaining_secs(&self, id: i64) -> Option<i64> {
        let deadline = *self.state().deadlines.get(&id)?;
        let left = deadline.saturating_duration_since(Instant::now());
        Some(left.as_millis().div_ceil(1000) as i64)
    }
}

/// Runs for the plane's life: on becoming leader, restarts every lease's TTL; while
/// leading, revokes expired leases through Raft.
pub async fn run_expiry(plane: Arc<Plane>) {
    let mut tick = tokio::time::interval(Duration::from_millis(EXPIRY_CHECK_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (leading, term) = {
            let metrics = plane.raft.metrics().borrow().clone();
            (metrics.current_leader == Some(plane.node_id), metrics.current_term)
        };
        if !leading {
            plane.lessor.state().leading_term = None;
            continue;
        }
        if plane.lessor.state().leading_term != Some(term) && !promote(&plane, term).await {
            continue;
        }
        let now = Instant::now();
        let expired: Vec<i64> = plane
            .lessor
            .state()
            .deadlines
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            // Proposed here and never forwarded: a deposed leader's deadlines are stale, and
            // Raft commits its proposal only if it still leads.
            let revoke = Command {
                request: Some(command::Request::LeaseRevoke(pb::LeaseRevokeRequest { id })),
                caller: None,
                origin: 0,
            };
            match plane.propose_local(revoke).await {
                Ok(_) => {
                    plane.metrics.leases_expired.inc();
                    tracing::info!(lease = format!("{id:x}"), "lease expired and revoked")
                }
                Err(error) if error.code() == tonic::Code::NotFound => plane.lessor.forget(id),
                Err(error) if error.message() == status::NOT_LEADER => {
                    plane.lessor.state().leading_term = None;
                    break;
                }
                Err(error) => {
                    tracing::warn!(lease = format!("{id:x}"), %error, "could not revoke an expired lease; will retry")
                }
            }
        }
    }
}

/// This plane just became leader in `term`: every lease gets its full TTL from now.
/// Returns whether it took over; until it has, it must not expire anything.
async fn promote(plane: &Arc<Plane>, term: u64) -> bool {
    // Leases granted in earlier terms may still be committed but unapplied here; a read
    // index waits until every entry before this term's first one is applied.
    if let Err(error) = plane.raft.ensure_linearizable().await {
        tracing::warn!(%error, "could not confirm leadership to take over the leases");
        return false;
    }
    let store = plane.store.clone();
    let listed = tokio::task::spawn_blocking(move || store.reader().leases().map_err(|error| error.to_string()))
        .await
        .map_err(|error| error.to_string())
        .and_then(|listed| listed);
    let leases = match listed {
        Ok(leases) => leases,
        Err(error) => {
            tracing::error!(%error, "cannot list leases");
            return false;
        }
    };
    let deadline_base = Instant::now();
    let mut state = plane.lessor.state();
    // Merged, not replaced: a lease granted since the listing already has its deadline.
    for (id, ttl) in &leases {
        state.deadlines.insert(*id, deadline_base + Duration::from_secs((*ttl).max(0) as u64));
    }
    state.leading_term = Some(term);
    tracing::info!(term, leases = leases.len(), "leading: every lease restarts its TTL");
    true
}

pub struct LeaseService(pub Arc<Plane>);

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

impl Plane {
    /// Renews lease `id` on this plane, the leader, and returns its TTL; 0 when the lease
    /// does not exist (etcd's keep-alive answer for an unknown or expired lease).
    pub(super) fn keep_alive_local(&self, id: i64) -> Result<i64, Status> {
        match self.store.reader().lease(id).map_err(|error| status::from_store(&error))? {
            Some(ttl) => {
                self.lessor.renew(id, ttl);
                Ok(ttl)
            }
            None => Ok(0),
        }
    }

    /// A lease's TTLs (and keys, if asked), from the leader, which tracks them.
    pub(super) async fn time_to_live(
        &self,
        request: pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, Status> {
        let local = || async { self.time_to_live_local(&request) };
        let remote = |mut leader: super::forward::LeaderClient| async move {
            Ok(leader.lease_time_to_live(request).await?.into_inner())
        };
        self.on_leader(local, remote).await
    }

    /// A lease's TTLs and keys, as this plane, the leader, knows them.
    pub(super) fn time_to_live_local(
        &self,
        request: &pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, Status> {
        let reader = self.store.reader();
        let granted = reader.lease(request.id).map_err(|error| status::from_store(&error))?;
        let Some(granted_ttl) = granted else {
            return Err(status::from_store(&StoreError::LeaseNotFound { id: request.id }));
        };
        let keys = if request.keys {
            reader.lease_keys(request.id).map_err(|error| status::from_store(&error))?
        } else {
            Vec::new()
        };
        let ttl = self.lessor.remaining_secs(request.id).unwrap_or(granted_ttl);
        Ok(pb::LeaseTimeToLiveResponse {
            header: self.header(self.store.revision()),
            id: request.id,
            ttl,
            granted_ttl,
            keys,
        })
    }
}

impl LeaseService {
    /// Renews lease `id` on the leader and returns its TTL (0: no such lease).
    async fn keep_alive(&self, id: i64) -> Result<i64, Status> {
        let plane = &self.0;
        let remote = |mut leader: super::forward::LeaderClient| async move {
            Ok(leader.lease_keep_alive(pb::LeaseKeepAliveRequest { id }).await?.into_inner().ttl)
        };
        plane.on_leader(|| async { plane.keep_alive_local(id) }, remote).await
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let plane = &self.0;
        let caller = plane.caller(&request, "LeaseGrant")?;
        let mut request = request.into_inner();
        plane.check_quota()?;
        if request.id == 0 {
            request.id = plane.lessor.new_id(plane.node_id);
        }
        request.ttl = request.ttl.max(plane.lessor.ttl_secs_min);
        match plane.propose_as(&caller, command::Request::LeaseGrant(request)).await? {
            CommandResponse::LeaseGrant(mut response) => {
                plane.complete_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(Status::internal(format!("lease grant answered with {other:?}"))),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let plane = &self.0;
        let caller = plane.caller(&request, "LeaseRevoke")?;
        match plane.propose_as(&caller, command::Request::LeaseRevoke(request.into_inner())).await? {
            CommandResponse::LeaseRevoke(mut response) => {
                plane.complete_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(Status::internal(format!("lease revoke answered with {other:?}"))),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let caller = self.0.caller(&request, "LeaseKeepAlive")?;
        self.0.authorize(&caller, |auth| auth.check_user(&caller.user))?;
        let mut incoming = request.into_inner();
        let (responses, outgoing) = tokio::sync::mpsc::channel(KEEPALIVE_RESPONSES_MAX);
        let service = LeaseService(self.0.clone());
        tokio::spawn(async move {
            let stopping = service.0.stopping();
            tokio::pin!(stopping);
            loop {
                let next = tokio::select! {
                    next = incoming.next() => next,
                    () = &mut stopping => None,
                };
                let Some(next) = next else { break };
                let answer = match next {
                    Ok(request) => service.keep_alive(request.id).await.map(|ttl| pb::LeaseKeepAliveResponse {
                        header: service.0.header(service.0.store.revision()),
                        id: request.id,
                        ttl,
                    }),
                    Err(error) => Err(error),
                };
                let failed = answer.is_err();
                if responses.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(outgoing))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let plane = &self.0;
        let caller = plane.caller(&request, "LeaseTimeToLive")?;
        let request = request.into_inner();
        // The keys it lists need read permission, as in etcd; with auth off nothing is
        // checked, so nothing is read for it.
        let keys = match request.keys && plane.store.auth().enabled {
            true => plane.store.reader().lease_keys(request.id).map_err(|error| status::from_store(&error))?,
            false => Vec::new(),
        };
        plane.authorize(&caller, |auth| {
            auth.check_user(&caller.user)?;
            keys.iter().try_for_each(|key| auth.check(&caller.user, Access::Read, key, &[]))
        })?;
        Ok(Response::new(plane.time_to_live(request).await?))
    }

    async fn lease_leases(
        &self,
        request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let plane = &self.0;
        let caller = plane.caller(&request, "LeaseLeases")?;
        plane.authorize(&caller, |auth| auth.check_user(&caller.user))?;
        plane.linearizable_barrier().await?;
        let leases = plane.store.reader().leases().map_err(|error| status::from_store(&error))?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: plane.header(plane.store.revision()),
            leases: leases.into_iter().map(|(id, _)| pb::LeaseStatus { id }).collect(),
        }))
    }
}
