//! The web dashboard, served by every plane on its HTTP listener beside `/metrics`: one
//! page (HTML, JavaScript and CSS compiled into the binary; nothing is fetched from
//! elsewhere) over a small JSON API, kept live by a server-sent event stream fed by the
//! store's own event channel.
//!
//! - `GET /api/cluster`: every plane with its role, term, indexes, size and alarms (this
//!   plane's from itself, the others' from their Maintenance Status).
//! - `GET /api/nodes`, `/api/pods`, `/api/replicasets`: one page of rows, filtered and
//!   counted on the server (`q`, `namespace`, `node`, `offset`, `limit`), read after a
//!   linearizable barrier, so a plane without quorum answers 503 rather than stale rows.
//! - `GET /api/nodes/{name}`, `/api/pods/{namespace}/{name}`: one object, 404 if none.
//! - `GET /api/events`: an event per change under `/registry/` (kind, key, revision), for
//!   the page to fetch again what it shows; `resync` when this stream fell behind.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use capstan_proto::etcdserverpb as pb;
use capstan_proto::objects::{self, Kind, Object, Pod, REGISTRY_PREFIX};

use super::Plane;

/// Rows in one page unless the page asks for fewer.
const PAGE_ROWS_DEFAULT: usize = 100;
const PAGE_ROWS_MAX: usize = 1000;
/// How long the API waits to confirm it serves current data before it says it cannot.
const BARRIER_TIMEOUT_MS: u64 = 2_000;
/// The end of a pod's log the detail page shows.
const LOG_TAIL_BYTES: usize = 16 * 1024;
/// How long another plane (or a node's agent) may take to answer.
const PEER_STATUS_TIMEOUT_MS: u64 = 1_000;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// The dashboard's routes, merged into the plane's HTTP listener.
pub fn router(plane: Arc<Plane>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .route("/dashboard.css", get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }))
        .route("/api/cluster", get(cluster))
        .route("/api/nodes", get(nodes))
        .route("/api/pods", get(pods))
        .route("/api/replicasets", get(replicasets))
        .route("/api/nodes/{name}", get(node))
        .route("/api/pods/{namespace}/{name}", get(pod))
        .route("/api/events", get(events))
        .with_state(plane)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

/// The filter and the page a list asks for.
#[derive(Deserialize, Default)]
struct ListQuery {
    /// Rows whose name (or namespace/name) contains this.
    #[serde(default)]
    q: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

impl ListQuery {
    fn matches(&self, meta: &objects::ObjectMeta) -> bool {
        let qualified = format!("{}/{}", meta.namespace, meta.name);
        (self.q.is_empty() || qualified.contains(&self.q))
            && (self.namespace.is_empty() || meta.namespace == self.namespace)
    }

    /// One page of `rows`, with the count of every row that matched.
    fn page(&self, rows: Vec<Value>, revision: i64) -> Response {
        let limit = self.limit.unwrap_or(PAGE_ROWS_DEFAULT).clamp(1, PAGE_ROWS_MAX);
        let total = rows.len();
        let items: Vec<Value> = rows.into_iter().skip(self.offset).take(limit).collect();
        Json(json!({ "revision": revision, "total": total, "offset": self.offset, "items": items })).into_response()
    }
}

/// Every object under `/registry/`, as of a revision that includes every write
/// acknowledged before the call; an error response when this plane cannot promise that.
async fn read_objects(plane: &Plane, prefix: &str) -> Result<(Vec<Object>, i64), Response> {
    let barrier = tokio::time::timeout(Duration::from_millis(BARRIER_TIMEOUT_MS), plane.linearizable_barrier());
    match barrier.await {
        Ok(Ok(())) => {}
        Ok(Err(status)) => {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, format!("no current data: {}", status.message())))
        }
        Err(_) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no current data: the cluster has no leader this plane can reach (quorum lost?)".into(),
            ))
        }
    }
    let request = pb::RangeRequest {
        key: prefix.as_bytes().to_vec(),
        range_end: capstan_client::prefix_end(prefix.as_bytes()),
        serializable: true,
        ..Default::default()
    };
    let store = plane.store.clone();
    let listed = tokio::task::spawn_blocking(move || store.range(&request))
        .await
        .map_err(|join| error(StatusCode::INTERNAL_SERVER_ERROR, join.to_string()))?
        .map_err(|store| error(StatusCode::SERVICE_UNAVAILABLE, store.to_string()))?;
    let revision = listed.header.as_ref().map_or(0, |header| header.revision);
    // Values other clients wrote may not decode; the dashboard shows what does.
    let decoded = listed.kvs.iter().filter_map(|kv| objects::decode_stored(&kv.key, &kv.value, kv.mod_revision).ok());
    Ok((decoded.collect(), revision))
}

fn pods_of(objects: &[Object]) -> impl Iterator<Item = &Pod> {
    objects.iter().filter_map(|object| match object {
        Object::Pod(pod) => Some(pod),
        _ => None,
    })
}

/// What the pods bound to each node request (pods that finished hold nothing).
fn allocated(objects: &[Object]) -> BTreeMap<&str, (i64, i64, i64)> {
    let mut allocated: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for pod in pods_of(objects).filter(|pod| !pod.spec.node_name.is_empty() && !pod.status.phase.is_terminal()) {
        let requests = pod.requests();
        let entry = allocated.entry(pod.spec.node_name.as_str()).or_default();
        entry.0 += requests.cpu_millis;
        entry.1 += requests.memory_bytes;
        entry.2 += 1;
    }
    allocated
}

fn node_row(node: &objects::Node, allocated: (i64, i64, i64)) -> Value {
    let allocatable = |resource: &str, milli: bool| {
        node.allocatable(resource)
            .and_then(|quantity| if milli { quantity.milli_value() } else { quantity.value() }.ok())
            .unwrap_or(0)
    };
    let ready = objects::condition(&node.status.conditions, objects::NODE_READY);
    json!({
        "name": node.metadata.name,
        "ready": node.is_ready(),
        "readyReason": ready.map(|ready| ready.reason.clone()).unwrap_or_default(),
        "lastHeartbeat": ready.map(|ready| ready.last_heartbeat_time.clone()).unwrap_or_default(),
        "unschedulable": node.spec.unschedulable,
        "taints": node.spec.taints.iter().map(|taint| format!("{}={}:{:?}", taint.key, taint.value, taint.effect)).collect::<Vec<_>>(),
        "cpu": { "used": allocated.0, "allocatable": allocatable("cpu", true) },
        "memory": { "used": allocated.1, "allocatable": allocatable("memory", false) },
        "pods": { "used": allocated.2, "allocatable": allocatable("pods", false) },
    })
}

fn pod_row(pod: &Pod) -> Value {
    let restarts: i32 = pod.status.container_statuses.iter().map(|status| status.restart_count).sum();
    let unschedulable = objects::condition(&pod.status.conditions, objects::POD_SCHEDULED)
        .filter(|scheduled| scheduled.status != objects::CONDITION_TRUE)
        .map(|scheduled| scheduled.message.clone())
        .unwrap_or_default();
    json!({
        "namespace": pod.metadata.namespace,
        "name": pod.metadata.name,
        "node": pod.spec.node_name,
        "phase": pod.status.phase.name(),
        "restarts": restarts,
        "created": pod.metadata.creation_timestamp,
        "reason": pod.status.reason,
        "unschedulable": unschedulable,
    })
}

async fn nodes(State(plane): State<Arc<Plane>>, Query(query): Query<ListQuery>) -> Result<Response, Response> {
    let (objects, revision) = read_objects(&plane, REGISTRY_PREFIX).await?;
    let allocated = allocated(&objects);
    let rows = objects
        .iter()
        .filter_map(|object| match object {
            Object::Node(node) if query.matches(&node.metadata) => {
                Some(node_row(node, allocated.get(node.metadata.name.as_str()).copied().unwrap_or_default()))
            }
            _ => None,
        })
        .collect();
    Ok(query.page(rows, revision))
}

async fn pods(State(plane): State<Arc<Plane>>, Query(query): Query<ListQuery>) -> Result<Response, Response> {
    let (objects, revision) = read_objects(&plane, &Kind::Pod.prefix()).await?;
    let rows = pods_of(&objects)
        .filter(|pod| query.matches(&pod.metadata) && (query.node.is_empty() || pod.spec.node_name == query.node))
        .map(pod_row)
        .collect();
    Ok(query.page(rows, revision))
}

async fn replicasets(State(plane): State<Arc<Plane>>, Query(query): Query<ListQuery>) -> Result<Response, Response> {
    let (objects, revision) = read_objects(&plane, &Kind::ReplicaSet.prefix()).await?;
    let rows = objects
        .iter()
        .filter_map(|object| match object {
            Object::ReplicaSet(set) if query.matches(&set.metadata) => Some(json!({
                "namespace": set.metadata.namespace,
                "name": set.metadata.name,
                "desired": set.spec.replicas,
                "current": set.status.replicas,
                "ready": set.status.ready_replicas,
            })),
            _ => None,
        })
        .collect();
    Ok(query.page(rows, revision))
}

async fn node(State(plane): State<Arc<Plane>>, Path(name): Path<String>) -> Result<Response, Response> {
    let (objects, revision) = read_objects(&plane, REGISTRY_PREFIX).await?;
    let found = objects.iter().find_map(|object| match object {
        Object::Node(node) if node.metadata.name == name => Some(node),
        _ => None,
    });
    let Some(node) = found else {
        return Err(error(StatusCode::NOT_FOUND, format!("node {name:?} not found")));
    };
    let allocated = allocated(&objects).get(name.as_str()).copied().unwrap_or_default();
    let pods: Vec<Value> = pods_of(&objects).filter(|pod| pod.spec.node_name == name).map(pod_row).collect();
    Ok(Json(json!({ "revision": revision, "summary": node_row(node, allocated), "object": node, "pods": pods }))
        .into_response())
}

async fn pod(
    State(plane): State<Arc<Plane>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, Response> {
    let (objects, revision) = read_objects(&plane, &Kind::Pod.namespace_prefix(&namespace)).await?;
    let Some(pod) = pods_of(&objects).find(|pod| pod.metadata.name == name).cloned() else {
        return Err(error(StatusCode::NOT_FOUND, format!("pod {namespace}/{name} not found")));
    };
    let logs = match pod.spec.node_name.as_str() {
        "" => Err("not bound to a node yet".to_string()),
        node => log_tail(&plane, node, &pod).await,
    };
    let logs = match logs {
        Ok(tail) => json!({ "tail": tail }),
        Err(reason) => json!({ "unavailable": reason }),
    };
    Ok(Json(json!({ "revision": revision, "summary": pod_row(&pod), "object": pod, "logs": logs })).into_response())
}

/// The last [`LOG_TAIL_BYTES`] of the pod's first container's log, from its node's agent.
async fn log_tail(plane: &Plane, node_name: &str, pod: &Pod) -> Result<String, String> {
    let (objects, _) =
        read_objects(plane, &Kind::Node.key("", node_name)).await.map_err(|_| "no current data".to_string())?;
    let node = objects.iter().find_map(|object| match object {
        Object::Node(node) if node.metadata.name == node_name => Some(node),
        _ => None,
    });
    let url = node.and_then(objects::Node::log_url).ok_or("the node advertises no log endpoint")?;
    let request = capstan_proto::agentpb::LogsRequest {
        namespace: pod.metadata.namespace.clone(),
        pod: pod.metadata.name.clone(),
        container: String::new(),
        follow: false,
    };
    let fetch = async {
        let mut client = capstan_proto::agentpb::pod_logs_client::PodLogsClient::connect(url.clone())
            .await
            .map_err(|error| format!("cannot reach the agent at {url}: {error}"))?;
        let mut stream = client.logs(request).await.map_err(|status| status.message().to_string())?.into_inner();
        let mut tail: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(|status| status.message().to_string())? {
            tail.extend_from_slice(&chunk.data);
            let excess = tail.len().saturating_sub(LOG_TAIL_BYTES);
            tail.drain(..excess);
        }
        Ok::<_, String>(String::from_utf8_lossy(&tail).into_owned())
    };
    tokio::time::timeout(Duration::from_millis(PEER_STATUS_TIMEOUT_MS), fetch)
        .await
        .map_err(|_| "the agent did not answer in time".to_string())?
}

async fn cluster(State(plane): State<Arc<Plane>>) -> Response {
    let metrics = plane.raft.metrics().borrow().clone();
    let leader = metrics.current_leader;
    let mut planes = Vec::new();
    let mut members = plane.members();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    for member in members {
        let mut row = json!({
            "id": format!("{:x}", member.id),
            "name": member.name,
            "clientUrls": member.client_ur_ls,
            "learner": member.is_learner,
            "leader": Some(member.id) == leader,
            "self": member.id == plane.node_id,
        });
        let status = if member.id == plane.node_id {
            Ok(json!({
                "term": metrics.current_term,
                "raftIndex": metrics.last_log_index.unwrap_or(0),
                "appliedIndex": metrics.last_applied.map_or(0, |id| id.index),
                "dbSize": plane.store.size_bytes(),
                "alarms": plane.alarm_members().iter().map(|_| "NOSPACE").collect::<Vec<_>>(),
            }))
        } else {
            peer_status(&plane, &member.client_ur_ls).await
        };
        match status {
            Ok(status) => row["status"] = status,
            Err(reason) => row["unreachable"] = Value::String(reason),
        }
        planes.push(row);
    }
    Json(json!({
        "leader": leader.map(|leader| format!("{leader:x}")),
        "revision": plane.store.revision(),
        "planes": planes,
    }))
    .into_response()
}

/// Another plane's Maintenance Status, asked over its client URL as any client would.
async fn peer_status(plane: &Plane, urls: &[String]) -> Result<Value, String> {
    let credentials = plane.config.client_tls.as_ref().map(crate::tls::ServerTls::as_client).unwrap_or_default();
    let timeout = Duration::from_millis(PEER_STATUS_TIMEOUT_MS);
    let asked = async {
        let mut client = capstan_client::connect_with(urls, timeout, &credentials).await.map_err(|e| e.to_string())?;
        client.status().await.map_err(|error| error.to_string())
    };
    let status = tokio::time::timeout(timeout, asked).await.map_err(|_| "did not answer in time".to_string())??;
    Ok(json!({
        "term": status.raft_term(),
        "raftIndex": status.raft_index(),
        "appliedIndex": status.raft_applied_index(),
        "dbSize": status.db_size(),
        "alarms": status.errors(),
    }))
}

/// Server-sent events: one per change under `/registry/`, from the store's event channel.
async fn events(State(plane): State<Arc<Plane>>) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let mut changes = plane.events.subscribe();
    let stopping = plane.stopping();
    let stream = async_stream(move |sender| async move {
        tokio::pin!(stopping);
        loop {
            let received = tokio::select! {
                received = changes.recv() => received,
                () = &mut stopping => return,
            };
            let batch = match received {
                Ok(batch) => batch,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if sender.send(Event::default().event("resync").data("{}")).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for event in &batch.events {
                let Some(kv) = &event.kv else { continue };
                let Some(kind) = Kind::of_key(&kv.key) else { continue };
                let data = json!({
                    "kind": kind.name(),
                    "key": String::from_utf8_lossy(&kv.key),
                    "type": if event.r#type == 0 { "PUT" } else { "DELETE" },
                    "revision": batch.revision,
                });
                if sender.send(Event::default().event("change").data(data.to_string())).await.is_err() {
                    return;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A stream fed by `produce` through a bounded channel, ending when `produce` returns or
/// the reader goes away.
fn async_stream<F, Fut>(produce: F) -> impl futures::Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(EVENTS_BUFFERED_MAX);
    tokio::spawn(produce(sender));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(receiver), Ok)
}

/// Events buffered per page before the page is too slow and the stream waits.
const EVENTS_BUFFERED_MAX: usize = 256;
