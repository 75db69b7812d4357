//! End-to-end checksums: every put records a BLAKE3 digest of the body in the object's
//! metadata (`firn-blake3`), and every whole-object get recomputes it before the bytes go
//! further. A torn response or a rotted object becomes `Error::Corrupt`, never data.
//!
//! Every object written through this wrapper carries the digest, so a whole-object read that
//! finds none is `Corrupt` too (its metadata was lost or it was not written by firn).
//!
//! Ranged reads are checked for length: a range returns exactly the bytes asked for, or an
//! error (transient: a body cut short is a torn response, read again). Their content is not checked here, because a digest of the whole object cannot
//! vouch for a slice without reading the rest; firn's own ranged reads are of sealed objects,
//! whose AEAD tags check each read.
//!
//! Objects that verify themselves (sealed, every byte under an AEAD tag) need no digest, but
//! still their lengths checked ([`Verified::lengths`]): a body cut short on the way fails its
//! tag like an altered one, and only the length tells the two apart, so that a torn response
//! is read again (`Corrupt` is retried) instead of taken for a foreign or rotten object.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    Body, Error, Fetched, Listing, ListingPage, Meta, ObjectInfo, Remote, Result, Sink, Stored,
};

pub const DIGEST_META: &str = "firn-blake3";

/// How much of a body is hashed per read when the digest is computed before an upload.
const HASH_SLICE: u64 = 8 << 20;

#[derive(Debug)]
pub struct Verified {
    inner: Arc<dyn Remote>,
    /// Whether bodies carry and are checked against a digest; lengths are checked always.
    digests: bool,
}

impl Verified {
    pub fn new(inner: Arc<dyn Remote>) -> Self {
        Verified {
            inner,
            digests: true,
        }
    }

    /// Lengths only, for objects that verify themselves: puts record no digest, and a
    /// whole-object get is `Corrupt` only when it returns fewer bytes than the object holds.
    pub fn lengths(inner: Arc<dyn Remote>) -> Self {
        Verified {
            inner,
            digests: false,
        }
    }
}

/// Feeds `bytes` to `hasher`; a large slice is hashed off the async workers.
async fn hash_into(hasher: blake3::Hasher, bytes: Bytes) -> blake3::Hasher {
    let small = bytes.len() < 1 << 20;
    let update = move |mut hasher: blake3::Hasher| {
        hasher.update(&bytes);
        hasher
    };
    if small {
        return update(hasher);
    }
    tokio::task::spawn_blocking(move || update(hasher))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Counts (and, with a hasher, hashes) a read as it passes to the caller's sink.
struct Hashing<'a> {
    inner: &'a dyn Sink,
    key: &'a str,
    hash: bool,
    /// The hasher (taken while a slice is hashed) and the offset it has reached.
    state: Mutex<(Option<blake3::Hasher>, u64)>,
}

#[async_trait]
impl Sink for Hashing<'_> {
    async fn write(&self, offset: u64, bytes: Bytes) -> Result<()> {
        let hasher = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if offset == 0 {
                *state = (Some(blake3::Hasher::new()), 0);
            }
            if offset != state.1 {
                return Err(Error::Transient {
                    op: "get",
                    key: self.key.to_string(),
                    message: format!("bytes at {offset} arrived after {}", state.1),
                });
            }
            state.0.take().unwrap_or_default()
        };
        let n = bytes.len() as u64;
        let hasher = if self.hash {
            hash_into(hasher, bytes.clone()).await
        } else {
            hasher
        };
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (Some(hasher), offset + n);
        self.inner.write(offset, bytes).await
    }
}

#[async_trait]
impl Remote for Verified {
    async fn put_body(&self, key: &str, body: Arc<dyn Body>, mut meta: Meta) -> Result<Stored> {
        if !self.digests {
            return self.inner.put_body(key, body, meta).await;
        }
        // The digest goes into the metadata, which S3 takes before the first byte, so the body
        // is read once to hash it (a slice at a time) and again to send it.
        let mut hasher = blake3::Hasher::new();
        let len = body.len();
        let mut offset = 0;
        while offset < len {
            let end = (offset + HASH_SLICE).min(len);
            hasher = hash_into(hasher, body.read(offset..end).await?).await;
            offset = end;
        }
        meta.insert(
            DIGEST_META.to_string(),
            hasher.finalize().to_hex().to_string(),
        );
        self.inner.put_body(key, body, meta).await
    }

    /// The digest is recorded as for a put, so a created object reads back verified.
    async fn create(&self, key: &str, body: Bytes, mut meta: Meta) -> Result<()> {
        if !self.digests {
            return self.inner.create(key, body, meta).await;
        }
        let hasher = hash_into(blake3::Hasher::new(), body.clone()).await;
        meta.insert(
            DIGEST_META.to_string(),
            hasher.finalize().to_hex().to_string(),
        );
        self.inner.create(key, body, meta).await
    }

    async fn get_to(&self, key: &str, sink: &dyn Sink) -> Result<Fetched> {
        let hashing = Hashing {
            inner: sink,
            key,
            hash: self.digests,
            state: Mutex::new((Some(blake3::Hasher::new()), 0)),
        };
        let mut fetched = self.inner.get_to(key, &hashing).await?;
        let (hasher, read) = hashing
            .state
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        if read != fetched.size {
            return Err(Error::Corrupt {
                key: key.to_string(),
                reason: format!("read {read} of its {} bytes", fetched.size),
            });
        }
        if !self.digests {
            return Ok(fetched);
        }
        let Some(expected) = fetched.meta.remove(DIGEST_META) else {
            return Err(Error::Corrupt {
                key: key.to_string(),
                reason: format!(
                    "no {DIGEST_META} digest in its metadata: it was not written by firn, or \
                     its metadata was lost; write it again through firn"
                ),
            });
        };
        let actual = hasher.unwrap_or_default().finalize().to_hex().to_string();
        if actual != expected {
            return Err(Error::Corrupt {
                key: key.to_string(),
                reason: format!(
                    "BLAKE3 of the {read} bytes read is {actual}, the object was written with {expected}"
                ),
            });
        }
        Ok(fetched)
    }

    async fn get_range_if(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes> {
        let wanted = range.end.saturating_sub(range.start);
        let body = self.inner.get_range_if(key, range.clone(), etag).await?;
        if body.len() as u64 != wanted {
            // A torn response (the object's length is known to the caller, or the read is
            // conditional on its ETag): retried as long as the caller waits, like any other
            // failed transfer, not given up after a few tries as a rotten object is.
            return Err(Error::Transient {
                op: "get",
                key: key.to_string(),
                message: format!(
                    "range {}..{} returned {} bytes, not {wanted}",
                    range.start,
                    range.end,
                    body.len()
                ),
            });
        }
        Ok(body)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.inner.list(prefix).await
    }

    async fn list_dir(&self, prefix: &str) -> Result<Listing> {
        self.inner.list_dir(prefix).await
    }

    async fn list_dir_page(&self, prefix: &str, cursor: Option<&str>) -> Result<ListingPage> {
        self.inner.list_dir_page(prefix, cursor).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
}
