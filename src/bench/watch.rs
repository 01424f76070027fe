//! `bench watch`: one writer (`--in-flight` puts at once, on one connection) puts keys
//! under a prefix while `--watchers` watch that prefix, spread over `--clients`
//! connections. Reports events delivered per second over all watchers, each event's delay
//! from its put being sent to its delivery (p50/p99/p99.9), and, as errors, every event a
//! watcher missed or got out of order: each watcher must see every acknowledged put.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::WatchOptions;

use super::{report, BenchArgs, Tally};

const PREFIX: &str = "bench-watch/";
/// How long watchers may take, after the writer stops, to deliver the last put.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(args: &BenchArgs, endpoints: &[String], watchers: usize) -> anyhow::Result<()> {
    let connections = super::connect(args, endpoints).await?;
    let epoch = Instant::now();
    let measure_from = epoch + Duration::from_secs(args.warmup_secs);
    let end = measure_from + Duration::from_secs(args.duration_secs);
    // The newest revision the writer saw acknowledged, and how many puts it was told of;
    // the watchers stop once they have delivered it (last_revision turns positive then).
    let acknowledged = Arc::new(AtomicU64::new(0));
    let (last_revision, _) = tokio::sync::watch::channel(0i64);

    let mut watching = tokio::task::JoinSet::new();
    for index in 0..watchers.max(1) {
        let mut client = connections[index % connections.len()].clone();
        let mut stream =
            client.watch(PREFIX, Some(WatchOptions::new().with_prefix())).await.context("cannot open a watch")?;
        let mut last = last_revision.subscribe();
        watching.spawn(async move {
            let (mut tally, mut received, mut seen) = (Tally::default(), 0u64, 0i64);
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    // The writer is done and this watcher delivered its last put.
                    _ = last.wait_for(|last| *last > 0 && seen >= *last) => break,
                };
                let Ok(Some(response)) = message else { break };
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    if kv.mod_revision() <= seen {
                        tally.errors += 1; // out of order or repeated
                        continue;
                    }
                    seen = kv.mod_revision();
                    received += 1;
                    let sent_nanos =
                        kv.value_str().ok().and_then(|value| value.trim_start_matches('0').parse::<u64>().ok());
                    let sent = epoch + Duration::from_nanos(sent_nanos.unwrap_or(0));
                    if sent >= measure_from && sent < end {
                        tally.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                }
            }
            (tally, received)
        });
    }

    let mut writers = tokio::task::JoinSet::new();
    let newest = Arc::new(AtomicI64::new(0));
    for worker in 0..args.in_flight.max(1) {
        let mut client = connections[0].clone();
        let (acknowledged, newest, key_count, value_size) =
            (acknowledged.clone(), newest.clone(), args.key_count.max(1), args.value_size);
        writers.spawn(async move {
            let mut errors = 0u64;
            let mut index = worker as u64;
            while Instant::now() < end {
                // The value carries when it was sent, for the watchers to time its delivery.
                let value = format!("{:0width$}", epoch.elapsed().as_nanos(), width = value_size.max(20));
                match client.put(format!("{PREFIX}{:08}", index % key_count), value, None).await {
                    Ok(response) => {
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                        let revision = response.header().map_or(0, |header| header.revision());
                        newest.fetch_max(revision, Ordering::Relaxed);
                    }
                    Err(_) => errors += 1,
                }
                index += 1;
            }
            errors
        });
    }
    let mut write_errors = 0;
    while let Some(errors) = writers.join_next().await {
        write_errors += errors.context("a bench writer panicked")?;
    }
    last_revision.send_replace(newest.load(Ordering::Relaxed).max(1));
    let acknowledged = acknowledged.load(Ordering::Relaxed);

    let mut all = Tally { errors: write_errors, ..Default::default() };
    let drain = async {
        while let Some(outcome) = watching.join_next().await {
            let (tally, received) = outcome.context("a bench watcher panicked")?;
            all.latencies_us.extend(tally.latencies_us);
            // A put that failed may still have happened, so more events than
            // acknowledgements is fine; fewer is a lost event.
            all.errors += tally.errors + acknowledged.saturating_sub(received);
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(DRAIN_TIMEOUT, drain).await.map_err(|_| {
        anyhow::anyhow!("watchers did not deliver every put within {DRAIN_TIMEOUT:?} after the writer stopped")
    })??;
    report(args, &mut all);
    Ok(())
}
