//! The cached volume's log format: segments of sealed records (docs/format.md, "Cached
//! volume segment").
//!
//! A segment is a file on the gateway's disk and, once uploaded, the object
//! `volumes/<id>/segments/<seq>` with the same bytes. It starts with a 64-byte header and
//! holds records back to back. A record is a 64-byte header (what it does to which bytes) and,
//! for a write, its data cut into frames of up to 4096 bytes, each encrypted on its own with
//! XChaCha20-Poly1305 and followed by its 16-byte tag. Any frame can therefore be fetched with
//! a ranged GET and verified without the rest of the segment.
//!
//! Nonces are never reused: each segment draws a random 128-bit salt when it is created, and
//! the nonce of a frame is `salt || record position (u32) || frame index (u32)`; a record
//! header's frame index is `u32::MAX`, the segment header's position and index both are.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

use crate::seal::secret::Secret;

pub const SEGMENT_MAGIC: &[u8; 4] = b"FSG1";
pub const RECORD_MAGIC: &[u8; 4] = b"FRC1";
pub const SEGMENT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const FRAME: usize = 4096;
pub const TAG_LEN: usize = 16;
/// The largest write record: larger writes are split (NBD requests are up to 32 MiB), which
/// bounds a segment's size at `segment_size` or one record, whichever is larger.
pub const MAX_RECORD: usize = 1 << 20;

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
    #[error("segment format version {0} is not one this firn reads")]
    Version(u32),
    #[error("segment header of segment {found}, expected {expected}")]
    WrongSegment { expected: u64, found: u64 },
    #[error("record at {0}: no record there (end of the log, or damage)")]
    NoRecord(u32),
    #[error("authentication failed at {0}: damaged, or not sealed with this volume's key")]
    Auth(u32),
}

/// The key of one volume's log, and the cipher operations on it.
pub struct LogKey {
    key: Secret<32>,
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogKey")
    }
}

fn nonce(salt: &[u8; 16], pos: u32, frame: u32) -> XNonce {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(salt);
    n[16..20].copy_from_slice(&pos.to_le_bytes());
    n[20..].copy_from_slice(&frame.to_le_bytes());
    XNonce::from(n)
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
        LogKey { key }
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.key).into())
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
        if self.tag(&salt, u32::MAX, u32::MAX, &h[..48])[..] != h[48..64] {
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
        let tag = self
            .cipher()
            .encrypt_in_place_detached(&nonce(salt, pos, frame), aad, &mut [])
            .unwrap_or_else(|_| unreachable!("empty message"));
        tag.into()
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
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(RECORD_MAGIC);
        h[4] = header.kind as u8;
        h[8..16].copy_from_slice(&header.offset.to_le_bytes());
        h[16..24].copy_from_slice(&header.length.to_le_bytes());
        h[24..32].copy_from_slice(&header.seq.to_le_bytes());
        let tag = self.tag(salt, pos, u32::MAX, &h[..48]);
        h[48..].copy_from_slice(&tag);
        out.extend_from_slice(&h);
        let cipher = self.cipher();
        for (index, frame) in data.chunks(FRAME).enumerate() {
            let start = out.len();
            out.extend_from_slice(frame);
            let tag = cipher
                .encrypt_in_place_detached(&nonce(salt, pos, index as u32), &[], &mut out[start..])
                .unwrap_or_else(|_| unreachable!("frame within limits"));
            out.extend_from_slice(&tag);
        }
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
        if self.tag(salt, pos, u32::MAX, &h[..48])[..] != h[48..64] {
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
        if header.length as usize > MAX_RECORD || header.offset.checked_add(header.length).is_none()
        {
            return Err(FormatError::NoRecord(pos));
        }
        Ok(header)
    }

    /// Decrypts frames `first..` of the record at `pos` in place: `sealed` holds whole sealed
    /// frames back to back, starting with frame `first`; `rec_len` is the record's data
    /// length. Returns the plaintext length (the frames' bytes without their tags, moved to
    /// the front of `sealed`).
    pub fn open_frames(
        &self,
        salt: &[u8; 16],
        pos: u32,
        rec_len: u32,
        first: u64,
        sealed: &mut [u8],
    ) -> Result<usize, FormatError> {
        let cipher = self.cipher();
        let mut read = 0;
        let mut written = 0;
        let mut index = first;
        while read < sealed.len() {
            let frame_len = (rec_len as u64 - index * FRAME as u64).min(FRAME as u64) as usize;
            let end = read + frame_len + TAG_LEN;
            if end > sealed.len() {
                return Err(FormatError::Auth(pos));
            }
            let tag = Tag::clone_from_slice(&sealed[read + frame_len..end]);
            let (_, rest) = sealed.split_at_mut(read);
            cipher
                .decrypt_in_place_detached(
                    &nonce(salt, pos, index as u32),
                    &[],
                    &mut rest[..frame_len],
                    &tag,
                )
                .map_err(|_| FormatError::Auth(pos))?;
            sealed.copy_within(read..read + frame_len, written);
            written += frame_len;
            read = end;
            index += 1;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LogKey {
        LogKey::new(Secret::new_with(|k| k.copy_from_slice(&[7; 32])))
    }

    #[test]
    fn records_open_whole_and_frame_by_frame() {
        let key = key();
        let salt = [3; 16];
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let header = RecordHeader {
            kind: Kind::Write,
            offset: 8192,
            length: data.len() as u64,
            seq: 5,
        };
        let mut out = Vec::new();
        key.seal_record(&salt, 64, &header, &data, &mut out);
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
}
