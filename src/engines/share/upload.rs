//! A share's uploader: one task per share. It deletes the objects of removed and moved files,
//! and uploads every dirty file that has settled (or that a commit asked for) as one whole
//! object, streamed from its local content, eight at a time; a slot that frees takes the next
//! file. A file changed while it is read fails its
//! upload before the object is complete, so the bucket never holds a torn file; it goes up
//! again once it settles. The loop never gives up: errors pause it, then it tries again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};

use super::namespace::{Decision, Done, Kind, Uploaded};
use super::{Share, ShareError, lock};
use crate::remote::{self, Body, Meta};

/// Files whose keys go on record in one commit before their uploads, objects deleted in a
/// row, and uploads recorded in one commit at most.
const BATCH: usize = 64;
/// Files uploading at once.
const CONCURRENCY: usize = 8;
/// Files up to this size are read whole with their attributes, in the same hop to a blocking
/// thread, and go up from memory: for small files the hops cost more than the bytes (the
/// digest's read and the upload's each took one). At most `CONCURRENCY` of them are held.
const READ_WHOLE: u64 = 256 << 10;
/// How often the local bytes of clean files are checked against `cache_max`.
const EVICT_EVERY: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How soon a failed refresh is tried again (at most `Settings::refresh`).
const REFRESH_RETRY: Duration = Duration::from_secs(30);
/// The message of a read that found its file changing.
const CHANGED: &str = "the file changed during its upload";
/// The message of a call the stopping daemon cancelled.
const STOPPING: &str = "the daemon is stopping";

pub(super) async fn run(share: Arc<Share>) {
    // One task, so that aborting it (a share's delete) ends both loops.
    tokio::join!(uploads(share.clone()), refreshes(share));
}

/// Refreshes the share from the bucket as soon as it opens (a new share over objects other
/// tools put, or objects put while the gateway was down, show at once), then every
/// `Settings::refresh`; a failed one is tried again sooner. Beside the uploads, not between
/// them: a refresh of a large prefix never holds an upload up.
async fn refreshes(share: Arc<Share>) {
    let Some(every) = share.settings.refresh else {
        return;
    };
    loop {
        let next = match blocking(&share, |share| share.refresh("")).await {
            Ok(report) => {
                tracing::debug!(share = %share.info.name, ?report, "refreshed from the bucket");
                every
            }
            Err(e) => {
                if !share.stopped.load(Ordering::Acquire) {
                    tracing::warn!(share = %share.info.name, "refreshing from the bucket: {e}");
                }
                every.min(REFRESH_RETRY)
            }
        };
        let started = std::time::Instant::now();
        while started.elapsed() < next {
            if share.stopped.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep((next - started.elapsed()).min(Duration::from_secs(1))).await;
        }
        if share.stopped.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Uploads under way: each yields its file, the key it went to, and how it ended.
type Running<'a> = FuturesUnordered<BoxFuture<'a, (u64, Option<String>, Result<Ended, String>)>>;

/// Deletes queued objects and uploads settled dirty files, `CONCURRENCY` at a time. A slot
/// that frees takes the next file at once: a long upload holds up no other (a file a client
/// committed goes up while a large one is still on its way).
async fn uploads(share: Arc<Share>) {
    let mut backoff = MIN_BACKOFF;
    // No new work before then, after an error; uploads under way go on.
    let mut resume = Instant::now();
    let mut last_eviction = Instant::now();
    let mut running: Running<'_> = FuturesUnordered::new();
    let mut queued = Queued::new();
    // The files running or queued, and the keys they go to.
    let mut in_flight = HashSet::new();
    let mut keys_in_flight = HashSet::new();
    // Files whose upload failed, held back until then (doubling while it fails): one that
    // always fails (a key the store refuses) holds up no other file.
    let mut held: HashMap<u64, (Instant, Duration)> = HashMap::new();
    // Often enough for the settle time to be kept to within a quarter of it.
    let tick = (share.settings.settle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        if share.stopped.load(Ordering::Acquire) {
            return;
        }
        if last_eviction.elapsed() >= EVICT_EVERY {
            last_eviction = Instant::now();
            match blocking(&share, |share| share.evict()).await {
                Ok(0) => {}
                Ok(freed) => {
                    tracing::debug!(share = %share.info.name, "evicted {freed} bytes of clean files")
                }
                Err(e) => tracing::warn!(share = %share.info.name, "evicting clean files: {e}"),
            }
            // Files removed or renamed away while held back.
            if !held.is_empty() {
                let dirty = lock(&share.dirty);
                held.retain(|id, _| dirty.contains_key(id));
            }
        }
        let mut busy = false;
        if Instant::now() >= resume {
            let started = match delete_queued(&share).await {
                Ok(deleted) => {
                    let flight = Flight {
                        files: &mut in_flight,
                        keys: &mut keys_in_flight,
                    };
                    start_uploads(&share, &mut running, &mut queued, flight, &held)
                        .await
                        .map(|started| deleted || started)
                }
                Err(e) => Err(e),
            };
            busy = matches!(started, Ok(true));
            if let Err(e) = started {
                resume = failed(&share, e, &mut backoff);
            }
        }
        let wait = if busy {
            Duration::ZERO
        } else {
            tick.max(resume.saturating_duration_since(Instant::now()))
        };
        tokio::select! {
            Some(first) = running.next(), if !running.is_empty() => {
                // Those that ended together are recorded together, in one transaction.
                let mut ended = vec![first];
                while ended.len() < BATCH
                    && let Some(Some(next)) = running.next().now_or_never()
                {
                    ended.push(next);
                }
                for (id, key, _) in &ended {
                    in_flight.remove(id);
                    if let Some(key) = key {
                        keys_in_flight.remove(key);
                    }
                }
                let settled = settle(&share, ended).await;
                share.uploading_files.store(in_flight.len() as u64, Ordering::Relaxed);
                for id in settled.up {
                    held.remove(&id);
                }
                for id in settled.failed {
                    let wait = held.get(&id).map_or(MIN_BACKOFF, |&(_, d)| (d * 2).min(MAX_BACKOFF));
                    held.insert(id, (Instant::now() + wait, wait));
                }
                match settled.error {
                    // Until no file is held back either.
                    None if held.is_empty() => *lock(&share.last_error) = None,
                    None => {}
                    Some(e) if settled.general => resume = failed(&share, e, &mut backoff),
                    Some(e) => {
                        note_error(&share, e);
                    }
                }
                if !settled.general {
                    backoff = MIN_BACKOFF;
                }
            }
            _ = share.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Notes an error that holds every upload back (logged once while it repeats): when to go on.
fn failed(share: &Share, e: String, backoff: &mut Duration) -> Instant {
    note_error(share, e);
    let resume = Instant::now() + *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    resume
}

/// Notes an error in `last_error`, and in the log unless it repeats.
fn note_error(share: &Share, e: String) {
    let repeated = lock(&share.last_error).replace(e.clone()).is_some();
    if !repeated {
        tracing::warn!(share = %share.info.name, "upload paused: {e}; retrying until it succeeds");
    }
}

/// Deletes up to `BATCH` of the objects queued for deletion; whether it deleted any.
async fn delete_queued(share: &Arc<Share>) -> Result<bool, String> {
    let deletes = blocking(share, |share| share.ns.deletes(BATCH)).await?;
    let mut deleted = false;
    for (path, etag) in deletes {
        let asked = path.clone();
        match blocking(share, move |share| share.ns.delete_decision(&asked)).await? {
            Decision::Keep => continue,
            Decision::Drop => {}
            Decision::Delete => {
                let key = format!("{}{path}", share.info.prefix);
                // A directory's marker is empty: one with data is another tool's object
                // that no file here is (S3 lets `a/` hold bytes), and stays.
                let marker = path.ends_with('/');
                let there = if etag.is_some() || marker {
                    share
                        .remote
                        .head(&key)
                        .await
                        .map_err(|e| format!("deleting {key}: {e}"))?
                } else {
                    None
                };
                let theirs = there.is_some_and(|there| {
                    marker && there.size > 0
                        || etag.is_some() && there.etag.is_some() && there.etag != etag
                });
                if theirs {
                    // Not the object removed here: another tool's, put since (or a marker
                    // with data). It stays, and the next refresh takes it in.
                    tracing::info!(share = %share.info.name, "{key} is another tool's object, not the one removed or renamed here: kept");
                } else {
                    share
                        .remote
                        .delete(&key)
                        .await
                        .map_err(|e| format!("deleting {key}: {e}"))?;
                }
            }
        }
        blocking(share, move |share| share.ns.deleted(&path)).await?;
        deleted = true;
    }
    Ok(deleted)
}

/// Files whose keys are on record, waiting for a free slot: (id, generation, key).
type Queued = VecDeque<(u64, u64, Option<String>)>;

/// The files running or queued, and the keys they go to. One upload at a time goes to a
/// key: a file renamed or removed during its upload (which retries may stretch to minutes)
/// must not have its bytes land over those of the file that took its name and went up
/// since, nor its object appear after that name's deletion was decided.
struct Flight<'a> {
    files: &'a mut HashSet<u64>,
    keys: &'a mut HashSet<String>,
}

/// Starts uploads while slots are free: of the files queued, and when none are, of up to
/// `BATCH` settled dirty files (or those a commit asked for) not under way, whose keys go on
/// record in one commit. Whether it started any.
async fn start_uploads<'a>(
    share: &'a Arc<Share>,
    running: &mut Running<'a>,
    queued: &mut Queued,
    flight: Flight<'_>,
    held: &HashMap<u64, (Instant, Duration)>,
) -> Result<bool, String> {
    if queued.is_empty() && running.len() < CONCURRENCY {
        queue_due(share, queued, flight, held).await?;
    }
    let mut started = false;
    while running.len() < CONCURRENCY
        && let Some((id, generation, key)) = queued.pop_front()
    {
        running.push(Box::pin(async move {
            let outcome = match &key {
                Some(key) => upload(share, id, generation, key).await,
                None => gone(share, id),
            };
            (id, key, outcome)
        }));
        started = true;
    }
    Ok(started)
}

/// Queues up to `BATCH` of the files due for upload, not under way and not `held` back,
/// and whose keys no upload under way goes to (those wait for it to end).
async fn queue_due(
    share: &Arc<Share>,
    queued: &mut Queued,
    flight: Flight<'_>,
    held: &HashMap<u64, (Instant, Duration)>,
) -> Result<(), String> {
    let in_flight = flight.files;
    let now = Instant::now();
    let due: Vec<(u64, u64)> = {
        let dirty = lock(&share.dirty);
        dirty
            .iter()
            .filter(|(id, d)| {
                !in_flight.contains(*id)
                    && held.get(*id).is_none_or(|&(until, _)| until <= now)
                    && d.writing == 0
                    && (d.now || d.last_change.elapsed() >= share.settings.settle)
            })
            .map(|(&id, d)| (id, d.generation))
            .take(BATCH)
            .collect()
    };
    if due.is_empty() {
        return Ok(());
    }
    // Each key an object may appear at is on record before its upload begins, so that a file
    // removed or renamed meanwhile cannot come back from it (`Namespace::start_uploads`).
    // Counted from before their keys are on record until each outcome is: a file removed
    // meanwhile leaves the dirty set, but not this.
    let ids: Vec<u64> = due.iter().map(|&(id, _)| id).collect();
    in_flight.extend(ids.iter().copied());
    share
        .uploading_files
        .store(in_flight.len() as u64, Ordering::Relaxed);
    let keys = blocking(share, {
        let ids = ids.clone();
        move |share| share.ns.start_uploads(&ids)
    })
    .await;
    let keys: HashMap<u64, String> = match keys {
        Ok(keys) => keys.into_iter().collect(),
        Err(e) => {
            for id in &ids {
                in_flight.remove(id);
            }
            share
                .uploading_files
                .store(in_flight.len() as u64, Ordering::Relaxed);
            return Err(e);
        }
    };
    for (id, generation) in due {
        let key = keys.get(&id).cloned();
        if let Some(key) = &key
            && !flight.keys.insert(key.clone())
        {
            // Its key on record does no harm: the upload under way has it on record too, or
            // it is the object of the file that upload is of.
            in_flight.remove(&id);
            continue;
        }
        queued.push_back((id, generation, key));
    }
    share
        .uploading_files
        .store(in_flight.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// How uploads that ended were recorded (`settle`).
#[derive(Default)]
struct Settled {
    /// Files whose upload did not fail.
    up: Vec<u64>,
    /// Files whose upload failed.
    failed: Vec<u64>,
    /// The first error.
    error: Option<String>,
    /// Whether an error came from recording (the metadata store), not from one file's upload.
    general: bool,
}

/// Records uploads that ended: those that went up, and the keys of those that did not
/// (which may have made their object all the same).
async fn settle(
    share: &Arc<Share>,
    ended: Vec<(u64, Option<String>, Result<Ended, String>)>,
) -> Settled {
    let mut went_up = Vec::with_capacity(ended.len());
    // Uploads that end with no record: whether each may have made its object.
    let mut unrecorded = Vec::new();
    let mut first_error = None;
    let mut settled = Settled::default();
    for (id, key, outcome) in ended {
        if outcome.is_err() {
            settled.failed.push(id);
        } else {
            settled.up.push(id);
        }
        match outcome {
            Ok(Ended::Up(up)) => went_up.push(up),
            Ok(Ended::Nothing) => unrecorded.extend(key.map(|key| (id, key, false))),
            // Queued for deletion, which `delete_decision` turns down while the file
            // still lives at the key: a file removed or renamed meanwhile leaves nothing.
            Ok(Ended::Changed) => unrecorded.extend(key.map(|key| (id, key, true))),
            Err(e) => {
                unrecorded.extend(key.map(|key| (id, key, true)));
                first_error.get_or_insert(e);
            }
        }
    }
    let recorded: Vec<(u64, String)> = went_up.iter().map(|up| (up.id, up.path.clone())).collect();
    if let Err(e) = record(share, went_up) {
        unrecorded.extend(recorded.into_iter().map(|(id, key)| (id, key, true)));
        settled.general = true;
        first_error.get_or_insert(e);
    }
    if !unrecorded.is_empty() {
        let result = blocking(share, move |share| share.ns.uploads_unrecorded(&unrecorded)).await;
        if let Err(e) = result {
            settled.general = true;
            first_error.get_or_insert(e);
        }
    }
    settled.error = first_error;
    settled
}

/// A file's upload that reached the bucket, to be recorded (`record`).
struct WentUp {
    id: u64,
    generation: u64,
    path: String,
    len: u64,
    etag: Option<String>,
    mtime_ns: u64,
    blocks: Option<Vec<u8>>,
}

/// Records uploads that reached the bucket: each object is the file's whatever happened
/// meanwhile (so a rename or remove since deletes it), and a file is clean only if nothing
/// changed since its upload read it. The lock keeps a new change from slipping in between
/// that check and the record. How many files are clean now.
fn record(share: &Share, went_up: Vec<WentUp>) -> Result<usize, String> {
    if went_up.is_empty() {
        return Ok(0);
    }
    let mut dirty = lock(&share.dirty);
    let done: Vec<Done> = went_up
        .into_iter()
        .map(|up| {
            let clean = dirty
                .get(&up.id)
                .is_some_and(|d| d.generation == up.generation && d.writing == 0);
            if clean {
                dirty.remove(&up.id);
            }
            share.remember_upload(&up.path, up.len);
            Done {
                id: up.id,
                uploaded: Uploaded {
                    path: up.path,
                    size: up.len,
                    etag: up.etag,
                },
                mtime_ns: up.mtime_ns,
                clean,
                blocks: up.blocks,
            }
        })
        .collect();
    match share.ns.uploaded(&done) {
        Ok(()) => {
            let mut clean = 0;
            for d in done.iter().filter(|d| d.clean) {
                clean += 1;
                share.uploaded_files.fetch_add(1, Ordering::Relaxed);
                share
                    .uploaded_bytes
                    .fetch_add(d.uploaded.size, Ordering::Relaxed);
                // Clean now; the next eviction check counts it exactly.
                share
                    .clean_bytes
                    .fetch_add(d.uploaded.size, Ordering::Relaxed);
                share.clean_files.fetch_add(1, Ordering::Relaxed);
            }
            Ok(clean)
        }
        Err(e) => {
            // Still dirty on disk: the next pass uploads them again.
            for d in &done {
                dirty.entry(d.id).or_insert(super::Dirty {
                    generation: 0,
                    writing: 0,
                    last_change: std::time::Instant::now(),
                    now: true,
                    bytes: d.uploaded.size,
                });
            }
            Err(format!(
                "recording the upload of {} files ({}{}, ...): {e}",
                done.len(),
                share.info.prefix,
                done[0].uploaded.path
            ))
        }
    }
}

/// File `id`, due for upload, has no key: it is gone, or the share's root.
fn gone(share: &Share, id: u64) -> Result<Ended, String> {
    lock(&share.dirty).remove(&id);
    Ok(Ended::Nothing)
}

/// File `id` is evicted, and the object its content was to come from is gone, or another
/// tool put another version there: what made the file dirty (a rename, new attributes, a
/// write that failed for want of the content) changed none of its bytes, and they cannot be
/// had. The bucket wins. Gone: the file is clean, and the next refresh removes it. Another
/// version, the file renamed since its upload: that version is its content now, and goes up
/// under the new name (the rename completes). Another version, not renamed: the file is
/// clean, and the next refresh takes the version in. Unless the file changed since this
/// upload began: then the next pass looks again.
fn give_way(share: &Share, id: u64, generation: u64) -> Result<Ended, ShareError> {
    let inode = share.ns.get(id)?;
    let Some(uploaded) = inode.uploaded else {
        return Ok(Ended::Nothing);
    };
    let path = share.ns.path(id)?;
    let renamed = path != uploaded.path;
    let key = format!("{}{}", share.info.prefix, uploaded.path);
    let head = share.bucket_answer(&key, share.remote.head(&key))?;
    if let Some(head) = &head {
        // As it was: the fetch failed for another reason, and the next pass tries again.
        if head.size == uploaded.size && (uploaded.etag.is_none() || head.etag == uploaded.etag) {
            return Ok(Ended::Nothing);
        }
        // Another file of the share lives at the old key now: the object there may be its
        // own upload, not another tool's. It is not this file's content; the error stays.
        if renamed
            && share
                .ns
                .resolve(&uploaded.path)
                .is_ok_and(|other| other != id)
        {
            return Err(ShareError::Io(format!(
                "{key} changed in the bucket before the file renamed from it was fetched, and another file of the share lives there now: the renamed file's content cannot be had"
            )));
        }
    }
    let mut dirty = lock(&share.dirty);
    let unchanged = dirty
        .get(&id)
        .is_some_and(|d| d.generation == generation && d.writing == 0);
    if !unchanged || share.content_path(id).exists() {
        return Ok(Ended::Nothing);
    }
    match head {
        Some(head) if renamed => {
            let found = Uploaded {
                path: uploaded.path,
                size: head.size,
                etag: head.etag,
            };
            tracing::warn!(share = %share.info.name, "{key} changed in the bucket while its file was evicted and renamed here: the rename moves the bucket's version");
            share.ns.update(id, |inode| {
                inode.size = found.size;
                inode.uploaded = Some(found);
            })?;
            if let Some(d) = dirty.get_mut(&id) {
                d.bytes = head.size;
            }
        }
        _ => {
            // Only if it is still where it was looked at (a rename commits before it counts
            // as a change): else the next pass looks again.
            if share.ns.clear_dirty(id, &path)? {
                tracing::warn!(share = %share.info.name, "{key} is gone or changed in the bucket, and its file was evicted here: the changes made here give way to the bucket's, which the next refresh takes in");
                dirty.remove(&id);
            }
        }
    }
    Ok(Ended::Nothing)
}

/// How an upload that did not fail ended.
enum Ended {
    /// It went up: to be recorded.
    Up(WentUp),
    /// Nothing was sent: the file moved from its key since (it goes up under its new one
    /// next time) or is gone, or changed before its content was read (it stays dirty).
    Nothing,
    /// The file changed while its content was being sent (it stays dirty). An earlier try
    /// whose answer was lost may have stored an object at the key all the same.
    Changed,
}

/// Uploads file `id` as it is at `generation` to `key` (share-relative).
async fn upload(share: &Arc<Share>, id: u64, generation: u64, key: &str) -> Result<Ended, String> {
    let found = blocking(share, move |share| {
        let inode = share.ns.get(id)?;
        let path = share.ns.path(id)?;
        let attrs = share.attrs_of(id, &inode)?;
        let file = match inode.kind {
            Kind::File => Some(share.content(id)?),
            _ => None,
        };
        // Read between two looks at the file's generation, as `Content` reads: `None` if it
        // changed, and it stays dirty.
        let whole = match &file {
            Some(file) if attrs.size <= READ_WHOLE => {
                use std::os::unix::fs::FileExt;
                let unchanged = || unchanged(share, id, generation);
                let mut buf = vec![0; attrs.size as usize];
                let read = unchanged() && file.read_exact_at(&mut buf, 0).is_ok() && unchanged();
                Some(read.then(|| Bytes::from(buf)))
            }
            _ => None,
        };
        Ok((inode, path, attrs, file, whole))
    })
    .await;
    let (inode, path, attrs, file, whole) = match found {
        Ok(found) => found,
        Err(e) if e.starts_with("gone:") => {
            lock(&share.dirty).remove(&id);
            return Ok(Ended::Nothing);
        }
        Err(e) if e.starts_with(CHANGED_OBJECT) => {
            return blocking(share, move |share| give_way(share, id, generation)).await;
        }
        Err(e) => return Err(e),
    };
    // A directory's object is its marker, `a/b/`.
    let path = match inode.kind {
        Kind::Dir if path.is_empty() => {
            lock(&share.dirty).remove(&id);
            return Ok(Ended::Nothing);
        }
        Kind::Dir => path + "/",
        _ => path,
    };
    if path != key {
        return Ok(Ended::Nothing);
    }
    let key = format!("{}{path}", share.info.prefix);
    let mut content = None;
    let body: Arc<dyn Body> = match (inode.kind, file, whole) {
        (Kind::File, _, Some(None)) => return Ok(Ended::Nothing),
        (Kind::File, _, Some(Some(bytes))) => Arc::new(bytes),
        (Kind::File, Some(file), None) => {
            let body = Arc::new(Content {
                file,
                len: attrs.size,
                share: share.clone(),
                id,
                generation,
                gathered: super::blocks::Gathered::new(attrs.size),
            });
            content = Some(body.clone());
            body
        }
        (Kind::Symlink, ..) => Arc::new(Bytes::from(inode.target.clone().unwrap_or_default())),
        (Kind::Dir, ..) => Arc::new(Bytes::new()),
        _ => {
            lock(&share.dirty).remove(&id);
            return Ok(Ended::Nothing);
        }
    };
    if inode.kind == Kind::Dir {
        // A marker with data is another tool's object (S3 lets `a/` hold bytes): an empty
        // one put over it would lose them. The directory's attributes then stay here.
        match share.remote.head(&key).await {
            Ok(Some(there)) if there.size > 0 => {
                tracing::info!(share = %share.info.name, "{key} holds another tool's data: the directory's attributes are kept here, not written over it");
                lock(&share.dirty).remove(&id);
                return Ok(Ended::Nothing);
            }
            Ok(_) => {}
            Err(e) => return Err(format!("uploading {key}: {e}")),
        }
    }
    let len = body.len();
    let stored = match share.remote.put_body(&key, body, object_meta(&attrs)).await {
        Ok(stored) => stored,
        Err(remote::Error::Permanent { message, .. }) if message.contains(CHANGED) => {
            return Ok(Ended::Changed);
        }
        Err(e) => return Err(format!("uploading {key}: {e}")),
    };
    // Read whole for the upload: its block hashes, so that once evicted it is read back a
    // block at a time.
    let blocks = content.and_then(|c| c.gathered.as_ref().and_then(|g| g.finish()));
    Ok(Ended::Up(WentUp {
        id,
        generation,
        path,
        len,
        etag: stored.etag,
        mtime_ns: attrs.mtime_ns,
        blocks,
    }))
}

/// The object metadata of a file, in the convention of AWS's file tools.
pub fn object_meta(attrs: &super::Attrs) -> Meta {
    let kind = match attrs.kind {
        Kind::File => 0o100000,
        Kind::Dir => 0o040000,
        Kind::Symlink => 0o120000,
    };
    Meta::from([
        (
            "file-permissions".to_string(),
            format!("{:o}", kind | attrs.mode),
        ),
        ("file-owner".to_string(), attrs.uid.to_string()),
        ("file-group".to_string(), attrs.gid.to_string()),
        ("file-mtime".to_string(), format!("{}ns", attrs.mtime_ns)),
        ("file-atime".to_string(), format!("{}ns", attrs.atime_ns)),
    ])
}

/// How `blocking` begins the error of an evicted file whose object is gone or changed.
const CHANGED_OBJECT: &str = "object changed: ";

/// Runs a namespace call off the async workers. A file that is gone is `gone: ...`; one
/// whose object is gone or changed (`ShareError::Changed`), `CHANGED_OBJECT...`.
async fn blocking<T: Send + 'static>(
    share: &Arc<Share>,
    call: impl FnOnce(&Share) -> Result<T, ShareError> + Send + 'static,
) -> Result<T, String> {
    let share = share.clone();
    match tokio::task::spawn_blocking(move || call(&share)).await {
        Ok(outcome) => outcome.map_err(|e| match e {
            ShareError::Stale(_) | ShareError::NotFound => format!("gone: {e}"),
            ShareError::Changed(_) => format!("{CHANGED_OBJECT}{e}"),
            e => e.to_string(),
        }),
        // The runtime is shutting down: the call never ran, or its outcome is lost.
        Err(e) if e.is_cancelled() => Err(STOPPING.to_string()),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A file's local content as an upload body: every read fails if the file changed since
/// the upload began.
#[derive(Debug)]
struct Content {
    file: Arc<std::fs::File>,
    len: u64,
    share: Arc<Share>,
    id: u64,
    generation: u64,
    /// The block hashes, gathered as the upload reads the file.
    gathered: Option<super::blocks::Gathered>,
}

/// Whether file `id` is still as it was at `generation`, with no write in progress.
fn unchanged(share: &Share, id: u64, generation: u64) -> bool {
    lock(&share.dirty)
        .get(&id)
        .is_some_and(|d| d.generation == generation && d.writing == 0)
}

impl Content {
    fn unchanged(&self) -> bool {
        unchanged(&self.share, self.id, self.generation)
    }
}

#[async_trait]
impl Body for Content {
    fn len(&self) -> u64 {
        self.len
    }

    async fn read(&self, range: Range<u64>) -> remote::Result<Bytes> {
        use std::os::unix::fs::FileExt;
        let changed = || remote::Error::Permanent {
            op: "read",
            key: format!("fileid {}", self.id),
            message: CHANGED.to_string(),
        };
        if !self.unchanged() {
            return Err(changed());
        }
        let file = self.file.clone();
        let mut buf = vec![0; (range.end - range.start) as usize];
        // Block hashes the first time the upload reads a block (hashing its digest).
        let (block, size, wanted) = self.gathered.as_ref().map_or((1, 0, Vec::new()), |g| {
            (
                g.block(),
                g.size(),
                g.wanted(range.start, range.end - range.start),
            )
        });
        let read = tokio::task::spawn_blocking(move || {
            file.read_exact_at(&mut buf, range.start).map(|()| {
                let found = super::blocks::hash_blocks(block, size, range.start, &buf, &wanted);
                (buf, found)
            })
        })
        .await;
        let read = match read {
            Ok(read) => read,
            Err(e) if e.is_cancelled() => {
                return Err(remote::Error::Transient {
                    op: "read",
                    key: format!("fileid {}", self.id),
                    message: STOPPING.to_string(),
                });
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        // Checked after the read: a change that began before it ended may be in the bytes.
        if !self.unchanged() {
            return Err(changed());
        }
        let (buf, found) = read.map_err(|_| changed())?;
        if let Some(gathered) = &self.gathered {
            gathered.keep(found);
        }
        Ok(Bytes::from(buf))
    }
}
