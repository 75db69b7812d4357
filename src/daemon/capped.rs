//! The HTTP door: its listener, with a bound on connections open at once, and the server
//! loop. Past the bound, new connections wait in the kernel's backlog until one closes: a
//! local process that opens thousands of idle connections cannot take the daemon's file
//! descriptors, which its volumes' logs, leases and uploads need. A connection that takes
//! longer than `HEAD_TIMEOUT` to send a request's head (or sits that long idle between
//! requests) is closed, and so is one that reads nothing of its answers for `SEND_TIMEOUT`
//! (its send buffer full): neither silent, trickling nor non-reading clients can keep the API
//! from others for long. (`axum::serve` sets no such timeouts, hence this loop.)

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// HTTP connections open at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client has to send a request's head, from the moment the server waits for it
/// (a kept-alive connection's wait for its next request counts too).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an answer may wait on a client that reads none of it.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Capped {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

impl Capped {
    pub fn new(listener: TcpListener, max: usize) -> Capped {
        Capped {
            listener,
            permits: Arc::new(Semaphore::new(max)),
        }
    }

    /// The next connection, once it has a place under the bound.
    async fn accept(&mut self) -> (Stream, SocketAddr) {
        let place = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    return (
                        Stream {
                            stream,
                            _place: place,
                            stalled: None,
                        },
                        addr,
                    );
                }
                // Out of descriptors or the like: the connection waits, the daemon goes on.
                Err(e) => {
                    tracing::warn!("HTTP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A client's address, as handlers see it (`ConnectInfo<Peer>`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Serves `app` (HTTP/1.1) on `listener` until `stop`; then takes no new connection and
/// waits for the requests under way (the caller bounds that wait).
pub async fn serve(mut listener: Capped, app: axum::Router, stop: impl Future<Output = ()>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(Peer(addr)));
                tower_service::Service::call(&mut app.clone(), request)
            },
        );
        let connection =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(client = %addr, "HTTP connection: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection, holding its place under the bound until it closes.
pub struct Stream {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
    /// Runs out `SEND_TIMEOUT` after a write found the client reading nothing (its buffers
    /// full), unless a write goes through meanwhile.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream {
    /// What a write that went through (`done`) or found the client's buffers full
    /// (`Pending`) returns: a stall of `SEND_TIMEOUT` ends the connection.
    fn stall_or<T>(
        &mut self,
        cx: &mut Context<'_>,
        done: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if done.is_ready() {
            self.stalled = None;
            return done;
        }
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(SEND_TIMEOUT)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing of its answer for 30 s",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.stall_or(cx, done)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.stall_or(cx, done)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
