//! The `etcd-client` crate (what Rust programs use to talk to etcd) against a real
//! `capstan plane` process.

mod common;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp, WatchOptions,
};

use common::PlaneProcess;

/// Bounds every await on the network, so a hang fails the test instead of stalling it.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future).await.expect("step timed out")
}

async fn connect(plane: &PlaneProcess) -> Client {
    bounded(Client::connect([plane.endpoint()], None)).await.expect("connect")
}

fn start() -> (tempfile::TempDir, PlaneProcess) {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    (dir, plane)
}

#[tokio::test]
async fn kv_txn_and_revisions() {
    let (_dir, plane) = start();
    let mut client = connect(&plane).await;
    let put = bounded(client.put("a", "1", None)).await.unwrap();
    let first = put.header().unwrap().revision();
    let header = put.header().unwrap();
    assert_ne!(header.cluster_id(), 0);
    assert_ne!(header.member_id(), 0);
    assert!(header.raft_term() >= 1);
    bounded(client.put("a", "2", None)).await.unwrap();
    bounded(client.put("b", "3", None)).await.unwrap();

    let got = bounded(client.get("a", None)).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"2");
    assert_eq!(got.kvs()[0].version(), 2);
    assert_eq!(got.kvs()[0].create_revision(), first);
    let old = bounded(client.get("a", Some(GetOptions::new().with_revision(first)))).await.unwrap();
    assert_eq!(old.kvs()[0].value(), b"1");
    let all = bounded(client.get("", Some(GetOptions::new().with_all_keys()))).await.unwrap();
    assert_eq!(all.kvs().iter().map(|kv| kv.key()).collect::<Vec<_>>(), [&b"a"[..], b"b"]);

    let txn = Txn::new()
        .when([Compare::value("a", CompareOp::Equal, "2"), Compare::version("b", CompareOp::Greater, 0)])
        .and_then([TxnOp::put("a", "3", None), TxnOp::get("a", None)])
        .or_else([TxnOp::delete("a", None)]);
    let response = bounded(client.txn(txn)).await.unwrap();
    assert!(response.succeeded());
    let previous = bounded(client.put("a", "4", Some(PutOptions::new().with_prev_key()))).await.unwrap();
    assert_eq!(previous.prev_key().unwrap().value(), b"3");
    let deleted = bounded(client.delete("a", None)).await.unwrap();
    assert_eq!(deleted.deleted(), 1);
    assert!(bounded(client.get("a", None)).await.unwrap().kvs().is_empty());
}

#[tokio::test]
async fn watch_from_now_and_from_an_old_revision() {
    let (_dir, plane) = start();
    let mut client = connect(&plane).await;
    let first = bounded(client.put("k", "old", None)).await.unwrap().header().unwrap().revision();

    let mut live = bounded(client.watch("k", None)).await.unwrap();
    let created = bounded(live.message()).await.unwrap().unwrap();
    assert!(created.created());
    bounded(client.put("k", "new", None)).await.unwrap();
    let event = bounded(live.message()).await.unwrap().unwrap();
    assert_eq!(event.events().len(), 1);
    assert_eq!(event.events()[0].kv().unwrap().value(), b"new");
    assert_eq!(event.events()[0].event_type(), EventType::Put);

    let mut replay =
        bounded(client.watch("k", Some(WatchOptions::new().with_start_revision(first).with_prev_key()))).await.unwrap();
    let mut values = Vec::new();
    while values.len() < 2 {
        let response = bounded(replay.message()).await.unwrap().unwrap();
        for event in response.events() {
            values.push((event.kv().unwrap().value().to_vec(), event.prev_kv().map(|kv| kv.value().to_vec())));
        }
    }
    assert_eq!(values, [(b"old".to_vec(), None), (b"new".to_vec(), Some(b"old".to_vec()))]);

    // Progress: with every watcher caught up, the server reports the current revision.
    bounded(live.request_progress()).await.unwrap();
    let progress = bounded(live.message()).await.unwrap().unwrap();
    assert_eq!(progress.header().unwrap().revision(), first + 1);

    // A watch from a compacted revision is cancelled with the compact revision.
    bounded(client.put("k", "newer", None)).await.unwrap();
    bounded(client.compact(first + 2, None)).await.unwrap();
    let mut stale = bounded(client.watch("k", Some(WatchOptions::new().with_start_revision(first)))).await.unwrap();
    let mut cancelled = None;
    while cancelled.is_none() {
        let response = bounded(stale.message()).await.unwrap().unwrap();
        if response.canceled() {
            cancelled = Some(response.compact_revision());
        }
    }
    assert_eq!(cancelled, Some(first + 2));
}

/// The next response of `stream`, which must carry an event: its watcher and key.
async fn next_event(stream: &mut etcd_client::WatchStream) -> (i64, Vec<u8>) {
    let response = bounded(stream.message()).await.unwrap().unwrap();
    let event = response.events().first().expect("an event");
    (response.watch_id(), event.kv().unwrap().key().to_vec())
}

/// A watcher whose client stops reading gets, once it reads again, the revisions that
/// queued for it meanwhile joined into fewer responses: every revision, in order, none
/// missed, and some responses carry several.
#[tokio::test]
async fn a_watcher_that_fell_behind_gets_queued_revisions_joined_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    let mut client = connect(&plane).await;
    let mut behind = bounded(client.watch("behind/", Some(WatchOptions::new().with_prefix()))).await.unwrap();
    assert!(bounded(behind.message()).await.unwrap().unwrap().created());
    // More than the client's HTTP/2 window (2 MiB) and the plane's send buffer hold, so
    // the rest queues on the plane's event channel, and fewer than the channel holds, so
    // the watcher does not lag into history.
    let puts = capstan_raft::EVENT_CHANNEL_REVISIONS - 600;
    let value = "v".repeat(1_000);
    let mut revisions = Vec::with_capacity(puts);
    for index in 0..puts {
        let put = bounded(client.put(format!("behind/{index}"), value.as_str(), None)).await.unwrap();
        revisions.push(put.header().unwrap().revision());
    }
    let (mut seen, mut joined) = (Vec::with_capacity(puts), 0);
    while seen.len() < puts {
        let response = bounded(behind.message()).await.unwrap().unwrap();
        assert!(!response.canceled(), "the watcher was cancelled: {}", response.cancel_reason());
        let first = seen.len();
        seen.extend(response.events().iter().map(|event| event.kv().unwrap().mod_revision()));
        if seen.len() > first + 1 {
            joined += 1;
        }
    }
    assert_eq!(seen, revisions, "every revision, in order");
    assert!(joined > 0, "no response carried more than one revision");
}

/// Watchers sharing one stream each get their own events; a cancelled one says so and sends
/// nothing more while the other goes on. A watcher whose client reads nothing while more
/// revisions pass than the plane's event channel holds falls behind (the plane counts it
/// as a slow watcher), and once read it still delivers every revision, in order.
#[tokio::test]
async fn watchers_sharing_a_stream_cancel_alone_and_a_slow_reader_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = common::free_addr();
    let metrics_url = format!("http://{metrics}");
    let plane = PlaneProcess::start(&dir.path().join("plane"), &["--listen-metrics-urls", &metrics_url]);
    let mut client = connect(&plane).await;

    let mut stream = bounded(client.watch("a", None)).await.unwrap();
    bounded(stream.watch("b", None)).await.unwrap();
    let mut ids = Vec::new();
    while ids.len() < 2 {
        let created = bounded(stream.message()).await.unwrap().unwrap();
        assert!(created.created());
        ids.push(created.watch_id());
    }
    let (a, b) = (ids[0], ids[1]);
    assert_ne!(a, b);
    bounded(client.put("a", "1", None)).await.unwrap();
    assert_eq!(next_event(&mut stream).await, (a, b"a".to_vec()));
    bounded(client.put("b", "1", None)).await.unwrap();
    assert_eq!(next_event(&mut stream).await, (b, b"b".to_vec()));
    bounded(stream.cancel(a)).await.unwrap();
    let cancelled = bounded(stream.message()).await.unwrap().unwrap();
    assert_eq!((cancelled.watch_id(), cancelled.canceled()), (a, true));
    bounded(client.put("a", "2", None)).await.unwrap();
    bounded(client.put("b", "2", None)).await.unwrap();
    assert_eq!(next_event(&mut stream).await, (b, b"b".to_vec()), "the cancelled watcher sent an event");

    let mut slow = bounded(client.watch("slow/", Some(WatchOptions::new().with_prefix()))).await.unwrap();
    assert!(bounded(slow.message()).await.unwrap().unwrap().created());
    // Enough that the client's HTTP/2 window (2 MiB, about 2,000 of these events) and the
    // plane's send buffer fill and the plane's channel overflows behind them, with room.
    let puts = 3 * capstan_raft::EVENT_CHANNEL_REVISIONS;
    let value = "v".repeat(1_000);
    let writers: Vec<_> = (0..32)
        .map(|writer| {
            let (mut client, value) = (client.clone(), value.clone());
            tokio::spawn(async move {
                for index in (writer..puts).step_by(32) {
                    bounded(client.put(format!("slow/{index}"), value.as_str(), None)).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let (mut seen, mut last) = (0, 0);
    while seen < puts {
        let response = bounded(slow.message()).await.unwrap().unwrap();
        assert!(!response.canceled(), "the slow watcher was cancelled: {}", response.cancel_reason());
        for event in response.events() {
            let revision = event.kv().unwrap().mod_revision();
            assert!(revision > last, "revision {revision} came after {last}");
            (seen, last) = (seen + 1, revision);
        }
    }
    let (_, scraped) = common::http_get(metrics, "/metrics");
    let slow_watchers = scraped
        .lines()
        .find_map(|line| line.strip_prefix("capstan_watch_slow_watchers_total "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert!(slow_watchers.is_some_and(|count| count >= 1.0), "no watcher fell behind: {slow_watchers:?}");
}

/// A stream's answers come in the order of its requests, even when a cancelled watch ID is
/// taken again at once and a create is refused among them; as in etcd, the stream's
/// watchers outlive the client closing its side, and the plane stopping ends the stream
/// with "server stopped" (Unavailable, so a client resumes elsewhere).
#[tokio::test]
async fn watch_answers_keep_request_order_and_watchers_outlive_a_half_close() {
    let (_dir, plane) = start();
    let mut client = connect(&plane).await;
    let id = |id| Some(WatchOptions::new().with_watch_id(id));
    let mut stream = bounded(client.watch("k", id(5))).await.unwrap();
    // All sent before any answer is read.
    bounded(stream.cancel(5)).await.unwrap();
    bounded(stream.watch("k", id(5))).await.unwrap();
    bounded(stream.watch("z", Some(WatchOptions::new().with_range("a")))).await.unwrap();
    bounded(stream.watch("k", None)).await.unwrap();
    bounded(stream.request_progress()).await.unwrap();
    let (requests, mut responses) = stream.split();
    let mut answers = Vec::new();
    while answers.len() < 6 {
        let answer = bounded(responses.message()).await.unwrap().unwrap();
        answers.push((answer.watch_id(), answer.created(), answer.canceled()));
    }
    let (created, cancelled, refused, progress) = ((true, false), (false, true), (true, true), (false, false));
    let expected = [(5, created), (5, cancelled), (5, created), (-1, refused), (0, created), (-1, progress)];
    assert_eq!(answers, expected.map(|(id, (created, canceled))| (id, created, canceled)));

    drop(requests);
    bounded(client.put("k", "1", None)).await.unwrap();
    let mut events = Vec::new();
    while events.len() < 2 {
        let response = bounded(responses.message()).await.unwrap().expect("the stream ended at the half-close");
        events.extend(response.events().iter().map(|event| (response.watch_id(), event.kv().unwrap().key().to_vec())));
    }
    events.sort();
    assert_eq!(events, [(0, b"k".to_vec()), (5, b"k".to_vec())]);

    plane.terminate();
    match bounded(responses.message()).await {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            assert_eq!((status.code(), status.message()), (tonic::Code::Unavailable, "etcdserver: server stopped"))
        }
        other => panic!("the stream ended with {other:?}"),
    }
}

#[tokio::test]
async fn leases_keepalive_attach_revoke_and_expire() {
    let (_dir, plane) = start();
    let mut client = connect(&plane).await;
    let lease = bounded(client.lease_grant(30, None)).await.unwrap();
    assert_eq!(lease.ttl(), 30);
    bounded(client.put("held", "v", Some(PutOptions::new().with_lease(lease.id())))).await.unwrap();
    let (mut keeper, mut responses) = bounded(client.lease_keep_alive(lease.id())).await.unwrap();
    bounded(keeper.keep_alive()).await.unwrap();
    let kept = bounded(responses.message()).await.unwrap().unwrap();
    assert_eq!((kept.id(), kept.ttl()), (lease.id(), 30));
    let ttl =
        bounded(client.lease_time_to_live(lease.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 30);
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 30);
    assert_eq!(ttl.keys(), [b"held".to_vec()]);
    let leases = bounded(client.leases()).await.unwrap();
    assert_eq!(leases.leases().iter().map(|lease| lease.id()).collect::<Vec<_>>(), [lease.id()]);
    bounded(client.lease_revoke(lease.id())).await.unwrap();
    assert!(bounded(client.get("held", None)).await.unwrap().kvs().is_empty());
    let missing = bounded(client.lease_time_to_live(lease.id(), None)).await.unwrap_err();
    assert!(missing.to_string().contains("requested lease not found"), "{missing}");

    // A lease nobody keeps alive expires, and the leader deletes its keys.
    let short = bounded(client.lease_grant(1, None)).await.unwrap();
    let put = bounded(client.put("ephemeral", "v", Some(PutOptions::new().with_lease(short.id())))).await.unwrap();
    let start = put.header().unwrap().revision();
    let mut watch =
        bounded(client.watch("ephemeral", Some(WatchOptions::new().with_start_revision(start)))).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let response = bounded(watch.message()).await.unwrap().unwrap();
        kinds.extend(response.events().iter().map(|event| event.event_type()));
    }
    assert_eq!(kinds, [EventType::Put, EventType::Delete]);
}

#[tokio::test]
async fn status_and_member_list() {
    let (_dir, plane) = start();
    let mut client = connect(&plane).await;
    let status = bounded(client.status()).await.unwrap();
    assert_eq!(status.leader(), status.header().unwrap().member_id());
    assert!(status.raft_applied_index() >= 1);
    assert!(status.db_size() > 0);
    let members = bounded(client.member_list()).await.unwrap();
    assert_eq!(members.members().len(), 1);
    assert_eq!(members.members()[0].name(), "test-plane");
    assert_eq!(members.members()[0].client_urls(), [plane.endpoint()]);
}
