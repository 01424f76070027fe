//! The watch workload: a watcher on every plane follows `jepsen/` (every other workload's
//! writes) from one revision. When its stream breaks (the plane was killed, removed or cut
//! off) it watches again from the revision after the last event it got. After the heal, a
//! reference stream is read from the start revision.
//!
//! etcd's watch guarantees, checked per watcher against the reference: events come in
//! revision order, none twice, none skipped (also across a resumption), and each is the
//! same event every other plane delivered.

use std::collections::BTreeMap;

use etcd_client::{EventType, WatchOptions};

use crate::check::Check;
use crate::client::{final_client, history, Endpoints, Session};
use crate::history::{Clock, Op, Outcome, Process, Record, WatchEvent};

pub const PREFIX: &str = "jepsen/";

fn event_of(event: &etcd_client::Event) -> Option<WatchEvent> {
    let kv = event.kv()?;
    let value = match event.event_type() {
        EventType::Put => Some(String::from_utf8_lossy(kv.value()).into_owned()),
        EventType::Delete => None,
    };
    Some(WatchEvent { revision: kv.mod_revision(), key: String::from_utf8_lossy(kv.key()).into_owned(), value })
}

/// One watcher on `plane` from revision `from` until the deadline: a `Watch` record per
/// stream, resumed after the last event seen.
pub async fn watcher(mut session: Session, plane: usize, mut from: i64) -> Vec<Record> {
    while session.run.going() {
        let Some(mut client) = session.client().await else { continue };
        let call = session.run.clock.now();
        let asked = from;
        let mut events = Vec::new();
        let watched = client.watch(PREFIX, Some(WatchOptions::new().with_prefix().with_start_revision(from))).await;
        let mut error = None;
        match watched {
            Ok(mut stream) => loop {
                match tokio::time::timeout_at(session.run.deadline.into(), stream.message()).await {
                    // The deadline: this stream ends with the run.
                    Err(_) => break,
                    Ok(Ok(Some(response))) if !response.canceled() => {
                        events.extend(response.events().iter().filter_map(event_of))
                    }
                    Ok(Ok(_)) => break,
                    Ok(Err(failure)) => {
                        error = Some(failure);
                        break;
                    }
                }
            },
            Err(failure) => error = Some(failure),
        }
        if let Some(last) = events.last() {
            from = last.revision + 1;
        }
        let outcome = match error {
            Some(error) => session.failed(&error),
            None => Outcome::Ok,
        };
        // A stream that never opened and delivered nothing is a failure to connect only.
        if outcome == Outcome::Ok || !events.is_empty() {
            session.record(call, Outcome::Ok, Op::Watch { plane, from: asked, events });
        }
    }
    session.history
}

/// Reads every event from `from` up to the store's current revision, after the heal.
pub async fn final_read(endpoints: &Endpoints, from: i64, process: usize, clock: Clock) -> anyhow::Result<Record> {
    let mut client = final_client(endpoints).await?;
    let call = clock.now();
    let events = history(&mut client, PREFIX, from).await?;
    let events = events.iter().filter_map(event_of).collect();
    let op = Op::ReadEvents { from, events };
    Ok(Record { process: Process::Client(process), outcome: Outcome::Ok, call, ret: clock.now(), op })
}

/// Compares each watcher's events, all its streams in order, with the reference.
pub fn check(history: &[Record]) -> Check {
    let Some((reference_from, reference)) = history.iter().find_map(|record| match &record.op {
        Op::ReadEvents { from, events } => Some((*from, events)),
        _ => None,
    }) else {
        return Check::invalid("no reference stream was read");
    };
    let mut watchers: BTreeMap<Process, Vec<&Record>> = BTreeMap::new();
    for record in history.iter().filter(|record| matches!(record.op, Op::Watch { .. })) {
        watchers.entry(record.process).or_default().push(record);
    }
    let (mut problems, mut delivered, mut streams) = (Vec::new(), 0, 0);
    for (process, mut records) in watchers {
        records.sort_by_key(|record| record.call);
        streams += records.len();
        let events: Vec<&WatchEvent> = records
            .iter()
            .flat_map(|record| match &record.op {
                Op::Watch { events, .. } => events.iter(),
                _ => [].iter(),
            })
            .collect();
        delivered += events.len();
        let Op::Watch { plane, from, .. } = records[0].op else { unreachable!("only watch records were kept") };
        if let Some(problem) = compare(&events, from, reference, reference_from) {
            problems.push(format!("watcher {process:?} on n{plane}: {problem}"));
        }
    }
    let valid = problems.is_empty();
    let summary = match problems.first() {
        None => format!(
            "{delivered} events over {streams} streams, in order, none missing or doubled, identical to the \
             reference of {}",
            reference.len()
        ),
        Some(first) => format!("{} watchers WRONG; the first: {first}", problems.len()),
    };
    Check {
        valid,
        summary,
        detail: serde_json::json!({
            "delivered": delivered, "streams": streams, "reference": reference.len(), "problems": problems,
        }),
    }
}

/// What is wrong with a watcher's events, if anything: they must be exactly the
/// reference's events from the revision it first asked for to its last event.
fn compare(events: &[&WatchEvent], from: i64, reference: &[WatchEvent], reference_from: i64) -> Option<String> {
    if from < reference_from {
        return Some(format!("it watched from revision {from}, before the start {reference_from}"));
    }
    let start = reference.partition_point(|event| event.revision < from);
    for (index, event) in events.iter().enumerate() {
        match reference.get(start + index) {
            Some(expected) if expected == *event => {}
            Some(expected) => {
                return Some(format!("event {index} is {event:?} where the reference has {expected:?}"));
            }
            None => return Some(format!("event {index} ({event:?}) is past the end of the reference")),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: i64, key: &str) -> WatchEvent {
        WatchEvent { revision, key: key.into(), value: Some(format!("v{revision}")) }
    }

    fn stream(process: usize, call: u64, events: Vec<WatchEvent>) -> Record {
        stream_from(process, call, events.first().map_or(2, |e| e.revision), events)
    }

    fn stream_from(process: usize, call: u64, from: i64, events: Vec<WatchEvent>) -> Record {
        let op = Op::Watch { plane: process, from, events };
        Record { process: Process::Client(process), outcome: Outcome::Ok, call, ret: call + 1, op }
    }

    fn with_reference(watch: Vec<Record>) -> Vec<Record> {
        // Revision 4 is a txn of two puts.
        let events = vec![event(2, "a"), event(3, "b"), event(4, "c"), event(4, "d"), event(5, "a")];
        let reference = Op::ReadEvents { from: 2, events };
        let mut history = watch;
        history.push(Record { process: Process::Client(9), outcome: Outcome::Ok, call: 100, ret: 101, op: reference });
        history
    }

    #[test]
    fn streams_resumed_in_order_without_gaps_pass() {
        let history = with_reference(vec![
            stream(0, 0, vec![event(2, "a"), event(3, "b")]),
            // Resumed after a disconnect, from revision 4.
            stream(0, 10, vec![event(4, "c"), event(4, "d"), event(5, "a")]),
            // Another plane's watcher started late and stopped early: a window is fine.
            stream(1, 0, vec![event(3, "b"), event(4, "c"), event(4, "d")]),
        ]);
        let verdict = check(&history);
        assert!(verdict.valid, "{}", verdict.summary);
        assert_eq!(verdict.detail["delivered"], 8);
    }

    #[test]
    fn gaps_doubles_reordering_and_different_events_are_caught() {
        let bad = [
            ("a gap across a resumption", vec![stream(0, 0, vec![event(2, "a")]), stream(0, 1, vec![event(4, "c")])]),
            ("half a txn", vec![stream(0, 0, vec![event(3, "b"), event(4, "c"), event(5, "a")])]),
            ("a double", vec![stream(0, 0, vec![event(2, "a"), event(3, "b")]), stream(0, 1, vec![event(3, "b")])]),
            ("out of order", vec![stream(0, 0, vec![event(3, "b"), event(2, "a")])]),
            ("a different value", vec![stream(0, 0, vec![WatchEvent { revision: 2, key: "a".into(), value: None }])]),
            ("past the end", vec![stream(0, 0, vec![event(5, "a"), event(6, "z")])]),
            ("a late first event", vec![stream_from(0, 0, 2, vec![event(3, "b")])]),
        ];
        for (what, watch) in bad {
            let verdict = check(&with_reference(watch));
            assert!(!verdict.valid, "{what} passed");
        }
        assert!(!check(&[stream(0, 0, vec![event(2, "a")])]).valid, "no reference, no verdict");
    }
}
