//! The dashboard's copy of `/registry/`: every object decoded once and kept current from
//! the store's event channel (a watch cache, as the Kubernetes API server keeps one), so a
//! page of a 50k-pod list costs a filter over memory rather than a decode of the prefix.
//!
//! It starts with the dashboard's first read, from a list at the store's revision, then
//! applies each applied revision in order. Revisions are dense (each one writes), so a gap
//! (a snapshot installed under it) or a lag on the channel is noticed, and it lists again.
//! A read waits until the copy holds every revision the read's barrier covers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use capstan_proto::etcdserverpb as pb;
use capstan_proto::mvccpb;
use capstan_proto::objects::{self, Kind, Object, NODE_LEASE_PREFIX, REGISTRY_PREFIX};

use super::super::Plane;

/// How long a failed list waits before the next try.
const RELIST_BACKOFF: Duration = Duration::from_secs(1);

/// The objects under `/registry/` as of `revision`.
#[derive(Default)]
pub struct Objects {
    pub revision: i64,
    /// Every value that decodes as an object, by key (values other clients wrote may not).
    objects: BTreeMap<Vec<u8>, Object>,
    /// The lease ID of each node's lease key (kept by its agent).
    pub node_leases: BTreeMap<String, i64>,
}

impl Objects {
    fn apply(&mut self, kv: &mvccpb::KeyValue, deleted: bool) {
        if let Some(node) = kv.key.strip_prefix(NODE_LEASE_PREFIX.as_bytes()) {
            let node = String::from_utf8_lossy(node).into_owned();
            match deleted {
                true => self.node_leases.remove(&node),
                false => self.node_leases.insert(node, kv.lease),
            };
            return;
        }
        let decoded = (!deleted).then(|| objects::decode_stored(&kv.key, &kv.value, kv.mod_revision).ok()).flatten();
        match decoded {
            Some(object) => self.objects.insert(kv.key.clone(), object),
            None => self.objects.remove(&kv.key),
        };
    }

    /// The objects of one kind (in one namespace, when it is not empty) with their keys,
    /// in key order.
    pub fn of_kind(&self, kind: Kind, namespace: &str) -> impl Iterator<Item = (&[u8], &Object)> {
        let prefix = match namespace {
            "" => kind.prefix(),
            namespace => kind.namespace_prefix(namespace),
        };
        let start = prefix.clone().into_bytes();
        let listed = self.objects.range(start..).take_while(move |(key, _)| key.starts_with(prefix.as_bytes()));
        listed.map(|(key, object)| (key.as_slice(), object))
    }

    pub fn get(&self, key: &str) -> Option<&Object> {
        self.objects.get(key.as_bytes())
    }
}

#[derive(Default)]
pub struct ObjectCache {
    objects: RwLock<Objects>,
    /// The revision `objects` holds, for readers to wait on.
    revision: tokio::sync::watch::Sender<i64>,
    started: AtomicBool,
}

impl ObjectCache {
    /// Runs `view` over the objects once they hold `revision` or a later one; `None` when
    /// they do not within `timeout`. The first call starts following the store.
    pub async fn read<R>(
        self: &Arc<Self>,
        plane: &Arc<Plane>,
        revision: i64,
        timeout: Duration,
        view: impl FnOnce(&Objects) -> R,
    ) -> Option<R> {
        if !self.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(follow(self.clone(), plane.clone()));
        }
        let mut held = self.revision.subscribe();
        tokio::time::timeout(timeout, held.wait_for(|held| *held >= revision)).await.ok()?.ok()?;
        let objects = self.objects.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(view(&objects))
    }

    fn replace(&self, objects: Objects) {
        let revision = objects.revision;
        *self.objects.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = objects;
        self.revision.send_replace(revision);
    }

    /// Applies the events of the revision after the one held; false on a gap.
    fn advance(&self, revision: i64, events: &[mvccpb::Event]) -> bool {
        let mut objects = self.objects.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if revision <= objects.revision {
            return true;
        }
        if revision != objects.revision + 1 {
            return false;
        }
        for event in events {
            if let Some(kv) = event.kv.as_ref().filter(|kv| kv.key.starts_with(REGISTRY_PREFIX.as_bytes())) {
                objects.apply(kv, event.r#type == mvccpb::event::EventType::Delete as i32);
            }
        }
        objects.revision = revision;
        drop(objects);
        self.revision.send_replace(revision);
        true
    }
}

/// Lists, then follows the event channel until a gap or a lag, then lists again; until the
/// plane stops.
async fn follow(cache: Arc<ObjectCache>, plane: Arc<Plane>) {
    let stopping = plane.stopping();
    tokio::pin!(stopping);
    loop {
        // Subscribed before the list, so no revision after it is missed.
        let mut live = plane.events.subscribe();
        match list(&plane).await {
            Ok(objects) => cache.replace(objects),
            Err(error) => {
                tracing::warn!(%error, "the dashboard cannot list the store; trying again");
                tokio::select! {
                    () = tokio::time::sleep(RELIST_BACKOFF) => continue,
                    () = &mut stopping => return,
                }
            }
        }
        loop {
            let batch = tokio::select! {
                batch = live.recv() => batch,
                () = &mut stopping => return,
            };
            match batch {
                Ok(batch) if cache.advance(batch.revision, &batch.events) => {}
                Ok(_) | Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return,
            }
        }
    }
}

async fn list(plane: &Plane) -> Result<Objects, String> {
    let request = pb::RangeRequest {
        key: REGISTRY_PREFIX.as_bytes().to_vec(),
        range_end: capstan_client::prefix_end(REGISTRY_PREFIX.as_bytes()),
        serializable: true,
        ..Default::default()
    };
    let store = plane.store.clone();
    let listed = tokio::task::spawn_blocking(move || store.range(&request))
        .await
        .map_err(|join| join.to_string())?
        .map_err(|error| error.to_string())?;
    let mut objects =
        Objects { revision: listed.header.as_ref().map_or(0, |header| header.revision), ..Default::default() };
    for kv in &listed.kvs {
        objects.apply(kv, false);
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::objects::Node;

    fn put(object: &Object, revision: i64) -> mvccpb::Event {
        let kv = mvccpb::KeyValue {
            key: object.key().into_bytes(),
            value: object.encode(),
            mod_revision: revision,
            ..Default::default()
        };
        mvccpb::Event { r#type: mvccpb::event::EventType::Put as i32, kv: Some(kv), prev_kv: None }
    }

    fn names(cache: &ObjectCache) -> Vec<String> {
        let objects = cache.objects.read().unwrap();
        objects.of_kind(Kind::Node, "").map(|(_, object)| object.metadata().name.clone()).collect()
    }

    #[test]
    fn revisions_apply_in_order_and_a_gap_is_refused() {
        let cache = ObjectCache::default();
        cache.replace(Objects { revision: 5, ..Default::default() });
        let node = |name: &str| Object::Node(Node::ready(name, "1", "1Gi", "10"));
        assert!(cache.advance(6, &[put(&node("a"), 6)]));
        assert!(cache.advance(6, &[put(&node("stale"), 6)]), "a revision already held is skipped");
        assert!(!cache.advance(8, &[put(&node("c"), 8)]), "revision 7 is missing");
        assert_eq!(names(&cache), ["a"]);
        let lease =
            mvccpb::KeyValue { key: format!("{NODE_LEASE_PREFIX}a").into_bytes(), lease: 42, ..Default::default() };
        let lease = mvccpb::Event { kv: Some(lease), ..Default::default() };
        let delete = mvccpb::Event {
            r#type: mvccpb::event::EventType::Delete as i32,
            kv: Some(mvccpb::KeyValue { key: node("a").key().into_bytes(), ..Default::default() }),
            prev_kv: None,
        };
        assert!(cache.advance(7, &[put(&node("b"), 7), lease]));
        assert_eq!(cache.objects.read().unwrap().node_leases.get("a"), Some(&42));
        assert!(cache.advance(8, &[delete]));
        assert_eq!(names(&cache), ["b"]);
        assert_eq!(*cache.revision.borrow(), 8);
    }
}
