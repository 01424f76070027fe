//! The plane's HTTP listener (`--listen-metrics-urls`, as etcd's): Prometheus metrics at
//! `/metrics`, etcd's `/health`, and Kubernetes-style `/readyz` and `/livez` probes.
//!
//! Counters and histograms are updated where the work happens (handles shared with the
//! Raft storage, the scheduler, the batcher, watches and leases); gauges that describe the
//! plane's state (leader, term, indexes, revisions, sizes, leases) are read when scraped.
//! Names follow Prometheus' conventions: `capstan_` prefix, `_seconds`, `_bytes`, `_total`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tonic::codegen::http;

use super::Plane;

/// A plane is ready while it applies no further than this many entries behind its log.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

type Labels<const N: usize> = [(&'static str, String); N];

/// Every handle the plane measures through, and the registry that names them.
#[derive(Clone)]
pub struct PlaneMetrics {
    registry: Arc<Registry>,
    pub storage: capstan_raft::StorageMetrics,
    pub scheduler: capstan_scheduler::Metrics,
    pub grpc: GrpcMetrics,
    pub leader_changes: Counter,
    pub proposals_committed: Counter,
    pub proposals_answered_on_apply: Counter,
    pub proposals_failed: Counter,
    pub proposals_pending: Gauge,
    pub watchers: Gauge,
    pub watch_events: Counter,
    pub slow_watchers: Counter,
    pub leases_expired: Counter,
    state: StateGauges,
}

/// Gauges set from the plane's state at each scrape.
#[derive(Clone, Default)]
struct StateGauges {
    has_leader: Gauge,
    is_leader: Gauge,
    term: Gauge,
    last_log_index: Gauge,
    applied_index: Gauge,
    db_size: Gauge,
    key_versions: Gauge,
    revision: Gauge,
    compacted_revision: Gauge,
    leases_active: Gauge,
}

impl Default for PlaneMetrics {
    fn default() -> PlaneMetrics {
        let mut metrics = PlaneMetrics {
            registry: Arc::new(Registry::default()),
            storage: capstan_raft::StorageMetrics::default(),
            scheduler: capstan_scheduler::Metrics::default(),
            grpc: GrpcMetrics::default(),
            leader_changes: Counter::default(),
            proposals_committed: Counter::default(),
            proposals_answered_on_apply: Counter::default(),
            proposals_failed: Counter::default(),
            proposals_pending: Gauge::default(),
            watchers: Gauge::default(),
            watch_events: Counter::default(),
            slow_watchers: Counter::default(),
            leases_expired: Counter::default(),
            state: StateGauges::default(),
        };
        metrics.registry = Arc::new(metrics.build_registry());
        metrics
    }
}

impl PlaneMetrics {
    fn build_registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("capstan");
        let state = &self.state;
        let raft = registry.sub_registry_with_prefix("raft");
        raft.register("has_leader", "1 while this plane knows a leader", state.has_leader.clone());
        raft.register("is_leader", "1 while this plane leads", state.is_leader.clone());
        raft.register("term", "The Raft term", state.term.clone());
        raft.register("leader_changes", "Leaders seen by this plane", self.leader_changes.clone());
        raft.register(
            "last_log_index",
            "The index of the last entry in this plane's log",
            state.last_log_index.clone(),
        );
        raft.register("applied_index", "The index of the last entry applied to the store", state.applied_index.clone());
        raft.register("proposals_committed", "Client writes committed", self.proposals_committed.clone());
        raft.register("proposals_failed", "Client writes Raft refused or lost", self.proposals_failed.clone());
        raft.register(
            "proposals_answered_on_apply",
            "Client writes this plane answered as it applied them, before the batcher's answer came",
            self.proposals_answered_on_apply.clone(),
        );
        raft.register(
            "proposals_pending",
            "Client writes proposed and not yet answered",
            self.proposals_pending.clone(),
        );
        let storage = &self.storage;
        raft.register_with_unit("wal_fsync_duration", "One WAL sync", Unit::Seconds, storage.wal_fsync_seconds.clone());
        raft.register(
            "snapshots_built",
            "Snapshots this plane took (each lets the log behind it go)",
            storage.snapshots_built.clone(),
        );
        raft.register(
            "snapshots_sent",
            "Exports of the store sent to peers as snapshots",
            storage.snapshots_sent.clone(),
        );
        raft.register("snapshots_received", "Snapshots received and installed", storage.snapshots_received.clone());
        raft.register(
            "commit_notices_folded",
            "Commit-only AppendEntries to followers left unsent, the next AppendEntries carrying the commit",
            storage.commit_notices_folded.clone(),
        );
        let store = registry.sub_registry_with_prefix("store");
        store.register_with_unit("db_size", "Bytes on disk and in memtables", Unit::Bytes, state.db_size.clone());
        store.register("key_versions", "Stored key versions (RocksDB's estimate)", state.key_versions.clone());
        store.register("revision", "The store's current revision", state.revision.clone());
        store.register("compacted_revision", "The revision compacted up to", state.compacted_revision.clone());
        store.register_with_unit(
            "apply_duration",
            "One apply of committed entries",
            Unit::Seconds,
            storage.apply_seconds.clone(),
        );
        let grpc = registry.sub_registry_with_prefix("grpc");
        grpc.register("requests", "gRPC requests by service, method and status code", self.grpc.0.requests.clone());
        grpc.register_with_unit(
            "request_duration",
            "gRPC request latency (to the first answer of a stream)",
            Unit::Seconds,
            self.grpc.0.seconds.clone(),
        );
        let watch = registry.sub_registry_with_prefix("watch");
        watch.register("watchers", "Watchers open on this plane", self.watchers.clone());
        watch.register("events_sent", "Watch events sent to clients", self.watch_events.clone());
        watch.register(
            "slow_watchers",
            "Times a watcher fell behind and caught up from history",
            self.slow_watchers.clone(),
        );
        let lease = registry.sub_registry_with_prefix("lease");
        lease.register("active", "Leases granted and not revoked", state.leases_active.clone());
        lease.register("expired", "Leases this plane revoked as expired (while leading)", self.leases_expired.clone());
        self.scheduler.register(registry.sub_registry_with_prefix("scheduler"));
        registry
    }

    /// Sets the state gauges from `plane`, for a scrape.
    fn refresh(&self, plane: &Plane) {
        let state = &self.state;
        let raft = plane.raft.metrics().borrow().clone();
        state.has_leader.set(i64::from(raft.current_leader.is_some()));
        state.is_leader.set(i64::from(raft.current_leader == Some(plane.node_id)));
        state.term.set(raft.current_term as i64);
        state.last_log_index.set(raft.last_log_index.unwrap_or(0) as i64);
        state.applied_index.set(raft.last_applied.map_or(0, |id| id.index) as i64);
        state.db_size.set(plane.store.size_bytes() as i64);
        state.key_versions.set(plane.store.key_versions_estimate() as i64);
        state.revision.set(plane.store.revision());
        state.compacted_revision.set(plane.store.compacted_revision());
        state.leases_active.set(plane.store.reader().leases().map_or(0, |leases| leases.len() as i64));
    }
}

/// Why a plane is not ready, if it is not: no leader, applying too far behind, an alarm.
fn unready_reasons(plane: &Plane) -> Vec<String> {
    let raft = plane.raft.metrics().borrow().clone();
    let mut reasons = Vec::new();
    if raft.current_leader.is_none() {
        reasons.push("no leader".to_string());
    }
    let lag = raft.last_log_index.unwrap_or(0).saturating_sub(raft.last_applied.map_or(0, |id| id.index));
    if lag > READY_APPLY_LAG_MAX {
        reasons.push(format!("applied {lag} entries behind its log"));
    }
    if plane.alarms.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).no_space {
        reasons.push("alarm NOSPACE".to_string());
    }
    reasons
}

async fn metrics(State(plane): State<Arc<Plane>>) -> impl IntoResponse {
    // Reading the state touches RocksDB (every lease, size properties): off the runtime.
    let refreshed = plane.clone();
    let _ = tokio::task::spawn_blocking(move || refreshed.metrics.refresh(&refreshed)).await;
    crate::http::metrics_response(&plane.metrics.registry)
}

/// etcd's health answer: `{"health":"true","reason":""}`, or 503 with etcd's reason.
async fn health(State(plane): State<Arc<Plane>>) -> impl IntoResponse {
    let reason = if plane.raft.metrics().borrow().current_leader.is_none() {
        "RAFT NO LEADER"
    } else if plane.alarms.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).no_space {
        "ALARM NOSPACE"
    } else {
        ""
    };
    let code = if reason.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(serde_json::json!({ "health": reason.is_empty().to_string(), "reason": reason })))
}

async fn readyz(State(plane): State<Arc<Plane>>) -> impl IntoResponse {
    match unready_reasons(&plane).as_slice() {
        [] => (StatusCode::OK, "ok\n".to_string()),
        reasons => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; "))),
    }
}

/// The plane's routes.
pub fn router(plane: Arc<Plane>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/health", axum::routing::get(health))
        .route("/readyz", axum::routing::get(readyz))
        .route("/livez", axum::routing::get(crate::http::livez))
        .with_state(plane)
}

/// gRPC's status codes by number, as grpc-go and etcd's metrics name them.
const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Counts and times gRPC requests by service, method and status code.
#[derive(Clone)]
pub struct GrpcMetrics(Arc<GrpcFamilies>);

struct GrpcFamilies {
    requests: Family<Labels<3>, Counter>,
    seconds: Family<Labels<2>, Histogram>,
    /// By path, the handles of each method a service has answered, so that a request finds
    /// them without building and hashing its labels. A request the server refused before
    /// any service saw it, or one a service answered `UNIMPLEMENTED`, counts as unknown and
    /// is not kept, so clients cannot grow it.
    methods: RwLock<HashMap<String, Arc<MethodMetrics>>>,
}

/// One method's labels, latency histogram and counter of answers with status OK.
struct MethodMetrics {
    labels: Labels<2>,
    seconds: Histogram,
    ok: Counter,
}

/// The time one gRPC request has taken so far, and where its answer is counted.
pub struct Timing {
    started: Instant,
    metrics: GrpcMetrics,
    /// The method's handles, unless it has not answered before.
    method: Option<Arc<MethodMetrics>>,
    path: String,
}

/// The labels of the method `path` names (`/etcdserverpb.KV/Range` → service
/// `etcdserverpb.KV`, method `Range`).
fn method_labels(path: &str) -> Labels<2> {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default().to_string();
    let method = parts.next().unwrap_or_default().to_string();
    [("grpc_service", service), ("grpc_method", method)]
}

impl Default for GrpcMetrics {
    fn default() -> GrpcMetrics {
        GrpcMetrics(Arc::new(GrpcFamilies {
            requests: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new(capstan_raft::metrics::duration_buckets())),
            methods: RwLock::default(),
        }))
    }
}

impl GrpcMetrics {
    /// Starts timing a request for `path`.
    pub fn start(&self, path: &str) -> Timing {
        let method = self.0.methods.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(path).cloned();
        // The path is kept only until its method is known.
        let path = if method.is_some() { String::new() } else { path.to_string() };
        Timing { started: Instant::now(), metrics: self.clone(), method, path }
    }

    /// The counter of the method `labels` names, for answers with `code`.
    fn requests(&self, [service, method]: &Labels<2>, code: tonic::Code) -> Counter {
        let code = GRPC_CODE_NAMES.get(code as usize).unwrap_or(&"Unknown").to_string();
        self.0.requests.get_or_create(&[service.clone(), method.clone(), ("grpc_code", code)]).clone()
    }

    /// Keeps the handles of the method `path` names, and returns them.
    fn keep(&self, path: String) -> Arc<MethodMetrics> {
        let labels = method_labels(&path);
        let seconds = self.0.seconds.get_or_create(&labels).clone();
        let ok = self.requests(&labels, tonic::Code::Ok);
        let kept = Arc::new(MethodMetrics { labels, seconds, ok });
        self.0.methods.write().unwrap_or_else(|poisoned| poisoned.into_inner()).entry(path).or_insert(kept).clone()
    }
}

impl Timing {
    /// Counts and times the request by its answer's status: an error status comes in the
    /// answer's headers (a trailers-only answer); a success's is in trailers not waited for.
    /// `served` says whether a service gave the answer (else the server refused the request
    /// before any service saw it: its path may name no method).
    pub fn finish<B>(self, answer: &http::Response<B>, served: bool) {
        let code = answer
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok()?.parse::<i32>().ok())
            .map_or(tonic::Code::Ok, tonic::Code::from);
        let elapsed = self.started.elapsed().as_secs_f64();
        let Timing { metrics, method, path, .. } = self;
        // Paths no service serves are one label, so clients cannot grow the families.
        if !served || code == tonic::Code::Unimplemented {
            let unknown = [("grpc_service", "unknown".to_string()), ("grpc_method", "unknown".to_string())];
            metrics.0.seconds.get_or_create(&unknown).observe(elapsed);
            metrics.requests(&unknown, code).inc();
            return;
        }
        let method = method.unwrap_or_else(|| metrics.keep(path));
        method.seconds.observe(elapsed);
        if code == tonic::Code::Ok {
            method.ok.inc();
        } else {
            metrics.requests(&method.labels, code).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: tonic::Code) -> http::Response<tonic::body::Body> {
        match code {
            tonic::Code::Ok => http::Response::new(tonic::body::Body::empty()),
            code => tonic::Status::new(code, "refused").into_http(),
        }
    }

    fn kept(metrics: &GrpcMetrics) -> Vec<String> {
        let methods = metrics.0.methods.read().unwrap();
        let mut paths: Vec<String> = methods.keys().cloned().collect();
        paths.sort();
        paths
    }

    /// A method's handles are kept once a service answered it; a path the server refused
    /// before any service saw it, or one a service does not have, is counted as unknown
    /// and never kept, so clients cannot grow the metrics.
    #[test]
    fn only_methods_a_service_answered_are_kept() {
        let metrics = GrpcMetrics::default();
        for made_up in 0..3 {
            let path = format!("/made.Up/{made_up}");
            metrics.start(&path).finish(&answer(tonic::Code::InvalidArgument), false);
            metrics.start(&path).finish(&answer(tonic::Code::Unimplemented), true);
        }
        assert!(kept(&metrics).is_empty(), "{:?}", kept(&metrics));
        metrics.start("/etcdserverpb.KV/Range").finish(&answer(tonic::Code::NotFound), true);
        metrics.start("/etcdserverpb.KV/Range").finish(&answer(tonic::Code::Ok), true);
        assert_eq!(kept(&metrics), ["/etcdserverpb.KV/Range"]);
        let mut text = String::new();
        let mut registry = Registry::default();
        registry.register("requests", "", metrics.0.requests.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for counted in [
            r#"{grpc_service="unknown",grpc_method="unknown",grpc_code="InvalidArgument"} 3"#,
            r#"{grpc_service="unknown",grpc_method="unknown",grpc_code="Unimplemented"} 3"#,
            r#"{grpc_service="etcdserverpb.KV",grpc_method="Range",grpc_code="NotFound"} 1"#,
            r#"{grpc_service="etcdserverpb.KV",grpc_method="Range",grpc_code="OK"} 1"#,
        ] {
            assert!(text.contains(counted), "{counted} in {text}");
        }
        assert!(!text.contains("made.Up"), "{text}");
    }
}
