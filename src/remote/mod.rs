//! The remote layer: the object store behind the gateway.
//!
//! One small trait, [`Remote`], with two backends (an S3-compatible bucket through the
//! `object_store` crate, and a local directory for the embedded default) and thin wrappers
//! for what every caller needs once: retries, checksums, the bandwidth limiter, metrics and
//! fault injection. Each wrapper holds an inner `Arc<dyn Remote>`; [`build`] stacks them in one
//! place. Nothing here knows what the objects mean.

pub mod dir;
pub mod faults;
pub mod limit;
pub mod metered;
pub mod retry;
pub mod s3;
pub mod verify;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// User metadata of an object: lower-case ASCII names to values.
pub type Meta = BTreeMap<String, String>;

/// An object read back whole.
#[derive(Debug, Clone)]
pub struct Object {
    pub body: Bytes,
    pub meta: Meta,
}

/// What a listing or a HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object {key:?} not found")]
    NotFound { key: String },
    #[error("object {key:?} failed verification: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid object key {key:?}: {reason}")]
    BadKey { key: String, reason: String },
    /// Worth another try: network errors, timeouts, 5xx, throttling, injected faults.
    #[error("{op} {key:?}: {message}")]
    Transient {
        op: &'static str,
        key: String,
        message: String,
    },
    /// Retrying will not help: access denied, no such bucket, bad request, local I/O errors.
    #[error("{op} {key:?}: {message}")]
    Permanent {
        op: &'static str,
        key: String,
        message: String,
    },
}

impl Error {
    pub fn is_retryable(&self) -> bool {
        // A corrupt read may be a torn response; if the object itself is bad, every retry
        // fails the same way and the caller still gets `Corrupt`.
        matches!(self, Error::Transient { .. } | Error::Corrupt { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An object store as firn uses it. Keys are `/`-separated relative paths without empty,
/// `.` or `..` segments. A `put` is atomic: readers see the old object or the whole new one.
#[async_trait]
pub trait Remote: Send + Sync + std::fmt::Debug {
    async fn put(&self, key: &str, body: Bytes, meta: Meta) -> Result<()>;
    async fn get(&self, key: &str) -> Result<Object>;
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes>;
    /// `Ok(None)` when the object does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// Every object whose key starts with `prefix`, in key order. `prefix` is a key prefix,
    /// usually ending in `/`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Deleting an object that does not exist succeeds.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Rejects keys that could escape a prefix or that stores disagree on.
pub fn check_key(key: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::BadKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("empty key");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if key.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    if key
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return bad("empty, '.' or '..' path segment");
    }
    Ok(())
}

/// A range the object cannot supply: the caller's mistake, not worth a retry.
pub(crate) fn bad_range(key: &str, range: &Range<u64>, size: Option<u64>) -> Error {
    let size = match size {
        Some(size) => format!("the object's {size} bytes"),
        None => "any object (it ends before it starts)".to_string(),
    };
    Error::Permanent {
        op: "get_range",
        key: key.to_string(),
        message: format!("range {}..{} is outside {size}", range.start, range.end),
    }
}

/// The remote as configured: a backend with the standard wrappers stacked on it, outermost
/// first: metrics, retries, verification, fault injection (only for drills). The bandwidth
/// limiter is inside the backend, where its bytes move (see `limit`).
pub struct Stack {
    pub remote: Arc<dyn Remote>,
    /// The backend (through the fault injector, when drilling) without retries: for health
    /// probes that must answer quickly (they move no object data, so no limit holds them).
    pub probe: Arc<dyn Remote>,
    pub limiter: Arc<limit::Limiter>,
    pub metrics: Arc<metered::RemoteMetrics>,
    pub faults: Option<Arc<faults::FaultPlan>>,
}

pub fn stack(
    backend: Arc<dyn Remote>,
    retry: retry::RetryPolicy,
    limiter: Arc<limit::Limiter>,
    metrics: Arc<metered::RemoteMetrics>,
    faults: Option<Arc<faults::FaultPlan>>,
) -> Stack {
    let mut remote = backend;
    if let Some(plan) = &faults {
        remote = Arc::new(faults::Faulty::new(remote, plan.clone()));
    }
    let probe = remote.clone();
    remote = Arc::new(verify::Verified::new(remote));
    remote = Arc::new(retry::Retrying::new(remote, retry));
    remote = Arc::new(metered::Metered::new(remote, metrics.clone()));
    Stack {
        remote,
        probe,
        limiter,
        metrics,
        faults,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_could_escape_are_refused() {
        for key in ["", "/a", "a/", "a//b", "../a", "a/./b", "a/..", "a\nb"] {
            assert!(check_key(key).is_err(), "{key:?} accepted");
        }
        for key in ["a", "a/b", "chunks/0f/abc", "dir/.hidden", "x..y"] {
            assert!(check_key(key).is_ok(), "{key:?} refused");
        }
    }
}
