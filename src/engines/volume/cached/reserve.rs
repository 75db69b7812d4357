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

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{FallocateFlags, fallocate};

pub(super) const RESERVE_FILE: &str = "reserve";

pub(super) struct Reserve {
    file: File,
    /// Bytes the file holds.
    held: u64,
    /// Bytes it should hold when nothing is waiting to be uploaded.
    cap: u64,
}

impl Reserve {
    /// Opens (or creates) the reserve and makes it hold `want` bytes, or as many as the disk
    /// gives; fails if it cannot hold `at_least`.
    pub fn open(dir: &Path, want: u64, at_least: u64, cap: u64) -> io::Result<Reserve> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(RESERVE_FILE))?;
        let have = file.metadata()?.len();
        let mut reserve = Reserve {
            file,
            held: have,
            cap,
        };
        if have > want {
            reserve.file.set_len(want)?;
            reserve.held = want;
        } else {
            reserve.grow_to(want);
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

    /// Gives up `bytes` of the reserve for a new segment; false (nothing changed) if it
    /// holds less.
    pub fn take(&mut self, bytes: u64) -> bool {
        if self.held < bytes {
            return false;
        }
        match self.file.set_len(self.held - bytes) {
            Ok(()) => {
                self.held -= bytes;
                true
            }
            Err(_) => false,
        }
    }

    /// Grows the reserve by `bytes`, up to its cap, as far as the disk allows.
    pub fn give(&mut self, bytes: u64) {
        self.grow_to((self.held + bytes).min(self.cap));
    }

    /// Grows towards `target` in steps, stopping at the first the disk refuses.
    fn grow_to(&mut self, target: u64) {
        const STEP: u64 = 64 << 20;
        while self.held < target {
            let len = (target - self.held).min(STEP);
            if fallocate(
                &self.file,
                FallocateFlags::empty(),
                self.held as i64,
                len as i64,
            )
            .is_err()
            {
                break;
            }
            self.held += len;
        }
    }
}

/// Preallocates `bytes` of a new segment file without changing its length.
pub(super) fn preallocate(file: &File, bytes: u64) {
    let _ = fallocate(file, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, bytes as i64);
}

/// Releases what a segment preallocated past its end.
pub(super) fn release_tail(file: &File, end: u64, bytes: u64) {
    if bytes > end {
        let _ = fallocate(
            file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            end as i64,
            (bytes - end) as i64,
        );
    }
}
