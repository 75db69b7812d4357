//! The NBD door's exports: the volume catalog (which hands every connection to a volume the
//! same device, so one flush covers them all) and the TCP client allowlists.

use std::sync::Arc;

use crate::daemon::config::Cidr;
use crate::engines::volume::BlockDevice;
use crate::engines::volume::catalog::{Catalog, VolumeInfo};
use crate::protocols::nbd::{ExportInfo, Exports, OpenError, Peer};
use crate::size::Human;

pub struct VolumeExports {
    catalog: Arc<Catalog>,
    allow: Vec<Cidr>,
}

impl VolumeExports {
    pub fn new(catalog: Arc<Catalog>, allow: Vec<Cidr>) -> Self {
        VolumeExports { catalog, allow }
    }

    /// Whether `peer` may open the volume `info`; if not, why.
    fn may_open(&self, info: &VolumeInfo, peer: &Peer) -> Result<(), String> {
        let Peer::Tcp(addr) = peer else {
            // The Unix socket is guarded by its file mode, not by address lists.
            return Ok(());
        };
        // A volume's own list replaces the server-wide one; entries were checked when the
        // volume was made.
        let own: Vec<Cidr> = info
            .allow
            .iter()
            .filter_map(|b| Cidr::parse(b).ok())
            .collect();
        let (blocks, which) = if info.allow.is_empty() {
            (&self.allow, "[nbd] allow")
        } else {
            (&own, "the volume's allow list")
        };
        if blocks.iter().any(|block| block.contains(addr.ip())) {
            Ok(())
        } else {
            Err(format!("client {} is not in {which}", addr.ip()))
        }
    }
}

impl Exports for VolumeExports {
    fn list(&self, peer: &Peer) -> Vec<ExportInfo> {
        self.catalog
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| self.may_open(v, peer).is_ok())
            .map(|v| ExportInfo {
                description: format!(
                    "firn {:?} volume, {}{}",
                    v.mode,
                    Human(v.size),
                    if v.read_only { ", read-only" } else { "" }
                )
                .to_lowercase(),
                name: v.name,
            })
            .collect()
    }

    fn open(&self, name: &str, peer: &Peer) -> Result<Arc<dyn BlockDevice>, OpenError> {
        let Some(info) = self.catalog.get(name).ok().flatten() else {
            return Err(OpenError::Unknown(name.to_string()));
        };
        self.may_open(&info, peer).map_err(OpenError::Denied)?;
        let volume = self.catalog.open(name).map_err(|e| OpenError::Failed {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        Ok(volume)
    }

    /// The server-wide list, or any volume's own list: a peer in neither can open nothing.
    fn admits(&self, peer: &Peer) -> bool {
        let Peer::Tcp(addr) = peer else {
            return true;
        };
        let ip = addr.ip();
        self.allow.iter().any(|block| block.contains(ip))
            || self
                .catalog
                .list()
                .unwrap_or_default()
                .iter()
                .flat_map(|v| v.allow.iter())
                .filter_map(|b| Cidr::parse(b).ok())
                .any(|block| block.contains(ip))
    }
}

/// The TLS acceptor for `[nbd] tls = "x509"`: the certificate chain and key from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "[nbd] tls_cert: cannot read certificates from {}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!("[nbd] tls_cert: no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "[nbd] tls_key: cannot read a private key from {}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("[nbd] tls_cert and tls_key do not make a usable certificate")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The identity of the key firn writes when `[nbd] tls = "psk"` starts without a key file.
pub const PSK_IDENTITY: &str = "firn";

/// The TLS acceptor for `[nbd] tls = "psk"`: TLS 1.3 with the keys in `path`, in the format
/// of GnuTLS's psktool (`identity:hexkey` per line), which libnbd's `tls-psk-file=` and
/// qemu's `tls-creds-psk` read. A missing file is made with one fresh 256-bit key.
pub fn psk_acceptor(path: &std::path::Path) -> anyhow::Result<Arc<openssl::ssl::SslAcceptor>> {
    use anyhow::Context;
    use openssl::ssl::{SslAcceptor, SslMethod, SslVersion};
    let keys = read_or_make_psk_file(path)?;
    let mut builder = SslAcceptor::mozilla_modern_v5(SslMethod::tls_server())
        .context("OpenSSL: TLS 1.3 server")?;
    builder.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    builder.set_psk_server_callback(move |_ssl, identity, out| {
        // An unknown identity gets no key (0), and the handshake fails.
        let key = identity.and_then(|id| keys.iter().find(|(name, _)| name.as_bytes() == id));
        Ok(match key {
            Some((_, key)) if key.len() <= out.len() => {
                out[..key.len()].copy_from_slice(key);
                key.len()
            }
            _ => 0,
        })
    });
    Ok(Arc::new(builder.build()))
}

type PskKeys = Vec<(String, zeroize::Zeroizing<Vec<u8>>)>;

fn read_or_make_psk_file(path: &std::path::Path) -> anyhow::Result<PskKeys> {
    use anyhow::Context;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => zeroize::Zeroizing::new(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = zeroize::Zeroizing::new([0u8; 32]);
            rand::fill(&mut key[..]);
            let text = zeroize::Zeroizing::new(format!("{PSK_IDENTITY}:{}\n", hex::encode(*key)));
            if let Some(dir) = path.parent() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| {
                        format!("[nbd] tls_psk_file: cannot create {}", dir.display())
                    })?;
            }
            crate::seal::keys::write_private(path, text.as_bytes())
                .with_context(|| format!("[nbd] tls_psk_file: cannot write {}", path.display()))?;
            text
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("[nbd] tls_psk_file: cannot read {}", path.display()));
        }
    };
    parse_psk_keys(&text).map_err(|e| anyhow::anyhow!("[nbd] tls_psk_file {}: {e}", path.display()))
}

/// Parses `identity:hexkey` lines; blank lines and `#` comments are skipped.
fn parse_psk_keys(text: &str) -> Result<PskKeys, String> {
    let mut keys = PskKeys::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((identity, key)) = line.rsplit_once(':') else {
            return Err(format!("line {}: not identity:hexkey", n + 1));
        };
        let key = hex::decode(key).map_err(|_| format!("line {}: the key is not hex", n + 1))?;
        if identity.is_empty() || key.len() < 16 || key.len() > 64 {
            return Err(format!(
                "line {}: needs an identity and a key of 16 to 64 bytes",
                n + 1
            ));
        }
        keys.push((identity.to_string(), zeroize::Zeroizing::new(key)));
    }
    if keys.is_empty() {
        return Err("no keys".to_string());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_and_bad_ones_are_named() {
        let keys = parse_psk_keys("# keys\nfirn:00112233445566778899aabbccddeeff\n\nalice:0011223344556677889900112233445566778899\n").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].0, "firn");
        assert_eq!(keys[1].1.len(), 20);
        for (text, expected) in [
            ("", "no keys"),
            ("firn", "identity:hexkey"),
            ("firn:zz", "not hex"),
            ("firn:0011", "16 to 64"),
            (":00112233445566778899aabbccddeeff", "identity"),
        ] {
            let message = parse_psk_keys(text).err().unwrap();
            assert!(message.contains(expected), "{text:?} gave {message:?}");
        }
    }

    #[test]
    fn a_missing_psk_file_is_made_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk").join("keys.psk");
        let made = read_or_make_psk_file(&path).unwrap();
        assert_eq!(made.len(), 1);
        assert_eq!(made[0].0, PSK_IDENTITY);
        assert_eq!(made[0].1.len(), 32);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = read_or_make_psk_file(&path).unwrap();
        assert_eq!(*again[0].1, *made[0].1, "a second start must keep the key");
        psk_acceptor(&path).unwrap();
    }
}
