//! A file system that can lose power: a FUSE passthrough over a backing directory that keeps
//! every file's unsynced changes in its own memory, the way a disk's page cache does, and
//! loses them when the power is cut. Tests put a daemon's data directory on it, kill the
//! daemon, cut the power and start again, so a missing fsync shows as lost data (a kill -9
//! alone leaves the kernel's page cache, and so every unsynced write, intact).
//!
//! What it keeps in memory, per file, until `fsync`/`fdatasync` of that file: written bytes,
//! size changes (truncate, writes past the end, fallocate) and hole punches (fallocate
//! PUNCH_HOLE and ZERO_RANGE), as 4 KiB pages over the backing file. An fsync writes them to
//! the backing file and fsyncs it. A power cut ([`PowerLossMount::power_cut`]) unmounts and
//! then drops those changes: all of them, or (with a seed) a random half of the pages and
//! size changes, as a disk that had written some of its cache back would; then it mounts
//! again over the backing directory.
//!
//! Directory operations (create, mkdir, rename, unlink, rmdir) are done on the backing
//! directory at once, and remembered until they are durable: a removed entry waits in a
//! hidden trash folder. One is durable once every directory whose entries it changed was
//! fsynced; a creation or rename is also durable once the file itself (or anything below a
//! created directory) is fsynced, as ext4 and XFS commit a new name with the file's fsync.
//! A power cut undoes the rest, newest first (`LoseSome` keeps a random oldest part of them,
//! as a journal commits in order). Metadata (mode, owner, times) passes straight through and
//! is durable at once, and so are extended attributes (ext4 and XFS make a file's attributes
//! durable with the file's fsync; a test relying on that fsyncs anyway). Unix sockets,
//! symlinks and hard links are not supported (put sockets outside the mount). SEEK_DATA/SEEK_HOLE get the kernel's fallback
//! (the whole file is data). File locks are the kernel's, local to the mount. Memory grows
//! with the unsynced pages: it is for tests.
//!
//! [`PowerLossMount::fail_next_fsync`] injects a write-back error: the next fsync of a file
//! of that name returns EIO and its unsynced pages are dropped, as the kernel does when it
//! cannot write a dirty page back (it marks the page clean and reports the error once).
//!
//! Use: `PowerLossMount::mount(backing, mountpoint)` (it serves from threads of the test
//! process), put the daemon's `data_dir` under `path()`, work, kill -9 the daemon,
//! `power_cut(..)`, start the daemon again and check. Needs /dev/fuse and fusermount3
//! (Debian's fuse3; scripts/test installs it). tests/powerloss.rs shows it for local volumes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};
use nix::libc;
use rand::{Rng, SeedableRng};

const PAGE: u64 = 4096;
/// Where removed files wait, in the backing directory, until their removal is durable.
const TRASH: &str = ".powerloss-trash";
/// Attributes and entries are never cached by the kernel: sizes change under it.
const TTL: Duration = Duration::ZERO;

/// What a power cut keeps of the changes no fsync covered.
#[derive(Debug, Clone, Copy)]
pub enum PowerCut {
    /// Nothing: every unsynced change is lost.
    LoseAll,
    /// Each unsynced page, and each file's size change, reached the disk or not, at random
    /// (probability 1/2), and a random oldest part of the pending directory operations did,
    /// from this seed.
    LoseSome(u64),
}

/// What a power cut dropped.
#[derive(Debug, Default, Clone, Copy)]
pub struct CutReport {
    /// Files with unsynced changes.
    pub files: usize,
    pub pages_lost: usize,
    pub pages_kept: usize,
    /// Directory operations undone, and those that could not be (see [`PowerCut`]).
    pub entries_undone: usize,
    pub entries_not_undone: usize,
}

/// The mounted file system. Dropping it unmounts (keeping unsynced changes, as a clean
/// shutdown would).
pub struct PowerLossMount {
    backing: PathBuf,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    state: Arc<Mutex<State>>,
    fail_fsync: Arc<Mutex<HashSet<OsString>>>,
}

impl PowerLossMount {
    /// Mounts a file system at `mountpoint` (an empty directory) whose durable state is the
    /// directory `backing`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<PowerLossMount> {
        let mut mount = PowerLossMount {
            backing: backing.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            session: None,
            state: Arc::new(Mutex::new(State::new(backing))),
            fail_fsync: Arc::new(Mutex::new(HashSet::new())),
        };
        mount.start()?;
        Ok(mount)
    }

    fn start(&mut self) -> io::Result<()> {
        self.state = Arc::new(Mutex::new(State::new(&self.backing)));
        let fs = PowerLossFs {
            state: self.state.clone(),
            fail_fsync: self.fail_fsync.clone(),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("firn-powerloss".into()),
            MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(2);
        self.session = Some(fuser::spawn_mount(fs, &self.mountpoint, &config)?);
        Ok(())
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The next fsync of a file named `name` (in any directory) fails with EIO and drops that
    /// file's unsynced changes.
    pub fn fail_next_fsync(&self, name: &str) {
        lock(&self.fail_fsync).insert(name.into());
    }

    /// Unsynced pages now held, over all files.
    pub fn dirty_pages(&self) -> usize {
        lock(&self.state)
            .nodes
            .values()
            .map(|n| n.dirty.pages.len())
            .sum()
    }

    /// Cuts the power: unmounts (every process using the mount must be gone), drops what
    /// `cut` says of the unsynced changes, and mounts again.
    pub fn power_cut(&mut self, cut: PowerCut) -> io::Result<CutReport> {
        self.unmount()?;
        let mut report = CutReport::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(match cut {
            PowerCut::LoseAll => 0,
            PowerCut::LoseSome(seed) => seed,
        });
        {
            let mut state = lock(&self.state);
            for node in state.nodes.values_mut() {
                if node.dirty.is_clean() {
                    continue;
                }
                report.files += 1;
                let dirty = std::mem::take(&mut node.dirty);
                let Some(file) = node.file.as_ref() else {
                    continue;
                };
                match cut {
                    PowerCut::LoseAll => report.pages_lost += dirty.pages.len(),
                    PowerCut::LoseSome(_) => {
                        let mut kept = Dirty {
                            cut: dirty.cut.filter(|_| rng.random_bool(0.5)),
                            size: dirty.size.filter(|_| rng.random_bool(0.5)),
                            pages: BTreeMap::new(),
                        };
                        for (index, page) in dirty.pages {
                            if rng.random_bool(0.5) {
                                kept.pages.insert(index, page);
                                report.pages_kept += 1;
                            } else {
                                report.pages_lost += 1;
                            }
                        }
                        kept.write_back(file)?;
                    }
                }
            }
            // A journaling file system commits directory operations in order: a prefix of
            // the pending ones survives.
            let pending = std::mem::take(&mut state.pending);
            let survive = match cut {
                PowerCut::LoseAll => 0,
                PowerCut::LoseSome(_) => rng.random_range(0..=pending.len()),
            };
            for op in &pending[..survive] {
                state.empty_trash(op);
            }
            for op in pending[survive..].iter().rev() {
                if undo(&state.root, &op.undo) {
                    report.entries_undone += 1;
                } else {
                    report.entries_not_undone += 1;
                }
            }
        }
        self.start()?;
        Ok(report)
    }

    fn unmount(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // A child that another test of this binary forks holds copies of every open file of
        // the process until it execs, this mount's included: an unmount in that moment finds
        // it busy. Tried again for up to five seconds.
        let mut tries = 0;
        loop {
            let out = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mountpoint)
                .output()?;
            if out.status.success() {
                break;
            }
            tries += 1;
            if tries == 50 {
                self.session = Some(session);
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "unmount {}: {} (is a process still using it?)",
                        self.mountpoint.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // The session's own unmount finds nothing mounted and only says so.
        session.join()
    }
}

impl Drop for PowerLossMount {
    fn drop(&mut self) {
        if self.unmount().is_err() {
            // Still busy (a test failed with a process using it): detach it, so no dead
            // mount is left behind once that process ends.
            let _ = std::process::Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .status();
        }
        let mut state = lock(&self.state);
        for node in state.nodes.values_mut() {
            let dirty = std::mem::take(&mut node.dirty);
            if let Some(file) = node.file.as_ref() {
                let _ = dirty.write_back(file);
            }
        }
        for op in std::mem::take(&mut state.pending) {
            state.empty_trash(&op);
        }
        let _ = fs::remove_dir_all(state.root.join(TRASH));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A file's changes since its last fsync.
#[derive(Default)]
struct Dirty {
    /// Page index to its current content; `None` is a page of zeros (a punched hole).
    pages: BTreeMap<u64, Option<Box<[u8]>>>,
    /// The file's size, if it changed.
    size: Option<u64>,
    /// The smallest size the file was truncated to: backing bytes from here on are gone
    /// (the page holding this offset, if partial, is in `pages`).
    cut: Option<u64>,
}

impl Dirty {
    fn is_clean(&self) -> bool {
        self.pages.is_empty() && self.size.is_none() && self.cut.is_none()
    }

    /// Applies these changes to `file` (not synced).
    fn write_back(&self, file: &File) -> io::Result<()> {
        let backing_len = file.metadata()?.len();
        if let Some(cut) = self.cut {
            if cut < backing_len {
                file.set_len(cut)?;
            }
        }
        let size = self
            .size
            .unwrap_or(backing_len.min(self.cut.unwrap_or(u64::MAX)));
        for (&index, page) in &self.pages {
            let start = index * PAGE;
            if start >= size {
                continue;
            }
            let len = PAGE.min(size - start);
            match page {
                Some(bytes) => file.write_all_at(&bytes[..len as usize], start)?,
                None => {
                    if start + len > file.metadata()?.len() {
                        file.set_len(start + len)?;
                    }
                    nix::fcntl::fallocate(
                        file,
                        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                        start as i64,
                        len as i64,
                    )?;
                }
            }
        }
        if file.metadata()?.len() != size {
            file.set_len(size)?;
        }
        Ok(())
    }
}

struct Node {
    /// Relative to the backing directory.
    path: PathBuf,
    /// The backing file, opened at first use and kept (so it stays usable after an unlink).
    file: Option<File>,
    dirty: Dirty,
}

struct State {
    root: PathBuf,
    nodes: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
    /// Directory operations not yet durable, oldest first.
    pending: Vec<Pending>,
    trashed: u64,
}

/// A directory operation (already done on the backing directory) that no fsync has made
/// durable yet, and how a power cut undoes it.
struct Pending {
    /// The inode it created, moved or removed.
    subject: u64,
    /// The directories whose entries it changed; it is durable once each was fsynced.
    dirs: Vec<u64>,
    undo: Undo,
    /// A removed file or directory, kept in the trash until the removal is durable.
    trash: Option<PathBuf>,
}

enum Undo {
    /// Remove what was created here.
    Remove(PathBuf),
    /// Move `from` back to `to`, and then what it replaced (in the trash) back to `from`.
    Move {
        from: PathBuf,
        to: PathBuf,
        replaced: Option<PathBuf>,
    },
}

impl State {
    fn new(root: &Path) -> State {
        // Left by a test that did not finish: the removals it holds never happened.
        let _ = fs::remove_dir_all(root.join(TRASH));
        let _ = fs::create_dir(root.join(TRASH));
        let mut state = State {
            root: root.to_path_buf(),
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            next_ino: 2,
            pending: Vec::new(),
            trashed: 0,
        };
        state.nodes.insert(
            1,
            Node {
                path: PathBuf::new(),
                file: None,
                dirty: Dirty::default(),
            },
        );
        state.by_path.insert(PathBuf::new(), 1);
        state
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.nodes.get(&ino.0).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    fn backing(&self, relative: &Path) -> PathBuf {
        self.root.join(relative)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.node(parent)?.path.join(name))
    }

    /// The inode number for `relative`, made up on first sight.
    fn ino_of(&mut self, relative: &Path) -> u64 {
        if let Some(&ino) = self.by_path.get(relative) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                path: relative.to_path_buf(),
                file: None,
                dirty: Dirty::default(),
            },
        );
        self.by_path.insert(relative.to_path_buf(), ino);
        ino
    }

    /// The backing file of a regular file's inode, opened read-write (or read-only if that
    /// is all the backing allows).
    fn file(&mut self, ino: INodeNo) -> Result<&File, Errno> {
        let root = self.root.clone();
        let node = self.node_mut(ino)?;
        if node.file.is_none() {
            let path = root.join(&node.path);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .or_else(|_| File::open(&path))?;
            node.file = Some(file);
        }
        Ok(node.file.as_ref().expect("opened above"))
    }

    fn attr(&mut self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let node = self.node(ino)?;
        // An open file may have lost its name; its handle still knows it.
        let meta = match &node.file {
            Some(file) => file.metadata()?,
            None => fs::symlink_metadata(self.backing(&node.path))?,
        };
        let size = node.dirty.size.unwrap_or_else(|| match node.dirty.cut {
            Some(cut) => cut.min(meta.len()),
            None => meta.len(),
        });
        let time = |secs: i64, nanos: i64| {
            UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
        };
        Ok(FileAttr {
            ino,
            size,
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: SystemTime::UNIX_EPOCH,
            kind: FileType::from_std(meta.file_type()).ok_or(Errno::EIO)?,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn size(&mut self, ino: INodeNo) -> Result<u64, Errno> {
        Ok(self.attr(ino)?.size)
    }

    /// Page `index` of the file as it is now.
    fn page(&mut self, ino: INodeNo, index: u64) -> Result<Box<[u8]>, Errno> {
        let node = self.node(ino)?;
        if let Some(page) = node.dirty.pages.get(&index) {
            return Ok(page
                .clone()
                .unwrap_or_else(|| vec![0; PAGE as usize].into()));
        }
        let mut page: Box<[u8]> = vec![0; PAGE as usize].into();
        if node.dirty.cut.is_some_and(|cut| index * PAGE >= cut) {
            return Ok(page);
        }
        let file = self.file(ino)?;
        let mut filled = 0;
        while filled < page.len() {
            match file.read_at(&mut page[filled..], index * PAGE + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(page)
    }

    /// Changes `offset..offset + len` of the file: `data`, or zeros.
    fn patch(
        &mut self,
        ino: INodeNo,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), Errno> {
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE;
            let start = (pos % PAGE) as usize;
            let take = (PAGE as usize - start).min((end - pos) as usize);
            let whole = start == 0 && take == PAGE as usize;
            let page = match (data, whole) {
                (None, true) => None,
                (Some(data), true) => {
                    let at = (pos - offset) as usize;
                    Some(data[at..at + take].to_vec().into_boxed_slice())
                }
                (data, false) => {
                    let mut page = self.page(ino, index)?;
                    match data {
                        Some(data) => {
                            let at = (pos - offset) as usize;
                            page[start..start + take].copy_from_slice(&data[at..at + take]);
                        }
                        None => page[start..start + take].fill(0),
                    }
                    Some(page)
                }
            };
            self.node_mut(ino)?.dirty.pages.insert(index, page);
            pos += take as u64;
        }
        Ok(())
    }

    fn set_size(&mut self, ino: INodeNo, new: u64) -> Result<(), Errno> {
        let old = self.size(ino)?;
        if new < old {
            // The partial page at the new end keeps its head and loses its tail.
            if new % PAGE != 0 {
                let index = new / PAGE;
                let mut page = self.page(ino, index)?;
                page[(new % PAGE) as usize..].fill(0);
                self.node_mut(ino)?.dirty.pages.insert(index, Some(page));
            }
            let node = self.node_mut(ino)?;
            let first_gone = new.div_ceil(PAGE);
            node.dirty.pages.split_off(&first_gone);
            node.dirty.cut = Some(node.dirty.cut.map_or(new, |cut| cut.min(new)));
        }
        self.node_mut(ino)?.dirty.size = Some(new);
        Ok(())
    }

    fn write(&mut self, ino: INodeNo, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.file(ino)?;
        let size = self.size(ino)?;
        self.patch(ino, offset, data.len() as u64, Some(data))?;
        let end = offset + data.len() as u64;
        if end > size {
            self.node_mut(ino)?.dirty.size = Some(end);
        }
        Ok(())
    }

    fn read(&mut self, ino: INodeNo, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        self.file(ino)?;
        let size = self.size(ino)?;
        let end = size.min(offset.saturating_add(len));
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let page = self.page(ino, pos / PAGE)?;
            let start = (pos % PAGE) as usize;
            let take = (PAGE as usize - start).min((end - pos) as usize);
            out.extend_from_slice(&page[start..start + take]);
            pos += take as u64;
        }
        Ok(out)
    }

    fn fallocate(&mut self, ino: INodeNo, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        self.file(ino)?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let size = self.size(ino)?;
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => {}
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => {
                self.patch(ino, offset, end.min(size).saturating_sub(offset), None)?
            }
            libc::FALLOC_FL_ZERO_RANGE => {
                let stop = if keep_size { end.min(size) } else { end };
                self.patch(ino, offset, stop.saturating_sub(offset), None)?
            }
            _ => return Err(Errno::EOPNOTSUPP),
        }
        if !keep_size && end > size {
            self.node_mut(ino)?.dirty.size = Some(end);
        }
        Ok(())
    }

    fn fsync(&mut self, ino: INodeNo) -> Result<(), Errno> {
        self.file(ino)?;
        let node = self.node_mut(ino)?;
        let file = node.file.as_ref().expect("opened above");
        node.dirty.write_back(file)?;
        file.sync_all()?;
        node.dirty = Dirty::default();
        Ok(())
    }

    /// Moves the names under `from` to `to` after a rename.
    fn renamed(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> = self
            .by_path
            .iter()
            .filter(|(path, _)| path.starts_with(from))
            .map(|(path, &ino)| (path.clone(), ino))
            .collect();
        for (old, ino) in moved {
            self.by_path.remove(&old);
            let new = to.join(old.strip_prefix(from).expect("filtered on the prefix"));
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.path = new.clone();
            }
            self.by_path.insert(new, ino);
        }
    }

    /// The inode of the directory holding `relative`.
    fn parent_ino(&mut self, relative: &Path) -> u64 {
        let parent = relative.parent().unwrap_or(Path::new("")).to_path_buf();
        self.ino_of(&parent)
    }

    /// Something was created at `relative`: a file or a directory.
    fn created(&mut self, relative: &Path) -> u64 {
        let ino = self.ino_of(relative);
        let parent = self.parent_ino(relative);
        self.pending.push(Pending {
            subject: ino,
            dirs: vec![parent],
            undo: Undo::Remove(relative.to_path_buf()),
            trash: None,
        });
        ino
    }

    /// Removes the name `relative` (a file or an empty directory) by moving it to the trash;
    /// the inode (and its open backing file) stays.
    fn remove(&mut self, relative: &Path) -> Result<(), Errno> {
        self.trashed += 1;
        let trash = Path::new(TRASH).join(self.trashed.to_string());
        fs::rename(self.backing(relative), self.backing(&trash))?;
        let parent = self.parent_ino(relative);
        let subject = self.by_path.remove(relative).unwrap_or(0);
        if let Some(node) = self.nodes.get_mut(&subject) {
            node.path = trash.clone();
        }
        self.pending.push(Pending {
            subject,
            dirs: vec![parent],
            undo: Undo::Move {
                from: trash.clone(),
                to: relative.to_path_buf(),
                replaced: None,
            },
            trash: Some(trash),
        });
        Ok(())
    }

    /// A rename, replacing what `to` named if anything: one change, as rename(2) is atomic
    /// across a crash too (the replaced file waits in the trash until the rename is durable,
    /// and a power cut undoes both halves or neither).
    fn rename(&mut self, from: &Path, to: &Path) -> Result<(), Errno> {
        if from == to {
            return Ok(());
        }
        let replaced = if fs::symlink_metadata(self.backing(to)).is_ok() {
            self.trashed += 1;
            let trash = Path::new(TRASH).join(self.trashed.to_string());
            fs::rename(self.backing(to), self.backing(&trash))?;
            let subject = self.by_path.remove(to).unwrap_or(0);
            if let Some(node) = self.nodes.get_mut(&subject) {
                node.path = trash.clone();
            }
            Some((trash, subject))
        } else {
            None
        };
        if let Err(e) = fs::rename(self.backing(from), self.backing(to)) {
            // A failed rename leaves the replaced entry where it was.
            if let Some((trash, subject)) = replaced {
                fs::rename(self.backing(&trash), self.backing(to))?;
                if let Some(node) = self.nodes.get_mut(&subject) {
                    node.path = to.to_path_buf();
                }
                self.by_path.insert(to.to_path_buf(), subject);
            }
            return Err(e.into());
        }
        let mut dirs = vec![self.parent_ino(from), self.parent_ino(to)];
        dirs.dedup();
        self.renamed(from, to);
        let trash = replaced.map(|(trash, _)| trash);
        self.pending.push(Pending {
            subject: self.by_path.get(to).copied().unwrap_or(0),
            dirs,
            undo: Undo::Move {
                from: to.to_path_buf(),
                to: from.to_path_buf(),
                replaced: trash.clone(),
            },
            trash,
        });
        Ok(())
    }

    /// fsync of a directory: what it did to that directory's entries is durable.
    fn synced_dir(&mut self, dir: u64) {
        for op in &mut self.pending {
            op.dirs.retain(|&d| d != dir);
        }
        self.settle(|op| op.dirs.is_empty());
    }

    /// fsync of a file: its own creation and renames are durable, and so are the creations of
    /// the directories above it, as a journaling file system (ext4, XFS) commits them with it.
    fn synced_file(&mut self, ino: u64) {
        let Some(node) = self.nodes.get(&ino) else {
            return;
        };
        let mut covered = vec![ino];
        let mut path = node.path.clone();
        while path.pop() {
            if let Some(&dir) = self.by_path.get(&path) {
                covered.push(dir);
            }
        }
        self.settle(|op| covered.contains(&op.subject) && op.trash.is_none());
    }

    /// Makes the pending operations that `durable` picks final.
    fn settle(&mut self, durable: impl Fn(&Pending) -> bool) {
        let (done, pending) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|op| durable(op));
        self.pending = pending;
        for op in done {
            self.empty_trash(&op);
        }
    }

    fn empty_trash(&self, op: &Pending) {
        if let Some(trash) = &op.trash {
            let path = self.backing(trash);
            let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir_all(&path));
        }
    }
}

/// Undoes one directory operation on the backing directory; false if that did not work
/// (a later, durable operation changed the same names).
fn undo(root: &Path, undo: &Undo) -> bool {
    match undo {
        Undo::Remove(relative) => {
            let path = root.join(relative);
            fs::remove_file(&path)
                .or_else(|_| fs::remove_dir_all(&path))
                .is_ok()
        }
        Undo::Move { from, to, replaced } => {
            fs::rename(root.join(from), root.join(to)).is_ok()
                && replaced
                    .as_ref()
                    .is_none_or(|trash| fs::rename(root.join(trash), root.join(from)).is_ok())
        }
    }
}

struct PowerLossFs {
    state: Arc<Mutex<State>>,
    fail_fsync: Arc<Mutex<HashSet<OsString>>>,
}

impl PowerLossFs {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn entry(&self, relative: &Path, reply: ReplyEntry) {
        let mut state = self.state();
        let ino = INodeNo(state.ino_of(relative));
        match state.attr(ino) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for PowerLossFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let relative = {
            let state = self.state();
            match state.child(parent, name) {
                Ok(path) if path == Path::new(TRASH) => return reply.error(Errno::ENOENT),
                Ok(path) if fs::symlink_metadata(state.backing(&path)).is_ok() => path,
                Ok(_) => return reply.error(Errno::ENOENT),
                Err(e) => return reply.error(e),
            }
        };
        self.entry(&relative, reply);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let state = self.state();
        let result = state
            .node(ino)
            .and_then(|node| Ok(xattr::set(state.backing(&node.path), name, value)?));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: fuser::ReplyXattr,
    ) {
        let state = self.state();
        let result = state
            .node(ino)
            .and_then(|node| Ok(xattr::get(state.backing(&node.path), name)?));
        match result {
            Ok(Some(value)) if size == 0 => reply.size(value.len() as u32),
            Ok(Some(value)) if value.len() <= size as usize => reply.data(&value),
            Ok(Some(_)) => reply.error(Errno::ERANGE),
            Ok(None) => reply.error(Errno::NO_XATTR),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        let state = self.state();
        let result = state.node(ino).and_then(|node| {
            let mut names = Vec::new();
            for name in xattr::list(state.backing(&node.path))? {
                names.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()));
                names.push(0);
            }
            Ok(names)
        });
        match result {
            Ok(names) if size == 0 => reply.size(names.len() as u32),
            Ok(names) if names.len() <= size as usize => reply.data(&names),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let state = self.state();
        let result = state
            .node(ino)
            .and_then(|node| Ok(xattr::remove(state.backing(&node.path), name)?));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.state();
        let result = (|| {
            let path = state.backing(&state.node(ino)?.path);
            if let Some(mode) = mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&path, uid, gid)?;
            }
            if let Some(size) = size {
                state.file(ino)?;
                state.set_size(ino, size)?;
            }
            state.attr(ino)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let relative = {
            let mut state = self.state();
            let result = state.child(parent, name).and_then(|relative| {
                fs::DirBuilder::new()
                    .mode(mode & !umask & 0o7777)
                    .create(state.backing(&relative))?;
                state.created(&relative);
                Ok(relative)
            });
            match result {
                Ok(relative) => relative,
                Err(e) => return reply.error(e),
            }
        };
        self.entry(&relative, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let result = state.child(parent, name).and_then(|relative| {
            if fs::symlink_metadata(state.backing(&relative))?.is_dir() {
                return Err(Errno::EISDIR);
            }
            state.remove(&relative)
        });
        empty(reply, result);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.state();
        let result = state.child(parent, name).and_then(|relative| {
            let path = state.backing(&relative);
            if !fs::symlink_metadata(&path)?.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            if fs::read_dir(&path)?.next().is_some() {
                return Err(Errno::ENOTEMPTY);
            }
            state.remove(&relative)
        });
        empty(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = (|| {
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            let from = state.child(parent, name)?;
            let to = state.child(newparent, newname)?;
            state.rename(&from, &to)
        })();
        empty(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        let is_file = state.attr(ino).map(|a| a.kind == FileType::RegularFile);
        match is_file {
            Ok(true) => match state.file(ino) {
                Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
                Err(e) => reply.error(e),
            },
            Ok(false) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state().read(ino, offset, u64::from(size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(ino, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let fail = match state.node(ino) {
            Ok(node) => node
                .path
                .file_name()
                .is_some_and(|name| lock(&self.fail_fsync).remove(name)),
            Err(e) => return reply.error(e),
        };
        if fail {
            // What the kernel does when write-back fails: the pages are dropped (marked
            // clean) and the error is reported once.
            if let Ok(node) = state.node_mut(ino) {
                node.dirty = Dirty::default();
            }
            return reply.error(Errno::EIO);
        }
        let result = state.fsync(ino);
        if result.is_ok() {
            state.synced_file(ino.0);
        }
        empty(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().attr(ino) {
            Ok(attr) if attr.kind == FileType::Directory => {
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.state();
        let listing = (|| {
            let dir = state.node(ino)?.path.clone();
            let mut entries = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (ino.0, FileType::Directory, OsString::from("..")),
            ];
            let mut names: Vec<(OsString, FileType)> = Vec::new();
            for entry in fs::read_dir(state.backing(&dir))? {
                let entry = entry?;
                if dir.as_os_str().is_empty() && entry.file_name() == TRASH {
                    continue;
                }
                let kind = FileType::from_std(entry.file_type()?).ok_or(Errno::EIO)?;
                names.push((entry.file_name(), kind));
            }
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, kind) in names {
                let child = state.ino_of(&dir.join(&name));
                entries.push((child, kind, name));
            }
            Ok::<_, Errno>(entries)
        })();
        match listing {
            Ok(entries) => {
                for (i, (child, kind, name)) in
                    entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.state();
        let result = state
            .node(ino)
            .and_then(|node| Ok(File::open(state.backing(&node.path))?.sync_all()?));
        if result.is_ok() {
            state.synced_dir(ino.0);
        }
        empty(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = self.state().root.clone();
        match nix::sys::statvfs::statvfs(&root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.state();
        let result = (|| {
            let relative = state.child(parent, name)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .create_new(flags & libc::O_EXCL != 0)
                .mode(mode & !umask & 0o7777)
                .open(state.backing(&relative))?;
            let ino = INodeNo(state.created(&relative));
            let node = state.node_mut(ino)?;
            node.file = Some(file);
            node.dirty = Dirty::default();
            state.attr(ino)
        })();
        match result {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.state().fallocate(ino, offset, length, mode);
        empty(reply, result);
    }
}
