//! The HTTP client under the S3 backend: hyper (HTTP/1.1, over rustls for `https`, through
//! the proxy that `HTTPS_PROXY`, `HTTP_PROXY` or `ALL_PROXY` names unless `NO_PROXY` exempts
//! the host), with the bandwidth limiter in every request and response body, and the timeout
//! and TCP settings firn needs.
//!
//! It is hyper rather than reqwest (object_store's own client) for one socket option.
//! Stores that leave Nagle's algorithm on (Garage; Ceph RGW's beast front end by default)
//! send a response's head and a small body as two segments, the second held until the first
//! is acknowledged. A client that sent its request moments after its last answer is in the
//! kernel's interactive mode and delays that acknowledgement by up to 40 ms. So every small
//! ranged GET (a 4 KiB frame of a cold volume, a small file of a share) took 44 ms on a
//! reused connection against Garage on loopback, where it takes 2 ms on a fresh one; with 16
//! in flight, a cold volume served about 370 random 4 KiB reads a second. `TCP_QUICKACK`
//! after every read acknowledges what arrived at once. reqwest has no hook to reach its
//! sockets; hyper's connector is a service this module wraps.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse,
    HttpResponseBody, HttpService,
};
use tokio::net::TcpStream;

use super::limit::{Direction, Limiter, Throttled};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// object_store's HTTP client, with the bandwidth limiter in every request and response body.
/// It is built here rather than from object_store's `ClientOptions` because a throttled body
/// can take longer than any fixed request timeout: the timeout applies to each wait on the
/// store instead.
#[derive(Debug)]
pub(super) struct LimitedConnector {
    pub limiter: Arc<Limiter>,
    /// How long a request may wait for its answer's head, and a body for its next bytes.
    pub read_timeout: Duration,
}

impl object_store::client::HttpConnector for LimitedConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        // `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`, as curl reads them.
        let proxies = Arc::new(Matcher::from_env());
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false); // the TLS layer above takes `https`
        tcp.set_connect_timeout(Some(Duration::from_secs(5)));
        tcp.set_nodelay(true);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?
            .https_or_http()
            // HTTP/1.1 only, as object_store's own client does: S3 endpoints speak nothing else.
            .enable_http1()
            .wrap_connector(QuickAckConnector {
                direct: tcp,
                proxies: proxies.clone(),
            });
        let client = Client::builder(TokioExecutor::new()).build(tls);
        Ok(HttpClient::new(LimitedHttp {
            client,
            proxies,
            limiter: self.limiter.clone(),
            read_timeout: self.read_timeout,
        }))
    }
}

type Connector = hyper_rustls::HttpsConnector<QuickAckConnector>;
type RequestBody = Moving<Throttled<HttpRequestBody>>;

struct LimitedHttp {
    client: Client<Connector, RequestBody>,
    proxies: Arc<Matcher>,
    limiter: Arc<Limiter>,
    read_timeout: Duration,
}

impl std::fmt::Debug for LimitedHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedHttp")
            .field("read_timeout", &self.read_timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl HttpService for LimitedHttp {
    async fn call(&self, request: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        let (mut parts, body) = request.into_parts();
        // Object data is charged: PUT bodies (objects and parts) and GET answers other than
        // listings. Listings, HEADs and multipart bookkeeping pass free, so health probes and
        // listings still answer while a direction is paused.
        let listing = parts.uri.query().is_some_and(|q| q.contains("list-type"));
        let charge_up = (parts.method == http::Method::PUT).then(|| self.limiter.clone());
        let charge_down =
            (parts.method == http::Method::GET && !listing).then(|| self.limiter.clone());
        // While a direction is paused its requests wait here, unsent: sent, a PUT would stall
        // mid-body and a GET mid-answer, each until the store or the read timeout ends it.
        // Closed (the gateway stopping), the request goes, as its body's slices do.
        if let Some(limiter) = &charge_up {
            limiter.wait_open(Direction::Upload).await;
        }
        if let Some(limiter) = &charge_down {
            limiter.wait_open(Direction::Download).await;
        }
        // A plain-HTTP request through a proxy carries the proxy's credentials itself; an
        // `https` one goes through a CONNECT tunnel that carried them (`QuickAckConnector`).
        if parts.uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some(auth) = self
                .proxies
                .intercept(&parts.uri)
                .and_then(|proxy| proxy.basic_auth().cloned())
        {
            parts
                .headers
                .insert(http::header::PROXY_AUTHORIZATION, auth);
        }
        let progress = Arc::new(Progress::new());
        let body = Moving {
            inner: Throttled::new(body, charge_up, Direction::Upload),
            progress: progress.clone(),
        };
        let outgoing = http::Request::from_parts(parts, body);
        let response = answer(self.client.request(outgoing), &progress, self.read_timeout)
            .await?
            .map_err(client_error)?;
        let (parts, body) = response.into_parts();
        let body = ReadTimeout::new(body.map_err(hyper_error), self.read_timeout);
        let body = Throttled::new(body, charge_down, Direction::Download);
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// `request`'s answer, failed once the store has kept the request waiting for `limit`: the
/// request's body has not moved on (the store takes no more of it) or, once it is sent, no
/// answer came. A body held back by the bandwidth limit is not the store's wait, so a
/// throttled upload may take as long as its rate makes it.
async fn answer<F: Future>(
    request: F,
    progress: &Progress,
    limit: Duration,
) -> Result<F::Output, HttpError> {
    tokio::pin!(request);
    loop {
        let deadline = progress.store_waited_since().map(|since| since + limit);
        let sleep = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                // Held back by the limiter: look again within the limit.
                None => tokio::time::sleep(limit).await,
            }
        };
        tokio::select! {
            answered = &mut request => return Ok(answered),
            () = sleep => {
                if progress
                    .store_waited_since()
                    .is_some_and(|since| since.elapsed() >= limit)
                {
                    return Err(timed_out("no answer"));
                }
            }
        }
    }
}

/// Where a request's body stands: when it last handed bytes on, and whether it is waiting
/// on itself (the bandwidth limiter) rather than on the store.
struct Progress(std::sync::Mutex<(tokio::time::Instant, bool)>);

impl Progress {
    fn new() -> Self {
        Progress(std::sync::Mutex::new((tokio::time::Instant::now(), false)))
    }

    /// Since when the request has waited on the store; `None` while its body waits on itself.
    fn store_waited_since(&self) -> Option<tokio::time::Instant> {
        let (moved, held) = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        (!held).then_some(moved)
    }

    fn mark(&self, held: bool) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (tokio::time::Instant::now(), held);
    }
}

/// A request body that tells its [`Progress`].
struct Moving<B> {
    inner: B,
    progress: Arc<Progress>,
}

impl<B> http_body::Body for Moving<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.progress.mark(polled.is_pending());
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn timed_out(what: &str) -> HttpError {
    HttpError::new(
        HttpErrorKind::Timeout,
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} within the read timeout"),
        ),
    )
}

/// What object_store's retries need to know about a request that failed before its answer.
fn client_error(e: hyper_util::client::legacy::Error) -> HttpError {
    if e.is_connect() {
        return HttpError::new(HttpErrorKind::Connect, e);
    }
    let kind = io_kind(&e).unwrap_or(HttpErrorKind::Request);
    HttpError::new(kind, e)
}

/// ... and about a body that failed on its way in.
fn hyper_error(e: hyper::Error) -> HttpError {
    let kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_incomplete_message() {
        HttpErrorKind::Interrupted
    } else if e.is_parse() {
        HttpErrorKind::Decode
    } else {
        io_kind(&e).unwrap_or(HttpErrorKind::Request)
    };
    HttpError::new(kind, e)
}

/// The kind an I/O error down the chain of `e` gives, if one does.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<HttpErrorKind> {
    let mut source = Some(e);
    let mut kind = None;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::TimedOut => kind = Some(HttpErrorKind::Timeout),
                K::ConnectionAborted | K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof => {
                    kind = Some(HttpErrorKind::Interrupted)
                }
                _ => {}
            }
        }
        source = s.source();
    }
    kind
}

/// A response body that fails when its next bytes take longer than `limit`.
struct ReadTimeout<B> {
    inner: B,
    limit: Duration,
    /// `Mutex` only to make the body `Sync` (object_store asks for it); never contended.
    sleep: std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl<B> ReadTimeout<B> {
    fn new(inner: B, limit: Duration) -> Self {
        ReadTimeout {
            inner,
            limit,
            sleep: std::sync::Mutex::new(None),
        }
    }
}

impl<B> http_body::Body for ReadTimeout<B>
where
    B: http_body::Body<Data = Bytes, Error = HttpError> + Unpin,
{
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        let this = self.get_mut();
        let sleep = this.sleep.get_mut().unwrap_or_else(|e| e.into_inner());
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                *sleep = None;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let limit = this.limit;
                let timer = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(timed_out("no more of the body")))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// hyper's TCP connector, through the proxy the environment names for a destination (a
/// CONNECT tunnel for `https`, the proxy itself for plain HTTP), its connections wrapped in
/// [`QuickAck`].
#[derive(Clone)]
struct QuickAckConnector {
    direct: HttpConnector,
    proxies: Arc<Matcher>,
}

impl tower_service::Service<http::Uri> for QuickAckConnector {
    type Response = QuickAck;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAck, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let mut direct = self.direct.clone();
        let proxy = self.proxies.intercept(&uri);
        Box::pin(async move {
            let Some(proxy) = proxy else {
                return Ok(QuickAck::new(direct.call(uri).await?, false));
            };
            if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), direct);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                return Ok(QuickAck::new(tunnel.call(uri).await?, false));
            }
            // Plain HTTP: requests go to the proxy in absolute form.
            Ok(QuickAck::new(direct.call(proxy.uri().clone()).await?, true))
        })
    }
}

/// A connection that acknowledges at once whatever it reads (see the module's note).
struct QuickAck {
    io: TokioIo<TcpStream>,
    /// To a plain-HTTP proxy, which takes requests in absolute form.
    proxied: bool,
}

impl QuickAck {
    fn new(io: TokioIo<TcpStream>, proxied: bool) -> Self {
        QuickAck { io, proxied }
    }
}

impl hyper::rt::Read for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if read.is_ready() {
            // Not permanent: the kernel goes back to delaying once the connection looks
            // interactive again, so it is set after every read. A failure only costs time.
            let _ = socket2::SockRef::from(self.io.inner()).set_tcp_quickack(true);
        }
        read
    }
}

impl hyper::rt::Write for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connection for QuickAck {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}
