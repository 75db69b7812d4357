//! File shares: a directory tree whose files are plain objects under a bucket prefix
//! (`<prefix><path>`), with POSIX metadata as object user metadata in the convention AWS's
//! file tools use. Decision 0008 has the design; in short:
//!
//! - [`namespace`]: inodes and directory entries in the metadata store; fileids are the
//!   file handles, stable across restarts.
//! - Content: one local file per file, `shares/<id>/files/<fileid>`, written in place. A
//!   file is marked dirty (durably) on its first change after an upload.
//! - `upload`: a dirty file is uploaded as one whole object once it has been quiet for the
//!   settle time, or at once after a commit; a write during the upload fails it, so no object
//!   is ever torn. Removed and renamed files' old objects are deleted after.
//!
//! - Eviction: clean files past `cache_max`, least recently used first. A read of an evicted
//!   file fetches only the blocks it needs (`blocks`); a write fetches it whole first.
//!
//! - `refresh`: what other tools put into or deleted from the prefix shows up or goes.
//!
//! - Directories: each has a marker object, `<prefix><path>/`, empty, with the directory's
//!   metadata, so empty ones persist in the bucket. The share's root has none.

mod blocks;
pub mod namespace;
mod refresh;
mod upload;

pub use refresh::Refreshed;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use self::namespace::{Inode, Kind, Namespace, NewAttrs};
use crate::local::meta::{MetaError, MetaStore};
use crate::remote::Remote;

const TABLE: &str = "shares";
/// Open content files kept per share.
const OPEN_FILES: usize = 256;
/// Evicted files fetched back whole at once, per share.
const WHOLE_FETCHES: usize = 4;

/// A file's turn to be fetched whole (`Share::fetch_turn`), until dropped.
struct FetchTurn<'a> {
    share: &'a Share,
    id: u64,
}

impl Drop for FetchTurn<'_> {
    fn drop(&mut self) {
        lock(&self.share.fetching).remove(&self.id);
        self.share.fetched.notify_all();
    }
}

/// How many times a read or write fetches an evicted file that is evicted again before it
/// is opened, before the client is told to try later.
const FETCH_TRIES: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
    #[error("no such file or directory")]
    NotFound,
    #[error("the file handle names fileid {0}, which no longer exists")]
    Stale(u64),
    #[error("the name is taken")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("the directory is not empty")]
    NotEmpty,
    #[error("the name or path is too long ({0} bytes)")]
    NameTooLong(usize),
    #[error("{0}")]
    Invalid(String),
    /// Past the largest file a share holds (`Settings::max_file`; `MAX_FILE`, S3's largest
    /// object, at most).
    #[error("a file ends at {0} bytes at most")]
    TooBig(u64),
    #[error("the share is read-only")]
    ReadOnly,
    /// Local space is short: try again once uploads and eviction have made room (NFS's
    /// JUKEBOX, which clients retry).
    #[error("local space is full until uploads make room")]
    NoSpace,
    /// The daemon is stopping: what needed the bucket was dropped (NFS's JUKEBOX: the client
    /// tries again, after the restart).
    #[error("the share is stopping")]
    Stopping,
    #[error("no share named {0:?}")]
    NoShare(String),
    #[error("a share named {0:?} exists")]
    ShareExists(String),
    #[error("{0}")]
    Io(String),
    /// The object an evicted file's content was to come from is gone from the bucket, or
    /// another tool changed it: what the share has of the file cannot be had. A refresh
    /// takes in what the bucket holds.
    #[error("{0}")]
    Changed(String),
}

impl From<MetaError> for ShareError {
    /// A full disk is `NoSpace` here too: the client tries again once there is room.
    fn from(e: MetaError) -> ShareError {
        if e.is_no_space() {
            ShareError::NoSpace
        } else {
            ShareError::Io(e.to_string())
        }
    }
}

fn io_error(what: &str, e: std::io::Error) -> ShareError {
    ShareError::Io(format!("{what}: {e}"))
}

/// A failed write to local disk: a full disk is `NoSpace` (the client tries again once
/// uploads and eviction made room), anything else an I/O error.
fn write_error(what: &str, e: std::io::Error) -> ShareError {
    if e.raw_os_error() == Some(nix::libc::ENOSPC) {
        ShareError::NoSpace
    } else {
        io_error(what, e)
    }
}

/// What who squashes to the anonymous user (NFS `root_squash`, `all_squash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Squash {
    #[default]
    Root,
    All,
    None,
}

/// A share as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInfo {
    /// Random, never reused: names the share's tables and local directory.
    pub id: String,
    pub name: String,
    /// Where the share's objects go: `<prefix><path>`; empty or ending in `/`.
    pub prefix: String,
    /// The bucket, when not the gateway's own (`[remote] bucket`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    pub read_only: bool,
    /// Client address blocks admitted (CIDR); empty admits every client.
    pub allow: Vec<String>,
    pub squash: Squash,
    pub created: String,
}

/// How shares behave; `[shares]` in the config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a file must be quiet before it is uploaded.
    pub settle: Duration,
    /// Local bytes of clean files (in the bucket as they are here) a share keeps; beyond it
    /// the least recently used are evicted, and fetched again when next used. Dirty files are
    /// never evicted and do not count.
    pub cache_max: u64,
    /// How often the share is refreshed from the bucket by itself; `None`: only on demand.
    pub refresh: Option<Duration>,
    /// A directory a client lists is refreshed first (that level only) when its listing is
    /// older than this; `None`: never (only the periodic and on-demand refreshes).
    pub listing_ttl: Option<Duration>,
    /// How long a read of data only the bucket holds waits for each answer from it (its own
    /// request, or a block another read is fetching) before it fails with an I/O error, so
    /// that an outage costs a client an error, not a hung request.
    pub read_timeout: Duration,
    /// What objects without the file-tool metadata (put by other tools) look like: file and
    /// directory modes, owner and group.
    pub defaults: Defaults,
    /// The gateway bucket's own key prefix (`[remote] prefix` and its `/`, or empty), which
    /// every key of a share in that bucket has (not of one in a bucket of its own): a
    /// file's key, share prefix included, must leave room for it, and upload records name
    /// whole keys.
    pub bucket_prefix: String,
    /// The largest file a client may make (`MAX_FILE` at most): a write or a size past it
    /// is refused (NFS3ERR_FBIG). Every file goes up whole, holes as zeroes, so one write at
    /// a far offset would otherwise cost an upload of that size.
    pub max_file: u64,
}

/// See `Settings::defaults`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub file_mode: u32,
    pub dir_mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults {
            // AWS's file gateway's defaults, so a bucket reads the same through either, and
            // files other tools put are usable by every client until someone chmods them.
            file_mode: 0o666,
            dir_mode: 0o777,
            uid: 65534,
            gid: 65534,
        }
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            settle: Duration::from_secs(5),
            cache_max: 10 << 30,
            refresh: Some(Duration::from_secs(300)),
            listing_ttl: None,
            read_timeout: Duration::from_secs(20),
            defaults: Defaults::default(),
            bucket_prefix: String::new(),
            max_file: MAX_FILE,
        }
    }
}

/// Checks a share's name: it names an NFS export (`/<name>`) and a directory.
pub fn check_share_name(name: &str) -> Result<(), ShareError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(ShareError::Invalid(format!(
            "share name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        )))
    }
}

/// Checks a share's prefix: empty (the whole bucket) or `a/b/`, and a valid key start.
/// S3's rules for a bucket name: 3 to 63 lower-case letters, digits, `.` and `-`, starting
/// and ending with a letter or digit.
pub fn check_bucket_name(bucket: &str) -> Result<(), ShareError> {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edge(bucket.chars().next())
        && edge(bucket.chars().last());
    if ok {
        Ok(())
    } else {
        Err(ShareError::Invalid(format!(
            "{bucket:?} is not a bucket name: 3 to 63 lower-case letters, digits, '.' and '-'"
        )))
    }
}

/// A share's prefix: empty or names ending in '/'. In the gateway's own bucket, never where
/// the gateway keeps its own objects (`remote::GATEWAY_NAMES`), nor over all of them.
pub fn check_prefix(prefix: &str, own_bucket: bool) -> Result<(), ShareError> {
    let bad = |reason: &str| Err(ShareError::Invalid(format!("prefix {prefix:?}: {reason}")));
    if own_bucket {
        // The gateway's own objects are at the top of its bucket.
        let first = prefix.split('/').next().unwrap_or_default();
        if prefix.is_empty() {
            return bad(&format!(
                "the whole of the gateway's bucket, where it keeps its own objects ({}/): give the share a prefix of its own, such as media/, or another bucket",
                crate::remote::GATEWAY_NAMES.join("/, ")
            ));
        }
        if crate::remote::GATEWAY_NAMES.contains(&first) {
            return bad(&format!(
                "{first}/ is where the gateway keeps its own objects: choose another prefix (--prefix)"
            ));
        }
    }
    if prefix.is_empty() {
        return Ok(());
    }
    let Some(dirs) = prefix.strip_suffix('/') else {
        return bad("must end with '/'");
    };
    if prefix.len() > namespace::MAX_KEY / 2 {
        return bad("too long");
    }
    for part in dirs.split('/') {
        if let Err(e) = namespace::check_name(part) {
            return bad(&e.to_string());
        }
    }
    Ok(())
}

/// Opens the remote for a bucket other than the gateway's own, for shares created with one.
pub trait Buckets: Send + Sync + std::fmt::Debug {
    /// The remote stack for `bucket` (one per bucket, shared by its shares). Fails with a
    /// message for the user when the gateway's remote cannot reach other buckets.
    fn open(&self, bucket: &str) -> Result<Arc<dyn Remote>, String>;

    /// Where the gateway keeps its own objects in `bucket` (its `[remote] prefix`, ending
    /// in '/' unless empty), if `bucket` is the gateway's own.
    fn gateway_prefix(&self, _bucket: &str) -> Option<String> {
        None
    }
}

/// The shares of this gateway.
#[derive(Debug)]
pub struct Shares {
    meta: Arc<MetaStore>,
    dir: PathBuf,
    remote: Arc<dyn Remote>,
    buckets: Option<Arc<dyn Buckets>>,
    runtime: tokio::runtime::Handle,
    /// Where the shares' upload tasks run: a runtime of its own in the daemon, whose threads
    /// yield the CPU to clients' requests (`[remote] upload_nice`).
    uploads: tokio::runtime::Handle,
    settings: Settings,
    open: Mutex<HashMap<String, Arc<Share>>>,
    space: Option<Arc<crate::local::space::SpaceBudget>>,
}

impl Shares {
    /// The shares in `meta`, with their local files under `dir`, uploading to `remote` on
    /// `runtime`. Every share opens now, so uploads left from before a restart resume. With
    /// `space`, writes take local bytes only as it allows; beyond it they wait (`NoSpace`).
    pub fn open(
        meta: Arc<MetaStore>,
        dir: impl Into<PathBuf>,
        remote: Arc<dyn Remote>,
        runtime: tokio::runtime::Handle,
        settings: Settings,
        space: Option<Arc<crate::local::space::SpaceBudget>>,
    ) -> Result<Shares, ShareError> {
        let uploads = runtime.clone();
        Shares::open_with_buckets(meta, dir, remote, None, runtime, uploads, settings, space)
    }

    /// `open`, with `buckets` for shares in other buckets than `remote`'s (without, creating
    /// one is refused, and one in the catalog fails to open), and the uploads on `uploads`.
    #[allow(clippy::too_many_arguments)]
    pub fn open_with_buckets(
        meta: Arc<MetaStore>,
        dir: impl Into<PathBuf>,
        remote: Arc<dyn Remote>,
        buckets: Option<Arc<dyn Buckets>>,
        runtime: tokio::runtime::Handle,
        uploads: tokio::runtime::Handle,
        settings: Settings,
        space: Option<Arc<crate::local::space::SpaceBudget>>,
    ) -> Result<Shares, ShareError> {
        let shares = Shares {
            meta,
            dir: dir.into(),
            remote,
            buckets,
            runtime,
            uploads,
            settings,
            open: Mutex::new(HashMap::new()),
            space,
        };
        for info in shares.list()? {
            let name = info.name.clone();
            match shares.start(info) {
                Ok(()) => {}
                // Its bucket cannot be reached with this configuration: the other shares
                // still open, and this one is listed (and deletable) but not served.
                Err(ShareError::Invalid(message)) => {
                    tracing::error!(share = %name, "not served: {message}")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(shares)
    }

    pub fn list(&self) -> Result<Vec<ShareInfo>, ShareError> {
        let mut shares = Vec::new();
        for (name, bytes) in self.meta.list(TABLE, "")? {
            let info = serde_json::from_slice(&bytes)
                .map_err(|e| ShareError::Io(format!("share {name:?} in the catalog: {e}")))?;
            shares.push(info);
        }
        Ok(shares)
    }

    pub fn get(&self, name: &str) -> Result<Option<ShareInfo>, ShareError> {
        Ok(self.meta.get_json(TABLE, name)?)
    }

    /// The running share `name`.
    pub fn share(&self, name: &str) -> Result<Arc<Share>, ShareError> {
        lock(&self.open)
            .get(name)
            .cloned()
            .ok_or_else(|| ShareError::NoShare(name.to_string()))
    }

    /// The running share whose id is `id`.
    pub fn share_by_id(&self, id: &str) -> Option<Arc<Share>> {
        lock(&self.open)
            .values()
            .find(|share| share.info.id == id)
            .cloned()
    }

    /// Makes a share. Its objects go under `prefix`; what is there already stays.
    pub fn create(
        &self,
        name: &str,
        prefix: &str,
        read_only: bool,
        allow: Vec<String>,
        squash: Squash,
    ) -> Result<ShareInfo, ShareError> {
        self.create_in(name, None, prefix, read_only, allow, squash)
    }

    /// `create`, in `bucket` rather than the gateway's own. The bucket must answer a listing
    /// unless it is unreachable (the gateway works offline): a missing bucket or refused
    /// credentials are an error now, not a share whose uploads fail forever.
    pub fn create_in(
        &self,
        name: &str,
        bucket: Option<&str>,
        prefix: &str,
        read_only: bool,
        allow: Vec<String>,
        squash: Squash,
    ) -> Result<ShareInfo, ShareError> {
        check_share_name(name)?;
        check_prefix(prefix, bucket.is_none())?;
        if let Some(bucket) = bucket {
            check_bucket_name(bucket)?;
            // The gateway's own bucket named as another: its objects are under its prefix.
            if let Some(own) = self.buckets.as_ref().and_then(|b| b.gateway_prefix(bucket)) {
                if own.starts_with(prefix) {
                    return Err(ShareError::Invalid(format!(
                        "prefix {prefix:?} of bucket {bucket:?} holds the gateway's own objects (under {own:?}): choose a prefix beside them"
                    )));
                }
                if let Some(below) = prefix.strip_prefix(own.as_str()) {
                    check_prefix(below, true)?;
                }
            }
            let remote = self.bucket_remote(bucket)?;
            let listing = self.runtime.block_on(remote.list_dir(prefix));
            if let Err(
                e @ (crate::remote::Error::Permanent { .. } | crate::remote::Error::BadKey { .. }),
            ) = listing
            {
                return Err(ShareError::Invalid(format!("bucket {bucket:?}: {e}")));
            }
        }
        let info = ShareInfo {
            id: format!("{:032x}", rand::random::<u128>()),
            name: name.to_string(),
            prefix: prefix.to_string(),
            bucket: bucket.map(str::to_string),
            read_only,
            allow,
            squash,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        self.meta.transaction(|tx| {
            if tx.get(TABLE, name)?.is_some() {
                return Err(ShareError::ShareExists(name.to_string()));
            }
            // Two shares over one object would each take it for its own (upload over,
            // delete, evict it) without knowing of the other. Compared where the objects
            // are: the gateway's own bucket, named or not, and whole keys in it.
            let (bucket, keys) = self.key_space(&info);
            for (_, bytes) in tx.list(TABLE, "")? {
                let Ok(other) = serde_json::from_slice::<ShareInfo>(&bytes) else {
                    continue;
                };
                let (other_bucket, other_keys) = self.key_space(&other);
                if other_bucket == bucket
                    && (other_keys.starts_with(&keys) || keys.starts_with(&other_keys))
                {
                    return Err(ShareError::Invalid(format!(
                        "prefix {prefix:?} overlaps share {:?}'s ({:?}) in the same bucket: two shares never hold the same objects",
                        other.name, other.prefix
                    )));
                }
            }
            tx.put_json(TABLE, name, &info)?;
            Ok(())
        })?;
        if let Err(e) = self.start(info.clone()) {
            let _ = self.meta.delete(TABLE, name);
            return Err(e);
        }
        Ok(info)
    }

    /// Where a share's objects are: their bucket (`None`: the gateway's own, whether the
    /// share names it or not) and the prefix of their whole keys in it.
    fn key_space(&self, info: &ShareInfo) -> (Option<String>, String) {
        match info.bucket.as_deref() {
            None => (
                None,
                format!("{}{}", self.settings.bucket_prefix, info.prefix),
            ),
            Some(bucket) => match self.buckets.as_ref().and_then(|b| b.gateway_prefix(bucket)) {
                Some(_) => (None, info.prefix.clone()),
                None => (Some(bucket.to_string()), info.prefix.clone()),
            },
        }
    }

    /// Removes the share from this gateway: its namespace and local files. Its objects in
    /// the bucket stay; files not yet uploaded are lost, so the caller asks first. Waits for
    /// the share's uploader to end: not to be called on an async worker thread.
    pub fn delete(&self, name: &str) -> Result<ShareInfo, ShareError> {
        let info = self
            .get(name)?
            .ok_or_else(|| ShareError::NoShare(name.to_string()))?;
        self.meta.delete(TABLE, name)?;
        let share = lock(&self.open).remove(name);
        if let Some(share) = share {
            share.stop();
            // An upload under way is cut short: nothing of a deleted share reaches the
            // bucket after its delete.
            let uploader = lock(&share.uploader).take();
            if let Some(uploader) = uploader {
                uploader.abort();
                let _ = self.uploads.block_on(uploader);
            }
        }
        let dir = self.dir.join(&info.id);
        let ns = Namespace::open(self.meta.clone(), &info.id, root_attrs())?;
        ns.destroy()?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&format!("removing {}", dir.display()), e)),
        }
        Ok(info)
    }

    fn bucket_remote(&self, bucket: &str) -> Result<Arc<dyn Remote>, ShareError> {
        let buckets = self.buckets.as_ref().ok_or_else(|| {
            ShareError::Invalid("shares in other buckets need [remote] kind = \"s3\"".into())
        })?;
        buckets
            .open(bucket)
            .map_err(|e| ShareError::Invalid(format!("bucket {bucket:?}: {e}")))
    }

    fn start(&self, info: ShareInfo) -> Result<(), ShareError> {
        let remote = match &info.bucket {
            Some(bucket) => self.bucket_remote(bucket)?,
            None => self.remote.clone(),
        };
        let files = self.dir.join(&info.id).join("files");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&files)
            .map_err(|e| io_error(&format!("creating {}", files.display()), e))?;
        blocks::clean_leftovers(&files)
            .map_err(|e| io_error(&format!("cleaning {}", files.display()), e))?;
        let ns = Namespace::open(self.meta.clone(), &info.id, root_attrs())?;
        if !ns.take_clean()? {
            let recovered = ns.recover(&files)?;
            if recovered != Default::default() {
                tracing::info!(
                    share = %info.name,
                    "after a crash: {} file(s) whose creation was lost entered again, {} content file(s) of removed files deleted",
                    recovered.entered,
                    recovered.removed
                );
            }
        }
        let share = Arc::new(Share {
            info: info.clone(),
            ns,
            files,
            remote,
            settings: self.settings.clone(),
            dirty: Mutex::new(HashMap::new()),
            files_open: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            stopped: AtomicBool::new(false),
            gate: Default::default(),
            uploaded_files: AtomicU64::new(0),
            uploading_files: AtomicU64::new(0),
            uploaded_bytes: AtomicU64::new(0),
            clean_bytes: AtomicU64::new(0),
            clean_files: AtomicU64::new(0),
            last_refresh: Mutex::new(None),
            refresh_progress: Mutex::new(None),
            refreshing: Mutex::new(()),
            first_upload: (chrono::Utc::now().timestamp_micros().max(1)) as u64,
            counted: Mutex::new(None),
            evict_at: Mutex::new((0, 0)),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            downloaded_bytes: Arc::new(AtomicU64::new(0)),
            last_error: Mutex::new(None),
            recent: Mutex::new(std::collections::VecDeque::new()),
            uploader: Mutex::new(None),
            changing: std::sync::RwLock::new(()),
            seen_reopens: AtomicU64::new(self.meta.reopens()),
            listed: Mutex::new(HashMap::new()),
            newest_upload: tokio::sync::watch::Sender::new(0),
            used: Mutex::new(HashMap::new()),
            fetching: Mutex::new(Default::default()),
            fetched: std::sync::Condvar::new(),
            partials: Mutex::new(HashMap::new()),
            readahead: Arc::new(tokio::sync::Semaphore::new(blocks::READAHEAD_RUNS)),
            runtime: self.runtime.clone(),
            space: self.space.clone(),
        });
        // What was dirty before a restart goes up without waiting to settle.
        let long_ago = Instant::now()
            .checked_sub(self.settings.settle)
            .unwrap_or_else(Instant::now);
        for id in share.ns.dirty()? {
            let bytes = match std::fs::metadata(share.content_path(id)) {
                Ok(m) => m.len(),
                Err(_) => share.ns.get(id).map_or(0, |inode| inode.size),
            };
            lock(&share.dirty).insert(id, Dirty::found(bytes, long_ago));
        }
        *lock(&share.uploader) = Some(self.uploads.spawn(upload::run(share.clone())));
        lock(&self.open).insert(info.name.clone(), share);
        Ok(())
    }
}

impl Shares {
    /// The first step of a stop: calls to the bucket that blocking threads wait on (a
    /// refresh, a read of an evicted file) end now, with `ShareError::Stopping`, so that
    /// neither an API request nor a client holds the stop up.
    pub fn begin_stop(&self) {
        for share in lock(&self.open).values() {
            share.gate.begin_stop();
        }
    }

    /// Stops every share: changes are refused from now on (NFS3ERR_JUKEBOX, which clients
    /// retry), those under way finish, and each share is marked stopped in order, so the
    /// next start skips `Namespace::recover`. Done again on drop; the second time is a no-op.
    pub fn close(&self) {
        for share in lock(&self.open).values() {
            share.stop();
            // Calls to the bucket from blocking threads (a refresh, a client's read) end at
            // the stop: none may outlive the runtime they run on.
            share.gate.stop_and_wait();
            if self.meta.reopens() > 0 {
                // Lazy commits were lost as in a crash: the next start recovers the share.
                tracing::warn!(share = %share.info.name, "the metadata store was opened again after an I/O error: the share is checked at the next start");
                continue;
            }
            if let Err(e) = share.ns.mark_clean() {
                tracing::warn!(share = %share.info.name, "marking the share stopped: {e}");
            }
        }
    }
}

impl Drop for Shares {
    fn drop(&mut self) {
        self.close();
    }
}

/// A share's root: open to every user, as file gateways make it (modes below it decide).
fn root_attrs() -> NewAttrs {
    new_attrs(0o777, 0, 0)
}

fn new_attrs(mode: u32, uid: u32, gid: u32) -> NewAttrs {
    NewAttrs {
        mode,
        uid,
        gid,
        now_ns: now_ns(),
        atime_ns: None,
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Keeps `file` in `open` (the share's open content files, at most `OPEN_FILES`).
fn keep_open(open: &mut HashMap<u64, Arc<File>>, id: u64, file: File) -> Arc<File> {
    let file = Arc::new(file);
    if open.len() >= OPEN_FILES {
        open.clear();
    }
    open.insert(id, file.clone());
    file
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often the eviction pass counts the clean files even when its count says the cache
/// is under `cache_max`, which corrects what a race may have left it short of.
const RECOUNT_EVERY: Duration = Duration::from_secs(60);

/// A file changed since its last upload.
#[derive(Debug, Clone, Copy)]
struct Dirty {
    /// Counts changes: an upload that began at one generation and ends at another read a
    /// file that changed under it.
    generation: u64,
    /// Changes under way; an upload starts only when there are none.
    writing: u32,
    last_change: Instant,
    /// Upload without waiting to settle (a COMMIT asked).
    now: bool,
    /// The file's size as of its last change: what its upload will send (status counts
    /// these rather than asking the file system about every dirty file).
    bytes: u64,
}

impl Dirty {
    /// A file found dirty on disk (at a start, or after the metadata store was reopened),
    /// `bytes` long, last changed `since`: no change under way, none seen by an upload.
    fn found(bytes: u64, since: Instant) -> Dirty {
        Dirty {
            generation: 1,
            writing: 0,
            last_change: since,
            now: false,
            bytes,
        }
    }
}

/// What a change did to a file's size (`Share::end_change`).
#[derive(Debug, Clone, Copy)]
enum Resized {
    Same,
    /// A write that ended here: the file is at least this long now.
    AtLeast(u64),
    /// Truncated or extended to exactly this.
    To(u64),
}

/// What a file, directory or symlink looks like to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attrs {
    pub fileid: u64,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Bytes the file takes on local disk.
    pub used: u64,
    pub mtime_ns: u64,
    pub atime_ns: u64,
    pub ctime_ns: u64,
}

/// Attribute changes (NFS SETATTR); `None` leaves one as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime_ns: Option<u64>,
    pub mtime_ns: Option<u64>,
}

/// A file that reached the bucket (`Share::uploads`).
#[derive(Debug, Clone, Serialize)]
pub struct UploadRecord {
    /// Orders the share's uploads, and grows across restarts (each run starts its count at
    /// the microseconds since the epoch): ask for those after one.
    pub seq: u64,
    /// The share-relative path.
    pub path: String,
    /// The object's whole key in its bucket (`[remote] prefix` included).
    pub key: String,
    /// The bucket, for a share in a bucket of its own; absent for the gateway's bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    pub size: u64,
    /// When the object was stored (RFC 3339).
    pub at: String,
}

/// Uploads remembered per share for `Share::uploads`.
const RECENT_UPLOADS: usize = 10_000;

/// What `firn share show` says of a running share.
#[derive(Debug, Clone, Serialize)]
pub struct ShareStatus {
    /// Files changed here and not yet in the bucket.
    pub dirty_files: u64,
    /// Their bytes on local disk.
    pub dirty_bytes: u64,
    /// Objects of removed or moved files still to delete from the bucket.
    pub pending_deletes: u64,
    /// Uploads under way, until recorded: an upload of a file removed meanwhile is one (its
    /// object is deleted once it lands). The share and its bucket agree when this,
    /// `dirty_files` and `pending_deletes` are all 0.
    #[serde(default)]
    pub uploading_files: u64,
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
    /// Local bytes of the share's files (and of blocks fetched for reads): the dirty ones
    /// now, the clean ones as counted at the last eviction check (every 2 s) plus what was
    /// uploaded since.
    pub cached_bytes: u64,
    /// Reads answered from local disk, and reads that had to fetch from the bucket first,
    /// since the daemon started.
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Bytes fetched from the bucket for reads and writes of evicted or new-found files.
    pub downloaded_bytes: u64,
    /// Files whose content is on local disk: the dirty ones now, the clean ones counted as
    /// `cached_bytes` is.
    pub cached_files: u64,
    /// When the last refresh from the bucket (periodic or asked for) completed (RFC 3339);
    /// absent if none has in this run.
    pub last_refresh: Option<String>,
    /// The refresh under way, if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refreshing: Option<RefreshProgress>,
    pub last_error: Option<String>,
}

/// How far a refresh under way has come.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshProgress {
    /// When it began (RFC 3339).
    pub since: String,
    /// The directory it refreshes (share-relative; empty for the whole share).
    pub under: String,
    /// Directories refreshed so far, and files taken in, updated and dropped so far.
    pub directories: u64,
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
}

/// One running share.
#[derive(Debug)]
pub struct Share {
    info: ShareInfo,
    ns: Namespace,
    files: PathBuf,
    remote: Arc<dyn Remote>,
    settings: Settings,
    dirty: Mutex<HashMap<u64, Dirty>>,
    files_open: Mutex<HashMap<u64, Arc<File>>>,
    /// Wakes the uploader: a commit, a remove, a stop.
    wake: tokio::sync::Notify,
    stopped: AtomicBool,
    /// Calls to the bucket from blocking threads (`bucket`): the stop ends them before it
    /// waits for the changes under way, and `Shares::close` waits for them.
    gate: crate::remote::gate::StopGate,
    uploaded_files: AtomicU64,
    /// Uploads under way or queued, not yet recorded (`ShareStatus::uploading_files`).
    uploading_files: AtomicU64,
    uploaded_bytes: AtomicU64,
    /// Local bytes of clean files (and part files), as the last eviction pass counted them,
    /// plus what uploads and fetches added since: never less than the truth but for a race
    /// with a pass, since a file that turns dirty stays counted until the next pass.
    clean_bytes: AtomicU64,
    /// Clean files on local disk, counted as `clean_bytes` is.
    clean_files: AtomicU64,
    /// When the last refresh completed.
    last_refresh: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// The refresh under way (`ShareStatus::refreshing`).
    refresh_progress: Mutex<Option<RefreshProgress>>,
    /// Held by a whole refresh: one at a time.
    refreshing: Mutex<()>,
    /// The sequence number of this run's first upload (`UploadRecord::seq`).
    first_upload: u64,
    /// When an eviction pass last counted the clean files (listing every local file).
    counted: Mutex<Option<Instant>>,
    /// The file whose fetches run an eviction pass first only above these local bytes of
    /// clean files (and `cache_max`); fetches for other files, above `cache_max`
    /// (`room_to_fetch`).
    evict_at: Mutex<(u64, u64)>,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    downloaded_bytes: Arc<AtomicU64>,
    last_error: Mutex<Option<String>>,
    /// Held (shared) by each change (`check_writable`), so that `stop` can wait for those
    /// under way: a creation is lazily committed, and must be done before the share is marked
    /// stopped in order; and a deleted share's tables must get no rows after they are gone.
    changing: std::sync::RwLock<()>,
    /// The metadata store's reopens this share has caught up with (`after_reopen`).
    seen_reopens: AtomicU64,
    /// When each directory was last refreshed for a client's listing (`listing_ttl`).
    listed: Mutex<HashMap<u64, Instant>>,
    /// The task that uploads the share's files.
    uploader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The newest uploads, oldest first, at most `RECENT_UPLOADS`.
    recent: Mutex<std::collections::VecDeque<UploadRecord>>,
    /// The sequence number of the newest upload, for those who wait for the next.
    newest_upload: tokio::sync::watch::Sender<u64>,
    /// When each file's content was last used, for eviction.
    used: Mutex<HashMap<u64, Instant>>,
    /// Evicted files being fetched back whole (`WHOLE_FETCHES` at most at once), and the
    /// signal that one ended.
    fetching: Mutex<std::collections::HashSet<u64>>,
    fetched: std::sync::Condvar,
    /// Evicted files being read back a block at a time.
    partials: Mutex<HashMap<u64, Arc<blocks::Partial>>>,
    /// Permits for runs read ahead (`blocks::READAHEAD_RUNS`).
    readahead: Arc<tokio::sync::Semaphore>,
    runtime: tokio::runtime::Handle,
    space: Option<Arc<crate::local::space::SpaceBudget>>,
}

impl Share {
    /// The uploads after sequence number `after` that are still remembered (the newest
    /// `RECENT_UPLOADS` of this run), oldest first, at most `limit`.
    pub fn uploads(&self, after: u64, limit: usize) -> Vec<UploadRecord> {
        lock(&self.recent)
            .iter()
            .filter(|r| r.seq > after)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Whether a reader that asks for the uploads after `after` has missed some that are no
    /// longer remembered: the oldest one still remembered, if so. From 0, what this run
    /// forgot counts; from a sequence number, what came after it (in this run or an
    /// earlier one).
    pub fn missed_uploads(&self, after: u64) -> Option<u64> {
        let oldest = lock(&self.recent).front().map(|r| r.seq)?;
        let first = if after == 0 {
            self.first_upload
        } else {
            after + 1
        };
        (oldest > first).then_some(oldest)
    }

    /// Sees the newest upload's sequence number change; closed when the share goes.
    pub fn watch_uploads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.newest_upload.subscribe()
    }

    fn remember_upload(&self, path: &str, size: u64) {
        let mut recent = lock(&self.recent);
        let seq = recent.back().map_or(self.first_upload, |r| r.seq + 1);
        if recent.len() >= RECENT_UPLOADS {
            recent.pop_front();
        }
        recent.push_back(UploadRecord {
            seq,
            path: path.to_string(),
            key: format!("{}{path}", self.key_prefix()),
            bucket: self.info.bucket.clone(),
            size,
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        drop(recent);
        self.newest_upload.send_replace(seq);
    }

    pub fn info(&self) -> &ShareInfo {
        &self.info
    }

    /// Stops the uploader and refuses changes from now on; waits for changes under way.
    fn stop(&self) {
        self.gate.begin_stop();
        let _no_change = self
            .changing
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether the share takes changes now; held while one runs (`stop` waits for it).
    /// Catches up with a reopen of the metadata store in this run (an I/O error, a full
    /// disk, made it recover to its last durable commit): the lazy commits since were lost
    /// as in a crash, among them entries of files just created, which clients were answered
    /// for. Before any client call goes on, those files are entered again from their content
    /// (`Namespace::recover`, as at a start after a crash), and what the store has as dirty
    /// (uploads whose records were lost) goes up again. One atomic load when nothing was
    /// reopened; not to be called with `changing` held. An error (the disk still full) is
    /// for the call to give its client, which tries again: nothing is answered from a store
    /// that has not caught up.
    pub fn after_reopen(&self) -> Result<(), ShareError> {
        let reopens = self.ns.reopens();
        if self.seen_reopens.load(Ordering::Acquire) == reopens {
            return Ok(());
        }
        // Alone: no creation between its lazy commit and its content file.
        let _alone = self
            .changing
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if self.seen_reopens.load(Ordering::Acquire) == reopens {
            return Ok(());
        }
        let caught_up = self
            .ns
            .recover(&self.files)
            .and_then(|recovered| Ok((recovered, self.ns.dirty()?)));
        match caught_up {
            Ok((recovered, dirty)) => {
                tracing::warn!(
                    share = %self.info.name,
                    "the metadata store was opened again after an I/O error: {} file(s) whose creation it lost entered again, {} content file(s) of removed files deleted",
                    recovered.entered,
                    recovered.removed
                );
                let mut known = lock(&self.dirty);
                for id in dirty {
                    known.entry(id).or_insert_with(|| {
                        let bytes = std::fs::metadata(self.content_path(id)).map_or(0, |m| m.len());
                        Dirty::found(bytes, Instant::now())
                    });
                }
                drop(known);
                self.wake.notify_one();
                self.seen_reopens.store(reopens, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(share = %self.info.name, "catching up with the metadata store opened again: {e}");
                Err(e)
            }
        }
    }

    fn check_writable(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, ShareError> {
        if self.info.read_only {
            return Err(ShareError::ReadOnly);
        }
        let changing = self.changing.read().unwrap_or_else(PoisonError::into_inner);
        if self.stopped.load(Ordering::Acquire) {
            // Stopping: the client tries again (after the restart).
            Err(ShareError::NoSpace)
        } else {
            Ok(changing)
        }
    }

    fn content_path(&self, id: u64) -> PathBuf {
        self.files.join(format!("{id:016x}"))
    }

    /// The content file of `id` if it is on local disk (not evicted, not new and unwritten).
    fn cached(&self, id: u64) -> Result<Option<Arc<File>>, ShareError> {
        lock(&self.used).insert(id, Instant::now());
        // Opened under the lock eviction holds to unlink: never an evicted file kept open.
        let mut open = lock(&self.files_open);
        if let Some(file) = open.get(&id) {
            return Ok(Some(file.clone()));
        }
        match OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.content_path(id))
        {
            Ok(file) => Ok(Some(keep_open(&mut open, id, file))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("opening a file's local content", e)),
        }
    }

    /// The content file of `id`, fetched whole if evicted, created empty if missing (a crash
    /// before a new file's content reached the disk leaves an inode whose content is empty).
    /// Opened under the lock eviction holds to unlink, as `cached` does: a file evicted
    /// between its fetch and its opening is fetched again, never opened unlinked (writes
    /// into it would be lost) nor made anew empty.
    fn content(&self, id: u64) -> Result<Arc<File>, ShareError> {
        for _ in 0..FETCH_TRIES {
            if let Some(file) = self.cached(id)? {
                return Ok(file);
            }
            if self.ns.get(id)?.uploaded.is_none() {
                // Never uploaded, so never evicted: a new file, or one whose content a
                // crash took before it reached the disk.
                return self.open_content(id, false);
            }
            // Evicted: its object holds it.
            self.fetch(id)?;
        }
        // Evicted again as fast as it comes back: the cache is too small for what is in use
        // (`NFS3ERR_JUKEBOX`; the client tries again).
        Err(ShareError::NoSpace)
    }

    /// Opens (making it if missing, emptying it with `empty`) the content file of `id` under
    /// the lock eviction holds to unlink, and keeps it open.
    fn open_content(&self, id: u64, empty: bool) -> Result<Arc<File>, ShareError> {
        let mut open = lock(&self.files_open);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(empty)
            .mode(0o600)
            .open(self.content_path(id))
            .map_err(|e| io_error("opening a file's local content", e))?;
        Ok(keep_open(&mut open, id, file))
    }

    /// The content file of `id`, emptied, made empty if it was evicted (no fetch). The file
    /// must be marked changing (`begin_change`): eviction then leaves it alone.
    fn emptied_content(&self, id: u64) -> Result<Arc<File>, ShareError> {
        lock(&self.used).insert(id, Instant::now());
        let file = self.open_content(id, true)?;
        // Blocks fetched of its old object are not its content any more.
        self.drop_partial(id);
        Ok(file)
    }

    /// The content file of `id`, a file just created: made at once, rather than looked for
    /// first as `content` does (two opens that fail and a namespace read, for each new file).
    fn new_content(&self, id: u64) -> Result<Arc<File>, ShareError> {
        lock(&self.used).insert(id, Instant::now());
        let mut open = lock(&self.files_open);
        let made = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.content_path(id));
        match made {
            Ok(file) => Ok(keep_open(&mut open, id, file)),
            // Another request for the new file got there first, through its name once the
            // creation committed (a WRITE with a handle from a listing): its bytes are the
            // file's. Fileids are never reused, so it is no leftover of an earlier file.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                drop(open);
                self.content(id)
            }
            Err(e) => Err(io_error("creating a file's local content", e)),
        }
    }

    /// Whether `bytes` more of local space may be taken; if not, clean files are evicted to
    /// make room, and if that is not enough, `NoSpace`: the write waits for uploads.
    fn make_room(&self, bytes: u64) -> Result<(), ShareError> {
        let Some(space) = &self.space else {
            return Ok(());
        };
        if space.allows(bytes) {
            return Ok(());
        }
        if self.evict_down_to(0, Some(bytes), None)? > 0 && space.allows(bytes) {
            return Ok(());
        }
        Err(ShareError::NoSpace)
    }

    /// Room for `bytes` about to be fetched from the bucket into file `id`: under `[local]
    /// min_free` (`make_room`), and under `cache_max`, which reads would otherwise overrun
    /// by what they fetch between two eviction passes. For `cache_max` other files go, not
    /// `id`'s fetched blocks: dropping those under their reader would throw away its
    /// read-ahead at every fetch. A file being read that alone outgrows the cache is the
    /// periodic pass's to evict.
    fn room_to_fetch(&self, id: u64, bytes: u64) -> Result<(), ShareError> {
        self.make_room(bytes)?;
        let limit = self.settings.cache_max;
        let cached = self.clean_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        // The slack below holds for the file it was set for; a fetch for another file may
        // have others to evict.
        let (for_id, at) = *lock(&self.evict_at);
        let threshold = if for_id == id { at } else { 0 };
        if cached > limit.max(threshold) {
            self.evict_down_to(limit, None, Some(id))?;
            // What the pass left over the bound is what reads are fetching into: look again
            // only once they have fetched a tenth of the cache (at least 64 MiB) more, not
            // at every fetch (a pass lists every local file).
            let left = self.clean_bytes.load(Ordering::Relaxed);
            let again = if left > limit {
                left + (limit / 10).max(64 << 20)
            } else {
                0
            };
            *lock(&self.evict_at) = (id, again);
        }
        Ok(())
    }

    /// `request`, a call to the bucket, run on the runtime from this blocking thread; dropped
    /// if the share stops first (`Stopping`), so that no call outlives the runtime at a stop
    /// (`Shares::close` waits for those under way).
    fn bucket<T>(&self, request: impl std::future::Future<Output = T>) -> Result<T, ShareError> {
        self.gate
            .call(&self.runtime, request)
            .ok_or(ShareError::Stopping)
    }

    /// The answer to `request`, a read of object `key` for a client, waited for at most
    /// `read_timeout`.
    fn bucket_answer<T>(
        &self,
        key: &str,
        request: impl std::future::Future<Output = crate::remote::Result<T>>,
    ) -> Result<T, ShareError> {
        let limit = self.settings.read_timeout;
        // The timer is made inside the runtime, whose context it needs.
        let answer = self.bucket(async { tokio::time::timeout(limit, request).await })?;
        match answer {
            Ok(answer) => answer.map_err(|e| ShareError::Io(format!("fetching {key}: {e}"))),
            Err(_) => Err(blocks::timed_out(key, limit)),
        }
    }

    /// Brings an evicted file's content back from its object. One fetch per file at a time
    /// (a second reader of the same file finds it fetched), and a few files at once: a large
    /// file's fetch does not hold up the fetch of a small one.
    fn fetch(&self, id: u64) -> Result<(), ShareError> {
        let _turn = self.fetch_turn(id);
        let path = self.content_path(id);
        if path.exists() {
            return Ok(());
        }
        // Where the file's last upload put it, which a rename since has not moved yet.
        let Some(uploaded) = self.ns.get(id)?.uploaded else {
            return Ok(());
        };
        let key = format!("{}{}", self.info.prefix, uploaded.path);
        // Room for it, clean files evicted if need be, or the client tries again.
        self.room_to_fetch(id, uploaded.size)?;
        let staging = self.files.join(format!("{id:016x}.fetch"));
        // With the file's time, as when it was evicted (clients would take a new one for a
        // change).
        let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(self.ns.get(id)?.mtime_ns);
        let cvs = match self.fetch_into(&key, uploaded.size, time, &staging) {
            Ok(cvs) => cvs,
            Err(e) => {
                let _ = std::fs::remove_file(&staging);
                return Err(e);
            }
        };
        // Under the dirty lock, and only if the content is still missing: a read may have
        // just completed it from fetched blocks, and a write gone into that file.
        let dirty = lock(&self.dirty);
        if path.exists() {
            let _ = std::fs::remove_file(&staging);
        } else {
            std::fs::rename(&staging, &path).map_err(|e| io_error("fetching a file", e))?;
        }
        drop(dirty);
        self.drop_partial(id);
        if let Some(cvs) = cvs {
            // Checked against the digest with the whole: an eviction from now on reads
            // back a block at a time.
            self.ns.set_blocks(id, &cvs)?;
        }
        Ok(())
    }

    /// Waits until file `id` may be fetched whole: no fetch of it is under way, and fewer
    /// than `WHOLE_FETCHES` in all.
    fn fetch_turn(&self, id: u64) -> FetchTurn<'_> {
        let mut fetching = lock(&self.fetching);
        while fetching.contains(&id) || fetching.len() >= WHOLE_FETCHES {
            fetching = self
                .fetched
                .wait(fetching)
                .unwrap_or_else(PoisonError::into_inner);
        }
        fetching.insert(id);
        FetchTurn { share: self, id }
    }

    /// The object `key` of `size` bytes into the file `to`, in ranged reads of 8 MiB (memory
    /// stays at one range), on disk when it returns. Objects put by other tools carry no
    /// digest, so whole-object reads (which demand firn's) cannot fetch them; a digest firn
    /// wrote is checked here instead, and then the object's block hashes are returned.
    fn fetch_into(
        &self,
        key: &str,
        size: u64,
        time: SystemTime,
        to: &std::path::Path,
    ) -> Result<Option<Vec<u8>>, ShareError> {
        const RANGE: u64 = 8 << 20;
        let file = File::create(to).map_err(|e| io_error("fetching a file", e))?;
        let Some(head) = self.bucket_answer(key, self.remote.head(key))? else {
            return Err(ShareError::Changed(format!(
                "{key} is gone from the bucket: a refresh takes that in"
            )));
        };
        if head.size != size {
            return Err(ShareError::Changed(format!(
                "{key} changed in the bucket since it was listed ({} bytes, not {size}): a refresh takes it in",
                head.size
            )));
        }
        let digest = head.meta.get(crate::remote::verify::DIGEST_META).cloned();
        let mut hasher = blake3::Hasher::new();
        let gathered = blocks::Gathered::new(size).filter(|_| digest.is_some());
        let mut at = 0;
        while at < size {
            let end = (at + RANGE).min(size);
            // Pinned to the version the HEAD saw: one replaced meanwhile fails the fetch
            // rather than mixing two versions in one file.
            let bytes = self.bucket_answer(
                key,
                self.remote.get_range_if(key, at..end, head.etag.as_deref()),
            )?;
            hasher.update(&bytes);
            self.downloaded_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if let Some(gathered) = &gathered {
                gathered.gather(at, &bytes, &gathered.wanted(at, end - at));
            }
            file.write_all_at(&bytes, at)
                .map_err(|e| write_error("fetching a file", e))?;
            at = end;
        }
        if let Some(digest) = digest
            && hasher.finalize().to_hex().as_str() != digest
        {
            return Err(ShareError::Io(format!(
                "{key} in the bucket does not match its digest: not fetched"
            )));
        }
        // On disk before it is named as the content, which is taken as whole after a crash.
        file.set_modified(time)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error("fetching a file", e))?;
        Ok(gathered.and_then(|g| g.finish()))
    }

    /// Evicts the least recently used clean files until their local bytes are under
    /// `cache_max` (down to nine tenths of it, so eviction does not run on every pass).
    /// Returns the bytes freed.
    /// Lists the local files only when the count says the cache may be over, or when the
    /// count is `RECOUNT_EVERY` old: a share of many files is not listed every few seconds.
    fn evict(&self) -> Result<u64, ShareError> {
        let fresh = lock(&self.counted).is_some_and(|at| at.elapsed() < RECOUNT_EVERY);
        if fresh && self.clean_bytes.load(Ordering::Relaxed) <= self.settings.cache_max {
            return Ok(0);
        }
        self.evict_down_to(self.settings.cache_max, None, None)
    }

    /// Evicts clean files, least recently used first, until their bytes are at most nine
    /// tenths of `limit` (when over `limit`) or, with `need`, until that many are freed.
    /// `keep`, if given, is left whatever it takes.
    fn evict_down_to(
        &self,
        limit: u64,
        need: Option<u64>,
        keep: Option<u64>,
    ) -> Result<u64, ShareError> {
        let mut clean = Vec::new();
        let mut total = 0u64;
        let mut files = 0u64;
        let dirty: std::collections::HashSet<u64> = lock(&self.dirty).keys().copied().collect();
        for entry in std::fs::read_dir(&self.files).map_err(|e| io_error("listing files", e))? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".part"))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            {
                // Fetched blocks of an evicted file: sparse, so their blocks count.
                let size = entry.metadata().map_or(0, |m| m.blocks() * 512);
                total += size;
                clean.push((id, size, true));
                continue;
            }
            let Some(id) = entry
                .file_name()
                .to_str()
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            if dirty.contains(&id) {
                continue;
            }
            let size = entry.metadata().map_or(0, |m| m.len());
            total += size;
            files += 1;
            clean.push((id, size, false));
        }
        self.clean_bytes.store(total, Ordering::Relaxed);
        self.clean_files.store(files, Ordering::Relaxed);
        *lock(&self.counted) = Some(Instant::now());
        if need.is_none() && total <= limit {
            return Ok(0);
        }
        let used = lock(&self.used).clone();
        // Least recently used first; files not used since the start count as oldest.
        clean.sort_by_key(|(id, _, _)| used.get(id).copied());
        let target = limit / 10 * 9;
        let mut freed = 0;
        // A file is evicted only on the strength of its upload's record, which is committed
        // lazily: on disk before any local copy goes, or a crash would bring the file back
        // dirty with nothing to upload.
        let mut synced = false;
        for (id, size, part) in clean {
            if keep == Some(id) {
                continue;
            }
            let done = match need {
                Some(need) => freed >= need,
                None => total - freed <= target,
            };
            if done {
                break;
            }
            if part {
                freed += self.drop_partial(id);
                continue;
            }
            // Only a file whose object holds what it holds here.
            let Ok(inode) = self.ns.get(id) else { continue };
            if inode.uploaded.as_ref().is_none_or(|u| u.size != size) {
                continue;
            }
            if !synced {
                self.ns.sync()?;
                synced = true;
            }
            // Checked and removed under the dirty lock: a write marks its file dirty under
            // it before it touches the content, so it never writes into an evicted file.
            let dirty = lock(&self.dirty);
            if dirty.contains_key(&id) {
                continue;
            }
            lock(&self.used).remove(&id);
            let mut open = lock(&self.files_open);
            open.remove(&id);
            if std::fs::remove_file(self.content_path(id)).is_ok() {
                freed += size;
                files -= 1;
            }
            drop(open);
            drop(dirty);
        }
        self.clean_bytes
            .store(total.saturating_sub(freed), Ordering::Relaxed);
        self.clean_files.store(files, Ordering::Relaxed);
        Ok(freed)
    }

    fn forget_content(&self, id: u64) {
        lock(&self.used).remove(&id);
        lock(&self.files_open).remove(&id);
        let _ = std::fs::remove_file(self.content_path(id));
        self.drop_partial(id);
        lock(&self.dirty).remove(&id);
    }

    /// A change to file `id` begins: it is dirty from now on (durably, on the first change
    /// after an upload), and no upload that reads it while the change is under way completes
    /// (`Dirty::writing`). Every `begin_change` is followed by one `end_change`.
    fn begin_change(&self, id: u64) -> Result<(), ShareError> {
        let mut dirty = lock(&self.dirty);
        match dirty.get_mut(&id) {
            Some(d) => {
                d.generation += 1;
                d.writing += 1;
                d.last_change = Instant::now();
            }
            None => {
                self.ns.mark_dirty(id)?;
                // Clean until now, so the namespace has its size (that of its object).
                let bytes = self.ns.get(id).map_or(0, |inode| inode.size);
                dirty.insert(
                    id,
                    Dirty {
                        generation: 1,
                        writing: 1,
                        last_change: Instant::now(),
                        now: false,
                        bytes,
                    },
                );
            }
        }
        Ok(())
    }

    fn end_change(&self, id: u64, resized: Resized) {
        if let Some(d) = lock(&self.dirty).get_mut(&id) {
            d.generation += 1;
            d.writing -= 1;
            d.last_change = Instant::now();
            d.bytes = match resized {
                Resized::Same => d.bytes,
                Resized::AtLeast(end) => d.bytes.max(end),
                Resized::To(size) => size,
            };
        }
    }

    /// A file just made: the namespace marked it dirty in the same transaction, so only the
    /// uploader's view needs it. A directory or symlink is complete when made (no writes,
    /// no COMMIT follow), so it goes up at once (`now`), without waiting to settle.
    fn created(&self, id: u64, now: bool) {
        lock(&self.dirty).insert(
            id,
            Dirty {
                generation: 1,
                writing: 0,
                last_change: Instant::now(),
                now,
                bytes: 0,
            },
        );
        if now {
            self.wake.notify_one();
        }
    }

    /// A change made in one step (a rename, new attributes).
    fn changed(&self, id: u64) -> Result<(), ShareError> {
        self.begin_change(id)?;
        self.end_change(id, Resized::Same);
        Ok(())
    }

    pub fn root(&self) -> u64 {
        namespace::ROOT
    }

    pub fn lookup(&self, dir: u64, name: &str) -> Result<u64, ShareError> {
        self.ns.lookup(dir, name)
    }

    /// The share-relative path of `id`.
    pub fn path(&self, id: u64) -> Result<String, ShareError> {
        self.ns.path(id)
    }

    /// The namespace's record of `id` (mode and owner, without a look at its content).
    pub fn inode(&self, id: u64) -> Result<Inode, ShareError> {
        self.ns.get(id)
    }

    pub fn attrs(&self, id: u64) -> Result<Attrs, ShareError> {
        let inode = self.ns.get(id)?;
        self.attrs_of(id, &inode)
    }

    /// Bytes of a file's object key before its share-relative path: the gateway bucket's
    /// prefix (a share in a bucket of its own has none) and the share's.
    fn key_prefix_len(&self) -> usize {
        // Without building the prefix: every create, mkdir and rename asks.
        let bucket = match self.info.bucket {
            None => self.settings.bucket_prefix.len(),
            Some(_) => 0,
        };
        bucket + self.info.prefix.len()
    }

    /// What a file's object key has before its share-relative path: the gateway bucket's
    /// prefix (a share in a bucket of its own has none) and the share's.
    fn key_prefix(&self) -> String {
        match self.info.bucket {
            None => format!("{}{}", self.settings.bucket_prefix, self.info.prefix),
            Some(_) => self.info.prefix.clone(),
        }
    }

    fn attrs_of(&self, id: u64, inode: &Inode) -> Result<Attrs, ShareError> {
        let mut attrs = Attrs {
            fileid: id,
            kind: inode.kind,
            mode: inode.mode,
            uid: inode.uid,
            gid: inode.gid,
            size: inode.size,
            used: 0,
            mtime_ns: inode.mtime_ns,
            atime_ns: inode.atime_ns,
            ctime_ns: inode.ctime_ns,
        };
        if inode.kind == Kind::File {
            match std::fs::metadata(self.content_path(id)) {
                Ok(m) => {
                    attrs.size = m.len();
                    attrs.used = m.blocks() * 512;
                    attrs.mtime_ns = file_time_ns(m.mtime(), m.mtime_nsec());
                    attrs.ctime_ns = attrs.ctime_ns.max(attrs.mtime_ns);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("reading a file's local content", e)),
            }
        }
        Ok(attrs)
    }

    /// Makes file `name` in `dir`. With `exclusive`, an existing name is `Exists`;
    /// without, an existing file is opened as it is (NFS CREATE UNCHECKED).
    pub fn create(
        &self,
        dir: u64,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> Result<Attrs, ShareError> {
        let _changing = self.check_writable()?;
        let attrs = new_attrs(mode, uid, gid);
        match self
            .ns
            .create(dir, name, Kind::File, attrs, None, self.key_prefix_len())
        {
            Ok((id, inode)) => {
                // The entry rides with the content: its creation is durable with the
                // file's first COMMIT, and a crash that lost the commit enters it again.
                let entry = namespace::Entry {
                    parent: dir,
                    name: name.to_string(),
                    mode,
                    uid,
                    gid,
                    now_ns: attrs.now_ns,
                };
                let file = self.new_content(id)?;
                let value = entry.encode();
                if let Err(e) = xattr::FileExt::set_xattr(&*file, namespace::ENTRY_XATTR, &value) {
                    // A file system without user attributes: the creation is made durable
                    // now instead (a grouped commit covers the lazy one).
                    tracing::debug!(share = %self.info.name, "no entry attribute on a new file ({e}): committing its creation at once");
                    self.ns.mark_dirty(id)?;
                }
                self.created(id, false);
                self.attrs_of(id, &inode)
            }
            Err(ShareError::Exists) if !exclusive => {
                let id = self.ns.lookup(dir, name)?;
                let attrs = self.attrs(id)?;
                if attrs.kind != Kind::File {
                    return Err(ShareError::Exists);
                }
                Ok(attrs)
            }
            Err(e) => Err(e),
        }
    }

    pub fn mkdir(
        &self,
        dir: u64,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attrs, ShareError> {
        let _changing = self.check_writable()?;
        let attrs = new_attrs(mode, uid, gid);
        let (id, inode) =
            self.ns
                .create(dir, name, Kind::Dir, attrs, None, self.key_prefix_len())?;
        self.created(id, true);
        self.attrs_of(id, &inode)
    }

    /// Makes symlink `name` in `dir` pointing at `target`, which is kept as it is: a client
    /// resolves it, never firn.
    pub fn symlink(
        &self,
        dir: u64,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> Result<Attrs, ShareError> {
        let _changing = self.check_writable()?;
        if target.is_empty() || target.len() > 4096 || target.contains('\0') {
            return Err(ShareError::Invalid(
                "a symlink's target must be 1 to 4096 bytes without NUL".into(),
            ));
        }
        let attrs = NewAttrs {
            mode: 0o777,
            uid,
            gid,
            now_ns: now_ns(),
            atime_ns: None,
        };
        let (id, inode) = self.ns.create(
            dir,
            name,
            Kind::Symlink,
            attrs,
            Some(target.to_string()),
            self.key_prefix_len(),
        )?;
        self.created(id, true);
        self.attrs_of(id, &inode)
    }

    pub fn readlink(&self, id: u64) -> Result<String, ShareError> {
        let inode = self.ns.get(id)?;
        inode
            .target
            .filter(|_| inode.kind == Kind::Symlink)
            .ok_or_else(|| ShareError::Invalid("not a symlink".into()))
    }

    /// Removes file or symlink `name` of `dir`; its object goes from the bucket after.
    pub fn remove(&self, dir: u64, name: &str) -> Result<(), ShareError> {
        let _changing = self.check_writable()?;
        let (id, _) = self.ns.remove(dir, name, false, now_ns())?;
        self.forget_content(id);
        self.wake.notify_one();
        Ok(())
    }

    /// Removes the empty directory `name` of `dir`; its marker goes from the bucket after.
    pub fn rmdir(&self, dir: u64, name: &str) -> Result<(), ShareError> {
        let _changing = self.check_writable()?;
        let (id, _) = self.ns.remove(dir, name, true, now_ns())?;
        lock(&self.dirty).remove(&id);
        self.wake.notify_one();
        Ok(())
    }

    /// Renames `from_dir/from` to `to_dir/to`. A moved file (or every file below a moved
    /// directory) is uploaded again under its new key, and its old object deleted after.
    pub fn rename(
        &self,
        from_dir: u64,
        from: &str,
        to_dir: u64,
        to: &str,
    ) -> Result<(), ShareError> {
        let _changing = self.check_writable()?;
        let (replaced, moved) =
            self.ns
                .rename(from_dir, from, to_dir, to, now_ns(), self.key_prefix_len())?;
        if let Some(old) = replaced {
            self.forget_content(old);
        }
        self.moved(&moved);
        Ok(())
    }

    /// Entries whose key changed (a rename, a file taken in under a directory renamed
    /// meanwhile) are a change, for the uploader: the namespace marked them dirty on disk;
    /// here the uploader's view.
    fn moved(&self, moved: &[u64]) {
        let sizes: Vec<(u64, u64)> = moved
            .iter()
            .map(|&id| (id, self.ns.get(id).map_or(0, |inode| inode.size)))
            .collect();
        let mut dirty = lock(&self.dirty);
        for (id, size) in sizes {
            let d = dirty.entry(id).or_insert(Dirty {
                generation: 0,
                writing: 0,
                last_change: Instant::now(),
                now: false,
                bytes: size,
            });
            d.generation += 1;
            d.last_change = Instant::now();
        }
        drop(dirty);
        self.wake.notify_one();
    }

    /// Up to `limit` entries of `dir` after the name `after`, with their attributes.
    pub fn list(
        &self,
        dir: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Attrs)>, ShareError> {
        if after.is_none() {
            self.refresh_if_stale(dir);
        }
        let mut entries = Vec::new();
        for (name, id) in self.ns.list(dir, after, limit)? {
            match self.attrs(id) {
                Ok(attrs) => entries.push((name, attrs)),
                // Removed since the listing: skip it.
                Err(ShareError::Stale(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(entries)
    }

    /// The largest file a client may make here (`Settings::max_file`).
    pub fn max_file(&self) -> u64 {
        self.settings.max_file.min(MAX_FILE)
    }

    pub fn setattr(&self, id: u64, set: SetAttrs) -> Result<Attrs, ShareError> {
        let _changing = self.check_writable()?;
        let inode = self.ns.get(id)?;
        if set.size.is_some() && inode.kind != Kind::File {
            return Err(ShareError::Invalid("only a file has a size to set".into()));
        }
        if set.size.is_some_and(|size| size > self.max_file()) {
            return Err(ShareError::TooBig(self.max_file()));
        }
        if set.size.is_some() || set.mtime_ns.is_some() && inode.kind == Kind::File {
            self.begin_change(id)?;
            let done = (|| {
                // Emptied (O_TRUNC, a copy over the file): nothing of the old content is
                // needed, so an evicted file is not fetched first.
                let file = if set.size == Some(0) {
                    self.emptied_content(id)?
                } else {
                    self.content(id)?
                };
                if let Some(size) = set.size {
                    file.set_len(size)
                        .map_err(|e| io_error("truncating a file", e))?;
                }
                if let Some(mtime) = set.mtime_ns {
                    let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(mtime);
                    file.set_modified(time)
                        .map_err(|e| io_error("setting a file's time", e))?;
                }
                Ok::<_, ShareError>(())
            })();
            let resized = match (done.is_ok(), set.size) {
                (true, Some(size)) => Resized::To(size),
                _ => Resized::Same,
            };
            self.end_change(id, resized);
            done?;
        }
        let now = now_ns();
        let inode = self.ns.update(id, |inode| {
            if let Some(mode) = set.mode {
                inode.mode = mode & 0o7777;
            }
            if let Some(uid) = set.uid {
                inode.uid = uid;
            }
            if let Some(gid) = set.gid {
                inode.gid = gid;
            }
            if let Some(atime) = set.atime_ns {
                inode.atime_ns = atime;
            }
            if let Some(mtime) = set.mtime_ns {
                inode.mtime_ns = mtime;
            }
            inode.ctime_ns = now;
        })?;
        // Mode, owner and times travel with the object (a directory's with its marker): a
        // change is a new upload.
        if id != namespace::ROOT {
            self.changed(id)?;
        }
        self.attrs_of(id, &inode)
    }

    /// Up to `count` bytes of file `id` from `offset`, and whether they reach its end.
    pub fn read(&self, id: u64, offset: u64, count: u32) -> Result<(Vec<u8>, bool), ShareError> {
        let inode = self.ns.get(id)?;
        match inode.kind {
            Kind::Dir => return Err(ShareError::IsDir),
            Kind::Symlink => {
                return Err(ShareError::Invalid(
                    "a symlink is read with READLINK".into(),
                ));
            }
            Kind::File => {}
        }
        let file = match self.cached(id)? {
            Some(file) => {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                file
            }
            None => {
                // Evicted: only the blocks the read needs, when they can be checked.
                if let Some(uploaded) = inode.uploaded.as_ref().filter(|u| u.size > blocks::BLOCK)
                    && let Some(read) = self.read_blocks(id, uploaded, offset, count)?
                {
                    return Ok(read);
                }
                self.cache_misses.fetch_add(1, Ordering::Relaxed);
                self.content(id)?
            }
        };
        let size = file
            .metadata()
            .map_err(|e| io_error("reading a file", e))?
            .len();
        let len = (count as u64).min(size.saturating_sub(offset)) as usize;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| io_error("reading a file", e))?;
        Ok((buf, offset + len as u64 >= size))
    }

    /// Writes `data` at `offset` of file `id`; with `sync`, on stable storage before it
    /// returns (NFS `FILE_SYNC`/`DATA_SYNC`), otherwise in the page cache until a commit.
    pub fn write(
        &self,
        id: u64,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<Attrs, ShareError> {
        let _changing = self.check_writable()?;
        let inode = self.ns.get(id)?;
        match inode.kind {
            Kind::Dir => return Err(ShareError::IsDir),
            Kind::Symlink => return Err(ShareError::Invalid("not a regular file".into())),
            Kind::File => {}
        }
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > self.max_file()) {
            return Err(ShareError::TooBig(self.max_file()));
        }
        self.make_room(data.len() as u64)?;
        // Dirty before the content is opened: eviction never takes a dirty file.
        self.begin_change(id)?;
        let written = self.content(id).and_then(|file| {
            file.write_all_at(data, offset)
                .map_err(|e| write_error("writing a file", e))?;
            Ok(file)
        });
        let end = offset + data.len() as u64;
        self.end_change(
            id,
            written
                .as_ref()
                .map_or(Resized::Same, |_| Resized::AtLeast(end)),
        );
        let file = written?;
        if sync {
            // FILE_SYNC: data and metadata, the entry a new file carries included.
            file.sync_all().map_err(|e| io_error("syncing a file", e))?;
        }
        self.attrs_of(id, &inode)
    }

    /// Makes file `id`'s writes durable (NFS COMMIT) and uploads it without waiting for it
    /// to settle. Its attributes after.
    pub fn commit(&self, id: u64) -> Result<Attrs, ShareError> {
        let inode = self.ns.get(id)?;
        // Data and metadata: a new file's entry rides on it (`Namespace::recover`). An
        // evicted file is clean, in the bucket already: nothing to fetch or sync.
        if inode.kind == Kind::File
            && let Some(file) = self.cached(id)?
        {
            file.sync_all().map_err(|e| io_error("syncing a file", e))?;
        }
        if let Some(d) = lock(&self.dirty).get_mut(&id) {
            d.now = true;
        }
        self.wake.notify_one();
        self.attrs_of(id, &inode)
    }

    /// Bytes in all and free, files in all and free, of the local disk the share's files
    /// are on (NFS FSSTAT).
    pub fn space(&self) -> (u64, u64, u64, u64) {
        match nix::sys::statvfs::statvfs(&self.files) {
            Ok(s) => {
                let frag = s.fragment_size();
                (
                    s.blocks() * frag,
                    s.blocks_available() * frag,
                    s.files(),
                    s.files_available(),
                )
            }
            Err(_) => (0, 0, 0, 0),
        }
    }

    /// Files whose last use is remembered for eviction: at most those with content on local
    /// disk, whole or in part (each costs memory).
    pub fn remembered_uses(&self) -> usize {
        lock(&self.used).len()
    }

    pub fn status(&self) -> ShareStatus {
        let (dirty_files, dirty_bytes) = {
            let dirty = lock(&self.dirty);
            (dirty.len() as u64, dirty.values().map(|d| d.bytes).sum())
        };
        ShareStatus {
            dirty_files,
            dirty_bytes,
            pending_deletes: self.ns.pending_deletes().unwrap_or(0),
            uploading_files: self.uploading_files.load(Ordering::Relaxed),
            uploaded_files: self.uploaded_files.load(Ordering::Relaxed),
            uploaded_bytes: self.uploaded_bytes.load(Ordering::Relaxed),
            cached_bytes: self.clean_bytes.load(Ordering::Relaxed) + dirty_bytes,
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
            downloaded_bytes: self.downloaded_bytes.load(Ordering::Relaxed),
            cached_files: self.clean_files.load(Ordering::Relaxed) + dirty_files,
            last_refresh: lock(&self.last_refresh)
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            refreshing: lock(&self.refresh_progress).clone(),
            last_error: lock(&self.last_error).clone(),
        }
    }
}

/// The largest file a share holds: S3's largest object.
pub const MAX_FILE: u64 = 5 << 40;

fn file_time_ns(secs: i64, nsecs: i64) -> u64 {
    (secs.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(nsecs.max(0) as u64)
}
