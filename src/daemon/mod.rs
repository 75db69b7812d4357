//! The daemon: config, start-up wiring, the HTTP API, metrics and the audit log. The only
//! layer that knows every other one.

pub mod api;
pub mod audit;
pub mod capped;
pub mod config;
pub mod nbd;
pub mod process;
pub mod status;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prometheus_client::registry::Registry;

use crate::engines::share::{Settings as ShareSettings, ShareInfo, Shares};
use crate::engines::volume::catalog::{BucketContext, Catalog};
use crate::local::meta::MetaStore;
use crate::protocols::nbd::{Limits as NbdLimits, NbdMetrics, NbdServer, TlsAcceptor};
use crate::protocols::nfs::{Admit, NfsMetrics, NfsServer};
use crate::remote::dir::DirStore;
use crate::remote::faults::FaultPlan;
use crate::remote::limit::{Direction, Limiter, Rate};
use crate::remote::metered::RemoteMetrics;
use crate::remote::retry::RetryPolicy;
use crate::remote::s3::{S3Options, S3Store};
use crate::remote::{self, Remote};
use crate::seal::{KeySource, MasterKey, Sealer};
use config::{Config, RemoteKind};
use status::ConditionalCreate;

pub const TOKEN_FILE: &str = "api-token";
const PROBE_KEY_PREFIX: &str = remote::PROBE_PREFIX;
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// For the three requests of [`remote::probe_create`].
const CREATE_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_EVERY: Duration = Duration::from_secs(15);

/// The backend `config` names, without wrappers.
/// The configured store, with `limiter` where its bytes move.
pub fn open_backend(config: &Config, limiter: Arc<Limiter>) -> anyhow::Result<Arc<dyn Remote>> {
    let r = &config.remote;
    Ok(match r.kind {
        RemoteKind::Local => {
            let dir = config.bucket_dir();
            // The embedded default's bucket is inside the data directory: made here first
            // (`firn remote` may run before any `firn serve`), it is made private, as `serve`
            // makes it.
            let data_dir = &config.local.data_dir;
            if dir.starts_with(data_dir) && !data_dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(data_dir)
                    .with_context(|| {
                        format!("[local] data_dir: cannot create {}", data_dir.display())
                    })?;
            }
            Arc::new(
                DirStore::open(&dir)
                    .with_context(|| format!("[remote] path: cannot use {}", dir.display()))?
                    .with_limiter(limiter),
            )
        }
        RemoteKind::S3 => {
            let (access_key_id, secret_access_key) = s3_credentials(config);
            let options = S3Options {
                endpoint: r.endpoint.clone(),
                bucket: r.bucket.clone().unwrap_or_default(),
                region: r.region.clone(),
                prefix: r.prefix.clone(),
                path_style: r.path_style,
                access_key_id,
                secret_access_key,
                checksum: r.checksum,
                multipart_threshold: r.multipart_threshold.0 as usize,
                part_size: r.part_size.0 as usize,
                part_concurrency: r.part_concurrency,
                request_timeout: Duration::from_secs(r.request_timeout_secs),
                server_side_encryption: r.server_side_encryption.clone(),
                sse_kms_key_id: r.sse_kms_key_id.clone(),
            };
            Arc::new(
                S3Store::new(&options, limiter)
                    .with_context(|| format!("[remote] {}", config.remote_target()))?,
            )
        }
    })
}

/// Credentials from the config, else the AWS environment variables (which the S3 client
/// reads itself), else the shared credentials file.
fn s3_credentials(config: &Config) -> (Option<String>, Option<String>) {
    let r = &config.remote;
    if r.access_key_id.is_some() || std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        return (r.access_key_id.clone(), r.secret_access_key.clone());
    }
    let Some(home) = std::env::var_os("HOME") else {
        return (None, None);
    };
    let path = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".aws/credentials"));
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_string());
    let Ok(text) = std::fs::read_to_string(path) else {
        return (None, None);
    };
    let (mut id, mut secret, mut in_profile) = (None, None, false);
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
        } else if in_profile && let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_string()),
                "aws_secret_access_key" => secret = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    (id, secret)
}

/// The remote as the daemon and the CLI use it: the backend with every wrapper.
pub fn open_remote(config: &Config, registry: &mut Registry) -> anyhow::Result<remote::Stack> {
    let limiter = Arc::new(Limiter::new(config.remote.bandwidth.clone()));
    let backend = open_backend(config, limiter.clone())?;
    let policy = RetryPolicy {
        give_up_after: config.retry_for(),
        ..RetryPolicy::default()
    };
    let metrics = Arc::new(RemoteMetrics::new(registry));
    let faults = config.faults.clone().map(|f| Arc::new(FaultPlan::new(f)));
    Ok(remote::stack(backend, policy, limiter, metrics, faults))
}

/// Shares in other buckets than `[remote] bucket`: the same endpoint, credentials and
/// wrappers (limiter, retries, metrics, faults shared with the gateway's own remote), without
/// `[remote] prefix` (a share's prefix is where its objects go in its bucket).
#[derive(Debug)]
pub struct OtherBuckets {
    config: Config,
    limiter: Arc<Limiter>,
    metrics: Arc<RemoteMetrics>,
    faults: Option<Arc<FaultPlan>>,
    open: std::sync::Mutex<HashMap<String, Arc<dyn Remote>>>,
}

impl OtherBuckets {
    pub fn new(config: &Config, stack: &remote::Stack) -> OtherBuckets {
        OtherBuckets {
            config: config.clone(),
            limiter: stack.limiter.clone(),
            metrics: stack.metrics.clone(),
            faults: stack.faults.clone(),
            open: Default::default(),
        }
    }
}

impl crate::engines::share::Buckets for OtherBuckets {
    fn gateway_prefix(&self, bucket: &str) -> Option<String> {
        if self.config.remote.bucket.as_deref() != Some(bucket) {
            return None;
        }
        let prefix = self.config.remote.prefix.trim_matches('/');
        Some(if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        })
    }

    fn open(&self, bucket: &str) -> Result<Arc<dyn Remote>, String> {
        if self.config.remote.kind != RemoteKind::S3 {
            return Err("shares in other buckets need [remote] kind = \"s3\"".into());
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(remote) = open.get(bucket) {
            return Ok(remote.clone());
        }
        let mut config = self.config.clone();
        config.remote.bucket = Some(bucket.to_string());
        config.remote.prefix = String::new();
        let backend = open_backend(&config, self.limiter.clone()).map_err(|e| format!("{e:#}"))?;
        let policy = RetryPolicy {
            give_up_after: config.retry_for(),
            ..RetryPolicy::default()
        };
        let stack = remote::stack(
            backend,
            policy,
            self.limiter.clone(),
            self.metrics.clone(),
            self.faults.clone(),
        );
        open.insert(bucket.to_string(), stack.remote.clone());
        Ok(stack.remote)
    }
}

/// Where the passphrase's salt is kept in the bucket (it is not secret).
const SALT_KEY: &str = "keys/passphrase-salt";

/// Whether `salt` is one: 32 hex digits (16 bytes), as firn makes them.
fn valid_salt(salt: &str) -> bool {
    salt.len() == 32 && salt.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What the bucket needs of the salt in use, once the key is made (`share_passphrase_salt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaltPut {
    /// The bucket has none: made only if still absent.
    Create,
    /// The bucket's is damaged: replaced.
    Replace,
}

/// Before a passphrase is stretched: when the data directory has no salt yet, takes the
/// bucket's, if the bucket answers within the probe timeout and has one. Returns what the
/// bucket needs of the salt in use once the key is made, or `None` when there is nothing to
/// do. Refuses to start rather than make a salt of
/// its own when the bucket holds volumes but not their salt (a new salt would never open
/// them, and, put in the bucket, would lead every later gateway astray), or when the bucket's
/// salt is damaged; a damaged salt is never copied here.
async fn passphrase_salt(probe: &dyn Remote, data_dir: &Path) -> anyhow::Result<Option<SaltPut>> {
    let local = data_dir.join(crate::seal::keys::SALT_FILE);
    let ours = match std::fs::read_to_string(&local) {
        Ok(ours) => Some(ours.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => anyhow::bail!("reading the passphrase salt {}: {e}", local.display()),
    };
    if let Some(ours) = &ours
        && !valid_salt(ours)
    {
        anyhow::bail!(
            "the passphrase salt {} is not 32 hex digits: put back the one this gateway made (the bucket keeps a copy at {SALT_KEY})",
            local.display()
        );
    }
    let fetched = tokio::time::timeout(PROBE_TIMEOUT, probe.get(SALT_KEY)).await;
    Ok(match fetched {
        Ok(Ok(object)) => {
            let theirs = String::from_utf8_lossy(&object.body).trim().to_string();
            match ours {
                Some(_) if !valid_salt(&theirs) => {
                    tracing::warn!(
                        "the bucket's passphrase salt ({SALT_KEY}) is not 32 hex digits: putting this data directory's there"
                    );
                    Some(SaltPut::Replace)
                }
                None if !valid_salt(&theirs) => anyhow::bail!(
                    "the bucket's passphrase salt ({SALT_KEY}) is not 32 hex digits: it is damaged, and the bucket's volumes cannot be opened without it. Put back the {} of a gateway that wrote them",
                    crate::seal::keys::SALT_FILE
                ),
                Some(ours) if ours == theirs => None,
                Some(_) => {
                    tracing::warn!(
                        "the bucket's passphrase salt ({SALT_KEY}) differs from this data directory's: volumes other gateways wrote will not open here"
                    );
                    None
                }
                None => {
                    if let Err(e) = crate::seal::keys::write_private(&local, theirs.as_bytes()) {
                        tracing::warn!("cannot keep the bucket's passphrase salt: {e}");
                    }
                    None
                }
            }
        }
        Ok(Err(remote::Error::NotFound { .. })) if ours.is_none() => {
            let volumes =
                tokio::time::timeout(PROBE_TIMEOUT, probe.list_dir_page("volumes/", None)).await;
            if let Ok(Ok(page)) = volumes
                && !page.listing.dirs.is_empty()
            {
                anyhow::bail!(
                    "the bucket holds volumes but not their passphrase salt ({SALT_KEY}): a new salt would not open them. Put back the {} of a gateway that wrote them (into the bucket, or into this data directory); to start with a new salt all the same, write 32 random hex digits to {}",
                    crate::seal::keys::SALT_FILE,
                    local.display()
                );
            }
            Some(SaltPut::Create)
        }
        Ok(Err(remote::Error::NotFound { .. })) => Some(SaltPut::Create),
        Ok(Err(e)) => {
            tracing::warn!(
                "cannot read the passphrase salt from the bucket ({e}); using this data directory's"
            );
            None
        }
        Err(_) => {
            tracing::warn!(
                "the bucket did not answer for the passphrase salt; using this data directory's"
            );
            None
        }
    })
}

/// Puts the salt in use in the bucket, which lacks it (or holds a damaged one). Made only if
/// absent where the bucket had none, so that of two new gateways starting at once, the
/// second does not replace the salt the first's volumes need.
async fn share_passphrase_salt(remote: &remote::Stack, data_dir: &Path, how: SaltPut) {
    let Ok(salt) = std::fs::read(data_dir.join(crate::seal::keys::SALT_FILE)) else {
        return;
    };
    let body = bytes::Bytes::from(salt);
    let put = async {
        if how == SaltPut::Replace {
            remote
                .probe
                .put(SALT_KEY, body.clone(), remote::Meta::new())
                .await
        } else {
            remote
                .probe
                .create(SALT_KEY, body.clone(), remote::Meta::new())
                .await
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, put).await {
        Ok(Ok(())) => {}
        Ok(Err(remote::Error::Exists { .. })) => tracing::warn!(
            "another gateway put its passphrase salt in the bucket ({SALT_KEY}) as this one started: volumes it writes will not open here; restart this gateway with an empty data directory to take its salt"
        ),
        Ok(Err(e)) => tracing::warn!("cannot put the passphrase salt in the bucket: {e}"),
        Err(_) => tracing::warn!("the bucket did not answer; the passphrase salt is only here"),
    }
}

/// What the last health probe of the remote found.
#[derive(Debug, Clone, Default)]
pub struct RemoteHealth {
    pub reachable: bool,
    pub last_error: Option<String>,
    pub checked: Option<Instant>,
}

/// Asks the remote a question that needs the bucket and the credentials to be right.
pub async fn probe(remote: &dyn Remote) -> Result<(), remote::Error> {
    match tokio::time::timeout(PROBE_TIMEOUT, remote.list(PROBE_KEY_PREFIX)).await {
        Ok(outcome) => outcome.map(|_| ()),
        Err(_) => Err(remote::Error::Transient {
            op: "list",
            key: PROBE_KEY_PREFIX.to_string(),
            message: format!("no answer within {PROBE_TIMEOUT:?}"),
        }),
    }
}

/// Everything a running gateway holds.
pub struct Gateway {
    pub config: Config,
    pub started: Instant,
    pub remote: remote::Stack,
    pub sealer: Arc<Sealer>,
    pub meta: Arc<MetaStore>,
    pub volumes: Arc<Catalog>,
    pub exports: Arc<nbd::VolumeExports>,
    pub shares: Arc<Shares>,
    pub gateway_id: String,
    pub token: String,
    pub registry: Registry,
    pub nbd_metrics: Arc<NbdMetrics>,
    pub nfs_metrics: Arc<NfsMetrics>,
    pub health: RwLock<RemoteHealth>,
    /// Found by `check_conditional_create` once the remote answers.
    pub conditional_create: RwLock<ConditionalCreate>,
    pub audit: audit::Audit,
    calls: std::sync::atomic::AtomicU64,
    _lock: nix::fcntl::Flock<File>,
}

/// Holds the data directory for this process alone.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<nix::fcntl::Flock<File>> {
    let path = data_dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "data directory {} is in use by another firn process ({errno}); stop it first or set [local] data_dir",
            data_dir.display()
        )
    })
}

fn read_or_create_token(data_dir: &Path) -> anyhow::Result<(String, bool)> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok((token.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let token = hex::encode(bytes);
    crate::seal::keys::write_private(&path, token.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((token, true))
}

impl Gateway {
    /// Opens the data directory, the keys and the remote. Fails with a message that names
    /// what to fix; an unreachable remote is not a failure (the gateway works offline).
    pub async fn open(
        config: Config,
        uploads: tokio::runtime::Handle,
    ) -> anyhow::Result<Arc<Gateway>> {
        let data_dir = config.local.data_dir.clone();
        // Keys (in dev mode), the token, the catalog and the audit log live here.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .with_context(|| format!("[local] data_dir: cannot create {}", data_dir.display()))?;
        let lock = lock_data_dir(&data_dir)?;
        if let Ok(meta) = std::fs::metadata(&data_dir) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "data directory {} can be entered by other users (mode {:o}); chmod 700 it",
                    data_dir.display(),
                    meta.permissions().mode() & 0o777
                );
            }
        }

        let mut registry = Registry::default();
        let remote = open_remote(&config, &mut registry)?;
        // A passphrase's salt is in the bucket too, so that a new gateway derives the same key.
        let salt_from_bucket = match &config.keys {
            crate::seal::KeySource::Passphrase { .. } => {
                passphrase_salt(remote.probe.as_ref(), &data_dir).await?
            }
            _ => None,
        };
        let master = MasterKey::load(&config.keys, &data_dir)?;
        if let Some(how) = salt_from_bucket {
            share_passphrase_salt(&remote, &data_dir, how).await;
        }
        let sealer = Arc::new(Sealer::new(&master));
        drop(master);
        crate::seal::keys::check_key(&sealer, &data_dir)?;

        let meta = Arc::new(MetaStore::open(data_dir.join("meta.redb"))?);
        let space = Arc::new(crate::local::space::SpaceBudget::new(
            &data_dir,
            config.local.min_free.0,
            config.local.max_bytes.map(|m| m.0),
        ));
        let volumes = Catalog::new(meta.clone(), data_dir.join("volumes"), sealer.clone())?
            .with_space_budget(space.clone());
        let gateway_id = match meta.get("gateway", "id")? {
            Some(id) => String::from_utf8_lossy(&id).into_owned(),
            None => {
                // A metadata store without a gateway id was made just now. Volume files
                // beside it belong to a catalog that is gone: refuse, before writing anything
                // that would make the next start take this store for the real one.
                let unnamed = volumes.unnamed_files()?;
                if !unnamed.is_empty() {
                    bail!(
                        "the metadata store {} is new (missing, or replaced by an empty one), but {} holds {} volume file(s) it does not name, e.g. {}. Restore meta.redb from a backup (or put the moved one back); or, to start without these volumes, move the .img files out of that folder. Nothing was changed",
                        meta.path().display(),
                        volumes.dir().display(),
                        unnamed.len(),
                        unnamed[0].display()
                    );
                }
                let mut bytes = [0u8; 8];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
                let id = format!("gw-{}", hex::encode(bytes));
                meta.put("gateway", "id", id.as_bytes())?;
                id
            }
        };
        let (audit, recovery) = audit::Audit::open(&data_dir.join("audit.log"))?;
        audit::report_recovery(audit.path(), &recovery);
        // Nothing serves yet, so no volume can be half made.
        let settings = crate::engines::volume::cached::Settings {
            min_free: config.local.min_free.0,
            ..config
                .volumes
                .settings(status::disk_space(&data_dir).1)
                .map_err(anyhow::Error::msg)?
        };
        let volumes = Arc::new(volumes.with_bucket(BucketContext {
            // Everything a cached volume stores is sealed, so its reader checks every byte.
            remote: remote.sealed.clone(),
            runtime: tokio::runtime::Handle::current(),
            uploads: uploads.clone(),
            gateway: gateway_id.clone(),
            settings,
        }));
        let recovered = volumes.recover()?;
        for path in &recovered.removed {
            tracing::warn!(path = %path.display(), "removed the file of a volume create or delete that a crash interrupted");
        }
        for name in &recovered.takeovers {
            tracing::warn!(volume = %name, "a crash cut a takeover of this volume short: the bucket says whether its commit went in, and if so it is finished");
        }
        for (from, to) in &recovered.quarantined {
            tracing::warn!(
                "volume file {} is named by no volume (the metadata store may be older than the volumes); moved it to {}. Restore the metadata store that names it to get the volume back",
                from.display(),
                to.display()
            );
            println!(
                "WARNING: volume file {} is named by no volume; moved to {}",
                from.display(),
                to.display()
            );
        }
        let allow = config
            .nbd
            .allow
            .iter()
            .map(|block| config::Cidr::parse(block).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Cached volumes stay open: their uploads resume now, attached or not.
        for (name, e) in volumes.open_cached_volumes() {
            tracing::error!(volume = %name, "cannot open the cached volume: {e}");
        }
        let exports = Arc::new(nbd::VolumeExports::new(
            volumes.clone(),
            allow,
            config.nbd_remote_allowed(),
        ));
        let shares = Arc::new(
            Shares::open_with_buckets(
                meta.clone(),
                data_dir.join("shares"),
                remote.remote.clone(),
                Some(Arc::new(OtherBuckets::new(&config, &remote))),
                tokio::runtime::Handle::current(),
                uploads,
                ShareSettings {
                    settle: std::time::Duration::from_secs(config.shares.settle_secs),
                    cache_max: config.shares.cache_max.0,
                    refresh: (config.shares.refresh_secs > 0)
                        .then(|| std::time::Duration::from_secs(config.shares.refresh_secs)),
                    listing_ttl: (config.shares.listing_ttl_secs > 0)
                        .then(|| std::time::Duration::from_secs(config.shares.listing_ttl_secs)),
                    read_timeout: std::time::Duration::from_secs(config.shares.read_timeout_secs),
                    defaults: crate::engines::share::Defaults {
                        file_mode: config.shares.default_file_mode & 0o7777,
                        dir_mode: config.shares.default_dir_mode & 0o7777,
                        uid: config.shares.default_uid,
                        gid: config.shares.default_gid,
                    },
                    bucket_prefix: match config.remote.prefix.trim_matches('/') {
                        "" => String::new(),
                        prefix => format!("{prefix}/"),
                    },
                    max_file: config.shares.max_file_size.0,
                },
                Some(space),
            )
            .map_err(|e| anyhow::anyhow!("opening the file shares: {e}"))?,
        );
        let (token, new_token) = read_or_create_token(&data_dir)?;
        if new_token {
            println!(
                "API token (shown once; the CLI reads it from {}):",
                data_dir.join(TOKEN_FILE).display()
            );
            println!("  {token}");
        }

        let nbd_metrics = Arc::new(NbdMetrics::new(&mut registry));
        let nfs_metrics = Arc::new(NfsMetrics::new(&mut registry));
        let health = match probe(remote.probe.as_ref()).await {
            Ok(()) => RemoteHealth {
                reachable: true,
                last_error: None,
                checked: Some(Instant::now()),
            },
            Err(e @ (remote::Error::Permanent { .. } | remote::Error::BadKey { .. })) => {
                bail!(
                    "remote {}: {e}. Check the [remote] section (bucket, region, credentials)",
                    config.remote_target()
                )
            }
            Err(e) => {
                tracing::warn!(
                    "remote {} is unreachable ({e}); serving from local disk, uploads wait until it answers",
                    config.remote_target()
                );
                RemoteHealth {
                    reachable: false,
                    last_error: Some(e.to_string()),
                    checked: Some(Instant::now()),
                }
            }
        };
        Ok(Arc::new(Gateway {
            config,
            started: Instant::now(),
            remote,
            sealer,
            meta,
            volumes,
            exports,
            shares,
            gateway_id,
            token,
            registry,
            nbd_metrics,
            nfs_metrics,
            health: RwLock::new(health),
            conditional_create: RwLock::new(ConditionalCreate::Unknown),
            audit,
            calls: std::sync::atomic::AtomicU64::new(0),
            _lock: lock,
        }))
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.local.data_dir
    }

    pub fn dev_keys(&self) -> bool {
        self.config.keys == KeySource::Dev
    }

    /// A number for the next API call, so its intent and outcome records pair up.
    pub fn next_call(&self) -> u64 {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Finishes, at start and then every few seconds until done, the takeovers a crash cut
    /// short; and deletes the bucket objects of cached volumes deleted while the bucket did
    /// not answer.
    async fn finish_volume_work(self: Arc<Self>) {
        let mut takeovers = true;
        loop {
            let volumes = self.volumes.clone();
            let left = tokio::task::spawn_blocking(move || {
                let left = if takeovers {
                    volumes.finish_takeovers()
                } else {
                    0
                };
                volumes.retry_bucket_deletes();
                left
            });
            if let Ok(left) = left.await {
                takeovers = left > 0;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }

    /// Writes the counts of refused calls every second.
    async fn flush_refused_calls(self: Arc<Self>) {
        loop {
            tokio::time::sleep(audit::REFUSED_EVERY).await;
            let gateway = self.clone();
            let _ = tokio::task::spawn_blocking(move || gateway.audit.flush_refused(false)).await;
        }
    }

    /// Whether the store honours create-if-absent, into `conditional_create` (loudly when it
    /// does not). `false` when it could not ask now (uploads are paused) and should later.
    async fn check_conditional_create(&self) -> bool {
        let target = self.config.remote_target();
        if self.remote.limiter.rate_now(Direction::Upload) == Rate::Paused {
            // The probe uploads a few bytes; it would wait for the pause to end.
            tracing::info!(
                "uploads are paused: whether remote {target} honours create-if-absent is checked when they resume"
            );
            return false;
        }
        let found = match tokio::time::timeout(
            CREATE_PROBE_TIMEOUT,
            remote::probe_create(self.remote.probe.as_ref()),
        )
        .await
        {
            Ok(Ok(true)) => ConditionalCreate::Honoured,
            Ok(Ok(false)) => ConditionalCreate::Ignored,
            Ok(Err(e)) => {
                tracing::warn!(
                    "could not check whether remote {target} honours create-if-absent ({e}); status shows it as unknown until the remote is reachable again"
                );
                return true;
            }
            Err(_) => {
                tracing::warn!(
                    "could not check whether remote {target} honours create-if-absent (no answer within {CREATE_PROBE_TIMEOUT:?}); status shows it as unknown until the remote is reachable again"
                );
                return true;
            }
        };
        match found {
            ConditionalCreate::Ignored => {
                tracing::warn!("remote {target}: {}", status::IGNORED_WARNING);
                println!("WARNING: remote {target}: {}", status::IGNORED_WARNING);
            }
            _ => tracing::info!(
                "remote {target} honours create-if-absent: a second create of an object is refused"
            ),
        }
        *self
            .conditional_create
            .write()
            .unwrap_or_else(|e| e.into_inner()) = found;
        true
    }

    /// Probes the remote every `PROBE_EVERY`; checks create-if-absent at start when the
    /// remote answers, else when it first does (and again after each outage while unknown).
    async fn watch_remote(self: Arc<Self>) {
        let mut check_create = self
            .health
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .reachable;
        loop {
            if check_create {
                check_create = !self.check_conditional_create().await;
            }
            tokio::time::sleep(PROBE_EVERY).await;
            let outcome = probe(self.remote.probe.as_ref()).await;
            let mut health = self.health.write().unwrap_or_else(|e| e.into_inner());
            let unknown = *self
                .conditional_create
                .read()
                .unwrap_or_else(|e| e.into_inner())
                == ConditionalCreate::Unknown;
            check_create = outcome.is_ok() && unknown && (check_create || !health.reachable);
            if health.reachable != outcome.is_ok() {
                match &outcome {
                    Ok(()) => {
                        tracing::info!("remote {} is reachable again", self.config.remote_target())
                    }
                    Err(e) => {
                        tracing::warn!("remote {} is unreachable: {e}", self.config.remote_target())
                    }
                }
            }
            *health = RemoteHealth {
                reachable: outcome.is_ok(),
                last_error: outcome.err().map(|e| e.to_string()),
                checked: Some(Instant::now()),
            };
        }
    }
}

/// How long a stop waits for HTTP requests and NBD connections to end.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a stop waits for cached volumes to commit what their clients flushed.
const STOP_UPLOAD: Duration = Duration::from_secs(20);

/// `firn serve`: runs until Ctrl-C or SIGTERM, with uploads to the bucket on `uploads`.
pub async fn serve(config: Config, uploads: tokio::runtime::Handle) -> anyhow::Result<()> {
    let listen = config.http.listen;
    let gateway = Gateway::open(config, uploads).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("[http] listen: cannot bind {listen}"))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let nbd_config = &gateway.config.nbd;
    let tls = match (
        gateway.config.nbd_tls(),
        &nbd_config.tls_cert,
        &nbd_config.tls_key,
    ) {
        (config::NbdTls::X509, Some(cert), Some(key)) => Some(TlsAcceptor::X509(
            nbd::tls_acceptor(cert, key, nbd_config.tls_client_ca.as_deref())?,
        )),
        (config::NbdTls::Psk, _, _) => Some(TlsAcceptor::Psk(nbd::psk_acceptor(
            &gateway.config.nbd_psk_file(),
        )?)),
        _ => None,
    };
    let nbd = NbdServer::new(
        gateway.exports.clone(),
        stopped.clone(),
        tls,
        gateway.nbd_metrics.clone(),
        NbdLimits {
            max_connections: nbd_config.max_connections,
            max_connections_per_address: nbd_config.max_connections_per_address,
            negotiation_timeout: std::time::Duration::from_secs(
                nbd_config.negotiation_timeout_secs,
            ),
            memory: usize::try_from(nbd_config.memory.0).unwrap_or(usize::MAX),
            send_timeout: std::time::Duration::from_secs(nbd_config.send_timeout_secs),
        },
    );
    let socket_path = gateway.config.nbd_socket();
    let unix = NbdServer::bind_unix(&socket_path)
        .with_context(|| format!("[nbd] socket: cannot bind {}", socket_path.display()))?;
    let nbd_listen = gateway.config.nbd.listen.clone();
    let tcp = if nbd_listen.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&nbd_listen)
                .await
                .with_context(|| format!("[nbd] listen: cannot bind {nbd_listen}"))?,
        )
    };
    let nfs_listen = gateway.config.nfs.listen.clone();
    let nfs = if nfs_listen.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&nfs_listen)
                .await
                .with_context(|| format!("[nfs] listen: cannot bind {nfs_listen}"))?,
        )
    };
    let stop_requested = shutdown_signal()?;
    print_banner(&gateway, listen);
    if let Some(nfs) = nfs {
        let server = NfsServer::new(
            gateway.shares.clone(),
            nfs_admit(&gateway.config),
            gateway.nfs_metrics.clone(),
        );
        tokio::spawn(server.serve(nfs));
    }
    tokio::spawn(gateway.clone().watch_remote());
    tokio::spawn(gateway.clone().flush_refused_calls());
    tokio::spawn(gateway.clone().finish_volume_work());
    tokio::spawn(nbd.clone().serve_unix(unix));
    if let Some(tcp) = tcp {
        tokio::spawn(nbd.clone().serve_tcp(tcp));
    }
    let app = api::router(gateway.clone());
    let mut http_stopped = stopped.clone();
    let http = tokio::spawn(capped::serve(
        capped::Capped::new(listener, capped::MAX_CONNECTIONS),
        app,
        async move {
            let _ = http_stopped.changed().await;
        },
    ));
    stop_requested.await;
    let _ = stop.send(true);
    // A refresh, a delete or a takeover waiting on the bucket would hold up the HTTP drain
    // below.
    gateway.shares.begin_stop();
    gateway.volumes.begin_stop();
    // NBD clients get ESHUTDOWN for new requests and a moment to finish; HTTP drains.
    let drained = async {
        let _ = http.await;
        nbd.drained().await;
    };
    if tokio::time::timeout(STOP_GRACE, drained).await.is_err() {
        tracing::warn!("stopping with clients still connected after {STOP_GRACE:?}");
    }
    // What clients flushed goes to the bucket before the stop, so that a takeover elsewhere
    // finds it: stopping one gateway and taking its volumes over on another is how volumes
    // move. Not while uploads are paused, nor once nothing moves for a few seconds (the
    // bucket out of reach): then the log says what stays here.
    let limiter = gateway.remote.limiter.clone();
    let limit = if limiter.rate_now(remote::limit::Direction::Upload) == remote::limit::Rate::Paused
    {
        Duration::ZERO
    } else {
        STOP_UPLOAD
    };
    let volumes = gateway.volumes.clone();
    let moving = move || limiter.passed(remote::limit::Direction::Upload);
    let _ = tokio::task::spawn_blocking(move || volumes.drain_cached_volumes(limit, &moving)).await;
    // Writes still waiting for room in a cached volume's log (the bucket out of reach) fail
    // now: unacknowledged, so nothing is lost, and their threads end.
    gateway.volumes.stop_cached_volumes();
    let _ = std::fs::remove_file(&socket_path);
    // Shares stop taking changes and are marked stopped in order (no recovery at start).
    gateway.shares.close();
    // Transfers waiting for a paused or slow uplink give up: nothing holds the stop.
    gateway.remote.limiter.close();
    if !gateway.remote.limiter.settled(Duration::from_secs(2)).await {
        tracing::warn!("a transfer still waited for the bandwidth limit 2 s after the stop");
    }
    // The last second's refused calls.
    gateway.audit.flush_refused(true);
    println!("firn stopped");
    Ok(())
}

/// Who may use a share over NFS: its own allowlist, or `[nfs] allow` if it has none.
fn nfs_admit(config: &Config) -> Admit {
    let default: Vec<config::Cidr> = config
        .nfs
        .allow
        .iter()
        .filter_map(|block| config::Cidr::parse(block).ok())
        .collect();
    Arc::new(move |share: &ShareInfo, ip: std::net::IpAddr| {
        if share.allow.is_empty() {
            default.iter().any(|block| block.contains(ip))
        } else {
            share
                .allow
                .iter()
                .filter_map(|block| config::Cidr::parse(block).ok())
                .any(|block| block.contains(ip))
        }
    })
}

fn print_banner(gateway: &Gateway, listen: std::net::SocketAddr) {
    let health = gateway
        .health
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!(
        "firn {} ({})",
        env!("CARGO_PKG_VERSION"),
        gateway.gateway_id
    );
    println!("  data directory  {}", gateway.data_dir().display());
    println!(
        "  remote          {} ({})",
        gateway.config.remote_target(),
        if health.reachable {
            "reachable"
        } else {
            "UNREACHABLE: working offline"
        }
    );
    if gateway.dev_keys() {
        println!(
            "  keys            DEVELOPMENT MODE: the master key is stored in {}; anyone with this disk can read the data. Set [keys] source for production.",
            gateway.data_dir().join("dev-master-key").display()
        );
        tracing::warn!("development key mode: the master key is kept in the data directory");
    } else {
        println!(
            "  keys            master key from {:?}, not stored on this disk",
            gateway.config.keys
        );
    }
    println!(
        "  HTTP API        http://{listen}/api/v1/ (bearer token in {})",
        gateway.data_dir().join(TOKEN_FILE).display()
    );
    if !gateway.config.nbd.listen.is_empty() {
        println!(
            "  NBD             nbd://{}/<volume>",
            gateway.config.nbd.listen
        );
    }
    println!(
        "  NBD (unix)      nbd+unix:///<volume>?socket={}",
        gateway.config.nbd_socket().display()
    );
    match gateway.config.nbd_tls() {
        config::NbdTls::Off | config::NbdTls::Auto => {}
        config::NbdTls::X509 => println!(
            "  NBD TLS         x509 required (nbds:// URIs); plain connections are refused"
        ),
        config::NbdTls::Psk => println!(
            "  NBD TLS         PSK required (nbds://{}@.../<volume>?tls-psk-file={}); plain connections are refused",
            nbd::PSK_IDENTITY,
            gateway.config.nbd_psk_file().display()
        ),
    }
    println!("  metrics         http://{listen}/metrics");
    println!("  health          http://{listen}/healthz");
    println!("Press Ctrl-C to stop.");
}

/// Resolves at the first Ctrl-C or SIGTERM. Call it before announcing readiness: the
/// handlers are installed when it is called, not when it is first polled.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        println!("stopping");
    })
}
