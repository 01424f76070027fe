//! The controllers the scheduler's leader runs, as pure decisions over the [`Cache`]:
//! the ReplicaSet controller (keep N pods from the template, delete the surplus, report
//! status), the garbage collector (delete pods whose ReplicaSet is gone), and the
//! node-lifecycle controller (a node whose lease expired turns NotReady; after a grace
//! period its pods are failed with reason NodeLost, so their ReplicaSets replace them).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use capstan_proto::objects::{
    condition, name_suffix, new_uid, parse_timestamp, set_condition, Condition, Kind, Object, ObjectMeta,
    OwnerReference, Pod, PodPhase, ReplicaSet, CONDITION_TRUE, CONDITION_UNKNOWN, NODE_READY, POD_READY,
    REASON_NODE_LOST,
};
use tokio::time::Instant;

use crate::cache::Cache;

/// A write a controller wants; the leader commits it with its fence.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Create(Object),
    /// Replace the object at the resourceVersion it carries.
    Update(Object),
    /// Delete the object at the resourceVersion it carries.
    Delete(Object),
}

impl Write {
    pub fn object(&self) -> &Object {
        match self {
            Write::Create(object) | Write::Update(object) | Write::Delete(object) => object,
        }
    }
}

/// Pods one reconcile creates at most, so a ReplicaSet scaled to 10000 fills up in steps
/// while the scheduler binds the first ones.
const REPLICA_CREATES_MAX: usize = 500;

/// Brings a ReplicaSet's pods to its replica count and its status up to date.
pub fn reconcile_replica_set(cache: &Cache, key: &str, now: &str) -> Vec<Write> {
    let Some(rs) = cache.replica_sets.get(key) else { return Vec::new() };
    let mut active: Vec<&Pod> = cache
        .pods_of_owner(&rs.metadata.uid)
        .map(|(_, pod)| pod)
        .filter(|pod| !pod.status.phase.is_terminal())
        .collect();
    let wanted = rs.spec.replicas.max(0) as usize;
    let mut writes = Vec::new();
    if active.len() < wanted {
        for _ in 0..(wanted - active.len()).min(REPLICA_CREATES_MAX) {
            writes.push(Write::Create(Object::Pod(pod_from_template(rs, cache, now))));
        }
    } else if active.len() > wanted {
        // Delete the pods that matter least first: unbound, then not running, then not
        // ready, then the newest (Kubernetes' order, simplified).
        active.sort_by_key(|pod| {
            (
                !pod.spec.node_name.is_empty(),
                pod.status.phase == PodPhase::Running,
                is_ready(pod),
                std::cmp::Reverse(pod.metadata.creation_timestamp.clone()),
            )
        });
        for pod in active.drain(..active.len() - wanted) {
            writes.push(Write::Delete(Object::Pod(pod.clone())));
        }
    }
    let ready = active.iter().filter(|pod| is_ready(pod)).count() as i32;
    let mut status = rs.status.clone();
    status.replicas = active.len() as i32;
    status.ready_replicas = ready;
    status.available_replicas = ready;
    if status != rs.status {
        let mut updated = rs.clone();
        updated.status = status;
        writes.push(Write::Update(Object::ReplicaSet(updated)));
    }
    writes
}

fn is_ready(pod: &Pod) -> bool {
    condition(&pod.status.conditions, POD_READY).is_some_and(|c| c.status == CONDITION_TRUE)
}

fn pod_from_template(rs: &ReplicaSet, cache: &Cache, now: &str) -> Pod {
    let namespace = rs.namespace().to_string();
    let name = loop {
        let name = format!("{}-{}", rs.metadata.name, name_suffix());
        if !cache.pods.contains_key(&Kind::Pod.key(&namespace, &name)) {
            break name;
        }
    };
    let template = &rs.spec.template;
    Pod {
        metadata: ObjectMeta {
            name,
            namespace,
            labels: template.metadata.labels.clone(),
            annotations: template.metadata.annotations.clone(),
            uid: new_uid(),
            creation_timestamp: now.to_string(),
            owner_references: vec![OwnerReference {
                api_version: Kind::ReplicaSet.api_version().into(),
                kind: Kind::ReplicaSet.name().into(),
                name: rs.metadata.name.clone(),
                uid: rs.metadata.uid.clone(),
                controller: true,
            }],
            ..Default::default()
        },
        spec: template.spec.clone(),
        ..Default::default()
    }
}

/// Pods whose controlling ReplicaSet no longer exists (Kubernetes' garbage collector
/// deletes dependents in the background).
pub fn collect_garbage(cache: &Cache) -> Vec<Write> {
    let mut writes = Vec::new();
    for (uid, keys) in &cache.pods_by_owner {
        if cache.replica_set_by_uid.contains_key(uid) {
            continue;
        }
        for key in keys {
            if let Some(pod) =
                cache.pods.get(key).filter(|pod| pod.controller().is_some_and(|o| o.kind == Kind::ReplicaSet.name()))
            {
                writes.push(Write::Delete(Object::Pod(pod.clone())));
            }
        }
    }
    writes
}

#[derive(Clone, Debug)]
pub struct LifecycleConfig {
    /// How long a Ready node may be without a lease key before it is marked NotReady,
    /// when the leader never saw the key go (it may just have started).
    pub node_monitor_grace: Duration,
    /// How long a node stays NotReady before its pods are failed (NodeLost).
    pub pod_eviction_timeout: Duration,
}

/// The node-lifecycle controller's memory: when each Ready node without a lease is due
/// to be marked NotReady.
#[derive(Default)]
pub struct NodeLifecycle {
    deadlines: HashMap<String, Instant>,
}

impl NodeLifecycle {
    /// A node's lease key appeared or was deleted (the agent's lease expired).
    pub fn lease_changed(&mut self, node: &str, present: bool, now: Instant) {
        if present {
            self.deadlines.remove(node);
        } else {
            self.deadlines.insert(node.to_string(), now);
        }
    }

    /// The writes due now: nodes to mark NotReady, pods to fail.
    pub fn check(&mut self, cache: &Cache, config: &LifecycleConfig, now: Instant, wall: SystemTime) -> Vec<Write> {
        let stamp = capstan_proto::objects::timestamp(wall);
        let mut writes = Vec::new();
        self.deadlines.retain(|name, _| {
            cache.nodes.get(name).is_some_and(|info| info.ready) && !cache.node_leases.contains(name)
        });
        for (name, info) in &cache.nodes {
            let Some(ready) = condition(&info.node.status.conditions, NODE_READY) else { continue };
            if ready.status == CONDITION_TRUE {
                if cache.node_leases.contains(name) {
                    continue;
                }
                let deadline = *self.deadlines.entry(name.clone()).or_insert(now + config.node_monitor_grace);
                if now >= deadline {
                    let mut node = info.node.clone();
                    let lost = Condition {
                        type_: NODE_READY.into(),
                        status: CONDITION_UNKNOWN.into(),
                        reason: "NodeStatusUnknown".into(),
                        message: "The node's agent stopped renewing its lease.".into(),
                        last_heartbeat_time: ready.last_heartbeat_time.clone(),
                        last_transition_time: String::new(),
                    };
                    set_condition(&mut node.status.conditions, lost, &stamp);
                    tracing::warn!(node = %name, "node lease expired; marking the node NotReady");
                    writes.push(Write::Update(Object::Node(node)));
                }
                continue;
            }
            let since = parse_timestamp(&ready.last_transition_time).unwrap_or(wall);
            // (Pods of nodes that are not Ready wait for the eviction timeout below.)
            if wall.duration_since(since).unwrap_or_default() < config.pod_eviction_timeout {
                continue;
            }
            for (_, pod) in cache.pods_on_node(name).filter(|(_, pod)| !pod.status.phase.is_terminal()) {
                let message = format!("Node {name} which was running pod {} is unresponsive", pod.metadata.name);
                writes.push(node_lost(pod, message));
            }
        }
        writes.extend(pods_on_unknown_nodes(cache));
        writes
    }
}

/// Pods bound to a node that is not registered: one that never ran (bound by its
/// manifest) waits for the node, and its status says so, as nothing else would; one that
/// ran there lost its node (deleted by an operator) and is failed, so its ReplicaSet
/// replaces it (Kubernetes' pod garbage collector deletes such pods).
fn pods_on_unknown_nodes(cache: &Cache) -> Vec<Write> {
    let mut writes = Vec::new();
    for node in cache.pods_by_node.keys().filter(|node| !cache.nodes.contains_key(*node)) {
        for (_, pod) in cache.pods_on_node(node) {
            if matches!(pod.status.phase, PodPhase::Running | PodPhase::Unknown) {
                writes.push(node_lost(
                    pod,
                    format!("node {node:?} which was running pod {} was deleted", pod.metadata.name),
                ));
            } else if pod.status.phase == PodPhase::Pending && pod.status.reason != REASON_NODE_NOT_FOUND {
                let mut waiting = pod.clone();
                waiting.status.reason = REASON_NODE_NOT_FOUND.into();
                waiting.status.message = format!("the pod is bound to node {node:?}, which is not registered");
                writes.push(Write::Update(Object::Pod(waiting)));
            }
        }
    }
    writes
}

/// The pod failed because its node is gone, so its ReplicaSet replaces it.
fn node_lost(pod: &Pod, message: String) -> Write {
    let mut failed = pod.clone();
    failed.status.phase = PodPhase::Failed;
    failed.status.reason = REASON_NODE_LOST.into();
    failed.status.message = message;
    Write::Update(Object::Pod(failed))
}

/// The reason of a pending pod bound to a node that does not exist.
pub const REASON_NODE_NOT_FOUND: &str = "NodeNotFound";

#[cfg(test)]
mod tests {
    use capstan_proto::objects::{ReplicaSetSpec, CONDITION_FALSE};

    use super::*;
    use crate::plugins::tests::{node, pod};

    fn replica_set(replicas: i32) -> ReplicaSet {
        let mut rs = ReplicaSet {
            metadata: ObjectMeta {
                name: "web".into(),
                namespace: "default".into(),
                uid: "rs-uid".into(),
                ..Default::default()
            },
            spec: ReplicaSetSpec { replicas, ..Default::default() },
            ..Default::default()
        };
        rs.spec.selector.match_labels.insert("app".into(), "web".into());
        rs.spec.template.metadata.labels.insert("app".into(), "web".into());
        rs.spec.template.spec = pod("100m", "10Mi").spec;
        rs
    }

    fn lifecycle_config() -> LifecycleConfig {
        LifecycleConfig { node_monitor_grace: Duration::from_secs(40), pod_eviction_timeout: Duration::from_secs(20) }
    }

    fn apply(cache: &mut Cache, writes: Vec<Write>) {
        for write in writes {
            match write {
                Write::Create(object) | Write::Update(object) => {
                    cache.upsert(object);
                }
                Write::Delete(object) => {
                    cache.remove(&object.key());
                }
            }
        }
    }

    #[test]
    fn a_replica_set_is_scaled_up_and_down() {
        let mut cache = Cache::default();
        cache.upsert(Object::ReplicaSet(replica_set(3)));
        let key = Kind::ReplicaSet.key("default", "web");
        let writes = reconcile_replica_set(&cache, &key, "now");
        assert_eq!(writes.iter().filter(|w| matches!(w, Write::Create(_))).count(), 3);
        let Write::Create(Object::Pod(created)) = &writes[0] else { panic!() };
        assert!(created.metadata.name.starts_with("web-") && created.metadata.name.len() == 9);
        assert_eq!(created.controller().unwrap().uid, "rs-uid");
        assert_eq!(created.metadata.labels["app"], "web");
        apply(&mut cache, writes);
        assert_eq!(cache.replica_sets[&key].status.replicas, 0, "status counts what existed before the creates");
        let writes = reconcile_replica_set(&cache, &key, "now");
        assert!(matches!(&writes[..], [Write::Update(Object::ReplicaSet(rs))] if rs.status.replicas == 3));
        apply(&mut cache, writes);
        assert_eq!(reconcile_replica_set(&cache, &key, "now"), vec![], "steady state writes nothing");

        // One pod bound and running: scaling to 1 keeps it and deletes the others.
        let running_key = cache.pods.keys().next().unwrap().clone();
        let mut running = cache.pods[&running_key].clone();
        running.spec.node_name = "n".into();
        running.status.phase = PodPhase::Running;
        cache.upsert(Object::Pod(running));
        let mut rs = cache.replica_sets[&key].clone();
        rs.spec.replicas = 1;
        cache.upsert(Object::ReplicaSet(rs));
        let writes = reconcile_replica_set(&cache, &key, "now");
        let deleted: Vec<String> =
            writes.iter().filter(|w| matches!(w, Write::Delete(_))).map(|w| w.object().key()).collect();
        assert_eq!(deleted.len(), 2);
        assert!(!deleted.contains(&running_key));
    }

    #[test]
    fn failed_pods_are_replaced_and_orphans_collected() {
        let mut cache = Cache::default();
        cache.upsert(Object::ReplicaSet(replica_set(1)));
        let key = Kind::ReplicaSet.key("default", "web");
        let writes = reconcile_replica_set(&cache, &key, "now");
        apply(&mut cache, writes);
        let mut failed = cache.pods.values().next().unwrap().clone();
        failed.status.phase = PodPhase::Failed;
        cache.upsert(Object::Pod(failed));
        let writes = reconcile_replica_set(&cache, &key, "now");
        assert_eq!(writes.iter().filter(|w| matches!(w, Write::Create(_))).count(), 1, "a failed pod does not count");
        apply(&mut cache, writes);
        assert_eq!(collect_garbage(&cache), vec![]);
        cache.remove(&key);
        assert_eq!(collect_garbage(&cache).len(), 2, "both pods of the deleted ReplicaSet go");
    }

    #[test]
    fn a_node_without_its_lease_turns_not_ready_then_its_pods_fail() {
        let config = lifecycle_config();
        let mut cache = Cache::default();
        cache.upsert(Object::Node(node("n1", "4", "8Gi", 10).node));
        cache.node_leases.insert("n1".into());
        let mut p = pod("1", "1Gi");
        p.spec.node_name = "n1".into();
        cache.upsert(Object::Pod(p));
        let mut lifecycle = NodeLifecycle::default();
        let start = Instant::now();
        let wall = SystemTime::now();
        assert_eq!(lifecycle.check(&cache, &config, start, wall), vec![], "the lease is there");

        cache.node_leases.remove("n1");
        lifecycle.lease_changed("n1", false, start);
        let writes = lifecycle.check(&cache, &config, start, wall);
        let [Write::Update(Object::Node(marked))] = &writes[..] else { panic!("{writes:?}") };
        assert_eq!(condition(&marked.status.conditions, NODE_READY).unwrap().status, CONDITION_UNKNOWN);
        apply(&mut cache, writes);
        assert_eq!(
            lifecycle.check(&cache, &config, start, wall + Duration::from_secs(19)),
            vec![],
            "within the grace period"
        );
        let writes = lifecycle.check(&cache, &config, start, wall + Duration::from_secs(21));
        let [Write::Update(Object::Pod(lost))] = &writes[..] else { panic!("{writes:?}") };
        assert_eq!((lost.status.phase, lost.status.reason.as_str()), (PodPhase::Failed, REASON_NODE_LOST));
    }

    #[test]
    fn a_ready_node_never_seen_with_a_lease_gets_the_monitor_grace() {
        let config = lifecycle_config();
        let mut cache = Cache::default();
        cache.upsert(Object::Node(node("n1", "4", "8Gi", 10).node));
        let mut not_ready = node("n2", "4", "8Gi", 10).node;
        not_ready.status.conditions[0].status = CONDITION_FALSE.into();
        cache.upsert(Object::Node(not_ready));
        let mut lifecycle = NodeLifecycle::default();
        let start = Instant::now();
        let wall = SystemTime::now();
        assert_eq!(lifecycle.check(&cache, &config, start, wall), vec![]);
        assert_eq!(lifecycle.check(&cache, &config, start + Duration::from_secs(39), wall), vec![]);
        assert_eq!(lifecycle.check(&cache, &config, start + Duration::from_secs(40), wall).len(), 1);
    }

    #[test]
    fn a_pod_bound_to_an_unknown_node_says_so_once() {
        let mut cache = Cache::default();
        let mut p = pod("1", "1Gi");
        p.spec.node_name = "ghost".into();
        cache.upsert(Object::Pod(p));
        let writes = pods_on_unknown_nodes(&cache);
        let [Write::Update(Object::Pod(waiting))] = &writes[..] else { panic!("{writes:?}") };
        assert_eq!(waiting.status.reason, REASON_NODE_NOT_FOUND);
        assert!(waiting.status.message.contains("\"ghost\""));
        apply(&mut cache, writes);
        assert_eq!(pods_on_unknown_nodes(&cache), vec![]);
    }
}
