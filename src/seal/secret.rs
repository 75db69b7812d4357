//! Memory for key material. A `Secret` owns whole pages mapped apart from the heap, so the
//! kernel can be told three things about exactly those pages: keep them in RAM (`mlock`, so
//! they are never written to swap), leave them out of core dumps (`MADV_DONTDUMP`), and give
//! a forked child zeros in their place (`MADV_WIPEONFORK`). The bytes are wiped before the
//! pages go back to the kernel.
//!
//! Locking may be refused (`RLIMIT_MEMLOCK`, 8 MiB on most systems and 64 KiB on older
//! ones, for a process without `CAP_IPC_LOCK`): that is logged once, and the secret works
//! unlocked. Every secret costs one 4 KiB page, so a gateway with a few hundred open volumes
//! stays far inside the usual limit.
//!
//! What this does not cover, so nobody counts on it: copies that other code makes from a
//! secret while it works (a cipher's expanded key schedule inside an OpenSSL context, the
//! key words on the stack during one BLAKE3 or XChaCha20 call, OpenSSL's copy of a TLS
//! pre-shared key during a handshake). Those live in ordinary memory; OpenSSL and the
//! RustCrypto ciphers wipe theirs when freed, but they may be swapped meanwhile.
//!
//! Written on `nix` (already a dependency) rather than taken from a crate: `memsec` and
//! `secrets` bring guarded allocators (guard pages, `mprotect` on every access) that are
//! more than firn needs and still want `MADV_DONTDUMP` added; `region` wraps `mlock` only,
//! which nix already does. What remains is one mapping, two hints and a wipe.

use std::num::NonZeroUsize;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::mman::{self, MapFlags, MmapAdvise, ProtFlags};
use zeroize::Zeroize;

/// `N` bytes of key material in pages of their own: locked where allowed, out of core
/// dumps, wiped on drop. Starts as zeros.
pub struct Secret<const N: usize> {
    pages: Pages,
}

impl<const N: usize> Secret<N> {
    /// `N` zero bytes, to be filled in place (never build the key elsewhere and copy it in:
    /// that leaves the copy behind).
    pub fn zeroed() -> Secret<N> {
        Secret {
            pages: Pages::new(N),
        }
    }

    /// A secret filled by `fill`, which writes straight into the locked pages.
    pub fn new_with(fill: impl FnOnce(&mut [u8; N])) -> Secret<N> {
        let mut secret = Secret::zeroed();
        fill(&mut secret);
        secret
    }

    /// Whether the kernel agreed to keep these pages out of swap.
    pub fn is_locked(&self) -> bool {
        self.pages.locked
    }
}

impl<const N: usize> Deref for Secret<N> {
    type Target = [u8; N];
    fn deref(&self) -> &[u8; N] {
        // SAFETY: the mapping is at least N bytes, readable and writable, page-aligned (so
        // aligned for u8 arrays), initialized (anonymous pages start as zeros) and owned by
        // `self` alone until drop; the shared borrow of `self` rules out writers meanwhile.
        unsafe { &*self.pages.ptr.as_ptr().cast::<[u8; N]>() }
    }
}

impl<const N: usize> DerefMut for Secret<N> {
    fn deref_mut(&mut self) -> &mut [u8; N] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes this the only access.
        unsafe { &mut *self.pages.ptr.as_ptr().cast::<[u8; N]>() }
    }
}

impl<const N: usize> std::fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret<{N}>(..)")
    }
}

/// Up to `capacity` bytes of key material whose length is known only when read (a
/// passphrase, an environment variable's value): the same pages as `Secret`.
pub struct SecretBuf {
    pages: Pages,
    len: usize,
}

impl SecretBuf {
    /// An empty buffer for up to `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> SecretBuf {
        SecretBuf {
            pages: Pages::new(capacity.max(1)),
            len: 0,
        }
    }

    /// `len` bytes written in place by `fill`; its error, if any, is returned instead.
    pub fn new_with<E>(
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<SecretBuf, E> {
        let mut buf = SecretBuf::with_capacity(len);
        fill(&mut buf.pages.bytes_mut()[..len])?;
        buf.len = len;
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// A copy of `bytes`. The caller wipes the original.
    pub fn copy_of(bytes: &[u8]) -> SecretBuf {
        let mut buf = SecretBuf::with_capacity(bytes.len());
        buf.pages.bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        buf.len = bytes.len();
        buf
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.pages.bytes()[..self.len]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBuf({} bytes)", self.len)
    }
}

/// An anonymous private mapping of whole pages, locked and out of dumps where the kernel
/// allows, wiped and unmapped on drop.
struct Pages {
    ptr: NonNull<u8>,
    /// The mapping's length: `len` rounded up to whole pages.
    mapped: usize,
    locked: bool,
}

// SAFETY: `Pages` owns its mapping exclusively, like a `Box<[u8]>`: nothing else holds the
// pointer, so moving it to another thread or sharing `&Pages` (read-only access) is sound.
unsafe impl Send for Pages {}
unsafe impl Sync for Pages {}

/// Set once the first refused `mlock` has been logged.
static LOCK_REFUSED: AtomicBool = AtomicBool::new(false);

impl Pages {
    fn new(len: usize) -> Pages {
        let page = page_size();
        let mapped = len.div_ceil(page).max(1) * page;
        let Some(length) = NonZeroUsize::new(mapped) else {
            unreachable!("a mapping of at least one page");
        };
        // SAFETY: a fresh anonymous private mapping at an address of the kernel's choosing
        // aliases nothing; no existing memory is touched.
        let mapping = unsafe {
            mman::mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        };
        let ptr = match mapping {
            Ok(ptr) => ptr.cast::<u8>(),
            // Out of address space or memory: what the global allocator does then.
            Err(_) => std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(mapped, page)
                    .unwrap_or_else(|_| std::alloc::Layout::new::<u8>()),
            ),
        };
        // SAFETY (all three calls): `ptr..ptr + mapped` is exactly the mapping made above,
        // which no one else uses; the hints change how the kernel treats it, not its
        // contents (MADV_DONTDUMP, MADV_WIPEONFORK and mlock keep the bytes as they are).
        let locked = unsafe { mman::mlock(ptr.cast(), mapped) }.is_ok();
        if !locked && !LOCK_REFUSED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "cannot lock key memory (mlock refused; raise RLIMIT_MEMLOCK, e.g. \
                 LimitMEMLOCK= in a systemd unit): keys may be written to swap"
            );
        }
        // Failures are ignored: both hints exist since Linux 3.4 and 4.14; on an older
        // kernel the pages merely lose that protection, as they would on another system.
        let _ = unsafe { mman::madvise(ptr.cast(), mapped, MmapAdvise::MADV_DONTDUMP) };
        let _ = unsafe { mman::madvise(ptr.cast(), mapped, MmapAdvise::MADV_WIPEONFORK) };
        Pages {
            ptr,
            mapped,
            locked,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `mapped` bytes, readable, initialized (zero-filled by the
        // kernel) and owned by `self`; `&self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.mapped) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.mapped) }
    }
}

impl Pages {
    /// Zeroes every byte with volatile writes, which the compiler keeps although the memory
    /// is unmapped just after.
    fn wipe(&mut self) {
        self.bytes_mut().zeroize();
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        self.wipe();
        // SAFETY: the mapping is ours and nothing borrows it any more (we are in drop);
        // munmap also ends the lock. A failure could only mean the range is not mapped,
        // which `new` rules out; the pages are wiped either way.
        let _ = unsafe { mman::munmap(self.ptr.cast(), self.mapped) };
    }
}

/// Fills `key` from the kernel's random source, straight into the caller's buffer. Not
/// `rand::rng()`: a user-space generator keeps a block of its output in the heap after the
/// call, and so a copy of any key drawn from it.
pub fn fill_random(key: &mut [u8]) {
    use rand::{RngCore, TryRngCore};
    // getrandom(2) fails only before the kernel's pool is first seeded (it waits then) or
    // without the syscall at all (Linux before 3.17); `rand::rng()` panics the same way.
    rand::rngs::OsRng.unwrap_err().fill_bytes(key);
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; it takes no pointers.
    let size = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|size| size.is_power_of_two())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `/proc/self/smaps` entry of the mapping holding `address`: its `VmFlags` and its
    /// `Locked:` size in kB.
    fn smaps_entry(address: usize) -> (Vec<String>, u64) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read smaps");
        let mut inside = false;
        let (mut flags, mut locked_kb) = (None, None);
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or_default();
            // A mapping's header starts with its range, `start-end`, in hex.
            if let Some((start, end)) = first.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                if inside {
                    break;
                }
                inside = (start..end).contains(&address);
            } else if inside && let Some(rest) = line.strip_prefix("Locked:") {
                locked_kb = rest.trim().trim_end_matches("kB").trim().parse().ok();
            } else if inside && let Some(rest) = line.strip_prefix("VmFlags:") {
                flags = Some(rest.split_whitespace().map(str::to_string).collect());
            }
        }
        match (flags, locked_kb) {
            (Some(flags), Some(locked_kb)) => (flags, locked_kb),
            _ => panic!("no smaps entry for {address:#x}"),
        }
    }

    #[test]
    fn a_secret_is_readable_locked_and_out_of_dumps() {
        let mut secret = Secret::<32>::zeroed();
        assert_eq!(*secret, [0u8; 32]);
        secret.copy_from_slice(&[0xA5; 32]);
        assert_eq!(*secret, [0xA5; 32]);
        let filled = Secret::<64>::new_with(|bytes| bytes[63] = 9);
        assert_eq!(filled[63], 9);

        let (flags, locked_kb) = smaps_entry(secret.as_ptr() as usize);
        // The kernel's marks: "dd" do not dump (MADV_DONTDUMP), "wf" wipe on fork, "lo"
        // locked.
        assert!(
            flags.iter().any(|f| f == "dd"),
            "not out of dumps: {flags:?}"
        );
        assert!(
            flags.iter().any(|f| f == "wf"),
            "not wiped on fork: {flags:?}"
        );
        if secret.is_locked() {
            assert!(flags.iter().any(|f| f == "lo"), "not locked: {flags:?}");
            assert!(locked_kb >= 4, "Locked: {locked_kb} kB");
        } else {
            // Not a pass by default: the dump hints above were still checked.
            eprintln!("mlock refused here (RLIMIT_MEMLOCK); only the dump hints were checked");
        }
    }

    #[test]
    fn a_buffer_holds_what_it_was_given() {
        let phrase = b"correct horse battery staple";
        let buf = SecretBuf::copy_of(phrase);
        assert_eq!(buf.as_bytes(), phrase);
        assert!(!buf.is_empty());
        let long = vec![7u8; 10_000];
        assert_eq!(SecretBuf::copy_of(&long).as_bytes(), long.as_slice());
        assert!(SecretBuf::copy_of(b"").is_empty());
        let (flags, _) = smaps_entry(buf.as_bytes().as_ptr() as usize);
        assert!(
            flags.iter().any(|f| f == "dd"),
            "not out of dumps: {flags:?}"
        );
    }

    #[test]
    fn the_wipe_that_drop_runs_zeroes_every_page() {
        // Reading the pages after drop would read unmapped memory, so the wipe that drop
        // runs first is tested on its own, over a mapping of two pages.
        let mut pages = Pages::new(page_size() + 1);
        pages.bytes_mut().fill(0xFF);
        pages.wipe();
        assert_eq!(pages.bytes().len(), 2 * page_size());
        assert!(pages.bytes().iter().all(|&b| b == 0));
    }
}
