//! The store's errors: one variant per case a caller can act on. The plane maps each to the
//! gRPC status and message etcd uses (see `src/plane/status.rs`).

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key is not provided")]
    KeyNotProvided,
    #[error("key not found")]
    KeyNotFound,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    #[error("too many operations in txn request ({ops} > {max})")]
    TooManyOps { ops: usize, max: usize },
    #[error("mvcc: required revision has been compacted (compacted revision {compacted})")]
    Compacted { compacted: i64 },
    #[error("mvcc: required revision is a future revision (requested {requested}, current {current})")]
    FutureRevision { requested: i64, current: i64 },
    #[error("requested lease not found")]
    LeaseNotFound { id: i64 },
    #[error("lease already exists")]
    LeaseExists { id: i64 },
    #[error("too large lease TTL ({ttl_secs}s > {max_secs}s)")]
    LeaseTtlTooLarge { ttl_secs: i64, max_secs: i64 },
    #[error("lease ID must be positive, got {id}")]
    LeaseIdInvalid { id: i64 },
    #[error("authentication is not enabled")]
    AuthNotEnabled,
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name already exists")]
    UserExists,
    #[error("user name not found")]
    UserNotFound,
    #[error("password is empty")]
    PasswordEmpty,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("role name already exists")]
    RoleExists,
    #[error("role name not found")]
    RoleNotFound,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission not given")]
    PermissionNotGiven,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    /// Deliberately says nothing of which key or permission: an unauthorised caller learns
    /// nothing about the keys it may not touch.
    #[error("permission denied")]
    PermissionDenied,
    #[error("root user does not exist")]
    RootUserNotExist,
    #[error("root user does not have root role")]
    RootRoleNotExist,
    /// Deleting root, or taking the root role from it, while auth is enabled.
    #[error("invalid auth management")]
    InvalidAuthManagement,
    #[error("command has no request")]
    EmptyCommand,
    #[error("a command batch is applied one command at a time, by the caller")]
    BatchNotUnrolled,
    #[error("data directory {path} is in use by another process: {detail}")]
    Locked { path: String, detail: String },
    #[error("data directory {path} is not a Capstan store: {detail}")]
    Foreign { path: String, detail: String },
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("snapshot is invalid: {0}")]
    SnapshotInvalid(String),
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Whether this error comes from the request (the same request fails the same way on
    /// every replica) rather than from the disk or the store's own state.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            StoreError::Locked { .. }
                | StoreError::Foreign { .. }
                | StoreError::Corrupt(_)
                | StoreError::SnapshotInvalid(_)
                | StoreError::Rocks(_)
                | StoreError::Io(_)
        )
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
