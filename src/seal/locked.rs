//! Memory for key bytes: a mapping of its own, left out of core dumps (`MADV_DONTDUMP`),
//! locked against swap where the process may lock memory (`mlock`; failing that is a warning,
//! not an error), and wiped and unmapped when dropped.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::Once;

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mlock, mmap_anonymous, munmap};
use zeroize::Zeroize;

/// `N` secret bytes, zero at first.
pub struct Locked<const N: usize> {
    storage: Storage<N>,
}

enum Storage<const N: usize> {
    /// A private anonymous mapping of `len` bytes, at least `N`, owned by this value alone.
    Mapped { ptr: NonNull<u8>, len: usize },
    /// Where no mapping could be made: still wiped on drop.
    Heap(Box<[u8; N]>),
}

// SAFETY: the mapping is owned by this value alone (nothing else holds its address), so moving
// it to another thread or reading it through `&` from several is as sound as for a `Box`.
unsafe impl<const N: usize> Send for Locked<N> {}
// SAFETY: see `Send`; shared access only reads.
unsafe impl<const N: usize> Sync for Locked<N> {}

static MLOCK_WARNING: Once = Once::new();

impl<const N: usize> Locked<N> {
    pub fn zeroed() -> Self {
        // The kernel rounds a mapping up to whole pages, for mmap and munmap alike.
        let len = N.div_ceil(4096).max(1) * 4096;
        let Some(length) = NonZeroUsize::new(len) else {
            return Locked::heap();
        };
        // SAFETY: a new private anonymous mapping aliases nothing; its address is ours alone.
        let mapped = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        };
        let Ok(addr) = mapped else {
            return Locked::heap();
        };
        // SAFETY: `addr..addr + len` is the mapping made above.
        let _ = unsafe { madvise(addr, len, MmapAdvise::MADV_DONTDUMP) };
        // SAFETY: as above.
        if let Err(e) = unsafe { mlock(addr, len) } {
            MLOCK_WARNING.call_once(|| {
                tracing::warn!(
                    "cannot lock key memory against swap ({e}); raise RLIMIT_MEMLOCK (ulimit -l) or grant CAP_IPC_LOCK to keep keys out of swap"
                )
            });
        }
        Locked {
            storage: Storage::Mapped {
                ptr: addr.cast(),
                len,
            },
        }
    }

    fn heap() -> Self {
        Locked {
            storage: Storage::Heap(Box::new([0u8; N])),
        }
    }

    pub fn bytes(&self) -> &[u8; N] {
        match &self.storage {
            // SAFETY: the mapping is at least N bytes, readable, zero-initialized by mmap, and
            // lives as long as `self`; `[u8; N]` has alignment 1.
            Storage::Mapped { ptr, .. } => unsafe { &*ptr.as_ptr().cast::<[u8; N]>() },
            Storage::Heap(bytes) => bytes,
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8; N] {
        match &mut self.storage {
            // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
            Storage::Mapped { ptr, .. } => unsafe { &mut *ptr.as_ptr().cast::<[u8; N]>() },
            Storage::Heap(bytes) => bytes,
        }
    }
}

impl<const N: usize> Drop for Locked<N> {
    fn drop(&mut self) {
        self.bytes_mut().zeroize();
        if let Storage::Mapped { ptr, len } = self.storage {
            // SAFETY: the mapping made in `zeroed`, unmapped once, here; no reference to it
            // outlives `self`. Unmapping also unlocks it.
            let _ = unsafe { munmap(ptr.cast(), len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_bytes_start_zero_and_keep_what_is_written() {
        let mut a = Locked::<32>::zeroed();
        assert_eq!(a.bytes(), &[0u8; 32]);
        a.bytes_mut()[..4].copy_from_slice(b"key!");
        let b = Locked::<64>::zeroed();
        assert_eq!(&a.bytes()[..4], b"key!");
        assert_eq!(b.bytes(), &[0u8; 64]);
        assert!(matches!(a.storage, Storage::Mapped { .. }));
    }
}
