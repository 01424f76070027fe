//! The informer's cache: every node, pod, ReplicaSet and node lease, as of one store
//! revision, with each node's requested resources kept up to date as pods come, go and
//! get bound, so a filter is a few comparisons and never a scan of pods.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use capstan_proto::objects::{
    decode_stored, DecodeError, Kind, Node, Object, Pod, ReplicaSet, Requests, NODE_LEASE_PREFIX, RESOURCE_CPU,
    RESOURCE_MEMORY, RESOURCE_PODS,
};

/// What the pods bound to one node hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub requested: Requests,
    pub pods: i64,
    /// (protocol, host port) → pods using it.
    pub host_ports: HashMap<(String, i32), u32>,
    /// Controller (ReplicaSet) UID → its pods here, for spreading.
    pub owners: HashMap<String, u32>,
}

impl Usage {
    fn add(&mut self, pod: &Pod, sign: i64) {
        let requests = pod.requests();
        self.requested.cpu_millis = self.requested.cpu_millis.saturating_add(sign * requests.cpu_millis);
        self.requested.memory_bytes = self.requested.memory_bytes.saturating_add(sign * requests.memory_bytes);
        self.pods += sign;
        let count = |map_count: &mut u32| {
            *map_count = if sign > 0 { *map_count + 1 } else { map_count.saturating_sub(1) };
            *map_count
        };
        for (protocol, port) in pod.host_ports() {
            let key = (protocol.to_string(), port);
            if count(self.host_ports.entry(key.clone()).or_default()) == 0 {
                self.host_ports.remove(&key);
            }
        }
        if let Some(owner) = pod.controller() {
            if count(self.owners.entry(owner.uid.clone()).or_default()) == 0 {
                self.owners.remove(&owner.uid);
            }
        }
    }
}

/// A node with what the filters read of it computed once per change.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub node: Node,
    pub ready: bool,
    pub allocatable: Requests,
    pub allocatable_pods: i64,
    pub usage: Usage,
}

impl NodeInfo {
    pub fn new(node: Node, usage: Usage) -> Self {
        let amount = |resource: &str, milli: bool| {
            node.allocatable(resource)
                .map(|q| if milli { q.milli_value() } else { q.value() })
                .and_then(Result::ok)
                .unwrap_or(0)
        };
        Self {
            ready: node.is_ready(),
            allocatable: Requests {
                cpu_millis: amount(RESOURCE_CPU, true),
                memory_bytes: amount(RESOURCE_MEMORY, false),
            },
            allocatable_pods: amount(RESOURCE_PODS, false),
            usage,
            node,
        }
    }
}

/// What one event changed, for the loop to react to.
#[derive(Debug)]
pub enum Change {
    Node { name: String },
    Pod { key: String, old: Option<Box<Pod>>, new: Option<Box<Pod>> },
    ReplicaSet { key: String },
    NodeLease { name: String, present: bool },
    None,
}

#[derive(Default)]
pub struct Cache {
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Usage of pods bound to nodes the cache does not have (yet).
    unknown_node_usage: HashMap<String, Usage>,
    pub pods: BTreeMap<String, Pod>,
    pub replica_sets: BTreeMap<String, ReplicaSet>,
    /// Nodes whose lease key exists.
    pub node_leases: BTreeSet<String>,
    /// Pod keys by the node they are bound to (finished pods included).
    pub pods_by_node: HashMap<String, BTreeSet<String>>,
    /// Pod keys by their controller's UID.
    pub pods_by_owner: HashMap<String, BTreeSet<String>>,
    /// ReplicaSet keys by UID.
    pub replica_set_by_uid: HashMap<String, String>,
    /// The newest revision applied.
    pub revision: i64,
    /// Keys this scheduler deleted, at the delete's revision, until the watch passes it:
    /// older events of those keys are stale.
    tombstones: HashMap<String, i64>,
}

impl Cache {
    /// Builds a cache from a list of everything under `/registry/`.
    pub fn from_objects(objects: Vec<Object>, node_leases: BTreeSet<String>, revision: i64) -> Self {
        let mut cache = Cache { node_leases, revision, ..Default::default() };
        for object in objects {
            cache.upsert(object);
        }
        cache
    }

    /// Applies a put event. A value that does not decode removes what the cache had at
    /// that key (it is no longer an object) and is returned as the error.
    pub fn apply_put(&mut self, key: &[u8], value: &[u8], mod_revision: i64) -> Result<Change, DecodeError> {
        self.advance(mod_revision);
        if let Some(name) = key.strip_prefix(NODE_LEASE_PREFIX.as_bytes()) {
            let name = String::from_utf8_lossy(name).into_owned();
            self.node_leases.insert(name.clone());
            return Ok(Change::NodeLease { name, present: true });
        }
        if Kind::of_key(key).is_none() || self.is_stale(key, mod_revision) {
            return Ok(Change::None);
        }
        match decode_stored(key, value, mod_revision) {
            Ok(object) => Ok(self.upsert(object)),
            Err(e) => {
                self.remove(&String::from_utf8_lossy(key));
                Err(e)
            }
        }
    }

    /// Applies a delete event.
    pub fn apply_delete(&mut self, key: &[u8], revision: i64) -> Change {
        self.advance(revision);
        let text = String::from_utf8_lossy(key).into_owned();
        if let Some(name) = text.strip_prefix(NODE_LEASE_PREFIX) {
            self.node_leases.remove(name);
            return Change::NodeLease { name: name.to_string(), present: false };
        }
        if self.is_stale(key, revision) {
            return Change::None;
        }
        self.remove(&text)
    }

    /// The watch reached `revision`: tombstones at or below it have served.
    fn advance(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
        let seen = self.revision;
        self.tombstones.retain(|_, deleted| *deleted > seen);
    }

    /// Whether the cache already holds a newer version of `key` than an event at
    /// `revision`, or an event no newer (the scheduler's own write, put into the cache
    /// before its event came), or the scheduler deleted the key after it.
    fn is_stale(&self, key: &[u8], revision: i64) -> bool {
        let text = String::from_utf8_lossy(key);
        if self.tombstones.get(text.as_ref()).is_some_and(|deleted| *deleted >= revision) {
            return true;
        }
        let cached = match Kind::of_key(key) {
            Some(Kind::Node) => self.nodes.get(&text[Kind::Node.prefix().len()..]).map(|info| &info.node.metadata),
            Some(Kind::Pod) => self.pods.get(text.as_ref()).map(|pod| &pod.metadata),
            Some(Kind::ReplicaSet) => self.replica_sets.get(text.as_ref()).map(|rs| &rs.metadata),
            None => None,
        };
        cached.is_some_and(|meta| meta.resource_version.parse::<i64>().unwrap_or(0) >= revision)
    }

    /// Drops an object this scheduler deleted at `revision`.
    pub fn remove_at(&mut self, key: &str, revision: i64) -> Change {
        if revision > self.revision {
            self.tombstones.insert(key.to_string(), revision);
        }
        self.remove(key)
    }

    /// Drops the object at `key` (deleted in the store, or by this scheduler).
    pub fn remove(&mut self, text: &str) -> Change {
        let key = text.as_bytes();
        let text = text.to_string();
        match Kind::of_key(key) {
            Some(Kind::Node) => {
                let name = text[Kind::Node.prefix().len()..].to_string();
                if let Some(info) = self.nodes.remove(&name) {
                    self.unknown_node_usage.insert(name.clone(), info.usage);
                }
                Change::Node { name }
            }
            Some(Kind::Pod) => {
                let old = self.pods.remove(&text);
                if let Some(old) = &old {
                    self.account(old, -1);
                    self.index(&text, old, false);
                }
                Change::Pod { key: text, old: old.map(Box::new), new: None }
            }
            Some(Kind::ReplicaSet) => {
                if let Some(old) = self.replica_sets.remove(&text) {
                    self.replica_set_by_uid.remove(&old.metadata.uid);
                }
                Change::ReplicaSet { key: text }
            }
            None => Change::None,
        }
    }

    /// Stores an object (from the store, or written by this scheduler).
    pub fn upsert(&mut self, object: Object) -> Change {
        let key = object.key();
        match object {
            Object::Node(node) => {
                let name = node.metadata.name.clone();
                let usage = match self.nodes.remove(&name) {
                    Some(info) => info.usage,
                    None => self.unknown_node_usage.remove(&name).unwrap_or_default(),
                };
                self.nodes.insert(name.clone(), NodeInfo::new(node, usage));
                Change::Node { name }
            }
            Object::Pod(pod) => {
                let old = self.pods.insert(key.clone(), pod.clone());
                if let Some(old) = &old {
                    self.account(old, -1);
                    self.index(&key, old, false);
                }
                self.account(&pod, 1);
                self.index(&key, &pod, true);
                Change::Pod { key, old: old.map(Box::new), new: Some(Box::new(pod)) }
            }
            Object::ReplicaSet(rs) => {
                let uid = rs.metadata.uid.clone();
                if let Some(old) = self.replica_sets.insert(key.clone(), rs) {
                    if old.metadata.uid != uid && self.replica_set_by_uid.get(&old.metadata.uid) == Some(&key) {
                        self.replica_set_by_uid.remove(&old.metadata.uid);
                    }
                }
                self.replica_set_by_uid.insert(uid, key.clone());
                Change::ReplicaSet { key }
            }
        }
    }

    /// Adds a pod to (or removes it from) the by-node and by-owner indexes.
    fn index(&mut self, key: &str, pod: &Pod, add: bool) {
        let update = |map: &mut HashMap<String, BTreeSet<String>>, group: &str| {
            if add {
                map.entry(group.to_string()).or_default().insert(key.to_string());
            } else if let Some(keys) = map.get_mut(group) {
                keys.remove(key);
                if keys.is_empty() {
                    map.remove(group);
                }
            }
        };
        if !pod.spec.node_name.is_empty() {
            update(&mut self.pods_by_node, &pod.spec.node_name);
        }
        if let Some(owner) = pod.controller() {
            update(&mut self.pods_by_owner, &owner.uid);
        }
    }

    /// The pods a ReplicaSet controls, by its UID.
    pub fn pods_of_owner<'a>(&'a self, uid: &str) -> impl Iterator<Item = (&'a String, &'a Pod)> + 'a {
        self.pods_by_owner.get(uid).into_iter().flatten().filter_map(|key| self.pods.get_key_value(key))
    }

    /// The pods bound to a node.
    pub fn pods_on_node<'a>(&'a self, node: &str) -> impl Iterator<Item = (&'a String, &'a Pod)> + 'a {
        self.pods_by_node.get(node).into_iter().flatten().filter_map(|key| self.pods.get_key_value(key))
    }

    /// Adds (+1) or removes (-1) what a pod holds on its node.
    fn account(&mut self, pod: &Pod, sign: i64) {
        if !pod.holds_resources() {
            return;
        }
        let node = &pod.spec.node_name;
        match self.nodes.get_mut(node) {
            Some(info) => info.usage.add(pod, sign),
            None => self.unknown_node_usage.entry(node.clone()).or_default().add(pod, sign),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::tests::{node, pod};

    #[test]
    fn usage_follows_binds_and_deletes() {
        let mut cache = Cache::default();
        let mut p = pod("1", "1Gi");
        p.spec.node_name = "n1".into();
        cache.upsert(Object::Pod(p.clone()));
        assert_eq!(cache.unknown_node_usage["n1"].pods, 1, "a pod may be bound before its node is seen");
        cache.upsert(Object::Node(node("n1", "4", "8Gi", 10).node));
        assert_eq!(cache.nodes["n1"].usage.requested, Requests { cpu_millis: 1000, memory_bytes: 1 << 30 });
        let mut done = p.clone();
        done.status.phase = capstan_proto::objects::PodPhase::Succeeded;
        cache.upsert(Object::Pod(done));
        assert_eq!(cache.nodes["n1"].usage, Usage::default(), "a finished pod holds nothing");
        cache.upsert(Object::Pod(p.clone()));
        let key = Object::Pod(p).key();
        cache.apply_delete(key.as_bytes(), 9);
        assert_eq!(cache.nodes["n1"].usage, Usage::default());
        assert_eq!(cache.revision, 9);
    }

    #[test]
    fn the_schedulers_own_writes_are_not_undone_by_older_events() {
        let mut cache = Cache::default();
        let mut p = pod("1", "1Gi");
        p.metadata.resource_version = "5".into();
        let key = Object::Pod(p.clone()).key();
        let encoded = Object::Pod(p.clone()).encode();
        cache.upsert(Object::Pod(p));
        assert!(matches!(cache.apply_put(key.as_bytes(), &encoded, 4), Ok(Change::None)), "an older version");
        assert!(matches!(cache.apply_put(key.as_bytes(), &encoded, 5), Ok(Change::None)), "our own write's echo");
        cache.remove_at(&key, 7);
        assert!(matches!(cache.apply_put(key.as_bytes(), &encoded, 6), Ok(Change::None)), "a put before our delete");
        assert!(!cache.pods.contains_key(&key));
        cache.apply_put(b"/registry/leases/nodes/x", b"", 8).unwrap();
        cache.apply_put(key.as_bytes(), &encoded, 9).unwrap();
        assert!(cache.pods.contains_key(&key), "a put after the delete is new");
    }

    #[test]
    fn undecodable_values_are_errors_and_leave_the_cache() {
        let mut cache = Cache::default();
        let n = Object::Node(node("n1", "4", "8Gi", 10).node);
        cache.apply_put(n.key().as_bytes(), &n.encode(), 3).unwrap();
        assert!(cache.nodes.contains_key("n1"));
        let error = cache.apply_put(n.key().as_bytes(), b"{not json", 4).unwrap_err();
        assert!(error.to_string().starts_with("/registry/nodes/n1: cannot decode: not a Node"), "{error}");
        assert!(cache.nodes.is_empty());
        assert!(matches!(
            cache.apply_put(b"/registry/leases/nodes/n1", b"", 5),
            Ok(Change::NodeLease { present: true, .. })
        ));
        assert!(cache.node_leases.contains("n1"));
    }
}
