//! The one TOML file. Every key is optional; the defaults run a trial gateway with the
//! bucket in a local directory. docs/config.md lists every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::remote::faults::FaultSettings;
use crate::remote::limit::Policy;
use crate::seal::KeySource;
use crate::size::ByteSize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub remote: RemoteConfig,
    pub local: LocalConfig,
    pub http: HttpConfig,
    pub nbd: NbdConfig,
    pub nfs: NfsConfig,
    pub volumes: VolumesConfig,
    pub shares: SharesConfig,
    pub keys: KeySource,
    /// Fault injection for drills; absent in production.
    pub faults: Option<FaultSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteKind {
    Local,
    S3,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    pub kind: RemoteKind,
    /// kind = "local": the directory that stands in for the bucket.
    /// Default: `bucket` inside the data directory.
    pub path: Option<PathBuf>,
    /// kind = "s3": endpoint URL; default AWS S3 for the region.
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    pub region: String,
    /// Key prefix inside the bucket for everything this gateway writes.
    pub prefix: String,
    /// Path-style URLs (`endpoint/bucket/key`), which Garage, MinIO and Ceph expect.
    pub path_style: bool,
    /// Otherwise from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Send a checksum with every upload for the store to verify (CRC64-NVME over HTTPS or
    /// loopback, SHA-256 over plain HTTP; `remote::s3::checksum_for`).
    pub checksum: bool,
    pub multipart_threshold: ByteSize,
    pub part_size: ByteSize,
    pub part_concurrency: usize,
    pub request_timeout_secs: u64,
    /// How long a request is retried through errors and outages before it fails.
    pub retry_for_secs: u64,
    /// kind = s3: `x-amz-server-side-encryption` on every object written (`AES256`,
    /// `aws:kms`, `aws:kms:dsse`); the bucket's default when unset.
    pub server_side_encryption: Option<String>,
    /// kind = s3: the KMS key for `aws:kms` and `aws:kms:dsse`.
    pub sse_kms_key_id: Option<String>,
    pub bandwidth: Policy,
    /// The nice value (0 to 19) of the threads that upload to the bucket and tidy it (volume
    /// segments, checkpoints, commits and garbage collection; share files): on a busy CPU
    /// they yield to the threads serving clients. 0 runs them like the rest of the daemon.
    pub upload_nice: i32,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            kind: RemoteKind::Local,
            path: None,
            endpoint: None,
            bucket: None,
            region: "us-east-1".to_string(),
            prefix: String::new(),
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            checksum: true,
            multipart_threshold: ByteSize(32 << 20),
            part_size: ByteSize(16 << 20),
            part_concurrency: 8,
            request_timeout_secs: 60,
            retry_for_secs: 300,
            server_side_encryption: None,
            sse_kms_key_id: None,
            bandwidth: Policy::default(),
            upload_nice: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub data_dir: PathBuf,
    /// Most local space firn may use for its caches and spools; default: no limit of its own.
    pub max_bytes: Option<ByteSize>,
    /// Space firn leaves free on the data directory's file system.
    pub min_free: ByteSize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            data_dir: PathBuf::from("firn-data"),
            max_bytes: None,
            min_free: ByteSize(1 << 30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7420)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// TCP address of the NBD server; empty to serve only the Unix socket.
    pub listen: String,
    /// The Unix socket; default `nbd.sock` in the data directory.
    pub socket: Option<PathBuf>,
    /// Client addresses (CIDR) allowed over TCP; the Unix socket is guarded by its mode.
    pub allow: Vec<String>,
    /// `"auto"`, `"off"`, `"psk"` or `"x509"`: with psk or x509 every client must upgrade
    /// with STARTTLS (nbds:// URIs); auto is psk when `allow` admits any address beyond this
    /// machine, off otherwise.
    pub tls: NbdTls,
    /// Serve plain NBD to clients beyond this machine (tls = "off" with a non-loopback
    /// `allow`): anyone who can reach the port, or spoof an allowed address, could then read
    /// and write the volumes. Only for a network trusted as much as this machine.
    pub allow_plaintext: bool,
    /// PEM certificate chain and private key for `tls = "x509"`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// With `tls = "x509"`: PEM certificates of the authorities whose client certificates
    /// are accepted. When set, every client must present one (mutual TLS); its subject's
    /// common name is the client's identity, which volumes may name (`--client`).
    pub tls_client_ca: Option<PathBuf>,
    /// Keys for `tls = "psk"`, `identity:hexkey` lines; written with a fresh key for the
    /// identity `firn` when missing. Default `nbd-psk/keys.psk` in the data directory.
    pub tls_psk_file: Option<PathBuf>,
    /// Connections open at once, both sockets together; more are closed as they arrive.
    pub max_connections: usize,
    /// TCP connections open at once from one client address.
    pub max_connections_per_address: usize,
    /// Seconds from connect to the end of negotiation (TLS handshake included).
    pub negotiation_timeout_secs: u64,
    /// Bytes of requests and replies in flight, all connections together.
    pub memory: ByteSize,
    /// Seconds a reply may wait for a client that takes none of it; then the connection ends.
    pub send_timeout_secs: u64,
}

/// The NFSv3 door (MOUNT and NFS on one port).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NfsConfig {
    /// TCP address of the NFS server; empty to serve no shares.
    pub listen: String,
    /// Client addresses (CIDR) admitted to shares that have no allowlist of their own.
    pub allow: Vec<String>,
}

impl Default for NfsConfig {
    fn default() -> Self {
        NfsConfig {
            listen: "127.0.0.1:2049".to_string(),
            allow: vec!["127.0.0.0/8".to_string(), "::1/128".to_string()],
        }
    }
}

/// File shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharesConfig {
    /// Seconds a written file must be quiet before it is uploaded (a COMMIT uploads at once).
    pub settle_secs: u64,
    /// Local bytes of clean files each share keeps; the least recently used go beyond it.
    pub cache_max: ByteSize,
    /// Seconds between refreshes of each share from the bucket; 0: only on demand.
    pub refresh_secs: u64,
    /// A directory an NFS client lists is refreshed first (that level) when its last listing
    /// is older than this many seconds; 0: never.
    pub listing_ttl_secs: u64,
    /// Seconds a read of data only the bucket holds waits for it before failing with EIO.
    pub read_timeout_secs: u64,
    /// Mode of files from objects without `file-permissions` metadata (e.g. `0o666`).
    pub default_file_mode: u32,
    /// Mode of directories that only objects' keys imply.
    pub default_dir_mode: u32,
    /// Owner and group of files from objects without `file-owner`/`file-group`.
    pub default_uid: u32,
    pub default_gid: u32,
    /// The largest file a client may make in a share (S3's 5 TiB at most).
    pub max_file_size: ByteSize,
}

impl Default for SharesConfig {
    fn default() -> Self {
        let settings = crate::engines::share::Settings::default();
        SharesConfig {
            settle_secs: settings.settle.as_secs(),
            cache_max: ByteSize(settings.cache_max),
            refresh_secs: settings.refresh.map_or(0, |d| d.as_secs()),
            listing_ttl_secs: settings.listing_ttl.map_or(0, |d| d.as_secs()),
            read_timeout_secs: settings.read_timeout.as_secs(),
            default_file_mode: settings.defaults.file_mode,
            default_dir_mode: settings.defaults.dir_mode,
            default_uid: settings.defaults.uid,
            default_gid: settings.defaults.gid,
            max_file_size: ByteSize(settings.max_file),
        }
    }
}

/// Cached volumes: their log, cache and commits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    /// Size at which a log segment is closed and uploaded as one object.
    pub segment_size: ByteSize,
    /// Most bytes of a volume's log not yet in the bucket; writes wait beyond it.
    pub log_max: ByteSize,
    /// Most local bytes of a volume's clean, uploaded data kept as its read cache, or a
    /// share of the data directory's file system ("25%").
    pub cache_max: crate::size::Space,
    /// Milliseconds a completed flush may wait before its segment is closed and committed.
    pub commit_interval_ms: u64,
    /// A checkpoint of the volume's map is written every this many segments.
    pub checkpoint_segments: u64,
    /// Seconds a read of data that only the bucket holds may wait before failing (EIO).
    pub read_timeout_secs: u64,
    /// Garbage collection rewrites an object whose live data is under this percentage.
    pub gc_live_percent: u64,
    /// Seconds between garbage collection passes.
    pub gc_interval_secs: u64,
    /// Seconds an object stays in the bucket after nothing names it any more.
    pub gc_grace_secs: u64,
}

impl Default for VolumesConfig {
    fn default() -> Self {
        let settings = crate::engines::volume::cached::Settings::default();
        VolumesConfig {
            segment_size: ByteSize(settings.segment_bytes),
            log_max: ByteSize(settings.log_max),
            cache_max: crate::size::Space::Bytes(settings.cache_max),
            commit_interval_ms: settings.commit_interval.as_millis() as u64,
            checkpoint_segments: settings.checkpoint_segments,
            read_timeout_secs: settings.read_timeout.as_secs(),
            gc_live_percent: settings.gc_live_percent,
            gc_interval_secs: settings.gc_interval.as_secs(),
            gc_grace_secs: settings.gc_grace.as_secs(),
        }
    }
}

impl VolumesConfig {
    /// The cached volumes' settings, for a data directory on a file system of `disk_bytes`.
    pub fn settings(
        &self,
        disk_bytes: u64,
    ) -> Result<crate::engines::volume::cached::Settings, String> {
        let segment = crate::engines::volume::cached::record::max_segment(self.segment_size.0);
        // A segment goes up in one PUT (create-if-absent has no multipart form everywhere).
        if self.segment_size.0 < (1 << 20) || self.segment_size.0 > (16 << 20) {
            return Err("[volumes] segment_size must be between 1MiB and 16MiB".into());
        }
        if self.log_max.0 < 2 * segment {
            return Err(format!(
                "[volumes] log_max must hold at least two segments ({} bytes)",
                2 * segment
            ));
        }
        if self.checkpoint_segments == 0 || self.read_timeout_secs == 0 {
            return Err(
                "[volumes] checkpoint_segments and read_timeout_secs must be positive".into(),
            );
        }
        // A read that found data at its old place may wait for a fetch ahead and then fetch
        // it itself, each up to the read timeout, a collection pass after it moved.
        if self.gc_grace_secs < 2 * self.read_timeout_secs + self.gc_interval_secs {
            return Err(
                "[volumes] gc_grace_secs must be at least 2 × read_timeout_secs + gc_interval_secs"
                    .into(),
            );
        }
        if self.gc_live_percent > 100 || self.gc_interval_secs == 0 {
            return Err(
                "[volumes] gc_live_percent must be at most 100 and gc_interval_secs positive"
                    .into(),
            );
        }
        Ok(crate::engines::volume::cached::Settings {
            segment_bytes: self.segment_size.0,
            log_max: self.log_max.0,
            cache_max: self.cache_max.bytes_of(disk_bytes),
            commit_interval: Duration::from_millis(self.commit_interval_ms),
            checkpoint_segments: self.checkpoint_segments,
            read_timeout: Duration::from_secs(self.read_timeout_secs),
            gc_live_percent: self.gc_live_percent,
            gc_interval: Duration::from_secs(self.gc_interval_secs),
            gc_grace: Duration::from_secs(self.gc_grace_secs),
            // `[local] min_free`, set by the daemon.
            min_free: 0,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    #[default]
    Auto,
    Off,
    Psk,
    X509,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: "127.0.0.1:10809".to_string(),
            socket: None,
            allow: vec!["127.0.0.0/8".to_string(), "::1/128".to_string()],
            tls: NbdTls::Auto,
            allow_plaintext: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_psk_file: None,
            max_connections: 128,
            max_connections_per_address: 32,
            negotiation_timeout_secs: 10,
            memory: ByteSize(1 << 30),
            send_timeout_secs: 60,
        }
    }
}

/// An address block such as `10.0.0.0/8`, for allowlists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid address block {text:?}: expected e.g. 10.0.0.0/8 or ::1/128");
        let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
        let network: std::net::IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix.trim().parse().map_err(|_| bad())?
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { network, prefix })
    }

    /// Whether every address in the block is this machine's own (loopback).
    pub fn is_loopback_only(&self) -> bool {
        let v4 = |n: std::net::Ipv4Addr, prefix: u8| n.is_loopback() && prefix >= 8;
        match self.network {
            std::net::IpAddr::V4(n) => v4(n, self.prefix),
            std::net::IpAddr::V6(n) => match n.to_ipv4_mapped() {
                Some(mapped) => self.prefix >= 96 && v4(mapped, self.prefix - 96),
                None => n.is_loopback() && self.prefix == 128,
            },
        }
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // Not a `source`: the message says it already, and an error chain would say it twice.
    #[error("config file {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// The config at `path`, or the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        // Relative paths in a config file are relative to the file, not to where firn runs.
        Ok(config.relative_to(path.parent().unwrap_or(Path::new("."))))
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let r = &self.remote;
        if r.kind == RemoteKind::S3 && r.bucket.as_deref().unwrap_or("").is_empty() {
            return Err("[remote] bucket is required when kind = \"s3\"".to_string());
        }
        if r.kind == RemoteKind::Local && !r.prefix.is_empty() {
            return Err(format!(
                "[remote] prefix {:?} applies to kind = \"s3\" only: for a directory, set path to the folder the gateway is to use",
                r.prefix
            ));
        }
        if let Some(endpoint) = &r.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(format!(
                "[remote] endpoint {endpoint:?} must start with http:// or https://"
            ));
        }
        if r.part_size.0 < 5 << 20 {
            return Err("[remote] part_size must be at least 5MiB (the S3 minimum)".to_string());
        }
        if r.part_concurrency == 0 {
            return Err("[remote] part_concurrency must be at least 1".to_string());
        }
        if !(0..=19).contains(&r.upload_nice) {
            return Err(format!(
                "[remote] upload_nice = {}: a nice value from 0 (as the daemon) to 19 (the lowest priority)",
                r.upload_nice
            ));
        }
        if !self.nbd.listen.is_empty() && self.nbd.listen.parse::<SocketAddr>().is_err() {
            return Err(format!(
                "[nbd] listen {:?} is not an address such as 127.0.0.1:10809",
                self.nbd.listen
            ));
        }
        if !self.nfs.listen.is_empty() && self.nfs.listen.parse::<SocketAddr>().is_err() {
            return Err(format!(
                "[nfs] listen {:?} is not an address such as 127.0.0.1:2049",
                self.nfs.listen
            ));
        }
        if self.shares.read_timeout_secs == 0 {
            return Err("[shares] read_timeout_secs must be positive".to_string());
        }
        let max_file = crate::engines::share::MAX_FILE;
        if self.shares.max_file_size.0 == 0 || self.shares.max_file_size.0 > max_file {
            return Err(format!(
                "[shares] max_file_size must be between 1 byte and {max_file} (S3's largest object)"
            ));
        }
        for block in &self.nfs.allow {
            Cidr::parse(block).map_err(|e| format!("[nfs] allow {block:?}: {e}"))?;
        }
        if self.nbd.tls == NbdTls::X509
            && (self.nbd.tls_cert.is_none() || self.nbd.tls_key.is_none())
        {
            return Err("[nbd] tls = \"x509\" needs tls_cert and tls_key (PEM files)".to_string());
        }
        if self.nbd.tls_client_ca.is_some() && self.nbd.tls != NbdTls::X509 {
            return Err("[nbd] tls_client_ca needs tls = \"x509\"".to_string());
        }
        for (key, value) in [
            ("max_connections", self.nbd.max_connections as u64),
            (
                "max_connections_per_address",
                self.nbd.max_connections_per_address as u64,
            ),
            (
                "negotiation_timeout_secs",
                self.nbd.negotiation_timeout_secs,
            ),
            ("send_timeout_secs", self.nbd.send_timeout_secs),
        ] {
            if value == 0 {
                return Err(format!("[nbd] {key} must be at least 1"));
            }
        }
        let min_memory = crate::protocols::nbd::server::MIN_MEMORY as u64;
        if self.nbd.memory.0 < min_memory {
            return Err(format!(
                "[nbd] memory must be at least {} (two connections' requests in flight)",
                crate::size::Human(min_memory)
            ));
        }
        for block in &self.nbd.allow {
            let cidr = Cidr::parse(block).map_err(|e| format!("[nbd] allow: {e}"))?;
            if !cidr.is_loopback_only() && self.nbd.tls == NbdTls::Off && !self.nbd.allow_plaintext
            {
                return Err(format!(
                    "[nbd] allow {block:?} admits clients beyond this machine, but tls = \"off\": \
                     they could read and write every volume unauthenticated and unencrypted. \
                     Use tls = \"psk\" (or \"auto\", the default), or set allow_plaintext = true \
                     for a network you trust as much as this machine"
                ));
            }
        }
        if let Some(faults) = &self.faults {
            for (name, rate) in [
                ("error_rate", faults.error_rate),
                ("truncate_rate", faults.truncate_rate),
            ] {
                if !(0.0..=1.0).contains(&rate) {
                    return Err(format!("[faults] {name} must be between 0.0 and 1.0"));
                }
            }
        }
        Ok(())
    }

    fn relative_to(mut self, base: &Path) -> Config {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.local.data_dir);
        if let Some(p) = self.remote.path.as_mut() {
            fix(p);
        }
        for p in [
            &mut self.nbd.socket,
            &mut self.nbd.tls_cert,
            &mut self.nbd.tls_key,
            &mut self.nbd.tls_client_ca,
            &mut self.nbd.tls_psk_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let KeySource::File { file } = &mut self.keys {
            fix(file);
        }
        self
    }

    /// The NBD door's TLS mode, with `auto` settled: PSK as soon as `[nbd] allow` admits an
    /// address beyond this machine.
    pub fn nbd_tls(&self) -> NbdTls {
        match self.nbd.tls {
            NbdTls::Auto => {
                let remote = self
                    .nbd
                    .allow
                    .iter()
                    .any(|b| Cidr::parse(b).is_ok_and(|c| !c.is_loopback_only()));
                if remote { NbdTls::Psk } else { NbdTls::Off }
            }
            tls => tls,
        }
    }

    /// Whether NBD clients beyond this machine may attach: always over TLS, in plain text
    /// only where `allow_plaintext` says so.
    pub fn nbd_remote_allowed(&self) -> bool {
        self.nbd_tls() != NbdTls::Off || self.nbd.allow_plaintext
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.nbd
            .socket
            .clone()
            .unwrap_or_else(|| self.local.data_dir.join("nbd.sock"))
    }

    pub fn nbd_psk_file(&self) -> PathBuf {
        self.nbd
            .tls_psk_file
            .clone()
            .unwrap_or_else(|| self.local.data_dir.join("nbd-psk").join("keys.psk"))
    }

    pub fn bucket_dir(&self) -> PathBuf {
        self.remote
            .path
            .clone()
            .unwrap_or_else(|| self.local.data_dir.join("bucket"))
    }

    pub fn retry_for(&self) -> Duration {
        Duration::from_secs(self.remote.retry_for_secs)
    }

    /// Where the remote is, for people: the directory or `endpoint/bucket/prefix`.
    pub fn remote_target(&self) -> String {
        let r = &self.remote;
        match r.kind {
            RemoteKind::Local => format!("directory {}", self.bucket_dir().display()),
            RemoteKind::S3 => {
                let endpoint = r
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", r.region));
                let mut target = format!("{endpoint} bucket {}", r.bucket.as_deref().unwrap_or(""));
                if !r.prefix.is_empty() {
                    target.push_str(&format!(" prefix {}", r.prefix));
                }
                target
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_trial_default() {
        let c = Config::parse("").expect("defaults");
        assert_eq!(c.remote.kind, RemoteKind::Local);
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:7420");
        assert_eq!(c.keys, KeySource::Dev);
        assert_eq!(c.bucket_dir(), PathBuf::from("firn-data/bucket"));
    }

    #[test]
    fn a_full_config_parses() {
        let c = Config::parse(
            r#"
            [remote]
            kind = "s3"
            endpoint = "http://127.0.0.1:3900"
            bucket = "edge"
            region = "garage"
            prefix = "site-7"
            multipart_threshold = "64MiB"
            [remote.bandwidth]
            upload = "10MiB"
            [[remote.bandwidth.schedule]]
            days = "sat,sun"
            start = "00:00"
            end = "24:00"
            upload = "unlimited"
            [local]
            data_dir = "/var/lib/firn"
            max_bytes = "100GiB"
            [http]
            listen = "127.0.0.1:9000"
            [keys]
            source = "file"
            file = "/etc/firn/master.key"
            [faults]
            error_rate = 0.1
            "#,
        )
        .expect("valid");
        assert_eq!(c.remote.kind, RemoteKind::S3);
        assert_eq!(c.remote.multipart_threshold, ByteSize(64 << 20));
        assert_eq!(
            c.remote.bandwidth.upload,
            crate::remote::limit::Rate::PerSecond(10 << 20)
        );
        assert_eq!(c.local.max_bytes, Some(ByteSize(100 << 30)));
        assert!(matches!(c.keys, KeySource::File { .. }));
        assert!(
            c.remote_target()
                .contains("http://127.0.0.1:3900 bucket edge prefix site-7")
        );
    }

    #[test]
    fn address_blocks_match() {
        let lo = Cidr::parse("127.0.0.0/8").expect("valid");
        assert!(lo.contains("127.1.2.3".parse().expect("ip")));
        assert!(lo.contains("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!lo.contains("10.0.0.1".parse().expect("ip")));
        let one = Cidr::parse("::1").expect("valid");
        assert!(one.contains("::1".parse().expect("ip")));
        assert!(!one.contains("::2".parse().expect("ip")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("valid")
                .contains("8.8.8.8".parse().expect("ip"))
        );
    }

    #[test]
    fn mistakes_name_the_key() {
        let cases = [
            ("[remote]\nkindd = \"s3\"", "kindd"),
            ("[remote]\nkind = \"ftp\"", "ftp"),
            ("[remote]\nkind = \"s3\"", "bucket"),
            ("[local]\nmax_bytes = \"lots\"", "lots"),
            ("[http]\nlisten = \"localhost\"", "listen"),
            ("[keys]\nsource = \"env\"\nfile = \"x\"", "file"),
            ("[remote.bandwidth]\nupload = \"fast\"", "fast"),
            ("[remote.bandwidth]\nupload = \"0\"", "paused"),
            ("[remote.bandwidth]\ndownload = \"0.4\"", "paused"),
            (
                "[[remote.bandwidth.schedule]]\ndays = \"daily\"\nstart = \"71582789:00\"\nend = \"24:00\"",
                "71582789",
            ),
            ("[faults]\nerror_rate = 2.0", "error_rate"),
            ("[remote]\nendpoint = \"127.0.0.1:3900\"", "endpoint"),
            ("[nbd]\nallow = [\"10.0.0.0/33\"]", "10.0.0.0/33"),
            ("[nbd]\nlisten = \"nowhere\"", "listen"),
            ("[ndb]\n", "ndb"),
            ("[nbd]\ntls = \"x509\"", "tls_cert"),
            ("[nbd]\ntls_client_ca = \"ca.pem\"", "tls_client_ca needs"),
            ("[nbd]\ntls = \"rsa\"", "rsa"),
            (
                "[nbd]\ntls = \"off\"\nallow = [\"127.0.0.0/8\", \"10.0.0.0/8\"]",
                "allow_plaintext",
            ),
            ("[nbd]\nmax_connections = 0", "max_connections"),
            ("[nbd]\nmemory = \"64MiB\"", "memory must be at least"),
            (
                "[remote]\nprefix = \"site-7/\"",
                "applies to kind = \"s3\" only",
            ),
            ("[nbd]\nsend_timeout_secs = 0", "send_timeout_secs"),
            ("[shares]\nread_timeout_secs = 0", "read_timeout_secs"),
            ("[shares]\nmax_file_size = \"6TiB\"", "max_file_size"),
            ("[shares]\nmax_file_size = 0", "max_file_size"),
            (
                "[nbd]\nnegotiation_timeout_secs = 0",
                "negotiation_timeout_secs",
            ),
        ];
        for (text, expected) in cases {
            let message = Config::parse(text).expect_err(text);
            assert!(message.contains(expected), "{text:?} gave {message:?}");
        }
    }

    #[test]
    fn loopback_blocks_are_told_apart() {
        for block in [
            "127.0.0.0/8",
            "127.0.0.1",
            "127.9.0.0/16",
            "::1/128",
            "::ffff:127.0.0.1",
        ] {
            assert!(Cidr::parse(block).unwrap().is_loopback_only(), "{block}");
        }
        for block in [
            "127.0.0.0/7",
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/8",
            "::ffff:0.0.0.0/96",
        ] {
            assert!(!Cidr::parse(block).unwrap().is_loopback_only(), "{block}");
        }
    }

    #[test]
    fn tls_turns_on_by_itself_for_clients_beyond_this_machine() {
        let parse = |text: &str| Config::parse(text).expect(text);
        let default = parse("");
        assert_eq!(default.nbd_tls(), NbdTls::Off);
        assert!(!default.nbd_remote_allowed());
        let remote = parse("[nbd]\nallow = [\"127.0.0.1/32\", \"192.168.7.0/24\"]");
        assert_eq!(remote.nbd_tls(), NbdTls::Psk);
        assert!(remote.nbd_remote_allowed());
        let trusted =
            parse("[nbd]\ntls = \"off\"\nallow_plaintext = true\nallow = [\"192.168.7.0/24\"]");
        assert_eq!(trusted.nbd_tls(), NbdTls::Off);
        assert!(trusted.nbd_remote_allowed());
        let x509 = parse("[nbd]\ntls = \"x509\"\ntls_cert = \"c\"\ntls_key = \"k\"");
        assert_eq!(x509.nbd_tls(), NbdTls::X509);
    }
}
