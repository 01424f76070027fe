//! etcd's Watch service.
//!
//! Each gRPC stream has a reader task (create, cancel, progress requests) and one task per
//! watcher. A watcher first replays the store's history from its start revision, then
//! follows the event channel the state machine feeds. Writes never wait for watchers: a
//! watcher that falls behind the bounded channel is told it lagged and goes back to
//! reading history, so it catches up without losing an event. A watcher whose start
//! revision was compacted is cancelled with the compact revision, as in etcd.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use capstan_proto::etcdserverpb::{self as pb, watch_server::Watch};
use capstan_proto::mvccpb;
use capstan_store::{Access, KeyRange, StoreError};

use super::auth::Caller;
use super::Plane;

/// Responses buffered per stream before watchers wait for the client to read.
const STREAM_RESPONSES_MAX: usize = 1024;
/// Events read from history per page while a watcher catches up.
const HISTORY_PAGE_EVENTS: usize = 1000;

pub struct WatchService(pub Arc<Plane>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// The watchers of one stream: how to cancel each, and how far each has delivered.
#[derive(Default)]
struct StreamWatchers {
    cancels: HashMap<i64, oneshot::Sender<()>>,
    /// The newest revision each watcher has delivered everything up to.
    delivered: HashMap<i64, i64>,
    next_auto_id: i64,
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
        let (out, responses) = mpsc::channel(STREAM_RESPONSES_MAX);
        let plane = self.0.clone();
        tokio::spawn(async move {
            let watchers = Arc::new(Mutex::new(StreamWatchers::default()));
            let stopping = plane.stopping();
            tokio::pin!(stopping);
            loop {
                let next = tokio::select! {
                    next = incoming.next() => next,
                    () = &mut stopping => None,
                };
                let Some(Ok(request)) = next else { break };
                if !handle_request(&plane, &caller, &watchers, &out, request).await {
                    break;
                }
            }
            // The client went away or the plane stops: stop every watcher of this stream.
            let cancels: Vec<_> = lock(&watchers).cancels.drain().collect();
            for (_, cancel) in cancels {
                let _ = cancel.send(());
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(responses))))
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
    out: &mpsc::Sender<Result<pb::WatchResponse, Status>>,
    request: pb::WatchRequest,
) -> bool {
    use pb::watch_request::RequestUnion;
    let response = match request.request_union {
        Some(RequestUnion::CreateRequest(create)) => match create_watcher(plane, caller, watchers, out, create) {
            Ok(()) => return true,
            Err(response) => response,
        },
        Some(RequestUnion::CancelRequest(cancel)) => {
            let mut state = lock(watchers);
            state.delivered.remove(&cancel.watch_id);
            match state.cancels.remove(&cancel.watch_id) {
                Some(stop) => {
                    let _ = stop.send(());
                    pb::WatchResponse {
                        header: plane.header(plane.store.revision()),
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    }
                }
                // etcd ignores a cancel of an unknown watcher.
                None => return true,
            }
        }
        Some(RequestUnion::ProgressRequest(_)) => {
            // Every watcher of the stream has delivered all events up to this revision.
            let current = plane.store.revision();
            let revision = lock(watchers).delivered.values().copied().min().unwrap_or(current).min(current);
            pb::WatchResponse { header: plane.header(revision), watch_id: -1, ..Default::default() }
        }
        None => return true,
    };
    out.send(Ok(response)).await.is_ok()
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
            .map(|event| {
                let mut event = event.clone();
                if !self.prev_kv {
                    event.prev_kv = None;
                }
                event
            })
            .collect()
    }
}

/// Registers a watcher and starts its task; an `Err` is the response that refuses it.
fn create_watcher(
    plane: &Arc<Plane>,
    caller: &Caller,
    watchers: &Arc<Mutex<StreamWatchers>>,
    out: &mpsc::Sender<Result<pb::WatchResponse, Status>>,
    create: pb::WatchCreateRequest,
) -> Result<(), pb::WatchResponse> {
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
    let (stop, stopped) = oneshot::channel();
    let id = {
        let mut state = lock(watchers);
        let id = if create.watch_id != 0 {
            if state.cancels.contains_key(&create.watch_id) {
                return Err(refuse(create.watch_id, "mvcc: watcher ID in use"));
            }
            create.watch_id
        } else {
            while state.cancels.contains_key(&state.next_auto_id) {
                state.next_auto_id += 1;
            }
            state.next_auto_id
        };
        state.cancels.insert(id, stop);
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
    // Subscribe before reading the current revision so no revision falls between.
    let live = plane.events.subscribe();
    let current = plane.store.revision();
    let start = if create.start_revision > 0 { create.start_revision } else { current + 1 };
    lock(watchers).delivered.insert(id, start - 1);
    let task = WatcherTask { plane: plane.clone(), watchers: watchers.clone(), out: out.clone(), watcher, next: start };
    tokio::spawn(task.run(live, stopped));
    Ok(())
}

struct WatcherTask {
    plane: Arc<Plane>,
    watchers: Arc<Mutex<StreamWatchers>>,
    out: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    watcher: Watcher,
    /// The first revision not yet delivered.
    next: i64,
}

/// Why a watcher stopped.
enum Stop {
    Cancelled,
    ClientGone,
    Compacted(i64),
    Failed(String),
}

impl WatcherTask {
    async fn run(
        mut self,
        mut live: broadcast::Receiver<Arc<capstan_raft::RevisionEvents>>,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let created = pb::WatchResponse {
            header: self.plane.header(self.plane.store.revision()),
            watch_id: self.watcher.id,
            created: true,
            ..Default::default()
        };
        if self.out.send(Ok(created)).await.is_err() {
            return;
        }
        let watchers = self.plane.metrics.watchers.clone();
        watchers.inc();
        let stop = tokio::select! {
            stop = self.follow(&mut live) => stop,
            _ = &mut stopped => Stop::Cancelled,
        };
        watchers.dec();
        let id = self.watcher.id;
        match stop {
            Stop::Cancelled | Stop::ClientGone => {}
            Stop::Compacted(compacted) => {
                let _ = self
                    .out
                    .send(Ok(pb::WatchResponse {
                        header: self.plane.header(self.plane.store.revision()),
                        watch_id: id,
                        canceled: true,
                        compact_revision: compacted,
                        cancel_reason: "etcdserver: mvcc: required revision has been compacted".into(),
                        ..Default::default()
                    }))
                    .await;
            }
            Stop::Failed(reason) => {
                tracing::error!(watch_id = id, %reason, "watcher failed");
                let _ = self
                    .out
                    .send(Ok(pb::WatchResponse {
                        watch_id: id,
                        canceled: true,
                        cancel_reason: reason,
                        ..Default::default()
                    }))
                    .await;
            }
        }
        let mut state = lock(&self.watchers);
        state.cancels.remove(&id);
        state.delivered.remove(&id);
    }

    /// Catches up from history, then follows the live channel; returns when it must stop.
    async fn follow(&mut self, live: &mut broadcast::Receiver<Arc<capstan_raft::RevisionEvents>>) -> Stop {
        let interval = self.plane.config.watch_progress_notify_interval;
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut sent_since_progress = false;
        loop {
            if let Err(stop) = self.catch_up().await {
                return stop;
            }
            loop {
                let batch = tokio::select! {
                    batch = live.recv() => batch,
                    _ = progress.tick(), if self.watcher.progress_notify => {
                        if !sent_since_progress {
                            let header = self.plane.header(self.next - 1);
                            let notify = pb::WatchResponse { header, watch_id: self.watcher.id, ..Default::default() };
                            if self.out.send(Ok(notify)).await.is_err() {
                                return Stop::ClientGone;
                            }
                        }
                        sent_since_progress = false;
                        continue;
                    }
                };
                match batch {
                    Ok(batch) if batch.revision < self.next => continue,
                    Ok(batch) if batch.revision == self.next => {
                        let events = self.watcher.select(&batch.events);
                        if !events.is_empty() {
                            sent_since_progress = true;
                        }
                        if let Err(stop) = self.deliver(events, batch.revision).await {
                            return stop;
                        }
                    }
                    // A gap: a revision reached the store but not this receiver; read it.
                    Ok(_) => break,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.plane.metrics.slow_watchers.inc();
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Stop::Failed("etcdserver: server stopped".into())
                    }
                }
            }
        }
    }

    /// Sends `events` (possibly none) as delivered up to `revision`.
    async fn deliver(&mut self, events: Vec<mvccpb::Event>, revision: i64) -> Result<(), Stop> {
        if !events.is_empty() {
            self.plane.metrics.watch_events.inc_by(events.len() as u64);
            let response = pb::WatchResponse {
                header: self.plane.header(revision),
                watch_id: self.watcher.id,
                events,
                ..Default::default()
            };
            self.out.send(Ok(response)).await.map_err(|_| Stop::ClientGone)?;
        }
        self.next = revision + 1;
        lock(&self.watchers).delivered.insert(self.watcher.id, revision);
        Ok(())
    }

    /// Delivers every stored revision from `next` up to the store's current one.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        while self.next <= self.plane.store.revision() {
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
            let delivered_up_to = page.next_revision - 1;
            if events.is_empty() {
                self.next = page.next_revision;
                lock(&self.watchers).delivered.insert(self.watcher.id, delivered_up_to);
                continue;
            }
            self.deliver(events, delivered_up_to).await?;
        }
        Ok(())
    }
}
