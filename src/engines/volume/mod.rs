//! Block volumes. [`BlockDevice`] is the one trait the NBD door talks to; the volumes behind
//! it (today the local volume, next the cached and stored ones) implement it.

pub mod cached;
pub mod catalog;
pub mod local;

use serde::{Deserialize, Serialize};

/// Why a block request failed. Each maps to one NBD error code.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the device, or is malformed (EINVAL).
    #[error("{0}")]
    Invalid(String),
    /// The device is read-only (EPERM).
    #[error("read-only volume")]
    ReadOnly,
    /// Out of local space (ENOSPC).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// Anything else the disk or store reported (EIO).
    #[error("I/O error: {0}")]
    Io(String),
}

impl From<std::io::Error> for BlockError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(nix::libc::ENOSPC) {
            BlockError::NoSpace(e.to_string())
        } else {
            BlockError::Io(e.to_string())
        }
    }
}

pub type BlockResult<T> = Result<T, BlockError>;

/// What a stretch of the device holds, for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated: reads return zeros and cost no space.
    pub hole: bool,
    /// Reads return zeros (true of every hole).
    pub zero: bool,
}

/// A block device as the protocol doors see it.
///
/// Methods block (they do disk I/O), except `read_cached`; async callers run them on blocking
/// threads. Offsets and lengths are in bytes; callers check them against `size()` before
/// calling, and implementations check again.
///
/// The contract:
/// - `read` fills every byte of its buffer when it succeeds (callers may hand it a buffer
///   holding older bytes, and send whatever it holds afterwards).
/// - `write` is acknowledged once the data is in the volume's local store (page cache);
///   with `fua` it returns only after the data is on stable storage.
/// - `flush` returns only when every write acknowledged before it was called is on stable
///   storage. After a crash, all of that reads back unchanged.
/// - A failed `flush` (or FUA write) is sticky: since the failure may have lost acknowledged
///   writes, every later `flush` and write fails too, until the device is opened anew.
/// - Every aligned 4 KiB sector is written atomically: after a crash it holds its old or its
///   new content, never a mix.
/// - `trim` and `write_zeroes` are metadata operations (they punch holes), so their cost does
///   not grow with the length; after `trim` the range reads as zeros.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Preferred I/O size: requests aligned to it avoid read-modify-write.
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()>;
    /// `read`, if it can finish without waiting for the disk (the data is in memory); or
    /// `None`, with `buf` left in no particular state, if it would have to wait. Async
    /// callers answer cached reads in place with it and hand the rest to a blocking thread.
    /// The default never answers.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Option<BlockResult<()>> {
        let _ = (offset, buf);
        None
    }
    /// Writes `data` at `offset`. `data` is the device's to scribble on: it may hold anything
    /// afterwards (a device that encrypts does it in place, sparing a copy of every write).
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> BlockResult<()>;
    /// `read`, if it needs nothing from the network (it may wait for the local disk); or
    /// `None`, with `buf` left in no particular state, if some of the range is only in the
    /// bucket. Callers wait for the bucket elsewhere, so that such reads do not hold up the
    /// rest. The default reads: all its data is here.
    fn read_local(&self, offset: u64, buf: &mut [u8]) -> Option<BlockResult<()>> {
        Some(self.read(offset, buf))
    }
    /// `write` without FUA, if it can finish without waiting for the disk or for a lock held
    /// across disk I/O (the data only goes to the page cache); or `None`, having changed
    /// nothing (`data` included), if it would have to wait. Async callers run small writes in
    /// place with it and hand the rest to a blocking thread. The default never answers.
    fn write_now(&self, offset: u64, data: &mut [u8]) -> Option<BlockResult<()>> {
        let _ = (offset, data);
        None
    }
    fn flush(&self) -> BlockResult<()>;
    fn trim(&self, offset: u64, length: u64) -> BlockResult<()>;
    /// With `may_trim`, the range may become a hole (NBD's default); without, it stays
    /// allocated (NBD_CMD_FLAG_NO_HOLE).
    fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool) -> BlockResult<()>;
    /// The extents covering `offset..offset + length`, in order, at least one.
    fn extents(&self, offset: u64, length: u64) -> BlockResult<Vec<Extent>>;
    /// Brings `offset..offset + length` to local disk, so that reads of it need not wait for
    /// the network (NBD_CMD_CACHE). The default has nothing to bring: all its data is here.
    fn prefetch(&self, offset: u64, length: u64) -> BlockResult<()> {
        check_range(offset, length, self.size())
    }
    /// The volume was deleted under its clients (a forced delete): every request from now on
    /// fails, so that no write is acknowledged into a file that is gone. A device that
    /// retires another way (a cached volume's `retire`) keeps the default, which does nothing.
    fn mark_deleted(&self) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Kept on the local disk only: scratch space.
    Local,
    /// Lives in the bucket; written through an ordered local log, hot data cached locally.
    Cached,
}

/// Checks that `offset..offset + length` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, length: u64, size: u64) -> BlockResult<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::Invalid(format!(
            "range {offset}+{length} is outside the {size}-byte volume"
        ))),
    }
}
