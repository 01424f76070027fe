//! capstan-client: cluster objects (Node, Pod, ReplicaSet) over the etcd v3 API, the way
//! the Kubernetes API server keeps them in etcd: one JSON value per key under
//! `/registry/`, created only where no key is, updated and deleted only at the
//! resourceVersion (mod_revision) the writer read, so concurrent writers never clobber
//! each other.
//!
//! Used by `capstan ctl`, the scheduler, the node agent and the chaos harness.
//!
//! Invariant: it reaches the planes only through `etcd-client`, as any user program
//! would; it never depends on capstan-store or capstan-raft.

pub mod pki;

use std::time::Duration;

use capstan_proto::objects::{decode_stored, new_uid, timestamp, DecodeError, Kind, Object};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

/// How many keys one page of a list reads: 250 objects of up to 16 KiB stay under the
/// 4 MiB a gRPC response may carry by default.
const LIST_PAGE_KEYS: i64 = 250;
/// How often [`Objects::modify`] retries after a concurrent writer won.
const MODIFY_ATTEMPTS_MAX: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{kind} {name:?} not found", kind = kind.qualified())]
    NotFound { kind: Kind, name: String },
    #[error("{kind} {name:?} already exists", kind = kind.qualified())]
    AlreadyExists { kind: Kind, name: String },
    /// Someone else wrote the object since it was read.
    #[error("operation cannot be fulfilled on {kind} {name:?}: the object has been modified; apply your changes to the latest version and try again", kind = kind.qualified())]
    Conflict { kind: Kind, name: String },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Who a client is, as etcdctl's `--cacert`, `--cert`, `--key` (PEM files) and `--user`
/// give it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The CA that signed the planes' certificates.
    pub ca: Option<std::path::PathBuf>,
    /// The client's own certificate and key, for planes that ask for one.
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    /// A user and password to authenticate with, when the cluster has auth enabled.
    pub user: Option<(String, String)>,
}

impl Credentials {
    /// Whether these credentials use TLS.
    pub fn tls(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The files read into etcd-client's options; None without TLS.
    pub fn tls_options(&self) -> std::io::Result<Option<etcd_client::TlsOptions>> {
        if !self.tls() {
            return Ok(None);
        }
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|error| std::io::Error::new(error.kind(), format!("cannot read {}: {error}", path.display())))
        };
        let mut options = etcd_client::TlsOptions::new();
        if let Some(ca) = &self.ca {
            options = options.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a client certificate needs both --cert and --key",
                ))
            }
        }
        Ok(Some(options))
    }
}

/// Connects to the cluster at any of `endpoints` (`host:port` or URLs).
pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Client> {
    connect_with(endpoints, timeout, &Credentials::default()).await
}

/// [`connect`] with `credentials`: over TLS when they have TLS files (endpoints without a
/// scheme get `https://`), as their user when they name one.
pub async fn connect_with(endpoints: &[String], timeout: Duration, credentials: &Credentials) -> Result<Client> {
    let options = credentials.connect_options(timeout)?;
    Ok(Client::connect(credentials.urls(endpoints), Some(options)).await?)
}

impl Credentials {
    /// etcd-client's options for these credentials, with `timeout` to connect and for each
    /// request.
    pub fn connect_options(&self, timeout: Duration) -> Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls_options) = self.tls_options().map_err(|error| ClientError::Tls(error.to_string()))? {
            options = options.with_tls(tls_options);
        }
        if let Some((user, password)) = &self.user {
            // Tokens expire (the planes' --auth-token-ttl); a long-lived scheduler or agent
            // authenticates again when a call is refused for an expired one.
            options = options.with_user(user, password).with_auto_token_refresh(true);
        }
        Ok(options)
    }

    /// `endpoints` as the URLs to dial: `https://` when these credentials use TLS.
    pub fn urls(&self, endpoints: &[String]) -> Vec<String> {
        endpoints.iter().map(|endpoint| with_scheme(endpoint, self.tls())).collect()
    }
}

/// One lease keep-alive round trip, bounded by `timeout`: the TTL the lease has left
/// (0: it is gone, expired or revoked).
pub async fn renew_lease(client: &Client, lease_id: i64, timeout: Duration) -> Result<i64> {
    let round_trip = async {
        let (mut keeper, mut stream) = client.lease_client().keep_alive(lease_id).await?;
        keeper.keep_alive().await?;
        Ok::<_, etcd_client::Error>(stream.message().await?.map_or(0, |response| response.ttl()))
    };
    Ok(tokio::time::timeout(timeout, round_trip).await.map_err(|_| ClientError::Timeout("lease keep-alive"))??)
}

/// etcd-client wants URLs; etcdctl users write `host:port`. With TLS, `http://` is taken
/// as `https://`, as etcdctl does when it is given certificates.
pub fn with_scheme(endpoint: &str, tls: bool) -> String {
    if endpoint.contains("://") && !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
        return endpoint.to_string();
    }
    let address = endpoint.trim_start_matches("http://").trim_start_matches("https://");
    match (tls, endpoint.starts_with("https://")) {
        (true, _) | (false, true) => format!("https://{address}"),
        (false, false) => format!("http://{address}"),
    }
}

/// Objects listed at one revision, with the values that did not decode.
#[derive(Debug, Default)]
pub struct Listed {
    pub objects: Vec<Object>,
    pub undecodable: Vec<DecodeError>,
    /// Keys under the prefix that are not cluster objects (node leases, leader keys).
    pub other_keys: Vec<Vec<u8>>,
    /// The store revision the list reflects; watch from `revision + 1` to follow it.
    pub revision: i64,
}

/// Typed access to cluster objects.
#[derive(Clone)]
pub struct Objects {
    client: Client,
}

impl Objects {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Option<Object>> {
        let key = kind.key(namespace, name);
        let response = self.client.kv_client().get(key, None).await?;
        match response.kvs().first() {
            Some(kv) => Ok(Some(decode_stored(kv.key(), kv.value(), kv.mod_revision())?)),
            None => Ok(None),
        }
    }

    /// Like [`Objects::get`], but absence is an error.
    pub async fn get_existing(&self, kind: Kind, namespace: &str, name: &str) -> Result<Object> {
        self.get(kind, namespace, name).await?.ok_or_else(|| ClientError::NotFound { kind, name: name.to_string() })
    }

    /// Every object under `prefix` (a kind's, a namespace's or all of `/registry/`), read
    /// page by page at one revision so the list is a consistent snapshot.
    pub async fn list_prefix(&self, prefix: &str) -> Result<Listed> {
        let mut kv = self.client.kv_client();
        let range_end = prefix_end(prefix.as_bytes());
        let mut listed = Listed::default();
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut options = GetOptions::new().with_range(range_end.clone()).with_limit(LIST_PAGE_KEYS);
            if listed.revision > 0 {
                options = options.with_revision(listed.revision);
            }
            let response = kv.get(from.clone(), Some(options)).await?;
            if listed.revision == 0 {
                listed.revision = response.header().map_or(0, |h| h.revision());
            }
            for kv in response.kvs() {
                if Kind::of_key(kv.key()).is_none() {
                    listed.other_keys.push(kv.key().to_vec());
                    continue;
                }
                match decode_stored(kv.key(), kv.value(), kv.mod_revision()) {
                    Ok(object) => listed.objects.push(object),
                    Err(e) => listed.undecodable.push(e),
                }
            }
            match (response.more(), response.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(listed),
            }
        }
    }

    pub async fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Listed> {
        let prefix = match namespace {
            Some(namespace) => kind.namespace_prefix(namespace),
            None => kind.prefix(),
        };
        self.list_prefix(&prefix).await
    }

    /// Stores a new object; fails with AlreadyExists if its key is taken.
    pub async fn create(&self, object: &Object) -> Result<Object> {
        let (compare, put) = create_op(object);
        self.write(
            object,
            compare,
            put,
            ClientError::AlreadyExists { kind: object.kind(), name: object.metadata().name.clone() },
        )
        .await
    }

    /// Replaces an object at the resourceVersion it was read at; fails with Conflict if
    /// it changed or went away since.
    pub async fn update(&self, object: &Object) -> Result<Object> {
        let (compare, put) = update_op(object);
        self.write(object, compare, put, conflict(object)).await
    }

    async fn write(&self, object: &Object, compare: Compare, put: TxnOp, refused: ClientError) -> Result<Object> {
        let txn = Txn::new().when([compare]).and_then([put]);
        let response = self.client.kv_client().txn(txn).await?;
        if !response.succeeded() {
            return Err(refused);
        }
        let mut written = object.clone();
        written.metadata_mut().resource_version = response.header().map_or(0, |h| h.revision()).to_string();
        Ok(written)
    }

    /// Deletes an object, at the resourceVersion given or whatever version is there.
    /// Returns what was deleted.
    pub async fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<Object> {
        let object = self.get_existing(kind, namespace, name).await?;
        let key = object.key();
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, resource_version(&object))])
            .and_then([TxnOp::delete(key, None)]);
        if self.client.kv_client().txn(txn).await?.succeeded() {
            Ok(object)
        } else {
            Err(conflict(&object))
        }
    }

    /// Reads an object, lets `change` edit it (returning false for "nothing to do"), and
    /// writes it back at the version read, retrying from a fresh read when another writer
    /// got there first (client-go's RetryOnConflict). Returns the object as stored.
    pub async fn modify<E>(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        mut change: impl FnMut(&mut Object) -> std::result::Result<bool, E>,
    ) -> std::result::Result<Object, E>
    where
        E: From<ClientError>,
    {
        self.modify_or_create(kind, namespace, name, |current| {
            let mut object = current.cloned().ok_or_else(|| ClientError::NotFound { kind, name: name.to_string() })?;
            let changed = change(&mut object)?;
            Ok((changed.then(|| object.clone()), object))
        })
        .await
    }

    /// Reads the object at a key (absent or not), lets `decide` say what to write there
    /// (None: nothing) and what to return, and writes it: a create where nothing was, an
    /// update at the version read otherwise. Retries from a fresh read when another
    /// writer got there first.
    pub async fn modify_or_create<T, E>(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        mut decide: impl FnMut(Option<&Object>) -> std::result::Result<(Option<Object>, T), E>,
    ) -> std::result::Result<T, E>
    where
        E: From<ClientError>,
    {
        let mut attempt = 0;
        loop {
            let current = self.get(kind, namespace, name).await?;
            let (write, outcome) = decide(current.as_ref())?;
            let Some(object) = write else { return Ok(outcome) };
            let written = match current {
                None => self.create(&object).await,
                Some(_) => self.update(&object).await,
            };
            match written {
                Ok(_) => return Ok(outcome),
                Err(ClientError::Conflict { .. } | ClientError::AlreadyExists { .. })
                    if attempt + 1 < MODIFY_ATTEMPTS_MAX =>
                {
                    attempt += 1
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

fn conflict(object: &Object) -> ClientError {
    ClientError::Conflict { kind: object.kind(), name: object.metadata().name.clone() }
}

/// The resourceVersion an object was read at (0 if it was never stored).
pub fn resource_version(object: &Object) -> i64 {
    object.metadata().resource_version.parse().unwrap_or(0)
}

/// The compare and put that create `object` only where no key is, with a UID and
/// creation time if it has none (as the Kubernetes API server sets them).
pub fn create_op(object: &Object) -> (Compare, TxnOp) {
    let object = with_identity(object);
    let key = object.key();
    (Compare::create_revision(key.clone(), CompareOp::Equal, 0), TxnOp::put(key, object.encode(), None))
}

/// The object with a fresh UID and the current time as its creation time, where unset:
/// a pod re-created under an old name is then a different pod to everyone.
fn with_identity(object: &Object) -> Object {
    let mut object = object.clone();
    let meta = object.metadata_mut();
    if meta.uid.is_empty() {
        meta.uid = new_uid();
    }
    if meta.creation_timestamp.is_empty() {
        meta.creation_timestamp = timestamp(std::time::SystemTime::now());
    }
    object
}

/// The compare and put that replace `object` only at the version it was read at.
pub fn update_op(object: &Object) -> (Compare, TxnOp) {
    let key = object.key();
    (
        Compare::mod_revision(key.clone(), CompareOp::Equal, resource_version(object)),
        TxnOp::put(key, object.encode(), None),
    )
}

/// The end of the range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
