//! Checks an object before it is stored, and names the field of every problem:
//! `spec.containers[0].resources.requests.cpu: invalid quantity "2x"`. Errors refuse the
//! object; warnings (a resource Capstan does not account for) are shown and the object
//! is stored.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use super::*;

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub errors: Vec<FieldError>,
    pub warnings: Vec<FieldError>,
}

/// Resources the scheduler accounts for in a container's requests and limits.
const CONTAINER_RESOURCES: [&str; 2] = [RESOURCE_CPU, RESOURCE_MEMORY];
/// Kubernetes' limit on names that are DNS subdomains, and on labels (DNS labels).
const SUBDOMAIN_BYTES_MAX: usize = 253;
const LABEL_BYTES_MAX: usize = 63;

/// Checks an object of any kind.
pub fn validate(object: &Object) -> Report {
    let mut check = Checker::default();
    check.meta(object.metadata(), object.kind().namespaced());
    match object {
        Object::Node(node) => check.node(node),
        Object::Pod(pod) => check.pod_spec("spec", &pod.spec),
        Object::ReplicaSet(rs) => check.replica_set(rs),
    }
    check.report
}

#[derive(Default)]
struct Checker {
    report: Report,
}

impl Checker {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.report.errors.push(FieldError { path: path.into(), message: message.into() });
    }

    fn warning(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.report.warnings.push(FieldError { path: path.into(), message: message.into() });
    }

    fn meta(&mut self, meta: &ObjectMeta, namespaced: bool) {
        if meta.name.is_empty() {
            self.error("metadata.name", "required value");
        } else if !is_subdomain(&meta.name) {
            self.error("metadata.name", format!("invalid value {:?}: {SUBDOMAIN_RULE}", meta.name));
        }
        if !namespaced && !meta.namespace.is_empty() {
            self.error("metadata.namespace", "not allowed: nodes are not in a namespace");
        } else if !meta.namespace.is_empty() && !is_dns_label(&meta.namespace) {
            self.error("metadata.namespace", format!("invalid value {:?}: {LABEL_RULE}", meta.namespace));
        }
        self.labels("metadata.labels", &meta.labels);
        if !meta.uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || meta.uid.len() > 64 {
            self.error("metadata.uid", format!("invalid value {:?}: letters, digits and '-' only", meta.uid));
        }
    }

    fn labels(&mut self, path: &str, labels: &BTreeMap<String, String>) {
        for (key, value) in labels {
            if !is_label_key(key) {
                self.error(format!("{path}.{key}"), format!("invalid label key {key:?}: {LABEL_KEY_RULE}"));
            }
            if !is_label_value(value) {
                self.error(format!("{path}.{key}"), format!("invalid label value {value:?}: {LABEL_VALUE_RULE}"));
            }
        }
    }

    fn quantity(&mut self, path: &str, quantity: &Quantity) -> Option<i64> {
        match quantity.milli_value() {
            Ok(milli) => Some(milli),
            Err(e) => {
                self.error(path, e.to_string());
                None
            }
        }
    }

    fn node(&mut self, node: &Node) {
        for (field, amounts) in
            [("status.capacity", &node.status.capacity), ("status.allocatable", &node.status.allocatable)]
        {
            for (resource, quantity) in amounts {
                let path = format!("{field}.{resource}");
                self.quantity(&path, quantity);
                if ![RESOURCE_CPU, RESOURCE_MEMORY, RESOURCE_PODS].contains(&resource.as_str()) {
                    self.warning(path, "not accounted for by Capstan's scheduler (it counts cpu, memory and pods)");
                }
            }
        }
        for (i, taint) in node.spec.taints.iter().enumerate() {
            if !is_label_key(&taint.key) {
                self.error(format!("spec.taints[{i}].key"), format!("invalid value {:?}: {LABEL_KEY_RULE}", taint.key));
            }
        }
    }

    fn pod_spec(&mut self, path: &str, spec: &PodSpec) {
        if spec.containers.is_empty() {
            self.error(format!("{path}.containers"), "required value: a pod runs at least one container");
        }
        let mut names = HashSet::new();
        for (i, container) in spec.containers.iter().enumerate() {
            let path = format!("{path}.containers[{i}]");
            if container.name.is_empty() {
                self.error(format!("{path}.name"), "required value");
            } else if !is_dns_label(&container.name) {
                self.error(format!("{path}.name"), format!("invalid value {:?}: {LABEL_RULE}", container.name));
            } else if !names.insert(container.name.as_str()) {
                self.error(format!("{path}.name"), format!("duplicate value {:?}", container.name));
            }
            if container.command.is_empty() {
                self.error(
                    format!("{path}.command"),
                    "required value: Capstan runs a container's command as a process",
                );
            }
            self.container_resources(&path, &container.resources);
            for (j, env) in container.env.iter().enumerate() {
                if env.name.is_empty() || env.name.contains('=') || env.name.contains('\0') {
                    self.error(
                        format!("{path}.env[{j}].name"),
                        format!("invalid value {:?}: must be non-empty and contain no '='", env.name),
                    );
                }
            }
            for (j, port) in container.ports.iter().enumerate() {
                let path = format!("{path}.ports[{j}]");
                if !(1..=65535).contains(&port.container_port) {
                    self.error(
                        format!("{path}.containerPort"),
                        format!("invalid value {}: must be between 1 and 65535", port.container_port),
                    );
                }
                if let Some(host_port) = port.host_port.filter(|p| !(0..=65535).contains(p)) {
                    self.error(
                        format!("{path}.hostPort"),
                        format!("invalid value {host_port}: must be between 0 and 65535"),
                    );
                }
                if !["TCP", "UDP", "SCTP"].contains(&port.protocol.as_str()) {
                    self.error(
                        format!("{path}.protocol"),
                        format!("unsupported value {:?}: supported values: \"TCP\", \"UDP\", \"SCTP\"", port.protocol),
                    );
                }
            }
        }
        if !spec.node_name.is_empty() && !is_subdomain(&spec.node_name) {
            self.error(format!("{path}.nodeName"), format!("invalid value {:?}: {SUBDOMAIN_RULE}", spec.node_name));
        }
        self.labels(&format!("{path}.nodeSelector"), &spec.node_selector);
        for (i, toleration) in spec.tolerations.iter().enumerate() {
            let path = format!("{path}.tolerations[{i}]");
            match toleration.operator {
                TolerationOperator::Exists if !toleration.value.is_empty() => {
                    self.error(format!("{path}.value"), "must be empty when operator is Exists")
                }
                TolerationOperator::Equal if toleration.key.is_empty() => {
                    self.error(format!("{path}.operator"), "must be Exists when key is empty")
                }
                _ => {}
            }
        }
        if let Some(seconds) = spec.termination_grace_period_seconds.filter(|s| *s < 0) {
            self.error(
                format!("{path}.terminationGracePeriodSeconds"),
                format!("invalid value {seconds}: must be non-negative"),
            );
        }
    }

    fn container_resources(&mut self, path: &str, resources: &ResourceRequirements) {
        let mut amounts = [BTreeMap::new(), BTreeMap::new()];
        for (i, (field, map)) in
            [("requests", &resources.requests), ("limits", &resources.limits)].into_iter().enumerate()
        {
            for (resource, quantity) in map {
                let path = format!("{path}.resources.{field}.{resource}");
                if let Some(milli) = self.quantity(&path, quantity) {
                    amounts[i].insert(resource.as_str(), milli);
                }
                if !CONTAINER_RESOURCES.contains(&resource.as_str()) {
                    self.warning(path, "not accounted for by Capstan's scheduler (it counts cpu and memory)");
                }
            }
        }
        let [requests, limits] = amounts;
        for (resource, request) in &requests {
            if limits.get(resource).is_some_and(|limit| request > limit) {
                self.error(
                    format!("{path}.resources.requests.{resource}"),
                    format!(
                        "invalid value {:?}: must be less than or equal to the {resource} limit",
                        resources.requests[*resource].0
                    ),
                );
            }
        }
    }

    fn replica_set(&mut self, rs: &ReplicaSet) {
        if rs.spec.replicas < 0 {
            self.error("spec.replicas", format!("invalid value {}: must be non-negative", rs.spec.replicas));
        }
        let selector = &rs.spec.selector;
        if selector.match_labels.is_empty() && selector.match_expressions.is_empty() {
            self.error("spec.selector", "required value: a ReplicaSet selects its pods by label");
        } else if !selector.matches(&rs.spec.template.metadata.labels) {
            self.error(
                "spec.template.metadata.labels",
                format!("invalid value: `selector` ({}) does not match template `labels`", selector.to_text()),
            );
        }
        for (i, term) in selector.match_expressions.iter().enumerate() {
            let needs_values = matches!(term.operator, SelectorOperator::In | SelectorOperator::NotIn);
            if needs_values == term.values.is_empty() {
                let rule = if needs_values {
                    "required for In and NotIn"
                } else {
                    "must be empty for Exists and DoesNotExist"
                };
                self.error(format!("spec.selector.matchExpressions[{i}].values"), rule);
            }
        }
        self.labels("spec.template.metadata.labels", &rs.spec.template.metadata.labels);
        self.pod_spec("spec.template.spec", &rs.spec.template.spec);
        if rs.spec.template.spec.restart_policy != RestartPolicy::Always {
            self.error("spec.template.spec.restartPolicy", "unsupported value: a ReplicaSet's pods restart Always");
        }
        if !rs.spec.template.spec.node_name.is_empty() {
            self.warning("spec.template.spec.nodeName", "every replica is bound to this one node");
        }
    }
}

const SUBDOMAIN_RULE: &str =
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const LABEL_RULE: &str =
    "a lowercase RFC 1123 label must consist of at most 63 lower case alphanumeric characters or '-', and must start and end with an alphanumeric character";
const LABEL_KEY_RULE: &str = "a label key is an optional DNS subdomain prefix and '/', then a name of at most 63 alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character";
const LABEL_VALUE_RULE: &str =
    "a label value is empty or at most 63 alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character";

pub(crate) fn is_dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= LABEL_BYTES_MAX
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

pub(crate) fn is_subdomain(text: &str) -> bool {
    text.len() <= SUBDOMAIN_BYTES_MAX && text.split('.').all(is_dns_label)
}

fn is_label_name(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= LABEL_BYTES_MAX
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_name(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: PodSpec) -> Object {
        Object::Pod(Pod {
            metadata: ObjectMeta { name: "web".into(), ..Default::default() },
            spec,
            ..Default::default()
        })
    }

    fn container() -> Container {
        Container { name: "main".into(), command: vec!["sleep".into(), "60".into()], ..Default::default() }
    }

    fn messages(object: &Object) -> Vec<String> {
        validate(object).errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_plain_pod_is_valid() {
        assert_eq!(validate(&pod(PodSpec { containers: vec![container()], ..Default::default() })), Report::default());
    }

    #[test]
    fn errors_name_the_field() {
        let mut bad = container();
        bad.resources.requests.insert("cpu".into(), Quantity::new("2x"));
        bad.resources.requests.insert("memory".into(), Quantity::new("2Gi"));
        bad.resources.limits.insert("memory".into(), Quantity::new("1Gi"));
        bad.resources.requests.insert("nvidia.com/gpu".into(), Quantity::new("1"));
        let mut nameless = container();
        nameless.name.clear();
        nameless.command.clear();
        let object = pod(PodSpec { containers: vec![bad, nameless], ..Default::default() });
        assert_eq!(
            messages(&object),
            vec![
                "spec.containers[0].resources.requests.cpu: invalid quantity \"2x\"",
                "spec.containers[0].resources.requests.memory: invalid value \"2Gi\": must be less than or equal to the memory limit",
                "spec.containers[1].name: required value",
                "spec.containers[1].command: required value: Capstan runs a container's command as a process",
            ]
        );
        let warnings = validate(&object).warnings;
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].path, "spec.containers[0].resources.requests.nvidia.com/gpu");
    }

    #[test]
    fn names_must_be_dns_names() {
        let mut object = pod(PodSpec { containers: vec![container()], ..Default::default() });
        object.metadata_mut().name = "Web_1".into();
        object.metadata_mut().labels.insert("app".into(), "not ok!".into());
        let errors = messages(&object);
        assert!(errors[0].starts_with("metadata.name: invalid value \"Web_1\""), "{errors:?}");
        assert!(errors[1].starts_with("metadata.labels.app: invalid label value \"not ok!\""), "{errors:?}");
        assert!(is_label_key("kubernetes.io/hostname") && !is_label_key("/x") && !is_label_key("a/b/c"));
    }

    #[test]
    fn names_that_would_be_paths_are_refused_even_from_the_store() {
        // Regression: an agent makes directories and files from pod names and UIDs; a pod
        // written straight into the store by another client must not reach outside.
        let key = b"/registry/pods/default/x/../../evil";
        let value = br#"{"metadata":{"name":"x/../../evil","namespace":"default"},"spec":{}}"#;
        let error = decode_stored(key, value, 1).unwrap_err().to_string();
        assert!(error.contains("invalid name"), "{error}");
        let mut sneaky = pod(PodSpec { containers: vec![container()], ..Default::default() });
        sneaky.metadata_mut().uid = "../../x".into();
        assert!(messages(&sneaky)[0].starts_with("metadata.uid: invalid value"));
    }

    #[test]
    fn a_replica_set_selector_must_match_its_template() {
        let mut rs =
            ReplicaSet { metadata: ObjectMeta { name: "web".into(), ..Default::default() }, ..Default::default() };
        rs.spec.replicas = 2;
        rs.spec.selector.match_labels.insert("app".into(), "web".into());
        rs.spec.template.metadata.labels.insert("app".into(), "api".into());
        rs.spec.template.spec.containers.push(container());
        assert_eq!(
            messages(&Object::ReplicaSet(rs.clone())),
            vec!["spec.template.metadata.labels: invalid value: `selector` (app=web) does not match template `labels`"]
        );
        rs.spec.template.metadata.labels.insert("app".into(), "web".into());
        rs.spec.template.spec.restart_policy = RestartPolicy::Never;
        rs.spec.replicas = -1;
        assert_eq!(
            messages(&Object::ReplicaSet(rs)),
            vec![
                "spec.replicas: invalid value -1: must be non-negative",
                "spec.template.spec.restartPolicy: unsupported value: a ReplicaSet's pods restart Always",
            ]
        );
    }

    #[test]
    fn tolerations_and_ports_are_checked() {
        let mut c = container();
        c.ports.push(ContainerPort {
            container_port: 0,
            host_port: Some(70000),
            protocol: "HTTP".into(),
            ..Default::default()
        });
        let spec = PodSpec {
            containers: vec![c],
            tolerations: vec![Toleration {
                operator: TolerationOperator::Exists,
                value: "x".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            messages(&pod(spec)),
            vec![
                "spec.containers[0].ports[0].containerPort: invalid value 0: must be between 1 and 65535",
                "spec.containers[0].ports[0].hostPort: invalid value 70000: must be between 0 and 65535",
                "spec.containers[0].ports[0].protocol: unsupported value \"HTTP\": supported values: \"TCP\", \"UDP\", \"SCTP\"",
                "spec.tolerations[0].value: must be empty when operator is Exists",
            ]
        );
    }
}
