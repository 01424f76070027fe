//! The Raft transport between planes: a tonic client per peer for the `RaftPeer` service.
//!
//! One channel per peer URL ([`PeerChannels`]) is shared by every replication stream to
//! that peer and by the plane's request forwarding. A failed
//! call is reported as `Unreachable`, so openraft backs off instead of retrying at once; a
//! call with no answer within openraft's deadline is a `Timeout`, tried again without backing off.
//!
//! AppendEntries go to each peer on one [`Pipe`] (a long-lived stream), shared by every
//! client of the peer: openraft's replication of each term, and the client it makes per
//! heartbeat of a read-index round. A pipe that broke is opened anew by the next append;
//! so is one whose append timed out, as a timed-out call would have been reset.
//!
//! openraft gives every AppendEntries one heartbeat interval, however many entries it
//! carries, and sends the same entries again after a timeout. So each peer's AppendEntries
//! carry at most a budget of entry bytes (`AppendBudget`), cut short and reported as a
//! partial success, which openraft continues from: the budget halves after a timeout and
//! doubles back after calls that took well under their time, so that a follower catching up
//! on a slow or busy machine is sent what it can take in time instead of the same too-large
//! batch forever.
//!
//! openraft 0.9 has one AppendEntries in flight per follower, and sends a follower one
//! without entries whenever the commit index moves with nothing else queued for it. At
//! one write in flight that commit notice went out on every commit, and the next write's
//! entries waited for its answer. So a notice waits up to `COMMIT_NOTICE_WAIT` for the
//! leader's next append and is then answered here unsent ("folded"): the entries' own
//! AppendEntries, which openraft sends right after, carries the commit and serves as the
//! heartbeat. A follower of an idle leader learns of a commit that much later. A client
//! answers its first call for real, always: openraft's read-index round makes a client per
//! heartbeat, and that heartbeat's answer is what confirms the leadership. And a client
//! folds a notice only if it sent the AppendEntries before it, so a follower hears from
//! its leader at least every other heartbeat whatever the log does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{Fatal, RPCError, RaftError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::storage::Snapshot;
use openraft::Vote;
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Status;

use capstan_proto::raftpb::{self, append_answer, raft_peer_client::RaftPeerClient, snapshot_chunk};

use crate::log_store::{Appends, Durability};
use crate::pipe::{Pipe, PipesByUrl};
use crate::snapshot::SnapshotData;
use crate::types::{self, NodeId, PeerNode, TypeConfig};
use crate::StorageMetrics;

/// The largest peer message a plane sends or accepts.
pub const PEER_MESSAGE_BYTES_MAX: usize = 16 << 20;
/// How long a commit notice waits for the leader's next append to carry it instead.
const COMMIT_NOTICE_WAIT: Duration = Duration::from_millis(2);
/// The entries a peer's first AppendEntries carries at most (etcd's raft sends 1 MiB).
const APPEND_BYTES_FIRST: usize = 1 << 20;
/// The entries any AppendEntries carries at most: the largest message, less room for the
/// rest of the request.
const APPEND_BYTES_MAX: usize = PEER_MESSAGE_BYTES_MAX - (64 << 10);
const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// The first and the longest wait before retrying a peer whose call failed.
const RETRY_MS_MIN: u64 = 20;
const RETRY_MS_MAX: u64 = 500;

/// One lazily connected gRPC channel per peer URL, shared by everything a plane sends to
/// its peers (Raft replication and request forwarding alike). Cheap to clone.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    faults: Option<Arc<dyn PeerFaults>>,
    /// How to reach `https://` peers (`--peer-*` TLS flags).
    tls: Option<ClientTlsConfig>,
}

/// What the network does to one message from this plane to a peer: the hook through which
/// tests drop, delay and partition peer traffic. Production planes have none.
pub trait PeerFaults: Send + Sync + 'static {
    fn fate(&self, peer_url: &str) -> Fate;
}

impl std::fmt::Debug for dyn PeerFaults {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("PeerFaults")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Deliver,
    /// Deliver after a delay.
    Delay(Duration),
    /// Lose the request.
    Drop,
    /// Deliver the request, lose the answer.
    DropResponse,
}

impl PeerChannels {
    /// Channels whose traffic passes through `faults` (tests' fault injection).
    pub fn with_faults(self, faults: Option<Arc<dyn PeerFaults>>) -> PeerChannels {
        PeerChannels { faults, ..self }
    }

    /// Channels that speak TLS, with `tls`, to peers whose URL is `https://`.
    pub fn with_tls(self, tls: Option<ClientTlsConfig>) -> PeerChannels {
        PeerChannels { tls, ..self }
    }

    /// What happens to the next message to `peer_url`.
    pub fn fate(&self, peer_url: &str) -> Fate {
        self.faults.as_ref().map_or(Fate::Deliver, |faults| faults.fate(peer_url))
    }

    /// Sends `call` to `peer_url` as the fault hook decides.
    async fn send<T>(
        &self,
        peer_url: &str,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        match self.fate(peer_url) {
            Fate::Deliver => call.await,
            Fate::Delay(delay) => {
                tokio::time::sleep(delay).await;
                call.await
            }
            Fate::Drop => Err(Status::unavailable("injected fault: request lost")),
            Fate::DropResponse => {
                let _ = call.await;
                Err(Status::unavailable("injected fault: response lost"))
            }
        }
    }

    pub fn channel(&self, peer_url: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = lock(&self.channels);
        if let Some(channel) = channels.get(peer_url) {
            return Ok(channel.clone());
        }
        let mut endpoint = Endpoint::from_shared(peer_url.to_string())?
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        if let (Some(tls), true) = (&self.tls, peer_url.starts_with("https://")) {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(peer_url.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Creates peer clients over the shared [`PeerChannels`].
#[derive(Clone)]
pub struct GrpcNetwork {
    cluster_id: u64,
    /// This plane's member ID.
    id: NodeId,
    channels: PeerChannels,
    /// Counts every snapshot sent whole to a peer.
    snapshots_sent: Counter,
    /// Counts the commit notices folded into the next AppendEntries.
    notices_folded: Counter,
    /// How far the plane's own log is durable.
    durability: Durability,
    /// How far it is written.
    appends: Appends,
    /// Each peer's append budget, kept across the replication streams of successive
    /// terms: a new leader term starting at 1 MiB again would clog a narrow link anew,
    /// the follower behind it would miss heartbeats and campaign, and so on.
    append_budgets: Arc<Mutex<HashMap<NodeId, Arc<Mutex<AppendBudget>>>>>,
    /// Each peer's append pipe, shared by all its clients.
    pipes: Arc<PipesByUrl<AppendProtocol>>,
}

/// AppendEntries and their answers as pipe frames (`RaftPeer.AppendStream`).
pub(crate) struct AppendProtocol;

crate::pipe_protocol!(
    AppendProtocol: raftpb::AppendEntriesRequest => raftpb::AppendEntriesResponse,
    raftpb::AppendFrame,
    raftpb::AppendAnswer,
    append_answer
);

impl GrpcNetwork {
    pub fn new(
        cluster_id: u64,
        id: NodeId,
        channels: PeerChannels,
        metrics: &StorageMetrics,
        durability: Durability,
        appends: Appends,
    ) -> GrpcNetwork {
        GrpcNetwork {
            cluster_id,
            id,
            channels,
            snapshots_sent: metrics.snapshots_sent.clone(),
            notices_folded: metrics.commit_notices_folded.clone(),
            durability,
            appends,
            append_budgets: Arc::default(),
            pipes: Arc::default(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> PeerClient {
        let client = self.channels.channel(&node.peer_url).map(|channel| {
            RaftPeerClient::new(channel)
                .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
        });
        PeerClient {
            cluster_id: self.cluster_id,
            id: self.id,
            channels: self.channels.clone(),
            target,
            node: node.clone(),
            client: client.map_err(|error| error.to_string()),
            snapshots_sent: self.snapshots_sent.clone(),
            notices_folded: self.notices_folded.clone(),
            durability: self.durability.clone(),
            appends: self.appends.clone(),
            append_budget: lock(&self.append_budgets).entry(target).or_default().clone(),
            pipes: self.pipes.clone(),
            answered: false,
            folded: false,
        }
    }
}

/// The client of one peer.
pub struct PeerClient {
    cluster_id: u64,
    id: NodeId,
    channels: PeerChannels,
    target: NodeId,
    node: PeerNode,
    /// The client, or why the peer's URL cannot be used.
    client: Result<RaftPeerClient<Channel>, String>,
    snapshots_sent: Counter,
    notices_folded: Counter,
    durability: Durability,
    appends: Appends,
    append_budget: Arc<Mutex<AppendBudget>>,
    pipes: Arc<PipesByUrl<AppendProtocol>>,
    /// Whether a call of this client has been answered.
    answered: bool,
    /// Whether its last AppendEntries was a commit notice folded into the next.
    folded: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How many bytes of entries the next AppendEntries to a peer carries at most (always at
/// least one entry): halved after a call that timed out, doubled after one that was cut
/// short by the budget yet answered within half its time, between one entry and
/// [`APPEND_BYTES_MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AppendBudget(usize);

impl Default for AppendBudget {
    fn default() -> AppendBudget {
        AppendBudget(APPEND_BYTES_FIRST)
    }
}

impl AppendBudget {
    fn bytes(self) -> usize {
        self.0
    }

    /// A call that carried `sent` bytes of entries found no answer in time.
    fn timed_out(&mut self, sent: usize) {
        self.0 = (self.0.min(sent) / 2).max(1);
    }

    /// A call cut short by the budget was answered, after `elapsed` of the `allowed` time.
    fn answered_cut_short(&mut self, elapsed: Duration, allowed: Duration) {
        if elapsed * 2 < allowed {
            self.0 = (self.0 * 2).min(APPEND_BYTES_MAX);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("plane {peer} ({target:x}) is unreachable: {reason}")]
struct PeerUnreachable {
    peer: PeerNode,
    target: NodeId,
    reason: String,
}

impl PeerClient {
    fn unreachable<E: std::error::Error>(&self, reason: impl ToString) -> RPCError<NodeId, PeerNode, E> {
        RPCError::Unreachable(self.peer_unreachable(reason))
    }

    fn peer_unreachable(&self, reason: impl ToString) -> Unreachable {
        let error = PeerUnreachable { peer: self.node.clone(), target: self.target, reason: reason.to_string() };
        Unreachable::new(&error)
    }

    /// The client for a call bounded by `option`'s deadline.
    fn client<E: std::error::Error>(&self) -> Result<RaftPeerClient<Channel>, RPCError<NodeId, PeerNode, E>> {
        self.client.clone().map_err(|reason| self.unreachable(reason))
    }

    /// The peer's append pipe, opened anew if it has none that works.
    fn pipe<E: std::error::Error>(&self) -> Result<Arc<Pipe<AppendProtocol>>, RPCError<NodeId, PeerNode, E>> {
        let open = || {
            let mut client = self.client.clone().map_err(Status::unavailable)?;
            Ok(Pipe::open(|frames| async move { client.append_stream(frames).await }))
        };
        self.pipes.get(&self.node.peer_url, open).map_err(|status| self.unreachable(status.message()))
    }
}

/// Runs `call` (an `action`) within `deadline`. A call that failed makes the peer
/// `Unreachable`, which openraft backs off from; one that is only slow (openraft 0.9 gives
/// an AppendEntries one heartbeat interval, which a follower's slow fsync can exceed) is a
/// `Timeout`, tried again without backing off.
macro_rules! call {
    ($self:ident, $deadline:expr, $action:expr, $call:expr) => {
        match tokio::time::timeout($deadline, $self.channels.send(&$self.node.peer_url, $call)).await {
            Err(_) => Err(RPCError::Timeout(Timeout {
                action: $action,
                id: $self.id,
                target: $self.target,
                timeout: $deadline,
            })),
            Ok(Err(status)) => Err($self.unreachable(status.message())),
            Ok(Ok(response)) => Ok(response),
        }
    };
}

/// A unary call's answer.
async fn unary<T>(call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T, Status> {
    call.await.map(tonic::Response::into_inner)
}

/// Why a snapshot stream stopped short.
enum Fed {
    /// The export could not be read; holds the stream's sender so that it outlives the call.
    Unread(std::io::Error, tokio::sync::mpsc::Sender<raftpb::SnapshotChunk>),
    /// The peer (or the link) failed the call.
    Refused(Status),
}

/// Sends `file` on `chunks` in chunks of [`crate::SNAPSHOT_CHUNK_BYTES`]; the stream ends when
/// this returns `Ok` and drops `chunks`.
async fn feed(mut file: tokio::fs::File, chunks: tokio::sync::mpsc::Sender<raftpb::SnapshotChunk>) -> Result<(), Fed> {
    use tokio::io::AsyncReadExt;
    loop {
        let mut data = Vec::with_capacity(crate::SNAPSHOT_CHUNK_BYTES as usize);
        match (&mut file).take(crate::SNAPSHOT_CHUNK_BYTES).read_to_end(&mut data).await {
            Err(error) => return Err(Fed::Unread(error, chunks)),
            Ok(0) => return Ok(()),
            Ok(_) => {}
        }
        let chunk = raftpb::SnapshotChunk { part: Some(snapshot_chunk::Part::Data(data)) };
        if chunks.send(chunk).await.is_err() {
            // The call ended first; its outcome says why.
            return Ok(());
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let started = std::time::Instant::now();
        if rpc.entries.is_empty() && self.answered && !self.folded {
            let matching = rpc.prev_log_id.map(|id| id.index);
            if self.appends.past(matching, COMMIT_NOTICE_WAIT).await {
                self.folded = true;
                self.notices_folded.inc();
                return Ok(AppendEntriesResponse::Success);
            }
        }
        self.folded = false;
        // openraft counts the leader's own appends as durable before they are (see
        // `log_store`); a follower hears of a commit only once the leader's copy is.
        if let Some(committed) = &rpc.leader_commit {
            self.durability.until(committed.index).await.map_err(|error| self.unreachable(error))?;
        }
        let pipe = self.pipe()?;
        let budget = lock(&self.append_budget).bytes();
        let offered = rpc.entries.len();
        let mut entries = Vec::with_capacity(offered);
        let mut last_sent = None;
        let mut bytes = 0;
        for entry in rpc.entries {
            let log_id = entry.log_id;
            let encoded = types::entry_into_pb(entry);
            // The entry with its field tag and length, as the request carries it.
            let len = encoded.encoded_len();
            let size = 1 + prost::length_delimiter_len(len) + len;
            if bytes + size > budget && !entries.is_empty() {
                break;
            }
            bytes += size;
            entries.push(encoded);
            last_sent = Some(log_id);
        }
        let sent_all = entries.len() == offered;
        let request = raftpb::AppendEntriesRequest {
            cluster_id: self.cluster_id,
            member_id: self.target,
            vote: Some(types::vote_to_pb(&rpc.vote)),
            prev_log_id: rpc.prev_log_id.as_ref().map(types::log_id_to_pb),
            entries,
            leader_commit: rpc.leader_commit.as_ref().map(types::log_id_to_pb),
        };
        // By the soft deadline, before openraft's own, so that a timeout is seen here and
        // shrinks the budget.
        let deadline = option.soft_ttl().saturating_sub(started.elapsed());
        let response = call!(self, deadline, RPCTypes::AppendEntries, pipe.call(request));
        let response = match response {
            Err(RPCError::Timeout(timeout)) => {
                if bytes > 0 {
                    lock(&self.append_budget).timed_out(bytes);
                }
                // As a timed-out call would have been reset: the next append opens another.
                self.pipes.discard(&self.node.peer_url, &pipe);
                return Err(RPCError::Timeout(timeout));
            }
            response => response?,
        };
        self.answered = true;
        let response = types::append_response_from_pb(response).map_err(|error| self.unreachable(error))?;
        Ok(match response {
            AppendEntriesResponse::Success if !sent_all => {
                lock(&self.append_budget).answered_cut_short(started.elapsed(), option.soft_ttl());
                AppendEntriesResponse::PartialSuccess(last_sent)
            }
            other => other,
        })
    }

    /// Exports the store as it stands and streams it to the peer, which installs it under
    /// the export's own meta (`crate::snapshot` says why that is the snapshot's or newer).
    /// No deadline: a large store takes as long as it takes; a peer that stops answering
    /// is found by the connection's keepalive, and openraft cancels a stream it gave up.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        // A failure here is this send's, not the store's: openraft would stop the leader for
        // a storage error, so the peer is reported unreachable and tried again later.
        let SnapshotData::Live(live) = *snapshot.snapshot else {
            return Err(self.peer_unreachable("only a plane's own snapshot is sent").into());
        };
        let mut client = self.client.clone().map_err(|reason| self.peer_unreachable(reason))?;
        let sending = async {
            let exported = tokio::task::spawn_blocking(move || live.export()).await;
            let (file, meta) = match exported {
                Ok(Ok(exported)) => exported,
                Ok(Err(error)) => return Err(format!("cannot export the store: {error}")),
                Err(error) => return Err(format!("the export stopped: {error}")),
            };
            let export = file.reopen().map_err(|error| format!("cannot read the export: {error}"))?;
            let header = raftpb::SnapshotHeader {
                cluster_id: self.cluster_id,
                member_id: self.target,
                vote: Some(types::vote_to_pb(&vote)),
                meta: Some(types::snapshot_meta_to_pb(&meta)),
            };
            let (chunks, stream) = tokio::sync::mpsc::channel(2);
            let _ = chunks.send(raftpb::SnapshotChunk { part: Some(snapshot_chunk::Part::Header(header)) }).await;
            let call = self.channels.send(&self.node.peer_url, client.install_snapshot(ReceiverStream::new(stream)));
            match futures::try_join!(feed(tokio::fs::File::from_std(export), chunks), async {
                call.await.map_err(Fed::Refused)
            }) {
                Ok(((), answer)) => Ok(answer.into_inner()),
                // The call is dropped (and its stream reset) before `chunks`, which the
                // error holds, so the peer never sees a cut-short export end as if whole.
                Err(Fed::Unread(error, _chunks)) => Err(format!("cannot read the export: {error}")),
                Err(Fed::Refused(status)) => Err(status.message().to_string()),
            }
        };
        let response = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            response = sending => response.map_err(|reason| {
                tracing::warn!(peer = %self.node.peer_url, %reason, "a snapshot was not sent");
                self.peer_unreachable(reason)
            })?,
        };
        self.snapshots_sent.inc();
        let vote = response
            .vote
            .as_ref()
            .map(types::vote_from_pb)
            .ok_or_else(|| self.peer_unreachable("snapshot answer without a vote"))?;
        Ok(SnapshotResponse { vote })
    }

    /// After a failed call openraft waits before retrying the peer: briefly at first, since
    /// a lost message should cost about a heartbeat, then longer for a peer that is down.
    fn backoff(&self) -> openraft::network::Backoff {
        let millis = (0u32..).map(|attempt| (RETRY_MS_MIN << attempt.min(16)).min(RETRY_MS_MAX));
        openraft::network::Backoff::new(millis.map(Duration::from_millis))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let mut client = self.client()?;
        let request = types::vote_request_to_pb(self.cluster_id, self.target, &rpc);
        let response = call!(self, option.hard_ttl(), RPCTypes::Vote, unary(client.vote(request)))?;
        types::vote_response_from_pb(response).map_err(|error| self.unreachable(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_append_budget_halves_on_timeouts_and_doubles_back_on_quick_answers() {
        let allowed = Duration::from_millis(40);
        let mut budget = AppendBudget::default();
        // Halved from what was sent, when that was less than the budget.
        budget.timed_out(600 << 10);
        assert_eq!(budget.bytes(), 300 << 10);
        for _ in 0..64 {
            budget.timed_out(budget.bytes());
        }
        assert_eq!(budget.bytes(), 1, "never below one byte: one entry always goes");
        // A slow answer keeps the budget, a quick one doubles it, up to the most.
        budget.answered_cut_short(Duration::from_millis(30), allowed);
        assert_eq!(budget.bytes(), 1);
        budget.answered_cut_short(Duration::from_millis(5), allowed);
        assert_eq!(budget.bytes(), 2);
        for _ in 0..64 {
            budget.answered_cut_short(Duration::from_millis(5), allowed);
        }
        assert_eq!(budget.bytes(), APPEND_BYTES_MAX);
    }
}
