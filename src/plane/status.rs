//! etcd's gRPC errors. etcd clients recognise errors by code and exact message (Go's
//! clientv3 compares the strings), so every message here is etcd's, word for word.

use capstan_store::StoreError;
use tonic::{Code, Status};

pub const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
pub const REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
pub const NO_LEADER: &str = "etcdserver: no leader";
pub const LEADER_CHANGED: &str = "etcdserver: leader changed";
/// The plane asked is not the leader; nothing was done, so asking again is safe.
pub const NOT_LEADER: &str = "etcdserver: not leader";

pub fn not_leader() -> Status {
    Status::unavailable(NOT_LEADER)
}

/// tonic's answer when a plane could not even connect to the leader it forwards to (it
/// died, and no new leader is known yet): the request was never sent, so it is as safe to
/// send again as "not leader".
const LEADER_UNREACHED: &str = "tcp connect error";

/// Whether nothing was done and the request may go to the next leader.
pub fn is_retryable_on_leader_change(status: &Status) -> bool {
    status.code() == Code::Unavailable && (status.message() == NOT_LEADER || status.message() == LEADER_UNREACHED)
}
pub const STOPPED: &str = "etcdserver: server stopped";

pub fn stopped() -> Status {
    Status::unavailable(STOPPED)
}

pub const TIMEOUT: &str = "etcdserver: request timed out";

pub fn no_space() -> Status {
    Status::resource_exhausted(NO_SPACE)
}

pub fn request_too_large() -> Status {
    Status::invalid_argument(REQUEST_TOO_LARGE)
}

/// The status an etcd server returns for `error`.
pub fn from_store(error: &StoreError) -> Status {
    let (code, message) = match error {
        StoreError::KeyNotProvided => (Code::InvalidArgument, "etcdserver: key is not provided"),
        StoreError::KeyNotFound => (Code::InvalidArgument, "etcdserver: key not found"),
        StoreError::ValueProvided => (Code::InvalidArgument, "etcdserver: value is provided"),
        StoreError::LeaseProvided => (Code::InvalidArgument, "etcdserver: lease is provided"),
        StoreError::DuplicateKey => (Code::InvalidArgument, "etcdserver: duplicate key given in txn request"),
        StoreError::TooManyOps { .. } => (Code::InvalidArgument, "etcdserver: too many operations in txn request"),
        StoreError::Compacted { .. } => (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
        StoreError::FutureRevision { .. } => {
            (Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision")
        }
        StoreError::LeaseNotFound { .. } => (Code::NotFound, "etcdserver: requested lease not found"),
        StoreError::LeaseExists { .. } => (Code::FailedPrecondition, "etcdserver: lease already exists"),
        StoreError::LeaseTtlTooLarge { .. } => (Code::OutOfRange, "etcdserver: too large lease TTL"),
        StoreError::PermissionDenied => (Code::PermissionDenied, "etcdserver: permission denied"),
        StoreError::UserEmpty
        | StoreError::RoleEmpty
        | StoreError::PasswordEmpty
        | StoreError::PermissionNotGiven
        | StoreError::InvalidAuthManagement => return Status::invalid_argument(format!("etcdserver: {error}")),
        StoreError::AuthNotEnabled
        | StoreError::UserExists
        | StoreError::UserNotFound
        | StoreError::RoleExists
        | StoreError::RoleNotFound
        | StoreError::RoleNotGranted
        | StoreError::PermissionNotGranted
        | StoreError::RootUserNotExist
        | StoreError::RootRoleNotExist => return Status::failed_precondition(format!("etcdserver: {error}")),
        StoreError::LeaseIdInvalid { .. } | StoreError::EmptyCommand | StoreError::BatchNotUnrolled => {
            return Status::invalid_argument(format!("etcdserver: {error}"));
        }
        StoreError::Corrupt(_) | StoreError::SnapshotInvalid(_) => (Code::DataLoss, "etcdserver: corrupt cluster"),
        StoreError::Locked { .. } | StoreError::Foreign { .. } | StoreError::Rocks(_) | StoreError::Io(_) => {
            tracing::error!(%error, "storage failure");
            (Code::Unavailable, STOPPED)
        }
    };
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_etcds() {
        let status = from_store(&StoreError::Compacted { compacted: 5 });
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(status.message(), "etcdserver: mvcc: required revision has been compacted");
        assert_eq!(from_store(&StoreError::LeaseNotFound { id: 1 }).code(), Code::NotFound);
        assert_eq!(from_store(&StoreError::KeyNotProvided).message(), "etcdserver: key is not provided");
        let root = from_store(&StoreError::RootRoleNotExist);
        assert_eq!(
            (root.code(), root.message()),
            (Code::FailedPrecondition, "etcdserver: root user does not have root role")
        );
        let empty = from_store(&StoreError::UserEmpty);
        assert_eq!((empty.code(), empty.message()), (Code::InvalidArgument, "etcdserver: user name is empty"));
        let management = from_store(&StoreError::InvalidAuthManagement);
        assert_eq!(management.message(), "etcdserver: invalid auth management");
    }
}
