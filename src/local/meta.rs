//! The metadata store: the gateway's small structured state (volume and share records, chunk
//! maps, job progress, upload queues) in one file on the local disk.
//!
//! It is a thin layer over redb. redb was chosen because it is an embedded transactional
//! key-value store that gives what this state needs and nothing to operate: ACID transactions,
//! crash safety by construction (copy-on-write B-trees; a commit switches to the new tree with
//! one atomic, fsynced write, so a crash leaves the last committed state), and pure Rust, so
//! there is no C library to build, cross-compile or audit.
//!
//! The API is deliberately small and untyped so any engine can use it: named tables of UTF-8
//! keys and byte values, with JSON helpers on top. Keys sort bytewise, so a scheme such as
//! `<volume>/<zero-padded chunk index>` lists in order with [`MetaStore::list`]. A table that
//! was never written reads as empty. Every commit is durable when it returns. Writes are
//! serialized (one write transaction at a time, the others wait); reads never wait and see the
//! last committed state.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use redb::{
    Database, ReadableDatabase, ReadableTable, StorageError, TableDefinition, TableError,
    WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::sync_parent_dir;

/// The one table shape this store uses: every table maps string keys to byte values.
type TableDef<'a> = TableDefinition<'a, &'static str, &'static [u8]>;

/// What can go wrong with the metadata store. Every message names the store's file.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store {}: {source}", .path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },

    #[error("metadata store {}: cannot create it: {source}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "metadata store {}: table {table:?}, key {key:?}: cannot {action} the value as JSON: {source}",
        .path.display()
    )]
    Json {
        path: PathBuf,
        table: String,
        key: String,
        action: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("metadata store {}: table names must not be empty", .path.display())]
    EmptyTableName { path: PathBuf },
}

/// The gateway's metadata store. Cheap to share behind an `Arc`: every method takes `&self`.
/// Where a grouped transaction's durable commit writes (redb needs a change to commit).
const GROUP_TABLE: &str = "meta-group-commit";

#[derive(Debug)]
pub struct MetaStore {
    path: PathBuf,
    /// `None` only while a reopen failed (`broken` stays set, and the next use tries again).
    db: std::sync::RwLock<Option<Database>>,
    /// An I/O error (a full disk) left the database refusing every transaction until it is
    /// closed and opened again, which recovers it as after a crash: to its last durable
    /// commit. Set by the failing call; the next use reopens it.
    broken: std::sync::atomic::AtomicBool,
    /// How many times it was opened again (`reopens`).
    reopens: std::sync::atomic::AtomicU64,
    /// Lazy commits (`transaction_lazy`, and the first step of `transaction_grouped`),
    /// counted.
    grouped: std::sync::atomic::AtomicU64,
    /// How many of them a durable commit has covered; held while one is being made.
    durable: std::sync::Mutex<u64>,
}

/// The memory redb may keep of the database's pages, read and written. Its default, 1 GiB,
/// let the daemon's memory grow with every share entry it had touched (about 600 bytes
/// each): 200,000 entries took 120 MiB. The pages it does not keep stay in the kernel's page
/// cache, a read away.
pub const CACHE_BYTES: usize = 32 << 20;

fn create_database(path: &Path) -> Result<Database, MetaError> {
    Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| store_error(path, e))
}

impl MetaStore {
    /// Opens the store at `path`, creating an empty one if the file does not exist.
    ///
    /// Only one process may have a store open; a second gets an error naming the file. After a
    /// crash, redb checks and repairs the file here, which takes a little longer than usual.
    pub fn open(path: impl AsRef<Path>) -> Result<MetaStore, MetaError> {
        let path = path.as_ref().to_path_buf();
        let existed = path.exists();
        if !existed {
            // redb would create it with the process umask; the catalog is no one else's.
            // redb initializes an empty file as a new database.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| MetaError::Create {
                    path: path.clone(),
                    source,
                })?;
        }
        let db = create_database(&path)?;
        if !existed {
            sync_parent_dir(&path).map_err(|source| MetaError::Create {
                path: path.clone(),
                source,
            })?;
        }
        Ok(MetaStore {
            path,
            db: std::sync::RwLock::new(Some(db)),
            broken: std::sync::atomic::AtomicBool::new(false),
            reopens: std::sync::atomic::AtomicU64::new(0),
            grouped: std::sync::atomic::AtomicU64::new(0),
            durable: std::sync::Mutex::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value stored under `key` in `table`, if any.
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        self.read(table, None, |table| get_from(table, key))
    }

    /// `body` on `table` in a read transaction; `missing` if the table was never made.
    fn read<T>(
        &self,
        table: &str,
        missing: T,
        body: impl FnOnce(&redb::ReadOnlyTable<&'static str, &'static [u8]>) -> Result<T, StorageError>,
    ) -> Result<T, MetaError> {
        let definition = table_definition(&self.path, table)?;
        let db = self.database()?;
        let read = db
            .as_ref()
            .ok_or_else(|| self.closed())?
            .begin_read()
            .map_err(|e| self.failed(e))?;
        let table = match read.open_table(definition) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(missing),
            Err(e) => return Err(store_error(&self.path, e)),
        };
        body(&table).map_err(|e| store_error(&self.path, e))
    }

    /// Every entry of `table` whose key starts with `prefix`, in key order. An empty prefix
    /// lists the whole table.
    pub fn list(&self, table: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        self.read(table, Vec::new(), |table| list_from(table, prefix))
    }

    /// How many entries `table` holds, read from the table's header (no scan).
    pub fn len(&self, table: &str) -> Result<u64, MetaError> {
        use redb::ReadableTableMetadata;
        self.read(table, 0, |table| table.len())
    }

    /// At most `limit` entries of `table` whose key starts with `prefix` and sorts after
    /// `after` (from the first such key if `after` is `None`), in key order: a listing read a
    /// page at a time, in memory bounded by `limit`.
    pub fn list_page(
        &self,
        table: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        use std::ops::Bound;
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        self.read(table, Vec::new(), |table| {
            let mut entries = Vec::new();
            for entry in table.range::<&str>((start, Bound::Unbounded))? {
                let (key, value) = entry?;
                let key = key.value();
                if !key.starts_with(prefix) || entries.len() >= limit {
                    break;
                }
                entries.push((key.to_string(), value.value().to_vec()));
            }
            Ok(entries)
        })
    }

    /// Stores `value` under `key`, replacing any previous value, and commits.
    pub fn put(&self, table: &str, key: &str, value: &[u8]) -> Result<(), MetaError> {
        self.transaction(|tx| tx.put(table, key, value))
    }

    /// Removes `key` and commits. Returns whether it was there.
    pub fn delete(&self, table: &str, key: &str) -> Result<bool, MetaError> {
        self.transaction(|tx| tx.delete(table, key))
    }

    /// The value under `key`, decoded from JSON.
    pub fn get_json<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<T>, MetaError> {
        let bytes = self.get(table, key)?;
        bytes
            .map(|bytes| decode_json(&self.path, table, key, &bytes))
            .transpose()
    }

    /// Stores `value` under `key` as JSON and commits.
    pub fn put_json<T: Serialize + ?Sized>(
        &self,
        table: &str,
        key: &str,
        value: &T,
    ) -> Result<(), MetaError> {
        self.transaction(|tx| tx.put_json(table, key, value))
    }

    /// Runs `body` in one write transaction: if it returns `Ok`, all its writes are committed
    /// together, durably; if it returns `Err` (or panics), none of them happen.
    ///
    /// The error type is the caller's, so an engine can return its own errors from `body`.
    pub fn transaction<T, E>(
        &self,
        body: impl FnOnce(&mut MetaTransaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<MetaError>,
    {
        self.transaction_with(redb::Durability::Immediate, body)
    }

    /// `transaction`, but committed without waiting for the disk: atomic, visible at once,
    /// and durable with the next durable commit. A crash may lose it (and everything lazy
    /// after the last durable commit), never half of it. For records a crash may forget at
    /// the price of redoing work, such as that an upload finished.
    pub fn transaction_lazy<T, E>(
        &self,
        body: impl FnOnce(&mut MetaTransaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<MetaError>,
    {
        self.counted_lazy(body).map(|(value, _)| value)
    }

    /// A lazy commit, counted: its value and its number among the lazy commits. Numbered
    /// after the commit, so a durable commit begun once the number is counted covers it.
    fn counted_lazy<T, E>(
        &self,
        body: impl FnOnce(&mut MetaTransaction<'_>) -> Result<T, E>,
    ) -> Result<(T, u64), E>
    where
        E: From<MetaError>,
    {
        let value = self.transaction_with(redb::Durability::None, body)?;
        let mine = self
            .grouped
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        Ok((value, mine))
    }

    /// Makes every lazy commit so far durable: one durable commit, unless one since covers
    /// them. For a caller about to do what a lost lazy commit would make unsafe.
    pub fn sync(&self) -> Result<(), MetaError> {
        self.cover(self.grouped.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Waits until a durable commit covers the first `mine` lazy commits, making one if
    /// none does.
    fn cover(&self, mine: u64) -> Result<(), MetaError> {
        use std::sync::atomic::Ordering;
        let mut durable = self
            .durable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *durable < mine {
            let covered = self.grouped.load(Ordering::Acquire);
            self.transaction_with(redb::Durability::Immediate, |tx| {
                tx.put(GROUP_TABLE, "covered", &covered.to_le_bytes())
            })?;
            *durable = covered;
        }
        Ok(())
    }

    /// `transaction`, durable when it returns like it, but sharing the wait for the disk with
    /// the grouped transactions of other threads: it commits lazily, then makes sure a
    /// durable commit has followed. While one thread's durable commit syncs, the others'
    /// lazy commits queue up, and the next durable commit covers them all at once. For
    /// callers that commit small changes from many threads (a file share's namespace).
    pub fn transaction_grouped<T, E>(
        &self,
        body: impl FnOnce(&mut MetaTransaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<MetaError>,
    {
        let (value, mine) = self.counted_lazy(body)?;
        self.cover(mine)?;
        Ok(value)
    }

    fn transaction_with<T, E>(
        &self,
        durability: redb::Durability,
        body: impl FnOnce(&mut MetaTransaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<MetaError>,
    {
        let db = self.database()?;
        let mut write = db
            .as_ref()
            .ok_or_else(|| self.closed())?
            .begin_write()
            .map_err(|e| self.failed(e))?;
        write
            .set_durability(durability)
            .map_err(|e| store_error(&self.path, e))?;
        let mut tx = MetaTransaction {
            path: &self.path,
            write,
        };
        // On error, dropping the transaction aborts it.
        let value = body(&mut tx)?;
        tx.write.commit().map_err(|e| self.failed(e))?;
        Ok(value)
    }

    /// How many times an I/O error made the store open its database again in this run. Each
    /// time, the lazy commits since the last durable one were lost, as in a crash: whoever
    /// relies on recovery at start for those (a share's lazily created files) must not mark
    /// itself stopped in order.
    pub fn reopens(&self) -> u64 {
        self.reopens.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The database, opened again first if an I/O error left it refusing transactions and
    /// no transaction is under way (a reopen never waits: a caller may be inside another
    /// transaction's body; the failing calls end quickly, and a later one reopens it).
    fn database(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<Database>>, MetaError> {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Acquire)
            && let Ok(mut db) = self.db.try_write()
        {
            // Another thread may have reopened it meanwhile.
            if self.broken.load(Ordering::Acquire) {
                // Closed first: redb allows one open handle on a file.
                drop(db.take());
                *db = Some(create_database(&self.path)?);
                self.broken.store(false, Ordering::Release);
                self.reopens.fetch_add(1, Ordering::AcqRel);
                tracing::info!("metadata store {}: opened again", self.path.display());
            }
        }
        Ok(self.db.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// `error` from the database; one that leaves it refusing transactions until it is opened
    /// again marks it for a reopen at the next use.
    fn failed(&self, error: impl Into<redb::Error>) -> MetaError {
        let error = error.into();
        if matches!(error, redb::Error::PreviousIo | redb::Error::Io(_))
            && !self.broken.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::error!(
                "metadata store {}: {error}; it is opened again at its next use",
                self.path.display()
            );
        }
        store_error(&self.path, error)
    }

    /// The error while a reopen has failed (the next use tries again).
    fn closed(&self) -> MetaError {
        store_error(&self.path, redb::Error::PreviousIo)
    }
}

/// A write transaction in progress; see [`MetaStore::transaction`]. Reads through it see its own
/// uncommitted writes.
pub struct MetaTransaction<'s> {
    path: &'s Path,
    write: WriteTransaction,
}

impl MetaTransaction<'_> {
    pub fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let table = self.open(table)?;
        get_from(&table, key).map_err(|e| store_error(self.path, e))
    }

    pub fn list(&self, table: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        let table = self.open(table)?;
        list_from(&table, prefix).map_err(|e| store_error(self.path, e))
    }

    /// Whether `table` has a key starting with `prefix` (reading one entry at most).
    pub fn any_with_prefix(&self, table: &str, prefix: &str) -> Result<bool, MetaError> {
        let table = self.open(table)?;
        let first = (|| {
            let mut range = table.range(prefix..)?;
            match range.next() {
                Some(entry) => Ok(entry?.0.value().starts_with(prefix)),
                None => Ok(false),
            }
        })();
        first.map_err(|e: StorageError| store_error(self.path, e))
    }

    pub fn put(&mut self, table: &str, key: &str, value: &[u8]) -> Result<(), MetaError> {
        let mut table = self.open(table)?;
        table
            .insert(key, value)
            .map_err(|e| store_error(self.path, e))?;
        Ok(())
    }

    /// Removes `key`; returns whether it was there.
    pub fn delete(&mut self, table: &str, key: &str) -> Result<bool, MetaError> {
        let mut table = self.open(table)?;
        let removed = table.remove(key).map_err(|e| store_error(self.path, e))?;
        Ok(removed.is_some())
    }

    pub fn get_json<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<T>, MetaError> {
        let bytes = self.get(table, key)?;
        bytes
            .map(|bytes| decode_json(self.path, table, key, &bytes))
            .transpose()
    }

    pub fn put_json<T: Serialize + ?Sized>(
        &mut self,
        table: &str,
        key: &str,
        value: &T,
    ) -> Result<(), MetaError> {
        let bytes = serde_json::to_vec(value).map_err(|source| MetaError::Json {
            path: self.path.to_path_buf(),
            table: table.to_string(),
            key: key.to_string(),
            action: "encode",
            source,
        })?;
        self.put(table, key, &bytes)
    }

    // Opening a table in a write transaction creates it if needed; an empty table reads the same
    // as a missing one, so callers cannot tell.
    fn open(&self, table: &str) -> Result<redb::Table<'_, &'static str, &'static [u8]>, MetaError> {
        let definition = table_definition(self.path, table)?;
        self.write
            .open_table(definition)
            .map_err(|e| store_error(self.path, e))
    }
}

fn table_definition<'a>(path: &Path, table: &'a str) -> Result<TableDef<'a>, MetaError> {
    // redb panics on an empty table name; names come from our own code, but an error is kinder.
    if table.is_empty() {
        return Err(MetaError::EmptyTableName {
            path: path.to_path_buf(),
        });
    }
    Ok(TableDefinition::new(table))
}

fn get_from(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>, StorageError> {
    Ok(table.get(key)?.map(|value| value.value().to_vec()))
}

fn list_from(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
    let mut entries = Vec::new();
    // Keys with the prefix sort together, starting at the prefix itself.
    for entry in table.range(prefix..)? {
        let (key, value) = entry?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        entries.push((key.to_string(), value.value().to_vec()));
    }
    Ok(entries)
}

fn decode_json<T: DeserializeOwned>(
    path: &Path,
    table: &str,
    key: &str,
    bytes: &[u8],
) -> Result<T, MetaError> {
    serde_json::from_slice(bytes).map_err(|source| MetaError::Json {
        path: path.to_path_buf(),
        table: table.to_string(),
        key: key.to_string(),
        action: "decode",
        source,
    })
}

impl MetaError {
    /// Whether the disk was full (ENOSPC): a change can go through once there is room.
    pub fn is_no_space(&self) -> bool {
        let io = match self {
            MetaError::Store {
                source: redb::Error::Io(io),
                ..
            }
            | MetaError::Create { source: io, .. } => io,
            _ => return false,
        };
        io.raw_os_error() == Some(nix::libc::ENOSPC)
    }
}

fn store_error(path: &Path, source: impl Into<redb::Error>) -> MetaError {
    MetaError::Store {
        path: path.to_path_buf(),
        source: source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn open_temp() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path().join("meta.redb")).unwrap();
        (dir, store)
    }

    /// The process's resident and peak memory, in bytes (VmRSS, VmHWM).
    fn memory() -> (u64, u64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Writes and reads back 192 MiB of entries in a process of its own (this test binary
    /// again, so no other test's memory counts): its memory grows by about the store's cache,
    /// not by what the store holds.
    #[test]
    fn memory_stays_near_the_cache_size_however_much_is_stored() {
        const CHILD: &str = "FIRN_TEST_META_MEMORY_DIR";
        const NAME: &str =
            "local::meta::tests::memory_stays_near_the_cache_size_however_much_is_stored";
        if let Ok(dir) = std::env::var(CHILD) {
            let store = MetaStore::open(Path::new(&dir).join("meta.redb")).unwrap();
            let (before, _) = memory();
            let value = vec![0x5a_u8; 480];
            for batch in 0..64 {
                store
                    .transaction_lazy(|tx| {
                        for i in 0..6144 {
                            tx.put("entries", &format!("{batch:03}/{i:05}"), &value)?;
                        }
                        Ok::<_, MetaError>(())
                    })
                    .unwrap();
            }
            store.sync().unwrap();
            for batch in 0..64 {
                for i in (0..6144).step_by(7) {
                    let key = format!("{batch:03}/{i:05}");
                    assert_eq!(
                        store.get("entries", &key).unwrap().as_deref(),
                        Some(&value[..])
                    );
                }
            }
            let (_, peak) = memory();
            println!("memory grew {} bytes", peak.saturating_sub(before));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let grew: u64 = stdout
            .lines()
            .find_map(|l| Some(l.split_once("memory grew ")?.1))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no figure in {stdout}"));
        // 192 MiB stored; the cache, redb's structures and the allocator's slack are well
        // under 96 MiB.
        assert!(grew < 96 << 20, "grew {} MiB", grew >> 20);
    }

    #[test]
    fn put_get_delete() {
        let (_dir, store) = open_temp();
        assert_eq!(store.get("volumes", "v1").unwrap(), None);
        store.put("volumes", "v1", b"first").unwrap();
        store.put("volumes", "v1", b"second").unwrap();
        assert_eq!(
            store.get("volumes", "v1").unwrap(),
            Some(b"second".to_vec())
        );
        assert!(store.delete("volumes", "v1").unwrap());
        assert!(!store.delete("volumes", "v1").unwrap());
        assert_eq!(store.get("volumes", "v1").unwrap(), None);
    }

    #[test]
    fn pages_cover_a_prefix_once_in_order() {
        let (_dir, store) = open_temp();
        for key in ["a/1", "a/2", "a/3", "a/4", "a/5", "b/1", "a"] {
            store.put("t", key, key.as_bytes()).unwrap();
        }
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.list_page("t", "a/", after.as_deref(), 2).unwrap();
            assert!(page.len() <= 2);
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            seen.extend(page.into_iter().map(|(k, _)| k));
        }
        assert_eq!(seen, ["a/1", "a/2", "a/3", "a/4", "a/5"]);
        // An `after` that sorts before the prefix starts at the prefix.
        let first = store.list_page("t", "b/", Some("a/9"), 10).unwrap();
        assert_eq!(first, [("b/1".to_string(), b"b/1".to_vec())]);
        assert!(store.list_page("never", "", None, 5).unwrap().is_empty());
    }

    #[test]
    fn lazy_commits_are_visible_at_once_and_durable_after_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let store = MetaStore::open(&path).unwrap();
            store
                .transaction_lazy(|tx| tx.put("t", "lazy", b"1"))
                .unwrap();
            assert_eq!(store.get("t", "lazy").unwrap(), Some(b"1".to_vec()));
            store.put("t", "durable", b"2").unwrap();
        }
        let store = MetaStore::open(&path).unwrap();
        assert_eq!(store.get("t", "lazy").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get("t", "durable").unwrap(), Some(b"2".to_vec()));
    }

    #[test]
    fn grouped_commits_from_many_threads_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let store = std::sync::Arc::new(MetaStore::open(&path).unwrap());
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        for i in 0..50 {
                            store
                                .transaction_grouped(|tx| tx.put("g", &format!("{t}-{i}"), b"x"))
                                .unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let covered = *store.durable.lock().unwrap();
            assert_eq!(covered, 400, "the last grouped commit was not made durable");
        }
        let store = MetaStore::open(&path).unwrap();
        assert_eq!(store.list("g", "").unwrap().len(), 400);
    }

    #[test]
    fn missing_table_reads_as_empty() {
        let (_dir, store) = open_temp();
        assert_eq!(store.get("never", "k").unwrap(), None);
        assert!(store.list("never", "").unwrap().is_empty());
        assert!(!store.delete("never", "k").unwrap());
    }

    #[test]
    fn tables_are_separate() {
        let (_dir, store) = open_temp();
        store.put("a", "k", b"in a").unwrap();
        store.put("b", "k", b"in b").unwrap();
        assert_eq!(store.get("a", "k").unwrap(), Some(b"in a".to_vec()));
        assert_eq!(store.get("b", "k").unwrap(), Some(b"in b".to_vec()));
    }

    #[test]
    fn list_returns_prefix_matches_in_key_order() {
        let (_dir, store) = open_temp();
        for key in [
            "vol2/0002",
            "vol1/0010",
            "vol1/0001",
            "vol10/0000",
            "vol1",
            "vol0/9",
        ] {
            store.put("chunks", key, key.as_bytes()).unwrap();
        }
        let keys = |prefix| -> Vec<String> {
            store
                .list("chunks", prefix)
                .unwrap()
                .into_iter()
                .map(|(key, value)| {
                    assert_eq!(key.as_bytes(), value.as_slice());
                    key
                })
                .collect()
        };
        assert_eq!(keys("vol1/"), ["vol1/0001", "vol1/0010"]);
        assert_eq!(
            keys("vol1"),
            ["vol1", "vol1/0001", "vol1/0010", "vol10/0000"]
        );
        assert_eq!(keys("vol3"), Vec::<String>::new());
        assert_eq!(keys("").len(), 6);
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let store = MetaStore::open(&path).unwrap();
        store.put("t", "k", b"kept").unwrap();
        drop(store);
        let store = MetaStore::open(&path).unwrap();
        assert_eq!(store.get("t", "k").unwrap(), Some(b"kept".to_vec()));
    }

    #[test]
    fn second_open_is_refused_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let _store = MetaStore::open(&path).unwrap();
        let err = MetaStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("meta.redb"), "{err}");
    }

    #[test]
    fn transaction_commits_all_writes_together() {
        let (_dir, store) = open_temp();
        store.put("queue", "old", b"x").unwrap();
        let moved = store
            .transaction(|tx| {
                tx.put("map", "chunk/1", b"hash-1")?;
                tx.put("map", "chunk/2", b"hash-2")?;
                // Reads see the transaction's own writes.
                assert_eq!(tx.list("map", "chunk/")?.len(), 2);
                tx.delete("queue", "old")
            })
            .unwrap();
        assert!(moved);
        assert_eq!(store.list("map", "").unwrap().len(), 2);
        assert_eq!(store.get("queue", "old").unwrap(), None);
    }

    #[test]
    fn failed_transaction_changes_nothing() {
        let (_dir, store) = open_temp();
        store.put("t", "a", b"before").unwrap();
        // The caller's own error type, as an engine would use.
        let result: Result<(), Box<dyn std::error::Error>> = store.transaction(|tx| {
            tx.put("t", "a", b"after")?;
            tx.put("t", "b", b"new")?;
            Err("refused by the engine".into())
        });
        assert_eq!(result.unwrap_err().to_string(), "refused by the engine");
        assert_eq!(store.get("t", "a").unwrap(), Some(b"before".to_vec()));
        assert_eq!(store.get("t", "b").unwrap(), None);
        // The store is still writable afterwards.
        store.put("t", "b", b"later").unwrap();
    }

    #[test]
    fn json_round_trip_and_bad_json_error() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Volume {
            size: u64,
            mode: String,
        }
        let (_dir, store) = open_temp();
        let volume = Volume {
            size: 1 << 30,
            mode: "cached".into(),
        };
        store.put_json("volumes", "v1", &volume).unwrap();
        assert_eq!(
            store.get_json::<Volume>("volumes", "v1").unwrap(),
            Some(volume)
        );
        assert_eq!(store.get_json::<Volume>("volumes", "v2").unwrap(), None);

        store.put("volumes", "broken", b"{not json").unwrap();
        let err = store.get_json::<Volume>("volumes", "broken").unwrap_err();
        assert!(
            matches!(
                err,
                MetaError::Json {
                    action: "decode",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("\"broken\""), "{err}");
    }

    #[test]
    fn empty_table_name_is_an_error() {
        let (_dir, store) = open_temp();
        assert!(matches!(
            store.get("", "k"),
            Err(MetaError::EmptyTableName { .. })
        ));
        assert!(matches!(
            store.put("", "k", b"v"),
            Err(MetaError::EmptyTableName { .. })
        ));
    }
}
