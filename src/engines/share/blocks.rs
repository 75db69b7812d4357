//! Reading an evicted file back a block at a time, with ranged GETs of only the blocks a
//! read needs, each verified before a client sees it.
//!
//! A file larger than one block (`BLOCK`) that firn uploads gets its object's block hashes
//! recorded: the BLAKE3 chaining value of each 1 MiB block, which is a subtree of the BLAKE3
//! tree of the whole object. Merged up the tree they give the object's BLAKE3 hash, which is
//! its digest in the bucket (`firn-blake3`); so one HEAD tells whether the recorded hashes
//! describe the object there now, and each fetched block is then checked against its own.
//!
//! A file whose hashes are not known (a new gateway, or after another firn rewrote it) is
//! fetched whole and checked against the digest, and its hashes recorded on the way. An
//! object another tool put has no digest: nothing can verify it, whole or in part, so its
//! blocks are fetched as needed without a check (as any S3 client reads it).
//!
//! The blocks fetched so far live in a sparse `<fileid>.part` file, with the map of which
//! are there in memory only: a restart deletes the part files. A part file whose blocks are
//! all there becomes the file's content.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root};

use super::namespace::Uploaded;
use super::{Share, ShareError, io_error, lock, write_error};
use crate::remote::verify::DIGEST_META;

/// The unit of fetching and verification for objects up to 64 GiB; larger ones have larger
/// blocks (`block_size`). A power of two and a whole number of BLAKE3 chunks, so each block
/// is a subtree of the object's BLAKE3 tree. Files of one block or less are fetched whole.
pub const BLOCK: u64 = 1 << 20;
/// The largest block: a divisor of the 8 MiB slices uploads and whole fetches read in, so
/// that every slice holds whole blocks.
const MAX_BLOCK: u64 = 8 << 20;
/// Blocks per object, up to which `BLOCK` is kept: 2 MiB of hashes at most, and 20 MiB for
/// the largest object S3 holds (5 TiB, in `MAX_BLOCK`s).
const MAX_BLOCKS: u64 = 1 << 16;
/// Bytes fetched by one GET when a file is read in order. Such a reader also has the next
/// runs fetched in the background, up to two runs ahead of it.
const RUN_BYTES: u64 = 8 << 20;
/// Runs read ahead at once per share, so their memory stays bounded (8 MiB each) whatever
/// the number of readers; a reader that finds none free reads without.
pub(super) const READAHEAD_RUNS: usize = 8;
const CV_LEN: usize = 32;
/// Files read a block at a time whose part files are kept open at once, per share.
const MAX_PARTIALS: usize = 256;

/// The block size of an object of `size` bytes.
pub fn block_size(size: u64) -> u64 {
    size.div_ceil(MAX_BLOCKS)
        .next_power_of_two()
        .clamp(BLOCK, MAX_BLOCK)
}

/// The chaining value of the block at `offset` (a multiple of its size) of an object larger
/// than one block.
pub fn block_cv(offset: u64, data: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    hasher.update(data);
    hasher.finalize_non_root()
}

/// The BLAKE3 hash of an object of `size` bytes (more than one block) whose blocks have the
/// chaining values `cvs` (32 bytes each, in order); `None` if their number does not fit.
pub fn root_of(cvs: &[u8], size: u64) -> Option<blake3::Hash> {
    root_with(cvs, size, block_size(size))
}

fn root_with(cvs: &[u8], size: u64, block: u64) -> Option<blake3::Hash> {
    if size <= block || cvs.len() as u64 != size.div_ceil(block) * CV_LEN as u64 {
        return None;
    }
    // Every split of a range longer than a block falls on a block boundary: the left part is
    // the largest power of two of chunks below the length, at least one block.
    fn subtree(cvs: &[u8], block: u64, first: u64, len: u64) -> ChainingValue {
        if len <= block {
            let at = first as usize * CV_LEN;
            return cvs[at..at + CV_LEN].try_into().expect("32 bytes");
        }
        let left = left_subtree_len(len);
        merge_subtrees_non_root(
            &subtree(cvs, block, first, left),
            &subtree(cvs, block, first + left / block, len - left),
            Mode::Hash,
        )
    }
    let left = left_subtree_len(size);
    Some(blake3::hazmat::merge_subtrees_root(
        &subtree(cvs, block, 0, left),
        &subtree(cvs, block, left / block, size - left),
        Mode::Hash,
    ))
}

/// The chaining values of blocks `wanted` (`Gathered::wanted`), of `block` bytes, of an
/// object of `size` bytes, from `data` read at `offset`.
pub fn hash_blocks(
    block: u64,
    size: u64,
    offset: u64,
    data: &[u8],
    wanted: &[u64],
) -> Vec<(u64, ChainingValue)> {
    wanted
        .iter()
        .map(|&b| {
            let start = (b * block - offset) as usize;
            let end = ((b * block + block).min(size) - offset) as usize;
            (b, block_cv(b * block, &data[start..end]))
        })
        .collect()
}

/// Chaining values gathered while a file is read for its upload, in whatever order and
/// slices the upload reads it.
#[derive(Debug)]
pub struct Gathered {
    size: u64,
    block: u64,
    cvs: Mutex<Vec<Option<ChainingValue>>>,
}

impl Gathered {
    /// For a file of `size` bytes; `None` if it is one block or less (fetched whole).
    pub fn new(size: u64) -> Option<Gathered> {
        Gathered::with_block(size, block_size(size))
    }

    fn with_block(size: u64, block: u64) -> Option<Gathered> {
        (size > block).then(|| Gathered {
            size,
            block,
            cvs: Mutex::new(vec![None; size.div_ceil(block) as usize]),
        })
    }

    /// The blocks wholly inside `data`, read at `offset`, whose values are still missing.
    pub fn wanted(&self, offset: u64, len: u64) -> Vec<u64> {
        let cvs = lock(&self.cvs);
        let end = offset + len;
        let n = self.size.div_ceil(self.block);
        // Whole blocks inside the range; the short last one ends at the object's end.
        let upto = if end >= self.size {
            n
        } else {
            (end / self.block).min(n)
        };
        (offset.div_ceil(self.block)..upto)
            .filter(|&b| cvs[b as usize].is_none())
            .collect()
    }

    /// Hashes the blocks `wanted` of `data`, read at `offset`, and keeps their values.
    pub fn gather(&self, offset: u64, data: &[u8], wanted: &[u64]) {
        self.keep(hash_blocks(self.block, self.size, offset, data, wanted));
    }

    /// Keeps values `hash_blocks` found.
    pub fn keep(&self, found: Vec<(u64, ChainingValue)>) {
        let mut cvs = lock(&self.cvs);
        for (b, cv) in found {
            cvs[b as usize] = Some(cv);
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn block(&self) -> u64 {
        self.block
    }

    /// Every value, in order, once every block has been read.
    pub fn finish(&self) -> Option<Vec<u8>> {
        let cvs = lock(&self.cvs);
        let mut out = Vec::with_capacity(cvs.len() * CV_LEN);
        for cv in cvs.iter() {
            out.extend_from_slice(cv.as_ref()?);
        }
        Some(out)
    }
}

/// An evicted file being read back a block at a time.
#[derive(Debug)]
pub(super) struct Partial {
    /// The object it holds blocks of: the file's `uploaded` when it was made. A file whose
    /// `uploaded` differs now (rewritten, or changed by another tool) gets a new one.
    uploaded: Uploaded,
    key: String,
    /// The version of the object its blocks come from (the ETag its HEAD told), which every
    /// ranged GET asks for: blocks of two versions never meet in one part file.
    etag: Option<String>,
    /// Set when a GET found another version stored: the part file is dropped, and the read
    /// starts over on the object as it is now.
    changed: std::sync::atomic::AtomicBool,
    size: u64,
    /// Its block size (`block_size`).
    block: u64,
    /// The blocks' chaining values, to check each against; `None` for an object that has no
    /// digest (put by another tool).
    cvs: Option<Vec<u8>>,
    file: File,
    /// The share's count of bytes fetched.
    downloaded: Arc<std::sync::atomic::AtomicU64>,
    state: Mutex<State>,
    /// Signalled when a fetch ends, for readers waiting on blocks it brings.
    fetched: Condvar,
}

#[derive(Debug)]
struct State {
    blocks: Vec<Block>,
    present: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Missing,
    Fetching,
    Present,
}

/// Blocks `start..end`, marked `Fetching` when it is made: when dropped (done, failed, or
/// cancelled with its task, even before it ran), they are `Present` if stored, else
/// `Missing` again, and waiting readers wake.
struct Claim {
    part: Arc<Partial>,
    start: u64,
    end: u64,
    stored: bool,
    /// A read ahead's permit (`READAHEAD_RUNS`), returned with the claim.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Claim {
    /// Claims blocks `start..end` of `state`, which must all be `Missing`.
    fn new(part: &Arc<Partial>, state: &mut State, start: u64, end: u64) -> Claim {
        for b in start..end {
            state.blocks[b as usize] = Block::Fetching;
        }
        Claim {
            part: part.clone(),
            start,
            end,
            stored: false,
            _permit: None,
        }
    }

    /// Fetches the claimed blocks on this (blocking) thread.
    fn fetch_now(mut self, share: &Share, limit: Duration) -> Result<(), ShareError> {
        let part = self.part.clone();
        let get = part.get(&*share.remote, self.start, self.end);
        let bytes = share
            .bucket(async { tokio::time::timeout(limit, get).await })?
            .map_err(|_| timed_out(&part.key, limit))??;
        part.store(self.start, &bytes)?;
        self.stored = true;
        Ok(())
    }

    /// Fetches the claimed blocks on an async worker: checking and writing a run takes
    /// milliseconds, and needs no blocking thread (which every waiting reader may hold).
    /// Bounded by `limit` like a read's own fetch, so its blocks are not held as coming
    /// for longer than a read waits for them.
    async fn fetch_ahead(mut self, remote: Arc<dyn crate::remote::Remote>, limit: Duration) {
        let part = self.part.clone();
        match tokio::time::timeout(limit, part.get(&*remote, self.start, self.end)).await {
            Ok(Ok(bytes)) => match part.store(self.start, &bytes) {
                Ok(()) => self.stored = true,
                Err(e) => tracing::debug!("reading ahead: {e}"),
            },
            Ok(Err(e)) => tracing::debug!("reading ahead: {e}"),
            Err(_) => tracing::debug!("reading ahead: {}", timed_out(&part.key, limit)),
        }
    }
}

/// A read's wait for the bucket that ran out.
pub(super) fn timed_out(key: &str, limit: Duration) -> ShareError {
    ShareError::Io(format!(
        "fetching {key}: the bucket did not answer within {} s ([shares] read_timeout_secs)",
        limit.as_secs_f64()
    ))
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = lock(&self.part.state);
        for b in self.start..self.end {
            let block = &mut state.blocks[b as usize];
            let was_present = *block == Block::Present;
            *block = if self.stored || was_present {
                Block::Present
            } else {
                Block::Missing
            };
            if self.stored && !was_present {
                state.present += 1;
            }
        }
        self.part.fetched.notify_all();
    }
}

impl Partial {
    fn complete(&self) -> bool {
        let state = lock(&self.state);
        state.present == state.blocks.len() as u64
    }

    /// Blocks `start..end` from the bucket.
    async fn get(
        &self,
        remote: &dyn crate::remote::Remote,
        start: u64,
        end: u64,
    ) -> Result<bytes::Bytes, ShareError> {
        let range = start * self.block..(end * self.block).min(self.size);
        let bytes = remote
            .get_range_if(&self.key, range.clone(), self.etag.as_deref())
            .await
            .map_err(|e| {
                if matches!(e, crate::remote::Error::Changed { .. }) {
                    self.changed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                ShareError::Io(format!("fetching {}: {e}", self.key))
            })?;
        self.downloaded
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if bytes.len() as u64 != range.end - range.start {
            return Err(ShareError::Io(format!(
                "fetching {}: {} bytes came for {range:?}",
                self.key,
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Checks `bytes`, blocks from `first` on, against their hashes and writes them.
    fn store(&self, first: u64, bytes: &[u8]) -> Result<(), ShareError> {
        if let Some(cvs) = &self.cvs {
            for (i, data) in bytes.chunks(self.block as usize).enumerate() {
                let at = (first + i as u64) * self.block;
                let cv = (first as usize + i) * CV_LEN;
                if block_cv(at, data)[..] != cvs[cv..cv + CV_LEN] {
                    return Err(ShareError::Io(format!(
                        "{} in the bucket does not match its digest at bytes {}..{}: not served",
                        self.key,
                        at,
                        at + data.len() as u64
                    )));
                }
            }
        }
        self.file
            .write_all_at(bytes, first * self.block)
            .map_err(|e| write_error("storing a file's fetched blocks", e))
    }
}

impl Share {
    fn part_path(&self, id: u64) -> PathBuf {
        self.files.join(format!("{id:016x}.part"))
    }

    /// `count` bytes at `offset` of evicted file `id`, whose object is `uploaded`, fetching
    /// only the blocks they lie in; `None` if the file must be fetched whole first (its
    /// object has a digest, and no block hashes that match it are known) or is on local
    /// disk again.
    pub(super) fn read_blocks(
        &self,
        id: u64,
        uploaded: &Uploaded,
        offset: u64,
        count: u32,
    ) -> Result<Option<(Vec<u8>, bool)>, ShareError> {
        let Some(part) = self.partial(id, uploaded)? else {
            return Ok(None);
        };
        match self.read_part(id, &part, offset, count) {
            // Another version of the object was stored since the part file was made (by
            // another tool, in place): start over on the one there now, once.
            Err(_) if part.changed.load(std::sync::atomic::Ordering::Relaxed) => {
                self.drop_changed(id, &part);
                let Some(part) = self.partial(id, uploaded)? else {
                    return Ok(None);
                };
                self.read_part(id, &part, offset, count).map(Some)
            }
            result => result.map(Some),
        }
    }

    /// Forgets `part`, a part file of a version no longer stored, if it is still `id`'s.
    fn drop_changed(&self, id: u64, part: &Arc<Partial>) {
        if lock(&self.partials)
            .get(&id)
            .is_some_and(|p| Arc::ptr_eq(p, part))
        {
            self.drop_partial(id);
        }
    }

    /// `count` bytes at `offset` of the file from `part`, fetching the blocks they lie in.
    fn read_part(
        &self,
        id: u64,
        part: &Arc<Partial>,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), ShareError> {
        lock(&self.used).insert(id, Instant::now());
        let end = offset.saturating_add(count as u64).min(part.size);
        if offset >= end {
            return Ok((Vec::new(), true));
        }
        let (first, last) = (offset / part.block, (end - 1) / part.block);
        let counter = if self.fetch_blocks(id, part, first, last)? {
            &self.cache_misses
        } else {
            &self.cache_hits
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut buf = vec![0; (end - offset) as usize];
        part.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| io_error("reading a file's fetched blocks", e))?;
        if part.complete() {
            self.complete(id, part)?;
        }
        Ok((buf, end >= part.size))
    }

    /// The part file of `id` for its object `uploaded`, made (after a HEAD of the object)
    /// if there is none yet.
    fn partial(&self, id: u64, uploaded: &Uploaded) -> Result<Option<Arc<Partial>>, ShareError> {
        if let Some(part) = lock(&self.partials).get(&id)
            && part.uploaded == *uploaded
        {
            return Ok(Some(part.clone()));
        }
        let key = format!("{}{}", self.info.prefix, uploaded.path);
        let info = self
            .bucket_answer(&key, self.remote.head(&key))?
            .ok_or_else(|| {
                ShareError::Io(format!(
                    "fetching {key}: the object is gone from the bucket"
                ))
            })?;
        if info.size != uploaded.size {
            return Err(ShareError::Io(format!(
                "fetching {key}: it is {} bytes in the bucket, {} in the share; a refresh \
                 takes the bucket's",
                info.size, uploaded.size
            )));
        }
        let cvs = match info.meta.get(DIGEST_META) {
            None => None,
            Some(digest) => match self.ns.blocks(id)? {
                Some(cvs)
                    if root_of(&cvs, info.size)
                        .is_some_and(|root| root.to_hex().as_str() == digest) =>
                {
                    Some(cvs)
                }
                _ => return Ok(None),
            },
        };
        let mut partials = lock(&self.partials);
        if let Some(part) = partials.get(&id)
            && part.uploaded == *uploaded
        {
            return Ok(Some(part.clone()));
        }
        // Fetched whole (or written) meanwhile, or another object now: not for blocks.
        if self.content_path(id).exists() || self.ns.get(id)?.uploaded.as_ref() != Some(uploaded) {
            return Ok(None);
        }
        // A part file of an earlier object goes first (its readers keep their open file),
        // so nobody reads one object's blocks as another's.
        partials.remove(&id);
        let path = self.part_path(id);
        let _ = std::fs::remove_file(&path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|file| file.set_len(info.size).map(|()| file))
            .map_err(|e| io_error("making a file's part file", e))?;
        let part = Arc::new(Partial {
            uploaded: uploaded.clone(),
            key,
            etag: info.etag,
            changed: Default::default(),
            size: info.size,
            block: block_size(info.size),
            cvs,
            file,
            downloaded: self.downloaded_bytes.clone(),
            state: Mutex::new(State {
                blocks: vec![Block::Missing; info.size.div_ceil(block_size(info.size)) as usize],
                present: 0,
            }),
            fetched: Condvar::new(),
        });
        if partials.len() >= MAX_PARTIALS {
            // Each holds its part file open: one goes, not in use if one is not (its blocks
            // are fetched again when wanted), so open files stay bounded however many files
            // are read a block at a time.
            let victim = partials
                .iter()
                .find(|(_, p)| Arc::strong_count(p) == 1)
                .or_else(|| partials.iter().next())
                .map(|(&victim, _)| victim);
            if let Some(victim) = victim {
                partials.remove(&victim);
                let _ = std::fs::remove_file(self.part_path(victim));
                // Nothing of it is local now: its last use is not needed for eviction.
                lock(&self.used).remove(&victim);
            }
        }
        partials.insert(id, part.clone());
        Ok(Some(part))
    }

    /// Makes blocks `first..=last` of `part` present. A read in order (from the start, or
    /// just after a block that is there or coming) fetches up to `READAHEAD` blocks per GET,
    /// and has the next run fetched in the background. Whether the read had to wait for the
    /// bucket (a cache miss).
    fn fetch_blocks(
        &self,
        id: u64,
        part: &Arc<Partial>,
        first: u64,
        last: u64,
    ) -> Result<bool, ShareError> {
        // Blocks per GET for a reader in order.
        let run = (RUN_BYTES / part.block).max(1);
        let mut waited = false;
        loop {
            let (mine, ahead) = {
                let mut state = lock(&part.state);
                let blocks = &mut state.blocks;
                let n = blocks.len() as u64;
                let in_order = first == 0 || blocks[first as usize - 1] != Block::Missing;
                let mut until = last;
                if in_order {
                    let most = (first + run - 1).min(n - 1);
                    while until < most && blocks[until as usize + 1] == Block::Missing {
                        until += 1;
                    }
                }
                let missing: Vec<u64> = (first..=until)
                    .filter(|&b| blocks[b as usize] == Block::Missing)
                    .collect();
                // The first missing block within two runs ahead starts the next run.
                let permit = in_order
                    .then(|| self.readahead.clone().try_acquire_owned().ok())
                    .flatten();
                let ahead = permit
                    .is_some()
                    .then(|| {
                        (until + 1..(until + 1 + 2 * run).min(n))
                            .find(|&b| blocks[b as usize] == Block::Missing)
                    })
                    .flatten()
                    .map(|start| {
                        let mut end = start + 1;
                        while end < (start + run).min(n) && blocks[end as usize] == Block::Missing {
                            end += 1;
                        }
                        (start, end)
                    });
                // Runs of consecutive blocks, at most `READAHEAD` each: one GET per run.
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for b in missing {
                    match runs.last_mut() {
                        Some((start, end)) if *end == b && b - *start < run => *end = b + 1,
                        _ => runs.push((b, b + 1)),
                    }
                }
                let mine: Vec<Claim> = runs
                    .into_iter()
                    .map(|(start, end)| Claim::new(part, &mut state, start, end))
                    .collect();
                let ahead = ahead.map(|(start, end)| {
                    let mut claim = Claim::new(part, &mut state, start, end);
                    claim._permit = permit;
                    claim
                });
                (mine, ahead)
            };
            let limit = self.settings.read_timeout;
            if !mine.is_empty() {
                // Room for them, clean files evicted if need be, or the client tries again.
                let bytes: u64 = mine.iter().map(|c| (c.end - c.start) * part.block).sum();
                self.room_to_fetch(id, bytes)?;
            }
            // Read ahead only into room there is (a claim dropped is released).
            if let Some(claim) = ahead
                && self
                    .room_to_fetch(id, (claim.end - claim.start) * part.block)
                    .is_ok()
            {
                self.runtime
                    .spawn(claim.fetch_ahead(self.remote.clone(), limit));
            }
            waited |= !mine.is_empty();
            // One failure ends the read; the claims not fetched are released as dropped.
            for claim in mine {
                claim.fetch_now(self, limit)?;
            }
            // Blocks another read (or a read ahead) is fetching: wait for them, as long as
            // for an answer of our own.
            let deadline = Instant::now() + limit;
            let mut state = lock(&part.state);
            while (first..=last).any(|b| state.blocks[b as usize] == Block::Fetching) {
                waited = true;
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out(&part.key, limit));
                }
                state = part
                    .fetched
                    .wait_timeout(state, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            if (first..=last).all(|b| state.blocks[b as usize] == Block::Present) {
                return Ok(waited);
            }
            // A fetch by another failed: try them here.
        }
    }

    /// Every block of `part` is there: it becomes the file's content, unless the file was
    /// fetched whole, changed, or names another object meanwhile.
    fn complete(&self, id: u64, part: &Arc<Partial>) -> Result<(), ShareError> {
        // The file's time, as a fetched file keeps it (clients would take a new one for a
        // change); on disk before it is named as the content, which is taken as whole
        // after a crash.
        let inode = self.ns.get(id)?;
        let time =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(inode.mtime_ns);
        part.file
            .set_modified(time)
            .and_then(|()| part.file.sync_data())
            .map_err(|e| io_error("storing a fetched file", e))?;
        // Under the dirty lock, as eviction: a write marks its file dirty under it before it
        // opens the content, so no write goes into a file this rename then replaces.
        let dirty = lock(&self.dirty);
        let mut partials = lock(&self.partials);
        if !partials.get(&id).is_some_and(|p| Arc::ptr_eq(p, part)) {
            return Ok(());
        }
        partials.remove(&id);
        let content = self.content_path(id);
        let current = self.ns.get(id)?.uploaded;
        if dirty.contains_key(&id) || content.exists() || current.as_ref() != Some(&part.uploaded) {
            let _ = std::fs::remove_file(self.part_path(id));
        } else {
            std::fs::rename(self.part_path(id), content)
                .map_err(|e| io_error("storing a fetched file", e))?;
        }
        Ok(())
    }

    /// Forgets file `id`'s fetched blocks (evicted, fetched whole, removed or changed), and
    /// its part file, whether or not one is in use. Returns the bytes that file took.
    pub(super) fn drop_partial(&self, id: u64) -> u64 {
        let mut partials = lock(&self.partials);
        partials.remove(&id);
        let path = self.part_path(id);
        let used = std::fs::metadata(&path).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        let _ = std::fs::remove_file(path);
        // Unless the file is whole here, nothing of it is local now. (`used` is a leaf: no
        // lock is ever taken while it is held.)
        if !self.content_path(id).exists() {
            lock(&self.used).remove(&id);
        }
        drop(partials);
        used
    }
}

/// Removes what fetches left in `files` before a restart: part files (whose map of blocks
/// was in memory) and staging files of whole fetches.
pub(super) fn clean_leftovers(files: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(files)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".part") || name.ends_with(".fetch") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        bytes
    }

    #[test]
    fn block_values_merge_into_the_hash_of_the_whole() {
        // The 1 MiB blocks of objects up to 64 GiB, and the larger blocks of larger objects
        // (tried here on small objects: the tree's shape depends on the block only).
        for (block, counts) in [
            (BLOCK, &[1, 2, 3, 5, 8, 9][..]),
            (2 * BLOCK, &[1, 2, 3, 5][..]),
            (MAX_BLOCK, &[1, 2][..]),
        ] {
            for &blocks in counts {
                for size in [
                    blocks * block + 1,
                    (blocks + 1) * block - 5,
                    (blocks + 1) * block,
                ] {
                    check_merge(block, size);
                }
            }
        }
        assert!(Gathered::new(BLOCK).is_none());
        assert_eq!(block_size(64 << 30), BLOCK);
        assert_eq!(block_size((64 << 30) + 1), 2 * BLOCK);
        assert_eq!(block_size(5 << 40), MAX_BLOCK);
    }

    fn check_merge(block: u64, size: u64) {
        let bytes = data(size as usize);
        let gathered = Gathered::with_block(size, block).expect("more than a block");
        // In slices that do not line up with blocks, as an upload may read.
        let mut at = 0;
        for slice in [block / 2 + 3, 3 * block, 5 * block].iter().cycle() {
            if at >= size {
                break;
            }
            let end = (at + slice).min(size);
            let wanted = gathered.wanted(at, end - at);
            gathered.gather(at, &bytes[at as usize..end as usize], &wanted);
            at = end;
        }
        // Slices that cut blocks leave those to a later read, as the upload's second pass
        // does.
        let mut at = 0;
        while at < size {
            let end = (at + 4 * block).min(size);
            let wanted = gathered.wanted(at, end - at);
            gathered.gather(at, &bytes[at as usize..end as usize], &wanted);
            at = end;
        }
        let cvs = gathered.finish().expect("every block read");
        let whole = Some(blake3::hash(&bytes));
        assert_eq!(root_with(&cvs, size, block), whole, "{size} in {block}");
        let mut wrong = cvs.clone();
        wrong[40] ^= 1;
        assert_ne!(root_with(&wrong, size, block), whole);
        assert_eq!(root_with(&cvs[32..], size, block), None);
    }
}
