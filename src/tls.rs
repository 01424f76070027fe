//! TLS on a plane's client and peer listeners, with etcd's flags (`--cert-file`,
//! `--key-file`, `--trusted-ca-file`, `--client-cert-auth`, and their `--peer-` forms),
//! over rustls: no OpenSSL.

use std::path::PathBuf;

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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

    /// The rustls configuration tonic serves with; a file that cannot be read is named.
    pub fn server_config(&self) -> anyhow::Result<ServerTlsConfig> {
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        if let (true, Some(ca)) = (self.client_cert_auth, &self.trusted_ca) {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(config)
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
