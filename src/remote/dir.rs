//! A local directory as the bucket: the embedded default, and a stand-in for S3 in tests.
//!
//! Written here rather than taken from `object_store::local::LocalFileSystem` because that one
//! neither fsyncs (an acknowledged put could vanish in a power cut) nor stores user metadata.
//! Each object is a file at `<root>/<key>`; its metadata lives in `user.firn.*` extended
//! attributes of the file, so data and metadata are replaced together by one rename.
//!
//! Every path is resolved beneath the root one segment at a time with `O_NOFOLLOW`, from a
//! descriptor of the root opened once: a symlink planted in the bucket directory is refused,
//! never followed out of it. A put is staged in `.firn-staging/<pid>-<random>-<n>`, fsynced,
//! renamed into place, and then every directory it touched is fsynced: the one holding the
//! object and the parent of each directory the put created. A create is staged the same way
//! and put in place by a rename that refuses to replace (`renameat2` with `RENAME_NOREPLACE`;
//! where the file system lacks it, a hard link, which fails on an existing name, then an
//! unlink of the staging name): the check and the placing are one step, so of two creates
//! racing for a key (in this process or another) exactly one wins. At open, staging files whose
//! process is gone (or was an earlier process with this one's PID) are removed; those of other
//! live processes (another firn on the same directory) are left.
//!
//! A directory marker (`a/b/`) is the directory `a/b` with the extended attribute
//! `user.firn-marker` and its metadata in `user.firn.*` attributes of the directory. It keeps
//! the directory when the last object below it goes, as the marker object does in S3.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};
use xattr::FileExt;

use super::limit::{Direction, Limiter, SLICE};
use super::{
    Body, Error, Fetched, Listing, ListingPage, Meta, ObjectInfo, Remote, Result, Sink, Stored,
    check_key, dir_of, is_marker,
};

/// Where puts are staged before their rename; never listed, never a valid key.
const STAGING: &str = ".firn-staging";
/// Names in a page of `list_dir_page`. Each page reads the whole directory to choose its
/// names, so a level of n entries costs n²/DIR_PAGE name reads in all: larger than an S3
/// page, as a local directory gives its names cheaply.
const DIR_PAGE: usize = 10_000;
const XATTR_PREFIX: &str = "user.firn.";
/// Set on a directory that holds a directory marker (outside `XATTR_PREFIX`: not metadata).
const MARKER_XATTR: &str = "user.firn-marker";
/// A file name's limit on Linux file systems; each key segment is one file name.
const MAX_NAME_BYTES: usize = 255;
/// Objects are written and read in slices of this size, never whole.
const READ_SLICE: u64 = 4 << 20;

/// The `<n>` of staging names: one counter for the process, since the names share the
/// process's prefix whatever store (of however many opened on one directory) writes them.
static NEXT_STAGING: AtomicU64 = AtomicU64::new(0);

/// How a staged object takes its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A put: replaces whatever is there.
    Replace,
    /// A create: fails with `EEXIST` when anything is there.
    NoReplace,
}

/// Renames `from` to `to` unless `to` exists (`EEXIST`). `renameat2(RENAME_NOREPLACE)` where
/// the kernel and file system have it; otherwise `linkat`, which never replaces either, then
/// an unlink of the staging name (after a crash in between, the next open removes it, and the
/// object keeps its other name).
fn rename_noreplace(
    from_dir: impl AsFd + Copy,
    from: &str,
    to_dir: impl AsFd + Copy,
    to: &OsStr,
) -> nix::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    match nix::fcntl::renameat2(
        from_dir,
        from,
        to_dir,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        // The file system (or an old kernel) does not know the flag.
        Err(Errno::EINVAL | Errno::ENOSYS) => {}
        done => return done,
    }
    link_noreplace(from_dir, from, to_dir, to)
}

/// `rename_noreplace` by a hard link and an unlink.
fn link_noreplace(
    from_dir: impl AsFd + Copy,
    from: &str,
    to_dir: impl AsFd + Copy,
    to: &OsStr,
) -> nix::Result<()> {
    linkat(from_dir, from, to_dir, to, AtFlags::empty())?;
    let _ = unlinkat(from_dir, from, UnlinkatFlags::NoRemoveDir);
    Ok(())
}

/// Cheap to clone: clones share the root descriptor.
#[derive(Debug, Clone)]
pub struct DirStore {
    root_path: Arc<PathBuf>,
    /// Charged for every slice written or read, as the bytes move.
    limiter: Option<Arc<Limiter>>,
    root: Arc<OwnedFd>,
}

/// The async call a blocking write runs for. Once that call is dropped (its caller gave up:
/// an attempt past its time, an upload cancelled), the write stops waiting for the limiter
/// and does not place its object, so an abandoned put never lands after a later one. Only
/// the rename places an object, so a write past that point has already landed.
struct Caller(tokio::sync::oneshot::Receiver<()>);

impl Caller {
    /// The caller's end (to hold while it waits) and the write's.
    fn new() -> (tokio::sync::oneshot::Sender<()>, Caller) {
        let (alive, watch) = tokio::sync::oneshot::channel();
        (alive, Caller(watch))
    }

    fn gone(&mut self) -> bool {
        matches!(
            self.0.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        )
    }
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn io_from(errno: Errno) -> io::Error {
    io::Error::from_raw_os_error(errno as i32)
}

/// Opens `name` inside `dir` as a directory, refusing a symlink.
fn open_dir(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    openat(dir, name, dir_flags(), Mode::empty()).map_err(io_from)
}

/// This process's staging prefix, `<pid>-<random>`: the random part tells this process's
/// puts from those of an earlier one that had the same PID (a daemon that is PID 1 in its
/// container has it at every start).
fn staging_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| format!("{}-{:016x}", std::process::id(), rand::random::<u64>()))
}

/// Whether a staging file's writer may still be running: its name is `<pid>-<random>-<n>`,
/// and that process exists and, if it is this one, the name is this process's.
fn writer_alive(name: &str) -> bool {
    let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    if pid == std::process::id() as i32 {
        return name.starts_with(&format!("{}-", staging_prefix()));
    }
    // Signal 0 only checks for existence; EPERM means it exists under another user.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(Errno::ESRCH)
    )
}

impl DirStore {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<DirStore> {
        let root_path = root.into();
        std::fs::create_dir_all(root_path.join(STAGING))?;
        let root = nix::fcntl::open(
            &root_path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_from)?;
        let staging = open_dir(&root, OsStr::new(STAGING))?;
        // Leftovers of puts interrupted by a crash: never renamed, so never visible. Files of
        // a process still running (a second firn on this directory) are its puts in flight.
        let mut dir = nix::dir::Dir::from_fd(staging.try_clone()?).map_err(io_from)?;
        for entry in dir.iter() {
            let entry = entry.map_err(io_from)?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            if !writer_alive(name) {
                let _ = unlinkat(&staging, name, UnlinkatFlags::NoRemoveDir);
            }
        }
        Ok(DirStore {
            root_path: Arc::new(root_path),
            limiter: None,
            root: Arc::new(root),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// Bytes written and read pass `limiter` (the embedded default honours the bandwidth
    /// policy like a remote bucket does).
    pub fn with_limiter(mut self, limiter: Arc<Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Waits for the limiter; called on blocking threads, which run inside the runtime.
    /// With `caller`, stops waiting when the caller gives up.
    fn charge(
        &self,
        direction: Direction,
        bytes: usize,
        caller: Option<&mut Caller>,
    ) -> io::Result<()> {
        if let Some(limiter) = &self.limiter {
            let runtime = tokio::runtime::Handle::current();
            let acquire = limiter.acquire(direction, bytes as u64);
            let passed = match caller {
                Some(Caller(gone)) => runtime.block_on(async {
                    tokio::select! {
                        passed = acquire => passed,
                        _ = gone => false,
                    }
                }),
                None => runtime.block_on(acquire),
            };
            if !passed {
                return Err(io::Error::other(
                    "the gateway is stopping, or the caller gave up",
                ));
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`, slice by slice through the limiter.
    fn read_at(&self, file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut body = vec![0; len as usize];
        for (i, chunk) in body.chunks_mut(SLICE).enumerate() {
            self.charge(Direction::Download, chunk.len(), None)?;
            file.read_exact_at(chunk, offset + (i * SLICE) as u64)?;
        }
        Ok(body)
    }

    /// The key's segments, checked.
    fn segments<'k>(&self, key: &'k str) -> Result<Vec<&'k str>> {
        check_key(key)?;
        if is_marker(key) {
            return Err(Error::BadKey {
                key: key.to_string(),
                reason: "a directory marker has no content to read or write in place".into(),
            });
        }
        if key == STAGING || key.starts_with(&format!("{STAGING}/")) {
            return Err(Error::BadKey {
                key: key.to_string(),
                reason: format!("{STAGING} is reserved"),
            });
        }
        if let Some(long) = key.split('/').find(|s| s.len() > MAX_NAME_BYTES) {
            return Err(Error::BadKey {
                key: key.to_string(),
                reason: format!(
                    "segment of {} bytes; a directory store allows {MAX_NAME_BYTES} per segment",
                    long.len()
                ),
            });
        }
        Ok(key.split('/').collect())
    }

    /// Walks down `dirs` from the root without following links: the descriptor of the last
    /// one. A symlink on the way is `ELOOP` or `ENOTDIR`.
    fn walk(&self, dirs: &[&str]) -> io::Result<OwnedFd> {
        let mut fd = self.root.try_clone()?;
        for segment in dirs {
            fd = open_dir(&fd, OsStr::new(segment))?;
        }
        Ok(fd)
    }

    /// Like `walk`, creating what is missing; fsyncs the parent of every directory created.
    fn walk_creating(&self, dirs: &[&str]) -> io::Result<OwnedFd> {
        let mut fd = self.root.try_clone()?;
        for segment in dirs {
            let name = OsStr::new(segment);
            let next = match open_dir(&fd, name) {
                Ok(next) => next,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match mkdirat(&fd, name, Mode::from_bits_truncate(0o700)) {
                        Ok(()) => {
                            // The new entry is durable only once its parent is synced.
                            nix::unistd::fsync(&fd).map_err(io_from)?;
                        }
                        Err(Errno::EEXIST) => {} // made by a concurrent put
                        Err(e) => return Err(io_from(e)),
                    }
                    open_dir(&fd, name)?
                }
                Err(e) => return Err(e),
            };
            fd = next;
        }
        Ok(fd)
    }

    /// The file of an object, opened read-only without following a link at any step.
    fn open_object(&self, segments: &[&str]) -> io::Result<File> {
        let (leaf, dirs) = segments.split_last().ok_or(io::ErrorKind::InvalidInput)?;
        let dir = self.walk(dirs)?;
        let fd = openat(
            &dir,
            OsStr::new(leaf),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(io_from)?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            // A directory or a device where an object should be: not an object.
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(file)
    }

    fn put_blocking(
        &self,
        key: &str,
        body: &dyn Body,
        meta: &Meta,
        caller: Option<Caller>,
    ) -> Result<Stored> {
        self.write_blocking("put", key, body, meta, Place::Replace, caller)
    }

    fn create_blocking(
        &self,
        key: &str,
        body: &dyn Body,
        meta: &Meta,
        caller: Option<Caller>,
    ) -> Result<()> {
        self.write_blocking("create", key, body, meta, Place::NoReplace, caller)
            .map(|_| ())
    }

    /// Reads the body a slice at a time (each through the limiter) into a staging file, then
    /// gives it its name as `place` says, unless `caller` gave up meanwhile. Its identity (as
    /// listings show it) is taken after the rename, which changes the file's change time.
    fn write_blocking(
        &self,
        op: &'static str,
        key: &str,
        body: &dyn Body,
        meta: &Meta,
        place: Place,
        mut caller: Option<Caller>,
    ) -> Result<Stored> {
        let segments = self.segments(key)?;
        let io_err = |e: io::Error| local_error(op, key, e);
        let n = NEXT_STAGING.fetch_add(1, Ordering::Relaxed);
        let staged = format!("{}-{n}", staging_prefix());
        let staging = open_dir(&*self.root, OsStr::new(STAGING)).map_err(io_err)?;
        let runtime = tokio::runtime::Handle::current();
        let result = (|| {
            let fd = openat(
                &staging,
                staged.as_str(),
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                // Sealed, but still nobody else's business.
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| io_err(io_from(e)))?;
            let mut file = File::from(fd);
            let len = body.len();
            let mut offset = 0;
            while offset < len {
                let end = (offset + READ_SLICE).min(len);
                let bytes = runtime.block_on(body.read(offset..end))?;
                for chunk in bytes.chunks(SLICE) {
                    self.charge(Direction::Upload, chunk.len(), caller.as_mut())
                        .map_err(io_err)?;
                    file.write_all(chunk).map_err(io_err)?;
                }
                offset = end;
            }
            let mut finish = || {
                for (name, value) in meta {
                    file.set_xattr(format!("{XATTR_PREFIX}{name}"), value.as_bytes())?;
                }
                file.sync_all()?;
                if caller.as_mut().is_some_and(Caller::gone) {
                    return Err(io::Error::other("the caller gave up"));
                }
                let (leaf, dirs) = segments.split_last().ok_or(io::ErrorKind::InvalidInput)?;
                let parent = self.walk_creating(dirs)?;
                let leaf = OsStr::new(leaf);
                let placed = match place {
                    Place::Replace => renameat(&staging, staged.as_str(), &parent, leaf),
                    Place::NoReplace => rename_noreplace(&staging, staged.as_str(), &parent, leaf),
                };
                match placed {
                    Ok(()) => {}
                    Err(Errno::EEXIST) => return Ok(Err(taken(&parent, leaf, key))),
                    Err(e) => return Err(io_from(e)),
                }
                nix::unistd::fsync(&parent).map_err(io_from)?;
                let stat = nix::sys::stat::fstat(&file).map_err(io_from)?;
                Ok(Ok(Stored {
                    etag: Some(identity(&stat)),
                }))
            };
            finish().map_err(io_err)?
        })();
        if result.is_err() {
            let _ = unlinkat(&staging, staged.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// The object's open file, size and metadata: later reads see this version, whatever
    /// renames happen meanwhile.
    fn open_blocking(&self, key: &str) -> Result<(File, u64, Meta)> {
        let segments = self.segments(key)?;
        let io_err = |e: io::Error| local_error("get", key, e);
        let file = self.open_object(&segments).map_err(io_err)?;
        let size = file.metadata().map_err(io_err)?.len();
        let meta = read_meta(&file).map_err(io_err)?;
        Ok((file, size, meta))
    }

    fn get_range_blocking(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes> {
        let segments = self.segments(key)?;
        let io_err = |e: io::Error| local_error("get_range", key, e);
        let file = self.open_object(&segments).map_err(io_err)?;
        // A put replaces the file (a rename): the open one is one version throughout.
        if let Some(etag) = etag
            && file_identity(&file).map_err(io_err)? != etag
        {
            return Err(Error::Changed {
                key: key.to_string(),
            });
        }
        let size = file.metadata().map_err(io_err)?.len();
        let range = check_range(key, range, size)?;
        let body = self
            .read_at(&file, range.start, range.end - range.start)
            .map_err(io_err)?;
        Ok(Bytes::from(body))
    }

    fn head_blocking(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let segments = self.segments(key)?;
        match self.open_object(&segments) {
            Ok(file) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: file
                    .metadata()
                    .map_err(|e| local_error("head", key, e))?
                    .len(),
                meta: read_meta(&file).map_err(|e| local_error("head", key, e))?,
                etag: Some(file_identity(&file).map_err(|e| local_error("head", key, e))?),
            })),
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(local_error("head", key, e)),
        }
    }

    /// The directory `dir` (a key prefix without its last `/`, or "" for the root), opened
    /// beneath the root without following links. The outer error is a bad key; the inner
    /// one what opening found (`gone` when nothing is stored there).
    fn open_prefix_dir(&self, dir: &str) -> Result<io::Result<OwnedFd>> {
        if dir.is_empty() {
            return Ok(self.root.try_clone());
        }
        let segments = self.segments(dir)?;
        Ok(self.walk(&segments))
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Only walk the directory the prefix points into, not the whole bucket.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = match self.open_prefix_dir(dir_part)? {
            Ok(fd) => fd,
            Err(e) if gone(&e) => return Ok(Vec::new()),
            Err(e) => return Err(local_error("list", prefix, e)),
        };
        let mut found = Vec::new();
        let mut pending = vec![(start, dir_part.to_string())];
        while let Some((fd, path)) = pending.pop() {
            let listing =
                nix::dir::Dir::from_fd(fd.try_clone().map_err(|e| local_error("list", prefix, e))?);
            let mut listing = listing.map_err(|e| local_error("list", prefix, io_from(e)))?;
            for entry in listing.iter() {
                let entry = entry.map_err(|e| local_error("list", prefix, io_from(e)))?;
                let name: &CStr = entry.file_name();
                let Ok(name) = name.to_str() else { continue };
                if name == "." || name == ".." || (path.is_empty() && name == STAGING) {
                    continue;
                }
                let key = if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}/{name}")
                };
                // Never follow: a symlink is neither an object nor a directory of objects.
                let stat = match fstatat(&fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(stat) => stat,
                    Err(Errno::ENOENT) => continue, // deleted while we looked
                    Err(e) => return Err(local_error("list", &key, io_from(e))),
                };
                let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
                if kind == SFlag::S_IFDIR {
                    match open_dir(&fd, OsStr::new(name)) {
                        Ok(sub) => {
                            let marker = format!("{key}/");
                            let marked = sub
                                .try_clone()
                                .and_then(|fd| has_marker(&File::from(fd)))
                                .map_err(|e| local_error("list", &marker, e))?;
                            if marked && marker.starts_with(prefix) {
                                found.push(ObjectInfo {
                                    key: marker,
                                    size: 0,
                                    meta: Meta::new(),
                                    etag: None,
                                });
                            }
                            pending.push((sub, key));
                        }
                        Err(e) if gone(&e) => {}
                        Err(e) => return Err(local_error("list", &key, e)),
                    }
                } else if kind == SFlag::S_IFREG && key.starts_with(prefix) {
                    found.push(ObjectInfo {
                        key,
                        size: stat.st_size as u64,
                        meta: Meta::new(),
                        etag: Some(identity(&stat)),
                    });
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// One readdir of the directory `prefix` names, resolved beneath the root without
    /// following links as `list` resolves its start. Subdirectories are reported, not
    /// entered; links, the staging directory and anything neither a file nor a directory are
    /// skipped, as `list` skips them.
    fn list_dir_blocking(&self, prefix: &str) -> Result<Listing> {
        let mut found = Listing::default();
        self.list_level(prefix, None, usize::MAX, &mut found)?;
        Ok(found)
    }

    /// The page of level `prefix` after name `cursor`: its `DIR_PAGE` smallest names
    /// (objects in key order across pages, since their keys are the prefix and the name),
    /// chosen in one pass over the directory, so memory stays bounded by the page.
    fn list_dir_page_blocking(&self, prefix: &str, cursor: Option<&str>) -> Result<ListingPage> {
        let mut listing = Listing::default();
        let next = self.list_level(prefix, cursor, DIR_PAGE, &mut listing)?;
        Ok(ListingPage { listing, next })
    }

    /// Fills `found` with the entries of level `prefix` among the `most` smallest names
    /// after `cursor`; the last of those names if more are left.
    fn list_level(
        &self,
        prefix: &str,
        cursor: Option<&str>,
        most: usize,
        found: &mut Listing,
    ) -> Result<Option<String>> {
        let dir = dir_of(prefix)?;
        let fd = match self.open_prefix_dir(dir)? {
            Ok(fd) => fd,
            // Nothing stored under it (or a file or a link where the directory would be).
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(local_error("list", prefix, e)),
        };
        let listing =
            nix::dir::Dir::from_fd(fd.try_clone().map_err(|e| local_error("list", prefix, e))?);
        let mut listing = listing.map_err(|e| local_error("list", prefix, io_from(e)))?;
        let mut names = std::collections::BTreeSet::new();
        let mut more = false;
        for entry in listing.iter() {
            let entry = entry.map_err(|e| local_error("list", prefix, io_from(e)))?;
            let name: &CStr = entry.file_name();
            let Ok(name) = name.to_str() else { continue };
            if name == "." || name == ".." || (dir.is_empty() && name == STAGING) {
                continue;
            }
            if cursor.is_some_and(|cursor| name <= cursor) {
                continue;
            }
            if names.len() == most {
                if names
                    .last()
                    .is_some_and(|last: &String| name > last.as_str())
                {
                    more = true;
                    continue;
                }
                names.pop_last();
                more = true;
            }
            names.insert(name.to_string());
        }
        let next = more.then(|| names.last().cloned()).flatten();
        for name in names {
            let key = format!("{prefix}{name}");
            // Never follow: a symlink is neither an object nor a directory of objects.
            let stat = match fstatat(&fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::ENOENT) => continue, // deleted while we looked
                Err(e) => return Err(local_error("list", &key, io_from(e))),
            };
            let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFDIR {
                found.dirs.push(key + "/");
            } else if kind == SFlag::S_IFREG {
                found.objects.push(ObjectInfo {
                    key,
                    size: stat.st_size as u64,
                    meta: Meta::new(),
                    etag: Some(identity(&stat)),
                });
            }
        }
        // In name order already; a directory's key has its `/`.
        found.dirs.sort();
        Ok(next)
    }

    /// Makes the directory of marker `key` (and those above it) and marks it, with `meta`
    /// replacing what an earlier marker had.
    fn put_marker_blocking(&self, key: &str, body_len: u64, meta: &Meta) -> Result<()> {
        if body_len != 0 {
            return Err(Error::BadKey {
                key: key.to_string(),
                reason: "a directory marker's body must be empty".into(),
            });
        }
        let segments = self.segments(&key[..key.len() - 1])?;
        let io_err = |e: io::Error| local_error("put", key, e);
        let dir = File::from(self.walk_creating(&segments).map_err(io_err)?);
        for name in dir.list_xattr().map_err(io_err)? {
            if name.to_str().is_some_and(|n| n.starts_with(XATTR_PREFIX)) {
                dir.remove_xattr(&name).map_err(io_err)?;
            }
        }
        for (name, value) in meta {
            dir.set_xattr(format!("{XATTR_PREFIX}{name}"), value.as_bytes())
                .map_err(io_err)?;
        }
        dir.set_xattr(MARKER_XATTR, b"").map_err(io_err)?;
        dir.sync_all().map_err(io_err)
    }

    fn head_marker_blocking(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let segments = self.segments(&key[..key.len() - 1])?;
        let io_err = |e: io::Error| local_error("head", key, e);
        let dir = match self.walk(&segments) {
            Ok(fd) => File::from(fd),
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        if !has_marker(&dir).map_err(io_err)? {
            return Ok(None);
        }
        Ok(Some(ObjectInfo {
            key: key.to_string(),
            size: 0,
            meta: read_meta(&dir).map_err(io_err)?,
            etag: None,
        }))
    }

    fn delete_blocking(&self, key: &str) -> Result<()> {
        if is_marker(key) {
            return self.delete_marker_blocking(key);
        }
        let segments = self.segments(key)?;
        let (leaf, dirs) = segments.split_last().ok_or_else(|| Error::BadKey {
            key: key.to_string(),
            reason: "empty key".to_string(),
        })?;
        // Keep each directory's descriptor, to prune the ones the delete leaves empty.
        let mut fds = vec![
            self.root
                .try_clone()
                .map_err(|e| local_error("delete", key, e))?,
        ];
        for segment in dirs {
            match open_dir(&fds[fds.len() - 1], OsStr::new(segment)) {
                Ok(fd) => fds.push(fd),
                Err(e) if gone(&e) => return Ok(()),
                Err(e) => return Err(local_error("delete", key, e)),
            }
        }
        let parent = &fds[fds.len() - 1];
        // unlinkat removes a symlink itself, never its target.
        match unlinkat(parent, OsStr::new(leaf), UnlinkatFlags::NoRemoveDir) {
            Ok(()) => {}
            // No object has the key: as S3, deleting it is done. (A directory holds other
            // objects' keys, and no object of its own.)
            Err(Errno::ENOENT | Errno::EISDIR) => return Ok(()),
            Err(e) => return Err(local_error("delete", key, io_from(e))),
        }
        let _ = nix::unistd::fsync(parent);
        prune(&fds, dirs);
        Ok(())
    }

    /// Unmarks the directory of marker `key`, and removes it (and those above it) if nothing
    /// is left in it.
    fn delete_marker_blocking(&self, key: &str) -> Result<()> {
        let dirs = self.segments(&key[..key.len() - 1])?;
        let io_err = |e: io::Error| local_error("delete", key, e);
        let mut fds = vec![self.root.try_clone().map_err(io_err)?];
        for segment in &dirs {
            match open_dir(&fds[fds.len() - 1], OsStr::new(segment)) {
                Ok(fd) => fds.push(fd),
                Err(e) if gone(&e) => return Ok(()),
                Err(e) => return Err(io_err(e)),
            }
        }
        let dir = File::from(
            fds.pop()
                .expect("the marked directory")
                .try_clone()
                .map_err(io_err)?,
        );
        if !has_marker(&dir).map_err(io_err)? {
            return Ok(());
        }
        for name in dir.list_xattr().map_err(io_err)? {
            if name.to_str().is_some_and(|n| n.starts_with(XATTR_PREFIX)) {
                dir.remove_xattr(&name).map_err(io_err)?;
            }
        }
        dir.remove_xattr(MARKER_XATTR).map_err(io_err)?;
        dir.sync_all().map_err(io_err)?;
        fds.push(dir.into());
        prune(&fds, &dirs);
        Ok(())
    }
}

/// Why a create found `leaf` taken: an object is `Exists`; a link or a directory in the way
/// is not an object, and no create can succeed until someone moves it.
fn taken(parent: &OwnedFd, leaf: &OsStr, key: &str) -> Error {
    let in_the_way = |what: &str| Error::Permanent {
        op: "create",
        key: key.to_string(),
        message: format!(
            "a {what} in the bucket directory is in the way; the directory store never follows \
             or replaces one on a create: move it"
        ),
    };
    match fstatat(parent, leaf, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFLNK => in_the_way("symbolic link"),
            SFlag::S_IFDIR => in_the_way("directory"),
            SFlag::S_IFREG => Error::Exists {
                key: key.to_string(),
            },
            _ => in_the_way("special file"),
        },
        // Deleted since: it existed when the create was refused.
        Err(_) => Error::Exists {
            key: key.to_string(),
        },
    }
}

/// Removes the directories a delete left empty, deepest first, so the tree mirrors the key
/// space: `fds[i]` is the descriptor of `dirs[i]`'s parent, and `fds[i + 1]` of `dirs[i]`.
/// Stops at the first that is not empty or that holds a directory marker.
fn prune(fds: &[OwnedFd], dirs: &[&str]) {
    for depth in (0..dirs.len()).rev() {
        let marked = fds
            .get(depth + 1)
            .and_then(|fd| fd.try_clone().ok())
            .is_none_or(|fd| has_marker(&File::from(fd)).unwrap_or(true));
        if marked
            || unlinkat(
                &fds[depth],
                OsStr::new(dirs[depth]),
                UnlinkatFlags::RemoveDir,
            )
            .is_err()
        {
            break;
        }
    }
}

/// What the directory store offers as an ETag: the file's inode, change time and size, which
/// a put (a new file renamed into place) always changes.
/// The identity (`identity`) of an open object file.
fn file_identity(file: &File) -> io::Result<String> {
    Ok(identity(&nix::sys::stat::fstat(file).map_err(io_from)?))
}

fn identity(stat: &nix::sys::stat::FileStat) -> String {
    format!(
        "{:x}-{:x}.{:x}-{:x}",
        stat.st_ino, stat.st_ctime, stat.st_ctime_nsec, stat.st_size
    )
}

fn has_marker(dir: &File) -> io::Result<bool> {
    Ok(dir.get_xattr(MARKER_XATTR)?.is_some())
}

fn read_meta(file: &File) -> io::Result<Meta> {
    let mut meta = Meta::new();
    for name in file.list_xattr()? {
        let Some(name) = name.to_str().and_then(|n| n.strip_prefix(XATTR_PREFIX)) else {
            continue;
        };
        if let Some(value) = file.get_xattr(format!("{XATTR_PREFIX}{name}"))? {
            meta.insert(
                name.to_string(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    Ok(meta)
}

/// Not there, as far as a key is concerned: missing, or a link or file where a directory
/// should be.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ENOENT | Errno::ENOTDIR)
    ) || e.kind() == io::ErrorKind::NotFound
}

/// The range as asked, or an error when the object cannot supply every byte of it.
pub(super) fn check_range(key: &str, range: Range<u64>, size: u64) -> Result<Range<u64>> {
    if range.start > range.end || range.end > size {
        return Err(super::bad_range(key, &range, Some(size)));
    }
    Ok(range)
}

fn local_error(op: &'static str, key: &str, e: io::Error) -> Error {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOTDIR) if op == "put" || op == "create" => Error::Permanent {
            op,
            key: key.to_string(),
            message: "a file in the bucket directory is in the way of a directory this key \
                      needs: move it"
                .to_string(),
        },
        Some(Errno::ENOENT | Errno::ENOTDIR) => Error::NotFound {
            key: key.to_string(),
        },
        Some(Errno::ELOOP) => Error::Permanent {
            op,
            key: key.to_string(),
            message: "a symbolic link in the bucket directory is in the way; the directory \
                      store never follows links: remove it"
                .to_string(),
        },
        _ if e.kind() == io::ErrorKind::NotFound => Error::NotFound {
            key: key.to_string(),
        },
        _ => Error::Permanent {
            op,
            key: key.to_string(),
            message: e.to_string(),
        },
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        // The runtime is shutting down: the call never ran, or its outcome is lost.
        Err(e) if e.is_cancelled() => Err(Error::Transient {
            op: "local",
            key: String::new(),
            message: "the daemon is stopping".into(),
        }),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[async_trait]
impl Remote for DirStore {
    async fn put_body(&self, key: &str, body: Arc<dyn Body>, meta: Meta) -> Result<Stored> {
        let (this, key) = (self.clone(), key.to_string());
        if is_marker(&key) {
            blocking(move || this.put_marker_blocking(&key, body.len(), &meta)).await?;
            return Ok(Stored::default());
        }
        // Held until the write returns: dropped with this call if its caller gives up.
        let (_alive, caller) = Caller::new();
        blocking(move || this.put_blocking(&key, &*body, &meta, Some(caller))).await
    }

    async fn create(&self, key: &str, body: Bytes, meta: Meta) -> Result<()> {
        let (this, key) = (self.clone(), key.to_string());
        let (_alive, caller) = Caller::new();
        blocking(move || this.create_blocking(&key, &body, &meta, Some(caller))).await
    }

    async fn get_to(&self, key: &str, sink: &dyn Sink) -> Result<Fetched> {
        let (this, owned_key) = (self.clone(), key.to_string());
        let (file, size, meta) = blocking(move || this.open_blocking(&owned_key)).await?;
        let file = Arc::new(file);
        if size == 0 {
            // Even an empty object starts the sink over (a retry after a longer attempt).
            sink.write(0, Bytes::new()).await?;
        }
        let mut offset = 0;
        while offset < size {
            let end = (offset + READ_SLICE).min(size);
            let (this, file, owned_key) = (self.clone(), file.clone(), key.to_string());
            let bytes = blocking(move || {
                this.read_at(&file, offset, end - offset)
                    .map_err(|e| local_error("get", &owned_key, e))
            })
            .await?;
            sink.write(offset, Bytes::from(bytes)).await?;
            offset = end;
        }
        Ok(Fetched { size, meta })
    }

    async fn get_range_if(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes> {
        let (this, key, etag) = (self.clone(), key.to_string(), etag.map(str::to_string));
        blocking(move || this.get_range_blocking(&key, range, etag.as_deref())).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let (this, key) = (self.clone(), key.to_string());
        if is_marker(&key) {
            return blocking(move || this.head_marker_blocking(&key)).await;
        }
        blocking(move || this.head_blocking(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn list_dir(&self, prefix: &str) -> Result<Listing> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        blocking(move || this.list_dir_blocking(&prefix)).await
    }

    async fn list_dir_page(&self, prefix: &str, cursor: Option<&str>) -> Result<ListingPage> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        let cursor = cursor.map(str::to_string);
        blocking(move || this.list_dir_page_blocking(&prefix, cursor.as_deref())).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.delete_blocking(&key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(value: &str) -> Meta {
        Meta::from([("who".to_string(), value.to_string())])
    }

    fn staging_files(root: &Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(root.join(STAGING))
            .expect("staging dir")
            .map(|e| e.expect("entry").file_name())
            .collect()
    }

    #[tokio::test]
    async fn deleting_a_key_that_names_a_directory_deletes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("open");
        store
            .put("a/b", Bytes::from_static(b"x"), Meta::new())
            .await
            .expect("put");
        store
            .delete("a")
            .await
            .expect("no object at \"a\": nothing to do");
        assert_eq!(store.get("a/b").await.expect("a/b stays").body, &b"x"[..]);
    }

    #[tokio::test]
    async fn a_second_create_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("open");
        store
            .create("commits/a/0001", Bytes::from_static(b"first"), meta("one"))
            .await
            .expect("first create");
        let second = store
            .create(
                "commits/a/0001",
                Bytes::from_static(b"second!"),
                meta("two"),
            )
            .await;
        assert!(
            matches!(&second, Err(Error::Exists { key }) if key == "commits/a/0001"),
            "{second:?}"
        );
        assert!(!second.unwrap_err().is_retryable());
        let object = store.get("commits/a/0001").await.expect("get");
        assert_eq!(object.body, Bytes::from_static(b"first"));
        assert_eq!(object.meta, meta("one"));
        assert!(
            staging_files(dir.path()).is_empty(),
            "the refused create left its staging file"
        );
        // A put still replaces, and a create after a delete succeeds.
        store
            .put("commits/a/0001", Bytes::from_static(b"put"), Meta::new())
            .await
            .expect("put");
        store.delete("commits/a/0001").await.expect("delete");
        store
            .create("commits/a/0001", Bytes::from_static(b"again"), Meta::new())
            .await
            .expect("create after delete");
    }

    #[test]
    fn of_eight_racing_creates_exactly_one_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        for round in 0..20 {
            let key = format!("leases/vol-{round}");
            let start = Arc::new(std::sync::Barrier::new(8));
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    // A store each, as separate gateways would open it.
                    let store = DirStore::open(dir.path()).expect("open");
                    let (start, handle, key) =
                        (start.clone(), runtime.handle().clone(), key.clone());
                    std::thread::spawn(move || {
                        let _runtime = handle.enter();
                        let body = Bytes::from(format!("writer {i}"));
                        start.wait();
                        store
                            .create_blocking(&key, &body, &meta(&i.to_string()), None)
                            .map(|()| i)
                    })
                })
                .collect();
            let outcomes: Vec<Result<usize>> = threads
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect();
            let winners: Vec<usize> = outcomes
                .iter()
                .filter_map(|o| o.as_ref().ok().copied())
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
            for outcome in &outcomes {
                assert!(
                    matches!(outcome, Ok(_) | Err(Error::Exists { .. })),
                    "round {round}: {outcome:?}"
                );
            }
            let object = runtime.block_on(DirStore::open(dir.path()).expect("open").get(&key));
            let object = object.expect("get");
            assert_eq!(object.body, Bytes::from(format!("writer {}", winners[0])));
            assert_eq!(object.meta, meta(&winners[0].to_string()));
        }
        assert!(staging_files(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_create_never_replaces_a_link_or_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("open");
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).expect("symlink");
        std::fs::create_dir_all(dir.path().join("sub/dir")).expect("mkdir");
        for key in ["link", "sub/dir"] {
            let outcome = store
                .create(key, Bytes::from_static(b"x"), Meta::new())
                .await;
            assert!(
                matches!(&outcome, Err(Error::Permanent { message, .. }) if message.contains("in the way")),
                "{key}: {outcome:?}"
            );
        }
        assert!(dir.path().join("link").is_symlink());
        assert!(staging_files(dir.path()).is_empty());
    }

    /// A put whose caller gives up while it waits for the limiter (a paused upload) never
    /// lands, even once uploads go on (where it could overwrite a later put of the key).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_put_never_lands() {
        use crate::remote::limit::{Limiter, Policy, Rate};
        let dir = tempfile::tempdir().expect("tempdir");
        let limiter = Arc::new(Limiter::new(Policy {
            upload: Rate::Paused,
            ..Policy::default()
        }));
        let store = DirStore::open(dir.path())
            .expect("open")
            .with_limiter(limiter.clone());
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            store.put("k", Bytes::from_static(b"old"), Meta::new()),
        )
        .await;
        assert!(waiting.is_err(), "a paused put went through: {waiting:?}");
        limiter.set_policy(Policy::default());
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!dir.path().join("k").exists(), "the abandoned put landed");
        assert!(staging_files(dir.path()).is_empty());
    }

    /// A listing without its ETags (each checked to be there).
    fn plain(mut listing: Listing) -> Listing {
        for object in &mut listing.objects {
            assert!(object.etag.take().is_some(), "no ETag for {}", object.key);
        }
        listing
    }

    #[tokio::test]
    async fn a_one_level_listing_shows_objects_and_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("open");
        for key in ["a/b/c", "a/d", "e"] {
            store
                .put(key, Bytes::from(key), Meta::new())
                .await
                .expect("put");
        }
        let object = |key: &str| ObjectInfo {
            key: key.to_string(),
            size: key.len() as u64,
            meta: Meta::new(),
            etag: None,
        };
        assert_eq!(
            plain(store.list_dir("").await.expect("list root")),
            Listing {
                dirs: vec!["a/".to_string()],
                objects: vec![object("e")],
            },
            "the staging directory is not listed"
        );
        assert_eq!(
            plain(store.list_dir("a/").await.expect("list a/")),
            Listing {
                dirs: vec!["a/b/".to_string()],
                objects: vec![object("a/d")],
            }
        );
        assert_eq!(
            plain(store.list_dir("a/b/").await.expect("list a/b/")),
            Listing {
                dirs: vec![],
                objects: vec![object("a/b/c")],
            }
        );
        for missing in ["nothing/", "a/nothing/here/", "e/"] {
            assert_eq!(
                store
                    .list_dir(missing)
                    .await
                    .expect("list a missing prefix"),
                Listing::default(),
                "{missing}"
            );
        }
        // Links and special files are neither objects nor directories.
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("a/link"))
            .expect("symlink");
        std::os::unix::fs::symlink(dir.path().join("e"), dir.path().join("a/filelink"))
            .expect("symlink");
        nix::unistd::mkfifo(&dir.path().join("a/fifo"), Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        assert_eq!(
            plain(store.list_dir("a/").await.expect("list a/")).objects,
            vec![object("a/d")]
        );
        assert_eq!(
            store
                .list_dir("a/link/")
                .await
                .expect("list through a link"),
            Listing::default()
        );
        for bad in ["a", "a//", "../", ".firn-staging/"] {
            assert!(
                matches!(store.list_dir(bad).await, Err(Error::BadKey { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn the_link_fallback_never_replaces_either() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("staged-1"), "new").expect("write");
        std::fs::write(dir.path().join("staged-2"), "newer").expect("write");
        std::fs::write(dir.path().join("taken"), "old").expect("write");
        let fd = nix::fcntl::open(dir.path(), dir_flags(), Mode::empty()).expect("open");
        assert_eq!(
            link_noreplace(&fd, "staged-1", &fd, OsStr::new("taken")),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("taken")).expect("read"),
            "old"
        );
        link_noreplace(&fd, "staged-2", &fd, OsStr::new("free")).expect("link");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("free")).expect("read"),
            "newer"
        );
        assert!(
            !dir.path().join("staged-2").exists(),
            "the staging name stays"
        );
    }

    /// A level read a few names at a time gives what one listing gives: every object once,
    /// in key order across pages, and every directory once.
    #[tokio::test]
    async fn a_level_listed_in_pages_is_the_level_listed_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("open");
        for key in [
            "l/b", "l/a!", "l/a/x", "l/c/y/z", "l/a.d", "l/e", "l/d", "other",
        ] {
            store
                .put(key, Bytes::from_static(b"x"), Meta::new())
                .await
                .expect("put");
        }
        let whole = store.list_dir("l/").await.expect("list");
        for most in 1..=7 {
            let mut paged = Listing::default();
            let mut cursor = None;
            loop {
                let mut page = Listing::default();
                let next = store
                    .list_level("l/", cursor.as_deref(), most, &mut page)
                    .expect("page");
                assert!(page.objects.len() + page.dirs.len() <= most);
                paged.objects.extend(page.objects);
                paged.dirs.extend(page.dirs);
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            paged.dirs.sort();
            let keys = |l: &Listing| l.objects.iter().map(|o| o.key.clone()).collect::<Vec<_>>();
            assert_eq!(keys(&paged), keys(&whole), "{most} a page");
            assert_eq!(paged.dirs, whole.dirs, "{most} a page");
        }
        assert_eq!(
            whole
                .objects
                .iter()
                .map(|o| o.key.as_str())
                .collect::<Vec<_>>(),
            ["l/a!", "l/a.d", "l/b", "l/d", "l/e"]
        );
        assert_eq!(whole.dirs, ["l/a/", "l/c/"]);
        let page = store.list_dir_page("l/", None).await.expect("page");
        assert_eq!((page.listing.objects.len(), page.next), (5, None));
    }
}
