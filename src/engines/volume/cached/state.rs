//! The cached volume's bookkeeping: upload progress, the local checkpoint, and the replay of
//! the log at open.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::map::{Map, Place, Sorted};
use super::record::{self, FormatError, HEADER_LEN, Kind, LogKey};
use super::{Checkpoint, Cut, segment_name};
use crate::seal::Sealer;

/// What survives a restart in the metadata store: how far the upload got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Every segment up to this one is in the bucket (0: none).
    pub uploaded: u64,
    /// The number of the newest commit in the bucket (0: none).
    pub commit: u64,
    /// Where that commit cuts the log.
    pub committed: Option<Cut>,
    /// Where in the log the newest checkpoint stands (segment 0: none).
    pub checkpoint: Cut,
    /// The newest few checkpoints in the bucket, oldest first: a commit names the newest
    /// one that lies wholly before its cut.
    #[serde(default)]
    pub checkpoints: Vec<Cut>,
    /// Why this gateway was fenced (another one took the volume over), if it was: the
    /// volume stays read-only here across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
    /// The checkpoint the newest commit names.
    #[serde(default)]
    pub commit_checkpoint: Cut,
    /// Chunks a garbage collection put into the bucket that no checkpoint names yet: if a
    /// crash lost the collection's work, they are garbage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gc_pending: Vec<String>,
    /// The commit by which this gateway took the volume over (0: it made the volume): its
    /// lease says so (`restore::Lease::since`).
    #[serde(default)]
    pub leased_since: u64,
    /// When this gateway made or found the newest commit, in seconds since the epoch (0:
    /// not known), so its age is known after a restart.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub commit_time: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What `firn volume show` tells about a cached volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CachedStatus {
    /// Bytes of segment files on local disk (dirty and clean).
    pub cached_bytes: u64,
    /// Log bytes not in the bucket yet: the upload backlog.
    pub dirty_bytes: u64,
    pub uploaded_segment: u64,
    pub commit: u64,
    pub committed: Option<Cut>,
    /// Seconds since the newest commit was made (the recovery point's age), if one was
    /// made since the volume was opened.
    pub last_commit_age_secs: Option<f64>,
    pub checkpoint: Cut,
    /// Set when another gateway took the volume over: it is read-only here, and its local
    /// log is kept for the operator.
    pub fenced: Option<String>,
    /// The uploader's last failure, cleared by its next success.
    pub last_error: Option<String>,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    pub map_pieces: u64,
    /// Completed flushes whose cut no commit covers yet.
    pub pending_flushes: u64,
    /// Writes waiting for room in the log.
    pub queued_writes: u64,
    /// Why writes wait, while they do: what they wait for, and the uploader's last error
    /// if there is one (the bucket unreachable or refusing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes_waiting: Option<String>,
    /// Reads answered from local disk and from the bucket.
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Bytes clients wrote.
    pub bytes_written: u64,
    /// Seconds since the oldest flush that no commit covers yet completed: how far the
    /// bucket's image lags behind what clients flushed (0 when it does not).
    pub commit_lag_secs: f64,
    pub cache_max: u64,
    pub log_max: u64,
    /// Chunks garbage collection made that are still in the bucket.
    #[serde(default)]
    pub chunks: u64,
    /// Live bytes garbage collection moved into chunks, and objects it deleted, since the
    /// volume was opened.
    #[serde(default)]
    pub gc_moved_bytes: u64,
    #[serde(default)]
    pub gc_deleted_objects: u64,
}

pub(super) struct State {
    pub progress: Progress,
    /// Where the newest local checkpoint stands: segments before its segment are never
    /// needed by a replay, so they alone may be evicted.
    pub checkpoint: Cut,
    /// Closed or open segments not uploaded yet, with their sizes.
    pub sealed: BTreeMap<u64, u64>,
    /// The newest closed segment.
    pub sealed_upto: u64,
    /// Uploaded segments still on local disk, with the bytes they take there.
    pub cached: BTreeMap<u64, u64>,
    /// Cuts (segment → furthest completed flush in it) not yet committed.
    pub cuts: BTreeMap<u64, u64>,
    /// When the oldest of `cuts` was made.
    pub pending_since: Option<std::time::Instant>,
    pub committed: Option<Cut>,
    pub last_commit: Option<SystemTime>,
    /// When this run made its newest commit, on the monotonic clock: commits between
    /// uploads keep `commit_interval` from it.
    pub last_commit_at: Option<std::time::Instant>,
    pub dirty_bytes: u64,
    pub local_bytes: u64,
    pub bytes_written: u64,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    pub queued_writes: u64,
    pub fenced: Option<String>,
    pub last_error: Option<String>,
    pub stopped: bool,
    /// The descriptor in the bucket must be written again (the volume grew).
    pub describe: bool,
    /// Garbage collection moved data: a checkpoint is due now.
    pub checkpoint_due: bool,
    /// The daemon is stopping: the open segment is closed at its newest flush at once, not
    /// `commit_interval` later, so that the bucket gets every flush before the stop.
    pub draining: bool,
    /// The objects (segments and chunks) the newest checkpoint's map names.
    pub checkpoint_refs: std::collections::BTreeSet<u64>,
    /// Garbage collection's work: see `gc.rs`.
    pub gc: super::gc::GcState,
}

impl State {
    pub fn new(progress: Progress, checkpoint: Cut) -> State {
        let fenced = progress.fenced.clone();
        let last_commit = (progress.commit_time > 0)
            .then(|| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(progress.commit_time));
        State {
            checkpoint: checkpoint.max(progress.checkpoint),
            committed: progress.committed,
            progress,
            sealed: BTreeMap::new(),
            sealed_upto: 0,
            cached: BTreeMap::new(),
            cuts: BTreeMap::new(),
            pending_since: None,
            last_commit,
            last_commit_at: None,
            dirty_bytes: 0,
            local_bytes: 0,
            bytes_written: 0,
            bytes_uploaded: 0,
            bytes_downloaded: 0,
            queued_writes: 0,
            fenced,
            last_error: None,
            stopped: false,
            describe: true,
            checkpoint_due: false,
            draining: false,
            checkpoint_refs: Default::default(),
            gc: Default::default(),
        }
    }
}

/// Creates segment `seq` with a fresh salt and its header written: a new file, or `spare`
/// (a file written ahead, at the path given) renamed into place. Beyond the header a spare
/// holds zeros, which replay reads as the end of the log.
pub(super) fn create_segment(
    dir: &Path,
    key: &LogKey,
    seq: u64,
    spare: Option<(&Path, File)>,
) -> io::Result<(File, [u8; 16])> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let path = dir.join(segment_name(seq));
    // A leftover of a crash that never got a header synced holds nothing: replace it.
    let file = match spare {
        Some((from, file)) => {
            std::fs::rename(from, &path)?;
            file
        }
        None => crate::local::create_private(&path)?,
    };
    use std::os::unix::fs::FileExt;
    file.write_all_at(&key.segment_header(seq, &salt), 0)?;
    Ok((file, salt))
}

/// What replaying the local log found.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    /// The newest segment with records (0: none after the checkpoint).
    pub last: u64,
    /// The end of the log: a cut, once synced.
    pub cut: Option<Cut>,
    pub local_bytes: u64,
    /// Segments not uploaded, with their sizes.
    pub sizes: BTreeMap<u64, u64>,
    /// Uploaded segments on local disk, with their sizes.
    pub cached: BTreeMap<u64, u64>,
}

impl Replayed {
    pub fn dirty(&self) -> u64 {
        self.sizes.values().sum()
    }
}

/// Replays the log after `checkpoint` into `map` in order. Records of segments not
/// uploaded yet are verified in full (a power loss may have kept a record's header and lost
/// its data); the first damaged or missing record ends the log: its segment is cut there and
/// every later segment file is set aside as `<name>.damaged`. What remains is synced.
pub(super) fn replay(
    dir: &Path,
    key: &LogKey,
    checkpoint: Cut,
    uploaded: u64,
    map: &mut Map,
    salts: &mut BTreeMap<u64, [u8; 16]>,
    next_record: &mut u64,
) -> io::Result<Replayed> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() == 16
            && let Ok(seq) = u64::from_str_radix(name, 16)
        {
            found.push(seq);
        }
    }
    found.sort_unstable();
    let newest = found.last().copied();
    let mut replayed = Replayed::default();
    let mut broken = false;
    // The checkpoint's own segment is replayed from where the checkpoint stands (a takeover's
    // checkpoint names a segment that does not exist, with `end` = u64::MAX).
    let mut expected = if found.contains(&checkpoint.segment) && checkpoint.end != u64::MAX {
        checkpoint.segment
    } else {
        checkpoint.segment + 1
    };
    for seq in found {
        let path = dir.join(segment_name(seq));
        if seq < expected.min(checkpoint.segment + 1) {
            // Before the checkpoint: in its map already. Still to be uploaded, or cache.
            if seq > uploaded {
                let len = std::fs::metadata(&path)?.len();
                replayed.local_bytes += len;
                replayed.sizes.insert(seq, len);
                replayed.last = replayed.last.max(seq);
            } else {
                let bytes = std::fs::metadata(&path)?.blocks() * 512;
                replayed.local_bytes += bytes;
                replayed.cached.insert(seq, bytes);
            }
            continue;
        }
        if broken || seq != expected {
            set_aside(&path)?;
            broken = true;
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let verify = seq > uploaded;
        let from = if seq == checkpoint.segment {
            checkpoint.end as usize
        } else {
            HEADER_LEN
        };
        match replay_records(key, seq, &bytes, from, verify, map, salts, next_record) {
            Ok((end, damaged)) => {
                // Zeros after the records are the unwritten rest of a spare segment. In the
                // newest segment that is a clean end. In an earlier one it is the length
                // that a roll cut, which no flush made durable, while writes that followed
                // into a later segment reached the disk: a crash lost the end of this
                // segment and kept what came after it, so the log ends here.
                let short = end < bytes.len() as u64;
                let damaged = damaged || short && Some(seq) != newest;
                if damaged {
                    tracing::warn!(
                        segment = seq,
                        "the log of a cached volume ends in a torn record at byte {end} (a crash before a flush); cut there"
                    );
                    let file = OpenOptions::new().write(true).open(&path)?;
                    file.set_len(end)?;
                    file.sync_all()?;
                    broken = true;
                } else if short {
                    // Cut to its records, so that its upload carries no zeros.
                    let file = OpenOptions::new().write(true).open(&path)?;
                    file.set_len(end)?;
                    file.sync_all()?;
                } else {
                    File::open(&path)?.sync_data()?;
                }
                replayed.last = seq;
                replayed.cut = Some(Cut { segment: seq, end });
                replayed.local_bytes += end;
                if seq > uploaded {
                    replayed.sizes.insert(seq, end);
                } else {
                    replayed.cached.insert(seq, end);
                }
                expected = seq + 1;
            }
            Err(e @ FormatError::Version(_)) => {
                // Not damage: a log this firn cannot read. Nothing is set aside.
                return Err(io::Error::other(format!(
                    "log segment {}: {e}",
                    path.display()
                )));
            }
            Err(_) => {
                // No valid header: created, but nothing of it reached the disk.
                set_aside(&path)?;
                broken = true;
            }
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(replayed)
}

fn set_aside(path: &Path) -> io::Result<()> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".damaged");
    tracing::warn!(
        "log segment {} follows a damaged or missing one; kept aside as {}",
        path.display(),
        Path::new(&aside).display()
    );
    std::fs::rename(path, aside)
}

/// Replays one segment's records; the end of the valid records, and whether damage (rather
/// than the file's end) stopped the replay.
#[allow(clippy::too_many_arguments)]
pub(super) fn replay_records(
    key: &LogKey,
    seq: u64,
    bytes: &[u8],
    from: usize,
    verify: bool,
    map: &mut Map,
    salts: &mut BTreeMap<u64, [u8; 16]>,
    next_record: &mut u64,
) -> Result<(u64, bool), FormatError> {
    let salt = key.open_segment_header(seq, bytes)?;
    salts.insert(seq, salt);
    let mut pos = from.max(HEADER_LEN);
    if pos > bytes.len() {
        // The records before `from` are gone: the segment is shorter than its checkpoint.
        return Ok((bytes.len() as u64, true));
    }
    let mut scratch = Vec::new();
    while pos < bytes.len() {
        let Ok(header) = key.open_record_header(&salt, pos as u32, &bytes[pos..]) else {
            // Zeros to the end are a spare segment's, never written: the log ends cleanly.
            let torn = bytes[pos..].iter().any(|&b| b != 0);
            return Ok((pos as u64, torn));
        };
        let len = record::record_len(header.kind, header.length) as usize;
        if pos + len > bytes.len() {
            return Ok((pos as u64, true));
        }
        if verify && header.kind == Kind::Write {
            scratch.clear();
            scratch.extend_from_slice(&bytes[pos + HEADER_LEN..pos + len]);
            if key
                .open_frames(&salt, pos as u32, header.length as u32, 0, &mut scratch)
                .is_err()
            {
                return Ok((pos as u64, true));
            }
        }
        let place = match header.kind {
            Kind::Zero => Place::Zero,
            Kind::ZeroData => Place::ZeroData,
            Kind::Write => Place::Data {
                segment: seq,
                pos: pos as u32,
                rec_len: header.length as u32,
                skip: 0,
            },
        };
        map.insert(header.offset, header.length, place);
        *next_record = (*next_record).max(header.seq + 1);
        pos += len;
    }
    Ok((pos as u64, false))
}

const CHECKPOINT_MAGIC: &[u8; 4] = b"FCP2";
/// Checkpoints from before garbage collection: no chunk table.
const CHECKPOINT_MAGIC_1: &[u8; 4] = b"FCP1";
pub(super) const CHECKPOINT_FILE: &str = "checkpoint";

pub(super) fn checkpoint_context(id: &str) -> Vec<u8> {
    format!("firn volume checkpoint {id}").into_bytes()
}

/// The checkpoint's plain bytes: magic, segment, next record, size, the salts, the pieces,
/// the next chunk number and the chunk table.
pub(super) fn encode_checkpoint(checkpoint: &Checkpoint) -> Vec<u8> {
    let of = CheckpointOf::of(checkpoint);
    let mut out = Vec::with_capacity(of.len() as usize);
    // Writing to memory cannot fail.
    let _ = of.write_to(&mut out);
    out
}

/// A checkpoint's parts, borrowed where they live. The uploader encodes the live map under
/// its lock into blocks (`Blocks`), then, with the lock released, compresses them one by
/// one, freeing each as it goes: for a map of a million pieces, the map's copy (60 MiB),
/// the encoding whole (37 MiB) and two more copies of the sealed bytes are no longer in
/// memory at once.
pub(super) struct CheckpointOf<'a> {
    pub at: Cut,
    pub next_record: u64,
    pub size: u64,
    pub map: &'a Map,
    pub salts: &'a BTreeMap<u64, [u8; 16]>,
    pub chunks: &'a BTreeMap<u64, super::gc::ChunkRef>,
    pub next_chunk: u64,
}

impl CheckpointOf<'_> {
    pub fn of(checkpoint: &Checkpoint) -> CheckpointOf<'_> {
        CheckpointOf {
            at: checkpoint.at,
            next_record: checkpoint.next_record,
            size: checkpoint.size,
            map: &checkpoint.map,
            salts: &checkpoint.salts,
            chunks: &checkpoint.chunks,
            next_chunk: checkpoint.next_chunk,
        }
    }

    /// The bytes `write_to` writes.
    pub fn len(&self) -> u64 {
        let fixed = CHECKPOINT_MAGIC.len() + 5 * 8 + 8 + 2 * 8;
        (fixed + self.salts.len() * 24 + self.map.len() * 37 + self.chunks.len() * 48) as u64
    }

    /// Writes the plain bytes, in batches of about a MiB, and says which objects (segments
    /// and chunks) the pieces name: gathered on the way, as walking a map of a million pieces
    /// takes some 70 ms, which the uploader spends under the log's lock.
    pub fn write_to(&self, to: &mut impl io::Write) -> io::Result<BTreeSet<u64>> {
        let mut objects = BTreeSet::new();
        const BATCH: usize = 1 << 20;
        let mut out = Vec::with_capacity(BATCH + 64);
        out.extend_from_slice(CHECKPOINT_MAGIC);
        for word in [
            self.at.segment,
            self.at.end,
            self.next_record,
            self.size,
            self.salts.len() as u64,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for (seq, salt) in self.salts {
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(salt);
            if out.len() >= BATCH {
                to.write_all(&out)?;
                out.clear();
            }
        }
        out.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        for (offset, piece) in self.map.iter() {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&piece.len.to_le_bytes());
            match piece.place {
                Place::Zero | Place::ZeroData => {
                    out.push(if piece.place == Place::Zero { 0 } else { 2 });
                    out.extend_from_slice(&[0; 20]);
                }
                Place::Data {
                    segment,
                    pos,
                    rec_len,
                    skip,
                } => {
                    objects.insert(segment);
                    out.push(1);
                    out.extend_from_slice(&segment.to_le_bytes());
                    out.extend_from_slice(&pos.to_le_bytes());
                    out.extend_from_slice(&rec_len.to_le_bytes());
                    out.extend_from_slice(&skip.to_le_bytes());
                }
            }
            if out.len() >= BATCH {
                to.write_all(&out)?;
                out.clear();
            }
        }
        out.extend_from_slice(&self.next_chunk.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for (number, chunk) in self.chunks {
            out.extend_from_slice(&number.to_le_bytes());
            out.extend_from_slice(&chunk.name);
            out.extend_from_slice(&chunk.len.to_le_bytes());
            if out.len() >= BATCH {
                to.write_all(&out)?;
                out.clear();
            }
        }
        to.write_all(&out)?;
        Ok(objects)
    }
}

/// Bytes written as a list of blocks, so that the reader can free each once it has used it.
#[derive(Default)]
pub(super) struct Blocks(pub Vec<Vec<u8>>);

impl io::Write for Blocks {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads fields off the front of a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

pub(super) fn decode_checkpoint(bytes: &[u8]) -> Option<Checkpoint> {
    let mut c = Cursor(bytes);
    let magic = c.take(4)?;
    let with_chunks = magic == CHECKPOINT_MAGIC;
    if !with_chunks && magic != CHECKPOINT_MAGIC_1 {
        return None;
    }
    let at = Cut {
        segment: c.u64()?,
        end: c.u64()?,
    };
    let next_record = c.u64()?;
    let size = c.u64()?;
    let salt_count = c.u64()?;
    let mut salts = BTreeMap::new();
    for _ in 0..salt_count {
        let seq = c.u64()?;
        let salt: [u8; 16] = c.take(16)?.try_into().ok()?;
        salts.insert(seq, salt);
    }
    let pieces = c.u64()?;
    // No more pieces than the bytes left can hold: a count cannot make this allocate more.
    let mut sorted = Sorted::with_capacity(pieces.min(c.0.len() as u64 / 37) as usize);
    for _ in 0..pieces {
        let offset = c.u64()?;
        let len = c.u64()?;
        let kind = c.take(1)?[0];
        let place = match kind {
            0 | 2 => {
                c.take(20)?;
                if kind == 0 {
                    Place::Zero
                } else {
                    Place::ZeroData
                }
            }
            1 => Place::Data {
                segment: c.u64()?,
                pos: c.u32()?,
                rec_len: c.u32()?,
                skip: c.u32()?,
            },
            _ => return None,
        };
        if offset.checked_add(len).is_none_or(|end| end > size)
            || place.object().is_some_and(|n| n > super::map::MAX_OBJECT)
        {
            return None;
        }
        sorted.push(offset, len, place)?;
    }
    let map = sorted.finish();
    let mut chunks = BTreeMap::new();
    let mut next_chunk = 0;
    if with_chunks {
        next_chunk = c.u64()?;
        for _ in 0..c.u64()? {
            let number = c.u64()?;
            let name: [u8; 32] = c.take(32)?.try_into().ok()?;
            let len = c.u64()?;
            if number < super::CHUNK_BASE || number >= next_chunk {
                return None;
            }
            chunks.insert(number, super::gc::ChunkRef { name, len });
        }
    }
    if !c.0.is_empty() {
        return None;
    }
    Some(Checkpoint {
        at,
        next_record,
        size,
        map,
        salts,
        chunks,
        next_chunk,
    })
}

pub(super) fn seal_checkpoint(sealer: &Sealer, id: &str, checkpoint: &Checkpoint) -> Vec<u8> {
    sealer.seal(&checkpoint_context(id), &encode_checkpoint(checkpoint))
}

/// Opens a sealed checkpoint, decrypting it where it lies.
pub(super) fn open_checkpoint(
    sealer: &Sealer,
    id: &str,
    sealed: Vec<u8>,
) -> io::Result<Checkpoint> {
    let plain = sealer
        .open_owned(&checkpoint_context(id), sealed)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("checkpoint: {e}")))?;
    decode_checkpoint(&plain)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "checkpoint: malformed"))
}

pub(super) fn load_local_checkpoint(
    dir: &Path,
    sealer: &Sealer,
    id: &str,
) -> io::Result<Option<Checkpoint>> {
    match std::fs::read(dir.join(CHECKPOINT_FILE)) {
        Ok(sealed) => open_checkpoint(sealer, id, sealed).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the local checkpoint atomically (write aside, sync, rename, sync the directory).
pub(super) fn store_local_checkpoint(dir: &Path, sealed: &[u8]) -> io::Result<()> {
    let temporary = dir.join(format!("{CHECKPOINT_FILE}.new"));
    let file = crate::local::create_private(&temporary)?;
    use std::io::Write;
    (&file).write_all(sealed)?;
    file.sync_all()?;
    std::fs::rename(&temporary, dir.join(CHECKPOINT_FILE))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The uploader's way: the map written in blocks, sealed as a stream, opened whole.
    #[test]
    fn a_checkpoint_written_in_blocks_and_sealed_as_a_stream_opens_to_the_same_map() {
        let mut map = Map::new();
        for n in 0..100_000u64 {
            let place = if n % 10 == 0 {
                Place::Zero
            } else {
                Place::Data {
                    segment: n / 1000,
                    pos: (n % 1000) as u32 * 4200,
                    rec_len: 4096,
                    skip: 0,
                }
            };
            map.insert(n * 12288, 4096, place);
        }
        let salts: BTreeMap<u64, [u8; 16]> = (0..100).map(|n| (n, [n as u8; 16])).collect();
        let checkpoint = Checkpoint {
            at: Cut {
                segment: 100,
                end: 777,
            },
            next_record: 100_001,
            size: 1 << 40,
            map,
            salts,
            chunks: BTreeMap::new(),
            next_chunk: super::super::CHUNK_BASE + 1,
        };
        let of = CheckpointOf::of(&checkpoint);
        let mut blocks = Blocks::default();
        let named = of.write_to(&mut blocks).unwrap();
        assert_eq!(named, super::super::gc::objects_of(&checkpoint.map));
        assert_eq!(named.len(), 100);
        assert!(blocks.0.len() > 2, "{} blocks", blocks.0.len());
        assert_eq!(
            blocks.0.iter().map(Vec::len).sum::<usize>() as u64,
            of.len()
        );
        let sealer = Sealer::new(&crate::seal::MasterKey::from_bytes([4; 32]));
        let sealed = sealer
            .seal_streamed(&checkpoint_context("v1"), of.len(), |to| {
                for block in blocks.0 {
                    to.write_all(&block)?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(
            open_checkpoint(&sealer, "v1", sealed.clone()).unwrap(),
            checkpoint
        );
        assert!(open_checkpoint(&sealer, "v2", sealed).is_err());
    }

    #[test]
    fn checkpoints_read_back() {
        let mut map = Map::new();
        map.insert(0, 4096, Place::Zero);
        map.insert(
            8192,
            100,
            Place::Data {
                segment: 3,
                pos: 64,
                rec_len: 100,
                skip: 0,
            },
        );
        let mut salts = BTreeMap::new();
        salts.insert(3, [9; 16]);
        let mut chunks = BTreeMap::new();
        chunks.insert(
            super::super::CHUNK_BASE + 1,
            super::super::gc::ChunkRef {
                name: [7; 32],
                len: 8192,
            },
        );
        let checkpoint = Checkpoint {
            at: Cut {
                segment: 3,
                end: 4096,
            },
            next_record: 17,
            size: 1 << 30,
            map,
            salts,
            chunks,
            next_chunk: super::super::CHUNK_BASE + 2,
        };
        let bytes = encode_checkpoint(&checkpoint);
        assert_eq!(decode_checkpoint(&bytes), Some(checkpoint));
        for cut in 0..bytes.len() {
            assert!(decode_checkpoint(&bytes[..cut]).is_none());
        }
    }

    /// A spare segment's zeros after the last record end the log cleanly; anything else
    /// after it is a torn record.
    #[test]
    fn zeros_after_the_records_are_a_clean_end_and_other_bytes_a_torn_one() {
        use super::super::record::{Kind, RecordHeader};
        let key = LogKey::new(crate::seal::secret::Secret::new_with(|k| k.fill(5)));
        let salt = [3u8; 16];
        let mut segment = key.segment_header(7, &salt).to_vec();
        for (seq, offset) in [(1u64, 0u64), (2, 8192)] {
            let header = RecordHeader {
                kind: Kind::Write,
                offset,
                length: 5000,
                seq,
            };
            let pos = segment.len() as u32;
            key.seal_record(&salt, pos, &header, &[seq as u8; 5000], &mut segment);
        }
        let end = segment.len() as u64;
        let replay = |bytes: &[u8]| {
            let (mut map, mut salts, mut next) = (Map::new(), BTreeMap::new(), 0);
            let found =
                replay_records(&key, 7, bytes, 0, true, &mut map, &mut salts, &mut next).unwrap();
            (found, next, map.lookup(0, 16384).len())
        };
        assert_eq!(replay(&segment), ((end, false), 3, 4));
        let mut spare = segment.clone();
        spare.resize(segment.len() + (1 << 20), 0);
        assert_eq!(replay(&spare), ((end, false), 3, 4), "a zero tail");
        for junk_at in [0, 100, 1 << 19] {
            let mut torn = spare.clone();
            torn[end as usize + junk_at] = 1;
            assert_eq!(replay(&torn), ((end, true), 3, 4), "a byte at +{junk_at}");
        }
        // The second record's data lost (zeros) under an intact header: torn, not clean.
        let mut lost = spare.clone();
        let first_end = 64 + record::record_len(Kind::Write, 5000) as usize;
        lost[first_end + 64..end as usize].fill(0);
        assert_eq!(replay(&lost), ((first_end as u64, true), 2, 2));
    }

    /// A segment with records and zeros, then one more segment. Zeros end the log cleanly
    /// only in the newest segment, which replay cuts to its records.
    #[test]
    fn zeros_end_the_log_cleanly_only_in_the_newest_segment() {
        use super::super::record::{Kind, RecordHeader};
        let key = LogKey::new(crate::seal::secret::Secret::new_with(|k| k.fill(5)));
        let segment = |seq: u64, record: u64, tail: usize| {
            let salt = [seq as u8; 16];
            let mut bytes = key.segment_header(seq, &salt).to_vec();
            let header = RecordHeader {
                kind: Kind::Write,
                offset: record * 8192,
                length: 4096,
                seq: record,
            };
            let pos = bytes.len() as u32;
            key.seal_record(&salt, pos, &header, &[record as u8; 4096], &mut bytes);
            let end = bytes.len() as u64;
            bytes.resize(bytes.len() + tail, 0);
            (bytes, end)
        };
        // The segments' files in a fresh directory; the replay of it, and the record
        // number after it.
        let write_dir = |segments: [&[u8]; 2]| {
            let dir = tempfile::tempdir().unwrap();
            for (seq, bytes) in (1..).zip(segments) {
                std::fs::write(dir.path().join(segment_name(seq)), bytes).unwrap();
            }
            dir
        };
        let replay_dir = |dir: &Path| {
            let (mut map, mut salts, mut next) = (Map::new(), BTreeMap::new(), 1);
            let replayed = replay(
                dir,
                &key,
                Cut::default(),
                0,
                &mut map,
                &mut salts,
                &mut next,
            )
            .unwrap();
            (replayed, next)
        };
        let (first, first_end) = segment(1, 1, 1 << 20);
        let (second, _) = segment(2, 2, 0);
        let dir = write_dir([&first, &second]);
        let (replayed, next) = replay_dir(dir.path());
        // The first segment lost its end, so the second cannot follow it.
        assert_eq!(
            replayed.cut,
            Some(Cut {
                segment: 1,
                end: first_end
            })
        );
        assert_eq!(next, 2);
        assert!(
            dir.path()
                .join(format!("{}.damaged", segment_name(2)))
                .exists()
        );
        assert_eq!(
            std::fs::metadata(dir.path().join(segment_name(1)))
                .unwrap()
                .len(),
            first_end
        );

        // The zeros in the newest segment: a clean end, cut away.
        let (first, _) = segment(1, 1, 0);
        let (second, second_end) = segment(2, 2, 1 << 20);
        let dir = write_dir([&first, &second]);
        let (replayed, next) = replay_dir(dir.path());
        assert_eq!(
            replayed.cut,
            Some(Cut {
                segment: 2,
                end: second_end
            })
        );
        assert_eq!(next, 3);
        assert_eq!(
            std::fs::metadata(dir.path().join(segment_name(2)))
                .unwrap()
                .len(),
            second_end
        );
        assert_eq!(replayed.sizes.get(&2), Some(&second_end));
    }
}
