//! Every wire format Capstan speaks, generated from the .proto files in `proto/`:
//!
//! - [`etcdserverpb`] and [`mvccpb`]: the etcd v3 gRPC API (KV, Watch, Lease, Cluster,
//!   Maintenance), field for field as etcd defines it, so etcd clients work unchanged.
//! - [`raftpb`]: Capstan's replicated command, its Raft log entry and the peer service.
//!
//! This crate does no IO and holds no logic beyond small conversions of generated types.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod raftpb {
    tonic::include_proto!("capstanraftpb");
}
