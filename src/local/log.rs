//! An append-only log on the gateway's disk: each record framed with its length and a CRC32C,
//! appends buffered in memory, and durability only at explicit [`Log::sync`] points.
//!
//! Engines use it for data that must survive a crash between being accepted and being moved on
//! (an ingest record acknowledged to a producer, a block write acknowledged at FLUSH).
//!
//! File format, version 1 (all integers little-endian; `docs/format.md` has the table and the
//! crash argument):
//!
//! ```text
//! file header, 16 bytes: magic b"FIRNLOG\0" | u32 version = 1 | u32 reserved = 0
//! each record:           u32 payload length | u32 crc32c(length bytes ++ payload) | payload
//! ```
//!
//! A log has one writer: [`Log::open`] takes an exclusive `flock` on the file, so a second
//! opener (say, a second daemon pointed at the same directory) gets [`LogError::Locked`]
//! instead of interleaving its records with ours.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::iter::FusedIterator;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::sync_parent_dir;

/// The largest payload one record may carry. A length field above this is treated as damage
/// when reading, so a flipped high bit cannot make recovery try to read gigabytes.
pub const MAX_PAYLOAD_LEN: usize = 64 << 20;

const MAGIC: [u8; 8] = *b"FIRNLOG\0";
const VERSION: u32 = 1;
const FILE_HEADER_LEN: u64 = 16;
const RECORD_HEADER_LEN: u64 = 8;

/// What can go wrong with a log. Every message names the log file.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log {}: {action} failed: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "log {}: not a firn log ({reason}); refusing to touch it. Move it aside or point firn at another path",
        .path.display()
    )]
    BadHeader { path: PathBuf, reason: &'static str },

    #[error(
        "log {}: format version {found} is not supported by this build (it reads version {VERSION}); run a firn that knows version {found}",
        .path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },

    #[error(
        "log {}: already open for writing by another process or handle; stop the other writer first",
        .path.display()
    )]
    Locked { path: PathBuf },

    #[error(
        "log {}: payload of {len} bytes is larger than the maximum record payload of {MAX_PAYLOAD_LEN} bytes",
        .path.display()
    )]
    PayloadTooLarge { path: PathBuf, len: usize },

    #[error(
        "log {}: an earlier write or sync failed, so what reached the disk is unknown; reopen the log to recover it",
        .path.display()
    )]
    Poisoned { path: PathBuf },

    #[error(
        "log {}: record {seq} at byte {offset} no longer matches its checksum; the disk changed it after the log was opened",
        .path.display()
    )]
    Corrupt {
        path: PathBuf,
        seq: u64,
        offset: u64,
    },
}

/// What [`Log::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Valid records kept; the next append gets this sequence number.
    pub records: u64,
    /// Bytes cut off the end of the file after the last valid record.
    pub bytes_dropped: u64,
    /// Why the valid log ended before the end of the file, if it did.
    pub damage: Option<TailDamage>,
    /// Where the dropped bytes were kept (`<log>.damaged-<nanoseconds since 1970>`), if any
    /// were dropped.
    pub kept_aside: Option<PathBuf>,
}

/// The first thing that ended the valid part of a log during recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailDamage {
    /// Fewer bytes left than a record header.
    TornHeader,
    /// A record header promising more payload than the file holds.
    TornPayload,
    /// A length field above [`MAX_PAYLOAD_LEN`].
    LengthTooLarge,
    /// A complete record whose CRC does not match.
    BadChecksum,
}

/// One record read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The sequence number [`Log::append`] returned for it.
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// An open log, positioned to append after its last valid record.
#[derive(Debug)]
pub struct Log {
    path: PathBuf,
    // Declared before `_lock` so that dropping a Log flushes buffered records before unlocking.
    writer: BufWriter<File>,
    // Flock's drop panics if unlocking fails, which flock(2) only does for a bad descriptor;
    // this one stays open for the life of the Log.
    _lock: Flock<File>,
    records: u64,
    // Byte offset just past the last appended record, buffered or not.
    end: u64,
    // Set when a write or sync fails: the file may now hold a torn record, and records appended
    // after it would be lost at recovery, so further appends must not pretend to succeed.
    failed: bool,
}

impl Log {
    /// Opens the log at `path`, creating it if it does not exist.
    ///
    /// An existing log is read from the start and every record checked. The first record that is
    /// torn, has an impossible length or fails its CRC ends the valid log; the file is truncated
    /// there and synced, and [`Recovery`] says how much was cut. Nothing after such a record is
    /// kept: its length field cannot be trusted, so there is no sound way to find where the next
    /// record starts, and a guess could land inside a payload and accept garbage as a record.
    /// Crashes only tear the unsynced tail, so this loses nothing that [`Log::sync`] promised.
    ///
    /// A file that does not start with a valid version 1 header is an error and is left as is.
    pub fn open(path: impl AsRef<Path>) -> Result<(Log, Recovery), LogError> {
        let path = path.as_ref().to_path_buf();
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(&path)?,
            Err(e) => return Err(io_error(&path, "open", e)),
        };
        let lock = lock(&path, &file)?;

        let file_len = file
            .metadata()
            .map_err(|e| io_error(&path, "stat", e))?
            .len();
        let scan = scan(&path, &file, file_len)?;
        let bytes_dropped = file_len - scan.end;
        let mut kept_aside = None;
        if bytes_dropped > 0 {
            // Damage in the middle (not a torn tail) would take synced records with it: keep
            // every dropped byte, so nothing is lost without a trace.
            kept_aside = Some(keep_aside(&path, &file, scan.end, bytes_dropped)?);
            // Synced before any new append, so a crash cannot leave new records behind garbage.
            file.set_len(scan.end)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error(&path, "truncate the damaged tail", e))?;
        }
        let mut file = file;
        file.seek(SeekFrom::Start(scan.end))
            .map_err(|e| io_error(&path, "seek", e))?;

        let recovery = Recovery {
            records: scan.records,
            bytes_dropped,
            damage: scan.damage,
            kept_aside,
        };
        let log = Log {
            path,
            writer: BufWriter::new(file),
            _lock: lock,
            records: scan.records,
            end: scan.end,
            failed: false,
        };
        Ok((log, recovery))
    }

    /// Appends one record and returns its sequence number (0 for the first record of the log).
    ///
    /// The record is buffered: it is durable only once a later [`Log::sync`] returns. After an
    /// I/O error the outcome of this append is unknown and the log refuses further writes with
    /// [`LogError::Poisoned`]; reopen it to recover.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, LogError> {
        self.check_usable()?;
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(LogError::PayloadTooLarge {
                path: self.path.clone(),
                len: payload.len(),
            });
        }
        // Fits: MAX_PAYLOAD_LEN is below u32::MAX.
        let len = (payload.len() as u32).to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        header[..4].copy_from_slice(&len);
        header[4..].copy_from_slice(&crc.to_le_bytes());

        let written = self
            .writer
            .write_all(&header)
            .and_then(|()| self.writer.write_all(payload));
        if let Err(e) = written {
            self.failed = true;
            return Err(io_error(&self.path, "append", e));
        }
        let seq = self.records;
        self.records += 1;
        self.end += RECORD_HEADER_LEN + payload.len() as u64;
        Ok(seq)
    }

    /// The fsync point: when this returns, every record appended before it survives a crash.
    ///
    /// Flushes the buffer and calls fdatasync, which also persists the file's new length. After
    /// an error nothing is promised (the kernel may have dropped the dirty pages), and the log
    /// refuses further writes with [`LogError::Poisoned`]; reopen it to find what survived.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.check_usable()?;
        let synced = self
            .writer
            .flush()
            .and_then(|()| self.writer.get_ref().sync_data());
        if let Err(e) = synced {
            self.failed = true;
            return Err(io_error(&self.path, "sync", e));
        }
        Ok(())
    }

    /// Reads the records back in order, one at a time, from the first.
    ///
    /// Sees every record appended so far, synced or not (the buffer is written to the file
    /// first, without an fsync). Records appended after this call are not seen. The reader is
    /// independent of the `Log`, which can keep appending while it is used.
    pub fn iter(&mut self) -> Result<Records, LogError> {
        self.check_usable()?;
        if let Err(e) = self.writer.flush() {
            self.failed = true;
            return Err(io_error(&self.path, "flush", e));
        }
        let file = self
            .writer
            .get_ref()
            .try_clone()
            .map_err(|e| io_error(&self.path, "open a reader", e))?;
        Ok(Records {
            path: self.path.clone(),
            file,
            offset: FILE_HEADER_LEN,
            end: self.end,
            seq: 0,
            done: false,
        })
    }

    /// Number of records in the log, which is also the next sequence number.
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_usable(&self) -> Result<(), LogError> {
        if self.failed {
            return Err(LogError::Poisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

/// Reads a log's records one at a time, holding only the current record in memory.
///
/// Every record is checked against its CRC again, since the disk may have changed since the log
/// was opened; the first failure is returned as an error and ends the iteration.
#[derive(Debug)]
pub struct Records {
    path: PathBuf,
    file: File,
    offset: u64,
    end: u64,
    seq: u64,
    done: bool,
}

impl Iterator for Records {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.offset >= self.end {
            return None;
        }
        let record = self.read_record();
        if record.is_err() {
            self.done = true;
        }
        Some(record)
    }
}

impl FusedIterator for Records {}

impl Records {
    fn read_record(&mut self) -> Result<Record, LogError> {
        let corrupt = || LogError::Corrupt {
            path: self.path.clone(),
            seq: self.seq,
            offset: self.offset,
        };
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        self.file
            .read_exact_at(&mut header, self.offset)
            .map_err(|e| io_error(&self.path, "read", e))?;
        let (len_bytes, stored_crc) = split_record_header(&header);
        let len = u32::from_le_bytes(len_bytes) as usize;
        let payload_start = self.offset + RECORD_HEADER_LEN;
        if len > MAX_PAYLOAD_LEN || payload_start + len as u64 > self.end {
            return Err(corrupt());
        }
        let mut payload = vec![0u8; len];
        self.file
            .read_exact_at(&mut payload, payload_start)
            .map_err(|e| io_error(&self.path, "read", e))?;
        if crc32c::crc32c_append(crc32c::crc32c(&len_bytes), &payload) != stored_crc {
            return Err(corrupt());
        }
        let record = Record {
            seq: self.seq,
            payload,
        };
        self.seq += 1;
        self.offset = payload_start + len as u64;
        Ok(record)
    }
}

/// Creates a log holding only its header. The header is written and synced under a temporary
/// name and then renamed into place, so a log file never exists without a complete header and
/// a short file is always damage, never an interrupted create.
fn create(path: &Path) -> Result<File, LogError> {
    let mut temp_name = OsString::from(path.as_os_str());
    temp_name.push(".creating");
    let temp_path = PathBuf::from(temp_name);

    let mut header = [0u8; FILE_HEADER_LEN as usize];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());

    // Logs hold what the gateway was told (the audit log: who did what).
    let file = super::create_private(&temp_path)
        .and_then(|mut file| {
            file.write_all(&header)?;
            file.sync_all()?;
            Ok(file)
        })
        .and_then(|file| {
            fs::rename(&temp_path, path)?;
            sync_parent_dir(path)?;
            Ok(file)
        })
        .map_err(|e| io_error(path, "create", e))?;
    Ok(file)
}

/// Copies the `len` bytes at `from` into a new file beside the log, durably, and returns it.
fn keep_aside(path: &Path, file: &File, from: u64, len: u64) -> Result<PathBuf, LogError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".damaged-{nanos}"));
    let aside = PathBuf::from(name);
    let copied = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        .and_then(|mut out| {
            let mut reader = file.try_clone()?;
            reader.seek(SeekFrom::Start(from))?;
            let copied = io::copy(&mut reader.take(len), &mut out)?;
            if copied != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("copied {copied} of {len} bytes"),
                ));
            }
            out.sync_all()?;
            sync_parent_dir(&aside)
        });
    if let Err(e) = copied {
        // Not a half copy left behind: on a full disk each retry would add one more.
        let _ = std::fs::remove_file(&aside);
        return Err(io_error(
            path,
            "keep the damaged tail aside before cutting it",
            e,
        ));
    }
    Ok(aside)
}

fn lock(path: &Path, file: &File) -> Result<Flock<File>, LogError> {
    // A duplicate descriptor shares the open file, and so the lock, with the writer's.
    let handle = file.try_clone().map_err(|e| io_error(path, "lock", e))?;
    match Flock::lock(handle, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => Err(LogError::Locked {
            path: path.to_path_buf(),
        }),
        Err((_, errno)) => Err(io_error(path, "lock", errno.into())),
    }
}

/// How far the valid log reaches.
struct Scan {
    records: u64,
    end: u64,
    damage: Option<TailDamage>,
}

/// Checks the header, then every record, and stops at the first damaged one. Payloads are fed
/// through the CRC in small chunks, so memory stays bounded whatever the length fields say.
fn scan(path: &Path, file: &File, file_len: u64) -> Result<Scan, LogError> {
    let read_error = |e| io_error(path, "read", e);
    if file_len < FILE_HEADER_LEN {
        return Err(LogError::BadHeader {
            path: path.to_path_buf(),
            reason: "file is shorter than the 16-byte header",
        });
    }
    // A freshly created file is positioned after its header.
    let mut file = file;
    file.seek(SeekFrom::Start(0)).map_err(read_error)?;
    let mut reader = BufReader::with_capacity(64 << 10, file);
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    reader.read_exact(&mut header).map_err(read_error)?;
    check_file_header(path, &header)?;

    let mut scan = Scan {
        records: 0,
        end: FILE_HEADER_LEN,
        damage: None,
    };
    let mut chunk = [0u8; 8 << 10];
    loop {
        let remaining = file_len - scan.end;
        if remaining == 0 {
            return Ok(scan);
        }
        if remaining < RECORD_HEADER_LEN {
            scan.damage = Some(TailDamage::TornHeader);
            return Ok(scan);
        }
        let mut record_header = [0u8; RECORD_HEADER_LEN as usize];
        reader.read_exact(&mut record_header).map_err(read_error)?;
        let (len_bytes, stored_crc) = split_record_header(&record_header);
        let len = u32::from_le_bytes(len_bytes) as u64;
        if len > MAX_PAYLOAD_LEN as u64 {
            scan.damage = Some(TailDamage::LengthTooLarge);
            return Ok(scan);
        }
        if len > remaining - RECORD_HEADER_LEN {
            scan.damage = Some(TailDamage::TornPayload);
            return Ok(scan);
        }
        let mut crc = crc32c::crc32c(&len_bytes);
        let mut left = len as usize;
        while left > 0 {
            let part_len = left.min(chunk.len());
            let part = &mut chunk[..part_len];
            reader.read_exact(part).map_err(read_error)?;
            crc = crc32c::crc32c_append(crc, part);
            left -= part.len();
        }
        if crc != stored_crc {
            scan.damage = Some(TailDamage::BadChecksum);
            return Ok(scan);
        }
        scan.records += 1;
        scan.end += RECORD_HEADER_LEN + len;
    }
}

fn check_file_header(path: &Path, header: &[u8; FILE_HEADER_LEN as usize]) -> Result<(), LogError> {
    let bad = |reason| LogError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    if header[..8] != MAGIC {
        return Err(bad("wrong magic bytes"));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION {
        return Err(LogError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    // Version 1 writes zero here; anything else means the header was damaged or written by a
    // format that should have bumped the version.
    if header[12..] != [0u8; 4] {
        return Err(bad("reserved header field is not zero"));
    }
    Ok(())
}

fn split_record_header(header: &[u8; RECORD_HEADER_LEN as usize]) -> ([u8; 4], u32) {
    let len = [header[0], header[1], header[2], header[3]];
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    (len, crc)
}

fn io_error(path: &Path, action: &'static str, source: io::Error) -> LogError {
    LogError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Payloads of varied lengths, including empty ones, each different from the others.
    fn sample_payloads(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| (0..(i * 37) % 300).map(|j| (i * 7 + j) as u8).collect())
            .collect()
    }

    /// Writes a fresh log holding `payloads` and returns the byte offset where each record
    /// starts, plus the end of the file.
    fn write_log(path: &Path, payloads: &[Vec<u8>]) -> (Vec<u64>, u64) {
        let (mut log, _) = Log::open(path).unwrap();
        let mut starts = Vec::new();
        for payload in payloads {
            starts.push(log.end);
            log.append(payload).unwrap();
        }
        log.sync().unwrap();
        (starts, log.end)
    }

    fn read_all(log: &mut Log) -> Vec<Vec<u8>> {
        log.iter()
            .unwrap()
            .map(|record| record.unwrap().payload)
            .collect()
    }

    fn flip_bit(path: &Path, offset: u64) {
        let mut bytes = fs::read(path).unwrap();
        bytes[offset as usize] ^= 0x10;
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_failed_keep_aside_leaves_no_file_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, [7u8; 100]).expect("write");
        let file = File::open(&path).expect("open");
        // More bytes asked than the file holds: the copy fails, as on a full disk.
        assert!(keep_aside(&path, &file, 50, 100).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("log")]);
        assert!(keep_aside(&path, &file, 50, 50).is_ok());
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("round.log");
        let payloads = sample_payloads(20);

        let (mut log, recovery) = Log::open(&path).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                records: 0,
                bytes_dropped: 0,
                damage: None,
                kept_aside: None,
            }
        );
        for (i, payload) in payloads.iter().enumerate() {
            assert_eq!(log.append(payload).unwrap(), i as u64);
        }
        log.sync().unwrap();
        drop(log);

        let (mut log, recovery) = Log::open(&path).unwrap();
        assert_eq!(recovery.records, 20);
        assert_eq!(recovery.bytes_dropped, 0);
        assert_eq!(log.records(), 20);
        let records: Vec<Record> = log.iter().unwrap().map(Result::unwrap).collect();
        assert_eq!(records.len(), 20);
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.seq, i as u64);
            assert_eq!(record.payload, payloads[i]);
        }
        assert_eq!(log.append(b"next").unwrap(), 20);
    }

    #[test]
    fn iter_sees_unsynced_appends_but_not_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path().join("buffered.log")).unwrap();
        log.append(b"one").unwrap();
        log.append(b"two").unwrap();
        let reader = log.iter().unwrap();
        log.append(b"three").unwrap();
        let seen: Vec<Vec<u8>> = reader.map(|r| r.unwrap().payload).collect();
        assert_eq!(seen, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(read_all(&mut log).len(), 3);
    }

    #[test]
    fn new_log_is_just_a_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.log");
        drop(Log::open(&path).unwrap());
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes, b"FIRNLOG\0\x01\0\0\0\0\0\0\0");
        assert!(!dir.path().join("new.log.creating").exists());
    }

    #[test]
    fn oversized_payload_is_rejected_and_log_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path().join("big.log")).unwrap();
        let too_big = vec![0u8; MAX_PAYLOAD_LEN + 1];
        let err = log.append(&too_big).unwrap_err();
        assert!(matches!(err, LogError::PayloadTooLarge { len, .. } if len == MAX_PAYLOAD_LEN + 1));
        assert!(err.to_string().contains("big.log"), "{err}");
        assert_eq!(log.append(b"small").unwrap(), 0);
    }

    #[test]
    fn torn_tail_of_every_length_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let full_path = dir.path().join("full.log");
        let payloads = sample_payloads(5);
        let (starts, end) = write_log(&full_path, &payloads);
        let full = fs::read(&full_path).unwrap();
        let last_start = starts[4];

        // Every cut inside the last record: its header torn, or its payload torn.
        for cut in last_start + 1..end {
            let path = dir.path().join(format!("cut-{cut}.log"));
            fs::write(&path, &full[..cut as usize]).unwrap();
            let (mut log, recovery) = Log::open(&path).unwrap();
            let expected_damage = if cut - last_start < RECORD_HEADER_LEN {
                TailDamage::TornHeader
            } else {
                TailDamage::TornPayload
            };
            // Every dropped byte is kept beside the log.
            let aside = recovery.kept_aside.clone().expect("kept aside");
            assert_eq!(
                fs::read(&aside).unwrap(),
                full[last_start as usize..cut as usize],
                "cut at {cut}"
            );
            assert_eq!(
                recovery,
                Recovery {
                    records: 4,
                    bytes_dropped: cut - last_start,
                    damage: Some(expected_damage),
                    kept_aside: Some(aside),
                },
                "cut at {cut}"
            );
            assert_eq!(fs::metadata(&path).unwrap().len(), last_start);
            assert_eq!(read_all(&mut log), payloads[..4]);
            // The log goes on from the last good record.
            assert_eq!(log.append(b"after").unwrap(), 4);
            log.sync().unwrap();
            drop(log);
            let (mut log, recovery) = Log::open(&path).unwrap();
            assert_eq!(recovery.bytes_dropped, 0);
            assert_eq!(read_all(&mut log)[4], b"after");
        }
    }

    #[test]
    fn flipped_bit_drops_that_record_and_everything_after() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = sample_payloads(10);
        // Record 3 is damaged in its length field, its CRC field, and its payload in turn. Once
        // a record is bad its length cannot be trusted, so neither can the position of record 4
        // and the rest: they go too, even though their own bytes are intact.
        let damaged = 3;
        for (name, offset_in_record) in [("length", 1), ("crc", 5), ("payload", 20)] {
            let path = dir.path().join(format!("{name}.log"));
            let (starts, end) = write_log(&path, &payloads);
            flip_bit(&path, starts[damaged] + offset_in_record);

            let (mut log, recovery) = Log::open(&path).unwrap();
            assert_eq!(recovery.records, damaged as u64, "{name}");
            assert_eq!(recovery.bytes_dropped, end - starts[damaged], "{name}");
            assert!(recovery.damage.is_some(), "{name}");
            assert_eq!(read_all(&mut log), payloads[..damaged], "{name}");
        }
    }

    #[test]
    fn absurd_length_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absurd.log");
        let (_, end) = write_log(&path, &sample_payloads(2));
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&(MAX_PAYLOAD_LEN as u32 + 1).to_le_bytes());
        bytes.extend_from_slice(&[0u8; 100]);
        fs::write(&path, bytes).unwrap();

        let (_, recovery) = Log::open(&path).unwrap();
        assert_eq!(recovery.records, 2);
        assert_eq!(recovery.bytes_dropped, 104);
        assert_eq!(recovery.damage, Some(TailDamage::LengthTooLarge));
        assert_eq!(fs::metadata(&path).unwrap().len(), end);
    }

    #[test]
    fn zero_filled_tail_is_dropped() {
        // What some file systems show after power loss: the new length made it to disk, the
        // data did not. A zero header never passes, because crc32c of a zero length is not 0.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zeros.log");
        let (_, end) = write_log(&path, &sample_payloads(3));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(end + 4096).unwrap();
        drop(file);

        let (_, recovery) = Log::open(&path).unwrap();
        assert_eq!(recovery.records, 3);
        assert_eq!(recovery.bytes_dropped, 4096);
        assert_eq!(recovery.damage, Some(TailDamage::BadChecksum));
    }

    #[test]
    fn bad_header_is_an_error_and_the_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut good = b"FIRNLOG\0\x01\0\0\0\0\0\0\0".to_vec();
        good.extend_from_slice(&[9u8; 40]);
        let mut wrong_magic = good.clone();
        wrong_magic[0] = b'X';
        let mut reserved_set = good.clone();
        reserved_set[13] = 1;
        let cases = [
            ("magic", wrong_magic),
            ("reserved", reserved_set),
            ("short", good[..10].to_vec()),
            ("empty", Vec::new()),
        ];
        for (name, bytes) in cases {
            let path = dir.path().join(format!("{name}.log"));
            fs::write(&path, &bytes).unwrap();
            let err = Log::open(&path).unwrap_err();
            assert!(matches!(err, LogError::BadHeader { .. }), "{name}: {err}");
            assert!(err.to_string().contains(&format!("{name}.log")), "{err}");
            assert_eq!(fs::read(&path).unwrap(), bytes, "{name}: file changed");
        }
    }

    #[test]
    fn unknown_version_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.log");
        fs::write(&path, b"FIRNLOG\0\x02\0\0\0\0\0\0\0").unwrap();
        let err = Log::open(&path).unwrap_err();
        assert!(
            matches!(err, LogError::UnsupportedVersion { found: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locked.log");
        let (first, _) = Log::open(&path).unwrap();
        let err = Log::open(&path).unwrap_err();
        assert!(matches!(err, LogError::Locked { .. }), "{err}");
        drop(first);
        Log::open(&path).unwrap();
    }

    #[test]
    fn corruption_after_open_is_reported_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rot.log");
        let (starts, _) = write_log(&path, &sample_payloads(4));
        let (mut log, _) = Log::open(&path).unwrap();
        // Damage through a second handle, as a failing disk would.
        let other = OpenOptions::new().write(true).open(&path).unwrap();
        other.write_all_at(&[0xff], starts[2] + 20).unwrap();

        let results: Vec<_> = log.iter().unwrap().collect();
        assert_eq!(results.len(), 3);
        assert!(results[0].is_ok() && results[1].is_ok());
        assert!(matches!(results[2], Err(LogError::Corrupt { seq: 2, .. })));
    }

    /// How many records, starting at `starts` and with the last ending at `end`, lie wholly
    /// before byte `cut`.
    fn whole_records_before(starts: &[u64], end: u64, cut: u64) -> usize {
        let ends = starts.iter().skip(1).chain(std::iter::once(&end));
        starts
            .iter()
            .zip(ends)
            .take_while(|&(_, &record_end)| record_end <= cut)
            .count()
    }

    proptest! {
        #[test]
        fn recovery_after_truncation_keeps_exactly_a_prefix(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..20),
            cut_fraction in 0.0f64..=1.0,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("prop.log");
            let (starts, end) = write_log(&path, &payloads);
            let cut = FILE_HEADER_LEN + ((end - FILE_HEADER_LEN) as f64 * cut_fraction) as u64;
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(cut).unwrap();
            drop(file);

            let kept = whole_records_before(&starts, end, cut);
            let kept_end = starts.get(kept).copied().unwrap_or(end);
            let (mut log, recovery) = Log::open(&path).unwrap();
            prop_assert_eq!(recovery.records, kept as u64);
            prop_assert_eq!(recovery.bytes_dropped, cut - kept_end);
            prop_assert_eq!(read_all(&mut log), payloads[..kept].to_vec());
            prop_assert_eq!(log.append(b"next").unwrap(), kept as u64);
        }

        #[test]
        fn recovery_after_a_damaged_byte_keeps_the_records_before_it(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..20),
            position in 0.0f64..1.0,
            xor in 1u8..=255,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("prop.log");
            let (starts, end) = write_log(&path, &payloads);
            let offset = FILE_HEADER_LEN + ((end - FILE_HEADER_LEN) as f64 * position) as u64;
            let mut bytes = fs::read(&path).unwrap();
            bytes[offset as usize] ^= xor;
            fs::write(&path, bytes).unwrap();

            // CRC32C catches every error confined to 32 consecutive bits, so one changed byte
            // always ends the log at the record that holds it.
            let damaged = starts.iter().filter(|&&start| start <= offset).count() - 1;
            let (mut log, recovery) = Log::open(&path).unwrap();
            prop_assert_eq!(recovery.records, damaged as u64);
            prop_assert_eq!(recovery.bytes_dropped, end - starts[damaged]);
            prop_assert_eq!(read_all(&mut log), payloads[..damaged].to_vec());
        }
    }
}
