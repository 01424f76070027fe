//! Auto-compaction (`--auto-compaction-mode periodic|revision --auto-compaction-retention`,
//! as etcd's). Every plane samples its revision over time; the leader proposes the
//! compaction, which Raft applies on every plane like a client's.
//!
//! - periodic: keep `retention` of history. Samples are taken every tenth of the retention
//!   (at least every second); the store is compacted to the newest revision sampled at
//!   least `retention` ago.
//! - revision: keep the last `retention` revisions, checked every 5 minutes (as etcd).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capstan_proto::etcdserverpb as pb;
use capstan_proto::raftpb::{command, Command};

use super::Plane;

/// What `--auto-compaction-mode` and `--auto-compaction-retention` ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    Periodic(Duration),
    Revision(i64),
}

/// How often the revision mode looks (etcd's).
const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// The periodic mode samples at least this often.
const PERIODIC_SAMPLE_MIN: Duration = Duration::from_secs(1);

impl AutoCompaction {
    /// Parses etcd's flags: periodic takes a duration (`1h`, `30m`; a bare number is hours),
    /// revision a count of revisions.
    pub fn parse(mode: &str, retention: &str) -> anyhow::Result<AutoCompaction> {
        match mode {
            "periodic" => {
                let duration =
                    match retention.parse::<u64>() {
                        Ok(hours) => Duration::from_secs(hours.checked_mul(3600).ok_or_else(|| {
                            anyhow::anyhow!("--auto-compaction-retention {retention:?}: too many hours")
                        })?),
                        Err(_) => humantime::parse_duration(retention).map_err(|error| {
                            anyhow::anyhow!("--auto-compaction-retention {retention:?}: not a duration ({error})")
                        })?,
                    };
                if duration.is_zero() {
                    anyhow::bail!("--auto-compaction-retention must be positive");
                }
                Ok(AutoCompaction::Periodic(duration))
            }
            "revision" => match retention.parse::<i64>() {
                Ok(revisions) if revisions > 0 => Ok(AutoCompaction::Revision(revisions)),
                _ => {
                    anyhow::bail!("--auto-compaction-retention {retention:?}: expected a positive number of revisions")
                }
            },
            other => anyhow::bail!("--auto-compaction-mode {other:?}: expected periodic or revision"),
        }
    }

    fn interval(self) -> Duration {
        match self {
            AutoCompaction::Periodic(retention) => (retention / 10).max(PERIODIC_SAMPLE_MIN.min(retention)),
            AutoCompaction::Revision(_) => REVISION_CHECK_INTERVAL,
        }
    }
}

/// The revision to compact to, from the samples `(when, revision)` (oldest first; those no
/// longer needed are dropped), the current revision and the time now; None: nothing to do.
fn target(mode: AutoCompaction, samples: &mut VecDeque<(Instant, i64)>, current: i64, now: Instant) -> Option<i64> {
    match mode {
        AutoCompaction::Revision(retention) => Some(current - retention).filter(|target| *target > 0),
        AutoCompaction::Periodic(retention) => {
            let cutoff = now.checked_sub(retention)?;
            let mut found = None;
            while let Some(&(when, revision)) = samples.front() {
                if when > cutoff {
                    break;
                }
                found = Some(revision);
                samples.pop_front();
            }
            // The newest old-enough sample stays: it is the next cutoff's candidate too.
            if let Some(revision) = found {
                samples.push_front((cutoff, revision));
            }
            found
        }
    }
}

/// Runs for the plane's life.
pub async fn run(plane: Arc<Plane>, mode: AutoCompaction) {
    let mut tick = tokio::time::interval(mode.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = VecDeque::new();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let current = plane.store.revision();
        samples.push_back((now, current));
        let Some(target) = target(mode, &mut samples, current, now) else { continue };
        if target <= plane.store.compacted_revision() || !plane.is_leader() {
            continue;
        }
        let compact = pb::CompactionRequest { revision: target, physical: false };
        match plane
            .propose_local(Command { request: Some(command::Request::Compaction(compact)), caller: None, origin: 0 })
            .await
        {
            Ok(_) => tracing::info!(revision = target, ?mode, "auto-compacted"),
            Err(error) => tracing::warn!(revision = target, %error, "auto-compaction failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_as_etcd_reads_them() {
        assert_eq!(
            AutoCompaction::parse("periodic", "1").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(3600))
        );
        assert_eq!(
            AutoCompaction::parse("periodic", "30m").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(1800))
        );
        assert_eq!(AutoCompaction::parse("revision", "1000").unwrap(), AutoCompaction::Revision(1000));
        for (mode, retention) in [("periodic", "0"), ("periodic", "soon"), ("revision", "-3"), ("hourly", "1")] {
            assert!(AutoCompaction::parse(mode, retention).is_err(), "{mode} {retention}");
        }
        assert_eq!(AutoCompaction::Periodic(Duration::from_secs(3600)).interval(), Duration::from_secs(360));
        assert_eq!(AutoCompaction::Periodic(Duration::from_millis(500)).interval(), Duration::from_millis(500));
    }

    #[test]
    fn periodic_mode_compacts_to_what_was_current_a_retention_ago() {
        let mode = AutoCompaction::Periodic(Duration::from_secs(10));
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
        for (secs, revision) in [(0, 5), (1, 8), (2, 20), (3, 21)] {
            samples.push_back((at(secs), revision));
        }
        // Nothing is a retention old yet.
        assert_eq!(target(mode, &mut samples, 21, at(9)), None);
        // At 11 s the samples of 0 s and 1 s are old enough: the newer of them wins.
        assert_eq!(target(mode, &mut samples, 30, at(11)), Some(8));
        assert_eq!(target(mode, &mut samples, 30, at(11)), Some(8), "kept as the candidate");
        assert_eq!(target(mode, &mut samples, 40, at(13)), Some(21));
    }

    #[test]
    fn revision_mode_keeps_the_last_retention_revisions() {
        let mode = AutoCompaction::Revision(100);
        let mut samples = VecDeque::new();
        assert_eq!(target(mode, &mut samples, 50, Instant::now()), None);
        assert_eq!(target(mode, &mut samples, 350, Instant::now()), Some(250));
    }
}
