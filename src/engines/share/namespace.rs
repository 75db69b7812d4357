//! A share's namespace: its inodes and directory entries, in the gateway's metadata store
//! (decision 0008). A file handle is a fileid, handed out in order and never reused, so it
//! outlives restarts, renames and eviction. Every change is one transaction, durable when it
//! returns, as NFSv3 asks of namespace changes.
//!
//! Tables, for share `<id>`:
//! - `share-<id>-inodes`: fileid as 16 hex digits -> [`Inode`] (JSON); key `next` -> the next
//!   fileid to hand out.
//! - `share-<id>-names`: `<parent fileid, 16 hex>/<name>` -> fileid (16 hex).
//! - `share-<id>-dirty`: fileid -> nothing: files whose content may differ from their object.
//! - `share-<id>-deletes`: object key -> nothing: objects to delete from the bucket.

use serde::{Deserialize, Serialize};

use super::ShareError;
use crate::local::meta::{MetaError, MetaStore, MetaTransaction};

/// The root directory's fileid.
pub const ROOT: u64 = 1;
/// Longest name of one entry, in bytes (NFSv3's `PATHCONF` says so to clients).
pub const MAX_NAME: usize = 255;
/// Longest object key a file can have, prefix included (S3's limit).
pub const MAX_KEY: usize = 1024;

const NEXT: &str = "next";
/// Every file created lazily with a fileid up to this one had its creation made durable
/// (a durable commit followed it): written by each change that removes entries.
const DURABLE_CREATES: &str = "durable-creates";
/// Written when the share stops in order; its absence at open means a crash, after which
/// lazily created files are recovered from their content files (`Namespace::recover`).
const CLEAN: &str = "clean";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One file, directory or symlink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub parent: u64,
    pub name: String,
    pub kind: Kind,
    /// Permission bits (`0o7777`), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Nanoseconds since the epoch. A file's size and modification time are its content
    /// file's while that is here; these are what it had when it was last uploaded.
    pub mtime_ns: u64,
    pub atime_ns: u64,
    pub ctime_ns: u64,
    pub size: u64,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Where the file's newest object is in the bucket, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<Uploaded>,
}

/// An object a file was uploaded as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    /// The key below the share's prefix (the share-relative path).
    pub path: String,
    pub size: u64,
    /// The object's ETag, as firn's upload was answered or a listing showed it; where the
    /// store told none, learned at the next refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// How a listed object compares with the one a file has (`Uploaded::compare`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sameness {
    Same,
    /// Same key and size, and the file's ETag was not yet known: taken as the same object.
    Learned,
    /// Another object: another tool replaced it.
    Changed,
}

impl Uploaded {
    pub fn compare(&self, listed: &Uploaded) -> Sameness {
        if self.path != listed.path || self.size != listed.size {
            return Sameness::Changed;
        }
        match (&self.etag, &listed.etag) {
            (Some(ours), Some(theirs)) if ours != theirs => Sameness::Changed,
            (None, Some(_)) => Sameness::Learned,
            _ => Sameness::Same,
        }
    }
}

/// An upload that ended: file `id` went up as `uploaded` (`Namespace::uploaded`).
#[derive(Debug, Clone)]
pub struct Done {
    pub id: u64,
    pub uploaded: Uploaded,
    /// The file's modification time as the upload read it.
    pub mtime_ns: u64,
    /// Nothing changed since the upload read the file.
    pub clean: bool,
    /// The object's block hashes (`super::blocks`), when firn gathered them.
    pub blocks: Option<Vec<u8>>,
}

/// Attributes a new entry starts with.
#[derive(Debug, Clone, Copy)]
pub struct NewAttrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Its creation, and so its modification and change times.
    pub now_ns: u64,
    /// Its access time, when not `now_ns` (an object's `file-atime`).
    pub atime_ns: Option<u64>,
}

/// The namespace of one share.
#[derive(Debug)]
pub struct Namespace {
    meta: std::sync::Arc<MetaStore>,
    inodes: String,
    names: String,
    pub(super) dirty: String,
    pub(super) deletes: String,
    /// The keys of objects whose file or directory was renamed and is not uploaded under its
    /// new name yet (then the key is queued in `deletes`): a refresh must not take such an
    /// object in as a new file.
    leaving: String,
    /// The keys of objects an upload may be making that no record names yet: entered
    /// durably before the upload of a file to a key it has no object at, dropped by the
    /// upload's record. A refresh takes in no such object, and one left by a crash (or by a
    /// failed upload) is queued for deletion, so a file removed or renamed during its upload
    /// never comes back as a new file.
    uploading: String,
    /// Per file uploaded by firn and larger than a block: its object's block hashes, so an
    /// evicted file is read back a verified block at a time (`super::blocks`).
    blocks: String,
    /// Fileids to hand out: the next one, and the durable ceiling below which every fileid
    /// handed out lies (`NEXT`). Raised durably a block at a time, so that a create whose
    /// commit a crash loses never gives its fileid to another file after the restart.
    ids: std::sync::Mutex<(u64, u64)>,
    /// The highest fileid created lazily in this run (see `DURABLE_CREATES`).
    created_max: std::sync::atomic::AtomicU64,
}

/// What a file's content carries of its entry, for a recovery after a crash that lost the
/// lazy commit of its creation (the extended attribute `user.firn.entry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub parent: u64,
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub now_ns: u64,
}

/// The first byte of an `Entry` in its binary form (a JSON one starts with `{`).
const ENTRY_V1: u8 = 1;
/// The binary form's bytes before the name.
const ENTRY_FIXED: usize = 29;

impl Entry {
    /// Its attribute value: version 1, then parent, mode, uid, gid and now_ns little-endian,
    /// then the name. 29 bytes and the name, so that with a name of up to about 30 bytes it
    /// fits in an ext4 inode's own attribute space (256-byte inodes): the JSON form did not,
    /// and took a 4 KiB block of its own per file, written by each file's first sync.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(ENTRY_FIXED + self.name.len());
        v.push(ENTRY_V1);
        v.extend_from_slice(&self.parent.to_le_bytes());
        v.extend_from_slice(&self.mode.to_le_bytes());
        v.extend_from_slice(&self.uid.to_le_bytes());
        v.extend_from_slice(&self.gid.to_le_bytes());
        v.extend_from_slice(&self.now_ns.to_le_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    /// An attribute value in either form (JSON, as earlier versions wrote it, or binary).
    pub fn decode(value: &[u8]) -> Option<Entry> {
        match value.first()? {
            b'{' => serde_json::from_slice(value).ok(),
            &ENTRY_V1 if value.len() > ENTRY_FIXED => {
                let u64_at = |at: usize| u64::from_le_bytes(value[at..at + 8].try_into().unwrap());
                let u32_at = |at: usize| u32::from_le_bytes(value[at..at + 4].try_into().unwrap());
                Some(Entry {
                    parent: u64_at(1),
                    mode: u32_at(9),
                    uid: u32_at(13),
                    gid: u32_at(17),
                    now_ns: u64_at(21),
                    name: String::from_utf8(value[ENTRY_FIXED..].to_vec()).ok()?,
                })
            }
            _ => None,
        }
    }
}

/// The extended attribute of a content file that holds its `Entry`.
pub const ENTRY_XATTR: &str = "user.firn.entry";

/// What `Namespace::recover` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Files whose creation a crash had lost, entered again.
    pub entered: u64,
    /// Content files of entries removed before the crash, deleted.
    pub removed: u64,
}

/// Fileids reserved at once (`Namespace::ids`).
const ID_BLOCK: u64 = 1024;

fn hex(id: u64) -> String {
    format!("{id:016x}")
}

fn parse_hex(text: &str) -> Option<u64> {
    (text.len() == 16)
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

/// Checks one name of a path: what NFS clients may create and S3 keys can hold.
pub fn check_name(name: &str) -> Result<(), ShareError> {
    let invalid = |reason: &str| Err(ShareError::Invalid(format!("the name {name:?} {reason}")));
    if name.is_empty() || name == "." || name == ".." {
        return invalid("is not a name a file can have");
    }
    if name.len() > MAX_NAME {
        return Err(ShareError::NameTooLong(name.len()));
    }
    if name.contains('/') {
        return invalid("contains '/'");
    }
    if name.chars().any(char::is_control) {
        return invalid("contains a control character");
    }
    Ok(())
}

impl Namespace {
    /// The namespace of share `id`, with its root directory made if it has none.
    pub fn open(
        meta: std::sync::Arc<MetaStore>,
        id: &str,
        root: NewAttrs,
    ) -> Result<Namespace, ShareError> {
        let ns = Namespace {
            meta,
            inodes: format!("share-{id}-inodes"),
            names: format!("share-{id}-names"),
            dirty: format!("share-{id}-dirty"),
            deletes: format!("share-{id}-deletes"),
            leaving: format!("share-{id}-leaving"),
            uploading: format!("share-{id}-uploading"),
            blocks: format!("share-{id}-blocks"),
            ids: std::sync::Mutex::new((0, 0)),
            created_max: std::sync::atomic::AtomicU64::new(0),
        };
        let ceiling = ns.meta.transaction(|tx| {
            if tx.get(&ns.inodes, &hex(ROOT))?.is_none() {
                let inode = new_inode(ROOT, String::new(), Kind::Dir, root);
                tx.put_json(&ns.inodes, &hex(ROOT), &inode)?;
                tx.put(&ns.inodes, NEXT, hex(ROOT + 1).as_bytes())?;
            }
            // Uploads the last run left unrecorded may or may not have made their objects:
            // each is deleted unless a file lives at its key (`delete_decision`).
            for (key, _) in tx.list(&ns.uploading, "")? {
                tx.delete(&ns.uploading, &key)?;
                tx.put(&ns.deletes, &key, b"")?;
            }
            Ok::<_, ShareError>(
                tx.get(&ns.inodes, NEXT)?
                    .and_then(|v| std::str::from_utf8(&v).ok().and_then(parse_hex))
                    .unwrap_or(ROOT + 1),
            )
        })?;
        // What was handed out below the ceiling before a restart may be lost with its lazy
        // commit: start above it.
        *ns.ids.lock().unwrap_or_else(|e| e.into_inner()) = (ceiling, ceiling);
        // And by the time the share serves, each of those files' creation is durable or was
        // settled by `recover`: a removal in this run counts them as durable creations, so a
        // power cut that undoes its unlink cannot have `recover` enter the file again.
        ns.created_max
            .store(ceiling - 1, std::sync::atomic::Ordering::Release);
        Ok(ns)
    }

    /// Records, in a transaction that removes entries, that every lazy creation so far is
    /// durable once it is: read under redb's writer lock, so no creation committing later
    /// is counted.
    fn note_durable_creates(&self, tx: &mut MetaTransaction<'_>) -> Result<(), ShareError> {
        let created = self.created_max.load(std::sync::atomic::Ordering::Acquire);
        let stored = tx
            .get(&self.inodes, DURABLE_CREATES)?
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(parse_hex))
            .unwrap_or(0);
        if created > stored {
            tx.put(&self.inodes, DURABLE_CREATES, hex(created).as_bytes())?;
        }
        Ok(())
    }

    /// Whether the share was stopped in order; clears the mark (durably), so that a crash
    /// from now on is noticed at the next open.
    pub fn take_clean(&self) -> Result<bool, ShareError> {
        self.meta.transaction(|tx| {
            let clean = tx.get(&self.inodes, CLEAN)?.is_some();
            if clean {
                tx.delete(&self.inodes, CLEAN)?;
            }
            Ok(clean)
        })
    }

    /// Marks the share stopped in order (durably; every commit before it is durable too).
    pub fn mark_clean(&self) -> Result<(), ShareError> {
        self.meta
            .transaction(|tx| tx.put(&self.inodes, CLEAN, b"").map_err(ShareError::from))
    }

    /// After a crash: each content file in `files` whose fileid the namespace does not know
    /// was either created lazily and lost with that commit (its fileid above
    /// `DURABLE_CREATES`), and is entered again from its `Entry`, dirty; or removed before
    /// the crash, and is deleted. One directory listing and a lookup per local file.
    pub fn recover(&self, files: &std::path::Path) -> Result<Recovered, ShareError> {
        let mut recovered = Recovered::default();
        let io = |e: std::io::Error| ShareError::Io(format!("recovering {}: {e}", files.display()));
        let durable = self
            .meta
            .get(&self.inodes, DURABLE_CREATES)?
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(parse_hex))
            .unwrap_or(0);
        for entry in std::fs::read_dir(files).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Some(id) = entry.file_name().to_str().and_then(parse_hex) else {
                continue;
            };
            if self.meta.get(&self.inodes, &hex(id))?.is_some() {
                continue;
            }
            let found: Option<Entry> = (id > durable)
                .then(|| xattr::get(entry.path(), ENTRY_XATTR).ok().flatten())
                .flatten()
                .and_then(|value| Entry::decode(&value));
            let size = entry.metadata().map_err(io)?.len();
            let entered = match found {
                Some(found) => self.reenter(id, &found, size)?,
                None => false,
            };
            if entered {
                recovered.entered += 1;
            } else {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => recovered.removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(e)),
                }
            }
        }
        Ok(recovered)
    }

    /// Enters file `id` as `entry` says, dirty, if its directory is there and the name free.
    fn reenter(&self, id: u64, entry: &Entry, size: u64) -> Result<bool, ShareError> {
        self.meta.transaction_grouped(|tx| {
            let parent: Option<Inode> = tx.get_json(&self.inodes, &hex(entry.parent))?;
            if !parent.is_some_and(|p| p.kind == Kind::Dir)
                || check_name(&entry.name).is_err()
                || tx
                    .get(&self.names, &entry_key(entry.parent, &entry.name))?
                    .is_some()
            {
                return Ok(false);
            }
            let attrs = NewAttrs {
                mode: entry.mode & 0o7777,
                uid: entry.uid,
                gid: entry.gid,
                now_ns: entry.now_ns,
                atime_ns: None,
            };
            let mut inode = new_inode(entry.parent, entry.name.clone(), Kind::File, attrs);
            inode.size = size;
            tx.put_json(&self.inodes, &hex(id), &inode)?;
            tx.put(
                &self.names,
                &entry_key(entry.parent, &entry.name),
                hex(id).as_bytes(),
            )?;
            tx.put(&self.dirty, &hex(id), b"")?;
            Ok(true)
        })
    }

    /// A fileid never handed out before, durably so, from `ids` (held by the caller).
    fn allocate(&self, ids: &mut (u64, u64)) -> Result<u64, ShareError> {
        let (next, ceiling) = *ids;
        if next >= ceiling {
            let raised = next + ID_BLOCK;
            self.meta.transaction_grouped(|tx| {
                tx.put(&self.inodes, NEXT, hex(raised).as_bytes())
                    .map_err(ShareError::from)
            })?;
            ids.1 = raised;
        }
        ids.0 = next + 1;
        Ok(next)
    }

    /// Removes every table of the namespace's entries.
    pub fn destroy(&self) -> Result<(), ShareError> {
        for table in [
            &self.inodes,
            &self.names,
            &self.dirty,
            &self.deletes,
            &self.leaving,
            &self.uploading,
            &self.blocks,
        ] {
            loop {
                let page = self.meta.list_page(table, "", None, 1024)?;
                if page.is_empty() {
                    break;
                }
                self.meta.transaction_grouped(|tx| {
                    for (key, _) in &page {
                        tx.delete(table, key)?;
                    }
                    Ok::<_, MetaError>(())
                })?;
            }
        }
        Ok(())
    }

    /// The block hashes of file `id`'s object (`super::blocks`), if firn recorded them.
    pub fn blocks(&self, id: u64) -> Result<Option<Vec<u8>>, ShareError> {
        Ok(self.meta.get(&self.blocks, &hex(id))?)
    }

    /// Records the block hashes of file `id`'s object, learned by fetching it whole. Lazily
    /// durable: they are checked against the object's digest before use, so a lost or stale
    /// record only costs a whole fetch.
    pub fn set_blocks(&self, id: u64, blocks: &[u8]) -> Result<(), ShareError> {
        self.meta
            .transaction_lazy(|tx| tx.put(&self.blocks, &hex(id), blocks))?;
        Ok(())
    }

    pub fn get(&self, id: u64) -> Result<Inode, ShareError> {
        self.meta
            .get_json(&self.inodes, &hex(id))?
            .ok_or(ShareError::Stale(id))
    }

    pub fn lookup(&self, dir: u64, name: &str) -> Result<u64, ShareError> {
        let parent = self.get(dir)?;
        if parent.kind != Kind::Dir {
            return Err(ShareError::NotDir);
        }
        if name == "." {
            return Ok(dir);
        }
        if name == ".." {
            return Ok(if dir == ROOT { ROOT } else { parent.parent });
        }
        let found = self.meta.get(&self.names, &entry_key(dir, name))?;
        found
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(parse_hex))
            .ok_or(ShareError::NotFound)
    }

    /// The share-relative path of `id` (`a/b/c.txt`; empty for the root).
    pub fn path(&self, id: u64) -> Result<String, ShareError> {
        let mut parts = Vec::new();
        let mut at = id;
        while at != ROOT {
            let inode = self.get(at)?;
            parts.push(inode.name);
            at = inode.parent;
            if parts.len() > MAX_KEY {
                return Err(ShareError::Io(format!(
                    "fileid {id} has a cycle of parents"
                )));
            }
        }
        parts.reverse();
        Ok(parts.join("/"))
    }

    /// Makes a new entry `name` in directory `dir`. `Exists` if the name is taken.
    pub fn create(
        &self,
        dir: u64,
        name: &str,
        kind: Kind,
        attrs: NewAttrs,
        target: Option<String>,
        prefix_len: usize,
    ) -> Result<(u64, Inode), ShareError> {
        self.create_as(dir, name, kind, attrs, target, prefix_len, None)
    }

    /// `create`, for a file or directory whose object is already in the bucket (`found`, by
    /// a refresh; a directory's is its marker, `a/b/`, which need not exist): it starts
    /// clean, with that object as its own.
    #[allow(clippy::too_many_arguments)]
    pub fn create_found(
        &self,
        dir: u64,
        name: &str,
        kind: Kind,
        attrs: NewAttrs,
        found: Uploaded,
        target: Option<String>,
        prefix_len: usize,
    ) -> Result<(u64, Inode), ShareError> {
        self.create_as(dir, name, kind, attrs, target, prefix_len, Some(found))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_as(
        &self,
        dir: u64,
        name: &str,
        kind: Kind,
        attrs: NewAttrs,
        target: Option<String>,
        prefix_len: usize,
        found: Option<Uploaded>,
    ) -> Result<(u64, Inode), ShareError> {
        check_name(name)?;
        let lazy = kind == Kind::File && found.is_none();
        // A lazy creation takes its fileid and commits under one lock, so lazy creations
        // commit in fileid order: a durable commit that notes fileid n as created
        // (`note_durable_creates`) then covers every lazy creation below n.
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let id = self.allocate(&mut ids)?;
        let _ids = if lazy {
            Some(ids)
        } else {
            drop(ids);
            None
        };
        let body = |tx: &mut MetaTransaction<'_>| {
            let parent: Inode = tx
                .get_json(&self.inodes, &hex(dir))?
                .ok_or(ShareError::Stale(dir))?;
            if parent.kind != Kind::Dir {
                return Err(ShareError::NotDir);
            }
            if tx.get(&self.names, &entry_key(dir, name))?.is_some() {
                return Err(ShareError::Exists);
            }
            // A directory's object is its marker, `a/b/`.
            let key_len = prefix_len
                + self.path_tx(tx, dir)?.len()
                + 1
                + name.len()
                + usize::from(kind == Kind::Dir);
            if key_len > MAX_KEY {
                return Err(ShareError::NameTooLong(key_len));
            }
            if lazy {
                // Under redb's writer lock: see `note_durable_creates`.
                self.created_max
                    .fetch_max(id, std::sync::atomic::Ordering::AcqRel);
            }
            let mut inode = new_inode(dir, name.to_string(), kind, attrs);
            if let Some(target) = target {
                inode.size = target.len() as u64;
                inode.target = Some(target);
            }
            let found_one = found.is_some();
            if let Some(found) = found {
                inode.size = found.size;
                inode.uploaded = Some(found);
            }
            tx.put_json(&self.inodes, &hex(id), &inode)?;
            tx.put(&self.names, &entry_key(dir, name), hex(id).as_bytes())?;
            touch_dir(tx, &self.inodes, dir, attrs.now_ns)?;
            // A new entry needs an object (a directory its marker): dirty from the start.
            if !found_one {
                tx.put(&self.dirty, &hex(id), b"")?;
            }
            Ok((id, inode))
        };
        // A new file's creation is committed lazily: the file's content carries its entry
        // (`Entry`), made durable by the file's first COMMIT (or stable WRITE) with its data,
        // and `recover` enters it again after a crash that lost the commit. One wait for the
        // disk per file, not two. Directories and symlinks, which have no COMMIT, are durable
        // at once.
        if lazy {
            self.meta.transaction_lazy(body)
        } else {
            self.meta.transaction_grouped(body)
        }
    }

    /// Removes entry `name` of `dir`: a file or symlink (`dir_wanted` false) or an empty
    /// directory (true). Its object, if it has one, is queued for deletion in the same
    /// transaction. Returns the removed inode's fileid and what it was.
    pub fn remove(
        &self,
        dir: u64,
        name: &str,
        dir_wanted: bool,
        now_ns: u64,
    ) -> Result<(u64, Inode), ShareError> {
        if name == "." || name == ".." {
            return Err(ShareError::Invalid(format!("cannot remove {name:?}")));
        }
        self.lookup(dir, name)?;
        self.meta.transaction_grouped(|tx| {
            self.note_durable_creates(tx)?;
            // Looked up again under the writer's lock: a rename may have moved the name since.
            let id = self.lookup_tx(tx, dir, name)?;
            let inode: Inode = tx
                .get_json(&self.inodes, &hex(id))?
                .ok_or(ShareError::NotFound)?;
            match (inode.kind == Kind::Dir, dir_wanted) {
                (true, false) => return Err(ShareError::IsDir),
                (false, true) => return Err(ShareError::NotDir),
                (true, true) => {
                    if tx.any_with_prefix(&self.names, &format!("{}/", hex(id)))? {
                        return Err(ShareError::NotEmpty);
                    }
                }
                (false, false) => {}
            }
            tx.delete(&self.names, &entry_key(dir, name))?;
            tx.delete(&self.inodes, &hex(id))?;
            tx.delete(&self.blocks, &hex(id))?;
            tx.delete(&self.dirty, &hex(id))?;
            if let Some(uploaded) = &inode.uploaded {
                queue_delete(tx, &self.deletes, uploaded)?;
            }
            touch_dir(tx, &self.inodes, dir, now_ns)?;
            Ok((id, inode))
        })
    }

    /// Renames `from_dir/from` to `to_dir/to`, replacing a file there (or an empty directory,
    /// when the source is one). Every file below a renamed directory gets a new key: each is
    /// marked dirty (uploaded again under it; its old object is deleted after). Returns the
    /// fileid replaced, if any, and every entry moved (the one renamed and all below it).
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &self,
        from_dir: u64,
        from: &str,
        to_dir: u64,
        to: &str,
        now_ns: u64,
        prefix_len: usize,
    ) -> Result<(Option<u64>, Vec<u64>), ShareError> {
        check_name(to)?;
        if from == "." || from == ".." {
            // A directory's own entries are not its children: moving one would give a
            // directory a second name and can make a cycle.
            return Err(ShareError::Invalid(format!("cannot rename {from:?}")));
        }
        self.lookup(from_dir, from)?;
        if from_dir == to_dir && from == to {
            return Ok((None, Vec::new()));
        }
        self.meta.transaction_grouped(|tx| {
            self.note_durable_creates(tx)?;
            // Every check under the writer's lock, so that concurrent renames and removes
            // see each other: the entry as it is now, ...
            let id = self.lookup_tx(tx, from_dir, from)?;
            // ... a directory cannot move below itself, ...
            let mut at = to_dir;
            for _ in 0..=MAX_KEY {
                if at == id {
                    return Err(ShareError::Invalid(
                        "a directory cannot be moved into itself".into(),
                    ));
                }
                if at == ROOT {
                    break;
                }
                at = tx
                    .get_json::<Inode>(&self.inodes, &hex(at))?
                    .ok_or(ShareError::Stale(at))?
                    .parent;
            }
            // ... and no key below it may pass the limit.
            let (moved, longest) = self.entries_below(tx, id)?;
            let key_len = prefix_len + self.path_tx(tx, to_dir)?.len() + 1 + to.len() + longest;
            if key_len > MAX_KEY {
                return Err(ShareError::NameTooLong(key_len));
            }
            let mut inode: Inode = tx
                .get_json(&self.inodes, &hex(id))?
                .ok_or(ShareError::NotFound)?;
            let to_parent: Inode = tx
                .get_json(&self.inodes, &hex(to_dir))?
                .ok_or(ShareError::Stale(to_dir))?;
            if to_parent.kind != Kind::Dir {
                return Err(ShareError::NotDir);
            }
            let mut replaced = None;
            if let Some(old) = tx.get(&self.names, &entry_key(to_dir, to))? {
                let old_id = std::str::from_utf8(&old)
                    .ok()
                    .and_then(parse_hex)
                    .ok_or_else(|| ShareError::Io("a damaged directory entry".into()))?;
                let old_inode: Inode = tx
                    .get_json(&self.inodes, &hex(old_id))?
                    .ok_or(ShareError::NotFound)?;
                match (inode.kind == Kind::Dir, old_inode.kind == Kind::Dir) {
                    (false, true) => return Err(ShareError::IsDir),
                    (true, false) => return Err(ShareError::NotDir),
                    (true, true) => {
                        if tx.any_with_prefix(&self.names, &format!("{}/", hex(old_id)))? {
                            return Err(ShareError::NotEmpty);
                        }
                    }
                    (false, false) => {}
                }
                tx.delete(&self.inodes, &hex(old_id))?;
                tx.delete(&self.blocks, &hex(old_id))?;
                tx.delete(&self.dirty, &hex(old_id))?;
                // Its object is usually at the moved file's new key, which that file's upload
                // overwrites: `delete_decision` keeps it until then.
                if let Some(uploaded) = &old_inode.uploaded {
                    queue_delete(tx, &self.deletes, uploaded)?;
                }
                replaced = Some(old_id);
            }
            tx.delete(&self.names, &entry_key(from_dir, from))?;
            tx.put(&self.names, &entry_key(to_dir, to), hex(id).as_bytes())?;
            inode.parent = to_dir;
            inode.name = to.to_string();
            inode.ctime_ns = now_ns;
            tx.put_json(&self.inodes, &hex(id), &inode)?;
            for entry in &moved {
                tx.put(&self.dirty, &hex(*entry), b"")?;
                let below: Option<Inode> = tx.get_json(&self.inodes, &hex(*entry))?;
                if let Some(uploaded) = below.and_then(|inode| inode.uploaded) {
                    tx.put(&self.leaving, &uploaded.path, b"")?;
                }
            }
            touch_dir(tx, &self.inodes, from_dir, now_ns)?;
            touch_dir(tx, &self.inodes, to_dir, now_ns)?;
            Ok((replaced, moved))
        })
    }

    /// File `id`, taken in at its object's key, is elsewhere now (a directory above it was
    /// renamed meanwhile): as for a file a rename moves, it is marked dirty (uploaded again
    /// under its new key) and its object is on its way out (deleted after).
    pub fn mark_moved(&self, id: u64) -> Result<(), ShareError> {
        self.meta.transaction_grouped(|tx| {
            let Some(inode) = tx.get_json::<Inode>(&self.inodes, &hex(id))? else {
                return Ok(());
            };
            tx.put(&self.dirty, &hex(id), b"")?;
            if let Some(uploaded) = inode.uploaded {
                tx.put(&self.leaving, &uploaded.path, b"")?;
            }
            Ok(())
        })
    }

    /// `id` and every entry below it, and the longest a key below `id` is past `id`'s own
    /// path (a directory's marker counts its `/`).
    fn entries_below(
        &self,
        tx: &MetaTransaction<'_>,
        id: u64,
    ) -> Result<(Vec<u64>, usize), ShareError> {
        let mut entries = Vec::new();
        let mut longest = 0;
        let mut dirs = vec![(id, 0)];
        while let Some((dir, len)) = dirs.pop() {
            let inode: Inode = tx
                .get_json(&self.inodes, &hex(dir))?
                .ok_or(ShareError::Stale(dir))?;
            entries.push(dir);
            if inode.kind != Kind::Dir {
                longest = longest.max(len);
                continue;
            }
            longest = longest.max(len + 1);
            let prefix = format!("{}/", hex(dir));
            for (key, value) in tx.list(&self.names, &prefix)? {
                if let Some(child) = std::str::from_utf8(&value).ok().and_then(parse_hex) {
                    dirs.push((child, len + 1 + key.len() - prefix.len()));
                }
            }
        }
        Ok((entries, longest))
    }

    /// The fileid entry `name` of `dir` names, as transaction `tx` sees it.
    fn lookup_tx(&self, tx: &MetaTransaction<'_>, dir: u64, name: &str) -> Result<u64, ShareError> {
        tx.get(&self.names, &entry_key(dir, name))?
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(parse_hex))
            .ok_or(ShareError::NotFound)
    }

    fn path_tx(&self, tx: &MetaTransaction<'_>, id: u64) -> Result<String, ShareError> {
        let mut parts = Vec::new();
        let mut at = id;
        while at != ROOT {
            let inode: Inode = tx
                .get_json(&self.inodes, &hex(at))?
                .ok_or(ShareError::Stale(at))?;
            parts.push(inode.name);
            at = inode.parent;
            if parts.len() > MAX_KEY {
                return Err(ShareError::Io(format!(
                    "fileid {id} has a cycle of parents"
                )));
            }
        }
        parts.reverse();
        Ok(parts.join("/"))
    }

    /// The entry at share-relative `path` (the root if empty).
    pub fn resolve(&self, path: &str) -> Result<u64, ShareError> {
        let mut at = ROOT;
        for name in path.split('/').filter(|name| !name.is_empty()) {
            at = self.lookup(at, name)?;
        }
        Ok(at)
    }

    /// Drops entry `name` of `dir`, a clean file whose object another tool deleted (or an
    /// empty clean directory with nothing left under it in the bucket): nothing is queued
    /// for deletion. `false` if it changed here meanwhile (it is kept).
    pub fn forget(&self, dir: u64, name: &str, now_ns: u64) -> Result<bool, ShareError> {
        let id = self.lookup(dir, name)?;
        self.meta.transaction_grouped(|tx| {
            self.note_durable_creates(tx)?;
            // Renamed or replaced since the refresh looked, or (a directory) given an entry
            // since: that is a change here.
            if self.lookup_tx(tx, dir, name).ok() != Some(id)
                || tx.get(&self.dirty, &hex(id))?.is_some()
                || tx.any_with_prefix(&self.names, &format!("{}/", hex(id)))?
            {
                return Ok(false);
            }
            tx.delete(&self.names, &entry_key(dir, name))?;
            tx.delete(&self.inodes, &hex(id))?;
            tx.delete(&self.blocks, &hex(id))?;
            touch_dir(tx, &self.inodes, dir, now_ns)?;
            Ok(true)
        })
    }

    /// Up to `limit` entries of `dir` whose names sort after `after`, in name order.
    pub fn list(
        &self,
        dir: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, ShareError> {
        if self.get(dir)?.kind != Kind::Dir {
            return Err(ShareError::NotDir);
        }
        let prefix = format!("{}/", hex(dir));
        let after = after.map(|name| format!("{prefix}{name}"));
        let page = self
            .meta
            .list_page(&self.names, &prefix, after.as_deref(), limit)?;
        Ok(page
            .into_iter()
            .filter_map(|(key, value)| {
                let id = std::str::from_utf8(&value).ok().and_then(parse_hex)?;
                Some((key[prefix.len()..].to_string(), id))
            })
            .collect())
    }

    /// Replaces the inode of `id` with what `change` makes of it.
    pub fn update(&self, id: u64, change: impl FnOnce(&mut Inode)) -> Result<Inode, ShareError> {
        self.meta.transaction_grouped(|tx| {
            let mut inode: Inode = tx
                .get_json(&self.inodes, &hex(id))?
                .ok_or(ShareError::Stale(id))?;
            change(&mut inode);
            tx.put_json(&self.inodes, &hex(id), &inode)?;
            Ok(inode)
        })
    }

    /// Marks `id` as differing from its object (durably).
    pub fn mark_dirty(&self, id: u64) -> Result<(), ShareError> {
        self.meta
            .transaction_grouped(|tx| tx.put(&self.dirty, &hex(id), b""))?;
        Ok(())
    }

    /// File `id`, at `path`, is as its object is, with no upload: what changed here gave way
    /// to what another tool did to the object. `false` (nothing done) if it is no longer at
    /// `path`. Lazily durable: a crash that forgets it makes the file dirty again, and its
    /// upload gives way again.
    pub fn clear_dirty(&self, id: u64, path: &str) -> Result<bool, ShareError> {
        self.meta.transaction_lazy(|tx| {
            if self.path_tx(tx, id)? != path {
                return Ok(false);
            }
            tx.delete(&self.dirty, &hex(id))?;
            // Its old key is not on its way out any more (renamed away, or away and back):
            // the object there is gone, or another tool's, which a refresh may take in.
            let inode: Option<Inode> = tx.get_json(&self.inodes, &hex(id))?;
            if let Some(uploaded) = inode.and_then(|inode| inode.uploaded) {
                tx.delete(&self.leaving, &uploaded.path)?;
            }
            Ok::<_, ShareError>(true)
        })
    }

    /// Files that may differ from their objects.
    pub fn dirty(&self) -> Result<Vec<u64>, ShareError> {
        Ok(self
            .meta
            .list(&self.dirty, "")?
            .into_iter()
            .filter_map(|(key, _)| parse_hex(&key))
            .collect())
    }

    /// The keys files `ids` upload to now (a directory's is its marker, `a/b/`; the root
    /// and files that are gone have none), each entered durably in `-uploading`, in one
    /// commit, unless the file's object is already at that key (a remove or rename then
    /// queues its deletion, so no record is needed to find it).
    pub fn start_uploads(&self, ids: &[u64]) -> Result<Vec<(u64, String)>, ShareError> {
        let mut keys = Vec::with_capacity(ids.len());
        let mut new = Vec::new();
        for &id in ids {
            let inode = match self.get(id) {
                Ok(inode) => inode,
                Err(ShareError::NotFound | ShareError::Stale(_)) => continue,
                Err(e) => return Err(e),
            };
            let mut path = match self.path(id) {
                Ok(path) => path,
                Err(ShareError::NotFound | ShareError::Stale(_)) => continue,
                Err(e) => return Err(e),
            };
            if inode.kind == Kind::Dir {
                if path.is_empty() {
                    continue;
                }
                path.push('/');
            }
            if inode.uploaded.as_ref().is_none_or(|u| u.path != path) {
                new.push(path.clone());
            }
            keys.push((id, path));
        }
        if !new.is_empty() {
            self.meta.transaction_grouped(|tx| {
                for path in &new {
                    tx.put(&self.uploading, path, b"")?;
                }
                Ok::<_, ShareError>(())
            })?;
        }
        Ok(keys)
    }

    /// Uploads of files (id, key) that ended without a record: those that may have made
    /// their object (`landed`) have it deleted unless a file lives at its key; the others
    /// are just forgotten. An object that may have landed at the key the file's record
    /// names is of a version the record does not know: the record's ETag is forgotten (and
    /// that of a deletion queued for the key), so that its deletion does not take it for
    /// another tool's object and leave it. Lazily durable: a crash that loses it leaves the
    /// keys to the next open, which queues them all, and the file dirty, to go up again.
    pub fn uploads_unrecorded(&self, ended: &[(u64, String, bool)]) -> Result<(), ShareError> {
        if ended.is_empty() {
            return Ok(());
        }
        self.meta.transaction_lazy(|tx| {
            for (id, path, landed) in ended {
                let was_uploading = tx.delete(&self.uploading, path)?;
                if !*landed {
                    continue;
                }
                if was_uploading || tx.get(&self.deletes, path)?.is_some() {
                    tx.put(&self.deletes, path, b"")?;
                }
                if let Some(mut inode) = tx.get_json::<Inode>(&self.inodes, &hex(*id))?
                    && let Some(uploaded) = &mut inode.uploaded
                    && uploaded.path == *path
                    && uploaded.etag.is_some()
                {
                    uploaded.etag = None;
                    tx.put_json(&self.inodes, &hex(*id), &inode)?;
                }
            }
            Ok(())
        })
    }

    /// Records uploads that ended, in one transaction (see [`Done`]): the object each file
    /// had before (under another key) is queued for deletion, and, with `clean` (nothing
    /// changed during the upload), the file is clean unless it moved meanwhile (then it goes
    /// up again under its new key). If the file was removed during its upload, the object
    /// just made is queued for deletion.
    pub fn uploaded(&self, done: &[Done]) -> Result<(), ShareError> {
        // Lazily durable: a crash that forgets it only makes the files dirty again, and their
        // uploads are done again (same content, same key).
        self.meta.transaction_lazy(|tx| {
            for done in done {
                self.record_upload(tx, done)?;
            }
            Ok(())
        })
    }

    fn record_upload(&self, tx: &mut MetaTransaction<'_>, done: &Done) -> Result<(), ShareError> {
        let (id, uploaded) = (done.id, &done.uploaded);
        tx.delete(&self.uploading, &uploaded.path)?;
        let Some(mut inode) = tx.get_json::<Inode>(&self.inodes, &hex(id))? else {
            queue_delete(tx, &self.deletes, uploaded)?;
            return Ok(());
        };
        if let Some(old) = &inode.uploaded
            && old.path != uploaded.path
        {
            queue_delete(tx, &self.deletes, old)?;
            tx.delete(&self.leaving, &old.path)?;
        }
        let mut path = self.path_tx(tx, id)?;
        if inode.kind == Kind::Dir {
            path.push('/');
        }
        let moved = path != uploaded.path;
        // The new key may have been queued for deletion by an earlier rename or remove.
        tx.delete(&self.deletes, &uploaded.path)?;
        if moved {
            // Renamed during the upload: the object just made is its, under a name it no
            // longer has, until its upload under the new one queues it for deletion. Until
            // then a refresh must not take it in as a file of its own.
            tx.put(&self.leaving, &uploaded.path, b"")?;
        } else {
            tx.delete(&self.leaving, &uploaded.path)?;
        }
        inode.size = uploaded.size;
        inode.mtime_ns = done.mtime_ns;
        inode.uploaded = Some(uploaded.clone());
        tx.put_json(&self.inodes, &hex(id), &inode)?;
        match &done.blocks {
            Some(blocks) => tx.put(&self.blocks, &hex(id), blocks)?,
            None => {
                tx.delete(&self.blocks, &hex(id))?;
            }
        }
        if done.clean && !moved {
            tx.delete(&self.dirty, &hex(id))?;
        }
        Ok(())
    }

    /// What to do with the object at `path`, queued for deletion: a file that lives at that
    /// path now will overwrite it (or has), so it is only deleted when no file does. The
    /// same for a directory marker (`a/b/`) and the directory at `a/b`.
    pub fn delete_decision(&self, path: &str) -> Result<Decision, ShareError> {
        let marker = path.ends_with('/');
        // A directory's marker goes after every object below it that is on its way out: while
        // one is left, a refresh would find the directory by that key and, its marker no
        // longer queued, take it in again (empty, for good).
        if marker {
            for table in [&self.deletes, &self.leaving] {
                if !self.meta.list_page(table, path, Some(path), 1)?.is_empty() {
                    return Ok(Decision::Keep);
                }
            }
        }
        let mut at = ROOT;
        for name in path.trim_end_matches('/').split('/') {
            match self.lookup(at, name) {
                Ok(id) => at = id,
                Err(ShareError::NotFound | ShareError::NotDir | ShareError::Stale(_)) => {
                    return Ok(Decision::Delete);
                }
                Err(e) => return Err(e),
            }
        }
        let inode = self.get(at)?;
        let ours = inode.uploaded.as_ref().is_some_and(|u| u.path == path);
        Ok(match (inode.kind == Kind::Dir, marker) {
            (true, false) | (false, true) => Decision::Delete,
            _ if ours => Decision::Drop,
            _ if self.meta.get(&self.dirty, &hex(at))?.is_some() => Decision::Keep,
            // Nothing here will write it.
            _ => Decision::Delete,
        })
    }

    /// Objects queued for deletion, at most `limit`: each share-relative path, with the
    /// ETag of the object firn knows there when it knows one (`queue_delete`).
    pub fn deletes(&self, limit: usize) -> Result<Vec<(String, Option<String>)>, ShareError> {
        Ok(self
            .meta
            .list_page(&self.deletes, "", None, limit)?
            .into_iter()
            .map(|(key, etag)| {
                let etag = String::from_utf8(etag).ok().filter(|e| !e.is_empty());
                (key, etag)
            })
            .collect())
    }

    /// How many times the metadata store was opened again after an I/O error in this run
    /// (`MetaStore::reopens`): each time, lazy commits were lost as in a crash.
    pub fn reopens(&self) -> u64 {
        self.meta.reopens()
    }

    /// Makes every lazily committed record durable (`uploaded` ones included).
    pub fn sync(&self) -> Result<(), ShareError> {
        Ok(self.meta.sync()?)
    }

    /// How many objects wait to be deleted (without reading them).
    pub fn pending_deletes(&self) -> Result<u64, ShareError> {
        Ok(self.meta.len(&self.deletes)?)
    }

    /// The object at `path` is gone from the bucket. Lazily durable: a crash that forgets it
    /// only deletes the object again.
    pub fn deleted(&self, path: &str) -> Result<(), ShareError> {
        self.meta.transaction_lazy(|tx| {
            tx.delete(&self.deletes, path)?;
            tx.delete(&self.leaving, path).map(|_| ())
        })?;
        Ok(())
    }

    /// Whether the object at `path` (share-relative) is on its way out of the bucket: its
    /// file was removed or renamed here. A refresh leaves such objects alone.
    pub fn going(&self, path: &str) -> Result<bool, ShareError> {
        Ok(self.meta.get(&self.deletes, path)?.is_some()
            || self.meta.get(&self.leaving, path)?.is_some()
            || self.meta.get(&self.uploading, path)?.is_some())
    }
}

/// See [`Namespace::delete_decision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No file lives at the path: delete the object.
    Delete,
    /// The file living there has overwritten it: nothing to delete.
    Drop,
    /// The file living there will overwrite it: ask again later.
    Keep,
}

/// Queues the object `uploaded` names for deletion, with its ETag where known: another tool
/// may put an object of its own at that key before the deletion goes, and that one stays.
fn queue_delete(
    tx: &mut MetaTransaction<'_>,
    deletes: &str,
    uploaded: &Uploaded,
) -> Result<(), MetaError> {
    let etag = uploaded.etag.as_deref().unwrap_or_default();
    tx.put(deletes, &uploaded.path, etag.as_bytes())
}

fn entry_key(dir: u64, name: &str) -> String {
    format!("{}/{name}", hex(dir))
}

fn new_inode(parent: u64, name: String, kind: Kind, attrs: NewAttrs) -> Inode {
    Inode {
        parent,
        name,
        kind,
        mode: attrs.mode & 0o7777,
        uid: attrs.uid,
        gid: attrs.gid,
        mtime_ns: attrs.now_ns,
        atime_ns: attrs.atime_ns.unwrap_or(attrs.now_ns),
        ctime_ns: attrs.now_ns,
        size: 0,
        target: None,
        uploaded: None,
    }
}

/// A directory's entries changed: its modification time is now.
fn touch_dir(
    tx: &mut MetaTransaction<'_>,
    inodes: &str,
    dir: u64,
    now_ns: u64,
) -> Result<(), ShareError> {
    if let Some(mut inode) = tx.get_json::<Inode>(inodes, &hex(dir))? {
        inode.mtime_ns = now_ns;
        inode.ctime_ns = now_ns;
        tx.put_json(inodes, &hex(dir), &inode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> NewAttrs {
        NewAttrs {
            mode: 0o644,
            uid: 0,
            gid: 0,
            now_ns: 1,
            atime_ns: None,
        }
    }

    #[test]
    fn an_entry_reads_back_from_either_form_and_the_binary_one_is_small() {
        let entry = Entry {
            parent: 0x0102_0304_0506_0708,
            name: "f009999.dat".into(),
            mode: 0o100644,
            uid: 65534,
            gid: 100,
            now_ns: 1_796_680_024_662_144_111,
        };
        let value = entry.encode();
        assert_eq!(value.len(), 29 + entry.name.len());
        assert_eq!(Entry::decode(&value), Some(entry.clone()));
        // What earlier versions wrote.
        let json = serde_json::to_vec(&entry).unwrap();
        assert_eq!(Entry::decode(&json), Some(entry.clone()));
        // Nothing else is an entry: another version, a value cut short, a name not UTF-8,
        // no name at all.
        for bad in [
            &b""[..],
            &b"\x02"[..],
            &value[..20],
            &value[..29],
            &[&value[..29], &[0xff, 0xfe][..]].concat()[..],
            &b"{\"parent\": 1}"[..],
        ] {
            assert_eq!(Entry::decode(bad), None, "{bad:?}");
        }
    }

    fn up(ns: &Namespace, id: u64, path: &str, etag: &str) {
        let done = Done {
            id,
            uploaded: Uploaded {
                path: path.to_string(),
                size: 5,
                etag: Some(etag.to_string()),
            },
            mtime_ns: 1,
            clean: true,
            blocks: None,
        };
        ns.uploaded(&[done]).expect("recorded");
    }

    #[test]
    fn an_upload_that_may_have_landed_unrecorded_makes_the_objects_etag_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = std::sync::Arc::new(MetaStore::open(dir.path().join("meta")).expect("meta"));
        let ns = Namespace::open(meta, "t", attrs()).expect("namespace");
        let (a, _) = ns
            .create(ROOT, "a", Kind::File, attrs(), None, 0)
            .expect("a");
        let (b, _) = ns
            .create(ROOT, "b", Kind::File, attrs(), None, 0)
            .expect("b");
        up(&ns, a, "a", "e1");
        up(&ns, b, "b", "e1");
        // A's next version went to its key, and its upload ended with no answer kept; B's
        // upload ended having sent nothing.
        ns.uploads_unrecorded(&[(a, "a".into(), true), (b, "b".into(), false)])
            .expect("unrecorded");
        assert_eq!(ns.get(a).expect("a").uploaded.expect("uploaded").etag, None);
        let b_etag = ns.get(b).expect("b").uploaded.expect("uploaded").etag;
        assert_eq!(b_etag.as_deref(), Some("e1"));
        // Removed now: the object at "a" is deleted whatever its ETag; "b"'s only if it is
        // still the one uploaded here.
        ns.remove(ROOT, "a", false, 2).expect("remove a");
        ns.remove(ROOT, "b", false, 2).expect("remove b");
        let deletes = ns.deletes(10).expect("deletes");
        assert_eq!(
            deletes,
            vec![
                ("a".to_string(), None),
                ("b".to_string(), Some("e1".to_string()))
            ]
        );
        // A deletion queued before such an upload ended forgets its ETag too.
        let (c, _) = ns
            .create(ROOT, "c", Kind::File, attrs(), None, 0)
            .expect("c");
        up(&ns, c, "c", "e1");
        ns.remove(ROOT, "c", false, 3).expect("remove c");
        ns.uploads_unrecorded(&[(c, "c".into(), true)])
            .expect("unrecorded");
        assert!(
            ns.deletes(10)
                .expect("deletes")
                .contains(&("c".to_string(), None))
        );
    }
}
