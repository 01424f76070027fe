//! A throw-away public-key infrastructure for local and test clusters (`capstan dev --tls`,
//! `capstan-jepsen test --tls`): a CA whose key is forgotten once it has signed, one
//! certificate every plane serves with (on its client and peer listeners, and shows as a
//! client to its peers and to itself), and a client certificate whose CN is `root`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::Credentials;

const CA: &str = "ca.pem";
const SERVER: &str = "server";
const CLIENT: &str = "client";
/// The client certificate's CN: the user it is when auth is on.
pub const CLIENT_USER: &str = "root";

/// The certificates in one directory.
pub struct ThrowawayPki {
    pub dir: PathBuf,
}

impl ThrowawayPki {
    /// The certificates in `dir`, made now if they are not there yet; the plane certificate
    /// names `hosts` (IP addresses or DNS names the planes are dialled at).
    pub fn ensure(dir: &Path, hosts: &[String]) -> Result<ThrowawayPki, String> {
        let pki = ThrowawayPki { dir: dir.to_path_buf() };
        if !dir.join(CA).exists() {
            pki.make(hosts).map_err(|error| format!("cannot make certificates in {}: {error}", dir.display()))?;
        }
        Ok(pki)
    }

    fn make(&self, hosts: &[String]) -> Result<(), Box<dyn std::error::Error>> {
        std::fs::create_dir_all(&self.dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "capstan throw-away CA");
        let ca = ca_params.self_signed(&ca_key)?;
        for (name, common_name, names) in [(SERVER, "capstan-plane", hosts.to_vec()), (CLIENT, CLIENT_USER, Vec::new())]
        {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, common_name);
            let cert = params.signed_by(&key, &ca, &ca_key)?;
            std::fs::write(self.cert(name), cert.pem())?;
            write_private(&self.key(name), key.serialize_pem().as_bytes())?;
        }
        // The CA last: its presence says the set is complete.
        std::fs::write(self.dir.join(CA), ca.pem())?;
        Ok(())
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    /// The client certificate, as a client connects with it.
    pub fn client_credentials(&self) -> Credentials {
        Credentials {
            ca: Some(self.dir.join(CA)),
            cert: Some(self.cert(CLIENT)),
            key: Some(self.key(CLIENT)),
            user: None,
        }
    }

    /// The client certificate as etcdctl's (and `capstan ctl`'s) flags.
    pub fn client_flags(&self) -> Vec<String> {
        let credentials = self.client_credentials();
        let mut flags = Vec::new();
        for (flag, path) in [("--cacert", credentials.ca), ("--cert", credentials.cert), ("--key", credentials.key)] {
            flags.extend(path.map(|path| [flag.to_string(), path.display().to_string()]).into_iter().flatten());
        }
        flags
    }

    /// A plane's flags: the plane certificate on both listeners, clients and peers both
    /// checked against the CA.
    pub fn plane_flags(&self) -> Vec<String> {
        let ca = self.dir.join(CA).display().to_string();
        let (cert, key) = (self.cert(SERVER).display().to_string(), self.key(SERVER).display().to_string());
        let mut flags = Vec::new();
        for prefix in ["", "peer-"] {
            flags.extend([format!("--{prefix}cert-file"), cert.clone(), format!("--{prefix}key-file"), key.clone()]);
            flags.extend([format!("--{prefix}trusted-ca-file"), ca.clone(), format!("--{prefix}client-cert-auth")]);
        }
        flags
    }
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(contents)
}
