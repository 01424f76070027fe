//! The web dashboard, served by every plane on its HTTP listener beside `/metrics`: one
//! page (HTML, JavaScript and CSS compiled into the binary; nothing is fetched from
//! elsewhere) over a small JSON API, kept live by a server-sent event stream fed by the
//! store's own event channel.
//!
//! - `GET /api/cluster`: every plane with its role, term, indexes, size and alarms (this
//!   plane's from itself, the others' from their Maintenance Status).
//! - `GET /api/nodes`, `/api/pods`, `/api/replicasets`: one page of rows, filtered and
//!   counted on the server (`q`, `namespace`, `node`, `offset`, `limit`) from the
//!   dashboard's copy of the store ([`cache`]), read after a linearizable barrier, so a
//!   plane without quorum answers 503 rather than stale rows. Node rows carry the age of
//!   their lease, from the leader.
//! - `GET /api/nodes/{name}`, `/api/pods/{namespace}/{name}`: one object, 404 if none; a
//!   pod with its events ([`timeline`]) and the tail of its log.
//! - `GET /api/events`: an event per change of an object or a node lease (kind, key,
//!   revision), for the page to fetch again what it shows; `resync` when this stream fell
//!   behind.
//! - `GET|POST|DELETE /api/session`: who is looking; sign in (etcd's Authenticate, the
//!   token kept in an HttpOnly cookie) and out. With auth on, every other call needs a
//!   session and shows only what its user may read; with auth off anyone sees everything.

mod cache;
mod timeline;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use capstan_proto::etcdserverpb as pb;
use capstan_proto::objects::{self, Kind, Object, Pod};
use capstan_store::{Access, AuthState};

use self::cache::{ObjectCache, Objects};
use super::Plane;

/// Rows in one page unless the page asks for fewer.
const PAGE_ROWS_DEFAULT: usize = 100;
const PAGE_ROWS_MAX: usize = 1000;
/// How long the API waits to confirm it serves current data before it says it cannot.
const BARRIER_TIMEOUT_MS: u64 = 2_000;
/// How long a read waits for the dashboard's copy to hold what the barrier covers (its
/// first list of a large store takes a while).
const CACHE_TIMEOUT_MS: u64 = 30_000;
/// The end of a pod's log the detail page shows.
const LOG_TAIL_BYTES: usize = 16 * 1024;
/// How long another plane (or a node's agent) may take to answer.
const PEER_STATUS_TIMEOUT_MS: u64 = 1_000;
/// The cookie that holds a signed-in user's token.
const SESSION_COOKIE: &str = "capstan-session";

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

struct Dashboard {
    plane: Arc<Plane>,
    cache: Arc<ObjectCache>,
}

/// The dashboard's routes, merged into the plane's HTTP listener.
pub fn router(plane: Arc<Plane>) -> axum::Router {
    use axum::routing::get;
    let dashboard = Arc::new(Dashboard { plane, cache: Arc::default() });
    axum::Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .route("/dashboard.css", get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }))
        .route("/api/session", get(session).post(sign_in).delete(sign_out))
        .route("/api/cluster", get(cluster))
        .route("/api/nodes", get(nodes))
        .route("/api/pods", get(pods))
        .route("/api/replicasets", get(replicasets))
        .route("/api/nodes/{name}", get(node))
        .route("/api/pods/{namespace}/{name}", get(pod))
        .route("/api/events", get(events))
        .with_state(dashboard)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// An API call's failure: its status and, as `{"error": ...}`, why.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn error(code: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(code, message.into())
}

/// Who is looking: a signed-in user, or anyone (`None`) when auth is off; with the auth
/// state the viewer's reads are checked against.
struct Viewer {
    user: Option<String>,
    auth: Arc<AuthState>,
}

impl Viewer {
    fn may_read(&self, key: &[u8]) -> bool {
        self.user.as_ref().is_none_or(|user| self.auth.check(user, Access::Read, key, &[]).is_ok())
    }

    /// 403 unless the viewer may read `key`, whether or not it exists, so the answer
    /// reveals nothing of what the viewer may not read.
    fn require_read(&self, key: &str) -> Result<(), ApiError> {
        match self.may_read(key.as_bytes()) {
            true => Ok(()),
            false => Err(error(StatusCode::FORBIDDEN, "etcdserver: permission denied")),
        }
    }

    /// The objects of `kind` (in `namespace`, unless empty) the viewer may read.
    fn readable<'a>(
        &'a self,
        objects: &'a Objects,
        kind: Kind,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Object> {
        objects.of_kind(kind, namespace).filter(|(key, _)| self.may_read(key)).map(|(_, object)| object)
    }
}

fn session_token(headers: &HeaderMap) -> Option<&str> {
    let cookies = headers.get_all(header::COOKIE).into_iter().filter_map(|value| value.to_str().ok());
    cookies
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
}

fn session_cookie(token: &str, max_age_secs: u64) -> String {
    format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}")
}

impl Dashboard {
    /// The viewer of a request; 401 when auth is on and the request has no valid session.
    fn viewer(&self, headers: &HeaderMap) -> Result<Viewer, ApiError> {
        let auth = self.plane.store.auth();
        if !auth.enabled {
            return Ok(Viewer { user: None, auth });
        }
        let user = session_token(headers).and_then(|token| self.plane.token_user(token));
        match user {
            Some(user) => Ok(Viewer { user: Some(user), auth }),
            None => Err(error(StatusCode::UNAUTHORIZED, "auth is enabled: sign in")),
        }
    }

    /// Runs `view` over the objects as of a revision that includes every write
    /// acknowledged before the call; an error response when this plane cannot promise that.
    async fn read<R>(&self, view: impl FnOnce(&Objects) -> R) -> Result<R, ApiError> {
        let barrier =
            tokio::time::timeout(Duration::from_millis(BARRIER_TIMEOUT_MS), self.plane.linearizable_barrier());
        match barrier.await {
            Ok(Ok(())) => {}
            Ok(Err(status)) => {
                return Err(error(StatusCode::SERVICE_UNAVAILABLE, format!("no current data: {}", status.message())))
            }
            Err(_) => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no current data: the cluster has no leader this plane can reach (quorum lost?)",
                ))
            }
        }
        let revision = self.plane.store.revision();
        let timeout = Duration::from_millis(CACHE_TIMEOUT_MS);
        self.cache.read(&self.plane, revision, timeout, view).await.ok_or_else(|| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no current data: the dashboard has not caught up to revision {revision}"),
            )
        })
    }
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
    /// Whether an object passes the filter; the `namespace/name` string is made only when
    /// there is a `q` to look for (lists walk every object of a kind).
    fn matches(&self, meta: &objects::ObjectMeta) -> bool {
        (self.namespace.is_empty() || meta.namespace == self.namespace)
            && (self.q.is_empty() || format!("{}/{}", meta.namespace, meta.name).contains(&self.q))
    }

    /// One page of `rows` (each made into JSON by `row` only if it is on the page), with
    /// the count of every row.
    fn page<T>(&self, rows: impl Iterator<Item = T>, revision: i64, mut row: impl FnMut(T) -> Value) -> Value {
        let limit = self.limit.unwrap_or(PAGE_ROWS_DEFAULT).clamp(1, PAGE_ROWS_MAX);
        let mut total = 0;
        let mut items = Vec::new();
        for item in rows {
            if total >= self.offset && items.len() < limit {
                items.push(row(item));
            }
            total += 1;
        }
        json!({ "revision": revision, "total": total, "offset": self.offset, "items": items })
    }
}

fn pods_of<'a>(objects: impl Iterator<Item = &'a Object>) -> impl Iterator<Item = &'a Pod> {
    objects.filter_map(|object| match object {
        Object::Pod(pod) => Some(pod),
        _ => None,
    })
}

/// What the pods bound to each node request (pods that finished hold nothing).
fn allocated<'a>(pods: impl Iterator<Item = &'a Pod>) -> BTreeMap<&'a str, (i64, i64, i64)> {
    let mut allocated: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for pod in pods.filter(|pod| !pod.spec.node_name.is_empty() && !pod.status.phase.is_terminal()) {
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
        "readySince": ready.map(|ready| ready.last_transition_time.clone()).unwrap_or_default(),
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

impl Dashboard {
    /// Each row's node lease: how long ago its agent renewed it and its TTL, from the
    /// leader (`null`: the node holds no lease, so its agent is gone).
    async fn add_lease_ages(&self, rows: &mut [Value], leases: Vec<Option<i64>>) {
        let asked = leases.into_iter().map(|lease| async move {
            let id = lease?;
            let request = pb::LeaseTimeToLiveRequest { id, keys: false };
            let lease = self.plane.time_to_live(request).await.ok().filter(|lease| lease.ttl >= 0)?;
            Some(json!({ "renewedSecondsAgo": lease.granted_ttl - lease.ttl, "ttl": lease.granted_ttl }))
        });
        for (row, lease) in rows.iter_mut().zip(futures::future::join_all(asked).await) {
            row["lease"] = lease.unwrap_or(Value::Null);
        }
    }
}

async fn nodes(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let viewer = dashboard.viewer(&headers)?;
    let (mut page, leases) = dashboard
        .read(|objects| {
            let allocated = allocated(pods_of(viewer.readable(objects, Kind::Pod, "")));
            let nodes = viewer.readable(objects, Kind::Node, "").filter_map(|object| match object {
                Object::Node(node) if query.matches(&node.metadata) => Some(node),
                _ => None,
            });
            let mut leases = Vec::new();
            let page = query.page(nodes, objects.revision, |node| {
                leases.push(objects.node_leases.get(&node.metadata.name).copied());
                node_row(node, allocated.get(node.metadata.name.as_str()).copied().unwrap_or_default())
            });
            (page, leases)
        })
        .await?;
    if let Some(rows) = page["items"].as_array_mut() {
        dashboard.add_lease_ages(rows, leases).await;
    }
    Ok(Json(page).into_response())
}

async fn pods(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let viewer = dashboard.viewer(&headers)?;
    let page = dashboard
        .read(|objects| {
            let pods = pods_of(viewer.readable(objects, Kind::Pod, &query.namespace)).filter(|pod| {
                query.matches(&pod.metadata) && (query.node.is_empty() || pod.spec.node_name == query.node)
            });
            query.page(pods, objects.revision, pod_row)
        })
        .await?;
    Ok(Json(page).into_response())
}

async fn replicasets(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let viewer = dashboard.viewer(&headers)?;
    let page = dashboard
        .read(|objects| {
            let sets = viewer.readable(objects, Kind::ReplicaSet, &query.namespace).filter_map(|object| match object {
                Object::ReplicaSet(set) if query.matches(&set.metadata) => Some(set),
                _ => None,
            });
            query.page(sets, objects.revision, |set| {
                json!({
                    "namespace": set.metadata.namespace,
                    "name": set.metadata.name,
                    "desired": set.spec.replicas,
                    "current": set.status.replicas,
                    "ready": set.status.ready_replicas,
                })
            })
        })
        .await?;
    Ok(Json(page).into_response())
}

async fn node(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let viewer = dashboard.viewer(&headers)?;
    let key = Kind::Node.key("", &name);
    viewer.require_read(&key)?;
    let found = dashboard
        .read(|objects| {
            let Some(Object::Node(node)) = objects.get(&key) else { return None };
            let on_node: Vec<&Pod> =
                pods_of(viewer.readable(objects, Kind::Pod, "")).filter(|pod| pod.spec.node_name == name).collect();
            let allocated = allocated(on_node.iter().copied()).get(name.as_str()).copied().unwrap_or_default();
            let pods: Vec<Value> = on_node.into_iter().map(pod_row).collect();
            let lease = objects.node_leases.get(&name).copied();
            Some((json!({ "revision": objects.revision, "summary": node_row(node, allocated), "object": node, "pods": pods }), lease))
        })
        .await?;
    let Some((mut detail, lease)) = found else {
        return Err(error(StatusCode::NOT_FOUND, format!("node {name:?} not found")));
    };
    dashboard.add_lease_ages(std::slice::from_mut(&mut detail["summary"]), vec![lease]).await;
    Ok(Json(detail).into_response())
}

async fn pod(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let viewer = dashboard.viewer(&headers)?;
    let key = Kind::Pod.key(&namespace, &name);
    viewer.require_read(&key)?;
    let found = dashboard
        .read(|objects| match objects.get(&key) {
            Some(Object::Pod(pod)) => {
                let node = objects.get(&Kind::Node.key("", &pod.spec.node_name));
                let log_url = match node {
                    Some(Object::Node(node)) => node.log_url(),
                    _ => None,
                };
                Some((pod.clone(), log_url, objects.revision))
            }
            _ => None,
        })
        .await?;
    let Some((pod, log_url, revision)) = found else {
        return Err(error(StatusCode::NOT_FOUND, format!("pod {namespace}/{name} not found")));
    };
    let logs = match (pod.spec.node_name.as_str(), log_url) {
        ("", _) => Err("not bound to a node yet".to_string()),
        (_, None) => Err("the node advertises no log endpoint".to_string()),
        (_, Some(url)) => log_tail(url, &pod).await,
    };
    let logs = match logs {
        Ok(tail) => json!({ "tail": tail }),
        Err(reason) => json!({ "unavailable": reason }),
    };
    let events = pod_events(&dashboard.plane, key).await?;
    Ok(Json(json!({ "revision": revision, "summary": pod_row(&pod), "object": pod, "events": events, "logs": logs }))
        .into_response())
}

/// The pod's events, from the versions of its key the store keeps.
async fn pod_events(plane: &Plane, key: String) -> Result<Vec<timeline::PodEvent>, ApiError> {
    let store = plane.store.clone();
    let versions = tokio::task::spawn_blocking(move || store.versions(key.as_bytes()))
        .await
        .map_err(|join| error(StatusCode::INTERNAL_SERVER_ERROR, join.to_string()))?
        .map_err(|store| error(StatusCode::SERVICE_UNAVAILABLE, store.to_string()))?;
    let created = versions.first().map_or(0, |kv| kv.create_revision);
    let pods: Vec<(i64, Pod)> = versions
        .iter()
        .filter_map(|kv| match objects::decode_stored(&kv.key, &kv.value, kv.mod_revision) {
            Ok(Object::Pod(pod)) => Some((kv.mod_revision, pod)),
            _ => None,
        })
        .collect();
    Ok(timeline::pod_events(&pods, created))
}

/// The last [`LOG_TAIL_BYTES`] of the pod's first container's log, from its node's agent
/// at `url`.
async fn log_tail(url: String, pod: &Pod) -> Result<String, String> {
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

async fn cluster(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Result<Response, ApiError> {
    // Anyone signed in sees the planes, as etcd's Status serves any user.
    dashboard.viewer(&headers)?;
    let plane = &dashboard.plane;
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
            peer_status(plane, &member.client_ur_ls).await
        };
        match status {
            Ok(status) => row["status"] = status,
            Err(reason) => row["unreachable"] = Value::String(reason),
        }
        planes.push(row);
    }
    Ok(Json(json!({
        "leader": leader.map(|leader| format!("{leader:x}")),
        "revision": plane.store.revision(),
        "planes": planes,
    }))
    .into_response())
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

/// Who is looking: `{authEnabled, user}` (user null when no one is signed in).
async fn session(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    let user = match dashboard.viewer(&headers) {
        Ok(viewer) => viewer.user,
        _ => None,
    };
    Json(json!({ "authEnabled": dashboard.plane.store.auth().enabled, "user": user })).into_response()
}

#[derive(Deserialize)]
struct SignIn {
    user: String,
    password: String,
}

/// Signs in with etcd's Authenticate; the token goes into an HttpOnly cookie, which the
/// page's scripts never see and the browser sends with every call, the event stream's too.
async fn sign_in(State(dashboard): State<Arc<Dashboard>>, Json(form): Json<SignIn>) -> Response {
    match dashboard.plane.authenticate(&form.user, form.password).await {
        Ok(token) => {
            let cookie = session_cookie(&token, dashboard.plane.config.auth.token_ttl.as_secs());
            ([(header::SET_COOKIE, cookie)], Json(json!({ "user": form.user }))).into_response()
        }
        Err(status) => error(StatusCode::UNAUTHORIZED, status.message()).into_response(),
    }
}

async fn sign_out() -> Response {
    ([(header::SET_COOKIE, session_cookie("", 0))], Json(json!({}))).into_response()
}

/// Server-sent events: one per change of an object or node lease the viewer may read,
/// from the store's event channel. A signed-in viewer's stream ends when the session does.
async fn events(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let viewer = dashboard.viewer(&headers)?;
    let token = session_token(&headers).unwrap_or_default().to_string();
    let plane = dashboard.plane.clone();
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
            if viewer.user.is_some() && plane.token_user(&token).is_none() {
                return;
            }
            let viewer = Viewer { user: viewer.user.clone(), auth: plane.store.auth() };
            for event in &batch.events {
                let Some(kv) = event.kv.as_ref().filter(|kv| viewer.may_read(&kv.key)) else { continue };
                let Some(kind) = changed_kind(&kv.key) else { continue };
                let data = json!({
                    "kind": kind,
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
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// What a change of `key` is a change of, for the page: an object's kind, or `Lease` for
/// a node's lease key (the nodes view shows who holds one); `None` for other keys.
fn changed_kind(key: &[u8]) -> Option<&'static str> {
    match key.starts_with(objects::NODE_LEASE_PREFIX.as_bytes()) {
        true => Some("Lease"),
        false => Kind::of_key(key).map(Kind::name),
    }
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
