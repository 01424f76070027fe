//! capstan-scheduler: the leader-elected scheduler and controllers.
//!
//! Every candidate (`capstan plane --scheduler` runs one per plane; `capstan scheduler`
//! runs one anywhere) campaigns for a lease-backed leader key ([`election`]). The leader
//! lists everything under `/registry/` at one revision and watches from there
//! ([`leader`], over the [`cache::Cache`]); it binds waiting pods to nodes
//! ([`schedule`], [`plugins`]), many per txn, and runs the ReplicaSet, garbage-collection
//! and node-lifecycle controllers ([`controllers`]). Each write compares the leader key's
//! create_revision, so a deposed leader can never bind.
//!
//! Invariant: it reaches the planes only over the network API (an etcd v3 client); it
//! never depends on capstan-store or capstan-raft. The decisions (`schedule`, `plugins`,
//! `controllers`) do no IO.

pub mod cache;
pub mod controllers;
pub mod election;
pub mod leader;
pub mod plugins;
pub mod schedule;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;

pub use election::{Fence, LEADER_KEY};

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    Client(#[from] capstan_client::ClientError),
    /// The leader key is no longer the one this scheduler created.
    #[error("deposed: another scheduler leads")]
    Deposed,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Who this candidate is, written as the leader key's value.
    pub identity: String,
    /// The leader lease's TTL (Kubernetes: 15 s).
    pub lease_ttl: Duration,
    /// How often the leader renews it (Kubernetes retries every 2 s).
    pub renew_interval: Duration,
    pub node_monitor_grace: Duration,
    pub pod_eviction_timeout: Duration,
}

impl SchedulerConfig {
    /// Kubernetes' defaults.
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
            lease_ttl: Duration::from_secs(15),
            renew_interval: Duration::from_secs(2),
            node_monitor_grace: Duration::from_secs(40),
            pod_eviction_timeout: Duration::from_secs(300),
        }
    }
}

/// Counters an operator (and a test) reads.
#[derive(Debug, Default)]
pub struct Metrics {
    pub leader: AtomicBool,
    pub binds: AtomicU64,
    pub bind_conflicts: AtomicU64,
    pub unschedulable: AtomicU64,
    /// Values under `/registry/` that are not valid objects (written by another client);
    /// they are skipped with a warning.
    pub decode_errors: AtomicU64,
}

impl Metrics {
    fn record_decode_error(&self, error: &capstan_proto::objects::DecodeError) {
        let count = self.decode_errors.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(%error, decode_errors = count, "skipping an object that does not decode");
    }
}

/// Back-off after an error, before campaigning again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Campaigns, leads while elected, and campaigns again when leadership is lost, until
/// `shutdown` turns true; a leader then resigns so a standby takes over at once.
pub async fn run(client: Client, config: SchedulerConfig, metrics: &Metrics, mut shutdown: watch::Receiver<bool>) {
    let election = election::ElectionConfig {
        key: LEADER_KEY.to_string(),
        identity: config.identity.clone(),
        lease_ttl: config.lease_ttl,
        renew_interval: config.renew_interval,
    };
    while !*shutdown.borrow() {
        let campaign = tokio::select! {
            _ = shutdown.changed() => return,
            campaign = election::campaign(&client, &election) => campaign,
        };
        let mut leadership = match campaign {
            Ok(leadership) => leadership,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(RETRY_DELAY).await;
                continue;
            }
        };
        metrics.leader.store(true, Ordering::Relaxed);
        let outcome = leader::lead(&client, &mut leadership, &config, metrics, &mut shutdown).await;
        metrics.leader.store(false, Ordering::Relaxed);
        match outcome {
            Ok(leader::Exit::Shutdown) => {
                leadership.resign(&client).await;
                return;
            }
            Ok(leader::Exit::Lost) | Err(SchedulerError::Deposed) => {
                tracing::warn!("lost scheduler leadership; campaigning again");
                leadership.resign(&client).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "scheduler leader failed; resigning and campaigning again");
                leadership.resign(&client).await;
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
    }
}
