//! Pipes: many request/answer pairs on one long-lived bidirectional gRPC stream, as etcd
//! streams its peer messages, instead of a unary call each. A call costs a new HTTP/2
//! stream, with its headers and trailers, on both sides and a task on the server; a frame
//! on an open stream costs neither. Planes send AppendEntries to their followers, and
//! forwarded writes and read-index rounds to their leader, this way.
//!
//! Each request goes out as a frame numbered in its stream, and its answer names the
//! number, so answers may come in any order and a caller that stops waiting (a timeout)
//! leaves nothing behind. The server takes a stream's frames in the order sent, one at a
//! time (the first stage of [`serve`]), and answers each when it is done (the second
//! stage), side by side with later frames. A refusal answers one frame and the stream
//! goes on; a stream that fails (the peer restarted, the connection broke) or that the
//! server ends fails every call waiting on it, with the status it failed with, and the
//! caller opens another. A status tonic gives for a connection never made ("tcp connect
//! error") thus still says that nothing was sent.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use capstan_proto::raftpb::Refusal;

/// Frames queued for a stream and not yet taken by the connection, at most.
const FRAMES_QUEUED_MAX: usize = 16;
/// Frames a server has taken and not yet answered, per stream, at most; past this it reads
/// no further frames until one is answered.
const FRAMES_ANSWERING_MAX: usize = 64;

/// The messages of one kind of pipe: how a request and its answer travel as frames.
pub trait Protocol: 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    type Frame: prost::Message + Default + Send + 'static;
    type Answer: prost::Message + Default + Send + 'static;

    fn frame(seq: u64, request: Self::Request) -> Self::Frame;
    /// A frame's number and request; a frame without one is refused.
    fn unframe(frame: Self::Frame) -> (u64, Result<Self::Request, Status>);
    fn answer(seq: u64, outcome: Result<Self::Response, Status>) -> Self::Answer;
    /// An answer's frame number and outcome; an answer without one fails that call.
    fn unanswer(answer: Self::Answer) -> (u64, Result<Self::Response, Status>);
}

/// Makes `$name` the [`Protocol`] of `$request`s answered by `$response`s, sent as frames
/// `$frame { seq, request }` and answered as `$answer { seq, outcome }`, whose oneof
/// (`$outcome::Outcome`, with `$outcome` in scope) is a `Response` or a `Refused`.
#[macro_export]
macro_rules! pipe_protocol {
    ($name:ident: $request:ty => $response:ty, $frame:path, $answer:path, $outcome:ident) => {
        impl $crate::pipe::Protocol for $name {
            type Request = $request;
            type Response = $response;
            type Frame = $frame;
            type Answer = $answer;

            fn frame(seq: u64, request: $request) -> $frame {
                $frame { seq, request: Some(request) }
            }

            fn unframe(frame: $frame) -> (u64, Result<$request, tonic::Status>) {
                (frame.seq, frame.request.ok_or_else(|| tonic::Status::invalid_argument("a frame without a request")))
            }

            fn answer(seq: u64, outcome: Result<$response, tonic::Status>) -> $answer {
                let outcome = match outcome {
                    Ok(response) => $outcome::Outcome::Response(response),
                    Err(refused) => $outcome::Outcome::Refused($crate::pipe::refusal(&refused)),
                };
                $answer { seq, outcome: Some(outcome) }
            }

            fn unanswer(answer: $answer) -> (u64, Result<$response, tonic::Status>) {
                let outcome = match answer.outcome {
                    Some($outcome::Outcome::Response(response)) => Ok(response),
                    Some($outcome::Outcome::Refused(refusal)) => Err($crate::pipe::refused(refusal)),
                    None => Err(tonic::Status::internal("an answer without an outcome")),
                };
                (answer.seq, outcome)
            }
        }
    };
}

/// A refusal as it travels in an answer.
pub fn refusal(status: &Status) -> Refusal {
    Refusal { code: status.code() as i32, message: status.message().to_string() }
}

/// The status a refusal in an answer stands for.
pub fn refused(refusal: Refusal) -> Status {
    Status::new(tonic::Code::from(refusal.code), refusal.message)
}

/// The client's end of one stream. When the last holder drops it, opened or not, its
/// frames end at once (those still queued are not sent) and its task lets go of the
/// answers, so that HTTP/2 resets the stream, dropping a frame still partly sent, as a
/// dropped unary call is reset: a call abandoned after a timeout does not go on using the
/// link, and a peer that does not answer keeps nothing waiting.
pub struct Pipe<P: Protocol> {
    frames: mpsc::Sender<P::Frame>,
    next_seq: AtomicU64,
    waiting: Arc<Mutex<Waiting<P::Response>>>,
    /// Set as the pipe is dropped: its frames end at once.
    released: Arc<AtomicBool>,
    /// Dropped with the pipe, which stops its task.
    _held: oneshot::Sender<()>,
}

impl<P: Protocol> Drop for Pipe<P> {
    fn drop(&mut self) {
        // Before `frames` is dropped, which wakes the stream of frames to end.
        self.released.store(true, Ordering::Release);
    }
}

/// The frames a pipe sends (what its callers queue) until the pipe is let go.
pub struct Frames<F> {
    queued: mpsc::Receiver<F>,
    released: Arc<AtomicBool>,
}

impl<F> futures::Stream for Frames<F> {
    type Item = F;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<F>> {
        if self.released.load(Ordering::Acquire) {
            return std::task::Poll::Ready(None);
        }
        self.queued.poll_recv(cx)
    }
}

/// Where the answers to a pipe's frames go, or why none will come.
struct Waiting<R> {
    answers: HashMap<u64, oneshot::Sender<Result<R, Status>>>,
    broken: Option<Status>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Stops waiting for a frame's answer when its caller does (the answer then goes nowhere).
struct Pending<'a, R> {
    waiting: &'a Mutex<Waiting<R>>,
    seq: u64,
}

impl<R> Drop for Pending<'_, R> {
    fn drop(&mut self) {
        lock(self.waiting).answers.remove(&self.seq);
    }
}

impl<P: Protocol> Pipe<P> {
    /// Opens a stream with `open`, which makes the call with the stream of frames given.
    pub fn open<Opening>(open: impl FnOnce(Frames<P::Frame>) -> Opening) -> Pipe<P>
    where
        Opening: Future<Output = Result<tonic::Response<Streaming<P::Answer>>, Status>> + Send + 'static,
    {
        let (frames, queued) = mpsc::channel(FRAMES_QUEUED_MAX);
        let released = Arc::new(AtomicBool::new(false));
        let waiting = Arc::new(Mutex::new(Waiting { answers: HashMap::new(), broken: None }));
        let opening = open(Frames { queued, released: released.clone() });
        let answers_to = waiting.clone();
        let (held, let_go) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let run = async {
                match opening.await {
                    Ok(answers) => route::<P>(answers.into_inner(), &answers_to).await,
                    Err(status) => status,
                }
            };
            let ended = tokio::select! {
                ended = run => ended,
                _ = let_go => return,
            };
            let mut waiting = lock(&answers_to);
            for (_, answer) in waiting.answers.drain() {
                let _ = answer.send(Err(ended.clone()));
            }
            waiting.broken = Some(ended);
        });
        Pipe { frames, next_seq: AtomicU64::new(1), waiting, released, _held: held }
    }

    /// Whether the stream has ended: calls on it fail at once.
    pub fn broken(&self) -> bool {
        lock(&self.waiting).broken.is_some()
    }

    /// Sends `request` and waits for its answer.
    pub async fn call(&self, request: P::Request) -> Result<P::Response, Status> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            if let Some(broken) = &waiting.broken {
                return Err(broken.clone());
            }
            waiting.answers.insert(seq, answer);
        }
        let _pending = Pending { waiting: &*self.waiting, seq };
        // A frame not taken means the stream ended (tonic drops the frames of a call that
        // failed, before the task hears why); the task answers every waiting caller then,
        // with the status the stream ended with.
        let _ = self.frames.send(P::frame(seq, request)).await;
        answered.await.unwrap_or_else(|_| Err(Status::unavailable("the stream ended")))
    }
}

/// Hands each answer to whoever waits for it; returns the status the stream ended with.
async fn route<P: Protocol>(mut answers: Streaming<P::Answer>, waiting: &Mutex<Waiting<P::Response>>) -> Status {
    loop {
        let answer = match answers.message().await {
            Ok(Some(answer)) => answer,
            Ok(None) => return Status::unavailable("the peer ended the stream"),
            Err(status) => return status,
        };
        let (seq, outcome) = P::unanswer(answer);
        if let Some(waiter) = lock(waiting).answers.remove(&seq) {
            let _ = waiter.send(outcome);
        }
    }
}

/// One pipe per peer URL, opened on first use and again once broken.
pub struct PipesByUrl<P: Protocol>(Mutex<HashMap<String, Arc<Pipe<P>>>>);

impl<P: Protocol> Default for PipesByUrl<P> {
    fn default() -> PipesByUrl<P> {
        PipesByUrl(Mutex::default())
    }
}

impl<P: Protocol> PipesByUrl<P> {
    /// The pipe to `url`, opened with `open` if there is none that works.
    pub fn get(&self, url: &str, open: impl FnOnce() -> Result<Pipe<P>, Status>) -> Result<Arc<Pipe<P>>, Status> {
        let mut pipes = lock(&self.0);
        if let Some(pipe) = pipes.get(url).filter(|pipe| !pipe.broken()) {
            return Ok(pipe.clone());
        }
        let pipe = Arc::new(open()?);
        pipes.insert(url.to_string(), pipe.clone());
        Ok(pipe)
    }

    /// Lets `pipe` go, if it is still the one to `url`: the next `get` opens another.
    pub fn discard(&self, url: &str, pipe: &Arc<Pipe<P>>) {
        let mut pipes = lock(&self.0);
        if pipes.get(url).is_some_and(|current| Arc::ptr_eq(current, pipe)) {
            pipes.remove(url);
        }
    }
}

/// Ends the streams a server serves, open or opened later, when the server stops: the
/// clients would hold them open for good. Clones stop together.
#[derive(Clone)]
pub struct Stop(Arc<watch::Sender<bool>>);

impl Default for Stop {
    fn default() -> Stop {
        Stop(Arc::new(watch::Sender::new(false)))
    }
}

impl Stop {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.0.subscribe();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    }
}

/// Serves one stream, in a task of its own: `take` each request in the order sent, one at
/// a time, and answer it with the future `take` returns, run beside later frames'.
/// Returns the stream of answers, which ends when the client ends its frames, the
/// answers cannot be sent or `stop` stops.
pub fn serve<P, Take, Taking, Answering>(
    mut frames: Streaming<P::Frame>,
    stop: &Stop,
    mut take: Take,
) -> ReceiverStream<Result<P::Answer, Status>>
where
    P: Protocol,
    Take: FnMut(P::Request) -> Taking + Send + 'static,
    Taking: Future<Output = Result<Answering, Status>> + Send,
    Answering: Future<Output = Result<P::Response, Status>> + Send + 'static,
{
    let (answers, answered) = mpsc::channel(FRAMES_ANSWERING_MAX);
    let stopped = stop.stopped();
    tokio::spawn(async move {
        let mut stopped = std::pin::pin!(stopped);
        let mut answering = FuturesUnordered::new();
        loop {
            let (seq, outcome) = tokio::select! {
                () = &mut stopped => return,
                frame = frames.message(), if answering.len() < FRAMES_ANSWERING_MAX => {
                    let Ok(Some(frame)) = frame else { return };
                    let (seq, request) = P::unframe(frame);
                    let taken = match request {
                        Ok(request) => take(request).await,
                        Err(refused) => Err(refused),
                    };
                    match taken {
                        Ok(answer) => {
                            answering.push(async move { (seq, answer.await) });
                            continue;
                        }
                        Err(refused) => (seq, Err(refused)),
                    }
                }
                Some(answered) = answering.next(), if !answering.is_empty() => answered,
            };
            if answers.send(Ok(P::answer(seq, outcome))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(answered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::AppendProtocol;
    use capstan_proto::raftpb::{
        self, append_entries_response,
        raft_peer_client::RaftPeerClient,
        raft_peer_server::{RaftPeer, RaftPeerServer},
    };
    use tonic::transport::{Channel, Endpoint};
    use tonic::{Request, Response};

    /// Frames the test peer holds before it answers them, last first.
    const HELD: usize = 3;
    /// A request with this cluster ID makes the test peer fail the stream.
    const FAIL: u64 = u64::MAX;

    /// A peer that answers its streams' frames `HELD` at a time in reverse order, each
    /// answer naming its request's cluster ID as the matching index; says when a stream's
    /// frames end.
    struct Reversing {
        ended: mpsc::UnboundedSender<()>,
    }

    /// Says, when dropped, that a stream's frames ended.
    struct Ended(mpsc::UnboundedSender<()>);

    impl Drop for Ended {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    fn naming(id: u64) -> raftpb::AppendEntriesResponse {
        let matching = raftpb::LogId { index: id, ..Default::default() };
        let result =
            append_entries_response::Result::PartialSuccess(raftpb::PartialSuccess { matching: Some(matching) });
        raftpb::AppendEntriesResponse { result: Some(result) }
    }

    fn request(id: u64) -> raftpb::AppendEntriesRequest {
        raftpb::AppendEntriesRequest { cluster_id: id, ..Default::default() }
    }

    #[tonic::async_trait]
    impl RaftPeer for Reversing {
        type AppendStreamStream = ReceiverStream<Result<raftpb::AppendAnswer, Status>>;

        async fn append_stream(
            &self,
            request: Request<Streaming<raftpb::AppendFrame>>,
        ) -> Result<Response<Self::AppendStreamStream>, Status> {
            let mut frames = request.into_inner();
            let (answers, answered) = mpsc::channel(HELD);
            let ended = Ended(self.ended.clone());
            tokio::spawn(async move {
                let _ended = ended;
                let mut held = Vec::new();
                while let Ok(Some(frame)) = frames.message().await {
                    let id = frame.request.map_or(0, |request| request.cluster_id);
                    if id == FAIL {
                        let _ = answers.send(Err(Status::data_loss("the peer failed"))).await;
                        return;
                    }
                    held.push((frame.seq, id));
                    if held.len() == HELD {
                        for (seq, id) in held.drain(..).rev() {
                            let _ = answers.send(Ok(AppendProtocol::answer(seq, Ok(naming(id))))).await;
                        }
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(answered)))
        }

        async fn vote(&self, _: Request<raftpb::VoteRequest>) -> Result<Response<raftpb::VoteResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn install_snapshot(
            &self,
            _: Request<Streaming<raftpb::SnapshotChunk>>,
        ) -> Result<Response<raftpb::InstallSnapshotResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// A pipe to a `Reversing` peer served on a loopback port, and where the peer says
    /// that a stream's frames ended.
    async fn pipe_and_peer() -> (Pipe<AppendProtocol>, mpsc::UnboundedReceiver<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let (ended, ends) = mpsc::unbounded_channel();
        let peer = RaftPeerServer::new(Reversing { ended });
        tokio::spawn(tonic::transport::Server::builder().add_service(peer).serve_with_incoming(incoming));
        (pipe_to(Endpoint::from_shared(format!("http://{address}")).unwrap().connect_lazy()), ends)
    }

    async fn pipe_to_peer() -> Pipe<AppendProtocol> {
        pipe_and_peer().await.0
    }

    fn pipe_to(channel: Channel) -> Pipe<AppendProtocol> {
        let mut client = RaftPeerClient::new(channel);
        Pipe::open(|frames| async move { client.append_stream(frames).await })
    }

    fn matching(outcome: Result<raftpb::AppendEntriesResponse, Status>) -> u64 {
        match outcome.unwrap().result {
            Some(append_entries_response::Result::PartialSuccess(success)) => success.matching.unwrap().index,
            other => panic!("not a test answer: {other:?}"),
        }
    }

    fn waiting(pipe: &Pipe<AppendProtocol>) -> usize {
        lock(&pipe.waiting).answers.len()
    }

    #[tokio::test]
    async fn answers_reach_their_callers_in_whatever_order_they_come() {
        let pipe = pipe_to_peer().await;
        let (first, second, third) = tokio::join!(pipe.call(request(1)), pipe.call(request(2)), pipe.call(request(3)));
        assert_eq!([matching(first), matching(second), matching(third)], [1, 2, 3]);
        assert_eq!(waiting(&pipe), 0);
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_leaves_nothing_behind() {
        let pipe = pipe_to_peer().await;
        {
            let mut abandoned = std::pin::pin!(pipe.call(request(7)));
            assert!(futures::poll!(abandoned.as_mut()).is_pending(), "the peer holds the frame");
            assert_eq!(waiting(&pipe), 1);
        }
        assert_eq!(waiting(&pipe), 0, "the abandoned call left its place");
        // The abandoned frame was sent: with two more the peer answers all three, and the
        // answer to the abandoned one goes nowhere.
        let (eighth, ninth) = tokio::join!(pipe.call(request(8)), pipe.call(request(9)));
        assert_eq!([matching(eighth), matching(ninth)], [8, 9]);
        assert!(!pipe.broken());
    }

    #[tokio::test]
    async fn a_pipe_let_go_ends_its_stream_at_the_peer() {
        let (pipe, mut ends) = pipe_and_peer().await;
        let (first, second, third) = tokio::join!(pipe.call(request(1)), pipe.call(request(2)), pipe.call(request(3)));
        assert_eq!([matching(first), matching(second), matching(third)], [1, 2, 3]);
        drop(pipe);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(30), ends.recv());
        assert_eq!(ended.await.expect("the peer's stream never ended"), Some(()));
    }

    #[tokio::test]
    async fn a_failed_stream_fails_its_callers_with_its_status_and_stays_broken() {
        let pipe = pipe_to_peer().await;
        let (held, failing) = tokio::join!(pipe.call(request(5)), pipe.call(request(FAIL)));
        for outcome in [held, failing] {
            let status = outcome.unwrap_err();
            assert_eq!((status.code(), status.message()), (tonic::Code::DataLoss, "the peer failed"));
        }
        assert!(pipe.broken());
        let later = pipe.call(request(6)).await.unwrap_err();
        assert_eq!(later.code(), tonic::Code::DataLoss, "a call on a broken pipe fails at once: {later:?}");
        assert_eq!(waiting(&pipe), 0);
    }

    #[tokio::test]
    async fn a_pipe_to_a_peer_not_listening_fails_as_a_call_never_sent() {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let pipe = pipe_to(Endpoint::from_shared(format!("http://{unused}")).unwrap().connect_lazy());
        let refused = pipe.call(request(1)).await.unwrap_err();
        // What the plane's retry on a leader change recognizes (`src/plane/status.rs`).
        assert_eq!((refused.code(), refused.message()), (tonic::Code::Unavailable, "tcp connect error"));
        assert!(pipe.broken());
    }
}
