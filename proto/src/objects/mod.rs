//! Cluster objects in Kubernetes' shape: [`Node`], [`Pod`] and [`ReplicaSet`], their keys
//! in the store (`/registry/...`), and their encoding there (JSON, readable with
//! `etcdctl get`). A manifest a Kubernetes user wrote for these kinds decodes unchanged;
//! fields Capstan does not act on are reported by [`manifest::decode_documents`], never
//! dropped silently.
//!
//! `metadata.resourceVersion` is the key's mod_revision: it is filled in when an object is
//! read ([`decode_stored`]) and never stored, and writers compare it in their txn
//! (optimistic concurrency, as the Kubernetes API server does).
//!
//! Layout: this file has the types; `quantity` parses resource amounts, `validate` checks
//! an object and names the offending field, `manifest` reads YAML or JSON documents.

pub mod manifest;
pub mod quantity;
pub mod validate;

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use quantity::{InvalidQuantity, Quantity};

/// The prefix under which every cluster object lives.
pub const REGISTRY_PREFIX: &str = "/registry/";
/// Node heartbeats: a key per node, attached to the agent's lease, so it disappears when
/// the lease expires.
pub const NODE_LEASE_PREFIX: &str = "/registry/leases/nodes/";
/// Namespaced objects without a namespace land here, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Resource names, as in Kubernetes' `requests` and `capacity` maps.
pub const RESOURCE_CPU: &str = "cpu";
pub const RESOURCE_MEMORY: &str = "memory";
pub const RESOURCE_PODS: &str = "pods";

/// The kinds of object Capstan stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Pod,
    ReplicaSet,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Node, Kind::Pod, Kind::ReplicaSet];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::ReplicaSet => "ReplicaSet",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Node | Kind::Pod => "v1",
            Kind::ReplicaSet => "apps/v1",
        }
    }

    /// The plural, lower-case resource name (`kubectl get pods`), also the key segment.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::ReplicaSet => "replicasets",
        }
    }

    /// How kubectl prints an object of this kind: `pod/web`, `replicaset.apps/web`.
    pub fn qualified(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Pod => "pod",
            Kind::ReplicaSet => "replicaset.apps",
        }
    }

    pub fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The kind a `kubectl get` argument names: singular, plural or short name.
    pub fn from_resource(name: &str) -> Option<Kind> {
        match name.to_ascii_lowercase().as_str() {
            "node" | "nodes" | "no" => Some(Kind::Node),
            "pod" | "pods" | "po" => Some(Kind::Pod),
            "replicaset" | "replicasets" | "rs" | "replicaset.apps" | "replicasets.apps" => Some(Kind::ReplicaSet),
            _ => None,
        }
    }

    /// Where objects of this kind live: `/registry/pods/` (then `<ns>/<name>`).
    pub fn prefix(self) -> String {
        format!("{REGISTRY_PREFIX}{}/", self.resource())
    }

    /// The prefix of one namespace's objects (or of all of them for a cluster-scoped kind).
    pub fn namespace_prefix(self, namespace: &str) -> String {
        if self.namespaced() {
            format!("{}{namespace}/", self.prefix())
        } else {
            self.prefix()
        }
    }

    /// The store key of one object.
    pub fn key(self, namespace: &str, name: &str) -> String {
        format!("{}{name}", self.namespace_prefix(namespace))
    }

    /// The kind whose objects live under `key`, if any.
    pub fn of_key(key: &[u8]) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| key.starts_with(kind.prefix().as_bytes()))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub generate_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// The key's mod_revision when read; never stored.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub creation_timestamp: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
    #[serde(default)]
    pub controller: bool,
}

/// `key=value:Effect` on a node: pods that do not tolerate it are kept off (NoSchedule) or
/// also evicted (NoExecute); PreferNoSchedule is a preference, not a filter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub effect: TaintEffect,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Toleration {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    #[serde(default)]
    pub operator: TolerationOperator,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// Absent: tolerates every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

/// A condition as Kubernetes reports them: `type` is `Ready`, `PodScheduled`, ...;
/// `status` is `True`, `False` or `Unknown`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_heartbeat_time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition_time: String,
}

pub const CONDITION_TRUE: &str = "True";
pub const CONDITION_FALSE: &str = "False";
pub const CONDITION_UNKNOWN: &str = "Unknown";

/// Finds the condition of a type.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|condition| condition.type_ == type_)
}

/// Sets a condition, keeping its lastTransitionTime when the status does not change.
/// Returns whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition, now: &str) -> bool {
    match conditions.iter_mut().find(|condition| condition.type_ == new.type_) {
        Some(old) => {
            new.last_transition_time =
                if old.status == new.status { old.last_transition_time.clone() } else { now.to_string() };
            if new.last_heartbeat_time.is_empty() {
                new.last_heartbeat_time = old.last_heartbeat_time.clone();
            }
            let changed = *old != new;
            *old = new;
            changed
        }
        None => {
            new.last_transition_time = now.to_string();
            conditions.push(new);
            true
        }
    }
}

// ---------------------------------------------------------------------------------------
// Node

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default)]
    pub status: NodeStatus,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capacity: BTreeMap<String, Quantity>,
    /// What pods may request; capacity when absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allocatable: BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    /// Where the node's agent serves pod logs (`capstan ctl logs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_endpoints: Option<DaemonEndpoints>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub type_: String,
    pub address: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DaemonEndpoints {
    #[serde(default)]
    pub kubelet_endpoint: Endpoint,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Endpoint {
    #[serde(default)]
    pub port: u16,
}

pub const NODE_READY: &str = "Ready";

impl Node {
    /// Where the node's agent serves pod logs (`http://InternalIP:port`), if it says.
    pub fn log_url(&self) -> Option<String> {
        let address = self.status.addresses.iter().find(|address| address.type_ == "InternalIP")?;
        let port = self.status.daemon_endpoints.as_ref().map(|d| d.kubelet_endpoint.port).filter(|p| *p > 0)?;
        Some(format!("http://{}:{port}", address.address))
    }

    /// A node that says it is Ready, with this capacity: what benchmarks, tests and the
    /// chaos harness register where no agent runs.
    pub fn ready(name: &str, cpu: &str, memory: &str, pods: &str) -> Node {
        let mut node = Node { metadata: ObjectMeta { name: name.into(), ..Default::default() }, ..Default::default() };
        for (resource, amount) in [(RESOURCE_CPU, cpu), (RESOURCE_MEMORY, memory), (RESOURCE_PODS, pods)] {
            node.status.capacity.insert(resource.into(), Quantity::new(amount));
        }
        node.status.conditions.push(Condition {
            type_: NODE_READY.into(),
            status: CONDITION_TRUE.into(),
            ..Default::default()
        });
        node
    }

    /// Allocatable where given, else capacity (as the Kubernetes scheduler reads it).
    pub fn allocatable(&self, resource: &str) -> Option<&Quantity> {
        self.status.allocatable.get(resource).or_else(|| self.status.capacity.get(resource))
    }

    /// Ready=True: the agent says so and the node-lifecycle controller has not marked
    /// the node lost.
    pub fn is_ready(&self) -> bool {
        condition(&self.status.conditions, NODE_READY).is_some_and(|ready| ready.status == CONDITION_TRUE)
    }
}

// ---------------------------------------------------------------------------------------
// Pod

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    /// The node the pod is bound to; set by the scheduler (a bind) or by the manifest.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "ResourceRequirements::is_empty")]
    pub resources: ResourceRequirements,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequirements {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}

impl ResourceRequirements {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.limits.is_empty()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub container_port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<i32>,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "TCP".to_string()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    /// Succeeded or Failed: the pod will not run again and holds no resources.
    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }

    pub fn name(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
            PodPhase::Unknown => "Unknown",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: PodPhase,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub start_time: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_statuses: Vec<ContainerStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub restart_count: i32,
    #[serde(default)]
    pub state: ContainerState,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<ContainerStateWaiting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<ContainerStateRunning>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<ContainerStateTerminated>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateWaiting {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateRunning {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateTerminated {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub finished_at: String,
}

pub const POD_SCHEDULED: &str = "PodScheduled";
pub const POD_READY: &str = "Ready";
/// The reason a pod that fits no node carries in its PodScheduled condition.
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";
/// The reason of a pod failed because its node was lost.
pub const REASON_NODE_LOST: &str = "NodeLost";

/// What a pod asks of a node, summed over its containers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub cpu_millis: i64,
    pub memory_bytes: i64,
}

impl Pod {
    /// A pod of one container, `main`, running `command` and requesting `cpu` and
    /// `memory`: what benchmarks, tests and the chaos harness create.
    pub fn requesting(namespace: &str, name: &str, command: &[&str], cpu: &str, memory: &str) -> Pod {
        let mut container = Container {
            name: "main".into(),
            command: command.iter().map(|arg| arg.to_string()).collect(),
            ..Default::default()
        };
        container.resources.requests.insert(RESOURCE_CPU.into(), Quantity::new(cpu));
        container.resources.requests.insert(RESOURCE_MEMORY.into(), Quantity::new(memory));
        Pod {
            metadata: ObjectMeta { name: name.into(), namespace: namespace.into(), ..Default::default() },
            spec: PodSpec { containers: vec![container], ..Default::default() },
            ..Default::default()
        }
    }

    pub fn namespace(&self) -> &str {
        namespace_or_default(&self.metadata.namespace)
    }

    /// Requests of all containers; unparsable amounts count as zero (validation refuses
    /// them before they are stored, and the scheduler skips pods that fail validation).
    pub fn requests(&self) -> Requests {
        let mut total = Requests::default();
        for container in &self.spec.containers {
            let requests = &container.resources.requests;
            let amount = |name: &str, milli: bool| {
                requests
                    .get(name)
                    .map(|q| if milli { q.milli_value() } else { q.value() })
                    .and_then(Result::ok)
                    .unwrap_or(0)
            };
            total.cpu_millis = total.cpu_millis.saturating_add(amount(RESOURCE_CPU, true));
            total.memory_bytes = total.memory_bytes.saturating_add(amount(RESOURCE_MEMORY, false));
        }
        total
    }

    /// Host ports the pod claims, as (protocol, port).
    pub fn host_ports(&self) -> impl Iterator<Item = (&str, i32)> {
        self.spec
            .containers
            .iter()
            .flat_map(|container| &container.ports)
            .filter_map(|port| port.host_port.filter(|&p| p > 0).map(|p| (port.protocol.as_str(), p)))
    }

    /// The ReplicaSet that controls this pod, if any.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.metadata.owner_references.iter().find(|owner| owner.controller)
    }

    /// Bound to a node and not finished: it holds that node's resources.
    pub fn holds_resources(&self) -> bool {
        !self.spec.node_name.is_empty() && !self.status.phase.is_terminal()
    }
}

// ---------------------------------------------------------------------------------------
// ReplicaSet

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSet {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReplicaSetSpec,
    #[serde(default)]
    pub status: ReplicaSetStatus,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSetSpec {
    /// Kubernetes defaults an absent count to 1.
    #[serde(default = "one")]
    pub replicas: i32,
    #[serde(default)]
    pub selector: LabelSelector,
    #[serde(default)]
    pub template: PodTemplateSpec,
}

fn one() -> i32 {
    1
}

impl Default for ReplicaSetSpec {
    fn default() -> Self {
        Self { replicas: one(), selector: LabelSelector::default(), template: PodTemplateSpec::default() }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SelectorOperator {
    #[default]
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether a set of labels satisfies every term (an empty selector matches nothing,
    /// as a ReplicaSet's must; validation refuses empty ones).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.match_labels.is_empty() && self.match_expressions.is_empty() {
            return false;
        }
        self.match_labels.iter().all(|(key, value)| labels.get(key) == Some(value))
            && self.match_expressions.iter().all(|term| {
                let value = labels.get(&term.key);
                match term.operator {
                    SelectorOperator::In => value.is_some_and(|v| term.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !term.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// `app=web,tier in (a,b)`, as kubectl prints selectors.
    pub fn to_text(&self) -> String {
        let mut terms: Vec<String> = self.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for term in &self.match_expressions {
            terms.push(match term.operator {
                SelectorOperator::In => format!("{} in ({})", term.key, term.values.join(",")),
                SelectorOperator::NotIn => format!("{} notin ({})", term.key, term.values.join(",")),
                SelectorOperator::Exists => term.key.clone(),
                SelectorOperator::DoesNotExist => format!("!{}", term.key),
            });
        }
        terms.join(",")
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateSpec {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSetStatus {
    #[serde(default)]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ready_replicas: i32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub available_replicas: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl ReplicaSet {
    pub fn namespace(&self) -> &str {
        namespace_or_default(&self.metadata.namespace)
    }
}

// ---------------------------------------------------------------------------------------
// Any object

/// One object of any kind, as read from a manifest or the store.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Node(Node),
    Pod(Pod),
    ReplicaSet(ReplicaSet),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::ReplicaSet(_) => Kind::ReplicaSet,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Node(node) => &node.metadata,
            Object::Pod(pod) => &pod.metadata,
            Object::ReplicaSet(rs) => &rs.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Node(node) => &mut node.metadata,
            Object::Pod(pod) => &mut pod.metadata,
            Object::ReplicaSet(rs) => &mut rs.metadata,
        }
    }

    /// The namespace the object lives in: `default` when unset, empty for nodes.
    pub fn namespace(&self) -> &str {
        match self.kind() {
            Kind::Node => "",
            _ => namespace_or_default(&self.metadata().namespace),
        }
    }

    pub fn key(&self) -> String {
        self.kind().key(self.namespace(), &self.metadata().name)
    }

    /// The JSON stored under the object's key: resourceVersion cleared, apiVersion and
    /// kind set, namespace made explicit.
    pub fn encode(&self) -> Vec<u8> {
        let mut object = self.clone();
        let kind = object.kind();
        let namespace = object.namespace().to_string();
        let meta = object.metadata_mut();
        meta.resource_version.clear();
        meta.namespace = namespace;
        let (api_version, kind_field) = match &mut object {
            Object::Node(o) => (&mut o.api_version, &mut o.kind),
            Object::Pod(o) => (&mut o.api_version, &mut o.kind),
            Object::ReplicaSet(o) => (&mut o.api_version, &mut o.kind),
        };
        *api_version = kind.api_version().to_string();
        *kind_field = kind.name().to_string();
        let encoded = match &object {
            Object::Node(o) => serde_json::to_vec(o),
            Object::Pod(o) => serde_json::to_vec(o),
            Object::ReplicaSet(o) => serde_json::to_vec(o),
        };
        // Serialising these plain structs (string keys, no floats) cannot fail.
        encoded.expect("cluster objects always serialise to JSON")
    }

    /// The object as a JSON value, for `-o json|yaml`.
    pub fn to_value(&self) -> serde_json::Value {
        let mut value: serde_json::Value = serde_json::from_slice(&self.encode()).expect("encode writes valid JSON");
        if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            if !self.metadata().resource_version.is_empty() {
                meta.insert("resourceVersion".into(), self.metadata().resource_version.clone().into());
            }
        }
        value
    }
}

/// Why a stored value is not an object of the kind its key says.
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot decode: {reason}")]
pub struct DecodeError {
    pub key: String,
    pub reason: String,
}

/// Decodes the value stored under `key` (of the kind the key names), filling in
/// resourceVersion from the key's mod_revision. Values written by other clients may be
/// anything; they give a [`DecodeError`], never a panic.
pub fn decode_stored(key: &[u8], value: &[u8], mod_revision: i64) -> Result<Object, DecodeError> {
    let key_text = String::from_utf8_lossy(key).into_owned();
    let error = |reason: String| DecodeError { key: key_text.clone(), reason };
    let kind = Kind::of_key(key).ok_or_else(|| error("not the key of a cluster object".into()))?;
    let mut object = match kind {
        Kind::Node => serde_json::from_slice(value).map(Object::Node),
        Kind::Pod => serde_json::from_slice(value).map(Object::Pod),
        Kind::ReplicaSet => serde_json::from_slice(value).map(Object::ReplicaSet),
    }
    .map_err(|e| error(format!("not a {}: {e}", kind.name())))?;
    if object.key() != key_text {
        return Err(error(format!("its name and namespace belong at {}", object.key())));
    }
    // Names become file and directory names on nodes: refuse what validation would.
    let meta = object.metadata();
    if !validate::is_subdomain(&meta.name) || !validate::is_dns_label(object.namespace()) && kind.namespaced() {
        return Err(error(format!("invalid name {:?} or namespace {:?}", meta.name, meta.namespace)));
    }
    object.metadata_mut().resource_version = mod_revision.to_string();
    Ok(object)
}

fn namespace_or_default(namespace: &str) -> &str {
    if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    }
}

/// An RFC 3339 timestamp in seconds, as Kubernetes writes them.
pub fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Parses a timestamp written by [`timestamp`] (or by Kubernetes).
pub fn parse_timestamp(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

/// A fresh object UID, formatted like a UUID v4.
pub fn new_uid() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// The five-character suffix Kubernetes appends to generated names (`web-7x2kq`).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char).collect()
}
