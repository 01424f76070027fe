//! The agent's log service (`capstan ctl logs`): streams a container's log file, and with
//! `follow` what is appended to it until the client goes away.

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use capstan_proto::agentpb::pod_logs_server::PodLogs;
use capstan_proto::agentpb::{LogsChunk, LogsRequest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Bytes per streamed chunk.
const CHUNK_BYTES: usize = 64 << 10;
/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Chunks buffered per stream before the reader waits for the client.
const STREAM_BUFFER: usize = 8;

pub struct LogService {
    pub data_dir: PathBuf,
}

impl LogService {
    /// The newest directory of the pod (a pod re-created under the same name has a new
    /// UID and a new directory) and the container's log in it.
    fn log_path(&self, request: &LogsRequest) -> Result<PathBuf, Status> {
        let prefix = format!("{}_{}_", request.namespace, request.pod);
        let pods = std::fs::read_dir(self.data_dir.join("pods")).map_err(|_| not_found(request))?;
        let dir = pods
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
            .max_by_key(|entry| entry.metadata().and_then(|m| m.modified()).ok())
            .ok_or_else(|| not_found(request))?
            .path();
        let containers: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Status::internal(format!("cannot read {}: {e}", dir.display())))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".log").map(String::from))
            .collect();
        let container = match (request.container.as_str(), containers.as_slice()) {
            ("", [only]) => only.clone(),
            ("", _) => {
                return Err(Status::invalid_argument(format!(
                    "a container name must be specified for pod {}, choose one of: {containers:?}",
                    request.pod
                )))
            }
            (name, _) if containers.iter().any(|c| c == name) => name.to_string(),
            (name, _) => {
                return Err(Status::not_found(format!(
                    "container {name} is not valid for pod {} (or has not started)",
                    request.pod
                )))
            }
        };
        Ok(dir.join(format!("{container}.log")))
    }
}

fn not_found(request: &LogsRequest) -> Status {
    Status::not_found(format!("pod {}/{} has no logs on this node", request.namespace, request.pod))
}

#[tonic::async_trait]
impl PodLogs for LogService {
    type LogsStream = Pin<Box<dyn Stream<Item = Result<LogsChunk, Status>> + Send>>;

    async fn logs(&self, request: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let path = self.log_path(&request)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::internal(format!("cannot open {}: {e}", path.display())))?;
        let (chunks, stream) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            let mut buffer = vec![0u8; CHUNK_BYTES];
            loop {
                match file.read(&mut buffer).await {
                    Ok(0) if request.follow => {
                        tokio::select! {
                            () = tokio::time::sleep(FOLLOW_POLL) => {}
                            () = chunks.closed() => return,
                        }
                        // A log file truncated under us starts over.
                        let position = file.stream_position().await.unwrap_or(0);
                        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() < position) {
                            let _ = file.seek(std::io::SeekFrom::Start(0)).await;
                        }
                    }
                    Ok(0) => return,
                    Ok(read) => {
                        if chunks.send(Ok(LogsChunk { data: buffer[..read].to_vec() })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ =
                            chunks.send(Err(Status::internal(format!("cannot read {}: {e}", path.display())))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))))
    }
}
