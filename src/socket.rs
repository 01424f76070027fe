//! The TCP connections gRPC runs on: those the plane's servers accept ([`incoming`],
//! [`coalesced`]) and those `capstan bench` dials ([`Connector`]).
//!
//! h2 writes each frame as soon as it is ready: one TCP segment per answer, or per request,
//! each of which both ends pay a system call and a trip through the network stack for (a
//! third of a plane's CPU at 256 gets in flight). A [`Coalesced`] connection holds what h2
//! writes until h2 flushes, and then lets the other tasks ready to run go first, once: the
//! messages they finish join the same write. With nothing else to run, the write goes out
//! at once. It also tells h2 the socket takes no vectored writes, so that h2 copies DATA
//! payloads of up to 1 KiB into its buffer instead of writing its buffer out before each
//! (a get of a 256-byte value was two writes: headers and data, then the trailers alone).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;

/// Accepted connections with Nagle's algorithm off: requests and answers are small and
/// latency-bound, and Nagle plus delayed ACKs would hold each for up to 40 ms.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// `connections`, each as a [`Coalesced`].
pub fn coalesced<IO, E>(
    connections: impl Stream<Item = Result<IO, E>>,
) -> impl Stream<Item = Result<Coalesced<IO>, E>> {
    connections.map(|connection| connection.map(Coalesced::new))
}

/// Dials gRPC servers for tonic's `Endpoint::connect_with_connector`: a TCP connection
/// with Nagle's algorithm off (as [`incoming`] says why), as a [`Coalesced`]. TLS, when the
/// endpoint has it, runs over it.
///
/// For many requests in flight on a connection, as the bench has. The planes' peer
/// clients do without: a peer connection carries one AppendEntries at a time, which the
/// yield before its write only delays (put 8:64 ran 6% slower with it, session 17).
#[derive(Clone, Copy, Debug, Default)]
pub struct Connector;

impl tonic::codegen::Service<Uri> for Connector {
    type Response = TokioIo<Coalesced<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri} names no host"));
            // An IPv6 literal comes in brackets, which name resolution does not take.
            let host = uri.host().ok_or_else(invalid)?.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(Coalesced::new(stream)))
        })
    }
}

/// Past this many bytes held, a write goes out before more is taken.
const HELD_BYTES_MAX: usize = 64 << 10;

/// A connection whose writes wait for the flush, and the flush for other ready tasks
/// (see the module's note).
pub struct Coalesced<IO> {
    io: IO,
    /// Written by h2, not yet to the socket.
    held: Vec<u8>,
    /// The first bytes of `held` already sent.
    sent: usize,
    /// Whether this flush has already let the other ready tasks run.
    yielded: bool,
}

impl<IO> Coalesced<IO> {
    pub fn new(io: IO) -> Coalesced<IO> {
        Coalesced { io, held: Vec::new(), sent: 0, yielded: false }
    }
}

impl<IO: AsyncWrite + Unpin> Coalesced<IO> {
    /// Writes out everything held.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.held.len() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += written;
        }
        self.held.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesced<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesced<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() >= HELD_BYTES_MAX {
            ready!(this.poll_send(cx))?;
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.held.is_empty() {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if !this.yielded {
            // Woken while it runs, the task goes to the back of its worker's queue: the
            // tasks ready now run before it is polled again.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_send(cx))?;
        this.yielded = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<IO: Connected> Connected for Coalesced<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_leave_whole_through_a_narrow_socket() {
        // A socket that takes 7 bytes at a time: sends are partial and wait for the reader.
        let (near, mut far) = tokio::io::duplex(7);
        let mut connection = Coalesced::new(near);
        connection.write_all(b"one answer, ").await.unwrap();
        connection.write_all(b"and another").await.unwrap();
        let mut byte = [0u8; 1];
        let unflushed = tokio::time::timeout(std::time::Duration::from_millis(20), far.read(&mut byte)).await;
        assert!(unflushed.is_err(), "nothing leaves before the flush");
        let reader = tokio::spawn(async move {
            let mut received = vec![0u8; 23];
            far.read_exact(&mut received).await.unwrap();
            (far, received)
        });
        let flushed = tokio::time::timeout(std::time::Duration::from_secs(10), connection.flush()).await;
        flushed.expect("the flush sends everything held").unwrap();
        let (mut far, received) = reader.await.unwrap();
        assert_eq!(received, b"one answer, and another");
        // Shutting down sends what is held first.
        connection.write_all(b"last").await.unwrap();
        let reader = tokio::spawn(async move {
            let mut rest = Vec::new();
            far.read_to_end(&mut rest).await.unwrap();
            rest
        });
        connection.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), b"last");
    }

    #[tokio::test]
    async fn the_connector_dials_the_host_and_port_of_the_uri_and_holds_writes_until_the_flush() {
        use tonic::codegen::Service;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
        let (dialed, accepted) = tokio::join!(Connector.call(uri), listener.accept());
        let mut connection = dialed.unwrap().into_inner();
        let (mut far, _) = accepted.unwrap();
        assert!(connection.io.nodelay().unwrap(), "Nagle's algorithm is off");
        connection.write_all(b"request").await.unwrap();
        let mut received = [0u8; 7];
        let unflushed = tokio::time::timeout(std::time::Duration::from_millis(20), far.read(&mut received)).await;
        assert!(unflushed.is_err(), "nothing leaves before the flush");
        connection.flush().await.unwrap();
        far.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"request");
        let error = Connector.call(Uri::from_static("/no/host")).await.err().expect("a URI without a host");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_flush_lets_other_ready_tasks_run_once_before_it_writes() {
        let (near, mut far) = tokio::io::duplex(1 << 10);
        let mut connection = Coalesced::new(near);
        connection.write_all(b"held").await.unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut connection).poll_flush(&mut cx).is_pending(), "the first poll yields");
        assert!(Pin::new(&mut connection).poll_flush(&mut cx).is_ready(), "the second writes");
        let mut received = [0u8; 4];
        far.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"held");
        // With nothing held a flush does not yield.
        assert!(Pin::new(&mut connection).poll_flush(&mut cx).is_ready());
    }
}
