//! Request, error, byte and latency metrics for everything that reaches the remote, in
//! Prometheus naming (`firn_remote_*`).

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{Body, Fetched, Listing, ListingPage, Meta, ObjectInfo, Remote, Result, Sink, Stored};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

fn new_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

#[derive(Debug)]
pub struct RemoteMetrics {
    requests: Family<OpLabels, Counter>,
    errors: Family<OpLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
}

impl RemoteMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = RemoteMetrics {
            requests: Family::default(),
            errors: Family::default(),
            bytes: Family::default(),
            seconds: Family::new_with_constructor(new_histogram),
        };
        registry.register(
            "firn_remote_requests",
            "Requests to the object store, by operation (after retries: one per caller request)",
            metrics.requests.clone(),
        );
        registry.register(
            "firn_remote_errors",
            "Requests to the object store that failed after all retries, by operation",
            metrics.errors.clone(),
        );
        registry.register(
            "firn_remote_bytes",
            "Object bytes moved to (upload) and from (download) the object store",
            metrics.bytes.clone(),
        );
        registry.register(
            "firn_remote_request_seconds",
            "Latency of object store requests, including retries",
            metrics.seconds.clone(),
        );
        metrics
    }

    pub fn bytes_total(&self, direction: &'static str) -> u64 {
        self.bytes
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    pub fn requests_total(&self, op: &'static str) -> u64 {
        self.requests.get_or_create(&OpLabels { op }).get()
    }

    pub fn errors_total(&self, op: &'static str) -> u64 {
        self.errors.get_or_create(&OpLabels { op }).get()
    }
}

#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn Remote>,
    metrics: Arc<RemoteMetrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Remote>, metrics: Arc<RemoteMetrics>) -> Self {
        Metered { inner, metrics }
    }

    async fn observe<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let labels = OpLabels { op };
        let started = Instant::now();
        let outcome = request.await;
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            self.metrics.errors.get_or_create(&labels).inc();
        }
        outcome
    }

    fn count_bytes(&self, direction: &'static str, n: usize) {
        self.metrics
            .bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(n as u64);
    }
}

#[async_trait]
impl Remote for Metered {
    async fn put_body(&self, key: &str, body: Arc<dyn Body>, meta: Meta) -> Result<Stored> {
        let n = body.len();
        let stored = self
            .observe("put", self.inner.put_body(key, body, meta))
            .await?;
        self.count_bytes("upload", n as usize);
        Ok(stored)
    }

    /// Counted as a put: one upload request either way. A refusal (`Exists`) counts as an
    /// error, as a get of a missing object does.
    async fn create(&self, key: &str, body: Bytes, meta: Meta) -> Result<()> {
        let n = body.len();
        self.observe("put", self.inner.create(key, body, meta))
            .await?;
        self.count_bytes("upload", n);
        Ok(())
    }

    async fn get_to(&self, key: &str, sink: &dyn Sink) -> Result<Fetched> {
        let fetched = self.observe("get", self.inner.get_to(key, sink)).await?;
        self.count_bytes("download", fetched.size as usize);
        Ok(fetched)
    }

    async fn get_range_if(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes> {
        let body = self
            .observe("get_range", self.inner.get_range_if(key, range, etag))
            .await?;
        self.count_bytes("download", body.len());
        Ok(body)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.observe("head", self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.observe("list", self.inner.list(prefix)).await
    }

    /// Counted as a list: one listing request as far as callers are concerned.
    async fn list_dir(&self, prefix: &str) -> Result<Listing> {
        self.observe("list", self.inner.list_dir(prefix)).await
    }

    async fn list_dir_page(&self, prefix: &str, cursor: Option<&str>) -> Result<ListingPage> {
        self.observe("list", self.inner.list_dir_page(prefix, cursor))
            .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.observe("delete", self.inner.delete(key)).await
    }
}
