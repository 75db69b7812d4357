//! How firn seals its own objects: zstd compression, then XChaCha20-Poly1305 authenticated
//! encryption under a data key derived from the master key; and content addresses by keyed
//! BLAKE3, so equal chunks dedupe without revealing their equality to anyone without the key.
//!
//! The sealed format is in docs/format.md ("Sealed object"). A `context` (for example the
//! object's role and name) is bound into every seal as associated data: a sealed object
//! moved to another name or role fails to open.

pub mod environment;
pub mod keys;
pub mod secret;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;

pub use keys::{KeySource, MasterKey};
pub use secret::{Secret, SecretBuf};

const MAGIC: &[u8; 4] = b"FRNS";
const VERSION: u8 = 1;
const ALGORITHM_XCHACHA20_POLY1305: u8 = 1;
const FLAG_ZSTD: u8 = 1;
const NONCE_LEN: usize = 24;
/// magic, version, algorithm, flags, reserved, key id (u32), plain length (u64), nonce.
pub const HEADER_LEN: usize = 4 + 1 + 1 + 1 + 1 + 4 + 8 + NONCE_LEN;
const TAG_LEN: usize = 16;
/// Nothing firn seals is larger; a header claiming more is refused before any allocation.
pub const MAX_PLAIN_LEN: u64 = 1 << 30;
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("not a sealed object (bad magic or shorter than a header)")]
    NotSealed,
    #[error("sealed with format version {0}, this firn reads version {VERSION}")]
    Version(u8),
    #[error("unknown algorithm {0}")]
    Algorithm(u8),
    #[error("sealed with key id {0}, which this gateway does not have")]
    UnknownKey(u32),
    #[error("authentication failed: wrong key, wrong context, or the object was altered")]
    Authentication,
    #[error("claims {0} bytes of content, more than the {MAX_PLAIN_LEN} allowed")]
    TooLarge(u64),
    #[error("content does not decompress to its recorded length: {0}")]
    Decompress(String),
}

/// A 32-byte keyed-BLAKE3 content address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 32]);

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Seals and opens with the keys derived from one master key, each kept in a `Secret`.
pub struct Sealer {
    data_key: Secret<32>,
    address_key: Secret<32>,
    volume_root: Secret<32>,
    log_root: Secret<32>,
    key_id: u32,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    pub fn new(master: &MasterKey) -> Sealer {
        Sealer {
            data_key: master.derive("firn seal data key v1"),
            address_key: master.derive("firn content address key v1"),
            volume_root: master.derive("firn volume sector key v1"),
            log_root: master.derive("firn volume log key v1"),
            key_id: 0,
        }
    }

    /// The AEAD keyed for one call. Keying XChaCha20-Poly1305 is a copy of 32 bytes, and
    /// the copy is wiped when the cipher drops, so the data key itself stays in its
    /// `Secret` rather than in a long-lived cipher object in ordinary memory.
    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.data_key).into())
    }

    /// The 512-bit AES-256-XTS key (two AES-256 keys) for one volume's local sectors.
    pub fn volume_key(&self, volume_id: &str) -> Secret<64> {
        Secret::new_with(|key| {
            let mut hasher = blake3::Hasher::new_keyed(&self.volume_root);
            hasher.update(volume_id.as_bytes());
            hasher.finalize_xof().fill(key);
            zeroize::Zeroize::zeroize(&mut hasher);
        })
    }

    /// The 256-bit XChaCha20-Poly1305 key of one cached volume's log segments.
    pub fn log_key(&self, volume_id: &str) -> Secret<32> {
        Secret::new_with(|key| {
            let mut hasher = blake3::Hasher::new_keyed(&self.log_root);
            hasher.update(volume_id.as_bytes());
            hasher.finalize_xof().fill(key);
            zeroize::Zeroize::zeroize(&mut hasher);
        })
    }

    /// The content address of `plain`: equal content, equal address, under this key only.
    pub fn address(&self, plain: &[u8]) -> Address {
        let mut hasher = blake3::Hasher::new_keyed(&self.address_key);
        hasher.update(plain);
        let address = Address(*hasher.finalize().as_bytes());
        // The hasher's state began as the key: wipe it, as `keyed_hash` would not.
        zeroize::Zeroize::zeroize(&mut hasher);
        address
    }

    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Vec<u8> {
        // Compress only when it pays; random or already-compressed data is stored as is.
        let compressed = zstd::bulk::compress(plain, ZSTD_LEVEL)
            .ok()
            .filter(|c| c.len() < plain.len());
        let (flags, body) = match &compressed {
            Some(c) => (FLAG_ZSTD, c.as_slice()),
            None => (0, plain),
        };
        let mut sealed = self.header(flags, plain.len() as u64, HEADER_LEN + body.len() + TAG_LEN);
        sealed.extend_from_slice(body);
        drop(compressed);
        self.encrypt(sealed, context)
    }

    /// `seal` of the `plain_len` bytes that `write` produces, compressed as they come: a
    /// large object (a volume's checkpoint, written from its live map) is never in memory
    /// whole before it is compressed. Always compressed; an error if `write` fails or
    /// produces another length.
    pub fn seal_streamed(
        &self,
        context: &[u8],
        plain_len: u64,
        write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> std::io::Result<Vec<u8>> {
        use std::io::Error;
        if plain_len > MAX_PLAIN_LEN {
            return Err(Error::other(format!(
                "{plain_len} bytes: more than a seal holds"
            )));
        }
        let sealed = self.header(FLAG_ZSTD, plain_len, HEADER_LEN + 4096);
        let mut encoder = zstd::stream::Encoder::new(sealed, ZSTD_LEVEL)?;
        encoder.set_pledged_src_size(Some(plain_len))?;
        let mut counted = Counted {
            inner: &mut encoder,
            bytes: 0,
        };
        write(&mut counted)?;
        if counted.bytes != plain_len {
            return Err(Error::other(format!(
                "{} bytes written to a seal of {plain_len}",
                counted.bytes
            )));
        }
        Ok(self.encrypt(encoder.finish()?, context))
    }

    /// A sealed object's header, in a buffer with room for `capacity` bytes.
    fn header(&self, flags: u8, plain_len: u64, capacity: usize) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut sealed = Vec::with_capacity(capacity);
        sealed.extend_from_slice(MAGIC);
        sealed.extend_from_slice(&[VERSION, ALGORITHM_XCHACHA20_POLY1305, flags, 0]);
        sealed.extend_from_slice(&self.key_id.to_le_bytes());
        sealed.extend_from_slice(&plain_len.to_le_bytes());
        sealed.extend_from_slice(&nonce);
        sealed
    }

    /// Encrypts the body after the header in place and appends the tag: the object is in
    /// memory once as it is sealed.
    fn encrypt(&self, mut sealed: Vec<u8>, context: &[u8]) -> Vec<u8> {
        let aad = [&sealed[..HEADER_LEN], context].concat();
        let nonce = *XNonce::from_slice(&sealed[20..HEADER_LEN]);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(&nonce, &aad, &mut sealed[HEADER_LEN..])
            // XChaCha20-Poly1305 fails only for messages beyond 256 GiB.
            .unwrap_or_else(|_| unreachable!("message within XChaCha20-Poly1305 limits"));
        sealed.extend_from_slice(&tag);
        sealed
    }

    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        // Checked before the copy, so bytes that are no sealed object are not copied.
        self.check(sealed)?;
        self.open_owned(context, sealed.to_vec())
    }

    /// `open` of a sealed object the caller gives up: decrypted where it lies, so a large
    /// one (a volume's checkpoint) is not in memory twice before it is decompressed.
    pub fn open_owned(&self, context: &[u8], mut sealed: Vec<u8>) -> Result<Vec<u8>, SealError> {
        let (flags, plain_len) = self.check(&sealed)?;
        let aad = [&sealed[..HEADER_LEN], context].concat();
        let nonce = *XNonce::from_slice(&sealed[20..HEADER_LEN]);
        let body_end = sealed.len() - TAG_LEN;
        let tag = *Tag::from_slice(&sealed[body_end..]);
        self.cipher()
            .decrypt_in_place_detached(&nonce, &aad, &mut sealed[HEADER_LEN..body_end], &tag)
            .map_err(|_| SealError::Authentication)?;
        if flags & FLAG_ZSTD == 0 {
            sealed.truncate(body_end);
            sealed.drain(..HEADER_LEN);
            return Ok(sealed);
        }
        let plain = zstd::bulk::decompress(&sealed[HEADER_LEN..body_end], plain_len as usize)
            .map_err(|e| SealError::Decompress(e.to_string()))?;
        if plain.len() as u64 != plain_len {
            return Err(SealError::Decompress(format!(
                "{} bytes, header says {plain_len}",
                plain.len()
            )));
        }
        Ok(plain)
    }

    /// The header's flags and plain length, if it is a header this gateway can open.
    fn check(&self, sealed: &[u8]) -> Result<(u8, u64), SealError> {
        if sealed.len() < HEADER_LEN + TAG_LEN || &sealed[..4] != MAGIC {
            return Err(SealError::NotSealed);
        }
        let header = &sealed[..HEADER_LEN];
        if header[4] != VERSION {
            return Err(SealError::Version(header[4]));
        }
        if header[5] != ALGORITHM_XCHACHA20_POLY1305 {
            return Err(SealError::Algorithm(header[5]));
        }
        let key_id = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        if key_id != self.key_id {
            return Err(SealError::UnknownKey(key_id));
        }
        let plain_len = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
        if plain_len > MAX_PLAIN_LEN {
            return Err(SealError::TooLarge(plain_len));
        }
        Ok((header[6], plain_len))
    }
}

/// A writer that counts what passes through it.
struct Counted<'a, W: std::io::Write> {
    inner: &'a mut W,
    bytes: u64,
}

impl<W: std::io::Write> std::io::Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(seed: u8) -> Sealer {
        Sealer::new(&MasterKey::from_bytes([seed; 32]))
    }

    #[test]
    fn round_trips_compressible_and_random_data() {
        let s = sealer(1);
        let mut random = vec![0u8; 100_000];
        rand::rng().fill_bytes(&mut random);
        for plain in [Vec::new(), vec![7u8; 1 << 20], random, b"x".to_vec()] {
            let sealed = s.seal(b"chunk", &plain);
            assert_eq!(s.open(b"chunk", &sealed), Ok(plain.clone()));
            assert_ne!(&sealed[HEADER_LEN..], plain.as_slice());
        }
        let sealed = s.seal(b"chunk", &vec![0u8; 1 << 20]);
        assert!(
            sealed.len() < 1000,
            "zeros compress: {} bytes",
            sealed.len()
        );
    }

    #[test]
    fn wrong_key_context_or_any_flipped_bit_fails() {
        let plain = b"the quick brown fox jumps over the lazy dog".repeat(10);
        let sealed = sealer(1).seal(b"commit/1", &plain);
        assert_eq!(
            sealer(2).open(b"commit/1", &sealed),
            Err(SealError::Authentication)
        );
        assert_eq!(
            sealer(1).open(b"commit/2", &sealed),
            Err(SealError::Authentication)
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(
                sealer(1).open(b"commit/1", &bad).is_err(),
                "flip at byte {i} accepted"
            );
        }
        for n in 0..sealed.len() {
            assert!(
                sealer(1).open(b"commit/1", &sealed[..n]).is_err(),
                "truncation to {n} accepted"
            );
        }
    }

    #[test]
    fn a_streamed_seal_opens_like_a_sealed_one_and_must_be_as_long_as_it_says() {
        let s = sealer(1);
        let plain: Vec<u8> = (0..300_000u32)
            .flat_map(|n| (n / 7).to_le_bytes())
            .collect();
        let streamed = s
            .seal_streamed(b"checkpoint", plain.len() as u64, |to| {
                for piece in plain.chunks(4099) {
                    to.write_all(piece)?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(s.open(b"checkpoint", &streamed), Ok(plain.clone()));
        assert!(streamed.len() < plain.len() / 2, "compressed");
        assert_eq!(
            s.open(b"checkpoint/2", &streamed),
            Err(SealError::Authentication)
        );
        for claimed in [plain.len() as u64 - 1, plain.len() as u64 + 1] {
            let short = s.seal_streamed(b"checkpoint", claimed, |to| to.write_all(&plain));
            assert!(
                short.is_err(),
                "{claimed} bytes claimed, {} written",
                plain.len()
            );
        }
        let failed = s.seal_streamed(b"checkpoint", 10, |_| Err(std::io::Error::other("no")));
        assert!(failed.is_err());
    }

    #[test]
    fn addresses_are_keyed() {
        assert_eq!(sealer(1).address(b"a"), sealer(1).address(b"a"));
        assert_ne!(sealer(1).address(b"a"), sealer(1).address(b"b"));
        assert_ne!(sealer(1).address(b"a"), sealer(2).address(b"a"));
        assert_ne!(sealer(1).address(b"a").0, *blake3::hash(b"a").as_bytes());
    }

    #[test]
    fn volume_keys_differ_per_volume_and_master() {
        assert_eq!(*sealer(1).volume_key("a"), *sealer(1).volume_key("a"));
        assert_ne!(*sealer(1).volume_key("a"), *sealer(1).volume_key("b"));
        assert_ne!(*sealer(1).volume_key("a"), *sealer(2).volume_key("a"));
        let key = sealer(1).volume_key("a");
        assert_ne!(key[..32], key[32..], "the two XTS halves differ");
    }

    #[test]
    fn two_seals_of_the_same_content_differ() {
        let s = sealer(3);
        assert_ne!(s.seal(b"", b"same"), s.seal(b"", b"same"));
    }
}
