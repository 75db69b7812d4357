//! The cached volume's uploader: one task per open volume that closes segments, uploads them
//! in order, writes checkpoints, commits, and evicts clean segments. It never gives up: when
//! the remote layer's retries end, the step is tried again after a pause.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::state::{Blocks, CheckpointOf, checkpoint_context, store_local_checkpoint};
use super::{Commit, Cut, Descriptor, Inner, PROGRESS_TABLE, lock, segment_name};
use crate::remote::{self, Meta};

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs until the volume is dropped (`State::stopped`).
pub(super) async fn run(inner: Arc<Inner>, descriptor: Descriptor) {
    // One task, so that the end of the uploads (or their cancelling) ends the evictions.
    tokio::select! {
        () = uploads(inner.clone(), descriptor) => {}
        () = evictions(&inner) => {}
    }
}

/// How often the local data is checked against its bounds beside the uploads.
const EVICT_EVERY: Duration = Duration::from_millis(500);

/// Keeps the volume's clean local data within its bounds (`cache_max`, the log's reserve,
/// `[local] min_free`) beside the uploads, not only between their steps: reads fetch data
/// into the cache whatever the uploads wait on (a slow commit, a bucket out of reach, their
/// back-off), and the cache grew past its bound by all that was read meanwhile.
async fn evictions(inner: &Arc<Inner>) {
    loop {
        tokio::time::sleep(EVICT_EVERY).await;
        let fenced = lock(&inner.state).fenced.is_some();
        if !fenced && let Err(e) = evict(inner).await {
            tracing::debug!(volume = %inner.name, "evicting: {e}");
        }
    }
}

async fn uploads(inner: Arc<Inner>, descriptor: Descriptor) {
    let mut backoff = Duration::from_millis(250);
    let mut leased: Option<std::time::Instant> = None;
    loop {
        if lock(&inner.state).stopped {
            return;
        }
        let outcome = async {
            // Fenced: the volume is another gateway's, and so are its descriptor and lease
            // (a restart of this one must not write its old size over them, or bring back a
            // volume the new owner deleted).
            if lock(&inner.state).fenced.is_some() {
                return Ok(false);
            }
            // Set until the bucket has it, so that a stop waits for it (`drain`).
            if lock(&inner.state).describe {
                let described = Descriptor {
                    size: inner.size(),
                    ..descriptor.clone()
                };
                put_descriptor(&inner, &described).await?;
                // Unless the volume grew again meanwhile.
                if inner.size() == described.size {
                    lock(&inner.state).describe = false;
                }
            }
            if leased.is_none_or(|at| at.elapsed() >= super::restore::LEASE_RENEW) {
                put_lease(&inner).await?;
                leased = Some(std::time::Instant::now());
            }
            step(&inner).await
        }
        .await;
        match outcome {
            Ok(true) => {
                backoff = Duration::from_millis(250);
                lock(&inner.state).last_error = None;
            }
            Ok(false) => {
                tokio::select! {
                    _ = inner.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            Err(e) => {
                let (repeated, fenced) = {
                    let mut state = lock(&inner.state);
                    (
                        state.last_error.replace(e.clone()).is_some(),
                        state.fenced.is_some(),
                    )
                };
                // A fence was logged as such, and ends the uploads for good.
                if !repeated && !fenced {
                    tracing::warn!(volume = %inner.name, "upload paused: {e}; retrying until it succeeds");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = inner.stopping.notified() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn descriptor_context(id: &str) -> Vec<u8> {
    format!("firn volume descriptor {id}").into_bytes()
}

pub(super) fn commit_context(id: &str) -> Vec<u8> {
    format!("firn volume commit {id}").into_bytes()
}

async fn put_descriptor(inner: &Inner, descriptor: &Descriptor) -> Result<(), String> {
    let plain = serde_json::to_vec(descriptor).map_err(|e| e.to_string())?;
    let sealed = inner.sealer.seal(&descriptor_context(&inner.id), &plain);
    inner
        .bucket
        .remote
        .put(
            &inner.bucket.descriptor_key(),
            Bytes::from(sealed),
            Meta::new(),
        )
        .await
        .map_err(|e| format!("descriptor: {e}"))
}

/// Says that this gateway serves the volume, as of now (`restore::Lease`), unless a newer
/// owner holds the lease: a gateway that took the volume over after this one did (a
/// takeover writes its lease), live or not (it may be down; its commit is the newest all the
/// same). Then this one fences itself, even if its clients never flush (a commit would find
/// out only at the next flush). A live lease of an older owner is one
/// that gateway renewed just as this one took the volume over: it is overwritten, and that
/// gateway fences itself at its next renewal (or commit).
async fn put_lease(inner: &Arc<Inner>) -> Result<(), String> {
    let since = {
        let state = lock(&inner.state);
        if state.fenced.is_some() {
            return Ok(());
        }
        state.progress.leased_since
    };
    let current = super::restore::lease(&inner.bucket, &inner.sealer, &inner.id)
        .await
        .map_err(|e| format!("lease: {e}"))?;
    if let Some(current) = current
        && current.gateway != inner.bucket.gateway
    {
        let live = super::restore::now_secs().saturating_sub(current.time)
            < super::restore::LEASE_LIVE.as_secs();
        // A higher `since` is a takeover after this gateway's own, whatever the lease's age:
        // the bucket's newest commit is that gateway's, so nothing written here can commit.
        if current.since > since || (live && current.since == since) {
            let why = format!(
                "another gateway ({}) holds the volume's lease: it took the volume over",
                current.gateway
            );
            fence(inner, why).await;
            return Ok(());
        }
        if live {
            tracing::warn!(
                volume = %inner.name,
                "gateway {} renewed its lease after this one took the volume over (at commit {since}); it is fenced at its next renewal",
                current.gateway
            );
        }
    }
    let now = super::restore::now_secs();
    super::restore::put_lease(&inner.bucket, &inner.sealer, &inner.id, since, now)
        .await
        .map_err(|e| format!("lease: {e}"))
}

/// Reads a descriptor written by `put_descriptor`.
pub fn open_descriptor(
    sealer: &crate::seal::Sealer,
    id: &str,
    sealed: &[u8],
) -> Result<Descriptor, String> {
    let plain = sealer
        .open(&descriptor_context(id), sealed)
        .map_err(|e| e.to_string())?;
    let descriptor: Descriptor = serde_json::from_slice(&plain).map_err(|e| e.to_string())?;
    super::restore::check_format("descriptor", descriptor.format)?;
    Ok(descriptor)
}

/// Reads a commit.
pub fn open_commit(
    sealer: &crate::seal::Sealer,
    id: &str,
    sealed: &[u8],
) -> Result<Commit, String> {
    let plain = sealer
        .open(&commit_context(id), sealed)
        .map_err(|e| e.to_string())?;
    let commit: Commit = serde_json::from_slice(&plain).map_err(|e| e.to_string())?;
    super::restore::check_format("commit", commit.format)?;
    Ok(commit)
}

pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        // The runtime is shutting down, and this task with it.
        Err(e) if e.is_cancelled() => std::future::pending().await,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// One unit of work; whether there was any.
async fn step(inner: &Arc<Inner>) -> Result<bool, String> {
    if lock(&inner.state).fenced.is_some() {
        return Ok(false);
    }
    close_if_due(inner).await?;
    let (next, sealed_upto) = {
        let state = lock(&inner.state);
        (state.progress.uploaded + 1, state.sealed_upto)
    };
    if next <= sealed_upto {
        upload_segment(inner, next).await?;
        // Writers outpacing the uplink keep sealed segments waiting for good: while more
        // wait, what keeps the bucket's image recent and the local disk bounded goes on
        // between uploads (a commit once `commit_interval` has passed since the last, a
        // checkpoint when due, eviction). Garbage collection, more uploads, waits for the
        // backlog to clear.
        if next < sealed_upto && commit_due(inner) {
            commit(inner).await?;
        }
        if next < sealed_upto {
            write_checkpoint(inner).await?;
            evict(inner).await?;
        }
        return Ok(true);
    }
    if write_checkpoint(inner).await? {
        return Ok(true);
    }
    if commit(inner).await? {
        return Ok(true);
    }
    if super::gc::collect(inner).await? {
        return Ok(true);
    }
    let evicted = evict(inner).await?;
    refill_reserve(inner).await;
    Ok(evicted)
}

/// Whether the newest commit is `commit_interval` old (or there is none), for a commit
/// between uploads.
fn commit_due(inner: &Inner) -> bool {
    let last = lock(&inner.state).last_commit_at;
    last.is_none_or(|at| at.elapsed() >= inner.settings.commit_interval)
}

/// Closes the open segment once it holds a cut for `commit_interval` (so the bucket's image
/// never lags much behind the newest flush), or any data for 30 intervals.
async fn close_if_due(inner: &Arc<Inner>) -> Result<(), String> {
    let inner = inner.clone();
    blocking(move || {
        let mut w = lock(&inner.log);
        let (has_cut, draining) = {
            let state = lock(&inner.state);
            (state.cuts.contains_key(&w.seq), state.draining)
        };
        let roll = |w: &mut super::Writer| {
            // A volume whose log write failed keeps its open segment until it is attached
            // again (`Inner::roll`); the sealed ones go on being uploaded.
            if lock(&inner.failed).is_some() {
                return Ok(());
            }
            // The next segment's space comes from a spare or the reserve; without it, wait
            // for uploads.
            let Some(space) = inner.segment_space() else {
                return Ok(());
            };
            // Without room after all (`Inner::roll`), the next step tries again.
            inner
                .roll(w, space)
                .map(drop)
                .map_err(|e| format!("closing a log segment: {e}"))
        };
        if w.end <= super::HEADER_LEN as u64 {
            return Ok(());
        }
        let age = w.opened.elapsed();
        let interval = inner.settings.commit_interval;
        if (has_cut && (age >= interval || draining)) || age >= interval * 30 {
            roll(&mut w)?;
        }
        Ok(())
    })
    .await
}

async fn upload_segment(inner: &Arc<Inner>, seq: u64) -> Result<(), String> {
    let reader = inner.clone();
    let body = blocking(move || -> std::io::Result<Vec<u8>> {
        let path = reader.dir.join("segments").join(segment_name(seq));
        let file = std::fs::File::open(&path)?;
        // Never upload what a power loss could still take from the local log: a segment in
        // the bucket must stay the same segment here. Its name too: ext4 and XFS commit a
        // new file's entry with the file's sync, POSIX promises it only for a sync of the
        // directory.
        file.sync_data()?;
        std::fs::File::open(reader.dir.join("segments"))?.sync_all()?;
        std::fs::read(&path)
    })
    .await
    .map_err(|e| format!("reading log segment {seq}: {e}"))?;
    let body = Bytes::from(body);
    let key = inner.bucket.segment_key(seq);
    let what = format!("segment {seq}");
    if create_once(inner, &key, body.clone(), |there| there == body, &what)
        .await?
        .is_some()
    {
        fence(
            inner,
            format!("segment {seq} in the bucket was written by another gateway"),
        )
        .await;
        return Err(format!("segment {seq}: taken over by another gateway"));
    }
    // Uploaded: its unused preallocation goes, and the log's room grows back by a segment.
    let releaser = inner.clone();
    let end = body.len() as u64;
    blocking(move || {
        if let Some(file) = releaser.file(seq) {
            super::reserve::release_tail(&file, end, releaser.segment_alloc);
        }
        lock(&releaser.reserve).give(releaser.segment_alloc);
    })
    .await;
    let progress = {
        let mut state = lock(&inner.state);
        let size = state.sealed.remove(&seq).unwrap_or(body.len() as u64);
        state.dirty_bytes = state.dirty_bytes.saturating_sub(size);
        state.cached.insert(seq, size);
        state.bytes_uploaded += body.len() as u64;
        state.progress.uploaded = seq;
        state.progress.clone()
    };
    inner.room.notify_all();
    save_progress(inner, progress).await
}

/// Creates `key` with `body` if nothing is there (create-if-absent). `None` when it is there
/// now as ours: created, or our own earlier attempt whose answer was lost (`ours` says so of
/// the bytes found); the bytes found otherwise: another gateway's.
async fn create_once(
    inner: &Inner,
    key: &str,
    body: Bytes,
    ours: impl Fn(&[u8]) -> bool,
    what: &str,
) -> Result<Option<Bytes>, String> {
    match inner.bucket.remote.create(key, body, Meta::new()).await {
        Ok(()) => Ok(None),
        Err(remote::Error::Exists { .. }) => {
            let there = inner
                .bucket
                .remote
                .get(key)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            // The whole object: the remote checks a read's length, and retries a torn one.
            if ours(&there.body) {
                return Ok(None);
            }
            Ok(Some(there.body))
        }
        Err(e) => Err(format!("{what}: {e}")),
    }
}

pub(super) async fn save_progress(
    inner: &Arc<Inner>,
    progress: super::Progress,
) -> Result<(), String> {
    let meta = inner.meta.clone();
    let id = inner.id.clone();
    blocking(move || meta.put_json(PROGRESS_TABLE, &id, &progress))
        .await
        .map_err(|e| format!("recording upload progress: {e}"))
}

/// Kept in the progress record too: a restart must not make the volume writable again.
pub(super) async fn fence(inner: &Arc<Inner>, why: String) {
    tracing::error!(
        volume = %inner.name,
        "{why}: this gateway no longer serves the volume; it is read-only here and its local log is kept"
    );
    let progress = {
        let mut state = lock(&inner.state);
        state.fenced = Some(why.clone());
        state.progress.fenced = Some(why);
        state.progress.clone()
    };
    // Writes waiting for room in the log fail now (`wait_while`).
    inner.room.notify_all();
    if let Err(e) = save_progress(inner, progress).await {
        tracing::error!(volume = %inner.name, "{e}: the fence holds until a restart only");
    }
}

/// Writes a checkpoint of the map when one is due: every `checkpoint_segments` uploaded
/// segments, or sooner when the cache is over its size (or the disk too full for the log's
/// reserve) and nothing in it may go (only
/// segments before the newest checkpoint's may). The map is taken as it stands, under the
/// log's lock, and the log is synced past that point before the checkpoint names it.
async fn write_checkpoint(inner: &Arc<Inner>) -> Result<bool, String> {
    let short = lock(&inner.reserve).short();
    let due = {
        let state = lock(&inner.state);
        let behind = state
            .progress
            .uploaded
            .saturating_sub(state.checkpoint.segment);
        // Not for `[local] min_free`: a disk kept under it by other files would then cost a
        // checkpoint (the whole map) per segment; what stays is the segments since the newest
        // checkpoint, `checkpoint_segments` at most.
        let stuck = (state.local_bytes > inner.cache_max() || short > 0)
            && state
                .cached
                .range(..state.checkpoint.segment)
                .next()
                .is_none()
            && behind > 0;
        behind >= inner.settings.checkpoint_segments || stuck || state.checkpoint_due
    };
    if !due {
        return Ok(false);
    }
    // Only garbage collection asks for a checkpoint with nothing written since the last
    // one: a checkpoint never takes the place (and bucket key) of another.
    let marker = inner.clone();
    let placed = blocking(move || {
        let newest = lock(&marker.state).checkpoint;
        if lock(&marker.log).position() > newest {
            return Ok(true);
        }
        marker.mark_cut()
    })
    .await
    .map_err(|e| format!("marking a cut for a checkpoint: {e}"))?;
    if !placed {
        return Ok(false);
    }
    let taker = inner.clone();
    type Taken = (Cut, Vec<u8>, std::collections::BTreeSet<u64>, Vec<String>);
    let (at, sealed, refs, chunk_keys) = blocking(move || -> Result<Taken, String> {
        let (at, plain_len, blocks, refs, chunk_keys) = {
            let w = lock(&taker.log);
            // Everything up to its point mapped: no record still being written.
            taker.wait_published(w.tickets);
            let chunks = taker.chunks.read().unwrap_or_else(|e| e.into_inner());
            let map = taker.map.read().unwrap_or_else(|e| e.into_inner());
            let of = CheckpointOf {
                // Where the log's last record ends (in the previous segment when the open
                // one is empty: a new segment's file may not be synced yet).
                at: w.position(),
                next_record: w.next_record,
                size: taker.size(),
                map: &map,
                salts: &taker.salts.read().unwrap_or_else(|e| e.into_inner()),
                chunks: &chunks.table,
                next_chunk: chunks.next,
            };
            let mut blocks = Blocks::default();
            let refs = of
                .write_to(&mut blocks)
                .map_err(|e| format!("encoding a checkpoint: {e}"))?;
            let chunk_keys: Vec<String> = chunks
                .table
                .values()
                .map(|c| taker.bucket.chunk_key(&c.name))
                .collect();
            (of.at, of.len(), blocks.0, refs, chunk_keys)
        };
        // The records the checkpoint stands on must survive a power cut before it does.
        taker
            .sync_log(false)
            .map_err(|e| format!("syncing the log for a checkpoint: {e}"))?;
        let sealed = taker
            .sealer
            .seal_streamed(&checkpoint_context(&taker.id), plain_len, |to| {
                // Each block is freed once compressed.
                for block in blocks {
                    to.write_all(&block)?;
                }
                Ok(())
            })
            .map_err(|e| format!("sealing a checkpoint: {e}"))?;
        Ok((at, sealed, refs, chunk_keys))
    })
    .await?;
    let sealed = Bytes::from(sealed);
    inner
        .bucket
        .remote
        .put(
            &inner.bucket.checkpoint_key(at),
            sealed.clone(),
            Meta::new(),
        )
        .await
        .map_err(|e| format!("checkpoint at {at:?}: {e}"))?;
    // On a full disk the checkpoint's space comes out of the log's reserve: without the
    // checkpoint no clean segment may be evicted, so nothing else could free space.
    let writer = inner.clone();
    blocking(move || {
        let needed = (sealed.len() as u64).div_ceil(4096) * 4096 + 4096;
        // Short of that, or unable to shorten the reserve, the file takes what the disk has.
        let _ = lock(&writer.reserve).take(needed);
        store_local_checkpoint(&writer.dir, &sealed)
    })
    .await
    .map_err(|e| format!("local checkpoint: {e}"))?;
    let cleared: Vec<String>;
    let progress = {
        let mut state = lock(&inner.state);
        state.checkpoint = at;
        state.checkpoint_refs = refs;
        state.checkpoint_due = false;
        // Chunks a checkpoint names are no longer at risk of being lost by a crash.
        cleared = state
            .progress
            .gc_pending
            .iter()
            .filter(|k| chunk_keys.contains(*k))
            .cloned()
            .collect();
        state
            .progress
            .gc_pending
            .retain(|k| !chunk_keys.contains(k));
        state.progress.checkpoints.push(at);
        let keep = state.progress.checkpoints.len().saturating_sub(4);
        state.progress.checkpoints.drain(..keep);
        state.progress.checkpoint = at;
        state.progress.clone()
    };
    save_progress(inner, progress).await?;
    // Their marks in the bucket may go (a sweep deletes any this leaves).
    for key in cleared {
        let marker = super::gc::pending_marker(&inner.bucket.prefix, &key);
        if let Err(e) = inner.bucket.remote.delete(&marker).await {
            tracing::debug!(volume = %inner.name, "deleting {marker}: {e}");
        }
    }
    Ok(true)
}

async fn commit(inner: &Arc<Inner>) -> Result<bool, String> {
    let (commit, key) = {
        let mut state = lock(&inner.state);
        let uploaded = state.progress.uploaded;
        let committed = state.committed;
        // Cuts a commit already covers are done with.
        state
            .cuts
            .retain(|&segment, &mut end| Some(Cut { segment, end }) > committed);
        let pending = state
            .cuts
            .range(..=uploaded)
            .next_back()
            .map(|(&segment, &end)| Cut { segment, end });
        let Some(cut) = pending else {
            if state.cuts.is_empty() {
                inner.room.notify_all();
            }
            return Ok(false);
        };
        let segment = cut.segment;
        // The newest checkpoint at or before the cut. The newest commit's own is one (its cut
        // is older), and garbage collection keeps it: the list of recent checkpoints may have
        // moved past the cut while uploads kept the commit waiting.
        let checkpoint = state
            .progress
            .checkpoints
            .iter()
            .copied()
            .chain([state.progress.commit_checkpoint])
            .filter(|&c| c <= cut)
            .max()
            .unwrap_or_default();
        // Replayed from the checkpoint's own segment on, unless it stands past that
        // segment's end (a takeover's checkpoint).
        let first = if checkpoint.end == u64::MAX {
            checkpoint.segment + 1
        } else {
            checkpoint.segment.max(1)
        };
        let runs = if first <= segment {
            vec![(first, segment)]
        } else {
            Vec::new()
        };
        let n = state.progress.commit + 1;
        let commit = Commit {
            format: super::restore::FORMAT,
            volume: inner.id.clone(),
            n,
            size: inner.size(),
            checkpoint,
            runs,
            cut,
            gateway: inner.bucket.gateway.clone(),
            time: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        (commit, inner.bucket.commit_key(n))
    };
    let plain = serde_json::to_vec(&commit).map_err(|e| e.to_string())?;
    let sealed = inner.sealer.seal(&commit_context(&inner.id), &plain);
    let n = commit.n;
    let mut commit = commit;
    match inner
        .bucket
        .remote
        .create(&key, Bytes::from(sealed), Meta::new())
        .await
    {
        Ok(()) => {}
        Err(remote::Error::Exists { .. }) => {
            let there = inner
                .bucket
                .remote
                .get(&key)
                .await
                .map_err(|e| format!("commit {n}: {e}"))?
                .body;
            match open_commit(&inner.sealer, &inner.id, &there) {
                // Ours: an earlier attempt whose answer was lost, or one made before a
                // crash that no progress record kept (possibly at an older cut). What the
                // bucket holds is what counts.
                Ok(found) if found.gateway == inner.bucket.gateway && found.n == n => {
                    commit = found;
                }
                other => {
                    let by = other
                        .map(|c| c.gateway)
                        .unwrap_or_else(|e| format!("unreadable: {e}"));
                    fence(
                        inner,
                        format!("commit {n} was made by another gateway ({by})"),
                    )
                    .await;
                    return Err(format!("commit {n}: taken over by another gateway"));
                }
            }
        }
        Err(e) => return Err(format!("commit {n}: {e}")),
    }
    let progress = {
        let mut state = lock(&inner.state);
        state.progress.commit = commit.n;
        state.progress.committed = Some(commit.cut);
        state.progress.commit_checkpoint = commit.checkpoint;
        state.committed = Some(commit.cut);
        let now = SystemTime::now();
        state.last_commit = Some(now);
        state.last_commit_at = Some(std::time::Instant::now());
        state.progress.commit_time = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let committed = state.committed;
        state
            .cuts
            .retain(|&segment, &mut end| Some(Cut { segment, end }) > committed);
        // What remains was flushed after this commit's cut: at the latest, now.
        state.pending_since = if state.cuts.is_empty() {
            None
        } else {
            state.pending_since.max(Some(std::time::Instant::now()))
        };
        state.progress.clone()
    };
    inner.room.notify_all();
    save_progress(inner, progress).await?;
    // Old commits are not needed to restore (the newest one is), and are deleted so that
    // finding the newest stays one short listing. Checkpoints and segments stay: garbage
    // collection, which knows what the kept commits name, is what may delete them.
    if commit.n > KEEP_COMMITS
        && let Err(e) = inner
            .bucket
            .remote
            .delete(&inner.bucket.commit_key(commit.n - KEEP_COMMITS))
            .await
    {
        tracing::debug!(volume = %inner.name, "deleting an old commit: {e}");
    }
    Ok(true)
}

/// Commits kept in the bucket: the newest and a few before it.
const KEEP_COMMITS: u64 = 16;

/// Grows the reserve back to the log's room where an earlier attempt found the disk full
/// (eviction may have freed space since).
async fn refill_reserve(inner: &Arc<Inner>) {
    let (target, held, short) = {
        let (cap, held, pending, short) = {
            let reserve = lock(&inner.reserve);
            (
                reserve.cap(),
                reserve.held(),
                reserve.pending(),
                reserve.short(),
            )
        };
        let target = cap
            .saturating_sub(inner.log_room_in_segments(pending))
            .saturating_sub(held);
        (target, held, short)
    };
    // Tried again after a shortfall even for less than a segment, which settles it; and
    // whenever the reserve holds less than a segment, which the next segment needs. (A
    // checkpoint takes its few KiB from the reserve: with a log of two segments, the
    // smallest allowed, the open one full and none waiting for upload, nothing else gives
    // them back, and writes waited for room for good.)
    if target >= inner.segment_alloc || short > 0 || (target > 0 && held < inner.segment_alloc) {
        let filler = inner.clone();
        blocking(move || lock(&filler.reserve).give(target)).await;
        inner.room.notify_all();
    }
}

/// How far the data directory's file system is under `[local] min_free` (0 when it is not,
/// or cannot be measured).
async fn below_min_free(inner: &Arc<Inner>) -> u64 {
    let min_free = inner.settings.min_free;
    if min_free == 0 {
        return 0;
    }
    let dir = inner.dir.clone();
    blocking(move || {
        nix::sys::statvfs::statvfs(&dir)
            .map(|stat| min_free.saturating_sub(stat.blocks_available() * stat.fragment_size()))
            .unwrap_or(0)
    })
    .await
}

/// Deletes the oldest clean segment files while the cache is over its size, or while the disk
/// is too full for the log's reserve to grow back (`Reserve::short`). Only segments a
/// local checkpoint covers go: a restart never needs to replay them.
async fn evict(inner: &Arc<Inner>) -> Result<bool, String> {
    // Accounted for first, deleted after: frames a read fetches meanwhile into a segment
    // being evicted are counted anew, in a file that a later eviction finds.
    let short = lock(&inner.reserve).short();
    let below = below_min_free(inner).await;
    let victims: Vec<u64> = {
        let mut state = lock(&inner.state);
        // Over the cache's bound, the disk too full for the log's reserve, or its free
        // space under `[local] min_free`.
        let mut over = state
            .local_bytes
            .saturating_sub(inner.cache_max())
            .max(short)
            .max(below);
        if over == 0 {
            return Ok(false);
        }
        let mut victims = Vec::new();
        // Chunks are always in the bucket and never replayed: evictable whenever.
        let clean = state
            .cached
            .range(..state.checkpoint.segment)
            .chain(state.cached.range(super::CHUNK_BASE..));
        for (&seq, &bytes) in clean {
            if over == 0 {
                break;
            }
            victims.push(seq);
            over = over.saturating_sub(bytes);
        }
        for seq in &victims {
            if let Some(bytes) = state.cached.remove(seq) {
                state.local_bytes = state.local_bytes.saturating_sub(bytes);
            }
        }
        victims
    };
    if victims.is_empty() {
        return Ok(false);
    }
    let remover = inner.clone();
    blocking(move || {
        for seq in &victims {
            lock(&remover.files).remove(seq);
            if let Err(e) = std::fs::remove_file(remover.local_path(*seq))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(volume = %remover.name, "evicting segment {seq}: {e}");
            }
        }
    })
    .await;
    Ok(true)
}

#[cfg(test)]
mod tests;
