//! A real `capstan plane` process under restarts and bad input: acknowledged writes
//! survive kill -9, a data directory in use or of another kind is refused with a one-line
//! error, malformed requests get a gRPC error and the plane keeps serving, and a full
//! quota raises NOSPACE.

mod common;

use std::time::Duration;

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, Txn, TxnOp};

use common::{free_addr, PlaneProcess};

const STEP_TIMEOUT: Duration = Duration::from_secs(20);

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future).await.expect("step timed out")
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    let mut client = bounded(Client::connect([plane.endpoint()], None)).await.unwrap();
    let mut last = 0;
    for index in 0..200 {
        last = bounded(client.put(format!("key{index:03}"), format!("value{index}"), None))
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
    let lease = bounded(client.lease_grant(600, None)).await.unwrap();
    plane.kill_and_restart();
    let mut client = bounded(Client::connect([plane.endpoint()], None)).await.unwrap();
    let all = bounded(client.get("key", Some(etcd_client::GetOptions::new().with_prefix()))).await.unwrap();
    assert_eq!(all.kvs().len(), 200, "every acknowledged put is there after kill -9");
    assert_eq!(all.header().unwrap().revision(), last);
    assert_eq!(all.kvs()[199].value(), b"value199");
    let leases = bounded(client.leases()).await.unwrap();
    assert_eq!(leases.leases()[0].id(), lease.id());
    let next = bounded(client.put("after", "restart", None)).await.unwrap();
    assert_eq!(next.header().unwrap().revision(), last + 1);
}

/// RocksDB reuses write-ahead log files it no longer needs (`recycle_log_file_num`), so
/// a synced append overwrites an old file in place instead of growing a new one. A reused
/// file still holds an older log's records past the newest: recovery must stop there and
/// keep everything synced before it.
#[tokio::test]
async fn acknowledged_writes_in_reused_log_files_survive_kill_9() {
    const KEYS: usize = 128;
    /// Txns written at most before RocksDB reports a log file put up for reuse (each
    /// writes about 2 MiB of log: the entry and its apply; RocksDB's info log lags).
    const TXNS_MAX: u32 = 400;
    /// Txns written after that, so the last ones land in reused files.
    const TXNS_AFTER: u32 = 48;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("plane");
    let mut plane = PlaneProcess::start(&data, &[]);
    let mut client = bounded(Client::connect([plane.endpoint()], None)).await.unwrap();
    let value = |txn: u32| format!("{txn:08}").repeat(1024);
    let reused = || std::fs::read_to_string(data.join("db/LOG")).is_ok_and(|log| log.contains("to recycle list"));
    let (mut txn, mut after, mut last) = (0, 0, 0);
    while after < TXNS_AFTER {
        txn += 1;
        assert!(txn <= TXNS_MAX, "RocksDB put no log file up for reuse after {TXNS_MAX} txns of 1 MiB");
        let puts: Vec<TxnOp> = (0..KEYS).map(|key| TxnOp::put(format!("reused{key:03}"), value(txn), None)).collect();
        last = bounded(client.txn(Txn::new().and_then(puts))).await.unwrap().header().unwrap().revision();
        if after > 0 || reused() {
            after += 1;
        }
    }
    plane.kill_and_restart();
    let mut client = bounded(Client::connect([plane.endpoint()], None)).await.unwrap();
    let all = bounded(client.get("reused", Some(etcd_client::GetOptions::new().with_prefix()))).await.unwrap();
    assert_eq!(all.header().unwrap().revision(), last, "the last acknowledged txn is there after kill -9");
    assert_eq!(all.kvs().len(), KEYS);
    for kv in all.kvs() {
        assert!(kv.value() == value(txn).as_bytes(), "{} holds an older txn's value", kv.key_str().unwrap());
    }
}

#[test]
fn a_data_dir_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("plane");
    let _first = PlaneProcess::start(&data, &[]);
    let second = PlaneProcess::spawn(&data, free_addr(), free_addr(), &[]);
    let (status, log) = second.wait_for_exit();
    assert!(!status.success());
    assert!(log.contains("in use by another process"), "{log}");
}

#[test]
fn a_foreign_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("plane");
    std::fs::create_dir_all(data.join("db")).unwrap();
    std::fs::write(data.join("db").join("precious.txt"), "someone else's file").unwrap();
    let plane = PlaneProcess::spawn(&data, free_addr(), free_addr(), &[]);
    let (status, log) = plane.wait_for_exit();
    assert!(!status.success());
    assert!(log.contains("is not a Capstan store"), "{log}");
    assert!(data.join("db").join("precious.txt").exists());
}

#[test]
fn a_data_dir_of_another_cluster_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("plane");
    drop(PlaneProcess::start(&data, &[]));
    let plane = PlaneProcess::spawn(&data, free_addr(), free_addr(), &["--initial-cluster-token", "another"]);
    let (status, log) = plane.wait_for_exit();
    assert!(!status.success());
    assert!(log.contains("belongs to cluster"), "{log}");
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let plane =
        PlaneProcess::spawn(&dir.path().join("p"), free_addr(), free_addr(), &["--initial-cluster", "nonsense"]);
    let (status, log) = plane.wait_for_exit();
    assert!(!status.success());
    assert!(log.contains("is not name=peer-url"), "{log}");
}

/// Sends raw bytes as the body of a KV/Put call.
async fn send_raw_put(endpoint: &str, body: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    let result: Result<tonic::Response<Vec<u8>>, tonic::Status> =
        grpc.unary(tonic::Request::new(body), path, raw::RawCodec).await;
    result.expect_err("garbage must be refused")
}

/// The status a plane answers a unary gRPC call to `path` with (a `RangeRequest` for
/// key `k`), sent over HTTP/2 with `headers` and nothing else of a gRPC client's, so
/// that no client-side deadline stands in for the server's.
async fn bare_grpc_status(plane: &PlaneProcess, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(plane.client_addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = tonic::codegen::http::Request::post(format!("http://{}{path}", plane.client_addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut client = client.ready().await.unwrap();
    let (answer, mut body) = client.send_request(request.body(()).unwrap(), false).unwrap();
    // One uncompressed message of 3 bytes: field 1 (key), length 1, "k".
    body.send_data(bytes::Bytes::from_static(b"\0\0\0\0\x03\x0a\x01k"), true).unwrap();
    let answer = answer.await.unwrap();
    // An error comes trailers-only: its status is in the headers, its message
    // percent-encoded.
    let header = |name: &str| answer.headers().get(name).map_or(&b""[..], |value| value.as_bytes()).to_vec();
    let encoded = header("grpc-message");
    let mut message = Vec::new();
    let mut bytes = encoded.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(|&digit| digit as char).collect();
                message.push(u8::from_str_radix(&hex, 16).unwrap());
            }
            _ => message.push(byte),
        }
    }
    (String::from_utf8(header("grpc-status")).unwrap(), String::from_utf8(message).unwrap())
}

/// What reaches no handler is answered by the gRPC server itself, as etcd's is: a service
/// it does not have, a malformed `grpc-timeout`, and a request whose deadline passes
/// before its answer (a linearizable read on a plane that has no leader and would wait
/// for one until its own, longer, timeout).
#[tokio::test]
async fn unknown_services_and_passed_deadlines_are_answered_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (client_addr, peer_addr) = (free_addr(), free_addr());
    // Its two peers never start, so it never has a leader.
    let cluster = format!("test-plane=http://{peer_addr},b=http://{},c=http://{}", free_addr(), free_addr());
    let mut plane =
        PlaneProcess::spawn(&dir.path().join("plane"), client_addr, peer_addr, &["--initial-cluster", &cluster]);
    plane.wait_for_logs(&["plane serving"]);

    let (code, message) = bounded(bare_grpc_status(&plane, "/etcdserverpb.Nope/Range", &[])).await;
    assert_eq!(code, (tonic::Code::Unimplemented as i32).to_string(), "{message}");
    assert!(message.contains("unknown service etcdserverpb.Nope"), "{message}");

    let soon = [("grpc-timeout", "soon")];
    let (code, message) = bounded(bare_grpc_status(&plane, "/etcdserverpb.KV/Range", &soon)).await;
    assert_eq!(code, (tonic::Code::InvalidArgument as i32).to_string(), "{message}");
    assert!(message.contains("malformed grpc-timeout"), "{message}");

    let hurried = [("grpc-timeout", "200m")];
    let (code, message) = bounded(bare_grpc_status(&plane, "/etcdserverpb.KV/Range", &hurried)).await;
    assert_eq!(code, (tonic::Code::DeadlineExceeded as i32).to_string(), "{message}");
    assert!(message.contains("grpc-timeout passed"), "{message}");
}

#[tokio::test]
async fn malformed_protobuf_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    for garbage in [vec![0xff; 64], vec![0x0a, 0x80], b"\x12\x05abc".to_vec()] {
        let status = bounded(send_raw_put(&plane.endpoint(), garbage)).await;
        assert!(matches!(status.code(), tonic::Code::Internal | tonic::Code::InvalidArgument), "{status:?}");
    }
    let mut client = bounded(Client::connect([plane.endpoint()], None)).await.unwrap();
    bounded(client.put("still", "serving", None)).await.unwrap();
}

#[tokio::test]
async fn a_full_quota_raises_nospace_and_deletes_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &["--quota-backend-bytes", "200000"]);
    let mut client = bounded(Client::connect([plane.endpoint()], None)).await.unwrap();
    let value = vec![b'v'; 64 * 1024];
    let mut refused = None;
    for index in 0..64 {
        if let Err(error) = bounded(client.put(format!("fill{index}"), value.clone(), None)).await {
            refused = Some(error.to_string());
            break;
        }
    }
    let refused = refused.expect("the quota must be reached");
    assert!(refused.contains("etcdserver: mvcc: database space exceeded"), "{refused}");
    let alarms = bounded(client.alarm(AlarmAction::Get, AlarmType::None, None)).await.unwrap();
    assert_eq!(alarms.alarms().len(), 1);
    assert_eq!(alarms.alarms()[0].alarm(), AlarmType::Nospace);
    bounded(client.delete("fill", Some(etcd_client::DeleteOptions::new().with_prefix()))).await.unwrap();
    let disarm = AlarmOptions::new();
    bounded(client.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(disarm))).await.unwrap();
    assert!(bounded(client.alarm(AlarmAction::Get, AlarmType::None, None)).await.unwrap().alarms().is_empty());
}

mod raw {
    //! A codec that sends and receives raw bytes, to put garbage on the wire.
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    pub struct RawCodec;
    pub struct RawEncoder;
    pub struct RawDecoder;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            bytes::BufMut::put_slice(buf, &item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let bytes = bytes::Buf::copy_to_bytes(buf, bytes::Buf::remaining(buf));
            Ok(Some(bytes.to_vec()))
        }
    }
}

/// Sends `frames` on a pipe opened by `open` and returns each answer by the frame number
/// it names, once there is one per frame (in whatever order they came).
async fn pipe_answers<Frame, Answer, Opening>(
    frames: Vec<Frame>,
    open: impl FnOnce(tokio_stream::wrappers::ReceiverStream<Frame>) -> Opening,
    seq: impl Fn(&Answer) -> u64,
) -> Result<std::collections::BTreeMap<u64, Answer>, tonic::Status>
where
    Opening: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<Answer>>, tonic::Status>>,
{
    let count = frames.len();
    let (send, sent) = tokio::sync::mpsc::channel(count.max(1));
    for frame in frames {
        send.send(frame).await.unwrap();
    }
    let mut answers = bounded(open(tokio_stream::wrappers::ReceiverStream::new(sent))).await?.into_inner();
    let mut by_seq = std::collections::BTreeMap::new();
    while by_seq.len() < count {
        let answer = bounded(answers.message()).await?.expect("the stream ended before every frame was answered");
        assert!(by_seq.insert(seq(&answer), answer).is_none(), "a frame was answered twice");
    }
    Ok(by_seq)
}

/// Peers are trusted only as far as their requests check out: another cluster's Raft
/// messages or forwarded writes are refused, so are those meant for another member (a peer
/// URL that points at the wrong plane) and frames without a request, and a write no plane
/// would send (a ready-made batch) gets an error, not a half-applied write. A refused
/// frame on a pipe is answered under its own number and the pipe goes on serving.
#[tokio::test]
async fn peers_of_another_cluster_and_made_up_proposals_are_refused() {
    use capstan_proto::raftpb::{
        self, append_answer, plane_peer_client::PlanePeerClient, propose_answer, raft_peer_client::RaftPeerClient,
    };

    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProcess::start(&dir.path().join("plane"), &[]);
    let mut client = bounded(Client::connect([plane.endpoint()], None)).await.unwrap();
    let header = bounded(client.status()).await.unwrap().header().unwrap().clone();
    let (cluster_id, member_id) = (header.cluster_id(), header.member_id());
    let peer = format!("http://{}", plane.peer_addr);

    let mut raft = bounded(RaftPeerClient::connect(peer.clone())).await.unwrap();
    let vote = raftpb::VoteRequest { cluster_id: cluster_id ^ 1, member_id, ..Default::default() };
    let refused = bounded(raft.vote(vote)).await.unwrap_err();
    assert!(refused.message().contains("cluster ID mismatch"), "{refused:?}");
    let vote = raftpb::VoteRequest { cluster_id, member_id: member_id ^ 1, ..Default::default() };
    let refused = bounded(raft.vote(vote)).await.unwrap_err();
    assert!(refused.message().contains("member ID mismatch"), "{refused:?}");

    let append = |seq, cluster_id, member_id| raftpb::AppendFrame {
        seq,
        request: Some(raftpb::AppendEntriesRequest { cluster_id, member_id, ..Default::default() }),
    };
    let frames = vec![
        append(1, cluster_id ^ 1, member_id),
        append(2, cluster_id, member_id ^ 1),
        raftpb::AppendFrame { seq: 3, request: None },
        append(4, cluster_id, member_id),
    ];
    let mut appends = raft.clone();
    let answers =
        pipe_answers(frames, |frames| appends.append_stream(frames), |answer: &raftpb::AppendAnswer| answer.seq)
            .await
            .unwrap();
    let refusal = |seq: u64| match &answers[&seq].outcome {
        Some(append_answer::Outcome::Refused(refused)) => refused.message.clone(),
        other => panic!("append frame {seq} must be refused, got {other:?}"),
    };
    assert!(refusal(1).contains("cluster ID mismatch"), "{}", refusal(1));
    assert!(refusal(2).contains("member ID mismatch"), "{}", refusal(2));
    assert!(refusal(3).contains("without a request"), "{}", refusal(3));
    assert!(refusal(4).contains("malformed raft message"), "an append without a vote: {}", refusal(4));

    let forwarding = bounded(PlanePeerClient::connect(peer)).await.unwrap();
    let batch = raftpb::Command {
        request: Some(raftpb::command::Request::Batch(raftpb::CommandBatch { commands: Vec::new() })),
        caller: None,
        origin: 0,
    };
    let put = raftpb::Command {
        request: Some(raftpb::command::Request::Put(capstan_proto::etcdserverpb::PutRequest {
            key: b"forwarded".to_vec(),
            value: b"write".to_vec(),
            ..Default::default()
        })),
        caller: None,
        origin: 0,
    };
    let propose = |seq, commands| raftpb::ProposeFrame { seq, request: Some(raftpb::ProposeRequest { commands }) };
    let frames = || {
        vec![
            propose(1, vec![put.clone()]),
            raftpb::ProposeFrame { seq: 2, request: None },
            propose(3, vec![batch.clone()]),
        ]
    };
    let open = |cluster: u64| {
        let mut forwarding = forwarding.clone();
        move |frames| {
            let mut request = tonic::Request::new(frames);
            request.metadata_mut().insert("capstan-cluster-id", format!("{cluster:x}").parse().unwrap());
            async move { forwarding.propose_stream(request).await }
        }
    };
    let seq = |answer: &raftpb::ProposeAnswer| answer.seq;
    let refused = pipe_answers(frames(), open(cluster_id ^ 1), seq).await.unwrap_err();
    assert!(refused.message().contains("cluster ID mismatch"), "{refused:?}");
    let answers = pipe_answers(frames(), open(cluster_id), seq).await.unwrap();
    let outcomes = |seq: u64| match &answers[&seq].outcome {
        Some(propose_answer::Outcome::Response(response)) => response.outcomes.clone(),
        other => panic!("propose frame {seq} must be answered, got {other:?}"),
    };
    assert!(
        matches!(
            outcomes(1).as_slice(),
            [raftpb::ProposeOutcome { outcome: Some(raftpb::propose_outcome::Outcome::Put(_)) }]
        ),
        "{:?}",
        outcomes(1)
    );
    match &answers[&2].outcome {
        Some(propose_answer::Outcome::Refused(refused)) => assert!(refused.message.contains("without a request")),
        other => panic!("a frame without a request must be refused, got {other:?}"),
    }
    match outcomes(3).as_slice() {
        [raftpb::ProposeOutcome { outcome: Some(raftpb::propose_outcome::Outcome::Refused(refused)) }] => {
            assert_eq!(refused.code, tonic::Code::InvalidArgument as i32, "{refused:?}")
        }
        other => panic!("a made-up batch must be refused, got {other:?}"),
    }
    let written = bounded(client.get("forwarded", None)).await.unwrap();
    assert_eq!(written.kvs()[0].value(), b"write");
    bounded(client.put("still", "serving", None)).await.unwrap();
}
