//! The scheduling core: a queue of pods waiting for a node, and the choice of a node for
//! one pod (filter every node, score the ones that pass, take the best). Pure: it reads
//! and updates the [`Cache`] only, so it is tested without a cluster.
//!
//! Like Kubernetes, a large cluster is not filtered in full for every pod: the search
//! starts where the last one stopped and ends once enough feasible nodes are found
//! (all of them under 100 nodes; 10% of 5000). A pod that fits nowhere has seen every
//! node, so its message counts every node's reason.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::Bound;

use capstan_proto::objects::Pod;

use crate::cache::{Cache, NodeInfo};
use crate::plugins::{filter, score, PodRequest, Rejection};

/// Pods waiting to be scheduled: `active` in arrival order; `unschedulable` ones wait
/// until a node or a pod changes (then they go back to active).
#[derive(Default)]
pub struct Queue {
    active: VecDeque<String>,
    queued: HashSet<String>,
    unschedulable: HashSet<String>,
}

impl Queue {
    pub fn add(&mut self, key: &str) {
        self.unschedulable.remove(key);
        if self.queued.insert(key.to_string()) {
            self.active.push_back(key.to_string());
        }
    }

    pub fn pop(&mut self) -> Option<String> {
        // Removed keys stay in `active` until they reach the front (removal is O(1)).
        while let Some(key) = self.active.pop_front() {
            if self.queued.remove(&key) {
                return Some(key);
            }
        }
        None
    }

    /// Parks a pod that fits nowhere until the cluster changes.
    pub fn park(&mut self, key: String) {
        if !self.queued.contains(&key) {
            self.unschedulable.insert(key);
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.unschedulable.remove(key);
        self.queued.remove(key);
    }

    /// Something changed that may let parked pods fit: retry them all.
    pub fn flush_unschedulable(&mut self) {
        let mut parked: Vec<String> = self.unschedulable.drain().collect();
        parked.sort();
        for key in parked {
            self.add(&key);
        }
    }

    pub fn active_len(&self) -> usize {
        self.queued.len()
    }

    pub fn unschedulable_len(&self) -> usize {
        self.unschedulable.len()
    }
}

/// The outcome of scheduling one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Bind `pod` (as it was before the bind, for undoing) to `node`. The cache already
    /// counts the pod on the node ("assumed"), so the next pod sees its resources taken.
    Bind { key: String, node: String, original: Box<Pod> },
    /// No node fits; `message` says why, per node.
    Unschedulable { key: String, message: String },
}

/// Whether a cached pod waits for the scheduler.
pub fn needs_scheduling(pod: &Pod) -> bool {
    pod.spec.node_name.is_empty() && !pod.status.phase.is_terminal()
}

/// How many feasible nodes to find before scoring, as Kubernetes'
/// percentageOfNodesToScore does by default.
pub fn feasible_nodes_to_find(nodes: usize) -> usize {
    const MIN_FEASIBLE_NODES: usize = 100;
    if nodes < MIN_FEASIBLE_NODES {
        return nodes;
    }
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(MIN_FEASIBLE_NODES)
}

#[derive(Default)]
pub struct Scheduler {
    /// The node name the next search starts at, so searches rotate over the cluster.
    next_start: Option<String>,
}

impl Scheduler {
    /// Chooses a node for the pod at `key`; on success assumes the bind in the cache.
    /// None when the pod is gone or no longer waits.
    pub fn schedule_one(&mut self, cache: &mut Cache, key: &str) -> Option<Decision> {
        let pod = cache.pods.get(key).filter(|pod| needs_scheduling(pod))?.clone();
        let request = PodRequest::new(&pod);
        let wanted = feasible_nodes_to_find(cache.nodes.len());
        let mut feasible: Vec<&NodeInfo> = Vec::new();
        let mut reasons: BTreeMap<Rejection, usize> = BTreeMap::new();
        let mut rejections = Vec::new();
        let start = self.next_start.clone().unwrap_or_default();
        let rotation = cache
            .nodes
            .range::<str, _>((Bound::Included(start.as_str()), Bound::Unbounded))
            .chain(cache.nodes.range::<str, _>((Bound::Unbounded, Bound::Excluded(start.as_str()))));
        let mut examined = 0;
        for (_, info) in rotation {
            examined += 1;
            filter(&request, info, &mut rejections);
            if rejections.is_empty() {
                feasible.push(info);
                if feasible.len() >= wanted {
                    break;
                }
            }
            for rejection in &rejections {
                *reasons.entry(*rejection).or_default() += 1;
            }
        }
        self.next_start = next_name(&cache.nodes, &start, examined);
        if feasible.is_empty() {
            return Some(Decision::Unschedulable {
                key: key.to_string(),
                message: unschedulable_message(cache.nodes.len(), &reasons),
            });
        }
        let max_siblings = request
            .owner_uid
            .map(|owner| {
                feasible.iter().map(|info| info.usage.owners.get(owner).copied().unwrap_or(0)).max().unwrap_or(0)
            })
            .unwrap_or(0);
        let mut best = feasible[0];
        let mut best_score = i64::MIN;
        for info in feasible {
            let score = score(&request, info, max_siblings);
            if score > best_score {
                best = info;
                best_score = score;
            }
        }
        let node = best.node.metadata.name.clone();
        let mut bound = pod.clone();
        bound.spec.node_name = node.clone();
        cache.upsert(capstan_proto::objects::Object::Pod(bound));
        Some(Decision::Bind { key: key.to_string(), node, original: Box::new(pod) })
    }
}

/// The name `examined` places after `start` in rotation order.
fn next_name(nodes: &BTreeMap<String, NodeInfo>, start: &str, examined: usize) -> Option<String> {
    if nodes.is_empty() {
        return None;
    }
    let skip = examined % nodes.len();
    nodes
        .range::<str, _>((Bound::Included(start), Bound::Unbounded))
        .chain(nodes.range::<str, _>((Bound::Unbounded, Bound::Excluded(start))))
        .nth(skip)
        .map(|(name, _)| name.clone())
}

/// `0/5 nodes available: 3 insufficient cpu, 2 node(s) had untolerated taint`: reasons
/// by count, most common first.
pub fn unschedulable_message(nodes: usize, reasons: &BTreeMap<Rejection, usize>) -> String {
    if nodes == 0 {
        return "0/0 nodes available: no nodes are registered".to_string();
    }
    let mut counted: Vec<(usize, &str)> = reasons.iter().map(|(rejection, count)| (*count, rejection.text())).collect();
    counted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let parts: Vec<String> = counted.iter().map(|(count, text)| format!("{count} {text}")).collect();
    format!("0/{nodes} nodes available: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use capstan_proto::objects::{
        Kind, Node, Object, ObjectMeta, Pod, Quantity, Taint, TaintEffect, Toleration, TolerationOperator,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::plugins::tests::{node, pod};
    use crate::plugins::{selector_matches, tolerates, UNSCHEDULABLE_TAINT_KEY};

    fn named(mut pod: Pod, name: &str) -> Pod {
        pod.metadata.name = name.into();
        pod
    }

    fn key(pod: &Pod) -> String {
        Kind::Pod.key(pod.namespace(), &pod.metadata.name)
    }

    /// Schedules every queued pod until the queue is empty; returns the decisions.
    fn run(cache: &mut Cache) -> Vec<Decision> {
        let mut queue = Queue::default();
        for (key, pod) in &cache.pods {
            if needs_scheduling(pod) {
                queue.add(key);
            }
        }
        let mut scheduler = Scheduler::default();
        let mut decisions = Vec::new();
        while let Some(key) = queue.pop() {
            decisions.extend(scheduler.schedule_one(cache, &key));
        }
        decisions
    }

    #[test]
    fn the_unschedulable_message_counts_reasons_per_node() {
        let mut cache = Cache::default();
        for name in ["a", "b", "c"] {
            cache.upsert(Object::Node(node(name, "1", "8Gi", 110).node));
        }
        for name in ["d", "e"] {
            let mut tainted = node(name, "8", "8Gi", 110).node;
            tainted.spec.taints.push(Taint {
                key: "gpu".into(),
                value: String::new(),
                effect: TaintEffect::NoSchedule,
            });
            cache.upsert(Object::Node(tainted));
        }
        let big = named(pod("2", "1Gi"), "big");
        cache.upsert(Object::Pod(big.clone()));
        let decisions = run(&mut cache);
        assert_eq!(
            decisions,
            vec![Decision::Unschedulable {
                key: key(&big),
                message: "0/5 nodes available: 3 insufficient cpu, 2 node(s) had untolerated taint".into()
            }]
        );
    }

    #[test]
    fn binds_are_assumed_so_the_next_pod_sees_them() {
        let mut cache = Cache::default();
        cache.upsert(Object::Node(node("only", "2", "8Gi", 110).node));
        for name in ["p1", "p2", "p3"] {
            cache.upsert(Object::Pod(named(pod("1", "1Gi"), name)));
        }
        let decisions = run(&mut cache);
        let bound = decisions.iter().filter(|d| matches!(d, Decision::Bind { .. })).count();
        assert_eq!(bound, 2, "{decisions:?}");
        assert_eq!(cache.nodes["only"].usage.requested.cpu_millis, 2000);
    }

    #[test]
    fn replica_set_pods_spread_across_nodes() {
        let mut cache = Cache::default();
        for name in ["a", "b", "c"] {
            cache.upsert(Object::Node(node(name, "64", "256Gi", 110).node));
        }
        for i in 0..6 {
            let mut p = named(pod("100m", "64Mi"), &format!("web-{i}"));
            p.metadata.owner_references.push(capstan_proto::objects::OwnerReference {
                uid: "rs".into(),
                controller: true,
                ..Default::default()
            });
            cache.upsert(Object::Pod(p));
        }
        run(&mut cache);
        for name in ["a", "b", "c"] {
            assert_eq!(cache.nodes[name].usage.owners["rs"], 2, "node {name}");
        }
    }

    #[test]
    fn large_clusters_are_sampled_and_the_search_rotates() {
        assert_eq!(feasible_nodes_to_find(50), 50);
        assert_eq!(feasible_nodes_to_find(1000), 420);
        assert_eq!(feasible_nodes_to_find(5000), 500);
        assert_eq!(feasible_nodes_to_find(100_000), 5000);
    }

    /// The safety and liveness properties of a placement, checked from scratch (not from
    /// the cache's own accounting): no node over-committed, every bound pod allowed on its
    /// node, and every pod left unbound fits on no node.
    fn check_placement(nodes: &[Node], pods: &[Pod]) -> Result<(), String> {
        let infos: BTreeMap<&str, NodeInfo> =
            nodes.iter().map(|n| (n.metadata.name.as_str(), NodeInfo::new(n.clone(), Default::default()))).collect();
        /// cpu millis, memory bytes, pods and host ports in use on a node.
        type Used = (i64, i64, i64, Vec<(String, i32)>);
        let mut used: BTreeMap<&str, Used> = BTreeMap::new();
        for pod in pods.iter().filter(|p| !p.spec.node_name.is_empty()) {
            let name = pod.spec.node_name.as_str();
            let info = infos.get(name).ok_or(format!("{} bound to unknown node {name}", pod.metadata.name))?;
            let cordon =
                Taint { key: UNSCHEDULABLE_TAINT_KEY.into(), value: String::new(), effect: TaintEffect::NoSchedule };
            if !info.ready || (info.node.spec.unschedulable && !tolerates(&pod.spec.tolerations, &cordon)) {
                return Err(format!("{} bound to unready or cordoned node {name}", pod.metadata.name));
            }
            if !selector_matches(&pod.spec.node_selector, &info.node.metadata.labels) {
                return Err(format!("{} bound to {name} against its nodeSelector", pod.metadata.name));
            }
            let blocking = info.node.spec.taints.iter().filter(|t| t.effect != TaintEffect::PreferNoSchedule);
            if let Some(taint) = blocking.clone().find(|t| !tolerates(&pod.spec.tolerations, t)) {
                return Err(format!("{} bound to {name} despite taint {}", pod.metadata.name, taint.key));
            }
            let entry = used.entry(name).or_default();
            let requests = pod.requests();
            entry.0 += requests.cpu_millis;
            entry.1 += requests.memory_bytes;
            entry.2 += 1;
            for (protocol, port) in pod.host_ports() {
                if entry.3.contains(&(protocol.to_string(), port)) {
                    return Err(format!("host port {port} used twice on {name}"));
                }
                entry.3.push((protocol.to_string(), port));
            }
        }
        for (name, (cpu, memory, count, _)) in &used {
            let info = &infos[name];
            if *cpu > info.allocatable.cpu_millis
                || *memory > info.allocatable.memory_bytes
                || *count > info.allocatable_pods
            {
                return Err(format!("node {name} over-committed: cpu {cpu}m, memory {memory}, pods {count}"));
            }
        }
        let mut final_cache = Cache::default();
        for n in nodes {
            final_cache.upsert(Object::Node(n.clone()));
        }
        for p in pods {
            final_cache.upsert(Object::Pod(p.clone()));
        }
        let mut rejections = Vec::new();
        for pod in pods.iter().filter(|p| p.spec.node_name.is_empty()) {
            for info in final_cache.nodes.values() {
                filter(&PodRequest::new(pod), info, &mut rejections);
                if rejections.is_empty() {
                    return Err(format!(
                        "{} left unbound although it fits on {}",
                        pod.metadata.name, info.node.metadata.name
                    ));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_placement_checker_catches_broken_placements() {
        let n = node("n", "1", "1Gi", 110).node;
        let mut a = named(pod("800m", "100Mi"), "a");
        let mut b = named(pod("800m", "100Mi"), "b");
        a.spec.node_name = "n".into();
        assert_eq!(check_placement(std::slice::from_ref(&n), &[a.clone(), b.clone()]), Ok(()));
        b.spec.node_name = "n".into();
        assert!(check_placement(std::slice::from_ref(&n), &[a.clone(), b.clone()])
            .unwrap_err()
            .contains("over-committed"));
        b.spec.node_name.clear();
        a.spec.node_name.clear();
        assert!(check_placement(std::slice::from_ref(&n), &[a.clone(), b]).unwrap_err().contains("fits on n"));
        let mut tainted = n;
        tainted.spec.taints.push(Taint { key: "k".into(), value: String::new(), effect: TaintEffect::NoExecute });
        a.spec.node_name = "n".into();
        assert!(check_placement(&[tainted], &[a]).unwrap_err().contains("despite taint"));
    }

    fn arb_node(index: usize) -> impl Strategy<Value = Node> {
        (1u32..=8, 1u32..=16, 1i64..=6, any::<bool>(), 0u8..4, prop::option::of(0u8..3), prop::bool::weighted(0.1))
            .prop_map(move |(cpu, memory_gi, pods, ssd, taint, zone, not_ready)| {
                let mut info = node(&format!("n{index}"), &cpu.to_string(), &format!("{memory_gi}Gi"), pods);
                if ssd {
                    info.node.metadata.labels.insert("disk".into(), "ssd".into());
                }
                if let Some(zone) = zone {
                    info.node.metadata.labels.insert("zone".into(), format!("z{zone}"));
                }
                match taint {
                    1 => info.node.spec.taints.push(Taint {
                        key: "gpu".into(),
                        value: "yes".into(),
                        effect: TaintEffect::NoSchedule,
                    }),
                    2 => info.node.spec.taints.push(Taint {
                        key: "edge".into(),
                        value: String::new(),
                        effect: TaintEffect::NoExecute,
                    }),
                    3 => info.node.spec.unschedulable = true,
                    _ => {}
                }
                if not_ready {
                    info.node.status.conditions[0].status = "False".into();
                }
                info.node
            })
    }

    fn arb_pod(index: usize) -> impl Strategy<Value = Pod> {
        (0u32..3000, 0u32..4096, prop::option::of(any::<bool>()), 0u8..4, prop::option::of(8000i32..8003)).prop_map(
            move |(cpu_millis, memory_mi, selector, toleration, host_port)| {
                let mut p = named(pod(&format!("{cpu_millis}m"), &format!("{memory_mi}Mi")), &format!("p{index}"));
                match selector {
                    Some(true) => {
                        p.spec.node_selector.insert("disk".into(), "ssd".into());
                    }
                    Some(false) => {
                        p.spec.node_selector.insert("zone".into(), "z1".into());
                    }
                    None => {}
                }
                let tolerate = |key: &str| Toleration {
                    key: key.into(),
                    operator: TolerationOperator::Exists,
                    ..Default::default()
                };
                match toleration {
                    1 => p.spec.tolerations.push(tolerate("gpu")),
                    2 => p.spec.tolerations.push(tolerate("edge")),
                    3 => p.spec.tolerations.push(tolerate("")),
                    _ => {}
                }
                if let Some(port) = host_port {
                    p.spec.containers[0].ports.push(capstan_proto::objects::ContainerPort {
                        container_port: 80,
                        host_port: Some(port),
                        protocol: "TCP".into(),
                        ..Default::default()
                    });
                }
                p.spec.containers[0].resources.limits.insert("cpu".into(), Quantity::new("8"));
                p
            },
        )
    }

    fn arb_cluster() -> impl Strategy<Value = (Vec<Node>, Vec<Pod>)> {
        (0usize..12, 0usize..60).prop_flat_map(|(nodes, pods)| {
            ((0..nodes).map(arb_node).collect::<Vec<_>>(), (0..pods).map(arb_pod).collect::<Vec<_>>())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random nodes and pods: nothing over-committed, selectors, taints and ports
        /// respected, and every pod that could be bound is.
        #[test]
        fn placements_are_safe_and_complete((nodes, pods) in arb_cluster()) {
            let mut cache = Cache::default();
            for n in &nodes {
                cache.upsert(Object::Node(n.clone()));
            }
            for p in &pods {
                cache.upsert(Object::Pod(p.clone()));
            }
            let decisions = run(&mut cache);
            prop_assert_eq!(decisions.len(), pods.len());
            let placed: Vec<Pod> = cache.pods.values().cloned().collect();
            if let Err(problem) = check_placement(&nodes, &placed) {
                return Err(TestCaseError::fail(problem));
            }
            for decision in decisions {
                if let Decision::Unschedulable { message, .. } = decision {
                    prop_assert!(message.starts_with(&format!("0/{} nodes available", nodes.len())), "{}", message);
                }
            }
        }
    }

    #[test]
    fn the_meta_of_a_bound_pod_is_kept() {
        let mut cache = Cache::default();
        cache.upsert(Object::Node(node("n", "1", "1Gi", 10).node));
        let mut p = named(pod("1", "1Mi"), "x");
        p.metadata =
            ObjectMeta { name: "x".into(), uid: "u".into(), resource_version: "7".into(), ..Default::default() };
        cache.upsert(Object::Pod(p.clone()));
        let Some(Decision::Bind { original, node, .. }) = Scheduler::default().schedule_one(&mut cache, &key(&p))
        else {
            panic!("not bound")
        };
        assert_eq!((*original, node.as_str()), (p.clone(), "n"));
        assert_eq!(cache.pods[&key(&p)].metadata.resource_version, "7", "the bind is written at the version read");
    }
}
