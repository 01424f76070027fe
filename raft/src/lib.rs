//! capstan-raft: the replicated log under the store.
//!
//! [`types`] declares openraft's type configuration and the protobuf form of its types;
//! [`log_store`] keeps the log and vote in RocksDB, durable before acknowledged or applied;
//! [`state_machine`] applies committed entries to the store and publishes watch events;
//! [`network`] carries Raft messages between planes; [`start`] puts them together.
//!
//! Invariants: this crate serves no client API (that is the plane's, in `src/`); the store
//! under it never learns of Raft beyond opaque meta values written with each apply.

// openraft's traits return its `StorageError`, which is large; boxing it here would only
// be undone at the trait boundary.
#![allow(clippy::result_large_err)]

pub mod error;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod own_proposals;
pub mod pipe;
pub mod service;
pub mod snapshot;
pub mod state_machine;
pub mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::broadcast;

use capstan_store::Store;

pub use error::RaftError;
pub use metrics::StorageMetrics;
pub use own_proposals::OwnProposals;
pub use service::PeerService;
pub use state_machine::{RevisionEvents, StateMachine};
pub use types::{cluster_id, member_id, new_member_id, NodeId, PeerNode, Raft, Response, TypeConfig};

/// How many applied revisions the event channel buffers before a slow watcher lags and
/// catches up from the store's history instead.
pub const EVENT_CHANNEL_REVISIONS: usize = 4096;
/// How many longest election waits each initial member waits, per member before it,
/// before it bootstraps the cluster itself (see [`bootstrap`]).
const BOOTSTRAP_STAGGER_ELECTIONS: u32 = 5;
const META_CLUSTER_ID: &[u8] = b"cluster_id";
const META_MEMBER_ID: &[u8] = b"member_id";
const META_REMOVED: &[u8] = b"removed";
const META_RESTORED_FROM: &[u8] = b"restored_from";
/// Snapshots travel to followers in chunks of this size.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1 << 20;

/// Timing and log-compaction settings of a plane's Raft.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub heartbeat_interval_ms: u64,
    /// How long a follower hears nothing from its leader before it campaigns, as etcd's
    /// `--election-timeout`: each plane waits between this and about twice this
    /// ([`RaftConfig::openraft_election_timeouts`]).
    pub election_timeout_ms: u64,
    /// Take a snapshot (and so purge the log behind it) every this many entries: cheap at
    /// any store size ([`snapshot`]).
    pub snapshot_entries: u64,
    /// Entries kept behind a snapshot for followers that are a little behind.
    pub log_entries_kept: u64,
}

impl RaftConfig {
    /// openraft's `(election_timeout_min, election_timeout_max)` for
    /// [`RaftConfig::election_timeout_ms`]. A follower that has seen a committed leader
    /// campaigns after `max` (the leader lease, in which it refuses other candidates) plus
    /// its own timeout, drawn once from `[min, max)`. With `min` just above the heartbeat
    /// and `max` the rest of the election timeout, that wait is between the election
    /// timeout and about twice it, as in etcd, instead of three to four times it.
    pub fn openraft_election_timeouts(&self) -> (u64, u64) {
        let min = self.heartbeat_interval_ms + 1;
        let max = self.election_timeout_ms.saturating_sub(min).max(min + 1);
        (min, max)
    }

    /// The longest a follower waits for a silent leader before it campaigns.
    pub fn longest_election_wait(&self) -> Duration {
        let (_, max) = self.openraft_election_timeouts();
        Duration::from_millis(2 * max)
    }
}

impl Default for RaftConfig {
    fn default() -> RaftConfig {
        RaftConfig {
            heartbeat_interval_ms: 50,
            election_timeout_ms: 300,
            snapshot_entries: 10_000,
            log_entries_kept: 5_000,
        }
    }
}

/// Who this plane is and which cluster it belongs to.
#[derive(Clone, Debug)]
pub struct PlaneIdentity {
    pub node_id: NodeId,
    pub cluster_id: u64,
    pub node: PeerNode,
    /// The members to bootstrap with when the data directory is new. Every initial member
    /// bootstraps with exactly this map (openraft requires identical configs), so it holds
    /// names and peer URLs only; each plane publishes its client URLs once it runs. Empty
    /// for a plane joining a running cluster: the leader sends it the membership.
    pub initial_members: BTreeMap<NodeId, PeerNode>,
}

/// What a data directory remembers of the plane that wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredIdentity {
    pub cluster_id: u64,
    pub node_id: NodeId,
    /// The cluster removed this member; its data must not serve again.
    pub removed: bool,
}

/// A running plane's Raft, with the store it drives and its event channel.
pub struct PlaneRaft {
    pub raft: Raft,
    pub store: Store,
    pub events: broadcast::Sender<Arc<RevisionEvents>>,
    /// Where the plane's proposers wait to be answered by this plane's own apply.
    pub own_proposals: Arc<OwnProposals>,
    /// The channels to peers, for anything else the plane sends them.
    pub peer_channels: network::PeerChannels,
    /// The plane's side of the Raft transport, to serve on its peer address.
    pub peer_service: PeerService,
}

/// Opens (creating if new) the plane's database in `data_dir`.
pub async fn open_store(data_dir: PathBuf) -> Result<Store, RaftError> {
    std::fs::create_dir_all(&data_dir)?;
    let db_dir = data_dir.join("db");
    let store =
        tokio::task::spawn_blocking(move || Store::open(&db_dir, &[log_store::CF_RAFT_LOG, log_store::CF_RAFT_META]))
            .await
            .map_err(std::io::Error::other)??;
    Ok(store)
}

/// The identity `store` was written under, if it was ever started.
pub fn stored_identity(store: &Store) -> Result<Option<StoredIdentity>, RaftError> {
    let (Some(cluster_id), Some(node_id)) =
        (read_meta_u64(store, META_CLUSTER_ID)?, read_meta_u64(store, META_MEMBER_ID)?)
    else {
        return Ok(None);
    };
    let removed = read_meta_u64(store, META_REMOVED)?.is_some();
    Ok(Some(StoredIdentity { cluster_id, node_id, removed }))
}

/// `--restore`: fills a new data directory from a backup and remembers which backup
/// (by its SHA-256), so that a restart with the same `--restore` can tell it is done.
pub fn restore_backup(store: &Store, backup: &std::path::Path) -> Result<(), RaftError> {
    let digest = state_machine::import_backup(store, backup)?;
    let db = store.db();
    let family = db.cf_handle(log_store::CF_RAFT_META).expect("opened with the store");
    db.put_cf_opt(family, META_RESTORED_FROM, digest, &log_store::synced()).map_err(capstan_store::StoreError::from)?;
    Ok(())
}

/// The SHA-256 of the backup this data directory was restored from, if it was.
pub fn restored_from(store: &Store) -> Result<Option<capstan_store::BackupDigest>, RaftError> {
    let db = store.db();
    let family = db.cf_handle(log_store::CF_RAFT_META).expect("opened with the store");
    let raw = db.get_cf(family, META_RESTORED_FROM).map_err(capstan_store::StoreError::from)?;
    Ok(raw.and_then(|raw| raw.try_into().ok()))
}

/// Records that the cluster removed this member, so that its data never serves again.
pub fn mark_removed(store: &Store) -> Result<(), RaftError> {
    write_meta_u64(store, META_REMOVED, 1)
}

/// Starts the plane's Raft on `store` (kept in `data_dir`), talking to peers over
/// `peer_channels` and measuring into `metrics` (`sync_faults`: tests' hook on log syncs);
/// bootstraps the cluster when the directory is new and `identity` names initial members.
pub async fn start(
    store: Store,
    data_dir: PathBuf,
    identity: &PlaneIdentity,
    config: &RaftConfig,
    peer_channels: network::PeerChannels,
    metrics: &StorageMetrics,
    sync_faults: Option<Arc<dyn log_store::SyncFaults>>,
) -> Result<PlaneRaft, RaftError> {
    check_identity(&store, identity)?;
    let (events, _) = broadcast::channel(EVENT_CHANNEL_REVISIONS);
    let log_store = log_store::LogStore::new(store.db().clone(), metrics.wal_fsync_seconds.clone(), sync_faults)?;
    let own_proposals = Arc::new(OwnProposals::random()?);
    let state_machine = StateMachine::new(
        store.clone(),
        data_dir.join("snapshots"),
        events.clone(),
        metrics.clone(),
        log_store.durability(),
        own_proposals.clone(),
    )?;
    let (election_timeout_min, election_timeout_max) = config.openraft_election_timeouts();
    let raft_config = openraft::Config {
        cluster_name: format!("{:x}", identity.cluster_id),
        heartbeat_interval: config.heartbeat_interval_ms,
        election_timeout_min,
        election_timeout_max,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_entries),
        max_in_snapshot_log_to_keep: config.log_entries_kept,
        ..Default::default()
    }
    .validate()?;
    let network = network::GrpcNetwork::new(
        identity.cluster_id,
        identity.node_id,
        peer_channels.clone(),
        metrics,
        log_store.durability(),
        log_store.appends(),
    );
    let (log_store_durability, log_store_appends) = (log_store.durability(), log_store.appends());
    let raft = Raft::new(identity.node_id, Arc::new(raft_config), network, log_store, state_machine).await?;
    if !identity.initial_members.is_empty() && !raft.is_initialized().await? {
        let stagger = config.longest_election_wait() * BOOTSTRAP_STAGGER_ELECTIONS;
        tokio::spawn(bootstrap(raft.clone(), identity.initial_members.clone(), identity.node_id, stagger));
    }
    let peer_service =
        PeerService::new(raft.clone(), identity.cluster_id, identity.node_id, log_store_durability, log_store_appends);
    Ok(PlaneRaft { raft, store, events, own_proposals, peer_channels, peer_service })
}

/// Bootstraps a new cluster. One member is enough, as openraft advises: `initialize` on
/// every member at once starts as many campaigns for the first term, which split the
/// vote and delay the first leader. The member with the lowest ID bootstraps at once;
/// each other member waits its turn (`stagger` per member before it) and bootstraps only
/// if no one has yet, so the cluster still forms when the first member is down.
async fn bootstrap(raft: Raft, members: BTreeMap<NodeId, PeerNode>, node_id: NodeId, stagger: Duration) {
    let rank = members.keys().position(|id| *id == node_id).unwrap_or(0) as u32;
    let mut metrics = raft.metrics();
    tokio::select! {
        () = tokio::time::sleep(stagger * rank) => {}
        // Another member's bootstrap reached this one, or this plane stopped.
        _ = metrics.wait_for(|metrics| metrics.membership_config.log_id().is_some()) => return,
    }
    tracing::info!(members = members.len(), "bootstrapping a new cluster");
    match raft.initialize(members).await {
        Ok(()) => {}
        // Another member bootstrapped the cluster meanwhile.
        Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {
            tracing::info!("another member bootstrapped the cluster first")
        }
        Err(error) => tracing::warn!(%error, "bootstrap refused"),
    }
}

/// A data directory remembers its cluster and member; a plane configured as another refuses
/// it, and a new directory takes the identity it is started with (both in one synced write).
fn check_identity(store: &Store, identity: &PlaneIdentity) -> Result<(), RaftError> {
    let stored_cluster = read_meta_u64(store, META_CLUSTER_ID)?;
    let stored_member = read_meta_u64(store, META_MEMBER_ID)?;
    if let Some(found) = stored_cluster.filter(|found| *found != identity.cluster_id) {
        return Err(RaftError::ClusterMismatch { found, expected: identity.cluster_id });
    }
    if let Some(found) = stored_member.filter(|found| *found != identity.node_id) {
        return Err(RaftError::MemberMismatch { found, expected: identity.node_id });
    }
    if stored_cluster.is_some() && stored_member.is_some() {
        return Ok(());
    }
    let db = store.db();
    let family = db.cf_handle(log_store::CF_RAFT_META).expect("opened with the store");
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(family, META_CLUSTER_ID, identity.cluster_id.encode_to_vec());
    batch.put_cf(family, META_MEMBER_ID, identity.node_id.encode_to_vec());
    db.write_opt(batch, &log_store::synced()).map_err(capstan_store::StoreError::from)?;
    Ok(())
}

fn read_meta_u64(store: &Store, name: &[u8]) -> Result<Option<u64>, RaftError> {
    let db = store.db();
    let family = db.cf_handle(log_store::CF_RAFT_META).expect("opened with the store");
    match db.get_cf(family, name).map_err(capstan_store::StoreError::from)? {
        Some(raw) => Ok(Some(u64::decode(raw.as_slice()).map_err(error::DecodeError::from)?)),
        None => Ok(None),
    }
}

fn write_meta_u64(store: &Store, name: &[u8], value: u64) -> Result<(), RaftError> {
    let db = store.db();
    let family = db.cf_handle(log_store::CF_RAFT_META).expect("opened with the store");
    db.put_cf_opt(family, name, value.encode_to_vec(), &log_store::synced())
        .map_err(capstan_store::StoreError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::RaftConfig;

    /// openraft accepts every timing the plane's flags allow, and a follower's wait for a
    /// silent leader (its lease plus its own timeout) spans the election timeout to less
    /// than twice it, as etcd's `--election-timeout` does.
    #[test]
    fn election_timeouts_give_the_follower_wait_etcd_users_expect() {
        for heartbeat_interval_ms in 1..=100 {
            for election_timeout_ms in (3 * heartbeat_interval_ms)..=(10 * heartbeat_interval_ms) {
                let config = RaftConfig { heartbeat_interval_ms, election_timeout_ms, ..RaftConfig::default() };
                let (min, max) = config.openraft_election_timeouts();
                let openraft = openraft::Config {
                    heartbeat_interval: heartbeat_interval_ms,
                    election_timeout_min: min,
                    election_timeout_max: max,
                    ..Default::default()
                };
                assert!(openraft.validate().is_ok(), "{config:?} gives ({min}, {max})");
                if heartbeat_interval_ms >= 3 {
                    let (shortest_wait, longest_wait) = (max + min, 2 * max);
                    assert_eq!(shortest_wait, election_timeout_ms, "{config:?}");
                    assert!(longest_wait < 2 * election_timeout_ms, "{config:?}");
                    assert_eq!(config.longest_election_wait().as_millis() as u64, longest_wait);
                }
            }
        }
    }
}
