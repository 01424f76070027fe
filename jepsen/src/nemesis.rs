//! The nemesis: faults injected in turn over a run, each healed before the next. A turn is
//! one fault or a combination of faults at once (`partition+slow`). Every turn is recorded
//! in the history as a nemesis operation from injection to heal, so checkers, the timeline
//! and the plots see when the cluster was hurt.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::cluster::Cluster;
use crate::history::{Clock, Op, Outcome, Record, NEMESIS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a random plane; restart it at the heal.
    Kill,
    KillLeader,
    /// SIGKILL a minority: 1 plane of 3, 2 of 5.
    KillMinority,
    /// SIGSTOP a random plane; SIGCONT it at the heal.
    Pause,
    PauseLeader,
    /// Cut the network into a random majority and minority.
    Partition,
    /// Cut the leader off from every other plane.
    PartitionLeader,
    /// Two halves that reach each other only through one plane in both.
    Bridge,
    /// Each plane reaches only its two neighbours on a ring: each sees a majority, but
    /// no two see the same one (5 planes; 3 on a ring all reach each other).
    Ring,
    /// Slow links: netem delay, or a 1 Mbit/s token bucket where the kernel lacks netem.
    Slow,
    /// Every plane drops a fifth of what it receives.
    Lossy,
    /// Remove a random plane from the cluster (it stops, its data is deleted); add it back
    /// as a new member at the heal, when it joins and catches up.
    Membership,
}

pub const FAULTS: [(&str, Fault); 12] = [
    ("kill", Fault::Kill),
    ("kill-leader", Fault::KillLeader),
    ("kill-minority", Fault::KillMinority),
    ("pause", Fault::Pause),
    ("pause-leader", Fault::PauseLeader),
    ("partition", Fault::Partition),
    ("partition-leader", Fault::PartitionLeader),
    ("bridge", Fault::Bridge),
    ("ring", Fault::Ring),
    ("slow", Fault::Slow),
    ("lossy", Fault::Lossy),
    ("membership", Fault::Membership),
];

impl Fault {
    /// Faults made of rules in the planes' namespaces, which one heal clears.
    fn is_network(self) -> bool {
        matches!(
            self,
            Fault::Partition | Fault::PartitionLeader | Fault::Bridge | Fault::Ring | Fault::Slow | Fault::Lossy
        )
    }
}

/// Parses one turn: a fault, or faults joined by `+` to inject at once.
pub fn parse_turn(text: &str) -> anyhow::Result<Vec<Fault>> {
    text.split('+')
        .map(|name| match FAULTS.iter().find(|(known, _)| *known == name.trim()) {
            Some((_, fault)) => Ok(*fault),
            None => {
                let known: Vec<&str> = FAULTS.iter().map(|(name, _)| *name).collect();
                bail!("unknown fault {name:?}; faults are {}, and `a+b` for two at once", known.join(", "))
            }
        })
        .collect()
}

/// How a fault is undone at the heal.
enum Undo {
    Restart(Vec<usize>),
    Resume(Vec<usize>),
    Network,
    AddBack(usize),
}

/// How long a removed plane may take to be added back before the run gives up on it.
const ADD_BACK_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Nemesis<'a> {
    pub cluster: &'a mut Cluster,
    pub schedule: Vec<Vec<Fault>>,
    /// How long a fault lasts, and the calm between two.
    pub interval: Duration,
    pub rng: fastrand::Rng,
    pub clock: Clock,
}

impl Nemesis<'_> {
    /// Injects the schedule's turns in order until the deadline, healing each before the
    /// next; returns the nemesis records. The cluster is whole when it returns.
    pub async fn run(mut self, deadline: Instant) -> anyhow::Result<Vec<Record>> {
        let mut history = Vec::new();
        let mut turn = 0;
        // A turn is a calm, a fault and its heal; the run ends with a calm of its own, so
        // the history shows the cluster after the last heal.
        while !self.schedule.is_empty() && Instant::now() + 3 * self.interval < deadline {
            tokio::time::sleep(self.interval).await;
            let faults = self.schedule[turn % self.schedule.len()].clone();
            turn += 1;
            let call = self.clock.now();
            let (mut what, mut undo, mut outcome) = (Vec::new(), Vec::new(), Outcome::Ok);
            for fault in faults {
                match self.inject(fault).await {
                    Ok((done, how)) => {
                        what.push(done);
                        undo.push(how);
                    }
                    Err(error) => {
                        what.push(format!("{fault:?} failed: {error:#}"));
                        outcome = Outcome::Info;
                        // Applied on some planes, maybe: the heal (idempotent) clears them.
                        if fault.is_network() {
                            undo.push(Undo::Network);
                        }
                    }
                }
            }
            tokio::time::sleep(self.interval).await;
            for how in undo.into_iter().rev() {
                if let Err(error) = self.heal(how).await {
                    what.push(format!("heal failed: {error:#}"));
                    outcome = Outcome::Info;
                }
            }
            let ret = self.clock.now();
            history.push(Record { process: NEMESIS, outcome, call, ret, op: Op::Fault { what: what.join("; ") } });
        }
        tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
        Ok(history)
    }

    fn random_plane(&mut self) -> usize {
        self.rng.usize(..self.cluster.len())
    }

    /// The leader, or a random plane when no plane knows one.
    async fn leader(&mut self) -> (usize, &'static str) {
        match self.cluster.leader().await {
            Some(leader) => (leader, "leader "),
            None => (self.random_plane(), "(no leader known) "),
        }
    }

    fn shuffled(&mut self) -> Vec<usize> {
        let mut planes: Vec<usize> = (0..self.cluster.len()).collect();
        self.rng.shuffle(&mut planes);
        planes
    }

    async fn inject(&mut self, fault: Fault) -> anyhow::Result<(String, Undo)> {
        Ok(match fault {
            Fault::Kill | Fault::KillLeader | Fault::KillMinority => {
                let (planes, who) = match fault {
                    Fault::KillLeader => {
                        let (leader, who) = self.leader().await;
                        (vec![leader], who)
                    }
                    Fault::KillMinority => {
                        let mut planes = self.shuffled();
                        planes.truncate((planes.len() - 1) / 2);
                        (planes, "")
                    }
                    _ => (vec![self.random_plane()], ""),
                };
                for plane in &planes {
                    self.cluster.kill(*plane);
                }
                (format!("kill {who}{}", names(&planes)), Undo::Restart(planes))
            }
            Fault::Pause | Fault::PauseLeader => {
                let (plane, who) =
                    if fault == Fault::PauseLeader { self.leader().await } else { (self.random_plane(), "") };
                self.cluster.pause(plane, true);
                (format!("pause {who}n{plane}"), Undo::Resume(vec![plane]))
            }
            Fault::Partition | Fault::PartitionLeader | Fault::Bridge | Fault::Ring => {
                let (cut, what) = self.partition(fault).await;
                self.cluster.network.cut(&cut)?;
                (what, Undo::Network)
            }
            Fault::Slow => {
                let how = self.cluster.network.slow()?;
                (format!("slow links ({how})"), Undo::Network)
            }
            Fault::Lossy => {
                self.cluster.network.lose(20)?;
                ("lossy links (20% dropped)".to_string(), Undo::Network)
            }
            Fault::Membership => {
                let plane = self.random_plane();
                self.cluster.remove_member(plane).await?;
                (format!("remove member n{plane}"), Undo::AddBack(plane))
            }
        })
    }

    /// The links to cut for a partition fault, and what it is.
    async fn partition(&mut self, fault: Fault) -> (Vec<(usize, usize)>, String) {
        let planes = self.shuffled();
        let across = |a: &[usize], b: &[usize]| -> Vec<(usize, usize)> {
            a.iter().flat_map(|x| b.iter().map(move |y| (*x, *y))).collect()
        };
        match fault {
            Fault::PartitionLeader => {
                let (leader, who) = self.leader().await;
                let rest: Vec<usize> = (0..planes.len()).filter(|plane| *plane != leader).collect();
                (across(&[leader], &rest), format!("isolate {who}n{leader}"))
            }
            Fault::Bridge => {
                let (bridge, rest) = planes.split_first().expect("a cluster has planes");
                let (left, right) = rest.split_at(rest.len() / 2);
                (across(left, right), format!("bridge n{bridge} between {} and {}", names(left), names(right)))
            }
            Fault::Ring => {
                let n = planes.len();
                let position = |plane: usize| planes.iter().position(|p| *p == plane).expect("on the ring");
                let cut = (0..n)
                    .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                    .filter(|&(a, b)| {
                        let distance = position(a).abs_diff(position(b));
                        distance != 1 && distance != n - 1
                    })
                    .collect();
                (cut, format!("ring {}", planes.iter().map(|p| format!("n{p}")).collect::<Vec<_>>().join("-")))
            }
            _ => {
                let (majority, minority) = planes.split_at(planes.len() / 2 + 1);
                (across(majority, minority), format!("partition {} | {}", names(majority), names(minority)))
            }
        }
    }

    async fn heal(&mut self, undo: Undo) -> anyhow::Result<()> {
        match undo {
            Undo::Restart(planes) => {
                for plane in planes {
                    self.cluster.restart(plane)?;
                }
            }
            Undo::Resume(planes) => {
                for plane in planes {
                    self.cluster.pause(plane, false);
                }
            }
            Undo::Network => self.cluster.network.heal()?,
            Undo::AddBack(plane) => {
                // The membership may still be changing (a leader election after the
                // removal): keep trying for a while.
                let deadline = Instant::now() + ADD_BACK_TIMEOUT;
                while let Err(error) = self.cluster.add_back(plane).await {
                    if Instant::now() > deadline {
                        return Err(error);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Ok(())
    }
}

fn names(planes: &[usize]) -> String {
    format!("[{}]", planes.iter().map(|plane| format!("n{plane}")).collect::<Vec<_>>().join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_parse_and_unknown_faults_are_named() {
        assert_eq!(parse_turn("kill").unwrap(), vec![Fault::Kill]);
        assert_eq!(parse_turn("partition-leader+slow").unwrap(), vec![Fault::PartitionLeader, Fault::Slow]);
        let error = parse_turn("kill+explode").unwrap_err().to_string();
        assert!(error.contains("unknown fault \"explode\"") && error.contains("membership"), "{error}");
    }
}
