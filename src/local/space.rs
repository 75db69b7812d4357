//! The local space limits, `[local] min_free` (space kept free on the data directory's file
//! system) and `[local] max_bytes` (the most the data directory may hold). Volume writes ask
//! [`SpaceBudget::allows`] before they may take new space and fail with ENOSPC when it says
//! no; the metadata store and the logs never ask, so they keep working in the space the
//! limits hold back.
//!
//! Measuring is a `statvfs`, and a walk of the data directory when `max_bytes` is set; a
//! measurement is reused for
//! [`FRESH`], counting what it granted since, and taken again at once when that count would
//! cross a limit, so the limits hold to within the writes in flight.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a measurement answers requests that fit in it.
pub const FRESH: Duration = Duration::from_millis(500);
/// The shortest time between two measurements when requests do not fit: a full disk is not
/// walked for every write.
const RETRY: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub struct SpaceBudget {
    data_dir: PathBuf,
    min_free: u64,
    max_bytes: Option<u64>,
    last: Mutex<Option<Measure>>,
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    at: Instant,
    /// Free bytes on the file system, for unprivileged users.
    free: u64,
    /// Bytes the data directory's files take on disk.
    used: u64,
    /// Bytes allowed since the measurement.
    granted: u64,
}

impl SpaceBudget {
    pub fn new(data_dir: impl Into<PathBuf>, min_free: u64, max_bytes: Option<u64>) -> Self {
        SpaceBudget {
            data_dir: data_dir.into(),
            min_free,
            max_bytes,
            last: Mutex::new(None),
        }
    }

    /// Whether `bytes` more may be taken. A failure to measure allows: the file system's own
    /// ENOSPC is still there.
    pub fn allows(&self, bytes: u64) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = last.as_mut() {
            let age = m.at.elapsed();
            if age < FRESH && self.fits(m, bytes) {
                m.granted += bytes;
                return true;
            }
            if age < RETRY {
                return false;
            }
        }
        let (free, used) = match self.measure() {
            Ok(measured) => measured,
            Err(e) => {
                tracing::warn!(
                    "cannot measure the space of {}: {e}; [local] min_free and max_bytes are not checked",
                    self.data_dir.display()
                );
                return true;
            }
        };
        let mut m = Measure {
            at: Instant::now(),
            free,
            used,
            granted: 0,
        };
        let fits = self.fits(&m, bytes);
        if fits {
            m.granted = bytes;
        }
        *last = Some(m);
        fits
    }

    /// `allows`, if a fresh measurement answers at once (no measuring, no waiting for one in
    /// progress); `None` otherwise. Only a yes is given this way: a no is `allows`'s to say.
    pub fn allows_now(&self, bytes: u64) -> Option<bool> {
        let mut last = self.last.try_lock().ok()?;
        let m = last.as_mut()?;
        if m.at.elapsed() < FRESH && self.fits(m, bytes) {
            m.granted += bytes;
            return Some(true);
        }
        None
    }

    fn fits(&self, m: &Measure, bytes: u64) -> bool {
        let need = m.granted.saturating_add(bytes);
        let free_ok = m.free.saturating_sub(need) >= self.min_free && m.free >= need;
        let max_ok = self
            .max_bytes
            .is_none_or(|max| m.used.saturating_add(need) <= max);
        free_ok && max_ok
    }

    /// (free bytes on the file system, bytes the data directory takes). The directory is
    /// walked only when `max_bytes` is set: it may hold the local bucket, and many files.
    pub fn measure(&self) -> io::Result<(u64, u64)> {
        let stat = nix::sys::statvfs::statvfs(&self.data_dir)?;
        let free = stat.blocks_available() * stat.fragment_size();
        let used = match self.max_bytes {
            Some(_) => used_bytes(&self.data_dir),
            None => 0,
        };
        Ok((free, used))
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks, so sparse files count what
/// they hold).
pub fn used_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            }
            total += meta.blocks() * 512;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_bytes_counts_what_the_directory_holds_and_what_was_granted() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), vec![1u8; 64 << 10]).expect("write");
        let used = used_bytes(dir.path());
        assert!(used >= 64 << 10);
        let budget = SpaceBudget::new(dir.path(), 0, Some(used + (100 << 10)));
        assert!(budget.allows(60 << 10));
        // Granted but not yet written still counts.
        assert!(!budget.allows(60 << 10));
        assert!(budget.allows(30 << 10));
        let unlimited = SpaceBudget::new(dir.path(), 0, None);
        assert!(unlimited.allows(1 << 30));
    }

    #[test]
    fn min_free_holds_back_space_on_the_file_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = SpaceBudget::new(dir.path(), 0, None);
        let (free, _) = budget.measure().expect("measure");
        let strict = SpaceBudget::new(dir.path(), free, None);
        assert!(!strict.allows(1 << 20));
        let loose = SpaceBudget::new(dir.path(), free / 2, None);
        assert!(loose.allows(1 << 20));
        assert!(!loose.allows(free));
    }
}
