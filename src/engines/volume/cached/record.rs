//! The cached volume's log format: segments of sealed records (docs/format.md, "Cached
//! volume segment").
//!
//! A segment is a file on the gateway's disk and, once uploaded, the object
//! `volumes/<id>/segments/<seq>` with the same bytes. It starts with a 64-byte header and
//! holds records back to back. A record is a 64-byte header (what it does to which bytes) and,
//! for a write, its data cut into frames of up to 4096 bytes, each encrypted on its own with
//! AES-256-GCM and followed by its 16-byte tag. Any frame can therefore be fetched with a
//! ranged GET and verified without the rest of the segment.
//!
//! Nonces are never reused under one key: each segment draws a random 128-bit salt when it is
//! created, and is sealed with its own key, derived from the volume's log key and the salt.
//! Under it, the 96-bit nonce of a frame is `record position (u32) || frame index (u32) || 0
//! (u32)`; a record header's frame index is `u32::MAX`, the segment header's position and
//! index both are. A salt that repeats only with identical contents (derived from them) only
//! ever repeats a nonce for the same plaintext, which reveals nothing but that sameness.
//!
//! AES-GCM is `ring`'s (VAES and carry-less multiplication on 256-bit vectors where the CPU
//! has them, AES-NI otherwise; decision 0006 has the measurements against AWS-LC and
//! OpenSSL). A key set up for a segment is kept for the next record: setting one up expands
//! the AES key and GHASH's tables.

use std::sync::{Mutex, PoisonError};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::Zeroizing;

use crate::seal::secret::Secret;

pub const SEGMENT_MAGIC: &[u8; 4] = b"FSG1";
pub const RECORD_MAGIC: &[u8; 4] = b"FRC1";
/// 2: AES-256-GCM under per-segment keys. (1, XChaCha20-Poly1305 under the volume's key, is
/// not read: firn had no users then.)
pub const SEGMENT_VERSION: u32 = 2;
pub const HEADER_LEN: usize = 64;
pub const FRAME: usize = 4096;
pub const TAG_LEN: usize = 16;
/// The largest write record: larger writes are split (NBD requests are up to 32 MiB), which
/// bounds a segment's size at `segment_size` or one record, whichever is larger.
pub const MAX_RECORD: usize = 1 << 20;
/// The BLAKE3 context deriving a segment's key from the log key and the segment's salt.
const SEGMENT_KEY_CONTEXT: &str = "firn cached volume segment key v2";
/// Segment keys kept set up per volume: the open segment's, and a few for reads of others.
const CONTEXTS: usize = 8;

/// The most bytes a segment closed at `segment_bytes` can hold.
pub fn max_segment(segment_bytes: u64) -> u64 {
    segment_bytes.max(HEADER_LEN as u64 + record_len(Kind::Write, MAX_RECORD as u64))
}

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `length` bytes of data follow, in frames.
    Write = 1,
    /// The range reads as zeros (trim, write-zeroes, an all-zero write); no data follows.
    Zero = 2,
    /// As `Zero`, but the range stays allocated (write-zeroes with NBD_CMD_FLAG_NO_HOLE).
    ZeroData = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: Kind,
    pub offset: u64,
    pub length: u64,
    /// Counts every record of the volume, from 1.
    pub seq: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a segment header")]
    NotSegment,
    #[error(
        "segment format version {0} is not one this firn reads (it reads version {v} only)",
        v = SEGMENT_VERSION
    )]
    Version(u32),
    #[error("segment header of segment {found}, expected {expected}")]
    WrongSegment { expected: u64, found: u64 },
    #[error("record at {0}: no record there (end of the log, or damage)")]
    NoRecord(u32),
    #[error("authentication failed at {0}: damaged, or not sealed with this volume's key")]
    Auth(u32),
}

/// An AES-256-GCM key set up for the segment with this salt.
struct Keyed {
    salt: [u8; 16],
    key: std::sync::Arc<LessSafeKey>,
}

/// The key of one volume's log, and the cipher operations on it.
///
/// The key sits in a `Secret` (locked, out of core dumps); segment keys derived from it live
/// on the stack only while one is set up, and are wiped. `ring` holds its expansion of a
/// segment key (that segment's alone, never the log key) in ordinary memory and does not
/// wipe it when the key is dropped; at most `CONTEXTS` of them are live per volume.
pub struct LogKey {
    key: Secret<32>,
    /// Segment keys set up, the most recently used last. Threads share them (sealing and
    /// opening change nothing in a key).
    contexts: Mutex<Vec<Keyed>>,
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogKey")
    }
}

/// The nonce of frame `frame` of the record at `pos`, under its segment's key.
fn nonce(pos: u32, frame: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&pos.to_le_bytes());
    n[4..8].copy_from_slice(&frame.to_le_bytes());
    n
}

/// Bytes a record of `length` data bytes takes in the segment, header included.
pub fn record_len(kind: Kind, length: u64) -> u64 {
    match kind {
        Kind::Zero | Kind::ZeroData => HEADER_LEN as u64,
        Kind::Write => HEADER_LEN as u64 + length + length.div_ceil(FRAME as u64) * TAG_LEN as u64,
    }
}

/// Where frame `index` of a record whose header is at `pos` starts in the segment.
pub fn frame_pos(pos: u32, index: u64) -> u64 {
    pos as u64 + HEADER_LEN as u64 + index * (FRAME + TAG_LEN) as u64
}

impl LogKey {
    pub fn new(key: Secret<32>) -> LogKey {
        LogKey {
            key,
            contexts: Mutex::new(Vec::new()),
        }
    }

    /// Runs `body` with the key of the segment with `salt`, set up once and kept for the
    /// next call: a write appends many records to one segment.
    fn with_context<T>(&self, salt: &[u8; 16], body: impl FnOnce(&LessSafeKey) -> T) -> T {
        let found = {
            let mut contexts = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
            contexts
                .iter()
                .rposition(|keyed| keyed.salt == *salt)
                .map(|at| {
                    // The most recently used last.
                    let keyed = contexts.remove(at);
                    let key = keyed.key.clone();
                    contexts.push(keyed);
                    key
                })
        };
        let key = found.unwrap_or_else(|| {
            let key = std::sync::Arc::new(self.segment_key(salt));
            let mut contexts = self.contexts.lock().unwrap_or_else(PoisonError::into_inner);
            if contexts.len() >= CONTEXTS {
                contexts.remove(0);
            }
            contexts.push(Keyed {
                salt: *salt,
                key: key.clone(),
            });
            key
        });
        body(&key)
    }

    /// The AES-256-GCM key of the segment with `salt`.
    fn segment_key(&self, salt: &[u8; 16]) -> LessSafeKey {
        let key = Zeroizing::new(
            blake3::Hasher::new_derive_key(SEGMENT_KEY_CONTEXT)
                .update(&self.key[..])
                .update(salt)
                .finalize()
                .into(),
        );
        let key: &[u8; 32] = &key;
        // A 32-byte key is all AES-256 needs: this cannot fail.
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, key).expect("AES-256-GCM takes a 32-byte key"),
        )
    }

    /// A new segment's header, with its fresh salt.
    pub fn segment_header(&self, seq: u64, salt: &[u8; 16]) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(SEGMENT_MAGIC);
        h[4..8].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..32].copy_from_slice(salt);
        let tag = self.tag(salt, u32::MAX, u32::MAX, &h[..48]);
        h[48..].copy_from_slice(&tag);
        h
    }

    /// The salt of segment `seq`, from its verified header.
    pub fn open_segment_header(&self, seq: u64, h: &[u8]) -> Result<[u8; 16], FormatError> {
        if h.len() < HEADER_LEN || &h[..4] != SEGMENT_MAGIC {
            return Err(FormatError::NotSegment);
        }
        let version = u32::from_le_bytes(h[4..8].try_into().unwrap_or_default());
        if version != SEGMENT_VERSION {
            return Err(FormatError::Version(version));
        }
        let salt: [u8; 16] = h[16..32].try_into().unwrap_or_default();
        if !tags_equal(&self.tag(&salt, u32::MAX, u32::MAX, &h[..48]), &h[48..64]) {
            return Err(FormatError::Auth(0));
        }
        let found = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
        if found != seq {
            return Err(FormatError::WrongSegment {
                expected: seq,
                found,
            });
        }
        Ok(salt)
    }

    /// A tag over `aad` alone (an empty message).
    fn tag(&self, salt: &[u8; 16], pos: u32, frame: u32, aad: &[u8]) -> [u8; TAG_LEN] {
        self.with_context(salt, |context| seal(context, pos, frame, aad, &[], &mut []))
    }

    /// Appends the record at segment position `pos` to `out`: header, then the sealed frames
    /// of `data` (empty for a zero record).
    pub fn seal_record(
        &self,
        salt: &[u8; 16],
        pos: u32,
        header: &RecordHeader,
        data: &[u8],
        out: &mut Vec<u8>,
    ) {
        let start = out.len();
        out.resize(
            start + record_len(Kind::Write, data.len() as u64) as usize,
            0,
        );
        self.seal_record_into(salt, pos, header, data, &mut out[start..]);
    }

    /// As `seal_record`, into `out`, which is exactly as long as the record: every byte of
    /// it is written, so a reused buffer needs no zeroing first.
    pub fn seal_record_into(
        &self,
        salt: &[u8; 16],
        pos: u32,
        header: &RecordHeader,
        data: &[u8],
        out: &mut [u8],
    ) {
        assert_eq!(
            out.len() as u64,
            record_len(Kind::Write, data.len() as u64),
            "a record's buffer fits it exactly"
        );
        self.with_context(salt, |context| {
            out[..HEADER_LEN].copy_from_slice(&sealed_header(context, pos, header));
            let sealed = out[HEADER_LEN..].chunks_mut(FRAME + TAG_LEN);
            for ((index, frame), sealed) in data.chunks(FRAME).enumerate().zip(sealed) {
                let (body, tag) = sealed.split_at_mut(frame.len());
                let made = seal(context, pos, index as u32, &[], frame, body);
                tag.copy_from_slice(&made);
            }
        });
    }

    /// As `seal_record`, with `data` encrypted where it lies rather than copied first: the
    /// record is the header returned, then each frame of `data` followed by its tag, which
    /// go to `tags` (cleared first). `record_slices` lays them out for one `pwritev`.
    pub fn seal_record_in_place(
        &self,
        salt: &[u8; 16],
        pos: u32,
        header: &RecordHeader,
        data: &mut [u8],
        tags: &mut Vec<[u8; TAG_LEN]>,
    ) -> [u8; HEADER_LEN] {
        tags.clear();
        self.with_context(salt, |context| {
            for (index, frame) in data.chunks_mut(FRAME).enumerate() {
                tags.push(seal_in_place(context, pos, index as u32, &[], frame));
            }
            sealed_header(context, pos, header)
        })
    }

    /// The record header at `pos`, verified.
    pub fn open_record_header(
        &self,
        salt: &[u8; 16],
        pos: u32,
        h: &[u8],
    ) -> Result<RecordHeader, FormatError> {
        if h.len() < HEADER_LEN || &h[..4] != RECORD_MAGIC {
            return Err(FormatError::NoRecord(pos));
        }
        if !tags_equal(&self.tag(salt, pos, u32::MAX, &h[..48]), &h[48..64]) {
            return Err(FormatError::Auth(pos));
        }
        let kind = match h[4] {
            1 => Kind::Write,
            2 => Kind::Zero,
            3 => Kind::ZeroData,
            _ => return Err(FormatError::NoRecord(pos)),
        };
        let word = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or_default());
        let header = RecordHeader {
            kind,
            offset: word(8),
            length: word(16),
            seq: word(24),
        };
        // A write carries its data, at most `MAX_RECORD`; zeroes and trims carry none, and
        // span up to a whole volume.
        let too_long = kind == Kind::Write && header.length > MAX_RECORD as u64;
        if too_long || header.offset.checked_add(header.length).is_none() {
            return Err(FormatError::NoRecord(pos));
        }
        Ok(header)
    }

    /// Decrypts frames `first..` of the record at `pos` in place: `sealed` holds whole sealed
    /// frames back to back, starting with frame `first`; `rec_len` is the record's data
    /// length. Returns the plaintext length (the frames' bytes without their tags, moved to
    /// the front of `sealed`). On an error, what `sealed` holds is meaningless.
    pub fn open_frames(
        &self,
        salt: &[u8; 16],
        pos: u32,
        rec_len: u32,
        first: u64,
        sealed: &mut [u8],
    ) -> Result<usize, FormatError> {
        self.open_each(
            salt,
            pos,
            rec_len,
            first,
            sealed,
            |sealed, at, len, plain_at| {
                sealed.copy_within(at..at + len, plain_at);
            },
        )
    }

    /// As `open_frames`, but the plaintext bytes `within..within + out.len()` end up in `out`
    /// (each frame copied there and opened in place); `sealed` is only read. On an error,
    /// `out` holds nothing meaningful: the caller must not pass it on.
    #[allow(clippy::too_many_arguments)]
    pub fn open_frames_into(
        &self,
        salt: &[u8; 16],
        pos: u32,
        rec_len: u32,
        first: u64,
        sealed: &[u8],
        within: usize,
        out: &mut [u8],
    ) -> Result<(), FormatError> {
        let want = within..within + out.len();
        self.with_context(salt, |key| {
            let mut at = 0;
            let mut plain_at = 0;
            let mut index = first;
            while plain_at < want.end {
                let frame_len = (rec_len as u64)
                    .checked_sub(index * FRAME as u64)
                    .filter(|&left| left > 0)
                    .ok_or(FormatError::Auth(pos))?
                    .min(FRAME as u64) as usize;
                let end = at + frame_len + TAG_LEN;
                if end > sealed.len() {
                    return Err(FormatError::Auth(pos));
                }
                let (body, tag) = sealed[at..end].split_at(frame_len);
                let (from, to) = (
                    plain_at.max(want.start),
                    (plain_at + frame_len).min(want.end),
                );
                let opened = if from == plain_at && to == plain_at + frame_len {
                    open_into(
                        key,
                        pos,
                        index as u32,
                        body,
                        tag,
                        &mut out[from - within..to - within],
                    )
                } else {
                    // A frame `out` wants only part of goes through a scratch frame.
                    let mut scratch = [0u8; FRAME];
                    let opened =
                        open_into(key, pos, index as u32, body, tag, &mut scratch[..frame_len]);
                    if opened && from < to {
                        out[from - within..to - within]
                            .copy_from_slice(&scratch[from - plain_at..to - plain_at]);
                    }
                    opened
                };
                if !opened {
                    return Err(FormatError::Auth(pos));
                }
                plain_at += frame_len;
                at = end;
                index += 1;
            }
            Ok(())
        })
    }

    /// Runs `body` with the key of the segment with `salt`, to open single frames of its
    /// records wherever they are (`Frames::open`).
    pub fn with_frames<T>(&self, salt: &[u8; 16], body: impl FnOnce(&Frames) -> T) -> T {
        self.with_context(salt, |key| body(&Frames { key }))
    }

    /// Decrypts and verifies each frame in place, then calls `each(sealed, at, len, plain_at)`
    /// with where its plaintext is and where it falls in the record's plaintext (from frame
    /// `first` on). Returns the plaintext length.
    fn open_each(
        &self,
        salt: &[u8; 16],
        pos: u32,
        rec_len: u32,
        first: u64,
        sealed: &mut [u8],
        mut each: impl FnMut(&mut [u8], usize, usize, usize),
    ) -> Result<usize, FormatError> {
        self.with_context(salt, |context| {
            let mut read = 0;
            let mut written = 0;
            let mut index = first;
            while read < sealed.len() {
                let frame_len = (rec_len as u64)
                    .checked_sub(index * FRAME as u64)
                    .ok_or(FormatError::Auth(pos))?
                    .min(FRAME as u64) as usize;
                let end = read + frame_len + TAG_LEN;
                if end > sealed.len() {
                    return Err(FormatError::Auth(pos));
                }
                if !open(context, pos, index as u32, &mut sealed[read..end]) {
                    // Nothing of a frame that failed verification leaves.
                    sealed[read..end].fill(0);
                    return Err(FormatError::Auth(pos));
                }
                each(sealed, read, frame_len, written);
                written += frame_len;
                read = end;
                index += 1;
            }
            Ok(written)
        })
    }
}

/// A segment's key, set up for opening frames one by one (`LogKey::with_frames`).
pub struct Frames<'a> {
    key: &'a LessSafeKey,
}

impl Frames<'_> {
    /// Decrypts frame `index` of the record at `pos` in place (`body`, with `tag` read
    /// apart); whether the tag matched. On a mismatch `body` holds unverified bytes, which
    /// the caller never lets out.
    pub fn open(&self, pos: u32, index: u32, body: &mut [u8], tag: &[u8]) -> bool {
        let Ok(tag) = Tag::try_from(tag) else {
            return false;
        };
        self.key
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce(pos, index)),
                Aad::empty(),
                tag,
                body,
                0..,
            )
            .is_ok()
    }
}

/// Encrypts `plain` into `out` (the same length) with `aad`, under the nonce of `frame` of
/// the record at `pos`, and returns the tag. (`ring` seals in place: the copy into `out`
/// costs a fifth of what the cipher does, and `out` is then hot in the cache for it.)
fn seal(
    key: &LessSafeKey,
    pos: u32,
    frame: u32,
    aad: &[u8],
    plain: &[u8],
    out: &mut [u8],
) -> [u8; TAG_LEN] {
    out.copy_from_slice(plain);
    seal_in_place(key, pos, frame, aad, out)
}

/// Encrypts frame `frame` of the record at `pos` where it lies; its tag.
fn seal_in_place(
    key: &LessSafeKey,
    pos: u32,
    frame: u32,
    aad: &[u8],
    data: &mut [u8],
) -> [u8; TAG_LEN] {
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce(pos, frame)),
            Aad::from(aad),
            data,
        )
        .expect("AES-256-GCM seals any frame of at most 4 KiB");
    tag.as_ref().try_into().expect("AES-GCM tags are 16 bytes")
}

/// The header of the record at `pos`, sealed: its fields, then the tag over them.
fn sealed_header(key: &LessSafeKey, pos: u32, header: &RecordHeader) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(RECORD_MAGIC);
    h[4] = header.kind as u8;
    h[8..16].copy_from_slice(&header.offset.to_le_bytes());
    h[16..24].copy_from_slice(&header.length.to_le_bytes());
    h[24..32].copy_from_slice(&header.seq.to_le_bytes());
    let tag = seal(key, pos, u32::MAX, &h[..48], &[], &mut []);
    h[48..].copy_from_slice(&tag);
    h
}

/// The bytes of a record sealed in place (`LogKey::seal_record_in_place`), in order: the
/// header, then each frame and its tag.
pub fn record_slices<'a>(
    head: &'a [u8],
    data: &'a [u8],
    tags: &'a [[u8; TAG_LEN]],
) -> Vec<std::io::IoSlice<'a>> {
    let mut slices = Vec::with_capacity(1 + 2 * tags.len());
    slices.push(std::io::IoSlice::new(head));
    for (frame, tag) in data.chunks(FRAME).zip(tags) {
        slices.push(std::io::IoSlice::new(frame));
        slices.push(std::io::IoSlice::new(tag));
    }
    slices
}

/// Decrypts a sealed frame (`body || tag`) in place under the nonce of `frame` of the
/// record at `pos`; whether its tag matched. The body is then the plaintext.
fn open(key: &LessSafeKey, pos: u32, frame: u32, sealed: &mut [u8]) -> bool {
    key.open_in_place(
        Nonce::assume_unique_for_key(nonce(pos, frame)),
        Aad::empty(),
        sealed,
    )
    .is_ok()
}

/// Decrypts a sealed frame's `body` into `out` (the same length) after checking `tag`, under
/// the nonce of `frame` of the record at `pos`; whether the tag matched. On a mismatch `out`
/// holds the unverified plaintext, which the caller never lets out.
fn open_into(
    key: &LessSafeKey,
    pos: u32,
    frame: u32,
    body: &[u8],
    tag: &[u8],
    out: &mut [u8],
) -> bool {
    out.copy_from_slice(body);
    Frames { key }.open(pos, frame, out, tag)
}

/// Compares tags in constant time.
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a[..].ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LogKey {
        LogKey::new(Secret::new_with(|k| k.copy_from_slice(&[7; 32])))
    }

    /// A write record of `data` at `offset`, sealed at position 64.
    fn sealed_record(
        key: &LogKey,
        salt: &[u8; 16],
        data: &[u8],
        offset: u64,
    ) -> (RecordHeader, Vec<u8>) {
        let header = RecordHeader {
            kind: Kind::Write,
            offset,
            length: data.len() as u64,
            seq: 5,
        };
        let mut out = Vec::new();
        key.seal_record(salt, 64, &header, data, &mut out);
        (header, out)
    }

    #[test]
    fn frames_open_into_any_part_of_a_buffer() {
        let key = key();
        let salt = [4; 16];
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let (_, record) = sealed_record(&key, &salt, &data, 0);
        for (first, within, len) in [
            (0, 0, 10_000),
            (0, 1, 5000),
            (1, 100, 4000),
            (2, 0, 1808),
            (1, 4095, 1),
        ] {
            let start = (frame_pos(64, first) - 64) as usize;
            let sealed = record[start..].to_vec();
            let mut out = vec![0xee; len];
            key.open_frames_into(&salt, 64, 10_000, first, &sealed, within, &mut out)
                .unwrap();
            let from = first as usize * FRAME + within;
            assert_eq!(
                out,
                &data[from..from + len],
                "frame {first}, {within}+{len}"
            );
        }
        // Past the plaintext, or with a frame changed: an error.
        let sealed = record[HEADER_LEN..].to_vec();
        let mut out = vec![0xee; 2];
        assert!(
            key.open_frames_into(&salt, 64, 10_000, 0, &sealed, 9_999, &mut out)
                .is_err()
        );
        // Only the frames read are opened: a change in frame 1 does not fail a read of
        // frame 0, which the caller passed frame 1 with for no reason.
        let mut sealed = record[HEADER_LEN..].to_vec();
        sealed[5000] ^= 1;
        key.open_frames_into(&salt, 64, 10_000, 0, &sealed, 0, &mut out)
            .expect("frame 0 is intact");
        assert_eq!(out, data[..2]);
        // A byte changed in any frame read fails the read, in a frame wanted whole or in part.
        let mut long = vec![0; 9_000];
        for at in [100, 4_200, 8_300, 9_100] {
            let mut sealed = record[HEADER_LEN..].to_vec();
            sealed[at] ^= 0x40;
            assert!(
                key.open_frames_into(&salt, 64, 10_000, 0, &sealed, 10, &mut long)
                    .is_err(),
                "byte {at} changed"
            );
        }
    }

    #[test]
    fn records_open_whole_and_frame_by_frame() {
        let key = key();
        let salt = [3; 16];
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (header, out) = sealed_record(&key, &salt, &data, 8192);
        assert_eq!(out.len() as u64, record_len(Kind::Write, data.len() as u64));
        assert_eq!(key.open_record_header(&salt, 64, &out[..64]), Ok(header));
        // Frame 2 alone (the short last one).
        let start = (frame_pos(64, 2) - 64) as usize;
        let mut frame = out[start..].to_vec();
        let n = key.open_frames(&salt, 64, 10_000, 2, &mut frame).unwrap();
        assert_eq!(&frame[..n], &data[8192..]);
        // All frames.
        let mut all = out[64..].to_vec();
        let n = key.open_frames(&salt, 64, 10_000, 0, &mut all).unwrap();
        assert_eq!(&all[..n], &data[..]);
    }

    #[test]
    fn zero_records_span_any_length_and_write_records_at_most_max_record() {
        let key = key();
        let salt = [3; 16];
        for (kind, length, opens) in [
            (Kind::Zero, 2 << 40, true),
            (Kind::ZeroData, (4 << 30) - 4096, true),
            (Kind::Write, MAX_RECORD as u64, true),
            (Kind::Write, MAX_RECORD as u64 + 1, false),
        ] {
            let header = RecordHeader {
                kind,
                offset: 4096,
                length,
                seq: 9,
            };
            let mut out = Vec::new();
            // Only the header matters here: a write's frames are not read.
            key.seal_record(&salt, 64, &header, &[], &mut out);
            let opened = key.open_record_header(&salt, 64, &out[..HEADER_LEN]);
            assert_eq!(opened.is_ok(), opens, "{kind:?} of {length}: {opened:?}");
        }
    }

    #[test]
    fn moved_or_changed_bytes_fail() {
        let key = key();
        let salt = [3; 16];
        let header = RecordHeader {
            kind: Kind::Write,
            offset: 0,
            length: 4096,
            seq: 1,
        };
        let mut out = Vec::new();
        key.seal_record(&salt, 64, &header, &[1; 4096], &mut out);
        // The same bytes at another position, or under another salt, do not open.
        assert!(key.open_record_header(&salt, 128, &out[..64]).is_err());
        assert!(key.open_record_header(&[4; 16], 64, &out[..64]).is_err());
        let mut frames = out[64..].to_vec();
        frames[10] ^= 1;
        assert!(key.open_frames(&salt, 64, 4096, 0, &mut frames).is_err());
        // A hole (zeros) is not a frame.
        let mut zeros = vec![0; 4096 + 16];
        assert!(key.open_frames(&salt, 64, 4096, 0, &mut zeros).is_err());
        let h = key.segment_header(9, &salt);
        assert_eq!(key.open_segment_header(9, &h), Ok(salt));
        assert!(key.open_segment_header(10, &h).is_err());
    }

    fn write_header(len: usize) -> RecordHeader {
        RecordHeader {
            kind: Kind::Write,
            offset: 0,
            length: len as u64,
            seq: 1,
        }
    }

    #[test]
    fn salts_key_segments_apart() {
        // The same plaintext at the same place of two segments: nothing in common, and
        // neither opens under the other's salt.
        let key = key();
        let data = vec![0x5a; 2 * FRAME];
        let header = write_header(data.len());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        key.seal_record(&[1; 16], 64, &header, &data, &mut a);
        key.seal_record(&[2; 16], 64, &header, &data, &mut b);
        assert_eq!(a.len(), b.len());
        assert_ne!(a[48..64], b[48..64], "header tags");
        for (x, y) in a[64..]
            .chunks(FRAME + TAG_LEN)
            .zip(b[64..].chunks(FRAME + TAG_LEN))
        {
            assert_ne!(x[..FRAME], y[..FRAME], "keystreams");
            assert_ne!(x[FRAME..], y[FRAME..], "tags");
        }
        // Within a segment, the frames of one record and of records at two positions differ.
        assert_ne!(
            a[64..64 + FRAME],
            a[64 + FRAME + TAG_LEN..64 + 2 * FRAME + TAG_LEN]
        );
        let mut c = Vec::new();
        key.seal_record(&[1; 16], 64 + a.len() as u32, &header, &data, &mut c);
        assert_ne!(a[64..64 + FRAME], c[64..64 + FRAME]);
        let mut frames = b[64..].to_vec();
        assert_eq!(
            key.open_frames(&[1; 16], 64, data.len() as u32, 0, &mut frames),
            Err(FormatError::Auth(64))
        );
        let mut frames = b[64..].to_vec();
        assert_eq!(
            key.open_frames(&[2; 16], 64, data.len() as u32, 0, &mut frames),
            Ok(data.len())
        );
        assert_eq!(frames[..data.len()], data[..]);
        // Identical content under an identical salt is identical bytes (what a salt derived
        // from the content relies on).
        let mut again = Vec::new();
        key.seal_record(&[1; 16], 64, &header, &data, &mut again);
        assert_eq!(a, again);
    }

    #[test]
    fn every_changed_bit_fails() {
        let key = key();
        let salt = [3; 16];
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut out = Vec::new();
        key.seal_record(&salt, 64, &write_header(data.len()), &data, &mut out);
        for at in [0, 5, 8, 47, 48, 63] {
            let mut h = out[..64].to_vec();
            h[at] ^= 0x10;
            assert!(
                key.open_record_header(&salt, 64, &h).is_err(),
                "header byte {at}"
            );
        }
        let frames = &out[64..];
        for at in [
            0,
            100,
            FRAME - 1,
            FRAME,
            FRAME + 15,
            FRAME + TAG_LEN,
            frames.len() - 1,
        ] {
            let mut changed = frames.to_vec();
            changed[at] ^= 1;
            let opened = key.open_frames(&salt, 64, data.len() as u32, 0, &mut changed);
            assert_eq!(opened, Err(FormatError::Auth(64)), "frame byte {at}");
        }
        // Frames swapped, or one read as another's index, or cut short.
        let mut swapped = frames[FRAME + TAG_LEN..].to_vec();
        swapped.extend_from_slice(&frames[..FRAME + TAG_LEN]);
        assert!(
            key.open_frames(&salt, 64, data.len() as u32, 0, &mut swapped)
                .is_err()
        );
        let mut second = frames[FRAME + TAG_LEN..].to_vec();
        assert!(
            key.open_frames(&salt, 64, data.len() as u32, 0, &mut second)
                .is_err()
        );
        let mut short = frames[..frames.len() - 1].to_vec();
        assert!(
            key.open_frames(&salt, 64, data.len() as u32, 0, &mut short)
                .is_err()
        );
        // Another volume's key.
        let other = LogKey::new(Secret::new_with(|k| k.copy_from_slice(&[8; 32])));
        let mut all = frames.to_vec();
        assert!(
            other
                .open_frames(&salt, 64, data.len() as u32, 0, &mut all)
                .is_err()
        );
        let h = key.segment_header(1, &salt);
        assert!(other.open_segment_header(1, &h).is_err());
    }

    #[test]
    fn format_is_as_documented() {
        // docs/format.md: AES-256-GCM, key = BLAKE3 derive_key("firn cached volume segment
        // key v2", log key || salt), nonce = pos u32 || frame u32 || 0 u32, no AAD for frames;
        // checked against a one-shot OpenSSL call on a fresh context.
        let key = key();
        let salt = [9; 16];
        let data: Vec<u8> = (0..FRAME as u32 + 10).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        key.seal_record(&salt, 4160, &write_header(data.len()), &data, &mut out);
        let mut material = [7u8; 48];
        material[32..].copy_from_slice(&salt);
        let segment_key = blake3::derive_key(SEGMENT_KEY_CONTEXT, &material);
        for (index, plain) in data.chunks(FRAME).enumerate() {
            let mut iv = [0u8; 12];
            iv[..4].copy_from_slice(&4160u32.to_le_bytes());
            iv[4..8].copy_from_slice(&(index as u32).to_le_bytes());
            let mut tag = [0u8; 16];
            let sealed = openssl::symm::encrypt_aead(
                openssl::symm::Cipher::aes_256_gcm(),
                &segment_key,
                Some(&iv),
                &[],
                plain,
                &mut tag,
            )
            .unwrap();
            let at = (frame_pos(4160, index as u64) - 4160) as usize;
            assert_eq!(out[at..at + plain.len()], sealed[..]);
            assert_eq!(out[at + plain.len()..at + plain.len() + 16], tag);
        }
    }

    #[test]
    fn many_segments_at_once() {
        // More salts than kept contexts, sealing and opening interleaved, from threads.
        let key = std::sync::Arc::new(key());
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let key = key.clone();
                std::thread::spawn(move || {
                    for round in 0..50u32 {
                        let salt = [(round % 13) as u8 + 16 * t; 16];
                        let data = vec![round as u8 | 1; 6000];
                        let mut out = Vec::new();
                        key.seal_record(
                            &salt,
                            64 + round,
                            &write_header(data.len()),
                            &data,
                            &mut out,
                        );
                        let header = key
                            .open_record_header(&salt, 64 + round, &out[..64])
                            .unwrap();
                        assert_eq!(header.length, 6000);
                        let mut frames = out[64..].to_vec();
                        let n = key
                            .open_frames(&salt, 64 + round, 6000, 0, &mut frames)
                            .unwrap();
                        assert_eq!(frames[..n], data[..]);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let key = key();
        let mut h = key.segment_header(1, &[3; 16]);
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        let e = key.open_segment_header(1, &h).unwrap_err();
        assert_eq!(e, FormatError::Version(1));
        assert!(e.to_string().contains("version 1"), "{e}");
    }
}
