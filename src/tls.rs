//! TLS on a plane's client and peer listeners, with etcd's flags (`--cert-file`,
//! `--key-file`, `--trusted-ca-file`, `--client-cert-auth`, and their `--peer-` forms),
//! over rustls: no OpenSSL.

//!
//! The listeners do their own TLS handshakes ([`incoming`]) rather than leave them to
//! tonic, so that every refused handshake (no certificate, another CA's, a malformed one,
//! plain text) is an audit line naming the peer and the reason.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// How long a client may take over its handshake before it is dropped.
const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Connections that finished their handshake and wait for the server to take them.
const HANDSHAKEN_QUEUE_MAX: usize = 64;
/// The pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_RETRY_MS: u64 = 100;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signs client certificates (and, for the plane's own scheduler, the
    /// plane's certificate).
    pub trusted_ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `trusted_ca`.
    pub client_cert_auth: bool,
}

fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

impl ServerTls {
    /// The flags as given: none, or a certificate and its key (and the CA to check
    /// clients against, which --client-cert-auth needs). `prefix` is `""` for the client
    /// flags, `"peer-"` for the peer ones, so errors name the flags the user gave.
    pub fn from_flags(
        prefix: &str,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        trusted_ca: Option<PathBuf>,
        client_cert_auth: bool,
    ) -> anyhow::Result<Option<ServerTls>> {
        let p = prefix;
        match (cert, key) {
            (None, None) if client_cert_auth || trusted_ca.is_some() => {
                anyhow::bail!("--{p}client-cert-auth and --{p}trusted-ca-file need --{p}cert-file and --{p}key-file")
            }
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                if client_cert_auth && trusted_ca.is_none() {
                    anyhow::bail!(
                        "--{p}client-cert-auth needs --{p}trusted-ca-file (the CA of the client certificates)"
                    );
                }
                Ok(Some(ServerTls { cert, key, trusted_ca, client_cert_auth }))
            }
            _ => anyhow::bail!("--{p}cert-file and --{p}key-file go together"),
        }
    }

    /// The rustls configuration a listener serves with: this certificate, HTTP/2 by ALPN,
    /// and with --client-cert-auth only clients whose certificate the CA signed. A file
    /// that cannot be read or parsed is named.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certificates = |path: &std::path::Path| -> anyhow::Result<Vec<CertificateDer<'static>>> {
            let parsed = CertificateDer::pem_slice_iter(&read(path)?).collect::<Result<Vec<_>, _>>();
            let parsed =
                parsed.map_err(|error| anyhow::anyhow!("{}: not a PEM certificate: {error}", path.display()))?;
            if parsed.is_empty() {
                anyhow::bail!("{} holds no certificate", path.display());
            }
            Ok(parsed)
        };
        let chain = certificates(&self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|error| anyhow::anyhow!("{}: not a PEM private key: {error}", self.key.display()))?;
        let builder = rustls::ServerConfig::builder();
        let builder = match (self.client_cert_auth, &self.trusted_ca) {
            (true, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in certificates(ca)? {
                    roots.add(certificate).with_context(|| format!("{} is not a usable CA", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
                    .build()
                    .with_context(|| format!("{} is not a usable CA", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).context("the TLS certificate or key is not usable")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The plane as a client of its peers: it trusts the CA (or, without one, its own
    /// certificate, for peers sharing one self-signed certificate) and shows its own
    /// certificate, which peers with `--peer-client-cert-auth` ask for.
    pub fn peer_client_config(&self) -> anyhow::Result<ClientTlsConfig> {
        let ca = read(self.trusted_ca.as_ref().unwrap_or(&self.cert))?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?)))
    }

    /// The plane as a client of its own listener (its in-process scheduler): it trusts
    /// the CA (or, without one, its own certificate) and shows its own certificate.
    pub fn as_client(&self) -> capstan_client::Credentials {
        capstan_client::Credentials {
            ca: Some(self.trusted_ca.clone().unwrap_or_else(|| self.cert.clone())),
            cert: Some(self.cert.clone()),
            key: Some(self.key.clone()),
            user: None,
        }
    }
}

/// The connections `listener` accepts, once their TLS handshake succeeds. Each handshake
/// runs on its own, bounded in time, so a slow client holds up no other; a refused one is
/// logged on the `audit` target with the peer's address and rustls' reason. Accepting
/// stops, and the port is released, when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    listener_name: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (handshaken, incoming) = tokio::sync::mpsc::channel(HANDSHAKEN_QUEUE_MAX);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = handshaken.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = listener_name, %error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                    continue;
                }
            };
            // Requests and answers are small and latency-bound (see socket::incoming).
            let _ = stream.set_nodelay(true);
            let (acceptor, handshaken) = (acceptor.clone(), handshaken.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        let _ = handshaken.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(target: "audit", listener = listener_name, %peer, reason = %error, "TLS handshake refused")
                    }
                    Err(_) => {
                        tracing::warn!(target: "audit", listener = listener_name, %peer, "TLS handshake timed out")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(incoming)
}
