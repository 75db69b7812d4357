//! The local layer owns the gateway's own disk: everything firn keeps on the machine it runs on,
//! as opposed to what it keeps in the bucket.
//!
//! - [`log`]: append-only logs with a checksum per record and explicit fsync points, for data
//!   that must survive a crash between being accepted and being moved on.
//! - [`meta`]: the metadata store, a transactional key-value store on redb.
//! - [`space`]: the local space limits that volume writes ask before taking space.
//!
//! Each on-disk format here is described, with what a crash leaves behind, in `docs/format.md`.
//! This layer knows nothing of the bucket, of sealing, or of the engines that use it.

pub mod log;
pub mod meta;
pub mod space;

use std::fs::File;
use std::io;
use std::path::Path;

/// Creates `path` empty (truncating what is there), readable and writable by the daemon's
/// user alone: everything firn keeps holds what clients or the gateway were told.
pub(crate) fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Makes a new directory entry at `path` durable: a created file's own fsync does not cover the
/// directory that names it, so without this a crash could lose the file as a whole.
pub(crate) fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}
