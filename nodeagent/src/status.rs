//! Pod status from what the agent knows of its containers, by Kubernetes' rules: the
//! phase is Pending until every container has started, Running while any runs or will
//! restart, Succeeded when all exited 0 and none will restart, Failed when all exited
//! and one failed under restartPolicy Never. Pure, so the rules are tested directly.

use capstan_proto::objects::{
    set_condition, Condition, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodPhase, PodStatus, CONDITION_FALSE, CONDITION_TRUE, POD_READY,
};

/// How a container run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
    /// Completed, Error, or StartError (the command could not be started).
    pub reason: String,
    pub message: String,
    pub started_at: String,
    pub finished_at: String,
}

impl Exit {
    pub fn succeeded(&self) -> bool {
        self.code == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Not started yet, or waiting to restart (CrashLoopBackOff).
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: String,
    },
    /// Ended and will not run again.
    Terminated(Exit),
}

/// One container as the agent runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRun {
    pub name: String,
    pub state: RunState,
    pub restart_count: i32,
    pub last_exit: Option<Exit>,
}

impl ContainerRun {
    pub fn new(name: &str, restart_count: i32) -> Self {
        Self {
            name: name.to_string(),
            state: RunState::Waiting { reason: "ContainerCreating".into(), message: String::new() },
            restart_count,
            last_exit: None,
        }
    }
}

/// The pod's status given its containers; conditions other than Ready and
/// ContainersReady (PodScheduled, set by the scheduler) are kept from `old`.
pub fn pod_status(
    containers: &[ContainerRun],
    old: &PodStatus,
    start_time: &str,
    host_ip: &str,
    now: &str,
) -> PodStatus {
    let all_terminated = containers.iter().all(|c| matches!(c.state, RunState::Terminated(_)));
    let any_running = containers.iter().any(|c| matches!(c.state, RunState::Running { .. }));
    let restarting = containers.iter().any(|c| matches!(c.state, RunState::Waiting { .. }) && c.restart_count > 0);
    let failed_exit = containers.iter().find_map(|c| match &c.state {
        RunState::Terminated(exit) if !exit.succeeded() => Some((c.name.as_str(), exit)),
        _ => None,
    });
    let phase = if !containers.is_empty() && all_terminated {
        if failed_exit.is_some() {
            PodPhase::Failed
        } else {
            PodPhase::Succeeded
        }
    } else if any_running || restarting {
        PodPhase::Running
    } else {
        PodPhase::Pending
    };
    let ready = !containers.is_empty() && containers.iter().all(|c| matches!(c.state, RunState::Running { .. }));
    let mut status = PodStatus {
        phase,
        conditions: old.conditions.clone(),
        reason: String::new(),
        message: String::new(),
        host_ip: host_ip.to_string(),
        start_time: start_time.to_string(),
        container_statuses: containers.iter().map(container_status).collect(),
    };
    if let (PodPhase::Failed, Some((name, exit))) = (phase, failed_exit) {
        status.message = if exit.message.is_empty() {
            format!("container {name:?} exited with code {}", exit.code)
        } else {
            exit.message.clone()
        };
    }
    for type_ in [POD_READY, "ContainersReady"] {
        let condition = Condition {
            type_: type_.into(),
            status: if ready { CONDITION_TRUE } else { CONDITION_FALSE }.into(),
            ..Default::default()
        };
        set_condition(&mut status.conditions, condition, now);
    }
    status
}

fn container_status(run: &ContainerRun) -> ContainerStatus {
    let terminated = |exit: &Exit| ContainerStateTerminated {
        exit_code: exit.code,
        signal: exit.signal,
        reason: exit.reason.clone(),
        message: exit.message.clone(),
        started_at: exit.started_at.clone(),
        finished_at: exit.finished_at.clone(),
    };
    let state = match &run.state {
        RunState::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting { reason: reason.clone(), message: message.clone() }),
            // A restarting container shows how its last run ended, as Kubernetes'
            // lastState does; Capstan keeps it in the same state record.
            terminated: run.last_exit.as_ref().map(terminated),
            ..Default::default()
        },
        RunState::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning { started_at: started_at.clone() }),
            ..Default::default()
        },
        RunState::Terminated(exit) => ContainerState { terminated: Some(terminated(exit)), ..Default::default() },
    };
    ContainerStatus {
        name: run.name.clone(),
        ready: matches!(run.state, RunState::Running { .. }),
        restart_count: run.restart_count,
        state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> Exit {
        Exit {
            code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: String::new(),
            started_at: "t0".into(),
            finished_at: "t1".into(),
        }
    }

    fn run(state: RunState, restarts: i32) -> ContainerRun {
        ContainerRun { name: "c".into(), state, restart_count: restarts, last_exit: None }
    }

    fn phase(containers: &[ContainerRun]) -> PodPhase {
        pod_status(containers, &PodStatus::default(), "", "", "now").phase
    }

    #[test]
    fn phases_follow_kubernetes() {
        let creating = run(RunState::Waiting { reason: "ContainerCreating".into(), message: String::new() }, 0);
        let running = run(RunState::Running { started_at: "t".into() }, 0);
        assert_eq!(phase(std::slice::from_ref(&creating)), PodPhase::Pending);
        assert_eq!(phase(&[creating, running.clone()]), PodPhase::Running);
        assert_eq!(phase(&[run(RunState::Terminated(exit(0)), 0)]), PodPhase::Succeeded);
        assert_eq!(
            phase(&[run(RunState::Terminated(exit(0)), 0), run(RunState::Terminated(exit(3)), 0)]),
            PodPhase::Failed
        );
        let backing_off = run(RunState::Waiting { reason: "CrashLoopBackOff".into(), message: String::new() }, 2);
        assert_eq!(phase(&[backing_off]), PodPhase::Running, "a crash-looping pod is Running");
        assert_eq!(phase(&[running, run(RunState::Terminated(exit(0)), 0)]), PodPhase::Running);
    }

    #[test]
    fn a_failed_pod_says_why_and_ready_follows_the_containers() {
        let mut start_error = exit(127);
        start_error.reason = "StartError".into();
        start_error.message = "failed to start container \"c\": \"nosuch\": No such file or directory".into();
        let status = pod_status(
            &[run(RunState::Terminated(start_error.clone()), 0)],
            &PodStatus::default(),
            "t0",
            "10.0.0.1",
            "now",
        );
        assert_eq!(status.phase, PodPhase::Failed);
        assert_eq!(status.message, start_error.message);
        assert_eq!(status.container_statuses[0].state.terminated.as_ref().unwrap().exit_code, 127);
        let ready = |s: &PodStatus| s.conditions.iter().find(|c| c.type_ == POD_READY).unwrap().status.clone();
        assert_eq!(ready(&status), CONDITION_FALSE);
        let running = pod_status(&[run(RunState::Running { started_at: "t".into() }, 1)], &status, "t0", "", "later");
        assert_eq!(ready(&running), CONDITION_TRUE);
        assert_eq!(running.container_statuses[0].restart_count, 1);
        assert!(running.message.is_empty());
    }
}
