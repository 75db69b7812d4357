//! Local space held for a cached volume's log, so that a full disk makes writes wait for the
//! uploader instead of failing with ENOSPC.
//!
//! The space is a preallocated file, `reserve`, in the volume's directory. Every segment that
//! is not uploaded yet (the open one included) is preallocated to its largest possible size
//! when it is created, with space the reserve gives up just before; once the segment is in
//! the bucket, its unused tail is released and the reserve grows back by as much (which needs
//! free space: the cache's eviction makes it). So the log always has room for
//! `log_max` bytes, or, when the disk could not give that much, writes wait for room rather
//! than failing.
//!
//! Beside it, a second preallocated file, `headroom`, holds space for what the volume must
//! write for itself to get out of a full disk: the record of each upload (in the metadata
//! store) and the local checkpoint that lets uploaded segments be evicted. It is given up
//! the moment the reserve finds the disk full, and taken again once the reserve is whole.
//! Without it, a disk that another program filled while the log was full (uploads waiting,
//! as in an outage) stayed full for good: evicting needs a checkpoint, and the checkpoint,
//! like every upload's record, needs space.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, fallocate};

pub(super) const RESERVE_FILE: &str = "reserve";
pub(super) const HEADROOM_FILE: &str = "headroom";

/// The headroom: a few times a checkpoint of a large map, and the metadata store's growth.
pub(super) const HEADROOM: u64 = 4 << 20;

pub(super) struct Reserve {
    file: File,
    /// Bytes the file holds.
    held: u64,
    /// Bytes it should hold when nothing is waiting to be uploaded.
    cap: u64,
    /// Bytes the disk refused the last time the reserve grew (0 if it gave all).
    short: u64,
    /// Segments being opened with space handed out for them (`promise`), not yet counted
    /// among the log's segments: a refill leaves their space alone.
    pending: u64,
    /// The headroom file, and whether it holds its space now.
    headroom: File,
    headroom_held: bool,
    /// `[local] min_free`: the headroom is taken only beside it.
    keep_free: u64,
    dir: PathBuf,
}

impl Reserve {
    /// Opens (or creates) the reserve and makes it hold `want` bytes, or as many as the disk
    /// gives without going under `keep_free` bytes free (`[local] min_free`); fails if it
    /// cannot hold `at_least`, which it takes even from `keep_free`.
    pub fn open(
        dir: &Path,
        want: u64,
        at_least: u64,
        cap: u64,
        keep_free: u64,
    ) -> io::Result<Reserve> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(RESERVE_FILE))?;
        let have = file.metadata()?.len();
        let headroom = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(HEADROOM_FILE))?;
        let headroom_held = headroom.metadata()?.len() >= HEADROOM;
        let mut reserve = Reserve {
            file,
            held: have,
            cap,
            short: 0,
            pending: 0,
            headroom,
            headroom_held,
            keep_free,
            dir: dir.to_path_buf(),
        };
        if have > want {
            reserve.file.set_len(want)?;
            reserve.held = want;
        } else {
            let free = nix::sys::statvfs::fstatvfs(&reserve.file)
                .map(|s| s.blocks_available() * s.fragment_size())
                .map_err(io::Error::from)?;
            let target = want.min(have + free.saturating_sub(keep_free));
            reserve.grow_to(target.max(at_least.min(want)));
        }
        if reserve.short == 0 && !reserve.headroom_held {
            reserve.take_headroom();
        }
        if reserve.held < at_least {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "not enough free space for the volume's log: it needs at least {at_least} bytes held at {}, {} were free",
                    dir.display(),
                    reserve.held
                ),
            ));
        }
        reserve.file.sync_all()?;
        Ok(reserve)
    }

    pub fn held(&self) -> u64 {
        self.held
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// A new cap (`log_max`), the reserve to hold `keep` bytes (the cap less what segments
    /// hold): a smaller cap gives space back at once, and a larger one takes it at once, as
    /// far as the disk gives beside `keep_free` (as at open), so that writes waiting for
    /// room go on without an upload.
    pub fn set_cap(&mut self, cap: u64, keep: u64) {
        self.cap = cap;
        if self.held > keep {
            if self.file.set_len(keep).is_ok() {
                self.held = keep;
            }
        } else {
            let free = nix::sys::statvfs::fstatvfs(&self.file)
                .map(|s| s.blocks_available() * s.fragment_size())
                .unwrap_or(0);
            let beside = self
                .held
                .saturating_add(free.saturating_sub(self.keep_free));
            self.grow_to(keep.min(cap).min(beside));
        }
    }

    /// Space was handed out for a segment about to open (from the reserve or a spare).
    pub fn promise(&mut self) {
        self.pending += 1;
    }

    /// The segment promised is open and counted among the log's segments (or failed to
    /// open).
    pub fn settle(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// How far the reserve fell short of what it last grew towards: the disk was full. The
    /// cache then gives up clean segments whatever its own bound, so that the log gets its
    /// room back.
    pub fn short(&self) -> u64 {
        self.short
    }

    /// Gives up `bytes` of the reserve for a new segment; `Ok(false)` (nothing changed) if
    /// it holds less, an error if the file could not be shortened.
    pub fn take(&mut self, bytes: u64) -> io::Result<bool> {
        if self.held < bytes {
            return Ok(false);
        }
        self.file.set_len(self.held - bytes)?;
        self.held -= bytes;
        Ok(true)
    }

    /// Grows the reserve by `bytes`, up to its cap, as far as the disk allows.
    pub fn give(&mut self, bytes: u64) {
        self.grow_to((self.held + bytes).min(self.cap));
    }

    /// Grows towards `target` in steps, halving a step the disk refuses (a nearly full disk
    /// still gives what it has: one refused step of 64 MiB left the reserve empty), and
    /// stopping when it refuses a MiB.
    fn grow_to(&mut self, target: u64) {
        const STEP: u64 = 64 << 20;
        const SMALLEST: u64 = 1 << 20;
        self.short = 0;
        let mut step = STEP;
        while self.held < target {
            let len = (target - self.held).min(step);
            if fallocate(
                &self.file,
                FallocateFlags::empty(),
                self.held as i64,
                len as i64,
            )
            .is_err()
            {
                if len > SMALLEST {
                    step = len / 2;
                    continue;
                }
                self.short = target - self.held;
                break;
            }
            self.held += len;
        }
        if self.short > 0 {
            self.release_headroom();
        } else if !self.headroom_held {
            self.take_headroom();
        }
    }

    /// The disk is full: the headroom's space goes back to it, for the volume's own writes.
    fn release_headroom(&mut self) {
        if !self.headroom_held {
            return;
        }
        // Synced, so that a file system that holds freed blocks back until its journal
        // commits (ext4) has them free now.
        if self
            .headroom
            .set_len(0)
            .and_then(|()| self.headroom.sync_all())
            .is_ok()
        {
            self.headroom_held = false;
            tracing::warn!(
                "the disk under {} is full: the {} MiB of headroom kept for that are given back, for the volume's own records",
                self.dir.display(),
                HEADROOM >> 20
            );
        }
    }

    /// Room again: the headroom takes its space back once the disk has twice that free
    /// beside `[local] min_free` (so that a disk kept just full by another program does not
    /// see it taken and given back at every upload).
    fn take_headroom(&mut self) {
        let free = nix::sys::statvfs::fstatvfs(&self.headroom)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0);
        if free < 2 * HEADROOM + self.keep_free {
            return;
        }
        match fallocate(&self.headroom, FallocateFlags::empty(), 0, HEADROOM as i64) {
            Ok(()) => self.headroom_held = true,
            Err(_) => {
                let _ = self.headroom.set_len(0);
            }
        }
    }
}

/// Preallocates `bytes` of a new segment file without changing its length, with the space
/// the reserve just gave up. A file system may hold freed blocks back until its journal
/// commits (ext4 does): on a full disk the first try then fails, and a sync, which commits,
/// lets the second succeed.
pub(super) fn preallocate(file: &File, bytes: u64) {
    let try_once = || fallocate(file, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, bytes as i64);
    if try_once().is_err() && file.sync_all().is_ok() && try_once().is_err() {
        tracing::warn!("no room on disk to preallocate a log segment: its writes may fail");
    }
}

/// Releases what a segment, `end` bytes long, preallocated past its end. ext4 punches no
/// hole past a file's length (and says nothing), but frees what lies there when the file is
/// cut to the length it has; tmpfs frees it on the punch.
pub(super) fn release_tail(file: &File, end: u64, bytes: u64) {
    if bytes > end {
        let _ = fallocate(
            file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            end as i64,
            (bytes - end) as i64,
        );
        let _ = file.set_len(end);
    }
}

/// The spare segment's file, beside the segments (so that the sync of that one directory,
/// which the next flush makes, covers its rename into a segment's name). Replay reads only
/// names of 16 hex digits.
pub(super) const SPARE_FILE: &str = "spare";

/// A segment closed after at least this many flushes has a spare made for a later one.
pub(super) const SPARE_AFTER_FLUSHES: u64 = 32;

/// A segment file written ahead of use (`make_spare`), for a log that flushes often.
///
/// A flush is an `fdatasync` of the open segment. Into a freshly preallocated file, whose
/// blocks are unwritten extents past its end, every such sync also commits the file
/// system's journal: the extents the appends turned into written ones, and the file's new
/// length. Into blocks written and synced before, it writes the data and nothing else. On
/// this machine, 4 KiB appends with an `fdatasync` every 8 went from 27k to 45k a second
/// (fio, ext4), and a cached volume's flush-every-8 job from about 7.6k to 9.0k IOPS. The
/// zeros cost a segment's worth of writing, so a spare is made only for a log that closed a
/// segment after `SPARE_AFTER_FLUSHES` flushes, not for one written in long unflushed runs.
#[derive(Debug, Default)]
pub(super) enum Spare {
    #[default]
    None,
    /// Being written; its space is taken from the reserve already.
    Making,
    Ready(File),
}

impl Spare {
    /// Whether it holds space that the reserve gave up.
    pub fn holds_space(&self) -> bool {
        !matches!(self, Spare::None)
    }
}

/// Writes `bytes` of zeros to a new file at `path` and syncs it.
pub(super) fn make_spare(path: &Path, bytes: u64) -> io::Result<File> {
    use std::os::unix::fs::FileExt;
    let file = crate::local::create_private(path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}
