//! A local directory as the bucket: the embedded default, and a stand-in for S3 in tests.
//!
//! Written here rather than taken from `object_store::local::LocalFileSystem` because that one
//! neither fsyncs (an acknowledged put could vanish in a power cut) nor stores user metadata.
//! Each object is a file at `<root>/<key>`; its metadata lives in `user.firn.*` extended
//! attributes of the file, so data and metadata are replaced together by one rename.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use xattr::FileExt;

use super::{Error, Meta, Object, ObjectInfo, Remote, Result, check_key};

/// Where puts are staged before their rename; never listed, never a valid key.
const STAGING: &str = ".firn-staging";
const XATTR_PREFIX: &str = "user.firn.";

/// Cheap to clone: clones share the directory and the staging counter.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: Arc<PathBuf>,
    next_staging: Arc<AtomicU64>,
}

impl DirStore {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<DirStore> {
        let root = root.into();
        fs::create_dir_all(root.join(STAGING))?;
        // Leftovers of puts interrupted by a crash: never renamed, so never visible.
        for entry in fs::read_dir(root.join(STAGING))? {
            let _ = fs::remove_file(entry?.path());
        }
        Ok(DirStore {
            root: Arc::new(root),
            next_staging: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        if key == STAGING || key.starts_with(&format!("{STAGING}/")) {
            return Err(Error::BadKey {
                key: key.to_string(),
                reason: format!("{STAGING} is reserved"),
            });
        }
        Ok(self.root.join(key))
    }

    fn put_blocking(&self, key: &str, body: &[u8], meta: &Meta) -> Result<()> {
        let path = self.path(key)?;
        let io_err = |e: io::Error| local_error("put", key, e);
        let n = self.next_staging.fetch_add(1, Ordering::Relaxed);
        let staged = self
            .root
            .join(STAGING)
            .join(format!("{}-{n}", std::process::id()));
        let result = (|| {
            // Sealed, but still nobody else's business.
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&staged)?;
            file.write_all(body)?;
            for (name, value) in meta {
                file.set_xattr(format!("{XATTR_PREFIX}{name}"), value.as_bytes())?;
            }
            file.sync_all()?;
            let parent = path.parent().unwrap_or(self.root.as_path());
            fs::create_dir_all(parent)?;
            fs::rename(&staged, &path)?;
            File::open(parent)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&staged);
        }
        result.map_err(io_err)
    }

    fn get_blocking(&self, key: &str) -> Result<Object> {
        let path = self.path(key)?;
        let io_err = |e: io::Error| local_error("get", key, e);
        let mut file = File::open(&path).map_err(io_err)?;
        let mut body = Vec::new();
        file.read_to_end(&mut body).map_err(io_err)?;
        let mut meta = Meta::new();
        for name in file.list_xattr().map_err(io_err)? {
            let Some(name) = name.to_str().and_then(|n| n.strip_prefix(XATTR_PREFIX)) else {
                continue;
            };
            if let Some(value) = file
                .get_xattr(format!("{XATTR_PREFIX}{name}"))
                .map_err(io_err)?
            {
                meta.insert(
                    name.to_string(),
                    String::from_utf8_lossy(&value).into_owned(),
                );
            }
        }
        Ok(Object {
            body: Bytes::from(body),
            meta,
        })
    }

    fn get_range_blocking(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key)?;
        let io_err = |e: io::Error| local_error("get_range", key, e);
        let mut file = File::open(&path).map_err(io_err)?;
        let size = file.metadata().map_err(io_err)?.len();
        let range = clamp_range(key, range, size)?;
        file.seek(SeekFrom::Start(range.start)).map_err(io_err)?;
        let mut body = vec![0; (range.end - range.start) as usize];
        file.read_exact(&mut body).map_err(io_err)?;
        Ok(Bytes::from(body))
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Only walk the directory the prefix points into, not the whole bucket.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.root.to_path_buf()
        } else {
            self.path(dir_part)?
        };
        let mut found = Vec::new();
        let mut pending = vec![start];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(e) => return Err(local_error("list", prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| local_error("list", prefix, e))?;
                let path = entry.path();
                let Ok(rel) = path.strip_prefix(self.root.as_path()) else {
                    continue;
                };
                let Some(key) = rel.to_str() else { continue };
                if key == STAGING {
                    continue;
                }
                let kind = entry.file_type().map_err(|e| local_error("list", key, e))?;
                if kind.is_dir() {
                    pending.push(path);
                } else if kind.is_file() && key.starts_with(prefix) {
                    let size = entry
                        .metadata()
                        .map_err(|e| local_error("list", key, e))?
                        .len();
                    found.push(ObjectInfo {
                        key: key.to_string(),
                        size,
                    });
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    fn delete_blocking(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(local_error("delete", key, e)),
        }
        // Prune directories the delete left empty, so the tree mirrors the key space.
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == self.root.as_path() || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }
}

pub(super) fn clamp_range(key: &str, range: Range<u64>, size: u64) -> Result<Range<u64>> {
    if range.start > range.end || range.start > size {
        return Err(Error::Permanent {
            op: "get_range",
            key: key.to_string(),
            message: format!(
                "range {}..{} outside the object's {size} bytes",
                range.start, range.end
            ),
        });
    }
    Ok(range.start..range.end.min(size))
}

fn local_error(op: &'static str, key: &str, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::NotFound {
            key: key.to_string(),
        },
        _ => Error::Permanent {
            op,
            key: key.to_string(),
            message: e.to_string(),
        },
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[async_trait]
impl Remote for DirStore {
    async fn put(&self, key: &str, body: Bytes, meta: Meta) -> Result<()> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.put_blocking(&key, &body, &meta)).await
    }

    async fn get(&self, key: &str) -> Result<Object> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.get_blocking(&key)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.get_range_blocking(&key, range)).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: m.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(local_error("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let (this, key) = (self.clone(), key.to_string());
        blocking(move || this.delete_blocking(&key)).await
    }
}
