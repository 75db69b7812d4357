//! The remote layer: the object store behind the gateway.
//!
//! One small trait, [`Remote`], with two backends (an S3-compatible bucket through the
//! `object_store` crate, and a local directory for the embedded default) and thin wrappers
//! for what every caller needs once: retries, checksums, the bandwidth limiter, metrics and
//! fault injection. Each wrapper holds an inner `Arc<dyn Remote>`; [`build`] stacks them in one
//! place. Nothing here knows what the objects mean.

pub mod dir;
pub mod faults;
pub mod gate;
mod http;
pub mod limit;
pub mod metered;
pub mod retry;
pub mod s3;
pub mod verify;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// User metadata of an object: lower-case ASCII names to values.
pub type Meta = BTreeMap<String, String>;

/// An object read back whole.
#[derive(Debug, Clone)]
pub struct Object {
    pub body: Bytes,
    pub meta: Meta,
}

/// What a streamed read tells besides the bytes: the object's size and user metadata.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub size: u64,
    pub meta: Meta,
}

/// What a put tells about the object it stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The new object's ETag as the store answered it (the same value a listing or HEAD
    /// shows), where the store tells one.
    pub etag: Option<String>,
}

/// What a listing or a HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// The object's user metadata: from a HEAD; a listing leaves it empty.
    pub meta: Meta,
    /// What changes when the object is replaced: S3's ETag; the directory store's file
    /// identity (inode, change time, size). `None` where not known (a directory marker).
    pub etag: Option<String>,
}

/// One level of a listing: the objects directly under a prefix, and the "directories" (common
/// prefixes ending in '/').
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Full keys ending in `/` (`volumes/abc/`), each the prefix of at least one object
    /// further down (the directory store may also show one left empty; see
    /// [`Remote::list_dir`]).
    pub dirs: Vec<String>,
    pub objects: Vec<ObjectInfo>,
}

/// One page of a level's listing ([`Remote::list_dir_page`]).
#[derive(Debug, Default)]
pub struct ListingPage {
    pub listing: Listing,
    /// Where the next page starts (a cursor only the store that gave it reads); `None` after
    /// the last page.
    pub next: Option<String>,
}

/// An upload's bytes: its length and any slice of it, read when needed (a part at a time)
/// and read again for a retry, so an upload never has to hold the whole object.
#[async_trait]
pub trait Body: Send + Sync + std::fmt::Debug {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Exactly the bytes of `range`, which lies within `0..len()`.
    async fn read(&self, range: Range<u64>) -> Result<Bytes>;
}

#[async_trait]
impl Body for Bytes {
    fn len(&self) -> u64 {
        Bytes::len(self) as u64
    }

    async fn read(&self, range: Range<u64>) -> Result<Bytes> {
        Ok(self.slice(range.start as usize..range.end as usize))
    }
}

/// A local file as an upload body, read slice by slice with positional reads.
#[derive(Debug)]
pub struct FileBody {
    file: Arc<std::fs::File>,
    len: u64,
    path: std::path::PathBuf,
    /// The file's modification time when opened (`unchanged`).
    modified: Option<std::time::SystemTime>,
}

impl FileBody {
    pub fn open(path: &std::path::Path) -> std::io::Result<FileBody> {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        Ok(FileBody {
            file: Arc::new(file),
            len: meta.len(),
            path: path.to_path_buf(),
            modified: meta.modified().ok(),
        })
    }

    /// Whether the file has kept its length and modification time since it was opened: a
    /// body read (and its checksum taken) while someone writes to it is no one version of
    /// the file.
    pub fn unchanged(&self) -> std::io::Result<bool> {
        let meta = self.file.metadata()?;
        Ok(meta.len() == self.len && meta.modified().ok() == self.modified)
    }
}

#[async_trait]
impl Body for FileBody {
    fn len(&self) -> u64 {
        self.len
    }

    async fn read(&self, range: Range<u64>) -> Result<Bytes> {
        use std::os::unix::fs::FileExt;
        let file = self.file.clone();
        // Allocated here, on a runtime worker, not on the blocking thread: glibc gives each
        // thread that allocates its own arena, and a part-sized buffer freed into one of the
        // many blocking threads' arenas stays in the process's memory.
        let mut buf = vec![0; (range.end - range.start) as usize];
        let outcome = tokio::task::spawn_blocking(move || {
            file.read_exact_at(&mut buf, range.start).map(|()| buf)
        })
        .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            // The runtime is shutting down: the read never ran, or its outcome is lost.
            Err(e) if e.is_cancelled() => {
                return Err(Error::Transient {
                    op: "read",
                    key: self.path.display().to_string(),
                    message: "the daemon is stopping".into(),
                });
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        outcome.map(Bytes::from).map_err(|e| Error::Permanent {
            op: "read",
            key: self.path.display().to_string(),
            message: format!("{e} (was the file changed during the upload?)"),
        })
    }
}

/// Where a streamed read goes. The bytes come in order: each `write` starts where the last
/// one ended, except that a write at offset 0 starts the object over (a retry).
#[async_trait]
pub trait Sink: Send + Sync {
    async fn write(&self, offset: u64, bytes: Bytes) -> Result<()>;
}

/// Collects an object in memory, for [`Remote::get`].
#[derive(Default)]
struct MemorySink {
    body: std::sync::Mutex<bytes::BytesMut>,
}

#[async_trait]
impl Sink for MemorySink {
    async fn write(&self, offset: u64, bytes: Bytes) -> Result<()> {
        let mut body = self.body.lock().unwrap_or_else(|e| e.into_inner());
        if offset == 0 {
            body.clear();
        }
        if offset != body.len() as u64 {
            return Err(Error::Permanent {
                op: "get",
                key: String::new(),
                message: format!("write at {offset} after {} bytes", body.len()),
            });
        }
        body.extend_from_slice(&bytes);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object {key:?} not found")]
    NotFound { key: String },
    #[error("object {key:?} failed verification: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid object key {key:?}: {reason}")]
    BadKey { key: String, reason: String },
    /// A [`Remote::create`] found an object under the key. Not retryable: the object stays.
    #[error("object {key:?} already exists")]
    Exists { key: String },
    /// A read pinned to one version of an object (`get_range_if`) found another one stored.
    /// Not retryable: the version asked for is gone.
    #[error("object {key:?} changed: the version read from is no longer stored")]
    Changed { key: String },
    /// Worth another try: network errors, timeouts, 5xx, throttling, injected faults.
    #[error("{op} {key:?}: {message}")]
    Transient {
        op: &'static str,
        key: String,
        message: String,
    },
    /// Retrying will not help: access denied, no such bucket, bad request, local I/O errors.
    #[error("{op} {key:?}: {message}")]
    Permanent {
        op: &'static str,
        key: String,
        message: String,
    },
}

impl Error {
    pub fn is_retryable(&self) -> bool {
        // A corrupt read may be a torn response; if the object itself is bad, every retry
        // fails the same way and the caller still gets `Corrupt`.
        matches!(self, Error::Transient { .. } | Error::Corrupt { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An object store as firn uses it. Keys are `/`-separated relative paths without empty,
/// `.` or `..` segments. A `put` is atomic: readers see the old object or the whole new one.
///
/// A key ending in `/` (`a/b/`) is a directory marker: an empty object that keeps a
/// "directory" in the bucket when nothing is below it, as S3 consoles and file tools write
/// them. `put`, `head` and `delete` take markers (a marker's body must be empty); nothing
/// reads one; [`Remote::list`] shows markers under their keys, and [`Remote::list_dir`] as
/// the directory each marks, not as an object in it.
///
/// Bodies stream both ways: [`Remote::put_body`] reads its body a slice or part at a time,
/// [`Remote::get_to`] hands the object to a sink in order; memory stays bounded by the part
/// size times the part concurrency whatever the object's size. `put` and `get` are the
/// in-memory forms for small objects; wrappers implement only the streaming ones.
#[async_trait]
pub trait Remote: Send + Sync + std::fmt::Debug {
    async fn put_body(&self, key: &str, body: Arc<dyn Body>, meta: Meta) -> Result<Stored>;
    /// The whole object into `sink`, in order; its size and metadata.
    async fn get_to(&self, key: &str, sink: &dyn Sink) -> Result<Fetched>;

    async fn put(&self, key: &str, body: Bytes, meta: Meta) -> Result<()> {
        self.put_body(key, Arc::new(body), meta).await.map(|_| ())
    }

    /// Create-if-absent: atomic like `put`, but fails with [`Error::Exists`] when an object
    /// is already stored under `key`, and then leaves that object as it was. Of two creates
    /// racing for one key, at most one succeeds; this is what fences the commits of a cached
    /// volume against a second gateway writing it.
    ///
    /// Only as good as the store: S3 sends `If-None-Match: *`, which a store may ignore and
    /// overwrite (Garage does); [`probe_create`] tells which kind the store is.
    ///
    /// One request, for small objects (commits, leases): a body too large for a single PUT
    /// (over an S3 backend's multipart threshold) is refused with a `Permanent` error.
    ///
    /// `Exists` does not prove that someone else wrote the object. A create whose object was
    /// stored but whose answer was lost (a timeout, a dropped connection) is retried like any
    /// request, and the retry finds the object the first attempt left: it reports `Exists`
    /// for an object this caller wrote. The retry wrapper does not hide this, since only the
    /// caller knows what it wrote; a caller that must tell the two apart reads the object
    /// back and compares it with its own body (or a nonce in its metadata).
    async fn create(&self, key: &str, body: Bytes, meta: Meta) -> Result<()>;

    async fn get(&self, key: &str) -> Result<Object> {
        let sink = MemorySink::default();
        let fetched = self.get_to(key, &sink).await?;
        let body = sink
            .body
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .freeze();
        Ok(Object {
            body,
            meta: fetched.meta,
        })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.get_range_if(key, range, None).await
    }
    /// Bytes `range` of the object; with `etag`, only of the version with that ETag (as a
    /// HEAD or listing told it): another version stored under `key` is [`Error::Changed`],
    /// so that reads of one object in ranges never mix two versions of it.
    async fn get_range_if(&self, key: &str, range: Range<u64>, etag: Option<&str>)
    -> Result<Bytes>;
    /// `Ok(None)` when the object does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// Every object whose key starts with `prefix`, in key order. `prefix` is a key prefix,
    /// usually ending in `/`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// One level under `prefix`, which is `""` (the root) or a key prefix ending in `/`: the
    /// objects whose key has no further `/` after it, and the "directories", the full keys
    /// ending in `/` (`volumes/abc/`) of the objects further down, each once. Both in key
    /// order. A prefix nothing is under is an empty listing, not `NotFound`.
    ///
    /// This is how callers find what a prefix holds (the volumes in a bucket, the entries of
    /// a directory) without listing every object beneath it: memory is bounded by the size
    /// of the one level, whatever lies below. The directory store may list a directory that
    /// a put interrupted before its rename left empty (S3 has no such thing); a caller that
    /// lists it finds nothing in it.
    async fn list_dir(&self, prefix: &str) -> Result<Listing>;
    /// [`Remote::list_dir`] a page at a time, for levels of any size: a bounded number of
    /// entries (1,000 from S3) from `cursor` (`None`: the first page; then the `next` of the
    /// page before). The objects of all pages together are in key order, and each directory comes
    /// once (in no promised order across pages); memory is bounded by the page.
    async fn list_dir_page(&self, prefix: &str, cursor: Option<&str>) -> Result<ListingPage>;
    /// Deleting an object that does not exist succeeds.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Where [`probe_create`] writes; the health probe lists the same prefix.
pub const PROBE_PREFIX: &str = "firn-probe/";

/// The first components of the keys the gateway writes for itself under its `[remote]`
/// prefix (the bucket layout of DESIGN.md, and the directory store's staging): a share's
/// files never go there, or a client could read or remove a volume's objects through it.
pub const GATEWAY_NAMES: &[&str] = &[
    "volumes",
    "chunks",
    "snapshots",
    "keys",
    "firn-probe",
    ".firn-staging",
];

/// Whether the store honours create-if-absent: creates `firn-probe/create-<random hex>`
/// twice and deletes it. `Ok(true)` when the second create was refused with
/// [`Error::Exists`], `Ok(false)` when the store took it (it overwrote: it ignores the
/// condition), an error when either create failed otherwise. The object is deleted whatever
/// the outcome; a failed delete leaves a few bytes under `firn-probe/`, which anyone may
/// delete.
///
/// Meant for a `remote` without retries (`Stack::probe`): a retried first create whose answer
/// was lost would find its own object and look like a refusal.
pub async fn probe_create(remote: &dyn Remote) -> Result<bool> {
    let key = format!("{PROBE_PREFIX}create-{:032x}", rand::random::<u128>());
    let mut ours = true;
    let outcome = async {
        remote
            .create(&key, Bytes::from_static(b"first create"), Meta::new())
            .await
            .inspect_err(|e| ours = !matches!(e, Error::Exists { .. }))?;
        match remote
            .create(&key, Bytes::from_static(b"second create"), Meta::new())
            .await
        {
            Ok(()) => Ok(false),
            Err(Error::Exists { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }
    .await;
    // Also after a failed first create: its object may be stored with the answer lost. Not
    // when the first create found an object: that one (128 random bits later) is not ours.
    if ours && let Err(e) = remote.delete(&key).await {
        tracing::warn!(
            "could not delete the probe object {key:?} (harmless; delete it at will): {e}"
        );
    }
    outcome
}
/// Whether `key` is a directory marker (see [`Remote`]).
pub fn is_marker(key: &str) -> bool {
    key.ends_with('/')
}

/// Rejects keys that could escape a prefix or that stores disagree on. A directory marker
/// (`a/b/`) is checked as the key it marks.
pub fn check_key(key: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::BadKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("empty key");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if key.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    if key
        .strip_suffix('/')
        .unwrap_or(key)
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return bad("empty, '.' or '..' path segment");
    }
    Ok(())
}

/// The key of the directory `prefix` names for [`Remote::list_dir`]: `""` for the root,
/// otherwise `prefix` without its trailing `/`, checked like any key.
pub(crate) fn dir_of(prefix: &str) -> Result<&str> {
    if prefix.is_empty() {
        return Ok(prefix);
    }
    let Some(dir) = prefix.strip_suffix('/').filter(|dir| !is_marker(dir)) else {
        return Err(Error::BadKey {
            key: prefix.to_string(),
            reason: "a one-level listing's prefix is empty (the root) or ends in '/'".to_string(),
        });
    };
    check_key(dir).map_err(|e| match e {
        Error::BadKey { reason, .. } => Error::BadKey {
            key: prefix.to_string(),
            reason,
        },
        other => other,
    })?;
    Ok(dir)
}

/// A range the object cannot supply: the caller's mistake, not worth a retry.
pub(crate) fn bad_range(key: &str, range: &Range<u64>, size: Option<u64>) -> Error {
    let size = match size {
        Some(size) => format!("the object's {size} bytes"),
        None => "any object (it ends before it starts)".to_string(),
    };
    Error::Permanent {
        op: "get_range",
        key: key.to_string(),
        message: format!("range {}..{} is outside {size}", range.start, range.end),
    }
}

/// The remote as configured: a backend with the standard wrappers stacked on it, outermost
/// first: metrics, retries, verification, fault injection (only for drills). The bandwidth
/// limiter is inside the backend, where its bytes move (see `limit`).
pub struct Stack {
    pub remote: Arc<dyn Remote>,
    /// The same stack without verification, for objects that verify themselves: every byte
    /// of them is under an AEAD tag that their reader checks (all that a cached volume
    /// writes). A BLAKE3 digest of such a body would only repeat that check, and its
    /// hashing (with the second read of the body it needs) was a third of firn's CPU per
    /// uploaded byte. Objects put here carry no `firn-blake3`, so a whole-object get through
    /// `remote` calls them corrupt: read them back through this one. Its reads are still
    /// checked for length, so a torn response is retried, not opened and called foreign.
    pub sealed: Arc<dyn Remote>,
    /// The backend (through the fault injector, when drilling) without retries: for health
    /// probes that must answer quickly (they move no object data, so no limit holds them).
    pub probe: Arc<dyn Remote>,
    pub limiter: Arc<limit::Limiter>,
    pub metrics: Arc<metered::RemoteMetrics>,
    pub faults: Option<Arc<faults::FaultPlan>>,
}

pub fn stack(
    backend: Arc<dyn Remote>,
    retry: retry::RetryPolicy,
    limiter: Arc<limit::Limiter>,
    metrics: Arc<metered::RemoteMetrics>,
    faults: Option<Arc<faults::FaultPlan>>,
) -> Stack {
    let mut remote = backend;
    if let Some(plan) = &faults {
        remote = Arc::new(faults::Faulty::new(remote, plan.clone()));
    }
    let probe = remote.clone();
    let outer = |inner: Arc<dyn Remote>| -> Arc<dyn Remote> {
        let retrying = Arc::new(retry::Retrying::new(inner, retry));
        Arc::new(metered::Metered::new(retrying, metrics.clone()))
    };
    let sealed = outer(Arc::new(verify::Verified::lengths(remote.clone())));
    let remote = outer(Arc::new(verify::Verified::new(remote)));
    Stack {
        remote,
        sealed,
        probe,
        limiter,
        metrics,
        faults,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_could_escape_are_refused() {
        for key in [
            "", "/", "/a", "a//", "a//b", "../a", "a/./b", "a/..", "../", "a\nb",
        ] {
            assert!(check_key(key).is_err(), "{key:?} accepted");
        }
        for key in [
            "a",
            "a/b",
            "a/",
            "a/b/",
            "chunks/0f/abc",
            "dir/.hidden",
            "x..y",
        ] {
            assert!(check_key(key).is_ok(), "{key:?} refused");
        }
    }

    #[test]
    fn a_one_level_prefix_is_the_root_or_a_directory() {
        assert_eq!(dir_of("").ok(), Some(""));
        assert_eq!(dir_of("a/").ok(), Some("a"));
        assert_eq!(dir_of("volumes/abc/").ok(), Some("volumes/abc"));
        for prefix in ["a", "/", "a//", "../", "a/b", "a/../", "/a/"] {
            assert!(
                matches!(dir_of(prefix), Err(Error::BadKey { ref key, .. }) if key == prefix),
                "{prefix:?} accepted"
            );
        }
    }
}
