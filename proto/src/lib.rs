//! Every wire format Capstan speaks, generated from the .proto files in `proto/`:
//!
//! - [`etcdserverpb`] and [`mvccpb`]: the etcd v3 gRPC API (KV, Watch, Lease, Cluster,
//!   Maintenance, Auth) and [`authpb`], field for field as etcd defines it, so etcd clients work unchanged.
//! - [`raftpb`]: Capstan's replicated command, its Raft log entry and the peer service.
//! - [`agentpb`]: the node agent's log service.
//! - [`objects`]: the cluster objects (Node, Pod, ReplicaSet) in Kubernetes' shape, their
//!   store keys and JSON encoding, manifests, resource quantities and validation.
//!
//! This crate does no IO; its logic is encoding, decoding and validating.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");

    impl TxnResponse {
        /// Calls `visit` on the header of this response and of every response inside it,
        /// nested txns included (etcd sets them all).
        pub fn visit_headers(&mut self, visit: &mut impl FnMut(&mut Option<ResponseHeader>)) {
            use response_op::Response;
            visit(&mut self.header);
            for op in &mut self.responses {
                match &mut op.response {
                    Some(Response::ResponseRange(inner)) => visit(&mut inner.header),
                    Some(Response::ResponsePut(inner)) => visit(&mut inner.header),
                    Some(Response::ResponseDeleteRange(inner)) => visit(&mut inner.header),
                    Some(Response::ResponseTxn(inner)) => inner.visit_headers(visit),
                    None => {}
                }
            }
        }
    }
}

pub mod objects;

pub mod agentpb {
    tonic::include_proto!("capstanagentpb");
}

pub mod raftpb {
    tonic::include_proto!("capstanraftpb");
}
