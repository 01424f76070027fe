//! A pod's events, read from its own history: each stored version of the pod compared
//! with the one before it says what happened (created, failed to schedule, scheduled,
//! started, restarted, finished, evicted), at which revision and, where the pod records
//! it, when. The history reaches back to the last compaction, as Kubernetes' events
//! reach back an hour.

use serde::Serialize;

use capstan_proto::objects::{self, Pod, PodPhase};

#[derive(Serialize, Debug, PartialEq)]
pub struct PodEvent {
    pub revision: i64,
    /// Normal or Warning, as Kubernetes' event types.
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub reason: String,
    pub message: String,
    /// When the pod says it happened; empty when it does not record it.
    pub time: String,
}

fn event(revision: i64, warning: bool, reason: &str, message: String, time: &str) -> PodEvent {
    let type_ = if warning { "Warning" } else { "Normal" };
    PodEvent { revision, type_, reason: reason.to_string(), message, time: time.to_string() }
}

fn restarts(pod: &Pod) -> i32 {
    pod.status.container_statuses.iter().map(|status| status.restart_count).sum()
}

fn unschedulable(pod: &Pod) -> Option<&objects::Condition> {
    objects::condition(&pod.status.conditions, objects::POD_SCHEDULED)
        .filter(|scheduled| scheduled.status == objects::CONDITION_FALSE)
}

/// The events of a pod whose kept versions are `versions` (revision, pod), oldest first;
/// `created` is the revision that created it.
pub fn pod_events(versions: &[(i64, Pod)], created: i64) -> Vec<PodEvent> {
    let mut events = Vec::new();
    let Some((first_revision, first)) = versions.first() else { return events };
    if *first_revision == created {
        let message = format!("created pod {}/{}", first.metadata.namespace, first.metadata.name);
        events.push(event(created, false, "Created", message, &first.metadata.creation_timestamp));
    } else {
        let message = format!("the pod's history before revision {first_revision} was compacted");
        events.push(event(*first_revision, false, "HistoryCompacted", message, ""));
    }
    let mut previous: Option<&Pod> = None;
    for (revision, pod) in versions {
        let revision = *revision;
        let before = previous.unwrap_or(pod);
        let first_seen = previous.is_none();
        if let Some(condition) = unschedulable(pod) {
            if first_seen || unschedulable(before).is_none_or(|old| old.message != condition.message) {
                let time = &condition.last_transition_time;
                events.push(event(revision, true, "FailedScheduling", condition.message.clone(), time));
            }
        }
        let node = &pod.spec.node_name;
        if !node.is_empty() && (first_seen || before.spec.node_name != *node) {
            let time = objects::condition(&pod.status.conditions, objects::POD_SCHEDULED)
                .map_or("", |scheduled| scheduled.last_transition_time.as_str());
            let message = format!("assigned {}/{} to {node}", pod.metadata.namespace, pod.metadata.name);
            events.push(event(revision, false, "Scheduled", message, time));
        }
        let phase = pod.status.phase;
        if !first_seen && before.status.phase != phase {
            let warning = matches!(phase, PodPhase::Failed | PodPhase::Unknown);
            let mut message = format!("phase {} -> {}", before.status.phase.name(), phase.name());
            if !pod.status.message.is_empty() {
                message = format!("{message}: {}", pod.status.message);
            }
            // The pod records when it started, not when it finished.
            let time = if phase == PodPhase::Running { pod.status.start_time.as_str() } else { "" };
            events.push(event(revision, warning, phase.name(), message, time));
        }
        if !first_seen && restarts(pod) > restarts(before) {
            let terminated = pod.status.container_statuses.iter().find_map(|status| status.state.terminated.as_ref());
            let why = terminated.map_or(String::new(), |terminated| match terminated.reason.as_str() {
                "" => format!(" (last exit code {})", terminated.exit_code),
                reason => format!(" (last exit code {}, {reason})", terminated.exit_code),
            });
            let message = format!("restarted its containers: {} restarts{why}", restarts(pod));
            events.push(event(revision, true, "Restarted", message, ""));
        }
        if !pod.status.reason.is_empty() && (first_seen || before.status.reason != pod.status.reason) {
            events.push(event(revision, true, &pod.status.reason, pod.status.message.clone(), ""));
        }
        previous = Some(pod);
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::objects::{Condition, ContainerStatus};

    fn pod() -> Pod {
        Pod::requesting("default", "web", &["sleep"], "100m", "64Mi")
    }

    fn reasons(events: &[PodEvent]) -> Vec<(i64, &str)> {
        events.iter().map(|event| (event.revision, event.reason.as_str())).collect()
    }

    #[test]
    fn a_pods_life_reads_as_events() {
        let created = pod();
        let mut waiting = created.clone();
        waiting.status.conditions.push(Condition {
            type_: objects::POD_SCHEDULED.into(),
            status: objects::CONDITION_FALSE.into(),
            reason: objects::REASON_UNSCHEDULABLE.into(),
            message: "0/2 nodes are available".into(),
            ..Default::default()
        });
        let mut bound = waiting.clone();
        bound.spec.node_name = "node-1".into();
        bound.status.conditions[0].status = objects::CONDITION_TRUE.into();
        let mut running = bound.clone();
        running.status.phase = PodPhase::Running;
        running.status.container_statuses.push(ContainerStatus { name: "main".into(), ..Default::default() });
        let mut restarted = running.clone();
        restarted.status.container_statuses[0].restart_count = 1;
        let mut lost = restarted.clone();
        lost.status.phase = PodPhase::Failed;
        lost.status.reason = "NodeLost".into();
        lost.status.message = "node-1 stopped reporting".into();
        let versions = vec![(5, created), (6, waiting), (9, bound), (10, running), (12, restarted), (20, lost)];
        let events = pod_events(&versions, 5);
        assert_eq!(
            reasons(&events),
            vec![
                (5, "Created"),
                (6, "FailedScheduling"),
                (9, "Scheduled"),
                (10, "Running"),
                (12, "Restarted"),
                (20, "Failed"),
                (20, "NodeLost")
            ]
        );
        assert_eq!(events[1].type_, "Warning");
        assert!(events[2].message.contains("node-1"), "{:?}", events[2]);
        assert!(events[6].message.contains("stopped reporting"), "{:?}", events[6]);
    }

    #[test]
    fn a_compacted_start_and_an_unchanged_version_say_so_or_nothing() {
        let mut bound = pod();
        bound.spec.node_name = "node-2".into();
        let mut relabelled = bound.clone();
        relabelled.metadata.labels.insert("tier".into(), "web".into());
        let events = pod_events(&[(30, bound), (31, relabelled)], 5);
        assert_eq!(reasons(&events), vec![(30, "HistoryCompacted"), (30, "Scheduled")]);
        assert!(pod_events(&[], 5).is_empty());
    }
}
