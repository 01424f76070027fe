//! The history of a run: every operation a client or the nemesis began, when it began and
//! ended (nanoseconds since the run started), and how it ended. Written as JSON lines
//! (`history.jsonl`), one record a line, so `capstan-jepsen analyze` can check it again
//! and anyone can read it with `jq`.
//!
//! A record's `type` is Jepsen's: `ok` (it happened, as recorded), `fail` (it certainly did
//! not happen: refused before it reached a plane) or `info` (unknown: a timeout or a lost
//! connection; it may have happened, or may yet).

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Who did an operation: a numbered client, or the nemesis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Process {
    Client(usize),
    Nemesis(NemesisTag),
}

/// Serialises as the string `"nemesis"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NemesisTag {
    Nemesis,
}

pub const NEMESIS: Process = Process::Nemesis(NemesisTag::Nemesis);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    Info,
}

/// One event a watcher received.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: i64,
    pub key: String,
    /// `None`: a delete.
    pub value: Option<String>,
}

/// One version of the lock workload's fenced resource, as the final read found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencedVersion {
    pub revision: i64,
    pub token: i64,
    pub client: usize,
    pub seq: u64,
}

/// A change to one of the scheduler workload's pods, replayed from the store's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodEvent {
    pub revision: i64,
    pub pod: String,
    /// The node it is bound to (empty: not bound); `None`: the pod was deleted.
    pub node: Option<String>,
    pub cpu_milli: i64,
}

/// What an operation was, and what its client saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "kebab-case")]
pub enum Op {
    // register: values are unique, so a read names the write it saw
    Read {
        key: String,
        value: Option<u64>,
    },
    Write {
        key: String,
        value: u64,
    },
    Cas {
        key: String,
        expected: u64,
        new: u64,
        succeeded: bool,
    },
    // set
    Add {
        element: String,
    },
    /// The final read after the heal: every element the cluster holds.
    ReadSet {
        elements: Vec<String>,
    },
    // bank
    Transfer {
        from: usize,
        to: usize,
        amount: i64,
        succeeded: bool,
    },
    /// All balances at one revision (account `i` at index `i`).
    ReadBank {
        balances: Vec<i64>,
        serializable: bool,
    },
    // watch
    /// One stream of a watcher: the plane, the revision asked from, the events received.
    Watch {
        plane: usize,
        from: i64,
        events: Vec<WatchEvent>,
    },
    /// The whole event stream from the watchers' start, read after the heal.
    ReadEvents {
        from: i64,
        events: Vec<WatchEvent>,
    },
    // lock
    /// Took the lock; the token is the revision that created the lock key.
    Acquire {
        token: i64,
    },
    Release {
        token: i64,
    },
    /// A write to the resource, fenced by the token (refused unless the lock key is still
    /// the one created at `token`).
    Fenced {
        token: i64,
        seq: u64,
        succeeded: bool,
    },
    /// Every version of the resource, read after the heal.
    ReadFenced {
        versions: Vec<FencedVersion>,
    },
    // scheduler
    CreatePod {
        name: String,
        cpu_milli: i64,
    },
    DeletePod {
        name: String,
    },
    /// Every change to the pods since the run began, read once the scheduler has bound
    /// every pod after the heal; with each node's CPU.
    ReadPods {
        node_cpu_milli: Vec<i64>,
        events: Vec<PodEvent>,
    },
    // nemesis
    /// A fault: begun at `call`, healed at `return`.
    Fault {
        what: String,
    },
}

impl Op {
    /// The workload an operation belongs to (`nemesis` for faults).
    pub fn workload(&self) -> &'static str {
        match self {
            Op::Read { .. } | Op::Write { .. } | Op::Cas { .. } => "register",
            Op::Add { .. } | Op::ReadSet { .. } => "set",
            Op::Transfer { .. } | Op::ReadBank { .. } => "bank",
            Op::Watch { .. } | Op::ReadEvents { .. } => "watch",
            Op::Acquire { .. } | Op::Release { .. } | Op::Fenced { .. } | Op::ReadFenced { .. } => "lock",
            Op::CreatePod { .. } | Op::DeletePod { .. } | Op::ReadPods { .. } => "scheduler",
            Op::Fault { .. } => "nemesis",
        }
    }

    /// The operation's name, as in the history (`f`).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Cas { .. } => "cas",
            Op::Add { .. } => "add",
            Op::ReadSet { .. } => "read-set",
            Op::Transfer { .. } => "transfer",
            Op::ReadBank { .. } => "read-bank",
            Op::Watch { .. } => "watch",
            Op::ReadEvents { .. } => "read-events",
            Op::Acquire { .. } => "acquire",
            Op::Release { .. } => "release",
            Op::Fenced { .. } => "fenced",
            Op::ReadFenced { .. } => "read-fenced",
            Op::CreatePod { .. } => "create-pod",
            Op::DeletePod { .. } => "delete-pod",
            Op::ReadPods { .. } => "read-pods",
            Op::Fault { .. } => "fault",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub process: Process,
    #[serde(rename = "type")]
    pub outcome: Outcome,
    /// When the operation began, in ns since the run's start.
    pub call: u64,
    /// When it ended (for `info`: when the client gave up on it).
    #[serde(rename = "return")]
    pub ret: u64,
    #[serde(flatten)]
    pub op: Op,
}

pub type History = Vec<Record>;

/// The run's clock: nanoseconds since it started.
#[derive(Clone, Copy, Debug)]
pub struct Clock(pub std::time::Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(std::time::Instant::now())
    }

    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

pub fn write_history(path: &Path, history: &[Record]) -> anyhow::Result<()> {
    let mut lines = String::new();
    for record in history {
        lines.push_str(&serde_json::to_string(record).context("cannot encode a record")?);
        lines.push('\n');
    }
    std::fs::write(path, lines).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a history written by a run; a line that is not a record says where.
pub fn read_history(path: &Path) -> anyhow::Result<History> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not an operation", path.display(), number + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_lines_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let history = vec![
            Record {
                process: Process::Client(3),
                outcome: Outcome::Ok,
                call: 1,
                ret: 2,
                op: Op::Cas { key: "k".into(), expected: 1, new: 2, succeeded: true },
            },
            Record {
                process: NEMESIS,
                outcome: Outcome::Info,
                call: 5,
                ret: 9,
                op: Op::Fault { what: "kill n1".into() },
            },
            Record {
                process: Process::Client(0),
                outcome: Outcome::Ok,
                call: 3,
                ret: 4,
                op: Op::Watch {
                    plane: 1,
                    from: 7,
                    events: vec![WatchEvent { revision: 7, key: "a".into(), value: None }],
                },
            },
        ];
        write_history(&path, &history).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(r#"{"process":3,"type":"ok","call":1,"return":2,"f":"cas","key":"k""#), "{text}");
        assert!(text.contains(r#""process":"nemesis""#), "{text}");
        assert_eq!(read_history(&path).unwrap(), history);

        std::fs::write(&path, format!("{text}{{\"process\": 1}}\n")).unwrap();
        let error = format!("{:#}", read_history(&path).unwrap_err());
        assert!(error.contains("line 4: not an operation"), "{error}");
    }
}
