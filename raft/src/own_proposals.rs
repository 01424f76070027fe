//! The writes this plane proposed for its own clients, answered as this plane applies them.
//!
//! A follower forwards its clients' writes to the leader, which answers once it has applied
//! them. But the follower learns of the commit from the leader as well (the AppendEntries
//! that follows it) and applies the same commands itself, at times before the leader's
//! answer has come back: when the commit rides on the next entries' AppendEntries, sent
//! as the leader answers. (One write at a time it seldom does: the leader holds a commit
//! notice back for its next append, `network`, and the answer comes first.) So a proposer
//! registers here, its command carries the origin it is given through Raft,
//! and whichever comes first answers the client: this plane's own apply, or the answer
//! the batcher has (the leader's, for a follower). On the leader the apply also answers a
//! task hand-off sooner than the batcher does.
//!
//! Answering from a plane's own apply is as safe as the leader's answer: a plane applies
//! only committed entries, and the state machine is deterministic, so every plane computes
//! the same response. Only responses are passed on here; a refusal (a failed permission
//! check, say) still reaches the client through the batcher, as a status.
//!
//! An origin is unique to this process: a random base plus a count, so that entries
//! proposed by another plane, or by this plane before a restart (replayed from the log
//! now), never answer a command of this process. [`OwnProposals::applied`] skips, without
//! a lock, every origin outside the range this process has handed out.
//!
//! Worked example: the base is `0x9f3e_…_0100`, and three writes have registered, so the
//! origins handed out are `…0100`, `…0101` and `…0102`. An applied command with origin
//! `…0101` (this plane's, still waiting) answers its client and leaves the map; one with
//! origin `…0101` again (impossible unless proposed twice) finds nothing; one with origin 0
//! (a plane's own command, such as a lease revoke) or another plane's random origin falls
//! outside `…0100..…0103` and is skipped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

use capstan_store::CommandResponse;

/// The origins this plane's clients are waiting on, and where their answers go.
pub struct OwnProposals {
    base: u64,
    /// How many origins have been handed out, from `base` on.
    issued: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<CommandResponse>>>,
}

/// One proposer's place in [`OwnProposals`]: the origin its command carries, and the
/// response this plane's apply sends. Dropping it (answered or not) leaves the map.
pub struct OwnProposal<'a> {
    proposals: &'a OwnProposals,
    origin: u64,
    pub applied: oneshot::Receiver<CommandResponse>,
}

impl OwnProposal<'_> {
    /// The origin to put on the command.
    pub fn origin(&self) -> u64 {
        self.origin
    }
}

impl Drop for OwnProposal<'_> {
    fn drop(&mut self) {
        self.proposals.lock().remove(&self.origin);
    }
}

impl OwnProposals {
    /// Origins start at `base`, which must differ between processes (a random number).
    pub fn new(base: u64) -> OwnProposals {
        OwnProposals { base, issued: AtomicU64::new(0), waiting: Mutex::default() }
    }

    /// With a base drawn from the operating system's randomness.
    pub fn random() -> std::io::Result<OwnProposals> {
        let base = getrandom::u64().map_err(|error| std::io::Error::other(format!("no randomness: {error}")))?;
        Ok(OwnProposals::new(base))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<CommandResponse>>> {
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a proposer under a fresh origin. 0 means "no origin" in a command, so it
    /// is never handed out.
    pub fn register(&self) -> OwnProposal<'_> {
        let origin = loop {
            let origin = self.base.wrapping_add(self.issued.fetch_add(1, Ordering::Relaxed));
            if origin != 0 {
                break origin;
            }
        };
        let (answer, applied) = oneshot::channel();
        self.lock().insert(origin, answer);
        OwnProposal { proposals: self, origin, applied }
    }

    /// Called as a command with `origin` applies with `response`: answers the proposer
    /// that registered it here, if it is still waiting.
    pub(crate) fn applied(&self, origin: u64, response: &CommandResponse) {
        if origin.wrapping_sub(self.base) >= self.issued.load(Ordering::Relaxed) {
            return;
        }
        if let Some(answer) = self.lock().remove(&origin) {
            // The proposer may have been answered by the batcher meanwhile.
            let _ = answer.send(response.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::etcdserverpb as pb;

    fn response(revision: i64) -> CommandResponse {
        let header = pb::ResponseHeader { revision, ..Default::default() };
        CommandResponse::Put(pb::PutResponse { header: Some(header), prev_kv: None })
    }

    #[test]
    fn an_applied_origin_answers_its_proposer_once() {
        let proposals = OwnProposals::new(7);
        let mut first = proposals.register();
        let mut second = proposals.register();
        assert_ne!(first.origin(), second.origin());
        proposals.applied(second.origin(), &response(5));
        proposals.applied(second.origin(), &response(6));
        assert_eq!(second.applied.try_recv().unwrap(), response(5));
        assert!(first.applied.try_recv().is_err(), "another origin's apply answers nobody else");
    }

    #[test]
    fn origins_outside_what_this_process_handed_out_answer_nothing() {
        let proposals = OwnProposals::new(u64::MAX - 1);
        let mut waiting = proposals.register();
        assert_eq!(waiting.origin(), u64::MAX - 1);
        assert_eq!(proposals.register().origin(), u64::MAX);
        assert_eq!(proposals.register().origin(), 1, "0 is skipped as the count wraps");
        // Another plane's (another base), none, and one not handed out yet.
        let other = OwnProposals::new(1 << 40);
        proposals.applied(other.register().origin(), &response(3));
        proposals.applied(0, &response(3));
        proposals.applied(2, &response(3));
        assert!(waiting.applied.try_recv().is_err());
        proposals.applied(waiting.origin(), &response(4));
        assert_eq!(waiting.applied.try_recv().unwrap(), response(4));
    }

    #[test]
    fn a_proposer_that_stopped_waiting_leaves_the_map() {
        let proposals = OwnProposals::new(100);
        let origin = proposals.register().origin();
        assert!(proposals.lock().is_empty());
        // Applying it later is harmless.
        proposals.applied(origin, &response(2));
    }
}
