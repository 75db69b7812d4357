//! End-to-end checksums: every put records a BLAKE3 digest of the body in the object's
//! metadata (`firn-blake3`), and every whole-object get recomputes it before the bytes go
//! further. A torn response or a rotted object becomes `Error::Corrupt`, never data.
//!
//! Every object written through this wrapper carries the digest, so a whole-object read that
//! finds none is `Corrupt` too (its metadata was lost or it was not written by firn).
//!
//! Ranged reads are checked for length: a range returns exactly the bytes asked for, or an
//! error. Their content is not checked here, because a digest of the whole object cannot
//! vouch for a slice without reading the rest; firn's own ranged reads are of sealed objects,
//! whose AEAD tags check each read.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Error, Meta, Object, ObjectInfo, Remote, Result};

pub const DIGEST_META: &str = "firn-blake3";

#[derive(Debug)]
pub struct Verified {
    inner: Arc<dyn Remote>,
}

impl Verified {
    pub fn new(inner: Arc<dyn Remote>) -> Self {
        Verified { inner }
    }
}

/// Hashing a large body takes a while; keep it off the async workers.
async fn digest(body: Bytes) -> String {
    let hash = |body: &[u8]| blake3::hash(body).to_hex().to_string();
    if body.len() < 1 << 20 {
        return hash(&body);
    }
    tokio::task::spawn_blocking(move || hash(&body))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[async_trait]
impl Remote for Verified {
    async fn put(&self, key: &str, body: Bytes, mut meta: Meta) -> Result<()> {
        meta.insert(DIGEST_META.to_string(), digest(body.clone()).await);
        self.inner.put(key, body, meta).await
    }

    async fn get(&self, key: &str) -> Result<Object> {
        let mut object = self.inner.get(key).await?;
        let Some(expected) = object.meta.remove(DIGEST_META) else {
            return Err(Error::Corrupt {
                key: key.to_string(),
                reason: format!(
                    "no {DIGEST_META} digest in its metadata: it was not written by firn, or \
                     its metadata was lost; write it again through firn"
                ),
            });
        };
        let actual = digest(object.body.clone()).await;
        if actual != expected {
            return Err(Error::Corrupt {
                key: key.to_string(),
                reason: format!(
                    "BLAKE3 of the {} bytes read is {actual}, the object was written with {expected}",
                    object.body.len()
                ),
            });
        }
        Ok(object)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let wanted = range.end.saturating_sub(range.start);
        let body = self.inner.get_range(key, range.clone()).await?;
        if body.len() as u64 != wanted {
            return Err(Error::Corrupt {
                key: key.to_string(),
                reason: format!(
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

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
}
