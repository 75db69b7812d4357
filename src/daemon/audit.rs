//! The audit log: every `/api` call, in `<data dir>/audit.log` (a local log of JSON records,
//! format in docs/format.md). It fails closed: a change is recorded (its intent) before it is
//! made and refused while the log cannot be written; its outcome is recorded after. Records
//! are capped in size, and calls refused for a bad token are counted, not written one by one,
//! so whoever can reach the port cannot fill the disk through it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::local::log::{Log, LogError, Recovery};

/// The most bytes of a path (or a method) one record keeps.
pub const MAX_PATH_BYTES: usize = 256;
const MAX_METHOD_BYTES: usize = 16;
/// The largest request body a change's intent record carries whole (a JSON body; a larger or
/// other one is recorded by its length).
pub const MAX_REQUEST_BYTES: usize = 4096;
/// At most one record per this interval for each cause of refusal.
pub const REFUSED_EVERY: Duration = Duration::from_secs(1);

/// What one record says about a call, capped.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    /// The path's length in bytes, when it was cut to [`MAX_PATH_BYTES`].
    pub path_bytes: Option<usize>,
    pub peer: Option<String>,
    /// A change's request body (`with_request`).
    pub request: Option<Value>,
    /// Its length in bytes, when it is not in `request` (too large, or not JSON).
    pub request_bytes: Option<usize>,
}

impl Call {
    pub fn new(method: &str, path: &str, peer: Option<String>) -> Call {
        let (path, path_bytes) = if path.len() > MAX_PATH_BYTES {
            (cut(path, MAX_PATH_BYTES).to_string(), Some(path.len()))
        } else {
            (path.to_string(), None)
        };
        Call {
            method: cut(method, MAX_METHOD_BYTES).to_string(),
            path,
            path_bytes,
            peer,
            request: None,
            request_bytes: None,
        }
    }

    /// The call with its request body, for the intent record: whole if it is JSON of at most
    /// [`MAX_REQUEST_BYTES`], else its length. (No call of the API carries a secret.)
    pub fn with_request(mut self, body: &[u8]) -> Call {
        if body.is_empty() {
            return self;
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(value) if body.len() <= MAX_REQUEST_BYTES => self.request = Some(value),
            _ => self.request_bytes = Some(body.len()),
        }
        self
    }

    fn record(&self) -> serde_json::Map<String, Value> {
        let mut record = serde_json::Map::new();
        record.insert("time".into(), now().into());
        record.insert("method".into(), self.method.clone().into());
        record.insert("path".into(), self.path.clone().into());
        if let Some(len) = self.path_bytes {
            record.insert("path_bytes".into(), len.into());
        }
        record.insert("peer".into(), self.peer.clone().into());
        record
    }
}

fn cut(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Refused calls of one cause since the last record of that cause.
struct Refusals {
    written: Instant,
    pending: u64,
    sample: Option<(Call, u16)>,
}

/// Space the audit log keeps aside in a file of its own (`<log>.reserve`), given up when the
/// disk is full: the records of changes that make room (a bandwidth change that resumes
/// uploads, a delete) still go in when another program has filled the disk. About 3,000
/// records.
pub const RESERVE_BYTES: i64 = 1 << 20;
/// How often a reserve given up is made again, once there is room.
const RESERVE_RETRY: Duration = Duration::from_secs(10);

pub struct Audit {
    path: PathBuf,
    /// `<log>.reserve`; when it was last found missing and not made again.
    reserve: PathBuf,
    reserve_missing: Mutex<Option<Instant>>,
    /// `None` after a write failed: the next call reopens the log, whose recovery finds out
    /// what reached the disk.
    log: Mutex<Option<Log>>,
    refused: Mutex<HashMap<&'static str, Refusals>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("path", &self.path).finish()
    }
}

impl Audit {
    /// Opens (or creates) the audit log. The recovery report says whether a damaged tail was
    /// set aside.
    pub fn open(path: &Path) -> Result<(Audit, Recovery), LogError> {
        let (log, recovery) = match Log::open(path) {
            Ok((log, recovery)) => (Some(log), recovery),
            // A full disk, with no room to keep a damaged tail aside before cutting it (or to
            // make the log): the gateway starts all the same. Every change is refused (503)
            // until a call finds the room to open the log; reads go on.
            Err(e @ LogError::Io { .. }) if no_space(&e) => {
                tracing::warn!(
                    "{e}: changes through the API are refused until there is room to open the audit log"
                );
                (None, Recovery::default())
            }
            Err(e) => return Err(e),
        };
        let mut reserve = path.as_os_str().to_owned();
        reserve.push(".reserve");
        let audit = Audit {
            path: path.to_path_buf(),
            reserve: PathBuf::from(reserve),
            reserve_missing: Mutex::new(None),
            log: Mutex::new(log),
            refused: Mutex::new(HashMap::new()),
        };
        if !audit.make_reserve() {
            *audit
                .reserve_missing
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
        Ok((audit, recovery))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The intent of a change, before it is made. An error means the change must not be made.
    pub fn intent(&self, id: u64, call: &Call) -> Result<(), LogError> {
        let mut record = call.record();
        if let Some(request) = &call.request {
            record.insert("request".into(), request.clone());
        }
        if let Some(len) = call.request_bytes {
            record.insert("request_bytes".into(), len.into());
        }
        record.insert("call".into(), id.into());
        record.insert("phase".into(), "intent".into());
        self.write(&Value::Object(record))
    }

    /// The outcome of a change whose intent was recorded, or a read.
    pub fn outcome(&self, id: u64, call: &Call, status: u16, change: bool) -> Result<(), LogError> {
        let mut record = call.record();
        record.insert("call".into(), id.into());
        if change {
            record.insert("phase".into(), "outcome".into());
        }
        record.insert("status".into(), status.into());
        self.write(&Value::Object(record))
    }

    /// A call refused before it ran (`cause` names why). Only counted here, in memory, so a
    /// flood costs no disk I/O: [`Audit::flush_refused`] writes at most one record per
    /// [`REFUSED_EVERY`] for each cause, carrying `count`, the refused calls it stands for,
    /// and describing the latest of them.
    pub fn refused(&self, cause: &'static str, call: Call, status: u16) {
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = refused.entry(cause).or_insert(Refusals {
            written: Instant::now() - REFUSED_EVERY,
            pending: 0,
            sample: None,
        });
        entry.pending += 1;
        entry.sample = Some((call, status));
    }

    /// Writes the counts of refused calls not yet recorded, of causes with no record in the
    /// last [`REFUSED_EVERY`] (of all causes with `now`, at stop). Called every
    /// [`REFUSED_EVERY`].
    pub fn flush_refused(&self, now: bool) {
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        for (cause, entry) in refused.iter_mut() {
            if entry.pending > 0 && (now || entry.written.elapsed() >= REFUSED_EVERY) {
                self.write_refusals(cause, entry);
            }
        }
    }

    fn write_refusals(&self, cause: &str, entry: &mut Refusals) {
        let Some((call, status)) = entry.sample.take() else {
            return;
        };
        let mut record = call.record();
        record.insert("status".into(), status.into());
        record.insert("refused".into(), cause.into());
        record.insert("count".into(), entry.pending.into());
        entry.written = Instant::now();
        match self.write(&Value::Object(record)) {
            Ok(()) => entry.pending = 0,
            // Kept: the count is written with the next record of this cause.
            Err(e) => {
                entry.sample = Some((call, status));
                tracing::error!("audit log: {e}");
            }
        }
    }

    /// Makes the reserve again if it was given up (or could not be made) and not tried in the
    /// last `RESERVE_RETRY`.
    fn keep_reserve(&self) {
        let mut missing = self
            .reserve_missing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if missing.is_none_or(|since| since.elapsed() < RESERVE_RETRY) {
            return;
        }
        *missing = (!self.make_reserve()).then(Instant::now);
    }

    /// Makes the reserve (`RESERVE_BYTES`), or tops it up; whether it is whole. Best effort:
    /// a disk without the room has none to give.
    fn make_reserve(&self) -> bool {
        let made = (|| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&self.reserve)?;
            nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, RESERVE_BYTES)?;
            file.sync_all()
        })();
        made.is_ok()
    }

    /// Gives the reserve up to the log; whether there was one.
    fn give_up_reserve(&self) -> bool {
        let gone = std::fs::remove_file(&self.reserve).is_ok();
        if gone {
            tracing::warn!(
                "the disk of {} is full: the audit log takes the {RESERVE_BYTES} bytes it kept aside",
                self.path.display()
            );
            *self
                .reserve_missing
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
        gone
    }

    /// Appends one record and syncs it; on a full disk, once more with the reserve given up.
    fn write(&self, record: &Value) -> Result<(), LogError> {
        let line = record.to_string();
        match self.append(&line) {
            Err(_) if self.give_up_reserve() => self.append(&line),
            Ok(()) => {
                self.keep_reserve();
                Ok(())
            }
            failed => failed,
        }
    }

    fn append(&self, line: &str) -> Result<(), LogError> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let open = match log.as_mut() {
            Some(open) => open,
            None => {
                let (reopened, recovery) = Log::open(&self.path)?;
                report_recovery(&self.path, &recovery);
                log.insert(reopened)
            }
        };
        let written = open.append(line.as_bytes()).and_then(|_| open.sync());
        if written.is_err() {
            // Poisoned now; drop it (and its lock) so the next call starts from what the disk
            // holds.
            *log = None;
        }
        written
    }
}

/// Whether `e` is the disk (or the quota) being full.
fn no_space(e: &LogError) -> bool {
    let LogError::Io { source, .. } = e else {
        return false;
    };
    matches!(
        source.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Says, loudly, that the log's tail did not check out and where it was kept.
pub fn report_recovery(path: &Path, recovery: &Recovery) {
    if recovery.bytes_dropped == 0 {
        return;
    }
    let message = format!(
        "audit log {}: {} bytes after record {} did not check out ({:?}); they were moved to {}",
        path.display(),
        recovery.bytes_dropped,
        recovery.records,
        recovery.damage,
        recovery
            .kept_aside
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "nowhere".to_string()),
    );
    tracing::warn!("{message}");
    println!("WARNING: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_carries_its_body_whole_if_small_and_json_else_its_length() {
        let call = |body: &[u8]| {
            let call = Call::new("POST", "/api/v1/volumes", None).with_request(body);
            (call.request, call.request_bytes)
        };
        assert_eq!(
            call(br#"{"name":"db1","size":"1G"}"#),
            (Some(serde_json::json!({"name": "db1", "size": "1G"})), None)
        );
        assert_eq!(call(b""), (None, None));
        assert_eq!(call(b"not json"), (None, Some(8)));
        let big = format!("{{\"allow\":[{}\"x\"]}}", "\"10.0.0.0/8\",".repeat(400));
        assert_eq!(call(big.as_bytes()), (None, Some(big.len())));
    }

    #[test]
    fn long_paths_and_methods_are_cut_at_a_character_boundary() {
        let path = format!("/api/v1/{}", "é".repeat(1000));
        let call = Call::new(&"X".repeat(100), &path, None);
        assert!(call.path.len() <= MAX_PATH_BYTES && path.starts_with(&call.path));
        assert_eq!(call.path_bytes, Some(path.len()));
        assert_eq!(call.method.len(), MAX_METHOD_BYTES);
        let short = Call::new("GET", "/api/v1/status", None);
        assert_eq!(
            (short.path.as_str(), short.path_bytes),
            ("/api/v1/status", None)
        );
    }

    #[test]
    fn refused_calls_become_one_record_per_interval_with_their_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let (audit, _) = Audit::open(&path).expect("open");
        for i in 0..100 {
            audit.refused(
                "token",
                Call::new("GET", &format!("/api/v1/{i}"), None),
                401,
            );
        }
        audit.flush_refused(false);
        for _ in 0..5 {
            audit.refused("token", Call::new("GET", "/api/v1/x", None), 401);
        }
        // Within the interval: nothing more is written until it is over (or at stop).
        audit.flush_refused(false);
        audit.flush_refused(true);
        audit.flush_refused(true);
        drop(audit);
        let (mut log, _) = Log::open(&path).expect("open");
        let records: Vec<Value> = log
            .iter()
            .expect("iter")
            .map(|r| serde_json::from_slice(&r.expect("record").payload).expect("json"))
            .collect();
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(
            (records[0]["count"].as_u64(), records[1]["count"].as_u64()),
            (Some(100), Some(5))
        );
        assert_eq!(records[0]["path"], "/api/v1/99");
        assert_eq!(records[1]["refused"], "token");
    }

    #[test]
    fn a_failed_write_is_an_error_and_the_next_one_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let (audit, _) = Audit::open(&path).expect("open");
        let call = Call::new("PUT", "/api/v1/bandwidth", None);
        audit.intent(1, &call).expect("intent");
        // Poison it as a failed write would.
        *audit.log.lock().expect("lock") = None;
        audit.outcome(1, &call, 200, true).expect("reopened");
        let (mut log, _) = {
            drop(audit);
            Log::open(&path).expect("open")
        };
        let records: Vec<Value> = log
            .iter()
            .expect("iter")
            .map(|r| serde_json::from_slice(&r.expect("record").payload).expect("json"))
            .collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["phase"], "intent");
        assert_eq!(records[1]["status"], 200);
    }
}
