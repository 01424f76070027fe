//! The set workload: clients add unique elements (a key each); after the heal, one final
//! read lists what the cluster holds. No acknowledged add may be missing, and nothing may
//! appear that no one tried to add; adds whose outcome is unknown may go either way.

use std::collections::BTreeSet;

use anyhow::Context;

use crate::check::Check;
use crate::client::{final_client, Endpoints, Session};
use crate::history::{Op, Outcome, Process, Record};

const PREFIX: &str = "jepsen/set/";

/// A set client: adds unique elements until the deadline.
pub async fn client(mut session: Session) -> Vec<Record> {
    let mut counter = 0u64;
    while session.run.going() {
        let Some(mut client) = session.client().await else { continue };
        counter += 1;
        let element = format!("{}-{counter}", session.process);
        let call = session.run.clock.now();
        let outcome = match client.put(format!("{PREFIX}{element}"), "", None).await {
            Ok(_) => Outcome::Ok,
            Err(error) => session.failed(&error),
        };
        session.record(call, outcome, Op::Add { element });
        session.run.pace().await;
    }
    session.history
}

/// The set as the cluster holds it after the heal: a linearizable read of every element.
pub async fn final_read(endpoints: &Endpoints, process: usize, clock: crate::history::Clock) -> anyhow::Result<Record> {
    let mut client = final_client(endpoints).await?;
    let call = clock.now();
    let response = client
        .get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
        .await
        .context("the final read of the set failed")?;
    let elements = response
        .kvs()
        .iter()
        .filter_map(|kv| std::str::from_utf8(kv.key()).ok()?.strip_prefix(PREFIX).map(String::from))
        .collect();
    Ok(Record {
        process: Process::Client(process),
        outcome: Outcome::Ok,
        call,
        ret: clock.now(),
        op: Op::ReadSet { elements },
    })
}

pub fn check(history: &[Record]) -> Check {
    let Some(final_read) = history.iter().find_map(|record| match &record.op {
        Op::ReadSet { elements } => Some(elements.iter().map(String::as_str).collect::<BTreeSet<&str>>()),
        _ => None,
    }) else {
        return Check::invalid("no final read of the set");
    };
    let mut attempted = BTreeSet::new();
    let (mut acknowledged, mut recovered, mut lost) = (0, 0, Vec::new());
    for record in history {
        let Op::Add { element } = &record.op else { continue };
        attempted.insert(element.as_str());
        match (record.outcome, final_read.contains(element.as_str())) {
            (Outcome::Ok, true) => acknowledged += 1,
            (Outcome::Ok, false) => {
                acknowledged += 1;
                lost.push(element.clone());
            }
            (_, true) => recovered += 1,
            (_, false) => {}
        }
    }
    let unexpected: Vec<&str> = final_read.difference(&attempted).copied().collect();
    let valid = lost.is_empty() && unexpected.is_empty();
    let summary = if valid {
        format!("{acknowledged} acknowledged adds all present ({recovered} unknown adds present too)")
    } else {
        format!("{} acknowledged adds LOST, {} elements from nowhere", lost.len(), unexpected.len())
    };
    Check {
        valid,
        summary,
        detail: serde_json::json!({
            "acknowledged": acknowledged, "recovered": recovered, "lost": lost, "unexpected": unexpected,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(element: &str, outcome: Outcome) -> Record {
        Record { process: Process::Client(0), outcome, call: 0, ret: 1, op: Op::Add { element: element.into() } }
    }

    fn read(elements: &[&str]) -> Record {
        let elements = elements.iter().map(|e| e.to_string()).collect();
        Record { process: Process::Client(9), outcome: Outcome::Ok, call: 2, ret: 3, op: Op::ReadSet { elements } }
    }

    fn adds() -> Vec<Record> {
        vec![add("a", Outcome::Ok), add("b", Outcome::Ok), add("c", Outcome::Info), add("d", Outcome::Fail)]
    }

    #[test]
    fn every_acknowledged_add_must_survive() {
        let good = check(&[adds(), vec![read(&["a", "b", "c"])]].concat());
        assert!(good.valid, "{}", good.summary);
        assert_eq!((good.detail["acknowledged"].as_u64(), good.detail["recovered"].as_u64()), (Some(2), Some(1)));
        let bad = check(&[adds(), vec![read(&["a", "c"])]].concat());
        assert!(!bad.valid);
        assert_eq!(bad.detail["lost"], serde_json::json!(["b"]));
    }

    #[test]
    fn nothing_may_appear_from_nowhere_and_the_final_read_must_exist() {
        let verdict = check(&[adds(), vec![read(&["a", "b", "z"])]].concat());
        assert!(!verdict.valid);
        assert_eq!(verdict.detail["unexpected"], serde_json::json!(["z"]));
        assert!(!check(&adds()).valid);
    }
}
