//! What the agent measures, for its metrics endpoint (`capstan agent
//! --listen-metrics-urls`): the pods bound to its node by phase (as the store has them),
//! and the round trip of each node-lease renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use capstan_proto::objects::PodPhase;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug)]
pub struct AgentMetrics {
    pods: Family<[(&'static str, &'static str); 1], Gauge>,
    pub heartbeat_seconds: Histogram,
    pub heartbeat_failures: Counter,
    /// Each of the node's pods' phase, by pod key.
    phases: Arc<Mutex<HashMap<String, PodPhase>>>,
}

impl Default for AgentMetrics {
    fn default() -> AgentMetrics {
        AgentMetrics {
            pods: Family::default(),
            heartbeat_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            heartbeat_failures: Counter::default(),
            phases: Arc::default(),
        }
    }
}

impl AgentMetrics {
    /// Registers every family under `registry` (named `capstan_agent_*` by the caller).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("pods", "Pods bound to this node, by phase", self.pods.clone());
        registry.register_with_unit(
            "heartbeat_duration",
            "One node-lease renewal",
            Unit::Seconds,
            self.heartbeat_seconds.clone(),
        );
        registry.register("heartbeat_failures", "Node-lease renewals that failed", self.heartbeat_failures.clone());
    }

    /// Forgets every pod not in `present` (the pods a relist found).
    pub(crate) fn keep_only(&self, present: &std::collections::HashSet<String>) {
        let gone: Vec<String> = {
            let phases = self.phases.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            phases.keys().filter(|key| !present.contains(*key)).cloned().collect()
        };
        for key in gone {
            self.pod_phase(&key, None);
        }
    }

    /// Records a pod's phase (`None`: it is no longer bound to this node).
    pub(crate) fn pod_phase(&self, key: &str, phase: Option<PodPhase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = match phase {
            Some(phase) => phases.insert(key.to_string(), phase),
            None => phases.remove(key),
        };
        if before == phase {
            return;
        }
        if let Some(before) = before {
            self.pods.get_or_create(&[("phase", before.name())]).dec();
        }
        if let Some(phase) = phase {
            self.pods.get_or_create(&[("phase", phase.name())]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_counted_by_their_latest_phase() {
        let metrics = AgentMetrics::default();
        let count = |phase: PodPhase| metrics.pods.get_or_create(&[("phase", phase.name())]).get();
        metrics.pod_phase("a", Some(PodPhase::Pending));
        metrics.pod_phase("b", Some(PodPhase::Running));
        metrics.pod_phase("a", Some(PodPhase::Running));
        metrics.pod_phase("a", Some(PodPhase::Running));
        assert_eq!((count(PodPhase::Pending), count(PodPhase::Running)), (0, 2));
        metrics.pod_phase("b", None);
        metrics.pod_phase("b", None);
        assert_eq!(count(PodPhase::Running), 1);
        // A relist that no longer finds a pod forgets it.
        metrics.pod_phase("c", Some(PodPhase::Succeeded));
        metrics.keep_only(&["a".to_string()].into_iter().collect());
        assert_eq!((count(PodPhase::Running), count(PodPhase::Succeeded)), (1, 0));
    }
}
