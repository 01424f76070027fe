//! etcd's KV service: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use capstan_proto::etcdserverpb::{self as pb, kv_server::Kv};
use capstan_proto::raftpb::command;
use capstan_store::{Access, CommandResponse};

use super::{status, Plane, REQUEST_BYTES_MAX};

pub struct KvService(pub Arc<Plane>);

fn check_size(request: &impl Message) -> Result<(), Status> {
    if request.encoded_len() > REQUEST_BYTES_MAX {
        return Err(status::request_too_large());
    }
    Ok(())
}

/// Whether a txn writes anything on either branch (a read-only txn is served like a read
/// when the quota is exhausted, as in etcd).
fn txn_writes(request: &pb::TxnRequest) -> bool {
    use pb::request_op::Request as Op;
    request.success.iter().chain(&request.failure).any(|op| match &op.request {
        Some(Op::RequestPut(_)) => true,
        Some(Op::RequestTxn(nested)) => txn_writes(nested),
        _ => false,
    })
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, request: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let caller = self.0.caller(&request, "Range")?;
        let request = request.into_inner();
        check_size(&request)?;
        if !request.serializable {
            self.0.linearizable_barrier().await?;
        }
        self.0.authorize(&caller, |auth| auth.check(&caller.user, Access::Read, &request.key, &request.range_end))?;
        // One key is one seek, from the memtable or the block cache most often: cheaper than
        // the handoff to a blocking thread and back. A range of keys may scan many.
        let range = if request.range_end.is_empty() {
            self.0.store.range(&request)
        } else {
            let plane = self.0.clone();
            tokio::task::spawn_blocking(move || plane.store.range(&request))
                .await
                .map_err(|error| Status::internal(error.to_string()))?
        };
        let mut response = range.map_err(|error| status::from_store(&error))?;
        self.0.complete_header(&mut response.header);
        Ok(Response::new(response))
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let caller = self.0.caller(&request, "Put")?;
        let request = request.into_inner();
        check_size(&request)?;
        self.0.check_quota()?;
        match self.0.propose_as(&caller, command::Request::Put(request)).await? {
            CommandResponse::Put(mut response) => {
                self.0.complete_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(Status::internal(format!("put answered with {other:?}"))),
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let caller = self.0.caller(&request, "DeleteRange")?;
        let request = request.into_inner();
        check_size(&request)?;
        match self.0.propose_as(&caller, command::Request::DeleteRange(request)).await? {
            CommandResponse::DeleteRange(mut response) => {
                self.0.complete_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(Status::internal(format!("delete answered with {other:?}"))),
        }
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let caller = self.0.caller(&request, "Txn")?;
        let request = request.into_inner();
        check_size(&request)?;
        capstan_store::check_txn(&request).map_err(|error| status::from_store(&error))?;
        if txn_writes(&request) {
            self.0.check_quota()?;
        }
        match self.0.propose_as(&caller, command::Request::Txn(request)).await? {
            CommandResponse::Txn(mut response) => {
                response.visit_headers(&mut |header| self.0.complete_header(header));
                Ok(Response::new(response))
            }
            other => Err(Status::internal(format!("txn answered with {other:?}"))),
        }
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let caller = self.0.caller(&request, "Compact")?;
        match self.0.propose_as(&caller, command::Request::Compaction(request.into_inner())).await? {
            CommandResponse::Compaction(mut response) => {
                self.0.complete_header(&mut response.header);
                Ok(Response::new(response))
            }
            other => Err(Status::internal(format!("compact answered with {other:?}"))),
        }
    }
}
