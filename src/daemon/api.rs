//! The HTTP API (axum): `/healthz` and `/metrics` open on the listen address, everything
//! under `/api/v1` behind the bearer token and recorded in the audit log.

use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::Gateway;
use super::audit::Call;
use super::status::{Status, disk_space};
use crate::engines::volume::Mode;
use crate::engines::volume::catalog::{Limits, VolumeOptions};
use crate::remote::limit::Policy;
use crate::size::ByteSize;

type Shared = State<Arc<Gateway>>;

pub fn router(gateway: Arc<Gateway>) -> Router {
    let api = Router::new()
        .route("/status", get(status))
        .route("/bandwidth", get(get_bandwidth).put(put_bandwidth))
        .route("/volumes", get(list_volumes).post(create_volume))
        .route("/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/volumes/{name}/resize", axum::routing::post(resize_volume))
        .route(
            "/volumes/{name}/limits",
            axum::routing::post(set_volume_limits),
        )
        .route(
            "/volumes/{name}/takeover",
            axum::routing::post(take_over_volume),
        )
        .route("/shares", get(list_shares).post(create_share))
        .route("/shares/{name}", get(show_share).delete(delete_share))
        .route("/shares/{name}/uploads", get(share_uploads))
        .route("/shares/{name}/events", get(share_events))
        .route("/shares/{name}/refresh", axum::routing::post(refresh_share))
        .fallback(not_found)
        // One layer checks the token and records the call, so refused calls are recorded too.
        .layer(middleware::from_fn_with_state(gateway.clone(), audit));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .fallback(not_found)
        .with_state(gateway)
}

/// A JSON error body: `{"error": "..."}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A path parameter (`axum`'s `Path`), refused with the API's JSON error when it does not
/// decode.
struct Path<T>(T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(e) => Err(error(e.status(), e.body_text())),
        }
    }
}

/// A query string (`axum`'s `Query`), refused with the API's JSON error when it does not
/// parse.
struct Query<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(e) => Err(error(e.status(), e.body_text())),
        }
    }
}

/// A request body: a JSON object (serde would take an array for a struct, field by field in
/// order, so `[]` would pass as a body of defaults). `Err` is the message of a 400.
fn parse<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, String> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value @ serde_json::Value::Object(_)) => {
            serde_json::from_value(value).map_err(|e| format!("{what}: {e}"))
        }
        Ok(_) => Err(format!("{what}: the body must be a JSON object")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

fn token_ok(gateway: &Gateway, request: &Request) -> bool {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme's case does not matter (RFC 9110, 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start_matches(' '));
    bool::from(presented.as_bytes().ct_eq(gateway.token.as_bytes()))
}

/// Checks the token and records the call. A change (any method but GET and HEAD) is
/// recorded before it runs and refused with 503 if that fails; it then runs to the end even
/// if the client hangs up, and its outcome is recorded. Calls with a bad token are counted
/// (see `Audit::refused`).
/// The largest request body the API takes (axum's default for the handlers too).
const MAX_BODY: usize = 2 << 20;

async fn audit(State(gateway): Shared, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<super::capped::Peer>>()
        .map(|c| c.0.0.to_string());
    if !token_ok(&gateway, &request) {
        // Without the query: a caller without the token may have put a secret there (the
        // token itself, as `?token=`), and the log is no place for it.
        let call = Call::new(
            request.method().as_str(),
            &format!("/api/v1{}", request.uri().path()),
            peer,
        );
        gateway.audit.refused("token", call, 401);
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (it is in the data directory's api-token file)",
        );
    }
    // With the query: `?force=true` is part of what a call asks for.
    let call = Call::new(
        request.method().as_str(),
        &format!(
            "/api/v1{}",
            request
                .uri()
                .path_and_query()
                .map_or("", |path| path.as_str())
        ),
        peer,
    );
    let change = !matches!(*request.method(), Method::GET | Method::HEAD);
    let id = gateway.next_call();
    let (call, request) = if change {
        // What a change asks for is in its body too: read here (as large as the handlers
        // take) for the intent record, and handed on.
        let (parts, body) = request.into_parts();
        let body = match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(body) => body,
            Err(e) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
                // Refused before its intent could be recorded: recorded as refused.
                let status = if too_large { 413 } else { 400 };
                gateway.audit.refused("body", call, status);
                return if too_large {
                    error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the request body is over {MAX_BODY} bytes"),
                    )
                } else {
                    error(StatusCode::BAD_REQUEST, format!("request body: {e}"))
                };
            }
        };
        (
            call.with_request(&body),
            Request::from_parts(parts, axum::body::Body::from(body)),
        )
    } else {
        (call, request)
    };
    if change {
        let (g, c) = (gateway.clone(), call.clone());
        let recorded = tokio::task::spawn_blocking(move || g.audit.intent(id, &c)).await;
        let failure = match recorded {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failure {
            tracing::error!("audit log: {e}; refusing {} {}", call.method, call.path);
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the audit log cannot be written ({e}); changes are refused until it can. Check the disk of the data directory"
                ),
            );
        }
    }
    // Its own task: a client that hangs up cannot stop a change halfway, nor its record.
    let task = tokio::spawn(async move {
        let response = next.run(request).await;
        let status = response.status().as_u16();
        let recorded = tokio::task::spawn_blocking(move || {
            if let Err(e) = gateway.audit.outcome(id, &call, status, change) {
                tracing::error!(
                    "audit log: {e}; the outcome of {} {} is not recorded",
                    call.method,
                    call.path
                );
            }
        });
        let _ = recorded.await;
        response
    });
    match task.await {
        Ok(response) => response,
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(gateway): Shared) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut text, &gateway.registry)
    {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    // Gauges read at scrape time, written by hand: they have no state to keep.
    let health = gateway
        .health
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .reachable;
    let (free, total) = disk_space(gateway.data_dir());
    text += &format!(
        "# HELP firn_uptime_seconds Seconds since the daemon started.\n# TYPE firn_uptime_seconds gauge\nfirn_uptime_seconds {}\n",
        gateway.started.elapsed().as_secs()
    );
    text += &format!(
        "# HELP firn_remote_up Whether the last probe of the object store succeeded.\n# TYPE firn_remote_up gauge\nfirn_remote_up {}\n",
        u8::from(health)
    );
    text += &format!(
        "# HELP firn_local_free_bytes Free bytes on the data directory's file system.\n# TYPE firn_local_free_bytes gauge\nfirn_local_free_bytes {free}\n"
    );
    text += &format!(
        "# HELP firn_local_total_bytes Size of the data directory's file system.\n# TYPE firn_local_total_bytes gauge\nfirn_local_total_bytes {total}\n"
    );
    let cached = gateway.volumes.cached_statuses();
    text += &volume_metrics(&cached);
    text += &gateway_metrics(&cached);
    text += &gateway.nbd_metrics.encode_gateway();
    text += &share_metrics(&gateway.shares);
    // Without the list, nothing is shown and nothing dropped: a volume's counts stay.
    if let Ok(volumes) = gateway.volumes.list() {
        let names: std::collections::HashSet<String> =
            volumes.into_iter().map(|v| v.name).collect();
        text += &gateway
            .nbd_metrics
            .encode_exports(|name| names.contains(name));
    }
    text += "# EOF\n";
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Reads answered from local disk, percent of all (100 before any read).
fn hit_percent(hits: u64, misses: u64) -> f64 {
    match hits + misses {
        0 => 100.0,
        all => hits as f64 * 100.0 / all as f64,
    }
}

/// Each share's cache and upload state, read at scrape time.
fn share_metrics(shares: &crate::engines::share::Shares) -> String {
    type Value = fn(&crate::engines::share::ShareStatus) -> f64;
    let families: [(&str, &str, &str, Value); 9] = [
        (
            "firn_share_cache_hit_percent",
            "gauge",
            "Reads answered from local disk, percent of all reads since the daemon started.",
            |s| hit_percent(s.cache_hits, s.cache_misses),
        ),
        (
            "firn_share_cached_bytes",
            "gauge",
            "Local bytes of the share's files, dirty and clean.",
            |s| s.cached_bytes as f64,
        ),
        (
            "firn_share_cache_misses",
            "counter",
            "Reads that waited for data from the bucket.",
            |s| s.cache_misses as f64,
        ),
        (
            "firn_share_downloaded_bytes",
            "counter",
            "Bytes fetched from the bucket for reads and writes of files not on local disk.",
            |s| s.downloaded_bytes as f64,
        ),
        (
            "firn_share_dirty_files",
            "gauge",
            "Files changed here and not yet in the bucket.",
            |s| s.dirty_files as f64,
        ),
        (
            "firn_share_dirty_bytes",
            "gauge",
            "Local bytes of the files not yet in the bucket (the upload backlog).",
            |s| s.dirty_bytes as f64,
        ),
        (
            "firn_share_pending_deletes",
            "gauge",
            "Objects of removed or moved files still to delete from the bucket.",
            |s| s.pending_deletes as f64,
        ),
        (
            "firn_share_uploaded_files",
            "counter",
            "Files uploaded since the daemon started.",
            |s| s.uploaded_files as f64,
        ),
        (
            "firn_share_uploaded_bytes",
            "counter",
            "Bytes of files uploaded since the daemon started.",
            |s| s.uploaded_bytes as f64,
        ),
    ];
    let statuses: Vec<(String, crate::engines::share::ShareStatus)> = shares
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|info| Some((info.name.clone(), shares.share(&info.name).ok()?.status())))
        .collect();
    let mut text = String::new();
    for (name, kind, help, value) in families {
        text += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        let suffix = if kind == "counter" { "_total" } else { "" };
        for (share, status) in &statuses {
            text += &format!("{name}{suffix}{{share=\"{share}\"}} {}\n", value(status));
        }
    }
    text
}

/// The cached volumes' gauges and counters, named after what Storage Gateway users watch.
fn volume_metrics(volumes: &[(String, crate::engines::volume::cached::CachedStatus)]) -> String {
    type Value = fn(&crate::engines::volume::cached::CachedStatus) -> f64;
    let families: [(&str, &str, &str, Value); 15] = [
        (
            "firn_volume_cache_hit_percent",
            "gauge",
            "Reads answered from local disk, percent of all reads of written data.",
            |s| hit_percent(s.cache_hits, s.cache_misses),
        ),
        (
            "firn_volume_cache_percent_used",
            "gauge",
            "Local bytes of the volume (log and cache), percent of its local space (log_max + cache_max).",
            |s| s.cached_bytes as f64 * 100.0 / (s.log_max + s.cache_max).max(1) as f64,
        ),
        (
            "firn_volume_cache_percent_dirty",
            "gauge",
            "Log bytes not yet in the bucket, percent of log_max.",
            |s| s.dirty_bytes as f64 * 100.0 / s.log_max.max(1) as f64,
        ),
        (
            "firn_volume_cached_bytes",
            "gauge",
            "Local bytes of the volume: its log and read cache.",
            |s| s.cached_bytes as f64,
        ),
        (
            "firn_volume_upload_backlog_bytes",
            "gauge",
            "Log bytes not yet in the bucket.",
            |s| s.dirty_bytes as f64,
        ),
        (
            "firn_volume_uploaded_bytes",
            "counter",
            "Log bytes uploaded since the volume was opened.",
            |s| s.bytes_uploaded as f64,
        ),
        (
            "firn_volume_downloaded_bytes",
            "counter",
            "Bytes read from the bucket since the volume was opened.",
            |s| s.bytes_downloaded as f64,
        ),
        (
            "firn_volume_written_bytes",
            "counter",
            "Bytes clients wrote since the volume was opened.",
            |s| s.bytes_written as f64,
        ),
        (
            "firn_volume_seconds_since_last_recovery_point",
            "gauge",
            "Seconds since the oldest flush the bucket's image does not include yet (0: it includes every flush).",
            |s| s.commit_lag_secs,
        ),
        (
            "firn_volume_queued_writes",
            "gauge",
            "Writes waiting for room in the log.",
            |s| s.queued_writes as f64,
        ),
        (
            "firn_volume_commit",
            "gauge",
            "Number of the newest commit in the bucket.",
            |s| s.commit as f64,
        ),
        (
            "firn_volume_fenced",
            "gauge",
            "1 when another gateway took the volume over (it is read-only here).",
            |s| u8::from(s.fenced.is_some()) as f64,
        ),
        (
            "firn_volume_chunks",
            "gauge",
            "Chunks garbage collection made that are in the bucket.",
            |s| s.chunks as f64,
        ),
        (
            "firn_volume_gc_moved_bytes",
            "counter",
            "Live bytes garbage collection moved into chunks since the volume was opened.",
            |s| s.gc_moved_bytes as f64,
        ),
        (
            "firn_volume_gc_deleted_objects",
            "counter",
            "Objects garbage collection deleted from the bucket since the volume was opened.",
            |s| s.gc_deleted_objects as f64,
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in families {
        text += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (volume, status) in volumes {
            let sample = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            text += &format!("{sample}{{volume=\"{volume}\"}} {}\n", value(status));
        }
    }
    text
}

/// All cached volumes together, as Storage Gateway shows a gateway's figures beside its
/// volumes': `firn_gateway_*` (requests and their latencies come from the NBD door).
fn gateway_metrics(volumes: &[(String, crate::engines::volume::cached::CachedStatus)]) -> String {
    let sum = |value: fn(&crate::engines::volume::cached::CachedStatus) -> u64| -> u64 {
        volumes.iter().map(|(_, s)| value(s)).sum()
    };
    let percent = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            part as f64 * 100.0 / whole as f64
        }
    };
    let families: [(&str, &str, f64); 6] = [
        (
            "firn_gateway_cache_hit_percent",
            "Reads of cached volumes answered from local disk, percent of all reads of written data.",
            hit_percent(sum(|s| s.cache_hits), sum(|s| s.cache_misses)),
        ),
        (
            "firn_gateway_cache_percent_used",
            "Local bytes of all cached volumes (logs and caches), percent of their local space (log_max + cache_max) together.",
            percent(sum(|s| s.cached_bytes), sum(|s| s.log_max + s.cache_max)),
        ),
        (
            "firn_gateway_cache_percent_dirty",
            "Log bytes of all cached volumes not yet in the bucket, percent of their log_max together.",
            percent(sum(|s| s.dirty_bytes), sum(|s| s.log_max)),
        ),
        (
            "firn_gateway_upload_backlog_bytes",
            "Log bytes of all cached volumes not yet in the bucket.",
            sum(|s| s.dirty_bytes) as f64,
        ),
        (
            "firn_gateway_queued_writes",
            "Writes to cached volumes waiting for room in their logs.",
            sum(|s| s.queued_writes) as f64,
        ),
        (
            "firn_gateway_seconds_since_last_recovery_point",
            "The largest firn_volume_seconds_since_last_recovery_point of the cached volumes.",
            volumes
                .iter()
                .map(|(_, s)| s.commit_lag_secs)
                .fold(0.0, f64::max),
        ),
    ];
    let mut text = String::new();
    for (name, help, value) in families {
        text += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
    }
    text
}

async fn status(State(gateway): Shared) -> Json<Status> {
    Json(Status::of(&gateway).await)
}

async fn get_bandwidth(State(gateway): Shared) -> Json<Policy> {
    Json(gateway.remote.limiter.policy())
}

async fn put_bandwidth(State(gateway): Shared, body: axum::body::Bytes) -> Response {
    match parse::<Policy>("bandwidth policy", &body) {
        Ok(policy) => {
            gateway.remote.limiter.set_policy(policy.clone());
            tracing::info!(?policy, "bandwidth policy changed");
            Json(policy).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// `POST /api/v1/volumes`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolume {
    name: String,
    size: ByteSize,
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default)]
    read_only: bool,
    /// Address blocks whose NBD clients may attach, instead of `[nbd] allow`.
    #[serde(default)]
    allow: Vec<String>,
    /// TLS identities (PSK identity or certificate common name) that may attach.
    #[serde(default)]
    clients: Vec<String>,
    /// A cached volume's own `log_max` and `cache_max`, instead of `[volumes]`'.
    #[serde(default)]
    log_max: Option<ByteSize>,
    #[serde(default)]
    cache_max: Option<ByteSize>,
}

fn limits(log_max: Option<ByteSize>, cache_max: Option<ByteSize>) -> Limits {
    Limits {
        log_max: log_max.map(|b| b.0),
        cache_max: cache_max.map(|b| b.0),
    }
}

fn default_mode() -> Mode {
    Mode::Cached
}

#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    /// List the cached volumes in the bucket that this gateway does not serve instead.
    #[serde(default)]
    bucket: bool,
}

async fn list_volumes(State(gateway): Shared, Query(query): Query<ListQuery>) -> Response {
    if query.bucket {
        let volumes = gateway.volumes.clone();
        return match tokio::task::spawn_blocking(move || volumes.bucket_volumes()).await {
            Ok(Ok(found)) => Json(found).into_response(),
            // The bucket did not answer: try again later.
            Ok(Err(e)) if e.bucket_unavailable() => {
                error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, e.to_string()),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    }
    match gateway.volumes.list() {
        Ok(volumes) => Json(
            volumes
                .into_iter()
                .map(|info| gateway.volumes.as_served(info))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /api/v1/volumes/{name}/resize`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    size: ByteSize,
}

async fn resize_volume(
    State(gateway): Shared,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: Resize = match parse("resize", &body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let volumes = gateway.volumes.clone();
    change_volume(move || volumes.resize(&name, request.size.0)).await
}

/// The answer to a change of an existing volume made by `change` (on a blocking thread): the
/// volume as it now is, 404 for a volume that does not exist, 400 for a change refused.
async fn change_volume(
    change: impl FnOnce() -> Result<
        crate::engines::volume::catalog::VolumeInfo,
        crate::engines::volume::catalog::CatalogError,
    > + Send
    + 'static,
) -> Response {
    match tokio::task::spawn_blocking(change).await {
        Ok(Ok(info)) => Json(info).into_response(),
        Ok(Err(e @ crate::engines::volume::catalog::CatalogError::NotFound { .. })) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        // As at create: a larger log_max whose room the disk has not.
        Ok(Err(e @ crate::engines::volume::catalog::CatalogError::NoSpace { .. })) => {
            error(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /api/v1/volumes/{name}/limits`: `{"log_max": SIZE, "cache_max": SIZE}`, either
/// left out to keep it, or `"default"` for `[volumes]`' again.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLimits {
    #[serde(default, deserialize_with = "limit_change")]
    log_max: Option<Option<u64>>,
    #[serde(default, deserialize_with = "limit_change")]
    cache_max: Option<Option<u64>>,
}

/// A size, or `"default"` (`None`); the field's absence is the outer `None`.
fn limit_change<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    use serde::Deserialize;
    let value = serde_json::Value::deserialize(d)?;
    if value.as_str() == Some("default") {
        return Ok(Some(None));
    }
    ByteSize::deserialize(value)
        .map(|size| Some(Some(size.0)))
        .map_err(serde::de::Error::custom)
}

async fn set_volume_limits(
    State(gateway): Shared,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: SetLimits = match parse("limits", &body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let volumes = gateway.volumes.clone();
    change_volume(move || volumes.set_limits(&name, request.log_max, request.cache_max)).await
}

/// `POST /api/v1/volumes/{name}/takeover`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeOver {
    #[serde(default)]
    force: bool,
    /// Which of several volumes of the name in the bucket (`volume list --bucket` shows ids).
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    log_max: Option<ByteSize>,
    #[serde(default)]
    cache_max: Option<ByteSize>,
}

async fn take_over_volume(
    State(gateway): Shared,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: TakeOver = if body.is_empty() {
        TakeOver::default()
    } else {
        match parse("takeover", &body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        }
    };
    let honoured = matches!(
        *gateway
            .conditional_create
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        crate::daemon::status::ConditionalCreate::Honoured
    );
    let volumes = gateway.volumes.clone();
    let taken = tokio::task::spawn_blocking(move || {
        let limits = limits(request.log_max, request.cache_max);
        volumes.take_over(
            &name,
            request.id.as_deref(),
            limits,
            honoured,
            request.force,
        )
    })
    .await;
    match taken {
        Ok(Ok(info)) => (StatusCode::CREATED, Json(info)).into_response(),
        Ok(Err(
            e @ (crate::engines::volume::catalog::CatalogError::NotFound { .. }
            | crate::engines::volume::catalog::CatalogError::NoSuchId { .. }
            | crate::engines::volume::catalog::CatalogError::NotFoundUnreadable { .. }),
        )) => error(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(e @ crate::engines::volume::catalog::CatalogError::Exists { .. })) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(e @ crate::engines::volume::catalog::CatalogError::NoSpace { .. })) => {
            error(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        Ok(Err(e @ crate::engines::volume::catalog::CatalogError::InvalidLimits { .. })) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        // The bucket did not answer: nothing is in the way, try again later.
        Ok(Err(e)) if e.bucket_unavailable() => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn create_volume(State(gateway): Shared, body: axum::body::Bytes) -> Response {
    let request: CreateVolume = match parse("volume", &body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    for block in &request.allow {
        let checked = crate::daemon::config::Cidr::parse(block)
            .and_then(|cidr| gateway.exports.check_volume_allow(&cidr));
        if let Err(e) = checked {
            return error(
                StatusCode::BAD_REQUEST,
                format!("volume allow {block:?}: {e}"),
            );
        }
    }
    for client in &request.clients {
        if let Err(e) = crate::daemon::nbd::check_identity(client) {
            return error(StatusCode::BAD_REQUEST, format!("volume clients: {e}"));
        }
    }
    let volumes = gateway.volumes.clone();
    let created = tokio::task::spawn_blocking(move || {
        let options = VolumeOptions {
            read_only: request.read_only,
            allow: request.allow,
            clients: request.clients,
            limits: limits(request.log_max, request.cache_max),
        };
        volumes.create_with(&request.name, request.size.0, request.mode, options)
    })
    .await;
    match created {
        Ok(Ok(info)) => (StatusCode::CREATED, Json(info)).into_response(),
        Ok(Err(e @ crate::engines::volume::catalog::CatalogError::NoSpace { .. })) => {
            error(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        // As for shares: the name is taken (or being taken).
        Ok(Err(
            e @ (crate::engines::volume::catalog::CatalogError::Exists { .. }
            | crate::engines::volume::catalog::CatalogError::NameBusy { .. }),
        )) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn show_volume(State(gateway): Shared, Path(name): Path<String>) -> Response {
    match gateway.volumes.get(&name) {
        Ok(Some(info)) => {
            let info = gateway.volumes.as_served(info);
            let mut shown = serde_json::to_value(&info).unwrap_or_default();
            if let Some(status) = gateway.volumes.cached_status(&name) {
                shown["cache"] = serde_json::to_value(status).unwrap_or_default();
            } else if let Some(e) = gateway.volumes.open_error(&name) {
                // Not open: it uploads nothing and serves no client until this is mended.
                shown["error"] = format!("cannot open the volume: {e}").into();
            }
            let clients = gateway.exports.clients(&info);
            // A client between its open and its first request holds the volume but is not
            // listed yet; either way the volume is attached.
            let attached = !clients.is_empty() || gateway.volumes.in_use(&name).unwrap_or(false);
            shown["attached"] = attached.into();
            // Not "clients": that is the volume's list of admitted identities.
            shown["connections"] = serde_json::to_value(clients).unwrap_or_default();
            Json(shown).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no volume named {name:?}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, serde::Deserialize)]
struct DeleteQuery {
    /// Delete although clients are attached: their requests fail from then on.
    #[serde(default)]
    force: bool,
}

async fn delete_volume(
    State(gateway): Shared,
    Path(name): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Response {
    if !query.force && gateway.volumes.in_use(&name).unwrap_or(false) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "volume {name:?} is attached by an NBD client; disconnect it first, or delete with --force"
            ),
        );
    }
    match gateway.volumes.get(&name) {
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no volume named {name:?}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    let volumes = gateway.volumes.clone();
    let deleted = tokio::task::spawn_blocking(move || volumes.delete(&name)).await;
    match deleted {
        Ok(Ok(info)) => {
            gateway.nbd_metrics.forget_export(&info.name);
            StatusCode::NO_CONTENT.into_response()
        }
        // Deleted by a call that raced this one.
        Ok(Err(e @ crate::engines::volume::catalog::CatalogError::NotFound { .. })) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateShare {
    name: String,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    bucket: Option<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    squash: crate::engines::share::Squash,
}

fn share_error(e: &crate::engines::share::ShareError) -> Response {
    use crate::engines::share::ShareError;
    let status = match e {
        ShareError::NoShare(_) => StatusCode::NOT_FOUND,
        ShareError::ShareExists(_) => StatusCode::CONFLICT,
        // A path that names a file where a directory is wanted, or nothing.
        ShareError::Invalid(_) | ShareError::NotDir => StatusCode::BAD_REQUEST,
        ShareError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn list_shares(State(gateway): Shared) -> Response {
    match gateway.shares.list() {
        Ok(shares) => Json(shares).into_response(),
        Err(e) => share_error(&e),
    }
}

async fn create_share(State(gateway): Shared, body: axum::body::Bytes) -> Response {
    let request: CreateShare = match parse("share", &body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    for block in &request.allow {
        if let Err(e) = crate::daemon::config::Cidr::parse(block) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("share allow {block:?}: {e}"),
            );
        }
    }
    // The default prefix is the share's name: its files are `<name>/<path>`.
    let prefix = request
        .prefix
        .unwrap_or_else(|| format!("{}/", request.name));
    let shares = gateway.shares.clone();
    let created = tokio::task::spawn_blocking(move || {
        shares.create_in(
            &request.name,
            request.bucket.as_deref(),
            &prefix,
            request.read_only,
            request.allow,
            request.squash,
        )
    })
    .await;
    match created {
        Ok(Ok(info)) => (StatusCode::CREATED, Json(info)).into_response(),
        Ok(Err(e)) => share_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn show_share(State(gateway): Shared, Path(name): Path<String>) -> Response {
    match gateway.shares.share(&name) {
        Ok(share) => {
            let mut shown = serde_json::to_value(share.info()).unwrap_or_default();
            let status = tokio::task::spawn_blocking(move || share.status()).await;
            if let Ok(status) = status {
                shown["status"] = serde_json::to_value(status).unwrap_or_default();
            }
            Json(shown).into_response()
        }
        Err(e) => share_error(&e),
    }
}

async fn delete_share(
    State(gateway): Shared,
    Path(name): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Response {
    let share = match gateway.shares.share(&name) {
        Ok(share) => share,
        Err(e) => return share_error(&e),
    };
    let dirty = share.status().dirty_files;
    if dirty > 0 && !query.force {
        return error(
            StatusCode::CONFLICT,
            format!(
                "share {name:?} has {dirty} file(s) not yet in the bucket, which deleting it would lose; wait for the upload, or delete with --force"
            ),
        );
    }
    let shares = gateway.shares.clone();
    match tokio::task::spawn_blocking(move || shares.delete(&name)).await {
        Ok(Ok(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => share_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, serde::Deserialize)]
struct UploadsQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

/// The files that reached the bucket, oldest first: poll with `?after=<last seq seen>`.
async fn share_uploads(
    State(gateway): Shared,
    Path(name): Path<String>,
    Query(query): Query<UploadsQuery>,
) -> Response {
    match gateway.shares.share(&name) {
        Ok(share) => Json(share.uploads(query.after, query.limit.unwrap_or(1000).min(10_000)))
            .into_response(),
        Err(e) => share_error(&e),
    }
}

/// The same records as a stream (Server-Sent Events, `text/event-stream`): one `uploaded`
/// event per file as it reaches the bucket, its `id` the sequence number, its data the record
/// as JSON. From `?after=<seq>`, or the `Last-Event-ID` a reconnecting client sends. When
/// uploads the client asked for are no longer remembered, a `lost` event (`{"after",
/// "oldest"}`) says so first. A comment every 15 s keeps idle connections open; the stream
/// ends when the share is deleted.
async fn share_events(
    State(gateway): Shared,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    Query(query): Query<UploadsQuery>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    let share = match gateway.shares.share(&name) {
        Ok(share) => share,
        Err(e) => return share_error(&e),
    };
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .unwrap_or(query.after);
    let newest = share.watch_uploads();
    let share = Arc::downgrade(&share);
    let mut lost_checked = false;
    let batches = futures::stream::unfold(
        (share, newest, after),
        move |(share, mut newest, mut after)| {
            let check_lost = !std::mem::replace(&mut lost_checked, true);
            async move {
                loop {
                    let batch = {
                        let share = share.upgrade()?;
                        let mut events = Vec::new();
                        if check_lost && let Some(oldest) = share.missed_uploads(after) {
                            events.push(
                                Event::default()
                                    .event("lost")
                                    .data(json!({ "after": after, "oldest": oldest }).to_string()),
                            );
                        }
                        for record in share.uploads(after, 256) {
                            after = record.seq;
                            events.push(
                                Event::default()
                                    .id(record.seq.to_string())
                                    .event("uploaded")
                                    .data(serde_json::to_string(&record).unwrap_or_default()),
                            );
                        }
                        events
                    };
                    if !batch.is_empty() {
                        return Some((batch, (share, newest, after)));
                    }
                    // Seen before the uploads were read: nothing newer slips between.
                    newest.changed().await.ok()?;
                }
            }
        },
    );
    let events = batches.flat_map(|batch| {
        futures::stream::iter(batch.into_iter().map(Ok::<_, std::convert::Infallible>))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response()
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshShare {
    #[serde(default)]
    path: String,
}

/// Brings the share in line with the bucket now (`{"path": "a/b"}` for one directory).
async fn refresh_share(
    State(gateway): Shared,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: RefreshShare = if body.is_empty() {
        RefreshShare::default()
    } else {
        match parse("refresh", &body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        }
    };
    let share = match gateway.shares.share(&name) {
        Ok(share) => share,
        Err(e) => return share_error(&e),
    };
    match tokio::task::spawn_blocking(move || share.refresh(&request.path)).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(crate::engines::share::ShareError::NotFound)) => {
            error(StatusCode::NOT_FOUND, "no such directory in the share")
        }
        Ok(Err(e)) => share_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
