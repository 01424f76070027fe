//! Leader election on a lease-backed key, like Kubernetes' leader election over a Lease
//! object, with etcd's primitives: a candidate grants a lease and creates the leader key
//! with it only if no key exists. The key's create_revision is the **fencing token**:
//! every write the leader makes compares it, so once the key is gone (the lease expired,
//! or was revoked on a clean stop) and another candidate created it anew, a deposed
//! leader that still believes it leads can change nothing.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::SchedulerError;

/// Where the scheduler's leader records itself (Kubernetes keeps kube-scheduler's lease
/// at /registry/leases/kube-system/kube-scheduler).
pub const LEADER_KEY: &str = "/registry/leases/kube-system/capstan-scheduler";

/// The token a leader's writes carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub create_revision: i64,
}

impl Fence {
    /// Holds only while the leader key is the one this leader created.
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }
}

/// Leadership won: the fence, the lease behind it, and a signal that turns true when it
/// is lost (the lease could not be renewed in time).
pub struct Leadership {
    pub fence: Fence,
    pub lease_id: i64,
    pub lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Gives leadership up at once (a clean stop): revoking the lease deletes the key, so
    /// a standby takes over without waiting for the lease to expire.
    pub async fn resign(self, client: &Client) {
        self.keeper.abort();
        if let Err(e) = client.lease_client().revoke(self.lease_id).await {
            tracing::warn!(error = %e, "could not revoke the scheduler's lease; a standby takes over when it expires");
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub key: String,
    /// Written as the key's value, so operators see who leads.
    pub identity: String,
    pub lease_ttl: Duration,
    pub renew_interval: Duration,
}

/// Campaigns until this candidate leads. While another leads, waits for its key to be
/// deleted (by lease expiry or resignation) and tries again.
pub async fn campaign(client: &Client, config: &ElectionConfig) -> Result<Leadership, SchedulerError> {
    let ttl_secs = config.lease_ttl.as_secs().max(1) as i64;
    loop {
        let lease_id = client.lease_client().grant(ttl_secs, None).await?.id();
        let txn = Txn::new()
            .when([Compare::create_revision(config.key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                config.key.clone(),
                config.identity.clone(),
                Some(PutOptions::new().with_lease(lease_id)),
            )])
            .or_else([TxnOp::get(config.key.clone(), None)]);
        let response = match client.kv_client().txn(txn).await {
            Ok(response) => response,
            Err(error) => {
                // The txn may have taken effect; with the lease revoked, a key it created
                // goes too, and nobody waits for a lease no one renews.
                let _ = client.lease_client().revoke(lease_id).await;
                return Err(error.into());
            }
        };
        let revision = response.header().map_or(0, |h| h.revision());
        if response.succeeded() {
            let fence = Fence { key: config.key.clone(), create_revision: revision };
            let (signal, lost) = watch::channel(false);
            let keeper = tokio::spawn(keep_alive(client.clone(), lease_id, config.clone(), signal));
            tracing::info!(identity = %config.identity, fence = revision, "became the scheduler leader");
            return Ok(Leadership { fence, lease_id, lost, keeper });
        }
        // Someone leads: our lease is not needed while we wait.
        let _ = client.lease_client().revoke(lease_id).await;
        let holder = response.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => {
                get.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            }
            _ => None,
        });
        tracing::info!(holder = holder.as_deref().unwrap_or("?"), "another scheduler leads; standing by");
        wait_for_deletion(client, &config.key, revision + 1).await?;
    }
}

/// Returns once `key` is deleted at or after `from_revision` (or is already gone).
async fn wait_for_deletion(client: &Client, key: &str, from_revision: i64) -> Result<(), SchedulerError> {
    let options = WatchOptions::new().with_start_revision(from_revision);
    let mut stream = client.watch_client().watch(key, Some(options)).await?;
    while let Some(response) = stream.message().await? {
        if response.canceled() {
            // Compacted past our revision: look again from the start.
            return Ok(());
        }
        if response.events().iter().any(|event| event.event_type() == EventType::Delete) {
            return Ok(());
        }
    }
    Ok(())
}

/// Renews the lease every `renew_interval`. Leadership is lost when the lease is gone
/// (a renewal answers TTL 0) or no renewal has succeeded for a whole TTL, after which
/// the store has expired the lease and another candidate may lead.
async fn keep_alive(client: Client, lease_id: i64, config: ElectionConfig, lost: watch::Sender<bool>) {
    let mut renewed_at = Instant::now();
    // Stop acting a little before the store would expire the lease.
    let deadline = config.lease_ttl.saturating_sub(config.renew_interval);
    let mut interval = tokio::time::interval(config.renew_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match capstan_client::renew_lease(&client, lease_id, config.renew_interval).await {
            Ok(ttl) if ttl > 0 => renewed_at = Instant::now(),
            Ok(_) => {
                tracing::warn!(lease = lease_id, "the scheduler's lease expired; leadership lost");
                let _ = lost.send(true);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the scheduler's lease"),
        }
        if renewed_at.elapsed() >= deadline {
            tracing::warn!(lease = lease_id, "no lease renewal for a whole TTL; leadership lost");
            let _ = lost.send(true);
            return;
        }
    }
}
