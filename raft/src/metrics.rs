//! What the Raft storage and transport measure for the plane's metrics endpoint: WAL
//! syncs, applies, snapshots and folded commit notices. The plane registers these handles;
//! they are shared, cheap clones.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

#[derive(Clone, Debug)]
pub struct StorageMetrics {
    /// One WAL sync, which makes every append queued before it durable.
    pub wal_fsync_seconds: Histogram,
    /// One apply of a batch of committed entries to the store.
    pub apply_seconds: Histogram,
    pub snapshots_built: Counter,
    pub snapshots_sent: Counter,
    pub snapshots_received: Counter,
    /// A commit-only AppendEntries to a follower left unsent, the next one carrying the
    /// commit instead (`network`).
    pub commit_notices_folded: Counter,
}

impl Default for StorageMetrics {
    fn default() -> StorageMetrics {
        StorageMetrics {
            wal_fsync_seconds: Histogram::new(duration_buckets()),
            apply_seconds: Histogram::new(duration_buckets()),
            snapshots_built: Counter::default(),
            snapshots_sent: Counter::default(),
            snapshots_received: Counter::default(),
            commit_notices_folded: Counter::default(),
        }
    }
}

/// Histogram buckets for durations: 100 µs to about 6.5 s, doubling (as etcd's disk
/// histograms start at 1 ms, this also sees fast local disks).
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 17)
}

/// Times `work` into `histogram`.
pub fn timed<T>(histogram: &Histogram, work: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let result = work();
    histogram.observe(started.elapsed().as_secs_f64());
    result
}
