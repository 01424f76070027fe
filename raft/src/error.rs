//! Errors of the Raft layer.

/// A persisted or received Raft message that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("required field {0} is missing")]
    Missing(&'static str),
    #[error("log key of {0} bytes, want 8")]
    LogKey(usize),
}

/// Why a plane's Raft could not start.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error(transparent)]
    Store(#[from] capstan_store::StoreError),
    #[error("raft: {0}")]
    Storage(#[from] openraft::StorageError<u64>),
    #[error("raft config: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("raft: {0}")]
    Fatal(#[from] openraft::error::Fatal<u64>),
    #[error("data directory belongs to cluster {found:x}, this plane is configured for cluster {expected:x}")]
    ClusterMismatch { found: u64, expected: u64 },
    #[error("data directory belongs to member {found:x}, this plane is configured as member {expected:x}")]
    MemberMismatch { found: u64, expected: u64 },
    #[error("raft meta: {0}")]
    Decode(#[from] DecodeError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
