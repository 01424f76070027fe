//! Filters and scores: pure functions of a pod and one node's cached state, as the
//! Kubernetes scheduler's default plugins define them.
//!
//! Filters (a node must pass all): Ready, not unschedulable, cpu/memory/pod-count fit,
//! nodeSelector, taints with NoSchedule or NoExecute tolerated, host ports free.
//! Scores (0..=100 each, higher is better): least allocated, balanced allocation, and
//! spread of a ReplicaSet's pods; weighted 1, 1 and 2 as in Kubernetes' defaults.

use std::collections::BTreeMap;

use capstan_proto::objects::{Pod, Requests, Taint, TaintEffect, Toleration, TolerationOperator};

use crate::cache::NodeInfo;

/// Why a node cannot take a pod; the text is what the pod's condition counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    NotReady,
    Unschedulable,
    InsufficientCpu,
    InsufficientMemory,
    TooManyPods,
    NodeSelectorMismatch,
    UntoleratedTaint,
    HostPortConflict,
}

impl Rejection {
    pub fn text(self) -> &'static str {
        match self {
            Rejection::NotReady => "node(s) were not ready",
            Rejection::Unschedulable => "node(s) were unschedulable",
            Rejection::InsufficientCpu => "insufficient cpu",
            Rejection::InsufficientMemory => "insufficient memory",
            Rejection::TooManyPods => "too many pods",
            Rejection::NodeSelectorMismatch => "node(s) didn't match Pod's node selector",
            Rejection::UntoleratedTaint => "node(s) had untolerated taint",
            Rejection::HostPortConflict => "node(s) didn't have free ports for the requested pod ports",
        }
    }
}

/// The taint Kubernetes puts on cordoned nodes; a pod tolerating it may still land there.
pub const UNSCHEDULABLE_TAINT_KEY: &str = "node.kubernetes.io/unschedulable";

/// What the scheduler knows of a pod while placing it, computed once per attempt.
pub struct PodRequest<'a> {
    pub pod: &'a Pod,
    pub requests: Requests,
    /// The controlling ReplicaSet's UID, for spreading.
    pub owner_uid: Option<&'a str>,
}

impl<'a> PodRequest<'a> {
    pub fn new(pod: &'a Pod) -> Self {
        Self { pod, requests: pod.requests(), owner_uid: pod.controller().map(|owner| owner.uid.as_str()) }
    }
}

/// Runs every filter; returns the reasons the node is refused (empty: it fits). Resource
/// fit reports every resource that is short, as Kubernetes' NodeResourcesFit does; the
/// other filters stop at the first that fails.
pub fn filter(request: &PodRequest<'_>, node: &NodeInfo, rejections: &mut Vec<Rejection>) {
    rejections.clear();
    if !node.ready {
        rejections.push(Rejection::NotReady);
        return;
    }
    let tolerations = &request.pod.spec.tolerations;
    if node.node.spec.unschedulable
        && !tolerates(
            tolerations,
            &Taint { key: UNSCHEDULABLE_TAINT_KEY.into(), value: String::new(), effect: TaintEffect::NoSchedule },
        )
    {
        rejections.push(Rejection::Unschedulable);
        return;
    }
    fits(request.requests, node, rejections);
    if !rejections.is_empty() {
        return;
    }
    if !selector_matches(&request.pod.spec.node_selector, &node.node.metadata.labels) {
        rejections.push(Rejection::NodeSelectorMismatch);
        return;
    }
    let blocking = |taint: &&Taint| matches!(taint.effect, TaintEffect::NoSchedule | TaintEffect::NoExecute);
    if node.node.spec.taints.iter().filter(blocking).any(|taint| !tolerates(tolerations, taint)) {
        rejections.push(Rejection::UntoleratedTaint);
        return;
    }
    if request
        .pod
        .host_ports()
        .any(|(protocol, port)| node.usage.host_ports.contains_key(&(protocol.to_string(), port)))
    {
        rejections.push(Rejection::HostPortConflict);
    }
}

/// Resource fit: what is already requested on the node plus this pod within allocatable.
fn fits(requests: Requests, node: &NodeInfo, rejections: &mut Vec<Rejection>) {
    let usage = &node.usage;
    let after = |used: i64, wanted: i64| used.saturating_add(wanted);
    if requests.cpu_millis > 0 && after(usage.requested.cpu_millis, requests.cpu_millis) > node.allocatable.cpu_millis {
        rejections.push(Rejection::InsufficientCpu);
    }
    if requests.memory_bytes > 0 && usage.requested.memory_bytes + requests.memory_bytes > node.allocatable.memory_bytes
    {
        rejections.push(Rejection::InsufficientMemory);
    }
    if usage.pods + 1 > node.allocatable_pods {
        rejections.push(Rejection::TooManyPods);
    }
}

/// Every nodeSelector pair must be among the node's labels.
pub fn selector_matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

/// Kubernetes' toleration semantics: an empty key with Exists tolerates every taint; an
/// absent effect matches every effect.
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|toleration| {
        toleration.effect.is_none_or(|effect| effect == taint.effect)
            && match toleration.operator {
                TolerationOperator::Exists => toleration.key.is_empty() || toleration.key == taint.key,
                TolerationOperator::Equal => toleration.key == taint.key && toleration.value == taint.value,
            }
    })
}

/// Score weights, as in Kubernetes' default profile.
const WEIGHT_LEAST_ALLOCATED: i64 = 1;
const WEIGHT_BALANCED: i64 = 1;
const WEIGHT_SPREAD: i64 = 2;
const SCORE_MAX: i64 = 100;

/// The fraction of a node's cpu and memory that would be requested with the pod on it,
/// in 0..=1 each. A resource the node does not offer counts as fully used.
fn fractions(request: &PodRequest<'_>, node: &NodeInfo) -> (f64, f64) {
    let fraction = |used: i64, wanted: i64, allocatable: i64| {
        if allocatable <= 0 {
            1.0
        } else {
            (used.saturating_add(wanted) as f64 / allocatable as f64).min(1.0)
        }
    };
    let usage = &node.usage.requested;
    (
        fraction(usage.cpu_millis, request.requests.cpu_millis, node.allocatable.cpu_millis),
        fraction(usage.memory_bytes, request.requests.memory_bytes, node.allocatable.memory_bytes),
    )
}

/// Prefers nodes with more room left: the mean free fraction of cpu and memory.
pub fn least_allocated(request: &PodRequest<'_>, node: &NodeInfo) -> i64 {
    let (cpu, memory) = fractions(request, node);
    ((1.0 - (cpu + memory) / 2.0) * SCORE_MAX as f64) as i64
}

/// Prefers nodes whose cpu and memory would be used in equal proportion.
pub fn balanced_allocation(request: &PodRequest<'_>, node: &NodeInfo) -> i64 {
    let (cpu, memory) = fractions(request, node);
    ((1.0 - (cpu - memory).abs()) * SCORE_MAX as f64) as i64
}

/// Prefers nodes with fewer pods of the same ReplicaSet, relative to the feasible node
/// with the most: `max_on_any` is that count.
pub fn spread(request: &PodRequest<'_>, node: &NodeInfo, max_on_any: u32) -> i64 {
    let Some(owner) = request.owner_uid else { return SCORE_MAX };
    if max_on_any == 0 {
        return SCORE_MAX;
    }
    let here = node.usage.owners.get(owner).copied().unwrap_or(0);
    SCORE_MAX * i64::from(max_on_any - here.min(max_on_any)) / i64::from(max_on_any)
}

/// The weighted total of every score.
pub fn score(request: &PodRequest<'_>, node: &NodeInfo, max_on_any: u32) -> i64 {
    WEIGHT_LEAST_ALLOCATED * least_allocated(request, node)
        + WEIGHT_BALANCED * balanced_allocation(request, node)
        + WEIGHT_SPREAD * spread(request, node, max_on_any)
}

#[cfg(test)]
pub(crate) mod tests {
    use capstan_proto::objects::{ContainerPort, Node, OwnerReference, Quantity, CONDITION_FALSE};

    use super::*;
    use crate::cache::Usage;

    pub fn node(name: &str, cpu: &str, memory: &str, pods: i64) -> NodeInfo {
        NodeInfo::new(Node::ready(name, cpu, memory, &pods.to_string()), Usage::default())
    }

    pub fn pod(cpu: &str, memory: &str) -> Pod {
        Pod::requesting("", "p", &["true"], cpu, memory)
    }

    fn rejections(pod: &Pod, node: &NodeInfo) -> Vec<Rejection> {
        let mut out = Vec::new();
        filter(&PodRequest::new(pod), node, &mut out);
        out
    }

    fn using(mut info: NodeInfo, cpu_millis: i64, memory_bytes: i64, pods: i64) -> NodeInfo {
        info.usage.requested = Requests { cpu_millis, memory_bytes };
        info.usage.pods = pods;
        info
    }

    #[test]
    fn a_node_that_is_not_ready_is_refused() {
        let mut info = node("n", "4", "8Gi", 110);
        info.node.status.conditions[0].status = CONDITION_FALSE.into();
        let info = NodeInfo::new(info.node, Usage::default());
        assert_eq!(rejections(&pod("1", "1Gi"), &info), vec![Rejection::NotReady]);
        let mut never = node("n", "4", "8Gi", 110).node;
        never.status.conditions.clear();
        assert_eq!(rejections(&pod("1", "1Gi"), &NodeInfo::new(never, Usage::default())), vec![Rejection::NotReady]);
    }

    #[test]
    fn a_cordoned_node_is_refused_unless_tolerated() {
        let mut info = node("n", "4", "8Gi", 110);
        info.node.spec.unschedulable = true;
        let mut p = pod("1", "1Gi");
        assert_eq!(rejections(&p, &info), vec![Rejection::Unschedulable]);
        p.spec.tolerations.push(Toleration {
            key: UNSCHEDULABLE_TAINT_KEY.into(),
            operator: TolerationOperator::Exists,
            ..Default::default()
        });
        assert_eq!(rejections(&p, &info), vec![]);
    }

    #[test]
    fn resources_must_fit_what_is_left() {
        let info = using(node("n", "4", "8Gi", 3), 3500, 6 << 30, 2);
        assert_eq!(rejections(&pod("500m", "2Gi"), &info), vec![], "exactly full is a fit");
        assert_eq!(rejections(&pod("501m", "2Gi"), &info), vec![Rejection::InsufficientCpu]);
        assert_eq!(
            rejections(&pod("1", "3Gi"), &info),
            vec![Rejection::InsufficientCpu, Rejection::InsufficientMemory]
        );
        let full = using(node("n", "4", "8Gi", 3), 0, 0, 3);
        assert_eq!(rejections(&pod("0", "0"), &full), vec![Rejection::TooManyPods]);
        let allocatable = {
            let mut n = node("n", "4", "8Gi", 10).node;
            n.status.allocatable.insert("cpu".into(), Quantity::new("1"));
            NodeInfo::new(n, Usage::default())
        };
        assert_eq!(
            rejections(&pod("2", "1Gi"), &allocatable),
            vec![Rejection::InsufficientCpu],
            "allocatable wins over capacity"
        );
    }

    #[test]
    fn node_selector_must_match_labels() {
        let mut info = node("n", "4", "8Gi", 110);
        info.node.metadata.labels.insert("disk".into(), "ssd".into());
        let mut p = pod("1", "1Gi");
        p.spec.node_selector.insert("disk".into(), "ssd".into());
        assert_eq!(rejections(&p, &info), vec![]);
        p.spec.node_selector.insert("zone".into(), "a".into());
        assert_eq!(rejections(&p, &info), vec![Rejection::NodeSelectorMismatch]);
    }

    #[test]
    fn taints_keep_pods_off_unless_tolerated() {
        let mut info = node("n", "4", "8Gi", 110);
        info.node.spec.taints.push(Taint { key: "gpu".into(), value: "true".into(), effect: TaintEffect::NoSchedule });
        info.node.spec.taints.push(Taint {
            key: "soft".into(),
            value: String::new(),
            effect: TaintEffect::PreferNoSchedule,
        });
        let mut p = pod("1", "1Gi");
        assert_eq!(rejections(&p, &info), vec![Rejection::UntoleratedTaint]);
        let equal = Toleration {
            key: "gpu".into(),
            value: "true".into(),
            effect: Some(TaintEffect::NoSchedule),
            ..Default::default()
        };
        p.spec.tolerations = vec![Toleration { value: "false".into(), ..equal.clone() }];
        assert_eq!(rejections(&p, &info), vec![Rejection::UntoleratedTaint], "value must match");
        p.spec.tolerations = vec![Toleration { effect: Some(TaintEffect::NoExecute), ..equal.clone() }];
        assert_eq!(rejections(&p, &info), vec![Rejection::UntoleratedTaint], "effect must match");
        p.spec.tolerations = vec![equal];
        assert_eq!(rejections(&p, &info), vec![], "PreferNoSchedule is not a filter");
        p.spec.tolerations = vec![Toleration { operator: TolerationOperator::Exists, ..Default::default() }];
        assert_eq!(rejections(&p, &info), vec![], "empty key with Exists tolerates everything");
        info.node.spec.taints[0].effect = TaintEffect::NoExecute;
        p.spec.tolerations.clear();
        assert_eq!(rejections(&p, &info), vec![Rejection::UntoleratedTaint]);
    }

    #[test]
    fn host_ports_conflict_per_protocol() {
        let mut info = node("n", "4", "8Gi", 110);
        info.usage.host_ports.insert(("TCP".into(), 8080), 1);
        let mut p = pod("1", "1Gi");
        p.spec.containers[0].ports.push(ContainerPort {
            container_port: 80,
            host_port: Some(8080),
            protocol: "UDP".into(),
            ..Default::default()
        });
        assert_eq!(rejections(&p, &info), vec![]);
        p.spec.containers[0].ports[0].protocol = "TCP".into();
        assert_eq!(rejections(&p, &info), vec![Rejection::HostPortConflict]);
    }

    #[test]
    fn least_allocated_prefers_emptier_nodes() {
        let p = pod("1", "2Gi");
        let request = PodRequest::new(&p);
        let empty = node("a", "4", "8Gi", 110);
        let busy = using(node("b", "4", "8Gi", 110), 2000, 4 << 30, 1);
        assert_eq!(least_allocated(&request, &empty), 75);
        assert_eq!(least_allocated(&request, &busy), 25);
    }

    #[test]
    fn balanced_allocation_prefers_even_use() {
        let p = pod("2", "1Gi");
        let request = PodRequest::new(&p);
        let even = using(node("a", "4", "8Gi", 110), 0, 3 << 30, 1);
        let skewed = node("b", "4", "8Gi", 110);
        assert_eq!(balanced_allocation(&request, &even), 100);
        assert_eq!(balanced_allocation(&request, &skewed), 62);
    }

    #[test]
    fn spread_prefers_nodes_with_fewer_siblings() {
        let mut p = pod("1", "1Gi");
        p.metadata.owner_references.push(OwnerReference { uid: "rs-1".into(), controller: true, ..Default::default() });
        let request = PodRequest::new(&p);
        let mut crowded = node("a", "4", "8Gi", 110);
        crowded.usage.owners.insert("rs-1".into(), 2);
        let lonely = node("b", "4", "8Gi", 110);
        assert_eq!(spread(&request, &crowded, 2), 0);
        assert_eq!(spread(&request, &lonely, 2), 100);
        assert!(score(&request, &lonely, 2) > score(&request, &crowded, 2));
        let orphan = pod("1", "1Gi");
        assert_eq!(spread(&PodRequest::new(&orphan), &crowded, 2), 100, "no owner, no preference");
    }
}
