//! The NBD door's exports: the volume catalog (which hands every connection to a volume the
//! same device, so one flush covers them all) and the TCP client allowlists.

use std::sync::Arc;

use crate::daemon::config::Cidr;
use crate::engines::volume::BlockDevice;
use crate::engines::volume::catalog::Catalog;
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
}

impl Exports for VolumeExports {
    fn list(&self) -> Vec<ExportInfo> {
        self.catalog
            .list()
            .unwrap_or_default()
            .into_iter()
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
        if let Peer::Tcp(addr) = peer {
            // A volume's own list replaces the server-wide one; entries were checked when
            // the volume was made.
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
            if !blocks.iter().any(|block| block.contains(addr.ip())) {
                return Err(OpenError::Denied(format!(
                    "client {} is not in {which}",
                    addr.ip()
                )));
            }
        }
        let volume = self.catalog.open(name).map_err(|e| OpenError::Failed {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        Ok(volume)
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
