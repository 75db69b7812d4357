//! The NBD door's exports: the volume catalog (which hands every connection to a volume the
//! same device, so one flush covers them all), the TCP client allowlists, and who is attached
//! to each volume now (for `firn volume show`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::daemon::config::Cidr;
use crate::engines::volume::BlockDevice;
use crate::engines::volume::catalog::{Catalog, VolumeInfo};
use crate::protocols::nbd::{Attachment, Client, ExportInfo, Exports, OpenError, Peer};
use crate::size::Human;

pub struct VolumeExports {
    catalog: Arc<Catalog>,
    allow: Vec<Cidr>,
    /// Whether clients beyond this machine may attach at all: TLS is on, or plain text was
    /// allowed explicitly (`[nbd] allow_plaintext`).
    remote: bool,
    attached: Arc<Attached>,
}

/// The clients in transmission, by volume id (a volume deleted and made again under the same
/// name is another volume), each under a number of its own.
#[derive(Default)]
struct Attached {
    by_volume: Mutex<HashMap<String, Vec<(u64, Attachment)>>>,
    next: AtomicU64,
}

impl Attached {
    fn volumes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<(u64, Attachment)>>> {
        self.by_volume
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One client's place in [`Attached`], given back when its connection ends.
struct Detach {
    attached: Arc<Attached>,
    volume: String,
    number: u64,
}

impl Drop for Detach {
    fn drop(&mut self) {
        let mut volumes = self.attached.volumes();
        if let Some(clients) = volumes.get_mut(&self.volume) {
            clients.retain(|(number, _)| *number != self.number);
            if clients.is_empty() {
                volumes.remove(&self.volume);
            }
        }
    }
}

/// A client as `firn volume show` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShownClient {
    /// `address:port`, or `unix` for the Unix socket.
    pub peer: String,
    pub tls: bool,
    /// The TLS identity (PSK identity or certificate common name), if TLS named one.
    pub identity: Option<String>,
    /// When transmission began (RFC 3339, UTC).
    pub since: String,
    /// The flags the client chose in the handshake.
    pub handshake_flags: Vec<&'static str>,
    pub structured_replies: bool,
}

impl ShownClient {
    fn of(a: &Attachment) -> ShownClient {
        use crate::protocols::nbd::proto::{FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES};
        let mut handshake_flags = Vec::new();
        if a.handshake_flags & FLAG_C_FIXED_NEWSTYLE != 0 {
            handshake_flags.push("fixed_newstyle");
        }
        if a.handshake_flags & FLAG_C_NO_ZEROES != 0 {
            handshake_flags.push("no_zeroes");
        }
        ShownClient {
            peer: match &a.client.peer {
                Peer::Tcp(addr) => addr.to_string(),
                Peer::Unix => "unix".to_string(),
            },
            tls: a.tls,
            identity: a.client.identity.clone(),
            since: chrono::DateTime::<chrono::Utc>::from(a.since)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            handshake_flags,
            structured_replies: a.structured_replies,
        }
    }
}

impl VolumeExports {
    pub fn new(catalog: Arc<Catalog>, allow: Vec<Cidr>, remote: bool) -> Self {
        VolumeExports {
            catalog,
            allow,
            remote,
            attached: Arc::default(),
        }
    }

    /// The clients attached to the volume `info` now, oldest first.
    pub fn clients(&self, info: &VolumeInfo) -> Vec<ShownClient> {
        let volumes = self.attached.volumes();
        let mut clients: Vec<&Attachment> = volumes
            .get(&info.id)
            .map(|clients| clients.iter().map(|(_, a)| a).collect())
            .unwrap_or_default();
        clients.sort_by_key(|a| a.since);
        clients.into_iter().map(ShownClient::of).collect()
    }

    /// Why `block`, for a volume's own allowlist, is refused on this server, if it is.
    pub fn check_volume_allow(&self, block: &Cidr) -> Result<(), String> {
        if self.remote || block.is_loopback_only() {
            return Ok(());
        }
        Err(
            "it admits clients beyond this machine, but NBD TLS is off; set [nbd] tls = \"psk\" \
             (or allow_plaintext = true for a network you trust as much as this machine)"
                .to_string(),
        )
    }

    /// Whether `client` may open the volume `info`; if not, why.
    fn may_open(&self, info: &VolumeInfo, client: &Client) -> Result<(), String> {
        if !info.clients.is_empty() {
            // TLS names the client; without TLS no identity is known and nobody qualifies.
            match &client.identity {
                Some(id) if info.clients.iter().any(|c| c == id) => {}
                Some(id) => {
                    return Err(format!(
                        "client identity {id:?} is not among the volume's clients"
                    ));
                }
                None => {
                    return Err(
                        "the volume admits only named TLS clients; connect with TLS".to_string()
                    );
                }
            }
        }
        let Peer::Tcp(addr) = &client.peer else {
            // The Unix socket is guarded by its file mode, not by address lists.
            return Ok(());
        };
        // A volume made under another config may name remote blocks; plain text still stays
        // on this machine unless the config allows it.
        if !self.remote && !is_loopback(addr.ip()) {
            return Err(format!(
                "client {} is beyond this machine and NBD TLS is off",
                addr.ip()
            ));
        }
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
    fn list(&self, client: &Client) -> Vec<ExportInfo> {
        self.catalog
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| self.may_open(v, client).is_ok())
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

    fn open(&self, name: &str, client: &Client) -> Result<Arc<dyn BlockDevice>, OpenError> {
        let Some(info) = self.catalog.get(name).ok().flatten() else {
            return Err(OpenError::Unknown(name.to_string()));
        };
        self.may_open(&info, client).map_err(OpenError::Denied)?;
        let volume = self.catalog.open(name).map_err(|e| OpenError::Failed {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        Ok(volume)
    }

    fn attach(&self, name: &str, attachment: Attachment) -> Box<dyn std::any::Any + Send + Sync> {
        // Gone since it was opened: nobody can ask for its clients any more.
        let Some(info) = self.catalog.get(name).ok().flatten() else {
            return Box::new(());
        };
        let number = self.attached.next.fetch_add(1, Ordering::Relaxed);
        self.attached
            .volumes()
            .entry(info.id.clone())
            .or_default()
            .push((number, attachment));
        Box::new(Detach {
            attached: self.attached.clone(),
            volume: info.id,
            number,
        })
    }

    /// The server-wide list, or any volume's own list: a peer in neither can open nothing.
    fn admits(&self, peer: &Peer) -> bool {
        let Peer::Tcp(addr) = peer else {
            return true;
        };
        let ip = addr.ip();
        if !self.remote && !is_loopback(ip) {
            return false;
        }
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

fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        v4 => v4.is_loopback(),
    }
}

/// Checks a TLS client identity as a volume's `clients` entry: what a PSK file or a
/// certificate's common name can hold, printable and short.
pub fn check_identity(identity: &str) -> Result<(), String> {
    if identity.is_empty() || identity.len() > 255 {
        return Err(format!("{identity:?} must be 1 to 255 bytes"));
    }
    if identity.chars().any(|c| c.is_control()) {
        return Err(format!("{identity:?} has a control character"));
    }
    if identity.contains(':') {
        // A PSK file line is `identity:hexkey`; its identity cannot hold a colon.
        return Err(format!("{identity:?} has a colon"));
    }
    Ok(())
}

/// The TLS acceptor for `[nbd] tls = "x509"`: the certificate chain and key from PEM files,
/// and, with `client_ca`, mutual TLS: every client must present a certificate that one of
/// those authorities signed.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
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
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| {
                    format!(
                        "[nbd] tls_client_ca: cannot read certificates from {}",
                        path.display()
                    )
                })?;
            for ca in cas {
                roots.add(ca).with_context(|| {
                    format!(
                        "[nbd] tls_client_ca: a bad certificate in {}",
                        path.display()
                    )
                })?;
            }
            if roots.is_empty() {
                anyhow::bail!("[nbd] tls_client_ca: no certificate in {}", path.display());
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .context("[nbd] tls_client_ca: cannot verify clients with it")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
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
    let slot = crate::protocols::nbd::psk_identity_slot()?;
    builder.set_psk_server_callback(move |ssl, identity, out| {
        // An unknown identity gets no key (0), and the handshake fails.
        let key = identity.and_then(|id| keys.iter().find(|(name, _)| name.as_bytes() == id));
        Ok(match key {
            Some((name, key)) if key.len() <= out.len() => {
                // OpenSSL's own buffer from here; it wipes it after the handshake.
                out[..key.len()].copy_from_slice(key.as_bytes());
                // The connection learns who it serves from here (volumes' `clients`).
                ssl.set_ex_data(slot, name.clone());
                key.len()
            }
            _ => 0,
        })
    });
    Ok(Arc::new(builder.build()))
}

/// Identity and key; the keys stay in locked memory for as long as the acceptor lives.
type PskKeys = Vec<(String, crate::seal::SecretBuf)>;

fn read_or_make_psk_file(path: &std::path::Path) -> anyhow::Result<PskKeys> {
    use anyhow::Context;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => zeroize::Zeroizing::new(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key =
                crate::seal::Secret::<32>::new_with(|key| crate::seal::secret::fill_random(key));
            // Written into a buffer of the final size: a growing String would leave
            // copies of the key behind in the memory it gives back.
            let mut line = zeroize::Zeroizing::new(vec![0u8; PSK_IDENTITY.len() + 1 + 64 + 1]);
            let (head, tail) = line.split_at_mut(PSK_IDENTITY.len() + 1);
            head[..PSK_IDENTITY.len()].copy_from_slice(PSK_IDENTITY.as_bytes());
            head[PSK_IDENTITY.len()] = b':';
            let _ = hex::encode_to_slice(&key[..], &mut tail[..64]);
            tail[64] = b'\n';
            let text = zeroize::Zeroizing::new(
                String::from_utf8(std::mem::take(&mut *line)).unwrap_or_default(),
            );
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
        let not_hex = || format!("line {}: the key is not hex", n + 1);
        if key.len() % 2 != 0 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_hex());
        }
        let len = key.len() / 2;
        if identity.is_empty() || !(16..=64).contains(&len) {
            return Err(format!(
                "line {}: needs an identity and a key of 16 to 64 bytes",
                n + 1
            ));
        }
        // Decoded straight into locked memory: no heap copy of the key to wipe.
        let key = crate::seal::SecretBuf::new_with(len, |bytes| hex::decode_to_slice(key, bytes))
            .map_err(|_| not_hex())?;
        keys.push((identity.to_string(), key));
    }
    if keys.is_empty() {
        return Err("no keys".to_string());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exports over a fresh catalog holding `volumes` (name, own allowlist).
    fn exports(dir: &std::path::Path, volumes: &[(&str, &[&str])], remote: bool) -> VolumeExports {
        use crate::engines::volume::Mode;
        let meta = Arc::new(crate::local::meta::MetaStore::open(dir.join("meta.redb")).unwrap());
        let sealer = Arc::new(crate::seal::Sealer::new(
            &crate::seal::MasterKey::from_bytes([7; 32]),
        ));
        let catalog = Arc::new(Catalog::new(meta, dir.join("volumes"), sealer).unwrap());
        for (name, allow) in volumes {
            let allow = allow.iter().map(|b| b.to_string()).collect();
            let options = crate::engines::volume::catalog::VolumeOptions {
                allow,
                ..Default::default()
            };
            catalog
                .create_with(name, 1 << 20, Mode::Local, options)
                .unwrap();
        }
        let everyone = vec![Cidr::parse("0.0.0.0/0").unwrap()];
        VolumeExports::new(catalog, everyone, remote)
    }

    fn tcp(ip: &str) -> Client {
        Client {
            peer: Peer::Tcp(std::net::SocketAddr::new(ip.parse().unwrap(), 5000)),
            identity: None,
        }
    }

    #[test]
    fn plain_text_stays_on_this_machine_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        // A volume made under a config that allowed remote clients, then served without TLS.
        let local_only = exports(dir.path(), &[("old", &["10.0.0.0/8"])], false);
        let denied = local_only.open("old", &tcp("10.1.2.3")).err().unwrap();
        assert!(denied.to_string().contains("TLS is off"), "{denied}");
        assert!(
            local_only.open("old", &tcp("127.0.0.1")).is_err(),
            "not in its list"
        );
        let blocks = ["10.9.0.0/16", "0.0.0.0/0", "::/0", "127.0.0.0/7"];
        for block in blocks {
            let cidr = Cidr::parse(block).unwrap();
            assert!(local_only.check_volume_allow(&cidr).is_err(), "{block}");
        }
        for block in ["127.0.0.2/32", "127.0.0.0/8", "::1/128"] {
            let cidr = Cidr::parse(block).unwrap();
            assert!(local_only.check_volume_allow(&cidr).is_ok(), "{block}");
        }
        drop(local_only);

        let dir = tempfile::tempdir().unwrap();
        let remote = exports(dir.path(), &[("old", &["10.0.0.0/8"])], true);
        assert!(remote.open("old", &tcp("10.1.2.3")).is_ok());
        assert!(remote.open("old", &tcp("::ffff:10.1.2.3")).is_ok());
        let cidr = Cidr::parse("10.9.0.0/16").unwrap();
        assert!(remote.check_volume_allow(&cidr).is_ok());
    }

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
        assert_eq!(
            again[0].1.as_bytes(),
            made[0].1.as_bytes(),
            "a second start must keep the key"
        );
        psk_acceptor(&path).unwrap();
    }
}
