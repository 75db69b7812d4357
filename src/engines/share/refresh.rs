//! Refresh: what other tools put into or deleted from the share's prefix shows up in the
//! share. The bucket's listing, a page of one directory level at a time, is compared with the
//! namespace: objects no file has become files (clean: their object is their content, fetched
//! when first read), with the mode, owner and times their metadata gives in the AWS file-tool
//! convention; objects that changed size replace a clean file's content; clean files whose
//! object is gone go too. Files changed here and not yet uploaded are never touched: the
//! local write wins, and its upload replaces the object.

use std::collections::HashSet;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use serde::Serialize;

use std::time::{Duration, Instant};

use super::namespace::{self, Kind, NewAttrs, Sameness, Uploaded};
use super::{Share, ShareError, lock, now_ns};
use crate::remote::{ListingPage, Meta, ObjectInfo};

/// How long a client's listing waits for the bucket's (`refresh_if_stale`).
const LISTING_WAIT: Duration = Duration::from_secs(2);
/// Directories whose listing times are remembered; past it they are all forgotten (and
/// listed again when next used).
const LISTED_MAX: usize = 100_000;

/// What a refresh changed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Refreshed {
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
    /// Objects whose keys no file can have (a name NFS cannot carry, a file where a
    /// directory is): left alone.
    pub skipped: u64,
    /// The first of them, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_skipped: Option<String>,
}

impl Refreshed {
    /// Object (or directory of objects) `key` is left alone, for reason `why`.
    fn skip(&mut self, key: &str, why: &str) {
        self.skipped += 1;
        if self.first_skipped.is_none() {
            self.first_skipped = Some(format!("{key:?}: {why}"));
        }
    }
}

/// What `take_in` did with an object.
enum Took {
    Added,
    /// A clean file took the object's new content.
    Updated,
    Nothing,
    /// No file can be the object here (a directory has its name, or a file one of its
    /// parents' names): why.
    Conflict(&'static str),
}

/// The reason given for an object whose key a file here cannot have.
const BAD_NAME: &str = "a name NFS cannot carry";

/// The longest symlink target a refresh takes in (Linux's `PATH_MAX`).
const MAX_TARGET: u64 = 4096;

/// Whether `file-permissions` says symlink (`120777` and the like).
fn symlink_mode(meta: &Meta) -> bool {
    meta.get("file-permissions")
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|mode| mode & 0o170000 == 0o120000)
}

/// The latest time an object's metadata sets (in nanoseconds since the epoch): a year short
/// of the end of NFSv3's times (32-bit seconds, in 2106), so that a file's change time can
/// still grow past it and clients see the file change. Later ones are taken as this.
const LATEST_NS: u64 = (u32::MAX as u64 - 365 * 86_400) * 1_000_000_000;

/// Mode, owner, group, modification and access times from an object's metadata; what is
/// missing comes from `defaults`.
pub(super) fn attrs_from(meta: &Meta, defaults: NewAttrs) -> NewAttrs {
    let number = |key: &str, radix: u32| {
        meta.get(key)
            .and_then(|v| u64::from_str_radix(v.trim(), radix).ok())
    };
    // Times carry their unit: a bare number (seconds? milliseconds?) is no time of the
    // convention, and would be taken as nanoseconds, in 1970.
    let time = |key: &str| {
        meta.get(key)
            .and_then(|v| v.trim().strip_suffix("ns"))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|t| t.min(LATEST_NS))
    };
    // An id past 32 bits is no id: the default, as for one that does not parse.
    let id = |key: &str| number(key, 10).and_then(|v| u32::try_from(v).ok());
    NewAttrs {
        mode: number("file-permissions", 8).map_or(defaults.mode, |m| (m & 0o7777) as u32),
        uid: id("file-owner").unwrap_or(defaults.uid),
        gid: id("file-group").unwrap_or(defaults.gid),
        now_ns: time("file-mtime").unwrap_or(defaults.now_ns),
        atime_ns: time("file-atime").or(defaults.atime_ns),
    }
}

/// Clears the progress of a refresh as it ends, however it ends.
struct EndsProgress<'a>(&'a std::sync::Mutex<Option<super::RefreshProgress>>);

impl Drop for EndsProgress<'_> {
    fn drop(&mut self) {
        *lock(self.0) = None;
    }
}

impl Share {
    /// Brings the share in line with the bucket under `under` (a share-relative directory
    /// path; the whole share if empty). Directory by directory, depth first, a page of the
    /// bucket's listing and of the namespace at a time: memory is bounded by the depth of
    /// the tree, however many entries a directory holds.
    pub fn refresh(&self, under: &str) -> Result<Refreshed, ShareError> {
        // One at a time (the share's own as it opens and every `refresh`, and those asked
        // for): two would each take in the same new object, and one would fail on the other's.
        let _one = lock(&self.refreshing);
        // A stop (or the share's delete, which destroys the namespace) waits for the refresh
        // to end; its next call to the bucket ends it, as the stop begins.
        let _running = self.changing.read().unwrap_or_else(PoisonError::into_inner);
        if self.stopped.load(Ordering::Acquire) {
            return Err(ShareError::Stopping);
        }
        let under = under.trim_matches('/');
        *lock(&self.refresh_progress) = Some(super::RefreshProgress {
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            under: under.to_string(),
            directories: 0,
            added: 0,
            updated: 0,
            removed: 0,
        });
        let _progress = EndsProgress(&self.refresh_progress);
        let mut report = Refreshed::default();
        let dirty: HashSet<u64> = lock(&self.dirty).keys().copied().collect();
        let root = self.resolve_refreshing(under, &dirty, &mut report)?;
        self.refresh_dir(root, under, &dirty, &mut report, None)?;
        self.note_progress(&report);
        // (directory, its share-relative path, the subdirectory it goes on after, entries
        // removed before its own refresh): every directory below `root`, those the bucket
        // has (made by the refresh of their parent) and those only the share has.
        let mut stack = vec![(root, under.to_string(), None::<String>, 0)];
        while let Some((dir, path, after, _)) = stack.last_mut() {
            let Some((name, id)) = self.next_subdir(*dir, after.as_deref())? else {
                // Its whole subtree is refreshed: only now can it be found empty. Only one
                // this refresh emptied (at least in part) may go: a directory clients
                // emptied here, whose marker was never needed (it was made from deeper
                // keys), is theirs, not gone.
                let (dir, path, _, removed) = stack.pop().expect("on the stack");
                if let Some((parent, ..)) = stack.last()
                    && report.removed > removed
                {
                    self.drop_dir_if_gone(*parent, dir, &path, &dirty, &mut report)?;
                }
                continue;
            };
            let sub = join(path, &name);
            *after = Some(name);
            let removed = report.removed;
            self.refresh_dir(id, &sub, &dirty, &mut report, None)?;
            self.note_progress(&report);
            stack.push((id, sub, None, removed));
        }
        *lock(&self.last_refresh) = Some(chrono::Utc::now());
        if let Some(first) = &report.first_skipped {
            tracing::info!(
                share = %self.info.name,
                "the refresh left {} object(s) aside that no file here can be; the first, {first}",
                report.skipped
            );
        }
        Ok(report)
    }

    /// A directory more refreshed, and the counts so far (`ShareStatus::refreshing`).
    fn note_progress(&self, report: &Refreshed) {
        if let Some(progress) = lock(&self.refresh_progress).as_mut() {
            progress.directories += 1;
            progress.added = report.added;
            progress.updated = report.updated;
            progress.removed = report.removed;
        }
    }

    /// The directory at share-relative `path`. A level the share does not have yet (only the
    /// bucket does: another tool put it since the last refresh) is taken in from the bucket
    /// first, by a refresh of its parent alone; `NotFound` if the bucket has none either.
    /// A name no file can have (`.`, `..`) is `Invalid`, one that is a file `NotDir`.
    fn resolve_refreshing(
        &self,
        path: &str,
        dirty: &HashSet<u64>,
        report: &mut Refreshed,
    ) -> Result<u64, ShareError> {
        let mut dir = namespace::ROOT;
        let mut at = String::new();
        for name in path.split('/').filter(|name| !name.is_empty()) {
            namespace::check_name(name)?;
            dir = match self.ns.lookup(dir, name) {
                Err(ShareError::NotFound) => {
                    self.refresh_dir(dir, &at, dirty, report, None)?;
                    self.ns.lookup(dir, name)?
                }
                found => found?,
            };
            at = join(&at, name);
        }
        if self.ns.get(dir)?.kind != Kind::Dir {
            return Err(ShareError::NotDir);
        }
        Ok(dir)
    }

    /// Refreshes directory `dir` alone (not what is below it) if its listing is older than
    /// `[shares] listing_ttl`: what a client listing it sees is then at most that old. A
    /// refresh that takes longer than `LISTING_WAIT` (a slow bucket, many new objects) stops
    /// where it got to: the client is served what is here, and the next refresh, after the
    /// TTL, goes on.
    pub(super) fn refresh_if_stale(&self, dir: u64) {
        let Some(ttl) = self.settings.listing_ttl else {
            return;
        };
        {
            let mut listed = lock(&self.listed);
            if listed.get(&dir).is_some_and(|at| at.elapsed() < ttl) {
                return;
            }
            if listed.len() >= LISTED_MAX {
                listed.clear();
            }
            listed.insert(dir, Instant::now());
        }
        let Ok(path) = self.ns.path(dir) else { return };
        let dirty: HashSet<u64> = lock(&self.dirty).keys().copied().collect();
        let mut report = Refreshed::default();
        let deadline = Instant::now() + LISTING_WAIT;
        if let Err(e) = self.refresh_dir(dir, &path, &dirty, &mut report, Some(deadline)) {
            tracing::debug!(share = %self.info.name, "refreshing {path:?}: {e}");
        }
    }

    /// The first subdirectory of `dir` whose name sorts after `after`.
    fn next_subdir(
        &self,
        dir: u64,
        after: Option<&str>,
    ) -> Result<Option<(String, u64)>, ShareError> {
        let mut entries = LocalWalk::new(dir, after);
        while let Some((name, id)) = entries.next(self)? {
            if self.ns.get(id).is_ok_and(|inode| inode.kind == Kind::Dir) {
                return Ok(Some((name, id)));
            }
        }
        Ok(None)
    }

    /// Brings directory `dir` (at share-relative `path`) in line with its level of the
    /// bucket: objects no file has become files, directories only the bucket has are made,
    /// and clean files whose object is gone go. The listing's objects come in name order, and
    /// the namespace's entries are walked alongside them: an entry is known to be unlisted
    /// once the listing has passed its name. With a `deadline` (a client's READDIR waits on
    /// it), the refresh ends with an error once it passes, whether the bucket is slow to list
    /// or there are many new objects to look at (a HEAD each): what it did not reach is left
    /// as it is, for the next one. A store that lists out of order costs a HEAD per clean
    /// file (the check before a file goes), and drops nothing it still has.
    fn refresh_dir(
        &self,
        dir: u64,
        path: &str,
        dirty: &HashSet<u64>,
        report: &mut Refreshed,
        deadline: Option<Instant>,
    ) -> Result<(), ShareError> {
        let prefix = format!("{}{}", self.info.prefix, namespace_dir(path));
        let mut local = LocalWalk::new(dir, None);
        let out_of_time = || {
            if deadline.is_some_and(|at| Instant::now() >= at) {
                return Err(ShareError::Io(format!(
                    "refreshing {prefix}: out of time, part of it done"
                )));
            }
            Ok(())
        };
        let mut cursor: Option<String> = None;
        loop {
            let page = self.listing_page(&prefix, cursor.as_deref(), deadline)?;
            for object in &page.listing.objects {
                out_of_time()?;
                let Some(key) = object.key.strip_prefix(&self.info.prefix) else {
                    continue;
                };
                let parts: Vec<&str> = key.split('/').collect();
                if parts.iter().any(|p| namespace::check_name(p).is_err()) {
                    report.skip(&object.key, BAD_NAME);
                    continue;
                }
                let name = parts[parts.len() - 1];
                // The namespace's entries before this name are in no page of the listing.
                while let Some((before, id)) = local.next_before(self, name)? {
                    out_of_time()?;
                    self.drop_if_gone(dir, path, &before, id, false, dirty, report)?;
                }
                match self.take_in(dir, path, name, key, object, dirty)? {
                    Took::Added => report.added += 1,
                    Took::Updated => report.updated += 1,
                    Took::Nothing => {}
                    Took::Conflict(why) => report.skip(&object.key, why),
                }
                if let Some(id) = local.take(self, name)? {
                    self.drop_if_gone(dir, path, name, id, true, dirty, report)?;
                }
            }
            for sub in &page.listing.dirs {
                let name = sub
                    .strip_prefix(&prefix)
                    .unwrap_or_default()
                    .trim_end_matches('/');
                if namespace::check_name(name).is_err() {
                    report.skip(sub, BAD_NAME);
                    continue;
                }
                // Only deeper objects: the directory is made, but for one removed or renamed
                // here.
                match self.ns.lookup(dir, name) {
                    Err(ShareError::NotFound)
                        if !self.ns.going(&format!("{}/", join(path, name)))? =>
                    {
                        let _ = self.make_dir(dir, name);
                    }
                    Ok(id) if self.ns.get(id).is_ok_and(|inode| inode.kind != Kind::Dir) => {
                        report.skip(sub, "objects below a name the share has a file at");
                    }
                    _ => {}
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        while let Some((name, id)) = local.next(self)? {
            out_of_time()?;
            self.drop_if_gone(dir, path, &name, id, false, dirty, report)?;
        }
        Ok(())
    }

    /// A page of the bucket's listing of `prefix`, by `deadline` if there is one.
    fn listing_page(
        &self,
        prefix: &str,
        cursor: Option<&str>,
        deadline: Option<Instant>,
    ) -> Result<ListingPage, ShareError> {
        let failed = |e: String| ShareError::Io(format!("listing {prefix}: {e}"));
        let listed = self.bucket(async {
            let list = self.remote.list_dir_page(prefix, cursor);
            match deadline {
                None => Ok(list.await),
                Some(at) => tokio::time::timeout_at(at.into(), list).await,
            }
        })?;
        match listed {
            Ok(Ok(page)) => Ok(page),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(_) => Err(failed("no answer in time".into())),
        }
    }

    /// Entry `name` (`id`) of `dir`: a clean file whose object is gone from the bucket goes.
    /// `listed`: the listing has an object of that name. Not listed, an upload may have put
    /// it there since the listing: it is asked for once more before the file goes; a failed
    /// HEAD says nothing, and the file stays.
    #[allow(clippy::too_many_arguments)]
    fn drop_if_gone(
        &self,
        dir: u64,
        path: &str,
        name: &str,
        id: u64,
        listed: bool,
        dirty: &HashSet<u64>,
        report: &mut Refreshed,
    ) -> Result<(), ShareError> {
        let Ok(inode) = self.ns.get(id) else {
            return Ok(());
        };
        if inode.kind == Kind::Dir {
            return Ok(());
        }
        let Some(uploaded) = inode.uploaded.as_ref() else {
            return Ok(());
        };
        let listed_here = listed && uploaded.path == join(path, name);
        let gone = !listed_here
            && !dirty.contains(&id)
            && matches!(self.object_size(&uploaded.path), Ok(None));
        if gone && self.ns.forget(dir, name, now_ns())? {
            self.forget_content(id);
            report.removed += 1;
        }
        Ok(())
    }

    /// Directory `id` (entry `path` of `parent`), refreshed with all below it, which took
    /// entries out of it: if it holds nothing here now, is clean, and the bucket holds
    /// nothing under it (no marker, no object below: another tool deleted the lot), it goes
    /// too. A directory made here and never uploaded is dirty, and stays.
    fn drop_dir_if_gone(
        &self,
        parent: u64,
        id: u64,
        path: &str,
        dirty: &HashSet<u64>,
        report: &mut Refreshed,
    ) -> Result<(), ShareError> {
        if dirty.contains(&id) || LocalWalk::new(id, None).next(self)?.is_some() {
            return Ok(());
        }
        if self.ns.get(id)?.uploaded.is_none() {
            return Ok(());
        }
        let prefix = format!("{}{}", self.info.prefix, namespace_dir(path));
        let page = self.listing_page(&prefix, None, None)?;
        if !page.listing.objects.is_empty() || !page.listing.dirs.is_empty() {
            return Ok(());
        }
        // A listing of a prefix need not name the marker at the prefix itself.
        if !matches!(self.object_size(&namespace_dir(path)), Ok(None)) {
            return Ok(());
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        if self.ns.forget(parent, name, now_ns())? {
            report.removed += 1;
        }
        Ok(())
    }

    /// The directory `name` of `dir`, made if missing, with the mode and owner its marker
    /// object gives (if it has one).
    fn make_dir(&self, dir: u64, name: &str) -> Result<u64, ShareError> {
        match self.ns.lookup(dir, name) {
            // A file where the bucket has a directory: the local one stays.
            Ok(id) if self.ns.get(id)?.kind != Kind::Dir => Err(ShareError::NotDir),
            Ok(id) => Ok(id),
            Err(ShareError::NotFound) => {
                let defaults = self.settings.defaults;
                let defaults = NewAttrs {
                    mode: defaults.dir_mode,
                    uid: defaults.uid,
                    gid: defaults.gid,
                    now_ns: now_ns(),
                    atime_ns: None,
                };
                let marker = format!("{}/", join(&self.ns.path(dir)?, name));
                let attrs = attrs_from(&self.head_meta(&marker)?, defaults);
                let found = Uploaded {
                    path: marker,
                    size: 0,
                    etag: None,
                };
                match self.ns.create_found(
                    dir,
                    name,
                    Kind::Dir,
                    attrs,
                    found,
                    None,
                    self.info.prefix.len(),
                ) {
                    Ok((id, _)) => Ok(id),
                    Err(ShareError::Exists) => self.ns.lookup(dir, name),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Makes the object at `path`, entry `name` of directory `dir` (which was at `dir_path`
    /// when its listing began), a file of the share, as far as it can be one.
    fn take_in(
        &self,
        dir: u64,
        dir_path: &str,
        name: &str,
        path: &str,
        object: &ObjectInfo,
        dirty: &HashSet<u64>,
    ) -> Result<Took, ShareError> {
        // Removed or renamed here: its deletion is queued (or will be, after the upload
        // under the new name), and taking it in would bring the file back.
        if self.ns.going(path)? {
            return Ok(Took::Nothing);
        }
        let found = Uploaded {
            path: path.to_string(),
            size: object.size,
            etag: object.etag.clone(),
        };
        match self.ns.lookup(dir, name) {
            Err(ShareError::NotFound) => {
                let meta = self.head_meta(path)?;
                let attrs = attrs_from(&meta, self.default_attrs());
                // A symlink (as firn and AWS's file tools write one): its body is the target.
                let target = if symlink_mode(&meta) && (1..=MAX_TARGET).contains(&object.size) {
                    self.symlink_target(path, object.size)?
                } else {
                    None
                };
                let kind = if target.is_some() {
                    Kind::Symlink
                } else {
                    Kind::File
                };
                match self.ns.create_found(
                    dir,
                    name,
                    kind,
                    attrs,
                    found,
                    target,
                    self.info.prefix.len(),
                ) {
                    Ok((id, _)) => {
                        // A directory above was renamed since the listing began: the file
                        // moved with it, as those taken in before did (the rename moved
                        // them), so its object goes to its new key too. Looked at after
                        // the file is there: a rename from now on moves it itself.
                        if self.ns.path(dir)? != dir_path {
                            self.ns.mark_moved(id)?;
                            self.moved(&[id]);
                        }
                        Ok(Took::Added)
                    }
                    // Made here since the listing: the local file wins.
                    Err(ShareError::Exists) => Ok(Took::Nothing),
                    // The directory was removed since (it was empty here): the object stays
                    // for the next refresh, which finds it at a directory of that name.
                    Err(ShareError::Stale(_)) => Ok(Took::Nothing),
                    Err(e) => Err(e),
                }
            }
            Err(ShareError::NotDir) => Ok(Took::Conflict(
                "the share has a file where its key has a directory",
            )),
            Err(e) => Err(e),
            Ok(id) => {
                let inode = self.ns.get(id)?;
                if inode.kind == Kind::Dir {
                    return Ok(Took::Conflict("the share has a directory of that name"));
                }
                if inode.kind != Kind::File || dirty.contains(&id) {
                    return Ok(Took::Nothing);
                }
                match inode.uploaded.as_ref().map(|u| u.compare(&found)) {
                    Some(Sameness::Same) => return Ok(Took::Nothing),
                    Some(Sameness::Learned) => {
                        // Our own upload, whose ETag the put did not tell: noted now.
                        let guard = lock(&self.dirty);
                        if !guard.contains_key(&id) {
                            self.ns.update(id, |inode| inode.uploaded = Some(found))?;
                        }
                        return Ok(Took::Nothing);
                    }
                    Some(Sameness::Changed) | None => {}
                }
                // Changed by another tool, as the listing says; asked again, since an upload
                // of ours may have replaced the object since the listing: what the bucket
                // holds now is what the file takes. Checked and dropped under the dirty lock,
                // as eviction does.
                let key = format!("{}{path}", self.info.prefix);
                let head = self
                    .bucket(self.remote.head(&key))?
                    .map_err(|e| ShareError::Io(format!("{key}: {e}")))?;
                let Some(head) = head else {
                    return Ok(Took::Nothing);
                };
                let attrs = attrs_from(&head.meta, self.default_attrs());
                let found = Uploaded {
                    path: path.to_string(),
                    size: head.size,
                    etag: head.etag,
                };
                let guard = lock(&self.dirty);
                if guard.contains_key(&id) {
                    return Ok(Took::Nothing);
                }
                let ours = self.ns.get(id)?.uploaded;
                if ours.is_some_and(|u| u.compare(&found) == Sameness::Same) {
                    return Ok(Took::Nothing);
                }
                self.ns.update(id, |inode| {
                    // Past every change time clients were told, which takes in the mtime.
                    let told = inode.ctime_ns.max(inode.mtime_ns);
                    inode.mode = attrs.mode;
                    inode.uid = attrs.uid;
                    inode.gid = attrs.gid;
                    inode.mtime_ns = attrs.now_ns;
                    inode.atime_ns = attrs.atime_ns.unwrap_or(attrs.now_ns);
                    inode.size = found.size;
                    inode.uploaded = Some(found);
                    // Changed: clients compare the change time to drop what they cached,
                    // and a rewrite that kept its size and mtime changes nothing else.
                    inode.ctime_ns = super::now_ns()
                        .max(told.saturating_add(1))
                        .max(inode.mtime_ns);
                })?;
                lock(&self.files_open).remove(&id);
                let _ = std::fs::remove_file(self.content_path(id));
                self.drop_partial(id);
                drop(guard);
                Ok(Took::Updated)
            }
        }
    }

    fn object_size(&self, path: &str) -> Result<Option<u64>, ShareError> {
        let key = format!("{}{path}", self.info.prefix);
        let info = self
            .bucket(self.remote.head(&key))?
            .map_err(|e| ShareError::Io(format!("{key}: {e}")))?;
        Ok(info.map(|i| i.size))
    }

    /// The target a symlink's object holds, if it is one a symlink can have (UTF-8).
    /// (A ranged read: whole-object reads demand firn's digest, which other tools' objects
    /// lack.)
    fn symlink_target(&self, path: &str, size: u64) -> Result<Option<String>, ShareError> {
        let key = format!("{}{path}", self.info.prefix);
        let body = self
            .bucket(self.remote.get_range(&key, 0..size))?
            .map_err(|e| ShareError::Io(format!("{key}: {e}")))?;
        Ok(String::from_utf8(body.to_vec())
            .ok()
            .filter(|t| !t.is_empty() && !t.contains('\0')))
    }

    fn head_meta(&self, path: &str) -> Result<Meta, ShareError> {
        let key = format!("{}{path}", self.info.prefix);
        let info = self
            .bucket(self.remote.head(&key))?
            .map_err(|e| ShareError::Io(format!("{key}: {e}")))?;
        Ok(info.map(|i| i.meta).unwrap_or_default())
    }

    fn default_attrs(&self) -> NewAttrs {
        let defaults = self.settings.defaults;
        NewAttrs {
            mode: defaults.file_mode,
            uid: defaults.uid,
            gid: defaults.gid,
            now_ns: now_ns(),
            atime_ns: None,
        }
    }
}

/// A directory's entries in name order, a page of the namespace at a time: walked alongside
/// the bucket's listing (`Share::refresh_dir`), and for the next subdirectory to visit.
struct LocalWalk {
    dir: u64,
    page: std::collections::VecDeque<(String, u64)>,
    /// The last name read from the namespace.
    after: Option<String>,
    done: bool,
}

impl LocalWalk {
    /// The entries of `dir` whose names sort after `after`.
    fn new(dir: u64, after: Option<&str>) -> LocalWalk {
        LocalWalk {
            dir,
            page: std::collections::VecDeque::new(),
            after: after.map(str::to_string),
            done: false,
        }
    }

    /// The next entry, without taking it.
    fn peek(&mut self, share: &Share) -> Result<Option<&(String, u64)>, ShareError> {
        if self.page.is_empty() && !self.done {
            let page = share.ns.list(self.dir, self.after.as_deref(), 1024)?;
            match page.last() {
                Some((last, _)) => self.after = Some(last.clone()),
                None => self.done = true,
            }
            self.page.extend(page);
        }
        Ok(self.page.front())
    }

    /// The next entry.
    fn next(&mut self, share: &Share) -> Result<Option<(String, u64)>, ShareError> {
        self.peek(share)?;
        Ok(self.page.pop_front())
    }

    /// The next entry if its name sorts before `name`.
    fn next_before(
        &mut self,
        share: &Share,
        name: &str,
    ) -> Result<Option<(String, u64)>, ShareError> {
        match self.peek(share)? {
            Some((next, _)) if next.as_str() < name => Ok(self.page.pop_front()),
            _ => Ok(None),
        }
    }

    /// The next entry's id if it is `name`, taking it.
    fn take(&mut self, share: &Share, name: &str) -> Result<Option<u64>, ShareError> {
        match self.peek(share)? {
            Some((next, _)) if next == name => Ok(self.page.pop_front().map(|(_, id)| id)),
            _ => Ok(None),
        }
    }
}

/// `path/`, or nothing for the share's root.
fn namespace_dir(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    }
}

/// `dir/name`, or `name` at the root.
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_past_32_bits_or_not_numbers_get_the_defaults() {
        let defaults = NewAttrs {
            mode: 0o644,
            uid: 1000,
            gid: 1001,
            now_ns: 1,
            atime_ns: None,
        };
        let attrs = |owner: &str, group: &str| {
            let meta = Meta::from([
                ("file-owner".to_string(), owner.to_string()),
                ("file-group".to_string(), group.to_string()),
            ]);
            let attrs = attrs_from(&meta, defaults);
            (attrs.uid, attrs.gid)
        };
        assert_eq!(attrs("0", "4294967295"), (0, u32::MAX));
        assert_eq!(attrs("99999999999", "4294967296"), (1000, 1001));
        assert_eq!(attrs("-5", "x"), (1000, 1001));
    }

    #[test]
    fn times_past_what_nfs_carries_leave_room_for_changes() {
        let defaults = NewAttrs {
            mode: 0o644,
            uid: 0,
            gid: 0,
            now_ns: 1,
            atime_ns: None,
        };
        let times = |mtime: &str| {
            let meta = Meta::from([
                ("file-mtime".to_string(), mtime.to_string()),
                ("file-atime".to_string(), mtime.to_string()),
            ]);
            let attrs = attrs_from(&meta, defaults);
            (attrs.now_ns, attrs.atime_ns)
        };
        let latest = LATEST_NS;
        assert_eq!(times("18446744073709551615ns"), (latest, Some(latest)));
        assert_eq!(times("5000000000000000000ns"), (latest, Some(latest)));
        let ordinary = 1_700_000_000_123_456_789;
        assert_eq!(times("1700000000123456789ns"), (ordinary, Some(ordinary)));
        // Without its unit a number is no time of the convention: the defaults.
        assert_eq!(times("1700000000"), (1, None));
        assert_eq!(times("1700000000s"), (1, None));
        // A year of change times is left before NFS's last second.
        assert!(latest / 1_000_000_000 + 365 * 86_400 <= u64::from(u32::MAX));
    }
}
