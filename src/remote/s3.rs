//! An S3-compatible bucket (AWS S3, Garage, MinIO, Ceph RGW, ...) through `object_store`.
//!
//! Puts larger than the multipart threshold go up as concurrent parts. With `checksum` on,
//! every PUT and every part carries a checksum of its body, which the store verifies before
//! it accepts the bytes: CRC64-NVME where nothing between firn and the store can change the
//! bytes unseen (HTTPS, or loopback), SHA-256 over plain HTTP across a network, where that
//! signed checksum is what binds the body to the request's signature (`checksum_for`). A create is one PUT with `If-None-Match: *`, which the store answers
//! with 412 Precondition Failed when the object exists, if it honours the header at all.
//!
//! Directory markers (`a/b/`) are the one thing `object_store` cannot name: its paths drop a
//! trailing `/`. Their PUT, HEAD and DELETE are signed here (with object_store's SigV4
//! signer) and sent through the same throttled client.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::{HttpClient, HttpConnector, HttpResponse};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
};

use super::http::LimitedConnector;
use super::limit::Limiter;

use super::{
    Body, Error, Fetched, Listing, ListingPage, Meta, ObjectInfo, Remote, Result, Sink, Stored,
    bad_range, check_key, dir_of, is_marker,
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
    /// `x-amz-server-side-encryption` for every object written: `AES256` (SSE-S3), `aws:kms`
    /// or `aws:kms:dsse`; none by default (the bucket's own default applies).
    pub server_side_encryption: Option<String>,
    /// The KMS key for `aws:kms` and `aws:kms:dsse` (the account's default key when unset).
    pub sse_kms_key_id: Option<String>,
}

/// The checksum an upload carries to `endpoint` (AWS when `None`). CRC64-NVME (AWS's
/// default since 2025; Garage, MinIO and moto verify it) catches any corruption on the way
/// and costs a tenth of SHA-256's CPU, which on a small gateway competes with its clients
/// (measured: SHA-256 was 4% of the machine while a cached volume took 1 GiB/s of writes).
/// But a CRC is no proof against a deliberate change: over plain HTTP across a network, the
/// signed SHA-256 is what stops a body from being swapped under a valid signature.
pub fn checksum_for(endpoint: Option<&str>) -> object_store::aws::Checksum {
    use object_store::aws::Checksum;
    let Some(endpoint) = endpoint else {
        return Checksum::CRC64NVME;
    };
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        return Checksum::SHA256;
    };
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    };
    if uri.scheme_str() == Some("https") || loopback {
        Checksum::CRC64NVME
    } else {
        Checksum::SHA256
    }
}

#[derive(Debug, Clone)]
pub struct S3Store {
    store: Arc<AmazonS3>,
    /// For directory markers: the client object_store uses, the bucket's URL, the region to
    /// sign for, and the encryption headers every PUT carries.
    http: HttpClient,
    bucket_url: String,
    region: String,
    sse_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    prefix: String,
    multipart_threshold: usize,
    part_size: usize,
    part_concurrency: usize,
}

impl S3Store {
    /// `limiter` throttles every byte this store sends or receives.
    pub fn new(options: &S3Options, limiter: Arc<Limiter>) -> Result<S3Store> {
        let configure = |message: String| Error::Permanent {
            op: "configure",
            key: options.bucket.clone(),
            message,
        };
        let connector = LimitedConnector {
            limiter,
            read_timeout: options.request_timeout,
        };
        let client_options = ClientOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(Duration::from_secs(5))
            .with_allow_http(true);
        let http = connector
            .connect(&client_options)
            .map_err(|e| configure(e.to_string()))?;
        let mut builder = AmazonS3Builder::from_env()
            .with_http_connector(connector)
            .with_bucket_name(&options.bucket)
            .with_region(&options.region)
            .with_virtual_hosted_style_request(!options.path_style)
            .with_client_options(client_options)
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
            // The checksum header is signed and the store verifies it (Garage answers 400 to
            // a wrong one), so the SigV4 payload hash would be a second pass over every byte.
            builder = builder
                .with_checksum_algorithm(checksum_for(options.endpoint.as_deref()))
                .with_unsigned_payload(true);
        }
        let mut sse_headers = Vec::new();
        if let Some(kind) = &options.server_side_encryption {
            if !["AES256", "aws:kms", "aws:kms:dsse"].contains(&kind.as_str()) {
                return Err(configure(format!(
                    "server_side_encryption {kind:?}: firn writes \"AES256\", \"aws:kms\" or \
                     \"aws:kms:dsse\""
                )));
            }
            builder = builder.with_config(config_key("aws_server_side_encryption"), kind);
            sse_headers.push(header("x-amz-server-side-encryption", kind, &configure)?);
        }
        if let Some(key_id) = &options.sse_kms_key_id {
            if !options
                .server_side_encryption
                .as_deref()
                .is_some_and(|kind| kind.starts_with("aws:kms"))
            {
                return Err(configure(
                    "sse_kms_key_id needs server_side_encryption \"aws:kms\" or \"aws:kms:dsse\""
                        .into(),
                ));
            }
            builder = builder.with_config(config_key("aws_sse_kms_key_id"), key_id);
            sse_headers.push(header(
                "x-amz-server-side-encryption-aws-kms-key-id",
                key_id,
                &configure,
            )?);
        }
        let store = builder.build().map_err(|e| configure(e.to_string()))?;
        // As object_store addresses the bucket.
        let bucket_url = match (&options.endpoint, options.path_style) {
            (Some(endpoint), false) => endpoint.trim_end_matches('/').to_string(),
            (Some(endpoint), true) => {
                format!("{}/{}", endpoint.trim_end_matches('/'), options.bucket)
            }
            (None, false) => format!(
                "https://{}.s3.{}.amazonaws.com",
                options.bucket, options.region
            ),
            (None, true) => format!(
                "https://s3.{}.amazonaws.com/{}",
                options.region, options.bucket
            ),
        };
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
            http,
            bucket_url,
            region: options.region.clone(),
            sse_headers,
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
        if is_marker(key) {
            // Path::parse would drop the `/` and name another object.
            return Err(Error::BadKey {
                key: key.to_string(),
                reason: "a directory marker has no content to read".into(),
            });
        }
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

    /// One signed request for directory marker `key`: a PUT (with `meta`), HEAD or DELETE.
    async fn marker(
        &self,
        op: &'static str,
        method: http::Method,
        key: &str,
        meta: &Meta,
    ) -> Result<HttpResponse> {
        check_key(key)?;
        let full = self.full_key(key);
        if full.len() > MAX_KEY_BYTES {
            return Err(Error::BadKey {
                key: key.to_string(),
                reason: format!(
                    "{} bytes with the prefix; S3 allows {MAX_KEY_BYTES}",
                    full.len()
                ),
            });
        }
        let url = format!(
            "{}/{}",
            self.bucket_url,
            percent_encoding::utf8_percent_encode(&full, PATH_ENCODE)
        );
        let mut request = http::Request::builder().method(method.clone()).uri(url);
        if method == http::Method::PUT {
            for (name, value) in &self.sse_headers {
                request = request.header(name, value);
            }
            for (name, value) in meta {
                request = request.header(format!("x-amz-meta-{name}"), value);
            }
            request = request.header(http::header::CONTENT_LENGTH, 0);
        }
        self.signed(op, key, request).await
    }

    /// Signs and sends a request without a body. Success and 404 are answers for the caller;
    /// other statuses are errors, retryable for 5xx and 429.
    async fn signed(
        &self,
        op: &'static str,
        key: &str,
        request: http::request::Builder,
    ) -> Result<HttpResponse> {
        let failed = |message: String| Error::Permanent {
            op,
            key: key.to_string(),
            message,
        };
        let mut request = request
            .body(object_store::client::HttpRequestBody::from(Bytes::new()))
            .map_err(|e| failed(e.to_string()))?;
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| s3_error(op, key, e))?;
        AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(|e| s3_error(op, key, e))?;
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| Error::Transient {
                op,
                key: key.to_string(),
                message: error_chain(&e),
            })?;
        let status = response.status();
        if status.is_success() || status == http::StatusCode::NOT_FOUND {
            return Ok(response);
        }
        let body = response.into_body().bytes().await.unwrap_or_default();
        let message = format!("{status}: {}", String::from_utf8_lossy(&body));
        Err(
            if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
                Error::Transient {
                    op,
                    key: key.to_string(),
                    message,
                }
            } else {
                failed(message)
            },
        )
    }

    /// The full prefix a listing of level `prefix` asks for.
    fn dir_key(&self, prefix: &str) -> String {
        if prefix.is_empty() && self.prefix.is_empty() {
            String::new()
        } else {
            self.full_key(prefix)
        }
    }

    /// ListObjectsV2, every page, of the full keys starting with `full_prefix`, one level
    /// deep with `delimiter`. The keys and common prefixes are returned relative to the
    /// store's prefix.
    async fn list_objects(
        &self,
        prefix: &str,
        full_prefix: &str,
        delimiter: bool,
    ) -> Result<(Vec<ObjectInfo>, Vec<String>)> {
        let mut objects = Vec::new();
        let mut dirs = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .list_page(prefix, full_prefix, delimiter, token.as_deref())
                .await?;
            objects.extend(page.objects);
            dirs.extend(page.dirs);
            match page.next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        Ok((objects, dirs))
    }

    /// One ListObjectsV2 page (up to 1,000 keys and common prefixes), from continuation
    /// `token`. Its own request rather than object_store's, whose paths drop the `/` of a
    /// directory marker: here every key comes back exactly as stored.
    async fn list_page(
        &self,
        prefix: &str,
        full_prefix: &str,
        delimiter: bool,
        token: Option<&str>,
    ) -> Result<ListPage> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Page {
            #[serde(default)]
            contents: Vec<Contents>,
            #[serde(default)]
            common_prefixes: Vec<CommonPrefix>,
            #[serde(default)]
            next_continuation_token: Option<String>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Contents {
            key: String,
            size: u64,
            #[serde(rename = "ETag", default)]
            e_tag: Option<String>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct CommonPrefix {
            prefix: String,
        }
        {
            let mut url = reqwest::Url::parse(&self.bucket_url).map_err(|e| Error::Permanent {
                op: "list",
                key: prefix.to_string(),
                message: format!("the bucket's URL {:?}: {e}", self.bucket_url),
            })?;
            {
                let mut query = url.query_pairs_mut();
                query.append_pair("list-type", "2");
                query.append_pair("prefix", full_prefix);
                if delimiter {
                    query.append_pair("delimiter", "/");
                }
                if let Some(token) = token {
                    query.append_pair("continuation-token", token);
                }
            }
            let request = http::Request::builder()
                .method(http::Method::GET)
                .uri(url.as_str());
            let response = self.signed("list", prefix, request).await?;
            let status = response.status();
            let body = response
                .into_body()
                .bytes()
                .await
                .map_err(|e| Error::Transient {
                    op: "list",
                    key: prefix.to_string(),
                    message: error_chain(&e),
                })?;
            if status == http::StatusCode::NOT_FOUND {
                let body = String::from_utf8_lossy(&body);
                return Err(Error::Permanent {
                    op: "list",
                    key: prefix.to_string(),
                    message: if body.contains("NoSuchBucket") {
                        "the bucket does not exist (NoSuchBucket)".to_string()
                    } else {
                        format!("404: {body}")
                    },
                });
            }
            let page: Page =
                quick_xml::de::from_reader(&body[..]).map_err(|e| Error::Transient {
                    op: "list",
                    key: prefix.to_string(),
                    message: format!("an unreadable listing: {e}"),
                })?;
            Ok(ListPage {
                objects: page
                    .contents
                    .into_iter()
                    .map(|c| ObjectInfo {
                        key: self.strip_prefix(&c.key).to_string(),
                        size: c.size,
                        meta: Meta::new(),
                        etag: c.e_tag,
                    })
                    .collect(),
                dirs: page
                    .common_prefixes
                    .into_iter()
                    .map(|p| self.strip_prefix(&p.prefix).to_string())
                    .collect(),
                next: page.next_continuation_token.filter(|next| !next.is_empty()),
            })
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
    ) -> Result<Stored> {
        let options = PutMultipartOptions {
            attributes: attributes(meta),
            ..Default::default()
        };
        let mut unfinished = Unfinished(Some(
            self.store
                .put_multipart_opts(path, options)
                .await
                .map_err(|e| s3_error("put", key, e))?,
        ));
        let upload = unfinished.0.as_mut().expect("the upload just begun");
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
        let ended = match outcome {
            Ok(()) => upload
                .complete()
                .await
                .map(|done| Stored { etag: done.e_tag })
                .map_err(|e| s3_error("put", key, e)),
            Err(e) => {
                // Leave no half-uploaded parts behind to be billed for.
                let _ = upload.abort().await;
                Err(e)
            }
        };
        unfinished.0 = None;
        ended
    }
}

/// Multipart uploads being aborted because their put was dropped (`Unfinished`).
static ABORTING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A multipart upload under way. Dropped before it ends (its put cancelled: an interrupted
/// `firn remote put`, a stopping daemon), it is aborted on a task of its own, so that no
/// parts stay in the bucket to be billed for.
struct Unfinished(Option<Box<dyn object_store::MultipartUpload>>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(mut upload) = self.0.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            ABORTING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            runtime.spawn(async move {
                let _ = upload.abort().await;
                ABORTING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            });
        }
    }
}

/// Waits, at most `within`, for the aborts of dropped multipart uploads to end.
pub async fn aborts_settled(within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while ABORTING.load(std::sync::atomic::Ordering::Acquire) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One page of a ListObjectsV2, keys relative to the store's prefix.
struct ListPage {
    objects: Vec<ObjectInfo>,
    dirs: Vec<String>,
    /// The continuation token of the next page; `None` after the last.
    next: Option<String>,
}

/// The entries of the level `prefix` among a listing's `objects` and common prefixes, each
/// in key order: only what lies strictly below the prefix (a directory marker of the prefix
/// itself, `a/b/` when listing `a/b/`, is no entry of it).
fn level(prefix: &str, objects: Vec<ObjectInfo>, dirs: Vec<String>) -> Listing {
    let below = |key: &str| {
        key.strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty() && !rest.trim_end_matches('/').contains('/'))
    };
    let mut dirs: Vec<String> = dirs
        .into_iter()
        .filter(|d| d.ends_with('/') && below(d))
        .collect();
    let mut objects: Vec<ObjectInfo> = objects
        .into_iter()
        .filter(|o| !o.key.ends_with('/') && below(&o.key))
        .collect();
    dirs.sort();
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    Listing { dirs, objects }
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

/// How object_store encodes a key in a URL: everything but letters, digits and `/-._~`.
const PATH_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// object_store names its encryption settings by string only (their enum is private).
fn config_key(name: &str) -> AmazonS3ConfigKey {
    name.parse()
        .expect("object_store knows its own encryption settings")
}

fn header(
    name: &'static str,
    value: &str,
    configure: &dyn Fn(String) -> Error,
) -> Result<(http::HeaderName, http::HeaderValue)> {
    let value = http::HeaderValue::from_str(value)
        .map_err(|_| configure(format!("{value:?} cannot be sent as {name}")))?;
    Ok((http::HeaderName::from_static(name), value))
}

fn attributes(meta: Meta) -> Attributes {
    let mut attributes = Attributes::new();
    for (name, value) in meta {
        attributes.insert(Attribute::Metadata(name.into()), value.into());
    }
    attributes
}

/// Maps `object_store` errors to what a caller can act on: gone, retry, or give up.
fn s3_error(op: &'static str, key: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    match e {
        // A 404 for the bucket, not the object (where the answer has a body to say so):
        // waiting will not fix it, and a delete must not pass for done.
        E::NotFound { .. } if error_chain(&e).contains("NoSuchBucket") => Error::Permanent {
            op,
            key: key.to_string(),
            message: "the bucket does not exist (NoSuchBucket)".to_string(),
        },
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
    async fn put_body(&self, key: &str, body: Arc<dyn Body>, meta: Meta) -> Result<Stored> {
        if is_marker(key) {
            if !body.is_empty() {
                return Err(Error::BadKey {
                    key: key.to_string(),
                    reason: "a directory marker's body must be empty".into(),
                });
            }
            let response = self.marker("put", http::Method::PUT, key, &meta).await?;
            if response.status() == http::StatusCode::NOT_FOUND {
                return Err(Error::Permanent {
                    op: "put",
                    key: key.to_string(),
                    message: "404: no such bucket".into(),
                });
            }
            let etag = response
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            return Ok(Stored { etag });
        }
        let path = self.path(key)?;
        if body.len() > self.multipart_threshold as u64 {
            return self.put_multipart(&path, key, body, meta).await;
        }
        let options = PutOptions {
            attributes: attributes(meta),
            ..Default::default()
        };
        let data = body.read(0..body.len()).await?;
        let done = self
            .store
            .put_opts(&path, PutPayload::from(data), options)
            .await
            .map_err(|e| s3_error("put", key, e))?;
        Ok(Stored { etag: done.e_tag })
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

    async fn get_range_if(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes> {
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
            if_match: etag.map(str::to_string),
            ..Default::default()
        };
        let result = match self.store.get_opts(&path, options).await {
            Ok(result) => result,
            Err(e @ object_store::Error::NotFound { .. }) => {
                return Err(s3_error("get_range", key, e));
            }
            Err(object_store::Error::Precondition { .. }) if etag.is_some() => {
                return Err(Error::Changed {
                    key: key.to_string(),
                });
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
        if is_marker(key) {
            let response = self
                .marker("head", http::Method::HEAD, key, &Meta::new())
                .await?;
            if response.status() == http::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let meta = response
                .headers()
                .iter()
                .filter_map(|(name, value)| {
                    let name = name.as_str().strip_prefix("x-amz-meta-")?;
                    Some((name.to_string(), value.to_str().ok()?.to_string()))
                })
                .collect();
            // Empty, as firn makes them; another tool may have put bytes in one.
            let size = response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            return Ok(Some(ObjectInfo {
                key: key.to_string(),
                size,
                meta,
                etag: None,
            }));
        }
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
                    etag: result.meta.e_tag,
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("head", key, e)),
        }
    }

    /// Every key as stored, directory markers with their `/`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let full = self.full_key(prefix);
        let (mut found, _) = self.list_objects(prefix, &full, false).await?;
        found.retain(|o| o.key.starts_with(prefix));
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// A ListObjectsV2 with `delimiter=/` (all its pages).
    async fn list_dir(&self, prefix: &str) -> Result<Listing> {
        dir_of(prefix)?;
        let (objects, dirs) = self
            .list_objects(prefix, &self.dir_key(prefix), true)
            .await?;
        Ok(level(prefix, objects, dirs))
    }

    /// One ListObjectsV2 page with `delimiter=/`; the cursor is its continuation token.
    async fn list_dir_page(&self, prefix: &str, cursor: Option<&str>) -> Result<ListingPage> {
        dir_of(prefix)?;
        let page = self
            .list_page(prefix, &self.dir_key(prefix), true, cursor)
            .await?;
        Ok(ListingPage {
            listing: level(prefix, page.objects, page.dirs),
            next: page.next,
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        if is_marker(key) {
            self.marker("delete", http::Method::DELETE, key, &Meta::new())
                .await?;
            return Ok(());
        }
        let path = self.path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error("delete", key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checksum_is_a_crc_only_where_nothing_can_swap_the_body() {
        use object_store::aws::Checksum::{CRC64NVME, SHA256};
        let cases = [
            (None, CRC64NVME),
            (Some("https://s3.example.net"), CRC64NVME),
            (Some("http://127.0.0.1:3900"), CRC64NVME),
            (Some("http://[::1]:3900"), CRC64NVME),
            (Some("http://localhost:3900"), CRC64NVME),
            (Some("http://10.1.2.3:3900"), SHA256),
            (Some("http://storage.example.net"), SHA256),
            (Some("not a url"), SHA256),
        ];
        for (endpoint, want) in cases {
            assert_eq!(super::checksum_for(endpoint), want, "{endpoint:?}");
        }
    }
}
