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

use std::time::Duration;

use etcd_client::Client;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
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

/// What the scheduler measures, for the plane's metrics endpoint (cheap, shared clones).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// 1 while this scheduler leads.
    pub leader: Gauge,
    /// Pods waiting for a node: queued, or parked because none fits.
    pub pending_pods: Gauge,
    /// Scheduling attempts by result: `scheduled` (bound), `unschedulable`, `conflict`
    /// (the pod changed under the bind, which was refused).
    pub attempts: Family<[(&'static str, &'static str); 1], Counter>,
    /// One txn of binds, from send to answer.
    pub bind_seconds: Histogram,
    /// Values under `/registry/` that are not valid objects (written by another client);
    /// they are skipped with a warning.
    pub decode_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            leader: Gauge::default(),
            pending_pods: Gauge::default(),
            attempts: Family::default(),
            bind_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            decode_errors: Counter::default(),
        }
    }
}

impl Metrics {
    /// Registers every family under `registry` (the plane names them `capstan_scheduler_*`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("leader", "1 while this plane's scheduler leads", self.leader.clone());
        registry.register("pending_pods", "Pods waiting for a node", self.pending_pods.clone());
        registry.register("attempts", "Scheduling attempts by result", self.attempts.clone());
        registry.register_with_unit("bind_duration", "One txn of binds", Unit::Seconds, self.bind_seconds.clone());
        registry.register("decode_errors", "Values under /registry/ that do not decode", self.decode_errors.clone());
    }

    fn attempted(&self, result: &'static str, count: u64) {
        self.attempts.get_or_create(&[("result", result)]).inc_by(count);
    }

    fn record_decode_error(&self, error: &capstan_proto::objects::DecodeError) {
        let count = self.decode_errors.inc() + 1;
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
        metrics.leader.set(1);
        let outcome = leader::lead(&client, &mut leadership, &config, metrics, &mut shutdown).await;
        metrics.leader.set(0);
        metrics.pending_pods.set(0);
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
