//! The NFSv3 door: MOUNT (program 100005, version 3) and NFS (100003, version 3) on one TCP
//! port, over the share engine. ONC RPC is decoded here (record marking, call header,
//! `AUTH_UNIX`); the MOUNT and NFS arguments and results are `nfs3_types`' XDR types.
//! Decision 0008 says why the RPC layer is firn's own rather than a server crate's.
//!
//! - Exports: share `media` is `/media`; MNT answers its root's handle.
//! - File handles: version byte, the share's 16-byte id, the 8-byte fileid: stable across
//!   restarts, since fileids are.
//! - Write verifier: random per start, so a client resends what an `UNSTABLE` write left
//!   uncommitted when firn restarted.
//! - Bounds: a request is at most `MAX_REQUEST` bytes; a connection has at most `IN_FLIGHT`
//!   requests in progress, and all connections together `IN_FLIGHT_ALL`; at most
//!   `MAX_CONNECTIONS` connections are open, `MAX_CONNECTIONS_PER_ADDRESS` from one address
//!   (more are closed at once). So requests and replies in memory stay under about
//!   `(MAX_CONNECTIONS + 2 * IN_FLIGHT_ALL)` MiB. A client outside a share's allowlist gets
//!   `NFS3ERR_ACCES` (MNT: `MNT3ERR_ACCES`) for it.

mod fits;
mod perm;
mod procs;

use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use nfs3_types::rpc::{
    RPC_VERSION_2, accept_stat_data, accepted_reply, auth_flavor, auth_stat, auth_unix, msg_body,
    opaque_auth, rejected_reply, reply_body, rpc_msg,
};
use nfs3_types::xdr_codec::{Pack, Unpack};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::engines::share::{Attrs, Share, ShareInfo, Shares};

pub const NFS_PROGRAM: u32 = 100_003;
pub const MOUNT_PROGRAM: u32 = 100_005;
const VERSION_3: u32 = 3;
/// The largest request: a 1 MiB WRITE with its headers.
pub const MAX_REQUEST: usize = (1 << 20) + 4096;
/// Requests of one connection in progress at once.
const IN_FLIGHT: usize = 16;
/// Requests of all connections in progress at once.
const IN_FLIGHT_ALL: usize = 64;
/// Connections open at once, and from one client address.
const MAX_CONNECTIONS: usize = 128;
const MAX_CONNECTIONS_PER_ADDRESS: usize = 32;

/// Who may use which share: the daemon's allowlists.
pub type Admit = Arc<dyn Fn(&ShareInfo, IpAddr) -> bool + Send + Sync>;

/// The NFS server over the gateway's shares.
pub struct NfsServer {
    shares: Arc<Shares>,
    admit: Admit,
    /// The write verifier of this run.
    verifier: [u8; 8],
    metrics: Arc<NfsMetrics>,
    /// Requests in progress, all connections together (`IN_FLIGHT_ALL`).
    in_flight: Arc<Semaphore>,
    /// Connections open, by client address.
    open: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
    /// The name each directory listing's last cookie stood for when it was given out.
    cookies: std::sync::Mutex<Cookies>,
}

/// The names that the cookies of READDIR and READDIRPLUS replies stood for, every entry's
/// (a client may go on from any of them: Linux does from the last it handed to `getdents`),
/// newest `COOKIES` of them: a listing goes on after the name its cookie was given for, even
/// once that entry is renamed or removed (iterate-and-delete, `rm -r`). A cookie is an
/// entry's fileid; one forgotten here is looked up by the entry's name now, if it is still
/// in that directory.
#[derive(Default)]
struct Cookies {
    names: std::collections::HashMap<(String, u64, u64), String>,
    order: std::collections::VecDeque<(String, u64, u64)>,
}

/// Cookies remembered, all shares and clients together: tens of megabytes at most, and
/// another client's listings push one out only after this many entries.
const COOKIES: usize = 1 << 16;

impl Cookies {
    fn remember(&mut self, key: (String, u64, u64), name: String) {
        if self.names.insert(key.clone(), name).is_none() {
            self.order.push_back(key);
            if self.order.len() > COOKIES
                && let Some(oldest) = self.order.pop_front()
            {
                self.names.remove(&oldest);
            }
        }
    }

    fn name(&self, key: &(String, u64, u64)) -> Option<String> {
        self.names.get(key).cloned()
    }
}

/// A connection counted in `NfsServer::open`, until dropped.
struct Counted<'a> {
    server: &'a NfsServer,
    peer: IpAddr,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let mut open = self.server.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// NFS procedure names, by number (RFC 1813); MOUNT calls count as "mount".
const PROCEDURES: [&str; 22] = [
    "null",
    "getattr",
    "setattr",
    "lookup",
    "access",
    "readlink",
    "read",
    "write",
    "create",
    "mkdir",
    "symlink",
    "mknod",
    "remove",
    "rmdir",
    "rename",
    "link",
    "readdir",
    "readdirplus",
    "fsstat",
    "fsinfo",
    "pathconf",
    "commit",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ProcLabels {
    procedure: &'static str,
}

type Histogram = prometheus_client::metrics::histogram::Histogram;

/// `firn_nfs_*`: calls, failed calls and time per procedure.
#[derive(Debug)]
pub struct NfsMetrics {
    calls: prometheus_client::metrics::family::Family<
        ProcLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    errors: prometheus_client::metrics::family::Family<
        ProcLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    seconds: prometheus_client::metrics::family::Family<ProcLabels, Histogram, fn() -> Histogram>,
}

impl NfsMetrics {
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> NfsMetrics {
        fn histogram() -> Histogram {
            // 50 µs to about 13 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.00005, 2.0, 19,
            ))
        }
        let metrics = NfsMetrics {
            calls: Default::default(),
            errors: Default::default(),
            seconds: prometheus_client::metrics::family::Family::new_with_constructor(histogram),
        };
        registry.register(
            "firn_nfs_calls",
            "NFS and MOUNT calls answered, by procedure",
            metrics.calls.clone(),
        );
        registry.register(
            "firn_nfs_errors",
            "NFS calls answered with an error status, by procedure",
            metrics.errors.clone(),
        );
        registry.register(
            "firn_nfs_call_seconds",
            "Time to answer an NFS call, by procedure",
            metrics.seconds.clone(),
        );
        metrics
    }

    fn record(&self, procedure: &'static str, failed: bool, took: std::time::Duration) {
        let labels = ProcLabels { procedure };
        self.calls.get_or_create(&labels).inc();
        if failed {
            self.errors.get_or_create(&labels).inc();
        }
        self.seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}

impl std::fmt::Debug for NfsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsServer").finish_non_exhaustive()
    }
}

/// The credentials of a call.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub peer: IpAddr,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (AUTH_UNIX carries at most 16): the first `group_count`.
    pub groups: [u32; 16],
    pub group_count: usize,
}

impl NfsServer {
    /// Notes that each entry's cookie (its fileid) of directory `dir` in share `share`
    /// stands for its name.
    fn remember_cookies(&self, share: &str, dir: u64, entries: &[(String, Attrs)]) {
        let mut cookies = self
            .cookies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, attrs) in entries {
            cookies.remember((share.to_string(), dir, attrs.fileid), name.clone());
        }
    }

    /// The name `cookie` of directory `dir` in share `share` stood for, if remembered.
    fn cookie_name(&self, share: &str, dir: u64, cookie: u64) -> Option<String> {
        self.cookies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .name(&(share.to_string(), dir, cookie))
    }

    pub fn new(shares: Arc<Shares>, admit: Admit, metrics: Arc<NfsMetrics>) -> Arc<NfsServer> {
        Arc::new(NfsServer {
            shares,
            admit,
            verifier: rand::random(),
            metrics,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_ALL)),
            open: std::sync::Mutex::new(std::collections::HashMap::new()),
            cookies: Default::default(),
        })
    }

    /// Counts a new connection from `peer`; `None` if there are too many.
    fn count(&self, peer: IpAddr) -> Option<Counted<'_>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        let mine = open.get(&peer).copied().unwrap_or(0);
        if total >= MAX_CONNECTIONS || mine >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *open.entry(peer).or_insert(0) += 1;
        Some(Counted { server: self, peer })
    }

    /// Serves connections from `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("nfs: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.connection(stream, peer).await {
                    tracing::debug!(%peer, "nfs connection ended: {e}");
                }
            });
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> std::io::Result<()> {
        // Only a client some share admits gets a connection: the others could not mount
        // anything, but could hold the door's connections and calls.
        let admitted = self
            .shares
            .list()
            .unwrap_or_default()
            .iter()
            .any(|share| (self.admit)(share, peer.ip()));
        if !admitted {
            tracing::debug!(%peer, "nfs: refused: no share admits this address");
            return Ok(());
        }
        let Some(_counted) = self.count(peer.ip()) else {
            tracing::debug!(%peer, "nfs: refused: too many connections");
            return Ok(());
        };
        // Replies go out from the thread that made them, through a second handle on the
        // socket: a hand-off to a writer task cost a wake-up per call.
        let stream = stream.into_std()?;
        let replies = Arc::new(Replies(std::sync::Mutex::new(stream.try_clone()?)));
        let mut reader = TcpStream::from_std(stream)?;
        let permits = Arc::new(Semaphore::new(IN_FLIGHT));
        while let Some(request) = read_record(&mut reader).await? {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?;
            let shared = self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?;
            let (server, replies) = (self.clone(), replies.clone());
            tokio::task::spawn_blocking(move || {
                if let Some(reply) = server.call(&request, peer.ip())
                    && let Err(e) = replies.send(&reply)
                {
                    tracing::debug!(%peer, "nfs reply not sent: {e}");
                    replies.close();
                }
                drop((permit, shared));
            });
        }
        // The calls in progress answer before the connection is closed.
        let _all = permits
            .acquire_many(IN_FLIGHT as u32)
            .await
            .map_err(std::io::Error::other)?;
        replies.close();
        Ok(())
    }

    /// Answers one RPC call with a whole record (its record mark first); `None` for what
    /// deserves no answer (a reply, what cannot be told to be a call).
    pub fn call(&self, request: &[u8], peer: IpAddr) -> Option<Vec<u8>> {
        if !fits::call_header(request) {
            // Lengths that do not fit in the call: refused before the decoder could reserve
            // what they claim.
            return refused_header(request);
        }
        let mut input = Cursor::new(request);
        let Ok((message, _)) = rpc_msg::unpack(&mut input) else {
            return refused_header(request);
        };
        let xid = message.xid;
        let msg_body::CALL(call) = message.body else {
            return None;
        };
        if call.rpcvers != RPC_VERSION_2 {
            return Some(denied(xid, rejected_reply::rpc_mismatch(2, 2)));
        }
        let mut groups = [0; 16];
        let mut group_count = 0;
        let (uid, gid) = match call.cred.flavor {
            auth_flavor::AUTH_UNIX => {
                match auth_unix::unpack(&mut Cursor::new(&call.cred.body.0[..])) {
                    Ok((auth, _)) => {
                        group_count = auth.gids.len().min(16);
                        groups[..group_count].copy_from_slice(&auth.gids[..group_count]);
                        (auth.uid, auth.gid)
                    }
                    Err(_) => {
                        return Some(denied(
                            xid,
                            rejected_reply::auth_error(auth_stat::AUTH_BADCRED),
                        ));
                    }
                }
            }
            auth_flavor::AUTH_NULL => (NOBODY, NOBODY),
            _ => {
                return Some(denied(
                    xid,
                    rejected_reply::auth_error(auth_stat::AUTH_TOOWEAK),
                ));
            }
        };
        let caller = Caller {
            peer,
            uid,
            gid,
            groups,
            group_count,
        };
        let args = &request[input.position() as usize..];
        let started = std::time::Instant::now();
        let outcome = match (call.prog, call.vers) {
            (NFS_PROGRAM, VERSION_3) => {
                let outcome = if fits::nfs_args(call.proc, args) {
                    procs::nfs(self, caller, call.proc, args)
                } else {
                    Err(accept_stat_data::GARBAGE_ARGS)
                };
                if let Some(&procedure) = PROCEDURES.get(call.proc as usize) {
                    // Every result but NULL's starts with its nfsstat3.
                    let failed = match &outcome {
                        Ok(result) => result.get(..4).is_some_and(|s| s != [0; 4]),
                        Err(_) => true,
                    };
                    self.metrics.record(procedure, failed, started.elapsed());
                }
                outcome
            }
            (MOUNT_PROGRAM, VERSION_3) => {
                let outcome = if fits::mount_args(call.proc, args) {
                    procs::mount(self, caller, call.proc, args)
                } else {
                    Err(accept_stat_data::GARBAGE_ARGS)
                };
                self.metrics
                    .record("mount", outcome.is_err(), started.elapsed());
                outcome
            }
            (NFS_PROGRAM | MOUNT_PROGRAM, _) => Err(accept_stat_data::PROG_MISMATCH {
                low: VERSION_3,
                high: VERSION_3,
            }),
            _ => Err(accept_stat_data::PROG_UNAVAIL),
        };
        Some(match outcome {
            Ok(result) => accepted(xid, accept_stat_data::SUCCESS, &result),
            Err(status) => accepted(xid, status, &[]),
        })
    }

    /// The running share a handle's share id names, if the caller is admitted to it.
    fn share_by_id(&self, id: &[u8], peer: IpAddr) -> Result<Arc<Share>, ShareAccess> {
        let share = self
            .shares
            .share_by_id(&hex::encode(id))
            .ok_or(ShareAccess::Stale)?;
        if !(self.admit)(share.info(), peer) {
            return Err(ShareAccess::Refused);
        }
        Ok(share)
    }
}

/// The sending side of a connection, shared by the threads answering its calls; a whole
/// reply goes out under the lock, so replies never interleave.
struct Replies(std::sync::Mutex<std::net::TcpStream>);

/// How long a reply may wait for a client to read what came before it; past that the
/// connection is closed, so a client that stops reading cannot hold threads forever.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Replies {
    /// Sends `reply` whole. The socket is non-blocking (the reading side is the runtime's):
    /// a full send buffer is waited out with `poll`.
    fn send(&self, reply: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::fd::AsFd;
        let mut stream = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rest = reply;
        while !rest.is_empty() {
            match stream.write(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [nix::poll::PollFd::new(
                        stream.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    let timeout = nix::poll::PollTimeout::try_from(SEND_TIMEOUT)
                        .unwrap_or(nix::poll::PollTimeout::MAX);
                    match nix::poll::poll(&mut fds, timeout) {
                        Ok(0) => return Err(std::io::ErrorKind::TimedOut.into()),
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Closes the connection both ways, which also ends its reading side.
    fn close(&self) {
        let stream = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Why a handle's share cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShareAccess {
    Stale,
    Refused,
}

/// The anonymous user: AUTH_NULL callers and squashed ones.
pub const NOBODY: u32 = 65534;

/// The answer to a message whose header does not decode: nothing for a reply or what
/// cannot be told to be a call, AUTH_ERROR for a call (AUTH_TOOWEAK for a flavor firn does
/// not speak, such as RPCSEC_GSS; AUTH_BADCRED for a credential that does not decode, such as
/// AUTH_UNIX with more than 16 groups), so the client is told rather than left waiting.
fn refused_header(request: &[u8]) -> Option<Vec<u8>> {
    let word = |at: usize| {
        request
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("four bytes")))
    };
    let xid = word(0)?;
    // A call (message type 0) of RPC version 2.
    if word(4)? != 0 || word(8)? != RPC_VERSION_2 {
        return None;
    }
    let why = match word(24) {
        Some(0 | 1) | None => auth_stat::AUTH_BADCRED,
        Some(_) => auth_stat::AUTH_TOOWEAK,
    };
    Some(denied(xid, rejected_reply::auth_error(why)))
}

/// How long a client has to send the rest of a call once its first byte came: a client
/// that stalls in the middle of one gives its connection up (its place among the
/// connections from its address with it). Between calls a connection may idle as long as
/// the client likes.
const RECORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads one RPC record (its fragments joined); `None` at a clean end of stream.
async fn read_record(reader: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    // The wait for the next call, however long.
    let got = loop {
        match reader.read(&mut header).await {
            Ok(0) => return Ok(None),
            Ok(got) => break got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    match tokio::time::timeout(RECORD_TIMEOUT, read_rest(reader, header, got)).await {
        Ok(record) => record.map(Some),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("a call not sent whole within {RECORD_TIMEOUT:?}"),
        )),
    }
}

/// The rest of a record whose first `got` bytes of `header` came.
async fn read_rest(
    reader: &mut (impl AsyncReadExt + Unpin),
    mut header: [u8; 4],
    got: usize,
) -> std::io::Result<Vec<u8>> {
    let mut record = Vec::new();
    reader.read_exact(&mut header[got..]).await?;
    loop {
        let mark = u32::from_be_bytes(header);
        let (last, len) = (mark & 0x8000_0000 != 0, (mark & 0x7fff_ffff) as usize);
        if record.len() + len > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("an RPC record of more than {MAX_REQUEST} bytes"),
            ));
        }
        // Read into spare capacity: zeroing 1 MiB for every WRITE was a fifth of the
        // server's CPU while it took a large file.
        record.reserve(len);
        let start = record.len();
        (&mut *reader)
            .take(len as u64)
            .read_to_end(&mut record)
            .await?;
        if record.len() - start < len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if last {
            return Ok(record);
        }
        reader.read_exact(&mut header).await?;
    }
}

/// An empty record: room for its mark, which `framed` fills in. Replies are built in place
/// behind it, so a READ's megabyte is never copied just to be framed.
fn record() -> Vec<u8> {
    vec![0; 4]
}

/// `record` marked as one last fragment.
fn framed(mut record: Vec<u8>) -> Vec<u8> {
    let len = (record.len() - 4) as u32;
    record[..4].copy_from_slice(&(0x8000_0000 | len).to_be_bytes());
    record
}

fn accepted(xid: u32, status: accept_stat_data, result: &[u8]) -> Vec<u8> {
    let message = rpc_msg {
        xid,
        body: msg_body::REPLY(reply_body::MSG_ACCEPTED(accepted_reply {
            verf: opaque_auth::default(),
            reply_data: status,
        })),
    };
    let mut out = record();
    out.reserve(message.packed_size() + result.len());
    message.pack(&mut out).expect("a reply packs into memory");
    out.extend_from_slice(result);
    framed(out)
}

fn denied(xid: u32, reason: rejected_reply) -> Vec<u8> {
    let message = rpc_msg {
        xid,
        body: msg_body::REPLY(reply_body::MSG_DENIED(reason)),
    };
    let mut out = record();
    message.pack(&mut out).expect("a reply packs into memory");
    framed(out)
}

/// Decodes a procedure's arguments, which must be the whole rest of the call.
fn decode<T: Unpack>(args: &[u8]) -> Result<T, accept_stat_data> {
    let mut input = Cursor::new(args);
    let (value, _) = T::unpack(&mut input).map_err(|_| accept_stat_data::GARBAGE_ARGS)?;
    Ok(value)
}

/// Encodes a procedure's result.
fn encode(value: &impl Pack) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.packed_size());
    value.pack(&mut out).expect("a result packs into memory");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    use crate::engines::share::{Settings, Squash};
    use crate::local::meta::MetaStore;
    use crate::remote::dir::DirStore;

    /// One server over a read-only share and a writable one, for every case.
    struct Rig {
        server: Arc<NfsServer>,
        bucket: std::path::PathBuf,
        _runtime: tokio::runtime::Runtime,
        _dir: tempfile::TempDir,
    }

    fn rig() -> &'static Rig {
        static RIG: OnceLock<Rig> = OnceLock::new();
        RIG.get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let meta = Arc::new(MetaStore::open(dir.path().join("meta.redb")).expect("meta"));
            let remote = Arc::new(DirStore::open(dir.path().join("bucket")).expect("bucket"));
            let shares = Shares::open(
                meta,
                dir.path().join("shares"),
                remote,
                runtime.handle().clone(),
                Settings::default(),
                None,
            )
            .expect("shares");
            shares
                .create("ro", "ro/", true, Vec::new(), Squash::Root)
                .expect("share");
            shares
                .create("rw", "rw/", false, Vec::new(), Squash::Root)
                .expect("share");
            let metrics = Arc::new(NfsMetrics::new(
                &mut prometheus_client::registry::Registry::default(),
            ));
            let server = NfsServer::new(Arc::new(shares), Arc::new(|_, _| true), metrics);
            Rig {
                server,
                bucket: dir.path().join("bucket"),
                _runtime: runtime,
                _dir: dir,
            }
        })
    }

    /// A call header (xid 9, AUTH_UNIX as root) and `args`.
    fn call(prog: u32, proc: u32, args: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [9u32, 0, 2, prog, 3, proc, 1] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        // auth_unix: stamp, machine name "m", uid 0, gid 0, no groups.
        let cred: Vec<u8> = [1u32, 1, 0x6d00_0000, 0, 0, 0]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        out.extend_from_slice(&(cred.len() as u32).to_be_bytes());
        out.extend_from_slice(&cred);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(args);
        out
    }

    /// The root handle of share `name`, from MNT.
    fn root(name: &str) -> Vec<u8> {
        let path = format!("/{name}");
        let mut args = (path.len() as u32).to_be_bytes().to_vec();
        args.extend_from_slice(path.as_bytes());
        args.resize(4 + path.len().div_ceil(4) * 4, 0);
        let reply =
            answer(&call(MOUNT_PROGRAM, 1, &args), IpAddr::from([127, 0, 0, 1])).expect("reply");
        // xid, REPLY, MSG_ACCEPTED, verifier (flavor, length 0), SUCCESS, MNT3_OK, handle.
        assert_eq!(&reply[20..28], &[0; 8], "mount failed: {reply:?}");
        let len = u32::from_be_bytes(reply[28..32].try_into().expect("len")) as usize;
        reply[32..32 + len].to_vec()
    }

    /// The server's answer to `record`, its record mark checked and taken off.
    fn answer(record: &[u8], peer: IpAddr) -> Option<Vec<u8>> {
        let reply = rig().server.call(record, peer)?;
        let mark = u32::from_be_bytes(reply[..4].try_into().expect("mark"));
        assert_eq!(
            mark,
            0x8000_0000 | (reply.len() as u32 - 4),
            "one last fragment"
        );
        Some(reply[4..].to_vec())
    }

    /// Opaque XDR: length, bytes, padding.
    fn opaque(bytes: &[u8]) -> Vec<u8> {
        let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out.resize(4 + bytes.len().div_ceil(4) * 4, 0);
        out
    }

    /// Valid calls to start mutating from: a CREATE, a WRITE, a READDIRPLUS, a RENAME and a
    /// SETATTR on the read-only share, a LOOKUP on the writable one; MOUNT's MNT, UMNT and
    /// EXPORT.
    fn seeds() -> Vec<Vec<u8>> {
        let (ro, rw) = (root("ro"), root("rw"));
        let mut create = opaque(&ro);
        create.extend_from_slice(&opaque(b"new"));
        create.extend_from_slice(&[0, 0, 0, 0]);
        create.extend_from_slice(&[0; 24]);
        let mut write = opaque(&ro);
        write.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 2]);
        write.extend_from_slice(&opaque(b"data"));
        let mut readdir = opaque(&ro);
        readdir.extend_from_slice(&[0; 16]);
        readdir.extend_from_slice(&[0, 0, 16, 0, 0, 0, 32, 0]);
        let mut lookup = opaque(&rw);
        lookup.extend_from_slice(&opaque(b"missing"));
        let mut rename = opaque(&ro);
        rename.extend_from_slice(&opaque(b"a"));
        rename.extend_from_slice(&opaque(&ro));
        rename.extend_from_slice(&opaque(b"b"));
        // Every attribute "don't change", no guard.
        let mut setattr = opaque(&ro);
        setattr.extend_from_slice(&[0; 28]);
        vec![
            call(NFS_PROGRAM, 8, &create),
            call(NFS_PROGRAM, 7, &write),
            call(NFS_PROGRAM, 17, &readdir),
            call(NFS_PROGRAM, 3, &lookup),
            call(NFS_PROGRAM, 14, &rename),
            call(NFS_PROGRAM, 2, &setattr),
            call(MOUNT_PROGRAM, 1, &opaque(b"/rw")),
            call(MOUNT_PROGRAM, 3, &opaque(b"/rw")),
            call(MOUNT_PROGRAM, 5, &[]),
        ]
    }

    /// Whether every object in the bucket is under a share's prefix (`rw/`; the read-only
    /// share's stays empty).
    fn bucket_holds_only_shares_objects() -> bool {
        std::fs::read_dir(&rig().bucket).is_ok_and(|entries| {
            entries.flatten().all(|e| {
                let name = e.file_name();
                name == "rw" || name.to_string_lossy().starts_with(".firn")
            })
        })
    }

    /// Whether the read-only share is still empty.
    fn read_only_share_is_empty() -> bool {
        let share = rig().server.shares.share("ro").expect("share");
        share.list(share.root(), None, 10).expect("list").is_empty()
    }

    proptest! {
        #[test]
        fn random_records_never_crash(record in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = answer(&record, IpAddr::from([127, 0, 0, 1]));
            prop_assert!(read_only_share_is_empty());
            prop_assert!(bucket_holds_only_shares_objects());
        }

        #[test]
        fn changed_calls_never_crash_or_change_a_read_only_share(
            seed in 0usize..9,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut record = seeds()[seed].clone();
            for (at, value) in flips {
                let at = at % record.len();
                record[at] = value;
            }
            let keep = record.len() - cut % (record.len() / 2);
            record.truncate(keep);
            let _ = answer(&record, IpAddr::from([127, 0, 0, 1]));
            prop_assert!(read_only_share_is_empty());
            prop_assert!(bucket_holds_only_shares_objects());
        }
    }

    #[test]
    fn the_seed_calls_are_answered() {
        for seed in seeds() {
            let reply = answer(&seed, IpAddr::from([127, 0, 0, 1])).expect("reply");
            // Accepted and SUCCESS at the RPC level; the procedure's own status follows.
            assert_eq!(&reply[20..24], &[0; 4]);
        }
        assert!(read_only_share_is_empty());
    }

    /// A WRITE whose data claims 4 GiB (in a call of a few dozen bytes) is refused as garbage
    /// before anything reserves what it claims; the honest one beside it is served.
    #[test]
    fn declared_lengths_beyond_the_call_are_garbage() {
        let mut write = opaque(&root("rw"));
        write.extend_from_slice(&[0; 12]);
        write.extend_from_slice(&2u32.to_be_bytes());
        write.extend_from_slice(&u32::MAX.to_be_bytes());
        write.extend_from_slice(b"data");
        let reply =
            answer(&call(NFS_PROGRAM, 7, &write), IpAddr::from([127, 0, 0, 1])).expect("reply");
        // Accepted, GARBAGE_ARGS (4).
        assert_eq!(&reply[20..24], &4u32.to_be_bytes());
        // A credential that claims 4 billion groups (or 17) is refused: MSG_DENIED (1),
        // AUTH_ERROR (1), AUTH_BADCRED (1), for the call's xid.
        let denied_for = |call: &[u8]| {
            let reply = answer(call, IpAddr::from([127, 0, 0, 1])).expect("an answer");
            assert_eq!(&reply[0..4], &9u32.to_be_bytes(), "the xid");
            assert_eq!(
                &reply[4..16],
                &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1],
                "a reply, MSG_DENIED, AUTH_ERROR"
            );
            u32::from_be_bytes(reply[16..20].try_into().expect("auth_stat"))
        };
        for groups in [u32::MAX, 17] {
            let mut call = call(NFS_PROGRAM, 0, &[]);
            call[52..56].copy_from_slice(&groups.to_be_bytes());
            assert_eq!(denied_for(&call), 1, "{groups} groups");
        }
        // A flavor firn does not speak (RPCSEC_GSS, 6): AUTH_TOOWEAK (5).
        let mut gss = call(NFS_PROGRAM, 0, &[]);
        gss[24..28].copy_from_slice(&6u32.to_be_bytes());
        assert_eq!(denied_for(&gss), 5);
        // A reply, or bytes that are no call, get nothing.
        let mut reply = call(NFS_PROGRAM, 0, &[]);
        reply[4..8].copy_from_slice(&1u32.to_be_bytes());
        reply[52..56].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(answer(&reply, IpAddr::from([127, 0, 0, 1])).is_none());
        assert!(answer(&[0, 0], IpAddr::from([127, 0, 0, 1])).is_none());
    }
}
