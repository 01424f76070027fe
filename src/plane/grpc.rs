//! Serving gRPC: hyper's HTTP/2 server, calling the generated tonic services directly.
//!
//! tonic's own server (`tonic::transport::Server`) puts an axum router and a stack of tower
//! layers between hyper and a generated service: a clone of a boxed service per request,
//! the router's path match with its percent-decoded parameters, the request and answer
//! bodies boxed again, a span, and the metrics layer's labels built as strings and hashed.
//! In a profile of the planes at 256 linearizable gets in flight those took 12% of the
//! samples, against 16% for the handlers themselves (session 25). Here hyper calls
//! [`Routes`], which picks the service by the path's first segment among the few it has,
//! clones that service (an `Arc`) and calls it; its answer's future is the only box.
//!
//! What tonic's server did and still happens: the connection's [`Connected`] information
//! in each request's extensions (`Request::peer_certs` reads the client certificate from
//! it), HTTP/2 keepalive pings, a `grpc-timeout` header honoured, an unknown service
//! answered `UNIMPLEMENTED`, and a graceful stop: accepting ends at once (the port is
//! released), then each connection finishes its requests in flight and closes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::transport::server::Connected;
use tonic::Status;

use super::metrics::{GrpcMetrics, Timing};

/// A generated service's answer to one request (tonic's `BoxFuture`).
type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

/// Calls one generated service.
type Handler = Box<dyn Fn(http::Request<Incoming>) -> Answer + Send + Sync>;

/// The services a server answers, by name, and the metrics its answers go to.
#[derive(Default)]
pub struct Routes {
    services: Vec<(&'static str, Handler)>,
    metrics: Option<GrpcMetrics>,
}

impl Routes {
    /// Counts and times every answer in `metrics`.
    pub fn measured(metrics: GrpcMetrics) -> Routes {
        Routes { services: Vec::new(), metrics: Some(metrics) }
    }

    /// Adds a generated service, answered for paths `/{S::NAME}/...`.
    pub fn add<S>(mut self, service: S) -> Routes
    where
        S: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible, Future = Answer>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
    {
        // A generated service is always ready (its `poll_ready` returns `Ready` at once),
        // so it is called without asking.
        self.services.push((S::NAME, Box::new(move |request| service.clone().call(request))));
        self
    }

    fn answer(&self, request: http::Request<Incoming>) -> Answering {
        let path = request.uri().path();
        let timing = self.metrics.as_ref().map(|metrics| metrics.start(path));
        let deadline = match grpc_timeout(request.headers()) {
            Ok(timeout) => timeout.map(|timeout| Box::pin(tokio::time::sleep(timeout))),
            Err(refused) => return Answering::refused(refused, timing),
        };
        let name = path.trim_start_matches('/').split('/').next().unwrap_or_default();
        let answer = match self.services.iter().find(|(service, _)| *service == name) {
            Some((_, handler)) => handler(request),
            None => return Answering::refused(Status::unimplemented(format!("unknown service {name}")), timing),
        };
        Answering { state: State::Served(answer), deadline, timing }
    }
}

/// The deadline a client set for its request (`grpc-timeout`: up to 8 digits and a unit),
/// if it set one.
fn grpc_timeout(headers: &http::HeaderMap) -> Result<Option<Duration>, Status> {
    let Some(value) = headers.get("grpc-timeout") else { return Ok(None) };
    let malformed = || Status::invalid_argument(format!("malformed grpc-timeout header {value:?}"));
    let text = value.to_str().map_err(|_| malformed())?;
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(malformed());
    }
    let count: u64 = digits.parse().map_err(|_| malformed())?;
    let timeout = match unit {
        "H" => Duration::from_secs(count * 3600),
        "M" => Duration::from_secs(count * 60),
        "S" => Duration::from_secs(count),
        "m" => Duration::from_millis(count),
        "u" => Duration::from_micros(count),
        "n" => Duration::from_nanos(count),
        _ => return Err(malformed()),
    };
    Ok(Some(timeout))
}

/// One request being answered: the service's answer, or the client's deadline passing
/// first; the metrics learn the outcome.
pub struct Answering {
    state: State,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timing: Option<Timing>,
}

enum State {
    /// A service is answering.
    Served(Answer),
    /// The server refused the request before any service saw it.
    Refused(Status),
    /// Answered already.
    Done,
}

impl Answering {
    fn refused(status: Status, timing: Option<Timing>) -> Answering {
        Answering { state: State::Refused(status), deadline: None, timing }
    }
}

impl Future for Answering {
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (response, served) = match std::mem::replace(&mut this.state, State::Done) {
            State::Refused(refused) => (refused.into_http(), false),
            State::Done => (Status::internal("a request was polled after its answer").into_http(), false),
            State::Served(mut answer) => match answer.as_mut().poll(cx) {
                Poll::Ready(Ok(response)) => (response, true),
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => {
                    let passed = this.deadline.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                    if !passed {
                        this.state = State::Served(answer);
                        return Poll::Pending;
                    }
                    (Status::deadline_exceeded("the request's grpc-timeout passed").into_http(), true)
                }
            },
        };
        if let Some(timing) = this.timing.take() {
            timing.finish(&response, served);
        }
        Poll::Ready(Ok(response))
    }
}

/// What hyper calls for each request of one connection.
struct ConnectionService<I> {
    routes: Arc<Routes>,
    connected: I,
}

impl<I: Clone + Send + Sync + 'static> hyper::service::Service<http::Request<Incoming>> for ConnectionService<I> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answering;

    fn call(&self, mut request: http::Request<Incoming>) -> Answering {
        request.extensions_mut().insert(self.connected.clone());
        self.routes.answer(request)
    }
}

/// Serves `routes` on the connections `incoming` yields until `shutdown` resolves, then
/// stops accepting and waits for the connections to finish what they have in flight
/// (dropping this future closes them at once). `keepalive` pings every connection idle
/// that long.
pub async fn serve<IO, E>(
    incoming: impl Stream<Item = Result<IO, E>>,
    routes: Routes,
    keepalive: Option<Duration>,
    shutdown: impl Future<Output = ()>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    E: std::fmt::Display,
{
    let routes = Arc::new(routes);
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(keepalive)
        // As etcd (grpc-go) does: no limit on a connection's streams, no date header.
        .max_concurrent_streams(None)
        .auto_date_header(false);
    let (stop, stopping) = tokio::sync::watch::channel(());
    let mut connections = tokio::task::JoinSet::new();
    {
        // Dropped when accepting ends, which releases the port.
        let mut incoming = std::pin::pin!(incoming);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = incoming.next() => accepted,
            };
            while connections.try_join_next().is_some() {}
            let io = match accepted {
                Some(Ok(io)) => io,
                Some(Err(error)) => {
                    tracing::debug!(%error, "a connection was not accepted");
                    continue;
                }
                None => break,
            };
            let service = ConnectionService { routes: routes.clone(), connected: io.connect_info() };
            let connection = builder.serve_connection(TokioIo::new(io), service);
            let mut stopping = stopping.clone();
            connections.spawn(async move {
                let mut connection = std::pin::pin!(connection);
                let served = tokio::select! {
                    served = connection.as_mut() => served,
                    _ = stopping.changed() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = served {
                    tracing::debug!(%error, "a gRPC connection ended with an error");
                }
            });
        }
    }
    let _ = stop.send(());
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &'static str) -> Result<Option<Duration>, Status> {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", http::HeaderValue::from_static(value));
        grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeouts_read_in_every_unit_and_malformed_ones_are_refused() {
        assert_eq!(grpc_timeout(&http::HeaderMap::new()).unwrap(), None);
        assert_eq!(timeout_of("2H").unwrap(), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("3M").unwrap(), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("5S").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("250m").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(timeout_of("99999999u").unwrap(), Some(Duration::from_micros(99_999_999)));
        assert_eq!(timeout_of("7n").unwrap(), Some(Duration::from_nanos(7)));
        for malformed in ["", "S", "5", "5s", "123456789S", "-5S", "5 S", "5SS"] {
            let refused = timeout_of(malformed).expect_err(malformed);
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{malformed:?}");
        }
    }
}
