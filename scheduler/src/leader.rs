//! What the elected leader does: keep the informer cache (list at a revision, watch from
//! it, relist after compaction), schedule waiting pods in batches, run the controllers,
//! and commit every write in txns that compare the fence.
//!
//! One task owns the cache and does everything in turn, so no decision ever sees a
//! half-applied event. Successful writes go into the cache at once (their watch events
//! arrive later and change nothing), so the next decision already sees them.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use capstan_client::{create_op, prefix_end, resource_version, update_op, Objects};
use capstan_proto::objects::{
    set_condition, timestamp, Condition, Object, Pod, CONDITION_FALSE, CONDITION_TRUE, NODE_LEASE_PREFIX,
    POD_SCHEDULED, REASON_UNSCHEDULABLE, REGISTRY_PREFIX,
};
use etcd_client::{Client, Compare, CompareOp, EventType, TxnOp, WatchOptions, WatchStream};
use futures::FutureExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::{Cache, Change};
use crate::controllers::{collect_garbage, reconcile_replica_set, LifecycleConfig, NodeLifecycle, Write};
use crate::election::{Fence, Leadership};
use crate::schedule::{needs_scheduling, Decision, Queue, Scheduler};
use crate::{Metrics, SchedulerConfig, SchedulerError};

/// etcd's limit on the ops of each txn branch; one compare is the fence.
const TXN_WRITES_MAX: usize = 127;
/// The most encoded object bytes one txn carries, well under the planes' 1.5 MiB
/// request limit.
const TXN_BYTES_MAX: usize = 1 << 20;
/// How often the node-lifecycle controller looks at leases and deadlines.
const LIFECYCLE_INTERVAL: Duration = Duration::from_secs(1);
/// Parked pods are retried at least this often, even if nothing seems to change.
const UNSCHEDULABLE_RETRY_INTERVAL: Duration = Duration::from_secs(60);

/// Why leading stopped.
pub enum Exit {
    Shutdown,
    Lost,
}

/// Leads until shutdown or until leadership is lost.
pub async fn lead(
    client: &Client,
    leadership: &mut Leadership,
    config: &SchedulerConfig,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Exit, SchedulerError> {
    loop {
        let mut state = State::list(client, leadership.fence.clone(), config, metrics).await?;
        match state.run(leadership, shutdown).await? {
            Run::Exit(exit) => return Ok(exit),
            Run::Relist => tracing::info!("watch compacted away; relisting"),
        }
    }
}

/// Splits writes (by index) into txn-sized groups: at most [`TXN_WRITES_MAX`] writes and
/// [`TXN_BYTES_MAX`] bytes each (a single larger write goes alone).
fn chunks(indices: &[usize], bytes: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut size = 0;
    for &index in indices {
        let this = bytes(index);
        match groups.last_mut() {
            Some(group) if group.len() < TXN_WRITES_MAX && size + this <= TXN_BYTES_MAX => {
                group.push(index);
                size += this;
            }
            _ => {
                groups.push(vec![index]);
                size = this;
            }
        }
    }
    groups
}

enum Run {
    Exit(Exit),
    Relist,
}

struct State<'a> {
    client: &'a Client,
    fence: Fence,
    config: &'a SchedulerConfig,
    metrics: &'a Metrics,
    cache: Cache,
    queue: Queue,
    scheduler: Scheduler,
    lifecycle: NodeLifecycle,
    dirty_replica_sets: BTreeSet<String>,
    collect_garbage: bool,
}

impl<'a> State<'a> {
    async fn list(
        client: &'a Client,
        fence: Fence,
        config: &'a SchedulerConfig,
        metrics: &'a Metrics,
    ) -> Result<Self, SchedulerError> {
        let listed = Objects::new(client.clone()).list_prefix(REGISTRY_PREFIX).await?;
        for error in &listed.undecodable {
            metrics.record_decode_error(error);
        }
        let leases: BTreeSet<String> = listed
            .other_keys
            .iter()
            .filter_map(|key| key.strip_prefix(NODE_LEASE_PREFIX.as_bytes()))
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect();
        let cache = Cache::from_objects(listed.objects, leases, listed.revision);
        let mut queue = Queue::default();
        for (key, pod) in &cache.pods {
            if needs_scheduling(pod) {
                queue.add(key);
            }
        }
        let dirty_replica_sets = cache.replica_sets.keys().cloned().collect();
        tracing::info!(
            nodes = cache.nodes.len(),
            pods = cache.pods.len(),
            replica_sets = cache.replica_sets.len(),
            revision = cache.revision,
            "informer cache listed"
        );
        Ok(State {
            client,
            fence,
            config,
            metrics,
            cache,
            queue,
            scheduler: Scheduler::default(),
            lifecycle: NodeLifecycle::default(),
            dirty_replica_sets,
            collect_garbage: true,
        })
    }

    async fn watch(&self) -> Result<WatchStream, SchedulerError> {
        let options = WatchOptions::new()
            .with_range(prefix_end(REGISTRY_PREFIX.as_bytes()))
            .with_start_revision(self.cache.revision + 1)
            .with_progress_notify();
        Ok(self.client.watch_client().watch(REGISTRY_PREFIX, Some(options)).await?)
    }

    async fn run(
        &mut self,
        leadership: &mut Leadership,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Run, SchedulerError> {
        let mut stream = self.watch().await?;
        let mut lifecycle_tick = tokio::time::interval(LIFECYCLE_INTERVAL);
        let mut retry_tick = tokio::time::interval(UNSCHEDULABLE_RETRY_INTERVAL);
        loop {
            // Take in every event already here before deciding anything.
            while let Some(message) = stream.message().now_or_never() {
                if let Some(run) = self.absorb(message, &mut stream).await? {
                    return Ok(run);
                }
            }
            if self.has_work() {
                if lifecycle_tick.tick().now_or_never().is_some() {
                    let writes =
                        self.lifecycle.check(&self.cache, &self.lifecycle_config(), Instant::now(), SystemTime::now());
                    self.commit(writes).await?;
                }
                if *shutdown.borrow() {
                    return Ok(Run::Exit(Exit::Shutdown));
                }
                self.work().await?;
                if *leadership.lost.borrow() {
                    return Ok(Run::Exit(Exit::Lost));
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.changed() => return Ok(Run::Exit(Exit::Shutdown)),
                _ = leadership.lost.changed() => return Ok(Run::Exit(Exit::Lost)),
                message = stream.message() => {
                    if let Some(run) = self.absorb(message, &mut stream).await? {
                        return Ok(run);
                    }
                }
                _ = lifecycle_tick.tick() => {
                    let writes = self.lifecycle.check(&self.cache, &self.lifecycle_config(), Instant::now(), SystemTime::now());
                    self.commit(writes).await?;
                }
                _ = retry_tick.tick() => self.queue.flush_unschedulable(),
            }
        }
    }

    fn lifecycle_config(&self) -> LifecycleConfig {
        LifecycleConfig {
            node_monitor_grace: self.config.node_monitor_grace,
            pod_eviction_timeout: self.config.pod_eviction_timeout,
        }
    }

    /// Applies one watch message. Returns Relist when the watch fell behind compaction;
    /// a broken stream is re-opened from the cache's revision.
    async fn absorb(
        &mut self,
        message: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
        stream: &mut WatchStream,
    ) -> Result<Option<Run>, SchedulerError> {
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) | Err(_) => {
                tracing::warn!(revision = self.cache.revision, "watch ended; resuming");
                tokio::time::sleep(Duration::from_millis(200)).await;
                *stream = self.watch().await?;
                return Ok(None);
            }
        };
        if response.canceled() {
            // Compacted past our revision, or cancelled for another reason: either way
            // this stream delivers nothing more.
            return Ok(Some(Run::Relist));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let change = match event.event_type() {
                EventType::Put => match self.cache.apply_put(kv.key(), kv.value(), kv.mod_revision()) {
                    Ok(change) => change,
                    Err(error) => {
                        self.metrics.record_decode_error(&error);
                        Change::None
                    }
                },
                EventType::Delete => self.cache.apply_delete(kv.key(), kv.mod_revision()),
            };
            self.react(change);
        }
        // A progress notification says every event up to its revision was sent (the
        // first response, which confirms the watch, says nothing of the kind).
        if response.events().is_empty() && !response.created() {
            if let Some(header) = response.header() {
                self.cache.revision = self.cache.revision.max(header.revision());
            }
        }
        Ok(None)
    }

    /// Queues what a change makes due.
    fn react(&mut self, change: Change) {
        match change {
            Change::Node { .. } => self.queue.flush_unschedulable(),
            Change::Pod { key, old, new } => {
                match &new {
                    // A status-only change (the Unschedulable condition this scheduler
                    // wrote) leaves a parked pod parked.
                    Some(pod) if needs_scheduling(pod) => {
                        if old.as_deref().is_none_or(|old| old.spec != pod.spec || !needs_scheduling(old)) {
                            self.queue.add(&key);
                        }
                    }
                    _ => self.queue.remove(&key),
                }
                let released = |old: &Pod| {
                    old.holds_resources()
                        && new
                            .as_ref()
                            .is_none_or(|new| new.spec.node_name != old.spec.node_name || !new.holds_resources())
                };
                if old.as_deref().is_some_and(released) {
                    self.queue.flush_unschedulable();
                }
                for pod in old.iter().chain(new.iter()) {
                    if let Some(owner) = pod.controller() {
                        match self.cache.replica_set_by_uid.get(&owner.uid) {
                            Some(rs) => {
                                self.dirty_replica_sets.insert(rs.clone());
                            }
                            None => self.collect_garbage = true,
                        }
                    }
                }
            }
            Change::ReplicaSet { key } => {
                self.dirty_replica_sets.insert(key);
                self.collect_garbage = true;
            }
            Change::NodeLease { name, present } => self.lifecycle.lease_changed(&name, present, Instant::now()),
            Change::None => {}
        }
    }

    fn has_work(&self) -> bool {
        self.queue.active_len() > 0 || !self.dirty_replica_sets.is_empty() || self.collect_garbage
    }

    /// One round: a batch of pods scheduled, then the controllers.
    async fn work(&mut self) -> Result<(), SchedulerError> {
        self.schedule_batch().await?;
        let now = timestamp(SystemTime::now());
        let mut writes = Vec::new();
        for key in std::mem::take(&mut self.dirty_replica_sets) {
            writes.extend(reconcile_replica_set(&self.cache, &key, &now));
        }
        if std::mem::take(&mut self.collect_garbage) {
            writes.extend(collect_garbage(&self.cache));
        }
        self.commit(writes).await
    }

    /// Schedules up to a txn's worth of pods and commits their binds together; pods that
    /// fit nowhere get their PodScheduled condition saying why.
    async fn schedule_batch(&mut self) -> Result<(), SchedulerError> {
        let now = timestamp(SystemTime::now());
        let mut binds = Vec::new();
        let mut unschedulable = Vec::new();
        let mut undo = Vec::new();
        while binds.len() + unschedulable.len() < TXN_WRITES_MAX {
            let Some(key) = self.queue.pop() else { break };
            match self.scheduler.schedule_one(&mut self.cache, &key) {
                Some(Decision::Bind { node, original, .. }) => {
                    let mut bound = (*original).clone();
                    bound.spec.node_name = node;
                    let scheduled =
                        Condition { type_: POD_SCHEDULED.into(), status: CONDITION_TRUE.into(), ..Default::default() };
                    set_condition(&mut bound.status.conditions, scheduled, &now);
                    binds.push(Write::Update(Object::Pod(bound)));
                    undo.push(original);
                }
                Some(Decision::Unschedulable { key, message }) => {
                    self.metrics.attempted("unschedulable", 1);
                    let Some(mut pod) = self.cache.pods.get(&key).cloned() else { continue };
                    self.queue.park(key);
                    let condition = Condition {
                        type_: POD_SCHEDULED.into(),
                        status: CONDITION_FALSE.into(),
                        reason: REASON_UNSCHEDULABLE.into(),
                        message,
                        ..Default::default()
                    };
                    if set_condition(&mut pod.status.conditions, condition, &now) {
                        unschedulable.push(Write::Update(Object::Pod(pod)));
                    }
                }
                None => {}
            }
        }
        let bound = binds.len();
        let started = std::time::Instant::now();
        let outcomes = self.commit_outcomes(&binds).await?;
        if !binds.is_empty() {
            self.metrics.bind_seconds.observe(started.elapsed().as_secs_f64());
        }
        for (original, committed) in undo.into_iter().zip(&outcomes) {
            if !committed {
                // Someone changed the pod since it was read; its newer version comes by
                // the watch and is scheduled from there.
                self.metrics.attempted("conflict", 1);
                // The resources it was assumed to take are free again.
                let change = self.cache.upsert(Object::Pod(*original));
                self.react(change);
            }
        }
        let committed = outcomes.iter().filter(|ok| **ok).count();
        self.metrics.attempted("scheduled", committed as u64);
        self.metrics.pending_pods.set((self.queue.active_len() + self.queue.unschedulable_len()) as i64);
        if bound > 0 {
            tracing::debug!(bound = committed, conflicts = bound - committed, "bound pods");
        }
        self.commit(unschedulable).await
    }

    async fn commit(&mut self, writes: Vec<Write>) -> Result<(), SchedulerError> {
        self.commit_outcomes(&writes).await.map(|_| ())
    }

    /// Commits writes in fenced txns of up to [`TXN_WRITES_MAX`]; returns which took
    /// effect, in order. A txn refused as a whole is retried write by write to tell a
    /// stale write (skipped; its object's newer version comes by the watch) from a lost
    /// fence (an error: this scheduler no longer leads). A txn may not write a key twice,
    /// so a repeated key is skipped until the next round.
    async fn commit_outcomes(&mut self, writes: &[Write]) -> Result<Vec<bool>, SchedulerError> {
        let mut seen = HashSet::new();
        let first: Vec<usize> = (0..writes.len()).filter(|&i| seen.insert(writes[i].object().key())).collect();
        let mut outcomes = vec![false; writes.len()];
        for chunk in chunks(&first, |i| writes[i].object().encode().len()) {
            let chunk = chunk.as_slice();
            if self.try_commit(chunk.iter().map(|&i| &writes[i])).await? {
                chunk.iter().for_each(|&i| outcomes[i] = true);
            } else if chunk.len() > 1 {
                for &i in chunk {
                    outcomes[i] = self.try_commit(std::iter::once(&writes[i])).await?;
                }
            }
        }
        Ok(outcomes)
    }

    /// One fenced txn; on success the writes go into the cache (a delete leaves a
    /// tombstone, so the watch events of what it deleted cannot bring it back).
    async fn try_commit<'w>(
        &mut self,
        writes: impl Iterator<Item = &'w Write> + Clone,
    ) -> Result<bool, SchedulerError> {
        let mut compares = vec![self.fence.compare()];
        let mut ops = Vec::new();
        for write in writes.clone() {
            let (compare, op) = match write {
                Write::Create(object) => create_op(object),
                Write::Update(object) => update_op(object),
                Write::Delete(object) => {
                    let key = object.key();
                    (
                        Compare::mod_revision(key.clone(), CompareOp::Equal, resource_version(object)),
                        TxnOp::delete(key, None),
                    )
                }
            };
            compares.push(compare);
            ops.push(op);
        }
        if ops.is_empty() {
            return Ok(true);
        }
        let txn =
            etcd_client::Txn::new().when(compares).and_then(ops).or_else([TxnOp::get(self.fence.key.clone(), None)]);
        let response = self.client.kv_client().txn(txn).await?;
        if !response.succeeded() {
            let leader = response.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => Some(get.kvs().first().map_or(0, |kv| kv.create_revision())),
                _ => None,
            });
            if leader != Some(self.fence.create_revision) {
                return Err(SchedulerError::Deposed);
            }
            return Ok(false);
        }
        let revision = response.header().map_or(0, |h| h.revision());
        for write in writes {
            match write {
                Write::Create(object) | Write::Update(object) => {
                    let mut stored = object.clone();
                    stored.metadata_mut().resource_version = revision.to_string();
                    let change = self.cache.upsert(stored);
                    self.react(change);
                }
                Write::Delete(object) => {
                    let change = self.cache.remove_at(&object.key(), revision);
                    self.react(change);
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txns_are_cut_by_count_and_by_size() {
        let all: Vec<usize> = (0..300).collect();
        let sizes: Vec<usize> = chunks(&all, |_| 10).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![127, 127, 46]);
        let big = [600 << 10, 600 << 10, 2 << 20, 10];
        assert_eq!(chunks(&[0, 1, 2, 3], |i| big[i]), vec![vec![0], vec![1], vec![2], vec![3]]);
    }
}
