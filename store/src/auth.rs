//! Users, roles and key permissions: etcd's auth store.
//!
//! Auth changes are commands like any write, so every member holds the same users and
//! roles; they change no key and no revision, only the auth revision. The whole auth state
//! is small (users and roles, not keys), so the store keeps it in memory as an
//! [`AuthState`], loaded from the `auth` family at open and replaced after each change.
//!
//! A client's command carries its caller ([`capstan_proto::raftpb::Caller`]); while auth is
//! enabled it is checked as it applies ([`AuthState::check_command`]), against the auth
//! state of that point in the log, so a revoked permission refuses every write that comes
//! after the revoke on every member. Passwords arrive already hashed: hashing is salted,
//! hence not deterministic, and belongs to the member that proposes.

use std::collections::BTreeMap;

use prost::Message;
use rocksdb::WriteBatch;

use capstan_proto::authpb::{self, permission::Type as PermissionType};
use capstan_proto::etcdserverpb as pb;
use capstan_proto::raftpb::command::Request;

use crate::codec;
use crate::error::{Result, StoreError};
use crate::read::Reader;

/// The user whose role makes it an administrator, and that role.
pub const ROOT: &str = "root";

/// What a caller wants to do with keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Every user and role, and whether auth is enforced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthState {
    pub enabled: bool,
    /// Counts auth changes (etcd's auth revision).
    pub revision: u64,
    token_key: Vec<u8>,
    users: BTreeMap<String, authpb::User>,
    roles: BTreeMap<String, authpb::Role>,
}

impl AuthState {
    pub(crate) fn load(reader: &Reader) -> Result<AuthState> {
        let mut state = AuthState::default();
        let mut iter = reader.iter(codec::CF_AUTH, None);
        iter.seek_to_first();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            let corrupt =
                |what: &str| StoreError::Corrupt(format!("auth record {:?}: {what}", String::from_utf8_lossy(key)));
            if key == codec::AUTH_ENABLED {
                state.enabled = value == [1];
            } else if key == codec::AUTH_REVISION {
                state.revision = u64::from_be_bytes(value.try_into().map_err(|_| corrupt("not 8 bytes"))?);
            } else if key == codec::AUTH_TOKEN_KEY {
                state.token_key = value.to_vec();
            } else if let Some(name) = key.strip_prefix(codec::AUTH_USER_PREFIX) {
                let user = authpb::User::decode(value).map_err(|error| corrupt(&error.to_string()))?;
                state.users.insert(String::from_utf8_lossy(name).into_owned(), user);
            } else if let Some(name) = key.strip_prefix(codec::AUTH_ROLE_PREFIX) {
                let role = authpb::Role::decode(value).map_err(|error| corrupt(&error.to_string()))?;
                state.roles.insert(String::from_utf8_lossy(name).into_owned(), role);
            } else {
                return Err(corrupt("unknown record"));
            }
            iter.next();
        }
        iter.status()?;
        Ok(state)
    }

    /// The key that signs this cluster's tokens (empty until auth is first enabled).
    pub fn token_key(&self) -> &[u8] {
        &self.token_key
    }

    pub fn user(&self, name: &str) -> Option<&authpb::User> {
        self.users.get(name)
    }

    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// A role's permissions; the root role may hold every key without a record of its own.
    pub fn role_permissions(&self, name: &str) -> Result<Vec<authpb::Permission>> {
        if name == ROOT {
            let everything =
                authpb::Permission { perm_type: PermissionType::Readwrite.into(), key: vec![0], range_end: vec![0] };
            return Ok(vec![everything]);
        }
        Ok(self.roles.get(name).ok_or(StoreError::RoleNotFound)?.key_permission.clone())
    }

    /// Whether `user` holds the root role.
    pub fn is_root(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|user| user.roles.iter().any(|role| role == ROOT))
    }

    /// Refuses `user` unless it exists (with auth off, anyone may do anything).
    pub fn check_user(&self, user: &str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(StoreError::UserEmpty);
        }
        if !self.users.contains_key(user) {
            return Err(StoreError::PermissionDenied);
        }
        Ok(())
    }

    /// Refuses `user` unless it holds the root role.
    pub fn check_admin(&self, user: &str) -> Result<()> {
        self.check_user(user)?;
        if self.enabled && !self.is_root(user) {
            return Err(StoreError::PermissionDenied);
        }
        Ok(())
    }

    /// Refuses `user` unless its roles grant `access` to every key in [key, range_end)
    /// (etcd's range conventions: an empty end is the key alone, `\0` is every key from it).
    pub fn check(&self, user: &str, access: Access, key: &[u8], range_end: &[u8]) -> Result<()> {
        self.check_user(user)?;
        if !self.enabled || self.is_root(user) {
            return Ok(());
        }
        let granted: Vec<Interval> = self.users[user]
            .roles
            .iter()
            .filter_map(|role| self.roles.get(role))
            .flat_map(|role| &role.key_permission)
            .filter(|permission| grants(permission, access))
            .map(|permission| Interval::of(&permission.key, &permission.range_end))
            .collect();
        if Interval::of(key, range_end).covered_by(&granted) {
            Ok(())
        } else {
            Err(StoreError::PermissionDenied)
        }
    }

    /// Whether `caller` may run `request`, as it applies: keys need their permission
    /// (a txn's compares and every op of both branches too), auth changes need root
    /// (a user may change its own password).
    pub(crate) fn check_command(&self, caller: &str, request: &Request, reader: &Reader) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        match request {
            Request::Put(put) => self.check_put(caller, put),
            Request::DeleteRange(delete) => self.check_delete(caller, delete),
            Request::Txn(txn) => self.check_txn(caller, txn),
            Request::LeaseGrant(_) => self.check_user(caller),
            Request::LeaseRevoke(revoke) => {
                self.check_user(caller)?;
                for key in reader.lease_keys(revoke.id)? {
                    self.check(caller, Access::Write, &key, &[])?;
                }
                Ok(())
            }
            Request::UserChangePassword(change) if change.name == caller => self.check_user(caller),
            Request::Batch(_) => Err(StoreError::BatchNotUnrolled),
            // Compaction and every auth change are root's, and so is any command not named
            // above: what is not granted is refused.
            _ => self.check_admin(caller),
        }
    }

    fn check_put(&self, caller: &str, put: &pb::PutRequest) -> Result<()> {
        self.check(caller, Access::Write, &put.key, &[])?;
        if put.prev_kv {
            self.check(caller, Access::Read, &put.key, &[])?;
        }
        Ok(())
    }

    fn check_delete(&self, caller: &str, delete: &pb::DeleteRangeRequest) -> Result<()> {
        self.check(caller, Access::Write, &delete.key, &delete.range_end)?;
        if delete.prev_kv {
            self.check(caller, Access::Read, &delete.key, &delete.range_end)?;
        }
        Ok(())
    }

    /// A txn is checked whole, whichever branch it takes, so that whether it is refused
    /// does not depend on (and so does not reveal) the keys it compares.
    pub fn check_txn(&self, caller: &str, txn: &pb::TxnRequest) -> Result<()> {
        use pb::request_op::Request as Op;
        for compare in &txn.compare {
            self.check(caller, Access::Read, &compare.key, &compare.range_end)?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            match &op.request {
                Some(Op::RequestRange(range)) => self.check(caller, Access::Read, &range.key, &range.range_end)?,
                Some(Op::RequestPut(put)) => self.check_put(caller, put)?,
                Some(Op::RequestDeleteRange(delete)) => self.check_delete(caller, delete)?,
                Some(Op::RequestTxn(nested)) => self.check_txn(caller, nested)?,
                None => {}
            }
        }
        self.check_user(caller)
    }

    /// Applies an auth change to this state; any other request changes nothing.
    pub(crate) fn change(&mut self, request: &Request) -> Result<()> {
        match request {
            Request::AuthEnable(enable) => {
                let root = self.users.get(ROOT).ok_or(StoreError::RootUserNotExist)?;
                if !root.roles.iter().any(|role| role == ROOT) {
                    return Err(StoreError::RootRoleNotExist);
                }
                if !self.enabled {
                    self.enabled = true;
                    self.token_key = enable.token_key.clone();
                }
            }
            Request::AuthDisable(_) => self.enabled = false,
            Request::UserAdd(add) => {
                if add.name.is_empty() {
                    return Err(StoreError::UserEmpty);
                }
                if self.users.contains_key(&add.name) {
                    return Err(StoreError::UserExists);
                }
                let no_password = add.options.as_ref().is_some_and(|options| options.no_password);
                if add.hashed_password.is_empty() && !no_password {
                    return Err(StoreError::PasswordEmpty);
                }
                let user = authpb::User {
                    name: add.name.clone().into_bytes(),
                    password: if no_password { Vec::new() } else { add.hashed_password.clone().into_bytes() },
                    roles: Vec::new(),
                    options: add.options,
                };
                self.users.insert(add.name.clone(), user);
            }
            Request::UserDelete(delete) => {
                if self.enabled && delete.name == ROOT {
                    return Err(StoreError::InvalidAuthManagement);
                }
                self.users.remove(&delete.name).ok_or(StoreError::UserNotFound)?;
            }
            Request::UserChangePassword(change) => {
                let user = self.users.get_mut(&change.name).ok_or(StoreError::UserNotFound)?;
                if change.hashed_password.is_empty() {
                    return Err(StoreError::PasswordEmpty);
                }
                user.password = change.hashed_password.clone().into_bytes();
                user.options = None;
            }
            Request::UserGrantRole(grant) => {
                if grant.role != ROOT && !self.roles.contains_key(&grant.role) {
                    return Err(StoreError::RoleNotFound);
                }
                let user = self.users.get_mut(&grant.user).ok_or(StoreError::UserNotFound)?;
                if let Err(at) = user.roles.binary_search(&grant.role) {
                    user.roles.insert(at, grant.role.clone());
                }
            }
            Request::UserRevokeRole(revoke) => {
                if self.enabled && revoke.name == ROOT && revoke.role == ROOT {
                    return Err(StoreError::InvalidAuthManagement);
                }
                let user = self.users.get_mut(&revoke.name).ok_or(StoreError::UserNotFound)?;
                let at = user.roles.binary_search(&revoke.role).map_err(|_| StoreError::RoleNotGranted)?;
                user.roles.remove(at);
            }
            Request::RoleAdd(add) => {
                if add.name.is_empty() {
                    return Err(StoreError::RoleEmpty);
                }
                if self.roles.contains_key(&add.name) {
                    return Err(StoreError::RoleExists);
                }
                let role = authpb::Role { name: add.name.clone().into_bytes(), key_permission: Vec::new() };
                self.roles.insert(add.name.clone(), role);
            }
            Request::RoleDelete(delete) => {
                if self.enabled && delete.role == ROOT {
                    return Err(StoreError::InvalidAuthManagement);
                }
                self.roles.remove(&delete.role).ok_or(StoreError::RoleNotFound)?;
                for user in self.users.values_mut() {
                    user.roles.retain(|role| *role != delete.role);
                }
            }
            Request::RoleGrantPermission(grant) => {
                let role = self.roles.get_mut(&grant.name).ok_or(StoreError::RoleNotFound)?;
                let permission = grant.perm.clone().ok_or(StoreError::PermissionNotGiven)?;
                if permission.key.is_empty() {
                    return Err(StoreError::KeyNotProvided);
                }
                let place = (&permission.key, &permission.range_end);
                match role.key_permission.binary_search_by(|held| (&held.key, &held.range_end).cmp(&place)) {
                    Ok(at) => role.key_permission[at] = permission,
                    Err(at) => role.key_permission.insert(at, permission),
                }
            }
            Request::RoleRevokePermission(revoke) => {
                let role = self.roles.get_mut(&revoke.role).ok_or(StoreError::RoleNotFound)?;
                let at = role
                    .key_permission
                    .iter()
                    .position(|held| held.key == revoke.key && held.range_end == revoke.range_end)
                    .ok_or(StoreError::PermissionNotGranted)?;
                role.key_permission.remove(at);
            }
            _ => return Ok(()),
        }
        self.revision += 1;
        Ok(())
    }

    /// Writes into `batch` what differs between `before` and this state.
    pub(crate) fn write_changes(&self, before: &AuthState, batch: &mut WriteBatch, family: &rocksdb::ColumnFamily) {
        if self.enabled != before.enabled {
            batch.put_cf(family, codec::AUTH_ENABLED, [u8::from(self.enabled)]);
        }
        if self.revision != before.revision {
            batch.put_cf(family, codec::AUTH_REVISION, self.revision.to_be_bytes());
        }
        if self.token_key != before.token_key {
            batch.put_cf(family, codec::AUTH_TOKEN_KEY, &self.token_key);
        }
        write_map_changes(&before.users, &self.users, codec::auth_user_key, batch, family);
        write_map_changes(&before.roles, &self.roles, codec::auth_role_key, batch, family);
    }
}

fn write_map_changes<T: Message + PartialEq>(
    before: &BTreeMap<String, T>,
    after: &BTreeMap<String, T>,
    key: fn(&str) -> Vec<u8>,
    batch: &mut WriteBatch,
    family: &rocksdb::ColumnFamily,
) {
    for name in before.keys().filter(|name| !after.contains_key(*name)) {
        batch.delete_cf(family, key(name));
    }
    for (name, value) in after.iter().filter(|(name, value)| before.get(*name) != Some(value)) {
        batch.put_cf(family, key(name), value.encode_to_vec());
    }
}

fn grants(permission: &authpb::Permission, access: Access) -> bool {
    match PermissionType::try_from(permission.perm_type) {
        Ok(PermissionType::Readwrite) => true,
        Ok(PermissionType::Read) => access == Access::Read,
        Ok(PermissionType::Write) => access == Access::Write,
        Err(_) => false,
    }
}

/// Keys from `start` up to `end` (exclusive); `None` is no end.
#[derive(Debug)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    /// The keys etcd's (key, range_end) names. A range that ends before it starts names
    /// no key in a request, but is checked as the key alone, which can only refuse more.
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        let single = || {
            let mut end = key.to_vec();
            end.push(0);
            Some(end)
        };
        let end = match range_end {
            [] => single(),
            [0] => None,
            end if end <= key => single(),
            end => Some(end.to_vec()),
        };
        Interval { start: key.to_vec(), end }
    }

    /// Whether `position` is at or past this interval's end.
    fn ends_by(&self, position: &[u8]) -> bool {
        self.end.as_deref().is_some_and(|end| position >= end)
    }

    /// Whether the union of `granted` holds every key of this interval: walk from the
    /// start, each step jumping to the furthest end of a granted interval holding the
    /// current position, until past the end or at a gap.
    fn covered_by(&self, granted: &[Interval]) -> bool {
        let mut position = self.start.clone();
        loop {
            if self.ends_by(&position) {
                return true;
            }
            let furthest = granted
                .iter()
                .filter(|interval| interval.start <= position && !interval.ends_by(&position))
                .map(|interval| &interval.end)
                .max_by(|a, b| match (a, b) {
                    (None, None) => std::cmp::Ordering::Equal,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (Some(a), Some(b)) => a.cmp(b),
                });
            match furthest {
                None => return false,
                Some(None) => return true,
                Some(Some(end)) => position = end.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permission(access: PermissionType, key: &str, range_end: &str) -> authpb::Permission {
        authpb::Permission { perm_type: access.into(), key: key.into(), range_end: range_end.into() }
    }

    /// Auth on, root, and `alice` with a role holding `permissions`.
    fn state(permissions: Vec<authpb::Permission>) -> AuthState {
        let mut state = AuthState::default();
        let changes = [
            Request::UserAdd(pb::AuthUserAddRequest {
                name: ROOT.into(),
                hashed_password: "h".into(),
                ..Default::default()
            }),
            Request::UserGrantRole(pb::AuthUserGrantRoleRequest { user: ROOT.into(), role: ROOT.into() }),
            Request::UserAdd(pb::AuthUserAddRequest {
                name: "alice".into(),
                hashed_password: "h".into(),
                ..Default::default()
            }),
            Request::RoleAdd(pb::AuthRoleAddRequest { name: "reader".into() }),
            Request::UserGrantRole(pb::AuthUserGrantRoleRequest { user: "alice".into(), role: "reader".into() }),
            Request::AuthEnable(capstan_proto::raftpb::AuthEnable { token_key: vec![7] }),
        ];
        for change in changes {
            state.change(&change).unwrap();
        }
        for perm in permissions {
            let grant = pb::AuthRoleGrantPermissionRequest { name: "reader".into(), perm: Some(perm) };
            state.change(&Request::RoleGrantPermission(grant)).unwrap();
        }
        state
    }

    fn allowed(state: &AuthState, access: Access, key: &str, range_end: &str) -> bool {
        match state.check("alice", access, key.as_bytes(), range_end.as_bytes()) {
            Ok(()) => true,
            Err(StoreError::PermissionDenied) => false,
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn a_prefix_grant_covers_its_keys_and_ranges_and_nothing_else() {
        let state = state(vec![permission(PermissionType::Read, "/a/", "/a0")]);
        assert!(allowed(&state, Access::Read, "/a/x", ""));
        assert!(allowed(&state, Access::Read, "/a/", "/a0"));
        assert!(allowed(&state, Access::Read, "/a/b", "/a/c"));
        assert!(!allowed(&state, Access::Write, "/a/x", ""), "read does not grant write");
        assert!(!allowed(&state, Access::Read, "/b/", ""));
        assert!(!allowed(&state, Access::Read, "/a/", "/b"), "a range reaching past the grant");
        assert!(!allowed(&state, Access::Read, "/a/", "\0"), "every key from /a/ on");
        assert!(!allowed(&state, Access::Read, "/", "/a/x"), "a range starting before the grant");
    }

    #[test]
    fn adjoining_grants_cover_a_range_together_and_a_gap_refuses_it() {
        let adjoining =
            state(vec![permission(PermissionType::Readwrite, "a", "m"), permission(PermissionType::Read, "m", "\0")]);
        assert!(allowed(&adjoining, Access::Read, "b", "\0"));
        assert!(!allowed(&adjoining, Access::Write, "b", "\0"));
        assert!(allowed(&adjoining, Access::Write, "b", "c"));
        let gap = state(vec![permission(PermissionType::Read, "a", "m"), permission(PermissionType::Read, "n", "z")]);
        assert!(!allowed(&gap, Access::Read, "b", "p"));
        assert!(allowed(&gap, Access::Read, "o", ""));
        let single = state(vec![permission(PermissionType::Write, "k", "")]);
        assert!(allowed(&single, Access::Write, "k", ""));
        assert!(!allowed(&single, Access::Write, "k\0", ""));
        assert!(!allowed(&single, Access::Write, "k", "l"));
    }

    #[test]
    fn a_txn_needs_every_op_of_both_branches() {
        use pb::request_op::Request as Op;
        let state = state(vec![permission(PermissionType::Readwrite, "/a/", "/a0")]);
        let put = |key: &str| pb::RequestOp {
            request: Some(Op::RequestPut(pb::PutRequest { key: key.into(), ..Default::default() })),
        };
        let txn = |success, failure| pb::TxnRequest { compare: Vec::new(), success, failure };
        assert!(state.check_txn("alice", &txn(vec![put("/a/1")], vec![put("/a/2")])).is_ok());
        assert!(matches!(
            state.check_txn("alice", &txn(vec![put("/a/1")], vec![put("/b/2")])),
            Err(StoreError::PermissionDenied)
        ));
        let nested = pb::RequestOp { request: Some(Op::RequestTxn(txn(vec![], vec![put("/b/1")]))) };
        assert!(state.check_txn("alice", &txn(vec![nested], vec![])).is_err());
        assert!(matches!(state.check_txn("", &txn(vec![], vec![])), Err(StoreError::UserEmpty)));
    }

    #[test]
    fn root_may_do_anything_and_unknown_users_nothing() {
        let state = state(vec![]);
        assert!(state.check(ROOT, Access::Write, b"\0", b"\0").is_ok());
        assert!(matches!(state.check("mallory", Access::Read, b"a", b""), Err(StoreError::PermissionDenied)));
        assert!(matches!(state.check_admin("alice"), Err(StoreError::PermissionDenied)));
    }

    #[test]
    fn auth_needs_root_and_keeps_it() {
        let mut state = AuthState::default();
        let enable = Request::AuthEnable(capstan_proto::raftpb::AuthEnable { token_key: vec![1] });
        assert!(matches!(state.change(&enable), Err(StoreError::RootUserNotExist)));
        let add_root = Request::UserAdd(pb::AuthUserAddRequest {
            name: ROOT.into(),
            hashed_password: "h".into(),
            ..Default::default()
        });
        state.change(&add_root).unwrap();
        assert!(matches!(state.change(&enable), Err(StoreError::RootRoleNotExist)));
        let state = self::state(vec![]);
        let mut changed = state.clone();
        let delete_root = Request::UserDelete(pb::AuthUserDeleteRequest { name: ROOT.into() });
        assert!(matches!(changed.change(&delete_root), Err(StoreError::InvalidAuthManagement)));
        let revoke = Request::UserRevokeRole(pb::AuthUserRevokeRoleRequest { name: ROOT.into(), role: ROOT.into() });
        assert!(matches!(changed.change(&revoke), Err(StoreError::InvalidAuthManagement)));
        assert_eq!(changed, state, "a refused change changes nothing");
    }

    #[test]
    fn deleting_a_role_takes_it_from_its_users() {
        let mut state = state(vec![permission(PermissionType::Read, "a", "")]);
        assert!(allowed(&state, Access::Read, "a", ""));
        let revision = state.revision;
        state.change(&Request::RoleDelete(pb::AuthRoleDeleteRequest { role: "reader".into() })).unwrap();
        assert!(!allowed(&state, Access::Read, "a", ""));
        assert!(state.user("alice").unwrap().roles.is_empty());
        assert_eq!(state.revision, revision + 1);
    }
}
