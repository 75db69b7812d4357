//! The fault injector, for tests and for drills: a share of requests fail, every request can
//! be slowed, reads (whole or ranged) can come back truncated, and an outage window makes every
//! request fail until it ends. All settings can be changed while running.
//!
//! A failed put (or create) fails before or after the inner one at random, so callers also
//! meet the case where the object was stored but the answer was lost.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{
    Body, Error, Fetched, Listing, ListingPage, Meta, ObjectInfo, Remote, Result, Sink, Stored,
};

/// What to inject; the `[faults]` config section has the same fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSettings {
    /// Share of requests, 0.0 to 1.0, that fail with a transient error.
    #[serde(default)]
    pub error_rate: f64,
    /// Added to every request.
    #[serde(default)]
    pub latency_ms: u64,
    /// Share of reads (whole or ranged), 0.0 to 1.0, whose body is cut short.
    #[serde(default)]
    pub truncate_rate: f64,
    /// Every request fails for this many seconds from start: a drill of an uplink outage.
    #[serde(default)]
    pub outage_secs: u64,
    /// When set, faults (latency, outage, errors, torn reads) hit only requests whose key (or
    /// listing prefix) contains this text: a drill of one kind of object failing.
    #[serde(default)]
    pub only_keys: String,
}

#[derive(Debug, Default)]
pub struct FaultPlan {
    settings: Mutex<FaultSettings>,
    outage_until: Mutex<Option<Instant>>,
    injected: std::sync::atomic::AtomicU64,
}

impl FaultPlan {
    pub fn new(settings: FaultSettings) -> Self {
        let plan = FaultPlan {
            settings: Mutex::new(settings.clone()),
            ..Default::default()
        };
        if settings.outage_secs > 0 {
            plan.outage(Duration::from_secs(settings.outage_secs));
        }
        plan
    }

    pub fn settings(&self) -> FaultSettings {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set(&self, settings: FaultSettings) {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    /// Every request fails from now until `duration` has passed.
    pub fn outage(&self, duration: Duration) {
        *self.outage_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + duration);
    }

    pub fn end_outage(&self) {
        *self.outage_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn in_outage(&self) -> bool {
        matches!(*self.outage_until.lock().unwrap_or_else(|e| e.into_inner()), Some(until) if Instant::now() < until)
    }

    fn roll(&self, rate: f64) -> bool {
        let hit = rate > 0.0 && rand::rng().random_bool(rate.clamp(0.0, 1.0));
        if hit {
            self.injected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        hit
    }
}

#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn Remote>,
    plan: Arc<FaultPlan>,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Remote>, plan: Arc<FaultPlan>) -> Self {
        Faulty { inner, plan }
    }

    /// Latency, then the outage, then the dice. `Err` means: fail this request.
    async fn before(&self, op: &'static str, key: &str) -> Result<FaultSettings> {
        let settings = self.plan.settings();
        if !key.contains(&settings.only_keys) {
            return Ok(FaultSettings::default());
        }
        if settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;
        }
        if self.plan.in_outage() {
            self.plan
                .injected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(injected(op, key, "outage"));
        }
        Ok(settings)
    }
}

/// Passes on the first `keep` bytes of an object and drops the rest.
struct Truncating<'a> {
    inner: &'a dyn Sink,
    keep: u64,
}

#[async_trait]
impl Sink for Truncating<'_> {
    async fn write(&self, offset: u64, mut bytes: Bytes) -> Result<()> {
        if offset >= self.keep {
            return Ok(());
        }
        bytes.truncate((self.keep - offset).min(bytes.len() as u64) as usize);
        self.inner.write(offset, bytes).await
    }
}

fn injected(op: &'static str, key: &str, what: &str) -> Error {
    Error::Transient {
        op,
        key: key.to_string(),
        message: format!("injected {what}"),
    }
}

#[async_trait]
impl Remote for Faulty {
    async fn put_body(&self, key: &str, body: Arc<dyn Body>, meta: Meta) -> Result<Stored> {
        let s = self.before("put", key).await?;
        if self.plan.roll(s.error_rate) {
            if rand::rng().random_bool(0.5) {
                self.inner.put_body(key, body, meta).await?;
                return Err(injected("put", key, "error after the put"));
            }
            return Err(injected("put", key, "error"));
        }
        self.inner.put_body(key, body, meta).await
    }

    /// As for a put: a failure before or after the inner create, so callers also meet a
    /// create that stored its object and then reported an error (and whose retry finds it).
    async fn create(&self, key: &str, body: Bytes, meta: Meta) -> Result<()> {
        let s = self.before("create", key).await?;
        if self.plan.roll(s.error_rate) {
            if rand::rng().random_bool(0.5) {
                self.inner.create(key, body, meta).await?;
                return Err(injected("create", key, "error after the create"));
            }
            return Err(injected("create", key, "error"));
        }
        self.inner.create(key, body, meta).await
    }

    async fn get_to(&self, key: &str, sink: &dyn Sink) -> Result<Fetched> {
        let s = self.before("get", key).await?;
        if self.plan.roll(s.error_rate) {
            return Err(injected("get", key, "error"));
        }
        if !self.plan.roll(s.truncate_rate) {
            return self.inner.get_to(key, sink).await;
        }
        // A torn response: the bytes stop short, and the caller is not told.
        let size = self.inner.head(key).await?.map_or(0, |info| info.size);
        let cut = Truncating {
            inner: sink,
            keep: rand::rng().random_range(0..size.max(1)),
        };
        self.inner.get_to(key, &cut).await
    }

    async fn get_range_if(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes> {
        let s = self.before("get_range", key).await?;
        if self.plan.roll(s.error_rate) {
            return Err(injected("get_range", key, "error"));
        }
        let mut body = self.inner.get_range_if(key, range, etag).await?;
        if !body.is_empty() && self.plan.roll(s.truncate_rate) {
            let keep = rand::rng().random_range(0..body.len());
            body.truncate(keep);
        }
        Ok(body)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let s = self.before("head", key).await?;
        if self.plan.roll(s.error_rate) {
            return Err(injected("head", key, "error"));
        }
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let s = self.before("list", prefix).await?;
        if self.plan.roll(s.error_rate) {
            return Err(injected("list", prefix, "error"));
        }
        self.inner.list(prefix).await
    }

    async fn list_dir(&self, prefix: &str) -> Result<Listing> {
        let s = self.before("list", prefix).await?;
        if self.plan.roll(s.error_rate) {
            return Err(injected("list", prefix, "error"));
        }
        self.inner.list_dir(prefix).await
    }

    async fn list_dir_page(&self, prefix: &str, cursor: Option<&str>) -> Result<ListingPage> {
        let s = self.before("list", prefix).await?;
        if self.plan.roll(s.error_rate) {
            return Err(injected("list", prefix, "error"));
        }
        self.inner.list_dir_page(prefix, cursor).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let s = self.before("delete", key).await?;
        if self.plan.roll(s.error_rate) {
            return Err(injected("delete", key, "error"));
        }
        self.inner.delete(key).await
    }
}
