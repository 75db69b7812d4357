//! An S3-compatible bucket (AWS S3, Garage, MinIO, Ceph RGW, ...) through `object_store`.
//!
//! Puts larger than the multipart threshold go up as concurrent parts. With `checksum` on,
//! every PUT and every part carries `x-amz-checksum-sha256`, which the store verifies before
//! it accepts the bytes. A create is one PUT with `If-None-Match: *`, which the store answers
//! with 412 Precondition Failed when the object exists, if it honours the header at all.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
};

use super::limit::{Direction, Limiter, Throttled};

use super::{
    Body, Error, Fetched, Listing, Meta, ObjectInfo, Remote, Result, Sink, bad_range, check_key,
    dir_of,
};

/// S3's limit on an object name, in bytes of UTF-8.
const MAX_KEY_BYTES: usize = 1024;

/// Everything needed to reach a bucket. Credentials come from here when set, otherwise from
/// the usual AWS environment variables.
#[derive(Debug, Clone)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Prepended to every key, without a trailing `/` (empty for none).
    pub prefix: String,
    pub path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub checksum: bool,
    pub multipart_threshold: usize,
    pub part_size: usize,
    pub part_concurrency: usize,
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct S3Store {
    store: Arc<AmazonS3>,
    prefix: String,
    multipart_threshold: usize,
    part_size: usize,
    part_concurrency: usize,
}

impl S3Store {
    /// `limiter` throttles every byte this store sends or receives.
    pub fn new(options: &S3Options, limiter: Arc<Limiter>) -> Result<S3Store> {
        let mut builder = AmazonS3Builder::from_env()
            .with_http_connector(LimitedConnector {
                limiter,
                read_timeout: options.request_timeout,
            })
            .with_bucket_name(&options.bucket)
            .with_region(&options.region)
            .with_virtual_hosted_style_request(!options.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(options.request_timeout)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_allow_http(true),
            )
            // A few quick retries for a dropped connection inside one request; riding out
            // an outage is the `retry` wrapper's job, so it shows in firn's own metrics.
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(id) = &options.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &options.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if options.checksum {
            // The signed x-amz-checksum-sha256 header already binds the body, and the store
            // verifies it (Garage answers 400 to a wrong one), so the SigV4 payload hash would
            // be a second SHA-256 pass over every byte for nothing.
            builder = builder
                .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
                .with_unsigned_payload(true);
        }
        let store = builder.build().map_err(|e| Error::Permanent {
            op: "configure",
            key: options.bucket.clone(),
            message: e.to_string(),
        })?;
        let prefix = options.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            check_key(&prefix).map_err(|e| Error::Permanent {
                op: "configure",
                key: prefix.clone(),
                message: format!("remote.prefix is not a valid key prefix: {e}"),
            })?;
        }
        Ok(S3Store {
            store: Arc::new(store),
            prefix,
            multipart_threshold: options.multipart_threshold,
            part_size: options.part_size.max(5 << 20),
            part_concurrency: options.part_concurrency.max(1),
        })
    }

    /// The object's name in the bucket, verbatim. `Path::from` would percent-encode `%`, `#`,
    /// `~` and friends (storing `50%.csv` as `50%25.csv`); `Path::parse` keeps the name as
    /// given and the client encodes it only on the wire, so every S3 tool sees the same name.
    fn path(&self, key: &str) -> Result<Path> {
        check_key(key)?;
        let full = self.full_key(key);
        if full.len() > MAX_KEY_BYTES {
            return Err(Error::BadKey {
                key: key.to_string(),
                reason: format!(
                    "with the prefix {:?} the name is {} bytes, S3 allows {MAX_KEY_BYTES}",
                    self.prefix,
                    full.len()
                ),
            });
        }
        Path::parse(&full).map_err(|e| Error::BadKey {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn strip_prefix<'a>(&self, full: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(&self.prefix)
                .and_then(|k| k.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    /// Parts are read from the body as they are needed: a few ahead of the uploads, so
    /// memory stays near (concurrency + 2) parts whatever the object's size.
    async fn put_multipart(
        &self,
        path: &Path,
        key: &str,
        body: Arc<dyn Body>,
        meta: Meta,
    ) -> Result<()> {
        let options = PutMultipartOptions {
            attributes: attributes(meta),
            ..Default::default()
        };
        let mut upload = self
            .store
            .put_multipart_opts(path, options)
            .await
            .map_err(|e| s3_error("put", key, e))?;
        let len = body.len();
        let part = self.part_size as u64;
        let mut reads = futures::stream::iter((0..len).step_by(self.part_size))
            .map(|start| {
                let body = body.clone();
                async move { body.read(start..(start + part).min(len)).await }
            })
            .buffered(2);
        // Each part uploads on its own task, so parts keep moving while the next is read;
        // dropping the set (on an error) aborts the rest.
        let mut in_flight = tokio::task::JoinSet::new();
        let outcome: Result<()> = async {
            loop {
                if in_flight.len() < self.part_concurrency
                    && let Some(data) = reads.next().await
                {
                    // Parts are numbered in the order put_part is called: in body order.
                    in_flight.spawn(upload.put_part(PutPayload::from(data?)));
                    continue;
                }
                match in_flight.join_next().await {
                    Some(done) => done
                        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                        .map_err(|e| s3_error("put", key, e))?,
                    None => return Ok(()),
                }
            }
        }
        .await;
        drop(in_flight);
        match outcome {
            Ok(()) => {
                upload
                    .complete()
                    .await
                    .map_err(|e| s3_error("put", key, e))?;
                Ok(())
            }
            Err(e) => {
                // Leave no half-uploaded parts behind to be billed for.
                let _ = upload.abort().await;
                Err(e)
            }
        }
    }
}

/// Downloads of a large object's parts, oldest first; dropped early, it aborts the rest.
struct InOrder<T>(std::collections::VecDeque<tokio::task::JoinHandle<T>>);

impl<T> Drop for InOrder<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn attributes(meta: Meta) -> Attributes {
    let mut attributes = Attributes::new();
    for (name, value) in meta {
        attributes.insert(Attribute::Metadata(name.into()), value.into());
    }
    attributes
}

/// object_store's HTTP client, with the bandwidth limiter in every request and response body.
/// It is built here rather than from object_store's `ClientOptions` because a throttled body
/// can take longer than any fixed request timeout: the timeout applies to each read instead.
#[derive(Debug)]
struct LimitedConnector {
    limiter: Arc<Limiter>,
    read_timeout: Duration,
}

impl HttpConnector for LimitedConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        // HTTP/1.1 only, as object_store's own client does: S3 endpoints speak nothing else.
        let client = reqwest::Client::builder()
            .http1_only()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(self.read_timeout)
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(LimitedHttp {
            client,
            limiter: self.limiter.clone(),
        }))
    }
}

#[derive(Debug)]
struct LimitedHttp {
    client: reqwest::Client,
    limiter: Arc<Limiter>,
}

#[async_trait]
impl HttpService for LimitedHttp {
    async fn call(&self, request: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        // Object data is charged: PUT bodies (objects and parts) and GET answers other than
        // listings. Listings, HEADs and multipart bookkeeping pass free, so health probes and
        // listings still answer while a direction is paused.
        let listing = parts.uri.query().is_some_and(|q| q.contains("list-type"));
        let charge_up = (parts.method == http::Method::PUT).then(|| self.limiter.clone());
        let charge_down =
            (parts.method == http::Method::GET && !listing).then(|| self.limiter.clone());
        let url = reqwest::Url::parse(&parts.uri.to_string())
            .map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?;
        let mut outgoing = reqwest::Request::new(parts.method, url);
        *outgoing.headers_mut() = parts.headers;
        *outgoing.body_mut() = Some(reqwest::Body::wrap(Throttled::new(
            body,
            charge_up,
            Direction::Upload,
        )));
        let response = self.client.execute(outgoing).await.map_err(http_error)?;
        let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
        let body = Throttled::new(body, charge_down, Direction::Download).map_err(http_error);
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// What object_store's own retries need to know about a failed request.
fn http_error(e: reqwest::Error) -> HttpError {
    let mut kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_decode() {
        HttpErrorKind::Decode
    } else if e.is_request() || e.is_body() {
        HttpErrorKind::Request
    } else {
        HttpErrorKind::Unknown
    };
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::TimedOut => kind = HttpErrorKind::Timeout,
                K::ConnectionAborted | K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof => {
                    kind = HttpErrorKind::Interrupted
                }
                _ => {}
            }
        }
        source = s.source();
    }
    HttpError::new(kind, e.without_url())
}

/// Maps `object_store` errors to what a caller can act on: gone, retry, or give up.
fn s3_error(op: &'static str, key: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Error::NotFound {
            key: key.to_string(),
        },
        // If-Match failed: the object was overwritten during a read in parts.
        E::Precondition { .. } => Error::Transient {
            op,
            key: key.to_string(),
            message: "the object changed while it was read; reading it again".to_string(),
        },
        E::Generic { .. } => {
            let message = error_chain(&e);
            // A few answers mean the configuration is wrong and waiting will not fix it.
            let permanent = [
                "NoSuchBucket",
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
            ]
            .iter()
            .any(|code| message.contains(code));
            if permanent {
                Error::Permanent {
                    op,
                    key: key.to_string(),
                    message,
                }
            } else {
                Error::Transient {
                    op,
                    key: key.to_string(),
                    message,
                }
            }
        }
        other => Error::Permanent {
            op,
            key: key.to_string(),
            message: error_chain(&other),
        },
    }
}

/// A create's failure: `Exists` only for the store's refusal (412, or 304 from stores that
/// answer If-None-Match as for a GET); object_store also reports a 409 Conflict as
/// `AlreadyExists`, but for a PUT that is a conditional write racing another, not an answer.
fn create_error(key: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    match e {
        // object_store wraps the store's 412 (or 304) in `AlreadyExists`; its own 409 mapping
        // carries the HTTP error instead.
        E::AlreadyExists { source, .. }
            if matches!(
                source.downcast_ref::<E>(),
                Some(E::Precondition { .. } | E::NotModified { .. })
            ) =>
        {
            Error::Exists {
                key: key.to_string(),
            }
        }
        E::AlreadyExists { .. } => {
            let message = error_chain(&e);
            // AWS S3 answers 409 ConditionalRequestConflict (or OperationAborted) while
            // another conditional write to the key is in flight: ask again, and the answer is
            // a success or a 412.
            if ["ConditionalRequestConflict", "OperationAborted"]
                .iter()
                .any(|code| message.contains(code))
            {
                Error::Transient {
                    op: "create",
                    key: key.to_string(),
                    message: format!("a concurrent conditional write to the key: {message}"),
                }
            } else {
                Error::Permanent {
                    op: "create",
                    key: key.to_string(),
                    message: format!("409 Conflict: {message}"),
                }
            }
        }
        E::Generic { .. } if error_chain(&e).contains("NotImplemented") => Error::Permanent {
            op: "create",
            key: key.to_string(),
            message: format!(
                "the store does not implement conditional writes (If-None-Match): {}",
                error_chain(&e)
            ),
        },
        other => s3_error("create", key, other),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

#[async_trait]
impl Remote for S3Store {
    async fn put_body(&self, key: &str, body: Arc<dyn Body>, meta: Meta) -> Result<()> {
        let path = self.path(key)?;
        if body.len() > self.multipart_threshold as u64 {
            return self.put_multipart(&path, key, body, meta).await;
        }
        let options = PutOptions {
            attributes: attributes(meta),
            ..Default::default()
        };
        let data = body.read(0..body.len()).await?;
        self.store
            .put_opts(&path, PutPayload::from(data), options)
            .await
            .map_err(|e| s3_error("put", key, e))?;
        Ok(())
    }

    /// One PUT with `If-None-Match: *`, with the same metadata and checksum as a put's. The
    /// client's own retries (a 5xx, a reset connection) may resend it after the store kept
    /// the first: that answer is `Exists`, as the trait says.
    async fn create(&self, key: &str, body: Bytes, meta: Meta) -> Result<()> {
        let path = self.path(key)?;
        if body.len() > self.multipart_threshold {
            return Err(Error::Permanent {
                op: "create",
                key: key.to_string(),
                message: format!(
                    "{} bytes is over the multipart threshold of {}: a create is a single PUT, \
                     for small objects",
                    body.len(),
                    self.multipart_threshold
                ),
            });
        }
        let options = PutOptions {
            mode: PutMode::Create,
            attributes: attributes(meta),
            ..Default::default()
        };
        self.store
            .put_opts(&path, PutPayload::from(body), options)
            .await
            .map_err(|e| create_error(key, e))?;
        Ok(())
    }

    async fn get_to(&self, key: &str, sink: &dyn Sink) -> Result<Fetched> {
        let path = self.path(key)?;
        // The first part comes with the object's size and metadata; a large object's other
        // parts follow as concurrent ranged GETs, as the parts of a large put go up, and go
        // to the sink in order as they arrive (at most `part_concurrency` held at once).
        let first = GetOptions {
            range: Some(GetRange::Bounded(0..self.part_size as u64)),
            ..Default::default()
        };
        let result = match self.store.get_opts(&path, first).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::NotFound {
                    key: key.to_string(),
                });
            }
            // An empty object has no byte 0 to ask for; ask for it whole. Any other failure
            // stays a failure (a whole GET of a large object would not fit in memory).
            Err(e) => match self.head(key).await {
                Ok(Some(info)) if info.size == 0 => self
                    .store
                    .get_opts(&path, GetOptions::default())
                    .await
                    .map_err(|e| s3_error("get", key, e))?,
                _ => return Err(s3_error("get", key, e)),
            },
        };
        let mut meta = Meta::new();
        for (attribute, value) in result.attributes.iter() {
            if let Attribute::Metadata(name) = attribute {
                meta.insert(name.to_string(), value.as_ref().to_string());
            }
        }
        let size = result.meta.size;
        let etag = result.meta.e_tag.clone();
        let head = result.bytes().await.map_err(|e| s3_error("get", key, e))?;
        let mut offset = head.len() as u64;
        sink.write(0, head).await?;
        if offset < size {
            // The other parts must come from the same version of the object: with If-Match
            // on the first part's ETag an overwrite in between fails the read (and the retry
            // reads the new version whole) instead of mixing two bodies.
            let Some(etag) = etag else {
                return Err(Error::Permanent {
                    op: "get",
                    key: key.to_string(),
                    message: "the store sent no ETag, so a large object cannot be read \
                              consistently in parts"
                        .to_string(),
                });
            };
            let ranges = (offset..size)
                .step_by(self.part_size)
                .map(|start| start..(start + self.part_size as u64).min(size));
            // Each part downloads on its own task, so parts keep arriving while the sink
            // writes; they are taken in order, and the guard aborts the rest on an error.
            let mut ranges = ranges.map(|range| {
                let options = GetOptions {
                    range: Some(GetRange::Bounded(range)),
                    if_match: Some(etag.clone()),
                    ..Default::default()
                };
                let (store, path) = (self.store.clone(), path.clone());
                tokio::spawn(async move { store.get_opts(&path, options).await?.bytes().await })
            });
            let mut parts = InOrder(std::collections::VecDeque::new());
            parts.0.extend(ranges.by_ref().take(self.part_concurrency));
            while let Some(next) = parts.0.front_mut() {
                let part = next
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                    .map_err(|e| s3_error("get", key, e))?;
                parts.0.pop_front();
                parts.0.extend(ranges.next());
                let n = part.len() as u64;
                sink.write(offset, part).await?;
                offset += n;
            }
        }
        if offset != size {
            return Err(Error::Transient {
                op: "get",
                key: key.to_string(),
                message: format!("read {offset} of {size} bytes"),
            });
        }
        Ok(Fetched { size, meta })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key)?;
        if range.start > range.end {
            return Err(bad_range(key, &range, None));
        }
        if range.start == range.end {
            return match self.head(key).await? {
                Some(info) if range.end <= info.size => Ok(Bytes::new()),
                Some(info) => Err(bad_range(key, &range, Some(info.size))),
                None => Err(Error::NotFound {
                    key: key.to_string(),
                }),
            };
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        let result = match self.store.get_opts(&path, options).await {
            Ok(result) => result,
            Err(e @ object_store::Error::NotFound { .. }) => {
                return Err(s3_error("get_range", key, e));
            }
            Err(e) => {
                // S3 answers 416 to a range that starts past the end; tell that apart from
                // a failure worth retrying.
                if let Ok(Some(info)) = self.head(key).await
                    && range.end > info.size
                {
                    return Err(bad_range(key, &range, Some(info.size)));
                }
                return Err(s3_error("get_range", key, e));
            }
        };
        // S3 shortens a range that runs past the end; firn's callers asked for every byte.
        if range.end > result.meta.size {
            return Err(bad_range(key, &range, Some(result.meta.size)));
        }
        let body = result
            .bytes()
            .await
            .map_err(|e| s3_error("get_range", key, e))?;
        if body.len() as u64 != range.end - range.start {
            return Err(Error::Transient {
                op: "get_range",
                key: key.to_string(),
                message: format!(
                    "read {} of the {} bytes of range {}..{}",
                    body.len(),
                    range.end - range.start,
                    range.start,
                    range.end
                ),
            });
        }
        Ok(body)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(key)?;
        // A HEAD through `get_opts`, which (unlike `head`) hands back the user metadata.
        let options = GetOptions {
            head: true,
            ..Default::default()
        };
        match self.store.get_opts(&path, options).await {
            Ok(result) => {
                let mut meta = Meta::new();
                for (attribute, value) in result.attributes.iter() {
                    if let Attribute::Metadata(name) = attribute {
                        meta.insert(name.to_string(), value.as_ref().to_string());
                    }
                }
                Ok(Some(ObjectInfo {
                    key: key.to_string(),
                    size: result.meta.size,
                    meta,
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full = self.full_key(prefix);
        // object_store lists whole path segments; list the enclosing "directory" and filter.
        let dir = match full.rfind('/') {
            Some(i) => Some(Path::parse(&full[..i]).map_err(|e| Error::BadKey {
                key: prefix.to_string(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let mut stream = self.store.list(dir.as_ref());
        let mut found = Vec::new();
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|e| s3_error("list", prefix, e))?;
            let key = self.strip_prefix(meta.location.as_ref());
            if key.starts_with(prefix) {
                found.push(ObjectInfo {
                    key: key.to_string(),
                    size: meta.size,
                    meta: Meta::new(),
                });
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// A ListObjectsV2 with `delimiter=/` (all its pages). Names come back as `list`'s do:
    /// parsed, never decoded, so they are the names as stored. The store sends the common
    /// prefixes without their `/`, which is put back.
    async fn list_dir(&self, prefix: &str) -> Result<Listing> {
        let dir = dir_of(prefix)?;
        let path = if !dir.is_empty() {
            Some(self.path(dir).map_err(|e| match e {
                Error::BadKey { reason, .. } => Error::BadKey {
                    key: prefix.to_string(),
                    reason,
                },
                other => other,
            })?)
        } else if !self.prefix.is_empty() {
            Some(Path::parse(&self.prefix).map_err(|e| Error::BadKey {
                key: prefix.to_string(),
                reason: e.to_string(),
            })?)
        } else {
            None
        };
        let result = self
            .store
            .list_with_delimiter(path.as_ref())
            .await
            .map_err(|e| s3_error("list", prefix, e))?;
        // Only what lies strictly below the prefix: a "directory marker" object some tools
        // write (a key ending in `/`) names the prefix itself and is no entry of it.
        let below = |full: &str| {
            let key = self.strip_prefix(full);
            key.strip_prefix(prefix)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
                .then(|| key.to_string())
        };
        let mut dirs: Vec<String> = result
            .common_prefixes
            .iter()
            .filter_map(|path| below(path.as_ref()))
            .map(|key| key + "/")
            .collect();
        let mut objects: Vec<ObjectInfo> = result
            .objects
            .iter()
            .filter_map(|meta| {
                below(meta.location.as_ref()).map(|key| ObjectInfo {
                    key,
                    size: meta.size,
                    meta: Meta::new(),
                })
            })
            .collect();
        dirs.sort();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Listing { dirs, objects })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error("delete", key, e)),
        }
    }
}
