//! The plain-HTTP listener that planes and agents serve metrics and probes on
//! (`--listen-metrics-urls`, as etcd's flag): the parts both share.

use std::net::SocketAddr;

use anyhow::Context;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;

/// The metrics in Prometheus' (OpenMetrics) text format, as a response.
pub fn metrics_response(registry: &Registry) -> impl IntoResponse {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

/// `/livez`: the process serves.
pub async fn livez() -> &'static str {
    "ok\n"
}

/// `http://ip:port`, the address to listen on (one: Capstan serves metrics on one).
pub fn parse_listen_url(url: &str) -> anyhow::Result<SocketAddr> {
    let bad = || format!("--listen-metrics-urls {url:?}: expected one http://ip:port");
    let address = url.strip_prefix("http://").with_context(bad)?.trim_end_matches('/');
    address.parse().with_context(bad)
}

/// Binds `address`, for a clear error before anything else starts.
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen for metrics on {address}"))
}

/// Serves `router` on `listener` until `shutdown` resolves, logging a failure.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
        tracing::error!(%error, "the metrics listener failed");
    }
}
