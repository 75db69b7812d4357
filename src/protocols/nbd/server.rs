//! Negotiation and transmission for one NBD connection, and the accept loops.
//!
//! Each connection has a reader (parses requests, reads write payloads), a task per request
//! (runs it on a blocking thread; replies may go out of order, matched by cookie) and a
//! writer (sends replies in the order they finish). Memory per connection is bounded by a
//! byte budget that a request holds from its header until its reply is written to the
//! socket; anything malformed ends that connection and nothing else.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::NbdMetrics;
use super::metrics::{ExportOps, Op, Refusal};
use super::proto::*;
use crate::engines::volume::{BlockDevice, BlockError, Extent};

/// Largest READ or WRITE payload; advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests of one connection running at once. More threads than this only queue on the file
/// system's per-file locks (measured: 4 KiB random writes fall as this grows past a few).
const WORKERS_PER_CONNECTION: usize = 16;
/// Reads of one connection waiting for the bucket at once (data only the bucket holds). They
/// wait apart from the workers, so that writes, flushes and reads of local data go on while
/// the bucket is slow or away.
const BUCKET_READS_PER_CONNECTION: usize = 16;
/// Reads at least this long are answered with holes as OFFSET_HOLE chunks.
const SPARSE_READ_MIN: usize = 64 << 10;
/// Bytes a connection's requests may hold, in KiB: payloads, and replies until they are
/// written to the socket. Room for two maximum-size reads with their chunk headers. A client
/// that never reads its socket stops being read from once this is spent.
const IN_FLIGHT_BUDGET_KIB: usize = ((2 * MAX_PAYLOAD as usize) >> 10) + 1024;
/// Extents in one block status reply (8 bytes each); clients ask again for the rest.
const MAX_STATUS_DESCRIPTORS: usize = 8192;
/// An option longer than this is not a mistake but an attack; the connection ends.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// After shutdown begins, how long a quiet connection is kept for a client's last requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Payload and reply buffers of at least this size are reused (see [`Buffers`]).
const POOLED_MIN: usize = 64 << 10;
/// ... and of at most this size; larger ones are rare enough to allocate.
const POOLED_MAX: usize = (4 << 20) + 64;
/// Free buffers kept server-wide: at most this many, so at most 128 MiB.
const POOLED_COUNT: usize = 32;

/// Reused buffers for large payloads and replies. Allocating a fresh megabyte per request
/// costs more than the request: the allocator maps it, the kernel faults in and zeroes every
/// page, and freeing unmaps it again (measured: 12% of the CPU time of 1 MiB writes).
struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
}

static BUFFERS: Buffers = Buffers {
    free: Mutex::new(Vec::new()),
};

impl Buffers {
    /// An empty buffer with room for `capacity` bytes.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let mut buffer = self.reuse(capacity);
        buffer.clear();
        buffer.reserve_exact(capacity);
        buffer
    }

    /// A buffer of exactly `len` bytes, for a caller that overwrites every one of them: they
    /// hold an earlier request's bytes, which spares zeroing a megabyte per read (9% of the
    /// CPU time of 1 MiB reads). `BlockDevice::read` fills its whole buffer.
    fn take_filled(&self, len: usize) -> Vec<u8> {
        let mut buffer = self.reuse(len);
        if buffer.len() >= len {
            buffer.truncate(len);
        } else {
            buffer.resize(len, 0);
        }
        buffer
    }

    fn reuse(&self, capacity: usize) -> Vec<u8> {
        if !(POOLED_MIN..=POOLED_MAX).contains(&capacity) {
            return Vec::with_capacity(capacity);
        }
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        reused.unwrap_or_default()
    }

    /// Hands a buffer back once its bytes are used.
    fn give(&self, buffer: Vec<u8>) {
        if !(POOLED_MIN..=POOLED_MAX).contains(&buffer.capacity()) {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < POOLED_COUNT {
            free.push(buffer);
        }
    }
}

/// Who is connecting.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix,
}

/// Who is connecting, and under which TLS identity (a PSK identity or the common name of a
/// client certificate), once TLS has named one.
#[derive(Debug, Clone)]
pub struct Client {
    pub peer: Peer,
    pub identity: Option<String>,
}

/// Where the PSK server callback leaves the identity it found a key for, so the connection
/// can learn who it serves after the handshake.
pub fn psk_identity_slot()
-> Result<openssl::ex_data::Index<openssl::ssl::Ssl, String>, openssl::error::ErrorStack> {
    static SLOT: std::sync::OnceLock<openssl::ex_data::Index<openssl::ssl::Ssl, String>> =
        std::sync::OnceLock::new();
    if let Some(slot) = SLOT.get() {
        return Ok(*slot);
    }
    let slot = openssl::ssl::Ssl::new_ex_index()?;
    // A racing caller may have set it first; either index works, and the first one stays.
    Ok(*SLOT.get_or_init(|| slot))
}

/// The common name of a client certificate's subject.
fn certificate_name(der: &[u8]) -> Option<String> {
    let cert = openssl::x509::X509::from_der(der).ok()?;
    let entry = cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()?;
    entry.data().to_string().ok()
}

/// A client in transmission on an export, as the server tells [`Exports::attach`].
#[derive(Debug, Clone)]
pub struct Attachment {
    pub client: Client,
    /// Whether the connection runs over TLS.
    pub tls: bool,
    /// When transmission began.
    pub since: SystemTime,
    /// The NBD_FLAG_C_* bits the client sent in its handshake.
    pub handshake_flags: u32,
    /// Whether it negotiated structured replies.
    pub structured_replies: bool,
}

#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no export named {0:?}")]
    Unknown(String),
    #[error("{0}")]
    Denied(String),
    #[error("export {name:?} cannot be opened: {message}")]
    Failed { name: String, message: String },
}

/// Where the server finds its exports; the daemon implements it over the volume catalog.
pub trait Exports: Send + Sync {
    /// The exports `client` may open; no other export is shown to it.
    fn list(&self, client: &Client) -> Vec<ExportInfo>;
    fn open(&self, name: &str, client: &Client) -> Result<Arc<dyn BlockDevice>, OpenError>;
    /// Whether `peer` may open any export at all (or could, once one is made for it); a peer
    /// that may not is refused as it connects, before it costs more than the accept.
    fn admits(&self, peer: &Peer) -> bool;
    /// A client begins transmission on the export `name` (opened for it just before); what
    /// this returns is dropped when the connection ends, so an implementation can keep a list
    /// of who is attached.
    fn attach(&self, _name: &str, _attachment: Attachment) -> Box<dyn std::any::Any + Send + Sync> {
        Box::new(())
    }
}

/// What one client can hold of the server: connections and time.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once, both sockets together.
    pub max_connections: usize,
    /// TCP connections open at once from one address.
    pub max_connections_per_address: usize,
    /// From accept to the end of option haggling, the TLS handshake included.
    pub negotiation_timeout: Duration,
    /// Bytes of requests and replies in flight, all connections together; at least twice a
    /// connection's own budget, so one request always fits.
    pub memory: usize,
    /// How long a reply may wait for the client to take any of it before the connection is
    /// closed (and its share of `memory` given back); as is one whose write payload has not
    /// all arrived this long after its header.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 128,
            max_connections_per_address: 32,
            negotiation_timeout: Duration::from_secs(10),
            memory: 1 << 30,
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// The least `Limits::memory` may be: two connections' budgets.
pub const MIN_MEMORY: usize = 2 * (IN_FLIGHT_BUDGET_KIB << 10);

/// Connections open now, in total and by TCP address.
#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One connection's place in [`Open`], given back when dropped.
struct Slot {
    server: Arc<NbdServer>,
    address: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .server
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total -= 1;
        if let Some(address) = self.address
            && let Some(count) = open.by_address.get_mut(&address)
        {
            *count -= 1;
            if *count == 0 {
                open.by_address.remove(&address);
            }
        }
    }
}

pub struct NbdServer {
    exports: Arc<dyn Exports>,
    shutdown: watch::Receiver<bool>,
    /// When set, clients must upgrade with NBD_OPT_STARTTLS before anything else.
    tls: Option<TlsAcceptor>,
    metrics: Arc<NbdMetrics>,
    limits: Limits,
    /// `limits.memory`, in KiB: taken with a connection's own budget, given back with it.
    memory: Arc<Semaphore>,
    open: Mutex<Open>,
    /// Every connection holds a clone; `drained` reports when the last one is gone.
    alive: Mutex<Option<mpsc::Sender<()>>>,
    drained: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

/// How NBD_OPT_STARTTLS upgrades a connection.
#[derive(Clone)]
pub enum TlsAcceptor {
    /// Certificates, with rustls.
    X509(tokio_rustls::TlsAcceptor),
    /// Pre-shared keys, with OpenSSL: rustls has no external PSKs, and libnbd and qemu use
    /// GnuTLS's PSK scheme (an identity and a key, TLS 1.3).
    Psk(Arc<openssl::ssl::SslAcceptor>),
}

/// Where a connection stands with TLS during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    NotConfigured,
    Required,
    Active,
}

/// How option haggling ended.
enum Negotiated {
    Session(Session),
    Abort,
    StartTls,
}

/// What negotiation settled for one connection.
struct Session {
    device: Arc<dyn BlockDevice>,
    metrics: Arc<NbdMetrics>,
    /// The export's own counts and latencies.
    ops: Arc<ExportOps>,
    /// Dropped with the session: the export's list of attached clients forgets it.
    _attached: Box<dyn std::any::Any + Send + Sync>,
    structured: bool,
    base_allocation: bool,
    shutting_down: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

type ConnResult<T> = Result<T, ConnectionError>;

fn violation<T>(message: impl Into<String>) -> ConnResult<T> {
    Err(ConnectionError::Protocol(message.into()))
}

impl NbdServer {
    pub fn new(
        exports: Arc<dyn Exports>,
        shutdown: watch::Receiver<bool>,
        tls: Option<TlsAcceptor>,
        metrics: Arc<NbdMetrics>,
        limits: Limits,
    ) -> Arc<NbdServer> {
        let (alive, drained) = mpsc::channel(1);
        Arc::new(NbdServer {
            exports,
            shutdown,
            tls,
            metrics,
            memory: Arc::new(Semaphore::new(limits.memory.max(MIN_MEMORY) >> 10)),
            limits,
            open: Mutex::new(Open::default()),
            alive: Mutex::new(Some(alive)),
            drained: tokio::sync::Mutex::new(drained),
        })
    }

    /// After shutdown was signalled: resolves when every connection has ended. Connections
    /// answer new requests with ESHUTDOWN and close once quiet for `SHUTDOWN_GRACE`.
    pub async fn drained(&self) {
        self.alive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // No message is ever sent: this returns None once every sender is dropped.
        let _ = self.drained.lock().await.recv().await;
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        // Refused peers cost one accept and one close: no task, no buffer,
                        // no log line (a flood of them would fill the disk).
                        let peer = Peer::Tcp(addr);
                        if !self.exports.admits(&peer) {
                            self.metrics.refused(Refusal::NotAllowed);
                            tracing::debug!(%addr, "nbd: refused: in no allowlist");
                            continue;
                        }
                        let Some(slot) = self.slot(Some(addr.ip())) else {
                            self.metrics.refused(Refusal::TooMany);
                            tracing::debug!(%addr, "nbd: refused: too many connections");
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(self.clone().connection(stream, peer, slot));
                    }
                    Err(e) => {
                        tracing::warn!("nbd: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Some(slot) = self.slot(None) else {
                            self.metrics.refused(Refusal::TooMany);
                            continue;
                        };
                        tokio::spawn(self.clone().connection(stream, Peer::Unix, slot));
                    }
                    Err(e) => {
                        tracing::warn!("nbd: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// A place for one more connection (from `address`, for TCP), if the limits leave one.
    fn slot(self: &Arc<Self>, address: Option<IpAddr>) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.limits.max_connections {
            return None;
        }
        if let Some(address) = address {
            let count = open.by_address.entry(address).or_default();
            if *count >= self.limits.max_connections_per_address {
                return None;
            }
            *count += 1;
        }
        open.total += 1;
        Some(Slot {
            server: self.clone(),
            address,
        })
    }

    /// Binds the Unix socket, replacing a stale one left by a crash.
    pub fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        Ok(listener)
    }

    async fn connection<S>(self: Arc<Self>, stream: S, peer: Peer, _slot: Slot)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _alive = self
            .alive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let _counted = self.metrics.connection();
        if let Err(e) = self.clone().serve_connection(stream, &peer).await {
            tracing::info!(?peer, "nbd: connection ended: {e}");
        }
    }

    async fn serve_connection<S>(self: Arc<Self>, mut stream: S, peer: &Peer) -> ConnResult<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Negotiation, the TLS handshake included, ends by this instant or the connection
        // does: a peer that connects and stays silent must not keep its place.
        let deadline = tokio::time::Instant::now() + self.limits.negotiation_timeout;
        let flags = self.in_time(deadline, hello(&mut stream)).await?;
        let mut client = Client {
            peer: peer.clone(),
            identity: None,
        };
        let Some(acceptor) = self.tls.clone() else {
            return self
                .finish(stream, &client, flags, Tls::NotConfigured, deadline)
                .await;
        };
        match self
            .in_time(
                deadline,
                self.options(&mut stream, &client, flags, Tls::Required),
            )
            .await?
        {
            Negotiated::StartTls => {}
            Negotiated::Abort => return Ok(()),
            Negotiated::Session(_) => return violation("a session without TLS"),
        }
        match acceptor {
            TlsAcceptor::X509(acceptor) => {
                let accept = async { Ok(acceptor.accept(stream).await?) };
                let stream = self.in_time(deadline, accept).await?;
                // Present only when the acceptor asks for client certificates, and then
                // verified by it; the first is the client's own.
                client.identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| certificate_name(cert));
                self.finish(stream, &client, flags, Tls::Active, deadline)
                    .await
            }
            TlsAcceptor::Psk(acceptor) => {
                let handshake = |e: &dyn std::fmt::Display| {
                    ConnectionError::Protocol(format!("TLS handshake: {e}"))
                };
                let ssl = openssl::ssl::Ssl::new(acceptor.context()).map_err(|e| handshake(&e))?;
                let mut stream =
                    tokio_openssl::SslStream::new(ssl, stream).map_err(|e| handshake(&e))?;
                let accept = async {
                    std::pin::Pin::new(&mut stream)
                        .accept()
                        .await
                        .map_err(|e| handshake(&e))
                };
                self.in_time(deadline, accept).await?;
                let slot = psk_identity_slot().map_err(|e| handshake(&e))?;
                client.identity = stream.ssl().ex_data(slot).cloned();
                self.finish(stream, &client, flags, Tls::Active, deadline)
                    .await
            }
        }
    }

    /// `step`, or a timeout error once `deadline` has passed.
    async fn in_time<T>(
        &self,
        deadline: tokio::time::Instant,
        step: impl std::future::Future<Output = ConnResult<T>>,
    ) -> ConnResult<T> {
        match tokio::time::timeout_at(deadline, step).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.metrics.refused(Refusal::Timeout);
                violation(format!(
                    "negotiation not finished within {:?}",
                    self.limits.negotiation_timeout
                ))
            }
        }
    }

    /// Option haggling to the end, then transmission.
    async fn finish<S>(
        &self,
        mut stream: S,
        client: &Client,
        flags: u32,
        tls: Tls,
        deadline: tokio::time::Instant,
    ) -> ConnResult<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let options = self.options(&mut stream, client, flags, tls);
        match self.in_time(deadline, options).await? {
            Negotiated::Session(session) => self.transmission(stream, Arc::new(session)).await,
            Negotiated::Abort => Ok(()),
            Negotiated::StartTls => violation("STARTTLS without TLS configured"),
        }
    }

    async fn options<S>(
        &self,
        io: &mut S,
        client: &Client,
        flags: u32,
        tls: Tls,
    ) -> ConnResult<Negotiated>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        // What the client's attachment records, once it picks an export.
        let attachment = |structured_replies| Attachment {
            client: client.clone(),
            tls: tls == Tls::Active,
            since: SystemTime::now(),
            handshake_flags: flags,
            structured_replies,
        };
        let mut structured = false;
        // base:allocation, as selected for the export of the last NBD_OPT_SET_META_CONTEXT:
        // a GO for another export has no context selected.
        let mut base_allocation: Option<String> = None;
        loop {
            if io.read_u64().await? != IHAVEOPT {
                return violation("option without IHAVEOPT");
            }
            let option = io.read_u32().await?;
            let length = io.read_u32().await?;
            if length > MAX_OPTION_LEN {
                return violation(format!("option {option} claims {length} bytes"));
            }
            let mut data = vec![0u8; length as usize];
            io.read_exact(&mut data).await?;
            if *self.shutdown.borrow() {
                reply(io, option, REP_ERR_SHUTDOWN, b"server shutting down").await?;
                continue;
            }
            if tls == Tls::Required && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
                if option == OPT_EXPORT_NAME {
                    return violation("NBD_OPT_EXPORT_NAME before the TLS this server requires");
                }
                reply(
                    io,
                    option,
                    REP_ERR_TLS_REQD,
                    b"this server requires TLS (connect with nbds://)",
                )
                .await?;
                continue;
            }
            match option {
                OPT_EXPORT_NAME => {
                    // No way to report an error here: the protocol says close.
                    let name = String::from_utf8(data).map_err(|_| {
                        ConnectionError::Protocol("export name is not UTF-8".into())
                    })?;
                    let device = match self.exports.open(&name, client) {
                        Ok(device) => device,
                        Err(e) => return violation(e.to_string()),
                    };
                    let mut b = Vec::with_capacity(10 + 124);
                    b.extend_from_slice(&device.size().to_be_bytes());
                    b.extend_from_slice(
                        &transmission_flags(device.as_ref(), structured).to_be_bytes(),
                    );
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    io.write_all(&b).await?;
                    io.flush().await?;
                    let attached = self.exports.attach(&name, attachment(structured));
                    let base_allocation = base_allocation.as_deref() == Some(name.as_str());
                    return Ok(Negotiated::Session(Session::new(
                        device,
                        self.metrics.clone(),
                        self.metrics.export(&name),
                        attached,
                        structured,
                        base_allocation,
                    )));
                }
                OPT_ABORT => {
                    reply(io, option, REP_ACK, &[]).await?;
                    return Ok(Negotiated::Abort);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        reply(io, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                        continue;
                    }
                    for export in self.exports.list(client) {
                        let mut b = Vec::new();
                        b.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                        b.extend_from_slice(export.name.as_bytes());
                        b.extend_from_slice(export.description.as_bytes());
                        reply(io, option, REP_SERVER, &b).await?;
                    }
                    reply(io, option, REP_ACK, &[]).await?;
                }
                OPT_STARTTLS => match tls {
                    Tls::NotConfigured => {
                        reply(
                            io,
                            option,
                            REP_ERR_UNSUP,
                            b"TLS is not configured on this server",
                        )
                        .await?;
                    }
                    Tls::Active => {
                        reply(io, option, REP_ERR_INVALID, b"TLS is already active").await?;
                    }
                    Tls::Required if !data.is_empty() => {
                        reply(
                            io,
                            option,
                            REP_ERR_INVALID,
                            b"NBD_OPT_STARTTLS takes no data",
                        )
                        .await?;
                    }
                    Tls::Required => {
                        reply(io, option, REP_ACK, &[]).await?;
                        return Ok(Negotiated::StartTls);
                    }
                },
                OPT_INFO | OPT_GO => {
                    let Some((name, requests)) = parse_info_request(&data) else {
                        reply(
                            io,
                            option,
                            REP_ERR_INVALID,
                            b"malformed NBD_OPT_INFO/GO request",
                        )
                        .await?;
                        continue;
                    };
                    let device = match self.exports.open(&name, client) {
                        Ok(device) => device,
                        Err(e) => {
                            let code = match e {
                                OpenError::Unknown(_) => REP_ERR_UNKNOWN,
                                OpenError::Denied(_) => REP_ERR_POLICY,
                                OpenError::Failed { .. } => REP_ERR_UNKNOWN,
                            };
                            reply(io, option, code, e.to_string().as_bytes()).await?;
                            continue;
                        }
                    };
                    let mut export = Vec::with_capacity(12);
                    export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    export.extend_from_slice(&device.size().to_be_bytes());
                    export.extend_from_slice(
                        &transmission_flags(device.as_ref(), structured).to_be_bytes(),
                    );
                    reply(io, option, REP_INFO, &export).await?;
                    let mut sizes = Vec::with_capacity(14);
                    sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    sizes.extend_from_slice(&1u32.to_be_bytes());
                    sizes.extend_from_slice(&device.preferred_block_size().to_be_bytes());
                    sizes.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    reply(io, option, REP_INFO, &sizes).await?;
                    if requests.contains(&INFO_NAME) {
                        let mut b = INFO_NAME.to_be_bytes().to_vec();
                        b.extend_from_slice(name.as_bytes());
                        reply(io, option, REP_INFO, &b).await?;
                    }
                    if requests.contains(&INFO_DESCRIPTION) {
                        let description = self
                            .exports
                            .list(client)
                            .into_iter()
                            .find(|e| e.name == name)
                            .map(|e| e.description)
                            .unwrap_or_default();
                        let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        b.extend_from_slice(description.as_bytes());
                        reply(io, option, REP_INFO, &b).await?;
                    }
                    reply(io, option, REP_ACK, &[]).await?;
                    if option == OPT_GO {
                        let attached = self.exports.attach(&name, attachment(structured));
                        let base_allocation = base_allocation.as_deref() == Some(name.as_str());
                        return Ok(Negotiated::Session(Session::new(
                            device,
                            self.metrics.clone(),
                            self.metrics.export(&name),
                            attached,
                            structured,
                            base_allocation,
                        )));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        reply(
                            io,
                            option,
                            REP_ERR_INVALID,
                            b"NBD_OPT_STRUCTURED_REPLY takes no data",
                        )
                        .await?;
                        continue;
                    }
                    structured = true;
                    reply(io, option, REP_ACK, &[]).await?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = option == OPT_SET_META_CONTEXT;
                    if set && !structured {
                        reply(
                            io,
                            option,
                            REP_ERR_INVALID,
                            b"negotiate structured replies first",
                        )
                        .await?;
                        continue;
                    }
                    let Some((name, queries)) = parse_meta_request(&data) else {
                        reply(
                            io,
                            option,
                            REP_ERR_INVALID,
                            b"malformed meta context request",
                        )
                        .await?;
                        continue;
                    };
                    // An export this peer may not open answers as if it did not exist.
                    if !self.exports.list(client).iter().any(|e| e.name == name) {
                        let message = format!("no export named {name:?}");
                        reply(io, option, REP_ERR_UNKNOWN, message.as_bytes()).await?;
                        continue;
                    }
                    let selected = if set {
                        queries.iter().any(|q| q == BASE_ALLOCATION)
                    } else {
                        queries.is_empty()
                            || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                    };
                    if selected {
                        let mut b = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        reply(io, option, REP_META_CONTEXT, &b).await?;
                    }
                    if set {
                        base_allocation = selected.then_some(name);
                    }
                    reply(io, option, REP_ACK, &[]).await?;
                }
                _ => {
                    reply(io, option, REP_ERR_UNSUP, b"option not supported").await?;
                }
            }
        }
    }

    async fn transmission<S>(&self, stream: S, session: Arc<Session>) -> ConnResult<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut reader, writer) = tokio::io::split(stream);
        // Unbounded, but every reply in it holds its share of the budget (`Outgoing`), so
        // the bytes queued here are bounded by the budget too.
        let (replies, mut outbox) = mpsc::unbounded_channel::<Outgoing>();
        let send_timeout = self.limits.send_timeout;
        let writer_task = tokio::spawn(async move {
            let mut writer = BufWriter::with_capacity(256 << 10, writer);
            // A client that takes nothing for `send_timeout` loses its connection, so the
            // memory its replies hold comes back; a slow one that keeps taking bytes stays.
            let stalled =
                || std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading");
            while let Some(Outgoing { reply, permits }) = outbox.recv().await {
                for piece in reply.chunks(256 << 10) {
                    tokio::time::timeout(send_timeout, writer.write_all(piece))
                        .await
                        .map_err(|_| stalled())??;
                }
                BUFFERS.give(reply);
                // Only now, with the bytes handed to the socket (or in the writer's own
                // fixed buffer), may the reader take requests for them again.
                drop(permits);
                if outbox.is_empty() {
                    tokio::time::timeout(send_timeout, writer.flush())
                        .await
                        .map_err(|_| stalled())??;
                }
            }
            writer.flush().await?;
            writer.shutdown().await
        });
        let budget = Arc::new(Semaphore::new(IN_FLIGHT_BUDGET_KIB));
        let workers = Arc::new(Semaphore::new(WORKERS_PER_CONNECTION));
        let bucket_reads = Arc::new(Semaphore::new(BUCKET_READS_PER_CONNECTION));
        let runtime = tokio::runtime::Handle::current();
        let mut shutdown = self.shutdown.clone();
        let outcome: ConnResult<()> = async {
            loop {
                let mut header = [0u8; REQUEST_LEN];
                let read = async {
                    if session.shutting_down.load(Ordering::Relaxed) {
                        match tokio::time::timeout(SHUTDOWN_GRACE, reader.read_exact(&mut header))
                            .await
                        {
                            Ok(r) => r,
                            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                        }
                    } else {
                        reader.read_exact(&mut header).await
                    }
                };
                tokio::select! {
                    // The writer is gone (the client left or stopped reading): nothing more
                    // this connection runs can reach it.
                    _ = replies.closed() => return Ok(()),
                    r = read => match r {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Ok(()),
                        Err(e) => return Err(e.into()),
                    },
                    _ = shutdown.changed(), if !session.shutting_down.load(Ordering::Relaxed) => {
                        session.shutting_down.store(true, Ordering::Relaxed);
                        continue;
                    }
                }
                let Some(request) = Request::parse(&header) else {
                    return violation("bad request magic");
                };
                if request.kind == CMD_DISC {
                    return Ok(());
                }
                if request.kind == CMD_WRITE && request.length > MAX_PAYLOAD {
                    return violation(format!(
                        "write of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum",
                        request.length
                    ));
                }
                // Take the budgets (this connection's, then the server's) before reading a
                // payload, so a fast sender waits here instead of filling memory; they are
                // given back when the reply is written.
                let cost = budget_cost_kib(&request);
                let permits = tokio::select! {
                    _ = replies.closed() => return Ok(()),
                    permits = async {
                        let own = budget.clone().acquire_many_owned(cost).await;
                        let shared = self.memory.clone().acquire_many_owned(cost).await;
                        own.and_then(|own| shared.map(|shared| (own, shared)))
                    } => permits.map_err(|_| ConnectionError::Protocol("budget closed".into()))?,
                };
                let mut payload = Vec::new();
                if request.kind == CMD_WRITE {
                    payload = BUFFERS.take(request.length as usize);
                    // The budgets are held while it arrives: a client that stops halfway
                    // through a payload loses its connection, or a few of them would hold
                    // every other client's requests up for as long as they like.
                    let mut arriving = (&mut reader).take(u64::from(request.length));
                    let read = arriving.read_to_end(&mut payload);
                    match tokio::time::timeout(self.limits.send_timeout, read).await {
                        Ok(read) => read?,
                        Err(_) => {
                            return violation(format!(
                                "a write's {} bytes did not arrive within {:?}",
                                request.length, self.limits.send_timeout
                            ));
                        }
                    };
                    if payload.len() != request.length as usize {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                    }
                }
                if runs_inline(&request) {
                    // Small reads of cached data and small whole-block writes go to and from
                    // the page cache in microseconds: run them here and skip the hand-off to a
                    // blocking thread, which costs more (half of 4 KiB write IOPS, measured).
                    // What would wait for the disk is declined (Wait::No) and goes to a
                    // thread below.
                    if let Some(reply) = execute_guarded(&session, request, &mut payload, Wait::No)
                    {
                        let _ = replies.send(Outgoing { reply, permits });
                        continue;
                    }
                }
                let worker = workers
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ConnectionError::Protocol("workers closed".into()))?;
                let session = session.clone();
                let replies = replies.clone();
                let (bucket_reads, runtime) = (bucket_reads.clone(), runtime.clone());
                // One hop to a blocking thread, which sends the reply itself; what needs the
                // bucket is declined there (Wait::Disk) and waits for it without the worker.
                tokio::task::spawn_blocking(move || {
                    let reply = execute_guarded(&session, request, &mut payload, Wait::Disk);
                    drop(worker);
                    match reply {
                        Some(reply) => {
                            let _ = replies.send(Outgoing { reply, permits });
                        }
                        None => {
                            runtime.spawn(async move {
                                let slot = bucket_reads.acquire_owned().await;
                                let reply = tokio::task::spawn_blocking(move || {
                                    let reply =
                                        execute_guarded(&session, request, &mut payload, Wait::Yes);
                                    drop(slot);
                                    reply
                                })
                                .await
                                .ok()
                                .flatten()
                                .unwrap_or_else(|| simple_reply(EIO, request.cookie));
                                let _ = replies.send(Outgoing { reply, permits });
                            });
                        }
                    }
                });
            }
        }
        .await;
        // Let requests in flight finish and their replies go out before closing.
        let _ = budget.acquire_many(IN_FLIGHT_BUDGET_KIB as u32).await;
        drop(replies);
        match writer_task.await {
            Ok(Ok(())) | Ok(Err(_)) | Err(_) => {}
        }
        outcome
    }
}

/// The server's greeting; returns the client's flags (NBD_FLAG_C_*).
async fn hello<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> ConnResult<u32> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&hello).await?;
    io.flush().await?;
    let client_flags = io.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return violation(format!("unknown client flags {client_flags:#x}"));
    }
    Ok(client_flags)
}

impl Session {
    fn new(
        device: Arc<dyn BlockDevice>,
        metrics: Arc<NbdMetrics>,
        ops: Arc<ExportOps>,
        attached: Box<dyn std::any::Any + Send + Sync>,
        structured: bool,
        base_allocation: bool,
    ) -> Session {
        Session {
            device,
            metrics,
            ops,
            _attached: attached,
            structured,
            base_allocation,
            shutting_down: AtomicBool::new(false),
        }
    }
}

/// A reply on its way to the socket, with the budgets its request took (the connection's
/// and the server's).
struct Outgoing {
    reply: Vec<u8>,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// What a request may hold of the connection's budget, in KiB: the most its payload and its
/// reply can take, whatever the outcome (an error chunk's message included).
fn budget_cost_kib(r: &Request) -> u32 {
    // A simple reply, or an error chunk with its message (error_chunk caps it at 4 KiB).
    const ERROR_REPLY: usize = 32 + 4096;
    let bytes = match r.kind {
        CMD_WRITE => r.length.min(MAX_PAYLOAD) as usize + ERROR_REPLY,
        CMD_READ => {
            // Data, and the headers of at most one chunk per 4 KiB (holes) plus the ends.
            let length = r.length.min(MAX_PAYLOAD) as usize;
            length + (length / 4096 + 4) * 32 + ERROR_REPLY
        }
        CMD_BLOCK_STATUS => 32 + MAX_STATUS_DESCRIPTORS * 8 + ERROR_REPLY,
        _ => ERROR_REPLY,
    };
    bytes.div_ceil(1024) as u32
}

/// Whether a request may be tried on the connection's own task, an async worker that every
/// connection and the HTTP API share: only small reads and writes, which the device answers
/// with `read_cached` and `write_now` when it can do so without waiting for the disk (or a
/// lock held across disk I/O), and declines otherwise (decision 0002). FUA is a sync: never.
fn runs_inline(r: &Request) -> bool {
    const INLINE_MAX: u32 = 16 << 10;
    match r.kind {
        CMD_READ => r.length <= INLINE_MAX,
        CMD_WRITE => r.length <= INLINE_MAX && r.flags & CMD_FLAG_FUA == 0,
        _ => false,
    }
}

fn transmission_flags(device: &dyn BlockDevice, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_FAST_ZERO
        | TFLAG_SEND_CACHE
        // One device object serves every connection and flush syncs the whole file, so a
        // flush on any connection covers writes completed on all of them.
        | TFLAG_CAN_MULTI_CONN;
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    if device.read_only() {
        flags |= TFLAG_READ_ONLY;
    }
    flags
}

async fn reply<S: AsyncWrite + Unpin>(
    io: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> ConnResult<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    io.write_all(&b).await?;
    io.flush().await?;
    Ok(())
}

/// A byte cursor over an option's data; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, len: u32) -> Option<String> {
        if len > 4096 {
            return None;
        }
        self.take(len as usize)
            .and_then(|b| String::from_utf8(b.to_vec()).ok())
    }
}

/// NBD_OPT_INFO/GO data: name length, name, number of requests, requests. Exact length.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor(data);
    let len = c.u32()?;
    let name = c.string(len)?;
    let count = c.u16()?;
    let requests = (0..count).map(|_| c.u16()).collect::<Option<Vec<u16>>>()?;
    c.0.is_empty().then_some((name, requests))
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT data: export name, number of queries, queries.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor(data);
    let len = c.u32()?;
    let name = c.string(len)?;
    let count = c.u32()?;
    if count as usize > data.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = c.u32()?;
        queries.push(c.string(len)?);
    }
    c.0.is_empty().then_some((name, queries))
}

fn error_code(e: &BlockError) -> u32 {
    match e {
        BlockError::Invalid(_) => EINVAL,
        BlockError::ReadOnly => EPERM,
        BlockError::NoSpace(_) => ENOSPC,
        BlockError::Io(_) => EIO,
    }
}

fn in_range(offset: u64, length: u64, size: u64) -> bool {
    offset.checked_add(length).is_some_and(|end| end <= size)
}

/// Runs one request against the device and returns the whole reply.
/// `execute`, with a panic (a bug) answered as EIO for that request alone, logged and counted.
fn execute_guarded(
    session: &Session,
    r: Request,
    payload: &mut Vec<u8>,
    wait: Wait,
) -> Option<Vec<u8>> {
    let run = std::panic::AssertUnwindSafe(|| execute(session, r, payload, wait));
    std::panic::catch_unwind(run).unwrap_or_else(|_| {
        session.metrics.panicked();
        tracing::error!(command = r.kind, "nbd: a request panicked; answered EIO");
        Some(simple_reply(EIO, r.cookie))
    })
}

/// Runs one request and builds its reply. A read that would wait for more than `wait` allows
/// (`No`: the disk, `Disk`: the bucket) and a prefetch (NBD_CMD_CACHE) short of `Yes` are not
/// run, and the answer is `None`; every other request runs either way.
fn execute(session: &Session, r: Request, payload: &mut Vec<u8>, wait: Wait) -> Option<Vec<u8>> {
    let reply = run_request(session, r, payload, wait)?;
    // Counted once it ran: a read declined with Wait::No runs again.
    session.metrics.request(r.kind);
    Some(reply)
}

fn run_request(
    session: &Session,
    r: Request,
    payload: &mut Vec<u8>,
    wait: Wait,
) -> Option<Vec<u8>> {
    let fail = |code: u32, message: &str| {
        session.metrics.error(r.kind);
        if code == EIO {
            // The client sees only the code (or, over structured replies, this message).
            tracing::warn!(
                command = r.kind,
                offset = r.offset,
                length = r.length,
                "nbd: answered EIO: {message}"
            );
        }
        if session.structured && matches!(r.kind, CMD_READ | CMD_BLOCK_STATUS) {
            error_chunk(r.cookie, code, message)
        } else {
            simple_reply(code, r.cookie)
        }
    };
    if session.shutting_down.load(Ordering::Relaxed) {
        return Some(fail(ESHUTDOWN, "server is shutting down"));
    }
    let allowed = match r.kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_FLUSH | CMD_CACHE => 0,
        _ => return Some(fail(EINVAL, "unknown command")),
    };
    if r.flags & !allowed != 0 {
        return Some(fail(EINVAL, "flag not valid for this command"));
    }
    let device = session.device.as_ref();
    let (offset, length, size) = (r.offset, u64::from(r.length), device.size());
    let writes = matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if writes && device.read_only() {
        return Some(fail(EPERM, "read-only export"));
    }
    if length == 0 && r.kind != CMD_FLUSH {
        // The protocol leaves zero lengths unspecified (the server "SHOULD NOT disconnect");
        // a structured read has no valid success reply for them (an empty data chunk is out
        // of bounds for libnbd). So every command with a range refuses them, as nbdkit does.
        return Some(fail(EINVAL, "zero-length request"));
    }
    if !in_range(offset, length, size) {
        // The protocol asks for ENOSPC when a write runs past the end, EINVAL otherwise.
        let code = if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Some(fail(code, "request runs past the end of the export"));
    }
    let fua = r.flags & CMD_FLAG_FUA != 0;
    // The device's time for this request, for the export's latency histogram.
    let started = Instant::now();
    let outcome = match r.kind {
        CMD_READ => {
            if r.length > MAX_PAYLOAD {
                let code = if r.flags & CMD_FLAG_DF != 0 {
                    EOVERFLOW
                } else {
                    EINVAL
                };
                return Some(fail(code, "read larger than the maximum block size"));
            }
            let read = read_reply(session, r, wait);
            // Declined (Ok(None)): it runs again on a blocking thread, and counts there.
            if !matches!(read, Ok(None)) {
                session.ops.done(Op::Read, started.elapsed());
            }
            return match read {
                Ok(Some(reply)) => {
                    session.metrics.read(r.length);
                    session.ops.read(r.length);
                    Some(reply)
                }
                Ok(None) => None,
                Err(e) => Some(fail(error_code(&e), &e.to_string())),
            };
        }
        CMD_WRITE => {
            let written = match wait {
                // Declined (None): the payload stays with the caller for a blocking thread.
                Wait::No => device.write_now(offset, payload)?,
                Wait::Disk | Wait::Yes => device.write(offset, payload, fua),
            };
            session.ops.done(Op::Write, started.elapsed());
            if written.is_ok() {
                session.metrics.written(r.length);
                session.ops.written(r.length);
            }
            BUFFERS.give(std::mem::take(payload));
            written
        }
        CMD_FLUSH => {
            let flushed = device.flush();
            session.ops.done(Op::Flush, started.elapsed());
            flushed
        }
        CMD_TRIM => {
            let trimmed = device
                .trim(offset, length)
                .and_then(|()| if fua { device.flush() } else { Ok(()) });
            session.ops.done(Op::Trim, started.elapsed());
            trimmed
        }
        CMD_WRITE_ZEROES => {
            let no_hole = r.flags & CMD_FLAG_NO_HOLE != 0;
            if no_hole && r.flags & CMD_FLAG_FAST_ZERO != 0 {
                // Zeroes that must stay allocated are written, which is not fast.
                return Some(fail(ENOTSUP, "zeroing without holes is not fast"));
            }
            let zeroed = device
                .write_zeroes(offset, length, !no_hole)
                .and_then(|()| if fua { device.flush() } else { Ok(()) });
            session.ops.done(Op::WriteZeroes, started.elapsed());
            zeroed
        }
        // A prefetch may wait for the bucket: apart from the workers.
        CMD_CACHE => match wait {
            Wait::No | Wait::Disk => return None,
            Wait::Yes => device.prefetch(offset, length),
        },
        CMD_BLOCK_STATUS => {
            if !(session.structured && session.base_allocation) {
                return Some(fail(EINVAL, "no meta context negotiated"));
            }
            return Some(match device.extents(offset, length) {
                Ok(extents) => block_status_reply(r, &extents),
                Err(e) => fail(error_code(&e), &e.to_string()),
            });
        }
        _ => Err(BlockError::Invalid("unknown command".into())),
    };
    Some(match outcome {
        Ok(()) => simple_reply(0, r.cookie),
        Err(e) => fail(error_code(&e), &e.to_string()),
    })
}

/// What a request may wait for: nothing on the connection's own task, the disk on a worker,
/// and the bucket apart from the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The disk and the bucket.
    Yes,
    /// The disk, not the bucket.
    Disk,
    /// Nothing.
    No,
}

/// Reads `buf` at `offset` as far as `wait` allows: `Ok(false)` if that is not far enough.
fn device_read(
    device: &dyn BlockDevice,
    wait: Wait,
    offset: u64,
    buf: &mut [u8],
) -> Result<bool, BlockError> {
    let answer = match wait {
        Wait::Yes => Some(device.read(offset, buf)),
        Wait::Disk => device.read_local(offset, buf),
        Wait::No => device.read_cached(offset, buf),
    };
    answer.map_or(Ok(false), |result| result.map(|()| true))
}

fn read_reply(session: &Session, r: Request, wait: Wait) -> Result<Option<Vec<u8>>, BlockError> {
    let device = session.device.as_ref();
    let length = r.length as usize;
    // Reads without holes: the reply is a header and the data.
    let whole = |header: &[u8]| -> Result<Option<Vec<u8>>, BlockError> {
        let mut reply = BUFFERS.take_filled(header.len() + length);
        reply[..header.len()].copy_from_slice(header);
        let data = &mut reply[header.len()..];
        if !device_read(device, wait, r.offset, data)? {
            BUFFERS.give(reply);
            return Ok(None);
        }
        Ok(Some(reply))
    };
    if !session.structured {
        return whole(&simple_reply(0, r.cookie));
    }
    // Small reads go back as one data chunk: looking for holes costs more than the zeros.
    let extents = if r.flags & CMD_FLAG_DF != 0 || length < SPARSE_READ_MIN {
        Vec::new()
    } else {
        device.extents(r.offset, u64::from(r.length))?
    };
    if !extents.iter().any(|e| e.zero) {
        return whole(&data_chunk_header(r.cookie, r.offset, length, true));
    }
    // Holes go back as NBD_REPLY_TYPE_OFFSET_HOLE: no zeros on the wire. Reads this long
    // never run on the connection's task.
    debug_assert_ne!(wait, Wait::No);
    let mut reply = BUFFERS.take(length + 32 * (extents.len() + 2));
    let mut offset = r.offset;
    let end = r.offset + u64::from(r.length);
    for extent in extents {
        if offset >= end {
            break;
        }
        let len = extent.length.min(end - offset);
        if extent.zero && len >= 4096 {
            reply.extend_from_slice(&chunk_header(0, REPLY_TYPE_OFFSET_HOLE, r.cookie, 12));
            reply.extend_from_slice(&offset.to_be_bytes());
            reply.extend_from_slice(&(len as u32).to_be_bytes());
        } else {
            let chunk = (r.cookie, offset, len as usize);
            if !push_data_chunk(&mut reply, device, wait, chunk)? {
                BUFFERS.give(reply);
                return Ok(None);
            }
        }
        offset += len;
    }
    if offset < end {
        let chunk = (r.cookie, offset, (end - offset) as usize);
        if !push_data_chunk(&mut reply, device, wait, chunk)? {
            BUFFERS.give(reply);
            return Ok(None);
        }
    }
    reply.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie, 0));
    Ok(Some(reply))
}

/// The header of an NBD_REPLY_TYPE_OFFSET_DATA chunk, with the offset that starts its data.
fn data_chunk_header(cookie: u64, offset: u64, len: usize, done: bool) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut header = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len as u32);
    header.extend_from_slice(&offset.to_be_bytes());
    header
}

/// Appends an OFFSET_DATA chunk, reading the data straight into `reply`.
/// `Ok(false)` if the data needs more than `wait` allows.
fn push_data_chunk(
    reply: &mut Vec<u8>,
    device: &dyn BlockDevice,
    wait: Wait,
    (cookie, offset, len): (u64, u64, usize),
) -> Result<bool, BlockError> {
    reply.extend_from_slice(&data_chunk_header(cookie, offset, len, false));
    let start = reply.len();
    reply.resize(start + len, 0);
    device_read(device, wait, offset, &mut reply[start..])
}

fn block_status_reply(r: Request, extents: &[Extent]) -> Vec<u8> {
    let limit = if r.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        extents.len().clamp(1, MAX_STATUS_DESCRIPTORS)
    };
    let mut descriptors = Vec::with_capacity(limit * 8);
    let longest = u64::from(u32::MAX) & !4095;
    for extent in extents.iter().take(limit) {
        let length = extent.length.min(longest) as u32;
        if length == 0 {
            continue;
        }
        let mut flags = 0;
        if extent.hole {
            flags |= STATE_HOLE;
        }
        if extent.zero {
            flags |= STATE_ZERO;
        }
        descriptors.extend_from_slice(&length.to_be_bytes());
        descriptors.extend_from_slice(&flags.to_be_bytes());
        if extent.length > longest {
            // Cut short: the next extent does not start where this descriptor ends, so
            // the answer ends here (shorter than asked, as the protocol allows; the client
            // asks again from its end).
            break;
        }
    }
    if descriptors.is_empty() {
        // Extents shorter than the request are allowed; an empty answer is not.
        descriptors.extend_from_slice(&r.length.to_be_bytes());
        descriptors.extend_from_slice(&0u32.to_be_bytes());
    }
    let mut reply = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        r.cookie,
        4 + descriptors.len() as u32,
    );
    reply.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    reply.extend_from_slice(&descriptors);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_extent_cut_to_fit_a_descriptor_ends_the_answer() {
        let extent = |length, hole| Extent {
            length,
            hole,
            zero: hole,
        };
        let request = Request {
            flags: 0,
            kind: CMD_BLOCK_STATUS,
            cookie: 7,
            offset: 0,
            length: u32::MAX,
        };
        // Past what a descriptor holds, then data, then a hole: had the data's descriptor
        // followed, it would have been placed 4095 bytes early, over the hole's bytes.
        let reply = block_status_reply(
            request,
            &[
                extent((1 << 32) + 0x200, false),
                extent(0x200, false),
                extent(0x9ff, true),
            ],
        );
        let descriptors = &reply[reply.len() - 8..];
        assert_eq!(reply.len(), 20 + 4 + 8, "one descriptor");
        assert_eq!(descriptors[..4], 0xFFFF_F000u32.to_be_bytes());
        assert_eq!(descriptors[4..], 0u32.to_be_bytes());
        // Extents that fit all go.
        let reply = block_status_reply(request, &[extent(4096, false), extent(8192, true)]);
        assert_eq!(reply.len(), 20 + 4 + 16, "two descriptors");
    }

    proptest! {
        #[test]
        fn option_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_request(&data);
        }
    }

    /// A device in memory, for driving the server with arbitrary bytes.
    struct MemDevice {
        data: std::sync::Mutex<Vec<u8>>,
        read_only: bool,
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.data.lock().expect("lock").len() as u64
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            let data = self.data.lock().expect("lock");
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, src: &mut [u8], _fua: bool) -> Result<(), BlockError> {
            let mut data = self.data.lock().expect("lock");
            data[offset as usize..offset as usize + src.len()].copy_from_slice(src);
            Ok(())
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
            self.write_zeroes(offset, length, true)
        }
        fn write_zeroes(
            &self,
            offset: u64,
            length: u64,
            _may_trim: bool,
        ) -> Result<(), BlockError> {
            let mut data = self.data.lock().expect("lock");
            data[offset as usize..(offset + length) as usize].fill(0);
            Ok(())
        }
        fn extents(&self, _offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
            Ok(vec![Extent {
                length,
                hole: false,
                zero: false,
            }])
        }
    }

    /// A device whose `read_cached` scribbles over the buffer and declines every other time.
    struct Forgetful {
        inner: MemDevice,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl BlockDevice for Forgetful {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            self.inner.read(offset, buf)
        }
        fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), BlockError>> {
            if self.calls.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                buf.fill(0xEE);
                return None;
            }
            Some(self.inner.read(offset, buf))
        }
        fn write(&self, offset: u64, src: &mut [u8], fua: bool) -> Result<(), BlockError> {
            self.inner.write(offset, src, fua)
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
            self.inner.trim(offset, length)
        }
        fn write_zeroes(&self, offset: u64, length: u64, t: bool) -> Result<(), BlockError> {
            self.inner.write_zeroes(offset, length, t)
        }
        fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
            self.inner.extents(offset, length)
        }
    }

    #[test]
    fn declined_and_pooled_reads_send_only_the_devices_bytes() {
        let content: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
        let device = Arc::new(Forgetful {
            inner: MemDevice {
                data: std::sync::Mutex::new(content.clone()),
                read_only: false,
            },
            calls: Default::default(),
        });
        let metrics = Arc::new(NbdMetrics::new(&mut Default::default()));
        for structured in [false, true] {
            let ops = metrics.export("test");
            let session = Session::new(
                device.clone(),
                metrics.clone(),
                ops,
                Box::new(()),
                structured,
                false,
            );
            let header = if structured { 20 + 8 } else { 16 };
            for (offset, length) in [(0u64, 4096u32), (777, 10_000), (4096, 256 << 10)] {
                let request = Request {
                    flags: 0,
                    kind: CMD_READ,
                    cookie: 9,
                    offset,
                    length,
                };
                let range = offset as usize..offset as usize + length as usize;
                // Declined, then answered from "memory"; both replies carry the device's bytes.
                let declined = execute(&session, request, &mut Vec::new(), Wait::No);
                assert!(declined.is_none(), "a declined read was answered");
                let reply = execute(&session, request, &mut Vec::new(), Wait::Yes).expect("reply");
                assert_eq!(&reply[header..], &content[range.clone()]);
                let cached = execute(&session, request, &mut Vec::new(), Wait::No).expect("cached");
                assert_eq!(&cached[header..], &content[range.clone()]);
                // Buffers go back to the pool holding bytes a later reply must not show.
                for mut used in [reply, cached] {
                    used.fill(0xAB);
                    BUFFERS.give(used);
                }
            }
        }
    }

    struct OneExport(Arc<dyn BlockDevice>);

    impl Exports for OneExport {
        fn list(&self, _client: &Client) -> Vec<ExportInfo> {
            vec![ExportInfo {
                name: "disk".into(),
                description: String::new(),
            }]
        }
        fn open(&self, name: &str, _client: &Client) -> Result<Arc<dyn BlockDevice>, OpenError> {
            if name == "disk" {
                Ok(self.0.clone())
            } else {
                Err(OpenError::Unknown(name.into()))
            }
        }
        fn admits(&self, _peer: &Peer) -> bool {
            true
        }
    }

    const SIZE: usize = 64 << 10;

    /// A device whose writes of part of a block wait until the gate opens: a slow disk
    /// under a read-modify-write.
    struct SlowWrites {
        inner: MemDevice,
        open: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
    }

    impl BlockDevice for SlowWrites {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            self.inner.read(offset, buf)
        }
        fn write(&self, offset: u64, src: &mut [u8], fua: bool) -> Result<(), BlockError> {
            // Every write waits for the "disk": a partial block reads it, and even a whole
            // block can be held up by the kernel's dirty-page throttling.
            let open = self.open.lock().expect("lock");
            drop(self.opened.wait_while(open, |open| !*open).expect("wait"));
            self.inner.write(offset, src, fua)
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
            self.inner.trim(offset, length)
        }
        fn write_zeroes(&self, offset: u64, length: u64, t: bool) -> Result<(), BlockError> {
            self.inner.write_zeroes(offset, length, t)
        }
        fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, BlockError> {
            self.inner.extents(offset, length)
        }
    }

    #[test]
    fn a_partial_block_write_waits_off_the_connections_task() {
        a_write_waits_off_the_connections_task(100, 10);
    }

    #[test]
    fn a_whole_block_write_waits_off_the_connections_task() {
        a_write_waits_off_the_connections_task(0, 4096);
    }

    /// A write of `length` bytes at `offset` that waits for the disk holds up neither the
    /// connection's task nor the read sent after it.
    fn a_write_waits_off_the_connections_task(offset: u64, length: u32) {
        let device = Arc::new(SlowWrites {
            inner: MemDevice {
                data: std::sync::Mutex::new(vec![0u8; SIZE]),
                read_only: false,
            },
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let replies = rt.block_on(async {
            let (_stop, stopped) = watch::channel(false);
            let metrics = Arc::new(NbdMetrics::new(&mut Default::default()));
            let server = NbdServer::new(
                Arc::new(OneExport(device.clone())),
                stopped,
                None,
                metrics,
                Limits::default(),
            );
            let (mut client, server_side) = tokio::io::duplex(1 << 20);
            let slot = server.slot(None).expect("a free slot");
            tokio::spawn(server.connection(server_side, Peer::Unix, slot));
            // GO without structured replies; then a small write (cookie 1), which waits for
            // the "disk", and a read (cookie 2) behind it.
            let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
                .to_be_bytes()
                .to_vec();
            input.extend_from_slice(&IHAVEOPT.to_be_bytes());
            input.extend_from_slice(&OPT_GO.to_be_bytes());
            input.extend_from_slice(&10u32.to_be_bytes());
            input.extend_from_slice(&4u32.to_be_bytes());
            input.extend_from_slice(b"disk");
            input.extend_from_slice(&0u16.to_be_bytes());
            let write = Request {
                flags: 0,
                kind: CMD_WRITE,
                cookie: 1,
                offset,
                length,
            };
            input.extend_from_slice(&write.encode());
            input.extend_from_slice(&vec![7u8; length as usize]);
            let read = Request {
                flags: 0,
                kind: CMD_READ,
                cookie: 2,
                offset: 8192,
                length: 4096,
            };
            input.extend_from_slice(&read.encode());
            client.write_all(&input).await.expect("send");
            let mut seen = Vec::new();
            let find = |seen: &[u8], cookie: u64| {
                let reply = simple_reply(0, cookie);
                seen.windows(reply.len()).any(|w| w == reply)
            };
            // The read is answered while the write still waits.
            let read_first = tokio::time::timeout(Duration::from_secs(3), async {
                let mut b = [0u8; 4096];
                while !find(&seen, 2) {
                    let n = client.read(&mut b).await.expect("receive");
                    assert!(n > 0, "the server hung up");
                    seen.extend_from_slice(&b[..n]);
                }
            })
            .await;
            let wrote_before = find(&seen, 1);
            *device.open.lock().expect("lock") = true;
            device.opened.notify_all();
            let wrote = tokio::time::timeout(Duration::from_secs(5), async {
                let mut b = [0u8; 4096];
                while !find(&seen, 1) {
                    let n = client.read(&mut b).await.expect("receive");
                    assert!(n > 0, "the server hung up");
                    seen.extend_from_slice(&b[..n]);
                }
            })
            .await;
            (read_first.is_ok(), wrote_before, wrote.is_ok())
        });
        assert_eq!(
            replies,
            (true, false, true),
            "(read answered while the write waited, write answered early, write answered)"
        );
        let range = offset as usize..offset as usize + length as usize;
        assert!(
            device.inner.data.lock().expect("lock")[range]
                .iter()
                .all(|&b| b == 7)
        );
    }

    /// Feeds `input` to one connection and returns the device's content afterwards; fails
    /// if the server panics or does not finish.
    fn drive(input: Vec<u8>, read_only: bool) -> Vec<u8> {
        let pattern: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
        let device = Arc::new(MemDevice {
            data: std::sync::Mutex::new(pattern),
            read_only,
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (_stop, stopped) = watch::channel(false);
            let metrics = Arc::new(NbdMetrics::new(&mut Default::default()));
            let server = NbdServer::new(
                Arc::new(OneExport(device.clone())),
                stopped,
                None,
                metrics.clone(),
                Limits::default(),
            );
            let (mut client, server_side) = tokio::io::duplex(1 << 20);
            let slot = server.slot(None).expect("a free slot");
            let task = tokio::spawn(server.connection(server_side, Peer::Unix, slot));
            let finished = tokio::time::timeout(Duration::from_secs(10), async move {
                client.write_all(&input).await.ok();
                client.shutdown().await.ok();
                let mut sink = Vec::new();
                client.read_to_end(&mut sink).await.ok();
                task.await
            })
            .await;
            assert!(
                matches!(finished, Ok(Ok(()))),
                "the connection did not end cleanly: {finished:?}"
            );
            assert_eq!(metrics.panics(), 0, "a request panicked");
        });
        Arc::try_unwrap(device)
            .ok()
            .expect("device released")
            .data
            .into_inner()
            .expect("lock")
    }

    /// A well-formed opening: client flags, structured replies, base:allocation, GO "disk".
    fn opening() -> Vec<u8> {
        let option = |b: &mut Vec<u8>, option: u32, data: &[u8]| {
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&option.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
        };
        let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        option(&mut b, OPT_STRUCTURED_REPLY, &[]);
        let mut meta = 4u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"disk");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        option(&mut b, OPT_SET_META_CONTEXT, &meta);
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&0u16.to_be_bytes());
        option(&mut b, OPT_GO, &go);
        b
    }

    fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u16>(),
            0u16..10,
            prop_oneof![0u64..(SIZE as u64 + 8192), any::<u64>()],
            prop_oneof![0u32..70_000, any::<u32>()],
            any::<u8>(),
        )
            .prop_map(|(flags, kind, offset, length, fill)| {
                let r = Request {
                    flags: flags & 0x3f,
                    kind,
                    cookie: u64::from(fill),
                    offset,
                    length,
                };
                let mut b = r.encode().to_vec();
                if kind == CMD_WRITE && length < 70_000 {
                    b.resize(b.len() + length as usize, fill);
                }
                b
            })
    }

    proptest! {
        // PROPTEST_CASES raises the number of cases; scripts/fuzz-nbd runs many more.

        #[test]
        fn random_bytes_never_crash_or_write(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let pristine: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
            prop_assert_eq!(drive(input.clone(), false), pristine.clone());
            let mut after_opening = opening();
            after_opening.extend_from_slice(&input);
            // Random bytes after a good opening may form a valid write by chance; a
            // read-only export must stay unchanged whatever arrives.
            prop_assert_eq!(drive(after_opening, true), pristine);
        }

        #[test]
        fn random_requests_leave_a_read_only_export_unchanged(
            requests in proptest::collection::vec(request_strategy(), 1..40),
            cut in any::<prop::sample::Index>(),
        ) {
            let pristine: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
            let mut input = opening();
            for r in &requests {
                input.extend_from_slice(r);
            }
            prop_assert_eq!(drive(input.clone(), true), pristine.clone());
            // The same stream cut anywhere: a truncated packet ends the connection cleanly.
            let at = cut.index(input.len());
            prop_assert_eq!(drive(input[..at].to_vec(), true), pristine);
        }
    }

    #[test]
    fn info_request_needs_exact_length() {
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&data),
            Some(("disk".to_string(), vec![INFO_NAME]))
        );
        data.push(0);
        assert_eq!(parse_info_request(&data), None);
        assert_eq!(parse_info_request(&data[..9]), None);
    }
}
