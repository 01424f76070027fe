//! etcd's Auth service, and who each request comes from.
//!
//! **Authentication.** `Authenticate` checks a password against its bcrypt hash and returns
//! a token that clients send in the `token` metadata of every later call (etcd clients do
//! this by themselves given a user and password). Tokens are stateless:
//! `user.expiry.mac`, where the MAC (HMAC-SHA-256 under the key the cluster chose when auth
//! was enabled) covers the user, the expiry and the user's password hash. So any plane
//! verifies a token any plane issued, a failover loses no session, and changing a password
//! or deleting a user ends that user's tokens at once. With `--client-cert-auth`, a call
//! without a token is the user its certificate's CN names.
//!
//! **Authorisation.** A write carries its caller into the command and is checked as it
//! applies, in log order ([`capstan_store::AuthState::check_command`]). Reads, watches and
//! the rest are checked here against this plane's auth state, after the read's barrier
//! when it is linearizable.
//!
//! **Audit.** Every refusal and every auth change is logged on the `audit` target, with the
//! user and the method; refusals tell the client only etcd's generic error, never a key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::Mac;
use tonic::{Request, Response, Status};

use capstan_proto::etcdserverpb::{self as pb, auth_server::Auth};
use capstan_proto::raftpb::{self, command, Command};
use capstan_store::{AuthState, CommandResponse, StoreError};

use super::{status, Plane};

/// The metadata key etcd clients put their token under.
pub const TOKEN_METADATA: &str = "token";
/// etcd's `--auth-token-ttl` default.
pub const TOKEN_TTL_SECS_DEFAULT: u64 = 300;
/// etcd's `--bcrypt-cost` default; bcrypt accepts 4 to 31.
pub const BCRYPT_COST_DEFAULT: u32 = 10;
pub const BCRYPT_COST_MIN: u32 = 4;
pub const BCRYPT_COST_MAX: u32 = 31;
const TOKEN_KEY_BYTES: usize = 32;
const INVALID_TOKEN: &str = "etcdserver: invalid auth token";
const AUTH_FAILED: &str = "etcdserver: authentication failed, invalid user ID or password";
/// What an unknown user's password is checked against: a hash of the empty password (which
/// no user can have) at the plane's cost, made at the first such check.
static NO_USER_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// How the plane authenticates (etcd's `--auth-token-ttl` and `--bcrypt-cost`).
#[derive(Clone, Copy, Debug)]
pub struct AuthConfig {
    pub token_ttl: Duration,
    pub bcrypt_cost: u32,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig { token_ttl: Duration::from_secs(TOKEN_TTL_SECS_DEFAULT), bcrypt_cost: BCRYPT_COST_DEFAULT }
    }
}

/// Who made a call, and which call it was (for the audit log).
pub struct Caller {
    /// Empty when the call named no user.
    pub user: String,
    method: &'static str,
    /// The token the user was read from, and the auth revision it was checked at: a check
    /// made later (after a read's barrier) against a newer auth state checks it again.
    token: Option<(String, u64)>,
}

fn token_mac(key: &[u8], user: &str, expiry_secs: u64, password_hash: &[u8]) -> HmacSha256 {
    // Infallible: HMAC takes keys of any length.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(&(user.len() as u64).to_be_bytes());
    mac.update(user.as_bytes());
    mac.update(&expiry_secs.to_be_bytes());
    mac.update(password_hash);
    mac
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// A token for `user`, valid until `now + ttl`.
fn issue_token(auth: &AuthState, user: &str, password_hash: &[u8], ttl: Duration, now: SystemTime) -> String {
    let expiry_secs = unix_secs(now + ttl);
    let mac = token_mac(auth.token_key(), user, expiry_secs, password_hash).finalize().into_bytes();
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!("{}.{expiry_secs}.{}", encode(user.as_bytes()), encode(&mac))
}

/// The user a token names, if it is this cluster's, unexpired, and the user still has the
/// password it was issued under.
fn verify_token(auth: &AuthState, token: &str, now: SystemTime) -> Option<String> {
    let decode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok();
    let mut parts = token.split('.');
    let user = String::from_utf8(decode(parts.next()?)?).ok()?;
    let expiry_secs: u64 = parts.next()?.parse().ok()?;
    let mac = decode(parts.next()?)?;
    if parts.next().is_some() || expiry_secs <= unix_secs(now) {
        return None;
    }
    let password_hash = &auth.user(&user)?.password;
    token_mac(auth.token_key(), &user, expiry_secs, password_hash).verify_slice(&mac).ok()?;
    Some(user)
}

/// The CN of a DER certificate's subject.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = certificate.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}

fn audit_refused(caller: &Caller, reason: &dyn std::fmt::Display) {
    tracing::warn!(target: "audit", user = %caller.user, method = caller.method, %reason, "refused");
}

/// Whether a status is an auth refusal (to audit refusals that come back from the log).
fn is_refusal(status: &Status) -> bool {
    status.code() == tonic::Code::PermissionDenied
        || status.message() == status::from_store(&StoreError::UserEmpty).message()
}

impl Plane {
    /// Who is calling: the user of the call's token, else (with `--client-cert-auth`) the
    /// CN of its certificate, else nobody. With auth off, nobody is checked.
    pub(super) fn caller<T>(&self, request: &Request<T>, method: &'static str) -> Result<Caller, Status> {
        let mut caller = Caller { user: String::new(), method, token: None };
        let auth = self.store.auth();
        if !auth.enabled {
            return Ok(caller);
        }
        if let Some(token) = request.metadata().get(TOKEN_METADATA) {
            let token = token.to_str().ok();
            let user = token.and_then(|token| verify_token(&auth, token, SystemTime::now()));
            return match user {
                Some(user) => {
                    caller.user = user;
                    caller.token = token.map(|token| (token.to_string(), auth.revision));
                    Ok(caller)
                }
                None => {
                    audit_refused(&caller, &"invalid or expired token");
                    Err(Status::unauthenticated(INVALID_TOKEN))
                }
            };
        }
        if self.config.client_tls.as_ref().is_some_and(|tls| tls.client_cert_auth) {
            let certificates = request.peer_certs();
            if let Some(name) = certificates.as_ref().and_then(|certificates| common_name(certificates.first()?)) {
                caller.user = name;
            }
        }
        Ok(caller)
    }

    /// A token for `user` if `password` is theirs. An unknown user costs the same bcrypt
    /// check as a known one, so the time taken does not tell which users exist.
    pub(super) async fn authenticate(&self, user: &str, password: String) -> Result<String, Status> {
        let caller = Caller { user: user.to_string(), method: "Authenticate", token: None };
        let auth = self.store.auth();
        if !auth.enabled {
            return Err(status::from_store(&StoreError::AuthNotEnabled));
        }
        let hash = auth.user(user).map(|user| user.password.clone()).filter(|hash| !hash.is_empty());
        let known = hash.clone();
        let cost = self.config.auth.bcrypt_cost;
        let matches = tokio::task::spawn_blocking(move || {
            let unknown = || NO_USER_HASH.get_or_init(|| bcrypt::hash("", cost).unwrap_or_default()).clone();
            let checked_against = known.map_or_else(unknown, |hash| String::from_utf8_lossy(&hash).into_owned());
            bcrypt::verify(password, &checked_against).unwrap_or(false)
        })
        .await
        .map_err(|error| Status::internal(error.to_string()))?;
        let Some(hash) = hash.filter(|_| matches) else {
            audit_refused(&caller, &"wrong user or password");
            return Err(Status::invalid_argument(AUTH_FAILED));
        };
        tracing::info!(target: "audit", %user, "authenticated");
        Ok(issue_token(&auth, user, &hash, self.config.auth.token_ttl, SystemTime::now()))
    }

    /// The user a token names, if it is valid now.
    pub(super) fn token_user(&self, token: &str) -> Option<String> {
        verify_token(&self.store.auth(), token, SystemTime::now())
    }

    /// Runs `check` against this plane's auth state; a refusal is audited.
    pub(super) fn authorize(
        &self,
        caller: &Caller,
        check: impl FnOnce(&AuthState) -> Result<(), StoreError>,
    ) -> Result<(), Status> {
        let auth = self.store.auth();
        // The auth state changed since the token was checked (a linearizable read waited
        // for its barrier meanwhile): a password changed or a user deleted since then ends
        // the token for this call too, rather than its permissions being judged alone.
        if let Some((token, _)) = caller.token.as_ref().filter(|(_, revision)| *revision != auth.revision) {
            if verify_token(&auth, token, SystemTime::now()).as_deref() != Some(caller.user.as_str()) {
                audit_refused(caller, &"token no longer valid");
                return Err(Status::unauthenticated(INVALID_TOKEN));
            }
        }
        check(&auth).map_err(|error| {
            audit_refused(caller, &error);
            status::from_store(&error)
        })
    }

    /// Refuses the call unless its caller holds the root role (maintenance and membership
    /// changes, as in etcd).
    pub(super) fn require_admin<T>(&self, request: &Request<T>, method: &'static str) -> Result<(), Status> {
        let caller = self.caller(request, method)?;
        self.authorize(&caller, |auth| auth.check_admin(&caller.user))
    }

    /// Replicates a client's request as `caller`, whose permissions are checked as it
    /// applies.
    pub(super) async fn propose_as(
        &self,
        caller: &Caller,
        request: command::Request,
    ) -> Result<CommandResponse, Status> {
        let command =
            Command { request: Some(request), caller: Some(raftpb::Caller { user: caller.user.clone() }), origin: 0 };
        self.propose(command).await.inspect_err(|refused| {
            if is_refusal(refused) {
                audit_refused(caller, &refused.message());
            }
        })
    }
}

pub struct AuthService(pub Arc<Plane>);

impl AuthService {
    /// Replicates an auth change and returns the header of its response.
    async fn change(&self, caller: &Caller, request: command::Request) -> Result<Option<pb::ResponseHeader>, Status> {
        match self.0.propose_as(caller, request).await? {
            CommandResponse::Auth(mut header) => {
                tracing::info!(target: "audit", user = %caller.user, method = caller.method, "auth changed");
                self.0.complete_header(&mut header);
                Ok(header)
            }
            other => Err(Status::internal(format!("an auth change answered with {other:?}"))),
        }
    }

    /// The auth state after every change acknowledged before the call, once `caller` may
    /// read it.
    async fn read(
        &self,
        caller: &Caller,
        check: impl FnOnce(&AuthState) -> Result<(), StoreError>,
    ) -> Result<Arc<AuthState>, Status> {
        self.0.linearizable_barrier().await?;
        self.0.authorize(caller, check)?;
        Ok(self.0.store.auth())
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        self.0.header(self.0.store.revision())
    }

    /// bcrypt at the configured cost, off the async runtime (it takes tens of milliseconds).
    async fn hash(&self, password: String) -> Result<String, Status> {
        if password.is_empty() {
            return Err(status::from_store(&StoreError::PasswordEmpty));
        }
        let cost = self.0.config.auth.bcrypt_cost;
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| Status::internal(format!("cannot hash the password: {error}")))
    }
}

fn random_token_key() -> Result<Vec<u8>, Status> {
    let mut key = vec![0; TOKEN_KEY_BYTES];
    getrandom::fill(&mut key).map_err(|error| Status::internal(format!("no randomness for the token key: {error}")))?;
    Ok(key)
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        request: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let caller = self.0.caller(&request, "AuthEnable")?;
        let enable = raftpb::AuthEnable { token_key: random_token_key()? };
        let header = self.change(&caller, command::Request::AuthEnable(enable)).await?;
        Ok(Response::new(pb::AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        request: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let caller = self.0.caller(&request, "AuthDisable")?;
        let header = self.change(&caller, command::Request::AuthDisable(request.into_inner())).await?;
        Ok(Response::new(pb::AuthDisableResponse { header }))
    }

    async fn auth_status(
        &self,
        request: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let caller = self.0.caller(&request, "AuthStatus")?;
        let auth = self.read(&caller, |_| Ok(())).await?;
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.header(),
            enabled: auth.enabled,
            auth_revision: auth.revision,
        }))
    }

    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let request = request.into_inner();
        let token = self.0.authenticate(&request.name, request.password).await?;
        Ok(Response::new(pb::AuthenticateResponse { header: self.header(), token }))
    }

    async fn user_add(
        &self,
        request: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let caller = self.0.caller(&request, "UserAdd")?;
        let mut add = request.into_inner();
        if !add.options.is_some_and(|options| options.no_password) {
            add.hashed_password = self.hash(std::mem::take(&mut add.password)).await?;
        }
        add.password.clear();
        let header = self.change(&caller, command::Request::UserAdd(add)).await?;
        Ok(Response::new(pb::AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        request: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let caller = self.0.caller(&request, "UserGet")?;
        let name = request.into_inner().name;
        let own = caller.user == name;
        let auth = self
            .read(&caller, |auth| if own { auth.check_user(&name) } else { auth.check_admin(&caller.user) })
            .await?;
        let user = auth.user(&name).ok_or_else(|| status::from_store(&StoreError::UserNotFound))?;
        Ok(Response::new(pb::AuthUserGetResponse { header: self.header(), roles: user.roles.clone() }))
    }

    async fn user_list(
        &self,
        request: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        let caller = self.0.caller(&request, "UserList")?;
        let auth = self.read(&caller, |auth| auth.check_admin(&caller.user)).await?;
        Ok(Response::new(pb::AuthUserListResponse { header: self.header(), users: auth.user_names() }))
    }

    async fn user_delete(
        &self,
        request: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let caller = self.0.caller(&request, "UserDelete")?;
        let header = self.change(&caller, command::Request::UserDelete(request.into_inner())).await?;
        Ok(Response::new(pb::AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        request: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let caller = self.0.caller(&request, "UserChangePassword")?;
        let mut change = request.into_inner();
        change.hashed_password = self.hash(std::mem::take(&mut change.password)).await?;
        let header = self.change(&caller, command::Request::UserChangePassword(change)).await?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        request: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let caller = self.0.caller(&request, "UserGrantRole")?;
        let header = self.change(&caller, command::Request::UserGrantRole(request.into_inner())).await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let caller = self.0.caller(&request, "UserRevokeRole")?;
        let header = self.change(&caller, command::Request::UserRevokeRole(request.into_inner())).await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        request: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let caller = self.0.caller(&request, "RoleAdd")?;
        let header = self.change(&caller, command::Request::RoleAdd(request.into_inner())).await?;
        Ok(Response::new(pb::AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        request: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let caller = self.0.caller(&request, "RoleGet")?;
        let role = request.into_inner().role;
        let auth = self
            .read(&caller, |auth| {
                let own = auth.user(&caller.user).is_some_and(|user| user.roles.contains(&role));
                if own {
                    auth.check_user(&caller.user)
                } else {
                    auth.check_admin(&caller.user)
                }
            })
            .await?;
        let perm = auth.role_permissions(&role).map_err(|error| status::from_store(&error))?;
        Ok(Response::new(pb::AuthRoleGetResponse { header: self.header(), perm }))
    }

    async fn role_list(
        &self,
        request: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        let caller = self.0.caller(&request, "RoleList")?;
        let auth = self.read(&caller, |auth| auth.check_admin(&caller.user)).await?;
        Ok(Response::new(pb::AuthRoleListResponse { header: self.header(), roles: auth.role_names() }))
    }

    async fn role_delete(
        &self,
        request: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let caller = self.0.caller(&request, "RoleDelete")?;
        let header = self.change(&caller, command::Request::RoleDelete(request.into_inner())).await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let caller = self.0.caller(&request, "RoleGrantPermission")?;
        let header = self.change(&caller, command::Request::RoleGrantPermission(request.into_inner())).await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let caller = self.0.caller(&request, "RoleRevokePermission")?;
        let header = self.change(&caller, command::Request::RoleRevokePermission(request.into_inner())).await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse { header }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Auth state with `alice` (password hash `h1`) and auth on.
    fn state() -> AuthState {
        let dir = tempfile::tempdir().unwrap();
        let store = capstan_store::Store::open(dir.path(), &[]).unwrap();
        let apply = |request: command::Request| {
            let applied = store.apply(&Command { request: Some(request), caller: None, origin: 0 }, &[]).unwrap();
            applied.response.unwrap();
        };
        let add = |name: &str| {
            command::Request::UserAdd(pb::AuthUserAddRequest {
                name: name.into(),
                hashed_password: "h1".into(),
                ..Default::default()
            })
        };
        apply(add("root"));
        apply(command::Request::UserGrantRole(pb::AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        }));
        apply(add("alice"));
        apply(command::Request::AuthEnable(raftpb::AuthEnable { token_key: vec![9; 32] }));
        let auth = store.auth();
        (*auth).clone()
    }

    #[test]
    fn a_token_names_its_user_until_it_expires() {
        let auth = state();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = issue_token(&auth, "alice", b"h1", Duration::from_secs(300), now);
        assert_eq!(verify_token(&auth, &token, now).as_deref(), Some("alice"));
        assert_eq!(verify_token(&auth, &token, now + Duration::from_secs(299)).as_deref(), Some("alice"));
        assert_eq!(verify_token(&auth, &token, now + Duration::from_secs(300)), None, "expired");
    }

    #[test]
    fn a_forged_or_stale_token_is_refused() {
        let auth = state();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = issue_token(&auth, "alice", b"h1", Duration::from_secs(300), now);
        let parts: Vec<&str> = token.split('.').collect();
        let as_root =
            format!("{}.{}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("root"), parts[1], parts[2]);
        assert_eq!(verify_token(&auth, &as_root, now), None, "another user under alice's MAC");
        let later = format!("{}.{}.{}", parts[0], 9_999_999_999u64, parts[2]);
        assert_eq!(verify_token(&auth, &later, now), None, "a stretched expiry");
        let old_password = issue_token(&auth, "alice", b"h0", Duration::from_secs(300), now);
        assert_eq!(verify_token(&auth, &old_password, now), None, "issued under another password");
        let unknown = issue_token(&auth, "mallory", b"h1", Duration::from_secs(300), now);
        assert_eq!(verify_token(&auth, &unknown, now), None, "no such user");
        for garbage in ["", "a.b", "...", "YWxpY2U.1.", &format!("{token}.x")] {
            assert_eq!(verify_token(&auth, garbage, now), None, "{garbage:?}");
        }
    }
}
