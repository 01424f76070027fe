//! When a plane builds a Raft snapshot.
//!
//! The store is durable on its own, so a snapshot exists only to let the log be purged
//! (and to send to a follower that is too far behind). Building one writes the whole store
//! to a file, so its cost grows with the store while the log that it lets go of does not.
//! A plane therefore snapshots once both hold: at least `--snapshot-count` entries since
//! the last snapshot (etcd's rule), and at least as many log bytes written since then as
//! the last snapshot took. The second rule keeps the cost of snapshots in proportion to
//! what is written, whatever the store's size (as a log-structured store rewrites a file
//! once its garbage outgrows it), and it bounds the log to about the store's size.
//! openraft's own policy is off (`SnapshotPolicy::Never`); this schedule triggers it.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::types::Raft;

/// Where the log stands against the last snapshot.
#[derive(Debug, Default)]
struct State {
    /// Log bytes appended since the last snapshot was taken (or the plane started).
    bytes_since: u64,
    /// The last snapshot's log index (0: none yet).
    snapshot_index: u64,
    /// The last snapshot's size.
    snapshot_bytes: u64,
    /// A snapshot has been asked for and not yet taken.
    requested: bool,
}

/// Shared by the log store, which reports appends, and the state machine, which reports
/// the snapshots it takes; a snapshot falls due on an append.
#[derive(Debug)]
pub struct SnapshotSchedule {
    entries_min: u64,
    state: Mutex<State>,
    due: mpsc::Sender<()>,
}

impl SnapshotSchedule {
    /// A schedule for snapshots at least `entries_min` entries apart (the state machine
    /// reports the current one as it opens); the receiver hears when one falls due, and
    /// closes once the log store and the state machine are gone.
    pub fn new(entries_min: u64) -> (Arc<SnapshotSchedule>, mpsc::Receiver<()>) {
        let (due, receiver) = mpsc::channel(1);
        (Arc::new(SnapshotSchedule { entries_min, state: Mutex::default(), due }), receiver)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The log now ends at `last_index`, after an append of `bytes`.
    pub fn appended(&self, last_index: u64, bytes: u64) {
        let mut state = self.state();
        state.bytes_since += bytes;
        let entries_since = last_index.saturating_sub(state.snapshot_index);
        if !state.requested && entries_since >= self.entries_min && state.bytes_since >= state.snapshot_bytes {
            state.requested = true;
            // The channel holds one request; a full channel already has it.
            let _ = self.due.try_send(());
        }
    }

    /// A snapshot up to `index` of `bytes` was built or installed (or found on opening).
    pub fn taken(&self, index: u64, bytes: u64) {
        *self.state() = State { snapshot_index: index, snapshot_bytes: bytes, ..State::default() };
    }

    /// Building the snapshot asked for failed; the next append may ask again.
    pub fn failed(&self) {
        self.state().requested = false;
    }
}

/// Asks `raft` for a snapshot each time one falls due, until the schedule closes.
pub async fn snapshot_when_due(raft: Raft, mut due: mpsc::Receiver<()>) {
    while due.recv().await.is_some() {
        if let Err(error) = raft.trigger().snapshot().await {
            tracing::warn!(%error, "cannot ask for a snapshot; no more are scheduled");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SnapshotSchedule;

    /// Appends of 100 bytes at a time, one entry each, from `first` to `last`; returns the
    /// index at which a snapshot fell due, if one did.
    fn append(
        schedule: &SnapshotSchedule,
        due: &mut tokio::sync::mpsc::Receiver<()>,
        entries: std::ops::RangeInclusive<u64>,
    ) -> Option<u64> {
        for index in entries {
            schedule.appended(index, 100);
            if due.try_recv().is_ok() {
                return Some(index);
            }
        }
        None
    }

    #[test]
    fn a_snapshot_falls_due_after_enough_entries_and_enough_bytes() {
        let (schedule, mut due) = SnapshotSchedule::new(10);
        // The first: after 10 entries, since no snapshot has cost anything yet.
        assert_eq!(append(&schedule, &mut due, 1..=100), Some(10));
        // Asked once until taken.
        assert_eq!(append(&schedule, &mut due, 11..=100), None);
        // A small store: the entries decide (10 entries are 1,000 bytes).
        schedule.taken(100, 500);
        assert_eq!(append(&schedule, &mut due, 101..=200), Some(110));
        // A large store: 5,000 bytes of log, 50 entries, before the next.
        schedule.taken(110, 5_000);
        assert_eq!(append(&schedule, &mut due, 111..=300), Some(160));
        // A failed build lets the next append ask again.
        schedule.failed();
        assert_eq!(append(&schedule, &mut due, 161..=161), Some(161));
    }

    #[test]
    fn a_restarted_plane_counts_from_its_current_snapshot() {
        let (schedule, mut due) = SnapshotSchedule::new(10);
        schedule.taken(50, 2_000);
        // 20 entries of log since the restart, 10 past the snapshot's 50 already there.
        assert_eq!(append(&schedule, &mut due, 51..=200), Some(70));
    }
}
