//! The local volume (mode `local`): a block device kept in one sparse file on the gateway's
//! disk, never uploaded, encrypted at rest. This module owns that file's format and every read
//! and write of it; the catalog owns where the file lives and which key opens it.
//!
//! # Format
//!
//! The file is exactly as long as the volume, with no header: volume byte `i` is stored at file
//! byte `i`. The volume is cut into 4096-byte sectors, and each sector is stored either
//!
//! - not at all: a hole in the sparse file, or 4096 zero bytes; it reads as zeros. Every sector
//!   starts this way, and trimming or zeroing (with `may_trim`) a whole sector returns it here;
//! - or encrypted: AES-256-XTS over the whole sector with tweak = the sector's index as a
//!   128-bit little-endian number (dm-crypt's `aes-xts-plain64` with `iv_large_sectors`). Key 1
//!   (the data key) is the first 32 bytes of the volume key, key 2 (the tweak key) the last 32.
//!   A written sector is always encrypted, even when its content is zeros, so a sector zeroed
//!   without `may_trim` stays allocated.
//!
//! Nothing in the file reads back as plaintext without the key. The format has no version
//! field of its own; the catalog records it with the volume (`VolumeInfo::format`).
//!
//! Whether a sector was written is decided by its content, not by asking the file system: an
//! all-zero 4096 bytes is "never written" (the chance that a written sector's ciphertext is all
//! zeros is 2^-32768). That keeps reads correct on file systems whose blocks are larger than a
//! sector (ZFS records, ext4 bigalloc: a write into a large hole allocates zeros around it),
//! costs no syscall per read, and cannot be fooled by a hole that is punched or filled between
//! the two calls a SEEK_DATA walk followed by a read would need. Block status (`extents`) does
//! ask the file system, with SEEK_DATA/SEEK_HOLE: a hole it reports always reads as zeros,
//! and a stretch it calls data is a safe answer even when it holds never-written sectors.
//!
//! # Crash safety
//!
//! Sectors are written whole, aligned, with one `pwrite` each (or one per run of sectors), so
//! a crash leaves each sector with its old or its new ciphertext, which is the sector
//! atomicity the `BlockDevice` contract promises, as far as the file system and disk keep a
//! 4096-byte aligned block write whole (the same assumption dm-crypt makes). A hole punch
//! either happened or not. `flush` and `fua` are `fdatasync`, which covers block allocations
//! and punched holes as well as data.
//!
//! A failed `fdatasync` is final for the open volume: the kernel may have dropped the pages it
//! could not write and cleared the error, so a retried flush would succeed over lost writes.
//! The first such error is kept, and every later flush and write (reads go on) fails with it
//! until the volume is opened again, which happens when its last client disconnects.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};
use openssl::cipher_ctx::CipherCtx;

use super::{BlockDevice, BlockError, BlockResult, Extent, check_range};
use crate::local::space::SpaceBudget;
use crate::local::sync_parent_dir;
use nix::libc;
use std::os::fd::AsRawFd;

/// The unit of encryption and of atomic writes.
pub const SECTOR_SIZE: u64 = 4096;
const SECTOR: usize = SECTOR_SIZE as usize;

/// The largest volume: every offset must fit the file system's signed `off_t`.
pub const MAX_SIZE: u64 = i64::MAX as u64 / SECTOR_SIZE * SECTOR_SIZE;

/// Locks serializing read-modify-write of partial sectors (see `LocalVolume::lock_sector`).
/// Two partial requests on different sectors collide only when their indices are equal modulo
/// this, which is rare enough at the queue depths NBD clients use.
const LOCK_STRIPES: usize = 256;

/// Whole-sector writes and zeroing go through a per-thread buffer of this size: large enough
/// that the syscall per chunk is noise next to encrypting it, small enough to keep per-thread
/// memory modest when many blocking threads run requests.
const CHUNK: usize = 1 << 20;

/// Block status answers stop after this many extents; the NBD server passes on fewer extents
/// than asked for, which the protocol allows, and the client asks again from where they end.
pub const MAX_EXTENTS: usize = 1024;

/// Why a local volume's file could not be created or opened. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LocalVolumeError {
    #[error(
        "local volume {}: size {size} is not valid: it must be a positive multiple of {SECTOR_SIZE} bytes, at most {MAX_SIZE}",
        .path.display()
    )]
    BadSize { path: PathBuf, size: u64 },

    #[error(
        "local volume {}: the file is {actual} bytes but the volume is {expected}; it was truncated or replaced",
        .path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("local volume {}: not a regular file", .path.display())]
    NotAFile { path: PathBuf },

    #[error("local volume {}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A local volume open for I/O. Share it behind an `Arc`: every method takes `&self`, and all
/// users of one volume file must share one `LocalVolume`, since the locks that keep partial
/// sector writes from losing each other's updates live in it (the catalog hands out one).
pub struct LocalVolume {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    cipher: SectorCipher,
    stripes: Box<[Mutex<()>]>,
    /// The first failed `fdatasync`, kept: after one, the kernel may have dropped the dirty
    /// pages and cleared the error, so a later flush would succeed over lost writes. Every
    /// later flush and write fails instead, until the volume is opened anew.
    write_back_error: OnceLock<String>,
    /// Held across an `fdatasync` and the recording of its error: the kernel reports a
    /// write-back error to one `fdatasync` only, so a flush racing with the one that got it
    /// must not succeed before it is recorded.
    sync: Mutex<()>,
    /// Asked before a write may take new space (`[local] min_free`, `max_bytes`).
    space: Option<Arc<SpaceBudget>>,
    /// Deleted under its clients (`BlockDevice::mark_deleted`): every request fails.
    deleted: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for LocalVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalVolume")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl LocalVolume {
    /// Creates the file of a new, all-zero volume of `size` bytes at `path` (which must not
    /// exist) and opens it for writing. The file is sparse, so creation costs nothing whatever
    /// the size; it and its directory entry are durable when this returns. On failure nothing
    /// is left at `path`.
    pub fn create(
        path: impl AsRef<Path>,
        size: u64,
        key: &[u8; 64],
    ) -> Result<LocalVolume, LocalVolumeError> {
        let path = path.as_ref();
        check_size(path, size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            // Encrypted, but there is still no reason for anyone else to read it.
            .mode(0o600)
            .open(path)
            .map_err(|source| file_error(path, "create the file", source))?;
        let prepared = file
            .set_len(size)
            .map_err(|source| file_error(path, "set the file's length", source))
            .and_then(|()| {
                file.sync_all()
                    .map_err(|source| file_error(path, "sync the file", source))
            })
            .and_then(|()| {
                sync_parent_dir(path)
                    .map_err(|source| file_error(path, "sync its directory", source))
            });
        if let Err(e) = prepared {
            drop(file);
            // Best effort: the error above is the one worth reporting.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(LocalVolume::from_file(path, file, size, key, false))
    }

    /// Opens the existing volume file at `path`, checking that it is `size` bytes long.
    pub fn open(
        path: impl AsRef<Path>,
        size: u64,
        key: &[u8; 64],
        read_only: bool,
    ) -> Result<LocalVolume, LocalVolumeError> {
        let path = path.as_ref();
        check_size(path, size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| file_error(path, "open the file", source))?;
        let metadata = file
            .metadata()
            .map_err(|source| file_error(path, "read the file's metadata", source))?;
        if !metadata.is_file() {
            return Err(LocalVolumeError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        if metadata.len() != size {
            return Err(LocalVolumeError::SizeMismatch {
                path: path.to_path_buf(),
                expected: size,
                actual: metadata.len(),
            });
        }
        Ok(LocalVolume::from_file(path, file, size, key, read_only))
    }

    fn from_file(
        path: &Path,
        file: File,
        size: u64,
        key: &[u8; 64],
        read_only: bool,
    ) -> LocalVolume {
        LocalVolume {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            cipher: SectorCipher::new(key),
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            write_back_error: OnceLock::new(),
            sync: Mutex::new(()),
            space: None,
            deleted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes writes that would take new space beyond `budget` fail with ENOSPC.
    pub fn set_space_budget(&mut self, budget: Arc<SpaceBudget>) {
        self.space = Some(budget);
    }

    /// ENOSPC if writing `offset..offset + length` may take space the budget does not allow.
    /// Sectors already allocated take none, so overwriting them works at the limit too.
    fn check_space(&self, offset: u64, length: u64) -> BlockResult<()> {
        let Some(space) = &self.space else {
            return Ok(());
        };
        if length == 0 || space.allows(length) {
            return Ok(());
        }
        let start = offset / SECTOR_SIZE * SECTOR_SIZE;
        let end = (offset + length).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let data = self.seek(start, Whence::SeekData)?;
        let hole = self.seek(start, Whence::SeekHole)?.unwrap_or(self.size);
        if data == Some(start) && hole >= end {
            return Ok(());
        }
        Err(BlockError::NoSpace(format!(
            "local volume {}: the data directory reached [local] min_free or max_bytes",
            self.path.display()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock for read-modify-write of one sector.
    ///
    /// Only partial sectors take it, in reads as well as writes. Requests that do not overlap
    /// byte-wise can still share a sector only if each covers part of it; a partial write
    /// rewrites the whole sector, so without the lock one of two such writes would be lost,
    /// and a partial read racing one could see a torn sector (decrypting to garbage) or a hole
    /// just being filled. A whole-sector request shares its sector only with requests that
    /// overlap it, and NBD leaves the result of overlapping requests in flight at once
    /// undefined; so whole sectors go without, which keeps large aligned I/O lock-free and
    /// spares us ordering many locks. The lock guards no data, so a poisoned one is still good.
    fn lock_sector(&self, sector: u64) -> MutexGuard<'_, ()> {
        self.stripes[(sector % LOCK_STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `lock_sector`, or `None` if another thread holds it: the holder may be waiting for
    /// the disk (a read-modify-write reads the sector), and a caller that must not wait
    /// declines instead.
    fn try_lock_sector(&self, sector: u64) -> Option<MutexGuard<'_, ()>> {
        match self.stripes[(sector % LOCK_STRIPES as u64) as usize].try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Fails once the volume was deleted under its clients.
    fn check_live(&self) -> BlockResult<()> {
        if self.deleted.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BlockError::Io(format!(
                "local volume {}: the volume was deleted",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn check_writable(&self) -> BlockResult<()> {
        self.check_live()?;
        if self.read_only {
            Err(BlockError::ReadOnly)
        } else {
            self.check_write_back()
        }
    }

    /// Fails once a flush has failed (see `write_back_error`).
    fn check_write_back(&self) -> BlockResult<()> {
        match self.write_back_error.get() {
            None => Ok(()),
            Some(first) => Err(BlockError::Io(format!(
                "local volume {}: an earlier flush failed ({first}), so writes acknowledged \
                 before it may be lost; it refuses writes and flushes until it is reopened \
                 (disconnect every client of the volume)",
                self.path.display()
            ))),
        }
    }

    /// Keeps `BlockError`'s ENOSPC mapping and says which file and what failed.
    fn io_error(&self, action: &str, e: io::Error) -> BlockError {
        let message = format!("local volume {}: {action}: {e}", self.path.display());
        match BlockError::from(e) {
            BlockError::NoSpace(_) => BlockError::NoSpace(message),
            _ => BlockError::Io(message),
        }
    }

    /// Reads and decrypts one sector, under its lock; `Ok(false)` if `wait` is `No` and
    /// the sector is not in memory or its lock is held.
    fn load_sector(&self, sector: u64, plain: &mut [u8; SECTOR], wait: Wait) -> BlockResult<bool> {
        {
            let _guard = match wait {
                Wait::Yes => self.lock_sector(sector),
                Wait::No => match self.try_lock_sector(sector) {
                    Some(guard) => guard,
                    None => return Ok(false),
                },
            };
            if !self.pread(plain, sector * SECTOR_SIZE, wait)? {
                return Ok(false);
            }
        }
        self.cipher.open_sectors(plain, sector);
        Ok(true)
    }

    /// Fills `buf` from the file at `offset`. With `Wait::No`, one `preadv2(RWF_NOWAIT)`,
    /// which reads only from the page cache: `Ok(false)` if not all of `buf` was there (or the
    /// file system cannot say), and the caller retries with waiting.
    fn pread(&self, buf: &mut [u8], offset: u64, wait: Wait) -> BlockResult<bool> {
        if wait == Wait::Yes {
            self.file
                .read_exact_at(buf, offset)
                .map_err(|e| self.io_error("read", e))?;
            return Ok(true);
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the one iovec covers exactly `buf`, which outlives the call; the kernel
        // writes only within it.
        let read = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                off_t(offset)?,
                libc::RWF_NOWAIT,
            )
        };
        if read >= 0 {
            return Ok(read as usize == buf.len());
        }
        match Errno::last() {
            Errno::EAGAIN | Errno::EOPNOTSUPP | Errno::EINVAL => Ok(false),
            errno => Err(self.io_error("read", errno.into())),
        }
    }

    /// `read`, waiting for the disk or not; `Ok(false)` if not waiting and the data is not
    /// all in memory.
    fn read_with(&self, offset: u64, buf: &mut [u8], wait: Wait) -> BlockResult<bool> {
        self.check_live()?;
        check_range(offset, buf.len() as u64, self.size)?;
        let span = Span::new(offset, buf.len() as u64);
        if !span.whole.is_empty() {
            // Whole sectors go straight into the caller's buffer and are decrypted there.
            let at = span.whole_at as usize;
            let len = (span.whole.end - span.whole.start) as usize * SECTOR;
            let bytes = &mut buf[at..at + len];
            if !self.pread(bytes, span.whole.start * SECTOR_SIZE, wait)? {
                return Ok(false);
            }
            self.cipher.open_sectors(bytes, span.whole.start);
        }
        for piece in [span.head, span.tail].into_iter().flatten() {
            let mut sector = [0u8; SECTOR];
            if !self.load_sector(piece.sector, &mut sector, wait)? {
                return Ok(false);
            }
            let at = piece.at as usize;
            buf[at..at + piece.len].copy_from_slice(&sector[piece.start..piece.start + piece.len]);
        }
        Ok(true)
    }

    /// Read-modify-write of part of one sector: `data` (or zeros) goes at `piece.start`.
    fn patch_sector(&self, piece: Piece, data: Option<&[u8]>) -> BlockResult<()> {
        let _guard = self.lock_sector(piece.sector);
        let offset = piece.sector * SECTOR_SIZE;
        let mut sector = [0u8; SECTOR];
        self.file
            .read_exact_at(&mut sector, offset)
            .map_err(|e| self.io_error("read", e))?;
        self.cipher.open_sectors(&mut sector, piece.sector);
        let patched = &mut sector[piece.start..piece.start + piece.len];
        match data {
            Some(data) => patched.copy_from_slice(data),
            None => patched.fill(0),
        }
        self.cipher.encrypt(&mut sector, piece.sector);
        self.file
            .write_all_at(&sector, offset)
            .map_err(|e| self.io_error("write", e))
    }

    /// Encrypts and writes whole sectors starting at `first`, one `pwrite` per chunk.
    fn write_sectors(&self, first: u64, data: &[u8]) -> BlockResult<()> {
        with_scratch(|scratch| {
            let mut sector = first;
            for chunk in data.chunks(CHUNK) {
                let buf = &mut scratch[..chunk.len()];
                self.cipher.encrypt_into(chunk, buf, sector);
                self.file
                    .write_all_at(buf, sector * SECTOR_SIZE)
                    .map_err(|e| self.io_error("write", e))?;
                sector += (chunk.len() / SECTOR) as u64;
            }
            Ok(())
        })
    }

    /// Writes zeros over whole sectors without making holes: encrypted zeros, so they stay
    /// allocated, or with `encrypted` false raw zero bytes, which read as never written.
    fn fill_sectors(&self, sectors: Range<u64>, encrypted: bool) -> BlockResult<()> {
        let per_chunk = (CHUNK / SECTOR) as u64;
        with_scratch(|scratch| {
            let mut sector = sectors.start;
            while sector < sectors.end {
                let count = per_chunk.min(sectors.end - sector);
                let buf = &mut scratch[..count as usize * SECTOR];
                buf.fill(0);
                if encrypted {
                    self.cipher.encrypt(buf, sector);
                }
                self.file
                    .write_all_at(buf, sector * SECTOR_SIZE)
                    .map_err(|e| self.io_error("write zeros", e))?;
                sector += count;
            }
            Ok(())
        })
    }

    /// Makes whole sectors holes with one `fallocate`, whose cost depends on how much of the
    /// range is allocated, not on its length.
    fn punch(&self, sectors: Range<u64>) -> BlockResult<()> {
        let offset = off_t(sectors.start * SECTOR_SIZE)?;
        let length = off_t((sectors.end - sectors.start) * SECTOR_SIZE)?;
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, flags, offset, length) {
            Ok(()) => Ok(()),
            // A file system that cannot punch holes still gets the range zeroed, slowly: zero
            // bytes read as never written.
            Err(Errno::EOPNOTSUPP) => self.fill_sectors(sectors, false),
            Err(errno) => Err(self.io_error("punch a hole", errno.into())),
        }
    }

    /// Where the next data (or, with `Whence::SeekHole`, the next hole) at or after `offset`
    /// begins; `None` when there is no more data.
    fn seek(&self, offset: u64, whence: Whence) -> BlockResult<Option<u64>> {
        match lseek(&self.file, off_t(offset)?, whence) {
            // The file position this moves is never used: all I/O is positional.
            Ok(found) => Ok(Some(u64::try_from(found).unwrap_or(offset))),
            Err(Errno::ENXIO) => Ok(None),
            Err(errno) => Err(self.io_error("look for holes", errno.into())),
        }
    }
}

impl BlockDevice for LocalVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.read_with(offset, buf, Wait::Yes).map(|_| ())
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Option<BlockResult<()>> {
        match self.read_with(offset, buf, Wait::No) {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> BlockResult<()> {
        self.check_writable()?;
        check_range(offset, data.len() as u64, self.size)?;
        self.check_space(offset, data.len() as u64)?;
        let span = Span::new(offset, data.len() as u64);
        if !span.whole.is_empty() {
            let at = span.whole_at as usize;
            let len = (span.whole.end - span.whole.start) as usize * SECTOR;
            self.write_sectors(span.whole.start, &data[at..at + len])?;
        }
        for piece in [span.head, span.tail].into_iter().flatten() {
            let at = piece.at as usize;
            self.patch_sector(piece, Some(&data[at..at + piece.len]))?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Whole aligned sectors only, and only while the space budget answers from its last
    /// measurement: such a write takes no lock and reads nothing, it encrypts and `pwrite`s.
    /// (The kernel may still pace a `pwrite` when dirty pages pile up; `RWF_NOWAIT` would
    /// decline instead, but ext4 refuses it for buffered writes: decision 0002.)
    fn write_now(&self, offset: u64, data: &mut [u8]) -> Option<BlockResult<()>> {
        let aligned = offset % SECTOR_SIZE == 0 && data.len() % SECTOR == 0 && !data.is_empty();
        if !aligned {
            return None;
        }
        if let Err(e) = self
            .check_writable()
            .and_then(|()| check_range(offset, data.len() as u64, self.size))
        {
            return Some(Err(e));
        }
        if let Some(space) = &self.space
            && space.allows_now(data.len() as u64) != Some(true)
        {
            return None;
        }
        Some(self.write_sectors(offset / SECTOR_SIZE, data))
    }

    fn flush(&self) -> BlockResult<()> {
        let _one_at_a_time = self.sync.lock().unwrap_or_else(PoisonError::into_inner);
        self.check_live()?;
        self.check_write_back()?;
        self.file.sync_data().map_err(|e| {
            let _ = self.write_back_error.set(e.to_string());
            self.io_error("flush", e)
        })
    }

    /// The contract promises that a trimmed range reads as zeros, so this is
    /// `write_zeroes(.., may_trim = true)`: partial sectors at the ends are zeroed, not left.
    fn trim(&self, offset: u64, length: u64) -> BlockResult<()> {
        self.write_zeroes(offset, length, true)
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool) -> BlockResult<()> {
        self.check_writable()?;
        check_range(offset, length, self.size)?;
        if !may_trim {
            self.check_space(offset, length)?;
        }
        let span = Span::new(offset, length);
        if !span.whole.is_empty() {
            if may_trim {
                self.punch(span.whole)?;
            } else {
                self.fill_sectors(span.whole, true)?;
            }
        }
        for piece in [span.head, span.tail].into_iter().flatten() {
            self.patch_sector(piece, None)?;
        }
        Ok(())
    }

    fn mark_deleted(&self) {
        self.deleted
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn extents(&self, offset: u64, length: u64) -> BlockResult<Vec<Extent>> {
        self.check_live()?;
        check_range(offset, length, self.size)?;
        if length == 0 {
            return Err(BlockError::Invalid(
                "block status of an empty range".to_string(),
            ));
        }
        let end = offset + length;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |length: u64, hole: bool| match extents.last_mut() {
            Some(last) if last.hole == hole => last.length += length,
            _ => extents.push(Extent {
                length,
                hole,
                zero: hole,
            }),
        };
        let mut pos = offset;
        let mut count = 0;
        while pos < end && count < MAX_EXTENTS {
            let data = self.seek(pos, Whence::SeekData)?.unwrap_or(end);
            let next = if data > pos {
                let stop = data.min(end);
                push(stop - pos, true);
                stop
            } else {
                let hole = self.seek(pos, Whence::SeekHole)?.unwrap_or(end);
                // A hole punched between the two seeks can make SEEK_HOLE answer `pos`;
                // calling the sector data is always a safe answer, and keeps us moving.
                let stop = if hole > pos {
                    hole.min(end)
                } else {
                    ((pos / SECTOR_SIZE + 1) * SECTOR_SIZE).min(end)
                };
                push(stop - pos, false);
                stop
            };
            pos = next;
            count += 1;
        }
        Ok(extents)
    }
}

/// AES-256-XTS over whole sectors, tweak = the sector index: the same output as
/// `xts_mode::Xts128::<Aes256>::encrypt_area(.., 4096, sector, get_tweak_default)` (a test
/// checks it). The volume's throughput is bounded by this, so it is OpenSSL's: 5.8 GB/s per
/// core here with AES-NI and VAES, against 1.9 GB/s for RustCrypto's AES with the XTS masks
/// computed by hand, and 0.42 GB/s for xts-mode (docs/decisions/0003).
///
/// An OpenSSL context is not shareable while in use, and setting a key expands it, so the
/// contexts, keyed once, wait in a pool (one per direction) as long as the volume is open;
/// there are never more of them than threads working on the volume at once.
///
/// The key sits in a `Secret` (locked, out of core dumps). The contexts hold OpenSSL's
/// expansion of it (the AES round keys) in ordinary memory, which OpenSSL wipes when a
/// context is freed, at the volume's close.
struct SectorCipher {
    key: crate::seal::Secret<64>,
    encrypters: Mutex<Vec<CipherCtx>>,
    decrypters: Mutex<Vec<CipherCtx>>,
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

impl SectorCipher {
    fn new(key: &[u8; 64]) -> SectorCipher {
        SectorCipher {
            key: crate::seal::Secret::new_with(|ours| ours.copy_from_slice(key)),
            encrypters: Mutex::new(Vec::new()),
            decrypters: Mutex::new(Vec::new()),
        }
    }

    /// Runs `body` with a context keyed for `direction`, then puts it back.
    fn with_context(&self, direction: Direction, body: impl FnOnce(&mut CipherCtx)) {
        let pool = match direction {
            Direction::Encrypt => &self.encrypters,
            Direction::Decrypt => &self.decrypters,
        };
        let taken = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut context = taken.unwrap_or_else(|| self.keyed_context(direction));
        body(&mut context);
        pool.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(context);
    }

    fn keyed_context(&self, direction: Direction) -> CipherCtx {
        let cipher = openssl::cipher::Cipher::aes_256_xts();
        let key = Some(&self.key[..]);
        // Failing here means OpenSSL cannot allocate or lacks AES-XTS: nothing a volume can
        // work around. (It also refuses a key whose halves are equal, which a derived volume
        // key has with probability 2^-256.)
        let mut context = CipherCtx::new().expect("OpenSSL: a cipher context");
        match direction {
            Direction::Encrypt => context.encrypt_init(Some(cipher), key, None),
            Direction::Decrypt => context.decrypt_init(Some(cipher), key, None),
        }
        .expect("OpenSSL: AES-256-XTS");
        context
    }

    /// Encrypts whole sectors in place; `bytes` starts at sector `first`.
    fn encrypt(&self, bytes: &mut [u8], first: u64) {
        self.with_context(Direction::Encrypt, |context| {
            for (sector, plain) in (first..).zip(bytes.chunks_exact_mut(SECTOR)) {
                Self::apply(context, Direction::Encrypt, plain, sector);
            }
        });
    }

    /// Encrypts whole sectors from `plain` into `out`, the same length; one pass over the
    /// data instead of a copy and then an encryption in place.
    fn encrypt_into(&self, plain: &[u8], out: &mut [u8], first: u64) {
        self.with_context(Direction::Encrypt, |context| {
            let sectors = plain.chunks_exact(SECTOR).zip(out.chunks_exact_mut(SECTOR));
            for (sector, (plain, out)) in (first..).zip(sectors) {
                let tweak = u128::from(sector).to_le_bytes();
                context
                    .encrypt_init(None, None, Some(&tweak))
                    .and_then(|()| context.cipher_update(plain, Some(out)))
                    .expect("OpenSSL: AES-XTS over a keyed context and a whole sector");
            }
        });
    }

    /// Decrypts whole sectors in place, leaving all-zero sectors (never written) as zeros.
    fn open_sectors(&self, bytes: &mut [u8], first: u64) {
        self.with_context(Direction::Decrypt, |context| {
            for (sector, stored) in (first..).zip(bytes.chunks_exact_mut(SECTOR)) {
                if !is_zero(stored) {
                    Self::apply(context, Direction::Decrypt, stored, sector);
                }
            }
        });
    }

    fn apply(context: &mut CipherCtx, direction: Direction, data: &mut [u8], sector: u64) {
        let tweak = u128::from(sector).to_le_bytes();
        match direction {
            Direction::Encrypt => context.encrypt_init(None, None, Some(&tweak)),
            Direction::Decrypt => context.decrypt_init(None, None, Some(&tweak)),
        }
        .and_then(|()| context.cipher_update_inplace(data, SECTOR))
        .expect("OpenSSL: AES-XTS over a keyed context and a whole sector");
    }
}

/// Ciphertext differs from zero in its first bytes, so this usually stops at once; a zero
/// sector costs one pass, in 64-byte steps the compiler vectorizes.
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `body` with this thread's `CHUNK`-byte buffer, so the write path allocates once per
/// thread rather than once per request.
fn with_scratch<T>(body: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < CHUNK {
            scratch.resize(CHUNK, 0);
        }
        body(&mut scratch[..CHUNK])
    })
}

/// Whether a read may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

fn off_t(value: u64) -> BlockResult<i64> {
    i64::try_from(value).map_err(|_| BlockError::Invalid(format!("offset {value} is too large")))
}

fn check_size(path: &Path, size: u64) -> Result<(), LocalVolumeError> {
    if size == 0 || size % SECTOR_SIZE != 0 || size > MAX_SIZE {
        return Err(LocalVolumeError::BadSize {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(())
}

fn file_error(path: &Path, action: &'static str, source: io::Error) -> LocalVolumeError {
    LocalVolumeError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Part of one sector: `len` bytes from `start` within it, at `at` within the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    sector: u64,
    start: usize,
    len: usize,
    at: u64,
}

/// A request's range cut at sector boundaries: the partial sectors at its ends, if any, and
/// the whole sectors between them.
#[derive(Debug, PartialEq, Eq)]
struct Span {
    head: Option<Piece>,
    /// Sector indices.
    whole: Range<u64>,
    /// Where the first whole sector starts within the request.
    whole_at: u64,
    tail: Option<Piece>,
}

impl Span {
    fn new(offset: u64, length: u64) -> Span {
        let end = offset + length;
        let first = offset / SECTOR_SIZE;
        let start = (offset % SECTOR_SIZE) as usize;
        if length == 0 {
            return Span {
                head: None,
                whole: first..first,
                whole_at: 0,
                tail: None,
            };
        }
        if (end - 1) / SECTOR_SIZE == first && length < SECTOR_SIZE {
            // Inside one sector, not covering it.
            return Span {
                head: Some(Piece {
                    sector: first,
                    start,
                    len: length as usize,
                    at: 0,
                }),
                whole: first..first,
                whole_at: 0,
                tail: None,
            };
        }
        let whole = offset.div_ceil(SECTOR_SIZE)..end / SECTOR_SIZE;
        let head = (start != 0).then_some(Piece {
            sector: first,
            start,
            len: SECTOR - start,
            at: 0,
        });
        let tail = (end % SECTOR_SIZE != 0).then_some(Piece {
            sector: whole.end,
            start: 0,
            len: (end % SECTOR_SIZE) as usize,
            at: whole.end * SECTOR_SIZE - offset,
        });
        Span {
            head,
            whole_at: whole.start * SECTOR_SIZE - offset,
            whole,
            tail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const KEY: [u8; 64] = {
        let mut key = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            key[i] = i as u8 * 3 + 1;
            i += 1;
        }
        key
    };
    const S: u64 = SECTOR_SIZE;

    fn create(size: u64) -> (tempfile::TempDir, PathBuf, LocalVolume) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume.img");
        let volume = LocalVolume::create(&path, size, &KEY).unwrap();
        (dir, path, volume)
    }

    fn read(volume: &LocalVolume, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; len];
        volume.read(offset, &mut buf).unwrap();
        buf
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1)
            .collect()
    }

    #[test]
    fn sector_cipher_matches_xts_mode() {
        use aes::Aes256;
        use aes::cipher::KeyInit;
        use aes::cipher::generic_array::GenericArray;
        use rand::RngCore;
        use xts_mode::{Xts128, get_tweak_default};
        let mut rng = rand::rng();
        for _ in 0..8 {
            let mut key = [0u8; 64];
            rng.fill_bytes(&mut key);
            let reference = Xts128::new(
                Aes256::new(GenericArray::from_slice(&key[..32])),
                Aes256::new(GenericArray::from_slice(&key[32..])),
            );
            let ours = SectorCipher::new(&key);
            for first in [0u64, 1, 255, 1 << 20, (1 << 51) - 3] {
                let mut plain = vec![0u8; 3 * SECTOR];
                rng.fill_bytes(&mut plain);
                let mut expected = plain.clone();
                reference.encrypt_area(&mut expected, SECTOR, u128::from(first), get_tweak_default);
                let mut actual = plain.clone();
                ours.encrypt(&mut actual, first);
                assert_eq!(actual, expected, "sector {first}");
                let mut out = vec![0u8; plain.len()];
                ours.encrypt_into(&plain, &mut out, first);
                assert_eq!(out, expected, "sector {first}, out of place");
                ours.open_sectors(&mut actual, first);
                assert_eq!(actual, plain);
            }
        }
    }

    #[test]
    fn cached_reads_answer_from_memory_and_decline_otherwise() {
        let (_dir, path, volume) = create(64 * S);
        let data = pattern(9, 3 * S as usize + 100);
        volume.write(S - 50, &mut data.clone(), false).unwrap();
        volume.flush().unwrap();
        let expected = read(&volume, S - 50, data.len());
        assert_eq!(expected, data);
        let mut buf = vec![0xAA; data.len()];
        assert!(matches!(volume.read_cached(S - 50, &mut buf), Some(Ok(()))));
        assert_eq!(buf, data);

        // Out of the page cache (written back above, so dropping it is allowed).
        let file = File::open(&path).unwrap();
        nix::fcntl::posix_fadvise(
            &file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        assert!(
            volume.read_cached(S - 50, &mut buf).is_none(),
            "a read from disk was answered as cached"
        );
        assert_eq!(read(&volume, S - 50, data.len()), data);
        let mut again = vec![0xAA; data.len()];
        assert!(matches!(
            volume.read_cached(S - 50, &mut again),
            Some(Ok(()))
        ));
        assert_eq!(again, data);
        // Out of range is an error, cached or not.
        assert!(matches!(
            volume.read_cached(64 * S - 1, &mut [0u8; 2]),
            Some(Err(BlockError::Invalid(_)))
        ));
    }

    #[test]
    fn cached_reads_decline_a_partial_sector_whose_lock_is_held() {
        let (_dir, _path, volume) = create(64 * S);
        let volume = Arc::new(volume);
        volume
            .write(0, &mut pattern(3, 8 * S as usize), false)
            .unwrap();
        let mut buf = vec![0u8; 100];
        assert!(
            matches!(volume.read_cached(S + 10, &mut buf), Some(Ok(()))),
            "in memory and unlocked: answered"
        );
        // A read-modify-write of sector 1 holds its lock while it reads the disk: a cached
        // read of part of that sector must decline at once, not wait for it.
        let held = volume.lock_sector(1);
        let reader = volume.clone();
        let (done, answered) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 100];
            let _ = done.send(reader.read_cached(S + 10, &mut buf).is_some());
        });
        let outcome = answered.recv_timeout(std::time::Duration::from_secs(5));
        drop(held);
        assert_eq!(outcome, Ok(false), "a cached read waited for a sector lock");
        // Whole sectors take no lock: still answered.
        let mut whole = vec![0u8; S as usize];
        let _held = volume.lock_sector(1);
        assert!(matches!(volume.read_cached(S, &mut whole), Some(Ok(()))));
    }

    #[test]
    fn writes_now_only_whole_sectors_the_space_budget_already_allows() {
        let (dir, _path, mut volume) = create(64 * S);
        let data = pattern(5, 2 * S as usize);
        assert!(
            volume.write_now(10, &mut data[..100].to_vec()).is_none(),
            "a partial sector"
        );
        assert!(volume.write_now(S, &mut data.clone()).unwrap().is_ok());
        let mut back = vec![0u8; data.len()];
        volume.read(S, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(matches!(
            volume.write_now(63 * S, &mut data.clone()),
            Some(Err(BlockError::Invalid(_)))
        ));
        // With a space budget: declined until a measurement exists (measuring is I/O),
        // answered from it afterwards, declined again once it would not fit.
        let budget = Arc::new(SpaceBudget::new(dir.path(), 0, Some(u64::MAX)));
        volume.set_space_budget(budget.clone());
        assert!(
            volume.write_now(4 * S, &mut data.clone()).is_none(),
            "no measurement yet"
        );
        assert!(budget.allows(0));
        assert!(volume.write_now(4 * S, &mut data.clone()).unwrap().is_ok());
        let full = Arc::new(SpaceBudget::new(dir.path(), u64::MAX, None));
        assert!(!full.allows(0), "nothing fits under min_free = u64::MAX");
        volume.set_space_budget(full);
        assert!(
            volume.write_now(8 * S, &mut data.clone()).is_none(),
            "would not fit: not answered here"
        );
    }

    #[test]
    fn span_cuts_at_sector_boundaries() {
        let piece = |sector, start, len, at| Piece {
            sector,
            start,
            len,
            at,
        };
        assert_eq!(
            Span::new(S, 2 * S),
            Span {
                head: None,
                whole: 1..3,
                whole_at: 0,
                tail: None
            }
        );
        assert_eq!(
            Span::new(S + 10, 20),
            Span {
                head: Some(piece(1, 10, 20, 0)),
                whole: 1..1,
                whole_at: 0,
                tail: None
            }
        );
        assert_eq!(
            Span::new(100, 2 * S),
            Span {
                head: Some(piece(0, 100, SECTOR - 100, 0)),
                whole: 1..2,
                whole_at: S - 100,
                tail: Some(piece(2, 0, 100, 2 * S - 100)),
            }
        );
        assert_eq!(
            Span::new(100, S),
            Span {
                head: Some(piece(0, 100, SECTOR - 100, 0)),
                whole: 1..1,
                whole_at: S - 100,
                tail: Some(piece(1, 0, 100, S - 100)),
            }
        );
        assert_eq!(Span::new(S, S - 1).tail, None);
        assert_eq!(Span::new(S, S - 1).head, Some(piece(1, 0, SECTOR - 1, 0)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            offset: u64,
            len: u64,
            seed: u8,
            fua: bool,
        },
        Read {
            offset: u64,
            len: u64,
        },
        Trim {
            offset: u64,
            len: u64,
        },
        WriteZeroes {
            offset: u64,
            len: u64,
            may_trim: bool,
        },
        Extents {
            offset: u64,
            len: u64,
        },
        Flush,
        Reopen,
    }

    const MODEL_SECTORS: u64 = 16;
    const MODEL_SIZE: u64 = MODEL_SECTORS * S;

    fn range() -> impl Strategy<Value = (u64, u64)> {
        prop_oneof![
            // Whole sectors.
            (0..MODEL_SECTORS, 0..=MODEL_SECTORS)
                .prop_map(|(first, count)| (first * S, count.min(MODEL_SECTORS - first) * S)),
            // Small, anywhere: mostly inside one sector or across one boundary.
            (0..MODEL_SIZE)
                .prop_flat_map(|offset| (Just(offset), 0..=(MODEL_SIZE - offset).min(600))),
            // Anywhere, spanning sectors.
            (0..MODEL_SIZE).prop_flat_map(|offset| (Just(offset), 0..=MODEL_SIZE - offset)),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (range(), any::<u8>(), any::<bool>())
                .prop_map(|((offset, len), seed, fua)| Op::Write { offset, len, seed, fua }),
            3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
            1 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
            2 => (range(), any::<bool>())
                .prop_map(|((offset, len), may_trim)| Op::WriteZeroes { offset, len, may_trim }),
            1 => range().prop_map(|(offset, len)| Op::Extents { offset, len }),
            1 => Just(Op::Flush),
            1 => Just(Op::Reopen),
        ]
    }

    /// Sectors a request touches, and the whole ones among them.
    fn sectors(offset: u64, len: u64) -> (Range<u64>, Range<u64>) {
        // An empty request touches nothing, not the sector its offset falls in.
        let touched = if len == 0 {
            0..0
        } else {
            offset / S..(offset + len).div_ceil(S)
        };
        let whole = offset.div_ceil(S)..(offset + len) / S;
        (touched, whole)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The volume against a `Vec<u8>`: every read agrees, holes read as zeros, and
        /// sectors that must stay allocated (written, or zeroed without may_trim) are never
        /// reported as holes.
        #[test]
        fn behaves_like_a_byte_vector(ops in proptest::collection::vec(op(), 1..40)) {
            let (_dir, path, volume) = create(MODEL_SIZE);
            let mut volume = Some(volume);
            let mut model = vec![0u8; MODEL_SIZE as usize];
            let mut allocated = vec![false; MODEL_SECTORS as usize];
            for op in ops {
                let v = volume.as_ref().unwrap();
                match op {
                    Op::Write { offset, len, seed, fua } => {
                        // Seed 0 writes zeros, which must still be stored encrypted.
                        let data = if seed == 0 { vec![0; len as usize] } else { pattern(seed, len as usize) };
                        v.write(offset, &mut data.clone(), fua).unwrap();
                        model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                        for s in sectors(offset, len).0 { allocated[s as usize] = true; }
                    }
                    Op::Read { offset, len } => {
                        let expected = &model[offset as usize..(offset + len) as usize];
                        prop_assert_eq!(read(v, offset, len as usize), expected);
                        // A cached read may decline, but what it answers must be right.
                        let mut cached = vec![0xAA; len as usize];
                        match v.read_cached(offset, &mut cached) {
                            Some(Ok(())) => prop_assert_eq!(&cached[..], expected),
                            Some(Err(e)) => prop_assert!(false, "read_cached failed: {e}"),
                            None => {}
                        }
                    }
                    Op::Trim { offset, len } | Op::WriteZeroes { offset, len, may_trim: true } => {
                        if matches!(op, Op::Trim { .. }) {
                            v.trim(offset, len).unwrap();
                        } else {
                            v.write_zeroes(offset, len, true).unwrap();
                        }
                        model[offset as usize..(offset + len) as usize].fill(0);
                        let (touched, whole) = sectors(offset, len);
                        for s in touched {
                            allocated[s as usize] = !whole.contains(&s);
                        }
                    }
                    Op::WriteZeroes { offset, len, may_trim: false } => {
                        v.write_zeroes(offset, len, false).unwrap();
                        model[offset as usize..(offset + len) as usize].fill(0);
                        for s in sectors(offset, len).0 { allocated[s as usize] = true; }
                    }
                    Op::Extents { offset, len } => {
                        if len == 0 {
                            prop_assert!(v.extents(offset, len).is_err());
                            continue;
                        }
                        let extents = v.extents(offset, len).unwrap();
                        prop_assert!(!extents.is_empty());
                        prop_assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), len);
                        let mut pos = offset;
                        for (i, extent) in extents.iter().enumerate() {
                            prop_assert!(extent.length > 0);
                            prop_assert_eq!(extent.hole, extent.zero);
                            if i > 0 { prop_assert_ne!(extent.hole, extents[i - 1].hole, "not merged"); }
                            if extent.hole {
                                let bytes = &model[pos as usize..(pos + extent.length) as usize];
                                prop_assert!(bytes.iter().all(|&b| b == 0), "hole at {} holds data", pos);
                                for s in sectors(pos, extent.length).0 {
                                    prop_assert!(!allocated[s as usize], "allocated sector {} reported as a hole", s);
                                }
                            }
                            pos += extent.length;
                        }
                    }
                    Op::Flush => v.flush().unwrap(),
                    Op::Reopen => {
                        drop(volume.take());
                        volume = Some(LocalVolume::open(&path, MODEL_SIZE, &KEY, false).unwrap());
                    }
                }
            }
            prop_assert_eq!(read(volume.as_ref().unwrap(), 0, MODEL_SIZE as usize), model);
        }
    }

    #[test]
    fn nothing_on_disk_reads_back_without_the_key() {
        let (_dir, path, volume) = create(64 * S);
        let marker = b"firn plaintext marker, must not reach the disk. ";
        let text: Vec<u8> = marker.iter().copied().cycle().take(3 * SECTOR).collect();
        volume.write(0, &mut text.clone(), false).unwrap();
        volume
            .write(5 * S + 123, &mut text[..2000].to_vec(), false)
            .unwrap();
        volume.write(10 * S, &mut [0u8; SECTOR], false).unwrap();
        volume.flush().unwrap();
        drop(volume);

        let raw = std::fs::read(&path).unwrap();
        assert_eq!(raw.len() as u64, 64 * S);
        for window in [&marker[..16], &marker[20..36]] {
            assert!(
                !raw.windows(window.len()).any(|w| w == window),
                "plaintext {:?} found in the file",
                String::from_utf8_lossy(window)
            );
        }
        // A written zero sector is stored encrypted, not as zeros.
        assert!(!is_zero(&raw[10 * SECTOR..11 * SECTOR]));

        let mut other_key = KEY;
        other_key[40] ^= 1;
        let wrong = LocalVolume::open(&path, 64 * S, &other_key, true).unwrap();
        assert_ne!(read(&wrong, 0, 3 * SECTOR), text);
        assert_ne!(read(&wrong, 5 * S + 123, 2000), &text[..2000]);
        let right = LocalVolume::open(&path, 64 * S, &KEY, true).unwrap();
        assert_eq!(read(&right, 0, 3 * SECTOR), text);
        assert_eq!(read(&right, 5 * S + 123, 2000), &text[..2000]);
        assert_eq!(read(&right, 10 * S, SECTOR), vec![0u8; SECTOR]);
    }

    fn extent(length: u64, hole: bool) -> Extent {
        Extent {
            length,
            hole,
            zero: hole,
        }
    }

    #[test]
    fn trim_makes_holes_that_extents_report() {
        let (_dir, _path, volume) = create(16 * S);
        assert_eq!(volume.extents(0, 16 * S).unwrap(), [extent(16 * S, true)]);
        volume.write(0, &mut pattern(1, 4 * SECTOR), false).unwrap();
        assert_eq!(
            volume.extents(0, 16 * S).unwrap(),
            [extent(4 * S, false), extent(12 * S, true)]
        );
        // The range reaches into sectors 0 and 3: those are zeroed, 1 and 2 become holes.
        volume.trim(S - 10, 2 * S + 20).unwrap();
        assert_eq!(
            volume.extents(0, 16 * S).unwrap(),
            [
                extent(S, false),
                extent(2 * S, true),
                extent(S, false),
                extent(12 * S, true)
            ]
        );
        // Clipped to the asked range.
        assert_eq!(
            volume.extents(S / 2, 2 * S).unwrap(),
            [extent(S / 2, false), extent(3 * S / 2, true)]
        );
        let mut expected = pattern(1, 4 * SECTOR);
        expected[SECTOR - 10..3 * SECTOR + 10].fill(0);
        assert_eq!(read(&volume, 0, 4 * SECTOR), expected);

        // Zeroing without may_trim keeps the sectors allocated.
        volume.write_zeroes(8 * S, 2 * S, false).unwrap();
        assert_eq!(
            volume.extents(6 * S, 6 * S).unwrap(),
            [
                extent(2 * S, true),
                extent(2 * S, false),
                extent(2 * S, true)
            ]
        );
        assert_eq!(read(&volume, 8 * S, 2 * SECTOR), vec![0u8; 2 * SECTOR]);
        volume.write_zeroes(8 * S, 2 * S, true).unwrap();
        assert_eq!(volume.extents(6 * S, 6 * S).unwrap(), [extent(6 * S, true)]);
    }

    #[test]
    fn write_zeroes_without_trim_spans_many_chunks() {
        let size = 8 * CHUNK as u64 + 3 * S;
        let (_dir, _path, volume) = create(size);
        volume
            .write(0, &mut pattern(9, size as usize), false)
            .unwrap();
        volume.write_zeroes(100, size - 200, false).unwrap();
        let data = read(&volume, 0, size as usize);
        assert_eq!(data[..100], pattern(9, 100));
        assert!(is_zero(&data[100..size as usize - 100]));
        assert_eq!(volume.extents(0, size).unwrap(), [extent(size, false)]);
    }

    #[test]
    fn trimming_a_2_tib_volume_is_instant() {
        let size = 2 << 40;
        let (_dir, _path, volume) = create(size);
        for offset in [0, 1 << 40, (1 << 40) + 7 * S, size - S] {
            volume
                .write(offset, &mut pattern(3, SECTOR), false)
                .unwrap();
        }
        volume
            .write(size - 3 * S - 5, &mut pattern(4, 2 * SECTOR), false)
            .unwrap();
        volume.flush().unwrap();
        let started = Instant::now();
        volume.trim(0, size).unwrap();
        let elapsed = started.elapsed();
        eprintln!("trim of a 2 TiB volume took {elapsed:?}");
        assert!(elapsed < Duration::from_millis(500), "took {elapsed:?}");
        assert_eq!(volume.extents(0, size).unwrap(), [extent(size, true)]);
        assert_eq!(read(&volume, 1 << 40, SECTOR), vec![0u8; SECTOR]);

        let started = Instant::now();
        volume.write_zeroes(0, size, true).unwrap();
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn read_only_volumes_refuse_changes() {
        let (_dir, path, volume) = create(4 * S);
        volume.write(0, &mut pattern(5, SECTOR), false).unwrap();
        drop(volume);
        let volume = LocalVolume::open(&path, 4 * S, &KEY, true).unwrap();
        assert!(volume.read_only());
        assert!(matches!(
            volume.write(0, &mut b"x".to_owned(), false),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(volume.trim(0, S), Err(BlockError::ReadOnly)));
        assert!(matches!(
            volume.write_zeroes(0, S, false),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(
            volume.write_zeroes(0, S, true),
            Err(BlockError::ReadOnly)
        ));
        assert_eq!(read(&volume, 0, SECTOR), pattern(5, SECTOR));
        volume.flush().unwrap();
    }

    #[test]
    fn out_of_range_requests_are_refused() {
        let (_dir, _path, volume) = create(4 * S);
        let invalid =
            |result: BlockResult<()>| assert!(matches!(result, Err(BlockError::Invalid(_))));
        invalid(volume.read(4 * S - 10, &mut [0; 11]));
        invalid(volume.read(u64::MAX, &mut [0; 1]));
        invalid(volume.write(4 * S, &mut b"x".to_owned(), false));
        invalid(volume.write(u64::MAX - 1, &mut b"xyz".to_owned(), false));
        invalid(volume.trim(0, 4 * S + 1));
        invalid(volume.write_zeroes(S, u64::MAX, true));
        invalid(volume.extents(0, 4 * S + 1).map(drop));
        invalid(volume.extents(S, 0).map(drop));
        // Empty requests at the very end are fine.
        volume.read(4 * S, &mut []).unwrap();
        volume.write(4 * S, &mut [], true).unwrap();
        volume.trim(4 * S, 0).unwrap();
    }

    #[test]
    fn create_and_open_check_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        for size in [0, 4095, S + 1, MAX_SIZE + S] {
            assert!(matches!(
                LocalVolume::create(&path, size, &KEY),
                Err(LocalVolumeError::BadSize { .. })
            ));
            assert!(!path.exists());
        }
        LocalVolume::create(&path, 8 * S, &KEY).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * S);
        let err = LocalVolume::create(&path, 8 * S, &KEY).unwrap_err();
        assert!(err.to_string().contains("v.img"), "{err}");
        let err = LocalVolume::open(&path, 4 * S, &KEY, false).unwrap_err();
        assert!(
            matches!(err, LocalVolumeError::SizeMismatch { actual, .. } if actual == 8 * S),
            "{err}"
        );
        assert!(matches!(
            LocalVolume::open(dir.path(), 8 * S, &KEY, true),
            Err(LocalVolumeError::NotAFile { .. })
        ));
        assert!(matches!(
            LocalVolume::open(dir.path().join("missing"), S, &KEY, true),
            Err(LocalVolumeError::Io { .. })
        ));
        // A size the file system cannot hold fails and leaves nothing behind.
        let huge = dir.path().join("huge.img");
        assert!(LocalVolume::create(&huge, MAX_SIZE, &KEY).is_err());
        assert!(!huge.exists());
    }

    #[test]
    fn zero_bytes_in_allocated_space_read_as_never_written() {
        // What a file system with blocks larger than a sector leaves around a small write.
        let (_dir, path, volume) = create(4 * S);
        volume.write(0, &mut pattern(2, 2 * SECTOR), false).unwrap();
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&[0u8; SECTOR], S).unwrap();
        assert_eq!(
            read(&volume, 0, 2 * SECTOR)[SECTOR..],
            vec![0u8; SECTOR][..]
        );
        assert_eq!(read(&volume, S + 7, 9), vec![0u8; 9]);
    }

    #[test]
    fn concurrent_partial_writes_to_one_sector_keep_every_update() {
        let (_dir, _path, volume) = create(4 * S);
        let volume = Arc::new(volume);
        // Eight writers, each owning 300 bytes around the boundary of sectors 0 and 1.
        let region = |t: u64| (3000 + t * 300, 300usize);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let volume = Arc::clone(&volume);
                std::thread::spawn(move || {
                    let (offset, len) = region(t);
                    for round in 0..300u32 {
                        let byte = (t as u8 + 1).wrapping_mul(17).wrapping_add(round as u8);
                        volume.write(offset, &mut vec![byte; len], false).unwrap();
                        // Reads of this region are never disturbed by the others' writes.
                        assert_eq!(read(&volume, offset, len), vec![byte; len]);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        for t in 0..8u64 {
            let (offset, len) = region(t);
            let last = (t as u8 + 1).wrapping_mul(17).wrapping_add(299u32 as u8);
            assert_eq!(read(&volume, offset, len), vec![last; len], "writer {t}");
        }
    }

    #[test]
    fn extents_stop_after_the_limit_yet_start_at_the_offset() {
        let sectors = 2 * MAX_EXTENTS as u64 + 100;
        let (_dir, _path, volume) = create(sectors * S);
        for sector in (0..sectors).step_by(2) {
            volume
                .write(sector * S, &mut pattern(7, SECTOR), false)
                .unwrap();
        }
        let offset = 100;
        let extents = volume.extents(offset, sectors * S - offset).unwrap();
        assert_eq!(extents.len(), MAX_EXTENTS);
        assert_eq!(extents[0], extent(S - offset, false));
        assert_eq!(extents[1], extent(S, true));
        assert!(extents.windows(2).all(|w| w[0].hole != w[1].hole));
        assert!(extents.iter().map(|e| e.length).sum::<u64>() < sectors * S - offset);
    }
}
