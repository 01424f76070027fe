//! etcd's Watch service.
//!
//! Each gRPC stream has a reader task (create, cancel, progress requests), and its
//! response stream polls the stream's watchers itself: a watcher is a stream of responses,
//! woken by the event channel the state machine feeds, so an event reaches the client
//! with one task woken per gRPC stream (the one that writes its HTTP/2 stream), not a task
//! per watcher and a channel between them. A watcher first replays the store's history
//! from its start revision, then follows the event channel. Writes never wait for
//! watchers: a watcher that falls behind the bounded channel (its client reads slower
//! than writes come) is told it lagged and goes back to reading history, so it catches
//! up without losing an event. A watcher whose start revision was compacted is cancelled
//! with the compact revision, as in etcd.
//!
//! The stream's own answers (created, refused, cancelled, progress) leave in the order of
//! the requests they answer: the reader hands them to the response stream in order, which
//! sends a watcher's `created` as it takes the watcher on, and stops a cancelled watcher
//! as it sends `canceled`, so nothing of that watcher follows. As in etcd, watchers outlive
//! the client closing its side of the stream (grpc-gateway does that after its request);
//! they end when the client goes away, or with etcd's "server stopped" when the plane does.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::stream::{AbortHandle, Abortable, SelectAll, Stream, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status, Streaming};

use capstan_proto::etcdserverpb::{self as pb, watch_server::Watch};
use capstan_proto::mvccpb;
use capstan_store::{Access, KeyRange, StoreError};

use super::auth::Caller;
use super::{status, Plane};

/// What the reader hands its stream before the reader waits for the client to read.
const STREAM_OUTGOING_MAX: usize = 64;
/// Events read from history per page while a watcher catches up.
const HISTORY_PAGE_EVENTS: usize = 1000;
/// A response joins queued revisions' events (see `WatcherFollower::join_queued`) while
/// they come to less than this; one revision always goes whole. Well under the 4 MiB
/// that gRPC clients take by default.
const JOINED_EVENT_BYTES_MAX: usize = 256 << 10;

pub struct WatchService(pub Arc<Plane>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;
type WatcherStream = Abortable<Pin<Box<dyn Stream<Item = pb::WatchResponse> + Send>>>;

/// The watchers of one stream, by watch ID.
#[derive(Default)]
struct StreamWatchers {
    registered: HashMap<i64, Registered>,
    next_auto_id: i64,
}

struct Registered {
    abort: AbortHandle,
    /// The newest revision the watcher has delivered everything up to, which the watcher
    /// updates without the lock. Also tells registrations apart, so a watcher that ends
    /// never removes a newer one that took its ID.
    delivered: Arc<AtomicI64>,
}

/// What a stream's reader hands its response stream.
enum Outgoing {
    /// An answer of the stream itself: a refused create, a progress answer.
    Response(pb::WatchResponse),
    /// A new watcher: its `created` answer, and its responses from then on.
    Watcher(pb::WatchResponse, WatcherStream),
    /// A cancelled watcher, to stop before its `canceled` answer goes out.
    Cancel(AbortHandle, pb::WatchResponse),
    /// The plane stops: the stream ends with etcd's "server stopped".
    Stopped,
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.0.caller(&request, "Watch")?;
        let mut incoming = request.into_inner();
        let (out, outgoing) = mpsc::channel(STREAM_OUTGOING_MAX);
        let plane = self.0.clone();
        tokio::spawn(async move {
            let watchers = Arc::new(Mutex::new(StreamWatchers::default()));
            let stopping = plane.stopping();
            tokio::pin!(stopping);
            let stopped = loop {
                let next = tokio::select! {
                    next = incoming.next() => next,
                    () = &mut stopping => break true,
                };
                match next {
                    Some(Ok(request)) => {
                        if !handle_request(&plane, &caller, &watchers, &out, request).await {
                            break false;
                        }
                    }
                    // The client closed its side: its watchers go on until it goes away
                    // (the response stream is dropped) or the plane stops.
                    None => {
                        break tokio::select! {
                            () = &mut stopping => true,
                            () = out.closed() => false,
                        }
                    }
                    Some(Err(_)) => break false,
                }
            };
            if stopped {
                let _ = out.send(Outgoing::Stopped).await;
            }
            // Dropping `out` ends the stream, and its watchers with it.
        });
        let responses = Responses { outgoing, reader_done: false, watchers: SelectAll::new() };
        Ok(Response::new(Box::pin(responses)))
    }
}

/// A stream's responses: its reader's answers first, then whatever its watchers have to
/// send. It ends when the reader does (the client went away, or the plane stops).
struct Responses {
    outgoing: mpsc::Receiver<Outgoing>,
    reader_done: bool,
    watchers: SelectAll<WatcherStream>,
}

impl Stream for Responses {
    type Item = Result<pb::WatchResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while !this.reader_done {
            match this.outgoing.poll_recv(context) {
                Poll::Ready(Some(Outgoing::Response(response))) => return Poll::Ready(Some(Ok(response))),
                Poll::Ready(Some(Outgoing::Watcher(created, watcher))) => {
                    this.watchers.push(watcher);
                    return Poll::Ready(Some(Ok(created)));
                }
                Poll::Ready(Some(Outgoing::Cancel(watcher, cancelled))) => {
                    // Polled next, the watcher ends without another response.
                    watcher.abort();
                    return Poll::Ready(Some(Ok(cancelled)));
                }
                Poll::Ready(Some(Outgoing::Stopped)) => {
                    this.reader_done = true;
                    return Poll::Ready(Some(Err(status::stopped())));
                }
                Poll::Ready(None) => this.reader_done = true,
                Poll::Pending => break,
            }
        }
        if this.reader_done {
            return Poll::Ready(None);
        }
        match this.watchers.poll_next_unpin(context) {
            Poll::Ready(Some(response)) => Poll::Ready(Some(Ok(response))),
            // No watchers (yet): the reader's channel wakes the stream for the next one.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

fn lock(watchers: &Mutex<StreamWatchers>) -> std::sync::MutexGuard<'_, StreamWatchers> {
    watchers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Handles one request of a stream; false when the stream is done.
async fn handle_request(
    plane: &Arc<Plane>,
    caller: &Caller,
    watchers: &Arc<Mutex<StreamWatchers>>,
    out: &mpsc::Sender<Outgoing>,
    request: pb::WatchRequest,
) -> bool {
    use pb::watch_request::RequestUnion;
    let outgoing = match request.request_union {
        Some(RequestUnion::CreateRequest(create)) => match create_watcher(plane, caller, watchers, create) {
            Ok((created, watcher)) => Outgoing::Watcher(created, watcher),
            Err(refused) => Outgoing::Response(refused),
        },
        Some(RequestUnion::CancelRequest(cancel)) => {
            // etcd ignores a cancel of an unknown watcher.
            let Some(registered) = lock(watchers).registered.remove(&cancel.watch_id) else { return true };
            let cancelled = pb::WatchResponse {
                header: plane.header(plane.store.revision()),
                watch_id: cancel.watch_id,
                canceled: true,
                ..Default::default()
            };
            Outgoing::Cancel(registered.abort, cancelled)
        }
        Some(RequestUnion::ProgressRequest(_)) => {
            // Every watcher of the stream has delivered all events up to this revision.
            let current = plane.store.revision();
            let delivered =
                lock(watchers).registered.values().map(|registered| registered.delivered.load(Ordering::Relaxed)).min();
            let revision = delivered.unwrap_or(current).min(current);
            Outgoing::Response(pb::WatchResponse { header: plane.header(revision), watch_id: -1, ..Default::default() })
        }
        None => return true,
    };
    out.send(outgoing).await.is_ok()
}

/// What a watcher selects and how it reports.
struct Watcher {
    id: i64,
    key: Vec<u8>,
    range_end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

impl Watcher {
    fn selects(&self, event: &mvccpb::Event) -> bool {
        let Some(kv) = &event.kv else { return false };
        let is_put = event.r#type == mvccpb::event::EventType::Put as i32;
        if (is_put && self.no_put) || (!is_put && self.no_delete) {
            return false;
        }
        KeyRange { key: &self.key, end: &self.range_end }.contains(&kv.key)
    }

    fn select(&self, events: &[mvccpb::Event]) -> Vec<mvccpb::Event> {
        events
            .iter()
            .filter(|event| self.selects(event))
            .map(|event| mvccpb::Event {
                r#type: event.r#type,
                kv: event.kv.clone(),
                prev_kv: if self.prev_kv { event.prev_kv.clone() } else { None },
            })
            .collect()
    }
}

/// About how many bytes `event` takes in a response: its keys and values.
fn event_bytes(event: &mvccpb::Event) -> usize {
    [&event.kv, &event.prev_kv].into_iter().flatten().map(|kv| kv.key.len() + kv.value.len()).sum()
}

/// Registers a watcher and returns its `created` answer and its responses; an `Err` is
/// the response that refuses it.
fn create_watcher(
    plane: &Arc<Plane>,
    caller: &Caller,
    watchers: &Arc<Mutex<StreamWatchers>>,
    create: pb::WatchCreateRequest,
) -> Result<(pb::WatchResponse, WatcherStream), pb::WatchResponse> {
    use pb::watch_create_request::FilterType;
    let refuse = |watch_id: i64, reason: &str| pb::WatchResponse {
        header: plane.header(plane.store.revision()),
        watch_id,
        created: true,
        canceled: true,
        cancel_reason: reason.to_string(),
        ..Default::default()
    };
    let empty_range = !create.range_end.is_empty() && create.range_end != [0] && create.range_end <= create.key;
    if empty_range {
        return Err(refuse(-1, "mvcc: watcher range is empty"));
    }
    if let Err(refused) =
        plane.authorize(caller, |auth| auth.check(&caller.user, Access::Read, &create.key, &create.range_end))
    {
        return Err(refuse(create.watch_id, refused.message()));
    }
    let (abort, abort_registration) = AbortHandle::new_pair();
    // Subscribe before reading the current revision so no revision falls between.
    let live = plane.events.subscribe();
    let current = plane.store.revision();
    let start = if create.start_revision > 0 { create.start_revision } else { current + 1 };
    let delivered = Arc::new(AtomicI64::new(start - 1));
    let id = {
        let mut state = lock(watchers);
        let id = if create.watch_id != 0 {
            if state.registered.contains_key(&create.watch_id) {
                return Err(refuse(create.watch_id, "mvcc: watcher ID in use"));
            }
            create.watch_id
        } else {
            // As in etcd, an ID the plane chose is not chosen again on this stream.
            while state.registered.contains_key(&state.next_auto_id) {
                state.next_auto_id += 1;
            }
            state.next_auto_id += 1;
            state.next_auto_id - 1
        };
        state.registered.insert(id, Registered { abort, delivered: delivered.clone() });
        id
    };
    let watcher = Watcher {
        id,
        key: create.key,
        range_end: create.range_end,
        prev_kv: create.prev_kv,
        no_put: create.filters.contains(&(FilterType::Noput as i32)),
        no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
        progress_notify: create.progress_notify,
    };
    plane.metrics.watchers.inc();
    let registration = Registration { plane: plane.clone(), watchers: watchers.clone(), id, delivered };
    let interval = plane.config.watch_progress_notify_interval;
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    // A stream its client does not read is not polled; ticks missed meanwhile are one.
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let follower = WatcherFollower {
        plane: plane.clone(),
        registration,
        watcher,
        next: start,
        catching_up: true,
        live,
        progress,
        sent_since_progress: false,
    };
    let created =
        pb::WatchResponse { header: plane.header(current), watch_id: id, created: true, ..Default::default() };
    Ok((created, Abortable::new(Box::pin(follower.responses()), abort_registration)))
}

/// A watcher's place among its stream's watchers and in the plane's gauge, both given up
/// when its responses are dropped: when it ends, or its stream does.
struct Registration {
    plane: Arc<Plane>,
    watchers: Arc<Mutex<StreamWatchers>>,
    id: i64,
    delivered: Arc<AtomicI64>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.plane.metrics.watchers.dec();
        let mut state = lock(&self.watchers);
        if state.registered.get(&self.id).is_some_and(|registered| Arc::ptr_eq(&registered.delivered, &self.delivered))
        {
            state.registered.remove(&self.id);
        }
    }
}

/// How a watcher ended.
enum Stop {
    Compacted(i64),
    Failed(String),
}

/// One watcher's state between the responses it produces.
struct WatcherFollower {
    plane: Arc<Plane>,
    registration: Registration,
    watcher: Watcher,
    /// The first revision not yet delivered.
    next: i64,
    /// Reading the store's history (from the start, or after lagging) rather than
    /// following the event channel.
    catching_up: bool,
    live: broadcast::Receiver<Arc<capstan_raft::RevisionEvents>>,
    progress: tokio::time::Interval,
    sent_since_progress: bool,
}

impl WatcherFollower {
    /// The watcher's responses: what it selects as it happens, and a last one if it fails.
    fn responses(self) -> impl Stream<Item = pb::WatchResponse> + Send {
        futures::stream::unfold(Some(self), |follower| async move {
            let mut follower = follower?;
            match follower.produce().await {
                Ok(response) => Some((response, Some(follower))),
                Err(stop) => Some((follower.last_response(stop), None)),
            }
        })
    }

    /// The response that ends the watcher.
    fn last_response(&self, stop: Stop) -> pb::WatchResponse {
        let id = self.watcher.id;
        match stop {
            Stop::Compacted(compacted) => pb::WatchResponse {
                header: self.plane.header(self.plane.store.revision()),
                watch_id: id,
                canceled: true,
                compact_revision: compacted,
                cancel_reason: "etcdserver: mvcc: required revision has been compacted".into(),
                ..Default::default()
            },
            Stop::Failed(reason) => {
                tracing::error!(watch_id = id, %reason, "watcher failed");
                pb::WatchResponse { watch_id: id, canceled: true, cancel_reason: reason, ..Default::default() }
            }
        }
    }

    /// The next response with events (or a progress notification), from history while
    /// catching up, else from the event channel.
    async fn produce(&mut self) -> Result<pb::WatchResponse, Stop> {
        loop {
            if self.catching_up {
                if self.next > self.plane.store.revision() {
                    self.catching_up = false;
                    continue;
                }
                let store = self.plane.store.clone();
                let from = self.next;
                let page = tokio::task::spawn_blocking(move || store.events(from, HISTORY_PAGE_EVENTS))
                    .await
                    .map_err(|error| Stop::Failed(error.to_string()))?;
                let page = match page {
                    Ok(page) => page,
                    Err(StoreError::Compacted { compacted }) => return Err(Stop::Compacted(compacted)),
                    Err(error) => return Err(Stop::Failed(error.to_string())),
                };
                let events = self.watcher.select(&page.events);
                if let Some(response) = self.delivered(events, page.next_revision - 1) {
                    return Ok(response);
                }
                continue;
            }
            let batch = tokio::select! {
                batch = self.live.recv() => batch,
                _ = self.progress.tick(), if self.watcher.progress_notify => {
                    let idle = !self.sent_since_progress;
                    self.sent_since_progress = false;
                    if idle {
                        let header = self.plane.header(self.next - 1);
                        return Ok(pb::WatchResponse { header, watch_id: self.watcher.id, ..Default::default() });
                    }
                    continue;
                }
            };
            match batch {
                Ok(batch) if batch.revision < self.next => {}
                Ok(batch) if batch.revision == self.next => {
                    let (events, revision) = self.join_queued(self.watcher.select(&batch.events), batch.revision);
                    if let Some(response) = self.delivered(events, revision) {
                        self.sent_since_progress = true;
                        return Ok(response);
                    }
                }
                // A gap: a revision reached the store but not this receiver; read it.
                Ok(_) => self.catching_up = true,
                Err(broadcast::error::RecvError::Lagged(_)) => self.lagged(),
                Err(broadcast::error::RecvError::Closed) => return Err(Stop::Failed(status::STOPPED.into())),
            }
        }
    }

    /// `events`, selected up to `revision`, joined by what this watcher selects from the
    /// revisions right after it already queued on the event channel, up to
    /// [`JOINED_EVENT_BYTES_MAX`]; and the revision they reach. A Raft entry applies many
    /// revisions at once, so a busy watcher would otherwise send a response per revision,
    /// each with its own header and frame. etcd, too, sends a watcher that catches up
    /// the events of many revisions in one response. A gap or a lag in the channel ends
    /// the join and sends the watcher to history for what follows.
    fn join_queued(&mut self, mut events: Vec<mvccpb::Event>, mut revision: i64) -> (Vec<mvccpb::Event>, i64) {
        let mut bytes: usize = events.iter().map(event_bytes).sum();
        while bytes < JOINED_EVENT_BYTES_MAX {
            match self.live.try_recv() {
                Ok(batch) if batch.revision <= revision => {}
                Ok(batch) if batch.revision == revision + 1 => {
                    let selected = self.watcher.select(&batch.events);
                    bytes += selected.iter().map(event_bytes).sum::<usize>();
                    events.extend(selected);
                    revision = batch.revision;
                }
                Ok(_) => {
                    self.catching_up = true;
                    break;
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.lagged();
                    break;
                }
                Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed) => break,
            }
        }
        (events, revision)
    }

    /// The event channel dropped revisions before this watcher read them: it counts as a
    /// slow watcher and reads them from history.
    fn lagged(&mut self) {
        self.plane.metrics.slow_watchers.inc();
        self.catching_up = true;
    }

    /// Records `events` (possibly none) as delivered up to `revision`; the response that
    /// carries them, if there are any. The stream sends it at once, in the same poll.
    fn delivered(&mut self, events: Vec<mvccpb::Event>, revision: i64) -> Option<pb::WatchResponse> {
        self.next = revision + 1;
        self.registration.delivered.store(revision, Ordering::Relaxed);
        if events.is_empty() {
            return None;
        }
        self.plane.metrics.watch_events.inc_by(events.len() as u64);
        Some(pb::WatchResponse {
            header: self.plane.header(revision),
            watch_id: self.watcher.id,
            events,
            ..Default::default()
        })
    }
}
