//! Batching, where one Raft round can serve many requests.
//!
//! Proposals: commands that arrive while earlier writes are being replicated go into Raft
//! together, as one entry.
//!
//! Each entry costs openraft's core a round of work, and a follower a synced append when
//! the entries come one by one, so one entry per command would cost that per command
//! (`capstan_raft::log_store` says how appends are synced). Instead every proposal joins
//! a queue; the batcher takes whatever has queued (up to a limit) once its previous batch
//! is answered, and on the leader proposes it as a single entry (a lone command as itself).
//! One batch at a time makes the batches as large as the load allows: with two out at
//! once, put 8:64 and 16:256 ran 9–12% slower, at 10% more CPU per put (session 15). The
//! state machine applies a batch command by command, each at its own revision, exactly as
//! if they had come one by one (`capstan_raft::state_machine`).
//!
//! A follower's batcher forwards its batch to the leader instead, as one frame on its pipe
//! to the leader, whose commands join the leader's queue (`forward`): a message per batch
//! rather than per command, which the leader would otherwise pay for two thirds of the
//! writes. A follower keeps two batches out at once: with one, the commands that queued
//! while a batch was out (to the leader, through its batch in flight, and back) waited for
//! its answer before they even reached the leader's queue; put 4:16 ran 6% slower
//! (session 21).
//! The batcher's answer to a key write is the client's fallback: the plane that took the
//! write answers it as it applies it if that comes first (`Plane::propose`), which on the
//! leader it always does.
//!
//! The leader's lessor learns each lease grant and revoke here, when the entry is applied,
//! whichever plane the client asked and even if it stopped waiting.
//!
//! When writes are evidently coming together (more than one is queued, or a follower has
//! forwards out), a batcher first lets its worker thread run every task that is ready and
//! read what its sockets have brought in (`gather`), and again while that adds to the
//! queue: requests that have reached the plane but not yet the queue then join this batch
//! instead of making the next one. Otherwise a batcher took its batch as soon as it ran,
//! while requests read with the first were still on their way through HTTP/2. At put 8:64
//! the leader's entries carried 25.6 commands against 20.7, and the servers took 10% less
//! CPU per put (session 29 in BENCHMARKS.md). One write at a time does not gather:
//! the look would find nothing, and it wakes the runtime's other worker (tokio wakes one
//! whenever a worker that looked for work finds some), which cost put 1:1 through a
//! follower 4%.
//!
//! Read-index rounds: linearizable reads that queue while a round (the leader confirming
//! its leadership with a quorum, or a follower asking the leader) is in flight share the
//! next round. A read never uses a round that began before it arrived, so the index it gets
//! covers every write acknowledged before it.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use capstan_proto::raftpb::{command, Command, CommandBatch};
use capstan_store::CommandResponse;

use super::{status, Plane};

/// Proposals waiting for a batch, at most; more make proposers wait.
pub const QUEUE_MAX: usize = 4096;
/// Commands and encoded bytes in one batch, at most.
const BATCH_COMMANDS_MAX: usize = 512;
const BATCH_BYTES_MAX: usize = 4 << 20;
/// Forwarded batches a follower has out to the leader at once, at most.
const FORWARDS_IN_FLIGHT_MAX: usize = 2;
/// Looks at the runtime's ready tasks and sockets before a batch is taken, at most.
const GATHER_ROUNDS_MAX: usize = 4;

/// Where a read-index round's outcome goes.
pub type ReadWaiter = oneshot::Sender<Result<u64, Status>>;

/// Runs for the plane's life: one read-index round at a time, for every read queued when it
/// starts.
pub async fn run_reads(plane: Arc<Plane>, mut queue: mpsc::Receiver<ReadWaiter>) {
    while let Some(first) = queue.recv().await {
        let mut waiting = vec![first];
        while let Ok(next) = queue.try_recv() {
            waiting.push(next);
        }
        let outcome = within_propose_timeout(plane.read_round()).await;
        for waiter in waiting {
            let _ = waiter.send(outcome.clone());
        }
    }
}

/// Returns once this worker thread has run the tasks that were ready and polled the sockets
/// (unless another worker was polling them): tokio resumes a `yield_now` only then. Again
/// while that added to `queue`, so that what has reached the plane joins the batch about to
/// be taken from it.
async fn gather(queue: &mpsc::Receiver<Proposal>) {
    for _ in 0..GATHER_ROUNDS_MAX {
        let queued = queue.len();
        tokio::task::yield_now().await;
        if queue.len() == queued {
            return;
        }
    }
}

/// `call`'s outcome, or etcd's timeout error once it has taken as long as a proposer waits.
async fn within_propose_timeout<T>(call: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    let timeout = std::time::Duration::from_millis(super::PROPOSE_TIMEOUT_MS);
    tokio::time::timeout(timeout, call).await.unwrap_or_else(|_| Err(Status::unavailable(status::TIMEOUT)))
}

/// Where a proposal's outcome goes.
pub type Answer = oneshot::Sender<Result<CommandResponse, Status>>;

/// A command waiting to be proposed, and where its outcome goes.
pub struct Proposal {
    pub command: Command,
    /// Whether a follower may forward it to the leader. Those only the leader may make
    /// (its lessor's revokes, its compactions, and what followers forwarded to it) get
    /// "not leader" from a follower instead.
    pub forwardable: bool,
    pub answer: Answer,
}

/// Runs for the plane's life, turning queued proposals into Raft entries, one batch at a
/// time on the leader; a follower keeps up to `FORWARDS_IN_FLIGHT_MAX` batches out to the
/// leader (a write ends with the batcher, so none outlives the plane).
pub async fn run(plane: Arc<Plane>, mut queue: mpsc::Receiver<Proposal>) {
    let mut forwards = tokio::task::JoinSet::new();
    while let Some(first) = queue.recv().await {
        while forwards.try_join_next().is_some() {}
        let leading = plane.is_leader();
        if !leading {
            while forwards.len() >= FORWARDS_IN_FLIGHT_MAX {
                forwards.join_next().await;
            }
        }
        if !queue.is_empty() || !forwards.is_empty() {
            gather(&queue).await;
        }
        let mut bytes = first.command.encoded_len();
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS_MAX && bytes < BATCH_BYTES_MAX {
            let Ok(next) = queue.try_recv() else { break };
            bytes += next.command.encoded_len();
            batch.push(next);
        }
        if leading {
            propose(&plane, batch).await;
        } else {
            let plane = plane.clone();
            forwards.spawn(async move { forward(&plane, batch).await });
        }
    }
}

/// Forwards the forwardable proposals of `batch` to the leader in one call.
async fn forward(plane: &Plane, batch: Vec<Proposal>) {
    let mut commands = Vec::with_capacity(batch.len());
    let mut answers = Vec::with_capacity(batch.len());
    for proposal in batch {
        if proposal.forwardable {
            commands.push(proposal.command);
            answers.push(proposal.answer);
        } else {
            let _ = proposal.answer.send(Err(status::not_leader()));
        }
    }
    if commands.is_empty() {
        return;
    }
    let count = commands.len();
    // Bounded like each proposer's wait, so a leader that stopped answering (paused, not
    // dead) holds up the batcher no longer than the proposers in the batch wait.
    let outcomes = match within_propose_timeout(plane.forward_propose(commands)).await {
        Ok(outcomes) if outcomes.len() == count => outcomes,
        Ok(outcomes) => {
            let error = format!("the leader answered {} of {count} forwarded commands", outcomes.len());
            vec![Err(Status::internal(error)); count]
        }
        Err(refused) => vec![Err(refused); count],
    };
    for (outcome, answer) in outcomes.into_iter().zip(answers) {
        // The client may have stopped waiting; the write stands either way.
        let _ = answer.send(outcome);
    }
}

/// Proposes `batch`, on the leader, as one entry.
async fn propose(plane: &Plane, batch: Vec<Proposal>) {
    let (commands, answers): (Vec<Command>, Vec<_>) =
        batch.into_iter().map(|proposal| (proposal.command, proposal.answer)).unzip();
    let revoked: Vec<Option<i64>> = commands
        .iter()
        .map(|command| match &command.request {
            Some(command::Request::LeaseRevoke(revoke)) => Some(revoke.id),
            _ => None,
        })
        .collect();
    let count = commands.len();
    let metrics = &plane.metrics;
    metrics.proposals_pending.inc_by(count as i64);
    let entry = match <[Command; 1]>::try_from(commands) {
        Ok([single]) => single,
        Err(commands) => {
            Command { request: Some(command::Request::Batch(CommandBatch { commands })), caller: None, origin: 0 }
        }
    };
    let written = plane.raft.client_write(entry).await;
    metrics.proposals_pending.dec_by(count as i64);
    match &written {
        Ok(_) => metrics.proposals_committed.inc_by(count as u64),
        Err(_) => metrics.proposals_failed.inc_by(count as u64),
    };
    let results: Vec<Result<CommandResponse, Status>> = match written {
        Ok(written) if count == 1 => vec![match written.data.result {
            Some(result) => result.map_err(|error| status::from_store(&error)),
            None => Err(Status::internal("a command entry applied without a response")),
        }],
        Ok(written) if written.data.batch.len() == count => {
            written.data.batch.into_iter().map(|result| result.map_err(|error| status::from_store(&error))).collect()
        }
        Ok(written) => {
            vec![
                Err(Status::internal(format!("a batch of {count} answered {} times", written.data.batch.len())));
                count
            ]
        }
        Err(error) => vec![Err(write_refused(error)); count],
    };
    for ((result, answer), revoked) in results.into_iter().zip(answers).zip(revoked) {
        if let Ok(response) = &result {
            if let CommandResponse::LeaseGrant(granted) = response {
                plane.lessor.renew(granted.id, granted.ttl);
            }
            if let Some(id) = revoked {
                plane.lessor.forget(id);
            }
        }
        // The client may have stopped waiting; the write stands either way.
        let _ = answer.send(result);
    }
}

/// The client's error for a write Raft refused.
fn write_refused(error: RaftError<u64, ClientWriteError<u64, capstan_raft::PeerNode>>) -> Status {
    match error {
        // Refused before anything was appended: safe to retry on the new leader.
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => status::not_leader(),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            Status::failed_precondition(error.to_string())
        }
        RaftError::Fatal(error) => {
            tracing::error!(%error, "raft stopped");
            status::stopped()
        }
    }
}
