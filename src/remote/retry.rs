//! Retries with capped exponential backoff and jitter, so callers ride out flaky links and
//! outages. Only errors marked retryable are retried; the rest return at once.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use super::{
    Body, Error, Fetched, Listing, ListingPage, Meta, ObjectInfo, Remote, Result, Sink, Stored,
};

/// Reads that fail verification are retried this many times, not until the deadline.
const CORRUPT_RETRIES: u32 = 5;

/// Where the backoff of a ranged read stops growing. Those are what a client waits on (a
/// cached volume's read-through, bounded by its read timeout): on a flaky link, a reader
/// needs more tries within that bound, not waits of many seconds between two (at the full
/// backoff, a read unlucky eight times running had used 20 s on five tries).
const RANGE_MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// After this long since the first attempt, the last error is returned.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            give_up_after: Duration::from_secs(300),
        }
    }
}

#[derive(Debug)]
pub struct Retrying {
    inner: Arc<dyn Remote>,
    policy: RetryPolicy,
}

impl Retrying {
    pub fn new(inner: Arc<dyn Remote>, policy: RetryPolicy) -> Self {
        Retrying { inner, policy }
    }

    async fn run<T, F, Fut>(&self, attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.run_backing_off_to(self.policy.max_backoff, attempt)
            .await
    }

    async fn run_backing_off_to<T, F, Fut>(
        &self,
        max_backoff: Duration,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let mut backoff = self.policy.first_backoff;
        let mut corrupt_reads = 0;
        loop {
            let outcome = attempt().await;
            if let Err(Error::Corrupt { .. }) = outcome {
                // A torn response reads well the next time; a rotten object never does.
                corrupt_reads += 1;
                if corrupt_reads > CORRUPT_RETRIES {
                    return outcome;
                }
            }
            match outcome {
                Err(e)
                    if e.is_retryable()
                        && started.elapsed() + backoff < self.policy.give_up_after =>
                {
                    // "Equal jitter": half fixed, half random, so a fleet of callers that
                    // failed together does not retry together.
                    let half = backoff / 2;
                    let jitter = rand::rng().random_range(Duration::ZERO..=half);
                    tracing::debug!(error = %e, wait = ?(half + jitter), "retrying");
                    tokio::time::sleep(half + jitter).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
                outcome => return outcome,
            }
        }
    }
}

#[async_trait]
impl Remote for Retrying {
    async fn put_body(&self, key: &str, body: Arc<dyn Body>, meta: Meta) -> Result<Stored> {
        self.run(|| self.inner.put_body(key, body.clone(), meta.clone()))
            .await
    }

    /// Transient errors are retried as for a put. `Exists` is returned as it is, also when an
    /// earlier attempt stored the object and lost the answer (see [`Remote::create`]).
    async fn create(&self, key: &str, body: Bytes, meta: Meta) -> Result<()> {
        self.run(|| self.inner.create(key, body.clone(), meta.clone()))
            .await
    }

    /// A retry starts the object over: the sink sees a write at offset 0 again.
    async fn get_to(&self, key: &str, sink: &dyn Sink) -> Result<Fetched> {
        self.run(|| self.inner.get_to(key, sink)).await
    }

    async fn get_range_if(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes> {
        let max_backoff = self.policy.max_backoff.min(RANGE_MAX_BACKOFF);
        self.run_backing_off_to(max_backoff, || {
            self.inner.get_range_if(key, range.clone(), etag)
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.run(|| self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.run(|| self.inner.list(prefix)).await
    }

    async fn list_dir(&self, prefix: &str) -> Result<Listing> {
        self.run(|| self.inner.list_dir(prefix)).await
    }

    async fn list_dir_page(&self, prefix: &str, cursor: Option<&str>) -> Result<ListingPage> {
        self.run(|| self.inner.list_dir_page(prefix, cursor)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.run(|| self.inner.delete(key)).await
    }
}
