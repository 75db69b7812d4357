//! Garbage collection: the bucket keeps what the volume's image needs, not its whole history.
//!
//! Overwritten data leaves dead bytes in old segments. A collection pass, run by the uploader
//! every `gc_interval` when it has nothing else to do, works in two halves:
//!
//! - **Rewrite.** Objects (segments before the newest checkpoint, and chunks) whose live
//!   bytes are under `gc_live_percent` of their size give their live pieces, in volume order,
//!   to new *chunks*: objects sealed like a segment (numbered 0, with the salt taken from the
//!   chunk's name) holding one write record per piece. A chunk's name is a keyed hash of its
//!   records, so equal content gets an equal name and equal bytes; the key is the volume's,
//!   so a name never collides with another volume's chunk. A chunk is put into the bucket
//!   first; only then does the map move the pieces to it, and only the bytes that still read
//!   from where they were read (a write since wins). A checkpoint is then due: it names the
//!   chunks, and the next commit names it.
//! - **Sweep.** Once the newest commit names the newest checkpoint, the image needs only what
//!   that checkpoint's map names and the segments from its own on. Older commits and
//!   checkpoints, segments before it that neither that map nor the live map names, and chunks
//!   that neither names are garbage: each is deleted once it has been garbage for
//!   `gc_grace`, commits first, then checkpoints, then data, so that no object left in the
//!   bucket names a deleted one.
//!
//! A crash anywhere leaves a consistent bucket: before the checkpoint, the old one still names
//! the old objects, which nothing deleted; chunks made by a pass that a crash interrupted are
//! listed in the progress record (`gc_pending`) and swept as garbage. Each is also marked in
//! the bucket, by an empty object `gc-pending/<chunk name>` under the volume's prefix, put
//! before the chunk and deleted once a checkpoint names it: a gateway that takes the volume
//! over (or deletes it) finds there the chunks a lost gateway had made and nothing names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use bytes::Bytes;

use super::map::Place;
use super::record::{Kind, RecordHeader};
use super::uploader::{blocking, save_progress};
use super::{CHUNK_BASE, Cut, Inner, lock};
use crate::remote::Meta;

/// Live bytes one pass moves at most: bounds its memory and how long it runs.
const PASS_BYTES: u64 = 64 << 20;
/// Bytes of the objects one pass rewrites at most (each is fetched whole if not cached).
const PASS_OBJECT_BYTES: u64 = 256 << 20;

/// A chunk the map may name: its name (a keyed hash of its records) and data bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub name: [u8; 32],
    pub len: u64,
}

/// The chunks of a volume, by number, and the number the next one gets.
#[derive(Debug, Default)]
pub(super) struct Chunks {
    pub table: BTreeMap<u64, ChunkRef>,
    pub next: u64,
}

impl Chunks {
    pub fn new(table: BTreeMap<u64, ChunkRef>, next: u64) -> Chunks {
        let after_last = table.keys().next_back().map_or(0, |n| n + 1);
        Chunks {
            next: next.max(after_last).max(CHUNK_BASE + 1),
            table,
        }
    }

    fn by_name(&self, name: &[u8; 32]) -> Option<u64> {
        self.table
            .iter()
            .find(|(_, chunk)| &chunk.name == name)
            .map(|(&n, _)| n)
    }
}

/// What garbage collection remembers between passes.
#[derive(Debug, Default)]
pub(super) struct GcState {
    last: Option<Instant>,
    /// Objects found to be garbage, and since when.
    garbage: HashMap<String, Instant>,
    /// The checkpoint of the last sweep: with nothing found then, the next sweep waits for
    /// a newer one (each sweep lists the volume's objects).
    swept: Option<Cut>,
    pub moved_bytes: u64,
    pub deleted: u64,
}

/// Where chunk `name` is in the bucket.
pub(super) fn chunk_key(name: &[u8; 32]) -> String {
    let hex = hex(name);
    format!("chunks/{}/{hex}", &hex[..2])
}

/// The bucket's mark of a chunk no checkpoint names yet: `<volume prefix>gc-pending/<hex>`.
pub(super) fn pending_marker(volume_prefix: &str, chunk_key: &str) -> String {
    let hex = chunk_key.rsplit('/').next().unwrap_or_default();
    format!("{volume_prefix}gc-pending/{hex}")
}

/// The chunk a `gc-pending/` mark names, if the mark's name is a chunk name.
pub fn marked_chunk(marker: &str) -> Option<String> {
    let hex = marker.rsplit('/').next()?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("chunks/{}/{hex}", &hex[..2]))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The salt a chunk is sealed with: from its name, so equal content seals to equal bytes.
pub(super) fn chunk_salt(name: &[u8; 32]) -> [u8; 16] {
    name[..16].try_into().unwrap_or_default()
}

/// The chunk files on local disk that the table still names, with the bytes they take;
/// others are left over from chunks deleted meanwhile, and go.
pub(super) fn cached_chunks(dir: &Path, chunks: &Chunks) -> std::io::Result<Vec<(u64, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let number = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok());
        match number {
            Some(number) if chunks.table.contains_key(&number) => {
                found.push((number, entry.metadata()?.blocks() * 512));
            }
            _ => std::fs::remove_file(entry.path())?,
        }
    }
    Ok(found)
}

/// One collection pass, when one is due: whether it did anything.
pub(super) async fn collect(inner: &Arc<Inner>) -> Result<bool, String> {
    {
        let mut state = lock(&inner.state);
        if state.fenced.is_some()
            || state
                .gc
                .last
                .is_some_and(|t| t.elapsed() < inner.settings.gc_interval)
        {
            return Ok(false);
        }
        state.gc.last = Some(Instant::now());
    }
    // A checkpoint no commit names yet (written just before a crash or a restart) is named
    // by the next one, which needs a cut past it: on an idle volume, a marker makes one.
    let unnamed = {
        let state = lock(&inner.state);
        state.checkpoint > state.progress.commit_checkpoint && state.cuts.is_empty()
    };
    if unnamed {
        let marker = inner.clone();
        // Nothing marked while writes wait for a flush (their cut comes with it).
        return blocking(move || marker.mark_cut())
            .await
            .map_err(|e| format!("garbage collection, marking a cut: {e}"));
    }
    let swept = sweep(inner).await?;
    let moved = rewrite(inner).await?;
    Ok(swept || moved)
}

/// A piece of live data to move: where in the volume, and where it is now.
#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    len: u64,
    place: Place,
}

/// Picks the objects to rewrite and their live pieces, in volume order.
fn pick(inner: &Inner, floor: u64) -> Vec<Piece> {
    let map = inner.map.read().unwrap_or_else(PoisonError::into_inner);
    let mut live: HashMap<u64, u64> = HashMap::new();
    for (_, piece) in map.iter() {
        if let Some(object) = piece.place.object() {
            *live.entry(object).or_default() += piece.len;
        }
    }
    let percent = inner.settings.gc_live_percent;
    let mut victims: Vec<(u64, u64, u64)> = {
        let chunks = inner.chunks.read().unwrap_or_else(PoisonError::into_inner);
        live.iter()
            .filter_map(|(&object, &bytes)| {
                let size = if object >= CHUNK_BASE {
                    chunks.table.get(&object)?.len
                } else if object < floor {
                    inner.settings.segment_bytes
                } else {
                    return None;
                };
                (bytes * 100 < size * percent).then_some((object, bytes, size))
            })
            .collect()
    };
    // The emptiest first: most space back for the bytes moved.
    victims.sort_by_key(|&(object, bytes, size)| (bytes * 1000 / size.max(1), object));
    // Bounded both in live bytes moved and in whole objects fetched to move them.
    let (mut live_budget, mut object_budget) = (0, 0);
    let chosen: BTreeSet<u64> = victims
        .into_iter()
        .take_while(|&(_, bytes, size)| {
            let first = live_budget == 0;
            live_budget += bytes;
            object_budget += size;
            first || (live_budget <= PASS_BYTES && object_budget <= PASS_OBJECT_BYTES)
        })
        .map(|(object, _, _)| object)
        .collect();
    map.iter()
        .filter(|(_, piece)| piece.place.object().is_some_and(|o| chosen.contains(&o)))
        .map(|(offset, piece)| Piece {
            offset,
            len: piece.len,
            place: piece.place,
        })
        .collect()
}

/// Moves the live pieces of mostly-dead objects into chunks (see the module documentation).
async fn rewrite(inner: &Arc<Inner>) -> Result<bool, String> {
    let floor = {
        let state = lock(&inner.state);
        state.checkpoint.segment.min(state.progress.uploaded + 1)
    };
    if floor == 0 {
        return Ok(false);
    }
    let picker = inner.clone();
    let pieces = blocking(move || pick(&picker, floor)).await;
    if pieces.is_empty() {
        return Ok(false);
    }
    let objects: BTreeSet<u64> = pieces.iter().filter_map(|p| p.place.object()).collect();
    tracing::info!(
        volume = %inner.name,
        "garbage collection: moving {} live bytes out of {} objects",
        pieces.iter().map(|p| p.len).sum::<u64>(),
        objects.len()
    );
    // Whole objects are fetched once rather than piece by piece.
    for &object in &objects {
        fetch_whole(inner, object).await?;
    }
    let mut group = Vec::new();
    let mut group_bytes = 0;
    let mut moved = 0;
    for piece in pieces {
        if group_bytes + piece.len > inner.settings.segment_bytes && !group.is_empty() {
            moved += write_chunk(inner, std::mem::take(&mut group)).await?;
            group_bytes = 0;
        }
        group_bytes += piece.len;
        group.push(piece);
    }
    if !group.is_empty() {
        moved += write_chunk(inner, group).await?;
    }
    {
        let mut state = lock(&inner.state);
        state.gc.moved_bytes += moved;
        state.checkpoint_due = true;
    }
    inner.wake.notify_one();
    Ok(true)
}

/// Puts segment or chunk `object` into its local file whole unless that file is there.
async fn fetch_whole(inner: &Arc<Inner>, object: u64) -> Result<(), String> {
    if inner.local_path(object).exists() {
        return Ok(());
    }
    let key = inner.object_key(object).map_err(|e| e.to_string())?;
    let body = inner
        .bucket
        .remote
        .get(&key)
        .await
        .map_err(|e| format!("garbage collection: {e}"))?
        .body;
    let keeper = inner.clone();
    blocking(move || {
        let kept = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(keeper.local_path(object))
            .and_then(|file| file.write_all_at(&body, 0));
        if kept.is_ok() {
            let mut state = lock(&keeper.state);
            state.local_bytes += body.len() as u64;
            state.bytes_downloaded += body.len() as u64;
            *state.cached.entry(object).or_insert(0) += body.len() as u64;
        }
    })
    .await;
    Ok(())
}

/// Writes one chunk of `pieces` to the bucket and moves them there in the map; the bytes
/// moved.
async fn write_chunk(inner: &Arc<Inner>, pieces: Vec<Piece>) -> Result<u64, String> {
    let sealer = inner.clone();
    type Sealed = ([u8; 32], Vec<u8>, Vec<(Piece, u32)>);
    let (name, body, moves) = blocking(move || -> Result<Sealed, String> {
        let mut plain = Vec::with_capacity(pieces.len());
        for piece in &pieces {
            let mut data = vec![0u8; piece.len as usize];
            let Place::Data {
                segment,
                pos,
                rec_len,
                skip,
            } = piece.place
            else {
                continue;
            };
            sealer
                .read_data(
                    piece.offset,
                    segment,
                    pos,
                    rec_len,
                    skip,
                    &mut data,
                    super::Reach::Bucket,
                )
                .map_err(|e| format!("garbage collection: {e}"))?;
            plain.push((*piece, data));
        }
        let mut hasher = blake3::Hasher::new_keyed(&name_key(&sealer));
        for (piece, data) in &plain {
            hasher.update(&piece.offset.to_le_bytes());
            hasher.update(&(data.len() as u64).to_le_bytes());
            hasher.update(data);
        }
        let name = *hasher.finalize().as_bytes();
        let salt = chunk_salt(&name);
        let mut body = Vec::new();
        body.extend_from_slice(&sealer.key.segment_header(0, &salt));
        let mut moves = Vec::with_capacity(plain.len());
        for (piece, data) in &plain {
            let header = RecordHeader {
                kind: Kind::Write,
                offset: piece.offset,
                length: data.len() as u64,
                seq: 0,
            };
            let pos = body.len() as u32;
            sealer.key.seal_record(&salt, pos, &header, data, &mut body);
            moves.push((*piece, pos));
        }
        Ok((name, body, moves))
    })
    .await?;
    let existing = inner
        .chunks
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .by_name(&name);
    let key = inner.bucket.chunk_key(&name);
    let number = match existing {
        // The same content is in the table already, and no longer garbage. Put again all
        // the same (equal content, equal bytes): a sweep may have deleted it from the bucket
        // before a restart brought the table entry back.
        Some(number) => {
            lock(&inner.state).gc.garbage.remove(&key);
            inner
                .bucket
                .remote
                .put(&key, Bytes::from(body), Meta::new())
                .await
                .map_err(|e| format!("garbage collection, {key}: {e}"))?;
            number
        }
        None => {
            let progress = {
                let mut state = lock(&inner.state);
                state.progress.gc_pending.push(key.clone());
                state.progress.clone()
            };
            save_progress(inner, progress).await?;
            // Marked in the bucket too, for a gateway that takes over after a crash here.
            inner
                .bucket
                .remote
                .put(
                    &pending_marker(&inner.bucket.prefix, &key),
                    Bytes::new(),
                    Meta::new(),
                )
                .await
                .map_err(|e| format!("garbage collection, marking {key}: {e}"))?;
            let body = Bytes::from(body);
            inner
                .bucket
                .remote
                .put(&key, body.clone(), Meta::new())
                .await
                .map_err(|e| format!("garbage collection, {key}: {e}"))?;
            let len = moves.iter().map(|(p, _)| p.len).sum();
            let number = {
                let mut chunks = inner.chunks.write().unwrap_or_else(PoisonError::into_inner);
                let number = chunks.next;
                chunks.next += 1;
                chunks.table.insert(number, ChunkRef { name, len });
                number
            };
            inner
                .salts
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(number, chunk_salt(&name));
            lock(&inner.state).bytes_uploaded += body.len() as u64;
            // Kept locally too: the data was read a moment ago.
            let keeper = inner.clone();
            blocking(move || {
                let kept = crate::local::create_private(&keeper.local_path(number))
                    .and_then(|file| file.write_all_at(&body, 0));
                if kept.is_ok() {
                    let mut state = lock(&keeper.state);
                    state.local_bytes += body.len() as u64;
                    state.cached.insert(number, body.len() as u64);
                }
            })
            .await;
            number
        }
    };
    let mut map = inner.map.write().unwrap_or_else(PoisonError::into_inner);
    let mut moved = 0;
    for (piece, pos) in moves {
        let new = Place::Data {
            segment: number,
            pos,
            rec_len: piece.len as u32,
            skip: 0,
        };
        moved += map.replace_if(piece.offset, piece.len, piece.place, new);
    }
    Ok(moved)
}

/// The key that names this volume's chunks.
fn name_key(inner: &Inner) -> [u8; 32] {
    blake3::derive_key(
        "firn volume chunk names v1",
        &inner.sealer.log_key(&inner.id)[..],
    )
}

/// Deletes what has been garbage for the grace period (see the module documentation).
async fn sweep(inner: &Arc<Inner>) -> Result<bool, String> {
    let (newest, commit, refs) = {
        let state = lock(&inner.state);
        if state.checkpoint.segment == 0
            || state.progress.commit_checkpoint != state.checkpoint
            || (state.gc.swept == Some(state.checkpoint) && state.gc.garbage.is_empty())
        {
            return Ok(false);
        }
        (
            state.checkpoint,
            state.progress.commit,
            state.checkpoint_refs.clone(),
        )
    };
    let scanner = inner.clone();
    let mut named = blocking(move || live_objects(&scanner)).await;
    named.extend(refs);
    let remote = &inner.bucket.remote;
    let prefix = &inner.bucket.prefix;
    let listed = |what: &'static str| async move {
        remote
            .list(&format!("{prefix}{what}/"))
            .await
            .map_err(|e| format!("garbage collection, listing {what}: {e}"))
    };
    // In the order they may go.
    let mut garbage: Vec<(String, Option<u64>)> = Vec::new();
    for object in listed("commits").await? {
        let n = tail_hex(&object.key);
        if n.is_some_and(|n| n < commit) {
            garbage.push((object.key, None));
        } else if n.is_some_and(|n| n > commit) {
            // Another gateway took the volume over (a stale one never tried to commit, so
            // nothing fenced it yet): it deletes nothing of the new owner's.
            super::uploader::fence(
                inner,
                format!(
                    "commit {} in the bucket is newer than this gateway's",
                    n.unwrap_or(0)
                ),
            )
            .await;
            return Err("garbage collection: the volume was taken over".into());
        }
    }
    for object in listed("checkpoints").await? {
        if checkpoint_of(&object.key).is_some_and(|at| at < newest) {
            garbage.push((object.key, None));
        }
    }
    for object in listed("segments").await? {
        if let Some(seq) = tail_hex(&object.key)
            && seq < newest.segment
            && !named.contains(&seq)
        {
            garbage.push((object.key, Some(seq)));
        }
    }
    // Taken one lock at a time: the state's lock is never held with the table's.
    let table = inner
        .chunks
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .table
        .clone();
    for (&number, chunk) in &table {
        if !named.contains(&number) {
            garbage.push((inner.bucket.chunk_key(&chunk.name), Some(number)));
        }
    }
    let known: BTreeSet<String> = table
        .values()
        .map(|c| inner.bucket.chunk_key(&c.name))
        .collect();
    let pending = lock(&inner.state).progress.gc_pending.clone();
    for key in &pending {
        if !known.contains(key) {
            garbage.push((key.clone(), None));
        }
    }
    // The bucket's marks: a chunk no table here knows (a lost gateway's, or one whose put
    // a crash interrupted) goes, then its mark; a mark of a chunk a checkpoint names now
    // (its delete after the checkpoint failed or was cut short) goes alone.
    for marker in listed("gc-pending").await? {
        let Some(chunk) = marked_chunk(&marker.key) else {
            continue;
        };
        if !known.contains(&chunk) {
            garbage.push((chunk, None));
            garbage.push((marker.key, None));
        } else if !pending.contains(&chunk) {
            garbage.push((marker.key, None));
        }
    }
    let due: Vec<(String, Option<u64>)> = {
        let mut state = lock(&inner.state);
        let now = Instant::now();
        let mut seen = HashMap::with_capacity(garbage.len());
        let mut due = Vec::new();
        for (key, object) in garbage {
            let since = state.gc.garbage.get(&key).copied().unwrap_or(now);
            if now.duration_since(since) >= inner.settings.gc_grace {
                due.push((key.clone(), object));
            }
            seen.insert(key, since);
        }
        // Forgets what is gone or no longer garbage.
        state.gc.garbage = seen;
        state.gc.swept = Some(newest);
        due
    };
    if due.is_empty() {
        return Ok(false);
    }
    for (key, object) in &due {
        match remote.delete(key).await {
            Ok(()) | Err(crate::remote::Error::NotFound { .. }) => {}
            Err(e) => return Err(format!("garbage collection, deleting {key}: {e}")),
        }
        forget(inner, key, *object).await?;
    }
    tracing::info!(volume = %inner.name, "garbage collection deleted {} objects", due.len());
    Ok(true)
}

/// After `key` left the bucket: its local file, salt and chunk entry go too.
async fn forget(inner: &Arc<Inner>, key: &str, object: Option<u64>) -> Result<(), String> {
    let progress = {
        let mut state = lock(&inner.state);
        state.gc.garbage.remove(key);
        state.gc.deleted += 1;
        let pending = state.progress.gc_pending.len();
        state.progress.gc_pending.retain(|k| k != key);
        (state.progress.gc_pending.len() != pending).then(|| state.progress.clone())
    };
    if let Some(progress) = progress {
        save_progress(inner, progress).await?;
    }
    let Some(object) = object else {
        return Ok(());
    };
    inner
        .chunks
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .table
        .remove(&object);
    inner
        .salts
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&object);
    let remover = inner.clone();
    blocking(move || {
        lock(&remover.files).remove(&object);
        let mut state = lock(&remover.state);
        if let Some(bytes) = state.cached.remove(&object) {
            state.local_bytes = state.local_bytes.saturating_sub(bytes);
            drop(state);
            if let Err(e) = std::fs::remove_file(remover.local_path(object))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(volume = %remover.name, "removing the local copy of {object:x}: {e}");
            }
        }
    })
    .await;
    Ok(())
}

/// Every object the live map names.
fn live_objects(inner: &Inner) -> BTreeSet<u64> {
    objects_of(&inner.map.read().unwrap_or_else(PoisonError::into_inner))
}

/// Every object a map names.
pub(super) fn objects_of(map: &super::map::Map) -> BTreeSet<u64> {
    map.iter().filter_map(|(_, p)| p.place.object()).collect()
}

/// The number at the end of a key (`.../<16 hex digits>`).
fn tail_hex(key: &str) -> Option<u64> {
    let tail = key.rsplit('/').next()?;
    (tail.len() == 16)
        .then(|| u64::from_str_radix(tail, 16).ok())
        .flatten()
}

/// The cut a checkpoint key names (`.../checkpoints/<segment>-<end>`).
fn checkpoint_of(key: &str) -> Option<Cut> {
    let tail = key.rsplit('/').next()?;
    let (segment, end) = tail.split_once('-')?;
    Some(Cut {
        segment: u64::from_str_radix(segment, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
    })
}

/// The keys of every chunk that a checkpoint of volume `id` (under `prefix`) names, for
/// deleting the volume. Unreadable checkpoints are skipped.
pub async fn chunk_keys(
    remote: &dyn crate::remote::Remote,
    sealer: &crate::seal::Sealer,
    id: &str,
    prefix: &str,
) -> Result<BTreeSet<String>, crate::remote::Error> {
    let mut keys = BTreeSet::new();
    for object in remote.list(&format!("{prefix}checkpoints/")).await? {
        let body = remote.get(&object.key).await?.body;
        match super::state::open_checkpoint(sealer, id, Vec::from(body)) {
            Ok(checkpoint) => keys.extend(checkpoint.chunks.values().map(|c| chunk_key(&c.name))),
            Err(e) => tracing::warn!("{}: {e}", object.key),
        }
    }
    Ok(keys)
}
